"""README, "Signals": what each signal does to a worker, and descriptors."""

from __future__ import annotations

import os
import signal

import pytest

from conftest import gone, start_daemon, wait_for, write_worker


def test_sighup_reopens_the_log_file_and_the_worker_runs_on(project, db, worker_id):
    pid = start_daemon(project, worker_id)
    log = project.path(f"log/test.probe/{worker_id}.log")
    os.rename(log, log + ".1")  # as logrotate does
    os.kill(pid, signal.SIGHUP)
    wait_for(lambda: "SIGHUP: reopened the log file" in project.log(worker_id), what="a new log file")
    os.remove(log)  # by hand, this time
    os.kill(pid, signal.SIGHUP)
    wait_for(lambda: "SIGHUP: reopened the log file" in project.log(worker_id), what="the log file back")
    assert not gone(pid) and db.process(worker_id)[2] == pid


@pytest.mark.parametrize("sig", ["SIGQUIT", "SIGABRT", "SIGXCPU", "SIGPWR"])
def test_signals_that_ask_a_process_to_end_stop_the_worker_cleanly(project, db, worker_id, sig):
    child = project.popen(worker_id, "start", "-f")
    wait_for(lambda: db.process(worker_id), what="the process row")
    child.send_signal(getattr(signal, sig))
    out, err = child.communicate(timeout=10)
    assert child.returncode == 0, err
    assert f"stopping: {sig} received" in out
    assert db.process(worker_id) is None


@pytest.mark.parametrize("sig", ["SIGUSR2", "SIGALRM", "SIGVTALRM", "SIGPROF", "SIGIO",
                                 "SIGTRAP", "SIGRTMIN+3"])
def test_other_signals_that_would_end_a_process_are_ignored(project, db, worker_id, sig):
    pid = start_daemon(project, worker_id)
    os.kill(pid, signal.SIGRTMIN + 3 if sig == "SIGRTMIN+3" else getattr(signal, sig))
    wait_for(lambda: f"ignoring {sig}" in project.log(worker_id), what=f"{sig} to be ignored")
    assert not gone(pid) and db.process(worker_id)[2] == pid


def test_sigusr1_makes_a_worker_confirm_its_row_at_once(project, db, worker_id):
    project.write("workers/test/uniphant.conf", "log_level=DEBUG\npooler=transaction\n")
    pid = start_daemon(project, worker_id)
    os.kill(pid, signal.SIGUSR1)
    wait_for(lambda: "but the row is still there: not a stop" in project.log(worker_id), what="a confirmation")
    db.rows("DELETE FROM processes WHERE worker_id = %s::uuid", worker_id)  # no LISTEN: no notification
    os.kill(pid, signal.SIGUSR1)
    wait_for(lambda: gone(pid), what="the worker to find its row gone")
    assert "stopping: its process row was deleted" in project.log(worker_id)


def test_worker_whose_connection_is_above_descriptor_1024_runs_and_stops(project, db, worker_id):
    import resource
    if resource.getrlimit(resource.RLIMIT_NOFILE)[1] < 2048:
        pytest.skip("the hard limit on open files is below 2048")
    write_worker(project, "hoarder", "logger.info('tick')", prelude="""
        import resource
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, 2048), hard))
        held = [os.open(os.devnull, os.O_RDONLY) for _ in range(1100)]
        """)
    child = project.popen(worker_id, "start", "-f", script="workers/test/hoarder.py")
    wait_for(lambda: "tick" in project.log(worker_id, "test.hoarder"), what="a tick")
    sockets = [int(fd) for fd in os.listdir(f"/proc/{child.pid}/fd")
               if os.readlink(f"/proc/{child.pid}/fd/{fd}").startswith("socket:")]
    assert max(sockets) > 1024
    db.rows("DELETE FROM processes WHERE worker_id = %s::uuid", worker_id)
    out, err = child.communicate(timeout=10)
    assert child.returncode == 0, err
    assert "stopping: its process row was deleted" in out
