"""The chaos soak: a fleet under random faults for a given time, then four checks.

A benchmark, not a test: it runs real managers and workers against a real
PostgreSQL (dev/pgserver.py), breaks things at random for --seconds, lets the
fleet settle and then judges what happened.  It prints the faults it injected,
each check's result with the evidence of every violation, and how long the
fleet took to settle; exit status 0 when every check passed, 1 when one
failed (or the soak could not run).

    python bench/chaos.py [--seconds 600] [--seed N] [--settle-timeout 60] [--verbose]

The fleet: three project roots that play three hosts (each a copy of a
project with workers/uniphant/manager.py, the soak's worker and a
uniphant.conf with stale_after=6), one manager per root started as a daemon
(`python workers/uniphant/manager.py <uuid> start`), 36 any-host workers asked
for with `scale()` and one worker pinned to each root.  The soak's worker
records every call in a table of the harness: its worker id, its process id,
its PID, its root, and the server's clock_timestamp().

The faults, drawn with the seed from a shuffled deck (so that each kind comes
up in every stretch of some 30 s): kill -9 of a worker; kill -9 of a manager
(started again after a moment, as systemd would); SIGSTOP of a worker or a
manager for 1 to 5 s; pg_terminate_backend() of 1 to 4 uniphant sessions; a
PostgreSQL restart, fast or immediate, down for up to 2 s; restart_worker()
and restart_workers() from SQL; scale() up and down.  A manager that exits
without having been killed is started again too (and is a violation).

The checks, after the faults stop:
1. No worker id ever had two copies at work: two processes of one worker id
   whose recorded calls overlap in time (on the server's clock) are a
   violation; a handover (the first copy's last call before the second's
   first) is not.
2. Nothing is orphaned: every process below the roots is a manager or a
   worker with a live process row that a desired worker (or the root's
   manager) accounts for; no process row whose process is gone outlives
   stale_after (plus a heartbeat period and a reading of the plan); no worker
   process lacks a row.
3. No manager exited on its own: a manager process that ended without the
   harness killing it, or a manager log line saying it stopped or exited, is
   a violation (the harness sends managers no SIGTERM until the end).
4. Every desired worker runs: within --settle-timeout of the faults' end
   every row of `workers` is `running` in the `fleet` view, with a live
   process row whose PID holds the worker's PID-file lock on its host, and
   every root has its manager.

The server keeps the tests' fsync=off (an immediate shutdown is no crash of
the machine: written WAL survives) but synchronous_commit=on, as a
production server has it, so that an immediate shutdown loses no commit that
uniphant did not choose to make asynchronous.  The managers' backoff cap is
5 s (restart_delay_max) so that a worker killed many times settles within
seconds rather than a minute.

A JSON report goes to bench/results/chaos.json; after a failed run the
roots' logs and the server log are copied to bench/results/chaos-logs/.
"""

from __future__ import annotations

import argparse
import contextlib
import heapq
import json
import os
import random
import re
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from typing import Any, Callable, Dict, List, Optional, Set, Tuple

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "dev"))
import pgserver  # noqa: E402
from fleet import BenchError, _end_processes_in, _fleet_root, _processes_in, _revision  # noqa: E402

import uniphant  # noqa: E402  (dev/setup makes this tree's copy importable)

PYTHON = sys.executable
ROOTS = 3
ANY_HOST = 36               # any-host workers, asked for with scale()
PINNED = 1                  # workers pinned to each root
SCALE_RANGE = (30, 42)      # scale() faults pick the number of any-host workers from this range
STALE_AFTER = 6.0
WORKER_INTERVAL = 0.25      # seconds between the soak worker's calls: the resolution of check 1
RESTART_DELAY_MAX = 5.0     # the managers' backoff cap
PLAN_EVERY = float(getattr(uniphant, "_PLAN_EVERY", 5.0))  # how often a manager reads its plan unprompted
HEARTBEAT = 0.35 * STALE_AFTER
FAULT_GAP = (0.5, 2.5)      # seconds between two faults
PAUSE = (1.0, 5.0)          # seconds a SIGSTOP lasts
DOWNTIME = (0.2, 2.0)       # seconds PostgreSQL stays down in a restart
MANAGER_RESTART = (0.5, 2.0)  # seconds before a killed manager is started again
SYSTEMD_RESTART = 1.0       # seconds before a manager that exited on its own, or failed to start, is started again
START_TIMEOUT = 60.0        # seconds a manager's `start` command may take
SETUP_TIMEOUT = 90.0        # seconds the fleet has to start
PROGRESS_EVERY = 10.0
# A process row whose process is gone must be gone once its heartbeat is this old:
# stale_after after the death, which came at most a heartbeat period after the last
# heartbeat, and a plan period for a manager to act on it.
STALE_ROW_AGE = STALE_AFTER + HEARTBEAT + PLAN_EVERY + 1.0
ORPHAN_TIMEOUT = STALE_ROW_AGE + 3.0

WORKER_TYPE = "chaos.worker"
MANAGER_TYPE = "uniphant.manager"
DATABASE = "chaos"

# Every SQL name the harness uses, in one place.  UNIPHANT is the schema that
# schema.sql puts uniphant's objects in; CALLS and EVENTS are the harness's own
# tables, and EVENT its trigger function.
UNIPHANT = "uniphant"
CALLS = "public.chaos_calls"
EVENTS = "public.chaos_events"
EVENT = "public.chaos_event"
_UUID = "'^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$'"
_NAMES = {"{u}": UNIPHANT, "{calls}": CALLS, "{events}": EVENTS, "{event}": EVENT, "{uuid}": _UUID}


def _sql(text: str) -> str:
    for name, value in _NAMES.items():
        text = text.replace(name, value)
    return text


SQL: Dict[str, str] = {key: _sql(text) for key, text in {
    # The harness's tables; logged, so that an immediate shutdown keeps them.
    "create_calls": "CREATE TABLE {calls} (worker_id uuid NOT NULL, process_id uuid NOT NULL, "
                    "pid integer NOT NULL, root text NOT NULL, "
                    "at timestamptz NOT NULL DEFAULT clock_timestamp())",
    # The history of the desired state, of the managers' records and of the process
    # rows (their heartbeats left out), each change stamped by the server's clock
    # with the session that made it: the evidence behind checks 2 and 4.
    "create_events": """
        CREATE TABLE {events} (
            at         timestamptz NOT NULL DEFAULT clock_timestamp(),
            by         text NOT NULL DEFAULT current_setting('application_name'),
            tbl        text NOT NULL,
            op         text NOT NULL,
            worker_id  uuid,
            host_id    uuid,
            state      text,
            pid        integer,
            process_id uuid,
            worker_type text);
        CREATE FUNCTION {event}() RETURNS trigger LANGUAGE plpgsql AS $$
        DECLARE
            r jsonb := to_jsonb(CASE WHEN TG_OP = 'DELETE' THEN OLD ELSE NEW END);
        BEGIN
            INSERT INTO {events} (tbl, op, worker_id, host_id, state, pid, process_id, worker_type)
            VALUES (TG_TABLE_NAME, TG_OP, (r->>'worker_id')::uuid, (r->>'host_id')::uuid, r->>'state',
                    (r->>'pid')::integer, CASE WHEN TG_TABLE_NAME = 'processes' THEN (r->>'id')::uuid END,
                    r->>'worker_type');
            RETURN NULL;
        END $$;
        CREATE TRIGGER chaos_processes AFTER INSERT OR DELETE ON {u}.processes
            FOR EACH ROW EXECUTE FUNCTION {event}();
        CREATE TRIGGER chaos_worker_states AFTER INSERT OR UPDATE OR DELETE ON {u}.worker_states
            FOR EACH ROW EXECUTE FUNCTION {event}();
        CREATE TRIGGER chaos_workers AFTER INSERT OR UPDATE OR DELETE ON {u}.workers
            FOR EACH ROW EXECUTE FUNCTION {event}();""",
    # Who is who: each process id that registered, with its type and host.
    "registered": "SELECT process_id::text, worker_type, host_id::text, pid FROM {events} "
                  "WHERE tbl = 'processes' AND op = 'INSERT'",
    "history": "SELECT extract(epoch FROM at)::float8, by, tbl, op, host_id::text, state, pid, "
               "process_id::text FROM {events} WHERE worker_id = %s::uuid ORDER BY at DESC LIMIT %s",
    # The soak worker's one statement (format paramstyle: the worker's connection).
    "record_call": "INSERT INTO {calls} (worker_id, process_id, pid, root) VALUES (%s, %s, %s, %s)",
    "scale": "SELECT {u}.scale(%s, %s)",
    "scale_pinned": "SELECT {u}.scale(%s, %s, %s::uuid)",
    "restart_worker": "SELECT {u}.restart_worker(%s::uuid)",
    "restart_workers": "SELECT {u}.restart_workers(%s)",
    "desired": "SELECT worker_id::text FROM {u}.workers WHERE worker_type = %s ORDER BY 1",
    "desired_count": "SELECT count(*) FROM {u}.workers",
    "live_managers": "SELECT count(*) FROM {u}.managers m JOIN {u}.processes p ON p.id = m.process_id "
                     "WHERE p.heartbeat_at >= now() - p.stale_after OR EXISTS (SELECT 1 FROM "
                     "pg_stat_activity a WHERE a.application_name = p.id::text)",
    "sessions": "SELECT a.pid, a.application_name, p.worker_type, p.worker_id::text, p.host_id::text "
                "FROM pg_stat_activity a LEFT JOIN {u}.processes p ON p.id::text = a.application_name "
                "WHERE a.application_name ~ {uuid} AND a.pid <> pg_backend_pid() "
                "ORDER BY a.application_name, a.pid",
    "terminate": "SELECT pg_terminate_backend(%s)",
    # One row per desired worker, as the fleet view reports it.
    "fleet": "SELECT w.worker_id::text, w.worker_type, w.host_id::text, f.state, f.pid, f.host_id::text, "
             "f.last_exit FROM {u}.workers w LEFT JOIN {u}.fleet f ON f.worker_id = w.worker_id ORDER BY 1",
    # Every process row with what the checks need of it.
    "processes": "SELECT p.id::text, p.worker_id::text, p.worker_type, p.host_id::text, p.pid, "
                 "extract(epoch FROM now() - p.heartbeat_at)::float8, "
                 "extract(epoch FROM p.stale_after)::float8, "
                 "EXISTS (SELECT 1 FROM pg_stat_activity a WHERE a.application_name = p.id::text), "
                 "EXISTS (SELECT 1 FROM {u}.workers w WHERE w.worker_id = p.worker_id), "
                 "m.host_id::text FROM {u}.processes p "
                 "LEFT JOIN {u}.managers m ON m.process_id = p.id ORDER BY 2",
    "calls_total": "SELECT count(*), count(DISTINCT process_id), count(DISTINCT worker_id) FROM {calls}",
    # Pairs of processes of one worker whose spans of calls overlap, each pair once.
    "overlaps": "WITH spans AS (SELECT worker_id, process_id, min(pid) AS pid, min(root) AS root, "
                "min(at) AS first, max(at) AS last, count(*) AS calls FROM {calls} "
                "GROUP BY worker_id, process_id) "
                "SELECT a.worker_id::text, a.process_id::text, a.pid, a.root, "
                "extract(epoch FROM a.first)::float8, extract(epoch FROM a.last)::float8, a.calls, "
                "b.process_id::text, b.pid, b.root, extract(epoch FROM b.first)::float8, "
                "extract(epoch FROM b.last)::float8, b.calls "
                "FROM spans a JOIN spans b ON a.worker_id = b.worker_id AND a.process_id <> b.process_id "
                "AND (a.first, a.process_id) < (b.first, b.process_id) AND b.first <= a.last "
                "ORDER BY a.first",
    # The calls of two processes of a worker around the moment they overlapped.
    "calls_between": "SELECT process_id::text, pid, extract(epoch FROM at)::float8 FROM {calls} "
                     "WHERE worker_id = %s::uuid AND process_id IN (%s::uuid, %s::uuid) "
                     "AND at BETWEEN to_timestamp(%s) AND to_timestamp(%s) ORDER BY at LIMIT 12",
}.items()}

WORKER = '''\
"""The chaos soak's worker: each call records that this process was at work,
on the database server's clock."""

import os

from uniphant import main


def work(config, logger, connection):
    connection.cursor().execute(
        "{record_call}",
        (config["worker_id"], config["process_id"], os.getpid(), config["root_dir"]))


if __name__ == "__main__":
    main(work)
'''.replace("{record_call}", SQL["record_call"])

# key: (label, how many of it a deck holds)
FAULTS: Dict[str, Tuple[str, int]] = {
    "kill_worker": ("kill -9 of a worker", 4),
    "kill_manager": ("kill -9 of a manager (started again after 0.5-2 s)", 2),
    "stop_worker": ("SIGSTOP of a worker, SIGCONT after 1-5 s", 3),
    "stop_manager": ("SIGSTOP of a manager, SIGCONT after 1-5 s", 1),
    "terminate": ("pg_terminate_backend() of 1-4 uniphant sessions", 3),
    "pg_fast": ("PostgreSQL restart, fast (down 0.2-2 s)", 1),
    "pg_immediate": ("PostgreSQL restart, immediate (down 0.2-2 s)", 1),
    "restart_worker": ("restart_worker() of one worker", 2),
    "restart_workers": (f"restart_workers('{WORKER_TYPE}'): all of them", 1),
    "scale": (f"scale() of the any-host workers to {SCALE_RANGE[0]}-{SCALE_RANGE[1]}", 2),
}

_LOG_LINE = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d),(\d{3}) (\w+) (\S+)\[(\d+)\]: (.*)$")
_IDS = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")


def _printable(text: str, limit: int = 400) -> str:
    """Text from a log or the database, safe for a terminal: control characters escaped."""
    text = "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)
    return text if len(text) <= limit else text[:limit] + "..."


def _short(worker_id: Optional[str]) -> str:
    return (worker_id or "?")[:8]


def _holder(pid_file: str) -> Optional[int]:
    """The PID holding pid_file's lock (the kernel says), or None."""
    try:
        return uniphant.get_pid_for_running_process(pid_file)
    except (OSError, uniphant.UniphantError):
        return None


def _process_id_in(pid_file: str) -> Optional[str]:
    """The process id its holder wrote on the PID file's second line."""
    try:
        with open(pid_file, encoding="ascii", errors="replace") as f:
            lines = f.read(200).splitlines()
    except OSError:
        return None
    return lines[1] if len(lines) > 1 and uniphant.is_valid_uuid(lines[1]) else None


def _cwd(pid: int) -> Optional[str]:
    try:
        return os.readlink(f"/proc/{pid}/cwd").replace(" (deleted)", "")
    except OSError:
        return None


def _inside(path: Optional[str], directory: str) -> bool:
    return path is not None and (path == directory or path.startswith(directory.rstrip("/") + "/"))


def _describe_process(pid: int) -> str:
    """A process's state and command line, for evidence."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            state = f.read().rsplit(")", 1)[1].split()[0]
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            command = f.read().replace(b"\0", b" ").decode("utf-8", "replace").strip()
    except OSError:
        return "gone"
    return f"state {state}, {_printable(command, 160)}"


class Db:
    """The harness's own session; it reconnects after a restart of the server."""

    def __init__(self, server: pgserver.Server) -> None:
        self.server = server
        self.conn: Any = None

    def rows(self, sql: str, *params: Any) -> List[tuple]:
        for attempt in (1, 2):
            try:
                if self.conn is None:
                    self.conn = self.server.connect(DATABASE, application_name="chaos-harness")
                cursor = self.conn.cursor()
                cursor.execute(sql, params)
                return [tuple(r) for r in cursor.fetchall()] if cursor.description else []
            except Exception as e:
                if attempt == 2 or not _lost(e):
                    raise
                self.close()
        raise AssertionError("unreachable")

    def value(self, sql: str, *params: Any) -> Any:
        rows = self.rows(sql, *params)
        return rows[0][0] if rows else None

    def close(self) -> None:
        if self.conn is not None:
            with contextlib.suppress(Exception):
                self.conn.close()
            self.conn = None


def _lost(error: BaseException) -> bool:
    """Whether error means the session is gone (rather than a statement failed)."""
    import pg8000.dbapi

    if isinstance(error, (OSError, pg8000.dbapi.InterfaceError)):
        return True
    fields = error.args[0] if error.args and isinstance(error.args[0], dict) else {}
    return str(fields.get("C", "")).startswith(("57P", "08"))


def _sql_error(error: BaseException) -> str:
    fields = error.args[0] if error.args and isinstance(error.args[0], dict) else {}
    return _printable(f"{fields.get('M')} ({fields.get('C')})" if fields else str(error), 200)


class Root:
    """A project root that plays a host, and what the harness knows of its manager."""

    def __init__(self, index: int, path: str, manager_id: str) -> None:
        self.name = f"host{index}"
        self.path = path
        self.manager_id = manager_id
        self.host_id = ""
        self.manager_pid: Optional[int] = None
        self.manager_fd: Optional[int] = None      # a pidfd of the manager, readable once it exits
        self.killed = False                        # the harness sent this manager SIGKILL
        self.starting: Optional[subprocess.Popen] = None
        self.start_began = 0.0

    def pid_file(self, worker_type: str, worker_id: str) -> str:
        return os.path.join(self.path, "pid", worker_type, f"{worker_id}.pid")

    def manager_log(self) -> str:
        return os.path.join(self.path, "log", MANAGER_TYPE, f"{self.manager_id}.log")

    def workers(self) -> Dict[str, int]:
        """worker id -> PID of every worker process here that holds its PID-file lock."""
        found = {}
        directory = os.path.join(self.path, "pid", WORKER_TYPE)
        try:
            names = sorted(os.listdir(directory))
        except OSError:
            return found
        for name in names:
            if name.endswith(".pid"):
                pid = _holder(os.path.join(directory, name))
                if pid is not None:
                    found[name[:-4]] = pid
        return found

    def manager_holder(self) -> Optional[int]:
        return _holder(self.pid_file(MANAGER_TYPE, self.manager_id))


class Soak:
    """One soak: the server, the roots, the faults, the checks and the report."""

    def __init__(self, args: argparse.Namespace, base: str) -> None:
        self.args = args
        self.rng = random.Random(args.seed)
        self.base = base
        self.server: Optional[pgserver.Server] = None
        self.db: Optional[Db] = None
        self.roots: List[Root] = []
        self.env: Dict[str, str] = {}
        self.t0 = time.monotonic()            # the faults' start (set again then)
        self.t0_wall = time.time()
        self.timeline: List[Tuple[float, str, str]] = []
        self.counts: Dict[str, int] = {key: 0 for key in FAULTS}
        self.skipped: Dict[str, int] = {}
        self.harness: Dict[str, float] = {"sessions terminated": 0, "managers started again": 0,
                                          "manager starts that failed": 0, "PostgreSQL down (s)": 0.0}
        self.start_failures: List[str] = []
        self.stopped: Dict[int, int] = {}      # pidfd -> PID of each process the harness holds stopped
        self.events: List[Tuple[float, int, Callable[[], None]]] = []
        self.sequence = 0
        self.server_up = True
        self.down_since = 0.0
        self.deck: List[str] = []
        self.unexpected_exits: List[Dict[str, Any]] = []
        self.violations: Dict[int, List[Dict[str, Any]]] = {1: [], 2: [], 3: [], 4: []}
        self.notes: Dict[int, str] = {}
        self.timings: Dict[str, Optional[float]] = {}

    # -- time and the timeline -----------------------------------------------

    def now(self) -> float:
        """Seconds since the faults began."""
        return time.monotonic() - self.t0

    def at(self, epoch: float) -> float:
        """A wall-clock (or the server's clock) time, in seconds since the faults began."""
        return epoch - self.t0_wall

    def note(self, kind: str, detail: str) -> None:
        self.timeline.append((self.now(), kind, detail))
        if self.args.verbose:
            print(f"chaos: t{self.now():+8.2f} s  {kind}: {detail}", file=sys.stderr, flush=True)

    def schedule(self, delay: float, action: Callable[[], None]) -> None:
        self.sequence += 1
        heapq.heappush(self.events, (time.monotonic() + delay, self.sequence, action))

    def run_due(self, everything: bool = False) -> None:
        while self.events and (everything or self.events[0][0] <= time.monotonic()):
            _, _, action = heapq.heappop(self.events)
            action()

    # -- setting up ------------------------------------------------------------

    def setup(self) -> None:
        started = time.monotonic()
        try:
            self.server = pgserver.Server()
            # The Unix socket only: while the server is down in a restart, a TCP port of
            # its could be taken by another program, and the restart would fail.
            self.server.init(settings="synchronous_commit = on\nmax_connections = 200\nlisten_addresses = ''\n")
            self.server.start()
            self.server.create_database(DATABASE)
        except pgserver.ServerError as e:
            raise BenchError(f"the throwaway PostgreSQL could not be started: {e}") from None
        self.db = Db(self.server)
        self.db.rows(SQL["create_calls"])
        self.db.conn.execute_simple(SQL["create_events"])
        self.env = {k: v for k, v in os.environ.items()
                    if not k.startswith("PG") and k not in (
                        "PYTHONDONTWRITEBYTECODE", "UNIPHANT_STATE_DIR", "NOTIFY_SOCKET",
                        "WATCHDOG_USEC", "WATCHDOG_PID")}
        self.env.update(self.server.env(DATABASE), PYTHONPATH=REPO, HOME=self.base)
        # Compile uniphant.py once, as an installed copy would be.
        subprocess.run([PYTHON, "-c", "import uniphant"], cwd=self.base, env=self.env, check=True)
        for i in range(ROOTS):
            root = Root(i, os.path.join(self.base, f"host{i}"), str(uuid.UUID(int=self.rng.getrandbits(128),
                                                                                version=4)))
            self._write_project(root.path)
            self.roots.append(root)
        for root in self.roots:
            self.start_manager(root)
        deadline = time.monotonic() + SETUP_TIMEOUT
        while any(root.starting for root in self.roots):
            self.watch_managers()
            if time.monotonic() > deadline:
                raise BenchError("the managers did not start")
            time.sleep(0.02)
        if any(root.manager_pid is None for root in self.roots):
            raise BenchError("a manager did not start: " + "; ".join(self.start_failures))
        for root in self.roots:
            with open(os.path.join(root.path, ".host_id")) as f:
                root.host_id = f.read().strip()
        self._wait(lambda: self.db.value(SQL["live_managers"]) == ROOTS, SETUP_TIMEOUT,
                   "the managers to register")
        self.db.rows(SQL["scale"], WORKER_TYPE, ANY_HOST)
        for root in self.roots:
            self.db.rows(SQL["scale_pinned"], WORKER_TYPE, PINNED, root.host_id)
        self._wait(lambda: not self.unsettled(), SETUP_TIMEOUT, "every desired worker to run")
        self.timings["setup"] = time.monotonic() - started

    def _write_project(self, root: str) -> None:
        files = {
            "uniphant.conf": f"stale_after = {STALE_AFTER:g}\n",
            "workers/uniphant/uniphant.conf": f"restart_delay_max = {RESTART_DELAY_MAX:g}\n",
            "workers/chaos/uniphant.conf": f"interval = {WORKER_INTERVAL:g}\n",
            "workers/chaos/worker.py": WORKER,
        }
        _fleet_root(root, files)

    def _wait(self, condition: Callable[[], Any], timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while not condition():
            self.watch_managers()
            if time.monotonic() > deadline:
                problems = self.unsettled()
                raise BenchError(f"timed out after {timeout:g} s waiting for {what}"
                                 + (": " + "; ".join(p for p, _ in problems[:5]) if problems else ""))
            time.sleep(0.1)

    # -- the managers, supervised as systemd would -----------------------------

    def start_manager(self, root: Root) -> None:
        """Run the manager's `start` command; watch_managers() sees how it went."""
        root.start_began = time.monotonic()
        root.starting = subprocess.Popen(
            [PYTHON, "workers/uniphant/manager.py", root.manager_id, "start"], cwd=root.path,
            env=self.env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            text=True, errors="replace", start_new_session=True)

    def watch_managers(self) -> None:
        """Take note of finished `start` commands and of managers that exited."""
        for root in self.roots:
            child = root.starting
            if child is not None:
                if child.poll() is None:
                    if time.monotonic() - root.start_began > START_TIMEOUT:
                        with contextlib.suppress(ProcessLookupError):
                            os.killpg(child.pid, signal.SIGKILL)
                        child.communicate()
                        root.starting = None
                        self._start_failed(root, f"the start command took over {START_TIMEOUT:g} s")
                    continue
                out, err = child.communicate()
                root.starting = None
                match = re.search(r"started with PID (\d+)", out)
                if child.returncode or not match:
                    said = (err or out).strip().splitlines()
                    self._start_failed(root, said[-1] if said else f"exit status {child.returncode}")
                    continue
                pid = int(match.group(1))
                root.killed = False
                try:
                    root.manager_fd = os.pidfd_open(pid)
                    root.manager_pid = pid
                except ProcessLookupError:
                    root.manager_pid = pid
                    self._manager_exited(root, pid)
                    continue
                self.note("manager started", f"{root.name}: PID {pid}")
            if root.manager_fd is not None and select.select([root.manager_fd], [], [], 0)[0]:
                pid = root.manager_pid
                os.close(root.manager_fd)
                root.manager_fd = None
                assert pid is not None
                if root.killed:
                    continue  # its restart is scheduled already
                self._manager_exited(root, pid)

    def _start_failed(self, root: Root, why: str) -> None:
        self.harness["manager starts that failed"] += 1
        self.start_failures.append(f"t{self.now():+.1f} s {root.name}: {_printable(why, 200)}")
        self.note("manager start failed", f"{root.name}: {_printable(why, 200)}")
        self.schedule(SYSTEMD_RESTART, lambda: self._restart(root))

    def _manager_exited(self, root: Root, pid: int) -> None:
        """A manager ended without the harness killing it: check 3's violation; start it again."""
        self.note("MANAGER EXITED ON ITS OWN", f"{root.name}: PID {pid}")
        self.unexpected_exits.append({"root": root.name, "pid": pid, "t": self.now()})
        self.schedule(SYSTEMD_RESTART, lambda: self._restart(root))

    def _restart(self, root: Root) -> None:
        if root.starting is not None or root.manager_fd is not None:
            return
        self.harness["managers started again"] += 1
        self.start_manager(root)

    # -- the faults --------------------------------------------------------------

    def _draw(self) -> str:
        if not self.deck:
            self.deck = [key for key, (_, n) in FAULTS.items() for _ in range(n)]
            self.rng.shuffle(self.deck)
        return self.deck.pop()

    def inject(self) -> None:
        """One fault, drawn from the deck."""
        kind = self._draw()
        action = getattr(self, f"fault_{kind}")
        try:
            done = action()
        except Exception as e:  # the server refused the statement, or the session broke
            if not type(e).__module__.startswith("pg8000") and not isinstance(e, OSError):
                raise
            done = f"failed: {_sql_error(e)}"
        if done is None:
            self.counts[kind] += 1
        else:
            self.skipped[kind] = self.skipped.get(kind, 0) + 1
            self.note(f"skipped {kind}", done)

    def _workers(self) -> List[Tuple[Root, str, int]]:
        return [(root, worker_id, pid) for root in self.roots for worker_id, pid in root.workers().items()]

    def _signal(self, root: Root, pid: int, pid_file: str, sig: int) -> Optional[int]:
        """Send sig to pid if it still holds pid_file's lock and works below root; its
        pidfd (for SIGCONT later), or None if it was not there any more."""
        try:
            fd = os.pidfd_open(pid)
        except ProcessLookupError:
            return None
        # The pidfd pins the process: checked now, the signal cannot reach another.
        if _holder(pid_file) != pid or not _inside(_cwd(pid), root.path):
            os.close(fd)
            return None
        try:
            signal.pidfd_send_signal(fd, sig)
        except ProcessLookupError:
            os.close(fd)
            return None
        return fd

    def fault_kill_worker(self) -> Optional[str]:
        candidates = self._workers()
        if not candidates:
            return "no worker process"
        root, worker_id, pid = self.rng.choice(candidates)
        fd = self._signal(root, pid, root.pid_file(WORKER_TYPE, worker_id), signal.SIGKILL)
        if fd is None:
            return f"worker {_short(worker_id)} ended meanwhile"
        os.close(fd)
        self.note("kill -9 worker", f"{_short(worker_id)} PID {pid} on {root.name}")
        return None

    def fault_kill_manager(self) -> Optional[str]:
        candidates = [root for root in self.roots if root.manager_fd is not None]
        if not candidates:
            return "no manager running"
        root = self.rng.choice(candidates)
        pid = root.manager_pid
        assert pid is not None
        fd = self._signal(root, pid, root.pid_file(MANAGER_TYPE, root.manager_id), signal.SIGKILL)
        if fd is None:
            return f"the manager of {root.name} ended meanwhile"
        os.close(fd)
        root.killed = True
        self.note("kill -9 manager", f"{root.name} PID {pid}")
        self.schedule(self.rng.uniform(*MANAGER_RESTART), lambda: self._restart(root))
        return None

    def _pause(self, root: Root, pid: int, pid_file: str, what: str) -> Optional[str]:
        if pid in self.stopped.values():
            return f"{what} is stopped already"
        fd = self._signal(root, pid, pid_file, signal.SIGSTOP)
        if fd is None:
            return f"{what} ended meanwhile"
        self.stopped[fd] = pid
        pause = self.rng.uniform(*PAUSE)
        self.note("SIGSTOP", f"{what} PID {pid} on {root.name} for {pause:.1f} s")
        self.schedule(pause, lambda: self._resume(fd))
        return None

    def _resume(self, fd: int) -> None:
        pid = self.stopped.pop(fd, None)
        if pid is None:
            return
        with contextlib.suppress(ProcessLookupError):
            signal.pidfd_send_signal(fd, signal.SIGCONT)
        os.close(fd)
        self.note("SIGCONT", f"PID {pid}")

    def fault_stop_worker(self) -> Optional[str]:
        candidates = [c for c in self._workers() if c[2] not in self.stopped.values()]
        if not candidates:
            return "no running worker process"
        root, worker_id, pid = self.rng.choice(candidates)
        return self._pause(root, pid, root.pid_file(WORKER_TYPE, worker_id), f"worker {_short(worker_id)}")

    def fault_stop_manager(self) -> Optional[str]:
        candidates = [root for root in self.roots
                      if root.manager_fd is not None and root.manager_pid not in self.stopped.values()]
        if not candidates:
            return "no running manager"
        root = self.rng.choice(candidates)
        assert root.manager_pid is not None
        return self._pause(root, root.manager_pid, root.pid_file(MANAGER_TYPE, root.manager_id), "manager")

    def fault_terminate(self) -> Optional[str]:
        assert self.db is not None
        sessions = self.db.rows(SQL["sessions"])
        if not sessions:
            return "no uniphant session"
        chosen = self.rng.sample(sessions, min(len(sessions), self.rng.randint(1, 4)))
        names = []
        for backend, _, worker_type, worker_id, host_id in chosen:
            if self.db.value(SQL["terminate"], backend):
                self.harness["sessions terminated"] += 1
                root = self._root_of(host_id)
                names.append(f"{'manager' if worker_type == MANAGER_TYPE else 'worker ' + _short(worker_id)}"
                             f"{' on ' + root.name if root else ''}")
        self.note("pg_terminate_backend", ", ".join(names) or "none ended")
        return None

    def _pg_restart(self, mode: str) -> Optional[str]:
        assert self.server is not None and self.db is not None
        self.db.close()
        downtime = self.rng.uniform(*DOWNTIME)
        self.note("PostgreSQL restart", f"{mode} shutdown, then down for {downtime:.1f} s")
        self.server.stop(mode)
        self.server_up, self.down_since = False, time.monotonic()
        self.note("PostgreSQL stopped", mode)
        self.schedule(downtime, self._pg_start)
        return None

    def _pg_start(self) -> None:
        assert self.server is not None
        if self.server_up:
            return
        try:
            self.server.start()
        except pgserver.ServerError as e:
            raise BenchError(f"PostgreSQL did not start again: {e}") from None
        self.server_up = True
        self.harness["PostgreSQL down (s)"] += time.monotonic() - self.down_since
        self.note("PostgreSQL started", f"after {time.monotonic() - self.down_since:.1f} s down")

    def fault_pg_fast(self) -> Optional[str]:
        return self._pg_restart("fast")

    def fault_pg_immediate(self) -> Optional[str]:
        return self._pg_restart("immediate")

    def fault_restart_worker(self) -> Optional[str]:
        assert self.db is not None
        desired = [row[0] for row in self.db.rows(SQL["desired"], WORKER_TYPE)]
        if not desired:
            return "no desired worker"
        worker_id = self.rng.choice(desired)
        found = self.db.value(SQL["restart_worker"], worker_id)
        self.note("restart_worker()", f"{_short(worker_id)}: {'its process row deleted' if found else 'no row'}")
        return None

    def fault_restart_workers(self) -> Optional[str]:
        assert self.db is not None
        ended = self.db.value(SQL["restart_workers"], WORKER_TYPE)
        self.note("restart_workers()", f"{ended} process rows deleted")
        return None

    def fault_scale(self) -> Optional[str]:
        assert self.db is not None
        n = self.rng.randint(*SCALE_RANGE)
        change = self.db.value(SQL["scale"], WORKER_TYPE, n)
        self.note("scale()", f"to {n} any-host workers ({change:+d})")
        return None

    def _root_of(self, host_id: Optional[str]) -> Optional[Root]:
        return next((root for root in self.roots if root.host_id == host_id), None)

    # -- the soak ------------------------------------------------------------------

    def soak(self) -> None:
        """Faults for args.seconds, then every stopped process continued, the server
        up and every manager running, as the end of an incident would leave them."""
        t0 = time.monotonic()
        # The timeline so far (the setup's) moves onto the soak's clock: before 0.
        self.timeline = [(t + self.t0 - t0, kind, detail) for t, kind, detail in self.timeline]
        self.t0, self.t0_wall = t0, time.time()
        end = self.t0 + self.args.seconds
        next_fault = time.monotonic() + self.rng.uniform(*FAULT_GAP)
        next_progress = time.monotonic() + PROGRESS_EVERY
        while time.monotonic() < end:
            self.run_due()
            self.watch_managers()
            now = time.monotonic()
            if now >= next_fault:
                if self.server_up:
                    self.inject()
                    next_fault = time.monotonic() + self.rng.uniform(*FAULT_GAP)
                else:
                    next_fault = now + 0.05  # the next fault waits for the server
            if now >= next_progress:
                self.progress()
                next_progress += PROGRESS_EVERY
            wake = min([next_fault, end, next_progress] + [e[0] for e in self.events[:1]])
            time.sleep(min(max(wake - time.monotonic(), 0.0), 0.05))
        self.timings["faults_end"] = self.now()
        self.note("faults end", "continuing every stopped process; the server and every manager up")
        # What is scheduled now happens now: SIGCONTs, the server's start, managers' restarts.
        self.run_due(everything=True)
        for root in self.roots:
            if root.manager_fd is None and root.starting is None:
                self._restart(root)

    def progress(self) -> None:
        total = sum(self.counts.values())
        state = "PostgreSQL down" if not self.server_up else ""
        if self.server_up and self.db is not None:
            try:
                running = sum(1 for row in self.db.rows(SQL["fleet"]) if row[3] == "running")
                state = f"{running} of {self.db.value(SQL['desired_count'])} desired workers running"
            except Exception as e:
                state = f"cannot read the fleet: {_sql_error(e)}"
        managers = sum(1 for root in self.roots if root.manager_fd is not None)
        print(f"chaos: t{self.now():+.0f} s: {total} faults so far; {state}; {managers} of {ROOTS} managers up; "
              f"{len(self.unexpected_exits)} managers exited on their own", file=sys.stderr, flush=True)

    # -- the checks --------------------------------------------------------------------

    def unsettled(self) -> List[Tuple[str, Optional[str]]]:
        """Check 4's condition: what keeps the fleet from running as desired, each with
        the worker id it is about (empty: it runs as desired)."""
        assert self.db is not None
        problems: List[Tuple[str, Optional[str]]] = []
        for root in self.roots:
            if root.manager_fd is None or root.manager_holder() != root.manager_pid:
                problems.append((f"{root.name}: no manager process", None))
        try:
            fleet = self.db.rows(SQL["fleet"])
            live_managers = self.db.value(SQL["live_managers"])
        except Exception as e:
            if not _lost(e):
                raise
            return problems + [(f"the database: {_sql_error(e)}", None)]
        if live_managers != ROOTS:
            problems.append((f"{live_managers} of {ROOTS} managers have a live process row", None))
        for worker_id, _, pinned_to, state, pid, host_id, last_exit in fleet:
            root = self._root_of(host_id)
            what = f"worker {_short(worker_id)}" + (f" (pinned to {self._name(pinned_to)})" if pinned_to else "")
            if state != "running" or pid is None:
                problems.append((f"{what}: {state or 'not in fleet'}"
                                 + (f" on {self._name(host_id)}" if host_id else "")
                                 + (f", last exit: {_printable(last_exit, 120)}" if last_exit else ""), worker_id))
            elif root is None:
                problems.append((f"{what}: running on an unknown host {host_id}", worker_id))
            elif _holder(root.pid_file(WORKER_TYPE, worker_id)) != pid:
                problems.append((f"{what}: the fleet view says PID {pid} on {root.name}, which does not hold "
                                 f"its PID file", worker_id))
        return problems

    def _name(self, host_id: Optional[str]) -> str:
        root = self._root_of(host_id)
        return root.name if root else f"host {host_id}"

    def settle(self, again: bool = False) -> None:
        """Check 4: wait until every desired worker runs (and keep supervising the
        managers).  again: once more at the end, after the other checks."""
        deadline = time.monotonic() + self.args.settle_timeout
        problems: List[str] = []
        while time.monotonic() < deadline:
            self.run_due()
            self.watch_managers()
            problems = self.unsettled()
            if not problems:
                if not again:
                    self.timings["settled"] = self.now() - self.timings["faults_end"]  # type: ignore[operator]
                return
            time.sleep(0.2)
        if not again:
            self.timings["settled"] = None
        when = ("at the end, having run as desired once" if again
                else f"{self.args.settle_timeout:g} s after the faults ended")
        for problem, worker_id in problems:
            self.violations[4].append({"what": f"not running {when}: {problem}", "worker": worker_id})

    def orphans(self) -> List[Dict[str, Any]]:
        """Check 2's findings now (empty: nothing is orphaned)."""
        assert self.db is not None
        findings: List[Dict[str, Any]] = []
        rows = self.db.rows(SQL["processes"])
        by_id = {row[0]: row for row in rows}
        seen_rows: Set[str] = set()
        known: Dict[int, Tuple[Root, str, str]] = {}   # PID -> (root, worker type, worker id)
        for root in self.roots:
            manager = root.manager_holder()
            if manager is not None:
                known[manager] = (root, MANAGER_TYPE, root.manager_id)
            for worker_id, pid in root.workers().items():
                known[pid] = (root, WORKER_TYPE, worker_id)
        for pid, cwd in sorted(_processes_in(self.base)):
            if pid not in known:
                if any(root.starting is not None and root.starting.pid == pid for root in self.roots):
                    continue  # the harness's own `start` command
                findings.append({"what": f"process {pid} in {os.path.relpath(cwd, self.base)} holds no "
                                         f"PID file of a worker or manager ({_describe_process(pid)})"})
                continue
            root, worker_type, worker_id = known[pid]
            process_id = _process_id_in(root.pid_file(worker_type, worker_id))
            row = by_id.get(process_id or "")
            what = "manager" if worker_type == MANAGER_TYPE else f"worker {_short(worker_id)}"
            if row is None:
                findings.append({"what": f"{what} PID {pid} on {root.name} (process {process_id}) has no process "
                                         f"row ({_describe_process(pid)})", "worker": worker_id})
                continue
            seen_rows.add(row[0])
            _, _, _, host_id, row_pid, age, stale_after, connected, wanted, manager_of = row
            if host_id != root.host_id or row_pid != pid:
                findings.append({"what": f"{what} PID {pid} on {root.name}: its row says PID {row_pid} on "
                                         f"{self._name(host_id)}", "worker": worker_id})
            if not connected and age > stale_after:
                findings.append({"what": f"{what} PID {pid} on {root.name}: its row is not live (heartbeat "
                                         f"{age:.1f} s old, no session)", "worker": worker_id})
            if worker_type == MANAGER_TYPE and manager_of != root.host_id:
                findings.append({"what": f"manager PID {pid} on {root.name} is not its host's manager in SQL"})
            if worker_type == WORKER_TYPE and not wanted:
                findings.append({"what": f"worker {worker_id} PID {pid} on {root.name} runs, but no desired "
                                         f"worker accounts for it ({_describe_process(pid)})",
                                 "worker": worker_id})
        for row in rows:
            process_id, worker_id, worker_type, host_id, pid, age, _, connected, wanted, _ = row
            if process_id in seen_rows:
                continue
            # Its process is gone (no holder of that PID file has this process id).
            if age > STALE_ROW_AGE:
                findings.append({"what": f"process row {process_id} ({worker_type} {worker_id}, PID {pid} "
                                         f"on {self._name(host_id)}{', not wanted' if not wanted else ''}"
                                         f"{', its session still connected' if connected else ''}): its process "
                                         f"is gone, and the row stays with a heartbeat {age:.1f} s old "
                                         f"(bound {STALE_ROW_AGE:g} s)", "worker": worker_id})
            else:
                findings.append({"what": f"process row {process_id} ({worker_type} {_short(worker_id)}, PID {pid} "
                                         f"on {self._name(host_id)}): its process is gone (heartbeat "
                                         f"{age:.1f} s old)", "worker": worker_id})
        return findings

    def check_orphans(self) -> None:
        """Check 2: wait until nothing is orphaned, or report what still is at the deadline."""
        started = time.monotonic()
        deadline = started + ORPHAN_TIMEOUT
        while True:
            self.run_due()
            self.watch_managers()
            findings = self.orphans()
            if not findings:
                self.timings["clean"] = time.monotonic() - started
                return
            if time.monotonic() > deadline:
                break
            time.sleep(0.25)
        self.timings["clean"] = None
        self.violations[2].extend(findings)

    def check_overlaps(self) -> None:
        """Check 1: no two processes of one worker id at work at once, on the server's clock."""
        assert self.db is not None
        calls, processes, workers = self.db.rows(SQL["calls_total"])[0]
        self.notes[1] = f"{calls} calls by {processes} processes of {workers} worker ids"
        paths = {root.path: root.name for root in self.roots}
        for (worker_id, a_id, a_pid, a_root, a_first, a_last, a_calls,
             b_id, b_pid, b_root, b_first, b_last, b_calls) in self.db.rows(SQL["overlaps"]):
            calls = self.db.rows(SQL["calls_between"], worker_id, a_id, b_id, b_first - 1.0,
                                 min(a_last, b_last) + 1.0)
            self.violations[1].append({
                "what": f"worker {worker_id} had two copies at work for {min(a_last, b_last) - b_first:.3f} s: "
                        f"process {a_id} (PID {a_pid} on {paths.get(a_root, a_root)}, {a_calls} calls from "
                        f"t{self.at(a_first):+.3f} to t{self.at(a_last):+.3f} s) and process {b_id} (PID {b_pid} "
                        f"on {paths.get(b_root, b_root)}, {b_calls} calls from t{self.at(b_first):+.3f} to "
                        f"t{self.at(b_last):+.3f} s)",
                "t": self.at(b_first),
                "evidence": [f"call at t{self.at(at):+.3f} s by PID {pid} (process {_short(p)})"
                             for p, pid, at in calls]
                            + self._log_lines(WORKER_TYPE, worker_id, {a_pid, b_pid},
                                              self.at(b_first) - 10, self.at(a_last) + 2)})

    def check_managers(self) -> None:
        """Check 3: no manager ended without the harness killing it; no manager log line
        says that one stopped or exited (the harness sent no SIGTERM yet)."""
        said: Dict[Tuple[str, int], List[str]] = {}
        for root in self.roots:
            for t, level, pid, message, line in self._parse_log(root.manager_log()):
                if message.startswith(("stopping:", "exiting:")):
                    said.setdefault((root.name, pid), []).append(line)
        exits = {(e["root"], e["pid"]): e for e in self.unexpected_exits}
        for key in sorted(set(exits) | set(said), key=lambda k: exits.get(k, {}).get("t", 0.0)):
            name, pid = key
            root = next(r for r in self.roots if r.name == name)
            exit_ = exits.get(key)
            t = exit_["t"] if exit_ else None
            lines = said.get(key, [])
            # What it said of itself: its lines about its workers are left out.
            parsed = [(lt, line) for lt, level, p, message, line in self._parse_log(root.manager_log())
                      if p == pid and (line in lines or (level in ("WARNING", "ERROR", "CRITICAL")
                                                         and not message.startswith("worker ")))]
            ended = parsed[-1][0] if lines else t
            # Its last words, and what it logged in the seconds before.
            evidence = [f"t{lt:+.2f} s {root.name} manager log: {line}" for lt, line in parsed
                        if line in lines or (ended is not None and ended - 8.0 <= lt)][-5:]
            if not lines:
                evidence.append("its log has no line of that PID saying why it stopped")
            if ended is not None:
                evidence += [f"t{ft:+.2f} s timeline: {kind}: {detail}" for ft, kind, detail in self.timeline
                             if ended - 8.0 <= ft <= ended + 0.5 and kind != "MANAGER EXITED ON ITS OWN"][-8:]
            self.violations[3].append({
                "what": f"the manager of {name}, PID {pid}, "
                        + (f"exited at about t{t:+.2f} s without a signal from the harness" if t is not None
                           else "logged that it stopped, without a signal from the harness"),
                "t": t, "evidence": evidence})

    def add_histories(self) -> None:
        """Give each violation of checks 2 and 4 about a worker its recent history."""
        assert self.db is not None
        who = {process_id: (worker_type, host_id, pid)
               for process_id, worker_type, host_id, pid in self.db.rows(SQL["registered"])}
        for number in (2, 4):
            for v in self.violations[number]:
                if v.get("worker") and "evidence" not in v:
                    v["evidence"] = self.history(v["worker"], who) + self._log_tail(WORKER_TYPE, v["worker"])

    def history(self, worker_id: str, who: Dict[str, Tuple[str, str, int]]) -> List[str]:
        """What happened to worker_id's rows lately, on the server's clock, and who did it."""
        assert self.db is not None

        def by(name: str) -> str:
            if name == "chaos-harness":
                return "the harness"
            if name not in who:
                return f"session {_printable(name, 40)}"
            worker_type, host_id, pid = who[name]
            return (f"the manager of {self._name(host_id)}, PID {pid}" if worker_type == MANAGER_TYPE
                    else f"process {_short(name)} (PID {pid} on {self._name(host_id)})")

        lines = []
        for at, name, table, op, host_id, state, pid, process_id in reversed(
                self.db.rows(SQL["history"], worker_id, 14)):
            facts = ", ".join(f for f in (
                f"process {_short(process_id)}" if process_id else "",
                f"state {state}" if state else "",
                f"PID {pid}" if pid else "",
                f"host {self._name(host_id)}" if host_id else ("no host" if table == "worker_states" else "")) if f)
            lines.append(f"t{self.at(at):+.2f} s {table} {op}{': ' + facts if facts else ''} (by {by(name)})")
        return lines

    def _parse_log(self, path: str) -> List[Tuple[float, str, int, str, str]]:
        """(t, level, PID, message, printable line) of each line of a uniphant log."""
        found = []
        try:
            with open(path, encoding="utf-8", errors="replace") as f:
                for raw in f:
                    match = _LOG_LINE.match(raw.rstrip("\n"))
                    if match:
                        stamp = time.mktime(time.strptime(match.group(1), "%Y-%m-%d %H:%M:%S"))
                        t = self.at(stamp + int(match.group(2)) / 1000)
                        found.append((t, match.group(3), int(match.group(5)), match.group(6),
                                      _printable(raw.rstrip("\n"))))
        except OSError:
            pass
        return found

    def _log_lines(self, worker_type: str, worker_id: str, pids: Set[int], since: float, until: float) -> List[str]:
        lines = []
        for root in self.roots:
            path = os.path.join(root.path, "log", worker_type, f"{worker_id}.log")
            lines += [(t, f"{root.name} log: {line}") for t, _, pid, _, line in self._parse_log(path)
                      if pid in pids and since <= t <= until]
        return [line for _, line in sorted(lines)][-12:]

    def _log_tail(self, worker_type: str, worker_id: str, n: int = 3) -> List[str]:
        """The last n lines a worker logged, on whichever roots it ran."""
        lines = []
        for root in self.roots:
            path = os.path.join(root.path, "log", worker_type, f"{worker_id}.log")
            lines += [(t, f"t{t:+.2f} s {root.name} log: {line}") for t, _, _, message, line in self._parse_log(path)
                      if "connected as a superuser" not in message]
        return [line for _, line in sorted(lines)][-n:]

    def log_summary(self) -> List[Tuple[int, str]]:
        """The warnings and errors the managers and workers logged, by kind (ids and
        numbers blanked), most frequent first."""
        kinds: Dict[str, int] = {}
        for root in self.roots:
            for directory, _, names in os.walk(os.path.join(root.path, "log")):
                for name in names:
                    for _, level, _, message, _ in self._parse_log(os.path.join(directory, name)):
                        if level in ("WARNING", "ERROR", "CRITICAL"):
                            if self.server is not None:
                                message = message.replace(self.server.dir, "<server dir>")
                            kind = re.sub(r"\d+(\.\d+)?", "N", _IDS.sub("<id>", message))
                            kind = f"{level} {'manager' if directory.endswith(MANAGER_TYPE) else 'worker'}: {kind}"
                            kinds[kind] = kinds.get(kind, 0) + 1
        return sorted(((n, _printable(k, 200)) for k, n in kinds.items()), reverse=True)

    # -- the report ------------------------------------------------------------------------

    def report(self, revision: str) -> int:
        failed = sum(len(v) for v in self.violations.values())
        args = self.args
        desired = None
        with contextlib.suppress(Exception):
            desired = self.db.value(SQL["desired_count"]) if self.db else None
        print(f"\nuniphant chaos soak at {revision}: seed {args.seed}, {args.seconds:g} s of faults, {ROOTS} roots, "
              f"{ANY_HOST} any-host workers and {PINNED} pinned to each root to begin with "
              f"({desired} desired at the end), stale_after {STALE_AFTER:g} s, "
              f"worker interval {WORKER_INTERVAL:g} s\n")
        print("faults injected:")
        for key, (label, _) in FAULTS.items():
            skipped = self.skipped.get(key)
            print(f"  {label:<58} {self.counts[key]:>5}" + (f"   ({skipped} skipped, see the timeline)" if skipped else ""))
        print(f"  {'total':<58} {sum(self.counts.values()):>5}")
        print("harness, meanwhile:")
        for label, n in self.harness.items():
            print(f"  {label:<58} {n:>5.1f}" if label.endswith("(s)") else f"  {label:<58} {n:>5.0f}")
        t = self.timings
        print("timings:")
        print(f"  setup: server, 3 managers, every desired worker running     {t.get('setup', 0):6.1f} s")
        settled = t.get("settled")
        print("  faults' end -> every desired worker running (settled)     "
              + (f"{settled:6.1f} s" if settled is not None else f"not within {args.settle_timeout:g} s"))
        clean = t.get("clean")
        print("  settled -> nothing orphaned                                "
              + (f"{clean:6.1f} s" if clean is not None else f"not within {ORPHAN_TIMEOUT:g} s"))
        titles = {1: "no worker id ever had two copies at work",
                  2: "nothing is orphaned",
                  3: "no manager exited on its own",
                  4: "every desired worker runs after it settles"}
        print("checks:")
        for number, title in titles.items():
            found = self.violations[number]
            result = "pass" if not found else f"FAIL ({len(found)} violation{'s' * (len(found) > 1)})"
            note = f"; {self.notes[number]}" if number in self.notes else ""
            print(f"  {number}. {title:<48} {result}{note}")
        if failed:
            print("\nviolations:")
            for number, found in self.violations.items():
                for v in found:
                    print(f"  [{number}] {v['what']}")
                    for line in v.get("evidence", []):
                        print(f"        {line}")
        summary = self.log_summary()
        superuser = sum(n for n, kind in summary if "connected as a superuser" in kind)
        summary = [(n, kind) for n, kind in summary if "connected as a superuser" not in kind]
        if summary:
            print(f"\nwarnings and errors in the logs, by kind (top 15 of {len(summary)}; besides {superuser} "
                  f"'connected as a superuser': the soak's processes log in as the server's superuser):")
            for n, kind in summary[:15]:
                print(f"  {n:>5}  {kind}")
        if self.start_failures:
            print("\nmanager starts that failed (the harness started them again after 1 s):")
            for line in self.start_failures[:10]:
                print(f"  {line}")
            if len(self.start_failures) > 10:
                print(f"  ... and {len(self.start_failures) - 10} more")
        print(f"\nverdict: {'FAIL' if failed else 'PASS'}"
              + (f" ({failed} violation{'s' * (failed > 1)})" if failed else "")
              + f"; to repeat: dev/chaos --seconds {args.seconds:g} --seed {args.seed}")
        self._save(revision, failed)
        return 1 if failed else 0

    def _save(self, revision: str, failed: int) -> None:
        results = os.path.join(REPO, "bench", "results")
        os.makedirs(results, exist_ok=True)
        with open(os.path.join(results, "chaos.json"), "w") as f:
            json.dump({"revision": revision, "seed": self.args.seed, "seconds": self.args.seconds,
                       "faults": self.counts, "skipped": self.skipped, "harness": self.harness,
                       "timings": self.timings, "violations": {str(k): v for k, v in self.violations.items()},
                       "start_failures": self.start_failures,
                       "timeline": [{"t": round(t, 3), "kind": k, "detail": d} for t, k, d in self.timeline]},
                      f, indent=1)
        logs = os.path.join(results, "chaos-logs")
        shutil.rmtree(logs, ignore_errors=True)
        if failed:
            for root in self.roots:
                with contextlib.suppress(OSError):
                    shutil.copytree(os.path.join(root.path, "log"), os.path.join(logs, root.name))
            if self.server is not None:
                with contextlib.suppress(OSError):
                    shutil.copy(os.path.join(self.server.dir, "server.log"), logs)
            print(f"logs: {os.path.relpath(logs, REPO)}/; report: bench/results/chaos.json")

    # -- tearing down ------------------------------------------------------------------------

    def teardown(self) -> None:
        """Continue what the harness stopped, stop the managers (they stop their
        workers), end whatever is left, remove the server and the roots."""
        for fd in list(self.stopped):
            self._resume(fd)
        for pid, _ in _processes_in(self.base):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)  # a stopped process would not act on SIGTERM
        for root in self.roots:
            if root.manager_fd is not None:
                os.close(root.manager_fd)
                root.manager_fd = None
        if self.db is not None:
            self.db.close()
        if self.server is not None and not self.server_up:
            with contextlib.suppress(pgserver.ServerError):
                self.server.start()  # so that the managers can remove their rows as they stop
        _end_processes_in(self.base)
        for root in self.roots:
            if root.starting is not None:
                with contextlib.suppress(Exception):
                    root.starting.kill()
                    root.starting.wait()
        if self.server is not None:
            self.server.destroy()


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=600.0, help="seconds of faults (default 600)")
    parser.add_argument("--seed", type=int, default=None, help="the random seed (default: a new one, printed)")
    parser.add_argument("--settle-timeout", type=float, default=60.0,
                        help="seconds the fleet has after the faults to run every desired worker (default 60)")
    parser.add_argument("--verbose", action="store_true", help="print each fault as it happens")
    args = parser.parse_args(argv)
    if args.seconds < 0 or args.settle_timeout <= 0:
        parser.error("--seconds must be at least 0 and --settle-timeout above 0")
    if args.seed is None:
        args.seed = random.SystemRandom().randrange(1, 10 ** 6)
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, signal.default_int_handler)  # end as Ctrl-C does: everything cleaned up
    print(f"chaos: seed {args.seed}, {args.seconds:g} s of faults", file=sys.stderr, flush=True)
    base = tempfile.mkdtemp(prefix="uniphant-chaos-")
    soak = Soak(args, base)
    try:
        try:
            soak.setup()
            print(f"chaos: the fleet runs ({soak.timings['setup']:.1f} s to set up); faults begin",
                  file=sys.stderr, flush=True)
            soak.soak()
            print("chaos: faults over; waiting for the fleet to settle", file=sys.stderr, flush=True)
            soak.settle()
            soak.check_orphans()
            if soak.timings.get("settled") is not None:
                soak.settle(again=True)  # it ran as desired once: it must still
            soak.check_overlaps()
            soak.check_managers()
            soak.add_histories()
        except BenchError as e:
            print(f"chaos: {e}", file=sys.stderr)
            print(f"verdict: the soak could not run (seed {args.seed})")
            return 1
        return soak.report(_revision())
    finally:
        with pgserver.interrupts_deferred():
            soak.teardown()
            shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:  # everything is gone already (main's finally)
        print("chaos: interrupted", file=sys.stderr)
        sys.exit(130)
