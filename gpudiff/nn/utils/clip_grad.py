"""Gradient clipping, in place on the ``.grad`` arrays (no graph is recorded)."""
import math

from ... import runtime
from ...tensor import Tensor


def _grads(parameters):
    if isinstance(parameters, Tensor):
        parameters = [parameters]
    return [p.grad for p in parameters if p.grad is not None]


def _vector_norm(a, norm_type, xp):
    """The p-norm of all elements of raw array ``a`` (0-d array, a's dtype)."""
    if norm_type == math.inf:
        return xp.abs(a).max() if a.size else xp.zeros((), a.dtype)
    if norm_type == -math.inf:
        return xp.abs(a).min()
    if norm_type == 0:
        return (a != 0).sum().astype(a.dtype)
    if norm_type == 1:
        return xp.abs(a).sum()
    if norm_type == 2:
        return xp.sqrt(xp.vdot(a.ravel(), a.ravel()).real) if a.size else xp.zeros((), a.dtype)
    return (xp.abs(a) ** norm_type).sum() ** (1.0 / norm_type)


def get_total_norm(tensors, norm_type=2.0, error_if_nonfinite=False, foreach=None):
    """The ``norm_type``-norm of all the tensors together, as if concatenated (a 0-d tensor
    on the first tensor's device)."""
    if isinstance(tensors, Tensor):
        tensors = [tensors]
    tensors = [t for t in tensors if t is not None]
    norm_type = float(norm_type)
    if not tensors:
        return Tensor.from_array(runtime.CPU.xp.zeros((), "float32"), runtime.CPU)
    dev = tensors[0].device
    xp = dev.xp
    norms = [runtime.to_device(_vector_norm(t.array, norm_type, t.device.xp), dev)
             for t in tensors]
    total = _vector_norm(xp.stack([xp.asarray(n) for n in norms]), norm_type, xp)
    if error_if_nonfinite and not bool(xp.isfinite(total)):
        raise RuntimeError(
            f"The total norm of order {norm_type} for gradients from `parameters` is "
            f"non-finite, so it cannot be clipped. To disable this error and scale the "
            f"gradients by the non-finite norm anyway, set `error_if_nonfinite=False`")
    return Tensor.from_array(xp.asarray(total), dev)


def clip_grads_with_norm_(parameters, max_norm, total_norm, foreach=None):
    """Scale the gradients by min(1, max_norm / (total_norm + 1e-6)), in place."""
    grads = _grads(parameters)
    if not grads:
        return
    total = total_norm.array if isinstance(total_norm, Tensor) else total_norm
    for g in grads:
        xp = g.device.xp
        t = runtime.to_device(xp.asarray(total), g.device).astype(g.dtype)
        coef = xp.minimum(g.dtype.type(max_norm) / (t + g.dtype.type(1e-6)), g.dtype.type(1.0))
        xp.multiply(g.array, coef, out=g.array)
        g.bump_version()


def clip_grad_norm_(parameters, max_norm, norm_type=2.0, error_if_nonfinite=False,
                    foreach=None):
    """Rescale the gradients so that their total ``norm_type``-norm is at most ``max_norm``.

    Returns the total norm before clipping (a 0-d tensor), like PyTorch.

    >>> total = nn.utils.clip_grad_norm_(model.parameters(), max_norm=1.0)
    """
    if isinstance(parameters, Tensor):
        parameters = [parameters]
    else:
        parameters = list(parameters)
    total = get_total_norm(_grads(parameters), norm_type, error_if_nonfinite, foreach)
    clip_grads_with_norm_(parameters, max_norm, total, foreach)
    return total


def clip_grad_value_(parameters, clip_value, foreach=None):
    """Clamp every gradient element into [-clip_value, clip_value], in place."""
    clip_value = float(clip_value)
    for g in _grads(parameters if isinstance(parameters, Tensor) else list(parameters)):
        g.device.xp.clip(g.array, -clip_value, clip_value, out=g.array)
        g.bump_version()
