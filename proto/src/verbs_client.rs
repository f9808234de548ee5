//! The monitor side of the verbs backend: over an authenticated control
//! connection it sends its RC queue pair's endpoint (`VerbsConnect`),
//! receives the agent's endpoint and the regions its role may use
//! (`VerbsInfo`), connects, then posts real RDMA READ / WRITE / ATOMIC work
//! requests and polls for their completions. Every access is checked
//! against the region list before anything is posted; the agent's NIC
//! enforces the same bounds and permissions again.

use std::ptr;
use std::sync::atomic::{fence, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use backdoor_abi::{PERM_ATOMIC, PERM_WRITE};
use ibverbs_sys as ffi;

use crate::client::{Client, ClientError};
use crate::verbs::{
    gid_hex, open_context, parse_endpoint, random_psn, Cq, Ctx, Endpoint, Mr, Pd, Qp, Region,
    VerbsError, VerbsInfo,
};
use crate::wire::{Msg, MAX_READ};

/// Size of the local bounce buffer; longer transfers are split.
pub const LOCAL_BUFFER: usize = MAX_READ as usize;
/// Default bound on one work request's completion.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a client spins for a completion before it sleeps between polls.
const SPIN: Duration = Duration::from_millis(1);
/// Work requests posted as one chain (the send queue's depth): a batch of
/// small READs costs one completion per chain, not one per READ.
pub const CHAIN: usize = 32;

/// An RC queue pair connected to an agent, with the regions it may use.
pub struct VerbsClient {
    // Field order is drop order: the QP goes before the buffer it may use.
    qp: Qp,
    buf: Mr,
    cq: Arc<Cq>,
    _pd: Arc<Pd>,
    ctx: Arc<Ctx>,
    info: VerbsInfo,
    timeout: Duration,
    broken: bool,
    next_wr: u64,
}

impl std::fmt::Debug for VerbsClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VerbsClient")
            .field("device", &self.ctx.name)
            .field("qpn", &self.qp.qpn())
            .field("remote_qpn", &self.info.qpn)
            .field("generation", &self.info.generation)
            .field("broken", &self.broken)
            .finish_non_exhaustive()
    }
}

#[derive(Clone, Copy)]
enum Op {
    Read,
    Write,
    Cas { expected: u64, new: u64 },
    Faa { add: u64 },
}

impl Op {
    fn name(self) -> &'static str {
        match self {
            Self::Read => "READ",
            Self::Write => "WRITE",
            Self::Cas { .. } => "compare-and-swap",
            Self::Faa { .. } => "fetch-and-add",
        }
    }
}

impl VerbsClient {
    /// Sets up a QP on `device` (or the first RDMA device) and connects it
    /// to the agent behind `client`, which must be authenticated.
    pub fn connect(client: &mut Client, device: Option<&str>) -> Result<Self, VerbsError> {
        let ctx = open_context(device)?;
        let pd = Pd::new(&ctx)?;
        let cq = Cq::new(&ctx, i32::try_from(CHAIN).unwrap_or(i32::MAX))?;
        let qp = Qp::new(&pd, &cq, u32::try_from(CHAIN).unwrap_or(u32::MAX))?;
        let buf = Mr::local(&pd, LOCAL_BUFFER)?;
        let psn = random_psn();
        let mine = Endpoint {
            lid: ctx.lid,
            gid: gid_hex(&ctx.gid),
            qpn: qp.qpn(),
            psn,
            mtu: Some(ctx.mtu),
        };
        let json = serde_json::to_vec(&mine).map_err(|e| VerbsError::BadEndpoint(e.to_string()))?;
        let info: VerbsInfo = match client.raw(&Msg::VerbsConnect(json))? {
            Msg::VerbsInfo(reply) => serde_json::from_slice(&reply)
                .map_err(|e| VerbsError::BadEndpoint(format!("agent's VerbsInfo: {e}")))?,
            other => {
                return Err(
                    ClientError::Protocol(format!("expected VERBS_INFO, got {other:?}")).into(),
                )
            }
        };
        let endpoint = serde_json::to_vec(&info.endpoint())
            .map_err(|e| VerbsError::BadEndpoint(e.to_string()))?;
        let (remote, remote_gid) = parse_endpoint(&endpoint)?;
        // The monitor's own memory is not remotely accessible at all.
        qp.connect(ffi::ibv_access_flags(0), psn, &remote, &remote_gid)?;
        Ok(Self {
            qp,
            buf,
            cq,
            _pd: pd,
            ctx,
            info,
            timeout: DEFAULT_TIMEOUT,
            broken: false,
            next_wr: 1,
        })
    }

    /// Bounds how long one work request may take.
    pub fn with_timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// The agent's endpoint, generation and regions.
    pub fn info(&self) -> &VerbsInfo {
        &self.info
    }

    /// The region of `hook`, if this role may use it.
    pub fn region(&self, hook: u32) -> Option<&Region> {
        self.info.regions.iter().find(|r| r.hook == hook)
    }

    /// Whether an earlier failure left the QP unusable.
    pub fn is_broken(&self) -> bool {
        self.broken
    }

    /// Reads `len` bytes at `offset` of `hook` with RDMA READ.
    pub fn read(&mut self, hook: u32, offset: u64, len: usize) -> Result<Vec<u8>, VerbsError> {
        let region = self.check(hook, offset, len, 0)?;
        let mut out = vec![0u8; len];
        let mut done = 0;
        while done < len {
            let n = (len - done).min(LOCAL_BUFFER);
            self.transfer(Op::Read, &region, offset + to_u64(done), n)?;
            // SAFETY: the READ into buf[..n] completed; nothing else writes it now.
            unsafe { ptr::copy_nonoverlapping(self.buf.addr, out[done..].as_mut_ptr(), n) };
            done += n;
        }
        Ok(out)
    }

    /// Posts one RDMA READ of `len` bytes (at most one local buffer) at
    /// `offset` of `region` as given, another connection's address and
    /// rkey say, without checking it is one of this connection's: for
    /// showing that the agent's NIC refuses an rkey that is not this
    /// connection's (the QP is broken afterwards).
    pub fn read_foreign_region(
        &mut self,
        region: &Region,
        offset: u64,
        len: usize,
    ) -> Result<Vec<u8>, VerbsError> {
        if self.broken {
            return Err(VerbsError::Broken);
        }
        let n = len.min(LOCAL_BUFFER);
        self.transfer(Op::Read, region, offset, n)?;
        let mut out = vec![0u8; n];
        // SAFETY: the READ into buf[..n] completed; nothing else writes it now.
        unsafe { ptr::copy_nonoverlapping(self.buf.addr, out.as_mut_ptr(), n) };
        Ok(out)
    }

    /// Reads many `(hook, offset, len)` ranges: chains of up to [`CHAIN`]
    /// RDMA READs into the local buffer, only the last of each signaled.
    /// Every range is checked before anything is posted.
    pub fn read_batch(&mut self, reqs: &[(u32, u64, usize)]) -> Result<Vec<Vec<u8>>, VerbsError> {
        let regions = reqs
            .iter()
            .map(|&(hook, offset, len)| self.check(hook, offset, len, 0))
            .collect::<Result<Vec<_>, _>>()?;
        let mut out = Vec::with_capacity(reqs.len());
        let mut i = 0;
        while i < reqs.len() {
            let (mut end, mut used) = (i, 0);
            while end < reqs.len() && end - i < CHAIN && used + reqs[end].2 <= LOCAL_BUFFER {
                used += reqs[end].2;
                end += 1;
            }
            if end == i {
                // Longer than the buffer: a read of its own, in pieces.
                let (hook, offset, len) = reqs[i];
                out.push(self.read(hook, offset, len)?);
                i += 1;
                continue;
            }
            self.read_chain(&regions[i..end], &reqs[i..end])?;
            let mut at = 0;
            for &(_, _, len) in &reqs[i..end] {
                let mut v = vec![0u8; len];
                // SAFETY: the chain's READs into buf[..used] completed (its
                // last, signaled one completes after all before it on an RC
                // QP); nothing else writes the buffer now.
                unsafe { ptr::copy_nonoverlapping(self.buf.addr.add(at), v.as_mut_ptr(), len) };
                out.push(v);
                at += len;
            }
            i = end;
        }
        Ok(out)
    }

    /// Posts one chain of READs, back to back in the local buffer, and
    /// waits for its last (the only signaled) completion.
    fn read_chain(
        &mut self,
        regions: &[Region],
        reqs: &[(u32, u64, usize)],
    ) -> Result<(), VerbsError> {
        let mut sges = Vec::with_capacity(reqs.len());
        let mut at = 0usize;
        for &(_, _, len) in reqs {
            sges.push(ffi::ibv_sge {
                addr: self.buf.addr as u64 + to_u64(at),
                length: u32::try_from(len).map_err(|_| VerbsError::Empty)?,
                lkey: self.buf.lkey(),
            });
            at += len;
        }
        let mut wrs: Vec<ffi::ibv_send_wr> = Vec::with_capacity(reqs.len());
        for (k, (region, &(_, offset, _))) in regions.iter().zip(reqs).enumerate() {
            let mut wr = ffi::ibv_send_wr {
                wr_id: self.next_wr,
                num_sge: 1,
                opcode: ffi::ibv_wr_opcode::IBV_WR_RDMA_READ,
                send_flags: if k + 1 == reqs.len() {
                    ffi::ibv_send_flags::IBV_SEND_SIGNALED.0
                } else {
                    0
                },
                ..Default::default()
            };
            wr.wr.rdma = ffi::ibv_send_wr__bindgen_ty_2__bindgen_ty_1 {
                remote_addr: region.addr + offset,
                rkey: region.rkey,
            };
            self.next_wr = self.next_wr.wrapping_add(1);
            wrs.push(wr);
        }
        // Link the list now that neither vector moves any more.
        for k in 0..wrs.len() {
            wrs[k].sg_list = &mut sges[k];
            if k + 1 < wrs.len() {
                let next: *mut ffi::ibv_send_wr = &mut wrs[k + 1];
                wrs[k].next = next;
            }
        }
        let last = wrs.last().map_or(0, |w| w.wr_id);
        // SAFETY: every scatter entry names a distinct part of our live
        // local MR, untouched until the chain's last completion is polled
        // (on a timeout the client is marked broken and never reuses it).
        if let Err(e) = unsafe { self.qp.post(&mut wrs[0]) } {
            self.broken = true;
            return Err(e);
        }
        self.wait(last, "READ")
    }

    /// Writes `data` at `offset` of a REPAIR hook with RDMA WRITE.
    pub fn write(&mut self, hook: u32, offset: u64, data: &[u8]) -> Result<(), VerbsError> {
        let region = self.check(hook, offset, data.len(), PERM_WRITE)?;
        self.write_region(&region, offset, data)
    }

    /// Posts an RDMA WRITE after checking only the bounds, not this role's
    /// permissions: for showing that the agent's NIC refuses it (a read-role
    /// QP gets a remote access error, and the QP is broken afterwards).
    pub fn write_unchecked_perms(
        &mut self,
        hook: u32,
        offset: u64,
        data: &[u8],
    ) -> Result<(), VerbsError> {
        let region = self.check(hook, offset, data.len(), 0)?;
        self.write_region(&region, offset, data)
    }

    fn write_region(
        &mut self,
        region: &Region,
        offset: u64,
        data: &[u8],
    ) -> Result<(), VerbsError> {
        let mut done = 0;
        while done < data.len() {
            let n = (data.len() - done).min(LOCAL_BUFFER);
            // SAFETY: no work request is outstanding, so the buffer is ours.
            unsafe { ptr::copy_nonoverlapping(data[done..].as_ptr(), self.buf.addr, n) };
            self.transfer(Op::Write, region, offset + to_u64(done), n)?;
            done += n;
        }
        Ok(())
    }

    /// Compare-and-swap of the aligned word at `offset`; returns its previous value.
    pub fn cas(
        &mut self,
        hook: u32,
        offset: u64,
        expected: u64,
        new: u64,
    ) -> Result<u64, VerbsError> {
        self.atomic(hook, offset, Op::Cas { expected, new })
    }

    /// Fetch-and-add of the aligned word at `offset`; returns its previous value.
    pub fn faa(&mut self, hook: u32, offset: u64, add: u64) -> Result<u64, VerbsError> {
        self.atomic(hook, offset, Op::Faa { add })
    }

    fn atomic(&mut self, hook: u32, offset: u64, op: Op) -> Result<u64, VerbsError> {
        let region = self.check(hook, offset, 8, PERM_ATOMIC)?;
        if region.addr.checked_add(offset).is_none_or(|a| a % 8 != 0) {
            return Err(VerbsError::Unaligned(offset));
        }
        self.transfer(op, &region, offset, 8)?;
        // SAFETY: the atomic's result landed in buf[..8] (8-aligned) and completed.
        Ok(unsafe { ptr::read(self.buf.addr.cast::<u64>()) })
    }

    /// The region, after checking bounds and (when `need` is set) the role's permissions.
    fn check(&self, hook: u32, offset: u64, len: usize, need: u32) -> Result<Region, VerbsError> {
        if self.broken {
            return Err(VerbsError::Broken);
        }
        let r = *self.region(hook).ok_or(VerbsError::NoRegion(hook))?;
        if need != 0 && r.perms & need != need {
            return Err(VerbsError::Forbidden {
                hook,
                op: if need == PERM_WRITE {
                    "writes"
                } else {
                    "atomics"
                },
            });
        }
        if len == 0 {
            return Err(VerbsError::Empty);
        }
        let len = to_u64(len);
        match offset.checked_add(len) {
            Some(end) if end <= r.len && r.addr.checked_add(end).is_some() => Ok(r),
            _ => Err(VerbsError::OutOfBounds {
                hook,
                offset,
                len,
                size: r.len,
            }),
        }
    }

    /// Posts one work request on buf[..n] and waits for its completion.
    fn transfer(
        &mut self,
        op: Op,
        region: &Region,
        offset: u64,
        n: usize,
    ) -> Result<(), VerbsError> {
        let length = u32::try_from(n).map_err(|_| VerbsError::OutOfBounds {
            hook: region.hook,
            offset,
            len: to_u64(n),
            size: region.len,
        })?;
        let mut sge = ffi::ibv_sge {
            addr: self.buf.addr as u64,
            length,
            lkey: self.buf.lkey(),
        };
        let wr_id = self.next_wr;
        self.next_wr = self.next_wr.wrapping_add(1);
        let remote_addr = region.addr + offset;
        let mut wr = ffi::ibv_send_wr {
            wr_id,
            sg_list: &mut sge,
            num_sge: 1,
            send_flags: ffi::ibv_send_flags::IBV_SEND_SIGNALED.0,
            ..Default::default()
        };
        match op {
            Op::Read | Op::Write => {
                wr.opcode = if matches!(op, Op::Read) {
                    ffi::ibv_wr_opcode::IBV_WR_RDMA_READ
                } else {
                    ffi::ibv_wr_opcode::IBV_WR_RDMA_WRITE
                };
                wr.wr.rdma = ffi::ibv_send_wr__bindgen_ty_2__bindgen_ty_1 {
                    remote_addr,
                    rkey: region.rkey,
                };
            }
            Op::Cas { expected, new } => {
                wr.opcode = ffi::ibv_wr_opcode::IBV_WR_ATOMIC_CMP_AND_SWP;
                wr.wr.atomic = ffi::ibv_send_wr__bindgen_ty_2__bindgen_ty_2 {
                    remote_addr,
                    compare_add: expected,
                    swap: new,
                    rkey: region.rkey,
                };
            }
            Op::Faa { add } => {
                wr.opcode = ffi::ibv_wr_opcode::IBV_WR_ATOMIC_FETCH_AND_ADD;
                wr.wr.atomic = ffi::ibv_send_wr__bindgen_ty_2__bindgen_ty_2 {
                    remote_addr,
                    compare_add: add,
                    swap: 0,
                    rkey: region.rkey,
                };
            }
        }
        // The buffer's contents (for a WRITE) must be visible to the NIC.
        fence(Ordering::Release);
        // SAFETY: the scatter entry names buf[..n] of our live local MR, and
        // nothing touches the buffer until the completion is polled below
        // (on a timeout the client is marked broken and never reuses it).
        if let Err(e) = unsafe { self.qp.post(&mut wr) } {
            self.broken = true;
            return Err(e);
        }
        self.wait(wr_id, op.name())
    }

    fn wait(&mut self, wr_id: u64, op: &'static str) -> Result<(), VerbsError> {
        let start = Instant::now();
        loop {
            match self.cq.poll_one() {
                Err(e) => {
                    self.broken = true;
                    return Err(e);
                }
                Ok(Some(wc)) if wc.wr_id() == wr_id => {
                    fence(Ordering::Acquire);
                    return match wc.error() {
                        None => Ok(()),
                        Some((code, vendor_err)) => {
                            self.broken = true;
                            Err(VerbsError::Completion {
                                op,
                                status: status_str(code),
                                code,
                                vendor_err,
                            })
                        }
                    };
                }
                Ok(Some(stale)) => {
                    tracing::debug!(wr_id = stale.wr_id(), "verbs: ignoring a stale completion")
                }
                Ok(None) => {
                    let waited = start.elapsed();
                    if waited > self.timeout {
                        self.broken = true;
                        return Err(VerbsError::Timeout(op));
                    }
                    // A completion takes microseconds on a NIC: spin (by
                    // time, not by count, so a slow machine spins as long),
                    // and only then yield the CPU.
                    if waited < SPIN {
                        std::hint::spin_loop();
                    } else {
                        std::thread::sleep(Duration::from_micros(20));
                    }
                }
            }
        }
    }
}

fn status_str(code: u32) -> String {
    // SAFETY: returns a static string for any status value.
    let p = unsafe { ffi::ibv_wc_status_str(code) };
    if p.is_null() {
        return format!("status {code}");
    }
    // SAFETY: a static NUL-terminated string.
    unsafe { std::ffi::CStr::from_ptr(p) }
        .to_string_lossy()
        .into_owned()
}

fn to_u64(n: usize) -> u64 {
    u64::try_from(n).unwrap_or(u64::MAX)
}
