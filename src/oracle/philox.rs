//! Counter-based random numbers for the feature cloud (SPEC section 6).
//!
//! Philox4x32-10 (Salmon et al., "Parallel random numbers: as easy as 1, 2, 3",
//! SC 2011; the Random123 library) maps a 128-bit counter and a 64-bit key to
//! four u32 words. Row `i` of training step `step` with seed `seed` uses
//!
//! ```text
//! key     = (seed low 32, seed high 32)
//! counter = (i low 32, 0, step low 32, step high 32)
//! ```
//!
//! and turns the first two words into one standard normal with Box-Muller:
//!
//! ```text
//! u1  = (r0 + 1) * 2^-32        in (0, 1], never 0
//! u2  = r1 * 2^-32              in [0, 1)
//! eps = sqrt(-2 ln u1) * cos(2 pi u2)
//! ```
//!
//! [`cloud_normal`] evaluates this in f64 (the truth); [`cloud_normal_f32`] is
//! the f32 arithmetic that the CUDA kernels copy, so that GPU and CPU draw the
//! same eps_i to float rounding.

/// Philox multiplier for words 0/1.
const PHILOX_M0: u32 = 0xD251_1F53;
/// Philox multiplier for words 2/3.
const PHILOX_M1: u32 = 0xCD9E_8D57;
/// Weyl key increment for key word 0 (golden ratio).
const PHILOX_W0: u32 = 0x9E37_79B9;
/// Weyl key increment for key word 1 (sqrt(3) - 1).
const PHILOX_W1: u32 = 0xBB67_AE85;

/// 2^-32 (exact in f32 and f64).
const TWO_POW_M32: f64 = 1.0 / 4_294_967_296.0;

/// High and low 32-bit halves of the 64-bit product `a * b`.
fn mulhilo(a: u32, b: u32) -> (u32, u32) {
    let p = a as u64 * b as u64;
    ((p >> 32) as u32, p as u32)
}

/// One Philox4x32 round (Random123 `_philox4x32round`).
fn round(ctr: [u32; 4], key: [u32; 2]) -> [u32; 4] {
    let (hi0, lo0) = mulhilo(PHILOX_M0, ctr[0]);
    let (hi1, lo1) = mulhilo(PHILOX_M1, ctr[2]);
    [hi1 ^ ctr[1] ^ key[0], lo1, hi0 ^ ctr[3] ^ key[1], lo0]
}

/// Philox4x32 with 10 rounds, bit-exact with Random123's `philox4x32_R(10, ctr, key)`.
///
/// The first round uses `key` as given; the key is bumped by the Weyl constants
/// before each of the nine later rounds.
pub fn philox4x32_10(counter: [u32; 4], key: [u32; 2]) -> [u32; 4] {
    let mut ctr = counter;
    let mut k = key;
    for r in 0..10 {
        if r > 0 {
            k = [k[0].wrapping_add(PHILOX_W0), k[1].wrapping_add(PHILOX_W1)];
        }
        ctr = round(ctr, k);
    }
    ctr
}

/// The four Philox words for row `row` of step `step` under `seed` (SPEC section 6).
///
/// Only the low 32 bits of `row` enter the counter (a batch never has 2^32 rows).
pub fn cloud_words(seed: u64, step: u64, row: u64) -> [u32; 4] {
    let key = [seed as u32, (seed >> 32) as u32];
    let counter = [row as u32, 0, step as u32, (step >> 32) as u32];
    philox4x32_10(counter, key)
}

/// Box-Muller in f64 from two Philox words: `sqrt(-2 ln u1) * cos(2 pi u2)` with
/// `u1 = (r0 + 1) * 2^-32` and `u2 = r1 * 2^-32`, both exact in f64.
pub fn box_muller(r0: u32, r1: u32) -> f64 {
    let u1 = (r0 as f64 + 1.0) * TWO_POW_M32;
    let u2 = r1 as f64 * TWO_POW_M32;
    (-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()
}

/// Box-Muller in f32, exactly the operation sequence the CUDA kernels use.
///
/// ```text
/// // r0, r1: u32; every operation rounds to nearest f32, no fast-math
/// if r0 < 0x80000000:                       // u1 <= 1/2
///     ln_u1 = logf(((float)r0 + 1.0f) * 0x1p-32f)
/// else:                                     // u1 > 1/2: use 1 - u1 = (~r0) * 2^-32
///     ln_u1 = log1pf(-((float)(~r0) * 0x1p-32f))
/// radius = sqrtf(-2.0f * ln_u1)
/// u2     = (float)r1 * 0x1p-32f
/// eps    = radius * cosf(6.2831855f * u2)   // 6.2831855f = (float)(2 pi)
/// ```
///
/// Why the branch: near u1 = 1 (r0 close to 2^32) f32 cannot hold u1 to better
/// than 2^-24, and `sqrt(-2 ln u1)` amplifies that into errors of ~1e-4; `~r0`
/// is exactly 2^32 - 1 - r0, so `1 - u1` is known to full f32 precision there.
/// Every multiply is by a power of two or stands alone before a call, so no
/// FMA contraction can change the result (`(float)` is `__uint2float_rn`).
pub fn box_muller_f32(r0: u32, r1: u32) -> f32 {
    const SCALE: f32 = 1.0 / 4_294_967_296.0;
    let ln_u1 =
        if r0 < 0x8000_0000 { ((r0 as f32 + 1.0) * SCALE).ln() } else { (-((!r0) as f32 * SCALE)).ln_1p() };
    let radius = (-2.0 * ln_u1).sqrt();
    let u2 = r1 as f32 * SCALE;
    radius * (std::f32::consts::TAU * u2).cos()
}

/// Standard normal eps_i for row `row` of step `step` (SPEC section 6), in f64.
pub fn cloud_normal(seed: u64, step: u64, row: u64) -> f64 {
    let r = cloud_words(seed, step, row);
    box_muller(r[0], r[1])
}

/// The same draw as [`cloud_normal`] with f32 arithmetic ([`box_muller_f32`]), as a GPU computes it.
pub fn cloud_normal_f32(seed: u64, step: u64, row: u64) -> f32 {
    let r = cloud_words(seed, step, row);
    box_muller_f32(r[0], r[1])
}
