"""Flatten parameters into one vector and back."""
from ... import functions as fn
from ...tensor import Tensor


def _check_same_device(params):
    dev = None
    for p in params:
        if dev is None:
            dev = p.device
        elif p.device != dev:
            raise TypeError("Found two parameters on different devices, this is currently not "
                            "supported.")


def parameters_to_vector(parameters):
    """All parameters flattened and concatenated into one 1-D tensor (differentiable)."""
    params = list(parameters)
    _check_same_device(params)
    return fn.cat([p.reshape(-1) for p in params])


def vector_to_parameters(vec, parameters):
    """Make the parameters' data slices of ``vec`` (1-D), in order (as PyTorch, the
    parameters then share ``vec``'s memory)."""
    if not isinstance(vec, Tensor):
        raise TypeError(f"expected gpudiff.Tensor, but got: {type(vec).__name__}")
    params = list(parameters)
    _check_same_device(params)
    total = sum(p.numel() for p in params)
    if vec.ndim != 1 or vec.numel() != total:
        raise RuntimeError(f"vector_to_parameters: vec must be 1-D with {total} elements "
                           f"(the parameters' total), got shape {tuple(vec.shape)}")
    pointer = 0
    for p in params:
        n = p.numel()
        p.data = vec.array[pointer:pointer + n].reshape(p.shape)
        pointer += n
