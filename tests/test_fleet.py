"""docs/fleet.md, "The fleet": desired state in SQL, a manager per host that makes it
so, and the ops command.  Each test has a database of its own, so that the
managers of one test never see the workers of another; project roots play hosts.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
import uuid

import pg8000.dbapi
import pytest

from conftest import another_host, fleet, host_of, ops, running, with_manager
from test_uniphant import (REPO, assert_clean_error, gone, server_project, session_of, show_config, sql_rows,
                           start_daemon, wait_for)

pytestmark = pytest.mark.own_database  # a manager acts on every worker its database holds


def test_a_desired_worker_runs_within_moments_and_stops_when_removed(project, db):
    with_manager(project)
    manager_pid = wait_for(lambda: running(db, db.value("SELECT worker_id FROM processes p JOIN managers m "
                                                        "ON m.process_id = p.id WHERE m.host_id = %s::uuid",
                                                        host_of(project))), what="the manager")
    worker = str(db.value("SELECT add_worker('test.probe', %s::uuid)", host_of(project)))
    pid = wait_for(lambda: running(db, worker), what="the desired worker to register")
    assert open(f"/proc/{pid}/stat").read().split(") ", 1)[1].split()[1] == str(manager_pid)  # forked
    wait_for(lambda: fleet(db, worker)["state"] == "running" and fleet(db, worker)["pid"] == pid,
             what="its state: running")
    assert project.run(worker, "status").stdout.strip().endswith(f"running with PID {pid}.")
    assert db.value("SELECT remove_worker(%s::uuid)", worker) is True
    wait_for(lambda: gone(pid) and running(db, worker) is None, what="the worker to stop")
    assert fleet(db, worker) == {}


def test_a_managed_worker_killed_with_kill_9_comes_back_with_a_new_pid(project, db):
    with_manager(project)
    worker = str(db.value("SELECT add_worker('test.probe', %s::uuid)", host_of(project)))
    pid = wait_for(lambda: running(db, worker), what="the worker")
    os.kill(pid, signal.SIGKILL)
    new = wait_for(lambda: running(db, worker) not in (None, pid) and running(db, worker),
                   what="the worker back")
    state = wait_for(lambda: (f := fleet(db, worker))["state"] == "running" and f["pid"] == new and f,
                     what="its state")
    assert state["restarts"] == 1 and state["last_exit"] == "killed by SIGKILL"


def test_an_always_failing_worker_is_retried_with_growing_delays_and_says_why(project, db):
    project.write("workers/test/uniphant.conf", "mode=raise\n")
    manager_id = with_manager(project, "restart_delay=0.2\nrestart_delay_max=1.6\n")
    worker = str(db.value("SELECT add_worker('test.probe', %s::uuid)", host_of(project)))
    wait_for(lambda: fleet(db, worker).get("restarts", 0) >= 5, timeout=30, what="five restarts")
    state = wait_for(lambda: fleet(db, worker)["state"] == "backoff" and fleet(db, worker),
                     what="a backoff")
    assert state["last_exit"] == "exit code 1: RuntimeError: boom from the worker"
    assert state["next_start_at"] is not None
    manager_log = project.log(manager_id, "uniphant.manager")
    delays = [float(line.rsplit(" in ", 1)[1].split()[0]) for line in manager_log.splitlines()
              if f"worker {worker}" in line and "starting it again in" in line]
    assert delays[0] == 0.0                                   # the first restart at once
    assert all(0.1 <= d <= 0.2 for d in delays[1:2])          # then restart_delay, jittered
    assert all(0.8 <= d <= 1.6 for d in delays[4:])           # doubling up to the cap


def test_a_worker_that_hangs_before_registering_is_killed_at_the_deadline(project, db):
    project.write("workers/test/hang.py", "import time\ntime.sleep(3600)\n")
    with_manager(project, "start_timeout=1\n")
    worker = str(db.value("SELECT add_worker('test.hang', %s::uuid)", host_of(project)))
    state = wait_for(lambda: fleet(db, worker).get("last_exit") and fleet(db, worker),
                     what="the hung start to be killed")
    assert state["last_exit"] == "did not register within 1 s"


def test_kill_9_of_the_manager_leaves_its_workers_running_and_the_next_one_adopts_them(
        project, db):
    manager_id = with_manager(project)
    workers = [str(db.value("SELECT add_worker('test.probe', %s::uuid)", host_of(project))) for _ in range(3)]
    pids = {w: wait_for(lambda: running(db, w), what="a worker") for w in workers}
    os.kill(project.running_pid(manager_id, "uniphant.manager"), signal.SIGKILL)
    wait_for(lambda: project.running_pid(manager_id, "uniphant.manager") is None, what="the manager to die")
    assert all(not gone(pid) for pid in pids.values())
    second = with_manager(project)
    wait_for(lambda: project.log(second, "uniphant.manager").count("adopted worker") == 3, what="adoption")
    # A manager writes worker_states at most every 0.1 s: one killed may leave its last
    # changes unwritten (a worker's registering, say), which the next one writes as it adopts.
    wait_for(lambda: all(fleet(db, w)["state"] == "running" for w in workers), what="the states running")
    assert {w: running(db, w) for w in workers} == pids


def test_a_clean_stop_of_the_manager_stops_its_workers_and_they_come_back_with_it(project, db):
    manager_id = with_manager(project)
    worker = str(db.value("SELECT add_worker('test.probe', %s::uuid)", host_of(project)))
    pid = wait_for(lambda: running(db, worker), what="the worker")
    stop = project.run(manager_id, "stop", script="workers/uniphant/manager.py")
    assert stop.returncode == 0, stop.stderr
    assert gone(pid) and running(db, worker) is None
    assert fleet(db, worker)["state"] == "waiting for its host"
    with_manager(project)
    wait_for(lambda: running(db, worker), what="the worker back")


def test_a_second_manager_on_one_root_refuses_naming_the_first(project, db):
    first = with_manager(project)
    first_pid = project.running_pid(first, "uniphant.manager")
    result = project.run(str(uuid.uuid4()), "start", script="workers/uniphant/manager.py")
    assert_clean_error(result, 1, "a manager already runs", first, f"PID {first_pid}")


def test_two_managers_race_for_20_any_host_workers_and_each_runs_exactly_once_spread_evenly(
        project, db, tmp_path):
    other = another_host(project, tmp_path)
    try:
        with_manager(project)
        with_manager(other)
        assert db.value("SELECT scale('test.probe', 20)") == 20
        wait_for(lambda: db.value("SELECT count(*) FROM processes p JOIN workers w USING (worker_id)") == 20,
                 timeout=30, what="20 workers")
        wait_for(lambda: sorted(count for _, count in db.rows(
            "SELECT p.host_id, count(*) FROM processes p JOIN workers w USING (worker_id) GROUP BY 1")) == [10, 10],
            what="an even spread")
        wait_for(lambda: db.value("SELECT count(*) FROM fleet WHERE state = 'running'") == 20,
                 what="all 20 reported running")
    finally:
        other.cleanup()


def test_a_dead_hosts_any_host_worker_comes_back_elsewhere_after_stale_after(project, db, tmp_path):
    other = another_host(project, tmp_path)
    project.write("uniphant.conf", "stale_after=3\n")
    other.write("uniphant.conf", "stale_after=3\n")
    try:
        first = with_manager(project)
        worker = str(db.value("SELECT add_worker('test.probe')"))
        pid = wait_for(lambda: running(db, worker), what="the worker on the first host")
        with_manager(other)
        # The first host dies: its manager and its worker, with no chance to clean up.
        for doomed in (project.running_pid(first, "uniphant.manager"), pid):
            os.kill(doomed, signal.SIGKILL)
        wait_for(lambda: db.value("SELECT host_id::text FROM processes WHERE worker_id = %s::uuid", worker)
                 == host_of(other), timeout=30, what="the worker on the other host")
        wait_for(lambda: fleet(db, worker)["state"] == "running", what="its state: running")
    finally:
        other.cleanup()


def test_a_new_manager_gets_its_fair_share(project, db, tmp_path):
    other = another_host(project, tmp_path)
    try:
        with_manager(project)
        db.value("SELECT scale('test.probe', 6)")
        wait_for(lambda: db.value("SELECT count(*) FROM processes p JOIN workers w USING (worker_id)") == 6,
                 what="six workers on the first host")
        with_manager(other)
        wait_for(lambda: db.value("SELECT count(*) FROM processes WHERE host_id = %s::uuid "
                                  "AND worker_id IN (SELECT worker_id FROM workers)", host_of(other)) == 3,
                 timeout=30, what="three workers moved to the new host")
        wait_for(lambda: db.value("SELECT count(*) FROM fleet WHERE state = 'running'") == 6, what="all six")
    finally:
        other.cleanup()


def test_a_pinned_worker_waits_for_its_host(project, db):
    with_manager(project)
    elsewhere = str(uuid.uuid4())
    worker = str(db.value("SELECT add_worker('test.probe', %s::uuid)", elsewhere))
    assert fleet(db, worker)["state"] == "waiting for its host"
    assert running(db, worker) is None


def test_restart_from_sql_starts_the_worker_again_at_once(project, db):
    with_manager(project)
    worker = str(db.value("SELECT add_worker('test.probe', %s::uuid)", host_of(project)))
    pid = wait_for(lambda: running(db, worker), what="the worker")
    assert db.value("SELECT restart_worker(%s::uuid)", worker) is True
    state = wait_for(lambda: (f := fleet(db, worker))["state"] == "running" and f["pid"] not in (None, pid)
                     and f, what="the restart")
    assert state["restarts"] == 0 and state["last_exit"] == "restarted on request (its process row was deleted)"


def test_stopping_a_worker_ends_its_whole_process_group(project, db):
    project.write("workers/test/uniphant.conf", "mode=fork\nstop_timeout=0.5\n")
    with_manager(project)
    worker = str(db.value("SELECT add_worker('test.probe', %s::uuid)", host_of(project)))
    child_file = project.path("workers/test/child.pid")
    wait_for(lambda: os.path.exists(child_file) and open(child_file).read(), what="the grandchild")
    grandchild = int(open(child_file).read())
    db.value("SELECT remove_worker(%s::uuid)", worker)
    wait_for(lambda: gone(grandchild), what="the grandchild to be killed with its group")


def test_a_worker_that_lives_on_without_its_row_is_killed_and_restarted(project, db):
    project.write("workers/test/uniphant.conf", "mode=sleep\n")
    with_manager(project)
    worker = str(db.value("SELECT add_worker('test.probe', %s::uuid)", host_of(project)))
    pid = wait_for(lambda: running(db, worker), what="the worker")
    wait_for(lambda: "sleeping" in project.log(worker), what="the worker asleep in its call")
    db.rows("DELETE FROM processes WHERE worker_id = %s::uuid", worker)
    wait_for(lambda: gone(pid), timeout=30, what="the rowless worker to be killed")
    state = wait_for(lambda: (f := fleet(db, worker))["state"] == "running" and f["pid"] not in (None, pid)
                     and f, what="the restart")
    assert state["last_exit"] == "lived on without a live process row"


def test_starts_are_paced(project, db):
    with_manager(project, "starts_per_second=5\n")
    host = host_of(project)
    db.value("SELECT scale('test.probe', 6, %s::uuid)", host)
    wait_for(lambda: db.value("SELECT count(*) FROM processes WHERE host_id = %s::uuid "
                              "AND worker_id IN (SELECT worker_id FROM workers)", host) == 6,
             what="six workers")
    started = sorted(db.value("SELECT extract(epoch FROM started_at) FROM processes WHERE worker_id = %s",
                              w) for (w,) in db.rows("SELECT worker_id FROM workers"))
    assert started[-1] - started[0] >= 5 * 0.5 / 5  # five gaps of at least half of 1/5 s


@pytest.mark.faults
def test_the_manager_survives_a_database_restart_with_its_workers_untouched(private_server, tmp_path):
    project = server_project(tmp_path, "managed", private_server)
    admin = private_server.connect("uniphant")
    try:
        manager_id = with_manager(project)
        host = host_of(project)
        workers = [str(sql_rows(admin, "SELECT add_worker('test.probe', %s::uuid)", host)[0][0]) for _ in range(3)]
        wait_for(lambda: len(sql_rows(admin, "SELECT 1 FROM fleet WHERE state = 'running' AND pinned")) == 3,
                 what="three workers")
        pids = sorted(sql_rows(admin, "SELECT pid FROM processes WHERE worker_id::text = ANY(%s)", workers))
        admin.close()
        private_server.stop("fast")
        private_server.start()
        admin = private_server.connect("uniphant")
        wait_for(lambda: "database connection restored" in project.log(manager_id, "uniphant.manager"),
                 what="the manager to reconnect")
        wait_for(lambda: sorted(sql_rows(admin, "SELECT pid FROM processes WHERE worker_id::text = ANY(%s)",
                                      workers)) == pids, what="the same workers, reconnected")
        assert project.running_pid(manager_id, "uniphant.manager") is not None
        assert "ended" not in project.log(manager_id, "uniphant.manager")
    finally:
        admin.close()
        project.cleanup()


@pytest.mark.faults
def test_the_row_of_a_killed_worker_removed_while_in_backoff_goes_with_it(project, db):
    project.write("uniphant.conf", "stale_after=3\n")
    with_manager(project, "restart_delay=30\n")
    worker = str(db.value("SELECT add_worker('test.probe', %s::uuid)", host_of(project)))
    pid = None
    for kill in (1, 2):  # the first restart is at once, the second after restart_delay
        pid = wait_for(lambda: (f := fleet(db, worker)).get("state") == "running" and f["pid"] != pid
                       and f["pid"], what="the worker running")
        os.kill(pid, signal.SIGKILL)
    wait_for(lambda: fleet(db, worker).get("state") == "backoff", what="its backoff")
    assert running(db, worker) == pid  # the killed process's row: nobody removed it
    db.value("SELECT remove_worker(%s::uuid)", worker)
    wait_for(lambda: running(db, worker) is None, timeout=20, what="the dead process's row to go")


@pytest.mark.faults
def test_a_copy_that_outlived_its_manager_is_stopped_once_nobody_wants_it(project, db, tmp_path):
    other = another_host(project, tmp_path)
    for root in (project, other):
        root.write("uniphant.conf", "stale_after=3\n")
    try:
        first = with_manager(project)
        worker = str(db.value("SELECT add_worker('test.probe')"))
        pid = wait_for(lambda: running(db, worker), what="the worker on the first host")
        # The other host's manager starts its one pinned worker, then no other for a minute or more.
        with_manager(other, "starts_per_second=0.01\n")
        pinned = str(db.value("SELECT add_worker('test.probe', %s::uuid)", host_of(other)))
        wait_for(lambda: running(db, pinned), what="the other host's first start")
        os.kill(project.running_pid(first, "uniphant.manager"), signal.SIGKILL)
        # The copy looks dead for a while (frozen, its session ended): the other host claims it.
        os.kill(pid, signal.SIGSTOP)
        try:
            db.rows("SELECT pg_terminate_backend(a.pid) FROM pg_stat_activity a JOIN processes p "
                    "ON a.application_name = p.id::text WHERE p.worker_id = %s::uuid", worker)
            wait_for(lambda: fleet(db, worker).get("host_id") == host_of(other), timeout=30,
                     what="the other host to claim it")
        finally:
            os.kill(pid, signal.SIGCONT)
        wait_for(lambda: fleet(db, worker).get("state") == "moving", what="its copy back to life")
        db.value("SELECT remove_worker(%s::uuid)", worker)
        with_manager(project)  # the first host's manager comes back: the copy is its to stop
        wait_for(lambda: gone(pid), timeout=30, what="the copy nobody wants to stop")
    finally:
        other.cleanup()


def test_the_manager_removes_the_files_of_workers_gone_from_the_desired_state_after_retention(project, db):
    by_hand = str(uuid.uuid4())
    start_daemon(project, by_hand)  # running, though nobody desires it
    desired = str(db.value("SELECT add_worker('test.probe', %s::uuid)", str(uuid.uuid4())))
    gone_id, recent = str(uuid.uuid4()), str(uuid.uuid4())
    files = {}
    for worker_id, age in ((by_hand, 2), (desired, 2), (gone_id, 2), (recent, 0)):
        files[worker_id] = [project.path(f"{kind}/test.probe/{worker_id}.{kind}") for kind in ("pid", "log")]
        for path in files[worker_id]:
            if not os.path.exists(path):
                project.write(path, "")
            old = time.time() - age * 86400
            os.utime(path, (old, old))
    manager_id = with_manager(project, "file_retention=86400\n")
    wait_for(lambda: f"removed the files of worker {gone_id}" in project.log(manager_id, "uniphant.manager"),
             what="the files of a worker nobody desires to go")
    assert not any(os.path.exists(path) for path in files[gone_id])
    assert all(os.path.exists(path) for w in (by_hand, desired, recent) for path in files[w])


@pytest.mark.faults
def test_a_manager_never_dies_of_a_lost_session(project, db):
    project.write("uniphant.conf", "stale_after=3\n")
    manager_id = with_manager(project)
    manager_pid = project.running_pid(manager_id, "uniphant.manager")
    workers = [str(db.value("SELECT add_worker('test.probe', %s::uuid)", host_of(project))) for _ in range(2)]
    pids = {w: wait_for(lambda: running(db, w), what="a worker") for w in workers}
    log = lambda: project.log(manager_id, "uniphant.manager")  # noqa: E731
    for lost in range(1, 11):
        # The session goes when the manager last confirmed its row longer ago than its
        # watchdog's grace (0.45 s at stale_after 3): the scenario, not a wait for a state.
        time.sleep(1.5)
        db.rows("SELECT pg_terminate_backend(a.pid) FROM pg_stat_activity a "
                "JOIN managers m ON a.application_name = m.process_id::text")
        wait_for(lambda: log().count("database connection restored") == lost, what=f"reconnect {lost}")
    assert project.running_pid(manager_id, "uniphant.manager") == manager_pid
    assert "exiting" not in log() and "stopping" not in log()
    wait_for(lambda: all(fleet(db, w)["state"] == "running" for w in workers), what="its workers, running")
    assert {w: running(db, w) for w in workers} == pids


def read_notifications(sock, until: str, timeout: float = 15) -> list:
    """The datagrams sent to sock until one holds the line until."""
    got = []
    sock.settimeout(timeout)
    while not any(until in message.splitlines() for message in got):
        got.append(sock.recv(4096).decode())
    return got


@pytest.mark.parametrize("address", ["path", "abstract"])
def test_the_manager_speaks_sd_notify(project, db, tmp_path, address):
    import socket
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as listener:
        name = str(tmp_path / "notify") if address == "path" else f"@uniphant-test-{uuid.uuid4().hex}"
        listener.bind(name if address == "path" else "\0" + name[1:])
        os.makedirs(project.path("workers/uniphant"), exist_ok=True)
        shutil.copy(os.path.join(REPO, "workers", "uniphant", "manager.py"), project.path("workers/uniphant"))
        db.value("SELECT add_worker('test.probe', %s::uuid)", show_config(project, "host_id")[0])
        manager = project.popen(str(uuid.uuid4()), "start", "-f", script="workers/uniphant/manager.py",
                                env={"NOTIFY_SOCKET": name, "WATCHDOG_USEC": "400000"})
        first = read_notifications(listener, "READY=1")
        assert "workers running" in first[0]  # ready only after its first pass, which said so
        read_notifications(listener, "STATUS=1 of 1 workers running")
        read_notifications(listener, "WATCHDOG=1")
        manager.terminate()
        read_notifications(listener, "STOPPING=1")
        manager.communicate(timeout=15)


def test_a_foreground_worker_speaks_sd_notify(project, db, tmp_path, worker_id):
    import socket
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as listener:
        listener.bind(str(tmp_path / "notify"))
        child = project.popen(worker_id, "start", "-f", env={"NOTIFY_SOCKET": str(tmp_path / "notify")})
        read_notifications(listener, "READY=1")
        assert db.process(worker_id) is not None  # ready means registered
        child.terminate()
        read_notifications(listener, "STOPPING=1")
        child.communicate(timeout=10)


def test_a_worker_role_cannot_change_the_desired_state(db, make_role):
    role, password = make_role("worker")
    conn = session_of(db, role, password, str(uuid.uuid4()))
    try:
        with pytest.raises(pg8000.dbapi.DatabaseError) as refused:
            conn.cursor().execute("SELECT add_worker('test.probe')")
        assert refused.value.args[0]["C"] == "42501"
    finally:
        conn.close()


# ---------------------------------------------------------------------------
# The ops command: python uniphant.py
# ---------------------------------------------------------------------------

def test_ps_shows_every_state(project, db, tmp_path):
    import json
    project.write("workers/failing/uniphant.conf", "mode=raise\n")
    shutil.copy(project.path("workers/test/probe.py"), project.path("workers/failing/probe.py"))
    unplaced = str(db.value("SELECT add_worker('test.probe')"))
    lines = {line.split()[0]: line for line in ops(project, "ps").stdout.splitlines()[1:]}
    assert "unplaced" in lines[unplaced]  # no manager yet
    db.value("SELECT remove_worker(%s::uuid)", unplaced)
    manager = with_manager(project, "restart_delay=30\n")
    host = host_of(project)
    runs = str(db.value("SELECT add_worker('test.probe', %s::uuid)", host))
    fails = str(db.value("SELECT add_worker('failing.probe', %s::uuid)", host))
    waits = str(db.value("SELECT add_worker('test.probe', %s::uuid)", str(uuid.uuid4())))
    by_hand = str(uuid.uuid4())
    start_daemon(project, by_hand)
    wait_for(lambda: fleet(db, runs).get("state") == "running" and fleet(db, fails).get("state") == "backoff",
             what="a running and a failing worker")
    table = ops(project, "ps")
    assert table.returncode == 0, table.stderr
    lines = {line.split()[0]: line for line in table.stdout.splitlines()[1:]}
    assert "running" in lines[runs] and "backoff" in lines[fails] and "RuntimeError: boom" in lines[fails]
    assert "waiting for its host" in lines[waits]
    assert "not wanted" in lines[by_hand] and "manager" in lines[manager]
    listed = {row["worker_id"]: row for row in json.loads(ops(project, "ps", "--json").stdout)}
    assert listed[fails]["state"] == "backoff" and listed[fails]["next_start_in"] > 0
    assert listed[runs]["pid"] == running(db, runs) and listed[runs]["restarts"] == 0


def test_ops_commands_add_scale_restart_and_stop_workers(project, db):
    with_manager(project)
    added = ops(project, "add", "test.probe", "--host", "here")
    assert added.returncode == 0, added.stderr
    worker = added.stdout.strip()
    pid = wait_for(lambda: running(db, worker), what="the added worker")
    assert ops(project, "restart", worker).returncode == 0
    wait_for(lambda: running(db, worker) not in (None, pid), what="the restart")
    scaled = ops(project, "scale", "test.probe", "3", "--host", "here")
    assert scaled.returncode == 0 and "added 2" in scaled.stdout
    wait_for(lambda: db.value("SELECT count(*) FROM fleet WHERE state = 'running' AND pinned") == 3,
             what="three workers")
    stopped = ops(project, "stop", "test.probe")
    assert stopped.returncode == 0 and "3" in stopped.stdout
    wait_for(lambda: db.value("SELECT count(*) FROM processes p JOIN managers m ON m.process_id <> p.id "
                              "WHERE p.worker_type = 'test.probe'") == 0, what="every worker stopped")


@pytest.mark.parametrize("args, code, message", [
    (["frobnicate"], 2, "usage:"),
    (["scale", "test.probe", "lots"], 2, "N must be a whole number"),
    (["add", "test/probe"], 2, "is not a worker type"),
    (["stop", str(uuid.uuid4())], 1, "no such worker"),
    (["restart", "no.such.type"], 1, "no running, done or backing-off worker"),
    (["ps", "a.b", "c.d"], 2, "unexpected argument 'c.d'"),
    (["scale", "test.probe", "3", "4"], 2, "unexpected argument '4'"),
    (["stop", "test.probe", "test.other"], 2, "unexpected argument 'test.other'"),
])
def test_ops_commands_fail_clearly(project, db, args, code, message):
    result = ops(project, *args)
    assert_clean_error(result, code, message)


def test_ps_into_a_reader_that_has_gone_ends_quietly(project, db):
    db.value("SELECT scale('test.probe', 2000, %s::uuid)", str(uuid.uuid4()))  # far more than a pipe holds
    read_end, write_end = os.pipe()
    reader = subprocess.Popen(["head", "-n", "1"], stdin=read_end, stdout=subprocess.PIPE)
    os.close(read_end)
    ps = subprocess.run([sys.executable, os.path.join(REPO, "uniphant.py"), "-v", "ps"], cwd=project.root,
                        env=project.env, stdout=write_end, stderr=subprocess.PIPE, text=True, timeout=60)
    os.close(write_end)
    assert reader.communicate(timeout=10)[0].startswith(b"WORKER")
    assert ps.returncode == 0 and ps.stderr.startswith("uniphant.py: read from ")  # and no traceback
    assert len(ps.stderr.splitlines()) == 1


def test_the_ops_commands_outside_a_project_say_which_settings_they_use(project, db, tmp_path):
    elsewhere = tmp_path / "not_a_project"
    elsewhere.mkdir()
    result = subprocess.run([sys.executable, os.path.join(REPO, "uniphant.py"), "ps"], cwd=str(elsewhere),
                            env=project.env, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and "no project here" in result.stderr and "environment" in result.stderr


def test_ps_shows_a_workers_detail_history_and_the_last_lines_of_a_failed_run(project, db):
    project.write("workers/test/uniphant.conf", "mode=raise\n")
    with_manager(project, "restart_delay=30\n")
    worker = str(db.value("SELECT add_worker('test.probe', %s::uuid, '{\"queue\": \"mail\"}')", host_of(project)))
    wait_for(lambda: fleet(db, worker).get("state") == "backoff", what="two failed runs")
    shown = ops(project, "ps", worker)
    assert shown.returncode == 0, shown.stderr
    lines = shown.stdout.splitlines()
    assert f"worker:     {worker}" in lines and "state:      backoff" in lines and "settings:   queue=mail" in lines
    assert "last lines: (before its last run ended)" in lines
    assert any("RuntimeError: boom from the worker" in line for line in lines[lines.index("history:    (newest first)"):])
    tail = db.value("SELECT log_tail FROM fleet WHERE worker_id = %s::uuid", worker)
    assert "stopping: the worker function failed" in tail and len(tail.splitlines()) <= 20
    import json
    detail = json.loads(ops(project, "ps", worker, "--json").stdout)
    assert detail["history"][0]["state"] == "backoff" and len(detail["history"]) >= 3


def test_ps_chooses_by_type_host_and_state_and_shows_host_ids_and_placement(project, db, tmp_path):
    with_manager(project)
    pinned = str(db.value("SELECT add_worker('test.probe', %s::uuid)", host_of(project)))
    waiting = str(db.value("SELECT add_worker('test.other', %s::uuid)", str(uuid.uuid4())))
    wait_for(lambda: fleet(db, pinned).get("state") == "running", what="the pinned worker")
    by_type = ops(project, "ps", "test.probe").stdout
    assert pinned in by_type and waiting not in by_type
    by_state = ops(project, "ps", "--state", "waiting for its host").stdout
    assert waiting in by_state and pinned not in by_state
    here = ops(project, "ps", "--host", "here").stdout
    assert pinned in here and waiting not in here
    row = next(line for line in here.splitlines() if line.startswith(pinned))
    assert host_of(project)[:8] in row and "pinned" in row


def test_ps_watch_redraws_on_each_change(project, db):
    with_manager(project)
    watch = subprocess.Popen([sys.executable, os.path.join(REPO, "uniphant.py"), "ps", "--watch"], cwd=project.root,
                             env=project.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        os.set_blocking(watch.stdout.fileno(), False)
        seen = b""

        def shows(text: str) -> bool:
            nonlocal seen
            seen += watch.stdout.read() or b""
            return text.encode() in seen.rsplit(b"\x1b[2J", 1)[-1]
        wait_for(lambda: shows("WORKER"), what="the first drawing")
        worker = str(db.value("SELECT add_worker('test.probe', %s::uuid)", host_of(project)))
        wait_for(lambda: shows(worker) and shows("running"), what="the worker, drawn again as it runs")
    finally:
        watch.terminate()
        watch.communicate(timeout=10)


def test_logs_prints_a_workers_last_lines_and_follows_them_across_rotation_and_restarts(project, db):
    project.write("workers/test/uniphant.conf", "interval=0.1\n")
    with_manager(project)
    worker = str(db.value("SELECT add_worker('test.probe', %s::uuid)", host_of(project)))
    wait_for(lambda: project.log(worker).count("tick") >= 3, what="a few ticks")
    last = ops(project, "logs", worker, "-n", "2")
    assert last.returncode == 0 and len(last.stdout.splitlines()) == 2 and "tick" in last.stdout
    follow = subprocess.Popen([sys.executable, os.path.join(REPO, "uniphant.py"), "logs", "test.probe", "-f",
                               "-n", "0"], cwd=project.root, env=project.env, stdout=subprocess.PIPE)
    try:
        os.set_blocking(follow.stdout.fileno(), False)
        got = []
        read = lambda: got.append((follow.stdout.read() or b"").decode()) or "".join(got)  # noqa: E731
        wait_for(lambda: "tick" in read(), what="new lines, followed")
        log = project.path(f"log/test.probe/{worker}.log")
        os.rename(log, log + ".1")  # logrotate, then the SIGHUP it sends
        pid = running(db, worker)
        os.kill(pid, signal.SIGHUP)
        wait_for(lambda: "reopened the log file" in read(), what="the rotated log, followed")
        db.value("SELECT restart_worker(%s::uuid)", worker)
        wait_for(lambda: read().count("started: process") >= 1, what="the restarted worker, followed")
    finally:
        follow.terminate()
        follow.communicate(timeout=10)


def test_logs_of_a_worker_on_another_host_says_which_host_has_them(project, db, tmp_path):
    other = another_host(project, tmp_path)
    try:
        with_manager(other)
        worker = str(db.value("SELECT add_worker('test.probe', %s::uuid)", host_of(other)))
        wait_for(lambda: fleet(db, worker).get("state") == "running", what="the worker on the other host")
        result = ops(project, "logs", worker)
        assert result.returncode == 1 and "is on host" in result.stdout and host_of(other) in result.stdout
    finally:
        other.cleanup()


def test_a_managed_worker_without_a_log_file_logs_to_the_managers_stdout(project, db):
    project.write("workers/test/uniphant.conf", "log_file=off\n")
    os.makedirs(project.path("workers/uniphant"), exist_ok=True)
    shutil.copy(os.path.join(REPO, "workers", "uniphant", "manager.py"), project.path("workers/uniphant"))
    project.write("workers/uniphant/uniphant.conf", "log_file=off\n")
    manager = project.popen(str(uuid.uuid4()), "start", "-f", script="workers/uniphant/manager.py")
    worker = str(db.value("SELECT add_worker('test.probe', %s::uuid)", show_config(project, "host_id")[0]))
    running_pid = wait_for(lambda: running(db, worker), what="the worker")
    manager.terminate()
    out, err = manager.communicate(timeout=15)
    assert manager.returncode == 0, err
    assert f"uniphant.test.probe[{running_pid}]: worker {worker} started" in out
    assert not os.path.exists(project.path("log"))
