//! A tiny deterministic generator for keep-alive and back-off jitter.
//!
//! The seed is an input (from the device's RNG peripheral, the OS, or a test), so runs
//! replay exactly. Jitter needs spread, not secrecy: xorshift64* is enough.

#[derive(Debug, Clone)]
pub struct Jitter {
    state: u64,
}

impl Jitter {
    pub fn new(seed: u64) -> Self {
        // Zero is xorshift's fixed point: move off it.
        Jitter {
            state: seed ^ 0x9E37_79B9_7F4A_7C15 | 1,
        }
    }

    pub fn next_u32(&mut self) -> u32 {
        let mut x = self.state;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.state = x;
        (x.wrapping_mul(0x2545_F491_4F6C_DD1D) >> 32) as u32
    }

    /// `base` spread uniformly over ±`percent`%.
    pub fn spread(&mut self, base: crate::Duration, percent: u64) -> crate::Duration {
        let ms = base.as_millis();
        let span = ms * percent / 100;
        if span == 0 {
            return base;
        }
        let offset = u64::from(self.next_u32()) % (2 * span + 1);
        crate::Duration::from_millis(ms - span + offset)
    }
}
