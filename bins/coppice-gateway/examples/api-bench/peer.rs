//! The program at both ends of the `net` part's traffic, std only: `api-bench peer <mode>`.
//!
//! The same binary runs in a plain network namespace on the host (the floor) and inside a
//! sandbox (copied in through the files API and started through the process API), so both
//! sides of every comparison run the same code.
//!
//! - `peer serve --secs S [--ready FILE]`: listens on every address: [`SINK_PORT`] reads a
//!   stream to its end and answers the byte count; [`CONN_PORT`] accepts, writes one byte and
//!   closes; [`HTTP_PORT`] answers every HTTP/1.1 request on a keep-alive connection with
//!   `200 ok`. Creates `FILE` once listening. Exits after `S` seconds whatever happens, so a
//!   server left behind does not live on.
//! - `peer send --to IP --secs S`: one TCP stream of 1 MiB writes to `IP`'s sink for `S`
//!   seconds; prints `{"bytes", "secs", "mbit_per_s"}` once the sink has counted them.
//! - `peer conns --to IP --secs S --threads T`: `T` threads each connect to `IP`'s
//!   [`CONN_PORT`], read its byte and the end of the stream, and close, for `S` seconds; prints
//!   `{"connections", "errors", "first_error", "secs", "per_s"}`.

use std::io::{Read, Write};
use std::net::{Ipv4Addr, Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::client::Res;

/// Where `serve` swallows a stream and answers its length.
pub(crate) const SINK_PORT: u16 = 7001;
/// Where `serve` accepts a connection, writes one byte and closes it.
pub(crate) const CONN_PORT: u16 = 7002;
/// Where `serve` answers HTTP.
pub(crate) const HTTP_PORT: u16 = 8000;
/// The answer to every HTTP request.
const HTTP_OK: &[u8] =
    b"HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\ncontent-length: 2\r\n\r\nok";
/// How long a client waits for a connection or a byte before it counts an error.
const IO_TIMEOUT: Duration = Duration::from_secs(2);

/// Runs the mode named by `args[0]`.
pub(crate) fn main(args: &[String]) -> Res<()> {
    let value = |name: &str| -> Res<&str> {
        args.iter()
            .position(|a| a == name)
            .and_then(|i| args.get(i + 1))
            .map(String::as_str)
            .ok_or_else(|| format!("peer: {name} is required").into())
    };
    let secs = Duration::from_secs_f64(value("--secs")?.parse()?);
    match args.first().map(String::as_str) {
        Some("serve") => serve(secs, value("--ready").ok()),
        Some("send") => {
            let to: Ipv4Addr = value("--to")?.parse()?;
            let out = send((to, SINK_PORT).into(), secs)?;
            println!("{out}");
            Ok(())
        }
        Some("conns") => {
            let to: Ipv4Addr = value("--to")?.parse()?;
            let threads = value("--threads")?.parse()?;
            let out = conns((to, CONN_PORT).into(), secs, threads)?;
            println!("{out}");
            Ok(())
        }
        other => Err(format!("peer: unknown mode {other:?} (serve, send, conns)").into()),
    }
}

/// The three servers, until `secs` have passed; `ready` is created once they listen.
fn serve(secs: Duration, ready: Option<&str>) -> Res<()> {
    let any = Ipv4Addr::UNSPECIFIED;
    let sink = TcpListener::bind((any, SINK_PORT))?;
    let conn = TcpListener::bind((any, CONN_PORT))?;
    let http = TcpListener::bind((any, HTTP_PORT))?;
    if let Some(file) = ready {
        std::fs::write(file, b"")?;
    }
    std::thread::spawn(move || accept_each(&sink, sink_one));
    std::thread::spawn(move || {
        // Inline: a thread per connection would cost more than the connection.
        for mut s in conn.incoming().flatten() {
            let _ = s.write_all(b"!");
        }
    });
    std::thread::spawn(move || accept_each(&http, http_one));
    std::thread::sleep(secs);
    Ok(())
}

/// Serves every connection of `listener` with `f` on a thread of its own.
fn accept_each(listener: &TcpListener, f: fn(TcpStream) -> std::io::Result<()>) {
    for s in listener.incoming().flatten() {
        std::thread::spawn(move || f(s));
    }
}

/// Reads `s` to its end, then answers how many bytes came as a big-endian u64.
fn sink_one(mut s: TcpStream) -> std::io::Result<()> {
    let mut buf = vec![0u8; 1 << 18];
    let mut total: u64 = 0;
    loop {
        match s.read(&mut buf)? {
            0 => break,
            n => total += n as u64,
        }
    }
    s.write_all(&total.to_be_bytes())
}

/// Answers each request on `s` (headers only, no bodies: the client sends GETs).
fn http_one(mut s: TcpStream) -> std::io::Result<()> {
    s.set_nodelay(true)?;
    let mut buf = Vec::with_capacity(4096);
    let mut chunk = [0u8; 4096];
    loop {
        let n = s.read(&mut chunk)?;
        if n == 0 {
            return Ok(());
        }
        buf.extend_from_slice(&chunk[..n]);
        while let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            buf.drain(..end + 4);
            s.write_all(HTTP_OK)?;
        }
    }
}

/// One stream to the sink for `secs`; the clock stops when the sink has counted it all.
fn send(to: SocketAddr, secs: Duration) -> Res<String> {
    let mut s = TcpStream::connect_timeout(&to, IO_TIMEOUT)?;
    let buf = vec![0x5au8; 1 << 20];
    let t = Instant::now();
    while t.elapsed() < secs {
        s.write_all(&buf)?;
    }
    s.shutdown(Shutdown::Write)?;
    s.set_read_timeout(Some(IO_TIMEOUT))?;
    let mut count = [0u8; 8];
    s.read_exact(&mut count)?;
    let elapsed = t.elapsed().as_secs_f64();
    let bytes = u64::from_be_bytes(count);
    #[allow(clippy::cast_precision_loss, reason = "bytes of a few seconds")]
    let mbit = bytes as f64 * 8.0 / elapsed / 1e6;
    Ok(serde_json::json!({ "bytes": bytes, "secs": elapsed, "mbit_per_s": mbit }).to_string())
}

/// `threads` loops of connect, read one byte and the end, close, for `secs`.
fn conns(to: SocketAddr, secs: Duration, threads: usize) -> Res<String> {
    let done = Arc::new(AtomicU64::new(0));
    let errors = Arc::new(AtomicU64::new(0));
    let first_error: Arc<Mutex<Option<String>>> = Arc::new(Mutex::new(None));
    let t = Instant::now();
    let workers: Vec<_> = (0..threads)
        .map(|_| {
            let (done, errors, first_error) = (
                Arc::clone(&done),
                Arc::clone(&errors),
                Arc::clone(&first_error),
            );
            std::thread::spawn(move || {
                while t.elapsed() < secs {
                    match one_connection(to) {
                        Ok(()) => done.fetch_add(1, Ordering::Relaxed),
                        Err(e) => {
                            first_error
                                .lock()
                                .unwrap_or_else(std::sync::PoisonError::into_inner)
                                .get_or_insert_with(|| e.to_string());
                            errors.fetch_add(1, Ordering::Relaxed)
                        }
                    };
                }
            })
        })
        .collect();
    for w in workers {
        w.join().map_err(|_| "a connection thread panicked")?;
    }
    let elapsed = t.elapsed().as_secs_f64();
    let n = done.load(Ordering::Relaxed);
    let first_error = first_error
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .clone();
    #[allow(clippy::cast_precision_loss, reason = "connections of a few seconds")]
    let per_s = n as f64 / elapsed;
    Ok(serde_json::json!({
        "connections": n,
        "errors": errors.load(Ordering::Relaxed),
        "first_error": first_error,
        "secs": elapsed,
        "per_s": per_s,
    })
    .to_string())
}

/// A whole connection: the handshake, the server's byte, its close, ours.
fn one_connection(to: SocketAddr) -> std::io::Result<()> {
    let mut s = TcpStream::connect_timeout(&to, IO_TIMEOUT)?;
    s.set_read_timeout(Some(IO_TIMEOUT))?;
    let mut byte = [0u8; 2];
    let n = s.read(&mut byte)?;
    let end = s.read(&mut byte[n..])?;
    if n != 1 || end != 0 {
        return Err(std::io::Error::other("expected one byte, then the end"));
    }
    Ok(())
}
