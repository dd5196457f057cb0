// Fused, numerically stable softmax / log_softmax (forward and backward) and softmax
// cross-entropy. The input is viewed as (outer, D, inner) around the softmax dim; each
// (outer, inner) line is read once for its max, once for its sum of exp(x - max) and once to
// write the result, with no temporaries. Sums accumulate in double.
//
//   softmax:              y = exp(x - max) / sum exp(x - max)
//   log_softmax:          y = x - max - log(sum exp(x - max))
//   softmax_backward:     gx = y * (gy - sum(gy * y))
//   log_softmax_backward: gx = gy - exp(y) * sum(gy)
//
//   cross_entropy, per row i of logits (N, C) with t = target[i], w = weight (or ones),
//   eps = label_smoothing, logp = log_softmax(row):
//     loss_i = (1 - eps) * w[t] * -logp[t] + eps / C * sum_c w[c] * -logp[c]
//     dlogits_i[c] = A * softmax(row)[c] - a_c,
//       a_c = (1 - eps) * w[t] * [c == t] + eps / C * w[c],   A = sum_c a_c
//   (PyTorch's formula: the smoothing term is weighted by w[c] and, under mean reduction,
//   shares the divisor sum_i w[t_i] with the NLL term.) Ignored rows give 0 and 0.
#include "common.h"
#include "kernels.h"

#include <cmath>

namespace gpudiff {
namespace {

using acc_t = double;

struct Lines {
    index_t outer, D, inner;
};

Lines lines_of(const py::array& x, int64_t& dim, const char* name) {
    const int64_t nd = x.ndim();
    if (nd == 0) {  // a scalar is a line of one
        dim = 0;
        return {1, 1, 1};
    }
    if (dim < -nd || dim >= nd)
        throw py::index_error(std::string(name) + ": dim " + std::to_string(dim) +
                              " out of range for a " + std::to_string(nd) + "-D input");
    if (dim < 0) dim += nd;
    Lines l{1, x.shape(dim), 1};
    for (int64_t i = 0; i < dim; ++i) l.outer *= x.shape(i);
    for (int64_t i = dim + 1; i < nd; ++i) l.inner *= x.shape(i);
    return l;
}

// Lines are processed in tasks of up to kBlock neighbouring inner positions, so that a
// softmax over dim 1 of (N, C, H, W) still streams memory contiguously.
constexpr index_t kBlock = 64;

template <typename T, bool Log>
void softmax_lines(const T* x, T* y, Lines l) {
    const index_t nblk = (l.inner + kBlock - 1) / kBlock;
    const index_t tasks = l.outer * nblk;
#pragma omp parallel for schedule(static) if (parallel_pays(l.outer * l.D * l.inner))
    for (index_t t = 0; t < tasks; ++t) {
        const index_t o = t / nblk, k0 = (t % nblk) * kBlock;
        const index_t nb = std::min(kBlock, l.inner - k0);
        const T* xs = x + o * l.D * l.inner + k0;
        T* ys = y + o * l.D * l.inner + k0;
        T mx[kBlock];
        acc_t sum[kBlock];
        for (index_t k = 0; k < nb; ++k) mx[k] = -std::numeric_limits<T>::infinity(), sum[k] = 0;
        for (index_t d = 0; d < l.D; ++d)
            for (index_t k = 0; k < nb; ++k) mx[k] = std::max(mx[k], xs[d * l.inner + k]);
        for (index_t d = 0; d < l.D; ++d)
            for (index_t k = 0; k < nb; ++k) {
                const T e = std::exp(xs[d * l.inner + k] - mx[k]);
                if (!Log) ys[d * l.inner + k] = e;
                sum[k] += e;
            }
        if (Log) {
            T shift[kBlock];
            for (index_t k = 0; k < nb; ++k) shift[k] = mx[k] + T(std::log(sum[k]));
            for (index_t d = 0; d < l.D; ++d)
                for (index_t k = 0; k < nb; ++k)
                    ys[d * l.inner + k] = xs[d * l.inner + k] - shift[k];
        } else {
            T inv[kBlock];
            for (index_t k = 0; k < nb; ++k) inv[k] = T(acc_t(1) / sum[k]);
            for (index_t d = 0; d < l.D; ++d)
                for (index_t k = 0; k < nb; ++k) ys[d * l.inner + k] *= inv[k];
        }
    }
}

// A row (inner == 1) version: the common (N, C) softmax over the last dim.
template <typename T, bool Log>
void softmax_rows(const T* x, T* y, Lines l) {
#pragma omp parallel for schedule(static) if (parallel_pays(l.outer * l.D))
    for (index_t r = 0; r < l.outer; ++r) {
        const T* xr = x + r * l.D;
        T* yr = y + r * l.D;
        T mx = -std::numeric_limits<T>::infinity();
        for (index_t d = 0; d < l.D; ++d) mx = std::max(mx, xr[d]);
        acc_t sum = 0;
        for (index_t d = 0; d < l.D; ++d) {
            const T e = std::exp(xr[d] - mx);
            if (!Log) yr[d] = e;
            sum += e;
        }
        if (Log) {
            const T shift = mx + T(std::log(sum));
            for (index_t d = 0; d < l.D; ++d) yr[d] = xr[d] - shift;
        } else {
            const T inv = T(acc_t(1) / sum);
            for (index_t d = 0; d < l.D; ++d) yr[d] *= inv;
        }
    }
}

// gx = y * (gy - sum(gy*y))  (Log: gx = gy - exp(y) * sum(gy)), per line.
template <typename T, bool Log>
void softmax_backward_lines(const T* y, const T* gy, T* gx, Lines l) {
    const index_t nblk = (l.inner + kBlock - 1) / kBlock;
    const index_t tasks = l.outer * nblk;
#pragma omp parallel for schedule(static) if (parallel_pays(l.outer * l.D * l.inner))
    for (index_t t = 0; t < tasks; ++t) {
        const index_t o = t / nblk, k0 = (t % nblk) * kBlock;
        const index_t nb = std::min(kBlock, l.inner - k0);
        const index_t base = o * l.D * l.inner + k0;
        const T *ys = y + base, *gs = gy + base;
        T* out = gx + base;
        acc_t dot[kBlock];
        for (index_t k = 0; k < nb; ++k) dot[k] = 0;
        for (index_t d = 0; d < l.D; ++d)
            for (index_t k = 0; k < nb; ++k) {
                const index_t at = d * l.inner + k;
                dot[k] += Log ? acc_t(gs[at]) : acc_t(gs[at]) * ys[at];
            }
        T s[kBlock];
        for (index_t k = 0; k < nb; ++k) s[k] = T(dot[k]);
        for (index_t d = 0; d < l.D; ++d)
            for (index_t k = 0; k < nb; ++k) {
                const index_t at = d * l.inner + k;
                out[at] = Log ? gs[at] - std::exp(ys[at]) * s[k] : ys[at] * (gs[at] - s[k]);
            }
    }
}

template <bool Log>
py::array softmax_forward_impl(py::array x, int64_t dim, const char* name) {
    require_contiguous(x, name, "x");
    const Lines l = lines_of(x, dim, name);
    return dispatch_float(x, name, [&](auto tag) -> py::array {
        using T = decltype(tag);
        py::array_t<T> y(shape_of(x));
        const T* px = cdata_of<T>(x);
        T* pyv = y.mutable_data();
        {
            py::gil_scoped_release nogil;
            if (l.inner == 1)
                softmax_rows<T, Log>(px, pyv, l);
            else
                softmax_lines<T, Log>(px, pyv, l);
        }
        return y;
    });
}

template <bool Log>
py::array softmax_backward_impl(py::array y, py::array gy, int64_t dim, const char* name) {
    require_contiguous(y, name, "y");
    require_contiguous(gy, name, "gy");
    require_same_dtype(y, gy, name);
    if (!same_shape(y, gy)) throw py::value_error(std::string(name) + ": y and gy shapes differ");
    const Lines l = lines_of(y, dim, name);
    return dispatch_float(y, name, [&](auto tag) -> py::array {
        using T = decltype(tag);
        py::array_t<T> gx(shape_of(y));
        const T* py_ = cdata_of<T>(y);
        const T* pg = cdata_of<T>(gy);
        T* px = gx.mutable_data();
        {
            py::gil_scoped_release nogil;
            softmax_backward_lines<T, Log>(py_, pg, px, l);
        }
        return gx;
    });
}

template <typename T>
void cross_entropy_rows(const T* x, const int64_t* target, const T* weight, index_t N, index_t C,
                        int64_t ignore_index, double eps, T* losses, T* dl) {
    // sum of the class weights (C without weights): the smoothing part of A
    acc_t wsum = 0;
    for (index_t c = 0; c < C; ++c) wsum += weight ? acc_t(weight[c]) : acc_t(1);
    const acc_t smooth = eps / acc_t(C);
#pragma omp parallel for schedule(static) if (parallel_pays(N * C))
    for (index_t i = 0; i < N; ++i) {
        const T* xr = x + i * C;
        T* gr = dl + i * C;
        const int64_t t = target[i];
        if (t == ignore_index) {
            losses[i] = T(0);
            std::fill(gr, gr + C, T(0));
            continue;
        }
        T mx = -std::numeric_limits<T>::infinity();
        for (index_t c = 0; c < C; ++c) mx = std::max(mx, xr[c]);
        acc_t sum = 0, wx = 0;  // sum exp(x - mx), sum w[c] * (x[c] - mx)
        for (index_t c = 0; c < C; ++c) {
            const acc_t z = acc_t(xr[c]) - mx;
            sum += std::exp(z);
            wx += (weight ? acc_t(weight[c]) : acc_t(1)) * z;
        }
        const acc_t lse = std::log(sum);  // log-sum-exp of x - mx
        const acc_t wt = weight ? acc_t(weight[t]) : acc_t(1);
        const acc_t nll = lse - (acc_t(xr[t]) - mx);  // -logp[t]
        // -sum_c w[c] logp[c] = lse * sum(w) - sum_c w[c] (x[c] - mx)
        const acc_t smooth_loss = lse * wsum - wx;
        losses[i] = T((1.0 - eps) * wt * nll + smooth * smooth_loss);
        const acc_t A = (1.0 - eps) * wt + smooth * wsum;
        const acc_t inv = 1.0 / sum;
        for (index_t c = 0; c < C; ++c) {
            const acc_t p = std::exp(acc_t(xr[c]) - mx) * inv;
            const acc_t wc = weight ? acc_t(weight[c]) : acc_t(1);
            gr[c] = T(A * p - smooth * wc);
        }
        gr[t] = T(acc_t(gr[t]) - (1.0 - eps) * wt);
    }
}

}  // namespace

py::array softmax(py::array x, int64_t dim) {
    return softmax_forward_impl<false>(x, dim, "softmax");
}

py::array log_softmax(py::array x, int64_t dim) {
    return softmax_forward_impl<true>(x, dim, "log_softmax");
}

py::array softmax_backward(py::array y, py::array gy, int64_t dim) {
    return softmax_backward_impl<false>(y, gy, dim, "softmax_backward");
}

py::array log_softmax_backward(py::array y, py::array gy, int64_t dim) {
    return softmax_backward_impl<true>(y, gy, dim, "log_softmax_backward");
}

py::tuple cross_entropy(py::array logits, py::array target, py::object weight,
                        int64_t ignore_index, double label_smoothing) {
    const char* name = "cross_entropy";
    require_ndim(logits, 2, name, "logits");
    require_contiguous(logits, name, "logits");
    require_ndim(target, 1, name, "target");
    require_contiguous(target, name, "target");
    if (!is_native<int64_t>(target.dtype()))
        throw py::type_error("cross_entropy: target must be int64");
    const index_t N = logits.shape(0), C = logits.shape(1);
    if (target.shape(0) != N)
        throw py::value_error("cross_entropy: expected target of " + std::to_string(N) +
                              " rows, got " + std::to_string(target.shape(0)));
    const int64_t* pt = cdata_of<int64_t>(target);
    for (index_t i = 0; i < N; ++i)  // checked with the GIL held: errors raise cleanly
        if (pt[i] != ignore_index && (pt[i] < 0 || pt[i] >= C))
            throw py::index_error("cross_entropy: Target " + std::to_string(pt[i]) +
                                  " is out of bounds.");
    py::array w;
    if (!weight.is_none()) {
        w = weight.cast<py::array>();
        require_ndim(w, 1, name, "weight");
        require_contiguous(w, name, "weight");
        require_same_dtype(logits, w, name);
        if (w.shape(0) != C)
            throw py::value_error("cross_entropy: weight must have one entry per class");
    }
    return dispatch_float(logits, name, [&](auto tag) -> py::tuple {
        using T = decltype(tag);
        py::array_t<T> losses({N});
        py::array_t<T> dl({N, C});
        const T* px = cdata_of<T>(logits);
        const T* pw = weight.is_none() ? nullptr : cdata_of<T>(w);
        T* pl = losses.mutable_data();
        T* pd = dl.mutable_data();
        {
            py::gil_scoped_release nogil;
            cross_entropy_rows<T>(px, pt, pw, N, C, ignore_index, label_smoothing, pl, pd);
        }
        return py::make_tuple(losses, dl);
    });
}

}  // namespace gpudiff
