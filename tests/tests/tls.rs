//! TLS on the listener (ALPN, versions, certificate reload) and toward https upstreams.
#![allow(clippy::unwrap_used)]

use std::sync::Arc;
use std::time::Duration;

use scoretap_tests::harness::{assert_error_contract, client_to, listener_tls_args, proxy_for};
use scoretap_tests::tls::{server_name_ip, ALPN_H1, ALPN_H2};
use scoretap_tests::util::TempDir;
use scoretap_tests::*;

async fn handshake(
    addr: std::net::SocketAddr,
    cfg: Arc<rustls::ClientConfig>,
) -> Result<(Option<Vec<u8>>, Option<rustls::ProtocolVersion>), std::io::Error> {
    let tcp = tokio::net::TcpStream::connect(addr).await?;
    let tls = tokio::time::timeout(
        Duration::from_secs(5),
        tokio_rustls::TlsConnector::from(cfg).connect(server_name_ip(), tcp),
    )
    .await
    .map_err(|_| std::io::Error::other("handshake timeout"))??;
    let (_, conn) = tls.get_ref();
    Ok((
        conn.alpn_protocol().map(<[u8]>::to_vec),
        conn.protocol_version(),
    ))
}

#[tokio::test]
async fn tls_alpn_and_protocol_versions() {
    let pki = Pki::new();
    let up = TestUpstream::start().await;
    let extra = listener_tls_args(&pki);
    let extra: Vec<&str> = extra.iter().map(String::as_str).collect();
    let proxy = proxy_for(&up, &extra).await;
    type AlpnCase<'a> = (&'a [&'a [u8]], Option<&'a [u8]>);
    let cases: [AlpnCase; 3] = [
        (&[ALPN_H2, ALPN_H1], Some(ALPN_H2)),
        (&[ALPN_H1], Some(ALPN_H1)),
        (&[ALPN_H2], Some(ALPN_H2)),
    ];
    for (offer, want) in cases {
        let (alpn, _) = handshake(proxy.addr, pki.client_config(offer))
            .await
            .unwrap();
        assert_eq!(alpn.as_deref(), want, "ALPN offer {offer:?}");
    }
    for v in [&rustls::version::TLS12, &rustls::version::TLS13] {
        let (_, got) = handshake(proxy.addr, pki.client_config_versions(&[ALPN_H1], &[v]))
            .await
            .unwrap_or_else(|e| panic!("{:?} handshake failed: {e}", v.version));
        assert_eq!(got, Some(v.version));
    }
    // And curl agrees (OpenSSL client): TLS 1.0/1.1 are refused.
    let ca = pki.ca_path().display().to_string();
    let url = format!("{}/ok", proxy.https_url());
    let o = scoretap_tests::harness::curl(&[
        "--cacert",
        &ca,
        "--tlsv1.0",
        "--tls-max",
        "1.1",
        // let OpenSSL itself offer TLS 1.0/1.1, so only the server can refuse
        "--ciphers",
        "DEFAULT@SECLEVEL=0",
        &url,
    ])
    .await;
    assert_ne!(
        o.code,
        Some(0),
        "TLS ≤ 1.1 handshake must fail: {}",
        o.stdout_str()
    );
    // TLS 1.2 with only CBC (non-AEAD) suites offered is refused; an AEAD suite works.
    for (ciphers, accepted) in [
        (
            "ECDHE-ECDSA-AES128-SHA:ECDHE-RSA-AES128-SHA:AES128-SHA:AES256-SHA256",
            false,
        ),
        (
            "ECDHE-ECDSA-AES128-GCM-SHA256:ECDHE-RSA-AES128-GCM-SHA256",
            true,
        ),
    ] {
        let o = scoretap_tests::harness::curl(&[
            "--cacert",
            &ca,
            "--tlsv1.2",
            "--tls-max",
            "1.2",
            "--ciphers",
            ciphers,
            &url,
        ])
        .await;
        assert_eq!(
            o.code == Some(0),
            accepted,
            "TLS 1.2 with {ciphers}: exit {:?} {}",
            o.code,
            o.stdout_str()
        );
    }
}

/// The leaf certificate (DER) the server presents to a client trusting `trust`'s CA.
async fn presented_cert(
    addr: std::net::SocketAddr,
    trust: &Pki,
) -> Result<Vec<u8>, std::io::Error> {
    let tcp = tokio::net::TcpStream::connect(addr).await?;
    let tls = tokio::time::timeout(
        Duration::from_secs(5),
        tokio_rustls::TlsConnector::from(trust.client_config(&[ALPN_H1]))
            .connect(server_name_ip(), tcp),
    )
    .await
    .map_err(|_| std::io::Error::other("handshake timeout"))??;
    let certs = tls.get_ref().1.peer_certificates().unwrap_or(&[]);
    Ok(certs.first().map(|c| c.to_vec()).unwrap_or_default())
}

async fn reload_case(use_sighup: bool) {
    let a = Pki::new();
    let b = Pki::new();
    let dir = TempDir::new("reload");
    let (cert, key) = (dir.join("cert.pem"), dir.join("key.pem"));
    a.write_leaf_to(&cert, &key);
    let up = TestUpstream::start().await;
    let proxy = proxy_for(
        &up,
        &[
            "--tls-cert",
            &cert.display().to_string(),
            "--tls-key",
            &key.display().to_string(),
        ],
    )
    .await;
    let mut c = client_to(&proxy, Proto::H1, Some(&a)).await;
    assert_eq!(c.get("/ok").await.status, 200);
    assert!(
        presented_cert(proxy.addr, &b).await.is_err(),
        "B's CA must not trust A's cert yet"
    );

    // Make sure the new files get a different mtime than the old ones.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    b.write_leaf_to(&cert, &key);
    if use_sighup {
        proxy.sighup();
    }
    let mut ok = false;
    for _ in 0..60 {
        if presented_cert(proxy.addr, &b).await.is_ok() {
            ok = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        ok,
        "new certificate not served after {} (within 6 s)",
        if use_sighup { "SIGHUP" } else { "file change" }
    );
    // The old connection keeps working, new ones use the new cert.
    assert_eq!(c.get("/ok").await.status, 200);
    let mut c2 = client_to(&proxy, Proto::H2, Some(&b)).await;
    assert_eq!(c2.get("/ok").await.status, 200);
}

#[tokio::test]
async fn tls_cert_reloaded_on_sighup() {
    reload_case(true).await;
}

#[tokio::test]
async fn tls_cert_reloaded_on_file_change() {
    reload_case(false).await;
}

#[tokio::test]
async fn https_upstream_is_verified() {
    let pki = Pki::new();
    let up = TestUpstream::start_tls(UpstreamProto::H1, pki.clone()).await;
    // Trusted via --upstream-ca.
    let proxy = proxy_for(&up, &[]).await;
    let mut c = Client::connect(proxy.addr, Proto::H1).await;
    assert_eq!(c.get("/ok").await.status, 200);
    // Without the CA the proxy must refuse the upstream's certificate.
    let proxy = Scoretap::start(&up.url(), &[]).await;
    let mut c = Client::connect(proxy.addr, Proto::H1).await;
    let r = c.get("/x").await;
    assert_error_contract(
        "untrusted upstream certificate",
        r.status.as_u16(),
        r.header("content-type").as_deref(),
        &r.body,
        502,
        None,
        None,
    );
    assert!(
        up.find(|r| r.path() == "/x").is_none(),
        "request sent over an unverified TLS connection"
    );
}

#[tokio::test]
async fn https_upstream_with_localhost_sni() {
    let pki = Pki::new();
    let up = TestUpstream::start_tls(UpstreamProto::Auto, pki.clone()).await;
    let url = format!("https://localhost:{}", up.addr.port());
    let ca = pki.ca_path().display().to_string();
    for proto in ["http1", "http2"] {
        let proxy =
            Scoretap::start(&url, &["--upstream-ca", &ca, "--upstream-protocol", proto]).await;
        let mut c = Client::connect(proxy.addr, Proto::H1).await;
        let r = c.get("/headers").await;
        assert_eq!(r.status, 200, "{proto}: {}", r.text());
        let want = if proto == "http2" {
            "HTTP/2.0"
        } else {
            "HTTP/1.1"
        };
        assert_eq!(r.header("x-upstream-version").as_deref(), Some(want));
    }
}

// ---- TLS 1.2+ with AEAD suites only, as OpenSSL's own client finds ----------------------------

/// The `openssl` program, or `None` after saying why the test is skipped (a failure on CI).
fn openssl() -> Option<String> {
    scoretap_tests::stores::require_server("openssl", "apt-get install openssl")
        .map(|path| path.display().to_string())
}

/// `openssl s_client` to `address` with `arguments`, stdin closed (it ends after the handshake).
async fn s_client(
    openssl: &str,
    address: std::net::SocketAddr,
    arguments: &[&str],
) -> scoretap_tests::harness::ExtOutput {
    let mut all: Vec<String> = vec![
        "s_client".into(),
        "-connect".into(),
        address.to_string(),
        "-servername".into(),
        "localhost".into(),
        "-brief".into(),
    ];
    all.extend(arguments.iter().map(|argument| argument.to_string()));
    scoretap_tests::harness::run_ext(openssl, &all, Duration::from_secs(20)).await
}

/// Whether the handshake completed, and everything s_client said.
fn established(output: &scoretap_tests::harness::ExtOutput) -> (bool, String) {
    let text = format!("{}{}", output.stdout_str(), output.stderr);
    (
        output.code == Some(0) && text.contains("CONNECTION ESTABLISHED"),
        text,
    )
}

/// A TLS 1.2 suite as `openssl ciphers -v` describes it.
#[derive(Debug)]
struct Suite {
    name: String,
    /// `Mac=AEAD`: GCM, CCM or ChaCha20-Poly1305.
    aead: bool,
    /// `Kx=ECDH` (ephemeral elliptic-curve Diffie-Hellman).
    forward_secret: bool,
}

/// Every suite OpenSSL can offer for `version` (`-tls1_2`, `-tls1_3`), weak ones included.
async fn openssl_suites(openssl: &str, version: &str) -> Vec<Suite> {
    let output = scoretap_tests::harness::run_ext(
        openssl,
        &[
            "ciphers".into(),
            "-v".into(),
            "-s".into(),
            version.into(),
            "ALL:COMPLEMENTOFALL:@SECLEVEL=0".into(),
        ],
        Duration::from_secs(20),
    )
    .await;
    assert_eq!(output.code, Some(0), "openssl ciphers: {}", output.stderr);
    output
        .stdout_str()
        .lines()
        .filter_map(|line| {
            let mut fields = line.split_whitespace();
            let name = fields.next()?.to_owned();
            let rest: Vec<&str> = fields.collect();
            Some(Suite {
                aead: rest.contains(&"Mac=AEAD"),
                forward_secret: rest.contains(&"Kx=ECDH"),
                name,
            })
        })
        .collect()
}

/// An RSA certificate and key for localhost/127.0.0.1 made by `openssl req` (rcgen makes
/// ECDSA keys), so the suites with RSA authentication are tried too.
async fn rsa_certificate(openssl: &str, directory: &TempDir) -> (String, String) {
    let certificate = directory.join("rsa-cert.pem").display().to_string();
    let key = directory.join("rsa-key.pem").display().to_string();
    let arguments: Vec<String> = [
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-keyout",
        &key,
        "-out",
        &certificate,
        "-subj",
        "/CN=localhost",
        "-days",
        "1",
        "-addext",
        "subjectAltName=DNS:localhost,IP:127.0.0.1",
    ]
    .iter()
    .map(|argument| argument.to_string())
    .collect();
    let output =
        scoretap_tests::harness::run_ext(openssl, &arguments, Duration::from_secs(60)).await;
    assert_eq!(output.code, Some(0), "openssl req: {}", output.stderr);
    (certificate, key)
}

/// TLS 1.0 and 1.1 clients get the server's alert (not a client-side refusal: the same OpenSSL
/// client, with the same permissive cipher list, completes TLS 1.2 and 1.3 handshakes).
#[tokio::test]
async fn tls_1_0_and_1_1_clients_are_refused_by_the_server() {
    let Some(openssl) = openssl() else {
        return;
    };
    let pki = Pki::new();
    let upstream = TestUpstream::start().await;
    let extra = listener_tls_args(&pki);
    let extra: Vec<&str> = extra.iter().map(String::as_str).collect();
    let proxy = proxy_for(&upstream, &extra).await;
    // SECLEVEL=0 lets OpenSSL 3 offer TLS 1.0/1.1 at all (it refuses to by default).
    let permissive = "ALL:@SECLEVEL=0";
    for version in ["-tls1", "-tls1_1"] {
        let output = s_client(&openssl, proxy.addr, &[version, "-cipher", permissive]).await;
        let (connected, text) = established(&output);
        assert!(!connected, "{version} handshake completed:\n{text}");
        assert!(
            text.contains("alert handshake failure") || text.contains("alert protocol version"),
            "{version}: the server's alert refuses it:\n{text}"
        );
    }
    for (version, shown) in [("-tls1_2", "TLSv1.2"), ("-tls1_3", "TLSv1.3")] {
        let output = s_client(&openssl, proxy.addr, &[version, "-cipher", permissive]).await;
        let (connected, text) = established(&output);
        assert!(connected, "{version} refused:\n{text}");
        assert!(
            text.contains(&format!("Protocol version: {shown}")),
            "{version}:\n{text}"
        );
    }
}

/// Every TLS 1.2 suite OpenSSL knows is offered alone, with an ECDSA and with an RSA
/// certificate: the ones accepted are all AEAD with ephemeral ECDH, and every CBC, RC4, 3DES,
/// NULL, static-RSA and DHE suite is refused. In TLS 1.3 only the GCM and ChaCha20-Poly1305
/// suites are accepted.
#[tokio::test]
async fn only_aead_suites_with_forward_secrecy_are_negotiated() {
    let Some(openssl) = openssl() else {
        return;
    };
    let upstream = TestUpstream::start().await;
    let directory = TempDir::new("tls-suites");
    let pki = Pki::new();
    let (rsa_certificate, rsa_key) = rsa_certificate(&openssl, &directory).await;
    let ecdsa_args = listener_tls_args(&pki);
    let rsa_args = vec![
        "--tls-cert".to_owned(),
        rsa_certificate,
        "--tls-key".to_owned(),
        rsa_key,
    ];
    let tls12 = openssl_suites(&openssl, "-tls1_2").await;
    assert!(
        tls12
            .iter()
            .any(|suite| suite.name.contains("-CBC-") || suite.name.ends_with("-SHA")),
        "OpenSSL offers CBC suites to try: {tls12:?}"
    );
    for (key_type, args) in [("ECDSA", ecdsa_args), ("RSA", rsa_args)] {
        let extra: Vec<&str> = args.iter().map(String::as_str).collect();
        let proxy = proxy_for(&upstream, &extra).await;
        let mut accepted = Vec::new();
        for batch in tls12.chunks(8) {
            let outputs =
                futures_util::future::join_all(
                    batch.iter().map(|suite| {
                        let cipher = format!("{}:@SECLEVEL=0", suite.name);
                        let openssl = openssl.clone();
                        async move {
                            s_client(&openssl, proxy.addr, &["-tls1_2", "-cipher", &cipher]).await
                        }
                    }),
                )
                .await;
            for (suite, output) in batch.iter().zip(outputs) {
                let (connected, text) = established(&output);
                if connected {
                    assert!(
                        text.contains(&format!("Ciphersuite: {}", suite.name)),
                        "{key_type} {}:\n{text}",
                        suite.name
                    );
                    accepted.push(suite);
                }
            }
        }
        assert!(
            accepted.iter().any(|suite| suite.name.contains("GCM")),
            "{key_type}: no AES-GCM suite accepted: {accepted:?}"
        );
        for suite in &accepted {
            assert!(
                suite.aead && suite.forward_secret,
                "{key_type}: {} accepted (all accepted: {accepted:?})",
                suite.name
            );
        }

        let mut tls13_accepted = Vec::new();
        for suite in [
            "TLS_AES_128_GCM_SHA256",
            "TLS_AES_256_GCM_SHA384",
            "TLS_CHACHA20_POLY1305_SHA256",
            "TLS_AES_128_CCM_SHA256",
            "TLS_AES_128_CCM_8_SHA256",
        ] {
            let output = s_client(&openssl, proxy.addr, &["-tls1_3", "-ciphersuites", suite]).await;
            if established(&output).0 {
                tls13_accepted.push(suite);
            }
        }
        assert_eq!(
            tls13_accepted,
            [
                "TLS_AES_128_GCM_SHA256",
                "TLS_AES_256_GCM_SHA384",
                "TLS_CHACHA20_POLY1305_SHA256"
            ],
            "{key_type}: TLS 1.3 suites accepted"
        );
        eprintln!(
            "{key_type}: TLS 1.2 suites accepted {:?} of {} tried; TLS 1.3 {tls13_accepted:?}",
            accepted.iter().map(|suite| &suite.name).collect::<Vec<_>>(),
            tls12.len()
        );
    }
}
