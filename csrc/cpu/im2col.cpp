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

// (C*kh*kw, N, L) layout: channel c, samples [n0, n1). Row (c, i, j) holds the tap of
// every sample back to back, so going tap by tap, sample by sample, writes (reads) the
// columns sequentially while the channel's input planes stay in L2.
template <typename T>
GPUDIFF_CLONES void im2col_channel_kbl(const T* x, T* cols, index_t c, index_t n0, index_t n1,
                                       index_t N, index_t C, const ConvGeom& g) {
    const index_t L = g.OH * g.OW, Kc = g.kh * g.kw, plane = g.H * g.W;
    for (index_t i = 0; i < g.kh; ++i)
        for (index_t j = 0; j < g.kw; ++j) {
            T* row = cols + (c * Kc + i * g.kw + j) * N * L;
            for (index_t n = n0; n < n1; ++n)
                im2col_tap(x + (n * C + c) * plane, row + n * L, i, j, g);
        }
}

template <typename T>
GPUDIFF_CLONES void col2im_channel_kbl(const T* cols, T* x, index_t c, index_t n0, index_t n1,
                                       index_t N, index_t C, const ConvGeom& g) {
    const index_t L = g.OH * g.OW, Kc = g.kh * g.kw, plane = g.H * g.W;
    for (index_t n = n0; n < n1; ++n) std::fill(x + (n * C + c) * plane,
                                                x + (n * C + c + 1) * plane, T(0));
    for (index_t i = 0; i < g.kh; ++i)
        for (index_t j = 0; j < g.kw; ++j) {
            const T* row = cols + (c * Kc + i * g.kw + j) * N * L;
            for (index_t n = n0; n < n1; ++n)
                col2im_tap(row + n * L, x + (n * C + c) * plane, i, j, g);
        }
}

// Sample blocks per channel in the (C*kh*kw, N, L) layout: enough (channel, block) tasks
// to spread over the threads even for 1- or 3-channel inputs.
inline index_t sample_blocks(index_t N, index_t C) {
    return std::max<index_t>(1, std::min<index_t>(N, (16 + C - 1) / C));
}

// All N*C planes of x (N, C, H, W) into cols, laid out (N, C*kh*kw, L) or, with
// kbl, (C*kh*kw, N, L): the layout where one GEMM covers the whole batch.
template <typename T>
void im2col_batch(const T* x, T* cols, index_t N, index_t C, const ConvGeom& g, bool kbl) {
    const index_t Kc = g.kh * g.kw, L = g.OH * g.OW, in_plane = g.H * g.W;
    const bool par = parallel_pays(N * C * Kc * L);
    if (kbl) {
        const index_t nb = sample_blocks(N, C);
#pragma omp parallel for schedule(static) if (par)
        for (index_t t = 0; t < C * nb; ++t) {
            const index_t c = t / nb, b = t % nb;
            im2col_channel_kbl<T>(x, cols, c, N * b / nb, N * (b + 1) / nb, N, C, g);
        }
    } else {
#pragma omp parallel for schedule(static) if (par)
        for (index_t p = 0; p < N * C; ++p)
            im2col_plane_std<T>(x + p * in_plane, cols + p * Kc * L, g);
    }
}

template <typename T>
void col2im_batch(const T* cols, T* x, index_t N, index_t C, const ConvGeom& g, bool kbl) {
    const index_t Kc = g.kh * g.kw, L = g.OH * g.OW, in_plane = g.H * g.W;
    const bool par = parallel_pays(N * C * Kc * L);
    if (kbl) {
        const index_t nb = sample_blocks(N, C);
#pragma omp parallel for schedule(static) if (par)
        for (index_t t = 0; t < C * nb; ++t) {
            const index_t c = t / nb, b = t % nb;
            col2im_channel_kbl<T>(cols, x, c, N * b / nb, N * (b + 1) / nb, N, C, g);
        }
    } else {
#pragma omp parallel for schedule(static) if (par)
        for (index_t p = 0; p < N * C; ++p)
            col2im_plane_std<T>(cols + p * Kc * L, x + p * in_plane, g);
    }
}

template <typename T>
GPUDIFF_CLONES void swap01_kernel(const T* a, const T* add, T* out, index_t A, index_t B,
                                  index_t L) {
#pragma omp parallel for schedule(static) if (parallel_pays(A * B * L))
    for (index_t r = 0; r < A * B; ++r) {  // output row r = (b, a)
        const index_t b = r / A, ai = r % A;
        const T* src = a + (ai * B + b) * L;
        T* dst = out + r * L;
        const T v = add ? add[ai] : T(0);
        for (index_t l = 0; l < L; ++l) dst[l] = src[l] + v;
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

// out (B, A, L)[b, a, :] = a (A, B, L)[a, b, :] + add[a]: the layout change between a
// GEMM's (K, N*L) result and NCHW (with the conv bias folded in), and back for gy.
py::array swap01(py::array a, py::object add, py::object out) {
    const char* name = "swap01";
    require_ndim(a, 3, name, "a");
    require_contiguous(a, name, "a");
    const index_t A = a.shape(0), B = a.shape(1), L = a.shape(2);
    py::array addv, res;
    if (!add.is_none()) {
        addv = add.cast<py::array>();
        require_contiguous(addv, name, "add");
        require_same_dtype(a, addv, name);
        if (addv.ndim() != 1 || addv.shape(0) != A)
            throw py::value_error("swap01: 'add' must be (A,)");
    }
    if (!out.is_none()) {  // write into the caller's (B, A, L) array, e.g. a batch slice
        res = out.cast<py::array>();
        require_contiguous(res, name, "out");
        require_same_dtype(a, res, name);
        if (res.ndim() != 3 || res.shape(0) != B || res.shape(1) != A || res.shape(2) != L)
            throw py::value_error("swap01: 'out' must be (B, A, L)");
    }
    return dispatch_float(a, name, [&](auto tag) -> py::array {
        using T = decltype(tag);
        if (out.is_none()) res = empty_array<T>({B, A, L});
        const T* pa = cdata_of<T>(a);
        const T* pb = add.is_none() ? nullptr : cdata_of<T>(addv);
        T* po = data_of<T>(res);
        {
            py::gil_scoped_release nogil;
            swap01_kernel<T>(pa, pb, po, A, B, L);
        }
        return res;
    });
}

}  // namespace gpudiff
