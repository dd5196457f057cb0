"""Argument helpers shared by the layers (PyTorch's _pair and friends)."""
from collections.abc import Iterable


def _ntuple(n):
    def parse(x):
        if isinstance(x, Iterable) and not isinstance(x, str):
            return tuple(x)
        return (x,) * n
    return parse


_single = _ntuple(1)
_pair = _ntuple(2)


def _reverse_repeat_tuple(t, n):
    """(a, b) -> [b, b, a, a] for n=2: conv padding as F.pad widths (last dim first)."""
    return [x for x in reversed(t) for _ in range(n)]
