"""gpudiff.cpu.amp: PyTorch's older spelling ``torch.cpu.amp.autocast(enabled=True,
dtype=bfloat16, cache_enabled=True)`` (device 'cpu') and ``GradScaler`` for the CPU."""
from ..amp.autocast_mode import cpu_autocast as autocast
from ..amp.grad_scaler import GradScaler as _GradScaler


class GradScaler(_GradScaler):
    def __init__(self, init_scale=2.0 ** 16, growth_factor=2.0, backoff_factor=0.5,
                 growth_interval=2000, enabled=True):
        super().__init__("cpu", init_scale, growth_factor, backoff_factor, growth_interval,
                         enabled)


__all__ = ["autocast", "GradScaler"]
