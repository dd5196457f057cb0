"""gpudiff.amp: automatic mixed precision (PyTorch's torch.amp).

``autocast(device_type, dtype=None, enabled=True, cache_enabled=True)`` runs convolutions,
linear layers and matrix products in float16 / bfloat16 and the numerically sensitive ops in
float32 (docs/AMP.md lists them); ``GradScaler`` scales the loss so float16 gradients do not
underflow, and skips the steps whose gradients overflowed.
"""
from .autocast_mode import autocast, get_autocast_dtype, is_autocast_enabled
from .grad_scaler import GradScaler

__all__ = ["autocast", "GradScaler", "is_autocast_enabled", "get_autocast_dtype"]
