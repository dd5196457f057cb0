"""Optimizers against PyTorch: N steps on the same parameters and gradients give the same
parameters (float32 rounding), state, state_dict round trips, param groups, errors."""
import copy

import numpy as np
import pytest
import torch

import gpudiff
from gpudiff import nn, optim

SHAPES = [(5, 3), (3,), (2, 2, 2), ()]   # (): a 0-d parameter
N_STEPS = 25


def make_data(seed=0):
    rng = np.random.default_rng(seed)
    init = [rng.standard_normal(s).astype(np.float32) for s in SHAPES]
    grads = [[rng.standard_normal(s).astype(np.float32) for s in SHAPES]
             for _ in range(N_STEPS)]
    return init, grads


def params_for(lib, init):
    return [lib.tensor(a.copy(), requires_grad=True) for a in init]


def run(lib, cls, kwargs, init, grads, groups=False, start=0, opt=None, ps=None):
    if ps is None:
        ps = params_for(lib, init)
    if opt is None:
        if groups:  # two groups: the second with its own lr
            opt = cls([{"params": ps[:2]}, {"params": ps[2:], "lr": 0.05}], **kwargs)
        else:
            opt = cls(ps, **kwargs)
    for gs in grads[start:]:
        for p, g in zip(ps, gs):
            p.grad = lib.tensor(g.copy())
        opt.step()
    return ps, opt


CASES = [
    ("SGD", {"lr": 0.1}),
    ("SGD", {"lr": 0.1, "momentum": 0.9}),
    ("SGD", {"lr": 0.05, "momentum": 0.9, "nesterov": True, "weight_decay": 0.01}),
    ("SGD", {"lr": 0.1, "momentum": 0.8, "dampening": 0.3, "maximize": True}),
    ("Adam", {"lr": 0.01}),
    ("Adam", {"lr": 0.01, "betas": (0.8, 0.95), "eps": 1e-6, "weight_decay": 0.1}),
    ("Adam", {"lr": 0.01, "amsgrad": True}),
    ("Adam", {"lr": 0.01, "amsgrad": True, "maximize": True, "weight_decay": 0.05}),
    ("Adam", {"lr": 0.01, "weight_decay": 0.1, "decoupled_weight_decay": True}),
    ("AdamW", {"lr": 0.01}),
    ("AdamW", {"lr": 0.01, "weight_decay": 0.3, "amsgrad": True}),
    ("RMSprop", {"lr": 0.01}),
    ("RMSprop", {"lr": 0.01, "alpha": 0.9, "momentum": 0.9}),
    ("RMSprop", {"lr": 0.01, "centered": True, "weight_decay": 0.1, "eps": 1e-4}),
    ("RMSprop", {"lr": 0.001, "centered": True, "momentum": 0.5, "maximize": True}),
    ("Adagrad", {"lr": 0.1}),
    ("Adagrad", {"lr": 0.1, "lr_decay": 0.01, "initial_accumulator_value": 0.1,
                 "weight_decay": 0.05}),
    ("Adadelta", {}),
    ("Adadelta", {"lr": 0.5, "rho": 0.95, "eps": 1e-5, "weight_decay": 0.1}),
    ("Adadelta", {"lr": 1.0, "maximize": True}),
]


def ids(case):
    return case[0] + "-" + "-".join(f"{k}={v}" for k, v in case[1].items())


def assert_params_close(ours, ref):
    for a, b in zip(ours, ref):
        np.testing.assert_allclose(a.detach().numpy(), b.detach().numpy(), rtol=2e-5,
                                   atol=2e-6)


@pytest.mark.parametrize("name, kwargs", CASES, ids=[ids(c) for c in CASES])
def test_steps_match_torch(name, kwargs):
    init, grads = make_data()
    ours, _ = run(gpudiff, getattr(optim, name), kwargs, init, grads)
    ref, _ = run(torch, getattr(torch.optim, name), kwargs, init, grads)
    assert_params_close(ours, ref)


GROUP_CASES = [CASES[2], CASES[6], CASES[13], CASES[16], CASES[18]]


@pytest.mark.parametrize("name, kwargs", GROUP_CASES, ids=[ids(c) for c in GROUP_CASES])
def test_param_groups_match_torch(name, kwargs):
    init, grads = make_data(1)
    ours, opt = run(gpudiff, getattr(optim, name), kwargs, init, grads, groups=True)
    ref, ropt = run(torch, getattr(torch.optim, name), kwargs, init, grads, groups=True)
    assert_params_close(ours, ref)
    assert [g["lr"] for g in opt.param_groups] == [g["lr"] for g in ropt.param_groups]


@pytest.mark.parametrize("name, kwargs", CASES, ids=[ids(c) for c in CASES])
def test_state_matches_torch(name, kwargs):
    init, grads = make_data(2)
    _, opt = run(gpudiff, getattr(optim, name), kwargs, init, grads[:4])
    _, ropt = run(torch, getattr(torch.optim, name), kwargs, init, grads[:4])
    sd, rsd = opt.state_dict(), ropt.state_dict()
    assert sorted(sd["state"]) == sorted(rsd["state"])
    for i in rsd["state"]:
        assert sorted(sd["state"][i]) == sorted(rsd["state"][i])
        for k, v in rsd["state"][i].items():
            ours = sd["state"][i][k]
            if isinstance(v, torch.Tensor):
                assert ours.dtype == np.dtype(str(v.dtype).replace("torch.", ""))
                np.testing.assert_allclose(ours.numpy(), v.numpy(), rtol=2e-5, atol=2e-6,
                                           err_msg=k)
            else:
                assert ours == v
    assert sd["param_groups"] == rsd["param_groups"]


@pytest.mark.parametrize("name, kwargs", CASES, ids=[ids(c) for c in CASES])
def test_state_dict_round_trip_mid_run_continues_identically(name, kwargs):
    init, grads = make_data(3)
    cls = getattr(optim, name)
    # reference: one optimizer for all steps
    full, _ = run(gpudiff, cls, kwargs, init, grads)
    # resumed: run half, save, rebuild everything from the state dicts, run the rest
    half = N_STEPS // 2
    ps, opt = run(gpudiff, cls, kwargs, init, grads[:half])
    saved_params = [p.detach().numpy().copy() for p in ps]
    saved_state = copy.deepcopy(opt.state_dict())
    ps2 = [gpudiff.tensor(a, requires_grad=True) for a in saved_params]
    opt2 = cls(ps2, **kwargs)
    opt2.load_state_dict(saved_state)
    resumed, _ = run(gpudiff, cls, kwargs, init, grads, start=half, opt=opt2, ps=ps2)
    for a, b in zip(full, resumed):
        np.testing.assert_array_equal(a.detach().numpy(), b.detach().numpy())
    # the loaded state is a private copy: stepping did not touch the saved dict
    for i, st in saved_state["state"].items():
        for k, v in st.items():
            if isinstance(v, gpudiff.Tensor) and k != "step":
                assert v.array is not opt2.state[ps2[i]][k].array


def test_load_torch_optimizer_state_dict():
    """A state dict written by torch (converted to gpudiff tensors) resumes identically."""
    init, grads = make_data(4)
    kwargs = {"lr": 0.01, "amsgrad": True}
    ref_ps, ropt = run(torch, torch.optim.Adam, kwargs, init, grads[:5])
    rsd = ropt.state_dict()
    sd = {"state": {i: {k: gpudiff.tensor(v.numpy()) for k, v in st.items()}
                    for i, st in rsd["state"].items()},
          "param_groups": copy.deepcopy(rsd["param_groups"])}
    ps = [gpudiff.tensor(p.detach().numpy(), requires_grad=True) for p in ref_ps]
    opt = optim.Adam(ps, **kwargs)
    opt.load_state_dict(sd)
    run(torch, None, None, init, grads, start=5, opt=ropt, ps=ref_ps)
    run(gpudiff, None, None, init, grads, start=5, opt=opt, ps=ps)
    assert_params_close(ps, ref_ps)


def test_step_skips_params_without_grad_and_closure():
    a = gpudiff.tensor([1.0, 2.0], requires_grad=True)
    b = gpudiff.tensor([3.0], requires_grad=True)
    opt = optim.SGD([a, b], lr=0.5)
    calls = []

    def closure():
        calls.append(1)
        opt.zero_grad()
        loss = (a * a).sum()
        loss.backward()
        return loss
    loss = opt.step(closure)
    assert calls == [1] and float(loss) == 5.0
    assert a.tolist() == [0.0, 0.0] and b.tolist() == [3.0] and b.grad is None
    assert opt.state_dict()["state"] == {}  # plain SGD keeps no state, as torch


def test_zero_grad():
    m = nn.Linear(3, 2)
    opt = optim.SGD(m.parameters(), lr=0.1)
    m(gpudiff.randn(4, 3)).sum().backward()
    opt.zero_grad(set_to_none=False)
    assert m.weight.grad is not None and float(m.weight.grad.abs().sum()) == 0.0
    opt.zero_grad()
    assert m.weight.grad is None and m.bias.grad is None


def test_step_is_in_place_and_bumps_version_of_saved_tensors():
    w = nn.Parameter(gpudiff.ones(3))
    opt = optim.SGD([w], lr=0.1)
    arr = w.array
    y = (w * w).sum()  # saves w for backward
    y.backward(retain_graph=True)
    opt.step()
    assert w.array is arr  # updated in place, same Parameter and memory
    np.testing.assert_allclose(w.detach().numpy(), [0.8, 0.8, 0.8], rtol=1e-6)
    with pytest.raises(RuntimeError):
        y.backward()  # w was modified in place after being saved: a clear error


def test_add_param_group_and_errors():
    a, b = gpudiff.zeros(2, requires_grad=True), gpudiff.zeros(3, requires_grad=True)
    opt = optim.Adam([a], lr=0.1)
    opt.add_param_group({"params": b, "lr": 0.01})
    assert [g["lr"] for g in opt.param_groups] == [0.1, 0.01]
    assert opt.param_groups[1]["betas"] == (0.9, 0.999)  # defaults filled in
    with pytest.raises(ValueError, match="some parameters appear in more than one parameter "
                                         "group"):
        opt.add_param_group({"params": [a]})
    with pytest.raises(TypeError, match="iterable of Tensors or dicts"):
        optim.SGD(a, lr=0.1)
    with pytest.raises(ValueError, match="optimizer got an empty parameter list"):
        optim.SGD([], lr=0.1)
    with pytest.raises(ValueError, match="can't optimize a non-leaf Tensor"):
        optim.SGD([a * 2], lr=0.1)
    with pytest.raises(TypeError, match="optimizer can only optimize Tensors"):
        optim.SGD([1.0], lr=0.1)
    with pytest.raises(TypeError, match="ordered collections"):
        optim.SGD([{"params": {a}}], lr=0.1)
    named = optim.SGD(nn.Linear(2, 2).named_parameters(), lr=0.1)
    assert named.param_groups[0]["param_names"] == ["weight", "bias"]


@pytest.mark.parametrize("make", [
    lambda o, p: o.SGD(p, lr=-1),
    lambda o, p: o.SGD(p, lr=0.1, momentum=-0.5),
    lambda o, p: o.SGD(p, lr=0.1, weight_decay=-1e-3),
    lambda o, p: o.SGD(p, lr=0.1, nesterov=True),
    lambda o, p: o.SGD(p, lr=0.1, momentum=0.9, dampening=0.1, nesterov=True),
    lambda o, p: o.Adam(p, lr=-0.01),
    lambda o, p: o.Adam(p, eps=-1.0),
    lambda o, p: o.Adam(p, betas=(1.0, 0.999)),
    lambda o, p: o.Adam(p, betas=(0.9, -0.1)),
    lambda o, p: o.Adam(p, weight_decay=-1.0),
    lambda o, p: o.AdamW(p, lr=-1),
    lambda o, p: o.RMSprop(p, alpha=-1.0),
    lambda o, p: o.RMSprop(p, momentum=-1.0),
    lambda o, p: o.Adagrad(p, lr_decay=-1.0),
    lambda o, p: o.Adagrad(p, initial_accumulator_value=-1.0),
    lambda o, p: o.Adadelta(p, rho=1.5),
    lambda o, p: o.Adadelta(p, eps=-1.0),
])
def test_hyperparameter_errors_match_torch(make):
    with pytest.raises(ValueError) as ref:
        make(torch.optim, [torch.zeros(2, requires_grad=True)])
    with pytest.raises(ValueError) as ours:
        make(optim, [gpudiff.zeros(2, requires_grad=True)])
    assert str(ours.value) == str(ref.value)


def test_load_state_dict_errors():
    a = gpudiff.zeros(2, requires_grad=True)
    opt = optim.Adam([a])
    with pytest.raises(ValueError, match="different number of parameter groups"):
        opt.load_state_dict({"state": {}, "param_groups": []})
    with pytest.raises(ValueError, match="doesn't match the size"):
        opt.load_state_dict({"state": {}, "param_groups": [{"params": [0, 1], "lr": 1.0}]})


def test_repr_and_hooks():
    opt = optim.SGD([gpudiff.zeros(2, requires_grad=True)], lr=0.1, momentum=0.9)
    ref = torch.optim.SGD([torch.zeros(2, requires_grad=True)], lr=0.1, momentum=0.9)
    assert repr(opt) == repr(ref)
    seen = []
    h = opt.register_step_post_hook(lambda o, args, kwargs: seen.append("post"))
    opt.register_step_pre_hook(lambda o, args, kwargs: seen.append("pre"))
    opt.step()
    h.remove()
    opt.step()
    assert seen == ["pre", "post", "pre"]


def test_custom_optimizer_subclass_with_own_step():
    class Sign(optim.Optimizer):
        def __init__(self, params, lr=0.1):
            super().__init__(params, {"lr": lr})

        @gpudiff.no_grad()
        def step(self, closure=None):
            for group in self.param_groups:
                for p in group["params"]:
                    if p.grad is not None:
                        p.sub_(p.grad.sign() * group["lr"])
    w = gpudiff.tensor([1.0, -1.0], requires_grad=True)
    opt = Sign([w])
    (w * gpudiff.tensor([2.0, -3.0])).sum().backward()
    opt.step()
    np.testing.assert_allclose(w.detach().numpy(), [0.9, -0.9], rtol=1e-6)
    assert opt._opt_called


def test_training_a_model_with_each_optimizer_lowers_the_loss():
    rng = np.random.default_rng(0)
    x = gpudiff.tensor(rng.standard_normal((64, 5)).astype(np.float32))
    y = gpudiff.tensor((rng.standard_normal((64, 5)) @ rng.standard_normal((5, 1)))
                       .astype(np.float32))
    for cls, kw in [(optim.SGD, {"lr": 0.05, "momentum": 0.9}), (optim.Adam, {"lr": 0.05}),
                    (optim.AdamW, {"lr": 0.05}), (optim.RMSprop, {"lr": 0.01}),
                    (optim.Adagrad, {"lr": 0.3}), (optim.Adadelta, {"lr": 1.0})]:
        gpudiff.manual_seed(0)
        m = nn.Linear(5, 1)
        opt = cls(m.parameters(), **kw)
        first = None
        for _ in range(60):
            opt.zero_grad()
            loss = nn.functional.mse_loss(m(x), y)
            loss.backward()
            opt.step()
            first = float(loss) if first is None else first
        # Adadelta starts with steps of ~sqrt(eps): it only gets going later
        assert float(loss) < (0.8 if cls is optim.Adadelta else 0.5) * first, cls.__name__


# ---- devices: the CUDA path (emulated unless GPUDIFF_TEST_REAL_GPU=1) -------------------
needs_cuda = pytest.mark.skipif(not gpudiff.cuda.is_available(),
                                reason="no CUDA device (real or emulated)")


@needs_cuda
@pytest.mark.parametrize("name, kwargs", CASES, ids=[ids(c) for c in CASES])
def test_cuda_steps_equal_cpu_steps(name, kwargs, monkeypatch):
    """SGD and Adam/AdamW go through the fused multi-tensor kernels on 'cuda' (checked by
    counting calls); every optimizer gives the CPU's parameters."""
    from gpudiff.runtime import kernels
    calls = []
    for kname in ("sgd_step", "adam_step"):
        k = kernels.KERNELS["cuda"].get(kname)
        if k is not None:
            def counting(*a, _k=k, _n=kname, **kw):
                calls.append(_n)
                return _k(*a, **kw)
            monkeypatch.setitem(kernels.KERNELS["cuda"], kname, counting)
    init, grads = make_data(5)
    cls = getattr(optim, name)
    cpu, _ = run(gpudiff, cls, kwargs, init, grads[:6])
    ps = [gpudiff.tensor(a.copy(), device="cuda", requires_grad=True) for a in init]
    opt = cls(ps, **kwargs)
    for gs in grads[:6]:
        for p, g in zip(ps, gs):
            p.grad = gpudiff.tensor(g.copy(), device="cuda")
        opt.step()
    for a, b in zip(cpu, ps):
        assert b.device.type == "cuda"
        np.testing.assert_allclose(b.detach().cpu().numpy(), a.detach().numpy(), rtol=1e-6,
                                   atol=1e-7)
    for st in opt.state.values():
        for k, v in st.items():
            if isinstance(v, gpudiff.Tensor):
                assert v.device.type == ("cpu" if k == "step" else "cuda"), k
    fused = {"SGD": "sgd_step", "Adam": "adam_step", "AdamW": "adam_step"}.get(name)
    if fused in kernels.KERNELS["cuda"]:
        assert calls.count(fused) >= 5  # SGD's first momentum step takes the reference path
    else:
        assert calls == []


@needs_cuda
def test_load_state_dict_moves_state_to_the_parameters_device():
    init, grads = make_data(6)
    _, opt = run(gpudiff, optim.Adam, {"lr": 0.01}, init, grads[:3])
    ps = [gpudiff.tensor(a, device="cuda", requires_grad=True) for a in init]
    opt2 = optim.Adam(ps, lr=0.01)
    opt2.load_state_dict(opt.state_dict())
    st = opt2.state[ps[0]]
    assert st["exp_avg"].device.type == "cuda" and st["step"].device.type == "cpu"
