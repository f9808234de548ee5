//! Test harness: builds the test guests, starts `bdvmm` as a child process
//! per VM, captures its console, and talks to its control socket.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex, OnceLock};
use std::thread;
use std::time::{Duration, Instant};

pub mod etcd;
pub mod fake_guest;
pub mod guest_image;
pub mod netns;

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
    /// bdvmm's standard input: the guest's serial console input.
    stdin: Option<std::process::ChildStdin>,
    stdout: Arc<Mutex<Vec<u8>>>,
    stderr: Arc<Mutex<Vec<u8>>>,
    api_sock: PathBuf,
    dir: tempfile::TempDir,
    status: Option<ExitStatus>,
}

impl Vm {
    /// Starts `bdvmm run ARGS --api-sock <tmp>/api.sock --events
    /// <tmp>/events.jsonl`.
    pub fn start(args: &[&str]) -> Self {
        let dir = tempfile::tempdir().expect("temp dir");
        let api_sock = dir.path().join("api.sock");
        let mut child = Command::new(bdvmm_bin())
            .arg("run")
            .args(args)
            .arg("--api-sock")
            .arg(&api_sock)
            .arg("--events")
            .arg(dir.path().join("events.jsonl"))
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start bdvmm");
        let stdin = child.stdin.take();
        let stdout = capture(child.stdout.take().expect("piped stdout"));
        let stderr = capture(child.stderr.take().expect("piped stderr"));
        Self {
            child,
            stdin,
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

    /// Types `text` on the guest's serial console (bdvmm's standard input).
    pub fn send_console(&mut self, text: &str) {
        let stdin = self.stdin.as_mut().expect("bdvmm's stdin is open");
        stdin
            .write_all(text.as_bytes())
            .and_then(|()| stdin.flush())
            .expect("write to bdvmm's stdin");
    }

    /// Closes the guest's console input (bdvmm sees end of file).
    pub fn close_console(&mut self) {
        self.stdin = None;
    }

    /// A scratch directory that lives as long as the VM.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// Console output so far.
    pub fn console(&self) -> String {
        String::from_utf8_lossy(&self.stdout.lock().unwrap()).into_owned()
    }

    /// bdvmm's events so far (its `--events` stream), oldest first.
    pub fn events(&self) -> Vec<serde_json::Value> {
        let text =
            std::fs::read_to_string(self.dir.path().join("events.jsonl")).unwrap_or_default();
        text.lines()
            .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("bad event {l:?}: {e}")))
            .collect()
    }

    /// Waits for an event matching `pred`; panics with every event on timeout.
    pub fn wait_event(
        &self,
        timeout: Duration,
        pred: impl Fn(&serde_json::Value) -> bool,
    ) -> serde_json::Value {
        let deadline = Instant::now() + timeout;
        loop {
            let events = self.events();
            if let Some(e) = events.iter().find(|e| pred(e)) {
                return e.clone();
            }
            assert!(
                Instant::now() < deadline,
                "no such event within {timeout:?}; events: {events:#?}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
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
                    "timed out waiting for {needle:?}\n--- console ---\n{}\n--- stderr ---\n{}{}",
                    self.console(),
                    self.stderr(),
                    self.stuck_report()
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
                    "no complete console line with {needle:?}\n--- console ---\n{}\n--- stderr ---\n{}{}",
                    self.console(),
                    self.stderr(),
                    self.stuck_report()
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
                let report = self.stuck_report();
                let _ = self.child.kill();
                panic!("bdvmm did not exit within {timeout:?}\n--- console ---\n{}\n--- stderr ---\n{}{report}", self.console(), self.stderr());
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

    /// What a failed wait shows besides the console: where the guest's
    /// vCPUs are and whether they still exit (two `vcpus` + `exits`
    /// replies a second apart), and where each bdvmm thread waits in the
    /// host kernel. A guest that stopped printing is then told apart from a
    /// vCPU thread stuck in KVM_RUN or a VMM thread blocked on a lock.
    pub fn stuck_report(&mut self) -> String {
        if self.try_status().is_some() {
            return String::new();
        }
        let mut r = String::from("\n--- bdvmm, still running ---\n");
        for round in 0..2 {
            if round > 0 {
                thread::sleep(Duration::from_secs(1));
            }
            for cmd in ["vcpus", "exits"] {
                let reply = self.try_api_raw(format!("{{\"cmd\":\"{cmd}\"}}").as_bytes());
                r += &format!(
                    "{cmd}: {}\n",
                    reply.unwrap_or_else(|e| format!("<{e}>")).trim_end()
                );
            }
        }
        let task_dir = format!("/proc/{}/task", self.child.id());
        let mut tids: Vec<_> = std::fs::read_dir(&task_dir)
            .map(|d| d.flatten().map(|e| e.path()).collect())
            .unwrap_or_default();
        tids.sort();
        for t in tids {
            let read = |f: &str| std::fs::read_to_string(t.join(f)).unwrap_or_default();
            let stat = read("stat");
            // The state letter follows the parenthesised command name.
            let state = stat.rsplit_once(") ").map_or("?", |(_, rest)| &rest[..1]);
            r += &format!(
                "thread {} {} state {state} wchan {}\n{}",
                t.file_name().unwrap_or_default().to_string_lossy(),
                read("comm").trim_end(),
                read("wchan"),
                read("stack"),
            );
        }
        r
    }

    /// One control-socket request, for diagnostics: errors are returned,
    /// not panicked on.
    fn try_api_raw(&self, line: &[u8]) -> std::io::Result<String> {
        let mut stream = UnixStream::connect(&self.api_sock)?;
        stream.set_read_timeout(Some(Duration::from_secs(5)))?;
        let mut request = line.to_vec();
        request.push(b'\n');
        stream.write_all(&request)?;
        let mut reply = String::new();
        BufReader::new(stream).read_line(&mut reply)?;
        Ok(reply)
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

    /// Where the agent of a VM started with `--backdoor-listen` listens,
    /// from `status`.
    pub fn agent_addr(&self) -> String {
        self.api("status")["agent_addr"]
            .as_str()
            .expect("bdvmm reports its agent address")
            .to_owned()
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

/// Raises this process's open-file limit to its hard limit, and checks
/// that it allows `want` (tests that hold many sockets).
pub fn raise_open_files(want: u64) {
    let files = backdoor_agent::handshake::raise_open_file_limit();
    assert!(
        files >= want,
        "this test needs {want} open files; the limit is {files}"
    );
}

/// Whether this host has hardware virtualization (VMX or SVM).
pub fn has_hardware_virtualization() -> bool {
    let info = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    info.lines()
        .filter(|l| l.starts_with("flags"))
        .any(|l| l.split_whitespace().any(|f| f == "vmx" || f == "svm"))
}

/// Whether this host's CPU is AMD's (so KVM runs guests with SVM).
pub fn host_is_amd() -> bool {
    std::fs::read_to_string("/proc/cpuinfo")
        .unwrap_or_default()
        .contains("AuthenticAMD")
}

/// Whether a test that needs hardware virtualization can run here. If not,
/// it prints `SKIP: <test>: <why>` and the caller returns; under
/// `BDVMM_REQUIRE_LAB=1` (the lab, and CI) it fails instead, because there
/// the test must run (tests/lab/tests.list).
pub fn can_run_with_hardware_virtualization(test: &str) -> bool {
    if has_hardware_virtualization() {
        return true;
    }
    skip(
        test,
        "it needs VMX or SVM; this host's KVM runs guest ring 0 in an instruction emulator \
         (PVM), where Linux stops in early boot. `make lab` runs it inside the lab \
         (tests/lab/lab.sh)",
    );
    false
}

/// Prints `SKIP: <test>: <why>`, or panics where skips are failures
/// (`BDVMM_REQUIRE_LAB=1`). The line also goes to `$BDVMM_SKIP_LOG` if set
/// (tests/run.sh's summary reads it: libtest hides a passing test's output).
pub fn skip(test: &str, why: &str) {
    assert!(
        std::env::var_os("BDVMM_REQUIRE_LAB").is_none_or(|v| v != "1"),
        "{test} cannot run here ({why}), and BDVMM_REQUIRE_LAB=1 makes a skip a failure"
    );
    let line = format!("SKIP: {test}: {why}");
    eprintln!("{line}");
    if let Some(path) = std::env::var_os("BDVMM_SKIP_LOG") {
        if let Ok(mut f) = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
        {
            let _ = writeln!(f, "{line}");
        }
    }
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

    /// The forensic-role key (the VMM's view of all guest RAM).
    pub const FORENSIC: [u8; 16] = [
        32, 33, 34, 35, 36, 37, 38, 39, 40, 41, 42, 43, 44, 45, 46, 47,
    ];

    /// Writes a key file with the read and repair roles into `dir`.
    pub fn write_file(dir: &Path) -> PathBuf {
        let p = dir.join("keys.toml");
        std::fs::write(
            &p,
            format!(
                "read = \"{}\"\nrepair = \"{}\"\n",
                hex::encode(READ),
                hex::encode(REPAIR)
            ),
        )
        .expect("write key file");
        p
    }

    /// Writes a key file with every role, the forensic one too, into `dir`.
    pub fn write_file_with_forensic(dir: &Path) -> PathBuf {
        let p = dir.join("keys-forensic.toml");
        std::fs::write(
            &p,
            format!(
                "read = \"{}\"\nrepair = \"{}\"\nforensic = \"{}\"\n",
                hex::encode(READ),
                hex::encode(REPAIR),
                hex::encode(FORENSIC)
            ),
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
        Self::start_on(dir, keys, "127.0.0.1:0")
    }

    /// As [`AgentProcess::start`], listening for monitors on `listen`.
    pub fn start_on(dir: &Path, keys: &Path, listen: &str) -> Self {
        let vmm_sock = dir.join("agent.sock");
        let mut child = Command::new(bdvmm_bin())
            .args(["agent", "--listen", listen, "--keys"])
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
            // Only a whole announcement: stderr may have arrived mid-line.
            if let Some((a, _)) = text
                .split("monitors connect to ")
                .nth(1)
                .and_then(|r| r.split_once(';'))
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

    /// The agent's pid.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// SIGKILLs the agent and reaps it.
    pub fn kill(mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A TCP port on 127.0.0.1 that was free a moment ago (for a server that
/// must come back on the same address after a restart).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("bind an ephemeral port")
        .port()
}

impl Drop for AgentProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// bdctl against the shop service guest (images/guests/svc.c): shared by
/// the monitor, fault-injection and load tests.
pub mod shop {
    use std::collections::BTreeMap;
    use std::io::{BufRead, BufReader};
    use std::path::{Path, PathBuf};
    use std::process::{Child, Command, Stdio};
    use std::sync::mpsc;
    use std::time::{Duration, Instant};

    use backdoor_agent::{Client, Role};

    use crate::{keys, Vm};

    /// Generous timeout for anything a loaded CI machine may be slow at.
    pub const T: Duration = Duration::from_secs(60);

    /// svc's control commands (the "control" REPAIR hook, word 0).
    pub mod cmd {
        /// Hang spinning with interrupts off.
        pub const SPIN: u64 = 1;
        /// Hang halted with interrupts off.
        pub const HALT: u64 = 2;
        /// Reset through the i8042.
        pub const RESET: u64 = 3;
        /// Scribble over session 2's newest record.
        pub const SCRIBBLE: u64 = 4;
        /// Die mid-write of session 1's next record.
        pub const TEAR: u64 = 5;
        /// Triple-fault.
        pub const TRIPLE_FAULT: u64 = 6;
        /// Try to change the sealed backdoor.
        pub const TAMPER: u64 = 7;
        /// Try 100,000 times.
        pub const TAMPER_FLOOD: u64 = 8;
        /// A wild write over the progress box's header.
        pub const SCRIBBLE_PBOX: u64 = 9;
        /// Reset into a boot that registers nothing.
        pub const MUTE_RESET: u64 = 10;
    }

    /// The `bdctl` binary next to `bdvmm`.
    pub fn bdctl_bin() -> PathBuf {
        crate::bdvmm_bin().with_file_name("bdctl")
    }

    /// Runs bdctl to completion: (code, stdout, stderr).
    pub fn bdctl(args: &[&str]) -> (Option<i32>, String, String) {
        let out = Command::new(bdctl_bin())
            .args(args)
            .output()
            .expect("run bdctl");
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    }

    /// A running shop guest and where its backdoor is served.
    #[derive(Debug)]
    pub struct Shop {
        /// The VM.
        pub vm: Vm,
        /// The agent's address.
        pub addr: String,
        /// The key file (both roles).
        pub keys: PathBuf,
        /// Scratch directory.
        pub dir: tempfile::TempDir,
    }

    impl Shop {
        /// `shop1@addr`.
        pub fn target(&self) -> String {
            format!("shop1@{}", self.addr)
        }

        /// Writes `cmd` into the guest's control hook.
        pub fn control(&self, cmd: u64) {
            control(&self.addr, cmd);
        }
    }

    /// Writes `cmd` into the control hook of the shop served at `addr`.
    pub fn control(addr: &str, cmd: u64) {
        let mut c = Client::connect(addr, "shop1", Role::Repair, &keys::REPAIR, T).unwrap();
        let id = c.descriptor().hook("control").expect("control hook").id;
        c.write(id, 0, &cmd.to_le_bytes()).unwrap();
    }

    /// The shop service in ring 0 (so it can hang with interrupts off), with the in-process agent.
    pub fn shop(extra: &[&str]) -> Shop {
        let dir = tempfile::tempdir().unwrap();
        let k = keys::write_file(dir.path());
        let mut args = vec![
            "--name",
            "shop1",
            "--backdoor-listen",
            "127.0.0.1:0",
            "--backdoor-keys",
            k.to_str().unwrap(),
        ];
        args.extend_from_slice(extra);
        let mut vm = Vm::test_guest("svc", 0, &args);
        vm.wait_line("svc: serving sessions", T);
        let addr = vm.agent_addr();
        Shop {
            vm,
            addr,
            keys: k,
            dir,
        }
    }

    /// `bdctl watch --json` in the background; its events arrive on a channel.
    #[derive(Debug)]
    pub struct Watch {
        /// The bdctl process.
        pub child: Child,
        events: mpsc::Receiver<(Instant, serde_json::Value)>,
    }

    impl Watch {
        /// Starts `bdctl watch --json --key-file KEYS TARGET ARGS`.
        pub fn start(target: &str, keys: &Path, args: &[&str]) -> Self {
            let mut cmd = Command::new(bdctl_bin());
            cmd.args(["watch", "--json", "--key-file"])
                .arg(keys)
                .arg(target)
                .args(args);
            Self::spawn(cmd)
        }

        /// Starts `cmd`, a `bdctl watch --json` (perhaps under a wrapper).
        pub fn spawn(mut cmd: Command) -> Self {
            let mut child = cmd
                .stdout(Stdio::piped())
                .stderr(Stdio::inherit())
                .spawn()
                .expect("start bdctl watch");
            let out = child.stdout.take().unwrap();
            let (tx, events) = mpsc::channel();
            std::thread::spawn(move || {
                for line in BufReader::new(out).lines().map_while(Result::ok) {
                    let v: serde_json::Value = serde_json::from_str(&line)
                        .unwrap_or_else(|e| panic!("bad event {line:?}: {e}"));
                    if tx.send((Instant::now(), v)).is_err() {
                        break;
                    }
                }
            });
            Self { child, events }
        }

        /// Waits for an event matching `pred`; panics with everything seen on timeout.
        pub fn wait(
            &self,
            what: &str,
            timeout: Duration,
            pred: impl Fn(&serde_json::Value) -> bool,
        ) -> (Instant, serde_json::Value) {
            let deadline = Instant::now() + timeout;
            let mut seen = Vec::new();
            loop {
                let left = deadline.saturating_duration_since(Instant::now());
                match self.events.recv_timeout(left) {
                    Ok((t, v)) if pred(&v) => return (t, v),
                    Ok((_, v)) => seen.push(v),
                    Err(_) => panic!("no {what} event within {timeout:?}; saw {seen:?}"),
                }
            }
        }

        /// Waits for verdict `v`.
        pub fn verdict(&self, v: &'static str, timeout: Duration) -> (Instant, serde_json::Value) {
            self.wait(v, timeout, move |e| {
                e["event"] == "verdict" && e["verdict"] == v
            })
        }

        /// The next event, if one arrives within `d` (zero: only one
        /// already here).
        pub fn next(&self, d: Duration) -> Option<(Instant, serde_json::Value)> {
            self.events.recv_timeout(d).ok()
        }

        /// Every event that arrives within `d`.
        pub fn collect(&self, d: Duration) -> Vec<serde_json::Value> {
            let deadline = Instant::now() + d;
            let mut out = Vec::new();
            while let Ok((_, v)) = self
                .events
                .recv_timeout(deadline.saturating_duration_since(Instant::now()))
            {
                out.push(v);
            }
            out
        }

        /// bdctl's pid.
        pub fn pid(&self) -> u32 {
            self.child.id()
        }
    }

    impl Drop for Watch {
        fn drop(&mut self) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }

    /// `bdctl extract TARGET --out OUT`: the extraction and bdctl's stderr.
    pub fn extract(target: &str, keys: &Path, out: &Path) -> (serde_json::Value, String) {
        let (code, _, err) = bdctl(&[
            "extract",
            target,
            "--key-file",
            keys.to_str().unwrap(),
            "--out",
            out.to_str().unwrap(),
        ]);
        assert_eq!(code, Some(0), "{err}");
        (
            serde_json::from_str(&std::fs::read_to_string(out).unwrap()).unwrap(),
            err,
        )
    }

    /// The shop's sessions 1..=3, each consistent with its own arithmetic.
    pub fn assert_three_consistent_sessions(x: &serde_json::Value) {
        let sessions = x["sessions"].as_array().unwrap();
        let ids: Vec<u64> = sessions
            .iter()
            .map(|s| s["session_id"].as_u64().unwrap())
            .collect();
        assert_eq!(ids, vec![1, 2, 3], "{x}");
        for s in sessions {
            let (id, stage) = (
                s["session_id"].as_u64().unwrap(),
                s["stage"].as_u64().unwrap(),
            );
            let total = id * stage * (stage + 1) / 2;
            assert_eq!(
                s["payload_text"].as_str().unwrap(),
                format!("items={stage} total={total}"),
                "{s}"
            );
        }
    }

    /// The session counters (owner → value) of the shop served at `addr`,
    /// read over the backdoor. svc saves a session's record before it
    /// bumps its counter, so a counter's value is a stage the guest has
    /// committed.
    pub fn session_counters(addr: &str) -> BTreeMap<u64, u64> {
        let mut c = Client::connect(addr, "shop1", Role::Read, &keys::READ, T).unwrap();
        let h = c
            .descriptor()
            .hook("progress")
            .expect("progress hook")
            .clone();
        let b = c.read(h.id, 0, u32::try_from(h.len).unwrap()).unwrap();
        let line = backdoor_abi::LINE;
        b[line..]
            .chunks_exact(line)
            .map(|l| backdoor_abi::Counter::from_bytes(l.try_into().unwrap()))
            .filter(|c| {
                backdoor_abi::decode_name(&c.name).is_some_and(|n| n.starts_with("session-"))
                    && c.state() == Some(backdoor_abi::CounterState::Active)
            })
            .map(|c| (u64::from(c.owner), c.value))
            .collect()
    }

    /// Waits until every active session of the shop at `addr` has
    /// committed at least one step, so a fault never hits an idle start.
    pub fn wait_sessions_advance(addr: &str) {
        let deadline = Instant::now() + T;
        loop {
            let c = session_counters(addr);
            if c.len() >= 3 && c.values().all(|&v| v > 0) {
                return;
            }
            assert!(Instant::now() < deadline, "sessions never advanced: {c:?}");
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Nothing the guest committed is lost: every session whose counter
    /// says it committed stage S is extracted at stage S or later (svc
    /// saves before it bumps), consistent with its own arithmetic.
    pub fn assert_nothing_lost(x: &serde_json::Value, committed: &BTreeMap<u64, u64>) {
        assert_three_consistent_sessions(x);
        for s in x["sessions"].as_array().unwrap() {
            let id = s["session_id"].as_u64().unwrap();
            let stage = s["stage"].as_u64().unwrap();
            let c = committed.get(&id).copied().unwrap_or(0);
            assert!(
                stage == c || stage == c + 1,
                "session {id}: the guest committed stage {c}, extraction has {stage}: {x}"
            );
        }
        assert!(
            committed.values().any(|&v| v > 0),
            "the sessions never advanced: {committed:?}"
        );
    }
}

/// Checking a C header of `guest-driver/include` against its Rust mirror:
/// gcc compiles a program that includes it and prints the value of every
/// expression (a size, an offset, a constant), which the test compares
/// with what Rust says.
pub mod c_header {
    use std::collections::BTreeMap;
    use std::process::Command;

    /// The value of each of `exprs` in a program compiled with
    /// `gcc -std=STD -Wall -Wextra -Werror` after `prelude` (its
    /// `#include`s); panics if the program does not compile cleanly.
    pub fn values(std: &str, prelude: &str, exprs: &[&str]) -> BTreeMap<String, u64> {
        let dir = tempfile::tempdir().expect("temp dir");
        let mut c = format!("#include <stdio.h>\n{prelude}\nint main(void)\n{{\n");
        for e in exprs {
            // {e:?}: Rust's escaping is C's for the ASCII of an expression.
            c += &format!("\tprintf(\"%s=%llu\\n\", {e:?}, (unsigned long long)({e}));\n");
        }
        c += "\treturn 0;\n}\n";
        let src = dir.path().join("layout.c");
        let bin = dir.path().join("layout");
        std::fs::write(&src, c).expect("write the C program");
        let out = Command::new("gcc")
            .arg(format!("-std={std}"))
            .args(["-Wall", "-Wextra", "-Werror", "-I"])
            .arg(super::repo_root().join("guest-driver/include"))
            .arg(&src)
            .arg("-o")
            .arg(&bin)
            .output()
            .expect("run gcc");
        assert!(
            out.status.success(),
            "the header does not compile cleanly:\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let run = Command::new(&bin).output().expect("run the C program");
        String::from_utf8(run.stdout)
            .expect("utf-8 output")
            .lines()
            .filter_map(|l| {
                let (k, v) = l.rsplit_once('=')?;
                Some((k.to_owned(), v.parse().expect("a number")))
            })
            .collect()
    }

    /// Compiles `prelude` with `exp`'s expressions and panics listing every
    /// one whose C value differs from the Rust value beside it.
    pub fn assert_agree(what: &str, std: &str, prelude: &str, exp: &[(&str, u64)]) {
        let exprs: Vec<&str> = exp.iter().map(|(e, _)| *e).collect();
        let c = values(std, prelude, &exprs);
        let mismatches: Vec<String> = exp
            .iter()
            .filter(|(e, v)| c.get(*e) != Some(v))
            .map(|(e, v)| format!("{e}: C says {:?}, Rust says {v}", c.get(*e)))
            .collect();
        assert!(
            mismatches.is_empty(),
            "{what} mismatches:\n{}",
            mismatches.join("\n")
        );
    }
}
