// softmax / log_softmax forward and backward along the last, contiguous dim of a
// (rows, cols) matrix. Each row goes to a team of threads (gd::RowTeam in common.cuh):
// blockDim (32, R) = a warp per row for short rows, (B, 1) = a block per row for long ones.
// Rows of at most gd::SMALL_ROW_MAX_COLS columns (classifier outputs: 10 classes) take the
// *_small kernels instead: a thread per row on a tile staged through shared memory
// (common.cuh), so that every global request is contiguous.
//
// Forward: one read pass gathers the online max/sum-exp statistics (gd::MaxSum), one
// read+write pass produces the output. Backward: one read pass for the row's dot product,
// one read+write pass for the gradient. Lanes stride over columns: coalesced.
#include "common.cuh"

namespace smx {

// One row, any team (a warp, a block, or gd::SoloTeam), any pointers (global or shared).
// y[c] = exp(x[c] - m) / s, or log_softmax: y[c] = x[c] - (m + log s). y may alias x.
template <typename T, bool LOG, typename Team, typename PX, typename PY>
__device__ __forceinline__ void forward_row(const Team& team, PX xr, PY yr, int cols) {
    gd::MaxSum<T> st = gd::MaxSum<T>::identity();
    for (int c = team.lane; c < cols; c += team.size) st.add(xr[c]);
    st = team.allreduce(st);
    if (LOG) {
        const T lse = st.m + gd::log(st.s);
        for (int c = team.lane; c < cols; c += team.size) yr[c] = xr[c] - lse;
    } else {
        const T inv = T(1) / st.s;
        for (int c = team.lane; c < cols; c += team.size) yr[c] = gd::exp(xr[c] - st.m) * inv;
    }
}

// softmax:     gx = y * (gy - sum(gy * y))
// log_softmax: gx = gy - exp(y) * sum(gy)
// gx may alias gy.
template <typename T, bool LOG, typename Team, typename PY, typename PG, typename PX>
__device__ __forceinline__ void backward_row(const Team& team, PY yr, PG gyr, PX gxr, int cols) {
    gd::Sum<T> acc = gd::Sum<T>::identity();
    for (int c = team.lane; c < cols; c += team.size) acc.v += LOG ? gyr[c] : gyr[c] * yr[c];
    const T total = team.allreduce(acc).v;
    for (int c = team.lane; c < cols; c += team.size) {
        gxr[c] = LOG ? gyr[c] - gd::exp(yr[c]) * total : yr[c] * (gyr[c] - total);
    }
}

template <typename T, bool LOG>
__device__ __forceinline__ void forward(gptr<const T> x, gptr<T> y, long long rows, int cols) {
    const gd::RowTeam team;
    for (long long row = team.first_row; row < rows; row += team.row_step)
        forward_row<T, LOG>(team, x + row * cols, y + row * cols, cols);
}

template <typename T, bool LOG>
__device__ __forceinline__ void backward(gptr<const T> y, gptr<const T> gy, gptr<T> gx,
                                         long long rows, int cols) {
    const gd::RowTeam team;
    for (long long row = team.first_row; row < rows; row += team.row_step) {
        const long long off = row * cols;
        backward_row<T, LOG>(team, y + off, gy + off, gx + off, cols);
    }
}

// Short rows: blockDim (R, 1), R rows a tile; dynamic shared memory R * ld elements.
template <typename T, bool LOG>
__device__ __forceinline__ void forward_small(gptr<const T> x, gptr<T> y, long long rows,
                                              int cols) {
    T* s = dynamic_shared<T>();  // (R, ld): the tile, then its result in place
    const int R = blockDim.x, ld = gd::small_row_ld(cols);
    for (long long row0 = (long long)blockIdx.x * R; row0 < rows; row0 += (long long)gridDim.x * R) {
        const int n = rows - row0 < R ? (int)(rows - row0) : R;  // uniform over the block
        gd::tile_load(x, s, row0, n, cols, ld);
        __syncthreads();
        if ((int)threadIdx.x < n) {
            T* r = s + threadIdx.x * ld;
            forward_row<T, LOG>(gd::SoloTeam(), r, r, cols);
        }
        __syncthreads();
        gd::tile_store(s, y, row0, n, cols, ld);
        __syncthreads();  // the next tile overwrites s
    }
}

// Short rows: dynamic shared memory 2 * R * ld elements: y's tile, then gy's (gx in place)
template <typename T, bool LOG>
__device__ __forceinline__ void backward_small(gptr<const T> y, gptr<const T> gy, gptr<T> gx,
                                               long long rows, int cols) {
    const int R = blockDim.x, ld = gd::small_row_ld(cols);
    T* sy = dynamic_shared<T>();  // (R, ld)
    T* sg = sy + R * ld;          // (R, ld)
    for (long long row0 = (long long)blockIdx.x * R; row0 < rows; row0 += (long long)gridDim.x * R) {
        const int n = rows - row0 < R ? (int)(rows - row0) : R;
        gd::tile_load(y, sy, row0, n, cols, ld);
        gd::tile_load(gy, sg, row0, n, cols, ld);
        __syncthreads();
        if ((int)threadIdx.x < n) {
            T* g = sg + threadIdx.x * ld;
            backward_row<T, LOG>(gd::SoloTeam(), sy + threadIdx.x * ld, g, g, cols);
        }
        __syncthreads();
        gd::tile_store(sg, gx, row0, n, cols, ld);
        __syncthreads();
    }
}

}  // namespace smx

// x, y: (rows, cols) contiguous
template <typename T>
__global__ void GD_ROW_LAUNCH_BOUNDS
softmax_fwd(gptr<const T> x, gptr<T> y, long long rows, int cols) {
    smx::forward<T, false>(x, y, rows, cols);
}
template <typename T>
__global__ void GD_ROW_LAUNCH_BOUNDS
log_softmax_fwd(gptr<const T> x, gptr<T> y, long long rows, int cols) {
    smx::forward<T, true>(x, y, rows, cols);
}
// y (the forward output), gy, gx: (rows, cols) contiguous
template <typename T>
__global__ void GD_ROW_LAUNCH_BOUNDS
softmax_bwd(gptr<const T> y, gptr<const T> gy, gptr<T> gx, long long rows, int cols) {
    smx::backward<T, false>(y, gy, gx, rows, cols);
}
template <typename T>
__global__ void GD_ROW_LAUNCH_BOUNDS
log_softmax_bwd(gptr<const T> y, gptr<const T> gy, gptr<T> gx, long long rows, int cols) {
    smx::backward<T, true>(y, gy, gx, rows, cols);
}

// The same for cols <= gd::SMALL_ROW_MAX_COLS: blockDim (R, 1), dynamic shared memory
// R * (cols | 1) elements (forward) or twice that (backward).
template <typename T>
__global__ void GD_ROW_LAUNCH_BOUNDS
softmax_fwd_small(gptr<const T> x, gptr<T> y, long long rows, int cols) {
    smx::forward_small<T, false>(x, y, rows, cols);
}
template <typename T>
__global__ void GD_ROW_LAUNCH_BOUNDS
log_softmax_fwd_small(gptr<const T> x, gptr<T> y, long long rows, int cols) {
    smx::forward_small<T, true>(x, y, rows, cols);
}
template <typename T>
__global__ void GD_ROW_LAUNCH_BOUNDS
softmax_bwd_small(gptr<const T> y, gptr<const T> gy, gptr<T> gx, long long rows, int cols) {
    smx::backward_small<T, false>(y, gy, gx, rows, cols);
}
template <typename T>
__global__ void GD_ROW_LAUNCH_BOUNDS
log_softmax_bwd_small(gptr<const T> y, gptr<const T> gy, gptr<T> gx, long long rows, int cols) {
    smx::backward_small<T, true>(y, gy, gx, rows, cols);
}

GPUDIFF_KERNEL(softmax_fwd<float>)
GPUDIFF_KERNEL(softmax_fwd<double>)
GPUDIFF_KERNEL(log_softmax_fwd<float>)
GPUDIFF_KERNEL(log_softmax_fwd<double>)
GPUDIFF_KERNEL(softmax_bwd<float>)
GPUDIFF_KERNEL(softmax_bwd<double>)
GPUDIFF_KERNEL(log_softmax_bwd<float>)
GPUDIFF_KERNEL(log_softmax_bwd<double>)
GPUDIFF_KERNEL(softmax_fwd_small<float>)
GPUDIFF_KERNEL(softmax_fwd_small<double>)
GPUDIFF_KERNEL(log_softmax_fwd_small<float>)
GPUDIFF_KERNEL(log_softmax_fwd_small<double>)
GPUDIFF_KERNEL(softmax_bwd_small<float>)
GPUDIFF_KERNEL(softmax_bwd_small<double>)
GPUDIFF_KERNEL(log_softmax_bwd_small<float>)
GPUDIFF_KERNEL(log_softmax_bwd_small<double>)
