//! The host's view of a VMM's vCPU threads: how long each ran, how long it
//! waited for a CPU while runnable, and its state, from
//! `/proc/<pid>/task/<tid>/{schedstat,stat}`. It lets a monitor tell a
//! guest whose counters stopped because it is stuck from one whose vCPUs
//! the host did not run (docs/wire.md, `SCHED`). Nothing here comes from
//! guest memory: the guest can neither forge nor hide it.

pub use backdoor_proto::sched::ThreadSched;

/// Reads thread `tid` of process `pid` (None fields read as "gone" and 0).
pub fn read_thread(pid: u32, vcpu: u8, tid: i32) -> ThreadSched {
    let dir = format!("/proc/{pid}/task/{tid}");
    let state = std::fs::read_to_string(format!("{dir}/stat"))
        .ok()
        .and_then(|s| state_of(&s))
        .unwrap_or_else(|| "gone".into());
    let (run_ns, wait_ns) = std::fs::read_to_string(format!("{dir}/schedstat"))
        .ok()
        .and_then(|s| times_of(&s))
        .unwrap_or((0, 0));
    ThreadSched {
        vcpu,
        tid,
        state,
        run_ns,
        wait_ns,
    }
}

/// Every vCPU thread of `pid`, as `{"vcpus": [...]}`.
pub fn report(pid: u32, tids: &[(u8, i32)]) -> serde_json::Value {
    let vcpus: Vec<_> = tids
        .iter()
        .map(|&(vcpu, tid)| read_thread(pid, vcpu, tid))
        .collect();
    serde_json::json!({ "vcpus": vcpus })
}

/// The vCPU threads of process `pid`, found by name: bdvmm names each
/// `vcpuN` (N its index), so the agent needs nothing from the VMM to find
/// them, not even a report the VMM may have had no time to push.
pub fn vcpu_threads(pid: u32) -> Vec<(u8, i32)> {
    let Ok(dir) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return Vec::new();
    };
    let mut found: Vec<(u8, i32)> = dir
        .filter_map(Result::ok)
        .filter_map(|e| {
            let tid: i32 = e.file_name().to_str()?.parse().ok()?;
            let comm = std::fs::read_to_string(e.path().join("comm")).ok()?;
            let vcpu = comm.trim_end().strip_prefix("vcpu")?.parse().ok()?;
            Some((vcpu, tid))
        })
        .collect();
    found.sort_unstable();
    found
}

/// The state letter of a `stat` line: after the last ')' (the command
/// name may hold spaces and parentheses).
fn state_of(stat: &str) -> Option<String> {
    let rest = &stat[stat.rfind(')')? + 1..];
    rest.split_whitespace().next().map(str::to_owned)
}

/// `schedstat`: run time, wait time (ns), timeslices.
fn times_of(schedstat: &str) -> Option<(u64, u64)> {
    let mut f = schedstat.split_whitespace().map(str::parse::<u64>);
    Some((f.next()?.ok()?, f.next()?.ok()?))
}

/// This thread's id.
pub fn gettid() -> i32 {
    // SAFETY: gettid has no arguments and cannot fail.
    unsafe { libc::gettid() }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_and_schedstat_lines_are_parsed_whatever_the_command_name() {
        assert_eq!(state_of("1234 (vcpu (0) x) T 1 2 3").as_deref(), Some("T"));
        assert_eq!(state_of("garbage"), None);
        assert_eq!(times_of("123 456 7\n"), Some((123, 456)));
        assert_eq!(times_of("123"), None);
    }

    #[test]
    fn vcpu_threads_are_found_by_their_names() {
        let (tx, rx) = std::sync::mpsc::channel();
        let (stop_tx, stop_rx) = std::sync::mpsc::channel::<()>();
        let t = std::thread::Builder::new()
            .name("vcpu7".into())
            .spawn(move || {
                tx.send(gettid()).unwrap();
                let _ = stop_rx.recv();
            })
            .unwrap();
        let tid = rx.recv().unwrap();
        let found = vcpu_threads(std::process::id());
        stop_tx.send(()).unwrap();
        t.join().unwrap();
        assert!(found.contains(&(7, tid)), "{found:?}");
        assert!(vcpu_threads(u32::MAX).is_empty());
    }

    #[test]
    fn this_thread_runs_and_a_missing_one_is_gone() {
        let me = read_thread(std::process::id(), 0, gettid());
        assert_eq!(me.state, "R", "{me:?}");
        let gone = read_thread(std::process::id(), 1, i32::MAX);
        assert_eq!((gone.state.as_str(), gone.run_ns), ("gone", 0));
    }
}
