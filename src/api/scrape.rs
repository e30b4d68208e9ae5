//! `GET /metrics`: [`crate::metrics`] in Prometheus's text format, with the
//! cluster's figures read from the store at scrape time; and the timing of
//! every API request by route.
//!
//! Served on the API's listeners, so the TCP one asks for the token like
//! every other route. A store that does not answer still gets a scrape: this
//! process's own figures, and `flotilla_store_reachable 0`.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Instant;

use axum::extract::{MatchedPath, Request, State};
use axum::http::header;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

use super::Shared;
use crate::metrics::{self, Cluster, METRICS};
use crate::registry::{RegistryError, ops};
use crate::units::UnitKind;

/// The exposition's content type (text format 0.0.4).
const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// `GET /metrics`.
pub async fn metrics(State(shared): State<Arc<Shared>>) -> Response {
    let cluster = match shared.client().await {
        Ok(client) => match cluster(client).await {
            Ok(cluster) => Some(cluster),
            Err(e) => {
                tracing::debug!("metrics without the cluster's figures: {e}");
                None
            }
        },
        Err(_) => None,
    };
    (
        [(header::CONTENT_TYPE, CONTENT_TYPE)],
        metrics::render(cluster.as_ref()),
    )
        .into_response()
}

/// Reads the cluster's figures from the store.
async fn cluster(client: &crate::consensus::client::Client) -> Result<Cluster, RegistryError> {
    let records = ops::unit_records(client).await?;
    let rows = ops::unit_rows(client).await?;
    let machines = ops::machines(client).await?;
    let mut units_by_desired = BTreeMap::new();
    for record in records
        .iter()
        .filter(|r| r.name.kind() != UnitKind::Template)
    {
        *units_by_desired
            .entry(record.desired.to_string())
            .or_default() += 1;
    }
    let mut units_by_active = BTreeMap::new();
    for state in rows.iter().filter_map(|row| row.state.as_ref()) {
        *units_by_active
            .entry(state.state.active.clone())
            .or_default() += 1;
    }
    Ok(Cluster {
        units_by_desired,
        units_by_active,
        claimed: rows.iter().filter(|row| row.claimed).count() as u64,
        machines: machines.len() as u64,
    })
}

/// Times a request to a known route, labelled by method and route pattern
/// (`/fleet/v1/units/{*name}`, not the unit's name: one series per route).
pub async fn time_request(request: Request, next: Next) -> Response {
    let route = request
        .extensions()
        .get::<MatchedPath>()
        .map_or_else(|| "unmatched".to_string(), |p| p.as_str().to_string());
    let labels = metrics::api_labels(request.method().as_str(), &route);
    let started = Instant::now();
    let response = next.run(request).await;
    METRICS
        .api_request_seconds
        .observe(labels, started.elapsed());
    response
}
