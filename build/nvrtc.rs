//! NVRTC, loaded at build time with `libloading`: finding the library, and compiling one
//! translation unit to PTX or a cubin with its log.
//!
//! Search order: `NVRTC_PATH` (the library or its folder), `CUDA_HOME`/`CUDA_PATH`,
//! `/usr/local/cuda`, the PyPI wheel `nvidia-cuda-nvrtc-cu12` in `./.venv`, `$VIRTUAL_ENV`
//! or the active `python3`, then the system loader path.

use crate::scan::Src;
use std::env;
use std::ffi::{c_char, c_int, CStr, CString};
use std::fs;
use std::path::{Path, PathBuf};

/// What to tell the user when NVRTC is missing.
pub const NVRTC_HINT: &str =
    "install it with `python3 -m venv .venv && .venv/bin/pip install nvidia-cuda-nvrtc-cu12==12.9.86` \
(or set NVRTC_PATH / CUDA_HOME), then rebuild";

type NvrtcProgram = *mut std::ffi::c_void;
/// One compile's outcome: (PTX or cubin bytes, NVRTC log), or the log of a failure.
pub type Compiled = Result<(Vec<u8>, String), String>;

/// The handful of NVRTC entry points we need, resolved from a dlopen'ed library.
pub struct Nvrtc {
    _lib: libloading::Library,
    pub path: PathBuf,
    pub version: (i32, i32),
    create: unsafe extern "C" fn(
        *mut NvrtcProgram,
        *const c_char,
        *const c_char,
        c_int,
        *const *const c_char,
        *const *const c_char,
    ) -> c_int,
    compile: unsafe extern "C" fn(NvrtcProgram, c_int, *const *const c_char) -> c_int,
    log_size: unsafe extern "C" fn(NvrtcProgram, *mut usize) -> c_int,
    log: unsafe extern "C" fn(NvrtcProgram, *mut c_char) -> c_int,
    ptx_size: unsafe extern "C" fn(NvrtcProgram, *mut usize) -> c_int,
    ptx: unsafe extern "C" fn(NvrtcProgram, *mut c_char) -> c_int,
    cubin_size: unsafe extern "C" fn(NvrtcProgram, *mut usize) -> c_int,
    cubin: unsafe extern "C" fn(NvrtcProgram, *mut c_char) -> c_int,
    destroy: unsafe extern "C" fn(*mut NvrtcProgram) -> c_int,
    error_string: unsafe extern "C" fn(c_int) -> *const c_char,
}

impl Nvrtc {
    fn open(path: &Path) -> Option<Nvrtc> {
        // SAFETY: loading NVRTC runs its (trusted) initialisers only; every symbol
        // below is declared with the C signature documented in nvrtc.h.
        unsafe {
            let lib = libloading::Library::new(path).ok()?;
            macro_rules! sym {
                ($name:literal) => {
                    *lib.get(concat!($name, "\0").as_bytes()).ok()?
                };
            }
            let version_fn: unsafe extern "C" fn(*mut c_int, *mut c_int) -> c_int = sym!("nvrtcVersion");
            let (mut major, mut minor) = (0, 0);
            if version_fn(&mut major, &mut minor) != 0 {
                return None;
            }
            Some(Nvrtc {
                create: sym!("nvrtcCreateProgram"),
                compile: sym!("nvrtcCompileProgram"),
                log_size: sym!("nvrtcGetProgramLogSize"),
                log: sym!("nvrtcGetProgramLog"),
                ptx_size: sym!("nvrtcGetPTXSize"),
                ptx: sym!("nvrtcGetPTX"),
                cubin_size: sym!("nvrtcGetCUBINSize"),
                cubin: sym!("nvrtcGetCUBIN"),
                destroy: sym!("nvrtcDestroyProgram"),
                error_string: sym!("nvrtcGetErrorString"),
                path: path.to_path_buf(),
                version: (major, minor),
                _lib: lib,
            })
        }
    }

    fn err(&self, code: c_int) -> String {
        // SAFETY: nvrtcGetErrorString returns a static NUL-terminated string for any code.
        unsafe { CStr::from_ptr((self.error_string)(code)).to_string_lossy().into_owned() }
    }

    /// Compiles one translation unit; returns (PTX or cubin bytes, log) or the log as error.
    pub fn compile(&self, src: &Src, headers: &[(String, String)], arch: Target) -> Compiled {
        let c_src = CString::new(src.text.as_str()).unwrap();
        let c_name = CString::new(src.file_name.as_str()).unwrap();
        let h_src: Vec<CString> = headers.iter().map(|(_, t)| CString::new(t.as_str()).unwrap()).collect();
        let h_name: Vec<CString> = headers.iter().map(|(n, _)| CString::new(n.as_str()).unwrap()).collect();
        let h_src_p: Vec<*const c_char> = h_src.iter().map(|s| s.as_ptr()).collect();
        let h_name_p: Vec<*const c_char> = h_name.iter().map(|s| s.as_ptr()).collect();
        let arch_opt = match arch {
            Target::Ptx(a) => format!("--gpu-architecture=compute_{a}"),
            Target::Cubin(a) => format!("--gpu-architecture=sm_{a}"),
        };
        let opts: Vec<CString> = [
            arch_opt.as_str(),
            "--std=c++17",
            "--device-as-default-execution-space",
            "--ptxas-options=-v",
            "-lineinfo",
            "--fmad=true",
            "--extra-device-vectorization",
        ]
        .iter()
        .map(|s| CString::new(*s).unwrap())
        .collect();
        let opts_p: Vec<*const c_char> = opts.iter().map(|s| s.as_ptr()).collect();
        let mut prog: NvrtcProgram = std::ptr::null_mut();
        // SAFETY: all pointers are valid NUL-terminated strings that outlive the calls;
        // the program is destroyed on every path below.
        unsafe {
            let rc = (self.create)(
                &mut prog,
                c_src.as_ptr(),
                c_name.as_ptr(),
                headers.len() as c_int,
                h_src_p.as_ptr(),
                h_name_p.as_ptr(),
            );
            if rc != 0 {
                return Err(format!("nvrtcCreateProgram: {}", self.err(rc)));
            }
            let rc = (self.compile)(prog, opts_p.len() as c_int, opts_p.as_ptr());
            let mut n = 0usize;
            (self.log_size)(prog, &mut n);
            let mut log = vec![0u8; n.max(1)];
            (self.log)(prog, log.as_mut_ptr() as *mut c_char);
            let log = String::from_utf8_lossy(&log).trim_end_matches('\0').to_string();
            if rc != 0 {
                (self.destroy)(&mut prog);
                return Err(format!("{} ({arch_opt})\n{log}", self.err(rc)));
            }
            let (size_fn, get_fn) = match arch {
                Target::Ptx(_) => (self.ptx_size, self.ptx),
                Target::Cubin(_) => (self.cubin_size, self.cubin),
            };
            let mut size = 0usize;
            size_fn(prog, &mut size);
            let mut out = vec![0u8; size];
            get_fn(prog, out.as_mut_ptr() as *mut c_char);
            (self.destroy)(&mut prog);
            if let Target::Ptx(_) = arch {
                // NVRTC's PTX size includes the trailing NUL; include_str! wants text.
                while out.last() == Some(&0) {
                    out.pop();
                }
            }
            Ok((out, log))
        }
    }
}

#[derive(Clone, Copy)]
pub enum Target {
    Ptx(u32),
    Cubin(u32),
}

/// The first NVRTC that loads, in the search order above.
pub fn find_nvrtc(manifest: &Path) -> Option<Nvrtc> {
    let names = ["libnvrtc.so", "libnvrtc.so.13", "libnvrtc.so.12"];
    let mut dirs: Vec<PathBuf> = Vec::new();
    if let Ok(p) = env::var("NVRTC_PATH") {
        let p = PathBuf::from(p);
        if p.is_file() {
            if let Some(nv) = Nvrtc::open(&p) {
                return Some(nv);
            }
            println!("cargo:warning=featcloud: NVRTC_PATH={} could not be loaded as NVRTC", p.display());
        } else {
            dirs.push(p);
        }
    }
    for var in ["CUDA_HOME", "CUDA_PATH"] {
        if let Ok(p) = env::var(var) {
            dirs.push(PathBuf::from(&p).join("lib64"));
            dirs.push(PathBuf::from(&p).join("lib"));
        }
    }
    dirs.push(PathBuf::from("/usr/local/cuda/lib64"));
    let mut venvs = vec![manifest.join(".venv")];
    if let Ok(v) = env::var("VIRTUAL_ENV") {
        venvs.push(PathBuf::from(v));
    }
    for venv in venvs {
        for lib in ["lib", "lib64"] {
            if let Ok(rd) = fs::read_dir(venv.join(lib)) {
                for e in rd.flatten() {
                    dirs.push(e.path().join("site-packages/nvidia/cuda_nvrtc/lib"));
                }
            }
        }
    }
    if let Some(d) = python_wheel_dir() {
        dirs.push(d);
    }
    for d in &dirs {
        for n in names {
            let p = d.join(n);
            if p.exists() {
                if let Some(nv) = Nvrtc::open(&p) {
                    return Some(nv);
                }
            }
        }
    }
    // Last, whatever the system loader finds on its own.
    names.iter().find_map(|n| Nvrtc::open(Path::new(n)))
}

/// The wheel's library folder as the active `python3` sees it, if installed there.
fn python_wheel_dir() -> Option<PathBuf> {
    let code = "import importlib.util as u\ns=u.find_spec('nvidia.cuda_nvrtc')\nprint(list(s.submodule_search_locations)[0] if s else '')";
    let out = std::process::Command::new("python3").args(["-c", code]).output().ok()?;
    let dir = String::from_utf8_lossy(&out.stdout).trim().to_string();
    (!dir.is_empty()).then(|| PathBuf::from(dir).join("lib"))
}
