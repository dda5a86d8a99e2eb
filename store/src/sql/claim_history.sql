-- Claims (hits) and misses per preset over the last 5/10/30/60/120 minutes, from the claim request
-- records. Uses the (preset_id, created_at) index. $1 = preset ids, $2 = now.
SELECT preset_id,
       count(*) FILTER (WHERE outcome = 'claimed' AND created_at > $2::timestamptz - interval '5 minutes')                AS claims_5m,
       count(*) FILTER (WHERE outcome = 'no_eligible_prebuild' AND created_at > $2::timestamptz - interval '5 minutes')   AS misses_5m,
       count(*) FILTER (WHERE outcome = 'claimed' AND created_at > $2::timestamptz - interval '10 minutes')               AS claims_10m,
       count(*) FILTER (WHERE outcome = 'no_eligible_prebuild' AND created_at > $2::timestamptz - interval '10 minutes')  AS misses_10m,
       count(*) FILTER (WHERE outcome = 'claimed' AND created_at > $2::timestamptz - interval '30 minutes')               AS claims_30m,
       count(*) FILTER (WHERE outcome = 'no_eligible_prebuild' AND created_at > $2::timestamptz - interval '30 minutes')  AS misses_30m,
       count(*) FILTER (WHERE outcome = 'claimed' AND created_at > $2::timestamptz - interval '60 minutes')               AS claims_60m,
       count(*) FILTER (WHERE outcome = 'no_eligible_prebuild' AND created_at > $2::timestamptz - interval '60 minutes')  AS misses_60m,
       count(*) FILTER (WHERE outcome = 'claimed')                                                           AS claims_120m,
       count(*) FILTER (WHERE outcome = 'no_eligible_prebuild')                                              AS misses_120m
FROM claim_requests
WHERE preset_id = ANY($1)                                -- only the presets asked for
  AND created_at > $2::timestamptz - interval '120 minutes'           -- the widest window
  AND outcome IN ('claimed', 'no_eligible_prebuild')     -- rejections are neither hit nor miss
GROUP BY preset_id
