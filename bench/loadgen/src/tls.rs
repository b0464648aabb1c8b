//! The rustls client configuration (aws-lc-rs provider): roots from `--tls-ca`, an optional
//! client certificate, ALPN http/1.1, session resumption off unless asked for (so that a new
//! connection per request is a full handshake), and a benchmark-only verifier that checks nothing.

use std::path::Path;
use std::sync::Arc;

use anyhow::{bail, Context};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::{ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme};

pub struct TlsOptions<'a> {
    pub ca: Option<&'a Path>,
    pub client_cert: Option<&'a Path>,
    pub client_key: Option<&'a Path>,
    /// "1.2", "1.3" or "any".
    pub version: &'a str,
    pub resume: bool,
    pub insecure_no_verify: bool,
}

pub fn client_config(opts: &TlsOptions<'_>) -> anyhow::Result<Arc<ClientConfig>> {
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let versions: &[&rustls::SupportedProtocolVersion] = match opts.version {
        "1.2" => &[&rustls::version::TLS12],
        "1.3" => &[&rustls::version::TLS13],
        "any" => &[&rustls::version::TLS13, &rustls::version::TLS12],
        other => bail!("--tls-version {other:?}: expected 1.2, 1.3 or any"),
    };
    let builder = ClientConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(versions)
        .context("TLS versions")?;
    let builder = if opts.insecure_no_verify {
        builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(NoVerify(provider)))
    } else {
        let Some(ca) = opts.ca else {
            bail!("an https URL needs --tls-ca FILE (or --tls-insecure-no-verify)");
        };
        let mut roots = RootCertStore::empty();
        for cert in CertificateDer::pem_file_iter(ca)
            .with_context(|| format!("cannot read {}", ca.display()))?
        {
            let cert = cert.with_context(|| format!("{}: bad PEM", ca.display()))?;
            roots
                .add(cert)
                .with_context(|| format!("{}: certificate refused", ca.display()))?;
        }
        if roots.is_empty() {
            bail!("{}: no certificate", ca.display());
        }
        builder.with_root_certificates(roots)
    };
    let mut config = match (opts.client_cert, opts.client_key) {
        (Some(cert), Some(key)) => {
            let chain = CertificateDer::pem_file_iter(cert)
                .with_context(|| format!("cannot read {}", cert.display()))?
                .collect::<Result<Vec<_>, _>>()
                .with_context(|| format!("{}: bad PEM", cert.display()))?;
            let key = PrivateKeyDer::from_pem_file(key)
                .with_context(|| format!("{}: no private key", key.display()))?;
            builder
                .with_client_auth_cert(chain, key)
                .context("client certificate refused")?
        }
        (None, None) => builder.with_no_client_auth(),
        _ => bail!("--tls-client-cert and --tls-client-key go together"),
    };
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    if !opts.resume {
        config.resumption = rustls::client::Resumption::disabled();
    }
    Ok(Arc::new(config))
}

/// Accepts any certificate and any handshake signature: for benchmarks only, to take the
/// client's own signature verification out of a handshake-rate measurement.
#[derive(Debug)]
struct NoVerify(Arc<CryptoProvider>);

impl ServerCertVerifier for NoVerify {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        _message: &[u8],
        _cert: &CertificateDer<'_>,
        _dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        Ok(HandshakeSignatureValid::assertion())
    }

    fn verify_tls13_signature(
        &self,
        _message: &[u8],
        _cert: &CertificateDer<'_>,
        _dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        Ok(HandshakeSignatureValid::assertion())
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}
