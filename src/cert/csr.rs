//! `cert csr`: a PKCS#10 certificate signing request for a key the user already holds, with the
//! subject alternative names that matter for the proxy: DNS names and IP addresses for servers,
//! URIs for SPIFFE-style client identities (`client_certs.uri`).

use std::path::Path;

use super::CertError;

/// One `--san` value, parsed.
///
/// Accepted spellings: `DNS:name`, `IP:address` (v4 or v6), `URI:uri`, `EMAIL:address`; the
/// prefix is case-insensitive, as in openssl's `subjectAltName`.
pub fn parse_san(value: &str) -> Result<rcgen::SanType, CertError> {
    let invalid = |reason: String| CertError::InvalidSan {
        value: value.to_owned(),
        reason,
    };
    let (kind, rest) = value
        .split_once(':')
        .ok_or_else(|| invalid("expected DNS:, IP:, URI: or EMAIL: before the value".into()))?;
    if rest.is_empty() {
        return Err(invalid("the value is empty".into()));
    }
    let ia5 = |s: &str| {
        rcgen::Ia5String::try_from(s)
            .map_err(|e| invalid(format!("not an IA5 (ASCII) string: {e}")))
    };
    match kind.to_ascii_uppercase().as_str() {
        "DNS" => Ok(rcgen::SanType::DnsName(ia5(rest)?)),
        "IP" => rest
            .parse()
            .map(rcgen::SanType::IpAddress)
            .map_err(|e| invalid(format!("not an IP address: {e}"))),
        "URI" => Ok(rcgen::SanType::URI(ia5(rest)?)),
        "EMAIL" => Ok(rcgen::SanType::Rfc822Name(ia5(rest)?)),
        other => Err(invalid(format!(
            "unknown kind {other:?}; expected DNS, IP, URI or EMAIL"
        ))),
    }
}

/// Builds a CSR for the private key `key_pem` (read from `key_path`, named in errors) with
/// subject `CN=cn` and the given `--san` values, signed by that key; returns it as PEM.
pub fn build(
    key_pem: &str,
    key_path: &Path,
    cn: &str,
    sans: &[String],
) -> Result<String, CertError> {
    let key = rcgen::KeyPair::from_pem(key_pem).map_err(|e| CertError::MalformedKey {
        path: key_path.to_owned(),
        reason: e.to_string(),
    })?;
    let mut params = rcgen::CertificateParams::default();
    // The default name is rcgen's placeholder CN; a CSR carries only what was asked for.
    params.distinguished_name = rcgen::DistinguishedName::new();
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, cn);
    params.subject_alt_names = sans
        .iter()
        .map(|san| parse_san(san))
        .collect::<Result<_, _>>()?;
    params
        .serialize_request(&key)
        .and_then(|csr| csr.pem())
        .map_err(CertError::Csr)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn san_prefixes_pick_the_name_kind() {
        assert!(matches!(
            parse_san("DNS:a.example").unwrap(),
            rcgen::SanType::DnsName(_)
        ));
        assert!(matches!(
            parse_san("ip:::1").unwrap(),
            rcgen::SanType::IpAddress(_)
        ));
        assert!(matches!(
            parse_san("URI:spiffe://example.org/x").unwrap(),
            rcgen::SanType::URI(_)
        ));
    }

    #[test]
    fn san_without_a_known_prefix_is_rejected_with_the_value() {
        let err = parse_san("a.example").unwrap_err();
        assert!(err.to_string().contains("a.example"), "{err}");
        assert!(parse_san("IP:not-an-ip").is_err());
        assert!(parse_san("FOO:x").is_err());
        assert!(parse_san("DNS:").is_err());
    }
}
