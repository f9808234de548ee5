//! bdctl's kernel-log decoder on guest-chosen memory: the fuzzer writes the
//! ring buffer's header, descriptors, infos and text data (and a vmcoreinfo
//! note), the decoder must never panic or loop, and what it returns must
//! be bounded by the ring it was given. The same input is also BTF and a
//! kallsyms table (both found in guest RAM by the forensic view).
#![no_main]

use bdctl::kernel::btf::Btf;
use bdctl::kernel::kallsyms::{self, DIGITS};
use bdctl::kernel::printk::{read_log, synth, KernelMemory};
use bdctl::kernel::vmcoreinfo::Vmcoreinfo;
use libfuzzer_sys::fuzz_target;

/// Four regions at fixed addresses, their bytes from the input.
struct Mem<'a>(Vec<(u64, &'a [u8])>);

impl KernelMemory for Mem<'_> {
    fn read(&mut self, va: u64, len: usize) -> Result<Vec<u8>, String> {
        for (base, r) in &self.0 {
            if va >= *base {
                let off = usize::try_from(va - base).map_err(|e| e.to_string())?;
                if let Some(b) = r.get(off..off.saturating_add(len)) {
                    return Ok(b.to_vec());
                }
            }
        }
        Err("unmapped".into())
    }
}

fuzz_target!(|data: &[u8]| {
    let _ = Vmcoreinfo::from_note(data);
    let _ = Vmcoreinfo::from_text(data);
    let _ = Btf::parse(data);
    // kallsyms from its token table's digits, wherever the input has them.
    if let Some(at) = data.windows(DIGITS.len()).position(|w| w == DIGITS) {
        let _ = kallsyms::decode(data, at);
    }
    // Debian 6.1's layout, the one the decoder's own tests use.
    let layout = synth::layout();
    // The header points at the regions by their fixed addresses.
    let q = data.len() / 4;
    let (h, rest) = data.split_at(q.min(128));
    let mut header = h.to_vec();
    header.resize(128, 0);
    let addr = |i: u64| 0x1_0000_0000 * i;
    header[8..16].copy_from_slice(&addr(2).to_le_bytes());
    header[16..24].copy_from_slice(&addr(3).to_le_bytes());
    header[56..64].copy_from_slice(&addr(4).to_le_bytes());
    let (d, rest) = rest.split_at(rest.len() / 3);
    let (i, t) = rest.split_at(rest.len() / 2);
    let mut mem = Mem(vec![(addr(1), &header[..]), (addr(2), d), (addr(3), i), (addr(4), t)]);
    if let Ok(log) = read_log(&mut mem, addr(1), &layout) {
        assert!(log.records.len() as u64 <= log.descriptors);
        assert!(log.damage.len() <= bdctl::kernel::printk::MAX_DAMAGE_NOTES);
        for r in &log.records {
            assert!(r.text.len() <= 3 * t.len() + 3, "text longer than the data ring");
        }
    }
});
