"""CIFAR-10 from the standard "python version" batches on disk, read without running code.

The batches (``cifar-10-batches-py/data_batch_1`` .. ``data_batch_5``, ``test_batch``) are
pickles of a dict: ``data`` a uint8 array (10000, 3072) (1024 red, 1024 green, 1024 blue
values of a 32x32 image, row-major), ``labels`` a list of ints 0..9, plus ``batch_label``
and ``filenames`` strings. A pickle can name any Python callable to run while loading, so
we unpickle with an allow-list: the few numpy constructors an array needs (wrapped, so
they can only make plain numeric arrays) and latin-1 string encoding. Anything else in the
file is refused before it runs.
"""
import io
import os
import pickle
import re
from typing import ClassVar

import numpy as np

from ..utils._tensor import canonical
from .vision import VisionDataset, scaled


class _Frozen:
    """Base of the objects a pickle may name: no attributes can be set on them, so a BUILD
    opcode aimed at one fails instead of changing it."""
    __slots__ = ()

    def __setattr__(self, name, value):
        raise pickle.UnpicklingError(f"refusing to set attribute {name!r:.40}")

    def __setstate__(self, state):
        raise pickle.UnpicklingError(f"refusing to set the state of {type(self).__name__}")


class _Guarded(_Frozen):
    """One allowed callable."""
    __slots__ = ("_fn",)

    def __init__(self, fn):
        object.__setattr__(self, "_fn", fn)

    def __call__(self, *args):
        return self._fn(*args)


class _NDArrayToken(_Frozen):
    """Stands for ``numpy.ndarray`` inside a pickle: it can be named, never called."""
    __slots__ = ()


class _DtypeSpec(_Frozen):
    """What numpy's ``dtype('u1', False, True)`` + BUILD(state) asks for, held as plain
    data: numpy never sees the file's dtype state (its flags could make numpy read raw
    bytes as object pointers)."""
    __slots__ = ("byteorder", "spec")

    def __init__(self, spec):
        object.__setattr__(self, "spec", spec)
        object.__setattr__(self, "byteorder", "=")

    def __setstate__(self, state):
        # numpy's dtype state: (version, byteorder, subarray, names, fields, elsize,
        # alignment, flags[, metadata]); only plain scalar dtypes are accepted
        if not (isinstance(state, tuple) and len(state) in (8, 9) and state[1] in "<>|="
                and state[2] is None and state[3] is None and state[4] is None):
            raise pickle.UnpicklingError("refusing a structured or unusual dtype")
        object.__setattr__(self, "byteorder", state[1])

    def dtype(self):
        order = self.byteorder if self.byteorder in "<>" else "="
        return np.dtype(self.spec).newbyteorder(order)


class _ArrayBuilder(_Frozen):
    """An array under construction: numpy's ``_reconstruct(ndarray, (0,), b'b')`` gives one of
    these, and the BUILD that follows hands it (version, shape, dtype, fortran, data)."""
    __slots__ = ("array",)

    def __init__(self, array=None):
        object.__setattr__(self, "array", array)

    def __setstate__(self, state):
        if self.array is not None:
            raise pickle.UnpicklingError("refusing to set an array's state twice")
        if not (isinstance(state, tuple) and len(state) == 5 and state[0] == 1):
            raise pickle.UnpicklingError("unexpected array state")
        _, shape, spec, fortran, data = state
        if not isinstance(spec, _DtypeSpec):
            raise pickle.UnpicklingError("array dtype was not built by numpy.dtype")
        if isinstance(data, str):                # Python 2 byte strings, read as latin-1
            data = data.encode("latin-1")
        if not isinstance(data, (bytes, bytearray)):
            raise pickle.UnpicklingError("array data must be bytes")
        object.__setattr__(self, "array", _from_bytes(data, spec.dtype(), shape,
                                                      "F" if fortran else "C"))


_NDARRAY = _NDArrayToken()
_NUMERIC_DTYPE = re.compile(r"^[biuf][1248]$")


def _from_bytes(data, dtype, shape, order):
    if not (isinstance(shape, tuple) and all(isinstance(d, int) and d >= 0 for d in shape)):
        raise pickle.UnpicklingError(f"bad array shape {shape!r:.60}")
    n = int(np.prod(shape, dtype=np.int64))
    if n * dtype.itemsize != len(data):
        raise pickle.UnpicklingError(f"array data is {len(data)} bytes, its shape {shape} and "
                                     f"dtype {dtype} need {n * dtype.itemsize}")
    return canonical(np.frombuffer(data, dtype=dtype).reshape(shape, order=order).copy())


def _safe_dtype(spec, align=False, copy=False):
    # numpy pickles dtypes as dtype('u1', False, True); only plain numbers may be built here
    if not isinstance(spec, str) or not _NUMERIC_DTYPE.match(spec):
        raise pickle.UnpicklingError(f"refusing dtype {spec!r:.40}: only numeric dtypes allowed")
    return _DtypeSpec(spec)


def _safe_reconstruct(subtype, shape, dtype):
    # numpy pickles arrays as _reconstruct(ndarray, (0,), b'b') + BUILD(real state)
    if subtype is not _NDARRAY:
        raise pickle.UnpicklingError("refusing to build an array of a type other than ndarray")
    if not isinstance(shape, tuple) or len(shape) != 1 or shape[0] != 0:
        raise pickle.UnpicklingError(f"unexpected initial array shape {shape!r:.40}")
    return _ArrayBuilder()


def _safe_frombuffer(buf, spec, shape, order):
    # protocol-5 pickles of arrays: _frombuffer(bytes, dtype, shape, order)
    if not isinstance(spec, _DtypeSpec):
        raise pickle.UnpicklingError("array dtype was not built by numpy.dtype")
    if order not in ("C", "F"):
        raise pickle.UnpicklingError(f"unexpected array order {order!r:.10}")
    if isinstance(buf, pickle.PickleBuffer):
        buf = bytes(buf)
    if not isinstance(buf, (bytes, bytearray)):
        raise pickle.UnpicklingError("array data must be bytes")
    return _ArrayBuilder(_from_bytes(buf, spec.dtype(), shape, order))


def _latin1_encode(text, encoding="latin1"):
    # protocol-2 pickles written by Python 3 store bytes as _codecs.encode(str, 'latin1')
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1"):
        raise pickle.UnpicklingError("refusing _codecs.encode other than str -> latin-1 bytes")
    return text.encode("latin-1")


_ALLOWED = {
    ("numpy.core.multiarray", "_reconstruct"): _Guarded(_safe_reconstruct),
    ("numpy._core.multiarray", "_reconstruct"): _Guarded(_safe_reconstruct),
    ("numpy.core.numeric", "_frombuffer"): _Guarded(_safe_frombuffer),
    ("numpy._core.numeric", "_frombuffer"): _Guarded(_safe_frombuffer),
    ("numpy", "ndarray"): _NDARRAY,
    ("numpy", "dtype"): _Guarded(_safe_dtype),
    ("_codecs", "encode"): _Guarded(_latin1_encode),
}


def _finish(obj, depth=0):
    """Replace the _ArrayBuilders in the unpickled structure by their arrays."""
    if depth > 100:
        raise pickle.UnpicklingError("nested too deeply")
    if isinstance(obj, _ArrayBuilder):
        if obj.array is None:
            raise pickle.UnpicklingError("an array was never given its data")
        return obj.array
    if isinstance(obj, _Frozen):
        raise pickle.UnpicklingError(f"stray {type(obj).__name__} in the data")
    if isinstance(obj, dict):
        return {_finish(k, depth + 1): _finish(v, depth + 1) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_finish(v, depth + 1) for v in obj]
    if isinstance(obj, tuple):
        return tuple(_finish(v, depth + 1) for v in obj)
    return obj


class _RestrictedUnpickler(pickle.Unpickler):
    def find_class(self, module, name):
        obj = _ALLOWED.get((module, name))
        if obj is None:
            raise pickle.UnpicklingError(
                f"refusing to load {module}.{name}: a CIFAR batch holds only dicts, lists, "
                f"strings, numbers and numeric arrays")
        return obj

    def persistent_load(self, pid):
        raise pickle.UnpicklingError("refusing a persistent id")


def load_batch(path):
    """The dict in a CIFAR python batch file (str keys), unpickled with the allow-list."""
    with open(path, "rb") as f:
        raw = f.read()
    try:
        # encoding='latin1': the original files were written by Python 2 (byte strings)
        obj = _finish(_RestrictedUnpickler(io.BytesIO(raw), encoding="latin1").load())
    except pickle.UnpicklingError as e:
        raise ValueError(f"{path}: not a valid CIFAR batch: {e}") from None
    except (EOFError, ValueError, TypeError, IndexError, KeyError, AttributeError,
            OverflowError, MemoryError, RecursionError) as e:
        raise ValueError(f"{path}: corrupt or truncated CIFAR batch "
                         f"({type(e).__name__}: {str(e)[:200]})") from None
    if not isinstance(obj, dict):
        raise ValueError(f"{path}: corrupt CIFAR batch: expected a dict, got "  # noqa: TRY004
                         f"{type(obj).__name__}")
    return {(k.decode("latin-1") if isinstance(k, bytes) else k): v for k, v in obj.items()}


class CIFAR10(VisionDataset):
    """CIFAR-10 from ``root/cifar-10-batches-py`` (torchvision's layout) or ``root`` itself.

    Items are (float32 tensor [3, 32, 32] in [0, 1] (pixels / 255, torchvision's ToTensor
    convention), int label), then ``transform``/``target_transform``. ``.data``: uint8
    (N, 32, 32, 3) (HWC, as torchvision); ``.targets``: int64 (N,). Train = data_batch_1..5
    (50,000 images), test = test_batch (10,000). ``download=True`` is accepted when the files
    are present; gpudiff never downloads.
    """

    base_folder = "cifar-10-batches-py"
    train_list: ClassVar[list[str]] = [f"data_batch_{i}" for i in range(1, 6)]
    test_list: ClassVar[list[str]] = ["test_batch"]
    labels_key = "labels"
    classes: ClassVar[list[str]] = [
        "airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]

    def __init__(self, root, train=True, transform=None, target_transform=None,
                 download=False):
        super().__init__(root, train, transform, target_transform)
        folder = self._folder()
        data, targets = [], []
        for name in (self.train_list if self.train else self.test_list):
            path = os.path.join(folder, name)
            batch = load_batch(path)
            x, y = self._check(path, batch)
            data.append(x)
            targets.append(y)
        # (N, 3072) -> (N, 3, 32, 32) -> (N, 32, 32, 3): HWC like torchvision's .data
        self.data = np.concatenate(data).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1).copy()
        self.targets = np.concatenate(targets)

    def _folder(self):
        names = self.train_list if self.train else self.test_list
        candidates = [os.path.join(self.root, self.base_folder), self.root]
        for d in candidates:
            if os.path.isfile(os.path.join(d, names[0])):
                missing = [n for n in names if not os.path.isfile(os.path.join(d, n))]
                if missing:
                    raise FileNotFoundError(
                        f"{type(self).__name__}: {os.path.join(d, missing[0])} not found "
                        f"(the {'train' if self.train else 'test'} split needs "
                        f"{', '.join(names)}); gpudiff does not download datasets")
                return d
        raise FileNotFoundError(
            f"{type(self).__name__}: {names[0]} not found in {' or '.join(candidates)}; "
            f"gpudiff does not download datasets (expected the python batches of "
            f"{self.base_folder})")

    def _check(self, path, batch):
        x = batch.get("data")
        y = batch.get(self.labels_key)
        if not isinstance(x, np.ndarray) or x.dtype != np.uint8 or x.ndim != 2 \
                or x.shape[1] != 3072:
            desc = (f"{x.dtype} array of shape {x.shape}" if isinstance(x, np.ndarray)
                    else type(x).__name__)
            raise ValueError(f"{path}: corrupt CIFAR batch: 'data' must be a uint8 array of "
                             f"shape (N, 3072), got {desc}")
        if not isinstance(y, (list, tuple, np.ndarray)) or len(y) != len(x):
            raise ValueError(f"{path}: corrupt CIFAR batch: '{self.labels_key}' must list one "
                             f"label per image ({len(x)})")
        try:
            y = np.asarray(y, dtype=np.int64).reshape(-1)
        except (TypeError, ValueError):
            raise ValueError(f"{path}: corrupt CIFAR batch: labels are not integers") from None
        if y.size and (y.min() < 0 or y.max() >= len(self.classes)):
            raise ValueError(f"{path}: corrupt CIFAR batch: labels must be in "
                             f"0..{len(self.classes) - 1}, found {y.min()}..{y.max()}")
        return x, y

    def _image(self, index):
        # (32, 32, 3) uint8 -> (3, 32, 32) float32 in [0, 1]
        return np.ascontiguousarray(scaled(self.data, index, 255.0).transpose(2, 0, 1))
