//! ptxas's `-v` report (from NVRTC's log of a cubin compile): registers, spills, stack
//! and static shared memory per entry point.

#[derive(Default, Clone)]
pub struct Resources {
    pub registers: u32,
    pub spill_stores: u32,
    pub spill_loads: u32,
    pub stack: u32,
    pub shared: u32,
}

/// Parses ptxas `-v` lines into (kernel name, resources).
pub fn parse_ptxas_log(log: &str) -> Vec<(String, Resources)> {
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
