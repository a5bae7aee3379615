"""The trust model (docs/trust-model.md, "Trust model"): what a worker role's rows can hold.

A worker role marks done only a worker that its host's manager started as the
calling process; the server bounds every lease it grants; a session holds at
most one process row.  Each test tries the attack as a role with only the
worker part would.
"""

from __future__ import annotations

import datetime
import uuid

import pg8000.dbapi
import pytest

from conftest import fleet, host_of, ops, with_manager
from test_uniphant import no_session, session_of, sql_rows, start_daemon, wait_for

pytestmark = pytest.mark.own_database  # max_lease is the whole database's, and a manager acts on every worker

FINISHES = '''\
from uniphant import main

def work(config, logger, connection):
    raise SystemExit(0)

if __name__ == "__main__":
    main(work)
'''


def refused(conn, sql: str, *params) -> str:
    """The SQLSTATE that conn's statement failed with."""
    with pytest.raises(pg8000.dbapi.DatabaseError) as failed:
        sql_rows(conn, sql, *params)
    return failed.value.args[0]["C"]


def done(db, worker: str) -> bool:
    return db.value("SELECT done_at IS NOT NULL FROM workers WHERE worker_id = %s::uuid", worker)


def test_finish_marks_done_only_the_worker_its_hosts_manager_started_as_the_calling_session(db, make_role):
    role = make_role("worker")
    host, elsewhere = str(uuid.uuid4()), str(uuid.uuid4())
    db.rows("SELECT register_host(%s::uuid, 'h'), register_host(%s::uuid, 'e')", host, elsewhere)
    paused, backoff, added, running = (
        str(db.value("SELECT add_worker('app.job', %s::uuid)", h)) for h in (host, host, None, host))
    db.rows("UPDATE workers SET paused_at = now() WHERE worker_id = %s::uuid", paused)
    # What a manager of the host reported: one worker waits to start again, one runs as PID 4242.
    db.rows("INSERT INTO worker_states (worker_id, host_id, state, pid) VALUES (%s::uuid, %s::uuid, 'backoff', "
            "NULL), (%s::uuid, %s::uuid, 'running', 4242)", backoff, host, running, host)
    sessions = []
    try:
        for worker in (paused, backoff, added):
            for on_host in (host, elsewhere):
                conn = session_of(db, *role, str(uuid.uuid4()))
                sessions.append(conn)
                sql_rows(conn, "SELECT register_process(%s::uuid, %s::uuid, 'app.job', 4242, '1 minute')",
                         worker, on_host)
                assert refused(conn, "SELECT finish()") == "UN008"
                sql_rows(conn, "SELECT disconnect()")
            assert not done(db, worker)
        process = str(uuid.uuid4())
        owner = session_of(db, *role, process)
        sessions.append(owner)
        sql_rows(owner, "SELECT register_process(%s::uuid, %s::uuid, 'app.job', 4242, '1 minute')", running, host)
        borrower = session_of(db, *role, process)  # the running process's id, borrowed
        sessions.append(borrower)
        assert refused(borrower, "SELECT finish()") == "UN008"
        assert not done(db, running)
        sql_rows(owner, "SELECT finish()")
        assert done(db, running) and not db.value("SELECT count(*) FROM processes WHERE id = %s::uuid", process)
    finally:
        for conn in sessions:
            conn.close()


def test_resume_and_restart_bring_a_done_worker_back(project, db):
    project.write("workers/app/once.py", FINISHES)
    project.write("workers/app/uniphant.conf", "restart=on-failure\n")
    with_manager(project)
    worker = str(db.value("SELECT add_worker('app.once', %s::uuid)", host_of(project)))

    def finished(runs: int) -> bool:
        """Done after runs runs, as its manager has seen (a change made before it had would race its end)."""
        return (done(db, worker) and db.rows("SELECT state, pid FROM worker_states WHERE worker_id = %s::uuid",
                                             worker) == [("done", None)]
                and project.log(worker, "app.once").count("started: process") == runs)

    wait_for(lambda: finished(1), what="the worker done after its first run")
    result = ops(project, "restart", worker)
    assert result.returncode == 0 and "restart: 1 worker" in result.stdout, result.stderr
    wait_for(lambda: finished(2), what="the restarted worker run, and done again")
    result = ops(project, "resume", worker)
    assert result.returncode == 0 and "resume: 1 worker" in result.stdout, result.stderr
    wait_for(lambda: finished(3), what="the resumed worker run, and done again")
    assert db.value("SELECT resume_workers('app.once')") == 1
    wait_for(lambda: finished(4), what="the worker type resumed")
    assert db.value("SELECT restart_workers('app.once')") == 1
    wait_for(lambda: finished(5), what="the worker type restarted")
    assert fleet(db, worker)["restarts"] == 0  # brought back on request: no failure counted


def test_the_server_grants_no_lease_longer_than_its_max_lease(project, db, make_role, worker_id):
    role = make_role("worker")
    assert db.value("SELECT max_lease FROM settings") == datetime.timedelta(minutes=10)
    conn = session_of(db, *role, str(uuid.uuid4()))
    try:
        granted = sql_rows(conn, "SELECT register_process(gen_random_uuid(), NULL, 'test.sql', 1, '1 day')")[0][0]
        assert granted == datetime.timedelta(minutes=10)
        assert db.value("SELECT stale_after FROM processes WHERE role = %s", role[0]) == granted
    finally:
        conn.close()
    db.rows("UPDATE settings SET max_lease = '3 seconds'")
    # A manager that asked for a day, then died, holds its host's placement for the lease only.
    host, process = str(uuid.uuid4()), str(uuid.uuid4())
    manager = db.connect(application_name=process)
    sql_rows(manager, "SELECT register_host(%s::uuid, 'gone'), register_process(%s::uuid, %s::uuid, "
             "'uniphant.manager', 1, '1 day')", host, str(uuid.uuid4()), host)
    sql_rows(manager, "SELECT register_manager(%s::uuid)", host)
    manager.close()
    wait_for(lambda: no_session(db, process), what="the manager's session to end")
    wait_for(lambda: not db.value("SELECT count(*) FROM live_managers() WHERE host_id = %s::uuid", host),
             timeout=10, what="the dead manager to count no longer")
    # A worker that asks for an hour heartbeats by the 3 seconds granted (else every 21 minutes).
    project.write("workers/test/uniphant.conf", "stale_after=3600\n")
    start_daemon(project, worker_id)
    assert db.value("SELECT stale_after FROM processes WHERE worker_id = %s::uuid", worker_id) == \
        datetime.timedelta(seconds=3)
    first = db.value("SELECT heartbeat_at FROM processes WHERE worker_id = %s::uuid", worker_id)
    wait_for(lambda: db.value("SELECT heartbeat_at FROM processes WHERE worker_id = %s::uuid",
                              worker_id) > first, timeout=5, what="a heartbeat by the granted lease")
    assert "running with 3 s" in project.log(worker_id)


def test_a_session_that_is_not_pooled_holds_at_most_one_process_row(db, make_role):
    role = make_role("worker")
    host = str(uuid.uuid4())
    db.rows("SELECT register_host(%s::uuid, 'h')", host)
    conn = session_of(db, *role, str(uuid.uuid4()))
    try:
        sql_rows(conn, "SELECT register_process(gen_random_uuid(), %s::uuid, 'junk.t0', 1, '1 day')", host)
        for _ in range(3):
            conn.cursor().execute(f"SET application_name = '{uuid.uuid4()}'")
            assert refused(conn, "SELECT register_process(gen_random_uuid(), %s::uuid, 'junk.t', 1, '1 day')",
                           host) == "UN004"
        assert db.value("SELECT count(*) FROM processes WHERE role = %s", role[0]) == 1
        # Behind a pooler a session is not a process: its rows live by their heartbeats, under the lease.
        sql_rows(conn, "SELECT register_process(gen_random_uuid(), %s::uuid, 'junk.p', 1, '1 day', true)", host)
        assert db.rows("SELECT pooled, stale_after, backend_pid FROM processes WHERE role = %s AND pooled",
                       role[0]) == [(True, datetime.timedelta(minutes=10), None)]
    finally:
        conn.close()
    other = session_of(db, *role, str(uuid.uuid4()))  # once its row is gone, a session may be another process
    try:
        sql_rows(other, "SELECT register_process(gen_random_uuid(), %s::uuid, 'junk.t1', 1, '1 minute')", host)
        sql_rows(other, "SELECT disconnect()")
        other.cursor().execute(f"SET application_name = '{uuid.uuid4()}'")
        sql_rows(other, "SELECT register_process(gen_random_uuid(), %s::uuid, 'junk.t2', 1, '1 minute')", host)
    finally:
        other.close()
