//! The status page: every agent with a URL configuration, its state in colour, its last error
//! in words, since when it is connected and which replica holds it; counts per state with a
//! filter. Rendered on the server, complete without JavaScript; a small script of our own
//! (no framework, nothing from elsewhere) keeps it live from `/events`, a Server-Sent Events
//! stream fed by the same changes as the gRPC `WatchSessions`.
//!
//! Nothing on it is secret: no token, no key, no certificate. Every text from the database is
//! escaped, and the script writes text only (`textContent`), never markup.

use std::collections::HashMap;
use std::convert::Infallible;
use std::fmt::Write as _;
use std::time::Duration;

use axum::extract::{Query, State};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use http::{HeaderValue, StatusCode, header};
use serde::{Deserialize, Serialize};
use tokio::sync::{broadcast, mpsc};
use tokio_stream::wrappers::ReceiverStream;

use super::Ops;
use crate::domain::{Connection, Id, ReceptiveAgent, Timestamp};

/// At most this many rows are rendered; the counts cover every agent, and a filter narrows
/// the rows down.
const MAX_ROWS: usize = 2000;

/// The states, in the order the page lists them; `pending` is an agent nobody dials yet.
const STATES: [&str; 5] = [
    "connected",
    "connecting",
    "backing_off",
    "failed",
    "pending",
];

/// The page's query: `?state=failed`.
#[derive(Debug, Default, Deserialize)]
pub struct Filter {
    state: Option<String>,
}

/// `GET /`.
pub async fn page(State(ops): State<Ops>, Query(filter): Query<Filter>) -> Response {
    let wanted = match filter.state.as_deref() {
        None | Some("" | "all") => None,
        Some(state) => match STATES.iter().find(|s| **s == state) {
            Some(state) => Some(*state),
            None => {
                return (
                    StatusCode::BAD_REQUEST,
                    format!("unknown state; one of: {}\n", STATES.join(", ")),
                )
                    .into_response();
            }
        },
    };
    let (agents, connections) = match read(&ops).await {
        Ok(read) => read,
        Err(error) => {
            tracing::warn!(%error, "the status page cannot read the agents");
            return (
                StatusCode::SERVICE_UNAVAILABLE,
                "the database is unavailable: the status page cannot be shown\n",
            )
                .into_response();
        }
    };
    let html = render(
        &agents,
        &connections,
        wanted,
        ops.registry.replica(),
        ops.service.now(),
    );
    (
        [(header::CONTENT_TYPE, "text/html; charset=utf-8")],
        secure(html.into_response()),
    )
        .into_response()
}

async fn read(ops: &Ops) -> crate::domain::Result<(Vec<ReceptiveAgent>, HashMap<Id, Connection>)> {
    let agents = ops.service.receptive_agents().await?;
    let connections = ops
        .service
        .sessions()
        .all()
        .await?
        .into_iter()
        .map(|c| (c.agent_id, c))
        .collect();
    Ok((agents, connections))
}

/// The headers every response of the page carries: its own script and style only, no
/// framing, no sniffing, no referrer.
fn secure(mut response: Response) -> Response {
    let headers = response.headers_mut();
    for (name, value) in [
        (
            header::CONTENT_SECURITY_POLICY,
            "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; \
             base-uri 'none'; form-action 'self'; frame-ancestors 'none'",
        ),
        (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
        (header::REFERRER_POLICY, "no-referrer"),
        (header::X_FRAME_OPTIONS, "DENY"),
        (header::CACHE_CONTROL, "no-store"),
    ] {
        headers.insert(name, HeaderValue::from_static(value));
    }
    response
}

/// The state of an agent's row.
fn state_of(connection: Option<&Connection>) -> &'static str {
    connection.map_or("pending", |c| c.phase.as_str())
}

/// The page's HTML.
fn render(
    agents: &[ReceptiveAgent],
    connections: &HashMap<Id, Connection>,
    wanted: Option<&str>,
    replica: &str,
    now: Timestamp,
) -> String {
    let mut counts: HashMap<&str, usize> = HashMap::new();
    for agent in agents {
        *counts
            .entry(state_of(connections.get(&agent.agent_id)))
            .or_default() += 1;
    }
    let mut html = String::with_capacity(4096 + agents.len().min(MAX_ROWS) * 400);
    let _ = write!(
        html,
        "<!doctype html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n\
         <meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\n\
         <title>kas-gateway: agents</title>\n\
         <link rel=\"stylesheet\" href=\"/status.css\">\n\
         <noscript><meta http-equiv=\"refresh\" content=\"30\"></noscript>\n\
         <script src=\"/status.js\" defer></script>\n</head>\n\
         <body data-filter=\"{filter}\" data-total=\"{total}\">\n<header>\n<h1>kas-gateway</h1>\n\
         <p>Replica <b>{replica}</b> · version {version} · {total} agent{plural} with a URL \
         configuration · <span id=\"live\">rendered at {now}</span></p>\n</header>\n\
         <nav aria-label=\"Filter by state\">\n<a href=\"/\" class=\"count all{all_current}\">all \
         <b>{total}</b></a>\n",
        filter = wanted.unwrap_or(""),
        total = agents.len(),
        plural = if agents.len() == 1 { "" } else { "s" },
        replica = escape(replica),
        version = env!("CARGO_PKG_VERSION"),
        now = escape(&human_time(now)),
        all_current = if wanted.is_none() { " current" } else { "" },
    );
    for state in STATES {
        let _ = writeln!(
            html,
            "<a href=\"/?state={state}\" class=\"count {state}{current}\">{label} \
             <b id=\"count-{state}\">{count}</b></a>",
            label = state.replace('_', " "),
            count = counts.get(state).copied().unwrap_or(0),
            current = if wanted == Some(state) {
                " current"
            } else {
                ""
            },
        );
    }
    html.push_str(
        "</nav>\n<table id=\"agents\">\n<thead><tr><th>Project</th><th>Agent</th><th>URL</th>\
         <th>State</th><th>Last error</th><th>Connected since</th><th>Replica</th></tr></thead>\n\
         <tbody>\n",
    );
    let mut shown = 0;
    let mut matching = 0;
    for agent in agents {
        let connection = connections.get(&agent.agent_id);
        let state = state_of(connection);
        if wanted.is_some_and(|w| w != state) {
            continue;
        }
        matching += 1;
        if shown == MAX_ROWS {
            continue;
        }
        shown += 1;
        row(&mut html, agent, connection, state);
    }
    html.push_str("</tbody>\n</table>\n");
    if matching == 0 {
        html.push_str("<p class=\"empty\">No agent here.</p>\n");
    } else if matching > shown {
        let _ = writeln!(
            html,
            "<p class=\"more\">The first {shown} of {matching} agents are shown: filter by \
             state to see the others.</p>"
        );
    }
    html.push_str("</body>\n</html>\n");
    html
}

/// One agent's row; ids and classes are what the script updates.
fn row(html: &mut String, agent: &ReceptiveAgent, connection: Option<&Connection>, state: &str) {
    let (error, error_at) = connection
        .and_then(|c| c.last_error.as_deref().map(|e| (e, c.last_error_at)))
        .unwrap_or(("", None));
    let since = connection.and_then(|c| c.connected_since);
    let replica = connection.map_or("", |c| c.replica.as_str());
    let _ = writeln!(
        html,
        "<tr id=\"agent-{id}\" data-state=\"{state}\"><td>{project}</td>\
         <td>{name} <small>#{id}</small></td><td><code>{url}</code></td>\
         <td><span class=\"state {state}\">{label}</span></td>\
         <td class=\"error\">{error}{error_at}</td><td class=\"since\">{since}</td>\
         <td class=\"replica\">{replica}</td></tr>",
        id = agent.agent_id,
        project = escape(&agent.project_path),
        name = escape(&agent.agent_name),
        url = escape(&agent.url),
        label = state.replace('_', " "),
        error = escape(error),
        error_at = error_at
            .map(|at| format!(" <small>({})</small>", escape(&human_time(at))))
            .unwrap_or_default(),
        since = since.map(|at| escape(&human_time(at))).unwrap_or_default(),
        replica = escape(replica),
    );
}

/// `2026-11-26 02:10:33 UTC`.
fn human_time(at: Timestamp) -> String {
    let iso = at.to_iso8601();
    // `2026-11-26T02:10:33.123Z` → `2026-11-26 02:10:33 UTC`.
    match iso.get(..19) {
        Some(seconds) => format!("{} UTC", seconds.replace('T', " ")),
        None => iso,
    }
}

/// Text for HTML content and attribute values.
pub fn escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

/// One change as the script reads it.
#[derive(Debug, Serialize)]
struct Change<'a> {
    agent_id: Id,
    state: &'static str,
    last_error: &'a str,
    last_error_at: Option<String>,
    connected_since: Option<String>,
    replica: &'a str,
    project_path: Option<&'a str>,
    agent_name: Option<&'a str>,
    url: &'a str,
}

/// `GET /events`: the current state of every agent, then each change, as `state` events;
/// ends when the gateway shuts down (the browser reconnects to whichever replica is up).
pub async fn events(State(ops): State<Ops>) -> Response {
    let sessions = std::sync::Arc::clone(ops.service.sessions());
    // Subscribed before the first read: nothing between the two is missed.
    let mut changes = sessions.subscribe();
    let (tx, rx) = mpsc::channel::<Result<Event, Infallible>>(64);
    let shutdown = ops.shutdown.clone();
    tokio::spawn(async move {
        let mut names = Names::default();
        let mut send_all = true;
        loop {
            if send_all {
                send_all = false;
                names.reload(&ops).await;
                let Ok(current) = sessions.all().await else {
                    return;
                };
                for connection in current {
                    if tx.send(Ok(event(&connection, &names))).await.is_err() {
                        return;
                    }
                }
            }
            let next = tokio::select! {
                () = tx.closed() => return,
                () = shutdown.cancelled() => return,
                next = changes.recv() => next,
            };
            match next {
                Ok(connection) => {
                    if !names.agents.contains_key(&connection.agent_id) {
                        names.reload_soon(&ops).await;
                    }
                    if tx.send(Ok(event(&connection, &names))).await.is_err() {
                        return;
                    }
                }
                // Too slow a reader: start again from the current state.
                Err(broadcast::error::RecvError::Lagged(_)) => send_all = true,
                Err(broadcast::error::RecvError::Closed) => return,
            }
        }
    });
    let stream = ReceiverStream::new(rx);
    secure(
        Sse::new(stream)
            .keep_alive(KeepAlive::new().interval(Duration::from_secs(15)))
            .into_response(),
    )
}

/// Agents' names for the events, read again when an unknown agent shows up (at most once a
/// second).
#[derive(Default)]
struct Names {
    agents: HashMap<Id, ReceptiveAgent>,
    read_at: Option<std::time::Instant>,
}

impl Names {
    async fn reload(&mut self, ops: &Ops) {
        self.read_at = Some(std::time::Instant::now());
        if let Ok(agents) = ops.service.receptive_agents().await {
            self.agents = agents.into_iter().map(|a| (a.agent_id, a)).collect();
        }
    }

    async fn reload_soon(&mut self, ops: &Ops) {
        if self
            .read_at
            .is_none_or(|at| at.elapsed() >= Duration::from_secs(1))
        {
            self.reload(ops).await;
        }
    }
}

fn event(connection: &Connection, names: &Names) -> Event {
    let agent = names.agents.get(&connection.agent_id);
    let change = Change {
        agent_id: connection.agent_id,
        state: connection.phase.as_str(),
        last_error: connection.last_error.as_deref().unwrap_or(""),
        last_error_at: connection.last_error_at.map(human_time),
        connected_since: connection.connected_since.map(human_time),
        replica: &connection.replica,
        project_path: agent.map(|a| a.project_path.as_str()),
        agent_name: agent.map(|a| a.agent_name.as_str()),
        url: &connection.url,
    };
    Event::default()
        .event("state")
        .json_data(change)
        .unwrap_or_else(|_| Event::default().comment("unencodable change"))
}

/// `GET /status.css`.
pub async fn style() -> Response {
    secure(([(header::CONTENT_TYPE, "text/css; charset=utf-8")], STYLE).into_response())
}

/// `GET /status.js`.
pub async fn script() -> Response {
    secure(
        (
            [(header::CONTENT_TYPE, "text/javascript; charset=utf-8")],
            SCRIPT,
        )
            .into_response(),
    )
}

const STYLE: &str = include_str!("status.css");
const SCRIPT: &str = include_str!("status.js");

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::Phase;

    fn agent(id: Id, project: &str, name: &str) -> ReceptiveAgent {
        ReceptiveAgent {
            agent_id: id,
            agent_name: name.into(),
            project_id: 1,
            project_path: project.into(),
            url: format!("grpc://agent-{id}.example:4242"),
        }
    }

    fn connection(id: Id, phase: Phase, error: Option<&str>) -> Connection {
        Connection {
            agent_id: id,
            url_configuration_id: id,
            url: format!("grpc://agent-{id}.example:4242"),
            phase,
            last_error: error.map(str::to_owned),
            last_attempt_at: None,
            connected_since: (phase == Phase::Connected).then(|| Timestamp::from_millis(0)),
            last_error_at: error.map(|_| Timestamp::from_millis(1000)),
            metadata: None,
            token_id: None,
            replica: "gw-0".into(),
            epoch: 1,
        }
    }

    #[test]
    fn every_phase_is_a_state_of_the_page() {
        for phase in crate::metrics::STATES {
            assert!(STATES.contains(&phase.as_str()), "{phase:?}");
        }
    }

    #[test]
    fn rows_counts_and_filter() {
        let agents = [
            agent(1, "root/p", "up"),
            agent(2, "root/p", "<script>alert(1)</script>"),
            agent(3, "root/q", "new"),
        ];
        let connections: HashMap<Id, Connection> = [
            connection(1, Phase::Connected, None),
            connection(
                2,
                Phase::BackingOff,
                Some("connection refused by \"x\" & <y>"),
            ),
        ]
        .into_iter()
        .map(|c| (c.agent_id, c))
        .collect();
        let html = render(
            &agents,
            &connections,
            None,
            "gw-0",
            Timestamp::from_millis(0),
        );
        assert!(html.contains("<b id=\"count-connected\">1</b>"));
        assert!(html.contains("<b id=\"count-backing_off\">1</b>"));
        assert!(html.contains("<b id=\"count-pending\">1</b>"));
        assert!(html.contains("<b id=\"count-failed\">0</b>"));
        assert!(html.contains("<tr id=\"agent-3\" data-state=\"pending\">"));
        assert!(html.contains("&lt;script&gt;alert(1)&lt;/script&gt;"));
        assert!(!html.contains("<script>alert"));
        assert!(html.contains("connection refused by &quot;x&quot; &amp; &lt;y&gt;"));
        assert!(html.contains("1970-01-01 00:00:00 UTC"));

        let failed = render(
            &agents,
            &connections,
            Some("backing_off"),
            "gw-0",
            Timestamp::from_millis(0),
        );
        assert!(failed.contains("id=\"agent-2\""));
        assert!(!failed.contains("id=\"agent-1\""));
        // The counts still cover every agent.
        assert!(failed.contains("<b id=\"count-connected\">1</b>"));
    }

    #[test]
    fn long_lists_are_cut_with_a_note() {
        let agents: Vec<ReceptiveAgent> = (0..(MAX_ROWS as Id + 5))
            .map(|i| agent(i, "root/p", "a"))
            .collect();
        let html = render(
            &agents,
            &HashMap::new(),
            None,
            "gw-0",
            Timestamp::from_millis(0),
        );
        assert_eq!(html.matches("<tr id=\"agent-").count(), MAX_ROWS);
        assert!(html.contains(&format!("The first {MAX_ROWS} of {} agents", MAX_ROWS + 5)));
    }
}
