"""Indexing: x[key], gather, scatter_add. Keys hold slices, ints, None, Ellipsis and
integer/bool arrays (already on the tensor's device). Gradients of repeated indices add up.
"""
from .. import runtime
from . import Op


def _is_advanced(key):
    return any(runtime.is_array(k) for k in key)


class getitem(Op):
    view = True  # basic indexing gives a view; advanced indexing a copy (harmless here)

    def forward(ctx, x, *, key):
        ctx.shape, ctx.key = x.shape, key
        return x[key]

    def backward(ctx, gy):
        return index_put_zeros.apply(gy, shape=ctx.shape, key=ctx.key)


class index_put_zeros(Op):
    """zeros(shape) with ``g`` added at ``key`` (the backward of getitem)."""

    def forward(ctx, g, *, shape, key):
        ctx.key = key
        out = ctx.xp.zeros(shape, dtype=g.dtype)
        if _is_advanced(key):
            runtime.index_add_at(out, key, g)  # repeated indices accumulate
        else:
            out[key] = g
        return out

    def backward(ctx, ggx):
        return getitem.apply(ggx, key=ctx.key)


def _grid(xp, index, dim):
    """Full index tuple for ``index`` along ``dim`` (the other axes: their own positions)."""
    grids = list(xp.indices(index.shape, sparse=True))
    grids[dim] = index
    return tuple(grids)


class gather(Op):
    def forward(ctx, x, index, *, dim):
        if index.ndim != x.ndim:
            raise RuntimeError(f"gather: index {tuple(index.shape)} and input "
                               f"{tuple(x.shape)} must have the same number of dimensions")
        ctx.shape, ctx.dim = x.shape, dim
        ctx.save_for_backward(index)
        return x[_grid(ctx.xp, index, dim)]

    def backward(ctx, gy):
        index, = ctx.saved_tensors
        return gy.new_zeros(ctx.shape).scatter_add(ctx.dim, index, gy), None


class scatter_add(Op):
    """out = x.clone(); out[index[i][j]][j] += src[i][j] (dim 0), for any dim."""

    def forward(ctx, x, index, src, *, dim):
        ctx.dim = dim
        ctx.save_for_backward(index)
        out = x.copy()
        ctx.src_shape = src.shape
        src = src[tuple(slice(0, n) for n in index.shape)]  # only src[:index.shape] is used
        runtime.index_add_at(out, _grid(ctx.xp, index, dim), src)
        return out

    def backward(ctx, gy):
        index, = ctx.saved_tensors
        gsrc = gy.gather(ctx.dim, index)                    # (index.shape)
        if gsrc.shape != ctx.src_shape:  # the unused tail of a larger src gets zeros
            from .shape import pad_constant
            gsrc = pad_constant.apply(gsrc, pad=[(0, s - n) for s, n in
                                                 zip(ctx.src_shape, gsrc.shape)])
        return gy, None, gsrc
