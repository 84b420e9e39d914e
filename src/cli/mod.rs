//! The `featcloud` command line.
pub mod bench;
pub mod info;
pub mod smoke;
