//! CPU oracle: SPEC sections 3-6 as plain loops with f64 accumulation.
//!
//! The truth that every other implementation is checked against:
//! - [`head`]: margin head forward and backward with the feature cloud (SPEC 3, 4);
//! - [`stats`]: LEAP angular statistics and the per-class cloud std (SPEC 5);
//! - [`philox`]: the counter-based normal draws eps_i (SPEC 6).

pub mod head;
pub mod philox;
pub mod stats;

pub use head::{
    backward, backward_f64, forward, forward_f64, target_angles, ForwardOutput, Gradients, HeadProblem,
    HeadProblemF64, Region, RowOutputs, Upstream,
};
pub use philox::{cloud_normal, cloud_normal_f32, philox4x32_10};
