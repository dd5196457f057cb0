"""Digits: the 1,797 8x8 UCI optical handwritten digits, shipped inside the package."""
import os
from typing import ClassVar

import numpy as np

from .vision import VisionDataset, scaled

_FILE = os.path.join(os.path.dirname(__file__), "data", "digits.npz")
_N_TRAIN = 1437
_cache = {}


def _load():
    if "images" not in _cache:
        try:
            with np.load(_FILE, allow_pickle=False) as z:
                images, labels = z["images"], z["labels"]
        except (OSError, ValueError, KeyError) as e:
            raise RuntimeError(f"{_FILE}: the shipped digits file is missing or damaged ({e}); "
                               f"reinstall gpudiff or run tools/make_digits.py") from None
        if images.shape != (1797, 8, 8) or labels.shape != (1797,):
            raise RuntimeError(f"{_FILE}: unexpected shapes {images.shape}, {labels.shape}")
        images.setflags(write=False)
        _cache["images"] = images
        _cache["labels"] = labels.astype(np.int64)
    return _cache["images"], _cache["labels"]


class Digits(VisionDataset):
    """The UCI optical handwritten digits (the set scikit-learn bundles), no download needed.

    Items are (float32 tensor [1, 8, 8] in [0, 1] (pixel counts 0..16 divided by 16), int
    label 0..9), then ``transform``/``target_transform``. ``train=True`` gives the first 1,437
    digits in the original order, ``train=False`` the last 360. ``.data``: uint8 (N, 8, 8)
    pixels 0..16; ``.targets``: int64 (N,). Origin and license (CC BY 4.0):
    gpudiff/datasets/data/README.md.

    >>> ds = Digits(train=False)
    >>> len(ds), ds[0][0].shape
    (360, (1, 8, 8))
    """

    classes: ClassVar[list[str]] = [str(d) for d in range(10)]

    def __init__(self, train=True, transform=None, target_transform=None):
        super().__init__(None, train, transform, target_transform)
        images, labels = _load()
        part = slice(0, _N_TRAIN) if self.train else slice(_N_TRAIN, None)
        self.data = images[part]
        self.targets = labels[part]

    def _image(self, index):
        return scaled(self.data, index, 16.0)
