//! The command line.

use std::net::SocketAddr;
use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

/// A session-oriented key-value server whose sessions survive crashes
/// and move between instances.
#[derive(Debug, Parser)]
#[command(name = "bdkv", version, about, long_about = None)]
pub struct Cli {
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// Subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Serve sessions.
    Serve(ServeArgs),
    /// Send request lines (from --script or stdin) and print the replies.
    Client(ClientArgs),
    /// Create sessions and fill them; print `<id> <version> <commands>` per session.
    Load(LoadArgs),
    /// Resume the sessions `load` printed and check every key.
    Check(CheckArgs),
}

/// `bdkv serve`.
#[derive(Debug, Args)]
pub struct ServeArgs {
    /// Address to listen on (an IP address: no name lookups).
    #[arg(long, value_name = "IP:PORT", default_value = "0.0.0.0:7070")]
    pub listen: SocketAddr,
    /// The backdoor device.
    #[arg(long, value_name = "PATH", default_value = "/dev/backdoor")]
    pub device: PathBuf,
    /// Keep the state in this host file instead of the device (created if missing).
    #[arg(long, value_name = "PATH", conflicts_with = "device")]
    pub state_file: Option<PathBuf>,
    /// The service's name (its area in the state box).
    #[arg(long, value_name = "NAME", default_value = "bdkv")]
    pub service: String,
    /// Sessions the area holds when it is created (two slots each).
    #[arg(long, value_name = "N", default_value_t = 32, value_parser = clap::value_parser!(u32).range(1..=4096))]
    pub max_sessions: u32,
    /// Deadline of the APPLICATION counter, in milliseconds.
    #[arg(long, value_name = "MS", default_value_t = 1000, value_parser = clap::value_parser!(u32).range(10..))]
    pub app_deadline_ms: u32,
    /// Deadline of each SESSION counter, in milliseconds.
    #[arg(long, value_name = "MS", default_value_t = 2000, value_parser = clap::value_parser!(u32).range(1..))]
    pub session_deadline_ms: u32,
    /// Adopt the sessions of a `bdctl extract --out` file (repeatable).
    #[arg(long, value_name = "FILE")]
    pub resume_from: Vec<PathBuf>,
    /// Adopt sessions delivered to the inbox by `bdctl resume`, now and while running.
    #[arg(long)]
    pub inbox: bool,
    /// With --state-file: bytes per slot of a new file (a multiple of 4096).
    #[arg(long, value_name = "BYTES", default_value_t = 4096)]
    pub host_slot_size: u32,
    /// With --state-file: bytes per inbox slot of a new file.
    #[arg(long, value_name = "BYTES", default_value_t = 4096)]
    pub host_inbox_slot_size: u32,
}

/// The server to talk to.
#[derive(Debug, Args)]
pub struct Server {
    /// The server (an IP address).
    #[arg(long, value_name = "IP:PORT", default_value = "127.0.0.1:7070")]
    pub addr: SocketAddr,
}

/// `bdkv client`.
#[derive(Debug, Args)]
pub struct ClientArgs {
    /// The server.
    #[command(flatten)]
    pub server: Server,
    /// Request lines (default: stdin); `#` lines and blank lines are skipped.
    #[arg(long, value_name = "FILE")]
    pub script: Option<PathBuf>,
}

/// `bdkv load`.
#[derive(Debug, Args)]
pub struct LoadArgs {
    /// The server.
    #[command(flatten)]
    pub server: Server,
    /// Sessions to create.
    #[arg(long, value_name = "N", default_value_t = 3)]
    pub sessions: u32,
    /// SETs per session.
    #[arg(long, value_name = "M", default_value_t = 5)]
    pub commands: u32,
}

/// `bdkv check`.
#[derive(Debug, Args)]
pub struct CheckArgs {
    /// The server.
    #[command(flatten)]
    pub server: Server,
    /// `load`'s output (default: stdin).
    #[arg(long, value_name = "FILE")]
    pub expect: Option<PathBuf>,
}
