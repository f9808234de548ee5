//! The kernel's own symbol table, kallsyms, found and decoded in its image
//! in guest RAM: names for the code at each vCPU's RIP with no file from
//! the kernel's package (Debian ships a placeholder `System.map`; the real
//! one is in the -dbg package).
//!
//! What `scripts/kallsyms.c` emits into `.rodata`, each table 8-aligned
//! (5.x to 6.x): `kallsyms_offsets` (one i32 per symbol),
//! `kallsyms_relative_base` (u64), `kallsyms_num_syms` (u32),
//! `kallsyms_names` (per symbol: a length, one byte or two when the first
//! has bit 7 set, then that many token indices), `kallsyms_markers` (u32:
//! where every 256th name starts), optionally `kallsyms_seqs_of_names`,
//! `kallsyms_token_table` (256 NUL-terminated strings) and
//! `kallsyms_token_index` (256 u16). Newer kernels put the offsets and
//! the base after the token index instead; both places are tried.
//!
//! How it is found without symbols: the token table holds the digits as
//! the tokens of their own bytes ("0\0" ... "9\0" in a row), and the token
//! index that follows it must describe it exactly; the markers are an
//! array from 0 upwards whose every step the names must parse to, with
//! `num_syms` just before the names. The guest wrote all of it: every
//! length and index is bounded, and the result is checked against the
//! page tables (`_text` must be where the image's mapping starts).

use super::le::{u16_at, u32_at, u64_at};
use super::memory::{KERNEL_MAP, KERNEL_MAP_END};

/// The digits, each the token of its own byte, as the token table has them.
pub const DIGITS: &[u8] = b"0\x001\x002\x003\x004\x005\x006\x007\x008\x009\x00";
/// Most symbols accepted (Debian's 6.1 has about 94 000).
pub const MAX_SYMS: u64 = 1 << 22;
/// Longest expanded name (KSYM_NAME_LEN is 512).
const MAX_NAME: usize = 512;
/// Most bytes a group of 256 names takes.
const MAX_GROUP: u32 = 256 * (512 + 2);
/// How far before the token table the markers are looked for.
pub const SEARCH_BEFORE: u64 = 12 << 20;
/// How far after it the offsets may lie (newer kernels).
pub const SEARCH_AFTER: u64 = 4 << 20;

const fn align8(x: usize) -> usize {
    (x + 7) & !7
}

/// The token table and its index, from the digits at `digits`.
struct Tokens {
    /// Where the table starts.
    start: usize,
    /// Where the index ends.
    end: usize,
    tokens: Vec<Vec<u8>>,
}

fn tokens_at(w: &[u8], digits: usize) -> Option<Tokens> {
    // Parse on from '0' (byte 48) to the end of entry 255.
    let mut q = digits;
    for _ in 48..256 {
        q += w.get(q..)?.iter().take(MAX_NAME).position(|&b| b == 0)? + 1;
    }
    let index_at = align8(q);
    let index: Vec<usize> = (0..256)
        .map(|i| u16_at(w, index_at + 2 * i).map(usize::from))
        .collect::<Option<_>>()?;
    let start = digits.checked_sub(index[48])?;
    if index[0] != 0 || start % 8 != 0 {
        return None;
    }
    // The index must describe the table exactly, entry by entry.
    let mut tokens = Vec::with_capacity(256);
    let mut at = start;
    for &i in &index {
        if at - start != i {
            return None;
        }
        let len = w.get(at..)?.iter().take(MAX_NAME).position(|&b| b == 0)?;
        tokens.push(w[at..at + len].to_vec());
        at += len + 1;
    }
    (align8(at) == index_at).then_some(Tokens {
        start,
        end: index_at + 512,
        tokens,
    })
}

/// One name's bytes at `q` and where the next starts.
fn name_at(w: &[u8], q: usize) -> Option<(&[u8], usize)> {
    let first = *w.get(q)?;
    let (len, skip) = if first & 0x80 != 0 {
        (
            usize::from(first & 0x7f) | usize::from(*w.get(q + 1)?) << 7,
            2,
        )
    } else {
        (usize::from(first), 1)
    };
    let body = w.get(q + skip..q + skip + len)?;
    Some((body, q + skip + len))
}

/// Where the names start, given the markers at `markers` (their count
/// `m`): the 8-aligned place from which 256 names end exactly at the
/// second marker, with `num_syms` before it and every name parsing to
/// the markers' end. Returns (names start, num_syms).
fn names_for(w: &[u8], markers: usize, m: usize) -> Option<(usize, usize)> {
    let marker = |k: usize| u32_at(w, markers + 4 * k).map(|v| v as usize);
    let last = marker(m - 1)?;
    // The last group is at most 256 names of at most MAX_NAME + 2 bytes.
    let highest = markers.checked_sub(last)? & !7;
    let lowest = highest.saturating_sub(256 * (MAX_NAME + 2));
    let step = marker(1)?;
    let mut p = highest;
    while p >= lowest.max(8) {
        let mut q = p;
        let mut ok = true;
        for _ in 0..256 {
            match name_at(w, q) {
                Some((_, next)) => q = next,
                None => {
                    ok = false;
                    break;
                }
            }
        }
        if ok && q == p + step {
            let n = u32_at(w, p - 8)? as usize;
            if n > 256 * (m - 1) && n <= 256 * m && u32_at(w, p - 4) == Some(0) {
                let mut q = p;
                for k in 0..n {
                    if k % 256 == 0 && q != p + marker(k / 256)? {
                        return None;
                    }
                    q = name_at(w, q)?.1;
                }
                return (q <= markers && markers - q < 8).then_some((p, n));
            }
        }
        p = p.checked_sub(8)?;
    }
    None
}

/// Candidate markers arrays before `before`: 8-aligned, from 0 up in
/// steps a group of 256 names can take. (Place, count.)
fn markers_before(w: &[u8], before: usize) -> Vec<(usize, usize)> {
    let mut found = Vec::new();
    let mut a = before & !7;
    while a >= 8 {
        a -= 8;
        if u32_at(w, a) != Some(0) {
            continue;
        }
        let mut m = 1;
        let mut prev = 0u32;
        while let Some(v) = u32_at(w, a + 4 * m) {
            if v <= prev || v - prev > MAX_GROUP || v - prev < 256 * 2 {
                break;
            }
            prev = v;
            m += 1;
        }
        if m >= 2 {
            found.push((a, m));
            if found.len() >= 64 {
                break;
            }
        }
    }
    found
}

/// Decoded symbols: (address, name, whether code), unsorted.
pub type SymbolList = Vec<(u64, String, bool)>;

/// Decodes kallsyms from `w`, a window of the image around its token
/// table, whose digits are at `digits`.
pub fn decode(w: &[u8], digits: usize) -> Result<SymbolList, String> {
    let t = tokens_at(w, digits).ok_or("no consistent kallsyms token table and index there")?;
    let (names, n) = markers_before(w, t.start)
        .into_iter()
        .find_map(|(a, m)| names_for(w, a, m))
        .ok_or("no kallsyms names and markers before the token table")?;
    if n as u64 > MAX_SYMS {
        return Err(format!("{n} symbols is more than {MAX_SYMS}"));
    }
    // The offsets and their base: before num_syms (older), or after the
    // token index (newer); the base must lie in the image's window.
    let in_image = |v: u64| (KERNEL_MAP..KERNEL_MAP_END).contains(&v);
    let older = names
        .checked_sub(16)
        .and_then(|b| Some((b.checked_sub(align8(4 * n))?, u64_at(w, b)?)));
    let newer = {
        let offsets = align8(t.end);
        u64_at(w, align8(offsets + 4 * n)).map(|base| (offsets, base))
    };
    let (offsets, base) = [older, newer]
        .into_iter()
        .flatten()
        .find(|&(_, base)| in_image(base))
        .ok_or("no kallsyms_relative_base in the kernel image's window")?;
    let raw: Vec<u32> = (0..n)
        .map(|i| u32_at(w, offsets + 4 * i))
        .collect::<Option<_>>()
        .ok_or("the kallsyms offsets lie outside what was read")?;
    // With absolute per-CPU symbols (x86-64's default) a negative offset
    // is relative to the base (base - 1 - offset) and a positive one
    // absolute; without, all are unsigned offsets from the base.
    let negative = |o: u32| o & 0x8000_0000 != 0;
    let absolute_percpu = raw.iter().any(|&o| negative(o));
    let mut syms = Vec::with_capacity(n);
    let mut q = names;
    let mut name = Vec::with_capacity(64);
    for &off in &raw {
        let (body, next) = name_at(w, q).ok_or("a kallsyms name runs off the window")?;
        q = next;
        name.clear();
        for &tok in body {
            name.extend_from_slice(&t.tokens[usize::from(tok)]);
            if name.len() > MAX_NAME {
                return Err("a kallsyms name longer than KSYM_NAME_LEN".into());
            }
        }
        let Some((&kind, rest)) = name.split_first() else {
            continue;
        };
        let addr = if absolute_percpu && !negative(off) {
            u64::from(off)
        } else if absolute_percpu {
            base.wrapping_sub(1)
                .wrapping_add((1u64 << 32) - u64::from(off))
        } else {
            base.wrapping_add(u64::from(off))
        };
        let code = matches!(kind.to_ascii_lowercase(), b't' | b'w');
        syms.push((addr, String::from_utf8_lossy(rest).into_owned(), code));
    }
    Ok(syms)
}

#[cfg(test)]
pub mod synth {
    //! A kallsyms table laid out as scripts/kallsyms.c lays it out, for
    //! tests of the decoder.
    // The table's fields are the kernel's fixed widths; test sizes fit.
    #![allow(
        clippy::cast_possible_truncation,
        clippy::cast_possible_wrap,
        clippy::cast_sign_loss
    )]

    /// Builds a window holding the tables for `syms` ((address, type,
    /// name)); `newer` puts the offsets after the token index. Returns the
    /// window and where its digits are.
    pub fn table(syms: &[(u64, char, &str)], base: u64, newer: bool) -> (Vec<u8>, usize) {
        // Tokens: every byte is itself, except a few unused bytes that
        // stand for common pairs (as the real compressor does).
        let mut tokens: Vec<Vec<u8>> = (0..=255u8).map(|b| vec![b]).collect();
        tokens[1] = b"_raw_".to_vec();
        tokens[2] = b"spin".to_vec();
        let encode = |s: &str| -> Vec<u8> {
            let mut out = Vec::new();
            let mut rest = s.as_bytes();
            while !rest.is_empty() {
                if rest.starts_with(b"_raw_") {
                    out.push(1);
                    rest = &rest[5..];
                } else if rest.starts_with(b"spin") {
                    out.push(2);
                    rest = &rest[4..];
                } else {
                    out.push(rest[0]);
                    rest = &rest[1..];
                }
            }
            out
        };
        let mut w = vec![0xeeu8; 64];
        let pad = |w: &mut Vec<u8>| {
            while w.len() % 8 != 0 {
                w.push(0);
            }
        };
        let offsets: Vec<u8> = syms
            .iter()
            .flat_map(|&(a, _, _)| {
                (base.wrapping_sub(1).wrapping_sub(a) as i64 as i32).to_le_bytes()
            })
            .collect();
        let n = syms.len();
        if !newer {
            w.extend(&offsets);
            pad(&mut w);
            w.extend(base.to_le_bytes());
        }
        w.extend((n as u32).to_le_bytes());
        pad(&mut w);
        let names_at = w.len();
        let mut markers = Vec::new();
        for (i, &(_, kind, name)) in syms.iter().enumerate() {
            if i % 256 == 0 {
                markers.push((w.len() - names_at) as u32);
            }
            let body: Vec<u8> = encode(&format!("{kind}{name}"));
            if body.len() > 127 {
                w.push(0x80 | (body.len() & 0x7f) as u8);
                w.push((body.len() >> 7) as u8);
            } else {
                w.push(body.len() as u8);
            }
            w.extend(body);
        }
        pad(&mut w);
        for m in markers {
            w.extend(m.to_le_bytes());
        }
        pad(&mut w);
        let table = w.len();
        let mut index = Vec::new();
        let mut digits = 0;
        for (i, t) in tokens.iter().enumerate() {
            index.push((w.len() - table) as u16);
            if i == usize::from(b'0') {
                digits = w.len();
            }
            // Byte 0 stands for nothing useful; its token is empty-safe.
            w.extend(if t == &[0] {
                b"\x7f".to_vec()
            } else {
                t.clone()
            });
            w.push(0);
        }
        pad(&mut w);
        for i in index {
            w.extend(i.to_le_bytes());
        }
        if newer {
            pad(&mut w);
            w.extend(&offsets);
            pad(&mut w);
            w.extend(base.to_le_bytes());
        }
        w.extend([0xeeu8; 64]);
        (w, digits)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn symbols(count: usize) -> Vec<(u64, char, String)> {
        let mut s = vec![
            (0xffff_ffff_8100_0000, 'T', "_text".to_owned()),
            (0xffff_ffff_8100_1000, 'T', "_raw_spin_lock".to_owned()),
            (0xffff_ffff_8100_1040, 't', "native_safe_halt".to_owned()),
        ];
        for i in 3..count {
            s.push((
                0xffff_ffff_8100_2000 + 16 * i as u64,
                if i % 3 == 0 { 'D' } else { 't' },
                format!("fn_{i}_{}", "x".repeat(i % 40)),
            ));
        }
        s
    }

    fn roundtrip(count: usize, newer: bool) {
        let owned = symbols(count);
        let syms: Vec<(u64, char, &str)> =
            owned.iter().map(|(a, k, n)| (*a, *k, n.as_str())).collect();
        let (w, digits) = synth::table(&syms, 0xffff_ffff_8100_0000, newer);
        let got = decode(&w, digits).unwrap();
        assert_eq!(got.len(), count);
        for ((a, k, n), (ga, gn, code)) in syms.iter().zip(&got) {
            assert_eq!((a, *n), (ga, gn.as_str()));
            assert_eq!(*code, *k == 't' || *k == 'T');
        }
    }

    #[test]
    fn kallsyms_decode_in_both_layouts_and_past_one_group_of_markers() {
        roundtrip(300, false);
        roundtrip(1000, true);
    }

    #[test]
    fn a_scribbled_table_is_an_error_not_a_panic() {
        let owned = symbols(600);
        let syms: Vec<(u64, char, &str)> =
            owned.iter().map(|(a, k, n)| (*a, *k, n.as_str())).collect();
        let (w, digits) = synth::table(&syms, 0xffff_ffff_8100_0000, false);
        // Every byte of the window changed in turn, at a stride: never a
        // panic, and either an error or symbols.
        for at in (0..w.len()).step_by(97) {
            let mut bad = w.clone();
            bad[at] ^= 0x5a;
            let _ = decode(&bad, digits);
        }
        assert!(decode(&w[..digits + 4], digits).is_err());
        assert!(decode(&[], 0).is_err());
    }
}
