"""Resource report of every CUDA kernel: registers, shared memory, spills, H100 occupancy.

Compiles each csrc/cuda/*.cu with ``nvcc -cubin -arch=sm_90 -Xptxas -v`` (nvcc instantiates
the kernels listed by the files' GPUDIFF_KERNEL lines), parses ptxas's report and computes
the theoretical occupancy on an H100 (sm_90) for the block sizes the backend launches.
Static analysis only: no GPU needed. Writes bench/results/cuda_resources.json and prints a
table.

    python bench/cuda_resources.py [--nvcc PATH] [--out FILE]

Targets (issue 8): no spills anywhere; occupancy >= 50% for the elementwise and row kernels
at every block size they are launched with. The tensor-core kernels (tensor_core.cu, issue 16)
are reported at their 128-thread blocks; their target is no spills.
"""
import argparse
import datetime
import json
import math
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SRC = os.path.join(ROOT, "csrc", "cuda")
ARCH = "sm_90"
NVCC_FLAGS = ["-cubin", f"-arch={ARCH}", "-std=c++17", "-Xptxas", "-v"]

# H100 SXM (compute capability 9.0), per SM
H100 = {
    "max_warps": 64,
    "max_blocks": 32,
    "registers": 65536,
    "register_alloc_unit": 256,   # registers are allocated per warp in units of 256
    "shared_bytes": 233472,       # 228 KiB usable by blocks
    "shared_alloc_unit": 128,
    "shared_reserved_per_block": 1024,  # the runtime keeps 1 KiB per block (sm_80+)
}

# What each file's kernels are and the block sizes (threads) the backend launches them with
# (gpudiff/runtime/cuda/launch.py: elementwise_config, row_config). Files not listed are
# reported at 256 threads without a target.
FILE_KINDS = {
    "activations.cu": ("elementwise", [256]),
    "softmax.cu": ("row", [128, 256, 512]),
    "cross_entropy.cu": ("row", [128, 256, 512]),
    "tensor_core.cu": ("tensor_core", [128]),  # mma.sync kernels: 128-thread blocks (4 warps)
}
SKIP_FILES = {"selftest.cu"}  # the emulator's test kernels
TARGETED_KINDS = ("elementwise", "row")
MIN_OCCUPANCY = 0.5


def occupancy(registers, static_smem, threads, sm=H100):
    """Theoretical occupancy (active warps / max warps) of one SM, and the limiting factor."""
    warps = math.ceil(threads / 32)
    regs_per_warp = math.ceil(max(registers, 1) * 32 / sm["register_alloc_unit"]) * sm["register_alloc_unit"]
    limits = {
        "warps": sm["max_warps"] // warps,
        "blocks": sm["max_blocks"],
        "registers": (sm["registers"] // regs_per_warp) // warps,
    }
    smem = static_smem + sm["shared_reserved_per_block"]
    smem = math.ceil(smem / sm["shared_alloc_unit"]) * sm["shared_alloc_unit"]
    limits["shared memory"] = sm["shared_bytes"] // smem
    blocks = min(limits.values())
    limiter = min(limits, key=limits.get)
    return blocks * warps / sm["max_warps"], limiter


def demangle(names):
    out = subprocess.run(["c++filt"], input="\n".join(names), capture_output=True, text=True,
                         check=True).stdout.splitlines()
    return dict(zip(names, out))


def name_expression(demangled):
    """'void softmax_fwd<float>(float const*, ...)' -> 'softmax_fwd<float>'."""
    s = demangled[5:] if demangled.startswith("void ") else demangled
    depth = 0
    for i, ch in enumerate(s):
        depth += ch == "<"
        depth -= ch == ">"
        if ch == "(" and depth == 0:
            return s[:i]
    return s


def ptxas_report(nvcc, src, fname):
    """[{mangled, registers, static_smem, spill_stores, spill_loads, stack, barriers}]."""
    with tempfile.TemporaryDirectory() as tmp:
        proc = subprocess.run([nvcc, *NVCC_FLAGS, fname, "-o", os.path.join(tmp, "k.cubin")],
                              capture_output=True, text=True, cwd=src)
    if proc.returncode != 0:
        raise RuntimeError(f"nvcc failed on {fname}:\n{proc.stderr}")
    kernels, cur = [], None
    for line in proc.stderr.splitlines():
        m = re.search(r"Compiling entry function '(\w+)' for '(\w+)'", line)
        if m:
            cur = {"mangled": m.group(1), "registers": 0, "static_smem": 0, "spill_stores": 0,
                   "spill_loads": 0, "stack": 0, "barriers": 0}
            kernels.append(cur)
            continue
        if cur is None:
            continue
        m = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", line)
        if m:
            cur["stack"], cur["spill_stores"], cur["spill_loads"] = map(int, m.groups())
        m = re.search(r"Used (\d+) registers", line)
        if m:
            cur["registers"] = int(m.group(1))
            b = re.search(r"used (\d+) barriers", line)
            s = re.search(r"(\d+) bytes smem", line)
            cur["barriers"] = int(b.group(1)) if b else 0
            cur["static_smem"] = int(s.group(1)) if s else 0
    return kernels


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--nvcc", default=shutil.which("nvcc") or "/usr/local/bin/nvcc")
    ap.add_argument("--out", default=os.path.join(ROOT, "bench", "results", "cuda_resources.json"))
    ap.add_argument("--src", default=SRC, help="directory of the .cu files (default csrc/cuda)")
    args = ap.parse_args(argv)

    version = subprocess.run([args.nvcc, "--version"], capture_output=True, text=True,
                             check=True).stdout
    version = next((l for l in version.splitlines() if "release" in l), version.strip())
    rows = []
    for fname in sorted(f for f in os.listdir(args.src) if f.endswith(".cu")):
        if fname in SKIP_FILES:
            continue
        kind, blocks = FILE_KINDS.get(fname, ("other", [256]))
        report = ptxas_report(args.nvcc, args.src, fname)
        names = demangle([k["mangled"] for k in report])
        for k in report:
            occ = {}
            limiters = {}
            for threads in blocks:
                occ[str(threads)], limiters[str(threads)] = occupancy(k["registers"], k["static_smem"], threads)
            no_spills = k["spill_stores"] == 0 and k["spill_loads"] == 0
            meets = no_spills and (kind not in TARGETED_KINDS or min(occ.values()) >= MIN_OCCUPANCY)
            rows.append({"file": fname, "kernel": name_expression(names[k["mangled"]]),
                         "kind": kind, **k, "occupancy": occ, "occupancy_limited_by": limiters,
                         "meets_targets": meets})
    rows.sort(key=lambda r: (r["file"], r["kernel"]))

    result = {
        "what": "ptxas resource usage per kernel and theoretical occupancy on an H100 (sm_90); "
                "static analysis from nvcc, no GPU involved",
        "command": " ".join(["nvcc", *NVCC_FLAGS, "<file>.cu"]),
        "nvcc": version,
        "machine": f"{platform.node()} ({platform.machine()}), no GPU",
        "date": datetime.date.today().isoformat(),
        "sm90_limits": H100,
        "targets": {"spills": 0, "min_occupancy_elementwise_and_row": MIN_OCCUPANCY},
        "all_targets_met": all(r["meets_targets"] for r in rows),
        "kernels": rows,
    }
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)
        f.write("\n")

    w = max(len(r["kernel"]) for r in rows) if rows else 6
    head = f"{'kernel':{w}} {'kind':11} {'regs':>4} {'smem':>5} {'spill':>5} {'stack':>5}  occupancy (threads: %)"
    print(head)
    print("-" * len(head))
    for r in rows:
        occ = "  ".join(f"{t}: {100 * o:.0f}" for t, o in r["occupancy"].items())
        flag = "" if r["meets_targets"] else "   <-- misses a target"
        print(f"{r['kernel']:{w}} {r['kind']:11} {r['registers']:4d} {r['static_smem']:5d} "
              f"{r['spill_stores'] + r['spill_loads']:5d} {r['stack']:5d}  {occ}{flag}")
    print(f"\n{len(rows)} kernels, {version}; all targets met: {result['all_targets_met']}"
          f"\nwrote {args.out}")
    return 0 if result["all_targets_met"] else 1


if __name__ == "__main__":
    sys.exit(main())
