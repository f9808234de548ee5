//! The paravirtual backdoor device: the guest registers hooks (regions of
//! its RAM with permissions) once, then seals them; afterwards it can
//! neither close nor alter its backdoor. See docs/abi.md.

pub mod device;
pub mod hooks;

pub use device::{BackdoorDevice, BackdoorShared, Descriptor, GuestReader};
pub use hooks::{Hook, HookTable};
