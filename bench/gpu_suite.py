#!/usr/bin/env python
"""The GPU suite in one command: ``python bench/gpu_suite.py --out DIR``.

On a machine with an NVIDIA GPU and CuPy (``pip install -e ".[cuda,test]"``):

  1. the ``gpu`` tests (pytest -m gpu, GPUDIFF_TEST_REAL_GPU=1): every CUDA kernel test on
     the GPU;
  2. each CNN kernel (and the elementwise / row kernels) against PyTorch CUDA on the same
     shapes, the layers of the benchmark models: results checked, times of both. FP32 with
     TF32 off on both sides (torch.backends.{cuda.matmul,cudnn}.allow_tf32 = False; CuPy's
     matmul does not use TF32 unless CUPY_TF32=1, which the suite refuses), and
     torch.backends.cudnn.benchmark = True (cuDNN picks its fastest algorithm), all stated in
     the output;
  3. achieved GB/s of the memory-bound kernels (compulsory bytes / time) against the
     device's own copy bandwidth, measured first;
  4. training steps of LeNet-5, the MNIST net and the small ResNet at batch 64 and 256:
     gpudiff on the GPU vs PyTorch eager on the GPU vs gpudiff on the CPU;
  5. tensor-core convolutions (csrc/cuda/tensor_core.cu): the benchmark models' layers in
     TF32 (gpudiff.backends.cudnn.allow_tf32 = torch.backends.cudnn.allow_tf32 = True),
     FP16 and BF16 (float16 / bfloat16 inputs on both sides), each pass timed against
     PyTorch with the same flags, results checked against an FP32 convolution of the same
     rounded inputs with each precision's tolerance; training steps in TF32 and under
     float16 / bfloat16 autocast against PyTorch with the same settings.
Sections 1-4 are FP32: gpudiff's TF32 switches are turned off for them as PyTorch's are.

Without a GPU it runs the same code on the emulated device (GPUDIFF_CUDA=emulate: our .cu
kernels on the CPU emulator, PyTorch on the CPU as the reference): with ``--tiny`` (tiny
shapes, one repeat) CI runs it, so the script itself is known to work. Every number from the
emulator is labelled "emulated" and means nothing about a GPU.

Writes DIR/gpu_suite.json and DIR/gpu_suite.txt (the tables). Exit status 1 when a check
fails (a gpu test, or a kernel result that disagrees with PyTorch).
"""
import argparse
import contextlib
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)


def _want_emulation():
    """Emulate when asked, or when there is no usable GPU (decided before gpudiff loads)."""
    if os.environ.get("GPUDIFF_CUDA", "").lower() == "emulate":
        return True
    try:
        import cupy
        return cupy.cuda.runtime.getDeviceCount() < 1
    except Exception:  # no cupy, no driver
        return True


if "gpudiff" not in sys.modules and _want_emulation():
    os.environ["GPUDIFF_CUDA"] = "emulate"

import numpy as np  # noqa: E402

import gpudiff  # noqa: E402
from gpudiff import geometry  # noqa: E402
from gpudiff.runtime import cuda as rc  # noqa: E402
from gpudiff.runtime import kernels  # noqa: E402

TOL = {"float32": dict(rtol=2e-3, atol=2e-3)}  # FP32 vs cuDNN/cuBLAS: other summation orders
# tensor-core results vs an FP32 convolution of the same rounded inputs, relative to the
# largest |result|: fp32 accumulation (TF32), plus one rounding of the output (FP16, BF16)
TC_TOL = {"tf32": 1e-4, "float16": 2e-3, "bfloat16": 1.6e-2}


# ---- devices and timing ---------------------------------------------------------------------
class Env:
    def __init__(self):
        import torch
        self.torch = torch
        self.emulated = gpudiff.cuda.is_emulated()
        if not gpudiff.cuda.is_available():
            raise SystemExit("gpu_suite: no CUDA device and no emulation")
        self.xp = gpudiff.device("cuda").xp
        self.tdev = "cpu" if self.emulated else "cuda"
        if not self.emulated:
            if os.environ.get("CUPY_TF32") == "1":
                raise SystemExit("gpu_suite: unset CUPY_TF32 (FP32 comparisons run without TF32)")
            torch.backends.cuda.matmul.allow_tf32 = False
            torch.backends.cudnn.allow_tf32 = False
            torch.backends.cudnn.benchmark = True
        # FP32 sections: our TF32 tensor-core path off as PyTorch's (section 5 turns it on)
        gpudiff.backends.cudnn.allow_tf32 = False
        gpudiff.backends.cuda.matmul.allow_tf32 = False
        self.device_name = gpudiff.cuda.get_device_name()
        self.settings = {
            "tf32": "off (torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn."
                    "allow_tf32 = False; CuPy without CUPY_TF32)",
            "cudnn.benchmark": True if not self.emulated else "n/a (PyTorch on the CPU)",
            "dtype": "float32",
            "reference": "PyTorch " + torch.__version__ + (" on the CPU" if self.emulated
                                                         else " CUDA (cuDNN, cuBLAS)"),
        }

    def put(self, a):
        return self.xp.asarray(a)

    def get(self, a):
        return a.get() if hasattr(a, "get") else np.asarray(a)

    def tensor(self, a, grad=False):
        t = self.torch.tensor(np.asarray(a), device=self.tdev)
        return t.requires_grad_(grad)

    def sync(self):
        gpudiff.cuda.synchronize()
        if not self.emulated:
            self.torch.cuda.synchronize()

    def time(self, fn, repeat, warmup=1):
        """Median seconds per call (device synchronised around each call)."""
        for _ in range(warmup):
            fn()
        self.sync()
        ts = []
        for _ in range(repeat):
            t0 = time.perf_counter()
            fn()
            self.sync()
            ts.append(time.perf_counter() - t0)
        return statistics.median(ts)


def copy_bandwidth(env, tiny):
    """Device copy bandwidth in GB/s: read + write of a large buffer."""
    n = (1 << 20) if tiny else (1 << 28)  # 4 MB / 1 GB of float32
    a = env.xp.ones(n, np.float32)
    b = env.xp.empty_like(a)

    def copy():
        b[...] = a
    t = env.time(copy, repeat=3 if tiny else 20)
    return 2 * a.nbytes / t / 1e9


# ---- the kernel cases -----------------------------------------------------------------------
def rand(shape, seed=0):
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


def conv_layers(batch, tiny):
    """(name, x shape, w shape, stride, padding, groups) of the benchmark models' convs."""
    if tiny:
        return [("tiny 3x3", (batch, 3, 10, 9), (8, 3, 3, 3), 1, 1, 1),
                ("tiny depthwise", (batch, 4, 8, 8), (4, 1, 3, 3), 1, 1, 4),
                ("tiny 1x1 s2", (batch, 4, 8, 8), (6, 4, 1, 1), 2, 0, 1)]
    b = batch
    return [
        ("lenet conv1", (b, 1, 28, 28), (6, 1, 5, 5), 1, 2, 1),
        ("lenet conv2", (b, 6, 14, 14), (16, 6, 5, 5), 1, 0, 1),
        ("mnist-cnn conv1", (b, 1, 28, 28), (32, 1, 3, 3), 1, 0, 1),
        ("mnist-cnn conv2", (b, 32, 26, 26), (64, 32, 3, 3), 1, 0, 1),
        ("resnet conv1", (b, 3, 32, 32), (16, 3, 3, 3), 1, 1, 1),
        ("resnet 16->16", (b, 16, 32, 32), (16, 16, 3, 3), 1, 1, 1),
        ("resnet 16->32 s2", (b, 16, 32, 32), (32, 16, 3, 3), 2, 1, 1),
        ("resnet 32->32", (b, 32, 16, 16), (32, 32, 3, 3), 1, 1, 1),
        ("resnet 1x1 16->32 s2", (b, 16, 32, 32), (32, 16, 1, 1), 2, 0, 1),
        ("resnet 32->64 s2", (b, 32, 16, 16), (64, 32, 3, 3), 2, 1, 1),
        ("resnet 64->64", (b, 64, 8, 8), (64, 64, 3, 3), 1, 1, 1),
        ("bench conv 32->64", (b, 32, 32, 32), (64, 32, 3, 3), 1, 1, 1),
    ]


def check(env, ours, ref):
    """Max abs error of ours vs PyTorch's result, and whether it is within tolerance."""
    o = env.get(ours).astype(np.float64)
    r = ref.detach().cpu().numpy().astype(np.float64)
    err = float(np.abs(o - r).max()) if o.size else 0.0
    scale = float(np.abs(r).max()) if r.size else 0.0
    ok = o.shape == r.shape and err <= TOL["float32"]["atol"] + TOL["float32"]["rtol"] * scale
    return err, bool(ok)


def conv_cases(env, batch, tiny, repeat):
    algos = ["auto"] if tiny else ["auto", "implicit_gemm", "im2col", "direct"]
    rows = []
    for layer in conv_layers(batch, tiny):
        rows += _conv_layer_rows(env, layer, algos, tiny, repeat)
    return rows


def _conv_layer_rows(env, layer, algos, tiny, repeat):
    """One layer's three passes, each algorithm, vs PyTorch (cuDNN on a GPU)."""
    torch = env.torch
    F = torch.nn.functional
    name, xs, ws, s, p, g = layer
    x, w = rand(xs), rand(ws, 1)
    geom = geometry.ConvGeom(xs, ws, s, p, 1, g)
    gy = rand((geom.N, geom.K, geom.OH, geom.OW), 2)
    dx, dw, dgy = env.put(x), env.put(w), env.put(gy)
    tx, tw, tgy = env.tensor(x), env.tensor(w), env.tensor(gy)

    def t_backward(mask):
        return torch.ops.aten.convolution_backward(tgy, tx, tw, None, [s, s], [p, p], [1, 1],
                                                   False, [0, 0], g, mask)
    ty = F.conv2d(tx, tw, None, s, p, 1, g)
    tgx, tgw, _ = t_backward([True, True, False])
    t_ref = {
        "forward": env.time(lambda: F.conv2d(tx, tw, None, s, p, 1, g), repeat),
        "backward_input": env.time(lambda: t_backward([True, False, False]), repeat),
        "backward_weight": env.time(lambda: t_backward([False, True, False]), repeat),
    }
    calls = {
        "forward": (lambda: rc.conv.conv2d(dx, dw, None, s, p, 1, g), ty),
        "backward_input": (lambda: rc.conv.conv2d_backward_input(dgy, dw, xs, s, p, 1, g), tgx),
        "backward_weight": (lambda: rc.conv.conv2d_backward_weight(dgy, dx, ws, s, p, 1, g), tgw),
    }
    rows = []
    for algo in algos:
        for pass_, (fn, ref) in calls.items():
            if algo == "direct" and not tiny and not geom.depthwise() and \
                    pass_ == "backward_weight" and geom.K * geom.Cg > 64 * 64:
                continue  # a block per weight element: not a contender for wide layers
            with rc.conv.use_conv_algorithm(algo):
                err, ok = check(env, fn(), ref)
                t = env.time(fn, repeat)
                ran = rc.conv.last_conv_algorithm[pass_]
            rows.append({"op": f"conv2d {pass_}", "layer": name, "x": list(xs), "w": list(ws),
                         "stride": s, "padding": p, "groups": g, "algorithm": algo,
                         "ran": ran, "ms": 1e3 * t, "torch_ms": 1e3 * t_ref[pass_],
                         "ratio_vs_torch": t / t_ref[pass_], "gflops": geom.flops() / t / 1e9,
                         "max_err": err, "ok": ok})
    return rows


def tensor_core_layers(batch, tiny):
    if tiny:
        return [("tiny 3x3", (batch, 3, 10, 9), (8, 3, 3, 3), 1, 1, 1)]
    return [layer for layer in conv_layers(batch, tiny)
            if layer[0] in ("lenet conv2", "mnist-cnn conv2", "resnet 16->16", "resnet 32->64 s2",
                            "resnet 64->64", "bench conv 32->64")]


def _low(a, precision):
    """(host array handed to gpudiff, float32 values it holds) for a precision."""
    from gpudiff.runtime.cuda import tensor_core
    if precision == "tf32":
        return a, tensor_core.round_tf32(a)
    dt = np.float16 if precision == "float16" else gpudiff.bfloat16
    low = a.astype(dt)
    return low, low.astype(np.float32)


def tensor_core_cases(env, batch, tiny, repeat):
    """TF32 / FP16 / BF16 convolutions (the tensor cores) vs PyTorch with the same flags."""
    rows = []
    for layer in tensor_core_layers(batch, tiny):
        for precision in ("tf32", "float16", "bfloat16"):
            rows += _tensor_core_rows(env, layer, precision, repeat)
    return rows


def _tensor_core_rows(env, layer, precision, repeat):
    """One layer's three passes in one precision: ours and PyTorch's times, ours checked."""
    torch = env.torch
    F = torch.nn.functional
    name, xs, ws, s, p, g = layer
    geom = geometry.ConvGeom(xs, ws, s, p, 1, g)
    x0, w0 = rand(xs), rand(ws, 1)
    gy0 = rand((geom.N, geom.K, geom.OH, geom.OW), 2)
    (x, xv), (w, wv), (gy, gyv) = (_low(a, precision) for a in (x0, w0, gy0))
    dx, dw, dgy = env.put(x), env.put(w), env.put(gy)
    # the reference: FP32 (TF32 off) on the values the tensor cores multiply
    tx, tw, tgy = (torch.tensor(a) for a in (xv, wv, gyv))
    with _torch_tf32(torch, False):
        ref = {"forward": F.conv2d(tx, tw, None, s, p, 1, g)}
        ref["backward_input"], ref["backward_weight"], _ = torch.ops.aten.convolution_backward(
            tgy, tx, tw, None, [s, s], [p, p], [1, 1], False, [0, 0], g, [True, True, False])
    tdt = {"tf32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
    px, pw_, pgy = (torch.tensor(a, device=env.tdev).to(tdt[precision]) for a in (xv, wv, gyv))

    def t_backward(mask):
        return torch.ops.aten.convolution_backward(pgy, px, pw_, None, [s, s], [p, p], [1, 1],
                                                   False, [0, 0], g, mask)
    t_calls = {"forward": lambda: F.conv2d(px, pw_, None, s, p, 1, g),
               "backward_input": lambda: t_backward([True, False, False]),
               "backward_weight": lambda: t_backward([False, True, False])}
    calls = {
        "forward": lambda: rc.conv.conv2d(dx, dw, None, s, p, 1, g),
        "backward_input": lambda: rc.conv.conv2d_backward_input(dgy, dw, xs, s, p, 1, g),
        "backward_weight": lambda: rc.conv.conv2d_backward_weight(dgy, dx, ws, s, p, 1, g),
    }
    rows = []
    for pass_, fn in calls.items():
        with rc.conv.use_tf32(precision == "tf32"):
            out = fn()
            t = env.time(fn, repeat)
            math = rc.conv.last_conv_math[pass_]
        o = env.get(out).astype(np.float64)
        r = ref[pass_].detach().numpy().astype(np.float64)
        err = float(np.abs(o - r).max()) if o.size else 0.0
        scale = float(np.abs(r).max()) if r.size else 0.0
        ok = o.shape == r.shape and err <= TC_TOL[precision] * scale + 1e-6
        try:  # PyTorch on the CPU (emulated runs) may lack a float16 convolution
            with _torch_tf32(torch, precision == "tf32"):
                tt = env.time(t_calls[pass_], repeat)
        except RuntimeError:
            tt = float("nan")
        rows.append({"op": f"conv2d {pass_}", "layer": name, "x": list(xs), "w": list(ws),
                     "precision": precision, "ran": math, "ms": 1e3 * t, "torch_ms": 1e3 * tt,
                     "ratio_vs_torch": t / tt, "tflops": geom.flops() / t / 1e12,
                     "max_err": err, "ok": bool(ok)})
    return rows


class _torch_tf32:
    """PyTorch's TF32 switches (cuDNN and cuBLAS) set for a block, then restored."""

    def __init__(self, torch, flag):
        self.b, self.flag = torch.backends, flag

    def __enter__(self):
        self.old = (self.b.cudnn.allow_tf32, self.b.cuda.matmul.allow_tf32)
        self.b.cudnn.allow_tf32 = self.b.cuda.matmul.allow_tf32 = self.flag

    def __exit__(self, *exc):
        self.b.cudnn.allow_tf32, self.b.cuda.matmul.allow_tf32 = self.old


def memory_cases(env, batch, tiny):
    """(name, ours (fn), torch (fn), ours' result fn, torch result, compulsory bytes)."""
    b = batch
    return (_pool_cases(env, (b, 4, 8, 8) if tiny else (b, 64, 32, 32))
            + _bn_cases(env, (b, 4, 6, 6) if tiny else (b, 64, 32, 32))
            + _table_cases(env, (b, 4, 8, 8) if tiny else (b, 64, 32, 32),
                           (8, 10) if tiny else (1024, 1000), 300 if tiny else 1 << 20))


def _pool_cases(env, shape):
    F, aten = env.torch.nn.functional, env.torch.ops.aten
    x = rand(shape)
    dx, tx = env.put(x), env.tensor(x)
    ty, ti = F.max_pool2d(tx, 2, 2, return_indices=True)
    _, idx = rc.pool.max_pool2d(dx, 2, 2, 2, 2, 0, 0, 1, 1, False)
    gy = rand(ty.shape, 1)
    dgy, tgy = env.put(gy), env.tensor(gy)
    H, W = x.shape[2:]
    nb = x.nbytes
    win = (2, 2, 2, 2, 0, 0, 1, 1)

    def max_fwd():
        return rc.pool.max_pool2d(dx, *win, False)

    def max_bwd():
        return rc.pool.max_pool2d_with_indices_backward(dgy, idx, H, W, *win)

    def t_max_bwd():
        return aten.max_pool2d_with_indices_backward(tgy, tx, [2, 2], [2, 2], [0, 0], [1, 1],
                                                     False, ti)

    def avg_fwd():
        return rc.pool.avg_pool2d(dx, 2, 2, 2, 2, 0, 0, False, True, None)

    def avg_bwd():
        return rc.pool.avg_pool2d_backward(dgy, H, W, 2, 2, 2, 2, 0, 0, False, True, None)

    def t_avg_bwd():
        return aten.avg_pool2d_backward(tgy, tx, [2, 2], [2, 2], [0, 0], False, True, None)

    return [
        # x read; y (4 B) + index (8 B) written per output (a quarter of x's elements)
        ("max_pool2d fwd 2x2", max_fwd, lambda: F.max_pool2d(tx, 2, 2, return_indices=True),
         lambda: max_fwd()[0], ty, nb + nb // 4 * 3),
        ("max_pool2d bwd 2x2", max_bwd, t_max_bwd, max_bwd, t_max_bwd(), nb // 4 * 3 + nb),
        ("avg_pool2d fwd 2x2", avg_fwd, lambda: F.avg_pool2d(tx, 2, 2), avg_fwd,
         F.avg_pool2d(tx, 2, 2), nb + nb // 4),
        ("avg_pool2d bwd 2x2", avg_bwd, t_avg_bwd, avg_bwd, t_avg_bwd(), nb // 4 + nb),
        ("adaptive_avg_pool2d fwd ->1x1", lambda: rc.pool.adaptive_avg_pool2d(dx, 1, 1),
         lambda: F.adaptive_avg_pool2d(tx, 1), lambda: rc.pool.adaptive_avg_pool2d(dx, 1, 1),
         F.adaptive_avg_pool2d(tx, 1), nb),
    ]


def _bn_cases(env, shape):
    aten = env.torch.ops.aten
    x = rand(shape)
    c = x.shape[1]
    wgt, bias = rand(c, 3), rand(c, 4)
    dx, dw, db = env.put(x), env.put(wgt), env.put(bias)
    rm, rv = env.put(np.zeros(c, np.float32)), env.put(np.ones(c, np.float32))
    tx, tw, tb = env.tensor(x), env.tensor(wgt), env.tensor(bias)
    trm, trv = env.tensor(np.zeros(c, np.float32)), env.tensor(np.ones(c, np.float32))
    ty, tmean, tinv = aten.native_batch_norm(tx, tw, tb, trm, trv, True, 0.1, 1e-5)
    _, mean, invstd = rc.batch_norm.batch_norm_forward(dx, dw, db, rm, rv, True, 0.1, 1e-5)
    gy = rand(x.shape, 5)
    dgy, tgy = env.put(gy), env.tensor(gy)

    def t_bwd():
        return aten.native_batch_norm_backward(tgy, tx, tw, trm, trv, tmean, tinv, True, 1e-5,
                                               [True, True, True])
    nb = x.nbytes
    return [
        ("batch_norm fwd (train)",
         lambda: rc.batch_norm.batch_norm_forward(dx, dw, db, rm, rv, True, 0.1, 1e-5),
         lambda: aten.native_batch_norm(tx, tw, tb, trm, trv, True, 0.1, 1e-5),
         lambda: rc.batch_norm.batch_norm_forward(dx, dw, db, None, None, True, 0.1, 1e-5)[0], ty, 2 * nb),
        ("batch_norm bwd (train)", lambda: rc.batch_norm.batch_norm_backward(dgy, dx, dw, mean, invstd),
         t_bwd, lambda: rc.batch_norm.batch_norm_backward(dgy, dx, dw, mean, invstd)[0], t_bwd()[0],
         3 * nb),
    ]


def _table_cases(env, act_shape, row_shape, head_rows):
    """The elementwise and row kernels of the table, for the bandwidth picture; the 10-class
    head (``head_rows`` rows) runs the short-row kernels."""
    F = env.torch.nn.functional
    table = kernels.KERNELS["cuda"]
    x = rand(act_shape)
    dx, tx = env.put(x), env.tensor(x)
    r = rand(row_shape)
    dr, tr = env.put(r), env.tensor(r)
    h = rand((head_rows, 10), 6)
    target = np.random.default_rng(7).integers(0, 10, head_rows)
    dh, th, dt = env.put(h), env.tensor(h, grad=True), env.put(target)
    tt = env.torch.tensor(target, device=env.tdev)

    def ce_torch():  # loss and logits gradient, as the fused kernel gives them
        loss = F.cross_entropy(th, tt, reduction="none")
        return loss, env.torch.autograd.grad(loss.sum(), th)[0]
    head_bytes = 2 * h.nbytes + target.nbytes + h.nbytes // 10  # logits, grad, target, loss
    return [
        ("relu fwd", lambda: table["relu"](dx), lambda: F.relu(tx), lambda: table["relu"](dx),
         F.relu(tx), 2 * x.nbytes),
        ("softmax fwd", lambda: table["softmax"](dr, 1), lambda: F.softmax(tr, 1),
         lambda: table["softmax"](dr, 1), F.softmax(tr, 1), 2 * r.nbytes),
        ("log_softmax fwd (10 classes)", lambda: table["log_softmax"](dh, 1),
         lambda: F.log_softmax(th.detach(), 1), lambda: table["log_softmax"](dh, 1),
         F.log_softmax(th.detach(), 1), 2 * h.nbytes),
        ("cross_entropy fwd+bwd (10 classes)",
         lambda: table["cross_entropy"](dh, dt, None, -100, 0.0), ce_torch,
         lambda: table["cross_entropy"](dh, dt, None, -100, 0.0)[1], ce_torch()[1],
         head_bytes),
    ]


def optimizer_cases(env, tiny):
    """The fused optimizer steps over the small ResNet's parameters vs torch's fused/foreach."""
    from gpudiff.models import create_model
    torch = env.torch
    net = create_model("resnet-small", 3, 8 if tiny else 32, 10)
    shapes = [tuple(p.shape) for p in net.parameters()]
    ps = [rand(s, i) for i, s in enumerate(shapes)]
    gs = [rand(s, 100 + i) for i, s in enumerate(shapes)]
    n_bytes = 4 * sum(int(np.prod(s)) for s in shapes)
    out = []
    for name in ("sgd", "adam"):
        dp = [env.put(p) for p in ps]
        dg = [env.put(g) for g in gs]
        st1 = [env.put(np.zeros_like(p)) for p in ps]
        st2 = [env.put(np.zeros_like(p)) for p in ps]
        tp = [env.tensor(p) for p in ps]
        for t, g in zip(tp, gs):
            t.grad = env.tensor(g)
        kw = {} if env.emulated else ({"foreach": True} if name == "sgd" else {"fused": True})
        if name == "sgd":
            def ours(dp=dp, dg=dg, st1=st1):
                return rc.optim.sgd_step(dp, dg, st1, 0.01, 0.9, 0, 0, False, False)
            topt = torch.optim.SGD(tp, lr=0.01, momentum=0.9, **kw)
            bytes_ = 5 * n_bytes  # p, buf read+written, g read
        else:
            def ours(dp=dp, dg=dg, st1=st1, st2=st2):
                return rc.optim.adam_step(dp, dg, st1, st2, None, [1.0] * len(dp), 1e-3, 0.9, 0.999,
                                    1e-8, 0, False, False, False)
            topt = torch.optim.Adam(tp, lr=1e-3, **kw)
            bytes_ = 7 * n_bytes  # p, m, v read+written, g read
        out.append((f"{name} step (fused, {len(ps)} tensors)", ours, topt.step, bytes_))
    return out


def memory_rows(env, batch, tiny, repeat, bandwidth):
    rows = []
    for name, ours, theirs, ours_result, ref, nbytes in memory_cases(env, batch, tiny):
        err, ok = check(env, ours_result(), ref)
        t, tt = env.time(ours, repeat), env.time(theirs, repeat)
        rows.append({"op": name, "ms": 1e3 * t, "torch_ms": 1e3 * tt, "ratio_vs_torch": t / tt,
                     "compulsory_MB": nbytes / 1e6, "GBps": nbytes / t / 1e9,
                     "fraction_of_copy_bw": nbytes / t / 1e9 / bandwidth, "max_err": err,
                     "ok": ok})
    for name, ours, theirs, nbytes in optimizer_cases(env, tiny):
        t, tt = env.time(ours, repeat), env.time(theirs, repeat)
        rows.append({"op": name, "ms": 1e3 * t, "torch_ms": 1e3 * tt, "ratio_vs_torch": t / tt,
                     "compulsory_MB": nbytes / 1e6, "GBps": nbytes / t / 1e9,
                     "fraction_of_copy_bw": nbytes / t / 1e9 / bandwidth, "max_err": None,
                     "ok": True})  # the fused steps' values are checked by the tests
    return rows


# ---- training steps ---------------------------------------------------------------------------
MODELS = {"lenet": (1, 28), "mnist-cnn": (1, 28), "resnet-small": (3, 32)}


def train_step_time(framework, device, model, batch, repeat, env, image=None, graph=False,
                    precision=None):
    """Median seconds of one SGD training step; ``graph``: the step captured once after 3
    warm-up steps on a side stream (PyTorch's recipe) and replayed (gpudiff.cuda.CUDAGraph
    or torch.cuda.CUDAGraph; on the CPU, gpudiff.Graph, and PyTorch's eager step).
    ``precision`` (eager steps): 'tf32' (both frameworks' TF32 switches on), 'float16' /
    'bfloat16' (the forward under autocast, a GradScaler-free step: the times are the point)."""
    import importlib
    from gpudiff.models import create_model
    lib = importlib.import_module(framework)
    nn = importlib.import_module(framework + ".nn")
    F = importlib.import_module(framework + ".nn.functional")
    optim = importlib.import_module(framework + ".optim")
    c, s = MODELS[model]
    s = image or s
    rng = np.random.default_rng(0)
    net = create_model(model, c, s, 10, nn=nn).to(device)
    net.train()
    opt = optim.SGD(net.parameters(), lr=0.01, momentum=0.9)
    x = lib.tensor(rng.standard_normal((batch, c, s, s)).astype(np.float32), device=device)
    y = lib.tensor(rng.integers(0, 10, batch), device=device)

    def step():
        opt.zero_grad()
        with _precision(lib, framework, device, precision):
            loss = F.cross_entropy(net(x), y)
        loss.backward()
        opt.step()

    def sync():
        if device == "cuda":
            (gpudiff.cuda.synchronize if framework == "gpudiff" else lib.cuda.synchronize)()
    if graph and (device == "cuda" or framework == "gpudiff"):
        side = lib.cuda.Stream() if device == "cuda" else None
        if side is not None:
            side.wait_stream(lib.cuda.current_stream())
        with (lib.cuda.stream(side) if side is not None else contextlib.nullcontext()):
            for _ in range(3):
                step()
        if side is not None:
            lib.cuda.current_stream().wait_stream(side)
        g = lib.cuda.CUDAGraph() if device == "cuda" else lib.Graph()
        opt.zero_grad(set_to_none=True)
        with (lib.cuda.graph(g) if device == "cuda" else lib.graph(g)):
            F.cross_entropy(net(x), y).backward()
            opt.step()
        step = g.replay
    step()
    sync()
    ts = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        step()
        sync()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


class _precision:
    """The settings of a training step's precision (see train_step_time), for a block."""

    def __init__(self, lib, framework, device, precision):
        self.lib, self.framework, self.device, self.precision = lib, framework, device, precision
        self.ctx = contextlib.nullcontext()

    def __enter__(self):
        b = self.lib.backends
        self.old = (b.cudnn.allow_tf32, b.cuda.matmul.allow_tf32)
        b.cudnn.allow_tf32 = b.cuda.matmul.allow_tf32 = self.precision == "tf32"
        if self.precision in ("float16", "bfloat16"):
            dt = getattr(self.lib, self.precision)
            self.ctx = self.lib.autocast(self.device, dtype=dt)
        return self.ctx.__enter__()

    def __exit__(self, *exc):
        self.ctx.__exit__(*exc)
        b = self.lib.backends
        b.cudnn.allow_tf32, b.cuda.matmul.allow_tf32 = self.old


def train_precision_rows(env, tiny, repeat):
    """Training steps in TF32 and under float16 / bfloat16 autocast: gpudiff on the cuda
    device vs PyTorch with the same settings (on the emulated device PyTorch runs on the CPU,
    where float16 autocast may be missing: NaN)."""
    rows = []
    models = ["lenet"] if tiny else ["lenet", "resnet-small"]
    for model in models:
        for b in ([2] if tiny else [64, 256]):
            for precision in ("fp32", "tf32", "float16", "bfloat16"):
                prec = None if precision == "fp32" else precision
                g = train_step_time("gpudiff", "cuda", model, b, repeat, env, precision=prec)
                try:
                    t = train_step_time("torch", env.tdev, model, b, repeat, env, precision=prec)
                except RuntimeError:
                    t = float("nan")
                rows.append({"model": model, "batch": b, "precision": precision,
                             "gpudiff_cuda_ms": 1e3 * g, "torch_ms": 1e3 * t,
                             "ratio_vs_torch": g / t})
    return rows


def train_rows(env, tiny, repeat):
    rows = []
    batches = [2] if tiny else [64, 256]
    models = ["lenet", "resnet-small"] if tiny else list(MODELS)
    for model in models:
        image = 12 if (tiny and model == "resnet-small") else None
        for b in batches:
            g = train_step_time("gpudiff", "cuda", model, b, repeat, env, image)
            t = train_step_time("torch", env.tdev, model, b, repeat, env, image)
            cpu = train_step_time("gpudiff", "cpu", model, b, repeat, env, image)
            # captured steps: ours, and PyTorch's CUDA graph (its eager step off a GPU)
            gg = train_step_time("gpudiff", "cuda", model, b, repeat, env, image, graph=True)
            tg = train_step_time("torch", env.tdev, model, b, repeat, env, image, graph=True)
            rows.append({"model": model, "batch": b, "gpudiff_cuda_ms": 1e3 * g,
                         "torch_ms": 1e3 * t, "gpudiff_cpu_ms": 1e3 * cpu,
                         "ratio_vs_torch": g / t, "speedup_vs_gpudiff_cpu": cpu / g,
                         "gpudiff_graph_ms": 1e3 * gg, "torch_graph_ms": 1e3 * tg,
                         "graph_ratio_vs_torch_graph": gg / tg,
                         "graph_speedup_vs_eager": g / gg})
    return rows


# ---- the gpu tests ------------------------------------------------------------------------------
def gpu_tests(env):
    if env.emulated:
        return {"status": "skipped: no GPU (the tests run on the emulator in CI instead)"}
    envv = dict(os.environ, GPUDIFF_TEST_REAL_GPU="1")
    envv.pop("GPUDIFF_CUDA", None)
    p = subprocess.run([sys.executable, "-m", "pytest", "-q", "-m", "gpu", "tests"], cwd=ROOT,
                       env=envv, capture_output=True, text=True, check=False)
    tail = (p.stdout + p.stderr).strip().splitlines()[-1:] or [""]
    return {"status": "passed" if p.returncode == 0 else "FAILED", "returncode": p.returncode,
            "summary": tail[0]}


# ---- output ---------------------------------------------------------------------------------
def fmt_table(rows, cols):
    head = " ".join(f"{h:>{w}}" if i else f"{h:<{w}}" for i, (h, _, w) in enumerate(cols))
    out = [head, "-" * len(head)]
    for r in rows:
        cells = []
        for i, (_, f, w) in enumerate(cols):
            v = f(r)
            cells.append(f"{v:<{w}}" if i == 0 else f"{v:>{w}}")
        out.append(" ".join(cells))
    return "\n".join(out)


def report_text(res):
    lab = " (EMULATED: CPU emulator vs PyTorch CPU; not GPU numbers)" if res["emulated"] else ""
    lines = [f"gpudiff GPU suite on {res['device']}{lab}", f"date {res['date']}",
             "settings: " + "; ".join(f"{k}: {v}" for k, v in res["settings"].items()),
             f"copy bandwidth: {res['copy_bandwidth_GBps']:.1f} GB/s", "",
             f"gpu tests: {res['gpu_tests']['status']} {res['gpu_tests'].get('summary', '')}",
             "", "convolutions (ours vs PyTorch):"]
    lines.append(fmt_table(res["conv"], [
        ("layer / pass", lambda r: f"{r['layer']} {r['op'][7:]}"[:38], 38),
        ("algo", lambda r: r["algorithm"], 13), ("ran", lambda r: r["ran"], 13),
        ("ms", lambda r: f"{r['ms']:.3f}", 9), ("torch ms", lambda r: f"{r['torch_ms']:.3f}", 9),
        ("x torch", lambda r: f"{r['ratio_vs_torch']:.2f}", 8),
        ("GFLOP/s", lambda r: f"{r['gflops']:.0f}", 8),
        ("ok", lambda r: "ok" if r["ok"] else "FAIL", 4)]))
    lines += ["", "memory-bound kernels (GB/s = compulsory bytes / time):"]
    lines.append(fmt_table(res["memory"], [
        ("op", lambda r: r["op"][:34], 34), ("ms", lambda r: f"{r['ms']:.3f}", 9),
        ("torch ms", lambda r: f"{r['torch_ms']:.3f}", 9),
        ("x torch", lambda r: f"{r['ratio_vs_torch']:.2f}", 8),
        ("GB/s", lambda r: f"{r['GBps']:.1f}", 8),
        ("of copy", lambda r: f"{100 * r['fraction_of_copy_bw']:.0f}%", 8),
        ("ok", lambda r: "ok" if r["ok"] else "FAIL", 4)]))
    lines += ["", "training steps (SGD momentum, ms per step):"]
    lines.append(fmt_table(res["train"], [
        ("model", lambda r: r["model"], 14), ("batch", lambda r: str(r["batch"]), 6),
        ("gpudiff cuda", lambda r: f"{r['gpudiff_cuda_ms']:.1f}", 13),
        ("torch", lambda r: f"{r['torch_ms']:.1f}", 9),
        ("gpudiff cpu", lambda r: f"{r['gpudiff_cpu_ms']:.1f}", 12),
        ("x torch", lambda r: f"{r['ratio_vs_torch']:.2f}", 8),
        ("graph", lambda r: f"{r['gpudiff_graph_ms']:.1f}", 8),
        ("torch graph", lambda r: f"{r['torch_graph_ms']:.1f}", 12),
        ("x torch graph", lambda r: f"{r['graph_ratio_vs_torch_graph']:.2f}", 14)]))
    lines += ["", "tensor-core convolutions (same flags on both sides; TFLOP/s = 2 x MACs / time):"]
    lines.append(fmt_table(res["tensor_core"], [
        ("layer / pass", lambda r: f"{r['layer']} {r['op'][7:]}"[:38], 38),
        ("precision", lambda r: r["precision"], 9), ("ran", lambda r: r["ran"], 5),
        ("ms", lambda r: f"{r['ms']:.3f}", 9), ("torch ms", lambda r: f"{r['torch_ms']:.3f}", 9),
        ("x torch", lambda r: f"{r['ratio_vs_torch']:.2f}", 8),
        ("TFLOP/s", lambda r: f"{r['tflops']:.2f}", 8),
        ("ok", lambda r: "ok" if r["ok"] else "FAIL", 4)]))
    lines += ["", "training steps by precision (same settings on both sides, ms per step):"]
    lines.append(fmt_table(res["train_precision"], [
        ("model", lambda r: r["model"], 14), ("batch", lambda r: str(r["batch"]), 6),
        ("precision", lambda r: r["precision"], 9),
        ("gpudiff cuda", lambda r: f"{r['gpudiff_cuda_ms']:.1f}", 13),
        ("torch", lambda r: f"{r['torch_ms']:.1f}", 9),
        ("x torch", lambda r: f"{r['ratio_vs_torch']:.2f}", 8)]))
    return "\n".join(lines)


def run(out, tiny=False, repeat=None):
    flags = (gpudiff.backends.cudnn.allow_tf32, gpudiff.backends.cuda.matmul.allow_tf32)
    try:
        return _run(out, tiny, repeat)
    finally:  # (Env turned them off; a caller in the same process gets them back)
        gpudiff.backends.cudnn.allow_tf32, gpudiff.backends.cuda.matmul.allow_tf32 = flags


def _run(out, tiny=False, repeat=None):
    env = Env()
    repeat = repeat or (1 if tiny else 10)
    batch = 2 if tiny else 64
    t0 = time.time()
    bw = copy_bandwidth(env, tiny)
    res = {
        "device": env.device_name, "emulated": env.emulated,
        "what": ("EMULATED run: our CUDA kernels on the CPU emulator, PyTorch on the CPU; "
                 "checks the script and the results, says nothing about GPU speed")
        if env.emulated else "real GPU run",
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "machine": f"{platform.node()} ({platform.machine()})", "tiny": tiny,
        "settings": env.settings, "copy_bandwidth_GBps": bw,
        "gpu_tests": gpu_tests(env),
        "conv": conv_cases(env, batch, tiny, repeat),
        "memory": memory_rows(env, batch, tiny, repeat, bw),
        "train": train_rows(env, tiny, max(1, repeat // 2)),
        "tensor_core": tensor_core_cases(env, batch, tiny, repeat),
        "train_precision": train_precision_rows(env, tiny, max(1, repeat // 2)),
    }
    res["seconds"] = round(time.time() - t0, 1)
    res["all_ok"] = (all(r["ok"] for r in res["conv"] + res["memory"] + res["tensor_core"])
                     and res["gpu_tests"]["status"] != "FAILED")
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "gpu_suite.json"), "w") as f:
        json.dump(res, f, indent=1, default=float)
    text = report_text(res)
    with open(os.path.join(out, "gpu_suite.txt"), "w") as f:
        f.write(text + "\n")
    return res, text


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True, help="directory for gpu_suite.json / .txt")
    ap.add_argument("--tiny", action="store_true", help="tiny shapes, one repeat (CI)")
    ap.add_argument("--repeat", type=int, default=None)
    args = ap.parse_args(argv)
    res, text = run(args.out, args.tiny, args.repeat)
    print(text)
    print(f"\nwrote {os.path.join(args.out, 'gpu_suite.json')} in {res['seconds']} s"
          + (" (EMULATED)" if res["emulated"] else ""))
    return 0 if res["all_ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
