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
#include "im2col.h"
#include "kernels.h"

#include <cstring>

namespace gpudiff {
namespace {

// The (N, C*kh*kw, L) layout, one (n, c) plane per call (compiled per ISA).
template <typename T>
GPUDIFF_CLONES void im2col_plane_std(const T* x, T* rows, const ConvGeom& g) {
    im2col_plane(x, rows, g);
}

template <typename T>
GPUDIFF_CLONES void col2im_plane_std(const T* rows, T* x, const ConvGeom& g) {
    col2im_plane(rows, x, g);
}

// All N*C planes of x (N, C, H, W) into cols (N, C*kh*kw, L).
template <typename T>
void im2col_batch(const T* x, T* cols, index_t N, index_t C, const ConvGeom& g) {
    const index_t Kc = g.kh * g.kw, L = g.OH * g.OW, in_plane = g.H * g.W;
#pragma omp parallel for schedule(static) if (parallel_pays(N * C * Kc * L))
    for (index_t p = 0; p < N * C; ++p) im2col_plane_std<T>(x + p * in_plane, cols + p * Kc * L, g);
}

template <typename T>
void col2im_batch(const T* cols, T* x, index_t N, index_t C, const ConvGeom& g) {
    const index_t Kc = g.kh * g.kw, L = g.OH * g.OW, in_plane = g.H * g.W;
#pragma omp parallel for schedule(static) if (parallel_pays(N * C * Kc * L))
    for (index_t p = 0; p < N * C; ++p) col2im_plane_std<T>(cols + p * Kc * L, x + p * in_plane, g);
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
            im2col_batch<T>(px, pc, N, C, g);
        }
        return cols;
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
            col2im_batch<T>(pc, px, N, C, g);
        }
        return x;
    });
}

// out (B, A, L)[b, a, :] = a (A, B, L)[a, b, :] + add[a]: the layout change between a
// GEMM's (K, N*L) result and NCHW (with the conv bias folded in), and back for gy.
}  // namespace gpudiff
