//! Structured logging and tracing: `text` for people, `json` for log pipelines (with `trace_id`
//! and `span_id` of the span a line belongs to), filtered by `RUST_LOG` (default `info`); spans
//! carry W3C trace context and are exported over OTLP/HTTP only when an endpoint is configured
//! ([`crate::tracing_context`]).

use std::time::Duration;

use tracing_subscriber::{
    filter::LevelFilter, fmt, layer::SubscriberExt, util::SubscriberInitExt, EnvFilter, Layer,
    Registry,
};

use crate::{
    config::LogFormat,
    tracing_context::{self, logs::WithTraceIds, otlp, ContextLayer, Sampler},
};

/// Installs the global subscriber; later calls are ignored (tests start several services). The
/// OTLP exporter is started when `OTEL_EXPORTER_OTLP_ENDPOINT` (or the traces-only variable) is
/// set and not empty; its service name defaults to the binary's name.
pub fn init(format: LogFormat) {
    let env = |k: &str| std::env::var(k).ok();
    let mut notes: Vec<String> = Vec::new();
    let sampler = Sampler::from_env(
        env("OTEL_TRACES_SAMPLER").as_deref(),
        env("OTEL_TRACES_SAMPLER_ARG").as_deref(),
    )
    .unwrap_or_else(|e| {
        notes.push(format!("{e}; using parentbased_always_on"));
        Sampler::default()
    });
    let exporter = match otlp::OtlpConfig::from_env(env, &binary_name()) {
        Ok(None) => None,
        Ok(Some(config)) => {
            notes.extend(config.warnings.iter().cloned());
            let endpoint = crate::redact::redact(&config.endpoint);
            match otlp::install(config) {
                Ok(layer) => {
                    notes.push(format!("exporting spans to {endpoint} (OTLP/HTTP JSON)"));
                    Some(layer)
                }
                Err(e) => {
                    notes.push(format!("cannot start the span exporter: {e}"));
                    None
                }
            }
        }
        Err(e) => {
            notes.push(format!("{}; spans are not exported", e.0));
            None
        }
    };
    tracing_context::set_sampler(sampler);
    // `RUST_LOG` filters the log lines only: spans at `info` are exported even when the logs are
    // turned down to `warn`. Without an exporter this is the filter of everything, as before. The
    // context layer has no filter of its own: it sees every span some other layer wants.
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let logs = match format {
        LogFormat::Text => fmt::layer()
            .with_writer(std::io::stderr)
            .with_filter(filter)
            .boxed(),
        LogFormat::Json => fmt::layer()
            .fmt_fields(fmt::format::JsonFields::new())
            // The current span's fields stay (a job id, say); the list of every enclosing span
            // would repeat them on each line, and the ids already lead to the whole trace.
            .event_format(WithTraceIds(
                fmt::format()
                    .json()
                    .flatten_event(true)
                    .with_span_list(false),
            ))
            .with_writer(std::io::stderr)
            .with_filter(filter)
            .boxed(),
    };
    let exporter = exporter.map(|layer| layer.with_filter(LevelFilter::INFO));
    let installed = Registry::default()
        .with(ContextLayer::new(sampler))
        .with(logs)
        .with(exporter)
        .try_init()
        .is_ok();
    if installed {
        for note in notes {
            tracing::info!("{note}");
        }
    }
}

/// Sends the spans not yet exported, within `bound` (what is left of the shutdown budget); a
/// no-op without an exporter. Binaries call it last, after their drain.
pub async fn flush(bound: Duration) {
    if !otlp::flush(bound).await {
        tracing::warn!(?bound, "not every span was exported before exit");
    }
}

/// The default `service.name`: the executable's file name.
fn binary_name() -> String {
    std::env::args_os()
        .next()
        .and_then(|p| {
            std::path::Path::new(&p)
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
        })
        .unwrap_or_else(|| "prebuilds".to_owned())
}
