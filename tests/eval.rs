//! Metrics on hand-checkable cases: perfect embeddings, a known confusion, a tiny ranking
//! whose mAP is worked out by hand, the TPR threshold rule, angles at known values.

use featcloud::eval::{
    angular_spread, closed_set, open_set, predict, shot_group, spread_points, subcenter_outliers, ShotGroup,
};
use featcloud::Error;

fn close(a: f64, b: f64) -> bool {
    (a - b).abs() < 1e-9
}

/// Unit vector at `angle` in the plane.
fn at(angle: f64) -> [f32; 2] {
    [angle.cos() as f32, angle.sin() as f32]
}

#[test]
fn shot_groups_follow_the_usual_thresholds() {
    assert_eq!(shot_group(100), ShotGroup::Many);
    assert_eq!(shot_group(99), ShotGroup::Medium);
    assert_eq!(shot_group(20), ShotGroup::Medium);
    assert_eq!(shot_group(19), ShotGroup::Few);
    assert_eq!(shot_group(0), ShotGroup::Few);
}

#[test]
fn perfect_embeddings_score_one() {
    // W = identity (C = D = 4); every embedding a scaled copy of its class weight.
    let (c, d) = (4usize, 4usize);
    let w: Vec<f32> = (0..c * d).map(|i| if i / d == i % d { 1.0 } else { 0.0 }).collect();
    let labels: Vec<i32> = (0..12).map(|i| i % 4).collect();
    let emb: Vec<f32> =
        labels.iter().flat_map(|&y| (0..d).map(move |j| if j == y as usize { 2.5 } else { 0.0 })).collect();
    let counts = [500u64, 50, 30, 5];
    let m = closed_set(&emb, &labels, d, &w, c, 1, &counts).unwrap();
    assert_eq!((m.overall, m.many, m.medium, m.few), (1.0, 1.0, 1.0, 1.0));
    assert_eq!((m.n_many, m.n_medium, m.n_few), (1, 2, 1));

    let r = open_set(&emb, &labels, d).unwrap();
    assert_eq!((r.rank1, r.map, r.tpr_at_fpr_1e3), (1.0, 1.0, 1.0));
}

#[test]
fn known_confusion_gives_known_group_accuracy() {
    // Three classes in the plane at 0, 120 and 240 degrees; train counts make one class per
    // group. Predictions are steered by placing each sample next to the weight it should hit.
    let third = 2.0 * std::f64::consts::PI / 3.0;
    let w: Vec<f32> = (0..3).flat_map(|k| at(k as f64 * third)).collect();
    let counts = [150u64, 50, 5];
    // (true label, predicted class)
    let cases = [(0, 0), (0, 0), (0, 0), (0, 1), (1, 1), (1, 2), (2, 0), (2, 1), (2, 0), (2, 1), (2, 0)];
    let labels: Vec<i32> = cases.iter().map(|c| c.0).collect();
    let emb: Vec<f32> = cases.iter().flat_map(|&(_, p)| at(p as f64 * third + 0.1)).collect();
    let m = closed_set(&emb, &labels, 2, &w, 3, 1, &counts).unwrap();
    assert!(close(m.many, 3.0 / 4.0), "{m:?}");
    assert!(close(m.medium, 1.0 / 2.0), "{m:?}");
    assert!(close(m.few, 0.0), "{m:?}");
    assert!(close(m.overall, 4.0 / 11.0), "overall averages over samples: {m:?}");
    assert_eq!((m.n_many, m.n_medium, m.n_few), (1, 1, 1));

    // No medium-shot class: NaN accuracy and n = 0. A few-shot class with no test samples
    // still counts as a class, but its group has no samples -> NaN.
    let m = closed_set(&emb[..8], &labels[..4], 2, &w, 3, 1, &[150, 150, 5]).unwrap();
    assert!(m.medium.is_nan() && m.n_medium == 0, "{m:?}");
    assert!(m.few.is_nan() && m.n_few == 1, "{m:?}");
    assert!(close(m.many, 0.75));
}

#[test]
fn closed_set_rejects_bad_inputs() {
    let w = [1.0f32, 0.0, 0.0, 1.0];
    let emb = [1.0f32, 0.0];
    assert!(matches!(closed_set(&emb, &[2], 2, &w, 2, 1, &[1, 1]), Err(Error::LabelOutOfRange { .. })));
    assert!(matches!(closed_set(&emb, &[-1], 2, &w, 2, 1, &[1, 1]), Err(Error::LabelOutOfRange { .. })));
    assert!(matches!(closed_set(&emb, &[0, 1], 2, &w, 2, 1, &[1, 1]), Err(Error::Shape(_))));
    assert!(matches!(closed_set(&emb, &[0], 2, &w[..3], 2, 1, &[1, 1]), Err(Error::Shape(_))));
    assert!(matches!(closed_set(&emb, &[0], 2, &w, 2, 1, &[1]), Err(Error::Shape(_))));
    assert!(matches!(closed_set(&[f32::NAN, 0.0], &[0], 2, &w, 2, 1, &[1, 1]), Err(Error::NonFinite { .. })));
    assert!(matches!(closed_set(&[], &[], 0, &[], 2, 1, &[1, 1]), Err(Error::Empty(_))));
}

#[test]
fn map_on_a_hand_computed_ranking() {
    // Points on a circle; angular distances fix every ranking:
    //   p0 = 0.00 (label 0), p1 = 0.10 (1), p2 = 0.25 (0), p3 = 0.45 (1), p4 = 0.70 (0)
    // query p0: p1 p2 p3 p4 -> labels 1 0 1 0, relevant at ranks 2, 4: AP = (1/2 + 2/4) / 2 = 1/2
    // query p1: p0 p2 p3 p4 -> 0 0 1 0, relevant at rank 3:             AP = 1/3
    // query p2: p1 p3 p0 p4 -> 1 1 0 0, relevant at ranks 3, 4:         AP = (1/3 + 2/4) / 2 = 5/12
    // query p3: p2 p4 p1 p0 -> 0 0 1 0, relevant at rank 3:             AP = 1/3
    // query p4: p3 p2 p1 p0 -> 1 0 1 0, relevant at ranks 2, 4:         AP = 1/2
    // mAP = (1/2 + 1/3 + 5/12 + 1/3 + 1/2) / 5 = 25/60; no query's nearest neighbour matches.
    let angles = [0.0, 0.10, 0.25, 0.45, 0.70];
    let labels = [0, 1, 0, 1, 0];
    let emb: Vec<f32> = angles.iter().flat_map(|&a| at(a)).collect();
    let r = open_set(&emb, &labels, 2).unwrap();
    assert!(close(r.map, 25.0 / 60.0), "{r:?}");
    assert_eq!(r.rank1, 0.0);

    // Same points, labels 0 0 1 1 0.
    // query p0: p1 p2 p3 p4 -> 0 1 1 0: ranks 1, 4: AP = (1 + 2/4) / 2 = 3/4, rank-1 hit
    // query p1: p0 p2 p3 p4 -> 0 1 1 0: AP = 3/4, hit
    // query p2: p1 p3 p0 p4 -> 0 1 0 0: rank 2: AP = 1/2, miss
    // query p3: p2 p4 p1 p0 -> 1 0 0 0: AP = 1, hit
    // query p4: p3 p2 p1 p0 -> 1 1 0 0: relevant (label 0) at ranks 3, 4: AP = (1/3 + 2/4) / 2 = 5/12, miss
    let labels = [0, 0, 1, 1, 0];
    let r = open_set(&emb, &labels, 2).unwrap();
    assert!(close(r.map, (0.75 + 0.75 + 0.5 + 1.0 + 5.0 / 12.0) / 5.0), "{r:?}");
    assert!(close(r.rank1, 3.0 / 5.0), "{r:?}");
}

#[test]
fn queries_without_a_match_are_skipped() {
    // p2 is the only sample of label 7: it is not a query, but it is still a distractor.
    // query p0: p2 (0.1 away) then p1 (0.3 away): relevant at rank 2: AP = 1/2, miss.
    // query p1: p2 (0.2) then p0 (0.3): AP = 1/2, miss.
    let emb: Vec<f32> = [0.0, 0.3, 0.1].iter().flat_map(|&a| at(a)).collect();
    let r = open_set(&emb, &[3, 3, 7], 2).unwrap();
    assert!(close(r.map, 0.5) && r.rank1 == 0.0, "{r:?}");

    // All labels distinct: no query has a match -> NaN, and no genuine pair -> NaN TPR.
    let r = open_set(&emb, &[1, 2, 3], 2).unwrap();
    assert!(r.map.is_nan() && r.rank1.is_nan() && r.tpr_at_fpr_1e3.is_nan(), "{r:?}");
    assert!(matches!(open_set(&emb[..2], &[0], 2), Err(Error::Empty(_))));
}

#[test]
fn tpr_on_a_tiny_set_uses_the_highest_impostor() {
    // Classes A = {0.0, 0.1}, B = {1.0, 1.05}, C = {2.0, 3.2} (angles in radians).
    // Genuine pairs are 0.1, 0.05 and 1.2 apart. 12 impostor pairs (< 1000), so no false
    // accept is allowed: the threshold is the closest impostor pair, 0.1 -> 1.0 = 0.9 apart.
    // A and B's genuine pairs are closer than 0.9, C's is not: TPR = 2/3.
    let emb: Vec<f32> = [0.0, 0.1, 1.0, 1.05, 2.0, 3.2].iter().flat_map(|&a| at(a)).collect();
    let r = open_set(&emb, &[0, 0, 1, 1, 2, 2], 2).unwrap();
    assert!(close(r.tpr_at_fpr_1e3, 2.0 / 3.0), "{r:?}");
}

/// n points along orthogonal axes (cosine 0 between them), except for a few planted pairs
/// `(i, j, cos)`: point j is rotated toward point i to that cosine.
fn planted(n: usize, pairs: &[(usize, usize, f64)]) -> Vec<f32> {
    let d = n;
    let mut emb = vec![0f32; n * d];
    for i in 0..n {
        emb[i * d + i] = 1.0;
    }
    for &(i, j, c) in pairs {
        emb[j * d + j] = (1.0 - c * c).sqrt() as f32;
        emb[j * d + i] = c as f32;
    }
    emb
}

#[test]
fn tpr_allows_one_false_accept_per_thousand_impostors() {
    // 46 points: 1035 pairs, one genuine (0, 1) at cosine 0.85, so 1034 impostors and
    // floor(1.034) = 1 false accept allowed. Impostor cosines: 0.9 (2, 3), 0.8 (4, 5), the
    // rest 0. Threshold = second-highest impostor = 0.8; 0.85 > 0.8 is accepted: TPR = 1.
    let n = 46;
    let pairs = [(0, 1, 0.85), (2, 3, 0.9), (4, 5, 0.8)];
    let labels: Vec<i32> = (0..n as i32).map(|i| if i == 1 { 0 } else { i }).collect();
    let r = open_set(&planted(n, &pairs), &labels, n).unwrap();
    assert_eq!(r.tpr_at_fpr_1e3, 1.0, "{r:?}");

    // 44 points: 945 impostor pairs, no false accept allowed; threshold 0.9 rejects 0.85.
    let n = 44;
    let labels: Vec<i32> = (0..n as i32).map(|i| if i == 1 { 0 } else { i }).collect();
    let r = open_set(&planted(n, &pairs), &labels, n).unwrap();
    assert_eq!(r.tpr_at_fpr_1e3, 0.0, "{r:?}");
}

#[test]
fn angular_std_of_points_at_known_angles() {
    // Class 0: angles -0.3, 0, 0.3 around direction 0 -> angles to the center 0.3, 0, 0.3:
    //   mean 0.2, mean of squares 0.06, std = sqrt(0.06 - 0.04) = sqrt(0.02).
    // Class 1: two points at +-0.4 around pi/2 -> both 0.4 from the center: std 0.
    // Class 2: a single sample -> NaN.
    // Class 3 (3-D): four points 0.5 rad from the pole at azimuths 0, 90, 180, 270 degrees,
    //   plus the pole itself: angles 0.5 x4 and 0 -> mean 0.4, mean sq 0.2, std 0.2.
    let half_pi = std::f64::consts::FRAC_PI_2;
    let mut emb: Vec<f32> = Vec::new();
    let mut labels = Vec::new();
    let mut push = |v: [f64; 3], y: i32| {
        emb.extend(v.iter().map(|&x| x as f32 * 3.0)); // norms do not matter
        labels.push(y);
    };
    for a in [-0.3f64, 0.0, 0.3] {
        push([a.cos(), a.sin(), 0.0], 0);
    }
    for a in [half_pi - 0.4, half_pi + 0.4] {
        push([a.cos(), a.sin(), 0.0], 1);
    }
    push([0.0, 0.0, 1.0], 2);
    let t = 0.5f64;
    for az in [0.0, half_pi, 2.0 * half_pi, 3.0 * half_pi] {
        push([t.sin() * az.cos(), t.sin() * az.sin(), t.cos()], 3);
    }
    push([0.0, 0.0, 1.0], 3);

    let counts = [500u64, 200, 3, 10];
    let s = angular_spread(&emb, &labels, 3, 4, &counts, 100).unwrap();
    let tol = 1e-6; // inputs are f32
    assert!((s.per_class_std[0] - 0.02f64.sqrt()).abs() < tol, "{s:?}");
    assert!(s.per_class_std[1].abs() < tol, "{s:?}");
    assert!(s.per_class_std[2].is_nan(), "{s:?}");
    assert!((s.per_class_std[3] - 0.2).abs() < tol, "{s:?}");
    // Head (>= 100): classes 0, 1. Tail: class 3 only (class 2 is NaN and left out).
    assert!((s.head_mean - 0.02f64.sqrt() / 2.0).abs() < tol, "{s:?}");
    assert!((s.tail_mean - 0.2).abs() < tol, "{s:?}");

    let pts = spread_points(&s, &counts);
    assert_eq!(pts.iter().map(|p| p.0).collect::<Vec<_>>(), vec![500, 200, 10]);

    // No class is head -> NaN head mean.
    let s = angular_spread(&emb, &labels, 3, 4, &counts, 10_000).unwrap();
    assert!(s.head_mean.is_nan() && s.tail_mean.is_finite());
    assert!(matches!(
        angular_spread(&emb, &labels, 3, 3, &counts[..3], 100),
        Err(Error::LabelOutOfRange { .. })
    ));
}

// ---- sub-centers (SPEC 5b) --------------------------------------------------------------------

/// With K sub-centers a class scores its closest sub-center: class 0 has sub-centers at 0 and
/// 180 degrees, class 1 one at 90 and one at 45 degrees (K = 2). A sample at 170 degrees is
/// class 0 (by its second sub-center), one at 40 is class 1, one at 10 is class 0; a plain
/// K = 1 reading of the same rows (four classes) gives rows, not classes.
#[test]
fn predict_takes_each_class_closest_subcenter() {
    let w: Vec<f32> = [0.0f64, 180.0, 90.0, 45.0].iter().flat_map(|&a| at(a.to_radians())).collect();
    let emb: Vec<f32> = [170.0f64, 40.0, 10.0].iter().flat_map(|&a| at(a.to_radians())).collect();
    assert_eq!(predict(&emb, 2, &w, 2, 2).unwrap(), vec![0, 1, 0]);
    assert_eq!(predict(&emb, 2, &w, 4, 1).unwrap(), vec![1, 3, 0]);
    let m = closed_set(&emb, &[0, 1, 0], 2, &w, 2, 2, &[150, 5]).unwrap();
    assert!(close(m.overall, 1.0));
    assert!(matches!(predict(&emb, 2, &w, 2, 3), Err(Error::Shape(m)) if m.contains("C*K*D")));
    assert!(matches!(predict(&emb, 2, &w, 2, 0), Err(Error::Empty(_))));
}

/// Class 0 (K = 3): sub-center 0 at 0 degrees holds three samples (dominant), sub-center 1
/// at 120 holds two, sub-center 2 at 240 none. With a 60-degree threshold the two samples
/// on sub-center 1 (about 115 and 125 degrees from the dominant one) are outliers, the
/// three near 0 are not; class 1 (one sample, exactly on its sub-center 2) has sub-center 2
/// dominant and no outlier.
#[test]
fn outliers_are_far_from_the_class_dominant_subcenter() {
    let deg = |a: f64| at(a.to_radians());
    let w: Vec<f32> = [0.0, 120.0, 240.0, 30.0, 60.0, 200.0].iter().flat_map(|&a| deg(a)).collect();
    let emb: Vec<f32> = [5.0, 115.0, -10.0, 125.0, 0.0, 200.0].iter().flat_map(|&a| deg(a)).collect();
    let labels = [0, 0, 0, 0, 0, 1];
    let r = subcenter_outliers(&emb, &labels, 2, &w, 2, 3, 60.0).unwrap();
    assert_eq!(r.dominant, vec![0, 2]);
    assert_eq!(r.subcenter_counts, vec![vec![3, 2, 0], vec![0, 0, 1]]);
    let rows: Vec<usize> = r.outliers.iter().map(|o| o.row).collect();
    assert_eq!(rows, vec![1, 3]);
    assert!((r.outliers[0].angle_deg - 115.0).abs() < 1e-4 && r.outliers[0].closest_subcenter == 1);
    assert!((r.outliers[1].angle_deg - 125.0).abs() < 1e-4 && r.outliers[1].label == 0);
    // Threshold 130: none; threshold 0: every sample not exactly on its dominant sub-center.
    assert!(subcenter_outliers(&emb, &labels, 2, &w, 2, 3, 130.0).unwrap().outliers.is_empty());
    let all = subcenter_outliers(&emb, &labels, 2, &w, 2, 3, 0.0).unwrap();
    assert_eq!(all.outliers.iter().map(|o| o.row).collect::<Vec<_>>(), vec![0, 1, 2, 3]);
    // Bad input is an error.
    assert!(subcenter_outliers(&emb, &labels, 2, &w, 2, 3, f64::NAN).is_err());
    assert!(subcenter_outliers(&emb, &labels, 2, &w, 2, 3, 181.0).is_err());
    assert!(matches!(
        subcenter_outliers(&emb, &[0, 0, 0, 0, 0, 2], 2, &w, 2, 3, 60.0),
        Err(Error::LabelOutOfRange { .. })
    ));
    assert!(matches!(subcenter_outliers(&emb, &labels, 2, &w[..10], 2, 3, 60.0), Err(Error::Shape(_))));
}
