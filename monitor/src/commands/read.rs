//! `bdctl read`: bytes of a hook, as a hex dump or JSON.

use backdoor_proto::Role;
use serde_json::json;

use super::{connect, hook_id};
use crate::cli::ReadArgs;
use crate::Error;

/// `bdctl read`.
pub fn run(a: &ReadArgs) -> Result<(), Error> {
    let mut c = connect(&a.t, Role::Read)?;
    let id = hook_id(&c, &a.hook)?;
    let b = c.read(id, a.offset, a.len)?;
    if a.t.json {
        println!(
            "{}",
            json!({"hook": a.hook, "offset": a.offset, "hex": hex::encode(&b)})
        );
    } else {
        for (i, chunk) in b.chunks(16).enumerate() {
            let ascii: String = chunk
                .iter()
                .map(|&x| {
                    if (0x20..0x7f).contains(&x) {
                        x as char
                    } else {
                        '.'
                    }
                })
                .collect();
            println!(
                "{:08x}  {:<48} {ascii}",
                a.offset + i as u64 * 16,
                chunk
                    .iter()
                    .map(|x| format!("{x:02x} "))
                    .collect::<String>()
            );
        }
    }
    Ok(())
}
