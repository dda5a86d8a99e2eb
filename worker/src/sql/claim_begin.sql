-- Start of a claim transaction, in one round trip: serialize concurrent deliveries of the same
-- request (advisory lock on its id), read the database clock, and fetch the stored reply of a
-- request already answered. The reply subquery runs after the lock is granted, under the same
-- statement snapshot taken before it; a duplicate that waited on the lock therefore re-reads the
-- reply in the retry path (see claims.rs). $1 lock key, $2 request id.
SELECT pg_advisory_xact_lock($1)                                AS locked,
       clock_timestamp()                                        AS now,
       (SELECT reply FROM claim_requests WHERE request_id = $2) AS reply
