-- prebuilds: the W3C trace context of the transaction that wrote an outbox row, so the relay
-- publishes the message as part of that trace (README "Tracing"). Both nullable: rows written
-- without a span (or by an older version) carry none, and the relay publishes them without one.
-- Adding nullable columns without a default rewrites nothing and takes its lock only briefly.
SET LOCAL lock_timeout = '10s';
ALTER TABLE outbox ADD COLUMN IF NOT EXISTS traceparent text;
ALTER TABLE outbox ADD COLUMN IF NOT EXISTS tracestate text;
