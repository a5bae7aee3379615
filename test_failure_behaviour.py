"""README, "Failure behaviour": crashes, outages, races and hostile input
(pytest -m faults)."""

from __future__ import annotations

import os
import signal
import subprocess
import time
import uuid

import pytest

import pgserver  # dev/pgserver.py, on the path by conftest.py
import uniphant
from conftest import (assert_clean_error, cpu_seconds, gone, server_project, show_config, sql_rows, start_daemon,
                      tcp_env, wait_for)


@pytest.mark.faults
@pytest.mark.parametrize("case", ["refused", "unknown host", "unknown role", "password needed"])
def test_each_kind_of_connection_failure_is_one_line(project, db, worker_id, password_role, case):
    role, _ = password_role
    env, expected = {
        "refused": ({"PGHOST": "127.0.0.1", "PGPORT": str(pgserver.free_port())}, "Connection refused"),
        "unknown host": ({"PGHOST": "no-such-host.invalid"}, "unknown host"),
        "unknown role": ({"PGUSER": "no_such_role"}, 'role "no_such_role" does not exist'),
        "password needed": (tcp_env(db, role), "asks for a password and none is configured"),
    }[case]
    for args in (["start"], ["start", "-f"]):
        result = project.run(worker_id, *args, env=env)
        assert_clean_error(result, 1, expected)
        assert len(result.stderr.strip().splitlines()) == 1
        if case == "password needed":
            assert "PGPASSWORD" in result.stderr and os.path.join(project.home, ".pgpass") in result.stderr


@pytest.mark.faults
@pytest.mark.skipif(os.geteuid() != 0, reason="only root can take on a user ID without a name")
def test_user_id_without_a_name_is_told_to_set_pguser():
    import pwd
    uid = next(u for u in range(54321, 60000) if not _has_passwd_entry(pwd, u))
    read_end, write_end = os.pipe()
    child = os.fork()
    if child == 0:
        try:
            os.close(read_end)
            os.setgid(uid)
            os.setuid(uid)
            os.environ.pop("PGUSER", None)
            uniphant.connect_to_database({"process_id": str(uuid.uuid4()), "stale_after": 60.0})
        except uniphant.ConfigError as e:
            os.write(write_end, str(e).encode())
        finally:
            os._exit(0)
    os.close(write_end)
    with os.fdopen(read_end) as pipe:
        message = pipe.read()
    os.waitpid(child, 0)
    assert message == f"user ID {uid} has no name in the password database " \
                      f"(a container's --user, say): set PGUSER"


@pytest.mark.faults
def test_sslmode_require_against_a_server_without_ssl_is_a_clear_error(project, db, worker_id):
    result = project.run(worker_id, "start", env={
        "PGHOST": "127.0.0.1", "PGPORT": db.env["PGPORT"], "PGSSLMODE": "require"})
    assert_clean_error(result, 1, "does not support SSL (PGSSLMODE=require)")


@pytest.mark.faults
def test_a_stop_signal_ends_a_start_that_waits_for_a_silent_server(project, worker_id):
    import socket
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(5)
        child = project.popen(worker_id, "start", "-f", env={
            "PGHOST": "127.0.0.1", "PGPORT": str(silent.getsockname()[1]), "PGCONNECT_TIMEOUT": "0"})
        wait_for(lambda: tcp_sockets(child.pid), what="the connection attempt")
        child.terminate()
        _, err = child.communicate(timeout=10)
    assert child.returncode == 1 and "SIGTERM received while connecting" in err


@pytest.mark.faults
def test_a_fifo_planted_at_the_pid_file_is_refused_not_waited_on(project, worker_id):
    os.makedirs(project.path("pid/test.probe"))
    os.mkfifo(project.path(f"pid/test.probe/{worker_id}.pid"))
    for command in ("status", "stop", "start"):
        assert_clean_error(project.run(worker_id, command, timeout=10), 1, "not a regular file")


@pytest.mark.faults
def test_workers_survive_a_database_restart(private_server, tmp_path):
    project = server_project(tmp_path, "restart", private_server, "interval=0.1\n")
    admin = private_server.connect("uniphant")
    try:
        ids = [str(uuid.uuid4()) for _ in range(5)]
        pids = [start_daemon(project, w) for w in ids]
        rows_before = sorted(sql_rows(admin, "SELECT id::text, worker_id::text, pid FROM processes"))
        admin.close()
        private_server.stop("fast")
        private_server.start()
        admin = private_server.connect("uniphant")
        for w in ids:
            wait_for(lambda: "tick" in project.log(w).partition("database connection restored")[2],
                     what=f"{w} to reconnect and work")
        assert sorted(sql_rows(admin, "SELECT id::text, worker_id::text, pid FROM processes")) == rows_before
        for w, pid in zip(ids, pids):
            log = project.log(w)
            assert log.count("lost the database connection") == 1, log
            assert log.count("database connection restored") == 1, log
            assert log.rsplit("database connection restored", 1)[1].count("tick") >= 1, log
            assert not gone(pid)
    finally:
        admin.close()
        project.cleanup()


@pytest.mark.faults
def test_workers_wait_out_a_30_second_outage_without_spinning(private_server, tmp_path):
    project = server_project(tmp_path, "outage", private_server, "interval=0.1\n")
    try:
        kept, deleted, stopped = (str(uuid.uuid4()) for _ in range(3))
        kept_pid, deleted_pid = start_daemon(project, kept), start_daemon(project, deleted)
        stopped_pid = start_daemon(project, stopped)
        cpu_before = cpu_seconds(kept_pid)
        private_server.stop("fast")
        log_size = len(project.log(kept))
        time.sleep(10)  # the outage itself: the span being tested, not a wait for a condition
        status = project.run(kept, "status")
        assert status.returncode == 0 and str(kept_pid) in status.stdout
        assert project.run(stopped, "stop").returncode == 0
        assert gone(stopped_pid)
        # Back for an operator only (on another port), who deletes one worker's row.
        private_server.start(port=private_server.port + 1 if private_server.port < 65535 else 1024)
        operator = pg8000_connect(private_server, private_server.port + 1)
        operator.cursor().execute("DELETE FROM uniphant.processes WHERE worker_id = %s::uuid", (deleted,))
        operator.close()
        private_server.stop("fast")
        time.sleep(20)  # more of the outage
        assert cpu_seconds(kept_pid) - cpu_before < 1.0
        outage_log = project.log(kept)[log_size:]
        assert len(outage_log) < 1000, outage_log  # the loss, said once
        private_server.start()
        wait_for(lambda: "database connection restored" in project.log(kept), what="the reconnect")
        wait_for(lambda: gone(deleted_pid), what="the worker whose row was deleted to exit")
        assert "stopping: its process row was deleted" in project.log(deleted)
        assert not gone(kept_pid)
    finally:
        project.cleanup()


@pytest.mark.faults
def test_a_server_out_of_connections_is_one_line_that_says_what_to_do(tmp_path):
    with pgserver.Server() as server:
        server.init(settings="max_connections = 4\nsuperuser_reserved_connections = 0\n").start()
        server.create_database("uniphant")
        project = server_project(tmp_path, "crowded", server)
        held = []
        try:
            with pytest.raises(Exception):
                while len(held) < 10:
                    held.append(server.connect("uniphant"))
            result = project.run(str(uuid.uuid4()), "start", "-f")
            assert_clean_error(result, 1, "too many clients", "raise it, or put PgBouncer in transaction mode")
        finally:
            for conn in held:
                conn.close()
            project.cleanup()


def test_a_worker_connected_as_a_superuser_says_so_once(project, db, worker_id, password_role):
    role, password = password_role
    start_daemon(project, worker_id)  # the test server's superuser
    wait_for(lambda: "tick" in project.log(worker_id), what="a tick")
    assert project.log(worker_id).count("connected as a superuser") == 1
    other = str(uuid.uuid4())
    start_daemon(project, other, env=dict(tcp_env(db, role), PGPASSWORD=password))
    wait_for(lambda: "tick" in project.log(other), what="a tick")
    assert "connected as a superuser" not in project.log(other)


def pg8000_connect(server, port):
    import pg8000.dbapi
    conn = pg8000.dbapi.connect(user="postgres", database="uniphant",
                                unix_sock=f"{server.dir}/.s.PGSQL.{port}")
    conn.autocommit = True
    return conn


@pytest.mark.faults
def test_start_gives_up_on_a_silent_server_within_the_connect_timeout(project, worker_id):
    import socket
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(5)  # accepts connections into the backlog, never answers
        port = silent.getsockname()[1]
        started = time.monotonic()
        result = project.run(worker_id, "start", env={
            "PGHOST": "127.0.0.1", "PGPORT": str(port), "PGCONNECT_TIMEOUT": "2"})
        elapsed = time.monotonic() - started
    assert_clean_error(result, 1, f"127.0.0.1:{port}", "timed out after 2 s")
    assert elapsed < 5
    assert project.run(worker_id, "status").returncode == 3


@pytest.mark.faults
def test_wrong_password_is_a_clear_error_that_never_shows_the_password(project, db, worker_id, password_role):
    role, password = password_role
    project.write("workers/uniphant.conf", "log_level=DEBUG\n")
    secrets = os.path.join(project.home, ".uniphant", "secrets")
    wrong = password + "-wrong"
    project.write("secrets.conf", f"PGPASSWORD={wrong}\n", mode=0o600, base=secrets)
    for args in (["start"], ["start", "-f"]):
        result = project.run(worker_id, *args, env=tcp_env(db, role))
        assert_clean_error(result, 1, f'password authentication failed for user "{role}"')
        assert wrong not in result.stdout + result.stderr + project.log(worker_id)


@pytest.mark.faults
def test_missing_database_is_a_clear_error(project, worker_id):
    result = project.run(worker_id, "start", env={"PGDATABASE": "no_such_db"})
    assert_clean_error(result, 1, 'database "no_such_db" does not exist')


@pytest.mark.faults
def test_password_is_found_in_pgpass(project, db, worker_id, password_role):
    role, password = password_role
    project.write(".pgpass", f"127.0.0.1:{db.env['PGPORT']}:*:{role}:{password}\n", mode=0o600,
                  base=project.home)
    pid = start_daemon(project, worker_id, env=tcp_env(db, role))
    assert db.process(worker_id)[2] == pid


@pytest.mark.faults
def test_least_privilege_role_runs_a_worker(project, db, worker_id, password_role):
    role, password = password_role
    env = dict(tcp_env(db, role), PGPASSWORD=password)
    project.write("workers/test/uniphant.conf", "mode=query\n")
    pid = start_daemon(project, worker_id, env=env)
    assert db.value("SELECT role FROM processes WHERE worker_id = %s::uuid", worker_id) == role
    wait_for(lambda: "tick" in project.log(worker_id), what="a tick")
    assert project.run(worker_id, "stop", env=env).returncode == 0
    assert gone(pid) and db.process(worker_id) is None


@pytest.mark.faults
def test_another_role_cannot_heartbeat_or_remove_a_process_row(project, db, worker_id, password_role):
    role, password = password_role
    pid = start_daemon(project, worker_id)  # registered by the superuser's session
    process_id = str(db.process(worker_id)[0])
    impostor = db.connect(user=role, password=password, host="127.0.0.1",
                          port=int(db.env["PGPORT"]), unix_sock=None, application_name=process_id)
    try:
        cursor = impostor.cursor()
        cursor.execute("SELECT keepalive()")
        assert cursor.fetchone()[0] is False
        cursor.execute("SELECT disconnect()")
    finally:
        impostor.close()
    assert db.process(worker_id)[2] == pid


@pytest.mark.faults
def test_fresh_row_of_another_host_is_refused_then_taken_over_once_stale(project, db, worker_id, tmp_path):
    project.write("uniphant.conf", "stale_after=3\n")
    pid = start_daemon(project, worker_id)
    os.kill(pid, signal.SIGKILL)
    wait_for(lambda: gone(pid), what="the killed daemon")
    other = type(project)(str(tmp_path / "other_host"), project.home, project.env)
    other.write("uniphant.conf", "stale_after=3\n")
    try:
        refused = other.run(worker_id, "start")
        assert_clean_error(refused, 1, f"PID {pid}", os.uname().nodename)
        wait_for(lambda: other.run(worker_id, "start").returncode == 0, what="the take-over")
        assert db.process(worker_id)[2] == other.running_pid(worker_id)
    finally:
        other.cleanup()


@pytest.mark.faults
def test_slow_worker_with_a_live_session_is_not_taken_over(project, db, worker_id, tmp_path):
    project.write("uniphant.conf", "stale_after=3\n")
    project.write("workers/test/uniphant.conf", "mode=sleep\n")
    pid = start_daemon(project, worker_id)
    wait_for(lambda: db.value("SELECT heartbeat_at < now() - interval '3.5 seconds' FROM processes "
                              "WHERE worker_id = %s::uuid", worker_id), what="a stale heartbeat")
    other = type(project)(str(tmp_path / "other_host"), project.home, project.env)
    other.write("uniphant.conf", "stale_after=3\n")
    try:
        assert_clean_error(other.run(worker_id, "start"), 1, "already running", f"PID {pid}")
        assert db.process(worker_id)[2] == pid and not gone(pid)
    finally:
        other.cleanup()


@pytest.mark.faults
def test_stop_kills_a_worker_that_ignores_sigterm_and_removes_its_row(project, db, worker_id):
    project.write("workers/test/uniphant.conf", "mode=sleep\nstop_timeout=0.5\n")
    pid = start_daemon(project, worker_id)
    result = project.run(worker_id, "stop")
    assert result.returncode == 0
    assert "sent SIGKILL" in result.stderr
    assert gone(pid)
    assert db.process(worker_id) is None


@pytest.mark.faults
@pytest.mark.parametrize("content", ["", "garbage\n", "1\n", "{self}\n", "99999999\n"])
def test_pid_file_without_a_lock_is_never_signalled(project, worker_id, content):
    pid_file = project.write(f"pid/test.probe/{worker_id}.pid", content.format(self=os.getpid()))
    assert project.run(worker_id, "status").returncode == 3
    assert project.run(worker_id, "stop").returncode == 1
    pid = start_daemon(project, worker_id)
    assert project.running_pid(worker_id) == pid
    assert open(pid_file).read().split()[0] == str(pid)


@pytest.mark.faults
def test_child_forked_by_the_worker_does_not_hold_the_lock(project, worker_id):
    project.write("workers/test/uniphant.conf", "mode=fork\n")
    pid = start_daemon(project, worker_id)
    child_pid = int(wait_for(lambda: os.path.exists(project.path("workers/test/child.pid"))
                             and open(project.path("workers/test/child.pid")).read(), what="the child"))
    try:
        os.kill(pid, signal.SIGKILL)
        wait_for(lambda: gone(pid), what="the worker")
        assert not gone(child_pid)
        assert project.run(worker_id, "status").returncode == 3
    finally:
        os.kill(child_pid, signal.SIGKILL)


def _symlinked_log_file(project, worker_id):
    os.makedirs(project.path("log/test.probe"))
    os.symlink(project.path("elsewhere.log"), project.path(f"log/test.probe/{worker_id}.log"))


@pytest.mark.faults
@pytest.mark.parametrize("make, message", [
    (lambda p, w: p.write("log", "a file where the log directory goes\n"), "must be a directory"),
    (lambda p, w: os.symlink(p.home, p.path("pid")), "must be a directory, not a symlink"),
    (_symlinked_log_file, "it is a symlink"),
], ids=["log-is-a-file", "pid-is-a-symlink", "log-file-is-a-symlink"])
def test_unusable_log_or_pid_path_fails_before_starting(project, db, worker_id, make, message):
    make(project, worker_id)
    for args in (["start"], ["start", "-f"]):
        result = project.run(worker_id, *args)
        assert_clean_error(result, 1, message)
        assert db.process(worker_id) is None
    assert project.running_pid(worker_id) is None
    assert not os.path.exists(project.path("elsewhere.log"))


@pytest.mark.faults
def test_twenty_concurrent_starts_run_exactly_one(project, db, worker_id):
    children = [project.popen(worker_id, "start") for _ in range(20)]
    results = [(c.wait(timeout=60), c.communicate()) for c in children]
    codes = sorted(code for code, _ in results)
    assert codes == [0] + [1] * 19, results
    assert all("already running" in err for code, (out, err) in results if code == 1)
    pid = project.running_pid(worker_id)
    assert db.rows("SELECT pid FROM processes WHERE worker_id = %s::uuid", worker_id) == [(pid,)]


@pytest.mark.faults
def test_same_worker_from_two_hosts_at_once_runs_once(project, db, worker_id, tmp_path):
    other = type(project)(str(tmp_path / "other_host"), project.home, project.env)
    try:
        children = [p.popen(worker_id, "start") for p in (project, other)]
        results = [(c.wait(timeout=60), c.communicate()[1]) for c in children]
        assert sorted(code for code, _ in results) == [0, 1], results
        assert any("already running" in err for code, err in results if code == 1)
        wait_for(lambda: [p.running_pid(worker_id) for p in (project, other)].count(None) == 1,
                 what="the refused daemon to exit")
        pid = next(p for p in (project.running_pid(worker_id), other.running_pid(worker_id)) if p)
        assert db.rows("SELECT pid FROM processes WHERE worker_id = %s::uuid", worker_id) == [(pid,)]
    finally:
        other.cleanup()


def consistent(project, db, worker_id) -> bool:
    """Either one process holds the lock and owns the row, or neither exists."""
    pid = project.running_pid(worker_id)
    rows = db.rows("SELECT pid FROM processes WHERE worker_id = %s::uuid", worker_id)
    strays = subprocess.run(["pgrep", "-f", worker_id], capture_output=True, text=True).stdout.split()
    return rows == ([(pid,)] if pid else []) and {int(p) for p in strays} <= ({pid} if pid else set())


@pytest.mark.faults
def test_stop_racing_start_leaves_no_orphans(project, db, worker_id):
    for _ in range(3):
        children = [project.popen(worker_id, "start"), project.popen(worker_id, "stop")]
        for child in children:
            child.communicate(timeout=60)
        wait_for(lambda: consistent(project, db, worker_id), what="one process with its row, or none")
    project.run(worker_id, "stop")
    assert project.running_pid(worker_id) is None
    wait_for(lambda: consistent(project, db, worker_id), what="no process and no row")


@pytest.mark.faults
def test_two_restarts_in_parallel_leave_one_process(project, db, worker_id):
    start_daemon(project, worker_id)
    children = [project.popen(worker_id, "restart") for _ in range(2)]
    codes = sorted(child.wait(timeout=60) for child in children)
    assert codes[0] == 0
    assert project.running_pid(worker_id) is not None
    wait_for(lambda: consistent(project, db, worker_id), what="one process with its row")


@pytest.mark.faults
@pytest.mark.parametrize("content, error", [
    (b"key=\x00value\n", "contains a NUL byte"),
    (b"ok=1\nkey=\xff\xfe\n", "not valid UTF-8"),
    (bytes(range(256)) * 4, "contains a NUL byte"),
    (b"ok=1\n" + b"x" * 10_000_000 + b"\n", "expected key=value"),
    (b"\xef\xbb\xbfmode=tick\r\nlog_level=INFO\r\n", None),
    (b"big=" + b"v" * 10_000_000 + b"\n", None),
], ids=["nul", "bad-utf8", "binary", "10MB-line", "bom-crlf", "10MB-value"])
def test_hostile_config_parses_or_fails_with_file_and_line(project, worker_id, content, error):
    with open(project.path("workers/test/uniphant.conf"), "wb") as f:
        f.write(content)
    if error is None:
        assert show_config(project, "worker_type") == ["test.show"]
    else:
        result = project.run(worker_id, "start", "-f")
        assert_clean_error(result, 2, project.path("workers/test/uniphant.conf") + ":", error)
        assert len(result.stderr) < 500


@pytest.mark.faults
def test_secret_values_never_reach_the_log(project, db, worker_id):
    secrets = os.path.join(project.home, ".uniphant", "secrets")
    project.write("workers/test/secrets.conf", "api_key=TOPSECRET-42\n", mode=0o600, base=secrets)
    project.write("workers/test/uniphant.conf", "log_level=DEBUG\ninterval=0.05\n")
    start_daemon(project, worker_id)
    wait_for(lambda: project.log(worker_id).count("tick") >= 3, what="some ticks")
    db.rows("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name = %s",
            str(db.process(worker_id)[0]))
    wait_for(lambda: "restored" in project.log(worker_id), what="a reconnect")
    project.run(worker_id, "stop")
    assert "TOPSECRET-42" not in project.log(worker_id)


@pytest.mark.faults
def test_reconnect_says_why_each_attempt_failed(private_server, tmp_path):
    project = server_project(tmp_path, "why", private_server, "log_level=DEBUG\n")
    worker = str(uuid.uuid4())
    try:
        start_daemon(project, worker)
        private_server.stop("fast")
        said = lambda level: [line.split("reconnecting: ", 1)[1] for line in project.log(worker).splitlines()  # noqa: E731
                              if f" {level} " in line and "reconnecting: " in line]
        wait_for(lambda: said("WARNING"), what="the first failure, at WARNING")
        wait_for(lambda: set(said("DEBUG")) & set(said("WARNING")), what="a repeated failure, at DEBUG")
        private_server.start()
        wait_for(lambda: "database connection restored" in project.log(worker), what="the reconnect")
        assert len(said("WARNING")) == len(set(said("WARNING")))
        assert all("could not connect to PostgreSQL" in reason for reason in said("WARNING"))
    finally:
        project.cleanup()


def _has_passwd_entry(pwd, uid: int) -> bool:
    try:
        pwd.getpwuid(uid)
    except KeyError:
        return False
    return True


def tcp_sockets(pid: int) -> list:
    """The TCP sockets of process pid, from /proc."""
    inodes = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except FileNotFoundError:
            continue  # closed meanwhile
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    with open(f"/proc/{pid}/net/tcp") as f:
        return [line for line in f.read().splitlines()[1:] if line.split()[9] in inodes]
