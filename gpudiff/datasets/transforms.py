"""Image transforms for [..., C, H, W] gpudiff tensors or numpy arrays (torchvision names).

Each transform returns the same kind it was given (a gpudiff tensor stays a tensor on
its device, a numpy array stays an array). Randomness comes from gpudiff's global RNG, so
``gpudiff.manual_seed`` makes augmentation reproducible; DataLoader workers seed it
per worker. Random transforms on a batch [N, C, H, W] draw once for the whole batch, as
torchvision's tensor transforms do.

>>> import numpy as np
>>> t = Compose([Normalize((0.5,), (0.5,)), RandomHorizontalFlip(p=1.0)])
>>> t(np.array([[[0.0, 1.0]]], dtype=np.float32)).tolist()
[[[1.0, -1.0]]]
"""
import numbers

import numpy as np

from ..geometry import pair
from ..runtime.dtypes import is_floating
from ..utils import _random
from ..utils._tensor import from_numpy, is_tensor, to_numpy

__all__ = [
    "CenterCrop",
    "Compose",
    "Lambda",
    "Normalize",
    "Pad",
    "RandomCrop",
    "RandomHorizontalFlip",
    "RandomVerticalFlip",
    "ToTensor",
]


def _unwrap(img):
    """(numpy array, rewrap function) for a tensor or an array of shape [..., C, H, W]."""
    if is_tensor(img):
        device = img.device

        def rewrap(a):
            t = from_numpy(a)
            return t if device.type == "cpu" else t.to(device)
        return to_numpy(img), rewrap
    if isinstance(img, np.ndarray):
        return img, lambda a: a
    raise TypeError(f"expected a gpudiff tensor or numpy array of shape [..., C, H, W], got "
                    f"{type(img).__name__}")


def _check_image(a, name):
    if a.ndim < 2:
        raise ValueError(f"{name}: expected an image of shape [..., C, H, W] (at least 2 "
                         f"dimensions), got shape {tuple(a.shape)}")


class Compose:
    """Apply transforms in order."""

    def __init__(self, transforms):
        self.transforms = list(transforms)

    def __call__(self, img):
        for t in self.transforms:
            img = t(img)
        return img

    def __repr__(self):
        body = "".join(f"\n    {t}" for t in self.transforms)
        return f"{type(self).__name__}({body}\n)"


class Lambda:
    """Wrap a function as a transform."""

    def __init__(self, lambd):
        if not callable(lambd):
            raise TypeError(f"Argument lambd should be callable, got {type(lambd).__name__}")
        self.lambd = lambd

    def __call__(self, img):
        return self.lambd(img)

    def __repr__(self):
        return f"{type(self).__name__}()"


class ToTensor:
    """numpy (H, W) or (H, W, C) image -> float32 tensor (C, H, W); uint8 is scaled to [0, 1]
    (torchvision's convention). A gpudiff tensor is returned unchanged."""

    def __call__(self, pic):
        if is_tensor(pic):
            return pic
        a = np.asarray(pic)
        if a.ndim == 2:
            a = a[:, :, None]
        if a.ndim != 3:
            raise ValueError(f"ToTensor: expected an (H, W) or (H, W, C) array, got shape "
                             f"{a.shape}")
        a = a.transpose(2, 0, 1)
        if a.dtype == np.uint8:
            a = a.astype(np.float32) / np.float32(255)
        elif not is_floating(a.dtype):
            a = a.astype(np.float32)
        return from_numpy(np.ascontiguousarray(a))

    def __repr__(self):
        return f"{type(self).__name__}()"


class Normalize:
    """(x - mean[c]) / std[c] per channel c of a float [..., C, H, W] image."""

    def __init__(self, mean, std, inplace=False):
        self.mean = mean
        self.std = std
        self.inplace = inplace

    def __call__(self, img):
        a, rewrap = _unwrap(img)
        if a.ndim < 3:
            raise ValueError(f"Normalize: expected a tensor of shape [..., C, H, W], got shape "
                             f"{tuple(a.shape)}")
        if not is_floating(a.dtype):
            raise TypeError(f"Input tensor should be a float tensor. Got {a.dtype}.")
        mean = np.asarray(self.mean, dtype=a.dtype).reshape(-1)
        std = np.asarray(self.std, dtype=a.dtype).reshape(-1)
        if np.any(std == 0):
            raise ValueError(f"std evaluated to zero after conversion to {a.dtype}, leading to "
                             f"division by zero.")
        c = a.shape[-3]
        for name, v in (("mean", mean), ("std", std)):
            if v.size not in (1, c):
                raise ValueError(f"Normalize: {name} has {v.size} values for an image with "
                                 f"{c} channels")
        # (C,) -> (C, 1, 1): broadcast over H, W (and any leading batch dims)
        out = (a - mean[:, None, None]) / std[:, None, None]
        out = out.astype(a.dtype, copy=False)
        if self.inplace and is_tensor(img):
            img.copy_(rewrap(out))
            return img
        if self.inplace:
            a[...] = out
            return a
        return rewrap(out)

    def __repr__(self):
        return f"{type(self).__name__}(mean={self.mean}, std={self.std})"


def _padding4(padding, name):
    """int | (lr, tb) | (left, top, right, bottom) -> (left, top, right, bottom)."""
    if isinstance(padding, numbers.Number):
        p = int(padding)
        return p, p, p, p
    if isinstance(padding, (tuple, list)):
        if len(padding) == 1:
            p = int(padding[0])
            return p, p, p, p
        if len(padding) == 2:
            return int(padding[0]), int(padding[1]), int(padding[0]), int(padding[1])
        if len(padding) == 4:
            return tuple(int(p) for p in padding)
    raise ValueError(f"{name}: padding must be an int or a sequence of 1, 2 or 4 ints, got "
                     f"{padding!r}")


_NP_PAD_MODES = {"constant": "constant", "edge": "edge", "reflect": "reflect",
                 "symmetric": "symmetric"}


def _pad(a, left, top, right, bottom, fill, mode):
    if min(left, top, right, bottom) < 0:
        raise ValueError("negative padding is not supported")
    widths = [(0, 0)] * (a.ndim - 2) + [(top, bottom), (left, right)]
    if mode == "constant":
        return np.pad(a, widths, mode="constant", constant_values=fill)
    return np.pad(a, widths, mode=_NP_PAD_MODES[mode])


class Pad:
    """Pad the last two dims: padding int | (lr, tb) | (left, top, right, bottom)."""

    def __init__(self, padding, fill=0, padding_mode="constant"):
        if padding_mode not in _NP_PAD_MODES:
            raise ValueError("Padding mode should be either constant, edge, reflect or "
                             "symmetric")
        self.padding = _padding4(padding, "Pad")
        self.fill = fill
        self.padding_mode = padding_mode

    def __call__(self, img):
        a, rewrap = _unwrap(img)
        _check_image(a, "Pad")
        return rewrap(_pad(a, *self.padding, self.fill, self.padding_mode))

    def __repr__(self):
        return (f"{type(self).__name__}(padding={self.padding}, fill={self.fill}, "
                f"padding_mode={self.padding_mode})")


class RandomCrop:
    """Crop a random (h, w) window, after optional padding (torchvision's RandomCrop).

    size: int or (h, w); padding: None, int, (lr, tb) or (left, top, right, bottom);
    pad_if_needed: pad the image up to ``size`` when it is smaller; fill / padding_mode:
    'constant' (with ``fill``), 'edge', 'reflect' or 'symmetric'.
    """

    def __init__(self, size, padding=None, pad_if_needed=False, fill=0,
                 padding_mode="constant"):
        if padding_mode not in _NP_PAD_MODES:
            raise ValueError("Padding mode should be either constant, edge, reflect or "
                             "symmetric")
        self.size = pair(size, "RandomCrop", "size")
        self.padding = None if padding is None else _padding4(padding, "RandomCrop")
        self.pad_if_needed = pad_if_needed
        self.fill = fill
        self.padding_mode = padding_mode

    def __call__(self, img):
        a, rewrap = _unwrap(img)
        _check_image(a, "RandomCrop")
        if self.padding is not None:
            a = _pad(a, *self.padding, self.fill, self.padding_mode)
        th, tw = self.size
        h, w = a.shape[-2:]
        if self.pad_if_needed and w < tw:
            a = _pad(a, tw - w, 0, tw - w, 0, self.fill, self.padding_mode)
        if self.pad_if_needed and h < th:
            a = _pad(a, 0, th - h, 0, th - h, self.fill, self.padding_mode)
        h, w = a.shape[-2:]
        if h < th or w < tw:
            raise ValueError(f"Required crop size {(th, tw)} is larger than input image size "
                             f"{(h, w)}")
        i = _random.randint(0, h - th + 1)     # top
        j = _random.randint(0, w - tw + 1)     # left
        return rewrap(np.ascontiguousarray(a[..., i:i + th, j:j + tw]))

    def __repr__(self):
        return f"{type(self).__name__}(size={self.size}, padding={self.padding})"


class CenterCrop:
    """Crop the central (h, w) window (zero-padding first if the image is smaller)."""

    def __init__(self, size):
        self.size = pair(size, "CenterCrop", "size")

    def __call__(self, img):
        a, rewrap = _unwrap(img)
        _check_image(a, "CenterCrop")
        th, tw = self.size
        h, w = a.shape[-2:]
        if h < th or w < tw:
            ph, pw = max(th - h, 0), max(tw - w, 0)
            a = _pad(a, pw // 2, ph // 2, (pw + 1) // 2, (ph + 1) // 2, 0, "constant")
            h, w = a.shape[-2:]
        i = round((h - th) / 2.0)             # torchvision's rounding (half to even)
        j = round((w - tw) / 2.0)
        return rewrap(np.ascontiguousarray(a[..., i:i + th, j:j + tw]))

    def __repr__(self):
        return f"{type(self).__name__}(size={self.size})"


class RandomHorizontalFlip:
    """Mirror left-right (last dim) with probability ``p``."""

    def __init__(self, p=0.5):
        self.p = p

    def __call__(self, img):
        if _random.random() < self.p:
            a, rewrap = _unwrap(img)
            _check_image(a, type(self).__name__)
            return rewrap(np.ascontiguousarray(a[..., ::-1]))
        return img

    def __repr__(self):
        return f"{type(self).__name__}(p={self.p})"


class RandomVerticalFlip:
    """Mirror top-bottom (dim -2) with probability ``p``."""

    def __init__(self, p=0.5):
        self.p = p

    def __call__(self, img):
        if _random.random() < self.p:
            a, rewrap = _unwrap(img)
            _check_image(a, type(self).__name__)
            return rewrap(np.ascontiguousarray(a[..., ::-1, :]))
        return img

    def __repr__(self):
        return f"{type(self).__name__}(p={self.p})"
