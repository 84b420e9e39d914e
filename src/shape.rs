//! The dimensions of one head call, shared by every implementation.

use crate::error::{Error, Result};

/// Dimensions of one head call: `x [B, D]`, `W [C, D]`, `labels [B]`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HeadShape {
    /// Rows (batch size).
    pub b: usize,
    /// Classes.
    pub c: usize,
    /// Embedding dimension.
    pub d: usize,
}

impl HeadShape {
    /// Checks that no dimension is zero.
    pub fn check_nonempty(&self) -> Result<()> {
        for (name, v) in [("B", self.b), ("C", self.c), ("D", self.d)] {
            if v == 0 {
                return Err(Error::Empty(format!("{name} = 0 (shape {self})")));
            }
        }
        Ok(())
    }
}

impl std::fmt::Display for HeadShape {
    /// `B=2, C=3, D=4`, the form error messages use.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "B={}, C={}, D={}", self.b, self.c, self.d)
    }
}

/// The stored shape of a per-sub-center tensor of `c` classes with `k` sub-centers each and
/// width `d` (the head's W in checkpoints, the EMA centers in statistics files; SPEC 5b):
/// `[C, D]` for one per class, so that K = 1 files are what they were before sub-centers,
/// and `[C, K, D]` with sub-centers (row-major, so class j's sub-center k is row j*K + k of
/// the `[C*K, D]` matrix the head takes).
pub fn subcenter_shape(c: usize, k: usize, d: usize) -> Vec<usize> {
    match k {
        1 => vec![c, d],
        k => vec![c, k, d],
    }
}
