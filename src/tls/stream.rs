//! Mutual TLS for the store's connections: the configurations built from a
//! node's CA, certificate and key, and the handshakes.
//!
//! TLS 1.3 only, rustls with the ring provider. A server (a member's peer or
//! client listener) requires a client certificate signed by the cluster CA; a
//! client checks that the member it reached holds a certificate of the same
//! cluster (the DNS name `<cluster>.flotilla`, see [`super::identity`]) in
//! the member role. Either side learns the other's [`Identity`] from its
//! certificate; what that identity may do is decided elsewhere.

use std::path::Path;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;
use tokio_rustls::{TlsAcceptor, TlsConnector};

use super::TlsError;
use super::identity::{self, Identity, Role};

/// A byte stream a connection's protocol runs over: plain TCP or TLS.
pub trait Duplex: AsyncRead + AsyncWrite + Send + Unpin {}
impl<T: AsyncRead + AsyncWrite + Send + Unpin> Duplex for T {}

/// A connection's stream, plain or TLS.
pub type BoxStream = Box<dyn Duplex>;

/// A node's trust: who it is and the configurations for both directions.
#[derive(Clone)]
pub struct Trust {
    /// This node's own identity, read from its certificate.
    pub me: Identity,
    /// For its store listeners: a client certificate is required.
    pub server: Arc<ServerTls>,
    /// For its HTTP API's TCP listener: a client certificate is checked
    /// when presented, and may be absent (the caller then needs the token).
    pub api_server: Arc<ServerTls>,
    /// For the connections it opens.
    pub client: Arc<ClientTls>,
}

impl std::fmt::Debug for Trust {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Trust({} of cluster {})", self.me, self.me.cluster)
    }
}

/// The listening side of mutual TLS.
pub struct ServerTls {
    acceptor: TlsAcceptor,
    cluster: String,
}

/// The connecting side of mutual TLS.
pub struct ClientTls {
    connector: TlsConnector,
    server_name: ServerName<'static>,
    cluster: String,
    me: Identity,
}

impl Trust {
    /// Loads the CA certificate, this node's certificate and its key, and
    /// checks that they belong together.
    pub fn load(ca: &Path, cert: &Path, key: &Path) -> Result<Trust, TlsError> {
        let roots = Roots::load(ca)?;
        let (chain, private, me) = roots.identity(cert, key)?;
        let provider = provider();
        let bad_pair = |e: rustls::Error| TlsError::BadFile {
            path: key.to_path_buf(),
            what: format!("does not go with {} ({e})", cert.display()),
        };
        let server = |anonymous: bool| -> Result<Arc<ServerTls>, TlsError> {
            let builder = rustls::server::WebPkiClientVerifier::builder_with_provider(
                roots.store.clone(),
                provider.clone(),
            );
            let builder = if anonymous {
                builder.allow_unauthenticated()
            } else {
                builder
            };
            let verifier = builder
                .build()
                .map_err(|e| TlsError::Generate(e.to_string()))?;
            let config = rustls::ServerConfig::builder_with_provider(provider.clone())
                .with_protocol_versions(&[&rustls::version::TLS13])
                .map_err(|e| TlsError::Generate(e.to_string()))?
                .with_client_cert_verifier(verifier)
                .with_single_cert(chain.clone(), private.clone_key())
                .map_err(bad_pair)?;
            Ok(Arc::new(ServerTls {
                acceptor: TlsAcceptor::from(Arc::new(config)),
                cluster: roots.cluster.clone(),
            }))
        };
        let client = rustls::ClientConfig::builder_with_provider(provider.clone())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(|e| TlsError::Generate(e.to_string()))?
            .with_root_certificates(roots.store.clone())
            .with_client_auth_cert(chain.clone(), private.clone_key())
            .map_err(bad_pair)?;
        let server_name = ServerName::try_from(identity::server_name(&roots.cluster))
            .map_err(|e| TlsError::Generate(e.to_string()))?;
        Ok(Trust {
            server: server(false)?,
            api_server: server(true)?,
            client: Arc::new(ClientTls {
                connector: TlsConnector::from(Arc::new(client)),
                server_name,
                cluster: roots.cluster.clone(),
                me: me.clone(),
            }),
            me,
        })
    }
}

/// The ring provider, the one crypto provider of the whole binary.
pub(super) fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// A cluster CA loaded for verifying: its certificates and its cluster id.
pub(super) struct Roots {
    pub(super) store: Arc<rustls::RootCertStore>,
    pub(super) cluster: String,
    path: std::path::PathBuf,
}

impl Roots {
    /// Loads the CA certificate file `ca`.
    pub(super) fn load(ca: &Path) -> Result<Roots, TlsError> {
        let ca_certs = certs_in(ca)?;
        let cluster =
            identity::cluster_id_of_ca(&ca_certs[0]).map_err(|what| TlsError::BadFile {
                path: ca.to_path_buf(),
                what,
            })?;
        let mut store = rustls::RootCertStore::empty();
        for der in ca_certs {
            store.add(der).map_err(|e| TlsError::BadFile {
                path: ca.to_path_buf(),
                what: format!("not a usable CA certificate ({e})"),
            })?;
        }
        Ok(Roots {
            store: Arc::new(store),
            cluster,
            path: ca.to_path_buf(),
        })
    }

    /// Loads a certificate of this CA's cluster and its key; returns the
    /// chain, the key and the identity the certificate names.
    pub(super) fn identity(
        &self,
        cert: &Path,
        key: &Path,
    ) -> Result<
        (
            Vec<CertificateDer<'static>>,
            PrivateKeyDer<'static>,
            Identity,
        ),
        TlsError,
    > {
        let chain = certs_in(cert)?;
        let me = Identity::from_der(&chain[0]).map_err(|e| TlsError::BadFile {
            path: cert.to_path_buf(),
            what: e.to_string(),
        })?;
        if me.cluster != self.cluster {
            return Err(TlsError::BadFile {
                path: cert.to_path_buf(),
                what: format!(
                    "was issued by another cluster's CA ({}), not by {} ({})",
                    me.cluster,
                    self.path.display(),
                    self.cluster
                ),
            });
        }
        let private =
            PrivateKeyDer::from_pem_slice(&read(key)?).map_err(|e| TlsError::BadFile {
                path: key.to_path_buf(),
                what: format!("not a private key in PEM form ({e})"),
            })?;
        Ok((chain, private, me))
    }
}

impl ServerTls {
    /// Runs the server side of the handshake within `timeout`; returns the
    /// stream and the client's identity (a store listener: required).
    pub async fn accept(
        &self,
        tcp: TcpStream,
        timeout: Duration,
    ) -> Result<(BoxStream, Identity), TlsError> {
        let (stream, who) = self.accept_maybe_anonymous(tcp, timeout).await?;
        let who =
            who.ok_or_else(|| TlsError::Identity("the other end presented no certificate".into()))?;
        Ok((stream, who))
    }

    /// Like [`ServerTls::accept`], but a client without a certificate is
    /// let through as `None` (the API's listener, where a token may stand in
    /// for it; see [`Trust::api_server`]). A certificate that is presented
    /// must be of this cluster.
    pub async fn accept_maybe_anonymous(
        &self,
        tcp: TcpStream,
        timeout: Duration,
    ) -> Result<(BoxStream, Option<Identity>), TlsError> {
        let tls = tokio::time::timeout(timeout, self.acceptor.accept(tcp))
            .await
            .map_err(|_| TlsError::Handshake(format!("not finished within {timeout:?}")))?
            .map_err(|e| TlsError::Handshake(e.to_string()))?;
        let who = match tls.get_ref().1.peer_certificates() {
            Some(certs) if !certs.is_empty() => Some(peer_identity(Some(certs))?),
            _ => None,
        };
        if let Some(who) = &who
            && who.cluster != self.cluster
        {
            return Err(TlsError::Identity(format!(
                "{who} belongs to cluster {}, not {}",
                who.cluster, self.cluster
            )));
        }
        Ok((Box::new(tls), who))
    }
}

impl ClientTls {
    /// Runs the client side of the handshake within `timeout`; returns the
    /// stream and the identity of the member reached (an error when it is
    /// not a member of this cluster).
    pub async fn connect(
        &self,
        tcp: TcpStream,
        timeout: Duration,
    ) -> Result<(BoxStream, Identity), TlsError> {
        self.connect_to(tcp, timeout, |who| who.role == Role::Member)
            .await
    }

    /// Like [`ClientTls::connect`], with `wanted` deciding which holder of a
    /// certificate of this cluster the other end may be (another host's API:
    /// that host's own certificate).
    pub async fn connect_to(
        &self,
        tcp: TcpStream,
        timeout: Duration,
        wanted: impl FnOnce(&Identity) -> bool,
    ) -> Result<(BoxStream, Identity), TlsError> {
        let tls = tokio::time::timeout(
            timeout,
            self.connector.connect(self.server_name.clone(), tcp),
        )
        .await
        .map_err(|_| TlsError::Handshake(format!("not finished within {timeout:?}")))?
        .map_err(|e| TlsError::Handshake(e.to_string()))?;
        let who = peer_identity(tls.get_ref().1.peer_certificates())?;
        if who.cluster != self.cluster || !wanted(&who) {
            return Err(TlsError::Identity(format!(
                "the other end is {who} of cluster {}, not who was expected in cluster {}",
                who.cluster, self.cluster
            )));
        }
        Ok((Box::new(tls), who))
    }

    /// Who this side says it is.
    pub fn me(&self) -> &Identity {
        &self.me
    }
}

pub(super) fn peer_identity(certs: Option<&[CertificateDer<'_>]>) -> Result<Identity, TlsError> {
    let leaf = certs
        .and_then(|c| c.first())
        .ok_or_else(|| TlsError::Identity("the other end presented no certificate".into()))?;
    Identity::from_der(leaf)
}

/// The certificates in the PEM file `path`: at least one.
pub fn certs_in(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certs = certs_from_pem(path, &read(path)?)?;
    if certs.is_empty() {
        return Err(TlsError::BadFile {
            path: path.to_path_buf(),
            what: "holds no certificate".into(),
        });
    }
    Ok(certs)
}

/// The certificates in a PEM file's bytes.
pub fn certs_from_pem(path: &Path, pem: &[u8]) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    CertificateDer::pem_slice_iter(pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| TlsError::BadFile {
            path: path.to_path_buf(),
            what: format!("not a certificate in PEM form ({e})"),
        })
}

fn read(path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|source| TlsError::File {
        path: path.to_path_buf(),
        source,
    })
}

/// The identity this process's store clients present, set once at start by
/// the daemon or the CLI; `None` (never set) means plaintext.
static DEFAULT_CLIENT: OnceLock<Arc<ClientTls>> = OnceLock::new();

/// Sets the identity every store client of this process presents unless
/// told otherwise. The first call wins: a process has one identity.
pub fn set_default_client(client: Arc<ClientTls>) {
    let _ = DEFAULT_CLIENT.set(client);
}

/// The identity set by [`set_default_client`], if any.
pub fn default_client() -> Option<Arc<ClientTls>> {
    DEFAULT_CLIENT.get().cloned()
}
