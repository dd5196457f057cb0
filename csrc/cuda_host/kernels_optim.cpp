// The kernels of csrc/cuda/optim.cu, compiled for the emulator.
#include "cuda_host.h"
#include "optim.cu"
