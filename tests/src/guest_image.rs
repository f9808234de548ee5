//! The Linux guest image (`images/build-image.sh`: Debian's kernel,
//! `backdoor.ko`, a busybox initramfs running `bdkv`) and a primary guest
//! of it, for the tests and for bdbench's lab section.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use crate::shop::Watch;
use crate::{repo_root, AgentProcess, Vm};

/// How long a primary may take to boot and get its sessions ready: under
/// the lab's software emulator a Linux boot takes 20-70 s. Not a measurement.
const BOOT_T: Duration = Duration::from_secs(300);

/// What build-image.sh prints.
#[derive(Debug, Clone)]
pub struct Image {
    /// `RELEASE=`.
    pub release: String,
    /// `KERNEL=`.
    pub kernel: PathBuf,
    /// `VMLINUX=`.
    pub vmlinux: PathBuf,
    /// `INITRD=`.
    pub initrd: PathBuf,
    /// `MODULE=`.
    pub module: PathBuf,
    /// `CMDLINE=`.
    pub cmdline: String,
}

/// Runs images/build-image.sh ARGS and returns its stdout.
pub fn run_build_image(args: &[&str]) -> String {
    let out = Command::new(repo_root().join("images/build-image.sh"))
        .args(args)
        .output()
        .expect("run images/build-image.sh");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "images/build-image.sh {args:?} failed (it needs apt-get with Debian's package lists, \
         gcc-12, make, python3 and cargo):\n{stderr}"
    );
    String::from_utf8(out.stdout).expect("utf-8 output")
}

/// Runs images/build-image.sh ARGS (cached between runs) and parses its
/// output. In the lab the image was built on the host beforehand
/// (`$BDVMM_IMAGE_MANIFEST` holds what the script printed there); the
/// script then only says the command line for ARGS.
pub fn build_image(args: &[&str]) -> Image {
    let stdout = match std::env::var_os("BDVMM_IMAGE_MANIFEST") {
        Some(manifest) => {
            let built = std::fs::read_to_string(manifest).expect("the lab's image manifest");
            let mut with = args.to_vec();
            with.push("--cmdline-only");
            let cmdline = run_build_image(&with);
            assert!(cmdline.starts_with("CMDLINE=") && cmdline.lines().count() == 1);
            built
                .lines()
                .filter(|l| !l.starts_with("CMDLINE="))
                .chain(cmdline.lines())
                .map(|l| format!("{l}\n"))
                .collect()
        }
        None => run_build_image(args),
    };
    let kv: BTreeMap<&str, &str> = stdout
        .lines()
        .map(|l| {
            l.split_once('=')
                .unwrap_or_else(|| panic!("not KEY=VALUE: {l:?} in\n{stdout}"))
        })
        .collect();
    let keys: Vec<&str> = stdout
        .lines()
        .filter_map(|l| l.split_once('=').map(|(k, _)| k))
        .collect();
    assert_eq!(
        keys,
        [
            "KERNEL_RELEASE",
            "KERNEL",
            "VMLINUX",
            "INITRD",
            "MODULE",
            "MODULES",
            "KDIR",
            "CMDLINE"
        ],
        "exactly the documented lines, in order:\n{stdout}"
    );
    let path = |k: &str| {
        let p = PathBuf::from(kv[k]);
        assert!(
            p.is_absolute() && p.is_file(),
            "{k}={} is no file",
            p.display()
        );
        p
    };
    let kdir = PathBuf::from(kv["KDIR"]);
    assert!(
        kdir.join("Module.symvers").is_file() && kdir.join("Makefile").is_file(),
        "KDIR={} is a kernel headers tree",
        kdir.display()
    );
    Image {
        release: kv["KERNEL_RELEASE"].to_owned(),
        kernel: path("KERNEL"),
        vmlinux: path("VMLINUX"),
        initrd: path("INITRD"),
        module: path("MODULE"),
        cmdline: kv["CMDLINE"].to_owned(),
    }
}

/// The primary image, built once per test process.
pub fn primary() -> &'static Image {
    static IMAGE: OnceLock<Image> = OnceLock::new();
    IMAGE.get_or_init(|| build_image(&[]))
}

/// `BDIMG: session <id> version <v> keys <k>` lines of the primary's console.
pub fn sessions_on_console(console: &str) -> Vec<(u64, u64, u64)> {
    console
        .lines()
        .filter_map(|l| l.split_once("BDIMG: session ").map(|(_, r)| r))
        .map(|r| {
            let w: Vec<&str> = r.split_whitespace().collect();
            assert!(
                w.len() == 5 && w[1] == "version" && w[3] == "keys",
                "bad session line {r:?}"
            );
            let n = |s: &str| s.parse::<u64>().unwrap_or_else(|_| panic!("{r:?}"));
            (n(w[0]), n(w[2]), n(w[4]))
        })
        .collect()
}

/// A primary guest of the image with its sessions ready, its backdoor
/// served by a separate agent (as in production).
#[derive(Debug)]
pub struct Primary {
    /// The VM.
    pub vm: Vm,
    /// The agent serving its backdoor.
    pub agent: AgentProcess,
    /// (id, version, keys) of each session bdkv created.
    pub sessions: Vec<(u64, u64, u64)>,
    /// `kv1@ADDR`.
    pub target: String,
}

/// `bdvmm run` arguments that boot `image`'s kernel and command line with
/// `initrd` as guest kv1 (1 GiB, 2 vCPUs), as the image's tests do.
pub fn kv1_args<'a>(image: &'a Image, initrd: &'a Path) -> Vec<&'a str> {
    vec![
        "--kernel",
        image.kernel.to_str().expect("a UTF-8 kernel path"),
        "--initrd",
        initrd.to_str().expect("a UTF-8 initrd path"),
        "--mem",
        "1G",
        "--vcpus",
        "2",
        "--cmdline",
        &image.cmdline,
        "--name",
        "kv1",
    ]
}

/// Boots a primary of the image (`initrd`) whose bdkv holds `n` sessions,
/// its backdoor served by an agent process with `keys`, sockets in `dir`;
/// returns once the guest waits for commands on its console.
pub fn start_primary(dir: &Path, keys: &Path, initrd: &Path, n: u32) -> Primary {
    let agent = AgentProcess::start(dir, keys);
    let image = build_image(&["--role", "primary", "--sessions", &n.to_string()]);
    let mut args = kv1_args(&image, initrd);
    args.extend(["--agent-sock", agent.vmm_sock.to_str().unwrap()]);
    let mut vm = Vm::start(&args);
    vm.wait_line("BDIMG: module loaded", BOOT_T);
    let ready = vm.wait_line("BDIMG: sessions ready ids=", BOOT_T);
    vm.wait_line("BDIMG: waiting for commands on the console", BOOT_T);
    let sessions = sessions_on_console(&vm.console());
    assert_eq!(sessions.len(), n as usize, "{}", vm.console());
    assert_eq!(
        ready.split_once("ids=").unwrap().1.trim(),
        sessions
            .iter()
            .map(|s| s.0.to_string())
            .collect::<Vec<_>>()
            .join(","),
    );
    let target = format!("kv1@{}", agent.addr);
    Primary {
        vm,
        agent,
        sessions,
        target,
    }
}

impl Primary {
    /// Hangs the guest's kernel for good (every CPU spinning with
    /// interrupts off: the module's test-only trigger) and waits for `w`'s
    /// OS-level HUNG verdict on the "kernel" counter; returns the time from
    /// the kernel's trigger line reaching the host to that verdict.
    pub fn hang_kernel(&mut self, w: &Watch, timeout: Duration) -> Duration {
        self.vm.send_console("hang-kernel\n");
        // The kernel's own line, not the script's: the script's echo goes
        // through the tty and may be cut in two by the kernel's message (the
        // lab saw "BDIMG: hanging t[...] backdoor: ... he kernel now").
        self.vm.wait_line(
            "backdoor: test-only hang trigger: stopping every CPU",
            timeout,
        );
        let hung_at = Instant::now();
        let (seen, e) = w.wait("hung (os)", timeout, |e| {
            e["event"] == "verdict" && e["verdict"] == "hung" && e["level"] == "os"
        });
        assert_eq!(e["counter"].as_str(), Some("kernel"), "{e}");
        seen.duration_since(hung_at)
    }
}
