//! The TLS of an HTTPS client of the daemon's API: the CLI's `--endpoint
//! https://HOST:PORT`.
//!
//! A daemon's API presents that host's own certificate (a member's or an
//! agent's), which names no host or address, only the cluster
//! (`<cluster>.flotilla`, see [`super::identity`]). So the client checks the
//! certificate against the cluster CA under that name, whatever host or
//! address the URL names, and only a member or agent certificate will do. It
//! presents its own certificate when given one (an admin's, to change
//! things), else the caller relies on the bearer token.

use std::path::Path;
use std::sync::Arc;

use rustls::client::WebPkiServerVerifier;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, SignatureScheme};

use super::TlsError;
use super::identity::{self, Identity, Role};
use super::stream::{Roots, provider};

/// The rustls configuration for HTTPS calls to the API of the cluster whose
/// CA is `ca`, presenting `identity` (certificate, key) when given. A
/// certificate outside its validity period is refused here, before any
/// connection, with the dates in the message.
pub fn api_client_config(
    ca: &Path,
    identity: Option<(&Path, &Path)>,
) -> Result<rustls::ClientConfig, TlsError> {
    let roots = Roots::load(ca)?;
    let provider = provider();
    let inner = WebPkiServerVerifier::builder_with_provider(roots.store.clone(), provider.clone())
        .build()
        .map_err(|e| TlsError::Generate(e.to_string()))?;
    let name = ServerName::try_from(identity::server_name(&roots.cluster))
        .map_err(|e| TlsError::Generate(e.to_string()))?;
    let verifier = Arc::new(ClusterServer {
        inner,
        name,
        cluster: roots.cluster.clone(),
    });
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| TlsError::Generate(e.to_string()))?
        .dangerous()
        .with_custom_certificate_verifier(verifier);
    match identity {
        None => Ok(builder.with_no_client_auth()),
        Some((cert, key)) => {
            let (chain, private, _) = roots.identity(cert, key)?;
            check_validity(cert, &chain[0])?;
            builder
                .with_client_auth_cert(chain, private)
                .map_err(|e| TlsError::BadFile {
                    path: key.to_path_buf(),
                    what: format!("does not go with {} ({e})", cert.display()),
                })
        }
    }
}

/// Refuses a certificate that has expired or is not valid yet.
fn check_validity(path: &Path, der: &CertificateDer<'_>) -> Result<(), TlsError> {
    let (_, cert) = x509_parser::parse_x509_certificate(der).map_err(|e| TlsError::BadFile {
        path: path.to_path_buf(),
        what: format!("unreadable certificate ({e})"),
    })?;
    let validity = cert.validity();
    if validity.is_valid() {
        return Ok(());
    }
    Err(TlsError::BadFile {
        path: path.to_path_buf(),
        what: format!(
            "is valid only from {} to {}, not now; issue a new one with \
             `flotilla tls issue NAME --role admin`",
            validity.not_before, validity.not_after
        ),
    })
}

/// Checks a server's certificate as the module doc says: signed by the
/// cluster CA for the cluster's name, and held by a member or an agent.
#[derive(Debug)]
struct ClusterServer {
    inner: Arc<WebPkiServerVerifier>,
    name: ServerName<'static>,
    cluster: String,
}

impl ServerCertVerifier for ClusterServer {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let verified = self.inner.verify_server_cert(
            end_entity,
            intermediates,
            &self.name,
            ocsp_response,
            now,
        )?;
        let who =
            Identity::from_der(end_entity).map_err(|e| rustls::Error::General(e.to_string()))?;
        if who.cluster != self.cluster || who.role == Role::Admin {
            return Err(rustls::Error::General(format!(
                "the API presented the certificate of {who} of cluster {}, not a member's or \
                 an agent's of cluster {}",
                who.cluster, self.cluster
            )));
        }
        Ok(verified)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}
