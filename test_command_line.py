"""README, "Command line": start, stop, restart and status, as a daemon and in
the foreground; and the waits the benchmark's figures rest on."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid

import pytest

import uniphant
from conftest import PROBE, REPO, assert_clean_error, gone, start_daemon, wait_for


@pytest.mark.parametrize("args, message", [
    (["not-a-uuid", "status"], "worker_id must be a UUID"),
    ([str(uuid.uuid4()), "launch"], "invalid command 'launch'"),
    ([str(uuid.uuid4())], "expected a worker_id and a command"),
    ([str(uuid.uuid4()), "start", "--daemon"], "unrecognized option '--daemon'"),
    ([str(uuid.uuid4()), "start", "now"], "unexpected argument 'now'"),
])
def test_bad_arguments_exit_2_with_usage(project, args, message):
    result = subprocess.run([sys.executable, "workers/test/probe.py", *args], cwd=project.root,
                            env=project.env, capture_output=True, text=True)
    assert_clean_error(result, 2, "usage:", message)


def test_is_pid_alive_tells_a_live_process_from_a_reaped_one():
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    assert uniphant.is_pid_alive(os.getpid())
    assert uniphant.is_pid_alive(1)
    assert not uniphant.is_pid_alive(child.pid)


def test_is_parent_alive_compares_with_the_parent_pid():
    assert uniphant.is_parent_alive(os.getppid())
    assert not uniphant.is_parent_alive(os.getppid() + 1)


def test_status_when_not_running_exits_3(project, worker_id):
    result = project.run(worker_id, "status")
    assert result.returncode == 3
    assert result.stdout.strip() == f"Worker test.probe with ID {worker_id} is not running."


def test_stop_when_not_running_exits_1(project, worker_id):
    result = project.run(worker_id, "stop")
    assert result.returncode == 1
    assert "is not running" in result.stdout


def test_daemon_start_returns_once_registered(project, db, worker_id):
    pid = start_daemon(project, worker_id)
    row = db.process(worker_id)
    assert row is not None and row[2] == pid
    result = project.run(worker_id, "status")
    assert result.returncode == 0
    assert result.stdout.strip() == f"Worker test.probe with ID {worker_id} is running with PID {pid}."


def test_daemon_is_detached_with_a_clean_slate(project, worker_id):
    pid = start_daemon(project, worker_id)
    assert os.getsid(pid) != os.getsid(0)
    assert os.getsid(pid) != pid  # not a session leader: it can never regain a terminal
    assert os.readlink(f"/proc/{pid}/cwd") == project.path("workers/test")
    for fd in (0, 1, 2):
        assert os.readlink(f"/proc/{pid}/fd/{fd}") == "/dev/null"
    with open(f"/proc/{pid}/status") as f:
        assert "Umask:\t0002" in f.read()
    targets = {os.readlink(f"/proc/{pid}/fd/{fd}") for fd in os.listdir(f"/proc/{pid}/fd")}
    assert not any(t.startswith("/dev/pts") or t.endswith(".pytest_cache") for t in targets)


def test_stop_ends_the_daemon_and_removes_its_row(project, db, worker_id):
    pid = start_daemon(project, worker_id)
    result = project.run(worker_id, "stop")
    assert result.returncode == 0, result.stderr
    assert gone(pid)
    assert db.process(worker_id) is None
    assert project.run(worker_id, "status").returncode == 3


def test_restart_replaces_the_running_process(project, db, worker_id):
    old = start_daemon(project, worker_id)
    result = project.run(worker_id, "restart")
    assert result.returncode == 0, result.stderr
    new = int(result.stdout.strip().rsplit(" ", 1)[1].rstrip("."))
    assert new != old and gone(old)
    assert db.process(worker_id)[2] == new


def test_restart_when_not_running_starts(project, db, worker_id):
    result = project.run(worker_id, "restart")
    assert result.returncode == 0, result.stderr
    assert db.process(worker_id) is not None


def test_start_when_running_says_so_with_the_pid(project, worker_id):
    pid = start_daemon(project, worker_id)
    for args in (["start"], ["start", "-f"]):
        result = project.run(worker_id, *args)
        assert result.returncode == 1
        assert f"already running with PID {pid}" in result.stderr


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_foreground_worker_stops_cleanly_on_signal(project, db, worker_id, sig):
    child = project.popen(worker_id, "start", "-f")
    wait_for(lambda: db.process(worker_id), what="the process row")
    child.send_signal(sig)
    out, err = child.communicate(timeout=10)
    assert child.returncode == 0, err
    assert f"stopping: {sig.name} received" in out
    assert db.process(worker_id) is None


def test_foreground_worker_logs_to_stdout_and_to_its_log_file(project, db, worker_id):
    child = project.popen(worker_id, "start", "-f")
    wait_for(lambda: "tick" in project.log(worker_id), what="a tick in the log file")
    child.terminate()
    out, _ = child.communicate(timeout=10)
    assert "tick" in out


@pytest.mark.faults
def test_status_and_stop_work_while_the_database_is_down(project, worker_id, tmp_path):
    pid = start_daemon(project, worker_id)
    down = {"PGHOST": str(tmp_path / "nowhere"), "PGPORT": "1"}
    status = project.run(worker_id, "status", env=down)
    assert status.returncode == 0 and str(pid) in status.stdout
    stop = project.run(worker_id, "stop", env=down)
    assert stop.returncode == 0, stop.stderr
    assert gone(pid)


@pytest.mark.faults
def test_start_while_the_database_is_unreachable_fails_in_one_line(project, worker_id, tmp_path):
    result = project.run(worker_id, "start", env={"PGHOST": "127.0.0.1", "PGPORT": "1"})
    assert_clean_error(result, 1, "could not connect to PostgreSQL at 127.0.0.1:1")
    assert len(result.stderr.strip().splitlines()) == 1
    assert project.run(worker_id, "status").returncode == 3


def test_deleting_the_row_stops_the_worker(project, db, worker_id):
    child = project.popen(worker_id, "start", "-f")
    wait_for(lambda: db.process(worker_id), what="the process row")
    db.rows("DELETE FROM processes WHERE worker_id = %s::uuid", worker_id)
    out, err = child.communicate(timeout=10)
    assert child.returncode == 0, err
    assert "stopping: its process row was deleted" in out


def test_deleting_the_row_stops_a_daemon(project, db, worker_id):
    pid = start_daemon(project, worker_id)
    db.rows("DELETE FROM processes WHERE worker_id = %s::uuid", worker_id)
    wait_for(lambda: gone(pid), what="the daemon to exit")
    assert project.run(worker_id, "status").returncode == 3


def test_second_process_for_a_worker_is_refused_from_another_host(project, db, worker_id, tmp_path):
    pid = start_daemon(project, worker_id)
    other = type(project)(str(tmp_path / "other_host"), project.home, project.env)
    try:
        result = other.run(worker_id, "start", "-f")
        assert_clean_error(result, 1, f"worker {worker_id} is already running", f"PID {pid}",
                           os.uname().nodename)
        assert db.process(worker_id)[2] == pid
    finally:
        other.cleanup()


@pytest.mark.faults
def test_start_after_kill_9_takes_over_the_row(project, db, worker_id):
    pid = start_daemon(project, worker_id)
    os.kill(pid, signal.SIGKILL)
    wait_for(lambda: gone(pid), what="the killed daemon to go")
    assert project.run(worker_id, "status").returncode == 3
    new = start_daemon(project, worker_id)
    assert db.process(worker_id)[2] == new


def test_worker_function_that_raises_exits_1_and_removes_its_row(project, db, worker_id):
    project.write("workers/test/uniphant.conf", "mode=raise\n")
    result = project.run(worker_id, "start", "-f")
    assert result.returncode == 1
    assert "RuntimeError: boom from the worker" in project.log(worker_id)
    assert "Traceback" in project.log(worker_id)
    assert db.process(worker_id) is None


def test_foreground_worker_stops_when_its_parent_dies(project, db, worker_id):
    launcher = subprocess.Popen(
        [sys.executable, "-c", "import subprocess, sys; subprocess.run(sys.argv[1:])",
         *project.command(worker_id, "start", "-f")],
        cwd=project.root, env=project.env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    project.children.append(launcher)
    row = wait_for(lambda: db.process(worker_id), what="the process row")
    launcher.kill()
    launcher.wait()
    wait_for(lambda: gone(row[2]), what="the orphaned worker to exit")
    assert db.process(worker_id) is None
    assert "stopping: the parent process has gone" in project.log(worker_id)


def test_worker_function_can_use_the_connection(project, db, worker_id):
    project.write("workers/test/uniphant.conf", "mode=query\ninterval=0.05\n")
    start_daemon(project, worker_id)
    wait_for(lambda: f"query answered {worker_id}" in project.log(worker_id), what="the query")


def test_help_works_outside_a_project(tmp_path):
    script = tmp_path / "loose.py"
    script.write_text("from uniphant import main\nmain(lambda config, logger, connection: None)\n")
    for flag in ("-h", "--help"):
        result = subprocess.run([sys.executable, str(script), flag], capture_output=True, text=True,
                                env=dict(os.environ, PYTHONPATH=REPO))
        assert result.returncode == 0, result.stderr
        assert result.stdout.startswith("usage: loose.py")


def test_status_and_stop_work_when_a_config_file_became_invalid(project, worker_id):
    pid = start_daemon(project, worker_id)
    conf = project.write("workers/test/uniphant.conf", "this line is broken\n")
    status = project.run(worker_id, "status")
    assert status.returncode == 0 and f"running with PID {pid}" in status.stdout
    stop = project.run(worker_id, "stop")
    assert stop.returncode == 0, stop.stderr
    assert f"{conf}:1" in stop.stderr and "the default stop_timeout of 10 s" in stop.stderr
    assert gone(pid)


@pytest.mark.parametrize("args", [["start"], ["start", "-f"]], ids=["daemon", "foreground"])
def test_start_that_fails_before_the_worker_is_ready_tells_why(project, worker_id, args):
    # A registration that fails with a bare TimeoutError, as pg8000 raises on a read timeout.
    project.write("workers/test/unlucky.py", (
        "import uniphant\n"
        "def register(config, connection):\n"
        "    raise TimeoutError()\n"
        "uniphant.register_process = register\n"
        "if __name__ == '__main__':\n"
        "    uniphant.main(lambda config, logger, connection: None)\n"))
    result = project.run(worker_id, *args, script="workers/test/unlucky.py")
    assert_clean_error(result, 1, "error: TimeoutError")


def test_two_scripts_of_one_worker_type_are_refused(project, worker_id):
    project.write("workers/test.probe.py", PROBE)
    for script in ("workers/test/probe.py", "workers/test.probe.py"):
        result = project.run(worker_id, "start", "-f", script=script)
        assert_clean_error(result, 2, project.path("workers/test/probe.py"),
                           project.path("workers/test.probe.py"), "both worker type 'test.probe'")
    assert not os.path.exists(project.path("pid"))


def test_signal_interrupts_the_wait_between_calls(project, db, worker_id):
    project.write("workers/test/uniphant.conf", "interval=3600\n")
    child = project.popen(worker_id, "start", "-f")
    wait_for(lambda: "tick" in project.log(worker_id), what="the first call")
    child.terminate()
    child.communicate(timeout=10)  # long before the hour is up
    assert child.returncode == 0


def test_deleted_row_wakes_the_worker_before_its_next_heartbeat(project, db, worker_id):
    # Heartbeats come every stale_after / 3 = 20 minutes here: only the notification can wake it.
    project.write("workers/test/uniphant.conf", "interval=3600\nstale_after=3600\n")
    child = project.popen(worker_id, "start", "-f")
    wait_for(lambda: "tick" in project.log(worker_id), what="the first call")
    db.rows("DELETE FROM processes WHERE worker_id = %s::uuid", worker_id)
    out, _ = child.communicate(timeout=10)
    assert "stopping: its process row was deleted" in out


def test_alive_in_a_tight_loop_does_not_write_per_call(cluster, tmp_path, worker_id):
    from conftest import Project, worker_env
    database = cluster.database("uniphant_heartbeats")
    database.rows("CREATE TABLE updates (at timestamptz)")
    database.rows("CREATE FUNCTION count_update() RETURNS trigger LANGUAGE plpgsql AS "
                  "$$ BEGIN INSERT INTO updates VALUES (now()); RETURN NULL; END $$")
    database.rows("CREATE TRIGGER count_update AFTER UPDATE ON processes "
                  "FOR EACH ROW EXECUTE FUNCTION count_update()")
    (tmp_path / "home").mkdir()
    project = Project(str(tmp_path / "project"), str(tmp_path / "home"),
                      worker_env(database.env, str(tmp_path / "home")))
    project.write("workers/test/uniphant.conf", "mode=spin\n")
    try:
        child = project.popen(worker_id, "start", "-f")
        wait_for(lambda: database.process(worker_id), what="the process row")
        time.sleep(2.5)  # the span being measured, not a wait for a condition
        database.rows("DELETE FROM processes WHERE worker_id = %s::uuid", worker_id)
        child.communicate(timeout=10)
        calls = int(project.log(worker_id).split("alive() calls: ")[1].split()[0])
        assert calls > 10_000
        assert database.value("SELECT count(*) FROM updates") <= 4  # one a second, and the first
    finally:
        project.cleanup()


@pytest.mark.parametrize("command", ["status", "stop"])
def test_status_and_stop_import_no_database_driver(project, worker_id, command):
    result = subprocess.run([sys.executable, "-X", "importtime", "workers/test/probe.py", worker_id, command],
                            cwd=project.root, env=project.env, capture_output=True, text=True)
    assert result.returncode in (1, 3)
    assert "uniphant" in result.stderr  # the import log is there
    assert "pg8000" not in result.stderr


@pytest.mark.parametrize("command", [["workers/test/probe.py", "--help"], [os.path.join(REPO, "uniphant.py"), "-h"]])
def test_help_into_a_reader_that_has_gone_ends_quietly(project, command):
    read_end, write_end = os.pipe()
    os.close(read_end)  # `| head` that has read enough
    result = subprocess.run([sys.executable, *command], cwd=project.root, env=project.env, stdout=write_end,
                            stderr=subprocess.PIPE, text=True)
    os.close(write_end)
    assert result.returncode == 0 and result.stderr == ""


def test_a_socket_where_no_server_listens_asks_whether_the_server_runs(project, worker_id, tmp_path):
    result = project.run(worker_id, "start", env={"PGHOST": str(tmp_path)})
    assert_clean_error(result, 1, f"socket {tmp_path}/.s.PGSQL.", "is the server running")
