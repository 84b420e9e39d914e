// cuda_emu.h — a CPU emulation of the CUDA execution model, so that g++ (C++17) can
// compile and run the unmodified kernels/*.cu when FC_EMU is defined. emu/device.cpp
// builds it with every kernel into the emulated device (C ABI: fc_emu_launch); it must be
// the first header of its translation unit.
//
// Model
//   - Blocks run one at a time, to completion, in the order chosen per launch (0: x-fastest
//     ascending, 1: descending, 2: a seeded pseudo-random permutation of all blocks). There
//     is no inter-block concurrency and no memory model: every store is visible to every
//     later load at once. State is process-global and not thread-safe (the Rust side holds
//     a mutex around each launch).
//   - The threads of a block are cooperative fibers on the calling OS thread (started with
//     makecontext, switched with _setjmp / _longjmp; 256 KiB stacks over a PROT_NONE guard
//     page). A fiber runs until it reaches a barrier or a warp collective, exits, or fails;
//     the runnable fibers are resumed in the chosen thread order (0 ascending, 1 descending,
//     2 a fresh seeded permutation every pass). A kernel whose results depend on the block
//     or the thread order has a race.
//   - __syncthreads() parks a fiber until every non-exited thread of the block is parked
//     at a __syncthreads (exited threads count as arrived, as on sm_70+). Warp collectives
//     (__shfl_xor_sync, __shfl_sync, __syncwarp, mma.sync, ldmatrix) park a fiber until
//     every lane of its warp is parked at one; as in PTX, shuffles of one kind may come
//     from different call sites.
//   - Static __shared__ variables are function-local statics (one block runs at a time, so
//     they are per block). emu/device.cpp finds every one of them (each template
//     instantiation has its own) in the binary's symbol table, and each block starts with
//     all of them filled with 0xFF (NaN in every float dtype). Dynamic shared memory
//     (FC_DYN_SMEM in common.cuh) is a buffer of exactly the launch's size (rounded up to
//     16 bytes), 16-byte aligned, filled with 0xFF at every block start and followed by an
//     unmapped page.
//   - cp.async is asynchronous: cp_async_16 snapshots its 16 source bytes (zero past
//     src_bytes) and fills the destination with 0xFF; the snapshot lands in the destination
//     at the issuing thread's cp.async.wait_group that retires its commit group (never
//     earlier), so a read before that wait sees 0xFF. A wait retires committed groups only,
//     as in PTX. Snapshotting at issue equals copying at the wait for kernels that do not
//     write a source while its copy is in flight; the wait checks that they do not.
//   - mma.sync m16n8k16: the 16 products (exact in f64) and the accumulator are summed in
//     f64 and rounded to f32 once. cvt to bf16 / f16 rounds to nearest even. expf, logf,
//     sqrtf, acos, ... are glibc's, not libdevice's.
//   - Compiled with -ffp-contract=off (no FMA contraction; fmaf is a true fma), while NVRTC
//     contracts (--fmad=true). So bitwise equality of two DIFFERENT kernels (or code paths)
//     in the emulator does not carry over to a GPU; bitwise equality of the same kernel and
//     launch across block and thread orders does.
//
// Checks (each makes fc_emu_launch return an error naming the block, and the thread where
// one is to blame; the process never aborts, and the next launch starts from a clean state)
//   - launch configuration: block dims >= 1 with x, y <= 1024, z <= 64 and at most 1024
//     threads; grid dims >= 1 with x <= 2^31 - 1 and y, z <= 65535; dynamic shared memory
//     <= 232448 bytes (sm_90's opt-in maximum); the argument struct's size (device.cpp);
//   - __syncthreads() reached from two different call sites (file:line of the
//     `__syncthreads()` text; a helper that contains one is one site for all its callers)
//     by threads of one block in the same barrier phase;
//   - deadlock: threads of a block parked so that no barrier can be released (say some at a
//     __syncthreads and some at a warp collective), with where each group waits;
//   - warp collectives: a mask other than 0xffffffff; exited lanes, or a warp of fewer than
//     32 threads; lanes of one warp parked at different kinds of collectives (a shuffle and
//     a __syncwarp, say) or after different numbers of collectives (divergence);
//   - cp.async: destination or source not 16-byte aligned, src_bytes outside 0..16, a
//     destination outside shared memory; at the wait, a destination written while its copy
//     was in flight (a store, or an overlapping cp.async) or a source that changed; a thread
//     that exits with copies not retired by a wait (flagged, not completed);
//   - ldmatrix: a row address not 16-byte aligned or not in shared memory;
//   - a C++ exception escaping a kernel.
//
// Not modelled (only a GPU shows these)
//   inter-block concurrency and the memory model (fences, the atomicity of atomics, races
//   between blocks: atomicInc, __threadfence and __ldcg are plain operations here);
//   cp.async copies landing before their wait; the tensor cores' accumulation order and
//   truncation; libdevice's ulp errors; FMA contraction; registers, shared memory per SM and
//   occupancy (the Rust side checks __launch_bounds__ and ptxas's table); timing.
//   Not checked: out-of-bounds loads and stores in general (an access past the end of
//   dynamic shared memory, or a fiber stack overflow, faults on a guard page and kills the
//   process); races between threads of a block beyond what the orders expose;
//   __syncthreads() with exited threads (allowed, as sm_70+ allows it). Plain function-local
//   `static` variables in device code would be poisoned like __shared__ (the kernels have
//   none). Needs the binary's symbol table (.symtab): a binary stripped of symbols fails
//   every launch with a message that says so.
#pragma once
#ifndef FC_EMU
#error "cuda_emu.h is only for FC_EMU builds"
#endif

// Fibers switch with _setjmp / _longjmp between stacks, which glibc's fortified longjmp
// (__longjmp_chk) rejects: switch fortification off before any system header.
#undef _FORTIFY_SOURCE
#include <setjmp.h>
#if defined(__USE_FORTIFY_LEVEL) && __USE_FORTIFY_LEVEL > 0
#error "include cuda_emu.h before any system header (it needs _FORTIFY_SOURCE off for its fiber switches)"
#endif

#include <math.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <signal.h>
#include <sys/mman.h>
#include <ucontext.h>
#include <unistd.h>

#include <functional>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <vector>

// The kernels' `#pragma unroll` is a hint for NVRTC; g++ ignores it. (g++ before 13 does not
// honour this for C++, GCC PR 53431: the build also passes -Wno-unknown-pragmas.)
#pragma GCC diagnostic ignored "-Wunknown-pragmas"

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __align__(n) __attribute__((aligned(n)))
#define __shared__ static
// Barriers and warp collectives record their call site for the checks and messages.
#define __syncthreads() fc_emu_syncthreads(__FILE__, __LINE__)
#define __syncwarp(...) fc_emu_syncwarp_at{__FILE__, __LINE__}(__VA_ARGS__)  // (mask optional)
#define __shfl_xor_sync(...) fc_emu_shfl_xor_sync(__FILE__, __LINE__, __VA_ARGS__)
#define __shfl_sync(...) fc_emu_shfl_sync(__FILE__, __LINE__, __VA_ARGS__)

struct uint3 { unsigned x, y, z; };
struct dim3 {
    unsigned x, y, z;
    dim3(unsigned a = 1, unsigned b = 1, unsigned c = 1) : x(a), y(b), z(c) {}
};

inline uint3 threadIdx, blockIdx;
inline dim3 blockDim, gridDim;

[[noreturn]] inline void fc_emu_fail(const char* fmt, ...) __attribute__((format(printf, 1, 2)));

namespace fc_emu {

// ---- state ------------------------------------------------------------------------------------

enum State : unsigned char { RUN, AT_BLOCK, AT_WARP, DONE, FAILED };
// The kind of warp collective a fiber is parked at; lanes released together must agree.
enum WarpOp : unsigned char { OP_NONE, OP_SYNCWARP, OP_SHFL_BFLY, OP_SHFL_IDX, OP_MMA, OP_LDMATRIX, OP_LDMATRIX_T };
inline const char* op_name(WarpOp op) {
    switch (op) {
        case OP_SYNCWARP: return "__syncwarp";
        case OP_SHFL_BFLY: return "__shfl_xor_sync";
        case OP_SHFL_IDX: return "__shfl_sync";
        case OP_MMA: return "mma.sync";
        case OP_LDMATRIX: return "ldmatrix";
        case OP_LDMATRIX_T: return "ldmatrix.trans";
        default: return "?";
    }
}

// One cp.async in flight: the source bytes as read at issue (zero-filled past src_bytes).
struct CpCopy {
    unsigned char* dst;
    const unsigned char* src;
    int src_bytes;
    long long group;  // commit-group number, -1 while not committed
    unsigned char data[16];
};

struct Fiber {
    ucontext_t ctx;         // starts the fiber (makecontext + setcontext, once per block)
    jmp_buf jb;             // where it is parked
    bool started = false;
    char* stack = nullptr;  // STACK_BYTES usable, a PROT_NONE page below
    State state = RUN;
    uint3 tidx{};
    unsigned long long ncoll = 0;  // warp collectives arrived at (divergence check)
    WarpOp op = OP_NONE;           // where it is parked (messages and checks)
    const char* file = nullptr;
    int line = 0;
    std::vector<CpCopy> cp;        // copies in flight, in issue order
    long long cp_groups = 0;       // commit groups created so far
};

constexpr size_t STACK_BYTES = 256 * 1024;
constexpr int MAX_THREADS = 1024;
// sm_90's opt-in maximum of dynamic shared memory per block (227 KiB).
constexpr size_t DYN_SMEM_MAX = 232448;

struct Range {
    uintptr_t lo, hi;  // [lo, hi)
};

struct LaunchCfg {
    dim3 grid, block;
    size_t dyn_smem = 0;
    int block_order = 0;   // 0 x-fastest ascending, 1 descending, 2 seeded permutation
    int thread_order = 0;  // 0 ascending, 1 descending, 2 a fresh seeded permutation every pass
    unsigned long long seed = 0;
};

// A kernel-side check failed while the scheduler (not a fiber) was running.
struct Failure : std::runtime_error {
    using std::runtime_error::runtime_error;
};

struct Sched {
    jmp_buf main_jb;  // the scheduler, while a fiber runs
    std::vector<Fiber> f;
    std::vector<int> perm;
    int cur = -1;  // the fiber running now; -1 in the scheduler
    int n = 0;
    int thread_order = 0;
    unsigned long long rng = 1;
    const std::function<void()>* body = nullptr;
    bool failed = false;
    std::string err;
    // Dynamic shared memory: [dyn_ptr, dyn_ptr + dyn_bytes) ends at dyn_end, an unmapped page.
    unsigned char* dyn_map = nullptr;
    unsigned char* dyn_end = nullptr;
    unsigned char* dyn_ptr = nullptr;
    size_t dyn_bytes = 0;
    // Every static __shared__ variable (sorted, merged); set by device.cpp before any launch.
    std::vector<Range> smem;
    bool smem_known = false;
};
inline Sched g;
// Per-lane exchange slots for warp collectives: [warp][lane][word].
inline unsigned long long xchg[MAX_THREADS / 32][32][16];

inline std::string vformat(const char* fmt, va_list ap) {
    char buf[2048];
    vsnprintf(buf, sizeof buf, fmt, ap);
    return buf;
}
inline std::string format(const char* fmt, ...) __attribute__((format(printf, 1, 2)));
inline std::string format(const char* fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    std::string s = vformat(fmt, ap);
    va_end(ap);
    return s;
}

// "kernels/common.cuh" -> "common.cuh"
inline const char* base_name(const char* path) {
    if (!path) return "?";
    const char* s = strrchr(path, '/');
    return s ? s + 1 : path;
}

inline std::string where(uint3 t) {
    return format("block (%u,%u,%u), thread (%u,%u,%u)", blockIdx.x, blockIdx.y, blockIdx.z, t.x, t.y, t.z);
}

// Records the failure of the running fiber and switches to the scheduler for good (the
// block's fibers are abandoned: nothing on their stacks may own heap memory). Outside a
// fiber it throws Failure.
[[noreturn]] inline void fail_here(const char* msg) {
    if (g.cur >= 0) {
        Fiber& me = g.f[g.cur];
        if (!g.failed) {
            g.failed = true;
            g.err = std::string(msg) + " (" + where(me.tidx) + ")";
        }
        me.state = FAILED;
        _longjmp(g.main_jb, 1);  // never resumed
    }
    throw Failure(msg);
}

inline Fiber& me(const char* what) {
    if (g.cur < 0) fc_emu_fail("%s called outside a kernel launch", what);
    return g.f[g.cur];
}

// Parks the running fiber and returns to the scheduler; returns when the scheduler resumes it.
// (_setjmp / _longjmp: no signal-mask system call per switch, unlike swapcontext.)
__attribute__((noinline)) inline void yield() {
    Fiber& f = g.f[g.cur];
    if (_setjmp(f.jb) == 0) _longjmp(g.main_jb, 1);
}

inline int linear_tid() { return (int)(threadIdx.x + blockDim.x * (threadIdx.y + blockDim.y * threadIdx.z)); }

// ---- shared memory ------------------------------------------------------------------------------

inline bool is_smem(const void* p, size_t n) {
    const uintptr_t a = (uintptr_t)p, b = a + n;
    if (g.dyn_bytes && a >= (uintptr_t)g.dyn_ptr && b <= (uintptr_t)g.dyn_ptr + g.dyn_bytes) return true;
    size_t lo = 0, hi = g.smem.size();  // first range with lo > a, then step back one
    while (lo < hi) {
        const size_t mid = (lo + hi) / 2;
        if (g.smem[mid].lo <= a) lo = mid + 1;
        else hi = mid;
    }
    return lo > 0 && b <= g.smem[lo - 1].hi;
}

inline void poison_smem() {
    for (const Range& r : g.smem) memset((void*)r.lo, 0xff, r.hi - r.lo);
    if (g.dyn_bytes) memset(g.dyn_ptr, 0xff, g.dyn_bytes);
}

// ---- fibers and the block scheduler -------------------------------------------------------------

// Parks this fiber at a warp collective until every lane of its warp arrives.
inline void warp_sync(unsigned mask, WarpOp op, const char* file, int line) {
    Fiber& f = me(op_name(op));
    if (mask != 0xffffffffu)
        fc_emu_fail("%s at %s:%d with mask 0x%08x: only full-warp masks are emulated", op_name(op), base_name(file), line, mask);
    f.state = AT_WARP;
    f.op = op;
    f.file = file;
    f.line = line;
    f.ncoll++;
    yield();
}

inline void fiber_entry() {
    char exc[256] = "";
    bool threw = false;
    try {
        (*g.body)();
    } catch (const std::exception& e) {
        threw = true;
        snprintf(exc, sizeof exc, "%s", e.what());
    } catch (...) {
        threw = true;
    }
    // (fail outside the catch handlers: an abandoned fiber must not hold a caught exception)
    if (threw) fc_emu_fail("a C++ exception escaped the kernel: %s", exc[0] ? exc : "(unknown type)");
    Fiber& f = g.f[g.cur];
    if (!f.cp.empty())
        fc_emu_fail("thread exited with %zu cp.async cop%s in flight (issued but not retired by a cp.async.wait_group)",
                    f.cp.size(), f.cp.size() == 1 ? "y" : "ies");
    f.state = DONE;
    _longjmp(g.main_jb, 1);
}

// Runs fiber t until it parks, exits or fails.
__attribute__((noinline)) inline void resume(int t) {
    Fiber& f = g.f[t];
    g.cur = t;
    threadIdx = f.tidx;
    if (_setjmp(g.main_jb) == 0) {
        if (f.started) _longjmp(f.jb, 1);
        f.started = true;
        setcontext(&f.ctx);  // returns only on failure
        g.failed = true;
        g.err = "setcontext failed to start a fiber";
    }
    g.cur = -1;
}

inline unsigned long long splitmix64(unsigned long long& s) {
    unsigned long long z = (s += 0x9E3779B97F4A7C15ull);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
}

inline std::string thread_str(const Fiber& f) { return format("(%u,%u,%u)", f.tidx.x, f.tidx.y, f.tidx.z); }

inline std::string park_str(const Fiber& f) {
    switch (f.state) {
        case AT_BLOCK: return format("__syncthreads (%s:%d)", base_name(f.file), f.line);
        case AT_WARP: return format("%s (%s:%d)", op_name(f.op), base_name(f.file), f.line);
        case DONE: return "exited";
        default: return "running";
    }
}

inline bool sched_fail(const std::string& msg) {
    g.failed = true;
    g.err = msg + format(" (block (%u,%u,%u))", blockIdx.x, blockIdx.y, blockIdx.z);
    return false;
}

// Runs the fibers of one block to completion. False (g.err set) on any failure.
inline bool run_block() {
    const int n = g.n;
    g.perm.resize(n);
    for (;;) {
        for (int t = 0; t < n; ++t) g.perm[t] = g.thread_order == 1 ? n - 1 - t : t;
        if (g.thread_order == 2)
            for (int t = n - 1; t > 0; --t) {  // Fisher-Yates with xorshift64
                g.rng ^= g.rng << 13;
                g.rng ^= g.rng >> 7;
                g.rng ^= g.rng << 17;
                const int j = (int)(g.rng % (unsigned long long)(t + 1));
                const int tmp = g.perm[t];
                g.perm[t] = g.perm[j];
                g.perm[j] = tmp;
            }
        for (int i = 0; i < n; ++i) {
            const int t = g.perm[i];
            if (g.f[t].state != RUN) continue;
            resume(t);
            if (g.failed) return false;
        }
        bool all_done = true, released = false;
        for (int t = 0; t < n; ++t) all_done &= g.f[t].state == DONE;
        if (all_done) return true;
        for (int w0 = 0; w0 < n; w0 += 32) {
            const int w1 = w0 + 32 < n ? w0 + 32 : n;
            int waiting = 0, live = 0, first = -1, exited = -1;
            for (int t = w0; t < w1; ++t) {
                if (g.f[t].state == DONE) {
                    if (exited < 0) exited = t;
                    continue;
                }
                ++live;
                if (g.f[t].state == AT_WARP) {
                    if (first < 0) first = t;
                    ++waiting;
                }
            }
            if (live == 0 || waiting != live) continue;
            const Fiber& a = g.f[first];
            if (exited >= 0)
                return sched_fail(format("%s at %s:%d in warp %d with exited lanes: thread %s waits, thread %s has exited",
                                         op_name(a.op), base_name(a.file), a.line, w0 / 32, thread_str(a).c_str(),
                                         thread_str(g.f[exited]).c_str()));
            if (w1 - w0 < 32)
                return sched_fail(format("%s at %s:%d in warp %d, which has only %d threads (block size %d is not a multiple of 32)",
                                         op_name(a.op), base_name(a.file), a.line, w0 / 32, w1 - w0, n));
            for (int t = w0; t < w1; ++t) {
                const Fiber& b = g.f[t];
                if (b.op != a.op)
                    return sched_fail(format("lanes of warp %d wait at different warp collectives: thread %s at %s, thread %s at %s",
                                             w0 / 32, thread_str(a).c_str(), park_str(a).c_str(), thread_str(b).c_str(),
                                             park_str(b).c_str()));
                if (b.ncoll != a.ncoll)
                    return sched_fail(format("lanes of warp %d diverged: thread %s is at its warp collective #%llu (%s), thread %s at "
                                             "its #%llu (%s)",
                                             w0 / 32, thread_str(a).c_str(), a.ncoll, park_str(a).c_str(), thread_str(b).c_str(),
                                             b.ncoll, park_str(b).c_str()));
            }
            for (int t = w0; t < w1; ++t) g.f[t].state = RUN;
            released = true;
        }
        if (released) continue;
        int first = -1;
        bool all_block = true;
        for (int t = 0; t < n; ++t) {
            if (g.f[t].state == AT_BLOCK && first < 0) first = t;
            all_block &= (g.f[t].state == DONE || g.f[t].state == AT_BLOCK);
        }
        if (all_block) {
            const Fiber& a = g.f[first];
            for (int t = 0; t < n; ++t) {
                const Fiber& b = g.f[t];
                if (b.state == AT_BLOCK && (b.line != a.line || (b.file != a.file && strcmp(b.file, a.file) != 0)))
                    return sched_fail(format("__syncthreads() reached from two call sites in one barrier phase: thread %s at %s:%d, "
                                             "thread %s at %s:%d",
                                             thread_str(a).c_str(), base_name(a.file), a.line, thread_str(b).c_str(),
                                             base_name(b.file), b.line));
            }
            for (int t = 0; t < n; ++t)
                if (g.f[t].state == AT_BLOCK) g.f[t].state = RUN;
            continue;
        }
        // Deadlock: name up to four distinct places where threads wait.
        std::string m = "deadlock: the threads of the block wait at barriers that cannot all be released:";
        std::vector<std::string> seen;
        for (int t = 0; t < n && seen.size() < 4; ++t) {
            const std::string p = park_str(g.f[t]);
            bool dup = false;
            for (const std::string& s : seen) dup |= s == p;
            if (dup) continue;
            seen.push_back(p);
            int count = 0;
            for (int u = 0; u < n; ++u) count += park_str(g.f[u]) == p;
            m += format(" %d thread%s at %s (first %s);", count, count == 1 ? "" : "s", p.c_str(), thread_str(g.f[t]).c_str());
        }
        m.pop_back();
        return sched_fail(m);
    }
}

inline char* map_guarded(size_t bytes, bool guard_before, bool guard_after, std::string& err) {
    const size_t page = (size_t)sysconf(_SC_PAGESIZE);
    const size_t body = (bytes + page - 1) / page * page;
    const size_t total = body + (guard_before ? page : 0) + (guard_after ? page : 0);
    void* p = mmap(nullptr, total, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (p == MAP_FAILED) {
        err = format("mmap of %zu bytes failed", total);
        return nullptr;
    }
    char* base = static_cast<char*>(p);
    if (guard_before && mprotect(base, page, PROT_NONE) != 0) err = "mprotect failed";
    if (guard_after && mprotect(base + total - page, page, PROT_NONE) != 0) err = "mprotect failed";
    return err.empty() ? base + (guard_before ? page : 0) : nullptr;
}

// Block b (0 <= b < total) of the launch order. Order 2 is a bijection of [0, total): a
// 4-round Feistel network on 2h bits (2^2h >= total) with cycle walking, keyed by the seed.
struct BlockOrder {
    unsigned long long total, mask = 0, key[4] = {};
    int order, h = 1;
    BlockOrder(unsigned long long total_, int order_, unsigned long long seed) : total(total_), order(order_) {
        while (h < 32 && (1ull << (2 * h)) < total) ++h;
        mask = (1ull << h) - 1;
        unsigned long long s = seed ^ 0xB10C0D3Eull;
        for (auto& k : key) k = splitmix64(s);
    }
    unsigned long long feistel(unsigned long long x) const {
        unsigned long long l = x >> h, r = x & mask;
        for (int i = 0; i < 4; ++i) {
            unsigned long long s = r ^ key[i];
            const unsigned long long nl = r;
            r = (l ^ splitmix64(s)) & mask;
            l = nl;
        }
        return (l << h) | r;
    }
    unsigned long long operator()(unsigned long long b) const {
        if (order == 0) return b;
        if (order == 1) return total - 1 - b;
        unsigned long long x = b;
        do x = feistel(x);
        while (x >= total);
        return x;
    }
};

inline std::string check_launch(const LaunchCfg& c) {
    const dim3 b = c.block, gr = c.grid;
    const unsigned long long nt = (unsigned long long)b.x * b.y * b.z;
    if (b.x == 0 || b.y == 0 || b.z == 0 || b.x > 1024 || b.y > 1024 || b.z > 64 || nt > (unsigned long long)MAX_THREADS)
        return format("invalid launch: block (%u,%u,%u) (%llu threads); CUDA allows 1..1024 threads with x, y <= 1024 and z <= 64",
                      b.x, b.y, b.z, nt);
    if (gr.x == 0 || gr.y == 0 || gr.z == 0 || gr.x > 0x7fffffffu || gr.y > 65535 || gr.z > 65535)
        return format("invalid launch: grid (%u,%u,%u); CUDA allows x in 1..2^31-1 and y, z in 1..65535", gr.x, gr.y, gr.z);
    if (c.dyn_smem > DYN_SMEM_MAX)
        return format("invalid launch: %zu bytes of dynamic shared memory; the limit is %zu (227 KiB, sm_90's opt-in maximum)",
                      c.dyn_smem, DYN_SMEM_MAX);
    if (c.block_order < 0 || c.block_order > 2 || c.thread_order < 0 || c.thread_order > 2)
        return format("invalid block order %d or thread order %d (0 ascending, 1 descending, 2 seeded random)", c.block_order,
                      c.thread_order);
    return "";
}

// Runs `body` as every thread of every block of the launch. True on success; else false
// with the message in err. Leaves no state behind that the next launch depends on.
inline bool run_grid(const LaunchCfg& c, const std::function<void()>& body, std::string& err) {
    err = check_launch(c);
    if (!err.empty()) return false;
    if (!g.smem_known) {
        err = "internal: the static __shared__ variables were not located before the launch";
        return false;
    }
    if (!g.dyn_map) {
        g.dyn_map = reinterpret_cast<unsigned char*>(map_guarded(DYN_SMEM_MAX, true, true, err));
        if (!g.dyn_map) return false;
        const size_t page = (size_t)sysconf(_SC_PAGESIZE);
        g.dyn_end = g.dyn_map + (DYN_SMEM_MAX + page - 1) / page * page;
    }
    const int n = (int)(c.block.x * c.block.y * c.block.z);
    if ((int)g.f.size() < n) g.f.resize(n);
    for (int t = 0; t < n; ++t)
        if (!g.f[t].stack) {
            g.f[t].stack = map_guarded(STACK_BYTES, true, false, err);
            if (!g.f[t].stack) return false;
        }
    // A fresh template context per launch (getcontext: a ucontext_t points into itself, so it
    // must not be reused after g.f reallocates). setcontext installs its signal mask and FP
    // environment: this thread's own, so starting a fiber leaves them as they were.
    for (int t = 0; t < n; ++t) getcontext(&g.f[t].ctx);
    g.n = n;
    g.body = &body;
    g.cur = -1;
    g.failed = false;
    g.err.clear();
    g.thread_order = c.thread_order;
    unsigned long long s = c.seed ^ 0x7E4EADull;
    g.rng = splitmix64(s) | 1;  // xorshift state: nonzero
    g.dyn_bytes = c.dyn_smem;
    g.dyn_ptr = g.dyn_end - (c.dyn_smem + 15) / 16 * 16;
    gridDim = c.grid;
    blockDim = c.block;
    const unsigned long long total = (unsigned long long)c.grid.x * c.grid.y * c.grid.z;
    const BlockOrder order(total, c.block_order, c.seed);
    bool ok = true;
    try {
        for (unsigned long long i = 0; i < total && ok; ++i) {
            const unsigned long long b = order(i);
            blockIdx = uint3{(unsigned)(b % c.grid.x), (unsigned)(b / c.grid.x % c.grid.y), (unsigned)(b / ((unsigned long long)c.grid.x * c.grid.y))};
            poison_smem();
            for (int t = 0; t < n; ++t) {
                Fiber& f = g.f[t];
                f.state = RUN;
                f.ncoll = 0;
                f.op = OP_NONE;
                f.file = nullptr;
                f.line = 0;
                f.cp.clear();
                f.cp_groups = 0;
                f.tidx = uint3{(unsigned)t % c.block.x, ((unsigned)t / c.block.x) % c.block.y, (unsigned)t / (c.block.x * c.block.y)};
                f.started = false;
                f.ctx.uc_stack.ss_sp = f.stack;
                f.ctx.uc_stack.ss_size = STACK_BYTES;
                f.ctx.uc_link = nullptr;
                makecontext(&f.ctx, fiber_entry, 0);
            }
            ok = run_block();
        }
    } catch (const Failure& e) {
        ok = false;
        if (!g.failed) g.err = e.what();
    }
    g.cur = -1;
    g.body = nullptr;
    g.dyn_bytes = 0;
    for (int t = 0; t < n; ++t) g.f[t].cp.clear();
    if (!ok) err = g.err.empty() ? "kernel failed" : g.err;
    return ok;
}

}  // namespace fc_emu

[[noreturn]] inline void fc_emu_fail(const char* fmt, ...) {
    char msg[2048];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(msg, sizeof msg, fmt, ap);
    va_end(ap);
    fc_emu::fail_here(msg);
}

// The launch's dynamic shared memory (FC_DYN_SMEM in common.cuh).
inline unsigned char* fc_emu_dyn_smem() { return fc_emu::g.dyn_ptr; }

// ---- barriers and warp collectives ---------------------------------------------------------

inline void fc_emu_syncthreads(const char* file, int line) {
    fc_emu::Fiber& f = fc_emu::me("__syncthreads");
    f.state = fc_emu::AT_BLOCK;
    f.op = fc_emu::OP_NONE;
    f.file = file;
    f.line = line;
    fc_emu::yield();
}
struct fc_emu_syncwarp_at {
    const char* file;
    int line;
    void operator()(unsigned mask = 0xffffffffu) const { fc_emu::warp_sync(mask, fc_emu::OP_SYNCWARP, file, line); }
};

template <typename T> T fc_emu_shfl(const char* file, int line, unsigned mask, T v, int src_of_lane_xor, bool is_xor) {
    static_assert(sizeof(T) <= 8 && std::is_trivially_copyable<T>::value, "shuffle of a 4/8-byte value");
    const fc_emu::WarpOp op = is_xor ? fc_emu::OP_SHFL_BFLY : fc_emu::OP_SHFL_IDX;
    fc_emu::me(fc_emu::op_name(op));
    const int tid = fc_emu::linear_tid(), lane = tid % 32, w = tid / 32;
    unsigned long long bits = 0;
    memcpy(&bits, &v, sizeof(T));
    fc_emu::xchg[w][lane][0] = bits;
    fc_emu::warp_sync(mask, op, file, line);
    const int src = (is_xor ? (lane ^ src_of_lane_xor) : src_of_lane_xor) & 31;
    bits = fc_emu::xchg[w][src][0];
    fc_emu::warp_sync(mask, op, file, line);
    T r;
    memcpy(&r, &bits, sizeof(T));
    return r;
}
template <typename T> T fc_emu_shfl_xor_sync(const char* file, int line, unsigned mask, T v, int lane_mask) {
    return fc_emu_shfl(file, line, mask, v, lane_mask, true);
}
template <typename T> T fc_emu_shfl_sync(const char* file, int line, unsigned mask, T v, int src) {
    return fc_emu_shfl(file, line, mask, v, src, false);
}

// ---- intrinsics -----------------------------------------------------------------------------

inline unsigned __umulhi(unsigned a, unsigned b) { return (unsigned)(((unsigned long long)a * b) >> 32); }
inline float __uint_as_float(unsigned u) { float f; memcpy(&f, &u, 4); return f; }
inline float __int_as_float(int u) { float f; memcpy(&f, &u, 4); return f; }
inline unsigned __float_as_uint(float f) { unsigned u; memcpy(&u, &f, 4); return u; }
inline int __float_as_int(float f) { int u; memcpy(&u, &f, 4); return u; }
// Compiled with -ffp-contract=off: each is one IEEE round-to-nearest operation.
inline float __fadd_rn(float a, float b) { return a + b; }
inline float __fsub_rn(float a, float b) { return a - b; }
inline float __fmul_rn(float a, float b) { return a * b; }
inline float __fdiv_rn(float a, float b) { return a / b; }
inline float __fsqrt_rn(float a) { return sqrtf(a); }
inline int min(int a, int b) { return a < b ? a : b; }
inline int max(int a, int b) { return a > b ? a : b; }
inline long long min(long long a, long long b) { return a < b ? a : b; }
inline long long max(long long a, long long b) { return a > b ? a : b; }
inline unsigned long long __cvta_generic_to_shared(const void* p) { return (unsigned long long)(uintptr_t)p; }
// Inter-block hand-offs (attn_bwd's row splits: the last CTA of a class tile sums the others'
// partials). Blocks run one at a time to completion and a block's fibers switch only at
// barriers and collectives, so an atomic is a plain read-modify-write, a fence has nothing
// to order and an L2-only load is a load: these give the results of a correct hand-off in
// every block order, and a CTA that reads a partial no CTA wrote sees the scratch's NaN
// poison. A missing fence is not caught (only a GPU shows it).
inline unsigned atomicInc(unsigned* a, unsigned val) {
    const unsigned old = *a;
    *a = old >= val ? 0u : old + 1u;
    return old;
}
inline void __threadfence() {}
inline float __ldcg(const float* p) { return *p; }

// ---- PTX emulation helpers (used by the FC_EMU branches of kernels/*.cuh) ---------------------

// cvt.rn.bf16.f32: round to nearest even; NaN -> canonical 0x7fff.
inline unsigned short fc_emu_f32_to_bf16(float v) {
    const unsigned x = __float_as_uint(v);
    if ((x & 0x7fffffffu) > 0x7f800000u) return 0x7fff;
    return (unsigned short)((x + 0x7fffu + ((x >> 16) & 1u)) >> 16);
}
inline float fc_emu_bf16_to_f32(unsigned short h) { return __uint_as_float((unsigned)h << 16); }

// cvt.rn.f16.f32: round to nearest even, overflow to inf; NaN -> canonical 0x7fff.
inline unsigned short fc_emu_f32_to_f16(float v) {
    const unsigned x = __float_as_uint(v);
    const unsigned sign = (x >> 16) & 0x8000u, ax = x & 0x7fffffffu;
    if (ax > 0x7f800000u) return 0x7fff;
    if (ax >= 0x477ff000u) return (unsigned short)(sign | 0x7c00u);  // >= 65520: inf (also inf itself)
    if (ax < 0x38800000u) {                                           // below 2^-14: subnormal or zero
        const float m = nearbyintf(__uint_as_float(ax) * 16777216.0f);  // units of 2^-24, RNE
        return (unsigned short)(sign | (unsigned)m);
    }
    unsigned r = ax - 0x38000000u;
    r = (r + 0xfffu + ((r >> 13) & 1u)) >> 13;
    return (unsigned short)(sign | r);
}
inline float fc_emu_f16_to_f32(unsigned short h) {
    const unsigned sign = ((unsigned)h & 0x8000u) << 16, e = (h >> 10) & 0x1fu, m = h & 0x3ffu;
    if (e == 0) {
        const float v = (float)m * 5.9604644775390625e-8f;  // 2^-24, exact
        return sign ? -v : v;
    }
    if (e == 31) return __uint_as_float(sign | 0x7f800000u | (m << 13));
    return __uint_as_float(sign | ((e + 112u) << 23) | (m << 13));
}

// mma.sync.aligned.m16n8k16.row.col.f32.{bf16,f16}: d = A * B + c over the warp, fragments
// per the PTX ISA (g = lane / 4, q = lane % 4):
//   a0 = A[g][2q..], a1 = A[g+8][2q..], a2 = A[g][2q+8..], a3 = A[g+8][2q+8..]
//   b0 = B[2q..2q+1][g], b1 = B[2q+8..2q+9][g];  d0,d1 = D[g][2q..], d2,d3 = D[g+8][2q..]
// Products of 16-bit values are exact in f64; the 16 products and c are summed in f64 and
// rounded once (the hardware's internal order and truncation are not modelled).
template <bool BF16>
inline void fc_emu_mma_16816(float (&d)[4], const unsigned (&a)[4], const unsigned (&b)[2]) {
    fc_emu::me("mma.sync");
    const int tid = fc_emu::linear_tid(), lane = tid % 32, w = tid / 32;
    unsigned long long* me = fc_emu::xchg[w][lane];
    for (int i = 0; i < 4; ++i) me[i] = a[i];
    me[4] = b[0];
    me[5] = b[1];
    fc_emu::warp_sync(0xffffffffu, fc_emu::OP_MMA, __FILE__, __LINE__);
    auto cvt = [](unsigned h) -> double { return BF16 ? (double)fc_emu_bf16_to_f32((unsigned short)h) : (double)fc_emu_f16_to_f32((unsigned short)h); };
    auto A = [&](int r, int k) -> double {
        const int src = (r & 7) * 4 + ((k & 7) >> 1), reg = (r >> 3) + 2 * (k >> 3);
        const unsigned v = (unsigned)fc_emu::xchg[w][src][reg];
        return cvt((k & 1) ? (v >> 16) : (v & 0xffffu));
    };
    auto Bm = [&](int k, int n) -> double {
        const int src = n * 4 + ((k & 7) >> 1), reg = 4 + (k >> 3);
        const unsigned v = (unsigned)fc_emu::xchg[w][src][reg];
        return cvt((k & 1) ? (v >> 16) : (v & 0xffffu));
    };
    const int gq = lane >> 2, q = lane & 3;
    float out[4];
    for (int r = 0; r < 4; ++r) {
        const int row = gq + 8 * (r >> 1), col = 2 * q + (r & 1);
        double s = (double)d[r];
        for (int k = 0; k < 16; ++k) s += A(row, k) * Bm(k, col);
        out[r] = (float)s;
    }
    fc_emu::warp_sync(0xffffffffu, fc_emu::OP_MMA, __FILE__, __LINE__);
    for (int r = 0; r < 4; ++r) d[r] = out[r];
}

// ldmatrix.sync.aligned.m8n8.x4{,.trans}.shared.b16: lane l supplies the address of row l % 8
// of matrix l / 8 (16 bytes, 16-byte aligned, in shared memory). Without .trans lane l
// receives, for each matrix j, elements (row l / 4, cols 2 (l % 4), +1); with .trans elements
// (rows 2 (l % 4), +1; col l / 4).
inline void fc_emu_ldmatrix_x4(unsigned (&r)[4], const void* row_ptr, bool trans) {
    fc_emu::me("ldmatrix");
    if ((uintptr_t)row_ptr % 16 != 0) fc_emu_fail("ldmatrix row address %p is not 16-byte aligned", row_ptr);
    if (!fc_emu::is_smem(row_ptr, 16)) fc_emu_fail("ldmatrix row address %p (16 bytes) is not in shared memory", row_ptr);
    const int tid = fc_emu::linear_tid(), lane = tid % 32, w = tid / 32;
    const fc_emu::WarpOp op = trans ? fc_emu::OP_LDMATRIX_T : fc_emu::OP_LDMATRIX;
    fc_emu::xchg[w][lane][0] = (unsigned long long)(uintptr_t)row_ptr;
    fc_emu::warp_sync(0xffffffffu, op, __FILE__, __LINE__);
    unsigned out[4];
    for (int j = 0; j < 4; ++j) {
        unsigned short lo, hi;
        if (!trans) {
            const unsigned char* row = (const unsigned char*)(uintptr_t)fc_emu::xchg[w][8 * j + lane / 4][0];
            memcpy(&lo, row + 4 * (lane % 4), 2);
            memcpy(&hi, row + 4 * (lane % 4) + 2, 2);
        } else {
            const unsigned char* r0 = (const unsigned char*)(uintptr_t)fc_emu::xchg[w][8 * j + 2 * (lane % 4)][0];
            const unsigned char* r1 = (const unsigned char*)(uintptr_t)fc_emu::xchg[w][8 * j + 2 * (lane % 4) + 1][0];
            memcpy(&lo, r0 + 2 * (lane / 4), 2);
            memcpy(&hi, r1 + 2 * (lane / 4), 2);
        }
        out[j] = (unsigned)lo | ((unsigned)hi << 16);
    }
    fc_emu::warp_sync(0xffffffffu, op, __FILE__, __LINE__);
    for (int j = 0; j < 4; ++j) r[j] = out[j];
}

// ---- cp.async (asynchronous: see "Model" above) -------------------------------------------------

// cp.async.cg.shared.global [smem], [gmem], 16, src_bytes: reads the source now (bytes past
// src_bytes are zero), poisons the destination, lands at the wait that retires its group.
inline void fc_emu_cp_async_16(void* smem, const void* gmem, int src_bytes) {
    fc_emu::Fiber& f = fc_emu::me("cp.async");
    if ((uintptr_t)smem % 16 != 0) fc_emu_fail("cp.async shared address %p is not 16-byte aligned", smem);
    if (src_bytes < 0 || src_bytes > 16) fc_emu_fail("cp.async src size %d is outside 0..16", src_bytes);
    if (src_bytes > 0 && (uintptr_t)gmem % 16 != 0) fc_emu_fail("cp.async global address %p is not 16-byte aligned", gmem);
    if (!fc_emu::is_smem(smem, 16)) fc_emu_fail("cp.async destination %p (16 bytes) is not in shared memory", smem);
    fc_emu::CpCopy c;
    c.dst = static_cast<unsigned char*>(smem);
    c.src = static_cast<const unsigned char*>(gmem);
    c.src_bytes = src_bytes;
    c.group = -1;
    memset(c.data, 0, sizeof c.data);
    if (src_bytes > 0) memcpy(c.data, gmem, (size_t)src_bytes);
    memset(smem, 0xff, 16);
    f.cp.push_back(c);
}

// cp.async.commit_group: this thread's uncommitted copies become the newest group (possibly empty).
inline void fc_emu_cp_async_commit() {
    fc_emu::Fiber& f = fc_emu::me("cp.async.commit_group");
    for (fc_emu::CpCopy& c : f.cp)
        if (c.group < 0) c.group = f.cp_groups;
    f.cp_groups++;
}

// cp.async.wait_group n: every group but the newest n has landed (uncommitted copies have not).
inline void fc_emu_cp_async_wait_group(int n) {
    fc_emu::Fiber& f = fc_emu::me("cp.async.wait_group");
    const long long retire_below = f.cp_groups - n;
    size_t keep = 0;
    for (size_t i = 0; i < f.cp.size(); ++i) {
        const fc_emu::CpCopy c = f.cp[i];
        if (c.group < 0 || c.group >= retire_below) {
            f.cp[keep++] = c;
            continue;
        }
        for (int k = 0; k < 16; ++k)
            if (c.dst[k] != 0xff)
                fc_emu_fail("cp.async destination %p was written while the copy was in flight (a store, or another "
                            "cp.async to the same bytes, before this thread's cp.async.wait_group)",
                            (void*)c.dst);
        if (c.src_bytes > 0 && memcmp(c.src, c.data, (size_t)c.src_bytes) != 0)
            fc_emu_fail("the global source %p of a cp.async changed while the copy was in flight", (const void*)c.src);
        memcpy(c.dst, c.data, 16);
    }
    f.cp.resize(keep);
}
