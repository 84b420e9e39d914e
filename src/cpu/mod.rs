//! (module cpu: in progress)
