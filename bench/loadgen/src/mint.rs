//! `--mint-tokens N`: writes N unique JWTs, one a line, signed HS256 (a secret from an
//! environment variable) or RS256 (a PKCS#8 RSA key in PEM, signed with aws-lc-rs).

use std::io::Write;
use std::path::PathBuf;
use std::time::{SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context};
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use hmac::{Hmac, Mac};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::PrivatePkcs8KeyDer;
use sha2::Sha256;

/// What the tokens carry.
#[derive(Debug, Clone)]
pub struct MintOptions {
    pub count: usize,
    pub iss: String,
    pub aud: Option<String>,
    pub sub_prefix: String,
    pub kid: Option<String>,
    pub ttl_secs: u64,
    pub permissions: Vec<String>,
    pub permissions_claim: String,
    pub out: PathBuf,
}

/// How the tokens are signed.
pub enum Key {
    Hs256(Vec<u8>),
    Rs256(aws_lc_rs::signature::RsaKeyPair),
}

impl Key {
    pub fn rs256_from_pem(path: &std::path::Path) -> anyhow::Result<Self> {
        let der = PrivatePkcs8KeyDer::from_pem_file(path)
            .with_context(|| format!("{}: no PKCS#8 private key", path.display()))?;
        let pair = aws_lc_rs::signature::RsaKeyPair::from_pkcs8(der.secret_pkcs8_der())
            .map_err(|e| anyhow::anyhow!("{}: not an RSA PKCS#8 key: {e}", path.display()))?;
        Ok(Key::Rs256(pair))
    }

    fn alg(&self) -> &'static str {
        match self {
            Key::Hs256(_) => "HS256",
            Key::Rs256(_) => "RS256",
        }
    }

    fn sign(&self, signing_input: &[u8]) -> anyhow::Result<Vec<u8>> {
        match self {
            Key::Hs256(secret) => Ok(hs256(secret, signing_input)),
            Key::Rs256(pair) => {
                let rng = aws_lc_rs::rand::SystemRandom::new();
                let mut sig = vec![0u8; pair.public_modulus_len()];
                pair.sign(
                    &aws_lc_rs::signature::RSA_PKCS1_SHA256,
                    &rng,
                    signing_input,
                    &mut sig,
                )
                .map_err(|e| anyhow::anyhow!("RSA signing failed: {e}"))?;
                Ok(sig)
            }
        }
    }
}

fn hs256(secret: &[u8], message: &[u8]) -> Vec<u8> {
    let mut m = <Hmac<Sha256> as hmac::digest::KeyInit>::new_from_slice(secret)
        .expect("HMAC takes keys of any length");
    m.update(message);
    m.finalize().into_bytes().to_vec()
}

/// `base64url(header).base64url(payload).base64url(signature)`.
pub fn encode(key: &Key, header_json: &str, payload_json: &str) -> anyhow::Result<String> {
    let mut input = URL_SAFE_NO_PAD.encode(header_json);
    input.push('.');
    input.push_str(&URL_SAFE_NO_PAD.encode(payload_json));
    let sig = key.sign(input.as_bytes())?;
    input.push('.');
    input.push_str(&URL_SAFE_NO_PAD.encode(sig));
    Ok(input)
}

/// Writes the tokens; returns how many were written.
pub fn mint(key: &Key, opts: &MintOptions) -> anyhow::Result<usize> {
    if opts.count == 0 {
        bail!("--mint-tokens must be at least 1");
    }
    let now = SystemTime::now().duration_since(UNIX_EPOCH)?.as_secs();
    let mut header = serde_json::json!({ "alg": key.alg(), "typ": "JWT" });
    if let Some(kid) = &opts.kid {
        header["kid"] = kid.clone().into();
    }
    let header = header.to_string();
    let file = std::fs::File::create(&opts.out)
        .with_context(|| format!("cannot create {}", opts.out.display()))?;
    let mut out = std::io::BufWriter::new(file);
    // A random run id keeps jti unique across several mint runs.
    let run: u64 = rand::random();
    for i in 0..opts.count {
        let mut claims = serde_json::json!({
            "iss": opts.iss,
            "sub": format!("{}{i}", opts.sub_prefix),
            "iat": now,
            "exp": now + opts.ttl_secs,
            "jti": format!("{run:016x}-{i}"),
        });
        if let Some(aud) = &opts.aud {
            claims["aud"] = aud.clone().into();
        }
        if !opts.permissions.is_empty() {
            claims[&opts.permissions_claim] = if opts.permissions_claim == "scope" {
                opts.permissions.join(" ").into()
            } else {
                opts.permissions.clone().into()
            };
        }
        let token = encode(key, &header, &claims.to_string())?;
        writeln!(out, "{token}")?;
    }
    out.flush()?;
    Ok(opts.count)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hs256_matches_the_rfc7515_style_example() {
        // The well-known example token of jwt.io (HS256, secret "your-256-bit-secret").
        let token = encode(
            &Key::Hs256(b"your-256-bit-secret".to_vec()),
            r#"{"alg":"HS256","typ":"JWT"}"#,
            r#"{"sub":"1234567890","name":"John Doe","iat":1516239022}"#,
        )
        .expect("encode");
        assert_eq!(
            token,
            "eyJhbGciOiJIUzI1NiIsInR5cCI6IkpXVCJ9.\
             eyJzdWIiOiIxMjM0NTY3ODkwIiwibmFtZSI6IkpvaG4gRG9lIiwiaWF0IjoxNTE2MjM5MDIyfQ.\
             SflKxwRJSMeKKF2QT4fwpMeJf36POk6yJV_adQssw5c"
        );
    }
}
