//! `coppice`: the operator's command for a Coppice gateway (see `coppice --help`).

#![forbid(unsafe_code)]

fn main() -> std::process::ExitCode {
    let args = std::env::args().skip(1).collect();
    let code = coppice_cli::run(
        args,
        &|k| std::env::var(k).ok(),
        &mut std::io::stdout().lock(),
        &mut std::io::stderr().lock(),
    );
    std::process::ExitCode::from(code)
}
