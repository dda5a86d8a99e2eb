//! TLS building blocks shared by the PostgreSQL and RabbitMQ connectors: one crypto provider
//! (rustls with `ring`, so no C toolchain and no aws-lc in the build), PEM files read with errors
//! that name the file and what was wrong with it, root stores, and the certificate verifiers for
//! libpq's weaker `sslmode`s (`require` encrypts without checking who answers; `verify-ca` checks
//! the chain but not the name).

use std::{path::Path, sync::Arc};

use rustls::{
    client::{
        danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier},
        WebPkiServerVerifier,
    },
    crypto::{verify_tls12_signature, verify_tls13_signature, CryptoProvider},
    pki_types::{pem::PemObject, CertificateDer, PrivateKeyDer, ServerName, UnixTime},
    CertificateError, DigitallySignedStruct, RootCertStore, SignatureScheme,
};

/// A TLS file that could not be used; the message names the file and the fault.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct TlsError(pub String);

/// The process's crypto provider (ring). Installed as rustls' process default the first time it is
/// asked for, so lapin's connector (which asks rustls for the default) uses the same one.
pub fn provider() -> Arc<CryptoProvider> {
    if let Some(provider) = CryptoProvider::get_default() {
        return provider.clone();
    }
    // Losing the race to another thread is fine: whichever was installed is ring.
    let _ = rustls::crypto::ring::default_provider().install_default();
    CryptoProvider::get_default()
        .cloned()
        .unwrap_or_else(|| Arc::new(rustls::crypto::ring::default_provider()))
}

/// The bytes of the PEM file at `path`, for `what` (e.g. "sslrootcert").
pub fn read_pem(path: &Path, what: &str) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|e| TlsError(format!("cannot read {what} {}: {e}", path.display())))
}

/// Every certificate in `pem` (at least one), read from `path` for `what`.
pub fn certificates(
    pem: &[u8],
    path: &Path,
    what: &str,
) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certs = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| TlsError(format!("{what} {} is not valid PEM: {e}", path.display())))?;
    if certs.is_empty() {
        return Err(TlsError(format!(
            "{what} {} holds no certificate (expected PEM blocks starting with -----BEGIN CERTIFICATE-----)",
            path.display()
        )));
    }
    Ok(certs)
}

/// The private key in `pem` (PKCS#8, PKCS#1 or SEC1), read from `path` for `what`.
pub fn private_key(
    pem: &[u8],
    path: &Path,
    what: &str,
) -> Result<PrivateKeyDer<'static>, TlsError> {
    PrivateKeyDer::from_pem_slice(pem).map_err(|e| {
        TlsError(format!(
            "{what} {} holds no usable private key (PEM PKCS#8, PKCS#1 or SEC1): {e}",
            path.display()
        ))
    })
}

/// Every certificate in the PEM file at `path` (at least one).
pub fn read_certificates(
    path: &Path,
    what: &str,
) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    certificates(&read_pem(path, what)?, path, what)
}

/// The private key in the PEM file at `path`.
pub fn read_private_key(path: &Path, what: &str) -> Result<PrivateKeyDer<'static>, TlsError> {
    private_key(&read_pem(path, what)?, path, what)
}

/// A root store from `certs`; fails when none of them is a usable CA certificate.
pub fn root_store(
    certs: Vec<CertificateDer<'static>>,
    what: &str,
) -> Result<RootCertStore, TlsError> {
    let mut roots = RootCertStore::empty();
    let (added, _ignored) = roots.add_parsable_certificates(certs);
    if added == 0 {
        return Err(TlsError(format!("{what} holds no usable CA certificate")));
    }
    Ok(roots)
}

/// The operating system's trusted roots.
pub fn system_roots() -> Result<RootCertStore, TlsError> {
    let loaded = rustls_native_certs::load_native_certs();
    let mut roots = RootCertStore::empty();
    roots.add_parsable_certificates(loaded.certs);
    if roots.is_empty() {
        let why = loaded
            .errors
            .first()
            .map(|e| format!(": {e}"))
            .unwrap_or_default();
        return Err(TlsError(format!(
            "no system root certificates could be loaded{why} (install ca-certificates, or name a CA file)"
        )));
    }
    Ok(roots)
}

/// How much of the server's certificate is checked.
#[derive(Debug, Clone)]
pub enum ServerCheck {
    /// Nothing (libpq `prefer`/`require` without a root certificate): the link is encrypted, but
    /// an attacker in the middle is not detected. Handshake signatures are still checked.
    EncryptOnly,
    /// The chain up to one of these roots, not the host name (libpq `verify-ca`).
    Chain(Arc<RootCertStore>),
    /// The chain and that the certificate names the host connected to (libpq `verify-full`).
    ChainAndName(Arc<RootCertStore>),
}

/// The verifier for `check`.
pub fn verifier(check: &ServerCheck) -> Result<Arc<dyn ServerCertVerifier>, TlsError> {
    let provider = provider();
    let webpki = |roots: &Arc<RootCertStore>| {
        WebPkiServerVerifier::builder_with_provider(roots.clone(), provider.clone())
            .build()
            .map_err(|e| TlsError(format!("cannot build the certificate verifier: {e}")))
    };
    Ok(match check {
        ServerCheck::EncryptOnly => Arc::new(EncryptOnly {
            provider: provider.clone(),
        }),
        ServerCheck::Chain(roots) => Arc::new(ChainOnly {
            inner: webpki(roots)?,
        }),
        ServerCheck::ChainAndName(roots) => webpki(roots)?,
    })
}

/// Accepts any certificate; still verifies that the server holds its key.
#[derive(Debug)]
struct EncryptOnly {
    provider: Arc<CryptoProvider>,
}

impl ServerCertVerifier for EncryptOnly {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// The full web-PKI check, except that a certificate valid for another name is accepted. webpki
/// checks the chain before the name, so a name error means the chain was good.
#[derive(Debug)]
struct ChainOnly {
    inner: Arc<WebPkiServerVerifier>,
}

impl ServerCertVerifier for ChainOnly {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        match self.inner.verify_server_cert(
            end_entity,
            intermediates,
            server_name,
            ocsp_response,
            now,
        ) {
            Err(rustls::Error::InvalidCertificate(
                CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. },
            )) => Ok(ServerCertVerified::assertion()),
            other => other,
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}
