//! What both ends of the RDMA verbs data path share: the endpoint and
//! region exchange (JSON over the encrypted control channel), the errors,
//! and small owning wrappers around libibverbs objects. The agent's
//! backend (`backdoor_agent::verbs`) and the monitor's queue pair
//! (`verbs_client.rs`) are built from these.
//!
//! The backend registers each hook's slice of guest RAM as a memory
//! region (MR) and gives an authenticated monitor an RC queue pair (QP)
//! toward it, so the monitor's RDMA READ / WRITE / ATOMIC work requests
//! are served by the NIC with no agent or guest CPU at all.
//!
//! Access is enforced twice, by the hardware:
//! - each hook's MR carries exactly the access its permissions allow
//!   (REMOTE_READ, plus REMOTE_WRITE / REMOTE_ATOMIC on a REPAIR hook that
//!   grants them), and covers exactly the hook's bytes;
//! - each monitor's QP carries the access its role allows (read role:
//!   REMOTE_READ only; repair role: + REMOTE_WRITE + REMOTE_ATOMIC), so a
//!   read-role monitor cannot write even with the rkey of a writable MR.
//!
//! Endpoints (LID, GID, QP number, PSN) are exchanged as JSON over the
//! authenticated control channel (`VerbsConnect` → `VerbsInfo`). MRs are
//! cached per hook and generation; a new generation (the guest rebooted)
//! deregisters every older MR and destroys the QPs handed out for it, so
//! stale rkeys stop working.
//!
//! The `ibverbs` crate cannot register memory it did not allocate, post
//! one-sided work requests, or expose its raw handles, so this module drives
//! libibverbs through `ibverbs-sys` behind small owning wrappers; every
//! raw call of the project's verbs code is here or in the two modules
//! built from it.

use std::ffi::{c_void, CStr};
use std::io;
use std::ptr::{self, NonNull};
use std::sync::Arc;

use ibverbs_sys as ffi;
use serde::{Deserialize, Serialize};

/// The port every QP uses.
pub const PORT_NUM: u8 = 1;
/// Outstanding RDMA READ / ATOMIC requests we ask for (clamped to the device).
const RD_ATOMIC: u8 = 16;

/// Errors of the verbs backend (agent and monitor side).
#[derive(Debug, thiserror::Error)]
pub enum VerbsError {
    /// The kernel has no RDMA subsystem (`ibv_get_device_list` failed with ENOSYS).
    #[error("this kernel has no RDMA subsystem (no /sys/class/infiniband): {0}")]
    NoSubsystem(io::Error),
    /// The device list could not be read for another reason.
    #[error("cannot list RDMA devices: {0}")]
    DeviceList(io::Error),
    /// No RDMA device at all.
    #[error("no RDMA devices; set up Soft-RoCE (docs/rdma.md)")]
    NoDevice,
    /// The requested device does not exist.
    #[error("no RDMA device named {wanted:?} (have: {have})")]
    DeviceNotFound {
        /// Asked for.
        wanted: String,
        /// What exists.
        have: String,
    },
    /// Port 1 of the device is not usable.
    #[error("port {PORT_NUM} of {device} is not active (state {state})")]
    PortDown {
        /// Device name.
        device: String,
        /// `ibv_port_state`.
        state: u32,
    },
    /// A verb failed.
    #[error("{call} failed")]
    Verb {
        /// The libibverbs call.
        call: &'static str,
        /// errno.
        source: io::Error,
    },
    /// The peer's endpoint JSON is malformed.
    #[error("bad verbs endpoint: {0}")]
    BadEndpoint(String),
    /// The soft control channel failed or the agent refused.
    #[error(transparent)]
    Client(#[from] crate::client::ClientError),
    /// The agent lists no region for this hook (no such hook, or not readable).
    #[error("no RDMA region for hook {0}")]
    NoRegion(u32),
    /// The access lies outside the hook's region; nothing was posted.
    #[error("{offset}+{len} is outside hook {hook} ({size} bytes); nothing was posted")]
    OutOfBounds {
        /// Hook id.
        hook: u32,
        /// Offset asked for.
        offset: u64,
        /// Bytes asked for.
        len: u64,
        /// The region's size.
        size: u64,
    },
    /// The region does not allow this operation for this monitor's role; nothing was posted.
    #[error("hook {hook} does not allow {op} for this role; nothing was posted")]
    Forbidden {
        /// Hook id.
        hook: u32,
        /// `write` or `atomics`.
        op: &'static str,
    },
    /// Atomics need 8-byte aligned remote addresses.
    #[error("atomic at offset {0} is not 8-byte aligned")]
    Unaligned(u64),
    /// Zero-length access.
    #[error("zero-length access")]
    Empty,
    /// A work request completed with an error (the QP is now in the error state).
    #[error("RDMA {op} failed: {status} (status {code}, vendor error {vendor_err:#x})")]
    Completion {
        /// What was posted.
        op: &'static str,
        /// `ibv_wc_status_str`.
        status: String,
        /// `ibv_wc_status`.
        code: u32,
        /// Vendor syndrome.
        vendor_err: u32,
    },
    /// No completion arrived in time (the QP is abandoned).
    #[error("RDMA {0} did not complete in time")]
    Timeout(&'static str),
    /// An earlier error or timeout left the QP unusable; connect again.
    #[error("the RDMA queue pair is in the error state after an earlier failure; connect again")]
    Broken,
}

impl VerbsError {
    /// The status of a failed completion, if that is what this is.
    pub fn completion_status(&self) -> Option<u32> {
        match self {
            Self::Completion { code, .. } => Some(*code),
            _ => None,
        }
    }

    /// Whether the remote side refused the access (remote access error).
    pub fn is_remote_access_error(&self) -> bool {
        self.completion_status() == Some(ffi::ibv_wc_status::IBV_WC_REM_ACCESS_ERR)
    }

    /// Whether the remote NIC refused the request: a remote access error,
    /// or an invalid request (what Soft-RoCE reports when the responder's QP
    /// itself lacks the access, e.g. a WRITE on a read-only QP).
    pub fn is_remote_refusal(&self) -> bool {
        self.is_remote_access_error()
            || self.completion_status() == Some(ffi::ibv_wc_status::IBV_WC_REM_INV_REQ_ERR)
    }
}

fn verb_err(call: &'static str, errno: i32) -> VerbsError {
    VerbsError::Verb {
        call,
        source: if errno > 0 {
            io::Error::from_raw_os_error(errno)
        } else {
            io::Error::last_os_error()
        },
    }
}

fn last_err(call: &'static str) -> VerbsError {
    VerbsError::Verb {
        call,
        source: io::Error::last_os_error(),
    }
}

/// One side's endpoint, as JSON on the control channel.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Endpoint {
    /// Port LID (0 on RoCE).
    pub lid: u16,
    /// GID, 32 hex digits.
    pub gid: String,
    /// QP number (24 bits).
    pub qpn: u32,
    /// Initial packet sequence number (24 bits).
    pub psn: u32,
    /// Active path MTU (`ibv_mtu`); the smaller of both sides is used.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mtu: Option<u32>,
}

/// One hook's memory region as a monitor sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Region {
    /// Hook id.
    pub hook: u32,
    /// Remote address of the hook's first byte.
    pub addr: u64,
    /// Remote key.
    pub rkey: u32,
    /// Bytes.
    pub len: u64,
    /// `PERM_*` bits this monitor's role may use on it.
    pub perms: u32,
}

/// The agent's reply to `VerbsConnect`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VerbsInfo {
    /// Port LID (0 on RoCE).
    pub lid: u16,
    /// GID, 32 hex digits.
    pub gid: String,
    /// The agent's QP number.
    pub qpn: u32,
    /// The agent's initial PSN.
    pub psn: u32,
    /// The agent's path MTU.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mtu: Option<u32>,
    /// The generation these regions belong to.
    pub generation: u32,
    /// The hooks this role may use.
    pub regions: Vec<Region>,
}

impl VerbsInfo {
    /// The endpoint part.
    pub fn endpoint(&self) -> Endpoint {
        Endpoint {
            lid: self.lid,
            gid: self.gid.clone(),
            qpn: self.qpn,
            psn: self.psn,
            mtu: self.mtu,
        }
    }
}

/// Parses and checks a peer's endpoint.
pub fn parse_endpoint(json: &[u8]) -> Result<(Endpoint, [u8; 16]), VerbsError> {
    let e: Endpoint =
        serde_json::from_slice(json).map_err(|e| VerbsError::BadEndpoint(e.to_string()))?;
    let gid = gid_from_hex(&e.gid)
        .ok_or_else(|| VerbsError::BadEndpoint(format!("gid {:?} is not 32 hex digits", e.gid)))?;
    if e.qpn == 0 || e.qpn > 0x00ff_ffff {
        return Err(VerbsError::BadEndpoint(format!(
            "qpn {} is not a 24-bit QP number",
            e.qpn
        )));
    }
    if e.psn > 0x00ff_ffff {
        return Err(VerbsError::BadEndpoint(format!(
            "psn {} is not 24 bits",
            e.psn
        )));
    }
    if e.mtu.is_some_and(|m| !(1..=5).contains(&m)) {
        return Err(VerbsError::BadEndpoint(format!(
            "mtu {:?} is not an ibv_mtu",
            e.mtu
        )));
    }
    if e.lid == 0 && gid == [0; 16] {
        return Err(VerbsError::BadEndpoint("neither a LID nor a GID".into()));
    }
    Ok((e, gid))
}

/// 32 hex digits.
pub fn gid_hex(gid: &[u8; 16]) -> String {
    hex::encode(gid)
}

fn gid_from_hex(s: &str) -> Option<[u8; 16]> {
    crate::auth::decode_hex(s)?.try_into().ok()
}

/// A fresh 24-bit packet sequence number.
pub fn random_psn() -> u32 {
    let mut n = [0u8; 3];
    // Any PSN is correct; a random one only makes stale packets of an
    // earlier queue pair less likely to fit, so no entropy is no error.
    let _ = getrandom::fill(&mut n);
    u32::from_le_bytes([n[0], n[1], n[2], 0])
}

// ---------------------------------------------------------------------------
// Owning wrappers around libibverbs objects. Drop order is enforced with
// Arcs: a QP keeps its PD and CQ alive, an MR its PD and its memory, and
// every object its device context.

/// An open device context with what we need of port 1.
pub struct Ctx {
    ptr: NonNull<ffi::ibv_context>,
    pub name: String,
    pub lid: u16,
    pub mtu: u32,
    pub gid: [u8; 16],
    pub gid_index: u8,
    pub max_rd_atomic: u8,
    pub max_dest_rd_atomic: u8,
}

// SAFETY: libibverbs contexts may be used from any thread (the library
// locks internally); we only hand out the pointer to verbs.
unsafe impl Send for Ctx {}
// SAFETY: as above.
unsafe impl Sync for Ctx {}

impl std::fmt::Debug for Ctx {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ctx")
            .field("name", &self.name)
            .field("lid", &self.lid)
            .field("gid_index", &self.gid_index)
            .finish_non_exhaustive()
    }
}

impl Drop for Ctx {
    fn drop(&mut self) {
        // SAFETY: opened by ibv_open_device; every child object holds an Arc
        // to this context, so none is left when this runs.
        let rc = unsafe { ffi::ibv_close_device(self.ptr.as_ptr()) };
        if rc != 0 {
            tracing::warn!(device = %self.name, "ibv_close_device failed: {}", io::Error::last_os_error());
        }
    }
}

/// Names of the RDMA devices present.
pub fn device_names() -> Result<Vec<String>, VerbsError> {
    let list = DeviceList::get()?;
    Ok(list.devices().iter().map(|&d| device_name(d)).collect())
}

struct DeviceList {
    ptr: NonNull<*mut ffi::ibv_device>,
    len: usize,
}

impl DeviceList {
    fn get() -> Result<Self, VerbsError> {
        let mut n: i32 = 0;
        // SAFETY: n is a valid out-pointer; the list is freed in Drop.
        let p = unsafe { ffi::ibv_get_device_list(&mut n) };
        let Some(ptr) = NonNull::new(p) else {
            let e = io::Error::last_os_error();
            return Err(if e.raw_os_error() == Some(libc::ENOSYS) {
                VerbsError::NoSubsystem(e)
            } else {
                VerbsError::DeviceList(e)
            });
        };
        Ok(Self {
            ptr,
            len: usize::try_from(n).unwrap_or(0),
        })
    }

    fn devices(&self) -> &[*mut ffi::ibv_device] {
        // SAFETY: ibv_get_device_list returned an array of `len` device pointers.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
    }
}

impl Drop for DeviceList {
    fn drop(&mut self) {
        // SAFETY: returned by ibv_get_device_list and freed once; opened
        // contexts stay valid after the list is freed.
        unsafe { ffi::ibv_free_device_list(self.ptr.as_ptr()) };
    }
}

fn device_name(d: *mut ffi::ibv_device) -> String {
    // SAFETY: d comes from a live device list.
    let p = unsafe { ffi::ibv_get_device_name(d) };
    if p.is_null() {
        return "?".into();
    }
    // SAFETY: a NUL-terminated name owned by the device.
    unsafe { CStr::from_ptr(p) }.to_string_lossy().into_owned()
}

/// Opens `device` (or the first device) and reads port 1's addressing.
pub fn open_context(device: Option<&str>) -> Result<Arc<Ctx>, VerbsError> {
    let list = DeviceList::get()?;
    let devs = list.devices();
    if devs.is_empty() {
        return Err(VerbsError::NoDevice);
    }
    let dev = match device {
        None => devs[0],
        Some(want) => *devs
            .iter()
            .find(|&&d| device_name(d) == want)
            .ok_or_else(|| VerbsError::DeviceNotFound {
                wanted: want.to_owned(),
                have: devs
                    .iter()
                    .map(|&d| device_name(d))
                    .collect::<Vec<_>>()
                    .join(", "),
            })?,
    };
    let name = device_name(dev);
    // SAFETY: dev is a live entry of the list.
    let ptr = NonNull::new(unsafe { ffi::ibv_open_device(dev) })
        .ok_or_else(|| last_err("ibv_open_device"))?;
    let mut ctx = Ctx {
        ptr,
        name,
        lid: 0,
        mtu: ffi::IBV_MTU_1024,
        gid: [0; 16],
        gid_index: 0,
        max_rd_atomic: 1,
        max_dest_rd_atomic: 1,
    };

    let mut port = ffi::ibv_port_attr::default();
    // SAFETY: the exported ibv_query_port fills a full ibv_port_attr (the
    // compat type is its prefix); port outlives the call.
    let rc =
        unsafe { ffi::ibv_query_port(ptr.as_ptr(), PORT_NUM, ptr::from_mut(&mut port).cast()) };
    if rc != 0 {
        return Err(verb_err("ibv_query_port", rc));
    }
    if port.state != ffi::ibv_port_state::IBV_PORT_ACTIVE {
        return Err(VerbsError::PortDown {
            device: ctx.name.clone(),
            state: port.state,
        });
    }
    ctx.lid = port.lid;
    ctx.mtu = port.active_mtu;

    let mut dattr = ffi::ibv_device_attr::default();
    // SAFETY: dattr outlives the call.
    let rc = unsafe { ffi::ibv_query_device(ptr.as_ptr(), &mut dattr) };
    if rc != 0 {
        return Err(verb_err("ibv_query_device", rc));
    }
    let clamp = |v: i32| u8::try_from(v.clamp(1, i32::from(RD_ATOMIC))).unwrap_or(1);
    ctx.max_rd_atomic = clamp(dattr.max_qp_init_rd_atom);
    ctx.max_dest_rd_atomic = clamp(dattr.max_qp_rd_atom);

    let cap = usize::try_from(port.gid_tbl_len).unwrap_or(0).max(1);
    let mut table = vec![ffi::ibv_gid_entry::default(); cap];
    // SAFETY: the table has room for `cap` entries of the size we pass.
    let n = unsafe {
        ffi::_ibv_query_gid_table(
            ptr.as_ptr(),
            table.as_mut_ptr(),
            cap,
            0,
            std::mem::size_of::<ffi::ibv_gid_entry>(),
        )
    };
    let n = usize::try_from(n).map_err(|_| {
        verb_err(
            "ibv_query_gid_table",
            i32::try_from(-n).unwrap_or(libc::EINVAL),
        )
    })?;
    table.truncate(n);
    if let Some((index, gid)) = pick_gid(&table) {
        ctx.gid_index = index;
        ctx.gid = gid;
    } else if ctx.lid == 0 {
        return Err(VerbsError::Verb {
            call: "ibv_query_gid_table",
            source: io::Error::other(format!(
                "{} has neither a LID nor a GID on port {PORT_NUM}",
                ctx.name
            )),
        });
    }
    Ok(Arc::new(ctx))
}

/// Prefers a RoCE v2 IPv4-mapped GID (what Soft-RoCE over an IPv4 netdev
/// routes), then any RoCE v2 GID, then the first entry.
fn pick_gid(table: &[ffi::ibv_gid_entry]) -> Option<(u8, [u8; 16])> {
    let entries: Vec<(u8, [u8; 16], u32)> = table
        .iter()
        .filter(|e| e.port_num == u32::from(PORT_NUM))
        .filter_map(|e| {
            // SAFETY: both union members are plain bytes.
            let raw = unsafe { e.gid.raw };
            (raw != [0; 16]).then_some((u8::try_from(e.gid_index).ok()?, raw, e.gid_type))
        })
        .collect();
    let v2 = |t: u32| t == ffi::IBV_GID_TYPE_ROCE_V2;
    let mapped = |g: &[u8; 16]| g[..10] == [0; 10] && g[10..12] == [0xff, 0xff];
    entries
        .iter()
        .find(|(_, g, t)| v2(*t) && mapped(g))
        .or_else(|| entries.iter().find(|(_, _, t)| v2(*t)))
        .or_else(|| entries.first())
        .map(|&(i, g, _)| (i, g))
}

/// A protection domain.
pub struct Pd {
    ptr: NonNull<ffi::ibv_pd>,
    ctx: Arc<Ctx>,
}

// SAFETY: PDs are thread-safe library objects; we only pass the pointer to verbs.
unsafe impl Send for Pd {}
// SAFETY: as above.
unsafe impl Sync for Pd {}

impl Pd {
    pub fn new(ctx: &Arc<Ctx>) -> Result<Arc<Self>, VerbsError> {
        // SAFETY: a live context.
        let ptr = NonNull::new(unsafe { ffi::ibv_alloc_pd(ctx.ptr.as_ptr()) })
            .ok_or_else(|| last_err("ibv_alloc_pd"))?;
        Ok(Arc::new(Self {
            ptr,
            ctx: ctx.clone(),
        }))
    }
}

impl Drop for Pd {
    fn drop(&mut self) {
        // SAFETY: every MR and QP of this PD holds an Arc to it, so none is left.
        let rc = unsafe { ffi::ibv_dealloc_pd(self.ptr.as_ptr()) };
        if rc != 0 {
            tracing::warn!(device = %self.ctx.name, "ibv_dealloc_pd failed: {}", io::Error::from_raw_os_error(rc));
        }
    }
}

/// A completion queue.
pub struct Cq {
    ptr: NonNull<ffi::ibv_cq>,
    _ctx: Arc<Ctx>,
}

// SAFETY: CQs are thread-safe library objects (polling locks in the provider).
unsafe impl Send for Cq {}
// SAFETY: as above.
unsafe impl Sync for Cq {}

impl Cq {
    pub fn new(ctx: &Arc<Ctx>, entries: i32) -> Result<Arc<Self>, VerbsError> {
        // SAFETY: a live context; no channel, no user context.
        let p = unsafe {
            ffi::ibv_create_cq(
                ctx.ptr.as_ptr(),
                entries,
                ptr::null_mut(),
                ptr::null_mut(),
                0,
            )
        };
        let ptr = NonNull::new(p).ok_or_else(|| last_err("ibv_create_cq"))?;
        Ok(Arc::new(Self {
            ptr,
            _ctx: ctx.clone(),
        }))
    }

    /// Pops at most one completion.
    pub fn poll_one(&self) -> Result<Option<ffi::ibv_wc>, VerbsError> {
        let mut wc = ffi::ibv_wc::default();
        // SAFETY: the CQ is live; its context's ops table is filled in by the
        // provider (ibv_poll_cq is this same inline call in verbs.h).
        let n = unsafe {
            let ctx = (*self.ptr.as_ptr()).context;
            let poll = (*ctx)
                .ops
                .poll_cq
                .ok_or_else(|| verb_err("ibv_poll_cq", libc::ENOSYS))?;
            poll(self.ptr.as_ptr(), 1, &mut wc)
        };
        match n {
            0 => Ok(None),
            1 => Ok(Some(wc)),
            _ => Err(verb_err("ibv_poll_cq", libc::EIO)),
        }
    }
}

impl Drop for Cq {
    fn drop(&mut self) {
        // SAFETY: every QP using this CQ holds an Arc to it, so none is left.
        let rc = unsafe { ffi::ibv_destroy_cq(self.ptr.as_ptr()) };
        if rc != 0 {
            tracing::warn!(
                "ibv_destroy_cq failed: {}",
                io::Error::from_raw_os_error(rc)
            );
        }
    }
}

/// What keeps an MR's memory alive.
pub enum Backing {
    /// Memory someone else owns, such as a hook in guest RAM (kept
    /// mapped for as long as this lives).
    Owner(#[allow(dead_code)] Box<dyn std::any::Any + Send + Sync>),
    /// A local buffer; only ever touched through the raw pointer.
    Local(#[allow(dead_code)] Vec<u64>),
}

/// A registered memory region.
pub struct Mr {
    ptr: NonNull<ffi::ibv_mr>,
    pub addr: *mut u8,
    _pd: Arc<Pd>,
    // Dropped after Drop::drop deregistered the MR.
    _backing: Backing,
}

// SAFETY: the MR is a library object; its memory is either guest RAM
// (shared memory accessed atomically or by the NIC) or a buffer only this
// struct's owner touches, through `addr`.
unsafe impl Send for Mr {}
// SAFETY: as above.
unsafe impl Sync for Mr {}

impl Mr {
    /// Registers `[addr, addr + len)`, which `backing` keeps mapped.
    ///
    /// # Safety
    /// `addr..addr + len` must be valid memory owned by `backing`.
    pub unsafe fn register(
        pd: &Arc<Pd>,
        addr: *mut u8,
        len: usize,
        access: ffi::ibv_access_flags,
        backing: Backing,
    ) -> Result<Self, VerbsError> {
        let access = i32::try_from(access.0).map_err(|_| verb_err("ibv_reg_mr", libc::EINVAL))?;
        // SAFETY: the caller promises the range is valid and kept alive by backing.
        let p = unsafe { ffi::ibv_reg_mr(pd.ptr.as_ptr(), addr.cast::<c_void>(), len, access) };
        let ptr = NonNull::new(p).ok_or_else(|| last_err("ibv_reg_mr"))?;
        Ok(Self {
            ptr,
            addr,
            _pd: pd.clone(),
            _backing: backing,
        })
    }

    /// A zeroed, 8-byte aligned local buffer of at least `len` bytes.
    pub fn local(pd: &Arc<Pd>, len: usize) -> Result<Self, VerbsError> {
        let mut buf = vec![0u64; len.div_ceil(8).max(1)];
        let addr = buf.as_mut_ptr().cast::<u8>();
        let bytes = buf.len() * 8;
        let access = ffi::ibv_access_flags::IBV_ACCESS_LOCAL_WRITE;
        // SAFETY: the Vec's heap buffer does not move when the Vec is moved
        // into the MR, and it is freed only after deregistration.
        unsafe { Self::register(pd, addr, bytes, access, Backing::Local(buf)) }
    }

    pub fn lkey(&self) -> u32 {
        // SAFETY: a live MR.
        unsafe { self.ptr.as_ref() }.lkey
    }

    pub fn rkey(&self) -> u32 {
        // SAFETY: a live MR.
        unsafe { self.ptr.as_ref() }.rkey
    }
}

impl Drop for Mr {
    fn drop(&mut self) {
        // SAFETY: registered once; the NIC stops using the memory before it is freed.
        let rc = unsafe { ffi::ibv_dereg_mr(self.ptr.as_ptr()) };
        if rc != 0 {
            tracing::warn!("ibv_dereg_mr failed: {}", io::Error::from_raw_os_error(rc));
        }
    }
}

/// An RC queue pair.
pub struct Qp {
    ptr: NonNull<ffi::ibv_qp>,
    pd: Arc<Pd>,
    _cq: Arc<Cq>,
}

// SAFETY: QPs are thread-safe library objects; posting locks in the provider.
unsafe impl Send for Qp {}
// SAFETY: as above.
unsafe impl Sync for Qp {}

impl Qp {
    /// A new RC QP in RESET, sending and receiving on `cq`.
    pub fn new(pd: &Arc<Pd>, cq: &Arc<Cq>, max_send_wr: u32) -> Result<Self, VerbsError> {
        let mut init = ffi::ibv_qp_init_attr {
            qp_context: ptr::null_mut(),
            send_cq: cq.ptr.as_ptr(),
            recv_cq: cq.ptr.as_ptr(),
            srq: ptr::null_mut(),
            cap: ffi::ibv_qp_cap {
                max_send_wr,
                max_recv_wr: 1,
                max_send_sge: 1,
                max_recv_sge: 1,
                max_inline_data: 0,
            },
            qp_type: ffi::ibv_qp_type::IBV_QPT_RC,
            sq_sig_all: 0,
        };
        // SAFETY: a live PD and CQ of the same context; init outlives the call.
        let p = unsafe { ffi::ibv_create_qp(pd.ptr.as_ptr(), &mut init) };
        let ptr = NonNull::new(p).ok_or_else(|| last_err("ibv_create_qp"))?;
        Ok(Self {
            ptr,
            pd: pd.clone(),
            _cq: cq.clone(),
        })
    }

    pub fn qpn(&self) -> u32 {
        // SAFETY: a live QP.
        unsafe { self.ptr.as_ref() }.qp_num
    }

    fn modify(
        &self,
        attr: &mut ffi::ibv_qp_attr,
        mask: ffi::ibv_qp_attr_mask,
        call: &'static str,
    ) -> Result<(), VerbsError> {
        let mask = i32::try_from(mask.0).map_err(|_| verb_err(call, libc::EINVAL))?;
        // SAFETY: a live QP; attr outlives the call.
        let rc = unsafe { ffi::ibv_modify_qp(self.ptr.as_ptr(), attr, mask) };
        if rc != 0 {
            return Err(verb_err(call, rc));
        }
        Ok(())
    }

    /// RESET → INIT → RTR → RTS toward `remote`, allowing `access` to the peer.
    pub fn connect(
        &self,
        access: ffi::ibv_access_flags,
        local_psn: u32,
        remote: &Endpoint,
        remote_gid: &[u8; 16],
    ) -> Result<(), VerbsError> {
        use ffi::ibv_qp_attr_mask as M;
        let ctx = &self.pd.ctx;
        let mut a = ffi::ibv_qp_attr {
            qp_state: ffi::ibv_qp_state::IBV_QPS_INIT,
            pkey_index: 0,
            port_num: PORT_NUM,
            qp_access_flags: access.0,
            ..Default::default()
        };
        self.modify(
            &mut a,
            M::IBV_QP_STATE | M::IBV_QP_PKEY_INDEX | M::IBV_QP_PORT | M::IBV_QP_ACCESS_FLAGS,
            "ibv_modify_qp(INIT)",
        )?;

        let mut a = ffi::ibv_qp_attr {
            qp_state: ffi::ibv_qp_state::IBV_QPS_RTR,
            path_mtu: remote.mtu.map_or(ctx.mtu, |m| m.min(ctx.mtu)),
            dest_qp_num: remote.qpn,
            rq_psn: remote.psn,
            max_dest_rd_atomic: ctx.max_dest_rd_atomic,
            min_rnr_timer: 12,
            ah_attr: ffi::ibv_ah_attr {
                dlid: remote.lid,
                sl: 0,
                src_path_bits: 0,
                port_num: PORT_NUM,
                ..Default::default()
            },
            ..Default::default()
        };
        if *remote_gid != [0; 16] {
            a.ah_attr.is_global = 1;
            a.ah_attr.grh.dgid = ffi::ibv_gid { raw: *remote_gid };
            a.ah_attr.grh.hop_limit = 0xff;
            a.ah_attr.grh.sgid_index = ctx.gid_index;
        }
        self.modify(
            &mut a,
            M::IBV_QP_STATE
                | M::IBV_QP_AV
                | M::IBV_QP_PATH_MTU
                | M::IBV_QP_DEST_QPN
                | M::IBV_QP_RQ_PSN
                | M::IBV_QP_MAX_DEST_RD_ATOMIC
                | M::IBV_QP_MIN_RNR_TIMER,
            "ibv_modify_qp(RTR)",
        )?;

        let mut a = ffi::ibv_qp_attr {
            qp_state: ffi::ibv_qp_state::IBV_QPS_RTS,
            sq_psn: local_psn,
            timeout: 14,
            retry_cnt: 7,
            rnr_retry: 7,
            max_rd_atomic: ctx.max_rd_atomic,
            ..Default::default()
        };
        self.modify(
            &mut a,
            M::IBV_QP_STATE
                | M::IBV_QP_SQ_PSN
                | M::IBV_QP_TIMEOUT
                | M::IBV_QP_RETRY_CNT
                | M::IBV_QP_RNR_RETRY
                | M::IBV_QP_MAX_QP_RD_ATOMIC,
            "ibv_modify_qp(RTS)",
        )
    }

    /// Posts a work request, or a chain of them linked through `next`.
    ///
    /// # Safety
    /// `wr`'s scatter list must name memory of a live local MR that stays
    /// untouched until the request's completion is polled.
    pub unsafe fn post(&self, wr: &mut ffi::ibv_send_wr) -> Result<(), VerbsError> {
        let mut bad: *mut ffi::ibv_send_wr = ptr::null_mut();
        // SAFETY: a live QP whose provider filled in the ops table
        // (ibv_post_send is this same inline call in verbs.h); the caller
        // vouches for the memory the request names.
        let rc = unsafe {
            let ctx = (*self.ptr.as_ptr()).context;
            let post = (*ctx)
                .ops
                .post_send
                .ok_or_else(|| verb_err("ibv_post_send", libc::ENOSYS))?;
            post(self.ptr.as_ptr(), wr, &mut bad)
        };
        if rc != 0 {
            return Err(verb_err("ibv_post_send", rc));
        }
        Ok(())
    }
}

impl Drop for Qp {
    fn drop(&mut self) {
        // SAFETY: created once; no work request of ours is outstanding on a
        // QP we destroy (the client abandons its buffer with the QP).
        let rc = unsafe { ffi::ibv_destroy_qp(self.ptr.as_ptr()) };
        if rc != 0 {
            tracing::warn!(
                "ibv_destroy_qp failed: {}",
                io::Error::from_raw_os_error(rc)
            );
        }
    }
}

/// The wrappers print their kind only: their handles mean nothing to a reader.
macro_rules! opaque_debug {
    ($($t:ty),*) => {$(
        impl std::fmt::Debug for $t {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.debug_struct(stringify!($t)).finish_non_exhaustive()
            }
        }
    )*};
}

opaque_debug!(Pd, Cq, Backing, Mr, Qp);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoints_are_validated_without_panicking() {
        let good = br#"{"lid":0,"gid":"00000000000000000000ffff7f000001","qpn":17,"psn":5}"#;
        let (e, gid) = parse_endpoint(good).unwrap();
        assert_eq!((e.qpn, e.psn, gid[15]), (17, 5, 1));
        for bad in [
            &b""[..],
            b"null",
            b"{}",
            b"[1,2]",
            br#"{"lid":0,"gid":"zz","qpn":17,"psn":5}"#,
            br#"{"lid":0,"gid":"00000000000000000000ffff7f000001","qpn":0,"psn":5}"#,
            br#"{"lid":0,"gid":"00000000000000000000ffff7f000001","qpn":16777216,"psn":5}"#,
            br#"{"lid":0,"gid":"00000000000000000000ffff7f000001","qpn":1,"psn":16777216}"#,
            br#"{"lid":0,"gid":"00000000000000000000000000000000","qpn":1,"psn":1}"#,
            br#"{"lid":70000,"gid":"00000000000000000000ffff7f000001","qpn":1,"psn":1}"#,
            br#"{"lid":0,"gid":"00000000000000000000ffff7f000001","qpn":1,"psn":1,"mtu":9}"#,
            br#"{"lid":0,"gid":"00000000000000000000ffff7f000001","qpn":1,"psn":1,"extra":1}"#,
        ] {
            assert!(
                parse_endpoint(bad).is_err(),
                "{}",
                String::from_utf8_lossy(bad)
            );
        }
    }

    #[test]
    fn gids_round_trip_as_hex() {
        let g = [0xfe, 0x80, 0, 0, 0, 0, 0, 0, 1, 2, 3, 4, 5, 6, 7, 8];
        assert_eq!(gid_from_hex(&gid_hex(&g)), Some(g));
        assert!(random_psn() <= 0x00ff_ffff);
    }

    #[test]
    fn the_preferred_gid_is_roce_v2_ipv4_mapped() {
        let entry = |index: u32, raw: [u8; 16], ty: u32| ffi::ibv_gid_entry {
            gid: ffi::ibv_gid { raw },
            gid_index: index,
            port_num: 1,
            gid_type: ty,
            ndev_ifindex: 2,
        };
        let link_local = [0xfe, 0x80, 0, 0, 0, 0, 0, 0, 1, 2, 3, 4, 5, 6, 7, 8];
        let mut mapped = [0u8; 16];
        mapped[10..].copy_from_slice(&[0xff, 0xff, 10, 0, 0, 1]);
        let t = [
            entry(0, link_local, 0),
            entry(1, link_local, ffi::IBV_GID_TYPE_ROCE_V2),
            entry(2, mapped, 0),
            entry(3, mapped, ffi::IBV_GID_TYPE_ROCE_V2),
        ];
        assert_eq!(pick_gid(&t), Some((3, mapped)));
        assert_eq!(pick_gid(&t[..2]), Some((1, link_local)));
        assert_eq!(pick_gid(&t[..1]), Some((0, link_local)));
        assert_eq!(pick_gid(&[]), None);
    }
}
