//! backdoor-vmm's virtual machine monitor: a minimal KVM VMM whose guest
//! RAM lives in a shareable memfd. See docs/ARCHITECTURE.md.

pub mod agent_process;
pub mod api;
pub mod boot;
pub mod bus;
pub mod cli;
pub mod config;
pub mod devices;
pub mod event_loop;
pub mod events;
pub mod exit_code;
pub mod exit_counters;
pub mod kvm;
pub mod layout;
pub mod lifecycle;
pub mod memory;
pub mod vcpu;
pub mod vmm;
