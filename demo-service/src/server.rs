//! The TCP server: an accept thread, one thread per connection, and the
//! main loop, which bumps the APPLICATION counter every tick, touches the
//! session table (so a wedged table stops the counter) and adopts what
//! arrives in the inbox. Bad requests get `ERR` and the connection goes
//! on; nothing a client sends stops the server.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use backdoor_guest::{Counter, Inbox};

use crate::adopt;
use crate::protocol::{parse, Request, MAX_LINE};
use crate::store::{Mutation, Store};

/// Most connections served at once.
pub const MAX_CONNECTIONS: usize = 64;

/// The session table, shared by every connection.
pub type Shared = Arc<Mutex<Store>>;

fn lock(s: &Shared) -> MutexGuard<'_, Store> {
    // A panicking connection thread must not take the others down.
    s.lock().unwrap_or_else(|e| e.into_inner())
}

/// Serves forever: connections on `listener`, ticks in the caller's thread.
pub fn run(
    store: Shared,
    listener: TcpListener,
    app: Counter,
    inbox: Option<(Inbox, backdoor_guest::FenceBook)>,
    tick: Duration,
) -> std::io::Result<()> {
    let live = Arc::new(AtomicUsize::new(0));
    {
        let store = store.clone();
        std::thread::Builder::new()
            .name("accept".into())
            .spawn(move || accept_loop(&listener, &store, &live))?;
    }
    let mut inbox = inbox;
    let mut seen = inbox.as_ref().map_or(0, |(i, _)| i.delivered());
    loop {
        app.bump();
        let n = lock(&store).len();
        if let Some((inbox, fences)) = &mut inbox {
            let bell = inbox.delivered();
            if bell != seen {
                seen = bell;
                let r = adopt::from_inbox(&mut lock(&store), inbox, fences);
                tracing::info!(
                    "inbox: doorbell {bell}: {} new, {} updated, {} already held, {} rejected, {} of other services, {} hand-overs fenced off",
                    r.new, r.updated, r.current, r.rejected, r.foreign, r.fenced
                );
            }
        }
        tracing::trace!("tick: {n} sessions");
        std::thread::sleep(tick);
    }
}

fn accept_loop(listener: &TcpListener, store: &Shared, live: &Arc<AtomicUsize>) {
    for stream in listener.incoming() {
        let mut stream = match stream {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!("accept: {e}");
                std::thread::sleep(Duration::from_millis(50));
                continue;
            }
        };
        if live.fetch_add(1, Ordering::SeqCst) >= MAX_CONNECTIONS {
            live.fetch_sub(1, Ordering::SeqCst);
            let _ = stream.write_all(b"ERR busy: too many connections\n");
            continue;
        }
        let (store, live) = (store.clone(), live.clone());
        let spawned = std::thread::Builder::new()
            .name("conn".into())
            .spawn(move || {
                let peer = stream
                    .peer_addr()
                    .map(|a| a.to_string())
                    .unwrap_or_default();
                if let Err(e) = serve_connection(&stream, &store) {
                    tracing::debug!("{peer}: {e}");
                }
                live.fetch_sub(1, Ordering::SeqCst);
            });
        if let Err(e) = spawned {
            tracing::warn!("cannot start a connection thread: {e}");
        }
    }
}

/// Reads one line of at most [`MAX_LINE`] bytes. `Ok(None)`: end of input;
/// `Ok(Some(Err(())))`: the line was too long (and has been skipped).
fn read_line(r: &mut impl BufRead, buf: &mut Vec<u8>) -> std::io::Result<Option<Result<(), ()>>> {
    buf.clear();
    let limit = u64::try_from(MAX_LINE + 1).unwrap_or(u64::MAX);
    let n = r.by_ref().take(limit).read_until(b'\n', buf)?;
    if n == 0 {
        return Ok(None);
    }
    if buf.last() == Some(&b'\n') || buf.len() <= MAX_LINE {
        return Ok(Some(Ok(())));
    }
    // Too long: skip to the end of the line, in bounded pieces.
    loop {
        buf.clear();
        let n = r.by_ref().take(limit).read_until(b'\n', buf)?;
        if n == 0 || buf.last() == Some(&b'\n') {
            return Ok(Some(Err(())));
        }
    }
}

/// The state of one connection.
struct Conn<'a> {
    store: &'a Shared,
    session: Option<u64>,
}

impl Conn<'_> {
    fn session(&self) -> Result<u64, String> {
        self.session
            .ok_or_else(|| "no session: send HELLO or RESUME <id> first".to_owned())
    }

    /// Runs one request: the reply lines, and whether to close.
    fn execute(&mut self, req: Request) -> Result<(String, bool), String> {
        let mut store = lock(self.store);
        let e = |e: crate::store::StoreError| backdoor_abi::ErrorChain(&e).to_string();
        Ok(match req {
            Request::Ping => ("OK pong".into(), false),
            Request::Hello | Request::Resume(_) if self.session.is_some() => {
                return Err(format!(
                    "already in session {}",
                    self.session.unwrap_or_default()
                ))
            }
            Request::Hello => {
                let id = store.create().map_err(e)?;
                self.session = Some(id);
                (format!("OK session {id}"), false)
            }
            Request::Resume(id) => {
                let info = store.attach(id).map_err(e)?;
                self.session = Some(id);
                (
                    format!(
                        "OK session {id} version {} keys {}",
                        info.version, info.keys
                    ),
                    false,
                )
            }
            Request::Set(k, v) => {
                let v = store
                    .apply(self.session()?, Mutation::Set(k, v))
                    .map_err(e)?;
                (format!("OK version {v}"), false)
            }
            Request::Del(k) => {
                let v = store.apply(self.session()?, Mutation::Del(k)).map_err(e)?;
                (format!("OK version {v}"), false)
            }
            Request::Get(k) => match store.get(self.session()?, &k).map_err(e)? {
                Some(v) => (format!("OK {v}"), false),
                None => return Err(format!("no key {k}")),
            },
            Request::List => {
                let all = store.list(self.session()?).map_err(e)?;
                let mut out = format!("OK {}", all.len());
                for (k, v) in all {
                    out.push('\n');
                    out.push_str(&k);
                    out.push(' ');
                    out.push_str(&v);
                }
                (out, false)
            }
            Request::Info => {
                let id = self.session()?;
                let i = store.info(id).map_err(e)?;
                (
                    format!(
                        "OK session {id} version {} applied {} keys {} bytes {} max {}",
                        i.version, i.applied, i.keys, i.bytes, i.max
                    ),
                    false,
                )
            }
            Request::Quit => {
                // Detached before the reply: a client that has read "bye"
                // may resume the session elsewhere at once.
                if let Some(id) = self.session.take() {
                    store.detach(id);
                }
                ("OK bye".into(), true)
            }
            Request::End => {
                let id = self.session()?;
                store.end(id).map_err(e)?;
                self.session = None;
                (format!("OK ended {id}"), true)
            }
        })
    }
}

fn serve_connection(stream: &TcpStream, store: &Shared) -> std::io::Result<()> {
    let mut reader = BufReader::new(stream);
    let mut out = stream;
    let mut conn = Conn {
        store,
        session: None,
    };
    let mut buf = Vec::new();
    let result = loop {
        // Nothing buffered: we are about to wait for the client, so the
        // session's counter goes idle (an idle session is never "hung").
        if reader.buffer().is_empty() {
            if let Some(id) = conn.session {
                lock(store).set_idle(id, true);
            }
        }
        let line = match read_line(&mut reader, &mut buf) {
            Ok(None) => break Ok(()),
            Ok(Some(Err(()))) => {
                out.write_all(
                    format!("ERR line too long (at most {MAX_LINE} bytes)\n").as_bytes(),
                )?;
                continue;
            }
            Ok(Some(Ok(()))) => buf.as_slice(),
            Err(e) => break Err(e),
        };
        if let Some(id) = conn.session {
            lock(store).set_idle(id, false);
        }
        let reply = match std::str::from_utf8(line) {
            Err(_) => Err("the request is not UTF-8".to_owned()),
            Ok(text) => parse(text.trim_end_matches(['\n', '\r'])).and_then(|r| conn.execute(r)),
        };
        let (text, close) = reply.unwrap_or_else(|e| (format!("ERR {e}"), false));
        if let Err(e) = out.write_all(format!("{text}\n").as_bytes()) {
            break Err(e);
        }
        if close {
            break Ok(());
        }
    };
    if let Some(id) = conn.session {
        lock(store).detach(id);
    }
    result
}
