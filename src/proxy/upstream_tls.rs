//! TLS to the upstream: roots from `upstream.ca` (or the web PKI roots when none is given), and
//! optional SPKI pins. A pinned upstream must present a leaf whose SubjectPublicKeyInfo hashes
//! to one of the pins, on top of the usual chain and name checks; otherwise the handshake fails,
//! the request gets 502 upstream_unavailable, and the log says which pin was presented.

use std::sync::Arc;

use base64::Engine;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::WebPkiServerVerifier;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme};
use sha2::{Digest, Sha256};
use x509_parser::prelude::{FromDer, X509Certificate};

use crate::config::UpstreamConfig;
use crate::server::tls::{load_roots, provider, TlsError};

/// The key of the CA bundle in the configuration.
const CA: &str = "upstream.ca";

/// The client TLS context for an https upstream.
pub(crate) fn client_config(upstream: &UpstreamConfig) -> Result<ClientConfig, TlsError> {
    let roots = match &upstream.ca {
        Some(ca) => load_roots(CA, ca)?,
        None => {
            let mut roots = RootCertStore::empty();
            roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
            roots
        }
    };
    let webpki = WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider())
        .build()
        .map_err(|e| TlsError::Rustls {
            setting: CA,
            reason: format!("upstream verifier: {e}"),
        })?;
    let builder = ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| TlsError::Rustls {
            setting: "upstream",
            reason: e.to_string(),
        })?;
    let config = if upstream.pins.is_empty() {
        builder.with_webpki_verifier(webpki).with_no_client_auth()
    } else {
        builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(PinnedVerifier {
                webpki,
                pins: upstream.pins.clone(),
            }))
            .with_no_client_auth()
    };
    Ok(config)
}

/// Builds the context exactly as the proxy does and throws it away: for the configuration
/// check, so that a CA bundle the proxy would refuse at start is a configuration error.
pub(crate) fn check(upstream: &UpstreamConfig) -> Result<(), TlsError> {
    client_config(upstream).map(drop)
}

/// The web PKI checks, then the pin check on the leaf's SPKI.
#[derive(Debug)]
struct PinnedVerifier {
    webpki: Arc<WebPkiServerVerifier>,
    pins: Vec<[u8; 32]>,
}

/// `sha256/BASE64` of the leaf's SubjectPublicKeyInfo, or `None` when it does not parse.
pub(crate) fn spki_pin(der: &[u8]) -> Option<[u8; 32]> {
    let (_, cert) = X509Certificate::from_der(der).ok()?;
    Some(Sha256::digest(cert.public_key().raw).into())
}

impl ServerCertVerifier for PinnedVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let verified = self.webpki.verify_server_cert(
            end_entity,
            intermediates,
            server_name,
            ocsp_response,
            now,
        )?;
        let presented = spki_pin(end_entity).ok_or_else(|| {
            rustls::Error::General("the upstream certificate does not parse".into())
        })?;
        if self.pins.contains(&presented) {
            return Ok(verified);
        }
        let b64 = |p: &[u8; 32]| {
            format!(
                "sha256/{}",
                base64::engine::general_purpose::STANDARD.encode(p)
            )
        };
        let expected: Vec<String> = self.pins.iter().map(b64).collect();
        tracing::error!(
            upstream = ?server_name,
            presented = %b64(&presented),
            expected = ?expected,
            "upstream certificate pin mismatch: refusing the connection"
        );
        Err(rustls::Error::General(
            "upstream certificate pin mismatch".into(),
        ))
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.webpki.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.webpki.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.webpki.supported_verify_schemes()
    }
}
