//! A certificate authority made with rcgen for tests that need real X.509: a root, an
//! intermediate under it, and leaves signed by either, with any names, validity or key type.

use rcgen::{
    BasicConstraints, Certificate, CertificateParams, DistinguishedName, DnType,
    ExtendedKeyUsagePurpose, IsCa, KeyPair, KeyUsagePurpose,
};
use time::OffsetDateTime;

/// A certificate together with its private key.
pub struct Issued {
    pub cert: Certificate,
    pub key: KeyPair,
}

impl Issued {
    pub fn pem(&self) -> String {
        self.cert.pem()
    }

    pub fn key_pem(&self) -> String {
        self.key.serialize_pem()
    }
}

fn named(cn: &str) -> DistinguishedName {
    let mut dn = DistinguishedName::new();
    dn.push(DnType::OrganizationName, "Portcullis Tests");
    dn.push(DnType::CommonName, cn);
    dn
}

fn ca_params(cn: &str) -> CertificateParams {
    let mut params = CertificateParams::default();
    params.distinguished_name = named(cn);
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    params.not_before = OffsetDateTime::now_utc() - time::Duration::days(1);
    params.not_after = OffsetDateTime::now_utc() + time::Duration::days(3650);
    params
}

/// A self-signed root CA (P-256).
pub fn root(cn: &str) -> Issued {
    let key = KeyPair::generate().unwrap();
    let cert = ca_params(cn).self_signed(&key).unwrap();
    Issued { cert, key }
}

/// An intermediate CA (P-256) signed by `issuer`.
pub fn intermediate(cn: &str, issuer: &Issued) -> Issued {
    let key = KeyPair::generate().unwrap();
    let cert = ca_params(cn)
        .signed_by(&key, &issuer.cert, &issuer.key)
        .unwrap();
    Issued { cert, key }
}

/// What a leaf should look like.
pub struct LeafSpec<'a> {
    pub cn: &'a str,
    /// DNS names or IP addresses (rcgen picks the SAN kind from the spelling).
    pub names: &'a [&'a str],
    pub not_before: OffsetDateTime,
    pub not_after: OffsetDateTime,
    pub eku: Vec<ExtendedKeyUsagePurpose>,
    pub rsa: bool,
}

impl<'a> LeafSpec<'a> {
    /// A server leaf valid from yesterday for 90 days, P-256, EKU serverAuth.
    pub fn server(cn: &'a str, names: &'a [&'a str]) -> Self {
        Self {
            cn,
            names,
            not_before: OffsetDateTime::now_utc() - time::Duration::days(1),
            not_after: OffsetDateTime::now_utc() + time::Duration::days(90),
            eku: vec![ExtendedKeyUsagePurpose::ServerAuth],
            rsa: false,
        }
    }
}

/// A leaf signed by `issuer`.
pub fn leaf(spec: &LeafSpec<'_>, issuer: &Issued) -> Issued {
    let key = if spec.rsa {
        KeyPair::generate_rsa_for(&rcgen::PKCS_RSA_SHA256, rcgen::RsaKeySize::_2048).unwrap()
    } else {
        KeyPair::generate().unwrap()
    };
    let names: Vec<String> = spec.names.iter().map(|n| n.to_string()).collect();
    let mut params = CertificateParams::new(names).unwrap();
    params.distinguished_name = named(spec.cn);
    params.not_before = spec.not_before;
    params.not_after = spec.not_after;
    params.extended_key_usages = spec.eku.clone();
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    let cert = params.signed_by(&key, &issuer.cert, &issuer.key).unwrap();
    Issued { cert, key }
}
