//! The backdoor agent against real guests: exact bytes, refusals (role,
//! permissions, bounds, keys, malformed frames), reads that cost a paused,
//! hung or halted guest nothing, a separate agent outliving a SIGKILLed
//! VMM, and several monitors at once.

use std::io::Write;
use std::net::TcpStream;
use std::time::Duration;

use backdoor_abi::record::{read_slot, ReadOutcome};
use backdoor_abi::{Counter, CounterState, LINE, PBOX_MAGIC};
use backdoor_agent::wire::{read_msg, write_msg, Msg};
use backdoor_agent::{Client, ClientError, ErrorCode, RemoteSlot, Role};
use bdvmm_tests::{exit, keys, AgentProcess, Vm};

const T: Duration = Duration::from_secs(60);
const NET: Duration = Duration::from_secs(5);

struct Served {
    vm: Vm,
    addr: String,
    _dir: tempfile::TempDir,
}

/// bd_serve with the in-process agent on an ephemeral port.
fn serve(ring: u8) -> Served {
    let dir = tempfile::tempdir().unwrap();
    let k = keys::write_file_with_forensic(dir.path());
    let mut vm = Vm::test_guest(
        "bd_serve",
        ring,
        &[
            "--name",
            "vm1",
            "--backdoor-listen",
            "127.0.0.1:0",
            "--backdoor-keys",
            k.to_str().unwrap(),
        ],
    );
    vm.wait_line("bd-serve: ready", T);
    let addr = vm.api("status")["agent_addr"]
        .as_str()
        .expect("agent address")
        .to_owned();
    Served {
        vm,
        addr,
        _dir: dir,
    }
}

fn connect(addr: &str, role: Role) -> Client {
    let key = match role {
        Role::Read => keys::READ,
        Role::Repair => keys::REPAIR,
        Role::Forensic => keys::FORENSIC,
    };
    Client::connect(addr, "vm1", role, &key, NET).expect("connect to the agent")
}

fn hook(c: &Client, name: &str) -> u32 {
    c.descriptor()
        .hook(name)
        .unwrap_or_else(|| panic!("no hook {name}"))
        .id
}

/// Counter `i` (0-based) of the progress box.
fn counter(c: &mut Client, i: u64) -> Counter {
    let h = hook(c, "progress");
    let b = c.read(h, LINE as u64 * (i + 1), 64).unwrap();
    Counter::from_bytes(&b.try_into().unwrap())
}

fn value(c: &mut Client, i: u64) -> u64 {
    let h = hook(c, "progress");
    u64::from_le_bytes(
        c.read(h, LINE as u64 * (i + 1), 8)
            .unwrap()
            .try_into()
            .unwrap(),
    )
}

fn records(c: &mut Client) -> Vec<String> {
    let h = hook(c, "state");
    (0..3)
        .map(|i| {
            let slot = RemoteSlot::new(c, h, LINE as u64 + i * 256, 256);
            match read_slot(&slot, 3) {
                ReadOutcome::Complete { record, .. } => {
                    format!(
                        "{}/{}/v{}/s{}: {}",
                        record.service,
                        record.session_id,
                        record.version,
                        record.stage,
                        String::from_utf8_lossy(&record.payload).trim_end_matches('\0')
                    )
                }
                other => panic!("slot {i}: {other:?} {:?}", slot.take_error()),
            }
        })
        .collect()
}

#[test]
fn reads_return_exactly_the_bytes_the_guest_wrote() {
    let s = serve(3);
    let mut c = connect(&s.addr, Role::Read);
    let d = c.descriptor().clone();
    assert_eq!(
        (d.vm.as_str(), d.sealed, d.tamper_count, d.role),
        ("vm1", true, 0, Role::Read)
    );
    assert_eq!(
        d.generation,
        u32::try_from(s.vm.api("status")["generation"].as_u64().unwrap()).unwrap()
    );
    let names: Vec<_> = d
        .hooks
        .iter()
        .map(|h| (h.name.as_str(), h.kind.as_str(), h.len))
        .collect();
    assert_eq!(
        names,
        vec![
            ("progress", "progress_box", 8192),
            ("state", "state_box", 16384),
            ("repair", "repair", 4096)
        ]
    );

    let header = c.read(hook(&c, "progress"), 0, 16).unwrap();
    assert_eq!(
        u32::from_le_bytes(header[0..4].try_into().unwrap()),
        PBOX_MAGIC
    );
    let live = counter(&mut c, 0);
    let fixed = counter(&mut c, 1);
    let idle = counter(&mut c, 2);
    assert_eq!(backdoor_abi::decode_name(&live.name), Some("live"));
    assert_eq!(
        (fixed.value, fixed.deadline_ms, fixed.owner, fixed.state()),
        (12345, 1000, 2, Some(CounterState::Active))
    );
    assert_eq!(idle.state(), Some(CounterState::Idle));
    // The live counter moves while the guest runs (given the vCPU a slice of CPU).
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while value(&mut c, 0) == live.value {
        assert!(
            std::time::Instant::now() < deadline,
            "the live counter never moved"
        );
        std::thread::sleep(Duration::from_millis(5));
    }

    assert_eq!(
        records(&mut c),
        vec![
            "kv/1/v1/s2: session-1: cart=3 items",
            "kv/2/v1/s2: session-2: cart=0 items",
            "kv/3/v1/s2: session-3: checkout    ",
        ]
    );
    let word = c.read(hook(&c, "repair"), 8, 8).unwrap();
    assert_eq!(
        u64::from_le_bytes(word.try_into().unwrap()),
        0x5245_5041_4952_0001
    );

    // One batched round trip for all three counters' values.
    let h = hook(&c, "progress");
    let batch: Vec<_> = (1..=3)
        .map(|i| backdoor_agent::wire::BatchEntry {
            hook: h,
            offset: LINE as u64 * i,
            len: 8,
        })
        .collect();
    let values = c.read_batch(&batch).unwrap();
    assert_eq!(
        u64::from_le_bytes(values[1].clone().try_into().unwrap()),
        12345
    );
}

#[test]
fn writes_outside_repair_hooks_from_the_read_role_or_out_of_bounds_are_refused() {
    let s = serve(3);
    let mut r = connect(&s.addr, Role::Read);
    let mut w = connect(&s.addr, Role::Repair);
    let (progress, repair) = (hook(&r, "progress"), hook(&r, "repair"));
    let code = |e: Result<(), ClientError>| e.unwrap_err().code();
    assert_eq!(
        code(r.write(repair, 8, &[1; 8])),
        Some(ErrorCode::Forbidden),
        "read role may not write"
    );
    assert_eq!(
        r.cas(repair, 8, 0, 1).unwrap_err().code(),
        Some(ErrorCode::Forbidden)
    );
    assert_eq!(
        r.faa(repair, 8, 1).unwrap_err().code(),
        Some(ErrorCode::Forbidden),
        "read role may not add"
    );
    assert_eq!(
        code(w.write(progress, 0, &[1; 8])),
        Some(ErrorCode::Forbidden),
        "progress boxes are read-only"
    );
    assert_eq!(
        r.read(progress, 8190, 8).unwrap_err().code(),
        Some(ErrorCode::OutOfBounds)
    );
    assert_eq!(
        r.read(progress, u64::MAX - 3, 8).unwrap_err().code(),
        Some(ErrorCode::OutOfBounds)
    );
    assert_eq!(
        r.read(99, 0, 8).unwrap_err().code(),
        Some(ErrorCode::NoHook)
    );
    assert_eq!(
        w.faa(repair, 12, 1).unwrap_err().code(),
        Some(ErrorCode::Unaligned)
    );
    // After all that, the guest's data is intact and the repair role works.
    assert_eq!(value(&mut r, 1), 12345);
    assert_eq!(
        w.cas(repair, 8, 0x5245_5041_4952_0001, 77).unwrap(),
        0x5245_5041_4952_0001
    );
    assert_eq!(w.faa(repair, 8, 3).unwrap(), 77);
    w.write(repair, 16, b"patched!").unwrap();
    assert_eq!(
        r.read(repair, 8, 16).unwrap(),
        [&80u64.to_le_bytes()[..], b"patched!"].concat()
    );
    assert!(
        s.vm.console().contains("bd-serve: ready"),
        "the guest kept running"
    );
}

#[test]
fn wrong_keys_unknown_vms_and_malformed_frames_are_refused() {
    let s = serve(3);
    // A client with the wrong key, or naming another VM, is refused:
    // its HELLO does not open under the agent's key.
    for (vm, key) in [
        ("vm1", &b"wrong-key-16-byt"[..]),
        ("other-vm", &keys::READ[..]),
    ] {
        let e = Client::connect(&s.addr, vm, Role::Read, key, NET).unwrap_err();
        assert_eq!(e.code(), Some(ErrorCode::AuthFailed), "{vm}: {e:?}");
    }
    // A HELLO whose handshake message is made up: refused the same way.
    let mut raw = TcpStream::connect(&s.addr).unwrap();
    raw.set_read_timeout(Some(NET)).unwrap();
    write_msg(
        &mut raw,
        0,
        &Msg::Hello {
            vm: "vm1".into(),
            role: Role::Repair,
            noise: vec![0; 48],
        },
    )
    .unwrap();
    assert!(matches!(
        read_msg(&mut raw).unwrap().1,
        Msg::Error {
            code: ErrorCode::AuthFailed,
            ..
        }
    ));
    // An impostor agent that does not hold the key cannot finish the
    // handshake: the monitor notices before it believes anything.
    let impostor = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let at = impostor.local_addr().unwrap();
    std::thread::spawn(move || {
        let (mut c, _) = impostor.accept().unwrap();
        let _ = read_msg(&mut c);
        let (_, hello) =
            backdoor_agent::channel::Initiator::start(b"impostor-key-16b", "vm1", Role::Read)
                .unwrap();
        let (_, noise) =
            backdoor_agent::channel::respond(b"impostor-key-16b", "vm1", Role::Read, &hello)
                .unwrap();
        write_msg(&mut c, 0, &Msg::Accept { noise }).unwrap();
        std::thread::sleep(Duration::from_secs(1));
    });
    let e = Client::connect(at, "vm1", Role::Read, &keys::READ, NET).unwrap_err();
    assert!(matches!(e, ClientError::AgentNotAuthentic), "{e:?}");
    // Nor can it make the monitor take a large frame before it is known:
    // the answer to HELLO is bounded at its header.
    let impostor = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let at = impostor.local_addr().unwrap();
    std::thread::spawn(move || {
        let (mut c, _) = impostor.accept().unwrap();
        let _ = read_msg(&mut c);
        write_msg(&mut c, 0, &Msg::Welcome(vec![b' '; 1 << 20])).unwrap();
        std::thread::sleep(Duration::from_secs(1));
    });
    let e = Client::connect(at, "vm1", Role::Read, &keys::READ, NET).unwrap_err();
    assert!(
        matches!(
            e,
            ClientError::Wire(backdoor_agent::wire::WireError::TooLarge(_))
        ),
        "{e:?}"
    );
    // Garbage instead of a frame, and an oversized frame: closed, nothing else affected.
    for junk in [
        b"GET / HTTP/1.0\r\n\r\n".to_vec(),
        [
            0x42, 0x44, 0x57, 0x31, 3, 8, 0, 0, 0, 0, 0, 0, 0xff, 0xff, 0xff, 0xff,
        ]
        .to_vec(),
    ] {
        let mut raw = TcpStream::connect(&s.addr).unwrap();
        raw.set_read_timeout(Some(NET)).unwrap();
        raw.write_all(&junk).unwrap();
        let _ = read_msg(&mut raw);
    }
    let mut c = connect(&s.addr, Role::Read);
    assert_eq!(value(&mut c, 1), 12345);
}

#[test]
fn reads_of_a_paused_hung_or_halted_guest_succeed_and_cost_it_no_exits() {
    for mode in ["paused", "hung", "halted"] {
        let s = serve(0);
        let mut c = connect(&s.addr, Role::Read);
        match mode {
            "paused" => assert_eq!(s.vm.api("pause")["ok"], true),
            _ => {
                let mut w = connect(&s.addr, Role::Repair);
                w.write(
                    hook(&w, "repair"),
                    0,
                    &(if mode == "hung" { 1u64 } else { 2 }).to_le_bytes(),
                )
                .unwrap();
            }
        }
        let mut vm = s.vm;
        if mode != "paused" {
            vm.wait_line(
                if mode == "hung" {
                    "hanging with interrupts off"
                } else {
                    "halting with interrupts off"
                },
                T,
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        let before = vm.api("exits");
        let frozen = value(&mut c, 0);
        for _ in 0..500 {
            assert_eq!(value(&mut c, 1), 12345, "{mode}");
        }
        assert_eq!(
            value(&mut c, 0),
            frozen,
            "{mode}: the live counter stopped: the guest really is stuck"
        );
        assert_eq!(records(&mut c).len(), 3, "{mode}");
        assert_eq!(
            vm.api("exits"),
            before,
            "{mode}: 1000 remote reads caused guest exits"
        );
        assert_eq!(vm.api("stop")["ok"], true);
        assert_eq!(vm.wait_exit(T), Some(exit::OK));
    }
}

#[test]
fn a_second_agent_leaves_a_live_agents_socket_alone() {
    let dir = tempfile::tempdir().unwrap();
    let k = keys::write_file(dir.path());
    let agent = AgentProcess::start(dir.path(), &k);
    let sock = agent.vmm_sock.to_str().unwrap().to_owned();
    let (code, err) = bdvmm_tests::run_bdvmm(&[
        "agent",
        "--listen",
        "127.0.0.1:0",
        "--keys",
        k.to_str().unwrap(),
        "--vmm-sock",
        &sock,
    ]);
    assert_ne!(code, Some(0), "{err}");
    assert!(err.contains("in use by a live agent"), "{err}");
    // The first agent, probed by the second, still waits for its VMM.
    let mut vm = Vm::test_guest("bd_serve", 3, &["--name", "vm1", "--agent-sock", &sock]);
    vm.wait_line("bd-serve: ready", T);
    let mut c = connect(&agent.addr, Role::Read);
    assert_eq!(value(&mut c, 1), 12345, "{}", agent.stderr());
}

#[test]
fn the_separate_agent_keeps_serving_after_the_vmm_is_sigkilled() {
    let dir = tempfile::tempdir().unwrap();
    let k = keys::write_file(dir.path());
    let agent = AgentProcess::start(dir.path(), &k);
    let sock = agent.vmm_sock.to_str().unwrap().to_owned();
    let mut vm = Vm::test_guest("bd_serve", 3, &["--name", "vm1", "--agent-sock", &sock]);
    vm.wait_line("bd-serve: ready", T);
    let mut c = connect(&agent.addr, Role::Read);
    // The agent learns of the seal through the VMM link; wait for it.
    let deadline = std::time::Instant::now() + T;
    while !c.describe().unwrap().sealed || c.descriptor().hooks.len() < 3 {
        assert!(
            std::time::Instant::now() < deadline,
            "agent never saw the sealed table: {}",
            agent.stderr()
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    assert!(c.descriptor().vmm_alive);
    let before = records(&mut c);
    assert!(value(&mut c, 0) > 0);

    vm.signal(libc::SIGKILL);
    assert_eq!(vm.wait_exit(T), None, "killed by a signal");
    std::thread::sleep(Duration::from_millis(200));
    let frozen = value(&mut c, 0);
    std::thread::sleep(Duration::from_millis(100));
    assert_eq!(value(&mut c, 0), frozen, "nothing runs the guest any more");
    assert_eq!(
        value(&mut c, 1),
        12345,
        "the same bytes, served without the VMM"
    );
    assert_eq!(records(&mut c), before);
    assert!(
        !c.describe().unwrap().vmm_alive,
        "the agent says the VMM is gone"
    );
    // New monitors can still connect.
    let mut late = connect(&agent.addr, Role::Read);
    assert_eq!(value(&mut late, 1), 12345);
}

#[test]
fn several_monitors_at_once() {
    let s = serve(3);
    let threads: Vec<_> = (0..8)
        .map(|_| {
            let addr = s.addr.clone();
            std::thread::spawn(move || {
                let mut c = connect(&addr, Role::Read);
                let mut last = 0;
                for _ in 0..200 {
                    assert_eq!(value(&mut c, 1), 12345);
                    let v = value(&mut c, 0);
                    assert!(v >= last, "a counter went backwards");
                    last = v;
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
}

#[test]
fn only_the_forensic_role_sees_all_guest_ram_and_only_to_read_it() {
    let s = serve(3);
    let mut f = connect(&s.addr, Role::Forensic);
    let ram: Vec<_> = f
        .descriptor()
        .hooks
        .iter()
        .filter(|h| h.kind == "forensic")
        .cloned()
        .collect();
    assert_eq!(ram.len(), 1, "one RAM range: {:?}", f.descriptor());
    assert_eq!((ram[0].name.as_str(), ram[0].len), ("ram@0", 64 << 20));
    // It reads guest RAM anywhere: the progress box's counter 1 through
    // its own hook and through the forensic view agree.
    let progress_hook = hook(&f, "progress");
    assert!(f.descriptor().hooks.iter().any(|h| h.id == progress_hook));
    let b = f.read(ram[0].id, 0x0010_0000, 64).unwrap();
    assert_eq!(b.len(), 64);
    // Not to write.
    let err = f.write(ram[0].id, 0x0010_0000, &[0; 8]).unwrap_err();
    assert_eq!(err.code(), Some(ErrorCode::Forbidden), "{err}");
    // The read and repair roles neither see it nor reach it.
    for role in [Role::Read, Role::Repair] {
        let mut c = connect(&s.addr, role);
        assert!(!c.descriptor().hooks.iter().any(|h| h.kind == "forensic"));
        let err = c.read(ram[0].id, 0, 8).unwrap_err();
        assert_eq!(err.code(), Some(ErrorCode::NoHook), "{role:?}: {err}");
    }
}

#[test]
fn the_agents_report_where_the_vcpus_are() {
    // In bdvmm's process: a kick makes the report fresh.
    let s = serve(3);
    let mut c = connect(&s.addr, Role::Read);
    let v = c.vcpus().unwrap();
    let cpu = &v["vcpus"][0];
    assert_eq!(
        (cpu["fresh"].as_bool(), cpu["cpl"].as_u64()),
        (Some(true), Some(3)),
        "{v}"
    );
    assert!(cpu["rip"].as_u64().is_some_and(|r| r >= 0x20_0000), "{v}");
    // A separate agent: as of the last exits, pushed over the link.
    let dir = tempfile::tempdir().unwrap();
    let k = keys::write_file(dir.path());
    let agent = AgentProcess::start(dir.path(), &k);
    let sock = agent.vmm_sock.to_str().unwrap().to_owned();
    let mut vm = Vm::test_guest("bd_serve", 3, &["--name", "vm1", "--agent-sock", &sock]);
    vm.wait_line("bd-serve: ready", T);
    let mut c = connect(&agent.addr, Role::Read);
    let deadline = std::time::Instant::now() + T;
    let v = loop {
        match c.vcpus() {
            Ok(v) => break v,
            Err(e) => {
                assert!(std::time::Instant::now() < deadline, "{e}");
                std::thread::sleep(Duration::from_millis(50));
            }
        }
    };
    let cpu = &v["vcpus"][0];
    assert_eq!(
        (cpu["fresh"].as_bool(), cpu["cpl"].as_u64()),
        (Some(false), Some(3)),
        "{v}"
    );
    assert!(v["age_ms"].as_u64().is_some_and(|a| a < 60_000), "{v}");
}
