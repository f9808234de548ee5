//! `bdctl write`: bytes into a REPAIR hook.

use backdoor_proto::auth::decode_hex;
use backdoor_proto::Role;

use super::{connect, hook_id};
use crate::cli::WriteArgs;
use crate::Error;

/// `bdctl write`.
pub fn run(a: &WriteArgs) -> Result<(), Error> {
    let data = decode_hex(&a.hex).ok_or_else(|| Error::Usage(format!("{:?} is not hex", a.hex)))?;
    let mut c = connect(&a.t, Role::Repair)?;
    let id = hook_id(&c, &a.hook)?;
    c.write(id, a.offset, &data)?;
    println!("wrote {} bytes at {}+{}", data.len(), a.hook, a.offset);
    Ok(())
}
