// Max and average pooling over (N, C, H, W), forward and backward, with PyTorch's rules:
//
//   output size   given by the caller (gpudiff/geometry.py pool_output_size: floor, or ceil
//                 where the last window must still start inside the input or the left
//                 padding): one place computes it for every device
//   max pool      the index saved is the flat h*W + w of the max within the (n, c) plane;
//                 ties go to the first tap in row-major window order; a NaN wins (so the
//                 result is NaN, as in PyTorch)
//   avg pool      window clipped to [-p, in + p) gives the count_include_pad divisor, then
//                 clipped to the input for the sum and the exclusive divisor;
//                 divisor_override (> 0) replaces both
//
// Work splits over the N*C planes: no two threads write the same plane.
#include "common.h"
#include "kernels.h"

#include <cmath>

namespace gpudiff {
namespace {

struct PoolGeom {
    index_t H, W, kh, kw, sh, sw, ph, pw, dh, dw, OH, OW;
};

PoolGeom make_pool_geom(index_t H, index_t W, int kh, int kw, int sh, int sw, int ph, int pw,
                        int dh, int dw, index_t OH, index_t OW, const char* name) {
    if (kh <= 0 || kw <= 0 || sh <= 0 || sw <= 0 || dh <= 0 || dw <= 0 || ph < 0 || pw < 0)
        throw py::value_error(std::string(name) +
                              ": kernel size, stride and dilation must be positive and "
                              "padding non-negative");
    // as PyTorch: every window then holds at least one tap of the input
    if (ph > ((kh - 1) * dh + 1) / 2 || pw > ((kw - 1) * dw + 1) / 2)
        throw py::value_error(std::string(name) +
                              ": pad should be at most half of effective kernel size");
    PoolGeom g{H, W, kh, kw, sh, sw, ph, pw, dh, dw, OH, OW};
    if (g.OH < 1 || g.OW < 1)
        throw py::value_error(std::string(name) + ": output size is too small (" +
                              std::to_string(g.OH) + "x" + std::to_string(g.OW) + ")");
    return g;
}

// Taps t = 0..k-1 of a window starting at `start` (step d) that land in [0, n):
// [lo, hi) of t. Empty (lo >= hi) when the whole window is padding.
inline void tap_range(index_t start, index_t d, index_t k, index_t n, index_t& lo, index_t& hi) {
    lo = start >= 0 ? 0 : (-start + d - 1) / d;
    index_t last = n - 1 - start;  // t*d <= last
    hi = last < 0 ? 0 : std::min<index_t>(k, last / d + 1);
}

// One (n, c) plane. Taps are visited in row-major window order, as PyTorch does, but
// with the output column as the inner loop: the update is a branch-free select that the
// compiler vectorises, and random data costs no branch mispredictions.
// One output of the max pool, any geometry: taps in row-major window order, as PyTorch.
template <typename T>
inline void max_pool_one(const T* x, const PoolGeom& g, index_t oh, index_t ow, T& best,
                         int64_t& best_i) {
    const index_t hs = oh * g.sh - g.ph, ws = ow * g.sw - g.pw;
    index_t ilo, ihi, jlo, jhi;
    tap_range(hs, g.dh, g.kh, g.H, ilo, ihi);
    tap_range(ws, g.dw, g.kw, g.W, jlo, jhi);
    // PyTorch starts from the first in-range tap with value -inf
    best_i = (hs + ilo * g.dh) * g.W + (ws + jlo * g.dw);
    best = -std::numeric_limits<T>::infinity();
    for (index_t i = ilo; i < ihi; ++i) {
        const index_t rowoff = (hs + i * g.dh) * g.W;
        for (index_t j = jlo; j < jhi; ++j) {
            const index_t at = rowoff + ws + j * g.dw;
            const T v = x[at];
            if (v > best || v != v) {  // strict '>': ties keep the first; a NaN wins
                best = v;
                best_i = at;
            }
        }
    }
}

// Outputs [ow0, ow1) of row oh whose K x K windows (dilation 1) lie inside the input.
// With K known at compile time the window loops unroll and the loop over ow vectorises
// into branch-free selects.
template <typename T, int K>
inline void max_pool_row_inside(const T* __restrict x, T* __restrict yr, int64_t* __restrict ir,
                                index_t W, index_t hs, index_t sw, index_t pw, index_t ow0,
                                index_t ow1) {
    for (index_t ow = ow0; ow < ow1; ++ow) {
        const index_t first = hs * W + ow * sw - pw;
        T best = -std::numeric_limits<T>::infinity();
        int64_t bi = first;
        for (int i = 0; i < K; ++i)
            for (int j = 0; j < K; ++j) {
                const index_t at = first + i * W + j;
                const T v = x[at];
                const bool take = (v > best) | (v != v);
                best = take ? v : best;
                bi = take ? at : bi;
            }
        yr[ow] = best;
        ir[ow] = bi;
    }
}

// One (n, c) plane. Interior windows of the common 2x2 and 3x3 (dilation 1) pools take the
// unrolled path; borders, padding, dilation and other sizes the general one.
template <typename T>
GPUDIFF_CLONES void max_pool_plane(const T* __restrict x, T* __restrict y,
                                   int64_t* __restrict idx, const PoolGeom& g) {
    const index_t OH = g.OH, OW = g.OW, W = g.W;
    const int K = (g.kh == g.kw && g.dh == 1 && g.dw == 1 && (g.kh == 2 || g.kh == 3))
                      ? int(g.kh) : 0;
    // outputs whose window lies inside the input: o*s - p >= 0 and o*s - p + k - 1 <= n - 1
    index_t oh0 = 0, oh1 = 0, ow0 = 0, ow1 = 0;
    if (K) {
        output_range(-g.ph, g.sh, g.H - K + 1, OH, oh0, oh1);
        output_range(-g.pw, g.sw, W - K + 1, OW, ow0, ow1);
    }
    for (index_t oh = 0; oh < OH; ++oh) {
        T* yr = y + oh * OW;
        int64_t* ir = idx + oh * OW;
        const bool inside_row = K && oh >= oh0 && oh < oh1 && ow1 > ow0;
        const index_t a = inside_row ? ow0 : OW, b = inside_row ? ow1 : OW;
        for (index_t ow = 0; ow < a; ++ow) max_pool_one(x, g, oh, ow, yr[ow], ir[ow]);
        if (inside_row) {
            const index_t hs = oh * g.sh - g.ph;
            if (K == 2)
                max_pool_row_inside<T, 2>(x, yr, ir, W, hs, g.sw, g.pw, a, b);
            else
                max_pool_row_inside<T, 3>(x, yr, ir, W, hs, g.sw, g.pw, a, b);
        }
        for (index_t ow = b; ow < OW; ++ow) max_pool_one(x, g, oh, ow, yr[ow], ir[ow]);
    }
}

template <typename T>
void avg_pool_window(const PoolGeom& g, bool count_include_pad, int64_t divisor_override,
                     index_t oh, index_t ow, index_t& h0, index_t& h1, index_t& w0, index_t& w1,
                     T& scale) {
    h0 = oh * g.sh - g.ph;
    w0 = ow * g.sw - g.pw;
    h1 = std::min(h0 + g.kh, g.H + g.ph);
    w1 = std::min(w0 + g.kw, g.W + g.pw);
    const index_t pool_size = (h1 - h0) * (w1 - w0);
    h0 = std::max<index_t>(h0, 0);
    w0 = std::max<index_t>(w0, 0);
    h1 = std::min(h1, g.H);
    w1 = std::min(w1, g.W);
    index_t div;
    if (divisor_override > 0)
        div = divisor_override;
    else if (count_include_pad)
        div = pool_size;
    else
        div = (h1 - h0) * (w1 - w0);
    scale = (h0 >= h1 || w0 >= w1 || div == 0) ? T(0) : T(1) / T(div);
}

// Outputs [ow0, ow1) of row oh whose K x K windows lie inside the input: a plain sum times
// a constant scale, unrolled and vectorised over ow.
template <typename T, int K>
inline void avg_pool_row_inside(const T* __restrict x, T* __restrict yr, index_t W, index_t hs,
                                index_t sw, index_t pw, index_t ow0, index_t ow1, T scale) {
    for (index_t ow = ow0; ow < ow1; ++ow) {
        const index_t first = hs * W + ow * sw - pw;
        T s = 0;
        for (int i = 0; i < K; ++i)
            for (int j = 0; j < K; ++j) s += x[first + i * W + j];
        yr[ow] = s * scale;
    }
}

template <typename T>
GPUDIFF_CLONES void avg_pool_plane(const T* x, T* y, const PoolGeom& g, bool cip, int64_t dov) {
    const index_t OW = g.OW, W = g.W;
    const int K = (g.kh == g.kw && (g.kh == 2 || g.kh == 3)) ? int(g.kh) : 0;
    index_t oh0 = 0, oh1 = 0, ow0 = 0, ow1 = 0;
    if (K) {  // windows wholly inside: divisor K*K (or the override) either way
        output_range(-g.ph, g.sh, g.H - K + 1, g.OH, oh0, oh1);
        output_range(-g.pw, g.sw, W - K + 1, OW, ow0, ow1);
    }
    const T inside_scale = T(1) / T(dov > 0 ? dov : K * K);
    for (index_t oh = 0; oh < g.OH; ++oh) {
        T* yr = y + oh * OW;
        const bool inside_row = K && oh >= oh0 && oh < oh1 && ow1 > ow0;
        const index_t a = inside_row ? ow0 : OW, b = inside_row ? ow1 : OW;
        auto general = [&](index_t ow) {
            index_t h0, h1, w0, w1;
            T scale;
            avg_pool_window<T>(g, cip, dov, oh, ow, h0, h1, w0, w1, scale);
            T sum = 0;
            for (index_t h = h0; h < h1; ++h)
                for (index_t w = w0; w < w1; ++w) sum += x[h * W + w];
            yr[ow] = sum * scale;
        };
        for (index_t ow = 0; ow < a; ++ow) general(ow);
        if (inside_row) {
            const index_t hs = oh * g.sh - g.ph;
            if (K == 2)
                avg_pool_row_inside<T, 2>(x, yr, W, hs, g.sw, g.pw, a, b, inside_scale);
            else
                avg_pool_row_inside<T, 3>(x, yr, W, hs, g.sw, g.pw, a, b, inside_scale);
        }
        for (index_t ow = b; ow < OW; ++ow) general(ow);
    }
}

template <typename T>
GPUDIFF_CLONES void avg_pool_backward_plane(const T* gy, T* gx, const PoolGeom& g, bool cip,
                                            int64_t dov) {
    const index_t OW = g.OW, W = g.W;
    // Non-overlapping windows (stride = kernel) without padding: every input gets at most
    // one output's share. Whole windows take a constant scale and plain stores.
    if (g.sh == g.kh && g.sw == g.kw && g.ph == 0 && g.pw == 0) {
        std::fill(gx, gx + g.H * W, T(0));
        const index_t kh = g.kh, kw = g.kw;
        const index_t full_h = std::min(g.OH, g.H / kh), full_w = std::min(OW, W / kw);
        const T s = T(1) / T(dov > 0 ? dov : kh * kw);
        for (index_t oh = 0; oh < g.OH; ++oh) {
            const T* gr = gy + oh * OW;
            index_t ow = 0;
            if (oh < full_h) {
                for (index_t i = 0; i < kh; ++i) {
                    T* xr = gx + (oh * kh + i) * W;
                    if (kw == 2)
                        for (index_t o = 0; o < full_w; ++o) xr[2 * o] = xr[2 * o + 1] = gr[o] * s;
                    else
                        for (index_t o = 0; o < full_w; ++o)
                            for (index_t j = 0; j < kw; ++j) xr[o * kw + j] = gr[o] * s;
                }
                ow = full_w;
            }
            for (; ow < OW; ++ow) {  // windows clipped by the edge (ceil mode)
                index_t h0, h1, w0, w1;
                T scale;
                avg_pool_window<T>(g, cip, dov, oh, ow, h0, h1, w0, w1, scale);
                const T v = gr[ow] * scale;
                for (index_t h = h0; h < h1; ++h)
                    for (index_t w = w0; w < w1; ++w) gx[h * W + w] = v;
            }
        }
        return;
    }
    std::fill(gx, gx + g.H * W, T(0));
    for (index_t oh = 0; oh < g.OH; ++oh) {
        for (index_t ow = 0; ow < OW; ++ow) {
            index_t h0, h1, w0, w1;
            T scale;
            avg_pool_window<T>(g, cip, dov, oh, ow, h0, h1, w0, w1, scale);
            const T v = gy[oh * OW + ow] * scale;
            for (index_t h = h0; h < h1; ++h)
                for (index_t w = w0; w < w1; ++w) gx[h * W + w] += v;
        }
    }
}

void require_pool_input(const py::array& x, const char* name) {
    require_ndim(x, 4, name, "x");
    require_contiguous(x, name, "x");
}

// PyTorch's adaptive bins: output i of n_out covers [floor(i*n/n_out), ceil((i+1)*n/n_out)).
inline index_t bin_start(index_t i, index_t n, index_t n_out) { return (i * n) / n_out; }
inline index_t bin_end(index_t i, index_t n, index_t n_out) {
    return ((i + 1) * n + n_out - 1) / n_out;
}

template <typename T>
GPUDIFF_CLONES void adaptive_avg_plane(const T* x, T* y, index_t H, index_t W, index_t OH,
                                       index_t OW) {
    for (index_t oh = 0; oh < OH; ++oh) {
        const index_t h0 = bin_start(oh, H, OH), h1 = bin_end(oh, H, OH);
        for (index_t ow = 0; ow < OW; ++ow) {
            const index_t w0 = bin_start(ow, W, OW), w1 = bin_end(ow, W, OW);
            T s = 0;
            for (index_t h = h0; h < h1; ++h)
                for (index_t w = w0; w < w1; ++w) s += x[h * W + w];
            y[oh * OW + ow] = s / T((h1 - h0) * (w1 - w0));
        }
    }
}

template <typename T>
GPUDIFF_CLONES void adaptive_avg_backward_plane(const T* gy, T* gx, index_t H, index_t W,
                                                index_t OH, index_t OW) {
    std::fill(gx, gx + H * W, T(0));
    for (index_t oh = 0; oh < OH; ++oh) {
        const index_t h0 = bin_start(oh, H, OH), h1 = bin_end(oh, H, OH);
        for (index_t ow = 0; ow < OW; ++ow) {
            const index_t w0 = bin_start(ow, W, OW), w1 = bin_end(ow, W, OW);
            const T v = gy[oh * OW + ow] / T((h1 - h0) * (w1 - w0));
            for (index_t h = h0; h < h1; ++h)
                for (index_t w = w0; w < w1; ++w) gx[h * W + w] += v;
        }
    }
}

template <typename T>
GPUDIFF_CLONES void adaptive_max_plane(const T* x, T* y, int64_t* idx, index_t H, index_t W,
                                       index_t OH, index_t OW) {
    for (index_t oh = 0; oh < OH; ++oh) {
        const index_t h0 = bin_start(oh, H, OH), h1 = bin_end(oh, H, OH);
        for (index_t ow = 0; ow < OW; ++ow) {
            const index_t w0 = bin_start(ow, W, OW), w1 = bin_end(ow, W, OW);
            T best = -std::numeric_limits<T>::infinity();
            int64_t bi = h0 * W + w0;
            for (index_t h = h0; h < h1; ++h)
                for (index_t w = w0; w < w1; ++w) {
                    const T v = x[h * W + w];
                    if (v > best || v != v) {  // ties keep the first; a NaN wins
                        best = v;
                        bi = h * W + w;
                    }
                }
            y[oh * OW + ow] = best;
            idx[oh * OW + ow] = bi;
        }
    }
}

void check_adaptive(index_t H, index_t W, int64_t OH, int64_t OW, const char* name) {
    if (OH < 1 || OW < 1 || H < 1 || W < 1)
        throw py::value_error(std::string(name) + ": input and output sizes must be positive");
}

}  // namespace

py::tuple max_pool2d(py::array x, int kh, int kw, int sh, int sw, int ph, int pw, int dh, int dw,
                     int64_t OH, int64_t OW) {
    require_pool_input(x, "max_pool2d");
    const index_t N = x.shape(0), C = x.shape(1);
    const PoolGeom g = make_pool_geom(x.shape(2), x.shape(3), kh, kw, sh, sw, ph, pw, dh, dw,
                                      OH, OW, "max_pool2d");
    return dispatch_float(x, "max_pool2d", [&](auto tag) -> py::tuple {
        using T = decltype(tag);
        auto y = empty_array<T>({N, C, g.OH, g.OW});
        auto idx = empty_array<int64_t>({N, C, g.OH, g.OW});
        const T* px = cdata_of<T>(x);
        T* py_ = y.mutable_data();
        int64_t* pi = idx.mutable_data();
        const index_t planes = N * C, in_plane = g.H * g.W, out_plane = g.OH * g.OW;
        {
            py::gil_scoped_release nogil;
#pragma omp parallel for schedule(static) if (parallel_pays(planes * in_plane))
            for (index_t p = 0; p < planes; ++p)
                max_pool_plane<T>(px + p * in_plane, py_ + p * out_plane, pi + p * out_plane, g);
        }
        return py::make_tuple(y, idx);
    });
}

py::array max_pool2d_backward(py::array gy, py::array indices, int64_t H, int64_t W) {
    require_ndim(gy, 4, "max_pool2d_backward", "gy");
    require_contiguous(gy, "max_pool2d_backward", "gy");
    require_contiguous(indices, "max_pool2d_backward", "indices");
    if (!is_native<int64_t>(indices.dtype()) || !same_shape(gy, indices))
        throw py::value_error("max_pool2d_backward: indices must be int64 with gy's shape");
    const index_t N = gy.shape(0), C = gy.shape(1), OH = gy.shape(2), OW = gy.shape(3);
    return dispatch_float(gy, "max_pool2d_backward", [&](auto tag) -> py::array {
        using T = decltype(tag);
        auto gx = empty_array<T>({N, C, H, W});
        const T* pg = cdata_of<T>(gy);
        const int64_t* pi = cdata_of<int64_t>(indices);
        T* px = gx.mutable_data();
        const index_t planes = N * C, in_plane = H * W, out_plane = OH * OW;
        bool bad = false;
        {
            py::gil_scoped_release nogil;
#pragma omp parallel for schedule(static) reduction(|| : bad) \
    if (parallel_pays(planes * (in_plane + out_plane)))
            for (index_t p = 0; p < planes; ++p) {
                T* gxp = px + p * in_plane;
                const T* gyp = pg + p * out_plane;
                const int64_t* ip = pi + p * out_plane;
                std::fill(gxp, gxp + in_plane, T(0));
                for (index_t o = 0; o < out_plane; ++o) {
                    const int64_t at = ip[o];
                    if (at < 0 || at >= in_plane) {
                        bad = true;
                        continue;
                    }
                    gxp[at] += gyp[o];  // overlapping windows can pick the same tap
                }
            }
        }
        if (bad) throw py::index_error("max_pool2d_backward: an index is outside the H*W plane");
        return gx;
    });
}

py::array avg_pool2d(py::array x, int kh, int kw, int sh, int sw, int ph, int pw, int64_t OH,
                     int64_t OW, bool count_include_pad, int64_t divisor_override) {
    require_pool_input(x, "avg_pool2d");
    const index_t N = x.shape(0), C = x.shape(1);
    const PoolGeom g = make_pool_geom(x.shape(2), x.shape(3), kh, kw, sh, sw, ph, pw, 1, 1,
                                      OH, OW, "avg_pool2d");
    return dispatch_float(x, "avg_pool2d", [&](auto tag) -> py::array {
        using T = decltype(tag);
        auto y = empty_array<T>({N, C, g.OH, g.OW});
        const T* px = cdata_of<T>(x);
        T* py_ = y.mutable_data();
        const index_t planes = N * C, in_plane = g.H * g.W, out_plane = g.OH * g.OW;
        {
            py::gil_scoped_release nogil;
#pragma omp parallel for schedule(static) if (parallel_pays(planes * in_plane))
            for (index_t p = 0; p < planes; ++p)
                avg_pool_plane<T>(px + p * in_plane, py_ + p * out_plane, g, count_include_pad,
                                  divisor_override);
        }
        return y;
    });
}

py::array avg_pool2d_backward(py::array gy, int64_t H, int64_t W, int kh, int kw, int sh, int sw,
                              int ph, int pw, bool count_include_pad,
                              int64_t divisor_override) {
    require_ndim(gy, 4, "avg_pool2d_backward", "gy");
    require_contiguous(gy, "avg_pool2d_backward", "gy");
    const index_t N = gy.shape(0), C = gy.shape(1);
    // the output size is gy's (the caller checked it against the geometry)
    const PoolGeom g = make_pool_geom(H, W, kh, kw, sh, sw, ph, pw, 1, 1, gy.shape(2),
                                      gy.shape(3), "avg_pool2d_backward");
    return dispatch_float(gy, "avg_pool2d_backward", [&](auto tag) -> py::array {
        using T = decltype(tag);
        auto gx = empty_array<T>({N, C, H, W});
        const T* pg = cdata_of<T>(gy);
        T* px = gx.mutable_data();
        const index_t planes = N * C, in_plane = H * W, out_plane = g.OH * g.OW;
        {
            py::gil_scoped_release nogil;
#pragma omp parallel for schedule(static) if (parallel_pays(planes * in_plane))
            for (index_t p = 0; p < planes; ++p)
                avg_pool_backward_plane<T>(pg + p * out_plane, px + p * in_plane, g,
                                           count_include_pad, divisor_override);
        }
        return gx;
    });
}

py::array adaptive_avg_pool2d(py::array x, int64_t OH, int64_t OW) {
    require_pool_input(x, "adaptive_avg_pool2d");
    const index_t N = x.shape(0), C = x.shape(1), H = x.shape(2), W = x.shape(3);
    check_adaptive(H, W, OH, OW, "adaptive_avg_pool2d");
    return dispatch_float(x, "adaptive_avg_pool2d", [&](auto tag) -> py::array {
        using T = decltype(tag);
        auto y = empty_array<T>({N, C, OH, OW});
        const T* px = cdata_of<T>(x);
        T* py_ = y.mutable_data();
        const index_t planes = N * C;
        {
            py::gil_scoped_release nogil;
#pragma omp parallel for schedule(static) if (parallel_pays(planes * H * W))
            for (index_t p = 0; p < planes; ++p)
                adaptive_avg_plane<T>(px + p * H * W, py_ + p * OH * OW, H, W, OH, OW);
        }
        return y;
    });
}

py::array adaptive_avg_pool2d_backward(py::array gy, int64_t H, int64_t W) {
    require_ndim(gy, 4, "adaptive_avg_pool2d_backward", "gy");
    require_contiguous(gy, "adaptive_avg_pool2d_backward", "gy");
    const index_t N = gy.shape(0), C = gy.shape(1), OH = gy.shape(2), OW = gy.shape(3);
    check_adaptive(H, W, OH, OW, "adaptive_avg_pool2d_backward");
    return dispatch_float(gy, "adaptive_avg_pool2d_backward", [&](auto tag) -> py::array {
        using T = decltype(tag);
        auto gx = empty_array<T>({N, C, H, W});
        const T* pg = cdata_of<T>(gy);
        T* px = gx.mutable_data();
        const index_t planes = N * C;
        {
            py::gil_scoped_release nogil;
#pragma omp parallel for schedule(static) if (parallel_pays(planes * H * W))
            for (index_t p = 0; p < planes; ++p)
                adaptive_avg_backward_plane<T>(pg + p * OH * OW, px + p * H * W, H, W, OH, OW);
        }
        return gx;
    });
}

py::tuple adaptive_max_pool2d(py::array x, int64_t OH, int64_t OW) {
    require_pool_input(x, "adaptive_max_pool2d");
    const index_t N = x.shape(0), C = x.shape(1), H = x.shape(2), W = x.shape(3);
    check_adaptive(H, W, OH, OW, "adaptive_max_pool2d");
    return dispatch_float(x, "adaptive_max_pool2d", [&](auto tag) -> py::tuple {
        using T = decltype(tag);
        auto y = empty_array<T>({N, C, OH, OW});
        auto idx = empty_array<int64_t>({N, C, OH, OW});
        const T* px = cdata_of<T>(x);
        T* py_ = y.mutable_data();
        int64_t* pi = idx.mutable_data();
        const index_t planes = N * C;
        {
            py::gil_scoped_release nogil;
#pragma omp parallel for schedule(static) if (parallel_pays(planes * H * W))
            for (index_t p = 0; p < planes; ++p)
                adaptive_max_plane<T>(px + p * H * W, py_ + p * OH * OW, pi + p * OH * OW, H, W,
                                      OH, OW);
        }
        return py::make_tuple(y, idx);
    });
}

}  // namespace gpudiff
