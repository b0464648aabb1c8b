//! TLS termination with rustls: the serving certificate, client-certificate verification
//! (`client_ca`, optional or required), the minimum version and ALPN; and hot reload. The
//! folders of `cert`, `key` and `client_ca` are watched (Kubernetes swaps a `..data` symlink,
//! so the folder is watched, not the file), with a poll as the fallback. A new set is loaded and
//! checked (key matches certificate, chain parses, CA parses) before it replaces the old one for
//! new handshakes; a broken set is refused, logged and counted, and the old one keeps serving.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use arc_swap::ArcSwap;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;
use rustls::{RootCertStore, ServerConfig};
use sha2::{Digest, Sha256};
use x509_parser::prelude::{FromDer, X509Certificate};

use crate::config::{ClientCertMode, TlsConfig, TlsVersion};
use crate::metrics::Metrics;

/// How often the files are read again when no change event arrives.
const POLL_INTERVAL: Duration = Duration::from_secs(2);

/// Why a certificate set could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A file could not be read.
    #[error("cannot read {path}: {source}")]
    Read {
        /// The configuration key that names the file (`server.tls.cert`, `upstream.ca`...).
        setting: &'static str,
        /// The file.
        path: PathBuf,
        /// The operating system's reason.
        source: std::io::Error,
    },
    /// A PEM file holds nothing usable.
    #[error("{path}: {reason}")]
    Pem {
        /// The configuration key that names the file.
        setting: &'static str,
        /// The file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// rustls refused the set (key does not match the certificate, unsupported key, bad CA).
    #[error("{reason}")]
    Rustls {
        /// The configuration key (or table, for a key that does not match its certificate)
        /// the problem is about.
        setting: &'static str,
        /// What rustls said.
        reason: String,
    },
}

impl TlsError {
    /// The configuration key the problem is about, for a configuration error.
    pub fn setting(&self) -> &'static str {
        match self {
            TlsError::Read { setting, .. }
            | TlsError::Pem { setting, .. }
            | TlsError::Rustls { setting, .. } => setting,
        }
    }
}

/// Makes aws-lc-rs the process-wide rustls provider, so that no TLS context built by a
/// dependency (fred's `rediss://`) finds two providers in the tree (aws-lc-rs and ring) and
/// refuses to choose. Calling it again, or after another provider was installed, changes nothing.
pub fn install_default_provider() {
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
}

/// The crypto provider of every TLS context portcullis makes (aws-lc-rs).
pub(crate) fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::aws_lc_rs::default_provider())
}

/// A loaded, checked certificate set.
struct Material {
    config: Arc<ServerConfig>,
    /// notAfter of the serving certificate, Unix seconds.
    not_after: i64,
}

/// Reads the file that `setting` names.
fn read(setting: &'static str, path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|source| TlsError::Read {
        setting,
        path: path.to_owned(),
        source,
    })
}

/// The CA certificates of a PEM bundle, as roots to verify peers against; `setting` names the
/// file (`server.tls.client_ca` or `upstream.ca`).
pub(crate) fn load_roots(setting: &'static str, path: &Path) -> Result<RootCertStore, TlsError> {
    let pem_error = |reason: String| TlsError::Pem {
        setting,
        path: path.to_owned(),
        reason,
    };
    let mut roots = RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(&read(setting, path)?) {
        let cert = cert.map_err(|e| pem_error(format!("not a PEM CA bundle ({e})")))?;
        roots
            .add(cert)
            .map_err(|e| pem_error(format!("a CA certificate is unusable ({e})")))?;
    }
    if roots.is_empty() {
        return Err(pem_error("holds no CA certificate".into()));
    }
    Ok(roots)
}

const CERT: &str = "server.tls.cert";
const KEY: &str = "server.tls.key";
const CLIENT_CA: &str = "server.tls.client_ca";

fn load(tls: &TlsConfig) -> Result<Material, TlsError> {
    let pem_error = |setting: &'static str, path: &Path, reason: String| TlsError::Pem {
        setting,
        path: path.to_owned(),
        reason,
    };
    let chain: Vec<CertificateDer<'static>> =
        CertificateDer::pem_slice_iter(&read(CERT, &tls.cert)?)
            .collect::<Result<_, _>>()
            .map_err(|e| {
                pem_error(
                    CERT,
                    &tls.cert,
                    format!("not a PEM certificate chain ({e})"),
                )
            })?;
    let Some(leaf) = chain.first() else {
        return Err(pem_error(CERT, &tls.cert, "holds no certificate".into()));
    };
    let (_, parsed) = X509Certificate::from_der(leaf).map_err(|e| {
        pem_error(
            CERT,
            &tls.cert,
            format!("the certificate does not parse ({e})"),
        )
    })?;
    let not_after = parsed.validity().not_after.timestamp();
    let key = PrivateKeyDer::from_pem_slice(&read(KEY, &tls.key)?)
        .map_err(|e| pem_error(KEY, &tls.key, format!("not a PEM private key ({e})")))?;

    let versions: &[&'static rustls::SupportedProtocolVersion] = match tls.min_version {
        TlsVersion::Tls13 => &[&rustls::version::TLS13],
        TlsVersion::Tls12 => &[&rustls::version::TLS13, &rustls::version::TLS12],
    };
    let builder = ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(versions)
        .map_err(|e| TlsError::Rustls {
            setting: "server.tls.min_version",
            reason: e.to_string(),
        })?;
    let builder = match &tls.client_ca {
        None => builder.with_no_client_auth(),
        Some(ca) => {
            let roots = load_roots(CLIENT_CA, ca)?;
            let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider());
            let verifier = match tls.client_cert {
                ClientCertMode::Optional => verifier.allow_unauthenticated(),
                ClientCertMode::Required => verifier,
            }
            .build()
            .map_err(|e| TlsError::Rustls {
                setting: CLIENT_CA,
                reason: format!("{}: client verifier: {e}", ca.display()),
            })?;
            builder.with_client_cert_verifier(verifier)
        }
    };
    let mut config = builder.with_single_cert(chain, key).map_err(|e| match e {
        rustls::Error::InconsistentKeys(_) => TlsError::Rustls {
            setting: "server.tls",
            reason: format!(
                "the private key in {} does not match the certificate in {}",
                tls.key.display(),
                tls.cert.display()
            ),
        },
        rustls::Error::InvalidCertificate(e) => TlsError::Rustls {
            setting: CERT,
            reason: format!("{}: the certificate is unusable ({e})", tls.cert.display()),
        },
        other => TlsError::Rustls {
            setting: KEY,
            reason: format!("{}: {other}", tls.key.display()),
        },
    })?;
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(Material {
        config: Arc::new(config),
        not_after,
    })
}

/// Loads the set exactly as [`TlsState::load`] does and throws it away: for the configuration
/// check, so that a set the proxy would refuse at start is a configuration error.
pub(crate) fn check(tls: &TlsConfig) -> Result<(), TlsError> {
    load(tls).map(drop)
}

/// A fingerprint of the files' contents: a change of any of them is a new set.
fn fingerprint(tls: &TlsConfig) -> [u8; 32] {
    let mut h = Sha256::new();
    for path in [Some(&tls.cert), Some(&tls.key), tls.client_ca.as_ref()]
        .into_iter()
        .flatten()
    {
        match std::fs::read(path) {
            Ok(bytes) => {
                h.update((bytes.len() as u64).to_be_bytes());
                h.update(&bytes);
            }
            Err(_) => h.update(b"\xffunreadable"),
        }
    }
    h.finalize().into()
}

/// The TLS context new handshakes use, swapped whole on reload.
#[derive(Debug)]
pub struct TlsState {
    settings: TlsConfig,
    current: ArcSwap<ServerConfig>,
    not_after: AtomicI64,
    metrics: Arc<Metrics>,
}

impl TlsState {
    /// Loads the configured set; an error here stops the start (there is nothing to serve).
    pub fn load(settings: &TlsConfig, metrics: Arc<Metrics>) -> Result<Arc<TlsState>, TlsError> {
        let material = load(settings)?;
        metrics.register_certificate_metrics();
        metrics.set_certificate_expiry(material.not_after);
        Ok(Arc::new(TlsState {
            settings: settings.clone(),
            current: ArcSwap::new(material.config),
            not_after: AtomicI64::new(material.not_after),
            metrics,
        }))
    }

    /// The context for the next handshake.
    pub fn acceptor(&self) -> tokio_rustls::TlsAcceptor {
        tokio_rustls::TlsAcceptor::from(self.current.load_full())
    }

    /// Seconds until the serving certificate expires (negative once it has).
    pub fn expires_in(&self) -> i64 {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs() as i64);
        self.not_after.load(Ordering::Relaxed) - now
    }

    fn reload(&self) -> Result<(), TlsError> {
        let material = load(&self.settings)?;
        self.current.store(material.config);
        self.not_after.store(material.not_after, Ordering::Relaxed);
        self.metrics.set_certificate_expiry(material.not_after);
        Ok(())
    }

    /// Watches the files and reloads on change until the returned task is aborted.
    pub fn spawn_reloader(self: &Arc<Self>) -> tokio::task::JoinHandle<()> {
        let state = self.clone();
        let (tx, mut rx) = tokio::sync::mpsc::channel::<()>(1);
        let watcher = watch_folders(&state.settings, tx);
        tokio::spawn(async move {
            // The watcher lives as long as this task.
            let _watcher = watcher;
            let mut last = fingerprint(&state.settings);
            loop {
                tokio::select! {
                    _ = rx.recv() => {
                        // Let a burst of events (a symlink swap is several) settle.
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        while rx.try_recv().is_ok() {}
                    }
                    () = tokio::time::sleep(POLL_INTERVAL) => {}
                }
                let now = fingerprint(&state.settings);
                if now == last {
                    continue;
                }
                last = now;
                match state.reload() {
                    Ok(()) => {
                        state.metrics.tls_reload("ok");
                        tracing::info!(cert = %state.settings.cert.display(), "TLS certificates reloaded");
                    }
                    Err(e) => {
                        state.metrics.tls_reload("error");
                        tracing::error!(error = %e, "new TLS certificates refused; the previous ones keep serving");
                    }
                }
            }
        })
    }
}

/// Watches the folders holding the files; each event nudges the reloader. `None` when the
/// platform watcher cannot start (the poll still runs).
fn watch_folders(
    settings: &TlsConfig,
    tx: tokio::sync::mpsc::Sender<()>,
) -> Option<notify::RecommendedWatcher> {
    use notify::Watcher;
    let mut watcher = notify::recommended_watcher(move |_event: notify::Result<notify::Event>| {
        let _ = tx.try_send(());
    })
    .map_err(|e| tracing::warn!(error = %e, "cannot watch certificate folders; polling only"))
    .ok()?;
    let mut folders: Vec<PathBuf> = [
        Some(&settings.cert),
        Some(&settings.key),
        settings.client_ca.as_ref(),
    ]
    .into_iter()
    .flatten()
    .map(|p| {
        p.parent()
            .map_or_else(|| PathBuf::from("."), Path::to_path_buf)
    })
    .collect();
    folders.sort();
    folders.dedup();
    for folder in folders {
        if let Err(e) = watcher.watch(&folder, notify::RecursiveMode::NonRecursive) {
            tracing::warn!(folder = %folder.display(), error = %e, "cannot watch; polling only");
        }
    }
    Some(watcher)
}
