//! Client certificates: what the proxy learns from a verified certificate once per connection
//! (thumbprint, subject, SANs, SPKI pin, and the `x-forwarded-client-cert` value in Envoy's
//! format), and the route check: `mtls` needs a verified certificate, and an optional allow-list
//! (`client_certs`) narrows which ones. The certificate itself was verified by rustls during the
//! handshake; nothing here decides trust.

use sha2::{Digest, Sha256};
use x509_parser::extensions::GeneralName;
use x509_parser::prelude::{FromDer, X509Certificate};

use crate::auth::AuthError;
use crate::config::ClientCertAllowList;

/// A client certificate that rustls verified against `client_ca`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientCert {
    /// SHA-256 of the certificate's DER (RFC 8705 `x5t#S256` is its base64url).
    pub der_sha256: [u8; 32],
    /// SHA-256 of the SubjectPublicKeyInfo DER.
    pub spki_sha256: [u8; 32],
    /// The subject as `CN=...,O=...`.
    pub subject: String,
    /// DNS SANs.
    pub dns: Vec<String>,
    /// URI SANs (SPIFFE ids and the like).
    pub uri: Vec<String>,
    /// `x-forwarded-client-cert`, built once per connection.
    pub xfcc: String,
}

impl ClientCert {
    /// Reads what the proxy needs from a verified certificate. `None` when it cannot be parsed
    /// (rustls parsed it already, so this does not happen in practice).
    pub fn from_der(der: &[u8]) -> Option<ClientCert> {
        let (_, cert) = X509Certificate::from_der(der).ok()?;
        let der_sha256: [u8; 32] = Sha256::digest(der).into();
        let spki_sha256: [u8; 32] = Sha256::digest(cert.public_key().raw).into();
        let subject = cert
            .subject()
            .iter_rdn()
            .flat_map(|rdn| rdn.iter())
            .filter_map(|attr| {
                let name = x509_parser::objects::oid2abbrev(
                    attr.attr_type(),
                    x509_parser::objects::oid_registry(),
                )
                .map(str::to_owned)
                .unwrap_or_else(|_| attr.attr_type().to_id_string());
                attr.as_str().ok().map(|v| format!("{name}={v}"))
            })
            .collect::<Vec<_>>()
            .join(",");
        let mut dns = Vec::new();
        let mut uri = Vec::new();
        if let Ok(Some(san)) = cert.subject_alternative_name() {
            for name in &san.value.general_names {
                match name {
                    GeneralName::DNSName(d) => dns.push((*d).to_owned()),
                    GeneralName::URI(u) => uri.push((*u).to_owned()),
                    _ => {}
                }
            }
        }
        let xfcc = envoy_xfcc(&der_sha256, &subject, &uri, &dns);
        Some(ClientCert {
            der_sha256,
            spki_sha256,
            subject,
            dns,
            uri,
            xfcc,
        })
    }

    /// The RFC 8705 thumbprint: base64url (no padding) of the DER's SHA-256.
    pub fn x5t_s256(&self) -> String {
        use base64::Engine;
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(self.der_sha256)
    }
}

/// Envoy's `x-forwarded-client-cert` element: `Hash=<hex>;Subject="...";URI=...;DNS=...`.
/// Values holding `,` `;` `=` or `"` are quoted, with `"` and `\` escaped, as Envoy does.
fn envoy_xfcc(hash: &[u8; 32], subject: &str, uri: &[String], dns: &[String]) -> String {
    let mut out = format!(
        "Hash={};Subject=\"{}\"",
        hex::encode(hash),
        escape_quoted(subject)
    );
    for u in uri {
        out.push_str(";URI=");
        out.push_str(&quote_if_needed(u));
    }
    for d in dns {
        out.push_str(";DNS=");
        out.push_str(&quote_if_needed(d));
    }
    out
}

fn escape_quoted(value: &str) -> String {
    value
        .chars()
        .filter(|c| !c.is_control())
        .flat_map(|c| match c {
            '"' | '\\' => vec!['\\', c],
            c => vec![c],
        })
        .collect()
}

fn quote_if_needed(value: &str) -> String {
    if value.contains([',', ';', '=', '"']) {
        format!("\"{}\"", escape_quoted(value))
    } else {
        escape_quoted(value)
    }
}

/// The `mtls` check: a verified certificate, inside the route's allow-list when it has one.
pub fn check(
    cert: Option<&ClientCert>,
    allow: Option<&ClientCertAllowList>,
) -> Result<(), AuthError> {
    let Some(cert) = cert else {
        return Err(AuthError::ClientCertificateRequired(
            "this route needs a client certificate signed by the configured client CA".into(),
        ));
    };
    let Some(allow) = allow else { return Ok(()) };
    let allowed = cert
        .dns
        .iter()
        .any(|d| allow.dns.iter().any(|a| a.eq_ignore_ascii_case(d)))
        || cert.uri.iter().any(|u| allow.uri.contains(u))
        || allow.spki_sha256.contains(&cert.spki_sha256);
    if allowed {
        Ok(())
    } else {
        Err(AuthError::ClientCertificateRejected(format!(
            "the client certificate {:?} is not allowed on this route",
            cert.subject
        )))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cert() -> ClientCert {
        let mut params =
            rcgen::CertificateParams::new(vec!["client-42.example.org".to_owned()]).unwrap();
        params.subject_alt_names.push(rcgen::SanType::URI(
            "spiffe://example.org/client-42".try_into().unwrap(),
        ));
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "client-42");
        params
            .distinguished_name
            .push(rcgen::DnType::OrganizationName, "Example \"Co\"");
        let key = rcgen::KeyPair::generate().unwrap();
        let der = params.self_signed(&key).unwrap().der().to_vec();
        ClientCert::from_der(&der).unwrap()
    }

    #[test]
    fn certificate_fields_are_read_and_xfcc_is_in_envoy_format() {
        let c = cert();
        assert_eq!(c.dns, vec!["client-42.example.org"]);
        assert_eq!(c.uri, vec!["spiffe://example.org/client-42"]);
        assert!(c.subject.contains("CN=client-42"), "{}", c.subject);
        let hash = hex::encode(c.der_sha256);
        assert!(
            c.xfcc.starts_with(&format!("Hash={hash};Subject=\"")),
            "{}",
            c.xfcc
        );
        assert!(c.xfcc.contains("O=Example \\\"Co\\\""), "{}", c.xfcc);
        assert!(
            c.xfcc
                .ends_with(";URI=spiffe://example.org/client-42;DNS=client-42.example.org"),
            "{}",
            c.xfcc
        );
    }

    #[test]
    fn the_allow_list_admits_by_dns_uri_or_spki() {
        let c = cert();
        assert!(matches!(
            check(None, None),
            Err(AuthError::ClientCertificateRequired(_))
        ));
        assert!(check(Some(&c), None).is_ok());
        let by_dns = ClientCertAllowList {
            dns: vec!["CLIENT-42.example.org".into()],
            ..Default::default()
        };
        let by_uri = ClientCertAllowList {
            uri: vec!["spiffe://example.org/client-42".into()],
            ..Default::default()
        };
        let by_spki = ClientCertAllowList {
            spki_sha256: vec![c.spki_sha256],
            ..Default::default()
        };
        for allow in [&by_dns, &by_uri, &by_spki] {
            assert!(check(Some(&c), Some(allow)).is_ok(), "{allow:?}");
        }
        let other = ClientCertAllowList {
            dns: vec!["client-43.example.org".into()],
            uri: vec!["spiffe://example.org/x".into()],
            spki_sha256: vec![[0; 32]],
        };
        assert!(matches!(
            check(Some(&c), Some(&other)),
            Err(AuthError::ClientCertificateRejected(_))
        ));
    }
}
