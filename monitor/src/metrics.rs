//! Prometheus metrics over HTTP (`bdctl watch --metrics ADDR`): the watch
//! loop renders the exposition text after each round; a small server
//! thread answers `GET /metrics` with the latest one.

use std::io::{BufRead, BufReader, Write};
use std::net::TcpListener;
use std::sync::{Arc, Mutex};

/// The latest exposition text.
#[derive(Debug, Default, Clone)]
pub struct Exposition(Arc<Mutex<String>>);

impl Exposition {
    /// Replaces the text.
    pub fn set(&self, text: String) {
        *self.0.lock().unwrap_or_else(|p| p.into_inner()) = text;
    }

    fn get(&self) -> String {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }
}

/// Serves `exposition` on `addr` from a thread; returns the bound address.
pub fn serve(addr: &str, exposition: Exposition) -> std::io::Result<std::net::SocketAddr> {
    let listener = TcpListener::bind(addr)?;
    let bound = listener.local_addr()?;
    std::thread::Builder::new().name("bdctl-metrics".into()).spawn(move || {
        for stream in listener.incoming().flatten() {
            let _ = stream.set_read_timeout(Some(std::time::Duration::from_secs(2)));
            let mut line = String::new();
            let mut reader = BufReader::new(&stream);
            if reader.read_line(&mut line).is_err() {
                continue;
            }
            // Drain the request headers.
            let mut h = String::new();
            while reader.read_line(&mut h).is_ok_and(|n| n > 2) {
                h.clear();
            }
            let (status, body) = if line.starts_with("GET /metrics") {
                ("200 OK", exposition.get())
            } else {
                ("404 Not Found", "try /metrics\n".to_owned())
            };
            let mut s = &stream;
            let _ = write!(
                s,
                "HTTP/1.1 {status}\r\nContent-Type: text/plain; version=0.0.4\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            );
        }
    })?;
    Ok(bound)
}

/// Escapes a label value.
pub fn label(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}
