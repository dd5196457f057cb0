// trace.cpp: see trace.h.
//
// Grouping accesses into warp requests. A GPU issues one request per warp per executed
// load/store instruction; the lanes that skip it (a false predicate, a loop that ended
// early) just do not take part. The emulator runs lanes one after another, so the tracer
// rebuilds the instances: per warp, call site (the access's return address) and sync epoch
// (how many times the lane was resumed: each __syncthreads or warp exchange starts a new
// epoch, see trace_resume), each lane's accesses form an ordered stream. The warp executed
// as many instances as the longest stream; a shorter stream skipped some, and each of its
// accesses is matched, in order, to the instance whose access in the longest stream lies
// nearest in memory (a monotone greedy alignment with the available slack). Lanes of one
// instance form one request. This is a model: a lane that skipped instances nobody else
// executed, or a warp whose lanes all skipped different instances, is grouped
// approximately.
#include "trace.h"

#include <algorithm>
#include <cstdint>
#include <unordered_map>
#include <unordered_set>
#include <vector>

#include "emulator.h"

namespace gd_host {
namespace {

struct Access {
    uintptr_t addr;  // absolute address of the first byte
    uintptr_t base;  // start of the array (sectors are counted from it)
    int arg;
    unsigned bytes;
};

struct StreamKey {
    unsigned warp, epoch;
    uintptr_t site;
    bool operator==(const StreamKey& o) const {
        return warp == o.warp && epoch == o.epoch && site == o.site;
    }
};
struct StreamKeyHash {
    size_t operator()(const StreamKey& k) const {
        return std::hash<uintptr_t>()(k.site * 1000003u ^ (uintptr_t(k.warp) << 24) ^
                                      (uintptr_t(k.epoch) << 4));
    }
};

struct Totals {
    double accesses = 0, requests = 0, sectors = 0, requested_bytes = 0, useful_bytes = 0;
};

inline uintptr_t distance(uintptr_t a, uintptr_t b) { return a > b ? a - b : b - a; }

struct Tracer {
    Totals totals;
    bool have_block = false;
    dim3 block{0, 0, 0};
    std::vector<unsigned> epoch;  // per linear thread of the block
    // per (warp, epoch, site): 32 lanes' access streams
    std::unordered_map<StreamKey, std::vector<std::vector<Access>>, StreamKeyHash> streams;
    std::unordered_map<int, std::unordered_set<uintptr_t>> unique;  // per argument: sectors

    void start_block() {
        have_block = true;
        block = blockIdx;
        std::fill(epoch.begin(), epoch.end(), 0u);
    }

    // one request: the accesses of one instance
    void count_request(const std::vector<const Access*>& acc) {
        std::vector<uintptr_t> secs;
        double bytes = 0;
        for (const Access* a : acc) {
            const uintptr_t first = a->base + (a->addr - a->base) / 32 * 32;
            const uintptr_t last = a->base + (a->addr + a->bytes - 1 - a->base) / 32 * 32;
            for (uintptr_t s = first; s <= last; s += 32) {
                secs.push_back(s);
                unique[a->arg].insert(s);
            }
            bytes += a->bytes;
        }
        std::sort(secs.begin(), secs.end());
        const double n = double(std::unique(secs.begin(), secs.end()) - secs.begin());
        totals.requests += 1;
        totals.sectors += n;
        totals.requested_bytes += bytes;
        totals.useful_bytes += std::min(bytes, 32.0 * n);
    }

    void flush() {
        std::vector<std::vector<const Access*>> inst;
        for (auto& kv : streams) {
            auto& lanes = kv.second;
            size_t ref = 0;
            for (size_t l = 1; l < lanes.size(); ++l)
                if (lanes[l].size() > lanes[ref].size()) ref = l;
            const auto& R = lanes[ref];
            inst.assign(R.size(), {});
            for (auto& L : lanes) {
                size_t slack = R.size() - L.size(), k = 0;
                for (const Access& a : L) {
                    size_t best = k;
                    for (size_t c = k + 1; c <= k + slack; ++c)
                        if (distance(R[c].addr, a.addr) < distance(R[best].addr, a.addr))
                            best = c;
                    slack -= best - k;
                    inst[best].push_back(&a);
                    k = best + 1;
                }
            }
            for (auto& acc : inst)
                if (!acc.empty()) count_request(acc);
        }
        streams.clear();
        have_block = false;
    }
};

Tracer& tracer() {
    static Tracer t;
    return t;
}

unsigned linear_thread() {
    return threadIdx.x + blockDim.x * (threadIdx.y + blockDim.y * threadIdx.z);
}

}  // namespace

void trace_resume() {
    Tracer& t = tracer();
    if (!t.have_block || blockIdx.x != t.block.x || blockIdx.y != t.block.y ||
        blockIdx.z != t.block.z) {
        if (t.have_block) t.flush();
        t.start_block();
    }
    const unsigned id = linear_thread();
    if (t.epoch.size() <= id) t.epoch.resize(id + 1, 0u);
    ++t.epoch[id];
}

void trace_access(int arg, const void* lo, const void* at, size_t bytes) {
    const uintptr_t site = reinterpret_cast<uintptr_t>(__builtin_return_address(0));
    Tracer& t = tracer();
    if (!t.have_block) t.start_block();  // (resumes are traced from the launch's start)
    const unsigned id = linear_thread();
    if (t.epoch.size() <= id) t.epoch.resize(id + 1, 0u);
    auto& lanes = t.streams[StreamKey{id / 32, t.epoch[id], site}];
    if (lanes.empty()) lanes.resize(32);
    lanes[id % 32].push_back(Access{reinterpret_cast<uintptr_t>(at),
                                    reinterpret_cast<uintptr_t>(lo), arg,
                                    static_cast<unsigned>(bytes)});
    t.totals.accesses += 1;
}

}  // namespace gd_host

// ---- the Python side's interface (ctypes: gpudiff/backend/cuda_trace.py) ------------------
// Exported by name (pybind11 builds with -fvisibility=hidden).
#define GD_TRACE_API __attribute__((visibility("default")))
extern "C" {

// Start a trace session: clear all counters.
GD_TRACE_API void gd_trace_start() {
    auto& t = gd_host::tracer();
    t.streams.clear();
    t.have_block = false;
    t.totals = gd_host::Totals{};
    t.unique.clear();
    gd_host::g_trace_on = true;
}

// Stop tracing; out[0..4] = accesses, requests, sectors, requested bytes, useful bytes.
GD_TRACE_API void gd_trace_stop(double* out) {
    auto& t = gd_host::tracer();
    t.flush();
    gd_host::g_trace_on = false;
    out[0] = t.totals.accesses;
    out[1] = t.totals.requests;
    out[2] = t.totals.sectors;
    out[3] = t.totals.requested_bytes;
    out[4] = t.totals.useful_bytes;
}

// Distinct sectors the last session touched in argument `arg` (-1: table pointers).
GD_TRACE_API double gd_trace_unique_sectors(int arg) {
    auto& t = gd_host::tracer();
    auto it = t.unique.find(arg);
    return it == t.unique.end() ? 0.0 : double(it->second.size());
}
}
