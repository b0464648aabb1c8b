//! `cert pin`: the SPKI pin (`sha256/BASE64`) that `upstream.pins` and
//! `client_certs.spki_sha256` hold, from whatever the operator has at hand — the certificate,
//! its public key, or its private key. Pinning the key rather than the certificate means a
//! renewal with the same key keeps the pin valid.

use std::path::Path;

use x509_parser::prelude::{FromDer as _, X509Certificate};

use super::CertError;

/// The SPKI pin of the first certificate, public key or private key in the PEM `bytes`
/// (read from `path`, named in errors).
pub fn spki_pin_of_pem(bytes: &[u8], path: &Path) -> Result<String, CertError> {
    for block in super::pem_blocks(bytes, path)? {
        match block.label.as_str() {
            "CERTIFICATE" => {
                let (_, cert) = X509Certificate::from_der(&block.contents).map_err(|e| {
                    CertError::MalformedCertificate {
                        path: path.to_owned(),
                        reason: e.to_string(),
                    }
                })?;
                return Ok(super::spki_pin(cert.public_key().raw));
            }
            // A PUBLIC KEY block is the SubjectPublicKeyInfo DER itself.
            "PUBLIC KEY" => return Ok(super::spki_pin(&block.contents)),
            "PRIVATE KEY" | "EC PRIVATE KEY" | "RSA PRIVATE KEY" => {
                let key = rcgen::KeyPair::try_from(block.contents.as_slice()).map_err(|e| {
                    CertError::MalformedKey {
                        path: path.to_owned(),
                        reason: e.to_string(),
                    }
                })?;
                return Ok(super::spki_pin(&key.public_key_der()));
            }
            _ => {}
        }
    }
    Err(CertError::MissingPem {
        path: path.to_owned(),
        wanted: "PEM certificate, public key or private key",
    })
}
