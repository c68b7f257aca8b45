"""`cargo xtask smoke lifecycle`: auto-pause and auto-resume as an E2B user sees them.

With the unmodified `e2b` SDK against a Coppice gateway (E2B_API_URL, E2B_SANDBOX_URL,
E2B_API_KEY): create a sandbox that pauses when its window ends and resumes on traffic, leave a
file in it, let it go idle until the gateway pauses it, then run a command through the SDK. The
command must succeed, the file must still be there, the state must go running -> paused ->
running, the gateway's `coppice_sandboxes_resumed_total{via="auto"}` must rise by one and the
created / paused (timeout) / resumed (auto_resume) events must be recorded in that order.

Writes the receipt (checks and timings) as JSON to the path given as the only argument and
exits non-zero if any check failed.
"""

import json
import os
import re
import sys
import time
import urllib.request
from importlib import metadata

from e2b import Sandbox

API = os.environ["E2B_API_URL"].rstrip("/")
KEY = os.environ["E2B_API_KEY"]
WINDOW_S = 2
# The reaper looks every 250 ms; allow for a loaded machine on top.
PAUSE_DEADLINE_S = WINDOW_S + 10

SERIES = re.compile(r"^(?P<name>[a-z_:]+)(?:\{(?P<labels>[^}]*)\})?\s+(?P<value>\S+)$")


def get(path):
    req = urllib.request.Request(API + path, headers={"X-API-Key": KEY})
    with urllib.request.urlopen(req, timeout=10) as resp:
        return resp.read().decode()


def auto_resumes():
    """The gateway's `coppice_sandboxes_resumed_total{via="auto"}`."""
    for line in get("/metrics").splitlines():
        m = SERIES.match(line.strip())
        if m and m["name"] == "coppice_sandboxes_resumed_total" and 'via="auto"' in (m["labels"] or ""):
            return float(m["value"])
    raise AssertionError('/metrics has no coppice_sandboxes_resumed_total{via="auto"}')


def main(out):
    checks = {}
    timings = {}
    states = []

    t = time.monotonic()
    sbx = Sandbox.create(timeout=WINDOW_S, lifecycle={"on_timeout": "pause", "auto_resume": True})
    created = time.monotonic()
    timings["create_ms"] = (created - t) * 1000
    try:
        states.append(sbx.get_info().state.value)
        sbx.files.write("/home/user/kept.txt", "still here")
        before = auto_resumes()

        # Idle: no traffic until the gateway has paused it.
        while True:
            state = sbx.get_info().state.value
            if state == "paused":
                break
            if time.monotonic() - created > PAUSE_DEADLINE_S:
                raise AssertionError(f"not paused {PAUSE_DEADLINE_S} s after create (state {state})")
            time.sleep(0.05)
        paused_after = time.monotonic() - created
        states.append("paused")
        timings["idle_pause_observed_after_s"] = paused_after
        checks["paused_no_earlier_than_the_window"] = paused_after >= WINDOW_S - 0.05

        t = time.monotonic()
        result = sbx.commands.run("echo woke")
        timings["wake_to_command_output_ms"] = (time.monotonic() - t) * 1000
        checks["command_succeeded"] = result.exit_code == 0 and result.stdout == "woke\n"

        t = time.monotonic()
        kept = sbx.files.read("/home/user/kept.txt")
        timings["warm_file_read_ms"] = (time.monotonic() - t) * 1000
        checks["files_survived_the_pause"] = kept == "still here"

        states.append(sbx.get_info().state.value)
        checks["state_went_running_paused_running"] = states == ["running", "paused", "running"]

        after = auto_resumes()
        checks["resumed_total_auto_rose_by_one"] = after == before + 1

        events = json.loads(get(f"/events/sandboxes/{sbx.sandbox_id}?orderAsc=true&limit=100"))
        seen = [(e["type"], (e.get("eventData") or {}).get("cause")) for e in events]
        wanted = [
            ("sandbox.lifecycle.created", None),
            ("sandbox.lifecycle.paused", "timeout"),
            ("sandbox.lifecycle.resumed", "auto_resume"),
        ]
        lifecycle = [s for s in seen if s[0] in {w[0] for w in wanted}]
        checks["events_created_paused_resumed"] = [
            (ty, cause if ty != "sandbox.lifecycle.created" else None) for ty, cause in lifecycle
        ] == wanted
    finally:
        sbx.kill()

    with open("/proc/loadavg") as f:
        load = " ".join(f.read().split()[:3])
    receipt = {
        "receipt": "auto-suspend-resume",
        "machine": {
            "cpus": os.cpu_count(),
            "kernel": os.uname().release,
            "loadavg_at_end": load,
            "gateway": "release build, loopback, defaults but an API key",
        },
        "sdk": {"e2b": metadata.version("e2b")},
        "sandbox_id": sbx.sandbox_id,
        "window_s": WINDOW_S,
        "states": states,
        "metrics": {"resumed_total_auto_before": before, "resumed_total_auto_after": after},
        "events": [{"type": ty, "cause": cause} for ty, cause in seen],
        "timings": timings,
        "checks": checks,
        "passed": all(checks.values()),
    }
    with open(out, "w") as f:
        json.dump(receipt, f, indent=2, sort_keys=True)
        f.write("\n")
    print(json.dumps(receipt, indent=2, sort_keys=True))
    return 0 if receipt["passed"] else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
