//! End-to-end tests of the RDMA verbs backend: an in-process agent over a
//! memfd-backed fake guest RAM, monitors connecting real RC queue pairs
//! through it. They need an RDMA device (a NIC, or Soft-RoCE: docs/rdma.md;
//! the lab has one, docs/LAB.md); where `ibverbs::devices()` finds none,
//! each prints `SKIP: <reason>` and passes, or fails under
//! `BDVMM_REQUIRE_LAB=1`. `BDVMM_RDMA_DEVICE` picks a device (default: the
//! first).
#![cfg(feature = "verbs")]

mod common;

use std::net::SocketAddr;
use std::sync::Arc;

use backdoor_abi::{PERM_ALL, PERM_READ};
use backdoor_agent::verbs::{VerbsBackend, VerbsError};
use backdoor_agent::verbs_client::VerbsClient;
use backdoor_agent::wire::Msg;
use backdoor_agent::{doctor, Client, ErrorCode, GuestMemory, Role};
use common::{
    fake_guest, pattern, serve, FakeGuest, HOOK_LEN, PROGRESS, REPAIR, REPAIR_RO, TIMEOUT,
};

/// The doctor's reason when no device can run these tests.
fn skip_reason() -> Option<String> {
    let v = doctor::verbs();
    (!v.usable).then_some(v.detail)
}

/// Returns from the test with `SKIP: <reason>` where no device can run it;
/// under `BDVMM_REQUIRE_LAB=1` (the lab, CI) a skip is a failure instead.
macro_rules! require_rdma {
    () => {
        if let Some(reason) = skip_reason() {
            assert!(
                std::env::var_os("BDVMM_REQUIRE_LAB").is_none_or(|v| v != "1"),
                "cannot run here ({reason}), and BDVMM_REQUIRE_LAB=1 makes a skip a failure"
            );
            println!("SKIP: {reason}");
            return;
        }
    };
}

struct Fixture {
    _guest: FakeGuest,
    mem: Arc<GuestMemory>,
    addr: SocketAddr,
}

fn device() -> Option<String> {
    std::env::var("BDVMM_RDMA_DEVICE")
        .ok()
        .filter(|d| !d.is_empty())
}

fn fixture(with_verbs: bool) -> Fixture {
    let guest = fake_guest();
    let mem = guest.mem.clone();
    let mut agent = common::agent(mem.clone());
    if with_verbs {
        let backend = VerbsBackend::open(mem.clone(), device().as_deref()).unwrap();
        agent = agent.with_verbs(Arc::new(backend));
    }
    let addr = serve(agent);
    Fixture {
        _guest: guest,
        mem,
        addr,
    }
}

fn client(fx: &Fixture, role: Role) -> Client {
    common::client(fx.addr, role)
}

/// A verbs connection and the TCP connection that keeps its queue pair
/// and regions alive (the agent revokes them when it closes).
struct Verbs {
    qp: VerbsClient,
    _tcp: Client,
}

impl std::ops::Deref for Verbs {
    type Target = VerbsClient;
    fn deref(&self) -> &VerbsClient {
        &self.qp
    }
}

impl std::ops::DerefMut for Verbs {
    fn deref_mut(&mut self) -> &mut VerbsClient {
        &mut self.qp
    }
}

fn verbs_client(fx: &Fixture, role: Role) -> Verbs {
    let mut tcp = client(fx, role);
    let qp = VerbsClient::connect(&mut tcp, device().as_deref())
        .unwrap()
        .with_timeout(TIMEOUT);
    Verbs { qp, _tcp: tcp }
}

fn guest(fx: &Fixture, gpa: u64, len: usize) -> Vec<u8> {
    let mut b = vec![0; len];
    assert!(fx.mem.read(gpa, &mut b));
    b
}

#[test]
fn the_doctor_explains_a_missing_device() {
    // A usable device is named; a missing one is explained, pointing at
    // the set-up instructions.
    let v = doctor::verbs();
    assert_eq!(v.name, "verbs");
    if v.usable {
        let first = backdoor_agent::verbs::device_names().unwrap_or_default();
        assert!(
            first.iter().any(|d| v.detail.contains(d.as_str())),
            "{} names none of {first:?}",
            v.detail
        );
    } else {
        assert!(v.detail.contains("docs/rdma.md"), "{}", v.detail);
    }
}

#[test]
fn an_agent_without_a_device_refuses_verbs_connect() {
    // Needs no device: the agent has no verbs backend at all.
    let fx = fixture(false);
    let mut c = client(&fx, Role::Read);
    let err = c.raw(&Msg::VerbsConnect(b"{}".to_vec())).unwrap_err();
    assert_eq!(err.code(), Some(ErrorCode::Unsupported), "{err}");
    assert!(!c.descriptor().backends.iter().any(|b| b == "verbs"));
}

#[test]
fn rdma_read_returns_the_exact_bytes() {
    require_rdma!();
    let fx = fixture(true);
    let mut soft = client(&fx, Role::Read);
    assert!(soft.descriptor().backends.iter().any(|b| b == "verbs"));
    let mut v = VerbsClient::connect(&mut soft, device().as_deref()).unwrap();
    assert_eq!(v.info().generation, 3);
    let listed: Vec<u32> = v.info().regions.iter().map(|r| r.hook).collect();
    assert_eq!(listed, [1, 2, 3], "every readable hook is listed");
    assert!(
        v.info().regions.iter().all(|r| r.perms == PERM_READ),
        "the read role gets read only"
    );

    let p = pattern();
    let len = usize::try_from(HOOK_LEN).unwrap();
    assert_eq!(v.read(PROGRESS.0, 0, len).unwrap(), p);
    assert_eq!(v.read(PROGRESS.0, 100, 7).unwrap(), &p[100..107]);
    assert_eq!(v.read(PROGRESS.0, HOOK_LEN - 1, 1).unwrap(), &p[len - 1..]);
    // The guest changes its RAM; the next READ sees it with no agent involvement.
    assert!(fx.mem.write(PROGRESS.1 + 8, &0xdead_beef_u64.to_le_bytes()));
    assert_eq!(
        v.read(PROGRESS.0, 8, 8).unwrap(),
        0xdead_beef_u64.to_le_bytes()
    );
    // Same bytes as the soft backend.
    let generation = soft.descriptor().generation;
    match soft
        .raw(&Msg::Read {
            generation,
            hook: PROGRESS.0,
            offset: 0,
            len: 64,
        })
        .unwrap()
    {
        Msg::ReadOk(b) => assert_eq!(b, v.read(PROGRESS.0, 0, 64).unwrap()),
        other => panic!("{other:?}"),
    }
}

#[test]
fn an_rkey_is_one_connections_and_dies_with_it() {
    require_rdma!();
    let fx = fixture(true);
    let mut first = verbs_client(&fx, Role::Read);
    let old = *first.region(PROGRESS.0).unwrap();
    // Another live connection cannot use it: its own protection domain.
    let mut other = verbs_client(&fx, Role::Read);
    assert_ne!(old.rkey, other.region(PROGRESS.0).unwrap().rkey);
    let err = other.read_foreign_region(&old, 0, 16).unwrap_err();
    assert!(err.is_remote_access_error(), "{err}");
    assert_eq!(first.read(PROGRESS.0, 0, 16).unwrap(), pattern()[..16]);
    // Nor can anyone once its connection has closed (the agent's thread
    // for it sees the end of the stream, then drops the lease).
    drop(first);
    let deadline = std::time::Instant::now() + TIMEOUT;
    let err = loop {
        let mut late = verbs_client(&fx, Role::Read);
        match late.read_foreign_region(&old, 0, 16) {
            Err(e) => break e,
            Ok(_) => assert!(
                std::time::Instant::now() < deadline,
                "a closed connection's rkey still reads after {TIMEOUT:?}"
            ),
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    };
    assert!(err.is_remote_access_error(), "{err}");
    let mut fresh = verbs_client(&fx, Role::Read);
    assert_eq!(fresh.read(PROGRESS.0, 0, 16).unwrap(), pattern()[..16]);
}

#[test]
fn repair_writes_and_atomics_land_in_guest_memory() {
    require_rdma!();
    let fx = fixture(true);
    let mut v = verbs_client(&fx, Role::Repair);
    let r = *v.region(REPAIR.0).unwrap();
    assert_eq!(r.perms, PERM_ALL);
    assert_eq!(
        v.region(PROGRESS.0).unwrap().perms,
        PERM_READ,
        "repair role reads progress boxes only"
    );

    v.write(REPAIR.0, 16, b"repaired!").unwrap();
    assert_eq!(guest(&fx, REPAIR.1 + 16, 9), b"repaired!");
    assert_eq!(v.read(REPAIR.0, 16, 9).unwrap(), b"repaired!");

    assert!(fx.mem.write(REPAIR.1, &5u64.to_le_bytes()));
    assert_eq!(v.cas(REPAIR.0, 0, 5, 9).unwrap(), 5);
    assert_eq!(fx.mem.faa(REPAIR.1, 0), Some(9));
    assert_eq!(
        v.cas(REPAIR.0, 0, 5, 1).unwrap(),
        9,
        "a failed CAS returns the current value"
    );
    assert_eq!(fx.mem.faa(REPAIR.1, 0), Some(9));

    assert!(fx.mem.write(REPAIR.1 + 8, &40u64.to_le_bytes()));
    assert_eq!(v.faa(REPAIR.0, 8, 2).unwrap(), 40);
    assert_eq!(v.faa(REPAIR.0, 8, u64::MAX).unwrap(), 42, "wrapping add");
    assert_eq!(fx.mem.faa(REPAIR.1 + 8, 0), Some(41));
}

#[test]
fn a_read_role_rdma_write_is_refused_by_the_nic() {
    require_rdma!();
    let fx = fixture(true);
    let mut v = verbs_client(&fx, Role::Read);
    let before = guest(&fx, REPAIR.1, 16);
    // The client refuses before posting...
    assert!(matches!(
        v.write(REPAIR.0, 0, b"nope"),
        Err(VerbsError::Forbidden { .. })
    ));
    assert!(matches!(
        v.faa(REPAIR.0, 0, 1),
        Err(VerbsError::Forbidden { .. })
    ));
    assert!(!v.is_broken());
    // ...and when asked to post anyway, the agent's QP (REMOTE_READ only)
    // refuses it even though the MR itself allows writes.
    let err = v.write_unchecked_perms(REPAIR.0, 0, b"nope").unwrap_err();
    assert!(err.is_remote_refusal(), "{err}");
    assert_eq!(guest(&fx, REPAIR.1, 16), before, "guest memory unchanged");
    assert!(
        matches!(v.read(PROGRESS.0, 0, 8), Err(VerbsError::Broken)),
        "the QP is in the error state now"
    );
}

#[test]
fn a_repair_rdma_write_to_a_read_only_hook_is_refused_by_the_nic() {
    require_rdma!();
    let fx = fixture(true);
    let mut v = verbs_client(&fx, Role::Repair);
    assert_eq!(v.region(REPAIR_RO.0).unwrap().perms, PERM_READ);
    let before = guest(&fx, REPAIR_RO.1, 16);
    assert!(matches!(
        v.write(REPAIR_RO.0, 0, b"nope"),
        Err(VerbsError::Forbidden { .. })
    ));
    // The QP allows writes, but this hook's MR does not.
    let err = v
        .write_unchecked_perms(REPAIR_RO.0, 0, b"nope")
        .unwrap_err();
    assert!(err.is_remote_access_error(), "{err}");
    assert_eq!(guest(&fx, REPAIR_RO.1, 16), before);
}

#[test]
fn accesses_outside_a_region_are_refused_before_posting() {
    require_rdma!();
    let fx = fixture(true);
    let mut v = verbs_client(&fx, Role::Repair);
    for (offset, len) in [(HOOK_LEN - 4, 8usize), (HOOK_LEN, 1), (u64::MAX - 2, 8)] {
        assert!(
            matches!(
                v.read(PROGRESS.0, offset, len),
                Err(VerbsError::OutOfBounds { .. })
            ),
            "{offset}+{len}"
        );
    }
    assert!(matches!(v.read(99, 0, 8), Err(VerbsError::NoRegion(99))));
    assert!(matches!(v.read(PROGRESS.0, 0, 0), Err(VerbsError::Empty)));
    assert!(matches!(
        v.write(REPAIR.0, HOOK_LEN - 2, b"abcd"),
        Err(VerbsError::OutOfBounds { .. })
    ));
    assert!(matches!(
        v.cas(REPAIR.0, 4, 0, 1),
        Err(VerbsError::Unaligned(4))
    ));
    assert!(matches!(
        v.faa(REPAIR.0, HOOK_LEN, 1),
        Err(VerbsError::OutOfBounds { .. })
    ));
    // Nothing was posted: the QP is healthy and still works.
    assert!(!v.is_broken());
    assert_eq!(v.read(PROGRESS.0, 0, 4).unwrap(), &pattern()[..4]);
}

#[test]
fn a_malformed_endpoint_is_a_bad_request() {
    require_rdma!();
    let fx = fixture(true);
    let mut c = client(&fx, Role::Read);
    for bad in [
        &b"garbage"[..],
        b"{}",
        br#"{"lid":0,"gid":"xyz","qpn":1,"psn":1}"#,
    ] {
        let err = c.raw(&Msg::VerbsConnect(bad.to_vec())).unwrap_err();
        assert_eq!(err.code(), Some(ErrorCode::BadRequest), "{err}");
    }
    // The connection is still usable afterwards.
    assert!(VerbsClient::connect(&mut c, device().as_deref()).is_ok());
}
