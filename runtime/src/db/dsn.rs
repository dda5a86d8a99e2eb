//! `DATABASE_URL` as libpq reads it. tokio-postgres understands only `sslmode=disable|prefer|require`
//! and no certificate options, so the TLS parameters are taken out here — `sslmode` (all five of
//! libpq's modes), `sslrootcert` (a file, or `system` for the operating system's roots), `sslcert`
//! and `sslkey` (a client certificate) — and everything else (multi-host lists,
//! `target_session_attrs`, timeouts, …) is left to tokio-postgres. Both the URL form
//! (`postgres://…?sslmode=verify-full`) and the key/value form (`host=… sslmode=…`) are accepted.
//!
//! The mapping to rustls follows libpq: `prefer` tries TLS first and falls back to plaintext only
//! when the server has no TLS; `prefer`/`require` encrypt without checking the certificate unless a
//! root certificate is named (then `require` checks the chain, as libpq does); `verify-ca` checks
//! the chain; `verify-full` also checks that the certificate names the host.

use std::{
    path::{Path, PathBuf},
    sync::Arc,
};

use tokio_postgres_rustls::MakeRustlsConnect;

use crate::{
    redact,
    tls::{self, ServerCheck, TlsError},
};

/// libpq's `sslmode`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum SslMode {
    Disable,
    Prefer,
    Require,
    VerifyCa,
    VerifyFull,
}

impl SslMode {
    fn parse(value: &str) -> Result<SslMode, String> {
        Ok(match value {
            "disable" => SslMode::Disable,
            "prefer" => SslMode::Prefer,
            "require" => SslMode::Require,
            "verify-ca" => SslMode::VerifyCa,
            "verify-full" => SslMode::VerifyFull,
            // libpq also has allow (plaintext first): refusing it beats silently downgrading.
            other => {
                return Err(format!(
                    "sslmode={other} is not supported (use disable, prefer, require, verify-ca or verify-full)"
                ))
            }
        })
    }

    pub fn as_str(self) -> &'static str {
        match self {
            SslMode::Disable => "disable",
            SslMode::Prefer => "prefer",
            SslMode::Require => "require",
            SslMode::VerifyCa => "verify-ca",
            SslMode::VerifyFull => "verify-full",
        }
    }
}

/// Where trusted roots come from (`sslrootcert`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RootCert {
    File(PathBuf),
    /// `sslrootcert=system`.
    System,
}

/// The TLS half of a `DATABASE_URL`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsSettings {
    pub mode: SslMode,
    pub root_cert: Option<RootCert>,
    pub client_cert: Option<PathBuf>,
    pub client_key: Option<PathBuf>,
}

/// A parsed `DATABASE_URL`.
#[derive(Clone)]
pub struct DatabaseUrl {
    pub config: tokio_postgres::Config,
    pub tls: TlsSettings,
}

impl std::fmt::Debug for DatabaseUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DatabaseUrl")
            .field("hosts", &self.config.get_hosts())
            .field("ports", &self.config.get_ports())
            .field("dbname", &self.config.get_dbname())
            .field("user", &self.config.get_user())
            .field("tls", &self.tls)
            .finish_non_exhaustive()
    }
}

/// The TLS parameters we handle ourselves, and the value each had.
#[derive(Debug, Default)]
struct Extracted {
    sslmode: Option<String>,
    sslrootcert: Option<String>,
    sslcert: Option<String>,
    sslkey: Option<String>,
}

impl Extracted {
    fn take(&mut self, key: &str, value: String) -> bool {
        let slot = match key {
            "sslmode" => &mut self.sslmode,
            "sslrootcert" => &mut self.sslrootcert,
            "sslcert" => &mut self.sslcert,
            "sslkey" => &mut self.sslkey,
            _ => return false,
        };
        *slot = Some(value);
        true
    }
}

impl DatabaseUrl {
    /// Parses `url`. Errors never contain the password (they name the parameter at fault).
    pub fn parse(url: &str) -> Result<DatabaseUrl, String> {
        let (rest, extracted) = split_tls_parameters(url)?;
        let mut config: tokio_postgres::Config = rest.parse().map_err(|e| {
            format!(
                "DATABASE_URL is not a valid PostgreSQL connection string ({e}): {}",
                redact::redact(url)
            )
        })?;
        let mode = match extracted.sslmode.as_deref() {
            Some(value) => SslMode::parse(value)?,
            None => SslMode::Prefer,
        };
        let root_cert = extracted.sslrootcert.map(|v| match v.as_str() {
            "system" => RootCert::System,
            _ => RootCert::File(PathBuf::from(v)),
        });
        if root_cert == Some(RootCert::System) && mode < SslMode::VerifyFull {
            // libpq's rule: trusting every public CA is only safe together with the name check.
            return Err(format!(
                "sslmode={} may not be used with sslrootcert=system (use sslmode=verify-full)",
                mode.as_str()
            ));
        }
        if extracted.sslcert.is_some() != extracted.sslkey.is_some() {
            return Err("sslcert and sslkey must be given together".to_owned());
        }
        config.ssl_mode(match mode {
            SslMode::Disable => tokio_postgres::config::SslMode::Disable,
            SslMode::Prefer => tokio_postgres::config::SslMode::Prefer,
            _ => tokio_postgres::config::SslMode::Require,
        });
        Ok(DatabaseUrl {
            config,
            tls: TlsSettings {
                mode,
                root_cert,
                client_cert: extracted.sslcert.map(PathBuf::from),
                client_key: extracted.sslkey.map(PathBuf::from),
            },
        })
    }

    /// The TLS connector for these settings; certificate files are read here, so a missing or
    /// malformed file fails before any connection is attempted.
    pub fn connector(&self) -> Result<MakeRustlsConnect, TlsError> {
        self.connector_with(default_root_cert())
    }

    /// [`DatabaseUrl::connector`] with libpq's default root certificate (`~/.postgresql/root.crt`,
    /// when it exists) given, so tests do not depend on the home directory.
    fn connector_with(&self, default_root: Option<PathBuf>) -> Result<MakeRustlsConnect, TlsError> {
        let settings = &self.tls;
        let roots = match &settings.root_cert {
            Some(RootCert::File(path)) => Some(tls::root_store(
                tls::read_certificates(path, "sslrootcert")?,
                &format!("sslrootcert {}", path.display()),
            )?),
            Some(RootCert::System) => Some(tls::system_roots()?),
            None if settings.mode >= SslMode::VerifyCa => match default_root {
                Some(path) => Some(tls::root_store(
                    tls::read_certificates(&path, "the default root certificate")?,
                    &path.display().to_string(),
                )?),
                None => {
                    return Err(TlsError(format!(
                        "sslmode={} needs trusted roots: add sslrootcert=/path/to/ca.pem to DATABASE_URL \
                         (or sslrootcert=system for the system's roots with verify-full)",
                        settings.mode.as_str()
                    )))
                }
            },
            None => None,
        };
        let check = match (settings.mode, roots) {
            (SslMode::VerifyFull, Some(roots)) => ServerCheck::ChainAndName(Arc::new(roots)),
            (SslMode::Disable | SslMode::Prefer, _) | (SslMode::Require, None) => {
                ServerCheck::EncryptOnly
            }
            (_, Some(roots)) => ServerCheck::Chain(Arc::new(roots)),
            (SslMode::VerifyCa | SslMode::VerifyFull, None) => {
                unreachable!("verify modes without roots returned an error above")
            }
        };
        let builder = rustls::ClientConfig::builder_with_provider(tls::provider())
            .with_safe_default_protocol_versions()
            .map_err(|e| TlsError(format!("TLS protocol versions: {e}")))?
            .dangerous()
            .with_custom_certificate_verifier(tls::verifier(&check)?);
        let config = match (&settings.client_cert, &settings.client_key) {
            (Some(cert), Some(key)) => builder
                .with_client_auth_cert(
                    tls::read_certificates(cert, "sslcert")?,
                    tls::read_private_key(key, "sslkey")?,
                )
                .map_err(|e| TlsError(format!("sslcert/sslkey cannot be used together: {e}")))?,
            _ => builder.with_no_client_auth(),
        };
        Ok(MakeRustlsConnect::new(config))
    }
}

/// libpq's default root certificate, `~/.postgresql/root.crt`, when it exists.
fn default_root_cert() -> Option<PathBuf> {
    let home = std::env::var_os("HOME")?;
    let path = Path::new(&home).join(".postgresql/root.crt");
    path.is_file().then_some(path)
}

/// `url` without our TLS parameters, and their values.
fn split_tls_parameters(url: &str) -> Result<(String, Extracted), String> {
    let mut extracted = Extracted::default();
    if url.starts_with("postgres://") || url.starts_with("postgresql://") {
        let (before, query_and_fragment) = match url.split_once('?') {
            Some((before, query)) => (before, query),
            None => return Ok((url.to_owned(), extracted)),
        };
        let (query, fragment) = match query_and_fragment.split_once('#') {
            Some((q, f)) => (q, Some(f)),
            None => (query_and_fragment, None),
        };
        let mut kept = Vec::new();
        for pair in query.split('&').filter(|p| !p.is_empty()) {
            let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
            if !extracted.take(&redact::percent_decode(key), redact::percent_decode(value)) {
                kept.push(pair);
            }
        }
        let mut rest = before.to_owned();
        if !kept.is_empty() {
            rest.push('?');
            rest.push_str(&kept.join("&"));
        }
        if let Some(fragment) = fragment {
            rest.push('#');
            rest.push_str(fragment);
        }
        return Ok((rest, extracted));
    }
    let Some(pairs) = redact::key_values(url) else {
        // Not a key/value DSN either: let tokio-postgres report what it makes of it.
        return Ok((url.to_owned(), extracted));
    };
    let mut rest = String::with_capacity(url.len());
    let mut cursor = 0;
    for pair in pairs {
        if extracted.take(&pair.key, pair.value) {
            rest.push_str(&url[cursor..pair.span.start]);
            cursor = pair.span.end;
        }
    }
    rest.push_str(&url[cursor..]);
    Ok((rest, extracted))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tls(url: &str) -> TlsSettings {
        DatabaseUrl::parse(url).unwrap().tls
    }

    #[test]
    fn every_libpq_sslmode_parses_in_both_forms() {
        for (value, mode) in [
            ("disable", SslMode::Disable),
            ("prefer", SslMode::Prefer),
            ("require", SslMode::Require),
            ("verify-ca", SslMode::VerifyCa),
            ("verify-full", SslMode::VerifyFull),
        ] {
            assert_eq!(
                tls(&format!("postgres://u@h/db?sslmode={value}")).mode,
                mode
            );
            assert_eq!(
                tls(&format!("host=h user=u sslmode={value} dbname=db")).mode,
                mode
            );
        }
        assert_eq!(
            tls("postgres://u@h/db").mode,
            SslMode::Prefer,
            "libpq's default"
        );
        assert!(DatabaseUrl::parse("postgres://u@h/db?sslmode=allow")
            .unwrap_err()
            .contains("not supported"));
    }

    #[test]
    fn tls_parameters_are_taken_out_and_the_rest_reaches_tokio_postgres() {
        let url = DatabaseUrl::parse(
            "postgres://u:pw@h1:5432,h2:5433/db?sslmode=verify-full&sslrootcert=%2Ftmp%2Fca.pem\
             &target_session_attrs=read-write&application_name=app",
        )
        .unwrap();
        assert_eq!(
            url.tls.root_cert,
            Some(RootCert::File("/tmp/ca.pem".into()))
        );
        assert_eq!(url.config.get_ports(), &[5432, 5433]);
        assert_eq!(url.config.get_application_name(), Some("app"));
        assert_eq!(
            url.config.get_ssl_mode(),
            tokio_postgres::config::SslMode::Require
        );
        assert_eq!(
            url.config.get_target_session_attrs(),
            tokio_postgres::config::TargetSessionAttrs::ReadWrite
        );

        let kv = DatabaseUrl::parse(
            "host=h user=u sslmode=verify-ca sslrootcert='/my dir/ca.pem' dbname=db sslcert=/c sslkey=/k",
        )
        .unwrap();
        assert_eq!(
            kv.tls.root_cert,
            Some(RootCert::File("/my dir/ca.pem".into()))
        );
        assert_eq!(kv.tls.client_cert, Some(PathBuf::from("/c")));
        assert_eq!(kv.config.get_dbname(), Some("db"));
    }

    /// Failover URLs in both forms: every host and port reaches tokio-postgres, with
    /// `target_session_attrs`, and the TLS settings (applied to each host) are taken out.
    #[test]
    fn multi_host_urls_keep_every_host_and_the_session_attribute() {
        for url in [
            "postgresql://u@db1:5432,db2:5433/app?target_session_attrs=read-write&sslmode=verify-full&sslrootcert=/ca.pem",
            "host=db1,db2 port=5432,5433 user=u dbname=app target_session_attrs=read-write sslmode=verify-full sslrootcert=/ca.pem",
        ] {
            let parsed = DatabaseUrl::parse(url).unwrap();
            assert_eq!(parsed.config.get_hosts().len(), 2, "{url}");
            assert_eq!(parsed.config.get_ports(), &[5432, 5433], "{url}");
            assert_eq!(
                parsed.config.get_target_session_attrs(),
                tokio_postgres::config::TargetSessionAttrs::ReadWrite,
                "{url}"
            );
            assert_eq!(parsed.tls.mode, SslMode::VerifyFull, "{url}");
            assert_eq!(parsed.config.get_dbname(), Some("app"), "{url}");
        }
    }

    #[test]
    fn unsafe_or_incomplete_combinations_are_refused() {
        assert!(
            DatabaseUrl::parse("postgres://h/db?sslmode=require&sslrootcert=system")
                .unwrap_err()
                .contains("verify-full")
        );
        assert!(DatabaseUrl::parse("postgres://h/db?sslcert=/c")
            .unwrap_err()
            .contains("together"));
    }

    #[test]
    fn parse_errors_do_not_carry_the_password() {
        let err = DatabaseUrl::parse("postgres://u:s3cret@h:notaport/db").unwrap_err();
        assert!(!err.contains("s3cret"), "{err}");
        let err = DatabaseUrl::parse("host=h password=s3cret bogus_option=1").unwrap_err();
        assert!(!err.contains("s3cret"), "{err}");
    }

    #[test]
    fn verify_modes_without_roots_say_what_to_add() {
        let url = DatabaseUrl::parse("postgres://h/db?sslmode=verify-full").unwrap();
        let err = url
            .connector_with(None)
            .err()
            .expect("no roots")
            .to_string();
        assert!(err.contains("sslrootcert"), "{err}");
        let url =
            DatabaseUrl::parse("postgres://h/db?sslmode=verify-ca&sslrootcert=/nonexistent/ca.pem")
                .unwrap();
        let err = url
            .connector_with(None)
            .err()
            .expect("missing file")
            .to_string();
        assert!(err.contains("/nonexistent/ca.pem"), "{err}");
    }
}
