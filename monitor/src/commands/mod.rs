//! bdctl's one-shot commands, one file each; `watch` is `crate::watch`.

use backdoor_proto::{Client, PublicHook, Role};

use crate::cli::OneTarget;
use crate::Error;

pub mod cas;
pub mod dmesg;
pub mod doctor;
pub mod evidence;
pub mod extract;
pub mod incidents;
pub mod kernel_files;
pub mod read;
pub mod resume;
pub mod status;
pub mod targets;
pub mod write;

/// The hook a user names, by its name or its id.
pub(crate) fn find_hook<'a>(c: &'a Client, hook: &str) -> Option<&'a PublicHook> {
    c.descriptor()
        .hooks
        .iter()
        .find(|h| h.name == hook || h.id.to_string() == hook)
}

pub(crate) fn hook_id(c: &Client, hook: &str) -> Result<u32, Error> {
    find_hook(c, hook).map(|h| h.id).ok_or_else(|| {
        let names: Vec<_> = c
            .descriptor()
            .hooks
            .iter()
            .map(|h| format!("{} ({})", h.name, h.id))
            .collect();
        Error::Usage(format!(
            "no hook {hook:?}; this guest has: {}",
            names.join(", ")
        ))
    })
}

pub(crate) fn connect(t: &OneTarget, role: Role) -> Result<Client, Error> {
    Ok(t.target()?.connect(role, t.timeout())?)
}
