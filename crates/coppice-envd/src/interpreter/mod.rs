//! The code interpreter, E2B's port 49999: `POST /execute` streams NDJSON from a persistent
//! context; `POST|GET /contexts`, `POST /contexts/{id}/restart` and `DELETE /contexts/{id}`
//! manage contexts.
//!
//! Entry point: [`handle`], which the hop calls for requests addressed to port 49999.
//! A context is one long-lived interpreter process (`python3`, `bash`, `node`, `Rscript` or
//! `java`) running a small driver that ships inside this binary (`driver.py`, `driver.sh`,
//! `driver.js`, `driver.R`, `driver.java`) and is written to
//! [`InterpreterConfig::driver_dir`] on first use; `context::RUNNERS` is the one table of
//! how each language is launched and spoken to, `context` the process side and `ndjson` the
//! lines the client reads. `docs/code-interpreter.md` has the protocol.
//!
//! **Invariant:** only `/execute` looks at the access token; `/contexts*` never do, as the
//! SDK sends none there.

mod context;
mod ndjson;
#[cfg(test)]
mod tests;
#[cfg(test)]
mod tests_languages;

use std::collections::HashMap;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex as StdMutex, OnceLock, PoisonError};
use std::task::{Context as TaskContext, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::{header, HeaderValue, Method, Request, Response, StatusCode};
use http_body::Frame;
use http_body_util::{BodyExt, Limited};
use serde::Deserialize;
use tokio::sync::mpsc;

use crate::interpreter::context::{
    Context, ContextError, Job, Language, Launch, Program, Spare, RUNNERS,
};
use crate::reply::{error, full, json, Body};
use crate::secret::constant_time_eq;
use crate::state::AgentState;

/// Serves one code-interpreter request with the agent's interpreter.
pub(crate) async fn handle(
    state: Arc<AgentState>,
    req: Request<hyper::body::Incoming>,
) -> Response<Body> {
    global().serve(state, req).await
}

/// The agent's interpreter.
fn global() -> &'static Arc<Interpreter> {
    static GLOBAL: OnceLock<Arc<Interpreter>> = OnceLock::new();
    GLOBAL.get_or_init(|| Arc::new(Interpreter::new(InterpreterConfig::default())))
}

/// Starts the agent's interpreter's spare Python process (`--prestart python`); failures
/// are logged, and contexts then start their own processes as without it.
pub(crate) async fn prestart_python(state: Arc<AgentState>) {
    global().prestart(&state, Language::Python).await;
}

/// Where the interpreter finds its programs and how patient it is.
#[derive(Debug, Clone)]
pub(crate) struct InterpreterConfig {
    /// The Python executable; a bare name is looked up in `PATH`.
    pub(crate) python: PathBuf,
    /// The bash executable for `bash` contexts.
    pub(crate) bash: PathBuf,
    /// Node.js, for `javascript` and `typescript` contexts.
    pub(crate) node: PathBuf,
    /// R's script front end, for `r` contexts.
    pub(crate) rscript: PathBuf,
    /// The JDK's launcher (it must have the `jdk.jshell` module), for `java` contexts.
    pub(crate) java: PathBuf,
    /// The user contexts run as; `None` is root (E2B's Jupyter server and its kernels run
    /// as root), or the agent's own user when the agent is not root.
    pub(crate) user: Option<String>,
    /// Where the drivers are written (created if missing, readable by every user).
    pub(crate) driver_dir: PathBuf,
    /// Silence after which a `keepalive` line is sent (E2B: 5 s).
    pub(crate) keepalive: Duration,
    /// How long an interrupted cell may take to stop before its context is killed.
    pub(crate) interrupt_grace: Duration,
    /// How long a new context may take to report ready.
    pub(crate) start_timeout: Duration,
    /// The largest request body accepted.
    pub(crate) max_body: usize,
}

impl Default for InterpreterConfig {
    fn default() -> Self {
        Self {
            python: PathBuf::from("python3"),
            bash: PathBuf::from("bash"),
            node: PathBuf::from("node"),
            rscript: PathBuf::from("Rscript"),
            java: PathBuf::from("java"),
            user: None,
            driver_dir: PathBuf::from("/run/coppice/interpreter"),
            keepalive: Duration::from_secs(5),
            interrupt_grace: Duration::from_secs(3),
            start_timeout: Duration::from_secs(30),
            max_body: 16 << 20,
        }
    }
}

impl InterpreterConfig {
    /// The executable for one of the launch table's programs.
    fn program(&self, program: Program) -> &std::path::Path {
        match program {
            Program::Python => &self.python,
            Program::Bash => &self.bash,
            Program::Node => &self.node,
            Program::Rscript => &self.rscript,
            Program::Java => &self.java,
        }
    }
}

/// The languages whose contexts exist from the start, as E2B's server creates them.
const DEFAULT_LANGUAGES: [Language; 2] = [Language::Python, Language::JavaScript];

/// Files the drivers import from their own directory, written before any driver so that
/// a driver never runs without them: chart extraction for `driver.py`.
const DRIVER_HELPERS: [(&str, &str); 1] = [("charts.py", include_str!("charts.py"))];

/// The contexts of one sandbox.
#[derive(Debug)]
pub(crate) struct Interpreter {
    config: Arc<InterpreterConfig>,
    contexts: StdMutex<HashMap<String, Arc<Context>>>,
    /// The context `/execute` uses per language when it names no context.
    defaults: tokio::sync::Mutex<HashMap<Language, String>>,
    drivers: tokio::sync::OnceCell<PathBuf>,
    /// Set once the default contexts have been listed into `contexts`.
    seeded: tokio::sync::OnceCell<()>,
    seq: AtomicU64,
    /// A process started ahead of need, for the first context of its language.
    spare: Arc<Spare>,
}

/// `POST /execute`'s body; all four keys are always sent by the SDK.
#[derive(Debug, Deserialize)]
struct ExecuteRequest {
    code: String,
    #[serde(default)]
    context_id: Option<String>,
    #[serde(default)]
    language: Option<String>,
    #[serde(default)]
    env_vars: Option<HashMap<String, String>>,
    /// Coppice extension: seconds after which the cell is interrupted.
    #[serde(default)]
    timeout: Option<f64>,
}

/// `POST /contexts`' body; keys appear only when the caller set them.
#[derive(Debug, Default, Deserialize)]
struct CreateContextRequest {
    #[serde(default)]
    language: Option<String>,
    #[serde(default)]
    cwd: Option<String>,
}

impl Interpreter {
    /// An interpreter with no contexts yet.
    pub(crate) fn new(config: InterpreterConfig) -> Self {
        Self {
            config: Arc::new(config),
            contexts: StdMutex::new(HashMap::new()),
            defaults: tokio::sync::Mutex::new(HashMap::new()),
            drivers: tokio::sync::OnceCell::new(),
            seeded: tokio::sync::OnceCell::new(),
            seq: AtomicU64::new(0),
            spare: Arc::new(Spare::default()),
        }
    }

    /// Starts a spare process for `language`, as the user and with the environment a
    /// context would have now; the first context of that language that needs a process
    /// takes it and moves it to its own directory and environment.
    async fn prestart(self: &Arc<Self>, state: &Arc<AgentState>, language: Language) {
        let started = std::time::Instant::now();
        let result = async {
            let user = self.context_user(state);
            let launch = self.launch().await?;
            self.spare.fill(language, &user, state, &launch).await
        }
        .await;
        match result {
            Ok(()) => tracing::debug!(
                language = language.name(),
                ms = started.elapsed().as_millis(),
                "spare interpreter ready"
            ),
            Err(e) => tracing::warn!(
                language = language.name(),
                error = %e,
                "cannot prestart an interpreter; contexts start their own"
            ),
        }
    }

    /// Routes one request.
    pub(crate) async fn serve<B>(
        self: &Arc<Self>,
        state: Arc<AgentState>,
        req: Request<B>,
    ) -> Response<Body>
    where
        B: http_body::Body<Data = Bytes>,
        B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    {
        let path = req.uri().path().to_owned();
        let segments: Vec<&str> = path.trim_start_matches('/').split('/').collect();
        let method = req.method().clone();
        self.seed_defaults(&state).await;
        match (&method, segments.as_slice()) {
            (&Method::POST, ["execute"]) => self.execute(state, req).await,
            (&Method::GET, ["contexts"]) => self.list(),
            (&Method::POST, ["contexts"]) => self.create(state, req).await,
            (&Method::POST, ["contexts", id, "restart"]) => self.restart(state, id).await,
            (&Method::DELETE, ["contexts", id]) => self.delete(id).await,
            (&Method::GET, ["health"]) => json(StatusCode::OK, &serde_json::Value::from("OK")),
            (_, ["execute"] | ["contexts", _, "restart"]) => not_allowed("POST"),
            (_, ["contexts"]) => not_allowed("GET, POST"),
            (_, ["contexts", _]) => not_allowed("DELETE"),
            (_, ["health"]) => not_allowed("GET"),
            _ => error(
                StatusCode::NOT_FOUND,
                format!("no route for {method} {path}"),
            ),
        }
    }

    async fn execute<B>(self: &Arc<Self>, state: Arc<AgentState>, req: Request<B>) -> Response<Body>
    where
        B: http_body::Body<Data = Bytes>,
        B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    {
        if let Some(token) = state.token() {
            let given = req
                .headers()
                .get("x-access-token")
                .map(HeaderValue::as_bytes);
            if !given.is_some_and(|g| constant_time_eq(g, token.as_bytes())) {
                return error(
                    StatusCode::UNAUTHORIZED,
                    "unauthorized access, please provide a valid access token or method signing if supported",
                );
            }
        }
        let body = match self.body(req).await {
            Ok(b) => b,
            Err(rejection) => return rejection.into(),
        };
        let request: ExecuteRequest = match parse(&body) {
            Ok(r) => r,
            Err(rejection) => return rejection.into(),
        };
        if request.context_id.is_some() && request.language.is_some() {
            return text(
                StatusCode::BAD_REQUEST,
                "Only one of context_id or language can be provided",
            );
        }
        let timeout = match request.timeout {
            None => None,
            Some(t) if t.is_finite() && t > 0.0 && t < 1e9 => Some(Duration::from_secs_f64(t)),
            Some(_) => {
                return text(
                    StatusCode::BAD_REQUEST,
                    "timeout must be a positive number of seconds",
                )
            }
        };
        let ctx = if let Some(id) = &request.context_id {
            match self.get(id) {
                Some(c) => c,
                None => return text(StatusCode::NOT_FOUND, format!("Context {id} not found")),
            }
        } else {
            let language = match Language::parse(request.language.as_deref()) {
                Ok(l) => l,
                Err(name) => return unsupported(&name),
            };
            match self.default_context(&state, language).await {
                Ok(c) => c,
                Err(e) => return text(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
            }
        };
        let env = request.env_vars.unwrap_or_default();
        if let Some((k, _)) = env
            .iter()
            .find(|(k, v)| !context::valid_env_name(ctx.language, k) || v.contains('\0'))
        {
            return text(StatusCode::BAD_REQUEST, format!("Invalid env var: {k:?}"));
        }
        if !ctx.language.runner().nul_in_code && request.code.contains('\0') {
            return text(
                StatusCode::BAD_REQUEST,
                format!("{} code cannot contain NUL bytes", ctx.language.name()),
            );
        }
        let launch = match self.launch().await {
            Ok(l) => l,
            Err(e) => return text(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
        };
        let job = Job {
            code: request.code,
            env,
            timeout,
        };
        let (tx, rx) = mpsc::channel(64);
        tokio::spawn(ctx.execute(state, launch, job, tx));
        let mut resp = Response::new(LineStream { rx }.boxed());
        resp.headers_mut().insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/x-ndjson"),
        );
        resp
    }

    fn list(&self) -> Response<Body> {
        let mut all: Vec<Arc<Context>> = self.lock_contexts().values().cloned().collect();
        all.sort_by_key(|c| c.seq);
        let list: Vec<serde_json::Value> = all.iter().map(|c| describe(c)).collect();
        json(StatusCode::OK, &serde_json::Value::Array(list))
    }

    async fn create<B>(self: &Arc<Self>, state: Arc<AgentState>, req: Request<B>) -> Response<Body>
    where
        B: http_body::Body<Data = Bytes>,
        B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    {
        let body = match self.body(req).await {
            Ok(b) => b,
            Err(rejection) => return rejection.into(),
        };
        // An empty body means every default, as `{}` would.
        let request: CreateContextRequest = if body.iter().all(u8::is_ascii_whitespace) {
            CreateContextRequest::default()
        } else {
            match parse(&body) {
                Ok(r) => r,
                Err(rejection) => return rejection.into(),
            }
        };
        let language = match Language::parse(request.language.as_deref()) {
            Ok(l) => l,
            Err(name) => return unsupported(&name),
        };
        match self.new_context(&state, language, request.cwd).await {
            Ok(ctx) => json(StatusCode::OK, &describe(&ctx)),
            Err(e) => text(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
        }
    }

    async fn restart(self: &Arc<Self>, state: Arc<AgentState>, id: &str) -> Response<Body> {
        let Some(ctx) = self.get(id) else {
            return text(StatusCode::NOT_FOUND, format!("Context {id} not found"));
        };
        let launch = match self.launch().await {
            Ok(l) => l,
            Err(e) => return text(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
        };
        match ctx.restart(&state, &launch).await {
            Ok(()) => json(StatusCode::OK, &serde_json::Value::Null),
            Err(e) => text(
                StatusCode::INTERNAL_SERVER_ERROR,
                format!("Failed to restart context {id}: {e}"),
            ),
        }
    }

    async fn delete(&self, id: &str) -> Response<Body> {
        let removed = self.lock_contexts().remove(id);
        let Some(ctx) = removed else {
            return text(StatusCode::NOT_FOUND, format!("Context {id} not found"));
        };
        ctx.delete().await;
        json(StatusCode::OK, &serde_json::Value::Null)
    }

    /// Kills every context.
    #[cfg(test)]
    pub(crate) async fn shutdown(&self) {
        self.spare.discard();
        let all: Vec<Arc<Context>> = self.lock_contexts().drain().map(|(_, c)| c).collect();
        for ctx in all {
            ctx.delete().await;
        }
    }

    fn get(&self, id: &str) -> Option<Arc<Context>> {
        self.lock_contexts().get(id).cloned()
    }

    fn lock_contexts(&self) -> std::sync::MutexGuard<'_, HashMap<String, Arc<Context>>> {
        // Every critical section is one map operation, so a poisoned map is still whole.
        self.contexts.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Lists E2B's default contexts (python and javascript, in the default working
    /// directory) the first time the interpreter is used. Their processes start on their
    /// first execution, so an idle sandbox pays for none of them.
    async fn seed_defaults(self: &Arc<Self>, state: &Arc<AgentState>) {
        self.seeded
            .get_or_init(|| async {
                let mut defaults = self.defaults.lock().await;
                for language in DEFAULT_LANGUAGES {
                    let Ok((user, cwd)) = self.identity(state, None) else {
                        return;
                    };
                    let seq = self.seq.fetch_add(1, Ordering::Relaxed);
                    let ctx = Arc::new(Context::new(new_id(), language, cwd, user, seq));
                    defaults.insert(language, ctx.id.clone());
                    self.lock_contexts().insert(ctx.id.clone(), ctx);
                }
            })
            .await;
    }

    /// The user a new context runs as.
    fn context_user(&self, state: &AgentState) -> String {
        match &self.config.user {
            Some(u) => u.clone(),
            None if nix::unistd::Uid::effective().is_root() => "root".to_owned(),
            None => state.default_user_name(),
        }
    }

    /// The user a new context runs as, and its working directory.
    fn identity(
        &self,
        state: &Arc<AgentState>,
        cwd: Option<String>,
    ) -> Result<(String, String), ContextError> {
        let user = self.context_user(state);
        let cwd = match cwd.filter(|c| !c.is_empty()) {
            Some(c) => c,
            None => match state.default_workdir() {
                Some(w) => w,
                None => {
                    // E2B's default is /home/user, the home of the sandbox's default user.
                    let default_user = state.default_user_name();
                    crate::users::by_name(state, &default_user)
                        .map(|u| u.home.display().to_string())
                        .ok_or(ContextError::UnknownUser { user: default_user })?
                }
            },
        };
        Ok((user, cwd))
    }

    async fn default_context(
        self: &Arc<Self>,
        state: &Arc<AgentState>,
        language: Language,
    ) -> Result<Arc<Context>, ContextError> {
        // Held while creating, so concurrent first executions share one context.
        let mut defaults = self.defaults.lock().await;
        if let Some(ctx) = defaults.get(&language).and_then(|id| self.get(id)) {
            return Ok(ctx);
        }
        let ctx = self.new_context(state, language, None).await?;
        defaults.insert(language, ctx.id.clone());
        Ok(ctx)
    }

    async fn new_context(
        self: &Arc<Self>,
        state: &Arc<AgentState>,
        language: Language,
        cwd: Option<String>,
    ) -> Result<Arc<Context>, ContextError> {
        let (user, cwd) = self.identity(state, cwd)?;
        let launch = self.launch().await?;
        let seq = self.seq.fetch_add(1, Ordering::Relaxed);
        let ctx = Arc::new(Context::new(new_id(), language, cwd, user, seq));
        ctx.start(state, &launch).await?;
        self.lock_contexts()
            .insert(ctx.id.clone(), Arc::clone(&ctx));
        Ok(ctx)
    }

    async fn launch(&self) -> Result<Launch, ContextError> {
        let dir = self
            .drivers
            .get_or_try_init(|| async { write_drivers(&self.config.driver_dir) })
            .await?;
        Ok(Launch {
            config: Arc::clone(&self.config),
            driver_dir: dir.clone(),
            spare: Arc::clone(&self.spare),
        })
    }

    async fn body<B>(&self, req: Request<B>) -> Result<Bytes, Rejection>
    where
        B: http_body::Body<Data = Bytes>,
        B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    {
        match Limited::new(req.into_body(), self.config.max_body)
            .collect()
            .await
        {
            Ok(c) => Ok(c.to_bytes()),
            Err(e) if e.is::<http_body_util::LengthLimitError>() => Err(Rejection(
                StatusCode::PAYLOAD_TOO_LARGE,
                format!("request body is larger than {} bytes", self.config.max_body),
            )),
            Err(e) => Err(Rejection(
                StatusCode::BAD_REQUEST,
                format!("cannot read request body: {e}"),
            )),
        }
    }
}

/// Writes every driver of the launch table, each through a temporary file and a rename, so
/// a context never starts from a half-written one.
fn write_drivers(dir: &std::path::Path) -> Result<PathBuf, ContextError> {
    use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
    let fail = |path: &std::path::Path| {
        let path = path.to_owned();
        move |source| ContextError::Driver { path, source }
    };
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o755)
        .create(dir)
        .map_err(fail(dir))?;
    let drivers = RUNNERS.iter().map(|r| (r.driver, r.source));
    for (name, text) in DRIVER_HELPERS.into_iter().chain(drivers) {
        let path = dir.join(name);
        let tmp = dir.join(format!(".{name}.{}", std::process::id()));
        std::fs::write(&tmp, text).map_err(fail(&tmp))?;
        std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o644))
            .map_err(fail(&tmp))?;
        std::fs::rename(&tmp, &path).map_err(fail(&path))?;
    }
    Ok(dir.to_owned())
}

fn describe(ctx: &Context) -> serde_json::Value {
    serde_json::json!({ "id": ctx.id, "language": ctx.language.name(), "cwd": ctx.cwd })
}

/// Parses a JSON body: bad JSON is 400, JSON of the wrong shape 422 (as FastAPI answers).
fn parse<T: serde::de::DeserializeOwned>(body: &[u8]) -> Result<T, Rejection> {
    serde_json::from_slice(body).map_err(|e| match e.classify() {
        serde_json::error::Category::Data => Rejection(
            StatusCode::UNPROCESSABLE_ENTITY,
            format!("invalid request: {e}"),
        ),
        _ => Rejection(StatusCode::BAD_REQUEST, format!("malformed JSON: {e}")),
    })
}

/// A request refused before any work, answered in E2B's JSON error shape.
#[derive(Debug)]
struct Rejection(StatusCode, String);

impl From<Rejection> for Response<Body> {
    fn from(r: Rejection) -> Self {
        error(r.0, r.1)
    }
}

fn unsupported(language: &str) -> Response<Body> {
    text(
        StatusCode::BAD_REQUEST,
        format!(
            "Unsupported language: {language:?} (this sandbox runs python, javascript, \
             typescript, r, java and bash)"
        ),
    )
}

/// A plain-text answer, which is what E2B's server sends for its own errors.
fn text(status: StatusCode, message: impl Into<String>) -> Response<Body> {
    let mut resp = Response::new(full(message.into()));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    resp
}

fn not_allowed(allow: &'static str) -> Response<Body> {
    let mut resp = error(StatusCode::METHOD_NOT_ALLOWED, "method not allowed");
    resp.headers_mut()
        .insert(header::ALLOW, HeaderValue::from_static(allow));
    resp
}

/// A random id in UUID v4 form, like the Jupyter kernel ids E2B hands out.
fn new_id() -> String {
    let mut b = [0u8; 16];
    // /dev/urandom cannot block and exists in every sandbox; if it is unreadable, the
    // clock and a counter still make ids unique within this agent.
    if std::io::Read::read_exact(
        &mut std::fs::File::open("/dev/urandom").map_or_else(
            |_| Box::new(std::io::empty()) as Box<dyn std::io::Read>,
            |f| Box::new(f) as Box<dyn std::io::Read>,
        ),
        &mut b,
    )
    .is_err()
    {
        static FALLBACK: AtomicU64 = AtomicU64::new(0);
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default()
            .as_nanos();
        b[..8].copy_from_slice(&nanos.to_le_bytes()[..8]);
        b[8..].copy_from_slice(&FALLBACK.fetch_add(1, Ordering::Relaxed).to_le_bytes());
    }
    b[6] = (b[6] & 0x0f) | 0x40;
    b[8] = (b[8] & 0x3f) | 0x80;
    let hex: String = b.iter().map(|x| format!("{x:02x}")).collect();
    format!(
        "{}-{}-{}-{}-{}",
        &hex[..8],
        &hex[8..12],
        &hex[12..16],
        &hex[16..20],
        &hex[20..]
    )
}

/// The `/execute` response body: lines as the execution produces them.
struct LineStream {
    rx: mpsc::Receiver<Bytes>,
}

impl http_body::Body for LineStream {
    type Data = Bytes;
    type Error = std::io::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut TaskContext<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, std::io::Error>>> {
        self.rx
            .poll_recv(cx)
            .map(|line| line.map(|l| Ok(Frame::data(l))))
    }
}
