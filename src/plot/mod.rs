//! (module plot: in progress)
