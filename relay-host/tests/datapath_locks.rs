//! A paired session's data path takes no process-wide lock (issue 10, "What to build"
//! item 4): a running session's DATA both ways, its first TERMINATE and the DATA that
//! still flows the other way after it move through the session's own `Pair`, so the
//! router lock (`relay_router_locks_total` on /metrics) grows by a small constant for
//! the whole session, whatever its frame count. The relay runs in this process
//! (`relay_host::server::serve`), its terminals are raw frames over plain TCP.

#[path = "support/raw.rs"]
mod raw;

use anyhow::{Result, bail};
use raw::{In, Relay, Wire, data_frame, open_session};
use relay_proto::ReleaseReason;
use relay_proto::frame::Frame;
use tokio::io::AsyncWriteExt;

/// DATA exchanges (one each way) while both sides send.
const ROUND_TRIPS: usize = 1000;
/// DATA frames from the target after the requester's TERMINATE (a half-closed session).
const HALF_CLOSED: usize = 1000;
/// Router locks the whole session may take: handing the session out, giving it back at
/// its end and writing the RELEASEs, and whatever the timer task and the account
/// watcher do meanwhile. The router-only path took one or more per frame.
const MAX_LOCKS: f64 = 32.0;
const SIZE: usize = 64;

/// The next frame on `w` must be `want`.
async fn expect(w: &mut Wire, want: &Frame) -> Result<()> {
    match w.next().await? {
        In::Control(f) if f == *want => Ok(()),
        In::Control(f) => bail!("{f:?} where {want:?} was due"),
        In::Data(n) => bail!("DATA of {n} bytes where {want:?} was due"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_paired_sessions_data_and_terminate_take_no_router_lock() -> Result<()> {
    let relay = Relay::start(1)?;
    let (mut req, mut tgt) = open_session(relay.plain, 0).await?;
    let locks = "relay_router_locks_total";
    let before = relay.metric(locks).await?;
    let data = data_frame(SIZE)?;
    for _ in 0..ROUND_TRIPS {
        req.tcp.write_all(&data).await?;
        assert_eq!(tgt.next_data().await?, SIZE);
        tgt.tcp.write_all(&data).await?;
        assert_eq!(req.next_data().await?, SIZE);
    }
    req.send(&Frame::Terminate).await?;
    expect(&mut tgt, &Frame::Terminate).await?;
    for _ in 0..HALF_CLOSED {
        tgt.tcp.write_all(&data).await?;
        assert_eq!(req.next_data().await?, SIZE);
    }
    tgt.send(&Frame::Terminate).await?;
    let release = Frame::Release {
        reason: ReleaseReason::Normal,
    };
    expect(&mut req, &Frame::Terminate).await?;
    expect(&mut req, &release).await?;
    expect(&mut tgt, &release).await?;
    let taken = relay.metric(locks).await? - before;
    assert!(
        taken <= MAX_LOCKS,
        "{taken} router locks for {} DATA frames and two TERMINATEs",
        2 * ROUND_TRIPS + HALF_CLOSED
    );
    // The session's end was the router's, with every byte counted.
    assert_eq!(relay.metric("relay_active_sessions").await?, 0.0);
    let relayed = relay.metric("relay_relayed_bytes_total").await?;
    assert_eq!(relayed, ((2 * ROUND_TRIPS + HALF_CLOSED) * SIZE) as f64);
    relay.stop().await
}
