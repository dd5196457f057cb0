// A packed, register-blocked GEMM (the BLIS/GotoBLAS loop structure), single-threaded.
//
// Loops, outermost first:  NC columns of C | KC of the depth (B block packed, L3)
//                          | MC rows (A block packed, L2) | NR x MR micro-tiles (L1).
// The micro-kernel keeps an MR x NR tile of C in registers (MR rows, NR = two SIMD vectors)
// and, per step of the depth, loads two vectors of packed B and multiplies them with MR
// broadcast values of packed A: 2*MR fused multiply-adds per 2 + MR loads.
//
// It is written once with GCC vector extensions and compiled three times with the SIMD
// width of the target: AVX-512 (16 floats a vector, MR = 8: 16 accumulators of 32
// registers), AVX2 + FMA (8 floats, MR = 6: 12 of 16) and the SSE2 baseline (4, MR = 4);
// the widest one the CPU supports is picked at run time.
//
// Why our own: the convolution runs one GEMM per thread on cache-resident columns, and on
// recent AMD cores NumPy's OpenBLAS selects its AVX2 kernels (about half of what the
// AVX-512 units do), while the whole point of the per-thread design is the GEMM's rate.
#include "gemm.h"

#include <cstring>
#include <vector>

#define GD_INLINE __attribute__((always_inline)) inline

namespace gpudiff {
namespace {

constexpr index_t KC = 256;   // depth of a packed block: a B micro-panel is KC*NR (L1)
constexpr index_t NC = 2048;  // columns of a packed B block (L3)

template <typename T>
T* packbuf(int slot, index_t n) {
    static thread_local std::vector<T> bufs[2];
    auto& b = bufs[slot];
    if (index_t(b.size()) < n) b.resize(n);
    return b.data();
}

// A GEMM operand: the row-major matrix p with leading dimension ld, or, when rows is set,
// one pointer per row (each row contiguous). The row pointers let a caller hand over a
// matrix that is never built, e.g. the im2col matrix of a 3x3 convolution, whose rows are
// shifted views of one padded input (conv.cpp): packing reads them directly.
template <typename T>
struct Operand {
    const T* p;
    index_t ld;
    const T* const* rows;
    GD_INLINE const T* row(index_t i) const { return rows ? rows[i] : p + i * ld; }
};

// op(A)[i, k] for i in [i0, i0 + mc), k in [k0, k0 + kc) into MR-row panels, column by
// column: Ap[(panel * kc + k) * MR + r]. Rows past M are zero.
template <typename T, int MR>
GD_INLINE void pack_a(bool ta, const Operand<T>& A, index_t M, index_t i0, index_t mc,
                      index_t k0, index_t kc, T* Ap) {
    for (index_t p = 0; p * MR < mc; ++p) {
        T* dst = Ap + p * kc * MR;
        const index_t ib = i0 + p * MR;
        const index_t rows = std::min<index_t>(MR, M - ib);
        if (!ta) {  // row i contiguous along k: MR read streams, one sequential write
            const T* src[MR] = {};
            for (index_t r = 0; r < rows; ++r) src[r] = A.row(ib + r) + k0;
            if (rows == MR) {
                for (index_t k = 0; k < kc; ++k)
#pragma GCC unroll 16
                    for (int r = 0; r < MR; ++r) dst[k * MR + r] = src[r][k];
            } else {
                for (index_t k = 0; k < kc; ++k)
                    for (index_t r = 0; r < rows; ++r) dst[k * MR + r] = src[r][k];
            }
        } else {    // column k contiguous along i
            for (index_t k = 0; k < kc; ++k) {
                const T* src = A.row(k0 + k) + ib;
                for (index_t r = 0; r < rows; ++r) dst[k * MR + r] = src[r];
            }
        }
        for (index_t r = rows; r < MR; ++r)
            for (index_t k = 0; k < kc; ++k) dst[k * MR + r] = T(0);
    }
}

// op(B)[k, j] for k in [k0, k0 + kc), j in [j0, j0 + nc) into NR-column panels, row by row:
// Bp[(panel * kc + k) * NR + c]. Columns past N are zero.
template <typename T, int NR>
GD_INLINE void pack_b(bool tb, const Operand<T>& B, index_t N, index_t k0, index_t kc,
                      index_t j0, index_t nc, T* Bp) {
    for (index_t p = 0; p * NR < nc; ++p) {
        T* dst = Bp + p * kc * NR;
        const index_t jb = j0 + p * NR;
        const index_t cols = std::min<index_t>(NR, N - jb);
        if (!tb) {  // row k contiguous along j
            for (index_t k = 0; k < kc; ++k) {
                const T* src = B.row(k0 + k) + jb;
                T* d = dst + k * NR;
                for (index_t c = 0; c < cols; ++c) d[c] = src[c];
                for (index_t c = cols; c < NR; ++c) d[c] = T(0);
            }
        } else {    // column j contiguous along k: 8 columns at a time, so that only 8
                    // read streams are live (NR rows a power-of-two apart alias in L1)
            const T* src[NR < 8 ? 8 : NR] = {};
            for (index_t c = 0; c < cols; ++c) src[c] = B.row(jb + c) + k0;
            index_t c0 = 0;
            for (; c0 + 8 <= cols; c0 += 8)
                for (index_t k = 0; k < kc; ++k)
#pragma GCC unroll 8
                    for (int c = 0; c < 8; ++c) dst[k * NR + c0 + c] = src[c0 + c][k];
            for (index_t k = 0; k < kc; ++k) {
                for (index_t c = c0; c < cols; ++c) dst[k * NR + c] = src[c][k];
                for (index_t c = cols; c < NR; ++c) dst[k * NR + c] = T(0);
            }
        }
    }
}

// C[0:mr, 0:nr] (+)= Ap (MR-row panel, kc deep) @ Bp (NR = NV vectors wide, kc deep).
template <typename V, typename T, int MR, int NV>
GD_INLINE void micro(index_t kc, const T* __restrict Ap, const T* __restrict Bp, T* C,
                     index_t ldc, bool accumulate, index_t mr, index_t nr) {
    constexpr int W = sizeof(V) / sizeof(T);
    constexpr int NR = NV * W;
    typedef T VU __attribute__((vector_size(sizeof(V)), aligned(sizeof(T))));  // unaligned
    V c[MR][NV];
#pragma GCC unroll 16
    for (int i = 0; i < MR; ++i)
#pragma GCC unroll 2
        for (int v = 0; v < NV; ++v) c[i][v] = V{};
    for (index_t k = 0; k < kc; ++k) {
        V b[NV];
#pragma GCC unroll 2
        for (int v = 0; v < NV; ++v) b[v] = *reinterpret_cast<const VU*>(Bp + k * NR + v * W);
        const T* a = Ap + k * MR;
#pragma GCC unroll 16
        for (int i = 0; i < MR; ++i)
#pragma GCC unroll 2
            for (int v = 0; v < NV; ++v) c[i][v] += b[v] * a[i];
    }
    if (mr == MR && nr == NR) {
#pragma GCC unroll 16
        for (int i = 0; i < MR; ++i)
#pragma GCC unroll 2
            for (int v = 0; v < NV; ++v) {
                VU* r = reinterpret_cast<VU*>(C + i * ldc + v * W);
                *r = accumulate ? *r + c[i][v] : c[i][v];
            }
        return;
    }
    T tile[MR * NR];  // an edge tile: through a buffer, then the valid part
#pragma GCC unroll 16
    for (int i = 0; i < MR; ++i)
#pragma GCC unroll 2
        for (int v = 0; v < NV; ++v) *reinterpret_cast<VU*>(tile + i * NR + v * W) = c[i][v];
    for (index_t i = 0; i < mr; ++i)
        for (index_t j = 0; j < nr; ++j)
            C[i * ldc + j] = accumulate ? C[i * ldc + j] + tile[i * NR + j] : tile[i * NR + j];
}

template <typename V, typename T, int MR, int NV>
GD_INLINE void gemm_impl(bool ta, bool tb, index_t M, index_t N, index_t K, const T* A_,
                         index_t lda, const T* const* Arows, const T* B_, index_t ldb,
                         const T* const* Brows, T beta, T* C, index_t ldc) {
    const Operand<T> A{A_, lda, Arows}, B{B_, ldb, Brows};
    constexpr int NR = NV * int(sizeof(V) / sizeof(T));
    constexpr index_t MC = MR * 10;
    if (M <= 0 || N <= 0) return;
    if (K <= 0) {  // C = beta * C
        for (index_t i = 0; i < M; ++i)
            for (index_t j = 0; j < N; ++j) C[i * ldc + j] = beta == T(0) ? T(0) : C[i * ldc + j];
        return;
    }
    T* Bp = packbuf<T>(0, KC * ((std::min(N, NC) + NR - 1) / NR) * NR);
    T* Ap = packbuf<T>(1, KC * ((std::min(M, MC) + MR - 1) / MR) * MR);
    for (index_t jc = 0; jc < N; jc += NC) {
        const index_t nc = std::min(NC, N - jc);
        for (index_t pc = 0; pc < K; pc += KC) {
            const index_t kc = std::min(KC, K - pc);
            const bool acc = pc > 0 || beta != T(0);
            pack_b<T, NR>(tb, B, N, pc, kc, jc, nc, Bp);
            for (index_t ic = 0; ic < M; ic += MC) {
                const index_t mc = std::min(MC, M - ic);
                pack_a<T, MR>(ta, A, M, ic, mc, pc, kc, Ap);
                for (index_t jr = 0; jr < nc; jr += NR)
                    for (index_t ir = 0; ir < mc; ir += MR)
                        micro<V, T, MR, NV>(kc, Ap + ir * kc, Bp + jr * kc,
                                        C + (ic + ir) * ldc + jc + jr, ldc, acc,
                                        std::min<index_t>(MR, mc - ir),
                                        std::min<index_t>(NR, nc - jr));
            }
        }
    }
}

#define GD_GEMM_ARGS                                                                        \
    bool ta, bool tb, index_t M, index_t N, index_t K, const T *A, index_t lda,             \
        const T *const *Arows, const T *B, index_t ldb, const T *const *Brows, T beta, T *C, \
        index_t ldc
#define GD_GEMM_PASS ta, tb, M, N, K, A, lda, Arows, B, ldb, Brows, beta, C, ldc

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
template <typename T>
__attribute__((target("avx512f,avx512dq,avx512vl,avx512bw,fma"))) void gemm_avx512(
    GD_GEMM_ARGS) {
    typedef T V __attribute__((vector_size(64)));
    gemm_impl<V, T, 8, 2>(GD_GEMM_PASS);
}

template <typename T>
__attribute__((target("avx2,fma"))) void gemm_avx2(GD_GEMM_ARGS) {
    typedef T V __attribute__((vector_size(32)));
    gemm_impl<V, T, 6, 2>(GD_GEMM_PASS);
}
#endif

template <typename T>
void gemm_base(GD_GEMM_ARGS) {
    typedef T V __attribute__((vector_size(16)));
    gemm_impl<V, T, 4, 2>(GD_GEMM_PASS);
}

enum class Isa { base, avx2, avx512 };

Isa isa() {
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
    static const Isa v = [] {
        __builtin_cpu_init();
        if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512dq") &&
            __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512bw"))
            return Isa::avx512;
        if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return Isa::avx2;
        return Isa::base;
    }();
    return v;
#else
    return Isa::base;
#endif
}

template <typename T>
void gemm_dispatch(GD_GEMM_ARGS) {
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
    switch (isa()) {
        case Isa::avx512: return gemm_avx512<T>(GD_GEMM_PASS);
        case Isa::avx2: return gemm_avx2<T>(GD_GEMM_PASS);
        default: break;
    }
#endif
    gemm_base<T>(GD_GEMM_PASS);
}

}  // namespace

void gemm(bool ta, bool tb, index_t M, index_t N, index_t K, const float* A, index_t lda,
          const float* B, index_t ldb, float beta, float* C, index_t ldc) {
    gemm_dispatch<float>(ta, tb, M, N, K, A, lda, nullptr, B, ldb, nullptr, beta, C, ldc);
}

void gemm(bool ta, bool tb, index_t M, index_t N, index_t K, const double* A, index_t lda,
          const double* B, index_t ldb, double beta, double* C, index_t ldc) {
    gemm_dispatch<double>(ta, tb, M, N, K, A, lda, nullptr, B, ldb, nullptr, beta, C, ldc);
}

void gemm_rows(bool ta, bool tb, index_t M, index_t N, index_t K, const float* A, index_t lda,
               const float* const* Arows, const float* B, index_t ldb, const float* const* Brows,
               float beta, float* C, index_t ldc) {
    gemm_dispatch<float>(ta, tb, M, N, K, A, lda, Arows, B, ldb, Brows, beta, C, ldc);
}

void gemm_rows(bool ta, bool tb, index_t M, index_t N, index_t K, const double* A, index_t lda,
               const double* const* Arows, const double* B, index_t ldb,
               const double* const* Brows, double beta, double* C, index_t ldc) {
    gemm_dispatch<double>(ta, tb, M, N, K, A, lda, Arows, B, ldb, Brows, beta, C, ldc);
}

// For the tests: C = op(A) @ op(B) (+ C0), with the shapes checked.
py::array gemm_py(py::array a, py::array b, bool ta, bool tb, py::object c0) {
    const char* name = "gemm";
    require_ndim(a, 2, name, "a");
    require_ndim(b, 2, name, "b");
    require_contiguous(a, name, "a");
    require_contiguous(b, name, "b");
    require_same_dtype(a, b, name);
    const index_t M = ta ? a.shape(1) : a.shape(0), K = ta ? a.shape(0) : a.shape(1);
    const index_t K2 = tb ? b.shape(1) : b.shape(0), N = tb ? b.shape(0) : b.shape(1);
    if (K != K2) throw py::value_error("gemm: inner dimensions differ");
    return dispatch_float(a, name, [&](auto tag) -> py::array {
        using T = decltype(tag);
        py::array_t<T> c({M, N});
        T beta = 0;
        if (!c0.is_none()) {
            auto init = c0.cast<py::array_t<T, py::array::c_style | py::array::forcecast>>();
            if (init.ndim() != 2 || init.shape(0) != M || init.shape(1) != N)
                throw py::value_error("gemm: c0 must be (M, N)");
            std::memcpy(c.mutable_data(), init.data(), sizeof(T) * M * N);
            beta = 1;
        }
        const T *pa = cdata_of<T>(a), *pb = cdata_of<T>(b);
        T* pc = c.mutable_data();
        {
            py::gil_scoped_release nogil;
            gemm(ta, tb, M, N, K, pa, a.shape(1), pb, b.shape(1), beta, pc, N);
        }
        return c;
    });
}

namespace {

// A 2-D array's layout for the GEMM: row-major (ld = row stride) or column-major, i.e. the
// transpose of a row-major array (trans, ld = column stride). False: neither.
bool gemm_layout(const py::array& a, bool& trans, index_t& ld) {
    const index_t item = a.itemsize(), s0 = a.strides(0), s1 = a.strides(1);
    const index_t rows = a.shape(0), cols = a.shape(1);
    if ((s1 == item || cols <= 1) && s0 % item == 0 && s0 / item >= cols && s0 > 0) {
        trans = false, ld = std::max<index_t>(s0 / item, 1);
        return true;
    }
    if ((s0 == item || rows <= 1) && s1 % item == 0 && s1 / item >= rows && s1 > 0) {
        trans = true, ld = std::max<index_t>(s1 / item, 1);
        return true;
    }
    return false;
}

// Multiply-adds above which a matmul splits its columns (or rows) over the threads.
constexpr index_t kMatmulParallelMacs = index_t(1) << 20;

template <typename T>
void matmul_parallel(bool ta, bool tb, index_t M, index_t N, index_t K, const T* A, index_t lda,
                     const T* B, index_t ldb, T* C) {
    if (M * N * K < kMatmulParallelMacs) {
        gemm(ta, tb, M, N, K, A, lda, B, ldb, T(0), C, N);
        return;
    }
#pragma omp parallel
    {
#ifdef _OPENMP
        const index_t t = omp_get_thread_num(), nt = omp_get_num_threads();
#else
        const index_t t = 0, nt = 1;
#endif
        if (N >= 64 * nt) {  // split the columns, in multiples of 32
            const index_t blocks = (N + 31) / 32;
            const index_t j0 = std::min(N, blocks * t / nt * 32);
            const index_t j1 = std::min(N, blocks * (t + 1) / nt * 32);
            if (j1 > j0)
                gemm(ta, tb, M, j1 - j0, K, A, lda, tb ? B + j0 * ldb : B + j0, ldb, T(0),
                     C + j0, N);
        } else {             // few columns: split the rows
            const index_t i0 = M * t / nt, i1 = M * (t + 1) / nt;
            if (i1 > i0)
                gemm(ta, tb, i1 - i0, N, K, ta ? A + i0 : A + i0 * lda, lda, B, ldb, T(0),
                     C + i0 * N, N);
        }
    }
}

}  // namespace

py::object matmul_py(py::array a, py::array b) {
    const char* name = "matmul";
    if (a.ndim() != 2 || b.ndim() != 2) return py::none();
    require_same_dtype(a, b, name);
    const index_t M = a.shape(0), K = a.shape(1), N = b.shape(1);
    if (b.shape(0) != K) throw py::value_error("matmul: inner dimensions differ");
    bool ta, tb;
    index_t lda, ldb;
    if (!gemm_layout(a, ta, lda) || !gemm_layout(b, tb, ldb)) return py::none();
    return dispatch_float(a, name, [&](auto tag) -> py::object {
        using T = decltype(tag);
        py::array_t<T> c({M, N});
        const T *pa = cdata_of<T>(a), *pb = cdata_of<T>(b);
        T* pc = c.mutable_data();
        {
            py::gil_scoped_release nogil;
            matmul_parallel<T>(ta, tb, M, N, K, pa, lda, pb, ldb, pc);
        }
        return std::move(c);
    });
}

}  // namespace gpudiff
