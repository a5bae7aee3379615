"""PostgreSQL high availability (docs/high-availability.md, "PostgreSQL high availability"): a primary
and a streaming standby made with pg_basebackup, both real servers of the test's
own (dev/pgserver.py), one test per promise.

The tests that leave the pair as they found it share one per test process
(`pair`); those that promote or kill a server make their own.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import sys
import uuid
from typing import Any, Dict, Iterator, List, NamedTuple

import pytest

import uniphant
from conftest import host_of, ops, with_manager
from test_uniphant import REPO, Project, assert_clean_error, start_daemon, wait_for, worker_env

sys.path.insert(0, os.path.join(REPO, "dev"))
import pgserver  # noqa: E402

# A worker that records each of its calls on the server it is connected to.
RECORDER = '''\
import os
from uniphant import main

def work(config, logger, connection):
    connection.cursor().execute("INSERT INTO calls (worker_id, pid) VALUES (%s::uuid, %s)",
                                (config["worker_id"], os.getpid()))

if __name__ == "__main__":
    main(work)
'''

# The stale_after of the tests whose managers lose their sessions: short, so
# that every row on the standby looks stale soon after the primary has gone.
MANAGER_STALE_AFTER = 6

CALLS = ("CREATE TABLE IF NOT EXISTS calls (worker_id uuid NOT NULL, pid integer NOT NULL, "
         "at timestamptz NOT NULL DEFAULT clock_timestamp())")


@contextlib.contextmanager
def own_pair():
    """A primary and its streaming standby, with database `uniphant` and the table
    `calls`, for a test of its own: to promote or to kill."""
    with pgserver.Server() as primary:
        primary.init().start()
        primary.create_database("uniphant")
        primary.value(CALLS, database="uniphant")
        with primary.standby() as standby:
            yield primary, standby


@pytest.fixture(scope="module")
def pair():
    """A pair (own_pair) that the tests of one test process share: each leaves both
    servers running as it found them."""
    with own_pair() as servers:
        yield servers


@pytest.fixture
def projects(tmp_path):
    """A factory of projects whose PGHOST lists the servers given, in that order."""
    made: List[Project] = []

    def make(name: str, *servers: pgserver.Server, conf: str = "", **settings: str) -> Project:
        home = tmp_path / f"{name}_home"
        home.mkdir(exist_ok=True)
        env = dict(hosts(*servers), PGUSER=pgserver.SUPERUSER, PGDATABASE="uniphant")
        env.update(settings)
        project = Project(str(tmp_path / name), str(home), worker_env(env, str(home)))
        project.write("workers/test/recorder.py", RECORDER)
        if conf:
            project.write("uniphant.conf", conf)
        made.append(project)
        return project
    yield make
    for project in made:
        project.cleanup()


def hosts(*servers: pgserver.Server) -> Dict[str, str]:
    return {"PGHOST": ",".join(s.dir for s in servers), "PGPORT": ",".join(str(s.port) for s in servers)}


def where(server: pgserver.Server) -> str:
    return f"socket {server.dir}/.s.PGSQL.{server.port}"


def rows(server: pgserver.Server, sql: str, *params) -> list:
    conn = server.connect("uniphant")
    try:
        cursor = conn.cursor()
        cursor.execute(sql, params)
        return [tuple(r) for r in cursor.fetchall()] if cursor.description else []
    finally:
        conn.close()


def value(server: pgserver.Server, sql: str, *params):
    found = rows(server, sql, *params)
    return found[0][0] if found else None


def connect(*servers: pgserver.Server, **settings: str):
    """connect_to_database() in this process, with PGHOST listing servers in order."""
    config = dict(hosts(*servers), PGUSER=pgserver.SUPERUSER, PGDATABASE="uniphant",
                  process_id=str(uuid.uuid4()), stale_after=60.0, **settings)
    return uniphant.connect_to_database(config)


def reached(connection, pair) -> str:
    """Which server of the pair a connection reached, closing it."""
    try:
        target = uniphant.wire_of(connection).target
    finally:
        connection.close()
    return "primary" if target == (pair[0].dir, pair[0].port) else "standby"


def at_work(server: pgserver.Server, workers: List[str], since=None, calls: int = 1) -> bool:
    """Whether each worker has recorded calls on server (since that server time)."""
    return all(value(server, "SELECT count(*) >= %s FROM calls WHERE worker_id = %s::uuid "
                             "AND (%s::timestamptz IS NULL OR at > %s)", calls, w, since, since)
               for w in workers)


def live_sessions(server: pgserver.Server) -> int:
    """How many uniphant processes of server's processes table have a session there."""
    return value(server, "SELECT count(*) FROM uniphant.processes p WHERE uniphant.session_exists(p.id, p.role)")


@pytest.fixture
def no_ha_environment(monkeypatch):
    """Connections made in this process take these settings from the test alone."""
    for key in ("PGTARGETSESSIONATTRS", "PGLOADBALANCEHOSTS", "PGPASSWORD", "PGSSLMODE"):
        monkeypatch.delenv(key, raising=False)


# ---------------------------------------------------------------------------
# target_session_attrs and load_balance_hosts
# ---------------------------------------------------------------------------

def test_target_session_attrs_values_as_libpq(pair, no_ha_environment):
    primary, standby = pair
    chosen = {
        # (target_session_attrs, PGHOST order): the server taken
        ("any", "PS"): "primary", ("any", "SP"): "standby",
        ("read-write", "SP"): "primary", ("primary", "SP"): "primary",
        ("read-only", "PS"): "standby", ("standby", "PS"): "standby",
        ("prefer-standby", "PS"): "standby", ("prefer-standby", "P"): "primary",
        ("", "SP"): "primary",  # uniphant's processes write: read-write unless set
    }
    servers = {"P": primary, "S": standby}
    for (attrs, order), server in chosen.items():
        settings = {"PGTARGETSESSIONATTRS": attrs} if attrs else {}
        assert reached(connect(*(servers[c] for c in order), **settings), pair) == server, (attrs, order)
    refused = {("read-only", "P"): f"{where(primary)}: a primary (target_session_attrs=read-only)",
               ("standby", "P"): f"{where(primary)}: a primary (target_session_attrs=standby)",
               ("", "S"): f"{where(standby)}: a standby (target_session_attrs=read-write)"}
    for (attrs, order), message in refused.items():
        settings = {"PGTARGETSESSIONATTRS": attrs} if attrs else {}
        with pytest.raises(uniphant.ConnectError) as error:
            connect(*(servers[c] for c in order), **settings)
        assert str(error.value) == f"could not connect to PostgreSQL at {message}"


def test_load_balance_hosts_random_tries_the_hosts_in_a_new_order_each_time(pair, no_ha_environment):
    primary, standby = pair
    anywhere = {"PGTARGETSESSIONATTRS": "any"}
    randomly = {reached(connect(primary, standby, PGLOADBALANCEHOSTS="random", **anywhere), pair)
                for _ in range(40)}
    assert randomly == {"primary", "standby"}  # both first at least once: 1 - 2**-39
    in_order = {reached(connect(primary, standby, PGLOADBALANCEHOSTS="disable", **anywhere), pair)
                for _ in range(10)}
    assert in_order == {"primary"}
    writable = {reached(connect(standby, primary, PGLOADBALANCEHOSTS="random"), pair) for _ in range(10)}
    assert writable == {"primary"}


def test_servers_that_do_not_report_their_state_at_login_are_asked(pair, no_ha_environment):
    primary, standby = pair
    for server, state in ((primary, (False, False)), (standby, (True, False))):
        connection = connect(server, PGTARGETSESSIONATTRS="any")
        try:
            # Servers before PostgreSQL 14 report neither at login.
            del connection.parameter_statuses["in_hot_standby"]
            del connection.parameter_statuses["default_transaction_read_only"]
            assert uniphant._server_state(connection) == state
        finally:
            connection.close()


def test_unknown_target_session_attrs_is_a_config_error(project, worker_id):
    project.write("uniphant.conf", "PGTARGETSESSIONATTRS=master\n")
    result = project.run(worker_id, "start")
    assert_clean_error(result, 2, f"{project.path('uniphant.conf')}:1: bad value for PGTARGETSESSIONATTRS: "
                                  "expected one of any, read-write, read-only, primary, standby, "
                                  "prefer-standby")
    os.unlink(project.path("uniphant.conf"))
    result = project.run(worker_id, "start", env={"PGLOADBALANCEHOSTS": "sometimes"})
    assert_clean_error(result, 2, "the environment: bad value for PGLOADBALANCEHOSTS: "
                                  "expected one of disable, random")
    project.env["PGTARGETSESSIONATTRS"] = "writable"
    assert_clean_error(ops(project, "ps"), 2, "the environment: bad value for PGTARGETSESSIONATTRS")
    assert not os.path.exists(project.path("pid/test.probe"))  # nothing started


def test_a_standby_listed_first_is_skipped(pair, projects, worker_id):
    primary, standby = pair
    project = projects("standby_first", standby, primary)
    pid = start_daemon(project, worker_id)
    assert pid_of(primary, worker_id) == pid
    alone = projects("standby_alone", standby)
    assert_clean_error(alone.run(str(uuid.uuid4()), "start"), 1,
                       f"could not connect to PostgreSQL at {where(standby)}: "
                       f"a standby (target_session_attrs=read-write)")


def test_each_process_logs_the_server_it_connected_to(pair, projects, worker_id):
    primary, standby = pair
    project = projects("logs_server", standby, primary)
    manager_id = with_manager(project)
    start_daemon(project, worker_id)
    for log in (project.log(worker_id), project.log(manager_id, "uniphant.manager")):
        assert "started: process" in log and f", database {where(primary)}, a primary\n" in log
    process_id = value(primary, "SELECT id::text FROM uniphant.processes WHERE worker_id = %s::uuid", worker_id)
    value(primary, "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name = %s",
          process_id)
    line = wait_for(lambda: [line for line in project.log(worker_id).splitlines()
                             if "database connection restored after" in line], what="the reconnect")[0]
    assert line.endswith(f" s: {where(primary)}, a primary")


def test_ps_reads_from_a_standby_and_says_so(pair, projects):
    primary, standby = pair
    worker = str(value(primary, "SELECT uniphant.add_worker('ha.ps')"))
    try:
        standby.wait_for_replay(primary)
        only_standby = projects("ps_standby", standby)
        table = ops(only_standby, "ps")
        assert table.returncode == 0, table.stderr
        assert any(line.startswith(worker) for line in table.stdout.splitlines())
        assert table.stderr == (f"uniphant.py: warning: no writable server answered: read from "
                                f"{where(standby)}, a standby: what it shows may be stale\n")
        listed = ops(only_standby, "ps", "--json")
        assert worker in {row["worker_id"] for row in json.loads(listed.stdout)}
        assert "read from" in listed.stderr
        both = projects("ps_both", standby, primary)
        table = ops(both, "-v", "ps")
        assert table.returncode == 0
        assert table.stderr == f"uniphant.py: read from {where(primary)}, a primary\n"
        assert ops(both, "ps").stderr == ""  # a primary, as expected: nothing to say
        # ps --watch listens, which a standby cannot: it takes a writable server.
        assert_clean_error(ops(only_standby, "ps", "--watch"), 1, "a standby (target_session_attrs=read-write)")
        # What the user sets is obeyed as given; and writes never go to a standby.
        strict = projects("ps_strict", standby, PGTARGETSESSIONATTRS="read-write")
        assert_clean_error(ops(strict, "ps"), 1,
                           f"{where(standby)}: a standby (target_session_attrs=read-write)")
        assert_clean_error(ops(only_standby, "add", "ha.ps"), 1, "a standby (target_session_attrs=read-write)")
    finally:
        value(primary, "SELECT uniphant.remove_worker(%s::uuid)", worker)


# ---------------------------------------------------------------------------
# A read-only server is a lost server
# ---------------------------------------------------------------------------

def set_read_only(server: pgserver.Server, on: bool) -> None:
    value(server, "ALTER SYSTEM SET default_transaction_read_only = " + ("on" if on else "off"))
    value(server, "SELECT pg_reload_conf()")


@pytest.mark.faults
def test_a_server_turned_read_only_is_a_lost_server_and_nothing_stops(pair, projects):
    primary, standby = pair
    project = projects("read_only", standby, primary, conf="stale_after=3\ninterval=0.2\n")
    manager_id = with_manager(project)
    host = host_of(project)
    workers = [str(value(primary, "SELECT uniphant.add_worker('test.recorder', %s::uuid)", host)) for _ in range(2)]
    types = dict.fromkeys(workers, "test.recorder")
    types[manager_id] = "uniphant.manager"
    logs = {process: (lambda p=process: project.log(p, types[p])) for process in types}

    def pids() -> dict:
        return {process: project.running_pid(process, types[process]) for process in types}
    try:
        wait_for(lambda: at_work(primary, workers), what="both workers at work")
        before = pids()
        standby_log = os.path.join(standby.dir, "server.log")
        standby_log_size = os.path.getsize(standby_log)
        set_read_only(primary, True)
        for process, log in logs.items():
            wait_for(lambda: "read-only" in log().partition("lost the database connection")[2],
                     what=f"{process} to lose the read-only server")
            wait_for(lambda: f"{where(primary)}: a read-only server (target_session_attrs=read-write)"
                     in log(), what=f"{process} to find it read-only as it reconnects")
        assert pids() == before
        set_read_only(primary, False)
        restored = f"s: {where(primary)}, a primary"
        for process, log in logs.items():
            wait_for(lambda: restored in log().partition("lost the database connection")[2],
                     what=f"{process} to reconnect")
        since = value(primary, "SELECT now()")
        wait_for(lambda: at_work(primary, workers, since), what="both workers at work again")
        assert pids() == before and all(before.values())
        for process, log in logs.items():
            assert "stopping" not in log() and "failed" not in log(), log()
        assert all(fleet_state(primary, w) == ("running", 0) for w in workers)
        with open(standby_log, encoding="utf-8", errors="replace") as f:
            f.seek(standby_log_size)
            logged = f.read()
        assert "ERROR:" not in logged and "STATEMENT:" not in logged, logged  # no failed LISTEN there
    finally:
        set_read_only(primary, False)
        for w in workers:
            value(primary, "SELECT uniphant.remove_worker(%s::uuid)", w)


def fleet_state(server: pgserver.Server, worker: str) -> tuple:
    return tuple(rows(server, "SELECT state, restarts FROM uniphant.fleet WHERE worker_id = %s::uuid", worker)[0])


@pytest.mark.faults
def test_a_server_read_only_at_the_first_write_is_passed_over_like_a_standby(pair, projects, worker_id):
    """With target_session_attrs=any a standby listed first is taken at login; its first
    write fails (SQLSTATE 25006), at a start and at a reconnect: the next host is tried."""
    primary, standby = pair
    project = projects("first_write", standby, primary, PGTARGETSESSIONATTRS="any")
    pid = start_daemon(project, worker_id)
    assert pid_of(primary, worker_id) == pid
    process_id = value(primary, "SELECT id::text FROM uniphant.processes WHERE worker_id = %s::uuid", worker_id)
    terminate(primary, "a.application_name = %s", process_id)
    wait_for(lambda: f"s: {where(primary)}, a primary" in project.log(worker_id).partition("restored")[2],
             what="the reconnect")
    alone = projects("first_write_standby", standby, PGTARGETSESSIONATTRS="any")
    assert_clean_error(alone.run(str(uuid.uuid4()), "start"), 1,
                       f"could not connect to PostgreSQL at {where(standby)}: read-only at the first write "
                       f"({where(standby)} is read-only: cannot execute INSERT in a read-only transaction)")


# ---------------------------------------------------------------------------
# Failover
# ---------------------------------------------------------------------------

@pytest.mark.faults
def test_promote_moves_workers_and_a_manager_to_the_new_primary_without_exit(projects):
    """Two hosts' managers and their any-host workers, the primary killed, the standby
    promoted only once every row there is older than stale_after: each process
    reconnects to the new primary and resumes, and no worker is stopped or moved."""
    with own_pair() as (primary, standby):
        conf = f"stale_after={MANAGER_STALE_AFTER}\ninterval=0.2\n"
        hosts_ = [projects(name, primary, standby, conf=conf) for name in ("promote1", "promote2")]
        managers = {project: with_manager(project) for project in hosts_}
        value(primary, "SELECT uniphant.scale('test.recorder', 4)")
        wait_for(lambda: value(primary, "SELECT count(*) FROM uniphant.fleet WHERE state = 'running' "
                                        "AND worker_type = 'test.recorder'") == 4, what="four workers")
        workers = [str(w) for (w,) in rows(primary, "SELECT worker_id FROM uniphant.workers")]
        pids = {w: pid_of(primary, w) for w in workers}
        manager_pids = {p: p.running_pid(m, "uniphant.manager") for p, m in managers.items()}
        standby.wait_for_replay(primary)
        primary.stop("immediate")
        wait_for(lambda: value(standby, "SELECT bool_and(heartbeat_at < now() - stale_after) FROM uniphant.processes"),
                 timeout=30, what="every row on the standby to look stale")
        standby.promote()
        wait_for(lambda: live_sessions(standby) == 6, what="the workers and the managers on the new primary")
        at = value(standby, "SELECT now()")
        wait_for(lambda: at_work(standby, workers, at, calls=3), what="the workers at work on the new primary")
        assert {w: pid_of(standby, w) for w in workers} == pids
        assert {p: p.running_pid(m, "uniphant.manager") for p, m in managers.items()} == manager_pids
        logs = [p.log(w, "test.recorder") for w in workers for p in hosts_ if p.log(w, "test.recorder")]
        assert len(logs) == 4  # each worker ran on one host only
        for log in logs + [p.log(m, "uniphant.manager") for p, m in managers.items()]:
            assert "database connection restored after" in log and f"s: {where(standby)}, a primary" in log
            assert "stopping" not in log
        assert value(standby, "SELECT sum(restarts) FROM uniphant.fleet WHERE worker_type = 'test.recorder'") == 0
        system = value(standby, "SELECT system_identifier FROM uniphant.server_generation()")
        for project in hosts_:
            with open(project.path(".server_generation")) as f:
                assert f.read() == f"{system} 2\n"


def pid_of(server: pgserver.Server, worker: str):
    return value(server, "SELECT pid FROM uniphant.processes WHERE worker_id = %s::uuid", worker)


class SplitBrain(NamedTuple):
    """A failover without fencing, as unfenced_failover() leaves it."""
    old: pgserver.Server
    new: pgserver.Server
    managers: Dict[Project, str]  # each host's project: its manager's worker id
    workers: List[str]
    restarted: Any  # when the old primary came back


@contextlib.contextmanager
def unfenced_failover(projects) -> Iterator[SplitBrain]:
    """Two hosts' managers and six workers on a primary that fails; its standby
    promoted, the fleet moved there; the old primary back writable on its old
    timeline, every row there an hour stale, so that nothing but the timeline
    keeps a manager from placing the workers there again, or a worker from
    registering."""
    with own_pair() as (old, new):
        conf = f"stale_after={MANAGER_STALE_AFTER}\ninterval=0.2\n"
        first, second = projects("host1", old, new, conf=conf), projects("host2", old, new, conf=conf)
        managers = {first: with_manager(first), second: with_manager(second)}
        value(old, "SELECT uniphant.scale('test.recorder', 6)")
        wait_for(lambda: value(old, "SELECT count(*) FROM uniphant.fleet WHERE state = 'running' "
                                    "AND worker_type = 'test.recorder'") == 6, timeout=30, what="six workers")
        workers = [str(w) for (w,) in rows(old, "SELECT worker_id FROM uniphant.workers")]
        new.wait_for_replay(old)
        old.stop("immediate")
        new.promote()
        wait_for(lambda: live_sessions(new) == 8, timeout=30, what="the fleet on the new primary")
        old.start()
        restarted = value(old, "SELECT pg_postmaster_start_time()")
        value(old, "UPDATE uniphant.processes SET heartbeat_at = heartbeat_at - interval '1 hour'")
        yield SplitBrain(old, new, managers, workers, restarted)


def assert_nothing_ran_on_the_old_primary_and_one_copy_at_a_time(failover: SplitBrain) -> None:
    """No call and no process row on the old primary since it came back, and no
    worker id ever had two processes at work at once, on either server."""
    old, new, restarted = failover.old, failover.new, failover.restarted
    assert value(old, "SELECT count(*) FROM calls WHERE at >= %s", restarted) == 0
    assert value(old, "SELECT count(*) FROM uniphant.processes WHERE heartbeat_at >= %s OR started_at >= %s",
                 restarted, restarted) == 0
    calls = set(rows(old, "SELECT worker_id::text, pid, at FROM calls"))
    calls |= set(rows(new, "SELECT worker_id::text, pid, at FROM calls"))
    assert_one_copy_at_a_time(calls)


@pytest.mark.faults
def test_an_old_primary_that_comes_back_writable_is_refused_and_no_worker_runs_twice(projects):
    """The split brain of a failover without fencing: the primary fails, the standby is
    promoted, the old primary comes back writable (on its old timeline), and a
    manager's session on the new primary is terminated, then every session, so
    that each process reconnects with the old primary first in PGHOST."""
    with unfenced_failover(projects) as failover:
        old, new, managers, workers = failover.old, failover.new, failover.managers, failover.workers
        first = next(iter(managers))
        refusal = (f"refused {where(old)}: an old primary: timeline 1, but timeline 2 of this cluster "
                   f"has been seen; fence it")
        # A manager's session ends: it reconnects, the old primary first in its list.
        split = value(new, "SELECT now()")
        terminate(new, "a.application_name = (SELECT id::text FROM uniphant.processes WHERE worker_id = %s::uuid)",
                  managers[first])
        wait_for(lambda: refusal in first.log(managers[first], "uniphant.manager"),
                 what="the manager's refusal")
        wait_for(lambda: live_sessions(new) == 8, timeout=30, what="the manager back on the new primary")
        wait_for(lambda: at_work(new, workers, split, calls=3), what="every worker at work after the split")
        # Then every session ends: each worker reconnects, the old primary first.
        split = value(new, "SELECT now()")
        terminate(new, "a.application_name IN (SELECT p.id::text FROM uniphant.processes p)")
        wait_for(lambda: live_sessions(new) == 8, timeout=30, what="the fleet back on the new primary")
        wait_for(lambda: at_work(new, workers, split, calls=3), what="every worker at work again")
        for w in workers:
            logs = [p.log(w, "test.recorder") for p in managers]
            assert any(refusal in log.partition("lost the database connection")[2] for log in logs), logs
        assert_nothing_ran_on_the_old_primary_and_one_copy_at_a_time(failover)
        for w in workers:
            holders = [p.running_pid(w, "test.recorder") for p in managers]
            assert len([h for h in holders if h]) <= 1, holders


def terminate(server: pgserver.Server, where_sql: str, *params) -> None:
    """End the sessions of server's pg_stat_activity `a` that match where_sql."""
    value(server, "SELECT count(pg_terminate_backend(a.pid)) FROM pg_stat_activity a WHERE " + where_sql,
          *params)


def assert_one_copy_at_a_time(calls: set) -> None:
    """Each worker's processes, by the span of their recorded calls, followed one another."""
    spans: Dict[tuple, list] = {}
    for worker, pid, at in calls:
        span = spans.setdefault((worker, pid), [at, at])
        span[0], span[1] = min(span[0], at), max(span[1], at)
    by_worker: Dict[str, list] = {}
    for (worker, pid), span in spans.items():
        by_worker.setdefault(worker, []).append((span[0], span[1], pid))
    for worker, runs in by_worker.items():
        runs.sort()
        for before, after in zip(runs, runs[1:]):
            assert before[1] < after[0], f"worker {worker}: PIDs {before[2]} and {after[2]} at work at once"


@pytest.mark.faults
def test_a_fresh_start_refuses_the_old_primary_its_host_has_seen_superseded(projects):
    with own_pair() as (old, new):
        new.wait_for_replay(old)
        old.stop("immediate")
        new.promote()
        old.start()
        system = value(new, "SELECT system_identifier FROM uniphant.server_generation()")
        host = projects("seen", old, new)
        # A process of this host sees the new primary (PGHOST names it alone) ...
        seer = str(uuid.uuid4())
        start_daemon(host, seer, env=hosts(new))
        assert host.run(seer, "stop").returncode == 0
        with open(host.path(".server_generation")) as f:
            assert f.read() == f"{system} 2\n"
        # ... so a fresh process of the host, with the old primary first, refuses it.
        worker = str(uuid.uuid4())
        pid = start_daemon(host, worker)
        assert pid_of(new, worker) == pid
        assert value(old, "SELECT count(*) FROM uniphant.processes WHERE worker_id = %s::uuid", worker) == 0
        assert (f"refused {where(old)}: an old primary: timeline 1, but timeline 2 of this cluster has been "
                f"seen; fence it") in host.log(worker)
        table = ops(host, "-v", "ps")
        assert table.returncode == 0 and f"warning: refused {where(old)}: an old primary" in table.stderr
        assert f"read from {where(new)}, a primary" in table.stderr
        # The limit: a host that has never seen the new primary cannot tell the old one.
        fresh = projects("fresh", old, new)
        other = str(uuid.uuid4())
        pid = start_daemon(fresh, other)
        assert pid_of(old, other) == pid


@pytest.mark.faults
def test_a_full_disk_does_not_keep_a_process_from_its_server(db, tmp_path, monkeypatch):
    def full(path, text):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    monkeypatch.setattr(uniphant, "_write_atomically", full)
    monkeypatch.setattr(uniphant._runtime, "generations", {})
    monkeypatch.setattr(uniphant._runtime.log, "pending", [])
    config = dict(db.env, process_id=str(uuid.uuid4()), stale_after=60.0, state_dir=str(tmp_path),
                  lock_file=str(tmp_path / ".lock"), host_id=str(uuid.uuid4()))
    uniphant.connect_to_database(config).close()
    assert uniphant._runtime.log.pending == [
        "cannot record the server's generation in .server_generation (No space left on device): a process "
        "started on this host later will not know to refuse an old primary"]
    assert not (tmp_path / ".server_generation").exists()


def test_every_part_may_read_the_server_generation(db):
    roles = [f"g_{uuid.uuid4().hex[:8]}" for _ in range(4)]
    try:
        for role, kind in zip(roles, ("worker", "manager", "operator")):
            db.rows(f"CREATE ROLE {role}")
            db.rows("SELECT uniphant.grant_role(%s, %s)", role, kind)
        db.rows(f"CREATE ROLE {roles[3]}")
        may = [db.value("SELECT has_function_privilege(%s, 'uniphant.server_generation()', 'EXECUTE')", role)
               for role in roles]
        assert may == [True, True, True, False]
    finally:
        for role in roles:
            db.rows("SELECT uniphant.revoke_role(%s)", role)
            db.rows(f"DROP ROLE IF EXISTS {role}")


def test_a_role_that_may_not_read_the_generation_is_told_what_to_grant(project, db, worker_id, make_role):
    role, password = make_role("worker")
    db.rows(f"REVOKE EXECUTE ON FUNCTION uniphant.server_generation() FROM {role}")
    result = project.run(worker_id, "start", env={"PGHOST": "127.0.0.1", "PGUSER": role, "PGPASSWORD": password})
    assert_clean_error(result, 1, "could not connect to PostgreSQL at 127.0.0.1:",
                       "permission denied for function server_generation: the database's owner gives a role "
                       "its part with uniphant.grant_role()")
