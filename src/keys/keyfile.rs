//! The master key file on disk: read (refusing a file others may read), created with
//! mode 0600, rewritten atomically (temp file, fsync, rename, fsync of the folder)
//! keeping its owner, and backed up before versions are retired.

use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use zeroize::Zeroizing;

use super::{MasterKey, MasterKeyError};

impl MasterKey {
    /// Reads a key file, refusing one that group or others may read.
    pub fn read_file(path: &Path) -> Result<Self, MasterKeyError> {
        let read = |source| MasterKeyError::Read {
            path: path.to_path_buf(),
            source,
        };
        let meta = std::fs::metadata(path).map_err(read)?;
        if meta.permissions().mode() & 0o077 != 0 {
            return Err(MasterKeyError::Permissions {
                path: path.to_path_buf(),
                mode: meta.permissions().mode() & 0o777,
            });
        }
        let text = Zeroizing::new(std::fs::read_to_string(path).map_err(read)?);
        MasterKey::from_text(&text).map_err(|e| MasterKeyError::Format {
            path: path.to_path_buf(),
            source: Box::new(e),
        })
    }

    /// Writes a new random key to `path` with mode 0600; fails if the file exists.
    pub fn create_file(path: &Path) -> Result<Self, MasterKeyError> {
        let text = MasterKey::generate_base64();
        write_private(path, &text, true).map_err(|source| MasterKeyError::Create {
            path: path.to_path_buf(),
            source,
        })?;
        MasterKey::from_text(&text)
    }

    /// Writes this keyring to `path` atomically (temp file 0600, fsync, rename, fsync
    /// of the folder), always in the multi-version format with its `id:` line. A file
    /// already there keeps its owner, group and (private) mode, so a rotation run as
    /// root leaves the key readable by the service user it belonged to.
    pub fn write_keyring(&self, path: &Path) -> std::io::Result<()> {
        let ring = self.ring();
        // A key file that is a symlink is rewritten where it points: replacing the
        // link would leave the real file behind with the old versions.
        let real;
        let path = match std::fs::symlink_metadata(path) {
            Ok(m) if m.file_type().is_symlink() => {
                real = std::fs::canonicalize(path)?;
                real.as_path()
            }
            _ => path,
        };
        let tmp = keyring_temp(path);
        // Only a stale temp file of our own is removed, never a socket or a folder.
        match std::fs::symlink_metadata(&tmp) {
            Ok(m) if m.file_type().is_file() => std::fs::remove_file(&tmp)?,
            Ok(_) => {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::AlreadyExists,
                    format!(
                        "{} exists and is not a regular file; refusing to replace it",
                        tmp.display()
                    ),
                ))
            }
            Err(_) => {}
        }
        write_private(&tmp, &ring.to_text(), true)?;
        if let Ok(was) = std::fs::metadata(path) {
            keep_owner_and_mode(&tmp, &was)?;
        }
        std::fs::rename(&tmp, path)?;
        if let Some(dir) = path.parent() {
            std::fs::File::open(dir)?.sync_all()?;
        }
        Ok(())
    }

    /// Before versions are retired: writes this whole keyring to a new file beside
    /// `path`, named after the `retired` versions (mode 0600, `path`'s owner), so
    /// keystore backups sealed with them stay openable. Answers the file's path.
    pub fn write_backup(&self, path: &Path, retired: &[u32]) -> std::io::Result<PathBuf> {
        let names: Vec<String> = retired.iter().map(|v| format!("v{v}")).collect();
        let mut name = path.as_os_str().to_owned();
        name.push(format!(".retired-{}", names.join("-")));
        let mut backup = PathBuf::from(&name);
        let mut n = 1;
        while backup.exists() {
            n += 1;
            backup = PathBuf::from(format!("{}.{n}", name.to_string_lossy()));
        }
        write_private(&backup, &self.ring().to_text(), true)?;
        if let Ok(was) = std::fs::metadata(path) {
            keep_owner_and_mode(&backup, &was)?;
        }
        Ok(backup)
    }
}

/// The temporary file `write_keyring` writes before renaming it over `path`.
pub fn keyring_temp(path: &Path) -> PathBuf {
    path.with_extension("key.tmp")
}

/// Gives `file` the owner and group of `was`, and its mode without group or other bits.
fn keep_owner_and_mode(file: &Path, was: &std::fs::Metadata) -> std::io::Result<()> {
    use std::os::unix::fs::MetadataExt;
    std::os::unix::fs::chown(file, Some(was.uid()), Some(was.gid()))?;
    std::fs::set_permissions(
        file,
        std::fs::Permissions::from_mode(was.mode() & 0o700 | 0o400),
    )
}

/// Creates `path` with mode 0600 holding `text`, synced to disk.
pub(super) fn write_private(path: &Path, text: &str, create_new: bool) -> std::io::Result<()> {
    // A bare file name's parent is "", which cannot be opened to sync: it is ".".
    let parent = path.parent().map(|d| {
        if d.as_os_str().is_empty() {
            Path::new(".")
        } else {
            d
        }
    });
    if let Some(dir) = parent {
        std::fs::create_dir_all(dir)?;
    }
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(create_new)
        .mode(0o600)
        .open(path)?;
    f.write_all(text.as_bytes())?;
    if !text.ends_with('\n') {
        f.write_all(b"\n")?;
    }
    f.sync_all()?;
    if let Some(dir) = parent {
        std::fs::File::open(dir)?.sync_all()?;
    }
    Ok(())
}
