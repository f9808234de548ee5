//! bdctl: the remote monitor. It reads guests' progress boxes over the
//! backdoor, judges hangs by its own clock, extracts service
//! continuations and hands them to a healthy instance.

mod actions;
pub mod cli;
pub mod cluster;
pub mod commands;
pub mod evidence;
pub mod extract;
pub mod handover;
pub mod judge;
pub mod kernel;
pub mod metrics;
pub mod poll;
pub mod target;
pub mod watch;

/// Errors of bdctl's commands.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Bad arguments or input files.
    #[error("{0}")]
    Usage(String),
    /// Target or key problems.
    #[error(transparent)]
    Target(#[from] target::TargetError),
    /// Could not connect.
    #[error(transparent)]
    Connect(#[from] target::ConnectError),
    /// The agent refused or could not be read.
    #[error(transparent)]
    Client(#[from] backdoor_proto::ClientError),
    /// A hand-over did not happen.
    #[error(transparent)]
    Handover(#[from] handover::HandoverError),
    /// etcd (cluster mode).
    #[error(transparent)]
    Cluster(#[from] cluster::EtcdError),
    /// Watch configuration.
    #[error(transparent)]
    Config(#[from] cli::ConfigError),
    /// Anything else (files, metrics socket).
    #[error("{0}")]
    Other(String),
}
