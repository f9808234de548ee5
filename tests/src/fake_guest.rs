//! An in-process stand-in for guest RAM served by a real agent: a memfd
//! with hooks, for the benchmarks that measure the backdoor's data path
//! without a VM (remote reads, detection, monitor capacity) and for the
//! cluster tests' many healthy targets.

use std::net::{SocketAddr, TcpListener};
use std::sync::Arc;
use std::time::Duration;

use backdoor_abi::{CounterState, HookKind, Level, LINE, PBOX_MAGIC, PERM_READ};
use backdoor_agent::auth::Keys;
use backdoor_agent::{
    guest_mem, Agent, Client, DescriptorSource, GuestMemory, PushedDescriptor, RamRange, Role,
};
use backdoor_dev::{Descriptor, Hook};

/// The read key every fake guest uses.
pub const KEY: [u8; 16] = *b"bench-key-16byte";

/// Fake guest RAM of `len` bytes at guest address 0, its pages touched so
/// that benchmarks measure copies, not first-touch faults.
pub fn ram(len: u64) -> Arc<GuestMemory> {
    let mem = GuestMemory::map(
        guest_mem::memfd(c"bench-ram", len).expect("memfd for fake guest RAM"),
        vec![RamRange {
            guest_addr: 0,
            len,
            file_offset: 0,
        }],
    )
    .expect("map fake guest RAM");
    let chunk = vec![0x5au8; 1 << 20];
    let mut off = 0;
    while off < len {
        let n = usize::try_from((len - off).min(1 << 20)).unwrap_or(1 << 20);
        assert!(mem.write(off, &chunk[..n]));
        off += 1 << 20;
    }
    Arc::new(mem)
}

/// A read-only hook.
pub fn hook(id: u32, gpa: u64, len: u64, kind: HookKind, name: &str) -> Hook {
    Hook {
        id,
        gpa,
        len,
        kind,
        perms: PERM_READ,
        name: name.into(),
    }
}

/// Serves `hooks` of `mem` on a loopback port; `busy_poll` is the agent's
/// spin window after each request (None: the agent's default).
pub fn serve(mem: Arc<GuestMemory>, hooks: Vec<Hook>, busy_poll: Option<Duration>) -> SocketAddr {
    start(agent(mem, hooks, busy_poll))
}

/// Serves `agent` on a loopback port.
pub fn start(agent: Agent) -> SocketAddr {
    start_on(agent, "127.0.0.1:0")
}

/// Serves `agent` on `listen` (HOST:PORT; port 0: any).
pub fn start_on(agent: Agent, listen: &str) -> SocketAddr {
    let l = TcpListener::bind(listen).expect("bind the fake guest's agent");
    let addr = l.local_addr().expect("local address");
    Arc::new(agent).serve(l).expect("serve");
    addr
}

/// The agent of a fake guest (generation 1, sealed) over `hooks` of `mem`.
pub fn agent(mem: Arc<GuestMemory>, hooks: Vec<Hook>, busy_poll: Option<Duration>) -> Agent {
    agent_named("bench", mem, hooks, busy_poll)
}

/// As [`agent`], for a guest called `name`.
pub fn agent_named(
    name: &str,
    mem: Arc<GuestMemory>,
    hooks: Vec<Hook>,
    busy_poll: Option<Duration>,
) -> Agent {
    let desc = Descriptor {
        generation: 1,
        sealed: true,
        tamper_count: 0,
        hooks,
    };
    let hex: String = KEY.iter().map(|b| format!("{b:02x}")).collect();
    let keys = Keys::parse(&format!("read = \"{hex}\""), "bench").expect("key file");
    let source: Arc<dyn DescriptorSource> = Arc::new(PushedDescriptor::new(desc));
    let mut agent = Agent::new(name.into(), keys, mem, source);
    if let Some(d) = busy_poll {
        agent = agent.with_busy_poll(d);
    }
    agent
}

/// A read-role client of a fake guest.
pub fn connect(addr: SocketAddr) -> Client {
    Client::connect(addr, "bench", Role::Read, &KEY, Duration::from_secs(5))
        .expect("connect to the agent")
}

/// Writes a progress box at guest address 0 with `n` ACTIVE OS-level
/// counters of deadline `deadline_ms`; counter `i`'s value is at `64 * (i + 1) + 0`.
pub fn write_progress_box(mem: &GuestMemory, n: u32, deadline_ms: u32) {
    let mut h = [0u8; LINE];
    h[0..4].copy_from_slice(&PBOX_MAGIC.to_le_bytes());
    h[4..6].copy_from_slice(&1u16.to_le_bytes());
    h[6..8].copy_from_slice(&64u16.to_le_bytes());
    h[8..12].copy_from_slice(&n.to_le_bytes());
    h[12..16].copy_from_slice(&64u32.to_le_bytes());
    assert!(mem.write(0, &h));
    for i in 0..n {
        let mut c = [0u8; LINE];
        c[8..12].copy_from_slice(&(i + 1).to_le_bytes());
        c[12..16].copy_from_slice(&deadline_ms.to_le_bytes());
        c[16] = CounterState::Active as u8;
        c[17] = Level::Os as u8;
        c[24..28].copy_from_slice(format!("c{i:03}").as_bytes());
        assert!(mem.write(u64::from(i + 1) * LINE as u64, &c));
    }
}

/// One 8-byte READ round trip, `n` times, in µs (after n/10 warm-up reads).
pub fn read_rtt_us(c: &mut Client, n: usize) -> Vec<f64> {
    time_us(n, || {
        c.read(1, 64, 8).expect("READ");
    })
}

/// Times `f` `n` times in µs, after n/10 untimed warm-up calls.
pub fn time_us(n: usize, mut f: impl FnMut()) -> Vec<f64> {
    for _ in 0..n / 10 {
        f();
    }
    (0..n)
        .map(|_| {
            let t = std::time::Instant::now();
            f();
            t.elapsed().as_secs_f64() * 1e6
        })
        .collect()
}

/// The read key of [`KEY`] as a key file (for bdctl).
pub fn write_key_file(dir: &std::path::Path) -> std::path::PathBuf {
    let hex: String = KEY.iter().map(|b| format!("{b:02x}")).collect();
    let p = dir.join("fake-guest-keys.toml");
    std::fs::write(&p, format!("read = \"{hex}\"\n")).expect("write the fake guests' key file");
    p
}

/// A healthy fake guest: one OS-level counter of `deadline_ms`, bumped
/// every `every` by a thread, served on `listen` under `name`.
#[derive(Debug)]
pub struct Healthy {
    /// Where its agent listens.
    pub addr: SocketAddr,
    stop: Arc<std::sync::atomic::AtomicBool>,
}

impl Healthy {
    /// Starts it.
    pub fn start(name: &str, listen: &str, deadline_ms: u32, every: Duration) -> Self {
        let mem = ram(1 << 16);
        write_progress_box(&mem, 1, deadline_ms);
        let hooks = vec![hook(1, 0, 4096, HookKind::ProgressBox, "progress")];
        let addr = start_on(
            agent_named(name, mem.clone(), hooks, Some(Duration::ZERO)),
            listen,
        );
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let s = stop.clone();
        std::thread::spawn(move || {
            let mut v = 0u64;
            while !s.load(std::sync::atomic::Ordering::Relaxed) {
                v += 1;
                assert!(mem.write(64, &v.to_le_bytes()));
                std::thread::sleep(every);
            }
        });
        Self { addr, stop }
    }
}

impl Drop for Healthy {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
    }
}
