"""CPU training-step benchmark: gpudiff against PyTorch CPU, in one process, interleaved.

    python bench/bench_cpu.py                  # all models + per-op timings, JSON to bench/results/
    python bench/bench_cpu.py --models mnist --reps 30
    python bench/bench_cpu.py --profile        # also cProfile one gpudiff step per model

Models (batch 64, SGD with momentum 0.9, the same initial weights in both frameworks):
  mnist    PyTorch's MNIST example Net: conv 1->32 3x3, relu, conv 32->64 3x3, relu,
           maxpool 2, dropout 0.25, fc 9216->128, relu, dropout 0.5, fc 128->10,
           log_softmax + nll_loss; 1x28x28 input
  lenet    LeNet-5 with sigmoid activations and average pooling (the d2l.ai version):
           conv 1->6 5x5 pad 2, sigmoid, avgpool 2, conv 6->16 5x5, sigmoid, avgpool 2,
           fc 400->120->84->10 with sigmoids, cross_entropy; 1x28x28 input
  resnet   CIFAR ResNet-20 (He et al. 2016, section 4.2): conv 3->16, three stages of 3
           basic blocks (16, 32, 64 channels; BatchNorm; 1x1 conv + BN projection where the
           shape changes), global average pool, fc 64->10, cross_entropy; 3x32x32 input

A step is zero_grad, forward, loss, backward, optimizer step. Each framework runs in its
own worker process (PyTorch's OpenMP threads and ours would otherwise spin against each
other on the same cores after every parallel region); the main process makes them take
turns, one gpudiff step then one PyTorch step (alternating which goes first), so both see
the same machine load. We report the median and the minimum over repetitions and the
ratio gpudiff / PyTorch of each. Per-op rows time conv2d and max_pool2d forward and
forward+backward at the shapes of these models the same way.
"""
import argparse
import cProfile
import datetime
import importlib
import io
import json
import multiprocessing as mp
import os
import platform
import pstats
import sys
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))  # run from a checkout without installing

BATCH = 64


# ---- models (one definition, written against either framework) -------------------------
def mnist_net(lib):
    nn, F = lib.nn, lib.nn.functional

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv1 = nn.Conv2d(1, 32, 3, 1)
            self.conv2 = nn.Conv2d(32, 64, 3, 1)
            self.dropout1 = nn.Dropout(0.25)
            self.dropout2 = nn.Dropout(0.5)
            self.fc1 = nn.Linear(9216, 128)
            self.fc2 = nn.Linear(128, 10)

        def forward(self, x):
            x = F.relu(self.conv1(x))
            x = F.relu(self.conv2(x))
            x = F.max_pool2d(x, 2)
            x = self.dropout1(x)
            x = lib.flatten(x, 1)
            x = F.relu(self.fc1(x))
            x = self.dropout2(x)
            return F.log_softmax(self.fc2(x), dim=1)

    return Net(), (1, 28, 28), lambda out, y: F.nll_loss(out, y)


def lenet5(lib):
    nn, F = lib.nn, lib.nn.functional
    net = nn.Sequential(
        nn.Conv2d(1, 6, kernel_size=5, padding=2), nn.Sigmoid(),
        nn.AvgPool2d(kernel_size=2, stride=2),
        nn.Conv2d(6, 16, kernel_size=5), nn.Sigmoid(),
        nn.AvgPool2d(kernel_size=2, stride=2),
        nn.Flatten(),
        nn.Linear(16 * 5 * 5, 120), nn.Sigmoid(),
        nn.Linear(120, 84), nn.Sigmoid(),
        nn.Linear(84, 10))
    return net, (1, 28, 28), lambda out, y: F.cross_entropy(out, y)


def resnet20(lib, blocks=3):
    nn, F = lib.nn, lib.nn.functional

    class BasicBlock(nn.Module):
        def __init__(self, cin, cout, stride):
            super().__init__()
            self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
            self.bn1 = nn.BatchNorm2d(cout)
            self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
            self.bn2 = nn.BatchNorm2d(cout)
            self.shortcut = nn.Sequential()
            if stride != 1 or cin != cout:
                self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False),
                                              nn.BatchNorm2d(cout))

        def forward(self, x):
            out = F.relu(self.bn1(self.conv1(x)))
            out = self.bn2(self.conv2(out))
            return F.relu(out + self.shortcut(x))

    class ResNet(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv1 = nn.Conv2d(3, 16, 3, 1, 1, bias=False)
            self.bn1 = nn.BatchNorm2d(16)
            layers, cin = [], 16
            for cout, stride in ((16, 1), (32, 2), (64, 2)):
                for b in range(blocks):
                    layers.append(BasicBlock(cin, cout, stride if b == 0 else 1))
                    cin = cout
            self.layers = nn.Sequential(*layers)
            self.fc = nn.Linear(64, 10)

        def forward(self, x):
            x = F.relu(self.bn1(self.conv1(x)))
            x = self.layers(x)
            x = F.adaptive_avg_pool2d(x, 1)
            return self.fc(lib.flatten(x, 1))

    return ResNet(), (3, 32, 32), lambda out, y: F.cross_entropy(out, y)


MODELS = {"mnist": mnist_net, "lenet": lenet5, "resnet": resnet20}


# ---- timing ---------------------------------------------------------------------------
class Trainer:
    """One framework's model, data and optimizer; ``step()`` runs one training step."""

    def __init__(self, lib, name, state=None, seed=0):
        lib.manual_seed(seed)
        self.lib = lib
        self.model, in_shape, self.loss_fn = MODELS[name](lib)
        if state is not None:  # the same initial weights as the PyTorch model
            self.model.load_state_dict({k: lib.tensor(v) for k, v in state.items()})
        self.model.train()
        rng = np.random.default_rng(seed)
        self.x = lib.tensor(rng.standard_normal((BATCH,) + in_shape).astype(np.float32))
        self.y = lib.tensor(rng.integers(0, 10, BATCH))
        self.opt = lib.optim.SGD(self.model.parameters(), lr=0.01, momentum=0.9)

    def step(self):
        self.opt.zero_grad()
        loss = self.loss_fn(self.model(self.x), self.y)
        loss.backward()
        self.opt.step()
        return loss


def state_of(model):
    return {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}


def summarize(times_g, times_t):
    g, t = np.array(times_g) * 1e3, np.array(times_t) * 1e3
    return {
        "gpudiff_ms": {"median": round(float(np.median(g)), 3), "min": round(float(g.min()), 3)},
        "torch_ms": {"median": round(float(np.median(t)), 3), "min": round(float(t.min()), 3)},
        "ratio_median": round(float(np.median(g) / np.median(t)), 3),
        "ratio_min": round(float(g.min() / t.min()), 3),
        # spread of the repetitions: how noisy the shared machine was
        "gpudiff_iqr_ms": round(float(np.subtract(*np.percentile(g, [75, 25]))), 3),
        "torch_iqr_ms": round(float(np.subtract(*np.percentile(t, [75, 25]))), 3),
    }


def op_cases():
    """(label, op, input shape, weight shape or None, kwargs) at the models' shapes."""
    return [
        ("mnist conv1", "conv2d", (BATCH, 1, 28, 28), (32, 1, 3, 3), {}),
        ("mnist conv2", "conv2d", (BATCH, 32, 26, 26), (64, 32, 3, 3), {}),
        ("lenet conv1", "conv2d", (BATCH, 1, 28, 28), (6, 1, 5, 5), {"padding": 2}),
        ("lenet conv2", "conv2d", (BATCH, 6, 14, 14), (16, 6, 5, 5), {}),
        ("resnet stage1 3x3", "conv2d", (BATCH, 16, 32, 32), (16, 16, 3, 3), {"padding": 1}),
        ("resnet stage2 3x3/2", "conv2d", (BATCH, 16, 32, 32), (32, 16, 3, 3),
         {"padding": 1, "stride": 2}),
        ("resnet stage2 3x3", "conv2d", (BATCH, 32, 16, 16), (32, 32, 3, 3), {"padding": 1}),
        ("resnet stage3 3x3", "conv2d", (BATCH, 64, 8, 8), (64, 64, 3, 3), {"padding": 1}),
        ("resnet stage3 1x1/2", "conv2d", (BATCH, 32, 16, 16), (64, 32, 1, 1), {"stride": 2}),
        ("mnist maxpool", "max_pool2d", (BATCH, 64, 24, 24), None, {"kernel_size": 2}),
        ("lenet-shape maxpool 1", "max_pool2d", (BATCH, 6, 28, 28), None, {"kernel_size": 2}),
        ("lenet-shape maxpool 2", "max_pool2d", (BATCH, 16, 10, 10), None, {"kernel_size": 2}),
    ]


def make_op(lib, case, seed=0):
    """(forward, forward+backward) closures of one op case on ``lib``'s tensors."""
    label, op, xs, ws, kw = case
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(xs).astype(np.float32)
    w = None if ws is None else (rng.standard_normal(ws) * 0.1).astype(np.float32)
    F = lib.nn.functional
    xt = lib.tensor(x, requires_grad=True)
    wt = None if w is None else lib.tensor(w, requires_grad=True)
    call = (lambda: F.conv2d(xt, wt, **kw)) if op == "conv2d" else \
        (lambda: F.max_pool2d(xt, **kw))
    gy = lib.tensor(rng.standard_normal(tuple(call().shape)).astype(np.float32))

    def fwd():
        with lib.no_grad():
            call()

    def fwd_bwd():
        xt.grad = None
        if wt is not None:
            wt.grad = None
        call().backward(gy)
    return fwd, fwd_bwd


# ---- the worker processes ---------------------------------------------------------------
def worker(conn, fw):
    """Serves one framework ('gpudiff' or 'torch'): builds models and op cases on request and
    answers each 'time' request with the seconds of each call it ran."""
    lib = importlib.import_module(fw)
    fns = {}
    while True:
        msg = conn.recv()
        cmd = msg[0]
        try:
            if cmd == "quit":
                return
            if cmd == "model":              # ("model", name, state or None)
                _, name, state = msg
                tr = Trainer(lib, name, state=state)
                fns = {"step": tr.step}
                # sanity: same weights, same data -> same loss in eval mode (no dropout)
                tr.model.eval()
                with lib.no_grad():
                    loss = float(tr.loss_fn(tr.model(tr.x), tr.y))
                tr.model.train()
                fns["trainer"] = tr
                conn.send(("ok", state_of(tr.model) if state is None else None, loss))
            elif cmd == "op":               # ("op", case)
                fwd, fwd_bwd = make_op(lib, msg[1])
                fns = {"fwd": fwd, "fwd_bwd": fwd_bwd}
                conn.send(("ok",))
            elif cmd == "time":             # ("time", fn, calls)
                fn, out = fns[msg[1]], []
                for _ in range(msg[2]):
                    t0 = time.perf_counter()
                    fn()
                    out.append(time.perf_counter() - t0)
                conn.send(("ok", out))
            elif cmd == "profile":
                conn.send(("ok",) + profile_step(fns["trainer"]))
            elif cmd == "info":
                info = {"version": lib.__version__}
                if fw == "torch":
                    info["threads"] = lib.get_num_threads()
                else:
                    rep = lib.backend.report()
                    info["cpu_extension"] = rep["cpu_extension"]
                    from gpudiff.backend import cpu_kernels
                    info["blas_conv"] = bool(getattr(cpu_kernels, "HAVE_BLAS", False))
                conn.send(("ok", info))
        except Exception as e:  # report, keep serving
            conn.send(("error", f"{type(e).__name__}: {e}"))


class Pair:
    """The two workers; ``turns`` alternates single timed calls between them."""

    def __init__(self):
        ctx = mp.get_context("spawn")
        self.conns, self.procs = {}, {}
        for fw in ("gpudiff", "torch"):
            a, b = ctx.Pipe()
            p = ctx.Process(target=worker, args=(b, fw), daemon=True)
            p.start()
            self.conns[fw], self.procs[fw] = a, p

    def ask(self, fw, *msg):
        self.conns[fw].send(msg)
        reply = self.conns[fw].recv()
        if reply[0] != "ok":
            raise RuntimeError(f"{fw} worker: {reply[1]}")
        return reply[1:]

    def turns(self, fn, reps, warmup):
        for fw in ("gpudiff", "torch"):
            self.ask(fw, "time", fn, warmup)
        got = {"gpudiff": [], "torch": []}
        for r in range(reps):
            order = ("gpudiff", "torch") if r % 2 == 0 else ("torch", "gpudiff")
            for fw in order:
                got[fw] += self.ask(fw, "time", fn, 1)[0]
        return got["gpudiff"], got["torch"]

    def close(self):
        for fw, c in self.conns.items():
            c.send(("quit",))
            self.procs[fw].join(10)


def bench_model(pair, name, reps, warmup, profile=False):
    state, lt = pair.ask("torch", "model", name, None)
    _, lg = pair.ask("gpudiff", "model", name, state)
    out = summarize(*pair.turns("step", reps, warmup))
    out["eval_loss"] = {"gpudiff": round(lg, 6), "torch": round(lt, 6)}
    prof = pair.ask("gpudiff", "profile") if profile else None
    return out, prof


def bench_ops(pair, reps, warmup):
    for case in op_cases():
        label, op, xs, ws, kw = case
        for fw in ("gpudiff", "torch"):
            pair.ask(fw, "op", case)
        row = {"op": op, "case": label, "input": xs, "weight": ws, "kwargs": kw}
        row["forward"] = summarize(*pair.turns("fwd", reps, warmup))
        row["forward_backward"] = summarize(*pair.turns("fwd_bwd", reps, warmup))
        yield row


def profile_step(trainer, top=25):
    """cProfile of one gpudiff training step: the top functions by own time."""
    trainer.step()
    prof = cProfile.Profile()
    prof.enable()
    trainer.step()
    prof.disable()
    s = io.StringIO()
    stats = pstats.Stats(prof, stream=s)
    stats.sort_stats("tottime").print_stats(top)
    total = sum(v[2] for v in stats.stats.values())  # tottime summed: the step's time
    rows = []
    for (file, line, fn), (cc, nc, tt, ct, _) in sorted(stats.stats.items(),
                                                          key=lambda kv: -kv[1][2])[:top]:
        rows.append({"function": f"{os.path.basename(file)}:{line}({fn})", "calls": nc,
                     "tottime_ms": round(tt * 1e3, 3), "share": round(tt / total, 3)})
    return {"total_ms": round(total * 1e3, 3), "top": rows}, s.getvalue()


def cpu_model():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    ap.add_argument("--reps", type=int, default=20, help="timed steps per framework")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--op-reps", type=int, default=15)
    ap.add_argument("--no-ops", action="store_true", help="skip the per-op timings")
    ap.add_argument("--profile", action="store_true", help="cProfile one gpudiff step")
    ap.add_argument("--out", default=None, help="JSON path (default bench/results/cpu_<date>.json)")
    args = ap.parse_args(argv)

    pair = Pair()
    try:
        ginfo, tinfo = pair.ask("gpudiff", "info")[0], pair.ask("torch", "info")[0]
        result = {
            "benchmark": "bench/bench_cpu.py",
            "date": datetime.datetime.now().isoformat(timespec="seconds"),
            "cpu": cpu_model(),
            "cores": os.cpu_count(),
            "load_average_before": os.getloadavg(),
            "torch": tinfo["version"], "torch_threads": tinfo["threads"],
            "numpy": np.__version__, "python": platform.python_version(),
            "gpudiff_cpu_extension": ginfo["cpu_extension"],
            "gpudiff_blas_conv": ginfo["blas_conv"],
            "batch": BATCH, "reps": args.reps,
            "models": {}, "ops": [], "profiles": {},
        }
        if not ginfo["cpu_extension"]:
            print("warning: gpudiff._C is not built: timing the NumPy reference path",
                  flush=True)
        print(f"{result['cpu']}, {result['cores']} cores, torch {tinfo['version']} "
              f"({tinfo['threads']} threads), load {result['load_average_before']}")
        print(f"{'model':8s} {'gpudiff ms':>20s} {'torch ms':>20s} {'ratio':>12s}   "
              f"(median / min)")
        for name in args.models:
            res, prof = bench_model(pair, name, args.reps, args.warmup, args.profile)
            result["models"][name] = res
            g, t = res["gpudiff_ms"], res["torch_ms"]
            print(f"{name:8s} {g['median']:9.2f} / {g['min']:8.2f} {t['median']:9.2f} / "
                  f"{t['min']:8.2f} {res['ratio_median']:5.2f} / {res['ratio_min']:4.2f}",
                  flush=True)
            if prof:
                result["profiles"][name] = prof[0]
                print(f"-- cProfile of one gpudiff {name} step --\n{prof[1]}")
        if not args.no_ops:
            print(f"\n{'op':28s} {'fwd ratio':>16s} {'fwd+bwd ratio':>16s}   (median / min)")
            for row in bench_ops(pair, args.op_reps, 2):
                result["ops"].append(row)
                f, fb = row["forward"], row["forward_backward"]
                print(f"{row['case']:28s} {f['ratio_median']:7.2f} / {f['ratio_min']:5.2f} "
                      f"{fb['ratio_median']:8.2f} / {fb['ratio_min']:5.2f}   "
                      f"(gpudiff fwd+bwd {fb['gpudiff_ms']['median']:.2f} ms, torch "
                      f"{fb['torch_ms']['median']:.2f} ms)", flush=True)
    finally:
        pair.close()
    result["load_average_after"] = os.getloadavg()
    out = args.out or os.path.join(
        HERE, "results", f"cpu_{datetime.datetime.now().strftime('%Y%m%d_%H%M%S')}.json")
    os.makedirs(os.path.dirname(out), exist_ok=True)
    with open(out, "w") as f:
        json.dump(result, f, indent=1)
    print(f"\nwrote {out}")
    return result


if __name__ == "__main__":
    main()
