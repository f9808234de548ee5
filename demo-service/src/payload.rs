//! A session's continuation as it is stored in a record's payload
//! (format `bdkv/1`, text so that `bdctl extract` shows it as
//! `payload_text`):
//!
//! ```text
//! bdkv/1 applied=<commands applied> keys=<n>\n
//! <key> <value>\n        n lines, keys in ascending byte order
//! ```
//!
//! The record header carries the session id, the record version and, as
//! its stage, the same `applied` count: a reader checks the two agree.
//! Keys are 1 to [`MAX_KEY`] printable ASCII bytes without spaces; values
//! are 1 to [`MAX_VALUE`] bytes of UTF-8 without control characters.
//! The whole payload must fit one slot (slot size - 64 bytes).

use std::collections::BTreeMap;

/// The format tag and version of the first line.
pub const FORMAT: &str = "bdkv/1";
/// Longest key, in bytes.
pub const MAX_KEY: usize = 64;
/// Longest value, in bytes (the slot is usually the tighter bound).
pub const MAX_VALUE: usize = 2048;

/// A session's state.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct State {
    /// Mutating commands applied since the session began.
    pub applied: u32,
    /// The key-value map.
    pub map: BTreeMap<String, String>,
}

/// Why a payload is not a `bdkv/1` continuation.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PayloadError {
    /// Not UTF-8.
    #[error("not UTF-8 text")]
    NotText,
    /// The first line is not `bdkv/1 applied=N keys=N`.
    #[error("the first line is not \"{FORMAT} applied=N keys=N\"")]
    BadHeader,
    /// Another format or version.
    #[error("format {0:?} is not {FORMAT}")]
    Version(String),
    /// A bad entry line.
    #[error("entry {0}: not \"<key> <value>\" with a valid key and value")]
    BadEntry(usize),
    /// Keys out of order or repeated.
    #[error("entry {0}: keys are not in strictly ascending order")]
    Order(usize),
    /// Fewer or more entries than the header says.
    #[error("the header says {said} keys, the payload has {found}")]
    Count {
        /// Declared.
        said: usize,
        /// Present.
        found: usize,
    },
}

/// Whether `k` is a valid key.
pub fn valid_key(k: &str) -> bool {
    !k.is_empty() && k.len() <= MAX_KEY && k.bytes().all(|b| (0x21..0x7f).contains(&b))
}

/// Whether `v` is a valid value.
pub fn valid_value(v: &str) -> bool {
    !v.is_empty() && v.len() <= MAX_VALUE && !v.chars().any(char::is_control)
}

impl State {
    /// The payload bytes.
    pub fn encode(&self) -> Vec<u8> {
        let mut s = format!(
            "{FORMAT} applied={} keys={}\n",
            self.applied,
            self.map.len()
        );
        for (k, v) in &self.map {
            s.push_str(k);
            s.push(' ');
            s.push_str(v);
            s.push('\n');
        }
        s.into_bytes()
    }

    /// The length [`State::encode`] would produce, without building it.
    pub fn encoded_len(&self) -> usize {
        let head = format!(
            "{FORMAT} applied={} keys={}\n",
            self.applied,
            self.map.len()
        );
        head.len()
            + self
                .map
                .iter()
                .map(|(k, v)| k.len() + v.len() + 2)
                .sum::<usize>()
    }

    /// Parses a payload.
    pub fn decode(bytes: &[u8]) -> Result<Self, PayloadError> {
        let text = std::str::from_utf8(bytes).map_err(|_| PayloadError::NotText)?;
        let mut lines = text.split_terminator('\n');
        let head = lines.next().ok_or(PayloadError::BadHeader)?;
        let mut words = head.split(' ');
        let tag = words.next().unwrap_or("");
        if tag != FORMAT {
            return Err(if tag.starts_with("bdkv/") {
                PayloadError::Version(tag.to_owned())
            } else {
                PayloadError::BadHeader
            });
        }
        let mut field = |name: &str| {
            words
                .next()
                .and_then(|w| w.strip_prefix(name))
                .and_then(|n| n.parse::<u32>().ok())
                .ok_or(PayloadError::BadHeader)
        };
        let applied = field("applied=")?;
        let keys = field("keys=")? as usize;
        if words.next().is_some() {
            return Err(PayloadError::BadHeader);
        }
        let mut map = BTreeMap::new();
        let mut last: Option<&str> = None;
        for (i, line) in lines.enumerate() {
            let (k, v) = line.split_once(' ').ok_or(PayloadError::BadEntry(i))?;
            if !valid_key(k) || !valid_value(v) {
                return Err(PayloadError::BadEntry(i));
            }
            if last.is_some_and(|l| l >= k) {
                return Err(PayloadError::Order(i));
            }
            last = Some(k);
            map.insert(k.to_owned(), v.to_owned());
        }
        if map.len() != keys {
            return Err(PayloadError::Count {
                said: keys,
                found: map.len(),
            });
        }
        Ok(Self { applied, map })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn state(pairs: &[(&str, &str)], applied: u32) -> State {
        State {
            applied,
            map: pairs
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                .collect(),
        }
    }

    #[test]
    fn states_round_trip_and_length_is_exact() {
        for s in [
            state(&[], 0),
            state(&[("a", "1"), ("b", "two words"), ("z~", "ünï")], 9),
        ] {
            let b = s.encode();
            assert_eq!(b.len(), s.encoded_len());
            assert_eq!(State::decode(&b).unwrap(), s);
        }
        assert_eq!(
            state(&[("k", "v")], 3).encode(),
            b"bdkv/1 applied=3 keys=1\nk v\n"
        );
    }

    #[test]
    fn malformed_payloads_are_rejected_with_a_reason() {
        let cases: &[(&[u8], PayloadError)] = &[
            (b"\xff\xfe", PayloadError::NotText),
            (b"", PayloadError::BadHeader),
            (b"items=3 total=6", PayloadError::BadHeader),
            (
                b"bdkv/2 applied=1 keys=0\n",
                PayloadError::Version("bdkv/2".into()),
            ),
            (b"bdkv/1 applied=x keys=0\n", PayloadError::BadHeader),
            (b"bdkv/1 applied=1 keys=0 extra\n", PayloadError::BadHeader),
            (
                b"bdkv/1 applied=1 keys=1\nnovalue\n",
                PayloadError::BadEntry(0),
            ),
            (
                b"bdkv/1 applied=1 keys=1\nk \x07\n",
                PayloadError::BadEntry(0),
            ),
            (
                b"bdkv/1 applied=1 keys=2\nb 1\na 2\n",
                PayloadError::Order(1),
            ),
            (
                b"bdkv/1 applied=1 keys=2\na 1\n",
                PayloadError::Count { said: 2, found: 1 },
            ),
        ];
        for (bytes, want) in cases {
            assert_eq!(State::decode(bytes).as_ref(), Err(want), "{bytes:?}");
        }
    }

    #[test]
    fn key_and_value_rules() {
        assert!(valid_key("user:42"));
        assert!(!valid_key(""));
        assert!(!valid_key("a b"));
        assert!(!valid_key(&"k".repeat(MAX_KEY + 1)));
        assert!(valid_value("hello world"));
        assert!(!valid_value(""));
        assert!(!valid_value("a\tb"));
        assert!(!valid_value(&"v".repeat(MAX_VALUE + 1)));
    }
}
