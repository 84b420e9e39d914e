//! CPU oracle: SPEC sections 3-6 as plain loops with f64 accumulation.
