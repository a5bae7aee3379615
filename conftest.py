"""The repository's test session: one throwaway PostgreSQL server per test
process, and the helpers of the fleet's suites.

test_uniphant.py holds the fixtures and helpers every suite uses (it runs on its
own, against the server that UNIPHANT_TEST_PGHOST, UNIPHANT_TEST_PGPORT,
UNIPHANT_TEST_PGUSER and UNIPHANT_TEST_PGPASSWORD name).  Unless those are set,
each process that runs tests needing a database starts a server in a temporary
directory (see dev/pgserver.py for how its binaries are found), sets them for
it, and removes it when its session ends.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
import uuid
from typing import Dict, Optional

import pytest

from test_uniphant import Project, start_daemon

REPO = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(REPO, "dev"))
import pgserver  # noqa: E402

# A plugin, so that its fixtures are everyone's and held once: one session database per process.
pytest_plugins = ["test_uniphant"]

_server: Optional[pgserver.Server] = None
_server_error = ""

# Every process the session starts (its test processes, servers, workers,
# managers, pages, browsers, and their daemons, which leave the process tree)
# inherits this mark in its environment; whichever process set it looks for
# the mark in every process when the session ends.
SESSION_MARK = "UNIPHANT_TEST_SESSION"
_marked_here = SESSION_MARK not in os.environ
os.environ.setdefault(SESSION_MARK, uuid.uuid4().hex)


@pytest.hookimpl(trylast=True)
def pytest_collection_modifyitems(config, items) -> None:
    """Start the server where tests run (xdist's controller collects nothing), once
    the tests are selected, and only if one of them needs a database."""
    global _server, _server_error
    if config.option.collectonly or os.environ.get("UNIPHANT_TEST_PGHOST") or \
            not any("cluster" in item.fixturenames for item in items):
        return
    try:
        _server = pgserver.Server.started()
    except pgserver.ServerError as e:
        _server_error = str(e)
        return
    os.environ.update({f"UNIPHANT_TEST_{key}": value for key, value in _server.env().items()
                       if key != "PGDATABASE"})


def pytest_runtest_setup(item) -> None:
    if _server_error and "cluster" in item.fixturenames:
        item.session.shouldstop = "the test server could not be started"  # xdist too
        pytest.fail(f"the test server could not be started: {_server_error}", pytrace=False)


def marked_processes(mark: str) -> Dict[int, str]:
    """PID -> command line of each process whose environment holds SESSION_MARK=mark."""
    found = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/environ", "rb") as f:
                marked = f"{SESSION_MARK}={mark}".encode() in f.read().split(b"\0")
            if marked:
                with open(f"/proc/{name}/cmdline", "rb") as f:
                    found[int(name)] = " ".join(f.read().decode(errors="replace").split())
        except OSError:
            continue  # gone, or another user's
    return found


@pytest.hookimpl(trylast=True)  # after xdist has ended its test processes, and they their servers
def pytest_sessionfinish(session) -> None:
    """Remove this process's server; then, in the process that marked the session,
    fail it if any process it started outlives it: kill each, and name it."""
    if _server is not None:
        _server.destroy()
    if not _marked_here:
        return
    mark = os.environ[SESSION_MARK]
    deadline = time.monotonic() + 5  # a process killed at the end of the last test may still be exiting
    while marked_processes(mark) and time.monotonic() < deadline:
        time.sleep(0.1)
    survivors = marked_processes(mark)
    for pid in survivors:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    if survivors:
        lines = "".join(f"\n  PID {pid}: {command}" for pid, command in sorted(survivors.items()))
        print(f"\nFAILED: {len(survivors)} processes the test session started outlived it "
              f"(killed now):{lines}", file=sys.stderr)
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


# ---------------------------------------------------------------------------
# The fleet: a manager per project root, which plays a host
# ---------------------------------------------------------------------------

def with_manager(project, conf: str = "", *args: str, env=None) -> str:
    """Start the project's manager as a daemon; return its worker id."""
    os.makedirs(project.path("workers/uniphant"), exist_ok=True)
    shutil.copy(os.path.join(REPO, "workers", "uniphant", "manager.py"), project.path("workers/uniphant"))
    if conf:
        project.write("workers/uniphant/uniphant.conf", conf)
    manager_id = str(uuid.uuid4())
    start_daemon(project, manager_id, *args, script="workers/uniphant/manager.py", env=env)
    return manager_id


def host_of(project) -> str:
    with open(project.path(".host_id")) as f:
        return f.read().strip()


def another_host(project, tmp_path, name: str = "other_host") -> Project:
    return type(project)(str(tmp_path / name), project.home, project.env)


def fleet(db, worker_id: str) -> dict:
    rows = db.rows("SELECT state, host_id::text, pid, restarts, last_exit, next_start_at FROM fleet "
                   "WHERE worker_id = %s::uuid", worker_id)
    keys = ("state", "host_id", "pid", "restarts", "last_exit", "next_start_at")
    return dict(zip(keys, rows[0])) if rows else {}


def running(db, worker_id: str):
    """The PID of worker_id's live process row, or None."""
    return db.value("SELECT pid FROM processes WHERE worker_id = %s::uuid", worker_id)


def ops(project, *args: str) -> subprocess.CompletedProcess:
    """python uniphant.py ARGS, in the project."""
    return subprocess.run([sys.executable, os.path.join(REPO, "uniphant.py"), *args], cwd=project.root,
                          env=project.env, capture_output=True, text=True, timeout=60)
