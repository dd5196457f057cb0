"""The Optimizer base: param_groups, per-parameter state, zero_grad, state_dict.

An optimizer updates parameters in place, under ``no_grad``, on the raw arrays
(``p.array``) with the device's array module (``p.device.xp``): no graph, few temporaries.
Each subclass writes its update rule once, for one parameter, in ``_update`` (PyTorch's
"single tensor" formulas, same order of float32 operations). ``_step_group`` is the one
place that loops over a group's parameters; a fused multi-tensor kernel
(``runtime.kernel(device, 'sgd_step')``, see gpudiff/runtime/kernels.py) replaces that loop
for a (device, dtype) bucket when a device provides one.
"""
import functools
import warnings
import weakref
from collections import OrderedDict, defaultdict

import numpy as np

from .. import runtime
from ..runtime import capture
from ..autograd.grad_mode import enable_grad, no_grad
from ..tensor import Tensor


class _RequiredParameter:
    """Marks a hyperparameter without a default (PyTorch's ``optim.optimizer.required``)."""

    def __repr__(self):
        return "<required parameter>"


required = _RequiredParameter()


class _Handle:
    def __init__(self, hooks, key):
        self.hooks, self.key = hooks, key

    def remove(self):
        self.hooks.pop(self.key, None)


def _wrap_step(step):
    """Run the step hooks around ``step`` and note that it was called (schedulers check
    that ``optimizer.step()`` comes before ``scheduler.step()``)."""
    @functools.wraps(step)
    def wrapper(self, *args, **kwargs):
        if capture.active is not None and capture.active.depth == 0:
            return _step_captured(capture.active, self, wrapper, args, kwargs)
        if self.__dict__.get("_in_step"):  # a subclass's step calling super().step()
            return step(self, *args, **kwargs)
        for hook in list(self._optimizer_step_pre_hooks.values()):
            res = hook(self, args, kwargs)
            if res is not None:
                args, kwargs = res
        self._in_step = True
        try:
            out = step(self, *args, **kwargs)
        finally:
            self._in_step = False
        self._opt_called = True
        self._step_count = getattr(self, "_step_count", 0) + 1
        for hook in list(self._optimizer_step_post_hooks.values()):
            hook(self, args, kwargs)
        return out
    wrapper._wrapped_step = True
    return wrapper


def _step_captured(plan, opt, step, args, kwargs):
    """``opt.step()`` inside a graph capture: run it once (its changes are undone when the
    capture ends: parameters, state arrays, the state dicts, the step count) and record a
    step that reruns it, hooks included. A replay reads the param groups then, so an lr that
    a scheduler changed between replays takes effect, and the step counters advance once per
    replay (docs/GRAPHS.md)."""
    if args or kwargs.get("closure") is not None:
        raise capture.CaptureError(
            f"{type(opt).__name__}.step(closure): a closure cannot be captured (it would run "
            f"once, at capture); capture the forward and backward and call step() without one")
    if not plan.record:  # a CUDA graph on a GPU: its kernels replay the capture's scalars
        _check_cuda_graph_step(plan, opt)
    for group in opt.param_groups:
        for p in group["params"]:
            plan.static(p, weakref.ref)
            plan.will_write(p.array)
    for st in opt.state.values():
        for v in st.values():
            if isinstance(v, Tensor):
                plan.will_write(v.array)
    saved = {k: dict(v) for k, v in opt.state.items()}
    counts = (opt.__dict__.get("_step_count"), opt.__dict__.get("_opt_called"))

    def restore():
        for k in [k for k in opt.state if k not in saved]:
            del opt.state[k]
        for k, v in saved.items():
            opt.state[k].clear()
            opt.state[k].update(v)
        for name, v in zip(("_step_count", "_opt_called"), counts):
            if v is None:
                opt.__dict__.pop(name, None)
            else:
                setattr(opt, name, v)
    plan.on_end(restore)
    out = plan.run(step, opt)
    if opt._optimizer_step_pre_hooks or opt._optimizer_step_post_hooks or \
            getattr(type(opt).step, "__wrapped__", None) is not Optimizer.step.__wrapped__:
        plan.add(lambda: step(opt))  # hooks or a step() of its own: rerun all of it
        return out
    # the base step: the buckets of parameters with a .grad are fixed by the capture (and
    # were checked by its step: shapes cannot change, the replay checks its static tensors)
    buckets = []
    for g in opt.param_groups:
        by = {}
        for p in g["params"]:
            if p.grad is not None:
                by.setdefault((p.device, p.dtype), []).append(p)
        buckets += [(dev, g, ps) for (dev, _), ps in by.items()]

    fused = [None] * len(buckets)  # per bucket: a replay of the fixed arrays, or None

    def fast():
        with no_grad():
            for i, (dev, group, params) in enumerate(buckets):
                f = fused[i]
                if f is None or not f():  # (made after a generic update: the state exists)
                    with runtime.on_device(dev):
                        opt._apply_bucket(dev, group, params)
                    fused[i] = opt._bucket_replay(dev, group, params)
        opt._opt_called = True
        opt._step_count = getattr(opt, "_step_count", 0) + 1
    plan.add(fast)
    return out


def _check_cuda_graph_step(plan, opt):
    """What a CUDA graph replays of ``opt.step()`` is the capture's kernels with the
    capture's scalar arguments: say so clearly instead of replaying a wrong update. Only an
    optimizer whose update reads nothing the host changes per step (SGD, with its momentum
    buffers made by warm-up steps) can be in one; a hyperparameter changed after the
    capture (a scheduler's lr) raises at the next replay."""
    name = type(opt).__name__
    if not opt._cuda_graph_safe:
        raise capture.CaptureError(
            f"{name}.step() inside a CUDA graph on a GPU: its step counts are read on the "
            f"host, so every replay would repeat the capture's bias corrections (gpudiff has "
            f"no capturable optimizers yet). Use gpudiff.Graph(), which reruns the step's "
            f"Python at each replay, or capture only forward and backward")
    for group in opt.param_groups:
        if any(p.grad is not None and not opt._state_ready(p, group) for p in group["params"]):
            raise capture.CaptureError(
                f"{name}.step() inside a CUDA graph: warm up before capturing (run a few "
                f"eager steps first, as PyTorch asks), so that the optimizer state exists")
    frozen = [(g, {k: v for k, v in g.items() if k != "params"}) for g in opt.param_groups]

    def check():
        for g, values in frozen:
            for k, v in values.items():
                if g.get(k) != v:
                    raise capture.CaptureError(
                        f"replay: {name}'s '{k}' changed from {v} to {g.get(k)} after the "
                        f"capture, but a CUDA graph replays the captured value (PyTorch's "
                        f"capturable optimizers keep it in a device tensor; gpudiff's do "
                        f"not yet). Capture again (g.reset(), then capture), or use "
                        f"gpudiff.Graph(), which reads it at each replay")
    plan.pre_replay.append(check)


def _typename(obj):
    if isinstance(obj, Tensor):
        return f"gpudiff.{type(obj).__name__}"
    return type(obj).__name__


class Optimizer:
    """Base class of all optimizers.

    params: an iterable of tensors, of (name, tensor) pairs, or of dicts (parameter groups,
    each with its own options; options not given take ``defaults``).
    """

    def __init_subclass__(cls, **kw):
        super().__init_subclass__(**kw)
        step = cls.__dict__.get("step")
        if step is not None and not getattr(step, "_wrapped_step", False):
            cls.step = _wrap_step(step)

    def __init__(self, params, defaults):
        self.defaults = defaults
        self._optimizer_step_pre_hooks = OrderedDict()
        self._optimizer_step_post_hooks = OrderedDict()
        self._hook_id = 0
        if isinstance(params, Tensor):
            raise TypeError("params argument given to the optimizer should be an iterable of "
                            "Tensors or dicts, but got " + _typename(params))
        self.state = defaultdict(dict)
        self.param_groups = []
        param_groups = list(params)
        if len(param_groups) == 0:
            raise ValueError("optimizer got an empty parameter list")
        if not isinstance(param_groups[0], dict):
            param_groups = [{"params": param_groups}]
        for group in param_groups:
            self.add_param_group(dict(group))

    def __getstate__(self):
        return {"defaults": self.defaults, "state": self.state,
                "param_groups": self.param_groups}

    def __setstate__(self, state):
        self.__dict__.update(state)
        self.__dict__.setdefault("_optimizer_step_pre_hooks", OrderedDict())
        self.__dict__.setdefault("_optimizer_step_post_hooks", OrderedDict())
        self.__dict__.setdefault("_hook_id", 0)

    def __repr__(self):
        s = type(self).__name__ + " ("
        for i, group in enumerate(self.param_groups):
            s += f"\nParameter Group {i}\n"
            for key in sorted(group):
                if key != "params":
                    s += f"    {key}: {group[key]}\n"
        return s + ")"

    # ---- groups -------------------------------------------------------------------------
    def add_param_group(self, param_group):
        """Add a group of parameters with its own options (e.g. a layer to fine-tune)."""
        if not isinstance(param_group, dict):
            raise TypeError(f"param_group must be a dict, but got {type(param_group)}")
        params = param_group["params"]
        if isinstance(params, Tensor):
            params = [params]
        elif isinstance(params, set):
            raise TypeError("optimizer parameters need to be organized in ordered collections, "
                            "but the ordering of tensors in sets will change between runs. "
                            "Please use a list instead.")
        else:
            params = list(params)
        tensors, names = [], []
        for p in params:
            if isinstance(p, tuple):
                names.append(p[0])
                tensors.append(p[1])
            else:
                tensors.append(p)
        param_group["params"] = tensors
        if names:
            if len(names) != len(tensors):
                raise ValueError("all optimizer params should be with/without names. Some "
                                 "param names are missing")
            param_group["param_names"] = names
        for p in tensors:
            if not isinstance(p, Tensor):
                raise TypeError("optimizer can only optimize Tensors, but one of the params is "
                                + _typename(p))
            if not (p.is_leaf or p.retains_grad):
                raise ValueError("can't optimize a non-leaf Tensor")
        for name, default in self.defaults.items():
            if default is required and name not in param_group:
                raise ValueError(f"parameter group didn't specify a value of required "
                                 f"optimization parameter {name}")
            param_group.setdefault(name, default)
        ids = [id(p) for p in tensors]
        if len(ids) != len(set(ids)):
            warnings.warn("optimizer contains a parameter group with duplicate parameters; in "
                          "future, this will cause an error; see "
                          "github.com/pytorch/pytorch/issues/40967 for more information",
                          stacklevel=3)
        seen = set()
        for group in self.param_groups:
            seen.update(id(p) for p in group["params"])
            if ("param_names" in param_group) != ("param_names" in group):
                txt = "with names" if "param_names" in param_group else "without names"
                raise ValueError(f"all optimizer param groups should be with/without names. "
                                 f"cannot add param group {txt} to the optimizer")
        if not seen.isdisjoint(ids):
            raise ValueError("some parameters appear in more than one parameter group")
        self.param_groups.append(param_group)

    # ---- gradients ----------------------------------------------------------------------
    def zero_grad(self, set_to_none=True):
        """Reset the gradients: to None (default), or to zeros in place."""
        from ..autograd import zero_grads
        zero_grads((p for group in self.param_groups for p in group["params"]), set_to_none)

    # ---- the step -----------------------------------------------------------------------
    def step(self, closure=None):
        """One update of every parameter that has a gradient.

        ``closure`` (optional) re-evaluates the model and returns the loss; it runs with
        grad enabled and its loss is returned.
        """
        loss = None
        if closure is not None:
            with enable_grad():
                loss = closure()
        with no_grad():
            for group in self.param_groups:
                params = [p for p in group["params"] if p.grad is not None]
                if params:
                    self._step_group(group, params)
        return loss

    def _step_group(self, group, params):
        """Update ``params`` (those of ``group`` that have a .grad).

        Buckets by (device, dtype); a bucket goes to ``self._fused_step`` (a device's
        multi-tensor kernel, when one is registered and accepts it) or else through
        ``_update`` one parameter at a time.
        """
        buckets = {}
        for p in params:
            buckets.setdefault((p.device, p.dtype), []).append(p)
        for (dev, _), ps in buckets.items():
            with runtime.on_device(dev):  # new state arrays land on the parameters' GPU
                self._step_bucket(dev, group, ps)

    def _step_bucket(self, dev, group, ps):
        for p in ps:
            if p.grad.shape != p.shape:
                raise RuntimeError(f"{type(self).__name__}: gradient shape "
                                   f"{tuple(p.grad.shape)} does not match parameter shape "
                                   f"{tuple(p.shape)}")
            if p.grad.device != p.device:
                raise RuntimeError(f"{type(self).__name__}: the gradient is on {p.grad.device} "
                                   f"but the parameter on {p.device}")
        self._apply_bucket(dev, group, ps)

    def _apply_bucket(self, dev, group, ps):
        """The update of one checked (device, dtype) bucket (a captured step replays this)."""
        states = [self._state_for(p, group) for p in ps]
        if self._fused_step(dev, group, ps, states) is NotImplemented:
            for p, st in zip(ps, states):
                g = -p.grad.array if group.get("maximize", False) else p.grad.array
                self._update(p, g, st, group)
        for p in ps:
            p.bump_version()  # saved-for-backward checks see the in-place update

    def _state_for(self, p, group):
        """This parameter's state dict, initialised on first use."""
        st = self.state[p]
        if not st:
            self._init_state(p, st, group)
        return st

    def _init_state(self, p, state, group):
        """Fill a new parameter's state (exp_avg, step, ...); override in subclasses."""

    def _update(self, param, g, state, group):
        """Update ``param.array`` in place with the raw gradient array ``g`` (already
        negated for maximize); override in subclasses."""
        raise NotImplementedError(f"{type(self).__name__} does not implement _update; "
                                  f"override step() or _update()")

    def _fused_step(self, device, group, params, states):
        """Hook for a device's multi-tensor kernel; NotImplemented means 'use _update'."""
        return NotImplemented

    #: whether ``step`` can be in a CUDA graph on a GPU (_check_cuda_graph_step)
    _cuda_graph_safe = False

    def _state_ready(self, p, group):
        """Whether ``p``'s state is complete (a step has run): a CUDA graph needs it."""
        return bool(self.state.get(p))

    def _bucket_replay(self, device, group, params):
        """For a captured step: a closure updating this bucket on the arrays it holds now,
        faster than ``_apply_bucket`` (it returns False, doing nothing, when the state it
        took has changed since); None where the optimizer has none."""
        return None

    # ---- hooks --------------------------------------------------------------------------
    def register_step_pre_hook(self, hook):
        """``hook(optimizer, args, kwargs) -> None or (args, kwargs)`` before each step."""
        self._hook_id += 1
        self._optimizer_step_pre_hooks[self._hook_id] = hook
        return _Handle(self._optimizer_step_pre_hooks, self._hook_id)

    def register_step_post_hook(self, hook):
        """``hook(optimizer, args, kwargs)`` after each step."""
        self._hook_id += 1
        self._optimizer_step_post_hooks[self._hook_id] = hook
        return _Handle(self._optimizer_step_post_hooks, self._hook_id)

    # ---- state dict ---------------------------------------------------------------------
    def state_dict(self):
        """{'state': {index: {name: tensor or number}}, 'param_groups': [options +
        'params': [indices]]}, with parameters numbered in group order, as PyTorch."""
        index = {}
        start = 0

        def pack(group):
            nonlocal start
            packed = {k: v for k, v in group.items() if k != "params"}
            for i, p in enumerate(group["params"], start):
                index.setdefault(id(p), i)
            packed["params"] = [index[id(p)] for p in group["params"]]
            start += len(packed["params"])
            return packed

        groups = [pack(g) for g in self.param_groups]
        state = {(index[id(k)] if isinstance(k, Tensor) else k): v
                 for k, v in self.state.items() if not isinstance(k, Tensor) or id(k) in index}
        return {"state": state, "param_groups": groups}

    def load_state_dict(self, state_dict):
        """Restore state and options saved by ``state_dict`` (tensors are copied to each
        parameter's device; floating state to the parameter's dtype, 'step' as is)."""
        import copy
        groups = self.param_groups
        saved_groups = copy.deepcopy(state_dict["param_groups"])
        if len(groups) != len(saved_groups):
            raise ValueError("loaded state dict has a different number of parameter groups")
        if any(len(g["params"]) != len(s["params"]) for g, s in zip(groups, saved_groups)):
            raise ValueError("loaded state dict contains a parameter group that doesn't match "
                             "the size of optimizer's group")
        id_map = {}
        for g, s in zip(groups, saved_groups):
            for pid, p in zip(s["params"], g["params"]):
                id_map[pid] = p

        def cast(param, value, key=None):
            if isinstance(value, Tensor):
                if key == "step":
                    return value.clone() if value.grad_fn is None else value.detach().clone()
                out = value.detach()
                if param.is_floating_point() and out.is_floating_point():
                    out = out.to(param.dtype)
                out = out.to(param.device)
                if out.array is value.array:  # a private copy: the caller's dict is not aliased
                    out = Tensor.from_array(out.device.xp.copy(out.array, order="C"), out.device)
                return out
            if isinstance(value, dict):
                return {k: cast(param, v, k) for k, v in value.items()}
            if isinstance(value, (list, tuple)):
                return type(value)(cast(param, v) for v in value)
            if isinstance(value, np.ndarray):
                return cast(param, Tensor.from_array(value, runtime.CPU), key)
            return value

        state = defaultdict(dict)
        for k, v in state_dict["state"].items():
            key = k
            if not isinstance(key, int) and isinstance(key, str) and key.isdigit():
                key = int(key)  # JSON-style checkpoints turn integer keys into strings
            if key in id_map:
                state[id_map[key]] = cast(id_map[key], v)
            else:
                state[k] = v
        new_groups = []
        for g, s in zip(groups, saved_groups):
            s["params"] = g["params"]
            if "param_names" in g and "param_names" not in s:
                s["param_names"] = g["param_names"]
            new_groups.append(s)
        self.__setstate__({"state": state, "param_groups": new_groups})


Optimizer.step = _wrap_step(Optimizer.step)


def _step_value(state):
    """The 'step' count stored as a 0-d float32 CPU tensor (as PyTorch) -> Python float."""
    return float(state["step"].array)


def _new_step():
    return Tensor.from_array(np.zeros((), np.float32), runtime.CPU)


def _zeros_like(p):
    return Tensor.from_array(p.device.xp.zeros_like(p.array), p.device)


def _lerp_(a, end, weight, xp):
    """a.lerp_(end, weight) with PyTorch's two formulas (weight < 0.5 or not), in place."""
    w = a.dtype.type(weight)
    if abs(weight) < 0.5:
        a += w * (end - a)
    else:
        d = end - a
        d *= a.dtype.type(1) - w
        xp.subtract(end, d, out=a)
