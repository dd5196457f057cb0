"""Op database entries for the CNN ops (gpudiff/ops/conv.py, pool.py, norm.py).
Format: tests/opdb/__init__.py.

Dropout is random: its entries reseed gpudiff's generator inside the call, so every call
draws the same seed (the function is deterministic for gradcheck), and the PyTorch side
multiplies by the mask that our counter-based hash gives for that seed.
"""
import numpy as np

from . import LOW as _LOW
from . import Const, OpInfo, S, float32

CONV_KERNELS = ("conv2d", "conv2d_backward_input", "conv2d_backward_weight", "im2col",
                "col2im")
CONV_OPS = ("conv2d", "conv2d_backward_input", "conv2d_backward_weight")


def F(m):
    return m.nn.functional


def conv_samples(make):
    return [
        S(make(2, 3, 6, 5), make(4, 3, 3, 3), make(4)),
        S(make(2, 3, 7, 6), make(4, 3, 3, 2), make(4), stride=2, padding=1),
        S(make(1, 2, 8, 7), make(3, 2, 2, 3), stride=(2, 1), padding=(1, 0), dilation=(1, 2)),
        S(make(1, 4, 5, 5), make(6, 2, 3, 3), None, padding=(2, 1), groups=2),
        S(make(2, 3, 5, 6), make(3, 1, 3, 3), make(3), padding="same", groups=3),  # depthwise
        S(make(1, 2, 5, 6), make(3, 2, 2, 4), padding="same"),  # even kernel: pad right more
        S(make(1, 2, 6, 6), make(2, 2, 3, 3), make(2), padding="valid", dilation=2),
        S(make(3, 6, 5), make(2, 3, 3, 3)),                                  # unbatched
        S(make(2, 4, 3, 3), make(5, 4, 1, 1), make(5)),                      # 1x1: a GEMM
        S(make(2, 4, 5, 4), make(3, 4, 1, 1), stride=2),                     # 1x1 strided
        S(make(2, 3, 5, 5, noncontig=True), make(2, 3, 3, 3, noncontig=True), padding=1),
        S(make(1, 1, 9, 8), make(1, 1, 4, 3), stride=3, padding=(2, 1)),    # unused rows
    ]


def conv_transpose_samples(make):
    return [
        S(make(2, 3, 4, 4), make(3, 2, 3, 3), make(2)),
        S(make(2, 3, 4, 3), make(3, 2, 3, 3), make(2), stride=2, padding=1, output_padding=1),
        S(make(1, 4, 3, 4), make(4, 1, 2, 3), None, stride=(2, 3), padding=(0, 1),
          output_padding=(1, 2), groups=2),
        S(make(1, 2, 3, 3), make(2, 3, 3, 2), stride=2, dilation=2, output_padding=1),
        S(make(2, 3, 3), make(2, 2, 3, 3)),                                  # unbatched
        # output_padding >= stride (below the dilation): zeros beyond the reached positions
        S(make(1, 2, 3, 4), make(2, 2, 2, 3), make(2), stride=1, dilation=2, output_padding=1),
        S(make(1, 2, 3, 3), make(2, 1, 2, 2), stride=(2, 1), padding=1, dilation=3,
          output_padding=(2, 1)),
    ]


def max_pool_samples(make):
    d = {"distinct": True}  # no ties: finite differences stay on one side of each max
    return [
        S(make(2, 3, 6, 6, **d), 2),
        S(make(2, 2, 7, 9, **d), 3, stride=2, padding=1),
        S(make(2, 2, 7, 9, **d), 3, stride=2, padding=1, ceil_mode=True),
        S(make(1, 2, 9, 8, **d), (3, 2), stride=(2, 1), padding=(1, 1), dilation=(2, 1)),
        S(make(1, 1, 5, 5, **d), 2, stride=3, padding=1, ceil_mode=True),
        S(make(3, 5, 5, **d), 3, stride=1),                                  # unbatched
        S(make(1, 2, 6, 6, noncontig=True, **d), 2),
    ]


def avg_pool_samples(make):
    return [
        S(make(2, 3, 6, 6), 2),
        S(make(2, 2, 7, 9), 3, stride=2, padding=1),
        S(make(2, 2, 7, 9), 3, stride=2, padding=1, count_include_pad=False),
        S(make(2, 2, 7, 9), 3, stride=2, padding=1, ceil_mode=True),
        S(make(2, 2, 7, 9), 3, stride=2, padding=1, ceil_mode=True, count_include_pad=False),
        S(make(1, 2, 7, 6), (3, 2), stride=(2, 1), padding=(1, 1), divisor_override=4),
        S(make(1, 1, 5, 5), 2, stride=3, padding=1, ceil_mode=True),
        S(make(3, 5, 5), 3, stride=1),                                       # unbatched
    ]


def adaptive_samples(make, **kw):
    return [
        S(make(2, 3, 7, 9, **kw), (3, 4)),     # uneven, overlapping bins
        S(make(2, 3, 6, 6, **kw), 1),          # global
        S(make(1, 2, 5, 7, **kw), (5, None)),  # None keeps that size
        S(make(1, 2, 4, 5, **kw), (6, 7)),     # larger than the input
        S(make(3, 5, 5, **kw), 2),             # unbatched
    ]


def batch_norm_samples(make):
    C = 3
    rm = Const(make(C))
    rv = Const(make(C, low=0.5, high=2.0))
    return [
        # training with batch statistics (running buffers None: the inputs stay unchanged)
        S(make(4, C, 3, 3), None, None, make(C), make(C), training=True),
        S(make(5, C), None, None, make(C), make(C), training=True, eps=1e-3),
        S(make(4, C, 5), None, None, training=True),                          # no affine
        S(make(2, C, 2, 3, noncontig=True), None, None, make(C), None, training=True),
        # evaluation with running statistics
        S(make(4, C, 3, 3), rm, rv, make(C), make(C), training=False),
        S(make(6, C), rm, rv, None, make(C), training=False),
    ]


def interpolate_samples(make):
    return [
        S(make(2, 3, 4, 5), size=(7, 3)),
        S(make(2, 3, 4, 5), scale_factor=2),
        S(make(1, 2, 5, 7), scale_factor=(1.5, 0.5)),
        S(make(1, 2, 5, 7), scale_factor=1.7, recompute_scale_factor=True),
        S(make(2, 3, 9), size=4),                                             # 1-D
        S(make(1, 2, 5, 7), size=(3, 3), mode="nearest-exact"),
        S(make(1, 2, 3, 4, 5), scale_factor=(2, 1.3, 0.6)),                  # 3-D
    ]


def _dropout_gpudiff(m, x, p, seed, channels):
    m.manual_seed(seed)
    return (F(m).dropout2d if channels else F(m).dropout)(x, p)


def _dropout_torch(torch, x, p, seed, channels):
    """x * mask / (1 - p) with the mask gpudiff draws for this seed (see ops/norm.py)."""
    import gpudiff
    from gpudiff.ops.dropout import dropout_keep_ref
    gpudiff.manual_seed(seed)
    s = int(gpudiff.runtime.rng().integers(0, 2**63))
    group = int(np.prod(x.shape[2:])) if channels else 1
    keep = dropout_keep_ref(np, x.numel() // group, p, s)
    mask = np.repeat(keep, group).reshape(tuple(x.shape))
    return x * torch.from_numpy(mask).to(x.dtype) / (1 - p)


def dropout_samples(make):
    return [S(make(6, 5), 0.3, 1, False), S(make(2, 3, 4), 0.5, 2, False),
            S(make(4, 5, 3, 2), 0.25, 3, True), S(make(2, 6, 5), 0.5, 4, True)]


FL = (np.dtype('float64'), np.dtype('float32')) + _LOW   # float16 / bfloat16 too

OPS = [
    OpInfo("F.conv2d", dtypes=FL, op=lambda m, x, w, *b, **kw: F(m).conv2d(x, w, *b, **kw),
           covers=CONV_OPS, kernels=CONV_KERNELS, gradgradcheck=True,
           tol={float32: (1e-4, 1e-4)}, samples=conv_samples),
    OpInfo("F.conv_transpose2d",
           op=lambda m, x, w, *b, **kw: F(m).conv_transpose2d(x, w, *b, **kw),
           covers=CONV_OPS, kernels=CONV_KERNELS, gradgradcheck=True,
           tol={float32: (1e-4, 1e-4)}, samples=conv_transpose_samples),
    OpInfo("F.max_pool2d", dtypes=FL, op=lambda m, x, k, **kw: F(m).max_pool2d(x, k, **kw,
                                                                     return_indices=True),
           covers=("max_pool2d", "max_pool2d_backward"), gradgradcheck=True,
           kernels=("max_pool2d", "max_pool2d_backward"), samples=max_pool_samples),
    OpInfo("F.max_pool2d_values", op=lambda m, x, k, **kw: F(m).max_pool2d(x, k, **kw),
           covers=("max_pool2d",), kernels=("max_pool2d", "max_pool2d_backward"),
           samples=lambda make: [S(make(2, 2, 4, 4, distinct=True), 2, stride=1)]),
    OpInfo("F.avg_pool2d", dtypes=FL, op=lambda m, x, k, **kw: F(m).avg_pool2d(x, k, **kw),
           covers=("avg_pool2d", "avg_pool2d_backward"), gradgradcheck=True,
           kernels=("avg_pool2d", "avg_pool2d_backward"), samples=avg_pool_samples),
    OpInfo("F.adaptive_avg_pool2d", dtypes=FL, op=lambda m, x, s: F(m).adaptive_avg_pool2d(x, s),
           covers=("adaptive_avg_pool2d", "adaptive_avg_pool2d_backward"), gradgradcheck=True,
           kernels=("adaptive_avg_pool2d", "adaptive_avg_pool2d_backward"),
           samples=adaptive_samples),
    OpInfo("F.adaptive_max_pool2d",
           op=lambda m, x, s: F(m).adaptive_max_pool2d(x, s, return_indices=True),
           covers=("adaptive_max_pool2d", "max_pool2d_backward"), gradgradcheck=True,
           kernels=("adaptive_max_pool2d", "max_pool2d_backward"),
           samples=lambda make: adaptive_samples(make, distinct=True)),
    OpInfo("F.batch_norm", dtypes=FL, op=lambda m, x, rm, rv, *wb, **kw: F(m).batch_norm(x, rm, rv, *wb,
                                                                               **kw),
           covers=("batch_norm",), gradgradcheck=True,
           kernels=("batch_norm", "batch_norm_backward"),
           tol={float32: (2e-4, 1e-4)}, samples=batch_norm_samples),
    OpInfo("F.dropout", op=lambda m, x, p, seed, ch: _dropout_gpudiff(m, x, p, seed, ch),
           ref=lambda m, x, p, seed, ch: _dropout_torch(m, x, p, seed, ch),
           covers=("dropout",), kernels=("dropout",), gradgradcheck=True,
           samples=dropout_samples),
    OpInfo("F.dropout_off", op=lambda m, x, **kw: F(m).dropout(x, **kw) * 2,
           covers=(), samples=lambda make: [S(make(3, 4), p=0.0), S(make(3, 4), training=False),
                                            S(make(3, 4), p=0.7, training=False)]),
    OpInfo("F.interpolate", dtypes=FL, op=lambda m, x, **kw: F(m).interpolate(x, **kw),
           covers=("interpolate", "interpolate_backward"), gradgradcheck=True,
           samples=interpolate_samples),
]
