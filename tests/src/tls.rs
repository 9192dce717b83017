//! Certificates for tests of TLS connections: a certificate authority of the test's own and a
//! server certificate it signed for the loopback address, made with the `openssl` command (as
//! an operator would), in a temporary folder removed when the value is dropped.

use std::path::{Path, PathBuf};
use std::process::Command;

use tempfile::TempDir;

/// A CA, a server certificate for `127.0.0.1` and `localhost`, and a client certificate (for
/// mutual TLS), as PEM files.
pub struct TestCa {
    dir: TempDir,
}

impl TestCa {
    /// A new CA named `name` (its subject's common name) and the server and client
    /// certificates it signed.
    pub fn new(name: &str) -> TestCa {
        let dir = tempfile::Builder::new()
            .prefix("meterline-tls-")
            .tempdir()
            .expect("creating a temporary folder for certificates");
        let ca = TestCa { dir };
        ca.openssl(&[
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "2",
            "-subj",
            &format!("/CN={name}"),
            "-keyout",
            "ca.key",
            "-out",
            "ca.pem",
        ]);
        ca.issue(
            "server",
            "/CN=127.0.0.1",
            "subjectAltName = IP:127.0.0.1, DNS:localhost\nextendedKeyUsage = serverAuth\n",
        );
        ca.issue("client", "/CN=meterline", "extendedKeyUsage = clientAuth\n");
        ca
    }

    /// The CA's certificate: what a client trusts.
    pub fn ca_pem(&self) -> PathBuf {
        self.path("ca.pem")
    }

    /// The server's certificate, signed by the CA.
    pub fn server_pem(&self) -> PathBuf {
        self.path("server.pem")
    }

    /// The server certificate's private key (unencrypted).
    pub fn server_key(&self) -> PathBuf {
        self.path("server.key")
    }

    /// The client certificate, signed by the CA: what a service presents to a broker that
    /// requires client certificates.
    pub fn client_pem(&self) -> PathBuf {
        self.path("client.pem")
    }

    /// The client certificate's private key (unencrypted).
    pub fn client_key(&self) -> PathBuf {
        self.path("client.key")
    }

    /// A new key `<name>.key` and a certificate `<name>.pem` for `subject` with the
    /// extensions `ext`, signed by the CA.
    fn issue(&self, name: &str, subject: &str, ext: &str) {
        let (key, csr, ext_file, pem) = (
            format!("{name}.key"),
            format!("{name}.csr"),
            format!("{name}.ext"),
            format!("{name}.pem"),
        );
        self.openssl(&[
            "req", "-newkey", "rsa:2048", "-nodes", "-subj", subject, "-keyout", &key, "-out", &csr,
        ]);
        std::fs::write(self.path(&ext_file), ext).expect("writing the certificate's extensions");
        self.openssl(&[
            "x509",
            "-req",
            "-in",
            &csr,
            "-CA",
            "ca.pem",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-days",
            "2",
            "-extfile",
            &ext_file,
            "-out",
            &pem,
        ]);
    }

    fn path(&self, file: &str) -> PathBuf {
        self.dir.path().join(file)
    }

    fn openssl(&self, args: &[&str]) {
        run_openssl(self.dir.path(), args);
    }
}

fn run_openssl(dir: &Path, args: &[&str]) {
    let output = Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .output()
        .unwrap_or_else(|e| panic!("running openssl (is it installed?): {e}"));
    assert!(
        output.status.success(),
        "openssl {} failed: {}",
        args.join(" "),
        String::from_utf8_lossy(&output.stderr)
    );
}

/// A real TLS terminator (Debian's stunnel4, installed by `dev/test`) serving `ca`'s server
/// certificate on a free loopback port and passing the decrypted stream to `upstream`: TLS
/// in front of a server that speaks none itself. Stopped when dropped.
pub struct TlsTerminator {
    pub port: u16,
    _process: tokio::process::Child,
    _dir: TempDir,
}

impl TlsTerminator {
    pub async fn start(ca: &TestCa, upstream: u16) -> TlsTerminator {
        let dir = tempfile::Builder::new()
            .prefix("meterline-stunnel-")
            .tempdir()
            .expect("creating a temporary folder for stunnel");
        let port = crate::process::free_port();
        let config = dir.path().join("stunnel.conf");
        std::fs::write(
            &config,
            format!(
                "foreground = yes\npid =\ndebug = warning\n\n[tls]\naccept = 127.0.0.1:{port}\n\
                 connect = 127.0.0.1:{upstream}\ncert = {}\nkey = {}\n",
                ca.server_pem().display(),
                ca.server_key().display()
            ),
        )
        .expect("writing stunnel's configuration");
        let process = tokio::process::Command::new("stunnel4")
            .arg(&config)
            .kill_on_drop(true)
            .stdout(std::process::Stdio::null())
            .stderr(std::fs::File::create(dir.path().join("stunnel.log")).expect("a log file"))
            .spawn()
            .unwrap_or_else(|e| {
                panic!("starting stunnel4 (dev/test installs it: apt-get install stunnel4): {e}")
            });
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .is_err()
        {
            assert!(
                std::time::Instant::now() < deadline,
                "stunnel4 did not listen on {port} within 10 s: {}",
                std::fs::read_to_string(dir.path().join("stunnel.log")).unwrap_or_default()
            );
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        }
        TlsTerminator {
            port,
            _process: process,
            _dir: dir,
        }
    }
}
