// The kernels of csrc/cuda/cross_entropy.cu, compiled for the emulator.
#include "cuda_host.h"
#include "cross_entropy.cu"
