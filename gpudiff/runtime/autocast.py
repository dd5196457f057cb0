"""Autocast's state and cast policy (the public face is gpudiff.amp.autocast).

While an autocast region is active, ``state`` holds it (a plain global: ``ops.apply`` reads it
on every op and does nothing more when it is None). An op's tensor inputs are then cast at
dispatch by the policy of the op's name for the device type, PyTorch's autocast lists:

  'low'      run in the region's low dtype (float16 / bfloat16): convolutions, linear,
             matmul (mm, bmm, dot)
  'fp32'     run in float32 (float16 / bfloat16 inputs cast up): on CUDA the numerically
             sensitive ops (exp, log, pow, softmax, sum, the losses, layer_norm, ...); on
             the CPU the losses and prod (PyTorch's CPU list: softmax and sum keep bf16)
  'promote'  mixed floating inputs run in their widest dtype (cat and stack, scatter_add)
  (others)   run in their inputs' dtype

Names are primitive ops (``conv2d``, ``sum``) and, for functions composed of several ops,
the public function (``mse_loss``, ``layer_norm``), which calls ``cast_inputs`` itself.
Only floating tensors on the region's device type are cast, and float64 is never lowered
(as PyTorch). A cast is the ``to_dtype`` op (handed over by gpudiff.ops: this layer cannot
import it), so it is differentiable: the gradient of a float32 parameter used in float16
arrives in float32. With ``cache_enabled``, the cast of a leaf tensor that requires grad
(a parameter) is made once per region and reused until the parameter changes.
"""
from ..autograd.grad_mode import is_grad_enabled
from .dtypes import bfloat16, float16, float32, float64, is_floating

LOW, FP32, PROMOTE = "low", "fp32", "promote"

_LOW_COMMON = ("conv2d", "conv_transpose2d", "linear", "matmul")
_FP32_LOSSES = ("cross_entropy", "nll_loss", "mse_loss", "l1_loss", "smooth_l1_loss",
                "huber_loss", "kl_div", "binary_cross_entropy", "binary_cross_entropy_with_logits",
                "multi_margin_loss")
_PROMOTE = ("cat", "scatter_add")   # (stack is cat)

#: device type -> {op or function name: policy} (PyTorch's lists, autocast_mode.cpp)
POLICIES = {
    "cuda": {
        **{n: LOW for n in _LOW_COMMON},
        **{n: FP32 for n in _FP32_LOSSES + (
            "exp", "log", "log1p", "pow", "pow_scalar", "rpow_scalar", "rsqrt", "reciprocal",
            "softplus", "sum", "prod", "cumsum", "softmax", "log_softmax", "softmin",
            "logsumexp", "layer_norm", "normalize", "cosine_similarity")},
        **{n: PROMOTE for n in _PROMOTE},
    },
    "cpu": {
        **{n: LOW for n in _LOW_COMMON},
        **{n: FP32 for n in _FP32_LOSSES + ("prod",)},
        **{n: PROMOTE for n in _PROMOTE},
    },
}
#: the low dtypes each device type's autocast takes, the default first
DTYPES = {"cuda": (float16, bfloat16), "cpu": (bfloat16, float16)}


class Region:
    """One active autocast device type: its low dtype, policy table and cast cache."""

    __slots__ = ("device_type", "dtype", "policy", "cache")

    def __init__(self, device_type, dtype, cache_enabled):
        self.device_type = device_type
        self.dtype = dtype
        self.policy = POLICIES[device_type]
        self.cache = {} if cache_enabled else None


# ---- the state ---------------------------------------------------------------------------
state = None         # {device type: Region} while some autocast is enabled, else None
_stack = []          # the enclosing regions' saved states (a nested region restores them)
_cast_op = None      # (tensor, dtype) -> tensor: the differentiable cast, from gpudiff.ops


def set_cast(fn):
    """gpudiff.ops hands over its differentiable cast (the to_dtype op)."""
    global _cast_op
    _cast_op = fn


def check(device_type, dtype):
    """(device type, dtype) of an autocast region; an unsupported pair raises naming both."""
    if device_type not in DTYPES:
        raise RuntimeError(f"autocast: unsupported device_type {device_type!r} (gpudiff "
                           f"autocasts 'cuda' and 'cpu')")
    allowed = DTYPES[device_type]
    if dtype is None:
        return device_type, allowed[0]
    from numpy import dtype as _np_dtype
    try:
        dt = _np_dtype(dtype)
    except TypeError:
        dt = None
    if dt not in allowed:
        raise RuntimeError(f"autocast: dtype {dtype} is not supported on device_type "
                           f"{device_type!r} (supported: "
                           f"{', '.join(str(d) for d in allowed)})")
    return device_type, dt


def enter(device_type, dtype, enabled, cache_enabled):
    """Open a region (enabled or not) for ``device_type``; ``exit_()`` closes it."""
    global state
    _stack.append(state)
    regions = dict(state) if state else {}
    if enabled:
        old = regions.get(device_type)
        r = Region(device_type, dtype, cache_enabled)
        if old is not None and old.cache is not None and cache_enabled and old.dtype == dtype:
            r.cache = old.cache  # a nested region shares the outer one's casts
        regions[device_type] = r
    else:
        regions.pop(device_type, None)
    state = regions or None


def exit_():
    global state
    state = _stack.pop()


def get(device_type):
    """The active Region of ``device_type``, or None."""
    return None if state is None else state.get(device_type)


# ---- casting -----------------------------------------------------------------------------
def cast(op, tensors):
    """``tensors`` (an op's inputs, None allowed) cast by ``op``'s policy."""
    return cast_inputs(op.name, tensors)


def cast_inputs(name, tensors):
    """The tensors cast by the policy of ``name`` on their device type (tuple in, tuple out;
    non-tensors pass through)."""
    regions = state
    if regions is None:
        return tensors
    dev_type = None
    for t in tensors:
        if hasattr(t, "_requires_grad"):  # (a Tensor: this layer cannot import the class)
            dev_type = t.device.type
            break
    region = regions.get(dev_type)
    if region is None:
        return tensors
    policy = region.policy.get(name)
    if policy is None:
        return tensors
    if policy == LOW:
        return tuple(_cast(t, region.dtype, region, lower=True) for t in tensors)
    if policy == FP32:
        return tuple(_cast(t, float32, region) for t in tensors)
    widest = None  # PROMOTE: the widest floating dtype among the inputs
    for t in tensors:
        if _castable(t, region):
            d = t.dtype
            widest = d if widest is None or _rank(d) > _rank(widest) else widest
    if widest is None:
        return tensors
    return tuple(_cast(t, widest, region) for t in tensors)


def _rank(d):
    return {float16: 1, bfloat16: 1, float32: 2, float64: 3}.get(d, 0)


def _castable(t, region):
    return hasattr(t, "_requires_grad") and t.device.type == region.device_type \
        and is_floating(t.dtype)


def _cast(t, dtype, region, lower=False):
    if not _castable(t, region) or t.dtype == dtype or (lower and t.dtype == float64):
        return t
    cache = region.cache
    if cache is not None and t._requires_grad and t.grad_fn is None and t._base is None:
        grad = is_grad_enabled()
        key = (id(t), dtype, grad)
        hit = cache.get(key)
        if hit is not None and hit[0] is t and hit[1] == t._version[0]:
            fn = hit[2].grad_fn   # (a backward since may have released its node: cast anew,
            if fn is None or not fn.freed:  # as PyTorch's cast node, which saves nothing)
                return hit[2]
        r = _cast_op(t, dtype)
        cache[key] = (t, t._version[0], r)
        return r
    return _cast_op(t, dtype)
