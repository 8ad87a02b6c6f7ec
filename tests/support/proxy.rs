//! A TCP proxy in front of one server whose client-to-server direction the
//! test can hold: bytes a client sends while held are kept, in order, and
//! reach the server when the test lets them go. So a test can delay one
//! process's commands to one node while other processes reach it at once,
//! as a slow network path would.

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinHandle;

/// A proxy on a free loopback port; stops when dropped.
pub struct Proxy {
    port: u16,
    open: watch::Sender<bool>,
    task: JoinHandle<()>,
}

impl Proxy {
    /// Forwards every connection to `127.0.0.1:target`, open at first.
    pub async fn start(target: u16) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let port = listener.local_addr().expect("local addr").port();
        let (open, _) = watch::channel(true);
        let gate = open.clone();
        let task = tokio::spawn(async move {
            // Dropped with this task: every connection ends with the proxy.
            let mut connections = tokio::task::JoinSet::new();
            while let Ok((client, _)) = listener.accept().await {
                connections.spawn(forward(client, target, gate.subscribe()));
            }
        });
        Proxy { port, open, task }
    }

    /// `redis://127.0.0.1:PORT` of the proxy.
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// Keeps what clients send from now on, until [`Proxy::release`].
    pub fn hold(&self) {
        self.open.send_replace(false);
    }

    /// Sends on what was kept, and everything after it.
    pub fn release(&self) {
        self.open.send_replace(true);
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn forward(client: TcpStream, target: u16, mut open: watch::Receiver<bool>) {
    let Ok(server) = TcpStream::connect(("127.0.0.1", target)).await else {
        return;
    };
    let (mut from_client, mut to_client) = client.into_split();
    let (mut from_server, mut to_server) = server.into_split();
    let upstream = async {
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            let n = match from_client.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => n,
            };
            // Read before the hold, sent after it: still held.
            if open.wait_for(|open| *open).await.is_err()
                || to_server.write_all(&buf[..n]).await.is_err()
            {
                return;
            }
        }
    };
    let downstream = async {
        let _ = tokio::io::copy(&mut from_server, &mut to_client).await;
    };
    tokio::select! {
        () = upstream => {}
        () = downstream => {}
    }
}
