//! Measures the Linux driver's attach and release, one sandbox at a time, as root:
//! `cargo run --release -p coppice-net --example attach_time -- [N] [policy] [ready]`.
//!
//! Uses the pool 198.51.100.240/28 (TEST-NET-2), the bridge `cpbenchbr` and the table
//! `coppice_bench`, and removes them at the end. With `policy`, each sandbox gets a
//! non-default egress policy, which costs one `nft` transaction per attach and release.
//! With `ready`, a ready namespace is made (untimed) before each attach, which then only
//! moves it into place.

#![allow(clippy::print_stdout)] // A measuring tool: it reports on stdout.

use std::time::{Duration, Instant};

use coppice_lifecycle::backend::{EgressPolicy, NetSpec, Network, SandboxId};
use coppice_net::{LinuxNet, LinuxNetConfig};

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let n: usize = args.next().map_or(Ok(50), |a| a.parse())?;
    let rest: Vec<String> = args.collect();
    let with_policy = rest.iter().any(|a| a == "policy");
    let ready = rest.iter().any(|a| a == "ready");
    let dir = std::env::temp_dir().join(format!("coppice-net-bench-{}", std::process::id()));
    let config = LinuxNetConfig {
        bridge: "cpbenchbr".into(),
        table: "coppice_bench".into(),
        link_prefix: "cpbv".into(),
        egress_only_to: Some(vec!["198.51.100.0/24".parse()?]),
        global_forwarding: false,
        ready_namespaces: usize::from(ready),
        ..LinuxNetConfig::new(&dir, "198.51.100.240/28".parse()?)
    };
    let spec = if with_policy {
        NetSpec {
            policy: EgressPolicy {
                allow_internet: false,
                allow_out: vec!["198.51.100.64/28".parse()?],
                deny_out: vec!["198.51.100.0/24".parse()?],
                allow_domains: vec![],
            },
        }
    } else {
        NetSpec::default()
    };
    let net = LinuxNet::start(config.clone())?;
    let (mut attach, mut release) = (Vec::new(), Vec::new());
    let result = async {
        for i in 0..n {
            let id = SandboxId::new(format!("bench{i}"))?;
            net.fill_ready().await?;
            let t = Instant::now();
            net.attach(&id, &spec).await?;
            attach.push(t.elapsed());
            let t = Instant::now();
            net.release(&id).await?;
            release.push(t.elapsed());
        }
        Ok::<_, Box<dyn std::error::Error>>(())
    }
    .await;
    LinuxNet::purge(&config)?;
    let _ = std::fs::remove_dir(&dir);
    result?;
    println!(
        "{n} sandboxes, {} policy{}: attach p50 {} p90 {}, release p50 {} p90 {}",
        if with_policy {
            "non-default"
        } else {
            "default"
        },
        if ready { ", ready namespaces" } else { "" },
        ms(&mut attach, 50),
        ms(&mut attach, 90),
        ms(&mut release, 50),
        ms(&mut release, 90),
    );
    Ok(())
}

fn ms(v: &mut [Duration], pct: usize) -> String {
    v.sort();
    let d = v[(v.len() * pct / 100).min(v.len() - 1)];
    format!("{:.2} ms", d.as_secs_f64() * 1000.0)
}
