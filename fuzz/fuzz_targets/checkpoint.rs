//! Checkpoints: the bytes `Checkpoint::load` parses; whatever parses must serialize
//! again and parse back to the same checkpoint.
use featcloud::engine::checkpoint::Checkpoint;

fn main() {
    afl::fuzz!(|data: &[u8]| {
        if let Ok(ck) = Checkpoint::from_bytes(data) {
            let bytes = ck.to_bytes().expect("a loaded checkpoint serializes");
            let back = Checkpoint::from_bytes(&bytes).expect("a re-serialized checkpoint loads");
            assert_eq!(back, ck, "checkpoint round trip");
        }
    });
}
