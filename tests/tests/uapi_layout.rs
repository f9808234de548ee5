//! `guest-driver/include/backdoor_uapi.h` and this crate's `uapi` module
//! describe the same interface: gcc compiles the header and prints every
//! size, offset, constant and ioctl request number; each must equal Rust's.

use std::mem::{offset_of, size_of};

use backdoor_guest::uapi::*;
use bdvmm_tests::{c_header, repo_root};

fn expectations() -> Vec<(&'static str, u64)> {
    macro_rules! off {
        ($cty:literal, $rty:ty, $($f:ident),+) => {
            vec![
                (concat!("sizeof(struct ", $cty, ")"), size_of::<$rty>() as u64),
                $((
                    concat!("__builtin_offsetof(struct ", $cty, ", ", stringify!($f), ")"),
                    offset_of!($rty, $f) as u64,
                ),)+
                $((
                    concat!("sizeof(((struct ", $cty, " *)0)->", stringify!($f), ")"),
                    {
                        let v = <$rty>::default_for_layout();
                        std::mem::size_of_val(&v.$f) as u64
                    },
                ),)+
            ]
        };
    }
    let mut v = Vec::new();
    v.extend(off!(
        "bd_ioc_info",
        BdIocInfo,
        abi_version,
        generation,
        sealed,
        counters_total,
        counters_free,
        slots_total,
        slots_free,
        slot_size,
        os_counter_id,
        inbox_len,
        inbox_mmap_offset,
        inbox_slot_size,
        reserved
    ));
    v.extend(off!(
        "bd_ioc_counter",
        BdIocCounter,
        name,
        deadline_ms,
        level,
        reserved0,
        owner,
        id,
        mmap_offset,
        offset_in_map,
        reserved1
    ));
    v.extend(off!("bd_ioc_counter_state", BdIocCounterState, id, state));
    v.extend(off!(
        "bd_ioc_svc",
        BdIocSvc,
        service,
        slots,
        flags,
        slot_count,
        slot_size,
        first_slot,
        created,
        mmap_offset
    ));
    v.extend([
        ("BD_IOC_MAGIC", u64::from(BD_IOC_MAGIC)),
        ("BD_NAME_LEN", BD_NAME_LEN as u64),
        ("BD_SERVICE_LEN", BD_SERVICE_LEN as u64),
        ("BD_SVC_CREATE", u64::from(BD_SVC_CREATE)),
        ("BD_IOC_INFO", BD_IOC_INFO),
        ("BD_IOC_COUNTER_ALLOC", BD_IOC_COUNTER_ALLOC),
        ("BD_IOC_COUNTER_STATE", BD_IOC_COUNTER_STATE),
        ("BD_IOC_COUNTER_FREE", BD_IOC_COUNTER_FREE),
        ("BD_IOC_SVC_OPEN", BD_IOC_SVC_OPEN),
        ("BD_IOC_SVC_DELETE", BD_IOC_SVC_DELETE),
    ]);
    v
}

/// Zeroed values, only to measure field sizes.
trait DefaultForLayout {
    fn default_for_layout() -> Self;
}
macro_rules! zeroed {
    ($($t:ty),*) => {$(
        impl DefaultForLayout for $t {
            fn default_for_layout() -> Self {
                // SAFETY: plain-old-data structs of integers and byte
                // arrays, for which all-zero is a valid value.
                unsafe { std::mem::zeroed() }
            }
        }
    )*};
}
zeroed!(BdIocInfo, BdIocCounter, BdIocCounterState, BdIocSvc);

fn include_dir() -> std::path::PathBuf {
    repo_root().join("guest-driver/include")
}

#[test]
fn uapi_header_and_rust_mirror_agree_on_sizes_offsets_constants_and_ioctl_numbers() {
    let mut exp = expectations();
    assert!(exp.len() > 60, "the comparison covers every field");
    // The device path, as a number C can print: 1 if the strings are equal.
    let path = format!("!strcmp(BACKDOOR_DEVICE_PATH, \"{BACKDOOR_DEVICE_PATH}\")");
    exp.push((&path, 1));
    c_header::assert_agree(
        "uapi",
        "gnu11",
        "#include <string.h>\n#include \"backdoor_uapi.h\"",
        &exp,
    );
}

/// A struct added to the header must be mirrored too: every `struct bd_ioc_*`
/// the header defines is one this test knows.
#[test]
fn every_uapi_struct_in_the_header_is_mirrored() {
    let header = std::fs::read_to_string(include_dir().join("backdoor_uapi.h")).unwrap();
    let known = [
        "bd_ioc_info",
        "bd_ioc_counter",
        "bd_ioc_counter_state",
        "bd_ioc_svc",
    ];
    for line in header.lines() {
        if let Some(rest) = line.strip_prefix("struct ") {
            let name = rest.split_whitespace().next().unwrap_or("");
            if rest.trim_end().ends_with('{') {
                assert!(
                    known.contains(&name),
                    "backdoor_uapi.h defines struct {name}, which the Rust mirror lacks"
                );
            }
        }
        if let Some(rest) = line.strip_prefix("#define BD_IOC_") {
            let name = rest.split_whitespace().next().unwrap_or("");
            assert!(
                [
                    "MAGIC",
                    "INFO",
                    "COUNTER_ALLOC",
                    "COUNTER_STATE",
                    "COUNTER_FREE",
                    "SVC_OPEN",
                    "SVC_DELETE"
                ]
                .contains(&name),
                "backdoor_uapi.h defines BD_IOC_{name}, which the Rust mirror lacks"
            );
        }
    }
}
