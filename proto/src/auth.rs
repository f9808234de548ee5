//! Pre-shared keys per VM and role, and the key files they come from.
//!
//! The keys authenticate both ends of the Noise handshake (`channel.rs`):
//! neither side finishes it without the role's key, so a monitor cannot
//! be fed a fake "healthy" guest by an impostor. Keys never cross the
//! wire.

use std::path::Path;

use crate::wire::Role;

/// Shortest key accepted, in bytes.
pub const MIN_KEY_BYTES: usize = 16;

/// Errors loading keys.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    /// The file cannot be read.
    #[error("cannot read key file {path}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    /// Not valid TOML of the expected shape.
    #[error("key file {path} is invalid: {detail}")]
    Invalid { path: String, detail: String },
}

/// The keys of one VM. `read` is required; without `repair` nobody may write.
#[derive(Clone, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Keys {
    read: String,
    repair: Option<String>,
    forensic: Option<String>,
}

impl std::fmt::Debug for Keys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Keys")
            .field("repair", &self.repair.is_some())
            .field("forensic", &self.forensic.is_some())
            .finish_non_exhaustive()
    }
}

impl Keys {
    /// Parses a key file: TOML with `read = "<hex>"` and optionally
    /// `repair = "<hex>"` and `forensic = "<hex>"` (the VMM's view of all
    /// guest RAM), each at least 16 bytes (32 hex digits), all different.
    pub fn parse(text: &str, path: &str) -> Result<Self, KeyError> {
        let invalid = |detail: String| KeyError::Invalid {
            path: path.to_owned(),
            detail,
        };
        let keys: Keys = toml::from_str(text).map_err(|e| invalid(e.message().to_owned()))?;
        for (role, key) in [
            ("read", Some(&keys.read)),
            ("repair", keys.repair.as_ref()),
            ("forensic", keys.forensic.as_ref()),
        ] {
            if let Some(k) = key {
                let bytes =
                    decode_hex(k).ok_or_else(|| invalid(format!("the {role} key is not hex")))?;
                if bytes.len() < MIN_KEY_BYTES {
                    return Err(invalid(format!(
                        "the {role} key has {} bytes; at least {MIN_KEY_BYTES} are needed",
                        bytes.len()
                    )));
                }
            }
        }
        if keys.repair.as_deref() == Some(keys.read.as_str()) {
            return Err(invalid("the read and repair keys must differ".into()));
        }
        if let Some(f) = keys.forensic.as_deref() {
            if f == keys.read || keys.repair.as_deref() == Some(f) {
                return Err(invalid(
                    "the forensic key must differ from the others".into(),
                ));
            }
        }
        Ok(keys)
    }

    /// Loads a key file.
    pub fn load(path: &Path) -> Result<Self, KeyError> {
        let shown = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|source| KeyError::Read {
            path: shown.clone(),
            source,
        })?;
        Self::parse(&text, &shown)
    }

    /// The key for `role`, if that role is enabled.
    pub fn key(&self, role: Role) -> Option<Vec<u8>> {
        match role {
            Role::Read => decode_hex(&self.read),
            Role::Repair => self.repair.as_deref().and_then(decode_hex),
            Role::Forensic => self.forensic.as_deref().and_then(decode_hex),
        }
    }
}

/// Decodes hex (either case); `None` if malformed.
pub fn decode_hex(s: &str) -> Option<Vec<u8>> {
    hex::decode(s.trim()).ok()
}

/// A key file the agent follows: read again whenever it changes on disk
/// (its size, modification time or inode), so keys rotate without
/// restarting the agent or the guest. New connections use the new keys;
/// connections already authenticated keep theirs. A file that no longer
/// parses leaves the keys in force, and says so once per change.
#[derive(Debug)]
pub struct KeyFile {
    path: std::path::PathBuf,
    state: std::sync::Mutex<(Option<FileStamp>, std::sync::Arc<Keys>)>,
}

/// What tells one version of a file from the next.
type FileStamp = (u64, u64, std::time::SystemTime);

fn stamp(path: &Path) -> Option<FileStamp> {
    use std::os::unix::fs::MetadataExt;
    let m = std::fs::metadata(path).ok()?;
    Some((m.ino(), m.len(), m.modified().ok()?))
}

impl KeyFile {
    /// Loads `path` and follows it.
    pub fn load(path: &Path) -> Result<Self, KeyError> {
        let at = stamp(path);
        let keys = Keys::load(path)?;
        Ok(Self {
            path: path.to_owned(),
            state: std::sync::Mutex::new((at, std::sync::Arc::new(keys))),
        })
    }

    /// The keys now in force (the file is read again if it changed).
    pub fn current(&self) -> std::sync::Arc<Keys> {
        let mut s = self
            .state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let now = stamp(&self.path);
        if now.is_some() && now != s.0 {
            s.0 = now;
            match Keys::load(&self.path) {
                Ok(k) => {
                    tracing::info!(path = %self.path.display(), "agent: key file changed; new connections use its keys");
                    s.1 = std::sync::Arc::new(k);
                }
                Err(e) => tracing::warn!(
                    "agent: keeping the keys in force: {}",
                    backdoor_abi::ErrorChain(&e)
                ),
            }
        }
        s.1.clone()
    }
}

/// A random key, for a HELLO that names an unknown VM or a disabled
/// role: the handshake then fails as a wrong key would.
pub fn random_key() -> Result<[u8; 32], getrandom::Error> {
    let mut b = [0u8; 32];
    getrandom::fill(&mut b)?;
    Ok(b)
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = "read = \"00112233445566778899aabbccddeeff\"\nrepair = \"ffeeddccbbaa99887766554433221100\"\n";

    #[test]
    fn key_files_are_validated() {
        let k = Keys::parse(GOOD, "k").unwrap();
        assert_eq!(k.key(Role::Read).unwrap().len(), 16);
        assert!(k.key(Role::Repair).is_some());
        let read_only = Keys::parse("read = \"00112233445566778899aabbccddeeff\"", "k").unwrap();
        assert!(read_only.key(Role::Repair).is_none());
        for bad in ["", "read = \"abc\"", "read = \"0011\"", "read = \"zz112233445566778899aabbccddeeff\"", "reed = \"00112233445566778899aabbccddeeff\"", "read = \"00112233445566778899aabbccddeeff\"\nrepair = \"00112233445566778899aabbccddeeff\""] {
            assert!(Keys::parse(bad, "k").is_err(), "{bad:?}");
        }
        assert!(
            !format!("{k:?}").contains("0011"),
            "Debug never prints keys"
        );
    }

    #[test]
    fn random_keys_differ() {
        assert_ne!(random_key().unwrap(), random_key().unwrap());
    }
}
