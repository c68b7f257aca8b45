//! Parts `pause` and `wake`, on one sandbox each, driven as the SDK drives them.
//!
//! - `pause`: `POST /sandboxes/{id}/pause` until its 204; then `POST
//!   /v2/sandboxes/{id}/connect` (how SDK 2.63 resumes) until its 201, and on to the first
//!   output of a command, which says when the resumed sandbox is usable.
//! - `wake`: a sandbox created with `autoPause` and `autoResume`, paused through the API; the
//!   clock runs from sending `process.Start` to the paused sandbox through the data plane until
//!   its first stdout frame (the gateway resumes it on the way). The same command on the
//!   then-running sandbox is measured right after each wake, so the ratio says what waking
//!   costs on top of a command.

use std::time::Instant;

use crate::client::{
    command, connect, info, pause, resume, start_to_first_output, timeout, BoxError, Res, Sender,
    Via,
};
use crate::stats::{Figure, Stats};
use crate::{with_sandbox, Ctx, Report, BASE, WARMUP};

/// A sandbox that pauses at its timeout and wakes on traffic (SDK: `lifecycle={"on_timeout":
/// "pause", "auto_resume": True}`).
const AUTO_RESUME: &str = r#"{"templateID":"base","autoPause":true,"autoResume":{"enabled":true},"metadata":{},"envVars":{}}"#;

pub(crate) fn run_pause(ctx: &Ctx<'_>) -> Res<Report> {
    let runs = ctx.opts.runs;
    eprintln!("api bench: pause: {runs} pause/resume cycles (+{WARMUP} warm-up)");
    let addr = ctx.gw()?.addr()?;
    let (mut p, mut r, mut usable) = with_sandbox(ctx, BASE, async |api, sbx| {
        let mut envd = connect(addr).await?;
        let (mut p, mut r, mut usable) = (Vec::new(), Vec::new(), Vec::new());
        for i in 0..runs + WARMUP {
            let t = Instant::now();
            timeout(pause(api, &sbx.id)).await?;
            let paused = t.elapsed();
            let t = Instant::now();
            timeout(resume(api, &sbx.id)).await?;
            let resumed = t.elapsed();
            let first = timeout(start_to_first_output(&mut envd, sbx, Via::Gateway, t)).await?;
            if i >= WARMUP {
                p.push(paused);
                r.push(resumed);
                usable.push(first);
            }
        }
        Ok::<_, BoxError>((p, r, usable))
    })?;
    let (p, r, u) = (Stats::of(&mut p), Stats::of(&mut r), Stats::of(&mut usable));
    let summary = format!(
        "pause p50 {:.2} ms / p99 {:.2} ms; resume (connect) p50 {:.2} ms / p99 {:.2} ms; resume → first output p50 {:.2} ms; n={runs}",
        p.p50, p.p99, r.p50, r.p99, u.p50
    );
    let figures = vec![
        Figure::latency(
            "pause.pause",
            "pause (POST /sandboxes/{id}/pause → 204)",
            &p,
        )
        .target("p50 ≤ 3 ms", p.p50 <= 3.0),
        Figure::latency(
            "pause.resume",
            "resume (POST /v2/sandboxes/{id}/connect → 201)",
            &r,
        )
        .target("p50 ≤ 3 ms", r.p50 <= 3.0),
        Figure::latency(
            "pause.resume_to_first_output",
            "resume → first output of a command",
            &u,
        ),
    ];
    Ok(Report {
        figures,
        summary,
        details: serde_json::json!({
            "runs": runs,
            "warmup": WARMUP,
            "clock": "pause: from sending the request to its 204; resume: from sending connect to its 201; resume_to_first_output: from sending connect to the first stdout frame of process.Start sent right after",
            "pause": p.json(),
            "resume": r.json(),
            "resume_to_first_output": u.json(),
        }),
    })
}

pub(crate) fn run_wake(ctx: &Ctx<'_>) -> Res<Report> {
    let runs = ctx.opts.runs;
    eprintln!("api bench: wake: {runs} auto-resume wakes (+{WARMUP} warm-up)");
    let addr = ctx.gw()?.addr()?;
    let (mut wakes, mut warm) = with_sandbox(ctx, AUTO_RESUME, async |api, sbx| {
        let mut envd = connect(addr).await?;
        let (mut wakes, mut warm) = (Vec::new(), Vec::new());
        for i in 0..runs + WARMUP {
            timeout(pause(api, &sbx.id)).await?;
            // Once: the sandbox really is paused before, and running after, a wake.
            if i == 0 {
                state_is(api, &sbx.id, "paused").await?;
            }
            let woke = command(&mut envd, sbx, Via::Gateway).await?;
            if i == 0 {
                state_is(api, &sbx.id, "running").await?;
            }
            let running = command(&mut envd, sbx, Via::Gateway).await?;
            if i >= WARMUP {
                wakes.push(woke);
                warm.push(running);
            }
        }
        Ok::<_, BoxError>((wakes, warm))
    })?;
    let (w, c) = (Stats::of(&mut wakes), Stats::of(&mut warm));
    let summary = format!(
        "auto-resume wake (paused → first output) p50 {:.2} ms / p99 {:.2} ms; the same command while running p50 {:.2} ms ({:.2}x); n={runs}",
        w.p50,
        w.p99,
        c.p50,
        w.p50 / c.p50
    );
    let figures = vec![
        Figure::latency(
            "wake.paused_to_first_output",
            "auto-resume wake: command sent to a paused sandbox → first output",
            &w,
        )
        .floor("the same command, sandbox running", c.p50)
        .target("p50 ≤ 10 ms", w.p50 <= 10.0),
        Figure::latency(
            "wake.running_command",
            "the same command on the running sandbox",
            &c,
        )
        .baseline(),
    ];
    Ok(Report {
        figures,
        summary,
        details: serde_json::json!({
            "runs": runs,
            "warmup": WARMUP,
            "create": AUTO_RESUME,
            "clock": "paused_to_first_output: from sending process.Start (E2b-Sandbox-Id routing) to the sandbox paused through the API, to the first stdout frame; running_command: the same right after, the sandbox now running",
            "paused_to_first_output": w.json(),
            "running_command": c.json(),
            "ratio_wake_over_running_p50": w.p50 / c.p50,
        }),
    })
}

/// Fails unless `GET /sandboxes/{id}` says the sandbox is in `want`.
async fn state_is(api: &mut Sender, id: &str, want: &str) -> Res<()> {
    let state = timeout(info(api, id)).await?["state"].clone();
    if state == want {
        Ok(())
    } else {
        Err(format!("sandbox {id} reads as {state}, expected {want}").into())
    }
}
