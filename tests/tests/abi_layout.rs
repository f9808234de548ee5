//! The C header `guest-driver/include/backdoor_abi.h` and the Rust crate
//! `backdoor-abi` describe the same ABI: gcc compiles the header and
//! prints every size, offset and constant; each must equal Rust's.

use std::mem::{offset_of, size_of};

use backdoor_abi::*;
use bdvmm_tests::c_header;

/// (C expression, value Rust says it has).
fn expectations() -> Vec<(&'static str, u64)> {
    macro_rules! off {
        ($cty:literal, $rty:ty, $cf:literal, $rf:ident) => {
            (
                concat!("__builtin_offsetof(struct ", $cty, ", ", $cf, ")"),
                offset_of!($rty, $rf) as u64,
            )
        };
    }
    vec![
        ("sizeof(struct bd_hook_desc)", size_of::<HookDesc>() as u64),
        off!("bd_hook_desc", HookDesc, "gpa", gpa),
        off!("bd_hook_desc", HookDesc, "len", len),
        off!("bd_hook_desc", HookDesc, "kind", kind),
        off!("bd_hook_desc", HookDesc, "perms", perms),
        off!("bd_hook_desc", HookDesc, "id", id),
        off!("bd_hook_desc", HookDesc, "reserved", reserved),
        off!("bd_hook_desc", HookDesc, "name", name),
        (
            "sizeof(struct bd_pbox_header)",
            size_of::<PboxHeader>() as u64,
        ),
        off!("bd_pbox_header", PboxHeader, "magic", magic),
        off!("bd_pbox_header", PboxHeader, "version", version),
        off!("bd_pbox_header", PboxHeader, "header_size", header_size),
        off!("bd_pbox_header", PboxHeader, "capacity", capacity),
        off!("bd_pbox_header", PboxHeader, "counter_size", counter_size),
        off!("bd_pbox_header", PboxHeader, "kernel_slots", kernel_slots),
        ("sizeof(struct bd_counter)", size_of::<Counter>() as u64),
        off!("bd_counter", Counter, "value", value),
        off!("bd_counter", Counter, "id", id),
        off!("bd_counter", Counter, "deadline_ms", deadline_ms),
        off!("bd_counter", Counter, "state", state),
        off!("bd_counter", Counter, "level", level),
        off!("bd_counter", Counter, "owner", owner),
        off!("bd_counter", Counter, "name", name),
        off!("bd_counter", Counter, "reserved1", reserved1),
        (
            "sizeof(struct bd_sbox_header)",
            size_of::<SboxHeader>() as u64,
        ),
        off!("bd_sbox_header", SboxHeader, "magic", magic),
        off!("bd_sbox_header", SboxHeader, "slot_count", slot_count),
        off!("bd_sbox_header", SboxHeader, "slot_size", slot_size),
        ("sizeof(struct bd_record)", size_of::<RecordHeader>() as u64),
        off!("bd_record", RecordHeader, "seq", seq),
        off!("bd_record", RecordHeader, "session_id", session_id),
        off!("bd_record", RecordHeader, "service", service),
        off!("bd_record", RecordHeader, "version", version),
        off!("bd_record", RecordHeader, "stage", stage),
        off!("bd_record", RecordHeader, "payload_len", payload_len),
        off!("bd_record", RecordHeader, "crc32c", crc32c),
        off!("bd_record", RecordHeader, "reserved", reserved),
        ("BD_ABI_VERSION", u64::from(ABI_VERSION)),
        ("BD_PAGE_SIZE", PAGE_SIZE),
        ("BD_DEV_MMIO_SIZE", DEV_MMIO_SIZE),
        ("BD_REG_MAGIC", reg::MAGIC),
        ("BD_REG_VERSION", reg::VERSION),
        ("BD_REG_FEATURES", reg::FEATURES),
        ("BD_REG_STATUS", reg::STATUS),
        ("BD_REG_GENERATION", reg::GENERATION),
        ("BD_REG_TAMPER_COUNT", reg::TAMPER_COUNT),
        ("BD_REG_HOOK_COUNT", reg::HOOK_COUNT),
        ("BD_REG_MAX_HOOKS", reg::MAX_HOOKS),
        ("BD_REG_DESC_ADDR_LO", reg::DESC_ADDR_LO),
        ("BD_REG_DESC_ADDR_HI", reg::DESC_ADDR_HI),
        ("BD_REG_HOOK_ID", reg::HOOK_ID),
        ("BD_REG_COMMAND", reg::COMMAND),
        ("BD_REG_RESULT", reg::RESULT),
        ("BD_REG_MAX_HOOK_PAGES", reg::MAX_HOOK_PAGES),
        ("BD_E_SEALED", HookError::Sealed.code().into()),
        ("BD_E_ALIGN", HookError::Align.code().into()),
        ("BD_E_RANGE", HookError::Range.code().into()),
        ("BD_E_OVERLAP", HookError::Overlap.code().into()),
        ("BD_E_TOO_MANY", HookError::TooMany.code().into()),
        ("BD_E_TOO_LARGE", HookError::TooLarge.code().into()),
        ("BD_E_KIND", HookError::Kind.code().into()),
        ("BD_E_PERMS", HookError::Perms.code().into()),
        ("BD_E_NAME", HookError::Name.code().into()),
        ("BD_E_DESC", HookError::Desc.code().into()),
        ("BD_E_NO_HOOK", HookError::NoHook.code().into()),
        ("BD_E_COMMAND", HookError::Command.code().into()),
        ("BD_KIND_PROGRESS_BOX", HookKind::ProgressBox as u64),
        ("BD_KIND_STATE_BOX", HookKind::StateBox as u64),
        ("BD_KIND_REPAIR", HookKind::Repair as u64),
        ("BD_KIND_KERNEL", HookKind::Kernel as u64),
        ("BD_PERM_READ", PERM_READ.into()),
        ("BD_PERM_WRITE", PERM_WRITE.into()),
        ("BD_PERM_ATOMIC", PERM_ATOMIC.into()),
        ("BD_PBOX_MAGIC", PBOX_MAGIC.into()),
        ("BD_SBOX_MAGIC", SBOX_MAGIC.into()),
        ("BD_STATE_FREE", CounterState::Free as u64),
        ("BD_STATE_ACTIVE", CounterState::Active as u64),
        ("BD_STATE_IDLE", CounterState::Idle as u64),
        ("BD_STATE_RETIRED", CounterState::Retired as u64),
        ("BD_LEVEL_OS", Level::Os as u64),
        ("BD_LEVEL_APPLICATION", Level::Application as u64),
        ("BD_LEVEL_SESSION", Level::Session as u64),
        ("BD_DEV_MAGIC_VALUE", DEV_MAGIC.into()),
        ("BD_CMD_REGISTER", cmd::REGISTER.into()),
        ("BD_CMD_UNREGISTER", cmd::UNREGISTER.into()),
        ("BD_CMD_UPDATE", cmd::UPDATE.into()),
        ("BD_CMD_SEAL", cmd::SEAL.into()),
        ("BD_STATUS_SEALED", STATUS_SEALED.into()),
        ("BD_FEATURE_SEAL", FEATURE_SEAL.into()),
        ("BD_FEATURE_REPAIR", FEATURE_REPAIR.into()),
        ("BD_MAX_HOOKS", MAX_HOOKS.into()),
        ("BD_MAX_HOOK_PAGES", MAX_HOOK_PAGES.into()),
    ]
}

#[test]
fn c_header_and_rust_crate_agree_on_every_size_offset_and_constant() {
    c_header::assert_agree(
        "ABI",
        "c11",
        "#include \"backdoor_abi.h\"\n#ifndef BD_DEV_MAGIC_VALUE\n#define BD_DEV_MAGIC_VALUE BD_DEV_MAGIC\n#endif",
        &expectations(),
    );
}
