//! One poll of a target: the descriptor (generation, tamper count) and
//! every progress box's counters, in two round trips.

use backdoor_abi::{Counter, CounterState, Level, PboxHeader, LINE, LINE_LEN, PBOX_MAGIC};
use backdoor_proto::{Client, ClientError};

use crate::judge::{BoxObs, CounterObs, Observation};

/// Reads the descriptor and all counters (two round trips and more).
pub fn observe(client: &mut Client) -> Result<Observation, ClientError> {
    client.describe()?;
    observe_counters(client)
}

/// Reads all counters under the descriptor the client already has; a
/// guest reboot shows up as a STALE_GENERATION refusal, after which the
/// caller re-describes. One round trip per progress box.
pub fn observe_counters(client: &mut Client) -> Result<Observation, ClientError> {
    let d = client.descriptor().clone();
    let mut counters = Vec::new();
    let mut boxes = Vec::new();
    for h in d.hooks.iter().filter(|h| h.kind == "progress_box") {
        let header = client.read(h.id, 0, LINE_LEN)?;
        let hdr = PboxHeader::from_bytes(&header.try_into().unwrap_or([0; LINE]));
        let problem = header_problem(&hdr);
        boxes.push(BoxObs {
            hook: h.name.clone(),
            problem: problem.clone(),
        });
        if problem.is_some() {
            // A progress box the guest never initialised (or scribbled on):
            // nothing to judge in it; the judge decides what that means.
            continue;
        }
        let max = (h.len / LINE as u64).saturating_sub(1);
        let n = u64::from(hdr.capacity).min(max);
        if n == 0 {
            continue;
        }
        let len = u32::try_from(n * LINE as u64)
            .unwrap_or(u32::MAX)
            .min(backdoor_proto::wire::MAX_READ);
        let bytes = client.read(h.id, LINE as u64, len)?;
        for (slot, chunk) in (0u32..).zip(bytes.chunks_exact(LINE)) {
            let mut c = Counter::from_bytes(chunk.try_into().expect("64-byte chunk"));
            if c.id == 0 || c.state() == Some(CounterState::Free) {
                continue;
            }
            // An application writes its counter's level itself: OS is
            // believed only of slots in kernel-only memory (docs/abi.md).
            let claimed_os =
                c.level() == Some(Level::Os) && hdr.kernel_slots != 0 && slot >= hdr.kernel_slots;
            if claimed_os {
                c.level = Level::Application as u8;
            }
            counters.push(CounterObs {
                hook: h.name.clone(),
                slot,
                claimed_os,
                counter: c,
            });
        }
    }
    // The host's view of the vCPU threads, if this agent's VMM gives it
    // (an agent serving a memfd without a VMM does not: asked once).
    let sched = client
        .sched_if_served()?
        .map(|r| std::sync::Arc::new(r.vcpus));
    Ok(Observation {
        generation: d.generation,
        tamper_count: d.tamper_count,
        sealed: d.sealed,
        boxes,
        counters,
        sched,
    })
}

/// What makes a progress box header unusable, if anything.
fn header_problem(hdr: &PboxHeader) -> Option<String> {
    if hdr.magic != PBOX_MAGIC {
        Some(format!("bad magic {:#010x}", hdr.magic))
    } else if usize::from(hdr.header_size) != LINE || hdr.counter_size as usize != LINE {
        Some(format!(
            "header size {} / counter size {}, not {LINE}",
            hdr.header_size, hdr.counter_size
        ))
    } else {
        None
    }
}

/// A counter for people and JSON: state and level by name ("?" where the
/// guest wrote a value the ABI lacks).
pub fn counter_json(c: &CounterObs) -> serde_json::Value {
    serde_json::json!({
        "hook": c.hook, "name": c.name(), "id": c.counter.id, "value": c.counter.value,
        "deadline_ms": c.counter.deadline_ms, "state": state_name(c), "level": level_name(c),
        "owner": c.counter.owner,
    })
}

/// "active", "idle", ...
pub fn state_name(c: &CounterObs) -> String {
    c.counter
        .state()
        .map_or("?".into(), |s| format!("{s:?}").to_lowercase())
}

/// "os", "application", "session".
pub fn level_name(c: &CounterObs) -> String {
    c.counter
        .level()
        .map_or("?".into(), |l| format!("{l:?}").to_lowercase())
}
