//! The ZFS role: immutable root filesystem layers, a private writable root per sandbox,
//! snapshots of that root as new layers, and forks over them.
//!
//! Two drivers implement [`coppice_lifecycle::backend::Storage`]: `OverlayStorage` (Linux:
//! plain directories stacked by overlayfs, reflink copies where the filesystem has them) and
//! [`ZfsStorage`] (`zfs snapshot/clone/destroy`; it only builds command lines, so it compiles
//! and is unit-tested everywhere through a recording [`zfs::CommandRunner`]). On Linux,
//! `template::TemplateBuilder` builds and caches the default Debian bookworm root
//! filesystem that every sandbox starts from, and `image::ImagePuller` turns an OCI or
//! Docker image from a registry into such a tree. `docs/storage.md` describes the on-disk
//! layouts, the crash-safety argument and the zfs-fuse quirks. Every helper process (debootstrap,
//! cp, zfs, ...) is spawned through `command`, which gives it a timeout and kills it, with
//! its process group, when its job or the gateway ends.
//!
//! **Invariant:** nothing here mounts a sandbox root or knows about processes; storage hands
//! out paths and layer chains, and a published layer or root is complete or absent, never
//! half-made.

mod command;
#[cfg(target_os = "linux")]
pub mod image;
#[cfg(target_os = "linux")]
mod linux;
#[cfg(target_os = "linux")]
pub mod template;
pub mod zfs;

#[cfg(target_os = "linux")]
pub use linux::OverlayStorage;
pub use zfs::{ZfsConfig, ZfsStorage};
