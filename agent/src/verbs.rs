//! The RDMA verbs backend: the agent registers each hook's slice of guest
//! RAM as a memory region (MR) and gives an authenticated monitor an RC
//! queue pair (QP) toward it, so the monitor's RDMA READ / WRITE / ATOMIC
//! work requests are served by the NIC with no agent or guest CPU at all.
//!
//! Access is enforced twice, by the hardware:
//! - each hook's MR carries exactly the access its permissions allow
//!   (REMOTE_READ, plus REMOTE_WRITE / REMOTE_ATOMIC on a REPAIR hook that
//!   grants them), and covers exactly the hook's bytes;
//! - each monitor's QP carries the access its role allows (read role:
//!   REMOTE_READ only; repair role: + REMOTE_WRITE + REMOTE_ATOMIC), so a
//!   read-role monitor cannot write even with the rkey of a writable MR.
//!
//! The endpoint exchange and the libibverbs wrappers are shared with the
//! monitor's side: `backdoor_proto::verbs` (re-exported here).

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};

use backdoor_abi::{ErrorChain, HookKind, PERM_ATOMIC, PERM_READ, PERM_WRITE};
use backdoor_dev::Descriptor;
use ibverbs_sys as ffi;

pub use backdoor_proto::verbs::*;

use crate::access::Refusal;
use crate::guest_mem::GuestMemory;
use crate::server::VerbsService;
use crate::wire::{ErrorCode, Role};

/// Most QPs the agent keeps for monitors; the oldest is destroyed beyond it.
pub const MAX_QUEUE_PAIRS: usize = 64;

// ---------------------------------------------------------------------------
// The agent side.

/// Remote access a role's QP allows.
pub fn qp_access(role: Role) -> ffi::ibv_access_flags {
    use ffi::ibv_access_flags as A;
    match role {
        // The forensic view of all RAM is served over TCP only; over verbs
        // the forensic role reads what the read role reads.
        Role::Read | Role::Forensic => A::IBV_ACCESS_REMOTE_READ,
        Role::Repair => {
            A::IBV_ACCESS_REMOTE_READ | A::IBV_ACCESS_REMOTE_WRITE | A::IBV_ACCESS_REMOTE_ATOMIC
        }
    }
}

/// Access a hook's MR allows (REMOTE_WRITE / ATOMIC need LOCAL_WRITE too).
pub fn mr_access(kind: HookKind, perms: u32) -> ffi::ibv_access_flags {
    use ffi::ibv_access_flags as A;
    let mut a = A(0);
    if perms & PERM_READ != 0 {
        a |= A::IBV_ACCESS_REMOTE_READ;
    }
    if kind == HookKind::Repair {
        if perms & PERM_WRITE != 0 {
            a |= A::IBV_ACCESS_LOCAL_WRITE | A::IBV_ACCESS_REMOTE_WRITE;
        }
        if perms & PERM_ATOMIC != 0 {
            a |= A::IBV_ACCESS_LOCAL_WRITE | A::IBV_ACCESS_REMOTE_ATOMIC;
        }
    }
    a
}

/// The `PERM_*` bits `role` may use on a hook (the same rule as `access::authorize`).
pub fn role_perms(role: Role, kind: HookKind, perms: u32) -> u32 {
    if perms & PERM_READ == 0 {
        return 0;
    }
    match role {
        Role::Repair if kind == HookKind::Repair => perms & (PERM_READ | PERM_WRITE | PERM_ATOMIC),
        _ => PERM_READ,
    }
}

/// A hook as one connection's MR covers it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Covered {
    id: u32,
    gpa: u64,
    len: u64,
    perms: u32,
}

/// One monitor connection's verbs resources: its queue pair and MRs in a
/// protection domain of its own, so its rkeys work for no other
/// connection and none outlives the connection, its generation or its
/// hooks. Fields drop in order: the QP goes before the MRs it could
/// reach (each holds the PD, which goes last).
struct ConnVerbs {
    generation: u32,
    covered: Vec<Covered>,
    _qp: Qp,
    _mrs: Vec<Mr>,
}

/// A connection's verbs, which the backend can revoke (set to None).
type ConnSlot = Arc<Mutex<Option<ConnVerbs>>>;

/// Keeps a connection's verbs alive: the agent holds it for as long as
/// the monitor's TCP connection lasts, and dropping it destroys the queue
/// pair and deregisters the MRs.
pub struct ConnLease {
    _slot: ConnSlot,
}

impl std::fmt::Debug for ConnLease {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ConnLease").finish_non_exhaustive()
    }
}

#[derive(Default)]
struct State {
    /// Every connection's verbs, oldest first (entries of closed
    /// connections are dropped as they are found).
    conns: VecDeque<std::sync::Weak<Mutex<Option<ConnVerbs>>>>,
}

/// The agent's RDMA device: one CQ; per monitor connection a protection
/// domain of its own with its QP and MRs, so that no other connection's
/// queue pair can use its rkeys, even guessed or sniffed (ReDMArk).
pub struct VerbsBackend {
    mem: Arc<GuestMemory>,
    ctx: Arc<Ctx>,
    cq: Arc<Cq>,
    state: Mutex<State>,
}

impl std::fmt::Debug for VerbsBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VerbsBackend")
            .field("device", &self.ctx.name)
            .finish_non_exhaustive()
    }
}

impl VerbsBackend {
    /// Opens `device` (or the first RDMA device), with a PD and a CQ.
    pub fn open(mem: Arc<GuestMemory>, device: Option<&str>) -> Result<Self, VerbsError> {
        let ctx = open_context(device)?;
        let cq = Cq::new(&ctx, 16)?;
        tracing::info!(device = %ctx.name, lid = ctx.lid, gid = %gid_hex(&ctx.gid), "verbs backend ready");
        Ok(Self {
            mem,
            ctx,
            cq,
            state: Mutex::new(State::default()),
        })
    }

    /// The device's name.
    pub fn device(&self) -> &str {
        &self.ctx.name
    }

    /// How many monitor QPs are live.
    pub fn queue_pairs(&self) -> usize {
        let mut s = self.lock();
        s.conns
            .retain(|w| w.upgrade().is_some_and(|c| lock(&c).is_some()));
        s.conns.len()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Revokes every connection's QP and MRs that `desc` no longer
    /// covers: another generation (the guest rebooted), or a hook gone or
    /// changed. Called on every change of the table (agent_process.rs).
    pub fn refresh(&self, desc: &Descriptor) {
        let mut s = self.lock();
        let mut revoked = 0usize;
        s.conns.retain(|w| {
            let Some(c) = w.upgrade() else {
                return false;
            };
            let mut c = lock(&c);
            let stale = c.as_ref().is_some_and(|v| {
                v.generation != desc.generation
                    || !v.covered.iter().all(|k| {
                        desc.hooks.iter().any(|h| {
                            h.id == k.id && h.gpa == k.gpa && h.len == k.len && h.perms == k.perms
                        })
                    })
            });
            if stale {
                *c = None;
                revoked += 1;
            }
            c.is_some()
        });
        if revoked > 0 {
            tracing::info!(
                generation = desc.generation,
                revoked,
                "verbs: the hook table changed; revoked queue pairs and regions it no longer covers"
            );
        }
    }

    /// Registers a fresh MR in `pd` for each hook `role` may reach.
    fn register(&self, pd: &Arc<Pd>, role: Role, desc: &Descriptor) -> Result<Registered, Refusal> {
        let (mut regions, mut covered, mut mrs) = (Vec::new(), Vec::new(), Vec::new());
        for h in &desc.hooks {
            let perms = role_perms(role, h.kind, h.perms);
            if perms == 0 || h.len == 0 {
                continue;
            }
            let Some(host) = self.mem.host_ptr(h.gpa, h.len) else {
                tracing::warn!(
                    hook = h.id,
                    "verbs: hook {} lies outside guest RAM; not registering it",
                    h.name
                );
                continue;
            };
            let len = usize::try_from(h.len)
                .map_err(|_| (ErrorCode::Internal, format!("hook {} is too large", h.id)))?;
            // SAFETY: host_ptr checked [host, host + len) lies in the guest
            // RAM mapping, which the Guest backing keeps mapped.
            let mr = unsafe {
                Mr::register(
                    pd,
                    host,
                    len,
                    mr_access(h.kind, h.perms),
                    Backing::Owner(Box::new(self.mem.clone())),
                )
            }
            .map_err(|e| {
                (
                    ErrorCode::Internal,
                    format!("cannot register hook {}: {}", h.id, ErrorChain(&e)),
                )
            })?;
            regions.push(Region {
                hook: h.id,
                addr: mr.addr as u64,
                rkey: mr.rkey(),
                len: h.len,
                perms,
            });
            covered.push(Covered {
                id: h.id,
                gpa: h.gpa,
                len: h.len,
                perms: h.perms,
            });
            mrs.push(mr);
        }
        Ok((regions, covered, mrs))
    }
}

/// What [`VerbsBackend::register`] made: the regions to tell the monitor,
/// what they cover, and the MRs.
type Registered = (Vec<Region>, Vec<Covered>, Vec<Mr>);

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl VerbsService for VerbsBackend {
    fn connect(
        &self,
        role: Role,
        desc: &Descriptor,
        client_endpoint: &[u8],
    ) -> Result<(Vec<u8>, crate::server::VerbsLease), Refusal> {
        let (remote, remote_gid) = parse_endpoint(client_endpoint)
            .map_err(|e| (ErrorCode::BadRequest, ErrorChain(&e).to_string()))?;
        let internal = |e: VerbsError| (ErrorCode::Internal, ErrorChain(&e).to_string());
        let pd = Pd::new(&self.ctx).map_err(internal)?;
        let (regions, covered, mrs) = self.register(&pd, role, desc)?;
        let qp = Qp::new(&pd, &self.cq, 1).map_err(internal)?;
        let psn = random_psn();
        qp.connect(qp_access(role), psn, &remote, &remote_gid)
            .map_err(internal)?;
        let info = VerbsInfo {
            lid: self.ctx.lid,
            gid: gid_hex(&self.ctx.gid),
            qpn: qp.qpn(),
            psn,
            mtu: Some(self.ctx.mtu),
            generation: desc.generation,
            regions,
        };
        let json = serde_json::to_vec(&info).map_err(|e| (ErrorCode::Internal, e.to_string()))?;
        let slot: ConnSlot = Arc::new(Mutex::new(Some(ConnVerbs {
            generation: desc.generation,
            covered,
            _qp: qp,
            _mrs: mrs,
        })));
        let mut s = self.lock();
        s.conns
            .retain(|w| w.upgrade().is_some_and(|c| lock(&c).is_some()));
        if s.conns.len() >= MAX_QUEUE_PAIRS {
            tracing::info!("verbs: more than {MAX_QUEUE_PAIRS} queue pairs; revoking the oldest");
            if let Some(c) = s.conns.pop_front().and_then(|w| w.upgrade()) {
                *lock(&c) = None;
            }
        }
        s.conns.push_back(Arc::downgrade(&slot));
        tracing::info!(
            role = role.name(),
            qpn = info.qpn,
            remote_qpn = remote.qpn,
            "verbs: monitor queue pair connected"
        );
        Ok((json, Box::new(ConnLease { _slot: slot })))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn access_flags_follow_roles_and_hook_permissions() {
        use backdoor_abi::PERM_ALL;
        use ffi::ibv_access_flags as A;
        assert_eq!(qp_access(Role::Read).0, A::IBV_ACCESS_REMOTE_READ.0);
        assert_ne!(qp_access(Role::Repair).0 & A::IBV_ACCESS_REMOTE_WRITE.0, 0);
        assert_ne!(qp_access(Role::Repair).0 & A::IBV_ACCESS_REMOTE_ATOMIC.0, 0);
        assert_eq!(
            mr_access(HookKind::ProgressBox, PERM_READ).0,
            A::IBV_ACCESS_REMOTE_READ.0
        );
        assert_eq!(
            mr_access(HookKind::StateBox, PERM_ALL).0,
            A::IBV_ACCESS_REMOTE_READ.0,
            "only REPAIR hooks are writable"
        );
        let rw = mr_access(HookKind::Repair, PERM_ALL).0;
        assert_ne!(
            rw & A::IBV_ACCESS_LOCAL_WRITE.0,
            0,
            "remote write needs local write"
        );
        assert_eq!(
            mr_access(HookKind::Repair, PERM_READ | PERM_ATOMIC).0 & A::IBV_ACCESS_REMOTE_WRITE.0,
            0
        );
        assert_eq!(
            role_perms(Role::Read, HookKind::Repair, PERM_ALL),
            PERM_READ
        );
        assert_eq!(
            role_perms(Role::Repair, HookKind::Repair, PERM_ALL),
            PERM_ALL
        );
        assert_eq!(
            role_perms(Role::Repair, HookKind::ProgressBox, PERM_READ),
            PERM_READ
        );
        assert_eq!(
            role_perms(Role::Repair, HookKind::Repair, PERM_WRITE),
            0,
            "unreadable hooks are not listed"
        );
    }
}
