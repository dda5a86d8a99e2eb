-- The request's reply, kept so a repeated delivery gets the same answer, with the request it
-- answers (a reuse of the id for something else is refused; unique by request id: a duplicate
-- that raced past the request lock fails here and retries into the stored reply).
-- $1 request, $2 user, $3 preset, $4 outcome, $5 workspace, $6 reply, $7 request data.
INSERT INTO claim_requests (request_id, user_id, preset_id, outcome, workspace_id, reply, request)
VALUES ($1, $2, $3, $4, $5, $6, $7)
