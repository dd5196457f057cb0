// im2col / col2im: the unfolding that turns a convolution into a GEMM.
//
//   im2col: x (N, C, H, W) -> cols (N, C*kh*kw, OH*OW)
//           cols[n, (c*kh + i)*kw + j, oh*OW + ow] = x[n, c, oh*sh - ph + i*dh, ow*sw - pw + j*dw]
//           (0 where the tap falls in the padding)
//   col2im: the adjoint: scatters-adds cols back into x (N, C, H, W).
//
// Each (n, c) input plane owns kh*kw consecutive rows of cols, so both directions split
// over the N*C planes with no two threads writing the same memory.
#include "common.h"
#include "kernels.h"

#include <cstring>

namespace gpudiff {
namespace {

struct ConvGeom {
    index_t H, W, kh, kw, sh, sw, ph, pw, dh, dw, OH, OW;
};

// One (n, c) plane: x (H, W) -> its kh*kw rows of cols, each OH*OW long, row r at
// rows + r * row_stride.
template <typename T>
GPUDIFF_CLONES void im2col_plane(const T* x, T* rows, index_t row_stride, const ConvGeom& g) {
    for (index_t i = 0; i < g.kh; ++i) {
        for (index_t j = 0; j < g.kw; ++j) {
            T* row = rows + (i * g.kw + j) * row_stride;
            const index_t woff = j * g.dw - g.pw;
            index_t lo, hi;
            output_range(woff, g.sw, g.W, g.OW, lo, hi);
            for (index_t oh = 0; oh < g.OH; ++oh) {
                T* out = row + oh * g.OW;
                const index_t ih = oh * g.sh - g.ph + i * g.dh;
                if (ih < 0 || ih >= g.H) {
                    std::fill(out, out + g.OW, T(0));
                    continue;
                }
                const T* in = x + ih * g.W;  // in[ow*sw + woff] is the tap of column ow
                std::fill(out, out + lo, T(0));
                if (g.sw == 1) {
                    if (hi > lo) std::memcpy(out + lo, in + lo + woff, sizeof(T) * (hi - lo));
                } else {
                    for (index_t ow = lo; ow < hi; ++ow) out[ow] = in[ow * g.sw + woff];
                }
                std::fill(out + hi, out + g.OW, T(0));
            }
        }
    }
}

// One (n, c) plane: sums its kh*kw rows (row r at rows + r * row_stride) into x (H, W).
template <typename T>
GPUDIFF_CLONES void col2im_plane(const T* rows, index_t row_stride, T* x, const ConvGeom& g) {
    std::fill(x, x + g.H * g.W, T(0));
    for (index_t i = 0; i < g.kh; ++i) {
        for (index_t j = 0; j < g.kw; ++j) {
            const T* row = rows + (i * g.kw + j) * row_stride;
            const index_t woff = j * g.dw - g.pw;
            index_t lo, hi;
            output_range(woff, g.sw, g.W, g.OW, lo, hi);
            for (index_t oh = 0; oh < g.OH; ++oh) {
                const index_t ih = oh * g.sh - g.ph + i * g.dh;
                if (ih < 0 || ih >= g.H) continue;
                const T* in = row + oh * g.OW;
                T* out = x + ih * g.W;  // out[ow*sw + woff] receives column ow
                if (g.sw == 1) {
                    for (index_t ow = lo; ow < hi; ++ow) out[ow + woff] += in[ow];
                } else {
                    for (index_t ow = lo; ow < hi; ++ow) out[ow * g.sw + woff] += in[ow];
                }
            }
        }
    }
}

ConvGeom make_geom(index_t H, index_t W, int kh, int kw, int sh, int sw, int ph, int pw, int dh,
                   int dw, const char* name) {
    if (kh <= 0 || kw <= 0 || sh <= 0 || sw <= 0 || dh <= 0 || dw <= 0 || ph < 0 || pw < 0)
        throw py::value_error(std::string(name) +
                              ": kernel size, stride and dilation must be positive and "
                              "padding non-negative");
    ConvGeom g{H, W, kh, kw, sh, sw, ph, pw, dh, dw, 0, 0};
    g.OH = (H + 2 * ph - dh * (kh - 1) - 1) / sh + 1;
    g.OW = (W + 2 * pw - dw * (kw - 1) - 1) / sw + 1;
    if (H + 2 * ph - dh * (kh - 1) - 1 < 0 || W + 2 * pw - dw * (kw - 1) - 1 < 0)
        throw py::value_error(std::string(name) +
                              ": kernel size (with dilation) larger than the padded input");
    return g;
}

// All N*C planes of x (N, C, H, W) into cols, laid out (N, C*kh*kw, L) or, with
// kbl, (C*kh*kw, N, L): the layout where one GEMM covers the whole batch.
template <typename T>
void im2col_batch(const T* x, T* cols, index_t N, index_t C, const ConvGeom& g, bool kbl) {
    const index_t Kc = g.kh * g.kw, L = g.OH * g.OW, planes = N * C, in_plane = g.H * g.W;
#pragma omp parallel for schedule(static) if (parallel_pays(planes * Kc * L))
    for (index_t p = 0; p < planes; ++p) {
        const index_t n = p / C, c = p % C;
        if (kbl)
            im2col_plane<T>(x + p * in_plane, cols + (c * Kc * N + n) * L, N * L, g);
        else
            im2col_plane<T>(x + p * in_plane, cols + p * Kc * L, L, g);
    }
}

template <typename T>
void col2im_batch(const T* cols, T* x, index_t N, index_t C, const ConvGeom& g, bool kbl) {
    const index_t Kc = g.kh * g.kw, L = g.OH * g.OW, planes = N * C, in_plane = g.H * g.W;
#pragma omp parallel for schedule(static) if (parallel_pays(planes * Kc * L))
    for (index_t p = 0; p < planes; ++p) {
        const index_t n = p / C, c = p % C;
        if (kbl)
            col2im_plane<T>(cols + (c * Kc * N + n) * L, N * L, x + p * in_plane, g);
        else
            col2im_plane<T>(cols + p * Kc * L, L, x + p * in_plane, g);
    }
}

void require_room(const py::array& buf, index_t need, const char* name, const char* arg) {
    require_contiguous(buf, name, arg);
    if (buf.size() < need)
        throw py::value_error(std::string(name) + ": '" + arg + "' holds " +
                              std::to_string(buf.size()) + " elements, " +
                              std::to_string(need) + " needed");
}

}  // namespace

py::array im2col(py::array x, int kh, int kw, int sh, int sw, int ph, int pw, int dh, int dw) {
    require_ndim(x, 4, "im2col", "x");
    require_contiguous(x, "im2col", "x");
    const index_t N = x.shape(0), C = x.shape(1);
    const ConvGeom g = make_geom(x.shape(2), x.shape(3), kh, kw, sh, sw, ph, pw, dh, dw, "im2col");
    return dispatch_float(x, "im2col", [&](auto tag) -> py::array {
        using T = decltype(tag);
        auto cols = empty_array<T>({N, C * kh * kw, g.OH * g.OW});
        const T* px = cdata_of<T>(x);
        T* pc = cols.mutable_data();
        {
            py::gil_scoped_release nogil;
            im2col_batch<T>(px, pc, N, C, g, false);
        }
        return cols;
    });
}

void im2col_into(py::array x, py::array out, int kh, int kw, int sh, int sw, int ph, int pw,
                 int dh, int dw, bool kbl) {
    const char* name = "im2col_into";
    require_ndim(x, 4, name, "x");
    require_contiguous(x, name, "x");
    require_same_dtype(x, out, name);
    const index_t N = x.shape(0), C = x.shape(1);
    const ConvGeom g = make_geom(x.shape(2), x.shape(3), kh, kw, sh, sw, ph, pw, dh, dw, name);
    require_room(out, N * C * kh * kw * g.OH * g.OW, name, "out");
    dispatch_float(x, name, [&](auto tag) {
        using T = decltype(tag);
        const T* px = cdata_of<T>(x);
        T* pc = data_of<T>(out);
        py::gil_scoped_release nogil;
        im2col_batch<T>(px, pc, N, C, g, kbl);
    });
}

py::array col2im(py::array cols, int64_t C, int64_t H, int64_t W, int kh, int kw, int sh, int sw,
                 int ph, int pw, int dh, int dw) {
    require_ndim(cols, 3, "col2im", "cols");
    require_contiguous(cols, "col2im", "cols");
    const ConvGeom g = make_geom(H, W, kh, kw, sh, sw, ph, pw, dh, dw, "col2im");
    const index_t N = cols.shape(0);
    if (cols.shape(1) != C * kh * kw || cols.shape(2) != g.OH * g.OW)
        throw py::value_error("col2im: cols has shape inconsistent with (C, H, W) and the "
                              "kernel geometry");
    return dispatch_float(cols, "col2im", [&](auto tag) -> py::array {
        using T = decltype(tag);
        auto x = empty_array<T>({N, C, H, W});
        const T* pc = cdata_of<T>(cols);
        T* px = x.mutable_data();
        {
            py::gil_scoped_release nogil;
            col2im_batch<T>(pc, px, N, C, g, false);
        }
        return x;
    });
}

void col2im_into(py::array cols, py::array x, int kh, int kw, int sh, int sw, int ph, int pw,
                 int dh, int dw, bool kbl) {
    const char* name = "col2im_into";
    require_ndim(x, 4, name, "x");
    require_contiguous(x, name, "x");
    require_same_dtype(x, cols, name);
    const index_t N = x.shape(0), C = x.shape(1);
    const ConvGeom g = make_geom(x.shape(2), x.shape(3), kh, kw, sh, sw, ph, pw, dh, dw, name);
    require_room(cols, N * C * kh * kw * g.OH * g.OW, name, "cols");
    dispatch_float(x, name, [&](auto tag) {
        using T = decltype(tag);
        const T* pc = cdata_of<T>(cols);
        T* px = data_of<T>(x);
        py::gil_scoped_release nogil;
        col2im_batch<T>(pc, px, N, C, g, kbl);
    });
}

}  // namespace gpudiff
