// The kernels of csrc/cuda/softmax.cu, compiled for the emulator.
#include "cuda_host.h"
#include "softmax.cu"
