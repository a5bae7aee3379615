"""The failover benchmark: a fleet through the loss of its primary, while its
standby is not yet promoted, and onto the standby once it is.

Each run starts a durable throwaway primary (dev/pgserver.py; fsync and
synchronous_commit on) with a streaming standby made by pg_basebackup, two
project roots that play two hosts, a manager started as a daemon in each
(`python workers/uniphant/manager.py <uuid> start`) with PGHOST listing the
primary first, then the standby, and N idle any-host workers asked for in one
statement.  Once the standby has replayed everything, the primary is stopped in
immediate mode (as a crash); --outage seconds later the standby is promoted
(`pg_ctl promote`).  It prints medians with min and max over the runs; the raw
samples go to bench/results/failover.json.

    python bench/failover.py [--runs 3] [--outage 60] [--workers 20]

What it measures.
- The standby's server log during the outage, with the server's default
  logging (log_line_prefix aside, which names each session's application_name):
  the lines it gained between the kill and the promotion from the fleet's
  sessions (a process that logged in and ran LISTEN there wrote an ERROR and a
  STATEMENT line each time), and all of them (its WAL receiver retries its
  primary every 5 s), per minute.
- Logins to the standby during the outage, from its pg_stat_database.sessions
  (read on a session opened before the kill), per process and per backoff step:
  each process logs each failed attempt to reconnect ("reconnecting: ...", at
  DEBUG after the first of its kind: the roots run at log_level=DEBUG), and an
  attempt is one backoff step.  The goal is at most one login per step.
- The timeline: the kill, the promotion (pg_ctl promote returns and the server
  accepts writes), and the moment every desired worker and both managers have a
  connected session on the new primary, polled every 20 ms on a session
  opened as the promotion returns.
- How many workers run in another process after the failover than before
  (moved or restarted): a failover longer than stale_after lets a manager that
  reconnects first take over the rows of processes that have not reconnected
  yet, which is safe (one copy at a time) but not free.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from typing import Any, Dict, List, Optional

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "dev"))
import pgserver  # noqa: E402
from fleet import BenchError, _end_processes_in, _fleet_root, _revision, _wait_until  # noqa: E402  (bench/ is on the path)
from lifecycle import IDLE  # noqa: E402

PYTHON = sys.executable
HOSTS = 2
# Durable, and the server's default logging but for a prefix that names the session's
# application_name (a uniphant process's id), so that each line can be told apart.
SETTINGS = ("fsync = on\nsynchronous_commit = on\nfull_page_writes = on\n"
            "log_line_prefix = '%m [%p] %q%a: '\n")
FLEET_LINE = re.compile(r"^\S+ \S+ \S+ \[\d+\] [0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}: ")

# (key, label, unit, decimals, goal); a goal is (operator, bound) on the median.
MEASURES = [
    ("fleet_lines_per_min", "standby server log lines from the fleet's sessions, during the outage",
     "/min", 1, None),
    ("standby_lines_per_min", "all its server log lines (its WAL receiver's retries too)", "/min", 1, None),
    ("standby_logins_per_min", "logins to the standby during the outage", "/min", 0, None),
    ("attempts_per_process_per_min", "reconnection attempts (backoff steps) per process", "/min", 1, None),
    ("logins_per_step", "logins to the standby per process per backoff step", "", 2, ("<=", 1)),
    ("kill_to_promoted", "primary killed -> standby promoted (accepts writes)", "s", 2, None),
    ("promoted_to_first", "promoted -> first process connected to it", "s", 2, None),
    ("promoted_to_all", "promoted -> every desired worker and both managers connected", "s", 2, None),
    ("kill_to_all", "primary killed -> every desired worker connected to the new primary", "s", 2, None),
    ("moved", "workers in another process after the failover", "", 0, None),
]


def _query(conn, sql: str, *params: Any) -> list:
    cursor = conn.cursor()
    cursor.execute(sql, params)
    return cursor.fetchall() if cursor.description else []


class Run:
    """One failover: a primary, its standby, HOSTS project roots with a manager each."""

    def __init__(self, base: str, number: int, args: argparse.Namespace) -> None:
        self.args = args
        self.number = number
        self.dir = tempfile.mkdtemp(prefix=f"run{number}-", dir=base)
        self.roots = [os.path.join(self.dir, f"host{i}") for i in range(HOSTS)]
        self.managers = [str(uuid.uuid4()) for _ in self.roots]
        self.primary: Optional[pgserver.Server] = None
        self.standby: Optional[pgserver.Server] = None
        self.env: Dict[str, str] = {}
        self.samples: Dict[str, float] = {}
        self.details: Dict[str, Any] = {"run": number}

    def setup(self) -> None:
        self.primary = pgserver.Server()
        self.primary.init(settings=SETTINGS).start()
        self.primary.create_database("uniphant")
        self.standby = self.primary.standby()
        self.env = {k: v for k, v in os.environ.items()
                    if not k.startswith("PG") and k not in ("UNIPHANT_STATE_DIR", "NOTIFY_SOCKET",
                                                            "WATCHDOG_USEC", "WATCHDOG_PID")}
        self.env.update(PGHOST=f"{self.primary.dir},{self.standby.dir}",
                        PGPORT=f"{self.primary.port},{self.standby.port}", PGUSER=pgserver.SUPERUSER,
                        PGDATABASE="uniphant", PYTHONPATH=REPO, HOME=self.dir)
        for root, manager in zip(self.roots, self.managers):
            # log_level=DEBUG: each failed attempt to reconnect, one line
            _fleet_root(root, {"workers/bench/idle.py": IDLE, "uniphant.conf": "log_level=DEBUG\n"})
            start = subprocess.run([PYTHON, "workers/uniphant/manager.py", manager, "start"], cwd=root,
                                   env=self.env, capture_output=True, text=True, timeout=60)
            if start.returncode:
                raise BenchError(f"a manager did not start: {(start.stderr or start.stdout).strip()}")

    def connected(self, conn) -> tuple:
        """(desired workers, managers) whose process has a session on conn's server."""
        return tuple(_query(conn, """
            SELECT count(*) FILTER (WHERE w.worker_id IS NOT NULL),
                   count(*) FILTER (WHERE m.process_id IS NOT NULL)
            FROM uniphant.processes p LEFT JOIN uniphant.workers w USING (worker_id)
            LEFT JOIN uniphant.managers m ON m.process_id = p.id
            WHERE uniphant.session_exists(p.id, p.role)""")[0])

    def logs(self) -> Dict[str, int]:
        """The size of every process's log file, by path."""
        sizes = {}
        for root in self.roots:
            for directory, _, names in os.walk(os.path.join(root, "log")):
                for name in names:
                    path = os.path.join(directory, name)
                    sizes[path] = os.path.getsize(path)
        return sizes

    def attempts_since(self, sizes: Dict[str, int]) -> int:
        """Failed attempts to reconnect logged since sizes were taken, all processes."""
        count = 0
        for path, size in sizes.items():
            with open(path, encoding="utf-8", errors="replace") as f:
                f.seek(size)
                count += sum(1 for line in f if "reconnecting: " in line)
        return count

    def measure(self) -> None:
        n = self.args.workers
        primary = self.primary.connect("uniphant")
        try:
            _query(primary, "SELECT uniphant.scale('bench.idle', %s)", n)
            _wait_until(lambda: self.connected(primary) == (n, HOSTS), 60, f"{n} workers and the managers")
            before = dict(_query(primary, "SELECT worker_id::text, pid FROM uniphant.processes "
                                          "WHERE worker_id IN (SELECT worker_id FROM uniphant.workers)"))
        finally:
            primary.close()
        self.standby.wait_for_replay(self.primary)
        monitor = self.standby.connect("postgres")
        standby_log = os.path.join(self.standby.dir, "server.log")
        try:
            def sessions() -> int:
                _query(monitor, "SELECT pg_stat_clear_snapshot()")
                return _query(monitor, "SELECT sessions FROM pg_stat_database WHERE datname = 'uniphant'")[0][0]

            sessions_before, log_before, sizes = sessions(), os.path.getsize(standby_log), self.logs()
            killed = time.monotonic()
            self.primary.stop("immediate")
            time.sleep(max(killed + self.args.outage - time.monotonic(), 0))  # the outage measured
            outage = time.monotonic() - killed
            logins = sessions() - sessions_before
            with open(standby_log, encoding="utf-8", errors="replace") as f:
                f.seek(log_before)
                lines = [line for line in f.read().splitlines() if line.strip()]
            fleet_lines, fleet = [], False
            for line in lines:
                fleet = bool(FLEET_LINE.match(line)) if not line[0].isspace() else fleet  # continuations
                if fleet:
                    fleet_lines.append(line)
            attempts = self.attempts_since(sizes)
        finally:
            monitor.close()
        self.standby.promote()
        promoted = time.monotonic()
        new = self.standby.connect("uniphant")
        try:
            first = _wait_until(lambda: sum(self.connected(new)) and time.monotonic(), 120, "a first process")
            done = _wait_until(lambda: self.connected(new) == (n, HOSTS) and time.monotonic(), 300,
                               "every worker and manager on the new primary")
            after = dict(_query(new, "SELECT worker_id::text, pid FROM uniphant.processes "
                                     "WHERE worker_id IN (SELECT worker_id FROM uniphant.workers)"))
        finally:
            new.close()
        processes = n + HOSTS
        minutes = outage / 60
        self.samples = {
            "fleet_lines_per_min": len(fleet_lines) / minutes,
            "standby_lines_per_min": len(lines) / minutes,
            "standby_logins_per_min": logins / minutes,
            "attempts_per_process_per_min": attempts / processes / minutes,
            "logins_per_step": logins / attempts if attempts else 0.0,
            "kill_to_promoted": promoted - killed,
            "promoted_to_first": first - promoted,
            "promoted_to_all": done - promoted,
            "kill_to_all": done - killed,
            "moved": sum(1 for w, pid in before.items() if after.get(w) != pid),
        }
        self.details.update(outage_s=outage, fleet_log=fleet_lines[:20], logins=logins, attempts=attempts)

    def teardown(self) -> None:
        for root, manager in zip(self.roots, self.managers):
            with contextlib.suppress(OSError, subprocess.TimeoutExpired):
                subprocess.run([PYTHON, "workers/uniphant/manager.py", manager, "stop"], cwd=root,
                               env=self.env, capture_output=True, timeout=60)
        _end_processes_in(self.dir)
        for server in (self.standby, self.primary):
            if server is not None:
                server.destroy()
        shutil.rmtree(self.dir, ignore_errors=True)


def _table(runs: List[Run]) -> List[Dict[str, Any]]:
    rows = []
    for key, label, unit, decimals, goal in MEASURES:
        samples = [run.samples[key] for run in runs if key in run.samples]
        if not samples:
            continue
        median = statistics.median(samples)
        met = None if goal is None else median <= goal[1]
        rows.append({"key": key, "measure": label + (f" ({unit})" if unit else ""), "decimals": decimals,
                     "median": median, "min": min(samples), "max": max(samples),
                     "goal": "" if goal is None else f"{goal[0]} {goal[1]:g}" + (" ok" if met else " MISSED"),
                     "samples": samples})
    return rows


def _machine() -> Dict[str, str]:
    model = "unknown"
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    return {"cpu": model, "cores": str(os.cpu_count()), "python": platform.python_version()}


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=3, help="failovers (default 3)")
    parser.add_argument("--outage", type=float, default=60.0,
                        help="seconds from the kill of the primary to the promotion (default 60)")
    parser.add_argument("--workers", type=int, default=20, help="idle any-host workers (default 20)")
    args = parser.parse_args(argv)
    if args.runs < 1 or args.outage <= 0 or args.workers < 1:
        parser.error("runs and workers must be at least 1, the outage above 0")
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, signal.default_int_handler)  # end as Ctrl-C does: everything cleaned up

    base = tempfile.mkdtemp(prefix="uniphant-failover-")
    runs: List[Run] = []
    version = ""
    try:
        for number in range(1, args.runs + 1):
            run = Run(base, number, args)
            try:
                print(f"  run {number}: setting up", file=sys.stderr, flush=True)
                run.setup()
                version = version or run.standby.value("SELECT current_setting('server_version')")
                print(f"  run {number}: a {args.outage:g} s failover", file=sys.stderr, flush=True)
                run.measure()
                runs.append(run)
            finally:
                with pgserver.interrupts_deferred():
                    run.teardown()
    except (BenchError, pgserver.ServerError) as e:
        print(f"bench: {e}", file=sys.stderr)
        return 1
    finally:
        with pgserver.interrupts_deferred():
            _end_processes_in(base)
            shutil.rmtree(base, ignore_errors=True)

    machine = dict(_machine(), postgresql=version)
    revision = _revision()
    print(f"\nuniphant failover benchmark at {revision}; {machine['cpu']}, {machine['cores']} cores, "
          f"Python {machine['python']}, PostgreSQL {version} (fsync and synchronous_commit on, "
          f"asynchronous streaming replication, Unix sockets)")
    print(f"{len(runs)} run{'s' * (len(runs) > 1)}: {args.workers} idle any-host workers on {HOSTS} managers, "
          f"PGHOST primary then standby, the standby promoted {args.outage:g} s after the primary's kill\n")
    rows = _table(runs)
    width = max(len(row["measure"]) for row in rows)
    print(f"| {'measure':<{width}} | {'median':>8} | {'min':>8} | {'max':>8} | {'goal':>9} |")
    print(f"|{'-' * (width + 2)}|{'-' * 9}:|{'-' * 9}:|{'-' * 9}:|{'-' * 10}:|")
    for row in rows:
        d = row["decimals"]
        print(f"| {row['measure']:<{width}} | {row['median']:8.{d}f} | {row['min']:8.{d}f} | "
              f"{row['max']:8.{d}f} | {row['goal']:>9} |")
    lines = [line for run in runs for line in run.details["fleet_log"]]
    if lines:
        print("\nthe fleet's lines in the standby's log began:\n  " + "\n  ".join(lines[:6]))
    out = os.path.join(REPO, "bench", "results", "failover.json")
    os.makedirs(os.path.dirname(out), exist_ok=True)
    with open(out, "w") as f:
        json.dump({"machine": machine, "revision": revision, "hosts": HOSTS,
                   "settings": {"runs": args.runs, "outage_s": args.outage, "workers": args.workers},
                   "rows": rows, "runs": [dict(run.details, samples=run.samples) for run in runs]}, f, indent=1)
    print(f"\nsamples: {os.path.relpath(out, REPO)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
