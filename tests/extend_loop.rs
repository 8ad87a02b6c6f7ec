//! The layer's extend loop (the background task that extends a held lock)
//! under failure: extensions land before the validity ends, a refused
//! extension is reported at once and one that fails with time left is
//! retried until the validity ends, nothing is extended after a release or
//! a loss, releasing an expired lock is prompt and reports the documented
//! error, and tiny expiries are refused or kept correctly. In-process cases
//! run on tokio's paused clock and move it by hand; Redis cases run on real
//! `redis-server` processes and order events with counters and channels.

mod conformance;
mod support;

use std::convert::Infallible;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use conformance::eventually;
use http::{Request, Response, StatusCode};
use http_body_util::BodyExt;
use support::counting::Counting;
use support::{RedisNodes, RedisServer};
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tower::{ServiceBuilder, ServiceExt};
use tower_dsync::layer::{DistLockLayer, HeaderKey, HeldLock, LockBody, OnLost};
use tower_dsync::{DistMutex, DistMutexOptions, DistSync, Error, MemorySync, RedisSync};

const KEY: &str = "x-job";

/// Safety net around anything that waits on the network.
const BOUND: Duration = Duration::from_secs(30);

async fn bounded<T>(what: &str, future: impl Future<Output = T>) -> T {
    tokio::time::timeout(BOUND, future)
        .await
        .unwrap_or_else(|_| panic!("{what}: not within {BOUND:?}"))
}

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

/// Moves the paused clock by `step`, `times` times, letting the extend loop run
/// Takes `lock` away from its holder behind the layer's back: another
/// mutex with its value unlocks it on `sync`.
async fn steal<D: DistSync>(sync: &D, lock: &HeldLock, options: DistMutexOptions) {
    let mut thief = sync
        .new_mutex(lock.name(), options.with_value(lock.value()))
        .unwrap();
    thief.unlock().await.unwrap();
}

/// Moves the paused clock on by 100 ms steps until `lock` is reported lost.
async fn until_lost(lock: &HeldLock) {
    while !lock.is_lost() {
        step_clock(Duration::from_millis(100), 1, async || {}).await;
    }
}

/// after each step; `check` runs after each step.
async fn step_clock(step: Duration, times: u32, mut check: impl AsyncFnMut()) {
    for _ in 0..times {
        tokio::time::advance(step).await;
        settle().await;
        check().await;
    }
}

/// An expiry of 1 ms leaves no validity, and one of 2.5 ms without drift
/// factor leaves 0.5 ms, less than two of the extend loop's shortest interval
/// (1 ms): both are refused with `InvalidOptions` naming the problem when
/// the layer is built, so no request ever takes a lock whose validity ends
/// before its first extension.
#[test]
fn tiny_validity_is_refused() {
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
        let err = DistLockLayer::builder(MemorySync::new(), HeaderKey::new(KEY))
            .mutex_options(options)
            .build()
            .unwrap_err();
        assert!(matches!(err, Error::InvalidOptions { .. }), "{err:?}");
        assert!(err.to_string().contains(named), "{err}");
    }
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
            let mut builder = DistLockLayer::builder(sync.clone(), HeaderKey::new(KEY))
                .mutex_options(options)
                .wait(Duration::ZERO);
            if let Some(every) = every {
                builder = builder.extend_every(every);
            }
            let layer = builder.build().unwrap();
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

/// Calls of Lua scripts (`EVAL`, `EVALSHA` and their read-only forms) a
/// node has served, from `INFO commandstats`: every lock, extend and
/// unlock is one.
fn script_calls(node: &RedisServer) -> u64 {
    node.command_calls()
        .iter()
        .filter(|(name, _)| name.starts_with("eval"))
        .map(|(_, calls)| calls)
        .sum()
}

/// On the paused clock: while a request holds its lock, the extend loop extends
/// it once per interval; after the request ended and the lock was released
/// (one unlock), ten more intervals pass without a single extension, and
/// the name is free. After a loss (another owner with the value unlocked
/// it), the extend loop reports it at the first extension that fails, sends no
/// further extension, and still releases (one unlock attempt) when the
/// request ends.
#[tokio::test(start_paused = true)]
async fn no_extension_after_release_or_loss() {
    let sync = Counting::new(MemorySync::new());
    let options = DistMutexOptions::default().with_expiry(Duration::from_secs(3));
    let layer = DistLockLayer::builder(sync.clone(), HeaderKey::new(KEY))
        .mutex_options(options.clone())
        .wait(Duration::ZERO)
        .build()
        .unwrap();
    let interval = Duration::from_secs(1);
    let tenth = interval / 10;
    let (service, mut inside) = blocking(layer.clone());

    let request = spawn_request(&service, "release");
    let Inside { lock, go } = inside.recv().await.unwrap();
    step_clock(tenth, 25, async || {}).await;
    assert_eq!(sync.counts.extends(), 2, "one extension per interval");
    go.send(()).unwrap();
    assert_eq!(request.await.unwrap(), StatusCode::OK);
    lock.lost().await;
    settle().await;
    assert_eq!((sync.counts.unlocks(), layer.stats().local_keys()), (1, 0));
    step_clock(tenth, 100, async || {}).await;
    assert_eq!(sync.counts.extends(), 2, "an extension after the release");
    let mut probe = sync
        .inner
        .new_mutex(lock.name(), options.clone().with_tries(1))
        .unwrap();
    probe.lock().await.unwrap();
    probe.unlock().await.unwrap();

    let request = spawn_request(&service, "loss");
    let Inside { lock, go } = inside.recv().await.unwrap();
    steal(&sync.inner, &lock, options.clone()).await;
    let before = sync.counts.extends();
    let mut steps = 0;
    while !lock.is_lost() {
        step_clock(tenth, 1, async || {}).await;
        steps += 1;
        assert!(steps <= 10, "the loss was not reported within one interval");
    }
    assert_eq!(
        sync.counts.extends(),
        before + 1,
        "reported at the first failure"
    );
    step_clock(tenth, 100, async || {}).await;
    assert_eq!(
        sync.counts.extends(),
        before + 1,
        "an extension after the loss"
    );
    assert!(
        !request.is_finished(),
        "the handler still runs (OnLost::Notify)"
    );
    go.send(()).unwrap();
    assert_eq!(request.await.unwrap(), StatusCode::OK);
    settle().await;
    assert_eq!((sync.counts.unlocks(), layer.stats().local_keys()), (2, 0));
}

/// On Redis, an extension that the node refuses (the lock key deleted
/// behind the layer's back) is reported to the holder at once:
/// `HeldLock::lost()` resolves while the handler still runs, after the
/// first extension that could see it (no wait for the expiry, which is a
/// minute away). With the only node killed, the extensions fail without an
/// answer: they are retried, and the loss is reported when the validity
/// ends, not before.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_extension_is_reported_at_once() {
    for kill in [false, true] {
        let mut node = RedisServer::start();
        let sync = Counting::new(RedisSync::new([node.url()]).unwrap());
        let expiry = Duration::from_secs(if kill { 2 } else { 60 });
        let layer = DistLockLayer::builder(sync.clone(), HeaderKey::new(KEY))
            .mutex_options(DistMutexOptions::default().with_expiry(expiry))
            .extend_every(Duration::from_millis(20))
            .build()
            .unwrap();
        let (service, mut inside) = blocking(layer.clone());
        let request = spawn_request(&service, "fault");
        let Inside { lock, go } = bounded("inside", inside.recv()).await.unwrap();
        eventually(BOUND, "extensions run", async || sync.counts.extends() >= 2).await;
        assert!(!lock.is_lost());
        let before = sync.counts.extends();
        if kill {
            node.kill();
        } else {
            node.del(&format!("dsync:{}", lock.name()));
        }
        bounded("the loss is reported", lock.lost()).await;
        assert!(lock.is_lost());
        let after = sync.counts.extends();
        if kill {
            let until = lock.until().unwrap();
            assert!(
                Instant::now() >= until,
                "reported before the validity ended"
            );
            assert!(after > before + 1, "not retried");
        } else {
            assert!(
                after == before || after == before + 1,
                "reported after {} more extensions",
                after - before
            );
        }
        assert!(!request.is_finished(), "the handler still runs");
        go.send(()).unwrap();
        assert_eq!(bounded("response", request).await.unwrap(), StatusCode::OK);
        eventually(BOUND, "the local queue empties", async || {
            layer.stats().local_keys() == 0
        })
        .await;
    }
}

/// On Redis, nothing is extended after a release: once a request has
/// ended and its lock was released, its node serves not one more script
/// call (counted with `INFO commandstats`) while another request, on a
/// second node with the same extension interval, is extended ten times.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_extension_after_release_on_redis() {
    let nodes = RedisNodes::start(2);
    let options = DistMutexOptions::default().with_expiry(Duration::from_secs(10));
    let layer = |node: &RedisServer| {
        let sync = Counting::new(RedisSync::new([node.url()]).unwrap());
        let layer = DistLockLayer::builder(sync.clone(), HeaderKey::new(KEY))
            .mutex_options(options.clone())
            .extend_every(Duration::from_millis(20))
            .build()
            .unwrap();
        (sync, blocking(layer))
    };
    let (watched, (service, mut inside)) = layer(&nodes.servers[0]);
    let (clock, (clock_service, mut clock_inside)) = layer(&nodes.servers[1]);
    let clock_request = spawn_request(&clock_service, "clock");
    let clock_lock = bounded("inside", clock_inside.recv()).await.unwrap();

    let request = spawn_request(&service, "watched");
    let Inside { lock, go } = bounded("inside", inside.recv()).await.unwrap();
    eventually(BOUND, "extensions run", async || {
        watched.counts.extends() >= 2
    })
    .await;
    go.send(()).unwrap();
    assert_eq!(bounded("response", request).await.unwrap(), StatusCode::OK);
    bounded("release", lock.lost()).await;
    assert!(!lock.is_lost());
    let extends = watched.counts.extends();
    let calls = script_calls(&nodes.servers[0]);
    let ticks = clock.counts.extends();
    eventually(BOUND, "ten extension intervals pass", async || {
        clock.counts.extends() >= ticks + 10
    })
    .await;
    assert_eq!(
        watched.counts.extends(),
        extends,
        "an extension after the release"
    );
    assert_eq!(
        script_calls(&nodes.servers[0]),
        calls,
        "a script call after the release"
    );
    assert_eq!(
        nodes.servers[0].dbsize(),
        1,
        "only the fencing counter is left"
    );

    clock_lock.go.send(()).unwrap();
    assert_eq!(
        bounded("response", clock_request).await.unwrap(),
        StatusCode::OK
    );
}

/// Releasing a lock that already expired (and was not taken by anyone)
/// returns `Error::NotAcquired`, as documented, without waiting: on the
/// paused clock no time passes during `unlock`, `extend` fails the same
/// way and `valid` is false. Through the layer, a request whose lock
/// expired while it ran (past `max_hold`) is released at its end without
/// the clock moving (nothing waited for a timeout), and the next request
/// for the key is served at once.
#[tokio::test(start_paused = true)]
async fn releasing_an_expired_lock_in_process() {
    let sync = Counting::new(MemorySync::new());
    let options = DistMutexOptions::default().with_expiry(Duration::from_secs(1));
    let mut mutex = sync.inner.new_mutex("expired", options.clone()).unwrap();
    mutex.lock().await.unwrap();
    tokio::time::advance(Duration::from_secs(2)).await;
    let now = Instant::now();
    assert!(matches!(mutex.unlock().await, Err(Error::NotAcquired)));
    assert!(matches!(mutex.extend().await, Err(Error::NotAcquired)));
    assert!(!mutex.valid().await.unwrap());
    assert_eq!(Instant::now(), now, "no waiting");

    let layer = DistLockLayer::builder(sync.clone(), HeaderKey::new(KEY))
        .mutex_options(options.with_expiry(Duration::from_secs(3)))
        .max_hold(Duration::from_millis(500))
        .wait(Duration::ZERO)
        .build()
        .unwrap();
    let (service, mut inside) = blocking(layer.clone());
    let request = spawn_request(&service, "expired");
    let Inside { lock, go } = inside.recv().await.unwrap();
    step_clock(Duration::from_millis(100), 40, async || {}).await;
    assert!(lock.is_lost(), "past max_hold");
    assert_eq!(sync.counts.extends(), 0);
    // Expired in the backend: its own value no longer holds it.
    let probe = sync
        .inner
        .new_mutex(
            lock.name(),
            DistMutexOptions::default().with_value(lock.value()),
        )
        .unwrap();
    assert!(!probe.valid().await.unwrap());
    let now = Instant::now();
    go.send(()).unwrap();
    assert_eq!(request.await.unwrap(), StatusCode::OK);
    settle().await;
    assert_eq!((sync.counts.unlocks(), layer.stats().local_keys()), (1, 0));
    assert_eq!(Instant::now(), now, "the release waited for something");
    // The layer fails fast: a key still held would get 409.
    let next = spawn_request(&service, "expired");
    inside.recv().await.unwrap().go.send(()).unwrap();
    assert_eq!(next.await.unwrap(), StatusCode::OK);
}

/// On Redis (three nodes), releasing a lock that expired on every node
/// returns `NotAcquired`, as documented, and so do `extend` and `valid`
/// (false); with one node down the live two still rule out a quorum
/// (`NotAcquired`); with two down, the dead nodes could have made the
/// quorum, so the answer is `Unavailable` naming both. Each answer comes
/// within the per-node timeouts (a generous bound is only a safety net).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn releasing_an_expired_lock_on_redis() {
    let mut nodes = RedisNodes::start(3);
    let sync = RedisSync::new(nodes.urls()).unwrap();
    let options = DistMutexOptions::default()
        .with_expiry(Duration::from_millis(300))
        .with_timeout_factor(0.5)
        .with_tries(1);
    let mut mutex = sync.new_mutex("expired", options).unwrap();
    let key = mutex.key().to_owned();
    for down in 0..3 {
        bounded("lock", mutex.lock()).await.unwrap();
        if down > 0 {
            nodes.servers[3 - down].kill();
        }
        eventually(BOUND, "expired on every live node", async || {
            nodes.count_key(&key) == 0
        })
        .await;
        let released = bounded("unlock", mutex.unlock()).await;
        match (down, released) {
            (0 | 1, Err(Error::NotAcquired)) => {}
            (
                2,
                Err(Error::Unavailable {
                    quorum: 2,
                    failures,
                }),
            ) => {
                let named: Vec<&str> = failures.iter().map(|f| f.node()).collect();
                let dead: Vec<String> = nodes.servers[1..]
                    .iter()
                    .map(|s| format!("127.0.0.1:{}", s.port()))
                    .collect();
                assert_eq!(named, dead);
            }
            (down, other) => panic!("{down} node(s) down: {other:?}"),
        }
        if down == 0 {
            assert!(matches!(mutex.extend().await, Err(Error::NotAcquired)));
            assert!(!mutex.valid().await.unwrap());
        }
    }
}

/// A 5 ms expiry on Redis leaves each node 0.25 ms to answer: requests
/// through the layer are served (200; most of them on loopback) or refused
/// as unavailable (503) or, should a release have timed out, busy (409):
/// never a 500 or a panic, and no lock key outlives them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tiny_expiry_on_redis_is_handled() {
    let nodes = RedisNodes::start(1);
    let sync = RedisSync::new(nodes.urls()).unwrap();
    let layer = DistLockLayer::builder(sync, HeaderKey::new(KEY))
        .mutex_options(DistMutexOptions::default().with_expiry(Duration::from_millis(5)))
        .wait(Duration::from_millis(50))
        .build()
        .unwrap();
    let service = ServiceBuilder::new()
        .layer(layer.clone())
        .service_fn(|_: Request<()>| async { Ok::<_, Infallible>(Response::new(String::new())) });
    for _ in 0..20 {
        let request = Request::builder().header(KEY, "tiny").body(()).unwrap();
        let response = bounded("request", service.clone().oneshot(request))
            .await
            .unwrap();
        assert!(
            [
                StatusCode::OK,
                StatusCode::CONFLICT,
                StatusCode::SERVICE_UNAVAILABLE
            ]
            .contains(&response.status()),
            "{}",
            response.status()
        );
        bounded("body", response.into_body().collect())
            .await
            .unwrap();
    }
    eventually(BOUND, "no lock key left", async || {
        nodes.total_keys() == 0 && layer.stats().local_keys() == 0
    })
    .await;
}

/// A backend whose extensions answer `delay` after they took effect, as a
/// slow network does: the validity of an extension counts from its start
/// (as on Redis), but the extend loop learns it only at the end. While `failing`
/// is set, an extension does not reach the backend and fails with a
/// timeout after `delay`.
#[derive(Debug, Clone)]
struct Slow<S> {
    inner: S,
    delay: Duration,
    failing: Arc<AtomicBool>,
    extends: Arc<AtomicUsize>,
}

impl<S> Slow<S> {
    fn new(inner: S, delay: Duration) -> Self {
        Slow {
            inner,
            delay,
            failing: Arc::default(),
            extends: Arc::default(),
        }
    }

    fn fail(&self, failing: bool) {
        self.failing.store(failing, Ordering::SeqCst);
    }

    fn extends(&self) -> usize {
        self.extends.load(Ordering::SeqCst)
    }
}

impl<S: DistSync> DistSync for Slow<S> {
    type Mutex = SlowMutex<S::Mutex>;

    fn new_mutex(&self, name: &str, options: DistMutexOptions) -> tower_dsync::Result<Self::Mutex> {
        Ok(SlowMutex {
            inner: self.inner.new_mutex(name, options)?,
            sync: Slow {
                inner: (),
                delay: self.delay,
                failing: self.failing.clone(),
                extends: self.extends.clone(),
            },
        })
    }

    fn separator(&self) -> &str {
        self.inner.separator()
    }
}

#[derive(Debug)]
struct SlowMutex<M> {
    inner: M,
    sync: Slow<()>,
}

impl<M: DistMutex> DistMutex for SlowMutex<M> {
    fn name(&self) -> &str {
        self.inner.name()
    }
    fn value(&self) -> &str {
        self.inner.value()
    }
    fn until(&self) -> Option<Instant> {
        self.inner.until()
    }
    fn fencing_token(&self) -> Option<u64> {
        self.inner.fencing_token()
    }
    async fn lock(&mut self) -> tower_dsync::Result<()> {
        self.inner.lock().await
    }
    async fn unlock(&mut self) -> tower_dsync::Result<()> {
        self.inner.unlock().await
    }
    async fn extend(&mut self) -> tower_dsync::Result<()> {
        self.sync.extends.fetch_add(1, Ordering::SeqCst);
        if self.sync.failing.load(Ordering::SeqCst) {
            tokio::time::sleep(self.sync.delay).await;
            return Err(Error::Timeout {
                after: self.sync.delay,
                nodes: vec!["slow".into()],
            });
        }
        self.inner.extend().await?;
        tokio::time::sleep(self.sync.delay).await;
        Ok(())
    }
    async fn valid(&self) -> tower_dsync::Result<bool> {
        self.inner.valid().await
    }
    fn try_lock_now(
        &mut self,
        fast_path: tower_dsync::FastPath,
    ) -> Option<tower_dsync::Result<()>> {
        self.inner.try_lock_now(fast_path)
    }
    fn try_unlock_now(
        &mut self,
        fast_path: tower_dsync::FastPath,
    ) -> Option<tower_dsync::Result<()>> {
        self.inner.try_unlock_now(fast_path)
    }
}

/// Extensions that take 40% of the expiry to answer: the extend loop starts
/// each one early enough to learn of it before the validity it extends
/// ends, so through twenty expiries (the clock moved in tenths of a
/// second) the lock is never lost, its validity end is always ahead, and
/// another owner cannot take the name. Extensions that take 70% cannot
/// keep a lock (each would have to start before the last one answered):
/// the loss is reported when the validity ends, never later.
#[tokio::test(start_paused = true)]
async fn slow_extensions_land_before_the_validity_ends() {
    let expiry = Duration::from_secs(3);
    for (percent, kept) in [(40, true), (70, false)] {
        let sync = Slow::new(MemorySync::new(), expiry * percent / 100);
        let layer = DistLockLayer::builder(sync.clone(), HeaderKey::new(KEY))
            .mutex_options(DistMutexOptions::default().with_expiry(expiry))
            .wait(Duration::ZERO)
            .build()
            .unwrap();
        let (service, mut inside) = blocking(layer);
        let request = spawn_request(&service, "slow");
        let Inside { lock, go } = inside.recv().await.unwrap();
        let mut probe = sync
            .inner
            .new_mutex(lock.name(), DistMutexOptions::default().with_tries(1))
            .unwrap();
        step_clock(Duration::from_millis(100), 20 * 30, async || {
            let case = format!("extensions taking {percent}% of the expiry");
            assert!(
                lock.is_lost() || lock.until().unwrap() > Instant::now(),
                "{case}: the validity ended, unreported"
            );
            if kept {
                assert!(!lock.is_lost(), "{case}: lost");
                assert!(
                    matches!(probe.lock().await, Err(Error::Held { .. })),
                    "{case}: another owner got in"
                );
            }
        })
        .await;
        assert_eq!(lock.is_lost(), !kept);
        if kept {
            assert!(sync.extends() >= 20, "{}", sync.extends());
        }
        go.send(()).unwrap();
        assert_eq!(request.await.unwrap(), StatusCode::OK);
    }
}

/// Extensions that fail with a timeout while validity is left are retried,
/// spaced out: a backend that fails for a while and then answers again
/// never costs the lock. One that keeps failing costs it exactly when the
/// validity ends: `is_lost()` is false before and true from then on, not
/// at the first failure.
#[tokio::test(start_paused = true)]
async fn failed_extensions_are_retried_until_the_validity_ends() {
    let sync = Slow::new(MemorySync::new(), Duration::ZERO);
    let layer = DistLockLayer::builder(sync.clone(), HeaderKey::new(KEY))
        .mutex_options(DistMutexOptions::default().with_expiry(Duration::from_secs(3)))
        .wait(Duration::ZERO)
        .build()
        .unwrap();
    let (service, mut inside) = blocking(layer);
    let request = spawn_request(&service, "flaky");
    let Inside { lock, go } = inside.recv().await.unwrap();
    let tenth = Duration::from_millis(100);
    while sync.extends() < 1 {
        step_clock(tenth, 1, async || {}).await;
    }

    // A failure for one second (a third of the validity) from the first
    // failed extension: retried, and the lock is kept.
    sync.fail(true);
    let failing_from = sync.extends();
    while sync.extends() == failing_from {
        step_clock(tenth, 1, async || {}).await;
    }
    step_clock(tenth, 10, async || {
        assert!(!lock.is_lost(), "lost at a retryable failure")
    })
    .await;
    assert!(
        sync.extends() > failing_from + 1,
        "not retried: {} extension(s) failed",
        sync.extends() - failing_from
    );
    sync.fail(false);
    let before = lock.until().unwrap();
    while lock.until().unwrap() == before {
        assert!(!lock.is_lost());
        assert!(before > Instant::now(), "not extended within the validity");
        step_clock(tenth, 1, async || {}).await;
    }

    // A failure for good: lost when the validity ends, not before.
    sync.fail(true);
    let until = lock.until().unwrap();
    let failing_from = sync.extends();
    while Instant::now() < until + Duration::from_secs(1) {
        step_clock(tenth, 1, async || {}).await;
        assert_eq!(
            lock.is_lost(),
            Instant::now() >= until,
            "lost at {:?} of a validity ending at {:?}",
            Instant::now(),
            until
        );
    }
    assert!(sync.extends() > failing_from + 1, "not retried");
    let after_loss = sync.extends();
    step_clock(tenth, 30, async || {}).await;
    assert_eq!(sync.extends(), after_loss, "an extension after the loss");
    go.send(()).unwrap();
    assert_eq!(request.await.unwrap(), StatusCode::OK);
}

/// A lost lock frees the key in this process at once: with the response
/// body never polled, the extend loop releases what remains of the lock and
/// passes the turn on, so `held_locks()` drops to zero and the next
/// request for the key is served (not 409) while the first response still
/// exists.
#[tokio::test(start_paused = true)]
async fn a_lost_lock_frees_the_key_without_a_poll() {
    let sync = Counting::new(MemorySync::new());
    let options = DistMutexOptions::default().with_expiry(Duration::from_secs(3));
    let layer = DistLockLayer::builder(sync.clone(), HeaderKey::new(KEY))
        .mutex_options(options.clone())
        .wait(Duration::ZERO)
        .build()
        .unwrap();
    let (service, mut inside) = blocking(layer.clone());
    let request = spawn_request(&service, "lost");
    let Inside { lock, go } = inside.recv().await.unwrap();
    steal(&sync.inner, &lock, options).await;
    until_lost(&lock).await;
    settle().await;
    assert_eq!(
        layer.stats().held_locks(),
        0,
        "the lost lock is still counted"
    );
    let next = spawn_request(&service, "lost");
    let second = inside.recv().await.unwrap();
    second.go.send(()).unwrap();
    assert_eq!(next.await.unwrap(), StatusCode::OK);
    go.send(()).unwrap();
    assert_eq!(request.await.unwrap(), StatusCode::OK);
}

/// With `OnLost::Abort`, a lock lost while its response body is never
/// polled (lost to another owner, or past `max_hold`) frees the key in
/// this process at once: `held_locks()` drops to zero and the next request
/// for the key is served; the old body, polled only then, ends with an
/// error instead of its data.
#[tokio::test(start_paused = true)]
async fn abort_frees_the_key_while_the_body_is_never_polled() {
    for by_max_hold in [false, true] {
        let sync = Counting::new(MemorySync::new());
        let options = DistMutexOptions::default().with_expiry(Duration::from_secs(3));
        let mut builder = DistLockLayer::builder(sync.clone(), HeaderKey::new(KEY))
            .mutex_options(options.clone())
            .on_lost(OnLost::Abort)
            .wait(Duration::ZERO);
        if by_max_hold {
            builder = builder.max_hold(Duration::from_millis(500));
        }
        let layer = builder.build().unwrap();
        let (service, mut inside) = blocking(layer.clone());
        let request = Request::builder().header(KEY, "kept").body(()).unwrap();
        let first = tokio::spawn(service.clone().oneshot(request));
        let Inside { lock, go } = inside.recv().await.unwrap();
        go.send(()).unwrap();
        let response = first.await.unwrap().unwrap();
        assert_eq!(response.status(), StatusCode::OK);
        assert_eq!(layer.stats().held_locks(), 1, "the body holds the lock");
        if !by_max_hold {
            steal(&sync.inner, &lock, options).await;
        }
        until_lost(&lock).await;
        settle().await;
        assert_eq!(
            layer.stats().held_locks(),
            0,
            "the lost lock is still counted (max_hold: {by_max_hold})"
        );
        let next = spawn_request(&service, "kept");
        let second = inside.recv().await.unwrap();
        second.go.send(()).unwrap();
        assert_eq!(
            next.await.unwrap(),
            StatusCode::OK,
            "max_hold: {by_max_hold}"
        );
        let old = response.into_body().collect().await;
        assert!(
            old.is_err(),
            "the aborted body gave its data (max_hold: {by_max_hold})"
        );
    }
}
