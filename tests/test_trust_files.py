"""The files of a project root that uniphant reads back (docs/trust-model.md, "Trust model"):
the host's `.server_generation`, whatever happens to it, never stops a process
nor makes the host forget a failover; `logs` reads a worker's log as the page
does, never through a symlink or a FIFO, and in bounded memory."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
import uuid

import pytest

from conftest import REPO, host_of, running, with_manager
from test_uniphant import start_daemon
from test_uniphant import read_until, wait_for
from test_ha import projects  # noqa: F401  (a fixture)
from test_ha import (assert_nothing_ran_on_the_old_primary_and_one_copy_at_a_time, at_work, live_sessions, pid_of,
                     unfenced_failover, value)


def contents(path: str):
    """What the regular file path holds, or None if it is none (gone, or something else)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError:
        return None
    with os.fdopen(fd) as f:
        return f.read() if stat.S_ISREG(os.fstat(fd).st_mode) else None


def test_a_damaged_or_replaced_generation_file_is_a_warning_naming_it_never_a_stop(project, db, worker_id):
    project.write("workers/test/uniphant.conf", "stale_after=3\n")  # a heartbeat a second
    path = project.path(".server_generation")
    system = db.value("SELECT system_identifier FROM uniphant.server_generation()")
    sound = f"{system} 1\n"
    # A damaged line: a start warns, naming it, runs, and writes the file anew.
    project.write(".server_generation", f"{system} 1\nnot a generation\n")
    pid = start_daemon(project, worker_id)
    assert f"{path}:2: expected a cluster's system identifier and timeline: it is ignored" in project.log(worker_id)
    assert contents(path) == sound
    # Replaced or removed under a running worker: it warns, and writes it back at a heartbeat.
    secret = project.write("elsewhere", "not a generation either\n")
    replacements = {"a symlink": (lambda: os.symlink(secret, path), "it is a symlink"),
                    "a FIFO": (lambda: os.mkfifo(path), "it is not a regular file"),
                    "nothing": (lambda: None, None)}
    for what, (replace, reason) in replacements.items():
        os.unlink(path)
        replace()
        wait_for(lambda: contents(path) == sound, what=f"the file written back over {what}")
        if reason:
            assert f"cannot open {path}: {reason}: it is ignored" in project.log(worker_id)
        assert running(db, worker_id) == pid
    # A directory in its place cannot be written back: every process warns and runs,
    # a fresh start and a reconnect too.
    os.unlink(path)
    os.mkdir(path)
    wait_for(lambda: "cannot record the server's generation in .server_generation (Is a directory)"
             in project.log(worker_id), what="the warning that it cannot be written back")
    other = str(uuid.uuid4())
    other_pid = start_daemon(project, other)
    assert f"cannot open {path}: it is not a regular file: it is ignored" in project.log(other)
    db.value("SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity WHERE application_name IN "
             "(SELECT id::text FROM uniphant.processes WHERE worker_id IN (%s::uuid, %s::uuid))", worker_id, other)
    wait_for(lambda: all("database connection restored" in project.log(w) for w in (worker_id, other)),
             what="both workers reconnected")
    assert (running(db, worker_id), running(db, other)) == (pid, other_pid)


@pytest.mark.faults
def test_an_unfenced_failover_is_remembered_when_the_generation_file_is_lost_and_no_worker_runs_twice(projects):
    """After a failover without fencing (the old primary back writable, first in
    PGHOST, every row there stale): a worker the manager forks again while its
    host's file is unusable knows the new timeline from the manager; the file
    removed is written back by the running processes; a manager then restarted
    refuses the old primary.  Nothing runs there, no worker runs twice."""
    with unfenced_failover(projects) as failover:
        new, managers, workers = failover.new, failover.managers, failover.workers
        first = next(iter(managers))
        system = value(new, "SELECT system_identifier FROM uniphant.server_generation()")
        generation_file = first.path(".server_generation")
        # The file unusable (a directory, which no process can write back): a
        # worker that the manager forks again refuses the old primary all the same.
        os.unlink(generation_file)
        os.mkdir(generation_file)
        worker = str(value(new, "SELECT worker_id FROM uniphant.fleet WHERE host_id = %s::uuid "
                                "AND worker_type = 'test.recorder' LIMIT 1", host_of(first)))
        before = pid_of(new, worker)
        value(new, "SELECT uniphant.restart_worker(%s::uuid)", worker)
        wait_for(lambda: pid_of(new, worker) not in (None, before), timeout=30, what="the worker forked again")
        # The file removed: the running processes write back the newest timeline.
        os.rmdir(generation_file)
        wait_for(lambda: contents(generation_file) == f"{system} 2\n", what="the file written back")
        # So a manager started anew refuses the old primary, and so do its workers.
        assert first.run(managers[first], "stop", script="workers/uniphant/manager.py").returncode == 0
        split = value(new, "SELECT now()")
        with_manager(first)
        wait_for(lambda: live_sessions(new) == 8, timeout=30, what="the host's workers back on the new primary")
        wait_for(lambda: at_work(new, workers, split, calls=3), timeout=30, what="every worker at work")
        assert_nothing_ran_on_the_old_primary_and_one_copy_at_a_time(failover)


def follow_log(project, worker: str) -> subprocess.Popen:
    """python uniphant.py logs worker -f, its output read as text."""
    child = subprocess.Popen([sys.executable, os.path.join(REPO, "uniphant.py"), "logs", worker, "-f"],
                             cwd=project.root, env=project.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True, stdin=subprocess.DEVNULL)
    project.children.append(child)
    return child


def test_logs_never_reads_through_a_symlink_or_a_fifo_also_after_rotation(project, tmp_path):
    secret = tmp_path / "secret"
    secret.write_text("a secret line\n")
    planted = {"a symlink": (lambda log: os.symlink(secret, log), "it is a symlink"),
               "a FIFO": (os.mkfifo, "it is not a regular file")}
    for what, (plant, reason) in planted.items():
        worker = str(uuid.uuid4())
        log = project.write(f"log/test.probe/{worker}.log", "a line of the worker's\n")
        follow = follow_log(project, worker)
        read_until(follow.stdout, "a line of the worker's")
        os.rename(log, log + ".1")  # rotated away; then something else in its place
        plant(log)
        out, err = follow.communicate(timeout=15)
        assert follow.returncode == 1, (what, out, err)
        assert "secret" not in out
        assert err.count("\n") == 1 and err.endswith(f": error: cannot open {log}: {reason}\n"), (what, err)


def test_logs_reads_the_last_lines_of_a_large_log_in_bounded_memory(project):
    worker = str(uuid.uuid4())
    log = project.write(f"log/test.probe/{worker}.log", "")
    with open(log, "wb") as f:
        f.write((b"x" * 99 + b"\n") * (1 << 20))  # 100 MiB
        f.write(b"the one before last\nthe last line\n")
    # The peak of the process's own memory, read as it ends (its rusage would count
    # what it shared with this process when forked).
    measured = ("import runpy, sys\nsys.argv = sys.argv[1:]\n"
                "try:\n    runpy.run_path(sys.argv[0], run_name='__main__')\n"
                "finally:\n"
                "    print(*[l for l in open('/proc/self/status') if l.startswith('VmHWM:')], file=sys.stderr)")
    result = subprocess.run([sys.executable, "-c", measured, os.path.join(REPO, "uniphant.py"), "logs", worker,
                             "-n", "2"], cwd=project.root, env=project.env, capture_output=True, timeout=60)
    assert result.returncode == 0 and result.stdout == b"the one before last\nthe last line\n", result
    peak = int(result.stderr.split()[1])  # "VmHWM: <n> kB"
    assert peak < 60 * 1024, f"{peak} kB at most in use"
