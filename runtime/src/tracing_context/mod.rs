//! Distributed tracing, in one place: W3C trace context on `tracing` spans, carried across
//! processes in AMQP headers and outbox rows, written into JSON log lines, and exported over
//! OTLP/HTTP when `OTEL_EXPORTER_OTLP_ENDPOINT` is set.
//!
//! * [`ContextLayer`] (always installed) gives every span a W3C span context: a root span starts
//!   a new trace (sampled per `OTEL_TRACES_SAMPLER`), a child inherits its parent's trace, and a
//!   span whose parent is in another process gets it with [`set_parent`]. It costs one random
//!   number and one extension per span; log lines carry `trace_id` and `span_id` from it.
//! * [`otlp`] (installed only when an endpoint is configured) records span timings and fields
//!   and ships finished spans in batches from a thread of its own. Without an endpoint there is no
//!   exporter layer, no thread and no HTTP client.
//! * Propagation: [`inject`] writes the current span's `traceparent` (and `tracestate`) into a
//!   message's headers; [`extract`] reads them back. A header that does not parse is ignored —
//!   the consumer starts a new trace — and never makes a message poison. The outbox stores the
//!   context of the span that wrote a row ([`columns`] / [`from_columns`]), so a message relayed
//!   later continues the trace of the transaction that wrote it.

pub mod logs;
pub mod otlp;

use std::fmt;

use lapin::types::{AMQPValue, FieldTable, ShortString};
use tracing::{span, Span, Subscriber};
use tracing_subscriber::{layer::Context, registry::LookupSpan, Layer, Registry};

/// The W3C header (and AMQP header, and outbox column) names.
pub const TRACEPARENT: &str = "traceparent";
pub const TRACESTATE: &str = "tracestate";

/// Longest `tracestate` kept (the W3C limit is 32 members of at most 256 characters; 512 is what
/// the recommendation says a vendor must at least propagate).
const MAX_TRACESTATE: usize = 512;

/// A W3C `traceparent`: trace id, parent span id and flags (bit 0 = sampled).
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct TraceParent {
    pub trace_id: [u8; 16],
    pub span_id: [u8; 8],
    pub flags: u8,
}

impl fmt::Debug for TraceParent {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.header())
    }
}

impl TraceParent {
    /// Parses version-00 syntax (`00-<32 hex>-<16 hex>-<2 hex>`); a later version is read by its
    /// first four fields, as the recommendation asks. All-zero ids, version `ff`, upper-case hex
    /// and wrong lengths are refused (`None`).
    pub fn parse(value: &str) -> Option<TraceParent> {
        let value = value.trim();
        let mut parts = value.split('-');
        let version = parts.next()?;
        let trace = parts.next()?;
        let span = parts.next()?;
        let flags = parts.next()?;
        let rest = parts.next();
        if version.len() != 2 || version == "ff" || !is_lower_hex(version) {
            return None;
        }
        // Version 00 has exactly four fields; a future version may append more.
        if version == "00" && rest.is_some() {
            return None;
        }
        let trace_id: [u8; 16] = decode_hex(trace)?;
        let span_id: [u8; 8] = decode_hex(span)?;
        let [flags] = decode_hex::<1>(flags)?;
        if trace_id == [0; 16] || span_id == [0; 8] {
            return None;
        }
        Some(TraceParent {
            trace_id,
            span_id,
            flags,
        })
    }

    /// The header value (always version 00).
    pub fn header(&self) -> String {
        format!(
            "00-{}-{}-{:02x}",
            hex(&self.trace_id),
            hex(&self.span_id),
            self.flags
        )
    }

    pub fn sampled(&self) -> bool {
        self.flags & 1 == 1
    }

    pub fn trace_id_hex(&self) -> String {
        hex(&self.trace_id)
    }

    pub fn span_id_hex(&self) -> String {
        hex(&self.span_id)
    }
}

/// A trace context received from (or sent to) another process: `traceparent` plus the vendor
/// `tracestate` it came with, passed on unchanged.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Remote {
    pub parent: TraceParent,
    pub state: Option<String>,
}

impl Remote {
    /// From header values; `None` when `traceparent` is missing or does not parse (a `tracestate`
    /// without a valid `traceparent` is dropped too, as the recommendation says).
    pub fn from_values(traceparent: Option<&str>, tracestate: Option<&str>) -> Option<Remote> {
        let parent = TraceParent::parse(traceparent?)?;
        let state = tracestate
            .map(str::trim)
            .filter(|s| !s.is_empty() && s.len() <= MAX_TRACESTATE && s.is_ascii())
            .map(str::to_owned);
        Some(Remote { parent, state })
    }
}

pub(crate) fn hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        s.push(DIGITS[(b >> 4) as usize] as char);
        s.push(DIGITS[(b & 0xf) as usize] as char);
    }
    s
}

fn is_lower_hex(s: &str) -> bool {
    s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

fn decode_hex<const N: usize>(s: &str) -> Option<[u8; N]> {
    if s.len() != N * 2 || !is_lower_hex(s) {
        return None;
    }
    let mut out = [0u8; N];
    for (i, chunk) in s.as_bytes().chunks(2).enumerate() {
        let digit = |c: u8| match c {
            b'0'..=b'9' => c - b'0',
            _ => c - b'a' + 10,
        };
        out[i] = digit(chunk[0]) << 4 | digit(chunk[1]);
    }
    Some(out)
}

/// How new root traces are sampled (`OTEL_TRACES_SAMPLER`, `OTEL_TRACES_SAMPLER_ARG`). Children
/// follow their parent's decision under every `parentbased_*` sampler (the default).
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Sampler {
    AlwaysOn,
    AlwaysOff,
    /// Sample this fraction of traces, decided from the trace id (so every process agrees).
    Ratio(f64),
    /// Follow the parent; roots per the inner sampler.
    ParentBased(RootSampler),
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub enum RootSampler {
    AlwaysOn,
    AlwaysOff,
    Ratio(f64),
}

impl Default for Sampler {
    fn default() -> Self {
        Sampler::ParentBased(RootSampler::AlwaysOn)
    }
}

impl Sampler {
    /// Reads the standard variables; an unknown sampler name or a bad ratio is an error.
    pub fn from_env(
        name: Option<&str>,
        arg: Option<&str>,
    ) -> Result<Sampler, crate::config::ConfigError> {
        let ratio = || -> Result<f64, crate::config::ConfigError> {
            match arg.map(str::trim).filter(|a| !a.is_empty()) {
                None => Ok(1.0),
                Some(a) => a
                    .parse::<f64>()
                    .ok()
                    .filter(|r| (0.0..=1.0).contains(r))
                    .ok_or_else(|| {
                        crate::config::ConfigError(format!(
                            "OTEL_TRACES_SAMPLER_ARG={a:?} is not a ratio between 0 and 1"
                        ))
                    }),
            }
        };
        Ok(match name.map(str::trim).unwrap_or("") {
            "" | "parentbased_always_on" => Sampler::ParentBased(RootSampler::AlwaysOn),
            "always_on" => Sampler::AlwaysOn,
            "always_off" => Sampler::AlwaysOff,
            "traceidratio" => Sampler::Ratio(ratio()?),
            "parentbased_always_off" => Sampler::ParentBased(RootSampler::AlwaysOff),
            "parentbased_traceidratio" => Sampler::ParentBased(RootSampler::Ratio(ratio()?)),
            other => {
                return Err(crate::config::ConfigError(format!(
                    "OTEL_TRACES_SAMPLER={other:?} is not supported (use always_on, always_off, traceidratio, parentbased_always_on, parentbased_always_off or parentbased_traceidratio)"
                )))
            }
        })
    }

    /// The sampled flag of a span with this trace id and (if any) parent decision.
    fn sample(&self, trace_id: &[u8; 16], parent: Option<bool>) -> bool {
        let by_ratio = |r: f64| {
            // The lower 8 bytes of the trace id are random (W3C level 2): compare them with the
            // ratio's share of the range, as the OTel SDKs do.
            let low = u64::from_be_bytes(trace_id[8..].try_into().expect("8 bytes"));
            (low >> 1) < ((r * (1u64 << 63) as f64) as u64)
        };
        match (self, parent) {
            (Sampler::AlwaysOn, _) => true,
            (Sampler::AlwaysOff, _) => false,
            (Sampler::Ratio(r), _) => by_ratio(*r),
            (Sampler::ParentBased(_), Some(p)) => p,
            (Sampler::ParentBased(RootSampler::AlwaysOn), None) => true,
            (Sampler::ParentBased(RootSampler::AlwaysOff), None) => false,
            (Sampler::ParentBased(RootSampler::Ratio(r)), None) => by_ratio(*r),
        }
    }
}

/// The W3C context of one span, kept in its extensions by [`ContextLayer`].
#[derive(Debug, Clone)]
pub struct SpanContext {
    pub trace_id: [u8; 16],
    pub span_id: [u8; 8],
    /// The parent's span id: a local span, or the remote one given by [`set_parent`].
    pub parent_span_id: Option<[u8; 8]>,
    pub sampled: bool,
    pub state: Option<String>,
}

impl SpanContext {
    /// What a message published under this span carries.
    pub fn remote(&self) -> Remote {
        Remote {
            parent: TraceParent {
                trace_id: self.trace_id,
                span_id: self.span_id,
                flags: u8::from(self.sampled),
            },
            state: self.state.clone(),
        }
    }
}

fn random_span_id() -> [u8; 8] {
    loop {
        let id: [u8; 8] = rand::random();
        if id != [0; 8] {
            return id;
        }
    }
}

fn random_trace_id() -> [u8; 16] {
    loop {
        let id: [u8; 16] = rand::random();
        if id != [0; 16] {
            return id;
        }
    }
}

/// Gives every new span a [`SpanContext`] (see the module doc).
#[derive(Debug, Clone, Default)]
pub struct ContextLayer {
    sampler: Sampler,
}

impl ContextLayer {
    pub fn new(sampler: Sampler) -> Self {
        ContextLayer { sampler }
    }
}

impl<S> Layer<S> for ContextLayer
where
    S: Subscriber + for<'a> LookupSpan<'a>,
{
    fn on_new_span(&self, _attrs: &span::Attributes<'_>, id: &span::Id, ctx: Context<'_, S>) {
        let Some(span) = ctx.span(id) else { return };
        let inherited = span
            .parent()
            .and_then(|p| p.extensions().get::<SpanContext>().cloned());
        let context = match inherited {
            Some(parent) => SpanContext {
                trace_id: parent.trace_id,
                span_id: random_span_id(),
                parent_span_id: Some(parent.span_id),
                sampled: parent.sampled,
                state: parent.state,
            },
            None => {
                let trace_id = random_trace_id();
                SpanContext {
                    trace_id,
                    span_id: random_span_id(),
                    parent_span_id: None,
                    sampled: self.sampler.sample(&trace_id, None),
                    state: None,
                }
            }
        };
        span.extensions_mut().insert(context);
    }
}

/// The sampler the process was started with (for [`set_parent`]); set once by
/// [`crate::telemetry::init`].
static SAMPLER: std::sync::OnceLock<Sampler> = std::sync::OnceLock::new();

pub(crate) fn set_sampler(sampler: Sampler) {
    let _ = SAMPLER.set(sampler);
}

/// Makes `span` a child of `remote` (a span in another process, or on another task): it joins
/// that trace. Call it right after creating the span, before any child exists; children created
/// earlier keep the trace they started with.
pub fn set_parent(span: &Span, remote: &Remote) {
    let sampler = SAMPLER.get().copied().unwrap_or_default();
    span.with_subscriber(|(id, dispatch)| {
        let Some(registry) = dispatch.downcast_ref::<Registry>() else {
            return;
        };
        let Some(data) = registry.span(id) else {
            return;
        };
        let mut extensions = data.extensions_mut();
        if let Some(context) = extensions.get_mut::<SpanContext>() {
            context.trace_id = remote.parent.trace_id;
            context.parent_span_id = Some(remote.parent.span_id);
            context.sampled =
                sampler.sample(&remote.parent.trace_id, Some(remote.parent.sampled()));
            context.state = remote.state.clone();
        }
    });
}

/// The context of `span` (`None` when tracing is not installed or the span is disabled).
pub fn context_of(span: &Span) -> Option<SpanContext> {
    span.with_subscriber(|(id, dispatch)| {
        let registry = dispatch.downcast_ref::<Registry>()?;
        let data = registry.span(id)?;
        let extensions = data.extensions();
        extensions.get::<SpanContext>().cloned()
    })
    .flatten()
}

/// What a message published now should carry: the current span's context.
pub fn current() -> Option<Remote> {
    context_of(&Span::current()).map(|c| c.remote())
}

/// Writes the current span's context into `headers` (nothing outside a span). A `traceparent`
/// already there is kept: the caller chose it.
pub fn inject(headers: &mut FieldTable) {
    if headers.inner().contains_key(TRACEPARENT) {
        return;
    }
    if let Some(remote) = current() {
        inject_remote(headers, &remote);
    }
}

/// Writes `remote` into `headers`.
pub fn inject_remote(headers: &mut FieldTable, remote: &Remote) {
    headers.insert(
        ShortString::from(TRACEPARENT),
        AMQPValue::LongString(remote.parent.header().into()),
    );
    if let Some(state) = &remote.state {
        headers.insert(
            ShortString::from(TRACESTATE),
            AMQPValue::LongString(state.as_str().into()),
        );
    }
}

/// Reads a message's context; a missing or unparsable `traceparent` is `None` (a new trace).
pub fn extract(headers: Option<&FieldTable>) -> Option<Remote> {
    let headers = headers?.inner();
    let text = |key: &str| -> Option<String> {
        match headers.get(key)? {
            AMQPValue::LongString(s) => Some(String::from_utf8_lossy(s.as_bytes()).into_owned()),
            AMQPValue::ShortString(s) => Some(s.as_str().to_owned()),
            _ => None,
        }
    };
    Remote::from_values(text(TRACEPARENT).as_deref(), text(TRACESTATE).as_deref())
}

/// Reads an HTTP request's context (same rules as [`extract`]).
pub fn extract_http(headers: &axum::http::HeaderMap) -> Option<Remote> {
    let text = |key: &str| headers.get(key).and_then(|v| v.to_str().ok());
    Remote::from_values(text(TRACEPARENT), text(TRACESTATE))
}

/// The outbox's `traceparent` and `tracestate` columns for a row written now (the current span's
/// context).
pub fn columns() -> (Option<String>, Option<String>) {
    match current() {
        Some(remote) => (Some(remote.parent.header()), remote.state),
        None => (None, None),
    }
}

/// A row's context back from its columns (`None` for rows written without one, e.g. by an older
/// version, or with a value that does not parse).
pub fn from_columns(traceparent: Option<&str>, tracestate: Option<&str>) -> Option<Remote> {
    Remote::from_values(traceparent, tracestate)
}

/// A span for one delivery of `queue`, a child of the publisher's span when the message carries
/// one (a consumer span in OTel terms).
pub fn delivery_span(queue: &str, message_id: Option<&str>, remote: Option<&Remote>) -> Span {
    let span = tracing::info_span!(
        parent: None,
        "amqp.deliver",
        otel.name = %format_args!("{queue} process"),
        otel.kind = "consumer",
        messaging.system = "rabbitmq",
        messaging.destination.name = %queue,
        messaging.message.id = message_id.unwrap_or(""),
    );
    if let Some(remote) = remote {
        set_parent(&span, remote);
    }
    span
}

#[cfg(test)]
mod tests {
    use super::*;
    use tracing_subscriber::layer::SubscriberExt;

    const VALID: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

    #[test]
    fn traceparent_round_trips_and_refuses_garbage() {
        let parsed = TraceParent::parse(VALID).expect("valid");
        assert_eq!(parsed.header(), VALID);
        assert!(parsed.sampled());
        for bad in [
            "",
            "garbage",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e473-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-0g",
        ] {
            assert_eq!(TraceParent::parse(bad), None, "{bad:?}");
        }
        // A later version with more fields is read by its first four.
        assert!(TraceParent::parse(
            "01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-future"
        )
        .is_some());
    }

    #[test]
    fn amqp_headers_round_trip_and_garbage_is_ignored() {
        let remote = Remote::from_values(Some(VALID), Some("vendor=abc")).unwrap();
        let mut headers = FieldTable::default();
        inject_remote(&mut headers, &remote);
        assert_eq!(extract(Some(&headers)), Some(remote));

        let mut garbage = FieldTable::default();
        garbage.insert(
            TRACEPARENT.into(),
            AMQPValue::LongString("not-a-trace".into()),
        );
        garbage.insert(TRACESTATE.into(), AMQPValue::LongString("x=y".into()));
        assert_eq!(extract(Some(&garbage)), None);
        let mut wrong_type = FieldTable::default();
        wrong_type.insert(TRACEPARENT.into(), AMQPValue::LongInt(7));
        assert_eq!(extract(Some(&wrong_type)), None);
        assert_eq!(extract(None), None);
    }

    #[test]
    fn spans_inherit_and_continue_remote_contexts() {
        let subscriber = Registry::default().with(ContextLayer::default());
        tracing::subscriber::with_default(subscriber, || {
            let remote = Remote::from_values(Some(VALID), None).unwrap();
            let span = delivery_span("q", None, Some(&remote));
            let ctx = context_of(&span).expect("a context");
            assert_eq!(ctx.trace_id, remote.parent.trace_id);
            assert_eq!(ctx.parent_span_id, Some(remote.parent.span_id));
            let child = span.in_scope(|| tracing::info_span!("child"));
            let child_ctx = context_of(&child).unwrap();
            assert_eq!(child_ctx.trace_id, remote.parent.trace_id);
            assert_eq!(child_ctx.parent_span_id, Some(ctx.span_id));
            // What a message published under the child carries.
            let mut headers = FieldTable::default();
            child.in_scope(|| inject(&mut headers));
            let sent = extract(Some(&headers)).unwrap();
            assert_eq!(sent.parent.trace_id, remote.parent.trace_id);
            assert_eq!(sent.parent.span_id, child_ctx.span_id);
            // A root span starts a trace of its own.
            let root = delivery_span("q", None, None);
            let root_ctx = context_of(&root).unwrap();
            assert_ne!(root_ctx.trace_id, remote.parent.trace_id);
            assert_eq!(root_ctx.parent_span_id, None);
        });
    }

    #[test]
    fn samplers_parse_and_follow_parents() {
        assert_eq!(Sampler::from_env(None, None).unwrap(), Sampler::default());
        assert_eq!(
            Sampler::from_env(Some("traceidratio"), Some("0.5")).unwrap(),
            Sampler::Ratio(0.5)
        );
        assert!(Sampler::from_env(Some("traceidratio"), Some("2")).is_err());
        assert!(Sampler::from_env(Some("jaeger_remote"), None).is_err());
        let off = Sampler::ParentBased(RootSampler::AlwaysOff);
        assert!(!off.sample(&[1; 16], None));
        assert!(off.sample(&[1; 16], Some(true)));
        assert!(!Sampler::Ratio(0.0).sample(&[0xff; 16], None));
        assert!(Sampler::Ratio(1.0).sample(&[0xff; 16], None));
    }
}
