//! Certificates for tests of TLS connections: a certificate authority of the test's own and a
//! server certificate it signed for the loopback address, made with the `openssl` command (as
//! an operator would), in a temporary folder removed when the value is dropped.

use std::path::{Path, PathBuf};
use std::process::Command;

use tempfile::TempDir;

/// A CA and a server certificate for `127.0.0.1` and `localhost`, as PEM files.
pub struct TestCa {
    dir: TempDir,
}

impl TestCa {
    /// A new CA named `name` (its subject's common name) and a server certificate it signed.
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
        ca.openssl(&[
            "req",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-subj",
            "/CN=127.0.0.1",
            "-keyout",
            "server.key",
            "-out",
            "server.csr",
        ]);
        std::fs::write(
            ca.path("server.ext"),
            "subjectAltName = IP:127.0.0.1, DNS:localhost\n\
             extendedKeyUsage = serverAuth\n",
        )
        .expect("writing the certificate's extensions");
        ca.openssl(&[
            "x509",
            "-req",
            "-in",
            "server.csr",
            "-CA",
            "ca.pem",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-days",
            "2",
            "-extfile",
            "server.ext",
            "-out",
            "server.pem",
        ]);
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
