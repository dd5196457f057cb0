"""SyncBatchNorm: batch norm whose batch statistics are taken over every rank's batch.

Training forward (world size > 1): per channel, the sum of x and the element count are
all-reduced (mean), then the sum of (x - mean)^2 (biased variance): two small all-reduces of
C + 1 and C numbers. Both go through a differentiable all-reduce (its backward all-reduces
the incoming gradient), so the backward is autograd's chain rule through public tensor ops:
the input gradient on each rank gets the all-reduced sums of dL/dy and dL/dy * (x - mean)
that PyTorch's SyncBatchNorm backward computes, and the weight and bias gradients are this
rank's own sums (DDP then averages them, as in PyTorch). Running statistics use the global
mean and the global unbiased variance, so every rank keeps the same ones.

Eval mode, or a process group of one rank (or none): exactly BatchNorm.
"""
from ... import autograd
from .. import functional as F  # noqa: F401  (BatchNorm's forward uses it)
from .batchnorm import _BatchNorm


class _AllReduceSum(autograd.Function):
    """y = sum over ranks of x; dL/dx = sum over ranks of dL/dy (the loss is the sum of the
    ranks' losses)."""

    @staticmethod
    def forward(ctx, x):
        from ... import distributed as dist
        y = x.clone()
        dist.all_reduce(y)
        return y

    @staticmethod
    def backward(ctx, gy):
        from ... import distributed as dist
        g = gy.clone()
        dist.all_reduce(g)
        return g


class SyncBatchNorm(_BatchNorm):
    """BatchNorm over (N, C, ...) inputs with statistics over all ranks' batches."""

    def __init__(self, num_features, eps=1e-5, momentum=0.1, affine=True,
                 track_running_stats=True, process_group=None, device=None, dtype=None):
        super().__init__(num_features, eps, momentum, affine, track_running_stats,
                         device=device, dtype=dtype)
        self.process_group = process_group

    def _check_input_dim(self, input):
        if input.ndim < 2:
            raise ValueError(f"expected at least 2D input (got {input.ndim}D input)")

    def _world(self):
        from ... import distributed as dist
        return dist.get_world_size() if dist.is_initialized() else 1

    def forward(self, input):
        self._check_input_dim(input)
        if not self.training or self._world() == 1:
            return super().forward(input)
        if input.shape[1] != self.num_features:
            raise ValueError(f"SyncBatchNorm: expected {self.num_features} channels, got "
                             f"input of shape {tuple(input.shape)}")
        from ... import creation, functions, no_grad
        c = self.num_features
        dims = (0,) + tuple(range(2, input.ndim))
        shape = (1, c) + (1,) * (input.ndim - 2)
        n_local = input.numel() // c
        count = creation.full((1,), float(n_local), dtype=input.dtype, device=input.device)
        stats = _AllReduceSum.apply(functions.cat([input.sum(dims), count]))   # (C + 1,)
        n = float(stats[c].item())
        if n <= 1:
            raise ValueError(f"SyncBatchNorm: expected more than 1 value per channel when "
                             f"training over all ranks, got input size {tuple(input.shape)}")
        mean = stats[:c] / n                                                   # (C,)
        xc = input - mean.reshape(shape)
        var = _AllReduceSum.apply((xc * xc).sum(dims)) / n                     # (C,) biased
        y = xc * functions.rsqrt(var + self.eps).reshape(shape)
        if self.weight is not None:
            y = y * self.weight.reshape(shape)
        if self.bias is not None:
            y = y + self.bias.reshape(shape)
        if self.track_running_stats and self.running_mean is not None:
            with no_grad():
                self.num_batches_tracked.add_(1)
                m = (1.0 / float(self.num_batches_tracked.item()) if self.momentum is None
                     else self.momentum)
                self.running_mean.mul_(1 - m).add_(mean.detach() * m)
                self.running_var.mul_(1 - m).add_(var.detach() * (m * n / (n - 1)))
        return y

    @classmethod
    def convert_sync_batchnorm(cls, module, process_group=None):
        """``module`` with every BatchNorm*d replaced by a SyncBatchNorm sharing its
        parameters and buffers (a BatchNorm passed itself comes back converted)."""
        out = module
        if isinstance(module, _BatchNorm) and not isinstance(module, SyncBatchNorm):
            w = module.weight if module.affine else None
            out = cls(module.num_features, module.eps, module.momentum, module.affine,
                      module.track_running_stats, process_group,
                      device=None if w is None else w.device,
                      dtype=None if w is None else w.dtype)
            if module.affine:
                out.weight = module.weight
                if module.bias is None:
                    out.register_parameter("bias", None)
                else:
                    out.bias = module.bias
            out.running_mean = module.running_mean
            out.running_var = module.running_var
            out.num_batches_tracked = module.num_batches_tracked
            out.training = module.training
        for name, child in module.named_children():
            out.add_module(name, cls.convert_sync_batchnorm(child, process_group))
        return out
