//! Everything that puts a guest into its first instruction: boot tables,
//! image loaders and per-vCPU architectural state.

pub mod cpu;
pub mod gdt;
pub mod linux;
pub mod mptable;
pub mod paging;
pub mod test_guest;
