//! Test harness: builds the test guests, starts `bdvmm` as a child process
//! per VM, captures its console, and talks to its control socket.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex, OnceLock};
use std::thread;
use std::time::{Duration, Instant};

/// The repository's root.
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ has a parent")
        .to_owned()
}

/// The `bdvmm` binary: `$BDVMM_BIN`, else the one next to this test's
/// target directory (`cargo build -p bdvmm`, which `make test` runs first).
pub fn bdvmm_bin() -> PathBuf {
    if let Some(p) = std::env::var_os("BDVMM_BIN") {
        return PathBuf::from(p);
    }
    let exe = std::env::current_exe().expect("test binary path");
    // target/<profile>/deps/<test> → target/<profile>/bdvmm
    let bin = exe
        .parent()
        .and_then(Path::parent)
        .map(|d| d.join("bdvmm"))
        .expect("target dir");
    assert!(
        bin.exists(),
        "{} is missing: build it first with `cargo build -p bdvmm` (`make test` does)",
        bin.display()
    );
    bin
}

/// Path of a test guest, building all of them once per test process.
pub fn guest(name: &str) -> PathBuf {
    static BUILT: OnceLock<()> = OnceLock::new();
    BUILT.get_or_init(|| {
        let out = Command::new("make")
            .args(["-s", "-C"])
            .arg(repo_root().join("images"))
            .arg("guests")
            .output()
            .expect("run make");
        assert!(
            out.status.success(),
            "building the test guests failed:\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
    });
    let p = repo_root().join("images/build").join(format!("{name}.elf"));
    assert!(p.exists(), "no test guest {}", p.display());
    p
}

/// A running bdvmm with its captured output.
#[derive(Debug)]
pub struct Vm {
    child: Child,
    stdout: Arc<Mutex<Vec<u8>>>,
    stderr: Arc<Mutex<Vec<u8>>>,
    api_sock: PathBuf,
    dir: tempfile::TempDir,
    status: Option<ExitStatus>,
}

impl Vm {
    /// Starts `bdvmm run ARGS --api-sock <tmp>/api.sock`.
    pub fn start(args: &[&str]) -> Self {
        let dir = tempfile::tempdir().expect("temp dir");
        let api_sock = dir.path().join("api.sock");
        let mut child = Command::new(bdvmm_bin())
            .arg("run")
            .args(args)
            .arg("--api-sock")
            .arg(&api_sock)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start bdvmm");
        let stdout = capture(child.stdout.take().expect("piped stdout"));
        let stderr = capture(child.stderr.take().expect("piped stderr"));
        Self {
            child,
            stdout,
            stderr,
            api_sock,
            dir,
            status: None,
        }
    }

    /// Starts a test guest: `--test-guest <guest> --ring <ring> EXTRA`.
    pub fn test_guest(name: &str, ring: u8, extra: &[&str]) -> Self {
        let g = guest(name);
        let ring = ring.to_string();
        let mut args = vec![
            "--test-guest",
            g.to_str().expect("utf-8 path"),
            "--ring",
            &ring,
        ];
        if !extra.contains(&"--mem") {
            args.extend_from_slice(&["--mem", "64M"]);
        }
        args.extend_from_slice(extra);
        Self::start(&args)
    }

    /// A scratch directory that lives as long as the VM.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// Console output so far.
    pub fn console(&self) -> String {
        String::from_utf8_lossy(&self.stdout.lock().unwrap()).into_owned()
    }

    /// bdvmm's own messages so far.
    pub fn stderr(&self) -> String {
        String::from_utf8_lossy(&self.stderr.lock().unwrap()).into_owned()
    }

    /// Waits until the console contains `needle`; panics with the output on timeout.
    pub fn wait_console(&mut self, needle: &str, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        while !self.console().contains(needle) {
            if Instant::now() > deadline {
                panic!(
                    "timed out waiting for {needle:?}\n--- console ---\n{}\n--- stderr ---\n{}",
                    self.console(),
                    self.stderr()
                );
            }
            if let Some(st) = self.try_status() {
                thread::sleep(Duration::from_millis(50));
                if !self.console().contains(needle) {
                    panic!("bdvmm exited ({st}) before printing {needle:?}\n--- console ---\n{}\n--- stderr ---\n{}", self.console(), self.stderr());
                }
            }
            thread::sleep(Duration::from_millis(10));
        }
    }

    /// Waits until a complete (newline-terminated) console line contains
    /// `needle`, and returns that line.
    pub fn wait_line(&mut self, needle: &str, timeout: Duration) -> String {
        let deadline = Instant::now() + timeout;
        loop {
            let console = self.console();
            let complete = &console[..console.rfind('\n').map_or(0, |i| i + 1)];
            if let Some(line) = complete.lines().find(|l| l.contains(needle)) {
                return line.to_owned();
            }
            if Instant::now() > deadline || self.try_status().is_some() {
                thread::sleep(Duration::from_millis(50));
                panic!(
                    "no complete console line with {needle:?}\n--- console ---\n{}\n--- stderr ---\n{}",
                    self.console(),
                    self.stderr()
                );
            }
            thread::sleep(Duration::from_millis(10));
        }
    }

    fn try_status(&mut self) -> Option<ExitStatus> {
        if self.status.is_none() {
            self.status = self.child.try_wait().expect("wait bdvmm");
        }
        self.status
    }

    /// Waits for bdvmm to exit and returns its exit code (None if killed by a signal).
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<i32> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(st) = self.try_status() {
                // Let the capture threads drain the pipes.
                thread::sleep(Duration::from_millis(50));
                return st.code();
            }
            if Instant::now() > deadline {
                let _ = self.child.kill();
                panic!("bdvmm did not exit within {timeout:?}\n--- console ---\n{}\n--- stderr ---\n{}", self.console(), self.stderr());
            }
            thread::sleep(Duration::from_millis(10));
        }
    }

    /// Sends `sig` to bdvmm.
    pub fn signal(&self, sig: i32) {
        // SAFETY: kill(2) on our own child's pid.
        unsafe { libc::kill(self.child.id() as i32, sig) };
    }

    /// bdvmm's pid.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Sends one raw line to the control socket and returns the reply line.
    pub fn api_raw(&self, line: &[u8]) -> String {
        let deadline = Instant::now() + Duration::from_secs(10);
        let mut stream = loop {
            match UnixStream::connect(&self.api_sock) {
                Ok(s) => break s,
                Err(e) if Instant::now() < deadline => {
                    let _ = e;
                    thread::sleep(Duration::from_millis(10));
                }
                Err(e) => panic!("cannot connect to {}: {e}", self.api_sock.display()),
            }
        };
        stream
            .set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        let mut request = line.to_vec();
        request.push(b'\n');
        // bdvmm may answer an oversized request and close before reading it
        // all: the write then fails, but the reply is still there to read.
        let _ = stream.write_all(&request);
        let mut reply = String::new();
        BufReader::new(stream).read_line(&mut reply).unwrap();
        reply
    }

    /// Sends `{"cmd": cmd}` and returns the parsed reply.
    pub fn api(&self, cmd: &str) -> serde_json::Value {
        let reply = self.api_raw(format!("{{\"cmd\":\"{cmd}\"}}").as_bytes());
        serde_json::from_str(&reply).unwrap_or_else(|e| panic!("bad reply {reply:?}: {e}"))
    }

    /// Sum of one exit reason over all vCPUs, from `status`.
    pub fn exits(&self, reason: &str) -> u64 {
        let st = self.api("exits");
        st["exits"]
            .as_array()
            .expect("exits array")
            .iter()
            .map(|v| v[reason].as_u64().expect("counter"))
            .sum()
    }
}

impl Drop for Vm {
    fn drop(&mut self) {
        if self.try_status().is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

fn capture<R: Read + Send + 'static>(mut r: R) -> Arc<Mutex<Vec<u8>>> {
    let buf = Arc::new(Mutex::new(Vec::new()));
    let b = buf.clone();
    thread::spawn(move || {
        let mut chunk = [0u8; 4096];
        while let Ok(n) = r.read(&mut chunk) {
            if n == 0 {
                break;
            }
            b.lock().unwrap().extend_from_slice(&chunk[..n]);
        }
    });
    buf
}

/// Runs `bdvmm ARGS` to completion (for argument errors) and returns (code, stderr).
pub fn run_bdvmm(args: &[&str]) -> (Option<i32>, String) {
    let out = Command::new(bdvmm_bin())
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("run bdvmm");
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Whether this host has hardware virtualization (VMX or SVM).
pub fn has_hardware_virtualization() -> bool {
    let info = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    info.lines()
        .filter(|l| l.starts_with("flags"))
        .any(|l| l.split_whitespace().any(|f| f == "vmx" || f == "svm"))
}

/// Exit statuses documented in vmm/src/exit_code.rs.
pub mod exit {
    /// Clean power-off or API stop.
    pub const OK: i32 = 0;
    /// bdvmm error.
    pub const ERROR: i32 = 1;
    /// Usage error.
    pub const USAGE: i32 = 2;
    /// Guest powered off with a non-zero status.
    pub const GUEST_FAILED: i32 = 10;
    /// Triple fault.
    pub const TRIPLE_FAULT: i32 = 11;
    /// Guest reset.
    pub const RESET: i32 = 12;
    /// KVM error.
    pub const KVM_ERROR: i32 = 13;
    /// SIGINT.
    pub const INTERRUPTED: i32 = 130;
    /// SIGTERM.
    pub const TERMINATED: i32 = 143;
}

/// Key material for backdoor tests: a key file and the raw keys.
pub mod keys {
    use std::path::{Path, PathBuf};

    /// The read-role key.
    pub const READ: [u8; 16] = [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15];
    /// The repair-role key.
    pub const REPAIR: [u8; 16] = [
        16, 17, 18, 19, 20, 21, 22, 23, 24, 25, 26, 27, 28, 29, 30, 31,
    ];

    fn hex(k: &[u8]) -> String {
        k.iter().map(|b| format!("{b:02x}")).collect()
    }

    /// Writes a key file with both roles into `dir`.
    pub fn write_file(dir: &Path) -> PathBuf {
        let p = dir.join("keys.toml");
        std::fs::write(
            &p,
            format!("read = \"{}\"\nrepair = \"{}\"\n", hex(&READ), hex(&REPAIR)),
        )
        .expect("write key file");
        p
    }
}

/// A separate `bdvmm agent` process.
#[derive(Debug)]
pub struct AgentProcess {
    child: Child,
    stderr: Arc<Mutex<Vec<u8>>>,
    /// Where monitors connect.
    pub addr: String,
    /// Where a VMM connects.
    pub vmm_sock: PathBuf,
}

impl AgentProcess {
    /// Starts `bdvmm agent` with keys from `keys` and sockets in `dir`.
    pub fn start(dir: &Path, keys: &Path) -> Self {
        let vmm_sock = dir.join("agent.sock");
        let mut child = Command::new(bdvmm_bin())
            .args(["agent", "--listen", "127.0.0.1:0", "--keys"])
            .arg(keys)
            .arg("--vmm-sock")
            .arg(&vmm_sock)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start bdvmm agent");
        let stderr = capture(child.stderr.take().expect("piped stderr"));
        let deadline = Instant::now() + Duration::from_secs(10);
        let addr = loop {
            let text = String::from_utf8_lossy(&stderr.lock().unwrap()).into_owned();
            if let Some(a) = text
                .split("monitors connect to ")
                .nth(1)
                .and_then(|r| r.split(';').next())
            {
                break a.to_owned();
            }
            assert!(Instant::now() < deadline, "agent did not start: {text}");
            thread::sleep(Duration::from_millis(10));
        };
        Self {
            child,
            stderr,
            addr,
            vmm_sock,
        }
    }

    /// The agent's messages so far.
    pub fn stderr(&self) -> String {
        String::from_utf8_lossy(&self.stderr.lock().unwrap()).into_owned()
    }
}

impl Drop for AgentProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
