"""Floating dtypes, the low-precision ones included.

``bfloat16`` is ml_dtypes' NumPy dtype (CuPy accepts it too). Its NumPy kind is 'V' (a
user-defined type), not 'f': code asking "is this a floating dtype?" asks ``is_floating``,
never ``dtype.kind == 'f'``.
"""
import ml_dtypes
import numpy as np

float16 = np.dtype("float16")
bfloat16 = np.dtype(ml_dtypes.bfloat16)
float32 = np.dtype("float32")
float64 = np.dtype("float64")

LOW_FLOATS = frozenset((float16, bfloat16))   # computed in float32, rounded back (as torch CPU)
FLOATS = frozenset((float16, bfloat16, float32, float64))


def is_floating(dtype):
    """Whether ``dtype`` is a floating-point dtype (float16/32/64 and bfloat16)."""
    return dtype.kind == "f" or dtype == bfloat16


def is_low(dtype):
    """float16 or bfloat16: 2-byte floats that ops compute in float32."""
    return dtype in LOW_FLOATS
