-- A platform moved to another cell (migration 0032, `iiot platform export --move-to`) stays here
-- as a record of where it went; its counts belong to the new cell from the move on. Every count
-- reads this view (per platform, grouped, national, monitoring, the platform indicators), so
-- leaving moved platforms out here takes them out of all of them at once. The samplers and the
-- penetration pass leave them out in their own statements (registry/history.py, activity.py,
-- penetration.py). Replacing a view's definition with the same columns rewrites nothing.
CREATE OR REPLACE VIEW platform_totals AS
SELECT p.id, p.tier, p.type, p.region, p.industry, p.liveness_seconds,
       coalesce(sum(c.registered), 0)::bigint AS registered,
       coalesce(sum(c.connected), 0)::bigint AS connected,
       coalesce(sum(c.ever_connected), 0)::bigint AS ever_connected,
       coalesce(max(a.active_24h), 0)::bigint AS active_24h,
       coalesce(max(a.active_30d), 0)::bigint AS active_30d,
       max(a.as_of) AS activity_as_of
FROM platforms p
LEFT JOIN platform_counters c ON c.platform_id = p.id
LEFT JOIN platform_activity a ON a.platform_id = p.id
WHERE p.moved_to IS NULL
GROUP BY p.id;
