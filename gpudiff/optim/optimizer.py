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
    if not plan.record:  # a CUDA graph on a GPU: the capturable step
        return _step_cuda_graph(plan, opt)
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
    buckets = _grad_buckets(opt)

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


def _grad_buckets(opt):
    """[(device, group, params)]: the parameters with a .grad, by group, device and dtype, as
    ``_step_group`` buckets them (a capture fixes them)."""
    buckets = []
    for g in opt.param_groups:
        by = {}
        for p in g["params"]:
            if p.grad is not None:
                by.setdefault((p.device, p.dtype), []).append(p)
        buckets += [(dev, g, ps) for (dev, _), ps in by.items()]
    return buckets


def _step_cuda_graph(plan, opt):
    """``opt.step()`` in a CUDA graph on a GPU (``plan.record`` False): PyTorch's capturable
    step. A graph replays its kernels with the capture's arguments, so every value the host
    changes between steps (lr and the other group values, the bias corrections of a step
    count) is read by the kernels from *device scalars*, one vector per (group, device,
    dtype) bucket; a ``pre_replay`` hook writes the current values into them before each
    replay (computed from ``param_groups`` and the host step counters with the eager step's
    Python formulas) and advances the host state as an eager step does. The device work
    (``_graph_bucket``'s launch, the formulas of ``_update``) reads only fixed arrays:
    parameters, gradients, state buffers and those scalars. docs/GRAPHS.md."""
    name = type(opt).__name__
    where = f"{name}.step() inside a CUDA graph on a GPU"
    if opt._optimizer_step_pre_hooks or opt._optimizer_step_post_hooks or \
            getattr(type(opt).step, "__wrapped__", None) is not Optimizer.step.__wrapped__:
        raise capture.CaptureError(
            f"{where}: it has step hooks or a step() of its own, Python that a CUDA graph "
            f"cannot rerun at replay. Use gpudiff.Graph(), which reruns the step's Python at "
            f"each replay, or capture only forward and backward")
    if type(opt)._graph_bucket is Optimizer._graph_bucket:
        raise capture.CaptureError(
            f"{where}: {name} has no capturable step (its update would replay the "
            f"capture's scalars). SGD, Adam, AdamW, RMSprop, Adagrad and Adadelta have "
            f"one; use gpudiff.Graph(), which reruns the step's Python at each replay")
    buckets = _grad_buckets(opt)
    for dev, group, ps in buckets:
        opt._check_grads(ps)
        if not all(opt._state_ready(p, group) for p in ps):
            raise capture.CaptureError(
                f"{where}: warm up before capturing (run a few eager steps first, as PyTorch "
                f"asks), so that the optimizer state exists")
    parts = []
    for dev, group, ps in buckets:
        gs = opt._graph_bucket(dev, group, ps)
        if gs is None:
            raise capture.CaptureError(
                f"{where}: {name} has no capturable step for these parameters; use "
                f"gpudiff.Graph(), which reruns the step's Python at each replay")
        for p in ps:
            plan.static(p, weakref.ref)
        # the state arrays the graph updates: checked at replay (after a load_state_dict
        # the graph would update memory that no state tensor holds). The gradients are not:
        # a graph with the backward in it writes the arrays its step reads, whatever .grad
        # holds between replays (train.py's eager last batch replaces it)
        fixed = [(p, k, v.array) for p in ps for k, v in opt.state.get(p, {}).items()
                 if isinstance(v, Tensor) and k != "step"]
        with runtime.on_device(dev):
            scalars = _DeviceScalars(dev, ps[0].dtype, gs.names)
            plan.launch(functools.partial(gs.launch, scalars.view))
        parts.append((group, ps, gs, gs.structure(group), fixed, scalars))

    def pre_replay():
        for group, ps, gs, frozen, fixed, _ in parts:  # (every check before any change)
            now = gs.structure(group)
            for k, v in frozen.items():
                if now[k] != v:
                    raise capture.CaptureError(
                        f"replay: {name}'s {k} changed from {v} to {now[k]} after the capture: "
                        f"that changes the update's kernels, which a CUDA graph fixes at "
                        f"capture (a new value of a hyperparameter is fine, a new rule is "
                        f"not). Capture again (g.reset(), then capture), or use "
                        f"gpudiff.Graph()")
            for p, k, array in fixed:
                t = opt.state.get(p, {}).get(k)
                if t is None or t.array is not array:
                    raise capture.CaptureError(
                        f"replay: {name}: the state '{k}' of a parameter of shape "
                        f"{tuple(p.shape)} was replaced or removed after the capture "
                        f"(load_state_dict, ...), but the CUDA graph updates the captured "
                        f"memory. Capture again (g.reset(), then capture)")
        for group, ps, gs, _, _, scalars in parts:
            scalars.write(gs.values())
            for p in ps:
                p.bump_version()
        opt._opt_called = True
        opt._step_count = getattr(opt, "_step_count", 0) + 1
    plan.pre_replay.append(pre_replay)


class _GraphStep:
    """What an optimizer's ``_graph_bucket`` gives for one bucket of a CUDA graph:
    ``names`` of its device scalars; ``structure(group)`` -> {what: value}, the choices that
    pick the update's kernels (fixed at capture, checked at each replay); ``values()`` ->
    {name: Python float} for this step, advancing the host state (step counters) as the
    eager step does; ``launch(s)`` the update's device work, ``s`` {name: 0-d device array}."""

    __slots__ = ("launch", "names", "structure", "values")

    def __init__(self, names, structure, values, launch):
        self.names, self.structure, self.values, self.launch = \
            list(names), structure, values, launch


class _DeviceScalars:
    """One bucket's per-step scalars in device memory: a vector in the parameters' dtype
    (``array``) and a 0-d view of it per name (``view``, what the captured kernels read).
    ``write`` copies new values in with one host-to-device copy. A Python float stored here
    rounds as NumPy rounds it into an operation on arrays of that dtype, so the kernels see
    the eager step's scalars bit for bit."""

    def __init__(self, device, dtype, names):
        self.names = list(names)
        self.host = np.zeros(len(self.names), dtype)
        self.array = device.xp.empty(len(self.names), dtype)  # (no kernel: nothing recorded)
        self.view = {n: self.array[i, ...] for i, n in enumerate(self.names)}
        self._numpy = isinstance(self.array, np.ndarray)

    def write(self, values):
        h = self.host
        for i, n in enumerate(self.names):
            h[i] = values[n]
        if self._numpy:
            self.array[...] = h
        else:  # CuPy: one copy on the current stream, before the graph's launch
            self.array.set(h)


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
        self._check_grads(ps)
        self._apply_bucket(dev, group, ps)

    def _check_grads(self, ps):
        for p in ps:
            if p.grad.shape != p.shape:
                raise RuntimeError(f"{type(self).__name__}: gradient shape "
                                   f"{tuple(p.grad.shape)} does not match parameter shape "
                                   f"{tuple(p.shape)}")
            if p.grad.device != p.device:
                raise RuntimeError(f"{type(self).__name__}: the gradient is on {p.grad.device} "
                                   f"but the parameter on {p.device}")

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

    def _state_ready(self, p, group):
        """Whether ``p``'s state is complete (a step has run): a CUDA graph needs it."""
        return bool(self.state.get(p))

    def _graph_bucket(self, device, group, params):
        """The capturable step of one bucket for a CUDA graph on a GPU (a ``_GraphStep``,
        see ``_step_cuda_graph``). An optimizer that does not override this has none: its
        step raises in a CUDA graph; None (for a bucket it cannot take) raises too."""
        return None

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


def _lerp_values(weight, dtype):
    """The device scalars of ``_lerp_dev`` for ``_lerp_(a, end, weight)`` on ``dtype``
    arrays: {'lerp_w': weight, 'lerp_1mw': 1 - w in ``dtype`` arithmetic, as _lerp_}."""
    t = np.dtype(dtype).type
    return {"lerp_w": weight, "lerp_1mw": float(t(1) - t(weight))}


def _lerp_dev(a, end, s, small, xp):
    """``_lerp_`` with its weight in device scalars (``s``: 'lerp_w', 'lerp_1mw'); ``small``
    is ``abs(weight) < 0.5``, the formula chosen at capture."""
    if small:
        a += s["lerp_w"] * (end - a)
    else:
        d = end - a
        d *= s["lerp_1mw"]
        xp.subtract(end, d, out=a)
