#!/usr/bin/env python3
"""Writes diagnostic copies of gemm_wgmma.cu, each with one part of the token-major prefill kernels (moe_tma_tokens_*)
taken out, for MOE_RAG_INJECT_KERNEL_OVERRIDE, so that gemm-bench can time what is left (run.sh tokens-variants):

  noepi   the results are never written (the epilogue skipped behind a condition that is never true);
  nomma   the k-loop waits for and hands back every stage but issues no wgmma (copies and barriers only);
  noload  the copier arrives on each stage's barrier without copying (products and barriers only, on stale shared memory).

Their outputs are wrong by design; they time the kernels, nothing else. Each variant is a substitution of a fragment of
the source; the script fails if a fragment is no longer there.

    tools/gpu/tokens_variants.py OUT_DIR    (writes OUT_DIR/{base,noepi,nomma,noload}/gemm_wgmma.cu)
"""
import pathlib
import sys

SOURCE = pathlib.Path(__file__).resolve().parents[2] / "src/MoeRagInject.Backend.Cuda/Kernels/gemm_wgmma.cu"

EPILOGUE = "        for (int h = 0; h < 2; h++)\n        {\n            const int p = rowBegin + 64 * half + 16 * warp + g + 8 * h;"
PRODUCTS = "            for (int kk = 0; kk < GEMM_BK / 16; kk++) wgmma_m64n256k16(d, da + 2 * kk, dw + 2 * kk, 1);"
COPIES_BEGIN = "                    barrier_expect(full, TOKENS_STAGE_BYTES);"
COPIES_END = "                    tma_load(shared_address(tileA + stage * 128 * GEMM_BK), rows, kt * GEMM_BK, rowBegin, full);"


def replace_once(text: str, old: str, new: str, what: str) -> str:
    if text.count(old) != 1:
        sys.exit(f"tokens_variants: the {what} fragment occurs {text.count(old)} times in {SOURCE} (expected once)")
    return text.replace(old, new)


def main() -> None:
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    source = SOURCE.read_text()
    begin, end = source.find(COPIES_BEGIN), source.find(COPIES_END)
    if begin < 0 or end < begin:
        sys.exit(f"tokens_variants: the copier's fragment is not in {SOURCE}")
    copies = source[begin:end + len(COPIES_END)]
    variants = {
        "base": source,
        # k is never negative: the loop runs no pass, and the compiler keeps the products it cannot prove unused.
        "noepi": replace_once(source, EPILOGUE, EPILOGUE.replace("h < 2;", "h < (k < 0 ? 2 : 0);"), "epilogue"),
        "nomma": replace_once(source, PRODUCTS, PRODUCTS.replace("for (int kk", "if (k < 0) for (int kk"), "products"),
        "noload": replace_once(source, copies,
                               "                    barrier_arrive(full);\n                    (void)sw; (void)secondRow; (void)rowBegin;",
                               "copier"),
    }
    for name, text in variants.items():
        folder = pathlib.Path(sys.argv[1]) / name
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "gemm_wgmma.cu").write_text(text)
        print(f"{folder / 'gemm_wgmma.cu'}")


if __name__ == "__main__":
    main()
