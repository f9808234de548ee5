//! The link between bdvmm and a separate agent process, over a Unix
//! socket: bdvmm sends the guest-RAM memfd (SCM_RIGHTS) with a JSON hello
//! naming the VM and its RAM ranges, then one JSON line per change of the
//! hook table. When bdvmm dies the link closes and the agent keeps serving
//! the last table from the memfd it holds: the backdoor outlives the VMM.

use std::fs::File;
use std::io::{BufRead, BufReader, IoSlice, IoSliceMut, Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use backdoor_dev::{BackdoorShared, Descriptor};
use nix::sys::socket::{recvmsg, sendmsg, ControlMessage, ControlMessageOwned, MsgFlags};
use serde::{Deserialize, Serialize};

use crate::descriptor::{PushedDescriptor, PushedVcpus, VcpuSource};
use crate::guest_mem::{GuestMemory, MapError, RamRange};

/// Longest hello or update line accepted from a VMM.
pub const MAX_LINE: usize = 64 << 10;

/// The first message: which VM, where its RAM is, its hooks now.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Hello {
    /// The VM's name (monitors authenticate against it).
    pub vm: String,
    /// RAM ranges inside the memfd.
    pub ranges: Vec<RamRange>,
    /// The hook table at connection time.
    pub descriptor: Descriptor,
}

/// Errors on the link.
#[derive(Debug, thiserror::Error)]
pub enum LinkError {
    /// Socket trouble.
    #[error("VMM link")]
    Io(#[from] std::io::Error),
    /// sendmsg/recvmsg trouble.
    #[error("VMM link")]
    Sys(#[from] nix::Error),
    /// The VMM sent something that is not the protocol.
    #[error("VMM link: bad message: {0}")]
    Bad(String),
    /// The memfd cannot be mapped.
    #[error(transparent)]
    Map(#[from] MapError),
    /// The agent listening there runs as another user: guest RAM is not
    /// handed to it.
    #[error("VMM link")]
    Peer(#[from] crate::peer::PeerError),
}

/// How often the VMM side checks that the agent is still there, and how
/// long it waits between attempts to reach a restarted one.
const LINK_CHECK: Duration = Duration::from_millis(200);

/// VMM side: sends the memfd and hello, then keeps the agent up to date
/// from `shared` on a thread of its own. If the agent goes away (killed,
/// restarted), the thread reconnects to `path` whenever an agent listens
/// there again and sends the memfd and the current table anew, so a
/// restarted agent serves the same guest without restarting the VM.
pub fn connect_and_publish(
    path: &Path,
    memfd: &File,
    hello: &Hello,
    shared: Arc<BackdoorShared>,
    vcpus: Option<Arc<dyn VcpuSource>>,
) -> Result<(), LinkError> {
    let stream = send_hello(path, memfd, hello)?;
    let memfd = memfd.try_clone()?;
    let path = path.to_owned();
    let hello = hello.clone();
    std::thread::Builder::new()
        .name("bd-agent-link".into())
        .spawn(move || {
            let mut stream = stream;
            loop {
                publish(&stream, &shared, vcpus.as_deref());
                tracing::warn!(
                    "agent link closed; waiting for an agent on {} to hand it guest RAM again",
                    path.display()
                );
                stream = loop {
                    std::thread::sleep(LINK_CHECK);
                    let now = Hello {
                        descriptor: shared.snapshot(),
                        ..hello.clone()
                    };
                    if let Ok(s) = send_hello(&path, &memfd, &now) {
                        tracing::warn!("agent link re-established on {}", path.display());
                        break s;
                    }
                };
            }
        })?;
    Ok(())
}

/// Connects to the agent at `path` and sends the hello line with the memfd.
fn send_hello(path: &Path, memfd: &File, hello: &Hello) -> Result<UnixStream, LinkError> {
    let stream = UnixStream::connect(path)?;
    crate::peer::check_same_user(&stream)?;
    let mut line = serde_json::to_vec(hello).map_err(|e| LinkError::Bad(e.to_string()))?;
    line.push(b'\n');
    let fds = [memfd.as_raw_fd()];
    let cmsg = [ControlMessage::ScmRights(&fds)];
    let mut sent = sendmsg::<()>(
        stream.as_raw_fd(),
        &[IoSlice::new(&line)],
        &cmsg,
        MsgFlags::empty(),
        None,
    )?;
    let mut w = &stream;
    while sent < line.len() {
        sent += w.write(&line[sent..])?;
    }
    Ok(stream)
}

/// Streams every change of the table to the agent until the link closes,
/// and, every [`LINK_CHECK`], a changed tamper count or where the vCPUs
/// were at their last exits.
fn publish(stream: &UnixStream, shared: &BackdoorShared, vcpus: Option<&dyn VcpuSource>) {
    let mut w = stream;
    let mut seen = u64::MAX;
    let mut tamper_sent = 0;
    loop {
        let (version, d) = shared.wait_change(seen, LINK_CHECK);
        // A tamper count is no table change (a guest can bump it at every
        // exit): it rides along at most once per LINK_CHECK.
        let mut line = if version != seen || d.tamper_count != tamper_sent {
            seen = version;
            tamper_sent = d.tamper_count;
            serde_json::to_vec(&d).unwrap_or_default()
        } else if peer_closed(stream) {
            // A sealed table never changes, so a dead agent would go
            // unnoticed by writes alone.
            return;
        } else if let Some(report) = vcpus.and_then(VcpuSource::vcpus) {
            serde_json::to_vec(&serde_json::json!({ VCPUS_KEY: report })).unwrap_or_default()
        } else {
            continue;
        };
        line.push(b'\n');
        if let Err(e) = w.write_all(&line) {
            tracing::debug!("agent link: {e}");
            return;
        }
    }
}

/// A link line that carries a vCPU report rather than a hook table.
const VCPUS_KEY: &str = "vcpus_report";

/// Whether the agent closed its end: it never writes on the link, so
/// anything readable is the end of the stream (or an error).
fn peer_closed(stream: &UnixStream) -> bool {
    let mut byte = [0u8; 1];
    match nix::sys::socket::recv(
        stream.as_raw_fd(),
        &mut byte,
        MsgFlags::MSG_PEEK | MsgFlags::MSG_DONTWAIT,
    ) {
        Ok(_) => true,
        Err(nix::errno::Errno::EAGAIN | nix::errno::Errno::EINTR) => false,
        Err(_) => true,
    }
}

/// What the agent gets from a VMM: its name, guest RAM, and a table and a
/// vCPU report that follow the VMM's updates.
pub type Accepted = (
    String,
    Arc<GuestMemory>,
    Arc<PushedDescriptor>,
    Arc<PushedVcpus>,
);

/// Agent side: waits for a VMM on `listener`, maps its memfd, and returns
/// what [`Accepted`] holds, following the VMM's updates (on a thread)
/// until the VMM goes away.
pub fn accept(listener: &UnixListener) -> Result<Accepted, LinkError> {
    // Whoever sends the memfd decides what monitors read as this guest's
    // memory: another user's process, or one that sends no valid hello in
    // time, is turned away, and the agent keeps waiting for its VMM (a
    // line for the 1st, 2nd, 4th, 8th... refusal: any local process can
    // connect).
    let mut refused = 0u64;
    loop {
        let (stream, _) = listener.accept()?;
        match admit_vmm(stream) {
            Ok(a) => return Ok(a),
            Err(e) => {
                refused += 1;
                if refused.is_power_of_two() {
                    tracing::warn!(
                        refused,
                        "agent: refusing a VMM link: {}",
                        backdoor_abi::ErrorChain(&e)
                    );
                }
            }
        }
    }
}

/// How long a VMM has to send its hello once connected.
const HELLO_TIMEOUT: Duration = Duration::from_secs(5);

/// Checks one connection to the VMM socket and takes its guest RAM.
fn admit_vmm(stream: UnixStream) -> Result<Accepted, LinkError> {
    let vmm_pid = crate::peer::check_same_user(&stream)?;
    stream.set_read_timeout(Some(HELLO_TIMEOUT))?;
    let (first, memfd) = recv_hello(&stream)?;
    check_seals(&memfd)?;
    // The first read may hold the hello and the start of an update: keep
    // whatever follows the hello's newline in front of the stream.
    let (mut line, rest) = match first.iter().position(|&b| b == b'\n') {
        Some(nl) => (first[..=nl].to_vec(), first[nl + 1..].to_vec()),
        None => (first, Vec::new()),
    };
    let handle = stream.try_clone()?;
    let mut reader = BufReader::new(std::io::Cursor::new(rest).chain(stream));
    if !line.ends_with(b"\n") {
        read_line(&mut reader, &mut line)?;
    }
    handle.set_read_timeout(None)?;
    let hello: Hello =
        serde_json::from_slice(&line).map_err(|e| LinkError::Bad(format!("hello: {e}")))?;
    if hello.vm.is_empty() || hello.vm.len() > crate::wire::MAX_NAME {
        return Err(LinkError::Bad(format!(
            "VM name {:?} must have 1 to {} bytes",
            hello.vm,
            crate::wire::MAX_NAME
        )));
    }
    let mem = Arc::new(GuestMemory::map(memfd, hello.ranges.clone())?);
    let table = Arc::new(PushedDescriptor::new(hello.descriptor.clone()));
    let follower = table.clone();
    let vcpus = Arc::new(PushedVcpus::of_pid(vmm_pid));
    let vcpu_follower = vcpus.clone();
    std::thread::Builder::new().name("bd-vmm-link".into()).spawn(move || {
        loop {
            let mut line = Vec::new();
            match read_line(&mut reader, &mut line) {
                Ok(0) => break,
                Ok(_) => match serde_json::from_slice::<serde_json::Value>(&line) {
                    Ok(mut v) if v.get(VCPUS_KEY).is_some() => vcpu_follower.update(v[VCPUS_KEY].take()),
                    Ok(v) => match serde_json::from_value::<Descriptor>(v) {
                        Ok(d) => follower.update(d),
                        Err(e) => tracing::warn!("VMM link: ignoring a bad update: {e}"),
                    },
                    Err(e) => tracing::warn!("VMM link: ignoring a bad update: {e}"),
                },
                Err(e) => {
                    tracing::warn!("VMM link: {}", backdoor_abi::ErrorChain(&e));
                    break;
                }
            }
        }
        tracing::warn!("the VMM is gone; serving its last hook table from the guest memory this agent holds");
        follower.vmm_gone();
        vcpu_follower.vmm_gone();
    })?;
    Ok((hello.vm, mem, table, vcpus))
}

/// Refuses a memfd that lacks F_SEAL_SHRINK: without it a process sharing
/// it could shrink it under the agent's mapping (which would SIGBUS the
/// agent).
fn check_seals(memfd: &File) -> Result<(), LinkError> {
    let seals = crate::guest_mem::seals(memfd)
        .map_err(|e| LinkError::Bad(format!("guest RAM is not a sealable memfd: {e}")))?;
    if !seals.contains(nix::fcntl::SealFlag::F_SEAL_SHRINK) {
        return Err(LinkError::Bad(format!(
            "guest RAM memfd has seals {:#x}, not F_SEAL_SHRINK: its owner could shrink it under this agent",
            seals.bits()
        )));
    }
    Ok(())
}

/// Reads one line of at most [`MAX_LINE`] bytes; 0 at end of stream.
fn read_line(r: &mut impl BufRead, out: &mut Vec<u8>) -> Result<usize, LinkError> {
    let n = r
        .by_ref()
        .take(MAX_LINE as u64 + 1)
        .read_until(b'\n', out)?;
    if out.len() > MAX_LINE {
        return Err(LinkError::Bad(format!("line longer than {MAX_LINE} bytes")));
    }
    Ok(n)
}

fn recv_hello(stream: &UnixStream) -> Result<(Vec<u8>, File), LinkError> {
    let mut buf = vec![0u8; MAX_LINE];
    let mut cmsg = nix::cmsg_space!([RawFd; 1]);
    let mut iov = [IoSliceMut::new(&mut buf)];
    let msg = recvmsg::<()>(
        stream.as_raw_fd(),
        &mut iov,
        Some(&mut cmsg),
        MsgFlags::MSG_CMSG_CLOEXEC,
    )?;
    let n = msg.bytes;
    let mut memfd = None;
    for c in msg.cmsgs()? {
        if let ControlMessageOwned::ScmRights(fds) = c {
            for fd in fds {
                if memfd.is_none() {
                    // SAFETY: the kernel just installed this fd for us; we own it.
                    memfd = Some(unsafe { File::from_raw_fd(fd) });
                } else {
                    // SAFETY: an extra fd we did not ask for: close it.
                    drop(unsafe { File::from_raw_fd(fd) });
                }
            }
        }
    }
    let memfd = memfd.ok_or_else(|| LinkError::Bad("the hello carried no memfd".into()))?;
    buf.truncate(n);
    Ok((buf, memfd))
}

#[cfg(test)]
mod tests {
    use backdoor_dev::GuestReader;

    use crate::descriptor::DescriptorSource;

    use super::*;

    struct NoRam;
    impl GuestReader for NoRam {
        fn read(&self, _: u64, _: &mut [u8]) -> bool {
            false
        }
    }

    /// A fresh directory for this test and the agent socket's path in it.
    fn socket_path(test: &str) -> (std::path::PathBuf, std::path::PathBuf) {
        let dir = std::env::temp_dir().join(format!("bd-link-{test}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("agent.sock");
        let _ = std::fs::remove_file(&path);
        (dir, path)
    }

    /// The hello of "vm1" with 1 MiB of RAM at 0 and `descriptor`.
    fn hello(descriptor: Descriptor) -> Hello {
        Hello {
            vm: "vm1".into(),
            ranges: vec![RamRange {
                guest_addr: 0,
                len: 1 << 20,
                file_offset: 0,
            }],
            descriptor,
        }
    }

    /// `accept` on `l`, failing the test if no VMM comes within 10 s.
    fn accept_within(l: &UnixListener) -> Accepted {
        let (tx, rx) = std::sync::mpsc::channel();
        let l = l.try_clone().unwrap();
        std::thread::spawn(move || {
            let _ = tx.send(accept(&l).map_err(|e| backdoor_abi::ErrorChain(&e).to_string()));
        });
        rx.recv_timeout(Duration::from_secs(10))
            .expect("the VMM never (re)connected")
            .expect("a good hello")
    }

    #[test]
    fn an_agent_turns_away_links_without_a_hello_or_a_sealed_memfd_and_waits_for_its_vmm() {
        let (dir, path) = socket_path("seal");
        let listener = UnixListener::bind(&path).unwrap();
        let hello = hello(BackdoorShared::new(1).snapshot());
        // A connection that says nothing, then a memfd its sender could
        // still shrink under the agent.
        drop(UnixStream::connect(&path).unwrap());
        let unsealed = File::from(
            nix::sys::memfd::memfd_create(
                c"unsealed",
                nix::sys::memfd::MemFdCreateFlag::MFD_CLOEXEC,
            )
            .unwrap(),
        );
        unsealed.set_len(1 << 20).unwrap();
        let bad = send_hello(&path, &unsealed, &hello).unwrap();
        let good = send_hello(
            &path,
            &crate::guest_mem::memfd(c"sealed", 1 << 20).unwrap(),
            &hello,
        )
        .unwrap();
        let (vm, mem, _, _) = accept_within(&listener);
        assert_eq!((vm.as_str(), mem.ranges().len()), ("vm1", 1));
        assert!(peer_closed(&bad), "the unsealed link was not closed");
        drop(good);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_restarted_agent_gets_the_memfd_and_the_current_table_again() {
        let (dir, path) = socket_path("restart");
        let memfd = crate::guest_mem::memfd(c"link-test", 1 << 20).unwrap();
        let shared = BackdoorShared::new(3);
        let hello = hello(shared.snapshot());
        let first = UnixListener::bind(&path).unwrap();
        connect_and_publish(&path, &memfd, &hello, shared.clone(), None).unwrap();
        // The first agent takes the hello and the memfd, writes to guest
        // RAM, and dies (its end of the link closes).
        let (stream, _) = first.accept().unwrap();
        let (line, fd) = recv_hello(&stream).unwrap();
        assert!(String::from_utf8_lossy(&line).contains("\"vm1\""));
        std::os::unix::fs::FileExt::write_all_at(&fd, b"kept", 0x1000).unwrap();
        drop((stream, fd, first));
        // Meanwhile the guest seals its table.
        let _ = std::fs::remove_file(&path);
        let mut dev =
            backdoor_dev::BackdoorDevice::new(shared.clone(), Box::new(NoRam), vec![(0, 1 << 20)]);
        dev.write(
            backdoor_abi::reg::COMMAND,
            &backdoor_abi::cmd::SEAL.to_le_bytes(),
        );
        assert!(shared.snapshot().sealed);

        // A new agent on the same path gets the same guest RAM and the current table.
        let second = UnixListener::bind(&path).unwrap();
        let (vm, mem, table, _) = accept_within(&second);
        assert_eq!(vm, "vm1");
        assert!(
            table.descriptor().sealed,
            "the current table, not the first one"
        );
        let mut b = [0u8; 4];
        assert!(mem.read(0x1000, &mut b));
        assert_eq!(&b, b"kept", "the same memfd");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
