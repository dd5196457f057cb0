// Tensor-core kernels (mma.sync, sm_80+): implicit-GEMM convolution forward, input gradient
// (dgrad) and weight gradient (wgrad), and a GEMM for linear layers / 2-D matmul, in three
// precisions, all with fp32 accumulation:
//   Tf32  fp32 operands rounded to TF32 (cvt.rna.tf32.f32), mma.m16n8k8.tf32
//   F16   IEEE half operands (raw 16-bit patterns), mma.m16n8k16.f16
//   Bf16  bfloat16 operands (raw 16-bit patterns), mma.m16n8k16.bf16
// Outputs are fp32 (the accumulators): the Python wrapper (gpudiff/runtime/cuda/tensor_core.py)
// casts them to the input dtype. Half-precision operands come in as unsigned short arrays:
// no cuda_fp16.h / cuda_bf16.h needed (NVRTC has no standard include path here), and the
// mma only needs the bits.
//
// The products are the same as conv.cu's implicit GEMM (per group g):
//   forward  y[k, p]  = sum_r w[k, r]  * col[r, p]      p = (n, oh, ow), r = (c, i, j)
//   dgrad    gx[c, q] = sum_s wt[c, s] * gycol[s, q]    q = (n, ih, iw), s = (k, i, j)
//   wgrad    gw[k, r] = sum_p gy[k, p] * col[r, p]      (split over blockIdx.z, as conv.cu)
//   gemm     c[m, n]  = sum_k a[m, k] * b[k, n]         a, b with any element strides
//
// Block: 128 threads = 4 warps in a 2 x 2 grid; block tile BM x BN = 64 x 64 outputs, each
// warp 32 x 32 = 2 x 4 mma tiles of 16 x 8. The reduction runs in steps of BKW = 16 32-bit
// words: 16 TF32 elements or 32 half elements (two a word, the lower k in the low half, as
// the f16x2 fragment registers hold them). Both shared tiles are stored row-major in words,
// As[m][kw] and Bs[n][kw] (B transposed), so that every fragment register is ONE shared word
// at the same (row, word) pattern for all three precisions:
//   a = As[g][kw+t], As[g+8][kw+t], As[g][kw+t+4], As[g+8][kw+t+4]    b = Bs[g][kw+t], Bs[g][kw+t+4]
// (g = lane / 4, t = lane % 4; common.cuh lists the PTX layouts this follows). Rows are
// LDW = 20 words apart: the 32 lanes of one fragment load hit 32 different banks.
// Tiles are gathered global -> registers (the next step's loads in flight while this step
// computes) -> shared, double-buffered with one barrier a step, as conv.cu's main loop.
// No ldmatrix, no cp.async: plain loads the emulator runs as they are.
#include "common.cuh"

namespace tc {

constexpr int BM = 64, BN = 64, BKW = 16, LDW = BKW + 4;
constexpr int NT = 128;                 // threads a block (4 warps)
constexpr int WORDS = BM * BKW / NT;    // words each thread loads per tile per step (8)
static_assert(BM == BN, "the loaders share one row count");

// ---- precisions ---------------------------------------------------------------------------
// E: the element type in global memory; KPW: reduction elements a 32-bit word; pack: the
// shared / register word of elements (k, k+1); mma: one warp product of 8 words of depth.
struct Tf32 {
    using E = float;
    static constexpr int KPW = 1;
    __device__ __forceinline__ static unsigned pack(E lo, E) { return gd::tf32_round(lo); }
    __device__ __forceinline__ static void mma(float (&d)[4], const unsigned (&a)[4],
                                               const unsigned (&b)[2], const float (&c)[4]) {
        gd::mma_m16n8k8_tf32(d, a, b, c);
    }
    template <int MT, int NT>
    __device__ __forceinline__ static void mma_tile(float (&acc)[MT][NT][4],
                                                    const unsigned (&a)[MT][4],
                                                    const unsigned (&b)[NT][2]) {
        gd::mma_m16n8k8_tf32_tile(acc, a, b);
    }
};
struct F16 {
    using E = unsigned short;
    static constexpr int KPW = 2;
    __device__ __forceinline__ static unsigned pack(E lo, E hi) {
        return (unsigned)lo | ((unsigned)hi << 16);
    }
    __device__ __forceinline__ static void mma(float (&d)[4], const unsigned (&a)[4],
                                               const unsigned (&b)[2], const float (&c)[4]) {
        gd::mma_m16n8k16_f16(d, a, b, c);
    }
    template <int MT, int NT>
    __device__ __forceinline__ static void mma_tile(float (&acc)[MT][NT][4],
                                                    const unsigned (&a)[MT][4],
                                                    const unsigned (&b)[NT][2]) {
        gd::mma_m16n8k16_f16_tile(acc, a, b);
    }
};
struct Bf16 : F16 {
    __device__ __forceinline__ static void mma(float (&d)[4], const unsigned (&a)[4],
                                               const unsigned (&b)[2], const float (&c)[4]) {
        gd::mma_m16n8k16_bf16(d, a, b, c);
    }
    template <int MT, int NT>
    __device__ __forceinline__ static void mma_tile(float (&acc)[MT][NT][4],
                                                    const unsigned (&a)[MT][4],
                                                    const unsigned (&b)[NT][2]) {
        gd::mma_m16n8k16_bf16_tile(acc, a, b);
    }
};

// The geometry of one convolution, as the kernels' scalar parameters give it (as conv.cu).
struct Geom {
    int N, C, H, W, K, OH, OW, KH, KW, SH, SW, PH, PW, DH, DW, G;
    __device__ __forceinline__ int Cg() const { return C / G; }
    __device__ __forceinline__ int Kg() const { return K / G; }
    __device__ __forceinline__ int KHW() const { return KH * KW; }
};

// ---- operand sources -------------------------------------------------------------------------
// A source gives the elements of one GEMM operand as rows (A: the output row m; B: the output
// column n) by reduction index k. row(i) decodes block-local row i once (a Row, kept in
// registers); at(row, k) reads element k of it (k < the reduction end; the row is valid).

// Strided matrix: element (row, k) = a[(row0 + row) * s_row + k * s_k]. Forward A (the weights
// w of group g as (Kg, Cg*KH*KW)), dgrad A (wt), and both GEMM operands.
template <typename E>
struct Strided {
    gptr<const E> a;
    long long row0, s_row, s_k;
    int rows;  // valid rows from row0 on
    struct Row { long long off; bool valid; };
    __device__ __forceinline__ Row row(int i) const {
        return {(row0 + i) * s_row, i < rows};
    }
    __device__ __forceinline__ E at(const Row& r, int k) const { return a[r.off + k * s_k]; }
};

// forward B, row p = (n, oh, ow): col[r, p] with r = (c, i, j) of group g, gathered from x
template <typename E>
struct FwdImage {
    gptr<const E> x;
    Geom q;
    int g, p0;
    struct Row { long long base; int ih0, iw0; bool valid; };
    __device__ __forceinline__ Row row(int i) const {
        const int p = p0 + i, OHW = q.OH * q.OW;
        const bool valid = p < q.N * OHW;
        const int n = valid ? p / OHW : 0, rem = valid ? p - n * OHW : 0;
        const int oh = rem / q.OW, ow = rem - oh * q.OW;
        return {((long long)n * q.C + (long long)g * q.Cg()) * q.H * q.W, oh * q.SH - q.PH,
                ow * q.SW - q.PW, valid};
    }
    __device__ __forceinline__ E at(const Row& r, int k) const {
        const int c = k / q.KHW(), ij = k - c * q.KHW();
        const int i = ij / q.KW, j = ij - i * q.KW;
        const int ih = r.ih0 + i * q.DH, iw = r.iw0 + j * q.DW;
        const bool in = ih >= 0 && ih < q.H && iw >= 0 && iw < q.W;
        return in ? x[r.base + ((long long)c * q.H + ih) * q.W + iw] : E(0);
    }
};

// dgrad B, row q = (n, ih, iw): gycol[s, q] = gy[n, g*Kg + k, oh, ow] where input pixel
// (ih, iw) is tap (i, j) of output (oh, ow), s = (k, i, j); zero where no such output exists
template <typename E>
struct DgradGrad {
    gptr<const E> gy;
    Geom q;
    int g, q0;
    struct Row { long long base; int th0, tw0; bool valid; };
    __device__ __forceinline__ Row row(int i) const {
        const int qi = q0 + i, HW = q.H * q.W;
        const bool valid = qi < q.N * HW;
        const int n = valid ? qi / HW : 0, rem = valid ? qi - n * HW : 0;
        const int ih = rem / q.W, iw = rem - ih * q.W;
        return {((long long)n * q.K + (long long)g * q.Kg()) * q.OH * q.OW, ih + q.PH,
                iw + q.PW, valid};
    }
    __device__ __forceinline__ E at(const Row& r, int s) const {
        const int k = s / q.KHW(), ij = s - k * q.KHW();
        const int i = ij / q.KW, j = ij - i * q.KW;
        const int th = r.th0 - i * q.DH, tw = r.tw0 - j * q.DW;  // oh*SH, ow*SW if it exists
        const int oh = th / q.SH, ow = tw / q.SW;
        const bool in = th >= 0 && tw >= 0 && oh * q.SH == th && ow * q.SW == tw && oh < q.OH &&
                        ow < q.OW;
        return in ? gy[r.base + ((long long)k * q.OH + oh) * q.OW + ow] : E(0);
    }
};

// wgrad A, row m (output channel g*Kg + m0 + m): gy[n, k, oh, ow] by p = (n, oh, ow)
template <typename E>
struct WgradGrad {
    gptr<const E> gy;
    Geom q;
    int g, m0;
    struct Row { long long off; bool valid; };
    __device__ __forceinline__ Row row(int i) const {
        return {((long long)g * q.Kg() + m0 + i) * q.OH * q.OW, m0 + i < q.Kg()};
    }
    __device__ __forceinline__ E at(const Row& r, int p) const {
        const int OHW = q.OH * q.OW, n = p / OHW;
        return gy[(long long)n * q.K * OHW + r.off + (p - n * OHW)];
    }
};

// wgrad B, row r = (c, i, j) of group g: x[n, g*Cg + c, oh*SH - PH + i*DH, ...] by p
template <typename E>
struct WgradImage {
    gptr<const E> x;
    Geom q;
    int g, r0;
    struct Row { long long cbase; int ioff, joff; bool valid; };
    __device__ __forceinline__ Row row(int i) const {
        const int r = r0 + i, R = q.Cg() * q.KHW();
        const int c = r / q.KHW(), ij = r - c * q.KHW();
        const int ki = ij / q.KW, kj = ij - ki * q.KW;
        return {((long long)g * q.Cg() + c) * q.H * q.W, ki * q.DH - q.PH, kj * q.DW - q.PW,
                r < R};
    }
    __device__ __forceinline__ E at(const Row& r, int p) const {
        const int OHW = q.OH * q.OW, n = p / OHW, rem = p - n * OHW;
        const int oh = rem / q.OW, ow = rem - oh * q.OW;
        const int ih = oh * q.SH + r.ioff, iw = ow * q.SW + r.joff;
        const bool in = ih >= 0 && ih < q.H && iw >= 0 && iw < q.W;
        return in ? x[(long long)n * q.C * q.H * q.W + r.cbase + (long long)ih * q.W + iw] : E(0);
    }
};

// ---- tile loader ------------------------------------------------------------------------------
// Fills a 64-row x BKW-word shared tile from a source, WORDS words a thread. ALONG_K: the
// threads of a row run along k (thread t: word t % 16 of rows t / 16 + 8 s), coalesced where k
// is the source's contiguous axis (weights, gy's p, a row-major GEMM operand). Otherwise the
// threads run along the rows (thread t: row t % 64, words t / 64 + 2 s), coalesced where the
// rows are (the image gathers: consecutive output or input pixels).
// Along rows, the thread's one row is decoded once; along k, its 8 rows are decoded at each
// fetch (kept in registers they made the wgrad kernels spill).
template <class P, class Src, bool ALONG_K>
struct Loader {
    using E = typename P::E;
    Src src;
    typename Src::Row row0;  // along rows: the thread's row
    unsigned reg[WORDS];
    __device__ __forceinline__ int row_of(int s) const {
        return ALONG_K ? (int)threadIdx.x / BKW + s * (NT / BKW) : (int)threadIdx.x % BM;
    }
    __device__ __forceinline__ int word_of(int s) const {
        return ALONG_K ? (int)threadIdx.x % BKW : (int)threadIdx.x / BM + s * (NT / BM);
    }
    __device__ __forceinline__ explicit Loader(const Src& s_) : src(s_) {
        if (!ALONG_K) row0 = src.row(row_of(0));
    }
    __device__ __forceinline__ E element(const typename Src::Row& r, int k, int k_end) const {
        return (r.valid && k < k_end) ? src.at(r, k) : E(0);
    }
    // words of the step whose first reduction index is k0, for reduction indices < k_end
    __device__ __forceinline__ void fetch(int k0, int k_end) {
GD_UNROLL
        for (int s = 0; s < WORDS; ++s) {
            const typename Src::Row r = ALONG_K ? src.row(row_of(s)) : row0;
            const int k = k0 + word_of(s) * P::KPW;
            const E lo = element(r, k, k_end);
            const E hi = P::KPW == 2 ? element(r, k + 1, k_end) : E(0);
            reg[s] = P::pack(lo, hi);
        }
    }
    __device__ __forceinline__ void stash(unsigned* tile) const {
GD_UNROLL
        for (int s = 0; s < WORDS; ++s) tile[row_of(s) * LDW + word_of(s)] = reg[s];
    }
};

// ---- the main loop ----------------------------------------------------------------------------
// acc[mt][nt][i] += the warp's part of A (64 x depth) * B (depth x 64) over reduction indices
// [k_begin, k_end); the warp (wm, wn) owns rows wm*32 + mt*16 + {g, g+8} and columns
// wn*32 + nt*8 + 2t + {0, 1} (the C fragment layout). Every thread of the block calls this
// with the same range (the barriers are reached uniformly).
template <class P, class LA, class LB>
__device__ __forceinline__ void mainloop(LA& la, LB& lb, int k_begin, int k_end,
                                         float (&acc)[2][4][4]) {
    __shared__ __align__(16) unsigned As[2][BM * LDW];
    __shared__ __align__(16) unsigned Bs[2][BN * LDW];
    constexpr int BK = BKW * P::KPW;  // reduction elements a step
    const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
    const int g = lane >> 2, t = lane & 3;
    const int wm = warp >> 1, wn = warp & 1;
    const int steps = k_end > k_begin ? (k_end - k_begin + BK - 1) / BK : 0;
    if (steps == 0) return;
    la.fetch(k_begin, k_end);
    lb.fetch(k_begin, k_end);
    la.stash(As[0]);
    lb.stash(Bs[0]);
    __syncthreads();
    for (int step = 0; step < steps; ++step) {
        const int cur = step & 1;
        const bool more = step + 1 < steps;
        if (more) {
            la.fetch(k_begin + (step + 1) * BK, k_end);
            lb.fetch(k_begin + (step + 1) * BK, k_end);
        }
        const unsigned* a_tile = As[cur];
        const unsigned* b_tile = Bs[cur];
GD_UNROLL
        for (int kw = 0; kw < BKW; kw += 8) {
            unsigned a[2][4], b[4][2];
GD_UNROLL
            for (int mt = 0; mt < 2; ++mt) {
                const unsigned* r0 = a_tile + (wm * 32 + mt * 16 + g) * LDW + kw + t;
                const unsigned* r8 = r0 + 8 * LDW;
                a[mt][0] = r0[0];
                a[mt][1] = r8[0];
                a[mt][2] = r0[4];
                a[mt][3] = r8[4];
            }
GD_UNROLL
            for (int nt = 0; nt < 4; ++nt) {
                const unsigned* c0 = b_tile + (wn * 32 + nt * 8 + g) * LDW + kw + t;
                b[nt][0] = c0[0];
                b[nt][1] = c0[4];
            }
            P::mma_tile(acc, a, b);  // the warp's 2 x 4 mma.sync
        }
        // the other buffer was last read in the previous step, before its closing barrier
        if (more) {
            la.stash(As[cur ^ 1]);
            lb.stash(Bs[cur ^ 1]);
        }
        __syncthreads();
    }
}

// Calls out(m, n, value) for each of the thread's accumulators inside the block's tile
// (block-local row m < BM, column n < BN); out checks the problem's bounds.
template <class Out>
__device__ __forceinline__ void epilogue(const float (&acc)[2][4][4], Out out) {
    const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
    const int g = lane >> 2, t = lane & 3;
    const int wm = warp >> 1, wn = warp & 1;
GD_UNROLL
    for (int mt = 0; mt < 2; ++mt)
GD_UNROLL
        for (int nt = 0; nt < 4; ++nt)
GD_UNROLL
            for (int i = 0; i < 4; ++i)
                out(wm * 32 + mt * 16 + g + 8 * (i >> 1), wn * 32 + nt * 8 + 2 * t + (i & 1),
                    acc[mt][nt][i]);
}

__device__ __forceinline__ void zero(float (&acc)[2][4][4]) {
GD_UNROLL
    for (int mt = 0; mt < 2; ++mt)
GD_UNROLL
        for (int nt = 0; nt < 4; ++nt)
GD_UNROLL
            for (int i = 0; i < 4; ++i) acc[mt][nt][i] = 0.f;
}

}  // namespace tc

// ============================ kernels ==============================================================
// Grid: x over output columns (64 a block), y over output rows (64 a block), z over groups
// (wgrad: groups x splits). Block: 128 threads.

// y (N, K, OH, OW) fp32 = conv2d(x (N, C, H, W), w (K, C/G, KH, KW)) + b (K,) fp32 if has_bias
template <class P>
__global__ void __launch_bounds__(tc::NT, 2)
    conv2d_fwd_tc(gptr<const typename P::E> x, gptr<const typename P::E> w, gptr<const float> b,
                  gptr<float> y, int N, int C, int H, int W, int K, int OH, int OW, int KH, int KW,
                  int SH, int SW, int PH, int PW, int DH, int DW, int G, int has_bias) {
    using E = typename P::E;
    const tc::Geom q{N, C, H, W, K, OH, OW, KH, KW, SH, SW, PH, PW, DH, DW, G};
    const int g = blockIdx.z, m0 = blockIdx.y * tc::BM, p0 = blockIdx.x * tc::BN;
    const int R = q.Cg() * q.KHW(), Kg = q.Kg(), OHW = OH * OW, P_ = N * OHW;
    tc::Loader<P, tc::Strided<E>, true> la(
        tc::Strided<E>{w, (long long)g * Kg + m0, R, 1, Kg - m0});
    tc::Loader<P, tc::FwdImage<E>, false> lb(tc::FwdImage<E>{x, q, g, p0});
    float acc[2][4][4];
    tc::zero(acc);
    tc::mainloop<P>(la, lb, 0, R, acc);
    tc::epilogue(acc, [&](int m, int n, float v) {
        const int p = p0 + n, k = g * Kg + m0 + m;
        if (m0 + m >= Kg || p >= P_) return;
        const int img = p / OHW, rem = p - img * OHW;
        y[((long long)img * K + k) * OHW + rem] = has_bias ? v + b[k] : v;
    });
}

// gx (N, C, H, W) fp32 of y = conv2d(x, w). gy (N, K, OH, OW); wt (G, C/G, K/G, KH, KW): w
// with each group's (k, c) axes swapped (as conv.cu's dgrad).
template <class P>
__global__ void __launch_bounds__(tc::NT, 2)
    conv2d_dgrad_tc(gptr<const typename P::E> gy, gptr<const typename P::E> wt, gptr<float> gx,
                    int N, int C, int H, int W, int K, int OH, int OW, int KH, int KW, int SH,
                    int SW, int PH, int PW, int DH, int DW, int G) {
    using E = typename P::E;
    const tc::Geom q{N, C, H, W, K, OH, OW, KH, KW, SH, SW, PH, PW, DH, DW, G};
    const int g = blockIdx.z, m0 = blockIdx.y * tc::BM, q0 = blockIdx.x * tc::BN;
    const int S = q.Kg() * q.KHW(), Cg = q.Cg(), HW = H * W, Q = N * HW;
    tc::Loader<P, tc::Strided<E>, true> la(
        tc::Strided<E>{wt, (long long)g * Cg + m0, S, 1, Cg - m0});
    tc::Loader<P, tc::DgradGrad<E>, false> lb(tc::DgradGrad<E>{gy, q, g, q0});
    float acc[2][4][4];
    tc::zero(acc);
    tc::mainloop<P>(la, lb, 0, S, acc);
    tc::epilogue(acc, [&](int m, int n, float v) {
        const int qi = q0 + n;
        if (m0 + m >= Cg || qi >= Q) return;
        const int img = qi / HW, rem = qi - img * HW;
        gx[((long long)img * C + g * Cg + m0 + m) * HW + rem] = v;
    });
}

// Partial weight gradients, fp32: split z = blockIdx.z / G reduces p in [z*chunk,
// min(P, (z+1)*chunk)) into ws[z] (K, C/G, KH, KW); with one split ws is gw itself.
// (conv.cu's conv2d_wgrad_reduce<float> sums the splits.)
template <class P>
__global__ void __launch_bounds__(tc::NT, 2)
    conv2d_wgrad_tc(gptr<const typename P::E> gy, gptr<const typename P::E> x, gptr<float> ws,
                    int N, int C, int H, int W, int K, int OH, int OW, int KH, int KW, int SH,
                    int SW, int PH, int PW, int DH, int DW, int G, int chunk) {
    using E = typename P::E;
    const tc::Geom q{N, C, H, W, K, OH, OW, KH, KW, SH, SW, PH, PW, DH, DW, G};
    const int g = blockIdx.z % G, split = blockIdx.z / G;
    const int m0 = blockIdx.y * tc::BM, r0 = blockIdx.x * tc::BN;
    const int P_ = N * OH * OW, R = q.Cg() * q.KHW(), Kg = q.Kg();
    const int p_begin = split * chunk, p_end = min(P_, p_begin + chunk);
    tc::Loader<P, tc::WgradGrad<E>, true> la(tc::WgradGrad<E>{gy, q, g, m0});
    tc::Loader<P, tc::WgradImage<E>, true> lb(tc::WgradImage<E>{x, q, g, r0});
    float acc[2][4][4];
    tc::zero(acc);
    tc::mainloop<P>(la, lb, p_begin, p_end, acc);
    const long long out = (long long)split * K * R;
    tc::epilogue(acc, [&](int m, int n, float v) {
        if (m0 + m >= Kg || r0 + n >= R) return;
        ws[out + (long long)(g * Kg + m0 + m) * R + r0 + n] = v;
    });
}

// c (M, N) fp32 = a (M, K) @ b (K, N), a[m, k] = a[m * sam + k * sak], b[k, n] = b[k * sbk +
// n * sbn] (element strides: transposed operands need no copy). A_K / B_K: which way the
// loads run (along k where the operand's k stride is 1, else along its rows).
template <class P, bool A_K, bool B_K>
__global__ void __launch_bounds__(tc::NT, 2)
    gemm_tc(gptr<const typename P::E> a, gptr<const typename P::E> b, gptr<float> c, int M, int N,
            int K, long long sam, long long sak, long long sbk, long long sbn) {
    using E = typename P::E;
    const int m0 = blockIdx.y * tc::BM, n0 = blockIdx.x * tc::BN;
    tc::Loader<P, tc::Strided<E>, A_K> la(tc::Strided<E>{a, m0, sam, sak, M - m0});
    tc::Loader<P, tc::Strided<E>, B_K> lb(tc::Strided<E>{b, n0, sbn, sbk, N - n0});
    float acc[2][4][4];
    tc::zero(acc);
    tc::mainloop<P>(la, lb, 0, K, acc);
    tc::epilogue(acc, [&](int m, int n, float v) {
        if (m0 + m < M && n0 + n < N) c[(long long)(m0 + m) * N + n0 + n] = v;
    });
}

GPUDIFF_KERNEL(conv2d_fwd_tc<tc::Tf32>)
GPUDIFF_KERNEL(conv2d_fwd_tc<tc::F16>)
GPUDIFF_KERNEL(conv2d_fwd_tc<tc::Bf16>)
GPUDIFF_KERNEL(conv2d_dgrad_tc<tc::Tf32>)
GPUDIFF_KERNEL(conv2d_dgrad_tc<tc::F16>)
GPUDIFF_KERNEL(conv2d_dgrad_tc<tc::Bf16>)
GPUDIFF_KERNEL(conv2d_wgrad_tc<tc::Tf32>)
GPUDIFF_KERNEL(conv2d_wgrad_tc<tc::F16>)
GPUDIFF_KERNEL(conv2d_wgrad_tc<tc::Bf16>)
GPUDIFF_KERNEL(gemm_tc<tc::Tf32, true, true>)
GPUDIFF_KERNEL(gemm_tc<tc::Tf32, true, false>)
GPUDIFF_KERNEL(gemm_tc<tc::Tf32, false, false>)
GPUDIFF_KERNEL(gemm_tc<tc::F16, true, true>)
GPUDIFF_KERNEL(gemm_tc<tc::F16, true, false>)
GPUDIFF_KERNEL(gemm_tc<tc::F16, false, false>)
GPUDIFF_KERNEL(gemm_tc<tc::Bf16, true, true>)
GPUDIFF_KERNEL(gemm_tc<tc::Bf16, true, false>)
GPUDIFF_KERNEL(gemm_tc<tc::Bf16, false, false>)
