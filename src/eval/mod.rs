//! (module eval: in progress)
