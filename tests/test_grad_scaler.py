"""GradScaler: the same scale sequence, growth tracker and skipped steps as
torch.amp.GradScaler for the same gradients with injected inf/NaN; parameters never take an
inf/NaN; unscale_ once per step; state_dict round trip; the fused CUDA unscale kernel."""
import numpy as np
import pytest

import gpudiff

torch = pytest.importorskip("torch")

# gradient events per step: 0 finite, "inf" / "nan" injected into one parameter's gradient
EVENTS = [0, 0, "inf", 0, 0, 0, "nan", 0, 0, 0, 0, 0, 0, "inf", "inf", 0, 0, 0, 0, 0]


def _grads(step, event, shapes):
    rng = np.random.default_rng(step)
    gs = [rng.standard_normal(s).astype(np.float32) for s in shapes]
    if event:
        gs[step % len(gs)].flat[step % gs[step % len(gs)].size] = np.inf if event == "inf" \
            else np.nan
    return gs


def _run(lib, device, unscale_first, **kw):
    shapes = [(3, 4), (4,), (2, 2, 3)]
    init = [np.random.default_rng(10 + i).standard_normal(s).astype(np.float32)
            for i, s in enumerate(shapes)]
    if lib is torch:
        ps = [torch.nn.Parameter(torch.from_numpy(a.copy())) for a in init]
        opt = torch.optim.SGD(ps, lr=0.1)
        scaler = torch.amp.GradScaler("cpu", **kw)
    else:
        ps = [gpudiff.nn.Parameter(gpudiff.tensor(a, device=device)) for a in init]
        opt = gpudiff.optim.SGD(ps, lr=0.1)
        scaler = gpudiff.amp.GradScaler(device, **kw)
    scales, trackers, params = [], [], []
    for step, event in enumerate(EVENTS):
        opt.zero_grad()
        gs = _grads(step, event, shapes)
        for p, g in zip(ps, gs):
            # the loss sum(p * g) scaled: p.grad = g * scale
            loss = (p * (torch.from_numpy(g) if lib is torch else
                         gpudiff.tensor(g, device=device))).sum()
            scaler.scale(loss).backward()
        if unscale_first:
            scaler.unscale_(opt)
        scaler.step(opt)
        scaler.update()
        scales.append(scaler.get_scale())
        trackers.append(scaler._get_growth_tracker())
        params.append([np.array(p.detach().cpu().numpy()) for p in ps])
    return scales, trackers, params


@pytest.mark.parametrize("unscale_first", [False, True])
@pytest.mark.parametrize("device", ["cpu", "cuda"])
def test_scale_sequence_and_skipped_steps_equal_torch(device, unscale_first):
    if device == "cuda" and not gpudiff.cuda.is_available():
        pytest.skip("no cuda device (GPUDIFF_CUDA=emulate)")
    kw = dict(init_scale=2.0 ** 10, growth_factor=3.0, backoff_factor=0.25, growth_interval=3)
    ts, tt, tp = _run(torch, "cpu", unscale_first, **kw)
    gs, gt, gp = _run(gpudiff, device, unscale_first, **kw)
    assert gs == ts, "scale sequence differs from torch.amp.GradScaler"
    assert gt == tt, "growth tracker differs"
    # the scale really moved both ways
    assert min(ts) < kw["init_scale"] < max(ts)
    for step, (a, b) in enumerate(zip(gp, tp)):
        for x, y in zip(a, b):
            assert np.isfinite(x).all(), f"step {step}: a parameter took inf/NaN"
            np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-6, err_msg=f"step {step}")
    # skipped steps leave the parameters exactly as they were
    for step, event in enumerate(EVENTS):
        if event and step:
            for x, y in zip(gp[step], gp[step - 1]):
                np.testing.assert_array_equal(x, y)


def test_defaults_state_dict_and_disabled():
    s = gpudiff.amp.GradScaler("cpu")
    t = torch.amp.GradScaler("cpu")
    assert s.get_scale() == t.get_scale() == 65536.0
    assert (s.get_growth_factor(), s.get_backoff_factor(), s.get_growth_interval()) == \
        (t.get_growth_factor(), t.get_backoff_factor(), t.get_growth_interval())
    assert s.is_enabled()
    sd = s.state_dict()
    assert set(sd) == set(t.state_dict()) and sd["scale"] == 65536.0
    s2 = gpudiff.amp.GradScaler("cpu", init_scale=4.0)
    s2.load_state_dict({**sd, "scale": 8.0, "_growth_tracker": 5})
    assert s2.get_scale() == 8.0 and s2._get_growth_tracker() == 5
    s2.update(new_scale=2.0)
    assert s2.get_scale() == 2.0
    off = gpudiff.amp.GradScaler("cpu", enabled=False)
    x = gpudiff.ones(2, requires_grad=True)
    assert off.scale(x) is x and off.get_scale() == 1.0 and off.state_dict() == {}
    with pytest.raises(RuntimeError, match="empty"):
        s.load_state_dict({})
    assert gpudiff.cuda.amp.GradScaler(init_scale=8.0).get_scale() == 8.0


def test_unscale_twice_step_twice_and_bad_arguments():
    p = gpudiff.nn.Parameter(gpudiff.ones(3))
    opt = gpudiff.optim.SGD([p], lr=1.0)
    s = gpudiff.amp.GradScaler("cpu", init_scale=4.0)
    s.scale((p * 2).sum()).backward()
    assert p.grad.tolist() == [8.0, 8.0, 8.0]
    s.unscale_(opt)
    assert p.grad.tolist() == [2.0, 2.0, 2.0]
    with pytest.raises(RuntimeError, match="already been called"):
        s.unscale_(opt)
    s.step(opt)
    assert p.detach().tolist() == [-1.0, -1.0, -1.0]
    with pytest.raises(RuntimeError, match="already been called"):
        s.step(opt)
    s.update()
    with pytest.raises(ValueError, match="growth_factor"):
        gpudiff.amp.GradScaler("cpu", growth_factor=1.0)
    with pytest.raises(RuntimeError, match="'tpu'"):
        gpudiff.amp.GradScaler("tpu")
    half = gpudiff.nn.Parameter(gpudiff.ones(2).half())
    opt2 = gpudiff.optim.SGD([half], lr=1.0)
    s.scale((half * 1).float().sum()).backward()
    with pytest.raises(ValueError, match="FP16 gradients"):
        s.unscale_(opt2)
