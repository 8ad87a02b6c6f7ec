//! A stored first response, as bytes: what a retry gets back.
//!
//! The format is private to this crate and versioned by its first four
//! bytes; a record that does not parse is treated as absent (and logged),
//! never trusted.

use bytes::{BufMut, Bytes, BytesMut};
use http::{HeaderMap, HeaderName, HeaderValue, StatusCode};

/// The first bytes of every record, and its format's version.
const MAGIC: &[u8; 4] = b"DSR1";
const KEPT: u8 = 1;
const TOO_LARGE: u8 = 2;

/// What the first request with a key left.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Record {
    /// The fingerprint of the first request.
    pub(crate) fingerprint: u128,
    pub(crate) outcome: Outcome,
}

/// How the first request ended.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Outcome {
    /// Its response, whole.
    Kept(Box<Kept>),
    /// It completed, with this status, but its body was over the size
    /// limit: nothing to replay.
    TooLarge(StatusCode),
}

/// A response as it is replayed.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Kept {
    pub(crate) status: StatusCode,
    pub(crate) headers: HeaderMap,
    pub(crate) body: Bytes,
    pub(crate) trailers: Option<HeaderMap>,
}

impl Record {
    /// The record as bytes.
    pub(crate) fn encode(&self) -> Bytes {
        let mut out = BytesMut::with_capacity(64);
        out.put_slice(MAGIC);
        out.put_u128(self.fingerprint);
        match &self.outcome {
            Outcome::TooLarge(status) => {
                out.put_u8(TOO_LARGE);
                out.put_u16(status.as_u16());
            }
            Outcome::Kept(kept) => {
                out.put_u8(KEPT);
                out.put_u16(kept.status.as_u16());
                put_headers(&mut out, &kept.headers);
                put_bytes(&mut out, &kept.body);
                match &kept.trailers {
                    Some(trailers) => {
                        out.put_u8(1);
                        put_headers(&mut out, trailers);
                    }
                    None => out.put_u8(0),
                }
            }
        }
        out.freeze()
    }

    /// The record in `bytes`, or `None` if they are not one.
    pub(crate) fn decode(bytes: &Bytes) -> Option<Record> {
        let mut reader = Reader { bytes, at: 0 };
        if reader.take(4)? != &MAGIC[..] {
            return None;
        }
        let fingerprint = u128::from_be_bytes(reader.take(16)?.try_into().ok()?);
        let kind = reader.u8()?;
        let status = StatusCode::from_u16(reader.u16()?).ok()?;
        let outcome = match kind {
            TOO_LARGE => Outcome::TooLarge(status),
            KEPT => {
                let headers = reader.headers()?;
                let body = reader.bytes()?;
                let trailers = match reader.u8()? {
                    0 => None,
                    1 => Some(reader.headers()?),
                    _ => return None,
                };
                Outcome::Kept(Box::new(Kept {
                    status,
                    headers,
                    body,
                    trailers,
                }))
            }
            _ => return None,
        };
        (reader.at == bytes.len()).then_some(Record {
            fingerprint,
            outcome,
        })
    }
}

fn put_bytes(out: &mut BytesMut, bytes: &[u8]) {
    out.put_u32(u32::try_from(bytes.len()).expect("records are far below 4 GiB"));
    out.put_slice(bytes);
}

fn put_headers(out: &mut BytesMut, headers: &HeaderMap) {
    out.put_u32(u32::try_from(headers.len()).expect("fewer than 2^32 headers"));
    for (name, value) in headers {
        put_bytes(out, name.as_str().as_bytes());
        put_bytes(out, value.as_bytes());
    }
}

/// Reads a record, refusing anything out of bounds.
struct Reader<'a> {
    bytes: &'a Bytes,
    at: usize,
}

impl Reader<'_> {
    fn take(&mut self, n: usize) -> Option<&[u8]> {
        let end = self.at.checked_add(n)?;
        let taken = self.bytes.get(self.at..end)?;
        self.at = end;
        Some(taken)
    }

    fn u8(&mut self) -> Option<u8> {
        Some(self.take(1)?[0])
    }

    fn u16(&mut self) -> Option<u16> {
        Some(u16::from_be_bytes(self.take(2)?.try_into().ok()?))
    }

    fn u32(&mut self) -> Option<usize> {
        usize::try_from(u32::from_be_bytes(self.take(4)?.try_into().ok()?)).ok()
    }

    fn bytes(&mut self) -> Option<Bytes> {
        let len = self.u32()?;
        let start = self.at;
        self.take(len)?;
        Some(self.bytes.slice(start..start + len))
    }

    fn headers(&mut self) -> Option<HeaderMap> {
        let count = self.u32()?;
        // Each header takes at least 8 bytes: a count cannot ask for more
        // room than the record has.
        if count > self.bytes.len() / 8 {
            return None;
        }
        let mut headers = HeaderMap::with_capacity(count);
        for _ in 0..count {
            let name = HeaderName::from_bytes(&self.bytes()?).ok()?;
            let value = HeaderValue::from_maybe_shared(self.bytes()?).ok()?;
            headers.append(name, value);
        }
        Some(headers)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Record {
        let mut headers = HeaderMap::new();
        headers.insert("content-type", HeaderValue::from_static("application/json"));
        headers.append("set-cookie", HeaderValue::from_static("a=1"));
        headers.append("set-cookie", HeaderValue::from_static("b=2"));
        let mut trailers = HeaderMap::new();
        trailers.insert("grpc-status", HeaderValue::from_static("0"));
        Record {
            fingerprint: 0x0123_4567_89ab_cdef_0011_2233_4455_6677,
            outcome: Outcome::Kept(Box::new(Kept {
                status: StatusCode::CREATED,
                headers,
                body: Bytes::from_static(b"{\"charge\":\"ch_1\"}\x00\xff"),
                trailers: Some(trailers),
            })),
        }
    }

    #[test]
    fn records_round_trip() {
        let record = sample();
        assert_eq!(Record::decode(&record.encode()), Some(record));
        let too_large = Record {
            fingerprint: 7,
            outcome: Outcome::TooLarge(StatusCode::OK),
        };
        assert_eq!(Record::decode(&too_large.encode()), Some(too_large));
    }

    #[test]
    fn anything_else_is_no_record() {
        let bytes = sample().encode();
        // Every truncation, a trailing byte, and another magic.
        for len in 0..bytes.len() {
            assert_eq!(Record::decode(&bytes.slice(..len)), None, "cut at {len}");
        }
        let mut longer = bytes.to_vec();
        longer.push(0);
        assert_eq!(Record::decode(&longer.into()), None);
        let mut other = bytes.to_vec();
        other[3] = b'9';
        assert_eq!(Record::decode(&other.into()), None);
        // A header count far beyond the record's size.
        let mut huge = BytesMut::new();
        huge.put_slice(MAGIC);
        huge.put_u128(1);
        huge.put_u8(KEPT);
        huge.put_u16(200);
        huge.put_u32(u32::MAX);
        assert_eq!(Record::decode(&huge.freeze()), None);
        assert_eq!(Record::decode(&Bytes::from_static(b"garbage")), None);
    }
}
