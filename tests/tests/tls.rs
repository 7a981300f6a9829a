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
