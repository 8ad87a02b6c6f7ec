//! Payments behind `IdempotencyLayer`: a charge endpoint hit by several
//! clients that retry after timeouts and send concurrent duplicates.
//!
//! Each client charges a few orders, each under its own `Idempotency-Key`:
//! a first attempt that times out on the client side (the server drops the
//! abandoned request before it charges), then two attempts at once (one
//! runs, the other waits for its response), then a late retry after
//! everything completed. The ledger must hold one charge per key, and every
//! answer for a key must be the same charge.
//!
//! ```text
//! cargo run --example payments
//! DSYNC_REDIS_URLS=redis://127.0.0.1:6379 cargo run --example payments
//! ```

mod common;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::routing::post;
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use tower_dsync::idempotency::IdempotencyLayer;

const CLIENTS: usize = 4;
const ORDERS_PER_CLIENT: usize = 3;
/// How long the payment processor takes to charge.
const PROCESSING: Duration = Duration::from_millis(150);
/// How long a client waits for its first attempt before giving up on it.
const CLIENT_TIMEOUT: Duration = Duration::from_millis(30);

/// The charges made, by idempotency key.
type Ledger = Arc<Mutex<HashMap<String, Vec<String>>>>;

/// The charge handler. It commits the charge at its end, as a transaction
/// does: a request dropped before (its client gone) charges nothing, and
/// its retry runs again.
async fn charge(
    State(ledger): State<Ledger>,
    headers: HeaderMap,
    body: String,
) -> (StatusCode, String) {
    tokio::time::sleep(PROCESSING).await;
    let key = headers["idempotency-key"]
        .to_str()
        .unwrap_or("?")
        .to_owned();
    let mut ledger = ledger.lock().unwrap();
    let id = format!("ch_{}", ledger.values().map(Vec::len).sum::<usize>() + 1);
    ledger.entry(key).or_default().push(id.clone());
    (StatusCode::CREATED, format!("{id}: charged {body}"))
}

type HttpClient = Client<HttpConnector, Full<Bytes>>;

/// One attempt: the status, whether it was a replay, and the body.
async fn attempt(
    client: &HttpClient,
    url: &str,
    key: &str,
    body: &str,
) -> (StatusCode, bool, String) {
    let request = http::Request::post(url)
        .header("idempotency-key", key)
        .body(Full::new(Bytes::from(body.to_owned())))
        .expect("a valid request");
    let response = client.request(request).await.expect("the server answers");
    let status = response.status();
    let replayed = response.headers().contains_key("idempotent-replayed");
    let body = response
        .into_body()
        .collect()
        .await
        .expect("a body")
        .to_bytes();
    (
        status,
        replayed,
        String::from_utf8_lossy(&body).into_owned(),
    )
}

#[tokio::main]
async fn main() -> tower_dsync::Result<()> {
    let (sync, backend) = common::backend();
    println!("backend: {backend}");
    let ledger = Ledger::default();
    // Fresh keys per run, so that runs against a shared Redis do not meet.
    let run: u32 = rand::random();
    let layer = IdempotencyLayer::builder(sync)
        .namespace("payments")
        .build()?;
    let app = Router::new()
        .route("/charges", post(charge))
        .with_state(ledger.clone())
        .layer(layer);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let url = format!("http://{}/charges", listener.local_addr().expect("addr"));
    tokio::spawn(async move { axum::serve(listener, app).await.expect("serve") });

    let clients = (0..CLIENTS).map(|c| {
        let url = url.clone();
        tokio::spawn(async move {
            let client: HttpClient = Client::builder(TokioExecutor::new()).build_http();
            let mut answers = Vec::new();
            for o in 0..ORDERS_PER_CLIENT {
                let key = format!("run-{run:08x}-client-{c}-order-{o}");
                let body = format!("{} EUR for order {c}-{o}", 10 * (o + 1));
                // 1. Times out on the client side: abandoned.
                let timed_out =
                    tokio::time::timeout(CLIENT_TIMEOUT, attempt(&client, &url, &key, &body)).await;
                assert!(
                    timed_out.is_err(),
                    "the first attempt outlasts the client's patience"
                );
                // 2. Two attempts at once: one runs, one waits for its answer.
                let (a, b) = tokio::join!(
                    attempt(&client, &url, &key, &body),
                    attempt(&client, &url, &key, &body)
                );
                // 3. A late retry, after everything completed.
                let late = attempt(&client, &url, &key, &body).await;
                answers.push((key, vec![a, b, late]));
            }
            answers
        })
    });
    let mut all = Vec::new();
    for client in clients {
        all.extend(client.await.expect("a client task"));
    }

    let ledger = ledger.lock().unwrap();
    let mut replays = 0;
    let mut ok = true;
    for (key, answers) in &all {
        let charges = ledger.get(key).map_or(0, Vec::len);
        let first = &answers[0].2;
        let same = answers
            .iter()
            .all(|(status, _, body)| *status == StatusCode::CREATED && body == first);
        let replayed = answers.iter().filter(|(_, replayed, _)| *replayed).count();
        replays += replayed;
        println!(
            "{key}: {charges} charge(s), {} answers ({replayed} replayed): {first}",
            answers.len()
        );
        ok &= charges == 1 && same;
    }
    println!(
        "{} keys, {} charges, {} answers, {replays} of them replays",
        all.len(),
        ledger.values().map(Vec::len).sum::<usize>(),
        all.len() * 3
    );
    if !ok {
        eprintln!("FAILED: a key was charged twice, or a retry got another answer");
        std::process::exit(1);
    }
    println!("ok: one charge per idempotency key; every retry got the first response");
    Ok(())
}
