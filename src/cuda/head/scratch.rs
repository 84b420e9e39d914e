//! The scratch a head keeps between calls, so that a training step allocates only
//! the tensors it returns (per-row outputs and gradients).
//!
//! Each kind of scratch has a slot; a call takes the buffer out of its slot, uses
//! it and puts it back. On a GPU a buffer is reused while it is large enough (one
//! stream, so the next call's kernels are ordered after the last call's); on the
//! emulated device only when its size is exact, so that its guard zones still sit
//! right after the last element and catch an overrun, and refilled with NaN bytes, so
//! that a kernel that leaves part of it unwritten shows as on a first call.

use crate::cuda::tensor::Staging;
use crate::cuda::{Device, DeviceCopy, Tensor};
use crate::error::Result;

/// The kinds of scratch of the fused path (and the labels of both paths).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Slot {
    /// Inverse norms of x `[B]`.
    InvX,
    /// Inverse norms of W `[C]`.
    InvW,
    /// Forward partials `[3, class tiles (or splits), B]`.
    Part,
    /// The reduced loss `[1]`.
    Total,
    /// Backward dx partials `[G, B, D]`.
    Dxp,
    /// Backward dW partials `[S, C, D]` or the 16-bit dW accumulators `[G, cols, D]`.
    Dw,
    /// The attention-form forward's per-split attention outputs `[splits, B, D]`, and in the
    /// attention-form backward with row splits its dW partials `[row splits, C*K, D]` (the
    /// forward's are consumed by its combine before any backward runs).
    Opart,
    /// The attention-form forward's per-split sums of normalized W rows `[splits, D]`.
    Swh,
}

const SLOTS: usize = 8;

/// Buffers kept between calls (see the module docs).
#[derive(Debug, Default)]
pub(super) struct Scratch {
    f32s: [Option<Tensor<f32>>; SLOTS],
    labels: Option<Tensor<i32>>,
    /// The attention-form backward's counters (one per class tile), all 0 between calls.
    counters: Option<Tensor<u32>>,
    /// Pinned host memory the labels are uploaded from.
    labels_host: Staging<i32>,
}

/// A buffer from `slot` if it fits `shape` (exactly, on the emulated device), else
/// a new uninitialized one.
fn fit<T: DeviceCopy>(dev: &Device, slot: Option<Tensor<T>>, shape: &[usize]) -> Result<Tensor<T>> {
    let n: usize = shape.iter().product();
    match slot {
        Some(mut t) if t.capacity() == n.max(1) || (!dev.is_emulated() && t.capacity() >= n) => {
            t.poison_if_emulated();
            t.reshaped(shape)
        }
        // SAFETY: every caller writes the scratch before reading it (see the kernels'
        // notes at the call sites in fused.rs); a reused buffer holds the last call's
        // values, a fresh one arbitrary bits (0xFF on the emulated device).
        _ => unsafe { Tensor::uninit(dev, shape) },
    }
}

impl Scratch {
    /// Takes the f32 buffer of `slot` with `shape` (contents: arbitrary; write first).
    pub(super) fn take(&mut self, dev: &Device, slot: Slot, shape: &[usize]) -> Result<Tensor<f32>> {
        fit(dev, self.f32s[slot as usize].take(), shape)
    }

    /// Returns a buffer taken with [`Scratch::take`].
    pub(super) fn put(&mut self, slot: Slot, t: Tensor<f32>) {
        self.f32s[slot as usize] = Some(t);
    }

    /// The labels on the device: the kept buffer overwritten by one copy from pinned
    /// host memory.
    pub(super) fn labels(&mut self, dev: &Device, labels: &[i32]) -> Result<Tensor<i32>> {
        let mut t = fit(dev, self.labels.take(), &[labels.len()])?;
        self.labels_host.upload(dev, labels, &mut t)?;
        Ok(t)
    }

    /// Returns the labels buffer.
    pub(super) fn put_labels(&mut self, t: Tensor<i32>) {
        self.labels = Some(t);
    }

    /// `n` u32 counters, all 0: the kept buffer (every kernel that uses it leaves it 0) if it
    /// fits (exactly, on the emulated device), else a new zeroed one. Never poisoned: its
    /// zeros are the kernel's precondition.
    pub(super) fn take_counters(&mut self, dev: &Device, n: usize) -> Result<Tensor<u32>> {
        match self.counters.take() {
            Some(t) if t.capacity() == n.max(1) || (!dev.is_emulated() && t.capacity() >= n) => {
                t.reshaped(&[n])
            }
            _ => Tensor::zeros(dev, &[n]),
        }
    }

    /// Returns the counters after a launch that was accepted: every kernel that runs to the
    /// end leaves them 0, and a GPU kernel that faults later leaves the context unusable (a
    /// sticky error), so no later launch sees them (on the emulated device a launch runs
    /// to the end before it returns). After a launch that failed they are dropped instead, so
    /// that the next call starts from new zeros.
    pub(super) fn put_counters(&mut self, t: Tensor<u32>) {
        self.counters = Some(t);
    }
}
