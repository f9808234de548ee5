//! Access control for every one-sided operation: the request's generation,
//! the hook, the bounds, the monitor's role and the hook's permissions.
//! No request reaches guest memory outside a hook.

use backdoor_abi::{HookKind, PERM_ATOMIC, PERM_READ, PERM_WRITE};
use backdoor_dev::Descriptor;

use crate::wire::{ErrorCode, Role, MAX_READ, MAX_WRITE};

/// What a request wants to do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    /// Read bytes.
    Read,
    /// Write bytes.
    Write,
    /// Compare-and-swap or fetch-and-add on an aligned word.
    Atomic,
}

/// A refusal: its code and a sentence for the monitor's operator.
pub type Refusal = (ErrorCode, String);

/// Checks one operation and returns the guest-physical address to access.
pub fn authorize(
    desc: &Descriptor,
    role: Role,
    generation: u32,
    hook_id: u32,
    offset: u64,
    len: u64,
    op: Op,
) -> Result<u64, Refusal> {
    if generation != desc.generation {
        return Err((
            ErrorCode::StaleGeneration,
            format!(
                "generation {generation} is gone: the guest rebooted (now {})",
                desc.generation
            ),
        ));
    }
    let hook = desc
        .hooks
        .iter()
        .find(|h| h.id == hook_id)
        .ok_or_else(|| (ErrorCode::NoHook, format!("no hook {hook_id}")))?;
    let (limit, perm) = match op {
        Op::Read => (u64::from(MAX_READ), PERM_READ),
        Op::Write => (u64::from(MAX_WRITE), PERM_WRITE),
        Op::Atomic => (8, PERM_ATOMIC),
    };
    if op != Op::Read {
        if role != Role::Repair {
            return Err((
                ErrorCode::Forbidden,
                format!("the {} role may not modify guest memory", role.name()),
            ));
        }
        if hook.kind != HookKind::Repair || hook.perms & perm == 0 {
            return Err((
                ErrorCode::Forbidden,
                format!(
                    "hook {} ({}) does not allow {}",
                    hook.id,
                    hook.name,
                    if op == Op::Write { "writes" } else { "atomics" }
                ),
            ));
        }
    } else if hook.perms & PERM_READ == 0 {
        return Err((
            ErrorCode::Forbidden,
            format!("hook {} is not readable", hook.id),
        ));
    }
    if len == 0 {
        return Err((ErrorCode::BadRequest, "zero-length access".into()));
    }
    if len > limit {
        return Err((
            ErrorCode::TooLarge,
            format!("{len} bytes exceeds the {limit}-byte limit"),
        ));
    }
    if op == Op::Atomic && offset % 8 != 0 {
        return Err((
            ErrorCode::Unaligned,
            format!("atomic at offset {offset} is not 8-byte aligned"),
        ));
    }
    match offset.checked_add(len) {
        Some(end) if end <= hook.len => Ok(hook.gpa + offset),
        _ => Err((
            ErrorCode::OutOfBounds,
            format!(
                "{offset}+{len} is outside hook {} ({} bytes)",
                hook.id, hook.len
            ),
        )),
    }
}

#[cfg(test)]
mod tests {
    use backdoor_abi::PERM_ALL;
    use backdoor_dev::Hook;

    use super::*;

    fn desc() -> Descriptor {
        let hook = |id, kind, perms, name: &str| Hook {
            id,
            gpa: 0x10_0000 * u64::from(id),
            len: 0x2000,
            kind,
            perms,
            name: name.into(),
        };
        Descriptor {
            generation: 7,
            sealed: true,
            tamper_count: 0,
            hooks: vec![
                hook(1, HookKind::ProgressBox, PERM_READ, "p"),
                hook(2, HookKind::Repair, PERM_ALL, "r"),
                hook(3, HookKind::Repair, PERM_READ, "ro"),
            ],
        }
    }

    #[test]
    fn reads_inside_a_hook_map_to_its_guest_address() {
        assert_eq!(
            authorize(&desc(), Role::Read, 7, 1, 0x40, 8, Op::Read),
            Ok(0x10_0040)
        );
        assert_eq!(
            authorize(&desc(), Role::Read, 7, 1, 0x1ff8, 8, Op::Read),
            Ok(0x10_1ff8)
        );
    }

    #[test]
    fn every_refusal_has_its_code() {
        let d = desc();
        let code = |r: Result<u64, Refusal>| r.unwrap_err().0;
        assert_eq!(
            code(authorize(&d, Role::Read, 6, 1, 0, 8, Op::Read)),
            ErrorCode::StaleGeneration
        );
        assert_eq!(
            code(authorize(&d, Role::Read, 7, 9, 0, 8, Op::Read)),
            ErrorCode::NoHook
        );
        assert_eq!(
            code(authorize(&d, Role::Read, 7, 1, 0x1ffc, 8, Op::Read)),
            ErrorCode::OutOfBounds
        );
        assert_eq!(
            code(authorize(&d, Role::Read, 7, 1, u64::MAX, 8, Op::Read)),
            ErrorCode::OutOfBounds
        );
        assert_eq!(
            code(authorize(&d, Role::Read, 7, 1, 0, 0, Op::Read)),
            ErrorCode::BadRequest
        );
        assert_eq!(
            code(authorize(
                &d,
                Role::Read,
                7,
                1,
                0,
                u64::from(MAX_READ) + 1,
                Op::Read
            )),
            ErrorCode::TooLarge
        );
        assert_eq!(
            code(authorize(&d, Role::Read, 7, 2, 0, 8, Op::Write)),
            ErrorCode::Forbidden,
            "read role writes"
        );
        assert_eq!(
            code(authorize(&d, Role::Repair, 7, 1, 0, 8, Op::Write)),
            ErrorCode::Forbidden,
            "progress boxes are read-only"
        );
        assert_eq!(
            code(authorize(&d, Role::Repair, 7, 3, 0, 8, Op::Atomic)),
            ErrorCode::Forbidden,
            "hook without ATOMIC"
        );
        assert_eq!(
            code(authorize(&d, Role::Repair, 7, 2, 4, 8, Op::Atomic)),
            ErrorCode::Unaligned
        );
        assert_eq!(
            authorize(&d, Role::Repair, 7, 2, 8, 8, Op::Atomic),
            Ok(0x20_0008)
        );
        assert_eq!(
            authorize(&d, Role::Repair, 7, 2, 3, 5, Op::Write),
            Ok(0x20_0003)
        );
    }
}
