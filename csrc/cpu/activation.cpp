// Element-wise activations and their fused backwards: one pass over memory instead of the
// two or three temporaries NumPy would make (gy * y * (1 - y) is three passes there).
//
//   relu(x) = x < 0 ? 0 : x          (NaN stays NaN, as torch.relu)
//   relu_backward(y, gy)             = gy * (y > 0)
//   leaky_relu(x, a)                 = x > 0 ? x : a * x
//   leaky_relu_backward(x, gy, a)    = gy * (x > 0 ? 1 : a)
//   sigmoid(x)                       = 1 / (1 + exp(-x))   (float: a vectorised exp, 1-2 ulp)
//   sigmoid_backward(y, gy)          = gy * y * (1 - y)
//   tanh_backward(y, gy)             = gy * (1 - y * y)
// (tanh itself is left to NumPy, whose SIMD tanh is as fast and accurate to the ulp.)
#include "common.h"
#include "kernels.h"

#include <cmath>
#include <cstring>

namespace gpudiff {
namespace {

template <typename T, typename F>
GPUDIFF_CLONES void map1_range(const T* __restrict a, T* __restrict y, index_t n, F f) {
    for (index_t i = 0; i < n; ++i) y[i] = f(a[i]);
}

template <typename T, typename F>
GPUDIFF_CLONES void map2_range(const T* __restrict a, const T* __restrict b, T* __restrict y,
                               index_t n, F f) {
    for (index_t i = 0; i < n; ++i) y[i] = f(a[i], b[i]);
}

// y[i] = f(a[i]) over n elements, both cores when it pays.
template <typename T, typename F>
void map1(const T* a, T* y, index_t n, F f) {
    parallel_chunks(n, [&](index_t lo, index_t hi) { map1_range(a + lo, y + lo, hi - lo, f); });
}

// y[i] = f(a[i], b[i]).
template <typename T, typename F>
void map2(const T* a, const T* b, T* y, index_t n, F f) {
    parallel_chunks(n, [&](index_t lo, index_t hi) {
        map2_range(a + lo, b + lo, y + lo, hi - lo, f);
    });
}

// exp(x) in float with Cephes' range reduction and polynomial (about 1 ulp), written with
// plain arithmetic so that the loop around it vectorises. Past the float range: inf above,
// the smallest normal (~1.2e-38) below (callers only add it to 1).
inline float exp_float(float x) {
    x = std::min(std::max(x, -87.33654f), 88.72283f);
    const float k = std::nearbyint(x * 1.44269504088896341f);
    const float r = (x - k * 0.693359375f) - k * -2.12194440e-4f;
    float p = 1.9875691500e-4f;
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    const float e = p * r * r + r + 1.0f;
    const int32_t bits = (int32_t(k) + 127) << 23;  // 2^k (k = 128: +inf)
    float scale;
    std::memcpy(&scale, &bits, sizeof scale);
    return e * scale;
}

inline float exp_fast(float x) { return exp_float(x); }
inline double exp_fast(double x) { return std::exp(x); }

template <typename Fn>
py::array unary(py::array x, const char* name, Fn&& fn) {
    require_contiguous(x, name, "x");
    return dispatch_float(x, name, [&](auto tag) -> py::array {
        using T = decltype(tag);
        py::array_t<T> y(shape_of(x));
        const T* px = cdata_of<T>(x);
        T* pyv = y.mutable_data();
        const index_t n = x.size();
        {
            py::gil_scoped_release nogil;
            fn(px, pyv, n, tag);
        }
        return y;
    });
}

template <typename Fn>
py::array binary(py::array a, py::array b, const char* name, Fn&& fn) {
    require_contiguous(a, name, "a");
    require_contiguous(b, name, "gy");
    require_same_dtype(a, b, name);
    if (!same_shape(a, b)) throw py::value_error(std::string(name) + ": shapes differ");
    return dispatch_float(a, name, [&](auto tag) -> py::array {
        using T = decltype(tag);
        py::array_t<T> y(shape_of(a));
        const T* pa = cdata_of<T>(a);
        const T* pb = cdata_of<T>(b);
        T* pyv = y.mutable_data();
        const index_t n = a.size();
        {
            py::gil_scoped_release nogil;
            fn(pa, pb, pyv, n, tag);
        }
        return y;
    });
}

}  // namespace

py::array relu(py::array x) {
    return unary(x, "relu", [](auto* px, auto* py_, index_t n, auto tag) {
        using T = decltype(tag);
        map1(px, py_, n, [](T v) { return v < T(0) ? T(0) : v; });
    });
}

py::array relu_backward(py::array y, py::array gy) {
    return binary(y, gy, "relu_backward", [](auto* py_, auto* pg, auto* out, index_t n, auto tag) {
        using T = decltype(tag);
        map2(py_, pg, out, n, [](T yv, T g) { return yv > T(0) ? g : T(0); });
    });
}

py::array leaky_relu(py::array x, double negative_slope) {
    return unary(x, "leaky_relu", [=](auto* px, auto* py_, index_t n, auto tag) {
        using T = decltype(tag);
        const T a = T(negative_slope);
        map1(px, py_, n, [a](T v) { return v > T(0) ? v : a * v; });
    });
}

py::array leaky_relu_backward(py::array x, py::array gy, double negative_slope) {
    return binary(x, gy, "leaky_relu_backward",
                  [=](auto* px, auto* pg, auto* out, index_t n, auto tag) {
                      using T = decltype(tag);
                      const T a = T(negative_slope);
                      map2(px, pg, out, n, [a](T xv, T g) { return xv > T(0) ? g : a * g; });
                  });
}

py::array sigmoid(py::array x) {
    return unary(x, "sigmoid", [](auto* px, auto* py_, index_t n, auto tag) {
        using T = decltype(tag);
        // exp(-x) overflows to inf for x < -88 (float): 1 / inf = 0, the right limit
        map1(px, py_, n, [](T v) { return T(1) / (T(1) + exp_fast(-v)); });
    });
}

py::array sigmoid_backward(py::array y, py::array gy) {
    return binary(y, gy, "sigmoid_backward",
                  [](auto* py_, auto* pg, auto* out, index_t n, auto tag) {
                      using T = decltype(tag);
                      map2(py_, pg, out, n, [](T yv, T g) { return g * yv * (T(1) - yv); });
                  });
}

py::array tanh_backward(py::array y, py::array gy) {
    return binary(y, gy, "tanh_backward",
                  [](auto* py_, auto* pg, auto* out, index_t n, auto tag) {
                      using T = decltype(tag);
                      map2(py_, pg, out, n, [](T yv, T g) { return g * (T(1) - yv * yv); });
                  });
}

}  // namespace gpudiff
