"""The data stack's contact points with gpudiff.Tensor: type checks and host conversions."""
import numpy as np

from .. import creation
from ..tensor import Tensor


def is_tensor(x):
    return isinstance(x, Tensor)


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
    builtin = np.dtype(dt.char) if dt.fields is None and dt.subdtype is None \
        and dt.kind != "V" else dt  # ("V": bfloat16, whose char NumPy does not know)
    if builtin is not dt and builtin == dt:
        arr = arr.view(builtin)
    return arr


def from_numpy(arr):
    """A CPU gpudiff tensor holding ``arr`` (shares memory when the engine allows it)."""
    arr = canonical(arr)
    return creation.from_numpy(arr if arr.flags.c_contiguous else arr.copy(order="C"))


def to_numpy(t):
    """The host ndarray of a gpudiff tensor (detached; copied off the GPU if needed)."""
    return np.asarray(t.detach().cpu().numpy())

