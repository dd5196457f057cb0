// Kernels that exercise CUDA semantics rather than compute anything useful: the emulator's
// tests (tests/cuda/test_cuda_emulator.py) run them in the emulator and, for the correct
// ones, on a real GPU too, so that the emulator is checked against the hardware. Some are
// wrong on purpose (a missing barrier, an out-of-bounds write): never launch those on a GPU.
#include "common.cuh"

// y[b, t] = x[b, (t + 1) % n] through shared memory: correct only with the barrier.
// One 1-D block of n <= 1024 threads per row b.
__global__ void rotate_block(gptr<const float> x, gptr<float> y, int with_barrier) {
    __shared__ float s[1024];
    const int t = threadIdx.x, n = blockDim.x;
    const long long row = (long long)blockIdx.x * n;
    s[t] = x[row + t];
    if (with_barrier) __syncthreads();  // uniform: every thread takes the same branch
    y[row + t] = s[(t + 1) % n];
}

// Every warp intrinsic on int data; out: (8, n) for n = total threads, x: (n,).
// width: the shuffles' segment width (power of 2 <= 32).
__global__ void warp_ops(gptr<const int> x, gptr<int> out, int width) {
    const long long n = (long long)gridDim.x * blockDim.x;
    const long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    const int lane = threadIdx.x & 31;
    const int v = x[i];
    out[0 * n + i] = __shfl_sync(gd::FULL_MASK, v, (lane * 7 + 3) & 31, width);
    out[1 * n + i] = __shfl_up_sync(gd::FULL_MASK, v, 3, width);
    out[2 * n + i] = __shfl_down_sync(gd::FULL_MASK, v, 5, width);
    out[3 * n + i] = __shfl_xor_sync(gd::FULL_MASK, v, 6, width);
    out[4 * n + i] = (int)__ballot_sync(gd::FULL_MASK, v & 1);
    out[5 * n + i] = __any_sync(gd::FULL_MASK, v == 7);
    out[6 * n + i] = __all_sync(gd::FULL_MASK, v >= 0);
    __syncwarp();
    // two half-warps exchange at the same time under disjoint masks
    const unsigned half = lane < 16 ? 0x0000ffffu : 0xffff0000u;
    out[7 * n + i] = __shfl_xor_sync(half, v, 1);
}

// A warp-level sum of doubles with __shfl_down_sync (lane 0 gets it) and a block sum with
// atomicAdd: total[0] += sum(x). x: (n,), any 1-D launch.
__global__ void atomic_sum(gptr<const double> x, gptr<double> total, long long n) {
    double v = 0;
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < n;
         i += (long long)blockDim.x * gridDim.x)
        v += x[i];
    for (int d = 16; d > 0; d >>= 1) v += __shfl_down_sync(gd::FULL_MASK, v, d);
    if ((threadIdx.x & 31) == 0) atomicAdd(&total[0], v);
}

// hist[k] = number of i with x[i] == k; maxval[0] = max(x). x: (n,) in [0, bins).
__global__ void atomic_hist(gptr<const int> x, gptr<int> hist, gptr<int> maxval, long long n) {
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < n;
         i += (long long)blockDim.x * gridDim.x) {
        atomicAdd(&hist[x[i]], 1);
        atomicMax(&maxval[0], x[i]);
    }
}

// y[b, t] = x[b, n - 1 - t] through dynamic shared memory (shared_mem >= n * 4 bytes).
__global__ void reverse_dynamic(gptr<const float> x, gptr<float> y) {
    float* s = dynamic_shared<float>();
    const int t = threadIdx.x, n = blockDim.x;
    const long long row = (long long)blockIdx.x * n;
    s[t] = x[row + t];
    __syncthreads();
    y[row + t] = s[n - 1 - t];
}

// counts[b] = number of threads of block b with x[i] > 0, from __syncthreads_count; any[b]
// and all[b] from __syncthreads_or / __syncthreads_and.
__global__ void barrier_count(gptr<const float> x, gptr<int> counts, gptr<int> any,
                              gptr<int> all) {
    const float v = x[(long long)blockIdx.x * blockDim.x + threadIdx.x];
    const int c = __syncthreads_count(v > 0);
    const int o = __syncthreads_or(v > 0);
    const int a = __syncthreads_and(v > 0);
    if (threadIdx.x == 0) {
        counts[blockIdx.x] = c;
        any[blockIdx.x] = o;
        all[blockIdx.x] = a;
    }
}

// out[i, :] = (threadIdx.xyz, blockIdx.xyz, blockDim.xyz, gridDim.xyz) for the thread with
// global linear id i (x fastest, then y, z; then blocks likewise). out: (threads, 12).
__global__ void index_probe(gptr<int> out) {
    const long long block = blockIdx.x + (long long)gridDim.x * (blockIdx.y + (long long)gridDim.y * blockIdx.z);
    const int per_block = blockDim.x * blockDim.y * blockDim.z;
    const int t = threadIdx.x + blockDim.x * (threadIdx.y + blockDim.y * threadIdx.z);
    gptr<int> o = out + (block * per_block + t) * 12;
    o[0] = threadIdx.x; o[1] = threadIdx.y; o[2] = threadIdx.z;
    o[3] = blockIdx.x; o[4] = blockIdx.y; o[5] = blockIdx.z;
    o[6] = blockDim.x; o[7] = blockDim.y; o[8] = blockDim.z;
    o[9] = gridDim.x; o[10] = gridDim.y; o[11] = gridDim.z;
}

// y[b, t] = x[b, t] * 2 through a `static __shared__` array (the spelling of much public CUDA
// code): the emulator compiles it like `__shared__`. One block of blockDim.x <= 32 per row.
__global__ void static_shared_copy(gptr<const float> x, gptr<float> y) {
    static __shared__ float s[32];
    const int t = threadIdx.x;
    const long long row = (long long)blockIdx.x * blockDim.x;
    s[t] = 2.0f * x[row + t];
    __syncthreads();
    y[row + t] = s[t];
}

// y[b] = sum(x[b, :]) by a shared-memory tree (blockDim.x a power of 2 <= 1024). With
// with_barrier = 0 the barrier inside the loop is missing: thread t reads s[t + stride]
// while thread t + stride may still be adding into it (write-after-read / read-after-write).
__global__ void tree_sum(gptr<const float> x, gptr<float> y, int with_barrier) {
    __shared__ float s[1024];
    const int t = threadIdx.x;
    s[t] = x[(long long)blockIdx.x * blockDim.x + t];
    __syncthreads();
    for (int stride = blockDim.x / 2; stride > 0; stride /= 2) {
        if (t < stride) s[t] += s[t + stride];
        if (with_barrier) __syncthreads();  // uniform
    }
    if (t == 0) y[blockIdx.x] = s[0];
}

// y[i] = s[lane ^ 1] after each lane wrote s[lane]: lanes of one warp exchanging through
// shared memory need __syncwarp() between the write and the read (Volta and later do not
// run a warp in lockstep). One warp per block.
__global__ void warp_exchange(gptr<int> y, int with_syncwarp) {
    __shared__ int s[32];
    const int lane = threadIdx.x & 31;
    s[lane] = 3 * lane + (int)blockIdx.x;
    if (with_syncwarp) __syncwarp();
    y[(long long)blockIdx.x * blockDim.x + threadIdx.x] = s[lane ^ 1];
}

// y[b] = sum(x[b * blockDim.x:(b + 1) * blockDim.x]) (elements past n count as 0) through an
// `extern __shared__` array sized by the launch (shared_mem = blockDim.x * 4 bytes), as the
// reductions of NVIDIA's cuda-samples do; blockDim.x a power of 2. With with_barrier = 0 the
// barrier inside the loop is missing (a race, as in tree_sum).
__global__ void extern_shared_sum(gptr<const float> x, gptr<float> y, long long n,
                                  int with_barrier) {
    extern __shared__ float sdata[];
    const unsigned t = threadIdx.x;
    const long long i = (long long)blockIdx.x * blockDim.x + t;
    sdata[t] = i < n ? x[i] : 0.0f;
    __syncthreads();
    for (unsigned s = blockDim.x / 2; s > 0; s >>= 1) {
        if (t < s) sdata[t] += sdata[t + s];
        if (with_barrier) __syncthreads();  // uniform
    }
    if (t == 0) y[blockIdx.x] = sdata[0];
}

// bits[b, t] = the bits of x[b, n - 1 - t]: written through one extern __shared__ array,
// read through another of another type. All extern __shared__ arrays of a kernel are the
// same dynamic shared memory (shared_mem >= blockDim.x * 4).
__global__ void extern_shared_alias(gptr<const float> x, gptr<int> bits) {
    extern __shared__ float as_float[];
    extern __shared__ int as_int[];
    const int t = threadIdx.x, n = blockDim.x;
    const long long row = (long long)blockIdx.x * n;
    as_float[t] = x[row + t];
    __syncthreads();
    bits[row + t] = as_int[n - 1 - t];
}

// ---- wrong on purpose: emulator only --------------------------------------------------------
// total[0] += x[i] by every thread, without atomicAdd: right in every emulated order (one
// thread runs at a time), updates lost on a GPU. racecheck reports it.
__global__ void forgotten_atomic(gptr<const float> x, gptr<float> total, long long n) {
    const long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) total[0] += x[i];
}
// Writes one element past a static __shared__ array (launch with 33 threads): on a GPU it
// lands in whatever the compiler placed next.
__global__ void static_shared_overflow(gptr<float> y) {
    __shared__ float s[32];
    s[threadIdx.x] = 1.0f;
    __syncthreads();
    if (threadIdx.x < 32) y[threadIdx.x] = s[threadIdx.x];
}
// Reads a static __shared__ array before any thread wrote it: stale data of the previous
// block on a GPU; poisoned (NaN) in the emulator, and an initcheck error.
__global__ void shared_read_before_write(gptr<float> y) {
    __shared__ float s[64];
    const int t = threadIdx.x;
    y[(long long)blockIdx.x * blockDim.x + t] = s[t];
    __syncthreads();
    s[t] = (float)t;
}
// Writes y[n + offset] through a raw pointer (no bounds check): the guard zone catches it.
__global__ void oob_write(gptr<float> y, long long n, long long offset) {
    if (blockIdx.x == 0 && threadIdx.x == 0) {
        float* raw = &y[0];
        raw[n + offset] = 1.0f;
    }
}
// Copies the float that starts `shift` bytes into x: a misaligned load unless shift % 4 == 0
// (a GPU faults with "misaligned address"; the memory checker reports it).
__global__ void misaligned_load(gptr<const float> x, gptr<float> y, int shift) {
    if (threadIdx.x == 0) {
        const char* bytes = reinterpret_cast<const char*>(&x[0]);
        y[0] = *reinterpret_cast<const float*>(bytes + shift);
    }
}
// Reads x[n]: the bounds-checked pointer catches it at once.
__global__ void oob_read(gptr<const float> x, gptr<float> y, long long n) {
    y[0] = x[n];
}
// Writes one float past its dynamic shared memory (shared_mem = blockDim.x * 4 bytes).
__global__ void dynamic_overflow(gptr<float> y) {
    float* s = dynamic_shared<float>();
    s[threadIdx.x + 1] = 1.0f;
    __syncthreads();
    y[threadIdx.x] = s[threadIdx.x];
}
// Thread t writes sdata[t + 1] of an extern __shared__ array, then reads sdata[t]: with
// shared_mem = blockDim.x * 4 the last thread writes one float past the end; with one float
// more, sdata[0] is never written (NaN from the poison, an initcheck error when checked).
__global__ void extern_shared_shift(gptr<float> y) {
    extern __shared__ float sdata[];
    const int t = threadIdx.x;
    sdata[t + 1] = (float)t;
    __syncthreads();
    y[(long long)blockIdx.x * blockDim.x + t] = sdata[t];
}
// Half of the block returns before a barrier the other half waits at.
__global__ void divergent_barrier(gptr<float> y) {
    if (threadIdx.x >= blockDim.x / 2) return;
    __syncthreads();
    y[threadIdx.x] = 1.0f;
}
// A shuffle whose mask leaves out the lane it reads from.
__global__ void shfl_outside_mask(gptr<int> y) {
    if (threadIdx.x < 16) y[threadIdx.x] = __shfl_sync(0x0000ffffu, (int)threadIdx.x, 20);
}

GPUDIFF_KERNEL(rotate_block)
GPUDIFF_KERNEL(warp_ops)
GPUDIFF_KERNEL(atomic_sum)
GPUDIFF_KERNEL(atomic_hist)
GPUDIFF_KERNEL(reverse_dynamic)
GPUDIFF_KERNEL(barrier_count)
GPUDIFF_KERNEL(index_probe)
GPUDIFF_KERNEL(static_shared_copy)
GPUDIFF_KERNEL(tree_sum)
GPUDIFF_KERNEL(warp_exchange)
GPUDIFF_KERNEL(extern_shared_sum)
GPUDIFF_KERNEL(extern_shared_alias)
GPUDIFF_KERNEL(forgotten_atomic)
GPUDIFF_KERNEL(static_shared_overflow)
GPUDIFF_KERNEL(shared_read_before_write)
GPUDIFF_KERNEL(oob_write)
GPUDIFF_KERNEL(oob_read)
GPUDIFF_KERNEL(misaligned_load)
GPUDIFF_KERNEL(dynamic_overflow)
GPUDIFF_KERNEL(extern_shared_shift)
GPUDIFF_KERNEL(divergent_barrier)
GPUDIFF_KERNEL(shfl_outside_mask)
