"""Grad mode: whether ops record nodes on the tape (thread-local, like PyTorch)."""
import functools
import threading

class _State(threading.local):
    enabled = True    # grad mode (each thread starts with it on, as in PyTorch)
    anomaly = False   # anomaly detection


_state = _State()


def is_grad_enabled():
    return _state.enabled


def _set(flag):
    _state.enabled = bool(flag)


def is_anomaly_enabled():
    return _state.anomaly


class _Mode:
    """Base of the grad-mode context managers; each is also a decorator, with or without
    parentheses (``@no_grad()`` and ``@no_grad``, as PyTorch 2 allows)."""

    flag = None

    def __new__(cls, *args, **kwargs):
        if args and cls in (no_grad, enable_grad) and len(args) == 1 and callable(args[0]) \
                and not kwargs:
            return object.__new__(cls)(args[0])   # @no_grad on a function: decorate it
        return object.__new__(cls)

    # (``with no_grad():`` runs around single ops in user loops: no calls beyond these two)
    def __enter__(self):
        state = _state
        self._prev = state.enabled
        state.enabled = self.flag
        return self

    def __exit__(self, *exc):
        _state.enabled = self._prev
        return False

    def __call__(self, fn):
        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            with self.__class__():
                return fn(*args, **kwargs)
        return wrapper


class no_grad(_Mode):
    """Ops run inside record nothing: ``with gpudiff.no_grad(): ...`` or ``@no_grad()``."""
    flag = False


class enable_grad(_Mode):
    """Turn recording back on inside a ``no_grad`` block."""
    flag = True


class inference_mode(_Mode):
    """Like ``no_grad`` (gpudiff has no separate inference tensors)."""

    def __init__(self, mode=True):
        self.flag = not mode

    def __call__(self, fn):
        flag = self.flag

        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            with inference_mode(not flag):
                return fn(*args, **kwargs)
        return wrapper


class set_grad_enabled(_Mode):
    """``set_grad_enabled(False)`` as a call, a context manager or a decorator."""

    def __init__(self, mode):
        self.flag = bool(mode)
        self._prev = is_grad_enabled()
        _set(self.flag)  # takes effect on call, like torch

    def __enter__(self):
        return self

    def __call__(self, fn):
        _set(self._prev)
        flag = self.flag

        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            with set_grad_enabled(flag):
                return fn(*args, **kwargs)
        return wrapper


class detect_anomaly:
    """Check every forward output and backward gradient for NaN/Inf and name the op; a context
    manager or a decorator.

    >>> with detect_anomaly():
    ...     loss.backward()      # RuntimeError: Function 'log' returned nan values ...
    """

    def __init__(self, check_nan=True):
        self.check_nan = check_nan

    def __call__(self, fn):
        check_nan = self.check_nan

        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            with detect_anomaly(check_nan):
                return fn(*args, **kwargs)
        return wrapper

    def __enter__(self):
        self._prev = is_anomaly_enabled()
        _state.anomaly = self.check_nan
        return self

    def __exit__(self, *exc):
        _state.anomaly = self._prev
        return False


def set_detect_anomaly(flag):
    _state.anomaly = bool(flag)
