-- Which platforms a cell serves (created here and not moved away) decides what its MQTT ingest
-- subscribes to (docs/operations.md, "Cells"). Every change to that set is announced on the
-- registry's channel (registry/notifications.py) by the statement that makes it, whatever made
-- it (the API, `iiot platform import`, a move, plain SQL), so running ingest processes follow
-- it without a restart; their periodic re-read is only the backstop.
CREATE FUNCTION iiot_announce_platform() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP = 'DELETE' THEN
        PERFORM pg_notify('iiot_registry', OLD.id);
    ELSE
        PERFORM pg_notify('iiot_registry', NEW.id);
    END IF;
    RETURN NULL;
END
$$;

CREATE TRIGGER platforms_announce_served
    AFTER INSERT OR DELETE OR UPDATE OF moved_to ON platforms
    FOR EACH ROW EXECUTE FUNCTION iiot_announce_platform();
