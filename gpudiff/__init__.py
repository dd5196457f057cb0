"""gpudiff: a GPU-accelerated, tape-based autodiff engine for training CNNs.

Speaks PyTorch's dialect: ``import gpudiff as torch`` ports a typical training script.
"""
import numpy as _np

from . import runtime
from .runtime import Device, Generator, device, get_default_device, manual_seed, set_default_device
from .tensor import Tensor, get_default_dtype, set_default_dtype
from .creation import (tensor, as_tensor, from_numpy, from_dlpack, zeros, ones, empty, full,  # noqa
                       zeros_like, ones_like, empty_like, full_like, arange, linspace, eye,
                       rand, randn, randint, randperm, rand_like, randn_like, randint_like)
from .functions import *  # noqa: F401,F403
from .functions import METHODS as _METHODS
from . import functions as _functions
from . import autograd
from .autograd import no_grad, enable_grad, set_grad_enabled, inference_mode, is_grad_enabled
from . import cuda  # noqa: E402
from . import backends  # noqa: E402
from . import nn, optim, utils, datasets, transforms  # noqa: E402
from .serialization import save, load  # noqa: E402
from . import profiler  # noqa: E402
from .graphs import Graph, graph, make_graphed_callables  # noqa: E402
from . import amp  # noqa: E402
from . import cpu  # noqa: E402
from .amp import autocast, get_autocast_dtype, is_autocast_enabled  # noqa: E402,F401

float32 = _np.dtype("float32")
float64 = _np.dtype("float64")
float16 = _np.dtype("float16")
bfloat16 = runtime.bfloat16  # ml_dtypes.bfloat16 (NumPy kind "V": ask is_floating_point())
int64 = _np.dtype("int64")
int32 = _np.dtype("int32")
int16 = _np.dtype("int16")
int8 = _np.dtype("int8")
uint8 = _np.dtype("uint8")
bool = _np.dtype("bool")  # noqa: A001 (PyTorch's name)
float = float32  # noqa: A001
double = float64
half = float16
long = int64
int = int32  # noqa: A001
dtype = _np.dtype

for _name in _METHODS + ["cat", "concat", "concatenate", "stack", "var_mean", "isnan", "isinf",
                         "isfinite", "nonzero", "ger"]:
    globals()[_name] = getattr(_functions, _name)


def is_tensor(obj):
    return isinstance(obj, Tensor)


def numel(t):
    return t.numel()


def detach(t):
    return t.detach()


def seed():
    """Seed the generator with a non-deterministic number and return it (as torch.seed)."""
    s = _np.random.SeedSequence().entropy % 2**63   # (the OS's entropy)
    runtime.manual_seed(s)
    return s


def initial_seed():
    return runtime.default_generator.initial_seed()


def get_rng_state():
    """The default generator's state (a plain dict: JSON-safe for checkpoints)."""
    return runtime.default_generator.get_state()


def set_rng_state(state):
    runtime.default_generator.set_state(state)


__version__ = "0.1.0"
