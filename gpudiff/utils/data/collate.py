"""Turning a list of samples into one batch, as torch.utils.data.default_collate does.

Samples may nest tuples, lists, namedtuples and dicts; leaves that are gpudiff tensors or
numpy arrays are stacked along a new first dimension (dtype kept), numpy scalars become a
1-d tensor of their dtype, Python ints -> int64, bools -> bool, floats -> float64 (PyTorch's
rule: ``default_collate([1.5, 2.0]).dtype == torch.float64``), strings and bytes stay lists.
"""
import collections.abc
import re

import numpy as np

from ... import functions
from .._tensor import from_numpy, is_tensor

# numpy dtypes that cannot become tensors: strings, bytes, objects (PyTorch's pattern)
_np_str_obj = re.compile(r"[SaUO]")

_ERR = ("default_collate: batch must contain tensors, numpy arrays, numbers, dicts or lists; "
        "found {}")


def _is_namedtuple(x):
    return isinstance(x, tuple) and hasattr(x, "_fields")


def _stack_tensors(batch):
    shapes = [tuple(t.shape) for t in batch]
    for k, s in enumerate(shapes):
        if s != shapes[0]:
            raise RuntimeError(
                f"stack expects each tensor to be equal size, but got {list(shapes[0])} at "
                f"entry 0 and {list(s)} at entry {k}")
    if all(t.device.type == "cpu" for t in batch):
        # (B, *shape): one numpy stack on the host, no autograd bookkeeping
        # (np.asarray: a 0-d tensor's array may be a numpy scalar)
        return from_numpy(np.stack([np.asarray(t.array) for t in batch]))
    return functions.stack(list(batch), 0)


def _stack_arrays(batch):
    shapes = [a.shape for a in batch]
    for k, s in enumerate(shapes):
        if s != shapes[0]:
            raise RuntimeError(
                f"stack expects each tensor to be equal size, but got {list(shapes[0])} at "
                f"entry 0 and {list(s)} at entry {k}")
    return from_numpy(np.stack(batch))


def default_collate(batch):
    """Collate a list of samples into a batch of gpudiff tensors (structure kept).

    >>> import numpy as np
    >>> b = default_collate([(np.zeros(2, np.float32), 1), (np.ones(2, np.float32), 0)])
    >>> b[0].shape, b[1].tolist()
    ((2, 2), [1, 0])
    """
    elem = batch[0]
    if is_tensor(elem):
        return _stack_tensors(batch)
    if isinstance(elem, np.ndarray):
        if _np_str_obj.search(elem.dtype.str):
            raise TypeError(_ERR.format(elem.dtype))
        return _stack_arrays(batch)
    if isinstance(elem, (np.number, np.bool_)):
        return from_numpy(np.stack([np.asarray(x) for x in batch]))
    if isinstance(elem, np.generic):           # numpy strings/bytes/objects
        raise TypeError(_ERR.format(elem.dtype))
    if isinstance(elem, float):
        return from_numpy(np.asarray(batch, dtype=np.float64))
    if isinstance(elem, bool):
        if all(isinstance(x, (bool, np.bool_)) for x in batch):
            return from_numpy(np.asarray(batch, dtype=np.bool_))
        return from_numpy(np.asarray(batch, dtype=np.int64))
    if isinstance(elem, int):
        return from_numpy(np.asarray(batch, dtype=np.int64))
    if isinstance(elem, (str, bytes)):
        return batch
    if isinstance(elem, collections.abc.Mapping):
        out = {key: default_collate([d[key] for d in batch]) for key in elem}
        try:
            return type(elem)(out)
        except TypeError:                       # a mapping type that cannot be built this way
            return out
    if _is_namedtuple(elem):
        return type(elem)(*(default_collate(s) for s in zip(*batch)))
    if isinstance(elem, collections.abc.Sequence):
        size = len(elem)
        if any(len(x) != size for x in batch):
            raise RuntimeError("each element in list of batch should be of equal size")
        transposed = [default_collate(s) for s in zip(*batch)]   # s: a tuple, as PyTorch
        if isinstance(elem, tuple):
            return transposed                   # PyTorch returns a list for tuples too
        try:
            return type(elem)(transposed)
        except TypeError:
            return transposed
    raise TypeError(_ERR.format(type(elem)))


def default_convert(data):
    """Convert one sample (no batching): numpy arrays and scalars become tensors, containers
    are converted element-wise, everything else is returned as is (used when
    ``batch_size=None``)."""
    if is_tensor(data):
        return data
    if isinstance(data, np.ndarray):
        if _np_str_obj.search(data.dtype.str):
            return data
        return from_numpy(data)
    if isinstance(data, (np.number, np.bool_)):
        return from_numpy(np.asarray(data))
    if isinstance(data, collections.abc.Mapping):
        out = {k: default_convert(v) for k, v in data.items()}
        try:
            return type(data)(out)
        except TypeError:
            return out
    if _is_namedtuple(data):
        return type(data)(*(default_convert(d) for d in data))
    if isinstance(data, tuple):
        return [default_convert(d) for d in data]
    if isinstance(data, collections.abc.Sequence) and not isinstance(data, (str, bytes)):
        try:
            return type(data)([default_convert(d) for d in data])
        except TypeError:
            return [default_convert(d) for d in data]
    return data
