//! Bad command lines and bad files: each gets a clear message and a
//! non-zero status, never a panic.

use std::process::Command;

use bdvmm_tests::{bdvmm_bin, exit, guest, run_bdvmm};

fn run_guest_with_mem(mem: &str) -> (Option<i32>, String) {
    let g = guest("hello");
    run_bdvmm(&["run", "--test-guest", g.to_str().unwrap(), "--mem", mem])
}

#[test]
fn memory_sizes_that_are_zero_too_large_or_not_sizes_are_refused() {
    let (code, err) = run_guest_with_mem("0");
    assert_eq!(
        (code, err.contains("--mem must not be zero")),
        (Some(exit::ERROR), true),
        "{err}"
    );
    let (code, err) = run_guest_with_mem("64T");
    assert_eq!(code, Some(exit::ERROR));
    assert!(err.contains("larger than this host's"), "{err}");
    let (code, err) = run_guest_with_mem("lots");
    assert_eq!(code, Some(exit::USAGE));
    assert!(
        err.contains("'lots' is not a size (use e.g. 512M or 2G)"),
        "{err}"
    );
    let (code, err) = run_guest_with_mem("12Q");
    assert_eq!(code, Some(exit::USAGE));
    assert!(err.contains("unknown unit"), "{err}");
}

#[test]
fn a_missing_kernel_is_named() {
    let (code, err) = run_bdvmm(&["run", "--kernel", "/nonexistent/vmlinuz"]);
    assert_eq!(code, Some(exit::ERROR));
    assert!(
        err.contains("cannot read kernel /nonexistent/vmlinuz: No such file"),
        "{err}"
    );
}

#[test]
fn a_file_that_is_not_a_kernel_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let f = dir.path().join("notes.txt");
    std::fs::write(&f, "this is not a kernel\n".repeat(100)).unwrap();
    let (code, err) = run_bdvmm(&["run", "--kernel", f.to_str().unwrap()]);
    assert_eq!(code, Some(exit::ERROR));
    assert!(err.contains("is not a Linux kernel"), "{err}");
    let (code, err) = run_bdvmm(&["run", "--test-guest", f.to_str().unwrap()]);
    assert_eq!(code, Some(exit::ERROR));
    assert!(
        err.contains("is not a loadable x86-64 test guest ELF"),
        "{err}"
    );
}

#[test]
fn an_initrd_that_does_not_fit_is_refused() {
    // A test guest ELF is a fine stand-in kernel for the loader's checks
    // (it has an entry above 1 MiB); the initrd is larger than all of RAM.
    let dir = tempfile::tempdir().unwrap();
    let initrd = dir.path().join("big.cpio");
    let f = std::fs::File::create(&initrd).unwrap();
    f.set_len(64 << 20).unwrap();
    let kernel = guest("hello");
    let (code, err) = run_bdvmm(&[
        "run",
        "--kernel",
        kernel.to_str().unwrap(),
        "--initrd",
        initrd.to_str().unwrap(),
        "--mem",
        "32M",
    ]);
    assert_eq!(code, Some(exit::ERROR), "{err}");
    assert!(err.contains("does not fit in guest RAM"), "{err}");
}

#[test]
fn guest_choice_is_required_and_exclusive() {
    let (code, err) = run_bdvmm(&["run"]);
    assert_eq!(code, Some(exit::USAGE));
    assert!(
        err.contains("--kernel") && err.contains("--test-guest"),
        "{err}"
    );
    let g = guest("hello");
    let (code, _) = run_bdvmm(&["run", "--kernel", "x", "--test-guest", g.to_str().unwrap()]);
    assert_eq!(code, Some(exit::USAGE));
    let (code, err) = run_bdvmm(&["run", "--test-guest", g.to_str().unwrap(), "--vcpus", "0"]);
    assert_eq!(code, Some(exit::ERROR));
    assert!(err.contains("--vcpus must be between 1 and 64"), "{err}");
}

#[test]
fn hugepages_without_reserved_pages_is_explained() {
    let free: u64 =
        std::fs::read_to_string("/sys/kernel/mm/hugepages/hugepages-2048kB/free_hugepages")
            .ok()
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or(0);
    if free >= 32 {
        bdvmm_tests::skip(
            "hugepages_without_reserved_pages_is_explained",
            &format!("this host has {free} free huge pages; the error path needs none"),
        );
        return;
    }
    let g = guest("hello");
    let (code, err) = run_bdvmm(&[
        "run",
        "--test-guest",
        g.to_str().unwrap(),
        "--mem",
        "64M",
        "--hugepages",
    ]);
    assert_eq!(code, Some(exit::ERROR));
    assert!(err.contains("sysctl vm.nr_hugepages=32"), "{err}");
}

/// Runs bdvmm in a private mount namespace where /dev/kvm is replaced.
fn run_without_kvm(setup: &str, extra: &str) -> Option<(Option<i32>, String)> {
    let g = guest("hello");
    let script = format!(
        "{setup} && {extra} {} run --test-guest {} --mem 64M",
        bdvmm_bin().display(),
        g.display()
    );
    let out = Command::new("unshare")
        .args(["--mount", "sh", "-c", &script])
        .output()
        .ok()?;
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    if err.contains("unshare failed")
        || err.contains("Operation not permitted") && !err.contains("bdvmm")
    {
        return None;
    }
    Some((out.status.code(), err))
}

#[test]
fn no_kvm_device_and_no_permission_are_explained() {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        bdvmm_tests::skip(
            "no_kvm_device_and_no_permission_are_explained",
            "needs root to build a mount namespace without /dev/kvm",
        );
        return;
    }
    let Some((code, err)) = run_without_kvm("mount -t tmpfs none /dev", "") else {
        bdvmm_tests::skip(
            "no_kvm_device_and_no_permission_are_explained",
            "mount namespaces are not available here",
        );
        return;
    };
    assert_eq!(code, Some(exit::ERROR), "{err}");
    assert!(err.contains("/dev/kvm does not exist"), "{err}");

    let Some((code, err)) = run_without_kvm(
        "chmod 0600 /dev/kvm 2>/dev/null; true",
        "setpriv --reuid=65534 --regid=65534 --clear-groups",
    ) else {
        bdvmm_tests::skip(
            "no_kvm_device_and_no_permission_are_explained",
            "mount namespaces are not available here",
        );
        return;
    };
    assert_eq!(code, Some(exit::ERROR), "{err}");
    assert!(err.contains("permission denied opening /dev/kvm"), "{err}");
}
