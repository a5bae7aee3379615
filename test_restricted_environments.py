"""README, "Restricted environments": a read-only tree, logs on stdout only."""

from __future__ import annotations

import os
import shutil

from conftest import REPO, assert_clean_error, read_until, start_daemon, wait_for


def tree(root: str) -> set:
    return {os.path.relpath(os.path.join(d, name), root) for d, dirs, files in os.walk(root)
            for name in dirs + files}


def test_a_read_only_tree_runs_with_its_state_in_the_state_directory(project, db, worker_id, tmp_path):
    shutil.copy(os.path.join(REPO, "uniphant.py"), project.path("workers/uniphant.py"))  # vendored
    state = tmp_path / "state"
    env = {"UNIPHANT_STATE_DIR": str(state), "PYTHONDONTWRITEBYTECODE": "1",
           "PYTHONPATH": project.path("workers")}
    before = tree(project.root)
    pid = start_daemon(project, worker_id, env=env)
    assert project.run(worker_id, "status", env=env).stdout.strip().endswith(f"running with PID {pid}.")
    wait_for(lambda: "tick" in (state / "log" / "test.probe" / f"{worker_id}.log").read_text(), what="a tick")
    assert project.run(worker_id, "stop", env=env).returncode == 0
    assert tree(project.root) == before
    assert {".host_id", ".lock", "pid", "log"} <= set(os.listdir(state))
    assert db.process(worker_id) is None


def test_log_file_off_logs_to_stdout_only(project, db, worker_id):
    project.write("workers/test/uniphant.conf", "log_file=off\n")
    assert_clean_error(project.run(worker_id, "start"), 2, "log_file=off", "start -f")
    child = project.popen(worker_id, "start", "-f")
    seen = read_until(child.stdout, "tick")
    child.terminate()
    out, err = child.communicate(timeout=10)
    assert child.returncode == 0, err
    assert "stopping: SIGTERM received" in seen + out
    assert not os.path.exists(project.path("log"))
