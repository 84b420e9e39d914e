//! The angular-spread figure: a valid PNG, written atomically, errors instead of panics.

use std::fs;

use featcloud::plot::{angular_std_vs_size, spread_over_seeds, SpreadPoint};
use featcloud::Error;

const PNG_MAGIC: &[u8] = b"\x89PNG\r\n\x1a\n";

type Points = Vec<SpreadPoint>;

/// Two seeds per arm, classes of 300 down to 2 samples.
fn series() -> (Points, Points) {
    let seed = |base: f64, slope: f64, jitter: f64| -> Vec<(u64, f64)> {
        (0..60).map(|k| (300 >> (k / 8), base - slope * (k / 8) as f64 + jitter * (k % 3) as f64)).collect()
    };
    let baseline = spread_over_seeds(&[seed(0.35, 0.02, 0.0), seed(0.35, 0.02, 0.01)]);
    let leap = spread_over_seeds(&[seed(0.36, 0.004, 0.0), seed(0.36, 0.004, -0.01)]);
    (baseline, leap)
}

#[test]
fn seeds_are_averaged_per_class() {
    let runs = vec![vec![(10, 0.2), (3, f64::NAN), (1, f64::NAN)], vec![(10, 0.4), (3, 0.1), (1, f64::NAN)]];
    let p = spread_over_seeds(&runs);
    // Class 2 has no finite value in any seed: left out. Class 1 counts its one finite seed.
    assert_eq!(p.len(), 2);
    assert_eq!((p[0].count, p[0].lo, p[0].hi), (10, 0.2, 0.4));
    assert!((p[0].mean - 0.3).abs() < 1e-15);
    assert_eq!((p[1].count, p[1].mean, p[1].lo, p[1].hi), (3, 0.1, 0.1, 0.1));
    assert!(spread_over_seeds(&[]).is_empty());
}

#[test]
fn writes_a_png() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("spread.png");
    let (b, l) = series();
    angular_std_vs_size(&path, &[("baseline", &b), ("LEAP", &l)], Some(100), "Angular std vs class size")
        .unwrap();
    let bytes = fs::read(&path).unwrap();
    assert!(bytes.len() > 1000, "PNG is {} bytes", bytes.len());
    assert_eq!(&bytes[..8], PNG_MAGIC);
    // IHDR: width and height.
    assert_eq!(&bytes[12..16], b"IHDR");
    let w = u32::from_be_bytes(bytes[16..20].try_into().unwrap());
    let h = u32::from_be_bytes(bytes[20..24].try_into().unwrap());
    assert_eq!((w, h), featcloud::plot::FIGURE_SIZE);
    // Nothing but the figure is left in the directory (the temp file was renamed).
    assert_eq!(fs::read_dir(dir.path()).unwrap().count(), 1);

    // Overwriting works; degenerate input (no series, unplottable points) still draws.
    let pt = |count, mean| SpreadPoint { count, mean, lo: mean, hi: mean };
    let odd = [
        pt(0u64, 0.3),
        pt(5, f64::NAN),
        pt(7, 0.2),
        SpreadPoint { count: 9, mean: 0.1, lo: f64::NAN, hi: 0.3 },
    ];
    angular_std_vs_size(&path, &[("odd", &odd)], Some(1_000_000), "").unwrap();
    angular_std_vs_size(&path, &[], None, "empty").unwrap();
    assert_eq!(&fs::read(&path).unwrap()[..8], PNG_MAGIC);
}

#[test]
fn bad_paths_are_errors_not_panics() {
    let dir = tempfile::tempdir().unwrap();
    let (b, _) = series();
    let missing = dir.path().join("no").join("such").join("dir.png");
    let r = angular_std_vs_size(&missing, &[("baseline", &b)], None, "t");
    assert!(matches!(r, Err(Error::Io { .. })), "{r:?}");
    assert!(!missing.exists());

    let not_png = dir.path().join("figure.jpg");
    let r = angular_std_vs_size(&not_png, &[("baseline", &b)], None, "t");
    assert!(matches!(r, Err(Error::InvalidConfig(_))), "{r:?}");
    assert_eq!(fs::read_dir(dir.path()).unwrap().count(), 0);
}
