//! Inputs the fuzz targets (fuzz/, `scripts/fuzz.sh`) found to break a parser, each with
//! the clear error it must give now. The inputs are the fuzzer's files, kept as they were
//! found in tests/fuzz_regressions/<target>/.

use featcloud::engine::Checkpoint;

/// The checkpoint loader accepted a configuration whose f32 `optim.eps` was written as a
/// JSON number out of f32 range (1e78, 1e98): serde reads it as infinity, and the
/// checkpoint loaded, to train with an infinite epsilon (and saved again as `null`, which
/// no longer loads). It must be refused, naming the field.
#[test]
fn checkpoint_config_out_of_f32_range_is_refused() {
    for (bytes, value) in [
        (&include_bytes!("fuzz_regressions/checkpoint/config-eps-1e78.safetensors")[..], "1e78"),
        (&include_bytes!("fuzz_regressions/checkpoint/config-eps-1e98.safetensors")[..], "1e98"),
    ] {
        let text = String::from_utf8_lossy(bytes);
        assert!(text.contains(&format!("\\\"eps\\\":{value}")), "the input holds eps = {value}");
        let e = Checkpoint::from_bytes(bytes).expect_err("an infinite optim.eps must not load").to_string();
        assert!(e.contains("<memory>") && e.contains("metadata 'config' is invalid"), "{e}");
        assert!(e.contains("optim.eps") && e.contains("finite"), "{e}");
    }
}
