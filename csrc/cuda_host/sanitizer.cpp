// sanitizer.cpp: bounds checks, racecheck and initcheck for the emulator; see sanitizer.h.
//
// Shadow memory. Each checked region (a static shared variable, the dynamic shared memory,
// an argument array) has one Cell per 4-byte word: the last write and the last two reads
// of the word, each as (block, thread, barrier interval, warp-sync count, atomic?). A cell
// is valid for one block (shared memory) or one launch (arrays), by a generation stamp, so
// nothing is cleared between blocks. Accesses narrower than 4 bytes count for their whole
// word (no kernel of ours uses 1- or 2-byte elements).
//
// Ordering. Two accesses of different threads are ordered when a __syncthreads() completed
// between them (the barrier interval differs: every thread of a block passes every barrier,
// so the block's barrier count is each thread's interval), or, in one warp, when a
// __syncwarp() whose mask holds both lanes completed between them (Volta and later: the
// lanes of a warp are not in lockstep, and only __syncwarp orders their memory accesses,
// per the programming guide; shuffles and votes exchange registers, not memory).
// Accesses of different blocks are never ordered within a launch (blocks run concurrently
// on a GPU), so they conflict in global memory whatever the barriers.
//
// Hazards (kind named after the later access): read-after-write (a read of a word another
// thread wrote, unordered), write-after-read, write-write. At least one side must be a
// non-atomic write: atomics do not race with atomics, nor an atomic with a plain read.
#include "sanitizer.h"

#include <cxxabi.h>
#include <dlfcn.h>
#include <elf.h>
#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cstdarg>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <vector>

namespace gd_host {
namespace san {
namespace {

constexpr size_t kSlot = 65536;         // cuda_host.h aligns every __shared__ variable to this
constexpr size_t kMaxStaticShared = 48 * 1024;
constexpr size_t kRedZone = 256;         // red-zone bytes checked after each block
constexpr uint32_t kPoisonWord = 0xffffffffu;  // empty() arrays (initcheck), poisoned shared
constexpr uint16_t kAtomic = 1;


// one access: who, when
struct Rec {
    uint32_t block = 0;  // linear block id + 1; 0: no access recorded
    uint32_t bar = 0;    // barrier interval (completed __syncthreads of the block)
    uint32_t wgen = 0;   // warp-sync count of the thread's warp at the access
    uint16_t tid = 0;    // linear thread id in the block
    uint16_t flags = 0;  // kAtomic
};
struct Cell {
    uint32_t gen = 0;  // valid when equal to the region's current generation
    Rec w, r1, r2;     // last write, last two reads (of different threads)
};

struct Region {
    enum Kind { Static, Dynamic, Array } kind = Array;
    const unsigned char* data = nullptr;  // what the kernel may touch: [data, data + nbytes)
    size_t nbytes = 0;
    const unsigned char *lo = nullptr, *hi = nullptr;  // data plus guards / red zone
    int arg = -1;
    bool floats = false;  // an 'f' array: initcheck looks for the poison pattern
    std::string name;     // static shared: "rotate_block::s"; arrays: "argument 1 (...)"
    std::vector<Cell> shadow;
    uint32_t gen = 0;
};

// ---- static __shared__ variables, from the module's symbol table -------------------------
struct SharedVar {
    Region region;
    unsigned long long poisoned_in = 0;  // block serial of the last poisoning
    size_t red = 0;                      // red-zone bytes after the variable
};

// "void gd::foo<float>(gptr<float const>, int)::s" -> "gd::foo<float>::s"
std::string short_name(const char* mangled) {
    int status = 0;
    char* d = abi::__cxa_demangle(mangled, nullptr, nullptr, &status);
    if (status != 0 || !d) return mangled;
    std::string s = d;
    std::free(d);
    const size_t close = s.rfind(')');
    if (close == std::string::npos) return s;
    std::string var = s.substr(close + 1);  // "::s" (or " const::s")
    const size_t colons = var.rfind("::");
    var = colons == std::string::npos ? var : var.substr(colons);
    int depth = 0;  // find the '(' that opens the parameter list closed at `close`
    size_t open = close;
    for (size_t i = close + 1; i-- > 0;) {
        if (s[i] == ')') ++depth;
        if (s[i] == '(' && --depth == 0) { open = i; break; }
    }
    std::string fn = s.substr(0, open);
    depth = 0;  // drop the return type: the last space outside template brackets
    size_t start = 0;
    for (size_t i = 0; i < fn.size(); ++i) {
        if (fn[i] == '<') ++depth;
        else if (fn[i] == '>') --depth;
        else if (fn[i] == ' ' && depth == 0) start = i + 1;
    }
    return fn.substr(start) + var;
}

struct StaticShared {
    bool loaded = false;
    std::vector<std::unique_ptr<SharedVar>> vars;
    const unsigned char* base = nullptr;  // first slot
    size_t span = 0;                      // bytes covered by the slots
    std::vector<int> slot;                // slot index -> var index, or -1
    // other objects of the module that lie in a slot's red zone (the linker may put small
    // objects there): accesses to them are not shared-memory accesses
    std::vector<std::pair<const unsigned char*, size_t>> others;
};
StaticShared g_ss;

// Reads .symtab of the module holding this code: the static __shared__ variables are the
// function-local statics (_ZZ...) aligned to a 64 KiB slot. Without a symbol table (a
// stripped build) static shared memory goes unchecked.
void load_static_shared() {
    g_ss.loaded = true;
    Dl_info info;
    if (!dladdr(reinterpret_cast<void*>(&load_static_shared), &info) || !info.dli_fname) return;
    const int fd = open(info.dli_fname, O_RDONLY);
    if (fd < 0) return;
    struct stat st;
    if (fstat(fd, &st) != 0) { close(fd); return; }
    void* map = mmap(nullptr, st.st_size, PROT_READ, MAP_PRIVATE, fd, 0);
    close(fd);
    if (map == MAP_FAILED) return;
    const auto* file = static_cast<const unsigned char*>(map);
    const auto* eh = reinterpret_cast<const Elf64_Ehdr*>(file);
    const auto* base = static_cast<const unsigned char*>(info.dli_fbase);
    std::vector<std::pair<const unsigned char*, size_t>> objects;
    if (std::memcmp(eh->e_ident, ELFMAG, SELFMAG) == 0 && eh->e_ident[EI_CLASS] == ELFCLASS64) {
        const auto* sh = reinterpret_cast<const Elf64_Shdr*>(file + eh->e_shoff);
        for (int i = 0; i < eh->e_shnum; ++i) {
            if (sh[i].sh_type != SHT_SYMTAB) continue;
            const auto* syms = reinterpret_cast<const Elf64_Sym*>(file + sh[i].sh_offset);
            const char* names = reinterpret_cast<const char*>(file + sh[sh[i].sh_link].sh_offset);
            const size_t n = sh[i].sh_size / sizeof(Elf64_Sym);
            for (size_t k = 0; k < n; ++k) {
                const Elf64_Sym& s = syms[k];
                if (ELF64_ST_TYPE(s.st_info) != STT_OBJECT || s.st_size == 0 ||
                    s.st_shndx == SHN_UNDEF)
                    continue;
                const unsigned char* addr = base + s.st_value;
                const char* name = names + s.st_name;
                if (s.st_value % kSlot == 0 && s.st_size <= kMaxStaticShared &&
                    std::strncmp(name, "_ZZ", 3) == 0) {
                    auto v = std::make_unique<SharedVar>();
                    v->region.kind = Region::Static;
                    v->region.data = addr;
                    v->region.nbytes = s.st_size;
                    v->region.lo = addr;
                    v->region.hi = addr + kSlot;
                    v->region.name = short_name(name);
                    g_ss.vars.push_back(std::move(v));
                } else {
                    objects.emplace_back(addr, s.st_size);
                }
            }
        }
    }
    munmap(map, st.st_size);
    if (g_ss.vars.empty()) return;
    std::sort(g_ss.vars.begin(), g_ss.vars.end(),
              [](const auto& a, const auto& b) { return a->region.data < b->region.data; });
    g_ss.base = g_ss.vars.front()->region.data;
    g_ss.span = g_ss.vars.back()->region.data + kSlot - g_ss.base;
    g_ss.slot.assign(g_ss.span / kSlot, -1);
    for (size_t i = 0; i < g_ss.vars.size(); ++i) {
        SharedVar& v = *g_ss.vars[i];
        g_ss.slot[(v.region.data - g_ss.base) / kSlot] = static_cast<int>(i);
        // red zone: up to kRedZone bytes after the variable, short of any other object
        const unsigned char* end = v.region.data + v.region.nbytes;
        const unsigned char* limit = std::min(end + kRedZone, v.region.data + kSlot);
        for (const auto& o : objects) {
            if (o.first + o.second > end && o.first < v.region.data + kSlot) {
                g_ss.others.push_back(o);
                if (o.first >= end) limit = std::min(limit, o.first);
            }
        }
        v.red = static_cast<size_t>(limit - end);
    }
}

// ---- the launch ------------------------------------------------------------------------------
struct Launch {
    std::string kernel;
    bool race = false, init = false;
    dim3 grid, block;
    uint32_t block_id = 0;   // linear block id + 1 of the running block
    unsigned long long block_serial = 0;  // counts blocks over all launches (shared-memory gen)
    uint32_t bar = 0;        // barrier interval of the running block
    std::vector<uint32_t> wgen;  // per warp: completed __syncwarp()s in this block
    // per warp: the __syncwarp()s of the current barrier interval, (count, mask)
    std::vector<std::vector<std::pair<uint32_t, unsigned>>> wlog;
    Region dyn;
    std::vector<Region> arrays;
    std::vector<SharedVar*> touched;  // static shared variables used by the running block
};
Launch g_l;
bool g_on = false;       // a kernel thread is running: the hooks check
bool g_suppress = false;  // inside an atomic: its own load and store are not plain accesses
int g_tid = -1;
uint32_t g_launch_gen = 0;

std::string idx3(unsigned long long lin, const dim3& d) {
    return fmt("(%llu, %llu, %llu)", lin % d.x, lin / d.x % d.y, lin / ((unsigned long long)d.x * d.y));
}
std::string who(uint32_t block_id, uint16_t tid) {
    return "thread " + idx3(tid, g_l.block) + " of block " + idx3(block_id - 1, g_l.grid);
}
std::string here() {
    return fmt("kernel '%s', block %s, thread %s: ", g_l.kernel.c_str(),
               idx3(g_l.block_id - 1, g_l.grid).c_str(), idx3(g_tid, g_l.block).c_str());
}
std::string region_name(const Region& r) {
    switch (r.kind) {
        case Region::Static: return "shared variable '" + r.name + "'";
        case Region::Dynamic: return "dynamic shared memory";
        default: return r.name;
    }
}

[[noreturn]] void out_of_bounds(const Region& r, const unsigned char* at, size_t n, bool write) {
    const long off = static_cast<long>(at - r.data);
    const char* verb = write ? "wrote" : "read";
    if (r.kind == Region::Array)  // the wording of the guard-zone check after a launch
        throw KernelError(fmt("kernel '%s' %s outside %s: a %zu-byte access at byte offset %ld "
                              "(%s, through a raw pointer)",
                              g_l.kernel.c_str(), verb, r.name.c_str(), n, off,
                              who(g_l.block_id, g_tid).c_str()));
    if (r.kind == Region::Dynamic)
        throw KernelError(here() + fmt("%s outside its %zu bytes of dynamic shared memory: a "
                                       "%zu-byte access at byte offset %ld",
                                       verb, r.nbytes, n, off));
    throw KernelError(here() + fmt("out-of-bounds access to shared variable '%s' (%zu bytes): "
                                   "a %zu-byte %s at byte offset %ld",
                                   r.name.c_str(), r.nbytes, n, write ? "write" : "read", off));
}

// is the recorded access p ordered before the running thread's access?
bool ordered(const Rec& p) {
    if (p.block != g_l.block_id) return false;  // other block, same launch: concurrent
    if (p.tid == g_tid || p.bar != g_l.bar) return true;
    const int warp = g_tid >> 5;
    if ((p.tid >> 5) != warp) return false;
    const unsigned both = (1u << (p.tid & 31)) | (1u << (g_tid & 31));
    const auto& log = g_l.wlog[warp];
    for (auto it = log.rbegin(); it != log.rend() && it->first > p.wgen; ++it)
        if ((it->second & both) == both) return true;
    return false;
}

[[noreturn]] void hazard(const char* kind, const Region& r, size_t word, const Rec& p,
                         bool write) {
    const bool same_warp = p.block == g_l.block_id && (p.tid >> 5) == (g_tid >> 5);
    const char* did = std::strcmp(kind, "write-after-read") == 0 ? "read"
                      : (p.flags & kAtomic)                   ? "atomically wrote"
                                                              : "wrote";
    std::string between;
    if (p.block != g_l.block_id)
        between = "in another block of the same launch (blocks run concurrently: no barrier "
                  "orders them; use atomics or a second kernel)";
    else if (same_warp)
        between = "in the same warp with no __syncwarp() or __syncthreads() between them";
    else
        between = "in the same barrier interval (no __syncthreads() between them)";
    throw KernelError(fmt("kernel '%s': racecheck: %s hazard on %s at byte offset %zu: %s %s "
                          "it, %s %s it, %s",
                          g_l.kernel.c_str(), kind, region_name(r).c_str(), word * 4,
                          who(g_l.block_id, g_tid).c_str(), write ? "writes" : "reads",
                          who(p.block, p.tid).c_str(), did, between.c_str()));
}

void check_word(Region& r, size_t word, bool write, bool atomic) {
    Cell& c = r.shadow[word];
    if (c.gen != r.gen) c = Cell{r.gen, {}, {}, {}};
    Rec cur;
    cur.block = g_l.block_id;
    cur.bar = g_l.bar;
    cur.wgen = g_l.wgen[g_tid >> 5];
    cur.tid = static_cast<uint16_t>(g_tid);
    cur.flags = atomic ? kAtomic : 0;
    if (!write && g_l.init && !c.w.block) {
        if (r.kind != Region::Array)
            throw KernelError(here() + fmt("initcheck: read of uninitialised shared memory: %s "
                                           "at byte offset %zu, which no thread of this block "
                                           "has written",
                                           region_name(r).c_str(), word * 4));
        uint32_t v;
        std::memcpy(&v, r.data + word * 4, 4);
        if (r.floats && v == kPoisonWord)
            throw KernelError(here() + fmt("initcheck: read of uninitialised global memory: %s "
                                           "at byte offset %zu holds the poison pattern "
                                           "0xffffffff of an empty() allocation and no thread "
                                           "wrote it in this launch",
                                           r.name.c_str(), word * 4));
    }
    if (g_l.race) {
        const bool plain_write = write && !atomic;
        if (c.w.block && (plain_write || !(c.w.flags & kAtomic)) && !ordered(c.w))
            hazard(write ? "write-write" : "read-after-write", r, word, c.w, write);
        if (plain_write) {
            if (c.r1.block && !ordered(c.r1)) hazard("write-after-read", r, word, c.r1, true);
            if (c.r2.block && !ordered(c.r2)) hazard("write-after-read", r, word, c.r2, true);
        }
    }
    if (write) {
        c.w = cur;
        if (!atomic) c.r1 = c.r2 = Rec{};
    } else if (g_l.race) {
        // keep the last two readers of different threads; a reader ordered before the
        // running thread can make room (its conflicts with later writes are covered)
        auto same = [&](const Rec& q) { return q.block == cur.block && q.tid == cur.tid; };
        if (!c.r1.block || same(c.r1)) c.r1 = cur;
        else if (!c.r2.block || same(c.r2)) c.r2 = cur;
        else if (ordered(c.r1)) c.r1 = cur;
        else c.r2 = cur;
    }
}

void check_region(Region& r, const unsigned char* at, size_t n, bool write, bool atomic) {
    if (at < r.data || at + n > r.data + r.nbytes) out_of_bounds(r, at, n, write);
    if (!g_l.race && !g_l.init) return;
    const size_t off = static_cast<size_t>(at - r.data);
    for (size_t w = off / 4, last = (off + n - 1) / 4; w <= last; ++w)
        check_word(r, w, write, atomic);
}

unsigned char red_byte(size_t k) { return static_cast<unsigned char>(0x5Au ^ (k * 151u)); }

// first use of a static shared variable in this block: poison it, arm its red zone
void first_use(SharedVar& v) {
    v.poisoned_in = g_l.block_serial;
    auto* p = const_cast<unsigned char*>(v.region.data);
    std::memset(p, 0xff, v.region.nbytes);
    for (size_t k = 0; k < v.red; ++k) p[v.region.nbytes + k] = red_byte(k);
    v.region.gen = static_cast<uint32_t>(g_l.block_serial);
    if ((g_l.race || g_l.init) && v.region.shadow.size() < (v.region.nbytes + 3) / 4)
        v.region.shadow.resize((v.region.nbytes + 3) / 4);
    g_l.touched.push_back(&v);
}

// The region (static shared variable, dynamic shared memory, argument array) an access of n
// bytes at `at` belongs to, or nullptr (the host's own memory: stack, module data).
Region* find_region(const unsigned char* at, size_t n) {
    if (static_cast<size_t>(at - g_ss.base) < g_ss.span) {
        const int i = g_ss.slot[static_cast<size_t>(at - g_ss.base) / kSlot];
        if (i >= 0) {
            SharedVar& v = *g_ss.vars[i];
            if (at >= v.region.data + v.region.nbytes || at + n > v.region.data + v.region.nbytes) {
                for (const auto& o : g_ss.others)  // another object of the module: not ours
                    if (at >= o.first && at < o.first + o.second) return nullptr;
            }
            if (v.poisoned_in != g_l.block_serial) first_use(v);
            return &v.region;
        }
    }
    if (static_cast<size_t>(at - g_l.dyn.lo) < static_cast<size_t>(g_l.dyn.hi - g_l.dyn.lo))
        return &g_l.dyn;
    for (Region& r : g_l.arrays)
        if (at >= r.lo && at < r.hi) return &r;
    return nullptr;
}

void on_access(const void* addr, size_t n, bool write, bool atomic) {
    const auto* at = static_cast<const unsigned char*>(addr);
    if (Region* r = find_region(at, n)) check_region(*r, at, n, write, atomic);
}

// A 2-, 4-, 8- or 16-byte load or store of kernel code (the sized hooks): a GPU faults on one
// that is not naturally aligned ("misaligned address"), the host would not notice.
void on_sized_access(const void* addr, size_t n, bool write) {
    const auto* at = static_cast<const unsigned char*>(addr);
    Region* r = find_region(at, n);
    if (r == nullptr) return;
    if (n > 1 && reinterpret_cast<uintptr_t>(at) % n != 0)
        throw KernelError(here() + fmt("misaligned %zu-byte %s of %s at byte offset %ld (a GPU "
                                       "faults: misaligned address)",
                                       n, write ? "write" : "read", region_name(*r).c_str(),
                                       static_cast<long>(at - r->data)));
    check_region(*r, at, n, write, false);
}

}  // namespace

// ---- the scheduler's side ----------------------------------------------------------------
void begin_launch(const std::string& kernel, bool race, bool init, const dim3& grid,
                  const dim3& block, unsigned char* dyn, size_t dyn_size) {
    if (!g_ss.loaded) load_static_shared();
    g_l.kernel = kernel;
    g_l.race = race;
    g_l.init = init;
    g_l.grid = grid;
    g_l.block = block;
    const size_t nthreads = (size_t)block.x * block.y * block.z;
    g_l.wgen.assign((nthreads + 31) / 32, 0);
    g_l.wlog.assign((nthreads + 31) / 32, {});
    g_l.arrays.clear();
    g_l.touched.clear();
    ++g_launch_gen;
    Region& d = g_l.dyn;
    d.kind = Region::Dynamic;
    d.data = dyn;
    d.nbytes = dyn_size;
    d.lo = dyn - 256;  // the emulator's guard zones (kGuardBytes)
    d.hi = dyn + dyn_size + 256;
    if ((race || init) && d.shadow.size() < (dyn_size + 3) / 4) d.shadow.resize((dyn_size + 3) / 4);
}

void add_array(int arg, const unsigned char* lo, const unsigned char* hi, const unsigned char* data,
               size_t nbytes, const std::string& dtype) {
    Region r;
    r.kind = Region::Array;
    r.arg = arg;
    r.lo = lo;
    r.hi = hi;
    r.data = data;
    r.nbytes = nbytes;
    r.floats = !dtype.empty() && dtype[0] == 'f';
    r.name = fmt("argument %d (a %s array of %zu bytes)", arg, dtype.c_str(), nbytes);
    r.gen = g_launch_gen;
    if (g_l.race || g_l.init) r.shadow.resize((nbytes + 3) / 4);
    g_l.arrays.push_back(std::move(r));
}

void begin_block(unsigned long long linear_block) {
    g_l.block_id = static_cast<uint32_t>(linear_block + 1);
    ++g_l.block_serial;
    g_l.dyn.gen = static_cast<uint32_t>(g_l.block_serial);
    g_l.bar = 0;
    std::fill(g_l.wgen.begin(), g_l.wgen.end(), 0u);
    for (auto& log : g_l.wlog) log.clear();
    g_l.touched.clear();
}

void set_thread(int t) {
    g_tid = t;
    g_on = t >= 0;
}

void barrier_completed() {
    ++g_l.bar;  // every access before it is ordered before every access after it
    for (auto& log : g_l.wlog) log.clear();
}

void warp_synced(int warp, unsigned mask) {
    g_l.wlog[warp].emplace_back(++g_l.wgen[warp], mask);
}

std::string end_block() {
    for (SharedVar* v : g_l.touched) {
        const unsigned char* end = v->region.data + v->region.nbytes;
        for (size_t k = 0; k < v->red; ++k)
            if (end[k] != red_byte(k))
                return fmt("kernel '%s', block %s: wrote past the end of shared variable '%s' "
                           "(%zu bytes): the red-zone byte at offset %zu was overwritten",
                           g_l.kernel.c_str(), idx3(g_l.block_id - 1, g_l.grid).c_str(),
                           v->region.name.c_str(), v->region.nbytes, v->region.nbytes + k);
    }
    return "";
}

void end_launch() {
    g_on = false;
    g_tid = -1;
    g_l.arrays.clear();  // frees the arrays' shadows
    g_l.touched.clear();
}

std::string shared_variables() {
    if (!g_ss.loaded) load_static_shared();
    std::string s;
    for (const auto& v : g_ss.vars)
        s += v->region.name + ": " + std::to_string(v->region.nbytes) + "\n";
    return s;
}

}  // namespace san

// ---- called from kernel code (cuda_host.h) --------------------------------------------------
void atomic_begin(const void* p, size_t bytes) {
    if (san::g_on && !san::g_suppress) san::on_access(p, bytes, true, true);
    san::g_suppress = true;
}
void atomic_end() { san::g_suppress = false; }

}  // namespace gd_host

// ---- ThreadSanitizer's instrumentation ABI: the kernels' loads and stores -------------------
// GCC emits these calls in the kernel translation units (-fsanitize=thread); no TSan run
// time is linked, these are the only definitions.
#define GD_HOOK(NAME, N, WRITE)                                              \
    extern "C" void NAME(void* p) {                                          \
        if (gd_host::san::g_on && !gd_host::san::g_suppress)                 \
            gd_host::san::on_sized_access(p, N, WRITE);                      \
    }
#define GD_HOOKS(N)                                  \
    GD_HOOK(__tsan_read##N, N, false)                \
    GD_HOOK(__tsan_write##N, N, true)                \
    GD_HOOK(__tsan_unaligned_read##N, N, false)      \
    GD_HOOK(__tsan_unaligned_write##N, N, true)
GD_HOOK(__tsan_read1, 1, false)
GD_HOOK(__tsan_write1, 1, true)
GD_HOOKS(2)
GD_HOOKS(4)
GD_HOOKS(8)
GD_HOOKS(16)
#undef GD_HOOKS
#undef GD_HOOK
extern "C" void __tsan_read_range(void* p, unsigned long n) {
    if (gd_host::san::g_on && !gd_host::san::g_suppress && n)
        gd_host::san::on_access(p, n, false, false);
}
extern "C" void __tsan_write_range(void* p, unsigned long n) {
    if (gd_host::san::g_on && !gd_host::san::g_suppress && n)
        gd_host::san::on_access(p, n, true, false);
}
extern "C" void __tsan_init() {}
extern "C" void __tsan_func_entry(void*) {}
extern "C" void __tsan_func_exit() {}
extern "C" void __tsan_vptr_update(void**, void*) {}
extern "C" void __tsan_vptr_read(void**) {}
