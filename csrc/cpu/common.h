// Shared helpers of the CPU kernels (gpudiff._C): array checks, float/double dispatch,
// and the OpenMP grain below which a loop stays on one thread.
//
// Every py-facing kernel takes C-contiguous float32 or float64 numpy arrays (the Python
// wrappers in gpudiff/backend/cpu_kernels.py make sure of that), allocates its outputs
// while holding the GIL, then releases the GIL around the loops.
#pragma once

#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <algorithm>
#include <cstdint>
#include <limits>
#include <string>
#include <vector>

#ifdef _OPENMP
#include <omp.h>
#endif

namespace py = pybind11;

// The hot loops are compiled twice, for AVX2/FMA (x86-64-v3) and for the baseline, and the
// loader picks the clone the CPU supports. Baseline SSE2 code turns the branch-free selects
// of max pooling into branches and runs 10x slower; a -march=native build would not run
// on older machines.
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
#define GPUDIFF_CLONES __attribute__((target_clones("arch=x86-64-v3", "default")))
#else
#define GPUDIFF_CLONES
#endif

namespace gpudiff {

using index_t = int64_t;

// Below this many elements of work a loop runs on one thread (waking the OpenMP team costs
// microseconds). Arrays much larger than the caches gain little from a second thread (one
// core draws most of the 2-core VM's memory bandwidth: 20M-element sigmoid, 6.5 ms on one
// thread, 6.8 ms on two), but the activations of the models we train fit in the L2/L3
// caches, where the second core nearly halves the time: with the grain lowered from 2M to
// 64K elements, sigmoid of 64x6x28x28 (LeNet) 195 -> 149 us, its backward at 64x16x32x32
// 191 -> 98 us, relu at 64x16x32x32 (ResNet-20) 136 -> 76 us (PyTorch, 2 threads: 85-107,
// 104-117, 58-66 us, same run). Compute-bound kernels (the convolution) pass their work in
// multiply-adds.
constexpr index_t kParallelGrain = index_t(1) << 16;

inline bool parallel_pays(index_t work) { return work >= kParallelGrain; }

// The array as C-contiguous, or a ValueError naming the kernel and argument.
inline void require_contiguous(const py::array& a, const char* kernel, const char* arg) {
    if (!(a.flags() & py::array::c_style))
        throw py::value_error(std::string(kernel) + ": argument '" + arg +
                              "' must be C-contiguous");
}

inline void require_ndim(const py::array& a, int ndim, const char* kernel, const char* arg) {
    if (a.ndim() != ndim)
        throw py::value_error(std::string(kernel) + ": argument '" + arg + "' must be " +
                              std::to_string(ndim) + "-D, got " + std::to_string(a.ndim()) +
                              "-D");
}

// dtypes compared by value (type number and native byte order), not by descriptor identity:
// arrays that came through a pickle carry an equal but distinct float32 descriptor
template <typename T>
inline bool is_native(const py::dtype& d) {
    return d.num() == py::dtype::of<T>().num() && d.byteorder() != '>';
}

inline void require_same_dtype(const py::array& a, const py::array& b, const char* kernel) {
    if (a.dtype().num() != b.dtype().num() || a.dtype().byteorder() != b.dtype().byteorder())
        throw py::type_error(std::string(kernel) + ": arguments must have the same dtype");
}

inline bool same_shape(const py::array& a, const py::array& b) {
    if (a.ndim() != b.ndim()) return false;
    for (py::ssize_t i = 0; i < a.ndim(); ++i)
        if (a.shape(i) != b.shape(i)) return false;
    return true;
}

// Calls f(T{}) with T = float or double after the dtype of `a`; anything else is a
// TypeError (the Python wrapper falls back to the reference path before getting here).
template <typename F>
auto dispatch_float(const py::array& a, const char* kernel, F&& f) -> decltype(f(float{})) {
    if (is_native<float>(a.dtype())) return f(float{});
    if (is_native<double>(a.dtype())) return f(double{});
    throw py::type_error(std::string(kernel) + ": expected float32 or float64, got " +
                         std::string(py::str(a.dtype())));
}

template <typename T>
inline T* data_of(py::array& a) {
    return static_cast<T*>(a.mutable_data());
}

template <typename T>
inline const T* cdata_of(const py::array& a) {
    return static_cast<const T*>(a.data());
}

// A fresh C-contiguous array of dtype T with the given shape.
template <typename T>
inline py::array_t<T> empty_array(const std::vector<py::ssize_t>& shape) {
    return py::array_t<T>(shape);
}

inline std::vector<py::ssize_t> shape_of(const py::array& a) {
    return std::vector<py::ssize_t>(a.shape(), a.shape() + a.ndim());
}

// Runs chunk(lo, hi) on parts of [0, n): one part per thread when the work is big enough,
// else the whole range on the calling thread. The chunk function is where the per-ISA
// clones go (an OpenMP region inside a cloned function is outlined without the clone's ISA).
template <typename F>
void parallel_chunks(index_t n, F&& chunk) {
    if (!parallel_pays(n)) {
        chunk(index_t(0), n);
        return;
    }
#pragma omp parallel
    {
#ifdef _OPENMP
        const index_t t = omp_get_thread_num(), nt = omp_get_num_threads();
#else
        const index_t t = 0, nt = 1;
#endif
        chunk(n * t / nt, n * (t + 1) / nt);
    }
}

// The outputs o in [lo, hi) whose tap i = o*s + off lands inside [0, n), for a window
// tap at offset `off` (= tap * dilation - padding) and out outputs.
inline void output_range(index_t off, index_t s, index_t n, index_t out, index_t& lo,
                         index_t& hi) {
    // i >= 0  <=>  o >= ceil(-off / s) ;  i <= n-1  <=>  o <= floor((n-1-off) / s)
    lo = off >= 0 ? 0 : (-off + s - 1) / s;
    const index_t last = n - 1 - off;
    hi = last < 0 ? 0 : last / s + 1;
    lo = std::min(lo, out);
    hi = std::min(std::max(hi, lo), out);
}

}  // namespace gpudiff
