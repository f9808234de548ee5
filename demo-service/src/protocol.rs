//! The line protocol: one request per line (LF or CRLF), one reply line
//! starting `OK` or `ERR` (LIST adds one line per key). Verbs are
//! case-insensitive.
//!
//! | request | reply |
//! |---|---|
//! | `HELLO` | `OK session <id>`: a new session |
//! | `RESUME <id>` | `OK session <id> version <v> keys <n>`: continue a session |
//! | `SET <key> <value>` | `OK version <v>` (value: the rest of the line) |
//! | `GET <key>` | `OK <value>` or `ERR no key <key>` |
//! | `DEL <key>` | `OK version <v>` or `ERR no key <key>` |
//! | `LIST` | `OK <n>`, then n lines `<key> <value>` |
//! | `INFO` | `OK session <id> version <v> applied <a> keys <n> bytes <used> max <max>` |
//! | `PING` | `OK pong` (needs no session) |
//! | `QUIT` | `OK bye`; the session stays resumable |
//! | `END` | `OK ended <id>`; the session and its records are gone |

use crate::payload::{valid_key, valid_value, MAX_KEY, MAX_VALUE};

/// Longest request line, in bytes.
pub const MAX_LINE: usize = 4096;

/// A parsed request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Request {
    /// Start a new session.
    Hello,
    /// Continue session `id`.
    Resume(u64),
    /// Set a key.
    Set(String, String),
    /// Read a key.
    Get(String),
    /// Delete a key.
    Del(String),
    /// Every key.
    List,
    /// The session's numbers.
    Info,
    /// Liveness.
    Ping,
    /// Leave, keeping the session.
    Quit,
    /// End the session for good.
    End,
}

impl Request {
    /// Whether it changes the session's state (and so writes a record).
    pub fn mutates(&self) -> bool {
        matches!(self, Self::Set(..) | Self::Del(_))
    }
}

/// Parses one request line (without its line ending); the error is the
/// text of the `ERR` reply.
pub fn parse(line: &str) -> Result<Request, String> {
    let line = line.trim_end_matches(['\r', '\n']);
    let (verb, rest) = line.split_once(' ').unwrap_or((line, ""));
    let key = |k: &str| {
        if valid_key(k) {
            Ok(k.to_owned())
        } else {
            Err(format!(
                "bad key {k:?}: 1 to {MAX_KEY} printable characters, no spaces"
            ))
        }
    };
    let none = |r: Request| {
        if rest.is_empty() {
            Ok(r)
        } else {
            Err(format!("{} takes no arguments", verb.to_uppercase()))
        }
    };
    match verb.to_ascii_uppercase().as_str() {
        "HELLO" => none(Request::Hello),
        "RESUME" => rest
            .parse::<u64>()
            .ok()
            .filter(|&id| id != 0)
            .map(Request::Resume)
            .ok_or_else(|| format!("usage: RESUME <session id>, not {rest:?}")),
        "SET" => {
            let (k, v) = rest.split_once(' ').ok_or("usage: SET <key> <value>")?;
            if !valid_value(v) {
                return Err(format!(
                    "bad value: 1 to {MAX_VALUE} bytes without control characters"
                ));
            }
            Ok(Request::Set(key(k)?, v.to_owned()))
        }
        "GET" => key(rest).map(Request::Get),
        "DEL" => key(rest).map(Request::Del),
        "LIST" => none(Request::List),
        "INFO" => none(Request::Info),
        "PING" => none(Request::Ping),
        "QUIT" => none(Request::Quit),
        "END" => none(Request::End),
        "" => Err("empty request".into()),
        _ => Err(format!(
            "unknown command {verb:?} (HELLO, RESUME, SET, GET, DEL, LIST, INFO, PING, QUIT, END)"
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_parse() {
        assert_eq!(parse("HELLO"), Ok(Request::Hello));
        assert_eq!(parse("resume 42\r"), Ok(Request::Resume(42)));
        assert_eq!(
            parse("SET name Ada Lovelace"),
            Ok(Request::Set("name".into(), "Ada Lovelace".into()))
        );
        assert_eq!(parse("get name"), Ok(Request::Get("name".into())));
        assert_eq!(parse("DEL name"), Ok(Request::Del("name".into())));
        assert_eq!(parse("LIST"), Ok(Request::List));
        assert!(Request::Set("a".into(), "b".into()).mutates());
        assert!(!Request::Get("a".into()).mutates());
    }

    #[test]
    fn bad_requests_say_why() {
        for (line, why) in [
            ("FROB x", "unknown command"),
            ("", "empty request"),
            ("RESUME", "usage: RESUME"),
            ("RESUME 0", "usage: RESUME"),
            ("RESUME -1", "usage: RESUME"),
            ("SET k", "usage: SET"),
            ("SET k \u{7}", "bad value"),
            ("GET", "bad key"),
            ("GET a b", "bad key"),
            ("LIST all", "takes no arguments"),
        ] {
            let e = parse(line).unwrap_err();
            assert!(e.contains(why), "{line:?}: {e}");
        }
        let long = format!("SET k {}", "v".repeat(MAX_VALUE + 1));
        assert!(parse(&long).unwrap_err().contains("bad value"));
    }
}
