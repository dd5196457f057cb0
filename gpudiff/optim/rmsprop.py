"""RMSprop (optionally centered, with momentum), PyTorch's update rule."""
from .optimizer import (
    Optimizer,
    _GraphStep,
    _lerp_,
    _lerp_dev,
    _lerp_values,
    _new_step,
    _zeros_like,
)


class RMSprop(Optimizer):
    """v = alpha * v + (1 - alpha) * g * g;  avg = sqrt(v - mean_g^2 if centered else v) + eps;
    p -= lr * g / avg (or through a momentum buffer b = momentum * b + g / avg).
    State: ``step``, ``square_avg`` (+ ``momentum_buffer``, ``grad_avg``).
    """

    def __init__(self, params, lr=1e-2, alpha=0.99, eps=1e-8, weight_decay=0, momentum=0,
                 centered=False, capturable=False, foreach=None, maximize=False,
                 differentiable=False):
        if not 0.0 <= lr:
            raise ValueError(f"Invalid learning rate: {lr}")
        if not 0.0 <= eps:
            raise ValueError(f"Invalid epsilon value: {eps}")
        if not 0.0 <= momentum:
            raise ValueError(f"Invalid momentum value: {momentum}")
        if not 0.0 <= weight_decay:
            raise ValueError(f"Invalid weight_decay value: {weight_decay}")
        if not 0.0 <= alpha:
            raise ValueError(f"Invalid alpha value: {alpha}")
        defaults = {"lr": lr, "momentum": momentum, "alpha": alpha, "eps": eps,
                    "centered": centered, "weight_decay": weight_decay,
                    "capturable": capturable, "foreach": foreach, "maximize": maximize,
                    "differentiable": differentiable}
        super().__init__(params, defaults)

    def _init_state(self, p, state, group):
        state["step"] = _new_step()
        state["square_avg"] = _zeros_like(p)
        if group["momentum"] > 0:
            state["momentum_buffer"] = _zeros_like(p)
        if group["centered"]:
            state["grad_avg"] = _zeros_like(p)

    def _graph_bucket(self, device, group, params):
        """The capturable step (CUDA graph on a GPU): ``_update``'s formulas, with lr, alpha,
        eps, weight_decay and momentum in device scalars (the step count is not in the
        update: it advances on the host before each replay)."""
        def structure(g):
            return {"momentum > 0": g["momentum"] > 0, "centered": bool(g["centered"]),
                    "maximize": bool(g["maximize"]), "weight_decay != 0": g["weight_decay"] != 0,
                    "abs(1 - alpha) < 0.5": abs(1 - g["alpha"]) < 0.5}
        rule = structure(group)
        momentum, centered, maximize = rule["momentum > 0"], rule["centered"], rule["maximize"]
        wd, small = rule["weight_decay != 0"], rule["abs(1 - alpha) < 0.5"]
        names = ["lr", "neg_lr", "alpha", "one_minus_alpha", "eps", "lerp_w", "lerp_1mw"] + \
            (["weight_decay"] if wd else []) + (["momentum"] if momentum else [])
        xp, dtype = device.xp, params[0].dtype
        states = [self.state[p] for p in params]
        arrays = [p.array for p in params]
        grads = [p.grad.array for p in params]
        sqs = [st["square_avg"].array for st in states]
        gavgs = [st["grad_avg"].array if centered else None for st in states]
        bufs = [st["momentum_buffer"].array if momentum else None for st in states]

        def values():
            for st in states:
                st["step"].array += 1
            lr, alpha = group["lr"], group["alpha"]
            v = _lerp_values(1 - alpha, dtype)
            v.update(lr=lr, neg_lr=-lr, alpha=alpha, one_minus_alpha=1 - alpha,
                     eps=group["eps"], weight_decay=group["weight_decay"],
                     momentum=group["momentum"])
            return v

        def launch(s):
            for p, g, square_avg, grad_avg, buf in zip(arrays, grads, sqs, gavgs, bufs):
                if maximize:
                    g = -g
                if wd:
                    g = g + s["weight_decay"] * p
                square_avg *= s["alpha"]
                square_avg += (s["one_minus_alpha"] * g) * g
                if centered:
                    _lerp_dev(grad_avg, g, s, small, xp)
                    avg = xp.sqrt(square_avg - grad_avg * grad_avg)
                else:
                    avg = xp.sqrt(square_avg)
                avg += s["eps"]
                if momentum:
                    buf *= s["momentum"]
                    buf += g / avg
                    p -= s["lr"] * buf
                else:
                    upd = s["neg_lr"] * g
                    upd /= avg
                    p += upd
        return _GraphStep(names, structure, values, launch)

    def _update(self, param, g, state, group):
        p, xp = param.array, param.device.xp
        lr, alpha, eps, wd = group["lr"], group["alpha"], group["eps"], group["weight_decay"]
        state["step"].array += 1
        if wd != 0:
            g = g + wd * p
        square_avg = state["square_avg"].array
        square_avg *= alpha
        square_avg += ((1 - alpha) * g) * g
        if group["centered"]:
            grad_avg = state["grad_avg"].array
            _lerp_(grad_avg, g, 1 - alpha, xp)
            # addcmul(value=-1): (-1 * a) * a; out of place (a 0-d difference is a scalar)
            avg = xp.sqrt(square_avg - grad_avg * grad_avg)
        else:
            avg = xp.sqrt(square_avg)
        avg += eps
        if group["momentum"] > 0:
            buf = state["momentum_buffer"].array
            buf *= group["momentum"]
            buf += g / avg
            p -= lr * buf
        else:
            upd = -lr * g
            upd /= avg
            p += upd
