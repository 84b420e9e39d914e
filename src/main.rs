//! The `featcloud` binary; everything lives in [`featcloud::cli`].

fn main() -> std::process::ExitCode {
    featcloud::cli::main()
}
