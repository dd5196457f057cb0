// Batch normalisation pieces over x viewed as (N, C, S) (S = H*W, or 1 for (N, C) input),
// and dropout with a counter-based mask.
//
//   batch_norm_stats(x)                     -> (mean (C,), var (C,))  biased, two-pass
//   channel_affine(x, a, b)                 -> a[c] * x + b[c]        (normalise + affine)
//   batch_norm_backward_reduce(gy, x, mean) -> (sum gy, sum gy * (x - mean)) per channel
//   channel_affine2(gy, x, a, b, c)         -> a[c] * gy + b[c] * x + c[c]   (gx)
//
// A channel of a (64, C, 32, 32) float batch is 256 KB, so the two statistics passes read it
// from DRAM once and from L2 the second time. Sums accumulate in double.
//
// dropout(x, p, seed, group): y[i] = x[i] * keep(i / group) / (1 - p), with
//   keep(j) = (h(j) >> 8) >= ceil(p * 2^24),
//   h(j)    = mix(mix(lo32(j) ^ k0) + k1 + hi32(j))          (uint32 arithmetic)
//   k0 = mix(lo32(seed) ^ 0x9e3779b9), k1 = mix(hi32(seed) ^ 0x85ebca6b)
//   mix(x): x ^= x >> 16; x *= 0x21f0aaad; x ^= x >> 15; x *= 0x735a2d97; x ^= x >> 15
// The same function is written with xp in gpudiff/ops/norm.py (the reference), so kernel
// and reference give identical masks and the backward re-derives the mask from the seed.
#include "common.h"
#include "kernels.h"

#include <cmath>

namespace gpudiff {
namespace {

struct NCS {
    index_t N, C, S;
};

NCS ncs_of(const py::array& x, const char* name) {
    if (x.ndim() < 2)
        throw py::value_error(std::string(name) + ": expected at least 2 dimensions (N, C, ...)");
    NCS v{x.shape(0), x.shape(1), 1};
    for (py::ssize_t i = 2; i < x.ndim(); ++i) v.S *= x.shape(i);
    return v;
}

template <typename T>
void require_channel_vector(const py::array& v, index_t C, const char* name, const char* arg) {
    require_contiguous(v, name, arg);
    if (v.ndim() != 1 || v.shape(0) != C || !is_native<T>(v.dtype()))
        throw py::value_error(std::string(name) + ": '" + arg + "' must be (C,) of x's dtype");
}

// Batch-norm work splits over the cores from this many elements on: a channel's two passes
// run from its core's own L2, so unlike plain streaming loops two cores do help here.
constexpr index_t kBnParallelGrain = index_t(1) << 18;

// Mean and biased variance of channel c (two passes: the second reads from L2).
template <typename T>
GPUDIFF_CLONES void stats_channel(const T* x, NCS d, index_t c, T* mean, T* var) {
    const double M = double(d.N * d.S);
    double s = 0;
    for (index_t n = 0; n < d.N; ++n) {
        const T* p = x + (n * d.C + c) * d.S;
        T part = 0;  // a plane's partial sum vectorises; planes are short enough for T
        for (index_t i = 0; i < d.S; ++i) part += p[i];
        s += part;
    }
    const T mu = T(s / M);
    double q = 0;
    for (index_t n = 0; n < d.N; ++n) {
        const T* p = x + (n * d.C + c) * d.S;
        T part = 0;
        for (index_t i = 0; i < d.S; ++i) {
            const T z = p[i] - mu;
            part += z * z;
        }
        q += part;
    }
    mean[c] = mu;
    var[c] = T(q / M);
}

// Per-channel mean and biased variance.
template <typename T>
void stats_kernel(const T* x, NCS d, T* mean, T* var) {
    if (d.S == 1) {  // (N, C): accumulate rows, channels contiguous
        const double M = double(d.N);
        std::vector<double> s(d.C, 0.0), q(d.C, 0.0);
        for (index_t n = 0; n < d.N; ++n)
            for (index_t c = 0; c < d.C; ++c) s[c] += x[n * d.C + c];
        for (index_t c = 0; c < d.C; ++c) s[c] /= M;
        for (index_t n = 0; n < d.N; ++n)
            for (index_t c = 0; c < d.C; ++c) {
                const double z = x[n * d.C + c] - s[c];
                q[c] += z * z;
            }
        for (index_t c = 0; c < d.C; ++c) mean[c] = T(s[c]), var[c] = T(q[c] / M);
        return;
    }
#pragma omp parallel for schedule(static) if (d.N * d.C * d.S >= kBnParallelGrain && d.C > 1)
    for (index_t c = 0; c < d.C; ++c) stats_channel<T>(x, d, c, mean, var);
}

// y = a[c] * x + b[c] over planes [p0, p1).
template <typename T>
GPUDIFF_CLONES void affine_planes(const T* x, const T* a, const T* b, T* y, NCS d, index_t p0,
                                  index_t p1) {
    for (index_t p = p0; p < p1; ++p) {
        const index_t c = p % d.C;
        const T ac = a[c], bc = b[c];
        const T* __restrict xs = x + p * d.S;
        T* __restrict ys = y + p * d.S;
        for (index_t i = 0; i < d.S; ++i) ys[i] = ac * xs[i] + bc;
    }
}

template <typename T>
void affine_kernel(const T* x, const T* a, const T* b, T* y, NCS d) {
    const index_t planes = d.N * d.C;
    if (d.S == 1) {
        for (index_t n = 0; n < d.N; ++n)
            for (index_t c = 0; c < d.C; ++c) y[n * d.C + c] = a[c] * x[n * d.C + c] + b[c];
        return;
    }
    if (planes * d.S < kBnParallelGrain) return affine_planes<T>(x, a, b, y, d, 0, planes);
#pragma omp parallel
    {
#ifdef _OPENMP
        const index_t t = omp_get_thread_num(), nt = omp_get_num_threads();
#else
        const index_t t = 0, nt = 1;
#endif
        affine_planes<T>(x, a, b, y, d, planes * t / nt, planes * (t + 1) / nt);
    }
}

// sum gy and sum gy * (x - mean) of channel c.
template <typename T>
GPUDIFF_CLONES void reduce_channel(const T* gy, const T* x, const T* mean, NCS d, index_t c,
                                   T* sum_gy, T* sum_gy_xmu) {
    double s = 0, q = 0;
    const T mu = mean[c];
    for (index_t n = 0; n < d.N; ++n) {
        const index_t base = (n * d.C + c) * d.S;
        T ps = 0, pq = 0;
        for (index_t i = 0; i < d.S; ++i) {
            ps += gy[base + i];
            pq += gy[base + i] * (x[base + i] - mu);
        }
        s += ps;
        q += pq;
    }
    sum_gy[c] = T(s);
    sum_gy_xmu[c] = T(q);
}

template <typename T>
void backward_reduce_kernel(const T* gy, const T* x, const T* mean, NCS d, T* sum_gy,
                            T* sum_gy_xmu) {
    if (d.S == 1) {
        std::vector<double> s(d.C, 0.0), q(d.C, 0.0);
        for (index_t n = 0; n < d.N; ++n)
            for (index_t c = 0; c < d.C; ++c) {
                const index_t at = n * d.C + c;
                s[c] += gy[at];
                q[c] += double(gy[at]) * (x[at] - mean[c]);
            }
        for (index_t c = 0; c < d.C; ++c) sum_gy[c] = T(s[c]), sum_gy_xmu[c] = T(q[c]);
        return;
    }
#pragma omp parallel for schedule(static) if (d.N * d.C * d.S >= kBnParallelGrain && d.C > 1)
    for (index_t c = 0; c < d.C; ++c) reduce_channel<T>(gy, x, mean, d, c, sum_gy, sum_gy_xmu);
}

// out = a[c] * gy + b[c] * x + cc[c] over planes [p0, p1).
template <typename T>
GPUDIFF_CLONES void affine2_planes(const T* gy, const T* x, const T* a, const T* b, const T* cc,
                                   T* out, NCS d, index_t p0, index_t p1) {
    for (index_t p = p0; p < p1; ++p) {
        const index_t c = p % d.C;
        const T ac = a[c], bc = b[c], ccc = cc[c];
        const index_t base = p * d.S;
        const T* __restrict g = gy + base;
        const T* __restrict xs = x + base;
        T* __restrict o = out + base;
        for (index_t i = 0; i < d.S; ++i) o[i] = ac * g[i] + bc * xs[i] + ccc;
    }
}

template <typename T>
void affine2_kernel(const T* gy, const T* x, const T* a, const T* b, const T* cc, T* out,
                    NCS d) {
    const index_t planes = d.N * d.C;
    if (d.S == 1) {
        for (index_t n = 0; n < d.N; ++n)
            for (index_t c = 0; c < d.C; ++c) {
                const index_t at = n * d.C + c;
                out[at] = a[c] * gy[at] + b[c] * x[at] + cc[c];
            }
        return;
    }
    if (planes * d.S < kBnParallelGrain)
        return affine2_planes<T>(gy, x, a, b, cc, out, d, 0, planes);
#pragma omp parallel
    {
#ifdef _OPENMP
        const index_t t = omp_get_thread_num(), nt = omp_get_num_threads();
#else
        const index_t t = 0, nt = 1;
#endif
        affine2_planes<T>(gy, x, a, b, cc, out, d, planes * t / nt, planes * (t + 1) / nt);
    }
}

inline uint32_t mix32(uint32_t x) {
    x ^= x >> 16;
    x *= 0x21f0aaadu;
    x ^= x >> 15;
    x *= 0x735a2d97u;
    x ^= x >> 15;
    return x;
}

inline uint32_t dropout_hash(uint32_t lo, uint32_t hi, uint32_t k0, uint32_t k1) {
    return mix32(mix32(lo ^ k0) + k1 + hi);
}

// Elements [j0, j0 + n) with group 1 (j0 .. j0+n-1 within one 2^32 block): a plain uint32
// loop the compiler vectorises (the per-element hash is 2 multiplies and 6 shift/xors).
template <typename T>
GPUDIFF_CLONES void dropout_elements(const T* __restrict x, T* __restrict y, index_t j0,
                                     index_t n, uint32_t k0, uint32_t k1, uint32_t threshold,
                                     T scale) {
    const uint32_t lo0 = uint32_t(j0), hi = uint32_t(uint64_t(j0) >> 32);
    for (index_t t = 0; t < n; ++t) {
        const uint32_t h = dropout_hash(lo0 + uint32_t(t), hi, k0, k1);
        y[t] = x[t] * ((h >> 8) >= threshold ? scale : T(0));  // NaN * 0 stays NaN, as x * mask
    }
}

// Groups [g0, g0 + ng) of `group` elements each: one draw per group.
template <typename T>
GPUDIFF_CLONES void dropout_groups(const T* __restrict x, T* __restrict y, index_t g0,
                                   index_t ng, index_t group, uint32_t k0, uint32_t k1,
                                   uint32_t threshold, T scale) {
    for (index_t j = g0; j < g0 + ng; ++j) {
        const uint32_t h =
            dropout_hash(uint32_t(j), uint32_t(uint64_t(j) >> 32), k0, k1);
        const T s = (h >> 8) >= threshold ? scale : T(0);
        const T* xs = x + (j - g0) * group;
        T* ys = y + (j - g0) * group;
        for (index_t i = 0; i < group; ++i) ys[i] = xs[i] * s;
    }
}

template <typename T>
void dropout_kernel(const T* x, T* y, index_t n, uint32_t k0, uint32_t k1, uint32_t threshold,
                    T scale, index_t group) {
    if (group == 1) {
        parallel_chunks(n, [&](index_t lo, index_t hi) {
            constexpr index_t block = index_t(1) << 32;  // the hash's high word changes here
            for (index_t j = lo; j < hi;) {
                const index_t end = std::min(hi, (j / block + 1) * block);
                dropout_elements<T>(x + j, y + j, j, end - j, k0, k1, threshold, scale);
                j = end;
            }
        });
        return;
    }
    const index_t groups = n / group;
    parallel_chunks(n, [&](index_t lo, index_t hi) {  // split on group boundaries
        const index_t g0 = lo / group, g1 = hi == n ? groups : hi / group;
        if (g1 > g0)
            dropout_groups<T>(x + g0 * group, y + g0 * group, g0, g1 - g0, group, k0, k1,
                              threshold, scale);
    });
}

}  // namespace

py::tuple batch_norm_stats(py::array x) {
    const char* name = "batch_norm_stats";
    require_contiguous(x, name, "x");
    const NCS d = ncs_of(x, name);
    if (d.N * d.S < 1) throw py::value_error("batch_norm_stats: empty batch");
    return dispatch_float(x, name, [&](auto tag) -> py::tuple {
        using T = decltype(tag);
        py::array_t<T> mean(d.C), var(d.C);
        const T* px = cdata_of<T>(x);
        T* pm = mean.mutable_data();
        T* pv = var.mutable_data();
        {
            py::gil_scoped_release nogil;
            stats_kernel<T>(px, d, pm, pv);
        }
        return py::make_tuple(mean, var);
    });
}

py::array channel_affine(py::array x, py::array a, py::array b) {
    const char* name = "channel_affine";
    require_contiguous(x, name, "x");
    const NCS d = ncs_of(x, name);
    return dispatch_float(x, name, [&](auto tag) -> py::array {
        using T = decltype(tag);
        require_channel_vector<T>(a, d.C, name, "a");
        require_channel_vector<T>(b, d.C, name, "b");
        py::array_t<T> y(shape_of(x));
        const T *px = cdata_of<T>(x), *pa = cdata_of<T>(a), *pb = cdata_of<T>(b);
        T* pyv = y.mutable_data();
        {
            py::gil_scoped_release nogil;
            affine_kernel<T>(px, pa, pb, pyv, d);
        }
        return y;
    });
}

py::tuple batch_norm_backward_reduce(py::array gy, py::array x, py::array mean) {
    const char* name = "batch_norm_backward_reduce";
    require_contiguous(gy, name, "gy");
    require_contiguous(x, name, "x");
    require_same_dtype(gy, x, name);
    if (!same_shape(gy, x)) throw py::value_error("batch_norm_backward_reduce: shapes differ");
    const NCS d = ncs_of(x, name);
    return dispatch_float(x, name, [&](auto tag) -> py::tuple {
        using T = decltype(tag);
        require_channel_vector<T>(mean, d.C, name, "mean");
        py::array_t<T> s(d.C), q(d.C);
        const T *pg = cdata_of<T>(gy), *px = cdata_of<T>(x), *pm = cdata_of<T>(mean);
        T* ps = s.mutable_data();
        T* pq = q.mutable_data();
        {
            py::gil_scoped_release nogil;
            backward_reduce_kernel<T>(pg, px, pm, d, ps, pq);
        }
        return py::make_tuple(s, q);
    });
}

py::array channel_affine2(py::array gy, py::array x, py::array a, py::array b, py::array c) {
    const char* name = "channel_affine2";
    require_contiguous(gy, name, "gy");
    require_contiguous(x, name, "x");
    require_same_dtype(gy, x, name);
    if (!same_shape(gy, x)) throw py::value_error("channel_affine2: shapes differ");
    const NCS d = ncs_of(x, name);
    return dispatch_float(x, name, [&](auto tag) -> py::array {
        using T = decltype(tag);
        require_channel_vector<T>(a, d.C, name, "a");
        require_channel_vector<T>(b, d.C, name, "b");
        require_channel_vector<T>(c, d.C, name, "c");
        py::array_t<T> out(shape_of(x));
        const T *pg = cdata_of<T>(gy), *px = cdata_of<T>(x);
        const T *pa = cdata_of<T>(a), *pb = cdata_of<T>(b), *pc = cdata_of<T>(c);
        T* po = out.mutable_data();
        {
            py::gil_scoped_release nogil;
            affine2_kernel<T>(pg, px, pa, pb, pc, po, d);
        }
        return out;
    });
}

py::array dropout(py::array x, double p, uint64_t seed, int64_t group) {
    const char* name = "dropout";
    require_contiguous(x, name, "x");
    if (!(p >= 0.0 && p <= 1.0)) throw py::value_error("dropout: p must be in [0, 1]");
    const index_t n = x.size();
    if (group < 1 || n % group) throw py::value_error("dropout: group must divide x's size");
    const uint32_t k0 = mix32(uint32_t(seed) ^ 0x9e3779b9u);
    const uint32_t k1 = mix32(uint32_t(seed >> 32) ^ 0x85ebca6bu);
    // keep iff the top 24 bits >= ceil(p * 2^24): P(keep) = 1 - p up to 2^-24
    const uint32_t threshold = uint32_t(std::ceil(p * 16777216.0));
    return dispatch_float(x, name, [&](auto tag) -> py::array {
        using T = decltype(tag);
        py::array_t<T> y(shape_of(x));
        const T scale = p < 1.0 ? T(1.0 / (1.0 - p)) : T(0);
        const T* px = cdata_of<T>(x);
        T* pyv = y.mutable_data();
        {
            py::gil_scoped_release nogil;
            dropout_kernel<T>(px, pyv, n, k0, k1, threshold, scale, group);
        }
        return y;
    });
}

}  // namespace gpudiff
