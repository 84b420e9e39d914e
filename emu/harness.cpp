// harness.cpp — runs the real kernels/*.cu on the CPU under cuda_emu.h (FC_EMU).
//
//   harness <script.txt> <in.bin> <out.bin>
//
// The script is a list of lines (written by tests/emulated_kernels.rs):
//   buf  <id> <nbytes> <offset>   device buffer <id> = in.bin[offset .. offset + nbytes]
//   zbuf <id> <nbytes>            device buffer <id> = zeros
//   launch <kernel> gx gy gz bx by bz dyn_smem <arg>...
//                                 one token per kernel parameter: a buffer id or "null" for a
//                                 pointer, a decimal integer for int / long long / u64, the
//                                 bit pattern (decimal or 0x...) for float, and a buffer id
//                                 for a struct passed by value (HeadParams, OptimParams),
//                                 whose bytes are copied (the size must match)
//   cvt16 <src> <dst> <back>      not a kernel: common.cuh's dtype conversions on a buffer
//   out <id>                      appends buffer <id> to out.bin
//
// FC_EMU_SCHED (environment) sets the order in which the threads of a block are resumed
// between barriers: fwd (default), rev, or a decimal seed (random order each round).
//
// The build (see tests/emulated_kernels.rs) is
//   c++ -O2 -pthread -std=c++17 -ffp-contract=off -DFC_EMU -Ikernels -Iemu -I<gen> emu/harness.cpp
// where <gen>/head_fused_emu.cu is kernels/head_fused.cu with its one
// `extern __shared__ ...dyn_smem[];` declaration replaced by `FC_EMU_DYN_SMEM`
// (C++ has no block-scope declaration that is both `extern` and `static`).
#include "cuda_emu.h"

#include <fstream>
#include <map>
#include <sstream>
#include <string>
#include <tuple>

#define FC_EMU_DYN_SMEM unsigned char* const dyn_smem = fc_emu::dyn_smem_buf;

#include "norms.cu"
#include "stats.cu"
#include "train_ops.cu"
#include "head_ref.cu"
#include "head_fused_emu.cu"

namespace {

struct Buf {
    unsigned char* p = nullptr;
    size_t n = 0;
};
std::map<long, Buf> bufs;

[[noreturn]] void die(const std::string& m) {
    fprintf(stderr, "harness: %s\n", m.c_str());
    exit(2);
}

Buf& get_buf(const std::string& tok) {
    auto it = bufs.find(std::stol(tok));
    if (it == bufs.end()) die("unknown buffer " + tok);
    return it->second;
}

template <typename P> P parse_arg(const std::string& tok) {
    if constexpr (std::is_pointer<P>::value) {
        if (tok == "null") return nullptr;
        return reinterpret_cast<P>(get_buf(tok).p);
    } else if constexpr (std::is_same<P, float>::value) {
        return __uint_as_float((unsigned)std::stoul(tok, nullptr, 0));
    } else if constexpr (std::is_integral<P>::value) {
        if constexpr (std::is_signed<P>::value) return (P)std::stoll(tok, nullptr, 0);
        else return (P)std::stoull(tok, nullptr, 0);
    } else {
        static_assert(std::is_trivially_copyable<P>::value, "struct argument");
        Buf& b = get_buf(tok);
        if (b.n != sizeof(P)) die("struct argument size mismatch for buffer " + tok);
        P v;
        memcpy(&v, b.p, sizeof(P));
        return v;
    }
}

using Runner = std::function<void(dim3, dim3, size_t, const std::vector<std::string>&)>;

template <typename... P> Runner make_runner(void (*k)(P...)) {
    return [k](dim3 g, dim3 b, size_t smem, const std::vector<std::string>& toks) {
        if (toks.size() != sizeof...(P)) die("wrong argument count");
        size_t i = 0;
        std::tuple<P...> args{parse_arg<P>(toks[i++])...};  // braced init: left to right
        std::apply([&](auto... a) { launch(k, g, b, smem, a...); }, args);
    };
}

std::map<std::string, Runner> registry() {
    std::map<std::string, Runner> r;
#define K(name) r[#name] = make_runner(name)
    K(row_norms_f32); K(row_norms_bf16); K(row_norms_f16);
    K(stats_update_f32); K(stats_update_bf16); K(stats_update_f16);
    K(stats_angles_f32); K(stats_reduce_f32); K(stats_cloud_f32);
    K(bias_act_fwd_f32); K(bias_act_bwd_f32); K(cast_fwd_bf16); K(sgd_step_f32); K(adamw_step_f32);
    K(ref_normalize_fwd_f32); K(ref_normalize_fwd_bf16); K(ref_normalize_fwd_f16);
    K(ref_margin_fwd_f32); K(ref_margin_fwd_bf16); K(ref_margin_fwd_f16);
    K(ref_softmax_fwd_f32); K(head_reduce_fwd_f32); K(ref_grad_bwd_f32);
    K(head_normback_bwd_f32); K(head_normback_bwd_bf16); K(head_normback_bwd_f16);
    K(head_normback32_bwd_bf16); K(head_normback32_bwd_f16);
    K(fused_fwd_bf16); K(fused_scalar_fwd_bf16); K(fused_fwd_f16); K(fused_scalar_fwd_f16);
    K(fused_fwd_f32); K(fused_scalar_fwd_f32); K(fused_combine_fwd_f32);
    K(fused_rows64_fwd_bf16); K(fused_rows64_scalar_fwd_bf16); K(fused_rows64_fwd_f16);
    K(fused_rows64_scalar_fwd_f16); K(fused_rows64_fwd_f32); K(fused_rows64_scalar_fwd_f32);
    K(fused_tile64_fwd_bf16); K(fused_tile64_scalar_fwd_bf16); K(fused_tile64_fwd_f16);
    K(fused_tile64_scalar_fwd_f16); K(fused_tile64_fwd_f32); K(fused_tile64_scalar_fwd_f32);
    K(fused_bwd_bf16); K(fused_scalar_bwd_bf16); K(fused_bwd_f16); K(fused_scalar_bwd_f16);
    K(fused_bwd_f32); K(fused_scalar_bwd_f32);
    K(fused_cols64_bwd_bf16); K(fused_cols64_scalar_bwd_bf16); K(fused_cols64_bwd_f16);
    K(fused_cols64_scalar_bwd_f16); K(fused_cols64_bwd_f32); K(fused_cols64_scalar_bwd_f32);
#undef K
    return r;
}

}  // namespace

int main(int argc, char** argv) {
    if (argc != 4) die("usage: harness <script.txt> <in.bin> <out.bin>");
    std::ifstream script(argv[1]);
    std::ifstream in(argv[2], std::ios::binary);
    std::ofstream out(argv[3], std::ios::binary);
    if (!script || !in || !out) die("cannot open the files");
    // FC_EMU_SCHED: "fwd" (default), "rev", or a decimal seed for random orders.
    if (const char* o = getenv("FC_EMU_SCHED")) {
        const std::string so(o);
        if (so == "rev") fc_emu::g.order = 1;
        else if (so != "fwd") {
            fc_emu::g.order = 2;
            fc_emu::g.rng ^= std::stoull(so) * 0x2545F4914F6CDD1Dull;
        }
    }
    const auto reg = registry();
    std::string line;
    while (std::getline(script, line)) {
        std::istringstream ls(line);
        std::string op;
        if (!(ls >> op)) continue;
        if (op == "buf" || op == "zbuf") {
            long id;
            size_t n;
            ls >> id >> n;
            Buf b;
            b.n = n;
            b.p = static_cast<unsigned char*>(aligned_alloc(256, (n + 255) / 256 * 256 + 256));
            memset(b.p, 0, (n + 255) / 256 * 256 + 256);
            if (op == "buf") {
                long long off;
                ls >> off;
                in.seekg(off);
                if (!in.read(reinterpret_cast<char*>(b.p), (std::streamsize)n)) die("short input");
            }
            if (bufs.count(id)) die("buffer defined twice");
            bufs[id] = b;
        } else if (op == "launch") {
            std::string name;
            unsigned gx, gy, gz, bx, by, bz;
            size_t smem;
            ls >> name >> gx >> gy >> gz >> bx >> by >> bz >> smem;
            std::vector<std::string> toks;
            std::string t;
            while (ls >> t) toks.push_back(t);
            auto it = reg.find(name);
            if (it == reg.end()) die("unknown kernel " + name);
            it->second(dim3(gx, gy, gz), dim3(bx, by, bz), smem, toks);
        } else if (op == "cvt16") {
            // cvt16 <src f32 [n]> <dst u16 [2n]> <back f32 [2n]>: dst = [f16 | bf16] of src through
            // common.cuh's from_f32<f16_t / bf16_t>; back = to_f32 of dst (checks the FC_EMU cvt branches)
            std::string a, b, c;
            ls >> a >> b >> c;
            const Buf &src = get_buf(a), &dst = get_buf(b), &back = get_buf(c);
            const size_t n = src.n / 4;
            if (dst.n != 4 * n || back.n != 8 * n) die("cvt16: buffer sizes");
            const float* x = reinterpret_cast<const float*>(src.p);
            u16* h = reinterpret_cast<u16*>(dst.p);
            float* y = reinterpret_cast<float*>(back.p);
            for (size_t i = 0; i < n; ++i) {
                const f16_t hf = from_f32<f16_t>(x[i]);
                const bf16_t hb = from_f32<bf16_t>(x[i]);
                h[i] = hf.bits;
                h[n + i] = hb.bits;
                y[i] = to_f32(hf);
                y[n + i] = to_f32(hb);
            }
        } else if (op == "out") {
            std::string id;
            ls >> id;
            const Buf& b = get_buf(id);
            out.write(reinterpret_cast<const char*>(b.p), (std::streamsize)b.n);
        } else {
            die("unknown op " + op);
        }
    }
    return 0;
}
