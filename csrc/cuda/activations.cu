// Elementwise activations, forward and backward, on flat contiguous arrays of n elements.
// Memory-bound: one grid-stride loop per kernel with 16-byte vector loads where aligned
// (gd::map1 / gd::map2 in common.cuh). Launch: 1-D blocks (256 threads), any grid.
//
// Semantics follow PyTorch: relu keeps NaN (x < 0 ? 0 : x); backward kernels take what the
// forward saved (the output for relu/sigmoid/tanh, the input for leaky_relu).
#include "common.cuh"

namespace act {

template <typename T> struct Relu {
    __device__ __forceinline__ T operator()(T x) const { return x < T(0) ? T(0) : x; }
};
// gx = gy * (y > 0)
template <typename T> struct ReluBackward {
    __device__ __forceinline__ T operator()(T y, T gy) const { return y > T(0) ? gy : T(0); }
};
template <typename T> struct LeakyRelu {
    T slope;
    __device__ __forceinline__ T operator()(T x) const { return x > T(0) ? x : x * slope; }
};
// gx = gy * (x > 0 ? 1 : slope)
template <typename T> struct LeakyReluBackward {
    T slope;
    __device__ __forceinline__ T operator()(T x, T gy) const { return x > T(0) ? gy : gy * slope; }
};
// 1 / (1 + exp(-x)): exp overflows to inf for very negative x and gives exactly 0, no NaN
template <typename T> struct Sigmoid {
    __device__ __forceinline__ T operator()(T x) const { return T(1) / (T(1) + gd::exp(-x)); }
};
// fused: gx = gy * y * (1 - y) from the saved output y
template <typename T> struct SigmoidBackward {
    __device__ __forceinline__ T operator()(T y, T gy) const { return gy * y * (T(1) - y); }
};
template <typename T> struct Tanh {
    __device__ __forceinline__ T operator()(T x) const { return gd::tanh(x); }
};
// gx = gy * (1 - y^2) from the saved output y
template <typename T> struct TanhBackward {
    __device__ __forceinline__ T operator()(T y, T gy) const { return gy * (T(1) - y * y); }
};

}  // namespace act

// x, y: (n,)
template <typename T>
__global__ void relu_fwd(gptr<const T> x, gptr<T> y, long long n) {
    gd::map1(x, y, n, act::Relu<T>{});
}
// y, gy, gx: (n,)
template <typename T>
__global__ void relu_bwd(gptr<const T> y, gptr<const T> gy, gptr<T> gx, long long n) {
    gd::map2(y, gy, gx, n, act::ReluBackward<T>{});
}
template <typename T>
__global__ void leaky_relu_fwd(gptr<const T> x, gptr<T> y, long long n, T negative_slope) {
    gd::map1(x, y, n, act::LeakyRelu<T>{negative_slope});
}
template <typename T>
__global__ void leaky_relu_bwd(gptr<const T> x, gptr<const T> gy, gptr<T> gx, long long n,
                               T negative_slope) {
    gd::map2(x, gy, gx, n, act::LeakyReluBackward<T>{negative_slope});
}
template <typename T>
__global__ void sigmoid_fwd(gptr<const T> x, gptr<T> y, long long n) {
    gd::map1(x, y, n, act::Sigmoid<T>{});
}
template <typename T>
__global__ void sigmoid_bwd(gptr<const T> y, gptr<const T> gy, gptr<T> gx, long long n) {
    gd::map2(y, gy, gx, n, act::SigmoidBackward<T>{});
}
template <typename T>
__global__ void tanh_fwd(gptr<const T> x, gptr<T> y, long long n) {
    gd::map1(x, y, n, act::Tanh<T>{});
}
template <typename T>
__global__ void tanh_bwd(gptr<const T> y, gptr<const T> gy, gptr<T> gx, long long n) {
    gd::map2(y, gy, gx, n, act::TanhBackward<T>{});
}

// The kernels the backend launches (CuPy name_expressions, emulator registry, nvcc report).
GPUDIFF_KERNEL(relu_fwd<float>)
GPUDIFF_KERNEL(relu_fwd<double>)
GPUDIFF_KERNEL(relu_bwd<float>)
GPUDIFF_KERNEL(relu_bwd<double>)
GPUDIFF_KERNEL(leaky_relu_fwd<float>)
GPUDIFF_KERNEL(leaky_relu_fwd<double>)
GPUDIFF_KERNEL(leaky_relu_bwd<float>)
GPUDIFF_KERNEL(leaky_relu_bwd<double>)
GPUDIFF_KERNEL(sigmoid_fwd<float>)
GPUDIFF_KERNEL(sigmoid_fwd<double>)
GPUDIFF_KERNEL(sigmoid_bwd<float>)
GPUDIFF_KERNEL(sigmoid_bwd<double>)
GPUDIFF_KERNEL(tanh_fwd<float>)
GPUDIFF_KERNEL(tanh_fwd<double>)
GPUDIFF_KERNEL(tanh_bwd<float>)
GPUDIFF_KERNEL(tanh_bwd<double>)
