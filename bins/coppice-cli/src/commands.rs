//! Each command: the request it makes and how its answer is shown.

use std::collections::{HashSet, VecDeque};
use std::io::Write;
use std::time::Duration;

use base64::Engine as _;
use bytes::Bytes;
use http::Method;
use http_body_util::Full;
use serde_json::{json, Value};

use crate::args::{Invocation, Words};
use crate::client::{encode, expect_json, Client};
use crate::output::{self, cell, table};
use crate::{doctor, EXIT_FAILED, EXIT_OK};

/// How often `-f` asks again.
const FOLLOW_EVERY: Duration = Duration::from_secs(1);
/// The agent's port, where `exec` sends its Connect call.
const ENVD_PORT: &str = "49983";

type Res = Result<u8, String>;

/// Runs the command `inv` names.
pub(crate) fn dispatch(inv: &Invocation, out: &mut dyn Write, err: &mut dyn Write) -> Res {
    let mut w = inv.words.clone();
    let noun = w.need("a command")?;
    if noun == "doctor" {
        let state_dir = w.value("--state-dir")?;
        w.done()?;
        return doctor::run(inv, state_dir.as_deref(), out);
    }
    let c = Cmd {
        client: Client::new(&inv.url, inv.api_key.clone())?,
        json: inv.json,
    };
    match noun.as_str() {
        "sandbox" | "sandboxes" | "sbx" => c.sandbox(w, out, err),
        "events" => c.events(w, out),
        "webhooks" | "webhook" => c.webhooks(w, out),
        "templates" | "template" => c.templates(w, out),
        "snapshots" | "snapshot" => c.snapshots(w, out),
        "pool" => c.pool(w, out),
        "keys" | "key" => c.keys(w, out),
        other => Err(format!(
            "unknown command {other:?} (coppice --help lists them)"
        )),
    }
}

struct Cmd {
    client: Client,
    json: bool,
}

fn io(e: std::io::Error) -> String {
    format!("writing the output: {e}")
}

impl Cmd {
    fn show(
        &self,
        out: &mut dyn Write,
        v: &Value,
        as_table: impl FnOnce(&mut dyn Write) -> std::io::Result<()>,
    ) -> Res {
        if self.json {
            output::json(out, v).map_err(io)?;
        } else {
            as_table(out).map_err(io)?;
        }
        Ok(EXIT_OK)
    }

    fn sandbox(&self, mut w: Words, out: &mut dyn Write, err: &mut dyn Write) -> Res {
        let verb =
            w.need("a sandbox command (list, info, kill, pause, resume, logs, metrics, exec)")?;
        match verb.as_str() {
            "list" | "ls" => {
                let states = w.value("--state")?;
                let metadata = w.values("--metadata")?;
                w.done()?;
                self.sandbox_list(states.as_deref(), &metadata, out)
            }
            "info" => {
                let id = w.need("the sandbox ID")?;
                w.done()?;
                let v =
                    self.client
                        .json(Method::GET, &format!("/sandboxes/{}", encode(&id)), None)?;
                self.show(out, &v, |out| {
                    let rows: Vec<Vec<String>> = [
                        "sandboxID",
                        "templateID",
                        "alias",
                        "state",
                        "startedAt",
                        "endAt",
                        "cpuCount",
                        "memoryMB",
                        "diskSizeMB",
                        "envdVersion",
                        "metadata",
                    ]
                    .iter()
                    .map(|k| vec![(*k).to_owned(), cell(&v, k)])
                    .collect();
                    table(out, &["FIELD", "VALUE"], &rows, "")
                })
            }
            "kill" | "rm" => {
                let ids = w.all()?;
                if ids.is_empty() {
                    return Err("missing the sandbox ID".into());
                }
                let mut failed = 0;
                for id in &ids {
                    match self.client.json(
                        Method::DELETE,
                        &format!("/sandboxes/{}", encode(id)),
                        None,
                    ) {
                        Ok(_) => writeln!(out, "killed {id}").map_err(io)?,
                        Err(e) => {
                            failed += 1;
                            writeln!(err, "coppice: {e}").map_err(io)?;
                        }
                    }
                }
                Ok(if failed == 0 { EXIT_OK } else { EXIT_FAILED })
            }
            "pause" => {
                let id = w.need("the sandbox ID")?;
                w.done()?;
                self.client.json(
                    Method::POST,
                    &format!("/sandboxes/{}/pause", encode(&id)),
                    None,
                )?;
                writeln!(out, "paused {id}").map_err(io)?;
                Ok(EXIT_OK)
            }
            "resume" => {
                let id = w.need("the sandbox ID")?;
                w.done()?;
                self.client.json(
                    Method::POST,
                    &format!("/sandboxes/{}/resume", encode(&id)),
                    Some(&json!({})),
                )?;
                writeln!(out, "resumed {id}").map_err(io)?;
                Ok(EXIT_OK)
            }
            "logs" => {
                let follow = w.flag("-f", Some("--follow"));
                let limit = w.number("--limit", 1000)?;
                let id = w.need("the sandbox ID")?;
                w.done()?;
                self.logs(&id, follow, limit, out)
            }
            "metrics" => {
                let id = w.need("the sandbox ID")?;
                w.done()?;
                let v = self.client.json(
                    Method::GET,
                    &format!("/sandboxes/{}/metrics", encode(&id)),
                    None,
                )?;
                self.show(out, &v, |out| {
                    let rows: Vec<Vec<String>> = items(&v)
                        .iter()
                        .map(|m| {
                            let num = |k: &str| m.get(k).and_then(Value::as_f64).unwrap_or(0.0);
                            vec![
                                cell(m, "timestamp"),
                                format!("{:.1}%", num("cpuUsedPct")),
                                format!(
                                    "{}/{}",
                                    output::bytes(num("memUsed")),
                                    output::bytes(num("memTotal"))
                                ),
                                format!(
                                    "{}/{}",
                                    output::bytes(num("diskUsed")),
                                    output::bytes(num("diskTotal"))
                                ),
                            ]
                        })
                        .collect();
                    table(
                        out,
                        &["TIME", "CPU", "MEMORY", "DISK"],
                        &rows,
                        "no samples yet (one every 5 s)",
                    )
                })
            }
            "exec" => {
                let user = w.value("--user")?.unwrap_or_else(|| "user".into());
                let cwd = w.value("--cwd")?;
                let id = w.need("the sandbox ID")?;
                let tail = std::mem::take(&mut w.tail);
                w.done()?;
                if tail.is_empty() {
                    return Err("missing the command: coppice sandbox exec ID -- COMMAND...".into());
                }
                self.exec(&id, &user, cwd.as_deref(), &tail, out, err)
            }
            other => Err(format!("unknown sandbox command {other:?}")),
        }
    }

    fn sandbox_list(&self, states: Option<&str>, metadata: &[String], out: &mut dyn Write) -> Res {
        let mut query = vec!["limit=100".to_owned()];
        if let Some(s) = states {
            query.push(format!("state={}", encode(s)));
        }
        if !metadata.is_empty() {
            let mut pairs = Vec::new();
            for m in metadata {
                let (k, v) = m
                    .split_once('=')
                    .ok_or_else(|| format!("--metadata takes KEY=VALUE, not {m:?}"))?;
                pairs.push(format!("{}={}", encode(k), encode(v)));
            }
            query.push(format!("metadata={}", encode(&pairs.join("&"))));
        }
        let mut all = Vec::new();
        let mut next: Option<String> = None;
        loop {
            let mut q = query.clone();
            if let Some(t) = &next {
                q.push(format!("nextToken={}", encode(t)));
            }
            let path = format!("/v2/sandboxes?{}", q.join("&"));
            let reply = self.client.call(Method::GET, &path, None)?;
            let v = expect_json(&Method::GET, &path, &reply)?;
            all.extend(items(&v));
            next = reply
                .headers
                .get("x-next-token")
                .and_then(|h| h.to_str().ok())
                .filter(|t| !t.is_empty())
                .map(str::to_owned);
            if next.is_none() {
                break;
            }
        }
        let v = Value::Array(all);
        self.show(out, &v, |out| {
            let rows: Vec<Vec<String>> = items(&v)
                .iter()
                .map(|s| {
                    vec![
                        cell(s, "sandboxID"),
                        cell(s, "templateID"),
                        cell(s, "state"),
                        cell(s, "startedAt"),
                        cell(s, "endAt"),
                        cell(s, "cpuCount"),
                        cell(s, "memoryMB"),
                    ]
                })
                .collect();
            table(
                out,
                &[
                    "ID",
                    "TEMPLATE",
                    "STATE",
                    "STARTED",
                    "ENDS",
                    "CPUS",
                    "MEMORY MB",
                ],
                &rows,
                "no sandboxes",
            )
        })
    }

    fn logs(&self, id: &str, follow: bool, limit: Option<u64>, out: &mut dyn Write) -> Res {
        let base = format!("/v2/sandboxes/{}/logs", encode(id));
        let limit = limit.unwrap_or(1000);
        // The newest `limit` lines, printed oldest first.
        let v = self.client.json(
            Method::GET,
            &format!("{base}?direction=backward&limit={limit}"),
            None,
        )?;
        let mut lines = items(&v["logs"]);
        lines.reverse();
        if self.json && !follow {
            output::json(out, &json!({ "logs": lines })).map_err(io)?;
            return Ok(EXIT_OK);
        }
        let mut shown = Shown::default();
        let print = |line: &Value, out: &mut dyn Write| -> Result<(), String> {
            if self.json {
                writeln!(out, "{line}").map_err(io)
            } else {
                writeln!(
                    out,
                    "{} {:<5} {}",
                    cell(line, "timestamp"),
                    cell(line, "level"),
                    cell(line, "message")
                )
                .map_err(io)
            }
        };
        for line in &lines {
            if shown.fresh(line) {
                print(line, out)?;
            }
        }
        if !follow {
            return Ok(EXIT_OK);
        }
        loop {
            out.flush().map_err(io)?;
            self.client.sleep(FOLLOW_EVERY);
            let path = format!(
                "{base}?direction=forward&limit=1000&cursor={}",
                shown.cursor
            );
            let v = self.client.json(Method::GET, &path, None)?;
            for line in items(&v["logs"]) {
                if shown.fresh(&line) {
                    print(&line, out)?;
                }
            }
        }
    }

    fn exec(
        &self,
        id: &str,
        user: &str,
        cwd: Option<&str>,
        cmd: &[String],
        out: &mut dyn Write,
        err: &mut dyn Write,
    ) -> Res {
        let detail = self
            .client
            .json(Method::GET, &format!("/sandboxes/{}", encode(id)), None)?;
        let mut process =
            json!({ "cmd": "/bin/bash", "args": ["-l", "-c", shell_join(cmd)], "envs": {} });
        if let Some(d) = cwd {
            process["cwd"] = json!(d);
        }
        let msg = json!({ "process": process, "stdin": false }).to_string();
        let mut b = self
            .client
            .request(Method::POST, "/process.Process/Start")
            .header("e2b-sandbox-id", id)
            .header("e2b-sandbox-port", ENVD_PORT)
            .header("content-type", "application/connect+json")
            .header("connect-protocol-version", "1")
            .header(
                "authorization",
                format!(
                    "Basic {}",
                    base64::engine::general_purpose::STANDARD.encode(format!("{user}:"))
                ),
            );
        if let Some(token) = detail.get("envdAccessToken").and_then(Value::as_str) {
            b = b.header("x-access-token", token);
        }
        let req = b
            .body(Full::new(Bytes::from(connect_envelope(0, msg.as_bytes()))))
            .map_err(|e| format!("bad exec request: {e}"))?;
        let mut frames = Frames::default();
        let mut exit: Option<i64> = None;
        let mut stream_error: Option<String> = None;
        self.client.stream(req, |chunk| {
            for (flags, msg) in frames.push(chunk)? {
                if flags & 0x02 != 0 {
                    if let Some(e) = msg.get("error") {
                        stream_error = Some(format!("{}: {}", cell(e, "code"), cell(e, "message")));
                    }
                    continue;
                }
                let event = &msg["event"];
                if let Some(data) = event.get("data") {
                    if let Some(b64) = data.get("stdout").and_then(Value::as_str) {
                        copy_out(b64, out)?;
                    }
                    if let Some(b64) = data.get("stderr").and_then(Value::as_str) {
                        copy_out(b64, err)?;
                    }
                } else if let Some(end) = event.get("end") {
                    // proto3 JSON leaves out a zero exit code.
                    exit = Some(end.get("exitCode").and_then(Value::as_i64).unwrap_or(0));
                }
            }
            Ok(())
        })?;
        if let Some(e) = stream_error {
            return Err(format!("the command failed to run: {e}"));
        }
        match exit {
            Some(code) => Ok(u8::try_from(code).unwrap_or(EXIT_FAILED)),
            None => Err("the sandbox ended the command's stream without an exit code".into()),
        }
    }

    fn events(&self, mut w: Words, out: &mut dyn Write) -> Res {
        let verb = w.need("an events command (tail)")?;
        if verb != "tail" {
            return Err(format!("unknown events command {verb:?}"));
        }
        let follow = w.flag("-f", Some("--follow"));
        let sandbox = w.value("--sandbox")?;
        let types = w.values("--type")?;
        let limit = w.number("--limit", 100)?.unwrap_or(20);
        w.done()?;
        let mut path = match &sandbox {
            Some(id) => format!("/events/sandboxes/{}", encode(id)),
            None => "/events/sandboxes".into(),
        };
        path.push_str(&format!("?limit={limit}"));
        for t in &types {
            path.push_str(&format!("&types={}", encode(t)));
        }
        let mut seen: VecDeque<String> = VecDeque::new();
        loop {
            let v = self.client.json(Method::GET, &path, None)?;
            // Newest first from the gateway; shown oldest first, each once.
            let mut batch = items(&v);
            batch.reverse();
            for e in batch {
                let id = cell(&e, "id");
                if seen.contains(&id) {
                    continue;
                }
                seen.push_back(id);
                if seen.len() > 1000 {
                    seen.pop_front();
                }
                if self.json {
                    writeln!(out, "{e}").map_err(io)?;
                } else {
                    let mut data = e.get("eventData").cloned().unwrap_or(Value::Null);
                    if let Some(m) = data.as_object_mut() {
                        m.remove("sandbox_metadata");
                        m.remove("execution");
                    }
                    let data = if data.is_null() {
                        String::new()
                    } else {
                        data.to_string()
                    };
                    writeln!(
                        out,
                        "{}  {}  {}  {}",
                        cell(&e, "timestamp"),
                        cell(&e, "sandboxId"),
                        cell(&e, "type"),
                        data
                    )
                    .map_err(io)?;
                }
            }
            if !follow {
                return Ok(EXIT_OK);
            }
            out.flush().map_err(io)?;
            self.client.sleep(FOLLOW_EVERY);
        }
    }

    fn webhooks(&self, mut w: Words, out: &mut dyn Write) -> Res {
        let verb = w.need("a webhooks command (list, create, delete, deliveries, replay)")?;
        match verb.as_str() {
            "list" | "ls" => {
                w.done()?;
                let v = self.client.json(Method::GET, "/events/webhooks", None)?;
                self.show(out, &v, |out| {
                    let rows: Vec<Vec<String>> = items(&v)
                        .iter()
                        .map(|h| {
                            vec![
                                cell(h, "id"),
                                cell(h, "name"),
                                cell(h, "url"),
                                cell(h, "enabled"),
                                joined(h.get("events")),
                            ]
                        })
                        .collect();
                    table(
                        out,
                        &["ID", "NAME", "URL", "ENABLED", "EVENTS"],
                        &rows,
                        "no webhooks",
                    )
                })
            }
            "create" => {
                // Positional: `--url` is the gateway's own address.
                let events = w.values("--event")?;
                let secret = w.value("--secret")?;
                let name = w.need("the webhook's name")?;
                let url = w.need("the webhook's URL")?;
                w.done()?;
                if events.is_empty() {
                    return Err("missing --event (at least one event type)".into());
                }
                let mut body = json!({ "name": name, "url": url, "events": events });
                if let Some(s) = secret {
                    body["signatureSecret"] = json!(s);
                }
                let v = self
                    .client
                    .json(Method::POST, "/events/webhooks", Some(&body))?;
                self.show(out, &v, |out| {
                    writeln!(out, "created webhook {}", cell(&v, "id"))
                })
            }
            "delete" | "rm" => {
                let id = w.need("the webhook ID")?;
                w.done()?;
                self.client.json(
                    Method::DELETE,
                    &format!("/events/webhooks/{}", encode(&id)),
                    None,
                )?;
                writeln!(out, "deleted webhook {id}").map_err(io)?;
                Ok(EXIT_OK)
            }
            "deliveries" => {
                let hook = w.next();
                w.done()?;
                let path = match hook {
                    Some(id) => format!("/events/webhooks/{}/deliveries", encode(&id)),
                    None => "/events/webhooks/deliveries".into(),
                };
                let v = self.client.json(Method::GET, &path, None)?;
                self.show(out, &v, |out| {
                    let rows: Vec<Vec<String>> = items(&v)
                        .iter()
                        .map(|d| {
                            vec![
                                cell(d, "deliveryId"),
                                cell(d, "webhookId"),
                                cell(d, "eventType"),
                                cell(d, "outcome"),
                                cell(d, "statusCode"),
                                cell(d, "latencyMs"),
                                cell(d, "timestamp"),
                            ]
                        })
                        .collect();
                    table(
                        out,
                        &[
                            "DELIVERY", "WEBHOOK", "EVENT", "OUTCOME", "HTTP", "MS", "AT",
                        ],
                        &rows,
                        "no deliveries",
                    )
                })
            }
            "replay" => {
                let id = w.need("the delivery ID")?;
                w.done()?;
                self.client.json(
                    Method::POST,
                    &format!("/events/webhooks/deliveries/{}/replay", encode(&id)),
                    None,
                )?;
                writeln!(out, "delivery {id} queued again").map_err(io)?;
                Ok(EXIT_OK)
            }
            other => Err(format!("unknown webhooks command {other:?}")),
        }
    }

    fn templates(&self, mut w: Words, out: &mut dyn Write) -> Res {
        let verb = w.need("a templates command (list, delete)")?;
        match verb.as_str() {
            "list" | "ls" => {
                w.done()?;
                let v = self.client.json(Method::GET, "/templates", None)?;
                self.show(out, &v, |out| {
                    let rows: Vec<Vec<String>> = items(&v)
                        .iter()
                        .map(|t| {
                            vec![
                                cell(t, "templateID"),
                                joined(t.get("names").or_else(|| t.get("aliases"))),
                                cell(t, "buildStatus"),
                                cell(t, "cpuCount"),
                                cell(t, "memoryMB"),
                                cell(t, "spawnCount"),
                                cell(t, "updatedAt"),
                            ]
                        })
                        .collect();
                    table(
                        out,
                        &["ID", "NAMES", "STATUS", "CPUS", "MEMORY MB", "SPAWNS", "UPDATED"],
                        &rows,
                        "no templates",
                    )
                })
            }
            "delete" | "rm" => {
                let id = w.need("the template ID or name")?;
                w.done()?;
                self.client
                    .json(Method::DELETE, &format!("/templates/{}", encode(&id)), None)?;
                writeln!(out, "deleted template {id}").map_err(io)?;
                Ok(EXIT_OK)
            }
            "build" => Err("coppice templates build is not built yet; build with the E2B SDK's Template.build, which this gateway serves".into()),
            other => Err(format!("unknown templates command {other:?}")),
        }
    }

    fn snapshots(&self, mut w: Words, out: &mut dyn Write) -> Res {
        let verb = w.need("a snapshots command (list, delete)")?;
        match verb.as_str() {
            "list" | "ls" => {
                let sandbox = w.value("--sandbox")?;
                w.done()?;
                let path = match sandbox {
                    Some(id) => format!("/snapshots?sandboxID={}", encode(&id)),
                    None => "/snapshots".into(),
                };
                let v = self.client.json(Method::GET, &path, None)?;
                self.show(out, &v, |out| {
                    let rows: Vec<Vec<String>> = items(&v)
                        .iter()
                        .map(|s| vec![cell(s, "snapshotID"), joined(s.get("names"))])
                        .collect();
                    table(out, &["ID", "NAMES"], &rows, "no snapshots")
                })
            }
            "delete" | "rm" => {
                let id = w.need("the snapshot ID")?;
                w.done()?;
                self.client
                    .json(Method::DELETE, &format!("/templates/{}", encode(&id)), None)?;
                writeln!(out, "deleted snapshot {id}").map_err(io)?;
                Ok(EXIT_OK)
            }
            other => Err(format!("unknown snapshots command {other:?}")),
        }
    }

    fn pool(&self, mut w: Words, out: &mut dyn Write) -> Res {
        let verb = w.next().unwrap_or_else(|| "status".into());
        let v = match verb.as_str() {
            "status" | "list" | "ls" => {
                w.done()?;
                self.client.json(Method::GET, "/pool", None)?
            }
            "warm" => {
                let template = w.need("the template")?;
                let count: u64 = w
                    .need("the count")?
                    .parse()
                    .map_err(|_| "the count must be a whole number".to_owned())?;
                w.done()?;
                self.client.json(
                    Method::POST,
                    &format!("/pool/{}/warm", encode(&template)),
                    Some(&json!({ "count": count })),
                )?
            }
            "drain" => {
                let template = w.need("the template")?;
                w.done()?;
                self.client.json(
                    Method::POST,
                    &format!("/pool/{}/drain", encode(&template)),
                    None,
                )?
            }
            other => return Err(format!("unknown pool command {other:?}")),
        };
        self.show(out, &v, |out| {
            let pools = match &v {
                Value::Array(_) => items(&v),
                Value::Object(m) if m.contains_key("templateID") => vec![v.clone()],
                Value::Object(m) => m
                    .iter()
                    .map(|(k, p)| {
                        let mut p = p.clone();
                        if let Some(o) = p.as_object_mut() {
                            o.entry("templateID").or_insert_with(|| json!(k));
                        }
                        p
                    })
                    .collect(),
                _ => Vec::new(),
            };
            let rows: Vec<Vec<String>> = pools
                .iter()
                .map(|p| {
                    [
                        "templateID",
                        "target",
                        "ready",
                        "inUse",
                        "hits",
                        "misses",
                        "lastError",
                    ]
                    .iter()
                    .map(|k| cell(p, k))
                    .collect()
                })
                .collect();
            table(
                out,
                &[
                    "TEMPLATE",
                    "TARGET",
                    "READY",
                    "IN USE",
                    "HITS",
                    "MISSES",
                    "LAST ERROR",
                ],
                &rows,
                "no pools",
            )
        })
    }

    fn keys(&self, mut w: Words, out: &mut dyn Write) -> Res {
        let verb = w.need("a keys command (list, create, revoke)")?;
        let v = match verb.as_str() {
            "list" | "ls" => {
                w.done()?;
                self.client.json(Method::GET, "/api-keys", None)?
            }
            "create" => {
                let name = w.need("the key's name")?;
                w.done()?;
                self.client
                    .json(Method::POST, "/api-keys", Some(&json!({ "name": name })))?
            }
            "revoke" | "delete" | "rm" => {
                let id = w.need("the key's ID")?;
                w.done()?;
                self.client
                    .json(Method::DELETE, &format!("/api-keys/{}", encode(&id)), None)?;
                writeln!(out, "revoked key {id}").map_err(io)?;
                return Ok(EXIT_OK);
            }
            other => return Err(format!("unknown keys command {other:?}")),
        };
        self.show(out, &v, |out| output::json(out, &v))
    }
}

/// Writes base64 `b64` (a command's output) to `sink` as it arrives.
fn copy_out(b64: &str, sink: &mut dyn Write) -> Result<(), String> {
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(b64)
        .map_err(|e| format!("bad output from the agent: {e}"))?;
    sink.write_all(&bytes).map_err(io)?;
    sink.flush().map_err(io)
}

/// Log lines already shown, so a poll from the newest one's millisecond (the cursor is
/// inclusive) repeats none.
#[derive(Debug, Default)]
struct Shown {
    cursor: i64,
    at_cursor: HashSet<String>,
}

impl Shown {
    /// Whether `line` is new, noting it as shown.
    fn fresh(&mut self, line: &Value) -> bool {
        let ms = rfc3339_ms(line.get("timestamp").and_then(Value::as_str).unwrap_or(""));
        let key = line.to_string();
        if ms < self.cursor || (ms == self.cursor && self.at_cursor.contains(&key)) {
            return false;
        }
        if ms > self.cursor {
            self.cursor = ms;
            self.at_cursor.clear();
        }
        self.at_cursor.insert(key)
    }
}

/// A JSON list of strings as one comma-separated cell (empty when absent).
fn joined(list: Option<&Value>) -> String {
    list.and_then(Value::as_array)
        .map(|a| {
            a.iter()
                .filter_map(Value::as_str)
                .collect::<Vec<_>>()
                .join(",")
        })
        .unwrap_or_default()
}

/// The items of a JSON list answer (an array, or `null` for none).
fn items(v: &Value) -> Vec<Value> {
    v.as_array().cloned().unwrap_or_default()
}

/// Milliseconds since the epoch of an RFC 3339 time, 0 if it does not parse.
fn rfc3339_ms(s: &str) -> i64 {
    time::OffsetDateTime::parse(s, &time::format_description::well_known::Rfc3339)
        .map(|t| i64::try_from(t.unix_timestamp_nanos() / 1_000_000).unwrap_or(0))
        .unwrap_or(0)
}

/// `cmd` as one shell command line: a single word is taken as written (so `"ls | wc"`
/// works), several are quoted so each reaches the program as given.
fn shell_join(cmd: &[String]) -> String {
    if let [one] = cmd {
        return one.clone();
    }
    cmd.iter()
        .map(|a| {
            if !a.is_empty()
                && a.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"-_./=:,@%+".contains(&b))
            {
                a.clone()
            } else {
                format!("'{}'", a.replace('\'', r"'\''"))
            }
        })
        .collect::<Vec<_>>()
        .join(" ")
}

/// One Connect streaming envelope: flags, big-endian length, message.
fn connect_envelope(flags: u8, msg: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(5 + msg.len());
    out.push(flags);
    out.extend_from_slice(&u32::try_from(msg.len()).unwrap_or(u32::MAX).to_be_bytes());
    out.extend_from_slice(msg);
    out
}

/// Connect envelopes read from a body that arrives in arbitrary pieces.
#[derive(Debug, Default)]
struct Frames {
    buf: Vec<u8>,
}

impl Frames {
    /// Adds `chunk` and returns every envelope now complete, as (flags, JSON).
    fn push(&mut self, chunk: &[u8]) -> Result<Vec<(u8, Value)>, String> {
        self.buf.extend_from_slice(chunk);
        let mut out = Vec::new();
        loop {
            if self.buf.len() < 5 {
                return Ok(out);
            }
            let len = u32::from_be_bytes([self.buf[1], self.buf[2], self.buf[3], self.buf[4]]);
            let len = usize::try_from(len).map_err(|_| "a Connect frame too large".to_owned())?;
            if self.buf.len() < 5 + len {
                return Ok(out);
            }
            let flags = self.buf[0];
            let msg: Value = serde_json::from_slice(&self.buf[5..5 + len])
                .map_err(|e| format!("a Connect frame that is not JSON: {e}"))?;
            self.buf.drain(..5 + len);
            out.push((flags, msg));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_split_anywhere_are_reassembled() {
        let mut body = connect_envelope(0, br#"{"event":{"start":{"pid":7}}}"#);
        body.extend(connect_envelope(2, b"{}"));
        for cut in 0..body.len() {
            let mut f = Frames::default();
            let mut got = f.push(&body[..cut]).unwrap();
            got.extend(f.push(&body[cut..]).unwrap());
            assert_eq!(got.len(), 2, "cut at {cut}");
            assert_eq!(got[0].1["event"]["start"]["pid"], 7);
            assert_eq!(got[1].0, 2);
        }
        Frames::default().push(b"\0\0\0\0\x01x").unwrap_err();
    }

    #[test]
    fn commands_are_joined_for_the_shell() {
        assert_eq!(shell_join(&["ls | wc -l".into()]), "ls | wc -l");
        assert_eq!(
            shell_join(&["echo".into(), "it's".into(), "a b".into(), "x=1".into()]),
            r"echo 'it'\''s' 'a b' x=1"
        );
        assert_eq!(shell_join(&["printf".into(), String::new()]), "printf ''");
    }

    #[test]
    fn times_parse_to_milliseconds() {
        assert_eq!(rfc3339_ms("1970-01-01T00:00:01.5Z"), 1500);
        assert_eq!(rfc3339_ms("not a time"), 0);
    }
}
