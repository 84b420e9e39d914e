//! Statistics files: the bytes `StatsState::load` parses (and `ClassStats::load` builds
//! on); whatever parses must pass the checks `ClassStats` makes before touching the
//! device or fail them with an error, and serialize and parse back to the same state.
use featcloud::cuda::stats::check_config;
use featcloud::StatsState;

fn main() {
    afl::fuzz!(|data: &[u8]| {
        if let Ok(s) = StatsState::from_bytes(data) {
            let _ = check_config(s.c, s.d, &s.cfg);
            let bytes = s.to_bytes().expect("a loaded statistics file serializes");
            let back = StatsState::from_bytes(&bytes).expect("a re-serialized statistics file loads");
            assert_eq!(back, s, "statistics file round trip");
        }
    });
}
