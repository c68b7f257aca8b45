//! The build-context archives the SDKs upload for `COPY` steps: checking that one is a
//! readable tar (gzipped or not) and recomputing the `filesHash` the SDK sent with it.
//!
//! The SDK's hash (`calculate_files_hash` in E2B's Python SDK, `calculateFilesHash` in the
//! JS one) is SHA-256 over `COPY <src> <dest>`, then for each file in path order its path
//! relative to the context, its `st_mode` and `st_size` in decimal, and then its contents
//! (regular files) or its link target (symlinks). A tar carries all of that for files and
//! symlinks, but not a directory's `st_size`, which depends on the client's filesystem: an
//! archive that holds directories cannot have its hash recomputed, and
//! [`sdk_hash`] says so instead of guessing.

use std::io::Read;
use std::path::Path;

/// What is wrong with an archive.
#[derive(Debug, thiserror::Error)]
pub(crate) enum ArchiveError {
    /// It could not be opened.
    #[error("open {path}")]
    Open {
        /// The archive.
        path: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// It is not a tar archive, gzipped or not, or it is cut short.
    #[error("the uploaded archive is not a readable tar: {0}")]
    Corrupt(String),
}

/// Whether `hash` looks like the SDK's: 64 lowercase hex digits.
pub(crate) fn valid_hash(hash: &str) -> bool {
    hash.len() == 64
        && hash
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

fn open(path: &Path) -> Result<Box<dyn Read>, ArchiveError> {
    let mut file = std::fs::File::open(path).map_err(|source| ArchiveError::Open {
        path: path.display().to_string(),
        source,
    })?;
    let mut magic = [0u8; 2];
    let n = file.read(&mut magic).map_err(|source| ArchiveError::Open {
        path: path.display().to_string(),
        source,
    })?;
    let head = std::io::Cursor::new(magic[..n].to_vec());
    let reader = head.chain(file);
    Ok(if n == 2 && magic == [0x1f, 0x8b] {
        Box::new(flate2::read::GzDecoder::new(reader))
    } else {
        Box::new(reader)
    })
}

fn corrupt(e: impl std::fmt::Display) -> ArchiveError {
    ArchiveError::Corrupt(e.to_string())
}

/// The SDK's hash of `src` copied to `dest` from the archive at `path`: `Ok(Some(hash))`,
/// `Ok(None)` when the archive holds entries whose hash input a tar does not carry
/// (directories, hard links), or an error when it is not a readable tar whose paths stay
/// inside the context.
pub(crate) fn sdk_hash(path: &Path, src: &str, dest: &str) -> Result<Option<String>, ArchiveError> {
    let mut archive = tar::Archive::new(open(path)?);
    let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
    ctx.update(format!("COPY {src} {dest}").as_bytes());
    let mut computable = true;
    let mut entries_seen = 0usize;
    for entry in archive.entries().map_err(corrupt)? {
        let mut entry = entry.map_err(corrupt)?;
        entries_seen += 1;
        let name = entry.path().map_err(corrupt)?.into_owned();
        if name.is_absolute()
            || name
                .components()
                .any(|c| matches!(c, std::path::Component::ParentDir))
        {
            return Err(ArchiveError::Corrupt(format!(
                "entry {} leaves the build context",
                name.display()
            )));
        }
        let rel = name.to_string_lossy().trim_end_matches('/').to_owned();
        let header = entry.header();
        let mode = header.mode().map_err(corrupt)?;
        let kind = header.entry_type();
        let (type_bits, size) = if kind.is_file() {
            (0o100_000, entry.size())
        } else if kind.is_symlink() {
            let target = entry
                .link_name_bytes()
                .map(|b| b.into_owned())
                .unwrap_or_default();
            (0o120_000, u64::try_from(target.len()).unwrap_or(u64::MAX))
        } else {
            // Directories (their size is the client filesystem's), hard links (their
            // contents are elsewhere) and device nodes: the hash cannot be recomputed, but
            // the rest of the archive must still read.
            computable = false;
            let mut sink = std::io::sink();
            std::io::copy(&mut entry, &mut sink).map_err(corrupt)?;
            continue;
        };
        ctx.update(rel.as_bytes());
        ctx.update((type_bits | mode).to_string().as_bytes());
        ctx.update(size.to_string().as_bytes());
        if kind.is_symlink() {
            let target = entry
                .link_name_bytes()
                .map(|b| b.into_owned())
                .unwrap_or_default();
            ctx.update(&target);
        } else {
            let mut buf = [0u8; 64 * 1024];
            loop {
                let n = entry.read(&mut buf).map_err(corrupt)?;
                if n == 0 {
                    break;
                }
                ctx.update(&buf[..n]);
            }
        }
    }
    if entries_seen == 0 {
        return Err(ArchiveError::Corrupt("the archive holds no files".into()));
    }
    if !computable {
        return Ok(None);
    }
    Ok(Some(
        ctx.finish()
            .as_ref()
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect(),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A tar of `files` (name, mode, contents) and `symlinks` (name, target), as Python's
    /// `tarfile` writes one.
    fn archive(files: &[(&str, u32, &[u8])], symlinks: &[(&str, &str)], dirs: &[&str]) -> Vec<u8> {
        let mut b = tar::Builder::new(Vec::new());
        for d in dirs {
            let mut h = tar::Header::new_ustar();
            h.set_entry_type(tar::EntryType::Directory);
            h.set_mode(0o755);
            h.set_size(0);
            b.append_data(&mut h, d, std::io::empty()).unwrap();
        }
        for (name, mode, data) in files {
            let mut h = tar::Header::new_ustar();
            h.set_mode(*mode);
            h.set_size(data.len() as u64);
            b.append_data(&mut h, name, *data).unwrap();
        }
        for (name, target) in symlinks {
            let mut h = tar::Header::new_ustar();
            h.set_entry_type(tar::EntryType::Symlink);
            h.set_mode(0o777);
            h.set_size(0);
            b.append_link(&mut h, name, target).unwrap();
        }
        b.into_inner().unwrap()
    }

    fn python_style_hash(src: &str, dest: &str, items: &[(&str, u32, u64, &[u8])]) -> String {
        let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
        ctx.update(format!("COPY {src} {dest}").as_bytes());
        for (rel, st_mode, size, content) in items {
            ctx.update(rel.as_bytes());
            ctx.update(st_mode.to_string().as_bytes());
            ctx.update(size.to_string().as_bytes());
            ctx.update(content);
        }
        ctx.finish()
            .as_ref()
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect()
    }

    #[test]
    fn the_sdk_hash_of_files_and_symlinks_is_recomputed_gzipped_or_not() {
        let dir = tempfile::tempdir().unwrap();
        let tar = archive(&[("a.txt", 0o644, b"hello")], &[("l", "a.txt")], &[]);
        let plain = dir.path().join("plain");
        std::fs::write(&plain, &tar).unwrap();
        let gz = dir.path().join("gz");
        let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        std::io::Write::write_all(&mut enc, &tar).unwrap();
        std::fs::write(&gz, enc.finish().unwrap()).unwrap();
        // What Python computes: st_mode of a 0644 file is 33188, of a symlink 41471.
        let want = python_style_hash(
            "*",
            "/x/",
            &[("a.txt", 33188, 5, b"hello"), ("l", 41471, 5, b"a.txt")],
        );
        assert_eq!(sdk_hash(&plain, "*", "/x/").unwrap().unwrap(), want);
        assert_eq!(sdk_hash(&gz, "*", "/x/").unwrap().unwrap(), want);
        assert_ne!(sdk_hash(&plain, "a.txt", "/x/").unwrap().unwrap(), want);
        assert!(valid_hash(&want));
        assert!(!valid_hash("ABC"));
    }

    #[test]
    fn directories_make_the_hash_unknowable_and_garbage_is_corrupt() {
        let dir = tempfile::tempdir().unwrap();
        let with_dir = dir.path().join("d");
        std::fs::write(&with_dir, archive(&[("app/a", 0o644, b"x")], &[], &["app"])).unwrap();
        assert_eq!(sdk_hash(&with_dir, "app", "/app").unwrap(), None);
        let junk = dir.path().join("junk");
        std::fs::write(&junk, b"this is not a tar archive at all, not even close").unwrap();
        assert!(matches!(
            sdk_hash(&junk, "a", "/a"),
            Err(ArchiveError::Corrupt(_))
        ));
        let cut = dir.path().join("cut");
        let full = archive(&[("a", 0o644, &[7u8; 4000])], &[], &[]);
        std::fs::write(&cut, &full[..1500]).unwrap();
        assert!(matches!(
            sdk_hash(&cut, "a", "/a"),
            Err(ArchiveError::Corrupt(_))
        ));
    }
}
