"""The benchmark suite: one implementation behind ``gpudiff bench`` and the bench/ scripts.

Each case is written once against the PyTorch-style API and run on every *backend*: gpudiff
on each requested device, and PyTorch (when importable) on the CPU (and on CUDA when its
build has one). Times are wall-clock per call with the device synchronised before and after
each call; we report the min and the median of ``repeat`` calls after ``warmup`` calls.

>>> results = run(quick=True, devices=["cpu"], torch=False, repeat=2, cases=["relu"])
>>> [r["backend"] for r in results]
['gpudiff cpu']

The emulated CUDA device (GPUDIFF_CUDA=emulate) runs our .cu kernels on the CPU emulator: its
times are labelled "emulated" everywhere and never used as GPU numbers (no CPU-vs-GPU ratio).
"""
import dataclasses
import datetime
import importlib
import json
import os
import platform
import statistics
import time

import numpy as np

__all__ = [
    "CASES",
    "BenchError",
    "Case",
    "machine_info",
    "plot",
    "run",
    "run_cli",
    "table",
    "write_json",
]


class BenchError(ValueError):
    """A bad benchmark setting, reported as one line (exit status 2)."""


# ---- backends: a framework on a device ---------------------------------------------------
class Backend:
    """What a case needs from a framework: the library, its nn/F/optim, a device, a sync."""

    def __init__(self, framework, device):
        self.framework = framework            # "gpudiff" | "torch"
        self.lib = importlib.import_module(framework)
        self.nn = importlib.import_module(framework + ".nn")
        self.F = importlib.import_module(framework + ".nn.functional")
        self.optim = importlib.import_module(framework + ".optim")
        self.device = device                  # "cpu" | "cuda"
        self.emulated = (framework == "gpudiff" and device == "cuda"
                         and self.lib.cuda.is_emulated())

    @property
    def label(self):
        return f"{self.framework} {self.device}" + (" (emulated)" if self.emulated else "")

    def tensor(self, array, requires_grad=False):
        t = self.lib.tensor(array, device=self.device)
        return t.requires_grad_() if requires_grad else t

    def sync(self):
        if self.device == "cuda":
            self.lib.cuda.synchronize()


# ---- cases ------------------------------------------------------------------------------
@dataclasses.dataclass
class Case:
    """One timed thing: ``setup(backend, quick, rng)`` returns a zero-argument callable that
    runs one iteration (forward, or forward + backward, or a whole training step)."""
    name: str
    kind: str                 # "op" | "train step"
    shape: callable           # quick -> a short description of the sizes
    setup: callable


def _randn(rng, *shape):
    return rng.standard_normal(shape).astype(np.float32)


def _fwd_bwd(b, fn, *inputs):
    """A callable running ``fn(*inputs)`` forward and backward (grads reset each time)."""
    ones = None

    def step():
        nonlocal ones
        for t in inputs:
            t.grad = None
        y = fn(*inputs)
        if ones is None:
            ones = b.tensor(np.ones(tuple(y.shape), np.float32))
        y.backward(ones)
    return step


def _conv_shape(quick):
    return (8, 16, 16, 16, 16) if quick else (64, 32, 32, 32, 64)   # N, C, H, W, C_out


def _setup_conv_fwd(b, quick, rng):
    n, c, h, w, co = _conv_shape(quick)
    x, wt, bias = (b.tensor(_randn(rng, n, c, h, w)), b.tensor(_randn(rng, co, c, 3, 3)),
                   b.tensor(_randn(rng, co)))
    return lambda: b.F.conv2d(x, wt, bias, padding=1)


def _setup_conv_fwd_bwd(b, quick, rng):
    n, c, h, w, co = _conv_shape(quick)
    x, wt, bias = (b.tensor(_randn(rng, n, c, h, w), True),
                   b.tensor(_randn(rng, co, c, 3, 3), True), b.tensor(_randn(rng, co), True))
    return _fwd_bwd(b, lambda x, wt, bias: b.F.conv2d(x, wt, bias, padding=1), x, wt, bias)


def _act_shape(quick):
    return (8, 16, 16, 16) if quick else (64, 64, 32, 32)


def _setup_maxpool(b, quick, rng):
    x = b.tensor(_randn(rng, *_act_shape(quick)), True)
    return _fwd_bwd(b, lambda x: b.F.max_pool2d(x, 2), x)


def _setup_batchnorm(b, quick, rng):
    n, c, h, w = _act_shape(quick)
    x = b.tensor(_randn(rng, n, c, h, w), True)
    bn = b.nn.BatchNorm2d(c).to(b.device)
    return _fwd_bwd(b, bn, x)


def _setup_relu(b, quick, rng):
    x = b.tensor(_randn(rng, *_act_shape(quick)), True)
    return _fwd_bwd(b, b.F.relu, x)


def _mm_size(quick):
    return 128 if quick else 1024


def _setup_matmul(b, quick, rng):
    n = _mm_size(quick)
    x, y = b.tensor(_randn(rng, n, n), True), b.tensor(_randn(rng, n, n), True)
    return _fwd_bwd(b, lambda x, y: x @ y, x, y)


def _setup_cross_entropy(b, quick, rng):
    n, k = (64, 10) if quick else (1024, 1000)
    x = b.tensor(_randn(rng, n, k), True)
    t = b.lib.tensor(rng.integers(0, k, n), device=b.device)
    return _fwd_bwd(b, lambda x: b.F.cross_entropy(x, t), x)


# the training steps: (model, channels, image size, batch) quick / full
_STEPS = {
    "lenet": ((1, 28, 16), (1, 28, 64)),
    "mnist-cnn": ((1, 28, 16), (1, 28, 64)),
    "resnet-small": ((3, 32, 16), (3, 32, 64)),
}


def _step_shape(model):
    def shape(quick):
        c, s, n = _STEPS[model][0 if quick else 1]
        return f"{n}x{c}x{s}x{s}"
    return shape


def _setup_step(model):
    def setup(b, quick, rng):
        from .models import create_model
        c, s, n = _STEPS[model][0 if quick else 1]
        net = create_model(model, c, s, 10, nn=b.nn).to(b.device)
        net.train()
        opt = b.optim.SGD(net.parameters(), lr=0.01, momentum=0.9)
        x = b.tensor(_randn(rng, n, c, s, s))
        y = b.lib.tensor(rng.integers(0, 10, n), device=b.device)

        def step():
            opt.zero_grad()
            loss = b.F.cross_entropy(net(x), y)
            loss.backward()
            opt.step()
        return step
    return setup


def _fmt(*dims):
    return "x".join(str(d) for d in dims)


CASES = [
    Case("conv2d 3x3 fwd", "op", lambda q: _fmt(*_conv_shape(q)[:4]) + f" -> {_conv_shape(q)[4]}",
         _setup_conv_fwd),
    Case("conv2d 3x3 fwd+bwd", "op",
         lambda q: _fmt(*_conv_shape(q)[:4]) + f" -> {_conv_shape(q)[4]}", _setup_conv_fwd_bwd),
    Case("max_pool2d 2x2 fwd+bwd", "op", lambda q: _fmt(*_act_shape(q)), _setup_maxpool),
    Case("batch_norm2d fwd+bwd", "op", lambda q: _fmt(*_act_shape(q)), _setup_batchnorm),
    Case("relu fwd+bwd", "op", lambda q: _fmt(*_act_shape(q)), _setup_relu),
    Case("matmul fwd+bwd", "op", lambda q: _fmt(_mm_size(q), _mm_size(q)), _setup_matmul),
    Case("cross_entropy fwd+bwd", "op", lambda q: "64x10" if q else "1024x1000",
         _setup_cross_entropy),
] + [Case(f"{m} train step", "train step", _step_shape(m), _setup_step(m)) for m in _STEPS]


# ---- timing -----------------------------------------------------------------------------
def time_calls(fn, sync, repeat, warmup=1):
    """Seconds per call of ``fn`` (``repeat`` of them, after ``warmup`` untimed calls)."""
    for _ in range(warmup):
        fn()
    sync()
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    return times


def _torch_backends(devices):
    try:
        import torch
    except ImportError:
        return []
    out = [Backend("torch", "cpu")] if "cpu" in devices else []
    if "cuda" in devices and torch.cuda.is_available():
        out.append(Backend("torch", "cuda"))
    torch.set_num_threads(os.cpu_count() or 1)
    return out


def parse_devices(spec):
    """'cpu,cuda' -> ['cpu', 'cuda']; None -> cpu, plus cuda when a real GPU is present."""
    import gpudiff
    if spec is None:
        devs = ["cpu"]
        if gpudiff.cuda.is_available() and not gpudiff.cuda.is_emulated():
            devs.append("cuda")
        return devs
    devs = [d.strip() for d in spec.split(",") if d.strip()]
    for d in devs:
        if d not in ("cpu", "cuda"):
            raise BenchError(f"--device: unknown device {d!r} (use cpu, cuda or cpu,cuda)")
    if "cuda" in devs and not gpudiff.cuda.is_available():
        raise BenchError("--device cuda: CUDA is not available here (no NVIDIA GPU or no CuPy); "
                         "use --device cpu, or set GPUDIFF_CUDA=emulate for the CUDA emulator")
    if not devs:
        raise BenchError("--device: no device given")
    return list(dict.fromkeys(devs))


def run(quick=False, devices=("cpu",), torch=True, repeat=None, warmup=1, cases=None,
        log=None, seed=0):
    """Run the cases on every backend; returns one dict per (case, backend).

    cases: names (or name prefixes) to run; None runs them all.
    """
    backends = [Backend("gpudiff", d) for d in devices]
    if torch:
        backends += _torch_backends(devices)
    repeat = repeat or (5 if quick else 20)
    selected = [c for c in CASES if cases is None or any(c.name.startswith(n) for n in cases)]
    if not selected:
        raise BenchError(f"no benchmark case matches {cases}")
    results = []
    for case in selected:
        for b in backends:
            rng = np.random.default_rng(seed)
            fn = case.setup(b, quick, rng)
            times = time_calls(fn, b.sync, repeat, warmup)
            r = {"case": case.name, "kind": case.kind, "shape": case.shape(quick),
                 "backend": b.label, "framework": b.framework, "device": b.device,
                 "emulated": b.emulated, "repeat": repeat,
                 "times_ms": [round(t * 1e3, 4) for t in times],
                 "min_ms": round(min(times) * 1e3, 4),
                 "median_ms": round(statistics.median(times) * 1e3, 4)}
            results.append(r)
            if log is not None:
                log(f"  {case.name:<26} {b.label:<24} median {r['median_ms']:10.3f} ms")
    return results


# ---- reporting ----------------------------------------------------------------------------
def machine_info():
    """The machine the numbers come from: CPU model, GPU name, versions, date."""
    import gpudiff

    from .train import _cpu_model
    info = {
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "cpu": _cpu_model(), "cpu_count": os.cpu_count(), "platform": platform.platform(),
        "python": platform.python_version(), "numpy": np.__version__,
        "gpudiff": gpudiff.__version__, "gpu": None, "gpu_emulated": False, "torch": None,
        "cpu_extension": gpudiff.backend._C is not None,
    }
    if gpudiff.cuda.is_available():
        info["gpu_emulated"] = gpudiff.cuda.is_emulated()
        info["gpu"] = gpudiff.cuda.get_device_name()
    try:
        import torch
        info["torch"] = torch.__version__
    except ImportError:
        pass
    return info


def _columns(results):
    return list(dict.fromkeys(r["backend"] for r in results))


def table(results):
    """The results as a text table: median (min) ms per backend, and the ratios that apply."""
    from tabulate import tabulate
    by = {(r["case"], r["backend"]): r for r in results}
    cols = _columns(results)
    ratios = []   # (title, numerator backend, denominator backend)
    for dev in ("cpu", "cuda"):
        g, t = f"gpudiff {dev}", f"torch {dev}"
        if g in cols and t in cols:
            ratios.append((f"gpudiff/torch {dev}", g, t))
    if "gpudiff cpu" in cols and "gpudiff cuda" in cols:   # a real GPU only
        ratios.append(("gpu speedup (cpu/cuda)", "gpudiff cpu", "gpudiff cuda"))
    headers = ["case", "shape"] + [f"{c}\nmedian (min) ms" for c in cols] + [r[0] for r in ratios]
    rows = []
    for case in dict.fromkeys(r["case"] for r in results):
        first = next(r for r in results if r["case"] == case)
        row = [case, first["shape"]]
        for c in cols:
            r = by.get((case, c))
            row.append("" if r is None else f"{r['median_ms']:.3f} ({r['min_ms']:.3f})")
        for _, num, den in ratios:
            a, b = by.get((case, num)), by.get((case, den))
            row.append("" if a is None or b is None or b["median_ms"] == 0
                       else f"{a['median_ms'] / b['median_ms']:.2f}x")
        rows.append(row)
    return tabulate(rows, headers=headers, tablefmt="simple", disable_numparse=True)


def write_json(path, results, settings):
    doc = {"machine": machine_info(), "settings": settings, "results": results}
    with open(path, "w") as f:
        json.dump(doc, f, indent=2)
        f.write("\n")
    return doc


def plot(path, results, title="gpudiff bench"):
    """A horizontal bar chart of median times per case and backend (log scale)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    cases = list(dict.fromkeys(r["case"] for r in results))
    cols = _columns(results)
    by = {(r["case"], r["backend"]): r["median_ms"] for r in results}
    fig = Figure(figsize=(10, 0.5 + 0.45 * len(cases) * max(1, len(cols)) / 2 + 1), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    height = 0.8 / max(1, len(cols))
    ys = np.arange(len(cases))
    for k, c in enumerate(cols):
        vals = [by.get((case, c), np.nan) for case in cases]
        ax.barh(ys + k * height, vals, height, label=c,
                hatch="//" if "emulated" in c else None)
    ax.set_yticks(ys + height * (len(cols) - 1) / 2, cases)
    ax.invert_yaxis()
    ax.set_xscale("log")
    ax.set_xlabel("median time per call (ms, log scale; shorter is faster)")
    ax.set_title(title)
    ax.grid(axis="x", alpha=0.3, which="both")
    ax.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(path)


def default_out_dir(root="runs"):
    return os.path.join(root, "bench-" + time.strftime("%Y%m%d-%H%M%S"))


def run_cli(quick=False, devices=None, out=None, torch=True, repeat=None, log=print,
            cases=None):
    """``gpudiff bench``: run, print the table, write bench.json and bench.png into ``out``."""
    devs = parse_devices(devices)
    if torch:
        try:
            import torch as _torch  # noqa: F401
        except ImportError:
            log("PyTorch is not installed: timing gpudiff only (pip install torch to compare)")
            torch = False
    out = out or default_out_dir()
    os.makedirs(out, exist_ok=True)
    m = machine_info()
    gpu = "none" if m["gpu"] is None else m["gpu"]
    log(f"gpudiff bench{' --quick' if quick else ''} | cpu: {m['cpu']} ({m['cpu_count']} "
        f"threads) | gpu: {gpu} | devices: {','.join(devs)}")
    if "cuda" in devs and m["gpu_emulated"]:
        log("note: cuda is the CPU emulator (GPUDIFF_CUDA=emulate): its times are labelled "
            "'emulated' and say nothing about GPU speed")
    t0 = time.perf_counter()
    results = run(quick=quick, devices=devs, torch=torch, repeat=repeat, cases=cases, log=log)
    settings = {"quick": quick, "devices": devs, "torch": torch,
                "repeat": results[0]["repeat"], "warmup": 1,
                "timing": "wall clock per call, device synchronised; min and median"}
    write_json(os.path.join(out, "bench.json"), results, settings)
    plot(os.path.join(out, "bench.png"), results,
         title=f"gpudiff bench ({m['cpu']}; gpu: {gpu})")
    log("")
    log(table(results))
    log("")
    log(f"{len(results)} timings in {time.perf_counter() - t0:.1f}s; wrote bench.json and "
        f"bench.png to {out}")
    return 0
