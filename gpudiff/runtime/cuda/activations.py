"""The elementwise activation kernels of csrc/cuda/activations.cu (relu, leaky_relu, sigmoid,
tanh; forward and backward) for the 'cuda' kernel table (contract: gpudiff/runtime/kernels.py).

Elementwise kernels see flat contiguous arrays; a wrapper returns None for a dtype or layout it
does not handle, and the op then runs its xp reference.
"""
import numpy as np

from ..kernels import register_kernel
from .launch import array_module, ctype, elementwise_config, launch


def _unary(kernel, x, *scalars):
    t = ctype(x)
    if t is None:
        return None
    xp = array_module(x)
    xc = xp.ascontiguousarray(x)
    y = xp.empty(x.shape, x.dtype)
    if x.size:
        grid, block = elementwise_config(x.size, x.itemsize, x)
        launch("activations.cu", f"{kernel}<{t}>", grid, block,
               (xc, y, np.int64(x.size), *(x.dtype.type(s) for s in scalars)))
    return y


def _binary(kernel, a, gy, *scalars):
    t = ctype(a, gy)
    if t is None or a.shape != gy.shape:
        return None
    xp = array_module(a)
    ac, gc = xp.ascontiguousarray(a), xp.ascontiguousarray(gy)
    gx = xp.empty(a.shape, a.dtype)
    if a.size:
        grid, block = elementwise_config(a.size, a.itemsize, a)
        launch("activations.cu", f"{kernel}<{t}>", grid, block,
               (ac, gc, gx, np.int64(a.size), *(a.dtype.type(s) for s in scalars)))
    return gx


@register_kernel("cuda", "relu")
def relu(x):
    return _unary("relu_fwd", x)


@register_kernel("cuda", "relu_backward")
def relu_backward(y, gy):
    return _binary("relu_bwd", y, gy)


@register_kernel("cuda", "leaky_relu")
def leaky_relu(x, negative_slope):
    return _unary("leaky_relu_fwd", x, negative_slope)


@register_kernel("cuda", "leaky_relu_backward")
def leaky_relu_backward(x, gy, negative_slope):
    return _binary("leaky_relu_bwd", x, gy, negative_slope)


@register_kernel("cuda", "sigmoid")
def sigmoid(x):
    return _unary("sigmoid_fwd", x)


@register_kernel("cuda", "sigmoid_backward")
def sigmoid_backward(y, gy):
    return _binary("sigmoid_bwd", y, gy)


@register_kernel("cuda", "tanh")
def tanh(x):
    return _unary("tanh_fwd", x)


@register_kernel("cuda", "tanh_backward")
def tanh_backward(y, gy):
    return _binary("tanh_bwd", y, gy)
