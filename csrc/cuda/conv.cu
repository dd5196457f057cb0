// 2-D convolution: forward, input gradient (dgrad) and weight gradient (wgrad), for every
// case the CPU conv2d supports (stride, padding, dilation, groups, rectangular, bias or not).
//
// Shapes (NCHW, contiguous):
//   x (N, C, H, W)   w (K, Cg, KH, KW) with Cg = C / G, Kg = K / G   y (N, K, OH, OW)
//
// Two families of kernels live here; gpudiff/backend/cuda_cnn.py picks per shape.
//
// 1. Implicit GEMM. Per group g, each pass is one matrix product whose operands are
//    gathered on the fly from x / w / gy: the im2col matrix is never written to memory.
//      forward  y[k, p]  = sum_r  w[k, r]      * col[r, p]       p = (n, oh, ow), r = (c, i, j)
//      dgrad    gx[c, q] = sum_s  wt[c, s]     * gycol[s, q]     q = (n, ih, iw), s = (k, i, j)
//      wgrad    gw[k, r] = sum_p  gy[k, p]     * col^T[p, r]
//    A block computes a BM x BN tile of the product; the reduction runs in BK-deep steps.
//    Each step's A (BM x BK) and B (BK x BN) tiles are gathered from global memory into
//    registers while the previous step's tiles, staged in shared memory (double-buffered:
//    one barrier per step), feed each thread's TM x TN register tile of outputs. The loads
//    are mapped so that consecutive threads read consecutive addresses (coalesced), and the
//    shared tiles are padded so that the stores into them are free of bank conflicts.
//    wgrad's reduction (N*OH*OW, long) is split over gridDim.z: each split writes its
//    partial tile to a workspace and conv2d_wgrad_reduce sums the splits in a fixed order.
//    No float atomics anywhere: every result is bitwise reproducible.
//    dgrad gathers (a transposed convolution): for stride > 1 most (q, s) pairs are
//    structural zeros that still cost a multiply (see docs/CUDA_KERNELS.md).
//
// 2. Direct kernels: one thread per output element (forward, dgrad), one block per weight
//    element (wgrad, a fixed-order block reduction). They handle every case too, and are the
//    right choice for depthwise convolutions, where a group's GEMM is 1 x KH*KW wide.
//
// Indices: positions inside one operand (p, q, r, s) are int (the wrapper checks they fit);
// global offsets are long long.
#include "common.cuh"

namespace conv {

// The geometry of one convolution, as the kernels' scalar parameters give it.
struct Geom {
    int N, C, H, W, K, OH, OW, KH, KW, SH, SW, PH, PW, DH, DW, G;
    __device__ __forceinline__ int Cg() const { return C / G; }
    __device__ __forceinline__ int Kg() const { return K / G; }
    __device__ __forceinline__ int KHW() const { return KH * KW; }
};

// ---- the register-tiled GEMM main loop -----------------------------------------------------
// Thread (ty, tx) of the block, tx in [0, BN/TN), ty in [0, BM/TM), owns the outputs
// rows ty + i*TY, columns tx + j*TX of the block tile: strided, so that a warp's stores in
// the epilogue hit consecutive columns (coalesced) and its shared-memory reads are
// broadcasts (A) or consecutive words (B).
template <int BM_, int BN_, int BK_, int TM_, int TN_>
struct TileShape {
    static constexpr int BM = BM_, BN = BN_, BK = BK_, TM = TM_, TN = TN_;
    static constexpr int TX = BN / TN, TY = BM / TM;
    static constexpr int NT = TX * TY;  // threads per block
    // Shared tiles are stored k-major (tile[kk][m]); loaders whose threads run along kk
    // write a column at a time, so rows are padded to spread those stores over the banks.
    static constexpr int PAD = 32 / BK;
    static constexpr int LDA = BM + PAD, LDB = BN + PAD;
    static constexpr int A_PER = BM * BK / NT;  // A elements each thread loads per step
    static constexpr int B_PER = BK * BN / NT;
    static_assert(BM % TM == 0 && BN % TN == 0, "tile not divisible by the register tile");
    static_assert(NT % BK == 0 && NT % BN == 0, "a loader needs fixed per-thread columns");
    static_assert(A_PER >= 1 && B_PER >= 1 && A_PER * NT == BM * BK && B_PER * NT == BK * BN,
                  "tile elements must split evenly over the threads");
};

// acc[i][j] += sum over the reduction range [k_begin, k_end) of A[m][k] * B[k][n], for the
// block's tile. LA / LB gather their tiles: fetch(k0, k_end) global -> registers,
// stash(tile) registers -> shared. Every thread of the block calls this with the same
// range (the barriers inside are reached uniformly).
template <typename T, class S, class LA, class LB>
__device__ __forceinline__ void gemm_mainloop(LA& la, LB& lb, int k_begin, int k_end,
                                              T (&acc)[S::TM][S::TN]) {
    __shared__ __align__(16) T As[2][S::BK * S::LDA];  // As[buf][kk * LDA + m]
    __shared__ __align__(16) T Bs[2][S::BK * S::LDB];  // Bs[buf][kk * LDB + n]
    const int tx = threadIdx.x % S::TX, ty = threadIdx.x / S::TX;
    const int steps = k_end > k_begin ? (k_end - k_begin + S::BK - 1) / S::BK : 0;
    if (steps == 0) return;
    la.fetch(k_begin, k_end);
    lb.fetch(k_begin, k_end);
    la.stash(As[0]);
    lb.stash(Bs[0]);
    __syncthreads();
    for (int step = 0; step < steps; ++step) {
        const int cur = step & 1;
        const bool more = step + 1 < steps;
        // next step's global loads are in flight while this step computes
        if (more) {
            la.fetch(k_begin + (step + 1) * S::BK, k_end);
            lb.fetch(k_begin + (step + 1) * S::BK, k_end);
        }
        const T* a_tile = As[cur];
        const T* b_tile = Bs[cur];
GD_UNROLL
        for (int kk = 0; kk < S::BK; ++kk) {
            T a[S::TM], b[S::TN];
GD_UNROLL
            for (int i = 0; i < S::TM; ++i) a[i] = a_tile[kk * S::LDA + ty + i * S::TY];
GD_UNROLL
            for (int j = 0; j < S::TN; ++j) b[j] = b_tile[kk * S::LDB + tx + j * S::TX];
GD_UNROLL
            for (int i = 0; i < S::TM; ++i)
GD_UNROLL
                for (int j = 0; j < S::TN; ++j) acc[i][j] += a[i] * b[j];
        }
        // the other buffer was last read in the previous step, before its closing barrier
        if (more) {
            la.stash(As[cur ^ 1]);
            lb.stash(Bs[cur ^ 1]);
        }
        __syncthreads();
    }
}

// ---- tile loaders --------------------------------------------------------------------------
// "Row" loaders fill an A tile (BM x BK) with threads running along k: thread t loads
// k = k0 + t % BK for rows t / BK + s * (NT / BK). "Column" loaders fill a B tile (BK x BN)
// with threads running along n: column t % BN, k = t / BN + s * (NT / BN); the column's
// decoding is done once. Wgrad's B loader runs along k (its memory order) instead.

// A from a row-major matrix: A[m][k] = a[(row0 + m) * R + k] for m < rows_left. Forward: w
// of group g as (Kg, Cg*KH*KW); dgrad: the transposed weights wt (G*Cg, Kg*KH*KW) that
// cuda_cnn.py prepares (a tiny copy: then this load is as coalesced as the forward's).
template <typename T, class S>
struct RowMajorLoader {
    gptr<const T> a;
    long long row0;  // first row of the tile
    int rows_left;   // rows of this group from row0 on
    int R, kk;
    int m[S::A_PER];
    T reg[S::A_PER];
    __device__ __forceinline__ RowMajorLoader(gptr<const T> a_, long long row0_, int rows_left_,
                                              int R_)
        : a(a_), row0(row0_), rows_left(rows_left_), R(R_), kk(threadIdx.x % S::BK) {
        GD_UNROLL
        for (int s = 0; s < S::A_PER; ++s) m[s] = threadIdx.x / S::BK + s * (S::NT / S::BK);
    }
    __device__ __forceinline__ void fetch(int k0, int k_end) {
        const int k = k0 + kk;
        GD_UNROLL
        for (int s = 0; s < S::A_PER; ++s)
            reg[s] = (m[s] < rows_left && k < k_end) ? a[(row0 + m[s]) * R + k] : T(0);
    }
    __device__ __forceinline__ void stash(T* tile) const {
        GD_UNROLL
        for (int s = 0; s < S::A_PER; ++s) tile[kk * S::LDA + m[s]] = reg[s];
    }
};

// forward B: col[r, p] of group g, gathered from x; the thread's column p is fixed
template <typename T, class S>
struct FwdImageLoader {
    gptr<const T> x;
    long long base;  // x offset of (n, g*Cg, 0, 0)
    int ih0, iw0;    // top-left tap of output (oh, ow)
    bool valid;      // p < N*OH*OW
    int n_local;
    int H, W, KW, KHW, DH, DW;
    T reg[S::B_PER];
    __device__ __forceinline__ FwdImageLoader(gptr<const T> x_, const Geom& q, int g, int p0)
        : x(x_), H(q.H), W(q.W), KW(q.KW), KHW(q.KHW()), DH(q.DH), DW(q.DW) {
        n_local = threadIdx.x % S::BN;
        const int p = p0 + n_local;
        const int OHW = q.OH * q.OW;
        valid = p < q.N * OHW;
        const int n = valid ? p / OHW : 0, rem = valid ? p - n * OHW : 0;
        const int oh = rem / q.OW, ow = rem - oh * q.OW;
        ih0 = oh * q.SH - q.PH;
        iw0 = ow * q.SW - q.PW;
        base = ((long long)n * q.C + (long long)g * q.Cg()) * H * W;
    }
    __device__ __forceinline__ void fetch(int k0, int k_end) {
GD_UNROLL
        for (int s = 0; s < S::B_PER; ++s) {
            const int r = k0 + threadIdx.x / S::BN + s * (S::NT / S::BN);
            const int c = r / KHW, ij = r - c * KHW;
            const int i = ij / KW, j = ij - i * KW;
            const int ih = ih0 + i * DH, iw = iw0 + j * DW;
            const bool in = valid && r < k_end && ih >= 0 && ih < H && iw >= 0 && iw < W;
            reg[s] = in ? x[base + ((long long)c * H + ih) * W + iw] : T(0);
        }
    }
    __device__ __forceinline__ void stash(T* tile) const {
GD_UNROLL
        for (int s = 0; s < S::B_PER; ++s)
            tile[(threadIdx.x / S::BN + s * (S::NT / S::BN)) * S::LDB + n_local] = reg[s];
    }
};

// dgrad B: gycol[s, q] = gy[n, g*Kg + k, oh, ow] where input pixel q = (n, ih, iw) is tap
// (i, j) of output (oh, ow): ih = oh*SH - PH + i*DH. Zero where no such output exists.
template <typename T, class S>
struct DgradGradLoader {
    gptr<const T> gy;
    long long base;  // gy offset of (n, g*Kg, 0, 0)
    int th0, tw0;    // ih + PH, iw + PW
    bool valid;
    int n_local;
    int OH, OW, KW, KHW, SH, SW, DH, DW;
    T reg[S::B_PER];
    __device__ __forceinline__ DgradGradLoader(gptr<const T> gy_, const Geom& q, int g, int q0)
        : gy(gy_), OH(q.OH), OW(q.OW), KW(q.KW), KHW(q.KHW()), SH(q.SH), SW(q.SW), DH(q.DH),
          DW(q.DW) {
        n_local = threadIdx.x % S::BN;
        const int qi = q0 + n_local;
        const int HW = q.H * q.W;
        valid = qi < q.N * HW;
        const int n = valid ? qi / HW : 0, rem = valid ? qi - n * HW : 0;
        const int ih = rem / q.W, iw = rem - ih * q.W;
        th0 = ih + q.PH;
        tw0 = iw + q.PW;
        base = ((long long)n * q.K + (long long)g * q.Kg()) * OH * OW;
    }
    __device__ __forceinline__ void fetch(int k0, int k_end) {
GD_UNROLL
        for (int s = 0; s < S::B_PER; ++s) {
            const int sidx = k0 + threadIdx.x / S::BN + s * (S::NT / S::BN);
            const int k = sidx / KHW, ij = sidx - k * KHW;
            const int i = ij / KW, j = ij - i * KW;
            const int th = th0 - i * DH, tw = tw0 - j * DW;  // = oh*SH, ow*SW when it exists
            const int oh = th / SH, ow = tw / SW;
            const bool in = valid && sidx < k_end && th >= 0 && tw >= 0 && oh * SH == th &&
                            ow * SW == tw && oh < OH && ow < OW;
            reg[s] = in ? gy[base + ((long long)k * OH + oh) * OW + ow] : T(0);
        }
    }
    __device__ __forceinline__ void stash(T* tile) const {
GD_UNROLL
        for (int s = 0; s < S::B_PER; ++s)
            tile[(threadIdx.x / S::BN + s * (S::NT / S::BN)) * S::LDB + n_local] = reg[s];
    }
};

// wgrad A: gy of group g as (Kg, P) with p = (n, oh, ow); threads run along p
template <typename T, class S>
struct WgradGradLoader {
    gptr<const T> gy;
    int K, OHW, kk, rows_left;
    long long row0;  // g*Kg + m0
    int m[S::A_PER];
    T reg[S::A_PER];
    __device__ __forceinline__ WgradGradLoader(gptr<const T> gy_, const Geom& q, int g, int m0)
        : gy(gy_), K(q.K), OHW(q.OH * q.OW), kk(threadIdx.x % S::BK), rows_left(q.Kg() - m0),
          row0((long long)g * q.Kg() + m0) {
GD_UNROLL
        for (int s = 0; s < S::A_PER; ++s) m[s] = threadIdx.x / S::BK + s * (S::NT / S::BK);
    }
    __device__ __forceinline__ void fetch(int k0, int k_end) {
        const int p = k0 + kk;
        const bool in = p < k_end;
        const int n = in ? p / OHW : 0, rem = in ? p - n * OHW : 0;
        const long long off = ((long long)n * K + row0) * OHW + rem;
GD_UNROLL
        for (int s = 0; s < S::A_PER; ++s)
            reg[s] = (in && m[s] < rows_left) ? gy[off + (long long)m[s] * OHW] : T(0);
    }
    __device__ __forceinline__ void stash(T* tile) const {
GD_UNROLL
        for (int s = 0; s < S::A_PER; ++s) tile[kk * S::LDA + m[s]] = reg[s];
    }
};

// wgrad B: col^T[p, r] of group g, r = (c, i, j) fixed per thread and slot, p = k0 + t % BK
template <typename T, class S>
struct WgradImageLoader {
    gptr<const T> x;
    int C, H, W, OW, OHW, SH, SW, kk;
    long long cbase[S::B_PER];  // (g*Cg + c) * H * W, or -1 past the last column
    int ioff[S::B_PER], joff[S::B_PER];  // i*DH - PH, j*DW - PW
    T reg[S::B_PER];
    __device__ __forceinline__ WgradImageLoader(gptr<const T> x_, const Geom& q, int g, int r0)
        : x(x_), C(q.C), H(q.H), W(q.W), OW(q.OW), OHW(q.OH * q.OW), SH(q.SH), SW(q.SW),
          kk(threadIdx.x % S::BK) {
        const int R = q.Cg() * q.KHW();
GD_UNROLL
        for (int s = 0; s < S::B_PER; ++s) {
            const int r = r0 + threadIdx.x / S::BK + s * (S::NT / S::BK);
            const int c = r / q.KHW(), ij = r - c * q.KHW();
            const int i = ij / q.KW, j = ij - i * q.KW;
            cbase[s] = r < R ? ((long long)g * q.Cg() + c) * H * W : -1;
            ioff[s] = i * q.DH - q.PH;
            joff[s] = j * q.DW - q.PW;
        }
    }
    __device__ __forceinline__ void fetch(int k0, int k_end) {
        const int p = k0 + kk;
        const bool in = p < k_end;
        const int n = in ? p / OHW : 0, rem = in ? p - n * OHW : 0;
        const int oh = rem / OW, ow = rem - oh * OW;
        const long long nbase = (long long)n * C * H * W;
GD_UNROLL
        for (int s = 0; s < S::B_PER; ++s) {
            const int ih = oh * SH + ioff[s], iw = ow * SW + joff[s];
            const bool ok = in && cbase[s] >= 0 && ih >= 0 && ih < H && iw >= 0 && iw < W;
            reg[s] = ok ? x[nbase + cbase[s] + (long long)ih * W + iw] : T(0);
        }
    }
    __device__ __forceinline__ void stash(T* tile) const {
GD_UNROLL
        for (int s = 0; s < S::B_PER; ++s)
            tile[kk * S::LDB + threadIdx.x / S::BK + s * (S::NT / S::BK)] = reg[s];
    }
};

template <typename T, int TM, int TN>
__device__ __forceinline__ void zero(T (&acc)[TM][TN]) {
GD_UNROLL
    for (int i = 0; i < TM; ++i)
GD_UNROLL
        for (int j = 0; j < TN; ++j) acc[i][j] = T(0);
}

// ---- direct kernels' helpers ---------------------------------------------------------------
// A grid-stride loop index over `total` elements.
__device__ __forceinline__ long long first_index() {
    return (long long)blockIdx.x * blockDim.x + threadIdx.x;
}
__device__ __forceinline__ long long grid_stride() { return (long long)gridDim.x * blockDim.x; }

}  // namespace conv

// ============================ implicit GEMM kernels ==========================================
// Grid: x over output columns (BN per block), y over output rows (BM per block), z over
// groups (and, for wgrad, splits). Block: S::NT threads, 1-D.

// Tile shapes the backend instantiates (template arguments BM, BN, BK, TM, TN):
//   L = 64, 64, 8, 4, 4   wide GEMMs: 256 threads, a 4x4 register tile each
//   S = 16, 64, 16, 1, 4  few output rows (Kg or Cg <= 16: the first layers of small nets)
// They are spelled out in the kernel list below: the list must give the exact name
// expressions (a macro would not be expanded in the emulator's registration string).

// y = conv2d(x, w) + b. x (N, C, H, W), w (K, C/G, KH, KW), b (K,) read when has_bias,
// y (N, K, OH, OW).
template <typename T, int BM, int BN, int BK, int TM, int TN>
__global__ void __launch_bounds__((BM / TM) * (BN / TN))
    conv2d_fwd_igemm(gptr<const T> x, gptr<const T> w, gptr<const T> b, gptr<T> y, int N, int C,
                     int H, int W, int K, int OH, int OW, int KH, int KW, int SH, int SW, int PH,
                     int PW, int DH, int DW, int G, int has_bias) {
    using S = conv::TileShape<BM, BN, BK, TM, TN>;
    const conv::Geom q{N, C, H, W, K, OH, OW, KH, KW, SH, SW, PH, PW, DH, DW, G};
    const int g = blockIdx.z;
    const int m0 = blockIdx.y * BM, p0 = blockIdx.x * BN;
    conv::RowMajorLoader<T, S> la(w, (long long)g * q.Kg() + m0, q.Kg() - m0,
                                  q.Cg() * q.KHW());
    conv::FwdImageLoader<T, S> lb(x, q, g, p0);
    T acc[TM][TN];
    conv::zero(acc);
    conv::gemm_mainloop<T, S>(la, lb, 0, q.Cg() * q.KHW(), acc);

    const int tx = threadIdx.x % S::TX, ty = threadIdx.x / S::TX;
    const int OHW = OH * OW, P = N * OHW, Kg = q.Kg();
GD_UNROLL
    for (int j = 0; j < TN; ++j) {
        const int p = p0 + tx + j * S::TX;
        if (p >= P) continue;
        const int n = p / OHW, rem = p - n * OHW;
GD_UNROLL
        for (int i = 0; i < TM; ++i) {
            const int m = m0 + ty + i * S::TY;
            if (m >= Kg) continue;
            const int k = g * Kg + m;
            y[((long long)n * K + k) * OHW + rem] = has_bias ? acc[i][j] + b[k] : acc[i][j];
        }
    }
}

// gx = conv2d input gradient. gy (N, K, OH, OW); wt (G, C/G, K/G, KH, KW): the weights
// w (K, C/G, KH, KW) with each group's (k, c) axes swapped; gx (N, C, H, W).
template <typename T, int BM, int BN, int BK, int TM, int TN>
__global__ void __launch_bounds__((BM / TM) * (BN / TN))
    conv2d_dgrad_igemm(gptr<const T> gy, gptr<const T> wt, gptr<T> gx, int N, int C, int H, int W,
                       int K, int OH, int OW, int KH, int KW, int SH, int SW, int PH, int PW,
                       int DH, int DW, int G) {
    using S = conv::TileShape<BM, BN, BK, TM, TN>;
    const conv::Geom q{N, C, H, W, K, OH, OW, KH, KW, SH, SW, PH, PW, DH, DW, G};
    const int g = blockIdx.z;
    const int m0 = blockIdx.y * BM, q0 = blockIdx.x * BN;
    conv::RowMajorLoader<T, S> la(wt, (long long)g * q.Cg() + m0, q.Cg() - m0,
                                  q.Kg() * q.KHW());
    conv::DgradGradLoader<T, S> lb(gy, q, g, q0);
    T acc[TM][TN];
    conv::zero(acc);
    conv::gemm_mainloop<T, S>(la, lb, 0, q.Kg() * q.KHW(), acc);

    const int tx = threadIdx.x % S::TX, ty = threadIdx.x / S::TX;
    const int HW = H * W, Q = N * HW, Cg = q.Cg();
GD_UNROLL
    for (int j = 0; j < TN; ++j) {
        const int qi = q0 + tx + j * S::TX;
        if (qi >= Q) continue;
        const int n = qi / HW, rem = qi - n * HW;
GD_UNROLL
        for (int i = 0; i < TM; ++i) {
            const int m = m0 + ty + i * S::TY;
            if (m >= Cg) continue;
            gx[((long long)n * C + g * Cg + m) * HW + rem] = acc[i][j];
        }
    }
}

// Partial weight gradients. gy (N, K, OH, OW), x (N, C, H, W); split z = blockIdx.z / G
// reduces p in [z*chunk, min(P, (z+1)*chunk)) and writes ws[z] (K, C/G, KH, KW). With one
// split, ws is gw itself.
template <typename T, int BM, int BN, int BK, int TM, int TN>
__global__ void __launch_bounds__((BM / TM) * (BN / TN))
    conv2d_wgrad_igemm(gptr<const T> gy, gptr<const T> x, gptr<T> ws, int N, int C, int H, int W,
                       int K, int OH, int OW, int KH, int KW, int SH, int SW, int PH, int PW,
                       int DH, int DW, int G, int chunk) {
    using S = conv::TileShape<BM, BN, BK, TM, TN>;
    const conv::Geom q{N, C, H, W, K, OH, OW, KH, KW, SH, SW, PH, PW, DH, DW, G};
    const int g = blockIdx.z % G, split = blockIdx.z / G;
    const int m0 = blockIdx.y * BM, r0 = blockIdx.x * BN;
    const int P = N * OH * OW;
    const int p_begin = split * chunk;
    const int p_end = min(P, p_begin + chunk);
    conv::WgradGradLoader<T, S> la(gy, q, g, m0);
    conv::WgradImageLoader<T, S> lb(x, q, g, r0);
    T acc[TM][TN];
    conv::zero(acc);
    conv::gemm_mainloop<T, S>(la, lb, p_begin, p_end, acc);

    const int tx = threadIdx.x % S::TX, ty = threadIdx.x / S::TX;
    const int R = q.Cg() * q.KHW(), Kg = q.Kg();
    const long long out = (long long)split * K * R;
GD_UNROLL
    for (int i = 0; i < TM; ++i) {
        const int m = m0 + ty + i * S::TY;
        if (m >= Kg) continue;
GD_UNROLL
        for (int j = 0; j < TN; ++j) {
            const int r = r0 + tx + j * S::TX;
            if (r < R) ws[out + (long long)(g * Kg + m) * R + r] = acc[i][j];
        }
    }
}

// gw[e] = sum over splits z = 0, 1, ... of ws[z * total + e], in that order. Coalesced.
template <typename T>
__global__ void conv2d_wgrad_reduce(gptr<const T> ws, gptr<T> gw, long long total, int splits) {
    for (long long e = conv::first_index(); e < total; e += conv::grid_stride()) {
        T s = ws[e];
        for (int z = 1; z < splits; ++z) s += ws[(long long)z * total + e];
        gw[e] = s;
    }
}

// ============================ direct kernels =================================================
// One thread per output y[n, k, oh, ow] (consecutive threads: consecutive ow, coalesced).
// Sums over the Cg*KH*KW taps of its group; the weights are re-read from cache.
template <typename T>
__global__ void conv2d_fwd_direct(gptr<const T> x, gptr<const T> w, gptr<const T> b, gptr<T> y,
                                  int N, int C, int H, int W, int K, int OH, int OW, int KH,
                                  int KW, int SH, int SW, int PH, int PW, int DH, int DW, int G,
                                  int has_bias) {
    const int Cg = C / G, Kg = K / G, KHW = KH * KW;
    const long long total = (long long)N * K * OH * OW;
    for (long long e = conv::first_index(); e < total; e += conv::grid_stride()) {
        const int ow = (int)(e % OW);
        const long long t = e / OW;
        const int oh = (int)(t % OH);
        const long long nk = t / OH;
        const int k = (int)(nk % K), n = (int)(nk / K);
        const int g = k / Kg;
        const int ih0 = oh * SH - PH, iw0 = ow * SW - PW;
        T s = T(0);
        for (int c = 0; c < Cg; ++c) {
            const long long xb = ((long long)n * C + g * Cg + c) * H * W;
            const long long wb = ((long long)k * Cg + c) * KHW;
            for (int i = 0; i < KH; ++i) {
                const int ih = ih0 + i * DH;
                if (ih < 0 || ih >= H) continue;
                for (int j = 0; j < KW; ++j) {
                    const int iw = iw0 + j * DW;
                    if (iw < 0 || iw >= W) continue;
                    s += w[wb + i * KW + j] * x[xb + (long long)ih * W + iw];
                }
            }
        }
        y[e] = has_bias ? s + b[k] : s;
    }
}

// One thread per input gradient gx[n, c, ih, iw]: gathers gy over the (k, i, j) whose tap
// lands on (ih, iw). No atomics.
template <typename T>
__global__ void conv2d_dgrad_direct(gptr<const T> gy, gptr<const T> w, gptr<T> gx, int N, int C,
                                    int H, int W, int K, int OH, int OW, int KH, int KW, int SH,
                                    int SW, int PH, int PW, int DH, int DW, int G) {
    const int Cg = C / G, Kg = K / G, KHW = KH * KW;
    const long long total = (long long)N * C * H * W;
    for (long long e = conv::first_index(); e < total; e += conv::grid_stride()) {
        const int iw = (int)(e % W);
        const long long t = e / W;
        const int ih = (int)(t % H);
        const long long nc = t / H;
        const int c = (int)(nc % C), n = (int)(nc / C);
        const int g = c / Cg, cl = c - g * Cg;
        T s = T(0);
        for (int kl = 0; kl < Kg; ++kl) {
            const int k = g * Kg + kl;
            const long long gb = ((long long)n * K + k) * OH * OW;
            const long long wb = ((long long)k * Cg + cl) * KHW;
            for (int i = 0; i < KH; ++i) {
                const int th = ih + PH - i * DH;
                if (th < 0) break;  // th only decreases with i
                const int oh = th / SH;
                if (oh * SH != th || oh >= OH) continue;
                for (int j = 0; j < KW; ++j) {
                    const int tw = iw + PW - j * DW;
                    if (tw < 0) break;
                    const int ow = tw / SW;
                    if (ow * SW != tw || ow >= OW) continue;
                    s += w[wb + i * KW + j] * gy[gb + (long long)oh * OW + ow];
                }
            }
        }
        gx[e] = s;
    }
}

// One block per weight element gw[k, c, i, j] (grid-strided): the block's threads stride over
// p = (n, oh, ow), then a fixed-shape block reduction. blockDim.x a multiple of 32.
template <typename T>
__global__ void conv2d_wgrad_direct(gptr<const T> gy, gptr<const T> x, gptr<T> gw, int N, int C,
                                    int H, int W, int K, int OH, int OW, int KH, int KW, int SH,
                                    int SW, int PH, int PW, int DH, int DW, int G) {
    const int Cg = C / G, Kg = K / G, KHW = KH * KW;
    const int OHW = OH * OW, P = N * OHW;
    const long long total = (long long)K * Cg * KHW;
    for (long long e = blockIdx.x; e < total; e += gridDim.x) {  // uniform over the block
        const int ij = (int)(e % KHW);
        const long long kc = e / KHW;
        const int cl = (int)(kc % Cg), k = (int)(kc / Cg);
        const int i = ij / KW, j = ij - i * KW;
        const int c = (k / Kg) * Cg + cl;
        gd::Sum<T> acc = gd::Sum<T>::identity();
        for (int p = threadIdx.x; p < P; p += blockDim.x) {
            const int n = p / OHW, rem = p - n * OHW;
            const int oh = rem / OW, ow = rem - oh * OW;
            const int ih = oh * SH - PH + i * DH, iw = ow * SW - PW + j * DW;
            if (ih < 0 || ih >= H || iw < 0 || iw >= W) continue;
            acc.v += gy[((long long)n * K + k) * OHW + rem] *
                     x[(((long long)n * C + c) * H + ih) * W + iw];
        }
        acc = gd::block_allreduce(acc);
        if (threadIdx.x == 0) gw[e] = acc.v;
    }
}

GPUDIFF_KERNEL(conv2d_fwd_igemm<float, 64, 64, 8, 4, 4>)
GPUDIFF_KERNEL(conv2d_fwd_igemm<float, 16, 64, 16, 1, 4>)
GPUDIFF_KERNEL(conv2d_fwd_igemm<double, 64, 64, 8, 4, 4>)
GPUDIFF_KERNEL(conv2d_fwd_igemm<double, 16, 64, 16, 1, 4>)
GPUDIFF_KERNEL(conv2d_dgrad_igemm<float, 64, 64, 8, 4, 4>)
GPUDIFF_KERNEL(conv2d_dgrad_igemm<float, 16, 64, 16, 1, 4>)
GPUDIFF_KERNEL(conv2d_dgrad_igemm<double, 64, 64, 8, 4, 4>)
GPUDIFF_KERNEL(conv2d_dgrad_igemm<double, 16, 64, 16, 1, 4>)
GPUDIFF_KERNEL(conv2d_wgrad_igemm<float, 64, 64, 8, 4, 4>)
GPUDIFF_KERNEL(conv2d_wgrad_igemm<float, 16, 64, 16, 1, 4>)
GPUDIFF_KERNEL(conv2d_wgrad_igemm<double, 64, 64, 8, 4, 4>)
GPUDIFF_KERNEL(conv2d_wgrad_igemm<double, 16, 64, 16, 1, 4>)
GPUDIFF_KERNEL(conv2d_wgrad_reduce<float>)
GPUDIFF_KERNEL(conv2d_wgrad_reduce<double>)
GPUDIFF_KERNEL(conv2d_fwd_direct<float>)
GPUDIFF_KERNEL(conv2d_fwd_direct<double>)
GPUDIFF_KERNEL(conv2d_dgrad_direct<float>)
GPUDIFF_KERNEL(conv2d_dgrad_direct<double>)
GPUDIFF_KERNEL(conv2d_wgrad_direct<float>)
GPUDIFF_KERNEL(conv2d_wgrad_direct<double>)
