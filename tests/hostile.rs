//! Hostile keys: arbitrary bytes in headers, paths and gRPC metadata,
//! separator injection, unicode, control characters and 1 MB keys, through
//! the public extractors and a `DistLockLayer` over `MemorySync` (and one
//! real Redis node). Every request ends in a lock on a name inside its
//! namespace or in a 400 (`INVALID_ARGUMENT` for gRPC), never in a panic or
//! a hang; distinct keys get distinct names, and no key of one namespace
//! reaches another namespace's lock.
//!
//! The property tests run on proptest's `TestRunner` with a tokio runtime
//! per test; a failure prints the smallest input that breaks the property.

mod conformance;
mod support;

use std::cell::RefCell;
use std::collections::HashMap;
use std::convert::Infallible;
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderValue, Request, Response, StatusCode, Uri};
use http_body_util::{BodyExt, Full};
use proptest::collection::vec;
use proptest::prelude::*;
use proptest::sample::select;
use proptest::test_runner::{Config, TestCaseError, TestRunner};
use support::counting::Counting;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tower::{Service, ServiceBuilder, ServiceExt};
use tower_dsync::layer::{
    DistLockLayer, GrpcMetadataKey, HeaderKey, HeldLock, KeyError, KeyExtractor, LockBody,
    MissingKey, PathSegment, try_key_fn,
};
use tower_dsync::{DistMutex, DistMutexOptions, DistSync, MAX_NAME_LEN, MemorySync, RedisSync};

/// The namespace under test.
const NS: &str = "tenant-a";
/// A namespace nested in [`NS`]: what separator injection would aim at.
const INNER: &str = "tenant-a:x";
/// The header (and gRPC metadata entry) that carries the key.
const HEADER: &str = "x-lock-key";
/// Cases per property.
const CASES: u32 = 512;
/// Safety net around one case: a hang fails the test instead of stalling CI.
const CASE_BOUND: Duration = Duration::from_secs(60);

type Svc = tower::util::BoxCloneService<Request<()>, Response<LockBody<String>>, Infallible>;

/// Answers with the lock name, and hands the `HeldLock` back in the
/// response extensions so the test can wait for its release.
async fn handler(request: Request<()>) -> Result<Response<String>, Infallible> {
    let held = request.extensions().get::<HeldLock>().cloned();
    let mut response = Response::new(held.as_ref().map_or("", |h| h.name()).to_owned());
    if let Some(held) = held {
        response.extensions_mut().insert(held);
    }
    Ok(response)
}

/// A layer on `sync` in `namespace` that fails fast and rejects requests
/// without a key, around [`handler`].
fn service<K: KeyExtractor<()>>(sync: &Counting<MemorySync>, namespace: &str, key: K) -> Svc {
    let layer = DistLockLayer::builder(sync.clone(), key)
        .namespace(namespace)
        .wait(Duration::ZERO)
        .on_missing_key(MissingKey::Reject)
        .build()
        .expect("a valid layer");
    Svc::new(ServiceBuilder::new().layer(layer).service_fn(handler))
}

/// What one request came to.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Outcome {
    /// Served under a lock of this name, which was released afterwards.
    Locked(String),
    /// Rejected as a bad key: 400, or `INVALID_ARGUMENT` for gRPC.
    Refused,
}

/// Sends `request` through `service`, reads the whole response and, when a
/// lock was held, waits until the layer released it (the extend loop ran to its
/// end). Any other response fails the case.
async fn send(service: &Svc, request: Request<()>) -> Result<Outcome, TestCaseError> {
    let grpc = request.headers().contains_key(http::header::CONTENT_TYPE);
    let response = service.clone().oneshot(request).await.unwrap();
    let status = response.status();
    let grpc_status = response.headers().get("grpc-status").cloned();
    let held = response.extensions().get::<HeldLock>().cloned();
    let body = response.into_body().collect().await.unwrap().to_bytes();
    match held {
        Some(held) => {
            prop_assert_eq!(status, StatusCode::OK);
            prop_assert_eq!(&body[..], held.name().as_bytes());
            held.lost().await;
            prop_assert!(!held.is_lost(), "released, not lost");
            Ok(Outcome::Locked(held.name().to_owned()))
        }
        None if grpc => {
            prop_assert_eq!(status, StatusCode::OK, "trailers-only");
            prop_assert_eq!(grpc_status, Some(HeaderValue::from_static("3")));
            Ok(Outcome::Refused)
        }
        None => {
            prop_assert_eq!(status, StatusCode::BAD_REQUEST);
            Ok(Outcome::Refused)
        }
    }
}

/// The length of `key` once `%` and `:` are percent-encoded.
fn escaped_len(key: &str) -> usize {
    key.chars()
        .map(|c| {
            if c == '%' || c == ':' {
                3
            } else {
                c.len_utf8()
            }
        })
        .sum()
}

/// Whether the layer must accept `key` in `namespace`: not empty, no
/// control character, and a name of at most `MAX_NAME_LEN` bytes.
fn acceptable(namespace: &str, key: &str) -> bool {
    !key.is_empty()
        && !key.chars().any(char::is_control)
        && namespace.len() + 1 + escaped_len(key) <= MAX_NAME_LEN
}

/// The key a lock name of `namespace` was made from: the rest of the name
/// after `namespace + ":"` must hold no separator and decode (`%XX`, every
/// `%` escaped) back to text. `None` if the name is not such a name.
fn key_of(name: &str, namespace: &str) -> Option<String> {
    let escaped = name.strip_prefix(namespace)?.strip_prefix(':')?;
    if escaped.contains(':') {
        return None;
    }
    let bytes = escaped.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = std::str::from_utf8(bytes.get(i + 1..i + 3)?).ok()?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

/// Every name seen so far in each namespace, with the key it came from.
#[derive(Default)]
struct Names {
    by_namespace: HashMap<&'static str, HashMap<String, String>>,
}

impl Names {
    /// Checks one outcome for the key the extractor produced, and records
    /// the name: a lock on a name inside `namespace` that decodes back to
    /// the key and no other key had, or a 400 exactly when the key breaks
    /// the rules.
    fn check(
        &mut self,
        namespace: &'static str,
        extracted: &Result<Option<String>, KeyError>,
        outcome: &Outcome,
    ) -> Result<(), TestCaseError> {
        let key = match extracted {
            Ok(Some(key)) => key,
            Ok(None) | Err(_) => {
                prop_assert_eq!(outcome, &Outcome::Refused, "{:?}", extracted);
                return Ok(());
            }
        };
        if !acceptable(namespace, key) {
            prop_assert_eq!(outcome, &Outcome::Refused, "{:?} must be refused", key);
            return Ok(());
        }
        let Outcome::Locked(name) = outcome else {
            return Err(TestCaseError::fail(format!("{key:?} was refused")));
        };
        prop_assert!(name.len() <= MAX_NAME_LEN);
        let decoded = key_of(name, namespace);
        prop_assert_eq!(decoded.as_ref(), Some(key), "{}", name);
        let names = self.by_namespace.entry(namespace).or_default();
        if let Some(other) = names.insert(name.clone(), key.clone()) {
            prop_assert_eq!(&other, key, "two keys share the name {}", name);
        }
        Ok(())
    }

    /// No name is in two namespaces.
    fn assert_disjoint(&self) {
        let spaces: Vec<_> = self.by_namespace.iter().collect();
        for (i, (a, a_names)) in spaces.iter().enumerate() {
            for (b, b_names) in &spaces[i + 1..] {
                for name in a_names.keys() {
                    assert!(!b_names.contains_key(name), "{name} is in {a} and in {b}");
                }
            }
            assert!(!a_names.is_empty(), "no request of {a} was served");
        }
    }
}

/// Characters that stress the name rules: the separator, `%` and hex
/// digits (forged escapes), path and glob characters, control characters,
/// invisible and multi-byte characters, and anything at all.
fn hostile_char() -> impl Strategy<Value = char> {
    prop_oneof![
        4 => any::<char>(),
        4 => select(vec![
            ':', '%', '/', '\\', '*', '?', '[', ']', '{', '}', ' ', '\t', '\0', '\n', '\r',
            '\u{1f}', '\u{7f}', '\u{85}', '\u{200b}', '\u{202e}', '\u{feff}', 'é', '\u{1f512}',
            '\u{10ffff}',
        ]),
        3 => select("0123456789ABCDEFabcdef".chars().collect::<Vec<_>>()),
        3 => proptest::char::range('a', 'z'),
    ]
}

/// Keys from [`hostile_char`]: mostly short, some around the length limit.
fn hostile_key() -> impl Strategy<Value = String> {
    prop_oneof![
        9 => vec(hostile_char(), 0..40).prop_map(String::from_iter),
        1 => vec(select(vec!['k', 'k', 'k', ':', '%', 'é']), 960..1040)
            .prop_map(String::from_iter),
    ]
}

/// Header bytes: printable ASCII, the separator and `%`, tabs and spaces,
/// obs-text (0x80-0xFF), and anything; mostly short, some around the limit.
fn header_bytes() -> impl Strategy<Value = Vec<u8>> {
    // Any byte: one in eight (CR, LF, NUL, DEL...) cannot be sent.
    let byte = prop_oneof![
        1 => any::<u8>(),
        4 => select(b":%:% \t\x80\xc3\xa9\xff".to_vec()),
        5 => 0x21u8..0x7f,
    ];
    prop_oneof![
        9 => vec(byte, 0..40),
        1 => vec(select(b"kkk:%".to_vec()), 960..1040),
    ]
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

fn runner(cases: u32) -> TestRunner {
    TestRunner::new(Config {
        cases,
        failure_persistence: None,
        ..Config::default()
    })
}

/// Runs `case` on the runtime, bounded by [`CASE_BOUND`].
fn bounded<T>(
    rt: &tokio::runtime::Runtime,
    case: impl Future<Output = Result<T, TestCaseError>>,
) -> Result<T, TestCaseError> {
    rt.block_on(async {
        tokio::time::timeout(CASE_BOUND, case)
            .await
            .unwrap_or_else(|_| Err(TestCaseError::fail("the request hung")))
    })
}

/// Arbitrary header bytes, read by `HeaderKey` and by `GrpcMetadataKey`
/// (as a gRPC call), in the namespace and in a namespace nested in it:
/// each request gets a lock on a name inside its namespace that decodes
/// back to the key, or 400 / `INVALID_ARGUMENT` exactly when the key is
/// not visible text, is empty, holds a control character or makes a name
/// over 1024 bytes. No two keys share a name, no name is in two
/// namespaces, and a refused key takes no lock.
#[test]
fn arbitrary_header_bytes() {
    let rt = runtime();
    let sync = Counting::new(MemorySync::new());
    let header = service(&sync, NS, HeaderKey::new(HEADER));
    let inner = service(&sync, INNER, HeaderKey::new(HEADER));
    let grpc = service(&sync, NS, GrpcMetadataKey::new(HEADER));
    let names = RefCell::new(Names::default());
    let sendable = std::cell::Cell::new(0u32);
    runner(CASES)
        .run(&header_bytes(), |bytes| {
            let Ok(value) = HeaderValue::from_bytes(&bytes) else {
                // Not a header value any client can send (CR, LF, NUL...).
                return Ok(());
            };
            sendable.set(sendable.get() + 1);
            let request = |grpc: bool| {
                let mut request = Request::builder()
                    .uri("/jobs")
                    .header(HEADER, value.clone());
                if grpc {
                    request = request.header("content-type", "application/grpc");
                }
                request.body(()).unwrap()
            };
            // What the public extractor reads, and what it must read.
            let extracted = HeaderKey::new(HEADER)
                .extract(&request(false))
                .map(|key| key.map(std::borrow::Cow::into_owned));
            let visible = bytes
                .iter()
                .all(|&b| (0x20..0x7f).contains(&b) || b == b'\t');
            match &extracted {
                Ok(Some(key)) => prop_assert!(visible && key.as_bytes() == bytes),
                Err(KeyError::NotText { .. }) => prop_assert!(!visible),
                other => prop_assert!(false, "unexpected {:?}", other),
            }
            prop_assert_eq!(
                &GrpcMetadataKey::new(HEADER)
                    .extract(&request(true))
                    .ok()
                    .map(|key| key.map(std::borrow::Cow::into_owned)),
                &extracted.clone().ok()
            );
            bounded(&rt, async {
                for (namespace, service, grpc) in [
                    (NS, &header, false),
                    (INNER, &inner, false),
                    (NS, &grpc, true),
                ] {
                    let locks = sync.counts.locks();
                    let outcome = send(service, request(grpc)).await?;
                    let took = sync.counts.locks() - locks;
                    prop_assert_eq!(took, usize::from(outcome != Outcome::Refused));
                    names.borrow_mut().check(namespace, &extracted, &outcome)?;
                }
                Ok(())
            })
        })
        .unwrap();
    names.borrow().assert_disjoint();
    assert!(sendable.get() > CASES / 2, "too few sendable header values");
}

/// One piece of a generated path segment and the bytes it decodes to.
#[derive(Debug, Clone)]
enum Piece {
    /// A character a URI path may hold as it is.
    Raw(char),
    /// `%XX`, upper or lower case hex.
    Escaped(u8, bool),
    /// `%` followed by a letter that is not a hex digit: stays as it is.
    Malformed(char),
}

/// A path segment from pieces, and the bytes a router decodes it to.
fn segment() -> impl Strategy<Value = (String, Vec<u8>)> {
    let piece = prop_oneof![
        4 => select("abcXYZ019-._~!$&'()*+,;=:@".chars().collect::<Vec<_>>()).prop_map(Piece::Raw),
        4 => (any::<u8>(), any::<bool>()).prop_map(|(b, upper)| Piece::Escaped(b, upper)),
        2 => (select(b":%/\0\n\x7f".to_vec()), any::<bool>())
            .prop_map(|(b, upper)| Piece::Escaped(b, upper)),
        1 => select(vec!['g', 'z', 'G', '-']).prop_map(Piece::Malformed),
    ];
    vec(piece, 0..40).prop_map(|pieces| {
        let (mut text, mut bytes) = (String::new(), Vec::new());
        for piece in pieces {
            match piece {
                Piece::Raw(c) => {
                    text.push(c);
                    bytes.push(c as u8);
                }
                Piece::Escaped(b, true) => {
                    text.push_str(&format!("%{b:02X}"));
                    bytes.push(b);
                }
                Piece::Escaped(b, false) => {
                    text.push_str(&format!("%{b:02x}"));
                    bytes.push(b);
                }
                Piece::Malformed(c) => {
                    text.push('%');
                    text.push(c);
                    bytes.extend_from_slice(format!("%{c}").as_bytes());
                }
            }
        }
        (text, bytes)
    })
}

/// Arbitrary bytes in a path segment, raw or percent-encoded (encoded
/// separators, slashes, NUL, invalid UTF-8, malformed escapes): the
/// `PathSegment` key is the decoded segment, and the layer locks a name in
/// the namespace that decodes back to it, or answers 400 exactly when it is
/// not UTF-8 or breaks the name rules.
#[test]
fn arbitrary_path_segments() {
    let rt = runtime();
    let sync = Counting::new(MemorySync::new());
    let path = service(&sync, NS, PathSegment::new(1));
    let inner = service(&sync, INNER, PathSegment::new(1));
    let names = RefCell::new(Names::default());
    runner(CASES)
        .run(&segment(), |(text, bytes)| {
            let uri: Uri = format!("/jobs/{text}/start")
                .parse()
                .map_err(|e| TestCaseError::fail(format!("{text:?}: {e}")))?;
            let request = || Request::builder().uri(uri.clone()).body(()).unwrap();
            let extracted = PathSegment::new(1)
                .extract(&request())
                .map(|key| key.map(std::borrow::Cow::into_owned));
            match (&extracted, String::from_utf8(bytes)) {
                (Ok(Some(key)), Ok(expected)) => prop_assert_eq!(key, &expected),
                (Err(KeyError::NotText { .. }), Err(_)) => {}
                (other, expected) => prop_assert!(false, "{:?}, expected {:?}", other, expected),
            }
            bounded(&rt, async {
                for (namespace, service) in [(NS, &path), (INNER, &inner)] {
                    let outcome = send(service, request()).await?;
                    names.borrow_mut().check(namespace, &extracted, &outcome)?;
                }
                Ok(())
            })
        })
        .unwrap();
    names.borrow().assert_disjoint();
}

/// The key a closure extractor reads: whatever the test put in the request.
#[derive(Clone)]
struct TestKey(String);

fn test_key(request: &Request<()>) -> Option<String> {
    request.extensions().get::<TestKey>().map(|k| k.0.clone())
}

/// Arbitrary text keys from closures (`Fn` and `try_key_fn`), each sent
/// with its look-alikes (`:` written as `%3A` and back, `%` as `%25`, the
/// key with a separator added, `x:` + key, which reads like the nested
/// namespace `tenant-a:x`): distinct keys always get distinct names inside
/// their own namespace, equal keys the same name, a key the closure refuses
/// gets 400, and nothing panics.
#[test]
fn arbitrary_text_keys_and_look_alikes() {
    let rt = runtime();
    let sync = Counting::new(MemorySync::new());
    let plain = service(&sync, NS, test_key);
    let inner = service(&sync, INNER, test_key);
    // Refuses keys with `!`, as an application's own rule.
    let refusing = try_key_fn(|request: &Request<()>| match test_key(request) {
        Some(key) if key.contains('!') => Err(KeyError::Invalid("no '!' here".into())),
        key => Ok(key),
    });
    let strict = service(&sync, "strict", refusing.clone());
    let names = RefCell::new(Names::default());
    runner(CASES)
        .run(&hostile_key(), |key| {
            let twins = [
                key.clone(),
                key.replace(':', "%3A"),
                key.replace("%3A", ":").replace("%3a", ":"),
                key.replace('%', "%25"),
                format!("{key}:"),
                format!(":{key}"),
                format!("x:{key}"),
                format!("{key}!"),
            ];
            bounded(&rt, async {
                for twin in &twins {
                    let request = || {
                        let mut request = Request::new(());
                        request.extensions_mut().insert(TestKey(twin.clone()));
                        request
                    };
                    for (namespace, service) in [(NS, &plain), (INNER, &inner)] {
                        let outcome = send(service, request()).await?;
                        names
                            .borrow_mut()
                            .check(namespace, &Ok(Some(twin.clone())), &outcome)?;
                    }
                    let extracted = refusing
                        .extract(&request())
                        .map(|key| key.map(std::borrow::Cow::into_owned));
                    prop_assert_eq!(extracted.is_err(), twin.contains('!'));
                    let outcome = send(&strict, request()).await?;
                    names.borrow_mut().check("strict", &extracted, &outcome)?;
                }
                Ok(())
            })
        })
        .unwrap();
    names.borrow().assert_disjoint();
}

/// Separator injection, played out with real locks: while another
/// namespace holds `other-namespace:x` and the nested namespace
/// `tenant-a:x` holds its key `y`, keys that spell those names
/// (`other-namespace:x`, `x:y`, `x%3Ay`) in `tenant-a` are served at once
/// (the layer fails fast) under names of `tenant-a`, never rejected as busy.
#[tokio::test]
async fn injected_separators_never_reach_another_namespace() {
    let sync = MemorySync::new();
    let options = DistMutexOptions::default().with_tries(1);
    let mut other = sync
        .new_mutex("other-namespace:x", options.clone())
        .unwrap();
    other.lock().await.unwrap();
    let mut nested = sync.new_mutex("tenant-a:x:y", options.clone()).unwrap();
    nested.lock().await.unwrap();
    let counted = Counting::new(sync.clone());
    let service = service(&counted, NS, test_key);
    for key in ["other-namespace:x", "x:y", "x%3Ay", ":x:y", "x:y:"] {
        let mut request = Request::new(());
        request.extensions_mut().insert(TestKey(key.into()));
        let outcome = send(&service, request).await.unwrap();
        let Outcome::Locked(name) = outcome else {
            panic!("{key:?}: {outcome:?}");
        };
        assert!(name.starts_with("tenant-a:"), "{name}");
        assert!(!name.starts_with("tenant-a:x:"), "{name}");
        assert_ne!(name, "other-namespace:x");
    }
    // The other namespaces' locks were never touched.
    assert!(other.valid().await.unwrap());
    assert!(nested.valid().await.unwrap());
    other.unlock().await.unwrap();
    nested.unlock().await.unwrap();
}

/// Keys of 1 MB (plain, all separators, multi-byte unicode) from a header,
/// gRPC metadata and a closure, and a 60 KB path segment (URIs stop at
/// 64 KB): each gets 400 (`INVALID_ARGUMENT` for gRPC) and takes no lock.
#[tokio::test]
async fn megabyte_keys_are_refused() {
    let sync = Counting::new(MemorySync::new());
    let header = service(&sync, NS, HeaderKey::new(HEADER));
    let grpc = service(&sync, NS, GrpcMetadataKey::new(HEADER));
    let closure = service(&sync, NS, test_key);
    let path = service(&sync, NS, PathSegment::new(1));
    const MB: usize = 1 << 20;
    let ascii = [
        "k".repeat(MB),
        ":".repeat(MB),
        "%3A".repeat(MB / 3),
        "k".repeat(MAX_NAME_LEN),
    ];
    for key in &ascii {
        for (service, grpc) in [(&header, false), (&grpc, true)] {
            let mut request = Request::builder().header(HEADER, key.as_str());
            if grpc {
                request = request.header("content-type", "application/grpc");
            }
            let outcome = send(service, request.body(()).unwrap()).await.unwrap();
            assert_eq!(outcome, Outcome::Refused, "{} bytes", key.len());
        }
    }
    for key in ascii.iter().cloned().chain(["\u{1f512}".repeat(MB / 4)]) {
        let mut request = Request::new(());
        request.extensions_mut().insert(TestKey(key));
        assert_eq!(send(&closure, request).await.unwrap(), Outcome::Refused);
    }
    for segment in ["k".repeat(60_000), "%3A".repeat(20_000)] {
        let request = Request::builder()
            .uri(format!("/jobs/{segment}"))
            .body(())
            .unwrap();
        assert_eq!(send(&path, request).await.unwrap(), Outcome::Refused);
    }
    assert_eq!(sync.counts.locks(), 0, "no lock was taken");
}

/// Serves `app` with hyper's HTTP/1 server set to take heads of up to
/// 4 MiB, so that a 1 MB header reaches the layer.
async fn serve_large_heads(
    app: axum::Router,
) -> (std::net::SocketAddr, tokio::task::JoinHandle<()>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let task = tokio::spawn(async move {
        loop {
            let (stream, _) = listener.accept().await.unwrap();
            let app = app.clone();
            tokio::spawn(async move {
                let service =
                    hyper::service::service_fn(move |request| app.clone().oneshot(request));
                let _ = hyper::server::conn::http1::Builder::new()
                    .max_buf_size(4 << 20)
                    .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    (addr, task)
}

/// Writes `head` on a new connection to `addr` and reads the reply until
/// the server closes the connection. A server that stops reading and
/// resets the connection gives what was read before the reset.
async fn raw_exchange(addr: std::net::SocketAddr, head: &[u8]) -> String {
    let mut socket = tokio::net::TcpStream::connect(addr).await.unwrap();
    let _ = socket.write_all(head).await;
    let mut reply = Vec::new();
    let _ = socket.read_to_end(&mut reply).await;
    String::from_utf8_lossy(&reply).into_owned()
}

/// A 1 MB key in a real HTTP request: a server that reads heads that large
/// answers 400 from the layer, with the reason, and keeps serving; behind
/// axum's stock server (hyper's default head limit) the request is refused
/// before the layer. No lock is taken, nothing panics or hangs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn megabyte_header_over_http_gets_400() {
    let sync = Counting::new(MemorySync::new());
    let layer = DistLockLayer::builder(sync.clone(), HeaderKey::new(HEADER))
        .namespace(NS)
        .build()
        .unwrap();
    let app = axum::Router::new()
        .route("/jobs", axum::routing::get(|| async { "served" }))
        .layer(layer.clone());
    let key = "k".repeat(1 << 20);
    let head =
        format!("GET /jobs HTTP/1.1\r\nhost: x\r\nconnection: close\r\n{HEADER}: {key}\r\n\r\n");
    let normal =
        format!("GET /jobs HTTP/1.1\r\nhost: x\r\nconnection: close\r\n{HEADER}: job-1\r\n\r\n");

    let (addr, task) = serve_large_heads(app.clone()).await;
    let reply = tokio::time::timeout(Duration::from_secs(60), raw_exchange(addr, head.as_bytes()))
        .await
        .expect("an answer, not a hang");
    assert!(reply.starts_with("HTTP/1.1 400"), "{:.200}", reply);
    assert!(reply.contains("1048576 bytes long"), "{:.400}", reply);
    let reply = raw_exchange(addr, normal.as_bytes()).await;
    assert!(
        reply.starts_with("HTTP/1.1 200") && reply.ends_with("served"),
        "{reply}"
    );
    task.abort();

    let server = support::http::Server::start(app).await;
    let reply = tokio::time::timeout(
        Duration::from_secs(60),
        raw_exchange(server.addr, head.as_bytes()),
    )
    .await
    .expect("an answer, not a hang");
    assert!(
        reply.is_empty() || reply.starts_with("HTTP/1.1 4"),
        "{:.200}",
        reply
    );
    let reply = raw_exchange(server.addr, normal.as_bytes()).await;
    assert!(reply.starts_with("HTTP/1.1 200"), "{reply}");
    assert_eq!(
        sync.counts.locks(),
        2,
        "only the two normal requests locked"
    );
    // Releases run in the background, after the response.
    conformance::eventually(Duration::from_secs(30), "locks released", async || {
        layer.stats().local_keys() == 0
    })
    .await;
}

/// Arbitrary header bytes over a real HTTP connection (hyper client and
/// server): the handler reads the key the server saw with `HeaderKey`, and
/// the lock name decodes back to it and stays in the namespace; a 400 only
/// for a key that breaks the rules. Nothing panics and the server keeps
/// serving.
#[test]
fn arbitrary_header_bytes_over_http() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let sync = MemorySync::new();
    let layer = DistLockLayer::builder(sync, HeaderKey::new(HEADER))
        .namespace(NS)
        .wait(Duration::ZERO)
        .on_missing_key(MissingKey::Reject)
        .build()
        .unwrap();
    let app = axum::Router::new()
        .fallback(|request: axum::extract::Request| async move {
            let held = request.extensions().get::<HeldLock>().cloned().unwrap();
            let key = HeaderKey::new(HEADER).extract(&request).unwrap().unwrap();
            format!("{}\n{key}", held.name())
        })
        .layer(layer.clone());
    let server = rt.block_on(support::http::Server::start(app));
    let client = support::http::HttpClient::default();
    let served = std::cell::Cell::new(0u32);
    runner(128)
        .run(&header_bytes(), |bytes| {
            let Ok(value) = HeaderValue::from_bytes(&bytes) else {
                return Ok(());
            };
            let request = Request::get(server.url("/jobs"))
                .header(HEADER, value)
                .body(Full::<Bytes>::default())
                .unwrap();
            let (status, body) = bounded(&rt, async {
                let response = client.send(request).await;
                let status = response.status();
                let body = response.into_body().collect().await.unwrap().to_bytes();
                Ok((status, String::from_utf8_lossy(&body).into_owned()))
            })?;
            // The server strips the spaces and tabs around a header value.
            let sent = bytes.trim_ascii();
            let key = std::str::from_utf8(sent)
                .ok()
                .filter(|k| k.bytes().all(|b| (0x20..0x7f).contains(&b) || b == b'\t'));
            match status {
                StatusCode::OK => {
                    let (name, key_seen) = body.split_once('\n').unwrap();
                    prop_assert_eq!(Some(key_seen), key, "the key the server saw");
                    let decoded = key_of(name, NS);
                    prop_assert_eq!(decoded.as_deref(), Some(key_seen));
                    prop_assert!(acceptable(NS, key_seen));
                    served.set(served.get() + 1);
                }
                StatusCode::BAD_REQUEST => {
                    prop_assert!(!key.is_some_and(|k| acceptable(NS, k)), "{:?}", key);
                }
                other => prop_assert!(false, "{}: {}", other, body),
            }
            Ok(())
        })
        .unwrap();
    assert!(served.get() > 0, "no request was served");
    rt.block_on(conformance::eventually(
        Duration::from_secs(30),
        "every lock released",
        async || layer.stats().local_keys() == 0,
    ));
}

/// Hostile keys through the layer over one real Redis node: the Redis key
/// is exactly the key prefix followed by the lock name, byte for byte
/// (unicode, glob characters, spaces, escapes), it holds the lock's value
/// while the handler runs, and it is gone after the release.
#[test]
fn hostile_names_reach_redis_intact() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let node = support::RedisServer::start();
    let sync = rt.block_on(async { RedisSync::new([node.url()]).unwrap() });
    let layer = DistLockLayer::builder(sync, test_key)
        .namespace(NS)
        .wait(Duration::ZERO)
        .mutex_options(DistMutexOptions::default().with_expiry(Duration::from_secs(30)))
        .build()
        .unwrap();
    let url = node.url();
    let service =
        ServiceBuilder::new()
            .layer(layer.clone())
            .service_fn(move |request: Request<()>| {
                let url = url.clone();
                async move {
                    let held = request.extensions().get::<HeldLock>().cloned().unwrap();
                    let key = format!("dsync:{}", held.name());
                    let stored: Option<String> = tokio::task::spawn_blocking(move || {
                        let mut con = redis::Client::open(url).unwrap().get_connection().unwrap();
                        redis::cmd("GET").arg(key).query(&mut con).unwrap()
                    })
                    .await
                    .unwrap();
                    let mut response = Response::new(String::new());
                    if stored.as_deref() == Some(held.value()) {
                        response.extensions_mut().insert(held);
                    }
                    Ok::<_, Infallible>(response)
                }
            });
    let con = RefCell::new(node.connection());
    runner(64)
        .run(&hostile_key(), |key| {
            let acceptable = acceptable(NS, &key);
            let mut request = Request::new(());
            request.extensions_mut().insert(TestKey(key.clone()));
            let response = bounded(&rt, async {
                let mut service = service.clone();
                let response = ServiceExt::ready(&mut service)
                    .await
                    .unwrap()
                    .call(request)
                    .await;
                Ok(response.unwrap())
            })?;
            if !acceptable {
                prop_assert_eq!(response.status(), StatusCode::BAD_REQUEST);
                return Ok(());
            }
            let held = response.extensions().get::<HeldLock>().cloned();
            let Some(held) = held else {
                return Err(TestCaseError::fail(
                    "the Redis key did not hold the lock's value",
                ));
            };
            prop_assert_eq!(key_of(held.name(), NS), Some(key));
            bounded(&rt, async {
                drop(response);
                held.lost().await;
                Ok(())
            })?;
            let left: bool = redis::cmd("EXISTS")
                .arg(format!("dsync:{}", held.name()))
                .query(&mut *con.borrow_mut())
                .unwrap();
            prop_assert!(!left, "the key outlived its release");
            Ok(())
        })
        .unwrap();
    // The extend loop leaves the local queue just after it reports the release.
    rt.block_on(conformance::eventually(
        Duration::from_secs(30),
        "the local queue is empty",
        async || layer.stats().local_keys() == 0,
    ));
}

/// A backend without a separator cannot keep namespaces apart (`a` + `bx`
/// and `ab` + `x` would both be `abx`), so the layer refuses it when it is
/// built, with a typed configuration error: no such layer can take another
/// namespace's lock.
#[test]
fn empty_separator_is_refused() {
    let sync = MemorySync::new().with_separator("");
    for namespace in ["a", "ab"] {
        let err = DistLockLayer::builder(sync.clone(), test_key)
            .namespace(namespace)
            .wait(Duration::ZERO)
            .build()
            .unwrap_err();
        assert!(
            matches!(err, tower_dsync::Error::InvalidConfig { .. }),
            "{err:?}"
        );
        assert!(err.to_string().contains("separator"), "{err}");
    }
}

/// Every string of `min..=max` characters of `alphabet`.
fn strings(alphabet: &[char], min: usize, max: usize) -> Vec<String> {
    let mut all = vec![String::new()];
    let mut last = vec![String::new()];
    for _ in 0..max {
        last = last
            .iter()
            .flat_map(|s| alphabet.iter().map(move |c| format!("{s}{c}")))
            .collect();
        all.extend(last.iter().cloned());
    }
    all.retain(|s| s.chars().count() >= min);
    all
}

/// For every separator that the layer accepts, two different (namespace,
/// key) pairs never share a lock name, whatever characters the separator,
/// the namespaces and the keys hold (`%`, hex digits, the separator itself,
/// prefixes of one another). A separator that would let them is refused
/// when the layer is built, with a typed error; `%` is one (namespace `n` + key `%` and
/// namespace `n%` + key `25` would both be `n%%25`).
///
/// Each case is a random separator; every namespace and key over an
/// alphabet of its characters, `%` and hex digits is tried, so that a
/// collision, if the rules allow one, is found.
#[test]
fn separators_never_merge_namespaces() {
    let rt = runtime();
    let separator = vec(select(vec![':', '%', '2', '5', 'A', 'a', '/', 'x']), 1..=2)
        .prop_map(|chars| chars.into_iter().collect::<String>());
    runner(48)
        .run(&separator, |separator| {
            let mut alphabet: Vec<char> = separator.chars().chain(['%', '2', '5']).collect();
            alphabet.sort_unstable();
            alphabet.dedup();
            let sync = MemorySync::new().with_separator(separator.as_str());
            let mut seen: HashMap<String, (String, String)> = HashMap::new();
            for namespace in strings(&alphabet, 1, 2) {
                let Ok(layer) = DistLockLayer::builder(sync.clone(), test_key)
                    .namespace(namespace.as_str())
                    .wait(Duration::ZERO)
                    .build()
                else {
                    continue;
                };
                let service = Svc::new(ServiceBuilder::new().layer(layer).service_fn(handler));
                for key in strings(&alphabet, 1, 3) {
                    let mut request = Request::new(());
                    request.extensions_mut().insert(TestKey(key.clone()));
                    let Outcome::Locked(name) = bounded(&rt, send(&service, request))? else {
                        continue;
                    };
                    let pair = (namespace.clone(), key);
                    if let Some(other) = seen.insert(name.clone(), pair.clone()) {
                        prop_assert!(
                            false,
                            "separator {:?}: {:?} and {:?} share {:?}",
                            separator,
                            other,
                            pair,
                            name
                        );
                    }
                }
            }
            Ok(())
        })
        .unwrap();
}
