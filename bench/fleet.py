"""The fleet benchmark: what idle workers under uniphant's managers cost, and how
fast the managers act on the desired state.

Starts a throwaway PostgreSQL (dev/pgserver.py), durable unlike the tests' one
(fsync and synchronous_commit on, so that WAL fsyncs are real; --fast-server
keeps the tests' settings), and for each size N and each run makes a fresh
database with schema.sql, four project roots that play four hosts, a manager
started as a daemon in each (`python workers/uniphant/manager.py <uuid> start`)
and N idle any-host workers asked for in one statement,
`SELECT scale('bench.idle', N)`.  It prints one table per N, medians with min
and max over the runs and the project's goals beside them; the raw samples go
to bench/results/fleet.json, which bench/plot.py draws.

    python bench/fleet.py [--runs 3] [--sizes 50,200] [--window 20] [--crash-window 10]

Each run, in order: all N started; a steady-state window with nothing
changing; five single workers added and removed; three CLI starts of each
kind beside the fleet; a crash-looping worker on the first manager (its
restart_delay 0.1 s and restart_delay_max --crash-cap s, in that root's
workers/uniphant/uniphant.conf); then one DELETE FROM workers ends them all.

How it measures.  Nothing waits a fixed time to synchronise: each step waits
for a condition, with a deadline; only the measuring windows are fixed.
- A process row's insertion or deletion is stamped by the server as its
  transaction commits (a deferred trigger writing to an unlogged table, just
  before the commit's WAL flush and, in a transaction that notifies, before
  it waits for the global NOTIFY lock), and every write to worker_states,
  managers and hosts as it happens: the benchmark polls for the stamps, but
  the times are the stamps'.
- A process's exit is seen at once through a pidfd.
- The steady-state window lasts one heartbeat period by default (stale_after
  / 3, 20 s): every process then beats exactly once in it wherever it falls,
  whereas a window of 1.5 periods would count some workers' beats twice and
  others' once (workers started together beat together).
- Heartbeats: the UPDATEs of processes counted from pg_stat_user_tables over
  the window; and the steady rate, the sum over process rows of 1/period,
  where each row's period comes from its heartbeat_at, read twice a second
  (it holds for any window).
- WAL: records by type from pg_waldump between the window's two LSNs, bytes
  from their difference (pg_stat_wal is not used: idle sessions flush their
  statistics up to 10 s late, so it would count the start's WAL).
- CPU: from /proc over the window, as % of one core: PostgreSQL
  is the postmaster and all its children (those that ended meanwhile through
  its cutime), less the benchmark's own session; the managers; the workers.
  The machine's other load in the window (/proc/stat's busy time less all of
  that and the benchmark's) is printed too: a busy machine inflates them.
- Memory: RSS and PSS (/proc/<pid>/smaps_rollup) after the window; per worker
  and per backend, the median over them.
- For a profile, fleet.json also holds each run's calls and times of the SQL
  functions (track_functions), when DELETE FROM workers saw the processes exit
  and the rows go, and the CPU that took.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import platform
import re
import select
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from typing import Any, Callable, Dict, List, Optional, Tuple

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "dev"))
import pgserver  # noqa: E402
from lifecycle import IDLE  # noqa: E402  (bench/ is on the path: the script's own directory)

PYTHON = sys.executable
HOSTS = 4
TICKS = os.sysconf("SC_CLK_TCK")
RESTART_DELAY = 0.1    # the crash-looping worker's manager: restart_delay
SINGLES = 5            # single workers added and removed, per run
CLI_STARTS = 3         # CLI starts of each kind, per run

CRASH = """\
from uniphant import main

def work(config, logger, connection):
    raise RuntimeError("crash-looping on purpose")

if __name__ == "__main__":
    main(work)
"""

# Stamps each process row that appears or goes, as its transaction commits (a
# deferred trigger fires just before the commit's WAL flush, and before a
# transaction that notifies queues for the global NOTIFY lock), and every write
# of the managers' tables as it happens.  Unlogged: the stamps write no WAL.
# Kept small: they run inside the transactions they time.
STAMPS = """
CREATE UNLOGGED TABLE bench_events (
    at            timestamptz NOT NULL DEFAULT clock_timestamp(),
    tbl           text NOT NULL,
    op            text NOT NULL,
    worker_id     uuid,
    worker_type   text,
    state         text,
    next_start_at timestamptz
);
CREATE FUNCTION bench_process() RETURNS trigger LANGUAGE plpgsql SET search_path = public AS $$
BEGIN
    IF TG_OP = 'DELETE' THEN
        INSERT INTO bench_events (tbl, op, worker_id, worker_type)
        VALUES ('processes', TG_OP, OLD.worker_id, OLD.worker_type);
    ELSE
        INSERT INTO bench_events (tbl, op, worker_id, worker_type)
        VALUES ('processes', TG_OP, NEW.worker_id, NEW.worker_type);
    END IF;
    RETURN NULL;
END $$;
CREATE FUNCTION bench_state() RETURNS trigger LANGUAGE plpgsql SET search_path = public AS $$
BEGIN
    IF TG_OP = 'DELETE' THEN
        INSERT INTO bench_events (tbl, op, worker_id) VALUES ('worker_states', TG_OP, OLD.worker_id);
    ELSE
        INSERT INTO bench_events (tbl, op, worker_id, state, next_start_at)
        VALUES ('worker_states', TG_OP, NEW.worker_id, NEW.state, NEW.next_start_at);
    END IF;
    RETURN NULL;
END $$;
CREATE FUNCTION bench_write() RETURNS trigger LANGUAGE plpgsql SET search_path = public AS $$
BEGIN
    INSERT INTO bench_events (tbl, op) VALUES (TG_TABLE_NAME, TG_OP);
    RETURN NULL;
END $$;
CREATE CONSTRAINT TRIGGER bench_processes AFTER INSERT OR DELETE ON processes
    DEFERRABLE INITIALLY DEFERRED FOR EACH ROW EXECUTE FUNCTION bench_process();
CREATE TRIGGER bench_worker_states AFTER INSERT OR UPDATE OR DELETE ON worker_states
    FOR EACH ROW EXECUTE FUNCTION bench_state();
CREATE TRIGGER bench_managers AFTER INSERT OR UPDATE OR DELETE ON managers
    FOR EACH ROW EXECUTE FUNCTION bench_write();
CREATE TRIGGER bench_hosts AFTER INSERT OR UPDATE OR DELETE ON hosts
    FOR EACH ROW EXECUTE FUNCTION bench_write();
"""

MANAGER_TABLES = ("worker_states", "managers", "hosts")

# (key, label, unit, decimals, goal); a row with no label starts a section.
# A goal is (operator, bound); "=" holds only when every run met it.
Measure = Tuple[str, Optional[str], str, int, Optional[Tuple[str, float]]]
MEASURES: List[Measure] = [
    ("Starting and stopping", None, "", 0, None),
    ("start_all", "scale({n}) in one statement -> all {n} registered", "s", 2, ("<=", 5)),
    ("insert_one", "one row inserted -> registered, by a manager", "ms", 1, ("<=", 100)),
    ("delete_one", "one row deleted -> its process exited", "ms", 1, ("<=", 50)),
    ("delete_all", "DELETE FROM workers -> all {n} processes exited", "ms", 1, ("<=", 400)),
    ("cli_daemon_wall", "CLI start (daemon): command wall time", "ms", 1, None),
    ("cli_daemon_row", "CLI start (daemon): until the row exists", "ms", 1, None),
    ("cli_foreground_row", "CLI start -f: until the row exists", "ms", 1, None),
    ("Steady state: {n} idle workers, nothing changing", None, "", 0, None),
    ("heartbeats_counted", "heartbeat UPDATEs of processes, counted", "/s", 2, ("<=", 10)),
    ("heartbeats_steady", "heartbeat UPDATEs, steady (sum of 1/period)", "/s", 2, ("<=", 10)),
    ("heartbeat_period", "heartbeat period of a process row", "s", 1, None),
    ("wal_records", "WAL records", "/s", 1, None),
    ("wal_commits", "WAL commit records (each a WAL fsync, if durable)", "/s", 2, None),
    ("wal_kb", "WAL bytes", "kB/s", 2, None),
    ("manager_writes", "managers' writes: worker_states, managers, hosts", "/s", 2, ("=", 0)),
    ("process_churn", "process rows inserted or deleted", "/s", 2, ("=", 0)),
    ("pg_cpu", "PostgreSQL CPU, all server processes", "% core", 2, ("<", 2)),
    ("managers_cpu", f"managers' CPU, all {HOSTS}", "% core", 2, None),
    ("workers_cpu", "workers' CPU, all {n}", "% core", 2, None),
    ("worker_rss", "RSS per idle worker", "MB", 1, None),
    ("worker_pss", "PSS per idle worker", "MB", 1, ("<=", 8)),
    ("backend_rss", "RSS per worker's backend", "MB", 1, None),
    ("backend_pss", "PSS per worker's backend", "MB", 1, None),
    ("manager_pss", "PSS per manager", "MB", 1, None),
    ("connections", "server connections (client backends)", "", 0, None),
    ("Crash loop: one worker whose function raises, on one manager", None, "", 0, None),
    ("crash_rate", "restarts/min at the short cap", "/min", 1, None),
    ("crash_delay", "delay chosen at the short cap", "s", 2, None),
    ("crash_gap", "exit -> registered again, at the short cap", "s", 2, None),
    ("crash_first_restart", "first restart (no delay): exit -> registered", "ms", 1, None),
    ("crash_run", "one crashing run: registered -> its row gone", "ms", 1, None),
    ("crash_rate_default", "restarts/min at the default cap (formula)", "/min", 2, None),
    ("crash_pg_cpu", "PostgreSQL CPU during the crash loop", "% core", 1, None),
    ("crash_manager_cpu", "its manager's CPU, with its crashing children", "% core", 1, None),
    ("crash_writes", "managers' writes per restart", "", 1, None),
]


class BenchError(Exception):
    """The benchmark could not go on; the message says why."""


def _wait_until(condition: Callable[[], Any], timeout: float, what: str, every: float = 0.02) -> Any:
    """condition()'s first true value, asked every `every` seconds until timeout."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise BenchError(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(every)


def _wait_exits(pidfds: Dict[int, str], timeout: float) -> Dict[str, float]:
    """The time.monotonic() at which each process (pidfd -> key) exited."""
    poller = select.poll()
    for fd in pidfds:
        poller.register(fd, select.POLLIN)
    deadline = time.monotonic() + timeout
    exited: Dict[str, float] = {}
    while len(exited) < len(pidfds):
        left = deadline - time.monotonic()
        if left <= 0:
            raise BenchError(f"timed out after {timeout:g} s: {len(pidfds) - len(exited)} "
                             f"of {len(pidfds)} processes still running")
        for fd, _ in poller.poll(left * 1000):
            exited[pidfds[fd]] = time.monotonic()
            poller.unregister(fd)
    return exited


# ---------------------------------------------------------------------------
# /proc
# ---------------------------------------------------------------------------

def _stat(pid: int) -> List[str]:
    """The fields of /proc/<pid>/stat after the command name: [0] is field 3 (state)."""
    with open(f"/proc/{pid}/stat") as f:
        return f.read().rsplit(")", 1)[1].split()


def _cpu(pid: int, reaped: bool = False) -> float:
    """CPU seconds of pid's threads, and with reaped those of its children that have
    ended and been reaped (cutime+cstime).

    A live process is read from schedstat, in nanoseconds: /proc/<pid>/stat
    truncates each process's utime and stime to 10 ms ticks, while an ended
    child adds its exact time to the parent's cutime, so that ticks would count
    hundreds of ending processes seconds too high.
    """
    total = 0
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return 0.0
    for task in tasks:
        try:
            with open(f"/proc/{pid}/task/{task}/schedstat") as f:
                total += int(f.read().split()[0])
        except (OSError, ValueError, IndexError):
            pass  # the thread has ended
    seconds = total / 1e9
    if reaped:
        try:
            fields = _stat(pid)
        except (FileNotFoundError, ProcessLookupError):
            return seconds
        seconds += (int(fields[13]) + int(fields[14])) / TICKS
    return seconds


def _machine_cpu() -> Tuple[float, float]:
    """(busy, stolen) CPU seconds of the whole machine so far, from /proc/stat."""
    with open("/proc/stat") as f:
        fields = [int(x) for x in f.readline().split()[1:9]]
    user, nice, system, _, _, irq, softirq, steal = fields
    return (user + nice + system + irq + softirq) / TICKS, steal / TICKS


def _children(parent: int) -> List[int]:
    found = []
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                if int(_stat(int(name))[1]) == parent:
                    found.append(int(name))
            except (FileNotFoundError, ProcessLookupError, IndexError):
                pass
    return found


def _server_cpu(postmaster: int, exclude: int) -> float:
    """CPU seconds of the whole server: the postmaster, its children (the ended ones
    through its cutime) but not the session `exclude`."""
    return _cpu(postmaster, reaped=True) + sum(
        _cpu(pid) for pid in _children(postmaster) if pid != exclude)


def _memory_mb(pid: int) -> Optional[Tuple[float, float]]:
    """(RSS, PSS) of pid in MB, from smaps_rollup; None if it is gone or unreadable."""
    rss = pss = None
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                if line.startswith("Rss:"):
                    rss = int(line.split()[1]) / 1024
                elif line.startswith("Pss:"):
                    pss = int(line.split()[1]) / 1024
    except OSError:
        return None
    return (rss, pss) if rss is not None and pss is not None else None


_WALDUMP_ROW = re.compile(r"^(\S+)\s+(\d+)\s+\(\s*[\d.]+\)\s+(\d+)\s+\(")


def _waldump(server: pgserver.Server, start: str, end: str) -> Optional[Dict[str, Tuple[int, int]]]:
    """The WAL records written from LSN start to end, by type: (count, bytes); exact,
    unlike pg_stat_wal, which idle sessions flush up to 10 s late.  None if
    pg_waldump cannot tell."""
    if start == end:
        return {}
    try:
        result = subprocess.run([os.path.join(server.bindir, "pg_waldump"), "--stats=record",
                                 "-p", os.path.join(server.data, "pg_wal"), "-s", start, "-e", end],
                                capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired):
        return None
    if result.returncode:
        return None
    types = {}
    for line in result.stdout.splitlines():
        match = _WALDUMP_ROW.match(line)
        if match and match.group(1) != "Total":
            types[match.group(1)] = (int(match.group(2)), int(match.group(3)))
    return types


def _processes_in(directory: str) -> List[Tuple[int, str]]:
    """(PID, working directory) of every process working below directory."""
    found = []
    prefix = directory.rstrip("/") + "/"
    for name in os.listdir("/proc"):
        if not name.isdigit() or int(name) == os.getpid():
            continue
        try:
            cwd = os.readlink(f"/proc/{name}/cwd").replace(" (deleted)", "")
        except OSError:
            continue
        if cwd == directory or cwd.startswith(prefix):
            found.append((int(name), cwd))
    return found


def _fleet_root(root: str, files: Dict[str, str]) -> None:
    """A project root for a benchmark's fleet: files (its path below root: its text),
    and the manager's script."""
    for relative, text in files.items():
        path = os.path.join(root, relative)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "w") as f:
            f.write(text)
    os.makedirs(os.path.join(root, "workers", "uniphant"), exist_ok=True)
    shutil.copy(os.path.join(REPO, "workers", "uniphant", "manager.py"), os.path.join(root, "workers", "uniphant"))


def _end_processes_in(directory: str) -> int:
    """End everything this benchmark started below directory: the managers first
    (SIGTERM: they stop their workers), then SIGKILL to whatever is left.
    Returns how many processes were there."""
    there = _processes_in(directory)
    managers = [pid for pid, cwd in there if cwd.endswith(os.path.join("workers", "uniphant"))]
    for pid in managers:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + 15
    while managers and time.monotonic() < deadline and _processes_in(directory):
        time.sleep(0.05)
    deadline = time.monotonic() + 15
    while True:
        left = _processes_in(directory)
        if not left:
            return len(there)
        if time.monotonic() > deadline:
            print(f"bench: could not end PIDs {', '.join(str(p) for p, _ in left)}", file=sys.stderr)
            return len(there)
        for pid, _ in left:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        time.sleep(0.02)


# ---------------------------------------------------------------------------
# One run
# ---------------------------------------------------------------------------

class Run:
    """One run at one size: a fresh database, HOSTS project roots, a manager in each."""

    def __init__(self, server: pgserver.Server, base: str, n: int, number: int,
                 args: argparse.Namespace) -> None:
        self.server = server
        self.n = n
        self.args = args
        self.database = f"fleet_{n}_{number}"
        self.dir = tempfile.mkdtemp(prefix=f"n{n}-run{number}-", dir=base)
        self.roots = [os.path.join(self.dir, f"host{i}") for i in range(HOSTS)]
        self.env = {k: v for k, v in os.environ.items()
                    if not k.startswith("PG") and k not in (
                        "PYTHONDONTWRITEBYTECODE", "UNIPHANT_STATE_DIR", "NOTIFY_SOCKET",
                        "WATCHDOG_USEC", "WATCHDOG_PID")}
        self.env.update(server.env(self.database), PYTHONPATH=REPO, HOME=self.dir)
        self.db = None
        self.backend = 0
        self.managers: List[str] = []   # the managers' worker ids, one per root
        self.hosts: List[str] = []      # the roots' host ids
        self.samples: Dict[str, List[float]] = {}
        self.details: Dict[str, Any] = {"n": n, "run": number}

    # -- SQL ---------------------------------------------------------------

    def rows(self, query: str, *params: Any) -> list:
        cursor = self.db.cursor()
        cursor.execute(query, params)
        return cursor.fetchall() if cursor.description else []

    def value(self, query: str, *params: Any) -> Any:
        rows = self.rows(query, *params)
        return rows[0][0] if rows else None

    def registered_at(self, worker_id: str) -> Optional[float]:
        """When worker_id's first process row became visible (epoch seconds), or None."""
        return self.value("SELECT extract(epoch FROM min(at))::float8 FROM bench_events "
                          "WHERE tbl = 'processes' AND op = 'INSERT' AND worker_id = %s::uuid",
                          worker_id)

    def wait_registered(self, worker_id: str, what: str) -> float:
        return _wait_until(lambda: self.registered_at(worker_id), 30, what, every=0.01)

    def pids(self, worker_type: str) -> Dict[str, int]:
        """worker id -> PID of the live process rows of worker_type."""
        return {str(w): p for w, p in self.rows(
            "SELECT worker_id, pid FROM processes WHERE worker_type = %s", worker_type)}

    def table_stats(self) -> Dict[str, Dict[str, int]]:
        return {name: dict(ins=ins, upd=upd, hot_upd=hot, dele=dele) for name, ins, upd, hot, dele in self.rows(
            "SELECT relname, n_tup_ins, n_tup_upd, n_tup_hot_upd, n_tup_del FROM pg_stat_user_tables "
            "WHERE relname IN ('processes', 'worker_states', 'managers', 'hosts', 'workers')")}

    def wal(self) -> Dict[str, Any]:
        lsn, syncs = self.rows("SELECT pg_current_wal_lsn()::text, (SELECT wal_sync FROM pg_stat_wal)")[0]
        return dict(lsn=lsn, syncs=syncs)

    def manager_writes(self, since: float, until: float) -> int:
        return self.value("SELECT count(*) FROM bench_events WHERE tbl = ANY(%s) "
                          "AND at BETWEEN to_timestamp(%s) AND to_timestamp(%s)",
                          list(MANAGER_TABLES), since, until)

    def add(self, key: str, value: float) -> None:
        self.samples.setdefault(key, []).append(value)

    # -- setting up and tearing down ---------------------------------------

    def setup(self) -> None:
        self.server.create_database(self.database)
        self.db = self.server.connect(self.database)
        self.db.execute_simple(STAMPS)
        self.backend = self.value("SELECT pg_backend_pid()")
        for i, root in enumerate(self.roots):
            files = {"workers/bench/idle.py": IDLE, "workers/bench/crash.py": CRASH}
            if i == 0:  # the crash loop's manager: a short backoff cap
                files["workers/uniphant/uniphant.conf"] = (f"restart_delay={RESTART_DELAY:g}\n"
                                                           f"restart_delay_max={self.args.crash_cap:g}\n")
            _fleet_root(root, files)
        self.managers = [str(uuid.uuid4()) for _ in self.roots]
        starts = [subprocess.Popen([PYTHON, "workers/uniphant/manager.py", manager, "start"], cwd=root,
                                   env=self.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                  for root, manager in zip(self.roots, self.managers)]
        for start in starts:
            out, err = start.communicate(timeout=60)
            if start.returncode:
                raise BenchError(f"a manager did not start (exit {start.returncode}): "
                                 f"{(err or out).strip()}")
        for root in self.roots:
            with open(os.path.join(root, ".host_id")) as f:
                self.hosts.append(f.read().strip())
        _wait_until(lambda: self.value("SELECT count(*) FROM managers m JOIN processes p "
                                       "ON p.id = m.process_id") == HOSTS, 30, "the managers to register")

    def teardown(self) -> None:
        """Stop the managers as an operator would (each stops its workers), end
        anything left, drop the database."""
        if self.managers:
            stops = [subprocess.Popen([PYTHON, "workers/uniphant/manager.py", manager, "stop"], cwd=root,
                                      env=self.env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                     for root, manager in zip(self.roots, self.managers)]
            for stop in stops:
                with contextlib.suppress(subprocess.TimeoutExpired):
                    stop.wait(timeout=60)
        left = _end_processes_in(self.dir)
        if self.db is not None:  # every session has ended, so flushed its statistics
            self.details["functions"] = {name: [calls, round(total, 1), round(own, 1)]
                                         for name, calls, total, own in self.rows(
                "SELECT funcname, calls, total_time, self_time FROM pg_stat_user_functions "
                "WHERE funcname NOT LIKE 'bench%%' ORDER BY total_time DESC")}
        if left:
            self.details["left_running_after_stop"] = left
            print(f"bench: {left} processes were still running after the managers stopped",
                  file=sys.stderr)
        if self.db is not None:
            self.db.close()
            self.db = None
            conn = self.server.connect()
            try:
                conn.cursor().execute(f'DROP DATABASE IF EXISTS "{self.database}" WITH (FORCE)')
            finally:
                conn.close()
        shutil.rmtree(self.dir, ignore_errors=True)

    # -- the measurements, in the order they run ---------------------------

    def start_all(self) -> None:
        """One statement asks for N workers: until all N have registered."""
        def registered() -> Optional[float]:
            count, last = self.rows(
                "SELECT count(*), extract(epoch FROM max(first))::float8 FROM ("
                "SELECT min(at) AS first FROM bench_events WHERE tbl = 'processes' AND op = 'INSERT' "
                "AND worker_type = 'bench.idle' GROUP BY worker_id) s")[0]
            return last if count >= self.n else None

        started = time.time()
        self.value("SELECT scale('bench.idle', %s)", self.n)
        last = _wait_until(registered, 30 + self.n * 0.5, f"all {self.n} workers to register", every=0.05)
        self.add("start_all", last - started)
        first = self.value("SELECT extract(epoch FROM min(at))::float8 FROM bench_events "
                           "WHERE tbl = 'processes' AND op = 'INSERT' AND worker_type = 'bench.idle'")
        self.details["first_registered_s"] = first - started
        _wait_until(lambda: self.value("SELECT count(*) FROM fleet WHERE worker_type = 'bench.idle' "
                                       "AND state = 'running'") == self.n,
                    30, "the managers to report all workers running", every=0.05)
        self.details["all_reported_running_s"] = time.time() - started
        spread = dict(self.rows("SELECT host_id::text, count(*) FROM processes "
                                "WHERE worker_type = 'bench.idle' GROUP BY 1"))
        self.details["placement"] = [spread.get(host, 0) for host in self.hosts]

    def steady(self) -> None:
        """The steady-state window: nothing changes, what does it cost?"""
        workers = list(self.pids("bench.idle").values())
        managers = list(self.pids("uniphant.manager").values())
        with open(os.path.join(self.server.data, "postmaster.pid")) as f:
            postmaster = int(f.readline())
        stats0, wal0 = self.table_stats(), self.wal()
        beats: Dict[str, set] = {}
        since = time.time()
        cpu0 = (_server_cpu(postmaster, self.backend), sum(map(_cpu, managers)), sum(map(_cpu, workers)))
        machine0, own0 = _machine_cpu(), sum(os.times()[:2])
        started = time.monotonic()
        end = started + self.args.window
        while True:
            for process_id, at in self.rows("SELECT id::text, extract(epoch FROM heartbeat_at)::float8 "
                                            "FROM processes"):
                beats.setdefault(process_id, set()).add(at)
            left = end - time.monotonic()
            if left <= 0:
                break
            time.sleep(min(0.5, left))
        cpu1 = (_server_cpu(postmaster, self.backend), sum(map(_cpu, managers)), sum(map(_cpu, workers)))
        machine1, own1 = _machine_cpu(), sum(os.times()[:2])
        elapsed = time.monotonic() - started
        until = time.time()
        stats1, wal1 = self.table_stats(), self.wal()

        def delta(table: str, key: str) -> int:
            return stats1.get(table, {}).get(key, 0) - stats0.get(table, {}).get(key, 0)

        self.add("heartbeats_counted", delta("processes", "upd") / elapsed)
        periods, bounds = [], []
        for process_id, times in beats.items():
            times = sorted(times)
            if len(times) >= 2:
                periods.append(statistics.median(b - a for a, b in zip(times, times[1:])))
            else:  # no heartbeat in the window: its period is longer than since its last one
                bounds.append(until - times[0])
        self.add("heartbeats_steady", sum(1 / p for p in periods) + sum(1 / b for b in bounds))
        unseen = len(bounds)
        if periods:
            self.add("heartbeat_period", statistics.median(periods))
        # Their share of heartbeats_steady is an upper bound.
        self.details["rows_without_a_heartbeat_in_the_window"] = unseen
        lsn_bytes = self.value("SELECT pg_wal_lsn_diff(%s::pg_lsn, %s::pg_lsn)::float8", wal1["lsn"], wal0["lsn"])
        self.add("wal_kb", lsn_bytes / 1024 / elapsed)
        records = _waldump(self.server, wal0["lsn"], wal1["lsn"])
        if records is not None:
            self.add("wal_records", sum(count for count, _ in records.values()) / elapsed)
            self.add("wal_commits", records.get("Transaction/COMMIT", (0, 0))[0] / elapsed)
            self.details["wal_record_types"] = records
        # Lags: an idle session flushes its statistics up to 10 s late.
        self.details["wal_sync_per_s_pg_stat_wal"] = (wal1["syncs"] - wal0["syncs"]) / elapsed
        self.add("manager_writes", self.manager_writes(since, until) / elapsed)
        churn = self.value("SELECT count(*) FROM bench_events WHERE tbl = 'processes' "
                           "AND at BETWEEN to_timestamp(%s) AND to_timestamp(%s)", since, until)
        self.add("process_churn", churn / elapsed)
        for key, before, after in zip(("pg_cpu", "managers_cpu", "workers_cpu"), cpu0, cpu1):
            self.add(key, (after - before) / elapsed * 100)
        self.details["steady_window_s"] = elapsed
        # What else ran on the machine meanwhile: its busy time less everything above
        # and the benchmark's own (its session included); and the VM's stolen time.
        ours = sum(after - before for before, after in zip(cpu0, cpu1)) + (own1 - own0)
        self.details["other_load_pct"] = ((machine1[0] - machine0[0]) - ours) / elapsed * 100
        self.details["steal_pct"] = (machine1[1] - machine0[1]) / elapsed * 100
        self.details["table_stats_delta"] = {t: {k: delta(t, k) for k in ("ins", "upd", "hot_upd", "dele")}
                                             for t in stats1}

        # Memory, after the window so that reading it costs the window nothing.
        def medians(pids: List[int], rss_key: str, pss_key: str) -> None:
            sizes = [m for m in map(_memory_mb, pids) if m is not None]
            if sizes:
                self.add(rss_key, statistics.median(s[0] for s in sizes))
                self.add(pss_key, statistics.median(s[1] for s in sizes))
                self.details[f"{pss_key}_max"] = max(s[1] for s in sizes)

        medians(workers, "worker_rss", "worker_pss")
        backends = [pid for (pid,) in self.rows(
            "SELECT a.pid FROM pg_stat_activity a JOIN processes p ON a.application_name = p.id::text "
            "WHERE p.worker_type = 'bench.idle'")]
        medians(backends, "backend_rss", "backend_pss")
        medians(managers, "manager_rss", "manager_pss")
        self.add("connections", self.value("SELECT count(*) FROM pg_stat_activity "
                                           "WHERE backend_type = 'client backend' AND pid <> pg_backend_pid()"))

    def singles(self) -> None:
        """One worker added (any host) until registered; removed until its process exits."""
        for _ in range(SINGLES):
            started = time.time()
            worker = str(self.value("SELECT add_worker('bench.idle')"))
            self.add("insert_one", (self.wait_registered(worker, "the added worker to register") - started) * 1000)
            _wait_until(lambda: self.value("SELECT state FROM fleet WHERE worker_id = %s::uuid", worker)
                        == "running", 30, "the added worker to be reported running", every=0.01)
            pidfd = os.pidfd_open(self.value("SELECT pid FROM processes WHERE worker_id = %s::uuid", worker))
            try:
                started = time.monotonic()
                self.value("SELECT remove_worker(%s::uuid)", worker)
                exited = _wait_exits({pidfd: worker}, 30)[worker]
            finally:
                os.close(pidfd)
            self.add("delete_one", (exited - started) * 1000)
            _wait_until(lambda: self.value("SELECT count(*) FROM worker_states WHERE worker_id = %s::uuid",
                                           worker) == 0, 30, "the removed worker to be forgotten", every=0.01)

    def cli(self) -> None:
        """Workers started by hand beside the fleet, in the first root."""
        root = self.roots[0]

        def command(worker: str, *args: str) -> List[str]:
            return [PYTHON, "workers/bench/idle.py", worker, *args]

        for _ in range(CLI_STARTS):
            worker = str(uuid.uuid4())
            started, clock = time.time(), time.monotonic()
            result = subprocess.run(command(worker, "start"), cwd=root, env=self.env,
                                    capture_output=True, text=True, timeout=60)
            wall = time.monotonic() - clock
            if result.returncode:
                raise BenchError(f"start failed (exit {result.returncode}): {result.stderr.strip()}")
            self.add("cli_daemon_wall", wall * 1000)
            self.add("cli_daemon_row", (self.wait_registered(worker, "the daemon's row") - started) * 1000)
            stop = subprocess.run(command(worker, "stop"), cwd=root, env=self.env,
                                  capture_output=True, text=True, timeout=60)
            if stop.returncode:
                raise BenchError(f"stop failed (exit {stop.returncode}): {stop.stderr.strip()}")

            worker = str(uuid.uuid4())
            started = time.time()
            child = subprocess.Popen(command(worker, "start", "-f"), cwd=root, env=self.env,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            try:
                self.add("cli_foreground_row",
                         (self.wait_registered(worker, "the foreground worker's row") - started) * 1000)
            finally:
                child.terminate()
                child.wait(timeout=30)

    def crash_loop(self, default_cap: float) -> None:
        """A worker that always fails, pinned to the first root, whose manager has a
        short backoff cap: restarts once the delays are at the cap, and what they cost."""
        cap = self.args.crash_cap
        at_cap = 2 + math.ceil(math.log2(cap / RESTART_DELAY))  # the first failure whose delay is the cap
        worker = str(self.value("SELECT add_worker('bench.crash', %s::uuid)", self.hosts[0]))

        def stamps(op: str) -> List[float]:
            return [at for (at,) in self.rows(
                "SELECT extract(epoch FROM at)::float8 FROM bench_events WHERE tbl = 'processes' "
                "AND op = %s AND worker_id = %s::uuid ORDER BY at", op, worker)]

        _wait_until(lambda: len(stamps("INSERT")) > at_cap, 60,
                    "the crash-looping worker to reach its backoff cap", every=0.05)
        with open(os.path.join(self.server.data, "postmaster.pid")) as f:
            postmaster = int(f.readline())
        manager = self.pids("uniphant.manager")[self.managers[0]]
        since = time.time()
        cpu0 = (_server_cpu(postmaster, self.backend), _cpu(manager, reaped=True))
        started = time.monotonic()
        time.sleep(self.args.crash_window)  # the measuring window
        cpu1 = (_server_cpu(postmaster, self.backend), _cpu(manager, reaped=True))
        elapsed = time.monotonic() - started
        until = time.time()
        self.value("SELECT remove_worker(%s::uuid)", worker)

        registered, removed = stamps("INSERT"), stamps("DELETE")
        capped = registered[at_cap:]  # each after a delay at the cap
        if len(capped) >= 2:
            self.add("crash_rate", (len(capped) - 1) / (capped[-1] - capped[0]) * 60)
        # Run k (0-based) ends with removed[k]; run k+1 is registered[k+1].
        gaps = [b - a for a, b in zip(removed, registered[1:])]
        if gaps:
            self.add("crash_first_restart", gaps[0] * 1000)
        for gap in gaps[at_cap - 1:]:
            self.add("crash_gap", gap)
        runs = [b - a for a, b in zip(registered, removed)]
        for run in runs:
            self.add("crash_run", run * 1000)
        # The delays the manager chose, from the backoff states it wrote.
        ordered = [d for (d,) in self.rows(
            "SELECT extract(epoch FROM next_start_at - min(at))::float8 FROM bench_events "
            "WHERE tbl = 'worker_states' AND worker_id = %s::uuid AND state = 'backoff' "
            "GROUP BY next_start_at ORDER BY next_start_at", worker)]
        # The k-th backoff (0-based) follows failure k+2: failure 1 restarts at once.
        for delay in ordered[at_cap - 2:]:
            self.add("crash_delay", delay)
        self.details["crash_delays_s"] = ordered
        # At the default cap, by the formula: the jitter draws each delay from the
        # upper half of the cap (a mean of 3/4 of it), plus what a cycle costs
        # besides the delay (a run, and the restart's own latency).
        if gaps and runs:
            overhead = statistics.median(runs) + gaps[0]
            self.add("crash_rate_default", 60 / (0.75 * default_cap + overhead))
            self.details["crash_cycle_overhead_s"] = overhead
            self.details["crash_rate_short_cap_formula"] = 60 / (0.75 * cap + overhead)
        self.add("crash_pg_cpu", (cpu1[0] - cpu0[0]) / elapsed * 100)
        self.add("crash_manager_cpu", (cpu1[1] - cpu0[1]) / elapsed * 100)
        in_window = len([t for t in registered if since <= t <= until])
        if in_window:
            self.add("crash_writes", self.manager_writes(since, until) / in_window)
        self.details["crash_restarts_in_window"] = in_window
        _wait_until(lambda: self.value(
            "SELECT (SELECT count(*) FROM worker_states WHERE worker_id = %s::uuid) "
            "+ (SELECT count(*) FROM processes WHERE worker_id = %s::uuid)", worker, worker) == 0,
            30, "the crash-looping worker to be stopped and forgotten", every=0.02)

    def delete_all(self) -> None:
        """One statement removes every worker: until every process has exited."""
        pidfds = {}
        managers = list(self.pids("uniphant.manager").values())
        with open(os.path.join(self.server.data, "postmaster.pid")) as f:
            postmaster = int(f.readline())
        try:
            for worker, pid in self.pids("bench.idle").items():
                pidfds[os.pidfd_open(pid)] = worker
            workers = [pid for pid in self.pids("bench.idle").values()]
            cpu0 = (_server_cpu(postmaster, self.backend),
                    sum(_cpu(m, reaped=True) for m in managers) + sum(map(_cpu, workers)))
            since, started = time.time(), time.monotonic()
            self.rows("DELETE FROM workers")
            exited = _wait_exits(pidfds, 60)
            cpu1 = (_server_cpu(postmaster, self.backend),
                    sum(_cpu(m, reaped=True) for m in managers) + sum(map(_cpu, workers)))
        finally:
            for fd in pidfds:
                os.close(fd)
        times = sorted((t - started) * 1000 for t in exited.values())
        self.add("delete_all", times[-1])
        # Where the time goes: when the exits and the row removals came, and the CPU
        # they took (the managers' includes their workers', reaped meanwhile).
        removed = sorted((at - since) * 1000 for (at,) in self.rows(
            "SELECT extract(epoch FROM at)::float8 FROM bench_events WHERE tbl = 'processes' "
            "AND op = 'DELETE' AND worker_type = 'bench.idle' AND at >= to_timestamp(%s)", since))
        self.details["delete_all"] = {
            "exits_ms": {f"p{q}": times[min(len(times) - 1, len(times) * q // 100)] for q in (0, 10, 50, 90)},
            "rows_removed_ms": {f"p{q}": removed[min(len(removed) - 1, len(removed) * q // 100)]
                                for q in (0, 10, 50, 90, 100)} if removed else {},
            "cpu_s": {"postgresql": cpu1[0] - cpu0[0], "managers_and_workers": cpu1[1] - cpu0[1]},
            "wall_s": (time.monotonic() - started)}


def run_once(server: pgserver.Server, base: str, n: int, number: int, args: argparse.Namespace,
             default_cap: float) -> Run:
    run = Run(server, base, n, number, args)
    try:
        run.setup()
        steps = (("start all", run.start_all), ("steady state", run.steady), ("single workers", run.singles),
                 ("CLI starts", run.cli), ("crash loop", lambda: run.crash_loop(default_cap)),
                 ("delete all", run.delete_all))
        for name, step in steps:
            print(f"  N={n} run {number}: {name}", file=sys.stderr, flush=True)
            step()
    finally:
        with pgserver.interrupts_deferred():
            run.teardown()
    return run


# ---------------------------------------------------------------------------
# Reporting
# ---------------------------------------------------------------------------

def _machine(server: pgserver.Server, args: argparse.Namespace) -> Dict[str, str]:
    model = "unknown"
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    conn = server.connect()
    try:
        cursor = conn.cursor()
        cursor.execute("SELECT current_setting('server_version'), current_setting('fsync'), "
                       "current_setting('synchronous_commit')")
        version, fsync, synchronous_commit = cursor.fetchone()
    finally:
        conn.close()
    return {"cpu": model, "cores": str(os.cpu_count()), "python": platform.python_version(),
            "postgresql": version, "kernel": platform.release(),
            "server": f"fsync={fsync}, synchronous_commit={synchronous_commit}, Unix socket"}


def _revision() -> str:
    """The commit measured, and whether the runtime had uncommitted changes."""
    def git(*args: str) -> str:
        try:
            return subprocess.run(["git", "-C", REPO, *args], capture_output=True, text=True,
                                  timeout=30).stdout.rstrip("\n")
        except (OSError, subprocess.TimeoutExpired):
            return ""
    head = git("rev-parse", "--short", "HEAD").strip() or "unknown"
    changed = [line[3:] for line in git("status", "--porcelain", "--", "uniphant.py", "schema.sql",
                                        "workers/uniphant/manager.py").splitlines()]
    return head + (f" + uncommitted changes to {', '.join(changed)}" if changed else "")


def _goal_text(goal: Optional[Tuple[str, float]]) -> str:
    if goal is None:
        return ""
    operator, bound = goal
    return f"{'' if operator == '=' else operator + ' '}{bound:g}"


def _met(goal: Tuple[str, float], samples: List[float]) -> bool:
    operator, bound = goal
    median = statistics.median(samples)
    if operator == "<=":
        return median <= bound
    if operator == "<":
        return median < bound
    return all(s == bound for s in samples)


def _summarise(runs: List[Run]) -> List[Dict[str, Any]]:
    rows = []
    for key, label, unit, _, goal in MEASURES:
        if label is None:
            continue
        samples = [s for run in runs for s in run.samples.get(key, [])]
        if not samples:
            continue
        rows.append({"key": key, "measure": label, "unit": unit, "median": statistics.median(samples),
                     "min": min(samples), "max": max(samples), "goal": _goal_text(goal),
                     "met": None if goal is None else _met(goal, samples), "samples": samples})
    return rows


def _print_table(n: int, runs: List[Run], rows: List[Dict[str, Any]], args: argparse.Namespace,
                 default_cap: float) -> None:
    by_key = {row["key"]: row for row in rows}
    print(f"\nN = {n} idle any-host workers on {HOSTS} managers: {len(runs)} run{'s' * (len(runs) > 1)}, "
          f"steady window {args.window:g} s, crash window {args.crash_window:g} s "
          f"(short cap {args.crash_cap:g} s, default cap {default_cap:g} s)\n")
    width = 62
    print(f"| {'measure':<{width}} | {'median':>8} | {'min':>8} | {'max':>8} | {'goal':>10} |")
    print(f"|{'-' * (width + 2)}|{'-' * 9}:|{'-' * 9}:|{'-' * 9}:|{'-' * 11}:|")
    for key, label, unit, decimals, _ in MEASURES:
        if label is None:
            print(f"| {'**' + key.format(n=n) + '**':<{width}} | {'':>8} | {'':>8} | {'':>8} | {'':>10} |")
            continue
        row = by_key.get(key)
        if row is None:
            continue
        name = label.format(n=n) + (f" ({unit})" if unit else "")
        verdict = "" if row["met"] is None else ("ok" if row["met"] else "MISSED")
        goal = f"{row['goal']} {verdict}".strip()
        print(f"| {name:<{width}} | {row['median']:8.{decimals}f} | {row['min']:8.{decimals}f} | "
              f"{row['max']:8.{decimals}f} | {goal:>10} |")
    placements = sorted({"/".join(map(str, run.details.get("placement", []))) for run in runs})
    print(f"\nplacement per host: {', '.join(placements)}; first of the {n} registered after "
          + ", ".join(f"{run.details['first_registered_s']:.2f}" for run in runs if "first_registered_s" in run.details)
          + " s; all reported running after "
          + ", ".join(f"{run.details['all_reported_running_s']:.2f}" for run in runs
                      if "all_reported_running_s" in run.details) + " s")
    overheads = [run.details["crash_cycle_overhead_s"] for run in runs if "crash_cycle_overhead_s" in run.details]
    if overheads:
        short = [run.details["crash_rate_short_cap_formula"] for run in runs
                 if "crash_rate_short_cap_formula" in run.details]
        print(f"crash loop: besides its delay a cycle takes {statistics.median(overheads):.3f} s (a run, and a "
              f"restart with no delay); 60 / (0.75 x cap + that) predicts {statistics.median(short):.1f}/min "
              f"at the short cap, to compare with the measured, and gives the default cap's line")
    others = [run.details["other_load_pct"] for run in runs if "other_load_pct" in run.details]
    if others:
        steal = [run.details["steal_pct"] for run in runs if "steal_pct" in run.details]
        print(f"other load on the machine during the steady windows: "
              f"{', '.join(f'{o:.1f}' for o in others)} % of a core (stolen by the host: "
              f"{', '.join(f'{x:.1f}' for x in steal)} %)"
              + ("; the CPU figures of runs with more than 5 % are disturbed" if max(others) > 5 else ""))
    slow = [s for run in runs for s in run.samples.get("insert_one", []) if s > 1000]
    if slow:
        count = sum(len(run.samples.get("insert_one", [])) for run in runs)
        print(f"single inserts that took over 1 s: {len(slow)} of {count} "
              f"({', '.join(f'{s:.0f}' for s in slow)} ms)")
    for run in runs:
        d = run.details.get("delete_all")
        if d:
            exits, rows = d["exits_ms"], d["rows_removed_ms"]
            print(f"delete all, run {run.details['run']}: processes exited from {exits['p0']:.0f} ms "
                  f"(median {exits['p50']:.0f}, 90% by {exits['p90']:.0f}); rows removed from "
                  f"{rows.get('p0', 0):.0f} to {rows.get('p100', 0):.0f} ms; CPU meanwhile: PostgreSQL "
                  f"{d['cpu_s']['postgresql']:.2f} s, managers and workers {d['cpu_s']['managers_and_workers']:.2f} s")
    left = [run.details.get("left_running_after_stop", 0) for run in runs]
    if any(left):
        print(f"WARNING: processes left running after the managers' clean stop: {left} per run")


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=3, help="runs per size (default 3)")
    parser.add_argument("--sizes", default="50,200", help="numbers of idle workers (default 50,200)")
    parser.add_argument("--window", type=float, default=None,
                        help="seconds of the steady-state window (default: one heartbeat period, "
                             "stale_after / 3, 20 s by default)")
    parser.add_argument("--crash-window", type=float, default=10.0,
                        help="seconds the crash loop is watched at its cap (default 10)")
    parser.add_argument("--crash-cap", type=float, default=1.0,
                        help="restart_delay_max of the crash loop's manager, seconds (default 1)")
    parser.add_argument("--fast-server", action="store_true",
                        help="the tests' server settings: fsync and synchronous_commit off")
    args = parser.parse_args(argv)
    try:
        sizes = [int(s) for s in args.sizes.split(",") if s.strip()]
    except ValueError:
        parser.error("--sizes: a comma-separated list of whole numbers")
    try:
        import uniphant
        default_cap = float(uniphant.RUNTIME_DEFAULTS["restart_delay_max"])
        stale_after = float(uniphant.RUNTIME_DEFAULTS["stale_after"])
    except (ImportError, AttributeError, KeyError):
        default_cap, stale_after = 60.0, 60.0
    if args.window is None:
        args.window = stale_after / 3
    if not sizes or min(sizes) < 1 or args.runs < 1 or args.window <= 0 or args.crash_window <= 0 \
            or args.crash_cap <= RESTART_DELAY:
        parser.error(f"sizes and runs must be at least 1, windows above 0, --crash-cap above {RESTART_DELAY}")
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, signal.default_int_handler)  # end as Ctrl-C does: everything cleaned up

    server = None
    base = tempfile.mkdtemp(prefix="uniphant-fleet-")
    results: Dict[int, List[Run]] = {}
    try:
        try:
            server = pgserver.Server()
            server.init()
            with open(os.path.join(server.data, "postgresql.conf"), "a") as f:
                # track_functions: the run's calls of each SQL function, a profile in fleet.json.
                f.write(f"max_connections = {max(300, max(sizes) + 60)}\ntrack_functions = 'pl'\n")
                if not args.fast_server:
                    f.write("fsync = on\nsynchronous_commit = on\nfull_page_writes = on\n")
            server.start()
        except pgserver.ServerError as e:
            print(f"bench: the throwaway PostgreSQL could not be started: {e}", file=sys.stderr)
            return 1
        machine = _machine(server, args)
        # Compile uniphant.py once, as an installed copy would be.
        subprocess.run([PYTHON, "-c", "import uniphant"], cwd=base, env=dict(
            {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}, PYTHONPATH=REPO),
            check=True)
        for n in sizes:
            for number in range(1, args.runs + 1):
                results.setdefault(n, []).append(run_once(server, base, n, number, args, default_cap))
    except BenchError as e:
        print(f"bench: {e}", file=sys.stderr)
        return 1
    finally:
        with pgserver.interrupts_deferred():
            _end_processes_in(base)
            if server is not None:
                server.destroy()
            shutil.rmtree(base, ignore_errors=True)

    revision = _revision()
    print(f"\nuniphant fleet benchmark at {revision}; {machine['cpu']}, {machine['cores']} cores, "
          f"Python {machine['python']}, PostgreSQL {machine['postgresql']} ({machine['server']})")
    sizes_out = []
    for n, runs in results.items():
        rows = _summarise(runs)
        _print_table(n, runs, rows, args, default_cap)
        sizes_out.append({"n": n, "rows": rows, "runs": [dict(run.details, samples=run.samples) for run in runs]})
    out = os.path.join(REPO, "bench", "results", "fleet.json")
    os.makedirs(os.path.dirname(out), exist_ok=True)
    with open(out, "w") as f:
        json.dump({"machine": machine, "revision": revision, "hosts": HOSTS,
                   "settings": {"runs": args.runs, "sizes": sizes, "window_s": args.window,
                                "crash_window_s": args.crash_window, "crash_cap_s": args.crash_cap,
                                "crash_restart_delay_s": RESTART_DELAY, "default_cap_s": default_cap},
                   "sizes": sizes_out}, f, indent=1)
    print(f"\nsamples: {os.path.relpath(out, REPO)}; plot: python bench/plot.py")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:  # everything is gone already (main's finally)
        print("bench: interrupted", file=sys.stderr)
        sys.exit(130)
