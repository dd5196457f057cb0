"""The C dispatch fast path (csrc/cpu/dispatch.cpp) against the Python ``ops.apply`` it
stands in for: the same tensors, tape, saved tensors and results, bitwise; and the calls it
must leave to Python (modes, views, mixed devices, errors) still behave. The whole suite also
runs through it (it is on by default), which is the broad check; here the two paths are
compared directly."""
import gc

import numpy as np
import pytest

import gpudiff
import gpudiff.nn as nn
import gpudiff.nn.functional as F
from gpudiff import ops, runtime

pytestmark = pytest.mark.skipif(runtime._C is None or not hasattr(runtime._C, "apply"),
                                reason="gpudiff._C is not built")


@pytest.fixture
def both_paths():
    was = ops.Op.__dict__["apply"].__func__ is runtime._C.apply
    yield
    ops.fast_dispatch(was)


def test_fast_path_is_on_by_default():
    assert ops.Op.__dict__["apply"].__func__ is runtime._C.apply
    x = gpudiff.ones(2, 3, requires_grad=True)
    y = F.relu(x)
    assert type(y) is gpudiff.Tensor and y.requires_grad and y.grad_fn.name == "relu"


def _train(fast, device="cpu", steps=3):
    ops.fast_dispatch(fast)
    gpudiff.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
                          nn.MaxPool2d(2), nn.Flatten(), nn.Linear(4 * 4 * 4, 16), nn.Tanh(),
                          nn.Dropout(0.2), nn.Linear(16, 10)).to(device)
    opt = gpudiff.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    rng = np.random.default_rng(0)
    losses = []
    for _ in range(steps):
        x = gpudiff.tensor(rng.standard_normal((8, 1, 8, 8)).astype(np.float32), device=device)
        y = gpudiff.tensor(rng.integers(0, 10, 8), device=device)
        opt.zero_grad()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses, [p.detach().cpu().numpy() for p in model.parameters()], \
        [b.detach().cpu().numpy() for b in model.buffers()]


@pytest.mark.parametrize("device", ["cpu", "cuda"])
def test_training_steps_equal_the_python_path_bitwise(both_paths, device):
    if device == "cuda" and not gpudiff.cuda.is_available():
        pytest.skip("no cuda device (emulated or real)")
    slow = _train(False, device)
    fast = _train(True, device)
    assert slow[0] == fast[0]
    for a, b in zip(slow[1] + slow[2], fast[1] + fast[2]):
        np.testing.assert_array_equal(a, b)


def _tape(t):
    """The graph below ``t``: (name, [edges], saved (shape, version, leaf?, weak?)) per node,
    depth first."""
    out, seen, stack = [], set(), [t.grad_fn]
    while stack:
        n = stack.pop()
        if n is None or id(n) in seen:
            continue
        seen.add(id(n))
        edges = []
        for e in n.next:
            if e is None:
                edges.append(None)
            elif isinstance(e, tuple):
                edges.append((e[0].name, e[1]))
                stack.append(e[0])
            else:
                edges.append(("leaf", tuple(e.shape)))
        saved = [None if s is None else (s.array.shape, s.saved_version, s.leaf is not None,
                                         s.weak, s.requires_grad, s.output_nr)
                 for s in n.ctx._saved]
        out.append((n.name, edges, saved, n.n_outputs, [m[:2] for m in n.out_meta],
                    [None if m is None else m for m in n.ctx.input_meta],
                    n.ctx.needs_input_grad))
    return out


def test_the_tape_is_the_python_paths(both_paths):
    rng = np.random.default_rng(1)
    xa, wa = rng.standard_normal((3, 5)), rng.standard_normal((4, 5))
    tapes, grads = [], []
    for fast in (False, True):
        ops.fast_dispatch(fast)
        x = gpudiff.tensor(xa, requires_grad=True)
        w = gpudiff.tensor(wa, requires_grad=True)
        h = F.linear(x, w).tanh()
        y = (h * h).sigmoid().sum(1)            # an output saved by its own node (weak link)
        z = (y * 2.0 + x.sum(1)).max()          # max: an integer-free multi-output path
        tapes.append(_tape(z))
        gx, gw = gpudiff.autograd.grad(z, [x, w], create_graph=True)
        gg = gpudiff.autograd.grad(gx.sum() + gw.sum(), [x, w])   # double backward
        grads.append([g.detach().numpy() for g in (gx, gw) + tuple(gg)])
    assert tapes[0] == tapes[1]
    for a, b in zip(*grads):
        np.testing.assert_array_equal(a, b)


@pytest.mark.filterwarnings("ignore::RuntimeWarning")
def test_calls_left_to_python_still_work(both_paths):
    ops.fast_dispatch(True)
    x = gpudiff.ones(2, 3, requires_grad=True)
    # a view op, then an op on the view; an in-place change of the base makes the view stale
    v = x.view(3, 2) * 1.0
    base = x * 1.0
    view = base[0]
    base.mul_(2)
    with pytest.raises(RuntimeError, match="a view of a tensor that was modified"):
        view * 2
    # the modes: anomaly mode names the op, no_grad records nothing, autocast casts
    with gpudiff.autograd.detect_anomaly():
        with pytest.raises(RuntimeError, match="'log' returned nan"):
            gpudiff.tensor([-1.0], requires_grad=True).log()
    with gpudiff.no_grad():
        assert (x * 2).grad_fn is None
    with gpudiff.autocast("cpu", dtype=gpudiff.bfloat16):
        assert F.linear(x, gpudiff.ones(4, 3)).dtype == gpudiff.bfloat16
    # errors name the op and the arguments, as the Python path does
    with pytest.raises(RuntimeError, match="mul: shapes"):
        x * gpudiff.ones(4)
    assert v.shape == (3, 2)


def test_errors_in_a_forward_propagate_and_nothing_leaks(both_paths):
    ops.fast_dispatch(True)
    x = gpudiff.ones(3, requires_grad=True)
    with pytest.raises(Exception):
        F.cross_entropy(gpudiff.ones(2, 3, requires_grad=True), gpudiff.tensor([0, 7]))
    gc.collect()
    before = len(gc.get_objects())
    for _ in range(2000):
        (x * 2).relu().sum().backward()
    gc.collect()
    assert len(gc.get_objects()) - before < 50   # no tensors, nodes or contexts left behind


def test_emulated_device_outputs_join_its_pool(both_paths):
    if not gpudiff.cuda.is_available() or not gpudiff.cuda.is_emulated():
        pytest.skip("the emulated cuda device is not on")
    ops.fast_dispatch(True)
    x = gpudiff.ones(4, 4, device="cuda", requires_grad=True)
    used = gpudiff.cuda.memory_allocated()
    y = F.relu(x * 3.0)
    assert gpudiff.cuda.memory_allocated() > used
    y.sum().backward()
    np.testing.assert_array_equal(x.grad.cpu().numpy(), np.full((4, 4), 3.0, np.float32))


def test_a_changed_op_class_is_seen_at_once(both_paths, monkeypatch):
    """The C path caches what it reads from an op class; changing the class (a patched
    forward, here) must take effect on the next call, and low-precision inputs still go
    through the float32 wrapper (ops/lowp.py)."""
    ops.fast_dispatch(True)
    relu = ops.REGISTRY["relu"]
    x = gpudiff.tensor([-1.0, 2.0], requires_grad=True)
    assert F.relu(x).tolist() == [0.0, 2.0]
    inner = relu.forward.lowp_inner

    def forward(ctx, x):
        return inner(ctx, x) * 10
    forward.lowp_inner = forward
    monkeypatch.setattr(relu, "forward", staticmethod(forward))
    assert F.relu(x).tolist() == [0.0, 20.0]
    monkeypatch.undo()
    assert F.relu(x).tolist() == [0.0, 2.0]
    h = gpudiff.tensor([-1.0, 2.0], dtype=gpudiff.float16, requires_grad=True)
    y = F.relu(h)
    assert y.dtype == gpudiff.float16 and y.tolist() == [0.0, 2.0]
    y.sum().backward()
    assert h.grad.dtype == gpudiff.float16 and h.grad.tolist() == [0.0, 1.0]
