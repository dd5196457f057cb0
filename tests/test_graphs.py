"""Whole-step capture and replay (gpudiff.Graph, gpudiff.cuda.CUDAGraph; docs/GRAPHS.md).

The main check: N replays of a captured training step equal N eager steps of a twin model,
bitwise (losses, parameters, optimizer state, BatchNorm running statistics), on the CPU and
on the emulated cuda device, where a CUDAGraph replays the plan through the emulator.
"""
import gc
import json

import numpy as np
import pytest

import gpudiff
import gpudiff.nn as nn
import gpudiff.nn.functional as F
from gpudiff.models import create_model
from gpudiff.runtime.capture import CaptureError

DEVICES = ["cpu", "cuda"]  # cuda: the emulated device (tests/conftest.py)


def _graph(dev):
    return gpudiff.cuda.CUDAGraph() if dev == "cuda" else gpudiff.Graph()


def _data(n, shape, classes=10, seed=1):
    rng = np.random.default_rng(seed)
    return [(rng.standard_normal(shape).astype(np.float32), rng.integers(0, classes, shape[0]))
            for _ in range(n)]


def _eager_step(model, opt, x, y):
    opt.zero_grad(set_to_none=True)
    loss = F.cross_entropy(model(x), y)
    loss.backward()
    opt.step()
    return loss


def _state(model, opt):
    """Every array of the training state: parameters, buffers, optimizer state."""
    out = [p.detach().cpu().numpy().copy() for p in model.parameters()]
    out += [b.detach().cpu().numpy().copy() for b in model.buffers()]
    for st in opt.state.values():
        for k in sorted(st):
            v = st[k]
            out.append(v.detach().cpu().numpy().copy() if isinstance(v, gpudiff.Tensor)
                       else np.asarray(v))
    return out


def _twins(dev, name, make_opt, steps, warmup=2, sched=None, seeds=None, **kw):
    """Train model A eagerly and its twin B by replaying one captured step; compare."""
    def make():
        gpudiff.manual_seed(0)
        m = create_model(name, **kw).to(dev)
        o = make_opt(m.parameters())
        return m, o, (sched(o) if sched else None)

    (m1, o1, s1), (m2, o2, s2) = make(), make()
    shape = (2, kw.get("in_channels", 1), kw.get("image_size", 28), kw.get("image_size", 28))
    data = [(gpudiff.tensor(x, device=dev), gpudiff.tensor(y, device=dev))
            for x, y in _data(warmup + steps, shape)]
    static_x = gpudiff.zeros(shape, device=dev)
    static_y = gpudiff.zeros(shape[0], dtype=gpudiff.int64, device=dev)
    # PyTorch's recipe: warm up on a side stream, then capture forward, loss, backward, step
    s = gpudiff.cuda.Stream() if dev == "cuda" else None
    if s is not None:
        s.wait_stream(gpudiff.cuda.current_stream())
    for i, (x, y) in enumerate(data[:warmup]):
        gpudiff.manual_seed(100 + i)  # the same dropout masks for both
        _eager_step(m1, o1, x, y)
        gpudiff.manual_seed(100 + i)
        with gpudiff.cuda.stream(s):
            static_x.copy_(x)
            static_y.copy_(y)
            _eager_step(m2, o2, static_x, static_y)
    if s is not None:
        gpudiff.cuda.current_stream().wait_stream(s)
    before = _state(m2, o2)
    g = _graph(dev)
    o2.zero_grad(set_to_none=True)
    ctx = gpudiff.cuda.graph(g) if dev == "cuda" else gpudiff.graph(g)
    with ctx:
        static_loss = F.cross_entropy(m2(static_x), static_y)
        static_loss.backward()
        o2.step()
    after = _state(m2, o2)  # capture records; it changes no state
    assert len(before) == len(after)
    for a, b in zip(before, after):
        np.testing.assert_array_equal(a, b)
    if seeds is not None:  # make the eager twin draw the replays' dropout seeds
        seeds(g)
    for k, (x, y) in enumerate(data[warmup:]):
        loss1 = _eager_step(m1, o1, x, y)
        static_x.copy_(x)
        static_y.copy_(y)
        g.replay()
        if s1 is not None:
            s1.step()
            s2.step()
        assert loss1.item() == static_loss.item(), (k, loss1.item(), static_loss.item())
    for a, b in zip(_state(m1, o1), _state(m2, o2)):
        np.testing.assert_array_equal(a, b)
    return m1, m2, o1, o2, g


def _sgd(params):
    return gpudiff.optim.SGD(params, lr=0.05, momentum=0.9)


@pytest.mark.parametrize("dev", DEVICES)
def test_tiny_mlp_replays_equal_eager(dev):
    _twins(dev, "tiny-mlp", _sgd, steps=4, image_size=8)


@pytest.mark.parametrize("dev", DEVICES)
def test_lenet_replays_equal_eager(dev):
    _twins(dev, "lenet", _sgd, steps=3)


@pytest.mark.parametrize("dev", DEVICES)
def test_resnet20_batchnorm_replays_equal_eager(dev):
    m1, m2, *_ = _twins(dev, "resnet-small", _sgd, steps=2, blocks=3, width=4, in_channels=1,
                        image_size=8)
    # the running statistics moved (and equally: _twins compared every buffer)
    rm = [b for n, b in m2.named_buffers() if n.endswith("running_mean")]
    assert rm and float(rm[0].abs().sum().item()) > 0
    nbt = [b for n, b in m2.named_buffers() if n.endswith("num_batches_tracked")]
    assert int(nbt[0].item()) == 2 + 2  # warmup + replays


@pytest.mark.parametrize("dev", DEVICES)
def test_adam_replays_equal_eager(dev):
    _, _, _, o2, _ = _twins(dev, "tiny-mlp", lambda p: gpudiff.optim.Adam(p, lr=1e-2),
                            steps=4, image_size=8)
    st = next(iter(o2.state.values()))
    assert float(st["step"].item()) == 2 + 4  # the step counter advanced per replay


@pytest.mark.parametrize("dev", DEVICES)
def test_steplr_changes_lr_between_replays(dev):
    _, _, _, o2, _ = _twins(
        dev, "tiny-mlp", _sgd, steps=5, image_size=8,
        sched=lambda o: gpudiff.optim.lr_scheduler.StepLR(o, step_size=2, gamma=0.1))
    assert o2.param_groups[0]["lr"] == pytest.approx(0.05 * 0.1 ** 2)


@pytest.mark.parametrize("dev", DEVICES)
def test_mnist_net_with_dropout_replays_equal_eager(dev, monkeypatch):
    """PyTorch's MNIST example net (two dropouts): the twin draws the seeds that the replays
    compute on the device (base + counter * golden + index), so even dropout is bitwise."""
    def seeds(g):
        base, counter, n = next(iter(g._plan._seeds.values()))
        base = int(np.asarray(base))
        state = {"k": int(np.asarray(counter)), "i": 0}

        def draw():
            state["i"] = state["i"] % n + 1
            if state["i"] == 1:
                state["k"] += 1
            return (base + state["k"] * 0x9E3779B97F4A7C15 + state["i"]) % 2 ** 64
        monkeypatch.setattr(F, "_draw_seed", draw)
    _twins(dev, "mnist-cnn", _sgd, steps=2, seeds=seeds, image_size=12)


@pytest.mark.parametrize("dev", DEVICES)
def test_dropout_draws_new_numbers_each_replay(dev):
    x = gpudiff.ones(4000, device=dev)
    g = _graph(dev)
    with gpudiff.graph(g) if dev == "cpu" else gpudiff.cuda.graph(g):
        y = F.dropout(x, 0.3)
    masks = []
    for _ in range(4):
        g.replay()
        v = y.cpu().numpy()
        m = v != 0
        masks.append(m)
        assert abs(m.mean() - 0.7) < 0.04  # keep rate 1 - p (4000 draws: sd 0.007)
        np.testing.assert_allclose(v[m], 1 / 0.7, rtol=1e-6)
    for a, b in zip(masks, masks[1:]):
        assert (a != b).mean() > 0.3  # independent masks differ in ~42% of the places


def test_static_output_memory_is_overwritten_in_place():
    w = gpudiff.tensor([1.0, 2.0], requires_grad=True)
    x = gpudiff.tensor([3.0, 4.0])
    g = gpudiff.Graph()
    with gpudiff.graph(g):
        y = (w * x).sum()
        y.backward()
    arr = y.array
    x.copy_(gpudiff.tensor([1.0, 1.0]))
    g.replay()
    assert y.array is arr and y.item() == 3.0
    np.testing.assert_array_equal(w.grad.numpy(), [1.0, 1.0])
    g.replay()  # a captured backward overwrites the gradient it made (no accumulation)
    np.testing.assert_array_equal(w.grad.numpy(), [1.0, 1.0])


def test_capture_does_not_run_in_place_work():
    x = gpudiff.tensor([1.0, 2.0])
    g = gpudiff.Graph()
    with gpudiff.graph(g):
        x.mul_(2)
        x.add_(1)
    np.testing.assert_array_equal(x.numpy(), [1.0, 2.0])
    g.replay()
    np.testing.assert_array_equal(x.numpy(), [3.0, 5.0])
    g.replay()
    np.testing.assert_array_equal(x.numpy(), [7.0, 11.0])


# ---- errors --------------------------------------------------------------------------------
@pytest.mark.parametrize("what, fn, words", [
    ("item", lambda t: t.sum().item(), "Tensor.item()"),
    ("tolist", lambda t: t.tolist(), "Tensor.tolist()"),
    ("numpy", lambda t: t.numpy(), "Tensor.numpy()"),
    ("bool", lambda t: bool((t > 0).all()), "bool(tensor)"),
    ("print", lambda t: repr(t), "printing a tensor"),
    ("float", lambda t: float(t.sum()), "Tensor.item()"),
    ("mask", lambda t: t[t > 1], "boolean mask"),
    ("nonzero", lambda t: t.nonzero(), "nonzero"),
    ("tensor", lambda t: gpudiff.tensor([1.0, 2.0]), "tensor(data)"),
    ("randn", lambda t: gpudiff.randn(3), "random factory"),
    ("to", lambda t: t.to("cuda"), "to(cuda"),
])
def test_errors_inside_capture(what, fn, words):
    t = gpudiff.tensor([1.0, 2.0, 3.0])
    g = gpudiff.Graph()
    with pytest.raises(CaptureError, match=None) as e:
        with gpudiff.graph(g):
            fn(t)
    assert words in str(e.value) and "captur" in str(e.value)
    assert gpudiff.runtime.capture.active is None  # the failed capture ended cleanly
    with gpudiff.graph(gpudiff.Graph()):  # and a new one can begin
        t * 2


def test_nested_capture_raises():
    g1, g2 = gpudiff.Graph(), gpudiff.Graph()
    with pytest.raises(CaptureError, match="nested captures"):
        with gpudiff.graph(g1):
            with gpudiff.graph(g2):
                pass
    assert gpudiff.runtime.capture.active is None


def test_replay_after_static_tensor_reassigned_or_freed_raises():
    x = gpudiff.tensor([1.0, 2.0])
    g = gpudiff.Graph()
    with gpudiff.graph(g):
        y = x * 2
    g.replay()
    x.data = gpudiff.tensor([1.0, 2.0, 3.0])
    with pytest.raises(CaptureError, match=r"holds other memory \(shape \(3,\)\): it was resized or reassigned"):
        g.replay()
    z = gpudiff.tensor([1.0])
    g2 = gpudiff.Graph()
    with gpudiff.graph(g2):
        y2 = z + 1
    del z
    gc.collect()
    with pytest.raises(CaptureError, match="was freed"):
        g2.replay()
    assert y.shape == y2.shape == (2,) or True


def test_replay_without_capture_and_after_reset_raises():
    g = gpudiff.Graph()
    with pytest.raises(CaptureError, match="no capture"):
        g.replay()
    with gpudiff.graph(g):
        gpudiff.ones(2) * 2
    g.replay()
    g.reset()
    with pytest.raises(CaptureError, match="no capture"):
        g.replay()
    with pytest.raises(CaptureError, match="already holds a capture|reset"):
        with gpudiff.graph(g):
            pass
        with gpudiff.graph(g):
            pass


def test_optimizer_step_with_closure_raises():
    p = gpudiff.ones(2, requires_grad=True)
    opt = gpudiff.optim.SGD([p], lr=0.1)
    with pytest.raises(CaptureError, match="closure"):
        with gpudiff.graph(gpudiff.Graph()):
            opt.step(lambda: (p * p).sum())


# ---- make_graphed_callables, streams -------------------------------------------------------
@pytest.mark.parametrize("dev", DEVICES)
def test_make_graphed_callables_matches_eager(dev):
    gpudiff.manual_seed(0)
    m1 = nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 3)).to(dev)
    gpudiff.manual_seed(0)
    m2 = nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 3)).to(dev)
    sample = gpudiff.randn(4, 6, device=dev, requires_grad=True)  # as the real inputs
    make = gpudiff.cuda.make_graphed_callables if dev == "cuda" else \
        gpudiff.make_graphed_callables
    m2 = make(m2, (sample,))
    for p in m2.parameters():
        p.grad = None
    for x, _ in _data(3, (4, 6)):
        x1 = gpudiff.tensor(x, device=dev, requires_grad=True)
        x2 = gpudiff.tensor(x, device=dev, requires_grad=True)
        y1, y2 = m1(x1), m2(x2)
        np.testing.assert_array_equal(y1.detach().cpu().numpy(), y2.detach().cpu().numpy())
        (y1 * y1).sum().backward()
        (y2 * y2).sum().backward()
        np.testing.assert_allclose(x1.grad.cpu().numpy(), x2.grad.cpu().numpy(), rtol=1e-6)
    for p1, p2 in zip(m1.parameters(), m2.parameters()):
        np.testing.assert_allclose(p1.grad.cpu().numpy(), p2.grad.cpu().numpy(), rtol=1e-5)


def test_cuda_stream_api_on_the_emulated_device():
    s = gpudiff.cuda.Stream()
    cur = gpudiff.cuda.current_stream()
    s.wait_stream(cur)
    with gpudiff.cuda.stream(s):
        assert gpudiff.cuda.current_stream() is s
    assert gpudiff.cuda.current_stream() is cur
    e = s.record_event()
    e.synchronize()
    assert s.query() and e.query()
    gpudiff.cuda.synchronize()
    h = gpudiff.cuda.graph_pool_handle()
    g1, g2 = gpudiff.cuda.CUDAGraph(), gpudiff.cuda.CUDAGraph()
    x = gpudiff.ones(3, device="cuda")
    with gpudiff.cuda.graph(g1, pool=h):
        y = x * 3
    with gpudiff.cuda.graph(g2, pool=g1.pool()):
        z = y + 1
    assert g2.pool() == g1.pool() == h
    x.fill_(2.0)
    g1.replay()
    g2.replay()
    np.testing.assert_array_equal(z.cpu().numpy(), [7.0, 7.0, 7.0])


def test_replays_do_not_grow_device_memory():
    gpudiff.manual_seed(0)
    m = create_model("tiny-mlp", image_size=8).to("cuda")
    opt = gpudiff.optim.SGD(m.parameters(), lr=0.01, momentum=0.9)
    x = gpudiff.randn(4, 1, 8, 8, device="cuda")
    y = gpudiff.zeros(4, dtype=gpudiff.int64, device="cuda")
    for _ in range(2):
        _eager_step(m, opt, x, y)
    g = gpudiff.cuda.CUDAGraph()
    opt.zero_grad(set_to_none=True)
    with gpudiff.cuda.graph(g):
        F.cross_entropy(m(x), y).backward()
        opt.step()
    g.replay()
    gc.collect()
    used = gpudiff.cuda.memory_allocated()
    for _ in range(200):
        g.replay()
    gc.collect()
    assert gpudiff.cuda.memory_allocated() == used


# ---- gpudiff train --graph ------------------------------------------------------------------
def _train(tmp_path, name, **kw):
    from gpudiff.train import TrainConfig, train
    lines = []
    kw = dict(dict(model="resnet-small", epochs=2, limit=100, batch_size=32, augment=False,
                   out=str(tmp_path / name), progress=False), **kw)
    cfg = TrainConfig(**kw)
    r = train(cfg, log=lines.append)
    return r, lines


def test_train_graph_equals_eager_training(tmp_path):
    """A batch-norm ResNet trained with --graph (2 eager warm-up steps, then replays; the
    smaller last batch of each epoch eagerly) gives the eager run's numbers exactly."""
    eager, _ = _train(tmp_path, "eager")
    graphed, lines = _train(tmp_path, "graph", graph=True)
    assert any("--graph: training step captured" in s for s in lines), lines
    for a, b in zip(eager["history"], graphed["history"]):
        for k in ("train_loss", "train_acc", "test_loss", "test_acc"):
            assert a[k] == b[k], (k, a, b)
    metrics = json.load(open(tmp_path / "graph" / "metrics.json"))
    assert metrics["graph"] == "captured"


def test_train_graph_falls_back_with_the_reason(tmp_path, monkeypatch):
    from gpudiff.models import ResNetSmall
    forward = ResNetSmall.forward

    def chatty(self, x):  # a host sync in the forward: not capturable
        if float(x.abs().sum()) < 0:
            raise AssertionError
        return forward(self, x)
    monkeypatch.setattr(ResNetSmall, "forward", chatty)
    r, lines = _train(tmp_path, "fallback", graph=True, epochs=1)
    msg = [s for s in lines if s.startswith("--graph:")]
    assert len(msg) == 1 and "cannot be captured" in msg[0] and "Tensor.item()" in msg[0] \
        and "training eagerly" in msg[0], lines
    assert r["history"][0]["train_loss"] > 0  # and it trained


PYTORCH_DOC_EXAMPLE = '''
N, D_in, H, D_out = 64, 32, 16, 8
model = torch.nn.Sequential(torch.nn.Linear(D_in, H),
                            torch.nn.Dropout(p=0.2),
                            torch.nn.Linear(H, D_out),
                            torch.nn.Dropout(p=0.1)).cuda()
loss_fn = torch.nn.MSELoss()
optimizer = torch.optim.SGD(model.parameters(), lr=0.1)

# Placeholders used for capture
static_input = torch.randn(N, D_in, device='cuda')
static_target = torch.randn(N, D_out, device='cuda')

# warmup
s = torch.cuda.Stream()
s.wait_stream(torch.cuda.current_stream())
with torch.cuda.stream(s):
    for i in range(3):
        optimizer.zero_grad(set_to_none=True)
        y_pred = model(static_input)
        loss = loss_fn(y_pred, static_target)
        loss.backward()
        optimizer.step()
torch.cuda.current_stream().wait_stream(s)

# capture
g = torch.cuda.CUDAGraph()
optimizer.zero_grad(set_to_none=True)
with torch.cuda.graph(g):
    static_y_pred = model(static_input)
    static_loss = loss_fn(static_y_pred, static_target)
    static_loss.backward()
    optimizer.step()

real_inputs = [torch.rand_like(static_input) for _ in range(10)]
real_targets = [torch.rand_like(static_target) for _ in range(10)]

for data, target in zip(real_inputs, real_targets):
    static_input.copy_(data)
    static_target.copy_(target)
    g.replay()
'''


def test_pytorch_whole_network_example_runs_by_import_swap():
    """The whole-network capture example of PyTorch's CUDA-graphs documentation (sizes made
    small), run as written with ``torch`` = gpudiff, on the emulated device."""
    ns = {"torch": gpudiff}
    exec(PYTORCH_DOC_EXAMPLE, ns)
    model, g = ns["model"], ns["g"]
    w0 = model[0].weight.detach().cpu().numpy().copy()
    losses = []
    for data, target in zip(ns["real_inputs"], ns["real_targets"]):
        ns["static_input"].copy_(data)
        ns["static_target"].copy_(target)
        g.replay()
        losses.append(ns["static_loss"].item())
    assert not np.array_equal(w0, model[0].weight.detach().cpu().numpy())  # it trains
    assert model[0].weight.grad is not None and np.isfinite(losses).all()
    assert losses[-1] < losses[0]  # uniform targets in [0, 1): the fit improves


# ---- every op of the op database, captured ---------------------------------------------------
def _opdb_cases():
    """The first float64 sample of every op-database entry (all samples: ~2 min; CI time) on
    the CPU, and on the emulated device for the entries whose ops have CUDA kernels."""
    from tests.test_ops import BY_NAME, _cases
    seen, out = set(), []
    for p in _cases(dtypes=(np.dtype("float64"),)):
        name = p.values[0]
        if name not in seen:
            seen.add(name)
            out.append(pytest.param(*p.values, "cpu", id=p.id + "-cpu"))
            if BY_NAME[name].kernels:
                out.append(pytest.param(*p.values, "cuda", id=p.id + "-cuda"))
    return out


@pytest.mark.parametrize("name,dtype,i,dev", _opdb_cases())
def test_every_op_replays_like_eager(name, dtype, i, dev):
    """Each op-database sample captured (forward + backward with a fixed upstream gradient)
    with its inputs' values reversed, then replayed after copy_() of the real values: the
    outputs and input gradients equal an eager run on the real values, bitwise. An op that
    cannot be captured must say so with a CaptureError (host syncs, data-dependent shapes)."""
    import zlib

    from tests.test_ops import _sample, flat, gpudiff_inputs, host, run_gpudiff, upstream
    entry, sample = _sample(name, dtype, i)
    if entry.needs_cuda:
        pytest.skip("a transfer between devices (not capturable by design)")
    if "dropout" in entry.covers:
        pytest.skip("a capture draws new dropout masks per replay (device seeds: see "
                    "test_dropout_draws_new_numbers_each_replay, test_mnist_net_with_dropout...)")
    want_outs, want_grads = run_gpudiff(entry, sample, dev)
    args, kwargs, leaves = gpudiff_inputs(sample, dev, requires_grad=entry.grad)
    inputs = [t for t in flat((args, kwargs)) if isinstance(t, gpudiff.Tensor)]
    real = [t.detach().cpu().numpy().copy() for t in inputs]
    with gpudiff.no_grad():
        for t in inputs:
            if t.dtype.kind == "f" and t.ndim:  # the same values in another order
                t.copy_(gpudiff.tensor(np.ascontiguousarray(t.detach().cpu().numpy()[::-1]),
                                       device=dev))
    g = _graph(dev)
    try:
        with gpudiff.graph(g):
            outs = flat(entry.op(gpudiff, *args, **kwargs))
            diff = [o for o in outs if o.requires_grad] if entry.grad else []
            if diff and "backward" not in sample.skip:
                seeds = upstream(diff, zlib.crc32(sample.name.encode()))
                gpudiff.autograd.backward(diff, [gpudiff.zeros(s.shape, dtype=s.dtype,
                                                               device=dev) for s in seeds])
    except CaptureError as e:
        assert "captur" in str(e)
        pytest.skip(f"not capturable: {str(e).split(':')[0]}")
    with gpudiff.no_grad():
        for t, r in zip(inputs, real):
            t.copy_(gpudiff.tensor(r, device=dev))
    # the upstream gradients: the captured backward's seeds are its static tensors
    if diff and "backward" not in sample.skip:
        for s_arr, want in zip(_seed_arrays(g), seeds):
            s_arr[...] = gpudiff.runtime.to_device(want, gpudiff.device(dev))
    g.replay()
    for k, (o, w) in enumerate(zip(outs, want_outs)):
        np.testing.assert_array_equal(host(o), w, err_msg=f"{name}: output {k}")
    if diff and "backward" not in sample.skip:
        for k, (t, w) in enumerate(zip(leaves, want_grads)):
            if w is None:
                continue
            np.testing.assert_array_equal(host(t.grad), w, err_msg=f"{name}: gradient {k}")


def _seed_arrays(g):
    """The upstream-gradient arrays a captured backward() reads (in root order)."""
    for step in g._plan.steps:
        cells = dict(zip(step.__code__.co_freevars, step.__closure__ or ()))
        if "seeds" in cells and "leaf_plan" in cells:
            return [s.array for s in cells["seeds"].cell_contents]
    raise AssertionError("no captured backward")


def test_target_checks_run_at_every_replay():
    """The input checks that read values (cross-entropy's target range) run at each replay
    of a plan, so a bad target fed after the capture still raises instead of a wrong loss."""
    logits = gpudiff.zeros(4, 3, requires_grad=True)
    target = gpudiff.tensor([0, 1, 2, 0])
    g = gpudiff.Graph()
    with gpudiff.graph(g):
        loss = F.cross_entropy(logits, target)
    g.replay()
    assert loss.item() == pytest.approx(np.log(3))
    target.copy_(gpudiff.tensor([0, 1, 3, 0]))
    with pytest.raises(IndexError, match="target 3 is out of bounds for 3 classes"):
        g.replay()


@pytest.mark.parametrize("dev, dtype", [("cpu", "bfloat16"), ("cuda", "float16")])
def test_autocast_step_replays_equal_eager(dev, dtype):
    """An autocast forward captured: the casts are ops, recorded before the op that uses
    them (a parameter's cached cast is redone at every replay, after the update)."""
    low = getattr(gpudiff, dtype)

    def make():
        gpudiff.manual_seed(0)
        m = create_model("lenet", image_size=12).to(dev)
        return m, gpudiff.optim.SGD(m.parameters(), lr=0.05, momentum=0.9)

    (m1, o1), (m2, o2) = make(), make()

    def step(m, o, x, y):
        o.zero_grad(set_to_none=True)
        with gpudiff.autocast(dev, dtype=low):
            loss = F.cross_entropy(m(x), y)
        loss.backward()
        o.step()
        return loss

    data = [(gpudiff.tensor(x, device=dev), gpudiff.tensor(y, device=dev))
            for x, y in _data(5, (2, 1, 12, 12))]
    sx, sy = gpudiff.zeros(2, 1, 12, 12, device=dev), gpudiff.zeros(2, dtype=gpudiff.int64,
                                                                     device=dev)
    for x, y in data[:2]:
        step(m1, o1, x, y)
        sx.copy_(x)
        sy.copy_(y)
        step(m2, o2, sx, sy)
    g = _graph(dev)
    o2.zero_grad(set_to_none=True)
    with (gpudiff.graph(g) if dev == "cpu" else gpudiff.cuda.graph(g)):
        with gpudiff.autocast(dev, dtype=low):
            static_loss = F.cross_entropy(m2(sx), sy)
        static_loss.backward()
        o2.step()
    for x, y in data[2:]:
        loss = step(m1, o1, x, y)
        sx.copy_(x)
        sy.copy_(y)
        g.replay()
        assert loss.dtype == static_loss.dtype == gpudiff.float32
        assert loss.item() == static_loss.item()
    for p1, p2 in zip(m1.parameters(), m2.parameters()):
        np.testing.assert_array_equal(p1.detach().cpu().numpy(), p2.detach().cpu().numpy())


def test_train_graph_with_amp(tmp_path):
    """--graph --amp bf16: autocast is captured, and equals eager bf16 training; --amp fp16
    (GradScaler reads the inf/NaN flag on the host) trains eagerly, saying why."""
    eager, _ = _train(tmp_path, "amp-eager", amp="bf16", model="lenet")
    graphed, lines = _train(tmp_path, "amp-graph", amp="bf16", model="lenet", graph=True)
    assert any("--graph: training step captured" in s for s in lines), lines
    for a, b in zip(eager["history"], graphed["history"]):
        for k in ("train_loss", "train_acc", "test_loss", "test_acc"):
            assert a[k] == b[k], (k, a, b)
    _, lines = _train(tmp_path, "fp16", amp="fp16", model="lenet", graph=True, epochs=1)
    assert any("not with --amp fp16" in s and "training eagerly" in s for s in lines), lines


# a capture as on a real GPU (CuPy records the kernels; the plan records no Python steps and
# only enforces the rules), simulated on the CPU: the device work that the GPU would record
# (a capturable optimizer step) is kept and replayed on the same arrays
from test_graphs_capturable import _gpu_capture  # noqa: E402


def test_cuda_graph_rules_for_optimizers_on_a_gpu():
    """A CUDA graph replays fixed kernels: the optimizer step is capturable (lr and step
    counts in device scalars, written before each replay), so an lr changed between replays
    takes effect and Adam can be captured; a missing warm-up raises at capture, a change of
    the update rule (nesterov) at replay. tests/test_graphs_capturable.py has the rest."""
    from gpudiff.runtime.kernels import use_kernels

    def step(p, opt):
        (p * p).sum().backward()
        opt.step()

    p = gpudiff.ones(3, requires_grad=True)
    opt = gpudiff.optim.SGD([p], lr=0.1, momentum=0.9)
    with pytest.raises(CaptureError, match="SGD.step.*warm up before capturing"):
        _gpu_capture(lambda: step(p, opt))
    p.grad = None
    step(p, opt)  # the warm-up: the momentum buffer exists now
    twin = gpudiff.ones(3, requires_grad=True)
    twin_opt = gpudiff.optim.SGD([twin], lr=0.1, momentum=0.9)
    with use_kernels(False):  # (the replay runs _update's formulas, not the fused kernel)
        step(twin, twin_opt)
    before = p.detach().numpy().copy()
    opt.zero_grad(set_to_none=True)
    plan = _gpu_capture(lambda: step(p, opt))
    assert np.array_equal(p.detach().numpy(), before)  # captured, not run
    for lr in (0.1, 0.01):  # a scheduler between replays
        opt.param_groups[0]["lr"] = twin_opt.param_groups[0]["lr"] = lr
        plan.replay()  # (the gradient stays the capture's: 2 * p at capture)
        twin.grad = gpudiff.tensor(2 * before)
        with use_kernels(False):
            twin_opt.step()
        assert np.array_equal(p.detach().numpy(), twin.detach().numpy())
    opt.param_groups[0]["nesterov"] = True
    with pytest.raises(CaptureError, match=r"SGD's nesterov changed from False to True .*"
                                           r"Capture again"):
        plan.replay()
    q = gpudiff.ones(3, requires_grad=True)
    adam = gpudiff.optim.Adam([q])
    step(q, adam)
    adam.zero_grad(set_to_none=True)
    plan = _gpu_capture(lambda: step(q, adam))
    plan.replay()
    assert float(adam.state[q]["step"].array) == 2
