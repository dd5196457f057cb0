"""The tensor-core kernels (csrc/cuda/tensor_core.cu, gpudiff/runtime/cuda/tensor_core.py).

Every kernel (convolution forward / dgrad / wgrad, the GEMM) in TF32, FP16 and BF16 against a
float64 NumPy reference of the inputs rounded as the hardware rounds them (TF32: cvt.rna, 10
mantissa bits, ties away from zero; FP16 / BF16: exact), in the emulator's three thread orders
(and on a GPU when there is one), at tile edges (sizes 1, 15, 17, 33, 65 around the 64 x 64
block tile and the 16 / 32 element reduction step). Half-precision operands are handed over
as their uint16 bits, so the kernels' fp32 accumulators come back unrounded and the
comparison is tight: a tolerance of fp32 accumulation, which an unrounded (fp32) reference
misses for TF32. A deliberately wrong fragment layout in the emulator's mma
(``_cuda_host.set_mma_fault``) makes the same comparisons fail.
"""
import json
import os
import re

import numpy as np
import pytest

from gpudiff import geometry
from gpudiff.runtime.cuda import conv as cuda_conv
from gpudiff.runtime.cuda import launch as cuda_launch
from gpudiff.runtime.cuda import tensor_core as tc

PRECISIONS = ["tf32", "f16", "bf16"]
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


# ---- operands: values and what the kernel is handed ----------------------------------------------
def bf16_bits(a):
    """float32 -> bfloat16 bits, round to nearest even (as ml_dtypes / torch do)."""
    u = np.ascontiguousarray(a, np.float32).view(np.uint32).astype(np.uint64)
    return ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(np.uint16)


def operand(a, prec):
    """(what the kernel gets, the exact values the hardware multiplies, float64)."""
    a = np.asarray(a, np.float32)
    if prec == "tf32":
        return a, tc.round_tf32(a).astype(np.float64)
    if prec == "f16":
        h = a.astype(np.float16)
        return h.view(np.uint16), h.astype(np.float64)
    bits = bf16_bits(a)
    return bits, (bits.astype(np.uint32) << 16).view(np.float32).astype(np.float64)


def fp32_accumulation_tol(absref, depth):
    """What fp32 accumulation may lose: a GPU adds each mma's (exact) products to the fp32
    accumulator, depth / 8 roundings; the emulator rounds once."""
    return (depth / 8 + 2) * 2.0 ** -22 * absref + 1e-30


def check(got, ref, absref, depth, what=""):
    got = np.asarray(got, np.float64)
    assert got.shape == ref.shape, what
    err = np.abs(got - ref)
    tol = fp32_accumulation_tol(absref, depth)
    bad = err > tol
    assert not bad.any(), (f"{what}: {bad.sum()} of {bad.size} elements off, worst "
                           f"{err.max():.3g} (tolerance there {tol.flat[np.argmax(err)]:.3g})")


def rand(shape, seed):
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


# ---- TF32 rounding ----------------------------------------------------------------------------------
def test_round_tf32_is_cvt_rna():
    one = 1.0
    ulp = 2.0 ** -10  # TF32's unit in the last place at 1
    cases = {
        one + ulp / 2: one + ulp,                     # tie: away from zero
        -(one + ulp / 2): -(one + ulp),
        one + ulp / 2 - 2.0 ** -23: one,              # just below the tie: down
        one + 3 * ulp / 2: one + 2 * ulp,             # tie away from zero, not to even
        2.0 - 2.0 ** -23: 2.0,                        # carry into the exponent
        np.inf: np.inf, -np.inf: -np.inf,
        float(np.finfo(np.float32).max): np.inf,      # rounds past TF32's largest: inf
        0.0: 0.0, 2.0 ** -130: 2.0 ** -130,           # subnormal inside TF32's bits: exact
        2.0 ** -140: 0.0,                             # subnormal below them: 0
    }
    got = tc.round_tf32(np.array(list(cases), np.float32))
    np.testing.assert_array_equal(got, np.array(list(cases.values()), np.float32))
    assert np.isnan(tc.round_tf32(np.array([np.nan], np.float32)))[0]
    x = rand(1000, 0)
    r = tc.round_tf32(x)
    assert not (r.view(np.uint32) & 0x1FFF).any()
    assert np.abs(r - x).max() <= np.abs(x).max() * 2.0 ** -11


def test_kernels_round_tf32_as_cvt_rna(where):
    # a (n, 1) @ (1, 1) of ones: the kernel's rounding of each a, times an exact 1
    ulp = 2.0 ** -10
    vals = np.array([1 + ulp / 2, -(1 + ulp / 2), 1 + ulp / 2 - 2.0 ** -23, 1 + 3 * ulp / 2,
                     2 - 2.0 ** -23, 3.14159265, -2.71828183, 1e-3, 65504.0, 0.0],
                    np.float32)[:, None]
    c = where.get(tc.gemm(where.put(vals), where.put(np.ones((1, 1), np.float32)), "tf32"))
    np.testing.assert_array_equal(c, tc.round_tf32(vals))


# ---- GEMM ------------------------------------------------------------------------------------------
GEMM_SIZES = [(1, 1, 1), (15, 17, 33), (33, 15, 17), (16, 8, 8), (65, 70, 40)]


@pytest.mark.parametrize("prec", PRECISIONS)
@pytest.mark.parametrize("mnk", GEMM_SIZES, ids=lambda s: "x".join(map(str, s)))
def test_gemm_matches_the_rounded_reference(where, prec, mnk):
    M, N, K = mnk
    a, av = operand(rand((M, K), 1), prec)
    b, bv = operand(rand((K, N), 2), prec)
    ref, absref = av @ bv, np.abs(av) @ np.abs(bv)
    c = where.get(tc.gemm(where.put(a), where.put(b), prec))
    assert c.dtype == np.float32
    check(c, ref, absref, K, f"{prec} {mnk}")
    if prec == "tf32" and K > 1:
        # the test sees the rounding: the unrounded product is outside the tolerance
        plain = a.astype(np.float64) @ b.astype(np.float64)
        assert (np.abs(plain - ref) > fp32_accumulation_tol(absref, K)).any()


@pytest.mark.parametrize("prec", PRECISIONS)
def test_gemm_reads_transposed_operands_without_copies(where, prec):
    # the three load directions (A along k / rows, B along k / rows) and the fourth case
    M, N, K = 17, 33, 40
    a, av = operand(rand((M, K), 3), prec)
    b, bv = operand(rand((K, N), 4), prec)
    ref, absref = av @ bv, np.abs(av) @ np.abs(bv)
    for fa in (False, True):
        for fb in (False, True):
            aa = np.asfortranarray(a) if fa else a
            bb = np.asfortranarray(b) if fb else b
            if where.gpu:
                aa, bb = where.put(aa), where.put(bb)
            c = where.get(tc.gemm(aa, bb, prec))
            check(c, ref, absref, K, f"{prec} F-order a {fa} b {fb}")


def test_gemm_kernel_names_follow_the_operand_layouts(launched):
    a = rand((17, 9), 5)
    b = rand((9, 6), 6)
    tc.gemm(a, b, "tf32")                                   # a along k, b along rows
    tc.gemm(a, np.asfortranarray(b), "tf32")                # b = w.T of a linear layer
    tc.gemm(np.asfortranarray(a), b, "tf32")                # gw = x.T @ gy
    assert launched == ["gemm_tc<tc::Tf32, true, false>", "gemm_tc<tc::Tf32, true, true>",
                        "gemm_tc<tc::Tf32, false, false>"]


def test_gemm_with_empty_depth_is_zero():
    c = tc.gemm(np.ones((3, 0), np.float32), np.ones((0, 4), np.float32), "tf32")
    np.testing.assert_array_equal(c, np.zeros((3, 4), np.float32))


# ---- convolution -------------------------------------------------------------------------------------
def conv_ref(x, w, stride, padding, dilation, groups):
    """y, and the gradient functions, of conv2d in float64 (a loop over the taps)."""
    N, C, H, W = x.shape
    K, Cg, KH, KW = w.shape
    (sh, sw), (ph, pw), (dh, dw) = stride, padding, dilation
    OH = (H + 2 * ph - dh * (KH - 1) - 1) // sh + 1
    OW = (W + 2 * pw - dw * (KW - 1) - 1) // sw + 1
    G, Kg = groups, K // groups
    xp_ = np.zeros((N, C, H + 2 * ph, W + 2 * pw))
    xp_[:, :, ph:ph + H, pw:pw + W] = x
    y = np.zeros((N, K, OH, OW))
    for g in range(G):
        ws = w[g * Kg:(g + 1) * Kg]
        for i in range(KH):
            for j in range(KW):
                patch = xp_[:, g * Cg:(g + 1) * Cg, i * dh:i * dh + sh * (OH - 1) + 1:sh,
                            j * dw:j * dw + sw * (OW - 1) + 1:sw]
                y[:, g * Kg:(g + 1) * Kg] += np.einsum("kc,ncij->nkij", ws[:, :, i, j], patch)

    def dgrad(gy, w):
        gxp = np.zeros_like(xp_)
        for g in range(G):
            ws = w[g * Kg:(g + 1) * Kg]
            for i in range(KH):
                for j in range(KW):
                    gxp[:, g * Cg:(g + 1) * Cg, i * dh:i * dh + sh * (OH - 1) + 1:sh,
                        j * dw:j * dw + sw * (OW - 1) + 1:sw] += np.einsum(
                            "kc,nkij->ncij", ws[:, :, i, j], gy[:, g * Kg:(g + 1) * Kg])
        return gxp[:, :, ph:ph + H, pw:pw + W]

    def wgrad(gy, x):
        xq = np.zeros_like(xp_)
        xq[:, :, ph:ph + H, pw:pw + W] = x
        gw = np.zeros(w.shape)
        for g in range(G):
            for i in range(KH):
                for j in range(KW):
                    patch = xq[:, g * Cg:(g + 1) * Cg, i * dh:i * dh + sh * (OH - 1) + 1:sh,
                               j * dw:j * dw + sw * (OW - 1) + 1:sw]
                    gw[g * Kg:(g + 1) * Kg, :, i, j] = np.einsum(
                        "nkij,ncij->kc", gy[:, g * Kg:(g + 1) * Kg], patch)
        return gw
    return y, dgrad, wgrad


# (x shape, w shape, stride, padding, dilation, groups)
CONVS = {
    "3x3-pad1": ((2, 3, 7, 6), (5, 3, 3, 3), (1, 1), (1, 1), (1, 1), 1),
    "stride2-groups2": ((1, 4, 9, 9), (6, 2, 3, 2), (2, 1), (1, 0), (1, 1), 2),
    "1x1": ((2, 5, 4, 5), (3, 5, 1, 1), (1, 1), (0, 0), (1, 1), 1),
    "dilation2-stride2": ((1, 3, 8, 7), (17, 3, 3, 3), (2, 2), (2, 1), (2, 1), 1),
    "65-channels": ((1, 2, 9, 8), (65, 2, 2, 2), (1, 1), (0, 0), (1, 1), 1),
}


@pytest.mark.parametrize("prec", PRECISIONS)
@pytest.mark.parametrize("case", list(CONVS))
def test_conv_passes_match_the_rounded_reference(where, prec, case):
    xs, wsh, stride, padding, dilation, groups = CONVS[case]
    geom = geometry.ConvGeom(xs, wsh, stride, padding, dilation, groups)
    x, xv = operand(rand(xs, 10), prec)
    w, wv = operand(rand(wsh, 11), prec)
    b = rand(wsh[0], 12)
    yref, dgrad, wgrad = conv_ref(xv, wv, stride, padding, dilation, groups)
    _, adgrad, awgrad = conv_ref(np.abs(xv), np.abs(wv), stride, padding, dilation, groups)
    yabs = conv_ref(np.abs(xv), np.abs(wv), stride, padding, dilation, groups)[0]
    depth = geom.Cg * geom.kh * geom.kw

    y = where.get(tc.conv2d_forward(where.put(x), where.put(w), where.put(b), geom, prec))
    check(y, yref + b.reshape(1, -1, 1, 1), yabs + np.abs(b).reshape(1, -1, 1, 1), depth,
          f"{case} {prec} forward")

    gy, gyv = operand(rand(yref.shape, 13), prec)
    gx = where.get(tc.conv2d_backward_input(where.put(gy), where.put(w), geom, prec))
    check(gx, dgrad(gyv, wv), adgrad(np.abs(gyv), np.abs(wv)), geom.Kg * geom.kh * geom.kw,
          f"{case} {prec} dgrad")

    gw = where.get(tc.conv2d_backward_weight(where.put(gy), where.put(x), wsh, geom, prec))
    check(gw, wgrad(gyv, xv), awgrad(np.abs(gyv), np.abs(xv)), geom.N * geom.OH * geom.OW,
          f"{case} {prec} wgrad")


@pytest.mark.parametrize("prec", ["tf32", "bf16"])
def test_wgrad_split_over_blocks_matches(where, prec):
    xs, wsh = (2, 2, 16, 16), (3, 2, 3, 3)
    geom = geometry.ConvGeom(xs, wsh, 1, 1, 1, 1)
    splits, chunk = tc.wgrad_splits(geom, np.empty(1), prec)
    assert splits == 2 and chunk % (16 if prec == "tf32" else 32) == 0
    x, xv = operand(rand(xs, 20), prec)
    gy, gyv = operand(rand((2, 3, 16, 16), 21), prec)
    _, _, wgrad = conv_ref(xv, np.zeros(wsh), (1, 1), (1, 1), (1, 1), 1)
    _, _, awgrad = conv_ref(np.abs(xv), np.zeros(wsh), (1, 1), (1, 1), (1, 1), 1)
    gw = where.get(tc.conv2d_backward_weight(where.put(gy), where.put(x), wsh, geom, prec))
    check(gw, wgrad(gyv, xv), awgrad(np.abs(gyv), np.abs(xv)), 512, f"{prec} split wgrad")


# ---- a wrong fragment layout fails ---------------------------------------------------------------
@pytest.mark.parametrize("fault", [1, 2, 3], ids=["A-rows-swapped", "B-k-misread", "D-cols-swapped"])
@pytest.mark.parametrize("prec", PRECISIONS)
def test_a_wrong_fragment_layout_fails_the_comparison(host, prec, fault):
    # (K = 24: more than one mma with non-zero operands per output; a D permutation applied
    # to an all-zero last product would cancel itself out)
    M, N, K = 16, 8, 24
    a, av = operand(rand((M, K), 30), prec)
    b, bv = operand(rand((K, N), 31), prec)
    ref, absref = av @ bv, np.abs(av) @ np.abs(bv)
    check(tc.gemm(a, b, prec), ref, absref, K, "right layout")
    xs, wsh = (1, 3, 6, 6), (9, 3, 3, 3)
    geom = geometry.ConvGeom(xs, wsh, 1, 1, 1, 1)
    x, xv = operand(rand(xs, 32), prec)
    w, wv = operand(rand(wsh, 33), prec)
    yref, yabs = conv_ref(xv, wv, (1, 1), (1, 1), (1, 1), 1)[0], \
        conv_ref(np.abs(xv), np.abs(wv), (1, 1), (1, 1), (1, 1), 1)[0]
    host.set_mma_fault(fault)
    try:
        assert host.mma_fault() == fault
        with pytest.raises(AssertionError, match="elements off"):
            check(tc.gemm(a, b, prec), ref, absref, K, "wrong layout")
        with pytest.raises(AssertionError, match="elements off"):
            check(tc.conv2d_forward(x, w, None, geom, prec), yref, yabs, 27, "wrong layout")
    finally:
        host.set_mma_fault(0)
    check(tc.conv2d_forward(x, w, None, geom, prec), yref, yabs, 27, "right layout again")


def test_mma_needs_the_whole_warp(host):
    # .aligned: a 16-thread block cannot run a kernel that issues mma.sync
    a = np.ones((16, 8), np.float32)
    with cuda_launch.emulator(check=""), pytest.raises(RuntimeError, match="mma.sync"):
        cuda_launch.launch("tensor_core.cu", "gemm_tc<tc::Tf32, true, true>", (1, 1, 1), 16,
                           (a, a, np.empty((16, 16), np.float32))
                           + cuda_launch.i32(16, 16, 8) + tuple(np.int64(v) for v in (8, 1, 1, 8)))


# ---- wiring: the settings and the ops ----------------------------------------------------------
def test_cudnn_allow_tf32_sends_float32_convolutions_to_the_tensor_cores():
    import gpudiff
    import gpudiff.nn.functional as gF
    cudnn = gpudiff.backends.cudnn
    assert cudnn.allow_tf32 is True  # PyTorch's default
    xs, wsh = (2, 3, 6, 6), (4, 3, 3, 3)
    x0, w0 = rand(xs, 40), rand(wsh, 41)
    xv, wv = tc.round_tf32(x0).astype(np.float64), tc.round_tf32(w0).astype(np.float64)
    yref, dgrad, wgrad = conv_ref(xv, wv, (1, 1), (1, 1), (1, 1), 1)
    yabs, adgrad, awgrad = conv_ref(np.abs(xv), np.abs(wv), (1, 1), (1, 1), (1, 1), 1)
    x = gpudiff.tensor(x0, device="cuda", requires_grad=True)
    w = gpudiff.tensor(w0, device="cuda", requires_grad=True)
    gy0 = rand(yref.shape, 42)
    gyv = tc.round_tf32(gy0).astype(np.float64)
    cuda_conv.reset_conv_log()
    y = gF.conv2d(x, w, padding=1)
    y.backward(gpudiff.tensor(gy0, device="cuda"))
    assert cuda_conv.last_conv_math == {"forward": "tf32", "backward_input": "tf32",
                                        "backward_weight": "tf32"}
    check(y.detach().cpu().numpy(), yref, yabs, 27, "forward")
    check(x.grad.cpu().numpy(), dgrad(gyv, wv), adgrad(np.abs(gyv), np.abs(wv)), 36, "dgrad")
    check(w.grad.cpu().numpy(), wgrad(gyv, xv), awgrad(np.abs(gyv), np.abs(xv)), 72, "wgrad")
    # off: FP32 kernels, float32 numbers
    try:
        cudnn.allow_tf32 = False
        assert cuda_conv.allow_tf32 is False
        y32 = gF.conv2d(x, w, padding=1)
        assert cuda_conv.last_conv_math["forward"] == "fp32"
        ref32 = conv_ref(x0.astype(np.float64), w0.astype(np.float64), (1, 1), (1, 1), (1, 1), 1)[0]
        np.testing.assert_allclose(y32.detach().cpu().numpy(), ref32, rtol=1e-5, atol=1e-5)
        assert np.abs(y.detach().cpu().numpy() - ref32).max() > 1e-4  # TF32 was TF32
    finally:
        cudnn.allow_tf32 = True
    # depthwise stays on the FP32 direct kernel; 'im2col' forced stays FP32
    dw = gpudiff.tensor(rand((3, 1, 3, 3), 43), device="cuda")
    gF.conv2d(x.detach(), dw, groups=3)
    assert cuda_conv.last_conv_algorithm["forward"] == "direct"
    assert cuda_conv.last_conv_math["forward"] == "fp32"
    with cuda_conv.use_conv_algorithm("im2col"):
        gF.conv2d(x.detach(), w.detach())
    assert cuda_conv.last_conv_math["forward"] == "fp32"


def test_half_convolutions_run_on_the_tensor_cores_and_keep_their_dtype():
    xs, wsh = (2, 3, 7, 7), (5, 3, 3, 3)
    geom_args = (1, 1, 1, 1)
    x0, w0, b0 = rand(xs, 50), rand(wsh, 51), rand(5, 52)
    x, w, b = x0.astype(np.float16), w0.astype(np.float16), b0.astype(np.float16)
    cuda_conv.reset_conv_log()
    y = cuda_conv.conv2d(x, w, b, *geom_args)
    assert y.dtype == np.float16 and cuda_conv.last_conv_math["forward"] == "f16"
    ref = conv_ref(x.astype(np.float64), w.astype(np.float64), (1, 1), (1, 1), (1, 1), 1)[0] \
        + b.astype(np.float64).reshape(1, -1, 1, 1)
    # one rounding to float16 of the fp32 accumulators
    np.testing.assert_allclose(y.astype(np.float64), ref, rtol=2.0 ** -10, atol=2.0 ** -14)
    gy = rand(y.shape, 53).astype(np.float16)
    gx = cuda_conv.conv2d_backward_input(gy, w, x.shape, 1, 1, 1, 1)
    gw = cuda_conv.conv2d_backward_weight(gy, x, w.shape, 1, 1, 1, 1)
    assert gx.dtype == gw.dtype == np.float16
    assert cuda_conv.last_conv_math == {"forward": "f16", "backward_input": "f16",
                                        "backward_weight": "f16"}
    # mixed float16 / float32: declined (the op's reference promotes)
    assert cuda_conv.conv2d(x, w0, None, *geom_args) is None


def test_bfloat16_arrays_use_the_bf16_kernels():
    ml_dtypes = pytest.importorskip("ml_dtypes")
    bf16 = ml_dtypes.bfloat16
    x0, w0 = rand((1, 2, 5, 5), 60), rand((3, 2, 3, 3), 61)
    x, w = x0.astype(bf16), w0.astype(bf16)
    y = cuda_conv.conv2d(x, w, None, 1, 0, 1, 1)
    assert y.dtype == bf16 and cuda_conv.last_conv_math["forward"] == "bf16"
    ref = conv_ref(x.astype(np.float64), w.astype(np.float64), (1, 1), (0, 0), (1, 1), 1)[0]
    np.testing.assert_allclose(y.astype(np.float64), ref, rtol=2.0 ** -7, atol=1e-6)
    c = tc.matmul(x0[0, 0].astype(bf16), x0[0, 1, :, :3].astype(bf16))
    assert c.dtype == bf16 and tc.last_precision["matmul"] == "bf16"


def test_matmul_allow_tf32_gates_the_linear_gemm():
    import gpudiff
    import gpudiff.nn.functional as gF
    settings = gpudiff.backends.cuda.matmul
    assert settings.allow_tf32 is False  # PyTorch's default
    x0, w0 = rand((9, 20), 70), rand((7, 20), 71)
    x = gpudiff.tensor(x0, device="cuda")
    w = gpudiff.tensor(w0, device="cuda")
    assert tc.matmul(x0, w0.T) is None      # off: the xp.matmul FP32 path
    exact = x0.astype(np.float64) @ w0.T.astype(np.float64)
    np.testing.assert_allclose(gF.linear(x, w).cpu().numpy(), exact, rtol=1e-5, atol=1e-5)
    try:
        settings.allow_tf32 = True
        assert tc.matmul_allow_tf32 is True
        tc.last_precision.clear()
        y = gF.linear(x, w).cpu().numpy()
        assert tc.last_precision["matmul"] == "tf32"
        xv, wv = tc.round_tf32(x0).astype(np.float64), tc.round_tf32(w0).astype(np.float64)
        check(y, xv @ wv.T, np.abs(xv) @ np.abs(wv.T), 20, "linear TF32")
        assert np.abs(y - exact).max() > 1e-4
    finally:
        settings.allow_tf32 = False
    # float16 2-D matmuls use the FP16 GEMM whatever the TF32 switch says
    h = tc.matmul(x0.astype(np.float16), w0.T.astype(np.float16))
    assert h.dtype == np.float16 and tc.last_precision["matmul"] == "f16"
    assert tc.matmul(x0.astype(np.float64), w0.T.astype(np.float64)) is None  # float64: not ours
    assert tc.matmul(x0[None], w0.T) is None                                 # 3-D: xp.matmul


# ---- compiled for the GPU ----------------------------------------------------------------------
def test_nvrtc_emits_the_mma_instructions():
    from nvrtc_util import NVRTC, find_libnvrtc
    path = find_libnvrtc()
    if path is None:
        pytest.skip("libnvrtc not found: install the nvidia-cuda-nvrtc wheel")
    names = cuda_launch.name_expressions("tensor_core.cu")
    assert len(names) == 18
    ptx, _, _ = NVRTC(path).compile(
        cuda_launch.module_source("tensor_core.cu"), "tensor_core.cu",
        ("--gpu-architecture=compute_80",) + cuda_launch.NVRTC_OPTIONS, names)
    for instr in ("mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32",
                  "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32",
                  "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32",
                  "cvt.rna.tf32.f32"):
        assert instr in ptx, instr
    # 16 mma a main-loop step per kernel (2 x 4 tiles x 2 k-steps), unrolled
    assert ptx.count("mma.sync.aligned") == 16 * len(names)
    assert "trap" not in ptx


def test_the_resource_report_lists_the_tensor_core_kernels_without_spills():
    with open(os.path.join(ROOT, "bench", "results", "cuda_resources.json")) as f:
        report = json.load(f)
    rows = {r["kernel"]: r for r in report["kernels"] if r["file"] == "tensor_core.cu"}
    expected = {re.sub(r"\s+", " ", n) for n in cuda_launch.name_expressions("tensor_core.cu")}
    assert set(rows) == expected
    for name, r in rows.items():
        assert r["spill_stores"] == 0 and r["spill_loads"] == 0, name
        assert r["occupancy"]["128"] > 0, name
