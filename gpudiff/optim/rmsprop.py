"""RMSprop (optionally centered, with momentum), PyTorch's update rule."""
from .optimizer import Optimizer, _lerp_, _new_step, _zeros_like


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
            avg = square_avg - grad_avg * grad_avg   # addcmul(value=-1): (-1 * a) * a
            xp.sqrt(avg, out=avg)
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
