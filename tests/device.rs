//! Device start-up and the row-norm kernel (the pipeline's first real kernel).

use featcloud::cuda::{self, kernels, norms, Device, Tensor};
use featcloud::Error;

#[test]
fn start_up_without_gpu_is_a_typed_error_not_a_panic() {
    match Device::new(0) {
        Ok(dev) => {
            let (maj, _) = dev.info().compute_capability;
            assert!(maj >= 8, "Device::new accepted a GPU below sm_80");
        }
        Err(Error::NoDriver(_) | Error::NoDevice(_) | Error::UnsupportedDevice { .. }) => {
            if !cuda::driver_present() {
                assert!(matches!(Device::new(0), Err(Error::NoDriver(_))));
            }
        }
        Err(e) => panic!("unexpected start-up error kind: {e}"),
    }
    // An ordinal that cannot exist is an error, whatever the machine.
    assert!(Device::new(10_000).is_err());
}

#[test]
fn every_module_has_an_entry_point_and_code_when_built() {
    if !kernels::KERNELS_BUILT {
        eprintln!("skipped: kernels not built");
        return;
    }
    assert!(!kernels::MODULES.is_empty());
    for m in kernels::MODULES {
        assert!(m.ptx.contains(".entry"), "module {} has no PTX entry", m.name);
        let archs: Vec<u32> = m.cubins.iter().map(|(a, _)| *a).collect();
        assert_eq!(archs, kernels::CUBIN_ARCHS, "module {} cubins", m.name);
        for (_, bin) in m.cubins {
            assert_eq!(&bin[..4], b"\x7fELF", "module {} cubin is not an ELF image", m.name);
        }
    }
    assert!(kernels::norms::MODULE.ptx.contains(".entry row_norms_fwd_bf16("));
}

fn host_norms(x: &[f32], d: usize) -> Vec<f64> {
    x.chunks(d).map(|r| r.iter().map(|&v| (v as f64) * (v as f64)).sum::<f64>().sqrt()).collect()
}

fn check_norms<T: cuda::DeviceElem>(dev: &Device, rows: usize, d: usize, tol: f64) {
    let x: Vec<f32> = (0..rows * d).map(|i| ((i * 7919 % 1013) as f32 / 1013.0 - 0.5) * 3.0).collect();
    let x: Vec<f32> = x.iter().map(|&v| T::from_f32(v).to_f32()).collect();
    let mut xs = x.clone();
    if rows > 2 {
        xs[d..2 * d].iter_mut().for_each(|v| *v = 0.0); // a zero row: inv uses the 1e-12 floor
    }
    let t = Tensor::<T>::from_f32(dev, &xs, &[rows, d]).unwrap();
    let (norm, inv) = norms::row_norms(dev, &t).unwrap();
    let (norm, inv) = (norm.to_host(dev).unwrap(), inv.to_host(dev).unwrap());
    for (r, want) in host_norms(&xs, d).into_iter().enumerate() {
        let got = norm[r] as f64;
        assert!((got - want).abs() <= tol * want.max(1e-30), "row {r}: {got} vs {want}");
        let want_inv = 1.0 / want.max(1e-12);
        assert!(((inv[r] as f64) - want_inv).abs() <= tol * want_inv, "inv row {r}");
    }
}

#[test]
fn row_norms_match_host_on_gpu() {
    let Some(dev) = cuda::test_device() else { return };
    for &(rows, d) in &[(1, 1), (3, 8), (37, 13), (1000, 512), (5, 2048)] {
        check_norms::<f32>(&dev, rows, d, 1e-5);
        check_norms::<half::bf16>(&dev, rows, d, 1e-5);
        check_norms::<half::f16>(&dev, rows, d, 1e-5);
    }
    let empty = Tensor::<f32>::zeros(&dev, &[0, 4]).unwrap();
    assert!(matches!(norms::row_norms(&dev, &empty), Err(Error::Empty(_))));
}

#[test]
fn info_exits_zero_and_reports_kernels_and_device() {
    let bin = env!("CARGO_BIN_EXE_featcloud");
    if !std::path::Path::new(bin).exists() {
        // Only in the GPU bundle, where test binaries run away from their build tree.
        eprintln!("skipped: {bin} is not here (the bundle's run.sh runs `featcloud info` itself)");
        return;
    }
    let out = std::process::Command::new(bin).arg("info").output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    assert!(stdout.contains("device"), "{stdout}");
    if kernels::KERNELS_BUILT {
        let (maj, min) = kernels::NVRTC_VERSION.unwrap();
        assert!(stdout.contains(&format!("NVRTC {maj}.{min}")), "{stdout}");
        assert!(stdout.contains("row_norms_fwd_bf16") && stdout.contains("sm_90"), "{stdout}");
    } else {
        assert!(stdout.contains("NOT built"), "{stdout}");
    }
    if Device::new(0).is_err() {
        assert!(stdout.contains("none usable"), "{stdout}");
    }
}

/// `featcloud smoke` runs what the kernel wrappers register (no list in the CLI); a
/// registration the linker dropped, or a wrapper that forgot it, fails here.
#[test]
fn smoke_checks_are_registered_by_the_kernel_wrappers() {
    let families: Vec<&str> = featcloud::cuda::smoke_checks().iter().map(|c| c.family).collect();
    assert_eq!(families, ["head", "stats"]);
}
