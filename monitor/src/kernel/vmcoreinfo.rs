//! The kernel's vmcoreinfo: the ELF note (`VMCOREINFO`) in which a Linux
//! kernel names, in text, the addresses of the symbols and the offsets and
//! sizes of the structures a reader of its memory needs (kexec's and
//! makedumpfile's contract): `SYMBOL(prb)=ffffffff...`,
//! `OFFSET(prb_desc.state_var)=0`, `SIZE(printk_info)=88`,
//! `NUMBER(phys_base)=...`, `KERNELOFFSET=...`, `OSRELEASE=...`.
//!
//! The guest wrote it, so it is input: the note and the text are bounded,
//! a line that is not `KEY=VALUE` is counted and skipped, and a value is
//! parsed only when asked for.

use std::collections::BTreeMap;

use super::le::u32_at;

/// At most this much text is read (the kernel's VMCOREINFO_BYTES is a page).
pub const MAX_TEXT: usize = 16 * 1024;
/// At most this many entries are kept.
pub const MAX_ENTRIES: usize = 1024;

/// Errors reading vmcoreinfo.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum VmcoreinfoError {
    /// Not an ELF note named VMCOREINFO.
    #[error("not a VMCOREINFO ELF note ({0})")]
    NotANote(String),
    /// The text holds no usable entry.
    #[error("the vmcoreinfo text holds no KEY=VALUE entry")]
    Empty,
}

/// The parsed entries.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Vmcoreinfo {
    entries: BTreeMap<String, String>,
    /// Lines that were not `KEY=VALUE` (or beyond the limits).
    pub skipped_lines: usize,
}

impl Vmcoreinfo {
    /// Parses an ELF note (`Elf64_Nhdr`, name `VMCOREINFO`, the text as
    /// its descriptor) at the start of `note`.
    pub fn from_note(note: &[u8]) -> Result<Self, VmcoreinfoError> {
        let bad = |why: &str| VmcoreinfoError::NotANote(why.to_owned());
        let namesz = u32_at(note, 0).ok_or_else(|| bad("shorter than a note header"))? as usize;
        let descsz = u32_at(note, 4).ok_or_else(|| bad("shorter than a note header"))? as usize;
        if namesz != 11 {
            return Err(bad(&format!("name size {namesz}, not 11")));
        }
        let name = note
            .get(12..12 + namesz)
            .ok_or_else(|| bad("ends in its name"))?;
        if name != b"VMCOREINFO\0" {
            return Err(bad("its name is not VMCOREINFO"));
        }
        let desc_at = 12 + namesz.div_ceil(4) * 4;
        let len = descsz.min(MAX_TEXT);
        let desc = note
            .get(desc_at..desc_at + len)
            .or_else(|| note.get(desc_at..))
            .ok_or_else(|| bad("ends before its text"))?;
        Self::from_text(desc)
    }

    /// Parses the text (`KEY=VALUE` lines; stops at the first NUL).
    pub fn from_text(text: &[u8]) -> Result<Self, VmcoreinfoError> {
        let text = &text[..text.len().min(MAX_TEXT)];
        let text = &text[..text.iter().position(|&b| b == 0).unwrap_or(text.len())];
        let mut v = Self::default();
        for line in text.split(|&b| b == b'\n').filter(|l| !l.is_empty()) {
            let parsed = std::str::from_utf8(line)
                .ok()
                .and_then(|l| l.split_once('='))
                .filter(|(k, _)| !k.is_empty() && k.len() <= 128);
            match parsed {
                Some((k, val)) if v.entries.len() < MAX_ENTRIES => {
                    v.entries.insert(k.to_owned(), val.to_owned());
                }
                _ => v.skipped_lines += 1,
            }
        }
        if v.entries.is_empty() {
            return Err(VmcoreinfoError::Empty);
        }
        Ok(v)
    }

    /// The raw value of `key`.
    pub fn get(&self, key: &str) -> Option<&str> {
        self.entries.get(key).map(String::as_str)
    }

    /// `SYMBOL(name)`: an address (hex).
    pub fn symbol(&self, name: &str) -> Option<u64> {
        hex(self.get(&format!("SYMBOL({name})"))?)
    }

    /// `OFFSET(member)` (e.g. `prb_desc.state_var`): bytes (decimal).
    pub fn offset(&self, member: &str) -> Option<u64> {
        self.get(&format!("OFFSET({member})"))?.parse().ok()
    }

    /// `SIZE(type)`: bytes (decimal).
    pub fn size(&self, ty: &str) -> Option<u64> {
        self.get(&format!("SIZE({ty})"))?.parse().ok()
    }

    /// `NUMBER(name)` (decimal, maybe negative).
    pub fn number(&self, name: &str) -> Option<i64> {
        self.get(&format!("NUMBER({name})"))?.parse().ok()
    }

    /// `OSRELEASE`: the kernel release (`uname -r`).
    pub fn osrelease(&self) -> Option<&str> {
        self.get("OSRELEASE")
    }

    /// `KERNELOFFSET`: the KASLR offset of the kernel's virtual addresses.
    pub fn kernel_offset(&self) -> Option<u64> {
        hex(self.get("KERNELOFFSET")?)
    }
}

fn hex(s: &str) -> Option<u64> {
    u64::from_str_radix(s.trim_start_matches("0x"), 16).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An ELF note as the kernel writes it.
    pub fn note(text: &str) -> Vec<u8> {
        let mut n = Vec::new();
        n.extend_from_slice(&11u32.to_le_bytes());
        n.extend_from_slice(&u32::try_from(text.len()).unwrap().to_le_bytes());
        n.extend_from_slice(&0u32.to_le_bytes());
        n.extend_from_slice(b"VMCOREINFO\0\0");
        n.extend_from_slice(text.as_bytes());
        n
    }

    #[test]
    fn entries_of_every_kind_are_read() {
        let v = Vmcoreinfo::from_note(&note(
            "OSRELEASE=6.1.0-57-amd64\nPAGESIZE=4096\nSYMBOL(prb)=ffffffff8ea5a2b8\n\
             OFFSET(prb_desc.state_var)=0\nSIZE(printk_info)=88\nNUMBER(phys_base)=-2147483648\n\
             KERNELOFFSET=d000000\n",
        ))
        .unwrap();
        assert_eq!(v.osrelease(), Some("6.1.0-57-amd64"));
        assert_eq!(v.symbol("prb"), Some(0xffff_ffff_8ea5_a2b8));
        assert_eq!(v.offset("prb_desc.state_var"), Some(0));
        assert_eq!(v.size("printk_info"), Some(88));
        assert_eq!(v.number("phys_base"), Some(-2_147_483_648));
        assert_eq!(v.kernel_offset(), Some(0xd00_0000));
        assert_eq!(v.symbol("nope"), None);
        assert_eq!(v.skipped_lines, 0);
    }

    #[test]
    fn forged_notes_and_text_are_errors_or_skipped_lines() {
        assert!(Vmcoreinfo::from_note(&[]).is_err());
        assert!(Vmcoreinfo::from_note(&[0xff; 64]).is_err());
        let mut n = note("A=1\n");
        n[12] = b'X';
        assert!(Vmcoreinfo::from_note(&n).is_err());
        // A descriptor size beyond the buffer reads what is there.
        let mut n = note("A=1\n");
        n[4..8].copy_from_slice(&u32::MAX.to_le_bytes());
        assert_eq!(Vmcoreinfo::from_note(&n).unwrap().get("A"), Some("1"));
        let v = Vmcoreinfo::from_text(b"no equals\n\xff\xfe=x\nA=1\0B=2").unwrap();
        assert_eq!(
            (v.get("A"), v.get("B"), v.skipped_lines),
            (Some("1"), None, 2)
        );
        assert_eq!(
            Vmcoreinfo::from_text(b"garbage"),
            Err(VmcoreinfoError::Empty)
        );
        let huge = "K=V\n".repeat(100_000);
        let v = Vmcoreinfo::from_text(huge.as_bytes()).unwrap();
        assert_eq!(v.get("K"), Some("V"));
        // Values are parsed only when asked, and bad ones are None.
        let v = Vmcoreinfo::from_text(b"SYMBOL(x)=zz\nSIZE(y)=-1\n").unwrap();
        assert_eq!((v.symbol("x"), v.size("y")), (None, None));
    }
}
