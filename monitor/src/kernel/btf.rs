//! Enough of BTF, the kernel's own type information (the `.BTF` section of
//! vmlinux, also `/sys/kernel/btf/vmlinux`), to find a struct's size and a
//! member's offset: what vmcoreinfo would say, for a kernel that died
//! before it set vmcoreinfo up. Format: linux/btf.h.
//!
//! The file is the operator's (from the guest kernel's package), but it is
//! still bounded: every offset and count is checked, a malformed type
//! stops the walk with an error.

use super::le::{u16_at, u32_at, u64_at};

/// Errors reading BTF.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BtfError {
    /// Not an ELF file with a .BTF section, or not BTF.
    #[error("{0}")]
    Format(String),
}

const BTF_MAGIC: u16 = 0xeb9f;
const KIND_STRUCT: u32 = 4;
const KIND_UNION: u32 = 5;
const KIND_TYPEDEF: u32 = 8;
const KIND_VOLATILE: u32 = 9;
const KIND_CONST: u32 = 10;

#[derive(Debug, Clone)]
struct Type {
    name: u32,
    kind: u32,
    kind_flag: bool,
    size_or_type: u32,
    /// For structs and unions: (name, type, bit offset).
    members: Vec<(u32, u32, u32)>,
}

/// Parsed type information.
#[derive(Debug, Clone)]
pub struct Btf {
    /// Type id i is types[i - 1].
    types: Vec<Type>,
    strings: Vec<u8>,
}

/// The `.BTF` section of an ELF64 file.
pub fn elf_section<'a>(elf: &'a [u8], wanted: &str) -> Result<&'a [u8], BtfError> {
    let bad = |s: &str| BtfError::Format(format!("not a vmlinux with a {wanted} section: {s}"));
    if elf.get(..4) != Some(b"\x7fELF") || elf.get(4) != Some(&2) {
        return Err(bad("not an ELF64 file"));
    }
    let shoff = usize::try_from(u64_at(elf, 0x28).ok_or_else(|| bad("truncated"))?)
        .map_err(|_| bad("bad e_shoff"))?;
    let shentsize = usize::from(u16_at(elf, 0x3a).ok_or_else(|| bad("truncated"))?);
    let shnum = usize::from(u16_at(elf, 0x3c).ok_or_else(|| bad("truncated"))?);
    let shstrndx = usize::from(u16_at(elf, 0x3e).ok_or_else(|| bad("truncated"))?);
    if shentsize < 64 || shstrndx >= shnum {
        return Err(bad("bad section header table"));
    }
    let section = |i: usize| -> Option<(u32, &'a [u8])> {
        let h = shoff.checked_add(i.checked_mul(shentsize)?)?;
        let name = u32_at(elf, h)?;
        let off = usize::try_from(u64_at(elf, h + 0x18)?).ok()?;
        let size = usize::try_from(u64_at(elf, h + 0x20)?).ok()?;
        Some((name, elf.get(off..off.checked_add(size)?)?))
    };
    let (_, names) = section(shstrndx).ok_or_else(|| bad("no section names"))?;
    for i in 0..shnum {
        let Some((name, data)) = section(i) else {
            continue;
        };
        let n = names.get(name as usize..).unwrap_or(&[]);
        let n = &n[..n.iter().position(|&b| b == 0).unwrap_or(n.len())];
        if n == wanted.as_bytes() {
            return Ok(data);
        }
    }
    Err(bad("no such section"))
}

impl Btf {
    /// Parses the `.BTF` section of a vmlinux ELF file.
    pub fn from_vmlinux(elf: &[u8]) -> Result<Self, BtfError> {
        Self::parse(elf_section(elf, ".BTF")?)
    }

    /// Parses raw BTF (`/sys/kernel/btf/vmlinux`).
    pub fn parse(b: &[u8]) -> Result<Self, BtfError> {
        let bad = |s: &str| BtfError::Format(format!("not BTF: {s}"));
        if u16_at(b, 0) != Some(BTF_MAGIC) {
            return Err(bad("bad magic"));
        }
        let field = |at| {
            u32_at(b, at)
                .map(|v| v as usize)
                .ok_or_else(|| bad("truncated header"))
        };
        let hdr_len = field(4)?;
        let (type_off, type_len, str_off, str_len) =
            (field(8)?, field(12)?, field(16)?, field(20)?);
        let range = |off: usize, len: usize| {
            hdr_len
                .checked_add(off)
                .and_then(|s| Some((s, s.checked_add(len)?)))
                .and_then(|(s, e)| b.get(s..e))
                .ok_or_else(|| bad("a section lies outside the data"))
        };
        let types_bytes = range(type_off, type_len)?;
        let strings = range(str_off, str_len)?.to_vec();
        let mut types = Vec::new();
        let mut at = 0usize;
        while at < types_bytes.len() {
            let t = |o: usize| {
                u32_at(types_bytes, at + o).ok_or_else(|| bad("a type runs off the end"))
            };
            let (name, info, size_or_type) = (t(0)?, t(4)?, t(8)?);
            let vlen = (info & 0xffff) as usize;
            let kind = (info >> 24) & 0x1f;
            let kind_flag = info >> 31 == 1;
            at += 12;
            let mut members = Vec::new();
            let extra = match kind {
                1 | 14 | 17 => 4, // INT, VAR, DECL_TAG
                3 => 12,          // ARRAY
                KIND_STRUCT | KIND_UNION => {
                    for k in 0..vlen {
                        let m = at + 12 * k;
                        let get = |o| {
                            u32_at(types_bytes, m + o)
                                .ok_or_else(|| bad("a member runs off the end"))
                        };
                        members.push((get(0)?, get(4)?, get(8)?));
                    }
                    12 * vlen
                }
                6 | 13 => 8 * vlen,   // ENUM, FUNC_PROTO
                15 | 19 => 12 * vlen, // DATASEC, ENUM64
                2 | 7 | 8 | 9 | 10 | 11 | 12 | 16 | 18 => 0,
                other => return Err(bad(&format!("unknown type kind {other}"))),
            };
            at += extra;
            types.push(Type {
                name,
                kind,
                kind_flag,
                size_or_type,
                members,
            });
        }
        Ok(Self { types, strings })
    }

    fn name(&self, off: u32) -> &[u8] {
        let s = self.strings.get(off as usize..).unwrap_or(&[]);
        &s[..s.iter().position(|&b| b == 0).unwrap_or(s.len())]
    }

    fn ty(&self, id: u32) -> Option<&Type> {
        self.types.get((id as usize).checked_sub(1)?)
    }

    /// Follows typedefs and qualifiers (a bounded number of steps).
    fn resolve(&self, mut id: u32) -> Option<&Type> {
        for _ in 0..32 {
            let t = self.ty(id)?;
            match t.kind {
                KIND_TYPEDEF | KIND_VOLATILE | KIND_CONST => id = t.size_or_type,
                _ => return Some(t),
            }
        }
        None
    }

    /// The struct (or union, or typedef of one) called `name`.
    fn named_struct(&self, name: &str) -> Option<&Type> {
        self.types
            .iter()
            .enumerate()
            .filter(|(_, t)| self.name(t.name) == name.as_bytes())
            .find_map(|(i, t)| match t.kind {
                KIND_STRUCT | KIND_UNION if !t.members.is_empty() => Some(t),
                KIND_TYPEDEF => self
                    .resolve(u32::try_from(i + 1).ok()?)
                    .filter(|s| matches!(s.kind, KIND_STRUCT | KIND_UNION)),
                _ => None,
            })
    }

    /// sizeof(struct `name`).
    pub fn struct_size(&self, name: &str) -> Option<u64> {
        self.named_struct(name).map(|t| u64::from(t.size_or_type))
    }

    /// offsetof(struct `name`, `member`) in bytes, looking into anonymous
    /// struct and union members.
    pub fn member_offset(&self, name: &str, member: &str) -> Option<u64> {
        self.find_member(self.named_struct(name)?, member, 0)
    }

    fn find_member(&self, t: &Type, member: &str, depth: u32) -> Option<u64> {
        if depth > 8 {
            return None;
        }
        for &(name, ty, off) in &t.members {
            let bits = if t.kind_flag { off & 0x00ff_ffff } else { off };
            if self.name(name) == member.as_bytes() {
                return (bits % 8 == 0).then_some(u64::from(bits / 8));
            }
            if name == 0 {
                if let Some(inner) = self
                    .resolve(ty)
                    .filter(|s| matches!(s.kind, KIND_STRUCT | KIND_UNION))
                {
                    if let Some(o) = self.find_member(inner, member, depth + 1) {
                        return Some(u64::from(bits / 8) + o);
                    }
                }
            }
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// BTF with: int (1), struct inner {int a; int b;} (2), typedef
    /// inner inner_t (3), struct outer {int x; struct {int y;}; inner_t z;} (4), anon (5).
    fn sample() -> Vec<u8> {
        let strings = b"\0int\0inner\0a\0b\0inner_t\0outer\0x\0y\0z\0";
        let s = |n: &str| {
            let pos = strings
                .windows(n.len() + 2)
                .position(|w| w[0] == 0 && &w[1..=n.len()] == n.as_bytes() && w[n.len() + 1] == 0)
                .unwrap();
            u32::try_from(pos + 1).unwrap()
        };
        let mut t = Vec::new();
        let mut push = |words: &[u32]| {
            words
                .iter()
                .for_each(|w| t.extend_from_slice(&w.to_le_bytes()))
        };
        push(&[s("int"), 1 << 24, 4, 32]); // 1: INT, 32 bits
        push(&[s("inner"), (4 << 24) | 2, 8, s("a"), 1, 0, s("b"), 1, 32]); // 2
        push(&[s("inner_t"), 8 << 24, 2]); // 3: typedef -> 2
        push(&[
            s("outer"),
            (4 << 24) | 3,
            16,
            s("x"),
            1,
            0,
            0,
            5,
            32,
            s("z"),
            3,
            64,
        ]); // 4
        push(&[0, (4 << 24) | 1, 4, s("y"), 1, 0]); // 5: anonymous struct
        let mut b = Vec::new();
        b.extend_from_slice(&BTF_MAGIC.to_le_bytes());
        b.extend_from_slice(&[1, 0]);
        let n = |x: usize| u32::try_from(x).unwrap();
        for v in [24u32, 0, n(t.len()), n(t.len()), n(strings.len())] {
            b.extend_from_slice(&v.to_le_bytes());
        }
        b.extend_from_slice(&t);
        b.extend_from_slice(strings);
        b
    }

    #[test]
    fn sizes_and_offsets_through_typedefs_and_anonymous_members() {
        let btf = Btf::parse(&sample()).unwrap();
        assert_eq!(btf.struct_size("inner"), Some(8));
        assert_eq!(btf.struct_size("inner_t"), Some(8));
        assert_eq!(btf.struct_size("outer"), Some(16));
        assert_eq!(btf.member_offset("inner", "b"), Some(4));
        assert_eq!(btf.member_offset("outer", "y"), Some(4));
        assert_eq!(btf.member_offset("outer", "z"), Some(8));
        assert_eq!(btf.member_offset("outer", "nope"), None);
        assert_eq!(btf.struct_size("int"), None);
    }

    #[test]
    fn damaged_btf_is_an_error_not_a_panic() {
        let good = sample();
        assert!(Btf::parse(&good[..good.len() - 5]).is_err());
        assert!(Btf::parse(&[0u8; 8]).is_err());
        for cut in 0..good.len() {
            let _ = Btf::parse(&good[..cut]);
        }
        let mut b = good.clone();
        b[24 + 7] = 0x1f; // type 1: kind 31, which no BTF has
        assert!(Btf::parse(&b).is_err());
        assert!(Btf::from_vmlinux(b"\x7fELF\x02garbage").is_err());
    }
}
