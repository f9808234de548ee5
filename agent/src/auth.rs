//! Pre-shared keys per role and the mutual HMAC-SHA256 challenge-response.
//!
//! Both sides send a fresh nonce; the agent proves it holds the role's key
//! before the monitor does (so a monitor cannot be fed a fake "healthy"
//! guest by an impostor), then the monitor proves it. Keys never cross
//! the wire.

use std::path::Path;

use hmac::{Hmac, Mac};
use sha2::Sha256;

use crate::wire::{FrameKey, Role, NONCE_LEN};

type HmacSha256 = Hmac<Sha256>;

/// Shortest key accepted, in bytes.
pub const MIN_KEY_BYTES: usize = 16;

/// Errors loading keys.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    /// The file cannot be read.
    #[error("cannot read key file {path}: {source}")]
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
    let s = s.trim();
    if s.len() % 2 != 0 {
        return None;
    }
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok())
        .collect()
}

/// HMAC-SHA256 under `key` of label ‖ first ‖ second ‖ role ‖ VM: the
/// proofs and the frame keys are all this, with their own labels.
fn mac(
    key: &[u8],
    label: &[u8],
    first: &[u8],
    second: &[u8],
    role: Role,
    vm: &str,
) -> [u8; NONCE_LEN] {
    let mut m = HmacSha256::new_from_slice(key).expect("HMAC takes keys of any length");
    m.update(label);
    m.update(first);
    m.update(second);
    m.update(&[role as u8]);
    m.update(vm.as_bytes());
    m.finalize().into_bytes().into()
}

/// The agent's proof over both nonces.
pub fn agent_proof(
    key: &[u8],
    client: &[u8; NONCE_LEN],
    server: &[u8; NONCE_LEN],
    role: Role,
    vm: &str,
) -> [u8; NONCE_LEN] {
    mac(key, b"bd-agent-v1", client, server, role, vm)
}

/// The monitor's proof over both nonces (different label and order).
pub fn monitor_proof(
    key: &[u8],
    client: &[u8; NONCE_LEN],
    server: &[u8; NONCE_LEN],
    role: Role,
    vm: &str,
) -> [u8; NONCE_LEN] {
    mac(key, b"bd-monitor-v1", server, client, role, vm)
}

/// The two frame keys of one connection (docs/wire.md "Frame
/// authentication"): bound to the role key, both nonces, the role and
/// the VM, so no frame of one connection verifies on another.
#[derive(Debug)]
pub struct SessionKeys {
    /// Seals what the monitor sends.
    pub monitor_to_agent: FrameKey,
    /// Seals what the agent sends.
    pub agent_to_monitor: FrameKey,
}

/// Derives a connection's frame keys once both proofs have been checked.
pub fn session_keys(
    key: &[u8],
    client: &[u8; NONCE_LEN],
    server: &[u8; NONCE_LEN],
    role: Role,
    vm: &str,
) -> SessionKeys {
    let derive = |label: &[u8]| mac(key, label, client, server, role, vm);
    SessionKeys {
        monitor_to_agent: FrameKey::new(derive(b"bd-frames-m2a-v2")),
        agent_to_monitor: FrameKey::new(derive(b"bd-frames-a2m-v2")),
    }
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
                Err(e) => tracing::warn!("agent: keeping the keys in force: {e}"),
            }
        }
        s.1.clone()
    }
}

/// Constant-time comparison of a received proof.
pub fn proofs_equal(a: &[u8; NONCE_LEN], b: &[u8; NONCE_LEN]) -> bool {
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Fresh random bytes from the kernel.
pub fn nonce() -> [u8; NONCE_LEN] {
    let mut b = [0u8; NONCE_LEN];
    let mut filled = 0;
    while filled < b.len() {
        // SAFETY: getrandom writes at most the remaining length into our buffer.
        let n = unsafe { libc::getrandom(b[filled..].as_mut_ptr().cast(), b.len() - filled, 0) };
        if n > 0 {
            filled += n.unsigned_abs();
        }
    }
    b
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
    fn proofs_bind_key_nonces_role_and_vm() {
        let (c, s) = ([1u8; 32], [2u8; 32]);
        let p = monitor_proof(b"key-one-16-bytes", &c, &s, Role::Read, "vm1");
        assert!(proofs_equal(
            &p,
            &monitor_proof(b"key-one-16-bytes", &c, &s, Role::Read, "vm1")
        ));
        for other in [
            monitor_proof(b"key-two-16-bytes", &c, &s, Role::Read, "vm1"),
            monitor_proof(b"key-one-16-bytes", &s, &c, Role::Read, "vm1"),
            monitor_proof(b"key-one-16-bytes", &c, &s, Role::Repair, "vm1"),
            monitor_proof(b"key-one-16-bytes", &c, &s, Role::Read, "vm2"),
            agent_proof(b"key-one-16-bytes", &c, &s, Role::Read, "vm1"),
        ] {
            assert!(!proofs_equal(&p, &other));
        }
        assert_ne!(nonce(), nonce());
    }
}
