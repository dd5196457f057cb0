// gpudiff._C: the CPU hot loops. Only m.def lines here; the kernels live in the other files.
#include "kernels.h"

namespace k = gpudiff;
using namespace pybind11::literals;

void bind_dispatch(py::module_& m);   // dispatch.cpp: the op dispatch fast path

PYBIND11_MODULE(_C, m) {
    m.doc() = "gpudiff CPU kernels (C++, OpenMP, GIL released around the loops)";
    m.def("im2col", &k::im2col, "x"_a, "kh"_a, "kw"_a, "sh"_a, "sw"_a, "ph"_a, "pw"_a, "dh"_a, "dw"_a);
    m.def("col2im", &k::col2im, "cols"_a, "C"_a, "H"_a, "W"_a, "kh"_a, "kw"_a, "sh"_a, "sw"_a, "ph"_a, "pw"_a, "dh"_a, "dw"_a);
    m.def("matmul", &k::matmul_py, "a"_a, "b"_a);
    m.def("gemm", &k::gemm_py, "a"_a, "b"_a, "ta"_a = false, "tb"_a = false, "c0"_a = py::none());
    m.def("conv2d_forward", &k::conv2d_forward, "x"_a, "w"_a, "b"_a, "stride"_a, "padding"_a, "dilation"_a, "groups"_a);
    m.def("conv2d_backward_input", &k::conv2d_backward_input, "gy"_a, "w"_a, "x_shape"_a, "stride"_a, "padding"_a, "dilation"_a, "groups"_a);
    m.def("conv2d_backward_weight", &k::conv2d_backward_weight, "gy"_a, "x"_a, "w_shape"_a, "stride"_a, "padding"_a, "dilation"_a, "groups"_a);
    m.def("conv_winograd_calls", &k::conv_winograd_calls);
    m.def("set_conv_winograd", &k::set_conv_winograd, "mode"_a);
    m.def("cpu_has_avx512", &k::cpu_has_avx512);
    m.def("max_pool2d", &k::max_pool2d, "x"_a, "kh"_a, "kw"_a, "sh"_a, "sw"_a, "ph"_a, "pw"_a, "dh"_a, "dw"_a, "OH"_a, "OW"_a);
    m.def("max_pool2d_backward", &k::max_pool2d_backward, "gy"_a, "indices"_a, "H"_a, "W"_a);
    m.def("avg_pool2d", &k::avg_pool2d, "x"_a, "kh"_a, "kw"_a, "sh"_a, "sw"_a, "ph"_a, "pw"_a, "OH"_a, "OW"_a, "count_include_pad"_a, "divisor_override"_a);
    m.def("avg_pool2d_backward", &k::avg_pool2d_backward, "gy"_a, "H"_a, "W"_a, "kh"_a, "kw"_a, "sh"_a, "sw"_a, "ph"_a, "pw"_a, "count_include_pad"_a, "divisor_override"_a);
    m.def("adaptive_avg_pool2d", &k::adaptive_avg_pool2d, "x"_a, "OH"_a, "OW"_a);
    m.def("adaptive_avg_pool2d_backward", &k::adaptive_avg_pool2d_backward, "gy"_a, "H"_a, "W"_a);
    m.def("adaptive_max_pool2d", &k::adaptive_max_pool2d, "x"_a, "OH"_a, "OW"_a);
    m.def("relu", &k::relu, "x"_a);
    m.def("relu_backward", &k::relu_backward, "y"_a, "gy"_a);
    m.def("leaky_relu", &k::leaky_relu, "x"_a, "negative_slope"_a);
    m.def("leaky_relu_backward", &k::leaky_relu_backward, "x"_a, "gy"_a, "negative_slope"_a);
    m.def("sigmoid", &k::sigmoid, "x"_a);
    m.def("sigmoid_backward", &k::sigmoid_backward, "y"_a, "gy"_a);
    m.def("tanh_backward", &k::tanh_backward, "y"_a, "gy"_a);
    m.def("softmax", &k::softmax, "x"_a, "dim"_a);
    m.def("log_softmax", &k::log_softmax, "x"_a, "dim"_a);
    m.def("softmax_backward", &k::softmax_backward, "y"_a, "gy"_a, "dim"_a);
    m.def("log_softmax_backward", &k::log_softmax_backward, "y"_a, "gy"_a, "dim"_a);
    m.def("cross_entropy", &k::cross_entropy, "logits"_a, "target"_a, "weight"_a, "ignore_index"_a, "label_smoothing"_a);
    m.def("batch_norm_stats", &k::batch_norm_stats, "x"_a);
    m.def("channel_affine", &k::channel_affine, "x"_a, "a"_a, "b"_a);
    m.def("batch_norm_backward_reduce", &k::batch_norm_backward_reduce, "gy"_a, "x"_a, "mean"_a);
    m.def("channel_affine2", &k::channel_affine2, "gy"_a, "x"_a, "a"_a, "b"_a, "c"_a);
    m.def("dropout", &k::dropout, "x"_a, "p"_a, "seed"_a, "group"_a);
    m.def("sgd_step", &k::sgd_step, "params"_a, "grads"_a, "momentum_buffers"_a, "lr"_a, "momentum"_a, "dampening"_a, "weight_decay"_a, "nesterov"_a, "maximize"_a);
    bind_dispatch(m);
}
