//! The HTTP API's TCP listener with TLS (issue 10), on a real store-only
//! daemon that is member `n1` of a test cluster: it speaks HTTPS only with its
//! member certificate, and lets a caller in with a client certificate of the
//! cluster or the token. Driven through the CLI as users call it, and with
//! raw TLS clients as attackers would: no certificate, another CA's, an
//! expired one, plain HTTP, handshakes that never finish. Each is refused
//! with a clear error and a non-zero exit, the store is unchanged, and the
//! daemon goes on serving. Status and journal of a unit on another machine
//! are asked of that machine's API, and a machine whose API cannot be
//! reached is named in the error.

use std::path::{Path, PathBuf};
use std::process::Output;
use std::sync::Arc;
use std::time::{Duration, Instant};

use rcgen::{
    ExtendedKeyUsagePurpose, Issuer, KeyPair, KeyUsagePurpose, PKCS_ECDSA_P256_SHA256, SanType,
};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use flotilla::tls::identity::{self, Identity};
use flotilla::tls::{Role, ca};

mod support;

use support::daemon::{Daemon, TOKEN};
use support::machine::Machine;
use support::pki::{Pki, shared};
use support::text;

/// The stdout of a `flotilla` run that must have succeeded.
fn ok(out: &Output) -> String {
    support::succeeded(out, "flotilla")
}

const UNIT: &str = "[Service]\nExecStart=/bin/sleep infinity\n";

/// `flotilla ARGS` against the daemon's https endpoint, with `env` (the
/// CA, a certificate, a token) and nothing else from the environment.
fn https(daemon: &Daemon, env: &[(&str, &Path)], args: &[&str]) -> Output {
    daemon
        .command()
        .env("FLOTILLA_ENDPOINT", &daemon.http)
        .envs(env.iter().map(|(k, v)| (*k, v.as_os_str())))
        .args(args)
        .output()
        .unwrap()
}

/// The CA, certificate and key variables of `name` in `role` of `pki`.
fn identity_env(pki: &Pki, name: &str, role: Role) -> Vec<(&'static str, PathBuf)> {
    pki.env(name, role).to_vec()
}

/// The CLI's variables for a CA, a certificate and its key.
fn files<'a>(ca: &'a Path, cert: &'a Path, key: &'a Path) -> [(&'static str, &'a Path); 3] {
    [
        ("FLOTILLA_TLS_CA", ca),
        ("FLOTILLA_TLS_CERT", cert),
        ("FLOTILLA_TLS_KEY", key),
    ]
}

fn as_refs<'a>(env: &'a [(&'static str, PathBuf)]) -> Vec<(&'static str, &'a Path)> {
    env.iter().map(|(k, v)| (*k, v.as_path())).collect()
}

/// Asserts the verb failed with exit `code` and says `says`; returns stderr.
fn refused(out: &Output, code: i32, says: &str) -> String {
    let err = text(&out.stderr);
    assert_eq!(
        out.status.code(),
        Some(code),
        "stdout {} stderr {err}",
        text(&out.stdout)
    );
    eprintln!("refused as expected: {}", err.trim_end());
    assert!(err.starts_with("error: "), "{err}");
    assert!(err.contains(says), "wanted {says:?} in: {err}");
    err
}

/// A certificate of `pki`'s cluster for admin `name` that expired yesterday.
fn expired_admin(pki: &Pki, name: &str) -> (PathBuf, PathBuf) {
    let ca_pem = std::fs::read_to_string(pki.ca()).unwrap();
    let ca_key =
        KeyPair::from_pem(&std::fs::read_to_string(pki.dir().join(ca::CA_KEY)).unwrap()).unwrap();
    let cluster = identity::cluster_id(ca_key.public_key_raw());
    let issuer = Issuer::from_ca_cert_pem(&ca_pem, ca_key).unwrap();
    let who = Identity {
        cluster: cluster.clone(),
        role: Role::Admin,
        name: name.to_string(),
    };
    let mut params = rcgen::CertificateParams::default();
    params.subject_alt_names = vec![
        SanType::DnsName(identity::server_name(&cluster).try_into().unwrap()),
        SanType::URI(who.uri().try_into().unwrap()),
    ];
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![
        ExtendedKeyUsagePurpose::ServerAuth,
        ExtendedKeyUsagePurpose::ClientAuth,
    ];
    let now = time::OffsetDateTime::now_utc();
    params.not_before = now - time::Duration::days(10);
    params.not_after = now - time::Duration::days(1);
    let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).unwrap();
    let cert = params.signed_by(&key, &issuer).unwrap();
    let dir = pki.dir().join("expired");
    std::fs::create_dir_all(&dir).unwrap();
    let (cert_path, key_path) = (
        dir.join(format!("{name}.pem")),
        dir.join(format!("{name}.key")),
    );
    std::fs::write(&cert_path, cert.pem()).unwrap();
    std::fs::write(&key_path, key.serialize_pem()).unwrap();
    (cert_path, key_path)
}

#[test]
fn https_callers_need_a_certificate_of_the_cluster_or_the_token() {
    let pki = shared();
    let daemon = Daemon::start_tls(pki, &[]);
    assert!(daemon.http.starts_with("https://"), "{}", daemon.http);
    let ca = pki.ca();
    let ca_only = [("FLOTILLA_TLS_CA", ca.as_path())];
    let admin = identity_env(pki, "alice", Role::Admin);
    let agent = identity_env(pki, "a0a0a0", Role::Agent);
    let member = identity_env(pki, "n1", Role::Member);
    let file = daemon.write("web.service", UNIT);
    let file = file.to_str().unwrap();

    // The CA alone proves nothing: 401, naming both ways in.
    let err = refused(
        &https(&daemon, &ca_only, &["list-unit-files"]),
        1,
        "needs a client certificate of this cluster",
    );
    assert!(err.contains("api_token"), "{err}");
    // With the token, over TLS, everything goes.
    let token = https(&daemon, &ca_only, &["--api-token", TOKEN, "submit", file]);
    assert_eq!(ok(&token), "Unit web.service inactive\n");

    // An admin's certificate may do all the token may.
    ok(&https(
        &daemon,
        &as_refs(&admin),
        &["start", "--no-block", "web.service"],
    ));
    let listed = ok(&https(
        &daemon,
        &as_refs(&admin),
        &["list-unit-files", "--no-legend", "--fields", "unit,dstate"],
    ));
    assert_eq!(listed, "web.service\tlaunched\n");
    // So may a member's.
    ok(&https(&daemon, &as_refs(&member), &["list-machines"]));

    // An agent's certificate reads, and is refused every change.
    let read = ok(&https(
        &daemon,
        &as_refs(&agent),
        &["list-unit-files", "--no-legend", "--fields", "unit,dstate"],
    ));
    assert_eq!(read, listed);
    for change in [
        vec!["stop", "--no-block", "web.service"],
        vec!["destroy", "web.service"],
        vec!["drain", "nosuch"],
    ] {
        refused(
            &https(&daemon, &as_refs(&agent), &change),
            1,
            "may only read",
        );
    }
    let after = daemon.ok(&["list-unit-files", "--no-legend", "--fields", "unit,dstate"]);
    assert_eq!(after, listed, "the agent changed nothing");

    // Plain HTTP to the TLS port: told to use https.
    let plain = daemon.http.replacen("https://", "http://", 1);
    let out = daemon
        .command()
        .args(["--endpoint", &plain, "--api-token", TOKEN, "list-units"])
        .output()
        .unwrap();
    refused(&out, 1, "speaks HTTPS only");

    // https without the CA: a usage error before any connection.
    refused(
        &https(&daemon, &[], &["--api-token", TOKEN, "list-units"]),
        2,
        "needs the cluster CA",
    );

    // Another cluster's CA: the daemon's certificate is not trusted.
    let other = Pki::new();
    let stranger = identity_env(&other, "mallory", Role::Admin);
    refused(
        &https(&daemon, &as_refs(&stranger), &["list-units"]),
        1,
        "the ca.pem of this cluster",
    );
    // This cluster's CA with another cluster's certificate: refused before
    // it is sent.
    let (cert, key) = other.issue("mallory", Role::Admin);
    refused(
        &https(&daemon, &files(&ca, &cert, &key), &["list-units"]),
        1,
        "another cluster's CA",
    );
    // An expired certificate: its dates in the message.
    let (cert, key) = expired_admin(pki, "late");
    refused(
        &https(&daemon, &files(&ca, &cert, &key), &["list-units"]),
        1,
        "is valid only from",
    );
    // The flags work after the verb too, and a certificate needs its key.
    let after_verb = |verb: &str, with_key: bool| {
        let mut command = daemon.command();
        command.args([verb, "--endpoint", &daemon.http, "--tls-ca"]);
        command.arg(&ca).arg("--tls-cert").arg(&admin[1].1);
        if with_key {
            command.arg("--tls-key").arg(&admin[2].1);
        }
        command.output().unwrap()
    };
    refused(&after_verb("list-units", false), 2, "--tls-key");
    assert!(ok(&after_verb("list-unit-files", true)).contains("web.service"));

    let after = daemon.ok(&["list-unit-files", "--no-legend", "--fields", "unit,dstate"]);
    assert_eq!(after, listed, "nothing refused changed anything");
    assert!(!daemon.log().contains("panicked"), "{}", daemon.log());
}

#[test]
fn https_to_a_daemon_without_tls_says_so() {
    let daemon = Daemon::start();
    let https_url = daemon.http.replacen("http://", "https://", 1);
    let ca = shared().ca();
    let out = daemon
        .command()
        .args(["--endpoint", &https_url, "--api-token", TOKEN, "--tls-ca"])
        .arg(&ca)
        .arg("list-units")
        .output()
        .unwrap();
    refused(&out, 1, "does not speak TLS");
}

/// A raw TLS client of the daemon: trusts `pki`'s CA (the server name is
/// the cluster's), presents `client` if given.
fn connector(pki: &Pki, client: Option<(&Path, &Path)>) -> tokio_rustls::TlsConnector {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut roots = rustls::RootCertStore::empty();
    for der in CertificateDer::pem_file_iter(pki.ca()).unwrap() {
        roots.add(der.unwrap()).unwrap();
    }
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .with_root_certificates(roots);
    let config = match client {
        None => builder.with_no_client_auth(),
        Some((cert, key)) => {
            let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert)
                .unwrap()
                .map(Result::unwrap)
                .collect();
            builder
                .with_client_auth_cert(chain, PrivateKeyDer::from_pem_file(key).unwrap())
                .unwrap()
        }
    };
    tokio_rustls::TlsConnector::from(Arc::new(config))
}

/// The cluster's server name, which every daemon's certificate carries.
fn server_name(pki: &Pki) -> ServerName<'static> {
    let der = CertificateDer::pem_file_iter(pki.ca())
        .unwrap()
        .next()
        .unwrap()
        .unwrap();
    let cluster = identity::cluster_id_of_ca(&der).unwrap();
    ServerName::try_from(identity::server_name(&cluster)).unwrap()
}

/// One request over TLS as `client`; the whole answer as text, or why
/// there was none.
async fn tls_call(
    daemon: &Daemon,
    pki: &Pki,
    client: Option<(&Path, &Path)>,
    request: &str,
) -> Result<String, String> {
    let tcp = TcpStream::connect(daemon.tcp_addr()).await.unwrap();
    let mut tls = connector(pki, client)
        .connect(server_name(pki), tcp)
        .await
        .map_err(|e| format!("handshake: {e}"))?;
    tls.write_all(request.as_bytes())
        .await
        .map_err(|e| format!("write: {e}"))?;
    let mut answer = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(10), tls.read_to_end(&mut answer)).await;
    match read {
        Err(_) => Err("no answer within 10 s".into()),
        Ok(Err(e)) if answer.is_empty() => Err(format!("read: {e}")),
        Ok(_) if answer.is_empty() => Err("closed without an answer".into()),
        Ok(_) => Ok(text(&answer)),
    }
}

fn get(path: &str) -> String {
    format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
}

fn put(path: &str, body: &str) -> String {
    format!(
        "PUT {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Type: \
         application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
}

#[tokio::test]
async fn the_tls_port_refuses_strangers_and_stays_bounded() {
    let pki = shared();
    let daemon = Daemon::start_tls(pki, &[("FLOTILLA_API_HEADER_TIMEOUT", "1s")]);
    let (admin_cert, admin_key) = pki.issue("root", Role::Admin);
    let admin = Some((admin_cert.as_path(), admin_key.as_path()));
    let (agent_cert, agent_key) = pki.issue("b0b0b0", Role::Agent);
    let agent = Some((agent_cert.as_path(), agent_key.as_path()));
    let launched = r#"{"desiredState":"launched","options":[{"section":"Service","name":"ExecStart","value":"/bin/true"}]}"#;

    // Plain HTTP: a plain 400 that says what to do.
    let mut plain = TcpStream::connect(daemon.tcp_addr()).await.unwrap();
    plain.write_all(get("/health").as_bytes()).await.unwrap();
    let mut answer = Vec::new();
    let _ = plain.read_to_end(&mut answer).await;
    let answer = text(&answer);
    assert!(answer.starts_with("HTTP/1.1 400 "), "{answer}");
    assert!(answer.contains("https://HOST:PORT"), "{answer}");

    // Another cluster's certificate, or an expired one: no HTTP answer at all.
    let other = Pki::new();
    let (cert, key) = other.issue("mallory", Role::Admin);
    let stranger = tls_call(&daemon, pki, Some((&cert, &key)), &get("/health")).await;
    assert!(stranger.is_err(), "{stranger:?}");
    let (cert, key) = expired_admin(pki, "late2");
    let late = tls_call(&daemon, pki, Some((&cert, &key)), &get("/health")).await;
    assert!(late.is_err(), "{late:?}");

    // No certificate: 401 for everything, /health included; an agent
    // reads, and may not write.
    let write = put("/fleet/v1/units/x.service", launched);
    let cases = [
        (
            "no certificate",
            None,
            get("/health"),
            "HTTP/1.1 401 ",
            "certificate",
        ),
        (
            "no certificate",
            None,
            write.clone(),
            "HTTP/1.1 401 ",
            "certificate",
        ),
        (
            "an agent reads",
            agent,
            get("/fleet/v1/units"),
            "HTTP/1.1 200 ",
            "units",
        ),
        (
            "an agent writes",
            agent,
            write.clone(),
            "HTTP/1.1 403 ",
            "may only read",
        ),
    ];
    for (what, client, request, status, says) in cases {
        let answer = tls_call(&daemon, pki, client, &request)
            .await
            .unwrap_or_else(|e| panic!("{what}: {e}"));
        assert!(answer.starts_with(status), "{what}: {answer}");
        assert!(answer.contains(says), "{what}: {answer}");
    }
    assert_eq!(
        daemon.ok(&["list-unit-files", "--no-legend"]),
        "",
        "nothing stored"
    );
    let admin_write = tls_call(&daemon, pki, admin, &write).await.unwrap();
    assert!(admin_write.starts_with("HTTP/1.1 201 "), "{admin_write}");

    // Callers that open connections and never finish a handshake, or send
    // half of one, are cut off after the header timeout (1 s here); the
    // daemon serves meanwhile and after.
    let mut idle = Vec::new();
    for i in 0..100 {
        let mut tcp = TcpStream::connect(daemon.tcp_addr()).await.unwrap();
        if i % 2 == 0 {
            // A TLS record header announcing a handshake that never comes.
            tcp.write_all(&[0x16, 0x03, 0x01, 0x40, 0x00])
                .await
                .unwrap();
        }
        idle.push(tcp);
    }
    let during = tls_call(&daemon, pki, admin, &get("/health"))
        .await
        .unwrap();
    assert!(during.ends_with("ok"), "{during}");
    let started = Instant::now();
    for mut tcp in idle {
        let mut byte = [0u8; 1];
        let read = tokio::time::timeout(Duration::from_secs(10), tcp.read(&mut byte)).await;
        assert!(
            matches!(read, Ok(Ok(0)) | Ok(Err(_))),
            "an idle connection was not closed: {read:?}"
        );
    }
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "idle connections held {:?}",
        started.elapsed()
    );
    let after = tls_call(&daemon, pki, admin, &get("/health"))
        .await
        .unwrap();
    assert!(after.ends_with("ok"), "{after}");
    assert!(!daemon.log().contains("panicked"), "{}", daemon.log());
}

#[tokio::test]
async fn via_api_of_a_unit_elsewhere_asks_its_host_or_names_it() {
    let pki = shared();
    let daemon = Daemon::start_tls(pki, &[]);
    let admin = identity_env(pki, "ops", Role::Admin);
    let via_api = |unit: &str| https(&daemon, &as_refs(&admin), &["status", "--via-api", unit]);
    // Machines played through the registry, each claiming one unit: one
    // publishes no API, one an address where nothing listens, one the API
    // of a daemon of another cluster, and one this daemon's own API (a
    // forwarded request is answered only for the host's own units, so it
    // is forwarded once, not round and round).
    let stranger_pki = Pki::new();
    let stranger = Daemon::start_tls(&stranger_pki, &[]);
    let nowhere = format!("127.0.0.1:{}", support::free_port());
    let cases: [(&str, Option<String>, &str); 4] = [
        ("fake-1", None, "publishes no API address"),
        (
            "fake-2",
            Some(nowhere.clone()),
            "cannot reach the API of machine",
        ),
        (
            "fake-3",
            Some(stranger.tcp_addr().to_string()),
            "cannot reach the API of machine",
        ),
        (
            "fake-4",
            Some(daemon.tcp_addr().to_string()),
            "not on this host",
        ),
    ];
    let mut machines = Vec::new();
    for (i, (host, api, _)) in cases.iter().enumerate() {
        let id = format!("{:032x}", 0xf00d_0000 + i);
        let unit = format!("u{i}.service");
        // Each unit may run only on its machine.
        let file = daemon.write(&unit, &format!("{UNIT}[X-Fleet]\nMachineID={id}\n"));
        let machine = Machine::join(&daemon.store, &id, host, &[], api.clone()).await;
        ok(&https(
            &daemon,
            &as_refs(&admin),
            &["start", "--no-block", file.to_str().unwrap()],
        ));
        machines.push((machine, unit));
    }
    for (machine, unit) in &machines {
        wait_proposed_and_claim(machine, unit).await;
    }
    for ((machine, unit), (_, _, says)) in machines.iter().zip(cases.iter()) {
        let out = via_api(unit);
        let err = refused(&out, 1, says);
        assert!(err.contains(&machine.record.id), "names the machine: {err}");
    }
    let err = text(&via_api("u1.service").stderr);
    assert!(err.contains(&nowhere), "names the address: {err}");
    assert!(!daemon.log().contains("panicked"), "{}", daemon.log());
}

/// Claims `unit` on `machine` once the scheduler proposed it there.
async fn wait_proposed_and_claim(machine: &Machine, unit: &str) {
    let started = Instant::now();
    loop {
        let view = machine.store.own_view().await.unwrap();
        if view.proposals.keys().any(|u| u.as_str() == unit) {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(15),
            "{unit} was not proposed to {}",
            machine.record.id
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    machine.claim(unit).await;
}
