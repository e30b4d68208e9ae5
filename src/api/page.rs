//! `GET /ui`: the status page, one read-only HTML page rendered on the
//! server from the store: the leader and members, the store's alarms, the
//! machines, every unit with its states and machine, and the reboot locks. It reloads itself
//! every [`REFRESH_SECS`] seconds (a `<meta http-equiv="refresh">`: no script,
//! no frontend build) and is served on the API's listeners, so the TCP one
//! asks for the token like every other route.
//!
//! Everything shown is escaped: unit names, host names and metadata come from
//! whoever wrote them.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::Arc;

use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};

use super::Shared;
use crate::registry::ops::{self, MachineRow, UnitRow};
use crate::registry::semaphore::Semaphore;
use crate::registry::{RegistryError, lock};

/// Seconds between reloads of the page.
pub const REFRESH_SECS: u32 = 5;

/// What the page shows, read from the store.
struct View {
    leader: String,
    term: u64,
    revision: u64,
    /// The NOSPACE alarm of the member that answered (see
    /// [`crate::consensus::limits`]).
    no_space: bool,
    members: Vec<(String, String, bool)>,
    machines: Vec<MachineRow>,
    units: Vec<UnitRow>,
    locks: BTreeMap<String, Semaphore>,
    now_ms: u64,
}

/// `GET /ui`.
pub async fn page(State(shared): State<Arc<Shared>>) -> Response {
    let view = read(&shared).await;
    let (status, body) = match view {
        Ok(view) => (StatusCode::OK, render(&view)),
        Err(why) => (
            StatusCode::SERVICE_UNAVAILABLE,
            document(&format!(
                "<p class=bad>The store does not answer: {}</p>",
                escape(&why)
            )),
        ),
    };
    (
        status,
        [(header::CONTENT_TYPE, "text/html; charset=utf-8")],
        body,
    )
        .into_response()
}

/// Reads the page's view; the error is shown on the page as it is.
async fn read(shared: &Shared) -> Result<View, String> {
    let text = |e: RegistryError| e.to_string();
    let client = shared.client().await.map_err(|e| e.to_string())?;
    let index = shared.registry().await.map_err(|e| e.to_string())?;
    let status = client.status().await.map_err(|e| e.to_string())?;
    let members = status
        .members
        .iter()
        .map(|(id, m)| (m.name.clone(), m.peer_addr.clone(), *id == status.leader))
        .collect();
    let leader = status
        .members
        .get(&status.leader)
        .map_or_else(|| "none known".to_string(), |m| m.name.clone());
    let locks = lock::semaphores(client).await.map_err(|e| e.to_string())?;
    Ok(View {
        leader,
        term: status.term,
        revision: status.revision,
        no_space: status.no_space,
        members,
        machines: ops::machine_rows(client, &index).await.map_err(text)?,
        units: index.unit_rows().collect(),
        locks,
        now_ms: std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64),
    })
}

fn render(view: &View) -> String {
    let mut html = String::new();
    let _ = write!(
        html,
        "<p>leader <b>{}</b>, term {}, revision {}</p>",
        escape(&view.leader),
        view.term,
        view.revision
    );
    html.push_str(if view.no_space {
        "<p class=bad>alarm: NOSPACE, the store is over its quota (quota_bytes): writes \
         that add data are refused until keys are deleted</p>"
    } else {
        "<p>alarms: none</p>"
    });
    html.push_str("<h2>Members</h2><table><tr><th>name<th>peer address<th>role</tr>");
    for (name, peer, leads) in &view.members {
        let role = if *leads { "leader" } else { "member" };
        let _ = write!(
            html,
            "<tr><td>{}<td>{}<td>{role}</tr>",
            escape(name),
            escape(peer)
        );
    }
    html.push_str("</table>");

    let hosts: BTreeMap<&str, &str> = view
        .machines
        .iter()
        .map(|m| (m.record.id.as_str(), m.record.hostname.as_str()))
        .collect();
    let _ = write!(
        html,
        "<h2>Machines ({})</h2><table><tr><th>machine<th>host<th>address<th>units\
         <th>renewed<th>metadata</tr>",
        view.machines.len()
    );
    for m in &view.machines {
        let renewed = m.renewal.map_or_else(String::new, |r| {
            let ago = view.now_ms.saturating_sub(r.at_ms) / 1000;
            let late = if r.is_overdue(view.now_ms) {
                " <span class=bad>overdue</span>"
            } else {
                ""
            };
            format!("{ago} s ago{late}")
        });
        let drained = if m.drained {
            " <span class=warn>drained</span>"
        } else {
            ""
        };
        let metadata: Vec<String> = m
            .record
            .metadata
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect();
        let _ = write!(
            html,
            "<tr><td title=\"{id}\">{short}{drained}<td>{}<td>{}<td>{}<td>{renewed}<td>{}</tr>",
            escape(&m.record.hostname),
            escape(&m.record.ip),
            m.units,
            escape(&metadata.join(", ")),
            id = escape(&m.record.id),
            short = escape(short(&m.record.id)),
        );
    }
    html.push_str("</table>");

    let _ = write!(
        html,
        "<h2>Units ({})</h2><table><tr><th>unit<th>desired<th>machine<th>active<th>sub</tr>",
        view.units.len()
    );
    for u in &view.units {
        let machine = u.machine.as_deref().map_or_else(
            || "<span class=warn>not placed</span>".to_string(),
            |id| {
                let host = hosts.get(id).copied().unwrap_or(short(id));
                let claimed = if u.claimed { "" } else { " (proposed)" };
                format!("{}{claimed}", escape(host))
            },
        );
        let state = u.state.as_ref().map(|s| &s.state);
        let (active, sub) = state.map_or(("-", "-"), |s| (s.active.as_str(), s.sub.as_str()));
        let class = match state {
            Some(s) if s.is_active() => "ok",
            Some(s) if s.is_failed() => "bad",
            _ => "",
        };
        let _ = write!(
            html,
            "<tr><td>{}<td>{}<td>{machine}<td class={class}>{}<td>{}</tr>",
            escape(u.name.as_ref()),
            u.desired,
            escape(active),
            escape(sub)
        );
    }
    html.push_str("</table>");

    html.push_str("<h2>Reboot locks</h2><table><tr><th>group<th>max<th>holders</tr>");
    for (group, semaphore) in &view.locks {
        let holders: Vec<String> = semaphore
            .holders
            .iter()
            .map(|h| {
                let host = hosts.get(h.id.as_str()).copied().unwrap_or(short(&h.id));
                let ago = (view.now_ms / 1000).saturating_sub(h.since);
                format!("{} ({ago} s)", escape(host))
            })
            .collect();
        let _ = write!(
            html,
            "<tr><td>{}<td>{}<td>{}</tr>",
            escape(group),
            semaphore.max,
            holders.join(", ")
        );
    }
    html.push_str("</table>");
    document(&html)
}

/// The page around `body`.
fn document(body: &str) -> String {
    format!(
        "<!doctype html><html><head><meta charset=utf-8>\
         <meta http-equiv=refresh content={REFRESH_SECS}>\
         <title>flotilla</title><style>\
         body{{font:14px sans-serif;margin:1em 2em}}\
         table{{border-collapse:collapse}}td,th{{padding:2px 10px;text-align:left}}\
         tr:nth-child(even){{background:#f3f3f3}}\
         .ok{{color:#070}}.bad{{color:#b00;font-weight:bold}}.warn{{color:#a60}}\
         </style></head><body><h1>flotilla</h1>{body}\
         <p><small>read-only; reloads every {REFRESH_SECS} s</small></p></body></html>"
    )
}

/// The first 12 characters of a machine id, as `list-machines` shows it.
fn short(id: &str) -> &str {
    id.get(..12).unwrap_or(id)
}

/// Text as HTML shows it, in element content and in quoted attributes.
fn escape(text: &str) -> String {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn markup_in_names_is_shown_not_run() {
        assert_eq!(
            escape("<script>alert('x')</script>&\""),
            "&lt;script&gt;alert(&#39;x&#39;)&lt;/script&gt;&amp;&quot;"
        );
    }
}
