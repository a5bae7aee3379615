"""README, "Writing a worker": the worker function, its transactions, exits,
forks and session, and the examples as typed."""

from __future__ import annotations

import uuid

import pytest

import pgserver  # dev/pgserver.py, on the path by conftest.py
from conftest import copy_examples, gone, start_daemon, tcp_env, wait_for, write_worker


@pytest.mark.parametrize("aborted", [False, True], ids=["open", "aborted"])
def test_exception_inside_a_transaction_still_removes_the_row(project, db, worker_id, aborted):
    write_worker(project, "tx_raise", f"""
        cursor = connection.cursor()
        cursor.execute("BEGIN")
        try:
            cursor.execute("SELECT {'1/0' if aborted else '1'}")
        except Exception:
            logger.info("the transaction is aborted")
        raise RuntimeError("boom inside a transaction")
        """)
    result = project.run(worker_id, "start", "-f", script="workers/test/tx_raise.py")
    assert result.returncode == 1
    log = project.log(worker_id, "test.tx_raise")
    assert "RuntimeError: boom inside a transaction" in log and "Traceback" in log
    assert db.process(worker_id) is None


def test_transaction_left_open_is_rolled_back_warned_once_and_blocks_no_delete(project, db, worker_id):
    table = f"left_open_{uuid.uuid4().hex[:8]}"
    db.rows(f"CREATE TABLE {table} (n int)")
    write_worker(project, "tx_open", f"""
        cursor = connection.cursor()
        cursor.execute("BEGIN")
        cursor.execute("INSERT INTO {table} VALUES (1)")
        logger.info("returning inside a transaction")
        """)
    project.write("workers/test/uniphant.conf", "interval=0.05\nstale_after=3\n")
    child = project.popen(worker_id, "start", "-f", script="workers/test/tx_open.py")
    log = lambda: project.log(worker_id, "test.tx_open")  # noqa: E731
    wait_for(lambda: log().count("returning inside a transaction") >= 5, what="five calls")
    assert log().count("returned inside a transaction: rolled it back") == 1
    assert db.value(f"SELECT count(*) FROM {table}") == 0
    deleter = db.connect()
    try:
        deleter.cursor().execute("SET lock_timeout = '2s'")
        deleter.cursor().execute("DELETE FROM processes WHERE worker_id = %s::uuid", (worker_id,))
    finally:
        deleter.close()
    out, err = child.communicate(timeout=10)
    assert "stopping: its process row was deleted" in out, err


def test_alive_inside_a_transaction_takes_no_lock_on_the_row(project, db, worker_id):
    write_worker(project, "tx_alive", """
        cursor = connection.cursor()
        cursor.execute("BEGIN")
        cursor.execute("SELECT 1")
        logger.info("in a transaction")
        while alive(config, connection) and not os.path.exists("done"):
            time.sleep(0.01)
        cursor.execute("COMMIT")
        """)
    project.write("workers/test/uniphant.conf", "stale_after=3\n")
    child = project.popen(worker_id, "start", "-f", script="workers/test/tx_alive.py")
    wait_for(lambda: "in a transaction" in project.log(worker_id, "test.tx_alive"), what="the transaction")
    wait_for(lambda: db.value("SELECT heartbeat_at < now() - interval '1.5 seconds' FROM processes "
                              "WHERE worker_id = %s::uuid", worker_id), what="a heartbeat to fall due")
    deleter = db.connect()
    try:
        deleter.cursor().execute("SET lock_timeout = '1s'")
        deleter.cursor().execute("DELETE FROM processes WHERE worker_id = %s::uuid", (worker_id,))
    finally:
        deleter.close()
    project.write("done", "")
    out, err = child.communicate(timeout=10)
    assert child.returncode == 0, err
    assert "stopping: its process row was deleted" in out


@pytest.mark.parametrize("raised, code, said", [
    ("SystemExit(7)", 7, "stopping: the worker function raised SystemExit(7)"),
    ("SystemExit(None)", 0, "stopping: the worker function raised SystemExit(None)"),
    ("KeyboardInterrupt()", 1, "stopping: the worker function failed"),
])
def test_worker_function_that_raises_systemexit_or_keyboardinterrupt(project, db, worker_id, raised, code, said):
    write_worker(project, "leaver", f"raise {raised}")
    result = project.run(worker_id, "start", "-f", script="workers/test/leaver.py")
    assert result.returncode == code, result.stderr
    assert said in project.log(worker_id, "test.leaver")
    assert db.process(worker_id) is None


def test_worker_that_leaves_a_thread_running_still_exits(project, db, worker_id):
    write_worker(project, "threader", """
        if not hasattr(work, "thread"):
            work.thread = threading.Thread(target=time.sleep, args=(3600,), name="forgotten")
            work.thread.start()
        logger.info("tick")
        """)
    child = project.popen(worker_id, "start", "-f", script="workers/test/threader.py")
    wait_for(lambda: "tick" in project.log(worker_id, "test.threader"), what="a tick")
    db.rows("DELETE FROM processes WHERE worker_id = %s::uuid", worker_id)
    out, err = child.communicate(timeout=10)
    assert child.returncode == 0, err
    assert "exiting without waiting for threads the worker function left running: forgotten" in out


def test_worker_that_changes_its_application_name_touches_no_other_row(project, db, worker_id):
    victim = str(uuid.uuid4())
    victim_pid = start_daemon(project, victim)
    write_worker(project, "impostor", f"""
        connection.cursor().execute("SET application_name = '{db.process(victim)[0]}'")
        """)
    result = project.run(worker_id, "start", "-f", script="workers/test/impostor.py")
    assert result.returncode == 1
    assert "stopping: the worker function changed its session's application_name" in \
        project.log(worker_id, "test.impostor")
    assert db.process(worker_id) is None
    assert db.process(victim)[2] == victim_pid and not gone(victim_pid)


@pytest.mark.parametrize("change", ["SET SESSION AUTHORIZATION", "SET ROLE"])
def test_worker_that_changes_its_session_user_is_stopped_and_its_row_removed(project, db, worker_id, change):
    role = f"other_{uuid.uuid4().hex[:8]}"
    db.rows(f"CREATE ROLE {role}")
    try:
        write_worker(project, "shapeshifter", f'connection.cursor().execute("{change} {role}")')
        project.write("workers/test/uniphant.conf", "stale_after=3\n")
        result = project.run(worker_id, "start", "-f", script="workers/test/shapeshifter.py")
        assert result.returncode == 1
        assert "ERROR" in project.log(worker_id, "test.shapeshifter")
        assert db.process(worker_id) is None
    finally:
        db.rows(f"DROP ROLE {role}")


def test_worker_that_changes_its_search_path_still_reaches_uniphant(project, db, worker_id):
    schema = f"trap_{uuid.uuid4().hex[:8]}"
    db.rows(f"CREATE SCHEMA {schema}")
    db.rows(f"CREATE FUNCTION {schema}.keepalive() RETURNS boolean LANGUAGE sql AS 'SELECT false'")
    db.rows(f"CREATE FUNCTION {schema}.disconnect() RETURNS void LANGUAGE plpgsql AS 'BEGIN END'")
    write_worker(project, "wanderer", f'connection.cursor().execute("SET search_path = {schema}, public")')
    project.write("workers/test/uniphant.conf", "stale_after=3\n")
    child = project.popen(worker_id, "start", "-f", script="workers/test/wanderer.py")
    first = wait_for(lambda: db.value("SELECT heartbeat_at FROM processes WHERE worker_id = %s::uuid",
                                      worker_id), what="the process row")
    wait_for(lambda: db.value("SELECT heartbeat_at > %s FROM processes WHERE worker_id = %s::uuid",
                              first, worker_id), what="a heartbeat through uniphant.keepalive()")
    child.terminate()
    out, err = child.communicate(timeout=10)
    assert child.returncode == 0, err
    assert db.process(worker_id) is None


@pytest.mark.faults
def test_reconnects_do_not_bring_the_next_call_forward(project, db, worker_id, password_role):
    role, password = password_role
    db.rows(f"ALTER ROLE {role} SET idle_session_timeout = '300ms'")
    project.write("workers/test/uniphant.conf", "interval=2\n")
    child = project.popen(worker_id, "start", "-f", env=dict(tcp_env(db, role), PGPASSWORD=password))
    wait_for(lambda: project.log(worker_id).count("tick") >= 3, timeout=30, what="three ticks")
    child.terminate()
    child.communicate(timeout=10)
    log = project.log(worker_id)
    assert log.count("database connection restored") >= 4  # the server ended idle sessions
    ticks = [log_time(line) for line in log.splitlines() if line.endswith(": tick")]
    assert min(b - a for a, b in zip(ticks, ticks[1:])) >= 1.9, ticks


def log_time(line: str) -> float:
    import datetime
    return datetime.datetime.strptime(line[:23], "%Y-%m-%d %H:%M:%S,%f").timestamp()


def test_example_hello_runs_as_typed(project, db, worker_id):
    copy_examples(project)
    script = "workers/examples/hello.py"
    result = project.run(worker_id, "start", script=script)
    assert result.returncode == 0, result.stderr
    wait_for(lambda: "hello from worker" in project.log(worker_id, "examples.hello"), what="hello")
    assert project.run(worker_id, "stop", script=script).returncode == 0


def test_example_jobs_drains_the_queue(project, db, worker_id):
    copy_examples(project)
    pgserver.load_sql(db.connect(), project.path("workers/examples/jobs.sql"))
    db.rows("INSERT INTO jobs (payload) SELECT 'job ' || g FROM generate_series(1, 50) g")
    script = "workers/examples/jobs.py"
    result = project.run(worker_id, "start", script=script)
    assert result.returncode == 0, result.stderr
    wait_for(lambda: db.value("SELECT count(*) FROM jobs WHERE done_at IS NULL") == 0,
             what="the queue to drain")
    assert project.run(worker_id, "stop", script=script).returncode == 0


@pytest.mark.parametrize("how", ["raise SystemExit(0)", "return"])
def test_a_process_the_worker_forks_never_acts_for_the_worker(project, db, worker_id, how):
    write_worker(project, "forker", f"""
        if not os.path.exists("forked"):
            open("forked", "w").close()
            if os.fork() == 0:
                {how}
        logger.info("tick")
        """)
    pid = start_daemon(project, worker_id, script="workers/test/forker.py")
    log = lambda: project.log(worker_id, "test.forker")  # noqa: E731
    wait_for(lambda: "returned into uniphant" in log(), what="the child to be ended")
    ticks = log().count("tick")
    wait_for(lambda: log().count("tick") >= ticks + 2, what="the worker to go on")
    assert db.process(worker_id)[2] == pid and not gone(pid)


def test_a_worker_that_changes_its_configs_process_id_touches_no_other_row(project, db, worker_id):
    victim = str(uuid.uuid4())
    victim_pid = start_daemon(project, victim)
    write_worker(project, "meddler", f"""
        config["process_id"] = "{db.process(victim)[0]}"
        logger.info("meddled")
        """)
    child = project.popen(worker_id, "start", "-f", script="workers/test/meddler.py")
    wait_for(lambda: "meddled" in project.log(worker_id, "test.meddler"), what="the meddling")
    child.terminate()
    child.communicate(timeout=10)
    assert db.process(worker_id) is None
    assert db.process(victim)[2] == victim_pid and not gone(victim_pid)
