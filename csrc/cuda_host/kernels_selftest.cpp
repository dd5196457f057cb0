// The kernels of csrc/cuda/selftest.cu, compiled for the emulator.
#include "cuda_host.h"
#include "selftest.cu"
