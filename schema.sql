-- uniphant: every database object the runtime needs, in the schema `uniphant`.
--
-- Load it with `psql -v ON_ERROR_STOP=1 -f schema.sql` as the role that will
-- own the objects.  Loading it again, or over an older release, is safe and
-- keeps every row and every grant; a release that kept its objects in
-- `public` is moved here whole.  Then give each role its part with one call
-- (docs/trust-model.md, "Database privileges"):
--
--     SELECT uniphant.grant_role('app_worker', 'worker');
--
-- Trust (docs/trust-model.md, "Trust model"): the API functions are SECURITY DEFINER and
-- run with search_path = pg_catalog, pg_temp, naming each object of ours with
-- its schema, so nothing another role creates in `public` (or anywhere) can
-- take their place.  This file runs under the same path for the same reason.
--
-- The errors the functions raise, by SQLSTATE:
--   UN001  another live process runs the worker (names its host name and PID)
--   UN002  the session's application_name is not a uniphant process id
--   UN003  this host's own previous process still holds the worker's row
--          (DETAIL: its PID, for the caller to look at)
--   UN004  this session's process already runs another worker
--   UN005  a manager already runs on this host (DETAIL: its PID)
--   UN006  the session is not the registered process or manager it must be
--   UN007  the host belongs to another manager role
--   UN008  finish(): the session's process is not one its host's manager
--          reported starting for the worker, on the process row's own session
--   22023  a bad argument (a staleness, a count, a state, a worker type, a
--          desired worker's settings: setting_problem)

BEGIN;
SET LOCAL search_path = pg_catalog, pg_temp;
-- What "already exists, skipping" says on every load after the first is no news.
SET LOCAL client_min_messages = warning;

DO $$
BEGIN
    IF EXISTS (SELECT 1 FROM pg_namespace WHERE nspname = 'uniphant'
               AND nspowner <> (SELECT oid FROM pg_roles WHERE rolname = current_user)) THEN
        RAISE EXCEPTION 'the schema uniphant exists and belongs to another role: load schema.sql as its owner'
            USING ERRCODE = '42501';
    END IF;
END
$$;
CREATE SCHEMA IF NOT EXISTS uniphant;

-- An earlier release kept its objects in public (it is recognised by its
-- keepalive() beside its processes table).  Its tables move here with their
-- rows, indexes and grants; its functions and view are dropped, and whoever
-- could use them is given the same part here (uniphant.grant_role, at the end).
DO $$
DECLARE
    name text;
    old  text;
BEGIN
    IF to_regprocedure('public.keepalive()') IS NULL OR to_regclass('public.processes') IS NULL
       OR to_regclass('uniphant.processes') IS NOT NULL THEN
        RETURN;
    END IF;
    CREATE TEMPORARY TABLE uniphant_earlier_grants ON COMMIT DROP AS
    SELECT DISTINCT coalesce(r.rolname, 'PUBLIC') AS role,
           CASE WHEN p.proname IN ('register_manager', 'manager_plan', 'report_worker') THEN 'manager'
                WHEN p.proname IN ('add_worker', 'scale', 'remove_worker', 'remove_workers',
                                   'restart_worker', 'restart_workers') THEN 'operator'
                ELSE 'worker' END AS kind
    FROM pg_proc p, aclexplode(p.proacl) a LEFT JOIN pg_roles r ON r.oid = a.grantee
    WHERE p.pronamespace = 'public'::regnamespace AND a.privilege_type = 'EXECUTE'
      AND a.grantee <> p.proowner
      AND p.proname IN ('register_host', 'register_process', 'keepalive', 'disconnect',
                        'register_manager', 'manager_plan', 'report_worker', 'add_worker', 'scale',
                        'remove_worker', 'remove_workers', 'restart_worker', 'restart_workers')
    UNION
    SELECT coalesce(r.rolname, 'PUBLIC'), 'operator'
    FROM pg_class c, aclexplode(c.relacl) a LEFT JOIN pg_roles r ON r.oid = a.grantee
    WHERE c.oid = to_regclass('public.fleet') AND a.privilege_type = 'SELECT' AND a.grantee <> c.relowner;
    DROP VIEW IF EXISTS public.fleet;
    FOREACH name IN ARRAY ARRAY['hosts', 'processes', 'workers', 'managers', 'worker_states'] LOOP
        IF to_regclass('public.' || name) IS NOT NULL THEN
            EXECUTE format('ALTER TABLE public.%I SET SCHEMA uniphant', name);
        END IF;
    END LOOP;
    FOREACH old IN ARRAY ARRAY[
        'public.uniphant_schema_version()', 'public.uniphant_process_id()',
        'public.register_host(uuid, text)',
        'public.register_process(uuid, uuid, text, integer, interval)',
        'public.register_process(uuid, uuid, text, integer, interval, boolean, integer)',
        'public.keepalive()', 'public.disconnect()', 'public.processes_notify_stop()',
        'public.uniphant_session_exists(uuid, name)', 'public.uniphant_process_live(uniphant.processes)',
        'public.uniphant_notify_fleet()', 'public.processes_notify_fleet()',
        'public.register_manager(uuid)', 'public.manager_plan(uuid)',
        'public.report_worker(uuid, text, integer, integer, text, double precision)',
        'public.add_worker(text, uuid)', 'public.scale(text, integer, uuid)',
        'public.remove_worker(uuid)', 'public.remove_workers(text)',
        'public.restart_worker(uuid)', 'public.restart_workers(text)'] LOOP
        IF to_regprocedure(old) IS NOT NULL THEN
            EXECUTE 'DROP FUNCTION ' || old || ' CASCADE';  -- with the old triggers
        END IF;
    END LOOP;
END
$$;

-- The version of these objects; the runtime refuses a database whose version
-- is older than the one it needs, and says to load this file.
CREATE OR REPLACE FUNCTION uniphant.schema_version() RETURNS integer
LANGUAGE sql IMMUTABLE SET search_path = pg_catalog, pg_temp AS 'SELECT 4';

-- The generation of the server a session reached (docs/high-availability.md, "PostgreSQL high
-- availability"), so that a process can refuse an old primary that comes back
-- writable after a failover: the cluster's system identifier (the same on a
-- primary and on every standby cloned from it) and the server's current
-- timeline, which a promotion raises.  On a primary the timeline is the one of
-- the WAL it writes now: the latest checkpoint's lags behind a promotion until
-- the first checkpoint on the new timeline completes.  pg_walfile_name() fails
-- during recovery, so a standby answers the newest timeline it knows of: that
-- of the WAL it has received (visible to an owner who may read all
-- statistics), else that of its latest restartpoint; both may lag, never lead.
-- SECURITY DEFINER, so that a role needs no privilege on pg_control_* or the
-- statistics.  SQL, not PL/pgSQL: every process calls it once per session, and
-- PL/pgSQL would compile it in each (1 ms of the 2 that a call would cost).
CREATE OR REPLACE FUNCTION uniphant.server_generation(OUT system_identifier bigint, OUT timeline bigint)
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

-- What is wrong with one of a desired worker's settings, or NULL.  Settings
-- describe what a worker does, never where or as whom it connects, nor which
-- process is which (docs/trust-model.md, "Trust model"): refused are the keys uniphant
-- sets itself (the reserved keys), every libpq connection key and every PG*
-- environment name (in any case), `pooler`, and anything that looks like a
-- credential, in its key or as a URI's password, which every operator could
-- read here (they belong in a secrets.conf).  A runtime key's value must be
-- one its config files would take; a number is at most 30 characters and
-- below 1e15, so that every reader decodes it.  A message names the key,
-- never the value.  uniphant.py refuses the same keys again when a worker
-- starts (_desired_key_problem), for a row that never passed this check.
CREATE OR REPLACE FUNCTION uniphant.setting_problem(key text, value jsonb) RETURNS text
LANGUAGE plpgsql IMMUTABLE SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    named text := format('%L', left(key, 100));
    text_value text := value #>> '{}';
    rule record;
BEGIN
    IF key !~ '^[A-Za-z_][A-Za-z0-9_.-]{0,99}$' THEN
        RETURN named || ' is not a key (letters, digits, _ . and -, up to 100)';
    ELSIF key IN ('root_dir', 'script_dir', 'worker_type', 'lock_file', 'host_id_file', 'host_id', 'process_id',
                  'host_name', 'foreground', 'worker_id', 'parent_pid', 'state_dir') THEN
        RETURN named || ' is reserved: uniphant sets it';
    ELSIF key ~* '^pg' OR lower(key) IN (
            'host', 'hostaddr', 'port', 'dbname', 'user', 'password', 'passfile', 'require_auth',
            'channel_binding', 'connect_timeout', 'client_encoding', 'options', 'application_name',
            'fallback_application_name', 'keepalives', 'keepalives_idle', 'keepalives_interval',
            'keepalives_count', 'tcp_user_timeout', 'replication', 'gssencmode', 'sslmode', 'requiressl',
            'sslnegotiation', 'sslcompression', 'sslcert', 'sslkey', 'sslpassword', 'sslcertmode', 'sslrootcert',
            'sslcrl', 'sslcrldir', 'sslsni', 'requirepeer', 'ssl_min_protocol_version', 'ssl_max_protocol_version',
            'min_protocol_version', 'max_protocol_version', 'krbsrvname', 'gsslib', 'gssdelegation', 'service',
            'target_session_attrs', 'load_balance_hosts', 'pooler') THEN
        RETURN named || ' says where or as whom the worker connects, which only its config files say (a password: a secrets.conf)';
    ELSIF key ~* '(password|passwd|passphrase|secret|token|passfile|credential|private|auth|cert|dsn|'
                 '(^|[_.-])(api|access|signing|encryption)?keys?($|[_.-]))' THEN
        RETURN named || ' looks like a credential, which every operator could read here: put it in a secrets.conf';
    ELSIF jsonb_typeof(value) NOT IN ('string', 'number', 'boolean') THEN
        RETURN format('the value of %s must be a string, a number or a boolean', named);
    ELSIF length(text_value) > 10000 THEN
        RETURN format('the value of %s is longer than 10000 characters', named);
    ELSIF jsonb_typeof(value) = 'string' AND (text_value ~* '^[a-z][a-z0-9+.-]*://[^/?#@]*:[^/?#@]*@'
                                             OR text_value ~* '(^|[[:space:]])password[[:space:]]*=') THEN
        RETURN format('the value of %s holds a password, which every operator could read here: '
                      'put it in a secrets.conf', named);
    END IF;
    -- Each cast only once the text is known to take it: a plan may evaluate
    -- both sides of an AND.
    IF jsonb_typeof(value) = 'number' THEN
        IF length(text_value) > 30 OR abs(text_value::numeric) >= 1e15 THEN
            RETURN format('the value of %s must be a number below 1e15 of at most 30 characters', named);
        END IF;
    END IF;
    IF key IN ('log_level', 'log_file', 'restart')
       AND NOT (key = 'log_level' AND upper(text_value) IN ('DEBUG', 'INFO', 'WARNING', 'ERROR', 'CRITICAL')
                OR key = 'log_file' AND lower(text_value) IN ('on', 'off')
                OR key = 'restart' AND lower(text_value) IN ('always', 'on-failure')) THEN
        RETURN format('bad value for %s: expected one of %s', key, CASE key
            WHEN 'log_level' THEN 'DEBUG, INFO, WARNING, ERROR, CRITICAL'
            WHEN 'log_file' THEN 'on, off' ELSE 'always, on-failure' END);
    END IF;
    -- The runtime's numbers, as uniphant.py's _RUNTIME_KEYS check them: plain
    -- decimals (no sign, exponent or spaces) from minimum (exclusive if above) to maximum.
    SELECT * INTO rule FROM (VALUES
        ('interval', 0, false, 86400, 'seconds'), ('stop_timeout', 0, true, 86400, 'seconds'),
        ('stale_after', 3, false, 86400, 'seconds'), ('restart_delay', 0, true, 86400, 'seconds'),
        ('restart_delay_max', 0, true, 86400, 'seconds'), ('restart_reset_after', 0, false, 86400, 'seconds'),
        ('start_timeout', 1, false, 86400, 'seconds'), ('starts_per_second', 0, true, 1000, 'starts a second'),
        ('file_retention', 0, false, 366 * 86400, 'seconds')) AS r (name, minimum, above, maximum, unit)
    WHERE r.name = key;
    IF NOT FOUND THEN
        RETURN NULL;
    END IF;
    IF text_value ~ '^([0-9]+\.?[0-9]*|\.[0-9]+)$' THEN
        IF (text_value::numeric > rule.minimum OR NOT rule.above AND text_value::numeric = rule.minimum)
           AND text_value::numeric <= rule.maximum THEN
            RETURN NULL;
        END IF;
    END IF;
    RETURN format('bad value for %s: expected a number of %s %s %s and <= %s', key, rule.unit,
                  CASE WHEN rule.above THEN '>' ELSE '>=' END, rule.minimum, rule.maximum);
END
$$;

-- What is wrong with a desired worker's settings, or NULL: a JSON object of at
-- most 100 keys (like a config file's), each as setting_problem allows.
CREATE OR REPLACE FUNCTION uniphant.settings_problem(settings jsonb) RETURNS text
LANGUAGE sql IMMUTABLE SET search_path = pg_catalog, pg_temp AS $$
    SELECT CASE
        WHEN settings IS NULL OR jsonb_typeof(settings) <> 'object' THEN 'settings must be a JSON object'
        WHEN (SELECT count(*) FROM jsonb_object_keys(settings)) > 100 THEN 'at most 100 settings'
        ELSE (SELECT p.problem FROM jsonb_each(settings) e, uniphant.setting_problem(e.key, e.value) p (problem)
              WHERE p.problem IS NOT NULL ORDER BY e.key LIMIT 1)
    END;
$$;

-- Whether text is a worker type the fleet can run: at most 100 characters in
-- at most 10 dot-separated parts, each a file name of letters, digits, _ and -
-- (the script workers/a/b.py, or workers/a.b.py, is of type a.b).
CREATE OR REPLACE FUNCTION uniphant.is_worker_type(worker_type text) RETURNS boolean
LANGUAGE sql IMMUTABLE SET search_path = pg_catalog, pg_temp AS $$
    SELECT length(worker_type) <= 100 AND worker_type ~ '^[A-Za-z0-9_-]+(\.[A-Za-z0-9_-]+){0,9}$';
$$;

-- manager_role: the role that first registered a manager for the host; only
-- that role's managers may run it.
CREATE TABLE IF NOT EXISTS uniphant.hosts (
    id            uuid PRIMARY KEY,
    name          text NOT NULL,
    registered_at timestamptz NOT NULL DEFAULT now(),
    manager_role  name
);
ALTER TABLE uniphant.hosts ADD COLUMN IF NOT EXISTS manager_role name;

-- Settings of the whole fleet: one row, which the owner changes with an
-- UPDATE.  max_lease: the longest stale_after register_process grants (a
-- process that asks for more gets this, and heartbeats by it), so that no row
-- a process declares keeps a worker out, or holds its placement, for longer.
CREATE TABLE IF NOT EXISTS uniphant.settings (
    one       boolean PRIMARY KEY DEFAULT true CHECK (one),
    max_lease interval NOT NULL DEFAULT '10 minutes'
              CHECK (max_lease BETWEEN interval '3 seconds' AND interval '1 day')
);
INSERT INTO uniphant.settings DEFAULT VALUES ON CONFLICT DO NOTHING;

-- No index on heartbeat_at and a low fillfactor: the heartbeat UPDATE then
-- stays a HOT update, which writes no index entry.  A row is taken over by
-- the staleness its own process was granted, never by the one a caller claims;
-- a process that reaches the server through a transaction pooler (pooled)
-- has no session of its own, so only its heartbeat says whether it lives.
-- backend_pid: the server process of the session that registered the row
-- (NULL when pooled): a session is one process, and holds one row.
-- proven: the manager of its host found its PID holding the worker's PID-file
-- lock there (uniphant.prove_process); only then does a row of a host with a
-- live manager count as a running copy.
CREATE TABLE IF NOT EXISTS uniphant.processes (
    id           uuid PRIMARY KEY,
    worker_id    uuid NOT NULL UNIQUE,
    host_id      uuid REFERENCES uniphant.hosts (id),
    worker_type  text,
    pid          integer,
    role         name NOT NULL DEFAULT session_user,
    started_at   timestamptz NOT NULL DEFAULT now(),
    heartbeat_at timestamptz NOT NULL DEFAULT now(),
    stale_after  interval NOT NULL DEFAULT '60 seconds',
    pooled       boolean NOT NULL DEFAULT false,
    backend_pid  integer,
    proven       boolean NOT NULL DEFAULT false
) WITH (fillfactor = 50);
ALTER TABLE uniphant.processes
    ADD COLUMN IF NOT EXISTS stale_after interval NOT NULL DEFAULT '60 seconds',
    ADD COLUMN IF NOT EXISTS pooled boolean NOT NULL DEFAULT false,
    ADD COLUMN IF NOT EXISTS backend_pid integer,
    ADD COLUMN IF NOT EXISTS proven boolean NOT NULL DEFAULT false;
ALTER TABLE uniphant.processes SET (fillfactor = 50);
CREATE INDEX IF NOT EXISTS processes_backend_pid ON uniphant.processes (backend_pid);

-- Desired state: a row present means "keep it running".  host_id NULL: any
-- host whose manager has the worker's script.  settings: keys that reach the
-- worker's config; paused_at: its process is stopped until it is resumed;
-- done_at: it finished (restart=on-failure and it exited 0), and is not
-- started again.
CREATE TABLE IF NOT EXISTS uniphant.workers (
    worker_id   uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    worker_type text NOT NULL,
    host_id     uuid,
    added_at    timestamptz NOT NULL DEFAULT now(),
    settings    jsonb NOT NULL DEFAULT '{}',
    paused_at   timestamptz,
    done_at     timestamptz
);
ALTER TABLE uniphant.workers
    ADD COLUMN IF NOT EXISTS settings jsonb NOT NULL DEFAULT '{}',
    ADD COLUMN IF NOT EXISTS paused_at timestamptz,
    ADD COLUMN IF NOT EXISTS done_at timestamptz;
CREATE INDEX IF NOT EXISTS workers_worker_type ON uniphant.workers (worker_type);

-- A rolling restart of a worker type: batch workers at a time, each batch
-- only once the one before has registered again.  current: the batch under
-- way since batch_started_at; done: the workers restarted so far; waiting: why
-- the batch cannot come back yet (a host without a live manager); halted: why
-- the roll stopped, leaving the rest on the code they run.
CREATE TABLE IF NOT EXISTS uniphant.rolls (
    worker_type      text PRIMARY KEY,
    batch            integer NOT NULL CHECK (batch >= 1),
    started_at       timestamptz NOT NULL DEFAULT now(),
    batch_started_at timestamptz NOT NULL DEFAULT now(),
    current          uuid[] NOT NULL DEFAULT '{}',
    done             uuid[] NOT NULL DEFAULT '{}',
    halted           text,
    waiting          text
);
ALTER TABLE uniphant.rolls ADD COLUMN IF NOT EXISTS waiting text;

-- The manager of each host: a uniphant process of its own, and the worker
-- types its project root has scripts for.
CREATE TABLE IF NOT EXISTS uniphant.managers (
    host_id      uuid PRIMARY KEY,
    process_id   uuid NOT NULL,
    started_at   timestamptz NOT NULL DEFAULT now(),
    worker_types text[] NOT NULL DEFAULT '{}'
);
ALTER TABLE uniphant.managers ADD COLUMN IF NOT EXISTS worker_types text[] NOT NULL DEFAULT '{}';

-- A host whose manager ran before hosts had owners belongs to that manager's role.
UPDATE uniphant.hosts h SET manager_role = p.role
FROM uniphant.managers m JOIN uniphant.processes p ON p.id = m.process_id
WHERE h.id = m.host_id AND h.manager_role IS NULL;

-- What the managers did, written on change only.  host_id: the host whose
-- manager is responsible for the worker (NULL: nobody yet).
-- log_tail: the last lines a worker logged before its last run ended other
-- than on request (up to 20 lines, 4 KB, control characters escaped).
-- warnings: what its configuration's reading warned of at its last start (a
-- misspelt key, say), as it told its manager.  restart_requested: a restart
-- asked for while it waited in backoff, which its manager's next plan takes.
CREATE TABLE IF NOT EXISTS uniphant.worker_states (
    worker_id     uuid PRIMARY KEY,
    host_id       uuid,
    state         text NOT NULL,
    pid           integer,
    since         timestamptz NOT NULL DEFAULT now(),
    restarts      integer NOT NULL DEFAULT 0,
    last_exit     text,
    next_start_at timestamptz,
    log_tail      text
);
ALTER TABLE uniphant.worker_states
    ADD COLUMN IF NOT EXISTS log_tail text,
    ADD COLUMN IF NOT EXISTS warnings text,
    ADD COLUMN IF NOT EXISTS restart_requested boolean NOT NULL DEFAULT false;

-- What happened to each worker, as its managers reported it: a row for each
-- state it entered (a start with its PID, an end with why).  The last 50 of
-- each worker are kept, until the worker is gone.
CREATE TABLE IF NOT EXISTS uniphant.worker_events (
    id        bigserial PRIMARY KEY,
    worker_id uuid NOT NULL,
    at        timestamptz NOT NULL DEFAULT clock_timestamp(),
    host_id   uuid,
    state     text NOT NULL,
    pid       integer,
    last_exit text
);
CREATE INDEX IF NOT EXISTS worker_events_worker ON uniphant.worker_events (worker_id, id);

-- The roles given a part with grant_role(): each load of this file gives
-- them what their part needs of it (new functions included).
CREATE TABLE IF NOT EXISTS uniphant.role_grants (
    role name NOT NULL,
    kind text NOT NULL CHECK (kind IN ('worker', 'manager', 'operator')),
    PRIMARY KEY (role, kind)
);

-- The checks on values, added here so that an earlier release's tables get
-- them too; rows an earlier release let in that break one are kept, and the
-- check then holds for new rows only (NOT VALID).
DO $$
DECLARE
    c record;
BEGIN
    FOR c IN SELECT * FROM (VALUES
        ('uniphant.workers', 'workers_worker_type_check', 'uniphant.is_worker_type(worker_type)'),
        ('uniphant.workers', 'workers_settings_check', 'uniphant.settings_problem(settings) IS NULL'),
        ('uniphant.worker_states', 'worker_states_state_check',
         'state IN (''starting'', ''running'', ''backoff'', ''moving'', ''paused'', ''done'', ''unplaced'')'),
        ('uniphant.worker_states', 'worker_states_restarts_check', 'restarts >= 0'),
        ('uniphant.worker_states', 'worker_states_pid_check', 'pid > 0')) AS t (tab, con, expr)
    LOOP
        EXECUTE format('ALTER TABLE %s DROP CONSTRAINT IF EXISTS %I', c.tab, c.con);
        EXECUTE format('ALTER TABLE %s ADD CONSTRAINT %I CHECK (%s) NOT VALID', c.tab, c.con, c.expr);
        BEGIN
            EXECUTE format('ALTER TABLE %s VALIDATE CONSTRAINT %I', c.tab, c.con);
        EXCEPTION WHEN check_violation THEN
            RAISE WARNING '%: rows of an earlier release break the check %; they are kept', c.tab, c.con;
        END;
    END LOOP;
END
$$;

REVOKE ALL ON uniphant.hosts, uniphant.processes, uniphant.workers, uniphant.managers,
    uniphant.worker_states, uniphant.role_grants, uniphant.rolls, uniphant.worker_events,
    uniphant.settings FROM PUBLIC;

-- ---------------------------------------------------------------------------
-- Processes: the manual's four functions, keyed by the session's
-- application_name (the process id)
-- ---------------------------------------------------------------------------

-- The process id of the calling session: its application_name.  Checked with
-- a pattern rather than a cast in an EXCEPTION block, which would cost a
-- subtransaction on every heartbeat.
CREATE OR REPLACE FUNCTION uniphant.process_id() RETURNS uuid
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

-- The first registration of a host id names it (up to 255 characters).
CREATE OR REPLACE FUNCTION uniphant.register_host(host_id uuid, host_name text)
RETURNS void
LANGUAGE sql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
    INSERT INTO uniphant.hosts (id, name) VALUES (host_id, left(host_name, 255))
    ON CONFLICT (id) DO NOTHING;
$$;

-- Whether a session of process_id, logged in as role, is connected.  The role
-- must match: any session may borrow an application_name.
CREATE OR REPLACE FUNCTION uniphant.session_exists(process_id uuid, role name)
RETURNS boolean
LANGUAGE sql STABLE SET search_path = pg_catalog, pg_temp AS $$
    SELECT EXISTS (SELECT 1 FROM pg_catalog.pg_stat_activity a
                   WHERE a.application_name = process_id::text AND a.usename = role);
$$;

-- Whether a process row belongs to a live process: a fresh heartbeat, or a
-- connected session (a process busy in one long call is slow, not dead).
-- The one rule of liveness, for the planner and the fleet view alike.  No SET
-- clause and qualified operators: the planner inlines it into its callers.
CREATE OR REPLACE FUNCTION uniphant.process_live(p uniphant.processes)
RETURNS boolean
LANGUAGE sql STABLE AS $$
    SELECT p.heartbeat_at OPERATOR(pg_catalog.>=) (pg_catalog.now() OPERATOR(pg_catalog.-) p.stale_after)
        OR (NOT p.pooled AND uniphant.session_exists(p.id, p.role));
$$;

-- The longest lease a process is granted (uniphant.settings).
CREATE OR REPLACE FUNCTION uniphant.max_lease() RETURNS interval
LANGUAGE sql STABLE SET search_path = pg_catalog, pg_temp AS $$
    SELECT coalesce((SELECT s.max_lease FROM uniphant.settings s), interval '10 minutes');
$$;

-- Release 3's register_process returned nothing; it now returns the lease it grants.
DO $$
BEGIN
    IF (SELECT p.prorettype FROM pg_proc p WHERE p.oid = to_regprocedure(
            'uniphant.register_process(uuid, uuid, text, integer, interval, boolean, integer)'))
       = 'void'::regtype THEN
        DROP FUNCTION uniphant.register_process(uuid, uuid, text, integer, interval, boolean, integer);
    END IF;
END
$$;

-- The functions that run with enable_seqscan off run with jit off too: a table
-- scanned anyway (uniphant.settings, one row) then costs more than
-- jit_above_cost, and compiling it would cost each new session tens of
-- milliseconds of the server's CPU, for statements that take microseconds.
--
-- Registers the calling session's process for worker_id, and returns the
-- lease granted: stale_after, at most uniphant.max_lease(), which the process
-- must heartbeat by.  At most one live process per worker, and one process
-- per session: a session (not pooled) whose earlier row, under another
-- process id, still lives by its heartbeat is refused (UN004), whatever its
-- application_name says now.  A row of another process is taken over only
-- when no session of that process is connected (a pooled process has none),
-- and either
--   * it is of this host and of the caller's role, and the caller has found
--     its PID gone on this host (gone_pid): it holds the worker's PID-file
--     lock, and a removed pid/ directory cannot fool that check; or
--   * its heartbeat is older than the stale_after that process was granted.
-- Otherwise the call fails: UN003 when it is this host's own previous process
-- (DETAIL: its PID, for the caller to look at; worth retrying for a moment
-- while its process or session ends), else UN001, naming the running
-- process's host and PID.  stale_after is from 3 seconds to a day.
CREATE OR REPLACE FUNCTION uniphant.register_process(
    worker_id   uuid,
    host_id     uuid DEFAULT NULL,
    worker_type text DEFAULT NULL,
    pid         integer DEFAULT NULL,
    stale_after interval DEFAULT '60 seconds',
    pooled      boolean DEFAULT false,
    gone_pid    integer DEFAULT NULL)
RETURNS interval
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp SET enable_seqscan = off SET jit = off AS $$
DECLARE
    me         uuid := uniphant.process_id();
    is_pooled  boolean := coalesce(register_process.pooled, false);
    lease      interval;
    other      uniphant.processes%ROWTYPE;
    other_host text;
    own        boolean;
    connected  boolean;
BEGIN
    IF register_process.stale_after IS NULL OR register_process.stale_after < interval '3 seconds'
       OR register_process.stale_after > interval '1 day' THEN
        RAISE EXCEPTION 'stale_after must be from 3 seconds to a day' USING ERRCODE = '22023';
    END IF;
    lease := least(register_process.stale_after, uniphant.max_lease());
    SELECT * INTO other FROM uniphant.processes p WHERE p.id = me;
    IF FOUND AND other.worker_id <> register_process.worker_id THEN
        RAISE EXCEPTION 'this session''s process already runs worker %', other.worker_id
            USING ERRCODE = 'UN004';
    END IF;
    -- A row of this backend under another id whose session is not connected by
    -- that id is this session's earlier process (or, once, a dead session's
    -- whose server PID this one reuses: refused until its lease runs out).
    IF NOT is_pooled THEN
        SELECT * INTO other FROM uniphant.processes p
        WHERE p.backend_pid = pg_backend_pid() AND NOT p.pooled AND p.id <> me AND p.role = session_user
          AND p.heartbeat_at >= now() - p.stale_after AND NOT uniphant.session_exists(p.id, p.role)
        LIMIT 1;
        IF FOUND THEN
            RAISE EXCEPTION 'this session already runs worker % as process %: a session is one process',
                other.worker_id, other.id USING ERRCODE = 'UN004';
        END IF;
    END IF;
    -- Each pass either returns, raises, or removes a row that is gone for
    -- good; three passes are more than any interleaving of starts needs.
    FOR attempt IN 1..3 LOOP
        SELECT * INTO other FROM uniphant.processes p
        WHERE p.worker_id = register_process.worker_id FOR UPDATE;
        IF NOT FOUND THEN
            INSERT INTO uniphant.processes (id, worker_id, host_id, worker_type, pid, stale_after, pooled,
                                            backend_pid)
            VALUES (me, register_process.worker_id, register_process.host_id,
                    register_process.worker_type, register_process.pid, lease, is_pooled,
                    CASE WHEN NOT is_pooled THEN pg_backend_pid() END)
            ON CONFLICT DO NOTHING;
            IF FOUND THEN
                RETURN lease;
            END IF;
            CONTINUE;  -- another session inserted first: look at its row
        END IF;
        IF other.id = me THEN
            RETURN other.stale_after;
        END IF;
        own := other.host_id = register_process.host_id AND other.role = session_user;
        connected := NOT other.pooled AND uniphant.session_exists(other.id, other.role);
        IF NOT connected AND ((own AND other.pid = register_process.gone_pid)
                              OR other.heartbeat_at < now() - other.stale_after) THEN
            DELETE FROM uniphant.processes p WHERE p.id = other.id;
            CONTINUE;
        END IF;
        SELECT h.name INTO other_host FROM uniphant.hosts h WHERE h.id = other.host_id;
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
CREATE OR REPLACE FUNCTION uniphant.keepalive() RETURNS boolean
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp SET enable_seqscan = off SET jit = off AS $$
DECLARE
    me uuid := uniphant.process_id();
BEGIN
    PERFORM set_config('synchronous_commit', 'off', true);
    UPDATE uniphant.processes SET heartbeat_at = now()
    WHERE id = me AND role = session_user AND heartbeat_at < now() - interval '1 second';
    IF FOUND THEN
        RETURN true;
    END IF;
    RETURN EXISTS (SELECT 1 FROM uniphant.processes WHERE id = me AND role = session_user);
END
$$;

-- Removes the caller's row.  Like a heartbeat, it does not wait for the disk:
-- a removal lost in a crash of the server leaves a row whose process has gone,
-- which the next start takes over.
CREATE OR REPLACE FUNCTION uniphant.disconnect() RETURNS void
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp SET enable_seqscan = off SET jit = off AS $$
DECLARE
    me uuid := uniphant.process_id();
BEGIN
    PERFORM set_config('synchronous_commit', 'off', true);
    DELETE FROM uniphant.processes WHERE id = me AND role = session_user;
END
$$;

-- Removes the caller's row, and marks its desired worker done: a worker whose
-- type says restart=on-failure and that exited 0 has finished, and is not
-- started again.  Only the process its host's manager started says so: the
-- manager reported starting (or running) the worker on the row's host as the
-- row's PID, and the caller is the row's session (the one that registered
-- it, or, once that has gone, the process's next: it reconnected).  Anything
-- else is refused (UN008), and changes nothing: a worker role cannot end a
-- worker it does not run.  A session without a row has nothing to finish.
CREATE OR REPLACE FUNCTION uniphant.finish() RETURNS void
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp SET enable_seqscan = off SET jit = off AS $$
DECLARE
    me   uuid := uniphant.process_id();
    mine uniphant.processes%ROWTYPE;
BEGIN
    SELECT * INTO mine FROM uniphant.processes p WHERE p.id = me AND p.role = session_user;
    IF NOT FOUND THEN
        RETURN;
    END IF;
    IF (NOT mine.pooled AND mine.backend_pid IS DISTINCT FROM pg_backend_pid()
        AND EXISTS (SELECT 1 FROM pg_catalog.pg_stat_activity a
                    WHERE a.pid = mine.backend_pid AND a.application_name = me::text))
       OR NOT EXISTS (SELECT 1 FROM uniphant.worker_states s
                      WHERE s.worker_id = mine.worker_id AND s.host_id = mine.host_id AND s.pid = mine.pid
                        AND s.state IN ('starting', 'running')) THEN
        RAISE EXCEPTION 'worker % is not marked done: its host''s manager did not start this process for it',
            mine.worker_id USING ERRCODE = 'UN008';
    END IF;
    UPDATE uniphant.workers w SET done_at = now() WHERE w.worker_id = mine.worker_id;
    DELETE FROM uniphant.processes p WHERE p.id = me AND p.role = session_user;
END
$$;

-- A deleted row wakes its process at once: it LISTENs on this channel.  Any
-- role can NOTIFY any channel, so the process treats this as a hint and asks
-- keepalive() before it stops.  A process that removes its own row as it
-- leaves needs no word: every NOTIFY takes a lock that commits queue for, and
-- hundreds of workers stopping at once would queue on it.
CREATE OR REPLACE FUNCTION uniphant.processes_notify_stop() RETURNS trigger
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    IF OLD.id::text IS DISTINCT FROM current_setting('application_name') THEN
        PERFORM pg_notify('uniphant_' || replace(OLD.id::text, '-', ''), 'stop');
    END IF;
    RETURN OLD;
END
$$;

DROP TRIGGER IF EXISTS processes_notify_stop ON uniphant.processes;
CREATE TRIGGER processes_notify_stop AFTER DELETE ON uniphant.processes
    FOR EACH ROW EXECUTE FUNCTION uniphant.processes_notify_stop();

-- ---------------------------------------------------------------------------
-- Fleet control (docs/fleet.md, "The fleet"): what should run (workers), the managers
-- that make it so, one per host, and what happened (worker_states).
-- ---------------------------------------------------------------------------

-- The managers that are live, and the worker types each provides: a manager
-- counts while its process row (on its own host, of the host's manager role)
-- is live.  One rule for the planner and the fleet view.
CREATE OR REPLACE FUNCTION uniphant.live_managers()
RETURNS TABLE (host_id uuid, worker_types text[])
LANGUAGE sql STABLE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
    SELECT m.host_id, m.worker_types
    FROM uniphant.managers m
    JOIN uniphant.processes p ON p.id = m.process_id AND p.host_id = m.host_id
    JOIN uniphant.hosts h ON h.id = m.host_id AND h.manager_role = p.role
    WHERE uniphant.process_live(p);
$$;

-- The host whose manager the calling session is; UN006 if it is none.
CREATE OR REPLACE FUNCTION uniphant.managed_host() RETURNS uuid
LANGUAGE plpgsql STABLE SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    here uuid;
BEGIN
    SELECT m.host_id INTO here FROM uniphant.managers m
    JOIN uniphant.processes p ON p.id = m.process_id AND p.host_id = m.host_id
    JOIN uniphant.hosts h ON h.id = m.host_id AND h.manager_role = p.role
    WHERE p.id = uniphant.process_id() AND p.role = session_user;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'this session is not a manager' USING ERRCODE = 'UN006';
    END IF;
    RETURN here;
END
$$;

CREATE OR REPLACE FUNCTION uniphant.notify_fleet() RETURNS trigger
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    PERFORM pg_notify('uniphant_fleet', '');
    RETURN NULL;
END
$$;

DROP TRIGGER IF EXISTS workers_notify_fleet ON uniphant.workers;
CREATE TRIGGER workers_notify_fleet AFTER INSERT OR UPDATE OR DELETE ON uniphant.workers
    FOR EACH STATEMENT EXECUTE FUNCTION uniphant.notify_fleet();

-- The managers hear of a deleted process row of a wanted worker when one of
-- them has something to do: its own manager, if another session removed it
-- (restart_worker(); behind a pooler the worker hears nothing itself), or
-- the manager that waits to start it on another host.  A worker that leaves
-- by itself, or that nobody wants any more, is its own manager's business.
CREATE OR REPLACE FUNCTION uniphant.processes_notify_fleet() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    IF EXISTS (SELECT 1 FROM gone g JOIN uniphant.workers w ON w.worker_id = g.worker_id
               LEFT JOIN uniphant.worker_states s ON s.worker_id = g.worker_id
               WHERE g.id::text IS DISTINCT FROM current_setting('application_name')
                  OR s.host_id IS DISTINCT FROM g.host_id) THEN
        PERFORM pg_notify('uniphant_fleet', '');
    END IF;
    RETURN NULL;
END
$$;

DROP TRIGGER IF EXISTS processes_notify_fleet ON uniphant.processes;
CREATE TRIGGER processes_notify_fleet AFTER DELETE ON uniphant.processes
    REFERENCING OLD TABLE AS gone
    FOR EACH STATEMENT EXECUTE FUNCTION uniphant.processes_notify_fleet();

-- Makes the calling process (registered with register_process on host_id)
-- the manager of host_id.  A host belongs to the role that first registered
-- a manager for it: another role is refused (UN007), whoever knows the host
-- id.  Refuses (UN005), naming it, while the host's manager still has a
-- connected session (a new manager holds the root's manager lock, so a
-- manager whose session has gone is gone).
CREATE OR REPLACE FUNCTION uniphant.register_manager(host_id uuid) RETURNS void
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    me     uuid := uniphant.process_id();
    owner_role name;
    holder uniphant.processes%ROWTYPE;
BEGIN
    IF NOT EXISTS (SELECT 1 FROM uniphant.processes p WHERE p.id = me AND p.role = session_user
                   AND p.host_id = register_manager.host_id) THEN
        RAISE EXCEPTION 'register this process on host % first', register_manager.host_id
            USING ERRCODE = 'UN006';
    END IF;
    SELECT h.manager_role INTO owner_role FROM uniphant.hosts h WHERE h.id = register_manager.host_id FOR UPDATE;
    IF owner_role IS NULL THEN
        UPDATE uniphant.hosts h SET manager_role = session_user WHERE h.id = register_manager.host_id;
    ELSIF owner_role <> session_user THEN
        RAISE EXCEPTION 'host % belongs to the managers of role %', register_manager.host_id, owner_role
            USING ERRCODE = 'UN007';
    END IF;
    SELECT p.* INTO holder FROM uniphant.managers m JOIN uniphant.processes p ON p.id = m.process_id
    WHERE m.host_id = register_manager.host_id AND p.id <> me FOR UPDATE OF m;
    IF FOUND AND NOT holder.pooled AND uniphant.session_exists(holder.id, holder.role) THEN
        RAISE EXCEPTION 'a manager already runs on this host: worker %, PID %',
            holder.worker_id, holder.pid USING ERRCODE = 'UN005', DETAIL = coalesce(holder.pid::text, '');
    END IF;
    INSERT INTO uniphant.managers (host_id, process_id) VALUES (register_manager.host_id, me)
    ON CONFLICT ON CONSTRAINT managers_pkey
    DO UPDATE SET process_id = EXCLUDED.process_id, started_at = now();
    PERFORM pg_notify('uniphant_fleet', '');
END
$$;

-- The manager says which worker types its project root has scripts for: it
-- is given any-host workers of those types only.
CREATE OR REPLACE FUNCTION uniphant.set_worker_types(worker_types text[]) RETURNS void
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    here  uuid := uniphant.managed_host();
    types text[];
BEGIN
    IF worker_types IS NULL OR cardinality(worker_types) > 10000 THEN
        RAISE EXCEPTION 'expected at most 10000 worker types' USING ERRCODE = '22023';
    END IF;
    IF NOT (SELECT bool_and(uniphant.is_worker_type(t)) FROM unnest(worker_types) t) THEN
        RAISE EXCEPTION 'not a worker type: %',
            (SELECT t FROM unnest(worker_types) t WHERE NOT uniphant.is_worker_type(t) LIMIT 1)
            USING ERRCODE = '22023';
    END IF;
    types := ARRAY(SELECT DISTINCT t FROM unnest(worker_types) t ORDER BY t);
    UPDATE uniphant.managers m SET worker_types = types
    WHERE m.host_id = here AND m.worker_types IS DISTINCT FROM types;
    IF FOUND THEN
        PERFORM pg_notify('uniphant_fleet', '');
    END IF;
END
$$;

-- Moves each rolling restart on, one manager at a time (the caller holds the
-- planner's advisory lock): a batch is over once each of its workers (still
-- wanted) runs a process that registered since the batch began, and has run
-- for a second (a script that fails at its first call fails in that time;
-- its manager plans every second meanwhile); then the
-- next batch of running workers of the type goes (their process rows
-- deleted: their managers start them again at once), until none is left.  A
-- worker of the batch in backoff (it failed to start, or to register within
-- its manager's start_timeout) halts the roll, and says why; so does one that
-- no live manager can start (its host's manager is down) once start_timeout
-- seconds (the planning manager's) have passed since the batch began, and
-- until then the roll says what it waits for (waiting).
DROP FUNCTION IF EXISTS uniphant.advance_rolls();  -- release 3 took no start_timeout
CREATE OR REPLACE FUNCTION uniphant.advance_rolls(start_timeout double precision DEFAULT 30) RETURNS void
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    r        uniphant.rolls%ROWTYPE;
    failed   record;
    next     uuid[];
    orphan   uuid;
    why      text;
BEGIN
    FOR r IN SELECT * FROM uniphant.rolls WHERE halted IS NULL FOR UPDATE LOOP
        SELECT w.worker_id INTO orphan FROM uniphant.workers w
        LEFT JOIN uniphant.worker_states s ON s.worker_id = w.worker_id
        WHERE w.worker_id = ANY (r.current) AND w.paused_at IS NULL AND w.done_at IS NULL
          AND coalesce(s.host_id, w.host_id) IS NOT NULL
          AND coalesce(s.host_id, w.host_id) NOT IN (SELECT l.host_id FROM uniphant.live_managers() l)
          AND NOT EXISTS (SELECT 1 FROM uniphant.processes p
                          WHERE p.worker_id = w.worker_id AND p.started_at > r.batch_started_at
                            AND uniphant.process_live(p))
        ORDER BY w.worker_id LIMIT 1;
        why := CASE WHEN orphan IS NOT NULL THEN
            format('worker %s waits for its host''s manager, which is not live', orphan) END;
        IF orphan IS NOT NULL AND r.batch_started_at < now() - make_interval(secs => start_timeout) THEN
            UPDATE uniphant.rolls SET halted = format('worker %s did not come back within %s s: its host has '
                                                      'no live manager', orphan, start_timeout), waiting = NULL
            WHERE worker_type = r.worker_type;
            PERFORM pg_notify('uniphant_fleet', '');
            CONTINUE;
        END IF;
        IF why IS DISTINCT FROM r.waiting THEN
            UPDATE uniphant.rolls SET waiting = why WHERE worker_type = r.worker_type;
        END IF;
        SELECT s.worker_id, s.last_exit INTO failed FROM uniphant.worker_states s
        WHERE s.worker_id = ANY (r.current) AND s.state = 'backoff' LIMIT 1;
        IF FOUND THEN
            UPDATE uniphant.rolls SET halted = format('worker %s did not come back: %s', failed.worker_id,
                                                      coalesce(failed.last_exit, '?'))
            WHERE worker_type = r.worker_type;
            PERFORM pg_notify('uniphant_fleet', '');
            CONTINUE;
        END IF;
        IF EXISTS (SELECT 1 FROM uniphant.workers w
                   WHERE w.worker_id = ANY (r.current) AND w.paused_at IS NULL AND w.done_at IS NULL
                     AND NOT EXISTS (SELECT 1 FROM uniphant.processes p
                                     JOIN uniphant.worker_states s ON s.worker_id = p.worker_id
                                     WHERE p.worker_id = w.worker_id AND p.started_at > r.batch_started_at
                                       AND p.started_at < now() - interval '1 second' AND s.state = 'running'
                                       AND uniphant.process_live(p))) THEN
            CONTINUE;  -- the batch is still on its way back
        END IF;
        next := ARRAY(SELECT w.worker_id FROM uniphant.workers w
                      WHERE w.worker_type = r.worker_type AND NOT w.worker_id = ANY (r.done || r.current)
                        AND EXISTS (SELECT 1 FROM uniphant.processes p
                                    WHERE p.worker_id = w.worker_id AND uniphant.process_live(p))
                      ORDER BY w.added_at, w.worker_id LIMIT r.batch);
        IF cardinality(next) = 0 THEN
            DELETE FROM uniphant.rolls WHERE worker_type = r.worker_type;  -- every worker is on the new code
            CONTINUE;
        END IF;
        UPDATE uniphant.rolls
        SET done = done || current, current = next, batch_started_at = now(), waiting = NULL
        WHERE worker_type = r.worker_type;
        DELETE FROM uniphant.processes p WHERE p.worker_id = ANY (next);
    END LOOP;
END
$$;

-- What the manager of host_id should run now (wanted): the workers pinned to
-- it and its share of the any-host workers of the types it provides; and
-- (not wanted) the live processes on its host of managed workers that
-- should run elsewhere or not at all.  Placement happens here, one manager
-- at a time (an advisory lock), and writes only when it changes:
--   * a claim of a host without a live manager goes back to the pool, unless
--     the worker still runs there, and so does a claim of a type its host
--     no longer provides;
--   * of each type, a manager holds at most its fair share,
--     ceil(workers of the type / live managers that provide it): above it,
--     it gives workers back; below it, it claims unplaced ones;
--   * the states of workers gone from `workers` are dropped once no live
--     process of them is left.
-- It deletes no process row: a stale row of a worker nobody wants may be a
-- worker run by hand that will come back (each manager clears the rows of
-- its own host that the kernel disproves: uniphant.clear_process).
-- startable is false while a live copy of the worker runs on another host
-- (it is moving): a row that host's live manager has proven, or any live
-- row of a host without one.  row_pid and row_live describe the worker's process row on
-- this host, if any: data for the manager, which acts only on processes it
-- forked or finds holding the worker's PID-file lock.  settings go to the
-- worker's config; a paused or done worker is planned, and not started.
-- Rolling restarts move on here too (advance_rolls, with the caller's
-- start_timeout in seconds).  restart_requested: a restart was asked for
-- while the worker waited in backoff (restart_matching): start it now; the
-- request is taken, once.
DO $$
BEGIN
    IF NOT 'restart_requested' = ANY (coalesce((SELECT p.proargnames FROM pg_proc p
            WHERE p.oid = to_regprocedure('uniphant.manager_plan(uuid, double precision)')), '{restart_requested}')) THEN
        DROP FUNCTION uniphant.manager_plan(uuid, double precision);  -- an earlier release's plan
    END IF;
END
$$;
CREATE OR REPLACE FUNCTION uniphant.manager_plan(host_id uuid, start_timeout double precision)
RETURNS TABLE (worker_id uuid, worker_type text, wanted boolean, startable boolean,
               row_pid integer, row_live boolean, restarts integer,
               settings jsonb, paused boolean, done boolean, rolling boolean, restart_requested boolean)
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
#variable_conflict use_column
DECLARE
    here     uuid := manager_plan.host_id;
    provided text[];
    live     uuid[];
    kind     record;
    target   integer;
    mine     integer;
    asked    uuid[];
BEGIN
    PERFORM pg_advisory_xact_lock(hashtext('uniphant.manager_plan'));
    IF uniphant.managed_host() IS DISTINCT FROM here THEN
        RAISE EXCEPTION 'this session is not the manager of host %', here USING ERRCODE = 'UN006';
    END IF;
    SELECT m.worker_types INTO provided FROM uniphant.managers m WHERE m.host_id = here;
    live := ARRAY(SELECT l.host_id FROM uniphant.live_managers() l);
    UPDATE uniphant.worker_states s
    SET host_id = NULL, state = 'unplaced', pid = NULL, since = now(), next_start_at = NULL
    FROM uniphant.workers w
    WHERE w.worker_id = s.worker_id AND w.host_id IS NULL AND s.host_id IS NOT NULL
      AND ((NOT s.host_id = ANY (live)
            AND NOT EXISTS (SELECT 1 FROM uniphant.processes p
                            WHERE p.worker_id = s.worker_id AND uniphant.process_live(p)))
           OR (s.host_id = here AND NOT w.worker_type = ANY (provided)));
    FOR kind IN
        WITH providers AS (SELECT l.worker_types FROM uniphant.live_managers() l)
        SELECT w.worker_type AS name, count(*) AS pool,
               (SELECT count(*) FROM providers pr WHERE w.worker_type = ANY (pr.worker_types)) AS hosts
        FROM uniphant.workers w LEFT JOIN uniphant.worker_states s ON s.worker_id = w.worker_id
        WHERE w.host_id IS NULL AND w.worker_type = ANY (provided)
          AND (s.host_id IS NULL OR s.host_id = ANY (live))
        GROUP BY w.worker_type
    LOOP
        target := ceil(kind.pool::numeric / greatest(kind.hosts, 1));
        SELECT count(*) INTO mine FROM uniphant.workers w
        JOIN uniphant.worker_states s ON s.worker_id = w.worker_id
        WHERE w.host_id IS NULL AND w.worker_type = kind.name AND s.host_id = here;
        IF mine > target THEN
            UPDATE uniphant.worker_states s
            SET host_id = NULL, state = 'unplaced', pid = NULL, since = now(), next_start_at = NULL
            WHERE s.worker_id IN (
                SELECT s2.worker_id FROM uniphant.worker_states s2
                JOIN uniphant.workers w ON w.worker_id = s2.worker_id
                WHERE w.host_id IS NULL AND w.worker_type = kind.name AND s2.host_id = here
                ORDER BY s2.state = 'running', s2.since DESC LIMIT mine - target);
            PERFORM pg_notify('uniphant_fleet', '');
        ELSIF mine < target THEN
            INSERT INTO uniphant.worker_states AS s (worker_id, host_id, state)
            SELECT w.worker_id, here, 'starting' FROM uniphant.workers w
            LEFT JOIN uniphant.worker_states s2 ON s2.worker_id = w.worker_id
            WHERE w.host_id IS NULL AND w.worker_type = kind.name AND s2.host_id IS NULL
            ORDER BY w.added_at, w.worker_id LIMIT target - mine
            ON CONFLICT ON CONSTRAINT worker_states_pkey
            DO UPDATE SET host_id = EXCLUDED.host_id, state = 'starting', since = now();
        END IF;
    END LOOP;
    -- A worker gone from `workers` keeps its state until no live process of it is
    -- left anywhere: until then, the manager of the host where one runs stops it.
    DELETE FROM uniphant.worker_states s
    WHERE NOT EXISTS (SELECT 1 FROM uniphant.workers w WHERE w.worker_id = s.worker_id)
      AND NOT EXISTS (SELECT 1 FROM uniphant.processes p
                      WHERE p.worker_id = s.worker_id AND uniphant.process_live(p));
    DELETE FROM uniphant.worker_events e
    WHERE NOT EXISTS (SELECT 1 FROM uniphant.workers w WHERE w.worker_id = e.worker_id)
      AND NOT EXISTS (SELECT 1 FROM uniphant.worker_states s WHERE s.worker_id = e.worker_id);
    IF start_timeout IS NULL OR start_timeout < 1 OR start_timeout > 86400 THEN
        RAISE EXCEPTION 'start_timeout must be from 1 to 86400 seconds' USING ERRCODE = '22023';
    END IF;
    PERFORM uniphant.advance_rolls(start_timeout);
    WITH taken AS (UPDATE uniphant.worker_states s SET restart_requested = false
                   WHERE s.host_id = here AND s.restart_requested RETURNING s.worker_id)
    SELECT coalesce(array_agg(t.worker_id), '{}') INTO asked FROM taken t;
    RETURN QUERY
    WITH planned AS (
        SELECT w.worker_id, w.worker_type, coalesce(s.restarts, 0) AS restarts, w.settings,
               w.paused_at IS NOT NULL AS paused, w.done_at IS NOT NULL AS done,
               EXISTS (SELECT 1 FROM uniphant.rolls r
                       WHERE r.halted IS NULL AND w.worker_id = ANY (r.current)) AS rolling
        FROM uniphant.workers w LEFT JOIN uniphant.worker_states s ON s.worker_id = w.worker_id
        WHERE w.host_id = here OR (w.host_id IS NULL AND s.host_id = here))
    SELECT pl.worker_id, pl.worker_type, true,
           NOT EXISTS (SELECT 1 FROM uniphant.processes p WHERE p.worker_id = pl.worker_id
                       AND p.host_id IS DISTINCT FROM here AND uniphant.process_live(p)
                       AND (p.proven OR NOT coalesce(p.host_id = ANY (live), false))),
           p.pid, uniphant.process_live(p), pl.restarts, pl.settings, pl.paused, pl.done, pl.rolling,
           pl.worker_id = ANY (asked)
    FROM planned pl
    LEFT JOIN uniphant.processes p ON p.worker_id = pl.worker_id AND p.host_id = here
    UNION ALL
    SELECT p.worker_id, p.worker_type, false, false, p.pid, true, 0, '{}'::jsonb, false, false, false, false
    FROM uniphant.processes p
    WHERE p.host_id = here AND uniphant.process_live(p)
      AND p.id NOT IN (SELECT m.process_id FROM uniphant.managers m)
      AND (EXISTS (SELECT 1 FROM uniphant.workers w WHERE w.worker_id = p.worker_id)
           OR EXISTS (SELECT 1 FROM uniphant.worker_states s WHERE s.worker_id = p.worker_id))
      AND NOT EXISTS (SELECT 1 FROM planned pl WHERE pl.worker_id = p.worker_id);
END
$$;

-- The plan as the previous release's managers ask for it (start_timeout: its default).
CREATE OR REPLACE FUNCTION uniphant.manager_plan(host_id uuid)
RETURNS TABLE (worker_id uuid, worker_type text, wanted boolean, startable boolean,
               row_pid integer, row_live boolean, restarts integer,
               settings jsonb, paused boolean, done boolean, rolling boolean)
LANGUAGE sql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
    SELECT p.worker_id, p.worker_type, p.wanted, p.startable, p.row_pid, p.row_live, p.restarts, p.settings,
           p.paused, p.done, p.rolling
    FROM uniphant.manager_plan($1, 30) p;
$$;

-- A manager records what happened to a worker it is planned to run (state
-- NULL: it forgets a worker it no longer runs), and its history gets a row
-- when the state, PID or reason changes.  A report about a worker that is
-- not planned on the manager's host (placement moved since its last plan)
-- changes nothing; values no manager sends are refused (22023).  A report
-- of `done` repeats what the desired state said (done_at): it never marks a
-- worker done, which could undo a resume or restart made since.
DROP FUNCTION IF EXISTS uniphant.report_worker(uuid, text, integer, integer, text, double precision);
DROP FUNCTION IF EXISTS uniphant.report_worker(uuid, text, integer, integer, text, double precision, text);
CREATE OR REPLACE FUNCTION uniphant.report_worker(
    worker_id uuid, state text, pid integer DEFAULT NULL, restarts integer DEFAULT 0,
    last_exit text DEFAULT NULL, next_start_in double precision DEFAULT NULL, log_tail text DEFAULT NULL,
    warnings text DEFAULT NULL)
RETURNS void
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
#variable_conflict use_column
DECLARE
    here   uuid := uniphant.managed_host();
    before uniphant.worker_states%ROWTYPE;
BEGIN
    IF report_worker.state IS NULL THEN  -- kept while a live process of it is left (manager_plan)
        DELETE FROM uniphant.worker_states s WHERE s.worker_id = report_worker.worker_id AND s.host_id = here
            AND NOT EXISTS (SELECT 1 FROM uniphant.processes p
                            WHERE p.worker_id = report_worker.worker_id AND uniphant.process_live(p));
        RETURN;
    END IF;
    IF report_worker.state NOT IN ('starting', 'running', 'backoff', 'moving', 'paused', 'done')
       OR report_worker.pid <= 0 OR report_worker.restarts IS NULL OR report_worker.restarts < 0
       OR report_worker.next_start_in < 0 OR report_worker.next_start_in > 86400 THEN
        RAISE EXCEPTION 'not a report a manager makes: state %, PID %, restarts %, next start in % s',
            report_worker.state, report_worker.pid, report_worker.restarts, report_worker.next_start_in
            USING ERRCODE = '22023';
    END IF;
    SELECT * INTO before FROM uniphant.worker_states s WHERE s.worker_id = report_worker.worker_id;
    IF EXISTS (SELECT 1 FROM uniphant.workers w WHERE w.worker_id = report_worker.worker_id
               AND w.host_id = here) THEN
        INSERT INTO uniphant.worker_states AS s
            (worker_id, host_id, state, pid, restarts, last_exit, next_start_at, log_tail, warnings)
        VALUES (report_worker.worker_id, here, report_worker.state, report_worker.pid,
                report_worker.restarts, left(report_worker.last_exit, 500),
                now() + make_interval(secs => report_worker.next_start_in), left(report_worker.log_tail, 4096),
                left(report_worker.warnings, 4096))
        ON CONFLICT ON CONSTRAINT worker_states_pkey DO UPDATE
        SET host_id = EXCLUDED.host_id, state = EXCLUDED.state, pid = EXCLUDED.pid, warnings = EXCLUDED.warnings,
            restarts = EXCLUDED.restarts, last_exit = EXCLUDED.last_exit,
            next_start_at = EXCLUDED.next_start_at, log_tail = coalesce(EXCLUDED.log_tail, s.log_tail),
            since = CASE WHEN s.state = EXCLUDED.state THEN s.since ELSE now() END;
    ELSE
        -- An any-host worker: the planner made the claim; only its holder updates it.
        UPDATE uniphant.worker_states s
        SET state = report_worker.state, pid = report_worker.pid, restarts = report_worker.restarts,
            last_exit = left(report_worker.last_exit, 500),
            next_start_at = now() + make_interval(secs => report_worker.next_start_in),
            log_tail = coalesce(left(report_worker.log_tail, 4096), s.log_tail),
            warnings = left(report_worker.warnings, 4096),
            since = CASE WHEN s.state = report_worker.state THEN s.since ELSE now() END
        WHERE s.worker_id = report_worker.worker_id AND s.host_id = here
          AND EXISTS (SELECT 1 FROM uniphant.workers w WHERE w.worker_id = report_worker.worker_id
                      AND w.host_id IS NULL);
        IF NOT FOUND THEN
            RETURN;
        END IF;
    END IF;
    IF (before.state, before.pid, before.last_exit) IS DISTINCT FROM
       (report_worker.state, report_worker.pid, left(report_worker.last_exit, 500)) THEN
        INSERT INTO uniphant.worker_events (worker_id, host_id, state, pid, last_exit)
        VALUES (report_worker.worker_id, here, report_worker.state, report_worker.pid,
                left(report_worker.last_exit, 500));
        DELETE FROM uniphant.worker_events e
        WHERE e.worker_id = report_worker.worker_id AND e.id <= (
            SELECT e2.id FROM uniphant.worker_events e2 WHERE e2.worker_id = report_worker.worker_id
            ORDER BY e2.id DESC OFFSET 50 LIMIT 1);
    END IF;
    -- A worker of a rolling restart's batch that runs again, or failed, moves the roll on.
    IF report_worker.state IN ('running', 'backoff') AND EXISTS (
            SELECT 1 FROM uniphant.rolls r WHERE report_worker.worker_id = ANY (r.current) AND r.halted IS NULL) THEN
        PERFORM pg_notify('uniphant_fleet', '');
    END IF;
END
$$;

-- Watchers of the fleet (the page, `ps --watch`) hear of every change the
-- managers report on their own channel; the managers do not listen to it.
CREATE OR REPLACE FUNCTION uniphant.notify_watchers() RETURNS trigger
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    PERFORM pg_notify('uniphant_watch', '');
    RETURN NULL;
END
$$;

DROP TRIGGER IF EXISTS worker_states_notify_watchers ON uniphant.worker_states;
CREATE TRIGGER worker_states_notify_watchers AFTER INSERT OR UPDATE OR DELETE ON uniphant.worker_states
    FOR EACH STATEMENT EXECUTE FUNCTION uniphant.notify_watchers();

-- The manager of a host found that no process of worker_id runs there as
-- PID pid (no process holds the worker's PID-file lock, and that PID has not
-- the worker's PID file open): the process row of the worker on its host
-- naming that PID (or no PID) is stale, or forged, and goes.  Rows of other
-- hosts are not the manager's to judge.
CREATE OR REPLACE FUNCTION uniphant.clear_process(worker_id uuid, pid integer) RETURNS boolean
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    here uuid := uniphant.managed_host();
BEGIN
    DELETE FROM uniphant.processes p
    WHERE p.worker_id = clear_process.worker_id AND p.host_id = here
      AND p.pid IS NOT DISTINCT FROM clear_process.pid AND p.id <> uniphant.process_id();
    RETURN FOUND;
END
$$;

-- The manager of a host found PID pid holding worker_id's PID-file lock there:
-- the worker's process row on its host that names that PID is a running copy.
CREATE OR REPLACE FUNCTION uniphant.prove_process(worker_id uuid, pid integer) RETURNS boolean
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    here uuid := uniphant.managed_host();
BEGIN
    UPDATE uniphant.processes p SET proven = true
    WHERE p.worker_id = prove_process.worker_id AND p.host_id = here AND p.pid = prove_process.pid
      AND NOT p.proven;
    RETURN FOUND;
END
$$;

-- The process rows of the calling manager's host (but the managers' own), for
-- it to prove or clear: what the kernel says of each is its word, not theirs.
CREATE OR REPLACE FUNCTION uniphant.host_processes()
RETURNS TABLE (worker_id uuid, worker_type text, pid integer, proven boolean)
LANGUAGE plpgsql STABLE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
#variable_conflict use_column
DECLARE
    here uuid := uniphant.managed_host();
BEGIN
    RETURN QUERY SELECT p.worker_id, p.worker_type, p.pid, p.proven FROM uniphant.processes p
    WHERE p.host_id = here AND p.id NOT IN (SELECT m.process_id FROM uniphant.managers m);
END
$$;

-- Which of worker_ids the desired state still holds: a manager keeps their
-- log and PID files, and removes those of the others once old enough.
CREATE OR REPLACE FUNCTION uniphant.desired_workers(worker_ids uuid[]) RETURNS SETOF uuid
LANGUAGE plpgsql STABLE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    PERFORM uniphant.managed_host();
    RETURN QUERY SELECT w.worker_id FROM uniphant.workers w WHERE w.worker_id = ANY (worker_ids);
END
$$;

-- The operators' API: change what should run.  Each is one statement, so
-- the managers learn of it by one notification.
DROP FUNCTION IF EXISTS uniphant.add_worker(text, uuid);  -- release 3 gave it settings
CREATE OR REPLACE FUNCTION uniphant.add_worker(worker_type text, host_id uuid DEFAULT NULL,
                                               settings jsonb DEFAULT '{}')
RETURNS uuid
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    added uuid;
BEGIN
    PERFORM uniphant.check_worker_type(add_worker.worker_type);
    PERFORM uniphant.check_settings(add_worker.settings);
    INSERT INTO uniphant.workers (worker_type, host_id, settings)
    VALUES (add_worker.worker_type, add_worker.host_id, add_worker.settings)
    RETURNING worker_id INTO added;
    RETURN added;
END
$$;

-- Raises 22023, saying what is wrong, unless settings are a desired worker's.
CREATE OR REPLACE FUNCTION uniphant.check_settings(settings jsonb) RETURNS void
LANGUAGE plpgsql IMMUTABLE SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    problem text := uniphant.settings_problem(settings);
BEGIN
    IF problem IS NOT NULL THEN
        RAISE EXCEPTION 'bad settings: %', problem USING ERRCODE = '22023';
    END IF;
END
$$;

-- Raises 22023 if worker_type is a manager's (uniphant.manager, or the type of
-- any registered manager): a manager runs once per host of its own accord and
-- never forks a copy of itself, which would read its configuration.
CREATE OR REPLACE FUNCTION uniphant.check_worker_type(worker_type text) RETURNS void
LANGUAGE plpgsql STABLE SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    IF worker_type = 'uniphant.manager' OR EXISTS (
            SELECT 1 FROM uniphant.managers m JOIN uniphant.processes p ON p.id = m.process_id
            WHERE p.worker_type = check_worker_type.worker_type) THEN
        RAISE EXCEPTION 'worker type % is a manager''s, which runs once per host of its own accord: '
                        'it is never a desired worker', format('%L', left(worker_type, 100))
            USING ERRCODE = '22023';
    END IF;
END
$$;

-- Gives a worker new settings, and restarts it (its process row deleted: its
-- manager starts it again at once, with them): that worker only.
CREATE OR REPLACE FUNCTION uniphant.set_worker_settings(worker_id uuid, settings jsonb) RETURNS boolean
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    PERFORM uniphant.check_settings(set_worker_settings.settings);
    UPDATE uniphant.workers w SET settings = set_worker_settings.settings
    WHERE w.worker_id = set_worker_settings.worker_id;
    IF NOT FOUND THEN
        RETURN false;
    END IF;
    DELETE FROM uniphant.processes p WHERE p.worker_id = set_worker_settings.worker_id;
    RETURN true;
END
$$;

-- Pausing stops a worker's process cleanly and keeps its id, settings and
-- history; resuming starts it again at once, without counting a failure, and
-- brings back a done worker too.  Each verb has one body for one worker (by
-- its id) or every worker of a type (worker_id NULL): the *_worker function
-- says whether it changed it, the *_workers one how many.
CREATE OR REPLACE FUNCTION uniphant.pause_matching(worker_id uuid, worker_type text) RETURNS integer
LANGUAGE sql SET search_path = pg_catalog, pg_temp AS $$
    WITH changed AS (UPDATE uniphant.workers w SET paused_at = now()
                     WHERE (w.worker_id = pause_matching.worker_id OR w.worker_type = pause_matching.worker_type)
                       AND w.paused_at IS NULL RETURNING 1)
    SELECT count(*)::integer FROM changed;
$$;

CREATE OR REPLACE FUNCTION uniphant.resume_matching(worker_id uuid, worker_type text) RETURNS integer
LANGUAGE sql SET search_path = pg_catalog, pg_temp AS $$
    WITH changed AS (UPDATE uniphant.workers w SET paused_at = NULL, done_at = NULL
                     WHERE (w.worker_id = resume_matching.worker_id OR w.worker_type = resume_matching.worker_type)
                       AND (w.paused_at IS NOT NULL OR w.done_at IS NOT NULL) RETURNING 1)
    SELECT count(*)::integer FROM changed;
$$;

CREATE OR REPLACE FUNCTION uniphant.pause_worker(worker_id uuid) RETURNS boolean
LANGUAGE sql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
    SELECT uniphant.pause_matching(pause_worker.worker_id, NULL) > 0;
$$;

CREATE OR REPLACE FUNCTION uniphant.resume_worker(worker_id uuid) RETURNS boolean
LANGUAGE sql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
    SELECT uniphant.resume_matching(resume_worker.worker_id, NULL) > 0;
$$;

CREATE OR REPLACE FUNCTION uniphant.pause_workers(worker_type text) RETURNS integer
LANGUAGE sql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
    SELECT uniphant.pause_matching(NULL, pause_workers.worker_type);
$$;

CREATE OR REPLACE FUNCTION uniphant.resume_workers(worker_type text) RETURNS integer
LANGUAGE sql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
    SELECT uniphant.resume_matching(NULL, resume_workers.worker_type);
$$;

-- Makes n the number of workers of worker_type on host_id (NULL: any-host
-- workers); returns how many it added (negative: removed).  Removes workers
-- that do not run first, then the newest.
CREATE OR REPLACE FUNCTION uniphant.scale(worker_type text, n integer, host_id uuid DEFAULT NULL)
RETURNS integer
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
#variable_conflict use_column
DECLARE
    now_there integer;
BEGIN
    IF n IS NULL OR n < 0 OR n > 100000 THEN
        RAISE EXCEPTION 'n must be from 0 to 100000' USING ERRCODE = '22023';
    END IF;
    PERFORM uniphant.check_worker_type(scale.worker_type) WHERE n > 0;  -- scaling one to 0 may remove it
    PERFORM pg_advisory_xact_lock(hashtext('uniphant.scale'));
    SELECT count(*) INTO now_there FROM uniphant.workers w
    WHERE w.worker_type = scale.worker_type AND w.host_id IS NOT DISTINCT FROM scale.host_id;
    IF n > now_there THEN
        INSERT INTO uniphant.workers (worker_type, host_id)
        SELECT scale.worker_type, scale.host_id FROM generate_series(1, n - now_there);
    ELSIF n < now_there THEN
        DELETE FROM uniphant.workers w WHERE w.worker_id IN (
            SELECT w2.worker_id FROM uniphant.workers w2
            WHERE w2.worker_type = scale.worker_type AND w2.host_id IS NOT DISTINCT FROM scale.host_id
            ORDER BY EXISTS (SELECT 1 FROM uniphant.processes p WHERE p.worker_id = w2.worker_id),
                     w2.added_at DESC
            LIMIT now_there - n);
    END IF;
    RETURN n - now_there;
END
$$;

CREATE OR REPLACE FUNCTION uniphant.remove_matching(worker_id uuid, worker_type text) RETURNS integer
LANGUAGE sql SET search_path = pg_catalog, pg_temp AS $$
    WITH gone AS (DELETE FROM uniphant.workers w
                  WHERE w.worker_id = remove_matching.worker_id OR w.worker_type = remove_matching.worker_type
                  RETURNING 1)
    SELECT count(*)::integer FROM gone;
$$;

CREATE OR REPLACE FUNCTION uniphant.remove_worker(worker_id uuid) RETURNS boolean
LANGUAGE sql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
    SELECT uniphant.remove_matching(remove_worker.worker_id, NULL) > 0;
$$;

CREATE OR REPLACE FUNCTION uniphant.remove_workers(worker_type text) RETURNS integer
LANGUAGE sql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
    SELECT uniphant.remove_matching(NULL, remove_workers.worker_type);
$$;

-- A restart ends the worker's process (its row deleted): its manager starts
-- it again at once, without backoff.  A done worker is started again, and so
-- is one waiting in backoff, now (restart_requested, for its manager's plan).
-- One body for a worker (by its id) or every worker of a type; how many it
-- restarts (their processes ended, done, or waiting).
CREATE OR REPLACE FUNCTION uniphant.restart_matching(worker_id uuid, worker_type text) RETURNS integer
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    ended   integer;
    revived integer;
    hurried integer;
BEGIN
    WITH waiting AS (UPDATE uniphant.worker_states s SET restart_requested = true FROM uniphant.workers w
                     WHERE w.worker_id = s.worker_id AND s.state = 'backoff' AND w.paused_at IS NULL
                       AND (w.worker_id = restart_matching.worker_id OR w.worker_type = restart_matching.worker_type)
                     RETURNING 1)
    SELECT count(*)::integer INTO hurried FROM waiting;
    IF hurried > 0 THEN
        PERFORM pg_notify('uniphant_fleet', '');
    END IF;
    WITH back AS (UPDATE uniphant.workers w SET done_at = NULL
                  WHERE (w.worker_id = restart_matching.worker_id OR w.worker_type = restart_matching.worker_type)
                    AND w.done_at IS NOT NULL RETURNING 1)
    SELECT count(*)::integer INTO revived FROM back;
    WITH gone AS (DELETE FROM uniphant.processes p USING uniphant.workers w
                  WHERE w.worker_id = p.worker_id
                    AND (w.worker_id = restart_matching.worker_id OR w.worker_type = restart_matching.worker_type)
                  RETURNING 1)
    SELECT count(*)::integer INTO ended FROM gone;
    RETURN ended + revived + hurried;
END
$$;

CREATE OR REPLACE FUNCTION uniphant.restart_worker(worker_id uuid) RETURNS boolean
LANGUAGE sql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
    SELECT uniphant.restart_matching(restart_worker.worker_id, NULL) > 0;
$$;

-- Restarts every worker of a type: all at once (batch NULL; a roll under way
-- ends), or as a rolling restart, batch at a time (advance_rolls), starting
-- now; done workers start again at once.  Returns how many workers it
-- restarts (at once, or done), or will (rolling).
DROP FUNCTION IF EXISTS uniphant.restart_workers(text);  -- release 3 gave it batch
CREATE OR REPLACE FUNCTION uniphant.restart_workers(worker_type text, batch integer DEFAULT NULL)
RETURNS integer
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    count   integer;
    revived integer;
BEGIN
    IF batch IS NOT NULL AND (batch < 1 OR batch > 100000) THEN
        RAISE EXCEPTION 'batch must be from 1 to 100000' USING ERRCODE = '22023';
    END IF;
    PERFORM pg_advisory_xact_lock(hashtext('uniphant.manager_plan'));
    DELETE FROM uniphant.rolls r WHERE r.worker_type = restart_workers.worker_type;
    IF batch IS NULL THEN
        RETURN uniphant.restart_matching(NULL, restart_workers.worker_type);
    END IF;
    WITH back AS (UPDATE uniphant.workers w SET done_at = NULL
                  WHERE w.worker_type = restart_workers.worker_type AND w.done_at IS NOT NULL RETURNING 1)
    SELECT count(*)::integer INTO revived FROM back;
    SELECT count(*)::integer INTO count FROM uniphant.workers w
    WHERE w.worker_type = restart_workers.worker_type
      AND EXISTS (SELECT 1 FROM uniphant.processes p WHERE p.worker_id = w.worker_id AND uniphant.process_live(p));
    IF count > 0 THEN
        INSERT INTO uniphant.rolls (worker_type, batch) VALUES (restart_workers.worker_type, restart_workers.batch);
        PERFORM uniphant.advance_rolls();
    END IF;
    RETURN count + revived;
END
$$;

-- One row per desired worker, what it is doing, why (detail) and why its
-- last run ended; then every process that no desired worker accounts for
-- (managers, workers started by hand, workers that are being stopped).  A
-- worker's state is its manager's word while that manager is live; done,
-- paused and rolling (in the batch of a rolling restart, not yet back) are
-- the desired state's.
CREATE OR REPLACE VIEW uniphant.fleet AS
WITH lm AS (
    SELECT * FROM uniphant.live_managers()
), live AS (
    -- A row of a host with a live manager is a running copy once that manager has
    -- proven it (vouched): until then, or if it is forged, it names no process.
    SELECT p.*, uniphant.process_live(p) AS live,
           p.proven OR p.id IN (SELECT m.process_id FROM uniphant.managers m)
               OR NOT coalesce(p.host_id IN (SELECT lm.host_id FROM lm), false) AS vouched
    FROM uniphant.processes p
), placed AS (
    SELECT w.*, s.host_id AS state_host, s.state AS reported, s.pid AS state_pid, s.since,
           s.restarts, s.last_exit, s.next_start_at, s.log_tail, s.warnings, r.halted AS roll_halted,
           r.waiting AS roll_waiting,
           CASE
               WHEN w.done_at IS NOT NULL THEN 'done'
               WHEN w.paused_at IS NOT NULL THEN 'paused'
               WHEN r.halted IS NULL AND w.worker_id = ANY (r.current) AND s.state IS DISTINCT FROM 'backoff'
                    AND NOT EXISTS (SELECT 1 FROM live p WHERE p.worker_id = w.worker_id AND p.live
                                    AND p.vouched AND p.started_at > r.batch_started_at) THEN 'rolling'
               WHEN s.host_id IN (SELECT lm.host_id FROM lm) THEN s.state
               WHEN EXISTS (SELECT 1 FROM live p WHERE p.worker_id = w.worker_id AND p.live)
                   THEN 'running unsupervised'
               WHEN w.host_id IS NOT NULL THEN 'waiting for its host'
               ELSE 'unplaced'
           END AS state
    FROM uniphant.workers w
    LEFT JOIN uniphant.worker_states s ON s.worker_id = w.worker_id
    LEFT JOIN uniphant.rolls r ON r.worker_type = w.worker_type
)
SELECT pl.worker_id, pl.worker_type, pl.state,
       coalesce(hp.name, hs.name, hw.name) AS host,
       coalesce(p.host_id, pl.state_host, pl.host_id) AS host_id,
       pl.host_id IS NOT NULL AS pinned,
       p.pid, coalesce(pl.since, p.started_at) AS since, coalesce(pl.restarts, 0) AS restarts,
       pl.last_exit, pl.next_start_at, p.heartbeat_at,
       coalesce(CASE pl.state
           WHEN 'moving' THEN 'its copy on host ' || coalesce(hp.name, '?') || ' still runs'
           WHEN 'waiting for its host' THEN 'its host has no live manager'
           WHEN 'unplaced' THEN
               CASE WHEN EXISTS (SELECT 1 FROM lm WHERE pl.worker_type = ANY (lm.worker_types))
                    THEN 'no manager has claimed it yet'
                    ELSE 'no live manager provides worker type ' || pl.worker_type END
           WHEN 'running unsupervised' THEN 'its manager is not live'
           WHEN 'paused' THEN CASE WHEN p.pid IS NOT NULL THEN 'its process is stopping' END
           WHEN 'rolling' THEN coalesce(pl.roll_waiting, 'restarting in a rolling restart')
       END, 'rolling restart halted: ' || pl.roll_halted) AS detail,
       pl.settings, pl.paused_at, pl.done_at, pl.log_tail, pl.warnings
FROM placed pl
LEFT JOIN live p ON p.worker_id = pl.worker_id AND p.live AND p.vouched
LEFT JOIN uniphant.hosts hp ON hp.id = p.host_id
LEFT JOIN uniphant.hosts hs ON hs.id = pl.state_host
LEFT JOIN uniphant.hosts hw ON hw.id = pl.host_id
UNION ALL
SELECT p.worker_id, p.worker_type,
       CASE WHEN m.host_id IS NOT NULL THEN 'manager' ELSE 'not wanted' END,
       h.name, p.host_id, false, CASE WHEN p.vouched THEN p.pid END, p.started_at, 0, NULL, NULL,
       p.heartbeat_at, NULL, NULL, NULL, NULL, NULL, NULL
FROM live p
LEFT JOIN uniphant.hosts h ON h.id = p.host_id
LEFT JOIN uniphant.managers m ON m.process_id = p.id
WHERE p.live AND NOT EXISTS (SELECT 1 FROM uniphant.workers w WHERE w.worker_id = p.worker_id);

REVOKE ALL ON uniphant.fleet FROM PUBLIC;

-- ---------------------------------------------------------------------------
-- Privileges: each role's part, given with one call by the owner
-- ---------------------------------------------------------------------------

-- Gives role (a role name, or PUBLIC) what a worker, a manager (a worker's
-- part too) or an operator needs, and records it: every later load of this
-- file gives it what its part needs then.
CREATE OR REPLACE FUNCTION uniphant.grant_role(role name, kind text) RETURNS void
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    grantee text := CASE WHEN role = 'PUBLIC' THEN 'PUBLIC' ELSE quote_ident(role) END;
    object  text;
BEGIN
    IF kind IS NULL OR kind NOT IN ('worker', 'manager', 'operator') THEN
        RAISE EXCEPTION 'kind must be worker, manager or operator, not %', kind USING ERRCODE = '22023';
    END IF;
    IF role <> 'PUBLIC' AND NOT EXISTS (SELECT FROM pg_catalog.pg_roles r WHERE r.rolname = grant_role.role) THEN
        RAISE EXCEPTION 'role "%" does not exist: CREATE ROLE % LOGIN PASSWORD ''...'' first (as a role with CREATEROLE)',
            role, quote_ident(role) USING ERRCODE = '42704';
    END IF;
    INSERT INTO uniphant.role_grants VALUES (role, kind) ON CONFLICT DO NOTHING;
    EXECUTE 'GRANT USAGE ON SCHEMA uniphant TO ' || grantee;
    FOREACH object IN ARRAY uniphant.privileges_of(kind) LOOP
        EXECUTE format('GRANT %s TO %s', object, grantee);
    END LOOP;
END
$$;

-- Takes back every part grant_role() gave role.
CREATE OR REPLACE FUNCTION uniphant.revoke_role(role name) RETURNS void
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    grantee text := CASE WHEN role = 'PUBLIC' THEN 'PUBLIC' ELSE quote_ident(role) END;
    object  text;
BEGIN
    DELETE FROM uniphant.role_grants g WHERE g.role = revoke_role.role;
    FOREACH object IN ARRAY uniphant.privileges_of('manager') || uniphant.privileges_of('operator') LOOP
        EXECUTE format('REVOKE %s FROM %s', object, grantee);
    END LOOP;
    EXECUTE 'REVOKE USAGE ON SCHEMA uniphant FROM ' || grantee;
END
$$;

-- What each part may use: the one list of privileges.  A manager is a worker
-- too; every part connects, and asks the server's generation as it does.  An
-- operator reads every host and every manager that ever registered, so that a
-- manager that is down shows as such (docs/page.md, "Seeing the fleet").
CREATE OR REPLACE FUNCTION uniphant.privileges_of(kind text) RETURNS text[]
LANGUAGE sql IMMUTABLE SET search_path = pg_catalog, pg_temp AS $$
    SELECT array_agg(p.privilege ORDER BY p.n) FROM (VALUES
        (0, 'every', 'EXECUTE ON FUNCTION uniphant.server_generation()'),
        (1, 'worker', 'EXECUTE ON FUNCTION uniphant.register_host(uuid, text)'),
        (2, 'worker', 'EXECUTE ON FUNCTION uniphant.register_process(uuid, uuid, text, integer, interval, '
                      'boolean, integer)'),
        (3, 'worker', 'EXECUTE ON FUNCTION uniphant.keepalive()'),
        (4, 'worker', 'EXECUTE ON FUNCTION uniphant.disconnect()'),
        (5, 'worker', 'EXECUTE ON FUNCTION uniphant.finish()'),
        (6, 'manager', 'EXECUTE ON FUNCTION uniphant.register_manager(uuid)'),
        (7, 'manager', 'EXECUTE ON FUNCTION uniphant.set_worker_types(text[])'),
        (8, 'manager', 'EXECUTE ON FUNCTION uniphant.manager_plan(uuid)'),
        (9, 'manager', 'EXECUTE ON FUNCTION uniphant.report_worker(uuid, text, integer, integer, text, '
                       'double precision, text, text)'),
        (10, 'manager', 'EXECUTE ON FUNCTION uniphant.clear_process(uuid, integer)'),
        (11, 'manager', 'EXECUTE ON FUNCTION uniphant.desired_workers(uuid[])'),
        (12, 'manager', 'EXECUTE ON FUNCTION uniphant.prove_process(uuid, integer)'),
        (13, 'manager', 'EXECUTE ON FUNCTION uniphant.manager_plan(uuid, double precision)'),
        (14, 'manager', 'EXECUTE ON FUNCTION uniphant.host_processes()'),
        (15, 'operator', 'EXECUTE ON FUNCTION uniphant.add_worker(text, uuid, jsonb)'),
        (16, 'operator', 'EXECUTE ON FUNCTION uniphant.set_worker_settings(uuid, jsonb)'),
        (17, 'operator', 'EXECUTE ON FUNCTION uniphant.scale(text, integer, uuid)'),
        (18, 'operator', 'EXECUTE ON FUNCTION uniphant.remove_worker(uuid)'),
        (19, 'operator', 'EXECUTE ON FUNCTION uniphant.remove_workers(text)'),
        (20, 'operator', 'EXECUTE ON FUNCTION uniphant.restart_worker(uuid)'),
        (21, 'operator', 'EXECUTE ON FUNCTION uniphant.restart_workers(text, integer)'),
        (22, 'operator', 'EXECUTE ON FUNCTION uniphant.pause_worker(uuid)'),
        (23, 'operator', 'EXECUTE ON FUNCTION uniphant.resume_worker(uuid)'),
        (24, 'operator', 'EXECUTE ON FUNCTION uniphant.pause_workers(text)'),
        (25, 'operator', 'EXECUTE ON FUNCTION uniphant.resume_workers(text)'),
        (26, 'operator', 'EXECUTE ON FUNCTION uniphant.process_live(uniphant.processes)'),
        (27, 'operator', 'EXECUTE ON FUNCTION uniphant.session_exists(uuid, name)'),
        (28, 'operator', 'EXECUTE ON FUNCTION uniphant.live_managers()'),
        (29, 'operator', 'SELECT ON uniphant.fleet'),
        (30, 'operator', 'SELECT ON uniphant.worker_events'),
        (31, 'operator', 'SELECT ON uniphant.managers'),
        (32, 'operator', 'SELECT ON uniphant.hosts'),
        (33, 'operator', 'SELECT ON uniphant.settings')) AS p (n, part, privilege)
    WHERE p.part IN (kind, 'every') OR (kind = 'manager' AND p.part = 'worker');
$$;

-- Nothing here is anyone's but its owner's unless a part gives it: every
-- function (made by this file or by an earlier release) is taken from PUBLIC,
-- but the version, which any role may read to learn what to load.
DO $$
DECLARE
    f regprocedure;
BEGIN
    FOR f IN SELECT p.oid FROM pg_proc p WHERE p.pronamespace = 'uniphant'::regnamespace LOOP
        EXECUTE format('REVOKE ALL ON FUNCTION %s FROM PUBLIC', f);
    END LOOP;
END
$$;
GRANT EXECUTE ON FUNCTION uniphant.schema_version() TO PUBLIC;

-- The roles of an earlier release keep their part; every recorded role gets
-- what its part needs now.
DO $$
BEGIN
    IF to_regclass('pg_temp.uniphant_earlier_grants') IS NOT NULL THEN
        PERFORM uniphant.grant_role(g.role, g.kind) FROM pg_temp.uniphant_earlier_grants g
        WHERE g.role = 'PUBLIC' OR EXISTS (SELECT 1 FROM pg_roles r WHERE r.rolname = g.role);
    END IF;
    DELETE FROM uniphant.role_grants g
    WHERE g.role <> 'PUBLIC' AND NOT EXISTS (SELECT 1 FROM pg_roles r WHERE r.rolname = g.role);
    PERFORM uniphant.grant_role(g.role, g.kind) FROM uniphant.role_grants g;
END
$$;

COMMIT;
