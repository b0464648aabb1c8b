//! A certificate authority made in the test with rcgen: server and client certificates,
//! expired ones, ones without the clientAuth usage, written to a folder as PEM files; and a
//! TLS client (tokio-rustls + hyper) that can present a client certificate and reports which
//! server certificate it was shown.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair,
    KeyUsagePurpose, SanType,
};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use sha2::{Digest, Sha256};

pub struct Ca {
    cert: rcgen::Certificate,
    key: KeyPair,
}

/// A certificate and its key, as PEM.
#[derive(Clone)]
pub struct Issued {
    pub cert_pem: String,
    pub key_pem: String,
    pub der: Vec<u8>,
}

impl Issued {
    /// Hex SHA-256 of the DER (the `Hash=` of x-forwarded-client-cert).
    pub fn sha256_hex(&self) -> String {
        hex::encode(Sha256::digest(&self.der))
    }

    /// RFC 8705 `x5t#S256`.
    pub fn x5t_s256(&self) -> String {
        use base64::Engine;
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(Sha256::digest(&self.der))
    }

    /// Writes `<name>.crt` and `<name>.key` into `dir`.
    pub fn write(&self, dir: &Path, name: &str) -> (PathBuf, PathBuf) {
        let crt = dir.join(format!("{name}.crt"));
        let key = dir.join(format!("{name}.key"));
        std::fs::write(&crt, &self.cert_pem).unwrap();
        std::fs::write(&key, &self.key_pem).unwrap();
        (crt, key)
    }
}

/// What a leaf is for.
pub enum Usage {
    Server,
    Client,
    /// A client certificate without the clientAuth extended key usage.
    ClientWithoutEku,
}

impl Ca {
    pub fn new(name: &str) -> Ca {
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.distinguished_name.push(DnType::CommonName, name);
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let key = KeyPair::generate().unwrap();
        let cert = params.self_signed(&key).unwrap();
        Ca { cert, key }
    }

    pub fn pem(&self) -> String {
        self.cert.pem()
    }

    pub fn write(&self, dir: &Path, name: &str) -> PathBuf {
        let path = dir.join(format!("{name}.crt"));
        std::fs::write(&path, self.pem()).unwrap();
        path
    }

    /// A leaf with `cn`, DNS and URI SANs (an entry parsing as an IP address becomes an IP SAN).
    pub fn issue(
        &self,
        cn: &str,
        dns: &[&str],
        uri: &[&str],
        usage: Usage,
        expired: bool,
    ) -> Issued {
        self.issue_with_dn(&[(DnType::CommonName, cn)], dns, uri, usage, expired)
    }

    /// [`Ca::issue`] with the subject `dn`, its attributes in certificate order (least specific
    /// first: `[(O, "Example"), (CN, "alice")]` is printed `CN=alice,O=Example`).
    pub fn issue_with_dn(
        &self,
        dn: &[(DnType, &str)],
        dns: &[&str],
        uri: &[&str],
        usage: Usage,
        expired: bool,
    ) -> Issued {
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        // Not the default, which already holds a CN (first).
        params.distinguished_name = rcgen::DistinguishedName::new();
        for (kind, value) in dn {
            params.distinguished_name.push(kind.clone(), *value);
        }
        for name in dns {
            params
                .subject_alt_names
                .push(match name.parse::<std::net::IpAddr>() {
                    Ok(ip) => SanType::IpAddress(ip),
                    Err(_) => SanType::DnsName((*name).try_into().unwrap()),
                });
        }
        for u in uri {
            params
                .subject_alt_names
                .push(SanType::URI((*u).try_into().unwrap()));
        }
        params.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        params.extended_key_usages = match usage {
            Usage::Server => vec![ExtendedKeyUsagePurpose::ServerAuth],
            Usage::Client => vec![ExtendedKeyUsagePurpose::ClientAuth],
            Usage::ClientWithoutEku => vec![ExtendedKeyUsagePurpose::ServerAuth],
        };
        if expired {
            params.not_before = rcgen::date_time_ymd(2020, 1, 1);
            params.not_after = rcgen::date_time_ymd(2021, 1, 1);
        } else {
            params.not_before = rcgen::date_time_ymd(2025, 1, 1);
            params.not_after = rcgen::date_time_ymd(2036, 1, 1);
        }
        params.use_authority_key_identifier_extension = true;
        let key = KeyPair::generate().unwrap();
        let cert = params.signed_by(&key, &self.cert, &self.key).unwrap();
        Issued {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
            der: cert.der().to_vec(),
        }
    }
}

/// The outcome of one HTTPS request.
pub struct TlsResponse {
    pub status: u16,
    pub body: String,
    /// SHA-256 hex of the certificate the server presented.
    pub server_cert_sha256: String,
}

/// A TLS client trusting `ca_pem`, presenting `client` when given, offering only `versions`.
pub struct TlsClient {
    config: Arc<rustls::ClientConfig>,
}

impl TlsClient {
    pub fn new(ca_pem: &str, client: Option<&Issued>) -> TlsClient {
        Self::with_versions(
            ca_pem,
            client,
            &[&rustls::version::TLS13, &rustls::version::TLS12],
        )
    }

    pub fn with_versions(
        ca_pem: &str,
        client: Option<&Issued>,
        versions: &[&'static rustls::SupportedProtocolVersion],
    ) -> TlsClient {
        let mut roots = rustls::RootCertStore::empty();
        for cert in CertificateDer::pem_slice_iter(ca_pem.as_bytes()) {
            roots.add(cert.unwrap()).unwrap();
        }
        let builder = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::aws_lc_rs::default_provider(),
        ))
        .with_protocol_versions(versions)
        .unwrap()
        .with_root_certificates(roots);
        let mut config = match client {
            None => builder.with_no_client_auth(),
            Some(issued) => {
                let chain = vec![CertificateDer::from(issued.der.clone())];
                let key = PrivateKeyDer::from_pem_slice(issued.key_pem.as_bytes()).unwrap();
                builder.with_client_auth_cert(chain, key).unwrap()
            }
        };
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        TlsClient {
            config: Arc::new(config),
        }
    }

    /// One GET over a new connection (a new handshake). Errors are returned as text.
    pub async fn get(
        &self,
        addr: SocketAddr,
        path: &str,
        headers: &[(&str, &str)],
    ) -> Result<TlsResponse, String> {
        let tcp = tokio::net::TcpStream::connect(addr)
            .await
            .map_err(|e| e.to_string())?;
        let connector = tokio_rustls::TlsConnector::from(self.config.clone());
        let name = ServerName::try_from("localhost").unwrap();
        let tls = connector
            .connect(name, tcp)
            .await
            .map_err(|e| format!("handshake: {e}"))?;
        let server_cert_sha256 = tls
            .get_ref()
            .1
            .peer_certificates()
            .and_then(|c| c.first())
            .map(|c| hex::encode(Sha256::digest(c)))
            .unwrap_or_default();
        let (mut sender, conn) =
            hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tls))
                .await
                .map_err(|e| format!("http handshake: {e}"))?;
        tokio::spawn(conn);
        let mut request =
            hyper::Request::get(path).header("host", format!("localhost:{}", addr.port()));
        for (n, v) in headers {
            request = request.header(*n, *v);
        }
        let response = sender
            .send_request(request.body(Empty::<Bytes>::new()).unwrap())
            .await
            .map_err(|e| format!("request: {e}"))?;
        let status = response.status().as_u16();
        let body = response
            .into_body()
            .collect()
            .await
            .map_err(|e| format!("body: {e}"))?
            .to_bytes();
        Ok(TlsResponse {
            status,
            body: String::from_utf8_lossy(&body).into(),
            server_cert_sha256,
        })
    }
}

/// A real HTTPS upstream presenting `cert`: answers 200 `tls upstream` to every request.
pub async fn https_upstream(cert: &Issued) -> SocketAddr {
    https_upstream_counted(cert).await.0
}

/// A TLS server side for `cert`, with no client authentication. It sends two TLS 1.3 session
/// tickets after the handshake: records the client reads on a connection it may want to use
/// again.
pub fn server_acceptor(cert: &Issued) -> tokio_rustls::TlsAcceptor {
    let chain = vec![CertificateDer::from(cert.der.clone())];
    let key = PrivateKeyDer::from_pem_slice(cert.key_pem.as_bytes()).unwrap();
    let mut config = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::aws_lc_rs::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_no_client_auth()
    .with_single_cert(chain, key)
    .unwrap();
    config.send_tls13_tickets = 2;
    tokio_rustls::TlsAcceptor::from(Arc::new(config))
}

/// [`https_upstream`], and the number of TLS handshakes it has completed so far.
pub async fn https_upstream_counted(
    cert: &Issued,
) -> (SocketAddr, Arc<std::sync::atomic::AtomicUsize>) {
    let handshakes = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let counted = handshakes.clone();
    use hyper::service::service_fn;
    let acceptor = server_acceptor(cert);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = listener.accept().await else {
                continue;
            };
            let acceptor = acceptor.clone();
            let counted = counted.clone();
            tokio::spawn(async move {
                let Ok(tls) = acceptor.accept(tcp).await else {
                    return;
                };
                counted.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                let service = service_fn(|_req: hyper::Request<hyper::body::Incoming>| async {
                    Ok::<_, std::convert::Infallible>(hyper::Response::new(
                        http_body_util::Full::new(Bytes::from_static(b"tls upstream")),
                    ))
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(tls), service)
                    .await;
            });
        }
    });
    (addr, handshakes)
}
