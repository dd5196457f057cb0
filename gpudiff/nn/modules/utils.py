"""Argument helpers shared by the layers (pairs of ints come from gpudiff.geometry.pair)."""


def _reverse_repeat_tuple(t, n):
    """(a, b) -> [b, b, a, a] for n=2: conv padding as F.pad widths (last dim first)."""
    return [x for x in reversed(t) for _ in range(n)]
