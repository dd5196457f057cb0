"""Autograd: the tape (graph.py), grad modes, ``grad``, custom ``Function``s, gradcheck."""
import numpy as np

from .grad_mode import (detect_anomaly, enable_grad, inference_mode, is_anomaly_enabled,  # noqa
                        is_grad_enabled, no_grad, set_detect_anomaly, set_grad_enabled)
from .graph import Node, run_backward
from .function import Function, FunctionCtx  # noqa: F401
from .gradcheck import gradcheck, gradgradcheck  # noqa: F401


def _seed_grads(outputs, grad_outputs):
    from ..tensor import Tensor
    seeds = []
    for i, t in enumerate(outputs):
        g = grad_outputs[i] if grad_outputs is not None else None
        if g is None:
            if t.numel() != 1:
                raise RuntimeError(
                    f"grad can be implicitly created only for scalar outputs (output {i} has "
                    f"shape {tuple(t.shape)}): pass gradient=... (a tensor of that shape, e.g. "
                    f"torch.ones_like(out)) to backward()")
            g = Tensor._make(t.device.xp.ones(t.shape, dtype=t.dtype), t.device)
        elif not isinstance(g, Tensor):
            g = Tensor._make(t.device.xp.asarray(g, dtype=t.dtype), t.device)
        if g.shape != t.shape:
            raise RuntimeError(f"Mismatch in shape: grad_output[{i}] has a shape of "
                               f"{tuple(g.shape)} and output[{i}] has a shape of "
                               f"{tuple(t.shape)}.")
        seeds.append(g)
    return seeds


def backward(tensors, grad_tensors=None, retain_graph=None, create_graph=False, inputs=None):
    """Accumulate gradients of ``tensors`` into the leaves' ``.grad``."""
    from ..tensor import Tensor
    if isinstance(tensors, Tensor):
        tensors = [tensors]
    if isinstance(grad_tensors, Tensor):
        grad_tensors = [grad_tensors]
    if retain_graph is None:
        retain_graph = create_graph
    seeds = _seed_grads(tensors, grad_tensors)
    if inputs is not None:  # only these leaves receive .grad
        inputs = [inputs] if isinstance(inputs, Tensor) else list(inputs)
        grads = run_backward(tensors, seeds, retain_graph, create_graph, inputs=inputs)
        for t, g in zip(inputs, grads):
            if g is not None:
                t.grad = (g if create_graph else g.detach()._own()) if t.grad is None \
                    else t.grad + g
        return
    run_backward(tensors, seeds, retain_graph, create_graph)


def grad(outputs, inputs, grad_outputs=None, retain_graph=None, create_graph=False,
         allow_unused=False, materialize_grads=False):
    """The gradients of ``outputs`` with respect to ``inputs`` (a tuple), without touching
    any ``.grad``. ``create_graph=True`` makes them differentiable (double backward)."""
    from ..tensor import Tensor
    single = isinstance(outputs, Tensor)
    outputs = [outputs] if single else list(outputs)
    inputs_t = [inputs] if isinstance(inputs, Tensor) else list(inputs)
    if isinstance(grad_outputs, Tensor):
        grad_outputs = [grad_outputs]
    for i, t in enumerate(inputs_t):
        if not t.requires_grad:
            raise RuntimeError(f"grad: input {i} does not require grad")
    if retain_graph is None:
        retain_graph = create_graph
    seeds = _seed_grads(outputs, grad_outputs)
    res = run_backward(outputs, seeds, retain_graph, create_graph, inputs=inputs_t)
    out = []
    for i, (t, g) in enumerate(zip(inputs_t, res)):
        if g is None:
            if materialize_grads:
                g = t.new_zeros(t.shape)
            elif not allow_unused:
                raise RuntimeError(f"One of the differentiated Tensors (input {i}) appears to "
                                   f"not have been used in the graph. Set allow_unused=True if "
                                   f"this is the desired behavior.")
        out.append(g)
    return tuple(out)


def zero_grads(params, set_to_none=True):
    """Reset ``.grad`` of ``params``: to None, or detached and zeroed in place."""
    for p in params:
        g = p.grad
        if g is None:
            continue
        if set_to_none:
            p.grad = None
            continue
        if g.grad_fn is not None:
            g.detach_()
        else:
            g.requires_grad_(False)
        g.zero_()


__all__ = ["backward", "grad", "Function", "gradcheck", "gradgradcheck", "no_grad",
           "enable_grad", "set_grad_enabled", "inference_mode", "detect_anomaly", "Node",
           "is_grad_enabled", "np"]
