//! CPU pinning for the overhead section: the guest's vCPU thread alone on
//! one core, everything else (bdvmm's other threads, the monitor, the
//! agent, this harness) on the others, the way a host that sells vCPUs
//! places them. It separates what the monitor itself costs the guest from
//! what the host scheduler's placement costs it on a small machine.

use std::io;

/// The CPUs this thread may run on now.
pub fn current() -> io::Result<Vec<usize>> {
    // SAFETY: cpu_set_t is plain data; zeroed is the empty set.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    // SAFETY: pid 0 is the calling thread; the size matches the set.
    let rc = unsafe { libc::sched_getaffinity(0, std::mem::size_of_val(&set), &mut set) };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: CPU_ISSET reads the set filled in above, within CPU_SETSIZE.
    Ok((0..libc::CPU_SETSIZE as usize)
        .filter(|&c| unsafe { libc::CPU_ISSET(c, &set) })
        .collect())
}

/// Restricts thread `tid` (0: the calling thread) to `cpus`.
pub fn pin(tid: i32, cpus: &[usize]) -> io::Result<()> {
    // SAFETY: cpu_set_t is plain data; zeroed is the empty set.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    for &c in cpus {
        // SAFETY: CPU_SET writes bit c of the set; callers pass CPUs
        // below CPU_SETSIZE (from `current`).
        unsafe { libc::CPU_SET(c, &mut set) };
    }
    // SAFETY: the size matches the set; an unknown tid is an error return.
    let rc = unsafe { libc::sched_setaffinity(tid, std::mem::size_of_val(&set), &set) };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// The threads of process `pid`: (tid, name).
pub fn threads(pid: u32) -> io::Result<Vec<(i32, String)>> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(format!("/proc/{pid}/task"))? {
        let path = entry?.path();
        let Some(tid) = path
            .file_name()
            .and_then(|n| n.to_str())
            .and_then(|n| n.parse::<i32>().ok())
        else {
            continue;
        };
        let comm = std::fs::read_to_string(path.join("comm")).unwrap_or_default();
        out.push((tid, comm));
    }
    Ok(out)
}

/// Puts process `pid`'s threads named `vcpu*` on `vcpu_cpu` and its other
/// threads on `rest`. Returns how many vCPU threads were pinned.
pub fn pin_vm(pid: u32, vcpu_cpu: usize, rest: &[usize]) -> io::Result<usize> {
    let mut vcpus = 0;
    for (tid, comm) in threads(pid)? {
        if comm.starts_with("vcpu") {
            pin(tid, &[vcpu_cpu])?;
            vcpus += 1;
        } else {
            pin(tid, rest)?;
        }
    }
    Ok(vcpus)
}
