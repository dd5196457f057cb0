"""Matrix products (BLAS through xp.matmul: OpenBLAS on the CPU, cuBLAS on a GPU)."""
import numpy as np

from . import Op
from ..runtime.dtypes import LOW_FLOATS
from .lowp import compute_in_float32, sum32
from .elementwise import sum_to


def _mm(ctx, a, b):
    """a @ b on raw arrays: the device's GEMM for 2-D operands, xp.matmul otherwise."""
    k = ctx.kernel("matmul")
    y = k(a, b) if k else None
    if y is None:
        if a.dtype in LOW_FLOATS or b.dtype in LOW_FLOATS:  # (a kernel declined): float32
            low = a.dtype if a.dtype in LOW_FLOATS else b.dtype
            return ctx.xp.matmul(a.astype(np.float32), b.astype(np.float32)).astype(low)
        return ctx.xp.matmul(a, b)
    return y


def check_matmul(a_shape, b_shape, a_dtype, b_dtype, name="matmul"):
    if len(a_shape) == 0 or len(b_shape) == 0:
        raise RuntimeError(f"{name}: both arguments need at least 1 dimension, got shapes "
                           f"{tuple(a_shape)} and {tuple(b_shape)}")
    k1 = a_shape[-1]
    k2 = b_shape[-2] if len(b_shape) > 1 else b_shape[0]
    if k1 != k2:
        raise RuntimeError(f"{name}: shapes {tuple(a_shape)} and {tuple(b_shape)} do not align "
                           f"({k1} != {k2})")
    if a_dtype != b_dtype:
        raise RuntimeError(f"{name}: expected both arguments to have the same dtype, got "
                           f"{a_dtype} and {b_dtype}")


class matmul(Op):
    """a @ b with NumPy/PyTorch semantics (1-D promotion, batch broadcasting)."""

    def forward(ctx, a, b):
        check_matmul(a.shape, b.shape, a.dtype, b.dtype)
        ctx.save_for_backward(a, b)
        return _mm(ctx, a, b)  # the device's GEMM for 2-D operands (one thread pool)

    def backward(ctx, gy):
        a, b = ctx.saved_tensors
        na, nb = ctx.needs_input_grad
        # promote 1-D operands to matrices so one formula covers every case
        a2 = a.unsqueeze(0) if a.ndim == 1 else a          # (..., n, k)
        b2 = b.unsqueeze(-1) if b.ndim == 1 else b         # (..., k, m)
        g = gy
        if a.ndim == 1:
            g = g.unsqueeze(-2)
        if b.ndim == 1:
            g = g.unsqueeze(-1)                            # (..., n, m)
        ga = gb = None
        if na:
            ga = sum_to(g @ b2.transpose(-1, -2), a2.shape) if a2.ndim > 1 else None
            ga = ga.reshape(a.shape)
        if nb:
            gb = sum_to(a2.transpose(-1, -2) @ g, b2.shape).reshape(b.shape)
        return ga, gb

    def backward_arrays(ctx, gy):
        a, b = ctx.saved_arrays
        na, nb = ctx.needs_input_grad
        xp = ctx.xp
        a2 = a[None] if a.ndim == 1 else a                  # (..., n, k)
        b2 = b[:, None] if b.ndim == 1 else b               # (..., k, m)
        batch = np.broadcast_shapes(a2.shape[:-2], b2.shape[:-2])
        g = gy.reshape(batch + (a2.shape[-2], b2.shape[-1]))  # (..., n, m)
        ga = sum_to(_mm(ctx, g, xp.swapaxes(b2, -1, -2)), a2.shape).reshape(a.shape) \
            if na else None
        gb = sum_to(_mm(ctx, xp.swapaxes(a2, -1, -2), g), b2.shape).reshape(b.shape) \
            if nb else None
        return ga, gb


class linear(Op):
    """y = x w^T + b: x (..., in), w (out, in), b (out,) | None; one GEMM over the rows."""

    def forward(ctx, x, w, b):
        ctx.save_for_backward(x, w)
        y = _mm(ctx, x.reshape(-1, x.shape[-1]), w.T)     # (rows, out)
        if b is not None:
            y += b
        return y.reshape(x.shape[:-1] + w.shape[:1])

    def backward(ctx, gy):
        x, w = ctx.saved_tensors
        nx, nw, nb = ctx.needs_input_grad
        g2 = gy.reshape(-1, gy.shape[-1])                 # (rows, out)
        gx = (g2 @ w).reshape(x.shape) if nx else None
        gw = g2.t() @ x.reshape(-1, x.shape[-1]) if nw else None
        return gx, gw, g2.sum(0) if nb else None

    def backward_arrays(ctx, gy):
        x, w = ctx.saved_arrays
        nx, nw, nb = ctx.needs_input_grad
        g2 = gy.reshape(-1, gy.shape[-1])
        gx = _mm(ctx, g2, w).reshape(x.shape) if nx else None
        gw = _mm(ctx, g2.T, x.reshape(-1, x.shape[-1])) if nw else None
        return gx, gw, sum32(g2, 0) if nb else None


# float16 / bfloat16: in float32 on the CPU; on CUDA the GEMM takes them (tensor cores)
compute_in_float32(matmul, linear, native_cuda=True)
