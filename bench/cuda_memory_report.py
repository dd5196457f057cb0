#!/usr/bin/env python
"""Memory efficiency of the CUDA kernels without a GPU: a MODEL, from the emulator's trace.

Runs one training step of each benchmark model (gpudiff/benchmark.py: LeNet-5, the PyTorch
examples' MNIST net, the small ResNet; batch 64, SGD with momentum) on the emulated cuda
device with the memory tracer on (csrc/cuda_host/trace.cpp, gpudiff/runtime/cuda/trace.py),
so every kernel launch of the step is recorded with its real shapes. Per launch, and summed
per kernel:

  sector_efficiency     bytes the lanes asked for / bytes of the 32-byte sectors moved
  sectors_per_request   per warp-wide load/store (Nsight Compute's metric)
  traffic_ratio         sectors moved / compulsory bytes (every input byte read once, every
                        output byte written once, in-out arrays twice)
  flops                 2 x multiply-adds for convolutions; an operation count per element
                        for the memory-bound kernels (FLOPS_PER_ELEMENT)
  roofline_us           max(flops / peak, compulsory bytes / bandwidth) on an H100 SXM
                        (3.35 TB/s; CUDA cores: 67 TFLOP/s FP32, 34 TFLOP/s FP64; tensor
                        cores, dense: 495 TFLOP/s TF32, 990 TFLOP/s FP16 / BF16, the peak of
                        the kernel's mma precision: tensor_core.cu's *_tc kernels): a lower
                        bound on the kernel's time from a model, not a measurement

plus the resources ptxas reports (bench/results/cuda_resources.json, from
bench/cuda_resources.py) and the convolution algorithm the 'auto' heuristic chose for every
convolution of the step. No caches, no timing, no GPU: the numbers describe the access
pattern of the kernels as written. Matrix products that the im2col path hands to
xp.matmul (cuBLAS on a GPU) are not our kernels and are not traced.

    python bench/cuda_memory_report.py [--batch 64] [--models lenet,mnist-cnn,resnet-small]
                                       [--out bench/results/cuda_memory_report.json]
                                       [--no-variants]

A second table traces VARIANTS of the LeNet step (the im2col and direct convolution paths
forced, log_softmax + nll_loss, Adam, and the TF32 tensor-core convolutions), for the kernels
the default steps never launch. The default steps run the FP32 kernels
(gpudiff.backends.cudnn.allow_tf32 off, as the GPU suite's FP32 comparisons do).
"""
import argparse
import collections
import datetime
import json
import os
import platform
import sys
import time

os.environ.setdefault("GPUDIFF_CUDA", "emulate")  # before gpudiff is imported

import numpy as np  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import gpudiff  # noqa: E402
from gpudiff.runtime import cuda as rc  # noqa: E402
from gpudiff.runtime.cuda import launch as cuda_launch, trace as cuda_trace  # noqa: E402

# An H100 SXM as a model (datasheet peaks, dense tensor-core rates; not measured here)
H100 = {"name": "H100 SXM (model)", "bandwidth": 3.35e12, "fp32": 67e12, "fp64": 34e12,
        "tf32_tensor": 495e12, "fp16_tensor": 990e12, "bf16_tensor": 990e12}
# template argument of a tensor-core kernel -> its peak (key of H100)
TENSOR_CORE_MATH = {"tc::Tf32": "tf32_tensor", "tc::F16": "fp16_tensor", "tc::Bf16": "bf16_tensor"}


def math_of(name):
    """The H100 peak a kernel's arithmetic runs at: its tensor-core precision, else FP64 /
    FP32 CUDA cores."""
    for arg, key in TENSOR_CORE_MATH.items():
        if arg in name:
            return key
    return "fp64" if "<double" in name else "fp32"


def tensor_core_roofline_us(flops, compulsory_bytes, math):
    """The tensor-core roofline (a model): max(flops / the dense peak of ``math`` ('tf32',
    'fp16', 'bf16'), bytes / bandwidth), in microseconds."""
    return 1e6 * max(flops / H100[f"{math}_tensor"], compulsory_bytes / H100["bandwidth"])

# kernel family (by name prefix) -> (kind, target sector efficiency, traffic-ratio target)
KINDS = [
    ("conv2d_wgrad_reduce", "elementwise"),
    ("gemm_tc", "conv"),
    ("conv2d_", "conv"),
    ("im2col_kernel", "conv"),
    ("col2im_kernel", "conv"),
    ("max_pool2d", "pooling"), ("avg_pool2d", "pooling"), ("adaptive_", "pooling"),
    ("batch_norm_fwd_eval", "elementwise"),
    ("batch_norm_", "row"),
    ("softmax", "row"), ("log_softmax", "row"), ("cross_entropy", "row"),
    ("sgd_step", "optimizer"), ("adam_step", "optimizer"),
    ("", "elementwise"),  # activations
]
EFFICIENCY_TARGET = {"elementwise": 0.9, "row": 0.9, "optimizer": 0.9, "conv": 0.8,
                     "pooling": 0.8}
MEMORY_BOUND = {"elementwise", "row", "optimizer", "pooling"}
TRAFFIC_TARGET = 1.5

# operations per element of the largest array, for the memory-bound kernels (rough: the
# roofline of these kernels is set by their bytes)
FLOPS_PER_ELEMENT = {
    "relu": 1, "leaky_relu": 2, "sigmoid": 4, "tanh": 4, "softmax": 5, "log_softmax": 4,
    "cross_entropy": 8, "batch_norm": 8, "max_pool2d": 4, "avg_pool2d": 4, "adaptive": 4,
    "sgd_step": 6, "adam_step": 12, "conv2d_wgrad_reduce": 1,
}
# arguments a kernel reads and writes back (compulsory traffic counts them twice)
IN_OUT_ARGS = {"batch_norm_fwd_train_plane": (3, 4), "batch_norm_fwd_train_cols": (3, 4)}


def kind_of(name):
    return next(k for prefix, k in KINDS if name.startswith(prefix))


def base_name(name):
    return name.split("<")[0]


def conv_flops(scalars):
    n, c, _, _, k, oh, ow, kh, kw = scalars[:9]
    g = scalars[15]
    return 2 * n * k * oh * ow * (c // g) * kh * kw


def launch_flops(name, arrays, scalars):
    b = base_name(name)
    if b.startswith("conv2d_") and b != "conv2d_wgrad_reduce":
        return conv_flops(scalars)
    if b.startswith(("im2col", "col2im")):
        return 0
    if b == "gemm_tc":
        m, n, k = scalars[:3]
        return 2 * m * n * k
    elements = max(a.size for a in arrays)
    if b == "conv2d_wgrad_reduce":
        return int(scalars[0]) * (int(scalars[1]) - 1)
    per = next((v for k, v in FLOPS_PER_ELEMENT.items() if b.startswith(k)), 1)
    return per * elements


def compulsory_bytes(name, trace, arrays, scalars):
    """Every byte the kernel touches, once; read-and-written arrays twice."""
    unique = trace["unique_bytes"]
    b = base_name(name)
    total = sum(v for k, v in unique.items() if k >= 0)
    for i in IN_OUT_ARGS.get(b, ()):
        total += unique.get(i, 0)
    if -1 in unique:  # fused optimizers: lists through the pointer table
        # tensors: SGD p, g[, buf]; Adam p, g, m, v[, vmax]; all but g read and written
        if b == "sgd_step_multi":
            lists = 3 if int(scalars[-1]) else 2
        else:
            lists = 5 if int(scalars[-3]) else 4
        total += unique[-1] * (2 * lists - 1) / lists
    return total


class Recorder:
    """Wraps the launch function of the kernel modules: every launch is traced."""

    def __init__(self):
        self.launches = []
        self.convs = []
        self.model = None
        self.on = False

    def launch(self, source_file, name, grid, block, args, shared_mem=0):
        if not self.on:
            return cuda_launch.launch(source_file, name, grid, block, args, shared_mem)
        tr = cuda_trace.traced_launch(source_file, name, grid, block, args, shared_mem)
        arrays = [a for a in args if isinstance(a, np.ndarray)]
        scalars = [a.item() for a in args if isinstance(a, np.generic)]
        dtype = math_of(name)
        flops = launch_flops(name, arrays, scalars)
        comp = compulsory_bytes(name, tr, arrays, scalars)
        self.launches.append({
            "model": self.model, "kernel": name, "kind": kind_of(name),
            "shapes": [list(a.shape) for a in arrays], "grid": list(np.atleast_1d(grid)),
            "block": list(np.atleast_1d(block)), "requests": tr["requests"],
            "sectors": tr["sectors"], "useful_bytes": tr["useful_bytes"],
            "traffic_bytes": tr["traffic_bytes"], "compulsory_bytes": comp, "flops": flops,
            "sector_efficiency": tr["sector_efficiency"],
            "sectors_per_request": tr["sectors_per_request"],
            "traffic_ratio": tr["traffic_bytes"] / comp if comp else None,
            "roofline_us": 1e6 * max(flops / H100[dtype], comp / H100["bandwidth"]),
            "bound": "compute" if flops / H100[dtype] > comp / H100["bandwidth"] else "memory",
        })


def record_conv_choices(rec):
    """Log (pass, geometry, algorithm) of every convolution (wraps rc.conv._algorithm)."""
    inner = rc.conv._algorithm

    def logged(geom, pass_, *args):
        algo = inner(geom, pass_, *args)
        if rec.on:
            g = geom
            rec.convs.append({
                "model": rec.model, "pass": pass_, "algorithm": algo,
                "x": [g.N, g.C, g.H, g.W], "w": [g.K, g.Cg, g.kh, g.kw],
                "stride": [g.sh, g.sw], "padding": [g.ph, g.pw], "dilation": [g.dh, g.dw],
                "groups": g.G, "gflop": g.flops() / 1e9})
        return algo
    rc.conv._algorithm = logged


# the benchmark models' inputs (gpudiff/benchmark.py): (channels, image size)
MODELS = {"lenet": (1, 28), "mnist-cnn": (1, 28), "resnet-small": (3, 32)}


# Variants of a step that run the kernels the default steps do not (the forced convolution
# paths, the softmax family, the fused Adam): reported in a second table, for information.
# name -> (model, conv algorithm, loss, optimizer)
VARIANTS = {
    "lenet/im2col": ("lenet", "im2col", "cross_entropy", "sgd"),
    "lenet/direct": ("lenet", "direct", "cross_entropy", "sgd"),
    "lenet/log_softmax+nll_loss+adam": ("lenet", "auto", "log_softmax+nll_loss", "adam"),
    "lenet/tf32": ("lenet", "auto", "cross_entropy", "sgd", True),  # tensor_core.cu
}


def training_step(model, batch, rec, tag=None, algorithm="auto", loss="cross_entropy",
                  optimizer="sgd", tf32=False):
    from gpudiff.models import create_model
    F = gpudiff.nn.functional
    c, s = MODELS[model]
    rng = np.random.default_rng(0)
    net = create_model(model, c, s, 10).to("cuda")
    net.train()
    if optimizer == "sgd":
        opt = gpudiff.optim.SGD(net.parameters(), lr=0.01, momentum=0.9)
    else:
        opt = gpudiff.optim.Adam(net.parameters(), lr=1e-3)
    x = gpudiff.tensor(rng.standard_normal((batch, c, s, s)).astype(np.float32), device="cuda")
    y = gpudiff.tensor(rng.integers(0, 10, batch), device="cuda")

    def step():
        opt.zero_grad()
        out = net(x)
        if loss == "cross_entropy":
            loss_value = F.cross_entropy(out, y)
        else:  # the PyTorch MNIST example's head
            loss_value = F.nll_loss(F.log_softmax(out, dim=1), y)
        loss_value.backward()
        opt.step()
    with rc.conv.use_conv_algorithm(algorithm), rc.conv.use_tf32(tf32):
        step()  # momentum buffers start as the first gradients (the reference path)
        rec.model, rec.on = tag or model, True
        try:
            step()
        finally:
            rec.on = False


def summarise(launches, resources):
    by = collections.OrderedDict()
    for r in launches:
        by.setdefault(r["kernel"], []).append(r)
    rows = []
    for name, rs in by.items():
        traffic = sum(r["traffic_bytes"] for r in rs)
        useful = sum(r["useful_bytes"] for r in rs)
        comp = sum(r["compulsory_bytes"] for r in rs)
        kind = rs[0]["kind"]
        eff = useful / traffic if traffic else 1.0
        ratio = traffic / comp if comp else None
        res = resources.get(name, {})
        row = {
            "kernel": name, "kind": kind, "launches": len(rs),
            "sector_efficiency": eff,
            "sectors_per_request": sum(r["sectors"] for r in rs) / max(1, sum(r["requests"]
                                                                              for r in rs)),
            "traffic_ratio": ratio, "traffic_MB": traffic / 1e6, "compulsory_MB": comp / 1e6,
            "gflop": sum(r["flops"] for r in rs) / 1e9,
            "roofline_us": sum(r["roofline_us"] for r in rs),
            "registers": res.get("registers"), "spills": res.get("spill_stores"),
            "occupancy_256": (res.get("occupancy") or {}).get("256"),
            "efficiency_target": EFFICIENCY_TARGET[kind],
            "meets_efficiency_target": eff >= EFFICIENCY_TARGET[kind],
        }
        if kind in MEMORY_BOUND:
            row["traffic_target"] = TRAFFIC_TARGET
            row["meets_traffic_target"] = ratio is not None and ratio <= TRAFFIC_TARGET
        rows.append(row)
    return rows


def table(rows):
    head = (f"{'kernel':46} {'kind':11} {'n':>3} {'sect.eff':>8} {'sect/req':>8} "
            f"{'traffic':>7} {'GFLOP':>8} {'roof us':>8} {'regs':>4} {'spill':>5}  targets")
    out = [head, "-" * len(head)]
    for r in rows:
        ok = "ok" if r["meets_efficiency_target"] and r.get("meets_traffic_target", True) \
            else "MISS"
        ratio = f"{r['traffic_ratio']:.2f}" if r["traffic_ratio"] is not None else "-"
        out.append(f"{r['kernel'][:46]:46} {r['kind']:11} {r['launches']:3d} "
                   f"{100 * r['sector_efficiency']:7.1f}% {r['sectors_per_request']:8.2f} "
                   f"{ratio:>7} {r['gflop']:8.3f} {r['roofline_us']:8.1f} "
                   f"{r['registers'] if r['registers'] is not None else '-':>4} "
                   f"{r['spills'] if r['spills'] is not None else '-':>5}  {ok}")
    return "\n".join(out)


def load_resources(path):
    if not os.path.isfile(path):
        return {}
    with open(path) as f:
        return {k["kernel"]: k for k in json.load(f)["kernels"]}


def resummarize(args):
    with open(args.resummarize) as f:
        report = json.load(f)
    resources = load_resources(args.resources)
    default = [r for r in report["launches"] if r["model"] in MODELS]
    report["kernels"] = summarise(default, resources)
    if "variants" in report:
        report["variants"]["kernels"] = summarise(
            [r for r in report["launches"] if r["model"] not in MODELS], resources)
    report["all_targets_met"] = all(r["meets_efficiency_target"] and
                                    r.get("meets_traffic_target", True)
                                    for r in report["kernels"])
    with open(args.out, "w") as f:
        json.dump(report, f, indent=1, default=float)
    print(table(report["kernels"]))
    return 0


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--models", default="lenet,mnist-cnn,resnet-small")
    ap.add_argument("--out", default=os.path.join(ROOT, "bench", "results",
                                                  "cuda_memory_report.json"))
    ap.add_argument("--resources", default=os.path.join(ROOT, "bench", "results",
                                                        "cuda_resources.json"))
    ap.add_argument("--no-variants", action="store_true",
                    help="only the default training steps (skip VARIANTS)")
    ap.add_argument("--resummarize", metavar="JSON",
                    help="recompute the per-kernel table of a saved report (e.g. with fresh "
                         "--resources) instead of tracing again")
    args = ap.parse_args(argv)
    if args.resummarize:
        return resummarize(args)
    if not gpudiff.cuda.is_emulated():
        ap.error("the report runs on the emulated device (GPUDIFF_CUDA=emulate)")
    if not cuda_trace.available():
        ap.error("gpudiff._cuda_host has no tracer: rebuild it (pip install -e .)")
    resources = load_resources(args.resources)
    rec = Recorder()
    for module in rc.WRAPPERS:
        module.launch = rec.launch
    record_conv_choices(rec)
    t0 = time.time()
    for model in args.models.split(","):
        t1 = time.time()
        training_step(model, args.batch, rec)
        print(f"# {model}: traced one training step (batch {args.batch}) in "
              f"{time.time() - t1:.0f} s", file=sys.stderr)
    rows = summarise(rec.launches, resources)
    main_launches = len(rec.launches)
    for tag in ([] if args.no_variants else VARIANTS):
        model, algorithm, loss, optimizer, *tf32 = VARIANTS[tag]
        training_step(model, args.batch, rec, tag, algorithm, loss, optimizer, *tf32)
        print(f"# {tag}: traced one training step", file=sys.stderr)
    variant_rows = summarise(rec.launches[main_launches:], resources)
    report = {
        "what": "memory efficiency of gpudiff's CUDA kernels: a MODEL from the emulator's "
                "access trace (no GPU, no caches, no timing); roofline bounds for an H100 SXM",
        "device_model": H100,
        "targets": {"sector_efficiency": EFFICIENCY_TARGET, "traffic_ratio_memory_bound":
                    TRAFFIC_TARGET},
        "workload": {"models": args.models.split(","), "batch": args.batch,
                     "step": "forward + cross-entropy + backward + SGD(momentum=0.9) step"},
        "machine": f"{platform.node()} ({platform.machine()}), no GPU",
        "date": datetime.date.today().isoformat(),
        "seconds": round(time.time() - t0, 1),
        "all_targets_met": all(r["meets_efficiency_target"] and r.get("meets_traffic_target",
                                                                      True) for r in rows),
        "kernels": rows,
        "variants": {"what": "kernels the default steps do not run, on the same shapes: "
                             "forced convolution paths, log_softmax + nll_loss, fused Adam "
                             "(for information; the targets are judged on the table above)",
                     "steps": VARIANTS if not args.no_variants else {},
                     "kernels": variant_rows},
        "conv_algorithms": [c for c in rec.convs if c["model"] in args.models.split(",")],
        "launches": rec.launches,
    }
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(report, f, indent=1, default=float)
    print(table(rows))
    if variant_rows:
        print("\nvariants (" + ", ".join(VARIANTS) + "): kernels off the default steps")
        print(table(variant_rows))
    print("\nconvolutions ('auto' choice): "
          + ", ".join(f"{c['model']} {c['pass']} x{c['x']} w{c['w']}: {c['algorithm']}"
                      for c in rec.convs if c["pass"] == "forward" and c["model"] in MODELS))
    print(f"wrote {args.out} (a model, not a GPU measurement)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
