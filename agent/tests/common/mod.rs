//! A fake guest for the agent's own tests: memfd-backed RAM holding three
//! hooks (a progress box filled with a pattern, a writable repair hook and
//! a read-only one) and an agent over it, served on an ephemeral port.
#![allow(dead_code)] // each test binary uses its part

use std::fs::File;
use std::io::Write;
use std::net::{SocketAddr, TcpListener};
use std::sync::Arc;
use std::time::Duration;

use backdoor_abi::{HookKind, PERM_ALL, PERM_READ};
use backdoor_agent::auth::{decode_hex, Keys};
use backdoor_agent::{Agent, Client, GuestMemory, PushedDescriptor, RamRange, Role};
use backdoor_dev::{Descriptor, Hook};

pub const READ_KEY: &str = "00112233445566778899aabbccddeeff";
pub const REPAIR_KEY: &str = "ffeeddccbbaa99887766554433221100";
pub const RAM: u64 = 0x10_0000;
pub const RAM_LEN: u64 = 1 << 20;
/// Hook 1: a progress box (read only), filled with a pattern.
pub const PROGRESS: (u32, u64) = (1, RAM);
/// Hook 2: a repair hook allowing everything.
pub const REPAIR: (u32, u64) = (2, RAM + 0x2000);
/// Hook 3: a repair hook the guest made read-only.
pub const REPAIR_RO: (u32, u64) = (3, RAM + 0x4000);
pub const HOOK_LEN: u64 = 0x1000;
pub const TIMEOUT: Duration = Duration::from_secs(5);

pub fn pattern() -> Vec<u8> {
    (0..HOOK_LEN)
        .map(|i| u8::try_from((i * 7 + 3) % 251).unwrap())
        .collect()
}

/// Guest RAM (the memfd stays open as long as this lives).
pub struct FakeGuest {
    pub ram: File,
    pub mem: Arc<GuestMemory>,
}

/// RAM with the pattern in the progress box.
pub fn fake_guest() -> FakeGuest {
    let mut f = backdoor_agent::guest_mem::memfd(c"agent-test-ram", RAM_LEN).unwrap();
    f.write_all(&pattern()).unwrap();
    let mem = Arc::new(
        GuestMemory::map(
            f.try_clone().unwrap(),
            vec![RamRange {
                guest_addr: RAM,
                len: RAM_LEN,
                file_offset: 0,
            }],
        )
        .unwrap(),
    );
    FakeGuest { ram: f, mem }
}

/// An agent for "vm1" over `mem`, with the three hooks sealed.
pub fn agent(mem: Arc<GuestMemory>) -> Agent {
    let hook = |(id, gpa): (u32, u64), kind, perms, name: &str| Hook {
        id,
        gpa,
        len: HOOK_LEN,
        kind,
        perms,
        name: name.into(),
    };
    let desc = Descriptor {
        generation: 3,
        sealed: true,
        tamper_count: 0,
        hooks: vec![
            hook(PROGRESS, HookKind::ProgressBox, PERM_READ, "progress"),
            hook(REPAIR, HookKind::Repair, PERM_ALL, "repair"),
            hook(REPAIR_RO, HookKind::Repair, PERM_READ, "repair-ro"),
        ],
    };
    let keys = Keys::parse(
        &format!("read = \"{READ_KEY}\"\nrepair = \"{REPAIR_KEY}\"\n"),
        "test",
    )
    .unwrap();
    Agent::new(
        "vm1".into(),
        keys,
        mem,
        Arc::new(PushedDescriptor::new(desc)),
    )
}

/// Serves `agent` on an ephemeral loopback port.
pub fn serve(agent: Agent) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    Arc::new(agent).serve(listener).unwrap();
    addr
}

/// A monitor of `role` connected to `addr`.
pub fn client(addr: SocketAddr, role: Role) -> Client {
    let key = decode_hex(if role == Role::Read {
        READ_KEY
    } else {
        REPAIR_KEY
    })
    .unwrap();
    Client::connect(addr, "vm1", role, &key, TIMEOUT).unwrap()
}
