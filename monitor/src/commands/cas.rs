//! `bdctl cas`: an 8-byte compare-and-swap in a REPAIR hook.

use backdoor_proto::Role;
use serde_json::json;

use super::{connect, hook_id};
use crate::cli::CasArgs;
use crate::Error;

/// `bdctl cas`.
pub fn run(a: &CasArgs) -> Result<(), Error> {
    let mut c = connect(&a.t, Role::Repair)?;
    let id = hook_id(&c, &a.hook)?;
    let old = c.cas(id, a.offset, a.expected, a.new)?;
    let swapped = old == a.expected;
    if a.t.json {
        println!("{}", json!({"old": old, "swapped": swapped}));
    } else {
        println!(
            "old value {old}: {}",
            if swapped { "swapped" } else { "not swapped" }
        );
    }
    Ok(())
}
