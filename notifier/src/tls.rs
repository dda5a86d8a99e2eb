//! TLS client settings of the notifier's channels: rustls with the process's one crypto provider
//! (ring, from `prebuilds-runtime`), the system's roots plus `PREBUILDS_NOTIFY_CA_FILE`.

use prebuilds_runtime::tls::{provider, system_roots, TlsError};
use rustls::pki_types::CertificateDer;

/// A client configuration trusting the system's roots and `extra_roots`. Without system roots
/// (no `ca-certificates`) the extra roots alone are enough.
pub fn client_config(
    extra_roots: Vec<CertificateDer<'static>>,
) -> Result<rustls::ClientConfig, TlsError> {
    let mut roots = match system_roots() {
        Ok(roots) => roots,
        Err(e) if extra_roots.is_empty() => return Err(e),
        Err(_) => rustls::RootCertStore::empty(),
    };
    let (added, _) = roots.add_parsable_certificates(extra_roots.iter().cloned());
    if !extra_roots.is_empty() && added == 0 {
        return Err(TlsError(
            "PREBUILDS_NOTIFY_CA_FILE holds no usable CA certificate".into(),
        ));
    }
    let mut config = rustls::ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| TlsError(format!("TLS settings: {e}")))?
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(config)
}
