"""``nn.Parameter`` (a tensor a Module registers as trainable) and ``nn.Buffer``."""
import copy

from ..tensor import Tensor


class Parameter(Tensor):
    """A Tensor that a Module registers in ``parameters()`` when assigned as an attribute.

    It shares memory with ``data`` (no copy) and requires grad by default, like
    ``torch.nn.Parameter``. Ops on a Parameter return plain Tensors.

    >>> p = Parameter(gpudiff.zeros(2))
    >>> p
    Parameter containing:
    tensor([0., 0.], requires_grad=True)
    """

    __slots__ = ()

    def __init__(self, data=None, requires_grad=True):
        if data is None:
            from ..creation import empty
            data = empty(0)
        if not isinstance(data, Tensor):
            from ..creation import tensor
            data = tensor(data)
        self._init(data.array, data.device)
        self._version = data._version  # same memory, same version counter
        self.requires_grad = requires_grad

    def __repr__(self):
        return "Parameter containing:\n" + super().__repr__()

    def __deepcopy__(self, memo):
        if id(self) in memo:
            return memo[id(self)]
        out = Parameter(Tensor.from_array(self.array.copy(), self.device), self.requires_grad)
        if self.grad is not None:
            out.grad = copy.deepcopy(self.grad, memo)
        memo[id(self)] = out
        return out

    def __reduce__(self):
        return (_rebuild_parameter, (self.detach(), self.requires_grad))


def _rebuild_parameter(data, requires_grad):
    return Parameter(data, requires_grad)


class Buffer(Tensor):
    """A Tensor that a Module registers as a buffer when assigned as an attribute
    (``self.running = nn.Buffer(t, persistent=False)``), like ``torch.nn.Buffer``."""

    __slots__ = ("persistent",)

    def __init__(self, data=None, *, persistent=True):
        if data is None:
            from ..creation import empty
            data = empty(0)
        if not isinstance(data, Tensor):
            from ..creation import tensor
            data = tensor(data)
        self._init(data.array, data.device)
        self._version = data._version
        self.persistent = persistent
