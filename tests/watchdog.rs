//! The layer's keeper (the watchdog that extends a held lock) under
//! failure: an extension that fails is reported at once, nothing is
//! extended after a release or a loss, releasing an expired lock is prompt
//! and reports the documented error, and tiny expiries are refused or kept
//! correctly. In-process cases run on tokio's paused clock and move it by
//! hand; Redis cases run on real `redis-server` processes and order events
//! with counters and channels.

mod support;

use std::convert::Infallible;
use std::time::Duration;

use http::{Request, Response, StatusCode};
use http_body_util::BodyExt;
use support::counting::Counting;
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tower::{ServiceBuilder, ServiceExt};
use tower_dsync::layer::{DistLockLayer, HeaderKey, HeldLock, LockBody};
use tower_dsync::{DistMutex, DistMutexOptions, DistSync, Error, MemorySync};

const KEY: &str = "x-job";

type Svc = tower::util::BoxCloneService<Request<()>, Response<LockBody<String>>, Infallible>;

/// A request inside the handler: its lock, and the switch that lets the
/// handler answer.
struct Inside {
    lock: HeldLock,
    go: oneshot::Sender<()>,
}

/// The layer around a handler that reports its lock and answers when let
/// go.
fn blocking<D: DistSync>(
    layer: DistLockLayer<D, HeaderKey>,
) -> (Svc, mpsc::UnboundedReceiver<Inside>) {
    let (inside_tx, inside_rx) = mpsc::unbounded_channel();
    let service = ServiceBuilder::new()
        .layer(layer)
        .service_fn(move |request: Request<()>| {
            let inside_tx = inside_tx.clone();
            async move {
                let lock = request.extensions().get::<HeldLock>().cloned().unwrap();
                let (go, wait) = oneshot::channel();
                inside_tx.send(Inside { lock, go }).unwrap();
                let _ = wait.await;
                Ok::<_, Infallible>(Response::new("done".to_owned()))
            }
        });
    (Svc::new(service), inside_rx)
}

/// Sends a request with `key` in the background; it answers with the
/// status once its body was read to the end.
fn spawn_request(service: &Svc, key: &str) -> JoinHandle<StatusCode> {
    let request = Request::builder().header(KEY, key).body(()).unwrap();
    let service = service.clone();
    tokio::spawn(async move {
        let response = service.oneshot(request).await.unwrap();
        let status = response.status();
        response.into_body().collect().await.unwrap();
        status
    })
}

/// Lets every ready task run, without moving the paused clock.
async fn settle() {
    for _ in 0..50 {
        tokio::task::yield_now().await;
    }
}

/// Moves the paused clock by `step`, `times` times, letting the keeper run
/// after each step; `check` runs after each step.
async fn step_clock(step: Duration, times: u32, mut check: impl AsyncFnMut()) {
    for _ in 0..times {
        tokio::time::advance(step).await;
        settle().await;
        check().await;
    }
}

/// An expiry of 1 ms leaves no validity, and one of 2.5 ms without drift
/// factor leaves 0.5 ms, less than two of the keeper's shortest interval
/// (1 ms): both are refused with `InvalidOptions` naming the problem, and
/// keyed requests get 500 without taking a lock, instead of a lock whose
/// validity ends before its first extension.
#[tokio::test(start_paused = true)]
async fn tiny_validity_is_refused() {
    let sync = Counting::new(MemorySync::new());
    let cases = [
        (
            DistMutexOptions::default().with_expiry(Duration::from_millis(1)),
            "drift",
        ),
        (
            DistMutexOptions::default()
                .with_expiry(Duration::from_micros(2500))
                .with_drift_factor(0.0),
            "validity",
        ),
    ];
    for (options, named) in cases {
        let layer = DistLockLayer::new(sync.clone(), HeaderKey::new(KEY)).mutex_options(options);
        let err = layer.validate().unwrap_err();
        assert!(matches!(err, Error::InvalidOptions { .. }), "{err:?}");
        assert!(err.to_string().contains(named), "{err}");
        let (service, _inside) = blocking(layer);
        assert_eq!(
            spawn_request(&service, "tiny").await.unwrap(),
            StatusCode::INTERNAL_SERVER_ERROR
        );
    }
    assert_eq!(sync.counts.locks(), 0);
}

/// Short expiries (5 ms, and 1 s) with every kind of `extend_every` (none,
/// zero, equal to the expiry, far longer): the lock is held through twenty
/// expiries, the clock moved in fiftieths of an expiry, and at every step
/// it is not lost, its validity end is still ahead, and another owner
/// cannot take the name. Then it is released.
#[tokio::test(start_paused = true)]
async fn short_expiries_are_extended_in_time() {
    for expiry in [Duration::from_millis(5), Duration::from_secs(1)] {
        for every in [None, Some(Duration::ZERO), Some(expiry), Some(expiry * 100)] {
            let sync = Counting::new(MemorySync::new());
            let options = DistMutexOptions::default().with_expiry(expiry);
            let mut layer = DistLockLayer::new(sync.clone(), HeaderKey::new(KEY))
                .mutex_options(options)
                .wait(Duration::ZERO);
            if let Some(every) = every {
                layer = layer.extend_every(every);
            }
            layer.validate().unwrap();
            let (service, mut inside) = blocking(layer.clone());
            let request = spawn_request(&service, "short");
            let Inside { lock, go } = inside.recv().await.unwrap();
            let mut probe = sync
                .inner
                .new_mutex(lock.name(), DistMutexOptions::default().with_tries(1))
                .unwrap();
            step_clock(expiry / 50, 50 * 20, async || {
                let case = format!("expiry {expiry:?}, extend_every {every:?}");
                assert!(!lock.is_lost(), "{case}: lost");
                assert!(
                    lock.until().unwrap() > Instant::now(),
                    "{case}: validity over"
                );
                assert!(
                    matches!(probe.lock().await, Err(Error::Held { .. })),
                    "{case}: another owner got in"
                );
            })
            .await;
            assert!(sync.counts.extends() >= 20, "{}", sync.counts.extends());
            go.send(()).unwrap();
            assert_eq!(request.await.unwrap(), StatusCode::OK);
            lock.lost().await;
            assert!(!lock.is_lost());
            probe.lock().await.unwrap();
        }
    }
}
