//! Opens every file a job names *inside* the data roots, checked on what was opened.
//!
//! An [`Opener`] holds one directory descriptor per root (`jobs.data_roots`, plus the inbox and
//! the spool). A path is normalised lexically (`.` dropped, `..` popped), matched to a root,
//! and the rest is opened relative to that root's descriptor with `openat2(2)` and
//! `RESOLVE_BENEATH | RESOLVE_NO_MAGICLINKS`: the kernel refuses any step (a `..`, an absolute
//! or relative symlink, a folder swapped for a symlink between check and open) that would
//! leave the root. On kernels without `openat2` (before 5.6, or a seccomp filter that refuses
//! it) each component is opened with `O_NOFOLLOW` relative to the previous one, so there no
//! symlink at all is followed below a root. Readers then read the returned [`std::fs::File`]
//! or [`Dir`] and never the name again; files named inside input files (an NRRD `data file:`,
//! DICOM folder members) go through the same opener.
//!
//! Files are opened `O_NONBLOCK` and must be regular files (folders for [`Opener::open_dir`]):
//! a FIFO or device is refused without blocking, then `O_NONBLOCK` is cleared.
//!
//! A refusal reads "outside data_roots" and nothing else: not whether the outside target
//! exists, nor its size or type.
//!
//! In-house because no maintained crate wraps `openat2` with the fallback (cap-std resolves in
//! user space and brings its own file types; openat2-rs is unmaintained); this is ~250 lines of
//! `libc`.

use std::ffi::{CString, OsStr, OsString};
use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::path::{Component, Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};

/// The one message a confinement refusal carries.
pub const OUTSIDE: &str = "outside data_roots";

/// `struct open_how` of `linux/openat2.h` (libc's is `non_exhaustive`).
#[repr(C)]
struct OpenHow {
    flags: u64,
    mode: u64,
    resolve: u64,
}

/// Set once `openat2` answered ENOSYS/EPERM: use the per-component fallback from then on.
static NO_OPENAT2: AtomicBool = AtomicBool::new(false);

fn outside() -> io::Error {
    io::Error::new(io::ErrorKind::PermissionDenied, OUTSIDE)
}

/// Whether `e` is a confinement refusal (rather than, say, a missing file inside a root).
pub fn is_outside(e: &io::Error) -> bool {
    e.kind() == io::ErrorKind::PermissionDenied && e.to_string() == OUTSIDE
}

/// A data root: its canonical path and a descriptor of the folder.
#[derive(Debug)]
struct Root {
    path: PathBuf,
    fd: OwnedFd,
}

/// Opens job files: confined to roots, or (command line) anywhere.
#[derive(Debug)]
pub struct Opener {
    roots: Option<Vec<Root>>,
}

impl Opener {
    /// Opens anything by name (the command line's own files); still refuses FIFOs and devices.
    pub fn unconfined() -> Self {
        Self { roots: None }
    }

    /// Confines to `roots` (folders; each is canonicalised and opened once, here; a missing
    /// one is skipped with a warning).
    pub fn confined(roots: &[PathBuf]) -> io::Result<Self> {
        let mut out: Vec<Root> = Vec::new();
        for r in roots {
            let path = match r.canonicalize() {
                Ok(p) => p,
                Err(e) if e.kind() == io::ErrorKind::NotFound => {
                    tracing::warn!(root = %r.display(), "data root does not exist; nothing under it can be read");
                    continue;
                }
                Err(e) => return Err(io::Error::new(e.kind(), format!("{}: {e}", r.display()))),
            };
            let fd = open_path(&path, libc::O_PATH | libc::O_DIRECTORY)
                .map_err(|e| io::Error::new(e.kind(), format!("{}: {e}", r.display())))?;
            out.push(Root { path, fd });
        }
        // Longest first, so a root nested in another is matched as itself.
        out.sort_by_key(|r| std::cmp::Reverse(r.path.as_os_str().len()));
        Ok(Self { roots: Some(out) })
    }

    /// Whether this opener confines.
    pub fn is_confined(&self) -> bool {
        self.roots.is_some()
    }

    /// Opens a regular file for reading.
    pub fn open_file(&self, path: &Path) -> io::Result<File> {
        let fd = self.open(path, 0)?;
        regular(fd)
    }

    /// Opens a folder for listing and opening its members.
    pub fn open_dir(&self, path: &Path) -> io::Result<Dir> {
        let fd = self.open(path, libc::O_DIRECTORY)?;
        Ok(Dir {
            fd,
            path: path.to_path_buf(),
        })
    }

    fn open(&self, path: &Path, extra: i32) -> io::Result<OwnedFd> {
        let flags = libc::O_RDONLY | libc::O_NONBLOCK | libc::O_NOCTTY | extra;
        let Some(roots) = &self.roots else {
            return open_path(path, flags);
        };
        let norm = normalize(path).ok_or_else(outside)?;
        let root = roots
            .iter()
            .find(|r| norm.starts_with(&r.path))
            .ok_or_else(outside)?;
        let rel = norm.strip_prefix(&root.path).map_err(|_| outside())?;
        open_beneath(root.fd.as_raw_fd(), rel, flags)
    }
}

/// A folder opened through an [`Opener`]; its members are opened beneath it.
#[derive(Debug)]
pub struct Dir {
    fd: OwnedFd,
    path: PathBuf,
}

impl Dir {
    /// The path the folder was opened as (for messages).
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Names of the regular files in the folder (not following symlinks), sorted.
    pub fn file_names(&self) -> io::Result<Vec<OsString>> {
        let dup = open_at(
            self.fd.as_raw_fd(),
            c".",
            libc::O_RDONLY | libc::O_DIRECTORY,
        )?;
        // SAFETY: `dup` is an open directory descriptor whose ownership passes to the stream.
        let dirp = unsafe { libc::fdopendir(dup.as_raw_fd()) };
        if dirp.is_null() {
            return Err(io::Error::last_os_error());
        }
        std::mem::forget(dup);
        let mut names = Vec::new();
        loop {
            // SAFETY: `dirp` is a valid stream until `closedir` below.
            let ent = unsafe { libc::readdir(dirp) };
            if ent.is_null() {
                break;
            }
            // SAFETY: `d_name` is NUL-terminated within the entry.
            let name = unsafe { std::ffi::CStr::from_ptr((*ent).d_name.as_ptr()) };
            let bytes = name.to_bytes();
            if bytes == b"." || bytes == b".." {
                continue;
            }
            // SAFETY: an all-zero `stat` is a valid value to be overwritten.
            let mut st: libc::stat = unsafe { std::mem::zeroed() };
            // SAFETY: valid descriptor, NUL-terminated name, valid out pointer.
            let rc = unsafe {
                libc::fstatat(
                    self.fd.as_raw_fd(),
                    name.as_ptr(),
                    &mut st,
                    libc::AT_SYMLINK_NOFOLLOW,
                )
            };
            if rc == 0 && st.st_mode & libc::S_IFMT == libc::S_IFREG {
                names.push(OsString::from_vec(bytes.to_vec()));
            }
        }
        // SAFETY: `dirp` came from `fdopendir` and is closed once.
        unsafe { libc::closedir(dirp) };
        names.sort();
        Ok(names)
    }

    /// Opens a member (one name, no `/`) as a regular file, without following a symlink.
    pub fn open_file(&self, name: &OsStr) -> io::Result<File> {
        if name.as_bytes().contains(&b'/') || name == ".." || name == "." {
            return Err(outside());
        }
        let fd = open_beneath(
            self.fd.as_raw_fd(),
            Path::new(name),
            libc::O_RDONLY | libc::O_NONBLOCK | libc::O_NOCTTY | libc::O_NOFOLLOW,
        )?;
        regular(fd)
    }
}

/// Raises the soft open-file limit to the hard one, once: a DICOM series keeps every member
/// open between its header and its pixels (checked once, read from the same descriptor).
pub fn raise_fd_limit() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        // SAFETY: plain getrlimit/setrlimit on a local struct.
        unsafe {
            let mut r: libc::rlimit = std::mem::zeroed();
            if libc::getrlimit(libc::RLIMIT_NOFILE, &mut r) == 0 && r.rlim_cur < r.rlim_max {
                r.rlim_cur = r.rlim_max;
                libc::setrlimit(libc::RLIMIT_NOFILE, &r);
            }
        }
    });
}

/// `path` made absolute-lexical: `.` dropped, `..` popped. `None` for a relative path.
pub fn normalize(path: &Path) -> Option<PathBuf> {
    if !path.is_absolute() {
        return None;
    }
    let mut out = PathBuf::from("/");
    for c in path.components() {
        match c {
            Component::Normal(n) => out.push(n),
            Component::ParentDir => {
                out.pop();
            }
            Component::RootDir | Component::CurDir | Component::Prefix(_) => {}
        }
    }
    Some(out)
}

/// Checks the descriptor is a regular file, clears `O_NONBLOCK`, and hands it over as a File.
fn regular(fd: OwnedFd) -> io::Result<File> {
    let file = File::from(fd);
    if !file.metadata()?.is_file() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "not a regular file",
        ));
    }
    // SAFETY: plain fcntl on an owned, open descriptor.
    unsafe {
        let fl = libc::fcntl(file.as_raw_fd(), libc::F_GETFL);
        if fl >= 0 {
            libc::fcntl(file.as_raw_fd(), libc::F_SETFL, fl & !libc::O_NONBLOCK);
        }
    }
    Ok(file)
}

fn cstring(p: &OsStr) -> io::Result<CString> {
    CString::new(p.as_bytes())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "NUL in path"))
}

fn open_path(path: &Path, flags: i32) -> io::Result<OwnedFd> {
    open_at(libc::AT_FDCWD, &cstring(path.as_os_str())?, flags)
}

fn open_at(dirfd: RawFd, name: &std::ffi::CStr, flags: i32) -> io::Result<OwnedFd> {
    // SAFETY: NUL-terminated name; the returned descriptor is owned below.
    let fd = unsafe { libc::openat(dirfd, name.as_ptr(), flags | libc::O_CLOEXEC) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` is a fresh descriptor nobody else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Opens `rel` (relative, no `..` needed) beneath `dirfd`: `openat2` with `RESOLVE_BENEATH`,
/// else the per-component fallback.
fn open_beneath(dirfd: RawFd, rel: &Path, flags: i32) -> io::Result<OwnedFd> {
    if !NO_OPENAT2.load(Ordering::Relaxed) {
        match openat2_beneath(dirfd, rel, flags) {
            Err(e) if matches!(e.raw_os_error(), Some(libc::ENOSYS) | Some(libc::EPERM)) => {
                NO_OPENAT2.store(true, Ordering::Relaxed);
            }
            other => return other,
        }
    }
    open_nofollow_each(dirfd, rel, flags)
}

fn openat2_beneath(dirfd: RawFd, rel: &Path, flags: i32) -> io::Result<OwnedFd> {
    let name = if rel.as_os_str().is_empty() {
        CString::new(".").expect("no NUL")
    } else {
        cstring(rel.as_os_str())?
    };
    let how = OpenHow {
        flags: (flags | libc::O_CLOEXEC) as u64,
        mode: 0,
        resolve: libc::RESOLVE_BENEATH | libc::RESOLVE_NO_MAGICLINKS,
    };
    for _ in 0..8 {
        // SAFETY: valid descriptor, NUL-terminated name, `how` is `struct open_how`.
        let fd = unsafe {
            libc::syscall(
                libc::SYS_openat2,
                dirfd,
                name.as_ptr(),
                &how as *const OpenHow,
                std::mem::size_of::<OpenHow>(),
            )
        };
        if fd >= 0 {
            // SAFETY: a fresh descriptor nobody else owns.
            return Ok(unsafe { OwnedFd::from_raw_fd(fd as RawFd) });
        }
        let e = io::Error::last_os_error();
        match e.raw_os_error() {
            Some(libc::EAGAIN) | Some(libc::EINTR) => continue,
            Some(libc::EXDEV) | Some(libc::ELOOP) => return Err(outside()),
            _ => return Err(e),
        }
    }
    Err(outside())
}

/// The fallback: every component opened with `O_NOFOLLOW` relative to the one before, so no
/// symlink below the root is followed at all (`..` never occurs: paths are normalised).
pub(crate) fn open_nofollow_each(dirfd: RawFd, rel: &Path, flags: i32) -> io::Result<OwnedFd> {
    let parts: Vec<&OsStr> = rel
        .components()
        .map(|c| match c {
            Component::Normal(n) => Ok(n),
            _ => Err(outside()),
        })
        .collect::<io::Result<_>>()?;
    let Some((last, dirs)) = parts.split_last() else {
        return open_at(dirfd, c".", flags);
    };
    let mut held: Option<OwnedFd> = None;
    for d in dirs {
        let at = held.as_ref().map_or(dirfd, |f| f.as_raw_fd());
        let next = open_at(
            at,
            &cstring(d)?,
            libc::O_PATH | libc::O_DIRECTORY | libc::O_NOFOLLOW,
        )
        .map_err(nofollow_err)?;
        held = Some(next);
    }
    let at = held.as_ref().map_or(dirfd, |f| f.as_raw_fd());
    open_at(at, &cstring(last)?, flags | libc::O_NOFOLLOW).map_err(nofollow_err)
}

/// A symlink met by `O_NOFOLLOW` (ELOOP, or ENOTDIR with `O_PATH|O_DIRECTORY`) is a refusal.
fn nofollow_err(e: io::Error) -> io::Error {
    match e.raw_os_error() {
        Some(libc::ELOOP) | Some(libc::ENOTDIR) => outside(),
        _ => e,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::symlink;

    fn tree() -> (tempfile::TempDir, PathBuf, PathBuf) {
        let t = tempfile::tempdir().unwrap();
        let root = t.path().join("root");
        let out = t.path().join("out");
        std::fs::create_dir_all(root.join("sub")).unwrap();
        std::fs::create_dir_all(&out).unwrap();
        std::fs::write(root.join("sub/in.txt"), b"inside").unwrap();
        std::fs::write(out.join("secret.txt"), b"outside").unwrap();
        (t, root, out)
    }

    #[test]
    fn both_ways_refuse_symlinks_out_and_dotdot() {
        let (_t, root, out) = tree();
        symlink(out.join("secret.txt"), root.join("abs_link")).unwrap();
        symlink("../out/secret.txt", root.join("rel_link")).unwrap();
        symlink(&out, root.join("dir_link")).unwrap();
        let rfd = open_path(&root, libc::O_PATH | libc::O_DIRECTORY).unwrap();
        for rel in ["abs_link", "rel_link", "dir_link/secret.txt"] {
            let e = open_beneath(rfd.as_raw_fd(), Path::new(rel), libc::O_RDONLY).unwrap_err();
            assert!(is_outside(&e), "{rel}: {e}");
            let e =
                open_nofollow_each(rfd.as_raw_fd(), Path::new(rel), libc::O_RDONLY).unwrap_err();
            assert!(is_outside(&e), "fallback {rel}: {e}");
        }
        assert!(open_beneath(rfd.as_raw_fd(), Path::new("sub/in.txt"), libc::O_RDONLY).is_ok());
        assert!(
            open_nofollow_each(rfd.as_raw_fd(), Path::new("sub/in.txt"), libc::O_RDONLY).is_ok()
        );
        let o = Opener::confined(&[root.clone()]).unwrap();
        let e = o
            .open_file(&root.join("sub/../../out/secret.txt"))
            .unwrap_err();
        assert_eq!(e.to_string(), OUTSIDE);
        let e = o.open_file(Path::new("relative.txt")).unwrap_err();
        assert_eq!(e.to_string(), OUTSIDE);
        assert!(o.open_file(&root.join("sub/./in.txt")).is_ok());
    }

    #[test]
    fn fifo_is_refused_without_blocking() {
        let (_t, root, _) = tree();
        let fifo = root.join("pipe");
        let c = cstring(fifo.as_os_str()).unwrap();
        // SAFETY: NUL-terminated path.
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
        let o = Opener::confined(&[root.clone()]).unwrap();
        let e = o.open_file(&fifo).unwrap_err();
        assert!(e.to_string().contains("not a regular file"), "{e}");
        let e = Opener::unconfined().open_file(&fifo).unwrap_err();
        assert!(e.to_string().contains("not a regular file"), "{e}");
    }

    #[test]
    fn dir_members_are_regular_files_opened_beneath() {
        let (_t, root, out) = tree();
        symlink(out.join("secret.txt"), root.join("sub/link")).unwrap();
        let o = Opener::confined(&[root.clone()]).unwrap();
        let d = o.open_dir(&root.join("sub")).unwrap();
        assert_eq!(d.file_names().unwrap(), vec![OsString::from("in.txt")]);
        assert!(is_outside(&d.open_file(OsStr::new("link")).unwrap_err()));
        assert!(is_outside(
            &d.open_file(OsStr::new("../sub/in.txt")).unwrap_err()
        ));
        assert!(d.open_file(OsStr::new("in.txt")).is_ok());
    }
}
