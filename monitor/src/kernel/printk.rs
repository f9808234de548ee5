//! The guest kernel's log, decoded from its printk ring buffer in guest
//! memory: Linux's lockless ring buffer (kernel/printk/printk_ringbuffer.c,
//! 5.10 and later), a ring of descriptors (state and text position), a
//! parallel array of `printk_info` (sequence number, timestamp, text
//! length) and a ring of text blocks, read with no help from the guest.
//!
//! Everything here was written by the guest and may be damaged or forged:
//! the ring's sizes are bounded before anything is read, every descriptor
//! is checked against its own id and state, every text position against
//! the data ring, and what could not be decoded is counted and described
//! (at most [`MAX_DAMAGE_NOTES`] sentences), never a panic or a loop
//! without end.

use super::layout::PrintkLayout;
use super::le::{u16_at, u32_at, u64_at as word};

/// Most descriptor-ring bits accepted (the kernel's default is about 13).
pub const MAX_COUNT_BITS: u32 = 22;
/// Most data-ring bits accepted (`log_buf_len` up to 1 GiB).
pub const MAX_SIZE_BITS: u32 = 30;
/// Most damage sentences kept; the rest are only counted.
pub const MAX_DAMAGE_NOTES: usize = 20;

const DESC_FLAGS_SHIFT: u32 = 62;
const DESC_ID_MASK: u64 = (1 << DESC_FLAGS_SHIFT) - 1;
const DESC_COMMITTED: u64 = 1;
const DESC_FINALIZED: u64 = 2;

/// Reads guest-kernel virtual memory.
pub trait KernelMemory {
    /// `len` bytes at kernel virtual address `va`.
    fn read(&mut self, va: u64, len: usize) -> Result<Vec<u8>, String>;
}

/// Errors that leave no log at all.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PrintkError {
    /// Guest memory could not be read.
    #[error("cannot read the guest's memory: {0}")]
    Memory(String),
    /// The ring buffer's own header is implausible: nothing can be decoded.
    #[error("the printk ring buffer is not usable: {0}")]
    BadRing(String),
}

/// One log record.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Record {
    /// The kernel's sequence number.
    pub seq: u64,
    /// Nanoseconds since boot (the kernel's local clock).
    pub ts_nsec: u64,
    /// `T<pid>` or `C<cpu>` as the kernel encodes it.
    pub caller_id: u32,
    /// The text, invalid UTF-8 replaced.
    pub text: String,
}

impl Record {
    /// The record as `dmesg` and the console print it: each line of the
    /// text after the `[    s.uuuuuu] ` timestamp.
    pub fn lines(&self) -> impl Iterator<Item = String> + '_ {
        let (s, us) = (
            self.ts_nsec / 1_000_000_000,
            self.ts_nsec % 1_000_000_000 / 1000,
        );
        self.text
            .split('\n')
            .map(move |l| format!("[{s:5}.{us:06}] {l}"))
    }
}

/// What was decoded, and what could not be.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct Log {
    /// Records in sequence order.
    pub records: Vec<Record>,
    /// Descriptors in the ring (2^count_bits).
    pub descriptors: u64,
    /// Descriptors between the tail and the head that held no usable record.
    pub unusable: u64,
    /// What could not be decoded, at most [`MAX_DAMAGE_NOTES`] sentences.
    pub damage: Vec<String>,
}

impl Log {
    fn damaged(&mut self, what: String) {
        self.unusable += 1;
        if self.damage.len() < MAX_DAMAGE_NOTES {
            self.damage.push(what);
        }
    }
}

/// The ring's geometry, read from its header.
struct Ring {
    count_bits: u32,
    descs: u64,
    infos: u64,
    head_id: u64,
    tail_id: u64,
    size_bits: u32,
    data: u64,
}

fn read_ring(mem: &mut dyn KernelMemory, rb: u64, l: &PrintkLayout) -> Result<Ring, PrintkError> {
    let bad = |s: String| PrintkError::BadRing(s);
    let dr = l.rb_desc_ring;
    let tr = l.rb_text_data_ring;
    let fields = [
        dr + l.dr_count_bits,
        dr + l.dr_descs,
        dr + l.dr_infos,
        dr + l.dr_head_id + l.atomic_counter,
        dr + l.dr_tail_id + l.atomic_counter,
        tr + l.data_size_bits,
        tr + l.data_data,
    ];
    let len = fields.iter().max().copied().unwrap_or(0) + 8;
    if len > 4096 {
        return Err(bad(format!(
            "its layout puts a field {len} bytes into the header"
        )));
    }
    let h = mem
        .read(rb, usize::try_from(len).unwrap_or(4096))
        .map_err(PrintkError::Memory)?;
    let short = || bad("the header read came back short".into());
    let ring = Ring {
        count_bits: u32_at(&h, fields[0]).ok_or_else(short)?,
        descs: word(&h, fields[1]).ok_or_else(short)?,
        infos: word(&h, fields[2]).ok_or_else(short)?,
        head_id: word(&h, fields[3]).ok_or_else(short)? & DESC_ID_MASK,
        tail_id: word(&h, fields[4]).ok_or_else(short)? & DESC_ID_MASK,
        size_bits: u32_at(&h, fields[5]).ok_or_else(short)?,
        data: word(&h, fields[6]).ok_or_else(short)?,
    };
    if ring.count_bits == 0 || ring.count_bits > MAX_COUNT_BITS {
        return Err(bad(format!(
            "{} descriptor-ring bits (1 to {MAX_COUNT_BITS} accepted)",
            ring.count_bits
        )));
    }
    if ring.size_bits < 4 || ring.size_bits > MAX_SIZE_BITS {
        return Err(bad(format!(
            "{} data-ring bits (4 to {MAX_SIZE_BITS} accepted)",
            ring.size_bits
        )));
    }
    if !(16..=512).contains(&l.desc_size) || !(16..=4096).contains(&l.info_size) {
        return Err(bad(format!(
            "descriptors of {} bytes and infos of {} bytes are implausible",
            l.desc_size, l.info_size
        )));
    }
    Ok(ring)
}

/// Whether `rb` is a live ring buffer, by two small reads: a plausible
/// header whose head descriptor holds the head's id (what every ring,
/// even an empty one, keeps). Rules out look-alikes before a decode reads
/// their arrays.
pub fn head_is_live(mem: &mut dyn KernelMemory, rb: u64, l: &PrintkLayout) -> bool {
    let Ok(ring) = read_ring(mem, rb, l) else {
        return false;
    };
    let idx = ring.head_id & ((1u64 << ring.count_bits) - 1);
    let at = ring
        .descs
        .wrapping_add(idx * l.desc_size + l.desc_state_var);
    mem.read(at, 8)
        .ok()
        .and_then(|b| word(&b, 0))
        .is_some_and(|sv| sv & DESC_ID_MASK == ring.head_id)
}

/// Where a record's text block lies in the data ring, as the kernel's
/// `get_data` computes it: (index of the block, its size).
fn block(size_bits: u32, begin: u64, next: u64) -> Option<(u64, u64)> {
    let size = 1u64 << size_bits;
    let wraps = |lpos: u64| lpos >> size_bits;
    let index = |lpos: u64| lpos & (size - 1);
    if begin & 1 != 0 || next & 1 != 0 {
        return None; // a data-less record (no text, or its text was lost)
    }
    let (at, len) = if wraps(begin) == wraps(next) {
        (index(begin), next.wrapping_sub(begin))
    } else if wraps(begin.wrapping_add(size)) == wraps(next) {
        (0, index(next))
    } else {
        return None;
    };
    (len >= 8 && at + len <= size).then_some((at, len))
}

/// Decodes the log of the ring buffer at kernel virtual address `rb`.
pub fn read_log(mem: &mut dyn KernelMemory, rb: u64, l: &PrintkLayout) -> Result<Log, PrintkError> {
    let ring = read_ring(mem, rb, l)?;
    let count = 1u64 << ring.count_bits;
    let size = 1u64 << ring.size_bits;
    let read_all = |mem: &mut dyn KernelMemory, va: u64, len: u64| {
        mem.read(va, usize::try_from(len).unwrap_or(usize::MAX))
            .map_err(PrintkError::Memory)
    };
    let descs = read_all(mem, ring.descs, count * l.desc_size)?;
    let infos = read_all(mem, ring.infos, count * l.info_size)?;
    let data = read_all(mem, ring.data, size)?;
    let mut log = Log {
        descriptors: count,
        ..Log::default()
    };
    let span = ring.head_id.wrapping_sub(ring.tail_id) & DESC_ID_MASK;
    if span >= count {
        log.damaged(format!(
            "tail id {} and head id {} are {span} apart in a ring of {count}: reading the {count} before the head",
            ring.tail_id, ring.head_id
        ));
    }
    let first = if span >= count {
        ring.head_id.wrapping_sub(count - 1) & DESC_ID_MASK
    } else {
        ring.tail_id
    };
    let mut id = first;
    for _ in 0..count {
        let idx = id & (count - 1);
        if let Some(r) = record(&mut log, l, &ring, &descs, &infos, &data, id, idx) {
            log.records.push(r);
        }
        if id == ring.head_id {
            break;
        }
        id = id.wrapping_add(1) & DESC_ID_MASK;
    }
    log.records.sort_by_key(|r| r.seq);
    log.records.dedup_by_key(|r| r.seq);
    Ok(log)
}

/// The record of descriptor `idx`, which should hold id `id`.
#[allow(clippy::too_many_arguments)]
fn record(
    log: &mut Log,
    l: &PrintkLayout,
    ring: &Ring,
    descs: &[u8],
    infos: &[u8],
    data: &[u8],
    id: u64,
    idx: u64,
) -> Option<Record> {
    let d = idx * l.desc_size;
    let (Some(sv), Some(begin), Some(next)) = (
        word(descs, d + l.desc_state_var),
        word(descs, d + l.desc_text_blk_lpos + l.lpos_begin),
        word(descs, d + l.desc_text_blk_lpos + l.lpos_next),
    ) else {
        log.damaged(format!("descriptor {idx} lies outside what was read"));
        return None;
    };
    let state = sv >> DESC_FLAGS_SHIFT;
    if sv & DESC_ID_MASK != id {
        // Being reused, or never written: not a record of this lap.
        log.unusable += 1;
        return None;
    }
    if state != DESC_COMMITTED && state != DESC_FINALIZED {
        log.unusable += 1; // reserved (being written) or reusable
        return None;
    }
    let i = idx * l.info_size;
    let (Some(seq), Some(ts_nsec), Some(text_len), Some(caller_id)) = (
        word(infos, i + l.info_seq),
        word(infos, i + l.info_ts_nsec),
        u16_at(infos, i + l.info_text_len),
        u32_at(infos, i + l.info_caller_id),
    ) else {
        log.damaged(format!(
            "the info of descriptor {idx} lies outside what was read"
        ));
        return None;
    };
    let text = if begin & 1 != 0 {
        String::new() // data-less: an empty line, or text the kernel could not store
    } else {
        let Some((at, len)) = block(ring.size_bits, begin, next) else {
            log.damaged(format!(
                "record {seq}: its text position [{begin:#x}, {next:#x}) is not a block of the {}-byte data ring",
                1u64 << ring.size_bits
            ));
            return None;
        };
        // A block starts with the id of its descriptor: one that names
        // another was overwritten by a newer record.
        if word(data, at) != Some(id) {
            log.damaged(format!(
                "record {seq}: its text was overwritten by a newer record"
            ));
            return None;
        }
        let start = usize::try_from(at + 8).ok()?;
        let avail = usize::try_from(len - 8).ok()?;
        let want = usize::from(text_len);
        if want > avail {
            log.damaged(format!(
                "record {seq}: text length {want} exceeds its {avail}-byte block: cut"
            ));
        }
        let bytes = data.get(start..start + want.min(avail))?;
        String::from_utf8_lossy(bytes).into_owned()
    };
    Some(Record {
        seq,
        ts_nsec,
        caller_id,
        text,
    })
}

/// A ring buffer written as the kernel writes it, in memory of its own: for
/// tests and benchmarks of the decoder (and of bdctl over real hooks).
pub mod synth {
    use std::collections::BTreeMap;

    use super::{KernelMemory, PrintkLayout, DESC_FINALIZED};

    /// Guest memory as a map of regions.
    #[derive(Debug, Default)]
    pub struct Fake(pub BTreeMap<u64, Vec<u8>>);

    impl KernelMemory for Fake {
        fn read(&mut self, va: u64, len: usize) -> Result<Vec<u8>, String> {
            let (base, r) = self
                .0
                .range(..=va)
                .next_back()
                .ok_or_else(|| format!("nothing at {va:#x}"))?;
            let off = usize::try_from(va - base).unwrap();
            r.get(off..off + len)
                .map(<[u8]>::to_vec)
                .ok_or_else(|| format!("{len} bytes at {va:#x} run past a region"))
        }
    }

    /// Debian 6.1's layout (SIZE(prb_desc)=24, SIZE(printk_info)=88, ...).
    pub fn layout() -> PrintkLayout {
        PrintkLayout {
            rb_desc_ring: 0,
            rb_text_data_ring: 48,
            dr_count_bits: 0,
            dr_descs: 8,
            dr_infos: 16,
            dr_head_id: 24,
            dr_tail_id: 32,
            desc_size: 24,
            desc_state_var: 0,
            desc_text_blk_lpos: 8,
            lpos_begin: 0,
            lpos_next: 8,
            info_size: 88,
            info_seq: 0,
            info_ts_nsec: 8,
            info_text_len: 16,
            info_caller_id: 20,
            data_size_bits: 0,
            data_data: 8,
            atomic_counter: 0,
        }
    }

    /// Where the ring header is.
    pub const RB: u64 = 0xffff_ffff_8200_0000;
    /// Where the descriptors are.
    pub const DESCS: u64 = 0xffff_ffff_8210_0000;
    /// Where the infos are.
    pub const INFOS: u64 = 0xffff_ffff_8220_0000;
    /// Where the text data is.
    pub const DATA: u64 = 0xffff_ffff_8230_0000;

    /// A ring of 2^4 descriptors and a 2^10-byte data ring holding `texts`
    /// written as the kernel writes them, wrapping as needed.
    pub fn ring(texts: &[&str]) -> Fake {
        ring_sized(texts, 4, 10)
    }

    /// The same with 2^`count_bits` descriptors and 2^`size_bits` bytes of
    /// text; record k has sequence number 100 + k and time 1.5 ms × k.
    // Sizes here are small (a test's or a benchmark's ring): the casts fit.
    #[allow(clippy::cast_possible_truncation)]
    pub fn ring_sized(texts: &[&str], count_bits: u32, size_bits: u32) -> Fake {
        let (count, size) = (1u64 << count_bits, 1u64 << size_bits);
        let l = layout();
        let mut descs = vec![0u8; (count * l.desc_size) as usize];
        let mut infos = vec![0u8; (count * l.info_size) as usize];
        let mut data = vec![0u8; size as usize];
        let mut lpos = 0u64;
        let first_id = 5u64;
        for (k, t) in texts.iter().enumerate() {
            let id = first_id + k as u64;
            let blk = (8 + t.len() as u64).div_ceil(8) * 8;
            let mut begin = lpos;
            if (begin & (size - 1)) + blk > size {
                begin = (begin | (size - 1)) + 1; // wrap to the next lap's start
            }
            let next = begin + blk;
            let at = (begin & (size - 1)) as usize;
            data[at..at + 8].copy_from_slice(&id.to_le_bytes());
            data[at + 8..at + 8 + t.len()].copy_from_slice(t.as_bytes());
            let (b, n) = if lpos != begin {
                (lpos, next)
            } else {
                (begin, next)
            };
            lpos = next;
            let idx = (id & (count - 1)) as usize;
            let d = idx * 24;
            descs[d..d + 8].copy_from_slice(&((DESC_FINALIZED << 62) | id).to_le_bytes());
            descs[d + 8..d + 16].copy_from_slice(&b.to_le_bytes());
            descs[d + 16..d + 24].copy_from_slice(&n.to_le_bytes());
            let i = idx * 88;
            infos[i..i + 8].copy_from_slice(&(100 + k as u64).to_le_bytes());
            infos[i + 8..i + 16].copy_from_slice(&(1_500_000 * k as u64).to_le_bytes());
            infos[i + 16..i + 18].copy_from_slice(&u16::try_from(t.len()).unwrap().to_le_bytes());
        }
        let mut rb = vec![0u8; 128];
        rb[0..4].copy_from_slice(&count_bits.to_le_bytes());
        rb[8..16].copy_from_slice(&DESCS.to_le_bytes());
        rb[16..24].copy_from_slice(&INFOS.to_le_bytes());
        let head = first_id + texts.len() as u64 - 1;
        rb[24..32].copy_from_slice(&head.to_le_bytes());
        rb[32..40].copy_from_slice(&first_id.to_le_bytes());
        rb[48..52].copy_from_slice(&size_bits.to_le_bytes());
        rb[56..64].copy_from_slice(&DATA.to_le_bytes());
        Fake(BTreeMap::from([
            (RB, rb),
            (DESCS, descs),
            (INFOS, infos),
            (DATA, data),
        ]))
    }
}

#[cfg(test)]
mod tests {
    use super::synth::*;
    use super::*;

    #[test]
    fn records_come_back_in_order_with_their_text_and_time() {
        let texts = ["Linux version 6.1.0", "Command line: console=ttyS0", "x"];
        let log = read_log(&mut ring(&texts), RB, &layout()).unwrap();
        assert_eq!(
            log.records
                .iter()
                .map(|r| r.text.as_str())
                .collect::<Vec<_>>(),
            texts
        );
        assert_eq!(log.records[0].seq, 100);
        assert_eq!(log.damage, Vec::<String>::new());
        assert_eq!(
            log.records[1].lines().collect::<Vec<_>>(),
            ["[    0.001500] Command line: console=ttyS0"]
        );
    }

    #[test]
    fn a_text_that_wraps_to_the_next_lap_is_read_from_the_rings_start() {
        // 12 texts of 100 bytes: the ring of 1024 bytes wraps.
        let long: Vec<String> = (0..12)
            .map(|i| format!("{i:03}{}", "y".repeat(97)))
            .collect();
        let texts: Vec<&str> = long.iter().map(String::as_str).collect();
        let mut m = ring(&texts);
        let log = read_log(&mut m, RB, &layout()).unwrap();
        // Older blocks were overwritten by newer ones; what is there is whole.
        let got: Vec<&str> = log.records.iter().map(|r| r.text.as_str()).collect();
        assert!(!got.is_empty());
        for t in &got {
            assert!(texts.contains(t), "{t}");
        }
        assert_eq!(got.last(), texts.last());
    }

    #[test]
    fn scribbled_rings_give_errors_or_partial_logs_with_the_damage_named() {
        let texts = ["one", "two", "three"];
        // Absurd geometry: refused before anything big is read.
        for (at, v) in [(0usize, 0u32), (0, 63), (48, 2), (48, 40)] {
            let mut m = ring(&texts);
            m.0.get_mut(&RB).unwrap()[at..at + 4].copy_from_slice(&v.to_le_bytes());
            assert!(matches!(
                read_log(&mut m, RB, &layout()),
                Err(PrintkError::BadRing(_))
            ));
        }
        // A descriptor's text position outside the ring: that record is named.
        let mut m = ring(&texts);
        let d = (6 & 15) * 24;
        m.0.get_mut(&(DESCS)).unwrap()[d + 8..d + 16].copy_from_slice(&(1u64 << 40).to_le_bytes());
        let log = read_log(&mut m, RB, &layout()).unwrap();
        assert_eq!(log.records.len(), 2);
        assert!(
            log.damage.iter().any(|s| s.contains("record 101")),
            "{:?}",
            log.damage
        );
        // A text length longer than its block: cut, and said.
        let mut m = ring(&texts);
        let i = (7 & 15) * 88;
        m.0.get_mut(&INFOS).unwrap()[i + 16..i + 18].copy_from_slice(&u16::MAX.to_le_bytes());
        let log = read_log(&mut m, RB, &layout()).unwrap();
        assert!(
            log.damage.iter().any(|s| s.contains("exceeds")),
            "{:?}",
            log.damage
        );
        // Head and tail far apart: at most one lap is read.
        let mut m = ring(&texts);
        m.0.get_mut(&RB).unwrap()[32..40].copy_from_slice(&0u64.to_le_bytes());
        m.0.get_mut(&RB).unwrap()[24..32].copy_from_slice(&(1u64 << 50).to_le_bytes());
        let log = read_log(&mut m, RB, &layout()).unwrap();
        assert!(log.damage[0].contains("apart"), "{:?}", log.damage);
        // Pointers to nowhere: a memory error, not a panic.
        let mut m = ring(&texts);
        m.0.get_mut(&RB).unwrap()[8..16].copy_from_slice(&1u64.to_le_bytes());
        assert!(matches!(
            read_log(&mut m, RB, &layout()),
            Err(PrintkError::Memory(_))
        ));
    }

    #[test]
    fn random_rings_never_panic_or_loop() {
        let mut seed = 0x1234_5678_9abc_def0u64;
        let mut rnd = || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        for _ in 0..300 {
            let mut m = ring(&["alpha", "beta", "gamma", "delta"]);
            for (_, region) in m.0.iter_mut() {
                for _ in 0..8 {
                    let n = region.len();
                    let at = usize::try_from(rnd() % n as u64).unwrap();
                    region[at] = rnd().to_le_bytes()[0];
                }
            }
            let _ = read_log(&mut m, RB, &layout());
        }
    }
}
