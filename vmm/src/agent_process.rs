//! `bdvmm agent`: the backdoor agent as a process of its own. It receives
//! a VMM's guest-RAM memfd over a Unix socket and serves the guest's hooks
//! to monitors, during and after the VMM's life.

use std::net::TcpListener;
use std::os::unix::net::UnixListener;
use std::sync::Arc;

use backdoor_agent::auth::{KeyFile, Keys};
use backdoor_agent::{vmm_link, Agent, DescriptorSource};

use crate::cli::AgentArgs;

/// Why `bdvmm agent` could not serve.
#[derive(Debug, thiserror::Error)]
pub enum AgentProcessError {
    /// The key file cannot be used.
    #[error(transparent)]
    Keys(#[from] backdoor_agent::auth::KeyError),
    /// A socket could not be set up.
    #[error("cannot listen on {what}")]
    Listen {
        /// The address or path.
        what: String,
        /// Why.
        source: std::io::Error,
    },
    /// Another agent is serving on that socket.
    #[error("{0} is in use by a live agent")]
    InUse(String),
    /// The VMM's link failed.
    #[error(transparent)]
    Link(#[from] vmm_link::LinkError),
}

fn listen(what: impl std::fmt::Display) -> impl FnOnce(std::io::Error) -> AgentProcessError {
    let what = what.to_string();
    move |source| AgentProcessError::Listen { what, source }
}

/// Runs the agent until the process is killed.
pub fn run(args: &AgentArgs) -> Result<(), AgentProcessError> {
    let key_file = KeyFile::load(&args.keys)?;
    let tcp = TcpListener::bind(&args.listen).map_err(listen(&args.listen))?;
    let addr = tcp.local_addr().map_err(listen(&args.listen))?;
    if args.vmm_sock.exists() {
        // A live agent answers there: leave it alone (removing its path
        // would orphan it). Only a stale socket of a dead one is replaced.
        if std::os::unix::net::UnixStream::connect(&args.vmm_sock).is_ok() {
            return Err(AgentProcessError::InUse(
                args.vmm_sock.display().to_string(),
            ));
        }
        let _ = std::fs::remove_file(&args.vmm_sock);
    }
    let unix = UnixListener::bind(&args.vmm_sock).map_err(listen(args.vmm_sock.display()))?;
    eprintln!(
        "bdvmm agent: monitors connect to {addr}; waiting for a VMM on {}",
        args.vmm_sock.display()
    );
    let (vm, mem, table, vcpus) = vmm_link::accept(&unix)?;
    eprintln!("bdvmm agent: serving the backdoor of {vm}");
    let source: Arc<dyn DescriptorSource> = table;
    let agent = Agent::new(
        vm,
        Keys::clone(&key_file.current()),
        mem.clone(),
        source.clone(),
    )
    .with_key_file(key_file)
    .with_busy_poll(std::time::Duration::from_micros(args.busy_poll_us))
    .with_vcpus(vcpus);
    let agent = Arc::new(with_verbs(agent, mem, &source));
    let handle = agent.serve(tcp).map_err(listen(addr))?;
    let _ = handle.join();
    Ok(())
}

/// Adds the RDMA verbs backend when bdvmm was built with it and a device
/// exists; otherwise says why the soft backend serves alone.
pub fn with_verbs(
    agent: Agent,
    mem: Arc<backdoor_agent::GuestMemory>,
    source: &Arc<dyn DescriptorSource>,
) -> Agent {
    #[cfg(feature = "verbs")]
    {
        match backdoor_agent::verbs::VerbsBackend::open(mem, None) {
            Ok(v) => {
                let v = Arc::new(v);
                revoke_on_reboot(v.clone(), source.clone());
                return agent.with_verbs(v);
            }
            Err(e) => eprintln!(
                "bdvmm: RDMA verbs backend unavailable ({}); serving the soft backend only",
                backdoor_abi::ErrorChain(&e)
            ),
        }
    }
    #[cfg(not(feature = "verbs"))]
    let _ = (mem, source);
    agent
}

/// How long the revoker waits for a change before it looks again anyway.
#[cfg(feature = "verbs")]
const REVOKE_WAIT: std::time::Duration = std::time::Duration::from_secs(1);

/// A NIC serves registered regions without asking the agent, so a
/// rebooted guest's old rkeys would keep reading pages that now hold
/// something else, and an unregistered hook's would keep reading it: at
/// every change of the table (woken by it, not polling), revoke the queue
/// pairs and MRs it no longer covers.
#[cfg(feature = "verbs")]
fn revoke_on_reboot(
    verbs: Arc<backdoor_agent::verbs::VerbsBackend>,
    source: Arc<dyn DescriptorSource>,
) {
    let spawned = std::thread::Builder::new()
        .name("bd-verbs-revoke".into())
        .spawn(move || {
            let mut seen = source.descriptor();
            loop {
                let d = source.wait_change(&seen, REVOKE_WAIT);
                if !Arc::ptr_eq(&d, &seen) {
                    verbs.refresh(&d);
                    seen = d;
                }
            }
        });
    if let Err(e) = spawned {
        eprintln!("bdvmm: cannot watch for guest resets ({e}); old RDMA regions live until the next connect");
    }
}
