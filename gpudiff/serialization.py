"""``gpudiff.save`` / ``gpudiff.load``: checkpoints that are safe to load from anyone.

The file is one safetensors file. Its tensors are the tensors (and numpy arrays) of the
saved object, named by where they sit (``"model.conv1.weight"``, ``"optimizer.state.0.exp_avg"``),
so a flat state dict is an ordinary safetensors state dict that other tools can read.
Everything else (the nesting of dicts, lists and tuples, and the plain values: int, float,
str, bool, None) is a JSON document kept in the safetensors header metadata under the key
``"gpudiff"``. Nothing is ever unpickled: loading a file can only produce tensors, arrays,
dicts, lists, tuples and plain values; a file whose JSON asks for anything else is refused.

The JSON document: ``{"format": "gpudiff", "version": 1, "root": NODE}`` where a NODE is a
JSON null/bool/number/string (that value), a JSON list (a list of NODEs), or an object with
exactly one of these keys:
  {"$tensor": name, "device": "cuda:0"}   a gpudiff tensor (device is where it was saved)
  {"$ndarray": name}                      a numpy array
  {"$tuple": [NODE, ...]}                 a tuple
  {"$dict": [[KEY, NODE], ...]}           a dict (keys: str, int, float, bool or None)
  {"$odict": [[KEY, NODE], ...]}          a collections.OrderedDict
  {"$float": "nan" | "inf" | "-inf"}      a non-finite float
  {"$dtype": "float32"}                   a dtype (e.g. gpudiff.float32)

Saving is atomic: the file is written under a temporary name in the target's directory,
flushed to disk (fsync) and renamed over ``path``, so an interrupted save leaves any old
checkpoint intact.
"""
import collections
import json
import math
import os
import tempfile

import numpy as np
import safetensors
import safetensors.numpy

from .runtime.dtypes import bfloat16
from .utils._tensor import from_numpy, is_tensor, to_numpy

__all__ = ["load", "save"]

FORMAT = "gpudiff"
VERSION = 1
_META_KEY = "gpudiff"
_MAX_DEPTH = 200         # nesting a hostile file may ask for before we refuse it

# the dtypes a checkpoint may hold (safetensors' own list; bfloat16 is ml_dtypes')
_DTYPES = {np.dtype(n).name: np.dtype(n) for n in (
    "bool", "uint8", "int8", "int16", "uint16", "int32", "uint32", "int64", "uint64",
    "float16", "float32", "float64")}
_DTYPES["bfloat16"] = bfloat16
# safetensors' dtype names -> NumPy dtypes (safetensors.numpy.load lacks BF16)
_ST_DTYPES = {"BOOL": np.dtype(bool), "U8": np.dtype("uint8"), "I8": np.dtype("int8"),
              "I16": np.dtype("int16"), "U16": np.dtype("uint16"), "I32": np.dtype("int32"),
              "U32": np.dtype("uint32"), "I64": np.dtype("int64"), "U64": np.dtype("uint64"),
              "F16": np.dtype("float16"), "BF16": bfloat16, "F32": np.dtype("float32"),
              "F64": np.dtype("float64")}


def _load_arrays(data):
    """{name: ndarray} of a safetensors file's bytes (BF16 as ml_dtypes' bfloat16)."""
    out = {}
    for k, v in safetensors.deserialize(bytes(data)):
        dt = _ST_DTYPES.get(v["dtype"])
        if dt is None:
            raise ValueError(f"unsupported safetensors dtype {v['dtype']!r:.20}")
        out[k] = np.frombuffer(v["data"], dtype=dt).reshape(v["shape"])
    return out


# ---- save -------------------------------------------------------------------------------
class _Encoder:
    """Walks the object: plain values become JSON, tensors/arrays go to ``self.arrays``."""

    def __init__(self):
        self.arrays = {}       # safetensors name -> contiguous little-endian ndarray
        self._by_id = {}       # id(tensor or array) -> name: a shared tensor is stored once
        self._keep = []        # keeps encoded objects alive, so ids stay unique
        self._open = set()     # ids of the containers on the current path (cycle check)

    def _name(self, where):
        name = where or "tensor"
        k = 1
        while name in self.arrays:
            k += 1
            name = f"{where}#{k}"
        return name

    def _array(self, obj, arr, where):
        if arr.dtype.name not in _DTYPES:
            raise TypeError(f"gpudiff.save: cannot save a {arr.dtype} array at {where or 'the top'}"
                            f" (supported dtypes: {', '.join(_DTYPES)})")
        key = id(obj)
        if key in self._by_id:
            return self._by_id[key]
        if not arr.flags.c_contiguous:     # (not ascontiguousarray: it makes 0-d arrays 1-d)
            arr = arr.copy(order="C")
        if arr.dtype.byteorder == ">":
            arr = arr.astype(arr.dtype.newbyteorder("<"))
        name = self._name(where)
        self.arrays[name] = arr
        self._by_id[key] = name
        self._keep.append(obj)
        return name

    def key(self, k, where):
        if k is None or isinstance(k, (bool, str)):
            return k
        if isinstance(k, (np.bool_, np.integer, np.floating, int, float)):
            return self.node(k, where)
        raise TypeError(f"gpudiff.save: dict key {k!r} at {where or 'the top'} is a "
                        f"{type(k).__name__}; keys must be str, int, float, bool or None")

    def node(self, obj, where=""):
        if isinstance(obj, (dict, list, tuple)):
            if id(obj) in self._open:
                raise ValueError(f"gpudiff.save: the object refers to itself at "
                                 f"{where or 'the top'} (a cycle cannot be saved)")
            if len(self._open) >= _MAX_DEPTH:
                raise ValueError(f"gpudiff.save: nested deeper than {_MAX_DEPTH} levels at "
                                 f"{where[:200]}")
            self._open.add(id(obj))
            try:
                return self._container(obj, where)
            finally:
                self._open.discard(id(obj))
        if obj is None or isinstance(obj, (bool, str)):
            return obj
        if isinstance(obj, np.bool_):
            return bool(obj)
        if isinstance(obj, (int, np.integer)):
            return int(obj)
        if isinstance(obj, (float, np.floating)):
            x = float(obj)
            if math.isfinite(x):
                return x
            return {"$float": "nan" if math.isnan(x) else ("inf" if x > 0 else "-inf")}
        if is_tensor(obj):
            name = self._array(obj, to_numpy(obj), where)
            return {"$tensor": name, "device": _device_str(obj.device)}
        if isinstance(obj, np.ndarray):
            return {"$ndarray": self._array(obj, obj, where)}
        if isinstance(obj, np.dtype):
            if obj.name not in _DTYPES:
                raise TypeError(f"gpudiff.save: unsupported dtype {obj} at {where or 'the top'}")
            return {"$dtype": obj.name}
        raise TypeError(
            f"gpudiff.save: cannot save a {type(obj).__module__}.{type(obj).__qualname__} at "
            f"{where or 'the top'}: only tensors, numpy arrays, dicts, lists, tuples, int, float, "
            f"str, bool and None can be saved (gpudiff never pickles)")

    def _container(self, obj, where):
        if isinstance(obj, dict):
            tag = "$odict" if isinstance(obj, collections.OrderedDict) else "$dict"
            items = []
            for k, v in obj.items():
                sub = f"{where}.{k}" if where else str(k)
                items.append([self.key(k, where), self.node(v, sub)])
            return {tag: items}
        if isinstance(obj, tuple):
            return {"$tuple": [self.node(v, f"{where}.{i}" if where else str(i))
                               for i, v in enumerate(obj)]}
        return [self.node(v, f"{where}.{i}" if where else str(i)) for i, v in enumerate(obj)]


def _device_str(dev):
    """'cpu' or 'cuda:N': the key map_location dicts use (PyTorch's location strings)."""
    index = getattr(dev, "index", None)
    kind = getattr(dev, "type", str(dev))
    if kind == "cuda" and index is None:
        index = 0
    return kind if index is None else f"{kind}:{index}"


def _default_mode():
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def _atomic_write(path, data):
    """Write bytes to ``path`` via a temporary file in the same directory + fsync + rename."""
    path = os.path.abspath(os.fspath(path))
    directory = os.path.dirname(path)
    try:
        mode = os.stat(path).st_mode & 0o777       # keep an existing file's permissions
    except FileNotFoundError:
        mode = _default_mode()
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp",
                               dir=directory)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    # make the rename itself durable (best effort: not every platform can fsync a directory)
    try:
        dfd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(dfd)
    except OSError:
        pass
    finally:
        os.close(dfd)


def save(obj, f):
    """Save ``obj`` (nested dicts/lists/tuples of tensors, numpy arrays and plain values) to
    ``f`` (a path, or a binary file object) as one safetensors file.

    Tensors are saved detached, from any device; a tensor that appears twice is stored once
    and comes back as one object. Writing to a path is atomic.

    >>> import gpudiff, tempfile, os
    >>> from gpudiff.serialization import save, load   # also gpudiff.save / gpudiff.load
    >>> p = os.path.join(tempfile.mkdtemp(), "ckpt.safetensors")
    >>> save({"w": gpudiff.ones(2), "epoch": 3}, p)
    >>> ck = load(p)
    >>> ck["epoch"], ck["w"].tolist()
    (3, [1.0, 1.0])
    """
    enc = _Encoder()
    doc = {"format": FORMAT, "version": VERSION, "root": enc.node(obj)}
    meta = {_META_KEY: json.dumps(doc, allow_nan=False, separators=(",", ":"))}
    data = safetensors.numpy.save(enc.arrays, metadata=meta)
    if hasattr(f, "write"):
        f.write(data)
        return
    _atomic_write(f, data)


# ---- load -------------------------------------------------------------------------------
def _read(f):
    if hasattr(f, "read"):
        return f.read(), getattr(f, "name", None) or repr(f)
    path = os.fspath(f)
    with open(path, "rb") as fh:
        return fh.read(), path


def _parse_header(data, name):
    """The safetensors header (dict), with errors that say what is wrong with the file."""
    if len(data) < 8:
        raise ValueError(f"{name}: not a gpudiff checkpoint: the file is {len(data)} bytes, "
                         f"too short for a safetensors header (empty or truncated)")
    n = int.from_bytes(data[:8], "little")
    if n > len(data) - 8:
        raise ValueError(f"{name}: truncated or corrupt checkpoint: the header claims {n} bytes "
                         f"but only {len(data) - 8} follow (not a safetensors file, or cut off)")
    try:
        header = json.loads(data[8:8 + n].decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        raise ValueError(f"{name}: corrupt checkpoint: the safetensors header is not valid "
                         f"JSON ({e})") from None
    if not isinstance(header, dict):
        msg = f"{name}: corrupt checkpoint: the safetensors header is not a JSON object"
        raise ValueError(msg)  # noqa: TRY004 (a corrupt file, not a caller's type error)
    return header


class _Decoder:
    def __init__(self, arrays, name, map_location):
        self.arrays = arrays
        self.name = name
        self.map_location = map_location
        self._made = {}          # tensor name -> object, so shared tensors stay shared

    def fail(self, msg, where):
        raise ValueError(f"{self.name}: invalid checkpoint structure at {where or 'the top'}: "
                         f"{msg}")

    def _get_array(self, tname, where):
        if not isinstance(tname, str) or tname not in self.arrays:
            self.fail(f"refers to a tensor {tname!r} that the file does not contain", where)
        return self.arrays[tname]

    def _tensor(self, tname, saved_device, where):
        arr = self._get_array(tname, where)          # checks tname first (hashable, present)
        key = ("t", tname)
        if key not in self._made:
            self._made[key] = _place(from_numpy(arr), saved_device, self.map_location)
        return self._made[key]

    def key(self, k, where):
        if k is None or isinstance(k, (bool, str, int, float)):
            return k
        if isinstance(k, dict) and set(k) == {"$float"}:
            return self.node(k, where, 0)
        self.fail(f"a dict key must be a str, int, float, bool or None, not {k!r}", where)

    def node(self, x, where, depth):
        if depth > _MAX_DEPTH:
            self.fail(f"nested deeper than {_MAX_DEPTH} levels", where)
        if x is None or isinstance(x, (bool, str, int, float)):
            return x
        if isinstance(x, list):
            return [self.node(v, f"{where}[{i}]", depth + 1) for i, v in enumerate(x)]
        if not isinstance(x, dict):
            self.fail(f"unexpected JSON value {x!r}", where)
        tags = [k for k in x if k.startswith("$")]
        if len(tags) != 1:
            self.fail(f"expected an object with one '$' tag, got keys {sorted(x)[:5]}", where)
        tag = tags[0]
        val = x[tag]
        extra = set(x) - {tag} - ({"device"} if tag == "$tensor" else set())
        if extra:
            self.fail(f"unexpected keys {sorted(extra)[:5]} beside {tag!r}", where)
        if tag == "$tensor":
            device = x.get("device", "cpu")
            if not isinstance(device, str):
                self.fail(f"device must be a string, got {device!r}", where)
            return self._tensor(val, device, where)
        if tag == "$ndarray":
            arr = self._get_array(val, where)
            return self._made.setdefault(("a", val), arr)
        if tag == "$tuple":
            if not isinstance(val, list):
                self.fail("$tuple must hold a list", where)
            return tuple(self.node(v, f"{where}[{i}]", depth + 1) for i, v in enumerate(val))
        if tag in ("$dict", "$odict"):
            if not isinstance(val, list):
                self.fail(f"{tag} must hold a list of [key, value] pairs", where)
            out = collections.OrderedDict() if tag == "$odict" else {}
            for item in val:
                if not (isinstance(item, list) and len(item) == 2):
                    self.fail(f"{tag} entries must be [key, value] pairs, got {item!r:.60}",
                              where)
                k = self.key(item[0], where)
                out[k] = self.node(item[1], f"{where}[{k!r}]", depth + 1)
            return out
        if tag == "$float":
            if val not in ("nan", "inf", "-inf"):
                self.fail(f"$float must be 'nan', 'inf' or '-inf', got {val!r:.60}", where)
            return float(val)
        if tag == "$dtype":
            if val not in _DTYPES:
                self.fail(f"unsupported dtype {val!r:.60}", where)
            return _DTYPES[val]
        self.fail(f"unknown tag {tag!r:.60} (this file asks for something gpudiff does not "
                  f"load)", where)


def _place(t, saved_device, map_location):
    """Move a freshly loaded CPU tensor where ``map_location`` says (default: the CPU)."""
    if map_location is None:
        return t
    if isinstance(map_location, dict):
        target = map_location.get(saved_device)
        return t if target is None else _place(t, saved_device, target)
    if callable(map_location) and not isinstance(map_location, str) \
            and not hasattr(map_location, "type"):
        out = map_location(t, saved_device)
        return t if out is None else out
    if str(map_location) == "cpu":
        return t
    return t.to(map_location)


def load(f, map_location=None, *, weights_only=True, mmap=None):
    """Load what :func:`save` wrote (or any safetensors file, as a flat dict of tensors).

    map_location: None (tensors come back on the CPU), a device or device string, a dict
    mapping saved device strings to devices ({"cuda:0": "cpu"}), or a callable
    ``fn(tensor, saved_device) -> tensor``. Tensors come back detached
    (``requires_grad=False``). ``weights_only`` and ``mmap`` are accepted for PyTorch
    compatibility: loading is always weights-only safe (no code runs), and reads the whole
    file.

    A truncated, corrupt or non-gpudiff file raises ValueError naming the file.
    """
    data, name = _read(f)
    header = _parse_header(data, name)
    try:
        arrays = _load_arrays(data)
    except Exception as e:  # noqa: BLE001 (SafetensorError: offsets, sizes, dtypes)
        raise ValueError(f"{name}: corrupt or truncated checkpoint: {e}") from None
    meta = header.get("__metadata__") or {}
    if not isinstance(meta, dict) or _META_KEY not in meta:
        # a plain safetensors file: its tensors by name, in file order
        order = [k for k in header if k != "__metadata__"]
        return {k: _place(from_numpy(arrays[k]), "cpu", map_location) for k in order}
    try:
        doc = json.loads(meta[_META_KEY])
    except (TypeError, ValueError, RecursionError) as e:
        raise ValueError(f"{name}: corrupt checkpoint: its structure is not valid JSON "
                         f"({str(e)[:200]})") from None
    if not isinstance(doc, dict) or doc.get("format") != FORMAT or "root" not in doc:
        raise ValueError(f"{name}: corrupt checkpoint: the '{_META_KEY}' metadata is not a "
                         f"gpudiff structure")
    version = doc.get("version")
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise ValueError(f"{name}: corrupt checkpoint: bad format version {version!r:.40}")
    if version > VERSION:
        raise ValueError(f"{name}: checkpoint format version {version} is newer than this "
                         f"gpudiff reads ({VERSION}); upgrade gpudiff")
    try:
        return _Decoder(arrays, name, map_location).node(doc["root"], "", 0)
    except RecursionError:       # a safety net: _MAX_DEPTH should always trigger first
        raise ValueError(f"{name}: invalid checkpoint structure: nested too deeply") from None
