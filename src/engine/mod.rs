//! (module engine: in progress)
