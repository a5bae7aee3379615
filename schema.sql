-- uniphant: every database object the runtime needs.
--
-- Load it with `psql -v ON_ERROR_STOP=1 -f schema.sql` as the role that will
-- own the objects.  Loading it again, or over an older version, is safe and
-- keeps every row.  Everything lives in the schema `public`; the API functions
-- are SECURITY DEFINER with a pinned search_path, so a worker role needs only
-- EXECUTE on them (see the README, "Database privileges").

BEGIN;

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

REVOKE ALL ON public.hosts, public.processes FROM PUBLIC;

-- The process id of the calling session: its application_name.
CREATE OR REPLACE FUNCTION public.uniphant_process_id() RETURNS uuid
LANGUAGE plpgsql STABLE SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    RETURN current_setting('application_name')::uuid;
EXCEPTION WHEN invalid_text_representation THEN
    RAISE EXCEPTION 'application_name "%" is not a uniphant process id',
        current_setting('application_name') USING ERRCODE = 'UN002';
END
$$;

CREATE OR REPLACE FUNCTION public.register_host(host_id uuid, host_name text)
RETURNS void
LANGUAGE sql SECURITY DEFINER SET search_path = public, pg_temp AS $$
    INSERT INTO hosts (id, name) VALUES (host_id, host_name)
    ON CONFLICT (id) DO NOTHING;
$$;

-- Registers the calling session's process for worker_id.  At most one live
-- process per worker: a row of another process is taken over when it is on
-- the same host (the caller holds that host's PID-file lock, so its process
-- is gone), or when its heartbeat is older than stale_after and no session of
-- that process is connected; otherwise the call fails with SQLSTATE UN001.
CREATE OR REPLACE FUNCTION public.register_process(
    worker_id   uuid,
    host_id     uuid DEFAULT NULL,
    worker_type text DEFAULT NULL,
    pid         integer DEFAULT NULL,
    stale_after interval DEFAULT '60 seconds')
RETURNS void
LANGUAGE plpgsql SECURITY DEFINER SET search_path = public, pg_temp AS $$
DECLARE
    me    uuid := uniphant_process_id();
    other processes%ROWTYPE;
    other_host text;
BEGIN
    LOOP
        SELECT * INTO other FROM processes p
        WHERE p.worker_id = register_process.worker_id FOR UPDATE;
        IF NOT FOUND THEN
            INSERT INTO processes (id, worker_id, host_id, worker_type, pid)
            VALUES (me, register_process.worker_id, register_process.host_id,
                    register_process.worker_type, register_process.pid)
            ON CONFLICT DO NOTHING;
            IF FOUND THEN
                RETURN;
            END IF;
            CONTINUE;  -- another session inserted first: look at its row
        END IF;
        IF other.id = me THEN
            RETURN;
        END IF;
        IF other.host_id = register_process.host_id
           OR (other.heartbeat_at < now() - stale_after
               AND NOT EXISTS (SELECT 1 FROM pg_stat_activity a
                               WHERE a.application_name = other.id::text))
        THEN
            DELETE FROM processes p WHERE p.id = other.id;
            CONTINUE;
        END IF;
        SELECT h.name INTO other_host FROM hosts h WHERE h.id = other.host_id;
        RAISE EXCEPTION 'worker % is already running: PID % on host % (%), last heartbeat %',
            register_process.worker_id, other.pid, coalesce(other_host, '?'),
            other.host_id, other.heartbeat_at
            USING ERRCODE = 'UN001';
    END LOOP;
END
$$;

CREATE OR REPLACE FUNCTION public.keepalive() RETURNS boolean
LANGUAGE plpgsql SECURITY DEFINER SET search_path = public, pg_temp AS $$
BEGIN
    UPDATE processes SET heartbeat_at = now()
    WHERE id = uniphant_process_id() AND role = session_user;
    RETURN FOUND;
END
$$;

CREATE OR REPLACE FUNCTION public.disconnect() RETURNS void
LANGUAGE sql SECURITY DEFINER SET search_path = public, pg_temp AS $$
    DELETE FROM processes WHERE id = uniphant_process_id() AND role = session_user;
$$;

-- A deleted row wakes its process at once: it LISTENs on this channel.
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
    public.uniphant_process_id(), public.processes_notify_stop() FROM PUBLIC;

COMMIT;
