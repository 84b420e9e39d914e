//! `featcloud._native`: the extension module behind the `featcloud` Python package.
//!
//! It is private: `featcloud/torch.py` is its only caller, and that wrapper checks every
//! tensor (device, dtype, shape, contiguity) before passing its address here. The head runs
//! on the tensors' own memory (no copies in or out): inputs are read through the addresses,
//! and the outputs are written into tensors the wrapper allocated.
//!
//! - `float32` runs the CPU backend (`featcloud::cpu::head`, the crate's training path);
//! - `float64` runs the oracle (`featcloud::oracle::head`, f64 throughout), so that
//!   `torch.autograd.gradcheck` can check the gradients.
//!
//! The LEAP statistics (`stats_update`, `stats_sigma`) live in the module's buffers (so that
//! `state_dict` holds them); each call loads them into the crate's `StatsState`, checks them,
//! and writes an update back.
//!
//! Errors of the crate (bad labels, shapes, options, non-finite inputs) come back as
//! Python `ValueError`s with the crate's message. Every call holds the GIL: the tensors are
//! read in place, and no other Python thread may free or resize them meanwhile.

use featcloud::cpu::head as cpu;
use featcloud::oracle::head as oracle;
use featcloud::shard::ClassShard;
use featcloud::{HeadConfig, HeadShape};
use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;
use pyo3::types::PyDict;

/// A crate error as the Python exception the wrapper documents.
fn value_error(e: impl std::fmt::Display) -> PyErr {
    PyValueError::new_err(e.to_string())
}

/// A slice over `len` elements at address `addr` (0 with `len` 0 gives an empty slice).
///
/// # Safety
/// `addr` must point to `len` initialized, properly aligned `T` that stay alive and unwritten
/// for `'a` (the wrapper passes a contiguous tensor of exactly that many elements of that
/// dtype, which it holds for the whole call).
unsafe fn input<'a, T>(addr: usize, len: usize) -> &'a [T] {
    if len == 0 {
        return &[];
    }
    // SAFETY: as the caller promises above.
    unsafe { std::slice::from_raw_parts(addr as *const T, len) }
}

/// Copies `src` to the `src.len()` elements at `addr` (nothing if `addr` is 0).
///
/// # Safety
/// A non-zero `addr` must point to `src.len()` writable, properly aligned `T` that nothing
/// else reads or writes during the call (an output tensor the wrapper allocated for it).
unsafe fn output<T: Copy>(addr: usize, src: &[T]) {
    if addr != 0 && !src.is_empty() {
        // SAFETY: as the caller promises above; `src` is Rust-owned, so the two do not overlap.
        unsafe { std::ptr::copy_nonoverlapping(src.as_ptr(), addr as *mut T, src.len()) }
    }
}

/// The per-row outputs, as the six f64 rows of the wrapper's `[6, B]` tensor: loss_i, lse_i,
/// c_iy, t_i, alpha_i and k*_iy (an index, exact in f64).
fn rows_f64(cols: [&dyn Fn(usize) -> f64; 6], b: usize) -> Vec<f64> {
    cols.iter().flat_map(|f| (0..b).map(f)).collect()
}

/// Addresses of one call's tensors (0 = absent), as the wrapper passes them.
#[derive(Clone, Copy)]
struct Addrs {
    x: usize,
    w: usize,
    labels: usize,
    sigma: usize,
    upstream_rows: usize,
    rows: usize,
    dx: usize,
    dw: usize,
}

/// One call of the head: the configuration (JSON of `featcloud::HeadConfig`), the element
/// type, B, C, D, the number of sigma_cloud entries (0 or C), seed, step, and the scalar
/// upstream gradient (used when `upstream_rows` is 0).
#[derive(Clone)]
struct Call {
    cfg: HeadConfig,
    shape: HeadShape,
    n_sigma: usize,
    seed: u64,
    step: u64,
    upstream: f64,
    a: Addrs,
}

impl Call {
    /// Runs the head and writes its outputs; returns the reduced loss.
    ///
    /// # Safety
    /// Every non-zero address in `self.a` is as [`input`] and [`output`] require for the
    /// lengths this call derives from the shape (x B*D, W C*K*D, labels B i32, sigma n_sigma
    /// f32, upstream_rows B, rows 6*B f64, dx B*D, dw C*K*D, in the element type `F`).
    unsafe fn run<F: Elem>(&self) -> featcloud::Result<f64> {
        let HeadShape { b, c, d } = self.shape;
        let k = self.cfg.subcenters as usize;
        let a = self.a;
        // SAFETY: the addresses and lengths are the wrapper's checked tensors (the contract above).
        let (x, w, labels, sigma) = unsafe {
            (
                input::<F>(a.x, b * d),
                input::<F>(a.w, c * k * d),
                input::<i32>(a.labels, b),
                input::<f32>(a.sigma, self.n_sigma),
            )
        };
        let p = oracle::HeadProblemOf {
            shape: self.shape,
            x,
            w,
            labels,
            sigma_cloud: sigma,
            seed: self.seed,
            step: self.step,
        };
        // SAFETY: as above, for the upstream rows (B elements of F).
        let up_rows = unsafe { input::<F>(a.upstream_rows, if a.upstream_rows == 0 { 0 } else { b }) };
        let want_grad = a.dx != 0 || a.dw != 0;
        let (loss, rows, grads) = F::head(&self.cfg, &p, want_grad, self.upstream, up_rows)?;
        // SAFETY: the output tensors have 6*B f64, B*D and C*K*D elements of F (the contract).
        unsafe {
            output(a.rows, &rows);
            if let Some((dx, dw)) = grads {
                output(a.dx, &dx);
                output(a.dw, &dw);
            }
        }
        Ok(loss)
    }
}

/// The two element types and the implementation each runs.
trait Elem: Copy + Sized {
    /// (loss, rows [6*B] f64, (dx, dw) if `want_grad`) for problem `p`; the upstream is the
    /// per-row `up_rows` when not empty, else the scalar `up`.
    #[allow(clippy::type_complexity)]
    fn head(
        cfg: &HeadConfig,
        p: &oracle::HeadProblemOf<Self>,
        want_grad: bool,
        up: f64,
        up_rows: &[Self],
    ) -> featcloud::Result<(f64, Vec<f64>, Option<(Vec<Self>, Vec<Self>)>)>;
}

impl Elem for f32 {
    fn head(
        cfg: &HeadConfig,
        p: &oracle::HeadProblemOf<f32>,
        want_grad: bool,
        up: f64,
        up_rows: &[f32],
    ) -> featcloud::Result<(f64, Vec<f64>, Option<(Vec<f32>, Vec<f32>)>)> {
        let (fwd, grads) = if want_grad {
            let upstream = if up_rows.is_empty() {
                cpu::Upstream::Scalar(up as f32)
            } else {
                cpu::Upstream::PerRow(up_rows)
            };
            let (f, g) = cpu::forward_backward(cfg, p, upstream)?;
            (f, Some((g.dx, g.dw)))
        } else {
            (cpu::forward(cfg, p)?, None)
        };
        let r = &fwd.rows;
        let rows = rows_f64(
            [
                &|i| r.loss[i] as f64,
                &|i| r.lse[i] as f64,
                &|i| r.c_iy[i] as f64,
                &|i| r.t[i] as f64,
                &|i| r.alpha[i] as f64,
                &|i| r.k_iy[i] as f64,
            ],
            p.shape.b,
        );
        Ok((fwd.loss, rows, grads))
    }
}

impl Elem for f64 {
    fn head(
        cfg: &HeadConfig,
        p: &oracle::HeadProblemOf<f64>,
        want_grad: bool,
        up: f64,
        up_rows: &[f64],
    ) -> featcloud::Result<(f64, Vec<f64>, Option<(Vec<f64>, Vec<f64>)>)> {
        let fwd = oracle::forward_f64(cfg, p)?;
        let grads = if want_grad {
            let upstream = if up_rows.is_empty() {
                oracle::Upstream::Scalar(up)
            } else {
                oracle::Upstream::PerRow(up_rows)
            };
            let g = oracle::backward_f64(cfg, p, upstream)?;
            Some((g.dx, g.dw))
        } else {
            None
        };
        let r = &fwd.rows;
        let rows = rows_f64(
            [&|i| r.loss[i], &|i| r.lse[i], &|i| r.c_iy[i], &|i| r.t[i], &|i| r.alpha[i], &|i| {
                r.k_iy[i] as f64
            }],
            p.shape.b,
        );
        Ok((fwd.loss, rows, grads))
    }
}

/// Runs the margin head on CPU memory (see the module doc for the contract): returns the
/// reduced loss and writes the per-row outputs, and dx / dW when their addresses are given.
#[pyfunction]
#[pyo3(signature = (cfg_json, dtype, b, c, d, x, w, labels, sigma, n_sigma, seed, step, upstream, upstream_rows, rows, dx, dw))]
#[allow(clippy::too_many_arguments)]
fn head_cpu(
    cfg_json: &str,
    dtype: &str,
    b: usize,
    c: usize,
    d: usize,
    x: usize,
    w: usize,
    labels: usize,
    sigma: usize,
    n_sigma: usize,
    seed: u64,
    step: u64,
    upstream: f64,
    upstream_rows: usize,
    rows: usize,
    dx: usize,
    dw: usize,
) -> PyResult<f64> {
    let cfg: HeadConfig = serde_json::from_str(cfg_json).map_err(value_error)?;
    cfg.validate().map_err(value_error)?;
    if x == 0 || w == 0 || labels == 0 || (sigma == 0) != (n_sigma == 0) {
        return Err(value_error("head_cpu: x, W and labels need addresses (sigma with n_sigma)"));
    }
    let call = Call {
        cfg,
        shape: HeadShape { b, c, d },
        n_sigma,
        seed,
        step,
        upstream,
        a: Addrs { x, w, labels, sigma, upstream_rows, rows, dx, dw },
    };
    // The GIL stays held (the call is not detached): the tensors are read in place, and no
    // other Python thread may free or resize them during the call.
    let result = match dtype {
        // SAFETY: the wrapper's tensors, checked against these lengths and dtypes (module doc).
        "float32" => unsafe { call.run::<f32>() },
        // SAFETY: as above.
        "float64" => unsafe { call.run::<f64>() },
        other => return Err(value_error(format!("head_cpu: dtype {other} (float32 or float64)"))),
    };
    result.map_err(value_error)
}

/// One shard of a class-parallel head (SPEC 5c): the shard's classes `first .. first + c` of
/// `total`, W and sigma the shard's, the labels global.
struct ShardCall {
    cfg: HeadConfig,
    shape: HeadShape,
    shard: ClassShard,
    n_sigma: usize,
    seed: u64,
    step: u64,
    x: usize,
    w: usize,
    labels: usize,
    sigma: usize,
}

impl ShardCall {
    /// Runs `f` on the call's problem with inputs of element type `F`.
    ///
    /// # Safety
    /// The addresses are as [`input`] requires for x B*D, W C*K*D (type `F`), labels B i32
    /// and sigma n_sigma f32.
    unsafe fn with<F, R>(&self, f: impl FnOnce(&oracle::HeadProblemOf<F>) -> R) -> R {
        let HeadShape { b, c, d } = self.shape;
        let k = self.cfg.subcenters as usize;
        // SAFETY: as the caller promises.
        let p = unsafe {
            oracle::HeadProblemOf {
                shape: self.shape,
                x: input::<F>(self.x, b * d),
                w: input::<F>(self.w, c * k * d),
                labels: input::<i32>(self.labels, b),
                sigma_cloud: input::<f32>(self.sigma, self.n_sigma),
                seed: self.seed,
                step: self.step,
            }
        };
        f(&p)
    }
}

/// Parses a shard call's common arguments.
#[allow(clippy::too_many_arguments)]
fn shard_call(
    cfg_json: &str,
    (b, c, d): (usize, usize, usize),
    (first, total): (usize, usize),
    (x, w, labels, sigma, n_sigma): (usize, usize, usize, usize, usize),
    seed: u64,
    step: u64,
) -> PyResult<ShardCall> {
    let cfg: HeadConfig = serde_json::from_str(cfg_json).map_err(value_error)?;
    cfg.validate().map_err(value_error)?;
    if x == 0 || w == 0 || labels == 0 || (sigma == 0) != (n_sigma == 0) {
        return Err(value_error("head shard: x, W and labels need addresses (sigma with n_sigma)"));
    }
    let shape = HeadShape { b, c, d };
    Ok(ShardCall { cfg, shape, shard: ClassShard { first, total }, n_sigma, seed, step, x, w, labels, sigma })
}

/// One shard's forward (SPEC 5c) on CPU memory: writes the partials as the eight f64 rows of
/// the `[8, B]` tensor at `parts`: max, sum_exp, sum_z, z_y, c_iy, t, alpha, k_iy.
#[pyfunction]
#[pyo3(signature = (cfg_json, dtype, b, c, d, first, total, x, w, labels, sigma, n_sigma, seed, step, parts))]
#[allow(clippy::too_many_arguments)]
fn head_shard_cpu(
    cfg_json: &str,
    dtype: &str,
    b: usize,
    c: usize,
    d: usize,
    first: usize,
    total: usize,
    x: usize,
    w: usize,
    labels: usize,
    sigma: usize,
    n_sigma: usize,
    seed: u64,
    step: u64,
    parts: usize,
) -> PyResult<()> {
    let call = shard_call(cfg_json, (b, c, d), (first, total), (x, w, labels, sigma, n_sigma), seed, step)?;
    let (cfg, shard) = (&call.cfg, call.shard);
    // The GIL stays held (see head_cpu).
    let out = match dtype {
        // SAFETY: the wrapper's tensors, checked against these lengths and dtypes (module doc).
        "float32" => unsafe { call.with(|p| featcloud::cpu::head::shard_forward(cfg, p, shard)) },
        // SAFETY: as above.
        "float64" => unsafe { call.with(|p| oracle::shard_forward_f64(cfg, p, shard)) },
        other => return Err(value_error(format!("head_shard_cpu: dtype {other} (float32 or float64)"))),
    }
    .map_err(value_error)?;
    let k_iy: Vec<f64> = out.k_iy.iter().map(|&k| k as f64).collect();
    let rows: Vec<f64> = [&out.max, &out.sum_exp, &out.sum_z, &out.z_y, &out.c_iy, &out.t, &out.alpha, &k_iy]
        .into_iter()
        .flatten()
        .copied()
        .collect();
    // SAFETY: `parts` is the wrapper's [8, B] f64 output tensor.
    unsafe { output(parts, &rows) };
    Ok(())
}

/// One shard's backward (SPEC 5c) on CPU memory, given the combined lse f64 `[B]` and row
/// weights f64 `[B]`: writes this shard's part of dx `[B, D]` and its dW `[C*K, D]`.
#[pyfunction]
#[pyo3(signature = (cfg_json, dtype, b, c, d, first, total, x, w, labels, sigma, n_sigma, seed, step, lse, weight, dx, dw))]
#[allow(clippy::too_many_arguments)]
fn head_shard_backward_cpu(
    cfg_json: &str,
    dtype: &str,
    b: usize,
    c: usize,
    d: usize,
    first: usize,
    total: usize,
    x: usize,
    w: usize,
    labels: usize,
    sigma: usize,
    n_sigma: usize,
    seed: u64,
    step: u64,
    lse: usize,
    weight: usize,
    dx: usize,
    dw: usize,
) -> PyResult<()> {
    let call = shard_call(cfg_json, (b, c, d), (first, total), (x, w, labels, sigma, n_sigma), seed, step)?;
    let (cfg, shard) = (&call.cfg, call.shard);
    if lse == 0 || weight == 0 || dx == 0 || dw == 0 {
        return Err(value_error("head_shard_backward_cpu: lse, weight, dx and dW need addresses"));
    }
    // SAFETY: the wrapper's [B] f64 tensors.
    let (lse, weight) = unsafe { (input::<f64>(lse, b), input::<f64>(weight, b)) };
    // SAFETY (both arms): the wrapper's tensors, checked against these lengths and dtypes; dx
    // and dW are its output tensors of B*D and C*K*D elements of the dtype.
    match dtype {
        "float32" => unsafe {
            let g = call
                .with(|p| featcloud::cpu::head::shard_backward(cfg, p, shard, lse, weight))
                .map_err(value_error)?;
            output(dx, &g.dx);
            output(dw, &g.dw);
        },
        "float64" => unsafe {
            let g =
                call.with(|p| oracle::shard_backward_f64(cfg, p, shard, lse, weight)).map_err(value_error)?;
            output(dx, &g.dx);
            output(dw, &g.dw);
        },
        other => {
            return Err(value_error(format!("head_shard_backward_cpu: dtype {other} (float32 or float64)")))
        }
    }
    Ok(())
}

/// PartialFC's kept classes of shard `first .. first + c` at `step` (SPEC 5c,
/// `featcloud::shard::sample_classes`) for the batch's global `labels`.
#[pyfunction]
fn sample_classes(
    labels: Vec<i64>,
    first: usize,
    c: usize,
    rate: f64,
    seed: u64,
    step: u64,
) -> PyResult<Vec<usize>> {
    let labels: Vec<i32> = labels.iter().map(|&y| y.clamp(-1, i32::MAX as i64) as i32).collect();
    featcloud::shard::sample_classes(&labels, first, c, rate, seed, step).map_err(value_error)
}

/// Addresses of the LEAP statistics buffers of `featcloud.torch.LeapHead` (SPEC 5 and 5b):
/// centers f64 `[C*K*D]` (0 with center = class_weight), mu and v f64 `[C]`, n i64 `[C]`.
#[derive(Clone, Copy)]
struct StatsAddrs {
    centers: usize,
    mu: usize,
    v: usize,
    n: usize,
}

/// The statistics held in the wrapper's buffers, checked as a statistics file is
/// (`StatsState::validate`: finite, n >= 0, initialized exactly where n > 0).
///
/// # Safety
/// The addresses hold the element counts and types of [`StatsAddrs`] for `c`, `k`, `d`.
unsafe fn load_stats(
    cfg: featcloud::StatsConfig,
    (c, k, d): (usize, usize, usize),
    a: StatsAddrs,
    updates: u64,
) -> featcloud::Result<featcloud::StatsState> {
    let mut s = featcloud::StatsState::with_subcenters(c, k, d, cfg)?;
    // SAFETY: as the caller promises; each length is the state's own.
    let (centers, mu, v, n) = unsafe {
        (
            input::<f64>(a.centers, s.centers.len()),
            input::<f64>(a.mu, c),
            input::<f64>(a.v, c),
            input::<i64>(a.n, c),
        )
    };
    s.centers.copy_from_slice(centers);
    s.mu.copy_from_slice(mu);
    s.v.copy_from_slice(v);
    if let Some(i) = n.iter().position(|&n| n < 0) {
        return Err(featcloud::Error::InvalidConfig(format!("stats_n[{i}] = {} is negative", n[i])));
    }
    s.n = n.iter().map(|&n| n as u64).collect();
    s.initialized = s.n.iter().map(|&n| n > 0).collect();
    s.updates = updates;
    s.validate()?;
    Ok(s)
}

/// Writes the statistics back into the wrapper's buffers.
///
/// # Safety
/// As [`load_stats`], the buffers writable and not otherwise in use.
unsafe fn store_stats(s: &featcloud::StatsState, a: StatsAddrs) {
    let n: Vec<i64> = s.n.iter().map(|&n| n as i64).collect();
    // SAFETY: as the caller promises; the lengths are the state's, as loaded.
    unsafe {
        output(a.centers, &s.centers);
        output(a.mu, &s.mu);
        output(a.v, &s.v);
        output(a.n, &n);
    }
}

/// One statistics update (SPEC 5, 5b) from a batch: x f32 `[B, D]`, labels i32 `[B]`, and
/// from the head's forward k*_iy i32 `[B]` and c_iy f64 `[B]` (class_weight centers take
/// theta_i from it). Updates the buffers in place; returns the new update count.
#[pyfunction]
#[pyo3(signature = (cfg_json, c, k, d, centers, mu, v, n, updates, b, x, labels, k_iy, c_iy))]
#[allow(clippy::too_many_arguments)]
fn stats_update(
    cfg_json: &str,
    c: usize,
    k: usize,
    d: usize,
    centers: usize,
    mu: usize,
    v: usize,
    n: usize,
    updates: u64,
    b: usize,
    x: usize,
    labels: usize,
    k_iy: usize,
    c_iy: usize,
) -> PyResult<u64> {
    let cfg: featcloud::StatsConfig = serde_json::from_str(cfg_json).map_err(value_error)?;
    let a = StatsAddrs { centers, mu, v, n };
    // The GIL stays held (see head_cpu).
    let update = || -> featcloud::Result<u64> {
        // SAFETY: the wrapper's buffers and batch tensors, checked against these sizes and
        // dtypes (module doc); the buffers are written only after the update succeeded.
        unsafe {
            let mut s = load_stats(cfg, (c, k, d), a, updates)?;
            let (x, labels, k_iy, c_iy) = (
                input::<f32>(x, b * d),
                input::<i32>(labels, b),
                input::<u32>(k_iy, b),
                input::<f64>(c_iy, b),
            );
            match s.cfg.center {
                featcloud::CenterMode::Ema => s.update_subcenters(x, labels, k_iy)?,
                featcloud::CenterMode::ClassWeight => {
                    let rows = oracle::RowOutputs { c_iy: c_iy.to_vec(), ..Default::default() };
                    s.update_from_angles(labels, &oracle::target_angles(&rows))?
                }
            }
            store_stats(&s, a);
            Ok(s.updates)
        }
    };
    update().map_err(value_error)
}

/// sigma_cloud `[C]` (SPEC 5) from the statistics in the buffers, written as f32 at `sigma`.
#[pyfunction]
#[pyo3(signature = (cfg_json, c, k, d, centers, mu, v, n, updates, sigma, head_variance=None))]
#[allow(clippy::too_many_arguments)]
fn stats_sigma(
    cfg_json: &str,
    c: usize,
    k: usize,
    d: usize,
    centers: usize,
    mu: usize,
    v: usize,
    n: usize,
    updates: u64,
    sigma: usize,
    head_variance: Option<(f64, f64)>,
) -> PyResult<()> {
    let cfg: featcloud::StatsConfig = serde_json::from_str(cfg_json).map_err(value_error)?;
    // SAFETY: the wrapper's buffers (module doc); `sigma` is a [C] f32 output tensor.
    unsafe {
        let s = load_stats(cfg, (c, k, d), StatsAddrs { centers, mu, v, n }, updates).map_err(value_error)?;
        let sigma_f64 = match head_variance {
            None => s.cloud_sigma(),
            // A shard of a class-parallel head: var_h from the sums over every shard (SPEC 5c).
            Some((num, den)) => s.cloud_sigma_with((den > 0.0).then(|| num / den)),
        };
        let out: Vec<f32> = sigma_f64.iter().map(|&v| v as f32).collect();
        output(sigma, &out);
    }
    Ok(())
}

/// The sums (numerator, denominator) of var_h over the state's classes (SPEC 5c), which a
/// class-parallel head adds over its shards before `stats_sigma`.
#[pyfunction]
#[pyo3(signature = (cfg_json, c, k, d, centers, mu, v, n, updates))]
#[allow(clippy::too_many_arguments)]
fn stats_head_variance_parts(
    cfg_json: &str,
    c: usize,
    k: usize,
    d: usize,
    centers: usize,
    mu: usize,
    v: usize,
    n: usize,
    updates: u64,
) -> PyResult<(f64, f64)> {
    let cfg: featcloud::StatsConfig = serde_json::from_str(cfg_json).map_err(value_error)?;
    // SAFETY: the wrapper's buffers (module doc).
    let s = unsafe { load_stats(cfg, (c, k, d), StatsAddrs { centers, mu, v, n }, updates) }
        .map_err(value_error)?;
    Ok(s.head_variance_parts())
}

/// What this build holds: the version, whether the CUDA kernels were compiled in (NVRTC at
/// build time), their archs, and the CUDA device found now (or why none is usable).
#[pyfunction]
fn info(py: Python<'_>) -> PyResult<Bound<'_, PyDict>> {
    use featcloud::cuda::{kernels, Device};
    let out = PyDict::new(py);
    out.set_item("version", env!("CARGO_PKG_VERSION"))?;
    out.set_item("kernels", kernels::KERNELS_BUILT)?;
    let archs: Vec<String> = if kernels::KERNELS_BUILT {
        kernels::CUBIN_ARCHS.iter().map(|a| format!("sm_{a}")).collect()
    } else {
        Vec::new()
    };
    out.set_item("archs", archs)?;
    let device = match Device::new(0) {
        Ok(dev) => {
            let i = dev.info();
            format!(
                "{} (sm_{}{}, {} SMs)",
                i.name, i.compute_capability.0, i.compute_capability.1, i.sm_count
            )
        }
        Err(e) => format!("none ({e})"),
    };
    out.set_item("device", device)?;
    Ok(out)
}

/// The module: `head_cpu` and `info` (see the module doc).
#[pymodule]
fn _native(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    m.add_function(wrap_pyfunction!(head_cpu, m)?)?;
    m.add_function(wrap_pyfunction!(info, m)?)?;
    m.add_function(wrap_pyfunction!(stats_update, m)?)?;
    m.add_function(wrap_pyfunction!(stats_sigma, m)?)?;
    m.add_function(wrap_pyfunction!(stats_head_variance_parts, m)?)?;
    m.add_function(wrap_pyfunction!(head_shard_cpu, m)?)?;
    m.add_function(wrap_pyfunction!(head_shard_backward_cpu, m)?)?;
    m.add_function(wrap_pyfunction!(sample_classes, m)?)?;
    Ok(())
}
