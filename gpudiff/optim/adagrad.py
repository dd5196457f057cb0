"""Adagrad, PyTorch's update rule (state created for every parameter up front)."""
from .. import runtime
from ..tensor import Tensor
from .optimizer import Optimizer, _GraphStep, _new_step, _step_value


class Adagrad(Optimizer):
    """s += g * g;  p -= clr * g / (sqrt(s) + eps), clr = lr / (1 + (t - 1) * lr_decay).
    State: ``step``, ``sum`` (starting at ``initial_accumulator_value``).
    """

    def __init__(self, params, lr=1e-2, lr_decay=0, weight_decay=0,
                 initial_accumulator_value=0, eps=1e-10, foreach=None, *, maximize=False,
                 differentiable=False, fused=None):
        if not 0.0 <= lr:
            raise ValueError(f"Invalid learning rate: {lr}")
        if not 0.0 <= lr_decay:
            raise ValueError(f"Invalid lr_decay value: {lr_decay}")
        if not 0.0 <= weight_decay:
            raise ValueError(f"Invalid weight_decay value: {weight_decay}")
        if not 0.0 <= initial_accumulator_value:
            raise ValueError(f"Invalid initial_accumulator_value value: "
                             f"{initial_accumulator_value}")
        if not 0.0 <= eps:
            raise ValueError(f"Invalid epsilon value: {eps}")
        defaults = {"lr": lr, "lr_decay": lr_decay, "eps": eps, "weight_decay": weight_decay,
                    "initial_accumulator_value": initial_accumulator_value,
                    "foreach": foreach, "maximize": maximize,
                    "differentiable": differentiable, "fused": fused}
        super().__init__(params, defaults)
        for group in self.param_groups:
            for p in group["params"]:
                self._init_state(p, self.state[p], group)

    def _init_state(self, p, state, group):
        state["step"] = _new_step()
        with runtime.on_device(p.device):
            state["sum"] = Tensor.from_array(
                p.device.xp.full(p.shape, group["initial_accumulator_value"], dtype=p.dtype),
                p.device)

    def _graph_bucket(self, device, group, params):
        """The capturable step (CUDA graph on a GPU): ``_update``'s formulas, with eps,
        weight_decay and each parameter's ``-lr / (1 + (step - 1) * lr_decay)`` in device
        scalars (the step counts stay on the host and advance before each replay)."""
        def structure(g):
            return {"maximize": bool(g["maximize"]), "weight_decay != 0": g["weight_decay"] != 0}
        rule = structure(group)
        maximize, wd = rule["maximize"], rule["weight_decay != 0"]
        n = len(params)
        names = ["eps"] + (["weight_decay"] if wd else []) + [("neg_clr", i) for i in range(n)]
        xp = device.xp
        states = [self.state[p] for p in params]
        arrays = [p.array for p in params]
        grads = [p.grad.array for p in params]
        sums = [st["sum"].array for st in states]

        def values():
            v = {"eps": group["eps"], "weight_decay": group["weight_decay"]}
            for i, st in enumerate(states):
                st["step"].array += 1
                step = _step_value(st)
                v["neg_clr", i] = -(group["lr"] / (1 + (step - 1) * group["lr_decay"]))
            return v

        def launch(s):
            for i, (p, g, sm) in enumerate(zip(arrays, grads, sums)):
                if maximize:
                    g = -g
                if wd:
                    g = g + s["weight_decay"] * p
                sm += g * g
                std = xp.sqrt(sm)
                std += s["eps"]
                upd = s["neg_clr", i] * g
                upd /= std
                p += upd
        return _GraphStep(names, structure, values, launch)

    def _update(self, param, g, state, group):
        p, xp = param.array, param.device.xp
        state["step"].array += 1
        step = _step_value(state)
        if group["weight_decay"] != 0:
            g = g + group["weight_decay"] * p
        clr = group["lr"] / (1 + (step - 1) * group["lr_decay"])
        s = state["sum"].array
        s += g * g
        std = xp.sqrt(s)
        std += group["eps"]
        upd = -clr * g
        upd /= std
        p += upd
