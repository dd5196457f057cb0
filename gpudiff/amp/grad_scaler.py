"""``gpudiff.amp.GradScaler``: dynamic loss scaling for float16 training (PyTorch's rules).

Multiply the loss by ``scale`` before backward so that small float16 gradients do not flush
to zero; before the optimizer step divide the gradients by it again (``unscale_``) and look
for inf/NaN. A step whose gradients are not all finite is skipped and the scale backs off
(``scale *= backoff_factor``); after ``growth_interval`` finite steps in a row it grows
(``scale *= growth_factor``). The arithmetic is PyTorch's, in float32: the same gradients
give the same scale sequence and the same skipped steps.

On CUDA the unscale and the inf/NaN check of all gradients of one dtype are one fused
multi-tensor kernel launch (``amp_unscale``, csrc/cuda/optim.cu); on the CPU NumPy does it.
"""
import numpy as np

from .. import runtime
from ..autograd.grad_mode import no_grad
from ..tensor import Tensor

_READY, _UNSCALED, _STEPPED = 0, 1, 2


def unscale_grads(grads, inv_scale, device):
    """Multiply the arrays ``grads`` (one device) by ``inv_scale`` in place; return whether
    any value was inf or NaN (before scaling). On CUDA: one kernel launch per dtype group."""
    found = False
    groups = {}
    for g in grads:
        groups.setdefault(g.dtype, []).append(g)
    for dt, arrays in groups.items():
        k = runtime.kernel(device, "amp_unscale")
        r = k(arrays, float(inv_scale)) if k is not None else NotImplemented
        if r is NotImplemented or r is None:
            r = _unscale_reference(device.xp, arrays, inv_scale)
        found = found or bool(r)
    return found


def _unscale_reference(xp, arrays, inv_scale):
    found = False
    for a in arrays:
        if not found and not bool(xp.isfinite(a).all()):
            found = True
        if inv_scale != 1.0:
            xp.multiply(a, a.dtype.type(inv_scale), out=a)
    return found


class GradScaler:
    """Loss scaling for mixed-precision training (``torch.amp.GradScaler``).

    >>> scaler = gpudiff.amp.GradScaler("cuda")
    >>> with gpudiff.autocast("cuda"):
    ...     loss = F.cross_entropy(model(x), y)
    >>> scaler.scale(loss).backward()
    >>> scaler.unscale_(opt)                      # optional: e.g. before clip_grad_norm_
    >>> scaler.step(opt)                          # skipped if a gradient is inf/NaN
    >>> scaler.update()
    """

    def __init__(self, device="cuda", init_scale=2.0 ** 16, growth_factor=2.0,
                 backoff_factor=0.5, growth_interval=2000, enabled=True):
        if not isinstance(device, str):
            device = getattr(device, "type", str(device))
        self._device = device.split(":")[0]
        if self._device not in ("cuda", "cpu"):
            raise RuntimeError(f"GradScaler: unsupported device {device!r} (expected 'cuda' "
                               f"or 'cpu')")
        self._enabled = bool(enabled)
        if not growth_factor > 1.0:
            raise ValueError(f"GradScaler: growth_factor should be > 1, got {growth_factor}")
        if not backoff_factor < 1.0:
            raise ValueError(f"GradScaler: backoff_factor should be < 1, got {backoff_factor}")
        if int(growth_interval) != growth_interval or growth_interval <= 0:
            raise ValueError(f"GradScaler: growth_interval should be a positive integer, got "
                             f"{growth_interval}")
        self._init_scale = float(init_scale)
        self._scale = np.float32(init_scale)   # float32, as PyTorch's scale tensor
        self._growth_factor = float(growth_factor)
        self._backoff_factor = float(backoff_factor)
        self._growth_interval = int(growth_interval)
        self._growth_tracker = 0
        self._per_optimizer = {}   # id(optimizer) -> {"stage", "found_inf"}
        self._scale_tensors = {}   # device -> (scale value, 0-d float32 tensor)

    # ---- scaling ------------------------------------------------------------------------
    def scale(self, outputs):
        """``outputs`` (a tensor, or nested lists / tuples of them) times the scale."""
        if not self._enabled:
            return outputs
        if isinstance(outputs, Tensor):
            return outputs * self._scale_tensor(outputs.device)
        if isinstance(outputs, (list, tuple)):
            return type(outputs)(self.scale(o) for o in outputs)
        if hasattr(outputs, "__iter__"):
            return map(self.scale, outputs)
        raise ValueError("GradScaler.scale: outputs must be a Tensor or an iterable of Tensors")

    def _scale_tensor(self, device):
        got = self._scale_tensors.get(device)
        if got is None or got[0] != self._scale:
            t = Tensor.from_array(runtime.to_device(np.asarray(self._scale, np.float32),
                                                    device), device)
            got = self._scale_tensors[device] = (self._scale, t)
        return got[1]

    def _state(self, optimizer):
        return self._per_optimizer.setdefault(id(optimizer), {"stage": _READY,
                                                              "found_inf": None})

    def unscale_(self, optimizer):
        """Divide ``optimizer``'s gradients by the scale in place (once per step) and note
        whether any is inf or NaN."""
        if not self._enabled:
            return
        st = self._state(optimizer)
        if st["stage"] == _UNSCALED:
            raise RuntimeError("unscale_() has already been called on this optimizer since "
                               "the last update().")
        if st["stage"] == _STEPPED:
            raise RuntimeError("unscale_() is being called after step().")
        # as PyTorch: the reciprocal in double, rounded to float32
        inv = np.float32(1.0 / np.float64(self._scale))
        by_device = {}
        for group in optimizer.param_groups:
            for p in group["params"]:
                g = p.grad
                if g is None:
                    continue
                if g.dtype == np.float16:
                    raise ValueError("Attempting to unscale FP16 gradients.")
                by_device.setdefault(g.device, []).append(g)
        found = False
        with no_grad():
            for dev, grads in by_device.items():
                if unscale_grads([g.array for g in grads], inv, dev):
                    found = True
                for g in grads:
                    g.bump_version()
        st["found_inf"] = found
        st["stage"] = _UNSCALED

    def step(self, optimizer, *args, **kwargs):
        """``optimizer.step()`` unless a gradient is inf/NaN (unscaling first if
        ``unscale_`` was not called). Returns what step returned, or None when skipped."""
        if not self._enabled:
            return optimizer.step(*args, **kwargs)
        if "closure" in kwargs:
            raise RuntimeError("Closure use is not currently supported if GradScaler is "
                               "enabled.")
        st = self._state(optimizer)
        if st["stage"] == _STEPPED:
            raise RuntimeError("step() has already been called since the last update().")
        if st["stage"] == _READY:
            self.unscale_(optimizer)
        ret = None
        if not st["found_inf"]:
            ret = optimizer.step(*args, **kwargs)
        st["stage"] = _STEPPED
        return ret

    def update(self, new_scale=None):
        """Adjust the scale for the next iteration (back off after an inf/NaN, grow after
        ``growth_interval`` clean steps), or set it to ``new_scale``."""
        if not self._enabled:
            return
        if new_scale is not None:
            if isinstance(new_scale, Tensor):
                if new_scale.numel() != 1:
                    raise ValueError("GradScaler.update: new_scale should be a 1-element "
                                     "tensor")
                new_scale = new_scale.item()
            elif not isinstance(new_scale, (int, float)):
                raise ValueError("GradScaler.update: new_scale should be a float or a "
                                 "1-element tensor")
            self._scale = np.float32(new_scale)
        else:
            found = [st["found_inf"] for st in self._per_optimizer.values()
                     if st["found_inf"] is not None]
            if not found:
                raise AssertionError("No inf checks were recorded prior to update.")
            if any(found):
                self._scale = np.float32(np.float64(self._scale) * self._backoff_factor)
                self._growth_tracker = 0
            else:
                successful = self._growth_tracker + 1
                if successful == self._growth_interval:
                    grown = np.float32(np.float64(self._scale) * self._growth_factor)
                    if np.isfinite(grown):
                        self._scale = grown
                    successful = 0
                self._growth_tracker = successful
        self._per_optimizer = {}

    # ---- accessors ----------------------------------------------------------------------
    def get_scale(self):
        return float(self._scale) if self._enabled else 1.0

    def get_growth_factor(self):
        return self._growth_factor

    def set_growth_factor(self, new_factor):
        self._growth_factor = float(new_factor)

    def get_backoff_factor(self):
        return self._backoff_factor

    def set_backoff_factor(self, new_factor):
        self._backoff_factor = float(new_factor)

    def get_growth_interval(self):
        return self._growth_interval

    def set_growth_interval(self, new_interval):
        self._growth_interval = int(new_interval)

    def _get_growth_tracker(self):
        return self._growth_tracker if self._enabled else 0

    def is_enabled(self):
        return self._enabled

    def state_dict(self):
        """{scale, growth_factor, backoff_factor, growth_interval, _growth_tracker} ({} when
        disabled), as PyTorch's."""
        if not self._enabled:
            return {}
        return {"scale": self.get_scale(), "growth_factor": self._growth_factor,
                "backoff_factor": self._backoff_factor,
                "growth_interval": self._growth_interval,
                "_growth_tracker": self._get_growth_tracker()}

    def load_state_dict(self, state_dict):
        if not self._enabled:
            return
        if len(state_dict) == 0:
            raise RuntimeError("The source state dict is empty, possibly because it was saved "
                               "from a disabled instance of GradScaler.")
        self._init_scale = float(state_dict["scale"])
        self._scale = np.float32(state_dict["scale"])
        self._growth_factor = float(state_dict["growth_factor"])
        self._backoff_factor = float(state_dict["backoff_factor"])
        self._growth_interval = int(state_dict["growth_interval"])
        self._growth_tracker = int(state_dict["_growth_tracker"])

    def __repr__(self):
        return (f"GradScaler(device={self._device!r}, scale={self.get_scale()}, "
                f"enabled={self._enabled})")


class _DeviceGradScaler(GradScaler):
    """``gpudiff.cuda.amp.GradScaler`` / ``gpudiff.cpu.amp.GradScaler``: the device fixed."""

    _device = None

    def __init__(self, init_scale=2.0 ** 16, growth_factor=2.0, backoff_factor=0.5,
                 growth_interval=2000, enabled=True):
        super().__init__(self._device, init_scale, growth_factor, backoff_factor,
                         growth_interval, enabled)


class cuda_grad_scaler(_DeviceGradScaler):
    _device = "cuda"


class cpu_grad_scaler(_DeviceGradScaler):
    _device = "cpu"
