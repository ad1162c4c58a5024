"""Whether ptxas kept each kernel's wgmma instructions in flight together: for every function in a cubin that issues
HGMMA (wgmma), the count of HGMMA instructions and of full waits (WARPGROUP.DEPBAR.LE gsb0, 0x0), and the HGMMA followed
by a full wait before the next HGMMA (serialised). A multiplying loop of four HGMMA per k-tile should show one full wait
per tile at most, not one per HGMMA. Needs cuobjdump (CUDA toolkit).

    python3 tools/gpu/sass_wgmma.py KERNELS.cubin [name-filter]
"""
import os
import re
import shutil
import subprocess
import sys


def main():
    path, only = sys.argv[1], sys.argv[2] if len(sys.argv) > 2 else ""
    tool = shutil.which("cuobjdump") or os.path.join(os.environ.get("CUDA_HOME", "/usr/local/cuda"), "bin", "cuobjdump")
    sass = subprocess.run([tool, "-sass", path], capture_output=True, text=True, check=True).stdout
    functions = re.split(r"\n\s*Function : ", sass)[1:]
    print(f"{'kernel':<44} {'HGMMA':>6} {'full waits':>10} {'serialised':>10}")
    for body in functions:
        name = body.split("\n", 1)[0].strip()
        if only not in name:
            continue
        ops = [line for line in body.splitlines() if "HGMMA" in line or "WARPGROUP.DEPBAR" in line]
        if not any("HGMMA" in op for op in ops):
            continue
        hgmma = sum("HGMMA" in op for op in ops)
        full = sum("DEPBAR.LE gsb0, 0x0" in op for op in ops)
        serial = sum(1 for a, b in zip(ops, ops[1:]) if "HGMMA" in a and "DEPBAR.LE gsb0, 0x0" in b)
        print(f"{name:<44} {hgmma:>6} {full:>10} {serial:>10}")


if __name__ == "__main__":
    main()
