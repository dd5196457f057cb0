// Fused multi-tensor optimizer steps: ONE launch updates every parameter of one dtype on one
// device (SGD with momentum / Nesterov / weight decay, Adam / AdamW with amsgrad; and AMP's
// unscale + inf/NaN check of the gradients), with the
// CPU optimizers' arithmetic (gpudiff/optim/sgd.py, adam.py _update), operation by operation.
//
// The tensors are described by a table in device memory (one int64 array, built by
// cuda_cnn.py each step):
//
//   tab[l * nt + i]                 address of tensor i of list l (l: params, grads, then
//                                   the optimizer's state lists)
//   tab[L * nt + i]                 numel of tensor i
//   tab[(L + 1) * nt + b]           tensor of block b            (b < nb)
//   tab[(L + 1) * nt + nb + b]      first element of block b's chunk
//
// Block b updates elements [start, min(start + CHUNK, numel)) of its tensor, its threads
// striding by blockDim.x: coalesced, one read and one write of each array per element.
// Per-tensor Adam constants (bias corrections depend on each tensor's step count) come in a
// second table of doubles: hyper[2 * i] = step_size, hyper[2 * i + 1] = sqrt(bias_correction2).
//
// Addresses from a table become pointers through table_ptr(): a plain T* on the GPU; in the
// emulator a bounds-checked gptr over exactly that tensor's numel elements (an access outside
// the tensor raises at once; the tensors are the caller's arrays themselves, so they carry no
// guard zones: the bounds check on every access stands in for them).
#include "common.cuh"

namespace opt {

#if defined(GPUDIFF_CUDA_HOST)
template <typename T>
inline gptr<T> table_ptr(long long address, long long numel) {
    T* p = reinterpret_cast<T*>(address);
    return gptr<T>(p, p, p + numel, -1);
}
#else
template <typename T>
__device__ __forceinline__ T* table_ptr(long long address, long long) {
    return reinterpret_cast<T*>(address);
}
#endif

__device__ __forceinline__ float sqrt_(float v) { return ::sqrtf(v); }
__device__ __forceinline__ double sqrt_(double v) { return ::sqrt(v); }

constexpr int CHUNK = 2048;  // elements per block (cuda_cnn.py OPTIM_CHUNK must agree)

// Block b's tensor, its range [begin, end), and the table row of numels.
struct Chunk {
    int tensor;
    long long begin, end, numel;
    __device__ __forceinline__ Chunk(gptr<const long long> tab, int L, int nt, int nb, int b) {
        tensor = (int)tab[(long long)(L + 1) * nt + b];
        begin = tab[(long long)(L + 1) * nt + nb + b];
        numel = tab[(long long)L * nt + tensor];
        end = min(numel, begin + (long long)CHUNK);
    }
};

}  // namespace opt

// SGD. Lists: params, grads[, momentum_buffers when has_buf]. Per element, as sgd.py:
//   g = grad (negated for maximize);  g = g + wd * p                      (wd != 0)
//   b = b * momentum + g  (dampening 0)  or  b * momentum + (1 - dampening) * g
//   g = g + momentum * b (nesterov) or b                                   (momentum != 0)
//   p = p - lr * g
template <typename T>
__global__ void sgd_step_multi(gptr<const long long> tab, int nt, int nb, T lr, T momentum,
                               T one_minus_dampening, T weight_decay, int dampening_is_zero,
                               int nesterov, int maximize, int has_buf) {
    const int L = has_buf ? 3 : 2;
    for (int b = blockIdx.x; b < nb; b += gridDim.x) {
        const opt::Chunk ch(tab, L, nt, nb, b);
        auto p = opt::table_ptr<T>(tab[ch.tensor], ch.numel);
        auto gr = opt::table_ptr<const T>(tab[(long long)nt + ch.tensor], ch.numel);
        for (long long e = ch.begin + threadIdx.x; e < ch.end; e += blockDim.x) {
            T pe = p[e];
            T g = maximize ? -gr[e] : gr[e];
            if (weight_decay != T(0)) g = g + weight_decay * pe;
            if (has_buf) {
                auto buf = opt::table_ptr<T>(tab[2LL * nt + ch.tensor], ch.numel);
                T bv = buf[e] * momentum;
                bv = dampening_is_zero ? bv + g : bv + one_minus_dampening * g;
                buf[e] = bv;
                g = nesterov ? g + momentum * bv : bv;
            }
            p[e] = pe - lr * g;
        }
    }
}

// Adam / AdamW. Lists: params, grads, exp_avgs, exp_avg_sqs[, max_exp_avg_sqs (amsgrad)].
// Per element, as adam.py:
//   g = grad (negated for maximize)
//   p = p * (1 - lr * wd)  (decoupled)   or   g = g + wd * p               (wd != 0)
//   m = lerp(m, g, 1 - beta1)   (PyTorch's two lerp formulas)
//   v = v * beta2 + ((1 - beta2) * g) * g ;  vmax = max(vmax, v)           (amsgrad)
//   p = p + (-step_size * m) / (sqrt(v or vmax) / sqrt(bc2) + eps)
template <typename T>
__global__ void adam_step_multi(gptr<const long long> tab, gptr<const double> hyper, int nt,
                                int nb, T lerp_weight, T beta2, T one_minus_beta2, T eps,
                                T weight_decay, T decay_factor, int amsgrad, int decoupled,
                                int maximize) {
    const int L = amsgrad ? 5 : 4;
    const bool small_weight = lerp_weight < T(0.5) && lerp_weight > T(-0.5);
    for (int b = blockIdx.x; b < nb; b += gridDim.x) {
        const opt::Chunk ch(tab, L, nt, nb, b);
        const long long i = ch.tensor;
        auto p = opt::table_ptr<T>(tab[i], ch.numel);
        auto gr = opt::table_ptr<const T>(tab[nt + i], ch.numel);
        auto m = opt::table_ptr<T>(tab[2LL * nt + i], ch.numel);
        auto v = opt::table_ptr<T>(tab[3LL * nt + i], ch.numel);
        const T neg_step_size = T(-hyper[2 * i]);
        const T bc2_sqrt = T(hyper[2 * i + 1]);
        for (long long e = ch.begin + threadIdx.x; e < ch.end; e += blockDim.x) {
            T pe = p[e];
            T g = maximize ? -gr[e] : gr[e];
            if (weight_decay != T(0)) {
                if (decoupled)
                    pe = pe * decay_factor;
                else
                    g = g + weight_decay * pe;
            }
            T me = m[e];
            if (small_weight) {
                me = me + lerp_weight * (g - me);
            } else {
                const T d = (g - me) * (T(1) - lerp_weight);
                me = g - d;
            }
            m[e] = me;
            T ve = v[e] * beta2 + (one_minus_beta2 * g) * g;
            v[e] = ve;
            if (amsgrad) {
                auto vmax = opt::table_ptr<T>(tab[4LL * nt + i], ch.numel);
                const T mx = vmax[e];
                ve = mx > ve || mx != mx ? mx : ve;  // max, NaN-propagating as np.maximum
                vmax[e] = ve;
            }
            const T denom = opt::sqrt_(ve) / bc2_sqrt + eps;
            p[e] = pe + (neg_step_size * me) / denom;
        }
    }
}

// AMP (GradScaler.unscale_): every gradient of one dtype unscaled and checked for inf/NaN in
// ONE launch. List: grads. Per element: bad |= g is inf or NaN (the value before scaling, as
// PyTorch's _amp_foreach_non_finite_check_and_unscale_); g = g * inv_scale (inv_scale != 1).
// Block b writes flags[b] = 1 if its chunk held an inf or NaN, else 0: a shared-memory OR
// over the block, no atomics, every flag written by one thread. blockDim.x == AMP_THREADS.
constexpr int AMP_THREADS = 256;  // gpudiff/runtime/cuda/optim.py OPTIM_THREADS must agree

template <typename T>
__global__ void amp_unscale_multi(gptr<const long long> tab, int nt, int nb, T inv_scale,
                                  gptr<int> flags) {
    __shared__ int bad[AMP_THREADS];
    for (int b = blockIdx.x; b < nb; b += gridDim.x) {
        const opt::Chunk ch(tab, 1, nt, nb, b);
        auto g = opt::table_ptr<T>(tab[ch.tensor], ch.numel);
        int mine = 0;
        for (long long e = ch.begin + threadIdx.x; e < ch.end; e += blockDim.x) {
            const T v = g[e];
            if (!(v - v == T(0))) mine = 1;  // inf - inf and NaN - NaN are NaN: not finite
            if (inv_scale != T(1)) g[e] = v * inv_scale;
        }
        bad[threadIdx.x] = mine;
        __syncthreads();
        for (int s = blockDim.x / 2; s > 0; s >>= 1) {
            if ((int)threadIdx.x < s) bad[threadIdx.x] |= bad[threadIdx.x + s];
            __syncthreads();
        }
        if (threadIdx.x == 0) flags[b] = bad[0];
        __syncthreads();  // the next chunk reuses bad[]
    }
}

GPUDIFF_KERNEL(sgd_step_multi<float>)
GPUDIFF_KERNEL(sgd_step_multi<double>)
GPUDIFF_KERNEL(adam_step_multi<float>)
GPUDIFF_KERNEL(adam_step_multi<double>)
GPUDIFF_KERNEL(amp_unscale_multi<float>)
GPUDIFF_KERNEL(amp_unscale_multi<double>)
