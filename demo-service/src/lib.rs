//! `bdkv`: a session-oriented TCP key-value server whose sessions survive
//! a crash of the server (they are resumed from its own service area)
//! and can move to another instance (from `bdctl extract` output, or
//! through the driver's inbox filled by `bdctl resume`): the Backdoors
//! papers' session recovery, on `backdoor-guest`.
//!
//! Protocol: [`protocol`]. Continuation format: [`payload`].

pub mod adopt;
pub mod cli;
pub mod client;
pub mod payload;
pub mod protocol;
pub mod server;
pub mod store;
