//! The source scan: every entry point of a `kernels/<stem>.cu` with its launch bound, its
//! argument struct and whether it is hot, read from the source text (the crate must know
//! the names without NVRTC too: the emulator and the CPU-only build need them).
//!
//! An entry point is written one of three ways (kernels/common.cuh defines the macros):
//! - `FC_DTYPES(name, (bounds), Args, body)`: `name_f32`, `name_bf16`, `name_f16`;
//! - `FC_ENTRY(name, T, (bounds), Args, body)`: one entry point `name`;
//! - `extern "C" __global__ void [__launch_bounds__(..)] name(const Args[<..>] a)` by hand.
//!
//! Hot kernels (ptxas must not spill them, `tests/resources.rs`) are named by one line
//! of the file, `// Hot kernels (...): pattern, pattern`, a pattern being a name or a
//! prefix followed by `*`.
//! The names found here are checked against the PTX's `.entry` lines both ways, so a
//! stamp the scan misses is a build error, not a missing constant.

use std::fs;
use std::path::Path;

/// Storage dtype suffixes, in the order of `FC_DTYPES` and of `ByDtype`'s fields.
pub const DTYPES: [&str; 3] = ["f32", "bf16", "f16"];

/// One `kernels/<stem>.cu`.
pub struct Src {
    pub stem: String,
    pub file_name: String,
    pub text: String,
    pub entries: Vec<Entry>,
}

/// One `extern "C"` entry point.
pub struct Entry {
    pub name: String,
    pub hot: bool,
    /// `__launch_bounds__`' max threads per block (1024 without one).
    pub max_threads: u32,
    /// The argument struct's name (`RowNormsArgs` for `const RowNormsArgs<float> a`).
    pub args: String,
}

impl Src {
    /// Reads and scans `path`.
    pub fn read(path: &Path) -> Src {
        let text = read(path);
        let file_name = path.file_name().unwrap().to_string_lossy().into_owned();
        let mut entries = scan_entries(&text);
        mark_hot(&file_name, &text, &mut entries);
        Src { stem: path.file_stem().unwrap().to_string_lossy().into_owned(), file_name, text, entries }
    }

    /// Panics (a build error) unless the PTX's `.entry` lines are exactly the scanned entries.
    pub fn check_against_ptx(&self, ptx: &str) {
        for e in &self.entries {
            if !ptx.contains(&format!(".entry {}(", e.name)) {
                panic!(
                    "kernels/{}: entry point `{}` was found in the source but not in the PTX (is it extern \"C\"?)",
                    self.file_name, e.name
                );
            }
        }
        for line in ptx.lines() {
            let Some(rest) = line.trim_start().strip_prefix(".visible .entry ") else { continue };
            let name = rest.split('(').next().unwrap_or("").trim();
            if !self.entries.iter().any(|e| e.name == name) {
                panic!(
                    "kernels/{}: the PTX has entry point `{name}` that the source scan did not find; write it \
                     with FC_DTYPES / FC_ENTRY (kernels/common.cuh) or as one `extern \"C\" __global__` line",
                    self.file_name
                );
            }
        }
    }
}

pub fn read(p: &Path) -> String {
    fs::read_to_string(p).unwrap_or_else(|e| panic!("cannot read {}: {e}", p.display()))
}

/// Finds the stamp macros and the hand-written `extern "C" __global__ ... NAME(` declarations.
fn scan_entries(text: &str) -> Vec<Entry> {
    let mut out = Vec::new();
    let lines: Vec<&str> = text.lines().collect();
    for (i, line) in lines.iter().enumerate() {
        let l = line.trim_start();
        // A stamp may continue on the next lines (its parentheses say where it ends).
        let stamp = || lines[i..].iter().take(8).map(|l| l.trim()).collect::<Vec<_>>().join(" ");
        if l.starts_with("FC_DTYPES(") {
            let a = macro_args(&stamp()["FC_DTYPES(".len()..], "FC_DTYPES");
            let (bounds, ty) = (launch_bound(text, &a[1], &a[0]), ident(&a[2]));
            for dt in DTYPES {
                out.push(Entry {
                    name: format!("{}_{dt}", a[0]),
                    hot: false,
                    max_threads: bounds,
                    args: ty.clone(),
                });
            }
        } else if l.starts_with("FC_ENTRY(") {
            let a = macro_args(&stamp()["FC_ENTRY(".len()..], "FC_ENTRY");
            let max_threads = launch_bound(text, &a[2], &a[0]);
            out.push(Entry { name: a[0].clone(), hot: false, max_threads, args: ident(&a[3]) });
        } else if l.starts_with("extern \"C\"") && l.contains("__global__") {
            out.extend(hand_written(text, &lines[i..]));
        }
    }
    out
}

/// The arguments of a macro call (`rest` follows its opening parenthesis), split at
/// top-level commas; at least the four a stamp needs.
fn macro_args(rest: &str, what: &str) -> Vec<String> {
    let (mut depth, mut cur, mut out) = (0, String::new(), Vec::new());
    for ch in rest.chars() {
        match ch {
            '(' => depth += 1,
            ')' if depth == 0 => {
                out.push(cur.trim().to_string());
                break;
            }
            ')' => depth -= 1,
            ',' if depth == 0 => {
                out.push(cur.trim().to_string());
                cur.clear();
                continue;
            }
            _ => {}
        }
        cur.push(ch);
    }
    if out.len() < 4 || out[0].is_empty() {
        panic!(
            "{what}({rest}: a stamp has at least four arguments and ends within 8 lines (kernels/common.cuh)"
        );
    }
    out
}

/// The leading identifier of `s` (`RowNormsArgs` of `RowNormsArgs<T>`).
fn ident(s: &str) -> String {
    s.trim().chars().take_while(|c| c.is_alphanumeric() || *c == '_').collect()
}

/// A stamp's `(threads[, min blocks])`: the thread count, a literal or a `#define` of one.
fn launch_bound(text: &str, bounds: &str, name: &str) -> u32 {
    let inner = bounds.trim().trim_start_matches('(').trim_end_matches(')');
    define_or_literal(text, inner.split(',').next().unwrap_or("").trim(), name)
}

/// A hand-written `extern "C" __global__ [__launch_bounds__(..)] void NAME(const Args a)`.
fn hand_written(text: &str, from: &[&str]) -> Option<Entry> {
    // The name is the identifier right before the first '(' that follows "void".
    let mut decl = String::new();
    for l2 in from {
        decl.push_str(l2);
        decl.push(' ');
        if l2.contains('(') && decl.contains("void") {
            break;
        }
    }
    let rest = strip_launch_bounds(&decl);
    let vpos = rest.find(" void ")?;
    let name: String =
        rest[vpos + 6..].trim_start().chars().take_while(|c| c.is_alphanumeric() || *c == '_').collect();
    if name.is_empty() {
        return None;
    }
    let max_threads = match decl.find("__launch_bounds__(") {
        Some(p) => {
            let arg: String = decl[p + 18..].chars().take_while(|&c| c != ',' && c != ')').collect();
            define_or_literal(text, arg.trim(), &name)
        }
        None => 1024,
    };
    let args = args_struct(text, from, &name);
    Some(Entry { name, hot: false, max_threads, args })
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
    let ty = ident(params.trim().strip_prefix("const ").unwrap_or(params.trim()));
    if ty.is_empty() || params.contains(',') && !params.contains('<') {
        panic!("kernel {name}: takes `{params}`; every kernel takes one argument struct (kernels/args.cuh)");
    }
    ty
}

/// A literal, or the literal a `#define NAME literal` of the file gives `arg`.
fn define_or_literal(text: &str, arg: &str, name: &str) -> u32 {
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

/// Applies the file's `// Hot kernels (...): a_*, b` line; each pattern must match an entry.
fn mark_hot(file_name: &str, text: &str, entries: &mut [Entry]) {
    let Some(line) = text.lines().find(|l| l.trim_start().starts_with("// Hot kernels")) else { return };
    let list = line.split_once(':').map_or("", |(_, l)| l);
    for pat in list.split([',', ' ']).map(str::trim).filter(|p| !p.is_empty()) {
        let mut hit = false;
        for e in entries.iter_mut() {
            let m = match pat.strip_suffix('*') {
                Some(prefix) => e.name.starts_with(prefix),
                None => e.name == pat,
            };
            e.hot |= m;
            hit |= m;
        }
        if !hit {
            panic!("kernels/{file_name}: hot-kernel pattern `{pat}` matches no entry point");
        }
    }
}
