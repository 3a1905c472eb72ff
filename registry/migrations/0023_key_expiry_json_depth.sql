-- API keys may expire: a key is refused from `expires_at` on (NULL: never). Adding a
-- nullable column without a default rewrites nothing.
ALTER TABLE api_keys ADD COLUMN expires_at timestamptz;

-- The API now refuses JSON documents nesting objects and arrays deeper than 32 levels
-- (api/json_limits.py, MAX_DEPTH). Documents stored before could be nested hundreds of levels,
-- deeper than the API's serializer goes, so every read of them failed. Each object or array
-- found at the 32nd level is replaced by its JSON text (a string): nothing is lost, and the
-- document reads again. Costs one pass over every document (a jsonpath test per row); only
-- rows that break the limit are rewritten.
CREATE FUNCTION iiot_flatten_deep_json(doc jsonb, levels integer) RETURNS jsonb
LANGUAGE plpgsql IMMUTABLE AS $$
BEGIN
    IF jsonb_typeof(doc) NOT IN ('object', 'array') THEN
        RETURN doc;
    ELSIF levels <= 0 THEN
        RETURN to_jsonb(doc::text);
    ELSIF jsonb_typeof(doc) = 'object' THEN
        RETURN coalesce(
            (SELECT jsonb_object_agg(key, iiot_flatten_deep_json(value, levels - 1))
             FROM jsonb_each(doc)),
            '{}'::jsonb);
    END IF;
    RETURN coalesce(
        (SELECT jsonb_agg(iiot_flatten_deep_json(value, levels - 1) ORDER BY n)
         FROM jsonb_array_elements(doc) WITH ORDINALITY AS e(value, n)),
        '[]'::jsonb);
END $$;

UPDATE devices SET metadata = iiot_flatten_deep_json(metadata, 32)
WHERE jsonb_path_exists(metadata, 'strict $.**{32} ? (@.type() == "object" || @.type() == "array")');
UPDATE platforms SET metadata = iiot_flatten_deep_json(metadata, 32)
WHERE jsonb_path_exists(metadata, 'strict $.**{32} ? (@.type() == "object" || @.type() == "array")');
-- The audit log recorded each change's metadata one level down ({"metadata": ...}).
UPDATE audit_log SET detail = iiot_flatten_deep_json(detail, 32)
WHERE jsonb_path_exists(detail, 'strict $.**{32} ? (@.type() == "object" || @.type() == "array")');

DROP FUNCTION iiot_flatten_deep_json(jsonb, integer);
