// emulator.h: the CPU emulator's interface, shared by the shim (cuda_host.h), the scheduler
// (emulator.cpp) and the Python bindings (bindings.cpp). No CUDA macros here.
#pragma once

#include <cstddef>
#include <cstdint>
#include <functional>
#include <stdexcept>
#include <string>
#include <vector>

// CUDA's launch-geometry type and the built-in variables; the scheduler sets them before
// it resumes a thread.
struct dim3 {
    unsigned x, y, z;
    constexpr dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};
using uint3 = dim3;
inline dim3 threadIdx, blockIdx, blockDim, gridDim;

namespace gd_host {

// Raised for every error a kernel run can hit: bad arguments, out-of-bounds access,
// deadlock, misuse of a warp intrinsic, guard-zone damage. Messages name the kernel.
struct KernelError : std::runtime_error {
    using std::runtime_error::runtime_error;
};

// printf into a std::string (the messages of the scheduler and the memory checker)
std::string fmt(const char* f, ...) __attribute__((format(printf, 1, 2)));

// ---- scheduler entry points, called from kernel code through cuda_host.h -------------------
enum class WarpOp : int {
    ShflIdx, ShflUp, ShflDown, ShflXor, Ballot, Any, All, SyncWarp,
    MmaTf32,  // mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32
    MmaF16,   // mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32
    MmaBf16,  // mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32
};
// Suspends the calling thread until every lane in `mask` made the same call; returns the
// 64-bit payload this lane receives (its source lane's value, or the ballot).
unsigned long long warp_collective(WarpOp op, unsigned mask, unsigned long long value, int param,
                                   int width);
unsigned warp_active_mask();
// One lane's registers of an mma.sync: A (4 x 32 bits: four .tf32, or eight .f16 / .bf16 packed
// low half first), B (2 x 32 bits), C and D (4 floats each). The lane deposits a pointer to
// it in a warp meeting (warp_mma); the last lane to arrive computes D for all 32 lanes from
// the PTX ISA's fragment layouts (emulator.cpp) and every lane resumes with its d[] filled.
struct MmaFragments {
    uint32_t a[4];
    uint32_t b[2];
    float c[4];
    float d[4];
};
// `count` independent products in one meeting (f[0..count), the same count in every lane):
// common.cuh's mma_*_tile wrappers, MT x NT mma.sync of one warp with fewer fiber switches.
void warp_mma(WarpOp op, MmaFragments* f, int count = 1);
// A deliberately wrong fragment layout, for the tests that prove the layouts matter:
// 0 none (the PTX ISA's layouts), 1 swap the rows of lanes 0 and 4's A fragments (groupID 0
// and 1 exchange their A rows), 2 read B's k index with threadID_in_group and the register
// number exchanged, 3 write D transposed within each lane's pair of columns.
void set_mma_fault(int fault);
int mma_fault();
// Block barrier; op 0 plain, 1 count, 2 and, 3 or of the threads' predicates.
int block_barrier(int op, int predicate);
unsigned char* dynamic_shared_base();
[[noreturn]] void out_of_bounds(int arg, const void* lo, const void* hi, const void* at,
                                size_t access_bytes);
[[noreturn]] void kernel_trap(const char* what);
// An atomic read-modify-write of `bytes` at p follows (sanitizer.cpp): checked as one atomic
// access; its own load and store, up to atomic_end(), are not plain accesses.
void atomic_begin(const void* p, size_t bytes);
void atomic_end();

// ---- kernel arguments and the kernel table ------------------------------------------------
// One argument as handed over by Python: a C-contiguous array or a typed scalar.
struct Arg {
    bool is_array = false;
    std::string dtype;             // NumPy kind + itemsize: "f4", "i8", ...
    void* data = nullptr;          // arrays: the memory the kernel sees
    size_t nbytes = 0;             // arrays
    bool writable = false;         // arrays: NumPy's writeable flag
    bool kernel_writes = false;    // set when binding: the parameter is gptr<non-const T>
    unsigned char scalar[8] = {};  // scalars, native layout
};

struct KernelEntry {
    std::string name;       // the name expression, "softmax_fwd<float>"
    std::string signature;  // "(gptr<const f4>, gptr<f4>, i8, i4)"
    size_t nparams = 0;
    // type-checks and converts the arguments; the returned callable runs one thread
    std::function<std::function<void()>(std::vector<Arg>&)> bind;
};

[[noreturn]] void bad_argument(const std::string& kernel, size_t index, const std::string& expected,
                               const Arg& got);
void register_kernel(KernelEntry entry);  // at static-initialisation time
std::vector<std::string> kernel_names();
std::string kernel_signature(const std::string& name);

enum class ThreadOrder : int { Forward, Reverse, Random };

struct LaunchOptions {
    ThreadOrder order = ThreadOrder::Forward;  // order of the threads between sync points
    bool shuffle_blocks = false;               // run the blocks in a random order
    unsigned long long seed = 0;               // for Random and shuffle_blocks
    bool race = false;                         // racecheck (sanitizer.h)
    bool init = false;                         // initcheck (sanitizer.h)
};

struct LaunchStats {
    unsigned long long blocks = 0, threads = 0, resumes = 0;  // resumes: fiber switches in
};

// Runs kernel `name` over the grid. Arrays are copied into guard-zoned buffers, run on, and
// copied back where the kernel may write; raises KernelError on any detected fault.
LaunchStats launch(const std::string& name, dim3 grid, dim3 block, size_t shared_mem,
                   std::vector<Arg> args, const LaunchOptions& options);

}  // namespace gd_host
