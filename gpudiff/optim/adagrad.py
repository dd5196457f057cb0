"""Adagrad, PyTorch's update rule (state created for every parameter up front)."""
from .. import runtime
from ..tensor import Tensor
from .optimizer import Optimizer, _new_step, _step_value


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
