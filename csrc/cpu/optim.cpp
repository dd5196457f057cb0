// Fused multi-tensor optimizer steps: one call updates every parameter of a group in place,
// one pass over each parameter's memory.
//
//   sgd_step (PyTorch's rule):  g = (maximize ? -grad : grad) + weight_decay * p
//                               b = momentum * b + (1 - dampening) * g     (momentum > 0)
//                               g = nesterov ? g + momentum * b : b
//                               p -= lr * g
#include "common.h"
#include "kernels.h"

namespace gpudiff {
namespace {

template <typename T>
GPUDIFF_CLONES void sgd_range(T* __restrict p, const T* __restrict grad, T* __restrict b,
                              index_t n, T lr, T momentum, T damp1, T wd, bool nesterov,
                              bool maximize) {
    for (index_t i = 0; i < n; ++i) {
        T g = maximize ? -grad[i] : grad[i];
        g += wd * p[i];
        if (b) {
            const T bi = momentum * b[i] + damp1 * g;
            b[i] = bi;
            g = nesterov ? g + momentum * bi : bi;
        }
        p[i] -= lr * g;
    }
}

}  // namespace

py::object sgd_step(py::list params, py::list grads, py::list bufs, double lr, double momentum,
                    double dampening, double weight_decay, bool nesterov, bool maximize) {
    const char* name = "sgd_step";
    const size_t n = params.size();
    if (grads.size() != n || bufs.size() != n)
        throw py::value_error("sgd_step: params, grads and momentum buffers differ in length");
    std::vector<py::array> ps, gs, bs;
    for (size_t i = 0; i < n; ++i) {
        auto p = params[i].cast<py::array>(), g = grads[i].cast<py::array>();
        require_contiguous(p, name, "params");
        require_contiguous(g, name, "grads");
        require_same_dtype(p, g, name);
        if (!same_shape(p, g)) throw py::value_error("sgd_step: a gradient's shape differs");
        py::array b;
        if (!bufs[i].is_none()) {
            b = bufs[i].cast<py::array>();
            require_contiguous(b, name, "momentum_buffers");
            require_same_dtype(p, b, name);
            if (!same_shape(p, b)) throw py::value_error("sgd_step: a buffer's shape differs");
        } else if (momentum != 0) {
            throw py::value_error("sgd_step: momentum needs every momentum buffer");
        }
        ps.push_back(p), gs.push_back(g), bs.push_back(b);
        if (p.dtype().num() != ps[0].dtype().num()) throw py::type_error("sgd_step: mixed dtypes");
    }
    if (n == 0) return py::none();
    dispatch_float(ps[0], name, [&](auto tag) {
        using T = decltype(tag);
        std::vector<T*> pp(n), bp(n);
        std::vector<const T*> gp(n);
        std::vector<index_t> sizes(n);
        for (size_t i = 0; i < n; ++i) {
            pp[i] = data_of<T>(ps[i]);
            gp[i] = cdata_of<T>(gs[i]);
            bp[i] = (momentum != 0) ? data_of<T>(bs[i]) : nullptr;
            sizes[i] = ps[i].size();
        }
        py::gil_scoped_release nogil;
        for (size_t i = 0; i < n; ++i)
            parallel_chunks(sizes[i], [&](index_t lo, index_t hi) {
                sgd_range<T>(pp[i] + lo, gp[i] + lo, bp[i] ? bp[i] + lo : nullptr, hi - lo,
                             T(lr), T(momentum), T(1 - dampening), T(weight_decay), nesterov,
                             maximize);
            });
    });
    return py::none();
}

}  // namespace gpudiff
