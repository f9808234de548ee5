//! Which remote-access backends work on this host, and if one does not,
//! why, in words an operator can act on.

/// One backend's verdict.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct BackendReport {
    /// `soft` or `verbs`.
    pub name: &'static str,
    /// Whether the agent can serve it here.
    pub usable: bool,
    /// What it is, or why it cannot be used.
    pub detail: String,
}

/// Verdicts for every backend, soft first.
pub fn backends() -> Vec<BackendReport> {
    vec![
        BackendReport {
            name: "soft",
            usable: true,
            detail: "software RDMA over TCP, served by the agent's threads".into(),
        },
        verbs(),
    ]
}

/// The verbs backend's verdict alone.
pub fn verbs() -> BackendReport {
    let (usable, detail) = verbs_verdict();
    BackendReport {
        name: "verbs",
        usable,
        detail,
    }
}

#[cfg(not(feature = "verbs"))]
fn verbs_verdict() -> (bool, String) {
    (
        false,
        "bdvmm was built without the verbs feature (cargo build --features backdoor-agent/verbs)"
            .into(),
    )
}

#[cfg(feature = "verbs")]
fn verbs_verdict() -> (bool, String) {
    match ibverbs::devices() {
        Err(e) => (false, explain_list_error(&e)),
        Ok(list) => {
            let names: Vec<String> = list
                .iter()
                .map(|d| {
                    d.name()
                        .map_or_else(|| "?".to_owned(), |n| n.to_string_lossy().into_owned())
                })
                .collect();
            explain_devices(&names)
        }
    }
}

/// Translates `ibv_get_device_list`'s failure.
pub fn explain_list_error(e: &std::io::Error) -> String {
    if e.raw_os_error() == Some(libc::ENOSYS) {
        "this kernel has no RDMA subsystem (no /sys/class/infiniband); use a host with an RDMA NIC, or load Soft-RoCE: see docs/rdma.md".into()
    } else {
        format!("cannot list RDMA devices: {e}; see docs/rdma.md")
    }
}

/// The verdict for a list of device names.
pub fn explain_devices(names: &[String]) -> (bool, String) {
    if names.is_empty() {
        (
            false,
            "no RDMA devices; set up Soft-RoCE (docs/rdma.md)".into(),
        )
    } else {
        (true, format!("RDMA devices: {}", names.join(", ")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn soft_is_always_usable_and_listed_first() {
        let b = backends();
        assert_eq!(
            b.iter().map(|r| r.name).collect::<Vec<_>>(),
            ["soft", "verbs"]
        );
        assert!(b[0].usable);
        assert!(b[0].detail.contains("TCP"));
    }

    #[test]
    fn verbs_is_unusable_with_a_reason_or_names_its_devices() {
        let v = verbs();
        assert!(!v.detail.is_empty());
        if cfg!(feature = "verbs") {
            // On a host with RDMA this names devices; on this project's
            // build hosts (no RDMA subsystem) it explains what is missing.
            if !std::path::Path::new("/sys/class/infiniband").exists() {
                assert!(!v.usable);
                assert!(v.detail.contains("no RDMA subsystem"), "{}", v.detail);
            } else if v.usable {
                assert!(v.detail.starts_with("RDMA devices: "), "{}", v.detail);
            } else {
                assert!(v.detail.contains("docs/rdma.md"), "{}", v.detail);
            }
        } else {
            assert!(!v.usable);
            assert!(
                v.detail.contains("--features backdoor-agent/verbs"),
                "{}",
                v.detail
            );
        }
    }

    #[test]
    fn errors_are_translated() {
        let enosys = std::io::Error::from_raw_os_error(libc::ENOSYS);
        assert!(explain_list_error(&enosys).contains("no RDMA subsystem"));
        assert!(
            explain_list_error(&std::io::Error::from_raw_os_error(libc::EPERM))
                .contains("cannot list")
        );
        assert!(!explain_devices(&[]).0);
        assert!(explain_devices(&[]).1.contains("Soft-RoCE"));
        assert_eq!(
            explain_devices(&["rxe0".into()]),
            (true, "RDMA devices: rxe0".into())
        );
    }
}
