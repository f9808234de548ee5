//! What the encryption costs (docs/wire.md "The encrypted channel"): one
//! request loop run twice in the same process, once with every frame
//! sealed and opened by a Noise channel (`Channel::send` / `recv`, as the
//! agent and the client do) and once plain (`write_msg` / `read_msg`),
//! over the same agent's `dispatch`, the same loopback socket set-up and
//! the same busy-polling. Nothing else differs, so the difference is the
//! encryption.

use std::io::{BufReader, BufWriter, Write};
use std::net::{TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::time::{Duration, Instant};

use backdoor_agent::channel::{respond, Channel, Initiator};
use backdoor_agent::wire::{read_msg, spin_until_readable, write_msg, Msg, WireError};
use backdoor_agent::{Agent, Role};

/// The agent's and the client's busy-poll windows (their defaults).
const SERVER_SPIN: Duration = Duration::from_micros(50);
const CLIENT_SPIN: Duration = Duration::from_micros(200);

/// One end's framing: plain, or an encrypted channel.
#[derive(Debug)]
enum Framing {
    Plain,
    Sealed(Box<Channel>),
}

impl Framing {
    fn write(&mut self, w: &mut impl Write, id: u32, m: &Msg) -> Result<(), WireError> {
        match self {
            Self::Plain => write_msg(w, id, m),
            Self::Sealed(c) => c.send(w, id, m),
        }
    }

    fn read(&mut self, r: &mut impl std::io::Read) -> Result<(u32, Msg), WireError> {
        match self {
            Self::Plain => read_msg(r),
            Self::Sealed(c) => c.recv(r),
        }
    }
}

/// Both ends of one channel, from a real handshake in this process.
fn channel_pair() -> (Channel, Channel) {
    let key = b"bench-key-16-bytes";
    let (init, hello) = Initiator::start(key, "bench", Role::Read).expect("handshake");
    let (agent, accept) = respond(key, "bench", Role::Read, &hello).expect("handshake");
    (init.finish(&accept).expect("handshake"), agent)
}

fn framings(encrypted: bool) -> (Framing, Framing) {
    if encrypted {
        let (monitor, agent) = channel_pair();
        (
            Framing::Sealed(Box::new(monitor)),
            Framing::Sealed(Box::new(agent)),
        )
    } else {
        (Framing::Plain, Framing::Plain)
    }
}

/// A client of a request loop on its own thread.
#[derive(Debug)]
pub struct Loop {
    r: BufReader<TcpStream>,
    w: BufWriter<TcpStream>,
    framing: Framing,
    next_id: u32,
}

impl Loop {
    /// Starts the server side (answering with `agent`'s dispatch, read
    /// role) and connects to it.
    pub fn start(agent: Arc<Agent>, encrypted: bool) -> Self {
        let (client_side, mut server_side) = framings(encrypted);
        let l = TcpListener::bind("127.0.0.1:0").expect("bind loopback");
        let addr = l.local_addr().expect("address");
        std::thread::spawn(move || {
            let (s, _) = l.accept().expect("accept");
            s.set_nodelay(true).expect("nodelay");
            let fd = s.as_raw_fd();
            let mut r = BufReader::new(s.try_clone().expect("clone"));
            let mut w = BufWriter::new(s);
            loop {
                if r.buffer().is_empty() {
                    spin_until_readable(fd, SERVER_SPIN);
                }
                let Ok((id, msg)) = server_side.read(&mut r) else {
                    return;
                };
                let reply = agent
                    .dispatch(Role::Read, msg)
                    .unwrap_or_else(|(code, message)| Msg::Error { code, message });
                if server_side.write(&mut w, id, &reply).is_err() || w.flush().is_err() {
                    return;
                }
            }
        });
        let s = TcpStream::connect(addr).expect("connect");
        s.set_nodelay(true).expect("nodelay");
        Self {
            r: BufReader::new(s.try_clone().expect("clone")),
            w: BufWriter::new(s),
            framing: client_side,
            next_id: 1,
        }
    }

    fn send(&mut self, m: &Msg) -> u32 {
        let id = self.next_id;
        self.next_id += 1;
        self.framing.write(&mut self.w, id, m).expect("request");
        id
    }

    fn receive(&mut self) -> Vec<u8> {
        if self.r.buffer().is_empty() {
            spin_until_readable(self.r.get_ref().as_raw_fd(), CLIENT_SPIN);
        }
        match self.framing.read(&mut self.r).expect("reply").1 {
            Msg::ReadOk(b) => b,
            other => panic!("unexpected reply {other:?}"),
        }
    }

    /// One READ of `len` bytes at `offset` of `hook`, generation `g`.
    pub fn read(&mut self, g: u32, hook: u32, offset: u64, len: u32) -> Vec<u8> {
        self.send(&Msg::Read {
            generation: g,
            hook,
            offset,
            len,
        });
        self.w.flush().expect("flush");
        self.receive()
    }

    /// Reads `len` bytes of `hook` in 1-MiB READs, 4 in flight; GB/s.
    pub fn bulk_gbs(&mut self, g: u32, hook: u32, len: u64) -> f64 {
        const CHUNK: u64 = 1 << 20;
        let t = Instant::now();
        let (mut next, mut done, mut in_flight) = (0u64, 0u64, 0usize);
        while done < len {
            while next < len && in_flight < 4 {
                let n = (len - next).min(CHUNK);
                self.send(&Msg::Read {
                    generation: g,
                    hook,
                    offset: next,
                    len: u32::try_from(n).expect("chunk fits"),
                });
                next += n;
                in_flight += 1;
            }
            self.w.flush().expect("flush");
            done += self.receive().len() as u64;
            in_flight -= 1;
        }
        len as f64 / t.elapsed().as_secs_f64() / 1e9
    }
}

/// Encryption alone, on one core: `n` 1-MiB READ replies sealed by one
/// end of a channel and opened by the other, in GB/s.
pub fn seal_open_gbs(n: usize) -> f64 {
    let (mut monitor, mut agent) = channel_pair();
    let reply = Msg::ReadOk(vec![0x5a; 1 << 20]);
    let mut wire = Vec::with_capacity((1 << 20) + (1 << 16));
    let t = Instant::now();
    for _ in 0..n {
        wire.clear();
        agent.send(&mut wire, 1, &reply).expect("seal");
        std::hint::black_box(monitor.recv(&mut wire.as_slice()).expect("open"));
    }
    (n << 20) as f64 / t.elapsed().as_secs_f64() / 1e9
}
