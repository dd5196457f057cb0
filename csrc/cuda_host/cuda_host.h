// cuda_host.h: CUDA on the host CPU, for the emulator (gpudiff._cuda_host).
//
// A kernel translation unit includes this header and then a csrc/cuda/*.cu file; the .cu
// then compiles with g++ as it does with NVRTC. This header maps:
//   * the qualifiers (__global__, __device__, __shared__ -> static storage, one block runs
//     at a time), the built-in variables (threadIdx, blockIdx, blockDim, gridDim), vector
//     types and the math built-ins the kernels use;
//   * __syncthreads and the warp intrinsics to the emulator's scheduler (emulator.cpp),
//     where every thread of a block is a fiber: a barrier or a warp exchange suspends the
//     thread until its block / warp-mates arrive;
//   * gptr<T> (the global-memory parameter type) to a bounds-checked pointer;
//   * GPUDIFF_KERNEL(name<type>) to a registration in the emulator's kernel table, with the
//     parameter types checked against what Python passes at launch.
// See docs/EMULATOR.md.
#pragma once
#define GPUDIFF_CUDA_HOST 1

#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <functional>
#include <stdexcept>
#include <string>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

#include "emulator.h"
#include "trace.h"

#define GD_HOST_INLINE inline __attribute__((always_inline))

// ---- qualifiers -------------------------------------------------------------------------
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline __attribute__((always_inline))
#define __noinline__ __attribute__((noinline))
#define __launch_bounds__(...)
#define __align__(n) __attribute__((aligned(n)))
// Blocks run one at a time, so one static instance per declaration is per-block storage.
// Each __shared__ variable gets its own 64 KiB-aligned slot (a block has at most 48 KiB):
// the rest of the slot is a red zone, and the memory checker (sanitizer.h) finds the
// variables in the module's symbol table, bounds-checks every access, poisons each one at
// its first use in a block (0xff bytes: NaN) and checks its red zone after the block.
// The macro starts with a dummy constexpr declaration so that all of CUDA's spellings
// compile: `__shared__ T s[n];` and `static __shared__ T s[n];` (the `static` then applies
// to the dummy; the variable gets its own). `extern __shared__ T s[];` cannot work this
// way (the declaration has no size the shim could give it): the emulator's build (setup.py)
// compiles each such declaration inside a function as `T* const s = dynamic_shared<T>();`,
// the launch's dynamic shared memory, which is what every extern shared array is on a GPU.
#define __shared__                                                              \
    __attribute__((unused)) constexpr int GD_CAT(gd_shared_decl_, __COUNTER__) = 0; \
    static __attribute__((aligned(65536)))

// ---- vector types (dim3 and the built-in variables are in emulator.h) ---------------------
constexpr int warpSize = 32;
struct __align__(8) float2 { float x, y; };
struct __align__(16) float4 { float x, y, z, w; };
struct __align__(16) double2 { double x, y; };
struct __align__(8) int2 { int x, y; };
struct __align__(16) int4 { int x, y, z, w; };
inline float2 make_float2(float x, float y) { return {x, y}; }
inline float4 make_float4(float x, float y, float z, float w) { return {x, y, z, w}; }
inline double2 make_double2(double x, double y) { return {x, y}; }
inline int2 make_int2(int x, int y) { return {x, y}; }
inline int4 make_int4(int x, int y, int z, int w) { return {x, y, z, w}; }

// ---- math built-ins -----------------------------------------------------------------------
// expf, logf, exp, tanhf, fmaxf, ... come from <cmath> (global namespace). CUDA's fast
// intrinsics are computed at full precision here; glibc declares but does not export
// __expf & co, hence macros.
#define __expf(x) expf(x)
#define __logf(x) logf(x)
#define __powf(x, y) powf(x, y)
#define __sinf(x) sinf(x)
#define __cosf(x) cosf(x)
#define __tanf(x) tanf(x)
#define __fdividef(x, y) ((x) / (y))
inline float rsqrtf(float x) { return 1.0f / sqrtf(x); }
inline double rsqrt(double x) { return 1.0 / sqrt(x); }
inline float __saturatef(float x) { return x < 0.f ? 0.f : (x > 1.f ? 1.f : x); }
inline float __int_as_float(int i) { float f; std::memcpy(&f, &i, 4); return f; }
inline float __uint_as_float(unsigned i) { float f; std::memcpy(&f, &i, 4); return f; }
inline int __float_as_int(float f) { int i; std::memcpy(&i, &f, 4); return i; }
inline unsigned __float_as_uint(float f) { unsigned i; std::memcpy(&i, &f, 4); return i; }
inline double __longlong_as_double(long long i) { double d; std::memcpy(&d, &i, 8); return d; }
inline long long __double_as_longlong(double d) { long long i; std::memcpy(&i, &d, 8); return i; }
inline int __popc(unsigned x) { return __builtin_popcount(x); }
inline int __popcll(unsigned long long x) { return __builtin_popcountll(x); }
inline int __ffs(int x) { return __builtin_ffs(x); }
inline int __clz(int x) { return x == 0 ? 32 : __builtin_clz((unsigned)x); }
// CUDA's global min/max overloads
inline int min(int a, int b) { return a < b ? a : b; }
inline int max(int a, int b) { return a > b ? a : b; }
inline unsigned min(unsigned a, unsigned b) { return a < b ? a : b; }
inline unsigned max(unsigned a, unsigned b) { return a > b ? a : b; }
inline long long min(long long a, long long b) { return a < b ? a : b; }
inline long long max(long long a, long long b) { return a > b ? a : b; }
inline unsigned long long min(unsigned long long a, unsigned long long b) { return a < b ? a : b; }
inline unsigned long long max(unsigned long long a, unsigned long long b) { return a > b ? a : b; }
inline float min(float a, float b) { return fminf(a, b); }
inline float max(float a, float b) { return fmaxf(a, b); }
inline double min(double a, double b) { return fmin(a, b); }
inline double max(double a, double b) { return fmax(a, b); }

namespace gd_host {

template <typename T>
unsigned long long to_bits(T v) {
    static_assert(sizeof(T) <= 8 && std::is_trivially_copyable<T>::value,
                  "warp shuffles move values of at most 8 bytes");
    unsigned long long b = 0;
    std::memcpy(&b, &v, sizeof(T));
    return b;
}
template <typename T>
T from_bits(unsigned long long b) {
    T v;
    std::memcpy(&v, &b, sizeof(T));
    return v;
}

// ---- gptr: the global-memory pointer of a kernel parameter --------------------------------
// T* plus the bounds of the array it was handed (and the argument's position, for messages).
// Every dereference is checked: an out-of-bounds read or write raises KernelError at once.
// Pointer arithmetic is free, as on the GPU; get() escapes the checks (guard zones remain).
template <typename T>
class gptr {
  public:
    using element_type = T;
    gptr() = default;
    gptr(T* p, const void* lo, const void* hi, int arg)
        : p_(p), lo_(static_cast<const char*>(lo)), hi_(static_cast<const char*>(hi)), arg_(arg) {}
    template <typename U, typename = std::enable_if_t<std::is_convertible<U*, T*>::value>>
    gptr(const gptr<U>& o) : p_(o.get()), lo_(o.lo()), hi_(o.hi()), arg_(o.arg()) {}

    // always inlined: with tracing on, each access site calls trace_access() from its own
    // place in the kernel's code, which is how the tracer tells the sites apart
    GD_HOST_INLINE T& operator[](std::ptrdiff_t i) const { return *check(p_ + i); }
    GD_HOST_INLINE T& operator*() const { return *check(p_); }
    GD_HOST_INLINE T* operator->() const { return check(p_); }
    gptr operator+(std::ptrdiff_t i) const { return gptr(p_ + i, lo_, hi_, arg_); }
    gptr operator-(std::ptrdiff_t i) const { return gptr(p_ - i, lo_, hi_, arg_); }
    friend gptr operator+(std::ptrdiff_t i, const gptr& p) { return p + i; }
    std::ptrdiff_t operator-(const gptr& o) const { return p_ - o.p_; }
    gptr& operator+=(std::ptrdiff_t i) { p_ += i; return *this; }
    gptr& operator-=(std::ptrdiff_t i) { p_ -= i; return *this; }
    gptr& operator++() { ++p_; return *this; }
    bool operator==(const gptr& o) const { return p_ == o.p_; }
    bool operator!=(const gptr& o) const { return p_ != o.p_; }
    explicit operator bool() const { return p_ != nullptr; }

    T* get() const { return p_; }
    const char* lo() const { return lo_; }
    const char* hi() const { return hi_; }
    int arg() const { return arg_; }

  private:
    GD_HOST_INLINE T* check(T* q) const {
        const char* c = reinterpret_cast<const char*>(q);
        if (c < lo_ || c + sizeof(T) > hi_) out_of_bounds(arg_, lo_, hi_, q, sizeof(T));
        if (g_trace_on) trace_access(arg_, lo_, q, sizeof(T));  // bench/cuda_memory_report.py
        return q;
    }
    T* p_ = nullptr;
    const char* lo_ = nullptr;
    const char* hi_ = nullptr;
    int arg_ = -1;
};

template <typename T> struct is_gptr : std::false_type {};
template <typename T> struct is_gptr<gptr<T>> : std::true_type {};

// NumPy's dtype spelling, kind + itemsize: "f4", "i8", "u1", "b1"
template <typename T>
std::string dtype_code() {
    static_assert(std::is_arithmetic<T>::value, "kernel arrays and scalars are arithmetic types");
    const char kind = std::is_same<T, bool>::value   ? 'b'
                      : std::is_floating_point<T>::value ? 'f'
                      : std::is_signed<T>::value         ? 'i'
                                                         : 'u';
    return std::string(1, kind) + std::to_string(sizeof(T));
}

template <typename P>
std::string param_name() {
    if constexpr (is_gptr<P>::value) {
        using E = typename P::element_type;
        return std::string("gptr<") + (std::is_const<E>::value ? "const " : "") +
               dtype_code<std::remove_const_t<E>>() + ">";
    } else {
        return dtype_code<P>();
    }
}

template <typename P>
P convert_arg(const std::string& kernel, size_t i, Arg& a) {
    if constexpr (is_gptr<P>::value) {
        using E = typename P::element_type;
        using R = std::remove_const_t<E>;
        if (!a.is_array || a.dtype != dtype_code<R>()) bad_argument(kernel, i, param_name<P>(), a);
        if (!std::is_const<E>::value) {
            if (!a.writable) bad_argument(kernel, i, param_name<P>() + " (a writeable array)", a);
            a.kernel_writes = true;
        }
        char* lo = static_cast<char*>(a.data);
        return P(reinterpret_cast<E*>(lo), lo, lo + a.nbytes, static_cast<int>(i));
    } else {
        static_assert(std::is_arithmetic<P>::value,
                      "kernel parameters must be gptr<T> (global memory) or arithmetic scalars");
        if (a.is_array || a.dtype != dtype_code<P>()) bad_argument(kernel, i, param_name<P>(), a);
        P v;
        std::memcpy(&v, a.scalar, sizeof(P));
        return v;
    }
}

struct Registrar {
    template <typename... P>
    Registrar(const char* name, void (*fn)(P...)) {
        KernelEntry e;
        e.name = name;
        e.nparams = sizeof...(P);
        std::string sig = "(";
        ((sig += param_name<P>() + ", "), ...);
        if (sizeof...(P)) sig.resize(sig.size() - 2);
        e.signature = sig + ")";
        std::string kname = name;
        e.bind = [fn, kname](std::vector<Arg>& args) -> std::function<void()> {
            return bind_args<P...>(fn, kname, args, std::index_sequence_for<P...>{});
        };
        register_kernel(std::move(e));
    }
    template <typename... P, size_t... I>
    static std::function<void()> bind_args(void (*fn)(P...), const std::string& kname,
                                           std::vector<Arg>& args, std::index_sequence<I...>) {
        std::tuple<P...> params{convert_arg<P>(kname, I, args[I])...};
        return [fn, params]() { std::apply(fn, params); };
    }
};

}  // namespace gd_host

// ---- what common.cuh gets from the GPU toolchain, host versions ---------------------------
using gd_host::gptr;

namespace gd {
template <typename U, typename T>
inline gptr<U> gptr_cast(const gptr<T>& p) {
    return gptr<U>(reinterpret_cast<U*>(p.get()), p.lo(), p.hi(), p.arg());
}
template <typename T>
inline unsigned long long address_of(const gptr<T>& p) {
    return reinterpret_cast<unsigned long long>(p.get());
}
template <typename T>
inline unsigned long long address_of(T* p) {
    return reinterpret_cast<unsigned long long>(p);
}
}  // namespace gd

template <typename T>
inline T* dynamic_shared() {
    return reinterpret_cast<T*>(gd_host::dynamic_shared_base());
}

#define GD_CAT2(a, b) a##b
#define GD_CAT(a, b) GD_CAT2(a, b)
// common.cuh: `#pragma unroll` for nvcc. Unrolled here too, so that the host code has the
// GPU's access sites (one per unrolled load), which the memory tracer (trace.h) relies on.
#define GD_UNROLL _Pragma("GCC unroll 16")
#define GPUDIFF_KERNEL(...) \
    static gd_host::Registrar GD_CAT(gd_registrar_, __COUNTER__)(#__VA_ARGS__, &__VA_ARGS__);

// ---- synchronisation and warp intrinsics ------------------------------------------------
inline void __syncthreads() { gd_host::block_barrier(0, 0); }
inline int __syncthreads_count(int p) { return gd_host::block_barrier(1, p); }
inline int __syncthreads_and(int p) { return gd_host::block_barrier(2, p); }
inline int __syncthreads_or(int p) { return gd_host::block_barrier(3, p); }
// fibers of one OS thread: memory is always coherent
inline void __threadfence() {}
inline void __threadfence_block() {}
inline void __trap() { gd_host::kernel_trap("__trap()"); }

inline void __syncwarp(unsigned mask = 0xffffffffu) {
    gd_host::warp_collective(gd_host::WarpOp::SyncWarp, mask, 0, 0, 32);
}
inline unsigned __activemask() { return gd_host::warp_active_mask(); }
inline unsigned __ballot_sync(unsigned mask, int pred) {
    return (unsigned)gd_host::warp_collective(gd_host::WarpOp::Ballot, mask, pred != 0, 0, 32);
}
inline int __any_sync(unsigned mask, int pred) {
    return (int)gd_host::warp_collective(gd_host::WarpOp::Any, mask, pred != 0, 0, 32);
}
inline int __all_sync(unsigned mask, int pred) {
    return (int)gd_host::warp_collective(gd_host::WarpOp::All, mask, pred != 0, 0, 32);
}
template <typename T>
T __shfl_sync(unsigned mask, T var, int src_lane, int width = 32) {
    return gd_host::from_bits<T>(gd_host::warp_collective(gd_host::WarpOp::ShflIdx, mask,
                                                          gd_host::to_bits(var), src_lane, width));
}
template <typename T>
T __shfl_up_sync(unsigned mask, T var, unsigned delta, int width = 32) {
    return gd_host::from_bits<T>(gd_host::warp_collective(gd_host::WarpOp::ShflUp, mask,
                                                          gd_host::to_bits(var), (int)delta, width));
}
template <typename T>
T __shfl_down_sync(unsigned mask, T var, unsigned delta, int width = 32) {
    return gd_host::from_bits<T>(gd_host::warp_collective(gd_host::WarpOp::ShflDown, mask,
                                                          gd_host::to_bits(var), (int)delta, width));
}
template <typename T>
T __shfl_xor_sync(unsigned mask, T var, int lane_mask, int width = 32) {
    return gd_host::from_bits<T>(gd_host::warp_collective(gd_host::WarpOp::ShflXor, mask,
                                                          gd_host::to_bits(var), lane_mask, width));
}

// ---- atomics: the threads are fibers of one OS thread, so a plain read-modify-write is atomic.
// atomic_begin/atomic_end tell the memory checker that this read-modify-write is atomic
// (atomics do not race with atomics); its own load and store are not checked as plain ones.
namespace gd_host {
template <typename T>
T* raw(T* p) { return p; }
template <typename T>
T* raw(const gptr<T>& p) { return &*p; }  // bounds-checked
}  // namespace gd_host
#define GD_ATOMIC(NAME, EXPR)                          \
    template <typename P, typename V>                  \
    inline auto NAME(P ptr, V val) {                   \
        auto* p = gd_host::raw(ptr);                   \
        using T = std::remove_reference_t<decltype(*p)>; \
        gd_host::atomic_begin(p, sizeof(T));           \
        T old = *p;                                    \
        *p = (EXPR);                                   \
        gd_host::atomic_end();                         \
        return old;                                    \
    }
GD_ATOMIC(atomicAdd, old + T(val))
GD_ATOMIC(atomicSub, old - T(val))
GD_ATOMIC(atomicMax, old < T(val) ? T(val) : old)
GD_ATOMIC(atomicMin, T(val) < old ? T(val) : old)
GD_ATOMIC(atomicExch, T(val))
GD_ATOMIC(atomicAnd, old & T(val))
GD_ATOMIC(atomicOr, old | T(val))
GD_ATOMIC(atomicXor, old ^ T(val))
#undef GD_ATOMIC
template <typename P, typename V>
inline auto atomicCAS(P ptr, V compare, V val) {
    auto* p = gd_host::raw(ptr);
    gd_host::atomic_begin(p, sizeof(*p));
    auto old = *p;
    if (old == compare) *p = val;
    gd_host::atomic_end();
    return old;
}
