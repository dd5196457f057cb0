"""SGD with momentum, dampening, Nesterov and weight decay (PyTorch's update rule)."""
from .. import runtime
from ..tensor import Tensor
from .optimizer import Optimizer, _GraphStep, required


class SGD(Optimizer):
    """Stochastic gradient descent.

    g = grad + weight_decay * p;  with momentum: b = g (first step), then
    b = momentum * b + (1 - dampening) * g;  g = g + momentum * b (nesterov) or b;
    p = p - lr * g.  State: ``momentum_buffer`` (None while momentum is 0).
    """

    def __init__(self, params, lr=1e-3, momentum=0, dampening=0, weight_decay=0,
                 nesterov=False, *, maximize=False, foreach=None, differentiable=False,
                 fused=None):
        if lr is not required and lr < 0.0:
            raise ValueError(f"Invalid learning rate: {lr}")
        if momentum < 0.0:
            raise ValueError(f"Invalid momentum value: {momentum}")
        if weight_decay < 0.0:
            raise ValueError(f"Invalid weight_decay value: {weight_decay}")
        defaults = {"lr": lr, "momentum": momentum, "dampening": dampening,
                    "weight_decay": weight_decay, "nesterov": nesterov, "maximize": maximize,
                    "foreach": foreach, "differentiable": differentiable, "fused": fused}
        if nesterov and (momentum <= 0 or dampening != 0):
            raise ValueError("Nesterov momentum requires a momentum and zero dampening")
        super().__init__(params, defaults)

    def _state_ready(self, p, group):
        return group["momentum"] == 0 or self.state.get(p, {}).get("momentum_buffer") \
            is not None

    def _state_for(self, p, group):
        # plain SGD keeps no state at all (PyTorch's state_dict is then empty too)
        return self.state[p] if group["momentum"] != 0 else {}

    def _fused_step(self, device, group, params, states):
        k = runtime.kernel(device, "sgd_step")
        if k is None or (group["momentum"] != 0 and
                         any(s.get("momentum_buffer") is None for s in states)):
            return NotImplemented  # the first momentum step (b = g) goes the reference way
        bufs = [s["momentum_buffer"].array if "momentum_buffer" in s else None for s in states]
        return k([p.array for p in params], [p.grad.array for p in params], bufs, group["lr"],
                 group["momentum"], group["dampening"], group["weight_decay"],
                 group["nesterov"], group["maximize"])

    def _bucket_replay(self, device, group, params):
        k = runtime.kernel(device, "sgd_step")
        momentum = group["momentum"] != 0
        states = [self.state[p] for p in params] if momentum else ()
        bufs = [st.get("momentum_buffer") for st in states]
        if k is None or any(b is None for b in bufs):
            return None
        arrays = [p.array for p in params]
        grads = [p.grad.array for p in params]
        buf_arrays = [b.array for b in bufs] if momentum else [None] * len(params)
        versions = [p._version for p in params]

        def replay():
            for st, b in zip(states, bufs):
                if st.get("momentum_buffer") is not b:
                    return False
            if k(arrays, grads, buf_arrays, group["lr"], group["momentum"], group["dampening"],
                 group["weight_decay"], group["nesterov"], group["maximize"]) is NotImplemented:
                return False
            for v in versions:  # (Tensor.bump_version of each parameter)
                v[0] += 1
            return True
        return replay

    def _graph_bucket(self, device, group, params):
        """The capturable step (CUDA graph on a GPU): ``_update``'s formulas, with lr,
        weight_decay, momentum and 1 - dampening in device scalars."""
        def structure(g):
            return {"momentum != 0": g["momentum"] != 0, "dampening != 0": g["dampening"] != 0,
                    "weight_decay != 0": g["weight_decay"] != 0,
                    "nesterov": bool(g["nesterov"]), "maximize": bool(g["maximize"])}
        rule = structure(group)
        momentum, damp, wd = rule["momentum != 0"], rule["dampening != 0"], \
            rule["weight_decay != 0"]
        nesterov, maximize = rule["nesterov"], rule["maximize"]
        names = ["lr"] + (["weight_decay"] if wd else []) + (["momentum"] if momentum else []) \
            + (["damp1"] if momentum and damp else [])
        arrays = [p.array for p in params]
        grads = [p.grad.array for p in params]
        bufs = [self.state[p]["momentum_buffer"].array if momentum else None for p in params]

        def values():
            return {"lr": group["lr"], "weight_decay": group["weight_decay"],
                    "momentum": group["momentum"], "damp1": 1 - group["dampening"]}

        def launch(s):
            for p, g, b in zip(arrays, grads, bufs):
                if maximize:
                    g = -g
                if wd:
                    g = g + s["weight_decay"] * p
                if momentum:
                    b *= s["momentum"]
                    if damp:
                        b += s["damp1"] * g
                    else:
                        b += g
                    g = (g + s["momentum"] * b) if nesterov else b
                p -= s["lr"] * g
        return _GraphStep(names, structure, values, launch)

    def _update(self, param, g, state, group):
        p = param.array
        wd, momentum, lr = group["weight_decay"], group["momentum"], group["lr"]
        if wd != 0:
            g = g + wd * p
        if momentum != 0:
            buf = state.get("momentum_buffer")
            if buf is None:
                buf = Tensor.from_array(param.device.xp.copy(g, order="C"), param.device)
                state["momentum_buffer"] = buf
            else:
                b = buf.array
                b *= momentum
                if group["dampening"] == 0:
                    b += g
                else:
                    b += (1 - group["dampening"]) * g
            g = (g + momentum * buf.array) if group["nesterov"] else buf.array
        p -= lr * g
