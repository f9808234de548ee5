//! Shared fixtures of the fuzz targets: a memfd-backed stand-in for guest
//! RAM and a fixed, sealed hook table, served by the real agent code.

use std::sync::Arc;

use backdoor_abi::{HookKind, PERM_ALL, PERM_READ};
use backdoor_agent::auth::Keys;
use backdoor_agent::{Agent, DescriptorSource, GuestMemory, RamRange};
use backdoor_dev::{Descriptor, Hook};

/// The VM name the fixtures serve.
pub const VM: &str = "fuzzvm";
/// The generation of the fixed table.
pub const GENERATION: u32 = 1;
/// Guest RAM: [0, RAM_LEN).
pub const RAM_LEN: u64 = 0x2_0000;
/// The read key.
pub const READ_KEY: [u8; 16] = [1; 16];
/// The repair key.
pub const REPAIR_KEY: [u8; 16] = [2; 16];

/// A table that never changes.
#[derive(Debug)]
pub struct Fixed(pub Descriptor);

impl DescriptorSource for Fixed {
    fn descriptor(&self) -> std::sync::Arc<Descriptor> {
        std::sync::Arc::new(self.0.clone())
    }
    fn vmm_alive(&self) -> bool {
        true
    }
}

fn hook(id: u32, gpa: u64, len: u64, kind: HookKind, perms: u32, name: &str) -> Hook {
    Hook {
        id,
        gpa,
        len,
        kind,
        perms,
        name: name.into(),
    }
}

/// progress (1, READ) at 0x1000, state (2, READ) at 0x2000 + 0x2000,
/// repair (3, ALL) at 0x4000, ro-repair (4, READ only) at 0x5000, and a
/// big state box (5) at 0x1_0000 + 0x1_0000 for extraction.
pub fn table() -> Descriptor {
    Descriptor {
        generation: GENERATION,
        sealed: true,
        tamper_count: 0,
        hooks: vec![
            hook(
                1,
                0x1000,
                0x1000,
                HookKind::ProgressBox,
                PERM_READ,
                "progress",
            ),
            hook(2, 0x2000, 0x2000, HookKind::StateBox, PERM_READ, "state"),
            hook(3, 0x4000, 0x1000, HookKind::Repair, PERM_ALL, "repair"),
            hook(4, 0x5000, 0x1000, HookKind::Repair, PERM_READ, "ro-repair"),
            hook(
                5,
                0x1_0000,
                0x1_0000,
                HookKind::StateBox,
                PERM_READ,
                "sessions",
            ),
        ],
    }
}

/// Whether guest address `gpa` lies in a hook that a repair monitor may change.
pub fn writable(gpa: u64) -> bool {
    (0x4000..0x5000).contains(&gpa)
}

/// Fresh guest RAM (a memfd, as bdvmm's) and an agent serving [`table`].
pub fn agent() -> (Arc<GuestMemory>, Arc<Agent>) {
    let f = backdoor_agent::guest_mem::memfd(c"fuzz-ram", RAM_LEN).expect("memfd");
    let mem = Arc::new(
        GuestMemory::map(
            f,
            vec![RamRange {
                guest_addr: 0,
                len: RAM_LEN,
                file_offset: 0,
            }],
        )
        .expect("map"),
    );
    let dir = std::env::temp_dir().join(format!("bdvmm-fuzz-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let keys = dir.join("keys.toml");
    std::fs::write(
        &keys,
        format!(
            "read = \"{}\"\nrepair = \"{}\"\n",
            hex::encode(READ_KEY),
            hex::encode(REPAIR_KEY)
        ),
    )
    .expect("key file");
    let keys = Keys::load(&keys).expect("keys");
    let source: Arc<dyn DescriptorSource> = Arc::new(Fixed(table()));
    let agent =
        Agent::new(VM.into(), keys, mem.clone(), source).with_busy_poll(std::time::Duration::ZERO);
    (mem, Arc::new(agent))
}

/// The whole of guest RAM.
pub fn snapshot(mem: &GuestMemory) -> Vec<u8> {
    let mut b = vec![0u8; usize::try_from(RAM_LEN).expect("fits")];
    assert!(mem.read(0, &mut b));
    b
}
