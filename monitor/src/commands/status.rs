//! `bdctl status`: a target's backdoor, hooks and counters.

use backdoor_proto::Role;
use serde_json::json;

use crate::cli::OneTarget;
use crate::{poll, Error};

/// `bdctl status`.
pub fn run(t: &OneTarget) -> Result<(), Error> {
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
            json!({"descriptor": d, "counters": counters, "vcpu_threads": obs.sched.as_deref(), "transport": c.data_path(), "not_verbs": why_soft})
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
    if let Some(threads) = &obs.sched {
        println!("vCPU threads (the host's view):");
        for t in threads.iter() {
            println!(
                "  vcpu {:<3} tid {:<8} state {:<5} ran {:>10.1} ms  waited for a CPU {:>10.1} ms",
                t.vcpu,
                t.tid,
                t.state,
                t.run_ns as f64 / 1e6,
                t.wait_ns as f64 / 1e6
            );
        }
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
