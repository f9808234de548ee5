//! QEMU as the peer users run today: a `qemu-system-x86_64 -M microvm
//! -accel kvm` whose guest RAM (a shared file on tmpfs) holds the same
//! bytes at the same guest addresses as a bdvmm guest, driven over QMP the
//! way a user would get at a hung guest's memory: `stop` +
//! `dump-guest-memory`, `pmemsave` of a known region, HMP `xp`.
//!
//! The guest itself runs nothing (a firmware of one `hlt` loop): what is
//! measured is QEMU's path to guest memory, not the guest.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

/// The QEMU binary, if installed.
pub fn binary() -> Option<PathBuf> {
    [
        "/usr/bin/qemu-system-x86_64",
        "/usr/local/bin/qemu-system-x86_64",
    ]
    .iter()
    .map(PathBuf::from)
    .find(|p| p.exists())
}

/// Firmware code that halts for good.
pub const HALT: &[u8] = &[0xf4, 0xeb, 0xfd];

/// Firmware code that polls COM1's line status until a byte arrives, then
/// writes port 0xf4 (`-device isa-debug-exit,iobase=0xf4`): `1: mov dx,
/// 0x3fd; in al, dx; test al, 1; jz 1b; mov al, 0; out 0xf4, al; hlt`.
pub const EXIT_ON_KEY: &[u8] = &[
    0xba, 0xfd, 0x03, 0xec, 0xa8, 0x01, 0x74, 0xf8, 0xb0, 0x00, 0xe6, 0xf4, 0xf4, 0xeb, 0xfd,
];

/// A 64-KiB firmware for microvm (`-bios`): at the reset vector, the
/// real-mode bytes `first` (at most 11), then a far jump to `then` at the
/// firmware's start.
pub fn firmware(first: &[u8], then: &[u8]) -> Vec<u8> {
    let mut fw = vec![0x90u8; 64 << 10];
    fw[..then.len()].copy_from_slice(then);
    let jump = 0xfff0 + first.len();
    fw[0xfff0..jump].copy_from_slice(first);
    fw[jump..jump + 5].copy_from_slice(&[0xea, 0x00, 0x00, 0x00, 0xf0]);
    fw
}

/// `bin -M microvm,memory-backend=ram -accel kvm -nodefaults
/// -no-user-config -display none` with `mib` MiB of RAM, `ram_object`
/// (the `-object` defining the backend `ram`) and firmware `fw`.
pub fn microvm(bin: &Path, mib: u64, ram_object: &str, fw: &Path) -> Command {
    let mut cmd = Command::new(bin);
    cmd.args(["-M", "microvm,memory-backend=ram", "-accel", "kvm"])
        .args(["-nodefaults", "-no-user-config", "-display", "none"])
        .args(["-m", &format!("{mib}M"), "-object", ram_object, "-bios"])
        .arg(fw);
    cmd
}

/// The second QMP monitor's socket, in [`Qemu::dir`].
const FRESH_QMP: &str = "qmp-fresh.sock";

/// A QMP connection.
#[derive(Debug)]
pub struct Qmp {
    r: BufReader<UnixStream>,
    w: UnixStream,
}

impl Qmp {
    fn connect(path: &Path, timeout: Duration) -> Result<Self, String> {
        let deadline = Instant::now() + timeout;
        let s = loop {
            match UnixStream::connect(path) {
                Ok(s) => break s,
                Err(_) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(10))
                }
                Err(e) => return Err(format!("QMP socket {}: {e}", path.display())),
            }
        };
        s.set_read_timeout(Some(Duration::from_secs(60)))
            .map_err(|e| e.to_string())?;
        let w = s.try_clone().map_err(|e| e.to_string())?;
        let mut q = Self {
            r: BufReader::new(s),
            w,
        };
        let mut greeting = String::new();
        q.r.read_line(&mut greeting)
            .map_err(|e| format!("QMP greeting: {e}"))?;
        q.cmd("qmp_capabilities", Value::Null)?;
        Ok(q)
    }

    /// Runs `execute` with `arguments` (Null: none); its `return`.
    pub fn cmd(&mut self, execute: &str, arguments: Value) -> Result<Value, String> {
        let mut req = json!({ "execute": execute });
        if !arguments.is_null() {
            req["arguments"] = arguments;
        }
        writeln!(self.w, "{req}").map_err(|e| format!("QMP {execute}: {e}"))?;
        loop {
            let mut line = String::new();
            let n = self
                .r
                .read_line(&mut line)
                .map_err(|e| format!("QMP {execute}: {e}"))?;
            if n == 0 {
                return Err(format!("QMP {execute}: QEMU closed the connection"));
            }
            let v: Value =
                serde_json::from_str(&line).map_err(|e| format!("QMP {execute}: {e}"))?;
            if let Some(r) = v.get("return") {
                return Ok(r.clone());
            }
            if let Some(e) = v.get("error") {
                return Err(format!("QMP {execute}: {e}"));
            }
            // An asynchronous event (STOP, RESUME, ...): not our answer.
        }
    }

    /// HMP through QMP (`human-monitor-command`): its text.
    pub fn hmp(&mut self, line: &str) -> Result<String, String> {
        let r = self.cmd("human-monitor-command", json!({ "command-line": line }))?;
        Ok(r.as_str().unwrap_or_default().to_owned())
    }

    /// `pmemsave` of `len` bytes at guest-physical `gpa` into `file`.
    pub fn pmemsave(&mut self, gpa: u64, len: u64, file: &Path) -> Result<(), String> {
        self.cmd(
            "pmemsave",
            json!({"val": gpa, "size": len, "filename": file.display().to_string()}),
        )
        .map(|_| ())
    }
}

/// A running QEMU with its guest RAM in a file under /dev/shm.
#[derive(Debug)]
pub struct Qemu {
    child: Child,
    /// Its QMP connection.
    pub qmp: Qmp,
    /// A directory on tmpfs for its files (RAM, dumps, pmemsave output).
    pub dir: tempfile::TempDir,
}

impl Qemu {
    /// Starts a microvm of `ram.len()` bytes of RAM holding `ram`.
    pub fn start(ram: &[u8]) -> Result<Self, String> {
        let bin =
            binary().ok_or("qemu-system-x86_64 is not installed (tools/deps.sh ensure lab)")?;
        let dir = tempfile::Builder::new()
            .prefix("bdbench-qemu")
            .tempdir_in("/dev/shm")
            .map_err(|e| format!("a directory on /dev/shm: {e}"))?;
        let ram_path = dir.path().join("ram");
        write_sparse(&ram_path, ram).map_err(|e| format!("QEMU's RAM file: {e}"))?;
        // The firmware only halts.
        let fw_path = dir.path().join("fw.bin");
        std::fs::write(&fw_path, firmware(&[], HALT)).map_err(|e| format!("firmware: {e}"))?;
        let sock = dir.path().join("qmp.sock");
        let mib = ram.len() as u64 >> 20;
        let ram_object = format!(
            "memory-backend-file,id=ram,size={mib}M,mem-path={},share=on",
            ram_path.display()
        );
        let child = microvm(&bin, mib, &ram_object, &fw_path)
            .arg("-qmp")
            .arg(format!("unix:{},server=on,wait=off", sock.display()))
            // A second monitor for one-shot connections (a QMP socket
            // serves one client at a time; the first stays open).
            .arg("-qmp")
            .arg(format!(
                "unix:{},server=on,wait=off",
                dir.path().join(FRESH_QMP).display()
            ))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|e| format!("start QEMU: {e}"))?;
        let mut child = child;
        match Qmp::connect(&sock, Duration::from_secs(20)) {
            Ok(qmp) => Ok(Self { child, qmp, dir }),
            Err(e) => {
                let _ = child.kill();
                let _ = child.wait();
                Err(e)
            }
        }
    }

    /// A new QMP connection, as a script that runs one command opens
    /// (greeting and `qmp_capabilities` done), on the second monitor.
    pub fn fresh_qmp(&self) -> Result<Qmp, String> {
        Qmp::connect(&self.dir.path().join(FRESH_QMP), Duration::from_secs(5))
    }

    /// QEMU's version string.
    pub fn version(&mut self) -> String {
        self.qmp
            .cmd("query-version", Value::Null)
            .ok()
            .and_then(|v| {
                let q = &v["qemu"];
                Some(format!(
                    "{}.{}.{}",
                    q["major"].as_u64()?,
                    q["minor"].as_u64()?,
                    q["micro"].as_u64()?
                ))
            })
            .unwrap_or_else(|| "?".into())
    }

    /// `stop`, `dump-guest-memory` (ELF, no paging) to a file on tmpfs,
    /// `cont`; the dump file.
    pub fn stop_dump_cont(&mut self) -> Result<PathBuf, String> {
        let out = self.dir.path().join("guest.dump");
        let _ = std::fs::remove_file(&out);
        self.qmp.cmd("stop", Value::Null)?;
        self.qmp.cmd(
            "dump-guest-memory",
            json!({"paging": false, "protocol": format!("file:{}", out.display())}),
        )?;
        self.qmp.cmd("cont", Value::Null)?;
        Ok(out)
    }
}

/// Writes `bytes` to a new file at `path`, leaving its all-zero pages
/// holes: a guest's RAM is mostly untouched, and tmpfs then keeps only
/// what the guest wrote.
fn write_sparse(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::{Seek, SeekFrom};
    let mut f = std::fs::File::create(path)?;
    f.set_len(bytes.len() as u64)?;
    for (i, page) in bytes.chunks(4096).enumerate() {
        if page.iter().any(|&b| b != 0) {
            f.seek(SeekFrom::Start(i as u64 * 4096))?;
            f.write_all(page)?;
        }
    }
    Ok(())
}

impl Drop for Qemu {
    fn drop(&mut self) {
        let _ = self.qmp.cmd("quit", Value::Null);
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The guest RAM inside an ELF core dump from `dump-guest-memory`: each
/// PT_LOAD segment's guest-physical address and bytes (microvm's RAM
/// comes in pieces around the firmware's window below 1 MiB).
pub fn elf_loads(dump: &[u8]) -> Vec<(u64, &[u8])> {
    let u16_at = |o: usize| Some(u16::from_le_bytes(dump.get(o..o + 2)?.try_into().ok()?));
    let u32_at = |o: usize| Some(u32::from_le_bytes(dump.get(o..o + 4)?.try_into().ok()?));
    let u64_at = |o: usize| Some(u64::from_le_bytes(dump.get(o..o + 8)?.try_into().ok()?));
    if dump.get(..5) != Some(b"\x7fELF\x02") {
        return Vec::new();
    }
    let (Some(phoff), Some(phentsize), Some(phnum)) = (u64_at(0x20), u16_at(0x36), u16_at(0x38))
    else {
        return Vec::new();
    };
    (0..usize::from(phnum))
        .filter_map(|i| {
            let ph = usize::try_from(phoff).ok()? + i * usize::from(phentsize);
            (u32_at(ph)? == 1).then_some(())?; // PT_LOAD
            let off = usize::try_from(u64_at(ph + 8)?).ok()?;
            let paddr = u64_at(ph + 24)?;
            let len = usize::try_from(u64_at(ph + 32)?).ok()?;
            Some((paddr, dump.get(off..off.checked_add(len)?)?))
        })
        .collect()
}
