//! Prints the memory of the state machines: `cargo run -p relay-proto --example sizes`.
//!
//! A terminal's per-connection cost is the difference between terminals with 2 and 1
//! connections; the relay's per-connection cost is its table entry (plus the `Option`
//! slot in fixed tables).

use core::mem::size_of;
use relay_proto::relay::{ConnEntry, TermEntry};
use relay_proto::terminal::Terminal;

fn main() {
    let t1 = size_of::<Terminal<1>>();
    let t2 = size_of::<Terminal<2>>();
    println!("terminal manager, 1 connection:         {t1:>5} bytes");
    println!("terminal manager, 2 connections:        {t2:>5} bytes");
    println!(
        "one terminal connection machine (slot): {:>5} bytes",
        t2 - t1
    );
    println!(
        "relay core, per-connection entry:       {:>5} bytes",
        size_of::<ConnEntry>()
    );
    println!(
        "relay core, per-connection slot (fixed):{:>5} bytes",
        size_of::<Option<ConnEntry>>()
    );
    println!(
        "relay core, per-terminal entry:         {:>5} bytes",
        size_of::<TermEntry>()
    );
}
