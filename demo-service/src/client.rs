//! Client modes for scripts (a busybox shell has no good TCP client):
//! `client` sends request lines and prints the replies; `load` creates
//! sessions and fills them; `check` resumes them and verifies every key.

use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

/// Client-side failures.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// Network.
    #[error("{addr}")]
    Io {
        /// The server.
        addr: SocketAddr,
        /// Why.
        source: std::io::Error,
    },
    /// The server said something unexpected.
    #[error("{0}")]
    Protocol(String),
    /// A check failed.
    #[error("check failed: {0}")]
    Check(String),
}

/// One connection.
#[derive(Debug)]
pub struct Connection {
    addr: SocketAddr,
    reader: BufReader<TcpStream>,
    writer: TcpStream,
}

impl Connection {
    /// Connects (IP address only: no name resolution, for static builds).
    pub fn open(addr: SocketAddr) -> Result<Self, ClientError> {
        let io = |source| ClientError::Io { addr, source };
        let s = TcpStream::connect_timeout(&addr, Duration::from_secs(5)).map_err(io)?;
        s.set_read_timeout(Some(Duration::from_secs(30)))
            .map_err(io)?;
        Ok(Self {
            addr,
            reader: BufReader::new(s.try_clone().map_err(io)?),
            writer: s,
        })
    }

    /// Sends one request and returns its reply lines (LIST's included).
    pub fn request(&mut self, line: &str) -> Result<Vec<String>, ClientError> {
        let io = |source| ClientError::Io {
            addr: self.addr,
            source,
        };
        self.writer
            .write_all(format!("{line}\n").as_bytes())
            .map_err(io)?;
        let first = self.line()?;
        let mut out = vec![first.clone()];
        let is_list = line.trim().eq_ignore_ascii_case("LIST");
        if let (true, Some(n)) = (is_list, first.strip_prefix("OK ")) {
            let n: usize = n
                .parse()
                .map_err(|_| ClientError::Protocol(format!("bad LIST reply {first:?}")))?;
            for _ in 0..n {
                out.push(self.line()?);
            }
        }
        Ok(out)
    }

    fn line(&mut self) -> Result<String, ClientError> {
        let mut s = String::new();
        let n = self
            .reader
            .read_line(&mut s)
            .map_err(|source| ClientError::Io {
                addr: self.addr,
                source,
            })?;
        if n == 0 {
            return Err(ClientError::Protocol(
                "the server closed the connection".into(),
            ));
        }
        Ok(s.trim_end_matches(['\n', '\r']).to_owned())
    }

    /// Sends `line` and expects `OK`; returns the rest of the first line.
    pub fn ok(&mut self, line: &str) -> Result<String, ClientError> {
        let reply = self.request(line)?;
        reply[0]
            .strip_prefix("OK")
            .map(|r| r.trim_start().to_owned())
            .ok_or_else(|| ClientError::Protocol(format!("{line:?}: {}", reply[0])))
    }
}

/// `bdkv client`: each input line is sent, each reply printed. Exit
/// status: 0 if every reply was OK, 1 otherwise (or if the server left).
pub fn script(
    addr: SocketAddr,
    input: impl BufRead,
    out: &mut impl Write,
) -> Result<bool, ClientError> {
    let mut c = Connection::open(addr)?;
    let mut all_ok = true;
    for line in input.lines() {
        let line = line.map_err(|source| ClientError::Io { addr, source })?;
        if line.trim().is_empty() || line.starts_with('#') {
            continue;
        }
        let reply = c.request(&line)?;
        all_ok &= reply[0].starts_with("OK");
        for r in &reply {
            writeln!(out, "{r}").map_err(|source| ClientError::Io { addr, source })?;
        }
        let verb = line.split_whitespace().next().unwrap_or("");
        if verb.eq_ignore_ascii_case("QUIT") || verb.eq_ignore_ascii_case("END") {
            break;
        }
    }
    Ok(all_ok)
}

/// The value `load` gives key `k<j>` of session `id`.
pub fn value(id: u64, j: u32) -> String {
    format!("v{j}-of-{id}")
}

/// `bdkv load`: `sessions` new sessions, each with `commands` SETs
/// (`k<j> v<j>-of-<id>`); prints `<id> <version> <commands>` per session.
pub fn load(
    addr: SocketAddr,
    sessions: u32,
    commands: u32,
    out: &mut impl Write,
) -> Result<(), ClientError> {
    for _ in 0..sessions {
        let mut c = Connection::open(addr)?;
        let hello = c.ok("HELLO")?;
        let id: u64 = hello
            .strip_prefix("session ")
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| ClientError::Protocol(format!("bad HELLO reply {hello:?}")))?;
        let mut version = 1;
        for j in 0..commands {
            let r = c.ok(&format!("SET k{j} {}", value(id, j)))?;
            version = r
                .strip_prefix("version ")
                .and_then(|v| v.parse().ok())
                .ok_or_else(|| ClientError::Protocol(format!("bad SET reply {r:?}")))?;
        }
        c.ok("QUIT")?;
        writeln!(out, "{id} {version} {commands}")
            .map_err(|source| ClientError::Io { addr, source })?;
    }
    Ok(())
}

/// `bdkv check`: for each `<id> <version> <commands>` line (`load`'s
/// output), resumes the session and checks its version and every key.
pub fn check(
    addr: SocketAddr,
    expect: impl BufRead,
    out: &mut impl Write,
) -> Result<usize, ClientError> {
    let mut checked = 0;
    for line in expect.lines() {
        let line = line.map_err(|source| ClientError::Io { addr, source })?;
        let nums: Vec<u64> = line
            .split_whitespace()
            .map(str::parse)
            .collect::<Result<_, _>>()
            .map_err(|_| ClientError::Check(format!("bad expectation line {line:?}")))?;
        let [id, version, commands] = nums[..] else {
            if line.trim().is_empty() {
                continue;
            }
            return Err(ClientError::Check(format!("bad expectation line {line:?}")));
        };
        let mut c = Connection::open(addr)?;
        let r = c.ok(&format!("RESUME {id}"))?;
        let want = format!("session {id} version {version} keys {commands}");
        if r != want {
            return Err(ClientError::Check(format!(
                "RESUME {id}: got {r:?}, want {want:?}"
            )));
        }
        for j in 0..u32::try_from(commands).unwrap_or(u32::MAX) {
            let got = c.ok(&format!("GET k{j}"))?;
            if got != value(id, j) {
                return Err(ClientError::Check(format!("session {id} k{j} = {got:?}")));
            }
        }
        c.ok("QUIT")?;
        writeln!(out, "session {id}: version {version}, {commands} keys: ok")
            .map_err(|source| ClientError::Io { addr, source })?;
        checked += 1;
    }
    Ok(checked)
}
