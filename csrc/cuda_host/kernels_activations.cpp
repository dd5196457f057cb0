// The kernels of csrc/cuda/activations.cu, compiled for the emulator.
#include "cuda_host.h"
#include "activations.cu"
