//! The hook table: validation of guest-written descriptors in the order
//! docs/abi.md fixes, and the seal.

use backdoor_abi::{
    decode_name, perms_valid, HookDesc, HookError, HookKind, MAX_HOOKS, MAX_HOOK_PAGES, PAGE_SIZE,
};

pub use backdoor_abi::descriptor::Hook;

/// The hooks of one generation.
#[derive(Debug, Default, Clone)]
pub struct HookTable {
    hooks: Vec<Hook>,
    next_id: u32,
    sealed: bool,
}

impl HookTable {
    /// The hooks, in registration order.
    pub fn hooks(&self) -> &[Hook] {
        &self.hooks
    }

    /// Whether the table is sealed.
    pub fn sealed(&self) -> bool {
        self.sealed
    }

    /// Validates `d` as a new hook (`updating: None`) or as the new shape
    /// of hook `updating`. `ram` lists guest RAM ranges as (start, len).
    pub fn validate(
        &self,
        d: &HookDesc,
        ram: &[(u64, u64)],
        updating: Option<u32>,
    ) -> Result<Hook, HookError> {
        if d.reserved != 0 || (updating.is_none() && d.id != 0) {
            return Err(HookError::Desc);
        }
        if let Some(id) = updating {
            if !self.hooks.iter().any(|h| h.id == id) {
                return Err(HookError::NoHook);
            }
        }
        let kind = HookKind::from_u32(d.kind).ok_or(HookError::Kind)?;
        if !perms_valid(kind, d.perms) {
            return Err(HookError::Perms);
        }
        let name = decode_name(&d.name).ok_or(HookError::Name)?;
        let others = || self.hooks.iter().filter(|h| Some(h.id) != updating);
        if others().any(|h| h.name == name) {
            return Err(HookError::Name);
        }
        if d.gpa % PAGE_SIZE != 0 || d.len % PAGE_SIZE != 0 {
            return Err(HookError::Align);
        }
        if d.len / PAGE_SIZE > u64::from(MAX_HOOK_PAGES) {
            return Err(HookError::TooLarge);
        }
        let end = d.gpa.checked_add(d.len).ok_or(HookError::Range)?;
        let inside = ram
            .iter()
            .any(|&(start, len)| d.gpa >= start && end <= start.saturating_add(len));
        if d.len == 0 || !inside {
            return Err(HookError::Range);
        }
        if others().any(|h| d.gpa < h.gpa + h.len && h.gpa < end) {
            return Err(HookError::Overlap);
        }
        if updating.is_none() && self.hooks.len() >= MAX_HOOKS as usize {
            return Err(HookError::TooMany);
        }
        // Ids are never reused within a generation: a guest that has cycled
        // through 2^32 - 1 REGISTERs gets E_TOO_MANY rather than a wrapped,
        // possibly duplicate id (found while writing fuzz/device_mmio's
        // invariants; too slow a loop for the fuzzer itself to reach).
        let id = match updating {
            Some(id) => id,
            None => self.next_id.checked_add(1).ok_or(HookError::TooMany)?,
        };
        Ok(Hook {
            id,
            gpa: d.gpa,
            len: d.len,
            kind,
            perms: d.perms,
            name: name.to_owned(),
        })
    }

    /// REGISTER: adds the hook and returns its id.
    pub fn register(&mut self, d: &HookDesc, ram: &[(u64, u64)]) -> Result<u32, HookError> {
        self.check_open()?;
        let hook = self.validate(d, ram, None)?;
        self.next_id = hook.id;
        self.hooks.push(hook);
        Ok(self.next_id)
    }

    /// UPDATE: replaces hook `d.id`'s range and permissions.
    pub fn update(&mut self, d: &HookDesc, ram: &[(u64, u64)]) -> Result<(), HookError> {
        self.check_open()?;
        let hook = self.validate(d, ram, Some(d.id))?;
        let slot = self
            .hooks
            .iter_mut()
            .find(|h| h.id == d.id)
            .ok_or(HookError::NoHook)?;
        *slot = hook;
        Ok(())
    }

    /// UNREGISTER.
    pub fn unregister(&mut self, id: u32) -> Result<(), HookError> {
        self.check_open()?;
        let before = self.hooks.len();
        self.hooks.retain(|h| h.id != id);
        if self.hooks.len() == before {
            return Err(HookError::NoHook);
        }
        Ok(())
    }

    /// SEAL.
    pub fn seal(&mut self) -> Result<(), HookError> {
        self.check_open()?;
        self.sealed = true;
        Ok(())
    }

    fn check_open(&self) -> Result<(), HookError> {
        if self.sealed {
            Err(HookError::Sealed)
        } else {
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests {
    use backdoor_abi::{encode_name, PERM_ALL, PERM_READ, PERM_WRITE};

    use super::*;

    const RAM: &[(u64, u64)] = &[(0, 64 << 20)];

    fn desc(gpa: u64, len: u64, kind: HookKind, perms: u32, name: &str) -> HookDesc {
        HookDesc {
            gpa,
            len,
            kind: kind as u32,
            perms,
            id: 0,
            reserved: 0,
            name: encode_name(name),
        }
    }

    fn pb(gpa: u64, len: u64, name: &str) -> HookDesc {
        desc(gpa, len, HookKind::ProgressBox, PERM_READ, name)
    }

    #[test]
    fn every_invalid_descriptor_gets_its_documented_error() {
        let mut t = HookTable::default();
        t.register(&pb(0x40_0000, 0x1000, "a"), RAM).unwrap();
        let cases: Vec<(HookDesc, HookError)> = vec![
            (pb(0x40_0800, 0x1000, "x"), HookError::Align),
            (pb(0x50_0000, 0x800, "x"), HookError::Align),
            (pb(0x50_0000, 0, "x"), HookError::Range),
            (pb(64 << 20, 0x1000, "x"), HookError::Range),
            (pb((64 << 20) - 0x1000, 0x2000, "x"), HookError::Range),
            (pb(0xd000_0000, 0x1000, "x"), HookError::Range),
            (pb(!0xfff, 0x2000, "x"), HookError::Range),
            (pb(0, (1 << 30) + 0x1000, "x"), HookError::TooLarge),
            (
                desc(
                    0x50_0000,
                    0x1000,
                    HookKind::ProgressBox,
                    PERM_READ | PERM_WRITE,
                    "x",
                ),
                HookError::Perms,
            ),
            (
                desc(0x50_0000, 0x1000, HookKind::Repair, PERM_WRITE, "x"),
                HookError::Perms,
            ),
            (
                desc(0x50_0000, 0x1000, HookKind::Repair, PERM_ALL | 1 << 5, "x"),
                HookError::Perms,
            ),
            (pb(0x50_0000, 0x1000, ""), HookError::Name),
            (pb(0x50_0000, 0x1000, "a\tb"), HookError::Name),
            (pb(0x50_0000, 0x1000, "a"), HookError::Name),
            (pb(0x3f_f000, 0x2000, "x"), HookError::Overlap),
        ];
        for (d, want) in cases {
            assert_eq!(t.register(&d, RAM), Err(want), "{d:?}");
        }
        let mut bad_kind = pb(0x50_0000, 0x1000, "x");
        bad_kind.kind = 9;
        assert_eq!(t.register(&bad_kind, RAM), Err(HookError::Kind));
        let mut reserved = pb(0x50_0000, 0x1000, "x");
        reserved.reserved = 1;
        assert_eq!(t.register(&reserved, RAM), Err(HookError::Desc));
        let mut with_id = pb(0x50_0000, 0x1000, "x");
        with_id.id = 3;
        assert_eq!(t.register(&with_id, RAM), Err(HookError::Desc));
        assert_eq!(t.hooks().len(), 1, "nothing invalid was added");
    }

    #[test]
    fn the_first_failing_check_wins() {
        let t = HookTable::default();
        // Unaligned, too large and outside RAM at once: E_ALIGN comes first.
        assert_eq!(
            t.validate(&pb(0x123, 1 << 40, "x"), RAM, None),
            Err(HookError::Align)
        );
        // Too large and outside RAM: E_TOO_LARGE before E_RANGE.
        assert_eq!(
            t.validate(&pb(0, 2 << 30, "x"), RAM, None),
            Err(HookError::TooLarge)
        );
    }

    #[test]
    fn hook_ids_never_wrap_around() {
        let mut t = HookTable::default();
        let ram = [(0, 1 << 30)];
        let first = t.register(&pb(0, 0x1000, "kept"), &ram).unwrap();
        t.next_id = u32::MAX - 1;
        assert_eq!(t.register(&pb(0x1000, 0x1000, "last"), &ram), Ok(u32::MAX));
        t.unregister(u32::MAX).unwrap();
        // The next id would wrap to 0 (then to `first`): refused instead.
        assert_eq!(
            t.register(&pb(0x2000, 0x1000, "wrapped"), &ram),
            Err(HookError::TooMany)
        );
        assert_eq!(t.hooks().len(), 1);
        assert_eq!(t.hooks()[0].id, first);
    }

    #[test]
    fn at_most_max_hooks() {
        let mut t = HookTable::default();
        for i in 0..u64::from(MAX_HOOKS) {
            t.register(&pb(0x10_0000 + i * 0x1000, 0x1000, &format!("h{i}")), RAM)
                .unwrap();
        }
        assert_eq!(
            t.register(&pb(0x100_0000, 0x1000, "one-more"), RAM),
            Err(HookError::TooMany)
        );
    }

    #[test]
    fn sealed_tables_refuse_every_change() {
        let mut t = HookTable::default();
        let id = t.register(&pb(0x40_0000, 0x2000, "p"), RAM).unwrap();
        t.seal().unwrap();
        assert_eq!(
            t.register(&pb(0x50_0000, 0x1000, "q"), RAM),
            Err(HookError::Sealed)
        );
        assert_eq!(t.unregister(id), Err(HookError::Sealed));
        let mut shrink = pb(0x40_0000, 0x1000, "p");
        shrink.id = id;
        assert_eq!(t.update(&shrink, RAM), Err(HookError::Sealed));
        assert_eq!(t.seal(), Err(HookError::Sealed));
        assert_eq!(t.hooks()[0].len, 0x2000);
    }

    #[test]
    fn update_may_reshape_a_hook_in_place_before_the_seal() {
        let mut t = HookTable::default();
        let id = t.register(&pb(0x40_0000, 0x2000, "p"), RAM).unwrap();
        let mut grow = pb(0x40_0000, 0x3000, "p");
        grow.id = id;
        t.update(&grow, RAM).unwrap();
        assert_eq!(t.hooks()[0].len, 0x3000);
        grow.id = 99;
        assert_eq!(t.update(&grow, RAM), Err(HookError::NoHook));
        assert_eq!(t.unregister(99), Err(HookError::NoHook));
    }
}
