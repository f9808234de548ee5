//! The /dev/backdoor ioctl interface, mirrored field for field from
//! `guest-driver/include/backdoor_uapi.h` (a test compiles the header and
//! compares every size, offset, constant and request number).

use std::mem::size_of;

use nix::libc::c_ulong;

/// Where the driver's device node lives.
pub const BACKDOOR_DEVICE_PATH: &str = "/dev/backdoor";
/// The ioctl "type" byte of every request.
pub const BD_IOC_MAGIC: u8 = 0xbd;
/// Counter names: bytes, NUL-padded.
pub const BD_NAME_LEN: usize = 32;
/// Service names: bytes, NUL-padded.
pub const BD_SERVICE_LEN: usize = 16;
/// `BD_IOC_SVC_OPEN` flag: create the area if it is missing.
pub const BD_SVC_CREATE: u32 = 1 << 0;

/// `BD_IOC_INFO`: what the driver set up at load time.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[repr(C)]
pub struct BdIocInfo {
    /// ABI version of the device.
    pub abi_version: u32,
    /// The device's generation.
    pub generation: u32,
    /// 1 once the hooks are sealed.
    pub sealed: u32,
    /// Counter slots applications may use.
    pub counters_total: u32,
    /// Of those, how many are free.
    pub counters_free: u32,
    /// State-box slots.
    pub slots_total: u32,
    /// Slots in no service's area.
    pub slots_free: u32,
    /// Bytes per slot, a multiple of the page size.
    pub slot_size: u32,
    /// Id of the driver's OS-level counter.
    pub os_counter_id: u32,
    /// Bytes of the inbox; 0: none.
    pub inbox_len: u32,
    /// Map `inbox_len` bytes here, read-only.
    pub inbox_mmap_offset: u64,
    /// Bytes per inbox record slot.
    pub inbox_slot_size: u32,
    /// Zero.
    pub reserved: [u32; 3],
}

/// `BD_IOC_COUNTER_ALLOC`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(C)]
pub struct BdIocCounter {
    /// In: printable ASCII, NUL-padded.
    pub name: [u8; BD_NAME_LEN],
    /// In: > 0.
    pub deadline_ms: u32,
    /// In: `BD_LEVEL_APPLICATION` or `BD_LEVEL_SESSION`.
    pub level: u8,
    /// Zero.
    pub reserved0: [u8; 3],
    /// In: 0 means the caller's tgid.
    pub owner: u32,
    /// Out: the id monitors see (slot index + 1).
    pub id: u32,
    /// Out: mmap one page at this offset.
    pub mmap_offset: u64,
    /// Out: where the counter is in that page.
    pub offset_in_map: u32,
    /// Zero.
    pub reserved1: u32,
}

/// `BD_IOC_COUNTER_STATE` and `BD_IOC_COUNTER_FREE`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[repr(C)]
pub struct BdIocCounterState {
    /// A counter this file allocated.
    pub id: u32,
    /// `BD_STATE_ACTIVE` or `BD_STATE_IDLE`.
    pub state: u32,
}

/// `BD_IOC_SVC_OPEN`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(C)]
pub struct BdIocSvc {
    /// In: printable ASCII, NUL-padded.
    pub service: [u8; BD_SERVICE_LEN],
    /// In: slots wanted when creating (> 0).
    pub slots: u32,
    /// In: `BD_SVC_*`.
    pub flags: u32,
    /// Out: slots in the area.
    pub slot_count: u32,
    /// Out: bytes per slot.
    pub slot_size: u32,
    /// Out: the area's first slot in the state box.
    pub first_slot: u32,
    /// Out: 1 if this call created the area.
    pub created: u32,
    /// Out: mmap `slot_count * slot_size` bytes here.
    pub mmap_offset: u64,
}

// The request numbers, as the header's _IOR/_IOW/_IOWR/_IO compute them.
/// `BD_IOC_INFO`.
pub const BD_IOC_INFO: c_ulong = nix::request_code_read!(BD_IOC_MAGIC, 0, size_of::<BdIocInfo>());
/// `BD_IOC_COUNTER_ALLOC`.
pub const BD_IOC_COUNTER_ALLOC: c_ulong =
    nix::request_code_readwrite!(BD_IOC_MAGIC, 1, size_of::<BdIocCounter>());
/// `BD_IOC_COUNTER_STATE`.
pub const BD_IOC_COUNTER_STATE: c_ulong =
    nix::request_code_write!(BD_IOC_MAGIC, 2, size_of::<BdIocCounterState>());
/// `BD_IOC_COUNTER_FREE`.
pub const BD_IOC_COUNTER_FREE: c_ulong =
    nix::request_code_write!(BD_IOC_MAGIC, 3, size_of::<BdIocCounterState>());
/// `BD_IOC_SVC_OPEN`.
pub const BD_IOC_SVC_OPEN: c_ulong =
    nix::request_code_readwrite!(BD_IOC_MAGIC, 4, size_of::<BdIocSvc>());
/// `BD_IOC_SVC_DELETE`.
pub const BD_IOC_SVC_DELETE: c_ulong = nix::request_code_none!(BD_IOC_MAGIC, 5);

/// The raw ioctl calls (nix's wrappers; each is `unsafe` because the
/// kernel writes through the pointer it is given).
pub mod ioctl {
    use super::{BdIocCounter, BdIocCounterState, BdIocInfo, BdIocSvc, BD_IOC_MAGIC};

    nix::ioctl_read!(info, BD_IOC_MAGIC, 0, BdIocInfo);
    nix::ioctl_readwrite!(counter_alloc, BD_IOC_MAGIC, 1, BdIocCounter);
    nix::ioctl_write_ptr!(counter_state, BD_IOC_MAGIC, 2, BdIocCounterState);
    nix::ioctl_write_ptr!(counter_free, BD_IOC_MAGIC, 3, BdIocCounterState);
    nix::ioctl_readwrite!(svc_open, BD_IOC_MAGIC, 4, BdIocSvc);
    nix::ioctl_none!(svc_delete, BD_IOC_MAGIC, 5);
}

const _: () = {
    assert!(size_of::<BdIocInfo>() == 64);
    assert!(size_of::<BdIocCounter>() == 64);
    assert!(size_of::<BdIocCounterState>() == 8);
    assert!(size_of::<BdIocSvc>() == 48);
};
