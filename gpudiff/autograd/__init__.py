"""Autograd: the tape (graph.py: Node, SavedTensor, backward, grad), grad modes, the recording
path and custom ``Function``s (function.py), gradcheck."""
from .grad_mode import (detect_anomaly, enable_grad, inference_mode, is_anomaly_enabled,  # noqa
                        is_grad_enabled, no_grad, set_detect_anomaly, set_grad_enabled)
from .graph import Node, backward, grad, run_backward  # noqa: F401
from .function import Function, FunctionCtx  # noqa: F401
from .gradcheck import gradcheck, gradgradcheck  # noqa: F401


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
           "is_grad_enabled"]
