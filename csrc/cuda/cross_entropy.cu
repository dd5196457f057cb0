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
// reduction), one read+write pass writes the gradient. Same row->team mapping as softmax.cu.
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

}  // namespace ce

// logits, dlogits: (rows, cols) contiguous; target: (rows,) int64; weight: (cols,);
// losses: (rows,)
template <typename T>
__global__ void GD_ROW_LAUNCH_BOUNDS
cross_entropy_fwd_bwd(gptr<const T> logits, gptr<const long long> target, gptr<const T> weight,
                      gptr<T> losses, gptr<T> dlogits, long long rows, int cols,
                      long long ignore_index, T label_smoothing) {
    const gd::RowTeam team;
    const T eps = label_smoothing;
    const T smooth = eps / T(cols);  // eps / C
    for (long long row = team.first_row; row < rows; row += team.row_step) {
        gptr<const T> x = logits + row * cols;  // (cols,)
        gptr<T> g = dlogits + row * cols;
        const long long t = target[row];  // the same for the whole team: branches stay uniform
        if (t == ignore_index) {
            for (int c = team.lane; c < cols; c += team.size) g[c] = T(0);
            if (team.lane == 0) losses[row] = T(0);
            continue;
        }
        if (t < 0 || t >= cols) {
            for (int c = team.lane; c < cols; c += team.size) g[c] = gd::Limits<T>::nan();
            if (team.lane == 0) losses[row] = gd::Limits<T>::nan();
            continue;
        }
        ce::RowStats<T> st = ce::RowStats<T>::identity();
        for (int c = team.lane; c < cols; c += team.size) {
            const T xc = x[c], wc = weight[c];
            st.ms.add(xc);
            st.wsums.a += wc * xc;
            st.wsums.b += wc;
        }
        st = team.allreduce(st);
        const T lse = st.ms.m + gd::log(st.ms.s);
        const T hard = (T(1) - eps) * weight[t];  // weight of the one-hot part
        const T wsum = st.wsums.b;
        if (team.lane == 0) {
            T loss = hard * (lse - x[t]);
            // no smoothing: skip the term, so a -inf logit elsewhere cannot make 0 * inf = NaN
            if (eps != T(0)) loss += smooth * (wsum * lse - st.wsums.a);
            losses[row] = loss;
        }
        for (int c = team.lane; c < cols; c += team.size) {
            const T p = gd::exp(x[c] - lse);
            T gc = hard * (c == t ? p - T(1) : p);
            if (eps != T(0)) gc += smooth * (wsum * p - weight[c]);
            g[c] = gc;
        }
    }
}

GPUDIFF_KERNEL(cross_entropy_fwd_bwd<float>)
GPUDIFF_KERNEL(cross_entropy_fwd_bwd<double>)
