//! `cert keygen`: a fresh private key as PKCS#8 PEM, written so that only its owner can read it.
//! Keys come from aws-lc-rs through rcgen, the same provider the proxy signs and verifies with.

use std::io::Write as _;
use std::path::Path;

use super::CertError;

/// The key types `cert keygen` makes: the two that every TLS peer accepts.
#[derive(clap::ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyType {
    /// RSA, 2048-bit modulus (signatures: PKCS#1 v1.5 with SHA-256).
    #[value(name = "rsa2048")]
    Rsa2048,
    /// ECDSA on NIST P-256 (signatures: ECDSA with SHA-256).
    #[value(name = "p256")]
    P256,
}

impl std::fmt::Display for KeyType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            KeyType::Rsa2048 => "rsa2048",
            KeyType::P256 => "p256",
        })
    }
}

/// Generates a key of `key_type` and returns it as PKCS#8 PEM (`BEGIN PRIVATE KEY`).
pub fn generate(key_type: KeyType) -> Result<String, CertError> {
    let key = match key_type {
        KeyType::Rsa2048 => {
            rcgen::KeyPair::generate_rsa_for(&rcgen::PKCS_RSA_SHA256, rcgen::RsaKeySize::_2048)
        }
        KeyType::P256 => rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256),
    }
    .map_err(|e| CertError::KeyGeneration(e.to_string()))?;
    Ok(key.serialize_pem())
}

/// Writes `contents` to `path` with mode 0600. Without `force` an existing file is an error and
/// is left as it was; with `force` it is narrowed to 0600 before the new key goes in, so that the
/// key is never readable by others, not even for a moment.
pub fn write_private(path: &Path, contents: &[u8], force: bool) -> Result<(), CertError> {
    let write_err = |source| CertError::Write {
        path: path.to_owned(),
        source,
    };
    let mut options = std::fs::OpenOptions::new();
    options.write(true);
    if force {
        options.create(true).truncate(true);
    } else {
        options.create_new(true);
    }
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt as _;
        options.mode(0o600);
    }
    let mut file = options.open(path).map_err(|source| {
        if source.kind() == std::io::ErrorKind::AlreadyExists {
            CertError::OutputExists {
                path: path.to_owned(),
            }
        } else {
            write_err(source)
        }
    })?;
    // `mode` applies only when the file is created; an overwritten file keeps its old mode.
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt as _;
        file.set_permissions(std::fs::Permissions::from_mode(0o600))
            .map_err(write_err)?;
    }
    file.write_all(contents).map_err(write_err)?;
    file.sync_all().map_err(write_err)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_p256_key_is_pkcs8_pem_that_rcgen_reads_back() {
        let pem = generate(KeyType::P256).unwrap();
        assert!(pem.starts_with("-----BEGIN PRIVATE KEY-----"), "{pem}");
        let key = rcgen::KeyPair::from_pem(&pem).unwrap();
        assert_eq!(key.algorithm(), &rcgen::PKCS_ECDSA_P256_SHA256);
    }

    #[test]
    fn existing_file_is_not_overwritten_without_force() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("key.pem");
        std::fs::write(&path, "keep me").unwrap();
        let err = write_private(&path, b"new", false).unwrap_err();
        assert!(matches!(err, CertError::OutputExists { .. }), "{err}");
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "keep me");
        write_private(&path, b"new", true).unwrap();
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "new");
    }

    #[cfg(unix)]
    #[test]
    fn forced_overwrite_narrows_the_mode_to_0600() {
        use std::os::unix::fs::PermissionsExt as _;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("key.pem");
        std::fs::write(&path, "old").unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        write_private(&path, b"new", true).unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
    }
}
