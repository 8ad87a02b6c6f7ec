//! TLS for real (feature `tls`): `redis-server`s serving TLS with
//! certificates the test makes (`openssl`), one node and Redlock, a CA
//! given in code, mutual TLS with a client certificate, a server the client
//! does not trust, and the wake-ups' subscriber connection over TLS too.

#![cfg(feature = "tls")]

mod support;

use std::time::Duration;

use redis::{ClientTlsConfig, TlsCertificates};
use support::tls::Certificates;
use tower_dsync::{DistMutex, DistMutexOptions, DistSync, RedisSync};

/// A client of the TLS port `port` that trusts the test CA, with the
/// client certificate when `prove` (mutual TLS).
fn client(certs: &Certificates, port: u16, prove: bool) -> redis::Client {
    let client_tls = prove.then(|| ClientTlsConfig {
        client_cert: certs.client_cert.clone(),
        client_key: certs.client_key.clone(),
    });
    redis::Client::build_with_tls(
        format!("rediss://127.0.0.1:{port}"),
        TlsCertificates {
            client_tls,
            root_cert: Some(certs.ca.clone()),
        },
    )
    .unwrap()
}

/// One try, so that a refusal is an error at once.
fn once() -> DistMutexOptions {
    DistMutexOptions::default().with_tries(1)
}

/// The TLS port has a connection from this process that is subscribed
/// (the wake-ups' subscriber).
fn has_tls_subscriber(server: &support::RedisServer, tls_port: u16) -> bool {
    let clients: String = redis::cmd("CLIENT")
        .arg("LIST")
        .arg("TYPE")
        .arg("pubsub")
        .query(&mut server.connection())
        .unwrap();
    clients
        .lines()
        .any(|line| line.contains(&format!("laddr=127.0.0.1:{tls_port} ")))
}

/// One node, the CA given in code: locks, fencing tokens and wake-ups all
/// over TLS. A waiter is woken by the release through a subscriber
/// connection on the TLS port.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_node_over_tls_with_a_ca_given_in_code() {
    let certs = Certificates::make();
    let (server, tls_port) = certs.start_server(false);
    let sync = RedisSync::builder()
        .client(client(&certs, tls_port, false))
        .build()
        .unwrap();
    let mut holder = sync
        .new_mutex("tls:a", DistMutexOptions::default())
        .unwrap();
    holder.lock().await.unwrap();
    assert!(holder.fencing_token().is_some());
    assert!(
        server.exists("dsync:tls:a"),
        "the lock is on the TLS server"
    );

    let mut waiter = sync
        .new_mutex(
            "tls:a",
            DistMutexOptions::default().with_retry_delay(Duration::from_secs(3600)),
        )
        .unwrap();
    let waiting = tokio::spawn(async move {
        waiter.lock().await.unwrap();
        waiter
    });
    // The waiter subscribes to its wake-up channel before it waits.
    while !has_tls_subscriber(&server, tls_port) {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    holder.unlock().await.unwrap();
    // Its retry delay is an hour: only the wake-up can bring it in.
    let mut waiter = waiting.await.unwrap();
    waiter.unlock().await.unwrap();
}

/// Redlock over three TLS nodes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redlock_over_tls() {
    let certs = Certificates::make();
    let nodes: Vec<_> = (0..3).map(|_| certs.start_server(false)).collect();
    for (server, _) in &nodes {
        let _: () = redis::cmd("HSET")
            .arg("dsync:\u{1f}node")
            .arg("born")
            .arg(0)
            .query(&mut server.connection())
            .unwrap();
    }
    let mut builder = RedisSync::builder();
    for (_, port) in &nodes {
        builder = builder.client(client(&certs, *port, false));
    }
    let sync = builder.build().unwrap();
    assert_eq!(sync.quorum(), 2);
    let mut mutex = sync
        .new_mutex("tls:r", DistMutexOptions::default())
        .unwrap();
    mutex.lock().await.unwrap();
    // A quorum acknowledged the lock; the third node's write may still be
    // on its way: it lands too.
    let on = || {
        nodes
            .iter()
            .filter(|(s, _)| s.exists("dsync:tls:r"))
            .count()
    };
    assert!(on() >= 2);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while on() < 3 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the third node never got the lock"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    mutex.unlock().await.unwrap();
}

/// Mutual TLS: a server that asks for client certificates refuses a client
/// without one (`Unavailable` naming the node, at once), and serves one
/// with a certificate signed by its CA.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mutual_tls() {
    let certs = Certificates::make();
    let (server, tls_port) = certs.start_server(true);
    let anonymous = RedisSync::builder()
        .client(client(&certs, tls_port, false))
        .build()
        .unwrap();
    let mut refused = anonymous.new_mutex("tls:m", once()).unwrap();
    let error = refused.lock().await.unwrap_err();
    assert!(error.is_unavailable(), "{error:?}");
    assert!(error.to_string().contains(&tls_port.to_string()), "{error}");
    assert!(!server.exists("dsync:tls:m"));

    let proven = RedisSync::builder()
        .client(client(&certs, tls_port, true))
        .build()
        .unwrap();
    let mut mutex = proven.new_mutex("tls:m", once()).unwrap();
    mutex.lock().await.unwrap();
    assert!(server.exists("dsync:tls:m"));
    mutex.unlock().await.unwrap();
}

/// A server whose certificate the client does not trust (the system's
/// roots do not know the test CA): `Unavailable` naming the node, never a
/// hang, and no lock on the server.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_untrusted_server_is_unavailable() {
    let certs = Certificates::make();
    let (server, tls_port) = certs.start_server(false);
    let sync = RedisSync::new([format!("rediss://127.0.0.1:{tls_port}")]).unwrap();
    let mut mutex = sync.new_mutex("tls:u", once()).unwrap();
    let error = mutex.lock().await.unwrap_err();
    assert!(error.is_unavailable(), "{error:?}");
    assert!(
        error.to_string().contains(&format!("127.0.0.1:{tls_port}")),
        "{error}"
    );
    assert!(!server.exists("dsync:tls:u"));
}
