"""gpudiff.cuda.amp: PyTorch's older spellings, ``torch.cuda.amp.autocast(enabled=True,
dtype=float16, cache_enabled=True)`` and ``torch.cuda.amp.GradScaler(...)`` (device 'cuda')."""
from ..amp.autocast_mode import cuda_autocast as autocast
from ..amp.grad_scaler import cuda_grad_scaler as GradScaler


__all__ = ["autocast", "GradScaler"]
