// sanitizer.h: the emulator's memory checker (sanitizer.cpp), as the scheduler sees it.
//
// The kernel translation units (csrc/cuda_host/kernels_*.cpp) are compiled with GCC's
// ThreadSanitizer instrumentation (-fsanitize=thread, see setup.py) but linked without its
// run-time library: every load and store of kernel code calls one of the __tsan_read*/
// __tsan_write* hooks, and sanitizer.cpp defines those hooks. So the checker sees every
// access a kernel makes, to any memory, through gptr, a raw pointer, a static, dynamic or
// extern __shared__ array, with its address, size and direction. It maps the address to:
//   * a static __shared__ variable: the shim aligns each one to its own 64 KiB slot (no
//     kernel has more than 48 KiB), so the rest of the slot is a red zone, and the
//     variables' names and sizes come from the module's symbol table;
//   * the launch's dynamic shared memory (the buffer between the guard zones);
//   * an argument array of the launch (its guard-zoned copy);
// and does there (see docs/EMULATOR.md):
//   * always: bounds checks (an access outside the variable / the shared memory / the array
//     fails at once, naming kernel, thread, variable or argument and offset); static shared
//     variables are poisoned (0xff bytes, NaN) at their first use in each block;
//   * racecheck (LaunchOptions::race): per 4-byte word, the last writer and the last two
//     readers with the barrier interval and warp-sync count they acted in; an access that
//     conflicts with one by another thread not ordered before it fails the launch;
//   * initcheck (LaunchOptions::init): reading shared memory nobody wrote in this block,
//     or a float of an argument that still holds the poison pattern (0xffffffff words) and
//     was not written in this launch.
// Atomics (cuda_host.h) announce themselves with atomic_access(); atomics never race with
// atomics.
#pragma once

#include <cstddef>
#include <string>

#include "emulator.h"

namespace gd_host {
namespace san {

// A launch: kernel name, what to check, geometry.
void begin_launch(const std::string& kernel, bool race, bool init, const dim3& grid,
                  const dim3& block, unsigned char* dyn, size_t dyn_size);
// One argument array: the kernel sees [data, data + nbytes); [lo, hi) includes the guards.
// kind: the dtype's kind ('f' arrays get the poison check of initcheck).
void add_array(int arg, const unsigned char* lo, const unsigned char* hi,
               const unsigned char* data, size_t nbytes, const std::string& dtype);
void begin_block(unsigned long long linear_block);
// the running fiber (a linear thread id in the block), -1 between fibers
void set_thread(int t);
void barrier_completed();                  // a __syncthreads() released the block
void warp_synced(int warp, unsigned mask);  // a __syncwarp(mask) completed
// after a block: the red zones of the static shared variables it used; "" or an error
std::string end_block();
void end_launch();

// Static __shared__ variables found in the module (for tests and docs): "name: bytes".
std::string shared_variables();

}  // namespace san
}  // namespace gd_host
