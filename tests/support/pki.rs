//! A cluster CA for tests that run real members with TLS: one per test
//! process (nextest runs each test in a process of its own), kept under the
//! target directory, whose admin certificate the process's store clients
//! present.

use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};

use flotilla::tls::{ClientTls, Role, Trust, ca};

/// The CA's directory, and the certificates issued so far in it.
pub struct Pki {
    dir: PathBuf,
}

impl Pki {
    /// A new CA in a fresh directory under the target dir.
    pub fn new() -> Pki {
        let dir = tempfile::Builder::new()
            .prefix("pki")
            .tempdir_in(env!("CARGO_TARGET_TMPDIR"))
            .unwrap()
            .keep();
        ca::init(&dir).unwrap();
        Pki { dir }
    }

    /// The CA certificate.
    pub fn ca(&self) -> PathBuf {
        self.dir.join(ca::CA_CERT)
    }

    /// Issues (once) the certificate of `name` in `role`; returns its
    /// certificate and key.
    pub fn issue(&self, name: &str, role: Role) -> (PathBuf, PathBuf) {
        let out = self.dir.join(role.as_str());
        let cert = out.join(format!("{name}.pem"));
        if !cert.exists() {
            ca::issue(name, role, &self.dir, &out, 30).unwrap();
        }
        (cert, out.join(format!("{name}.key")))
    }

    /// A store client identity of `name` in `role`.
    pub fn client(&self, name: &str, role: Role) -> Arc<ClientTls> {
        self.trust(name, role).client
    }

    /// The whole trust of `name` in `role`.
    pub fn trust(&self, name: &str, role: Role) -> Trust {
        let (cert, key) = self.issue(name, role);
        Trust::load(&self.ca(), &cert, &key).unwrap()
    }

    /// The environment a `flotilla` process needs to act as `name` in
    /// `role`: the daemon's `tls_*` keys and the CLI's `--tls-*` flags alike.
    pub fn env(&self, name: &str, role: Role) -> [(&'static str, PathBuf); 3] {
        let (cert, key) = self.issue(name, role);
        [
            ("FLOTILLA_TLS_CA", self.ca()),
            ("FLOTILLA_TLS_CERT", cert),
            ("FLOTILLA_TLS_KEY", key),
        ]
    }

    /// The CA's directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }
}

/// This process's CA; its admin certificate becomes the identity of every
/// store client the process opens without naming one.
pub fn shared() -> &'static Pki {
    static PKI: OnceLock<Pki> = OnceLock::new();
    PKI.get_or_init(|| {
        let pki = Pki::new();
        flotilla::tls::stream::set_default_client(pki.client("tester", Role::Admin));
        pki
    })
}
