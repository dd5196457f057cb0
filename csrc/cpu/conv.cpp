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
//
// Stride-1 kh x kw convolutions with padding at most k - 1 (ResNet's 3x3 pad 1 on 16x16
// images and up, LeNet's 5x5 pad 2 on 28x28) skip the im2col copy: the samples sit in one
// zero-padded grid whose shifted views are the im2col rows, read by the GEMM's packing
// (gemm_rows); the input gradient is the same kind of convolution (flipped kernel), and the
// weight gradient with few filters takes a dot product kernel over the grid rows
// (wgrad_dot), also where the grid wastes up to half its columns (LeNet's 5x5 valid conv on
// 14x14). See "implicit GEMM on a padded grid".
#include "common.h"
#include "gemm.h"
#include "im2col.h"
#include "kernels.h"

#include <pybind11/stl.h>

#include <cstring>

#define GD_INLINE_CONV __attribute__((always_inline)) inline

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

// Samples per chunk: at most `most`, evened out so that the chunk count is a multiple of
// the thread count (5 chunks on 2 threads would idle one a fifth of the time).
inline index_t balanced_batch(index_t N, index_t most) {
    most = std::max<index_t>(1, most);
    const index_t threads = max_threads();
    const index_t rounds = (N + most * threads - 1) / (most * threads);
    return std::max<index_t>(1, (N + rounds * threads - 1) / (rounds * threads));
}

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
    // the largest chunk that both limits allow
    c.B = balanced_batch(N, std::min({by_width, by_bytes, (N + 1) / 2}));
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

// ---- kh x kw, stride 1, padding ph <= kh-1 / pw <= kw-1, dilation 1, one group: ----
// ---- implicit GEMM on a padded grid                                             ----
//
// The samples [n0, n0 + nb) of each channel are laid out in one zero-padded "grid" whose
// rows are Wq = W + pw long (pw zero columns: the right padding of a row and the left
// padding of the next) and whose samples are H + ph rows apart (ph zero rows between
// samples: the bottom padding of one and the top padding of the next):
//
//   value (b, h, w) at  base + b*S + h*Wq + w,   Wq = W + pw,  S = (H + ph)*Wq,
//                                                base = ph*Wq + pw
//
// and every position that is not a value is 0. Output (b, oh, ow) becomes GEMM column
// q = b*S + oh*Wq + ow, and its tap (i, j) reads grid[q + i*Wq + j] (input pixel
// (oh + i - ph, ow + j - pw), or a zero): row (c, i, j) of the im2col matrix is the
// channel-c grid shifted by i*Wq + j, so the GEMM's packing reads the input directly
// (gemm_rows) and the kh*kw times larger column matrix is never written. Padding up to
// k - 1 fits in the shared zeros because a tap reaches at most pw columns left or right of
// a row (and ph rows above or below a sample). The price: the Q columns per sample, S,
// include positions that are no output, (H + ph)(W + pw) against OH*OW (3x3 pad 1: 6% more
// at 32x32, 13% at 16x16, 27% at 8x8; 5x5 pad 2 at 28x28: 15%; 5x5 pad 0 at 14x14: 96%;
// "full" padding k - 1: none), computed and thrown away (forward), or multiplied by the
// zeros that the output-gradient grid holds there (weight gradient).
struct Grid {
    index_t H, W, OH, OW, kh, kw;  // input and output planes, taps
    index_t Wq, S, base, len, Q;   // len: one channel's grid, Q: GEMM columns
    index_t ld;  // channel stride: len and kSlack zeros, which let wgrad_dot round Q up
};

constexpr index_t kSlack = 16;  // a vector of floats

inline Grid make_grid(const ConvGeom& g, index_t nb) {
    Grid gr;
    gr.H = g.H, gr.W = g.W, gr.OH = g.OH, gr.OW = g.OW, gr.kh = g.kh, gr.kw = g.kw;
    gr.Wq = g.W + g.pw, gr.S = (g.H + g.ph) * gr.Wq, gr.base = g.ph * gr.Wq + g.pw;
    gr.Q = (nb - 1) * gr.S + (g.OH - 1) * gr.Wq + g.OW;
    // the last read: column Q - 1, tap (kh - 1, kw - 1)
    gr.len = gr.Q + (g.kh - 1) * gr.Wq + g.kw - 1;  // = base + nb*S
    gr.ld = gr.len + kSlack;
    return gr;
}

// Grid columns per output pixel (S / (OH*OW)).
inline double grid_waste(const ConvGeom& g) {
    return double((g.H + g.ph) * (g.W + g.pw)) / double(g.OH * g.OW);
}

// Convolutions the grid can hold: stride 1, no dilation, one group, not 1x1 (the pointwise
// path reads the input in place), padding at most k - 1 per side.
inline bool grid_fits(const Conv& c) {
    const ConvGeom& g = c.g;
    return c.G == 1 && g.sh == 1 && g.sw == 1 && g.dh == 1 && g.dw == 1 && g.kh * g.kw > 1 &&
           g.ph <= g.kh - 1 && g.pw <= g.kw - 1;
}

// The forward GEMM on the grid when it wastes at most 15% (3x3 pad 1 on 16x16 images and
// up, 5x5 pad 2 on 28x28, "full" padding always): beyond, the padding columns cost more
// than the im2col copy saves (3x3 pad 1 on 8x8: 27%).
inline bool takes_grid(const Conv& c) { return grid_fits(c) && grid_waste(c.g) <= 1.15; }

// Taps a row that the dot-product kernel below holds in registers.
constexpr index_t kDotMaxTaps = 7;

// The weight gradient takes wgrad_dot (no packing) for few filters, where the packed GEMM
// fills half of its 32-wide micro-tiles; with more, the GEMM's register blocking wins. The
// dot kernel does the waste's multiply-adds but writes no column matrix and packs nothing:
// it pays up to twice the useful work (LeNet's 5x5 valid conv on 14x14: 1.96).
inline bool wgrad_by_dot(const Conv& c) {
    return c.K < 32 && c.g.kw <= kDotMaxTaps && grid_fits(c) && grid_waste(c.g) <= 2.0;
}
// The weight gradient's grid path: the dot kernel, or the grid GEMM where the forward
// takes the grid.
inline bool wgrad_takes_grid(const Conv& c) { return wgrad_by_dot(c) || takes_grid(c); }

// src (N, Ch, h, w) planes, samples [n0, n0 + nb) -> dst (Ch, ld) grids with rows Wq long
// and samples S apart: value (b, y, x) at off + b*S + y*Wq + x, every other position of
// [0, ld) written 0 (off + nb*S <= len). The input grid: (H, W) at off = base.
template <typename T>
void to_grid(const T* src, index_t Ch, index_t n0, index_t nb, index_t h, index_t w,
             index_t off, const Grid& gr, T* dst) {
    const index_t plane = h * w, rows = gr.S / gr.Wq;  // rows: h and the zero rows after
    for (index_t ch = 0; ch < Ch; ++ch) {
        T* d = dst + ch * gr.ld;
        std::fill(d, d + off, T(0));  // the top (and left) padding of sample 0
        for (index_t b = 0; b < nb; ++b) {
            const T* s = src + ((n0 + b) * Ch + ch) * plane;
            T* ds = d + off + b * gr.S;
            for (index_t y = 0; y < h; ++y) {
                std::memcpy(ds + y * gr.Wq, s + y * w, sizeof(T) * w);
                for (index_t z = w; z < gr.Wq; ++z) ds[y * gr.Wq + z] = T(0);  // side padding
            }
            std::fill(ds + h * gr.Wq, ds + rows * gr.Wq, T(0));  // the rows of padding
        }
        std::fill(d + off + nb * gr.S, d + gr.ld, T(0));
    }
}

// The im2col matrix's row pointers, (Ch*kh*kw,): row (c*kh + i)*kw + j = grid c shifted by
// i*Wq + j (per thread, kept).
template <typename T>
const T* const* grid_rows(const T* grid, index_t Ch, const Grid& gr) {
    static thread_local std::vector<const T*> rows;
    rows.resize(Ch * gr.kh * gr.kw);
    for (index_t ch = 0; ch < Ch; ++ch)
        for (index_t i = 0; i < gr.kh; ++i)
            for (index_t j = 0; j < gr.kw; ++j)
                rows[(ch * gr.kh + i) * gr.kw + j] = grid + ch * gr.ld + i * gr.Wq + j;
    return rows.data();
}

// out (K, Q) on the grid's columns -> y[n0 + b, k] (OH, OW), plus the bias.
template <typename T>
void from_grid(const T* out, const T* bias, index_t K, index_t n0, index_t nb, const Grid& gr,
               T* y) {
    for (index_t b = 0; b < nb; ++b)
        for (index_t k = 0; k < K; ++k) {
            const T* s = out + k * gr.Q + b * gr.S;
            T* d = y + ((n0 + b) * K + k) * gr.OH * gr.OW;
            const T add = bias ? bias[k] : T(0);
            for (index_t h = 0; h < gr.OH; ++h)
                for (index_t w = 0; w < gr.OW; ++w) d[h * gr.OW + w] = s[h * gr.Wq + w] + add;
        }
}

// y (K, Q) = W (K, C*kh*kw) @ cols (C*kh*kw, Q), cols read from the input grid.
template <typename T>
GPUDIFF_CLONES void forward_grid_chunk(const T* x, const T* w, const T* bias, T* y,
                                       const Conv& c, index_t n0, index_t n1) {
    const index_t nb = n1 - n0;
    const Grid gr = make_grid(c.g, nb);
    T* grid = scratch<T, 0>(c.C * gr.ld);
    T* out = scratch<T, 1>(c.K * gr.Q);
    to_grid(x, c.C, n0, nb, c.g.H, c.g.W, gr.base, gr, grid);
    gemm_rows(false, false, c.K, gr.Q, c.Rg, w, c.Rg, nullptr, (const T*)nullptr, 0,
              grid_rows(grid, c.C, gr), T(0), out, gr.Q);
    from_grid(out, bias, c.K, n0, nb, gr, y);
}

// The weight gradient as dot products along the grid's columns, with no packing:
//
//   gW[k, (c*kh + i)*kw + j] += sum_q gy[k, q] * grid_c[q + i*Wq + j]
//
// The GEMM behind it is (K, Q) @ (Q, C*kh*kw) with a long depth Q and a small output;
// with 16 filters its packing (one packed element per vector multiply-add) costs as much
// as its arithmetic. Here KB filters and the KW taps j of one (c, i) share their loads: per
// vector of columns, KW + KB loads feed KW*KB multiply-adds held in registers (AVX-512,
// 32 registers: 3 taps x 8 filters = 24 accumulators, 5 x 4 = 20, 7 x 3 = 21). Each
// accumulator is summed lane by lane at the end, in a fixed order: the same bits on every
// run.
template <typename V, typename T, int KW, int KB>
GD_INLINE_CONV void wgrad_dot_block(const T* x0, const T* gy, index_t ldg, index_t Q, T* gw,
                                    index_t ldw) {
    constexpr int W = sizeof(V) / sizeof(T);
    typedef T VU __attribute__((vector_size(sizeof(V)), aligned(sizeof(T))));  // unaligned
    V acc[KB][KW];
#pragma GCC unroll 8
    for (int k = 0; k < KB; ++k)
#pragma GCC unroll 8
        for (int j = 0; j < KW; ++j) acc[k][j] = V{};
    for (index_t q = 0; q < Q; q += W) {  // past Q: zeros of gy's grid (and its slack)
        V a[KW];
#pragma GCC unroll 8
        for (int j = 0; j < KW; ++j) a[j] = *reinterpret_cast<const VU*>(x0 + q + j);
#pragma GCC unroll 8
        for (int k = 0; k < KB; ++k) {
            const V g = *reinterpret_cast<const VU*>(gy + k * ldg + q);
#pragma GCC unroll 8
            for (int j = 0; j < KW; ++j) acc[k][j] += g * a[j];
        }
    }
    for (int k = 0; k < KB; ++k)
        for (int j = 0; j < KW; ++j) {
            T sum = T(0);
            for (int l = 0; l < W; ++l) sum += acc[k][j][l];
            gw[k * ldw + j] += sum;
        }
}

// Filters per block for KW taps: the accumulators, KW loads and a spare or two within the
// vector registers (16 for 32-byte vectors); 3 taps keep 8 (the 3x3 kernel's choice).
template <typename V, int KW>
constexpr int dot_filters() {
    constexpr int regs = sizeof(V) == 64 ? 32 : 16;
    return KW == 3 ? 8 : ((regs - KW - 4) / KW > 1 ? (regs - KW - 4) / KW : 1);
}

// The last r < KB filters as one block of r.
template <typename V, typename T, int KW, int KB>
GD_INLINE_CONV void wgrad_dot_rest(int r, const T* x0, const T* gy, index_t ldg, index_t Q,
                                   T* gw, index_t ldw) {
    if constexpr (KB >= 1) {
        if (r == KB) return wgrad_dot_block<V, T, KW, KB>(x0, gy, ldg, Q, gw, ldw);
        wgrad_dot_rest<V, T, KW, KB - 1>(r, x0, gy, ldg, Q, gw, ldw);
    }
}

// gW (K, C*kh*kw) += over the (c, i) tap rows and blocks of KB filters (then the rest).
template <typename V, typename T, int KW>
GD_INLINE_CONV void wgrad_dot_kw(const T* xg, const T* gyq, const Grid& gr, index_t C,
                                 index_t K, T* gw) {
    constexpr int KB = dot_filters<V, KW>();
    const index_t Rg = C * gr.kh * KW;
    for (index_t ci = 0; ci < C * gr.kh; ++ci) {  // ci = c*kh + i
        const T* x0 = xg + (ci / gr.kh) * gr.ld + (ci % gr.kh) * gr.Wq;
        index_t k = 0;
        for (; k + KB <= K; k += KB)
            wgrad_dot_block<V, T, KW, KB>(x0, gyq + k * gr.ld, gr.ld, gr.Q, gw + k * Rg + ci * KW,
                                          Rg);
        if (k < K)
            wgrad_dot_rest<V, T, KW, KB - 1>(int(K - k), x0, gyq + k * gr.ld, gr.ld, gr.Q,
                                             gw + k * Rg + ci * KW, Rg);
    }
}

template <typename V, typename T>
GD_INLINE_CONV void wgrad_dot(const T* xg, const T* gyq, const Grid& gr, index_t C, index_t K,
                              T* gw) {
    switch (gr.kw) {  // kw <= kDotMaxTaps
        case 2: return wgrad_dot_kw<V, T, 2>(xg, gyq, gr, C, K, gw);
        case 3: return wgrad_dot_kw<V, T, 3>(xg, gyq, gr, C, K, gw);
        case 4: return wgrad_dot_kw<V, T, 4>(xg, gyq, gr, C, K, gw);
        case 5: return wgrad_dot_kw<V, T, 5>(xg, gyq, gr, C, K, gw);
        case 6: return wgrad_dot_kw<V, T, 6>(xg, gyq, gr, C, K, gw);
        case 7: return wgrad_dot_kw<V, T, 7>(xg, gyq, gr, C, K, gw);
        default: return wgrad_dot_kw<V, T, 1>(xg, gyq, gr, C, K, gw);  // kh x 1
    }
}

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
template <typename T>
__attribute__((target("avx512f,avx512dq,avx512vl,avx512bw,fma"))) void wgrad_dot_avx512(
    const T* xg, const T* gyq, const Grid& gr, index_t C, index_t K, T* gw) {
    typedef T V __attribute__((vector_size(64)));
    wgrad_dot<V, T>(xg, gyq, gr, C, K, gw);
}
#endif

template <typename T>
GPUDIFF_CLONES void wgrad_dot_any(const T* xg, const T* gyq, const Grid& gr, index_t C,
                                  index_t K, T* gw) {
    typedef T V __attribute__((vector_size(32)));
    wgrad_dot<V, T>(xg, gyq, gr, C, K, gw);
}

inline bool has_avx512() {
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
    static const bool v = [] {
        __builtin_cpu_init();
        return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512dq") &&
               __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512bw");
    }();
    return v;
#else
    return false;
#endif
}

// Columns per wgrad_dot call: its epilogue (KW*KB lane sums) then costs ~10% of the loop.
constexpr index_t kDotColumns = 4096;

// gW (K, C*kh*kw) += the chunk's weight gradient; gy's grid is 0 at the columns that are
// no output, so they add nothing.
template <typename T>
GPUDIFF_CLONES void wgrad_grid_chunk(const T* gy, const T* x, T* gw_part, const Conv& c,
                                     index_t n0, index_t n1) {
    const index_t nb = n1 - n0;
    const Grid gr = make_grid(c.g, nb);
    T* xg = scratch<T, 0>(c.C * gr.ld);
    T* gyg = scratch<T, 1>(c.K * gr.ld);
    to_grid(x, c.C, n0, nb, c.g.H, c.g.W, gr.base, gr, xg);
    // gy's grid: (OH, OW) at base too (any offset would do; base keeps the 3x3 layout)
    to_grid(gy, c.K, n0, nb, c.g.OH, c.g.OW, gr.base, gr, gyg);
    const T* gyq = gyg + gr.base;  // column q of gy at gyq[k*ld + q]
    if (!wgrad_by_dot(c)) {
        // gW^T (C*kh*kw, K) += cols (C*kh*kw, Q) @ gy^T (Q, K), cols read from the input grid
        gemm_rows(false, true, c.Rg, c.K, gr.Q, (const T*)nullptr, 0, grid_rows(xg, c.C, gr),
                  gyq, gr.ld, nullptr, T(1), gw_part, c.K);
        return;
    }
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
    if (has_avx512()) return wgrad_dot_avx512<T>(xg, gyq, gr, c.C, c.K, gw_part);
#endif
    wgrad_dot_any<T>(xg, gyq, gr, c.C, c.K, gw_part);
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
            const bool grid = takes_grid(c);
            for_chunks(c, [&](index_t n0, index_t n1, int) {
                if (grid)
                    forward_grid_chunk<T>(px, pw, pb, py_, c, n0, n1);
                else
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
    // Convolutions that take the grid path take it here too when the flipped GEMM has 4+
    // rows (C): the flipped convolution, padding k - 1 - p, has the same grid, and runs
    // forward_grid_chunk's implicit GEMM. (LeNet's 5x5 valid conv on 14x14, whose flipped
    // grid wastes nothing, has 6 rows: 1.27 ms single-threaded against col2im's 0.59.)
    const bool flipped = (groups == 1 && s.first == 1 && s.second == 1 && c.K <= 16 &&
                          c.C >= 16 && p.first <= d.first * (kh - 1) &&
                          p.second <= d.second * (kw - 1)) ||
                         (takes_grid(c) && c.C >= 4);
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
                const bool grid = takes_grid(cf);
                for_chunks(cf, [&](index_t n0, index_t n1, int) {
                    if (grid)
                        forward_grid_chunk<T>(pg, wf.data(), nullptr, px, cf, n0, n1);
                    else
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
            const bool grid = wgrad_takes_grid(c);
            // wgrad_dot wants long rows: kDotColumns or more a chunk
            const bool dot = wgrad_by_dot(c);
            Conv cw = c;
            const index_t per_sample = (c.g.H + c.g.ph) * (c.g.W + c.g.pw);  // grid columns
            if (dot)
                cw.B = balanced_batch(c.N, std::min(kDotColumns / per_sample + 1, (c.N + 1) / 2));
            for_chunks(cw, [&](index_t n0, index_t n1, int tid) {
                if (grid)
                    wgrad_grid_chunk<T>(pg, px, parts.data() + tid * size, c, n0, n1);
                else
                    wgrad_chunk<T>(pg, px, parts.data() + tid * size, c, n0, n1);
            });
            // sum over threads; parts hold gW^T per group, (G, Rg, Kg), or gW itself
            const int threads = max_threads();
            const bool tr = dot ? false : wgrad_transposed(c);  // wgrad_dot: gW itself
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
