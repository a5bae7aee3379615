"""The manager at the seams of the trust model (docs/trust-model.md, "Trust model" and "The
fleet"): notifications are hints that cost a bounded number of plans, a row
of a host with a live manager is a running copy only once that manager has
found its PID holding the worker's PID-file lock, a worker run by hand keeps
its row through an outage, a rolling restart says what it waits for, and a
forked worker goes by its own name."""

from __future__ import annotations

import os
import signal
import threading
import time
import uuid

import pytest

from conftest import another_host, fleet, host_of, ops, running, with_manager
from test_uniphant import cpu_seconds, gone, session_of, start_daemon, wait_for

pytestmark = pytest.mark.own_database  # a manager acts on every worker its database holds


def manager_pid(project, manager_id: str) -> int:
    return project.running_pid(manager_id, "uniphant.manager")


def flood(conn, count: int, seconds: float, stop: threading.Event) -> None:
    """NOTIFY the managers' channel count times, spread over seconds."""
    start = time.monotonic()
    for n in range(count):
        if stop.is_set():
            return
        conn.execute_simple("NOTIFY uniphant_fleet")
        pause = start + seconds * (n + 1) / count - time.monotonic()
        if pause > 0:
            time.sleep(pause)


# ---------------------------------------------------------------------------
# B7: notifications are hints, coalesced
# ---------------------------------------------------------------------------

def test_a_notification_flood_costs_a_manager_a_plan_per_gap_and_delays_no_start(project, db):
    manager_id = with_manager(project)
    pid = manager_pid(project, manager_id)
    role, password = f"connect_only_{uuid.uuid4().hex[:8]}", "Secr3t-" + uuid.uuid4().hex
    db.rows(f"CREATE ROLE {role} LOGIN PASSWORD '{password}'")  # no part: it may only connect (and NOTIFY)
    conn = session_of(db, role, password, str(uuid.uuid4()))
    stop = threading.Event()
    flooder = threading.Thread(target=flood, args=(conn, 1500, 6.0, stop))
    try:
        wait_for(lambda: db.value("SELECT count(*) FROM uniphant.live_managers()") == 1, what="the manager")
        cpu_before, wall_before = cpu_seconds(pid), time.monotonic()
        flooder.start()
        time.sleep(2.0)  # the flood is under way: an add now must not wait for it to end
        added = time.monotonic()
        worker = str(db.value("SELECT add_worker('test.probe', %s::uuid)", host_of(project)))
        wait_for(lambda: running(db, worker), timeout=5, what="the worker added during the flood")
        started_in = time.monotonic() - added
        flooder.join()
        cpu, wall = cpu_seconds(pid) - cpu_before, time.monotonic() - wall_before
    finally:
        stop.set()
        if flooder.is_alive():
            flooder.join()
        conn.close()
        db.rows(f"DROP ROLE {role}")
    # Measured: 3 to 5 % of a core on a busy machine (before: a plan per notification, over 13 %).
    print(f"flood: {cpu:.3f} s of CPU in {wall:.2f} s; the add registered in {started_in:.3f} s")
    assert cpu < 0.075 * wall, f"the manager used {cpu:.2f} s of CPU in {wall:.1f} s of flood"
    assert started_in < 1.0, f"a worker added during the flood registered after {started_in:.2f} s"


# ---------------------------------------------------------------------------
# B8: a row of a host with a live manager is what that manager finds it to be
# ---------------------------------------------------------------------------

def test_a_forged_row_naming_a_managers_pid_is_cleared_by_that_manager_and_never_shown_as_a_running_copy(
        project, db, make_role, tmp_path):
    other = another_host(project, tmp_path)
    try:
        manager_id = with_manager(project)
        with_manager(other)
        here, there = host_of(project), host_of(other)
        victim = manager_pid(project, manager_id)
        worker = str(db.value("SELECT add_worker('test.probe', %s::uuid)", there))
        db.value("SELECT pause_worker(%s::uuid)", worker)
        wait_for(lambda: fleet(db, worker).get("state") == "paused", what="the paused worker")
        role, password = make_role("forger")
        forger = session_of(db, role, password, str(uuid.uuid4()))
        try:
            forger.cursor().execute("SELECT register_process(%s::uuid, %s::uuid, 'test.probe', %s, '1 day')",
                                    (worker, here, victim))
            assert running(db, worker) == victim

            def cleared() -> bool:
                shown = db.rows("SELECT state, pid, coalesce(detail, '') FROM fleet WHERE worker_id = %s::uuid",
                                worker)[0]
                assert shown[1] != victim and "still runs" not in shown[2] and shown[0] != "moving", shown
                assert str(victim) not in ops(project, "ps", worker).stdout
                return running(db, worker) is None
            wait_for(cleared, timeout=20, what="the forged row to be cleared by its host's manager")
        finally:
            forger.close()
        assert manager_pid(project, manager_id) == victim and not gone(victim)
        log = project.log(manager_id, "uniphant.manager")
        assert f"removed the process row of worker {worker} on this host: it names PID {victim}" in log
    finally:
        other.cleanup()


def test_a_hand_run_worker_keeps_its_row_through_an_outage_longer_than_its_stale_after(project, db, tmp_path):
    other = another_host(project, tmp_path)
    for root in (project, other):
        root.write("uniphant.conf", "stale_after=3\n")
    try:
        with_manager(project)
        # Workers run by hand: one on the manager's host, one on a host without a
        # manager, and one there whose row another copy takes over meanwhile.
        kept_here, kept_there, taken = (str(uuid.uuid4()) for _ in range(3))
        pids = {kept_here: start_daemon(project, kept_here), kept_there: start_daemon(other, kept_there),
                taken: start_daemon(other, taken)}
        for pid in pids.values():
            os.kill(pid, signal.SIGSTOP)
        try:
            # An outage of their own: frozen, their sessions ended, their rows stale.
            db.rows("SELECT pg_terminate_backend(a.pid) FROM pg_stat_activity a JOIN processes p "
                    "ON a.application_name = p.id::text WHERE p.worker_id = ANY (%s::uuid[])", list(pids))
            wait_for(lambda: not db.value("SELECT bool_or(uniphant.process_live(p)) FROM processes p "
                                          "WHERE worker_id = ANY (%s::uuid[])", list(pids)),
                     what="their rows to be stale")
            copy = db.connect(application_name=str(uuid.uuid4()))  # another copy takes a stale row over
            copy.cursor().execute("SELECT register_process(%s::uuid, %s::uuid, 'test.probe', 1, '1 day')",
                                  (taken, host_of(other)))
            copy.close()
            # The manager plans, and looks at every row of its host, with the rows stale.
            canary = db.connect(application_name=str(uuid.uuid4()))
            canary.cursor().execute("SELECT register_process(%s::uuid, %s::uuid, 'test.probe', 1, '1 day')",
                                    (str(uuid.uuid4()), host_of(project)))
            canary.close()
            added = str(db.value("SELECT add_worker('test.probe', %s::uuid)", host_of(project)))
            wait_for(lambda: fleet(db, added).get("state") == "running", what="a plan")
            assert db.value("SELECT count(*) FROM processes WHERE worker_id = ANY (%s::uuid[])",
                            [kept_here, kept_there]) == 2
            wait_for(lambda: db.value("SELECT count(*) FROM processes WHERE pid = 1 AND host_id = %s::uuid",
                                      host_of(project)) == 0, what="the manager's look at its host's rows")
            assert db.value("SELECT count(*) FROM processes WHERE worker_id = ANY (%s::uuid[])",
                            [kept_here, kept_there]) == 2
        finally:
            resumed = time.monotonic()
            for pid in pids.values():
                os.kill(pid, signal.SIGCONT)
        for worker, root in ((kept_here, project), (kept_there, other)):
            wait_for(lambda: "database connection restored" in root.log(worker) and
                     db.value("SELECT uniphant.process_live(p) FROM processes p WHERE worker_id = %s::uuid", worker),
                     what=f"worker {worker} back with its row")
            assert not gone(pids[worker]) and running(db, worker) == pids[worker]
            assert "stopping" not in root.log(worker)
        wait_for(lambda: gone(pids[taken]), what="the worker whose row another copy took to stop")
        assert "stopping: its process row was deleted" in other.log(taken)
        assert time.monotonic() - resumed < 15
    finally:
        other.cleanup()


# ---------------------------------------------------------------------------
# C12: a rolling restart says what it waits for, and halts
# ---------------------------------------------------------------------------

def test_a_roll_whose_worker_has_no_live_manager_says_so_and_halts_after_start_timeout(project, db, tmp_path):
    other = another_host(project, tmp_path)
    for root in (project, other):
        root.write("uniphant.conf", "stale_after=3\n")
    try:
        with_manager(project, "start_timeout=4\n")
        down = with_manager(other)
        orphan = str(db.value("SELECT add_worker('test.probe', %s::uuid)", host_of(other)))
        kept = str(db.value("SELECT add_worker('test.probe', %s::uuid)", host_of(project)))
        wait_for(lambda: fleet(db, orphan).get("state") == "running" and fleet(db, kept).get("state") == "running",
                 what="both workers")
        os.kill(manager_pid(other, down), signal.SIGKILL)
        wait_for(lambda: db.value("SELECT count(*) FROM uniphant.live_managers()") == 1,
                 what="the other host's manager to be down")
        assert db.value("SELECT restart_workers('test.probe', 1)") == 2  # the orphan's batch goes first
        waiting = f"worker {orphan} waits for its host's manager, which is not live"
        wait_for(lambda: db.value("SELECT detail FROM fleet WHERE worker_id = %s::uuid", orphan) == waiting,
                 what="the roll to say what it waits for")
        assert "waits for its host's manager" in ops(project, "ps", orphan).stdout
        began = db.value("SELECT batch_started_at FROM uniphant.rolls")
        halted = wait_for(lambda: db.value("SELECT halted FROM uniphant.rolls"), timeout=20, what="the roll to halt")
        assert halted == f"worker {orphan} did not come back within 4 s: its host has no live manager"
        assert db.value("SELECT now() - %s::timestamptz >= interval '4 seconds'", began)
        assert db.value("SELECT detail FROM fleet WHERE worker_id = %s::uuid", kept) == \
            f"rolling restart halted: {halted}"
        assert fleet(db, kept)["state"] == "running"  # the rest keeps the code it runs
    finally:
        other.cleanup()


# ---------------------------------------------------------------------------
# C13: a forked worker names itself
# ---------------------------------------------------------------------------

def test_a_forked_worker_names_itself_and_the_managers_log_names_its_start(project, db):
    manager_id = with_manager(project)
    worker = str(db.value("SELECT add_worker('test.probe', %s::uuid)", host_of(project)))
    pid = wait_for(lambda: running(db, worker), what="the worker")
    with open(f"/proc/{pid}/comm") as f:
        assert f.read() == "uniphant:probe\n"  # uniphant:test.probe is longer than Linux keeps
    with open(f"/proc/{manager_pid(project, manager_id)}/comm") as f:
        assert f.read() != "uniphant:probe\n"
    assert f"started worker {worker} (test.probe): PID {pid}, named uniphant:probe" in \
        project.log(manager_id, "uniphant.manager")
