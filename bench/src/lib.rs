//! relay-bench: the relay and the relays users would pick instead (direct TCP, socat,
//! rathole, bore, an OpenSSH reverse tunnel), measured side by side on the same loopback
//! path in the same run. See `bench --help` and docs/BENCHMARKS.md.

pub mod chart;
pub mod cost;
pub mod fleet;
pub mod load;
pub mod procs;
pub mod report;
pub mod systems;
