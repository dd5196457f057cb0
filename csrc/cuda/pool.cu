// 2-D pooling over (N*C planes, H, W), forward and backward, with PyTorch's rules (the same
// as csrc/cpu/pool.cpp, which the tests compare against):
//
//   max pool     the saved index is the flat ih*W + iw of the max inside its plane; ties go
//                to the first tap in row-major window order; a NaN wins; a window of only
//                -inf keeps -inf with the index of its first in-range tap
//   avg pool     the window clipped to [-P, in + P) gives the count_include_pad divisor, then
//                clipped to the input for the sum and the exclusive divisor;
//                divisor_override (> 0) replaces both
//   adaptive     output o of O over an input of I covers [floor(o*I/O), ceil((o+1)*I/O))
//
// Forward: one thread per output, consecutive threads along ow (coalesced stores; the loads
// of a warp cover consecutive input columns).
// Backward: one thread per input element gathers the outputs whose windows cover it, in
// ascending output order: no atomics, bitwise reproducible, and the same summation order as
// the CPU kernels' scatter. Candidate outputs along one dimension come from candidates():
//   mode 0 (fixed window: span = (k-1)*dilation, stride s, padding p)
//          o*s - p <= i <= o*s - p + span  <=>  ceil((i + p - span)/s) <= o <= floor((i + p)/s)
//   mode 1 (adaptive) floor(i*O/I) <= o <= ceil((i+1)*O/I) - 1
//   mode 2 (unknown geometry) every o
// A max-pool candidate contributes when its saved index is this element, so a superset of
// the covering windows is enough.
#include "common.cuh"

namespace pool {

__device__ __forceinline__ long long first_index() {
    return (long long)blockIdx.x * blockDim.x + threadIdx.x;
}
__device__ __forceinline__ long long grid_stride() { return (long long)gridDim.x * blockDim.x; }

// floor(a / b) for b > 0 and any sign of a
__device__ __forceinline__ int floor_div(int a, int b) {
    return a >= 0 ? a / b : -((-a + b - 1) / b);
}

// Outputs [lo, hi] (inclusive; empty when lo > hi) whose window may cover input i.
__device__ __forceinline__ void candidates(int i, int I, int O, int mode, int span, int s, int p,
                                           int& lo, int& hi) {
    if (mode == 0) {
        lo = max(0, -floor_div(-(i + p - span), s));  // ceil
        hi = min(O - 1, floor_div(i + p, s));
    } else if (mode == 1) {
        lo = (int)((long long)i * O / I);
        hi = (int)(((long long)(i + 1) * O + I - 1) / I) - 1;
        hi = min(O - 1, hi);
    } else {
        lo = 0;
        hi = O - 1;
    }
}

// Taps t in [lo, hi) of a window starting at `start` with step d and k taps that land
// inside [0, n).
__device__ __forceinline__ void tap_range(int start, int d, int k, int n, int& lo, int& hi) {
    lo = start >= 0 ? 0 : (-start + d - 1) / d;
    const int last = n - 1 - start;  // t*d <= last
    hi = last < 0 ? 0 : min(k, last / d + 1);
}

// Max over the taps h = h0 + a*dh (a < nh), w = w0 + b*dw (b < nw) of one plane, all
// inside it. Returns the max; `at` gets its flat index (first in-range tap if none wins).
template <typename T>
__device__ __forceinline__ T window_max(gptr<const T> x, long long plane, int W, int h0, int dh,
                                        int nh, int w0, int dw, int nw, long long& at) {
    T m = gd::Limits<T>::neg_inf();
    long long best = -1;
    for (int a = 0; a < nh; ++a) {
        const int h = h0 + a * dh;
        for (int b = 0; b < nw; ++b) {
            const int w = w0 + b * dw;
            const T v = x[plane + (long long)h * W + w];
            if (v > m || v != v) {  // strict: the first of equal maxima; a NaN always wins
                m = v;
                best = (long long)h * W + w;
            }
        }
    }
    at = best >= 0 ? best : (long long)h0 * W + w0;
    return m;
}

// Two adjacent elements in one load (8 bytes for float, 16 for double).
template <typename T> struct PairOf;
template <> struct PairOf<float> { using type = float2; };
template <> struct PairOf<double> { using type = double2; };

// Windows exactly two wide and two apart, starting at even columns of even-width rows
// (2x2 stride-2 pooling, the common case): each window row is one aligned pair load, so a
// warp's loads are contiguous (one float every 8 bytes would waste half of every sector).
template <typename T>
__device__ __forceinline__ bool pair_windows(gptr<const T> x, int W, int KW, int SW, int PW,
                                             int DW) {
    return KW == 2 && SW == 2 && DW == 1 && PW == 0 && W % 2 == 0 &&
           gd::address_of(x) % sizeof(typename PairOf<T>::type) == 0;
}

// max over rows h0 + a*dh (a < nh) of the pair at column w0 (even)
template <typename T>
__device__ __forceinline__ T pair_window_max(gptr<const T> x, long long plane, int W, int h0,
                                             int dh, int nh, int w0, long long& at) {
    using P = typename PairOf<T>::type;
    gptr<const P> xp = gd::gptr_cast<const P>(x);
    T m = gd::Limits<T>::neg_inf();
    long long best = -1;
    for (int a = 0; a < nh; ++a) {
        const long long row = (long long)(h0 + a * dh) * W + w0;
        const P v = xp[(plane + row) / 2];
        if (v.x > m || v.x != v.x) {
            m = v.x;
            best = row;
        }
        if (v.y > m || v.y != v.y) {
            m = v.y;
            best = row + 1;
        }
    }
    at = best >= 0 ? best : (long long)h0 * W + w0;
    return m;
}

}  // namespace pool

// x (NC, H, W) -> y, idx (NC, OH, OW); idx int64 flat h*W + w within the plane
template <typename T>
__global__ void max_pool2d_fwd(gptr<const T> x, gptr<T> y, gptr<long long> idx, long long NC,
                               int H, int W, int OH, int OW, int KH, int KW, int SH, int SW,
                               int PH, int PW, int DH, int DW) {
    const long long total = NC * OH * OW;
    const bool pairs = pool::pair_windows(x, W, KW, SW, PW, DW);  // uniform
    for (long long e = pool::first_index(); e < total; e += pool::grid_stride()) {
        const int ow = (int)(e % OW);
        const long long t = e / OW;
        const int oh = (int)(t % OH);
        const long long plane = (t / OH) * H * W;
        const int hs = oh * SH - PH, ws = ow * SW - PW;
        int ilo, ihi, jlo, jhi;
        pool::tap_range(hs, DH, KH, H, ilo, ihi);
        pool::tap_range(ws, DW, KW, W, jlo, jhi);
        long long at;
        if (pairs && jhi - jlo == 2)
            y[e] = pool::pair_window_max(x, plane, W, hs + ilo * DH, DH, ihi - ilo, ws, at);
        else
            y[e] = pool::window_max(x, plane, W, hs + ilo * DH, DH, ihi - ilo, ws + jlo * DW,
                                    DW, jhi - jlo, at);
        idx[e] = at;
    }
}

// x (NC, H, W) -> y, idx (NC, OH, OW), adaptive windows
template <typename T>
__global__ void adaptive_max_pool2d_fwd(gptr<const T> x, gptr<T> y, gptr<long long> idx,
                                        long long NC, int H, int W, int OH, int OW) {
    const long long total = NC * OH * OW;
    for (long long e = pool::first_index(); e < total; e += pool::grid_stride()) {
        const int ow = (int)(e % OW);
        const long long t = e / OW;
        const int oh = (int)(t % OH);
        const long long plane = (t / OH) * H * W;
        const int h0 = (int)((long long)oh * H / OH);
        const int h1 = (int)(((long long)(oh + 1) * H + OH - 1) / OH);
        const int w0 = (int)((long long)ow * W / OW);
        const int w1 = (int)(((long long)(ow + 1) * W + OW - 1) / OW);
        long long at;
        y[e] = pool::window_max(x, plane, W, h0, 1, h1 - h0, w0, 1, w1 - w0, at);
        idx[e] = at;
    }
}

// gy, idx (NC, OH, OW) -> gx (NC, H, W): gx[i] = sum of gy[o] over outputs o whose saved
// index is i. mode / span / stride / padding per dimension: see candidates() above.
template <typename T>
__global__ void max_pool2d_bwd(gptr<const T> gy, gptr<const long long> idx, gptr<T> gx,
                               long long NC, int H, int W, int OH, int OW, int mode, int span_h,
                               int SH, int PH, int span_w, int SW, int PW) {
    const long long total = NC * H * W;
    for (long long e = pool::first_index(); e < total; e += pool::grid_stride()) {
        const int iw = (int)(e % W);
        const long long t = e / W;
        const int ih = (int)(t % H);
        const long long oplane = (t / H) * OH * OW;
        const long long me = (long long)ih * W + iw;
        int hlo, hhi, wlo, whi;
        pool::candidates(ih, H, OH, mode, span_h, SH, PH, hlo, hhi);
        pool::candidates(iw, W, OW, mode, span_w, SW, PW, wlo, whi);
        T s = T(0);
        for (int oh = hlo; oh <= hhi; ++oh)
            for (int ow = wlo; ow <= whi; ++ow) {
                const long long o = oplane + (long long)oh * OW + ow;
                if (idx[o] == me) s += gy[o];
            }
        gx[e] = s;
    }
}

namespace pool {

// The average-pool window of output (oh, ow): clipped bounds and 1 / divisor.
template <typename T>
struct AvgWindow {
    int h0, h1, w0, w1;
    T scale;
    __device__ __forceinline__ AvgWindow(int oh, int ow, int H, int W, int KH, int KW, int SH,
                                         int SW, int PH, int PW, int count_include_pad,
                                         long long divisor_override) {
        h0 = oh * SH - PH;
        w0 = ow * SW - PW;
        h1 = min(h0 + KH, H + PH);
        w1 = min(w0 + KW, W + PW);
        const long long pool_size = (long long)(h1 - h0) * (w1 - w0);
        h0 = max(h0, 0);
        w0 = max(w0, 0);
        h1 = min(h1, H);
        w1 = min(w1, W);
        const long long div = divisor_override > 0 ? divisor_override
                              : count_include_pad  ? pool_size
                                                   : (long long)(h1 - h0) * (w1 - w0);
        scale = (h0 >= h1 || w0 >= w1 || div == 0) ? T(0) : T(1) / T(div);
    }
};

}  // namespace pool

// x (NC, H, W) -> y (NC, OH, OW)
template <typename T>
__global__ void avg_pool2d_fwd(gptr<const T> x, gptr<T> y, long long NC, int H, int W, int OH,
                               int OW, int KH, int KW, int SH, int SW, int PH, int PW,
                               int count_include_pad, long long divisor_override) {
    const long long total = NC * OH * OW;
    for (long long e = pool::first_index(); e < total; e += pool::grid_stride()) {
        const int ow = (int)(e % OW);
        const long long t = e / OW;
        const int oh = (int)(t % OH);
        const long long plane = (t / OH) * H * W;
        const pool::AvgWindow<T> win(oh, ow, H, W, KH, KW, SH, SW, PH, PW, count_include_pad,
                                     divisor_override);
        T s = T(0);
        for (int h = win.h0; h < win.h1; ++h)
            for (int w = win.w0; w < win.w1; ++w) s += x[plane + (long long)h * W + w];
        y[e] = s * win.scale;
    }
}

// The same for windows two wide and two apart (KW = SW = 2, PW = 0, W even, x 8/16-byte
// aligned: the 2x2 stride-2 pooling of LeNet), which the wrapper routes here: every window
// row is one aligned pair load, and *two lanes share an output*, the even lane loading the
// window's even rows, the odd lane its odd rows. A warp's 16 outputs along a plane row then
// load both input rows they cover in one request: contiguous bytes, where a lane per output
// would load every other input row (a gap in every request: 65% sector efficiency on 10-wide
// planes). The odd lane hands its pair to the even one, which sums in the same row-major
// order as avg_pool2d_fwd (bitwise the same result) and stores.
// blockDim.x a multiple of 32; every lane of a warp runs the same iterations (shuffles).
template <typename T>
__global__ void avg_pool2d_fwd_pairs(gptr<const T> x, gptr<T> y, long long NC, int H, int W,
                                     int OH, int OW, int KH, int SH, int PH,
                                     int count_include_pad, long long divisor_override) {
    using P = typename pool::PairOf<T>::type;
    gptr<const P> xp = gd::gptr_cast<const P>(x);  // (NC, H, W / 2) pairs
    const long long total = NC * OH * OW;
    const int lane = threadIdx.x & 31, odd = lane & 1;
    const long long warp_first =  // first output of this warp's 16
        ((long long)blockIdx.x * blockDim.x + (threadIdx.x & ~31u)) / 2;
    const long long step = (long long)gridDim.x * blockDim.x / 2;
    for (long long e0 = warp_first; e0 < total; e0 += step) {  // uniform over the warp
        const long long e = e0 + lane / 2;
        const bool valid = e < total;
        const int ow = (int)(e % OW);
        const long long t = e / OW;
        const int oh = (int)(t % OH);
        const long long plane = (t / OH) * H * W;
        const pool::AvgWindow<T> win(oh, ow, H, W, KH, 2, SH, 2, PH, 0, count_include_pad,
                                     divisor_override);
        const int nh = valid ? win.h1 - win.h0 : 0;
        T s = T(0);
        for (int k = 0; k < KH; k += 2) {  // KH is uniform: every lane meets every shuffle
            P v;
            v.x = v.y = T(0);
            if (k + odd < nh) v = xp[(plane + (long long)(win.h0 + k + odd) * W + win.w0) / 2];
            const T ox = __shfl_xor_sync(gd::FULL_MASK, v.x, 1);  // the odd row's pair
            const T oy = __shfl_xor_sync(gd::FULL_MASK, v.y, 1);
            if (k < nh) {
                s += v.x;
                s += v.y;
            }
            if (k + 1 < nh) {
                s += ox;
                s += oy;
            }
        }
        if (valid && !odd) y[e] = s * win.scale;
    }
}

// gy (NC, OH, OW) -> gx (NC, H, W): each input sums gy * scale over the windows covering it
template <typename T>
__global__ void avg_pool2d_bwd(gptr<const T> gy, gptr<T> gx, long long NC, int H, int W, int OH,
                               int OW, int KH, int KW, int SH, int SW, int PH, int PW,
                               int count_include_pad, long long divisor_override) {
    const long long total = NC * H * W;
    for (long long e = pool::first_index(); e < total; e += pool::grid_stride()) {
        const int iw = (int)(e % W);
        const long long t = e / W;
        const int ih = (int)(t % H);
        const long long oplane = (t / H) * OH * OW;
        int hlo, hhi, wlo, whi;
        pool::candidates(ih, H, OH, 0, KH - 1, SH, PH, hlo, hhi);
        pool::candidates(iw, W, OW, 0, KW - 1, SW, PW, wlo, whi);
        T s = T(0);
        for (int oh = hlo; oh <= hhi; ++oh)
            for (int ow = wlo; ow <= whi; ++ow) {
                const pool::AvgWindow<T> win(oh, ow, H, W, KH, KW, SH, SW, PH, PW,
                                             count_include_pad, divisor_override);
                // the clipped window may stop short of a tap its span reaches (ceil_mode)
                if (ih < win.h0 || ih >= win.h1 || iw < win.w0 || iw >= win.w1) continue;
                s += gy[oplane + (long long)oh * OW + ow] * win.scale;
            }
        gx[e] = s;
    }
}

// x (NC, H, W) -> y (NC, OH, OW): mean over adaptive windows
template <typename T>
__global__ void adaptive_avg_pool2d_fwd(gptr<const T> x, gptr<T> y, long long NC, int H, int W,
                                        int OH, int OW) {
    const long long total = NC * OH * OW;
    for (long long e = pool::first_index(); e < total; e += pool::grid_stride()) {
        const int ow = (int)(e % OW);
        const long long t = e / OW;
        const int oh = (int)(t % OH);
        const long long plane = (t / OH) * H * W;
        const int h0 = (int)((long long)oh * H / OH);
        const int h1 = (int)(((long long)(oh + 1) * H + OH - 1) / OH);
        const int w0 = (int)((long long)ow * W / OW);
        const int w1 = (int)(((long long)(ow + 1) * W + OW - 1) / OW);
        T s = T(0);
        for (int h = h0; h < h1; ++h)
            for (int w = w0; w < w1; ++w) s += x[plane + (long long)h * W + w];
        y[e] = s / T((h1 - h0) * (w1 - w0));
    }
}

// The same for large windows (global average pooling: 8x8 -> 1x1): a warp per output, the
// lanes striding over the window (coalesced along its rows) and a fixed butterfly sum.
// blockDim (32, R); warps grid-strided over the outputs.
template <typename T>
__global__ void adaptive_avg_pool2d_fwd_warp(gptr<const T> x, gptr<T> y, long long NC, int H,
                                             int W, int OH, int OW) {
    const long long total = NC * OH * OW;
    const int lane = threadIdx.x;
    for (long long e = (long long)blockIdx.x * blockDim.y + threadIdx.y; e < total;
         e += (long long)gridDim.x * blockDim.y) {  // uniform over the warp
        const int ow = (int)(e % OW);
        const long long t = e / OW;
        const int oh = (int)(t % OH);
        const long long plane = (t / OH) * H * W;
        const int h0 = (int)((long long)oh * H / OH);
        const int h1 = (int)(((long long)(oh + 1) * H + OH - 1) / OH);
        const int w0 = (int)((long long)ow * W / OW);
        const int w1 = (int)(((long long)(ow + 1) * W + OW - 1) / OW);
        const int kw = w1 - w0, area = (h1 - h0) * kw;
        gd::Sum<T> acc = gd::Sum<T>::identity();
        for (int i = lane; i < area; i += 32) {
            const int h = h0 + i / kw, w = w0 + i % kw;
            acc.v += x[plane + (long long)h * W + w];
        }
        acc = gd::warp_allreduce(acc);
        if (lane == 0) y[e] = acc.v / T(area);
    }
}

// gy (NC, OH, OW) -> gx (NC, H, W)
template <typename T>
__global__ void adaptive_avg_pool2d_bwd(gptr<const T> gy, gptr<T> gx, long long NC, int H,
                                        int W, int OH, int OW) {
    const long long total = NC * H * W;
    for (long long e = pool::first_index(); e < total; e += pool::grid_stride()) {
        const int iw = (int)(e % W);
        const long long t = e / W;
        const int ih = (int)(t % H);
        const long long oplane = (t / H) * OH * OW;
        int hlo, hhi, wlo, whi;
        pool::candidates(ih, H, OH, 1, 0, 1, 0, hlo, hhi);
        pool::candidates(iw, W, OW, 1, 0, 1, 0, wlo, whi);
        T s = T(0);
        for (int oh = hlo; oh <= hhi; ++oh) {
            const int kh = (int)(((long long)(oh + 1) * H + OH - 1) / OH - (long long)oh * H / OH);
            for (int ow = wlo; ow <= whi; ++ow) {
                const int kw =
                    (int)(((long long)(ow + 1) * W + OW - 1) / OW - (long long)ow * W / OW);
                s += gy[oplane + (long long)oh * OW + ow] / T(kh * kw);
            }
        }
        gx[e] = s;
    }
}

GPUDIFF_KERNEL(max_pool2d_fwd<float>)
GPUDIFF_KERNEL(max_pool2d_fwd<double>)
GPUDIFF_KERNEL(adaptive_max_pool2d_fwd<float>)
GPUDIFF_KERNEL(adaptive_max_pool2d_fwd<double>)
GPUDIFF_KERNEL(max_pool2d_bwd<float>)
GPUDIFF_KERNEL(max_pool2d_bwd<double>)
GPUDIFF_KERNEL(avg_pool2d_fwd<float>)
GPUDIFF_KERNEL(avg_pool2d_fwd<double>)
GPUDIFF_KERNEL(avg_pool2d_fwd_pairs<float>)
GPUDIFF_KERNEL(avg_pool2d_fwd_pairs<double>)
GPUDIFF_KERNEL(avg_pool2d_bwd<float>)
GPUDIFF_KERNEL(avg_pool2d_bwd<double>)
GPUDIFF_KERNEL(adaptive_avg_pool2d_fwd<float>)
GPUDIFF_KERNEL(adaptive_avg_pool2d_fwd<double>)
GPUDIFF_KERNEL(adaptive_avg_pool2d_fwd_warp<float>)
GPUDIFF_KERNEL(adaptive_avg_pool2d_fwd_warp<double>)
GPUDIFF_KERNEL(adaptive_avg_pool2d_bwd<float>)
GPUDIFF_KERNEL(adaptive_avg_pool2d_bwd<double>)
