// emulator.cpp: runs CUDA kernels (compiled for the host through cuda_host.h) on the CPU.
//
// A launch runs its blocks one after another. The threads of a block are fibers, one per
// thread (ucontext; on x86-64 a small assembly routine switches between them, as glibc's
// swapcontext makes a system call per switch), resumed by a scheduler in passes: each pass
// resumes every runnable thread once, in the chosen order (forward, reverse or random), and
// a thread runs until it reaches a sync point (__syncthreads, a warp intrinsic) or returns.
// A barrier releases its threads when the whole block arrived; a warp intrinsic completes
// when every lane of its mask arrived, and then each lane gets its result (the lanes really
// exchange values). So the code between two sync points runs thread after thread in the
// chosen order, and a missing barrier shows up as a wrong result in some order. A pass with
// nothing runnable while threads remain is a deadlock, reported with who waits where.
//
// Arrays are copied into buffers with guard zones on both sides (filled with a pattern),
// checked after the launch, then copied back where the kernel may write. See docs/EMULATOR.md.
#include "emulator.h"
#include "sanitizer.h"
#include "trace.h"

#include <sys/mman.h>
#include <ucontext.h>
#include <unistd.h>

#include <algorithm>
#include <cstdarg>
#include <cstdio>
#include <cstring>
#include <map>
#include <memory>
#include <mutex>
#include <random>
#include <string>
#include <vector>

namespace gd_host {

std::string fmt(const char* f, ...) {
    char buf[1024];
    va_list ap;
    va_start(ap, f);
    vsnprintf(buf, sizeof buf, f, ap);
    va_end(ap);
    return buf;
}

namespace {

constexpr int kMaxThreadsPerBlock = 1024;
constexpr size_t kStackBytes = 256 * 1024;      // per fiber; a PROT_NONE page sits below
constexpr size_t kGuardBytes = 256;             // guard zone on each side of every array
constexpr size_t kMaxDynamicShared = 48 * 1024;  // CUDA's limit without an opt-in attribute
constexpr unsigned long long kMaxBlocks = 1ull << 24;


std::string dim_str(const dim3& d) { return fmt("(%u, %u, %u)", d.x, d.y, d.z); }

// ---- the kernel table -----------------------------------------------------------------------
struct Registry {
    std::map<std::string, KernelEntry> kernels;
    std::vector<std::string> duplicates;
};
Registry& registry() {
    static Registry r;  // function-local: registered from other TUs' static initialisers
    return r;
}

// ---- threads, warps, fibers ---------------------------------------------------------------
enum class State : unsigned char { Ready, AtBarrier, AtWarp, Done };

struct Thread {
    dim3 idx;
    int lane = 0, warp = 0;
    State state = State::Ready;
    bool started = false;                       // resumed at least once in this block
    unsigned long long xin = 0, xout = 0;       // warp exchange payload
    int param = 0, width = 32;                  // warp exchange: src lane / delta / lane mask
};

// a warp intrinsic that some lanes of its mask reached, waiting for the others
struct Collective {
    WarpOp op;
    unsigned mask, arrived;
};

struct Warp {
    unsigned present = 0;  // lanes that exist (the last warp of a block may be partial)
    unsigned exited = 0;
    std::vector<Collective> pending;
};

// ---- fibers: creation and switching ------------------------------------------------------
#if defined(__x86_64__) && !defined(GPUDIFF_EMULATOR_UCONTEXT)
#define GD_FAST_SWITCH 1
// gd_switch(save, to): push the callee-saved registers (and the SSE / x87 control words) on
// the current stack, store the stack pointer in *save, switch to stack `to` and pop what a
// previous gd_switch pushed there (or what fiber_init laid out). SysV x86-64 ABI.
extern "C" void gd_switch(void** save, void* to);
asm(R"(
    .text
    .p2align 4
    .type gd_switch, @function
gd_switch:
    pushq %rbp
    pushq %rbx
    pushq %r12
    pushq %r13
    pushq %r14
    pushq %r15
    subq $8, %rsp
    stmxcsr (%rsp)
    fnstcw 4(%rsp)
    movq %rsp, (%rdi)
    movq %rsi, %rsp
    ldmxcsr (%rsp)
    fldcw 4(%rsp)
    addq $8, %rsp
    popq %r15
    popq %r14
    popq %r13
    popq %r12
    popq %rbx
    popq %rbp
    ret
    .size gd_switch, .-gd_switch
)");
#endif

struct Fiber {
#ifdef GD_FAST_SWITCH
    void* sp = nullptr;  // saved stack pointer while suspended
#else
    ucontext_t ctx;
#endif
    void* mapping = nullptr;  // guard page + stack
    bool fresh = true;        // must be (re)initialised before it is resumed
};

// the guard-zoned copy of one argument array (shared by arguments that pass the same array)
struct Buffer {
    std::vector<unsigned char> mem;
    size_t offset = 0, nbytes = 0;  // the array lives at mem[offset, offset + nbytes)
    void* original = nullptr;
    std::vector<size_t> args;       // argument positions using it
    unsigned char* data() { return mem.data() + offset; }
};

struct Run {
    const KernelEntry* kernel = nullptr;
    std::function<void()> body;  // one thread of the kernel, arguments bound
    LaunchOptions opt;
    dim3 grid, block;
    int nthreads = 0;
    std::vector<Thread> threads;
    std::vector<Warp> warps;
    int done = 0;
    int bar_arrived = 0, bar_true = 0, bar_result = 0;
    bool failed = false;
    std::string error;
    std::vector<unsigned char> dyn;  // guard | dynamic shared memory | guard
    size_t dyn_size = 0;
    LaunchStats stats;
};

Run* g_run = nullptr;
int g_cur = -1;  // index of the running thread in its block
#ifdef GD_FAST_SWITCH
void* g_scheduler_sp = nullptr;
#else
ucontext_t g_scheduler;
#endif
// unique_ptr: a suspended fiber's saved state must not move when the pool grows (a
// ucontext_t points into itself)
std::vector<std::unique_ptr<Fiber>> g_fibers;
std::mutex g_launch_mutex;

unsigned char guard_byte(size_t k) {  // a pattern a kernel is unlikely to write by accident
    const unsigned x = static_cast<unsigned>(k) * 2654435761u;
    return static_cast<unsigned char>((x >> 24) ^ 0xA5u);
}
void fill_guard(unsigned char* p, size_t n, size_t salt) {
    for (size_t k = 0; k < n; ++k) p[k] = guard_byte(k + salt);
}
// offset of the first damaged byte in [p, p + n), or -1
long check_guard(const unsigned char* p, size_t n, size_t salt) {
    for (size_t k = 0; k < n; ++k)
        if (p[k] != guard_byte(k + salt)) return static_cast<long>(k);
    return -1;
}

Run& run() {
    if (!g_run || g_cur < 0) throw KernelError("CUDA intrinsic called outside a kernel launch");
    return *g_run;
}
Thread& me() { return run().threads[g_cur]; }

std::string where() {
    Run& r = *g_run;
    return fmt("kernel '%s', block %s, thread %s: ", r.kernel->name.c_str(),
               dim_str(blockIdx).c_str(), dim_str(r.threads[g_cur].idx).c_str());
}

// from the running fiber back to the scheduler
void yield() {
#ifdef GD_FAST_SWITCH
    gd_switch(&g_fibers[g_cur]->sp, g_scheduler_sp);
#else
    swapcontext(&g_fibers[g_cur]->ctx, &g_scheduler);
#endif
}

void thread_exit() {
    Run& r = *g_run;
    Thread& t = r.threads[g_cur];
    t.state = State::Done;
    ++r.done;
    r.warps[t.warp].exited |= 1u << t.lane;
}

// Every fiber runs this forever: one kernel thread per loop, then it parks until the
// scheduler resumes it as the same thread index of the next block.
void fiber_main() {
    for (;;) {
        Run& r = *g_run;
        try {
            r.body();
        } catch (const KernelError& e) {
            if (!r.failed) r.error = e.what();
            r.failed = true;
        } catch (const std::exception& e) {
            if (!r.failed) r.error = where() + e.what();
            r.failed = true;
        } catch (...) {
            if (!r.failed) r.error = where() + "unknown C++ exception";
            r.failed = true;
        }
        thread_exit();
        yield();
    }
}

void ensure_fibers(int n) {
    const size_t page = static_cast<size_t>(sysconf(_SC_PAGESIZE));
    while (static_cast<int>(g_fibers.size()) < n) {
        void* m = mmap(nullptr, kStackBytes + page, PROT_READ | PROT_WRITE,
                       MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
        if (m == MAP_FAILED) throw std::runtime_error("emulator: cannot map a fiber stack");
        mprotect(m, page, PROT_NONE);  // a stack overflow faults instead of corrupting memory
        g_fibers.push_back(std::make_unique<Fiber>());
        g_fibers.back()->mapping = m;
    }
}

// make fiber f start fiber_main at its next resume
void fiber_init(Fiber& f) {
    const size_t page = static_cast<size_t>(sysconf(_SC_PAGESIZE));
    char* stack = static_cast<char*>(f.mapping) + page;
#ifdef GD_FAST_SWITCH
    // lay out what gd_switch pops: control words, r15..r12, rbx, rbp, then the "return
    // address" fiber_main, placed so that fiber_main starts with rsp = 8 (mod 16) as after
    // a call
    auto top = (reinterpret_cast<uintptr_t>(stack) + kStackBytes) & ~uintptr_t(15);
    auto* ret = reinterpret_cast<uint64_t*>(top - 16);
    ret[0] = reinterpret_cast<uint64_t>(&fiber_main);
    ret[1] = 0;
    uint64_t* sp = ret - 7;
    std::memset(sp, 0, 7 * sizeof(uint64_t));
    uint32_t* control = reinterpret_cast<uint32_t*>(sp);
    __asm__ volatile("stmxcsr %0" : "=m"(control[0]));  // the scheduler's FP modes
    __asm__ volatile("fnstcw %0" : "=m"(control[1]));
    f.sp = sp;
#else
    getcontext(&f.ctx);
    f.ctx.uc_stack.ss_sp = stack;
    f.ctx.uc_stack.ss_size = kStackBytes;
    f.ctx.uc_link = nullptr;
    makecontext(&f.ctx, fiber_main, 0);
#endif
    f.fresh = false;
}

void resume(Run& r, int t) {
    Fiber& f = *g_fibers[t];
    if (f.fresh) fiber_init(f);
    g_cur = t;
    threadIdx = r.threads[t].idx;
    r.threads[t].started = true;
    ++r.stats.resumes;
    // the memory tracer groups a thread's accesses by sync epoch (trace.h): keep this call
    if (g_trace_on) trace_resume();
    san::set_thread(t);  // the memory checker's hooks act while a kernel thread runs
#ifdef GD_FAST_SWITCH
    gd_switch(&g_scheduler_sp, f.sp);
#else
    swapcontext(&g_scheduler, &f.ctx);
#endif
    san::set_thread(-1);
}

std::string lanes_str(unsigned m) { return fmt("0x%08x", m); }

std::string deadlock_report(Run& r) {
    int at_barrier = 0, at_warp = 0;
    std::string warp_detail;
    for (size_t w = 0; w < r.warps.size(); ++w) {
        for (const Collective& c : r.warps[w].pending) {
            if (warp_detail.size() < 300)
                warp_detail += fmt(" warp %zu: lanes %s of mask %s wait;", w,
                                   lanes_str(c.arrived).c_str(), lanes_str(c.mask).c_str());
        }
    }
    for (const Thread& t : r.threads) {
        at_barrier += t.state == State::AtBarrier;
        at_warp += t.state == State::AtWarp;
    }
    return fmt("kernel '%s', block %s: deadlock: %d threads wait at __syncthreads(), %d at warp "
               "intrinsics, %d have exited.%s A barrier must be reached by every thread of the "
               "block, a warp intrinsic by every lane of its mask.",
               r.kernel->name.c_str(), dim_str(blockIdx).c_str(), at_barrier, at_warp, r.done,
               warp_detail.c_str());
}

void run_block(Run& r, const dim3& b, unsigned long long linear, std::vector<int>& order,
               std::mt19937_64& rng) {
    blockIdx = b;
    san::begin_block(linear);
    for (Thread& t : r.threads) {
        t.state = State::Ready;
        t.started = false;
    }
    for (Warp& w : r.warps) {
        w.exited = 0;
        w.pending.clear();
    }
    r.done = 0;
    r.bar_arrived = r.bar_true = 0;
    // uninitialised shared memory reads as NaN (0xff bytes), as a reminder that it is garbage
    std::memset(r.dyn.data() + kGuardBytes, 0xff, r.dyn_size);
    fill_guard(r.dyn.data(), kGuardBytes, 0);
    fill_guard(r.dyn.data() + kGuardBytes + r.dyn_size, kGuardBytes, 1);
    ++r.stats.blocks;
    r.stats.threads += r.nthreads;

    while (r.done < r.nthreads) {
        if (r.opt.order == ThreadOrder::Random) std::shuffle(order.begin(), order.end(), rng);
        bool progressed = false;
        for (int t : order) {
            if (r.threads[t].state != State::Ready) continue;
            resume(r, t);
            progressed = true;
            if (r.failed) return;
        }
        if (!progressed) {
            r.failed = true;
            r.error = deadlock_report(r);
            return;
        }
    }
    const long front = check_guard(r.dyn.data(), kGuardBytes, 0);
    const long back = check_guard(r.dyn.data() + kGuardBytes + r.dyn_size, kGuardBytes, 1);
    if (front >= 0 || back >= 0) {
        r.failed = true;
        r.error = fmt("kernel '%s', block %s: wrote outside its %zu bytes of dynamic shared "
                      "memory (%s)",
                      r.kernel->name.c_str(), dim_str(b).c_str(), r.dyn_size,
                      front >= 0 ? "before the start" : "past the end");
        return;
    }
    // red zones of the static shared variables the block used
    std::string err = san::end_block();
    if (!err.empty()) {
        r.failed = true;
        r.error = err;
    }
}

void check_geometry(const std::string& name, const dim3& grid, const dim3& block,
                    size_t shared_mem) {
    auto bad = [&](const std::string& what) {
        throw KernelError(fmt("kernel '%s': invalid launch: ", name.c_str()) + what);
    };
    if (!block.x || !block.y || !block.z || !grid.x || !grid.y || !grid.z)
        bad("grid and block dimensions must be >= 1, got grid " + dim_str(grid) + " block " +
            dim_str(block));
    if (block.x > 1024 || block.y > 1024 || block.z > 64 ||
        (unsigned long long)block.x * block.y * block.z > kMaxThreadsPerBlock)
        bad("a block has at most 1024 threads (x, y <= 1024, z <= 64), got " + dim_str(block));
    if (grid.x > 2147483647u || grid.y > 65535 || grid.z > 65535)
        bad("grid " + dim_str(grid) + " exceeds (2^31-1, 65535, 65535)");
    if ((unsigned long long)grid.x * grid.y * grid.z > kMaxBlocks)
        bad(fmt("grid %s has more than %llu blocks, too many to emulate", dim_str(grid).c_str(),
                kMaxBlocks));
    if (shared_mem > kMaxDynamicShared)
        bad(fmt("%zu bytes of dynamic shared memory exceed the 48 KiB a kernel gets without "
                "cudaFuncAttributeMaxDynamicSharedMemorySize",
                shared_mem));
}

}  // namespace

// ---- called from kernel code ------------------------------------------------------------
int block_barrier(int op, int predicate) {
    Run& r = run();
    Thread& t = me();
    t.state = State::AtBarrier;
    ++r.bar_arrived;
    r.bar_true += predicate != 0;
    if (r.bar_arrived == r.nthreads) {  // the last one in releases the block
        r.bar_result = r.bar_true;
        r.bar_arrived = r.bar_true = 0;
        for (Thread& o : r.threads) o.state = State::Ready;
        san::barrier_completed();
    }
    yield();
    // r.bar_result stays valid until the next barrier completes, which needs this thread
    switch (op) {
        case 1: return r.bar_result;
        case 2: return r.bar_result == r.nthreads;
        case 3: return r.bar_result > 0;
        default: return 0;
    }
}

namespace {
const char* op_name(WarpOp op) {
    switch (op) {
        case WarpOp::ShflIdx: return "__shfl_sync";
        case WarpOp::ShflUp: return "__shfl_up_sync";
        case WarpOp::ShflDown: return "__shfl_down_sync";
        case WarpOp::ShflXor: return "__shfl_xor_sync";
        case WarpOp::Ballot: return "__ballot_sync";
        case WarpOp::Any: return "__any_sync";
        case WarpOp::All: return "__all_sync";
        case WarpOp::SyncWarp: return "__syncwarp";
        case WarpOp::MmaTf32: return "mma.sync.m16n8k8.tf32";
        case WarpOp::MmaF16: return "mma.sync.m16n8k16.f16";
        case WarpOp::MmaBf16: return "mma.sync.m16n8k16.bf16";
    }
    return "?";
}

// the lane whose value `lane` receives, per the CUDA programming guide (width a power of 2)
int source_lane(WarpOp op, int lane, int param, int width) {
    const int seg = lane & ~(width - 1);  // first lane of this lane's width-segment
    switch (op) {
        case WarpOp::ShflIdx: return seg + (param & (width - 1));
        case WarpOp::ShflUp: return (lane - seg) < param ? lane : lane - param;
        case WarpOp::ShflDown: return (lane - seg) + param >= width ? lane : lane + param;
        case WarpOp::ShflXor: {
            const int j = lane ^ (param & 31);
            return j > (seg | (width - 1)) ? lane : j;  // later segments: own value
        }
        default: return lane;
    }
}

// ---- mma.sync: the warp's matrix product from its lanes' fragments -----------------------
// The PTX ISA's per-lane fragment layouts ("Matrix Fragments for mma.m16n8k8" (.tf32) and
// "... for mma.m16n8k16 with floating point type" (.f16 / .bf16)), with
//   groupID = laneid >> 2, threadID_in_group = laneid % 4:
//   m16n8k8 .tf32   A (16 x 8, row) a0..a3: row = groupID + 8 * (i & 1)  (a0, a2: groupID)
//                                           col = threadID_in_group + 4 * (i >> 1)
//                   B (8 x 8, col)  b0, b1: row = threadID_in_group + 4 * i, col = groupID
//   m16n8k16 .f16/.bf16 (two elements a register, the lower-numbered in the low half)
//                   A (16 x 16) a0..a7: row = groupID + 8 * ((i >> 1) & 1)
//                                       col = threadID_in_group * 2 + (i & 1) + 8 * (i >> 2)
//                   B (16 x 8)  b0..b3: row = threadID_in_group * 2 + (i & 1) + 8 * (i >> 1)
//                                       col = groupID
//   C, D (16 x 8, f32) c0..c3: row = groupID + 8 * (i >> 1), col = threadID_in_group * 2 + (i & 1)
// Inputs are read as the hardware reads them: a .tf32 operand is a 32-bit float of which only
// the sign, exponent and top 10 mantissa bits count (the low 13 bits are ignored: kernels
// round with cvt.rna.tf32.f32 first); .f16 / .bf16 are exact in float. The products are exact
// in double and summed there, plus C, then rounded once to float: fp32 accumulation at least
// as accurate as the tensor core's (which may truncate partial sums), so tests compare with
// fp32-accumulation tolerances, not bits.
int g_mma_fault = 0;

float half_bits_to_float(uint32_t h) {
    const uint32_t sign = (h & 0x8000u) << 16, exp = (h >> 10) & 0x1f, man = h & 0x3ff;
    uint32_t bits;
    if (exp == 0x1f) {
        bits = sign | 0x7f800000u | (man << 13);  // inf / NaN
    } else if (exp != 0) {
        bits = sign | ((exp + 112) << 23) | (man << 13);
    } else {
        float v = std::ldexp(static_cast<float>(man), -24);  // subnormal (or zero): exact
        std::memcpy(&bits, &v, 4);
        bits |= sign;
    }
    float f;
    std::memcpy(&f, &bits, 4);
    return f;
}

float mma_operand(WarpOp op, uint32_t reg, int half) {
    uint32_t bits;
    if (op == WarpOp::MmaTf32) {
        bits = reg & 0xffffe000u;
    } else {
        const uint32_t h = half ? reg >> 16 : reg & 0xffffu;
        if (op == WarpOp::MmaF16) return half_bits_to_float(h);
        bits = h << 16;  // bf16: the top half of a float
    }
    float f;
    std::memcpy(&f, &bits, 4);
    return f;
}

void mma_product(WarpOp op, Thread* lanes, int q);

void mma_complete(WarpOp op, Thread* lanes) {
    const int count = lanes[0].param;
    for (int l = 1; l < 32; ++l)
        if (lanes[l].param != count)
            throw KernelError(where() + fmt("%s: lanes 0 and %d issue %d and %d products (the "
                                            "warp must run the same mma.sync instructions)",
                                            op_name(op), l, count, lanes[l].param));
    for (int q = 0; q < count; ++q) mma_product(op, lanes, q);
}

// product q of the meeting: D = A * B + C from each lane's fragments f[q]
void mma_product(WarpOp op, Thread* lanes, int q) {
    const bool tf32 = op == WarpOp::MmaTf32;
    const int K = tf32 ? 8 : 16;
    float A[16][16], B[16][8], C[16][8];
    int seen_a[16][16] = {}, seen_b[16][8] = {};
    for (int l = 0; l < 32; ++l) {
        const MmaFragments* f = reinterpret_cast<const MmaFragments*>(lanes[l].xin) + q;
        int g = l >> 2;
        const int t = l & 3;
        const int ga = (g_mma_fault == 1 && g < 2) ? g ^ 1 : g;  // fault 1: rows of groups 0, 1
        const int na = tf32 ? 4 : 8, nb = tf32 ? 2 : 4;
        for (int i = 0; i < na; ++i) {
            const int row = tf32 ? ga + 8 * (i & 1) : ga + 8 * ((i >> 1) & 1);
            const int col = tf32 ? t + 4 * (i >> 1) : t * 2 + (i & 1) + 8 * (i >> 2);
            A[row][col] = tf32 ? mma_operand(op, f->a[i], 0) : mma_operand(op, f->a[i >> 1], i & 1);
            ++seen_a[row][col];
        }
        for (int i = 0; i < nb; ++i) {
            int row = tf32 ? t + 4 * i : t * 2 + (i & 1) + 8 * (i >> 1);
            if (g_mma_fault == 2) row = tf32 ? 2 * t + i : t + 4 * i;  // fault 2: B's k index
            B[row][g] = tf32 ? mma_operand(op, f->b[i], 0) : mma_operand(op, f->b[i >> 1], i & 1);
            ++seen_b[row][g];
        }
        for (int i = 0; i < 4; ++i) C[g + 8 * (i >> 1)][t * 2 + (i & 1)] = f->c[i];
    }
    for (int m = 0; m < 16; ++m)
        for (int k = 0; k < K; ++k)
            if (seen_a[m][k] != 1 || (m < K && k < 8 && seen_b[m][k] != 1))
                throw KernelError(where() + "mma: the fragment layout does not cover the "
                                            "matrices exactly once (emulator bug)");
    for (int l = 0; l < 32; ++l) {
        MmaFragments* f = reinterpret_cast<MmaFragments*>(lanes[l].xin) + q;
        const int g = l >> 2, t = l & 3;
        for (int i = 0; i < 4; ++i) {
            const int row = g + 8 * (i >> 1);
            int col = t * 2 + (i & 1);
            if (g_mma_fault == 3) col ^= 1;  // fault 3: D's column pair swapped
            double s = C[row][col];
            for (int k = 0; k < K; ++k) s += static_cast<double>(A[row][k]) * B[k][col];
            f->d[i] = static_cast<float>(s);
        }
    }
}

// every lane of c.mask arrived: hand each one its result and make it runnable
void complete(Run& r, int warp, const Collective& c) {
    Thread* lanes = &r.threads[warp * 32];
    if (c.op == WarpOp::MmaTf32 || c.op == WarpOp::MmaF16 || c.op == WarpOp::MmaBf16) {
        mma_complete(c.op, lanes);
        for (int l = 0; l < 32; ++l) lanes[l].state = State::Ready;
        return;
    }
    unsigned ballot = 0;
    for (int l = 0; l < 32; ++l)
        if ((c.mask >> l & 1u) && lanes[l].xin) ballot |= 1u << l;
    for (int l = 0; l < 32; ++l) {
        if (!(c.mask >> l & 1u)) continue;
        Thread& t = lanes[l];
        switch (c.op) {
            case WarpOp::Ballot: t.xout = ballot; break;
            case WarpOp::Any: t.xout = ballot != 0; break;
            case WarpOp::All: t.xout = ballot == c.mask; break;
            case WarpOp::SyncWarp: t.xout = 0; break;  // san::warp_synced below
            default: {
                const int src = source_lane(c.op, l, t.param, t.width);
                if (src != l && !(c.mask >> src & 1u))
                    throw KernelError(where() + fmt("%s: lane %d reads lane %d, which is not in "
                                                    "the mask %s (undefined on a GPU)",
                                                    op_name(c.op), l, src,
                                                    lanes_str(c.mask).c_str()));
                t.xout = lanes[src].xin;
            }
        }
        t.state = State::Ready;
    }
    // only __syncwarp orders the lanes' memory accesses (shuffles and votes move registers)
    if (c.op == WarpOp::SyncWarp) san::warp_synced(warp, c.mask);
}
}  // namespace

unsigned long long warp_collective(WarpOp op, unsigned mask, unsigned long long value, int param,
                                   int width) {
    Run& r = run();
    Thread& t = me();
    Warp& w = r.warps[t.warp];
    const unsigned bit = 1u << t.lane;
    const char* name = op_name(op);
    if (!(mask & bit))
        throw KernelError(where() + fmt("%s with mask %s, which leaves out the calling lane %d",
                                        name, lanes_str(mask).c_str(), t.lane));
    if (mask & ~w.present)
        throw KernelError(where() + fmt("%s: mask %s names lanes that do not exist in this block "
                                        "(this warp has lanes %s)",
                                        name, lanes_str(mask).c_str(),
                                        lanes_str(w.present).c_str()));
    if (mask & w.exited)
        throw KernelError(where() + fmt("%s: mask %s names lanes %s that have already returned",
                                        name, lanes_str(mask).c_str(),
                                        lanes_str(mask & w.exited).c_str()));
    if (width < 1 || width > 32 || (width & (width - 1)))
        throw KernelError(where() + fmt("%s: width %d is not a power of 2 in [1, 32]", name,
                                        width));
    Collective* c = nullptr;
    for (Collective& p : w.pending) {
        if (p.mask == mask) {
            c = &p;
        } else if (p.mask & mask) {
            throw KernelError(where() + fmt("%s with mask %s while lanes %s wait in a warp "
                                            "intrinsic with the overlapping mask %s",
                                            name, lanes_str(mask).c_str(),
                                            lanes_str(p.arrived).c_str(),
                                            lanes_str(p.mask).c_str()));
        }
    }
    if (!c) {
        w.pending.push_back({op, mask, 0});
        c = &w.pending.back();
    } else if (c->op != op) {
        throw KernelError(where() + fmt("lanes of mask %s meet at different warp intrinsics: "
                                        "%s here, %s in lanes %s",
                                        lanes_str(mask).c_str(), name, op_name(c->op),
                                        lanes_str(c->arrived).c_str()));
    }
    c->arrived |= bit;
    t.xin = value;
    t.param = param;
    t.width = width;
    t.state = State::AtWarp;
    if (c->arrived == mask) {
        const Collective done = *c;
        w.pending.erase(w.pending.begin() + (c - w.pending.data()));
        complete(r, t.warp, done);
    }
    yield();
    return me().xout;
}

void warp_mma(WarpOp op, MmaFragments* f, int count) {
    // .aligned: all 32 lanes execute the same mma.sync (warp_collective checks they exist,
    // have not returned and meet at the same instruction)
    warp_collective(op, 0xffffffffu, reinterpret_cast<unsigned long long>(f), count, 32);
}

void set_mma_fault(int fault) { g_mma_fault = fault; }
int mma_fault() { return g_mma_fault; }

unsigned warp_active_mask() {
    // lanes that have not returned: all of them are "converged" at any call in the emulator
    Thread& t = me();
    const Warp& w = run().warps[t.warp];
    return w.present & ~w.exited;
}

unsigned char* dynamic_shared_base() { return run().dyn.data() + kGuardBytes; }

void out_of_bounds(int arg, const void* lo, const void* hi, const void* at, size_t bytes) {
    const long off = static_cast<const char*>(at) - static_cast<const char*>(lo);
    const long size = static_cast<const char*>(hi) - static_cast<const char*>(lo);
    throw KernelError(where() + fmt("out-of-bounds access to argument %d: a %zu-byte access at "
                                    "byte offset %ld of a %ld-byte array",
                                    arg, bytes, off, size));
}

void kernel_trap(const char* what) { throw KernelError(where() + what); }

// ---- the table ----------------------------------------------------------------------------
void register_kernel(KernelEntry entry) {
    Registry& reg = registry();
    if (reg.kernels.count(entry.name)) reg.duplicates.push_back(entry.name);
    else reg.kernels.emplace(entry.name, std::move(entry));
}

std::vector<std::string> kernel_names() {
    const Registry& reg = registry();
    if (!reg.duplicates.empty())
        throw KernelError("kernel '" + reg.duplicates[0] + "' is registered twice");
    std::vector<std::string> names;
    for (const auto& kv : reg.kernels) names.push_back(kv.first);
    return names;
}

std::string kernel_signature(const std::string& name) {
    auto it = registry().kernels.find(name);
    if (it == registry().kernels.end()) throw KernelError("no emulated kernel '" + name + "'");
    return it->second.signature;
}

void bad_argument(const std::string& kernel, size_t i, const std::string& expected, const Arg& a) {
    const std::string got = a.is_array ? fmt("an array of %s (%zu bytes%s)", a.dtype.c_str(),
                                             a.nbytes, a.writable ? "" : ", read-only")
                                       : "a scalar of " + a.dtype;
    throw KernelError(fmt("kernel '%s': argument %zu must be %s, got %s", kernel.c_str(), i,
                          expected.c_str(), got.c_str()));
}

// ---- launch ---------------------------------------------------------------------------------
LaunchStats launch(const std::string& name, dim3 grid, dim3 block, size_t shared_mem,
                   std::vector<Arg> args, const LaunchOptions& options) {
    std::lock_guard<std::mutex> lock(g_launch_mutex);
    kernel_names();  // raises on duplicate registrations
    auto it = registry().kernels.find(name);
    if (it == registry().kernels.end())
        throw KernelError("no emulated kernel '" + name + "' (is it listed with GPUDIFF_KERNEL?)");
    const KernelEntry& entry = it->second;
    check_geometry(name, grid, block, shared_mem);
    if (args.size() != entry.nparams)
        throw KernelError(fmt("kernel '%s' takes %zu arguments %s, got %zu", name.c_str(),
                              entry.nparams, entry.signature.c_str(), args.size()));

    // guarded copies of the arrays; arguments passing the very same array share one copy
    std::vector<Buffer> buffers;
    std::vector<int> buffer_of(args.size(), -1);
    for (size_t i = 0; i < args.size(); ++i) {
        Arg& a = args[i];
        if (!a.is_array) continue;
        const auto* lo = static_cast<const unsigned char*>(a.data);
        for (size_t b = 0; b < buffers.size() && a.nbytes; ++b) {
            const auto* blo = static_cast<const unsigned char*>(buffers[b].original);
            if (blo == lo && buffers[b].nbytes == a.nbytes) {
                buffer_of[i] = static_cast<int>(b);
            } else if (buffers[b].nbytes && lo < blo + buffers[b].nbytes &&
                       blo < lo + a.nbytes) {
                throw KernelError(fmt("kernel '%s': arguments %zu and %zu overlap without being "
                                      "the same array; the emulator cannot run that",
                                      name.c_str(), buffers[b].args[0], i));
            }
        }
        if (buffer_of[i] < 0) {
            Buffer buf;
            // keep the array's alignment modulo 64: vectorised paths take the same branch
            const size_t misalign = reinterpret_cast<uintptr_t>(a.data) % 64;
            buf.mem.resize(kGuardBytes + 64 + a.nbytes + kGuardBytes);
            const uintptr_t base = reinterpret_cast<uintptr_t>(buf.mem.data()) + kGuardBytes;
            const uintptr_t data = (base + 63) / 64 * 64 + misalign;
            buf.offset = data - reinterpret_cast<uintptr_t>(buf.mem.data());
            buf.nbytes = a.nbytes;
            buf.original = a.data;
            fill_guard(buf.mem.data(), buf.offset, 0);
            fill_guard(buf.data() + a.nbytes, buf.mem.size() - buf.offset - a.nbytes, 1);
            if (a.nbytes) std::memcpy(buf.data(), a.data, a.nbytes);
            buffers.push_back(std::move(buf));
            buffer_of[i] = static_cast<int>(buffers.size() - 1);
        }
        buffers[buffer_of[i]].args.push_back(i);
    }
    for (size_t i = 0; i < args.size(); ++i)
        if (buffer_of[i] >= 0) args[i].data = buffers[buffer_of[i]].data();

    Run r;
    r.kernel = &entry;
    r.body = entry.bind(args);  // type-checks the arguments (raises KernelError)
    r.opt = options;
    r.grid = grid;
    r.block = block;
    r.nthreads = static_cast<int>(block.x * block.y * block.z);
    r.threads.resize(r.nthreads);
    r.warps.resize((r.nthreads + 31) / 32);
    for (int t = 0; t < r.nthreads; ++t) {
        Thread& th = r.threads[t];
        th.idx = dim3(t % block.x, (t / block.x) % block.y, t / (block.x * block.y));
        th.lane = t % 32;
        th.warp = t / 32;
        r.warps[th.warp].present |= 1u << th.lane;
    }
    r.dyn_size = shared_mem;
    r.dyn.assign(kGuardBytes + shared_mem + kGuardBytes, 0);
    ensure_fibers(r.nthreads);
    // the memory checker (sanitizer.h) learns the launch's memory: every access of a kernel
    // thread is checked against it
    struct SanitizerScope {
        ~SanitizerScope() { san::end_launch(); }
    } sanitizer_scope;
    san::begin_launch(name, options.race, options.init, grid, block, r.dyn.data() + kGuardBytes,
                      shared_mem);
    for (Buffer& buf : buffers)
        san::add_array(static_cast<int>(buf.args[0]), buf.mem.data(),
                       buf.mem.data() + buf.mem.size(), buf.data(), buf.nbytes,
                       args[buf.args[0]].dtype);

    std::vector<int> order(r.nthreads);
    for (int t = 0; t < r.nthreads; ++t)
        order[t] = options.order == ThreadOrder::Reverse ? r.nthreads - 1 - t : t;
    std::mt19937_64 rng(options.seed);
    const unsigned long long nblocks = (unsigned long long)grid.x * grid.y * grid.z;
    std::vector<unsigned long long> block_order(nblocks);
    for (unsigned long long b = 0; b < nblocks; ++b) block_order[b] = b;
    if (options.shuffle_blocks) std::shuffle(block_order.begin(), block_order.end(), rng);

    g_run = &r;
    gridDim = grid;
    blockDim = block;
    for (unsigned long long b : block_order) {
        const dim3 bidx(b % grid.x, (b / grid.x) % grid.y, b / ((unsigned long long)grid.x * grid.y));
        run_block(r, bidx, b, order, rng);
        if (r.failed) break;
    }
    if (r.failed) {
        // threads stopped inside the kernel keep a half-run stack: start those fibers afresh
        for (int t = 0; t < r.nthreads; ++t)
            if (r.threads[t].started && r.threads[t].state != State::Done) g_fibers[t]->fresh = true;
    }
    g_run = nullptr;
    g_cur = -1;
    if (r.failed) throw KernelError(r.error);

    for (Buffer& buf : buffers) {
        const long front = check_guard(buf.mem.data(), buf.offset, 0);
        const long back =
            check_guard(buf.data() + buf.nbytes, buf.mem.size() - buf.offset - buf.nbytes, 1);
        if (front >= 0 || back >= 0) {
            const long off = front >= 0 ? front - static_cast<long>(buf.offset)
                                        : static_cast<long>(buf.nbytes) + back;
            throw KernelError(fmt("kernel '%s' wrote outside argument %zu (a %s array of %zu "
                                  "bytes): the guard zone byte at offset %ld was overwritten",
                                  name.c_str(), buf.args[0], args[buf.args[0]].dtype.c_str(),
                                  buf.nbytes, off));
        }
    }
    for (Buffer& buf : buffers) {
        bool written = false;
        for (size_t i : buf.args) written |= args[i].kernel_writes;
        if (written && buf.nbytes) std::memcpy(buf.original, buf.data(), buf.nbytes);
    }
    return r.stats;
}

}  // namespace gd_host
