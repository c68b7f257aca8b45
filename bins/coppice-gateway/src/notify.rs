//! Tells a service manager how the gateway stands, with systemd's notify protocol: a
//! datagram to the socket named in `NOTIFY_SOCKET` (a path, or `@name` for the abstract
//! namespace). `READY=1` once `/health` would answer 200 (sandboxes re-adopted and the
//! default template ready), so `Type=notify` units order their dependents after a gateway
//! that can serve, and `STOPPING=1` when a stop begins. Without the variable (rc.d, a
//! shell) it does nothing.

use std::os::unix::net::UnixDatagram;
use std::sync::Arc;
use std::time::Duration;

use crate::Gateway;

/// How often readiness is checked until it holds.
const POLL: Duration = Duration::from_millis(100);

/// Sends `state` (newline-separated `KEY=VALUE` lines) to the service manager, if there is
/// one; a failure is logged, never fatal (the gateway serves either way).
pub(crate) fn send(state: &str) {
    let Some(target) = std::env::var_os("NOTIFY_SOCKET") else {
        return;
    };
    let target = target.to_string_lossy().into_owned();
    if let Err(e) = send_to(&target, state) {
        tracing::warn!(socket = %target, error = %e, "could not notify the service manager");
    }
}

fn send_to(target: &str, state: &str) -> std::io::Result<()> {
    let socket = UnixDatagram::unbound()?;
    if let Some(name) = target.strip_prefix('@') {
        return send_abstract(&socket, name, state);
    }
    socket.send_to(state.as_bytes(), target)?;
    Ok(())
}

#[cfg(target_os = "linux")]
fn send_abstract(socket: &UnixDatagram, name: &str, state: &str) -> std::io::Result<()> {
    use std::os::linux::net::SocketAddrExt;
    let addr = std::os::unix::net::SocketAddr::from_abstract_name(name.as_bytes())?;
    socket.send_to_addr(state.as_bytes(), &addr)?;
    Ok(())
}

/// Abstract socket names are Linux's; elsewhere a manager uses a path.
#[cfg(not(target_os = "linux"))]
fn send_abstract(_: &UnixDatagram, name: &str, _: &str) -> std::io::Result<()> {
    Err(std::io::Error::new(
        std::io::ErrorKind::Unsupported,
        format!("abstract socket @{name} on a system without them"),
    ))
}

/// Waits until the gateway is ready as `/health` judges it, then says `READY=1`.
pub(crate) async fn when_ready(gw: Arc<Gateway>) {
    if std::env::var_os("NOTIFY_SOCKET").is_none() {
        return;
    }
    send("STATUS=re-adopting sandboxes and preparing the default template");
    while !(gw.adoption_done() && gw.is_ready()) {
        tokio::time::sleep(POLL).await;
    }
    send(&format!(
        "READY=1\nSTATUS=serving on {}\nMAINPID={}",
        gw.config.listen,
        std::process::id()
    ));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[cfg(target_os = "linux")]
    #[test]
    fn states_reach_a_path_socket_and_an_abstract_one() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("notify.sock");
        let listener = UnixDatagram::bind(&path).unwrap();
        send_to(path.to_str().unwrap(), "READY=1").unwrap();
        let mut buf = [0u8; 64];
        let n = listener.recv(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"READY=1");

        use std::os::linux::net::SocketAddrExt;
        let name = format!("coppice-notify-test-{}", std::process::id());
        let addr = std::os::unix::net::SocketAddr::from_abstract_name(name.as_bytes()).unwrap();
        let listener = UnixDatagram::bind_addr(&addr).unwrap();
        send_to(&format!("@{name}"), "STOPPING=1").unwrap();
        let n = listener.recv(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"STOPPING=1");

        let err = send_to(dir.path().join("absent").to_str().unwrap(), "X=1").unwrap_err();
        assert_eq!(err.kind(), std::io::ErrorKind::NotFound);
    }
}
