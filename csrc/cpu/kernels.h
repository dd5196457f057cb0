// The py-facing CPU kernels of gpudiff._C; bindings.cpp binds each with one m.def line.
// Shapes and semantics: the contract docstring of gpudiff/backend/kernels.py.
#pragma once

#include "common.h"

namespace gpudiff {

// im2col.cpp
py::array im2col(py::array x, int kh, int kw, int sh, int sw, int ph, int pw, int dh, int dw);
py::array col2im(py::array cols, int64_t C, int64_t H, int64_t W, int kh, int kw, int sh, int sw,
                 int ph, int pw, int dh, int dw);

// gemm.cpp: for the tests (the convolution calls gemm() of gemm.h directly)
py::array gemm_py(py::array a, py::array b, bool ta, bool tb, py::object c0);
// 2-D a @ b (either may be a transposed view), threads over column blocks; None when the
// layout is neither row- nor column-major
py::object matmul_py(py::array a, py::array b);

// conv.cpp: whole-op convolution, per-chunk im2col + gemm.h's GEMM, chunks over the threads
py::array conv2d_forward(py::array x, py::array w, py::object b, py::object stride,
                         py::object padding, py::object dilation, int groups);
py::array conv2d_backward_input(py::array gy, py::array w, py::object x_shape, py::object stride,
                                py::object padding, py::object dilation, int groups);
py::array conv2d_backward_weight(py::array gy, py::array x, py::object w_shape,
                                 py::object stride, py::object padding, py::object dilation,
                                 int groups);
// Winograd F(2x2, 3x3) for 3x3 stride-1 convolutions: calls so far (forward, input
// gradient, weight gradient), and the mode (0 never, 1 where it pays, 2 wherever it fits);
// set_conv_winograd returns the previous mode
py::tuple conv_winograd_calls();
int set_conv_winograd(int mode);
// whether the CPU runs the AVX-512 kernels (gemm.h's, and conv.cpp's 16-lane ones)
bool cpu_has_avx512();

// pool.cpp
py::tuple max_pool2d(py::array x, int kh, int kw, int sh, int sw, int ph, int pw, int dh, int dw,
                     int64_t OH, int64_t OW);
py::array max_pool2d_backward(py::array gy, py::array indices, int64_t H, int64_t W);
py::array avg_pool2d(py::array x, int kh, int kw, int sh, int sw, int ph, int pw, int64_t OH,
                     int64_t OW, bool count_include_pad, int64_t divisor_override);
py::array avg_pool2d_backward(py::array gy, int64_t H, int64_t W, int kh, int kw, int sh, int sw,
                              int ph, int pw, bool count_include_pad, int64_t divisor_override);
py::array adaptive_avg_pool2d(py::array x, int64_t OH, int64_t OW);
py::array adaptive_avg_pool2d_backward(py::array gy, int64_t H, int64_t W);
py::tuple adaptive_max_pool2d(py::array x, int64_t OH, int64_t OW);

// activation.cpp
py::array relu(py::array x);
py::array relu_backward(py::array y, py::array gy);
py::array leaky_relu(py::array x, double negative_slope);
py::array leaky_relu_backward(py::array x, py::array gy, double negative_slope);
py::array sigmoid(py::array x);
py::array sigmoid_backward(py::array y, py::array gy);
py::array tanh_backward(py::array y, py::array gy);

// softmax.cpp
py::array softmax(py::array x, int64_t dim);
py::array log_softmax(py::array x, int64_t dim);
py::array softmax_backward(py::array y, py::array gy, int64_t dim);
py::array log_softmax_backward(py::array y, py::array gy, int64_t dim);
py::tuple cross_entropy(py::array logits, py::array target, py::object weight,
                        int64_t ignore_index, double label_smoothing);

// norm.cpp
py::tuple batch_norm_stats(py::array x);
py::array channel_affine(py::array x, py::array a, py::array b);
py::tuple batch_norm_backward_reduce(py::array gy, py::array x, py::array mean);
py::array channel_affine2(py::array gy, py::array x, py::array a, py::array b, py::array c);
py::array dropout(py::array x, double p, uint64_t seed, int64_t group);

// optim.cpp
py::object sgd_step(py::list params, py::list grads, py::list bufs, double lr, double momentum,
                    double dampening, double weight_decay, bool nesterov, bool maximize);

}  // namespace gpudiff
