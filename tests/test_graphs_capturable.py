"""Capturable optimizer steps for CUDA graphs on a GPU (docs/GRAPHS.md), tested without one.

On a GPU a CUDA graph replays the kernels of its capture with the capture's arguments, so a
captured ``optimizer.step()`` reads lr, the other group values and the step-dependent bias
corrections from device scalars that a ``pre_replay`` hook writes before each replay.

Here the GPU's capture is simulated (``Plan(record=False, simulate=True)``): as on the GPU,
the plan records no Python step, and the device work the step launches at capture is kept as
closures over fixed arrays (parameters, gradients, state buffers, the device scalars) and
rerun on each replay, as the graph would rerun its kernels. They never read ``param_groups``
or the optimizer's Python state (a test removes both while they run), so every change of lr
or step count reaches the update only through the device scalars.

The main check: N replays (pre_replay hooks, then the kept work) equal N eager steps of a
twin optimizer **bitwise** (parameters, state, step counts), with a StepLR changing the lr
between replays. The replays run ``_update``'s formulas (PyTorch's single-tensor rule), so
the twin runs with the fused kernels off (``use_kernels(False)``): the fused SGD kernel of
the CPU and the emulated device's SGD / Adam kernels round differently (a last test bounds
that difference).
"""
import numpy as np
import pytest

import gpudiff
from gpudiff import optim
from gpudiff.runtime import capture as C
from gpudiff.runtime.capture import CaptureError
from gpudiff.runtime.kernels import use_kernels

DEVICES = ["cpu", "cuda"]  # cuda: the emulated device (tests/conftest.py)
SHAPES = [(3, 4), (5,), (2, 3, 2)]


def _gpu_capture(fn):
    """Capture ``fn()`` as on a GPU, simulated: returns the plan (replay() = the graph's)."""
    plan = C.Plan(record=False, simulate=True)
    C.begin(plan)
    try:
        fn()
    finally:
        C.finish(plan)
    return plan


def _data(n, dtype=np.float32, seed=0):
    rng = np.random.default_rng(seed)
    init = [rng.standard_normal(s).astype(dtype) for s in SHAPES]
    grads = [[rng.standard_normal(s).astype(dtype) for s in SHAPES] for _ in range(n)]
    return init, grads


def _params(init, device):
    return [gpudiff.tensor(a.copy(), device=device, requires_grad=True) for a in init]


def _eager_step(opt, ps, gs):
    for p, g in zip(ps, gs):
        p.grad = gpudiff.tensor(g.copy(), device=p.device)
    with use_kernels(False):
        opt.step()


def _snapshot(opt, ps):
    out = [p.detach().cpu().numpy().copy() for p in ps]
    for p in ps:
        for k, v in sorted(opt.state.get(p, {}).items()):
            out.append((k, v.detach().cpu().numpy().copy() if isinstance(v, gpudiff.Tensor)
                        else v))
    return out


def _assert_bitwise(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        if isinstance(x, tuple):
            assert x[0] == y[0]
            x, y = x[1], y[1]
        assert x.dtype == y.dtype and np.array_equal(x, y), (x, y)


def _replays_vs_eager(cls, kwargs, device="cpu", dtype=np.float32, warm=2, n=7,
                      sched=lambda o: optim.lr_scheduler.StepLR(o, step_size=2, gamma=0.5),
                      between=None):
    """Warm up both optimizers, capture one's step, then per step: new gradients copied
    into the captured gradient arrays, replay, scheduler (and ``between(opt, i)``) vs the
    twin's eager step; bitwise equal after every step. Returns the captured optimizer."""
    init, grads = _data(warm + n, dtype)
    ps, twin = _params(init, device), _params(init, device)
    opt, topt = cls(ps, **kwargs), cls(twin, **kwargs)
    s, ts = sched(opt), sched(topt)
    for gs in grads[:warm]:
        _eager_step(opt, ps, gs)
        _eager_step(topt, twin, gs)
        s.step()
        ts.step()
    for p in ps:
        if p.grad is None:  # (no warm-up: the gradients the captured backward would make)
            p.grad = gpudiff.zeros(p.shape, dtype=p.dtype, device=device)
    before = _snapshot(opt, ps)
    count = getattr(opt, "_step_count", None)
    plan = _gpu_capture(opt.step)
    _assert_bitwise(_snapshot(opt, ps), before)  # capture records; it changes nothing
    assert getattr(opt, "_step_count", None) == count and plan.steps  # (the kept device work)
    lrs = set()
    for i, gs in enumerate(grads[warm:]):
        for p, g in zip(ps, gs):
            p.grad.array[...] = g  # (what the captured backward would write)
        plan.replay()
        s.step()
        _eager_step(topt, twin, gs)
        ts.step()
        if between is not None:
            between(opt, i)
            between(topt, i)
        lrs.add(opt.param_groups[0]["lr"])
        _assert_bitwise(_snapshot(opt, ps), _snapshot(topt, twin))
    assert len(lrs) > 1  # the schedule did change the lr between replays
    assert opt._step_count == topt._step_count
    return opt


SGD_CASES = [{}, {"momentum": 0.9}, {"momentum": 0.9, "dampening": 0.3, "weight_decay": 1e-2},
             {"momentum": 0.8, "nesterov": True, "weight_decay": 1e-3},
             {"momentum": 0.9, "maximize": True}, {"weight_decay": 0.1, "maximize": True}]
CASES = [("SGD", dict(lr=0.1, **k)) for k in SGD_CASES] + [
    ("Adam", {"lr": 0.01}), ("Adam", {"lr": 0.01, "amsgrad": True, "weight_decay": 0.1}),
    ("Adam", {"lr": 0.01, "betas": (0.3, 0.9), "maximize": True}),  # lerp's other formula
    ("AdamW", {"lr": 0.01}), ("AdamW", {"lr": 0.01, "amsgrad": True}),
    ("RMSprop", {"lr": 0.01}),
    ("RMSprop", {"lr": 0.01, "centered": True, "momentum": 0.5, "weight_decay": 0.1}),
    ("Adagrad", {"lr": 0.1, "lr_decay": 0.01, "weight_decay": 0.1}),
    ("Adadelta", {"lr": 1.0, "weight_decay": 0.1, "maximize": True})]


def _id(case):
    return case[0] + "".join(f"-{k}={v}" for k, v in case[1].items() if k != "lr")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name, kwargs", CASES, ids=[_id(c) for c in CASES])
def test_replays_equal_eager_steps_with_a_schedule(name, kwargs, device):
    opt = _replays_vs_eager(getattr(optim, name), kwargs, device)
    for st in opt.state.values():
        if "step" in st:
            assert float(st["step"].array) == 9 and st["step"].device.type == "cpu"


@pytest.mark.parametrize("name", ["SGD", "Adam"])
def test_float64_parameters(name):
    _replays_vs_eager(getattr(optim, name), {"lr": 0.05, "momentum": 0.9} if name == "SGD"
                      else {"lr": 0.05, "amsgrad": True}, dtype=np.float64)


def test_other_hyperparameters_changed_between_replays_take_effect():
    """Not only the lr: OneCycleLR cycles SGD's momentum and Adam's betas; weight decay,
    eps, dampening are group values a user may change too."""
    def sgd_change(opt, i):
        g = opt.param_groups[0]
        g["momentum"], g["dampening"] = 0.9 - 0.1 * i, 0.05 * (i + 1)
        g["weight_decay"] = 1e-3 * (i + 1)
    _replays_vs_eager(optim.SGD, {"lr": 0.1, "momentum": 0.9, "dampening": 0.1,
                                  "weight_decay": 1e-3}, between=sgd_change)

    def adam_change(opt, i):
        g = opt.param_groups[0]
        g["betas"] = (0.9 - 0.05 * i, 0.999 - 0.01 * i)
        g["eps"], g["weight_decay"] = 1e-8 * (i + 1), 0.01 * (i + 1)
    _replays_vs_eager(optim.AdamW, {"lr": 0.01}, between=adam_change)
    sched = lambda o: optim.lr_scheduler.OneCycleLR(o, max_lr=0.1, total_steps=20)
    _replays_vs_eager(optim.SGD, {"lr": 0.1, "momentum": 0.9}, sched=sched)
    _replays_vs_eager(optim.Adam, {"lr": 0.1}, sched=sched)


def test_groups_and_dtypes_each_have_their_scalars():
    """Two groups with their own lr, a float64 parameter in the first (its own bucket), a
    parameter without a gradient (not in the graph) in the second."""
    init, grads = _data(6)
    extra = np.arange(4.0)

    def make():
        ps = _params(init, "cpu")
        d = gpudiff.tensor(extra.copy(), requires_grad=True)
        frozen = gpudiff.zeros(2, requires_grad=True)
        opt = optim.Adam([{"params": [ps[0], d]}, {"params": ps[1:] + [frozen], "lr": 0.1}],
                         lr=0.01)
        return ps + [d], frozen, opt, optim.lr_scheduler.StepLR(opt, 1, 0.7)

    ps, frozen, opt, s = make()
    twin, _, topt, ts = make()
    grads = [gs + [np.full(4, 0.5 * i)] for i, gs in enumerate(grads)]
    for gs in grads[:2]:
        _eager_step(opt, ps, gs)
        _eager_step(topt, twin, gs)
    plan = _gpu_capture(opt.step)
    for gs in grads[2:]:
        for p, g in zip(ps, gs):
            p.grad.array[...] = g
        plan.replay()
        s.step()
        _eager_step(topt, twin, gs)
        ts.step()
        _assert_bitwise(_snapshot(opt, ps), _snapshot(topt, twin))
    assert frozen.grad is None and opt.state.get(frozen) is None
    assert np.array_equal(frozen.detach().numpy(), np.zeros(2))


def test_the_replayed_work_reads_only_fixed_arrays():
    """What a replay reruns (the graph's kernels) reads neither param_groups nor the state
    dicts: it runs with both removed, and an lr changed in the group reaches the update only
    through pre_replay's write of the device scalar."""
    p = gpudiff.ones(3, requires_grad=True)
    opt = optim.SGD([p], lr=0.5)
    p.grad = gpudiff.ones(3)
    plan = _gpu_capture(opt.step)
    plan.replay()                                    # lr 0.5: 1 - 0.5
    assert np.array_equal(p.detach().numpy(), np.full(3, 0.5, np.float32))
    opt.param_groups[0]["lr"] = 0.25
    groups, state = opt.param_groups, opt.state
    opt.param_groups = opt.state = None
    try:
        for step in plan.steps:                      # the graph alone: the old device lr
            step()
    finally:
        opt.param_groups, opt.state = groups, state
    assert np.array_equal(p.detach().numpy(), np.zeros(3, np.float32))
    plan.replay()                                    # pre_replay writes 0.25
    assert np.array_equal(p.detach().numpy(), np.full(3, -0.25, np.float32))


def test_adam_bias_corrections_follow_the_host_step_counts():
    """Each parameter has its own step count (one joined the graph later than the other):
    each gets its own bias corrections."""
    init, grads = _data(8)

    def make():
        ps = _params(init, "cpu")
        return ps, optim.Adam(ps, lr=0.01)
    ps, opt = make()
    twin, topt = make()
    for i, gs in enumerate(grads[:3]):
        n = 1 if i == 0 else len(ps)  # the first step: only the first parameter
        for o, qs in ((opt, ps), (topt, twin)):
            for q in qs:
                q.grad = None
            _eager_step(o, qs[:n], gs[:n])
    assert float(opt.state[ps[0]]["step"].array) == 3
    assert float(opt.state[ps[1]]["step"].array) == 2
    plan = _gpu_capture(opt.step)
    for gs in grads[3:]:
        for p, g in zip(ps, gs):
            p.grad.array[...] = g
        plan.replay()
        _eager_step(topt, twin, gs)
        _assert_bitwise(_snapshot(opt, ps), _snapshot(topt, twin))
    assert float(opt.state[ps[0]]["step"].array) == 8


def test_adagrad_needs_no_warm_up():
    """Adagrad makes its state in its constructor: its first step can be captured."""
    _replays_vs_eager(optim.Adagrad, {"lr": 0.1}, warm=0)


def test_replays_against_the_fused_kernels():
    """The eager step runs the fused SGD kernel where a device has one (the CPU's, with
    -ffast-math): the replays differ from it by rounding only."""
    init, grads = _data(8)
    ps, twin = _params(init, "cpu"), _params(init, "cpu")
    opt, topt = optim.SGD(ps, lr=0.1, momentum=0.9), optim.SGD(twin, lr=0.1, momentum=0.9)
    for gs in grads[:2]:
        for o, qs in ((opt, ps), (topt, twin)):
            for q, g in zip(qs, gs):
                q.grad = gpudiff.tensor(g.copy())
            o.step()
    plan = _gpu_capture(opt.step)
    for gs in grads[2:]:
        for p, q, g in zip(ps, twin, gs):
            p.grad.array[...] = g
            q.grad = gpudiff.tensor(g.copy())
        plan.replay()
        topt.step()
    for p, q in zip(ps, twin):
        np.testing.assert_allclose(p.detach().numpy(), q.detach().numpy(), rtol=1e-6,
                                   atol=1e-6)


def test_plan_launch_on_a_gpu_runs_the_work_under_the_capture():
    """Not simulated (a real GPU's plan), ``launch`` runs the work at once: under CuPy's
    stream capture that records its kernels; the plan keeps no step."""
    ran = []
    plan = C.Plan(record=False)
    plan.launch(lambda: ran.append(plan.depth))
    assert ran == [1] and plan.steps == []
    sim = C.Plan(record=False, simulate=True)
    sim.launch(lambda: ran.append("replayed"))
    assert ran == [1] and len(sim.steps) == 1
    sim.replay()
    assert ran == [1, "replayed"]


# ---- what still raises ------------------------------------------------------------------
def _warm(opt, ps, n=1):
    for _ in range(n):
        for p in ps:
            p.grad = gpudiff.ones(p.shape)
        opt.step()


def test_refusals_at_capture():
    p = gpudiff.ones(3, requires_grad=True)
    for cls, kw in [(optim.SGD, {"momentum": 0.9}), (optim.Adam, {}), (optim.RMSprop, {}),
                    (optim.Adadelta, {})]:
        opt = cls([p], lr=0.1, **kw)
        opt.state.clear()
        p.grad = gpudiff.ones(3)
        with pytest.raises(CaptureError, match=fr"{cls.__name__}.step\(\) inside a CUDA graph "
                                               r"on a GPU: warm up before capturing"):
            _gpu_capture(opt.step)
    opt = optim.SGD([p], lr=0.1)
    with pytest.raises(CaptureError, match=r"SGD.step\(closure\): a closure cannot be captured"):
        _gpu_capture(lambda: opt.step(lambda: 0.0))
    handle = opt.register_step_post_hook(lambda *a: None)
    with pytest.raises(CaptureError, match=r"SGD.step\(\) inside a CUDA graph on a GPU: it has "
                                           r"step hooks .* gpudiff.Graph\(\)"):
        _gpu_capture(opt.step)
    handle.remove()
    _gpu_capture(opt.step)  # (without the hook: captured)

    class Custom(optim.SGD):
        def step(self, closure=None):
            return super().step(closure)
    with pytest.raises(CaptureError, match=r"Custom.step\(\) .* a step\(\) of its own"):
        _gpu_capture(Custom([p], lr=0.1).step)

    class Plain(optim.Optimizer):  # a user's optimizer: _update only
        def __init__(self, params):
            super().__init__(params, {"lr": 0.1})

        def _update(self, param, g, state, group):
            param.array -= group["lr"] * g
    with pytest.raises(CaptureError, match=r"Plain.step\(\) inside a CUDA graph on a GPU: "
                                           r"Plain has no capturable step"):
        _gpu_capture(Plain([p]).step)
    assert C.active is None  # every refusal ended its capture cleanly


@pytest.mark.parametrize("name, kwargs, key, value, what", [
    ("SGD", {"momentum": 0.9}, "momentum", 0, "momentum != 0"),
    ("SGD", {"momentum": 0.9}, "nesterov", True, "nesterov"),
    ("SGD", {}, "weight_decay", 0.1, "weight_decay != 0"),
    ("Adam", {}, "amsgrad", True, "amsgrad"),
    ("Adam", {}, "betas", (0.2, 0.999), r"abs\(1 - beta1\) < 0.5"),
    ("RMSprop", {}, "centered", True, "centered"),
    ("Adagrad", {}, "maximize", True, "maximize")])
def test_a_new_update_rule_raises_at_replay(name, kwargs, key, value, what):
    p = gpudiff.ones(3, requires_grad=True)
    opt = getattr(optim, name)([p], lr=0.1, **kwargs)
    _warm(opt, [p], 2)
    plan = _gpu_capture(opt.step)
    plan.replay()
    before = _snapshot(opt, [p])
    opt.param_groups[0][key] = value
    with pytest.raises(CaptureError, match=fr"replay: {name}'s {what} changed .* Capture again"):
        plan.replay()
    _assert_bitwise(_snapshot(opt, [p]), before)  # (checked before any step count moved)


def test_replaced_state_raises_at_replay():
    p = gpudiff.ones(3, requires_grad=True)
    opt = optim.Adam([p], lr=0.1)
    _warm(opt, [p], 2)
    plan = _gpu_capture(opt.step)
    plan.replay()
    opt.load_state_dict(opt.state_dict())  # new state tensors: the graph holds the old ones
    with pytest.raises(CaptureError, match=r"Adam: the state 'exp_avg' of a parameter of "
                                           r"shape \(3,\) was replaced .* Capture again"):
        plan.replay()
    plan = _gpu_capture(opt.step)  # captured again: fine
    plan.replay()


def test_an_eager_step_between_replays():
    """gpudiff train --graph runs a smaller last batch eagerly (zero_grad: new .grad tensors)
    between replays: the graph's backward still writes the captured gradient arrays that its
    step reads, and the host step counts go on from the eager step."""
    init, grads = _data(8)
    ps, twin = _params(init, "cpu"), _params(init, "cpu")
    opt, topt = optim.Adam(ps, lr=0.01), optim.Adam(twin, lr=0.01)
    for gs in grads[:2]:
        _eager_step(opt, ps, gs)
        _eager_step(topt, twin, gs)
    plan = _gpu_capture(opt.step)
    captured = [p.grad.array for p in ps]  # (the memory the captured backward writes)
    for i, gs in enumerate(grads[2:]):
        if i % 3 == 2:
            opt.zero_grad(set_to_none=True)
            _eager_step(opt, ps, gs)
        else:
            for a, g in zip(captured, gs):
                a[...] = g
            plan.replay()
        _eager_step(topt, twin, gs)
        _assert_bitwise(_snapshot(opt, ps), _snapshot(topt, twin))
