//! The angular-spread figure: a valid PNG, written atomically, errors instead of panics.

use std::fs;

use featcloud::plot::angular_std_vs_size;
use featcloud::Error;

const PNG_MAGIC: &[u8] = b"\x89PNG\r\n\x1a\n";

type Points = Vec<(u64, f64)>;

fn series() -> (Points, Points) {
    let baseline: Vec<(u64, f64)> = (0..60).map(|k| (300 >> (k / 8), 0.35 - 0.02 * (k / 8) as f64)).collect();
    let leap: Vec<(u64, f64)> = (0..60).map(|k| (300 >> (k / 8), 0.36 - 0.004 * (k / 8) as f64)).collect();
    (baseline, leap)
}

#[test]
fn writes_a_png() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("spread.png");
    let (b, l) = series();
    angular_std_vs_size(&path, &[("baseline", &b), ("LEAP", &l)], "Angular std vs class size").unwrap();
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
    let odd = [(0u64, 0.3), (5, f64::NAN), (7, 0.2)];
    angular_std_vs_size(&path, &[("odd", &odd)], "").unwrap();
    angular_std_vs_size(&path, &[], "empty").unwrap();
    assert_eq!(&fs::read(&path).unwrap()[..8], PNG_MAGIC);
}

#[test]
fn bad_paths_are_errors_not_panics() {
    let dir = tempfile::tempdir().unwrap();
    let (b, _) = series();
    let missing = dir.path().join("no").join("such").join("dir.png");
    let r = angular_std_vs_size(&missing, &[("baseline", &b)], "t");
    assert!(matches!(r, Err(Error::Io { .. })), "{r:?}");
    assert!(!missing.exists());

    let not_png = dir.path().join("figure.jpg");
    let r = angular_std_vs_size(&not_png, &[("baseline", &b)], "t");
    assert!(matches!(r, Err(Error::InvalidConfig(_))), "{r:?}");
    assert_eq!(fs::read_dir(dir.path()).unwrap().count(), 0);
}
