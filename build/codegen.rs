//! Code generation: `$OUT_DIR/kernels.rs` (included by `src/cuda/kernels.rs`) and the
//! emulator's kernel registry (`emu_kernels.inc`, `emu_sources.inc`, included by
//! `emu/device.cpp`), all from the source scan, so no kernel is registered by hand.

use crate::ptxas::Resources;
use crate::scan::{Src, DTYPES};
use std::fmt::Write as _;
use std::path::PathBuf;

/// What the NVRTC compiles of one source produced.
#[derive(Default)]
pub struct Built {
    /// The PTX file, when NVRTC ran.
    pub ptx: Option<PathBuf>,
    /// One per arch, in arch order.
    pub cubins: Vec<Cubin>,
}

/// One arch's cubin file and ptxas's resources per entry point.
pub struct Cubin {
    pub arch: u32,
    pub file: PathBuf,
    pub resources: Vec<(String, Resources)>,
}

/// The build's facts that `kernels.rs` states besides the modules.
pub struct Header {
    /// (major, minor) and library path of the NVRTC that compiled the kernels.
    pub nvrtc: Option<((i32, i32), String)>,
    pub ptx_arch: u32,
    /// Archs with a cubin (empty without NVRTC).
    pub cubin_archs: Vec<u32>,
}

/// `kernels.rs`: the build facts, `MODULES`, `RESOURCES`, then one module per source
/// with a `Kernel` constant per entry point and a `ByDtype<Kernel>` per dtype family.
pub fn kernels_rs(header: &Header, sources: &[Src], built: &[Built]) -> String {
    let mut gen = String::new();
    let mut resources = String::new();
    for (src, b) in sources.iter().zip(built) {
        for Cubin { arch, resources: table, .. } in &b.cubins {
            for e in &src.entries {
                let r = table.iter().find(|(n, _)| n == &e.name).map(|(_, r)| r.clone()).unwrap_or_default();
                writeln!(
                    resources,
                    "    KernelResources {{ module: {:?}, kernel: {:?}, arch: {arch}, registers: {}, spill_stores: {}, spill_loads: {}, stack_bytes: {}, shared_bytes: {}, hot: {} }},",
                    src.stem, e.name, r.registers, r.spill_stores, r.spill_loads, r.stack, r.shared, e.hot
                )
                .unwrap();
            }
        }
        module(&mut gen, src, b);
    }
    let modules: Vec<String> = sources.iter().map(|s| format!("&{}::MODULE", s.stem)).collect();
    let (built, version, library) = match &header.nvrtc {
        Some(((major, minor), path)) => (true, format!("Some(({major}, {minor}))"), format!("{path:?}")),
        None => (false, "None".to_string(), "\"\"".to_string()),
    };
    let archs: Vec<String> = header.cubin_archs.iter().map(u32::to_string).collect();
    format!(
        "/// True when NVRTC was found at build time and the kernels below are embedded.\n\
         pub const KERNELS_BUILT: bool = {built};\n\
         /// NVRTC version (major, minor) that compiled the kernels.\n\
         pub const NVRTC_VERSION: Option<(i32, i32)> = {version};\n\
         /// The NVRTC library used at build time.\n\
         pub const NVRTC_LIBRARY: &str = {library};\n\
         /// Compute capability of the embedded PTX (JIT-compiled for newer GPUs).\n\
         pub const PTX_ARCH: u32 = {};\n\
         /// Archs with an embedded cubin (e.g. 90 = sm_90).\n\
         pub const CUBIN_ARCHS: &[u32] = &[{}];\n\
         /// Every embedded module.\n\
         pub const MODULES: &[&Module] = &[{}];\n\
         /// ptxas resource usage per kernel and arch, from the NVRTC log.\n\
         pub const RESOURCES: &[KernelResources] = &[\n{resources}];\n{gen}",
        header.ptx_arch,
        archs.join(", "),
        modules.join(", ")
    )
}

/// One source's Rust module.
fn module(gen: &mut String, src: &Src, b: &Built) {
    let ptx = match &b.ptx {
        Some(f) => format!("include_str!({:?})", f.display().to_string()),
        None => "\"\"".to_string(),
    };
    let cubins: Vec<String> = b
        .cubins
        .iter()
        .map(|c| format!("({}, include_bytes!({:?}) as &[u8])", c.arch, c.file.display().to_string()))
        .collect();
    let families = dtype_families(src);
    writeln!(gen, "/// Kernels of `kernels/{}`.", src.file_name).unwrap();
    writeln!(gen, "pub mod {} {{", src.stem).unwrap();
    let by_dtype = if families.is_empty() { "" } else { "ByDtype, " };
    writeln!(gen, "    use super::{{{by_dtype}Kernel, Module}};").unwrap();
    writeln!(gen, "    /// The compiled module.").unwrap();
    writeln!(
        gen,
        "    pub const MODULE: Module = Module {{ name: {:?}, ptx: {ptx}, cubins: &[{}] }};",
        src.stem,
        cubins.join(", ")
    )
    .unwrap();
    for e in &src.entries {
        let hot = if e.hot { " (hot: must not spill)" } else { "" };
        writeln!(gen, "    /// Entry point `{}`{hot}.", e.name).unwrap();
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
    for f in families {
        let up = f.to_uppercase();
        writeln!(gen, "    /// `{f}_<dtype>`: the entry point per storage dtype.").unwrap();
        let fields: Vec<String> =
            DTYPES.iter().map(|dt| format!("{dt}: {up}_{}", dt.to_uppercase())).collect();
        writeln!(gen, "    pub const {up}: ByDtype<Kernel> = ByDtype {{ {} }};", fields.join(", ")).unwrap();
    }
    writeln!(gen, "}}").unwrap();
}

/// The stems `x` with entry points `x_f32`, `x_bf16` and `x_f16` (in source order).
fn dtype_families(src: &Src) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    for e in &src.entries {
        let Some(stem) = e.name.strip_suffix("_f32") else { continue };
        if DTYPES.iter().all(|dt| src.entries.iter().any(|x| x.name == format!("{stem}_{dt}"))) {
            if src.entries.iter().any(|x| x.name == stem) {
                panic!(
                    "kernels/{}: entry point `{stem}` clashes with its dtype family's table",
                    src.file_name
                );
            }
            out.push(stem.to_string());
        }
    }
    out
}

/// `emu_kernels.inc` (one `FC_EMU_KERNEL(name)` per entry point of the sources, then of
/// emu/selftest.cu) and `emu_sources.inc` (one `#include` per source).
pub fn emu_registry(sources: &[Src], selftest: &Src) -> (String, String) {
    let mut inc = String::from(
        "// Generated by build/codegen.rs: every extern \"C\" entry point of kernels/*.cu and emu/selftest.cu.\n",
    );
    for e in sources.iter().chain([selftest]).flat_map(|s| &s.entries) {
        writeln!(inc, "FC_EMU_KERNEL({})", e.name).unwrap();
    }
    let includes = sources.iter().map(|s| format!("#include \"{}\"\n", s.file_name)).collect();
    (inc, includes)
}
