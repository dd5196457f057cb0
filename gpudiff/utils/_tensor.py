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


def canonical(arr):
    """``arr`` with numpy's own dtype object for its type, in native byte order.

    Arrays that come out of a pickle (DataLoader workers) or are built from a dtype spec
    ('<f4', dtype.newbyteorder('=')) carry an equal but distinct dtype object, and the
    compiled kernels recognise float32/float64 by identity; a view fixes that for free.
    """
    dt = arr.dtype
    if not dt.isnative:
        dt = dt.newbyteorder("=")
        arr = arr.astype(dt)
    builtin = np.dtype(dt.char) if dt.fields is None and dt.subdtype is None else dt
    if builtin is not dt and builtin == dt:
        arr = arr.view(builtin)
    return arr


def from_numpy(arr):
    """A CPU gpudiff tensor holding ``arr`` (shares memory when the engine allows it)."""
    import gpudiff
    arr = canonical(arr)
    fn = getattr(gpudiff, "from_numpy", None)
    if fn is not None:
        return fn(arr if arr.flags.c_contiguous else arr.copy(order="C"))
    return gpudiff.tensor(arr)


def to_numpy(t):
    """The host ndarray of a gpudiff tensor (detached; copied off the GPU if needed)."""
    return np.asarray(t.detach().cpu().numpy())

