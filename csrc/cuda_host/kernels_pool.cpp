// The kernels of csrc/cuda/pool.cu, compiled for the emulator.
#include "cuda_host.h"
#include "pool.cu"
