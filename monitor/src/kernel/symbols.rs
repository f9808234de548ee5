//! Naming kernel addresses: the kernel's `System.map` (from its Debian
//! package, `boot/System.map-<release>`), moved by the KASLR offset, and a
//! module's own symbol table (its `.ko` file) at the address the module
//! was loaded.

use super::le::{u16_at, u32_at, u64_at};

/// Symbols of one image, sorted by address.
#[derive(Debug, Clone, Default)]
pub struct Symbols {
    /// (address, name, whether it is code)
    syms: Vec<(u64, String, bool)>,
    /// Added to every address (KASLR's offset, or a module's load address).
    pub bias: u64,
}

/// Most symbols kept (Debian's System.map has about 150 000).
pub const MAX_SYMBOLS: usize = 1 << 20;

impl Symbols {
    /// Parses `System.map` text: `ffffffff81000000 T _text` lines.
    pub fn from_system_map(text: &str) -> Self {
        let mut syms: Vec<(u64, String, bool)> = text
            .lines()
            .filter_map(|l| {
                let mut w = l.split_whitespace();
                let addr = u64::from_str_radix(w.next()?, 16).ok()?;
                let kind = w.next()?;
                let name = w.next()?;
                Some((addr, name.to_owned(), matches!(kind, "T" | "t" | "W" | "w")))
            })
            .take(MAX_SYMBOLS)
            .collect();
        syms.sort_by_key(|s| s.0);
        Self { syms, bias: 0 }
    }

    /// From a decoded list of (address, name, whether code).
    pub fn from_list(mut syms: Vec<(u64, String, bool)>) -> Self {
        syms.truncate(MAX_SYMBOLS);
        syms.sort_by_key(|s| s.0);
        Self { syms, bias: 0 }
    }

    /// The function symbols of a kernel module's ELF file, as offsets from
    /// the start of its `.text` (what `bias` must then be: the module's
    /// text address in the guest).
    pub fn from_module(ko: &[u8]) -> Option<Self> {
        let syms = elf_text_functions(ko)?;
        Some(Self { syms, bias: 0 })
    }

    /// Where `name` is (bias included).
    pub fn address(&self, name: &str) -> Option<u64> {
        self.syms
            .iter()
            .find(|s| s.1 == name)
            .map(|s| s.0.wrapping_add(self.bias))
    }

    /// The code symbol at or before `addr`, and how far past it `addr`
    /// is; `None` past `max_distance` (not inside any known function).
    pub fn locate(&self, addr: u64, max_distance: u64) -> Option<(&str, u64)> {
        let a = addr.wrapping_sub(self.bias);
        let i = self.syms.partition_point(|s| s.0 <= a);
        self.syms[..i]
            .iter()
            .rev()
            .find(|s| s.2)
            .map(|s| (s.1.as_str(), a - s.0))
            .filter(|&(_, off)| off <= max_distance)
    }

    /// How many symbols there are.
    pub fn len(&self) -> usize {
        self.syms.len()
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.syms.is_empty()
    }
}

/// FUNC symbols defined in `.text` of a relocatable ELF64 (a `.ko`).
fn elf_text_functions(elf: &[u8]) -> Option<Vec<(u64, String, bool)>> {
    if elf.get(..4)? != b"\x7fELF" || *elf.get(4)? != 2 {
        return None;
    }
    let shoff = usize::try_from(u64_at(elf, 0x28)?).ok()?;
    let shentsize = usize::from(u16_at(elf, 0x3a)?);
    let shnum = usize::from(u16_at(elf, 0x3c)?);
    let shstrndx = usize::from(u16_at(elf, 0x3e)?);
    if shentsize < 64 {
        return None;
    }
    let sh = |i: usize| -> Option<(u32, u32, usize, usize, u32)> {
        let h = shoff.checked_add(i.checked_mul(shentsize)?)?;
        Some((
            u32_at(elf, h)?,                               // name
            u32_at(elf, h + 4)?,                           // type
            usize::try_from(u64_at(elf, h + 0x18)?).ok()?, // offset
            usize::try_from(u64_at(elf, h + 0x20)?).ok()?, // size
            u32_at(elf, h + 0x28)?,                        // link
        ))
    };
    let data = |off: usize, size: usize| elf.get(off..off.checked_add(size)?);
    let (_, _, so, ss, _) = sh(shstrndx)?;
    let shstr = data(so, ss)?;
    let cstr = |t: &[u8], at: usize| -> String {
        let s = t.get(at..).unwrap_or(&[]);
        String::from_utf8_lossy(&s[..s.iter().position(|&b| b == 0).unwrap_or(s.len())])
            .into_owned()
    };
    let text =
        (0..shnum).find(|&i| sh(i).is_some_and(|(n, ..)| cstr(shstr, n as usize) == ".text"))?;
    let (_, _, symoff, symsize, strtab) = (0..shnum).filter_map(sh).find(|s| s.1 == 2)?; // SHT_SYMTAB
    let (_, _, stroff, strsize, _) = sh(strtab as usize)?;
    let strs = data(stroff, strsize)?;
    let mut out = Vec::new();
    for k in 0..symsize / 24 {
        let s = symoff + 24 * k;
        let (name, info, shndx, value) = (
            u32_at(elf, s)?,
            *elf.get(s + 4)?,
            usize::from(u16_at(elf, s + 6)?),
            u64_at(elf, s + 8)?,
        );
        if info & 0xf == 2 && shndx == text {
            out.push((value, cstr(strs, name as usize), true));
        }
        if out.len() >= MAX_SYMBOLS {
            break;
        }
    }
    out.sort_by_key(|s| s.0);
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn system_map_names_addresses_with_the_kaslr_offset() {
        let mut s = Symbols::from_system_map(
            "ffffffff81000000 T _text\nffffffff81234560 T _raw_spin_lock\n\
             ffffffff81234600 t do_thing\nffffffff82000000 D some_data\nbad line\n",
        );
        assert_eq!(s.len(), 4);
        s.bias = 0x1_0000_0000;
        assert_eq!(
            s.address("some_data"),
            Some(0xffff_ffff_8200_0000u64.wrapping_add(1 << 32))
        );
        let rip = 0xffff_ffff_8123_4570u64.wrapping_add(1 << 32);
        assert_eq!(s.locate(rip, 4096), Some(("_raw_spin_lock", 0x10)));
        // Data symbols are never the function; too far is not a function.
        assert_eq!(
            s.locate(0xffff_ffff_8200_0010u64.wrapping_add(1 << 32), 1 << 30)
                .map(|x| x.0),
            Some("do_thing")
        );
        assert_eq!(
            s.locate(0xffff_ffff_8200_0010u64.wrapping_add(1 << 32), 4096),
            None
        );
        assert_eq!(s.locate(5, 4096), None);
    }

    #[test]
    fn a_module_without_a_symbol_table_is_none() {
        assert!(Symbols::from_module(b"not an elf").is_none());
        assert!(Symbols::from_module(&[0x7f, b'E', b'L', b'F', 2, 1, 1, 0]).is_none());
    }
}
