// The kernels of csrc/cuda/batch_norm.cu, compiled for the emulator.
#include "cuda_host.h"
#include "batch_norm.cu"
