-- Lease a batch of unpublished outbox rows for one relay pass.
-- $1 = batch size, $2 = lease length in seconds.
UPDATE outbox o
SET leased_until = now() + make_interval(secs => $2),
    attempts = o.attempts + 1
WHERE o.id IN (
    SELECT id FROM outbox
    WHERE published_at IS NULL                                  -- not yet confirmed by the broker
      AND (leased_until IS NULL OR leased_until < now())        -- no other relay holds it
    ORDER BY id                                                 -- oldest first: keeps causal order
    LIMIT $1
    FOR UPDATE SKIP LOCKED                                      -- concurrent relays take disjoint rows
)
RETURNING o.id, o.message_id, o.routing_key, o.body, o.traceparent, o.tracestate;
