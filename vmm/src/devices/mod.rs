//! The legacy devices bdvmm emulates in user space, one per file.

pub mod backdoor;
pub mod boot_timer;
pub mod debug_exit;
pub mod i8042;
pub mod serial;
pub mod watchdog;
