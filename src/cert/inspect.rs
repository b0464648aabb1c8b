//! `cert inspect`: what an operator needs to know about a certificate before putting it in front
//! of the proxy or pinning it — who it names, who issued it, how long it has left, and the two
//! hashes (DER fingerprint, SPKI pin) that other tools and `upstream.pins` quote.

use std::path::Path;

use x509_parser::prelude::{FromDer as _, GeneralName, X509Certificate};
use x509_parser::public_key::PublicKey;

use super::CertError;

/// What `cert inspect` reports about one certificate; `--json` prints it as is.
#[derive(Debug, Clone, serde::Serialize)]
pub struct CertInfo {
    /// The subject, RFC 4514 style (`CN=api.example.test, O=Example`).
    pub subject: String,
    /// The issuer, in the same form.
    pub issuer: String,
    /// Subject alternative names as `DNS:x`, `IP:x`, `URI:x`, `EMAIL:x`.
    pub sans: Vec<String>,
    /// The serial number, upper-case hex without leading zero bytes (as `openssl x509 -serial`).
    pub serial: String,
    /// notBefore, RFC 3339 UTC.
    pub not_before: String,
    /// notAfter, RFC 3339 UTC.
    pub not_after: String,
    /// `RSA 2048`, `EC P-256`, `Ed25519`, ...
    pub key_type: String,
    /// SHA-256 of the certificate DER, colon-separated upper-case hex.
    pub sha256_fingerprint: String,
    /// `sha256/BASE64` of the SubjectPublicKeyInfo DER.
    pub spki_pin: String,
    /// Whole days until notAfter; negative once expired.
    pub days_left: i64,
    /// Whether basicConstraints says CA:TRUE.
    pub is_ca: bool,
}

impl CertInfo {
    /// The human-readable form: one `label: value` line per field.
    pub fn to_text(&self) -> String {
        let sans = if self.sans.is_empty() {
            "(none)".to_owned()
        } else {
            self.sans.join(", ")
        };
        let days = if self.days_left < 0 {
            format!("{} (expired)", self.days_left)
        } else {
            self.days_left.to_string()
        };
        format!(
            "subject:            {}\n\
             issuer:             {}\n\
             sans:               {sans}\n\
             serial:             {}\n\
             not before:         {}\n\
             not after:          {}\n\
             days left:          {days}\n\
             key:                {}\n\
             ca:                 {}\n\
             sha256 fingerprint: {}\n\
             spki pin:           {}",
            self.subject,
            self.issuer,
            self.serial,
            self.not_before,
            self.not_after,
            self.key_type,
            self.is_ca,
            self.sha256_fingerprint,
            self.spki_pin,
        )
    }
}

/// Parses one DER certificate (from `path`, named in errors) and describes it as of `now`.
pub fn inspect_der(
    der: &[u8],
    path: &Path,
    now: time::OffsetDateTime,
) -> Result<CertInfo, CertError> {
    let malformed = |reason: String| CertError::MalformedCertificate {
        path: path.to_owned(),
        reason,
    };
    let (_, cert) = X509Certificate::from_der(der).map_err(|e| malformed(e.to_string()))?;
    let sans = match cert.subject_alternative_name() {
        Ok(Some(ext)) => ext.value.general_names.iter().map(describe_name).collect(),
        Ok(None) => Vec::new(),
        Err(e) => return Err(malformed(format!("subjectAltName: {e}"))),
    };
    let is_ca = match cert.basic_constraints() {
        Ok(bc) => bc.is_some_and(|bc| bc.value.ca),
        Err(e) => return Err(malformed(format!("basicConstraints: {e}"))),
    };
    let validity = cert.validity();
    let not_after = validity.not_after.to_datetime();
    let serial = cert.raw_serial();
    let significant = serial
        .iter()
        .position(|b| *b != 0)
        .map_or(&serial[serial.len().saturating_sub(1)..], |i| &serial[i..]);
    Ok(CertInfo {
        subject: cert.subject().to_string(),
        issuer: cert.issuer().to_string(),
        sans,
        serial: hex::encode_upper(significant),
        not_before: super::rfc3339(validity.not_before.to_datetime()),
        not_after: super::rfc3339(not_after),
        key_type: key_type(&cert),
        sha256_fingerprint: super::sha256_fingerprint(der),
        spki_pin: super::spki_pin(cert.public_key().raw),
        days_left: (not_after - now).whole_days(),
        is_ca,
    })
}

/// A SAN as `KIND:value`, the spelling `--san` accepts.
fn describe_name(name: &GeneralName<'_>) -> String {
    match name {
        GeneralName::DNSName(dns) => format!("DNS:{dns}"),
        GeneralName::IPAddress(bytes) => match <[u8; 4]>::try_from(*bytes) {
            Ok(v4) => format!("IP:{}", std::net::Ipv4Addr::from(v4)),
            Err(_) => match <[u8; 16]>::try_from(*bytes) {
                Ok(v6) => format!("IP:{}", std::net::Ipv6Addr::from(v6)),
                Err(_) => format!("IP:<{} bytes>", bytes.len()),
            },
        },
        GeneralName::URI(uri) => format!("URI:{uri}"),
        GeneralName::RFC822Name(email) => format!("EMAIL:{email}"),
        GeneralName::DirectoryName(dn) => format!("DirName:{dn}"),
        other => format!("{other:?}"),
    }
}

fn key_type(cert: &X509Certificate<'_>) -> String {
    let spki = cert.public_key();
    let alg = spki.algorithm.algorithm.to_id_string();
    match alg.as_str() {
        "1.3.101.112" => return "Ed25519".to_owned(),
        "1.3.101.113" => return "Ed448".to_owned(),
        "1.2.840.10045.2.1" => {
            let curve = spki
                .algorithm
                .parameters
                .as_ref()
                .and_then(|p| p.as_oid().ok())
                .map(|oid| oid.to_id_string());
            return match curve.as_deref() {
                Some("1.2.840.10045.3.1.7") => "EC P-256".to_owned(),
                Some("1.3.132.0.34") => "EC P-384".to_owned(),
                Some("1.3.132.0.35") => "EC P-521".to_owned(),
                Some(other) => format!("EC curve {other}"),
                None => "EC (no named curve)".to_owned(),
            };
        }
        _ => {}
    }
    match spki.parsed() {
        Ok(PublicKey::RSA(rsa)) => format!("RSA {}", rsa.key_size()),
        Ok(PublicKey::DSA(_)) => "DSA".to_owned(),
        _ => format!("unknown ({alg})"),
    }
}
