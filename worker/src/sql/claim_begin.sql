-- Start of a claim transaction: serialize concurrent deliveries of the same request (advisory
-- lock on its id) and fetch the stored reply of a request already answered, with the user and
-- request it answered (a reuse of the id for another user or body is refused, not answered). The
-- subqueries use the statement's snapshot, taken before the lock was granted: a duplicate that
-- waited on the lock finds the reply in the claim attempt that follows (`claim_attempt.sql`).
-- $1 lock key, $2 request id.
SELECT pg_advisory_xact_lock($1)                                   AS locked,
       (SELECT reply FROM claim_requests WHERE request_id = $2)    AS reply,
       (SELECT user_id FROM claim_requests WHERE request_id = $2)  AS reply_user_id,
       (SELECT request FROM claim_requests WHERE request_id = $2)  AS reply_request
