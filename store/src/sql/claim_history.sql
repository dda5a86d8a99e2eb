-- Claims (hits) and misses per preset over the last 5/10/30/60/120 time units (a unit is a minute
-- in production; tests shorten it), from the claim request records. Uses the (preset_id,
-- created_at) index. $1 = preset ids, $2 = now, $3 = the time unit.
SELECT preset_id,
       count(*) FILTER (WHERE outcome = 'claimed' AND created_at > $2::timestamptz - 5 * $3::text::interval)                AS claims_5m,
       count(*) FILTER (WHERE outcome = 'no_eligible_prebuild' AND created_at > $2::timestamptz - 5 * $3::text::interval)   AS misses_5m,
       count(*) FILTER (WHERE outcome = 'claimed' AND created_at > $2::timestamptz - 10 * $3::text::interval)               AS claims_10m,
       count(*) FILTER (WHERE outcome = 'no_eligible_prebuild' AND created_at > $2::timestamptz - 10 * $3::text::interval)  AS misses_10m,
       count(*) FILTER (WHERE outcome = 'claimed' AND created_at > $2::timestamptz - 30 * $3::text::interval)               AS claims_30m,
       count(*) FILTER (WHERE outcome = 'no_eligible_prebuild' AND created_at > $2::timestamptz - 30 * $3::text::interval)  AS misses_30m,
       count(*) FILTER (WHERE outcome = 'claimed' AND created_at > $2::timestamptz - 60 * $3::text::interval)               AS claims_60m,
       count(*) FILTER (WHERE outcome = 'no_eligible_prebuild' AND created_at > $2::timestamptz - 60 * $3::text::interval)  AS misses_60m,
       count(*) FILTER (WHERE outcome = 'claimed')                                                                    AS claims_120m,
       count(*) FILTER (WHERE outcome = 'no_eligible_prebuild')                                                       AS misses_120m
FROM claim_requests
WHERE preset_id = ANY($1)                                        -- only the presets asked for
  AND created_at > $2::timestamptz - 120 * $3::text::interval          -- the widest window
  AND created_at <= $2::timestamptz                              -- nothing from after now
  AND outcome IN ('claimed', 'no_eligible_prebuild')             -- rejections are neither hit nor miss
GROUP BY preset_id
