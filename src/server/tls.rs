//! TLS termination with rustls: the serving certificate, client-certificate verification
//! (`client_ca`, optional or required), the minimum version and ALPN; and hot reload. The
//! folders of `cert`, `key` and `client_ca` are watched (Kubernetes swaps a `..data` symlink,
//! so the folder is watched, not the file), with a poll as the fallback. A new set is loaded and
//! checked (key matches certificate, chain parses, CA parses) before it replaces the old one for
//! new handshakes; a broken set is refused, logged and counted, and the old one keeps serving.
//! Each file is read once per look and what is fingerprinted is what is loaded: a set refused
//! for its contents is not tried again until a file changes, while a look that could not read a
//! file (an I/O error, a file gone for a moment) records nothing, so the next poll reads again.

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

/// The CA certificates of a PEM bundle file, as roots to verify peers against; `setting` names
/// the file (`server.tls.client_ca` or `upstream.ca`).
pub(crate) fn load_roots(setting: &'static str, path: &Path) -> Result<RootCertStore, TlsError> {
    roots_from_pem(setting, path, &read(setting, path)?)
}

/// The CA certificates of the PEM bundle `pem`, read from `path`.
fn roots_from_pem(
    setting: &'static str,
    path: &Path,
    pem: &[u8],
) -> Result<RootCertStore, TlsError> {
    let pem_error = |reason: String| TlsError::Pem {
        setting,
        path: path.to_owned(),
        reason,
    };
    let mut roots = RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(pem) {
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

/// The bytes of a set's files, each read once: what is fingerprinted is exactly what is loaded,
/// so a set is never taken for seen when its load read other bytes, or failed to read them.
struct Files {
    cert: Vec<u8>,
    key: Vec<u8>,
    client_ca: Option<Vec<u8>>,
}

impl Files {
    fn read(tls: &TlsConfig) -> Result<Files, TlsError> {
        Ok(Files {
            cert: read(CERT, &tls.cert)?,
            key: read(KEY, &tls.key)?,
            client_ca: tls
                .client_ca
                .as_deref()
                .map(|ca| read(CLIENT_CA, ca))
                .transpose()?,
        })
    }

    /// A fingerprint of the contents: a change of any file is a new set.
    fn fingerprint(&self) -> [u8; 32] {
        let mut h = Sha256::new();
        for bytes in [Some(&self.cert), Some(&self.key), self.client_ca.as_ref()]
            .into_iter()
            .flatten()
        {
            h.update((bytes.len() as u64).to_be_bytes());
            h.update(bytes);
        }
        h.finalize().into()
    }
}

/// Parses and checks the set in `files` (read from the paths in `tls`, which errors name).
fn load(tls: &TlsConfig, files: &Files) -> Result<Material, TlsError> {
    let pem_error = |setting: &'static str, path: &Path, reason: String| TlsError::Pem {
        setting,
        path: path.to_owned(),
        reason,
    };
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(&files.cert)
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
    let key = PrivateKeyDer::from_pem_slice(&files.key)
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
            // `Files::read` reads the CA file whenever one is configured; were it missing, the
            // set is refused rather than served without client authentication.
            let Some(ca_pem) = &files.client_ca else {
                return Err(pem_error(CLIENT_CA, ca, "was not read".into()));
            };
            let roots = roots_from_pem(CLIENT_CA, ca, ca_pem)?;
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

/// Reads and loads the set exactly as [`TlsState::load`] does and throws it away: for the
/// configuration check, so that a set the proxy would refuse at start is a configuration error.
pub(crate) fn check(tls: &TlsConfig) -> Result<(), TlsError> {
    load(tls, &Files::read(tls)?).map(drop)
}

/// The TLS context new handshakes use, swapped whole on reload.
#[derive(Debug)]
pub struct TlsState {
    settings: TlsConfig,
    current: ArcSwap<ServerConfig>,
    not_after: AtomicI64,
    metrics: Arc<Metrics>,
    /// The fingerprint of the set loaded at start, where the reloader begins.
    loaded: [u8; 32],
}

/// What the reloader remembers from one look at the files to the next.
#[derive(Debug)]
struct Seen {
    /// The fingerprint of the last set read whole, loaded or refused: it is not tried again
    /// until a file changes, so a broken set is reported once, not at every poll.
    contents: [u8; 32],
    /// The read failure reported last, while reads go on failing the same way.
    unreadable: Option<String>,
}

/// What one look at the files found.
#[derive(Debug)]
enum Look {
    /// The files hold the set loaded or refused last.
    Unchanged,
    /// A new set was loaded; new handshakes use it.
    Loaded,
    /// A new set was read whole and refused; the previous one keeps serving.
    Refused(TlsError),
    /// A file could not be read (an I/O error such as EMFILE, a file gone for a moment).
    /// Nothing is recorded, so the next look reads the files again; `new` is false when the
    /// previous look failed the same way.
    Unreadable { error: TlsError, new: bool },
}

impl TlsState {
    /// Loads the configured set; an error here stops the start (there is nothing to serve).
    pub fn load(settings: &TlsConfig, metrics: Arc<Metrics>) -> Result<Arc<TlsState>, TlsError> {
        let files = Files::read(settings)?;
        let material = load(settings, &files)?;
        metrics.register_certificate_metrics();
        metrics.set_certificate_expiry(material.not_after);
        Ok(Arc::new(TlsState {
            settings: settings.clone(),
            current: ArcSwap::new(material.config),
            not_after: AtomicI64::new(material.not_after),
            metrics,
            loaded: files.fingerprint(),
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

    /// One look at the files, `files` being what reading them gave: a set whose contents
    /// differ from the last one read whole is loaded.
    fn look(&self, seen: &mut Seen, files: Result<Files, TlsError>) -> Look {
        let files = match files {
            Ok(files) => files,
            Err(error) => {
                let message = error.to_string();
                let new = seen.unreadable.as_deref() != Some(message.as_str());
                seen.unreadable = Some(message);
                return Look::Unreadable { error, new };
            }
        };
        seen.unreadable = None;
        let contents = files.fingerprint();
        if contents == seen.contents {
            return Look::Unchanged;
        }
        // These very bytes are parsed now: loaded or refused, this content has had its turn.
        seen.contents = contents;
        match load(&self.settings, &files) {
            Ok(material) => {
                self.current.store(material.config);
                self.not_after.store(material.not_after, Ordering::Relaxed);
                self.metrics.set_certificate_expiry(material.not_after);
                Look::Loaded
            }
            Err(error) => Look::Refused(error),
        }
    }

    /// Watches the files and reloads on change until the returned task is aborted.
    pub fn spawn_reloader(self: &Arc<Self>) -> tokio::task::JoinHandle<()> {
        let state = self.clone();
        let (tx, mut rx) = tokio::sync::mpsc::channel::<()>(1);
        let watcher = watch_folders(&state.settings, tx);
        tokio::spawn(async move {
            // The watcher lives as long as this task.
            let _watcher = watcher;
            let mut seen = Seen {
                contents: state.loaded,
                unreadable: None,
            };
            loop {
                tokio::select! {
                    _ = rx.recv() => {
                        // Let a burst of events (a symlink swap is several) settle.
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        while rx.try_recv().is_ok() {}
                    }
                    () = tokio::time::sleep(POLL_INTERVAL) => {}
                }
                match state.look(&mut seen, Files::read(&state.settings)) {
                    Look::Unchanged => {}
                    Look::Loaded => {
                        state.metrics.tls_reload("ok");
                        tracing::info!(cert = %state.settings.cert.display(), "TLS certificates reloaded");
                    }
                    Look::Refused(e) => {
                        state.metrics.tls_reload("error");
                        tracing::error!(error = %e, "new TLS certificates refused; the previous ones keep serving");
                    }
                    Look::Unreadable { error, new: true } => {
                        state.metrics.tls_reload("error");
                        tracing::error!(error = %error, "cannot read the TLS certificates; the previous ones keep serving, and the files are read again at every poll");
                    }
                    Look::Unreadable { error, new: false } => {
                        tracing::debug!(error = %error, "the TLS certificates are still unreadable");
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

#[cfg(test)]
mod tests {
    use super::*;
    use rcgen::{BasicConstraints, CertificateParams, IsCa, KeyPair};
    use rustls::ClientConfig;

    /// A CA made here, and the serving files it issues into a temporary folder.
    struct Pki {
        ca: rcgen::Certificate,
        ca_key: KeyPair,
        settings: TlsConfig,
        _dir: tempfile::TempDir,
    }

    impl Pki {
        fn new() -> Pki {
            let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
            params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
            let ca_key = KeyPair::generate().unwrap();
            let ca = params.self_signed(&ca_key).unwrap();
            let dir = tempfile::tempdir().unwrap();
            let settings = TlsConfig {
                cert: dir.path().join("tls.crt"),
                key: dir.path().join("tls.key"),
                client_ca: None,
                client_cert: ClientCertMode::Optional,
                min_version: TlsVersion::Tls12,
            };
            Pki {
                ca,
                ca_key,
                settings,
                _dir: dir,
            }
        }

        /// Writes a new serving certificate for localhost and its key; returns its DER.
        fn write_set(&self) -> Vec<u8> {
            let params = CertificateParams::new(vec!["localhost".to_owned()]).unwrap();
            let key = KeyPair::generate().unwrap();
            let cert = params.signed_by(&key, &self.ca, &self.ca_key).unwrap();
            std::fs::write(&self.settings.cert, cert.pem()).unwrap();
            std::fs::write(&self.settings.key, key.serialize_pem()).unwrap();
            cert.der().to_vec()
        }

        /// The certificate `state` presents in a real handshake on a local socket.
        async fn served(&self, state: &TlsState) -> Vec<u8> {
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            let addr = listener.local_addr().unwrap();
            let acceptor = state.acceptor();
            let server = tokio::spawn(async move {
                let (tcp, _) = listener.accept().await.unwrap();
                acceptor.accept(tcp).await.map(drop)
            });
            let mut roots = RootCertStore::empty();
            roots.add(self.ca.der().clone()).unwrap();
            let config = ClientConfig::builder_with_provider(provider())
                .with_safe_default_protocol_versions()
                .unwrap()
                .with_root_certificates(roots)
                .with_no_client_auth();
            let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
            let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
            let tls = tokio_rustls::TlsConnector::from(Arc::new(config))
                .connect(name, tcp)
                .await
                .unwrap();
            server.await.unwrap().unwrap();
            tls.get_ref().1.peer_certificates().unwrap()[0].to_vec()
        }

        fn read_failure(&self) -> Result<Files, TlsError> {
            Err(TlsError::Read {
                setting: KEY,
                path: self.settings.key.clone(),
                source: std::io::Error::from_raw_os_error(24), // EMFILE
            })
        }
    }

    fn start(pki: &Pki) -> (Arc<TlsState>, Seen) {
        let state = TlsState::load(&pki.settings, Arc::new(Metrics::new())).unwrap();
        let seen = Seen {
            contents: state.loaded,
            unreadable: None,
        };
        (state, seen)
    }

    #[tokio::test]
    async fn a_set_that_could_not_be_read_is_read_again_at_the_next_look() {
        let pki = Pki::new();
        let first = pki.write_set();
        let (state, mut seen) = start(&pki);
        assert_eq!(pki.served(&state).await, first);

        // New files are in place, but reading them fails for a while (EMFILE, say): reported
        // once, and the old set keeps serving.
        let renewed = pki.write_set();
        let look = state.look(&mut seen, pki.read_failure());
        assert!(
            matches!(look, Look::Unreadable { new: true, .. }),
            "{look:?}"
        );
        let look = state.look(&mut seen, pki.read_failure());
        assert!(
            matches!(look, Look::Unreadable { new: false, .. }),
            "{look:?}"
        );
        assert_eq!(pki.served(&state).await, first);

        // The next look that reads them loads them.
        let look = state.look(&mut seen, Files::read(&pki.settings));
        assert!(matches!(look, Look::Loaded), "{look:?}");
        assert_eq!(pki.served(&state).await, renewed);
        let look = state.look(&mut seen, Files::read(&pki.settings));
        assert!(matches!(look, Look::Unchanged), "{look:?}");
    }

    #[tokio::test]
    async fn a_refused_set_is_not_tried_again_until_a_file_changes() {
        let pki = Pki::new();
        let first = pki.write_set();
        let (state, mut seen) = start(&pki);

        std::fs::write(&pki.settings.cert, "not a certificate").unwrap();
        let look = state.look(&mut seen, Files::read(&pki.settings));
        assert!(
            matches!(look, Look::Refused(TlsError::Pem { .. })),
            "{look:?}"
        );
        // The same broken contents: nothing to report again.
        let look = state.look(&mut seen, Files::read(&pki.settings));
        assert!(matches!(look, Look::Unchanged), "{look:?}");
        assert_eq!(pki.served(&state).await, first);

        let renewed = pki.write_set();
        let look = state.look(&mut seen, Files::read(&pki.settings));
        assert!(matches!(look, Look::Loaded), "{look:?}");
        assert_eq!(pki.served(&state).await, renewed);
    }
}
