//! `portcullis cert`: the certificate tooling that a team running the proxy needs next to it —
//! generate a key, ask for a certificate (CSR), look inside a certificate, check that a chain
//! verifies the way the proxy's TLS stack will verify it, and compute the SPKI pins that
//! `upstream.pins` and `client_certs.spki_sha256` expect. None of this runs on the request path;
//! it shares the crypto provider (aws-lc-rs) and the verifier (rustls-webpki) with it, so that
//! what `cert verify` accepts is what the proxy accepts.
//!
//! Each subcommand is a pure function over bytes (`keygen::generate`, `csr::build`,
//! `inspect::inspect_der`, `verify::verify_chain`, `pin::spki_pin_of_pem`) plus a thin layer here
//! that reads and writes files and renders the text to print.

pub mod csr;
pub mod inspect;
pub mod keygen;
pub mod pin;
pub mod verify;

use std::path::{Path, PathBuf};

use base64::Engine as _;
use sha2::Digest as _;

pub use keygen::KeyType;

/// The `portcullis cert` subcommands.
#[derive(clap::Subcommand, Debug, Clone)]
pub enum CertCommand {
    /// Generate a private key (PKCS#8 PEM, written with mode 0600).
    Keygen {
        /// The key type.
        #[arg(long = "type", value_enum)]
        key_type: KeyType,
        /// Where to write the key.
        #[arg(long)]
        out: PathBuf,
        /// Overwrite the file if it exists.
        #[arg(long)]
        force: bool,
    },
    /// Write a certificate signing request (PKCS#10 PEM) signed by a private key.
    Csr {
        /// The private key (PEM: PKCS#8, SEC1 or PKCS#1).
        #[arg(long)]
        key: PathBuf,
        /// The subject common name.
        #[arg(long)]
        cn: String,
        /// A subject alternative name: DNS:name, IP:address, URI:uri or EMAIL:address; repeatable.
        #[arg(long = "san")]
        sans: Vec<String>,
        /// Where to write the CSR; standard output when absent.
        #[arg(long)]
        out: Option<PathBuf>,
    },
    /// Show a certificate: names, validity, key, SHA-256 fingerprint, SPKI pin.
    Inspect {
        /// A PEM file (the first certificate in it is shown) or a DER certificate.
        file: PathBuf,
        /// Print one JSON object instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Verify a certificate to a trusted root as the proxy would (exit 1 with the reason if not).
    Verify {
        /// The leaf certificate (the first certificate in the file).
        cert: PathBuf,
        /// Intermediate certificates (PEM, any order; a leaf in it is ignored).
        #[arg(long)]
        chain: Option<PathBuf>,
        /// The trusted root certificates (PEM).
        #[arg(long)]
        roots: PathBuf,
        /// Also check that the certificate is valid for this DNS name or IP address.
        #[arg(long)]
        host: Option<String>,
        /// Check for client authentication (EKU clientAuth) instead of serverAuth.
        #[arg(long)]
        client: bool,
        /// Print one JSON object instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Print the SPKI pin (`sha256/BASE64`) of a certificate, public key or private key.
    Pin {
        /// A PEM file: CERTIFICATE, PUBLIC KEY, or a private key.
        file: PathBuf,
    },
}

/// Why a `portcullis cert` command failed. The message is what the user sees.
#[derive(Debug, thiserror::Error)]
pub enum CertError {
    /// A file could not be read.
    #[error("cannot read {}: {source}", path.display())]
    Read {
        /// The file.
        path: PathBuf,
        /// What the OS said.
        source: std::io::Error,
    },
    /// A file could not be written.
    #[error("cannot write {}: {source}", path.display())]
    Write {
        /// The file.
        path: PathBuf,
        /// What the OS said.
        source: std::io::Error,
    },
    /// The output file exists and `--force` was not given; a key is never silently replaced.
    #[error("{} exists; pass --force to overwrite it", path.display())]
    OutputExists {
        /// The file.
        path: PathBuf,
    },
    /// A file holds no PEM block of the kind needed.
    #[error("no {wanted} found in {}", path.display())]
    MissingPem {
        /// The file.
        path: PathBuf,
        /// What was looked for, e.g. "PEM certificate".
        wanted: &'static str,
    },
    /// A PEM block is malformed (bad base64, no END line).
    #[error("malformed PEM in {}: {reason}", path.display())]
    MalformedPem {
        /// The file.
        path: PathBuf,
        /// The parser's reason.
        reason: String,
    },
    /// A certificate's DER could not be parsed.
    #[error("cannot parse the certificate in {}: {reason}", path.display())]
    MalformedCertificate {
        /// The file.
        path: PathBuf,
        /// The parser's reason.
        reason: String,
    },
    /// A private key could not be loaded (wrong format, unsupported algorithm).
    #[error("cannot load the private key in {}: {reason}", path.display())]
    MalformedKey {
        /// The file.
        path: PathBuf,
        /// The reason.
        reason: String,
    },
    /// The crypto library failed to generate a key.
    #[error("key generation failed: {0}")]
    KeyGeneration(String),
    /// A `--san` value is not `DNS:`, `IP:`, `URI:` or `EMAIL:` followed by a valid value.
    #[error("invalid --san {value:?}: {reason}")]
    InvalidSan {
        /// The value as given.
        value: String,
        /// What is wrong with it.
        reason: String,
    },
    /// rcgen failed to build or sign the CSR.
    #[error("cannot build the CSR: {0}")]
    Csr(#[source] rcgen::Error),
    /// `--host` is neither a DNS name nor an IP address.
    #[error("--host {0:?} is not a valid DNS name or IP address")]
    InvalidHost(String),
    /// The roots file holds no certificate usable as a trust anchor.
    #[error("no usable trust anchor in {}", path.display())]
    NoTrustAnchors {
        /// The roots file.
        path: PathBuf,
    },
    /// No chain leads from the certificate to a trusted root.
    #[error("unknown issuer (no path to a trusted root)")]
    UnknownIssuer,
    /// The certificate (or one on its path) is past its notAfter.
    #[error("certificate expired at {not_after} (now {now})")]
    Expired {
        /// notAfter, RFC 3339.
        not_after: String,
        /// The verification time, RFC 3339.
        now: String,
    },
    /// The certificate (or one on its path) is before its notBefore.
    #[error("certificate not valid before {not_before} (now {now})")]
    NotYetValid {
        /// notBefore, RFC 3339.
        not_before: String,
        /// The verification time, RFC 3339.
        now: String,
    },
    /// The certificate's SANs do not cover the host asked for.
    #[error("not valid for host {host} (certificate names: {names})")]
    HostMismatch {
        /// The `--host` value.
        host: String,
        /// The names the certificate does hold, comma-separated.
        names: String,
    },
    /// The certificate's extended key usage does not allow the purpose asked for.
    #[error("certificate not allowed for {purpose} (extended key usage)")]
    WrongUsage {
        /// "server authentication" or "client authentication".
        purpose: &'static str,
    },
    /// Any other verification failure, with webpki's reason.
    #[error("verification failed: {0}")]
    Rejected(String),
    /// The JSON output could not be rendered.
    #[error("cannot render JSON: {0}")]
    Json(#[from] serde_json::Error),
}

/// Runs one `portcullis cert` subcommand and returns what to print on standard output.
pub fn run(cmd: &CertCommand) -> Result<String, CertError> {
    match cmd {
        CertCommand::Keygen {
            key_type,
            out,
            force,
        } => {
            let pem = keygen::generate(*key_type)?;
            keygen::write_private(out, pem.as_bytes(), *force)?;
            let pin = pin::spki_pin_of_pem(pem.as_bytes(), out)?;
            Ok(format!(
                "wrote a {key_type} private key to {} (mode 0600)\nspki pin: {pin}",
                out.display()
            ))
        }
        CertCommand::Csr { key, cn, sans, out } => {
            let key_pem = read_text(key)?;
            let csr = csr::build(&key_pem, key, cn, sans)?;
            match out {
                Some(out) => {
                    std::fs::write(out, &csr).map_err(|source| CertError::Write {
                        path: out.clone(),
                        source,
                    })?;
                    Ok(format!("wrote a CSR for CN={cn} to {}", out.display()))
                }
                None => Ok(csr.trim_end().to_owned()),
            }
        }
        CertCommand::Inspect { file, json } => {
            let der = first_certificate(&read(file)?, file)?;
            let info = inspect::inspect_der(&der, file, time::OffsetDateTime::now_utc())?;
            if *json {
                Ok(serde_json::to_string_pretty(&info)?)
            } else {
                Ok(info.to_text())
            }
        }
        CertCommand::Verify {
            cert,
            chain,
            roots,
            host,
            client,
            json,
        } => {
            let leaf = first_certificate(&read(cert)?, cert)?;
            let intermediates = match chain {
                Some(chain) => all_certificates(&read(chain)?, chain)?,
                None => Vec::new(),
            };
            let root_ders = all_certificates(&read(roots)?, roots)?;
            let usage = if *client {
                verify::Usage::ClientAuth
            } else {
                verify::Usage::ServerAuth
            };
            let request = verify::Request {
                leaf: &leaf,
                intermediates: &intermediates,
                roots: &root_ders,
                roots_path: roots,
                host: host.as_deref(),
                usage,
            };
            let verified = verify::verify_chain(&request, time::OffsetDateTime::now_utc())?;
            if *json {
                Ok(serde_json::to_string_pretty(&verified)?)
            } else {
                Ok(verified.to_text())
            }
        }
        CertCommand::Pin { file } => pin::spki_pin_of_pem(&read(file)?, file),
    }
}

/// `sha256/` followed by the standard base64 of the SHA-256 of a SubjectPublicKeyInfo DER:
/// the pin format of `upstream.pins` (and of HPKP before it).
pub fn spki_pin(spki_der: &[u8]) -> String {
    format!(
        "sha256/{}",
        base64::engine::general_purpose::STANDARD.encode(sha2::Sha256::digest(spki_der))
    )
}

/// The SHA-256 of `der` as colon-separated upper-case hex, the way `openssl x509 -fingerprint`
/// prints it.
pub fn sha256_fingerprint(der: &[u8]) -> String {
    let hex = hex::encode_upper(sha2::Sha256::digest(der));
    let pairs: Vec<&str> = hex
        .as_bytes()
        .chunks(2)
        // hex::encode_upper only emits ASCII, so every 2-byte chunk is valid UTF-8.
        .map(|pair| std::str::from_utf8(pair).unwrap_or_default())
        .collect();
    pairs.join(":")
}

fn read(path: &Path) -> Result<Vec<u8>, CertError> {
    std::fs::read(path).map_err(|source| CertError::Read {
        path: path.to_owned(),
        source,
    })
}

fn read_text(path: &Path) -> Result<String, CertError> {
    std::fs::read_to_string(path).map_err(|source| CertError::Read {
        path: path.to_owned(),
        source,
    })
}

/// Every PEM block in `bytes`, in order.
pub(crate) fn pem_blocks(
    bytes: &[u8],
    path: &Path,
) -> Result<Vec<x509_parser::pem::Pem>, CertError> {
    x509_parser::pem::Pem::iter_from_buffer(bytes)
        .map(|block| {
            block.map_err(|e| CertError::MalformedPem {
                path: path.to_owned(),
                reason: e.to_string(),
            })
        })
        .collect()
}

/// Every certificate in a PEM file, as DER; a file that is not PEM is taken as one DER certificate.
fn all_certificates(bytes: &[u8], path: &Path) -> Result<Vec<Vec<u8>>, CertError> {
    if !looks_like_pem(bytes) {
        return Ok(vec![bytes.to_vec()]);
    }
    let certs: Vec<Vec<u8>> = pem_blocks(bytes, path)?
        .into_iter()
        .filter(|block| block.label == "CERTIFICATE")
        .map(|block| block.contents)
        .collect();
    if certs.is_empty() {
        return Err(CertError::MissingPem {
            path: path.to_owned(),
            wanted: "PEM certificate",
        });
    }
    Ok(certs)
}

/// The first certificate of a PEM file (or the DER file itself).
fn first_certificate(bytes: &[u8], path: &Path) -> Result<Vec<u8>, CertError> {
    let mut certs = all_certificates(bytes, path)?;
    // all_certificates returns an error rather than an empty list.
    Ok(certs.swap_remove(0))
}

fn looks_like_pem(bytes: &[u8]) -> bool {
    bytes.windows(11).any(|w| w == b"-----BEGIN ")
}

/// RFC 3339 for an instant, or its Unix seconds if it cannot be formatted (years past 9999).
pub(crate) fn rfc3339(at: time::OffsetDateTime) -> String {
    at.format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_else(|_| at.unix_timestamp().to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fingerprint_is_colon_separated_upper_case_hex() {
        let fp = sha256_fingerprint(b"abc");
        assert_eq!(
            fp,
            "BA:78:16:BF:8F:01:CF:EA:41:41:40:DE:5D:AE:22:23:B0:03:61:A3:96:17:7A:9C:B4:10:FF:61:F2:00:15:AD"
        );
    }

    #[test]
    fn spki_pin_is_sha256_slash_standard_base64() {
        assert_eq!(
            spki_pin(b"abc"),
            "sha256/ungWv48Bz+pBQUDeXa4iI7ADYaOWF3qctBD/YfIAFa0="
        );
    }

    #[test]
    fn a_file_without_pem_markers_is_taken_as_one_der_certificate() {
        let certs = all_certificates(&[0x30, 0x03, 1, 2, 3], Path::new("x.der")).unwrap();
        assert_eq!(certs, vec![vec![0x30, 0x03, 1, 2, 3]]);
    }

    #[test]
    fn a_pem_file_without_certificates_is_an_error() {
        let pem = b"-----BEGIN PUBLIC KEY-----\nAAAA\n-----END PUBLIC KEY-----\n";
        let err = all_certificates(pem, Path::new("k.pem")).unwrap_err();
        assert!(matches!(err, CertError::MissingPem { .. }), "{err}");
    }
}
