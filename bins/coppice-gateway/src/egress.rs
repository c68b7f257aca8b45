//! Blocked egress becomes `security.violation`: the network role reports, from the kernel,
//! the connection attempts its rules dropped (a rate-limited sample per sandbox), and each
//! report of a sandbox the gateway knows is recorded as an event for the event log and the
//! webhooks, with Sandforge's `violation_type: "network_egress"`, `blocked_destination`
//! (`address:port`) and `action: "blocked"`, plus the address, port, protocol and the limit
//! that blocked it (`policy`, `operator`, `metadata`, `host`, `sandbox`).

use std::sync::Arc;
use std::time::Duration;

use coppice_events::event::{Blocked, Event, SecurityViolation};
use coppice_lifecycle::backend::{BlockedEgress, Network};
use coppice_lifecycle::state::SandboxState;
use serde_json::Value;

use crate::{context, now, Gateway};

/// The pause after the network role failed to report, before asking again.
const RETRY_AFTER_FAILURE: Duration = Duration::from_secs(5);

/// Records the network role's reports of blocked egress until the process ends; returns at
/// once when sandboxes have no network.
pub(crate) async fn watch_blocked(gw: Arc<Gateway>) {
    let Some(net) = gw.runtime.network().cloned() else {
        return;
    };
    loop {
        match net.blocked().await {
            Ok(batch) if batch.is_empty() => {}
            Ok(batch) => record(&gw, &batch),
            Err(e) => {
                tracing::warn!(error = %e, "reading blocked egress failed; retrying");
                tokio::time::sleep(RETRY_AFTER_FAILURE).await;
            }
        }
    }
}

/// The events for `batch`, recorded in one transaction.
fn record(gw: &Gateway, batch: &[BlockedEgress]) {
    let at = now();
    let events: Vec<Event> = batch
        .iter()
        .filter_map(|b| {
            let entry = gw.entry(&b.id)?;
            let record = entry.record();
            // A report that outlived its sandbox describes nobody the API still shows.
            if !matches!(
                record.lifecycle.state,
                SandboxState::Running | SandboxState::Paused
            ) {
                return None;
            }
            Some(event(&context(&record), b, at))
        })
        .collect();
    if events.is_empty() {
        return;
    }
    match gw.registry().record_events(&events) {
        Ok(()) => {
            gw.metrics.egress_blocked(events.len());
            gw.wake_dispatcher();
        }
        Err(e) => tracing::warn!(error = %e, "recording blocked egress failed"),
    }
}

fn event(
    ctx: &coppice_events::event::SandboxContext,
    b: &BlockedEgress,
    at: coppice_lifecycle::state::Millis,
) -> Event {
    let destination = match b.port {
        Some(port) => format!("{}:{port}", b.destination),
        None => b.destination.to_string(),
    };
    let mut event = Event::security_violation(
        ctx,
        &SecurityViolation {
            violation_type: "network_egress".into(),
            attempted_command: String::new(),
            blocked: Blocked::Destination(destination),
            action: "blocked".into(),
            occurrences: None,
        },
        at,
    );
    if let Some(Value::Object(data)) = event.event_data.as_mut() {
        data.insert(
            "destination_address".into(),
            b.destination.to_string().into(),
        );
        data.insert(
            "destination_port".into(),
            b.port.map_or(Value::Null, Value::from),
        );
        data.insert("protocol".into(), b.protocol.as_str().into());
        data.insert("reason".into(), b.reason.as_str().into());
    }
    event
}
