//! JSON log lines with the trace they belong to: `trace_id` and `span_id` of the event's span (from
//! [`super::ContextLayer`]) as top-level fields, so a log pipeline can jump from a line to its trace
//! and back. Lines outside any span are written as before.

use std::fmt;

use tracing::{Event, Subscriber};
use tracing_subscriber::{
    fmt::{format::Writer, FmtContext, FormatEvent, FormatFields},
    registry::LookupSpan,
};

use super::{hex, SpanContext};

/// Wraps a JSON event format (one object per line) and appends the ids to each object.
#[derive(Debug, Clone)]
pub struct WithTraceIds<E>(pub E);

impl<S, N, E> FormatEvent<S, N> for WithTraceIds<E>
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
    E: FormatEvent<S, N>,
{
    fn format_event(
        &self,
        ctx: &FmtContext<'_, S, N>,
        mut writer: Writer<'_>,
        event: &Event<'_>,
    ) -> fmt::Result {
        let ids = ctx.parent_span().and_then(|span| {
            span.extensions()
                .get::<SpanContext>()
                .map(|c| (hex(&c.trace_id), hex(&c.span_id)))
        });
        let Some((trace_id, span_id)) = ids else {
            return self.0.format_event(ctx, writer, event);
        };
        let mut line = String::with_capacity(256);
        self.0.format_event(ctx, Writer::new(&mut line), event)?;
        let body = line.trim_end();
        match body.strip_suffix('}') {
            Some(open) => {
                let separator = if open.ends_with('{') { "" } else { "," };
                writeln!(
                    writer,
                    "{open}{separator}\"trace_id\":\"{trace_id}\",\"span_id\":\"{span_id}\"}}"
                )
            }
            // Not a JSON object (another format): leave it alone.
            None => writer.write_str(&line),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use tracing_subscriber::{fmt, layer::SubscriberExt, Registry};

    use super::*;
    use crate::tracing_context::{context_of, ContextLayer};

    #[derive(Clone, Default)]
    struct Buffer(Arc<Mutex<Vec<u8>>>);

    impl std::io::Write for Buffer {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn json_lines_carry_the_ids_of_their_span_and_none_outside() {
        let buffer = Buffer::default();
        let writer = buffer.clone();
        let subscriber = Registry::default().with(ContextLayer::default()).with(
            fmt::layer()
                .fmt_fields(fmt::format::JsonFields::new())
                .event_format(WithTraceIds(fmt::format().json().flatten_event(true)))
                .with_writer(move || writer.clone()),
        );
        let expected = tracing::subscriber::with_default(subscriber, || {
            tracing::info!("outside");
            let span = tracing::info_span!("work", preset = 3);
            span.in_scope(|| tracing::info!(n = 1, "inside"));
            context_of(&span).unwrap()
        });
        let text = String::from_utf8(buffer.0.lock().unwrap().clone()).unwrap();
        let lines: Vec<serde_json::Value> = text
            .lines()
            .map(|l| serde_json::from_str(l).expect("each line is JSON"))
            .collect();
        assert_eq!(lines.len(), 2, "{text}");
        assert!(lines[0].get("trace_id").is_none());
        assert_eq!(lines[1]["trace_id"], hex(&expected.trace_id));
        assert_eq!(lines[1]["span_id"], hex(&expected.span_id));
        assert_eq!(lines[1]["message"], "inside");
    }
}
