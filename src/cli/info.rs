//! `featcloud info`: what was built in and what device is here.

use crate::cuda::{self, kernels};

/// Arguments of `featcloud info`.
#[derive(Debug, Clone, clap::Args)]
pub struct Args {
    /// Show only this arch in the resource table (e.g. 90); all by default.
    #[arg(long)]
    pub arch: Option<u32>,
}

/// The ptxas resource table as text, one line per kernel and arch.
pub fn resource_table(arch: Option<u32>) -> String {
    let mut s = format!(
        "{:<12} {:<34} {:>5} {:>5} {:>7} {:>7} {:>6} {:>7}  {}\n",
        "module", "kernel", "arch", "regs", "spill_st", "spill_ld", "stack", "smem", "hot"
    );
    for r in kernels::RESOURCES.iter().filter(|r| arch.is_none_or(|a| a == r.arch)) {
        s.push_str(&format!(
            "{:<12} {:<34} {:>5} {:>5} {:>7} {:>7} {:>6} {:>7}  {}\n",
            r.module,
            r.kernel,
            format!("sm_{}", r.arch),
            r.registers,
            r.spill_stores,
            r.spill_loads,
            r.stack_bytes,
            r.shared_bytes,
            if r.hot { "hot" } else { "" }
        ));
    }
    s
}

/// Runs `featcloud info`. Always exits 0 when the information could be printed.
pub fn run(args: &Args) -> anyhow::Result<()> {
    println!("featcloud {}", env!("CARGO_PKG_VERSION"));
    if kernels::KERNELS_BUILT {
        let (maj, min) = kernels::NVRTC_VERSION.unwrap_or((0, 0));
        let archs: Vec<String> = kernels::CUBIN_ARCHS.iter().map(|a| format!("sm_{a}")).collect();
        println!("kernels: built with NVRTC {maj}.{min} ({})", kernels::NVRTC_LIBRARY);
        println!("embedded: compute_{} PTX + cubins for {}", kernels::PTX_ARCH, archs.join(", "));
        let names: Vec<&str> = kernels::MODULES.iter().map(|m| m.name).collect();
        println!("modules: {}", names.join(", "));
    } else {
        println!("kernels: NOT built (NVRTC was not found at build time; CPU backend only)");
    }
    match cuda::Device::new(0) {
        Ok(dev) => {
            let i = dev.info();
            println!(
                "device 0: {} (compute capability {}.{}, {} SMs, {:.1} GiB, driver CUDA {}.{}), using {}",
                i.name,
                i.compute_capability.0,
                i.compute_capability.1,
                i.sm_count,
                i.total_memory as f64 / (1u64 << 30) as f64,
                i.driver_version / 1000,
                (i.driver_version % 1000) / 10,
                i.code
            );
        }
        Err(e) => println!("device: none usable ({e}); the CPU backend will be used"),
    }
    if kernels::KERNELS_BUILT {
        println!("\nptxas resource usage per kernel (registers, spill bytes, stack, static shared memory):");
        print!("{}", resource_table(args.arch));
    }
    Ok(())
}
