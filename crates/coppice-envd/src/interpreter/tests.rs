//! End-to-end tests: a real hyper HTTP/1 server on 127.0.0.1 in front of
//! [`Interpreter::serve`] (what [`super::handle`] delegates to), real `python3` and `bash`
//! from `PATH`, drivers written to a temp dir. Every context is killed when the harness
//! drops, also when a test fails.

// Python contexts on IPython, in their own file.
mod ipython;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Method, Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use serde_json::{json, Value};
use tokio::net::{TcpListener, TcpStream};

use crate::interpreter::context::Language;
use crate::interpreter::{Interpreter, InterpreterConfig};
use crate::state::AgentState;

/// A hang guard, not a timing assertion: a wedged agent fails the test instead of hanging.
const GUARD: Duration = Duration::from_secs(60);

struct Harness {
    addr: SocketAddr,
    interp: Arc<Interpreter>,
    state: Arc<AgentState>,
    dir: tempfile::TempDir,
    server: tokio::task::JoinHandle<()>,
}

impl Drop for Harness {
    fn drop(&mut self) {
        self.server.abort();
    }
}

impl Harness {
    async fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        // Debian's python, as in the sandbox templates, when the host has it (CI installs
        // python3-matplotlib for it); else whatever `python3` is on PATH.
        let debian_python = std::path::Path::new("/usr/bin/python3");
        let python = if debian_python.exists() {
            debian_python.into()
        } else {
            InterpreterConfig::default().python
        };
        let config = InterpreterConfig {
            python,
            driver_dir: dir.path().join("driver"),
            interrupt_grace: Duration::from_secs(2),
            ..InterpreterConfig::default()
        };
        let interp = Arc::new(Interpreter::new(config));
        let state = Arc::new(AgentState::new());
        // Contexts run as whoever runs the tests (root in CI): no user switch is needed.
        *state.default_user.write().unwrap() = current_user();
        *state.default_workdir.write().unwrap() = Some(dir.path().display().to_string());
        // IPython's profile and matplotlib's caches go to the temp dir, not root's home.
        let cache = dir.path().join("cache");
        std::fs::create_dir_all(&cache).unwrap();
        // Temporary files too (R's session directory, which a killed R leaves behind).
        for (k, sub) in [
            ("IPYTHONDIR", "ipython"),
            ("MPLCONFIGDIR", "matplotlib"),
            ("TMPDIR", "tmp"),
        ] {
            std::fs::create_dir_all(cache.join(sub)).unwrap();
            let v = cache.join(sub).display().to_string();
            state.envs.write().unwrap().insert(k.into(), v);
        }
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (i, s) = (Arc::clone(&interp), Arc::clone(&state));
        let server = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    return;
                };
                let (i, s) = (Arc::clone(&i), Arc::clone(&s));
                let _ = stream.set_nodelay(true);
                tokio::spawn(async move {
                    let svc = hyper::service::service_fn(move |req: Request<Incoming>| {
                        let (i, s) = (Arc::clone(&i), Arc::clone(&s));
                        async move { Ok::<_, std::convert::Infallible>(i.serve(s, req).await) }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), svc)
                        .await;
                });
            }
        });
        Self {
            addr,
            interp,
            state,
            dir,
            server,
        }
    }

    async fn send(
        &self,
        method: Method,
        path: &str,
        token: Option<&str>,
        body: &str,
    ) -> hyper::Response<Incoming> {
        let stream = TcpStream::connect(self.addr).await.unwrap();
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .unwrap();
        tokio::spawn(conn);
        let mut req = Request::builder()
            .method(method)
            .uri(path)
            .header("host", "sandbox")
            .header("content-type", "application/json")
            .header("e2b-sandbox-port", "49999");
        if let Some(t) = token {
            req = req.header("x-access-token", t);
        }
        let req = req.body(Full::new(Bytes::from(body.to_owned()))).unwrap();
        sender.send_request(req).await.unwrap()
    }

    async fn call(&self, method: Method, path: &str, body: &str) -> (StatusCode, String) {
        let resp = tokio::time::timeout(GUARD, async {
            let resp = self.send(method, path, None, body).await;
            let status = resp.status();
            let bytes = resp.into_body().collect().await.unwrap().to_bytes();
            (status, String::from_utf8(bytes.to_vec()).unwrap())
        })
        .await;
        resp.expect("request did not finish")
    }

    /// Runs a cell and returns its lines, checking the framing on the way.
    async fn run(&self, body: Value) -> Vec<Value> {
        let (status, text) = self.call(Method::POST, "/execute", &body.to_string()).await;
        assert_eq!(status, StatusCode::OK, "{text}");
        lines(&text)
    }

    async fn py(&self, ctx: &str, code: &str) -> Vec<Value> {
        self.run(json!({ "code": code, "context_id": ctx, "language": null, "env_vars": null }))
            .await
    }

    async fn create(&self, body: Value) -> String {
        let (status, text) = self
            .call(Method::POST, "/contexts", &body.to_string())
            .await;
        assert_eq!(status, StatusCode::OK, "{text}");
        let v: Value = serde_json::from_str(&text).unwrap();
        v["id"].as_str().unwrap().to_owned()
    }
}

fn current_user() -> String {
    let uid = nix::unistd::Uid::current().as_raw();
    let passwd = std::fs::read_to_string("/etc/passwd").unwrap();
    passwd
        .lines()
        .map(|l| l.split(':').collect::<Vec<_>>())
        .find(|f| f.len() >= 7 && f[2].parse::<u32>().ok() == Some(uid))
        .map(|f| f[0].to_owned())
        .expect("current user in /etc/passwd")
}

/// Splits an NDJSON body, asserting E2B's framing: `\n`-terminated, no blank line, the
/// last line `end_of_execution` and no other.
fn lines(text: &str) -> Vec<Value> {
    assert!(text.ends_with('\n'), "unterminated stream: {text:?}");
    let lines: Vec<Value> = text
        .strip_suffix('\n')
        .unwrap()
        .split('\n')
        .map(|l| {
            assert!(!l.trim().is_empty(), "blank line in {text:?}");
            serde_json::from_str(l).unwrap()
        })
        .collect();
    let ends: Vec<usize> = (0..lines.len())
        .filter(|&i| lines[i]["type"] == "end_of_execution")
        .collect();
    assert_eq!(
        ends,
        vec![lines.len() - 1],
        "end_of_execution must be last: {text}"
    );
    lines
}

fn of_type<'a>(lines: &'a [Value], ty: &str) -> Vec<&'a Value> {
    lines.iter().filter(|l| l["type"] == ty).collect()
}

fn stdout(lines: &[Value]) -> String {
    of_type(lines, "stdout")
        .iter()
        .map(|l| l["text"].as_str().unwrap())
        .collect()
}

fn stderr(lines: &[Value]) -> String {
    of_type(lines, "stderr")
        .iter()
        .map(|l| l["text"].as_str().unwrap())
        .collect()
}

fn main_text(lines: &[Value]) -> Option<String> {
    of_type(lines, "result")
        .iter()
        .find(|l| l["is_main_result"] == true)
        .map(|l| l["text"].as_str().unwrap().to_owned())
}

fn count(lines: &[Value]) -> u64 {
    assert_eq!(lines[0]["type"], "number_of_executions", "{lines:?}");
    lines[0]["execution_count"].as_u64().unwrap()
}

fn error_of(lines: &[Value]) -> Option<&Value> {
    of_type(lines, "error").into_iter().next()
}

#[tokio::test]
async fn state_persists_and_the_count_increases() {
    let h = Harness::new().await;
    let ctx = h.create(json!({})).await;
    let first = h.py(&ctx, "x = 41").await;
    assert_eq!(count(&first), 1);
    assert_eq!(main_text(&first), None);
    let second = h.py(&ctx, "x + 1").await;
    assert_eq!(count(&second), 2);
    assert_eq!(main_text(&second).as_deref(), Some("42"));
    let third = h.py(&ctx, "def f(y):\n    return x * y\nf(2)").await;
    assert_eq!(count(&third), 3);
    assert_eq!(main_text(&third).as_deref(), Some("82"));
    // `_` holds the last result, as in IPython.
    assert_eq!(main_text(&h.py(&ctx, "_ + 1").await).as_deref(), Some("83"));
    h.interp.shutdown().await;
}

#[tokio::test]
async fn the_default_context_is_shared_and_listed() {
    let h = Harness::new().await;
    let run = |code: &str| json!({ "code": code, "context_id": null, "language": null, "env_vars": null });
    h.run(run("shared = 'yes'")).await;
    let out = h.run(run("shared")).await;
    assert_eq!(main_text(&out).as_deref(), Some("yes"));
    let py = h
        .run(
            json!({ "code": "shared", "context_id": null, "language": "Python", "env_vars": null }),
        )
        .await;
    assert_eq!(main_text(&py).as_deref(), Some("yes"));
    let mine = h
        .create(json!({ "language": "python", "cwd": "/tmp" }))
        .await;
    let (status, text) = h.call(Method::GET, "/contexts", "").await;
    assert_eq!(status, StatusCode::OK);
    let list: Vec<Value> = serde_json::from_str(&text).unwrap();
    // E2B's default contexts, python and javascript, come first.
    assert_eq!(list.len(), 3, "{text}");
    assert_eq!(list[0]["language"], "python");
    assert_eq!(list[0]["cwd"], h.dir.path().display().to_string());
    assert_eq!(list[1]["language"], "javascript");
    assert_eq!(
        list[2],
        json!({ "id": mine, "language": "python", "cwd": "/tmp" })
    );
    let cwd = h.py(&mine, "import os; os.getcwd()").await;
    assert_eq!(main_text(&cwd).as_deref(), Some("/tmp"));
    h.interp.shutdown().await;
}

#[tokio::test]
async fn output_streams_while_the_cell_runs() {
    let h = Harness::new().await;
    let ctx = h.create(json!({})).await;
    let gate = h.dir.path().join("gate");
    let code = format!(
        "import os, sys, time\nprint('first')\nprint('oops', file=sys.stderr)\n\
         while not os.path.exists({gate:?}):\n    time.sleep(0.01)\nprint('second')"
    );
    let body = json!({ "code": code, "context_id": ctx, "language": null, "env_vars": null });
    let resp = h
        .send(Method::POST, "/execute", None, &body.to_string())
        .await;
    assert_eq!(resp.status(), StatusCode::OK);
    let mut body = resp.into_body();
    let mut seen = String::new();
    // The cell cannot finish until the gate exists, so `first` must arrive before it does.
    tokio::time::timeout(GUARD, async {
        while !seen.contains("\"first\\n\"") || !seen.contains("oops") {
            let frame = body.frame().await.unwrap().unwrap();
            seen.push_str(std::str::from_utf8(frame.data_ref().unwrap()).unwrap());
        }
    })
    .await
    .expect("first line never streamed");
    assert!(!seen.contains("second"));
    assert!(!seen.contains("end_of_execution"));
    std::fs::write(&gate, "").unwrap();
    let rest = tokio::time::timeout(GUARD, body.collect())
        .await
        .unwrap()
        .unwrap();
    seen.push_str(std::str::from_utf8(&rest.to_bytes()).unwrap());
    let all = lines(&seen);
    let outs: Vec<&str> = of_type(&all, "stdout")
        .iter()
        .map(|l| l["text"].as_str().unwrap())
        .collect();
    assert_eq!(outs, vec!["first\n", "second\n"]);
    assert_eq!(stderr(&all), "oops\n");
    for l in of_type(&all, "stdout") {
        assert!(l["timestamp"].as_str().unwrap().ends_with("+00:00"));
    }
    h.interp.shutdown().await;
}

#[tokio::test]
async fn subprocess_output_and_ordering_within_a_stream() {
    let h = Harness::new().await;
    let ctx = h.create(json!({})).await;
    let out = h
        .py(
            &ctx,
            "import os, subprocess\nprint('a')\nos.system('echo b; echo c >&2')\n\
             subprocess.run(['echo', 'd'])\nprint('e', end='')",
        )
        .await;
    assert_eq!(stdout(&out), "a\nb\nd\ne");
    assert_eq!(stderr(&out), "c\n");
    h.interp.shutdown().await;
}

#[tokio::test]
async fn results_carry_mime_types() {
    let h = Harness::new().await;
    let ctx = h.create(json!({})).await;
    let s = h.py(&ctx, "'abc'").await;
    assert_eq!(main_text(&s).as_deref(), Some("abc"));
    let none = h.py(&ctx, "None").await;
    assert!(of_type(&none, "result").is_empty());
    let html = h
        .py(
            &ctx,
            "class T:\n    def _repr_html_(self):\n        return '<b>t</b>'\n    def __repr__(self):\n        return 'T()'\nT()",
        )
        .await;
    let r = of_type(&html, "result");
    assert_eq!(r.len(), 1);
    assert_eq!(r[0]["html"], "<b>t</b>");
    assert_eq!(r[0]["text"], "T()");
    assert_eq!(r[0]["is_main_result"], true);
    let shown = h.py(&ctx, "display(T())\n1").await;
    let r = of_type(&shown, "result");
    assert_eq!(r.len(), 2);
    assert_eq!(r[0]["is_main_result"], false);
    assert_eq!(r[0]["html"], "<b>t</b>");
    assert_eq!(main_text(&shown).as_deref(), Some("1"));
    let awaited = h
        .py(
            &ctx,
            "import asyncio\nasync def g():\n    await asyncio.sleep(0)\n    return 7\nawait g()",
        )
        .await;
    assert_eq!(main_text(&awaited).as_deref(), Some("7"));
    h.interp.shutdown().await;
}

#[tokio::test]
#[allow(
    clippy::print_stdout,
    reason = "house style: a skipped test says SKIP on stdout"
)]
async fn matplotlib_figures_become_png() {
    let h = Harness::new().await;
    let ctx = h.create(json!({})).await;
    let probe = h
        .py(
            &ctx,
            "import importlib.util\nimportlib.util.find_spec('matplotlib') is not None",
        )
        .await;
    if main_text(&probe).as_deref() != Some("True") {
        println!("SKIP matplotlib_figures_become_png: matplotlib not installed");
        h.interp.shutdown().await;
        return;
    }
    let shown = h
        .py(
            &ctx,
            "import matplotlib.pyplot as plt\nplt.plot([1, 2, 3])\nplt.show()",
        )
        .await;
    assert!(error_of(&shown).is_none(), "{shown:?}");
    let pngs: Vec<&Value> = of_type(&shown, "result")
        .into_iter()
        .filter(|r| r["png"].is_string())
        .collect();
    assert_eq!(pngs.len(), 1, "{shown:?}");
    assert!(pngs[0]["png"].as_str().unwrap().starts_with("iVBORw0KGgo"));
    let fig = h
        .py(&ctx, "fig = plt.figure()\nfig.gca().plot([3, 1])\nfig")
        .await;
    let main: Vec<&Value> = of_type(&fig, "result")
        .into_iter()
        .filter(|r| r["is_main_result"] == true)
        .collect();
    assert_eq!(main.len(), 1, "{fig:?}");
    assert!(main[0]["png"].as_str().unwrap().starts_with("iVBORw0KGgo"));
    h.interp.shutdown().await;
}

#[tokio::test]
async fn exceptions_report_name_value_and_traceback() {
    let h = Harness::new().await;
    let ctx = h.create(json!({})).await;
    let out = h
        .py(
            &ctx,
            "print('before')\ndef boom():\n    raise ValueError('bad')\nboom()",
        )
        .await;
    let err = error_of(&out).unwrap();
    assert_eq!(err["name"], "ValueError");
    assert_eq!(err["value"], "bad");
    let tb = err["traceback"].as_str().unwrap();
    assert!(tb.contains("raise ValueError('bad')"), "{tb}");
    assert!(tb.contains("in boom"), "{tb}");
    assert!(!tb.contains("driver.py"), "driver frames leak: {tb}");
    assert_eq!(stdout(&out), "before\n");
    let syntax = h.py(&ctx, "def (:").await;
    assert_eq!(error_of(&syntax).unwrap()["name"], "SyntaxError");
    let exit = h.py(&ctx, "import sys\nsys.exit(3)").await;
    assert_eq!(error_of(&exit).unwrap()["name"], "SystemExit");
    // The context is still there and still counts.
    let after = h.py(&ctx, "1 + 1").await;
    assert_eq!(count(&after), 4);
    assert_eq!(main_text(&after).as_deref(), Some("2"));
    h.interp.shutdown().await;
}

#[tokio::test]
async fn a_timeout_interrupts_but_keeps_the_context() {
    let h = Harness::new().await;
    let ctx = h.create(json!({})).await;
    h.py(&ctx, "kept = 5").await;
    let out = h
        .run(json!({ "code": "import time\nprint('start')\ntime.sleep(600)", "context_id": ctx, "timeout": 0.5 }))
        .await;
    assert_eq!(error_of(&out).unwrap()["name"], "KeyboardInterrupt");
    assert_eq!(stdout(&out), "start\n");
    let after = h.py(&ctx, "kept").await;
    assert_eq!(main_text(&after).as_deref(), Some("5"));
    assert_eq!(count(&after), 3);
    h.interp.shutdown().await;
}

#[tokio::test]
async fn a_cell_that_ignores_interrupts_is_killed_and_the_context_restarts() {
    let h = Harness::new().await;
    let ctx = h.create(json!({})).await;
    h.py(&ctx, "lost = 1").await;
    let code = "import time\nwhile True:\n    try:\n        time.sleep(600)\n    except KeyboardInterrupt:\n        pass";
    let out = h
        .run(json!({ "code": code, "context_id": ctx, "timeout": 0.2 }))
        .await;
    assert_eq!(error_of(&out).unwrap()["name"], "ContextRestarting");
    let after = h.py(&ctx, "lost").await;
    assert_eq!(error_of(&after).unwrap()["name"], "NameError");
    assert_eq!(count(&after), 1);
    let died = h.py(&ctx, "import os\nos._exit(1)").await;
    assert_eq!(error_of(&died).unwrap()["name"], "ContextRestarting");
    assert_eq!(
        main_text(&h.py(&ctx, "'back'").await).as_deref(),
        Some("back")
    );
    h.interp.shutdown().await;
}

#[tokio::test]
async fn a_client_that_hangs_up_interrupts_its_cell() {
    let h = Harness::new().await;
    let ctx = h.create(json!({})).await;
    h.py(&ctx, "kept = 'yes'").await;
    let body = json!({ "code": "import time\nprint('go')\ntime.sleep(600)", "context_id": ctx });
    let resp = h
        .send(Method::POST, "/execute", None, &body.to_string())
        .await;
    let mut stream = resp.into_body();
    // Wait until the cell runs, then hang up.
    tokio::time::timeout(GUARD, async {
        let mut seen = String::new();
        while !seen.contains("go") {
            let frame = stream.frame().await.unwrap().unwrap();
            seen.push_str(std::str::from_utf8(frame.data_ref().unwrap()).unwrap());
        }
    })
    .await
    .unwrap();
    drop(stream);
    // Queued behind the sleeping cell, this finishes only if the hang-up interrupted it.
    let after = h.py(&ctx, "kept").await;
    assert_eq!(main_text(&after).as_deref(), Some("yes"));
    h.interp.shutdown().await;
}

#[tokio::test]
async fn restart_clears_state_and_delete_removes() {
    let h = Harness::new().await;
    let ctx = h.create(json!({ "language": "python" })).await;
    h.py(&ctx, "gone = 1").await;
    let (status, text) = h
        .call(Method::POST, &format!("/contexts/{ctx}/restart"), "")
        .await;
    assert_eq!((status, text.as_str()), (StatusCode::OK, "null"));
    let after = h.py(&ctx, "gone").await;
    assert_eq!(error_of(&after).unwrap()["name"], "NameError");
    assert_eq!(count(&after), 1);
    let (status, text) = h
        .call(Method::DELETE, &format!("/contexts/{ctx}"), "")
        .await;
    assert_eq!((status, text.as_str()), (StatusCode::OK, "null"));
    let (status, text) = h
        .call(
            Method::POST,
            "/execute",
            &json!({ "code": "1", "context_id": ctx }).to_string(),
        )
        .await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert_eq!(text, format!("Context {ctx} not found"));
    let (status, _) = h
        .call(Method::DELETE, &format!("/contexts/{ctx}"), "")
        .await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    let (status, _) = h
        .call(Method::POST, &format!("/contexts/{ctx}/restart"), "")
        .await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    let (_, list) = h.call(Method::GET, "/contexts", "").await;
    assert!(!list.contains(&ctx), "{list}");
    h.interp.shutdown().await;
}

#[tokio::test]
async fn restart_during_an_execution_ends_it_with_an_error() {
    let h = Harness::new().await;
    let ctx = h.create(json!({})).await;
    let body = json!({ "code": "import time\nprint('go')\ntime.sleep(600)", "context_id": ctx });
    let resp = h
        .send(Method::POST, "/execute", None, &body.to_string())
        .await;
    let mut stream = resp.into_body();
    let mut seen = String::new();
    tokio::time::timeout(GUARD, async {
        while !seen.contains("go") {
            let frame = stream.frame().await.unwrap().unwrap();
            seen.push_str(std::str::from_utf8(frame.data_ref().unwrap()).unwrap());
        }
    })
    .await
    .unwrap();
    let (status, _) = h
        .call(Method::POST, &format!("/contexts/{ctx}/restart"), "")
        .await;
    assert_eq!(status, StatusCode::OK);
    let rest = tokio::time::timeout(GUARD, stream.collect())
        .await
        .unwrap()
        .unwrap();
    seen.push_str(std::str::from_utf8(&rest.to_bytes()).unwrap());
    let all = lines(&seen);
    assert_eq!(error_of(&all).unwrap()["name"], "ContextRestarting");
    assert_eq!(count(&h.py(&ctx, "1").await), 1);
    h.interp.shutdown().await;
}

#[tokio::test]
async fn bad_requests_get_the_right_status_and_the_agent_keeps_serving() {
    let h = Harness::new().await;
    let cases: Vec<(Method, &str, &str, StatusCode)> = vec![
        (
            Method::POST,
            "/execute",
            "{not json",
            StatusCode::BAD_REQUEST,
        ),
        (Method::POST, "/execute", "", StatusCode::BAD_REQUEST),
        (
            Method::POST,
            "/execute",
            "{\"code\": 5}",
            StatusCode::UNPROCESSABLE_ENTITY,
        ),
        (
            Method::POST,
            "/execute",
            "{\"context_id\": \"x\"}",
            StatusCode::UNPROCESSABLE_ENTITY,
        ),
        (
            Method::POST,
            "/execute",
            "[1,2]",
            StatusCode::UNPROCESSABLE_ENTITY,
        ),
        (
            Method::POST,
            "/execute",
            "{\"code\": \"1\", \"context_id\": \"a\", \"language\": \"python\"}",
            StatusCode::BAD_REQUEST,
        ),
        (
            Method::POST,
            "/execute",
            "{\"code\": \"1\", \"context_id\": \"nope\"}",
            StatusCode::NOT_FOUND,
        ),
        (
            Method::POST,
            "/execute",
            "{\"code\": \"1\", \"language\": \"cobol\"}",
            StatusCode::BAD_REQUEST,
        ),
        (
            Method::POST,
            "/execute",
            "{\"code\": \"1\", \"timeout\": -1}",
            StatusCode::BAD_REQUEST,
        ),
        (
            Method::POST,
            "/execute",
            "{\"code\": \"1\", \"env_vars\": {\"A=B\": \"x\"}}",
            StatusCode::BAD_REQUEST,
        ),
        (
            Method::POST,
            "/contexts",
            "{\"cwd\": 3}",
            StatusCode::UNPROCESSABLE_ENTITY,
        ),
        (
            Method::POST,
            "/contexts",
            "{\"language\": \"cobol\"}",
            StatusCode::BAD_REQUEST,
        ),
        (
            Method::POST,
            "/contexts",
            "{\"cwd\": \"/definitely/not/here\"}",
            StatusCode::INTERNAL_SERVER_ERROR,
        ),
        (Method::GET, "/execute", "", StatusCode::METHOD_NOT_ALLOWED),
        (Method::PUT, "/contexts", "", StatusCode::METHOD_NOT_ALLOWED),
        (
            Method::GET,
            "/contexts/x/restart",
            "",
            StatusCode::METHOD_NOT_ALLOWED,
        ),
        (Method::GET, "/nothing", "", StatusCode::NOT_FOUND),
    ];
    for (method, path, body, want) in cases {
        let (status, text) = h.call(method.clone(), path, body).await;
        assert_eq!(status, want, "{method} {path} {body}: {text}");
    }
    let (_, text) = h.call(Method::GET, "/nothing", "").await;
    let v: Value = serde_json::from_str(&text).unwrap();
    assert_eq!(v["code"], 404);
    let huge = format!("{{\"code\": \"{}\"}}", "x".repeat(17 << 20));
    let (status, _) = h.call(Method::POST, "/execute", &huge).await;
    assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE);
    // Still serving, and an empty /contexts body means every default.
    let ctx = h.create(json!({})).await;
    assert_eq!(
        main_text(&h.py(&ctx, "2 * 21").await).as_deref(),
        Some("42")
    );
    let (status, _) = h.call(Method::POST, "/contexts", "").await;
    assert_eq!(status, StatusCode::OK);
    h.interp.shutdown().await;
}

#[tokio::test]
async fn only_execute_checks_the_access_token() {
    let h = Harness::new().await;
    *h.state.access_token.write().unwrap() = Some("secret".into());
    let body =
        json!({ "code": "1", "context_id": null, "language": null, "env_vars": null }).to_string();
    for token in [None, Some("wrong")] {
        let resp = h.send(Method::POST, "/execute", token, &body).await;
        assert_eq!(resp.status(), StatusCode::UNAUTHORIZED);
    }
    let resp = h
        .send(Method::POST, "/execute", Some("secret"), &body)
        .await;
    assert_eq!(resp.status(), StatusCode::OK);
    let text = resp.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(
        main_text(&lines(std::str::from_utf8(&text).unwrap())).as_deref(),
        Some("1")
    );
    // The SDK sends no token to /contexts*.
    let ctx = h.create(json!({})).await;
    let (status, _) = h.call(Method::GET, "/contexts", "").await;
    assert_eq!(status, StatusCode::OK);
    let (status, _) = h
        .call(Method::POST, &format!("/contexts/{ctx}/restart"), "")
        .await;
    assert_eq!(status, StatusCode::OK);
    let (status, _) = h
        .call(Method::DELETE, &format!("/contexts/{ctx}"), "")
        .await;
    assert_eq!(status, StatusCode::OK);
    h.interp.shutdown().await;
}

#[tokio::test]
async fn env_vars_apply_to_one_execution() {
    let h = Harness::new().await;
    h.state
        .envs
        .write()
        .unwrap()
        .insert("GLOBAL_ONE".into(), "g".into());
    let ctx = h.create(json!({})).await;
    h.py(&ctx, "import os\nos.environ['KEEP'] = 'before'").await;
    let during = h
        .run(json!({
            "code": "os.environ['KEEP'] + os.environ['ONLY_NOW'] + os.environ['GLOBAL_ONE']",
            "context_id": ctx,
            "env_vars": { "KEEP": "during", "ONLY_NOW": "x" }
        }))
        .await;
    assert_eq!(main_text(&during).as_deref(), Some("duringxg"));
    let after = h
        .py(&ctx, "os.environ['KEEP'], os.environ.get('ONLY_NOW')")
        .await;
    assert_eq!(main_text(&after).as_deref(), Some("('before', None)"));
    let bash = h.create(json!({ "language": "bash" })).await;
    let during = h
        .run(json!({ "code": "echo \"$ONLY_NOW/$GLOBAL_ONE\"", "context_id": bash, "env_vars": { "ONLY_NOW": "it's" } }))
        .await;
    assert_eq!(stdout(&during), "it's/g\n");
    let after = h.py(&bash, "echo \"[${ONLY_NOW-unset}]\"").await;
    assert_eq!(stdout(&after), "[unset]\n");
    h.interp.shutdown().await;
}

#[tokio::test]
async fn bash_contexts_keep_variables_and_cwd() {
    let h = Harness::new().await;
    let ctx = h.create(json!({ "language": "bash" })).await;
    let first = h
        .py(
            &ctx,
            "cd /tmp\nX=5\ndeclare -A m=([k]=v)\nf() { echo \"f$1\"; }",
        )
        .await;
    assert!(error_of(&first).is_none(), "{first:?}");
    let second = h
        .py(&ctx, "echo \"$X $PWD ${m[k]}\"; f 1; echo err >&2")
        .await;
    assert_eq!(stdout(&second), "5 /tmp v\nf1\n");
    assert_eq!(stderr(&second), "err\n");
    assert_eq!(count(&second), 2);
    let failed = h.py(&ctx, "false").await;
    let err = error_of(&failed).unwrap();
    assert_eq!(
        (err["name"].as_str(), err["value"].as_str()),
        (Some(""), Some("1"))
    );
    let slow = h
        .run(json!({ "code": "echo start; while true; do sleep 600; done; echo never", "context_id": ctx, "timeout": 0.5 }))
        .await;
    assert_eq!(stdout(&slow), "start\n");
    assert!(error_of(&slow).is_some());
    let kept = h.py(&ctx, "echo $X").await;
    assert_eq!(stdout(&kept), "5\n");
    let by_language = h
        .run(json!({ "code": "echo hi", "context_id": null, "language": "bash", "env_vars": null }))
        .await;
    assert_eq!(stdout(&by_language), "hi\n");
    let exited = h.py(&ctx, "exit 3").await;
    assert_eq!(error_of(&exited).unwrap()["name"], "ContextRestarting");
    assert_eq!(stdout(&h.py(&ctx, "echo \"[$X]\"").await), "[]\n");
    h.interp.shutdown().await;
}

#[tokio::test]
async fn fifty_concurrent_executions_across_contexts() {
    let h = Arc::new(Harness::new().await);
    let mut ids = Vec::new();
    for _ in 0..3 {
        let id = h.create(json!({})).await;
        h.py(&id, "n = 0").await;
        ids.push(id);
    }
    let mut tasks = Vec::new();
    for i in 0..50 {
        let h = Arc::clone(&h);
        let id = ids[i % 3].clone();
        tasks.push(tokio::spawn(async move {
            let out = h.py(&id, &format!("n += 1\nprint({i})\nn")).await;
            assert!(error_of(&out).is_none(), "{out:?}");
            assert_eq!(stdout(&out), format!("{i}\n"));
            (id, count(&out))
        }));
    }
    let mut counts: std::collections::HashMap<String, Vec<u64>> = Default::default();
    for t in tasks {
        let (id, c) = t.await.unwrap();
        counts.entry(id).or_default().push(c);
    }
    for (k, id) in ids.iter().enumerate() {
        let mut c = counts.remove(id).unwrap();
        c.sort_unstable();
        let runs = u64::try_from((50 + 2 - k) / 3).unwrap();
        // Serialized per context: every count from 2 on appears exactly once.
        assert_eq!(c, (2..2 + runs).collect::<Vec<_>>());
        let n = h.py(id, "n").await;
        assert_eq!(main_text(&n), Some(runs.to_string()));
    }
    h.interp.shutdown().await;
}

#[tokio::test]
async fn unicode_and_huge_outputs_arrive_whole() {
    let h = Harness::new().await;
    let ctx = h.create(json!({})).await;
    let out = h
        .py(
            &ctx,
            "print('héllo ☃ 𝄞 \\x00 \\udcff')\nprint('é' * 300000)\n'☃' * 3",
        )
        .await;
    let text = stdout(&out);
    let mut want = String::from("héllo ☃ 𝄞 \u{0} \\udcff\n");
    want.push_str(&"é".repeat(300_000));
    want.push('\n');
    assert_eq!(text.len(), want.len());
    assert!(text == want, "stdout differs");
    assert_eq!(main_text(&out).as_deref(), Some("☃☃☃"));
    let big = h.py(&ctx, "'x' * 5_000_000").await;
    assert_eq!(main_text(&big).map(|t| t.len()), Some(5_000_000));
    let bytes = h
        .py(
            &ctx,
            "import sys\nsys.stdout.buffer.write(b'\\xff\\xfeok\\n')\nsys.stdout.flush()",
        )
        .await;
    assert_eq!(stdout(&bytes), "\u{FFFD}\u{FFFD}ok\n");
    h.interp.shutdown().await;
}

/// What a Python cell reports about its process: working directory, `LATE_VAR` as the cell
/// sees it, and whether the process was started with `LATE_VAR` in its environment.
const WHERE_AND_WHEN: &str = "import os\n(os.getcwd(), os.environ.get('LATE_VAR'), b'LATE_VAR=' in open('/proc/self/environ', 'rb').read())";

#[tokio::test]
async fn a_prestarted_process_becomes_the_first_python_context_in_its_place() {
    let h = Harness::new().await;
    h.interp.prestart(&h.state, Language::Python).await;
    assert!(
        h.interp.spare.waiting().is_some(),
        "no spare process started"
    );
    // What /init sets after the agent started: the context must see it all the same.
    h.state
        .envs
        .write()
        .unwrap()
        .insert("LATE_VAR".into(), "late".into());
    let run =
        json!({ "code": WHERE_AND_WHEN, "context_id": null, "language": null, "env_vars": null });
    let out = h.run(run.clone()).await;
    let dir = h.dir.path().display().to_string();
    // Started before LATE_VAR existed, so it is the spare, moved to the context's place.
    assert_eq!(
        main_text(&out).as_deref(),
        Some(format!("('{dir}', 'late', False)").as_str()),
        "{out:?}"
    );
    assert_eq!(h.interp.spare.waiting(), None);
    // The next context starts its own process.
    let sub = h.dir.path().join("sub");
    std::fs::create_dir(&sub).unwrap();
    let ctx = h
        .create(json!({ "language": "python", "cwd": sub.display().to_string() }))
        .await;
    let out = h.py(&ctx, WHERE_AND_WHEN).await;
    assert_eq!(
        main_text(&out).as_deref(),
        Some(format!("('{}', 'late', True)", sub.display()).as_str()),
        "{out:?}"
    );
    h.interp.shutdown().await;
}

#[tokio::test]
async fn a_prestarted_process_killed_while_it_waited_is_not_used() {
    let h = Harness::new().await;
    h.interp.prestart(&h.state, Language::Python).await;
    let pgid = h.interp.spare.waiting().expect("no spare process started");
    nix::sys::signal::killpg(
        nix::unistd::Pid::from_raw(pgid),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    h.state
        .envs
        .write()
        .unwrap()
        .insert("LATE_VAR".into(), "late".into());
    // The reaper takes the exit; a fresh process then serves the cell.
    let run =
        json!({ "code": WHERE_AND_WHEN, "context_id": null, "language": null, "env_vars": null });
    let mut out = h.run(run.clone()).await;
    for _ in 0..50 {
        if error_of(&out).is_none() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
        out = h.run(run.clone()).await;
    }
    let dir = h.dir.path().display().to_string();
    assert_eq!(
        main_text(&out).as_deref(),
        Some(format!("('{dir}', 'late', True)").as_str()),
        "{out:?}"
    );
    h.interp.shutdown().await;
}

#[tokio::test]
async fn only_python_can_be_prestarted() {
    let h = Harness::new().await;
    h.interp.prestart(&h.state, Language::Bash).await;
    assert_eq!(h.interp.spare.waiting(), None);
    h.interp.shutdown().await;
}
