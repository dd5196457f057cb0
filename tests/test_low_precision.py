"""float16 / bfloat16 tensors: the dtype (bfloat16 is ml_dtypes', NumPy kind 'V'), promotion,
casts with gradients, float32 accumulation, batch norm with float32 parameters, modules,
optimizers and checkpoints; PyTorch CPU is the oracle."""
import numpy as np
import pytest

import gpudiff
import gpudiff.nn.functional as F

torch = pytest.importorskip("torch")
LOW = [("float16", torch.float16), ("bfloat16", torch.bfloat16)]


def _t(a, tdt):
    return torch.from_numpy(np.asarray(a, np.float32)).to(tdt)


def test_bfloat16_is_a_floating_dtype():
    x = gpudiff.tensor([1.0, 2.5], dtype=gpudiff.bfloat16)
    assert x.dtype == gpudiff.bfloat16 and str(x.dtype) == "bfloat16"
    assert x.is_floating_point() and x.requires_grad_().requires_grad
    assert repr(x.detach()) == "tensor([1.0000, 2.5000], dtype=gpudiff.bfloat16)"
    assert x.element_size() == 2
    with pytest.raises(RuntimeError, match="floating point"):
        gpudiff.tensor([1, 2]).requires_grad_()


@pytest.mark.parametrize("a,b,expected", [
    ("bfloat16", "float16", "float32"), ("bfloat16", "float32", "float32"),
    ("float16", "float64", "float64"), ("bfloat16", "bfloat16", "bfloat16"),
    ("bfloat16", "int64", "bfloat16"),
])
def test_promotion_equals_torch(a, b, expected):
    x = gpudiff.ones(3, dtype=getattr(gpudiff, a))
    y = gpudiff.ones(3, dtype=getattr(gpudiff, b))
    got = (x + y).dtype
    assert str(got) == expected == str(torch.ones(3, dtype=getattr(torch, a)).add(
        torch.ones(3, dtype=getattr(torch, b))).dtype).replace("torch.", "")
    assert (x * 2.5).dtype == x.dtype and (x / 3).dtype == x.dtype


@pytest.mark.parametrize("name,tdt", LOW)
def test_casts_carry_gradients_back_in_the_source_dtype(name, tdt):
    x = gpudiff.tensor([0.1, -2.0, 3.3], requires_grad=True)
    low = x.half() if name == "float16" else x.bfloat16()
    assert low.dtype == getattr(gpudiff, name) and low.grad_fn is not None
    y = (low * low).float().sum() + low.to(gpudiff.float64).sum()
    y.backward()
    tx = torch.tensor([0.1, -2.0, 3.3], requires_grad=True)
    tl = tx.to(tdt)
    ((tl * tl).float().sum() + tl.double().sum()).backward()
    assert x.grad.dtype == gpudiff.float32
    np.testing.assert_allclose(x.grad.numpy(), tx.grad.numpy(), rtol=1e-6)


@pytest.mark.parametrize("name,tdt", LOW)
def test_reductions_accumulate_in_float32(name, tdt):
    a = np.full(4096, 0.01, np.float32)
    x = gpudiff.tensor(a).to(getattr(gpudiff, name))
    s, m = x.sum(), x.mean()
    ts, tm = _t(a, tdt).sum(), _t(a, tdt).mean()
    assert s.dtype == x.dtype
    assert float(s) == float(ts) and float(m) == float(tm)
    # (a low-precision running sum would stall far below 40.96)
    assert abs(float(s) - 40.96) < 0.3


@pytest.mark.parametrize("name,tdt", LOW)
def test_batch_norm_low_precision_input_float32_parameters_equals_torch(name, tdt):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((4, 3, 5, 5)).astype(np.float32) * 3 + 1
    w, b = rng.uniform(0.5, 1.5, 3).astype(np.float32), rng.standard_normal(3).astype(np.float32)
    gx = gpudiff.tensor(x).to(getattr(gpudiff, name)).requires_grad_()
    gw, gb = gpudiff.tensor(w, requires_grad=True), gpudiff.tensor(b, requires_grad=True)
    rm, rv = gpudiff.zeros(3), gpudiff.ones(3)
    y = F.batch_norm(gx, rm, rv, gw, gb, training=True, momentum=0.1)
    tx = _t(x, tdt).requires_grad_()
    tw, tb = torch.tensor(w, requires_grad=True), torch.tensor(b, requires_grad=True)
    trm, trv = torch.zeros(3), torch.ones(3)
    ty = torch.nn.functional.batch_norm(tx, trm, trv, tw, tb, training=True, momentum=0.1)
    assert y.dtype == gx.dtype and str(ty.dtype).endswith(name)
    assert rm.dtype == gpudiff.float32   # the statistics stay float32
    np.testing.assert_allclose(rm.numpy(), trm.numpy(), rtol=1e-2, atol=1e-3)
    np.testing.assert_allclose(rv.numpy(), trv.numpy(), rtol=1e-2, atol=1e-3)
    np.testing.assert_allclose(y.detach().float().numpy(), ty.detach().float().numpy(),
                               rtol=2e-2, atol=2e-2)
    g = rng.standard_normal(x.shape).astype(np.float32)
    y.backward(gpudiff.tensor(g).to(y.dtype))
    ty.backward(_t(g, tdt))
    assert gw.grad.dtype == gpudiff.float32 and gx.grad.dtype == gx.dtype
    np.testing.assert_allclose(gw.grad.numpy(), tw.grad.numpy(), rtol=3e-2, atol=3e-2)
    np.testing.assert_allclose(gb.grad.numpy(), tb.grad.numpy(), rtol=3e-2, atol=3e-2)
    np.testing.assert_allclose(gx.grad.float().numpy(), tx.grad.float().numpy(), rtol=5e-2,
                               atol=5e-2)


@pytest.mark.parametrize("name,tdt", LOW)
def test_module_in_low_precision_trains_and_checkpoints(name, tdt, tmp_path):
    gpudiff.manual_seed(0)
    m = gpudiff.nn.Sequential(gpudiff.nn.Conv2d(1, 4, 3), gpudiff.nn.BatchNorm2d(4),
                              gpudiff.nn.ReLU(), gpudiff.nn.Flatten(), gpudiff.nn.Linear(36, 3))
    m = m.half() if name == "float16" else m.bfloat16()
    dt = getattr(gpudiff, name)
    assert all(p.dtype == dt for p in m.parameters())
    assert m[1].num_batches_tracked.dtype == gpudiff.int64
    opt = gpudiff.optim.SGD(m.parameters(), lr=0.1, momentum=0.9)
    x = gpudiff.randn(8, 1, 5, 5).to(dt)
    t = gpudiff.tensor([0, 1, 2, 0, 1, 2, 0, 1])
    losses = []
    for _ in range(5):
        opt.zero_grad()
        loss = F.cross_entropy(m(x), t)
        loss.backward()
        opt.step()
        losses.append(float(loss))
    assert all(p.dtype == dt and p.grad.dtype == dt for p in m.parameters())
    assert losses[-1] < losses[0]
    path = str(tmp_path / "m.safetensors")
    gpudiff.save(m.state_dict(), path)
    back = gpudiff.load(path)
    for k, v in m.state_dict().items():
        assert back[k].dtype == v.dtype
        np.testing.assert_array_equal(back[k].float().numpy(), v.detach().float().numpy())
    from safetensors.torch import load_file   # PyTorch reads our F16 / BF16 tensors
    theirs = load_file(path)
    assert theirs["0.weight"].dtype == tdt
    np.testing.assert_array_equal(theirs["0.weight"].float().numpy(),
                                  m[0].weight.detach().float().numpy())
