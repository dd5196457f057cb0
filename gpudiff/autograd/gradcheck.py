"""Finite-difference checks of backward (use float64 inputs)."""
import numpy as np

from .. import runtime
from . import graph


def _as_tuple(x):
    return x if isinstance(x, tuple) else (x,)


def _numerical_jacobian(fn, inputs, i, eps):
    """d outputs / d inputs[i] by central differences: list (per output) of (out, in)."""
    Tensor = graph.Tensor
    x = inputs[i]
    a = x.array
    jac = None
    for k in range(a.size):
        # index the array itself: a.reshape(-1) would be a copy for non-contiguous inputs
        at = np.unravel_index(k, a.shape)
        orig = a[at].item()
        a[at] = orig + eps
        plus = [o.array.astype(np.float64).reshape(-1).copy() for o in _as_tuple(fn(*inputs))
                if isinstance(o, Tensor)]
        a[at] = orig - eps
        minus = [o.array.astype(np.float64).reshape(-1).copy() for o in _as_tuple(fn(*inputs))
                 if isinstance(o, Tensor)]
        a[at] = orig
        if jac is None:
            jac = [np.zeros((p.size, a.size)) for p in plus]
        for j, (p, m) in enumerate(zip(plus, minus)):
            jac[j][:, k] = (p - m) / (2 * eps)
    if jac is None:  # an empty input: (out, 0) Jacobians
        jac = [np.zeros((o.numel(), 0)) for o in _as_tuple(fn(*inputs)) if isinstance(o, Tensor)]
    return jac


def gradcheck(func, inputs, *, eps=1e-6, atol=1e-5, rtol=1e-3, raise_exception=True,
              nondet_tol=0.0, check_undefined_grad=False, fast_mode=False):
    """Compare the analytical Jacobian (backward) with central differences.

    >>> gradcheck(lambda x: (x * x).sum(), (gpudiff.randn(3, dtype=gpudiff.float64,
    ...                                                    requires_grad=True),))
    True
    """
    Tensor, autograd_grad = graph.Tensor, graph.grad
    inputs = _as_tuple(inputs)
    diff = [i for i, t in enumerate(inputs) if isinstance(t, Tensor) and t.requires_grad]
    for i in diff:
        if inputs[i].dtype != np.float64:
            import warnings
            warnings.warn(f"gradcheck: input {i} is {inputs[i].dtype}, not float64: the check "
                          f"will likely fail from rounding")
    outs = [o for o in _as_tuple(func(*inputs)) if isinstance(o, Tensor)]
    for oi, out in enumerate(outs):
        if not out.requires_grad:
            continue
        n = out.numel()
        analytic = {i: np.zeros((n, inputs[i].numel())) for i in diff}
        for r in range(n):
            seed = np.zeros(n, dtype=out.dtype)
            seed[r] = 1
            g_out = Tensor._make(out.device.xp.asarray(seed.reshape(out.shape)), out.device)
            o2 = _as_tuple(func(*inputs))
            o2 = [o for o in o2 if isinstance(o, Tensor)][oi]
            grads = autograd_grad(o2, [inputs[i] for i in diff], g_out, allow_unused=True)
            for i, g in zip(diff, grads):
                if g is not None:
                    analytic[i][r] = runtime.to_numpy(g.array).reshape(-1)
        for i in diff:
            num = _numerical_jacobian(lambda *a: func(*a), inputs, i, eps)[oi]
            if not np.allclose(analytic[i], num, rtol=rtol, atol=atol):
                err = np.abs(analytic[i] - num).max()
                msg = (f"Jacobian mismatch for output {oi} with respect to input {i}: max "
                       f"abs error {err:.3g}\nnumerical:\n{num}\nanalytical:\n{analytic[i]}")
                if raise_exception:
                    raise GradcheckError(msg)
                return False
    return True


class GradcheckError(RuntimeError):
    pass


def gradgradcheck(func, inputs, grad_outputs=None, *, eps=1e-6, atol=1e-5, rtol=1e-3,
                  raise_exception=True):
    """gradcheck of the first derivative (checks double backward)."""
    Tensor, autograd_grad = graph.Tensor, graph.grad
    inputs = _as_tuple(inputs)
    outs = [o for o in _as_tuple(func(*inputs)) if isinstance(o, Tensor) and o.requires_grad]
    if grad_outputs is None:
        rng = np.random.default_rng(0)
        grad_outputs = [Tensor._make(o.device.xp.asarray(rng.standard_normal(o.shape)
                                                         .astype(o.dtype)), o.device)
                        for o in outs]
    for g in grad_outputs:
        g.requires_grad = True

    def first_grads(*args):
        ins, gos = args[:len(inputs)], args[len(inputs):]
        o = [o for o in _as_tuple(func(*ins)) if isinstance(o, Tensor) and o.requires_grad]
        d = [t for t in ins if isinstance(t, Tensor) and t.requires_grad]
        return autograd_grad(o, d, list(gos), create_graph=True, allow_unused=True,
                             materialize_grads=True)

    return gradcheck(first_grads, tuple(inputs) + tuple(grad_outputs), eps=eps, atol=atol,
                     rtol=rtol, raise_exception=raise_exception)
