"""README, "One copy at a time: the guarantee and its limits": the lease, its
takeover rules, the watchdog, and who may act on a row."""

from __future__ import annotations

import os
import shutil
import time
import uuid

import pg8000.dbapi
import pytest

from conftest import assert_clean_error, gone, no_session, register, session_of, start_daemon, wait_for, write_worker


@pytest.mark.faults
def test_notification_from_any_role_is_only_a_hint(project, db, worker_id, make_role):
    stranger, password = make_role("stranger")
    db.rows(f"REVOKE ALL ON FUNCTION keepalive(), disconnect() FROM {stranger}")
    project.write("workers/test/uniphant.conf", "log_level=DEBUG\ninterval=0.1\n")
    pid = start_daemon(project, worker_id)
    channel = "uniphant_" + str(db.process(worker_id)[0]).replace("-", "")
    conn = session_of(db, stranger, password, "nobody")
    try:
        conn.cursor().execute(f"NOTIFY {channel}, 'stop'")
        conn.cursor().execute(f"NOTIFY {channel}, 'st\u00f6p \u2603'")  # not ASCII
    finally:
        conn.close()
    wait_for(lambda: "but the row is still there: not a stop" in project.log(worker_id), what="the hint")
    ticks = project.log(worker_id).count("tick")
    wait_for(lambda: project.log(worker_id).count("tick") >= ticks + 3, what="work to go on")
    assert not gone(pid) and db.process(worker_id)[2] == pid


def test_start_never_stops_a_live_copy_whose_pid_directory_was_removed(project, db, worker_id):
    pid = start_daemon(project, worker_id)
    shutil.rmtree(project.path("pid"))
    assert_clean_error(project.run(worker_id, "start"), 1, "already running", f"PID {pid}")
    assert not gone(pid) and db.process(worker_id)[2] == pid


def test_a_symlinked_alias_cannot_start_a_second_copy(project, db, worker_id):
    pid = start_daemon(project, worker_id)
    os.symlink(project.path("workers/test/probe.py"), project.path("workers/alias.py"))
    result = project.run(worker_id, "start", "-f", script="workers/alias.py")
    assert_clean_error(result, 1, "already running", f"PID {pid}")
    assert not gone(pid) and db.process(worker_id)[2] == pid


@pytest.mark.faults
def test_worker_that_lost_its_session_in_a_long_call_exits_before_another_host_takes_over(
        project, db, worker_id, tmp_path):
    project.write("uniphant.conf", "stale_after=3\n")
    project.write("workers/test/uniphant.conf", "mode=sleep\n")
    pid = start_daemon(project, worker_id)
    wait_for(lambda: "sleeping" in project.log(worker_id), what="the worker asleep in its call")
    db.rows("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name = %s",
            str(db.process(worker_id)[0]))
    other = type(project)(str(tmp_path / "other_host"), project.home, project.env)
    other.write("uniphant.conf", "stale_after=3\n")

    def taken_over() -> bool:
        result = other.run(worker_id, "start")
        assert result.returncode == 0 or "already running" in result.stderr, result.stderr
        return result.returncode == 0

    try:
        wait_for(taken_over, timeout=20, what="another host to take the worker over")
        assert gone(pid), "two copies of the worker ran at once"
        assert "exiting: the database session was lost during a call" in project.log(worker_id)
    finally:
        other.cleanup()


# (is connected, heartbeat age in seconds) of a row whose process declared stale_after = 5 s.
ROW_STATES = {
    "live": (True, 0), "live, stale": (True, 10), "gone": (False, 0),
    "gone, stale by the caller's rule only": (False, 4), "gone, stale": (False, 10),
}


@pytest.mark.faults
@pytest.mark.parametrize("state", ROW_STATES)
@pytest.mark.parametrize("looked", [True, False], ids=["its PID found gone", "its PID not looked at"])
@pytest.mark.parametrize("same_host", [True, False], ids=["same host", "other host"])
@pytest.mark.parametrize("same_role", [True, False], ids=["same role", "other role"])
def test_a_row_is_taken_over_only_without_a_session_and_by_its_own_host_and_role_or_once_stale(
        db, make_role, same_role, same_host, looked, state):
    owner, other = make_role("owner"), make_role("other")
    host, elsewhere, worker = (str(uuid.uuid4()) for _ in range(3))
    for h in (host, elsewhere):
        db.rows("SELECT register_host(%s::uuid, %s)", h, f"host-{h[:8]}")
    first_process, second_process = str(uuid.uuid4()), str(uuid.uuid4())
    first = session_of(db, *owner, first_process)
    register(first, worker, host)
    connected, age = ROW_STATES[state]
    db.rows("UPDATE processes SET heartbeat_at = now() - make_interval(secs => %s) "
            "WHERE worker_id = %s::uuid", age, worker)
    if not connected:
        first.close()
        wait_for(lambda: no_session(db, first_process), what="the session to end")
    caller = session_of(db, *(owner if same_role else other), second_process)
    expected = not connected and ((same_host and same_role and looked) or age > 5)
    try:
        register(caller, worker, host if same_host else elsewhere, "3 seconds", 1 if looked else None)
        taken = True
    except pg8000.dbapi.DatabaseError as e:
        taken, message = False, e.args[0]["M"]
        assert "PID 1 on host host-" in message and host not in message and elsewhere not in message
        assert e.args[0]["C"] == ("UN003" if same_host and same_role else "UN001")
    finally:
        caller.close()
        if connected:
            first.close()
    assert taken == expected
    assert str(db.value("SELECT id FROM processes WHERE worker_id = %s::uuid", worker)) == \
        (second_process if expected else first_process)


@pytest.mark.faults
def test_a_borrowed_application_name_cannot_block_a_takeover(db, make_role):
    owner, stranger = make_role("owner"), make_role("stranger")
    host, elsewhere, worker, dead = (str(uuid.uuid4()) for _ in range(4))
    first = session_of(db, *owner, dead)
    register(first, worker, host)
    first.close()
    db.rows("UPDATE processes SET heartbeat_at = now() - interval '10 seconds' WHERE worker_id = %s::uuid",
            worker)
    borrower = session_of(db, *stranger, dead)
    caller = session_of(db, *owner, str(uuid.uuid4()))
    try:
        wait_for(lambda: db.value("SELECT count(*) FROM pg_stat_activity WHERE application_name = %s "
                                  "AND usename = %s", dead, owner[0]) == 0, what="the owner's session to end")
        register(caller, worker, elsewhere)
    finally:
        caller.close()
        borrower.close()
    assert db.value("SELECT id::text <> %s FROM processes WHERE worker_id = %s::uuid", dead, worker)


@pytest.mark.faults
def test_a_session_that_runs_one_worker_cannot_register_another(db):
    host = str(uuid.uuid4())
    conn = db.connect(application_name=str(uuid.uuid4()))
    try:
        conn.cursor().execute("SET statement_timeout = '5s'")  # a loop would end as a timeout
        register(conn, str(uuid.uuid4()), host)
        with pytest.raises(pg8000.dbapi.DatabaseError) as refused:
            register(conn, str(uuid.uuid4()), host)
        assert refused.value.args[0]["C"] == "UN004"
    finally:
        conn.close()
        db.rows("DELETE FROM processes WHERE host_id = %s::uuid", host)


def test_heartbeats_find_their_row_by_primary_key_whatever_the_statistics(cluster):
    database = cluster.database("uniphant_plans")
    host = str(uuid.uuid4())
    conn = database.connect(application_name=str(uuid.uuid4()))
    try:
        cursor = conn.cursor()
        register(conn, str(uuid.uuid4()), host)
        database.rows("ANALYZE processes")  # statistics of a table with one row
        for _ in range(10):  # plans made now, and kept by this session
            cursor.execute("SELECT keepalive()")
        database.rows("INSERT INTO processes (id, worker_id, host_id) SELECT gen_random_uuid(), "
                      "gen_random_uuid(), %s::uuid FROM generate_series(1, 2000)", host)
        cursor.execute("BEGIN")
        for _ in range(20):
            cursor.execute("SELECT keepalive()")
        cursor.execute("SELECT seq_scan, idx_scan FROM pg_stat_xact_user_tables WHERE relname = 'processes'")
        seq_scans, index_scans = cursor.fetchone()
        cursor.execute("SHOW synchronous_commit")
        assert cursor.fetchone()[0] == "off"  # the heartbeat's commit does not wait for the disk
        cursor.execute("COMMIT")
    finally:
        conn.close()
    assert seq_scans == 0 and index_scans >= 20


def test_keepalive_writes_at_most_once_a_second_however_often_it_is_called(db, worker_id):
    conn = db.connect(application_name=str(uuid.uuid4()))
    try:
        register(conn, worker_id, str(uuid.uuid4()))
        cursor, versions = conn.cursor(), set()
        started = time.monotonic()
        for _ in range(200):
            cursor.execute("SELECT keepalive()")
            assert cursor.fetchone()[0] is True
            versions.add(db.value("SELECT xmin::text FROM processes WHERE worker_id = %s::uuid", worker_id))
        assert len(versions) <= 2 + time.monotonic() - started  # the insert, then one write a second
        cursor.execute("SELECT disconnect()")
    finally:
        conn.close()


@pytest.mark.faults
def test_a_removed_pid_directory_and_a_dropped_session_do_not_let_a_second_copy_start(project, db, worker_id):
    project.write("workers/test/uniphant.conf", "mode=sleep\n")
    pid = start_daemon(project, worker_id)
    wait_for(lambda: "sleeping" in project.log(worker_id), what="the worker asleep in its call")
    shutil.rmtree(project.path("pid"))
    db.rows("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name = %s",
            str(db.process(worker_id)[0]))
    wait_for(lambda: no_session(db, str(db.process(worker_id)[0])), what="its session to end")
    assert_clean_error(project.run(worker_id, "start", "-f"), 1, "already running", f"PID {pid}")
    assert not gone(pid) and db.process(worker_id)[2] == pid


@pytest.mark.faults
def test_stop_leaves_the_row_of_a_killed_worker_whose_backend_still_runs_its_statement(project, db, worker_id):
    write_worker(project, "stuck", """
        logger.info("querying")
        connection.cursor().execute("SELECT pg_sleep(60)")
        """, prelude="import signal\nsignal.signal(signal.SIGTERM, signal.SIG_IGN)")
    project.write("workers/test/uniphant.conf", "stop_timeout=0.5\n")
    start_daemon(project, worker_id, script="workers/test/stuck.py")
    wait_for(lambda: "querying" in project.log(worker_id, "test.stuck"), what="the long statement")
    process_id = str(db.process(worker_id)[0])
    stop = project.run(worker_id, "stop", script="workers/test/stuck.py")
    assert stop.returncode == 0 and "still runs a statement" in stop.stderr
    assert db.process(worker_id) is not None  # its backend still works for it
    assert_clean_error(project.run(worker_id, "start", "-f", script="workers/test/stuck.py"), 1, "already running")
    db.rows("SELECT pg_cancel_backend(pid) FROM pg_stat_activity WHERE application_name = %s", process_id)
    wait_for(lambda: no_session(db, process_id), what="the killed worker's backend to end")
    start_daemon(project, worker_id, script="workers/test/stuck.py")


@pytest.mark.faults
def test_a_worker_that_closes_its_connection_and_works_on_is_ended_before_a_takeover(project, db, worker_id):
    write_worker(project, "closer", """
        connection.close()
        held = open(os.devnull)  # the connection's descriptor number now names a file
        logger.info("working on without a session")
        time.sleep(60)
        """)
    project.write("workers/test/uniphant.conf", "stale_after=3\n")
    child = project.popen(worker_id, "start", "-f", script="workers/test/closer.py")
    wait_for(lambda: "working on without a session" in project.log(worker_id, "test.closer"), what="the call")
    child.communicate(timeout=10)  # its lease of 3 s runs out long before
    assert "exiting: the database session was lost" in project.log(worker_id, "test.closer")


def test_a_full_queue_of_the_workers_own_notifications_costs_no_queries(project, db, worker_id):
    write_worker(project, "busy_listener", """
        connection.cursor().execute("LISTEN jobs")
        logger.info("listening")
        while not os.path.exists("sent"):
            time.sleep(0.01)
        calls, started = 0, time.monotonic()
        while alive(config, connection) and time.monotonic() < started + 2:
            calls += 1
        logger.info("alive() calls: %d", calls)
        raise SystemExit(0)
        """)
    project.popen(worker_id, "start", "-f", script="workers/test/busy_listener.py")
    wait_for(lambda: "listening" in project.log(worker_id, "test.busy_listener"), what="the LISTEN")
    for n in range(150):
        db.rows(f"NOTIFY jobs, '{n}'")
    project.write("sent", "")
    wait_for(lambda: "alive() calls:" in project.log(worker_id, "test.busy_listener"), what="the count")
    calls = int(project.log(worker_id, "test.busy_listener").split("alive() calls: ")[1].split()[0])
    assert calls > 100_000  # a query per call would allow some thousands
