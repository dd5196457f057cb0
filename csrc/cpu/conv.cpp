// Whole-op 2-D convolution on the CPU: per sample, im2col into a per-thread buffer that
// stays in L2, then one single-threaded GEMM, the samples split over the cores.
//
//   forward  y[n] (K, L)        = W (K, Rg) @ cols[n] (Rg, L) + b      (per group)
//   dgrad    gx[n] = col2im( W^T (Rg, K) @ gy[n] (K, L) )
//   wgrad    gW (K, Rg)         = sum_n gy[n] (K, L) @ cols[n]^T (L, Rg) (a partial per thread)
//
// The output lands in NCHW directly. Compared with one big multi-threaded GEMM over the
// whole batch's columns, nothing of the 9x larger column matrix goes to DRAM, each GEMM
// runs at a single core's full rate (small channel counts make the big GEMM memory-bound),
// and the threads join once per call instead of once per BLAS call.
//
// The GEMM is NumPy's own BLAS: blas_init() is given the path of the OpenBLAS library
// NumPy loaded (scipy-openblas, ILP64 symbols scipy_cblas_[sd]gemm64_) and takes its
// symbols with dlopen(RTLD_NOLOAD). openblas_set_num_threads_local(1) keeps each calling
// thread's GEMM single-threaded without touching NumPy's own setting. Without those
// symbols blas_available() is false and gpudiff/backend/cpu_kernels.py uses NumPy GEMMs.
#include "common.h"
#include "im2col.h"
#include "kernels.h"

#include <dlfcn.h>
#include <pybind11/stl.h>

#include <cstring>

namespace gpudiff {
namespace {

enum : int { kRowMajor = 101, kNoTrans = 111, kTrans = 112 };
using blasint = int64_t;  // ILP64
using sgemm_fn = void (*)(int, int, int, blasint, blasint, blasint, float, const float*, blasint,
                          const float*, blasint, float, float*, blasint);
using dgemm_fn = void (*)(int, int, int, blasint, blasint, blasint, double, const double*,
                          blasint, const double*, blasint, double, double*, blasint);
using set_threads_fn = int (*)(int);

struct Blas {
    sgemm_fn sgemm = nullptr;
    dgemm_fn dgemm = nullptr;
    set_threads_fn set_local_threads = nullptr;
    bool ok() const { return sgemm && dgemm && set_local_threads; }
} blas;

// C (m, n) = alpha * op(A) @ op(B) + beta * C, row-major.
inline void gemm(bool ta, bool tb, blasint m, blasint n, blasint k, float alpha, const float* a,
                 blasint lda, const float* b, blasint ldb, float beta, float* c, blasint ldc) {
    blas.sgemm(kRowMajor, ta ? kTrans : kNoTrans, tb ? kTrans : kNoTrans, m, n, k, alpha, a, lda,
               b, ldb, beta, c, ldc);
}

inline void gemm(bool ta, bool tb, blasint m, blasint n, blasint k, double alpha,
                 const double* a, blasint lda, const double* b, blasint ldb, double beta,
                 double* c, blasint ldc) {
    blas.dgemm(kRowMajor, ta ? kTrans : kNoTrans, tb ? kTrans : kNoTrans, m, n, k, alpha, a, lda,
               b, ldb, beta, c, ldc);
}

// A per-thread scratch buffer that grows and is kept (no page faults on later calls).
template <typename T>
T* scratch(index_t n) {
    static thread_local std::vector<T> buf;
    if (index_t(buf.size()) < n) buf.resize(n);
    return buf.data();
}

struct Conv {
    ConvGeom g;
    index_t N, C, K, G, Cg, Kg, Rg, L;
    bool pointwise;  // 1x1, stride 1, no padding: the columns are the input itself
};

Conv make_conv(index_t N, index_t C, index_t H, index_t W, index_t K, index_t kh, index_t kw,
               std::pair<int, int> s, std::pair<int, int> p, std::pair<int, int> d, int groups,
               const char* name) {
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
    return c;
}

// Runs body(n) for every sample, the samples split over the threads, each thread's GEMMs
// single-threaded. A lone sample runs on the calling thread with BLAS's own threading.
template <typename F>
void for_samples(const Conv& c, F&& body) {
    const bool par = c.N > 1 && parallel_pays(c.N * c.K * c.L * c.Rg / 8);
    if (!par) {
        for (index_t n = 0; n < c.N; ++n) body(n, 0);
        return;
    }
#pragma omp parallel
    {
        const int prev = blas.set_local_threads(1);
#ifdef _OPENMP
        const int tid = omp_get_thread_num();
#else
        const int tid = 0;
#endif
#pragma omp for schedule(static)
        for (index_t n = 0; n < c.N; ++n) body(n, tid);
        blas.set_local_threads(prev);
    }
}

inline int max_threads() {
#ifdef _OPENMP
    return omp_get_max_threads();
#else
    return 1;
#endif
}

// The columns (Rg, L) of group gi of sample x_n (C, H, W), in buf (or x_n itself).
template <typename T>
const T* columns(const T* xn, T* buf, index_t gi, const Conv& c) {
    const index_t plane = c.g.H * c.g.W;
    if (c.pointwise) return xn + gi * c.Cg * plane;
    const index_t rows = c.g.kh * c.g.kw * c.L;
    for (index_t ci = 0; ci < c.Cg; ++ci)
        im2col_plane(xn + (gi * c.Cg + ci) * plane, buf + ci * rows, c.g);
    return buf;
}

template <typename T>
GPUDIFF_CLONES void forward_sample(const T* x, const T* w, const T* b, T* y, const Conv& c,
                                   index_t n) {
    const index_t plane = c.g.H * c.g.W;
    const T* xn = x + n * c.C * plane;
    T* yn = y + n * c.K * c.L;
    T* buf = c.pointwise ? nullptr : scratch<T>(c.Rg * c.L);
    for (index_t gi = 0; gi < c.G; ++gi) {
        const T* cols = columns(xn, buf, gi, c);
        T* out = yn + gi * c.Kg * c.L;
        if (b)  // start from the bias, accumulate the product onto it
            for (index_t k = 0; k < c.Kg; ++k)
                std::fill(out + k * c.L, out + (k + 1) * c.L, b[gi * c.Kg + k]);
        gemm(false, false, c.Kg, c.L, c.Rg, T(1), w + gi * c.Kg * c.Rg, c.Rg, cols, c.L,
             b ? T(1) : T(0), out, c.L);
    }
}

template <typename T>
GPUDIFF_CLONES void dgrad_sample(const T* gy, const T* w, T* gx, const Conv& c, index_t n) {
    const index_t plane = c.g.H * c.g.W;
    const T* gyn = gy + n * c.K * c.L;
    T* gxn = gx + n * c.C * plane;
    T* buf = c.pointwise ? nullptr : scratch<T>(c.Rg * c.L);
    for (index_t gi = 0; gi < c.G; ++gi) {
        // gcols (Rg, L) = W_g^T (Rg, Kg) @ gy_g (Kg, L)
        T* gcols = c.pointwise ? gxn + gi * c.Cg * plane : buf;
        gemm(true, false, c.Rg, c.L, c.Kg, T(1), w + gi * c.Kg * c.Rg, c.Rg,
             gyn + gi * c.Kg * c.L, c.L, T(0), gcols, c.L);
        if (c.pointwise) continue;
        const index_t rows = c.g.kh * c.g.kw * c.L;
        for (index_t ci = 0; ci < c.Cg; ++ci)
            col2im_plane(gcols + ci * rows, gxn + (gi * c.Cg + ci) * plane, c.g);
    }
}

template <typename T>
GPUDIFF_CLONES void wgrad_sample(const T* gy, const T* x, T* gw_part, const Conv& c,
                                 index_t n) {
    const index_t plane = c.g.H * c.g.W;
    const T* xn = x + n * c.C * plane;
    const T* gyn = gy + n * c.K * c.L;
    T* buf = c.pointwise ? nullptr : scratch<T>(c.Rg * c.L);
    for (index_t gi = 0; gi < c.G; ++gi) {
        const T* cols = columns(xn, buf, gi, c);
        // gW_g (Kg, Rg) += gy_g (Kg, L) @ cols^T (L, Rg)
        gemm(false, true, c.Kg, c.Rg, c.L, T(1), gyn + gi * c.Kg * c.L, c.L, cols, c.L, T(1),
             gw_part + gi * c.Kg * c.Rg, c.Rg);
    }
}

void require_blas(const char* name) {
    if (!blas.ok())
        throw std::runtime_error(std::string(name) + ": no BLAS (call blas_init first)");
}

std::pair<int, int> pair_of(py::handle t) {
    auto s = t.cast<py::sequence>();
    return {s[0].cast<int>(), s[1].cast<int>()};
}

}  // namespace

bool blas_init(const std::string& path) {
    void* h = dlopen(path.c_str(), RTLD_NOW | RTLD_NOLOAD);  // the copy NumPy loaded
    if (!h) h = dlopen(path.c_str(), RTLD_NOW | RTLD_LOCAL);
    if (!h) return false;
    blas.sgemm = reinterpret_cast<sgemm_fn>(dlsym(h, "scipy_cblas_sgemm64_"));
    blas.dgemm = reinterpret_cast<dgemm_fn>(dlsym(h, "scipy_cblas_dgemm64_"));
    blas.set_local_threads =
        reinterpret_cast<set_threads_fn>(dlsym(h, "openblas_set_num_threads_local"));
    if (!blas.ok()) blas = Blas{};
    return blas.ok();
}

bool blas_available() { return blas.ok(); }

py::array conv2d_forward(py::array x, py::array w, py::object b, py::object stride,
                         py::object padding, py::object dilation, int groups) {
    const char* name = "conv2d_forward";
    require_blas(name);
    require_ndim(x, 4, name, "x");
    require_ndim(w, 4, name, "w");
    require_contiguous(x, name, "x");
    require_contiguous(w, name, "w");
    require_same_dtype(x, w, name);
    const Conv c = make_conv(x.shape(0), x.shape(1), x.shape(2), x.shape(3), w.shape(0),
                             w.shape(2), w.shape(3), pair_of(stride), pair_of(padding),
                             pair_of(dilation), groups, name);
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
            for_samples(c, [&](index_t n, int) { forward_sample<T>(px, pw, pb, py_, c, n); });
        }
        return y;
    });
}

py::array conv2d_backward_input(py::array gy, py::array w, py::object x_shape, py::object stride,
                                py::object padding, py::object dilation, int groups) {
    const char* name = "conv2d_backward_input";
    require_blas(name);
    require_ndim(gy, 4, name, "gy");
    require_ndim(w, 4, name, "w");
    require_contiguous(gy, name, "gy");
    require_contiguous(w, name, "w");
    require_same_dtype(gy, w, name);
    auto xs = x_shape.cast<std::vector<index_t>>();
    if (xs.size() != 4) throw py::value_error("conv2d_backward_input: x_shape must be 4-D");
    const Conv c = make_conv(xs[0], xs[1], xs[2], xs[3], w.shape(0), w.shape(2), w.shape(3),
                             pair_of(stride), pair_of(padding), pair_of(dilation), groups, name);
    if (gy.shape(0) != c.N || gy.shape(1) != c.K || gy.shape(2) != c.g.OH ||
        gy.shape(3) != c.g.OW || w.shape(1) != c.Cg)
        throw py::value_error("conv2d_backward_input: gy, w and x_shape do not match");
    return dispatch_float(gy, name, [&](auto tag) -> py::array {
        using T = decltype(tag);
        auto gx = empty_array<T>({xs[0], xs[1], xs[2], xs[3]});
        const T *pg = cdata_of<T>(gy), *pw = cdata_of<T>(w);
        T* px = gx.mutable_data();
        {
            py::gil_scoped_release nogil;
            for_samples(c, [&](index_t n, int) { dgrad_sample<T>(pg, pw, px, c, n); });
        }
        return gx;
    });
}

py::array conv2d_backward_weight(py::array gy, py::array x, py::object w_shape,
                                 py::object stride, py::object padding, py::object dilation,
                                 int groups) {
    const char* name = "conv2d_backward_weight";
    require_blas(name);
    require_ndim(gy, 4, name, "gy");
    require_ndim(x, 4, name, "x");
    require_contiguous(gy, name, "gy");
    require_contiguous(x, name, "x");
    require_same_dtype(gy, x, name);
    auto ws = w_shape.cast<std::vector<index_t>>();
    if (ws.size() != 4) throw py::value_error("conv2d_backward_weight: w_shape must be 4-D");
    const Conv c = make_conv(x.shape(0), x.shape(1), x.shape(2), x.shape(3), ws[0], ws[2], ws[3],
                             pair_of(stride), pair_of(padding), pair_of(dilation), groups, name);
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
            for_samples(c, [&](index_t n, int tid) {
                wgrad_sample<T>(pg, px, parts.data() + tid * size, c, n);
            });
            std::copy(parts.begin(), parts.begin() + size, out);
            for (int t = 1; t < max_threads(); ++t)
                for (index_t i = 0; i < size; ++i) out[i] += parts[t * size + i];
        }
        return gw;
    });
}

}  // namespace gpudiff
