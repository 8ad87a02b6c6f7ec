//! Certificates made for a test with the `openssl` command line (a CA, a
//! server certificate for 127.0.0.1 signed by it, and a client certificate
//! for mutual TLS), and `redis-server`s that serve TLS on a port of their
//! own beside their plain port (which the harness keeps using).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicU64, Ordering};

use super::{RedisServer, free_port};

/// A CA and the certificates it signed, as files and as PEM bytes.
pub struct Certificates {
    dir: PathBuf,
    /// The CA's certificate (PEM).
    pub ca: Vec<u8>,
    /// The client's certificate and key (PEM), for mutual TLS.
    pub client_cert: Vec<u8>,
    pub client_key: Vec<u8>,
}

impl Certificates {
    /// Makes a CA, a server certificate for 127.0.0.1 and a client
    /// certificate, in a fresh directory.
    pub fn make() -> Certificates {
        static MADE: AtomicU64 = AtomicU64::new(0);
        let dir = std::env::temp_dir().join(format!(
            "tower-dsync-tls-{}-{}",
            std::process::id(),
            MADE.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let openssl = |args: &[&str]| {
            let status = Command::new("openssl")
                .args(args)
                .current_dir(&dir)
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::null())
                .status()
                .expect("the openssl command line (apt-get install openssl)");
            assert!(status.success(), "openssl {args:?}");
        };
        openssl(&[
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            "ca.key",
            "-out",
            "ca.crt",
            "-days",
            "2",
            "-subj",
            "/CN=tower-dsync test CA",
        ]);
        std::fs::write(dir.join("server.ext"), "subjectAltName=IP:127.0.0.1\n").unwrap();
        std::fs::write(dir.join("client.ext"), "extendedKeyUsage=clientAuth\n").unwrap();
        for (name, cn) in [
            ("server", "127.0.0.1"),
            ("client", "tower-dsync test client"),
        ] {
            openssl(&[
                "req",
                "-newkey",
                "rsa:2048",
                "-nodes",
                "-keyout",
                &format!("{name}.key"),
                "-out",
                &format!("{name}.csr"),
                "-subj",
                &format!("/CN={cn}"),
            ]);
            openssl(&[
                "x509",
                "-req",
                "-in",
                &format!("{name}.csr"),
                "-CA",
                "ca.crt",
                "-CAkey",
                "ca.key",
                "-CAcreateserial",
                "-out",
                &format!("{name}.crt"),
                "-days",
                "2",
                "-extfile",
                &format!("{name}.ext"),
            ]);
        }
        let read = |file: &str| std::fs::read(dir.join(file)).unwrap();
        Certificates {
            ca: read("ca.crt"),
            client_cert: read("client.crt"),
            client_key: read("client.key"),
            dir,
        }
    }

    fn path(&self, file: &str) -> String {
        Path::new(&self.dir)
            .join(file)
            .to_string_lossy()
            .into_owned()
    }

    /// Starts a server that also serves TLS with these certificates, on a
    /// port of its own; with `clients_must_prove`, clients must show a
    /// certificate signed by the CA (mutual TLS). Returns the server and
    /// its TLS port.
    pub fn start_server(&self, clients_must_prove: bool) -> (RedisServer, u16) {
        let tls_port = free_port();
        let args = [
            "--tls-port",
            &tls_port.to_string(),
            "--tls-cert-file",
            &self.path("server.crt"),
            "--tls-key-file",
            &self.path("server.key"),
            "--tls-ca-cert-file",
            &self.path("ca.crt"),
            "--tls-auth-clients",
            if clients_must_prove { "yes" } else { "no" },
        ]
        .map(String::from)
        .to_vec();
        (RedisServer::start_with_args(free_port, &args), tls_port)
    }
}

impl Drop for Certificates {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
