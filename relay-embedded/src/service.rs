//! The bridge between an accepted session and code on the device itself: relay-proto's
//! driver services, re-exported (see [`relay_proto::driver::Service`]).

pub use relay_proto::driver::{Decision, Echo, Service, Session, SessionInfo};
