//! `coppice-envd`: the agent binary, PID 1 of every sandbox (see `coppice_envd::agent`).

#![forbid(unsafe_code)]

fn main() -> std::process::ExitCode {
    coppice_envd::agent::main(std::env::args().skip(1))
}
