//! Client certificates: what the proxy learns from a verified certificate once per connection
//! (thumbprint, subject, SANs, SPKI pin, and the `x-forwarded-client-cert` value in Envoy's
//! format), and the route check: `mtls` needs a verified certificate, and an optional allow-list
//! (`client_certs`) narrows which ones. The certificate itself was verified by rustls during the
//! handshake; nothing here decides trust.

use std::borrow::Cow;
use std::fmt::Write as _;

use sha2::{Digest, Sha256};
use x509_parser::asn1_rs::{Any, Class, Tag, ToDer as _};
use x509_parser::extensions::GeneralName;
use x509_parser::objects::{oid2abbrev, oid_registry};
use x509_parser::prelude::{AttributeTypeAndValue, FromDer, X509Certificate, X509Name};

use crate::auth::AuthError;
use crate::config::ClientCertAllowList;

/// A client certificate that rustls verified against `client_ca`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientCert {
    /// SHA-256 of the certificate's DER (RFC 8705 `x5t#S256` is its base64url).
    pub der_sha256: [u8; 32],
    /// SHA-256 of the SubjectPublicKeyInfo DER.
    pub spki_sha256: [u8; 32],
    /// The subject in RFC 4514 form, most specific first (`CN=alice,O=Example,C=US`), as
    /// Envoy prints it: special characters escaped, ASCII only (see [`rfc4514`]).
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
        let subject = rfc4514(cert.subject());
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

/// A distinguished name as Envoy puts it in `x-forwarded-client-cert`: OpenSSL's
/// `X509_NAME_print_ex(.., XN_FLAG_RFC2253)`, which is RFC 4514 (RFC 2253) output.
///
/// The attributes come from the last to the first, as OpenSSL's `XN_FLAG_DN_REV` walks them, so
/// the most specific RDN leads and the attributes of a multi-valued RDN come out reversed too;
/// RDNs are joined with `,` and the attributes of one RDN with `+`. The type is x509-parser's
/// abbreviation (`CN`, `O`, `OU`, `C`, ...) or the dotted OID. A value is escaped so that no
/// certificate can make its text read as another name part: `"` `+` `,` `;` `<` `>` `\`, a
/// leading `#` or space and a trailing space get a backslash; control characters and every byte
/// of a non-ASCII character are `\XX` hex (OpenSSL's ESC_MSB), so the result is ASCII. A value
/// that is not a string type, does not decode, or has a dotted type (RFC 4514 2.4) is `#` and
/// the hex of its DER encoding.
fn rfc4514(name: &X509Name<'_>) -> String {
    let mut out = String::new();
    let rdns: Vec<_> = name.iter_rdn().collect();
    for (i, rdn) in rdns.iter().rev().enumerate() {
        if i > 0 {
            out.push(',');
        }
        let attributes: Vec<_> = rdn.iter().collect();
        for (j, attribute) in attributes.iter().rev().enumerate() {
            if j > 0 {
                out.push('+');
            }
            push_attribute(&mut out, attribute);
        }
    }
    out
}

fn push_attribute(out: &mut String, attribute: &AttributeTypeAndValue<'_>) {
    let value = attribute.attr_value();
    // A registry short name that is not an RFC 4514 keystring would not parse back; the dotted
    // form always does.
    let name = oid2abbrev(attribute.attr_type(), oid_registry())
        .ok()
        .filter(|name| is_keystring(name));
    match name {
        Some(name) => {
            out.push_str(name);
            out.push('=');
            match decode_string(value) {
                Some(text) => push_escaped(out, &text),
                None => push_der_hex(out, value),
            }
        }
        // RFC 4514 2.4: with the type in dotted form the value is given as its encoding, as
        // OpenSSL's XN_FLAG_DUMP_UNKNOWN_FIELDS does.
        None => {
            out.push_str(&attribute.attr_type().to_id_string());
            out.push('=');
            push_der_hex(out, value);
        }
    }
}

/// RFC 4514 `keystring`: an ALPHA, then ALPHA, DIGIT or `-`.
fn is_keystring(name: &str) -> bool {
    let mut chars = name.chars();
    chars.next().is_some_and(|c| c.is_ascii_alphabetic())
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '-')
}

/// The text of a string-typed value, decoded as OpenSSL does (BMPString UTF-16BE,
/// UniversalString UTF-32BE, TeletexString Latin-1); `None` for any other type or bytes that
/// do not decode.
fn decode_string<'a>(value: &Any<'a>) -> Option<Cow<'a, str>> {
    if value.class() != Class::Universal || value.header.is_constructed() {
        return None;
    }
    let data = value.data;
    match value.tag() {
        Tag::Utf8String
        | Tag::PrintableString
        | Tag::Ia5String
        | Tag::NumericString
        | Tag::VisibleString => std::str::from_utf8(data).ok().map(Cow::Borrowed),
        Tag::BmpString if data.len().is_multiple_of(2) => {
            let units = data
                .chunks_exact(2)
                .map(|pair| u16::from_be_bytes([pair[0], pair[1]]));
            char::decode_utf16(units)
                .collect::<Result<String, _>>()
                .ok()
                .map(Cow::Owned)
        }
        Tag::UniversalString if data.len().is_multiple_of(4) => data
            .chunks_exact(4)
            .map(|quad| char::from_u32(u32::from_be_bytes([quad[0], quad[1], quad[2], quad[3]])))
            .collect::<Option<String>>()
            .map(Cow::Owned),
        Tag::TeletexString => Some(Cow::Owned(data.iter().copied().map(char::from).collect())),
        _ => None,
    }
}

fn push_escaped(out: &mut String, text: &str) {
    for (at, c) in text.char_indices() {
        let first = at == 0;
        let last = at + c.len_utf8() == text.len();
        match c {
            '"' | '+' | ',' | ';' | '<' | '>' | '\\' => {
                out.push('\\');
                out.push(c);
            }
            '#' if first => out.push_str("\\#"),
            ' ' if first || last => out.push_str("\\ "),
            c if c.is_ascii_control() || !c.is_ascii() => {
                let mut utf8 = [0; 4];
                for byte in c.encode_utf8(&mut utf8).bytes() {
                    // Writing to a String cannot fail.
                    let _ = write!(out, "\\{byte:02X}");
                }
            }
            c => out.push(c),
        }
    }
}

/// `#` and the hex of the value's DER encoding (RFC 4514 2.4), upper case as OpenSSL prints it.
fn push_der_hex(out: &mut String, value: &Any<'_>) {
    out.push('#');
    match value.to_der_vec() {
        Ok(der) => out.push_str(&hex::encode_upper(der)),
        // Only a tag number or length too large for its encoding fails, and a value parsed from
        // a certificate has neither; the content alone still says something.
        Err(_) => out.push_str(&hex::encode_upper(value.data)),
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
        let hash = hex::encode(c.der_sha256);
        assert!(
            c.xfcc.starts_with(&format!("Hash={hash};Subject=\"")),
            "{}",
            c.xfcc
        );
        // RFC 4514 escapes the quotes with `\`; the XFCC quoting then escapes both.
        assert_eq!(c.subject, r#"O=Example \"Co\",CN=client-42"#);
        assert!(
            c.xfcc
                .contains(r#";Subject="O=Example \\\"Co\\\",CN=client-42";"#),
            "{}",
            c.xfcc
        );
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

    /// DER tag-length-value, for names built byte by byte.
    fn tlv(tag: u8, content: &[u8]) -> Vec<u8> {
        let mut out = vec![tag];
        match content.len() {
            n @ 0..=127 => out.push(n as u8),
            n => {
                let len = (n as u32).to_be_bytes();
                let skip = len.iter().take_while(|b| **b == 0).count();
                out.push(0x80 | (4 - skip) as u8);
                out.extend_from_slice(&len[skip..]);
            }
        }
        out.extend_from_slice(content);
        out
    }

    const CN: &[u8] = &[0x55, 0x04, 0x03];
    const C: &[u8] = &[0x55, 0x04, 0x06];
    const O: &[u8] = &[0x55, 0x04, 0x0a];
    const OU: &[u8] = &[0x55, 0x04, 0x0b];
    /// 1.2.3.4, which no registry names.
    const UNNAMED: &[u8] = &[0x2a, 0x03, 0x04];

    fn utf8(text: &str) -> Vec<u8> {
        tlv(0x0c, text.as_bytes())
    }

    /// One RDN holding `attributes` (type OID, encoded value), in that order.
    fn rdn(attributes: &[(&[u8], Vec<u8>)]) -> Vec<u8> {
        let body: Vec<u8> = attributes
            .iter()
            .flat_map(|(oid, value)| tlv(0x30, &[tlv(0x06, oid), value.clone()].concat()))
            .collect();
        tlv(0x31, &body)
    }

    /// The RFC 4514 form of a name made of `rdns`, in certificate order.
    fn subject(rdns: &[Vec<u8>]) -> String {
        let der = tlv(0x30, &rdns.concat());
        let (rest, name) = X509Name::from_der(&der).unwrap();
        assert!(rest.is_empty());
        rfc4514(&name)
    }

    fn cn(value: Vec<u8>) -> String {
        subject(&[rdn(&[(CN, value)])])
    }

    #[test]
    fn subject_lists_rdns_most_specific_first() {
        let name = subject(&[
            rdn(&[(C, tlv(0x13, b"US"))]),
            rdn(&[(O, utf8("Example"))]),
            rdn(&[(CN, utf8("alice"))]),
        ]);
        assert_eq!(name, "CN=alice,O=Example,C=US");
    }

    #[test]
    fn a_multi_valued_rdn_is_joined_with_plus_in_openssl_order() {
        // RFC 2253's own example; OpenSSL walks the attributes backwards, inside an RDN too.
        let name = subject(&[
            rdn(&[(C, tlv(0x13, b"US"))]),
            rdn(&[(O, utf8("Widget Inc."))]),
            rdn(&[(CN, utf8("J. Smith")), (OU, utf8("Sales"))]),
        ]);
        assert_eq!(name, "OU=Sales+CN=J. Smith,O=Widget Inc.,C=US");
    }

    #[test]
    fn subject_values_cannot_add_name_parts() {
        assert_eq!(cn(utf8("alice,OU=admins")), r"CN=alice\,OU=admins");
        assert_eq!(cn(utf8("alice+OU=admins")), r"CN=alice\+OU=admins");
        assert_eq!(cn(utf8(r#"a"b;c<d>e\f=g"#)), r#"CN=a\"b\;c\<d\>e\\f=g"#);
        // `#` and space are escaped where they would mean something: leading, and trailing.
        assert_eq!(cn(utf8("#x# y ")), r"CN=\#x# y\ ");
        assert_eq!(cn(utf8(" y")), r"CN=\ y");
        assert_eq!(cn(utf8(" ")), r"CN=\ ");
        assert_eq!(cn(utf8("a\nb\x7f\0")), r"CN=a\0Ab\7F\00");
        assert_eq!(cn(utf8("")), "CN=");
    }

    #[test]
    fn non_ascii_is_escaped_byte_by_byte_so_the_subject_is_ascii() {
        assert_eq!(cn(utf8("Zoë 日")), r"CN=Zo\C3\AB \E6\97\A5");
        // BMPString is UTF-16BE, a surrogate pair included.
        let bmp: Vec<u8> = "Zoë😀".encode_utf16().flat_map(u16::to_be_bytes).collect();
        assert_eq!(cn(tlv(0x1e, &bmp)), r"CN=Zo\C3\AB\F0\9F\98\80");
        // UniversalString is UTF-32BE; TeletexString is read as Latin-1, as OpenSSL does.
        let universal: Vec<u8> = "é!"
            .chars()
            .flat_map(|c| u32::from(c).to_be_bytes())
            .collect();
        assert_eq!(cn(tlv(0x1c, &universal)), r"CN=\C3\A9!");
        assert_eq!(cn(tlv(0x14, b"caf\xe9")), r"CN=caf\C3\A9");
        assert_eq!(cn(tlv(0x1a, b"visible")), "CN=visible");
        assert_eq!(cn(tlv(0x12, b"42")), "CN=42");
        assert_eq!(cn(tlv(0x16, b"ia5,")), r"CN=ia5\,");
    }

    #[test]
    fn other_values_are_the_hex_of_their_der() {
        // An INTEGER is not text.
        assert_eq!(cn(tlv(0x02, &[0x05])), "CN=#020105");
        // A BMPString of an odd length, and one with an unpaired surrogate, do not decode.
        assert_eq!(cn(tlv(0x1e, &[0x00, 0x41, 0x00])), "CN=#1E03004100");
        assert_eq!(cn(tlv(0x1e, &[0xd8, 0x00])), "CN=#1E02D800");
        // A type without a name is dotted, and its value given as its encoding (RFC 4514 2.4).
        assert_eq!(
            subject(&[rdn(&[(UNNAMED, utf8("x,y"))])]),
            "1.2.3.4=#0C03782C79"
        );
        // Long values keep their long-form length.
        let long = "a".repeat(200);
        assert_eq!(
            cn(tlv(0x04, long.as_bytes())),
            format!("CN=#0481C8{}", "61".repeat(200))
        );
    }

    #[test]
    fn xfcc_quotes_the_escaped_subject() {
        let xfcc = envoy_xfcc(&[0; 32], &cn(utf8(r#"alice,OU=admins"x"#)), &[], &[]);
        assert_eq!(
            xfcc,
            format!(
                r#"Hash={};Subject="CN=alice\\,OU=admins\\\"x""#,
                "00".repeat(32)
            )
        );
    }
}
