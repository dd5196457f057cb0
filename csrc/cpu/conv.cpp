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
//
// 3x3 stride-1 convolutions with 32+ channels on both sides, 16 by 16 (float, AVX-512) or
// 16+ on 8x8 images (all of ResNet-20's stride-1 3x3 convs) take Winograd F(2x2, 3x3)
// instead, forward, input gradient and weight gradient: 2.25x fewer multiply-adds, 16 GEMMs
// per chunk of tiles. See
// "Winograd F(2x2, 3x3)" and wino_pays for the measurements behind the choice.
#include "common.h"
#include "gemm.h"
#include "im2col.h"
#include "kernels.h"

#include <pybind11/stl.h>

#include <atomic>
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
    index_t itemsize;
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
    c.itemsize = itemsize;
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

// ---- Winograd F(2x2, 3x3): 3x3, stride 1, dilation 1, one group, padding <= 2 ----
//
// Each 2x2 block of outputs ("tile") is computed from the 4x4 input patch d above it as
//
//   y (2x2) = A^T [ U (.) V ] A,   U = G g G^T (4x4, per filter and channel),
//                                  V = B^T d B (4x4, per tile and channel)
//
//   B^T = [1 0 -1 0; 0 1 1 0; 0 -1 1 0; 0 1 0 -1],  G = [1 0 0; .5 .5 .5; .5 -.5 .5; 0 0 1],
//   A^T = [1 1 1 0; 0 1 -1 -1],
//
// and the sum over channels of U (.) V is, for each of the 16 positions p of the 4x4,
// a GEMM:  M[p] (K, tiles) = U[p] (K, C) @ V[p] (C, tiles).  16 * K*C multiply-adds a tile
// against the direct convolution's 36 (2.25x fewer), plus the transforms (adds only, about
// 2 * 16 per tile and channel). F(2x2, 3x3) keeps float32 accuracy (coefficients 1 and .5,
// errors of a few ulp more than the direct sum); F(4x4, 3x3) would save more but its
// transforms amplify rounding ~10-100x, too much for 1e-4 parity with PyTorch.
//
// Per chunk of samples (about kWinoTiles tiles, see make_wino), in per-thread buffers:
// the input transform into V (16, C, tiles), 16 calls of gemm.h's GEMM into M (16, K,
// tiles), the output transform into y (NCHW, + bias). The input tiles are read from a
// zero-padded copy of each plane ((2*TH + 2) x (2*TW + 2), TH x TW tiles; odd outputs
// compute a row / column that is not written), so any padding 0..2 needs no bounds logic.
// The input gradient of a stride-1 3x3 conv is the flipped-kernel 3x3 conv (padding
// 2 - p), so it takes the same path. The weight gradient is the adjoint of the same chain:
//
//   dU[p] (K, C) += dM[p] (K, tiles) @ V[p]^T (tiles, C),  dM = A gy_tile A^T (4x4 from
//   the 2x2 output gradient of the tile), gW = G^T dU G per filter and channel,
//
// one dU per thread, summed in a fixed order: the same bits on every run.

// 0: never, 1: where it measured faster (wino_pays), 2: wherever it fits (the tests)
std::atomic<int> g_wino_mode{1};
std::atomic<long long> g_wino_calls[3];  // forward, input gradient, weight gradient

// Tiles per chunk: V and M of a chunk (16 * (C + K) * tiles values) stay near L2.
constexpr index_t kWinoTiles = 128;

struct Wino {
    index_t C, K, H, W, OH, OW, ph, pw;
    index_t TH, TW, tiles;  // tiles per sample
    index_t Hp, Wp;         // the zero-padded plane the input tiles are read from
};

inline bool wino_fits(const Conv& c) {
    const ConvGeom& g = c.g;
    return c.G == 1 && g.kh == 3 && g.kw == 3 && g.sh == 1 && g.sw == 1 && g.dh == 1 &&
           g.dw == 1 && g.ph <= 2 && g.pw <= 2;
}

enum WinoUse { kWinoForward, kWinoInputGrad, kWinoWeightGrad };

// Where Winograd beats the direct paths (measured; the numbers are at its definition).
// kWinoInputGrad is asked about the flipped convolution (C and K swapped).
bool wino_pays(const Conv& c, WinoUse use);

inline bool use_wino(const Conv& c, WinoUse use) {
    const int mode = g_wino_mode.load(std::memory_order_relaxed);
    if (mode == 0 || !wino_fits(c)) return false;
    return mode == 2 || wino_pays(c, use);
}

Wino make_wino(const Conv& c) {
    Wino w;
    w.C = c.C, w.K = c.K, w.H = c.g.H, w.W = c.g.W, w.OH = c.g.OH, w.OW = c.g.OW;
    w.ph = c.g.ph, w.pw = c.g.pw;
    w.TH = (w.OH + 1) / 2, w.TW = (w.OW + 1) / 2, w.tiles = w.TH * w.TW;
    w.Hp = 2 * w.TH + 2, w.Wp = 2 * w.TW + 2;  // >= H + 2p: the input and its padding fit
    return w;
}

// The chunking of make_conv with Winograd's chunk size.
Conv wino_chunks(const Conv& c, const Wino& w) {
    Conv cw = c;
    cw.B = balanced_batch(c.N, std::min(std::max<index_t>(1, kWinoTiles / w.tiles),
                                        (c.N + 1) / 2));
    return cw;
}

// U[p] (16, C, K) = G g G^T of each 3x3 filter w (K, C, 3, 3).
template <typename T>
void wino_weights(const T* w, index_t K, index_t C, T* U) {
    const index_t KC = K * C;
    for (index_t k = 0; k < K; ++k)
        for (index_t c = 0; c < C; ++c) {
            const T* g = w + (k * C + c) * 9;
            T t[4][3];
            for (int j = 0; j < 3; ++j) {
                t[0][j] = g[j];
                t[1][j] = T(0.5) * (g[j] + g[3 + j] + g[6 + j]);
                t[2][j] = T(0.5) * (g[j] - g[3 + j] + g[6 + j]);
                t[3][j] = g[6 + j];
            }
            for (int i = 0; i < 4; ++i) {
                const T u[4] = {t[i][0], T(0.5) * (t[i][0] + t[i][1] + t[i][2]),
                                T(0.5) * (t[i][0] - t[i][1] + t[i][2]), t[i][2]};
                for (int j = 0; j < 4; ++j) U[(i * 4 + j) * KC + c * K + k] = u[j];
            }
        }
}

// gw (K, C, 3, 3) = G^T dU G, dU (16, K, C).
template <typename T>
void wino_weights_adjoint(const T* dU, index_t K, index_t C, T* gw) {
    const index_t KC = K * C;
    for (index_t k = 0; k < K; ++k)
        for (index_t c = 0; c < C; ++c) {
            T u[4][4];
            for (int p = 0; p < 16; ++p) u[p / 4][p % 4] = dU[p * KC + k * C + c];
            T t[3][4];
            for (int j = 0; j < 4; ++j) {
                t[0][j] = u[0][j] + T(0.5) * (u[1][j] + u[2][j]);
                t[1][j] = T(0.5) * (u[1][j] - u[2][j]);
                t[2][j] = T(0.5) * (u[1][j] + u[2][j]) + u[3][j];
            }
            T* g = gw + (k * C + c) * 9;
            for (int a = 0; a < 3; ++a) {
                g[a * 3 + 0] = t[a][0] + T(0.5) * (t[a][1] + t[a][2]);
                g[a * 3 + 1] = T(0.5) * (t[a][1] - t[a][2]);
                g[a * 3 + 2] = T(0.5) * (t[a][1] + t[a][2]) + t[a][3];
            }
        }
}

// The distance between two positions' matrices: a power of two would put the 16 streams
// of a transform into the same cache sets (5x slower at 8x8); one line more breaks that.
inline index_t wino_ld(index_t n) { return (n + 15) / 16 * 16 + 16; }

// The transforms work channel-last, every tile value a vector over the channels (the
// planes of the small images are too short to vectorize along): a sample's planes are
// transposed into (pixels, channels) first, and the outputs back after. Each transform is
// written once on a vector type VT (GCC vector extensions; the scalar T for the last
// channels) and compiled for AVX-512 and for AVX2 / the baseline, like wgrad_dot.
// (always inlined into the AVX-512 / AVX2 functions: the vector-return ABI note of the
// generic declaration does not apply)
#pragma GCC diagnostic ignored "-Wpsabi"
template <typename VT, typename T>
GD_INLINE_CONV VT vload(const T* p) {
    VT v;
    std::memcpy(&v, p, sizeof(VT));
    return v;
}
template <typename VT, typename T>
GD_INLINE_CONV void vstore(T* p, const VT& v) {
    std::memcpy(p, &v, sizeof(VT));
}

// src (C, H, W) -> dst[h*pitch + w*C + c], 8 channels at a time (8 read streams, each
// write a run of 8).
template <typename T>
GD_INLINE_CONV void planes_to_channels_last(const T* __restrict src, index_t C, index_t H,
                                            index_t W, T* __restrict dst, index_t pitch) {
    const index_t plane = H * W;
    index_t c0 = 0;
    for (; c0 + 8 <= C; c0 += 8)
        for (index_t h = 0; h < H; ++h) {
            const T* s = src + c0 * plane + h * W;
            T* d = dst + h * pitch + c0;
            for (index_t w = 0; w < W; ++w)
#pragma GCC unroll 8
                for (int i = 0; i < 8; ++i) d[w * C + i] = s[i * plane + w];
        }
    for (; c0 < C; ++c0)
        for (index_t h = 0; h < H; ++h)
            for (index_t w = 0; w < W; ++w)
                dst[h * pitch + w * C + c0] = src[c0 * plane + h * W + w];
}

// The adjoint: src[h*pitch + w*C + c] -> dst (C, H, W).
template <typename T>
GD_INLINE_CONV void channels_last_to_planes(const T* __restrict src, index_t C, index_t H,
                                            index_t W, index_t pitch, T* __restrict dst) {
    const index_t plane = H * W;
    index_t c0 = 0;
    for (; c0 + 8 <= C; c0 += 8)
        for (index_t h = 0; h < H; ++h) {
            const T* s = src + h * pitch + c0;
            T* d = dst + c0 * plane + h * W;
            for (index_t w = 0; w < W; ++w)
#pragma GCC unroll 8
                for (int i = 0; i < 8; ++i) d[i * plane + w] = s[w * C + i];
        }
    for (; c0 < C; ++c0)
        for (index_t h = 0; h < H; ++h)
            for (index_t w = 0; w < W; ++w)
                dst[c0 * plane + h * W + w] = src[h * pitch + w * C + c0];
}

// One tile, channels [c, c + lanes): v[p*ld + c] = (B^T d B)[p], d[a][e] at d[a*row + e*C].
template <typename VT, typename T>
GD_INLINE_CONV void wino_in_tile(const T* d, index_t row, index_t C, T* v, index_t ld,
                                 index_t c) {
    VT r[4][4];
#pragma GCC unroll 4
    for (int e = 0; e < 4; ++e) {  // B^T d, column e
        const VT d0 = vload<VT>(d + e * C + c), d1 = vload<VT>(d + row + e * C + c),
                 d2 = vload<VT>(d + 2 * row + e * C + c), d3 = vload<VT>(d + 3 * row + e * C + c);
        r[0][e] = d0 - d2;
        r[1][e] = d1 + d2;
        r[2][e] = d2 - d1;
        r[3][e] = d1 - d3;
    }
#pragma GCC unroll 4
    for (int i = 0; i < 4; ++i) {  // (B^T d) B, row i
        vstore(v + (i * 4 + 0) * ld + c, VT(r[i][0] - r[i][2]));
        vstore(v + (i * 4 + 1) * ld + c, VT(r[i][1] + r[i][2]));
        vstore(v + (i * 4 + 2) * ld + c, VT(r[i][2] - r[i][1]));
        vstore(v + (i * 4 + 3) * ld + c, VT(r[i][1] - r[i][3]));
    }
}

// One tile, filters [k, k + lanes): y0 / y1 (rows of the 2x2, two K-vectors each) =
// A^T m A + bias, m[p] at m[p*ld + k].
template <typename VT, typename T>
GD_INLINE_CONV void wino_out_tile(const T* m, index_t ld, const T* bias, T* y0, T* y1,
                                  index_t K, index_t k) {
    VT s0[4], s1[4];
#pragma GCC unroll 4
    for (int j = 0; j < 4; ++j) {
        const VT a = vload<VT>(m + j * ld + k), bb = vload<VT>(m + (4 + j) * ld + k),
                 cc = vload<VT>(m + (8 + j) * ld + k), d = vload<VT>(m + (12 + j) * ld + k);
        s0[j] = a + bb + cc;
        s1[j] = bb - cc - d;
    }
    const VT add = vload<VT>(bias + k);
    vstore(y0 + k, VT(s0[0] + s0[1] + s0[2] + add));
    vstore(y0 + K + k, VT(s0[1] - s0[2] - s0[3] + add));
    vstore(y1 + k, VT(s1[0] + s1[1] + s1[2] + add));
    vstore(y1 + K + k, VT(s1[1] - s1[2] - s1[3] + add));
}

// The adjoint: g[p*ld + k] = (A dY A^T)[p], dY rows y0 / y1 as above.
template <typename VT, typename T>
GD_INLINE_CONV void wino_out_tile_adjoint(const T* y0, const T* y1, index_t K, T* g,
                                          index_t ld, index_t k) {
    const VT d00 = vload<VT>(y0 + k), d01 = vload<VT>(y0 + K + k), d10 = vload<VT>(y1 + k),
             d11 = vload<VT>(y1 + K + k);
    // s[i][e] = (A dY)[i][e], A = [1 0; 1 1; 1 -1; 0 -1]
    const VT s[4][2] = {{d00, d01}, {d00 + d10, d01 + d11}, {d00 - d10, d01 - d11},
                        {-d10, -d11}};
#pragma GCC unroll 4
    for (int i = 0; i < 4; ++i) {
        vstore(g + (i * 4 + 0) * ld + k, s[i][0]);
        vstore(g + (i * 4 + 1) * ld + k, VT(s[i][0] + s[i][1]));
        vstore(g + (i * 4 + 2) * ld + k, VT(s[i][0] - s[i][1]));
        vstore(g + (i * 4 + 3) * ld + k, VT(-s[i][1]));
    }
}

// V (16, nb*tiles, C) (positions ld apart) = B^T d B of every tile of samples
// [n0, n0 + nb) of x (N, C, H, W); tile t = (b*TH + th)*TW + tw.
template <typename VT, typename T>
GD_INLINE_CONV void wino_input_impl(const T* x, const Wino& wg, index_t n0, index_t nb, T* V,
                                    index_t ld) {
    constexpr index_t L = sizeof(VT) / sizeof(T);
    const index_t C = wg.C, Wp = wg.Wp;
    T* P = scratch<T, 2>(wg.Hp * Wp * C);  // the padded sample, (Hp, Wp, C)
    std::fill(P, P + wg.Hp * Wp * C, T(0));  // the interior is rewritten per sample
    for (index_t b = 0; b < nb; ++b) {
        planes_to_channels_last(x + (n0 + b) * C * wg.H * wg.W, C, wg.H, wg.W,
                                P + (wg.ph * Wp + wg.pw) * C, Wp * C);
        for (index_t th = 0; th < wg.TH; ++th)
            for (index_t tw = 0; tw < wg.TW; ++tw) {
                const index_t t = (b * wg.TH + th) * wg.TW + tw;
                const T* d = P + (2 * th * Wp + 2 * tw) * C;
                T* v = V + t * C;
                index_t c = 0;
                for (; c + L <= C; c += L) wino_in_tile<VT>(d, Wp * C, C, v, ld, c);
                for (; c < C; ++c) wino_in_tile<T>(d, Wp * C, C, v, ld, c);
            }
    }
}

// y[n0 + b] (K, OH, OW) = A^T M A of each tile, plus the bias; M (16, nb*tiles, K).
template <typename VT, typename T>
GD_INLINE_CONV void wino_output_impl(const T* M, index_t ld, const T* bias, const Wino& wg,
                                     index_t n0, index_t nb, T* y) {
    constexpr index_t L = sizeof(VT) / sizeof(T);
    const index_t K = wg.K, W2 = 2 * wg.TW;
    T* Y = scratch<T, 2>(2 * wg.TH * W2 * K);  // one sample's outputs, (2TH, 2TW, K)
    for (index_t b = 0; b < nb; ++b) {
        for (index_t th = 0; th < wg.TH; ++th)
            for (index_t tw = 0; tw < wg.TW; ++tw) {
                const index_t t = (b * wg.TH + th) * wg.TW + tw;
                T* y0 = Y + (2 * th * W2 + 2 * tw) * K;
                T* y1 = y0 + W2 * K;
                index_t k = 0;
                for (; k + L <= K; k += L) wino_out_tile<VT>(M + t * K, ld, bias, y0, y1, K, k);
                for (; k < K; ++k) wino_out_tile<T>(M + t * K, ld, bias, y0, y1, K, k);
            }
        channels_last_to_planes(Y, K, wg.OH, wg.OW, W2 * K, y + (n0 + b) * K * wg.OH * wg.OW);
    }
}

// dM (16, nb*tiles, K) = A gy_tile A^T (the output transform's adjoint) of gy (N, K, OH,
// OW); the positions of a tile past OH / OW count as zero.
template <typename VT, typename T>
GD_INLINE_CONV void wino_output_adjoint_impl(const T* gy, const Wino& wg, index_t n0,
                                             index_t nb, T* G, index_t ld) {
    constexpr index_t L = sizeof(VT) / sizeof(T);
    const index_t K = wg.K, W2 = 2 * wg.TW;
    T* Y = scratch<T, 2>(2 * wg.TH * W2 * K);  // one sample's gy, (2TH, 2TW, K)
    std::fill(Y, Y + 2 * wg.TH * W2 * K, T(0));  // an odd OH / OW leaves a zero row / column
    for (index_t b = 0; b < nb; ++b) {
        planes_to_channels_last(gy + (n0 + b) * K * wg.OH * wg.OW, K, wg.OH, wg.OW, Y, W2 * K);
        for (index_t th = 0; th < wg.TH; ++th)
            for (index_t tw = 0; tw < wg.TW; ++tw) {
                const index_t t = (b * wg.TH + th) * wg.TW + tw;
                const T* y0 = Y + (2 * th * W2 + 2 * tw) * K;
                index_t k = 0;
                for (; k + L <= K; k += L)
                    wino_out_tile_adjoint<VT>(y0, y0 + W2 * K, K, G + t * K, ld, k);
                for (; k < K; ++k) wino_out_tile_adjoint<T>(y0, y0 + W2 * K, K, G + t * K, ld, k);
            }
    }
}

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
#define GD_WINO_AVX512(name, params, args)                                                  \
    template <typename T>                                                                   \
    __attribute__((target("avx512f,avx512dq,avx512vl,avx512bw,fma"))) void name##_avx512 params { \
        typedef T VV __attribute__((vector_size(64)));                                      \
        name##_impl<VV, T> args;                                                            \
    }
#define GD_WINO_PICK(name, args) \
    if (has_avx512()) return name##_avx512<T> args;
#else
#define GD_WINO_AVX512(name, params, args)
#define GD_WINO_PICK(name, args)
#endif
#define GD_WINO_VARIANTS(name, params, args)          \
    GD_WINO_AVX512(name, params, args)                \
    template <typename T>                             \
    GPUDIFF_CLONES void name##_any params {           \
        typedef T VV __attribute__((vector_size(32))); \
        name##_impl<VV, T> args;                      \
    }                                                 \
    template <typename T>                             \
    void name params {                                \
        GD_WINO_PICK(name, args)                      \
        name##_any<T> args;                           \
    }

GD_WINO_VARIANTS(wino_input,
                 (const T* x, const Wino& wg, index_t n0, index_t nb, T* V, index_t ld),
                 (x, wg, n0, nb, V, ld))
GD_WINO_VARIANTS(wino_output,
                 (const T* M, index_t ld, const T* bias, const Wino& wg, index_t n0, index_t nb,
                  T* y),
                 (M, ld, bias, wg, n0, nb, y))
GD_WINO_VARIANTS(wino_output_adjoint,
                 (const T* gy, const Wino& wg, index_t n0, index_t nb, T* G, index_t ld),
                 (gy, wg, n0, nb, G, ld))

// 16 channels by 16 filters (ResNet's stage 1): gemm.h's 8 x 32 micro-tiles would be half
// empty and 16 deep, so a register-resident kernel takes these GEMMs where the vector holds
// exactly 16 values (float, AVX-512): the 16 x 16 operand lives in 16 registers.
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
// C (R, 16) = A (R, 16; rows lda apart) @ B (16, 16), rows of C ldc apart.
template <typename T>
__attribute__((target("avx512f,avx512dq,avx512vl,avx512bw,fma"))) void gemm16_nn(
    index_t R, const T* A, index_t lda, const T* B, T* Cm, index_t ldc) {
    typedef T VT __attribute__((vector_size(64)));
    constexpr int RB = 8;
    VT b[16];
#pragma GCC unroll 16
    for (int d = 0; d < 16; ++d) b[d] = vload<VT>(B + d * 16);
    index_t r = 0;
    for (; r + RB <= R; r += RB) {
        VT acc[RB];
#pragma GCC unroll 8
        for (int i = 0; i < RB; ++i) acc[i] = VT{};
#pragma GCC unroll 16
        for (int d = 0; d < 16; ++d)
#pragma GCC unroll 8
            for (int i = 0; i < RB; ++i) acc[i] += A[(r + i) * lda + d] * b[d];
#pragma GCC unroll 8
        for (int i = 0; i < RB; ++i) vstore(Cm + (r + i) * ldc, acc[i]);
    }
    for (; r < R; ++r) {
        VT acc = VT{};
#pragma GCC unroll 16
        for (int d = 0; d < 16; ++d) acc += A[r * lda + d] * b[d];
        vstore(Cm + r * ldc, acc);
    }
}

// C (16, 16) += A^T (16, R) @ B (R, 16): A (R, 16) and B (R, 16), rows lda / ldb apart.
template <typename T>
__attribute__((target("avx512f,avx512dq,avx512vl,avx512bw,fma"))) void gemm16_tn(
    index_t R, const T* A, index_t lda, const T* B, index_t ldb, T* Cm) {
    typedef T VT __attribute__((vector_size(64)));
    VT acc[16];
#pragma GCC unroll 16
    for (int k = 0; k < 16; ++k) acc[k] = VT{};
    for (index_t r = 0; r < R; ++r) {
        const VT v = vload<VT>(B + r * ldb);
#pragma GCC unroll 16
        for (int k = 0; k < 16; ++k) acc[k] += A[r * lda + k] * v;
    }
#pragma GCC unroll 16
    for (int k = 0; k < 16; ++k) vstore(Cm + k * 16, VT(vload<VT>(Cm + k * 16) + acc[k]));
}
#endif

// Whether gemm16_* takes a 16 x 16 GEMM of T here.
template <typename T>
inline bool gemm16_fits(index_t rows, index_t cols) {
    return rows == 16 && cols == 16 && sizeof(T) * 16 == 64 && has_avx512();
}

template <typename T>
void wino_forward_chunk(const T* x, const T* U, const T* bias, T* y, const Wino& wg, index_t n0,
                        index_t n1) {
    const index_t nb = n1 - n0, Tn = nb * wg.tiles;
    const index_t TC = wino_ld(Tn * wg.C), TK = wino_ld(Tn * wg.K);
    T* V = scratch<T, 0>(16 * TC);
    T* M = scratch<T, 1>(16 * TK);
    wino_input(x, wg, n0, nb, V, TC);
    // M[p] (tiles, K) = V[p] (tiles, C) @ U[p] (C, K)
    for (int p = 0; p < 16; ++p) {
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
        if (gemm16_fits<T>(wg.C, wg.K)) {
            gemm16_nn<T>(Tn, V + p * TC, wg.C, U + p * wg.C * wg.K, M + p * TK, wg.K);
            continue;
        }
#endif
        gemm(false, false, Tn, wg.K, wg.C, V + p * TC, wg.C, U + p * wg.C * wg.K, wg.K, T(0),
             M + p * TK, wg.K);
    }
    wino_output(M, TK, bias, wg, n0, nb, y);
}

// dU (16, K, C) += the chunk's sum over tiles of dM[p]^T V[p].
template <typename T>
void wino_wgrad_chunk(const T* gy, const T* x, T* dU, const Wino& wg, index_t n0, index_t n1) {
    const index_t nb = n1 - n0, Tn = nb * wg.tiles;
    const index_t TC = wino_ld(Tn * wg.C), TK = wino_ld(Tn * wg.K);
    T* V = scratch<T, 0>(16 * TC);
    T* G = scratch<T, 1>(16 * TK);
    wino_input(x, wg, n0, nb, V, TC);
    wino_output_adjoint(gy, wg, n0, nb, G, TK);
    for (int p = 0; p < 16; ++p) {
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
        if (gemm16_fits<T>(wg.K, wg.C)) {
            gemm16_tn<T>(Tn, G + p * TK, wg.K, V + p * TC, wg.C, dU + p * wg.K * wg.C);
            continue;
        }
#endif
        gemm(true, false, wg.K, wg.C, Tn, G + p * TK, wg.K, V + p * TC, wg.C, T(1),
             dU + p * wg.K * wg.C, wg.C);
    }
}

// y = conv(x, w) + b on the Winograd path (also the flipped-kernel input gradient).
template <typename T>
void wino_forward(const T* x, const T* w, const T* bias, T* y, const Conv& c) {
    const Wino wg = make_wino(c);
    std::vector<T> U(size_t(16) * c.K * c.C);
    wino_weights(w, c.K, c.C, U.data());
    std::vector<T> b(c.K, T(0));
    if (bias) std::copy(bias, bias + c.K, b.begin());
    for_chunks(wino_chunks(c, wg), [&](index_t n0, index_t n1, int) {
        wino_forward_chunk<T>(x, U.data(), b.data(), y, wg, n0, n1);
    });
}

template <typename T>
void wino_wgrad(const T* gy, const T* x, T* gw, const Conv& c) {
    const Wino wg = make_wino(c);
    const index_t size = 16 * c.K * c.C;
    const int threads = max_threads();
    std::vector<T> parts(size_t(threads) * size, T(0));
    for_chunks(wino_chunks(c, wg), [&](index_t n0, index_t n1, int tid) {
        wino_wgrad_chunk<T>(gy, x, parts.data() + tid * size, wg, n0, n1);
    });
    for (int t = 1; t < threads; ++t)
        for (index_t i = 0; i < size; ++i) parts[i] += parts[t * size + i];
    wino_weights_adjoint(parts.data(), c.K, c.C, gw);
}

// Measured on the 2-core AMD EPYC VM (AVX-512), one thread, float32, batch 64, ms from the
// exact path (grid / im2col, flipped grid for the input gradient) to Winograd, best of 24
// (the VM is shared and noisy: the exact 32x32 row from a quiet moment):
//                                     forward        input grad     weight grad
//   ResNet stage 3, 64 ch, 8x8        3.96 -> 1.89   3.66 -> 2.08   4.09 -> 1.95
//   32 ch 8x8                         1.33 -> 0.58   1.08 -> 0.59   1.34 -> 0.57
//   ResNet stage 2, 32 ch, 16x16      3.90 -> 2.34   3.89 -> 2.26   4.04 -> 2.22
//   MNIST conv2, 32 -> 64, 26x26 p 0  15.6 -> 10.6   18.8 -> 15.8   16.4 -> 12.4
//   ResNet stage 1, 16 ch, 32x32      4.34 -> 2.79   4.49 -> 2.84   5.67 -> 2.54  (gemm16)
//   16 ch 16x16 / 8x8                 1.14 -> 0.58   1.15 -> 0.58   1.58 -> 0.56  (gemm16)
//                                     0.48 -> 0.15   0.50 -> 0.15   0.46 -> 0.14  (gemm16)
//   16 -> 32 ch, 32x32                7.39 -> 6.26   8.46 -> 9.70   8.63 -> 9.47
//   8 ch 16x16                        0.39 -> 1.06   0.39 -> 1.07   0.43 -> 1.04
//   one sample, 64 ch 8x8             0.064 -> 0.15  0.056 -> 0.18  0.10 -> 0.095
// With 16 channels on one side only, the GEMMs are 16 deep or 16 wide for gemm.h's 8 x 32
// tiles and the transforms dominate, except on 8x8 images, where the exact path's padding
// waste is largest; 16 by 16 (float, AVX-512) takes gemm16_*. With few tiles the weight
// transform and the single chunk cost more than they save.
bool wino_pays(const Conv& c, WinoUse) {
    const index_t tiles = c.N * ((c.g.OH + 1) / 2) * ((c.g.OW + 1) / 2);
    const index_t narrow = std::min(c.C, c.K);
    const bool by16 = c.C == 16 && c.K == 16 && c.itemsize == 4 && has_avx512();
    return tiles >= 128 && (narrow >= 32 || by16 || (narrow >= 16 && c.g.OH * c.g.OW <= 64));
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
            if (use_wino(c, kWinoForward)) {
                g_wino_calls[0].fetch_add(1, std::memory_order_relaxed);
                wino_forward<T>(px, pw, pb, py_, c);
            } else {
                const bool grid = takes_grid(c);
                for_chunks(c, [&](index_t n0, index_t n1, int) {
                    if (grid)
                        forward_grid_chunk<T>(px, pw, pb, py_, c, n0, n1);
                    else
                        forward_chunk<T>(px, pw, pb, py_, c, n0, n1);
                });
            }
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
    const bool flippable = groups == 1 && s.first == 1 && s.second == 1 &&
                           p.first <= d.first * (kh - 1) && p.second <= d.second * (kw - 1);
    // ... and 3x3 ones on Winograd's path where its forward pays (same shapes, C <-> K)
    const Conv cf = flippable ? make_conv(c.N, c.K, c.g.OH, c.g.OW, c.C, kh, kw, {1, 1},
                                          {int(d.first * (kh - 1) - p.first),
                                           int(d.second * (kw - 1) - p.second)},
                                          d, 1, gy.itemsize(), name)
                              : c;  // (unused)
    const bool wino = flippable && use_wino(cf, kWinoInputGrad);
    const bool flipped = (flippable && c.K <= 16 && c.C >= 16) ||
                         (takes_grid(c) && c.C >= 4) || wino;
    return dispatch_float(gy, name, [&](auto tag) -> py::array {
        using T = decltype(tag);
        auto gx = empty_array<T>({xs[0], xs[1], xs[2], xs[3]});
        const T *pg = cdata_of<T>(gy), *pw = cdata_of<T>(w);
        T* px = gx.mutable_data();
        if (flipped) {
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
                if (wino) {
                    g_wino_calls[1].fetch_add(1, std::memory_order_relaxed);
                    wino_forward<T>(pg, wf.data(), nullptr, px, cf);
                } else {
                    const bool grid = takes_grid(cf);
                    for_chunks(cf, [&](index_t n0, index_t n1, int) {
                        if (grid)
                            forward_grid_chunk<T>(pg, wf.data(), nullptr, px, cf, n0, n1);
                        else
                            forward_chunk<T>(pg, wf.data(), nullptr, px, cf, n0, n1);
                    });
                }
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
            if (use_wino(c, kWinoWeightGrad)) {
                g_wino_calls[2].fetch_add(1, std::memory_order_relaxed);
                wino_wgrad<T>(pg, px, out, c);
            } else {
                // one zeroed partial sum per thread, added up after the samples
                std::vector<T> parts(size_t(max_threads()) * size, T(0));
                const bool grid = wgrad_takes_grid(c);
                // wgrad_dot wants long rows: kDotColumns or more a chunk
                const bool dot = wgrad_by_dot(c);
                Conv cw = c;
                const index_t per_sample = (c.g.H + c.g.ph) * (c.g.W + c.g.pw);  // grid columns
                if (dot)
                    cw.B = balanced_batch(c.N,
                                          std::min(kDotColumns / per_sample + 1, (c.N + 1) / 2));
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
        }
        return gw;
    });
}

py::tuple conv_winograd_calls() {
    return py::make_tuple(g_wino_calls[0].load(), g_wino_calls[1].load(), g_wino_calls[2].load());
}

int set_conv_winograd(int mode) {
    if (mode < 0 || mode > 2) throw py::value_error("set_conv_winograd: mode must be 0, 1 or 2");
    return g_wino_mode.exchange(mode);
}

bool cpu_has_avx512() { return has_avx512(); }

}  // namespace gpudiff
