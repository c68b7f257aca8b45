//! Connections from inside a sandbox's network namespace.
//!
//! A socket belongs to the network namespace of the thread that created it, for its whole
//! life. One dedicated thread makes the sockets: it enters the sandbox's namespace
//! (`setns`), creates the socket, and goes back to its own before it takes the next job; the
//! connect and every byte after it happen on the async executor like any other socket. No
//! tokio thread ever changes namespace, and if the dialer cannot get back to its own
//! namespace it exits instead of making another socket (the next job starts a new one).
//!
//! The alternative, a tunnel spliced by the in-sandbox agent, costs a unix hop, a copy in
//! the agent for every byte and a new agent endpoint; this costs two `setns` calls per
//! connection and nothing per byte.

use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use std::os::fd::{AsFd, OwnedFd};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};

use nix::sched::{setns, CloneFlags};
use nix::sys::socket::{socket, AddressFamily, SockFlag, SockType};
use tokio::net::{TcpSocket, TcpStream};
use tokio::sync::oneshot;

/// One socket to make: the namespace, the address family, and where the socket goes.
struct Job {
    ns: Arc<OwnedFd>,
    family: AddressFamily,
    reply: oneshot::Sender<std::io::Result<OwnedFd>>,
}

/// The dialer thread's queue; `None` until the first job, or after the thread has gone.
static DIALER: Mutex<Option<mpsc::Sender<Job>>> = Mutex::new(None);

/// Connects to `port` on the loopback address inside the namespace `ns`: 127.0.0.1, then
/// ::1 if nothing listens there (a server bound to `localhost` may have only the latter).
pub(super) async fn connect(ns: Arc<OwnedFd>, port: u16) -> std::io::Result<TcpStream> {
    let v4 = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
    match connect_to(Arc::clone(&ns), AddressFamily::Inet, v4).await {
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => {
            let v6 = SocketAddr::from((Ipv6Addr::LOCALHOST, port));
            // No IPv6 in the sandbox is the same answer: nothing listens.
            connect_to(ns, AddressFamily::Inet6, v6)
                .await
                .map_err(|_| e)
        }
        other => other,
    }
}

async fn connect_to(
    ns: Arc<OwnedFd>,
    family: AddressFamily,
    addr: SocketAddr,
) -> std::io::Result<TcpStream> {
    let fd = make_socket(ns, family).await?;
    let socket = TcpSocket::from_std_stream(std::net::TcpStream::from(fd));
    socket.connect(addr).await
}

/// A non-blocking TCP socket of `family` in namespace `ns`, made on the dialer thread.
async fn make_socket(ns: Arc<OwnedFd>, family: AddressFamily) -> std::io::Result<OwnedFd> {
    let (reply, answer) = oneshot::channel();
    let mut job = Job { ns, family, reply };
    // Twice at most: a dialer that has exited is replaced once.
    for _ in 0..2 {
        let sender = {
            let mut dialer = DIALER
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            match &*dialer {
                Some(s) => s.clone(),
                None => {
                    let s = spawn_dialer()?;
                    *dialer = Some(s.clone());
                    s
                }
            }
        };
        match sender.send(job) {
            Ok(()) => {
                return answer
                    .await
                    .map_err(|_| std::io::Error::other("the netns dialer exited"))?;
            }
            Err(mpsc::SendError(back)) => {
                // The thread has gone. Forgetting a newer dialer another task just started
                // would only make the next job start one more.
                job = back;
                *DIALER
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner) = None;
            }
        }
    }
    Err(std::io::Error::other("the netns dialer cannot be started"))
}

/// Starts a dialer thread in the gateway's own network namespace.
fn spawn_dialer() -> std::io::Result<mpsc::Sender<Job>> {
    // Opened here, on a thread in the gateway's namespace, so the dialer knows its way home.
    let home = OwnedFd::from(std::fs::File::open("/proc/thread-self/ns/net")?);
    let (tx, rx) = mpsc::channel::<Job>();
    std::thread::Builder::new()
        .name("coppice-netns-dialer".into())
        .spawn(move || dial(&home, &rx))?;
    Ok(tx)
}

/// The dialer thread's loop; returns (ending the thread) if it cannot get home.
fn dial(home: &OwnedFd, jobs: &mpsc::Receiver<Job>) {
    for job in jobs {
        if let Err(e) = setns(job.ns.as_fd(), CloneFlags::CLONE_NEWNET) {
            let _ = job.reply.send(Err(e.into()));
            continue;
        }
        let made = socket(
            job.family,
            SockType::Stream,
            SockFlag::SOCK_NONBLOCK | SockFlag::SOCK_CLOEXEC,
            None,
        )
        .map_err(std::io::Error::from);
        let back = setns(home.as_fd(), CloneFlags::CLONE_NEWNET);
        let _ = job.reply.send(made);
        if let Err(e) = back {
            tracing::error!(error = %e, "the netns dialer cannot return to its namespace; exiting");
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::MetadataExt as _;

    use super::*;

    /// The dialer's sockets live in the namespace they were made for, and the dialer goes
    /// home between jobs: a socket made for the gateway's own namespace is in it.
    #[tokio::test]
    #[allow(clippy::print_stdout)] // the skip line must reach the test output
    async fn sockets_are_made_in_the_namespace_asked_for() {
        if !nix::unistd::geteuid().is_root() {
            println!("SKIP sockets_are_made_in_the_namespace_asked_for: not root");
            return;
        }
        let ours = std::fs::metadata("/proc/self/ns/net").unwrap();
        // A fresh namespace, held by a thread that unshared it.
        let (tx, rx) = std::sync::mpsc::channel();
        let (done_tx, done_rx) = std::sync::mpsc::channel::<()>();
        let holder = std::thread::spawn(move || {
            nix::sched::unshare(CloneFlags::CLONE_NEWNET).unwrap();
            tx.send(OwnedFd::from(
                std::fs::File::open("/proc/thread-self/ns/net").unwrap(),
            ))
            .unwrap();
            done_rx.recv().ok();
        });
        let theirs = Arc::new(rx.recv().unwrap());
        let ino = |fd: &OwnedFd| {
            let link = std::fs::read_link(format!(
                "/proc/self/fd/{}",
                std::os::fd::AsRawFd::as_raw_fd(fd)
            ))
            .unwrap();
            link.to_string_lossy().into_owned()
        };
        let theirs_name = ino(&theirs);
        let sock = make_socket(Arc::clone(&theirs), AddressFamily::Inet)
            .await
            .unwrap();
        // SIOCGSKNS would name the socket's namespace; connecting says as much: nothing
        // listens in the fresh namespace, whose loopback is down.
        let err = TcpSocket::from_std_stream(std::net::TcpStream::from(sock))
            .connect(SocketAddr::from((Ipv4Addr::LOCALHOST, 9)))
            .await
            .unwrap_err();
        assert_ne!(err.kind(), std::io::ErrorKind::ConnectionRefused, "{err}");
        // Home again: a listener here is reachable through a socket made for our namespace.
        let home = Arc::new(OwnedFd::from(
            std::fs::File::open("/proc/self/ns/net").unwrap(),
        ));
        assert_ne!(ino(&home), theirs_name);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        connect(home, port).await.unwrap();
        assert_eq!(
            std::fs::metadata("/proc/self/ns/net").unwrap().ino(),
            ours.ino()
        );
        done_tx.send(()).unwrap();
        holder.join().unwrap();
    }
}
