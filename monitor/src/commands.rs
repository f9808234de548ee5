//! The one-shot commands: status, read, write, cas, extract, resume, doctor.

use std::io::IsTerminal;
use std::time::Duration;

use backdoor_proto::auth::decode_hex;
use backdoor_proto::{Client, Role};
use serde_json::json;

use crate::cli::{CasArgs, DoctorArgs, ExtractArgs, OneTarget, ReadArgs, ResumeArgs, WriteArgs};
use crate::extract::{self, Extraction};
use crate::target::Target;
use crate::{poll, Error};

fn hook_id(c: &Client, hook: &str) -> Result<u32, Error> {
    c.descriptor()
        .hooks
        .iter()
        .find(|h| h.name == hook || h.id.to_string() == hook)
        .map(|h| h.id)
        .ok_or_else(|| {
            let names: Vec<_> = c
                .descriptor()
                .hooks
                .iter()
                .map(|h| format!("{} ({})", h.name, h.id))
                .collect();
            Error::Usage(format!(
                "no hook {hook:?}; this guest has: {}",
                names.join(", ")
            ))
        })
}

fn connect(t: &OneTarget, role: Role) -> Result<Client, Error> {
    Ok(t.target()?.connect(role, t.timeout())?)
}

/// `bdctl status`.
pub fn status(t: &OneTarget) -> Result<(), Error> {
    let (mut c, why_soft) = t.target()?.connect_explained(Role::Read, t.timeout())?;
    let transport = match (&why_soft, c.data_path()) {
        (Some(why), "soft") if t.transport != crate::target::Transport::Soft => {
            format!("soft (not verbs: {why})")
        }
        (_, path) => path.to_owned(),
    };
    let obs = poll::observe(&mut c)?;
    let d = c.descriptor().clone();
    if t.json {
        let counters: Vec<_> = obs.counters.iter().map(poll::counter_json).collect();
        println!(
            "{}",
            json!({"descriptor": d, "counters": counters, "transport": c.data_path(), "not_verbs": why_soft})
        );
        return Ok(());
    }
    println!(
        "vm {}  generation {}  sealed {}  tamper count {}  vmm alive {}  backends {}",
        d.vm,
        d.generation,
        d.sealed,
        d.tamper_count,
        d.vmm_alive,
        d.backends.join(",")
    );
    println!("transport {transport}");
    println!("hooks:");
    for h in &d.hooks {
        println!(
            "  {:>3} {:<14} {:<20} {:>10} bytes  perms {}",
            h.id,
            h.kind,
            h.name,
            h.len,
            perms(h.perms)
        );
    }
    println!("counters:");
    for c in &obs.counters {
        println!(
            "  {:<24} {:<12} {:<8} value {:>12}  deadline {:>6} ms  owner {}",
            c.name(),
            poll::level_name(c),
            poll::state_name(c),
            c.counter.value,
            c.counter.deadline_ms,
            c.counter.owner
        );
    }
    Ok(())
}

fn perms(p: u32) -> String {
    [(1, 'r'), (2, 'w'), (4, 'a')]
        .iter()
        .map(|&(b, ch)| if p & b != 0 { ch } else { '-' })
        .collect()
}

/// `bdctl read`.
pub fn read(a: &ReadArgs) -> Result<(), Error> {
    let mut c = connect(&a.t, Role::Read)?;
    let id = hook_id(&c, &a.hook)?;
    let b = c.read(id, a.offset, a.len)?;
    if a.t.json {
        println!(
            "{}",
            json!({"hook": a.hook, "offset": a.offset, "hex": hex::encode(&b)})
        );
    } else {
        for (i, chunk) in b.chunks(16).enumerate() {
            let ascii: String = chunk
                .iter()
                .map(|&x| {
                    if (0x20..0x7f).contains(&x) {
                        x as char
                    } else {
                        '.'
                    }
                })
                .collect();
            println!(
                "{:08x}  {:<48} {ascii}",
                a.offset + i as u64 * 16,
                chunk
                    .iter()
                    .map(|x| format!("{x:02x} "))
                    .collect::<String>()
            );
        }
    }
    Ok(())
}

/// `bdctl write`.
pub fn write(a: &WriteArgs) -> Result<(), Error> {
    let data = decode_hex(&a.hex).ok_or_else(|| Error::Usage(format!("{:?} is not hex", a.hex)))?;
    let mut c = connect(&a.t, Role::Repair)?;
    let id = hook_id(&c, &a.hook)?;
    c.write(id, a.offset, &data)?;
    println!("wrote {} bytes at {}+{}", data.len(), a.hook, a.offset);
    Ok(())
}

/// `bdctl cas`.
pub fn cas(a: &CasArgs) -> Result<(), Error> {
    let mut c = connect(&a.t, Role::Repair)?;
    let id = hook_id(&c, &a.hook)?;
    let old = c.cas(id, a.offset, a.expected, a.new)?;
    let swapped = old == a.expected;
    if a.t.json {
        println!("{}", json!({"old": old, "swapped": swapped}));
    } else {
        println!(
            "old value {old}: {}",
            if swapped { "swapped" } else { "not swapped" }
        );
    }
    Ok(())
}

/// `bdctl extract`.
pub fn extract(a: &ExtractArgs) -> Result<Extraction, Error> {
    let mut c = connect(&a.t, Role::Read)?;
    let bar = std::io::stderr().is_terminal().then(|| {
        let b = indicatif::ProgressBar::new(0);
        b.set_style(
            indicatif::ProgressStyle::with_template(
                "{msg} [{bar:40}] {bytes}/{total_bytes} {bytes_per_sec}",
            )
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
        );
        b.set_message("extracting");
        b
    });
    let x = extract::extract(&mut c, a.service.as_deref(), &mut |done, total| {
        if let Some(b) = &bar {
            b.set_length(total);
            b.set_position(done);
        }
    })?;
    if let Some(b) = bar {
        b.finish_and_clear();
    }
    let text = serde_json::to_string_pretty(&x).map_err(|e| Error::Other(e.to_string()))?;
    match &a.out {
        Some(p) => std::fs::write(p, text + "\n")
            .map_err(|e| Error::Other(format!("{}: {e}", p.display())))?,
        None => println!("{text}"),
    }
    if let Some(dir) = &a.raw {
        std::fs::create_dir_all(dir)
            .map_err(|e| Error::Other(format!("{}: {e}", dir.display())))?;
        for s in &x.sessions {
            let p = dir.join(format!("{}-{}.bin", s.service, s.session_id));
            std::fs::write(&p, s.payload().unwrap_or_default())
                .map_err(|e| Error::Other(format!("{}: {e}", p.display())))?;
        }
    }
    let s = &x.summary;
    eprintln!(
        "bdctl: extracted {} sessions from {} (generation {}): {} slots, {} records accepted ({} after re-reading torn copies), {} torn, {} corrupt, {} empty",
        x.sessions.len(), x.vm, x.generation, s.slots, s.accepted, s.retried, s.torn, s.corrupt, s.empty
    );
    for p in &x.problems {
        eprintln!(
            "bdctl: {} slot {}: {} ({})",
            p.hook,
            p.slot.map_or("-".into(), |s| s.to_string()),
            p.kind,
            p.detail
        );
    }
    Ok(x)
}

/// `bdctl resume`: writes each session's record into the target's inbox,
/// then the doorbell (last, so the guest never sees a half-filled inbox).
pub fn resume(a: &ResumeArgs) -> Result<usize, Error> {
    let text = std::fs::read_to_string(&a.from)
        .map_err(|e| Error::Other(format!("{}: {e}", a.from.display())))?;
    let x: Extraction = serde_json::from_str(&text).map_err(|e| {
        Error::Usage(format!(
            "{} is not a bdctl extraction: {e}",
            a.from.display()
        ))
    })?;
    let sessions: Vec<_> = x
        .sessions
        .iter()
        .filter(|s| a.service.as_deref().is_none_or(|svc| svc == s.service))
        .collect();
    let mut c = connect(&a.t, Role::Repair)?;
    let id = hook_id(&c, &a.hook)?;
    let hook_len = c
        .descriptor()
        .hooks
        .iter()
        .find(|h| h.id == id)
        .map_or(0, |h| h.len);
    let capacity = hook_len.saturating_sub(a.inbox_offset) / u64::from(a.slot_size.max(1));
    if sessions.len() as u64 > capacity {
        return Err(Error::Usage(format!(
            "{} sessions do not fit the inbox's {capacity} slots",
            sessions.len()
        )));
    }
    let doorbell = u64::from_le_bytes(
        c.read(id, a.doorbell_offset, 8)?
            .try_into()
            .unwrap_or([0; 8]),
    );
    if doorbell != 0 {
        return Err(Error::Usage(format!(
            "the inbox of {} already holds {doorbell} records; hand-offs go to a fresh instance",
            x.vm
        )));
    }
    for (k, s) in sessions.iter().enumerate() {
        let payload = s.payload().ok_or_else(|| {
            Error::Usage(format!("session {} has a bad payload_hex", s.session_id))
        })?;
        let rec = backdoor_abi::record::encode(
            &s.service,
            s.session_id,
            s.version,
            s.stage,
            &payload,
            a.slot_size as usize,
        )
        .ok_or_else(|| {
            Error::Usage(format!(
                "session {}'s payload does not fit a {}-byte slot",
                s.session_id, a.slot_size
            ))
        })?;
        c.write(id, a.inbox_offset + k as u64 * u64::from(a.slot_size), &rec)?;
    }
    c.write(
        id,
        a.doorbell_offset,
        &(sessions.len() as u64).to_le_bytes(),
    )?;
    println!(
        "bdctl: handed {} sessions from {} (generation {}) to {}",
        sessions.len(),
        x.vm,
        x.generation,
        a.t.target
    );
    Ok(sessions.len())
}

/// `bdctl doctor`.
pub fn doctor(a: &DoctorArgs) -> Result<(), Error> {
    for b in backdoor_proto::doctor::backends() {
        println!(
            "{:<6} {:<10} {}",
            b.name,
            if b.usable { "usable" } else { "unusable" },
            b.detail
        );
    }
    if let Some(spec) = &a.target {
        let keys = a
            .key_file
            .as_deref()
            .ok_or_else(|| Error::Usage("give --key-file with a target".into()))?;
        let t = Target::parse(spec, keys)?;
        let start = std::time::Instant::now();
        let c = t.connect(Role::Read, Duration::from_secs(2))?;
        let d = c.descriptor();
        println!(
            "target {}: reachable and authenticated in {:.1} ms; generation {}, sealed {}, {} hooks, backends {}",
            t.name,
            start.elapsed().as_secs_f64() * 1e3,
            d.generation,
            d.sealed,
            d.hooks.len(),
            d.backends.join(",")
        );
    }
    Ok(())
}
