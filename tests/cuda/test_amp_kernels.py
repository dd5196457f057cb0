"""The fused AMP unscale kernel (csrc/cuda/optim.cu amp_unscale_multi, the 'amp_unscale'
kernel of gpudiff/runtime/cuda/optim.py): every gradient of one dtype unscaled and checked for
inf/NaN in ONE launch, bitwise equal to the NumPy reference, in every thread order (the
emulator's race and init checks on), with the bad value anywhere, chunk edges included."""
import numpy as np
import pytest

import gpudiff
from gpudiff import runtime
from gpudiff.amp.grad_scaler import _unscale_reference, unscale_grads
from gpudiff.runtime.cuda import launch as cuda_launch
from gpudiff.runtime.cuda.optim import OPTIM_CHUNK

SIZES = (1, OPTIM_CHUNK - 1, OPTIM_CHUNK, OPTIM_CHUNK + 1, 2 * OPTIM_CHUNK + 7)


@pytest.mark.parametrize("order", ["forward", "reverse", "random"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("bad", [None, np.inf, -np.inf, np.nan])
def test_amp_unscale_matches_reference(order, dtype, bad):
    dev = gpudiff.device("cuda")
    k = runtime.kernel(dev, "amp_unscale")
    assert k is not None, "no fused amp_unscale kernel registered for cuda"
    rng = np.random.default_rng(0)
    host = [rng.standard_normal(n).astype(dtype) for n in SIZES]
    if bad is not None:   # the first element of the last chunk of tensor 3
        host[3][OPTIM_CHUNK] = bad
    arrs = [runtime.to_device(h, dev) for h in host]
    ref = [h.copy() for h in host]
    found_ref = _unscale_reference(np, ref, dtype(0.125))
    with cuda_launch.emulator(order=order, seed=7, shuffle_blocks=True):
        found = k(arrs, 0.125)
    assert found == found_ref == (bad is not None)
    for a, r in zip(arrs, ref):
        np.testing.assert_array_equal(runtime.to_numpy(a), r)


def test_one_launch_per_dtype_group(monkeypatch):
    from gpudiff.runtime.cuda import optim as cuda_optim
    names = []
    real = cuda_optim.launch
    monkeypatch.setattr(cuda_optim, "launch", lambda *a, **kw: (names.append(a[1]),
                                                                real(*a, **kw))[1])
    dev = gpudiff.device("cuda")
    grads = [runtime.to_device(np.ones(n, dt), dev) for n, dt in
             ((5, np.float32), (3000, np.float32), (7, np.float64), (9, np.float32))]
    assert unscale_grads(grads, 0.5, dev) is False
    assert sorted(names) == ["amp_unscale_multi<double>", "amp_unscale_multi<float>"]
    assert all((runtime.to_numpy(g) == 0.5).all() for g in grads)
