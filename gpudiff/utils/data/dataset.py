"""Map-style and iterable datasets, as in torch.utils.data.

A map-style dataset is anything with ``__getitem__(index)`` and ``__len__``; an iterable
dataset only has ``__iter__`` (a stream). The DataLoader batches either.
"""
import bisect
import math
import warnings

import numpy as np

from .. import _random
from .._tensor import is_tensor


class Dataset:
    """Base class of map-style datasets: subclasses define ``__getitem__`` and ``__len__``.

    >>> class Squares(Dataset):
    ...     def __len__(self): return 4
    ...     def __getitem__(self, i): return i * i
    >>> [Squares()[i] for i in range(4)]
    [0, 1, 4, 9]
    """

    def __getitem__(self, index):
        raise NotImplementedError(f"{type(self).__name__} must implement __getitem__")

    def __add__(self, other):
        return ConcatDataset([self, other])


class IterableDataset(Dataset):
    """Base class of stream datasets: subclasses define ``__iter__``.

    With ``num_workers > 0`` each worker iterates its own copy; use
    ``gpudiff.utils.data.get_worker_info()`` inside ``__iter__`` to give each worker a shard.
    """

    def __iter__(self):
        raise NotImplementedError(f"{type(self).__name__} must implement __iter__")

    def __add__(self, other):
        raise TypeError("IterableDataset does not support '+' (concatenation)")


def _first_dim(t):
    shape = getattr(t, "shape", None)
    if shape is None or len(shape) == 0:
        raise ValueError("TensorDataset: every tensor needs a first dimension (got a scalar)")
    return int(shape[0])


class TensorDataset(Dataset):
    """Wraps tensors (or arrays) that share their first dimension; item i is
    ``tuple(t[i] for t in tensors)``.

    >>> import numpy as np
    >>> ds = TensorDataset(np.zeros((3, 2)), np.arange(3))
    >>> len(ds), int(ds[1][1])
    (3, 1)
    """

    def __init__(self, *tensors):
        if not tensors:
            raise ValueError("TensorDataset needs at least one tensor")
        n = _first_dim(tensors[0])
        for k, t in enumerate(tensors):
            if _first_dim(t) != n:
                raise ValueError(
                    f"Size mismatch between tensors: tensor 0 has {n} rows, tensor {k} has "
                    f"{_first_dim(t)}")
        self.tensors = tensors

    def __getitem__(self, index):
        return tuple(t[index] for t in self.tensors)

    def __len__(self):
        return _first_dim(self.tensors[0])


class ConcatDataset(Dataset):
    """The concatenation of map-style datasets (index i runs through them in order)."""

    def __init__(self, datasets):
        self.datasets = list(datasets)
        if not self.datasets:
            raise ValueError("datasets should not be an empty iterable")
        for d in self.datasets:
            if isinstance(d, IterableDataset):
                raise TypeError("ConcatDataset does not support IterableDataset")
        self.cumulative_sizes = []
        total = 0
        for d in self.datasets:
            total += len(d)
            self.cumulative_sizes.append(total)

    def __len__(self):
        return self.cumulative_sizes[-1]

    def __getitem__(self, idx):
        n = len(self)
        if idx < 0:
            if -idx > n:
                raise ValueError("absolute value of index should not exceed dataset length")
            idx += n
        if idx >= n:
            raise IndexError(f"index {idx} is out of range for a ConcatDataset of length {n}")
        d = bisect.bisect_right(self.cumulative_sizes, idx)
        start = self.cumulative_sizes[d - 1] if d > 0 else 0
        return self.datasets[d][idx - start]


class Subset(Dataset):
    """The items of ``dataset`` at ``indices``, in that order."""

    def __init__(self, dataset, indices):
        self.dataset = dataset
        if is_tensor(indices) or isinstance(indices, np.ndarray):
            indices = np.asarray(indices).tolist()
        self.indices = indices

    def __getitem__(self, idx):
        if isinstance(idx, list):
            return self.dataset[[self.indices[i] for i in idx]]
        return self.dataset[self.indices[idx]]

    def __getitems__(self, indices):
        # the DataLoader fetches a batch of indices at once through this, when present
        inner = getattr(self.dataset, "__getitems__", None)
        if callable(inner):
            return inner([self.indices[i] for i in indices])
        return [self.dataset[self.indices[i]] for i in indices]

    def __len__(self):
        return len(self.indices)


def random_split(dataset, lengths, generator=None):
    """Split ``dataset`` into non-overlapping random Subsets of the given lengths.

    lengths: ints that sum to ``len(dataset)``, or fractions that sum to 1 (each subset
    gets ``floor(frac * len)`` items and the remainder is dealt round-robin from the first,
    as PyTorch does). generator: see ``gpudiff.utils._random.numpy_rng`` (None draws from
    gpudiff's global RNG, so ``gpudiff.manual_seed`` makes the split reproducible).

    >>> a, b = random_split(range(10), [0.8, 0.2], generator=0)
    >>> len(a), len(b), sorted(list(a) + list(b)) == list(range(10))
    (8, 2, True)
    """
    lengths = list(lengths)
    n = len(dataset)
    if math.isclose(sum(lengths), 1) and sum(lengths) <= 1:
        sizes = []
        for i, frac in enumerate(lengths):
            if frac < 0 or frac > 1:
                raise ValueError(f"Fraction at index {i} is not between 0 and 1")
            sizes.append(math.floor(n * frac))
        remainder = n - sum(sizes)
        for i in range(remainder):
            sizes[i % len(sizes)] += 1
        for i, size in enumerate(sizes):
            if size == 0:
                warnings.warn(f"Length of split at index {i} is 0. "
                              f"This might result in an empty dataset.")
        lengths = sizes
    for i, size in enumerate(lengths):
        if isinstance(size, (bool, np.bool_)) or not isinstance(size, (int, np.integer)):
            raise TypeError(f"random_split: length at index {i} must be an int or a fraction "
                            f"(fractions must sum to 1), got {size!r}")
        if size < 0:
            raise ValueError(f"random_split: length at index {i} is negative ({size})")
    if sum(lengths) != n:
        raise ValueError("Sum of input lengths does not equal the length of the input dataset!"
                         f" (sum {sum(lengths)}, dataset length {n})")
    perm = _random.numpy_rng(generator).permutation(n).tolist()
    subsets, offset = [], 0
    for size in lengths:
        subsets.append(Subset(dataset, perm[offset:offset + int(size)]))
        offset += int(size)
    return subsets
