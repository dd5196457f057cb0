"""The fast-kernel table: device type -> kernel name -> function on raw arrays.

Ops look kernels up with ``kernel(device, name)`` and fall back to their xp-generic
reference code when it returns None (no compiled kernel, or kernels switched off with
``use_kernels(False)``, which the tests use to compare kernel against reference).

Kernels take and return raw arrays of the device (numpy on 'cpu' and on the emulated
'cuda' device, cupy on a real GPU). Floating inputs are float32 or float64; a kernel that
cannot handle a dtype or layout returns None and the op falls back to its reference.

The contract (same names and signatures on every device that has them):

  softmax(x, dim) -> y                       log_softmax(x, dim) -> y
  softmax_backward(y, gy, dim) -> gx         # gx = y * (gy - sum(gy * y, dim))
  log_softmax_backward(y, gy, dim) -> gx     # gx = gy - exp(y) * sum(gy, dim)
  relu(x) -> y          relu_backward(y, gy) -> gx           # gy * (y > 0)
  leaky_relu(x, negative_slope) -> y
  leaky_relu_backward(x, gy, negative_slope) -> gx
  sigmoid(x) -> y       sigmoid_backward(y, gy) -> gx        # fused gy * y * (1 - y)
  tanh(x) -> y          tanh_backward(y, gy) -> gx           # gy * (1 - y * y)
  cross_entropy(logits (N, C), target (N,) int64, weight (C,) | None, ignore_index,
                label_smoothing) -> (losses (N,), dlogits (N, C))
      one pass per row: losses[i] is row i's weighted (smoothed) loss, 0 where ignored;
      dlogits[i] = d losses[i] / d logits[i] (0 rows where ignored). Reduction is done by
      the op in Python: mean divides by sum(weight[target[i]]) over rows not ignored.
  im2col(x (N, C, H, W), kh, kw, sh, sw, ph, pw, dh, dw) -> cols (N, C*kh*kw, OH*OW)
  col2im(cols (N, C*kh*kw, OH*OW), C, H, W, kh, kw, sh, sw, ph, pw, dh, dw) -> x (N, C, H, W)
  max_pool2d(x, kh, kw, sh, sw, ph, pw, dh, dw, ceil_mode) -> (y, indices)
      indices: int64, flat index into H*W of each output's max (ties: first), as PyTorch
  max_pool2d_backward(gy, indices, H, W) -> gx
  avg_pool2d(x, kh, kw, sh, sw, ph, pw, ceil_mode, count_include_pad, divisor_override) -> y
  avg_pool2d_backward(gy, H, W, kh, kw, sh, sw, ph, pw, ceil_mode, count_include_pad,
                      divisor_override) -> gx

  matmul(a (M, K), b (K, N)) -> c (M, N)       2-D only (None otherwise; xp.matmul then)

Whole-op kernels (a device that has them skips the im2col/xp reference path); stride,
padding, dilation are (h, w) pairs:
  conv2d(x (N, C, H, W), w (K, C/groups, kh, kw), b (K,) | None, stride, padding, dilation,
         groups) -> y (N, K, OH, OW)
  conv2d_backward_input(gy, w, x_shape, stride, padding, dilation, groups) -> gx
  conv2d_backward_weight(gy, x, w_shape, stride, padding, dilation, groups) -> gw
  adaptive_avg_pool2d(x, oh, ow) -> y          adaptive_avg_pool2d_backward(gy, H, W) -> gx
  adaptive_max_pool2d(x, oh, ow) -> (y, indices)   (backward: max_pool2d_backward)
  max_pool2d_with_indices_backward(gy, indices, H, W, kh, kw, sh, sw, ph, pw, dh, dw) -> gx
  adaptive_max_pool2d_backward(gy, indices, H, W) -> gx
      the max-pool backward with its window known: a device can gather (each input visits
      only the outputs that can cover it) instead of scattering; ops try these first
  batch_norm(x, weight | None, bias | None, running_mean | None, running_var | None,
             training, momentum, eps) -> (y, save_mean (C,), save_invstd (C,))
      training: batch statistics, and running stats updated in place (unbiased var);
      eval: running stats used. x is (N, C) or (N, C, H, W).
  batch_norm_backward(gy, x, weight | None, save_mean, save_invstd) -> (gx, gw, gb)
  sgd_step(params, grads, momentum_buffers, lr, momentum, dampening, weight_decay, nesterov,
           maximize) -> None      (multi-tensor, lists of same-dtype arrays, in place)
  adam_step(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs | None, steps, lr, beta1,
            beta2, eps, weight_decay, amsgrad, decoupled_weight_decay, maximize) -> None

  amp_unscale(grads, inv_scale) -> bool (any inf/NaN) | NotImplemented
      GradScaler.unscale_: every gradient array (one dtype, in place) times inv_scale, and
      whether any value was inf or NaN before scaling (multi-tensor: one launch on CUDA)

  dropout(x, p, seed, group) -> y
      y[i] = x[i] * keep(i // group) / (1 - p)  (group 1: F.dropout; H*W: F.dropout2d), with
      the counter-based keep(j) = (h(j) >> 8) >= ceil(p * 2^24) (uint32 arithmetic):
        h(j) = mix(mix(lo32(j) ^ k0) + k1 + hi32(j)),
        k0 = mix(lo32(seed) ^ 0x9e3779b9), k1 = mix(hi32(seed) ^ 0x85ebca6b),
        mix(v): v ^= v >> 16; v *= 0x21f0aaad; v ^= v >> 15; v *= 0x735a2d97; v ^= v >> 15
      Every device computes the same mask from the same seed (gpudiff/ops/norm.py holds the
      xp reference); the backward is the same call on gy, so nothing is stored.

Further kernels add their names here when they land.
"""
import contextlib
from time import perf_counter_ns

from . import events

KERNELS: dict[str, dict] = {"cpu": {}, "cuda": {}}
#: kernels that work in place and return None when they ran (NotImplemented: declined);
#: the others return their outputs, None when they declined
IN_PLACE = frozenset({"sgd_step", "adam_step"})
_enabled = [True]


def register_kernel(device_type, name):
    """Decorator: make ``fn`` the fast kernel ``name`` on ``device_type``."""
    def deco(fn):
        KERNELS[device_type][name] = fn
        return fn
    return deco


def kernel(device, name):
    """The fast kernel ``name`` for ``device`` (a Device), or None to use the reference."""
    if not _enabled[0]:
        return None
    fn = KERNELS[device.type].get(name)
    if fn is not None and events.listener is not None:
        return _reporting(fn, name, device)
    return fn


def _reporting(fn, name, device):
    """``fn`` telling the profiler it ran (events.listener.kernel)."""
    def run(*args, **kwargs):
        t0 = perf_counter_ns()
        out = fn(*args, **kwargs)
        if events.listener is not None:
            declined = out is NotImplemented or (out is None and name not in IN_PLACE)
            events.listener.kernel(name, device, t0, perf_counter_ns(), declined)
        return out
    return run


@contextlib.contextmanager
def use_kernels(flag=True):
    """Switch the fast kernels on or off (tests compare kernel vs reference with this)."""
    old, _enabled[0] = _enabled[0], bool(flag)
    try:
        yield
    finally:
        _enabled[0] = old


def active_kernels():
    """{device type: sorted kernel names} of the kernels registered now."""
    return {d: sorted(k) for d, k in KERNELS.items()}
