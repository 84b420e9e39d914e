// device.cpp — the emulated CUDA device: every kernels/*.cu and emu/selftest.cu compiled
// against cuda_emu.h (-DFC_EMU) into one translation unit, behind a C ABI that
// src/cuda/emu.rs calls. Device buffers are host memory: a device pointer is a host address.
//
// Build (build.rs, `emu` feature, through the cc crate):
//   c++ -std=c++17 -O2 -ffp-contract=off -DFC_EMU -Ikernels -Iemu -I$OUT_DIR -c emu/device.cpp
// where $OUT_DIR/emu_kernels.inc holds one line `FC_EMU_KERNEL(name)` per `extern "C"`
// entry point of kernels/*.cu. The kernel sources are included below by hand: a new
// kernels/*.cu that is not added here fails to compile (its names are undeclared).
//
// C ABI (process-global state, NOT thread-safe: callers serialize every call; the Rust
// side holds one mutex around fc_emu_set_order + fc_emu_launch):
//
//   int fc_emu_launch(const char* kernel, const unsigned grid[3], const unsigned block[3],
//                     size_t dyn_smem, const void* args, size_t args_len,
//                     char* err, size_t err_len);
//     Runs kernel<<<grid, block, dyn_smem>>>(*(P*)args), P the kernel's one parameter type,
//     to completion, with the orders last set by fc_emu_set_order. Returns 0 on success
//     (err[0] = 0 when err_len > 0), else one of FC_EMU_E_* below with a message in err
//     (NUL-terminated, truncated to err_len - 1 bytes) that starts with the kernel name.
//     Never aborts: a failed check abandons the grid, and the next launch starts clean.
//     Memory written by the blocks that ran before a failure stays written.
//   void fc_emu_set_order(int block_order, int thread_order, unsigned long long seed);
//     block_order: 0 x-fastest ascending, 1 descending, 2 a pseudo-random permutation of
//     all blocks from seed; thread_order (the order runnable threads of a block are resumed
//     between barriers): 0 ascending, 1 descending, 2 a fresh permutation every pass from
//     seed. Same seed, grid and kernel: same orders. Invalid values fail the next launch.
//   int fc_emu_kernel_count(void);
//   const char* fc_emu_kernel_name(int i);  // NULL when i is out of range
//     The registered kernels: emu_kernels.inc's, then the emu_selftest_* kernels.
#include "cuda_emu.h"

#include <elf.h>
#include <fcntl.h>
#include <link.h>
#include <sys/stat.h>

#include <algorithm>
#include <new>
#include <string>
#include <unordered_map>
#include <unordered_set>
#include <vector>

// The kernels live in their own namespace: the scan for static __shared__ variables below
// recognizes them by it (and by the C names of the entry points).
namespace fc_emu_k {
#include "norms.cu"
#include "stats.cu"
#include "train_ops.cu"
#include "head_ref.cu"
#include "head_fused.cu"
#include "selftest.cu"
}  // namespace fc_emu_k

extern "C" {
int fc_emu_launch(const char* kernel, const unsigned grid[3], const unsigned block[3], size_t dyn_smem, const void* args,
                  size_t args_len, char* err, size_t err_len);
void fc_emu_set_order(int block_order, int thread_order, unsigned long long seed);
int fc_emu_kernel_count(void);
const char* fc_emu_kernel_name(int i);
}

// fc_emu_launch's return codes.
enum {
    FC_EMU_OK = 0,
    FC_EMU_E_KERNEL = 1,  // unknown kernel name, or a null kernel / grid / block / args pointer
    FC_EMU_E_ARGS = 2,    // args_len != sizeof the kernel's parameter struct
    FC_EMU_E_CONFIG = 3,  // invalid grid, block, dynamic smem size or order
    FC_EMU_E_CHECK = 4,   // an emulator check failed while the kernel ran
    FC_EMU_E_SETUP = 5,   // the emulator could not set itself up (symbol table, memory)
};

namespace {

// ---- kernel registry ----------------------------------------------------------------------------

using AnyFn = void (*)();
using RunFn = bool (*)(AnyFn, const void*, const fc_emu::LaunchCfg&, std::string&);

struct Entry {
    const char* name;
    size_t arg_bytes;
    AnyFn fn;
    RunFn run;
};

template <typename P> bool run_kernel(AnyFn fn, const void* args, const fc_emu::LaunchCfg& cfg, std::string& err) {
    P p;
    memcpy(static_cast<void*>(&p), args, sizeof(P));
    const auto k = reinterpret_cast<void (*)(P)>(fn);
    const std::function<void()> body = [k, &p] { k(p); };  // each thread gets its own copy, as on a GPU
    return fc_emu::run_grid(cfg, body, err);
}

template <typename P> Entry entry(const char* name, void (*k)(P)) {
    static_assert(std::is_trivially_copyable<P>::value && std::is_class<P>::value,
                  "a kernel's one parameter is an argument struct (kernels/args.cuh), passed by value");
    return Entry{name, sizeof(P), reinterpret_cast<AnyFn>(k), &run_kernel<P>};
}
template <typename... P> Entry entry(const char* name, void (*)(P...)) {
    static_assert(sizeof...(P) == 1, "every kernel entry point takes exactly one parameter: its argument struct");
    return Entry{name, 0, nullptr, nullptr};
}

const std::vector<Entry>& registry() {
    static const std::vector<Entry> r = [] {
        std::vector<Entry> v;
#define FC_EMU_KERNEL(name) v.push_back(entry(#name, &fc_emu_k::name));
#include "emu_kernels.inc"
        FC_EMU_KERNEL(emu_selftest_cp_async)
        FC_EMU_KERNEL(emu_selftest_smem_poison)
        FC_EMU_KERNEL(emu_selftest_sync_sites)
        FC_EMU_KERNEL(emu_selftest_warp)
        FC_EMU_KERNEL(emu_selftest_order)
        FC_EMU_KERNEL(emu_selftest_cvt)
#undef FC_EMU_KERNEL
        return v;
    }();
    return r;
}

// ---- static __shared__ variables ----------------------------------------------------------------
// `__shared__` is `static` here, so every static shared variable is a function-local static
// of kernel code (one per template instantiation). GCC ignores section attributes on the
// local statics of function templates, so they cannot be gathered into a linker section;
// instead they are read from the binary's symbol table: every writable data object whose
// mangled name is a local static (_ZZ...) of a function in namespace fc_emu_k or of one of
// the registered extern "C" kernels. Needs .symtab (a binary stripped with strip=symbols
// fails every launch with a message saying so).

struct ModuleInfo {
    uintptr_t probe = 0;
    bool found = false;
    uintptr_t bias = 0;
    std::string path;
    std::vector<fc_emu::Range> writable;  // PT_LOAD segments with PF_W
};

int find_module(dl_phdr_info* info, size_t, void* data) {
    ModuleInfo& m = *static_cast<ModuleInfo*>(data);
    bool mine = false;
    for (int i = 0; i < info->dlpi_phnum; ++i) {
        const ElfW(Phdr)& ph = info->dlpi_phdr[i];
        const uintptr_t lo = info->dlpi_addr + ph.p_vaddr;
        if (ph.p_type == PT_LOAD && m.probe >= lo && m.probe < lo + ph.p_memsz) mine = true;
    }
    if (!mine) return 0;
    m.found = true;
    m.bias = info->dlpi_addr;
    m.path = info->dlpi_name && info->dlpi_name[0] ? info->dlpi_name : "/proc/self/exe";
    for (int i = 0; i < info->dlpi_phnum; ++i) {
        const ElfW(Phdr)& ph = info->dlpi_phdr[i];
        if (ph.p_type == PT_LOAD && (ph.p_flags & PF_W))
            m.writable.push_back({info->dlpi_addr + ph.p_vaddr, info->dlpi_addr + ph.p_vaddr + ph.p_memsz});
    }
    return 1;
}

// _ZZ<function encoding>E<name>...: is the function kernel code?
bool is_kernel_local_static(const char* s, const std::unordered_set<std::string>& c_kernels) {
    if (strncmp(s, "_ZZ", 3) != 0) return false;
    s += 3;
    while (*s == 'Z') ++s;  // a local static of a lambda in a function: _ZZZ...
    if (strncmp(s, "N8fc_emu_k", 10) == 0) return true;
    size_t len = 0;  // extern "C" function: <length><name>E
    while (*s >= '0' && *s <= '9') len = len * 10 + (size_t)(*s++ - '0');
    if (len == 0 || strnlen(s, len + 1) < len + 1 || s[len] != 'E') return false;
    return c_kernels.count(std::string(s, len)) != 0;
}

std::string scan_static_smem(std::vector<fc_emu::Range>& out) {
    ModuleInfo m;
    m.probe = reinterpret_cast<uintptr_t>(&fc_emu_launch);
    dl_iterate_phdr(find_module, &m);
    if (!m.found) return "cannot find the loaded module that holds the emulator (dl_iterate_phdr)";
    std::unordered_set<std::string> c_kernels;
    for (const Entry& e : registry()) c_kernels.insert(e.name);

    const int fd = open(m.path.c_str(), O_RDONLY | O_CLOEXEC);
    if (fd < 0) return "cannot open " + m.path + " to read its symbol table";
    struct stat st;
    if (fstat(fd, &st) != 0 || st.st_size < (off_t)sizeof(Elf64_Ehdr)) {
        close(fd);
        return "cannot read " + m.path;
    }
    const size_t size = (size_t)st.st_size;
    void* map = mmap(nullptr, size, PROT_READ, MAP_PRIVATE, fd, 0);
    close(fd);
    if (map == MAP_FAILED) return "cannot map " + m.path;
    const unsigned char* base = static_cast<const unsigned char*>(map);
    std::string err;
    auto in_file = [&](uint64_t off, uint64_t len) { return off <= size && len <= size - off; };
    const Elf64_Ehdr* eh = reinterpret_cast<const Elf64_Ehdr*>(base);
    const Elf64_Shdr* sh = nullptr;
    uint64_t shnum = 0;
    if (memcmp(eh->e_ident, ELFMAG, SELFMAG) != 0 || eh->e_ident[EI_CLASS] != ELFCLASS64 || eh->e_shentsize != sizeof(Elf64_Shdr))
        err = m.path + " is not a 64-bit ELF file";
    if (err.empty()) {
        shnum = eh->e_shnum;
        if (!in_file(eh->e_shoff, sizeof(Elf64_Shdr))) err = m.path + ": no section headers";
        else {
            sh = reinterpret_cast<const Elf64_Shdr*>(base + eh->e_shoff);
            if (shnum == 0) shnum = sh[0].sh_size;  // more than SHN_LORESERVE sections
            if (!in_file(eh->e_shoff, shnum * sizeof(Elf64_Shdr))) err = m.path + ": truncated section headers";
        }
    }
    bool have_symtab = false;
    for (uint64_t i = 0; err.empty() && i < shnum; ++i) {
        if (sh[i].sh_type != SHT_SYMTAB) continue;
        have_symtab = true;
        const Elf64_Shdr& ss = sh[i];
        if (ss.sh_link >= shnum || !in_file(ss.sh_offset, ss.sh_size) || ss.sh_entsize != sizeof(Elf64_Sym)) {
            err = m.path + ": malformed symbol table";
            break;
        }
        const Elf64_Shdr& strs = sh[ss.sh_link];
        if (!in_file(strs.sh_offset, strs.sh_size) || strs.sh_size == 0 || base[strs.sh_offset + strs.sh_size - 1] != 0) {
            err = m.path + ": malformed string table";
            break;
        }
        const char* names = reinterpret_cast<const char*>(base + strs.sh_offset);
        const Elf64_Sym* sym = reinterpret_cast<const Elf64_Sym*>(base + ss.sh_offset);
        for (uint64_t k = 0; k < ss.sh_size / sizeof(Elf64_Sym); ++k) {
            const Elf64_Sym& s = sym[k];
            if (ELF64_ST_TYPE(s.st_info) != STT_OBJECT || s.st_size == 0 || s.st_shndx == SHN_UNDEF ||
                s.st_shndx >= SHN_LORESERVE || s.st_shndx >= shnum || s.st_name >= strs.sh_size)
                continue;
            if ((sh[s.st_shndx].sh_flags & (SHF_WRITE | SHF_ALLOC)) != (SHF_WRITE | SHF_ALLOC)) continue;
            if (!is_kernel_local_static(names + s.st_name, c_kernels)) continue;
            const uintptr_t lo = m.bias + s.st_value, hi = lo + s.st_size;
            bool mapped = false;
            for (const fc_emu::Range& w : m.writable) mapped |= lo >= w.lo && hi <= w.hi;
            if (!mapped) {
                err = fc_emu::format("%s: symbol %s lies outside the module's writable segments", m.path.c_str(), names + s.st_name);
                break;
            }
            out.push_back({lo, hi});
        }
    }
    munmap(map, size);
    if (!err.empty()) return err;
    if (!have_symtab)
        return m.path + " has no symbol table (stripped?): the emulator reads it to find the kernels' static __shared__ "
                        "variables, which it poisons at every block start";
    std::sort(out.begin(), out.end(), [](const fc_emu::Range& a, const fc_emu::Range& b) { return a.lo < b.lo; });
    std::vector<fc_emu::Range> merged;
    for (const fc_emu::Range& r : out) {
        if (!merged.empty() && r.lo <= merged.back().hi) merged.back().hi = std::max(merged.back().hi, r.hi);
        else merged.push_back(r);
    }
    out.swap(merged);
    return "";
}

// ---- set-up, once per process ------------------------------------------------------------------

struct Setup {
    std::string err;  // empty: ready
    std::unordered_map<std::string, const Entry*> by_name;
};

const Setup& setup() {
    static const Setup s = [] {
        Setup r;
        for (const Entry& e : registry())
            if (!r.by_name.emplace(e.name, &e).second)
                r.err = fc_emu::format("kernel %s is registered twice (emu_kernels.inc and device.cpp)", e.name);
        if (!r.err.empty()) return r;
        std::vector<fc_emu::Range> ranges;
        r.err = scan_static_smem(ranges);
        if (!r.err.empty()) return r;
        fc_emu::g.smem = ranges;
        fc_emu::g.smem_known = true;
        if (!fc_emu::is_smem(fc_emu_k::emu_selftest_smem_anchor(), sizeof(unsigned))) {
            fc_emu::g.smem_known = false;
            r.err = "the symbol-table scan did not find the kernels' static __shared__ variables (emu_selftest_smem_anchor)";
        }
        return r;
    }();
    return s;
}

struct Order {
    int block = 0, thread = 0;
    unsigned long long seed = 0;
};
Order g_order;

void copy_err(char* err, size_t err_len, const std::string& msg) {
    if (!err || err_len == 0) return;
    const size_t n = std::min(msg.size(), err_len - 1);
    memcpy(err, msg.data(), n);
    err[n] = 0;
}

int launch(const char* kernel, const unsigned grid[3], const unsigned block[3], size_t dyn_smem, const void* args,
           size_t args_len, std::string& msg) {
    if (!kernel) {
        msg = "fc_emu_launch: null kernel name";
        return FC_EMU_E_KERNEL;
    }
    const std::string name = kernel;
    if (!grid || !block || (!args && args_len != 0)) {
        msg = name + ": null grid, block or args pointer";
        return FC_EMU_E_KERNEL;
    }
    const Setup& s = setup();
    if (!s.err.empty()) {
        msg = name + ": emulator set-up failed: " + s.err;
        return FC_EMU_E_SETUP;
    }
    const auto it = s.by_name.find(name);
    if (it == s.by_name.end()) {
        msg = name + ": unknown kernel (not in emu_kernels.inc or the emu_selftest_* list)";
        return FC_EMU_E_KERNEL;
    }
    const Entry& e = *it->second;
    if (args_len != e.arg_bytes || !args) {
        msg = fc_emu::format("%s: argument struct of %zu bytes, the kernel takes %zu", e.name, args_len, e.arg_bytes);
        return FC_EMU_E_ARGS;
    }
    fc_emu::LaunchCfg cfg;
    cfg.grid = dim3(grid[0], grid[1], grid[2]);
    cfg.block = dim3(block[0], block[1], block[2]);
    cfg.dyn_smem = dyn_smem;
    cfg.block_order = g_order.block;
    cfg.thread_order = g_order.thread;
    cfg.seed = g_order.seed;
    std::string err = fc_emu::check_launch(cfg);
    if (!err.empty()) {
        msg = name + ": " + err;
        return FC_EMU_E_CONFIG;
    }
    if (!e.run(e.fn, args, cfg, err)) {
        msg = name + ": " + err;
        return FC_EMU_E_CHECK;
    }
    return FC_EMU_OK;
}

}  // namespace

extern "C" int fc_emu_launch(const char* kernel, const unsigned grid[3], const unsigned block[3], size_t dyn_smem,
                             const void* args, size_t args_len, char* err, size_t err_len) {
    std::string msg;
    int rc;
    try {
        rc = launch(kernel, grid, block, dyn_smem, args, args_len, msg);
    } catch (const std::bad_alloc&) {
        rc = FC_EMU_E_SETUP;
        msg = std::string(kernel ? kernel : "?") + ": out of memory in the emulator";
    } catch (const std::exception& e) {
        rc = FC_EMU_E_SETUP;
        msg = std::string(kernel ? kernel : "?") + ": internal emulator error: " + e.what();
    } catch (...) {
        rc = FC_EMU_E_SETUP;
        msg = std::string(kernel ? kernel : "?") + ": internal emulator error";
    }
    copy_err(err, err_len, rc == FC_EMU_OK ? std::string() : msg);
    return rc;
}

extern "C" void fc_emu_set_order(int block_order, int thread_order, unsigned long long seed) {
    g_order.block = block_order;
    g_order.thread = thread_order;
    g_order.seed = seed;
}

extern "C" int fc_emu_kernel_count(void) { return (int)registry().size(); }

extern "C" const char* fc_emu_kernel_name(int i) {
    const std::vector<Entry>& r = registry();
    return i >= 0 && (size_t)i < r.size() ? r[(size_t)i].name : nullptr;
}
