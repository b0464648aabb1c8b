//! `cert verify`: checks a certificate the way the proxy's TLS stack does — rustls-webpki path
//! building from the leaf through the given intermediates to a trust anchor, validity at the
//! given time, extended key usage, and optionally a host name — and names the reason when the
//! check fails, so that "why does the handshake fail" has an answer before deployment.
//!
//! [`verify_chain`] is pure: it takes DER bytes and a time, and does no I/O.

use std::path::Path;
use std::time::Duration;

use rustls_pki_types::{CertificateDer, ServerName, SignatureVerificationAlgorithm, UnixTime};
use x509_parser::prelude::{FromDer as _, X509Certificate};

use super::CertError;

/// The signature algorithms accepted on a path: the proxy's own rustls provider's list
/// (aws-lc-rs), read from it so that this check and a handshake cannot drift apart.
fn signature_algorithms() -> &'static [&'static dyn SignatureVerificationAlgorithm] {
    crate::server::tls::provider()
        .signature_verification_algorithms
        .all
}

/// What the certificate must be good for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Usage {
    /// A TLS server (EKU serverAuth, if the certificate has an EKU extension).
    ServerAuth,
    /// A TLS client, as the proxy checks for mTLS (EKU clientAuth, if present).
    ClientAuth,
}

impl Usage {
    fn purpose(self) -> &'static str {
        match self {
            Usage::ServerAuth => "server authentication",
            Usage::ClientAuth => "client authentication",
        }
    }
}

/// One verification to run.
#[derive(Debug, Clone, Copy)]
pub struct Request<'a> {
    /// The leaf certificate, DER.
    pub leaf: &'a [u8],
    /// Candidate intermediates, DER, in any order.
    pub intermediates: &'a [Vec<u8>],
    /// The trusted roots, DER.
    pub roots: &'a [Vec<u8>],
    /// Where the roots came from, named when none is usable.
    pub roots_path: &'a Path,
    /// A DNS name or IP address the leaf must be valid for.
    pub host: Option<&'a str>,
    /// The purpose to check.
    pub usage: Usage,
}

/// A successful verification; `--json` prints it as is.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Verified {
    /// Always true: a failure is an error, never a `Verified`.
    pub valid: bool,
    /// The subjects on the verified path, leaf first, trust anchor last.
    pub path: Vec<String>,
    /// The earliest notAfter on the path (RFC 3339): when this path stops verifying.
    pub valid_until: String,
    /// The host checked, if any.
    pub host: Option<String>,
    /// "server authentication" or "client authentication".
    pub usage: &'static str,
}

impl Verified {
    /// The human-readable form.
    pub fn to_text(&self) -> String {
        let mut text = format!("OK: verified for {}\npath:\n", self.usage);
        for (depth, subject) in self.path.iter().enumerate() {
            text.push_str(&format!("  {depth}: {subject}\n"));
        }
        if let Some(host) = &self.host {
            text.push_str(&format!("host: {host} matches\n"));
        }
        text.push_str(&format!("valid until: {}", self.valid_until));
        text
    }
}

/// Verifies `request.leaf` to one of `request.roots` as of `now`.
pub fn verify_chain(
    request: &Request<'_>,
    now: time::OffsetDateTime,
) -> Result<Verified, CertError> {
    let leaf_der = CertificateDer::from(request.leaf);
    let leaf = webpki::EndEntityCert::try_from(&leaf_der).map_err(|e| {
        CertError::Rejected(format!("the leaf certificate is unusable: {}", reason(&e)))
    })?;
    let root_ders: Vec<CertificateDer<'_>> = request
        .roots
        .iter()
        .map(|der| CertificateDer::from(der.as_slice()))
        .collect();
    // A roots file may hold a certificate webpki cannot use as an anchor (v1, malformed); the
    // others still count, and only an empty result is an error.
    let anchors: Vec<_> = root_ders
        .iter()
        .filter_map(|der| webpki::anchor_from_trusted_cert(der).ok())
        .collect();
    if anchors.is_empty() {
        return Err(CertError::NoTrustAnchors {
            path: request.roots_path.to_owned(),
        });
    }
    let intermediates: Vec<CertificateDer<'_>> = request
        .intermediates
        .iter()
        .filter(|der| der.as_slice() != request.leaf)
        .map(|der| CertificateDer::from(der.as_slice()))
        .collect();
    let at = UnixTime::since_unix_epoch(Duration::from_secs(
        u64::try_from(now.unix_timestamp()).unwrap_or(0),
    ));
    let eku = match request.usage {
        Usage::ServerAuth => webpki::KeyUsage::server_auth(),
        Usage::ClientAuth => webpki::KeyUsage::client_auth(),
    };
    let path = leaf
        .verify_for_usage(
            signature_algorithms(),
            &anchors,
            &intermediates,
            at,
            eku,
            None,
            None,
        )
        .map_err(|e| explain(e, request))?;

    let mut subjects = Vec::new();
    let mut not_afters = Vec::new();
    let mut last_issuer = String::new();
    let on_path = std::iter::once(leaf_der.clone())
        .chain(path.intermediate_certificates().map(|cert| cert.der()));
    for der in on_path {
        if let Ok((_, cert)) = X509Certificate::from_der(der.as_ref()) {
            subjects.push(cert.subject().to_string());
            not_afters.push(cert.validity().not_after.to_datetime());
            last_issuer = cert.issuer().to_string();
        }
    }
    // The anchor is the root whose subject is the last certificate's issuer; its own validity
    // counts too, as webpki does not check it but most other verifiers do.
    let root = request.roots.iter().find_map(|der| {
        let (_, cert) = X509Certificate::from_der(der).ok()?;
        (cert.subject().to_string() == last_issuer).then(|| cert.validity().not_after.to_datetime())
    });
    subjects.push(last_issuer);
    not_afters.extend(root);

    if let Some(host) = request.host {
        let name =
            ServerName::try_from(host).map_err(|_| CertError::InvalidHost(host.to_owned()))?;
        leaf.verify_is_valid_for_subject_name(&name)
            .map_err(|e| explain(e, request))?;
    }
    Ok(Verified {
        valid: true,
        path: subjects,
        valid_until: not_afters
            .into_iter()
            .min()
            .map(super::rfc3339)
            .unwrap_or_default(),
        host: request.host.map(str::to_owned),
        usage: request.usage.purpose(),
    })
}

/// Turns webpki's error into the reason the user reads.
fn explain(error: webpki::Error, request: &Request<'_>) -> CertError {
    match error {
        webpki::Error::UnknownIssuer => CertError::UnknownIssuer,
        webpki::Error::CertExpired { time, not_after } => CertError::Expired {
            not_after: unix_to_rfc3339(not_after),
            now: unix_to_rfc3339(time),
        },
        webpki::Error::CertNotValidYet { time, not_before } => CertError::NotYetValid {
            not_before: unix_to_rfc3339(not_before),
            now: unix_to_rfc3339(time),
        },
        webpki::Error::CertNotValidForName(context) => CertError::HostMismatch {
            host: request.host.unwrap_or_default().to_owned(),
            names: if context.presented.is_empty() {
                "none".to_owned()
            } else {
                context.presented.join(", ")
            },
        },
        webpki::Error::RequiredEkuNotFoundContext(_) => CertError::WrongUsage {
            purpose: request.usage.purpose(),
        },
        #[allow(deprecated)] // webpki still returns the old variant from some paths
        webpki::Error::RequiredEkuNotFound => CertError::WrongUsage {
            purpose: request.usage.purpose(),
        },
        other => CertError::Rejected(reason(&other)),
    }
}

/// A sentence for a webpki error that has no `CertError` of its own. webpki's own `Display` is
/// its `Debug` (`PathLenConstraintViolated`, byte arrays of OIDs), which tells an operator little.
fn reason(error: &webpki::Error) -> String {
    #[allow(deprecated)] // the context-free variants are still returned on some paths
    let text = match error {
        webpki::Error::InvalidSignatureForPublicKey => {
            "bad signature: no certificate with the issuer's name has a key that verifies this \
             one (another key under the same name, or an RSA key shorter than 2048 bits, which \
             the proxy's TLS refuses)"
        }
        webpki::Error::CaUsedAsEndEntity => "the leaf is a CA certificate, not an end entity",
        webpki::Error::EndEntityUsedAsCa => {
            "an issuer on the path is not a CA: it lacks basicConstraints CA:TRUE, so it cannot \
             sign other certificates"
        }
        webpki::Error::PathLenConstraintViolated => {
            "the path is longer than an issuer's basicConstraints pathLenConstraint allows"
        }
        webpki::Error::NameConstraintViolation => {
            "a name in the certificate is outside an issuer's name constraints"
        }
        webpki::Error::UnsupportedSignatureAlgorithmContext(context) => {
            return format!(
                "signature algorithm {} is not accepted (the proxy's TLS never accepts SHA-1 or \
                 MD5 signatures)",
                algorithm_name(&context.signature_algorithm_id)
            );
        }
        webpki::Error::UnsupportedSignatureAlgorithmForPublicKeyContext(context) => {
            return format!(
                "an issuer's {} key cannot check a {} signature (an unsupported key type or \
                 curve, or a key of another algorithm than the signature's)",
                algorithm_name(&context.public_key_algorithm_id),
                algorithm_name(&context.signature_algorithm_id)
            );
        }
        webpki::Error::UnsupportedSignatureAlgorithm => {
            "a signature on the path uses an algorithm the proxy's TLS does not accept"
        }
        webpki::Error::UnsupportedSignatureAlgorithmForPublicKey => {
            "an issuer's key type or curve cannot check the signature it is asked to"
        }
        webpki::Error::SignatureAlgorithmMismatch => {
            "a certificate names one signature algorithm in its body and another beside its \
             signature"
        }
        webpki::Error::EmptyEkuExtension => "a certificate's extended key usage extension is empty",
        webpki::Error::UnsupportedCriticalExtension => {
            "a certificate on the path has a critical extension the verifier does not know"
        }
        webpki::Error::UnsupportedCertVersion => "a certificate on the path is not X.509 version 3",
        webpki::Error::InvalidCertValidity => {
            "a certificate on the path has a validity period that ends before it starts"
        }
        webpki::Error::InvalidSerialNumber => {
            "a certificate on the path has a malformed, negative or over-long serial number"
        }
        webpki::Error::MalformedExtensions | webpki::Error::ExtensionValueInvalid => {
            "a certificate on the path has a malformed extension"
        }
        webpki::Error::MalformedNameConstraint | webpki::Error::InvalidNetworkMaskConstraint => {
            "an issuer on the path has a malformed name constraint"
        }
        webpki::Error::MalformedDnsIdentifier => "a DNS name in the certificate is malformed",
        webpki::Error::BadDer | webpki::Error::BadDerTime | webpki::Error::TrailingData(_) => {
            "a certificate on the path is not valid DER"
        }
        webpki::Error::MaximumPathDepthExceeded
        | webpki::Error::MaximumSignatureChecksExceeded
        | webpki::Error::MaximumPathBuildCallsExceeded
        | webpki::Error::MaximumNameConstraintComparisonsExceeded => {
            "no path found within the verifier's limits (too long a chain, or too many candidate \
             intermediates)"
        }
        webpki::Error::CertDistrusted => "a certificate's key on the path is distrusted",
        webpki::Error::CertRevoked => "a certificate on the path is revoked",
        other => return format!("rejected by the path check ({other:?})"),
    };
    text.to_owned()
}

/// The short name of the algorithm whose DER `AlgorithmIdentifier` contents (the OID first)
/// webpki hands back, e.g. `sha1WithRSAEncryption`, or its dotted OID when it has no name here.
fn algorithm_name(identifier: &[u8]) -> String {
    use x509_parser::der_parser::asn1_rs::{FromDer as _, Oid};
    match Oid::from_der(identifier) {
        Ok((_, oid)) => x509_parser::objects::oid2sn(&oid, x509_parser::objects::oid_registry())
            .map_or_else(|_| oid.to_id_string(), str::to_owned),
        Err(_) => "(unreadable)".to_owned(),
    }
}

fn unix_to_rfc3339(at: UnixTime) -> String {
    i64::try_from(at.as_secs())
        .ok()
        .and_then(|secs| time::OffsetDateTime::from_unix_timestamp(secs).ok())
        .map_or_else(
            || format!("{} (Unix seconds)", at.as_secs()),
            super::rfc3339,
        )
}
