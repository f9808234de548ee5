//! Booting a stock Debian kernel with the Linux 64-bit boot protocol.
//!
//! On PVM hosts (no VMX/SVM) guest ring 0 is emulated and Linux dies in
//! early boot on instructions the emulator lacks (cmpxchg16b), so here we
//! assert everything the kernel prints about the VM bdvmm built before
//! that: its banner, the exact command line, and the e820 map. The full
//! boot to user space runs only where hardware virtualization exists.

use std::process::Command;
use std::time::Duration;

use bdvmm_tests::{can_run_with_hardware_virtualization, exit, repo_root, Vm};

/// Fetches (or reuses the cached) Debian kernel; `vmlinux` asks for the
/// uncompressed ELF, which skips the decompressor (minutes of emulated ring 0 here).
fn debian_kernel(vmlinux: bool) -> String {
    let mut cmd = Command::new(repo_root().join("images/fetch-debian-kernel.sh"));
    if vmlinux {
        cmd.arg("--vmlinux");
    }
    let out = cmd.output().expect("run images/fetch-debian-kernel.sh");
    assert!(
        out.status.success(),
        "images/fetch-debian-kernel.sh failed (it needs apt-get and Debian's package lists):\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout)
        .expect("utf-8 path")
        .trim()
        .to_owned()
}

fn marker_initrd() -> String {
    let out = Command::new("make")
        .args(["-s", "-C"])
        .arg(repo_root().join("images"))
        .arg("initrd")
        .output()
        .expect("run make");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    repo_root()
        .join("images/build/marker-initrd.cpio")
        .display()
        .to_string()
}

#[test]
fn linux_early_boot_sees_the_vm_bdvmm_built() {
    let kernel = debian_kernel(true);
    let cmdline = "console=ttyS0 earlyprintk=ttyS0 reboot=k panic=1 bdvmm.test=early-boot-42";
    let mut vm = Vm::start(&["--kernel", &kernel, "--mem", "384M", "--cmdline", cmdline]);
    let t = Duration::from_secs(120);
    vm.wait_line("Linux version ", t);
    vm.wait_line("Command line: ", t);
    vm.wait_line("BIOS-e820: [mem 0x0000000000100000-", t);
    // Stop as soon as the memory map is out: the rest is the emulator's limit, not ours.
    let console = vm.console();
    assert_eq!(vm.api("stop")["ok"], true);
    assert_eq!(vm.wait_exit(t), Some(exit::OK));

    let line = |prefix: &str| {
        console
            .lines()
            .find_map(|l| {
                l.split_once(prefix)
                    .map(|(_, rest)| rest.trim_end().to_owned())
            })
            .unwrap_or_else(|| panic!("no {prefix:?} line in:\n{console}"))
    };
    assert!(
        line("Linux version ").starts_with("6."),
        "a Debian 6.x kernel: {console}"
    );
    assert_eq!(
        line("Command line: "),
        format!("{cmdline} backdoor.dev=4K@0xb0000000:5"),
        "the kernel saw exactly our command line, plus the backdoor device's announcement"
    );
    let e820: Vec<&str> = console
        .lines()
        .filter_map(|l| l.split_once("BIOS-e820: ").map(|(_, r)| r.trim_end()))
        .collect();
    assert_eq!(
        e820,
        vec![
            "[mem 0x0000000000000000-0x000000000009fbff] usable",
            "[mem 0x000000000009fc00-0x00000000000fffff] reserved",
            // 384 MiB of RAM ends at 0x17fffff (inclusive).
            "[mem 0x0000000000100000-0x0000000017ffffff] usable",
        ],
        "{console}"
    );
}

#[test]
fn linux_bzimage_is_loaded_and_entered() {
    // The bzImage path (setup header, 64-bit entry at +0x200) must get the
    // guest running; here the in-guest decompressor then takes minutes of
    // emulated ring 0, so we check bdvmm entered the kernel and is running it.
    let kernel = debian_kernel(false);
    let mut vm = Vm::start(&["--kernel", &kernel, "--mem", "256M"]);
    std::thread::sleep(Duration::from_secs(2));
    let st = vm.api("status");
    assert_eq!(st["state"], "running", "{st}\n{}", vm.stderr());
    assert!(st["exits"][0]["error"] == 0, "{st}");
    assert_eq!(vm.api("stop")["ok"], true);
    assert_eq!(
        vm.wait_exit(Duration::from_secs(30)),
        Some(exit::OK),
        "{}",
        vm.stderr()
    );
}

#[test]
fn linux_full_boot_reaches_init() {
    // The default command line: no nolapic, no noapic. Linux finds its
    // IO-APIC and both CPUs in bdvmm's MP table, so timer and serial
    // interrupts arrive and the second vCPU comes up.
    if !can_run_with_hardware_virtualization("linux_full_boot_reaches_init") {
        return;
    }
    let kernel = debian_kernel(false);
    let initrd = marker_initrd();
    let mut vm = Vm::start(&[
        "--kernel", &kernel, "--initrd", &initrd, "--mem", "512M", "--vcpus", "2",
    ]);
    // Generous: under the lab's software emulator a boot takes 20-70 s.
    let t = Duration::from_secs(300);
    vm.wait_console("BDVMM-INIT-MARKER: init reached user space", t);
    // The marker init reboots; with reboot=k that is an i8042 reset.
    assert_eq!(vm.wait_exit(t), Some(exit::RESET), "{}", vm.console());
    let console = vm.console();
    let cmdline = format!(
        "Command line: {} backdoor.dev=",
        bdvmm::config::DEFAULT_CMDLINE
    );
    for line in [
        cmdline.as_str(),
        "BDVMM-INIT-MARKER: cpus online 0-1",
        "BDVMM-INIT-MARKER: slept 100 ms",
        "smpboot: Total of 2 processors activated",
        "APIC: Switch to symmetric I/O mode setup",
    ] {
        assert!(console.contains(line), "no {line:?} in\n{console}");
    }
    for line in [
        "MADT or MP tables are not detected",
        "virtual wire mode",
        "SMP disabled",
    ] {
        assert!(!console.contains(line), "{line:?} in\n{console}");
    }
}

#[test]
fn two_fetches_at_once_share_the_kernel_cache_safely() {
    // A cache holding only the compressed kernel: both runs extract the
    // vmlinux at the same time, into the same cache.
    let kernel = debian_kernel(false);
    let cache = tempfile::tempdir().unwrap();
    let dir = cache.path().join("debian-kernel");
    std::fs::create_dir_all(&dir).unwrap();
    let name = std::path::Path::new(&kernel).file_name().unwrap();
    std::fs::copy(&kernel, dir.join(name)).unwrap();
    let runs: Vec<_> = (0..2)
        .map(|_| {
            Command::new(repo_root().join("images/fetch-debian-kernel.sh"))
                .arg("--vmlinux")
                .env("BDVMM_CACHE_DIR", cache.path())
                .stdout(std::process::Stdio::piped())
                .stderr(std::process::Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    let mut paths = Vec::new();
    for run in runs {
        let out = run.wait_with_output().unwrap();
        assert!(
            out.status.success(),
            "a concurrent fetch failed:\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        paths.push(String::from_utf8(out.stdout).unwrap().trim().to_owned());
    }
    assert_eq!(paths[0], paths[1]);
    let elf = std::fs::read(&paths[0]).unwrap();
    assert_eq!(&elf[..4], b"\x7fELF", "the vmlinux is an ELF file");
    // No temporary file is left behind.
    let left: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .filter_map(Result::ok)
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with('.'))
        .collect();
    assert!(left.is_empty(), "left behind: {left:?}");
}
