"""Tooling, GPU machine: how fast a decode step's attention projections can read their weights, to judge whether a kernel
of ours could beat cuBLAS there (the engine's op profile has them at about 2.4 TB/s at batch 64, against the card's
4.3 TB/s copy rate).

For Mixtral-8x7B's fused qkv (6144 x 4096) and output (4096 x 4096) projections at 8, 64 and 256 rows it times
  - cuBLAS through torch.nn.functional.linear;
  - the same product compiled by inductor with mode="max-autotune-no-cudagraphs", which measures its Triton GEMM
    templates against cuBLAS and keeps the fastest (inductor prints each candidate's time: the AUTOTUNE lines);
each call on the next of 48 distinct weight copies (2.4 GB for qkv), so that the weights come from memory and not from
the 60 MB L2, as in a decode step, the 48 calls captured in one CUDA graph (the host's launch costs left out; inductor's
own AUTOTUNE times reuse one weight, which L2 then holds). It prints ms a call and the weights' read rate in TB/s, beside the rate of a 4 GiB
device-to-device copy (bytes read plus written) measured in the same run.

  python3 tools/gpu/projection_rates.py [--rows 8,64,256] [--copies 48]
"""
import argparse
import statistics

import torch
import torch.nn.functional as F


def timed(fn, calls, windows=5):
    """ms a call: the median of `windows` windows of `calls` back-to-back calls, after one warm-up window."""
    for j in range(calls):
        fn(j)
    torch.cuda.synchronize()
    results = []
    for _ in range(windows):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for j in range(calls):
            fn(j)
        end.record()
        end.synchronize()
        results.append(start.elapsed_time(end) / calls)
    return statistics.median(results)


def graph_timed(fn, calls):
    """ms a call of `calls` calls captured in one CUDA graph (so that the host's launch costs stay out), replayed."""
    for j in range(calls):
        fn(j)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for j in range(calls):
            fn(j)
    return timed(lambda _: graph.replay(), calls=1)


def copy_rate():
    """TB/s of a 4 GiB device-to-device copy, counting bytes read plus written."""
    source = torch.empty(1 << 31, dtype=torch.bfloat16, device="cuda")
    target = torch.empty_like(source)
    ms = timed(lambda _: target.copy_(source), calls=5)
    return 2 * source.numel() * 2 / ms / 1e9


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", default="8,64,256")
    parser.add_argument("--copies", type=int, default=48)
    args = parser.parse_args()
    torch.manual_seed(0)
    print(torch.cuda.get_device_name(), "torch", torch.__version__)
    print(f"copy rate (read + write): {copy_rate():.2f} TB/s")
    compiled = torch.compile(lambda x, w: F.linear(x, w), mode="max-autotune-no-cudagraphs", dynamic=False)
    for name, features in (("qkv", 6144), ("o_proj", 4096)):
        weights = [torch.randn(features, 4096, dtype=torch.bfloat16, device="cuda") * 0.02 for _ in range(args.copies)]
        weight_bytes = features * 4096 * 2
        for rows in (int(r) for r in args.rows.split(",")):
            x = torch.randn(rows, 4096, dtype=torch.bfloat16, device="cuda")
            reference = F.linear(x, weights[0])
            result = compiled(x, weights[0])
            error = ((result.float() - reference.float()).norm() / reference.float().norm()).item()
            cublas = graph_timed(lambda j: F.linear(x, weights[j % args.copies]), calls=args.copies) / args.copies
            tuned = graph_timed(lambda j: compiled(x, weights[j % args.copies]), calls=args.copies) / args.copies
            print(f"{name} {features}x4096, {rows:3d} rows: cuBLAS {cublas * 1e3:7.1f} us ({weight_bytes / cublas / 1e9:5.2f} TB/s), "
                  f"max-autotune {tuned * 1e3:7.1f} us ({weight_bytes / tuned / 1e9:5.2f} TB/s), relative error {error:.1e}", flush=True)
        del weights


if __name__ == "__main__":
    main()
