//! Logging that costs nothing when off.
//!
//! With feature `defmt` the macros go to defmt (devices: formatting happens on the host
//! that decodes the log); with feature `log` to the `log` facade (hosts, tests); with
//! neither they expand to nothing, so no format string reaches the binary. Arguments must
//! implement both `Debug` and `defmt::Format`, and are written with `{:?}`.

#[cfg(feature = "defmt")]
macro_rules! log_debug { ($($t:tt)*) => { defmt::debug!($($t)*) } }
#[cfg(all(feature = "log", not(feature = "defmt")))]
macro_rules! log_debug { ($($t:tt)*) => { log::debug!($($t)*) } }
#[cfg(not(any(feature = "log", feature = "defmt")))]
macro_rules! log_debug {
    ($($t:tt)*) => {{}};
}

#[cfg(feature = "defmt")]
macro_rules! log_warn { ($($t:tt)*) => { defmt::warn!($($t)*) } }
#[cfg(all(feature = "log", not(feature = "defmt")))]
macro_rules! log_warn { ($($t:tt)*) => { log::warn!($($t)*) } }
#[cfg(not(any(feature = "log", feature = "defmt")))]
macro_rules! log_warn {
    ($($t:tt)*) => {{}};
}

pub(crate) use {log_debug, log_warn};
