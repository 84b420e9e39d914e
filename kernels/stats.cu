// stats.cu — LEAP per-class angular statistics and the feature-cloud std (SPEC section 5).
//
// State (f32 on the device, all [C] unless noted; written only here):
//   centers [C*K, D] unit EMA centers, one per sub-center (center = ema only; K = 1 without
//   sub-centers, see below), mu / v EMA angle moments,
//   n (u64) samples seen, init (u32, 0/1) whether the class has been seen.
//
// Update, for each class k present in the batch with rows S_k (SPEC 5):
//   mbar_k   = mean_{i in S_k} xh_i,  xh_i = x_i * inv_i,  inv_i = 1 / max(||x_i||, 1e-12)
//   center_k = normalize(init ? beta*center_k + (1-beta)*mbar_k : mbar_k)
//   a_i      = angle(xh_i, center_k)  (the updated center)
//   mu_k, v_k = mean a, mean a^2 (new class) or their EMA with beta;  n_k += |S_k|
// Sub-centers (SPEC 5b, K > 1 per class): centers are [C*K, D] (class y's sub-center k is row
// y*K + k) and row i updates and is measured from center (y_i, k*_iy), its target's dominant
// sub-center in the head forward. The host buckets the rows by key y*K + k*_iy instead of
// by class, so stats_update runs one CTA per present (class, sub-center) key, in ascending key
// order (a class's sub-centers in ascending k); new-vs-EMA follows the class's flag init[y]
// (a sub-center never picked holds zeros, so the EMA branch gives normalize(mbar) for it).
// The moments stay per class: stats_update writes each row's angle a_i to ang [B] instead of
// folding it in (several CTAs share a class, and its flag must not change under them), and
// stats_angles then folds the angles of each class segment into mu, v, n, init in ascending
// rows (is_cos = 0). K = 1 keeps the one-launch path (ang null, keys = classes).
//
// The angle is evaluated as 2*atan2(||xh - c||, ||xh + c||) (Kahan), equal to
// acos(clamp(xh . c, -1, 1)) for unit vectors but accurate in f32 near 0 and pi,
// where acos of a rounded dot product loses half the digits (a single-sample
// class has a ~ 0 and f32 acos would report ~3e-4 rad of pure rounding).
//
// Determinism without atomics: the host buckets the batch's labels into
// segments (class ids ascending, rows ascending inside a class) and uploads
//   seg = [ class[S] | start[S+1] | rows[R] ]   (i32; rows of class s are rows[start[s]..start[s+1]])
// Every class (or key) appears in exactly one segment, so one CTA (update) or one thread
// (angles) owns all writes to that class's (or key's) state: no two writers, no atomics.
// Inside a CTA every sum has a fixed order (per-thread sequential loops over a
// fixed index set, then the fixed shuffle trees of common.cuh), so two runs
// give the same bits.
//
// Cloud (SPEC 5): var_k = init ? max(v_k - mu_k^2, 0) : 0, then
//   threshold(T): w_k = [init_k && N_k >= T],   adaptive: w_k = init_k ? N_k : 0
//   var_h = sum w_k var_k / sum w_k   (no head class while sum w_k == 0)
//   sigma_k = sqrt(max(var_h - var_k, 0)) if warm && head exists && (adaptive || N_k < T), else 0
// computed in two launches with a partition that depends on C only:
//   stats_reduce_f32: block b reduces classes [b*chunk, (b+1)*chunk) to (num, den) partials;
//   stats_cloud_f32 : every block re-reduces the P partials in the same fixed order (so all
//                     blocks hold bitwise the same var_h) and writes sigma for its classes.
//
// Names: <op>_<pass>_<dtype> with op `stats` and the pass one of the four stages above.
// Hot kernels (must not spill, tests/resources.rs): stats_*
#include "common.cuh"
#include "args.cuh"

#define STATS_THREADS 256
#define STATS_WARPS (STATS_THREADS / WARP_SIZE)
// Classes per block of stats_cloud_f32 (4 per thread).
#define CLOUD_CLASSES_PER_BLOCK 1024

// var_k from the moments; one fused multiply-add so both cloud kernels round it identically.
__device__ __forceinline__ float class_var(float mu, float v, u32 init) {
    return init ? fmaxf(fmaf(-mu, mu, v), 0.0f) : 0.0f;
}

// Moments of class k from this batch's angle sums (sa = sum a, sa2 = sum a^2 over cnt rows).
// Called by exactly one thread per class.
__device__ __forceinline__ void update_moments(int k, int cnt, float sa, float sa2, float beta,
                                               float* __restrict__ mu, float* __restrict__ v,
                                               u64* __restrict__ n, u32* __restrict__ init) {
    const float fc = (float)cnt;
    const float ma = sa / fc, ma2 = sa2 / fc;
    if (init[k]) {
        const float ob = 1.0f - beta;
        mu[k] = fmaf(beta, mu[k], ob * ma);
        v[k] = fmaf(beta, v[k], ob * ma2);
    } else {
        mu[k] = ma;
        v[k] = ma2;
        init[k] = 1u;
    }
    n[k] += (u64)cnt;
}

// ---- update from features (center = ema) ------------------------------------------------
//
// Launch: grid = S (one CTA per present key), block = 256, no dynamic shared memory.
// x      [B, D]   in   features of storage dtype T (any row may be ignored: only rows listed in seg are read)
// inv    [B]      in   1 / max(||x_i||, 1e-12) (norms.cu row_norms)
// seg    [2S+1+R] in   segments, see the header; keys y*K + k unique and in [0, C*K)
// centers[C*K, D] in/out; init [C] in (and out when ang is null); mu/v/n [C] in/out, only
//                 written when ang is null (K = 1: keys are classes).
// ang    [B]      out, or null: the angle a_i of every row listed in seg (K > 1; the moments are
//                 then left to stats_angles). No argument aliases another.
// Entry points: StatsUpdateArgs<T> (args.cuh).
template <typename T>
__device__ __forceinline__ void stats_update(const T* __restrict__ x, const float* __restrict__ inv,
                                             const int* __restrict__ seg, int num_seg, int d, int K, float beta,
                                             float* __restrict__ centers, float* __restrict__ mu,
                                             float* __restrict__ v, u64* __restrict__ n,
                                             u32* __restrict__ init, float* __restrict__ ang) {
    __shared__ float scratch[WARP_SIZE];
    __shared__ float warp_sa[STATS_WARPS], warp_sa2[STATS_WARPS];
    const int s = blockIdx.x;
    const int key = seg[s];
    const int p0 = seg[num_seg + s], p1 = seg[num_seg + s + 1];
    const int* __restrict__ rows = seg + 2 * num_seg + 1;
    const int cnt = p1 - p0;  // >= 1: the host never emits an empty segment
    const float fcnt = (float)cnt;
    // The class's flag decides for each of its sub-centers (SPEC 5b); K = 1: key = class.
    const bool was_init = init[key / K] != 0u;
    float* __restrict__ ck = centers + (size_t)key * d;

    // Phase 1: thread t owns dims j = t, t+256, ...; for each it sums its column over the
    // class's rows (coalesced across the warp, one row after another), blends with the old
    // center and stores the un-normalized result in place. Only thread t ever touches
    // ck[j] for its j in this phase, so no barrier is needed until the norm.
    float ss = 0.0f;
    for (int j = threadIdx.x; j < d; j += STATS_THREADS) {
        float acc = 0.0f;
        for (int p = p0; p < p1; ++p) {
            const int i = rows[p];
            acc = fmaf(to_f32(x[(size_t)i * d + j]), inv[i], acc);
        }
        const float mbar = acc / fcnt;
        const float b = was_init ? fmaf(beta, ck[j], (1.0f - beta) * mbar) : mbar;
        ck[j] = b;
        ss = fmaf(b, b, ss);
    }
    // block_sum ends with every thread holding the same total (fixed tree).
    const float rn = 1.0f / fmaxf(sqrtf(block_sum(ss, scratch)), FC_EPS_NORM);
    for (int j = threadIdx.x; j < d; j += STATS_THREADS) ck[j] *= rn;
    // Phase 2 reads ck[j] owned by other threads: __syncthreads orders the global
    // writes above before those reads for every thread of the block.
    __syncthreads();

    // Phase 2: warp w takes rows p0+w, p0+w+8, ... (fixed assignment); lanes split D.
    const int lane = threadIdx.x % WARP_SIZE, warp = threadIdx.x / WARP_SIZE;
    float sa = 0.0f, sa2 = 0.0f;
    for (int p = p0 + warp; p < p1; p += STATS_WARPS) {
        const int i = rows[p];
        const float ri = inv[i];
        const T* __restrict__ xi = x + (size_t)i * d;
        float dm = 0.0f, dp = 0.0f;
        for (int j = lane; j < d; j += WARP_SIZE) {
            const float xh = to_f32(xi[j]) * ri;
            const float c = ck[j];
            const float a = xh - c, b = xh + c;
            dm = fmaf(a, a, dm);
            dp = fmaf(b, b, dp);
        }
        dm = warp_sum(dm);
        dp = warp_sum(dp);
        // atan2(0, 0) = 0 covers x = 0 with a zero center; x = 0 with a unit center gives pi/2,
        // as acos(0) does in the oracle.
        const float a = 2.0f * atan2f(sqrtf(dm), sqrtf(dp));
        if (ang != nullptr && lane == 0) ang[i] = a;  // row i is in this segment only
        sa += a;
        sa2 = fmaf(a, a, sa2);
    }
    if (ang != nullptr) return;  // uniform across the block: no barrier below is split
    if (lane == 0) {
        warp_sa[warp] = sa;
        warp_sa2[warp] = sa2;
    }
    __syncthreads();
    if (threadIdx.x == 0) {
        float ta = 0.0f, ta2 = 0.0f;
#pragma unroll
        for (int w = 0; w < STATS_WARPS; ++w) {  // fixed warp order
            ta += warp_sa[w];
            ta2 += warp_sa2[w];
        }
        update_moments(key, cnt, ta, ta2, beta, mu, v, n, init);
    }
}

FC_DTYPES(stats_update, (STATS_THREADS), StatsUpdateArgs,
          stats_update<T>(a.x, a.inv, a.seg, a.num_seg, a.d, a.k, a.beta, a.centers, a.mu, a.v, a.n, a.init, a.ang))

// ---- update from the head's target angles (center = class_weight) ----------------------
//
// Launch: grid = ceil(S / 256), block = 256; thread s owns segment s (O(B) work in all,
// no pass over D). Also folds the sub-center angles of stats_update (K > 1, is_cos = 0) into
// the class moments. ang [B] in: theta_i or a_i (is_cos = 0) or the clamped target cosine c_iy
// (is_cos = 1, converted to theta_i = acos(clamp(c, -1 + 1e-7, 1 - 1e-7)) as SPEC 3;
// the clamp is done in f64 because 1 - 1e-7 is not an f32). Rows are summed in
// ascending order. mu/v/n/init [C] in/out; no aliasing. Entry point: StatsAnglesArgs (args.cuh).
__device__ __forceinline__ void stats_angles(
    const float* __restrict__ ang, const int* __restrict__ seg, int num_seg, int is_cos, float beta,
    float* __restrict__ mu, float* __restrict__ v, u64* __restrict__ n, u32* __restrict__ init) {
    const int s = blockIdx.x * STATS_THREADS + threadIdx.x;
    if (s >= num_seg) return;
    const int k = seg[s];
    const int p0 = seg[num_seg + s], p1 = seg[num_seg + s + 1];
    const int* __restrict__ rows = seg + 2 * num_seg + 1;
    float sa = 0.0f, sa2 = 0.0f;
    for (int p = p0; p < p1; ++p) {
        float a = ang[rows[p]];
        if (is_cos) a = (float)acos(fmin(fmax((double)a, -1.0 + 1e-7), 1.0 - 1e-7));
        sa += a;
        sa2 = fmaf(a, a, sa2);
    }
    update_moments(k, p1 - p0, sa, sa2, beta, mu, v, n, init);
}
extern "C" __global__ void __launch_bounds__(STATS_THREADS) stats_angles_f32(const StatsAnglesArgs a) {
    stats_angles(a.ang, a.seg, a.num_seg, a.is_cos, a.beta, a.mu, a.v, a.n, a.init);
}

// ---- cloud: head variance and sigma_cloud -------------------------------------------------

// Weight of class k in var_h (see the header).
__device__ __forceinline__ float head_weight(u32 init, u64 count, int adaptive, u64 thresh) {
    if (!init) return 0.0f;
    if (adaptive) return (float)count;
    return count >= thresh ? 1.0f : 0.0f;
}

// Launch: grid = P = ceil(C / chunk), block = 256.
// mu/v/init/counts [C] in (counts: the dataset's N_k or the running n_k);
// partial [2P] out: (sum w_k var_k, sum w_k) of block b's chunk at 2b, 2b+1.
// Entry point: StatsReduceArgs (args.cuh).
__device__ __forceinline__ void stats_reduce(
    const float* __restrict__ mu, const float* __restrict__ v, const u32* __restrict__ init,
    const u64* __restrict__ counts, int c, int chunk, int adaptive, u64 thresh, float* __restrict__ partial) {
    __shared__ float scratch[WARP_SIZE];
    const int k0 = blockIdx.x * chunk;
    const int k1 = min(c, k0 + chunk);
    float num = 0.0f, den = 0.0f;
    for (int k = k0 + threadIdx.x; k < k1; k += STATS_THREADS) {
        const u32 in = init[k];
        const float w = head_weight(in, counts[k], adaptive, thresh);
        num = fmaf(w, class_var(mu[k], v[k], in), num);
        den += w;
    }
    num = block_sum(num, scratch);
    den = block_sum(den, scratch);  // block_sum's leading barrier protects scratch
    if (threadIdx.x == 0) {
        partial[2 * blockIdx.x] = num;
        partial[2 * blockIdx.x + 1] = den;
    }
}
extern "C" __global__ void __launch_bounds__(STATS_THREADS) stats_reduce_f32(const StatsReduceArgs a) {
    stats_reduce(a.mu, a.v, a.init, a.counts, a.c, a.chunk, a.adaptive, a.thresh, a.partial);
}

// Launch: grid = ceil(C / 1024), block = 256.
// partial [2P] in (from stats_reduce_f32); mu/v/init/counts [C] in;
// sigma [C] out; head [2] out (written by block 0): var_h (0 when there is no head
// class) and sum w_k (> 0 iff a head class exists). warm = (updates >= warm-up steps).
// No aliasing. Entry point: StatsCloudArgs (args.cuh).
__device__ __forceinline__ void stats_cloud(
    const float* __restrict__ partial, int num_partial, const float* __restrict__ mu,
    const float* __restrict__ v, const u32* __restrict__ init, const u64* __restrict__ counts, int c,
    int adaptive, u64 thresh, int warm, float* __restrict__ sigma, float* __restrict__ head) {
    __shared__ float scratch[WARP_SIZE];
    // Same code, same blockDim, same inputs in every block: every block computes
    // bitwise the same var_h, so no grid-wide broadcast is needed.
    float num = 0.0f, den = 0.0f;
    for (int b = threadIdx.x; b < num_partial; b += STATS_THREADS) {
        num += partial[2 * b];
        den += partial[2 * b + 1];
    }
    num = block_sum(num, scratch);
    den = block_sum(den, scratch);
    const bool has_head = den > 0.0f;
    const float var_h = has_head ? num / den : 0.0f;
    const bool active = warm && has_head;
    if (blockIdx.x == 0 && threadIdx.x == 0) {
        head[0] = var_h;
        head[1] = den;
    }
    const int k0 = blockIdx.x * CLOUD_CLASSES_PER_BLOCK;
    const int k1 = min(c, k0 + CLOUD_CLASSES_PER_BLOCK);
    for (int k = k0 + threadIdx.x; k < k1; k += STATS_THREADS) {
        float s = 0.0f;
        if (active && (adaptive || counts[k] < thresh)) {
            s = sqrtf(fmaxf(var_h - class_var(mu[k], v[k], init[k]), 0.0f));
        }
        sigma[k] = s;
    }
}
extern "C" __global__ void __launch_bounds__(STATS_THREADS) stats_cloud_f32(const StatsCloudArgs a) {
    stats_cloud(a.partial, a.num_partial, a.mu, a.v, a.init, a.counts, a.c, a.adaptive, a.thresh, a.warm, a.sigma,
                a.head);
}
