//! What the frame tags cost (docs/wire.md "Frame authentication"): one
//! request loop run twice in the same process, once with every frame
//! tagged and checked (`write_sealed` / `read_sealed`, as the agent and
//! the client do) and once plain (`write_msg` / `read_msg`), over the same
//! agent's `dispatch`, the same loopback socket set-up and the same
//! busy-polling. Nothing else differs, so the difference is the tags.

use std::io::{BufReader, BufWriter, Write};
use std::net::{TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::time::{Duration, Instant};

use backdoor_agent::wire::{
    read_msg, read_sealed, spin_until_readable, write_msg, write_sealed, FrameKey, Msg, WireError,
};
use backdoor_agent::{Agent, Role};

/// The agent's and the client's busy-poll windows (their defaults).
const SERVER_SPIN: Duration = Duration::from_micros(50);
const CLIENT_SPIN: Duration = Duration::from_micros(200);

/// One direction's framing: plain, or tagged under a key.
#[derive(Debug)]
enum Framing {
    Plain,
    Tagged(FrameKey),
}

impl Framing {
    fn new(tagged: bool, key: u8) -> Self {
        if tagged {
            Self::Tagged(FrameKey::new([key; 32]))
        } else {
            Self::Plain
        }
    }

    fn write(&mut self, w: &mut impl Write, id: u32, m: &Msg) -> Result<(), WireError> {
        match self {
            Self::Plain => write_msg(w, id, m),
            Self::Tagged(k) => write_sealed(w, id, m, k),
        }
    }

    fn read(&mut self, r: &mut impl std::io::Read) -> Result<(u32, Msg), WireError> {
        match self {
            Self::Plain => read_msg(r),
            Self::Tagged(k) => read_sealed(r, k),
        }
    }
}

/// A client of a request loop on its own thread.
#[derive(Debug)]
pub struct Loop {
    r: BufReader<TcpStream>,
    w: BufWriter<TcpStream>,
    send: Framing,
    recv: Framing,
    next_id: u32,
}

impl Loop {
    /// Starts the server side (answering with `agent`'s dispatch, read
    /// role) and connects to it.
    pub fn start(agent: Arc<Agent>, tagged: bool) -> Self {
        let l = TcpListener::bind("127.0.0.1:0").expect("bind loopback");
        let addr = l.local_addr().expect("address");
        std::thread::spawn(move || {
            let (s, _) = l.accept().expect("accept");
            s.set_nodelay(true).expect("nodelay");
            let fd = s.as_raw_fd();
            let mut r = BufReader::new(s.try_clone().expect("clone"));
            let mut w = BufWriter::new(s);
            let (mut recv, mut send) = (Framing::new(tagged, 1), Framing::new(tagged, 2));
            loop {
                if r.buffer().is_empty() {
                    spin_until_readable(fd, SERVER_SPIN);
                }
                let Ok((id, msg)) = recv.read(&mut r) else {
                    return;
                };
                let reply = agent
                    .dispatch(Role::Read, msg)
                    .unwrap_or_else(|(code, message)| Msg::Error { code, message });
                if send.write(&mut w, id, &reply).is_err() || w.flush().is_err() {
                    return;
                }
            }
        });
        let s = TcpStream::connect(addr).expect("connect");
        s.set_nodelay(true).expect("nodelay");
        Self {
            r: BufReader::new(s.try_clone().expect("clone")),
            w: BufWriter::new(s),
            send: Framing::new(tagged, 1),
            recv: Framing::new(tagged, 2),
            next_id: 1,
        }
    }

    fn send(&mut self, m: &Msg) -> u32 {
        let id = self.next_id;
        self.next_id += 1;
        self.send.write(&mut self.w, id, m).expect("request");
        id
    }

    fn receive(&mut self) -> Vec<u8> {
        if self.r.buffer().is_empty() {
            spin_until_readable(self.r.get_ref().as_raw_fd(), CLIENT_SPIN);
        }
        match self.recv.read(&mut self.r).expect("reply").1 {
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

/// Tagging throughput alone: `n` tags of `len`-byte payloads, in GB/s.
pub fn tag_gbs(len: usize, n: usize) -> f64 {
    let mut key = FrameKey::new([3; 32]);
    let mut frame = vec![0x5au8; 16 + len];
    frame[..4].copy_from_slice(&backdoor_agent::wire::MAGIC.to_le_bytes());
    let t = Instant::now();
    for _ in 0..n {
        std::hint::black_box(key.seal_raw(std::hint::black_box(&frame)));
    }
    (len * n) as f64 / t.elapsed().as_secs_f64() / 1e9
}
