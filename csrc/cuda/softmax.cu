// softmax / log_softmax forward and backward along the last, contiguous dim of a
// (rows, cols) matrix. Each row goes to a team of threads (gd::RowTeam in common.cuh):
// blockDim (32, R) = a warp per row for short rows, (B, 1) = a block per row for long ones.
//
// Forward: one read pass gathers the online max/sum-exp statistics (gd::MaxSum), one
// read+write pass produces the output. Backward: one read pass for the row's dot product,
// one read+write pass for the gradient. Lanes stride over columns: coalesced.
#include "common.cuh"

namespace smx {

// y[r] = exp(x[r] - m) / s, or log_softmax: y[r] = x[r] - (m + log s)
template <typename T, bool LOG>
__device__ __forceinline__ void forward(gptr<const T> x, gptr<T> y, long long rows, int cols) {
    const gd::RowTeam team;
    for (long long row = team.first_row; row < rows; row += team.row_step) {
        gptr<const T> xr = x + row * cols;  // (cols,)
        gptr<T> yr = y + row * cols;
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
}

// softmax:     gx = y * (gy - sum(gy * y))
// log_softmax: gx = gy - exp(y) * sum(gy)
template <typename T, bool LOG>
__device__ __forceinline__ void backward(gptr<const T> y, gptr<const T> gy, gptr<T> gx,
                                         long long rows, int cols) {
    const gd::RowTeam team;
    for (long long row = team.first_row; row < rows; row += team.row_step) {
        const long long off = row * cols;
        gptr<const T> yr = y + off;  // (cols,)
        gptr<const T> gyr = gy + off;
        gptr<T> gxr = gx + off;
        gd::Sum<T> acc = gd::Sum<T>::identity();
        for (int c = team.lane; c < cols; c += team.size) acc.v += LOG ? gyr[c] : gyr[c] * yr[c];
        const T total = team.allreduce(acc).v;
        for (int c = team.lane; c < cols; c += team.size) {
            gxr[c] = LOG ? gyr[c] - gd::exp(yr[c]) * total : yr[c] * (gyr[c] - total);
        }
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

GPUDIFF_KERNEL(softmax_fwd<float>)
GPUDIFF_KERNEL(softmax_fwd<double>)
GPUDIFF_KERNEL(log_softmax_fwd<float>)
GPUDIFF_KERNEL(log_softmax_fwd<double>)
GPUDIFF_KERNEL(softmax_bwd<float>)
GPUDIFF_KERNEL(softmax_bwd<double>)
GPUDIFF_KERNEL(log_softmax_bwd<float>)
GPUDIFF_KERNEL(log_softmax_bwd<double>)
