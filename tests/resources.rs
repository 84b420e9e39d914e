//! ptxas resource usage of every embedded kernel (from `kernels::RESOURCES`, which
//! the build script (`build/ptxas.rs`) parses out of NVRTC's `--ptxas-options=-v` log).
//!
//! Runs without a GPU: it reads what the build compiled. Asserts that every kernel
//! has an entry for every embedded cubin arch and that no hot kernel (named by its
//! file's `// Hot kernels: ...` line) spills on any arch, and prints the table
//! (`cargo test --test resources -- --nocapture`).

use featcloud::cuda::kernels::{CUBIN_ARCHS, KERNELS_BUILT, RESOURCES};
use std::collections::BTreeMap;

#[test]
fn every_kernel_has_resources_for_every_arch() {
    if !KERNELS_BUILT {
        eprintln!("skipped: the crate was built without NVRTC (no kernels embedded)");
        return;
    }
    let mut archs: BTreeMap<(&str, &str), Vec<u32>> = BTreeMap::new();
    for r in RESOURCES {
        archs.entry((r.module, r.kernel)).or_default().push(r.arch);
    }
    assert!(!archs.is_empty(), "no kernel resources recorded");
    for ((module, kernel), mut a) in archs {
        a.sort_unstable();
        let mut want = CUBIN_ARCHS.to_vec();
        want.sort_unstable();
        assert_eq!(a, want, "{module}::{kernel} has resource entries for archs {a:?}, expected {want:?}");
    }
    for r in RESOURCES {
        assert!(r.registers > 0, "{}::{} sm_{}: no register count parsed", r.module, r.kernel, r.arch);
    }
}

#[test]
fn hot_kernels_do_not_spill() {
    if !KERNELS_BUILT {
        eprintln!("skipped: the crate was built without NVRTC (no kernels embedded)");
        return;
    }
    let spilling: Vec<String> = RESOURCES
        .iter()
        .filter(|r| r.hot && (r.spill_stores > 0 || r.spill_loads > 0))
        .map(|r| {
            format!(
                "{}::{} sm_{}: {} B spill stores, {} B spill loads ({} registers)",
                r.module, r.kernel, r.arch, r.spill_stores, r.spill_loads, r.registers
            )
        })
        .collect();
    assert!(spilling.is_empty(), "hot kernels spill:\n{}", spilling.join("\n"));
}

#[test]
fn info_prints_one_table_row_per_kernel_and_arch() {
    if !KERNELS_BUILT {
        eprintln!("skipped: the crate was built without NVRTC (no kernels embedded)");
        return;
    }
    let table = featcloud::cli::info::resource_table(None);
    println!("{table}");
    let rows: Vec<&str> = table.lines().skip(1).collect();
    assert_eq!(rows.len(), RESOURCES.len());
    for (row, r) in rows.iter().zip(RESOURCES) {
        let cols: Vec<&str> = row.split_whitespace().collect();
        assert_eq!(&cols[..4], &[r.module, r.kernel, &format!("sm_{}", r.arch), &r.registers.to_string()]);
    }
    assert_eq!(featcloud::cli::info::resource_table(Some(90)).lines().count() - 1, RESOURCES.len() / 4);
}
