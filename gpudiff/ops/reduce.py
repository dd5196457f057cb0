"""Reductions. ``dim`` is None (all), an int or a tuple; ``keepdim`` as PyTorch."""
from ..runtime.dtypes import is_floating
from . import Op
from .lowp import compute_in_float32


def norm_dims(dim, ndim):
    """dim (None | int | tuple) -> sorted tuple of non-negative axes."""
    if dim is None:
        return tuple(range(ndim))
    dims = (dim,) if isinstance(dim, int) else tuple(dim)
    out = []
    for d in dims:
        if not -max(ndim, 1) <= d < max(ndim, 1):
            raise IndexError(f"Dimension out of range (expected to be in range of "
                             f"[{-max(ndim, 1)}, {max(ndim, 1) - 1}], but got {d})")
        out.append(d % max(ndim, 1))
    return tuple(sorted(set(out)))


def _expand_back(g, shape, dims, keepdim):
    """Broadcast a reduced gradient (shape without ``dims``) back to ``shape``."""
    if not keepdim and dims and len(shape):
        kept = [1 if i in dims else n for i, n in enumerate(shape)]
        g = g.reshape(kept)
    return g.expand(shape)


def _expand_back_array(xp, g, shape, dims, keepdim):
    """_expand_back on a raw array (a read-only broadcast view, as expand gives)."""
    if not keepdim and dims and len(shape):
        g = g.reshape(tuple(1 if i in dims else n for i, n in enumerate(shape)))
    return xp.broadcast_to(g, shape)


class sum(Op):
    def forward(ctx, x, *, dim=None, keepdim=False):
        ctx.dims = norm_dims(dim, x.ndim)
        ctx.shape, ctx.keepdim = x.shape, keepdim
        return ctx.xp.sum(x, axis=ctx.dims if x.ndim else None, keepdims=keepdim)

    def backward(ctx, gy):
        return _expand_back(gy, ctx.shape, ctx.dims, ctx.keepdim)

    def backward_arrays(ctx, gy):
        return _expand_back_array(ctx.xp, gy, ctx.shape, ctx.dims, ctx.keepdim)


class cumsum(Op):
    """Running sums along ``dim`` (integers and bools sum in int64, as PyTorch); the gradient
    is the running sums of gy taken from the other end."""

    def forward(ctx, x, *, dim):
        ctx.dim = dim
        return ctx.xp.cumsum(x, axis=dim, dtype=x.dtype if is_floating(x.dtype) else "int64")

    def backward(ctx, gy):
        d = ctx.dim
        return gy.flip([d]).cumsum(d).flip([d])

    def backward_arrays(ctx, gy):
        xp, d = ctx.xp, ctx.dim
        return xp.flip(xp.cumsum(xp.flip(gy, d), axis=d), d)


class mean(Op):
    def forward(ctx, x, *, dim=None, keepdim=False):
        ctx.dims = norm_dims(dim, x.ndim)
        ctx.shape, ctx.keepdim = x.shape, keepdim
        ctx.n = 1
        for d in ctx.dims:
            ctx.n *= x.shape[d] if x.ndim else 1
        return ctx.xp.mean(x, axis=ctx.dims if x.ndim else None, keepdims=keepdim)

    def backward(ctx, gy):
        return _expand_back(gy / ctx.n, ctx.shape, ctx.dims, ctx.keepdim)

    def backward_arrays(ctx, gy):
        return _expand_back_array(ctx.xp, gy / ctx.n, ctx.shape, ctx.dims, ctx.keepdim)


class prod(Op):
    def forward(ctx, x, *, dim=None, keepdim=False):
        ctx.dims = norm_dims(dim, x.ndim)
        ctx.shape, ctx.keepdim = x.shape, keepdim
        y = ctx.xp.prod(x, axis=ctx.dims if x.ndim else None, keepdims=keepdim)
        ctx.save_for_backward(x, y)
        return y

    def backward(ctx, gy):
        x, y = ctx.saved_tensors
        g = _expand_back(gy, ctx.shape, ctx.dims, ctx.keepdim)
        if not bool((x.array == 0).any()):
            return g * _expand_back(y, ctx.shape, ctx.dims, ctx.keepdim) / x
        # with zeros y / x is 0/0: use the product of the other elements (exact; treated as
        # a constant by double backward)
        return g * x.__class__._make(_prod_of_others(ctx.xp, x.array, ctx.dims), x.device)


def _prod_of_others(xp, a, dims):
    """For each element, the product of the other elements of its reduction group."""
    rest = [d for d in range(a.ndim) if d not in dims]
    perm = rest + list(dims)
    t = xp.transpose(a, perm)
    k = 1
    for d in dims:
        k *= a.shape[d]
    flat = t.reshape(-1, k)                                   # (groups, K)
    ones = xp.ones_like(flat[:, :1])
    before = xp.cumprod(xp.concatenate([ones, flat[:, :-1]], 1), 1)  # exclusive prefix
    after = xp.cumprod(xp.concatenate([ones, flat[:, :0:-1]], 1), 1)[:, ::-1]  # suffix
    out = (before * after).reshape(t.shape)
    return xp.transpose(out, [perm.index(i) for i in range(a.ndim)])


class _Extreme:
    """amax / amin: ties share the gradient evenly (as torch.amax)."""

    def forward(ctx, x, *, dim=None, keepdim=False):
        ctx.dims = norm_dims(dim, x.ndim)
        ctx.shape, ctx.keepdim = x.shape, keepdim
        y = getattr(ctx.xp, ctx.op.op_fn)(x, axis=ctx.dims if x.ndim else None, keepdims=keepdim)
        ctx.save_for_backward(x, y)
        return y

    def backward(ctx, gy):
        x, y = ctx.saved_tensors
        mask = (x == _expand_back(y, ctx.shape, ctx.dims, ctx.keepdim)).to(gy.dtype)
        count = mask.sum(dim=ctx.dims, keepdim=True)
        return _expand_back(gy, ctx.shape, ctx.dims, ctx.keepdim) * mask / count


class amax(_Extreme, Op):
    op_fn = "amax"


class amin(_Extreme, Op):
    op_fn = "amin"


class max_dim(Op):
    """max(x, dim) -> (values, indices); the gradient goes to the first maximum."""

    def forward(ctx, x, *, dim, keepdim=False, largest=True):
        xp = ctx.xp
        d = norm_dims(dim, x.ndim)[0] if x.ndim else None
        idx = (xp.argmax if largest else xp.argmin)(x, axis=d, keepdims=True)
        vals = xp.take_along_axis(x, idx, axis=d) if x.ndim else x.copy()
        if not keepdim and x.ndim:
            vals, idx = vals.squeeze(d), idx.squeeze(d)
        idx = idx.astype("int64")
        ctx.d, ctx.shape, ctx.keepdim = d, x.shape, keepdim
        ctx.save_for_backward(idx)
        ctx.mark_non_differentiable(idx)
        return vals, idx

    def backward(ctx, gy, gi):
        idx, = ctx.saved_tensors
        if ctx.d is None:
            return gy
        if not ctx.keepdim:
            gy, idx = gy.unsqueeze(ctx.d), idx.unsqueeze(ctx.d)
        return gy.new_zeros(ctx.shape).scatter_add(ctx.d, idx, gy)


class argmax(Op):
    differentiable = False

    def forward(ctx, x, *, dim=None, keepdim=False, largest=True):
        fn = ctx.xp.argmax if largest else ctx.xp.argmin
        if dim is None:
            r = fn(x.reshape(-1))
            return ctx.xp.asarray(r).reshape((1,) * x.ndim if keepdim else ()).astype("int64")
        return fn(x, axis=dim, keepdims=keepdim).astype("int64")


class all(Op):
    differentiable = False

    def forward(ctx, x, *, dim=None, keepdim=False):
        return ctx.xp.all(x, axis=None if dim is None else norm_dims(dim, x.ndim),
                          keepdims=keepdim)


class any(Op):
    differentiable = False

    def forward(ctx, x, *, dim=None, keepdim=False):
        return ctx.xp.any(x, axis=None if dim is None else norm_dims(dim, x.ndim),
                          keepdims=keepdim)


compute_in_float32(sum, mean, prod, cumsum)  # float32 accumulation for float16 / bfloat16
