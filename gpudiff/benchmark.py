"""The benchmark suite: the one implementation behind ``gpudiff bench`` and bench/bench_cpu.py.

Every case is written once against the PyTorch-style API and run on each *backend*: gpudiff
on each requested device, and PyTorch (when importable) on the CPU, and on CUDA when its
build has it. Cases are whole training steps of the model zoo (zero_grad, forward, loss,
backward, SGD step; the same initial weights in every backend) and single ops (forward, or
forward + backward) at the shapes those models use.

Timing: each backend runs in its own worker process (two OpenMP runtimes in one process spin
against each other), and for each case the backends take turns, one call each per round, the
order rotating every round, so that all of them see the same machine load (a shared machine
is noisy); each call is timed wall clock with the device synchronised before and after. We report the min,
the median and the interquartile range of ``repeat`` rounds after ``warmup`` rounds, and
the ratios gpudiff/PyTorch (same device) and CPU/GPU (gpudiff; a real GPU only).

The emulated CUDA device (GPUDIFF_CUDA=emulate) runs our .cu kernels on the CPU emulator: its
times are labelled "emulated" everywhere and never enter a CPU/GPU ratio.

>>> results = run(quick=True, devices=["cpu"], torch=False, repeat=2, only=["relu"],
...               isolate=False)
>>> [r["backend"] for r in results]
['gpudiff cpu']
"""
import cProfile
import dataclasses
import datetime
import importlib
import importlib.util
import io
import json
import os
import platform
import pstats
import statistics
import subprocess
import sys
import time

import numpy as np

from .utils.runs import cpu_model, default_out_dir

__all__ = ["BenchError", "Case", "cases", "machine_info", "plot", "profile_step", "run",
           "run_cli", "table", "write_json"]


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
    """One timed thing. ``setup(backend, shared)`` returns a zero-argument callable running
    one iteration; ``shared`` is a dict the backends of one case share (the same input data
    and initial weights), filled by the first backend that needs it."""
    name: str
    kind: str                 # "train step" | "op fwd" | "op fwd+bwd"
    shape: str                # the sizes, for the table
    setup: callable


def _data(shared, key, make):
    if key not in shared:
        shared[key] = make()
    return shared[key]


def _rng(shared):
    return _data(shared, "rng", lambda: np.random.default_rng(0))


# -- one op, forward or forward + backward
def _op_case(name, shape_text, make_inputs, call, backward):
    """make_inputs(rng) -> list of numpy arrays (float ones get requires_grad for backward);
    call(F, *tensors) -> the output tensor."""

    def setup(b, shared):
        arrays = _data(shared, "inputs", lambda: make_inputs(_rng(shared)))
        ts = [b.tensor(a, backward and a.dtype.kind == "f") for a in arrays]
        if not backward:
            def fwd():
                with b.lib.no_grad():
                    call(b.F, *ts)
            return fwd
        out_shape = tuple(call(b.F, *ts).shape)
        gy = b.tensor(_data(shared, "gy", lambda: _rng(shared).standard_normal(out_shape)
                            .astype(np.float32)))

        def fwd_bwd():
            for t in ts:
                t.grad = None
            call(b.F, *ts).backward(gy)
        return fwd_bwd

    kind = "op fwd+bwd" if backward else "op fwd"
    return Case(f"{name} {'fwd+bwd' if backward else 'fwd'}", kind, shape_text, setup)


def _randn(*shape, scale=1.0):
    return lambda rng: rng.standard_normal(shape).astype(np.float32) * np.float32(scale)


def _conv(name, n, c, h, co, k, stride=1, padding=0, both=True):
    """conv2d cases: input (n, c, h, h), weight (co, c, k, k)."""
    def inputs(rng):
        return [_randn(n, c, h, h)(rng), _randn(co, c, k, k, scale=0.1)(rng)]

    def call(F, x, w):
        return F.conv2d(x, w, stride=stride, padding=padding)
    text = f"{n}x{c}x{h}x{h}, {co}x{c}x{k}x{k}" + (f" /{stride}" if stride > 1 else "") + \
        (f" pad {padding}" if padding else "")
    cs = [_op_case(f"conv2d {name}", text, inputs, call, True)]
    if both:
        cs.insert(0, _op_case(f"conv2d {name}", text, inputs, call, False))
    return cs


def _pool(name, n, c, h, both=True):
    def inputs(rng):
        return [_randn(n, c, h, h)(rng)]

    def call(F, x):
        return F.max_pool2d(x, 2)
    cs = [_op_case(f"max_pool2d {name}", f"{n}x{c}x{h}x{h}, 2x2", inputs, call, True)]
    if both:
        cs.insert(0, _op_case(f"max_pool2d {name}", f"{n}x{c}x{h}x{h}, 2x2", inputs, call,
                              False))
    return cs


def _other_ops(n, c, h, mm, ce):
    act = f"{n}x{c}x{h}x{h}"

    def bn_call(F, x, w, bias):
        return F.batch_norm(x, None, None, w, bias, training=True)
    return [
        _op_case("batch_norm2d", act, lambda r: [_randn(n, c, h, h)(r),
                                                 np.ones(c, np.float32), np.zeros(c, np.float32)],
                 bn_call, True),
        _op_case("relu", act, lambda r: [_randn(n, c, h, h)(r)], lambda F, x: F.relu(x), True),
        _op_case("matmul", f"{mm}x{mm} @ {mm}x{mm}",
                 lambda r: [_randn(mm, mm)(r), _randn(mm, mm)(r)], lambda F, x, y: x @ y, True),
        _op_case("cross_entropy", f"{ce[0]}x{ce[1]}",
                 lambda r: [_randn(*ce)(r), r.integers(0, ce[1], ce[0])],
                 lambda F, x, t: F.cross_entropy(x, t), True),
    ]


# -- a whole training step of a zoo model
# name: (zoo model, channels, image size, extra constructor arguments)
STEP_MODELS = {
    "lenet": ("lenet", 1, 28, {}),
    "mnist-cnn": ("mnist-cnn", 1, 28, {}),
    "resnet-small": ("resnet-small", 3, 32, {}),            # ResNet-8
    "resnet-20": ("resnet-small", 3, 32, {"blocks": 3}),    # the CIFAR ResNet-20
    "tiny-mlp": ("tiny-mlp", 1, 8, {"batch": 4}),           # 99 small ops: per-op cost
}


def _step_case(model, batch):
    zoo_name, c, s, kw = STEP_MODELS[model]
    kw = dict(kw)
    batch = kw.pop("batch", batch)   # a model that fixes its own batch (tiny-mlp: 4)

    def setup(b, shared):
        from .models import create_model
        b.lib.manual_seed(0)
        net = create_model(zoo_name, c, s, 10, nn=b.nn, **kw)
        # the same initial weights everywhere: the first backend's, copied
        state = _data(shared, "state", lambda: {
            k: np.array(v.detach().cpu().numpy()) for k, v in net.state_dict().items()})
        net.load_state_dict({k: b.lib.tensor(v) for k, v in state.items()})
        net = net.to(b.device)
        rng = _rng(shared)
        x = b.tensor(_data(shared, "x", lambda: rng.standard_normal((batch, c, s, s))
                           .astype(np.float32)))
        y = b.lib.tensor(_data(shared, "y", lambda: rng.integers(0, 10, batch)),
                         device=b.device)
        # a sanity check that the backends compute the same network: the eval-mode loss
        net.eval()
        with b.lib.no_grad():
            shared.setdefault("eval_loss", {})[b.label] = b.F.cross_entropy(net(x), y).item()
        net.train()
        opt = b.optim.SGD(net.parameters(), lr=0.01, momentum=0.9)

        def step():
            opt.zero_grad()
            loss = b.F.cross_entropy(net(x), y)
            loss.backward()
            opt.step()
        step.model = net
        return step

    return Case(f"{model} train step", "train step", f"{batch}x{c}x{s}x{s}", setup)


def _graph_step_case(model, batch, warmup=2):
    """The same step captured once and replayed (docs/GRAPHS.md): gpudiff.Graph on the CPU,
    a CUDA graph on cuda. PyTorch has no CPU graphs: its CPU row is its eager step, so the
    ratio is gpudiff's replay against what a PyTorch user runs (on cuda: torch.cuda.graph)."""
    eager = _step_case(model, batch)

    def setup(b, shared):
        step = eager.setup(b, shared)
        net = step.model
        if b.framework != "gpudiff" and b.device != "cuda":
            return step                          # PyTorch's eager CPU step
        opt = b.optim.SGD(net.parameters(), lr=0.01, momentum=0.9)
        xs = b.tensor(shared["x"])
        ys = b.lib.tensor(shared["y"], device=b.device)
        if b.device == "cuda":                   # warm up on a side stream, as PyTorch asks
            s = b.lib.cuda.Stream()
            s.wait_stream(b.lib.cuda.current_stream())
        for _ in range(warmup):
            opt.zero_grad(set_to_none=True)
            b.F.cross_entropy(net(xs), ys).backward()
            opt.step()
        if b.device == "cuda":
            b.lib.cuda.current_stream().wait_stream(s)
            g, ctx = b.lib.cuda.CUDAGraph(), b.lib.cuda.graph
        else:
            g, ctx = b.lib.Graph(), b.lib.graph
        opt.zero_grad(set_to_none=True)
        with ctx(g):
            b.F.cross_entropy(net(xs), ys).backward()
            opt.step()
        def replay():
            g.replay()
        replay.model, replay.static = net, (xs, ys)  # the graph reads them: keep them
        return replay

    return Case(f"{model} train step captured", "train step (graph)",
                f"{eager.shape} (torch cpu: eager)", setup)


def _amp_step_case(model, batch):
    """The training step under automatic mixed precision, as a PyTorch user writes it:
    autocast (bfloat16 on the CPU, float16 on cuda) around forward and loss, and on cuda a
    GradScaler around backward and step; the same weights and data as the float32 step
    (its row is "<model> train step"), PyTorch running its own autocast step beside it."""
    eager = _step_case(model, batch)

    def setup(b, shared):
        net = eager.setup(b, shared).model
        low = getattr(b.lib, "bfloat16" if b.device == "cpu" else "float16")
        opt = b.optim.SGD(net.parameters(), lr=0.01, momentum=0.9)
        scaler = b.lib.amp.GradScaler(b.device, enabled=b.device != "cpu")
        x = b.tensor(shared["x"])
        y = b.lib.tensor(shared["y"], device=b.device)

        def step():
            opt.zero_grad()
            with b.lib.autocast(b.device, dtype=low):
                loss = b.F.cross_entropy(net(x), y)
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
        step.model = net
        return step

    return Case(f"amp {model} train step", "train step (amp)",
                f"{eager.shape} bf16 cpu / fp16 cuda", setup)


def cases(quick=False):
    """The benchmark cases: small shapes when ``quick``, the zoo models' shapes otherwise."""
    if quick:
        return ([_step_case(m, 16) for m in ("lenet", "mnist-cnn", "resnet-small", "tiny-mlp")]
                + [_graph_step_case(m, 16) for m in ("lenet", "tiny-mlp")]
                + [_amp_step_case("lenet", 16)]
                + _conv("3x3", 8, 16, 16, 16, 3, padding=1) + _pool("2x2", 8, 16, 16)
                + _other_ops(8, 16, 16, 128, (64, 10)))
    n = 64
    return ([_step_case(m, n) for m in STEP_MODELS]
            + [_graph_step_case(m, n) for m in STEP_MODELS]
            + [_amp_step_case(m, n) for m in ("lenet", "mnist-cnn", "resnet-small")]
            # the convolutions and pools of the models above, at batch 64
            + _conv("mnist conv1", n, 1, 28, 32, 3) + _conv("mnist conv2", n, 32, 26, 64, 3)
            + _conv("lenet conv1", n, 1, 28, 6, 5, padding=2)
            + _conv("lenet conv2", n, 6, 14, 16, 5)
            + _conv("resnet stage1 3x3", n, 16, 32, 16, 3, padding=1)
            + _conv("resnet stage2 3x3/2", n, 16, 32, 32, 3, stride=2, padding=1)
            + _conv("resnet stage2 3x3", n, 32, 16, 32, 3, padding=1)
            + _conv("resnet stage3 3x3", n, 64, 8, 64, 3, padding=1)
            + _conv("resnet stage3 1x1/2", n, 32, 16, 64, 1, stride=2)
            + _pool("mnist", n, 64, 24) + _pool("lenet-shape 1", n, 6, 28)
            + _pool("lenet-shape 2", n, 16, 10)
            + _other_ops(n, 64, 32, 1024, (1024, 1000)))


# ---- timing -----------------------------------------------------------------------------
def _summary(times):
    ms = np.asarray(times) * 1e3
    q75, q25 = np.percentile(ms, [75, 25])
    return {"times_ms": [round(float(t), 4) for t in ms],
            "min_ms": round(float(ms.min()), 4),
            "median_ms": round(float(statistics.median(ms.tolist())), 4),
            "iqr_ms": round(float(q75 - q25), 4)}


# ---- runners: a backend in this process or in a worker process ---------------------------
def _backend_info(b):
    info = {"label": b.label, "emulated": b.emulated, "version": b.lib.__version__}
    if b.framework == "torch":
        info["threads"] = b.lib.get_num_threads()
    else:
        info["cpu_extension"] = b.lib.runtime._C is not None
    return info


class _Served:
    """The state a runner keeps for one backend: the current case's callable."""

    def __init__(self, framework, device, quick):
        if framework == "torch" and device == "cuda":
            import torch
            if not torch.cuda.is_available():
                raise _Unavailable("this PyTorch build has no CUDA")
        self.backend = Backend(framework, device)
        self.cases = {c.name: c for c in cases(quick)}
        self.fn = None

    def handle(self, cmd, *args):
        b = self.backend
        if cmd == "info":
            return _backend_info(b)
        if cmd == "setup":                      # (case name, shared) -> shared
            name, shared = args
            self.fn = self.cases[name].setup(b, shared)
            return shared
        if cmd == "time":                       # (calls,) -> seconds of each call
            out = []
            for _ in range(args[0]):
                # a pause first: the other framework's worker, which just ran its step, has
                # OpenMP threads that spin for a while before they sleep; they would take
                # the cores from this step. Then one untimed call, so the timed one runs
                # warm, as steps do back to back in training (both frameworks alike)
                time.sleep(STEP_PAUSE_S)
                self.fn()
                b.sync()
                t0 = time.perf_counter()
                self.fn()
                b.sync()
                out.append(time.perf_counter() - t0)
            return out
        if cmd == "profile":
            return profile_step(self.fn)
        raise ValueError(f"unknown request {cmd!r}")


class _Unavailable(Exception):
    pass


class _InProcess:
    """A backend run in this process (quick to start; frameworks share the process)."""

    def __init__(self, framework, device, quick):
        self.served = _Served(framework, device, quick)

    def ask(self, cmd, *args):
        return self.served.handle(cmd, *args)

    def close(self):
        pass


STEP_PAUSE_S = 0.005   # before each timed call in a worker (and an untimed call: see
                       # _Served.handle "time")


def _worker_main(conn, framework, device, quick):
    """A worker process serving one backend until told to quit."""
    try:
        served = _Served(framework, device, quick)
    except _Unavailable as e:
        conn.send(("unavailable", str(e)))
        return
    except Exception:  # noqa: BLE001  (any failure goes back to the main process)
        import traceback
        conn.send(("error", traceback.format_exc()))
        return
    conn.send(("ok", None))
    while True:
        msg = conn.recv()
        if msg[0] == "quit":
            return
        try:
            conn.send(("ok", served.handle(*msg)))
        except Exception:  # noqa: BLE001  (reported, and the worker keeps serving)
            import traceback
            conn.send(("error", traceback.format_exc()))


class _Worker:
    """A backend in its own (spawned) process. Each framework brings its own OpenMP runtime:
    in one process, the threads of one spin after its parallel regions while the other
    computes, and both slow down; in separate processes each only competes for the cores."""

    def __init__(self, framework, device, quick):
        import multiprocessing as mp
        ctx = mp.get_context("spawn")
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=_worker_main, args=(child, framework, device, quick),
                                daemon=True)
        self.proc.start()
        child.close()
        self.name = f"{framework} {device}"
        status, payload = self._recv()
        if status == "unavailable":
            self.close()
            raise _Unavailable(payload)

    def _recv(self):
        try:
            status, payload = self.conn.recv()
        except EOFError:
            raise RuntimeError(f"the {self.name} benchmark worker died (exit code "
                               f"{self.proc.exitcode})") from None
        if status == "error":
            raise RuntimeError(f"in the {self.name} benchmark worker:\n{payload}")
        return status, payload

    def ask(self, cmd, *args):
        self.conn.send((cmd, *args))
        return self._recv()[1]

    def close(self):
        if self.proc.is_alive():
            try:
                self.conn.send(("quit",))
            except (BrokenPipeError, OSError):
                pass
            self.proc.join(10)
            if self.proc.is_alive():
                self.proc.terminate()


def backend_specs(devices, torch=True):
    """(framework, device) pairs: gpudiff on each device, then PyTorch where it is installed
    (its CUDA only when its build has CUDA: checked by the runner)."""
    specs = [("gpudiff", d) for d in devices]
    if torch and importlib.util.find_spec("torch") is not None:
        specs += [("torch", d) for d in devices]
    return specs


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
    if not devs:
        raise BenchError("--device: no device given (use cpu, cuda or cpu,cuda)")
    if "cuda" in devs and not gpudiff.cuda.is_available():
        raise BenchError("--device cuda: CUDA is not available here (no NVIDIA GPU or no CuPy); "
                         "use --device cpu, or set GPUDIFF_CUDA=emulate for the CUDA emulator")
    return list(dict.fromkeys(devs))


def select(all_cases, only):
    """The cases whose name starts with one of ``only`` (all when None)."""
    if only is None:
        return list(all_cases)
    chosen = [c for c in all_cases if any(c.name.startswith(p) for p in only)]
    if not chosen:
        raise BenchError(f"--only {','.join(only)}: no case matches (cases: "
                         f"{', '.join(c.name for c in all_cases)})")
    return chosen


def run(quick=False, devices=("cpu",), torch=True, repeat=None, warmup=None, only=None,
        log=None, profile=False, op_repeat=None, isolate=True, info=None):
    """Run the cases on every backend; returns one dict per (case, backend).

    repeat: timed rounds per training step (default 5 quick, 20 full); op_repeat: per op
    case (default: repeat). only: case-name prefixes to keep (None: all). profile: also
    cProfile one gpudiff CPU training step per model (key "profile" of that result).
    isolate: run each backend in its own worker process (the default; False runs them all
    in this process). info: a dict that receives each backend's versions and settings.
    """
    selected = select(cases(quick), only)
    repeat = repeat or (5 if quick else 20)
    op_repeat = op_repeat or repeat
    warmup = (1 if quick else 3) if warmup is None else warmup
    make = _Worker if isolate else _InProcess
    runners, labels = [], []
    results = []
    try:
        for fw, dev in backend_specs(devices, torch):
            try:
                r = make(fw, dev, quick)
            except _Unavailable as e:
                if log is not None:
                    log(f"  ({fw} {dev} skipped: {e})")
                continue
            runners.append(r)
            binfo = r.ask("info")
            labels.append(binfo["label"])
            if info is not None:
                info[binfo["label"]] = binfo
        emulated = {lab: "emulated" in lab for lab in labels}
        for case in selected:
            shared = {}
            for r in runners:    # the first one draws the data and weights, the rest copy them
                shared = r.ask("setup", case.name, shared)
            n = repeat if case.kind.startswith("train step") else op_repeat
            for r in runners:
                r.ask("time", warmup)
            times = [[] for _ in runners]
            for k in range(n):   # rounds: each backend once, the order rotating
                for j in range(len(runners)):
                    i = (j + k) % len(runners)
                    times[i] += runners[i].ask("time", 1)
            for r, lab, t in zip(runners, labels, times):
                fw, dev = lab.split()[:2]
                res = {"case": case.name, "kind": case.kind, "shape": case.shape,
                       "backend": lab, "framework": fw, "device": dev,
                       "emulated": emulated[lab], "repeat": n, "warmup": warmup,
                       **_summary(t)}
                if "eval_loss" in shared:
                    res["eval_loss"] = shared["eval_loss"][lab]
                if profile and case.kind == "train step" and lab == "gpudiff cpu":
                    res["profile"], text = r.ask("profile")
                    if log is not None:
                        log(f"-- cProfile of one gpudiff {case.name} --\n{text}")
                results.append(res)
                if log is not None:
                    log(f"  {case.name:<34} {lab:<24} median {res['median_ms']:10.3f} ms  "
                        f"min {res['min_ms']:10.3f} ms")
            losses = shared.get("eval_loss", {})
            if len(losses) > 1 and log is not None and max(losses.values()) - \
                    min(losses.values()) > 1e-3 * max(1.0, abs(min(losses.values()))):
                log(f"  warning: {case.name}: the backends disagree on the eval loss {losses}")
    finally:
        for r in runners:
            r.close()
    return results


def profile_step(step, top=25):
    """cProfile of one call of ``step``: (summary dict, text of the top functions)."""
    step()
    prof = cProfile.Profile()
    prof.enable()
    step()
    prof.disable()
    s = io.StringIO()
    stats = pstats.Stats(prof, stream=s)
    stats.sort_stats("tottime").print_stats(top)
    total = sum(v[2] for v in stats.stats.values())
    rows = []
    for (file, line, fn), (_, nc, tt, _, _) in sorted(stats.stats.items(),
                                                     key=lambda kv: -kv[1][2])[:top]:
        rows.append({"function": f"{os.path.basename(file)}:{line}({fn})", "calls": nc,
                     "tottime_ms": round(tt * 1e3, 3), "share": round(tt / max(total, 1e-12), 3)})
    return {"total_ms": round(total * 1e3, 3), "top": rows}, s.getvalue()


# ---- reporting ----------------------------------------------------------------------------
def machine_info():
    """The machine the numbers come from: CPU model, GPU name, versions, load, date."""
    import gpudiff
    info = {
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "cpu": cpu_model(), "cpu_count": os.cpu_count(), "platform": platform.platform(),
        "python": platform.python_version(), "numpy": np.__version__,
        "gpudiff": gpudiff.__version__, "cpu_extension": gpudiff.runtime._C is not None,
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
        "gpu": None, "gpu_emulated": False,
        "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
    }
    if gpudiff.cuda.is_available():
        info["gpu_emulated"] = gpudiff.cuda.is_emulated()
        info["gpu"] = gpudiff.cuda.get_device_name()
    return info


def _columns(results):
    return list(dict.fromkeys(r["backend"] for r in results))


def ratio_columns(results):
    """(title, numerator backend, denominator backend) for the ratios these results allow."""
    cols = _columns(results)
    out = []
    for dev in ("cpu", "cuda"):
        g, t = f"gpudiff {dev}", f"torch {dev}"
        if g in cols and t in cols:
            out.append((f"gpudiff/torch {dev}", g, t))
    if "gpudiff cpu" in cols and "gpudiff cuda" in cols:   # never the emulator
        out.append(("gpu speedup (cpu/cuda)", "gpudiff cpu", "gpudiff cuda"))
    return out


def ratios(results):
    """{case: {ratio title: median ratio}} (a ratio > 1 means the numerator is slower)."""
    by = {(r["case"], r["backend"]): r for r in results}
    out = {}
    for case in dict.fromkeys(r["case"] for r in results):
        row = {}
        for title, num, den in ratio_columns(results):
            a, b = by.get((case, num)), by.get((case, den))
            if a is not None and b is not None and b["median_ms"] > 0:
                row[title] = round(a["median_ms"] / b["median_ms"], 3)
        out[case] = row
    return out


def table(results):
    """The results as a text table: median (min) ms per backend, and the ratios that apply."""
    from tabulate import tabulate
    by = {(r["case"], r["backend"]): r for r in results}
    cols = _columns(results)
    rcols = ratio_columns(results)
    rs = ratios(results)
    headers = ["case", "shape"] + [f"{c}\nmedian (min) ms" for c in cols] + \
        [t.replace(" (", "\n(") for t, _, _ in rcols]
    rows = []
    for case in dict.fromkeys(r["case"] for r in results):
        first = by[(case, cols[0])] if (case, cols[0]) in by else \
            next(r for r in results if r["case"] == case)
        row = [case, first["shape"]]
        for c in cols:
            r = by.get((case, c))
            row.append("" if r is None else f"{r['median_ms']:.3f} ({r['min_ms']:.3f})")
        for title, _, _ in rcols:
            v = rs[case].get(title)
            row.append("" if v is None else f"{v:.2f}x")
        rows.append(row)
    return tabulate(rows, headers=headers, tablefmt="simple", disable_numparse=True)


def write_json(path, results, settings, machine=None, dispatch=None):
    doc = {"benchmark": "gpudiff.benchmark", "machine": machine or machine_info(),
           "settings": settings, "results": results, "ratios": ratios(results)}
    if dispatch is not None:
        doc["dispatch"] = dispatch
    with open(path, "w") as f:
        json.dump(doc, f, indent=1)
        f.write("\n")
    return doc


def plot(path, results, title="gpudiff bench"):
    """Horizontal bars: median time per case and backend (log scale, emulated ones hatched)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    names = list(dict.fromkeys(r["case"] for r in results))
    cols = _columns(results)
    by = {(r["case"], r["backend"]): r["median_ms"] for r in results}
    fig = Figure(figsize=(10, 1.5 + 0.22 * len(names) * max(2, len(cols))), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    height = 0.8 / max(1, len(cols))
    ys = np.arange(len(names))
    for k, c in enumerate(cols):
        vals = [by.get((n, c), np.nan) for n in names]
        ax.barh(ys + k * height, vals, height, label=c, hatch="//" if "emulated" in c else None)
    ax.set_yticks(ys + height * (len(cols) - 1) / 2, names, fontsize="small")
    ax.invert_yaxis()
    ax.set_xscale("log")
    ax.set_xlabel("median time per call, ms (log scale; shorter is faster)")
    ax.set_title(title, fontsize="medium")
    ax.grid(axis="x", alpha=0.3, which="both")
    ax.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(path)


def run_cli(quick=False, devices=None, out=None, torch=True, repeat=None, log=print,
            only=None, warmup=None, profile=False, json_name="bench.json",
            png_name="bench.png", op_repeat=None, source="gpudiff bench", isolate=True,
            dispatch=True):
    """``gpudiff bench``: run, print the table, write the JSON and the PNG into ``out``;
    ``dispatch``: also the per-op dispatch table (dispatch_table)."""
    devs = parse_devices(devices)
    if torch and importlib.util.find_spec("torch") is None:
        log("PyTorch is not installed: timing gpudiff only (pip install torch to compare)")
        torch = False
    select(cases(quick), only)       # a bad --only fails before anything runs
    out = out or default_out_dir(prefix="bench-")
    try:
        os.makedirs(out, exist_ok=True)
    except OSError as e:
        raise BenchError(f"--out {out}: cannot create the directory ({e.strerror})") from None
    m = machine_info()
    gpu = "none" if m["gpu"] is None else m["gpu"]
    log(f"{source}{' --quick' if quick else ''} | cpu: {m['cpu']} ({m['cpu_count']} "
        f"threads) | gpu: {gpu} | devices: {','.join(devs)}"
        f"{'' if torch else ' | PyTorch not compared'}")
    if "cuda" in devs and m["gpu_emulated"]:
        log("note: cuda is the CPU emulator (GPUDIFF_CUDA=emulate): its times are labelled "
            "'emulated' and say nothing about GPU speed")
    t0 = time.perf_counter()
    binfo = {}
    results = run(quick=quick, devices=devs, torch=torch, repeat=repeat, warmup=warmup,
                  only=only, log=log, profile=profile, op_repeat=op_repeat, isolate=isolate,
                  info=binfo)
    m["backends"] = binfo
    tinfo = next((v for k, v in binfo.items() if k.startswith("torch")), None)
    m["torch"] = None if tinfo is None else tinfo["version"]
    m["torch_threads"] = None if tinfo is None else tinfo.get("threads")
    m["load_average_after"] = list(os.getloadavg()) if hasattr(os, "getloadavg") else None
    settings = {"source": source, "quick": quick, "devices": devs, "torch": torch,
                "only": only, "repeat": repeat or (5 if quick else 20),
                "op_repeat": op_repeat or repeat or (5 if quick else 20),
                "warmup": results[0]["warmup"],
                "isolated": isolate,
                "timing": "wall clock per call, device synchronised; each backend in its own "
                          "process, taking turns; min, median and IQR over the repeats"}
    drows = dispatch_table(devs, torch) if dispatch else None
    write_json(os.path.join(out, json_name), results, settings, m, drows)
    plot(os.path.join(out, png_name), results, title=f"gpudiff bench: {m['cpu']}; gpu: {gpu}"
         f"{' (emulated)' if m['gpu_emulated'] else ''}; {m['date'][:10]}")
    log("")
    log(table(results))
    if drows:
        log("")
        log("per-op dispatch cost, microseconds per call (ops on 4x8 tensors; emulated cuda: "
            "apply() time outside the forward, by gpudiff.profiler, so no emulator kernel time)")
        log(dispatch_text(drows))
    log("")
    log(f"{len(results)} timings in {time.perf_counter() - t0:.1f}s; wrote {json_name} and "
        f"{png_name} to {out}")
    return 0


# ---- per-op dispatch cost ----------------------------------------------------------------------
# What one op costs beyond its arithmetic: ops on (4, 8) float32 tensors, whose kernels take
# well under a microsecond. On the CPU that is the wall time per call (min over rounds of
# DISPATCH_CALLS calls); on the emulated cuda device, whose kernels run on the CPU emulator,
# the kernel time is excluded by measuring with gpudiff.profiler: an op's dispatch is its
# apply() time outside its forward (the kernel launch or reference), summed over the ops of
# the call (for "linear fwd+bwd": the forward op and the backward node's own time).
# gpudiff on the CPU and PyTorch are timed in alternating rounds (the machine's load then
# hits both alike); each row has the min and the median over the rounds of the per-call time.
DISPATCH_CALLS = 2000
DISPATCH_ROUNDS = 9
DISPATCH_CASES = ("x * 1.0", "relu", "linear fwd+bwd")


def _dispatch_call(lib, F, name, grad, device):
    rng = np.random.default_rng(0)
    x = lib.tensor(rng.standard_normal((4, 8)).astype(np.float32), device=device)
    w = lib.tensor(rng.standard_normal((8, 8)).astype(np.float32), device=device)
    b = lib.tensor(rng.standard_normal(8).astype(np.float32), device=device)
    if grad:
        for t in (x, w, b):
            t.requires_grad_()
    if name == "x * 1.0":
        return lambda: x * 1.0
    if name == "relu":
        return lambda: F.relu(x)

    def linear():
        y = F.linear(x, w, b)
        if grad:
            y.sum().backward()
    return linear


def _rounds_us(fns, calls=None, rounds=None):
    """Per-call microseconds of each of ``fns``, timed in alternating rounds: a list per fn."""
    calls = calls or DISPATCH_CALLS
    rounds = rounds or DISPATCH_ROUNDS
    for fn in fns:
        fn()
    times = [[] for _ in fns]
    for _ in range(rounds):
        for fn, ts in zip(fns, times):
            t0 = time.perf_counter()
            for _ in range(calls):
                fn()
            ts.append((time.perf_counter() - t0) / calls * 1e6)
    return times


def _emulated_dispatch_us(fn, calls=200):
    """Per call: the ops' time outside their forwards, and backward nodes' time outside the
    ops they run (gpudiff.profiler), so the emulator's kernel time does not count."""
    import gpudiff.profiler as P
    fn()
    with P.profile() as prof:
        for _ in range(calls):
            fn()
    total = 0.0
    for r in prof.key_averages():
        if r.key.endswith("Backward0") or r.key.endswith("Backward"):
            total += r.self_cpu_time_total
        else:
            total += r.dispatch_time_total
    return total / calls


def dispatch_table(devices=("cpu",), torch=True, log=None):
    """Rows {case, grad, framework, device, us}: the per-op dispatch costs (see above)."""
    import gpudiff
    import gpudiff.nn.functional as gF
    rows = []
    libs = [("gpudiff", gpudiff, gF, d) for d in devices]
    if torch and importlib.util.find_spec("torch") is not None:
        import torch as tlib
        import torch.nn.functional as tF
        tlib.set_num_threads(1)   # tiny tensors: one thread, as PyTorch runs them anyway
        libs.append(("torch", tlib, tF, "cpu"))
    for case in DISPATCH_CASES:
        for grad in ((True,) if case == "linear fwd+bwd" else (False, True)):
            timed, fns = [], []       # wall-clock rows: timed together, alternating
            for fw, lib, F, dev in libs:
                emulated = fw == "gpudiff" and dev == "cuda" and gpudiff.cuda.is_emulated()
                fn = _dispatch_call(lib, F, case, grad, dev)
                row = {"case": case, "grad": grad, "framework": fw,
                       "device": dev + (" (emulated)" if emulated else "")}
                if emulated:
                    us = _emulated_dispatch_us(fn)
                    row.update(us=round(us, 3), median_us=round(us, 3),
                               measured="profiler: apply time outside forward")
                    rows.append(row)
                    continue
                if not grad:
                    def fn(inner=fn, lib=lib):
                        with lib.no_grad():
                            inner()
                timed.append(row)
                fns.append(fn)
                rows.append(row)
            for row, ts in zip(timed, _rounds_us(fns)):
                row.update(us=round(min(ts), 3), median_us=round(float(np.median(ts)), 3),
                           measured=f"wall time per call, min / median of {len(ts)} rounds "
                                    f"alternating with the other frameworks")
            if log is not None:
                for row in rows[-len(libs):]:
                    log(f"  dispatch {case:<15} {'grad' if grad else 'no grad':<8} "
                        f"{row['framework']} {row['device']:<16} {row['us']:8.2f} us (median "
                        f"{row['median_us']:.2f})")
    return rows


def dispatch_text(rows):
    """The dispatch rows as a table: gpudiff per device next to PyTorch CPU, and the ratio."""
    from tabulate import tabulate
    keys = list(dict.fromkeys((r["case"], r["grad"]) for r in rows))
    cols = list(dict.fromkeys(f"{r['framework']} {r['device']}" for r in rows))
    by = {(r["case"], r["grad"], f"{r['framework']} {r['device']}"): r for r in rows}
    body = []
    for case, grad in keys:
        line = [case, "yes" if grad else "no"]
        for c in cols:
            r = by.get((case, grad, c))
            line.append("" if r is None else f"{r['us']:.2f} / {r.get('median_us', r['us']):.2f}")
        g, t = by.get((case, grad, "gpudiff cpu")), by.get((case, grad, "torch cpu"))
        line.append(f"{g['us'] / t['us']:.2f}x / {g['median_us'] / t['median_us']:.2f}x"
                    if g and t else "")
        body.append(line)
    return tabulate(body, ["op", "grad"] + [c + " us (min / median)" for c in cols]
                    + ["gpudiff/torch cpu (min / median)"])


# ---- gpudiff bench --distributed -----------------------------------------------------------
# ``gpudiff bench --distributed`` (and bench/bench_distributed.py): all-reduce bandwidth by
# message size against this machine's memcpy bandwidth, and training-step scaling of the MNIST
# example net from 1 to N ranks (each rank 1 thread unless OMP_NUM_THREADS says otherwise,
# the same per-rank batch: weak scaling).
# 
# Bandwidths: algbw = message bytes / time; busbw = algbw * 2 (N - 1) / N (NCCL's convention:
# the bytes each rank must send and receive in a ring all-reduce, so busbw is comparable with
# a link's or memcpy's bandwidth). memcpy: numpy.copyto of the same number of bytes, one
# thread.
DIST_SIZES = [4 << 10, 64 << 10, 256 << 10, 1 << 20, 4 << 20, 25 << 20, 100 << 20]


def _dist_median_time(fn, reps, warmup=2, sync=None):
    for _ in range(warmup):
        fn()
    ts = []
    for _ in range(reps):
        if sync is not None:
            sync()
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return float(np.median(ts)), float(min(ts))


def memcpy_bandwidth(nbytes=25 << 20, reps=20):
    a = np.ones(nbytes // 4, np.float32)
    b = np.empty_like(a)
    med, best = _dist_median_time(lambda: np.copyto(b, a), reps)
    return {"bytes": nbytes, "median_s": med, "GBps": nbytes / med / 1e9,
            "best_GBps": nbytes / best / 1e9}


def _dist_worker_allreduce(sizes, reps):
    """Each size through three paths: "auto" (what all_reduce picks), "mpi" (MPI's Allreduce)
    and "shm" (the shared-memory window, docs/DISTRIBUTED.md), interleaved per size so the
    machine's load hits them alike; and from the window's threshold up a fourth, "bucket":
    DDP's gradient bucket, which lives in shared memory and is reduced in place (sum, then
    1/N, as DDP does)."""
    from mpi4py import MPI

    import gpudiff
    import gpudiff.distributed as dist
    from gpudiff.distributed import distributed_c10d as c10d
    dist.init_process_group("mpi")
    pg = c10d._get_pg()
    shm, shm_min = pg.shm, pg.shm_min_bytes
    n = dist.get_world_size()
    rows = []
    for nbytes in sizes:
        t = gpudiff.zeros(nbytes // 4)    # zeros: repeated sums stay finite
        r = max(3, min(reps, int(2e8 // max(nbytes, 1))))
        row = {"bytes": nbytes, "reps": r}
        for path in ("auto", "mpi", "shm"):
            if path == "shm" and shm is None:
                continue
            pg.shm = None if path == "mpi" else shm
            pg.shm_min_bytes = 0 if path == "shm" else shm_min
            med, _ = _dist_median_time(lambda t=t: dist.all_reduce(t), r,
                                       sync=MPI.COMM_WORLD.Barrier)
            # the slowest rank's time is the collective's
            med = MPI.COMM_WORLD.allreduce(med, op=MPI.MAX)
            alg = nbytes / med / 1e9
            pre = "" if path == "auto" else path + "_"
            row.update({pre + "median_s": med, pre + "algbw_GBps": alg,
                        pre + "busbw_GBps": alg * 2 * (n - 1) / n})
        pg.shm, pg.shm_min_bytes = shm, shm_min
        if shm is not None and nbytes >= shm_min:
            buf = shm.alloc(nbytes // 4, np.float32)
            med, _ = _dist_median_time(
                lambda: shm.allreduce_shared(buf, "sum", scale=1.0 / n), r,
                sync=MPI.COMM_WORLD.Barrier)
            med = MPI.COMM_WORLD.allreduce(med, op=MPI.MAX)
            alg = nbytes / med / 1e9
            row.update({"bucket_median_s": med, "bucket_algbw_GBps": alg,
                        "bucket_busbw_GBps": alg * 2 * (n - 1) / n})
        row["path"] = "shm" if shm is not None and nbytes >= shm_min else "mpi"
        rows.append(row)
    return {"world_size": n, "allreduce": rows, "shm_min_bytes": shm_min,
            "shm_chunk_bytes": shm.chunk_bytes if shm is not None else None}


def _dist_worker_step(steps, batch):
    from mpi4py import MPI

    import gpudiff
    import gpudiff.distributed as dist
    from gpudiff import models
    from gpudiff.nn import functional as F
    from gpudiff.nn.parallel import DistributedDataParallel
    dist.init_process_group("mpi")
    n, rank = dist.get_world_size(), dist.get_rank()
    gpudiff.manual_seed(0)
    model = models.create_model("mnist-cnn", 1, 28, 10)
    net = DistributedDataParallel(model) if n > 1 else model
    opt = gpudiff.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    rng = np.random.default_rng(rank)
    x = gpudiff.tensor(rng.standard_normal((batch, 1, 28, 28)).astype(np.float32))
    y = gpudiff.tensor(rng.integers(0, 10, batch))

    def step():
        opt.zero_grad()
        F.cross_entropy(net(x), y).backward()
        opt.step()
    med, _ = _dist_median_time(step, steps, warmup=3, sync=MPI.COMM_WORLD.Barrier)
    med = MPI.COMM_WORLD.allreduce(med, op=MPI.MAX)
    return {"world_size": n, "per_rank_batch": batch, "median_step_s": med,
            "images_per_s": n * batch / med,
            "params": int(sum(p.numel() for p in model.parameters())),
            "threads_per_rank": os.environ.get("OMP_NUM_THREADS")}


def _dist_run_ranks(n, args, timeout=900):
    from .distributed.launch import mpiexec_command, rank_env
    env = rank_env(n)
    env["OMP_NUM_THREADS"] = env["OPENBLAS_NUM_THREADS"] = "1"
    env["MKL_NUM_THREADS"] = "1"
    cmd = mpiexec_command(n, [sys.executable, "-m", "gpudiff.benchmark"] + args)
    p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout,
                       check=False)
    if p.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{p.stdout}\n{p.stderr}")
    line = [ln for ln in p.stdout.splitlines() if ln.startswith("{")][-1]
    return json.loads(line)


def run_distributed(nproc=2, quick=False, log=print):
    """Measure and return the results dict (see the module doc)."""
    sizes = DIST_SIZES[:6] if quick else DIST_SIZES
    steps = 5 if quick else 20
    res = {"machine": f"{cpu_model()}, {os.cpu_count()} cores", "nproc": nproc,
           "time": time.strftime("%Y-%m-%d %H:%M:%S"), "memcpy": memcpy_bandwidth(),
           "memcpy_100MiB": memcpy_bandwidth(100 << 20, reps=10)}
    log(f"machine: {res['machine']}")
    log(f"memcpy (numpy.copyto, 1 thread): 25 MiB {res['memcpy']['GBps']:.2f} GB/s, 100 MiB "
        f"{res['memcpy_100MiB']['GBps']:.2f} GB/s")
    ar = _dist_run_ranks(nproc, ["--worker", "allreduce", "--sizes",
                            ",".join(map(str, sizes))])
    res["allreduce"] = ar["allreduce"]
    res["shm_min_bytes"], res["shm_chunk_bytes"] = ar["shm_min_bytes"], ar["shm_chunk_bytes"]
    mc = res["memcpy"]["GBps"]
    log(f"all_reduce, {nproc} ranks on this node; busbw GB/s (% of memcpy) by path: all_reduce's"
        f" choice (shared-memory window from {ar['shm_min_bytes']:,} bytes), MPI's Allreduce, "
        f"the window forced; DDP's bucket in shared memory, reduced in place:")
    log(f"  {'bytes':>12} {'time ms':>9} {'all_reduce':>16} {'MPI':>16} {'window':>16} "
        f"{'DDP bucket':>16}")
    for r in ar["allreduce"]:
        cells = []
        for pre in ("", "mpi_", "shm_", "bucket_"):
            if pre + "busbw_GBps" in r:
                r[pre + "busbw_over_memcpy"] = r[pre + "busbw_GBps"] / mc
                cells.append(f"{r[pre + 'busbw_GBps']:.2f} ({r[pre + 'busbw_over_memcpy']:.0%})")
            else:
                cells.append("-")
        log(f"  {r['bytes']:>12,} {1e3 * r['median_s']:>9.3f} {cells[0]:>16} {cells[1]:>16} "
            f"{cells[2]:>16} {cells[3]:>16}")
    one = _dist_run_ranks(1, ["--worker", "step", "--steps", str(steps)])
    many = _dist_run_ranks(nproc, ["--worker", "step", "--steps", str(steps)])
    res["step"] = {"1": one, str(nproc): many,
                   "speedup": many["images_per_s"] / one["images_per_s"]}
    log(f"MNIST example net ({one['params']:,} parameters), batch 64 per rank, 1 thread per "
        f"rank: 1 rank {one['images_per_s']:.0f} img/s ({1e3 * one['median_step_s']:.1f} "
        f"ms/step), {nproc} ranks {many['images_per_s']:.0f} img/s "
        f"({1e3 * many['median_step_s']:.1f} ms/step): {res['step']['speedup']:.2f}x")
    return res


def _dist_worker_main(argv):
    import argparse
    p = argparse.ArgumentParser()
    p.add_argument("--worker", choices=["allreduce", "step"], required=True)
    p.add_argument("--sizes", default=",".join(map(str, DIST_SIZES)))
    p.add_argument("--reps", type=int, default=20)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--batch", type=int, default=64)
    a = p.parse_args(argv)
    if a.worker == "allreduce":
        out = _dist_worker_allreduce([int(s) for s in a.sizes.split(",")], a.reps)
    else:
        out = _dist_worker_step(a.steps, a.batch)
    import gpudiff.distributed as dist
    if dist.get_rank() == 0:
        print(json.dumps(out), flush=True)


if __name__ == "__main__":   # the ranks of run_distributed: python -m gpudiff.benchmark --worker
    _dist_worker_main(sys.argv[1:])
