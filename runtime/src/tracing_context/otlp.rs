//! The OTLP/HTTP exporter: a `tracing-subscriber` layer that records each sampled span's timing,
//! fields and events, and a thread of its own that sends finished spans as OTLP/JSON
//! (`POST <endpoint>/v1/traces`, `application/json`) in batches. Installed only when
//! `OTEL_EXPORTER_OTLP_ENDPOINT` or `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT` is set and not empty
//! ([`OtlpConfig::from_env`]); otherwise nothing of this module runs.
//!
//! Why not the OpenTelemetry SDK: the exporter it needs (`opentelemetry-otlp`) brings protobuf
//! code generation types, an HTTP client abstraction and, by default, gRPC — much more than
//! "serialise finished spans as JSON and POST them" over the hyper client already in the tree.
//! Collectors and Jaeger accept OTLP/JSON on the same HTTP port as protobuf.
//!
//! Spans queue in memory up to `OTEL_BSP_MAX_QUEUE_SIZE` (2048); past that new spans are dropped
//! (counted, and said once in the log) rather than slowing the service. A batch that cannot be
//! sent is dropped after one attempt: tracing is best effort and must never back up into the
//! work. [`flush`] sends what is queued, bounded by a deadline (graceful shutdown calls it with
//! what is left of the shutdown budget).

use std::{
    collections::VecDeque,
    sync::{
        atomic::{AtomicU64, AtomicUsize, Ordering},
        mpsc, Arc, OnceLock,
    },
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use bytes::Bytes;
use http_body_util::Full;
use serde_json::{json, Value};
use tracing::{
    field::{Field, Visit},
    span, Event, Subscriber,
};
use tracing_subscriber::{layer::Context, registry::LookupSpan, Layer};

use super::{hex, SpanContext};
use crate::config::ConfigError;

/// Where and how spans are exported (the standard OTel variables).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OtlpConfig {
    /// The traces URL (`…/v1/traces`), `http://` or `https://`.
    pub endpoint: String,
    /// `OTEL_EXPORTER_OTLP_HEADERS` / `OTEL_EXPORTER_OTLP_TRACES_HEADERS`: sent with every
    /// request (typically a collector's API key, so never printed).
    pub headers: Headers,
    /// `OTEL_EXPORTER_OTLP_CERTIFICATE` / `OTEL_EXPORTER_OTLP_TRACES_CERTIFICATE`: CA
    /// certificates (PEM) trusted for an `https://` endpoint on top of the system roots.
    pub certificate: Option<std::path::PathBuf>,
    pub service_name: String,
    /// `OTEL_BSP_SCHEDULE_DELAY`: most time a finished span waits before it is sent.
    pub schedule_delay: Duration,
    pub max_queue: usize,
    pub max_batch: usize,
    /// `OTEL_EXPORTER_OTLP_TRACES_TIMEOUT` / `OTEL_EXPORTER_OTLP_TIMEOUT`: one request's bound.
    pub timeout: Duration,
    /// Things said about the settings once logging is up (an unsupported protocol, say).
    pub warnings: Vec<String>,
}

impl OtlpConfig {
    /// `None` when no endpoint is set (or set empty), or `OTEL_SDK_DISABLED=true`: no exporter.
    pub fn from_env(
        env: impl Fn(&str) -> Option<String>,
        default_service: &str,
    ) -> Result<Option<OtlpConfig>, ConfigError> {
        let var = |k: &str| {
            env(k)
                .map(|v| v.trim().to_owned())
                .filter(|v| !v.is_empty())
        };
        if var("OTEL_SDK_DISABLED").is_some_and(|v| v.eq_ignore_ascii_case("true")) {
            return Ok(None);
        }
        let endpoint = match (
            var("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"),
            var("OTEL_EXPORTER_OTLP_ENDPOINT"),
        ) {
            // The signal-specific URL is used as given; the general one gets the signal's path.
            (Some(traces), _) => traces,
            (None, Some(base)) => format!("{}/v1/traces", base.trim_end_matches('/')),
            (None, None) => return Ok(None),
        };
        Target::parse(&endpoint)?;
        let headers = match var("OTEL_EXPORTER_OTLP_TRACES_HEADERS")
            .or_else(|| var("OTEL_EXPORTER_OTLP_HEADERS"))
        {
            Some(list) => Headers::parse(&list)?,
            None => Headers::default(),
        };
        let certificate = var("OTEL_EXPORTER_OTLP_TRACES_CERTIFICATE")
            .or_else(|| var("OTEL_EXPORTER_OTLP_CERTIFICATE"))
            .map(std::path::PathBuf::from);
        let mut warnings = Vec::new();
        match var("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL")
            .or_else(|| var("OTEL_EXPORTER_OTLP_PROTOCOL"))
            .as_deref()
        {
            None | Some("http/json") => {}
            Some(other) => warnings.push(format!(
                "OTEL_EXPORTER_OTLP_PROTOCOL={other:?} is not supported by this build; sending http/json (collectors and Jaeger take it on the same port)"
            )),
        }
        let millis = |k: &str, default: u64| -> Result<Duration, ConfigError> {
            match var(k) {
                None => Ok(Duration::from_millis(default)),
                Some(v) => v
                    .parse::<u64>()
                    .map(Duration::from_millis)
                    .map_err(|_| ConfigError(format!("{k}={v:?} is not a number of milliseconds"))),
            }
        };
        let count = |k: &str, default: usize| -> Result<usize, ConfigError> {
            match var(k) {
                None => Ok(default),
                Some(v) => v
                    .parse::<usize>()
                    .ok()
                    .filter(|n| *n > 0)
                    .ok_or_else(|| ConfigError(format!("{k}={v:?} is not a positive number"))),
            }
        };
        let timeout = match var("OTEL_EXPORTER_OTLP_TRACES_TIMEOUT") {
            Some(_) => millis("OTEL_EXPORTER_OTLP_TRACES_TIMEOUT", 10_000)?,
            None => millis("OTEL_EXPORTER_OTLP_TIMEOUT", 10_000)?,
        };
        let max_queue = count("OTEL_BSP_MAX_QUEUE_SIZE", 2048)?;
        Ok(Some(OtlpConfig {
            endpoint,
            headers,
            certificate,
            service_name: var("OTEL_SERVICE_NAME").unwrap_or_else(|| default_service.to_owned()),
            schedule_delay: millis("OTEL_BSP_SCHEDULE_DELAY", 5000)?,
            max_batch: count("OTEL_BSP_MAX_EXPORT_BATCH_SIZE", 512)?.min(max_queue),
            max_queue,
            timeout,
            warnings,
        }))
    }
}

/// Extra request headers, from the OTel list form `key1=value1,key2=value2` (values
/// percent-decoded). The values are credentials more often than not: `Debug` shows the names only.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct Headers(Vec<(axum::http::HeaderName, axum::http::HeaderValue)>);

impl std::fmt::Debug for Headers {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list()
            .entries(self.0.iter().map(|(name, _)| format!("{name}: <redacted>")))
            .finish()
    }
}

impl Headers {
    fn parse(list: &str) -> Result<Headers, ConfigError> {
        let mut headers = Vec::new();
        for (n, item) in list.split(',').enumerate() {
            let item = item.trim();
            if item.is_empty() {
                continue;
            }
            // Errors name the position and the header, never the value.
            let (name, value) = item.split_once('=').ok_or_else(|| {
                ConfigError(format!(
                    "OTEL_EXPORTER_OTLP_HEADERS: entry {} is not key=value",
                    n + 1
                ))
            })?;
            let name = name.trim();
            let header = axum::http::HeaderName::from_bytes(name.as_bytes()).map_err(|_| {
                ConfigError(format!(
                    "OTEL_EXPORTER_OTLP_HEADERS: {name:?} is not a header name"
                ))
            })?;
            let decoded = percent_decode(value.trim()).ok_or_else(|| {
                ConfigError(format!(
                    "OTEL_EXPORTER_OTLP_HEADERS: the value of {name:?} has a bad %-escape"
                ))
            })?;
            let mut value = axum::http::HeaderValue::from_bytes(&decoded).map_err(|_| {
                ConfigError(format!(
                    "OTEL_EXPORTER_OTLP_HEADERS: the value of {name:?} is not a valid header value"
                ))
            })?;
            value.set_sensitive(true);
            headers.push((header, value));
        }
        Ok(Headers(headers))
    }
}

/// `%XX` escapes decoded (the OTel header list is URL-encoded, W3C Baggage style).
fn percent_decode(text: &str) -> Option<Vec<u8>> {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = text.get(i + 1..i + 3)?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    Some(out)
}

/// The parts of an `http(s)://host:port/path` URL a request needs.
#[derive(Debug, Clone)]
struct Target {
    /// `host:port`, for the TCP connection and the `Host` header.
    authority: String,
    /// The host alone: the name an `https://` endpoint's certificate must carry.
    host: String,
    path: String,
    tls: bool,
}

impl Target {
    fn parse(url: &str) -> Result<Target, ConfigError> {
        let shown = crate::redact::redact(url);
        let uri: axum::http::Uri = url
            .parse()
            .map_err(|e| ConfigError(format!("the OTLP endpoint {shown:?} is not a URL: {e}")))?;
        let tls = match uri.scheme_str() {
            Some("http") => false,
            Some("https") => true,
            _ => {
                return Err(ConfigError(format!(
                    "the OTLP endpoint {shown:?} must be an http:// or https:// URL"
                )))
            }
        };
        let authority = uri
            .authority()
            .ok_or_else(|| ConfigError(format!("the OTLP endpoint {shown:?} has no host")))?;
        let host = authority
            .host()
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_owned();
        let authority = if authority.port().is_some() {
            authority.to_string()
        } else {
            format!("{}:{}", authority.host(), if tls { 443 } else { 80 })
        };
        let path = uri
            .path_and_query()
            .map_or("/".to_owned(), |p| p.as_str().to_owned());
        Ok(Target {
            authority,
            host,
            path,
            tls,
        })
    }
}

/// One finished span, ready to serialise.
#[derive(Debug)]
struct SpanRecord {
    context: SpanContext,
    name: String,
    kind: i32,
    start: SystemTime,
    end: SystemTime,
    attributes: Vec<(String, Attr)>,
    events: Vec<EventRecord>,
    error: Option<String>,
}

#[derive(Debug)]
struct EventRecord {
    time: SystemTime,
    name: String,
    attributes: Vec<(String, Attr)>,
}

#[derive(Debug, Clone)]
enum Attr {
    Str(String),
    Int(i64),
    Bool(bool),
    Double(f64),
}

/// Most events kept per span (the rest are counted in `otel.dropped_events`).
const MAX_EVENTS: usize = 64;
/// Longest attribute string kept.
const MAX_VALUE: usize = 2048;

/// What the layer keeps in a span's extensions while it is open.
#[derive(Debug)]
struct Recording {
    start: SystemTime,
    name: Option<String>,
    kind: i32,
    attributes: Vec<(String, Attr)>,
    events: Vec<EventRecord>,
    dropped_events: usize,
    error: Option<String>,
}

impl Recording {
    fn set(&mut self, key: &str, value: Attr) {
        match (key, &value) {
            ("otel.name", Attr::Str(s)) => self.name = Some(s.clone()),
            ("otel.kind", Attr::Str(s)) => {
                self.kind = match s.as_str() {
                    "server" => 2,
                    "client" => 3,
                    "producer" => 4,
                    "consumer" => 5,
                    _ => 1,
                }
            }
            ("otel.status_code", Attr::Str(s)) if s.eq_ignore_ascii_case("error") => {
                self.error.get_or_insert_with(String::new);
            }
            ("error", Attr::Str(s)) => {
                self.error = Some(s.clone());
                self.attributes.push((key.to_owned(), value));
            }
            _ => {
                if let Some(slot) = self.attributes.iter_mut().find(|(k, _)| k == key) {
                    slot.1 = value;
                } else {
                    self.attributes.push((key.to_owned(), value));
                }
            }
        }
    }
}

/// Collects a span's or an event's fields.
struct Fields<'a>(&'a mut Vec<(String, Attr)>, Option<&'a mut String>);

impl Visit for Fields<'_> {
    fn record_str(&mut self, field: &Field, value: &str) {
        self.put(field, Attr::Str(value.chars().take(MAX_VALUE).collect()));
    }
    fn record_i64(&mut self, field: &Field, value: i64) {
        self.put(field, Attr::Int(value));
    }
    fn record_u64(&mut self, field: &Field, value: u64) {
        self.put(field, Attr::Int(i64::try_from(value).unwrap_or(i64::MAX)));
    }
    fn record_bool(&mut self, field: &Field, value: bool) {
        self.put(field, Attr::Bool(value));
    }
    fn record_f64(&mut self, field: &Field, value: f64) {
        self.put(field, Attr::Double(value));
    }
    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        let text = format!("{value:?}");
        self.put(field, Attr::Str(text.chars().take(MAX_VALUE).collect()));
    }
}

impl Fields<'_> {
    fn put(&mut self, field: &Field, value: Attr) {
        if field.name() == "message" {
            if let (Some(message), Attr::Str(s)) = (self.1.as_deref_mut(), &value) {
                *message = s.clone();
                return;
            }
        }
        self.0.push((field.name().to_owned(), value));
    }
}

/// Records sampled spans and hands finished ones to the export thread.
#[derive(Debug, Clone)]
pub struct OtlpLayer {
    queue: Queue,
}

impl<S> Layer<S> for OtlpLayer
where
    S: Subscriber + for<'a> LookupSpan<'a>,
{
    fn on_new_span(&self, attrs: &span::Attributes<'_>, id: &span::Id, ctx: Context<'_, S>) {
        let Some(span) = ctx.span(id) else { return };
        let mut fields = Vec::new();
        attrs.record(&mut Fields(&mut fields, None));
        let mut recording = Recording {
            start: SystemTime::now(),
            name: None,
            kind: 1,
            attributes: Vec::with_capacity(fields.len() + 1),
            events: Vec::new(),
            dropped_events: 0,
            error: None,
        };
        recording.attributes.push((
            "code.namespace".to_owned(),
            Attr::Str(attrs.metadata().target().to_owned()),
        ));
        for (k, v) in fields {
            recording.set(&k, v);
        }
        span.extensions_mut().insert(recording);
    }

    fn on_record(&self, id: &span::Id, values: &span::Record<'_>, ctx: Context<'_, S>) {
        let Some(span) = ctx.span(id) else { return };
        let mut fields = Vec::new();
        values.record(&mut Fields(&mut fields, None));
        let mut extensions = span.extensions_mut();
        if let Some(recording) = extensions.get_mut::<Recording>() {
            for (k, v) in fields {
                recording.set(&k, v);
            }
        }
    }

    fn on_event(&self, event: &Event<'_>, ctx: Context<'_, S>) {
        let Some(span) = ctx.event_span(event) else {
            return;
        };
        let mut extensions = span.extensions_mut();
        let Some(recording) = extensions.get_mut::<Recording>() else {
            return;
        };
        let level = *event.metadata().level();
        if recording.events.len() >= MAX_EVENTS {
            recording.dropped_events += 1;
            return;
        }
        let mut message = String::new();
        let mut attributes = vec![("level".to_owned(), Attr::Str(level.to_string()))];
        event.record(&mut Fields(&mut attributes, Some(&mut message)));
        if level == tracing::Level::ERROR && recording.error.is_none() {
            recording.error = Some(message.clone());
        }
        recording.events.push(EventRecord {
            time: SystemTime::now(),
            name: if message.is_empty() {
                event.metadata().name().to_owned()
            } else {
                message
            },
            attributes,
        });
    }

    fn on_close(&self, id: span::Id, ctx: Context<'_, S>) {
        let Some(span) = ctx.span(&id) else { return };
        let (recording, context) = {
            let mut extensions = span.extensions_mut();
            (
                extensions.remove::<Recording>(),
                extensions.get_mut::<SpanContext>().cloned(),
            )
        };
        let (Some(mut recording), Some(context)) = (recording, context) else {
            return;
        };
        if !context.sampled {
            return;
        }
        if recording.dropped_events > 0 {
            recording.attributes.push((
                "otel.dropped_events".to_owned(),
                Attr::Int(recording.dropped_events as i64),
            ));
        }
        let record = SpanRecord {
            context,
            name: recording
                .name
                .unwrap_or_else(|| span.metadata().name().to_owned()),
            kind: recording.kind,
            start: recording.start,
            end: SystemTime::now(),
            attributes: recording.attributes,
            events: recording.events,
            error: recording.error,
        };
        // The queue may log (when full): never while holding this span's extensions.
        self.queue.push(record);
    }
}

enum Message {
    Span(Box<SpanRecord>),
    Flush(tokio::sync::oneshot::Sender<()>),
}

/// The hand-off to the export thread, bounded by a counter (an unbounded channel, so that a
/// flush request never waits behind a full queue).
#[derive(Debug, Clone)]
struct Queue {
    sender: mpsc::Sender<Message>,
    queued: Arc<AtomicUsize>,
    max: usize,
    dropped: Arc<AtomicU64>,
}

impl std::fmt::Debug for Message {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Message")
    }
}

impl Queue {
    fn push(&self, record: SpanRecord) {
        if self.queued.fetch_add(1, Ordering::Relaxed) >= self.max {
            self.queued.fetch_sub(1, Ordering::Relaxed);
            if self.dropped.fetch_add(1, Ordering::Relaxed) == 0 {
                tracing::warn!(
                    max = self.max,
                    "the span export queue is full; dropping spans (the OTLP endpoint is slow or unreachable)"
                );
            }
            return;
        }
        if self.sender.send(Message::Span(Box::new(record))).is_err() {
            self.queued.fetch_sub(1, Ordering::Relaxed);
        }
    }
}

/// The process's exporter, once installed.
static EXPORTER: OnceLock<Queue> = OnceLock::new();

/// Whether this process exports spans (false unless an endpoint was configured).
pub fn installed() -> bool {
    EXPORTER.get().is_some()
}

/// Starts the export thread and returns the layer feeding it. Called once, by
/// [`crate::telemetry::init`].
pub fn install(config: OtlpConfig) -> std::io::Result<OtlpLayer> {
    let target = Target::parse(&config.endpoint).map_err(std::io::Error::other)?;
    // Built here, so a bad CA file is reported once at start-up, with its reason, instead of
    // failing every export later.
    let tls = if target.tls {
        Some(tls_connector(config.certificate.as_deref()).map_err(std::io::Error::other)?)
    } else {
        None
    };
    let (sender, receiver) = mpsc::channel();
    let queue = Queue {
        sender,
        queued: Arc::default(),
        max: config.max_queue,
        dropped: Arc::default(),
    };
    let counter = queue.queued.clone();
    std::thread::Builder::new()
        .name("otlp-export".to_owned())
        .spawn(move || export_loop(config, target, tls, receiver, counter))?;
    let _ = EXPORTER.set(queue.clone());
    Ok(OtlpLayer { queue })
}

/// Sends every span finished so far, waiting at most `bound`; returns whether it all went (true
/// at once when no exporter is installed).
pub async fn flush(bound: Duration) -> bool {
    let Some(queue) = EXPORTER.get() else {
        return true;
    };
    let (done, wait) = tokio::sync::oneshot::channel();
    if queue.sender.send(Message::Flush(done)).is_err() {
        return false;
    }
    matches!(tokio::time::timeout(bound, wait).await, Ok(Ok(())))
}

fn export_loop(
    config: OtlpConfig,
    target: Target,
    tls: Option<tokio_rustls::TlsConnector>,
    receiver: mpsc::Receiver<Message>,
    queued: Arc<AtomicUsize>,
) {
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("cannot start the OTLP export thread's runtime: {e}; spans are not exported");
            return;
        }
    };
    let mut sender = Sender {
        config: &config,
        target: &target,
        tls: tls.as_ref(),
        last_failure_logged: None,
    };
    let mut pending: VecDeque<SpanRecord> = VecDeque::new();
    let mut due: Option<Instant> = None;
    loop {
        let message = match due {
            None => receiver
                .recv()
                .map_err(|_| mpsc::RecvTimeoutError::Disconnected),
            Some(at) => receiver.recv_timeout(at.saturating_duration_since(Instant::now())),
        };
        match message {
            Ok(Message::Span(record)) => {
                queued.fetch_sub(1, Ordering::Relaxed);
                pending.push_back(*record);
                due.get_or_insert_with(|| Instant::now() + config.schedule_delay);
                if pending.len() >= config.max_batch {
                    runtime.block_on(sender.send_all(&mut pending));
                    due = None;
                }
            }
            Ok(Message::Flush(done)) => {
                // Spans queued before the flush request are already in the channel ahead of it.
                runtime.block_on(sender.send_all(&mut pending));
                due = None;
                let _ = done.send(());
            }
            Err(mpsc::RecvTimeoutError::Timeout) => {
                runtime.block_on(sender.send_all(&mut pending));
                due = None;
            }
            Err(mpsc::RecvTimeoutError::Disconnected) => {
                runtime.block_on(sender.send_all(&mut pending));
                return;
            }
        }
    }
}

struct Sender<'a> {
    config: &'a OtlpConfig,
    target: &'a Target,
    tls: Option<&'a tokio_rustls::TlsConnector>,
    last_failure_logged: Option<Instant>,
}

impl Sender<'_> {
    async fn send_all(&mut self, pending: &mut VecDeque<SpanRecord>) {
        while !pending.is_empty() {
            let take = pending.len().min(self.config.max_batch);
            let batch: Vec<SpanRecord> = pending.drain(..take).collect();
            let body = encode(&self.config.service_name, &batch);
            let outcome = tokio::time::timeout(self.config.timeout, self.post(body)).await;
            let failure = match outcome {
                Ok(Ok(())) => None,
                Ok(Err(e)) => Some(e),
                Err(_) => Some(format!("no answer within {:?}", self.config.timeout)),
            };
            if let Some(error) = failure {
                // Said at most once a minute: an unreachable collector must not flood the log.
                if self
                    .last_failure_logged
                    .is_none_or(|t| t.elapsed() > Duration::from_secs(60))
                {
                    self.last_failure_logged = Some(Instant::now());
                    tracing::warn!(endpoint = %crate::redact::redact(&self.config.endpoint), spans = batch.len(), %error, "could not export spans; dropping them");
                }
            }
        }
    }

    async fn post(&self, body: Vec<u8>) -> Result<(), String> {
        let stream = tokio::net::TcpStream::connect(&self.target.authority)
            .await
            .map_err(|e| format!("connect: {e}"))?;
        let _ = stream.set_nodelay(true);
        match self.tls {
            None => self.exchange(stream, body).await,
            Some(connector) => {
                let name = rustls::pki_types::ServerName::try_from(self.target.host.clone())
                    .map_err(|e| format!("TLS name {:?}: {e}", self.target.host))?;
                let stream = connector
                    .connect(name, stream)
                    .await
                    .map_err(|e| format!("TLS: {e}"))?;
                self.exchange(stream, body).await
            }
        }
    }

    /// One POST of `body` over an open connection (plain or TLS).
    async fn exchange<S>(&self, stream: S, body: Vec<u8>) -> Result<(), String>
    where
        S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    {
        let (mut request_sender, connection) =
            hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
                .await
                .map_err(|e| format!("handshake: {e}"))?;
        let driver = tokio::spawn(connection);
        let mut request = axum::http::Request::post(self.target.path.as_str())
            .header(axum::http::header::HOST, self.target.authority.as_str())
            .header(axum::http::header::CONTENT_TYPE, "application/json")
            .header(axum::http::header::CONTENT_LENGTH, body.len())
            .body(Full::new(Bytes::from(body)))
            .map_err(|e| format!("request: {e}"))?;
        for (name, value) in &self.config.headers.0 {
            request.headers_mut().insert(name.clone(), value.clone());
        }
        let response = request_sender
            .send_request(request)
            .await
            .map_err(|e| format!("send: {e}"));
        driver.abort();
        let status = response?.status();
        if status.is_success() {
            Ok(())
        } else {
            Err(format!("the endpoint answered {status}"))
        }
    }
}

/// The TLS client of an `https://` endpoint: the system roots plus `certificate` (PEM), the
/// server's name checked, rustls with ring like every other TLS link of the service.
fn tls_connector(
    certificate: Option<&std::path::Path>,
) -> Result<tokio_rustls::TlsConnector, crate::tls::TlsError> {
    let mut roots = match (crate::tls::system_roots(), certificate) {
        (Ok(roots), _) => roots,
        // Without system roots, the named CA alone is enough.
        (Err(_), Some(_)) => rustls::RootCertStore::empty(),
        (Err(e), None) => return Err(e),
    };
    if let Some(path) = certificate {
        let certs = crate::tls::read_certificates(path, "OTEL_EXPORTER_OTLP_CERTIFICATE")?;
        let (added, _) = roots.add_parsable_certificates(certs);
        if added == 0 {
            return Err(crate::tls::TlsError(format!(
                "OTEL_EXPORTER_OTLP_CERTIFICATE {} holds no usable CA certificate",
                path.display()
            )));
        }
    }
    let config = rustls::ClientConfig::builder_with_provider(crate::tls::provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| crate::tls::TlsError(format!("TLS versions: {e}")))?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(tokio_rustls::TlsConnector::from(Arc::new(config)))
}

fn nanos(t: SystemTime) -> String {
    t.duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos())
        .to_string()
}

fn attributes(list: &[(String, Attr)]) -> Value {
    Value::Array(
        list.iter()
            .map(|(key, value)| {
                let value = match value {
                    Attr::Str(s) => json!({ "stringValue": s }),
                    // OTLP/JSON writes 64-bit integers as strings.
                    Attr::Int(i) => json!({ "intValue": i.to_string() }),
                    Attr::Bool(b) => json!({ "boolValue": b }),
                    Attr::Double(d) => json!({ "doubleValue": d }),
                };
                json!({ "key": key, "value": value })
            })
            .collect(),
    )
}

/// One `ExportTraceServiceRequest` in OTLP/JSON (ids in hex, times as decimal strings).
fn encode(service_name: &str, batch: &[SpanRecord]) -> Vec<u8> {
    let spans: Vec<Value> = batch
        .iter()
        .map(|s| {
            let mut span = json!({
                "traceId": hex(&s.context.trace_id),
                "spanId": hex(&s.context.span_id),
                "name": s.name,
                "kind": s.kind,
                "startTimeUnixNano": nanos(s.start),
                "endTimeUnixNano": nanos(s.end),
                "attributes": attributes(&s.attributes),
                "events": s.events.iter().map(|e| json!({
                    "timeUnixNano": nanos(e.time),
                    "name": e.name,
                    "attributes": attributes(&e.attributes),
                })).collect::<Vec<_>>(),
            });
            if let Some(parent) = &s.context.parent_span_id {
                span["parentSpanId"] = json!(hex(parent));
            }
            if let Some(state) = &s.context.state {
                span["traceState"] = json!(state);
            }
            if let Some(message) = &s.error {
                span["status"] = json!({ "code": 2, "message": message });
            }
            span
        })
        .collect();
    let request = json!({
        "resourceSpans": [{
            "resource": { "attributes": attributes(&[
                ("service.name".to_owned(), Attr::Str(service_name.to_owned())),
                ("telemetry.sdk.name".to_owned(), Attr::Str("prebuilds".to_owned())),
                ("telemetry.sdk.language".to_owned(), Attr::Str("rust".to_owned())),
            ]) },
            "scopeSpans": [{
                "scope": { "name": "prebuilds", "version": env!("CARGO_PKG_VERSION") },
                "spans": spans,
            }],
        }],
    });
    serde_json::to_vec(&request).expect("JSON values serialise")
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn env(pairs: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
        let map: HashMap<String, String> = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        move |k| map.get(k).cloned()
    }

    #[test]
    fn no_endpoint_or_an_empty_one_installs_no_exporter() {
        assert_eq!(OtlpConfig::from_env(env(&[]), "svc").unwrap(), None);
        assert_eq!(
            OtlpConfig::from_env(env(&[("OTEL_EXPORTER_OTLP_ENDPOINT", "")]), "svc").unwrap(),
            None
        );
        assert_eq!(
            OtlpConfig::from_env(
                env(&[
                    ("OTEL_EXPORTER_OTLP_ENDPOINT", " "),
                    ("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "")
                ]),
                "svc"
            )
            .unwrap(),
            None
        );
        assert_eq!(
            OtlpConfig::from_env(
                env(&[
                    ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://collector:4318"),
                    ("OTEL_SDK_DISABLED", "true")
                ]),
                "svc"
            )
            .unwrap(),
            None
        );
        // Nothing above started a thread or set the process's exporter.
        assert!(!installed());
    }

    #[test]
    fn headers_are_parsed_decoded_and_never_shown() {
        let c = OtlpConfig::from_env(
            env(&[
                ("OTEL_EXPORTER_OTLP_ENDPOINT", "https://collector"),
                (
                    "OTEL_EXPORTER_OTLP_HEADERS",
                    "x-api-key=s3cr%3Dt, authorization=Bearer%20tok",
                ),
            ]),
            "x",
        )
        .unwrap()
        .unwrap();
        let pairs: Vec<(String, Vec<u8>)> = c
            .headers
            .0
            .iter()
            .map(|(n, v)| (n.to_string(), v.as_bytes().to_vec()))
            .collect();
        assert_eq!(
            pairs,
            [
                ("x-api-key".to_owned(), b"s3cr=t".to_vec()),
                ("authorization".to_owned(), b"Bearer tok".to_vec())
            ]
        );
        let shown = format!("{c:?}");
        assert!(
            !shown.contains("s3cr") && !shown.contains("tok\""),
            "{shown}"
        );
        // The signal-specific list wins; bad entries are refused without echoing the value.
        for bad in ["novalue", "bad name=1", "k=%zz-secret"] {
            let e = OtlpConfig::from_env(
                env(&[
                    ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://c:1"),
                    ("OTEL_EXPORTER_OTLP_TRACES_HEADERS", bad),
                ]),
                "x",
            )
            .unwrap_err();
            assert!(!e.to_string().contains("secret"), "{e}");
        }
    }

    #[test]
    fn endpoints_follow_the_otel_rules() {
        let c = OtlpConfig::from_env(
            env(&[("OTEL_EXPORTER_OTLP_ENDPOINT", "http://collector:4318/")]),
            "prebuilds-worker",
        )
        .unwrap()
        .unwrap();
        assert_eq!(c.endpoint, "http://collector:4318/v1/traces");
        assert_eq!(c.service_name, "prebuilds-worker");
        assert_eq!(c.schedule_delay, Duration::from_secs(5));
        let c = OtlpConfig::from_env(
            env(&[
                ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://ignored:4318"),
                (
                    "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
                    "http://jaeger:4318/custom",
                ),
                ("OTEL_SERVICE_NAME", "api-eu"),
                ("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc"),
                ("OTEL_BSP_SCHEDULE_DELAY", "200"),
            ]),
            "x",
        )
        .unwrap()
        .unwrap();
        assert_eq!(c.endpoint, "http://jaeger:4318/custom");
        assert_eq!(c.service_name, "api-eu");
        assert_eq!(c.schedule_delay, Duration::from_millis(200));
        assert_eq!(c.warnings.len(), 1);
        let target = Target::parse(&c.endpoint).unwrap();
        assert_eq!(target.authority, "jaeger:4318");
        assert_eq!(target.path, "/custom");
        let secure = Target::parse(
            &OtlpConfig::from_env(env(&[("OTEL_EXPORTER_OTLP_ENDPOINT", "https://x")]), "x")
                .unwrap()
                .unwrap()
                .endpoint,
        )
        .unwrap();
        assert!(secure.tls);
        assert_eq!(
            (secure.authority.as_str(), secure.host.as_str()),
            ("x:443", "x")
        );
        assert!(
            OtlpConfig::from_env(env(&[("OTEL_EXPORTER_OTLP_ENDPOINT", "ftp://x")]), "x").is_err()
        );
        assert!(OtlpConfig::from_env(
            env(&[
                ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://x:1"),
                ("OTEL_BSP_SCHEDULE_DELAY", "soon")
            ]),
            "x"
        )
        .is_err());
    }

    #[test]
    fn the_json_has_hex_ids_parents_and_string_times() {
        let record = SpanRecord {
            context: SpanContext {
                trace_id: [0xab; 16],
                span_id: [0x01; 8],
                parent_span_id: Some([0x02; 8]),
                sampled: true,
                state: None,
            },
            name: "claim".to_owned(),
            kind: 5,
            start: UNIX_EPOCH + Duration::from_secs(1),
            end: UNIX_EPOCH + Duration::from_secs(2),
            attributes: vec![("n".to_owned(), Attr::Int(3))],
            events: vec![],
            error: Some("boom".to_owned()),
        };
        let v: Value = serde_json::from_slice(&encode("svc", &[record])).unwrap();
        let span = &v["resourceSpans"][0]["scopeSpans"][0]["spans"][0];
        assert_eq!(span["traceId"], "ab".repeat(16));
        assert_eq!(span["spanId"], "01".repeat(8));
        assert_eq!(span["parentSpanId"], "02".repeat(8));
        assert_eq!(span["startTimeUnixNano"], "1000000000");
        assert_eq!(span["attributes"][0]["value"]["intValue"], "3");
        assert_eq!(span["status"]["code"], 2);
        assert_eq!(
            v["resourceSpans"][0]["resource"]["attributes"][0]["value"]["stringValue"],
            "svc"
        );
    }
}
