//! Test harness: bdkv as a child process over a host state file, and a
//! backdoor agent serving that file to bdctl the way bdvmm serves a
//! guest's RAM (the file is laid out like the guest's hooked memory).

#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use backdoor_abi::{HookKind, PERM_ATOMIC, PERM_READ, PERM_WRITE};
use backdoor_agent::auth::Keys;
use backdoor_agent::{Agent, DescriptorSource, GuestMemory, PushedDescriptor, RamRange};
use backdoor_dev::{Descriptor, Hook};
use backdoor_guest::HostLayout;
use bdkv::client::Connection;

/// A running bdkv.
pub struct Server {
    child: Child,
    pub addr: SocketAddr,
    log: Arc<Mutex<Vec<String>>>,
}

impl Server {
    /// Starts `bdkv serve` on `state` with `extra` arguments and waits
    /// until it listens.
    pub fn start(state: &Path, extra: &[&str]) -> Self {
        let mut child = Command::new(env!("CARGO_BIN_EXE_bdkv"))
            .args(["serve", "--listen", "127.0.0.1:0", "--state-file"])
            .arg(state)
            .args(extra)
            .env("BDKV_LOG", "info")
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start bdkv");
        let log = Arc::new(Mutex::new(Vec::new()));
        {
            let log = log.clone();
            let err = child.stderr.take().unwrap();
            std::thread::spawn(move || {
                for l in BufReader::new(err).lines().map_while(Result::ok) {
                    log.lock().unwrap().push(l);
                }
            });
        }
        let mut out = BufReader::new(child.stdout.take().unwrap());
        let mut first = String::new();
        out.read_line(&mut first).unwrap();
        let addr = first
            .trim()
            .strip_prefix("bdkv listening on ")
            .unwrap_or_else(|| {
                std::thread::sleep(Duration::from_millis(200));
                panic!(
                    "bdkv did not start: {first:?}\n{}",
                    log.lock().unwrap().join("\n")
                )
            })
            .parse()
            .unwrap();
        Self { child, addr, log }
    }

    /// A new connection.
    pub fn connect(&self) -> Connection {
        Connection::open(self.addr).unwrap()
    }

    /// SIGKILL: no chance to clean up, as in a crash.
    pub fn kill9(mut self) {
        self.child.kill().unwrap();
        self.child.wait().unwrap();
    }

    /// Whether it still runs.
    pub fn alive(&mut self) -> bool {
        self.child.try_wait().unwrap().is_none()
    }

    /// Its log so far.
    pub fn log(&self) -> String {
        self.log.lock().unwrap().join("\n")
    }

    /// Waits until the log contains `what`.
    pub fn wait_log(&self, what: &str) -> String {
        let end = Instant::now() + Duration::from_secs(10);
        while Instant::now() < end {
            if self.log().contains(what) {
                return self.log();
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        panic!("no {what:?} in the log:\n{}", self.log());
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `OK session <id>` → id.
pub fn hello(c: &mut Connection) -> u64 {
    c.ok("HELLO")
        .unwrap()
        .strip_prefix("session ")
        .unwrap()
        .parse()
        .unwrap()
}

/// `OK version <v>` → v.
pub fn version(reply: &str) -> u64 {
    reply.strip_prefix("version ").unwrap().parse().unwrap()
}

pub const READ_KEY: &str = "00112233445566778899aabbccddeeff";
pub const REPAIR_KEY: &str = "ffeeddccbbaa99887766554433221100";

/// An agent serving a host state file as guest "vm": progress box,
/// state box ("sessions") and inbox ("inbox", a REPAIR hook).
pub struct Served {
    pub target: String,
    pub key_file: PathBuf,
    pub layout: HostLayout,
}

pub fn serve_file(vm: &str, state: &Path, dir: &Path) -> Served {
    let layout = HostLayout::read(state).unwrap();
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(state)
        .unwrap();
    let mem = GuestMemory::map(
        file,
        vec![RamRange {
            guest_addr: 0,
            len: layout.file_len,
            file_offset: 0,
        }],
    )
    .unwrap();
    let mut hooks = vec![
        Hook {
            id: 1,
            gpa: layout.pbox_offset,
            len: layout.pbox_len,
            kind: HookKind::ProgressBox,
            perms: PERM_READ,
            name: "progress".into(),
        },
        Hook {
            id: 2,
            gpa: layout.sbox_offset,
            len: layout.sbox_len,
            kind: HookKind::StateBox,
            perms: PERM_READ,
            name: "sessions".into(),
        },
    ];
    if layout.inbox_len > 0 {
        hooks.push(Hook {
            id: 3,
            gpa: layout.inbox_offset,
            len: layout.inbox_len,
            kind: HookKind::Repair,
            perms: PERM_READ | PERM_WRITE | PERM_ATOMIC,
            name: "inbox".into(),
        });
    }
    let desc = Descriptor {
        generation: 1,
        sealed: true,
        tamper_count: 0,
        hooks,
    };
    let keys_text = format!("read = \"{READ_KEY}\"\nrepair = \"{REPAIR_KEY}\"\n");
    let key_file = dir.join(format!("{vm}-keys.toml"));
    std::fs::write(&key_file, &keys_text).unwrap();
    let keys = Keys::parse(&keys_text, "test").unwrap();
    let source: Arc<dyn DescriptorSource> = Arc::new(PushedDescriptor::new(desc));
    let agent = Arc::new(Agent::new(vm.into(), keys, Arc::new(mem), source));
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    agent.serve(l).unwrap();
    Served {
        target: format!("{vm}@{addr}"),
        key_file,
        layout,
    }
}

/// Runs a bdctl command through bdctl's own CLI parser and code.
pub fn bdctl(args: &[&str]) -> Result<(), bdctl::Error> {
    use bdctl::cli::{Cli, Command};
    use clap::Parser;
    let cli = Cli::try_parse_from(std::iter::once("bdctl").chain(args.iter().copied()))
        .expect("bdctl arguments");
    match cli.command {
        Command::Extract(a) => bdctl::commands::extract::run(&a).map(|_| ()),
        Command::Resume(a) => bdctl::commands::resume::run(&a).map(|_| ()),
        other => panic!("not used here: {other:?}"),
    }
}
