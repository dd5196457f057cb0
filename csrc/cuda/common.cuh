// common.cuh: the one header every csrc/cuda/*.cu kernel file includes.
//
// The same kernel source is compiled three ways:
//   * NVRTC at run time (CuPy RawModule, real GPU)   __CUDACC_RTC__ is defined
//   * nvcc (bench/cuda_resources.py, resource report) __CUDACC__ is defined
//   * g++ for the CPU emulator (gpudiff._cuda_host)   csrc/cuda_host/cuda_host.h was included
//     first and defined GPUDIFF_CUDA_HOST plus the CUDA built-ins on the host
// NVRTC has no standard headers, so nothing here includes one: only CUDA built-ins and our
// own helpers.
//
// Conventions for kernel files:
//   * global-memory pointer parameters are gptr<T> / gptr<const T> (T* __restrict__ on the
//     GPU; a bounds-checked pointer in the emulator that may later trace memory traffic);
//   * our kernels take dynamic shared memory from dynamic_shared<T>() (typed, and the
//     emulator bounds-checks it); cuda-samples' `extern __shared__ T s[];` also works: the
//     emulator build rewrites it to the same call (setup.py, docs/EMULATOR.md);
//   * each kernel instantiation the backend uses is listed once, at the end of its file, as
//     GPUDIFF_KERNEL(name<type>) lines: Python reads these lines for CuPy's
//     name_expressions, the emulator build registers them, nvcc instantiates them.
#pragma once

#if defined(__CUDACC__) || defined(__CUDACC_RTC__)

template <typename T>
using gptr = T* __restrict__;

#define GD_UNROLL _Pragma("unroll")

// the kernel list: NVRTC instantiates through name_expressions, so nothing to emit there;
// nvcc (resource report) needs each template instantiated: taking its address does that.
#if defined(__CUDACC_RTC__)
#define GPUDIFF_KERNEL(...)
#else
#define GD_CAT2(a, b) a##b
#define GD_CAT(a, b) GD_CAT2(a, b)
#define GPUDIFF_KERNEL(...) \
    __attribute__((used)) static void* const GD_CAT(gd_keep_, __COUNTER__) = (void*)&__VA_ARGS__;
#endif

namespace gd {
// Reinterpret a global pointer as another element type (vector loads); bounds travel along
// in the emulator.
template <typename U, typename T>
__device__ __forceinline__ U* gptr_cast(T* p) { return reinterpret_cast<U*>(p); }

template <typename T>
__device__ __forceinline__ unsigned long long address_of(T* p) {
    return reinterpret_cast<unsigned long long>(p);
}
}  // namespace gd

// Dynamic shared memory (the launch's shared_mem bytes), 16-byte aligned. One untyped
// extern array: differently typed `extern __shared__` declarations would conflict when a
// kernel template is instantiated for float and double.
template <typename T>
__device__ __forceinline__ T* dynamic_shared() {
    extern __shared__ __align__(16) unsigned char gd_dynamic_smem[];
    return reinterpret_cast<T*>(gd_dynamic_smem);
}

#elif defined(GPUDIFF_CUDA_HOST)
// the emulator shim (csrc/cuda_host/cuda_host.h) already defined gptr, gd::gptr_cast,
// gd::address_of, dynamic_shared, GPUDIFF_KERNEL and GD_UNROLL
#else
#error "csrc/cuda/*.cu build with NVRTC or nvcc, or on the host after csrc/cuda_host/cuda_host.h"
#endif

namespace gd {

constexpr unsigned FULL_MASK = 0xffffffffu;

// ---- per-dtype math: one name for float and double ------------------------------------
// The float versions call the accurate single-precision functions (expf, not __expf): the
// kernels are memory-bound, so the fast intrinsics would buy nothing and cost accuracy.
__device__ __forceinline__ float exp(float x) { return ::expf(x); }
__device__ __forceinline__ double exp(double x) { return ::exp(x); }
__device__ __forceinline__ float log(float x) { return ::logf(x); }
__device__ __forceinline__ double log(double x) { return ::log(x); }
__device__ __forceinline__ float tanh(float x) { return ::tanhf(x); }
__device__ __forceinline__ double tanh(double x) { return ::tanh(x); }
__device__ __forceinline__ float fmax(float a, float b) { return ::fmaxf(a, b); }
__device__ __forceinline__ double fmax(double a, double b) { return ::fmax(a, b); }

template <typename T> struct Limits;
template <> struct Limits<float> {
    __device__ __forceinline__ static float neg_inf() { return __int_as_float(0xff800000); }
    __device__ __forceinline__ static float nan() { return __int_as_float(0x7fc00000); }
};
template <> struct Limits<double> {
    __device__ __forceinline__ static double neg_inf() {
        return __longlong_as_double(0xfff0000000000000LL);
    }
    __device__ __forceinline__ static double nan() {
        return __longlong_as_double(0x7ff8000000000000LL);
    }
};

// ---- 16-byte vectors for vectorised elementwise kernels -------------------------------
template <typename T> struct Vec16;
template <> struct Vec16<float> {
    using type = float4;
    static constexpr int size = 4;
};
template <> struct Vec16<double> {
    using type = double2;
    static constexpr int size = 2;
};

template <typename F>
__device__ __forceinline__ float4 vmap(float4 a, F f) {
    return make_float4(f(a.x), f(a.y), f(a.z), f(a.w));
}
template <typename F>
__device__ __forceinline__ double2 vmap(double2 a, F f) {
    return make_double2(f(a.x), f(a.y));
}
template <typename F>
__device__ __forceinline__ float4 vmap(float4 a, float4 b, F f) {
    return make_float4(f(a.x, b.x), f(a.y, b.y), f(a.z, b.z), f(a.w, b.w));
}
template <typename F>
__device__ __forceinline__ double2 vmap(double2 a, double2 b, F f) {
    return make_double2(f(a.x, b.x), f(a.y, b.y));
}

template <typename T>
__device__ __forceinline__ bool aligned16(T p) { return (address_of(p) & 15ull) == 0; }

// ---- grid-stride elementwise loops ------------------------------------------------------
// y[i] = f(x[i]) for i < n. 16-byte vector loads/stores when both arrays are 16-byte
// aligned (always true for whole CuPy allocations; views may not be), then a scalar tail.
template <typename T, typename F>
__device__ __forceinline__ void map1(gptr<const T> x, gptr<T> y, long long n, F f) {
    using V = typename Vec16<T>::type;
    constexpr int VN = Vec16<T>::size;
    const long long start = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    const long long stride = (long long)blockDim.x * gridDim.x;
    long long done = 0;
    if (aligned16(x) && aligned16(y)) {  // uniform across the grid
        gptr<const V> xv = gptr_cast<const V>(x);
        gptr<V> yv = gptr_cast<V>(y);
        const long long nv = n / VN;
        for (long long i = start; i < nv; i += stride) yv[i] = vmap(xv[i], f);
        done = nv * VN;
    }
    for (long long i = done + start; i < n; i += stride) y[i] = f(x[i]);
}

// z[i] = f(a[i], b[i]) for i < n, vectorised like map1.
template <typename T, typename F>
__device__ __forceinline__ void map2(gptr<const T> a, gptr<const T> b, gptr<T> z, long long n,
                                     F f) {
    using V = typename Vec16<T>::type;
    constexpr int VN = Vec16<T>::size;
    const long long start = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    const long long stride = (long long)blockDim.x * gridDim.x;
    long long done = 0;
    if (aligned16(a) && aligned16(b) && aligned16(z)) {
        gptr<const V> av = gptr_cast<const V>(a);
        gptr<const V> bv = gptr_cast<const V>(b);
        gptr<V> zv = gptr_cast<V>(z);
        const long long nv = n / VN;
        for (long long i = start; i < nv; i += stride) zv[i] = vmap(av[i], bv[i], f);
        done = nv * VN;
    }
    for (long long i = done + start; i < n; i += stride) z[i] = f(a[i], b[i]);
}

// ---- reductions ---------------------------------------------------------------------------
// Accumulators are small structs with merge() and shfl_xor(); merge must be symmetric
// (merge(a, b) == merge(b, a) bit for bit) so that every lane of a butterfly ends with the
// identical value.

template <typename T>
struct Sum {
    T v;
    __device__ __forceinline__ static Sum identity() { return {T(0)}; }
    __device__ __forceinline__ void merge(const Sum& o) { v += o.v; }
    __device__ __forceinline__ Sum shfl_xor(int m) const {
        return {__shfl_xor_sync(FULL_MASK, v, m)};
    }
};

template <typename T>
struct Sum2 {
    T a, b;
    __device__ __forceinline__ static Sum2 identity() { return {T(0), T(0)}; }
    __device__ __forceinline__ void merge(const Sum2& o) { a += o.a; b += o.b; }
    __device__ __forceinline__ Sum2 shfl_xor(int m) const {
        return {__shfl_xor_sync(FULL_MASK, a, m), __shfl_xor_sync(FULL_MASK, b, m)};
    }
};

// Online softmax statistics of a set of values: m = max, s = sum(exp(x - m)). One exp per
// element, one pass over the data (Milakov & Gimelshein, "Online normalizer calculation").
template <typename T>
struct MaxSum {
    T m, s;
    __device__ __forceinline__ static MaxSum identity() { return {Limits<T>::neg_inf(), T(0)}; }
    __device__ __forceinline__ void add(T x) {
        if (x > m) {  // new maximum: rescale what we have (s * 0 when m was -inf)
            s = s * gd::exp(m - x) + T(1);
            m = x;
        } else if (m != Limits<T>::neg_inf()) {
            s += gd::exp(x - m);  // NaN x lands here and makes s NaN, as it should
        } else if (x != x) {
            s = x;  // NaN before any finite value
        }           // else x == m == -inf: exp(-inf) contributes 0
    }
    __device__ __forceinline__ void merge(const MaxSum& o) {
        const T mn = gd::fmax(m, o.m);
        // a side whose max is the new max keeps its sum as is: avoids exp(-inf - -inf) = NaN
        s = (m == mn ? s : s * gd::exp(m - mn)) + (o.m == mn ? o.s : o.s * gd::exp(o.m - mn));
        m = mn;
    }
    __device__ __forceinline__ MaxSum shfl_xor(int lane_mask) const {
        return {__shfl_xor_sync(FULL_MASK, m, lane_mask), __shfl_xor_sync(FULL_MASK, s, lane_mask)};
    }
};

// All 32 lanes of a (full) warp end with the merge of all 32 values.
template <typename Acc>
__device__ __forceinline__ Acc warp_allreduce(Acc a) {
GD_UNROLL
    for (int lane_mask = 16; lane_mask > 0; lane_mask >>= 1) a.merge(a.shfl_xor(lane_mask));
    return a;
}

// All threads of a 1-D block (blockDim.x a multiple of 32, at most 1024) end with the merge
// of all values. Two barriers: one to publish the warps' partials, one before the shared
// slots can be reused by the next call.
template <typename Acc>
__device__ __forceinline__ Acc block_allreduce(Acc a) {
    __shared__ Acc partial[32];  // one slot per warp
    const int lane = threadIdx.x & 31;
    const int warp = threadIdx.x >> 5;
    const int nwarps = blockDim.x >> 5;
    a = warp_allreduce(a);
    if (lane == 0) partial[warp] = a;
    __syncthreads();
    // every warp reduces the partials itself: no third barrier to broadcast a result
    a = lane < nwarps ? partial[lane] : Acc::identity();
    a = warp_allreduce(a);
    __syncthreads();
    return a;
}

// ---- rows handled by a team of threads ------------------------------------------------
// Row kernels take a (rows, cols) contiguous matrix and give each row to a team:
//   * blockDim = (32, R): a warp per row, R rows per block (small rows; no shared memory,
//     no barriers);
//   * blockDim = (B, 1), B a multiple of 32 up to 512: a block per row (long rows).
// Team lanes stride over the row's columns (coalesced), rows are grid-strided. In the
// block-per-row case every thread of a block runs the same number of row iterations, so the
// barriers inside are reached uniformly.
// Row kernels are declared with GD_ROW_LAUNCH_BOUNDS: at most 512 threads a block
// (row_config in gpudiff/backend/cuda_kernels.py keeps to it) and at least two blocks an SM,
// which caps registers at 64 a thread: 32 resident warps, 50% occupancy on sm_80/sm_90.
#define GD_ROW_LAUNCH_BOUNDS __launch_bounds__(512, 2)

struct RowTeam {
    long long first_row, row_step;
    int lane, size;
    __device__ __forceinline__ RowTeam()
        : first_row((long long)blockIdx.x * blockDim.y + threadIdx.y),
          row_step((long long)gridDim.x * blockDim.y),
          lane(threadIdx.x),
          size(blockDim.x) {}
    template <typename Acc>
    __device__ __forceinline__ Acc allreduce(Acc a) const {
        return blockDim.x == 32 ? warp_allreduce(a) : block_allreduce(a);
    }
};

// ---- short rows: a thread per row, staged through shared memory ------------------------
// A warp per row wastes most of every request when rows are short: a 10-class row is 40
// bytes, so a warp-wide load asks for 40 bytes and touches 2-3 sectors, and a per-row
// scalar (the target) is one 8-byte read per warp. For rows of at most SMALL_ROW_MAX_COLS
// columns the *_small kernels give a block of R = blockDim.x threads (1-D) R consecutive
// rows at a time, a tile of R * cols contiguous elements:
//   1. the block copies the tile into shared memory, consecutive threads reading consecutive
//      elements (every sector fully used);
//   2. each thread works on its own row in shared memory with a SoloTeam (the row functions
//      are written once for any team);
//   3. the block copies the results back the same way.
// Shared rows are ld = cols | 1 elements apart: with an odd stride, R threads reading
// column c of their rows hit R distinct 4-byte banks.
constexpr int SMALL_ROW_MAX_COLS = 32;

__device__ __forceinline__ int small_row_ld(int cols) { return cols | 1; }

// s[r * ld + c] = src[(row0 + r) * cols + c] for r < nrows, c < cols
template <typename T>
__device__ __forceinline__ void tile_load(gptr<const T> src, T* s, long long row0, int nrows,
                                          int cols, int ld) {
    const long long base = row0 * cols;
    const int n = nrows * cols;
    for (int i = threadIdx.x; i < n; i += blockDim.x) {
        const int r = i / cols;
        s[r * ld + (i - r * cols)] = src[base + i];
    }
}

// dst[(row0 + r) * cols + c] = s[r * ld + c]
template <typename T>
__device__ __forceinline__ void tile_store(const T* s, gptr<T> dst, long long row0, int nrows,
                                           int cols, int ld) {
    const long long base = row0 * cols;
    const int n = nrows * cols;
    for (int i = threadIdx.x; i < n; i += blockDim.x) {
        const int r = i / cols;
        dst[base + i] = s[r * ld + (i - r * cols)];
    }
}

// ---- tensor cores: mma.sync through one wrapper ---------------------------------------------
// D = A * B + C for one warp, fp32 accumulation. Every lane passes its fragment registers in
// the PTX ISA's per-lane layouts ("Matrix Fragments for mma.m16n8k8" (.tf32) and "... for
// mma.m16n8k16 with floating point type"; groupID = lane >> 2, threadID_in_group = lane % 4):
//   m16n8k8 .tf32:  a[4] = A(g, t), A(g+8, t), A(g, t+4), A(g+8, t+4);  b[2] = B(t, g), B(t+4, g)
//   m16n8k16 .f16 / .bf16 (2 elements a register, lower column / row in the low 16 bits):
//                   a[4] = A(g, 2t..2t+1), A(g+8, 2t..), A(g, 2t+8..), A(g+8, 2t+8..);
//                   b[2] = B(2t..2t+1, g), B(2t+8..2t+9, g)
//   c, d[4] = C(g, 2t), C(g, 2t+1), C(g+8, 2t), C(g+8, 2t+1)
// GPU (sm_80+): inline PTX. Emulator: a warp meeting (csrc/cuda_host/emulator.cpp) that
// gathers the 32 lanes' registers and computes the product from these layouts. All 32 lanes
// of the warp must call it together (.aligned); d may alias c.
#define GD_MMA_TILE(NAME)                                                                      \
    template <int MT, int NT>                                                                  \
    __device__ __forceinline__ void NAME##_tile(float (&acc)[MT][NT][4],                       \
                                                const unsigned (&a)[MT][4],                    \
                                                const unsigned (&b)[NT][2]) {                  \
        GD_UNROLL                                                                              \
        for (int i = 0; i < MT; ++i)                                                           \
            GD_UNROLL                                                                          \
            for (int j = 0; j < NT; ++j) NAME(acc[i][j], a[i], b[j], acc[i][j]);               \
    }
// NAME##_tile(acc, a, b): acc[i][j] = a[i] * b[j] + acc[i][j] for an MT x NT grid of tiles of
// one warp: MT * NT of the mma.sync above (on the GPU exactly that loop; in the emulator one
// warp meeting for all of them, the same products with fewer fiber switches).
#if defined(GPUDIFF_CUDA_HOST)
namespace mma_detail {
template <int OP, int MT, int NT>
inline void tile(float (&acc)[MT][NT][4], const unsigned (&a)[MT][4], const unsigned (&b)[NT][2]) {
    gd_host::MmaFragments f[MT * NT];
    for (int i = 0; i < MT; ++i)
        for (int j = 0; j < NT; ++j) {
            gd_host::MmaFragments& x = f[i * NT + j];
            for (int r = 0; r < 4; ++r) x.a[r] = a[i][r], x.c[r] = acc[i][j][r];
            x.b[0] = b[j][0], x.b[1] = b[j][1];
        }
    gd_host::warp_mma(static_cast<gd_host::WarpOp>(OP), f, MT * NT);
    for (int i = 0; i < MT; ++i)
        for (int j = 0; j < NT; ++j)
            for (int r = 0; r < 4; ++r) acc[i][j][r] = f[i * NT + j].d[r];
}
}  // namespace mma_detail
#define GD_MMA(NAME, PTX, OP)                                                                  \
    __device__ __forceinline__ void NAME(float (&d)[4], const unsigned (&a)[4],                \
                                         const unsigned (&b)[2], const float (&c)[4]) {        \
        float acc[1][1][4] = {{{c[0], c[1], c[2], c[3]}}};                                     \
        const unsigned aa[1][4] = {{a[0], a[1], a[2], a[3]}};                                  \
        const unsigned bb[1][2] = {{b[0], b[1]}};                                              \
        mma_detail::tile<static_cast<int>(gd_host::WarpOp::OP)>(acc, aa, bb);                  \
        for (int r = 0; r < 4; ++r) d[r] = acc[0][0][r];                                       \
    }                                                                                          \
    template <int MT, int NT>                                                                  \
    __device__ __forceinline__ void NAME##_tile(float (&acc)[MT][NT][4],                       \
                                                const unsigned (&a)[MT][4],                    \
                                                const unsigned (&b)[NT][2]) {                  \
        mma_detail::tile<static_cast<int>(gd_host::WarpOp::OP)>(acc, a, b);                    \
    }
#elif defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
#define GD_MMA(NAME, PTX, OP)                                                                  \
    __device__ __forceinline__ void NAME(float (&d)[4], const unsigned (&a)[4],                \
                                         const unsigned (&b)[2], const float (&c)[4]) {        \
        asm volatile(PTX " {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "                     \
                     "{%10, %11, %12, %13};\n"                                                 \
                     : "=f"(d[0]), "=f"(d[1]), "=f"(d[2]), "=f"(d[3])                          \
                     : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]),        \
                       "f"(c[0]), "f"(c[1]), "f"(c[2]), "f"(c[3]));                             \
    }                                                                                          \
    GD_MMA_TILE(NAME)
#else  // older GPUs have no mma.sync of these shapes: the wrappers never pick these kernels there
#define GD_MMA(NAME, PTX, OP)                                                                  \
    __device__ __forceinline__ void NAME(float (&d)[4], const unsigned (&)[4],                 \
                                         const unsigned (&)[2], const float (&c)[4]) {         \
        __trap();                                                                              \
    }                                                                                          \
    GD_MMA_TILE(NAME)
#endif
GD_MMA(mma_m16n8k8_tf32, "mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32", MmaTf32)
GD_MMA(mma_m16n8k16_f16, "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32", MmaF16)
GD_MMA(mma_m16n8k16_bf16, "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32", MmaBf16)
#undef GD_MMA
#undef GD_MMA_TILE

// cvt.rna.tf32.f32: x rounded to TF32 (sign, 8 exponent bits, 10 mantissa bits) to nearest,
// ties away from zero, as a float bit pattern whose low 13 bits are zero. The emulator (and a
// GPU without the instruction) computes the same bits: add half of the dropped part's range
// to the magnitude and truncate (a carry into the exponent is the right rounding, up to inf).
__device__ __forceinline__ unsigned tf32_round(float x) {
#if !defined(GPUDIFF_CUDA_HOST) && defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
    unsigned r;
    asm("cvt.rna.tf32.f32 %0, %1;" : "=r"(r) : "f"(x));
    return r;
#else
    const unsigned u = __float_as_uint(x);
    if ((u & 0x7f800000u) == 0x7f800000u) return (u & 0x7fffffu) ? 0x7fffffffu : u;  // NaN, inf
    return (u + 0x1000u) & 0xffffe000u;
#endif
}

// A team of one thread: the row functions' loops run serially, allreduce is the identity.
struct SoloTeam {
    static constexpr int lane = 0, size = 1;
    template <typename Acc>
    __device__ __forceinline__ Acc allreduce(Acc a) const { return a; }
};

}  // namespace gd
