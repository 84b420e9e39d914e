//! Compiles `kernels/*.cu` with NVRTC and embeds the results in the crate.
//!
//! For every `kernels/<stem>.cu` this produces PTX for a portable target
//! (compute_80) plus cubins for sm_80/86/89/90, captures ptxas's resource
//! report (registers, spills, stack, shared memory per kernel and arch), and
//! writes `$OUT_DIR/kernels.rs`: one Rust module per `.cu` with a constant per
//! `extern "C" __global__` entry point, so Rust never spells a kernel name.
//!
//! NVRTC is found as `nvrtc.rs` says. Without NVRTC the crate still builds (CPU only)
//! with one warning, unless `FEATCLOUD_REQUIRE_KERNELS=1`; `FEATCLOUD_NO_KERNELS=1` builds
//! CPU-only without looking for NVRTC (and wins over `FEATCLOUD_REQUIRE_KERNELS`). A kernel
//! that does not compile is always a build error with NVRTC's log.
//!
//! | module | what |
//! |---|---|
//! | `nvrtc` | loading NVRTC, compiling one source for one target |
//! | `scan` | entry points, launch bounds, argument structs, hot kernels from the source |
//! | `ptxas` | the resource report in NVRTC's log |
//! | `codegen` | `kernels.rs` and the emulator's registry |
//! | `emu` | the emulated device's C++ build (feature `emu`) |

mod codegen;
mod emu;
mod nvrtc;
mod ptxas;
mod scan;

use nvrtc::{Compiled, Target, NVRTC_HINT};
use std::env;
use std::fs;
use std::path::PathBuf;

/// Portable PTX target, and the archs we ship cubins for.
const PTX_ARCH: u32 = 80;
const CUBIN_ARCHS: [u32; 4] = [80, 86, 89, 90];

fn main() {
    let manifest = PathBuf::from(env::var("CARGO_MANIFEST_DIR").unwrap());
    let out_dir = PathBuf::from(env::var("OUT_DIR").unwrap());
    let kdir = manifest.join("kernels");
    println!("cargo:rerun-if-changed=kernels");
    for var in [
        "NVRTC_PATH",
        "CUDA_HOME",
        "CUDA_PATH",
        "VIRTUAL_ENV",
        "FEATCLOUD_REQUIRE_KERNELS",
        "FEATCLOUD_NO_KERNELS",
    ] {
        println!("cargo:rerun-if-env-changed={var}");
    }

    let mut files: Vec<PathBuf> = fs::read_dir(&kdir)
        .map(|rd| rd.filter_map(|e| e.ok().map(|e| e.path())).collect())
        .unwrap_or_default();
    files.sort();
    let headers: Vec<(String, String)> = files
        .iter()
        .filter(|p| p.extension().is_some_and(|e| e == "cuh"))
        .map(|p| (p.file_name().unwrap().to_string_lossy().into_owned(), scan::read(p)))
        .collect();
    let sources: Vec<scan::Src> = files
        .iter()
        .filter(|p| p.extension().is_some_and(|e| e == "cu"))
        .map(|p| scan::Src::read(p))
        .collect();
    for p in &files {
        println!("cargo:rerun-if-changed={}", p.display());
    }

    let require = env::var("FEATCLOUD_REQUIRE_KERNELS").is_ok_and(|v| v == "1");
    // `FEATCLOUD_NO_KERNELS=1`: a CPU-only build that does not look for NVRTC at all (the
    // fuzz targets in fuzz/, which parse files and need no kernels, build this way).
    let skip = env::var("FEATCLOUD_NO_KERNELS").is_ok_and(|v| v == "1");
    let nvrtc = if skip { None } else { nvrtc::find_nvrtc(&manifest) };
    if nvrtc.is_none() && !skip {
        if require {
            panic!("FEATCLOUD_REQUIRE_KERNELS=1 but NVRTC was not found; {NVRTC_HINT}");
        }
        // Look again on the next build once a .venv with the wheel appears.
        println!("cargo:rerun-if-changed={}", manifest.join(".venv").display());
        println!("cargo:warning=featcloud: NVRTC not found, building CPU-only (no CUDA kernels embedded); {NVRTC_HINT}");
    }

    // Compile every (source, target) pair on a few threads: NVRTC programs are independent.
    let mut targets = vec![Target::Ptx(PTX_ARCH)];
    targets.extend(CUBIN_ARCHS.iter().map(|&a| Target::Cubin(a)));
    let jobs: Vec<(usize, Target)> =
        (0..sources.len()).flat_map(|s| targets.iter().map(move |&t| (s, t))).collect();
    let mut results: Vec<Option<Compiled>> = (0..jobs.len()).map(|_| None).collect();
    if let Some(nv) = &nvrtc {
        let threads = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(2).min(8);
        let next = std::sync::atomic::AtomicUsize::new(0);
        let slots: Vec<std::sync::Mutex<Option<Compiled>>> =
            (0..jobs.len()).map(|_| std::sync::Mutex::new(None)).collect();
        std::thread::scope(|sc| {
            for _ in 0..threads {
                sc.spawn(|| loop {
                    let j = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    if j >= jobs.len() {
                        break;
                    }
                    let (s, t) = jobs[j];
                    *slots[j].lock().unwrap() = Some(nv.compile(&sources[s], &headers, t));
                });
            }
        });
        results = slots.into_iter().map(|m| m.into_inner().unwrap()).collect();
    }

    // Write the images, check the entry points against the PTX, parse the resources.
    let mut built: Vec<codegen::Built> = sources.iter().map(|_| codegen::Built::default()).collect();
    for (&(s, t), res) in jobs.iter().zip(&results) {
        let Some(res) = res else { continue };
        let src = &sources[s];
        let (bytes, log) = match res {
            Ok(v) => v,
            Err(log) => panic!("\nNVRTC failed to compile kernels/{}:\n{log}\n", src.file_name),
        };
        match t {
            Target::Ptx(_) => {
                let f = out_dir.join(format!("{}.ptx", src.stem));
                fs::write(&f, bytes).unwrap();
                src.check_against_ptx(&String::from_utf8_lossy(bytes));
                built[s].ptx = Some(f);
            }
            Target::Cubin(arch) => {
                let f = out_dir.join(format!("{}.sm_{arch}.cubin", src.stem));
                fs::write(&f, bytes).unwrap();
                built[s].cubins.push(codegen::Cubin {
                    arch,
                    file: f,
                    resources: ptxas::parse_ptxas_log(log),
                });
            }
        }
    }

    if let Some(nv) = &nvrtc {
        println!("cargo:rustc-env=FEATCLOUD_NVRTC={}.{}", nv.version.0, nv.version.1);
    }
    let header = codegen::Header {
        nvrtc: nvrtc.as_ref().map(|nv| (nv.version, nv.path.display().to_string())),
        ptx_arch: PTX_ARCH,
        cubin_archs: if nvrtc.is_some() { CUBIN_ARCHS.to_vec() } else { vec![] },
    };
    fs::write(out_dir.join("kernels.rs"), codegen::kernels_rs(&header, &sources, &built)).unwrap();
    // The emulated device's kernel registry: every entry point, from the same scan.
    let selftest = scan::Src::read(&manifest.join("emu/selftest.cu"));
    let (kernels_inc, sources_inc) = codegen::emu_registry(&sources, &selftest);
    fs::write(out_dir.join("emu_kernels.inc"), kernels_inc).unwrap();
    fs::write(out_dir.join("emu_sources.inc"), sources_inc).unwrap();
    if env::var_os("CARGO_FEATURE_EMU").is_some() {
        emu::build(&manifest, &out_dir);
    }
}
