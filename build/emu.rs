//! The emulated device (cargo feature `emu`): `emu/device.cpp`, which includes every
//! kernel source through the generated `emu_sources.inc` / `emu_kernels.inc` (see
//! emu/cuda_emu.h), compiled with the host C++ compiler into a static library linked
//! into the crate.

use std::path::Path;

/// Builds the emulator library. No FMA contraction: each float operation rounds once,
/// as the emulator's model assumes.
#[cfg(feature = "emu")]
pub fn build(manifest: &Path, out_dir: &Path) {
    println!("cargo:rerun-if-changed=emu");
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

/// Without the `emu` feature there is nothing to build.
#[cfg(not(feature = "emu"))]
pub fn build(_: &Path, _: &Path) {}
