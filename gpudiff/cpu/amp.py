"""gpudiff.cpu.amp: PyTorch's older spelling ``torch.cpu.amp.autocast(enabled=True,
dtype=bfloat16, cache_enabled=True)`` (device 'cpu') and ``GradScaler`` for the CPU."""
from ..amp.autocast_mode import cpu_autocast as autocast
from ..amp.grad_scaler import cpu_grad_scaler as GradScaler


__all__ = ["autocast", "GradScaler"]
