// Fused softmax cross-entropy: for each row i of logits (N, C), with t = target[i],
// eps = label_smoothing, w = class weights (all ones when the caller has none), W = sum(w),
// p = softmax(x_i), lse = logsumexp(x_i):
//
//   loss_i    = (1 - eps) * w[t] * (lse - x[t]) + (eps / C) * (W * lse - sum_j w[j] * x[j])
//   dloss_i/dx_j = (1 - eps) * w[t] * (p_j - [j == t]) + (eps / C) * (W * p_j - w[j])
//
// which is PyTorch's definition: (1 - eps) * nll_loss(log_softmax, weight) plus eps/C times
// the weighted sum of -log_softmax over the classes (aten LossNLL.cpp,
// cross_entropy_loss_label_smoothing). Rows whose target is ignore_index get loss 0 and a
// zero gradient row; the op divides by sum(w[t_i]) over the other rows for 'mean'. A target
// outside [0, C) (and not ignore_index) gives NaN loss and gradient: a kernel cannot raise.
//
// One read pass per row collects max/sum-exp, sum(w*x) and sum(w) together (a single team
// reduction), one read+write pass writes the gradient. Same row->team mapping as softmax.cu,
// and the same short-row kernel (cols <= gd::SMALL_ROW_MAX_COLS: a thread per row on a tile
// staged through shared memory, the class weights staged once per block).
#include "common.cuh"

namespace ce {

template <typename T>
struct RowStats {  // MaxSum of the logits plus two weighted sums, reduced in one go
    gd::MaxSum<T> ms;
    gd::Sum2<T> wsums;  // a = sum(w[j] * x[j]), b = sum(w[j])
    __device__ __forceinline__ static RowStats identity() {
        return {gd::MaxSum<T>::identity(), gd::Sum2<T>::identity()};
    }
    __device__ __forceinline__ void merge(const RowStats& o) {
        ms.merge(o.ms);
        wsums.merge(o.wsums);
    }
    __device__ __forceinline__ RowStats shfl_xor(int m) const {
        return {ms.shfl_xor(m), wsums.shfl_xor(m)};
    }
};

// One row with target t, any team and pointers (x, w, g global or shared; g may alias x).
// Writes the gradient row and returns the loss (valid on every lane).
template <typename T, typename Team, typename PX, typename PW, typename PG>
__device__ __forceinline__ T row(const Team& team, PX x, PW weight, long long t, int cols,
                                 long long ignore_index, T eps, PG g) {
    if (t == ignore_index) {  // t is the same for the whole team: branches stay uniform
        for (int c = team.lane; c < cols; c += team.size) g[c] = T(0);
        return T(0);
    }
    if (t < 0 || t >= cols) {
        for (int c = team.lane; c < cols; c += team.size) g[c] = gd::Limits<T>::nan();
        return gd::Limits<T>::nan();
    }
    RowStats<T> st = RowStats<T>::identity();
    for (int c = team.lane; c < cols; c += team.size) {
        const T xc = x[c], wc = weight[c];
        st.ms.add(xc);
        st.wsums.a += wc * xc;
        st.wsums.b += wc;
    }
    st = team.allreduce(st);
    const T lse = st.ms.m + gd::log(st.ms.s);
    const T hard = (T(1) - eps) * weight[t];  // weight of the one-hot part
    const T smooth = eps / T(cols);           // eps / C
    const T wsum = st.wsums.b;
    T loss = hard * (lse - x[t]);
    // no smoothing: skip the term, so a -inf logit elsewhere cannot make 0 * inf = NaN
    if (eps != T(0)) loss += smooth * (wsum * lse - st.wsums.a);
    for (int c = team.lane; c < cols; c += team.size) {
        const T p = gd::exp(x[c] - lse);
        T gc = hard * (c == t ? p - T(1) : p);
        if (eps != T(0)) gc += smooth * (wsum * p - weight[c]);
        g[c] = gc;
    }
    return loss;
}

}  // namespace ce

// logits, dlogits: (rows, cols) contiguous; target: (rows,) int64; weight: (cols,);
// losses: (rows,)
template <typename T>
__global__ void GD_ROW_LAUNCH_BOUNDS
cross_entropy_fwd_bwd(gptr<const T> logits, gptr<const long long> target, gptr<const T> weight,
                      gptr<T> losses, gptr<T> dlogits, long long rows, int cols,
                      long long ignore_index, T label_smoothing) {
    const gd::RowTeam team;
    for (long long r = team.first_row; r < rows; r += team.row_step) {
        const T loss = ce::row(team, logits + r * cols, weight, target[r], cols, ignore_index,
                               label_smoothing, dlogits + r * cols);
        if (team.lane == 0) losses[r] = loss;
    }
}

// The same for cols <= gd::SMALL_ROW_MAX_COLS: blockDim (R, 1), dynamic shared memory
// R * (cols | 1) + cols elements (the tile, then the class weights).
template <typename T>
__global__ void GD_ROW_LAUNCH_BOUNDS
cross_entropy_fwd_bwd_small(gptr<const T> logits, gptr<const long long> target,
                            gptr<const T> weight, gptr<T> losses, gptr<T> dlogits, long long rows,
                            int cols, long long ignore_index, T label_smoothing) {
    const int R = blockDim.x, ld = gd::small_row_ld(cols);
    T* s = dynamic_shared<T>();  // (R, ld): logits, then the gradient in place
    T* w = s + R * ld;           // (cols,)
    for (int c = threadIdx.x; c < cols; c += R) w[c] = weight[c];
    for (long long row0 = (long long)blockIdx.x * R; row0 < rows; row0 += (long long)gridDim.x * R) {
        const int n = rows - row0 < R ? (int)(rows - row0) : R;  // uniform over the block
        gd::tile_load(logits, s, row0, n, cols, ld);
        __syncthreads();  // also publishes w on the first tile
        if ((int)threadIdx.x < n) {
            const long long r = row0 + threadIdx.x;
            T* x = s + threadIdx.x * ld;
            losses[r] = ce::row(gd::SoloTeam(), x, w, target[r], cols, ignore_index,
                                label_smoothing, x);
        }
        __syncthreads();
        gd::tile_store(s, dlogits, row0, n, cols, ld);
        __syncthreads();  // the next tile overwrites s
    }
}

GPUDIFF_KERNEL(cross_entropy_fwd_bwd<float>)
GPUDIFF_KERNEL(cross_entropy_fwd_bwd<double>)
GPUDIFF_KERNEL(cross_entropy_fwd_bwd_small<float>)
GPUDIFF_KERNEL(cross_entropy_fwd_bwd_small<double>)
