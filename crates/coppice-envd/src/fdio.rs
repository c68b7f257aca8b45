//! Non-blocking reads and writes on pipe and PTY file descriptors, driven by tokio.
//!
//! Child processes are spawned with `std::process` (their exit goes through the
//! reaper), so their pipes and PTY masters are plain fds; this wraps one in
//! `AsyncFd` without taking a dependency on `tokio::process`.

use std::io;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};

use nix::errno::Errno;
use nix::fcntl::{fcntl, FcntlArg, FdFlag, OFlag};
use tokio::io::unix::AsyncFd;

/// An fd in non-blocking mode registered with the tokio reactor.
#[derive(Debug)]
pub(crate) struct FdIo {
    fd: AsyncFd<OwnedFd>,
}

impl FdIo {
    /// Takes `fd`, sets `O_NONBLOCK` and `FD_CLOEXEC`, and registers it.
    pub(crate) fn new(fd: OwnedFd) -> io::Result<Self> {
        set_cloexec(&fd)?;
        let flags = OFlag::from_bits_truncate(fcntl(fd.as_raw_fd(), FcntlArg::F_GETFL)?);
        fcntl(fd.as_raw_fd(), FcntlArg::F_SETFL(flags | OFlag::O_NONBLOCK))?;
        // SAFETY: `OwnedFd` keeps the descriptor open and unchanged until the `AsyncFd`
        // (which owns it) is dropped, and `as_raw_fd` always returns that descriptor.
        let fd = unsafe { AsyncFd::register(fd) }.map_err(|e| e.into_parts().1)?;
        Ok(Self { fd })
    }

    /// The raw fd, for ioctls.
    pub(crate) fn raw(&self) -> std::os::fd::RawFd {
        self.fd.get_ref().as_raw_fd()
    }

    /// Reads what is available, waiting until something is; 0 at end of file.
    ///
    /// A PTY master reports `EIO` once every slave fd is closed; that is end of file too.
    /// Cancel-safe: no data is consumed unless the future completes.
    pub(crate) async fn read(&self, buf: &mut [u8]) -> io::Result<usize> {
        loop {
            let mut guard = self.fd.readable().await?;
            match guard.try_io(|inner| read_raw(inner.get_ref().as_raw_fd(), buf)) {
                Ok(result) => return result,
                Err(_would_block) => continue,
            }
        }
    }

    /// Reads what is available without waiting; `WouldBlock` when nothing is.
    pub(crate) fn try_read(&self, buf: &mut [u8]) -> io::Result<usize> {
        read_raw(self.raw(), buf)
    }

    /// Writes all of `data`, waiting for room as needed.
    pub(crate) async fn write_all(&self, mut data: &[u8]) -> io::Result<()> {
        while !data.is_empty() {
            let mut guard = self.fd.writable().await?;
            match guard.try_io(|inner| {
                nix::unistd::write(inner.get_ref().as_fd(), data).map_err(io::Error::from)
            }) {
                Ok(Ok(n)) => data = &data[n..],
                Ok(Err(e)) => return Err(e),
                Err(_would_block) => continue,
            }
        }
        Ok(())
    }
}

fn read_raw(fd: std::os::fd::RawFd, buf: &mut [u8]) -> io::Result<usize> {
    match nix::unistd::read(fd, buf) {
        Ok(n) => Ok(n),
        Err(Errno::EIO) => Ok(0),
        Err(e) => Err(io::Error::from(e)),
    }
}

/// Marks `fd` close-on-exec so concurrently spawned children do not inherit it.
pub(crate) fn set_cloexec(fd: &impl AsRawFd) -> io::Result<()> {
    fcntl(fd.as_raw_fd(), FcntlArg::F_SETFD(FdFlag::FD_CLOEXEC))?;
    Ok(())
}
