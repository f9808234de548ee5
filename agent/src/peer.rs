//! Who is on the other end of a local (Unix) socket. The control socket
//! and the agent link hand out control of a VM and its guest RAM, so
//! filesystem permissions alone (a socket left world-writable, a shared
//! directory) must not be what stands between another user and them: the
//! peer must run as this process's user, or as root.

use std::os::fd::AsFd;

use nix::sys::socket::{getsockopt, sockopt::PeerCredentials};

/// A peer that may not use the socket.
#[derive(Debug, thiserror::Error)]
pub enum PeerError {
    /// The kernel could not say who the peer is.
    #[error("cannot read the peer's credentials: {0}")]
    Unknown(nix::errno::Errno),
    /// Another user's process.
    #[error("peer pid {pid} runs as uid {uid}; only uid {ours} (or root) may use this socket")]
    OtherUser {
        /// Its process id.
        pid: i32,
        /// Its user id.
        uid: u32,
        /// This process's effective user id.
        ours: u32,
    },
}

/// Checks that the peer of the connected Unix socket `s` runs as this
/// process's effective uid, or as root, and returns its process id.
pub fn check_same_user(s: &impl AsFd) -> Result<u32, PeerError> {
    let cred = getsockopt(s, PeerCredentials).map_err(PeerError::Unknown)?;
    let ours = nix::unistd::geteuid().as_raw();
    match cred.uid() {
        uid if uid == ours || uid == 0 => Ok(u32::try_from(cred.pid()).unwrap_or(0)),
        uid => Err(PeerError::OtherUser {
            pid: cred.pid(),
            uid,
            ours,
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_peer_of_our_own_user_is_accepted() {
        let (a, b) = std::os::unix::net::UnixStream::pair().unwrap();
        assert_eq!(check_same_user(&a).unwrap(), std::process::id());
        check_same_user(&b).unwrap();
    }
}
