//! Prometheus metrics, served as text on `--metrics ADDR` at `/metrics`, with `/healthz`.
//!
//! Why `prometheus-client`: it is the Prometheus project's own Rust client, keeps metrics in
//! a registry value rather than process-global state (so tests and several servers in one
//! process do not share counters), and its metrics are plain atomics, so updating one on
//! the data path costs an atomic add. It does not serve HTTP: a minimal hyper 1 server does
//! that below (hyper is the HTTP implementation under axum and reqwest; a framework would add
//! nothing for two fixed paths).

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use http_body_util::Full;
use hyper::body::{Bytes, Incoming};
use hyper::{Method, Request, Response, StatusCode, header};
use hyper_util::rt::{TokioIo, TokioTimer};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use tokio::net::TcpListener;

use crate::admin::{Access, Answer, Board};

/// How a login ended, for `relay_logins_total{outcome}`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LoginOutcome {
    /// Logged in.
    Ok,
    /// Wrong password, unknown account, or a bad resumption credential.
    Failed,
    /// Refused by the failed-login throttle without checking.
    Throttled,
}

/// What a login presented, for `relay_logins_total{method}`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LoginMethod {
    /// User ID and password (argon2 runs).
    Password,
    /// A resumption credential (an HMAC check only).
    Resumption,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct LoginLabels {
    method: &'static str,
    outcome: &'static str,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct DemandLabels {
    outcome: &'static str,
}

/// Which cluster node a /metrics page is (`relay_node_info`).
#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct NodeLabels {
    node: String,
    address: String,
}

/// The relay's metrics. Share it as `Arc<Metrics>`; every update is an atomic operation.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    /// Open client connections (TLS and plain, logged in or not).
    pub connections: Gauge,
    /// Terminals logged in (one per account instance, however many connections it has).
    pub logged_in_terminals: Gauge,
    /// Sessions being relayed.
    pub active_sessions: Gauge,
    /// 1 while this relay is fenced: a node of a cluster that cannot write its heartbeat
    /// serves no terminal (docs/CLUSTER.md, part 6).
    pub fenced: Gauge,
    /// Reachable instances ended here because another node recorded a newer one of the
    /// same user ID (newest wins across nodes, docs/CLUSTER.md part 4).
    pub replaced_from_elsewhere: Counter,
    /// Payload bytes relayed, both directions added.
    pub bytes_relayed: Counter,
    /// Clients of published ports closed at once: their source is outside the port's
    /// allow-list.
    pub published_refused: Counter,
    /// Times the router's lock (the one process-wide lock, server.rs) was taken: it grows
    /// with logins, demands, session starts and ends, deadlines, not with a running
    /// session's bytes.
    pub router_locks: Counter,
    logins: Family<LoginLabels, Counter>,
    demands: Family<DemandLabels, Counter>,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// A fresh registry with every metric at zero.
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("relay");
        let connections = Gauge::default();
        let logged_in_terminals = Gauge::default();
        let active_sessions = Gauge::default();
        let fenced = Gauge::default();
        let replaced_from_elsewhere = Counter::default();
        let bytes_relayed = Counter::default();
        let published_refused = Counter::default();
        let router_locks = Counter::default();
        let logins = Family::<LoginLabels, Counter>::default();
        let demands = Family::<DemandLabels, Counter>::default();
        registry.register(
            "connections",
            "Open client connections",
            connections.clone(),
        );
        registry.register(
            "logged_in_terminals",
            "Terminals logged in",
            logged_in_terminals.clone(),
        );
        registry.register(
            "active_sessions",
            "Sessions being relayed",
            active_sessions.clone(),
        );
        registry.register(
            "fenced",
            "1 while this cluster node cannot write its heartbeat and serves no terminal",
            fenced.clone(),
        );
        registry.register(
            "replaced_from_other_nodes",
            "Instances ended here because another cluster node recorded a newer one",
            replaced_from_elsewhere.clone(),
        );
        registry.register(
            "relayed_bytes",
            "Payload bytes relayed, both directions",
            bytes_relayed.clone(),
        );
        registry.register(
            "published_refused",
            "Clients of published ports refused by the source allow-list",
            published_refused.clone(),
        );
        registry.register(
            "router_locks",
            "Acquisitions of the router lock (not taken by a running session's data)",
            router_locks.clone(),
        );
        registry.register("logins", "Logins by method and outcome", logins.clone());
        registry.register("demands", "Connection demands by outcome", demands.clone());
        Self {
            registry,
            connections,
            logged_in_terminals,
            active_sessions,
            fenced,
            replaced_from_elsewhere,
            bytes_relayed,
            published_refused,
            router_locks,
            logins,
            demands,
        }
    }

    /// Says which cluster node this is (`relay_node_info{node, address} 1`) and adds
    /// `relay_cluster_nodes_alive`, read from `alive` (kept by the presence copy): every
    /// node's /metrics then tells which node it is and how much of the cluster it sees.
    pub fn cluster_node(&mut self, node: &str, address: &str, alive: Gauge) {
        let info = Family::<NodeLabels, Gauge>::default();
        info.get_or_create(&NodeLabels {
            node: node.to_owned(),
            address: address.to_owned(),
        })
        .set(1);
        self.registry.register(
            "node_info",
            "This cluster node: its id in relay.nodes and the address it advertises",
            info,
        );
        self.registry.register(
            "cluster_nodes_alive",
            "Cluster nodes (this one included) whose heartbeat this node last saw fresh",
            alive,
        );
    }

    /// Counts one login.
    pub fn login(&self, method: LoginMethod, outcome: LoginOutcome) {
        let method = match method {
            LoginMethod::Password => "password",
            LoginMethod::Resumption => "resumption",
        };
        let outcome = match outcome {
            LoginOutcome::Ok => "ok",
            LoginOutcome::Failed => "failed",
            LoginOutcome::Throttled => "throttled",
        };
        self.logins
            .get_or_create(&LoginLabels { method, outcome })
            .inc();
    }

    /// Counts one demand; `outcome` is a short snake_case word from a fixed set (for
    /// example `accepted`, `rejected`, `offline`, `forbidden`, `timeout`), so the label
    /// set stays bounded.
    pub fn demand(&self, outcome: &'static str) {
        self.demands.get_or_create(&DemandLabels { outcome }).inc();
    }

    /// The text exposition (OpenMetrics text, which Prometheus scrapes natively).
    pub fn encode(&self) -> String {
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry)
            .expect("writing to a String cannot fail");
        out
    }
}

const OPENMETRICS: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// The dashboard served beside the metrics ([`crate::admin`]).
#[derive(Debug)]
pub struct Dashboard {
    /// What the page shows.
    pub board: Arc<Board>,
    /// Who may see it.
    pub access: Access,
}

/// Serves `/metrics`, `/healthz` and the dashboard on `listener` until the returned future
/// is dropped. Meant for an operator: HTTP/1.1, no TLS, a header deadline so an idle client
/// cannot hold a connection open forever.
pub async fn serve(
    listener: TcpListener,
    metrics: Arc<Metrics>,
    dashboard: Arc<Dashboard>,
) -> std::io::Result<()> {
    loop {
        let (stream, peer) = listener.accept().await?;
        let metrics = metrics.clone();
        let dashboard = dashboard.clone();
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |req| {
                let (metrics, dashboard) = (metrics.clone(), dashboard.clone());
                async move { Ok::<_, Infallible>(respond(&metrics, &dashboard, &req)) }
            });
            let result = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(Duration::from_secs(10))
                .serve_connection(TokioIo::new(stream), service)
                .await;
            if let Err(e) = result {
                tracing::debug!(%peer, "metrics connection: {e}");
            }
        });
    }
}

fn respond(
    metrics: &Metrics,
    dashboard: &Dashboard,
    req: &Request<Incoming>,
) -> Response<Full<Bytes>> {
    let reply = |status, content_type, body: String| {
        Response::builder()
            .status(status)
            .header(header::CONTENT_TYPE, content_type)
            .body(Full::new(Bytes::from(body)))
            .expect("static response parts are valid")
    };
    let uri = req.uri();
    let asked = crate::admin::Request {
        post: req.method() == Method::POST,
        path: uri.path(),
        query: uri.query().unwrap_or(""),
        host: req
            .headers()
            .get(header::HOST)
            .and_then(|h| h.to_str().ok())
            .unwrap_or(""),
    };
    match crate::admin::answer(&dashboard.board, &dashboard.access, asked) {
        Answer::Page(html) => return reply(StatusCode::OK, "text/html; charset=utf-8", html),
        Answer::SeeOther(to) => {
            return Response::builder()
                .status(StatusCode::SEE_OTHER)
                .header(header::LOCATION, to)
                .body(Full::new(Bytes::new()))
                .expect("static response parts are valid");
        }
        Answer::Forbidden => {
            let why = "the dashboard needs ?token=admin_token, or a loopback listener asked for by a loopback name (and its buttons the page's nonce)\n";
            return reply(StatusCode::FORBIDDEN, "text/plain", why.into());
        }
        Answer::NotMine => {}
    }
    match (req.method(), req.uri().path()) {
        (&Method::GET, "/metrics") => reply(StatusCode::OK, OPENMETRICS, metrics.encode()),
        (&Method::GET, "/healthz") => reply(StatusCode::OK, "text/plain", "ok\n".into()),
        (&Method::GET, _) => reply(StatusCode::NOT_FOUND, "text/plain", "not found\n".into()),
        _ => reply(
            StatusCode::METHOD_NOT_ALLOWED,
            "text/plain",
            "only GET\n".into(),
        ),
    }
}

#[cfg(test)]
mod tests {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpStream;

    use super::*;

    #[test]
    fn exposition_names_and_labels() {
        let m = Metrics::new();
        m.connections.inc();
        m.connections.inc();
        m.connections.dec();
        m.logged_in_terminals.set(5);
        m.active_sessions.inc();
        m.bytes_relayed.inc_by(1234);
        m.router_locks.inc();
        m.login(LoginMethod::Password, LoginOutcome::Ok);
        m.login(LoginMethod::Password, LoginOutcome::Failed);
        m.login(LoginMethod::Resumption, LoginOutcome::Ok);
        m.demand("accepted");
        m.demand("accepted");
        m.demand("offline");
        let text = m.encode();
        for line in [
            "relay_connections 1",
            "relay_logged_in_terminals 5",
            "relay_active_sessions 1",
            "relay_relayed_bytes_total 1234",
            "relay_router_locks_total 1",
            "relay_logins_total{method=\"password\",outcome=\"ok\"} 1",
            "relay_logins_total{method=\"password\",outcome=\"failed\"} 1",
            "relay_logins_total{method=\"resumption\",outcome=\"ok\"} 1",
            "relay_demands_total{outcome=\"accepted\"} 2",
            "relay_demands_total{outcome=\"offline\"} 1",
        ] {
            assert!(
                text.lines().any(|l| l == line),
                "missing {line:?} in\n{text}"
            );
        }
        assert!(text.ends_with("# EOF\n"));
    }

    async fn get(addr: std::net::SocketAddr, path: &str) -> String {
        let mut s = TcpStream::connect(addr).await.unwrap();
        s.write_all(
            format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes(),
        )
        .await
        .unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).await.unwrap();
        out
    }

    #[tokio::test]
    async fn http_endpoints() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let metrics = Arc::new(Metrics::new());
        metrics.bytes_relayed.inc_by(7);
        let (board, _requests) = Board::new().unwrap();
        let dashboard = Dashboard {
            board: Arc::new(board),
            access: Access {
                listen: addr,
                token: None,
            },
        };
        let server = tokio::spawn(serve(listener, metrics, Arc::new(dashboard)));

        let health = get(addr, "/healthz").await;
        assert!(health.starts_with("HTTP/1.1 200"), "{health}");
        assert!(health.ends_with("ok\n"));
        let body = get(addr, "/metrics").await;
        assert!(body.starts_with("HTTP/1.1 200"), "{body}");
        assert!(body.contains("application/openmetrics-text"));
        assert!(body.contains("relay_relayed_bytes_total 7"), "{body}");
        assert!(get(addr, "/nope").await.starts_with("HTTP/1.1 404"));
        server.abort();
    }
}
