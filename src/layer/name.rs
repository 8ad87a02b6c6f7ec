//! From a request key to a lock name: `namespace + separator + key`, with
//! the key escaped so that it can never reach another namespace's lock.

use std::sync::Arc;

use super::extract::KeyError;
use crate::sync::MAX_NAME_LEN;

/// Builds lock names inside one namespace.
#[derive(Debug, Clone)]
pub(crate) struct Namer {
    /// `namespace + separator`.
    prefix: String,
    /// The characters of the separator, escaped in keys.
    separator: Vec<char>,
    /// The ASCII bytes escaped in keys: `%` and the separator's.
    escaped_ascii: [bool; 128],
}

impl Namer {
    pub(crate) fn new(namespace: &str, separator: &str) -> Self {
        let mut escaped_ascii = [false; 128];
        for byte in separator.bytes().chain([b'%']) {
            if byte.is_ascii() {
                escaped_ascii[usize::from(byte)] = true;
            }
        }
        Namer {
            prefix: format!("{namespace}{separator}"),
            separator: separator.chars().collect(),
            escaped_ascii,
        }
    }

    /// The longest key, in bytes after escaping.
    pub(crate) fn max_key_len(&self) -> usize {
        MAX_NAME_LEN.saturating_sub(self.prefix.len())
    }

    /// The lock name of `key`. `%` and the separator's characters are
    /// percent-encoded, so distinct keys give distinct names and a key never
    /// adds a level to the name: with the separator `:`, the key `a:b` in
    /// namespace `n` is `n:a%3Ab`, which no key of namespace `n:a` can give.
    ///
    /// Built on the stack and allocated once, shared by the in-process line and
    /// the handler's [`HeldLock`](super::HeldLock).
    pub(crate) fn name(&self, key: &str) -> Result<Arc<str>, KeyError> {
        let max = self.max_key_len();
        if key.is_empty() {
            return Err(KeyError::Empty);
        }
        if key.len() > max {
            return Err(KeyError::TooLong {
                len: key.len(),
                max,
            });
        }
        // Each escaped byte becomes three: `%XX`.
        let escaped_bytes = if key.is_ascii() {
            let mut escaped = 0;
            for &byte in key.as_bytes() {
                if byte.is_ascii_control() {
                    return Err(KeyError::ControlCharacter);
                }
                escaped += usize::from(self.escaped_ascii[usize::from(byte)]);
            }
            escaped
        } else {
            if key.chars().any(char::is_control) {
                return Err(KeyError::ControlCharacter);
            }
            key.chars()
                .filter(|c| self.escapes(*c))
                .map(char::len_utf8)
                .sum()
        };
        let escaped = key.len() + 2 * escaped_bytes;
        if escaped > max {
            return Err(KeyError::TooLong { len: escaped, max });
        }
        let len = self.prefix.len() + escaped;
        if len <= SHORT {
            let mut name = [0; SHORT];
            self.write(key, escaped_bytes > 0, &mut name[..len]);
            Ok(Arc::from(as_str(&name[..len])))
        } else {
            let mut name = vec![0; len];
            self.write(key, escaped_bytes > 0, &mut name);
            Ok(Arc::from(as_str(&name)))
        }
    }

    /// Writes the name of `key` into `name`, exactly as long as it.
    fn write(&self, key: &str, escape: bool, name: &mut [u8]) {
        let (prefix, mut rest) = name.split_at_mut(self.prefix.len());
        prefix.copy_from_slice(self.prefix.as_bytes());
        if !escape {
            rest.copy_from_slice(key.as_bytes());
            return;
        }
        const HEX: &[u8; 16] = b"0123456789ABCDEF";
        for c in key.chars() {
            let mut utf8 = [0; 4];
            let bytes = c.encode_utf8(&mut utf8).as_bytes();
            if self.escapes(c) {
                for byte in bytes {
                    let (out, tail) = rest.split_at_mut(3);
                    out.copy_from_slice(&[
                        b'%',
                        HEX[usize::from(byte >> 4)],
                        HEX[usize::from(byte & 0xf)],
                    ]);
                    rest = tail;
                }
            } else {
                let (out, tail) = rest.split_at_mut(bytes.len());
                out.copy_from_slice(bytes);
                rest = tail;
            }
        }
    }

    fn escapes(&self, c: char) -> bool {
        c == '%' || self.separator.contains(&c)
    }
}

/// Names up to this long are built on the stack.
const SHORT: usize = 256;

fn as_str(name: &[u8]) -> &str {
    std::str::from_utf8(name).expect("whole UTF-8 strings and ASCII escapes")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_stay_inside_their_namespace() {
        let outer = Namer::new("n", ":");
        let inner = Namer::new("n:a", ":");
        assert_eq!(&*outer.name("a:b").unwrap(), "n:a%3Ab");
        assert_eq!(&*inner.name("b").unwrap(), "n:a:b");
        assert_eq!(&*outer.name("100%").unwrap(), "n:100%25");
        assert_ne!(outer.name("%3A").unwrap(), outer.name(":").unwrap());
        let multi = Namer::new("ns", "::");
        assert_eq!(&*multi.name("x::y").unwrap(), "ns::x%3A%3Ay");
        // Multi-byte separators are escaped byte by byte.
        let arrow = Namer::new("ns", "→");
        assert_eq!(&*arrow.name("a→b").unwrap(), "ns→a%E2%86%92b");
        assert_eq!(&*outer.name("é:ü").unwrap(), "n:é%3Aü");
        // Long names are built on the heap, the same way.
        let long = format!("{}:{}", "a".repeat(300), "b".repeat(300));
        let escaped = format!("n:{}%3A{}", "a".repeat(300), "b".repeat(300));
        assert_eq!(&*outer.name(&long).unwrap(), escaped);
        assert_eq!(
            &*outer.name(&"c".repeat(500)).unwrap(),
            format!("n:{}", "c".repeat(500))
        );
    }

    #[test]
    fn bad_keys_are_refused() {
        let namer = Namer::new("ns", ":");
        assert_eq!(namer.name(""), Err(KeyError::Empty));
        assert_eq!(namer.name("a\u{7}b"), Err(KeyError::ControlCharacter));
        assert_eq!(namer.name("a\u{7f}"), Err(KeyError::ControlCharacter));
        assert_eq!(namer.name("é\u{85}"), Err(KeyError::ControlCharacter));
        assert!(matches!(
            namer.name(&"k".repeat(2000)),
            Err(KeyError::TooLong { .. })
        ));
        let exact = "k".repeat(namer.max_key_len());
        assert!(namer.name(&exact).is_ok());
        // Escaping can push a key over the limit.
        let colons = ":".repeat(namer.max_key_len());
        assert!(matches!(namer.name(&colons), Err(KeyError::TooLong { .. })));
    }
}
