//! Compiles `kernels/*.cu` with NVRTC and embeds the results in the crate.
//!
//! For every `kernels/<stem>.cu` this produces PTX for a portable target
//! (compute_80) plus cubins for sm_80/86/89/90, captures ptxas's resource
//! report (registers, spills, stack, shared memory per kernel and arch), and
//! writes `$OUT_DIR/kernels.rs`: one Rust module per `.cu` with a constant per
//! `extern "C" __global__` entry point, so Rust never spells a kernel name.
//!
//! NVRTC is loaded at build time with `libloading` from, in order: `NVRTC_PATH`
//! (the library or its folder), `CUDA_HOME`/`CUDA_PATH`, `/usr/local/cuda`, the
//! PyPI wheel `nvidia-cuda-nvrtc-cu12` in `./.venv`, `$VIRTUAL_ENV` or the
//! active `python3`, then the system loader path. Without NVRTC the crate still
//! builds (CPU only) with one warning, unless `FEATCLOUD_REQUIRE_KERNELS=1`.
//! A kernel that does not compile is always a build error with NVRTC's log.

use std::env;
use std::ffi::{c_char, c_int, CStr, CString};
use std::fmt::Write as _;
use std::fs;
use std::path::{Path, PathBuf};

/// Portable PTX target, and the archs we ship cubins for.
const PTX_ARCH: u32 = 80;
const CUBIN_ARCHS: [u32; 4] = [80, 86, 89, 90];
const NVRTC_HINT: &str =
    "install it with `python3 -m venv .venv && .venv/bin/pip install nvidia-cuda-nvrtc-cu12==12.9.86` \
(or set NVRTC_PATH / CUDA_HOME), then rebuild";

type NvrtcProgram = *mut std::ffi::c_void;
/// One compile's outcome: (PTX or cubin bytes, NVRTC log), or the log of a failure.
type Compiled = Result<(Vec<u8>, String), String>;

/// The handful of NVRTC entry points we need, resolved from a dlopen'ed library.
struct Nvrtc {
    _lib: libloading::Library,
    path: PathBuf,
    version: (i32, i32),
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
    fn compile(&self, src: &Src, headers: &[(String, String)], arch: Target) -> Compiled {
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
enum Target {
    Ptx(u32),
    Cubin(u32),
}

struct Src {
    stem: String,
    file_name: String,
    text: String,
    entries: Vec<Entry>,
}

struct Entry {
    name: String,
    hot: bool,
    /// `__launch_bounds__`' max threads per block (1024 without one).
    max_threads: u32,
    /// The argument struct's name (`RowNormsArgs` for `const RowNormsArgs<float> a`).
    args: String,
}

#[derive(Default, Clone)]
struct Resources {
    registers: u32,
    spill_stores: u32,
    spill_loads: u32,
    stack: u32,
    shared: u32,
}

fn main() {
    let manifest = PathBuf::from(env::var("CARGO_MANIFEST_DIR").unwrap());
    let out_dir = PathBuf::from(env::var("OUT_DIR").unwrap());
    let kdir = manifest.join("kernels");
    println!("cargo:rerun-if-changed=kernels");
    for var in ["NVRTC_PATH", "CUDA_HOME", "CUDA_PATH", "VIRTUAL_ENV", "FEATCLOUD_REQUIRE_KERNELS"] {
        println!("cargo:rerun-if-env-changed={var}");
    }

    let mut files: Vec<PathBuf> = fs::read_dir(&kdir)
        .map(|rd| rd.filter_map(|e| e.ok().map(|e| e.path())).collect())
        .unwrap_or_default();
    files.sort();
    let headers: Vec<(String, String)> = files
        .iter()
        .filter(|p| p.extension().is_some_and(|e| e == "cuh"))
        .map(|p| (p.file_name().unwrap().to_string_lossy().into_owned(), read(p)))
        .collect();
    let sources: Vec<Src> = files
        .iter()
        .filter(|p| p.extension().is_some_and(|e| e == "cu"))
        .map(|p| {
            let text = read(p);
            let entries = scan_entries(&text);
            Src {
                stem: p.file_stem().unwrap().to_string_lossy().into_owned(),
                file_name: p.file_name().unwrap().to_string_lossy().into_owned(),
                text,
                entries,
            }
        })
        .collect();
    for p in &files {
        println!("cargo:rerun-if-changed={}", p.display());
    }

    let require = env::var("FEATCLOUD_REQUIRE_KERNELS").is_ok_and(|v| v == "1");
    let nvrtc = find_nvrtc(&manifest);
    if nvrtc.is_none() {
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

    let mut gen = String::new();
    let mut resources = String::new();
    let mut module_list = Vec::new();
    for (si, src) in sources.iter().enumerate() {
        let mut ptx_file = None;
        let mut cubins = Vec::new();
        for (ji, &(s, t)) in jobs.iter().enumerate() {
            if s != si {
                continue;
            }
            let Some(res) = &results[ji] else { continue };
            let (bytes, log) = match res {
                Ok(v) => v,
                Err(log) => panic!("\nNVRTC failed to compile kernels/{}:\n{log}\n", src.file_name),
            };
            match t {
                Target::Ptx(_) => {
                    let f = out_dir.join(format!("{}.ptx", src.stem));
                    fs::write(&f, bytes).unwrap();
                    check_entries_in_ptx(src, &String::from_utf8_lossy(bytes));
                    ptx_file = Some(f);
                }
                Target::Cubin(arch) => {
                    let f = out_dir.join(format!("{}.sm_{arch}.cubin", src.stem));
                    fs::write(&f, bytes).unwrap();
                    cubins.push((arch, f));
                    let table = parse_ptxas_log(log);
                    for e in &src.entries {
                        let r = table
                            .iter()
                            .find(|(n, _)| n == &e.name)
                            .map(|(_, r)| r.clone())
                            .unwrap_or_default();
                        writeln!(
                            resources,
                            "    KernelResources {{ module: {:?}, kernel: {:?}, arch: {arch}, registers: {}, spill_stores: {}, spill_loads: {}, stack_bytes: {}, shared_bytes: {}, hot: {} }},",
                            src.stem, e.name, r.registers, r.spill_stores, r.spill_loads, r.stack, r.shared, e.hot
                        )
                        .unwrap();
                    }
                }
            }
        }
        let ptx_expr = match &ptx_file {
            Some(f) => format!("include_str!({:?})", f.display().to_string()),
            None => "\"\"".to_string(),
        };
        let cubin_expr: Vec<String> = cubins
            .iter()
            .map(|(a, f)| format!("({a}, include_bytes!({:?}) as &[u8])", f.display().to_string()))
            .collect();
        writeln!(gen, "/// Kernels of `kernels/{}`.", src.file_name).unwrap();
        writeln!(gen, "pub mod {} {{", src.stem).unwrap();
        writeln!(gen, "    use super::{{Kernel, Module}};").unwrap();
        writeln!(gen, "    /// The compiled module.").unwrap();
        writeln!(
            gen,
            "    pub const MODULE: Module = Module {{ name: {:?}, ptx: {ptx_expr}, cubins: &[{}] }};",
            src.stem,
            cubin_expr.join(", ")
        )
        .unwrap();
        for e in &src.entries {
            writeln!(
                gen,
                "    /// Entry point `{}`{}.",
                e.name,
                if e.hot { " (hot: must not spill)" } else { "" }
            )
            .unwrap();
            writeln!(
                gen,
                "    pub const {}: Kernel = Kernel {{ module: &MODULE, name: {:?}, max_threads: {}, args: {:?} }};",
                e.name.to_uppercase(),
                e.name,
                e.max_threads,
                e.args
            )
            .unwrap();
        }
        writeln!(gen, "}}").unwrap();
        module_list.push(format!("&{}::MODULE", src.stem));
    }
    let (built, version, nvrtc_path) = match &nvrtc {
        Some(nv) => (
            true,
            format!("Some(({}, {}))", nv.version.0, nv.version.1),
            format!("{:?}", nv.path.display().to_string()),
        ),
        None => (false, "None".to_string(), "\"\"".to_string()),
    };
    if let Some(nv) = &nvrtc {
        println!("cargo:rustc-env=FEATCLOUD_NVRTC={}.{}", nv.version.0, nv.version.1);
    }
    let archs: Vec<String> = if built { CUBIN_ARCHS.iter().map(|a| a.to_string()).collect() } else { vec![] };
    let header = format!(
        "/// True when NVRTC was found at build time and the kernels below are embedded.\n\
         pub const KERNELS_BUILT: bool = {built};\n\
         /// NVRTC version (major, minor) that compiled the kernels.\n\
         pub const NVRTC_VERSION: Option<(i32, i32)> = {version};\n\
         /// The NVRTC library used at build time.\n\
         pub const NVRTC_LIBRARY: &str = {nvrtc_path};\n\
         /// Compute capability of the embedded PTX (JIT-compiled for newer GPUs).\n\
         pub const PTX_ARCH: u32 = {PTX_ARCH};\n\
         /// Archs with an embedded cubin (e.g. 90 = sm_90).\n\
         pub const CUBIN_ARCHS: &[u32] = &[{}];\n\
         /// Every embedded module.\n\
         pub const MODULES: &[&Module] = &[{}];\n\
         /// ptxas resource usage per kernel and arch, from the NVRTC log.\n\
         pub const RESOURCES: &[KernelResources] = &[\n{resources}];\n",
        archs.join(", "),
        module_list.join(", ")
    );
    fs::write(out_dir.join("kernels.rs"), header + &gen).unwrap();

    // The emulated device's kernel registry: every entry point, generated from the same
    // scan, so a new kernel needs no registration by hand.
    let mut inc = String::from("// Generated by build.rs: every extern \"C\" entry point of kernels/*.cu.\n");
    for src in &sources {
        for e in &src.entries {
            writeln!(inc, "FC_EMU_KERNEL({})", e.name).unwrap();
        }
    }
    fs::write(out_dir.join("emu_kernels.inc"), inc).unwrap();
    let includes: String = sources.iter().map(|s| format!("#include \"{}\"\n", s.file_name)).collect();
    fs::write(out_dir.join("emu_sources.inc"), includes).unwrap();
    if env::var_os("CARGO_FEATURE_EMU").is_some() {
        build_emulator(&manifest, &out_dir, &sources);
    }
}

/// Compiles `emu/device.cpp` (the emulator plus every kernel source, see emu/cuda_emu.h)
/// with the host C++ compiler into a static library linked into the crate. No FMA
/// contraction: each float operation rounds once, as the emulator's model assumes.
#[cfg(feature = "emu")]
fn build_emulator(manifest: &Path, out_dir: &Path, sources: &[Src]) {
    println!("cargo:rerun-if-changed=emu");
    let _ = sources;
    cc::Build::new()
        .cpp(true)
        .std("c++17")
        .opt_level(2)
        .debug(false)
        .flag("-ffp-contract=off")
        .flag_if_supported("-Wno-unknown-pragmas")
        .flag_if_supported("-Wno-unused-parameter")
        .flag_if_supported("-Wno-unused-function")
        .flag_if_supported("-Wno-unused-variable")
        .define("FC_EMU", None)
        .include(manifest.join("kernels"))
        .include(manifest.join("emu"))
        .include(out_dir)
        .file(manifest.join("emu/device.cpp"))
        .compile("featcloud_emu");
}

#[cfg(not(feature = "emu"))]
fn build_emulator(_: &Path, _: &Path, _: &[Src]) {}

fn read(p: &Path) -> String {
    fs::read_to_string(p).unwrap_or_else(|e| panic!("cannot read {}: {e}", p.display()))
}

/// Finds `extern "C" __global__ [__launch_bounds__(..)] void NAME(` declarations.
/// A `// hot` comment on the line above marks a kernel that must not spill.
fn scan_entries(text: &str) -> Vec<Entry> {
    let mut out = Vec::new();
    let lines: Vec<&str> = text.lines().collect();
    for (i, line) in lines.iter().enumerate() {
        let l = line.trim_start();
        if !l.starts_with("extern \"C\"") || !l.contains("__global__") {
            continue;
        }
        // The name is the identifier right before the first '(' that follows "void".
        let mut rest = String::new();
        for l2 in &lines[i..] {
            rest.push_str(l2);
            rest.push(' ');
            if l2.contains('(') && rest.contains("void") {
                break;
            }
        }
        let decl = rest;
        let rest = strip_launch_bounds(&decl);
        let Some(vpos) = rest.find(" void ") else { continue };
        let after = &rest[vpos + 6..];
        let name: String =
            after.trim_start().chars().take_while(|c| c.is_alphanumeric() || *c == '_').collect();
        if name.is_empty() {
            continue;
        }
        let hot = i > 0 && lines[i - 1].trim() == "// hot";
        let max_threads = launch_bounds(text, &decl, &name);
        let args = args_struct(text, &lines[i..], &name);
        out.push(Entry { name, hot, max_threads, args });
    }
    out
}

/// The name of the one argument struct the entry point takes: the parameter list after
/// its name, with a `#define` of the file expanded when the list is one macro. Panics
/// (a build error) unless there is exactly one `const Name[<...>] ident` parameter.
fn args_struct(text: &str, from: &[&str], name: &str) -> String {
    let joined = from.join(" ");
    let after = &joined[joined.find(&format!("{name}(")).expect("entry name") + name.len() + 1..];
    let mut params = after[..after.find(')').expect("parameter list")].trim().to_string();
    if params.chars().all(|c| c.is_alphanumeric() || c == '_') {
        let def = text
            .lines()
            .filter_map(|l| l.trim().strip_prefix("#define "))
            .find_map(|l| l.strip_prefix(params.as_str()).filter(|r| r.starts_with(' ')).map(str::trim));
        params =
            def.unwrap_or_else(|| panic!("kernel {name}: parameter macro {params} not found")).to_string();
    }
    let p = params.trim().strip_prefix("const ").unwrap_or(params.trim());
    let ty: String = p.chars().take_while(|c| c.is_alphanumeric() || *c == '_').collect();
    if ty.is_empty() || params.contains(',') && !params.contains('<') {
        panic!("kernel {name}: takes `{params}`; every kernel takes one argument struct (kernels/args.cuh)");
    }
    ty
}

/// The first argument of the entry's `__launch_bounds__(...)` (max threads per block),
/// a literal or a `#define NAME literal` of the same file; 1024 when there is none.
fn launch_bounds(text: &str, decl: &str, name: &str) -> u32 {
    let Some(p) = decl.find("__launch_bounds__(") else { return 1024 };
    let arg: String = decl[p + 18..].chars().take_while(|&c| c != ',' && c != ')').collect();
    let arg = arg.trim();
    if let Ok(v) = arg.parse::<u32>() {
        return v;
    }
    text.lines()
        .filter_map(|l| l.trim().strip_prefix("#define "))
        .find_map(|l| {
            let mut it = l.split_whitespace();
            (it.next() == Some(arg)).then(|| it.next().and_then(|v| v.parse::<u32>().ok())).flatten()
        })
        .unwrap_or_else(|| {
            panic!("kernel {name}: __launch_bounds__({arg}) is neither a literal nor a #define of one")
        })
}

/// Removes `__launch_bounds__(...)` (balanced parentheses) so the kernel name is easy to find.
fn strip_launch_bounds(s: &str) -> String {
    let mut out = s.to_string();
    while let Some(p) = out.find("__launch_bounds__") {
        let mut depth = 0;
        let mut end = out.len();
        for (i, ch) in out[p..].char_indices() {
            match ch {
                '(' => depth += 1,
                ')' => {
                    depth -= 1;
                    if depth == 0 {
                        end = p + i + 1;
                        break;
                    }
                }
                _ => {}
            }
        }
        out.replace_range(p..end, " ");
    }
    out
}

fn check_entries_in_ptx(src: &Src, ptx: &str) {
    for e in &src.entries {
        if !ptx.contains(&format!(".entry {}(", e.name)) {
            panic!(
                "kernels/{}: entry point `{}` was found in the source but not in the PTX (is it extern \"C\"?)",
                src.file_name, e.name
            );
        }
    }
}

/// Parses ptxas `-v` lines into (kernel name, resources).
fn parse_ptxas_log(log: &str) -> Vec<(String, Resources)> {
    let mut out: Vec<(String, Resources)> = Vec::new();
    let mut current: Option<usize> = None;
    for line in log.lines() {
        if let Some(p) = line.find("Compiling entry function '") {
            let rest = &line[p + 26..];
            let name = rest.split('\'').next().unwrap_or("").to_string();
            out.push((name, Resources::default()));
            current = Some(out.len() - 1);
        } else if let Some(p) = line.find("Function properties for ") {
            let name = line[p + 24..].trim().to_string();
            current = out.iter().position(|(n, _)| *n == name);
        } else if let Some(i) = current {
            let r = &mut out[i].1;
            if line.contains("bytes stack frame") {
                r.stack = number_before(line, "bytes stack frame");
                r.spill_stores = number_before(line, "bytes spill stores");
                r.spill_loads = number_before(line, "bytes spill loads");
            } else if line.contains("Used ") && line.contains("registers") {
                r.registers = number_before(line, "registers");
                r.shared = number_before(line, "bytes smem");
            }
        }
    }
    out
}

fn number_before(line: &str, key: &str) -> u32 {
    let Some(p) = line.find(key) else { return 0 };
    let head = line[..p].trim_end();
    let digits: String = head.chars().rev().take_while(|c| c.is_ascii_digit()).collect();
    digits.chars().rev().collect::<String>().parse().unwrap_or(0)
}

fn find_nvrtc(manifest: &Path) -> Option<Nvrtc> {
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
