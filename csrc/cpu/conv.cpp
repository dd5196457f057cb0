// Whole-op 2-D convolution on the CPU: per sample, im2col into a per-thread buffer that
// stays in L2, then one single-threaded GEMM, the samples split over the cores.
//
//   forward  y[n] (K, L)        = W (K, Rg) @ cols[n] (Rg, L) + b      (per group)
//   dgrad    gx[n] = col2im( W^T (Rg, K) @ gy[n] (K, L) )
//   wgrad    gW^T (Rg, K)       = sum_n cols[n] (Rg, L) @ gy[n]^T (L, K)  (a partial per thread)
//
// The output lands in NCHW directly. Compared with one big multi-threaded GEMM over the
// whole batch's columns, nothing of the 9x larger column matrix goes to DRAM, each GEMM
// runs at a single core's full rate (small channel counts make the big GEMM memory-bound),
// and the threads join once per call instead of once per BLAS call.
//
// The GEMM is gemm.h's (single-threaded, AVX-512 where the CPU has it): each thread runs
// its own, and the threads join once per call.
#include "common.h"
#include "gemm.h"
#include "im2col.h"
#include "kernels.h"

#include <pybind11/stl.h>

#include <cstring>

namespace gpudiff {
namespace {

// Per-thread scratch buffers (slot 0: columns, slot 1: the GEMM's other operand or result)
// that grow and are kept: no page faults on later calls.
template <typename T, int Slot>
T* scratch(index_t n) {
    static thread_local std::vector<T> buf;
    if (index_t(buf.size()) < n) buf.resize(n);
    return buf.data();
}

inline int max_threads() {
#ifdef _OPENMP
    return omp_get_max_threads();
#else
    return 1;
#endif
}

struct Conv {
    ConvGeom g;
    index_t N, C, K, G, Cg, Kg, Rg, L;
    index_t B;       // samples per GEMM: small images are batched so the GEMM stays wide
    bool pointwise;  // 1x1, stride 1, no padding: the columns are the input itself
};

// Columns of this many bytes or fewer per chunk stay in cache (L2 for most layers).
constexpr index_t kChunkBytes = 2 << 20;
// ... and a chunk's GEMM gets at least this many columns when the images are small.
constexpr index_t kMinGemmColumns = 1024;

Conv make_conv(index_t N, index_t C, index_t H, index_t W, index_t K, index_t kh, index_t kw,
               std::pair<int, int> s, std::pair<int, int> p, std::pair<int, int> d, int groups,
               index_t itemsize, const char* name) {
    if (groups < 1 || C % groups || K % groups)
        throw py::value_error(std::string(name) + ": channels must divide into groups");
    Conv c;
    c.g = make_geom(H, W, int(kh), int(kw), s.first, s.second, p.first, p.second, d.first,
                    d.second, name);
    c.N = N, c.C = C, c.K = K, c.G = groups, c.Cg = C / groups, c.Kg = K / groups;
    c.Rg = c.Cg * kh * kw;
    c.L = c.g.OH * c.g.OW;
    c.pointwise = kh == 1 && kw == 1 && s.first == 1 && s.second == 1 && p.first == 0 &&
                  p.second == 0;
    const index_t by_width = (kMinGemmColumns + c.L - 1) / c.L;
    const index_t by_bytes = std::max<index_t>(1, kChunkBytes / (c.Rg * c.L * itemsize));
    // the largest chunk that both limits allow, then evened out so that the chunk count is
    // a multiple of the thread count (5 chunks on 2 threads would idle one a fifth of the time)
    const index_t most = std::max<index_t>(1, std::min({by_width, by_bytes, (N + 1) / 2}));
    const index_t threads = max_threads();
    const index_t rounds = (N + most * threads - 1) / (most * threads);
    c.B = std::max<index_t>(1, (N + rounds * threads - 1) / (rounds * threads));
    return c;
}

// Multiply-adds above which a convolution splits over the threads (~20 us on one core).
constexpr index_t kConvParallelMacs = index_t(1) << 22;

// Runs body(n0, n1, tid) over chunks of c.B samples, the chunks split over the threads.
template <typename F>
void for_chunks(const Conv& c, F&& body) {
    const index_t chunks = (c.N + c.B - 1) / c.B;
    const bool par = chunks > 1 && c.N * c.K * c.L * c.Rg >= kConvParallelMacs;
    if (!par) {
        for (index_t i = 0; i < chunks; ++i) body(i * c.B, std::min(c.N, (i + 1) * c.B), 0);
        return;
    }
#pragma omp parallel
    {
#ifdef _OPENMP
        const int tid = omp_get_thread_num();
#else
        const int tid = 0;
#endif
#pragma omp for schedule(static)
        for (index_t i = 0; i < chunks; ++i) body(i * c.B, std::min(c.N, (i + 1) * c.B), tid);
    }
}

// A zero-padded copy of input planes, (H + 2ph, W + 2pw), per thread: the borders are
// zeroed once per call and stay zero, each plane only rewrites the interior. With it every
// tap row is a plain strided copy, with no bounds logic and no library calls per row
// (rows are as short as 8 values in the last ResNet stage).
template <typename T>
struct PaddedPlane {
    const ConvGeom& g;
    index_t Hp, Wp;
    T* buf;  // nullptr: no padding, the planes are used in place
    PaddedPlane(const ConvGeom& geom, T* scratch_buf)
        : g(geom), Hp(geom.H + 2 * geom.ph), Wp(geom.W + 2 * geom.pw),
          buf((geom.ph || geom.pw) ? scratch_buf : nullptr) {
        if (buf) std::fill(buf, buf + Hp * Wp, T(0));
    }
    static index_t size(const ConvGeom& geom) {
        return (geom.H + 2 * geom.ph) * (geom.W + 2 * geom.pw);
    }
    const T* load(const T* plane) const {  // forward: the padded input plane
        if (!buf) return plane;
        for (index_t h = 0; h < g.H; ++h)
            std::memcpy(buf + (h + g.ph) * Wp + g.pw, plane + h * g.W, sizeof(T) * g.W);
        return buf;
    }
};

// Tap (i, j) of a padded plane (Hp, Wp) -> a row of OH*OW columns.
template <typename T>
inline void tap_from_padded(const T* __restrict src, index_t Wp, T* __restrict row, index_t i,
                            index_t j, const ConvGeom& g) {
    for (index_t oh = 0; oh < g.OH; ++oh) {
        const T* in = src + (oh * g.sh + i * g.dh) * Wp + j * g.dw;
        T* out = row + oh * g.OW;
        if (g.sw == 1)
            for (index_t ow = 0; ow < g.OW; ++ow) out[ow] = in[ow];
        else
            for (index_t ow = 0; ow < g.OW; ++ow) out[ow] = in[ow * g.sw];
    }
}

// The adjoint: adds a row of OH*OW columns into tap (i, j) of a padded plane.
template <typename T>
inline void tap_into_padded(const T* __restrict row, T* __restrict dst, index_t Wp, index_t i,
                            index_t j, const ConvGeom& g) {
    for (index_t oh = 0; oh < g.OH; ++oh) {
        T* out = dst + (oh * g.sh + i * g.dh) * Wp + j * g.dw;
        const T* in = row + oh * g.OW;
        if (g.sw == 1)
            for (index_t ow = 0; ow < g.OW; ++ow) out[ow] += in[ow];
        else
            for (index_t ow = 0; ow < g.OW; ++ow) out[ow * g.sw] += in[ow];
    }
}

// Columns of group gi of samples [n0, n0 + nb) as (Rg, nb*L): row r holds the tap r of
// each sample, one after the other. A single pointwise sample is its own columns.
template <typename T>
const T* chunk_columns(const T* x, T* buf, index_t n0, index_t nb, index_t gi, const Conv& c) {
    const index_t plane = c.g.H * c.g.W, taps = c.g.kh * c.g.kw;
    if (c.pointwise && nb == 1) return x + (n0 * c.C + gi * c.Cg) * plane;
    const PaddedPlane<T> pad(c.g, scratch<T, 2>(PaddedPlane<T>::size(c.g)));
    for (index_t b = 0; b < nb; ++b)
        for (index_t ci = 0; ci < c.Cg; ++ci) {
            const T* src = pad.load(x + ((n0 + b) * c.C + gi * c.Cg + ci) * plane);
            for (index_t i = 0; i < c.g.kh; ++i)
                for (index_t j = 0; j < c.g.kw; ++j)
                    tap_from_padded(src, pad.Wp,
                                    buf + ((ci * taps + i * c.g.kw + j) * nb + b) * c.L, i, j,
                                    c.g);
        }
    return buf;
}

template <typename T>
GPUDIFF_CLONES void forward_chunk(const T* x, const T* w, const T* bias, T* y, const Conv& c,
                                  index_t n0, index_t n1) {
    const index_t nb = n1 - n0, L = c.L;
    T* cols = (c.pointwise && nb == 1) ? nullptr : scratch<T, 0>(c.Rg * nb * L);
    T* tmp = nb == 1 ? nullptr : scratch<T, 1>(c.Kg * nb * L);
    for (index_t gi = 0; gi < c.G; ++gi) {
        const T* B = chunk_columns(x, cols, n0, nb, gi, c);
        const T* wg = w + gi * c.Kg * c.Rg;
        if (nb == 1) {  // straight into y, starting from the bias
            T* out = y + (n0 * c.K + gi * c.Kg) * L;
            if (bias)
                for (index_t k = 0; k < c.Kg; ++k)
                    std::fill(out + k * L, out + (k + 1) * L, bias[gi * c.Kg + k]);
            gemm(false, false, c.Kg, L, c.Rg, wg, c.Rg, B, L, bias ? T(1) : T(0), out, L);
            continue;
        }
        // (Kg, nb*L) -> y[n0 + b, gi*Kg + k, :] with the bias added
        gemm(false, false, c.Kg, nb * L, c.Rg, wg, c.Rg, B, nb * L, T(0), tmp, nb * L);
        for (index_t b = 0; b < nb; ++b)
            for (index_t k = 0; k < c.Kg; ++k) {
                const T* src = tmp + (k * nb + b) * L;
                T* dst = y + ((n0 + b) * c.K + gi * c.Kg + k) * L;
                const T add = bias ? bias[gi * c.Kg + k] : T(0);
                for (index_t l = 0; l < L; ++l) dst[l] = src[l] + add;
            }
    }
}

template <typename T>
GPUDIFF_CLONES void dgrad_chunk(const T* gy, const T* w, T* gx, const Conv& c, index_t n0,
                                index_t n1) {
    const index_t nb = n1 - n0, L = c.L, plane = c.g.H * c.g.W, taps = c.g.kh * c.g.kw;
    T* gcols = scratch<T, 0>(c.Rg * nb * L);
    T* gyb = nb == 1 ? nullptr : scratch<T, 1>(c.Kg * nb * L);
    for (index_t gi = 0; gi < c.G; ++gi) {
        const T* wg = w + gi * c.Kg * c.Rg;
        const T* A;  // gy of the group, (Kg, nb*L)
        if (nb == 1) {
            A = gy + (n0 * c.K + gi * c.Kg) * L;
        } else {
            for (index_t k = 0; k < c.Kg; ++k)
                for (index_t b = 0; b < nb; ++b)
                    std::memcpy(gyb + (k * nb + b) * L, gy + ((n0 + b) * c.K + gi * c.Kg + k) * L,
                                sizeof(T) * L);
            A = gyb;
        }
        // gcols (Rg, nb*L) = W_g^T (Rg, Kg) @ gy_g (Kg, nb*L)
        gemm(true, false, c.Rg, nb * L, c.Kg, wg, c.Rg, A, nb * L, T(0), gcols, nb * L);
        // col2im: sum the taps into a padded plane, then keep its interior
        const index_t Hp = c.g.H + 2 * c.g.ph, Wp = c.g.W + 2 * c.g.pw;
        T* acc = scratch<T, 2>(Hp * Wp);
        for (index_t b = 0; b < nb; ++b)
            for (index_t ci = 0; ci < c.Cg; ++ci) {
                T* xp = gx + ((n0 + b) * c.C + gi * c.Cg + ci) * plane;
                std::fill(acc, acc + Hp * Wp, T(0));
                for (index_t i = 0; i < c.g.kh; ++i)
                    for (index_t j = 0; j < c.g.kw; ++j)
                        tap_into_padded(gcols + ((ci * taps + i * c.g.kw + j) * nb + b) * L, acc,
                                        Wp, i, j, c.g);
                for (index_t h = 0; h < c.g.H; ++h)
                    std::memcpy(xp + h * c.g.W, acc + (h + c.g.ph) * Wp + c.g.pw,
                                sizeof(T) * c.g.W);
            }
    }
}

// The weight gradient's GEMM puts the filters on the columns (gW^T) unless there are too
// few of them to fill a 16-wide vector: then the row side is the better fit.
inline bool wgrad_transposed(const Conv& c) { return c.Kg >= 16; }

template <typename T>
GPUDIFF_CLONES void wgrad_chunk(const T* gy, const T* x, T* gw_part, const Conv& c, index_t n0,
                                index_t n1) {
    const index_t nb = n1 - n0, L = c.L;
    T* cols = (c.pointwise && nb == 1) ? nullptr : scratch<T, 0>(c.Rg * nb * L);
    T* gyb = nb == 1 ? nullptr : scratch<T, 1>(c.Kg * nb * L);
    for (index_t gi = 0; gi < c.G; ++gi) {
        const T* B = chunk_columns(x, cols, n0, nb, gi, c);
        const T* A;
        if (nb == 1) {
            A = gy + (n0 * c.K + gi * c.Kg) * L;
        } else {
            for (index_t k = 0; k < c.Kg; ++k)
                for (index_t b = 0; b < nb; ++b)
                    std::memcpy(gyb + (k * nb + b) * L, gy + ((n0 + b) * c.K + gi * c.Kg + k) * L,
                                sizeof(T) * L);
            A = gyb;
        }
        if (wgrad_transposed(c)) {
            // gW_g^T (Rg, Kg) += cols (Rg, nb*L) @ gy_g^T (nb*L, Kg): with the columns as the
            // left operand their packing reads rows (8 streams), and the transposed operand
            // is the small gy; the caller transposes the sum back.
            gemm(false, true, c.Rg, c.Kg, nb * L, B, nb * L, A, nb * L, T(1),
                 gw_part + gi * c.Rg * c.Kg, c.Kg);
        } else {
            // gW_g (Kg, Rg) += gy_g (Kg, nb*L) @ cols^T (nb*L, Rg): for a handful of filters,
            // which would fill few lanes of the micro-tile's columns above
            gemm(false, true, c.Kg, c.Rg, nb * L, A, nb * L, B, nb * L, T(1),
                 gw_part + gi * c.Kg * c.Rg, c.Rg);
        }
    }
}

std::pair<int, int> pair_of(py::handle t) {
    auto s = t.cast<py::sequence>();
    return {s[0].cast<int>(), s[1].cast<int>()};
}

}  // namespace

py::array conv2d_forward(py::array x, py::array w, py::object b, py::object stride,
                         py::object padding, py::object dilation, int groups) {
    const char* name = "conv2d_forward";
    require_ndim(x, 4, name, "x");
    require_ndim(w, 4, name, "w");
    require_contiguous(x, name, "x");
    require_contiguous(w, name, "w");
    require_same_dtype(x, w, name);
    const Conv c = make_conv(x.shape(0), x.shape(1), x.shape(2), x.shape(3), w.shape(0),
                             w.shape(2), w.shape(3), pair_of(stride), pair_of(padding),
                             pair_of(dilation), groups, x.itemsize(), name);
    if (w.shape(1) != c.Cg) throw py::value_error("conv2d_forward: weight/input channels differ");
    py::array bias;
    if (!b.is_none()) {
        bias = b.cast<py::array>();
        require_contiguous(bias, name, "b");
        require_same_dtype(x, bias, name);
        if (bias.ndim() != 1 || bias.shape(0) != c.K)
            throw py::value_error("conv2d_forward: bias must be (K,)");
    }
    return dispatch_float(x, name, [&](auto tag) -> py::array {
        using T = decltype(tag);
        auto y = empty_array<T>({c.N, c.K, c.g.OH, c.g.OW});
        const T *px = cdata_of<T>(x), *pw = cdata_of<T>(w);
        const T* pb = b.is_none() ? nullptr : cdata_of<T>(bias);
        T* py_ = y.mutable_data();
        {
            py::gil_scoped_release nogil;
            for_chunks(c, [&](index_t n0, index_t n1, int) {
                forward_chunk<T>(px, pw, pb, py_, c, n0, n1);
            });
        }
        return y;
    });
}

py::array conv2d_backward_input(py::array gy, py::array w, py::object x_shape, py::object stride,
                                py::object padding, py::object dilation, int groups) {
    const char* name = "conv2d_backward_input";
    require_ndim(gy, 4, name, "gy");
    require_ndim(w, 4, name, "w");
    require_contiguous(gy, name, "gy");
    require_contiguous(w, name, "w");
    require_same_dtype(gy, w, name);
    auto xs = x_shape.cast<std::vector<index_t>>();
    if (xs.size() != 4) throw py::value_error("conv2d_backward_input: x_shape must be 4-D");
    const Conv c = make_conv(xs[0], xs[1], xs[2], xs[3], w.shape(0), w.shape(2), w.shape(3),
                             pair_of(stride), pair_of(padding), pair_of(dilation), groups,
                             gy.itemsize(), name);
    if (gy.shape(0) != c.N || gy.shape(1) != c.K || gy.shape(2) != c.g.OH ||
        gy.shape(3) != c.g.OW || w.shape(1) != c.Cg)
        throw py::value_error("conv2d_backward_input: gy, w and x_shape do not match");
    // With few filters (K <= 16) the input gradient's GEMM is (Rg, K) @ (K, L): a depth of
    // K, and a column matrix Rg/K times bigger than gx to write and fold back. For stride 1
    // it is also a plain convolution of gy with the flipped, transposed kernel,
    //   gx = conv2d(gy, w'[c, k, i, j] = w[k, c, kh-1-i, kw-1-j], padding d*(k-1) - p),
    // whose GEMM is (C, K*kh*kw) @ (K*kh*kw, L): deep, and nothing to fold.
    const auto s = pair_of(stride), p = pair_of(padding), d = pair_of(dilation);
    const index_t kh = w.shape(2), kw = w.shape(3);
    const bool flipped = groups == 1 && s.first == 1 && s.second == 1 && c.K <= 16 &&
                         c.C >= 16 && p.first <= d.first * (kh - 1) &&
                         p.second <= d.second * (kw - 1);
    return dispatch_float(gy, name, [&](auto tag) -> py::array {
        using T = decltype(tag);
        auto gx = empty_array<T>({xs[0], xs[1], xs[2], xs[3]});
        const T *pg = cdata_of<T>(gy), *pw = cdata_of<T>(w);
        T* px = gx.mutable_data();
        if (flipped) {
            const Conv cf = make_conv(c.N, c.K, c.g.OH, c.g.OW, c.C, kh, kw, {1, 1},
                                      {int(d.first * (kh - 1) - p.first),
                                       int(d.second * (kw - 1) - p.second)},
                                      d, 1, gy.itemsize(), name);
            if (cf.g.OH != c.g.H || cf.g.OW != c.g.W)
                throw std::logic_error("conv2d_backward_input: flipped geometry mismatch");
            std::vector<T> wf(size_t(c.C) * c.K * kh * kw);  // (C, K, kh, kw)
            for (index_t k = 0; k < c.K; ++k)
                for (index_t ch = 0; ch < c.C; ++ch)
                    for (index_t i = 0; i < kh; ++i)
                        for (index_t j = 0; j < kw; ++j)
                            wf[((ch * c.K + k) * kh + kh - 1 - i) * kw + kw - 1 - j] =
                                pw[((k * c.C + ch) * kh + i) * kw + j];
            {
                py::gil_scoped_release nogil;
                for_chunks(cf, [&](index_t n0, index_t n1, int) {
                    forward_chunk<T>(pg, wf.data(), nullptr, px, cf, n0, n1);
                });
            }
            return gx;
        }
        {
            py::gil_scoped_release nogil;
            for_chunks(c, [&](index_t n0, index_t n1, int) {
                dgrad_chunk<T>(pg, pw, px, c, n0, n1);
            });
        }
        return gx;
    });
}

py::array conv2d_backward_weight(py::array gy, py::array x, py::object w_shape,
                                 py::object stride, py::object padding, py::object dilation,
                                 int groups) {
    const char* name = "conv2d_backward_weight";
    require_ndim(gy, 4, name, "gy");
    require_ndim(x, 4, name, "x");
    require_contiguous(gy, name, "gy");
    require_contiguous(x, name, "x");
    require_same_dtype(gy, x, name);
    auto ws = w_shape.cast<std::vector<index_t>>();
    if (ws.size() != 4) throw py::value_error("conv2d_backward_weight: w_shape must be 4-D");
    const Conv c = make_conv(x.shape(0), x.shape(1), x.shape(2), x.shape(3), ws[0], ws[2], ws[3],
                             pair_of(stride), pair_of(padding), pair_of(dilation), groups,
                             gy.itemsize(), name);
    if (gy.shape(0) != c.N || gy.shape(1) != c.K || gy.shape(2) != c.g.OH ||
        gy.shape(3) != c.g.OW || ws[1] != c.Cg)
        throw py::value_error("conv2d_backward_weight: gy, x and w_shape do not match");
    return dispatch_float(gy, name, [&](auto tag) -> py::array {
        using T = decltype(tag);
        auto gw = empty_array<T>({ws[0], ws[1], ws[2], ws[3]});
        const T *pg = cdata_of<T>(gy), *px = cdata_of<T>(x);
        T* out = gw.mutable_data();
        const index_t size = c.K * c.Rg;
        {
            py::gil_scoped_release nogil;
            // one zeroed partial sum per thread, added up after the samples
            std::vector<T> parts(size_t(max_threads()) * size, T(0));
            for_chunks(c, [&](index_t n0, index_t n1, int tid) {
                wgrad_chunk<T>(pg, px, parts.data() + tid * size, c, n0, n1);
            });
            // sum over threads; parts hold gW^T per group, (G, Rg, Kg), or gW itself
            const int threads = max_threads();
            const bool tr = wgrad_transposed(c);
            for (index_t gi = 0; gi < c.G; ++gi)
                for (index_t k = 0; k < c.Kg; ++k)
                    for (index_t r = 0; r < c.Rg; ++r) {
                        const index_t at = tr ? (gi * c.Rg + r) * c.Kg + k
                                              : (gi * c.Kg + k) * c.Rg + r;
                        T v = 0;
                        for (int t = 0; t < threads; ++t) v += parts[t * size + at];
                        out[(gi * c.Kg + k) * c.Rg + r] = v;
                    }
        }
        return gw;
    });
}

}  // namespace gpudiff
