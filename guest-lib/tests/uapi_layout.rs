//! `guest-driver/include/backdoor_uapi.h` and this crate's `uapi` module
//! describe the same interface: gcc compiles the header and prints every
//! size, offset, constant and ioctl request number; each must equal Rust's.

use std::collections::BTreeMap;
use std::mem::{offset_of, size_of};
use std::path::Path;
use std::process::Command;

use backdoor_guest::uapi::*;

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
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("repo root")
        .join("guest-driver/include")
}

#[test]
fn uapi_header_and_rust_mirror_agree_on_sizes_offsets_constants_and_ioctl_numbers() {
    let exp = expectations();
    let dir = tempfile::tempdir().unwrap();
    let mut c = String::from(
        "#include <stdio.h>\n#include <string.h>\n#include \"backdoor_uapi.h\"\nint main(void)\n{\n",
    );
    for (expr, _) in &exp {
        c += &format!("\tprintf(\"%s=%llu\\n\", \"{expr}\", (unsigned long long)({expr}));\n");
    }
    c += "\tprintf(\"path=%s\\n\", BACKDOOR_DEVICE_PATH);\n\treturn 0;\n}\n";
    let src = dir.path().join("uapi.c");
    let bin = dir.path().join("uapi");
    std::fs::write(&src, c).unwrap();
    let out = Command::new("gcc")
        .args(["-std=gnu11", "-Wall", "-Wextra", "-Werror", "-I"])
        .arg(include_dir())
        .arg(&src)
        .arg("-o")
        .arg(&bin)
        .output()
        .expect("run gcc");
    assert!(
        out.status.success(),
        "backdoor_uapi.h does not compile cleanly:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let run = Command::new(&bin).output().unwrap();
    let text = String::from_utf8(run.stdout).unwrap();
    let c_values: BTreeMap<String, String> = text
        .lines()
        .filter_map(|l| l.split_once('=').map(|(k, v)| (k.to_owned(), v.to_owned())))
        .collect();
    assert_eq!(
        c_values.get("path").map(String::as_str),
        Some(BACKDOOR_DEVICE_PATH)
    );
    let mismatches: Vec<String> = exp
        .iter()
        .filter(|(e, v)| c_values.get(*e) != Some(&v.to_string()))
        .map(|(e, v)| format!("{e}: C says {:?}, Rust says {v}", c_values.get(*e)))
        .collect();
    assert!(
        mismatches.is_empty(),
        "uapi mismatches:\n{}",
        mismatches.join("\n")
    );
    assert!(exp.len() > 60, "the comparison covers every field");
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
