//! (module io: in progress)
