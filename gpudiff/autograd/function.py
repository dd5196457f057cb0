"""Custom differentiable functions, as torch.autograd.Function.

    class Square(Function):
        @staticmethod
        def forward(ctx, x):
            ctx.save_for_backward(x)
            return x * x
        @staticmethod
        def backward(ctx, gy):
            x, = ctx.saved_tensors
            return 2 * x * gy

    y = Square.apply(x)
"""
from .grad_mode import is_grad_enabled, no_grad
from .graph import Node, SavedTensor


class FunctionCtx:
    def __init__(self, needs_input_grad):
        self.needs_input_grad = needs_input_grad
        self._to_save = ()
        self._saved = None
        self._non_diff = set()
        self.input_meta = ()
        self.materialize_grads = True

    def save_for_backward(self, *tensors):
        self._to_save = tensors

    def mark_non_differentiable(self, *tensors):
        self._non_diff = {id(t) for t in tensors}

    def mark_dirty(self, *tensors):
        pass

    def set_materialize_grads(self, value):
        self.materialize_grads = value

    @property
    def saved_tensors(self):
        if self._saved is None:
            raise RuntimeError("Trying to backward through the graph a second time, or to use "
                               "saved tensors after they were freed: specify retain_graph=True "
                               "on the first backward() call.")
        return tuple(None if s is None else s.unpack(self._name) for s in self._saved)

    def release(self):
        self._saved = None


class Function:
    """Subclass with static ``forward(ctx, *args)`` and ``backward(ctx, *grads)``."""

    @classmethod
    def apply(cls, *args, **kwargs):
        from ..tensor import Tensor
        tensors = [a for a in args if isinstance(a, Tensor)]
        ctx = FunctionCtx(tuple(isinstance(a, Tensor) and a.requires_grad for a in args))
        ctx._name = cls.__name__
        with no_grad():
            out = cls.forward(ctx, *args, **kwargs)
        multi = isinstance(out, tuple)
        outs = out if multi else (out,)
        if is_grad_enabled() and any(t.requires_grad for t in tensors):
            # outputs that alias inputs are re-wrapped so the inputs keep their own graph
            outs = tuple(Tensor._make(o.array, o.device) if any(o is t for t in tensors) else o
                         for o in outs)
            arg_tensors = [a if isinstance(a, Tensor) else None for a in args]
            ctx.input_meta = [(None, None) if t is None else (t.shape, t.dtype)
                              for t in arg_tensors]

            def backward_fn(c, *gys):
                grads = cls.backward(c, *gys)
                if not isinstance(grads, tuple):
                    grads = (grads,)
                return grads

            node = Node(cls.__name__, backward_fn, ctx, arg_tensors,
                        [o for o in outs if isinstance(o, Tensor)])
            for i, o in enumerate(outs):
                if isinstance(o, Tensor) and id(o) not in ctx._non_diff \
                        and o.dtype.kind == "f":
                    o.grad_fn, o._output_nr, o._requires_grad = node, i, True
            ctx._saved = tuple(_save(t, node) for t in ctx._to_save)
        ctx._to_save = ()
        return outs if multi else outs[0]

    @staticmethod
    def forward(ctx, *args, **kwargs):
        raise NotImplementedError

    @staticmethod
    def backward(ctx, *grads):
        raise NotImplementedError


def _save(t, node):
    if t is None:
        return None
    return SavedTensor(t.array, t.device, tensor=t, owner=node)
