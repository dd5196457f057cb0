// Batch normalisation over x (N, C, HW) (HW = H*W, 1 for BatchNorm1d's (N, C)), per channel c
// over the M = N*HW values x[n, c, s]:
//
//   training  mean, var = batch statistics (biased var for normalising);
//             running_mean = (1 - momentum) * running_mean + momentum * mean
//             running_var  = (1 - momentum) * running_var  + momentum * var * M / (M - 1)
//   eval      mean, var = running statistics
//   y = (x - mean) * invstd * w + b,   invstd = 1 / sqrt(var + eps)
//   backward (training): xhat = (x - mean) * invstd,
//             gb = sum(gy), gw = sum(gy * xhat),
//             gx = w * invstd * (gy - gb / M - xhat * gw / M)
//
// Two layouts of the training kernels:
//   *_plane  (HW > 1) one block per channel (grid-strided over channels): the block's threads
//            walk the channel's N planes of HW contiguous values (coalesced), then one
//            block reduction (common.cuh) and a second pass that writes. As much of the
//            channel as fits in 48 KiB of shared memory is kept from the first pass for the
//            second, so small channels are read from global memory once.
//   *_cols   (HW == 1, x is (N, C)) a block of 32 x 8 threads per 32 channels: a warp reads 32
//            adjacent channels of a row (coalesced), the 8 row groups are merged in shared
//            memory in a fixed order.
// Statistics are one pass (Welford's update per thread, Chan's merge across threads), in
// the input's precision as PyTorch does for float and double. Every reduction has a fixed
// shape: results are bitwise reproducible.
#include "common.cuh"

namespace bn {

__device__ __forceinline__ float rsqrt_(float v) { return 1.0f / ::sqrtf(v); }
__device__ __forceinline__ double rsqrt_(double v) { return 1.0 / ::sqrt(v); }

// Count, mean and sum of squared deviations of a set of values. merge() is symmetric bit for
// bit (common.cuh's butterflies need that): the mean is the count-weighted average and the
// correction uses delta^2, both independent of the operand order.
template <typename T>
struct Welford {
    int n;
    T mean, m2;
    __device__ __forceinline__ static Welford identity() { return {0, T(0), T(0)}; }
    __device__ __forceinline__ void add(T v) {
        ++n;
        const T d = v - mean;
        mean += d / T(n);
        m2 += d * (v - mean);
    }
    __device__ __forceinline__ void merge(const Welford& o) {
        if (o.n == 0) return;
        if (n == 0) {
            *this = o;
            return;
        }
        const T fa = T(n), fb = T(o.n), fn = T(n + o.n);
        const T delta = o.mean - mean;
        mean = (fa * mean + fb * o.mean) / fn;
        m2 = (m2 + o.m2) + delta * delta * (fa * fb / fn);
        n += o.n;
    }
    __device__ __forceinline__ Welford shfl_xor(int m) const {
        return {__shfl_xor_sync(gd::FULL_MASK, n, m), __shfl_xor_sync(gd::FULL_MASK, mean, m),
                __shfl_xor_sync(gd::FULL_MASK, m2, m)};
    }
};

// Walks the M = N*HW values of channel c, starting at thread `first`, `step` apart:
// offset (n*C + c)*HW + s, with (n, s) advanced without a division per element.
struct ChannelWalk {
    long long M, HW, C;
    long long e, n, s, dn, ds;
    __device__ __forceinline__ ChannelWalk(long long M_, long long HW_, long long C_, int first,
                                           int step)
        : M(M_), HW(HW_), C(C_), e(first), n(first / HW_), s(first % HW_), dn(step / HW_),
          ds(step % HW_) {}
    __device__ __forceinline__ bool more() const { return e < M; }
    __device__ __forceinline__ long long offset(long long c) const { return (n * C + c) * HW + s; }
    __device__ __forceinline__ void next(int step) {
        e += step;
        n += dn;
        s += ds;
        if (s >= HW) {
            s -= HW;
            ++n;
        }
    }
};

// Thread 0's bookkeeping of the training forward: saved and running statistics.
template <typename T>
__device__ __forceinline__ void store_stats(const Welford<T>& st, int c, gptr<T> rm, gptr<T> rv,
                                            gptr<T> save_mean, gptr<T> save_invstd,
                                            int has_running, T momentum, T invstd) {
    save_mean[c] = st.mean;
    save_invstd[c] = invstd;
    if (has_running) {
        const T unbiased = st.m2 / T(st.n - 1);  // M = 1: 0/0 = NaN (the op refuses M = 1)
        rm[c] = (T(1) - momentum) * rm[c] + momentum * st.mean;
        rv[c] = (T(1) - momentum) * rv[c] + momentum * unbiased;
    }
}

}  // namespace bn

// Training forward, HW > 1. x, y (N, C, HW); w, b (C,) read when has_w / has_b; rm, rv (C,)
// updated when has_running; save_mean, save_invstd (C,). blockDim.x a multiple of 32.
// The first `cache` values of the channel's walk stay in dynamic shared memory
// (cache * sizeof(T) bytes) between the two passes, so only the rest is read twice; a value
// is stored and re-read by the same thread, so no barrier guards it.
template <typename T>
__global__ void batch_norm_fwd_train_plane(gptr<const T> x, gptr<const T> w, gptr<const T> b,
                                           gptr<T> rm, gptr<T> rv, gptr<T> y, gptr<T> save_mean,
                                           gptr<T> save_invstd, int N, int C, long long HW,
                                           T momentum, T eps, int has_w, int has_b,
                                           int has_running, int cache) {
    T* kept = dynamic_shared<T>();  // (cache,)
    const long long M = (long long)N * HW;
    for (int c = blockIdx.x; c < C; c += gridDim.x) {  // uniform over the block
        bn::Welford<T> st = bn::Welford<T>::identity();
        for (bn::ChannelWalk it(M, HW, C, threadIdx.x, blockDim.x); it.more(); it.next(blockDim.x)) {
            const T v = x[it.offset(c)];
            if (it.e < cache) kept[it.e] = v;
            st.add(v);
        }
        st = gd::block_allreduce(st);
        const T invstd = bn::rsqrt_(st.m2 / T(st.n) + eps);
        if (threadIdx.x == 0)
            bn::store_stats(st, c, rm, rv, save_mean, save_invstd, has_running, momentum, invstd);
        const T scale = has_w ? w[c] * invstd : invstd;
        const T shift = has_b ? b[c] : T(0);
        for (bn::ChannelWalk it(M, HW, C, threadIdx.x, blockDim.x); it.more(); it.next(blockDim.x)) {
            const long long o = it.offset(c);
            const T v = it.e < cache ? kept[it.e] : x[o];
            y[o] = (v - st.mean) * scale + shift;
        }
    }
}

// Training backward, HW > 1: gx (N, C, HW), gw, gb (C,). The first `cache` values of gy and
// of x stay in dynamic shared memory (2 * cache * sizeof(T) bytes) for the second pass.
template <typename T>
__global__ void batch_norm_bwd_plane(gptr<const T> gy, gptr<const T> x, gptr<const T> w,
                                     gptr<const T> save_mean, gptr<const T> save_invstd,
                                     gptr<T> gx, gptr<T> gw, gptr<T> gb, int N, int C,
                                     long long HW, int has_w, int cache) {
    T* kept_gy = dynamic_shared<T>();  // (cache,)
    T* kept_x = kept_gy + cache;       // (cache,)
    const long long M = (long long)N * HW;
    for (int c = blockIdx.x; c < C; c += gridDim.x) {
        const T mean = save_mean[c], invstd = save_invstd[c];
        gd::Sum2<T> acc = gd::Sum2<T>::identity();  // a = sum(gy), b = sum(gy * (x - mean))
        for (bn::ChannelWalk it(M, HW, C, threadIdx.x, blockDim.x); it.more(); it.next(blockDim.x)) {
            const long long o = it.offset(c);
            const T g = gy[o], v = x[o];
            if (it.e < cache) {
                kept_gy[it.e] = g;
                kept_x[it.e] = v;
            }
            acc.a += g;
            acc.b += g * (v - mean);
        }
        acc = gd::block_allreduce(acc);
        const T sum_gy = acc.a, sum_gy_xhat = acc.b * invstd;
        if (threadIdx.x == 0) {
            gb[c] = sum_gy;
            gw[c] = sum_gy_xhat;
        }
        const T scale = (has_w ? w[c] : T(1)) * invstd;
        const T mean_gy = sum_gy / T(M), mean_gy_xhat = sum_gy_xhat / T(M);
        for (bn::ChannelWalk it(M, HW, C, threadIdx.x, blockDim.x); it.more(); it.next(blockDim.x)) {
            const long long o = it.offset(c);
            const bool kept = it.e < cache;
            const T xhat = ((kept ? kept_x[it.e] : x[o]) - mean) * invstd;
            gx[o] = scale * ((kept ? kept_gy[it.e] : gy[o]) - mean_gy - xhat * mean_gy_xhat);
        }
    }
}

namespace bn {
constexpr int COLS = 32;  // channels per block (blockDim.x)
constexpr int ROW_GROUPS = 8;  // blockDim.y
}  // namespace bn

// Training forward, x (N, C): blockDim (32, 8), 32 channels per block, grid-strided.
template <typename T>
__global__ void batch_norm_fwd_train_cols(gptr<const T> x, gptr<const T> w, gptr<const T> b,
                                          gptr<T> rm, gptr<T> rv, gptr<T> y, gptr<T> save_mean,
                                          gptr<T> save_invstd, int N, int C, T momentum, T eps,
                                          int has_w, int has_b, int has_running) {
    __shared__ bn::Welford<T> part[bn::ROW_GROUPS][bn::COLS];
    __shared__ T stat_mean[bn::COLS], stat_scale[bn::COLS];
    const int tx = threadIdx.x, ty = threadIdx.y;
    for (int c0 = blockIdx.x * bn::COLS; c0 < C; c0 += gridDim.x * bn::COLS) {
        const int c = c0 + tx;
        bn::Welford<T> st = bn::Welford<T>::identity();
        if (c < C)
            for (int n = ty; n < N; n += bn::ROW_GROUPS) st.add(x[(long long)n * C + c]);
        part[ty][tx] = st;
        __syncthreads();
        if (ty == 0) {
            for (int r = 1; r < bn::ROW_GROUPS; ++r) st.merge(part[r][tx]);  // fixed order
            if (c < C) {
                const T invstd = bn::rsqrt_(st.m2 / T(st.n) + eps);
                bn::store_stats(st, c, rm, rv, save_mean, save_invstd, has_running, momentum,
                                invstd);
                stat_mean[tx] = st.mean;
                stat_scale[tx] = has_w ? w[c] * invstd : invstd;
            }
        }
        __syncthreads();
        if (c < C) {
            const T mean = stat_mean[tx], scale = stat_scale[tx];
            const T shift = has_b ? b[c] : T(0);
            for (int n = ty; n < N; n += bn::ROW_GROUPS) {
                const long long o = (long long)n * C + c;
                y[o] = (x[o] - mean) * scale + shift;
            }
        }
        __syncthreads();  // part / stat_* are reused by the next channel tile
    }
}

// Training backward, x (N, C): blockDim (32, 8).
template <typename T>
__global__ void batch_norm_bwd_cols(gptr<const T> gy, gptr<const T> x, gptr<const T> w,
                                    gptr<const T> save_mean, gptr<const T> save_invstd,
                                    gptr<T> gx, gptr<T> gw, gptr<T> gb, int N, int C, int has_w) {
    __shared__ T part_a[bn::ROW_GROUPS][bn::COLS], part_b[bn::ROW_GROUPS][bn::COLS];
    const int tx = threadIdx.x, ty = threadIdx.y;
    for (int c0 = blockIdx.x * bn::COLS; c0 < C; c0 += gridDim.x * bn::COLS) {
        const int c = c0 + tx;
        const T mean = c < C ? save_mean[c] : T(0), invstd = c < C ? save_invstd[c] : T(0);
        T a = T(0), bsum = T(0);
        if (c < C)
            for (int n = ty; n < N; n += bn::ROW_GROUPS) {
                const long long o = (long long)n * C + c;
                const T g = gy[o];
                a += g;
                bsum += g * (x[o] - mean);
            }
        part_a[ty][tx] = a;
        part_b[ty][tx] = bsum;
        __syncthreads();
        // every row group sums the 8 partials itself, in the same order: no second barrier
        a = T(0);
        bsum = T(0);
        for (int r = 0; r < bn::ROW_GROUPS; ++r) {
            a += part_a[r][tx];
            bsum += part_b[r][tx];
        }
        if (c < C) {
            const T sum_gy_xhat = bsum * invstd;
            if (ty == 0) {
                gb[c] = a;
                gw[c] = sum_gy_xhat;
            }
            const T scale = (has_w ? w[c] : T(1)) * invstd;
            const T mean_gy = a / T(N), mean_gy_xhat = sum_gy_xhat / T(N);
            for (int n = ty; n < N; n += bn::ROW_GROUPS) {
                const long long o = (long long)n * C + c;
                const T xhat = (x[o] - mean) * invstd;
                gx[o] = scale * (gy[o] - mean_gy - xhat * mean_gy_xhat);
            }
        }
        __syncthreads();  // part_* are reused by the next channel tile
    }
}

// Eval forward (running statistics), any HW: one thread per element, grid-strided.
template <typename T>
__global__ void batch_norm_fwd_eval(gptr<const T> x, gptr<const T> w, gptr<const T> b,
                                    gptr<const T> rm, gptr<const T> rv, gptr<T> y, long long total,
                                    int C, long long HW, T eps, int has_w, int has_b) {
    const long long stride = (long long)gridDim.x * blockDim.x;
    for (long long e = (long long)blockIdx.x * blockDim.x + threadIdx.x; e < total; e += stride) {
        const int c = (int)((e / HW) % C);
        const T invstd = bn::rsqrt_(rv[c] + eps);
        const T scale = has_w ? w[c] * invstd : invstd;
        y[e] = (x[e] - rm[c]) * scale + (has_b ? b[c] : T(0));
    }
}

GPUDIFF_KERNEL(batch_norm_fwd_train_plane<float>)
GPUDIFF_KERNEL(batch_norm_fwd_train_plane<double>)
GPUDIFF_KERNEL(batch_norm_bwd_plane<float>)
GPUDIFF_KERNEL(batch_norm_bwd_plane<double>)
GPUDIFF_KERNEL(batch_norm_fwd_train_cols<float>)
GPUDIFF_KERNEL(batch_norm_fwd_train_cols<double>)
GPUDIFF_KERNEL(batch_norm_bwd_cols<float>)
GPUDIFF_KERNEL(batch_norm_bwd_cols<double>)
GPUDIFF_KERNEL(batch_norm_fwd_eval<float>)
GPUDIFF_KERNEL(batch_norm_fwd_eval<double>)
