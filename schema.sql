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
LANGUAGE sql IMMUTABLE AS 'SELECT 3';

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
-- never by the one a caller claims; a process that reaches the server through
-- a transaction pooler (pooled) has no session of its own, so only its
-- heartbeat says whether it lives.
ALTER TABLE public.processes
    ADD COLUMN IF NOT EXISTS stale_after interval NOT NULL DEFAULT '60 seconds',
    ADD COLUMN IF NOT EXISTS pooled boolean NOT NULL DEFAULT false;
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
-- session of that process is connected (a pooled process has none), and either
--   * it is of this host and of the caller's role, and the caller has found
--     its PID gone on this host (gone_pid): it holds the worker's PID-file
--     lock, and a removed pid/ directory cannot fool that check; or
--   * its heartbeat is older than the stale_after that process declared.
-- Otherwise the call fails: UN003 when it is this host's own previous process
-- (DETAIL: its PID, for the caller to look at; worth retrying for a moment
-- while its process or session ends), else UN001, naming the running
-- process's host and PID.  stale_after is from 3 seconds to a day.
CREATE OR REPLACE FUNCTION public.register_process(
    worker_id   uuid,
    host_id     uuid DEFAULT NULL,
    worker_type text DEFAULT NULL,
    pid         integer DEFAULT NULL,
    stale_after interval DEFAULT '60 seconds',
    pooled      boolean DEFAULT false,
    gone_pid    integer DEFAULT NULL)
RETURNS void
LANGUAGE plpgsql SECURITY DEFINER SET search_path = public, pg_temp SET enable_seqscan = off AS $$
DECLARE
    me         uuid := uniphant_process_id();
    other      processes%ROWTYPE;
    other_host text;
    own        boolean;
    connected  boolean;
BEGIN
    IF register_process.stale_after IS NULL OR register_process.stale_after < interval '3 seconds'
       OR register_process.stale_after > interval '1 day' THEN
        RAISE EXCEPTION 'stale_after must be from 3 seconds to a day' USING ERRCODE = '22023';
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
            INSERT INTO processes (id, worker_id, host_id, worker_type, pid, stale_after, pooled)
            VALUES (me, register_process.worker_id, register_process.host_id,
                    register_process.worker_type, register_process.pid,
                    register_process.stale_after, coalesce(register_process.pooled, false))
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
        connected := NOT other.pooled AND uniphant_session_exists(other.id, other.role);
        IF NOT connected AND ((own AND other.pid = register_process.gone_pid)
                              OR other.heartbeat_at < now() - other.stale_after) THEN
            DELETE FROM processes p WHERE p.id = other.id;
            CONTINUE;
        END IF;
        SELECT h.name INTO other_host FROM hosts h WHERE h.id = other.host_id;
        RAISE EXCEPTION 'worker % is already running: PID % on host %',
            register_process.worker_id, coalesce(other.pid::text, '?'),
            coalesce(other_host, '?')
            USING ERRCODE = CASE WHEN own THEN 'UN003' ELSE 'UN001' END,
                  DETAIL = coalesce(other.pid::text, '');
    END LOOP;
    RAISE EXCEPTION 'worker % changed hands too often while registering; try again',
        register_process.worker_id USING ERRCODE = 'UN001';
END
$$;

-- Version 2 gave register_process two parameters: whoever could execute the
-- version 1 function can execute this one, and the old one goes.
DO $$
DECLARE
    old regprocedure := to_regprocedure('public.register_process(uuid, uuid, text, integer, interval)');
    grantee name;
BEGIN
    IF old IS NULL THEN
        RETURN;
    END IF;
    FOR grantee IN
        SELECT coalesce(r.rolname, 'PUBLIC')
        FROM pg_proc p, aclexplode(p.proacl) a LEFT JOIN pg_roles r ON r.oid = a.grantee
        WHERE p.oid = old AND a.privilege_type = 'EXECUTE'
    LOOP
        EXECUTE format('GRANT EXECUTE ON FUNCTION public.register_process(uuid, uuid, text, '
                       'integer, interval, boolean, integer) TO %s',
                       CASE WHEN grantee = 'PUBLIC' THEN 'PUBLIC' ELSE quote_ident(grantee) END);
    END LOOP;
    EXECUTE 'DROP FUNCTION ' || old;
END
$$;

-- Records a heartbeat; false when the caller's row is gone.  Writes at most
-- once a second per row, however often it is called: a stream of calls
-- (a worker confirming each notification it receives, say) costs reads only.
--
-- The heartbeat's commit does not wait for its WAL to reach disk
-- (synchronous_commit off, for this transaction only: the runtime sends
-- keepalive() on its own).  A crash of the server may lose the last
-- heartbeat of a process, which then looks one heartbeat period older than it
-- is.  That is harmless: a process counts its lease from the heartbeat before
-- its last one, which the WAL writer has flushed long since (it flushes every
-- wal_writer_delay, 200 ms by default; heartbeats are at least a second apart).
--
-- Each statement here finds its row by its primary key whatever the
-- statistics say (enable_seqscan off): with few rows, or statistics taken
-- while the table was empty, the planner would otherwise scan the table.
CREATE OR REPLACE FUNCTION public.keepalive() RETURNS boolean
LANGUAGE plpgsql SECURITY DEFINER SET search_path = public, pg_temp SET enable_seqscan = off AS $$
DECLARE
    me uuid := uniphant_process_id();
BEGIN
    PERFORM set_config('synchronous_commit', 'off', true);
    UPDATE processes SET heartbeat_at = now()
    WHERE id = me AND role = session_user AND heartbeat_at < now() - interval '1 second';
    IF FOUND THEN
        RETURN true;
    END IF;
    RETURN EXISTS (SELECT 1 FROM processes WHERE id = me AND role = session_user);
END
$$;

-- Removes the caller's row.  Like a heartbeat, it does not wait for the disk:
-- a removal lost in a crash of the server leaves a row whose process has gone,
-- which the next start takes over.
CREATE OR REPLACE FUNCTION public.disconnect() RETURNS void
LANGUAGE plpgsql SECURITY DEFINER SET search_path = public, pg_temp SET enable_seqscan = off AS $$
DECLARE
    me uuid := uniphant_process_id();
BEGIN
    PERFORM set_config('synchronous_commit', 'off', true);
    DELETE FROM processes WHERE id = me AND role = session_user;
END
$$;

-- A deleted row wakes its process at once: it LISTENs on this channel.  Any
-- role can NOTIFY any channel, so the process treats this as a hint and asks
-- keepalive() before it stops.  A process that removes its own row as it
-- leaves needs no word: every NOTIFY takes a lock that commits queue for, and
-- hundreds of workers stopping at once would queue on it.
CREATE OR REPLACE FUNCTION public.processes_notify_stop() RETURNS trigger
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    IF OLD.id::text IS DISTINCT FROM current_setting('application_name') THEN
        PERFORM pg_notify('uniphant_' || replace(OLD.id::text, '-', ''), 'stop');
    END IF;
    RETURN OLD;
END
$$;

DROP TRIGGER IF EXISTS processes_notify_stop ON public.processes;
CREATE TRIGGER processes_notify_stop AFTER DELETE ON public.processes
    FOR EACH ROW EXECUTE FUNCTION public.processes_notify_stop();

-- ---------------------------------------------------------------------------
-- Fleet control (README, "The fleet"): what should run (workers), the managers
-- that make it so, one per host, and what happened (worker_states).
-- ---------------------------------------------------------------------------

-- Desired state: a row present means "keep it running".  host_id NULL: any
-- host whose manager has the worker's script.
CREATE TABLE IF NOT EXISTS public.workers (
    worker_id   uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    worker_type text NOT NULL CHECK (worker_type ~ '^[A-Za-z0-9_-]+(\.[A-Za-z0-9_-]+)*$'),
    host_id     uuid,
    added_at    timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX IF NOT EXISTS workers_worker_type ON public.workers (worker_type);

-- The manager of each host: a uniphant process of its own.
CREATE TABLE IF NOT EXISTS public.managers (
    host_id    uuid PRIMARY KEY,
    process_id uuid NOT NULL,
    started_at timestamptz NOT NULL DEFAULT now()
);

-- What the managers did, written on change only.  host_id: the host whose
-- manager is responsible for the worker (NULL: nobody yet).
CREATE TABLE IF NOT EXISTS public.worker_states (
    worker_id     uuid PRIMARY KEY,
    host_id       uuid,
    state         text NOT NULL,
    pid           integer,
    since         timestamptz NOT NULL DEFAULT now(),
    restarts      integer NOT NULL DEFAULT 0,
    last_exit     text,
    next_start_at timestamptz
);

REVOKE ALL ON public.workers, public.managers, public.worker_states FROM PUBLIC;

-- Whether a process row belongs to a live process: a fresh heartbeat, or a
-- connected session (a process busy in one long call is slow, not dead).  No
-- SET clause and qualified names: the planner inlines it into its callers.
CREATE OR REPLACE FUNCTION public.uniphant_process_live(p public.processes)
RETURNS boolean
LANGUAGE sql STABLE AS $$
    SELECT p.heartbeat_at OPERATOR(pg_catalog.>=) (pg_catalog.now() OPERATOR(pg_catalog.-) p.stale_after)
        OR (NOT p.pooled AND public.uniphant_session_exists(p.id, p.role));
$$;

CREATE OR REPLACE FUNCTION public.uniphant_notify_fleet() RETURNS trigger
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    PERFORM pg_notify('uniphant_fleet', '');
    RETURN NULL;
END
$$;

DROP TRIGGER IF EXISTS workers_notify_fleet ON public.workers;
CREATE TRIGGER workers_notify_fleet AFTER INSERT OR UPDATE OR DELETE ON public.workers
    FOR EACH STATEMENT EXECUTE FUNCTION public.uniphant_notify_fleet();

-- The managers hear of a deleted process row of a wanted worker when one of
-- them has something to do: its own manager, if another session removed it
-- (restart_worker(); behind a pooler the worker hears nothing itself), or
-- the manager that waits to start it on another host.  A worker that leaves
-- by itself, or that nobody wants any more, is its own manager's business.
CREATE OR REPLACE FUNCTION public.processes_notify_fleet() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = public, pg_temp AS $$
BEGIN
    IF EXISTS (SELECT 1 FROM gone g JOIN workers w ON w.worker_id = g.worker_id
               LEFT JOIN worker_states s ON s.worker_id = g.worker_id
               WHERE g.id::text IS DISTINCT FROM current_setting('application_name')
                  OR s.host_id IS DISTINCT FROM g.host_id) THEN
        PERFORM pg_notify('uniphant_fleet', '');
    END IF;
    RETURN NULL;
END
$$;

DROP TRIGGER IF EXISTS processes_notify_fleet ON public.processes;
CREATE TRIGGER processes_notify_fleet AFTER DELETE ON public.processes
    REFERENCING OLD TABLE AS gone
    FOR EACH STATEMENT EXECUTE FUNCTION public.processes_notify_fleet();

-- Makes the calling process (registered with register_process) the manager of
-- host_id.  Refuses (UN005), naming it, while the host's manager is live: its
-- session is connected, or its heartbeat is fresh and it is of another role
-- (a new manager of the same role holds the root's manager lock, so the old
-- one is gone: the rule of register_process).
CREATE OR REPLACE FUNCTION public.register_manager(host_id uuid) RETURNS void
LANGUAGE plpgsql SECURITY DEFINER SET search_path = public, pg_temp AS $$
DECLARE
    me     uuid := uniphant_process_id();
    holder processes%ROWTYPE;
BEGIN
    IF NOT EXISTS (SELECT 1 FROM processes p WHERE p.id = me AND p.role = session_user
                   AND p.host_id = register_manager.host_id) THEN
        RAISE EXCEPTION 'register this process on host % first', register_manager.host_id
            USING ERRCODE = 'UN006';
    END IF;
    SELECT p.* INTO holder FROM managers m JOIN processes p ON p.id = m.process_id
    WHERE m.host_id = register_manager.host_id AND p.id <> me FOR UPDATE OF m;
    IF FOUND AND ((NOT holder.pooled AND uniphant_session_exists(holder.id, holder.role))
                  OR (holder.role <> session_user AND uniphant_process_live(holder))) THEN
        RAISE EXCEPTION 'a manager already runs on this host: worker %, PID %',
            holder.worker_id, holder.pid USING ERRCODE = 'UN005';
    END IF;
    INSERT INTO managers (host_id, process_id) VALUES (register_manager.host_id, me)
    ON CONFLICT ON CONSTRAINT managers_pkey
    DO UPDATE SET process_id = EXCLUDED.process_id, started_at = now();
    PERFORM pg_notify('uniphant_fleet', '');
END
$$;

-- What the manager of host_id should run now (wanted): the workers pinned to
-- it and its share of the any-host workers; and (not wanted) the live
-- processes on its host of managed workers that should run elsewhere or not
-- at all.  Placement happens here, one manager at a time (an advisory lock),
-- and writes only when it changes:
--   * a claim of a host without a live manager goes back to the pool, unless
--     the worker still runs there;
--   * a manager holds at most its fair share, ceil(pool / live managers):
--     above it, it gives workers back; below it, it claims unplaced ones;
--   * the states of workers that are gone from this host and from `workers`
--     are dropped.
-- startable is false while a live copy of the worker runs elsewhere (it is
-- moving); running_pid is the PID of its live process on this host, if any.
CREATE OR REPLACE FUNCTION public.manager_plan(host_id uuid)
RETURNS TABLE (worker_id uuid, worker_type text, wanted boolean, startable boolean,
               running_pid integer, restarts integer)
LANGUAGE plpgsql SECURITY DEFINER SET search_path = public, pg_temp AS $$
#variable_conflict use_column
DECLARE
    me     uuid := uniphant_process_id();
    here   uuid := manager_plan.host_id;
    live   uuid[];
    pool   integer;
    target integer;
    mine   integer;
BEGIN
    PERFORM pg_advisory_xact_lock(hashtext('uniphant.manager_plan'));
    IF NOT EXISTS (SELECT 1 FROM managers m JOIN processes p ON p.id = m.process_id
                   WHERE m.host_id = here AND p.id = me AND p.role = session_user) THEN
        RAISE EXCEPTION 'this session is not the manager of host %', here USING ERRCODE = 'UN006';
    END IF;
    live := ARRAY(SELECT m.host_id FROM managers m JOIN processes p ON p.id = m.process_id
                  WHERE uniphant_process_live(p));
    UPDATE worker_states s
    SET host_id = NULL, state = 'unplaced', pid = NULL, since = now(), next_start_at = NULL
    FROM workers w
    WHERE w.worker_id = s.worker_id AND w.host_id IS NULL
      AND s.host_id IS NOT NULL AND NOT s.host_id = ANY (live)
      AND NOT EXISTS (SELECT 1 FROM processes p
                      WHERE p.worker_id = s.worker_id AND uniphant_process_live(p));
    SELECT count(*) INTO pool FROM workers w LEFT JOIN worker_states s ON s.worker_id = w.worker_id
    WHERE w.host_id IS NULL AND (s.host_id IS NULL OR s.host_id = ANY (live));
    target := ceil(pool::numeric / greatest(cardinality(live), 1));
    SELECT count(*) INTO mine FROM workers w JOIN worker_states s ON s.worker_id = w.worker_id
    WHERE w.host_id IS NULL AND s.host_id = here;
    IF mine > target THEN
        UPDATE worker_states s SET host_id = NULL, state = 'unplaced', pid = NULL, since = now(),
                                   next_start_at = NULL
        WHERE s.worker_id IN (
            SELECT s2.worker_id FROM worker_states s2 JOIN workers w ON w.worker_id = s2.worker_id
            WHERE w.host_id IS NULL AND s2.host_id = here
            ORDER BY s2.state = 'running', s2.since DESC LIMIT mine - target);
        PERFORM pg_notify('uniphant_fleet', '');
    ELSIF mine < target THEN
        INSERT INTO worker_states AS s (worker_id, host_id, state)
        SELECT w.worker_id, here, 'starting' FROM workers w
        LEFT JOIN worker_states s2 ON s2.worker_id = w.worker_id
        WHERE w.host_id IS NULL AND s2.host_id IS NULL
        ORDER BY w.added_at, w.worker_id LIMIT target - mine
        ON CONFLICT ON CONSTRAINT worker_states_pkey
        DO UPDATE SET host_id = EXCLUDED.host_id, state = 'starting', since = now();
    END IF;
    DELETE FROM worker_states s
    WHERE s.host_id = here AND NOT EXISTS (SELECT 1 FROM workers w WHERE w.worker_id = s.worker_id)
      AND NOT EXISTS (SELECT 1 FROM processes p WHERE p.worker_id = s.worker_id AND p.host_id = here);
    RETURN QUERY
    WITH planned AS (
        SELECT w.worker_id, w.worker_type, coalesce(s.restarts, 0) AS restarts
        FROM workers w LEFT JOIN worker_states s ON s.worker_id = w.worker_id
        WHERE w.host_id = here OR (w.host_id IS NULL AND s.host_id = here))
    SELECT pl.worker_id, pl.worker_type, true,
           NOT EXISTS (SELECT 1 FROM processes p WHERE p.worker_id = pl.worker_id
                       AND p.host_id IS DISTINCT FROM here AND uniphant_process_live(p)),
           (SELECT p.pid FROM processes p WHERE p.worker_id = pl.worker_id
            AND p.host_id = here AND uniphant_process_live(p)),
           pl.restarts
    FROM planned pl
    UNION ALL
    SELECT p.worker_id, p.worker_type, false, false, p.pid, 0
    FROM processes p
    WHERE p.host_id = here AND uniphant_process_live(p)
      AND p.id NOT IN (SELECT m.process_id FROM managers m)
      AND (EXISTS (SELECT 1 FROM workers w WHERE w.worker_id = p.worker_id)
           OR EXISTS (SELECT 1 FROM worker_states s WHERE s.worker_id = p.worker_id))
      AND NOT EXISTS (SELECT 1 FROM planned pl WHERE pl.worker_id = p.worker_id);
END
$$;

-- A manager records what happened to a worker it is responsible for (state
-- NULL: it forgets the worker, which it no longer runs).
CREATE OR REPLACE FUNCTION public.report_worker(
    worker_id uuid, state text, pid integer DEFAULT NULL, restarts integer DEFAULT 0,
    last_exit text DEFAULT NULL, next_start_in double precision DEFAULT NULL)
RETURNS void
LANGUAGE plpgsql SECURITY DEFINER SET search_path = public, pg_temp AS $$
#variable_conflict use_column
DECLARE
    me   uuid := uniphant_process_id();
    here uuid;
BEGIN
    SELECT m.host_id INTO here FROM managers m JOIN processes p ON p.id = m.process_id
    WHERE p.id = me AND p.role = session_user;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'this session is not a manager' USING ERRCODE = 'UN006';
    END IF;
    IF report_worker.state IS NULL THEN
        DELETE FROM worker_states s WHERE s.worker_id = report_worker.worker_id AND s.host_id = here;
        RETURN;
    END IF;
    INSERT INTO worker_states AS s (worker_id, host_id, state, pid, restarts, last_exit, next_start_at)
    VALUES (report_worker.worker_id, here, report_worker.state, report_worker.pid,
            report_worker.restarts, left(report_worker.last_exit, 500),
            now() + make_interval(secs => report_worker.next_start_in))
    ON CONFLICT ON CONSTRAINT worker_states_pkey DO UPDATE
    SET state = EXCLUDED.state, pid = EXCLUDED.pid, restarts = EXCLUDED.restarts,
        last_exit = EXCLUDED.last_exit, next_start_at = EXCLUDED.next_start_at,
        since = CASE WHEN s.state = EXCLUDED.state THEN s.since ELSE now() END
    WHERE s.host_id IS NULL OR s.host_id = here;
END
$$;

-- The operators' API: change what should run.  Each is one statement, so
-- the managers learn of it by one notification.
CREATE OR REPLACE FUNCTION public.add_worker(worker_type text, host_id uuid DEFAULT NULL)
RETURNS uuid
LANGUAGE sql SECURITY DEFINER SET search_path = public, pg_temp AS $$
    INSERT INTO workers (worker_type, host_id) VALUES (add_worker.worker_type, add_worker.host_id)
    RETURNING worker_id;
$$;

-- Makes n the number of workers of worker_type on host_id (NULL: any-host
-- workers); returns how many it added (negative: removed).  Removes workers
-- that do not run first, then the newest.
CREATE OR REPLACE FUNCTION public.scale(worker_type text, n integer, host_id uuid DEFAULT NULL)
RETURNS integer
LANGUAGE plpgsql SECURITY DEFINER SET search_path = public, pg_temp AS $$
#variable_conflict use_column
DECLARE
    now_there integer;
BEGIN
    IF n IS NULL OR n < 0 OR n > 100000 THEN
        RAISE EXCEPTION 'n must be from 0 to 100000' USING ERRCODE = '22023';
    END IF;
    PERFORM pg_advisory_xact_lock(hashtext('uniphant.scale'));
    SELECT count(*) INTO now_there FROM workers w
    WHERE w.worker_type = scale.worker_type AND w.host_id IS NOT DISTINCT FROM scale.host_id;
    IF n > now_there THEN
        INSERT INTO workers (worker_type, host_id)
        SELECT scale.worker_type, scale.host_id FROM generate_series(1, n - now_there);
    ELSIF n < now_there THEN
        DELETE FROM workers w WHERE w.worker_id IN (
            SELECT w2.worker_id FROM workers w2
            WHERE w2.worker_type = scale.worker_type AND w2.host_id IS NOT DISTINCT FROM scale.host_id
            ORDER BY EXISTS (SELECT 1 FROM processes p WHERE p.worker_id = w2.worker_id),
                     w2.added_at DESC
            LIMIT now_there - n);
    END IF;
    RETURN n - now_there;
END
$$;

CREATE OR REPLACE FUNCTION public.remove_worker(worker_id uuid) RETURNS boolean
LANGUAGE plpgsql SECURITY DEFINER SET search_path = public, pg_temp AS $$
BEGIN
    DELETE FROM workers w WHERE w.worker_id = remove_worker.worker_id;
    RETURN FOUND;
END
$$;

CREATE OR REPLACE FUNCTION public.remove_workers(worker_type text) RETURNS integer
LANGUAGE sql SECURITY DEFINER SET search_path = public, pg_temp AS $$
    WITH gone AS (DELETE FROM workers w WHERE w.worker_type = remove_workers.worker_type
                  RETURNING 1)
    SELECT count(*)::integer FROM gone;
$$;

-- A restart ends the worker's process (its row deleted): its manager starts
-- it again at once, without backoff.
CREATE OR REPLACE FUNCTION public.restart_worker(worker_id uuid) RETURNS boolean
LANGUAGE plpgsql SECURITY DEFINER SET search_path = public, pg_temp AS $$
BEGIN
    DELETE FROM processes p WHERE p.worker_id = restart_worker.worker_id
        AND EXISTS (SELECT 1 FROM workers w WHERE w.worker_id = restart_worker.worker_id);
    RETURN FOUND;
END
$$;

CREATE OR REPLACE FUNCTION public.restart_workers(worker_type text) RETURNS integer
LANGUAGE sql SECURITY DEFINER SET search_path = public, pg_temp AS $$
    WITH gone AS (DELETE FROM processes p USING workers w
                  WHERE w.worker_id = p.worker_id AND w.worker_type = restart_workers.worker_type
                  RETURNING 1)
    SELECT count(*)::integer FROM gone;
$$;

-- One row per desired worker, what it is doing and why its last run ended;
-- then every process that no desired worker accounts for (managers, workers
-- started by hand, workers that are being stopped).
CREATE OR REPLACE VIEW public.fleet AS
WITH live AS (
    SELECT p.*, p.heartbeat_at >= now() - p.stale_after
                OR (NOT p.pooled AND EXISTS (SELECT 1 FROM pg_stat_activity a
                                             WHERE a.application_name = p.id::text
                                               AND a.usename = p.role)) AS live
    FROM processes p
), live_hosts AS (
    SELECT m.host_id FROM managers m JOIN live p ON p.id = m.process_id WHERE p.live
)
SELECT w.worker_id, w.worker_type,
       CASE
           WHEN s.host_id IN (SELECT host_id FROM live_hosts) THEN s.state
           WHEN p.live THEN 'running unsupervised'
           WHEN w.host_id IS NOT NULL THEN 'waiting for its host'
           ELSE 'unplaced'
       END AS state,
       coalesce(hp.name, hs.name, hw.name) AS host,
       coalesce(p.host_id, s.host_id, w.host_id) AS host_id,
       w.host_id IS NOT NULL AS pinned,
       p.pid, coalesce(s.since, p.started_at) AS since, coalesce(s.restarts, 0) AS restarts,
       s.last_exit, s.next_start_at, p.heartbeat_at
FROM workers w
LEFT JOIN worker_states s ON s.worker_id = w.worker_id
LEFT JOIN live p ON p.worker_id = w.worker_id
LEFT JOIN hosts hp ON hp.id = p.host_id
LEFT JOIN hosts hs ON hs.id = s.host_id
LEFT JOIN hosts hw ON hw.id = w.host_id
UNION ALL
SELECT p.worker_id, p.worker_type,
       CASE WHEN m.host_id IS NOT NULL THEN 'manager' ELSE 'not wanted' END,
       h.name, p.host_id, false, p.pid, p.started_at, 0, NULL, NULL, p.heartbeat_at
FROM live p
LEFT JOIN hosts h ON h.id = p.host_id
LEFT JOIN managers m ON m.process_id = p.id
WHERE NOT EXISTS (SELECT 1 FROM workers w WHERE w.worker_id = p.worker_id);

REVOKE ALL ON public.fleet FROM PUBLIC;

REVOKE ALL ON FUNCTION public.register_host(uuid, text),
    public.register_process(uuid, uuid, text, integer, interval, boolean, integer),
    public.keepalive(), public.disconnect(),
    public.uniphant_process_id(), public.uniphant_session_exists(uuid, name),
    public.processes_notify_stop(), public.uniphant_process_live(public.processes),
    public.uniphant_notify_fleet(), public.processes_notify_fleet(),
    public.register_manager(uuid), public.manager_plan(uuid),
    public.report_worker(uuid, text, integer, integer, text, double precision),
    public.add_worker(text, uuid), public.scale(text, integer, uuid),
    public.remove_worker(uuid), public.remove_workers(text),
    public.restart_worker(uuid), public.restart_workers(text) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION public.uniphant_schema_version() TO PUBLIC;

-- ---------------------------------------------------------------------------
-- High availability (version 3; README, "PostgreSQL high availability"): the
-- generation of the server a session reached, so that a process can refuse an
-- old primary that comes back writable after a failover.
-- ---------------------------------------------------------------------------

-- The cluster's system identifier (the same on a primary and on every standby
-- cloned from it) and the server's current timeline, which a promotion raises.
-- On a primary the timeline is the one of the WAL it writes now: the latest
-- checkpoint's timeline_id lags behind a promotion until the first checkpoint
-- on the new timeline completes.  pg_walfile_name() fails during recovery, so a
-- standby answers the newest timeline it knows of: that of the WAL it has
-- received (visible to an owner who may read all statistics), else that of its
-- latest restartpoint; both may lag, never lead.  SECURITY DEFINER, so that a
-- worker role needs no privilege on pg_control_* or the statistics.  SQL, not
-- PL/pgSQL: every process calls it once per session, and PL/pgSQL would
-- compile it in each (1 ms of the 2 that a call cost).
CREATE OR REPLACE FUNCTION public.uniphant_server_generation(OUT system_identifier bigint,
                                                            OUT timeline bigint)
LANGUAGE sql VOLATILE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
    SELECT (pg_catalog.pg_control_system()).system_identifier,
           CASE WHEN pg_catalog.pg_is_in_recovery()
                THEN GREATEST((SELECT r.received_tli FROM pg_catalog.pg_stat_wal_receiver r),
                              (pg_catalog.pg_control_checkpoint()).timeline_id)
                ELSE ('x' OPERATOR(pg_catalog.||) pg_catalog.left(
                          pg_catalog.pg_walfile_name(pg_catalog.pg_current_wal_lsn()), 8))
                     ::pg_catalog.bit(32)::pg_catalog.int8
           END;
$$;

REVOKE ALL ON FUNCTION public.uniphant_server_generation() FROM PUBLIC;

-- Every process calls it as it connects: whoever may send heartbeats
-- (keepalive(), workers and managers) or read the fleet (operators, for
-- `uniphant.py ps`) may call it too, also when this file is loaded over an
-- older version.
DO $$
DECLARE
    grantee name;
BEGIN
    FOR grantee IN
        SELECT DISTINCT coalesce(r.rolname, 'PUBLIC')
        FROM (SELECT a.grantee FROM pg_catalog.pg_proc p, pg_catalog.aclexplode(p.proacl) a
              WHERE p.oid = 'public.keepalive()'::pg_catalog.regprocedure
                AND a.privilege_type = 'EXECUTE'
              UNION
              SELECT a.grantee FROM pg_catalog.pg_class c, pg_catalog.aclexplode(c.relacl) a
              WHERE c.oid = 'public.fleet'::pg_catalog.regclass AND a.privilege_type = 'SELECT') g
        LEFT JOIN pg_catalog.pg_roles r ON r.oid = g.grantee
    LOOP
        EXECUTE pg_catalog.format('GRANT EXECUTE ON FUNCTION public.uniphant_server_generation() TO %s',
                                  CASE WHEN grantee = 'PUBLIC' THEN 'PUBLIC'
                                       ELSE pg_catalog.quote_ident(grantee) END);
    END LOOP;
END
$$;

COMMIT;
