//! `flotilla tls init` and `flotilla tls issue`: the cluster CA and the
//! certificates it signs.
//!
//! Keys are ECDSA P-256 (fast to make and to verify). A CA directory holds
//! `ca.pem` (the CA certificate every node trusts) and `ca.key` (its key:
//! keep it off the hosts). `issue` writes `<name>.pem` and `<name>.key`, and a
//! copy of `ca.pem`, into its output directory. Every file is written 0600.

use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, PKCS_ECDSA_P256_SHA256, SanType,
};
use time::{Duration, OffsetDateTime};

use super::TlsError;
use super::identity::{self, Identity, Role};

/// The CA certificate's file name in a CA directory.
pub const CA_CERT: &str = "ca.pem";
/// The CA key's file name in a CA directory.
pub const CA_KEY: &str = "ca.key";
/// How long a CA is valid.
const CA_DAYS: i64 = 3650;
/// How long an issued certificate is valid unless told otherwise.
pub const DEFAULT_DAYS: u32 = 365;

/// A CA made by [`init`].
#[derive(Debug)]
pub struct Ca {
    /// The cluster id, derived from the CA's public key.
    pub cluster: String,
    /// The CA certificate.
    pub cert: PathBuf,
    /// The CA key.
    pub key: PathBuf,
}

/// A certificate made by [`issue`].
#[derive(Debug)]
pub struct Issued {
    /// Who it names.
    pub identity: Identity,
    /// The certificate.
    pub cert: PathBuf,
    /// Its key.
    pub key: PathBuf,
    /// The CA certificate, copied beside them.
    pub ca: PathBuf,
}

/// Makes a new cluster CA in `dir` (created if missing); refuses a
/// directory that already holds one.
pub fn init(dir: &Path) -> Result<Ca, TlsError> {
    let cert_path = dir.join(CA_CERT);
    let key_path = dir.join(CA_KEY);
    if cert_path.exists() || key_path.exists() {
        return Err(TlsError::Exists(dir.to_path_buf()));
    }
    private_dir(dir)?;
    let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).map_err(generate)?;
    let cluster = identity::cluster_id(key.public_key_raw());
    let mut params = CertificateParams::default();
    params.distinguished_name = rcgen::DistinguishedName::new();
    params
        .distinguished_name
        .push(DnType::CommonName, format!("flotilla cluster {cluster} CA"));
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    let now = OffsetDateTime::now_utc();
    params.not_before = now - Duration::hours(1);
    params.not_after = now + Duration::days(CA_DAYS);
    let cert = params.self_signed(&key).map_err(generate)?;
    write_private(&key_path, key.serialize_pem().as_bytes())?;
    write_private(&cert_path, cert.pem().as_bytes())?;
    Ok(Ca {
        cluster,
        cert: cert_path,
        key: key_path,
    })
}

/// Issues a certificate for `name` in `role`, signed by the CA in `ca_dir`,
/// valid for `days`; writes it into `out` (created if missing).
pub fn issue(
    name: &str,
    role: Role,
    ca_dir: &Path,
    out: &Path,
    days: u32,
) -> Result<Issued, TlsError> {
    identity::check_name(name)?;
    let ca_cert_path = ca_dir.join(CA_CERT);
    let ca_pem = read(&ca_cert_path)?;
    let ca_key_path = ca_dir.join(CA_KEY);
    let ca_key = KeyPair::from_pem(&read(&ca_key_path)?).map_err(|e| TlsError::BadFile {
        path: ca_key_path.clone(),
        what: format!("not a private key in PEM form ({e})"),
    })?;
    let cluster = identity::cluster_id(ca_key.public_key_raw());
    let ca_der = super::stream::certs_in(&ca_cert_path)?;
    if identity::cluster_id_of_ca(&ca_der[0]).ok().as_deref() != Some(cluster.as_str()) {
        return Err(TlsError::BadFile {
            path: ca_key_path,
            what: format!("is not the key of {}", ca_cert_path.display()),
        });
    }
    let issuer = Issuer::from_ca_cert_pem(&ca_pem, ca_key).map_err(|e| TlsError::BadFile {
        path: ca_cert_path.clone(),
        what: format!("not a CA certificate ({e})"),
    })?;
    let identity = Identity {
        cluster: cluster.clone(),
        role,
        name: name.to_string(),
    };
    let mut params = CertificateParams::default();
    params.distinguished_name = rcgen::DistinguishedName::new();
    params.distinguished_name.push(DnType::CommonName, name);
    params
        .distinguished_name
        .push(DnType::OrganizationalUnitName, role.as_str());
    params.subject_alt_names = vec![
        SanType::DnsName(
            identity::server_name(&cluster)
                .try_into()
                .map_err(generate)?,
        ),
        SanType::URI(identity.uri().try_into().map_err(generate)?),
    ];
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![
        ExtendedKeyUsagePurpose::ServerAuth,
        ExtendedKeyUsagePurpose::ClientAuth,
    ];
    params.use_authority_key_identifier_extension = true;
    let now = OffsetDateTime::now_utc();
    params.not_before = now - Duration::hours(1);
    params.not_after = now + Duration::days(i64::from(days.max(1)));
    let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).map_err(generate)?;
    let cert = params.signed_by(&key, &issuer).map_err(generate)?;
    private_dir(out)?;
    let cert_path = out.join(format!("{name}.pem"));
    let key_path = out.join(format!("{name}.key"));
    write_private(&key_path, key.serialize_pem().as_bytes())?;
    write_private(&cert_path, cert.pem().as_bytes())?;
    let ca = out.join(CA_CERT);
    if ca != ca_cert_path {
        write_private(&ca, ca_pem.as_bytes())?;
    }
    Ok(Issued {
        identity,
        cert: cert_path,
        key: key_path,
        ca,
    })
}

fn generate(e: rcgen::Error) -> TlsError {
    TlsError::Generate(e.to_string())
}

fn read(path: &Path) -> Result<String, TlsError> {
    std::fs::read_to_string(path).map_err(|source| TlsError::File {
        path: path.to_path_buf(),
        source,
    })
}

/// Creates `dir` (and missing parents) readable by its owner only.
fn private_dir(dir: &Path) -> Result<(), TlsError> {
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(|source| TlsError::File {
            path: dir.to_path_buf(),
            source,
        })
}

/// Writes `bytes` to `path` readable by its owner only: a fresh file beside
/// it, renamed over it, so a reader never sees half a key.
fn write_private(path: &Path, bytes: &[u8]) -> Result<(), TlsError> {
    let tmp = path.with_extension("tmp");
    let err = |source| TlsError::File {
        path: path.to_path_buf(),
        source,
    };
    let _ = std::fs::remove_file(&tmp);
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&tmp)
        .map_err(err)?;
    file.write_all(bytes).map_err(err)?;
    file.sync_all().map_err(err)?;
    std::fs::rename(&tmp, path).map_err(err)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn a_ca_issues_certificates_naming_role_and_name() {
        let dir = tempfile::tempdir().unwrap();
        let ca = init(&dir.path().join("ca")).unwrap();
        assert_eq!(ca.cluster.len(), 16);
        let issued = issue(
            "h1",
            Role::Member,
            &dir.path().join("ca"),
            &dir.path().join("h1"),
            30,
        )
        .unwrap();
        for file in [&ca.cert, &ca.key, &issued.cert, &issued.key, &issued.ca] {
            let mode = std::fs::metadata(file).unwrap().permissions().mode();
            assert_eq!(mode & 0o777, 0o600, "{}", file.display());
        }
        let pem = std::fs::read(&issued.cert).unwrap();
        let der = super::super::stream::certs_from_pem(&issued.cert, &pem).unwrap();
        let who = Identity::from_der(&der[0]).unwrap();
        assert_eq!(who, issued.identity);
        assert_eq!(who.cluster, ca.cluster);
        assert_eq!((who.role, who.name.as_str()), (Role::Member, "h1"));
    }

    #[test]
    fn bad_requests_are_refused_and_write_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let ca_dir = dir.path().join("ca");
        init(&ca_dir).unwrap();
        assert!(matches!(init(&ca_dir), Err(TlsError::Exists(_))));
        let out = dir.path().join("out");
        assert!(matches!(
            issue("Bad/Name", Role::Agent, &ca_dir, &out, 1),
            Err(TlsError::BadName(_))
        ));
        let missing = issue("h1", Role::Agent, &dir.path().join("nope"), &out, 1).unwrap_err();
        assert!(missing.to_string().contains("ca.pem"), "{missing}");
        std::fs::write(ca_dir.join(CA_KEY), "garbage").unwrap();
        let bad = issue("h1", Role::Agent, &ca_dir, &out, 1).unwrap_err();
        assert!(bad.to_string().contains("private key"), "{bad}");
        assert!(!out.exists(), "nothing written");
    }
}
