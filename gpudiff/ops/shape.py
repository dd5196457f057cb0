"""Shape ops: reshape, transpose, expand, cat, ... Views where NumPy gives views."""
from . import Op


def _inverse(dims):
    """The permutation undoing ``dims``."""
    inv = [0] * len(dims)
    for i, d in enumerate(dims):
        inv[d] = i
    return inv


class reshape(Op):
    view = True

    def forward(ctx, x, *, shape):
        ctx.shape = x.shape
        return x.reshape(shape)

    def backward(ctx, gy):
        return gy.reshape(ctx.shape)

    def backward_arrays(ctx, gy):
        return gy.reshape(ctx.shape)


class permute(Op):
    view = True

    def forward(ctx, x, *, dims):
        ctx.dims = dims
        return ctx.xp.transpose(x, dims)

    def backward(ctx, gy):
        return gy.permute(*_inverse(ctx.dims))

    def backward_arrays(ctx, gy):
        return ctx.xp.transpose(gy, _inverse(ctx.dims))


class expand(Op):
    """Broadcast to ``shape`` (a read-only view, like torch.expand)."""
    view = True

    def forward(ctx, x, *, shape):
        ctx.shape = x.shape
        return ctx.xp.broadcast_to(x, shape)

    def backward(ctx, gy):
        from .elementwise import sum_to
        return sum_to(gy, ctx.shape)

    def backward_arrays(ctx, gy):
        from .elementwise import sum_to
        return sum_to(gy, ctx.shape)


class flip(Op):
    def forward(ctx, x, *, dims):
        ctx.dims = dims
        return ctx.xp.flip(x, dims).copy()

    def backward(ctx, gy):
        return gy.flip(ctx.dims)


class cat(Op):
    """cat(*tensors, dim): the gradient is split back along ``dim``."""

    def forward(ctx, *xs, dim=0):
        ctx.dim = dim
        ctx.sizes = [x.shape[dim] for x in xs]
        return ctx.xp.concatenate(xs, axis=dim)

    def backward(ctx, gy):
        return tuple(gy.split(ctx.sizes, ctx.dim))


class slice_dim(Op):
    """x[..., start:stop, ...] along one dim (used by split/chunk/narrow); a view."""
    view = True

    def forward(ctx, x, *, dim, start, stop):
        ctx.dim, ctx.start, ctx.shape = dim, start, x.shape
        idx = [slice(None)] * x.ndim
        idx[dim] = slice(start, stop)
        return x[tuple(idx)]

    def backward(ctx, gy):
        pad = [(0, 0)] * gy.ndim
        pad[ctx.dim] = (ctx.start, ctx.shape[ctx.dim] - ctx.start - gy.shape[ctx.dim])
        return pad_constant.apply(gy, pad=pad)


class pad_constant(Op):
    """Constant padding; ``pad`` = ((before, after) per dim), negative = crop."""

    def forward(ctx, x, *, pad, value=0.0):
        ctx.pad = pad
        xp = ctx.xp
        crop = tuple(slice(max(-b, 0), n - max(-a, 0)) for (b, a), n in zip(pad, x.shape))
        x = x[crop]
        widths = [(max(b, 0), max(a, 0)) for b, a in pad]
        return xp.pad(x, widths, mode="constant", constant_values=value)

    def backward(ctx, gy):
        return pad_constant.apply(gy, pad=[(-b, -a) for b, a in ctx.pad])


class repeat(Op):
    def forward(ctx, x, *, repeats):
        ctx.shape, ctx.repeats = x.shape, repeats
        return ctx.xp.tile(x, repeats)

    def backward(ctx, gy):
        # (r0*s0, r1*s1, ...) -> (r0, s0, r1, s1, ...) -> sum over the r axes
        lead = len(ctx.repeats) - len(ctx.shape)
        shape = (1,) * lead + tuple(ctx.shape)
        split = []
        for r, s in zip(ctx.repeats, shape):
            split += [r, s]
        g = gy.reshape(split).sum(dim=tuple(range(0, 2 * len(shape), 2)))
        return g.reshape(ctx.shape)


class contiguous(Op):
    def forward(ctx, x):
        return ctx.xp.ascontiguousarray(x)

    def backward(ctx, gy):
        return gy

    def backward_arrays(ctx, gy):
        return gy
