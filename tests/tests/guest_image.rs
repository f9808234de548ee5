//! The Linux guest image built by `images/build-image.sh` from Debian
//! packages: a stock kernel, `backdoor.ko` built against its headers, and a
//! busybox initramfs whose /init loads the module and starts `bdkv`.
//!
//! Here (PVM: no VMX/SVM) Linux dies in early boot, so we check the image
//! itself (what is in the initramfs, that the module is built for this
//! kernel, that the binaries are static) and that bdvmm hands the kernel
//! this initramfs and command line. The full in-guest test (watch, hang the
//! guest kernel, extract, resume in a healthy instance) runs only where
//! hardware virtualization exists and otherwise skips with its reason.

use std::collections::BTreeMap;
use std::process::Command;
use std::time::{Duration, Instant};

use bdvmm_tests::guest_image::{build_image, kv1_args, primary, start_primary, Image};
use bdvmm_tests::shop::{bdctl, Watch};
use bdvmm_tests::{can_run_with_hardware_virtualization, exit, keys, repo_root, AgentProcess, Vm};

/// One entry of a newc archive.
#[derive(Debug)]
struct Entry {
    mode: u32,
    rdev: (u32, u32),
    data: Vec<u8>,
}

const S_IFMT: u32 = 0o170_000;
const S_IFREG: u32 = 0o100_000;
const S_IFDIR: u32 = 0o040_000;
const S_IFLNK: u32 = 0o120_000;
const S_IFCHR: u32 = 0o020_000;

/// Parses a newc ("070701") cpio archive, as the kernel's unpacker does.
fn parse_newc(mut buf: &[u8]) -> BTreeMap<String, Entry> {
    let pad4 = |n: usize| (4 - n % 4) % 4;
    let mut out = BTreeMap::new();
    loop {
        assert!(buf.len() >= 110, "archive ends inside a header");
        assert_eq!(&buf[..6], b"070701", "newc magic");
        let field = |i: usize| {
            let s = std::str::from_utf8(&buf[6 + 8 * i..14 + 8 * i]).expect("hex field");
            u32::from_str_radix(s, 16).expect("hex field")
        };
        let (mode, size, rdev, namesize) = (
            field(1),
            field(6) as usize,
            (field(9), field(10)),
            field(11) as usize,
        );
        let name_end = 110 + namesize;
        let name = std::str::from_utf8(&buf[110..name_end - 1])
            .expect("utf-8 name")
            .to_owned();
        assert_eq!(buf[name_end - 1], 0, "name is NUL-terminated");
        let data_start = name_end + pad4(name_end);
        let data = buf[data_start..data_start + size].to_vec();
        buf = &buf[data_start + size + pad4(size)..];
        if name == "TRAILER!!!" {
            return out;
        }
        assert!(
            out.insert(name.clone(), Entry { mode, rdev, data })
                .is_none(),
            "{name} twice"
        );
    }
}

/// Whether an ELF64 file asks for a dynamic loader (has a PT_INTERP).
fn elf_has_interp(elf: &[u8]) -> bool {
    assert_eq!(&elf[..4], b"\x7fELF", "an ELF file");
    assert_eq!(elf[4], 2, "ELF64");
    let u16_at = |o: usize| u16::from_le_bytes(elf[o..o + 2].try_into().unwrap()) as usize;
    let phoff = usize::try_from(u64::from_le_bytes(elf[0x20..0x28].try_into().unwrap())).unwrap();
    let (phentsize, phnum) = (u16_at(0x36), u16_at(0x38));
    (0..phnum).any(|i| {
        let o = phoff + i * phentsize;
        u32::from_le_bytes(elf[o..o + 4].try_into().unwrap()) == 3 // PT_INTERP
    })
}

/// A kernel module's `.modinfo` entry `key=...`.
fn modinfo(ko: &[u8], key: &str) -> Option<String> {
    let prefix = format!("{key}=");
    ko.split(|&b| b == 0)
        .filter_map(|s| std::str::from_utf8(s).ok())
        .find_map(|s| s.strip_prefix(prefix.as_str()).map(str::to_owned))
}

fn initramfs(image: &Image) -> BTreeMap<String, Entry> {
    let out = Command::new("gzip")
        .arg("-dc")
        .arg(&image.initrd)
        .output()
        .expect("run gzip");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    parse_newc(&out.stdout)
}

#[test]
fn guest_image_holds_init_busybox_the_module_for_its_kernel_and_a_static_bdkv() {
    let image = primary();
    let files = initramfs(image);
    let get = |name: &str| {
        files
            .get(name)
            .unwrap_or_else(|| panic!("no {name} in the initramfs: {:?}", files.keys()))
    };
    let regular = |name: &str| {
        let e = get(name);
        assert_eq!(e.mode & S_IFMT, S_IFREG, "{name} is a regular file");
        e
    };

    let init = regular("init");
    assert_eq!(init.mode & 0o777, 0o755);
    assert!(init.data.starts_with(b"#!/bin/sh\n"), "a shell script");
    assert_eq!(
        init.data,
        std::fs::read(repo_root().join("images/initramfs/bdimg-init.sh")).unwrap(),
        "/init is images/initramfs/bdimg-init.sh"
    );
    for d in ["dev", "proc", "sys", "tmp"] {
        assert_eq!(get(d).mode & S_IFMT, S_IFDIR, "{d}");
    }
    let console = get("dev/console");
    assert_eq!((console.mode & S_IFMT, console.rdev), (S_IFCHR, (5, 1)));

    let busybox = regular("bin/busybox");
    assert_eq!(busybox.mode & 0o111, 0o111, "busybox is executable");
    assert!(!elf_has_interp(&busybox.data), "busybox is static");
    // What /init runs, each a link to busybox somewhere on its PATH.
    for applet in [
        "sh", "mount", "ip", "insmod", "seq", "sleep", "grep", "cat", "tr", "uname", "sync",
    ] {
        let link = ["bin", "sbin", "usr/bin", "usr/sbin"]
            .iter()
            .find_map(|d| files.get(&format!("{d}/{applet}")))
            .unwrap_or_else(|| panic!("no {applet} on /init's PATH"));
        assert_eq!(link.mode & S_IFMT, S_IFLNK, "{applet} is a link");
        assert_eq!(link.data, b"/bin/busybox", "{applet}");
    }

    let bdkv = regular("bin/bdkv");
    assert_eq!(bdkv.mode & 0o111, 0o111, "bdkv is executable");
    assert!(
        !elf_has_interp(&bdkv.data),
        "bdkv is statically linked (the initramfs has no libc)"
    );

    let ko = regular("lib/modules/backdoor.ko");
    assert_eq!(
        ko.data,
        std::fs::read(&image.module).unwrap(),
        "MODULE= is the module inside the initramfs"
    );
    let vermagic = modinfo(&ko.data, "vermagic").expect("backdoor.ko has a vermagic");
    assert!(
        vermagic.starts_with(&format!("{} ", image.release)),
        "backdoor.ko is built for {} (its vermagic: {vermagic})",
        image.release
    );
    assert_eq!(modinfo(&ko.data, "name").as_deref(), Some("backdoor"));
    assert!(
        image.release.ends_with("-amd64")
            && image.kernel.ends_with(format!("vmlinuz-{}", image.release)),
        "{image:?}"
    );

    let words: Vec<&str> = image.cmdline.split_whitespace().collect();
    for w in [
        "console=ttyS0",
        "reboot=k",
        "panic=1",
        "backdoor.allow_hang=1",
        "backdoor.os_deadline_ms=3000",
        "bdimg.role=primary",
        "bdimg.sessions=3",
    ] {
        assert!(words.contains(&w), "{w} in {:?}", image.cmdline);
    }
    assert!(
        !image.cmdline.contains("backdoor.dev="),
        "bdvmm appends the device itself"
    );
    // The healthy instance: the same image, another role on the command line.
    let healthy = build_image(&["--role", "healthy"]);
    assert_eq!(
        (&healthy.initrd, &healthy.kernel, &healthy.module),
        (&image.initrd, &image.kernel, &image.module)
    );
    assert!(
        healthy.cmdline.contains("bdimg.role=healthy"),
        "{healthy:?}"
    );
    assert!(!healthy.cmdline.contains("bdimg.sessions"), "{healthy:?}");
}

#[test]
fn guest_image_build_rejects_bad_arguments_with_a_clear_error() {
    for (args, msg) in [
        (&["--role", "backup"][..], "--role is primary or healthy"),
        (&["--sessions", "0"][..], "--sessions wants a count"),
        (&["--bogus"][..], "unexpected argument '--bogus'"),
        (&["--expect", "1:2:3"][..], "--expect is for --role healthy"),
        (
            &["--role", "healthy", "--expect", "1:2"][..],
            "--expect wants ID:VERSION:KEYS",
        ),
        (
            &["--role", "healthy", "--hang-after", "5"][..],
            "--hang-after is for --role primary",
        ),
    ] {
        let out = Command::new(repo_root().join("images/build-image.sh"))
            .args(args)
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(1), "{args:?}");
        assert!(out.stdout.is_empty(), "{args:?}: nothing on stdout");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(msg), "{args:?}: {err}");
    }
}

#[test]
fn guest_image_kernel_gets_its_initramfs_and_command_line_from_bdvmm() {
    // Here Linux stops in early boot (PVM); everything it reports up to the
    // reservation of the initramfs is checked. The ELF vmlinux skips the
    // bzImage decompressor, which takes minutes of emulated ring 0 here.
    let image = primary();
    let mut vm = Vm::start(&[
        "--kernel",
        image.vmlinux.to_str().unwrap(),
        "--initrd",
        image.initrd.to_str().unwrap(),
        "--mem",
        "512M",
        "--cmdline",
        &image.cmdline,
    ]);
    let t = Duration::from_secs(120);
    let banner = vm.wait_line("Linux version ", t);
    let cmdline = vm.wait_line("Command line: ", t);
    let ramdisk = vm.wait_line("RAMDISK: [mem ", t);
    assert_eq!(vm.api("stop")["ok"], true);
    assert_eq!(vm.wait_exit(t), Some(exit::OK), "{}", vm.stderr());

    assert!(
        banner.contains(&format!("Linux version {} ", image.release)),
        "the kernel of the image: {banner}"
    );
    assert_eq!(
        cmdline.split_once("Command line: ").unwrap().1.trim_end(),
        format!("{} backdoor.dev=4K@0xb0000000:5", image.cmdline),
        "the image's command line, plus the backdoor device bdvmm announces (which the \
         module reads as its dev= parameter)"
    );
    // "RAMDISK: [mem 0x1feb4000-0x1fffffff]": the initramfs, page-aligned.
    let range = ramdisk
        .split_once("RAMDISK: [mem ")
        .unwrap()
        .1
        .trim_end()
        .trim_end_matches(']');
    let (lo, hi) = range.split_once('-').unwrap();
    let parse = |s: &str| u64::from_str_radix(s.trim_start_matches("0x"), 16).unwrap();
    let len = parse(hi) + 1 - parse(lo);
    let size = std::fs::metadata(&image.initrd).unwrap().len();
    assert_eq!(len, size.div_ceil(4096) * 4096, "{ramdisk}");
}

/// Generous bounds: under the lab's software emulator a Linux boot takes
/// 20-70 s and every guest step is slow. Not measurements.
const T: Duration = Duration::from_secs(300);
/// The "kernel" counters' deadline in the image (its command line's
/// backdoor.os_deadline_ms).
const OS_DEADLINE_MS: u64 = 3000;
/// backdoor.ko's inbox_slot_size default.
const INBOX_SLOT_SIZE: &str = "4096";
const INTERVAL_MS: u64 = 100;

/// The counters `bdctl status --json` reports.
fn status_counters(target: &str, keyfile: &str) -> Vec<serde_json::Value> {
    let (code, out, err) = bdctl(&["status", target, "--key-file", keyfile, "--json"]);
    assert_eq!(code, Some(0), "{out}{err}");
    let mut v: serde_json::Value = serde_json::from_str(&out).expect("status --json");
    match v["counters"].take() {
        serde_json::Value::Array(c) => c,
        _ => panic!("no counters in {v}"),
    }
}

/// The counters `bdctl status --json` reports: name → (level, value).
fn counters(target: &str, keyfile: &str) -> BTreeMap<String, (String, u64)> {
    status_counters(target, keyfile)
        .iter()
        .map(|c| {
            (
                c["name"].as_str().unwrap().to_owned(),
                (
                    c["level"].as_str().unwrap().to_owned(),
                    c["value"].as_u64().unwrap(),
                ),
            )
        })
        .collect()
}

/// Checks what `bdctl extract --out` wrote against the sessions bdkv
/// created (`bdkv load`: key kJ holds "vJ-of-ID").
fn assert_extracted(x: &serde_json::Value, sessions: &[(u64, u64, u64)]) {
    assert_eq!(x["summary"]["corrupt"], 0, "{x}");
    let extracted = x["sessions"].as_array().unwrap();
    assert_eq!(extracted.len(), sessions.len(), "{x}");
    for &(id, version, nkeys) in sessions {
        let s = extracted
            .iter()
            .find(|s| s["session_id"] == id)
            .unwrap_or_else(|| panic!("session {id} not extracted: {x}"));
        assert_eq!(
            (s["service"].as_str(), s["version"].as_u64()),
            (Some("bdkv"), Some(version)),
            "{s}"
        );
        let mut want = format!("bdkv/1 applied={nkeys} keys={nkeys}\n");
        for j in 0..nkeys {
            want += &format!("k{j} v{j}-of-{id}\n");
        }
        assert_eq!(
            s["payload_text"].as_str().unwrap().trim_end(),
            want.trim_end(),
            "{s}"
        );
    }
}

#[test]
fn guest_image_hang_is_detected_extracted_and_resumed() {
    if !can_run_with_hardware_virtualization("guest_image_hang_is_detected_extracted_and_resumed") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let k = keys::write_file(dir.path());
    let keyfile = k.to_str().unwrap();
    let image = primary();
    let mut p = start_primary(dir.path(), &k, &image.initrd, 3);
    let w = Watch::start(&p.target, &k, &["--interval-ms", &INTERVAL_MS.to_string()]);
    w.verdict("healthy", T);
    let before = counters(&p.target, keyfile);
    assert_eq!(
        before.get("kernel").map(|c| c.0.as_str()),
        Some("os"),
        "the driver's OS-level counter: {before:?}"
    );
    assert_eq!(
        before.get("bdkv").map(|c| c.0.as_str()),
        Some("application"),
        "bdkv's application counter: {before:?}"
    );

    // bdkv is killed inside the guest; started again, it finds its service
    // area in the driver and resumes every session from it.
    p.vm.send_console("crash-bdkv\n");
    // While no bdkv holds its area, another user's bdkv (the device open
    // to all) asks for it first: refused, for being another user.
    let thief =
        p.vm.wait_line("BDIMG: another user's bdkv was refused bdkv's area", T);
    assert!(thief.contains("belongs to another user"), "{thief}");
    let restarted = p.vm.wait_line("BDIMG: bdkv restarted as ", T);
    assert!(
        restarted.contains(&format!("all {} sessions resumed", p.sessions.len())),
        "{restarted}"
    );
    for &(id, version, nkeys) in &p.sessions {
        let line = format!("BDIMG: resumed session {id}: version {version}, {nkeys} keys: ok");
        assert!(
            p.vm.console().contains(&line),
            "no {line:?} in\n{}",
            p.vm.console()
        );
    }

    // An application hang: bdkv stops (SIGSTOP), its counter stops, the
    // kernel's keeps moving: an application-level verdict, not an OS one.
    let kernel_before = counters(&p.target, keyfile)["kernel"].1;
    p.vm.send_console("stop-bdkv\n");
    p.vm.wait_line("BDIMG: bdkv stopped", T);
    let (_, e) = w.wait("hung (application)", T, |e| {
        e["event"] == "verdict" && e["verdict"] == "hung"
    });
    assert_eq!(
        (e["level"].as_str(), e["counter"].as_str()),
        (Some("application"), Some("bdkv")),
        "{e}"
    );
    let kernel_after = counters(&p.target, keyfile)["kernel"].1;
    assert!(
        kernel_after > kernel_before,
        "the kernel counter kept moving while bdkv was stopped ({kernel_before} -> {kernel_after})"
    );
    p.vm.send_console("cont-bdkv\n");
    p.vm.wait_line("BDIMG: bdkv continued", T);
    w.verdict("healthy", T);

    // The kernel hangs for real (every CPU spinning with interrupts off).
    let latency = p.hang_kernel(&w, T);
    eprintln!(
        "OS-level hang reported {latency:?} after the trigger (deadline {OS_DEADLINE_MS} ms)"
    );
    // A bound a loaded machine keeps: the figure itself is bdbench's.
    assert!(
        latency < Duration::from_millis(OS_DEADLINE_MS + 2 * INTERVAL_MS) + Duration::from_secs(30),
        "detected after {latency:?}"
    );

    // Extract from the hung guest: no guest CPU involved.
    let x_path = dir.path().join("sessions.json");
    let (code, _, err) = bdctl(&[
        "extract",
        &p.target,
        "--key-file",
        keyfile,
        "--service",
        "bdkv",
        "--out",
        x_path.to_str().unwrap(),
    ]);
    assert_eq!(code, Some(0), "{err}");
    let x: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&x_path).unwrap()).unwrap();
    assert_extracted(&x, &p.sessions);

    // A second Linux guest adopts them through its inbox.
    let expect = p
        .sessions
        .iter()
        .map(|(i, v, n)| format!("{i}:{v}:{n}"))
        .collect::<Vec<_>>()
        .join(",");
    let healthy = build_image(&["--role", "healthy", "--expect", &expect]);
    assert_eq!(healthy.initrd, image.initrd, "the same image");
    let mut vm2 = Vm::start(&[
        "--kernel",
        healthy.kernel.to_str().unwrap(),
        "--initrd",
        healthy.initrd.to_str().unwrap(),
        "--mem",
        "1G",
        "--cmdline",
        &healthy.cmdline,
        "--name",
        "kv2",
        "--backdoor-listen",
        "127.0.0.1:0",
        "--backdoor-keys",
        keyfile,
    ]);
    vm2.wait_line("BDIMG: healthy instance ready", T);
    let addr2 = vm2.api("status")["agent_addr"]
        .as_str()
        .expect("agent_addr in status")
        .to_owned();
    let (code, out, err) = bdctl(&[
        "resume",
        &format!("kv2@{addr2}"),
        "--key-file",
        keyfile,
        "--from",
        x_path.to_str().unwrap(),
        "--hook",
        "inbox",
        "--slot-size",
        INBOX_SLOT_SIZE,
    ]);
    assert_eq!(code, Some(0), "{out}{err}");
    assert!(
        out.contains(&format!("handed {} sessions", p.sessions.len())),
        "{out}"
    );
    vm2.wait_line(
        &format!(
            "BDIMG: all {} sessions adopted with their contents",
            p.sessions.len()
        ),
        T,
    );
    let console2 = vm2.console();
    for &(id, version, nkeys) in &p.sessions {
        let line = format!("BDIMG: adopted session {id}: version {version}, {nkeys} keys: ok");
        assert!(console2.contains(&line), "no {line:?} in\n{console2}");
    }
    // The hung primary stays hung; the healthy one keeps running.
    assert_eq!(vm2.api("status")["state"], "running");
    assert_eq!(p.vm.api("status")["state"], "running");
    assert!(
        !p.vm.console().contains("BDIMG: FAILED"),
        "{}",
        p.vm.console()
    );
    drop(p.agent);
}

/// The driver's per-CPU OS-level counters `bdctl status --json` reports
/// (each named "kernel", owned by its CPU): owner → (state, value).
fn cpu_counters(target: &str, keyfile: &str) -> BTreeMap<u64, (String, u64)> {
    status_counters(target, keyfile)
        .iter()
        .filter(|c| c["name"] == "kernel" && c["level"] == "os")
        .map(|c| {
            (
                c["owner"].as_u64().unwrap(),
                (
                    c["state"].as_str().unwrap().to_owned(),
                    c["value"].as_u64().unwrap(),
                ),
            )
        })
        .collect()
}

/// Waits until CPU `cpu`'s counter is in `state` (a CPU going offline or
/// online reaches the driver's hotplug callback a little later).
fn wait_cpu_counter(target: &str, keyfile: &str, cpu: u64, state: &str) {
    let deadline = Instant::now() + T;
    loop {
        let c = cpu_counters(target, keyfile);
        if c.get(&cpu).map(|c| c.0.as_str()) == Some(state) {
            return;
        }
        assert!(Instant::now() < deadline, "CPU {cpu} never {state}: {c:?}");
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[test]
fn guest_image_one_stuck_cpu_is_an_os_hang_that_names_the_cpu() {
    if !can_run_with_hardware_virtualization(
        "guest_image_one_stuck_cpu_is_an_os_hang_that_names_the_cpu",
    ) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let k = keys::write_file(dir.path());
    let keyfile = k.to_str().unwrap();
    let image = primary();
    let mut p = start_primary(dir.path(), &k, &image.initrd, 1);
    let w = Watch::start(&p.target, &k, &["--interval-ms", &INTERVAL_MS.to_string()]);
    w.verdict("healthy", T);

    // One OS-level counter per online CPU, each moving on its own.
    let c1 = cpu_counters(&p.target, keyfile);
    assert_eq!(c1.keys().copied().collect::<Vec<_>>(), [0, 1], "{c1:?}");
    std::thread::sleep(Duration::from_secs(3));
    let c2 = cpu_counters(&p.target, keyfile);
    for cpu in [0, 1] {
        assert_eq!(c2[&cpu].0, "active", "{c2:?}");
        assert!(
            c2[&cpu].1 > c1[&cpu].1,
            "CPU {cpu}'s counter: {c1:?} -> {c2:?}"
        );
    }

    // A CPU taken offline is not a stuck one: its counter retires and the
    // guest stays healthy; back online, it counts again.
    p.vm.send_console("cpu-offline 1\n");
    p.vm.wait_line("BDIMG: CPU 1 online=0", T);
    wait_cpu_counter(&p.target, keyfile, 1, "retired");
    // (Taking a CPU down stops every CPU for a moment, which the lab's
    // emulation stretches past an application's 1 s deadline: only the
    // offline CPU's own counter is the question here.)
    let quiet = w.collect(Duration::from_millis(2 * OS_DEADLINE_MS));
    assert!(
        !quiet
            .iter()
            .any(|e| e["verdict"] == "hung" && e["level"] == "os" && e["owner"] == 1),
        "an offline CPU was judged hung: {quiet:?}"
    );
    p.vm.send_console("cpu-online 1\n");
    p.vm.wait_line("BDIMG: CPU 1 online=1", T);
    wait_cpu_counter(&p.target, keyfile, 1, "active");

    // CPU 1 stops with interrupts off while CPU 0 runs on: an OS-level
    // hang, and the verdict names the stuck CPU (the counter that stalled
    // longest), which one timer ticking on a healthy CPU could not.
    p.vm.send_console("hang-cpu 1\n");
    p.vm.wait_line("backdoor: test-only hang trigger: stopping CPU 1", T);
    let (_, e) = w.wait("hung (os)", T, |e| {
        e["event"] == "verdict" && e["verdict"] == "hung" && e["level"] == "os"
    });
    assert_eq!(
        (e["counter"].as_str(), e["owner"].as_u64()),
        (Some("kernel"), Some(1)),
        "{e}"
    );
    assert!(
        !p.vm.console().contains("BDIMG: FAILED"),
        "{}",
        p.vm.console()
    );
    drop(p.agent);
}

/// A newc archive of regular files (name, contents): appended to an
/// initramfs, the kernel unpacks it after the first and its files replace
/// those of the same name.
fn newc_archive(files: &[(&str, &[u8])]) -> Vec<u8> {
    let mut out = Vec::new();
    let pad = |out: &mut Vec<u8>| out.resize(out.len().div_ceil(4) * 4, 0);
    let entry = |out: &mut Vec<u8>, ino: usize, name: &str, mode: u32, data: &[u8]| {
        let fields = [
            ino as u64,
            u64::from(mode),
            0,
            0,
            1,
            0,
            data.len() as u64,
            0,
            0,
            0,
            0,
            name.len() as u64 + 1,
            0,
        ];
        out.extend_from_slice(b"070701");
        for f in fields {
            out.extend_from_slice(format!("{f:08x}").as_bytes());
        }
        out.extend_from_slice(name.as_bytes());
        out.push(0);
        pad(out);
        out.extend_from_slice(data);
        pad(out);
    };
    for (i, (name, data)) in files.iter().enumerate() {
        entry(&mut out, i + 1, name, S_IFREG | 0o644, data);
    }
    entry(&mut out, 0, "TRAILER!!!", 0, &[]);
    out
}

#[test]
fn newc_archives_written_here_parse_back() {
    let a = newc_archive(&[("lib/modules/x.ko", b"abc"), ("y", b"")]);
    let files = parse_newc(&a);
    assert_eq!(files["lib/modules/x.ko"].data, b"abc");
    assert_eq!(files["lib/modules/x.ko"].mode & S_IFMT, S_IFREG);
    assert!(files["y"].data.is_empty());
}

/// Runs a command to success and returns its stdout.
fn run_ok(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap_or_else(|e| panic!("run {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn guest_image_module_installed_with_dkms_loads_and_serves() {
    // dkms installs into the system (/usr/src, /var/lib/dkms,
    // /lib/modules): this runs only where that system is throwaway, the
    // lab's L1, which runs the guest image's own kernel.
    if std::env::var_os("BDVMM_IN_LAB").is_none() {
        bdvmm_tests::skip(
            "guest_image_module_installed_with_dkms_loads_and_serves",
            "it installs backdoor.ko with dkms into this system; it runs inside the lab \
             (make lab), whose L1 runs the guest image's kernel",
        );
        return;
    }
    let image = primary();
    let release = run_ok(Command::new("uname").arg("-r"));
    assert_eq!(release.trim(), image.release, "L1 runs the image's kernel");

    // As a user would: `make -C guest-driver dkms-install` (a copy of the
    // sources, so the build leaves the tree alone).
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("guest-driver");
    run_ok(
        Command::new("cp")
            .arg("-r")
            .arg(repo_root().join("guest-driver"))
            .arg(&src),
    );
    run_ok(Command::new("make").arg("-C").arg(&src).arg("clean"));
    run_ok(Command::new("make").arg("-C").arg(&src).arg("dkms-install"));
    let status = run_ok(Command::new("dkms").arg("status"));
    assert!(
        status.contains(&format!(
            "backdoor/0.1.0, {}, x86_64: installed",
            image.release
        )),
        "dkms status:\n{status}"
    );
    let path = run_ok(Command::new("modinfo").args(["-n", "backdoor"]));
    let path = path.trim();
    assert_eq!(
        path,
        format!("/lib/modules/{}/updates/dkms/backdoor.ko", image.release),
        "modprobe finds the dkms module"
    );
    let srcversion = run_ok(Command::new("modinfo").args(["-F", "srcversion", path]));
    let ko = std::fs::read(path).unwrap();
    assert!(
        modinfo(&ko, "vermagic")
            .unwrap()
            .starts_with(&format!("{} ", image.release)),
        "built for the image's kernel"
    );

    // The image's initramfs with the dkms module in place of its own.
    let mut initrd = std::fs::read(&image.initrd).unwrap();
    initrd.extend_from_slice(&newc_archive(&[("lib/modules/backdoor.ko", &ko)]));
    let initrd_path = dir.path().join("initrd-dkms.cpio");
    std::fs::write(&initrd_path, &initrd).unwrap();

    let k = keys::write_file(dir.path());
    let keyfile = k.to_str().unwrap();
    let p = start_primary(dir.path(), &k, &initrd_path, 2);
    let loaded = p.vm.console();
    let line = format!("BDIMG: module loaded: srcversion {}", srcversion.trim());
    assert!(
        loaded.contains(&line),
        "no {line:?}: the dkms module did not load\n{loaded}"
    );

    // It serves: sealed hooks, the kernel's counter moving, bdkv's sessions
    // extracted.
    let c1 = counters(&p.target, keyfile);
    let (code, out, err) = bdctl(&["status", &p.target, "--key-file", keyfile, "--json"]);
    assert_eq!(code, Some(0), "{err}");
    let st: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(st["descriptor"]["sealed"], true, "{st}");
    std::thread::sleep(Duration::from_secs(2));
    let c2 = counters(&p.target, keyfile);
    assert!(
        c2["kernel"].1 > c1["kernel"].1,
        "the kernel's counter did not move: {c1:?} then {c2:?}; console:\n{}",
        p.vm.console()
    );
    let x_path = dir.path().join("x.json");
    let (code, _, err) = bdctl(&[
        "extract",
        &p.target,
        "--key-file",
        keyfile,
        "--service",
        "bdkv",
        "--out",
        x_path.to_str().unwrap(),
    ]);
    assert_eq!(code, Some(0), "{err}");
    let x: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&x_path).unwrap()).unwrap();
    assert_extracted(&x, &p.sessions);
    run_ok(Command::new("make").arg("-C").arg(&src).arg("dkms-remove"));
}

#[test]
fn guest_image_build_names_a_package_the_package_lists_lack() {
    // An apt-cache that knows no package, as on a machine without
    // `apt-get update`: the script must say which package and what to do.
    let dir = tempfile::tempdir().unwrap();
    let fake = dir.path().join("apt-cache");
    std::fs::write(
        &fake,
        "#!/bin/sh\necho 'E: No packages found' >&2\nexit 100\n",
    )
    .unwrap();
    std::fs::set_permissions(&fake, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let path = format!(
        "{}:{}",
        dir.path().display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let out = Command::new(repo_root().join("images/build-image.sh"))
        .env("PATH", path)
        .env("BDVMM_CACHE_DIR", dir.path().join("cache"))
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(out.stdout.is_empty(), "nothing on stdout");
    assert!(
        err.contains("the package lists know no 'linux-image-amd64'")
            && err.contains("apt-get update"),
        "{err}"
    );
}

/// `[    1.234567] text` lines of a console (what printk wrote), with
/// serial line endings gone.
fn printk_lines(console: &str) -> Vec<String> {
    console
        .lines()
        .map(|l| l.trim_end_matches('\r'))
        .filter(|l| {
            l.starts_with('[')
                && l.find("] ").is_some_and(|i| {
                    l[1..i].trim_start().split_once('.').is_some_and(|(s, us)| {
                        s.chars().all(|c| c.is_ascii_digit()) && us.len() == 6
                    })
                })
        })
        .map(str::to_owned)
        .collect()
}

#[test]
fn kernel_log_of_a_kernel_that_died_in_early_boot_is_read_with_no_guest_cpu() {
    // Here (PVM) the stock kernel dies in early boot (exit 13); with
    // hardware virtualization it boots on, and is stopped once it has
    // printed its early lines. Either way a separate agent keeps its RAM,
    // and bdctl reads the log from it through the VMM's forensic view with
    // no file from the kernel's package: vmcoreinfo is not set up yet.
    let image = primary();
    let dir = tempfile::tempdir().unwrap();
    let k = keys::write_file_with_forensic(dir.path());
    let keyfile = k.to_str().unwrap();
    let agent = AgentProcess::start(dir.path(), &k);
    let mut vm = Vm::start(&[
        "--kernel",
        image.vmlinux.to_str().unwrap(),
        "--initrd",
        image.initrd.to_str().unwrap(),
        "--mem",
        "384M",
        "--cmdline",
        &image.cmdline,
        "--name",
        "early",
        "--agent-sock",
        agent.vmm_sock.to_str().unwrap(),
    ]);
    vm.wait_line("RAMDISK: [mem ", T);
    let code = if bdvmm_tests::has_hardware_virtualization() {
        assert_eq!(vm.api("stop")["ok"], true);
        vm.wait_exit(T)
    } else {
        vm.wait_exit(T)
    };
    assert!(
        code == Some(exit::KVM_ERROR) || code == Some(exit::OK),
        "{code:?}: {}",
        vm.stderr()
    );
    let console = printk_lines(&vm.console());
    assert!(console.len() > 10, "{console:?}");
    let target = format!("early@{}", agent.addr);

    // No files at all: the scan finds the static ring and the image's BTF.
    let t = Instant::now();
    let (code, out, err) = bdctl(&["dmesg", &target, "--key-file", keyfile, "--forensic"]);
    let took = t.elapsed();
    assert_eq!(code, Some(0), "{err}");
    eprintln!("bdctl dmesg took {took:?} ({err})");
    assert!(
        err.contains("via the forensic view (layout from btf in guest RAM), found through the page tables at"),
        "{err}"
    );
    let log: Vec<&str> = out.lines().collect();
    // Every complete line the console showed is in the log, in order (the
    // last console line may have been cut by the kernel's death).
    let mut at = 0;
    for line in &console[..console.len() - 1] {
        let found = log[at..].iter().position(|l| l == line);
        assert!(
            found.is_some(),
            "console line {line:?} is not in the log read from memory (after line {at}):\n{out}"
        );
        at += found.unwrap() + 1;
    }
    let cmdline = format!("Command line: {} backdoor.dev=", image.cmdline);
    assert!(log.iter().any(|l| l.contains(&cmdline)), "{out}");
    // Not trusting the page tables, a scan of all RAM finds the same ring;
    // with the kernel's vmlinux, the layout comes from its file.
    for (extra, says) in [
        (
            "--scan-all-ram",
            "found through a scan of all 384 MiB of RAM",
        ),
        ("--vmlinux", "(layout from btf)"),
    ] {
        let mut args = vec!["dmesg", &target, "--key-file", keyfile, "--forensic", extra];
        if extra == "--vmlinux" {
            args.push(image.vmlinux.to_str().unwrap());
        }
        let (code, again, err) = bdctl(&args);
        assert_eq!(code, Some(0), "{extra}: {err}");
        assert!(err.contains(says), "{extra}: {err}");
        assert_eq!(again, out, "{extra}");
    }

    // The evidence of the dead kernel: its log, and each vCPU's last RIP
    // named from the kernel's own kallsyms, found in its image in RAM.
    let bundle_file = dir.path().join("early.json");
    let (code, _, err) = bdctl(&[
        "evidence",
        &target,
        "--key-file",
        keyfile,
        "--forensic",
        "--out",
        bundle_file.to_str().unwrap(),
    ]);
    assert_eq!(code, Some(0), "{err}");
    let b: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&bundle_file).unwrap()).unwrap();
    eprintln!("vCPUs of the dead kernel: {}", b["vcpus"]);
    let from = b["kernel_symbols"]["from"].as_str().unwrap_or_default();
    assert!(
        from.starts_with("kallsyms in guest RAM")
            && from.contains("_text is where the page tables map the image"),
        "{}",
        b["errors"]
    );
    assert!(
        b["kernel_symbols"]["count"].as_u64().unwrap() > 10_000,
        "{}",
        b["kernel_symbols"]
    );
    let cpus = b["vcpus"]["vcpus"].as_array().unwrap();
    assert!(!cpus.is_empty(), "{b}");
    for c in cpus {
        let rip = c["rip"].as_u64().unwrap();
        if c["cpl"] == 0 && rip >= 0xffff_ffff_8000_0000 {
            let f = c["function"].as_str().unwrap_or_default();
            assert!(f.contains("+0x") && !f.starts_with('['), "{c}");
        }
    }
    let tail: Vec<&str> = b["kernel_log"]["lines"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| l.as_str().unwrap())
        .collect();
    assert!(
        !tail.is_empty() && out.ends_with(&(tail.join("\n") + "\n")),
        "{b}"
    );

    // Without the forensic key there is no way in: no driver ran yet.
    let (code, _, err) = bdctl(&["dmesg", &target, "--key-file", keyfile]);
    assert_eq!(code, Some(1), "{err}");
    assert!(
        err.contains("no way into the guest kernel's memory"),
        "{err}"
    );
    // And the forensic region is refused to the read role.
    let mut c = backdoor_agent::Client::connect(
        agent.addr.as_str(),
        "early",
        backdoor_agent::Role::Read,
        &keys::READ,
        T,
    )
    .unwrap();
    let err = c
        .read(backdoor_agent::server::FORENSIC_HOOK_BASE, 0, 8)
        .unwrap_err();
    assert_eq!(err.code(), Some(backdoor_agent::ErrorCode::NoHook), "{err}");
    assert!(
        !c.descriptor().hooks.iter().any(|h| h.kind == "forensic"),
        "{:?}",
        c.descriptor()
    );
}

#[test]
fn guest_image_evidence_of_a_hung_kernel_names_the_trigger_before_on_hang_runs() {
    if !can_run_with_hardware_virtualization(
        "guest_image_evidence_of_a_hung_kernel_names_the_trigger_before_on_hang_runs",
    ) {
        return;
    }
    let image = primary();
    let dir = tempfile::tempdir().unwrap();
    let k = keys::write_file_with_forensic(dir.path());
    let keyfile = k.to_str().unwrap();
    // The in-process agent: it asks bdvmm for fresh vCPU locations (a kick).
    let mut args = kv1_args(image, &image.initrd);
    args.extend([
        "--backdoor-listen",
        "127.0.0.1:0",
        "--backdoor-keys",
        keyfile,
    ]);
    let mut vm = Vm::start(&args);
    vm.wait_line("BDIMG: waiting for commands on the console", T);
    let addr = vm.api("status")["agent_addr"].as_str().unwrap().to_owned();
    let target = format!("kv1@{addr}");
    // Healthy and idle: through the forensic view, the kernel's own
    // kallsyms name where each vCPU is (the idle loop, not the module).
    // Before the watch starts: in the lab the scan's reads take the guest's
    // only L1 CPU for a while, and a watch would call that a hang.
    let healthy = dir.path().join("healthy.json");
    let (code, _, err) = bdctl(&[
        "evidence",
        &target,
        "--key-file",
        keyfile,
        "--forensic",
        "--out",
        healthy.to_str().unwrap(),
    ]);
    assert_eq!(code, Some(0), "{err}");
    let hb: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&healthy).unwrap()).unwrap();
    eprintln!(
        "healthy vCPUs: {} (timings {})",
        hb["vcpus"], hb["timings_ms"]
    );
    assert_eq!(hb["errors"], serde_json::json!({}), "{hb}");
    assert!(
        hb["kernel_symbols"]["from"]
            .as_str()
            .unwrap()
            .contains("_text is where the page tables map the image"),
        "{hb}"
    );
    for c in hb["vcpus"]["vcpus"].as_array().unwrap() {
        let f = c["function"].as_str().unwrap_or_default();
        if c["cpl"] == 0 {
            assert!(f.contains("+0x") && !f.ends_with("[backdoor]"), "{c}");
        }
    }
    let evidence_dir = dir.path().join("evidence");
    let marker = dir.path().join("on-hang.txt");
    let on_hang = format!(
        "if test -s \"$BDCTL_EVIDENCE\"; then echo evidence-first; else echo no-evidence; fi > {}",
        marker.display()
    );
    let module = image.module.to_str().unwrap();
    let w = Watch::start(
        &target,
        &k,
        &[
            "--interval-ms",
            "100",
            "--evidence-dir",
            evidence_dir.to_str().unwrap(),
            "--on-hang",
            &on_hang,
            "--module",
            module,
        ],
    );
    w.verdict("healthy", T);
    vm.send_console("hang-kernel\n");
    w.wait("hung (os)", T, |e| {
        e["verdict"] == "hung" && e["level"] == "os"
    });
    // action_failed too: a failed capture then shows its error here.
    let (_, ev) = w.wait("evidence", T, |e| {
        e["event"] == "evidence" || e["event"] == "action" || e["event"] == "action_failed"
    });
    assert_eq!(
        ev["event"], "evidence",
        "the bundle is written before --on-hang runs: {ev}"
    );
    w.wait("on-hang", T, |e| e["event"] == "action");
    assert_eq!(
        std::fs::read_to_string(&marker).unwrap().trim(),
        "evidence-first",
        "--on-hang saw the bundle's file"
    );
    let bundle: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(ev["file"].as_str().unwrap()).unwrap())
            .unwrap();
    let check = |b: &serde_json::Value| {
        assert_eq!(b["errors"], serde_json::json!({}), "{b}");
        let cpus = b["vcpus"]["vcpus"].as_array().unwrap();
        assert_eq!(cpus.len(), 2, "{b}");
        for c in cpus {
            assert_eq!(
                (
                    c["fresh"].as_bool(),
                    c["cpl"].as_u64(),
                    c["interrupts_enabled"].as_bool()
                ),
                (Some(true), Some(0), Some(false)),
                "{c}"
            );
            let f = c["function"].as_str().unwrap_or_default();
            assert!(
                f.starts_with("bd_hang_cpu+") && f.ends_with("[backdoor]"),
                "{c}"
            );
        }
        let lines = b["kernel_log"]["lines"].as_array().unwrap();
        assert!(
            lines.iter().any(|l| l.as_str().unwrap().contains(
                "backdoor: test-only hang trigger: stopping every CPU with interrupts off"
            )),
            "{b}"
        );
        assert_eq!(b["kernel_log"]["via"], "driver", "{b}");
        assert_eq!(
            b["sessions"]["sessions"].as_array().unwrap().len(),
            3,
            "{b}"
        );
        assert_eq!(b["counters"]["descriptor"]["sealed"], true, "{b}");
    };
    check(&bundle);
    assert_eq!(bundle["verdict"]["verdict"], "hung");

    // On demand: the same, and the driver's log through bdctl dmesg.
    let out = dir.path().join("now.json");
    let (code, _, err) = bdctl(&[
        "evidence",
        &target,
        "--key-file",
        keyfile,
        "--forensic",
        "--module",
        module,
        "--out",
        out.to_str().unwrap(),
    ]);
    assert_eq!(code, Some(0), "{err}");
    let now: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&out).unwrap()).unwrap();
    check(&now);
    assert!(
        now["kernel_symbols"]["from"]
            .as_str()
            .unwrap()
            .starts_with("kallsyms in guest RAM"),
        "{now}"
    );
    let (code, log, err) = bdctl(&["dmesg", &target, "--key-file", keyfile]);
    assert_eq!(code, Some(0), "{err}");
    let last = log.lines().last().unwrap_or_default();
    assert!(
        log.contains("backdoor: test-only hang trigger: stopping every CPU with interrupts off"),
        "last line {last:?}"
    );
    assert!(
        err.contains("via the guest's driver (layout from vmcoreinfo)"),
        "{err}"
    );
}
