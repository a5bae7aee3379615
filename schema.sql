-- uniphant: every database object the runtime needs.
--
-- Load it with `psql -v ON_ERROR_STOP=1 -f schema.sql` as the role that will
-- own the objects.  Loading it again, or over an older version, is safe and
-- keeps every row and every grant.  Everything lives in the schema `public`;
-- the API functions are SECURITY DEFINER with a pinned search_path, so a
-- worker role needs only EXECUTE on them (see the README, "Database privileges").

BEGIN;

-- The version of these objects; the runtime refuses a database whose version
-- is older than the one it needs, and says to load this file.
CREATE OR REPLACE FUNCTION public.uniphant_schema_version() RETURNS integer
LANGUAGE sql IMMUTABLE AS 'SELECT 2';

CREATE TABLE IF NOT EXISTS public.hosts (
    id            uuid PRIMARY KEY,
    name          text NOT NULL,
    registered_at timestamptz NOT NULL DEFAULT now()
);

-- No index on heartbeat_at and a low fillfactor: the heartbeat UPDATE then
-- stays a HOT update, which writes no index entry.
CREATE TABLE IF NOT EXISTS public.processes (
    id           uuid PRIMARY KEY,
    worker_id    uuid NOT NULL UNIQUE,
    host_id      uuid REFERENCES public.hosts (id),
    worker_type  text,
    pid          integer,
    role         name NOT NULL DEFAULT session_user,
    started_at   timestamptz NOT NULL DEFAULT now(),
    heartbeat_at timestamptz NOT NULL DEFAULT now()
) WITH (fillfactor = 50);

-- Version 2: a row is taken over by the staleness its own process declared,
-- never by the one a caller claims.
ALTER TABLE public.processes
    ADD COLUMN IF NOT EXISTS stale_after interval NOT NULL DEFAULT '60 seconds';
ALTER TABLE public.processes SET (fillfactor = 50);

REVOKE ALL ON public.hosts, public.processes FROM PUBLIC;

-- The process id of the calling session: its application_name.  Checked with
-- a pattern rather than a cast in an EXCEPTION block, which would cost a
-- subtransaction on every heartbeat.
CREATE OR REPLACE FUNCTION public.uniphant_process_id() RETURNS uuid
LANGUAGE plpgsql STABLE SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    name text := current_setting('application_name');
BEGIN
    IF name !~ '^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$' THEN
        RAISE EXCEPTION 'application_name "%" is not a uniphant process id', name
            USING ERRCODE = 'UN002';
    END IF;
    RETURN name::uuid;
END
$$;

CREATE OR REPLACE FUNCTION public.register_host(host_id uuid, host_name text)
RETURNS void
LANGUAGE sql SECURITY DEFINER SET search_path = public, pg_temp AS $$
    INSERT INTO hosts (id, name) VALUES (host_id, host_name)
    ON CONFLICT (id) DO NOTHING;
$$;

-- Whether a session of process_id, logged in as role, is connected.  The role
-- must match: any session may borrow an application_name.
CREATE OR REPLACE FUNCTION public.uniphant_session_exists(process_id uuid, role name)
RETURNS boolean
LANGUAGE sql STABLE SET search_path = pg_catalog, pg_temp AS $$
    SELECT EXISTS (SELECT 1 FROM pg_stat_activity a
                   WHERE a.application_name = process_id::text AND a.usename = role);
$$;

-- Registers the calling session's process for worker_id.  At most one live
-- process per worker.  A row of another process is taken over only when no
-- session of that process is connected, and either
--   * it is of this host and of the caller's role: the caller holds the
--     worker's PID-file lock on this host, so that process is gone; or
--   * its heartbeat is older than the stale_after that process declared.
-- Otherwise the call fails: UN003 when it is this host's own previous process
-- whose session has not ended yet (worth retrying for a moment), else UN001,
-- naming the running process's host and PID.
CREATE OR REPLACE FUNCTION public.register_process(
    worker_id   uuid,
    host_id     uuid DEFAULT NULL,
    worker_type text DEFAULT NULL,
    pid         integer DEFAULT NULL,
    stale_after interval DEFAULT '60 seconds')
RETURNS void
LANGUAGE plpgsql SECURITY DEFINER SET search_path = public, pg_temp AS $$
DECLARE
    me         uuid := uniphant_process_id();
    other      processes%ROWTYPE;
    other_host text;
    own        boolean;
    connected  boolean;
BEGIN
    IF register_process.stale_after IS NULL OR register_process.stale_after < interval '3 seconds' THEN
        RAISE EXCEPTION 'stale_after must be at least 3 seconds' USING ERRCODE = '22023';
    END IF;
    SELECT * INTO other FROM processes p WHERE p.id = me;
    IF FOUND AND other.worker_id <> register_process.worker_id THEN
        RAISE EXCEPTION 'this session''s process already runs worker %', other.worker_id
            USING ERRCODE = 'UN004';
    END IF;
    -- Each pass either returns, raises, or removes a row that is gone for
    -- good; three passes are more than any interleaving of starts needs.
    FOR attempt IN 1..3 LOOP
        SELECT * INTO other FROM processes p
        WHERE p.worker_id = register_process.worker_id FOR UPDATE;
        IF NOT FOUND THEN
            INSERT INTO processes (id, worker_id, host_id, worker_type, pid, stale_after)
            VALUES (me, register_process.worker_id, register_process.host_id,
                    register_process.worker_type, register_process.pid,
                    register_process.stale_after)
            ON CONFLICT DO NOTHING;
            IF FOUND THEN
                RETURN;
            END IF;
            CONTINUE;  -- another session inserted first: look at its row
        END IF;
        IF other.id = me THEN
            RETURN;
        END IF;
        own := other.host_id = register_process.host_id AND other.role = session_user;
        connected := uniphant_session_exists(other.id, other.role);
        IF NOT connected AND (own OR other.heartbeat_at < now() - other.stale_after) THEN
            DELETE FROM processes p WHERE p.id = other.id;
            CONTINUE;
        END IF;
        SELECT h.name INTO other_host FROM hosts h WHERE h.id = other.host_id;
        RAISE EXCEPTION 'worker % is already running: PID % on host %',
            register_process.worker_id, coalesce(other.pid::text, '?'),
            coalesce(other_host, '?')
            USING ERRCODE = CASE WHEN own THEN 'UN003' ELSE 'UN001' END;
    END LOOP;
    RAISE EXCEPTION 'worker % changed hands too often while registering; try again',
        register_process.worker_id USING ERRCODE = 'UN001';
END
$$;

-- Records a heartbeat; false when the caller's row is gone.  Writes at most
-- once a second per row, however often it is called: a stream of calls
-- (a worker confirming each notification it receives, say) costs reads only.
CREATE OR REPLACE FUNCTION public.keepalive() RETURNS boolean
LANGUAGE plpgsql SECURITY DEFINER SET search_path = public, pg_temp AS $$
DECLARE
    me uuid := uniphant_process_id();
BEGIN
    UPDATE processes SET heartbeat_at = now()
    WHERE id = me AND role = session_user AND heartbeat_at < now() - interval '1 second';
    IF FOUND THEN
        RETURN true;
    END IF;
    RETURN EXISTS (SELECT 1 FROM processes WHERE id = me AND role = session_user);
END
$$;

CREATE OR REPLACE FUNCTION public.disconnect() RETURNS void
LANGUAGE plpgsql SECURITY DEFINER SET search_path = public, pg_temp AS $$
DECLARE
    me uuid := uniphant_process_id();
BEGIN
    DELETE FROM processes WHERE id = me AND role = session_user;
END
$$;

-- A deleted row wakes its process at once: it LISTENs on this channel.  Any
-- role can NOTIFY any channel, so the process treats this as a hint and asks
-- keepalive() before it stops.
CREATE OR REPLACE FUNCTION public.processes_notify_stop() RETURNS trigger
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    PERFORM pg_notify('uniphant_' || replace(OLD.id::text, '-', ''), 'stop');
    RETURN OLD;
END
$$;

DROP TRIGGER IF EXISTS processes_notify_stop ON public.processes;
CREATE TRIGGER processes_notify_stop AFTER DELETE ON public.processes
    FOR EACH ROW EXECUTE FUNCTION public.processes_notify_stop();

REVOKE ALL ON FUNCTION public.register_host(uuid, text),
    public.register_process(uuid, uuid, text, integer, interval),
    public.keepalive(), public.disconnect(),
    public.uniphant_process_id(), public.uniphant_session_exists(uuid, name),
    public.processes_notify_stop() FROM PUBLIC;
GRANT EXECUTE ON FUNCTION public.uniphant_schema_version() TO PUBLIC;

COMMIT;
