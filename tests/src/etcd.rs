//! A real etcd (Debian's `etcd-server`) on a private data directory, for
//! the cluster tests and benchmarks; killed on drop.

use std::net::TcpStream;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A running etcd.
#[derive(Debug)]
pub struct Etcd {
    child: Child,
    _dir: tempfile::TempDir,
    /// Its client URL (http://IP:PORT).
    pub url: String,
}

/// The etcd binary, if installed.
pub fn binary() -> Option<PathBuf> {
    ["/usr/bin/etcd", "/usr/local/bin/etcd"]
        .iter()
        .map(PathBuf::from)
        .find(|p| p.exists())
}

fn free_port_on(ip: &str) -> u16 {
    std::net::TcpListener::bind((ip, 0))
        .and_then(|l| l.local_addr())
        .expect("bind an ephemeral port")
        .port()
}

impl Etcd {
    /// Starts etcd serving clients on `ip`; panics if it is not installed
    /// or does not answer within 30 s.
    pub fn start(ip: &str) -> Self {
        let bin = binary().expect("etcd is not installed (tools/deps.sh ensure test)");
        let dir = tempfile::tempdir().expect("etcd data directory");
        let client = free_port_on(ip);
        let peer = free_port_on("127.0.0.1");
        let url = format!("http://{ip}:{client}");
        let peer_url = format!("http://127.0.0.1:{peer}");
        let log = std::fs::File::create(dir.path().join("etcd.log")).expect("etcd log");
        let child = Command::new(bin)
            .arg("--name=t")
            .arg(format!("--data-dir={}", dir.path().join("data").display()))
            .arg(format!("--listen-client-urls={url}"))
            .arg(format!("--advertise-client-urls={url}"))
            .arg(format!("--listen-peer-urls={peer_url}"))
            .arg(format!("--initial-advertise-peer-urls={peer_url}"))
            .arg(format!("--initial-cluster=t={peer_url}"))
            // Heartbeats and elections on a loaded two-core machine.
            .args(["--heartbeat-interval=100", "--election-timeout=1000"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("start etcd");
        let me = Self {
            child,
            _dir: dir,
            url,
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        let addr = format!("{ip}:{client}");
        loop {
            let ok = TcpStream::connect(&addr).is_ok()
                && Command::new(crate::shop::bdctl_bin())
                    .args([
                        "targets",
                        "ls",
                        "--etcd",
                        &me.url,
                        "--etcd-timeout-ms",
                        "1000",
                    ])
                    .stdout(Stdio::null())
                    .stderr(Stdio::null())
                    .status()
                    .is_ok_and(|s| s.success());
            if ok {
                return me;
            }
            assert!(
                Instant::now() < deadline,
                "etcd did not start: {}",
                me.log()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Its log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self._dir.path().join("etcd.log")).unwrap_or_default()
    }
}

impl Drop for Etcd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
