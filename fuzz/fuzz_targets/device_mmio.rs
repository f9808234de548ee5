//! The backdoor device's register interface driven by a hostile guest:
//! any sequence of register reads and writes of any width and offset,
//! descriptors of guest-chosen bytes in guest RAM (rewritable between
//! commands), and resets. Invariants after every access: the table obeys
//! every rule of docs/abi.md (alignment, inside one RAM range, no
//! overlap, at most MAX_HOOKS, valid kind/permissions, unique printable
//! names, unique ids); a sealed table never changes and every command
//! after the seal is refused and counted exactly once; RESULT is a
//! documented code; the generation is never 0.
#![no_main]

use std::sync::{Arc, Mutex};

use backdoor_abi::{
    cmd, decode_name, perms_valid, reg, HookError, MAX_HOOKS, MAX_HOOK_PAGES, PAGE_SIZE,
};
use backdoor_dev::{BackdoorDevice, BackdoorShared, Descriptor, GuestReader};
use libfuzzer_sys::fuzz_target;

/// 64 KiB of guest RAM at 0 that the device reads descriptors from; a
/// second RAM range at 1 MiB exists for hooks but holds no descriptors.
const RAM: usize = 0x1_0000;
const RANGES: [(u64, u64); 2] = [(0, RAM as u64), (0x10_0000, 0x40_0000)];

#[derive(Clone)]
struct Ram(Arc<Mutex<Vec<u8>>>);

impl GuestReader for Ram {
    fn read(&self, gpa: u64, buf: &mut [u8]) -> bool {
        let ram = self.0.lock().unwrap();
        let Ok(start) = usize::try_from(gpa) else {
            return false;
        };
        match start
            .checked_add(buf.len())
            .and_then(|end| ram.get(start..end))
        {
            Some(src) => {
                buf.copy_from_slice(src);
                true
            }
            None => false,
        }
    }
}

fn check_table(d: &Descriptor) {
    assert!(d.generation != 0);
    assert!(d.hooks.len() <= MAX_HOOKS as usize);
    for (i, h) in d.hooks.iter().enumerate() {
        assert!(h.id != 0);
        assert_eq!(h.gpa % PAGE_SIZE, 0);
        assert!(h.len > 0 && h.len % PAGE_SIZE == 0);
        assert!(h.len / PAGE_SIZE <= u64::from(MAX_HOOK_PAGES));
        let end = h.gpa.checked_add(h.len).expect("no wrap");
        assert!(
            RANGES.iter().any(|&(s, l)| h.gpa >= s && end <= s + l),
            "{h:?} outside RAM"
        );
        assert!(perms_valid(h.kind, h.perms), "{h:?}");
        let mut name = [0u8; 32];
        name[..h.name.len()].copy_from_slice(h.name.as_bytes());
        assert_eq!(decode_name(&name), Some(h.name.as_str()));
        for o in &d.hooks[i + 1..] {
            assert!(o.id != h.id, "duplicate id");
            assert!(o.name != h.name, "duplicate name");
            assert!(
                end <= o.gpa || o.gpa + o.len <= h.gpa,
                "{h:?} overlaps {o:?}"
            );
        }
    }
}

fuzz_target!(|data: &[u8]| {
    // The first 1 KiB of input seeds guest RAM (descriptors live there).
    let (seed, ops) = data.split_at(data.len().min(1024));
    let ram = Ram(Arc::new(Mutex::new(vec![0u8; RAM])));
    ram.0.lock().unwrap()[..seed.len()].copy_from_slice(seed);
    let shared = BackdoorShared::new(u32::from(seed.first().copied().unwrap_or(1)) << 24);
    let mut dev = BackdoorDevice::new(shared.clone(), Box::new(ram.clone()), RANGES.to_vec());
    let mut last = shared.snapshot();
    check_table(&last);
    for op in ops.chunks_exact(8) {
        let offset = u64::from(u16::from_le_bytes([op[1], op[2]]) & 0xfff);
        let width = [1usize, 2, 4, 8][usize::from(op[3] & 3)];
        let value = [op[4], op[5], op[6], op[7], op[4], op[5], op[6], op[7]];
        let mut is_command = false;
        match op[0] % 8 {
            // Reads: any offset and width; aligned 32-bit reads of RESULT
            // return a documented code.
            0 => {
                let mut buf = vec![0u8; width];
                dev.read(offset, &mut buf);
                if width == 4 && offset == reg::RESULT {
                    assert!(u32::from_le_bytes(buf[..4].try_into().unwrap()) <= 12);
                }
            }
            1 | 2 => {
                is_command = width == 4 && offset == reg::COMMAND;
                dev.write(offset, &value[..width]);
            }
            // Aligned 32-bit register writes, the interesting ones.
            3 => {
                let off = [
                    reg::DESC_ADDR_LO,
                    reg::DESC_ADDR_HI,
                    reg::HOOK_ID,
                    reg::COMMAND,
                ][usize::from(op[1] & 3)];
                is_command = off == reg::COMMAND;
                dev.write(off, &value[..4]);
            }
            // A command by name.
            4 => {
                let c = [cmd::REGISTER, cmd::UNREGISTER, cmd::UPDATE, cmd::SEAL]
                    [usize::from(op[1] & 3)];
                is_command = true;
                dev.write(reg::COMMAND, &c.to_le_bytes());
            }
            // The guest rewrites its RAM between commands.
            5 | 6 => {
                let at = usize::from(u16::from_le_bytes([op[1], op[2]])) % (RAM - 4);
                ram.0.lock().unwrap()[at..at + 4].copy_from_slice(&value[..4]);
            }
            // A reset: new generation, empty unsealed table.
            _ => {
                let g = shared.reset();
                assert_eq!(
                    g,
                    if last.generation == u32::MAX {
                        1
                    } else {
                        last.generation + 1
                    }
                );
                let now = shared.snapshot();
                assert!(now.hooks.is_empty() && !now.sealed && now.tamper_count == 0);
                last = now;
                continue;
            }
        }
        let now = shared.snapshot();
        check_table(&now);
        assert_eq!(now.generation, last.generation);
        if last.sealed {
            assert!(now.sealed);
            assert_eq!(now.hooks, last.hooks, "a sealed table changed");
            let refused = u32::from(is_command);
            assert_eq!(now.tamper_count, last.tamper_count.saturating_add(refused));
            if is_command {
                let mut b = [0u8; 4];
                dev.read(reg::RESULT, &mut b);
                assert_eq!(u32::from_le_bytes(b), HookError::Sealed.code());
            }
        } else {
            assert_eq!(now.tamper_count, 0);
        }
        last = now;
    }
});
