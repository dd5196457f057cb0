"""The data stack's only contact points with gpudiff.Tensor (imported lazily: gpudiff's
__init__ imports this package, and the tensor module must not be needed to import it)."""
import numpy as np


def tensor_type():
    """gpudiff.Tensor, or None while the engine is not importable."""
    try:
        from ..tensor import Tensor
    except ImportError:
        return None
    return Tensor


def is_tensor(x):
    T = tensor_type()
    return T is not None and isinstance(x, T)


def from_numpy(arr):
    """A CPU gpudiff tensor holding ``arr`` (shares memory when the engine allows it)."""
    import gpudiff
    fn = getattr(gpudiff, "from_numpy", None)
    if fn is not None:
        return fn(arr if arr.flags.c_contiguous else arr.copy(order="C"))
    return gpudiff.tensor(arr)


def to_numpy(t):
    """The host ndarray of a gpudiff tensor (detached; copied off the GPU if needed)."""
    return np.asarray(t.detach().cpu().numpy())

