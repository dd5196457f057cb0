// The kernels of csrc/cuda/conv.cu, compiled for the emulator.
#include "cuda_host.h"
#include "conv.cu"
