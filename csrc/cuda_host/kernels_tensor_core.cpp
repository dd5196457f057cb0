// The kernels of csrc/cuda/tensor_core.cu, compiled for the emulator.
#include "cuda_host.h"
#include "tensor_core.cu"
