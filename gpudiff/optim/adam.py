"""Adam (with amsgrad) and AdamW (decoupled weight decay), PyTorch's update rule."""
from .. import runtime
from .optimizer import (
    Optimizer,
    _GraphStep,
    _lerp_,
    _lerp_dev,
    _lerp_values,
    _new_step,
    _step_value,
    _zeros_like,
)


class Adam(Optimizer):
    """Adam (Kingma & Ba, 2014).

    m = lerp(m, g, 1 - beta1);  v = beta2 * v + (1 - beta2) * g * g;
    p -= lr / (1 - beta1^t) * m / (sqrt(v) / sqrt(1 - beta2^t) + eps)
    (v -> max over steps of v with ``amsgrad``). ``weight_decay`` adds wd * p to g (L2), or
    with ``decoupled_weight_decay`` multiplies p by 1 - lr * wd first (AdamW).
    State: ``step``, ``exp_avg``, ``exp_avg_sq`` (+ ``max_exp_avg_sq``).
    """

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0,
                 amsgrad=False, *, foreach=None, maximize=False, capturable=False,
                 differentiable=False, fused=None, decoupled_weight_decay=False):
        if not 0.0 <= lr:
            raise ValueError(f"Invalid learning rate: {lr}")
        if not 0.0 <= eps:
            raise ValueError(f"Invalid epsilon value: {eps}")
        if not 0.0 <= betas[0] < 1.0:
            raise ValueError(f"Invalid beta parameter at index 0: {betas[0]}")
        if not 0.0 <= betas[1] < 1.0:
            raise ValueError(f"Invalid beta parameter at index 1: {betas[1]}")
        if not 0.0 <= weight_decay:
            raise ValueError(f"Invalid weight_decay value: {weight_decay}")
        defaults = {"lr": lr, "betas": tuple(float(b) for b in betas), "eps": eps,
                    "weight_decay": weight_decay, "amsgrad": amsgrad, "maximize": maximize,
                    "foreach": foreach, "capturable": capturable,
                    "differentiable": differentiable, "fused": fused,
                    "decoupled_weight_decay": decoupled_weight_decay}
        super().__init__(params, defaults)

    def _init_state(self, p, state, group):
        state["step"] = _new_step()
        state["exp_avg"] = _zeros_like(p)
        state["exp_avg_sq"] = _zeros_like(p)
        if group["amsgrad"]:
            state["max_exp_avg_sq"] = _zeros_like(p)

    def _fused_step(self, device, group, params, states):
        k = runtime.kernel(device, "adam_step")
        if k is None:
            return NotImplemented
        steps = []
        for st in states:  # the step counts live on the host (0-d float32), as in PyTorch
            st["step"].array += 1
            steps.append(_step_value(st))
        beta1, beta2 = group["betas"]
        res = k([p.array for p in params], [p.grad.array for p in params],
                [s["exp_avg"].array for s in states], [s["exp_avg_sq"].array for s in states],
                [s["max_exp_avg_sq"].array for s in states] if group["amsgrad"] else None,
                steps, group["lr"], beta1, beta2, group["eps"], group["weight_decay"],
                group["amsgrad"], group["decoupled_weight_decay"], group["maximize"])
        if res is NotImplemented:
            for st in states:
                st["step"].array -= 1
        return res

    def _graph_bucket(self, device, group, params):
        """The capturable step (CUDA graph on a GPU): ``_update``'s formulas, with lr (in
        ``-lr / bias_correction1`` and ``1 - lr * weight_decay``), betas, eps, weight_decay
        and each parameter's ``sqrt(bias_correction2)`` in device scalars; the step counts
        stay on the host (0-d CPU tensors, as eager) and advance before each replay."""
        def structure(g):
            return {"amsgrad": bool(g["amsgrad"]), "maximize": bool(g["maximize"]),
                    "decoupled_weight_decay": bool(g["decoupled_weight_decay"]),
                    "weight_decay != 0": g["weight_decay"] != 0,
                    "abs(1 - beta1) < 0.5": abs(1 - g["betas"][0]) < 0.5}
        rule = structure(group)
        amsgrad, maximize, wd = rule["amsgrad"], rule["maximize"], rule["weight_decay != 0"]
        decoupled, small = rule["decoupled_weight_decay"], rule["abs(1 - beta1) < 0.5"]
        n = len(params)
        names = ["lerp_w", "lerp_1mw", "beta2", "one_minus_beta2", "eps"] + \
            ([("decay" if decoupled else "weight_decay")] if wd else []) + \
            [("neg_step_size", i) for i in range(n)] + [("bc2_sqrt", i) for i in range(n)]
        xp, dtype = device.xp, params[0].dtype
        states = [self.state[p] for p in params]
        arrays = [p.array for p in params]
        grads = [p.grad.array for p in params]
        avgs = [st["exp_avg"].array for st in states]
        sqs = [st["exp_avg_sq"].array for st in states]
        maxs = [st["max_exp_avg_sq"].array if amsgrad else None for st in states]

        def values():
            lr, weight_decay = group["lr"], group["weight_decay"]
            beta1, beta2 = group["betas"]
            v = _lerp_values(1 - beta1, dtype)
            v.update(beta2=beta2, one_minus_beta2=1 - beta2, eps=group["eps"],
                     weight_decay=weight_decay, decay=1 - lr * weight_decay)
            for i, st in enumerate(states):  # (the formulas of _update, in Python floats)
                st["step"].array += 1
                step = _step_value(st)
                v["neg_step_size", i] = -(lr / (1 - beta1 ** step))
                v["bc2_sqrt", i] = (1 - beta2 ** step) ** 0.5
            return v

        def launch(s):
            for i, (p, g, exp_avg, exp_avg_sq, max_sq) in enumerate(
                    zip(arrays, grads, avgs, sqs, maxs)):
                if maximize:
                    g = -g
                if wd:
                    if decoupled:
                        p *= s["decay"]
                    else:
                        g = g + s["weight_decay"] * p
                _lerp_dev(exp_avg, g, s, small, xp)
                exp_avg_sq *= s["beta2"]
                exp_avg_sq += (s["one_minus_beta2"] * g) * g
                if amsgrad:
                    xp.maximum(max_sq, exp_avg_sq, out=max_sq)
                    denom = xp.sqrt(max_sq)
                else:
                    denom = xp.sqrt(exp_avg_sq)
                denom /= s["bc2_sqrt", i]
                denom += s["eps"]
                upd = s["neg_step_size", i] * exp_avg
                upd /= denom
                p += upd
        return _GraphStep(names, structure, values, launch)

    def _update(self, param, g, state, group):
        p, xp = param.array, param.device.xp
        lr, wd, eps = group["lr"], group["weight_decay"], group["eps"]
        beta1, beta2 = group["betas"]
        state["step"].array += 1
        step = _step_value(state)
        if wd != 0:
            if group["decoupled_weight_decay"]:
                p *= 1 - lr * wd
            else:
                g = g + wd * p
        exp_avg, exp_avg_sq = state["exp_avg"].array, state["exp_avg_sq"].array
        _lerp_(exp_avg, g, 1 - beta1, xp)
        exp_avg_sq *= beta2
        exp_avg_sq += ((1 - beta2) * g) * g
        bias_correction1 = 1 - beta1 ** step
        bias_correction2 = 1 - beta2 ** step
        step_size = lr / bias_correction1
        bias_correction2_sqrt = bias_correction2 ** 0.5
        if group["amsgrad"]:
            max_sq = state["max_exp_avg_sq"].array
            xp.maximum(max_sq, exp_avg_sq, out=max_sq)
            denom = xp.sqrt(max_sq)
        else:
            denom = xp.sqrt(exp_avg_sq)
        denom /= bias_correction2_sqrt
        denom += eps
        upd = -step_size * exp_avg
        upd /= denom
        p += upd


class AdamW(Adam):
    """Adam with decoupled weight decay (Loshchilov & Hutter): p *= 1 - lr * wd first."""

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2,
                 amsgrad=False, *, maximize=False, foreach=None, capturable=False,
                 differentiable=False, fused=None):
        super().__init__(params, lr, betas, eps, weight_decay, amsgrad, foreach=foreach,
                         maximize=maximize, capturable=capturable,
                         differentiable=differentiable, fused=fused,
                         decoupled_weight_decay=True)

    def __setstate__(self, state):
        super().__setstate__(state)
        for group in self.param_groups:
            group["decoupled_weight_decay"] = True
