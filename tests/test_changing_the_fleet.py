"""docs/changing-the-fleet.md, "Changing the fleet": rolling restarts, per-worker settings, pause,
restart policies, a manager upgrade that keeps its workers, and deploying new
worker code."""

from __future__ import annotations

import os
import shutil
import time

import pg8000.dbapi
import pytest

from conftest import another_host, fleet, host_of, ops, running, with_manager
from test_uniphant import REPO, assert_clean_error, wait_for

pytestmark = pytest.mark.own_database  # a manager acts on every worker its database holds

# A worker whose behaviour comes from its settings: it logs them, then exits as
# `exit_with` says (a number: SystemExit; `raise`: an exception) or ticks on.
ECHO = '''\
from uniphant import main

VERSION = {version!r}

def work(config, logger, connection):
    logger.info("version %s, queue %r, interval %r", VERSION, config.get("queue"), config["interval"])
    how = config.get("exit_with")
    if how == "raise":
        raise RuntimeError("boom from version " + VERSION)
    if how is not None:
        raise SystemExit(int(how))

if __name__ == "__main__":
    main(work)
'''


def echo(project, version: str = "v1", conf: str = "") -> None:
    project.write("workers/app/echo.py", ECHO.format(version=version))
    if conf:
        project.write("workers/app/uniphant.conf", conf)


def live_count(db, worker_type: str) -> int:
    return db.value("SELECT count(*) FROM processes p WHERE worker_type = %s AND uniphant.process_live(p)",
                    worker_type)


def pids(db, worker_type: str) -> dict:
    return dict(db.rows("SELECT worker_id::text, pid FROM processes WHERE worker_type = %s", worker_type))


def all_running(db, worker_type: str, n: int) -> bool:
    return db.value("SELECT count(*) FROM fleet WHERE worker_type = %s AND state = 'running'", worker_type) == n


# ---------------------------------------------------------------------------
# Rolling restarts
# ---------------------------------------------------------------------------

def test_a_rolling_restart_keeps_all_but_a_batch_registered(project, db, tmp_path):
    other = another_host(project, tmp_path)
    try:
        for root in (project, other):
            echo(root)
            with_manager(root)
        db.value("SELECT scale('app.echo', 6)")
        wait_for(lambda: all_running(db, "app.echo", 6), timeout=30, what="six workers")
        assert sorted(n for _, n in db.rows("SELECT host_id, count(*) FROM processes WHERE worker_type = "
                                            "'app.echo' GROUP BY 1")) == [3, 3]
        before = pids(db, "app.echo")
        rolled = ops(project, "restart", "app.echo", "--rolling", "--batch", "2")
        assert rolled.returncode == 0 and "6 workers" in rolled.stdout, rolled.stderr
        fewest, deadline = 6, time.monotonic() + 60
        while db.value("SELECT count(*) FROM uniphant.rolls") or not all_running(db, "app.echo", 6):
            fewest = min(fewest, live_count(db, "app.echo"))
            assert time.monotonic() < deadline, "the roll did not end within 60 s"
        after = pids(db, "app.echo")
        assert fewest >= 4 and set(after) == set(before)
        assert all(after[w] != before[w] for w in before)  # every one restarted
    finally:
        other.cleanup()


def test_a_roll_into_a_script_that_raises_halts_after_the_first_batch(project, db):
    echo(project)
    with_manager(project)
    db.value("SELECT scale('app.echo', 6, %s::uuid)", host_of(project))
    wait_for(lambda: all_running(db, "app.echo", 6), timeout=30, what="six workers")
    before = pids(db, "app.echo")
    echo(project, conf="exit_with=raise\n")  # the new code raises
    assert db.value("SELECT restart_workers('app.echo', 1)") == 6
    halted = wait_for(lambda: db.value("SELECT halted FROM uniphant.rolls"), timeout=30, what="the roll to halt")
    assert "did not come back" in halted and "RuntimeError: boom from version v1" in halted
    untouched = {w: p for w, p in pids(db, "app.echo").items() if before.get(w) == p}
    assert len(untouched) == 5 and live_count(db, "app.echo") == 5
    details = db.rows("SELECT state, detail FROM fleet WHERE worker_type = 'app.echo'")
    assert all(detail.startswith("rolling restart halted: ") or state == "backoff" for state, detail in details)
    assert "rolling restart halted" in ops(project, "ps", "app.echo").stdout


# ---------------------------------------------------------------------------
# Per-worker settings
# ---------------------------------------------------------------------------

def test_settings_reach_the_workers_config_checked_as_config_files_are(project, db):
    echo(project)
    with_manager(project)
    added = ops(project, "add", "app.echo", "--host", "here", "--set", "queue=mail", "--set", "interval=0.25")
    assert added.returncode == 0, added.stderr
    worker = added.stdout.strip()
    wait_for(lambda: "queue 'mail', interval 0.25" in project.log(worker, "app.echo"), what="its settings")
    shown = ops(project, "ps", worker)
    assert "settings:   interval=0.25, queue=mail" in shown.stdout, shown.stdout
    for setting, message in [("interval=soon", "bad value for interval"), ("worker_id=x", "'worker_id' is reserved"),
                             ("api_token=x", "looks like a credential"), ("nokey", "expected KEY=VALUE")]:
        assert_clean_error(ops(project, "add", "app.echo", "--set", setting), 2, message)
    with pytest.raises(pg8000.dbapi.DatabaseError) as refused:
        db.rows("""SELECT add_worker('app.echo', NULL, '{"db_password": "x"}')""")
    assert refused.value.args[0]["C"] == "22023" and "secrets.conf" in refused.value.args[0]["M"]


def test_a_setting_a_config_file_defines_too_is_that_workers_failure_saying_where(project, db):
    echo(project, conf="queue=from-the-file\n")
    with_manager(project, "restart_delay=30\n")
    worker = str(db.value("""SELECT add_worker('app.echo', %s::uuid, '{"queue": "mail"}')""", host_of(project)))
    failure = wait_for(lambda: fleet(db, worker).get("last_exit"), what="the worker's failure")
    assert "workers.settings" in failure and "'queue' is already defined at" in failure
    assert "workers/app/uniphant.conf:1" in failure


def test_changing_a_workers_settings_restarts_that_worker_only(project, db):
    echo(project)
    with_manager(project)
    changed, kept = (str(db.value("SELECT add_worker('app.echo', %s::uuid)", host_of(project))) for _ in range(2))
    wait_for(lambda: all_running(db, "app.echo", 2), what="two workers")
    before = pids(db, "app.echo")
    assert ops(project, "set", changed, "queue=reports").returncode == 0
    wait_for(lambda: "queue 'reports'" in project.log(changed, "app.echo"), what="the new settings")
    after = pids(db, "app.echo")
    assert after[changed] != before[changed] and after[kept] == before[kept]


# ---------------------------------------------------------------------------
# Pause and resume
# ---------------------------------------------------------------------------

def test_pause_stops_a_worker_cleanly_and_resume_starts_it_again_at_once(project, db):
    echo(project)
    with_manager(project, "restart_delay=30\n")
    worker = str(db.value("SELECT add_worker('app.echo', %s::uuid, '{\"queue\": \"q\"}')", host_of(project)))
    pid = wait_for(lambda: running(db, worker), what="the worker")
    assert ops(project, "pause", worker).returncode == 0
    wait_for(lambda: running(db, worker) is None and fleet(db, worker)["state"] == "paused", what="the pause")
    assert "stopping: SIGTERM received" in project.log(worker, "app.echo")
    assert fleet(db, worker)["restarts"] == 0
    assert "paused" in ops(project, "ps", worker).stdout
    assert ops(project, "resume", worker).returncode == 0
    new = wait_for(lambda: fleet(db, worker)["state"] == "running" and running(db, worker), what="the resume")
    assert new != pid and fleet(db, worker)["restarts"] == 0
    assert db.value("SELECT settings->>'queue' FROM workers WHERE worker_id = %s::uuid", worker) == "q"


def test_pause_and_resume_a_whole_type(project, db):
    echo(project)
    with_manager(project)
    db.value("SELECT scale('app.echo', 3, %s::uuid)", host_of(project))
    wait_for(lambda: all_running(db, "app.echo", 3), what="three workers")
    assert "pause: 3 workers" in ops(project, "pause", "app.echo").stdout
    wait_for(lambda: db.value("SELECT count(*) FROM fleet WHERE state = 'paused'") == 3
             and live_count(db, "app.echo") == 0, what="all three paused")
    assert "resume: 3 workers" in ops(project, "resume", "app.echo").stdout
    wait_for(lambda: all_running(db, "app.echo", 3), what="all three back")


# ---------------------------------------------------------------------------
# Restart policies
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("policy, exit_with, finished", [
    ("always", "0", False), ("on-failure", "0", True), ("on-failure", "3", False), ("on-failure", "raise", False),
])
def test_restart_policy(project, db, policy, exit_with, finished):
    echo(project, conf=f"restart={policy}\nexit_with={exit_with}\n")
    with_manager(project, "restart_delay=0.2\nrestart_delay_max=0.4\n")
    worker = str(db.value("SELECT add_worker('app.echo', %s::uuid)", host_of(project)))
    if not finished:
        wait_for(lambda: fleet(db, worker).get("restarts", 0) >= 2, what="the worker started again")
        return
    wait_for(lambda: fleet(db, worker).get("state") == "done" and fleet(db, worker)["last_exit"],
             what="the worker done, and its manager's word on how it ended")
    assert db.value("SELECT done_at IS NOT NULL FROM workers WHERE worker_id = %s::uuid", worker)
    assert "SystemExit(0)" in fleet(db, worker)["last_exit"]
    # A plan after it (another worker added and running) starts nothing of it.
    echo(project, conf="restart=always\n")
    other = str(db.value("SELECT add_worker('app.echo', %s::uuid)", host_of(project)))
    wait_for(lambda: fleet(db, other).get("state") == "running", what="a plan after the end")
    assert fleet(db, worker)["state"] == "done" and fleet(db, worker)["restarts"] == 0
    assert project.log(worker, "app.echo").count("started: process") == 1
    assert "done" in ops(project, "ps", worker).stdout


# ---------------------------------------------------------------------------
# A manager upgrade, and deploying new worker code
# ---------------------------------------------------------------------------

def vendor(project) -> None:
    """uniphant.py in the project root, which the manager takes before any other."""
    shutil.copy(os.path.join(REPO, "uniphant.py"), project.root)
    shutil.copy(os.path.join(REPO, "uniphant_fleet.py"), project.root)


def test_restarting_the_manager_keeps_its_workers_and_takes_up_its_new_code(project, db):
    vendor(project)
    echo(project)
    manager = with_manager(project)
    db.value("SELECT scale('app.echo', 20, %s::uuid)", host_of(project))
    wait_for(lambda: all_running(db, "app.echo", 20), timeout=60, what="twenty workers")
    before = pids(db, "app.echo")
    with open(project.path("uniphant.py"), encoding="utf-8") as f:
        upgraded = f.read().replace('__version__ = "', '__version__ = "upgraded-', 1)
    with open(project.path("uniphant.py"), "w", encoding="utf-8") as f:
        f.write(upgraded)
    restarted = project.run(manager, "restart", script="workers/uniphant/manager.py")
    assert restarted.returncode == 0, restarted.stderr
    log = lambda: project.log(manager, "uniphant.manager")  # noqa: E731
    wait_for(lambda: log().count("adopted worker") == 20, timeout=30, what="the new manager to adopt all")
    assert "leaving 20 workers running for the next manager" in log()
    assert "uniphant upgraded-" in log().rsplit("leaving 20 workers", 1)[1]  # the new code runs the manager
    wait_for(lambda: all_running(db, "app.echo", 20), what="twenty workers, running")
    assert pids(db, "app.echo") == before
    assert db.value("SELECT sum(restarts) FROM fleet WHERE worker_type = 'app.echo'") == 0
    stopped = project.run(manager, "stop", script="workers/uniphant/manager.py")  # stop keeps its meaning
    assert stopped.returncode == 0 and live_count(db, "app.echo") == 0


def test_a_restart_whose_new_manager_cannot_connect_keeps_the_old_one(project, db, password_role):
    role, password = password_role
    db.rows("SELECT uniphant.grant_role(%s, 'manager')", role)
    secrets = project.write(".uniphant/secrets/workers/uniphant/secrets.conf", f"PGPASSWORD={password}\n",
                            mode=0o600, base=project.home)
    echo(project)
    manager = with_manager(project, f"PGUSER={role}\nPGHOST=127.0.0.1\nPGPORT={db.env['PGPORT']}\n")
    db.value("SELECT scale('app.echo', 2, %s::uuid)", host_of(project))
    wait_for(lambda: all_running(db, "app.echo", 2), what="two workers")
    before = running(db, manager)
    with open(secrets, "w", encoding="utf-8") as f:
        f.write("PGPASSWORD=a-wrong-password\n")
    restarted = project.run(manager, "restart", script="workers/uniphant/manager.py")
    assert running(db, manager) == before == project.running_pid(manager, "uniphant.manager")
    assert_clean_error(restarted, 1, "password authentication failed", "goes on running, untouched")
    db.value("SELECT scale('app.echo', 3, %s::uuid)", host_of(project))
    wait_for(lambda: all_running(db, "app.echo", 3), what="the old manager, still at work, starting a third")
    assert "leaving" not in project.log(manager, "uniphant.manager")


def roll(project, db, worker_type: str, n: int) -> None:
    """A rolling restart, one at a time, and its end."""
    assert ops(project, "restart", worker_type, "--rolling").returncode == 0
    wait_for(lambda: not db.value("SELECT count(*) FROM uniphant.rolls") and all_running(db, worker_type, n),
             timeout=60, what="the roll to end")


def versions(project, db) -> set:
    """The version each worker's last run logged."""
    return {project.log(w, "app.echo").rsplit("version ", 1)[-1].split(",")[0]
            for w in pids(db, "app.echo")}


def test_deploying_new_worker_code_rolls_out_and_back(project, db):
    echo(project, "v1")
    with_manager(project)
    db.value("SELECT scale('app.echo', 3, %s::uuid)", host_of(project))
    wait_for(lambda: all_running(db, "app.echo", 3), what="three workers on v1")
    echo(project, "v2")  # the new code, copied to the host
    roll(project, db, "app.echo", 3)
    wait_for(lambda: versions(project, db) == {"v2"}, what="every worker on v2")
    os.remove(project.path("workers/app/echo.py"))  # a deploy that lost the script
    assert ops(project, "restart", "app.echo", "--rolling").returncode == 0
    halted = wait_for(lambda: db.value("SELECT halted FROM uniphant.rolls"), timeout=30, what="the roll to halt")
    assert "could not start: no script app/echo.py" in halted
    assert live_count(db, "app.echo") == 2 and versions(project, db) == {"v2"}
    echo(project, "v1")  # rolling back: the old code, then a roll
    roll(project, db, "app.echo", 3)
    wait_for(lambda: versions(project, db) == {"v1"}, what="every worker back on v1")
