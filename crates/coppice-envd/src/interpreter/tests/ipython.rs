//! Python contexts on IPython: magics, `!cmd`, rich display, `e2b/data`, `e2b/chart`,
//! tracebacks, ordering, and the plain fallback where IPython is missing.
//!
//! They run the host's Debian `python3` like the tests above; a test whose module is not
//! installed there (`python3-ipython`, `python3-pandas`, `python3-matplotlib`, pip) prints
//! `SKIP` and returns. IPython's profile and matplotlib's caches stay in the harness's temp
//! dir (`IPYTHONDIR`, `MPLCONFIGDIR`).

#![allow(
    clippy::print_stdout,
    reason = "house style: a skipped test says SKIP on stdout"
)]

use serde_json::{json, Value};

use super::{count, error_of, main_text, of_type, stderr, stdout, Harness};

async fn harness() -> Harness {
    Harness::new().await
}

/// Whether `modules` import in a context; prints SKIP for `test` when not.
async fn has(h: &Harness, ctx: &str, test: &str, modules: &[&str]) -> bool {
    for module in modules {
        let probe = h
            .py(
                ctx,
                &format!("import importlib.util\nimportlib.util.find_spec({module:?}) is not None"),
            )
            .await;
        if main_text(&probe).as_deref() != Some("True") {
            println!("SKIP {test}: python module {module} is not installed");
            h.interp.shutdown().await;
            return false;
        }
    }
    true
}

fn results(lines: &[Value]) -> Vec<&Value> {
    of_type(lines, "result")
}

fn no_error(lines: &[Value]) {
    assert!(error_of(lines).is_none(), "{lines:#?}");
}

#[tokio::test]
async fn magics_shell_escapes_and_indented_cells() {
    let h = harness().await;
    let ctx = h.create(json!({})).await;
    if !has(
        &h,
        &ctx,
        "magics_shell_escapes_and_indented_cells",
        &["IPython"],
    )
    .await
    {
        return;
    }
    let cwd = h.dir.path().display().to_string();
    // IPython dedents a cell indented as a whole, as E2B's tests send them.
    let indented = h.py(&ctx, "\n    a = 5\n    a * 2\n    ").await;
    assert_eq!(main_text(&indented).as_deref(), Some("10"), "{indented:#?}");
    let bang = h.py(&ctx, "!pwd").await;
    no_error(&bang);
    assert_eq!(stdout(&bang).trim(), cwd);
    let captured = h.py(&ctx, "files = !echo one; echo two\nlist(files)").await;
    assert_eq!(
        main_text(&captured).as_deref(),
        Some("['one', 'two']"),
        "{captured:#?}"
    );
    let env = h
        .py(
            &ctx,
            "%env COPPICE_MAGIC=yes\nimport os\nos.environ['COPPICE_MAGIC']",
        )
        .await;
    assert_eq!(main_text(&env).as_deref(), Some("yes"), "{env:#?}");
    let bash = h
        .py(
            &ctx,
            "%%bash\necho \"bash sees $COPPICE_MAGIC\"\necho oops >&2\n",
        )
        .await;
    no_error(&bash);
    assert_eq!(stdout(&bash), "bash sees yes\n");
    assert_eq!(stderr(&bash), "oops\n");
    let cd = h.py(&ctx, "%cd /tmp\nimport os\nos.getcwd()").await;
    assert_eq!(main_text(&cd).as_deref(), Some("/tmp"), "{cd:#?}");
    assert!(stdout(&cd).contains("/tmp"), "{cd:#?}");
    // The working directory is context state, like any other.
    let later = h.py(&ctx, "os.getcwd()").await;
    assert_eq!(main_text(&later).as_deref(), Some("/tmp"));
    let ipy = h.py(&ctx, "get_ipython().__class__.__name__").await;
    assert_eq!(main_text(&ipy).as_deref(), Some("_Shell"));
    // A trailing semicolon hides the value, as in Jupyter.
    let quiet = h.py(&ctx, "1 + 1;").await;
    assert!(results(&quiet).is_empty(), "{quiet:#?}");
    h.interp.shutdown().await;
}

#[tokio::test]
async fn display_sends_every_mime_type() {
    let h = harness().await;
    let ctx = h.create(json!({})).await;
    if !has(&h, &ctx, "display_sends_every_mime_type", &["IPython"]).await {
        return;
    }
    let png = "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNk+M9QDwADhgGAWjR9awAAAABJRU5ErkJggg==";
    let code = format!(
        "from IPython.display import HTML, Markdown, SVG, Image, Latex, JSON, Javascript\n\
         import base64\n\
         display(HTML('<b>h</b>'))\n\
         display(Markdown('**m**'))\n\
         display(SVG('<svg xmlns=\"http://www.w3.org/2000/svg\"><circle r=\"1\"/></svg>'))\n\
         display(Image(data=base64.b64decode('{png}'), format='png'))\n\
         display(Latex(r'$x^2$'))\n\
         display(JSON({{'k': [1, 2]}}))\n\
         display(Javascript('console.log(1)'))\n\
         display({{'text/latex': r'\\text{{raw}}'}}, raw=True)\n\
         {{'a': 1, 2: [1.5, None]}}"
    );
    let out = h.py(&ctx, &code).await;
    no_error(&out);
    let r = results(&out);
    assert_eq!(r.len(), 9, "{out:#?}");
    assert_eq!(r[0]["html"], "<b>h</b>");
    assert_eq!(r[1]["markdown"], "**m**");
    assert!(
        r[2]["svg"].as_str().unwrap().contains("<circle"),
        "{:?}",
        r[2]
    );
    // IPython's Image sends base64 with a trailing newline, as Jupyter shows it.
    assert_eq!(r[3]["png"].as_str().unwrap().trim_end(), png);
    assert_eq!(r[4]["latex"], "$x^2$");
    assert_eq!(r[5]["json"], json!({ "k": [1, 2] }));
    assert_eq!(r[6]["javascript"], "console.log(1)");
    // A raw bundle is sent as given: only latex, no text (E2B's custom repr test).
    assert_eq!(r[7]["latex"], "\\text{raw}");
    assert!(r[7].get("text").is_none(), "{:?}", r[7]);
    for shown in &r[..8] {
        assert_eq!(shown["is_main_result"], false);
        assert_eq!(shown["extra"], json!({}), "{shown:?}");
    }
    // A dict is JSON too, keys as strings, as E2B's formatter sends it.
    assert_eq!(r[8]["is_main_result"], true);
    assert_eq!(r[8]["json"], json!({ "a": 1, "2": [1.5, null] }));
    assert_eq!(r[8]["text"], "{'a': 1, 2: [1.5, None]}");
    // A formatter registered for a plain type is used (the display hook's shortcut for
    // plain values must not skip it).
    let custom = h
        .py(
            &ctx,
            "get_ipython().display_formatter.formatters['text/html'].for_type(int, lambda n: '<i>%d</i>' % n)
5",
        )
        .await;
    let r = results(&custom);
    assert_eq!(r.len(), 1, "{custom:#?}");
    assert_eq!(
        (&r[0]["html"], &r[0]["text"]),
        (&json!("<i>5</i>"), &json!("5"))
    );
    h.interp.shutdown().await;
}

#[tokio::test]
async fn output_and_results_arrive_in_the_cell_order() {
    let h = harness().await;
    let ctx = h.create(json!({})).await;
    if !has(
        &h,
        &ctx,
        "output_and_results_arrive_in_the_cell_order",
        &["IPython"],
    )
    .await
    {
        return;
    }
    let out = h
        .py(
            &ctx,
            "for i in range(30):\n    print(i)\n    display(i)\nprint('end')\n'last'",
        )
        .await;
    no_error(&out);
    let mut want = Vec::new();
    for i in 0..30 {
        want.push(("stdout".to_owned(), format!("{i}\n")));
        want.push(("result".to_owned(), i.to_string()));
    }
    want.push(("stdout".to_owned(), "end\n".to_owned()));
    want.push(("result".to_owned(), "last".to_owned()));
    let got: Vec<(String, String)> = out
        .iter()
        .filter(|l| l["type"] == "stdout" || l["type"] == "result")
        .map(|l| {
            (
                l["type"].as_str().unwrap().to_owned(),
                l["text"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    assert_eq!(got, want);
    h.interp.shutdown().await;
}

#[tokio::test]
async fn errors_have_ipython_tracebacks_and_interrupts_keep_state() {
    let h = harness().await;
    let ctx = h.create(json!({})).await;
    if !has(
        &h,
        &ctx,
        "errors_have_ipython_tracebacks_and_interrupts_keep_state",
        &["IPython"],
    )
    .await
    {
        return;
    }
    let out = h
        .py(
            &ctx,
            "kept = 7\ndef boom():\n    raise ValueError('bad')\nboom()",
        )
        .await;
    let n = count(&out);
    let err = error_of(&out).unwrap();
    assert_eq!(
        (err["name"].as_str(), err["value"].as_str()),
        (Some("ValueError"), Some("bad"))
    );
    let tb = err["traceback"].as_str().unwrap();
    // IPython 8.5 (Debian 12) writes `Cell In [n]`, later versions `Cell In[n]`.
    let cell = [
        format!("Cell In [{n}], line 4"),
        format!("Cell In[{n}], line 4"),
    ];
    assert!(cell.iter().any(|c| tb.contains(c.as_str())), "{tb}");
    assert!(tb.contains("raise ValueError('bad')"), "{tb}");
    assert!(tb.contains("ValueError: bad"), "{tb}");
    assert!(!tb.contains('\u{1b}'), "ANSI colours in {tb:?}");
    assert!(!tb.contains("driver.py"), "driver frames leak: {tb}");
    let syntax = h.py(&ctx, "def (:").await;
    assert_eq!(error_of(&syntax).unwrap()["name"], "SyntaxError");
    let slow = h
        .run(json!({ "code": "import time\nprint('start')\ntime.sleep(600)", "context_id": ctx, "timeout": 0.5 }))
        .await;
    assert_eq!(stdout(&slow), "start\n");
    let err = error_of(&slow).unwrap();
    assert_eq!(err["name"], "KeyboardInterrupt");
    assert!(
        err["traceback"].as_str().unwrap().contains("Cell In"),
        "{err:?}"
    );
    let bang = h
        .run(json!({ "code": "!sleep 600", "context_id": ctx, "timeout": 0.5 }))
        .await;
    assert!(
        error_of(&bang).is_none_or(|e| e["name"] != "ContextRestarting"),
        "{bang:#?}"
    );
    let after = h.py(&ctx, "kept").await;
    assert_eq!(main_text(&after).as_deref(), Some("7"));
    // exit() ends the context, as it ends a Jupyter kernel; the next run starts afresh.
    let exited = h.py(&ctx, "exit()").await;
    assert_eq!(error_of(&exited).unwrap()["name"], "ContextRestarting");
    let fresh = h.py(&ctx, "'kept' in globals()").await;
    assert_eq!(main_text(&fresh).as_deref(), Some("False"));
    assert_eq!(count(&fresh), 1);
    h.interp.shutdown().await;
}

#[tokio::test]
async fn pip_installs_a_local_wheel() {
    let h = harness().await;
    let ctx = h.create(json!({})).await;
    if !has(&h, &ctx, "pip_installs_a_local_wheel", &["IPython", "pip"]).await {
        return;
    }
    let dir = h.dir.path().display().to_string();
    // A wheel written by hand: a pure-python package, no build tools, no index.
    let build = format!(
        "import os, zipfile\n\
         whl = os.path.join({dir:?}, 'coppicedemo-0.1-py3-none-any.whl')\n\
         info = 'coppicedemo-0.1.dist-info/'\n\
         with zipfile.ZipFile(whl, 'w') as z:\n\
         \x20   z.writestr('coppicedemo/__init__.py', 'VALUE = 42\\n')\n\
         \x20   z.writestr(info + 'METADATA', 'Metadata-Version: 2.1\\nName: coppicedemo\\nVersion: 0.1\\n')\n\
         \x20   z.writestr(info + 'WHEEL', 'Wheel-Version: 1.0\\nGenerator: coppice-test\\nRoot-Is-Purelib: true\\nTag: py3-none-any\\n')\n\
         \x20   z.writestr(info + 'RECORD', '')\n"
    );
    no_error(&h.py(&ctx, &build).await);
    let install = h
        .py(
            &ctx,
            &format!(
                "%pip install --no-index --no-deps --disable-pip-version-check --target {dir}/site {dir}/coppicedemo-0.1-py3-none-any.whl"
            ),
        )
        .await;
    no_error(&install);
    assert!(
        stdout(&install).contains("Successfully installed coppicedemo-0.1"),
        "{install:#?}"
    );
    let used = h
        .py(
            &ctx,
            &format!("import sys\nsys.path.insert(0, '{dir}/site')\nimport coppicedemo\ncoppicedemo.VALUE"),
        )
        .await;
    assert_eq!(main_text(&used).as_deref(), Some("42"), "{used:#?}");
    h.interp.shutdown().await;
}

#[tokio::test]
async fn dataframes_carry_data() {
    let h = harness().await;
    let ctx = h.create(json!({})).await;
    if !has(&h, &ctx, "dataframes_carry_data", &["IPython", "pandas"]).await {
        return;
    }
    let out = h
        .py(
            &ctx,
            "import pandas as pd\n\
             pd.DataFrame({'a': [1, 2, 3], 'b': [1.5, None, 2.5],\n\
             \x20             'when': pd.to_datetime(['2024-01-01', '2024-01-02', '2024-01-03'])})",
        )
        .await;
    no_error(&out);
    let r = results(&out);
    assert_eq!(r.len(), 1, "{out:#?}");
    assert_eq!(
        r[0]["data"],
        json!({
            "a": [1, 2, 3],
            "b": [1.5, "nan", 2.5],
            "when": ["2024-01-01T00:00:00", "2024-01-02T00:00:00", "2024-01-03T00:00:00"],
        })
    );
    assert!(
        r[0]["html"].as_str().unwrap().contains("<table"),
        "{:?}",
        r[0]
    );
    assert!(r[0]["text"].as_str().unwrap().contains("when"));
    h.interp.shutdown().await;
}

/// Runs a plotting cell and returns the chart of its one figure.
async fn chart(h: &Harness, ctx: &str, code: &str) -> Value {
    let out = h
        .py(
            ctx,
            &format!("import matplotlib.pyplot as plt\n{code}\nplt.show()"),
        )
        .await;
    no_error(&out);
    let r = results(&out);
    assert_eq!(r.len(), 1, "{out:#?}");
    assert!(r[0]["png"].as_str().unwrap().starts_with("iVBORw0KGgo"));
    assert!(r[0]["text"].as_str().unwrap().starts_with("<Figure size"));
    assert_eq!(r[0]["extra"], json!({}));
    r[0]["chart"].clone()
}

fn floats(v: &Value) -> Vec<f64> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().unwrap())
        .collect()
}

fn keys(v: &Value) -> Vec<String> {
    let mut k: Vec<String> = v.as_object().unwrap().keys().cloned().collect();
    k.sort();
    k
}

const POINT_KEYS: [&str; 13] = [
    "elements",
    "title",
    "type",
    "x_label",
    "x_scale",
    "x_tick_labels",
    "x_ticks",
    "x_unit",
    "y_label",
    "y_scale",
    "y_tick_labels",
    "y_ticks",
    "y_unit",
];

#[tokio::test]
async fn matplotlib_figures_carry_charts() {
    let h = harness().await;
    let ctx = h.create(json!({})).await;
    if !has(
        &h,
        &ctx,
        "matplotlib_figures_carry_charts",
        &["IPython", "matplotlib"],
    )
    .await
    {
        return;
    }
    let line = chart(
        &h,
        &ctx,
        "plt.plot([0, 1, 2], [0, 1, 4], label='squares')\nplt.plot([0, 1, 2], [2, 3, 2])\n\
         plt.xlabel('Time (s)')\nplt.ylabel('Amplitude [Hz]')\nplt.title('Lines')\nplt.grid(True)",
    )
    .await;
    assert_eq!(keys(&line), POINT_KEYS);
    assert_eq!(line["type"], "line");
    assert_eq!(line["title"], "Lines");
    assert_eq!(
        (
            &line["x_label"],
            &line["y_label"],
            &line["x_unit"],
            &line["y_unit"]
        ),
        (
            &json!("Time (s)"),
            &json!("Amplitude [Hz]"),
            &json!("s"),
            &json!("Hz")
        )
    );
    assert_eq!(
        (&line["x_scale"], &line["y_scale"]),
        (&json!("linear"), &json!("linear"))
    );
    assert!(!floats(&line["x_ticks"]).is_empty());
    assert!(line["y_tick_labels"]
        .as_array()
        .unwrap()
        .iter()
        .all(Value::is_string));
    let elements = line["elements"].as_array().unwrap();
    assert_eq!(elements.len(), 2, "{line}");
    assert_eq!(elements[0]["label"], "squares");
    assert_eq!(
        elements[0]["points"],
        json!([[0.0, 0.0], [1.0, 1.0], [2.0, 4.0]])
    );
    assert_eq!(elements[1]["label"], "Line 1");

    let dates = chart(
        &h,
        &ctx,
        "import datetime\nd = [datetime.date(2023, 9, 1) + datetime.timedelta(days=i) for i in range(3)]\n\
         plt.plot(d, [1, 2, 3])",
    )
    .await;
    assert_eq!(dates["x_scale"], "datetime");
    assert!(
        dates["x_ticks"][0]
            .as_str()
            .unwrap()
            .starts_with("2023-09-0"),
        "{dates}"
    );
    assert_eq!(
        dates["elements"][0]["points"][0],
        json!(["2023-09-01", 1.0])
    );
    assert_eq!(dates["title"], Value::Null);

    let categories = chart(&h, &ctx, "plt.plot([1, 2, 3], ['A', 'B', 'C'])").await;
    assert_eq!(
        (&categories["x_scale"], &categories["y_scale"]),
        (&json!("linear"), &json!("categorical"))
    );
    assert_eq!(categories["elements"][0]["points"][0], json!([1.0, "A"]));

    let scatter = chart(
        &h,
        &ctx,
        "plt.scatter([1, 2], [3, 4], label='pts')\nplt.scatter([5], [6], label='one')\nplt.xlabel('A')",
    )
    .await;
    assert_eq!(keys(&scatter), POINT_KEYS);
    assert_eq!(scatter["type"], "scatter");
    assert_eq!(scatter["x_label"], "A");
    assert_eq!(scatter["y_label"], Value::Null);
    assert_eq!(
        scatter["elements"],
        json!([
            { "label": "pts", "points": [[1.0, 3.0], [2.0, 4.0]] },
            { "label": "one", "points": [[5.0, 6.0]] },
        ])
    );

    let bar = chart(
        &h,
        &ctx,
        "plt.bar(['Author A', 'Author B', 'Author C', 'Author D'], [100, 200, 300, 400], label='Books Sold')\n\
         plt.xlabel('Authors')\nplt.ylabel('Number of Books Sold')\nplt.title('Book Sales by Authors')",
    )
    .await;
    assert_eq!(
        keys(&bar),
        ["elements", "title", "type", "x_label", "x_unit", "y_label", "y_unit"]
    );
    assert_eq!(bar["type"], "bar");
    assert_eq!(bar["x_label"], "Authors");
    let bars = bar["elements"].as_array().unwrap();
    assert_eq!(bars.len(), 4);
    for (i, b) in bars.iter().enumerate() {
        assert_eq!(keys(b), ["group", "label", "value"]);
        assert_eq!(b["group"], "Books Sold");
        assert_eq!(b["label"], format!("Author {}", ["A", "B", "C", "D"][i]));
        assert_eq!(b["value"].as_f64(), Some(100.0 * (i as f64 + 1.0)));
    }

    let pie = chart(
        &h,
        &ctx,
        "fig, ax = plt.subplots()\nax.pie([90, 10], labels=['No', 'No, in blue'], autopct='%1.1f%%', startangle=90)\n\
         ax.axis('equal')\nplt.title('Will I wake up early tomorrow?')",
    )
    .await;
    assert_eq!(keys(&pie), ["elements", "title", "type"]);
    assert_eq!(pie["type"], "pie");
    assert_eq!(pie["title"], "Will I wake up early tomorrow?");
    assert_eq!(
        pie["elements"],
        json!([
            { "label": "No", "angle": 324.0, "radius": 1.0 },
            { "label": "No, in blue", "angle": 36.0, "radius": 1.0 },
        ])
    );

    let boxes = chart(
        &h,
        &ctx,
        "data = {'Class A': [85, 90, 78, 92, 88], 'Class B': [95, 89, 76, 91, 84, 87], 'Class C': [75, 82, 88, 79, 86]}\n\
         fig, ax = plt.subplots()\nax.set_title('Exam Scores Distribution')\nax.set_xlabel('Class')\nax.set_ylabel('Score')\n\
         ax.boxplot(list(data.values()), labels=list(data.keys()), patch_artist=True)",
    )
    .await;
    assert_eq!(boxes["type"], "box_and_whisker");
    assert_eq!(
        (&boxes["x_label"], &boxes["y_label"]),
        (&json!("Class"), &json!("Score"))
    );
    let b = boxes["elements"].as_array().unwrap();
    assert_eq!(b.len(), 3, "{boxes}");
    let col = |k: &str| b.iter().map(|e| e[k].clone()).collect::<Vec<_>>();
    assert_eq!(
        col("label"),
        [json!("Class A"), json!("Class B"), json!("Class C")]
    );
    assert_eq!(col("outliers"), [json!([]), json!([76.0]), json!([])]);
    let num = |k: &str| b.iter().map(|e| e[k].as_f64().unwrap()).collect::<Vec<_>>();
    assert_eq!(num("min"), [78.0, 84.0, 75.0]);
    assert_eq!(num("first_quartile"), [85.0, 84.75, 79.0]);
    assert_eq!(num("median"), [88.0, 88.0, 82.0]);
    assert_eq!(num("third_quartile"), [90.0, 90.5, 86.0]);
    assert_eq!(num("max"), [92.0, 95.0, 88.0]);

    let sup = chart(
        &h,
        &ctx,
        "fig, axs = plt.subplots(1, 2)\nfig.suptitle('Multiple Charts Example')\n\
         axs[0].plot([0, 1, 2], [1, 0, 1], 'r')\naxs[0].set_title('Sine Wave')\naxs[0].grid(True)\n\
         axs[1].scatter([0.5, 0.7], [0.1, 0.2], label='Dataset 1')\naxs[1].set_xlabel('X')\naxs[1].set_title('Scatter Plot')",
    )
    .await;
    assert_eq!(keys(&sup), ["elements", "title", "type"]);
    assert_eq!(sup["type"], "superchart");
    assert_eq!(sup["title"], "Multiple Charts Example");
    let parts = sup["elements"].as_array().unwrap();
    assert_eq!(parts.len(), 2);
    assert_eq!(
        (&parts[0]["type"], &parts[0]["title"]),
        (&json!("line"), &json!("Sine Wave"))
    );
    assert_eq!(
        parts[0]["elements"][0]["points"].as_array().unwrap().len(),
        3
    );
    assert_eq!(
        (&parts[1]["type"], &parts[1]["x_label"]),
        (&json!("scatter"), &json!("X"))
    );
    assert_eq!(parts[1]["elements"][0]["label"], "Dataset 1");

    let unknown = chart(
        &h,
        &ctx,
        "fig, ax = plt.subplots()\nax.add_artist(plt.Circle((0, 0), 1, fill=False))\nplt.title('Two Concentric Circles')",
    )
    .await;
    assert_eq!(
        unknown,
        json!({ "type": "unknown", "title": "Two Concentric Circles", "elements": [] })
    );

    // A figure as the value of a cell is the main result, chart included.
    let main = h
        .py(&ctx, "fig = plt.figure()\nfig.gca().plot([3, 1])\nfig")
        .await;
    let main: Vec<&Value> = results(&main)
        .into_iter()
        .filter(|r| r["is_main_result"] == true)
        .collect();
    assert_eq!(main.len(), 1);
    assert_eq!(main[0]["chart"]["type"], "line");
    // A child python does not inherit the context's backend (it could not import it).
    let child = h
        .py(
            &ctx,
            "import subprocess, sys\nsubprocess.run([sys.executable, '-c', 'import matplotlib; print(matplotlib.rcParams[\"backend\"])'], capture_output=True, text=True).stdout.strip()",
        )
        .await;
    let backend = main_text(&child).unwrap_or_default();
    assert!(
        !backend.is_empty() && !backend.contains("coppice"),
        "{child:#?}"
    );
    h.interp.shutdown().await;
}

#[tokio::test]
async fn without_ipython_the_plain_driver_runs_cells() {
    let h = harness().await;
    // An IPython package that cannot be imported stands in for a sandbox without it.
    let shadow = h.dir.path().join("shadow/IPython");
    std::fs::create_dir_all(&shadow).unwrap();
    std::fs::write(
        shadow.join("__init__.py"),
        "raise ModuleNotFoundError(\"No module named 'IPython'\", name='IPython')\n",
    )
    .unwrap();
    h.state.envs.write().unwrap().insert(
        "PYTHONPATH".into(),
        h.dir.path().join("shadow").display().to_string(),
    );
    let ctx = h.create(json!({})).await;
    let sum = h.py(&ctx, "x = 20\nx + 1").await;
    assert_eq!(main_text(&sum).as_deref(), Some("21"));
    let bang = h.py(&ctx, "!pwd").await;
    assert_eq!(error_of(&bang).unwrap()["name"], "SyntaxError");
    assert!(
        stderr(&bang).contains("IPython is not installed"),
        "{bang:#?}"
    );
    let shown = h.py(&ctx, "display([1])\n'ok'").await;
    assert_eq!(results(&shown).len(), 2);
    assert_eq!(main_text(&shown).as_deref(), Some("ok"));
    h.interp.shutdown().await;
}

#[tokio::test]
async fn a_pil_image_saved_to_a_path_is_shown() {
    let h = harness().await;
    let ctx = h.create(json!({})).await;
    if !has(
        &h,
        &ctx,
        "a_pil_image_saved_to_a_path_is_shown",
        &["IPython", "PIL"],
    )
    .await
    {
        return;
    }
    let path = h.dir.path().join("saved.png").display().to_string();
    let out = h
        .py(
            &ctx,
            &format!(
                "from PIL import Image\nimport io\nimg = Image.new('RGB', (4, 4), 'red')\n\
                 img.save(io.BytesIO(), 'png')\nimg.save({path:?})\nprint('saved')"
            ),
        )
        .await;
    no_error(&out);
    // Saving to a buffer shows nothing; saving to a path shows the image (E2B's template).
    let r = results(&out);
    assert_eq!(r.len(), 1, "{out:#?}");
    assert!(r[0]["png"].as_str().unwrap().starts_with("iVBORw0KGgo"));
    assert_eq!(stdout(&out), "saved\n");
    assert!(std::path::Path::new(&path).exists());
    h.interp.shutdown().await;
}
