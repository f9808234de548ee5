//! Little-endian fields of bytes the guest wrote (or an operator's file),
//! bounds-checked: `None` for a field that does not lie wholly inside,
//! whatever the offset (no overflow, no panic).

fn field<const N: usize>(b: &[u8], at: impl TryInto<usize>) -> Option<[u8; N]> {
    let at: usize = at.try_into().ok()?;
    b.get(at..at.checked_add(N)?)?.try_into().ok()
}

/// The u16 at byte `at`.
pub fn u16_at(b: &[u8], at: impl TryInto<usize>) -> Option<u16> {
    field(b, at).map(u16::from_le_bytes)
}

/// The u32 at byte `at`.
pub fn u32_at(b: &[u8], at: impl TryInto<usize>) -> Option<u32> {
    field(b, at).map(u32::from_le_bytes)
}

/// The u64 at byte `at`.
pub fn u64_at(b: &[u8], at: impl TryInto<usize>) -> Option<u64> {
    field(b, at).map(u64::from_le_bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fields_past_the_end_or_at_absurd_offsets_are_none() {
        let b = [1u8, 2, 3, 4, 5, 6, 7, 8, 9];
        assert_eq!(u16_at(&b, 0usize), Some(0x0201));
        assert_eq!(u32_at(&b, 5usize), Some(0x0908_0706));
        assert_eq!(u64_at(&b, 1u64), Some(0x0908_0706_0504_0302));
        assert_eq!(u64_at(&b, 2usize), None);
        assert_eq!(u32_at(&b, usize::MAX), None);
        assert_eq!(u16_at(&b, u64::MAX), None);
    }
}
