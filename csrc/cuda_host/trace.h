// trace.h: memory-traffic tracing for the emulator (bench/cuda_memory_report.py).
//
// When tracing is on, every global-memory access of a kernel (every gptr dereference, see
// cuda_host.h) is recorded with its address, size and call site. The accesses of the 32
// lanes of a warp at the same call site (the n-th time each lane passes it) form one
// request, as the GPU's load/store unit sees a warp-wide instruction. For each request the
// tracer counts the distinct 32-byte sectors it touches, against the bytes the lanes asked
// for: Nsight Compute's sectors per request and sector efficiency, as a model (no caches,
// no timing). It also counts the distinct sectors touched per kernel argument (the
// compulsory traffic: every byte once). Sectors are taken relative to each array's start,
// which a GPU allocation aligns to 256 bytes.
//
// Controlled from Python through the C functions at the end of trace.cpp (ctypes).
#pragma once

#include <cstddef>

namespace gd_host {

inline bool g_trace_on = false;

// One access by the current thread: `bytes` at `at` inside the array starting at `lo`,
// argument `arg` of the launch (-1: a pointer a kernel built from a table). Records the
// caller's return address as the call site, so it must be a real (not inlined) call.
__attribute__((noinline)) void trace_access(int arg, const void* lo, const void* at,
                                            size_t bytes);

// The scheduler resumed the current thread (it passed a sync point, or starts): a new epoch
// for grouping its accesses. Called by emulator.cpp resume() while tracing.
void trace_resume();

}  // namespace gd_host
