"""Tooling, GPU machine: how fast cuBLAS (through PyTorch) runs the MoE expert GEMMs of a Mixtral-8x7B prefill chunk, to
judge how far the engine's per-expert cuBLAS path is from what the card does at these shapes.

For a chunk of R rows routed top-2 over 8 experts at random (group sizes as a dummy-weight prefill sees them), it times
  - gate-up: one GEMM an expert, rows x hidden by (2 * intermediate) x hidden, bf16 out (the engine's GroupedCublas);
  - down: one GEMM an expert, rows x intermediate by hidden x intermediate;
  - the same products with every group padded to the largest (one strided-batched GEMM, as a wave-filling bound);
  - torch._grouped_mm where this torch has it (one grouped kernel for all experts);
  - a square 8192 GEMM: the card's bf16 rate in the same run.
and prints TFLOP/s for each (CUDA events around 20 back-to-back calls, median of 5 such windows, after 5 warm-ups).

  python3 tools/gpu/gemm_shapes.py [--rows 2048] [--hidden 4096] [--intermediate 14336]
"""
import argparse
import statistics

import torch


def timed(fn, reps=20, warmup=5):
    """ms a call: the median of 5 windows of `reps` back-to-back calls (no synchronisation inside a window), after warm-ups."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    windows = []
    for _ in range(5):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(reps):
            fn()
        end.record()
        end.synchronize()
        windows.append(start.elapsed_time(end) / reps)
    return statistics.median(windows)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, default=2048)
    parser.add_argument("--hidden", type=int, default=4096)
    parser.add_argument("--intermediate", type=int, default=14336)
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--top-k", type=int, default=2)
    parser.add_argument("--once", action="store_true", help="run each expert's gate-up and down GEMM once and stop (for ncu)")
    args = parser.parse_args()
    torch.manual_seed(0)
    dev = "cuda"
    e, h, i, r, k = args.experts, args.hidden, args.intermediate, args.rows, args.top_k
    print(torch.cuda.get_device_name(), "torch", torch.__version__, "cuBLAS", torch.backends.cuda.preferred_blas_library())

    logits = torch.randn(r, e, device=dev)
    chosen = logits.topk(k, dim=-1).indices.flatten()
    counts = torch.bincount(chosen, minlength=e).tolist()
    print("group sizes:", counts)
    sq_a = torch.randn(8192, 8192, device=dev, dtype=torch.bfloat16)
    sq_b = torch.randn(8192, 8192, device=dev, dtype=torch.bfloat16)
    if not args.once:
        square = timed(lambda: torch.mm(sq_a, sq_b))
        print(f"{'square 8192, bf16 (first)':44s} {square:8.3f} ms  {2.0 * 8192 ** 3 / square / 1e9:7.1f} TFLOP/s")
    slots = sum(counts)
    gate_up = torch.randn(e, 2 * i, h, device=dev, dtype=torch.bfloat16) * 0.02
    down = torch.randn(e, h, i, device=dev, dtype=torch.bfloat16) * 0.02
    x = torch.randn(slots, h, device=dev, dtype=torch.bfloat16)
    act = torch.randn(slots, i, device=dev, dtype=torch.bfloat16)
    out_gu = torch.empty(slots, 2 * i, device=dev, dtype=torch.bfloat16)
    out_d = torch.empty(slots, h, device=dev, dtype=torch.bfloat16)
    offsets = [0]
    for c in counts:
        offsets.append(offsets[-1] + c)
    flop_gu = 2.0 * slots * 2 * i * h
    flop_d = 2.0 * slots * h * i

    def per_expert_gu():
        for x_ in range(e):
            a, b = offsets[x_], offsets[x_ + 1]
            torch.mm(x[a:b], gate_up[x_].t(), out=out_gu[a:b])

    def per_expert_d():
        for x_ in range(e):
            a, b = offsets[x_], offsets[x_ + 1]
            torch.mm(act[a:b], down[x_].t(), out=out_d[a:b])

    if args.once:
        per_expert_gu()
        per_expert_d()
        torch.cuda.synchronize()
        return

    def report(name, ms, flop):
        print(f"{name:44s} {ms:8.3f} ms  {flop / ms / 1e9:7.1f} TFLOP/s")

    report("gate-up, cuBLAS an expert", timed(per_expert_gu), flop_gu)
    report("down, cuBLAS an expert", timed(per_expert_d), flop_d)
    def per_expert_gu_halves():
        for x_ in range(e):
            a, b = offsets[x_], offsets[x_ + 1]
            for cols in (slice(0, i), slice(i, 2 * i)):
                torch.mm(x[a:b], gate_up[x_][cols].t(), out=out_gu[a:b, cols])
    report("gate-up, cuBLAS an expert in 2 column parts", timed(per_expert_gu_halves), flop_gu)

    largest = max(counts)
    xp = torch.randn(e, largest, h, device=dev, dtype=torch.bfloat16)
    ap = torch.randn(e, largest, i, device=dev, dtype=torch.bfloat16)
    report(f"gate-up, padded to {largest}, batched", timed(lambda: torch.bmm(xp, gate_up.transpose(1, 2))), 2.0 * e * largest * 2 * i * h)
    report(f"down, padded to {largest}, batched", timed(lambda: torch.bmm(ap, down.transpose(1, 2))), 2.0 * e * largest * h * i)
    report("  (padded, counting only real rows) gate-up", timed(lambda: torch.bmm(xp, gate_up.transpose(1, 2))), flop_gu)

    grouped = getattr(torch, "_grouped_mm", None)
    if grouped is not None:
        offs = torch.tensor(offsets[1:], device=dev, dtype=torch.int32)
        try:
            report("gate-up, torch._grouped_mm", timed(lambda: grouped(x, gate_up.transpose(1, 2), offs=offs)), flop_gu)
            report("down, torch._grouped_mm", timed(lambda: grouped(act, down.transpose(1, 2), offs=offs)), flop_d)
        except Exception as error:  # layout or architecture this torch does not take
            print("torch._grouped_mm:", type(error).__name__, str(error).splitlines()[0][:160])
    else:
        print("torch._grouped_mm: not in this torch")

    report("square 8192, bf16 (last)", timed(lambda: torch.mm(sq_a, sq_b)), 2.0 * 8192 ** 3)


if __name__ == "__main__":
    main()
