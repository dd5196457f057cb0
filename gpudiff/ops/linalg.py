"""Matrix products (BLAS through xp.matmul: OpenBLAS on the CPU, cuBLAS on a GPU)."""
from . import Op
from .elementwise import sum_to


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
        k = ctx.kernel("matmul")  # the device's GEMM for 2-D operands (one thread pool)
        y = k(a, b) if k else None
        return ctx.xp.matmul(a, b) if y is None else y

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
