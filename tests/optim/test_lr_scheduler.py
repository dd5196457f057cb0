"""Learning-rate schedulers: the lr (and momentum) sequences equal PyTorch's exactly."""
import copy
import math
import warnings

import numpy as np
import pytest
import torch

import gpudiff
from gpudiff import optim
from gpudiff.optim import lr_scheduler


def make_opt(lib_optim, lib, name="SGD", **kw):
    ps1 = [lib.zeros(2, requires_grad=True)]
    ps2 = [lib.zeros(3, requires_grad=True)]
    kw = {"lr": 0.1, **kw}
    return getattr(lib_optim, name)([{"params": ps1}, {"params": ps2, "lr": 0.5}], **kw)


def sequence(lib_optim, lib, sched_name, sched_kw, n=40, opt_name="SGD", opt_kw=None,
             metrics=None):
    opt = make_opt(lib_optim, lib, opt_name, **(opt_kw or {}))
    sched = getattr(lib_optim.lr_scheduler, sched_name)(opt, **sched_kw)
    out = [list(sched.get_last_lr())]
    for i in range(n):
        opt.step()
        if metrics is not None:
            sched.step(metrics[i])
        else:
            sched.step()
        g = opt.param_groups[0]
        out.append(list(sched.get_last_lr()) + [g.get("momentum"), g.get("betas")] +
                   [grp["lr"] for grp in opt.param_groups])
    return out


PLATEAU = list(np.r_[np.linspace(1, 0.5, 6), np.ones(14), np.linspace(1, 0.2, 5),
                     np.ones(15)])

CASES = [
    ("StepLR", {"step_size": 4}, {}),
    ("StepLR", {"step_size": 3, "gamma": 0.5}, {}),
    ("MultiStepLR", {"milestones": [3, 7, 7, 20], "gamma": 0.3}, {}),
    ("ExponentialLR", {"gamma": 0.9}, {}),
    ("CosineAnnealingLR", {"T_max": 7}, {}),
    ("CosineAnnealingLR", {"T_max": 10, "eta_min": 0.01}, {}),
    ("LambdaLR", {"lr_lambda": lambda e: 0.95 ** e}, {}),
    ("LambdaLR", {"lr_lambda": [lambda e: 1.0 / (e + 1), lambda e: e % 3]}, {}),
    ("OneCycleLR", {"max_lr": 1.0, "total_steps": 40}, {"opt_kw": {"momentum": 0.9}}),
    ("OneCycleLR", {"max_lr": [1.0, 2.0], "epochs": 4, "steps_per_epoch": 10,
                    "pct_start": 0.25, "anneal_strategy": "linear", "div_factor": 10.0},
     {"opt_kw": {"momentum": 0.9, "nesterov": True}}),
    ("OneCycleLR", {"max_lr": 0.01, "total_steps": 41, "three_phase": True},
     {"opt_name": "Adam"}),
    ("OneCycleLR", {"max_lr": 0.01, "total_steps": 40, "cycle_momentum": False}, {}),
    ("ReduceLROnPlateau", {"patience": 2}, {"metrics": PLATEAU}),
    ("ReduceLROnPlateau", {"mode": "max", "factor": 0.5, "patience": 1, "cooldown": 2,
                           "threshold_mode": "abs", "threshold": 0.1,
                           "min_lr": [0.01, 0.2]}, {"metrics": [-m for m in PLATEAU]}),
]


@pytest.mark.parametrize("name, kw, extra", CASES, ids=[c[0] + str(i) for i, c in
                                                        enumerate(CASES)])
def test_lr_sequence_equals_torch(name, kw, extra):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ours = sequence(optim, gpudiff, name, kw, **extra)
        ref = sequence(torch.optim, torch, name, kw, **extra)
    assert ours == ref  # exactly: the same float64 arithmetic in the same order


def test_step_with_epoch_uses_closed_form_like_torch():
    for name, kw in [("StepLR", {"step_size": 3}), ("MultiStepLR", {"milestones": [2, 5]}),
                     ("ExponentialLR", {"gamma": 0.8}), ("CosineAnnealingLR", {"T_max": 6})]:
        res = []
        for lib_optim, lib in ((optim, gpudiff), (torch.optim, torch)):
            opt = make_opt(lib_optim, lib)
            s = getattr(lib_optim.lr_scheduler, name)(opt, **kw)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                seq = []
                for e in [3, 1, 7, 4]:
                    opt.step()
                    s.step(e)
                    seq.append(s.get_last_lr())
            res.append(seq)
        assert res[0] == res[1], name


@pytest.mark.parametrize("name, kw", [
    ("StepLR", {"step_size": 3, "gamma": 0.5}),
    ("MultiStepLR", {"milestones": [2, 5, 9]}),
    ("CosineAnnealingLR", {"T_max": 5, "eta_min": 0.001}),
    ("ExponentialLR", {"gamma": 0.7}),
    ("OneCycleLR", {"max_lr": 1.0, "total_steps": 20}),
])
def test_state_dict_round_trip_continues_identically(name, kw):
    def build():
        opt = make_opt(optim, gpudiff, momentum=0.9)
        return opt, getattr(lr_scheduler, name)(opt, **kw)
    opt, s = build()
    full = []
    for _ in range(19):
        opt.step()
        s.step()
        full.append(s.get_last_lr())
    opt, s = build()
    part = []
    for _ in range(8):
        opt.step()
        s.step()
        part.append(s.get_last_lr())
    o_sd, s_sd = copy.deepcopy(opt.state_dict()), copy.deepcopy(s.state_dict())
    assert "optimizer" not in s_sd
    opt2, s2 = build()
    opt2.load_state_dict(o_sd)
    s2.load_state_dict(s_sd)
    for _ in range(11):
        opt2.step()
        s2.step()
        part.append(s2.get_last_lr())
    assert part == full


def test_reduce_on_plateau_state_dict_round_trip():
    opt = make_opt(optim, gpudiff)
    s = lr_scheduler.ReduceLROnPlateau(opt, patience=1)
    for m in [1.0, 0.9, 0.95, 0.97]:
        s.step(m)
    opt2 = make_opt(optim, gpudiff)
    opt2.load_state_dict(opt.state_dict())
    s2 = lr_scheduler.ReduceLROnPlateau(opt2, patience=1)
    s2.load_state_dict(s.state_dict())
    for m in [0.99, 0.98, 0.5, 0.6, 0.7]:
        s.step(m)
        s2.step(m)
        assert s.get_last_lr() == s2.get_last_lr()
    assert s.get_last_lr()[0] < 0.1 * 0.1 + 1e-12


def test_lambda_lr_state_dict_drops_functions_keeps_callable_objects():
    class Mult:
        def __init__(self):
            self.factor = 0.5

        def __call__(self, epoch):
            return self.factor ** epoch
    opt = make_opt(optim, gpudiff)
    s = lr_scheduler.LambdaLR(opt, [lambda e: 1.0, Mult()])
    sd = s.state_dict()
    assert sd["lr_lambdas"] == [None, {"factor": 0.5}]
    s.lr_lambdas[1].factor = 0.1
    s.load_state_dict(sd)
    assert s.lr_lambdas[1].factor == 0.5


def test_errors_like_torch():
    for make in [lambda o, lib: o.lr_scheduler.OneCycleLR(make_opt(o, lib), max_lr=1.0),
                 lambda o, lib: o.lr_scheduler.OneCycleLR(make_opt(o, lib), max_lr=1.0,
                                                          total_steps=0),
                 lambda o, lib: o.lr_scheduler.OneCycleLR(make_opt(o, lib), max_lr=[1.0],
                                                          total_steps=10),
                 lambda o, lib: o.lr_scheduler.OneCycleLR(make_opt(o, lib, "Adagrad"),
                                                          max_lr=1.0, total_steps=10),
                 lambda o, lib: o.lr_scheduler.ReduceLROnPlateau(make_opt(o, lib), factor=1.0),
                 lambda o, lib: o.lr_scheduler.ReduceLROnPlateau(make_opt(o, lib),
                                                                 mode="avg"),
                 lambda o, lib: o.lr_scheduler.LambdaLR(make_opt(o, lib), [lambda e: 1])]:
        with pytest.raises(ValueError) as ref:
            make(torch.optim, torch)
        with pytest.raises(ValueError) as ours:
            make(optim, gpudiff)
        assert str(ours.value) == str(ref.value)
    with pytest.raises(TypeError, match="is not an Optimizer"):
        lr_scheduler.StepLR(object(), 3)
    with pytest.raises(KeyError, match="initial_lr"):
        lr_scheduler.StepLR(make_opt(optim, gpudiff), 3, last_epoch=5)
    opt = make_opt(optim, gpudiff)
    s = lr_scheduler.OneCycleLR(opt, max_lr=1.0, total_steps=2)
    opt.step()
    s.step()
    s.step()
    with pytest.raises(ValueError, match="Tried to step 3 times"):
        s.step()


def test_warns_when_scheduler_steps_before_optimizer():
    opt = make_opt(optim, gpudiff)
    s = lr_scheduler.StepLR(opt, 2)
    with pytest.warns(UserWarning, match="before `optimizer.step\\(\\)`"):
        s.step()
    opt2 = make_opt(optim, gpudiff)
    s2 = lr_scheduler.StepLR(opt2, 2)
    opt2.step()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        s2.step()
    with pytest.warns(UserWarning, match="get_last_lr"):
        s2.get_lr()


def test_chained_schedulers_compose_like_torch():
    res = []
    for lib_optim, lib in ((optim, gpudiff), (torch.optim, torch)):
        opt = make_opt(lib_optim, lib)
        a = lib_optim.lr_scheduler.ExponentialLR(opt, gamma=0.9)
        b = lib_optim.lr_scheduler.StepLR(opt, step_size=3, gamma=0.1)
        seq = []
        for _ in range(10):
            opt.step()
            a.step()
            b.step()
            seq.append([g["lr"] for g in opt.param_groups])
        res.append(seq)
    assert res[0] == res[1]
    assert math.isclose(res[0][-1][0], 0.1 * 0.9 ** 10 * 0.1 ** 3)
