//! (module data: in progress)
