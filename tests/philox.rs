//! Philox4x32-10 against Random123's known-answer vectors, and the cloud normal draws (SPEC section 6).

use featcloud::oracle::philox::{
    box_muller, box_muller_f32, cloud_normal, cloud_normal_f32, cloud_words, philox4x32_10,
};

/// Random123 `kat_vectors`, lines `philox4x32 10 <ctr x4> <key x2> <expected x4>`.
#[test]
fn philox4x32_10_known_answers() {
    let cases: [([u32; 4], [u32; 2], [u32; 4]); 3] = [
        ([0, 0, 0, 0], [0, 0], [0x6627e8d5, 0xe169c58d, 0xbc57ac4c, 0x9b00dbd8]),
        ([0xffffffff; 4], [0xffffffff; 2], [0x408f276d, 0x41c83b0e, 0xa20bc7c6, 0x6d5451fd]),
        (
            [0x243f6a88, 0x85a308d3, 0x13198a2e, 0x03707344],
            [0xa4093822, 0x299f31d0],
            [0xd16cfe09, 0x94fdcceb, 0x5001e420, 0x24126ea1],
        ),
    ];
    for (ctr, key, expected) in cases {
        let got = philox4x32_10(ctr, key);
        assert_eq!(got, expected, "ctr {ctr:08x?} key {key:08x?}: got {got:08x?}");
    }
}

#[test]
fn cloud_words_use_the_spec_key_and_counter_layout() {
    let seed = 0x0123_4567_89ab_cdef_u64;
    let step = 0xfedc_ba98_7654_3210_u64;
    let row = 77u64;
    let expected = philox4x32_10([77, 0, 0x7654_3210, 0xfedc_ba98], [0x89ab_cdef, 0x0123_4567]);
    assert_eq!(cloud_words(seed, step, row), expected);
}

#[test]
fn cloud_normal_is_box_muller_of_the_first_two_words() {
    let (seed, step) = (42u64, 7u64);
    for row in 0..16u64 {
        let r = cloud_words(seed, step, row);
        let u1 = (r[0] as f64 + 1.0) / 4_294_967_296.0;
        let u2 = r[1] as f64 / 4_294_967_296.0;
        let expected = (-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos();
        assert_eq!(cloud_normal(seed, step, row).to_bits(), expected.to_bits(), "row {row}");
    }
}

#[test]
fn box_muller_extremes_are_finite() {
    // r0 = 0 gives the smallest u1 = 2^-32 (the largest radius, sqrt(64 ln 2));
    // r0 = 0xffffffff gives u1 = 1 and eps = 0 exactly.
    let rmax = (64.0 * std::f64::consts::LN_2).sqrt();
    assert!((box_muller(0, 0) - rmax).abs() < 1e-12);
    assert_eq!(box_muller(u32::MAX, 0), 0.0);
    assert_eq!(box_muller_f32(u32::MAX, 0), 0.0);
    assert!((box_muller_f32(0, 0) as f64 - rmax).abs() < 1e-5);
}

#[test]
fn cloud_normal_moments_are_standard() {
    let n = 100_000u64;
    let (mut sum, mut sum2, mut sum4) = (0.0, 0.0, 0.0);
    for row in 0..n {
        let e = cloud_normal(1234, 5, row);
        assert!(e.is_finite());
        sum += e;
        sum2 += e * e;
        sum4 += e * e * e * e;
    }
    let mean = sum / n as f64;
    let var = sum2 / n as f64 - mean * mean;
    let kurt = sum4 / n as f64;
    // Standard errors: mean 0.0032, variance 0.0045, fourth moment ~0.03.
    assert!(mean.abs() < 0.02, "mean {mean}");
    assert!((var - 1.0).abs() < 0.03, "variance {var}");
    assert!((kurt - 3.0).abs() < 0.2, "fourth moment {kurt}");
}

#[test]
fn different_steps_seeds_and_rows_draw_differently() {
    let a = cloud_normal(1, 2, 3);
    assert_ne!(a, cloud_normal(1, 2, 4));
    assert_ne!(a, cloud_normal(1, 3, 3));
    assert_ne!(a, cloud_normal(2, 2, 3));
    assert_ne!(a, cloud_normal(1 | (1 << 32), 2, 3));
    assert_ne!(a, cloud_normal(1, 2 | (1 << 32), 3));
    assert_eq!(a.to_bits(), cloud_normal(1, 2, 3).to_bits());
}

fn assert_f32_close(r0: u32, r1: u32) {
    let e64 = box_muller(r0, r1);
    let e32 = box_muller_f32(r0, r1) as f64;
    if e64.abs() < 5.0 {
        assert!((e64 - e32).abs() <= 1e-5, "r0 {r0:#x} r1 {r1:#x}: f64 {e64} f32 {e32}");
    }
}

#[test]
fn cloud_normal_f32_matches_f64() {
    let mut worst = 0.0f64;
    for row in 0..100_000u64 {
        let e64 = cloud_normal(99, 3, row);
        let e32 = cloud_normal_f32(99, 3, row) as f64;
        if e64.abs() < 5.0 {
            worst = worst.max((e64 - e32).abs());
        }
    }
    assert!(worst <= 1e-5, "max |f64 - f32| = {worst}");
}

#[test]
fn box_muller_f32_matches_f64_at_the_hard_words() {
    // u1 near 1 (r0 near 2^32) is where a naive f32 ln(u1) loses ~1e-4;
    // r0 near 2^31 is the branch point; r1 sweeps the cosine.
    let r0s = [
        0u32,
        1,
        0x7fff_ffff,
        0x8000_0000,
        0x8000_0001,
        0xffff_0000,
        0xffff_fff0,
        0xffff_ffe0,
        0xffff_fffe,
        0xffff_ffff,
        0xfff0_1234,
        0x1234_5678,
    ];
    for &r0 in &r0s {
        for k in 0..64u32 {
            let r1 = k.wrapping_mul(0x0400_0001).wrapping_add(k >> 1);
            assert_f32_close(r0, r1);
            assert_f32_close(r0, u32::MAX - r1);
        }
    }
    for k in 0..200_000u32 {
        assert_f32_close(u32::MAX - k, k.wrapping_mul(2_654_435_761));
    }
}
