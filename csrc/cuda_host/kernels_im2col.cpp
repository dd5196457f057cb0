// The kernels of csrc/cuda/im2col.cu, compiled for the emulator.
#include "cuda_host.h"
#include "im2col.cu"
