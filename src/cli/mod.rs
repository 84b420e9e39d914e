//! (module cli: in progress)
