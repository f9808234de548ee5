//! The encrypted channel every frame after HELLO travels in: the Noise
//! protocol `NNpsk0_25519_AESGCM_SHA256`, from the `snow` crate.
//!
//! Why Noise with a pre-shared key: keys are per VM and per role and are
//! handed out as secrets (docs/wire.md), which is exactly Noise's psk
//! model; TLS 1.3 in rustls offers no external PSK, and certificates
//! would change who holds what. NNpsk0 gives mutual authentication by the
//! role's key (neither side can finish the handshake without it), forward
//! secrecy (an ephemeral X25519 exchange per connection), and
//! confidentiality, integrity and replay protection for every later
//! frame (AES-256-GCM, whose implicit nonce is a per-direction counter:
//! a frame altered, replayed, reordered, dropped, taken from another
//! connection or sent back the other way fails to open). AES-GCM rather
//! than ChaCha20-Poly1305 because the NIC-less soft data path moves bulk
//! state boxes, and AES-NI keeps that cheap (`bdbench --only
//! remote_reads`, results section 3).
//!
//! The VM and role travel in the clear in HELLO (the agent must know
//! which key to use) and are bound into the handshake as its prologue.
//! After the handshake a frame (the 16-byte header and its payload) goes
//! as one or more records: a 2-byte length, then one Noise transport
//! message of at most [`MAX_RECORD`] bytes (at most [`MAX_CHUNK`] bytes of
//! the frame and a 16-byte tag). The first record of a frame starts with
//! its header; nothing of a frame is decoded before its record opened.

use std::io::{Read, Write};

use hmac::{Hmac, Mac};
use sha2::Sha256;
use snow::{Builder, HandshakeState, TransportState};

use crate::wire::{self, Msg, Role, WireError, HEADER_LEN, MAX_PAYLOAD};

/// The Noise protocol name.
pub const NOISE_PARAMS: &str = "Noise_NNpsk0_25519_AESGCM_SHA256";
/// Largest Noise message (the specification's bound).
pub const MAX_RECORD: usize = 65535;
/// Bytes of AES-GCM's tag on every record.
pub const AEAD_TAG: usize = 16;
/// Most frame bytes in one record.
pub const MAX_CHUNK: usize = MAX_RECORD - AEAD_TAG;
/// Bytes of either handshake message: an ephemeral public key and the
/// tag over an empty payload.
pub const HANDSHAKE_MSG_LEN: usize = 32 + AEAD_TAG;

/// Errors setting a channel up.
#[derive(Debug, thiserror::Error)]
pub enum HandshakeError {
    /// The other side's handshake message does not open under our key:
    /// it does not hold the role's key (or the message was altered).
    #[error("the peer does not hold the role's key (or the handshake was altered)")]
    NotAuthentic,
    /// Noise itself failed (no randomness, a malformed message).
    #[error("noise handshake")]
    Noise(#[from] snow::Error),
}

/// The 32-byte Noise pre-shared key for a role key of any accepted
/// length (key files hold at least 16 bytes): HMAC-SHA256 under the key
/// of a fixed label, so that the same secret never serves two purposes.
fn psk(key: &[u8]) -> [u8; 32] {
    let mut m = Hmac::<Sha256>::new_from_slice(key).expect("HMAC takes keys of any length");
    m.update(b"backdoor-vmm noise psk v3");
    m.finalize().into_bytes().into()
}

/// What both sides bind into the handshake: protocol, role and VM.
fn prologue(vm: &str, role: Role) -> Vec<u8> {
    let mut p = b"backdoor-vmm wire v3\0".to_vec();
    p.push(role as u8);
    p.extend_from_slice(vm.as_bytes());
    p
}

fn state(key: &[u8], vm: &str, role: Role, initiator: bool) -> Result<HandshakeState, snow::Error> {
    let params = NOISE_PARAMS.parse()?;
    let psk = psk(key);
    let prologue = prologue(vm, role);
    let b = Builder::new(params).psk(0, &psk)?.prologue(&prologue)?;
    if initiator {
        b.build_initiator()
    } else {
        b.build_responder()
    }
}

/// The monitor's half of a handshake in progress.
pub struct Initiator(HandshakeState);

impl std::fmt::Debug for Initiator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Initiator").finish_non_exhaustive()
    }
}

impl Initiator {
    /// Starts a handshake as `role` of `vm` with `key`; returns the
    /// message HELLO carries.
    pub fn start(key: &[u8], vm: &str, role: Role) -> Result<(Self, Vec<u8>), HandshakeError> {
        let mut hs = state(key, vm, role, true)?;
        let mut msg = vec![0u8; HANDSHAKE_MSG_LEN];
        let n = hs.write_message(&[], &mut msg)?;
        msg.truncate(n);
        Ok((Self(hs), msg))
    }

    /// Finishes with the agent's ACCEPT message: the channel, or
    /// [`HandshakeError::NotAuthentic`] if the agent does not hold the key.
    pub fn finish(mut self, accept: &[u8]) -> Result<Channel, HandshakeError> {
        let mut none = [0u8; 0];
        self.0
            .read_message(accept, &mut none)
            .map_err(|_| HandshakeError::NotAuthentic)?;
        Ok(Channel::new(self.0.into_transport_mode()?))
    }
}

/// The agent's half: opens HELLO's message under `key` (which must be
/// the key of `role` of `vm`, or a random one when the agent has none:
/// the client then learns nothing a wrong key would not tell it).
/// Returns the channel and the message ACCEPT carries.
pub fn respond(
    key: &[u8],
    vm: &str,
    role: Role,
    hello: &[u8],
) -> Result<(Channel, Vec<u8>), HandshakeError> {
    let mut hs = state(key, vm, role, false)?;
    let mut none = [0u8; 0];
    hs.read_message(hello, &mut none)
        .map_err(|_| HandshakeError::NotAuthentic)?;
    let mut msg = vec![0u8; HANDSHAKE_MSG_LEN];
    let n = hs.write_message(&[], &mut msg)?;
    msg.truncate(n);
    Ok((Channel::new(hs.into_transport_mode()?), msg))
}

/// One connection's encrypted channel (both directions).
pub struct Channel {
    noise: TransportState,
    /// A record's length and ciphertext, sent or received.
    record: Vec<u8>,
    /// The first record's plaintext of a frame being sent.
    outgoing: Vec<u8>,
    /// A received record's plaintext (always [`MAX_RECORD`] long, so
    /// that opening a record never clears or grows it).
    incoming: Vec<u8>,
}

impl std::fmt::Debug for Channel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Channel").finish_non_exhaustive()
    }
}

impl Channel {
    fn new(noise: TransportState) -> Self {
        Self {
            noise,
            record: vec![0u8; 2 + MAX_RECORD],
            outgoing: Vec::with_capacity(MAX_RECORD),
            incoming: vec![0u8; MAX_RECORD],
        }
    }

    /// Encrypts and writes one frame (the caller flushes).
    pub fn send(
        &mut self,
        w: &mut impl Write,
        request_id: u32,
        msg: &Msg,
    ) -> Result<(), WireError> {
        let payload = wire::payload_bytes(msg);
        let h = wire::header(msg.kind(), request_id, payload.len())?;
        self.seal_frame(w, &h, &payload)
    }

    /// Encrypts raw frame bytes as they are, consistent or not (for the
    /// fuzz targets and tools that script a peer).
    pub fn send_raw(&mut self, w: &mut impl Write, frame: &[u8]) -> Result<(), WireError> {
        let (h, payload) = frame.split_at(frame.len().min(HEADER_LEN));
        self.seal_frame(w, h, payload)
    }

    /// Writes a frame as records: the header and the payload's start in
    /// the first, the rest of the payload in as many as it takes.
    fn seal_frame(
        &mut self,
        w: &mut impl Write,
        h: &[u8],
        payload: &[u8],
    ) -> Result<(), WireError> {
        let first = payload.len().min(MAX_CHUNK - HEADER_LEN);
        let mut plain = std::mem::take(&mut self.outgoing);
        plain.clear();
        plain.extend_from_slice(h);
        plain.extend_from_slice(&payload[..first]);
        let sent = self.seal(w, &plain);
        self.outgoing = plain;
        sent?;
        for chunk in payload[first..].chunks(MAX_CHUNK) {
            self.seal(w, chunk)?;
        }
        Ok(())
    }

    /// Encrypts `chunk` as one record and writes it.
    fn seal(&mut self, w: &mut impl Write, chunk: &[u8]) -> Result<(), WireError> {
        let n = self
            .noise
            .write_message(chunk, &mut self.record[2..])
            .map_err(|e| WireError::Io(std::io::Error::other(format!("noise: {e}"))))?;
        let len = u16::try_from(n).map_err(|_| WireError::TooLarge(u32::MAX))?;
        self.record[..2].copy_from_slice(&len.to_le_bytes());
        w.write_all(&self.record[..2 + n])?;
        Ok(())
    }

    /// Reads and opens one frame: (request id, message). A record that
    /// does not open is [`WireError::Integrity`]; the channel is then
    /// unusable.
    pub fn recv(&mut self, r: &mut impl Read) -> Result<(u32, Msg), WireError> {
        let n = self.open(r)?;
        if n < HEADER_LEN {
            return Err(WireError::Malformed(format!(
                "a frame's first record holds {n} bytes, less than a header"
            )));
        }
        let h: [u8; HEADER_LEN] = self.incoming[..HEADER_LEN].try_into().expect("16 bytes");
        let len = wire::check_header(&h, MAX_PAYLOAD)?;
        let mut payload = Vec::with_capacity(len);
        payload.extend_from_slice(&self.incoming[HEADER_LEN..n]);
        while payload.len() < len {
            let n = self.open(r)?;
            if n == 0 {
                return Err(WireError::Malformed(
                    "an empty record inside a frame".into(),
                ));
            }
            payload.extend_from_slice(&self.incoming[..n]);
        }
        if payload.len() != len {
            return Err(WireError::Malformed(format!(
                "records carry {} payload bytes for a frame of {len}",
                payload.len()
            )));
        }
        wire::decode_frame(&h, payload)
    }

    /// Reads one record and opens it into `self.incoming`; returns its length.
    fn open(&mut self, r: &mut impl Read) -> Result<usize, WireError> {
        let mut len = [0u8; 2];
        r.read_exact(&mut len)?;
        let len = usize::from(u16::from_le_bytes(len));
        if len < AEAD_TAG {
            return Err(WireError::Integrity);
        }
        r.read_exact(&mut self.record[..len])?;
        let n = self
            .noise
            .read_message(&self.record[..len], &mut self.incoming)
            .map_err(|_| WireError::Integrity)?;
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const KEY: &[u8] = b"read-key-16-byte";

    fn pair() -> (Channel, Channel) {
        let (init, hello) = Initiator::start(KEY, "vm1", Role::Read).unwrap();
        let (agent, accept) = respond(KEY, "vm1", Role::Read, &hello).unwrap();
        (init.finish(&accept).unwrap(), agent)
    }

    fn sent(c: &mut Channel, id: u32, m: &Msg) -> Vec<u8> {
        let mut buf = Vec::new();
        c.send(&mut buf, id, m).unwrap();
        buf
    }

    #[test]
    fn only_the_same_key_vm_and_role_complete_a_handshake() {
        let (_, hello) = Initiator::start(KEY, "vm1", Role::Read).unwrap();
        assert_eq!(hello.len(), HANDSHAKE_MSG_LEN);
        for (key, vm, role) in [
            (&b"wrong-key-16-byt"[..], "vm1", Role::Read),
            (KEY, "vm2", Role::Read),
            (KEY, "vm1", Role::Repair),
        ] {
            assert!(
                matches!(
                    respond(key, vm, role, &hello),
                    Err(HandshakeError::NotAuthentic)
                ),
                "{vm} {role:?}"
            );
        }
        // An impostor agent (without the key) cannot open HELLO; what it
        // answers from a handshake of its own does not open either.
        let (init, _) = Initiator::start(KEY, "vm1", Role::Read).unwrap();
        let (_, own_hello) = Initiator::start(b"wrong-key-16-byt", "vm1", Role::Read).unwrap();
        let (_, forged) = respond(b"wrong-key-16-byt", "vm1", Role::Read, &own_hello).unwrap();
        assert!(matches!(
            init.finish(&forged),
            Err(HandshakeError::NotAuthentic)
        ));
    }

    #[test]
    fn frames_of_every_size_round_trip_both_ways() {
        let (mut monitor, mut agent) = pair();
        for len in [
            0,
            1,
            MAX_CHUNK - HEADER_LEN,
            MAX_CHUNK - HEADER_LEN + 1,
            3 * MAX_CHUNK,
            wire::MAX_READ as usize,
        ] {
            let m = Msg::ReadOk((0..len).map(|i| u8::try_from(i % 251).unwrap()).collect());
            let buf = sent(&mut agent, 7, &m);
            assert_eq!(monitor.recv(&mut buf.as_slice()).unwrap(), (7, m), "{len}");
        }
        let buf = sent(&mut monitor, 9, &Msg::Describe);
        assert_eq!(agent.recv(&mut buf.as_slice()).unwrap(), (9, Msg::Describe));
    }

    #[test]
    fn a_frame_fails_if_any_bit_changes_or_it_comes_again_or_out_of_order_or_backwards() {
        let (mut monitor, mut agent) = pair();
        let first = sent(&mut agent, 1, &Msg::ReadOk(vec![1, 2, 3, 4, 5, 6, 7, 8]));
        let second = sent(&mut agent, 2, &Msg::AtomicOk(7));
        assert_eq!(
            monitor.recv(&mut first.as_slice()).unwrap(),
            (1, Msg::ReadOk(vec![1, 2, 3, 4, 5, 6, 7, 8]))
        );
        for bit in 0..second.len() * 8 {
            let mut bad = second.clone();
            bad[bit / 8] ^= 1 << (bit % 8);
            assert!(
                monitor.recv(&mut bad.as_slice()).is_err(),
                "bit {bit} flipped unnoticed"
            );
        }
        // The first frame again (a replay) where the second is due.
        assert!(matches!(
            monitor.recv(&mut first.as_slice()),
            Err(WireError::Integrity)
        ));
        // A frame the monitor itself sent, reflected back to it.
        let own = sent(&mut monitor, 2, &Msg::AtomicOk(7));
        assert!(matches!(
            monitor.recv(&mut own.as_slice()),
            Err(WireError::Integrity)
        ));
        // A frame from another connection under the same key.
        let (_, mut other) = pair();
        let foreign = sent(&mut other, 2, &Msg::AtomicOk(7));
        assert!(matches!(
            monitor.recv(&mut foreign.as_slice()),
            Err(WireError::Integrity)
        ));
        assert_eq!(
            monitor.recv(&mut second.as_slice()).unwrap(),
            (2, Msg::AtomicOk(7))
        );
    }

    #[test]
    fn guest_bytes_do_not_travel_in_the_clear() {
        let (_, mut agent) = pair();
        let secret = b"session-token-0123456789abcdef".repeat(4);
        let buf = sent(&mut agent, 1, &Msg::ReadOk(secret.clone()));
        assert!(!buf.windows(16).any(|w| secret.windows(16).any(|s| s == w)));
    }
}
