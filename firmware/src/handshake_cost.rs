//! One device handshake (Noise NK, clatter, as relay-embedded's channel runs it) between
//! two markers, for counting its instructions on a Cortex-M4 under QEMU
//! (`handshake_cost.sh`). The relay's half runs between the device's two halves and is
//! not counted. Exits through semihosting.
#![no_std]
#![no_main]

use core::hint::black_box;
use core::panic::PanicInfo;

use clatter::bytearray::ByteArray;
use clatter::crypto::cipher::ChaChaPoly;
use clatter::crypto::dh::X25519;
use clatter::crypto::hash::Sha256;
use clatter::handshakepattern::noise_nk;
use clatter::traits::{Dh, Handshaker};
use clatter::{KeyPair, NqHandshakeCore};
use cortex_m_rt::entry;
use cortex_m_semihosting::debug;

#[derive(Default, Clone)]
struct Unused;
impl clatter::rand_core::RngCore for Unused {
    fn next_u32(&mut self) -> u32 {
        0
    }
    fn next_u64(&mut self) -> u64 {
        0
    }
    fn fill_bytes(&mut self, d: &mut [u8]) {
        d.fill(0)
    }
    fn try_fill_bytes(&mut self, d: &mut [u8]) -> Result<(), clatter::rand_core::Error> {
        d.fill(0);
        Ok(())
    }
}
impl clatter::rand_core::CryptoRng for Unused {}

type Hs = NqHandshakeCore<X25519, ChaChaPoly, Sha256, Unused>;
const PROLOGUE: &[u8] = b"relay channel 1";

/// Which marker ran last: volatile writes keep both calls, distinct values keep the
/// linker from folding the two functions into one.
static mut MARK: u32 = 0;

/// Counting starts when this runs...
#[inline(never)]
#[unsafe(no_mangle)]
pub extern "C" fn cost_on() {
    // SAFETY: single-threaded, and the static is only ever written.
    unsafe { core::ptr::write_volatile(&raw mut MARK, 1) }
}

/// ...and stops when this runs.
#[inline(never)]
#[unsafe(no_mangle)]
pub extern "C" fn cost_off() {
    // SAFETY: as above.
    unsafe { core::ptr::write_volatile(&raw mut MARK, 2) }
}

fn pair(secret: [u8; 32]) -> KeyPair<[u8; 32], <X25519 as Dh>::PrivateKey> {
    let s = <X25519 as Dh>::PrivateKey::from_slice(&secret);
    KeyPair::new(X25519::pubkey(&s), s)
}

#[entry]
fn main() -> ! {
    let relay = pair([9; 32]);
    let relay_public = relay.public;

    // The device: its ephemeral key, the first message.
    cost_on();
    let e = pair(black_box([5; 32]));
    let device = Hs::new(
        noise_nk(),
        PROLOGUE,
        true,
        None,
        Some(e),
        Some(relay_public),
        None,
    );
    let mut first = [0u8; 64];
    let sent = device.map(|mut d| {
        let n = d.write_message(&144u16.to_be_bytes(), &mut first);
        (d, n)
    });
    cost_off();

    // The relay (not counted).
    let mut answer = [0u8; 64];
    let mut r = Hs::new(
        noise_nk(),
        PROLOGUE,
        false,
        Some(relay),
        Some(pair([3; 32])),
        None,
        None,
    )
    .ok();
    let answered = r.as_mut().and_then(|r| {
        let mut limit = [0u8; 2];
        r.read_message(&first[..50], &mut limit).ok()?;
        r.write_message(&[], &mut answer).ok()
    });

    // The device: the answer, the transport keys.
    cost_on();
    let done = match (sent, answered) {
        (Ok((mut d, Ok(50))), Some(48)) => {
            d.read_message(&answer[..48], &mut []).is_ok() && d.finalize().is_ok()
        }
        _ => false,
    };
    cost_off();
    debug::exit(if done {
        debug::EXIT_SUCCESS
    } else {
        debug::EXIT_FAILURE
    });
    loop {}
}

#[panic_handler]
fn panic(_: &PanicInfo) -> ! {
    debug::exit(debug::EXIT_FAILURE);
    loop {}
}
