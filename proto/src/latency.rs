//! Short scheduler slices for threads that wake, answer and sleep again
//! (the agent's, a monitor's). On a core a vCPU thread keeps busy, a
//! woken thread of normal slice waits for the vCPU's slice to end, up to
//! a scheduler tick (4 ms measured, while the other core sat idle); one
//! that asks for a short slice (EEVDF's custom slice, Linux 6.12 and
//! later) preempts it at once. Its share of the CPU is unchanged: it only
//! runs sooner, and in shorter turns.

use std::time::Duration;

/// The shortest slice Linux grants (it clamps requests to 0.1-100 ms).
pub const SHORT_SLICE: Duration = Duration::from_micros(100);

/// `struct sched_attr` (include/uapi/linux/sched/types.h), version 1.
#[repr(C)]
struct SchedAttr {
    size: u32,
    policy: u32,
    flags: u64,
    nice: i32,
    priority: u32,
    runtime: u64,
    deadline: u64,
    period: u64,
    util_min: u32,
    util_max: u32,
}

/// Its size, as the kernel is told (version 1: 56 bytes).
const ATTR_SIZE: u32 = 56;
const _: () = assert!(std::mem::size_of::<SchedAttr>() == ATTR_SIZE as usize);
/// `SCHED_OTHER` (the normal policy) as `sched_attr.sched_policy` holds it.
const NORMAL: u32 = 0;
const _: () = assert!(libc::SCHED_OTHER == 0);

/// Asks for `slice` for the calling thread (threads it spawns later
/// inherit it), keeping the normal policy and its nice value. An older
/// kernel ignores the slice; an error comes back only if the call fails.
pub fn request_slice(slice: Duration) -> std::io::Result<()> {
    // SAFETY: getpriority reads the calling thread's nice value.
    let nice = unsafe { libc::getpriority(libc::PRIO_PROCESS, 0) };
    let attr = SchedAttr {
        size: ATTR_SIZE,
        policy: NORMAL,
        flags: 0,
        nice,
        priority: 0,
        runtime: u64::try_from(slice.as_nanos()).unwrap_or(u64::MAX),
        deadline: 0,
        period: 0,
        util_min: 0,
        util_max: 0,
    };
    // SAFETY: sched_setattr(0, ...) reads `attr`, of the size it states,
    // and changes only the calling thread.
    let r = unsafe { libc::syscall(libc::SYS_sched_setattr, 0, &raw const attr, 0) };
    if r == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// [`request_slice`] of [`SHORT_SLICE`]; a failure is logged once per
/// thread at debug level (a thread that cannot have it runs as before).
pub fn prefer_short_slices() {
    if let Err(e) = request_slice(SHORT_SLICE) {
        tracing::debug!("no short scheduler slice for this thread: {e}");
    }
}

/// Back to the kernel's default slice (a thread spawned by one that asked
/// for a short slice inherits it).
pub fn default_slices() {
    if let Err(e) = request_slice(Duration::ZERO) {
        tracing::debug!("cannot reset this thread's scheduler slice: {e}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The calling thread's slice as the kernel reports it (0: default,
    /// or a kernel without custom slices).
    fn slice_now() -> u64 {
        let mut attr = std::mem::MaybeUninit::<SchedAttr>::zeroed();
        // SAFETY: sched_getattr writes at most ATTR_SIZE bytes into `attr`.
        let r =
            unsafe { libc::syscall(libc::SYS_sched_getattr, 0, attr.as_mut_ptr(), ATTR_SIZE, 0) };
        assert_eq!(r, 0, "{}", std::io::Error::last_os_error());
        // SAFETY: zeroed, then filled by the kernel.
        let attr = unsafe { attr.assume_init() };
        assert_eq!(attr.policy, NORMAL, "policy kept");
        attr.runtime
    }

    #[test]
    fn a_thread_gets_the_slice_it_asks_for_and_gives_it_back() {
        std::thread::spawn(|| {
            request_slice(SHORT_SLICE).expect("sched_setattr");
            let short = slice_now();
            if short == 0 {
                // Before Linux 6.12 the kernel keeps no custom slice.
                eprintln!("SKIP: this kernel ignores custom scheduler slices");
                return;
            }
            assert_eq!(u128::from(short), SHORT_SLICE.as_nanos());
            let inherited = std::thread::spawn(slice_now).join().unwrap();
            assert_eq!(inherited, short, "a spawned thread inherits it");
            default_slices();
            assert_ne!(slice_now(), short, "the default again");
        })
        .join()
        .unwrap();
    }
}
