//! Test harness: real `redis-server` processes on free loopback ports.
//!
//! Each [`RedisServer`] is started with no persistence (or, with
//! [`RedisServer::start_persistent`], an append-only file fsynced at every
//! write), waits until it answers `PING`, and is killed when dropped, also
//! when the test panics. A test can kill a node, pause it (`SIGSTOP`) and
//! resume it (`SIGCONT`), or restart it on the same port: empty, or from
//! its append-only file. A server can require a password
//! (`requirepass`). The machine's shared instance on 6379 is never used.
//! [`cluster::RedisCluster`] starts a Redis Cluster of such servers.

#![allow(dead_code)]

pub mod cluster;
pub mod counting;
pub mod http;
pub mod proxy;
pub mod remote;
pub mod tls;

use std::io::ErrorKind;
use std::net::{Ipv4Addr, SocketAddr, TcpListener};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// One `redis-server` process on 127.0.0.1.
pub struct RedisServer {
    port: u16,
    child: Option<Child>,
    paused: bool,
    dir: PathBuf,
    /// The `requirepass` password, if the server asks for one.
    password: Option<String>,
    /// `appendonly yes`, `appendfsync always`: a restart keeps every write
    /// the server acknowledged.
    persistent: bool,
    /// Configuration arguments after the usual ones (`--cluster-enabled
    /// yes`, say); a restart passes them again.
    extra_args: Vec<String>,
}

impl RedisServer {
    /// Starts a server on a free port.
    pub fn start() -> RedisServer {
        Self::start_with(None)
    }

    /// Starts a server on a free port that refuses every command until a
    /// client authenticates with `password` (`requirepass`).
    pub fn start_with_password(password: &str) -> RedisServer {
        Self::start_with(Some(password.to_owned()))
    }

    /// Starts a server on a free port that writes an append-only file and
    /// fsyncs it at every write (`appendfsync always`), so that a restart,
    /// even after a kill, keeps every write it acknowledged.
    pub fn start_persistent() -> RedisServer {
        Self::start_as(None, true)
    }

    fn start_with(password: Option<String>) -> RedisServer {
        Self::start_as(password, false)
    }

    fn start_as(password: Option<String>, persistent: bool) -> RedisServer {
        Self::start_configured(free_port, password, persistent, &[])
    }

    /// Starts a server without persistence on a port from `port` (called
    /// again when the server cannot bind it), with `extra_args` after the
    /// usual configuration. The server runs in a fresh directory of its
    /// own, which a restart keeps (a cluster node's `nodes.conf`, say) and
    /// the drop removes.
    pub(crate) fn start_with_args(port: impl FnMut() -> u16, extra_args: &[String]) -> RedisServer {
        Self::start_configured(port, None, false, extra_args)
    }

    /// Starts a replica of `master` (`replicaof`), and waits until its link
    /// to the master is up.
    pub fn start_replica_of(master: &RedisServer) -> RedisServer {
        let args = ["--replicaof", "127.0.0.1", &master.port().to_string()]
            .map(String::from)
            .to_vec();
        let replica = Self::start_with_args(free_port, &args);
        wait_for("the replica's link to its master is up", || {
            let info: String = redis::cmd("INFO")
                .arg("replication")
                .query(&mut replica.connection())
                .map_err(|e| e.to_string())?;
            match field(&info, "master_link_status") {
                Some("up") => Ok(()),
                status => Err(format!("master_link_status {status:?}")),
            }
        });
        replica
    }

    fn start_configured(
        mut port: impl FnMut() -> u16,
        password: Option<String>,
        persistent: bool,
        extra_args: &[String],
    ) -> RedisServer {
        for _ in 0..20 {
            let port = port();
            if let Some(server) =
                Self::try_start_on(port, password.clone(), persistent, extra_args.to_vec())
            {
                return server;
            }
        }
        panic!("could not start redis-server on a free port after 20 tries");
    }

    fn try_start_on(
        port: u16,
        password: Option<String>,
        persistent: bool,
        extra_args: Vec<String>,
    ) -> Option<RedisServer> {
        // One directory per server, never shared: nothing from an earlier
        // server on this port is loaded, and a server being dropped cannot
        // remove a newer one's files.
        static SERVERS: AtomicU64 = AtomicU64::new(0);
        let dir = std::env::temp_dir().join(format!(
            "tower-dsync-redis-{port}-{}-{}",
            std::process::id(),
            SERVERS.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("create the server's directory");
        let child = spawn_redis(port, &dir, password.as_deref(), persistent, &extra_args);
        let mut server = RedisServer {
            port,
            child: Some(child),
            paused: false,
            dir,
            password,
            persistent,
            extra_args,
        };
        if server.wait_ready() {
            Some(server)
        } else {
            let _ = std::fs::remove_dir_all(&server.dir);
            None
        }
    }

    /// `redis://127.0.0.1:PORT`, without credentials.
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// `redis://:PASSWORD@127.0.0.1:PORT` with the server's password (the
    /// plain URL when it has none).
    pub fn authenticated_url(&self) -> String {
        authenticated_url(self.port, self.password.as_deref())
    }

    /// The port.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// Whether the process runs (it was not killed), paused or not.
    pub fn is_running(&self) -> bool {
        self.child.is_some()
    }

    /// Whether the process runs and is not paused, so that it answers.
    pub fn is_live(&self) -> bool {
        self.is_running() && !self.paused
    }

    /// Kills the process (`SIGKILL`); the port stays reserved for a restart.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        self.paused = false;
    }

    /// Pauses the process with `SIGSTOP`: connections stay open, nothing
    /// answers.
    pub fn pause(&mut self) {
        self.signal("-STOP");
        self.paused = true;
    }

    /// Resumes a paused process with `SIGCONT`.
    pub fn resume(&mut self) {
        self.signal("-CONT");
        self.paused = false;
    }

    /// Kills the process if it runs, and starts a new one on the same port
    /// and in the same directory, with the same configuration: empty, or,
    /// for a persistent server, with every write the old one acknowledged.
    pub fn restart(&mut self) {
        self.kill();
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            self.child = Some(spawn_redis(
                self.port,
                &self.dir,
                self.password.as_deref(),
                self.persistent,
                &self.extra_args,
            ));
            if self.wait_ready() {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "redis-server did not restart on port {}",
                self.port
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// A plain synchronous connection, for assertions.
    pub fn connection(&self) -> redis::Connection {
        let client = redis::Client::open(self.authenticated_url()).expect("client");
        let con = client
            .get_connection_with_timeout(Duration::from_secs(5))
            .expect("connect to the test server");
        con.set_read_timeout(Some(Duration::from_secs(5)))
            .expect("timeout");
        con
    }

    /// The number of keys in database 0.
    pub fn dbsize(&self) -> u64 {
        redis::cmd("DBSIZE")
            .query(&mut self.connection())
            .expect("DBSIZE")
    }

    /// Whether `key` exists.
    pub fn exists(&self, key: &str) -> bool {
        redis::cmd("EXISTS")
            .arg(key)
            .query(&mut self.connection())
            .expect("EXISTS")
    }

    /// How many members the sorted set `key` has (how many processes wait
    /// in a wait queue).
    pub fn zcard(&self, key: &str) -> usize {
        redis::cmd("ZCARD")
            .arg(key)
            .query(&mut self.connection())
            .expect("ZCARD")
    }

    /// Deletes `key` behind the lock's back.
    pub fn del(&self, key: &str) {
        let _: i64 = redis::cmd("DEL")
            .arg(key)
            .query(&mut self.connection())
            .expect("DEL");
    }

    /// Calls per command since the statistics were last reset (`INFO
    /// commandstats`; Redis counts the commands Lua scripts run too),
    /// leaving out the harness's own (`INFO`, `CONFIG`, `FLUSHALL`).
    pub fn command_calls(&self) -> std::collections::BTreeMap<String, u64> {
        let info: String = redis::cmd("INFO")
            .arg("commandstats")
            .query(&mut self.connection())
            .expect("INFO commandstats");
        info.lines()
            .filter_map(|line| {
                let (name, stats) = line.strip_prefix("cmdstat_")?.split_once(':')?;
                let calls = stats.split(',').find_map(|f| f.strip_prefix("calls="))?;
                Some((name.to_owned(), calls.parse().ok()?))
            })
            .filter(|(name, _)| {
                !(name == "info" || name.starts_with("config") || name == "flushall")
            })
            .collect()
    }

    /// Calls of `command` since the statistics were last reset.
    pub fn calls(&self, command: &str) -> u64 {
        self.command_calls().get(command).copied().unwrap_or(0)
    }

    /// Zeroes the command statistics.
    pub fn reset_stats(&self) {
        let _: () = redis::cmd("CONFIG")
            .arg("RESETSTAT")
            .query(&mut self.connection())
            .expect("CONFIG RESETSTAT");
    }

    fn signal(&self, signal: &str) {
        let pid = self.child.as_ref().expect("the server is running").id();
        let status = Command::new("kill")
            .args([signal, &pid.to_string()])
            .status()
            .expect("run kill");
        assert!(status.success(), "kill {signal} {pid} failed");
    }

    /// Waits until the server answers PING; false if the process exited
    /// (its port was taken, say).
    fn wait_ready(&mut self) -> bool {
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            if let Some(child) = self.child.as_mut()
                && let Ok(Some(_)) = child.try_wait()
            {
                self.child = None;
                return false;
            }
            if ping(self.port, self.password.as_deref()) {
                return true;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        panic!("redis-server on port {} did not answer PING", self.port);
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.kill();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Several independent servers.
pub struct RedisNodes {
    pub servers: Vec<RedisServer>,
}

impl RedisNodes {
    /// Starts `n` servers, marked as a deployment in use (see
    /// [`settle`](Self::settle)).
    pub fn start(n: usize) -> RedisNodes {
        let nodes = Self::start_new(n);
        nodes.settle();
        nodes
    }

    /// Starts `n` servers as a new deployment: with Redlock, their first
    /// locks wait one expiry, since nothing tells them from nodes that
    /// restarted empty while locks were held.
    pub fn start_new(n: usize) -> RedisNodes {
        RedisNodes {
            servers: (0..n).map(|_| RedisServer::start()).collect(),
        }
    }

    /// Starts `n` persistent servers (see [`RedisServer::start_persistent`]),
    /// marked as a deployment in use.
    pub fn start_persistent(n: usize) -> RedisNodes {
        let nodes = RedisNodes {
            servers: (0..n).map(|_| RedisServer::start_persistent()).collect(),
        };
        nodes.settle();
        nodes
    }

    /// Marks every node as counting for new locks at once, as an operator
    /// marks a deployment known to hold no lock (with the default key
    /// prefix): `HSET 'dsync:\x1fnode' born 0`. A node restarted later
    /// loses the mark, as a real one does.
    pub fn settle(&self) {
        for server in &self.servers {
            let _: () = redis::cmd("HSET")
                .arg("dsync:\u{1f}node")
                .arg("born")
                .arg(0)
                .query(&mut server.connection())
                .expect("HSET");
        }
    }

    /// Their URLs.
    pub fn urls(&self) -> Vec<String> {
        self.servers.iter().map(RedisServer::url).collect()
    }

    /// On how many nodes `key` exists.
    pub fn count_key(&self, key: &str) -> usize {
        self.servers
            .iter()
            .filter(|s| s.child.is_some() && !s.paused && s.exists(key))
            .count()
    }

    /// On how many running, unpaused nodes `key` holds `value`.
    pub fn count_value(&self, key: &str, value: &str) -> usize {
        self.servers
            .iter()
            .filter(|s| s.child.is_some() && !s.paused)
            .filter(|s| {
                let current: Option<String> = redis::cmd("GET")
                    .arg(key)
                    .query(&mut s.connection())
                    .expect("GET");
                current.as_deref() == Some(value)
            })
            .count()
    }

    /// Lock keys over the running, unpaused nodes (fencing counters, which
    /// are kept on purpose, are not counted).
    pub fn total_keys(&self) -> u64 {
        self.servers
            .iter()
            .filter(|s| s.child.is_some() && !s.paused)
            .map(|s| {
                let keys: Vec<String> = redis::cmd("KEYS")
                    .arg("*")
                    .query(&mut s.connection())
                    .expect("KEYS");
                keys.iter().filter(|k| !k.contains('\u{1f}')).count() as u64
            })
            .sum()
    }
}

fn spawn_redis(
    port: u16,
    dir: &std::path::Path,
    password: Option<&str>,
    persistent: bool,
    extra_args: &[String],
) -> Child {
    let port_arg = port.to_string();
    let mut command = Command::new("redis-server");
    if let Some(password) = password {
        command.args(["--requirepass", password]);
    }
    let appendonly: &[&str] = if persistent {
        &["--appendonly", "yes", "--appendfsync", "always"]
    } else {
        &["--appendonly", "no"]
    };
    let result = command
        .args(["--port", &port_arg, "--bind", "127.0.0.1", "--save", ""])
        .args(appendonly)
        .args([
            "--protected-mode",
            "no",
            "--daemonize",
            "no",
            "--loglevel",
            "warning",
        ])
        .arg("--dir")
        .arg(dir)
        .args(extra_args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn();
    match result {
        Ok(child) => child,
        Err(e) if e.kind() == ErrorKind::NotFound => panic!(
            "redis-server was not found on PATH. The Redis tests start their own servers: \
             install it with `sudo apt-get install redis-server` (Debian, Ubuntu) or \
             `brew install redis` (macOS), then run the tests again."
        ),
        Err(e) => panic!("could not start redis-server: {e}"),
    }
}

/// A loopback port that nothing listens on (at the time of the call).
pub fn free_port() -> u16 {
    let listener = TcpListener::bind(SocketAddr::from((Ipv4Addr::LOCALHOST, 0))).expect("bind");
    listener.local_addr().expect("local addr").port()
}

fn authenticated_url(port: u16, password: Option<&str>) -> String {
    match password {
        Some(password) => format!("redis://:{password}@127.0.0.1:{port}"),
        None => format!("redis://127.0.0.1:{port}"),
    }
}

fn ping(port: u16, password: Option<&str>) -> bool {
    let Ok(client) = redis::Client::open(authenticated_url(port, password)) else {
        return false;
    };
    let Ok(mut con) = client.get_connection_with_timeout(Duration::from_millis(200)) else {
        return false;
    };
    let _ = con.set_read_timeout(Some(Duration::from_millis(500)));
    redis::cmd("PING")
        .query::<String>(&mut con)
        .is_ok_and(|pong| pong == "PONG")
}

/// Polls `check` every few milliseconds until it holds; panics after
/// `bound`. For outcomes that follow a response in the background (the
/// slowest node's commands, say).
pub async fn wait_until(bound: Duration, what: &str, mut check: impl FnMut() -> bool) {
    let deadline = Instant::now() + bound;
    while !check() {
        assert!(Instant::now() < deadline, "not within {bound:?}: {what}");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// How long a wait for a server's state may take before the test fails.
pub const BOUND: Duration = Duration::from_secs(30);

/// How often such a wait asks again.
const POLL: Duration = Duration::from_millis(20);

/// `name:value` in an `INFO` or `CLUSTER INFO` reply.
pub fn field<'a>(info: &'a str, name: &str) -> Option<&'a str> {
    info.lines().find_map(|line| {
        let (key, value) = line.trim_end().split_once(':')?;
        (key == name).then_some(value)
    })
}

/// Polls `check` until it returns a value; panics after [`BOUND`] with
/// `what` and the last error.
pub fn wait_for<T>(what: &str, mut check: impl FnMut() -> Result<T, String>) -> T {
    let deadline = Instant::now() + BOUND;
    loop {
        match check() {
            Ok(value) => return value,
            Err(e) if Instant::now() >= deadline => {
                panic!("not within {BOUND:?}: {what} (last: {e})")
            }
            Err(_) => std::thread::sleep(POLL),
        }
    }
}
