"""Adadelta, PyTorch's update rule."""
from .optimizer import Optimizer, _GraphStep, _new_step, _zeros_like


class Adadelta(Optimizer):
    """v = rho * v + (1 - rho) * g^2;  d = sqrt(u + eps) / sqrt(v + eps) * g;
    u = rho * u + (1 - rho) * d^2;  p -= lr * d (Zeiler, 2012).
    State: ``step``, ``square_avg`` (v), ``acc_delta`` (u).
    """

    def __init__(self, params, lr=1.0, rho=0.9, eps=1e-6, weight_decay=0, foreach=None, *,
                 capturable=False, maximize=False, differentiable=False):
        if not 0.0 <= lr:
            raise ValueError(f"Invalid learning rate: {lr}")
        if not 0.0 <= rho <= 1.0:
            raise ValueError(f"Invalid rho value: {rho}")
        if not 0.0 <= eps:
            raise ValueError(f"Invalid epsilon value: {eps}")
        if not 0.0 <= weight_decay:
            raise ValueError(f"Invalid weight_decay value: {weight_decay}")
        defaults = {"lr": lr, "rho": rho, "eps": eps, "weight_decay": weight_decay,
                    "maximize": maximize, "capturable": capturable, "foreach": foreach,
                    "differentiable": differentiable}
        super().__init__(params, defaults)

    def _init_state(self, p, state, group):
        state["step"] = _new_step()
        state["square_avg"] = _zeros_like(p)
        state["acc_delta"] = _zeros_like(p)

    def _graph_bucket(self, device, group, params):
        """The capturable step (CUDA graph on a GPU): ``_update``'s formulas, with lr, rho,
        eps and weight_decay in device scalars (the step count advances on the host)."""
        def structure(g):
            return {"maximize": bool(g["maximize"]), "weight_decay != 0": g["weight_decay"] != 0}
        rule = structure(group)
        maximize, wd = rule["maximize"], rule["weight_decay != 0"]
        names = ["lr", "rho", "one_minus_rho", "eps"] + (["weight_decay"] if wd else [])
        xp = device.xp
        states = [self.state[p] for p in params]
        arrays = [p.array for p in params]
        grads = [p.grad.array for p in params]
        sqs = [st["square_avg"].array for st in states]
        accs = [st["acc_delta"].array for st in states]

        def values():
            for st in states:
                st["step"].array += 1
            return {"lr": group["lr"], "rho": group["rho"], "one_minus_rho": 1 - group["rho"],
                    "eps": group["eps"], "weight_decay": group["weight_decay"]}

        def launch(s):
            for p, g, square_avg, acc_delta in zip(arrays, grads, sqs, accs):
                if maximize:
                    g = -g
                if wd:
                    g = g + s["weight_decay"] * p
                square_avg *= s["rho"]
                square_avg += (s["one_minus_rho"] * g) * g
                std = xp.sqrt(square_avg + s["eps"])
                delta = xp.sqrt(acc_delta + s["eps"])
                delta /= std
                delta *= g
                acc_delta *= s["rho"]
                acc_delta += (s["one_minus_rho"] * delta) * delta
                p -= s["lr"] * delta
        return _GraphStep(names, structure, values, launch)

    def _update(self, param, g, state, group):
        p, xp = param.array, param.device.xp
        rho, eps, lr = group["rho"], group["eps"], group["lr"]
        state["step"].array += 1
        if group["weight_decay"] != 0:
            g = g + group["weight_decay"] * p
        square_avg, acc_delta = state["square_avg"].array, state["acc_delta"].array
        square_avg *= rho
        square_avg += ((1 - rho) * g) * g
        std = xp.sqrt(square_avg + eps)
        delta = xp.sqrt(acc_delta + eps)
        delta /= std
        delta *= g
        acc_delta *= rho
        acc_delta += ((1 - rho) * delta) * delta
        p -= lr * delta
