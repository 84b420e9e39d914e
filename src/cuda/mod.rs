//! (module cuda: in progress)
