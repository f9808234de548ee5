//! Targets: which VM, where its agent is, and the keys to authenticate.

use std::path::{Path, PathBuf};
use std::time::Duration;

use backdoor_proto::auth::{decode_hex, MIN_KEY_BYTES};
use backdoor_proto::{Client, ClientError, Role};
use serde::Deserialize;

/// Errors describing targets and keys.
#[derive(Debug, thiserror::Error)]
pub enum TargetError {
    /// Not NAME@HOST:PORT.
    #[error("target {0:?} is not NAME@HOST:PORT (e.g. vm1@10.0.0.5:7700)")]
    Syntax(String),
    /// Key file problems.
    #[error("key file {path}: {detail}")]
    Keys { path: String, detail: String },
    /// No key for the role needed.
    #[error("no {role} key for target {target}: add `{role} = \"<hex>\"` to its key file")]
    MissingKey { target: String, role: &'static str },
}

/// Keys as a monitor holds them (same TOML as the agent's key file).
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KeyFile {
    read: Option<String>,
    repair: Option<String>,
    forensic: Option<String>,
}

impl KeyFile {
    /// Loads and checks a key file.
    pub fn load(path: &Path) -> Result<Self, TargetError> {
        let err = |detail: String| TargetError::Keys {
            path: path.display().to_string(),
            detail,
        };
        let text = std::fs::read_to_string(path).map_err(|e| err(e.to_string()))?;
        let k: KeyFile = toml::from_str(&text).map_err(|e| err(e.message().to_owned()))?;
        for (role, key) in [
            ("read", &k.read),
            ("repair", &k.repair),
            ("forensic", &k.forensic),
        ] {
            if let Some(key) = key {
                match decode_hex(key) {
                    Some(b) if b.len() >= MIN_KEY_BYTES => {}
                    _ => {
                        return Err(err(format!(
                            "the {role} key must be at least {MIN_KEY_BYTES} bytes of hex"
                        )))
                    }
                }
            }
        }
        Ok(k)
    }

    fn key(&self, role: Role) -> Option<Vec<u8>> {
        match role {
            Role::Read => self.read.as_deref().and_then(decode_hex),
            Role::Repair => self.repair.as_deref().and_then(decode_hex),
            Role::Forensic => self.forensic.as_deref().and_then(decode_hex),
        }
    }
}

/// How bdctl reads a target's memory once it has authenticated.
#[derive(
    Debug, Clone, Copy, Default, PartialEq, Eq, clap::ValueEnum, Deserialize, serde::Serialize,
)]
#[serde(rename_all = "lowercase")]
pub enum Transport {
    /// RDMA verbs when the agent offers them and this host has a device,
    /// else the soft transport.
    #[default]
    Auto,
    /// Software RDMA over the authenticated TCP connection.
    Soft,
    /// RDMA verbs, or fail.
    Verbs,
}

/// One VM to monitor.
#[derive(Debug, Clone)]
pub struct Target {
    /// The VM's name (what its agent authenticates).
    pub name: String,
    /// host:port of its agent.
    pub addr: String,
    /// Its keys.
    pub keys: KeyFile,
    /// Where the keys came from, for messages.
    pub key_path: PathBuf,
    /// Which data path to use.
    pub transport: Transport,
    /// The local RDMA device for verbs (default: the first).
    pub rdma_device: Option<String>,
}

impl Target {
    /// Parses `NAME@HOST:PORT` with keys from `key_path`.
    pub fn parse(spec: &str, key_path: &Path) -> Result<Self, TargetError> {
        let (name, addr) = spec
            .split_once('@')
            .ok_or_else(|| TargetError::Syntax(spec.to_owned()))?;
        if name.is_empty() || !addr.contains(':') {
            return Err(TargetError::Syntax(spec.to_owned()));
        }
        Ok(Self {
            name: name.to_owned(),
            addr: addr.to_owned(),
            keys: KeyFile::load(key_path)?,
            key_path: key_path.to_owned(),
            transport: Transport::Auto,
            rdma_device: None,
        })
    }

    /// The same target over `transport` (and `rdma_device`).
    pub fn with_transport(mut self, transport: Transport, rdma_device: Option<String>) -> Self {
        self.transport = transport;
        self.rdma_device = rdma_device;
        self
    }

    /// Connects and authenticates as `role`, then moves the data path onto
    /// verbs as the target's transport says. With `auto`, the reason verbs
    /// are not used (if they are not) comes back beside the client.
    pub fn connect_explained(
        &self,
        role: Role,
        timeout: Duration,
    ) -> Result<(Client, Option<String>), ConnectError> {
        let key = self
            .keys
            .key(role)
            .ok_or(ConnectError::Target(TargetError::MissingKey {
                target: self.name.clone(),
                role: role.name(),
            }))?;
        let mut c = Client::connect(self.addr.as_str(), &self.name, role, &key, timeout)
            .map_err(ConnectError::Client)?;
        let why_soft = match self.transport {
            Transport::Soft => Some("--transport soft".to_owned()),
            Transport::Verbs => {
                self.attach_verbs(&mut c).map_err(ConnectError::Verbs)?;
                None
            }
            Transport::Auto => self.attach_verbs(&mut c).err(),
        };
        Ok((c, why_soft))
    }

    /// Connects as [`Target::connect_explained`] does.
    pub fn connect(&self, role: Role, timeout: Duration) -> Result<Client, ConnectError> {
        self.connect_explained(role, timeout).map(|(c, _)| c)
    }

    /// Puts `c`'s data path on verbs, or says why it cannot.
    fn attach_verbs(&self, c: &mut Client) -> Result<(), String> {
        if !c.descriptor().backends.iter().any(|b| b == "verbs") {
            return Err(format!(
                "the agent of {} offers no verbs backend (backends: {})",
                self.name,
                c.descriptor().backends.join(",")
            ));
        }
        #[cfg(feature = "verbs")]
        {
            c.attach_verbs(self.rdma_device.as_deref()).map_err(|e| {
                format!(
                    "cannot connect an RDMA queue pair: {e}",
                    e = backdoor_abi::ErrorChain(&e)
                )
            })
        }
        #[cfg(not(feature = "verbs"))]
        {
            let _ = c;
            Err(
                "this bdctl was built without the verbs backend (cargo build --features verbs)"
                    .into(),
            )
        }
    }
}

/// Connecting failed.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    /// Bad target description or keys.
    #[error(transparent)]
    Target(#[from] TargetError),
    /// The agent could not be reached or refused us.
    #[error(transparent)]
    Client(#[from] ClientError),
    /// `--transport verbs`, and verbs cannot be used.
    #[error("--transport verbs: {0}")]
    Verbs(String),
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn targets_and_key_files_are_checked() {
        let dir = std::env::temp_dir().join(format!("bdctl-keys-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let good = dir.join("good.toml");
        std::fs::write(&good, "read = \"000102030405060708090a0b0c0d0e0f\"\n").unwrap();
        let t = Target::parse("vm1@127.0.0.1:7700", &good).unwrap();
        assert_eq!(
            (t.name.as_str(), t.addr.as_str()),
            ("vm1", "127.0.0.1:7700")
        );
        assert!(t.keys.key(Role::Repair).is_none());
        for bad in ["vm1", "@127.0.0.1:1", "vm1@host"] {
            assert!(
                matches!(Target::parse(bad, &good), Err(TargetError::Syntax(_))),
                "{bad}"
            );
        }
        let short = dir.join("short.toml");
        std::fs::write(&short, "read = \"0001\"\n").unwrap();
        assert!(Target::parse("vm1@h:1", &short).is_err());
        assert!(Target::parse("vm1@h:1", &dir.join("missing.toml")).is_err());
        let err = t
            .connect(Role::Repair, Duration::from_millis(10))
            .unwrap_err();
        assert!(err.to_string().contains("no repair key"), "{err}");
    }
}
