//! An evidence bundle of a guest, taken over the backdoor with no guest
//! CPU: its counters, its sessions, the tail of its kernel log, and where
//! each vCPU is (registers, and the kernel function or module code at
//! RIP), with how long each part took. `bdctl evidence` writes one on
//! demand; `bdctl watch --evidence-dir` writes one on a hang before it runs
//! any action. Each part is taken on its own: one that fails is tried once
//! more on a new connection (a reply that timed out leaves the old one
//! mid-stream), then recorded with its error, and the others are still
//! taken. A bundle reads megabytes where a poll reads a page, and is taken
//! when the machine may be at its worst: each reply is waited for at least
//! [`MIN_REPLY_WAIT`].

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use backdoor_proto::{Client, Role};
use serde_json::{json, Value};

use crate::kernel::symbols::Symbols;
use crate::kernel::{kernel_log, kernel_symbols, KernelFiles};
use crate::target::Target;
use crate::{extract, poll};

/// The least time a bundle waits for one reply, whatever the poll timeout.
pub const MIN_REPLY_WAIT: Duration = Duration::from_secs(5);

/// What a bundle is taken with.
#[derive(Debug, Default)]
pub struct EvidenceOptions {
    /// The guest kernel's System.map and vmlinux, if at hand.
    pub files: KernelFiles,
    /// The symbols of backdoor.ko (its `.ko`), to name code in it.
    pub module: Option<Symbols>,
    /// Kernel log lines kept (the newest).
    pub lines: usize,
    /// Read through the VMM's forensic view (forensic key) as well.
    pub forensic: bool,
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// The bundle's connection, made again after a part fails on it.
struct Conn<'a> {
    target: &'a Target,
    role: Role,
    timeout: Duration,
    client: Option<Client>,
}

impl Conn<'_> {
    fn client(&mut self) -> Result<&mut Client, String> {
        if self.client.is_none() {
            let c = self.target.connect(self.role, self.timeout);
            self.client =
                Some(c.map_err(|e| format!("connecting: {e}", e = backdoor_abi::ErrorChain(&e)))?);
        }
        self.client
            .as_mut()
            .ok_or_else(|| "no connection".to_string())
    }
}

/// Runs `f`, recording its result (or error) and time under `name`; a
/// failure is tried once more on a new connection, and the first error
/// kept under `retried`.
fn part(
    bundle: &mut Value,
    name: &str,
    conn: &mut Conn,
    mut f: impl FnMut(&mut Client) -> Result<Value, String>,
) -> Option<Value> {
    let t = Instant::now();
    let mut r = conn.client().and_then(&mut f);
    if let Err(first) = &r {
        bundle["retried"][name] = json!(first);
        conn.client = None;
        r = conn.client().and_then(&mut f);
    }
    bundle["timings_ms"][name] = json!(t.elapsed().as_secs_f64() * 1e3);
    match r {
        Ok(v) => {
            bundle[name] = v.clone();
            Some(v)
        }
        Err(e) => {
            bundle["errors"][name] = json!(e);
            None
        }
    }
}

/// `module backdoor text=<hex> size=<n>` from the driver's `kinfo` hook.
fn module_text(c: &mut Client) -> Option<(u64, u64)> {
    let hook = c
        .descriptor()
        .hooks
        .iter()
        .find(|h| h.kind == "kernel" && h.name == "kinfo")?
        .id;
    let b = c.read(hook, 0, 4096).ok()?;
    let text = String::from_utf8_lossy(&b[..b.iter().position(|&x| x == 0).unwrap_or(b.len())])
        .into_owned();
    let line = text.lines().find(|l| l.starts_with("module backdoor "))?;
    let field = |k: &str| line.split_whitespace().find_map(|w| w.strip_prefix(k));
    Some((
        u64::from_str_radix(field("text=")?, 16).ok()?,
        field("size=")?.parse().ok()?,
    ))
}

/// The name of the code at `rip`: a kernel function (System.map), code of
/// backdoor.ko (its own symbols, or just the module), or nothing known.
fn name_code(
    rip: u64,
    kernel: Option<&Symbols>,
    module: Option<(&Symbols, u64, u64)>,
) -> Option<String> {
    if let Some((syms, base, size)) = module {
        if (base..base + size).contains(&rip) {
            return Some(match syms.locate(rip, size) {
                Some((f, off)) => format!("{f}+{off:#x} [backdoor]"),
                None => format!("[backdoor]+{:#x}", rip - base),
            });
        }
    }
    let (f, off) = kernel?.locate(rip, 1 << 20)?;
    Some(format!("{f}+{off:#x}"))
}

/// Takes a bundle of `target`; `verdict` is the event that asked for it.
pub fn capture(
    target: &Target,
    verdict: Option<&Value>,
    opts: &mut EvidenceOptions,
    timeout: Duration,
) -> Value {
    let started = Instant::now();
    let mut b = json!({
        "target": target.name,
        "addr": target.addr,
        "captured_unix_ms": now_ms(),
        "verdict": verdict,
        "timings_ms": {},
        "errors": {},
    });
    let role = if opts.forensic {
        Role::Forensic
    } else {
        Role::Read
    };
    let mut conn = Conn {
        target,
        role,
        timeout: timeout.max(MIN_REPLY_WAIT),
        client: None,
    };
    if let Err(e) = conn.client() {
        b["errors"]["connect"] = json!(e);
        return b;
    }
    part(&mut b, "counters", &mut conn, |c| {
        let obs = poll::observe(c).map_err(|e| backdoor_abi::ErrorChain(&e).to_string())?;
        let d = c.descriptor().clone();
        Ok(json!({
            "descriptor": d,
            "counters": obs.counters.iter().map(poll::counter_json).collect::<Vec<_>>(),
        }))
    });
    // The kernel log first: it says where the kernel's code is (KASLR).
    let mut found = None;
    part(&mut b, "kernel_log", &mut conn, |c| {
        let k = kernel_log(c, &opts.files).map_err(|e| backdoor_abi::ErrorChain(&e).to_string())?;
        let lines: Vec<String> = k.log.records.iter().flat_map(|r| r.lines()).collect();
        let tail = lines[lines.len().saturating_sub(opts.lines)..].to_vec();
        let v = json!({
            "via": k.via, "layout_from": k.layout_from, "found": k.found, "release": k.release,
            "kaslr_offset": k.kaslr_offset, "image_start": k.image_start,
            "records": k.log.records.len(),
            "lines": tail, "damage": k.log.damage, "unusable": k.log.unusable,
        });
        found = Some(k);
        Ok(v)
    });
    // Kernel code is named with the operator's System.map, else with the
    // kernel's own kallsyms where the forensic view reaches them.
    let mut kallsyms = None;
    if let Some(map) = opts.files.system_map.as_mut() {
        // vmcoreinfo's KASLR offset, else where the page tables map _text.
        map.bias = 0;
        let text = map.address("_text");
        let bias = found.as_ref().and_then(|k| {
            k.kaslr_offset
                .or_else(|| Some(k.image_start?.wrapping_sub(text?)))
        });
        if let Some(off) = bias {
            map.bias = off;
        }
        b["kernel_symbols"] = json!({"from": "System.map", "count": map.len(), "bias": bias});
    } else if let Some(k) = found.as_ref().filter(|_| opts.forensic) {
        part(&mut b, "kernel_symbols", &mut conn, |c| {
            let (syms, how) = kernel_symbols(c, k)?;
            let v = json!({"from": how, "count": syms.len()});
            kallsyms = Some(syms);
            Ok(v)
        });
    }
    let module = conn.client().ok().and_then(module_text);
    if let (Some(m), Some((base, _))) = (opts.module.as_mut(), module) {
        m.bias = base;
    }
    let no_symbols = Symbols::default();
    let kernel_syms = opts.files.system_map.as_ref().or(kallsyms.as_ref());
    let module_syms =
        module.map(|(base, size)| (opts.module.as_ref().unwrap_or(&no_symbols), base, size));
    part(&mut b, "vcpus", &mut conn, |c| {
        let mut v = c
            .vcpus()
            .map_err(|e| backdoor_abi::ErrorChain(&e).to_string())?;
        for cpu in v["vcpus"].as_array_mut().into_iter().flatten() {
            if let Some(rip) = cpu["rip"].as_u64() {
                cpu["function"] = json!(name_code(rip, kernel_syms, module_syms));
            }
        }
        Ok(v)
    });
    part(&mut b, "sessions", &mut conn, |c| {
        let x = extract::extract(c, None, &mut |_, _| {})
            .map_err(|e| backdoor_abi::ErrorChain(&e).to_string())?;
        serde_json::to_value(x).map_err(|e| backdoor_abi::ErrorChain(&e).to_string())
    });
    b["timings_ms"]["total"] = json!(started.elapsed().as_secs_f64() * 1e3);
    b
}

/// Writes `bundle` to `dir/<target>-<time>.evidence.json`; returns the path.
pub fn write_bundle(dir: &Path, target: &str, bundle: &Value) -> Result<PathBuf, String> {
    std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    let file = dir.join(format!("{target}-{}.evidence.json", now_ms()));
    write_file(&file, bundle)?;
    Ok(file)
}

/// Writes `bundle` to `file` (atomically: a partial bundle is never seen).
pub fn write_file(file: &Path, bundle: &Value) -> Result<(), String> {
    let tmp = file.with_extension("tmp");
    let text = serde_json::to_string_pretty(bundle)
        .map_err(|e| backdoor_abi::ErrorChain(&e).to_string())?;
    std::fs::write(&tmp, text).map_err(|e| format!("{}: {e}", tmp.display()))?;
    std::fs::rename(&tmp, file).map_err(|e| format!("{}: {e}", file.display()))
}
