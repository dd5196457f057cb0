"""The base of gpudiff's image datasets: items are (float32 image tensor [C, H, W] in [0, 1],
int label), then ``transform`` / ``target_transform`` when given (as torchvision's)."""
import os

import numpy as np

from ..utils._tensor import from_numpy
from ..utils.data import Dataset


class VisionDataset(Dataset):
    """Holds ``data`` (uint8 images, numpy) and ``targets`` (int64 labels, numpy).

    Subclasses set ``self.data``, ``self.targets`` and implement ``_image(i)`` returning
    the float32 [C, H, W] numpy image of item ``i``.
    """

    split_names = ("Train", "Test")

    def __init__(self, root=None, train=True, transform=None, target_transform=None):
        self.root = None if root is None else os.fspath(root)
        self.train = bool(train)
        self.transform = transform
        self.target_transform = target_transform

    def __len__(self):
        return len(self.targets)

    def _image(self, index):
        raise NotImplementedError

    def __getitem__(self, index):
        index = int(index)
        n = len(self)
        if not -n <= index < n:
            raise IndexError(f"index {index} is out of range for {type(self).__name__} of "
                             f"length {n}")
        img = from_numpy(self._image(index % n))
        target = int(self.targets[index])
        if self.transform is not None:
            img = self.transform(img)
        if self.target_transform is not None:
            target = self.target_transform(target)
        return img, target

    @property
    def class_to_idx(self):
        return {c: i for i, c in enumerate(self.classes)}

    def __repr__(self):
        lines = [f"Dataset {type(self).__name__}",
                 f"    Number of datapoints: {len(self)}"]
        if self.root is not None:
            lines.append(f"    Root location: {self.root}")
        lines.append(f"    Split: {self.split_names[0] if self.train else self.split_names[1]}")
        if self.transform is not None:
            lines.append("    Transform: " + repr(self.transform).replace("\n", "\n    "))
        if self.target_transform is not None:
            lines.append("    Target transform: " + repr(self.target_transform))
        return "\n".join(lines)


def scaled(images_u8, index, scale):
    """float32 copy of one uint8 image, divided by ``scale``: (H, W) -> (1, H, W)."""
    img = images_u8[index].astype(np.float32) / np.float32(scale)
    return img[None] if img.ndim == 2 else img
