"""The contract of uniphant (README.md, DESIGN), one test per promise.

Every test that starts a worker runs a real script as a subprocess against a
real PostgreSQL server (conftest.py); none mocks the database.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid

import pytest

import uniphant
from conftest import REPO, copy_examples, wait_for


def assert_clean_error(result: subprocess.CompletedProcess, code: int, *fragments: str) -> None:
    assert result.returncode == code, (result.stdout, result.stderr)
    assert "Traceback" not in result.stderr
    for fragment in fragments:
        assert fragment in result.stderr, result.stderr


def start_daemon(project, worker_id, *args, **kwargs) -> int:
    result = project.run(worker_id, "start", *args, **kwargs)
    assert result.returncode == 0, (result.stdout, result.stderr)
    return int(result.stdout.strip().rsplit(" ", 1)[1].rstrip("."))


def gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    # A daemon is reaped by init; a zombie has exited all the same.
    with open(f"/proc/{pid}/stat") as f:
        return f.read().split(") ", 1)[1].startswith("Z")


# ---------------------------------------------------------------------------
# 4. Configuration
# ---------------------------------------------------------------------------

def test_config_file_gives_pairs_and_skips_comments_and_blank_lines(tmp_path):
    path = tmp_path / "uniphant.conf"
    path.write_text("# a comment\n\n  key1 = value1\nkey2=a=b\n   # indented comment\nempty=\n")
    assert uniphant.parse_key_value_format(str(path)) == {"key1": "value1", "key2": "a=b", "empty": ""}


def test_config_file_with_bom_and_crlf_line_ends_parses(tmp_path):
    path = tmp_path / "uniphant.conf"
    path.write_bytes(b"\xef\xbb\xbfkey1=value1\r\nkey2=value2\r\n")
    assert uniphant.parse_key_value_format(str(path)) == {"key1": "value1", "key2": "value2"}


@pytest.mark.parametrize("content, line, message", [
    ("ok=1\nno equals sign here\n", 2, "expected key=value"),
    ("=value\n", 1, "empty key"),
    ("a=1\na=2\n", 2, "'a' is already defined at"),
    ("worker_id=x\n", 1, "'worker_id' is reserved"),
    ("interval=soon\n", 1, "bad value for interval"),
    ("stop_timeout=0\n", 1, "bad value for stop_timeout"),
    ("log_level=LOUD\n", 1, "bad value for log_level"),
    ("PGPORT=fivefour\n", 1, "bad value for PGPORT"),
    ("PGSSLMODE=maybe\n", 1, "bad value for PGSSLMODE"),
])
def test_bad_config_line_is_an_error_naming_file_and_line(project, db, worker_id, content, line, message):
    conf = project.write("workers/test/uniphant.conf", content)
    hosts_before = db.value("SELECT count(*) FROM hosts")
    result = project.run(worker_id, "start", "-f")
    assert_clean_error(result, 2, f"{conf}:{line}", message)
    assert db.process(worker_id) is None
    assert db.value("SELECT count(*) FROM hosts") == hosts_before


def test_duplicate_key_across_the_hierarchy_is_an_error(project, worker_id):
    project.write("uniphant.conf", "colour=blue\n")
    project.write("workers/test/uniphant.conf", "colour=red\n")
    result = project.run(worker_id, "status")
    assert_clean_error(result, 2, "'colour' is already defined at", project.path("uniphant.conf"))


def test_unreadable_config_file_is_an_error(project, worker_id):
    os.makedirs(project.path("workers/uniphant.conf"))
    result = project.run(worker_id, "status")
    assert_clean_error(result, 2, project.path("workers/uniphant.conf"), "cannot read")


def test_config_is_read_from_every_directory_up_to_the_root(project, db, worker_id):
    project.write("uniphant.conf", "from_root=1\n")
    project.write("workers/uniphant.conf", "from_workers=2\n")
    project.write("workers/test/uniphant.conf", "from_script_dir=3\nmode=query\n")
    project.write("workers/test/show.py", (
        "from uniphant import setup_config\n"
        "c = setup_config()\n"
        "print(c['from_root'], c['from_workers'], c['from_script_dir'])\n"))
    result = subprocess.run([sys.executable, "workers/test/show.py"], cwd=project.root,
                            env=project.env, capture_output=True, text=True)
    assert result.stdout.split() == ["1", "2", "3"], result.stderr


def test_secrets_are_read_from_home_in_the_manual_layout(project):
    secrets = os.path.join(project.home, ".uniphant", "secrets")
    project.write("workers/test/secrets.conf", "api_key=s3cret\n", mode=0o600, base=secrets)
    project.write("workers/secrets.conf", "token=t0ken\n", mode=0o600, base=secrets)
    project.write("secrets.conf", "root_secret=r00t\n", mode=0o600, base=secrets)
    project.write("workers/test/show.py", (
        "from uniphant import setup_config\n"
        "c = setup_config()\n"
        "print(c['api_key'], c['token'], c['root_secret'])\n"))
    result = subprocess.run([sys.executable, "workers/test/show.py"], cwd=project.root,
                            env=project.env, capture_output=True, text=True)
    assert result.stdout.split() == ["s3cret", "t0ken", "r00t"], result.stderr


def test_secrets_file_readable_by_others_is_refused(project, worker_id):
    secrets = os.path.join(project.home, ".uniphant", "secrets")
    path = project.write("secrets.conf", "api_key=s3cret\n", mode=0o644, base=secrets)
    result = project.run(worker_id, "status")
    assert_clean_error(result, 2, path, f"chmod 600 {path}")
    assert "s3cret" not in result.stderr + result.stdout


def test_secret_key_may_not_repeat_a_config_key(project, worker_id):
    secrets = os.path.join(project.home, ".uniphant", "secrets")
    project.write("uniphant.conf", "api_key=public\n")
    project.write("secrets.conf", "api_key=s3cret\n", mode=0o600, base=secrets)
    result = project.run(worker_id, "status")
    assert_clean_error(result, 2, "'api_key' is already defined")


@pytest.mark.parametrize("script, worker_type", [
    ("workers/happy.py", "happy"),
    ("workers/a/b.py", "a.b"),
    ("workers/x/my.job.py", "x.my.job"),
])
def test_worker_type_is_the_path_below_workers(project, worker_id, script, worker_type):
    project.write(script, open(project.path("workers/test/probe.py")).read())
    result = project.run(worker_id, "status", script=script)
    assert result.stdout.strip() == f"Worker {worker_type} with ID {worker_id} is not running."


def test_script_outside_a_workers_directory_is_an_error(project, worker_id):
    project.write("jobs/probe.py", open(project.path("workers/test/probe.py")).read())
    result = project.run(worker_id, "status", script="jobs/probe.py")
    assert_clean_error(result, 2, "inside a directory named 'workers'")


def test_connection_keys_in_config_files_win_over_the_environment(project, db, worker_id):
    project.write("uniphant.conf", f"PGDATABASE={db.env['PGDATABASE']}\n")
    result = project.run(worker_id, "start", env={"PGDATABASE": "no_such_database"})
    assert result.returncode == 0, result.stderr
    assert db.process(worker_id) is not None


def test_runtime_keys_are_in_config_as_numbers(project):
    project.write("uniphant.conf", "interval=0.5\nlog_level=debug\n")
    project.write("workers/test/show.py", (
        "from uniphant import setup_config\n"
        "c = setup_config()\n"
        "print(c['interval'], c['stop_timeout'], c['stale_after'], c['log_level'])\n"))
    result = subprocess.run([sys.executable, "workers/test/show.py"], cwd=project.root,
                            env=project.env, capture_output=True, text=True)
    assert result.stdout.split() == ["0.5", "10.0", "60.0", "DEBUG"], result.stderr


# ---------------------------------------------------------------------------
# Host identity
# ---------------------------------------------------------------------------

def test_host_id_is_created_once_and_kept(project, worker_id):
    project.run(worker_id, "status")
    first = open(project.path(".host_id")).read()
    project.run(worker_id, "status")
    assert open(project.path(".host_id")).read() == first
    assert uniphant.is_valid_uuid(first.strip())


def test_concurrent_first_starts_agree_on_one_host_id(project):
    script = ("import sys; sys.path.insert(0, %r); import uniphant\n"
              "print(uniphant.get_or_create_host_id('.lock', '.host_id'))\n" % REPO)
    children = [subprocess.Popen([sys.executable, "-c", script], cwd=project.root,
                                 stdout=subprocess.PIPE, text=True) for _ in range(20)]
    ids = {child.communicate()[0].strip() for child in children}
    assert len(ids) == 1
    assert ids == {open(project.path(".host_id")).read().strip()}


# ---------------------------------------------------------------------------
# 5. Signal handling and 6. process management: the command line
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("args, message", [
    (["not-a-uuid", "status"], "worker_id must be a UUID"),
    ([str(uuid.uuid4()), "launch"], "invalid choice"),
    ([str(uuid.uuid4())], "required"),
])
def test_bad_arguments_exit_2_with_usage(project, args, message):
    result = subprocess.run([sys.executable, "workers/test/probe.py", *args], cwd=project.root,
                            env=project.env, capture_output=True, text=True)
    assert_clean_error(result, 2, "usage:", message)


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


def test_status_and_stop_work_while_the_database_is_down(project, worker_id, tmp_path):
    pid = start_daemon(project, worker_id)
    down = {"PGHOST": str(tmp_path / "nowhere"), "PGPORT": "1"}
    status = project.run(worker_id, "status", env=down)
    assert status.returncode == 0 and str(pid) in status.stdout
    stop = project.run(worker_id, "stop", env=down)
    assert stop.returncode == 0, stop.stderr
    assert gone(pid)


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


# ---------------------------------------------------------------------------
# 10. Database
# ---------------------------------------------------------------------------

def test_schema_loads_twice_and_keeps_rows(cluster):
    database = cluster.database("uniphant_schema_twice")
    host = str(uuid.uuid4())
    database.rows("SELECT register_host(%s::uuid, 'h')", host)
    import pgserver
    pgserver.load_sql(database.connect(), os.path.join(REPO, "schema.sql"))
    assert database.value("SELECT name FROM hosts WHERE id = %s::uuid", host) == "h"


def test_register_process_with_the_manuals_one_argument(db, worker_id):
    process_id = str(uuid.uuid4())
    conn = db.connect(application_name=process_id)
    try:
        cursor = conn.cursor()
        cursor.execute("SELECT register_process(%s::uuid)", (worker_id,))
        assert db.process(worker_id)[0] == uuid.UUID(process_id)
        cursor.execute("SELECT keepalive()")
        assert cursor.fetchone()[0] is True
        cursor.execute("SELECT disconnect()")
        assert db.process(worker_id) is None
        cursor.execute("SELECT keepalive()")
        assert cursor.fetchone()[0] is False
    finally:
        conn.close()


def test_register_host_stores_names_as_parameters(db):
    host = str(uuid.uuid4())
    name = "o'brien\\\"; DROP TABLE hosts; --"
    db.rows("SELECT register_host(%s::uuid, %s)", host, name)
    assert db.value("SELECT name FROM hosts WHERE id = %s::uuid", host) == name


# ---------------------------------------------------------------------------
# Examples
# ---------------------------------------------------------------------------

def test_example_hello_runs_as_typed(project, db, worker_id):
    copy_examples(project)
    script = "workers/examples/hello.py"
    result = project.run(worker_id, "start", script=script)
    assert result.returncode == 0, result.stderr
    wait_for(lambda: "hello from worker" in project.log(worker_id, "examples.hello"), what="hello")
    assert project.run(worker_id, "stop", script=script).returncode == 0


def test_example_jobs_drains_the_queue(project, db, worker_id):
    copy_examples(project)
    import pgserver
    pgserver.load_sql(db.connect(), project.path("workers/examples/jobs.sql"))
    db.rows("INSERT INTO jobs (payload) SELECT 'job ' || g FROM generate_series(1, 50) g")
    script = "workers/examples/jobs.py"
    result = project.run(worker_id, "start", script=script)
    assert result.returncode == 0, result.stderr
    wait_for(lambda: db.value("SELECT count(*) FROM jobs WHERE done_at IS NULL") == 0,
             what="the queue to drain")
    assert project.run(worker_id, "stop", script=script).returncode == 0
