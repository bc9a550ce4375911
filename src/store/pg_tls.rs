//! Connections to PostgreSQL, in TLS when the URL asks for it.
//!
//! `sslmode=require` in `store.url` means, for caseroom, what libpq calls `verify-full`: TLS, the
//! server's certificate checked against the public roots (Mozilla's, from `webpki-roots`) and
//! `store.ca_file`, and the host name checked against it. A TLS connection that nobody verified
//! stops only a passive eavesdropper, so caseroom has no unverified mode. Without `sslmode`
//! (`prefer`, the default) or with `disable`, the connection is plain: keep it on loopback, a
//! private network or a unix socket (libpq's `prefer` would try TLS and accept any certificate;
//! caseroom does not pretend to that).
//!
//! Which CA file to trust is a property of the process, set once at start ([`set_ca_file`]) before
//! any connection; every connection of the store, the leadership thread and the links threads then
//! uses it ([`connect`]).

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use postgres::config::SslMode;
use postgres::{Client, NoTls};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::CertificateDer;

use super::StoreError;

/// The verifying connector, built from the configured roots (None until first needed).
static TLS: Mutex<Option<tokio_postgres_rustls::MakeRustlsConnect>> = Mutex::new(None);
/// `store.ca_file`.
static CA_FILE: Mutex<Option<PathBuf>> = Mutex::new(None);

/// Trust `ca_file` (PEM, one or more certificates) besides the public roots, for every later TLS
/// connection. Read now, so a missing or empty file is an error at start, not at the first
/// connection.
pub fn set_ca_file(ca_file: Option<&Path>) -> Result<(), StoreError> {
    let tls = connector(ca_file)?;
    *CA_FILE.lock().unwrap_or_else(|p| p.into_inner()) = ca_file.map(Path::to_owned);
    *TLS.lock().unwrap_or_else(|p| p.into_inner()) = Some(tls);
    Ok(())
}

/// The certificates of a PEM file.
pub fn read_ca_file(path: &Path) -> Result<Vec<CertificateDer<'static>>, StoreError> {
    let refused =
        |why: String| StoreError::Refused(format!("store.ca_file {}: {why}", path.display()));
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(|e| refused(e.to_string()))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| refused(e.to_string()))?;
    if certs.is_empty() {
        return Err(refused("no PEM certificate in it".into()));
    }
    Ok(certs)
}

fn connector(
    ca_file: Option<&Path>,
) -> Result<tokio_postgres_rustls::MakeRustlsConnect, StoreError> {
    let mut roots = rustls::RootCertStore {
        roots: webpki_roots::TLS_SERVER_ROOTS.to_vec(),
    };
    if let Some(path) = ca_file {
        for cert in read_ca_file(path)? {
            roots.add(cert).map_err(|e| {
                StoreError::Refused(format!("store.ca_file {}: {e}", path.display()))
            })?;
        }
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| StoreError::Refused(format!("TLS to PostgreSQL: {e}")))?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(tokio_postgres_rustls::MakeRustlsConnect::new(config))
}

/// Whether the PostgreSQL client takes `url` (for the config's check, which names the key).
pub fn check_url(url: &str) -> Result<(), String> {
    url.parse::<postgres::Config>()
        .map(drop)
        .map_err(|e| super::StoreError::from(e).to_string())
}

/// Connect to `url`: in TLS, verified, with `sslmode=require`; plain otherwise.
pub fn connect(url: &str) -> Result<Client, StoreError> {
    let config: postgres::Config = url.parse()?;
    if config.get_ssl_mode() != SslMode::Require {
        return Ok(config.connect(NoTls)?);
    }
    let tls = {
        let mut held = TLS.lock().unwrap_or_else(|p| p.into_inner());
        match held.as_ref() {
            Some(t) => t.clone(),
            None => {
                let ca = CA_FILE.lock().unwrap_or_else(|p| p.into_inner()).clone();
                let t = connector(ca.as_deref())?;
                *held = Some(t.clone());
                t
            }
        }
    };
    Ok(config.connect(tls)?)
}
