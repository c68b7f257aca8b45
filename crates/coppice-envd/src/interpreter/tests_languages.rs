//! The languages beside python and bash: javascript, typescript, r and java, through
//! [`Interpreter::serve`] with real interpreters from `PATH` (Node.js with Debian's
//! `node-acorn` and `node-typescript`, R's `Rscript`, a JDK's `java`). A test whose
//! interpreter is missing prints `SKIP <test>: <reason>` and returns. Every context is
//! killed at the end of its test.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Method, Request, StatusCode};
use http_body_util::{BodyExt, Full};
use serde_json::{json, Value};

use crate::interpreter::context::{Language, RUNNERS};
use crate::interpreter::{Interpreter, InterpreterConfig};
use crate::state::AgentState;

/// A hang guard, not a timing assertion: a wedged agent fails the test instead of hanging.
const GUARD: Duration = Duration::from_secs(120);

struct Lang {
    interp: Arc<Interpreter>,
    state: Arc<AgentState>,
    dir: tempfile::TempDir,
}

impl Lang {
    fn new() -> Self {
        Self::with_envs(HashMap::new())
    }

    fn with_envs(envs: HashMap<String, String>) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let config = InterpreterConfig {
            driver_dir: dir.path().join("driver"),
            interrupt_grace: Duration::from_secs(2),
            ..InterpreterConfig::default()
        };
        let interp = Arc::new(Interpreter::new(config));
        let state = Arc::new(AgentState::new());
        *state.default_user.write().unwrap() = current_user();
        *state.default_workdir.write().unwrap() = Some(dir.path().display().to_string());
        // R makes a session directory under TMPDIR that a killed R cannot remove: it goes
        // with the test's directory, not into the host's /tmp.
        let tmp = dir.path().join("tmp");
        std::fs::create_dir_all(&tmp).unwrap();
        let mut envs = envs;
        envs.entry("TMPDIR".into())
            .or_insert_with(|| tmp.display().to_string());
        *state.envs.write().unwrap() = envs;
        Self { interp, state, dir }
    }

    async fn call(&self, method: Method, path: &str, body: &str) -> (StatusCode, String) {
        let req = Request::builder()
            .method(method)
            .uri(path)
            .header("content-type", "application/json")
            .body(Full::new(Bytes::from(body.to_owned())))
            .unwrap();
        let done = tokio::time::timeout(GUARD, async {
            let resp = self.interp.serve(Arc::clone(&self.state), req).await;
            let status = resp.status();
            let bytes = resp.into_body().collect().await.unwrap().to_bytes();
            (status, String::from_utf8(bytes.to_vec()).unwrap())
        })
        .await;
        done.expect("request did not finish")
    }

    async fn create(&self, language: &str, cwd: Option<&str>) -> String {
        let mut body = json!({ "language": language });
        if let Some(cwd) = cwd {
            body["cwd"] = json!(cwd);
        }
        let (status, text) = self
            .call(Method::POST, "/contexts", &body.to_string())
            .await;
        assert_eq!(status, StatusCode::OK, "{text}");
        let v: Value = serde_json::from_str(&text).unwrap();
        let name = Language::parse(Some(language)).unwrap().name();
        assert_eq!(v["language"], name);
        v["id"].as_str().unwrap().to_owned()
    }

    async fn run_with(&self, ctx: &str, code: &str, env: Value, timeout: Option<f64>) -> Run {
        let mut body = json!({ "code": code, "context_id": ctx, "env_vars": env });
        if let Some(t) = timeout {
            body["timeout"] = json!(t);
        }
        let (status, text) = self.call(Method::POST, "/execute", &body.to_string()).await;
        assert_eq!(status, StatusCode::OK, "{text}");
        Run::parse(&text)
    }

    async fn run(&self, ctx: &str, code: &str) -> Run {
        self.run_with(ctx, code, Value::Null, None).await
    }

    fn write(&self, name: &str, text: &str) {
        std::fs::write(self.dir.path().join(name), text).unwrap();
    }
}

/// One execution's lines, sorted the way the SDK sorts them.
#[derive(Debug)]
struct Run {
    stdout: Vec<String>,
    stderr: Vec<String>,
    results: Vec<Value>,
    error: Option<Value>,
    raw: String,
}

impl Run {
    fn parse(text: &str) -> Self {
        assert!(text.ends_with('\n'), "unterminated stream: {text:?}");
        let lines: Vec<Value> = text
            .trim_end_matches('\n')
            .split('\n')
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        assert_eq!(lines.last().unwrap()["type"], "end_of_execution", "{text}");
        let texts = |ty: &str| -> Vec<String> {
            lines
                .iter()
                .filter(|l| l["type"] == ty)
                .map(|l| l["text"].as_str().unwrap().to_owned())
                .collect()
        };
        Self {
            stdout: texts("stdout"),
            stderr: texts("stderr"),
            results: lines
                .iter()
                .filter(|l| l["type"] == "result")
                .cloned()
                .collect(),
            error: lines.iter().find(|l| l["type"] == "error").cloned(),
            raw: text.to_owned(),
        }
    }

    /// The main result's text, as `Execution.text` gives it.
    fn text(&self) -> Option<&str> {
        self.results
            .iter()
            .find(|r| r["is_main_result"] == true)
            .and_then(|r| r["text"].as_str())
    }

    /// The first result's text, as `results[0].text` gives it.
    fn first(&self) -> Option<&str> {
        self.results.first().and_then(|r| r["text"].as_str())
    }

    fn ok(&self) -> &Self {
        assert!(self.error.is_none(), "unexpected error: {}", self.raw);
        self
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

/// Whether `program` is on `PATH`; prints the SKIP line when it is not.
#[allow(
    clippy::print_stdout,
    reason = "house style: a skipped test says SKIP on stdout"
)]
fn have(test: &str, program: &str) -> bool {
    let found = std::env::var_os("PATH").is_some_and(|path| {
        std::env::split_paths(&path).any(|dir| {
            use std::os::unix::fs::PermissionsExt;
            std::fs::metadata(dir.join(program))
                .is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        })
    });
    if !found {
        println!("SKIP {test}: {program} is not installed");
    }
    found
}

#[test]
fn the_launch_table_has_one_row_per_language_in_order() {
    for (i, runner) in RUNNERS.iter().enumerate() {
        assert_eq!(runner.language as usize, i, "{}", runner.name);
        assert_eq!(Language::parse(Some(runner.name)), Ok(runner.language));
        assert_eq!(runner.language.name(), runner.name);
    }
    for (alias, language) in [
        ("JS", Language::JavaScript),
        (" ts ", Language::TypeScript),
        ("R", Language::R),
        ("Java", Language::Java),
        ("", Language::Python),
    ] {
        assert_eq!(Language::parse(Some(alias)), Ok(language), "{alias:?}");
    }
    assert_eq!(Language::parse(None), Ok(Language::Python));
    assert_eq!(Language::parse(Some("Cobol")), Err("cobol".to_owned()));
}

#[tokio::test]
async fn javascript_keeps_state_and_shows_the_last_expression() {
    if !have(
        "javascript_keeps_state_and_shows_the_last_expression",
        "node",
    ) {
        return;
    }
    let h = Lang::new();
    let ctx = h.create("javascript", None).await;
    let r = h.run(&ctx, "console.log('Hello World!')").await;
    assert_eq!(r.ok().stdout, vec!["Hello World!\n"]);
    assert!(r.results.is_empty(), "{}", r.raw);
    assert!(h.run(&ctx, "const x = 41").await.ok().results.is_empty());
    assert_eq!(h.run(&ctx, "x + 1").await.ok().text(), Some("42"));
    // A notebook declares things again: that must not be an error.
    h.run(&ctx, "const x = 1; let { a, b: [c] } = { a: 2, b: [3] }")
        .await
        .ok();
    assert_eq!(
        h.run(&ctx, "[x, a, c]").await.ok().text(),
        Some("[ 1, 2, 3 ]")
    );
    // Functions are hoisted within their cell and kept after it.
    assert_eq!(
        h.run(
            &ctx,
            "const y = twice(2)\nfunction twice(n) { return n * 2 }\ny"
        )
        .await
        .ok()
        .text(),
        Some("4")
    );
    assert_eq!(
        h.run(&ctx, "class P { get v() { return twice(5) } }; new P().v")
            .await
            .ok()
            .text(),
        Some("10")
    );
    // Strings come as util.inspect shows them, minus the quotes (E2B strips them).
    assert_eq!(h.run(&ctx, "'it' + 's'").await.ok().text(), Some("its"));
    assert_eq!(
        h.run(&ctx, "({ n: 1, s: 'x' })").await.ok().text(),
        Some("{ n: 1, s: 'x' }")
    );
    let err = h.run(&ctx, "throw new TypeError('bad')").await;
    let e = err.error.as_ref().expect("an error");
    assert_eq!(e["name"], "TypeError");
    assert_eq!(e["value"], "bad");
    assert!(
        e["traceback"].as_str().unwrap().contains("TypeError: bad"),
        "{e}"
    );
    // Type annotations work in javascript too, as in E2B's kernel.
    assert_eq!(
        h.run(&ctx, "const typed: number = 5; typed")
            .await
            .ok()
            .text(),
        Some("5")
    );
    let syntax = h.run(&ctx, "let = = 1").await;
    assert_eq!(
        syntax.error.as_ref().unwrap()["name"],
        "SyntaxError",
        "{}",
        syntax.raw
    );
    // A rejection nobody awaits is reported on stderr and the context lives on.
    let stray = h.run(&ctx, "Promise.reject(new Error('stray')); 7").await;
    assert_eq!(stray.ok().text(), Some("7"));
    // The report may come after `done`; then it is delivered with the next execution.
    let next = h
        .run(&ctx, "await new Promise(r => setTimeout(r, 50))")
        .await;
    let stderr = stray.stderr.concat() + &next.ok().stderr.concat();
    assert!(stderr.contains("stray"), "{}{}", stray.raw, next.raw);
    assert_eq!(h.run(&ctx, "x").await.ok().text(), Some("1"));
    h.interp.shutdown().await;
}

#[tokio::test]
async fn javascript_imports_modules_and_awaits_at_top_level() {
    if !have("javascript_imports_modules_and_awaits_at_top_level", "node") {
        return;
    }
    let h = Lang::new();
    h.write(
        "answer.mjs",
        "export const answer = 42;\nexport default function hello() { return 'hi'; }\n",
    );
    h.write("legacy.cjs", "module.exports = { legacy: 'cjs' };\n");
    let ctx = h.create("javascript", None).await;
    let r = h
        .run(
            &ctx,
            "\n    import { readFileSync } from 'fs'\n    console.log(typeof readFileSync)\n    ",
        )
        .await;
    assert_eq!(r.ok().stdout, vec!["function\n"]);
    let r = h
        .run(&ctx, "import hello, { answer } from './answer.mjs'\nanswer")
        .await;
    assert_eq!(r.ok().text(), Some("42"));
    // Imported names stay for later cells.
    assert_eq!(h.run(&ctx, "hello()").await.ok().text(), Some("hi"));
    assert_eq!(
        h.run(
            &ctx,
            "import * as ns from './legacy.cjs'\nns.default.legacy"
        )
        .await
        .ok()
        .text(),
        Some("cjs")
    );
    assert_eq!(
        h.run(&ctx, "\n    await Promise.resolve('Hello World!')\n    ")
            .await
            .ok()
            .text(),
        Some("Hello World!")
    );
    let r = h
        .run(
            &ctx,
            "const v = await new Promise(r => setTimeout(() => r(5), 20))\nv * 2",
        )
        .await;
    assert_eq!(r.ok().text(), Some("10"));
    // Packages in the working directory's node_modules: CommonJS, and ES-module-only ones
    // whose `exports` have no `require` condition (require.resolve refuses those).
    let modules = h.dir.path().join("node_modules");
    std::fs::create_dir_all(modules.join("cjs-pkg")).unwrap();
    std::fs::write(
        modules.join("cjs-pkg/package.json"),
        r#"{"name":"cjs-pkg","main":"main.js"}"#,
    )
    .unwrap();
    std::fs::write(modules.join("cjs-pkg/main.js"), "exports.kind = 'cjs';\n").unwrap();
    std::fs::create_dir_all(modules.join("@e2e/esm-only/sub")).unwrap();
    std::fs::write(
        modules.join("@e2e/esm-only/package.json"),
        r#"{"name":"@e2e/esm-only","exports":{".":{"import":"./index.mjs"},"./sub":{"import":"./sub/x.mjs"}}}"#,
    )
    .unwrap();
    std::fs::write(
        modules.join("@e2e/esm-only/index.mjs"),
        "export const kind = 'esm';\n",
    )
    .unwrap();
    std::fs::write(
        modules.join("@e2e/esm-only/sub/x.mjs"),
        "export const kind = 'sub';\n",
    )
    .unwrap();
    let r = h
        .run(
            &ctx,
            "import { kind as a } from 'cjs-pkg'\nimport { kind as b } from '@e2e/esm-only'\n\
             import { kind as c } from '@e2e/esm-only/sub'\n[a, b, c].join()",
        )
        .await;
    assert_eq!(r.ok().text(), Some("cjs,esm,sub"));
    let missing = h.run(&ctx, "import './nope.mjs'").await;
    assert!(missing.error.is_some(), "{}", missing.raw);
    h.interp.shutdown().await;
}

#[tokio::test]
async fn javascript_timeouts_interrupt_and_keep_the_context() {
    if !have("javascript_timeouts_interrupt_and_keep_the_context", "node") {
        return;
    }
    let h = Lang::new();
    let ctx = h.create("js", None).await;
    assert_eq!(
        h.run(&ctx, "var kept = 'yes'; kept").await.ok().text(),
        Some("yes")
    );
    // A busy loop, stopped by breakOnSigint.
    let r = h
        .run_with(&ctx, "while (true) {}", Value::Null, Some(0.5))
        .await;
    // Node.js words it by version ("Script execution was interrupted by `SIGINT`" in 20).
    let e = r.error.as_ref().expect("interrupted");
    assert_eq!(e["name"], "Error", "{}", r.raw);
    assert!(
        e["value"].as_str().unwrap().contains("interrupted"),
        "{}",
        r.raw
    );
    // A wait on a timer, stopped by the driver's SIGINT handler.
    let r = h
        .run_with(
            &ctx,
            "await new Promise(r => setTimeout(r, 600000))",
            Value::Null,
            Some(0.5),
        )
        .await;
    assert!(r.error.is_some(), "{}", r.raw);
    assert_eq!(h.run(&ctx, "kept").await.ok().text(), Some("yes"));
    h.interp.shutdown().await;
}

#[tokio::test]
async fn javascript_env_vars_and_cwd() {
    if !have("javascript_env_vars_and_cwd", "node") {
        return;
    }
    let h = Lang::with_envs(HashMap::from([(
        "TEST_ENV_VAR".to_owned(),
        "supertest".to_owned(),
    )]));
    let sub = h.dir.path().join("sub");
    std::fs::create_dir(&sub).unwrap();
    let sub = sub.display().to_string();
    let ctx = h.create("javascript", Some(&sub)).await;
    assert_eq!(
        h.run(&ctx, "process.cwd()").await.ok().text(),
        Some(sub.as_str())
    );
    let r = h
        .run_with(&ctx, "process.env.FOO", json!({ "FOO": "bar" }), None)
        .await;
    assert_eq!(r.ok().text(), Some("bar"));
    assert_eq!(
        h.run(&ctx, "process.env.FOO || 'default'")
            .await
            .ok()
            .text(),
        Some("default")
    );
    assert_eq!(
        h.run(&ctx, "process.env.TEST_ENV_VAR").await.ok().text(),
        Some("supertest")
    );
    let r = h
        .run_with(
            &ctx,
            "process.env.TEST_ENV_VAR",
            json!({ "TEST_ENV_VAR": "overwrite" }),
            None,
        )
        .await;
    assert_eq!(r.ok().text(), Some("overwrite"));
    assert_eq!(
        h.run(&ctx, "process.env.TEST_ENV_VAR").await.ok().text(),
        Some("supertest")
    );
    h.interp.shutdown().await;
}

#[tokio::test]
async fn typescript_is_transpiled_per_cell() {
    if !have("typescript_is_transpiled_per_cell", "node") {
        return;
    }
    let h = Lang::new();
    h.write("area.mjs", "export function area(w, h) { return w * h; }\n");
    let ctx = h.create("typescript", None).await;
    let r = h
        .run(
            &ctx,
            "const message: string = 'Hello, World!'; console.log(message)",
        )
        .await;
    assert_eq!(r.ok().stdout, vec!["Hello, World!\n"]);
    h.run(
        &ctx,
        "interface Box { w: number; h: number }\nconst b: Box = { w: 2, h: 3 }",
    )
    .await
    .ok();
    // The import is used only in the next cell: it must survive transpilation.
    h.run(&ctx, "import { area } from './area.mjs'").await.ok();
    assert_eq!(
        h.run(&ctx, "area(b.w, b.h) as number").await.ok().text(),
        Some("6")
    );
    assert_eq!(
        h.run(&ctx, "process.cwd()").await.ok().text(),
        Some(h.dir.path().display().to_string().as_str())
    );
    let r = h
        .run_with(&ctx, "process.env.FOO", json!({ "FOO": "bar" }), None)
        .await;
    assert_eq!(r.ok().text(), Some("bar"));
    assert_eq!(
        h.run(&ctx, "await Promise.resolve<number>(3)")
            .await
            .ok()
            .text(),
        Some("3")
    );
    let bad = h.run(&ctx, "const : number = 1").await;
    assert!(bad.error.is_some(), "{}", bad.raw);
    h.interp.shutdown().await;
}

#[tokio::test]
async fn r_prints_values_as_irkernel_does() {
    if !have("r_prints_values_as_irkernel_does", "Rscript") {
        return;
    }
    let h = Lang::with_envs(HashMap::from([(
        "TEST_ENV_VAR".to_owned(),
        "supertest".to_owned(),
    )]));
    let ctx = h.create("r", None).await;
    let r = h.run(&ctx, "print(\"Hello, World!\")").await;
    assert_eq!(r.ok().stdout, vec!["[1] \"Hello, World!\"\n"]);
    h.run(&ctx, "x <- 5").await.ok();
    let r = h.run(&ctx, "x * 2").await;
    assert_eq!(r.ok().first(), Some("[1] 10"));
    // Every visible value is a result, none is the main one (IRkernel sends display_data).
    let r = h.run(&ctx, "1\ninvisible(2)\n'three'").await;
    let texts: Vec<&str> = r
        .results
        .iter()
        .map(|r| r["text"].as_str().unwrap())
        .collect();
    assert_eq!(texts, vec!["[1] 1", "[1] \"three\""]);
    assert!(r.results.iter().all(|r| r["is_main_result"] == false));
    let r = h.run(&ctx, "getwd()").await;
    assert_eq!(
        r.ok().first(),
        Some(format!("[1] \"{}\"", h.dir.path().display()).as_str())
    );
    let r = h
        .run_with(&ctx, "Sys.getenv('FOO')", json!({ "FOO": "bar" }), None)
        .await;
    assert_eq!(r.ok().first(), Some("[1] \"bar\""));
    let r = h.run(&ctx, "Sys.getenv('FOO', unset = 'default')").await;
    assert_eq!(r.ok().first(), Some("[1] \"default\""));
    let r = h.run(&ctx, "Sys.getenv('TEST_ENV_VAR')").await;
    assert_eq!(r.ok().first(), Some("[1] \"supertest\""));
    let r = h.run(&ctx, "stop('boom')\nprint('not reached')").await;
    let e = r.error.as_ref().expect("an error");
    assert_eq!(e["name"], "ERROR");
    assert!(e["value"].as_str().unwrap().contains("boom"), "{e}");
    assert!(r.stdout.is_empty(), "{}", r.raw);
    let r = h.run(&ctx, "warning('careful'); 1").await;
    assert!(r.ok().stderr.concat().contains("careful"), "{}", r.raw);
    let r = h
        .run_with(&ctx, "Sys.sleep(600)", Value::Null, Some(0.5))
        .await;
    let e = r.error.as_ref().expect("aborted");
    assert_eq!(e["name"], "ExecutionAborted", "{}", r.raw);
    assert_eq!(h.run(&ctx, "x").await.ok().first(), Some("[1] 5"));
    h.interp.shutdown().await;
}

#[tokio::test]
async fn java_runs_snippets_on_jshell() {
    if !have("java_runs_snippets_on_jshell", "java") {
        return;
    }
    let h = Lang::with_envs(HashMap::from([(
        "TEST_ENV_VAR".to_owned(),
        "supertest".to_owned(),
    )]));
    let ctx = h.create("java", None).await;
    let r = h.run(&ctx, "System.out.println(\"Hello, World!\")").await;
    // IJava sends the text and the line break as two writes; the SDK test checks [0].
    assert_eq!(r.ok().stdout, vec!["Hello, World!", "\n"]);
    h.run(&ctx, "int x = 41;\nString s = \"a\" + x;").await.ok();
    assert_eq!(h.run(&ctx, "x + 1").await.ok().text(), Some("42"));
    assert_eq!(h.run(&ctx, "s").await.ok().text(), Some("a41"));
    let r = h
        .run(&ctx, "int twice(int n) { return 2 * n; }\ntwice(x)")
        .await;
    assert_eq!(r.ok().text(), Some("82"));
    let r = h
        .run_with(
            &ctx,
            "System.getProperty(\"FOO\")",
            json!({ "FOO": "bar" }),
            None,
        )
        .await;
    assert_eq!(r.ok().text(), Some("bar"));
    let r = h
        .run(&ctx, "System.getProperty(\"FOO\", \"default\")")
        .await;
    assert_eq!(r.ok().text(), Some("default"));
    let r = h.run(&ctx, "System.getProperty(\"TEST_ENV_VAR\")").await;
    assert_eq!(r.ok().text(), Some("supertest"));
    let r = h.run(&ctx, "System.getProperty(\"user.dir\")").await;
    assert_eq!(
        r.ok().text(),
        Some(h.dir.path().display().to_string().as_str())
    );
    let r = h.run(&ctx, "int y = 1 / 0;").await;
    let e = r.error.as_ref().expect("an error");
    assert_eq!(e["name"], "ArithmeticException", "{e}");
    let r = h.run(&ctx, "int z = \"no\";").await;
    assert_eq!(
        r.error.as_ref().expect("an error")["name"],
        "CompilationException"
    );
    assert_eq!(h.run(&ctx, "x").await.ok().text(), Some("41"));
    // JShell.stop() ends the cell; the context keeps its state.
    let r = h
        .run_with(&ctx, "Thread.sleep(600000);", Value::Null, Some(0.5))
        .await;
    let e = r.error.as_ref().expect("aborted");
    assert_eq!(e["name"], "ExecutionAborted", "{}", r.raw);
    assert_eq!(h.run(&ctx, "x").await.ok().text(), Some("41"));
    h.interp.shutdown().await;
}

#[tokio::test]
async fn contexts_run_as_root_in_any_directory() {
    if !nix::unistd::Uid::effective().is_root() {
        return skip("contexts_run_as_root_in_any_directory", "needs root");
    }
    let h = Lang::new();
    // The sandbox's default user is not who contexts run as (E2B's kernels run as root).
    *h.state.default_user.write().unwrap() = "nobody".to_owned();
    let ctx = h.create("python", Some("/root")).await;
    let r = h.run(&ctx, "import os; (os.getcwd(), os.getuid())").await;
    assert_eq!(r.ok().text(), Some("('/root', 0)"));
    let (status, text) = h
        .call(
            Method::POST,
            "/contexts",
            &json!({ "language": "python", "cwd": "/no/such/dir" }).to_string(),
        )
        .await;
    assert_eq!(status, StatusCode::INTERNAL_SERVER_ERROR);
    assert_eq!(text, "failed to set working directory to '/no/such/dir'");
    h.interp.shutdown().await;
}

#[tokio::test]
async fn the_default_contexts_are_listed_before_any_execution() {
    let h = Lang::new();
    let (status, text) = h.call(Method::GET, "/contexts", "").await;
    assert_eq!(status, StatusCode::OK);
    let list: Vec<Value> = serde_json::from_str(&text).unwrap();
    let cwd = h.dir.path().display().to_string();
    let languages: Vec<(&str, &str)> = list
        .iter()
        .map(|c| (c["language"].as_str().unwrap(), c["cwd"].as_str().unwrap()))
        .collect();
    assert_eq!(
        languages,
        vec![("python", cwd.as_str()), ("javascript", cwd.as_str())]
    );
    // Running with `language` uses the listed default context.
    let (status, out) = h
        .call(
            Method::POST,
            "/execute",
            &json!({ "code": "default_ctx = 1", "language": "python" }).to_string(),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{out}");
    let r = h.run(list[0]["id"].as_str().unwrap(), "default_ctx").await;
    assert_eq!(r.ok().text(), Some("1"));
    h.interp.shutdown().await;
}

#[allow(
    clippy::print_stdout,
    reason = "house style: a skipped test says SKIP on stdout"
)]
fn skip(test: &str, reason: &str) {
    println!("SKIP {test}: {reason}");
}
