"""MNIST and FashionMNIST from the standard IDX files already on disk (never downloaded).

IDX format (big-endian): 2 zero bytes, a type code (0x08 uint8, 0x09 int8, 0x0B int16,
0x0C int32, 0x0D float32, 0x0E float64), the number of dimensions, one uint32 per
dimension, then the values in row-major order. Files may be gzipped (``.gz``).
"""
import gzip
import os
import zlib
from typing import ClassVar

import numpy as np

from ..utils._tensor import canonical
from .vision import VisionDataset, scaled

_IDX_TYPES = {0x08: np.dtype("u1"), 0x09: np.dtype("i1"), 0x0B: np.dtype(">i2"),
              0x0C: np.dtype(">i4"), 0x0D: np.dtype(">f4"), 0x0E: np.dtype(">f8")}


def _read_bytes(path):
    with open(path, "rb") as f:
        raw = f.read()
    if path.endswith(".gz") or raw[:2] == b"\x1f\x8b":
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError, zlib.error) as e:
            raise ValueError(f"{path}: corrupt or truncated gzip file ({e})") from None
    return raw


def read_idx(path, ndim=None):
    """The array stored in IDX file ``path`` (native byte order), checked against its header.

    ndim: the number of dimensions the caller expects (ValueError otherwise).
    """
    raw = _read_bytes(path)
    if len(raw) < 4:
        raise ValueError(f"{path}: truncated IDX file ({len(raw)} bytes; the header alone needs 4)")
    if raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_TYPES:
        magic = int.from_bytes(raw[:4], "big")
        raise ValueError(f"{path}: not an IDX file (bad magic number 0x{magic:08x}; expected "
                         f"0x0000TTNN with type TT in 08 09 0b 0c 0d 0e)")
    dtype, nd = _IDX_TYPES[raw[2]], raw[3]
    if ndim is not None and nd != ndim:
        raise ValueError(f"{path}: expected an IDX file with {ndim} dimensions, found {nd} "
                         f"(magic number 0x{int.from_bytes(raw[:4], 'big'):08x})")
    header = 4 + 4 * nd
    if len(raw) < header:
        raise ValueError(f"{path}: truncated IDX file (the header needs {header} bytes, the file "
                         f"has {len(raw)})")
    dims = tuple(int(d) for d in np.frombuffer(raw, ">u4", nd, 4))
    need = int(np.prod(dims, dtype=np.int64)) * dtype.itemsize
    have = len(raw) - header
    if have < need:
        raise ValueError(f"{path}: truncated IDX file: dimensions {dims} need {need} data bytes, "
                         f"the file has {have}")
    if have > need:
        raise ValueError(f"{path}: corrupt IDX file: {have - need} bytes after the {need} data "
                         f"bytes its dimensions {dims} describe")
    arr = np.frombuffer(raw, dtype, int(np.prod(dims, dtype=np.int64)), header).reshape(dims)
    return canonical(arr.copy())        # a writable copy, native byte order, numpy's dtype


class MNIST(VisionDataset):
    """MNIST from the IDX files under ``root``: ``root/MNIST/raw`` (torchvision's layout),
    ``root/MNIST``, ``root/raw`` or ``root`` itself; each file plain or ``.gz``.

    Items are (float32 tensor [1, 28, 28] in [0, 1] (pixels / 255), int label), then
    ``transform``/``target_transform``. ``.data``: uint8 (N, 28, 28); ``.targets``: int64 (N,).
    ``download=True`` is accepted when the files are present; gpudiff never downloads.
    """

    files: ClassVar[dict] = {True: ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
                             False: ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}
    classes: ClassVar[list[str]] = [
        "0 - zero", "1 - one", "2 - two", "3 - three", "4 - four", "5 - five", "6 - six",
        "7 - seven", "8 - eight", "9 - nine"]

    def __init__(self, root, train=True, transform=None, target_transform=None,
                 download=False):
        super().__init__(root, train, transform, target_transform)
        images_name, labels_name = self.files[self.train]
        images_path = self._find(images_name)
        labels_path = self._find(labels_name)
        images = read_idx(images_path, ndim=3)
        labels = read_idx(labels_path, ndim=1)
        if images.dtype != np.uint8:
            raise ValueError(f"{images_path}: expected uint8 pixels (IDX type 0x08), got "
                             f"{images.dtype}")
        if len(images) != len(labels):
            raise ValueError(f"{images_path} holds {len(images)} images but {labels_path} holds "
                             f"{len(labels)} labels")
        if labels.size and (labels.min() < 0 or labels.max() >= len(self.classes)):
            raise ValueError(f"{labels_path}: labels must be in 0..{len(self.classes) - 1}, "
                             f"found {labels.min()}..{labels.max()}")
        self.data = images
        self.targets = labels.astype(np.int64)

    @property
    def folder(self):
        return type(self).__name__

    def _candidates(self, name):
        dirs = [os.path.join(self.root, self.folder, "raw"), os.path.join(self.root, self.folder),
                os.path.join(self.root, "raw"), self.root]
        # also the "train-images.idx3-ubyte" spelling some mirrors use
        names = [name, name.replace("-idx", ".idx")]
        return [os.path.join(d, n + ext) for d in dirs for n in dict.fromkeys(names)
                for ext in ("", ".gz")]

    def _find(self, name):
        tried = self._candidates(name)
        for p in tried:
            if os.path.isfile(p):
                return p
        raise FileNotFoundError(
            f"{type(self).__name__}: file {name} (or {name}.gz) not found; gpudiff does not "
            f"download datasets. Looked in: " + ", ".join(dict.fromkeys(
                os.path.dirname(p) for p in tried)))

    def _image(self, index):
        return scaled(self.data, index, 255.0)


class FashionMNIST(MNIST):
    """Fashion-MNIST (Zalando): same files and layout as MNIST, under ``root/FashionMNIST``."""

    classes: ClassVar[list[str]] = [
        "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
        "Ankle boot"]
