"""The trust model (docs/trust-model.md, "Trust model"): the database is input, not authority.

No row, from any role, makes a manager act on a process it did not fork or
find holding a worker's PID-file lock in its own root; no role gains a
privilege it was not given, through our functions or through objects it
creates; what operators read cannot drive their terminal.  Each test tries
the attack as a role the README hands out would.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import uuid

import pg8000.dbapi
import pytest

import pgserver  # dev/pgserver.py, on the path by conftest.py
import uniphant
from conftest import another_host, fleet, host_of, ops, running, with_manager
from test_uniphant import REPO, assert_clean_error, gone, session_of, start_daemon, wait_for

pytestmark = pytest.mark.own_database  # a manager acts on every worker its database holds

VICTIM = """\
import signal, sys, time
signal.signal(signal.SIGTERM, lambda *_: open(sys.argv[1], "w").write("SIGTERM"))
print("ready", flush=True)
time.sleep(3600)
"""


@pytest.fixture
def victim(tmp_path):
    """A process that no manager should ever signal, in a group and session of its
    own (a group leader), and the file it writes if SIGTERM reaches it."""
    marker = tmp_path / "signalled"
    child = subprocess.Popen([sys.executable, "-c", VICTIM, str(marker)], stdout=subprocess.PIPE,
                             text=True, start_new_session=True)
    assert child.stdout.readline() == "ready\n"
    yield child.pid, marker
    child.kill()
    child.wait()


def forge(db, role: str, password: str, worker_id: str, host_id: str, pid: int,
          stale_after: str = "1 day"):
    """A session of role that registers a process row for worker_id on host_id
    naming pid: a forgery, as a role with only the worker functions can make."""
    conn = session_of(db, role, password, str(uuid.uuid4()))
    conn.cursor().execute("SELECT register_process(%s::uuid, %s::uuid, 'test.probe', %s, %s::interval)",
                          (worker_id, host_id, pid, stale_after))
    return conn


def manager_log(project, manager_id: str) -> str:
    return project.log(manager_id, "uniphant.manager")


# ---------------------------------------------------------------------------
# What a manager does to the operating system
# ---------------------------------------------------------------------------

@pytest.mark.faults
@pytest.mark.parametrize("target", ["an innocent process", "a process group leader", "the manager itself",
                                    "PID 1"])
def test_no_row_makes_a_manager_signal_a_process_it_neither_forked_nor_finds_holding_a_lock(
        project, db, make_role, victim, target):
    manager_id = with_manager(project)
    host = host_of(project)
    manager_pid = project.running_pid(manager_id, "uniphant.manager")
    victim_pid, marker = victim
    if target == "an innocent process":
        innocent = subprocess.Popen([sys.executable, "-c", VICTIM, str(marker)], stdout=subprocess.PIPE,
                                    text=True)  # in the test's own group: not a leader
        assert innocent.stdout.readline() == "ready\n"
        victim_pid = innocent.pid
    pid = {"the manager itself": manager_pid, "PID 1": 1}.get(target, victim_pid)
    role, password = make_role("forger")
    # A desired worker that should run elsewhere, and a forged live row of it here.
    elsewhere = str(db.value("SELECT add_worker('test.probe', %s::uuid)", str(uuid.uuid4())))
    forger = forge(db, role, password, elsewhere, host, pid)
    try:
        # A worker added afterwards runs: the manager has planned with the forged row there.
        worker = str(db.value("SELECT add_worker('test.probe', %s::uuid)", host))
        wait_for(lambda: fleet(db, worker).get("state") == "running", what="a plan after the forgery")
        assert not gone(pid) and not marker.exists()
        assert project.running_pid(manager_id, "uniphant.manager") == manager_pid
        assert elsewhere not in manager_log(project, manager_id)
    finally:
        forger.close()
        if target == "an innocent process":
            innocent.kill()
            innocent.wait()


@pytest.mark.faults
@pytest.mark.parametrize("forger", ["the workers' own role, left behind", "another role, still connected"])
def test_a_forged_row_cannot_keep_a_desired_worker_from_starting_on_its_host(project, db, make_role, victim,
                                                                           forger):
    manager_id = with_manager(project)
    host = host_of(project)
    worker = str(uuid.uuid4())
    if forger.startswith("the workers' own role"):  # the tests' workers log in as the superuser
        left = db.connect(application_name=str(uuid.uuid4()))
        left.cursor().execute("SELECT register_process(%s::uuid, %s::uuid, 'test.probe', %s, '1 day')",
                              (worker, host, victim[0]))
        left.close()
        conn = db.connect()
    else:
        conn = forge(db, *make_role("forger"), worker, host, victim[0])
    try:
        db.rows("INSERT INTO workers (worker_id, worker_type, host_id) VALUES (%s::uuid, 'test.probe', %s::uuid)",
                worker, host)
        pid = wait_for(lambda: running(db, worker) not in (None, victim[0]) and running(db, worker),
                       what="the desired worker to start despite the forged row")
        assert project.running_pid(worker) == pid
        wait_for(lambda: fleet(db, worker)["state"] == "running", what="its state")
        assert "names PID %d, which does not run the worker" % victim[0] in manager_log(project, manager_id)
        assert not gone(victim[0]) and not victim[1].exists()
    finally:
        conn.close()


def test_a_forged_row_of_this_host_does_not_keep_a_start_from_taking_it_over(project, db, worker_id, victim):
    host = show_host(project)
    conn = db.connect(application_name=str(uuid.uuid4()))
    conn.cursor().execute("SELECT register_host(%s::uuid, 'here')", (host,))
    conn.cursor().execute("SELECT register_process(%s::uuid, %s::uuid, 'test.probe', %s, '1 day')",
                          (worker_id, host, victim[0]))
    conn.close()
    pid = start_daemon(project, worker_id)
    assert db.process(worker_id)[2] == pid
    assert not gone(victim[0]) and not victim[1].exists()


def show_host(project) -> str:
    """This project's host id, made as a first start makes it."""
    return uniphant.get_or_create_host_id(project.path(".lock"), project.path(".host_id"))


def test_a_live_copy_elsewhere_still_blocks_a_start_and_the_state_says_where(project, db, make_role, tmp_path):
    with_manager(project)
    role, password = make_role("elsewhere")
    worker, other_host = str(uuid.uuid4()), str(uuid.uuid4())
    conn = session_of(db, role, password, str(uuid.uuid4()))
    try:
        conn.cursor().execute("SELECT register_host(%s::uuid, 'the-other-host')", (other_host,))
        conn.cursor().execute("SELECT register_process(%s::uuid, %s::uuid, 'test.probe', 4242, '3 s')",
                              (worker, other_host))
        db.rows("INSERT INTO workers (worker_id, worker_type, host_id) VALUES (%s::uuid, 'test.probe', %s::uuid)",
                worker, host_of(project))
        state = wait_for(lambda: fleet(db, worker).get("state") == "moving" and fleet(db, worker),
                         what="the worker to wait for its live copy elsewhere")
        assert db.value("SELECT detail FROM fleet WHERE worker_id = %s::uuid", worker) == \
            "its copy on host the-other-host still runs"
        assert state["pid"] == 4242 and running(db, worker) == 4242
    finally:
        conn.close()
    wait_for(lambda: fleet(db, worker)["state"] == "running" and running(db, worker) != 4242, timeout=30,
             what="the worker to start once the copy elsewhere is gone (its session ended, its row stale)")


@pytest.mark.faults
def test_no_desired_row_can_stop_or_stall_a_manager(project, db):
    project.write("workers/test/broken.py", "def work(:\n")
    manager_id = with_manager(project, "restart_delay=0.2\nrestart_delay_max=1\n")
    host = host_of(project)
    manager_pid = project.running_pid(manager_id, "uniphant.manager")
    # Rows an earlier release let in, past today's check: a name longer than a file
    # name may be, forty parts (2**39 ways to split them), no script, a syntax error.
    bad = ["a" * 300, ".".join(["a"] * 40), "no.such_script", "test.broken"]
    db.rows("ALTER TABLE workers DROP CONSTRAINT workers_worker_type_check")
    ids = [str(db.value("SELECT add_worker(%s, %s::uuid)", t, host)) for t in bad]
    db.rows("ALTER TABLE workers ADD CONSTRAINT workers_worker_type_check "
            "CHECK (uniphant.is_worker_type(worker_type)) NOT VALID")
    for worker, why in zip(ids, ["could not start: no script", "could not start: no script",
                                 "could not start: no script", "SyntaxError"]):
        wait_for(lambda: why in (fleet(db, worker).get("last_exit") or ""), what=f"{worker}'s failure: {why}")
    good = str(db.value("SELECT add_worker('test.probe', %s::uuid)", host))
    wait_for(lambda: fleet(db, good).get("state") == "running", what="a good worker under the same manager")
    assert project.running_pid(manager_id, "uniphant.manager") == manager_pid
    for worker in ids:
        wait_for(lambda: fleet(db, worker)["restarts"] >= 2, what=f"{worker} tried again")


@pytest.mark.parametrize("worker_type, valid", [
    ("a" * 100, True), ("a" * 101, False),
    (".".join(["a"] * 10), True), (".".join(["a"] * 11), False),
    ("a-b_c.D9", True), ("a/b", False), ("a..b", False), (".a", False), ("a b", False), ("é", False), ("", False),
])
def test_a_worker_type_is_at_most_100_characters_in_10_parts_of_file_name_characters(project, db, worker_type,
                                                                                   valid):
    assert uniphant.is_worker_type(worker_type) is valid
    if valid:
        assert db.value("SELECT add_worker(%s)", worker_type)
        assert ops(project, "add", worker_type).returncode == 0
        return
    with pytest.raises(pg8000.dbapi.DatabaseError) as refused:
        db.rows("SELECT add_worker(%s)", worker_type)
    assert refused.value.args[0]["C"] == "23514"
    if worker_type:
        assert_clean_error(ops(project, "add", worker_type), 2, "is not a worker type")


def test_the_script_lookup_looks_once_per_part_where_nothing_matches(tmp_path, monkeypatch):
    looks = []
    for name in ("isdir", "isfile"):
        real = getattr(os.path, name)
        monkeypatch.setattr(os.path, name, lambda path, real=real: looks.append(path) or real(path))
    (tmp_path / "workers" / "a" / "a").mkdir(parents=True)
    (tmp_path / "workers" / "a" / "a" / "a.py").write_text("")
    assert uniphant.scripts_of_type(str(tmp_path), ".".join(["b"] * 40)) == []
    assert len(looks) == 40
    assert uniphant.scripts_of_type(str(tmp_path), "a.a.a") == [str(tmp_path / "workers/a/a/a.py")]


# ---------------------------------------------------------------------------
# SQL privileges
# ---------------------------------------------------------------------------

def test_an_applications_own_objects_named_like_ours_are_left_alone(cluster):
    database = cluster.database(f"app_{uuid.uuid4().hex[:8]}", schema=False)
    database.rows("CREATE TABLE public.hosts (hostname text)")
    database.rows("INSERT INTO public.hosts VALUES ('web-1')")
    database.rows("CREATE TABLE public.workers (name text)")
    database.rows("CREATE FUNCTION public.scale(x numeric) RETURNS numeric LANGUAGE sql AS 'SELECT x * 2'")
    pgserver.load_sql(database.connect(), os.path.join(REPO, "schema.sql"))
    assert database.rows("SELECT * FROM public.hosts") == [("web-1",)]
    assert database.value("SELECT public.scale(2)") == 4
    assert database.value("SELECT count(*) FROM uniphant.workers") == 0
    assert database.value("SELECT to_regclass('uniphant.hosts')::text") == "uniphant.hosts"


def test_every_function_runs_with_search_path_pg_catalog_pg_temp(db):
    functions = db.rows("SELECT proname::text, prosecdef, coalesce(proconfig, '{}') FROM pg_proc p "
                        "WHERE pronamespace = 'uniphant'::regnamespace")
    assert len(functions) > 20
    for name, definer, settings in functions:
        if name == "process_live":  # inlined into its callers: qualified instead
            assert not definer and settings == []
            continue
        assert "search_path=pg_catalog, pg_temp" in settings, name


# Objects a role that may only create things in public plants there, each of
# which logs who ran it: PostgreSQL 14 and earlier let every role do this.
HIJACKS = """
CREATE TABLE public.hijacked (who name, what text);
GRANT INSERT, SELECT ON public.hijacked TO PUBLIC;
CREATE FUNCTION public.caught(what text) RETURNS boolean LANGUAGE sql SECURITY INVOKER
    SET search_path = pg_catalog AS $$ INSERT INTO public.hijacked VALUES (current_user, what) RETURNING true $$;
CREATE FUNCTION public.cardinality(uuid[]) RETURNS integer LANGUAGE sql
    AS $$ SELECT 1 WHERE public.caught('cardinality(uuid[])') $$;
CREATE FUNCTION public.cardinality(text[]) RETURNS integer LANGUAGE sql
    AS $$ SELECT 1 WHERE public.caught('cardinality(text[])') $$;
CREATE FUNCTION public.now() RETURNS timestamptz LANGUAGE sql
    AS $$ SELECT pg_catalog.now() WHERE public.caught('now()') $$;
CREATE FUNCTION public.current_setting(text) RETURNS text LANGUAGE sql
    AS $$ SELECT pg_catalog.current_setting($1) WHERE public.caught('current_setting') $$;
CREATE FUNCTION public.hashtext(text) RETURNS integer LANGUAGE sql
    AS $$ SELECT 1 WHERE public.caught('hashtext') $$;
CREATE FUNCTION public.pg_notify(text, text) RETURNS void LANGUAGE plpgsql
    AS $$ BEGIN PERFORM public.caught('pg_notify'); END $$;
CREATE FUNCTION public.set_config(text, text, boolean) RETURNS text LANGUAGE sql
    AS $$ SELECT $2 WHERE public.caught('set_config') $$;
CREATE FUNCTION public.left(text, integer) RETURNS text LANGUAGE sql
    AS $$ SELECT $1 WHERE public.caught('left') $$;
CREATE FUNCTION public.make_interval(secs double precision) RETURNS interval LANGUAGE sql
    AS $$ SELECT interval '1 s' WHERE public.caught('make_interval') $$;
CREATE FUNCTION public.replace(text, text, text) RETURNS text LANGUAGE sql
    AS $$ SELECT $1 WHERE public.caught('replace') $$;
CREATE FUNCTION public.ceil(numeric) RETURNS numeric LANGUAGE sql
    AS $$ SELECT 1000000::numeric WHERE public.caught('ceil') $$;
CREATE FUNCTION public.length(text) RETURNS integer LANGUAGE sql
    AS $$ SELECT 1 WHERE public.caught('length') $$;
CREATE FUNCTION public.unnest(text[]) RETURNS SETOF text LANGUAGE sql
    AS $$ SELECT 'a' WHERE public.caught('unnest') $$;
CREATE FUNCTION public.generate_series(integer, integer) RETURNS SETOF integer LANGUAGE sql
    AS $$ SELECT 1 WHERE public.caught('generate_series') $$;
CREATE FUNCTION public.quote_ident(text) RETURNS text LANGUAGE sql
    AS $$ SELECT $1 WHERE public.caught('quote_ident') $$;
CREATE FUNCTION public.gen_random_uuid() RETURNS uuid LANGUAGE sql
    AS $$ SELECT pg_catalog.gen_random_uuid() WHERE public.caught('gen_random_uuid') $$;
CREATE FUNCTION public.evil_eq(uuid, uuid) RETURNS boolean LANGUAGE sql
    AS $$ SELECT public.caught('=(uuid, uuid)') AND pg_catalog.uuid_eq($1, $2) $$;
CREATE OPERATOR public.= (LEFTARG = uuid, RIGHTARG = uuid, FUNCTION = public.evil_eq);
CREATE FUNCTION public.evil_text_eq(text, text) RETURNS boolean LANGUAGE sql
    AS $$ SELECT public.caught('=(text, text)') AND pg_catalog.texteq($1, $2) $$;
CREATE OPERATOR public.= (LEFTARG = text, RIGHTARG = text, FUNCTION = public.evil_text_eq);
CREATE FUNCTION public.evil_lt(timestamptz, timestamptz) RETURNS boolean LANGUAGE sql
    AS $$ SELECT public.caught('<(timestamptz, timestamptz)') AND pg_catalog.timestamptz_lt($1, $2) $$;
CREATE OPERATOR public.< (LEFTARG = timestamptz, RIGHTARG = timestamptz, FUNCTION = public.evil_lt);
CREATE FUNCTION public.evil_minus(timestamptz, interval) RETURNS timestamptz LANGUAGE sql
    AS $$ SELECT pg_catalog.timestamptz_mi_interval($1, $2) WHERE public.caught('-(timestamptz, interval)') $$;
CREATE OPERATOR public.- (LEFTARG = timestamptz, RIGHTARG = interval, FUNCTION = public.evil_minus);
CREATE FUNCTION public.evil_div(integer, integer) RETURNS integer LANGUAGE sql
    AS $$ SELECT 1 WHERE public.caught('/(integer, integer)') $$;
CREATE OPERATOR public./ (LEFTARG = integer, RIGHTARG = integer, FUNCTION = public.evil_div);
CREATE FUNCTION public.evil_match(text, text) RETURNS boolean LANGUAGE sql
    AS $$ SELECT public.caught('~(text, text)') $$;
CREATE OPERATOR public.~ (LEFTARG = text, RIGHTARG = text, FUNCTION = public.evil_match);
CREATE FUNCTION public.evil_concat(text, text) RETURNS text LANGUAGE sql
    AS $$ SELECT pg_catalog.textcat($1, $2) WHERE public.caught('||(text, text)') $$;
CREATE OPERATOR public.|| (LEFTARG = text, RIGHTARG = text, FUNCTION = public.evil_concat);
CREATE TYPE public.evil AS ENUM ('evil');
CREATE FUNCTION public.evil_cast(text) RETURNS public.evil LANGUAGE sql
    AS $$ SELECT 'evil'::public.evil WHERE public.caught('an implicit cast') $$;
CREATE CAST (text AS public.evil) WITH FUNCTION public.evil_cast(text) AS IMPLICIT;
CREATE FUNCTION public.left(public.evil, integer) RETURNS text LANGUAGE sql
    AS $$ SELECT 'x' WHERE public.caught('left(evil)') $$;
CREATE VIEW public.pg_stat_activity AS SELECT * FROM pg_catalog.pg_stat_activity WHERE public.caught('view');
"""


@pytest.mark.faults
def test_a_role_that_may_create_in_public_gains_nothing_through_our_functions(cluster, tmp_path):
    database = cluster.database(f"hijack_{uuid.uuid4().hex[:8]}")
    database.rows("GRANT CREATE ON SCHEMA public TO PUBLIC")  # as PostgreSQL 14 had it
    mallory, password = f"mallory_{uuid.uuid4().hex[:8]}", "Secr3t-" + uuid.uuid4().hex
    database.rows(f"CREATE ROLE {mallory} LOGIN PASSWORD '{password}'")
    try:
        for kind in ("manager", "operator"):
            database.rows("SELECT uniphant.grant_role(%s, %s)", mallory, kind)
        as_mallory = lambda process_id: database.connect(  # noqa: E731
            user=mallory, password=password, host="127.0.0.1", port=int(database.env["PGPORT"]), unix_sock=None,
            application_name=process_id)
        planter = as_mallory("planter")
        planter.execute_simple(HIJACKS)
        planter.close()
        pgserver.load_sql(database.connect(), os.path.join(REPO, "schema.sql"))  # the owner loads it again
        host, process, worker = (str(uuid.uuid4()) for _ in range(3))
        conn = as_mallory(process)
        calls = [
            ("SELECT register_host(%s::uuid, 'mallory-host')", (host,)),
            ("SELECT register_process(%s::uuid, %s::uuid, 'uniphant.manager', 1)", (worker, host)),
            ("SELECT keepalive()", ()),
            ("SELECT register_manager(%s::uuid)", (host,)),
            ("SELECT set_worker_types(ARRAY['test.probe'])", ()),
            ("SELECT add_worker('test.probe', %s::uuid)", (host,)),
            ("SELECT scale('test.probe', 3)", ()),
            ("SELECT count(*) FROM manager_plan(%s::uuid)", (host,)),
            ("SELECT report_worker(w.worker_id, 'running', 7, 0, 'x') FROM fleet w", ()),
            ("SELECT clear_process(%s::uuid, 1)", (str(uuid.uuid4()),)),
            ("SELECT count(*) FROM fleet", ()),
            ("SELECT restart_workers('test.probe')", ()),
            ("SELECT remove_workers('test.probe')", ()),
            ("SELECT remove_worker(%s::uuid)", (str(uuid.uuid4()),)),
            ("SELECT restart_worker(%s::uuid)", (str(uuid.uuid4()),)),
            ("SELECT disconnect()", ()),
        ]
        for sql, params in calls:
            conn.cursor().execute(sql, params)
        conn.close()
        assert database.rows("SELECT who::text, what FROM public.hijacked") == []
        assert database.value("SELECT rolsuper FROM pg_roles WHERE rolname = %s", mallory) is False
    finally:
        database.rows(f"DROP OWNED BY {mallory} CASCADE")
        database.rows(f"DROP ROLE {mallory}")


def test_a_role_with_no_part_can_use_nothing_of_uniphants(db):
    role, password = f"nobody_{uuid.uuid4().hex[:8]}", "Secr3t-" + uuid.uuid4().hex
    db.rows(f"CREATE ROLE {role} LOGIN PASSWORD '{password}'")
    some = str(uuid.uuid4())
    conn = session_of(db, role, password, str(uuid.uuid4()))
    try:
        for sql in ["SELECT uniphant.schema_version()", f"SELECT uniphant.register_host('{some}', 'h')",
                    f"SELECT uniphant.register_process('{some}')", "SELECT uniphant.keepalive()",
                    "SELECT uniphant.disconnect()", f"SELECT uniphant.register_manager('{some}')",
                    "SELECT uniphant.set_worker_types('{}')", f"SELECT * FROM uniphant.manager_plan('{some}')",
                    f"SELECT uniphant.report_worker('{some}', 'running')",
                    f"SELECT uniphant.clear_process('{some}', 1)", "SELECT uniphant.add_worker('a')",
                    "SELECT uniphant.scale('a', 1)", f"SELECT uniphant.remove_worker('{some}')",
                    "SELECT uniphant.remove_workers('a')", f"SELECT uniphant.restart_worker('{some}')",
                    "SELECT uniphant.restart_workers('a')", "SELECT * FROM uniphant.fleet",
                    "SELECT * FROM uniphant.processes", "SELECT * FROM uniphant.live_managers()",
                    f"SELECT uniphant.grant_role('{role}', 'operator')", f"SELECT uniphant.revoke_role('{role}')"]:
            assert sql_error(conn, sql) == "42501", sql
    finally:
        conn.close()
        db.rows(f"DROP ROLE {role}")


def manager_session(db, role: str, password: str, host: str):
    """A session of role that registers itself as the manager of host."""
    conn = session_of(db, role, password, str(uuid.uuid4()))
    conn.cursor().execute("SELECT register_host(%s::uuid, 'squat')", (host,))
    conn.cursor().execute("SELECT register_process(%s::uuid, %s::uuid, 'uniphant.manager', 1)",
                          (str(uuid.uuid4()), host))
    conn.cursor().execute("SELECT register_manager(%s::uuid)", (host,))
    return conn


def sql_error(conn, sql: str, *params) -> str:
    """The SQLSTATE with which sql fails."""
    with pytest.raises(pg8000.dbapi.DatabaseError) as refused:
        conn.cursor().execute(sql, params)
    return refused.value.args[0]["C"]


def test_report_worker_takes_only_workers_planned_on_its_host_and_values_a_manager_sends(db, make_role):
    role, password = make_role("manager")
    db.rows("SELECT uniphant.grant_role(%s, 'manager')", role)
    here, there = str(uuid.uuid4()), str(uuid.uuid4())
    mine = str(db.value("SELECT add_worker('test.probe', %s::uuid)", here))
    theirs = str(db.value("SELECT add_worker('test.probe', %s::uuid)", there))
    conn = manager_session(db, role, password, here)
    try:
        report = "SELECT report_worker(%s::uuid, %s, %s, %s, 'x', %s)"
        for worker in (theirs, str(uuid.uuid4())):  # another host's pinned worker, no worker at all
            conn.cursor().execute(report, (worker, "running", 7, 0, None))
        assert db.rows("SELECT worker_id FROM worker_states") == []
        for state, pid, restarts, next_start_in in [("hacked", 7, 0, None), ("running", 0, 0, None),
                                                    ("running", 7, -1, None), ("backoff", 7, 0, -1e9),
                                                    ("backoff", 7, 0, 1e9), ("unplaced", None, 0, None)]:
            assert sql_error(conn, report, mine, state, pid, restarts, next_start_in) == "22023", state
        conn.cursor().execute(report, (mine, "running", 7, 2, None))
        assert db.rows("SELECT host_id::text, state, pid, restarts FROM worker_states") == [(here, "running", 7, 2)]
    finally:
        conn.close()


def test_a_host_belongs_to_the_role_that_first_registered_its_manager(project, db, make_role):
    manager_id = with_manager(project)
    host = host_of(project)
    squatter, password = make_role("squatter")
    db.rows("SELECT uniphant.grant_role(%s, 'manager')", squatter)
    assert project.run(manager_id, "stop", script="workers/uniphant/manager.py").returncode == 0
    conn = session_of(db, squatter, password, str(uuid.uuid4()))
    try:
        conn.cursor().execute("SELECT register_process(%s::uuid, %s::uuid, 'uniphant.manager', 1)",
                              (str(uuid.uuid4()), host))
        assert sql_error(conn, "SELECT register_manager(%s::uuid)", host) == "UN007"
    finally:
        conn.close()
    with_manager(project)  # the host's own manager is not kept out
    worker = str(db.value("SELECT add_worker('test.probe')"))
    wait_for(lambda: fleet(db, worker).get("state") == "running" and fleet(db, worker)["host_id"] == host,
             what="placement by the host's own manager")


@pytest.mark.faults
def test_any_host_workers_go_only_to_managers_that_have_their_script(project, db, tmp_path):
    other = another_host(project, tmp_path)
    try:
        os.remove(other.path("workers/test/probe.py"))
        with_manager(project)
        with_manager(other)
        db.value("SELECT scale('test.probe', 4)")
        wait_for(lambda: db.value("SELECT count(*) FROM fleet WHERE state = 'running' AND host_id = %s::uuid",
                                  host_of(project)) == 4, what="all four on the host that has the script")
        nobody = str(db.value("SELECT add_worker('nobody.has')"))
        assert fleet(db, nobody)["state"] == "unplaced"
        assert db.value("SELECT detail FROM fleet WHERE worker_id = %s::uuid", nobody) == \
            "no live manager provides worker type nobody.has"
        added = ops(project, "add", "nobody.has")
        assert added.returncode == 0 and "no live manager on any host has a script of worker type" in added.stderr
        shutil.copy(project.path("workers/test/probe.py"), other.path("workers/test/probe.py"))
        wait_for(lambda: db.value("SELECT count(*) FROM fleet WHERE state = 'running' AND host_id = %s::uuid",
                                  host_of(other)) == 2, timeout=30, what="the other host's share once it has it")
    finally:
        other.cleanup()


# ---------------------------------------------------------------------------
# What operators read
# ---------------------------------------------------------------------------

HOSTILE = "\x1b]0;owned\x07\x1b[2J\x1b[31mred\r\nforged line\u202eesrever\x9b"


def test_ps_shows_control_characters_from_the_database_visibly(project, db, make_role):
    import json
    role, password = make_role("painter")
    conn = session_of(db, role, password, str(uuid.uuid4()))
    try:
        host, worker = str(uuid.uuid4()), str(uuid.uuid4())
        conn.cursor().execute("SELECT register_host(%s::uuid, %s)", (host, HOSTILE))
        conn.cursor().execute("SELECT register_process(%s::uuid, %s::uuid, %s, 1)", (worker, host, HOSTILE))
        table = ops(project, "ps")
        assert table.returncode == 0, table.stderr
        assert all(c.isprintable() for c in table.stdout.replace("\n", ""))
        lines = [line for line in table.stdout.splitlines() if worker in line]
        assert len(lines) == 1 and "\\x1b]0;owned\\x07\\x1b[2J" in lines[0] and "\\u202e" in lines[0]
        assert len(table.stdout.splitlines()) == 1 + db.value("SELECT count(*) FROM fleet")
        listed = {row["worker_id"]: row for row in json.loads(ops(project, "ps", "--json").stdout)}
        assert listed[worker]["host"] == HOSTILE and listed[worker]["worker_type"] == HOSTILE
    finally:
        conn.close()


def test_the_managers_log_shows_a_workers_words_visibly(project, db):
    project.write("workers/test/shout.py", (
        "from uniphant import main\n"
        f"def work(config, logger, connection):\n    raise RuntimeError({HOSTILE!r})\n"
        "if __name__ == '__main__':\n    main(work)\n"))
    manager_id = with_manager(project, "restart_delay=30\n")
    worker = str(db.value("SELECT add_worker('test.shout', %s::uuid)", host_of(project)))
    wait_for(lambda: fleet(db, worker).get("state") == "backoff", what="the failure")
    line = next(line for line in manager_log(project, manager_id).splitlines() if f"worker {worker} " in line
                and "ended" in line)
    assert "RuntimeError: \\x1b]0;owned\\x07" in line and all(c.isprintable() for c in line)


SNOOP = '''\
"""Looks through everything it can reach for the strings whose hashes it is given."""
import gc, hashlib, sys
from uniphant import main

def reachable():
    gc.unfreeze()  # what the manager froze before forking is reachable all the same
    todo, seen = list(gc.get_objects()), set()
    frame = sys._getframe()
    while frame is not None:
        todo += [frame, frame.f_locals]
        frame = frame.f_back
    while todo:
        thing = todo.pop()
        if id(thing) in seen:
            continue
        seen.add(id(thing))
        if isinstance(thing, (str, bytes)):
            yield thing
        else:
            todo.extend(gc.get_referents(thing))

def work(config, logger, connection):
    wanted = dict(manager=%r, own=%r)
    found = set()
    for thing in reachable():
        data = thing.encode("utf-8", "replace") if isinstance(thing, str) else thing
        digest = hashlib.sha256(data).hexdigest()
        found.update(name for name, want in wanted.items() if digest == want)
    logger.info("reachable: %%s", " ".join(sorted(found)) or "none")

if __name__ == "__main__":
    main(work)
'''


def test_a_forked_worker_can_reach_none_of_the_managers_configuration(project, db, make_role):
    import hashlib
    role, password = make_role("manager")
    db.rows("SELECT uniphant.grant_role(%s, 'manager')", role)
    own = "own-" + uuid.uuid4().hex
    digest = lambda text: hashlib.sha256(text.encode()).hexdigest()  # noqa: E731
    project.write("workers/test/snoop.py", SNOOP % (digest(password), digest(own)))
    project.write("workers/test/uniphant.conf", f"probe_value={own}\ninterval=3600\n")
    # The manager logs in with a password from its secrets file; its workers as the tests' superuser.
    project.write("workers/uniphant/uniphant.conf",
                  f"PGHOST=127.0.0.1\nPGPORT={db.env['PGPORT']}\nPGUSER={role}\n")
    project.write(".uniphant/secrets/workers/uniphant/secrets.conf", f"PGPASSWORD={password}\n", mode=0o600,
                  base=project.home)
    with_manager(project)
    worker = str(db.value("SELECT add_worker('test.snoop', %s::uuid)", host_of(project)))
    wait_for(lambda: "reachable: " in project.log(worker, "test.snoop"), what="the worker's search")
    assert "reachable: own\n" in project.log(worker, "test.snoop")  # it finds what it may see, and only that
