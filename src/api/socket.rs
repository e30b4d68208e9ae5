//! The API's unix socket: root-only from the first moment, never stolen from
//! a live daemon, never put in place of something that is not a socket.
//!
//! File mode 0600 is the socket's only authentication, so there must be no
//! moment when it exists with a looser mode. `bind(2)` creates the file with
//! the process umask and the umask is process-wide (changing it would race
//! with every other thread), so the socket is bound inside a fresh 0700
//! directory, chmod-ed to 0600 there, and then renamed into place. A client
//! can only reach it once it already has its final mode.

use std::os::unix::fs::{DirBuilderExt, FileTypeExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use tokio::net::{UnixListener, UnixStream};

use super::Error;

/// The socket's file mode: owner (root) only.
pub const SOCKET_MODE: u32 = 0o600;

/// A socket file this daemon put in place; removed again on drop, unless
/// something else has replaced it meanwhile.
#[derive(Debug)]
pub struct Owned {
    path: PathBuf,
    inode: (u64, u64),
}

impl Drop for Owned {
    fn drop(&mut self) {
        let ours =
            std::fs::symlink_metadata(&self.path).is_ok_and(|m| (m.dev(), m.ino()) == self.inode);
        if ours {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

/// Binds the unix socket at `path` with mode 0600, creating its directory
/// (mode 0755) when missing. A stale socket from an earlier run is replaced;
/// one that a live process answers on, or any other kind of file, is an error.
pub async fn bind(path: &Path) -> Result<(UnixListener, Owned), Error> {
    let failed = |source: std::io::Error| Error::Socket {
        path: path.to_path_buf(),
        source,
    };
    let (Some(parent), Some(file_name)) = (path.parent(), path.file_name()) else {
        return Err(failed(std::io::ErrorKind::InvalidInput.into()));
    };
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o755)
        .create(parent)
        .map_err(failed)?;
    match std::fs::symlink_metadata(path) {
        Ok(meta) if !meta.file_type().is_socket() => {
            return Err(Error::NotASocket(path.to_path_buf()));
        }
        Ok(_) if UnixStream::connect(path).await.is_ok() => {
            return Err(Error::SocketInUse(path.to_path_buf()));
        }
        _ => {}
    }

    let mut private_name = std::ffi::OsString::from(".");
    private_name.push(file_name);
    private_name.push(format!(".{}.new", std::process::id()));
    let private = parent.join(private_name);
    // A leftover of an earlier daemon that had the same pid and crashed here.
    let _ = std::fs::remove_dir_all(&private);
    std::fs::DirBuilder::new()
        .mode(0o700)
        .create(&private)
        .map_err(failed)?;
    let staged = private.join("api.sock");
    let placed = (|| {
        let listener = UnixListener::bind(&staged)?;
        std::fs::set_permissions(&staged, std::fs::Permissions::from_mode(SOCKET_MODE))?;
        std::fs::rename(&staged, path)?;
        let meta = std::fs::symlink_metadata(path)?;
        Ok((listener, (meta.dev(), meta.ino())))
    })();
    let _ = std::fs::remove_dir_all(&private);
    let (listener, inode) = placed.map_err(failed)?;
    Ok((
        listener,
        Owned {
            path: path.to_path_buf(),
            inode,
        },
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn root_only_replaces_stale_refuses_live_and_cleans_up() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("run/flotilla/api.sock");
        let (listener, owned) = bind(&path).await.unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, SOCKET_MODE);
        let leftovers = std::fs::read_dir(path.parent().unwrap()).unwrap().count();
        assert_eq!(leftovers, 1, "only the socket is left in its directory");

        assert!(matches!(bind(&path).await, Err(Error::SocketInUse(_))));
        drop(listener);
        // The file is still there but nobody answers: stale, so replaced.
        std::mem::forget(owned);
        let (_listener, owned) = bind(&path).await.unwrap();
        drop(owned);
        assert!(!path.exists(), "removed on drop");

        let file = dir.path().join("not-a-socket");
        std::fs::write(&file, "keep me").unwrap();
        assert!(matches!(bind(&file).await, Err(Error::NotASocket(_))));
        assert_eq!(std::fs::read_to_string(&file).unwrap(), "keep me");
    }
}
