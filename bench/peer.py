"""The peer benchmark: the same N idle workers under supervisord, under uniphant's
manager and, where the machine runs systemd, as transient units (systemd-run),
back to back in one run.

    python bench/peer.py [--runs 3] [--sizes 200,1000] [--window 21] [--peers uniphant,...]
                         [--pgbouncer POOL_SIZE]

Starts a throwaway durable PostgreSQL (dev/pgserver.py; fsync and
synchronous_commit on, as bench/fleet.py does) and for each size N and each run
gives each supervisor in turn (the order rotating from run to run) a fresh
database with schema.sql, a project root of its own and N idle uniphant
workers (workers/bench/idle.py, whose function returns at once):

- supervisord, the release requirements-dev.txt pins: one [program] per
  worker, `python workers/bench/idle.py <uuid> start -f`, autostart=false and
  autorestart=true, supervisord's defaults otherwise (its output logged to
  files, startsecs=1); supervisord runs in the foreground as the benchmark's
  child.
- uniphant: one manager started as a daemon (`python
  workers/uniphant/manager.py <uuid> start`), which starts the N any-host
  workers asked for with `SELECT uniphant.scale('bench.idle', N)`.
- systemd-run: one transient service per worker running the same command as
  under supervisord, with Restart=always (systemd's other defaults: a restart
  100 ms after an exit), all in a slice of the run's own; as root, the system
  manager, else the user's.  Skipped, with the reason, where systemd is not
  the init system or systemd-run cannot start a unit.

What a worker's "registered" means is the same for all: its process row is
committed, as stamped by the server (a deferred trigger, bench/fleet.py's
STAMPS).  Nothing waits a fixed time to synchronise, only the idle window is
fixed.  In order:

- start all -> all registered: from just before `supervisorctl start all`,
  the first of the N `systemd-run` commands (run one after the other), or the
  scale() statement, until the last of the N rows.
- the idle window (--window seconds, one heartbeat period by default, so that
  every worker beats once in it), once every worker sleeps and has used no CPU
  for 0.1 s: the workers' CPU and the supervising process's, from /proc, as %
  of one core; then PSS (/proc/PID/smaps_rollup), the median over the workers.
- kill -9 of a worker -> replacement registered: three workers in turn, each
  sample from just before the SIGKILL until the new row of its worker id.
- DELETE of a process row -> its process gone: three other workers in turn
  (each supervisor then starts it again, which is waited for).
- In the idle window besides: PostgreSQL's CPU (the postmaster and its
  children but the benchmark's session), and the heartbeat writes a second
  (the process rows whose heartbeat_at falls in the window, over its length:
  at one heartbeat period, each worker's one write).
- The CPU that the start and the stop take: the supervisor with the workers it
  reaped, the workers, and PostgreSQL, from /proc.

With --pgbouncer POOL_SIZE the workers reach the server through PgBouncer in
transaction mode (dev/pgserver.py's, a pool of POOL_SIZE server connections;
their config says pooler=transaction), a manager directly.
- one DELETE / stop all -> every process gone: `supervisorctl stop all`,
  `systemctl stop <slice>`, or `DELETE FROM uniphant.workers WHERE
  worker_type = 'bench.idle'`, until every worker's exit is seen through a
  pidfd.  A command's time includes its own start (supervisorctl is a Python
  program); the DELETE goes over the benchmark's open session.

It prints one table per N: medians with min and max over all samples, and the
ratio of uniphant's median to each peer's (below 1: uniphant takes less); the
raw samples go to bench/results/peer.json.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from typing import Any, Dict, List, Optional, Tuple, Type

from fleet import (PYTHON, REPO, STAMPS, BenchError, _cpu, _end_processes_in, _fleet_root, _machine,
                   _children, _memory_mb, _revision, _server_cpu, _stat, _wait_exits, _wait_until, pgserver)
from lifecycle import IDLE

TYPE = "bench.idle"
# With --pgbouncer, the PgBouncer (transaction mode) that the workers reach the server through.
POOL: Optional[pgserver.PgBouncer] = None
KILLS = 3  # workers killed one after the other, per supervisor and run
BIN = os.path.dirname(PYTHON)  # supervisord and supervisorctl are installed beside the interpreter

# (key, label, unit, decimals)
MEASURES: List[Tuple[str, str, str, int]] = [
    ("start_all", "start all -> all registered", "s", 2),
    ("worker_pss", "PSS per worker", "MB", 1),
    ("kill_restart", "kill -9 of a worker -> replacement registered", "ms", 0),
    ("stop_all", "one DELETE / stop all -> every process gone", "ms", 0),
    ("row_stop", "DELETE of a process row -> its process gone", "ms", 0),
    ("server_cpu", "idle CPU of PostgreSQL", "%", 2),
    ("heartbeats", "idle heartbeat writes a second", "/s", 1),
    ("start_cpu", "CPU of the start (supervisor, workers, PostgreSQL)", "s", 2),
    ("stop_cpu", "CPU of the stop (supervisor, workers, PostgreSQL)", "s", 2),
    ("workers_cpu", "idle CPU of all workers", "%", 2),
    ("supervisor_cpu", "idle CPU of the supervising process", "%", 2),
    ("supervisor_pss", "PSS of the supervising process", "MB", 1),
]


def _wait_settled(pids: List[int], timeout: float) -> None:
    """Until every process in pids sleeps and has used no CPU for 0.1 s: started up, and in its wait."""
    deadline, last = time.monotonic() + timeout, None
    while True:
        now = {}
        for pid in pids:
            try:
                fields = _stat(pid)
            except OSError:
                raise BenchError(f"worker PID {pid} ended while it should have been settling") from None
            now[pid] = (fields[0], fields[11], fields[12])  # state, user and system CPU ticks
        if now == last and all(state == "S" for state, _, _ in now.values()):
            return
        if time.monotonic() > deadline:
            raise BenchError(f"the {len(pids)} workers did not settle within {timeout:g} s")
        last = now
        time.sleep(0.1)


def _finish(command: subprocess.Popen, what: str, timeout: float) -> float:
    """Wait for a command started earlier; its exit's time.monotonic().  BenchError if it failed."""
    try:
        out, err = command.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        command.kill()
        command.communicate()
        raise BenchError(f"{what} did not return within {timeout:g} s") from None
    if command.returncode:
        raise BenchError(f"{what} failed (exit {command.returncode}): {(err or out).strip()[-500:]}")
    return time.monotonic()


def _systemd() -> Tuple[Optional[List[str]], str]:
    """The options that make systemd-run and systemctl reach a service manager (the
    system's as root, else the user's), or None and why there is none to use."""
    if shutil.which("systemd-run") is None or shutil.which("systemctl") is None:
        return None, "no systemd-run or systemctl on PATH"
    if not os.path.isdir("/run/systemd/system"):
        try:
            with open("/proc/1/comm") as f:
                init = f.read().strip()
        except OSError:
            init = "unknown"
        return None, f"systemd is not the init system here (PID 1 is {init})"
    scope = [] if os.geteuid() == 0 else ["--user"]
    try:
        probe = subprocess.run(["systemd-run", *scope, "--quiet", "--wait", "--collect", "true"],
                               capture_output=True, text=True, timeout=30)
    except subprocess.TimeoutExpired:
        return None, f"systemd-run {' '.join(scope)} true did not return within 30 s"
    if probe.returncode:
        lines = (probe.stderr or probe.stdout).strip().splitlines() or [f"exit {probe.returncode}"]
        return None, f"systemd-run {' '.join(scope)} cannot start a unit: {lines[-1]}".replace("  ", " ")
    return scope, ""


class Peer:
    """One supervisor's turn in a run: a fresh database, a project root, N idle workers."""

    key = ""
    label = ""

    def __init__(self, server: pgserver.Server, base: str, n: int, number: int, window: float) -> None:
        self.server = server
        self.n = n
        self.window = window
        self.database = f"peer_{self.key}_{n}_{number}"
        self.dir = tempfile.mkdtemp(prefix=f"{self.key}-n{n}-run{number}-", dir=base)
        self.root = os.path.join(self.dir, "root")
        self.env = {k: v for k, v in os.environ.items()
                    if not k.startswith("PG") and k not in (
                        "PYTHONDONTWRITEBYTECODE", "UNIPHANT_STATE_DIR", "NOTIFY_SOCKET",
                        "WATCHDOG_USEC", "WATCHDOG_PID")}
        self.env.update(server.env(self.database), PYTHONPATH=REPO, HOME=self.dir)
        self.db = None
        self.samples: Dict[str, List[float]] = {}
        self.details: Dict[str, Any] = {"peer": self.key, "n": n, "run": number}

    # -- what each supervisor does its own way -----------------------------

    def prepare(self) -> None:
        """Everything up to the moment before the workers are started."""
        raise NotImplementedError

    def start_all(self) -> Optional[subprocess.Popen]:
        """Start the N workers; the command still running, if any."""
        raise NotImplementedError

    def stop_all(self) -> Optional[subprocess.Popen]:
        """Stop the N workers; the command still running, if any."""
        raise NotImplementedError

    def supervisor_pid(self) -> int:
        raise NotImplementedError

    def stop_supervisor(self) -> None:
        """Stop the supervisor and, with it, whatever it still runs."""
        raise NotImplementedError

    # -- SQL ---------------------------------------------------------------

    def rows(self, query: str, *params: Any) -> list:
        cursor = self.db.cursor()
        cursor.execute(query, params)
        return cursor.fetchall() if cursor.description else []

    def value(self, query: str, *params: Any) -> Any:
        rows = self.rows(query, *params)
        return rows[0][0] if rows else None

    def pids(self) -> Dict[str, int]:
        """worker id -> PID of the workers' live process rows."""
        return {str(w): p for w, p in self.rows(
            "SELECT worker_id, pid FROM uniphant.processes WHERE worker_type = %s", TYPE)}

    def add(self, key: str, value: float) -> None:
        self.samples.setdefault(key, []).append(value)

    def cpu(self, workers: List[int]) -> Tuple[float, float]:
        """CPU seconds so far of (the supervisor with the workers it reaped, and the
        workers; PostgreSQL less the benchmark's own session): what a step costs,
        whatever else loads the machine meanwhile."""
        with open(os.path.join(self.server.data, "postmaster.pid")) as f:
            postmaster = int(f.readline())
        own = self.value("SELECT pg_backend_pid()")
        return (_cpu(self.supervisor_pid(), reaped=True) + sum(map(_cpu, workers)),
                _server_cpu(postmaster, own))

    # -- the run -------------------------------------------------------------

    def setup(self) -> None:
        self.server.create_database(self.database)
        self.db = self.server.connect(self.database)
        self.db.execute_simple(STAMPS)
        files = {"workers/bench/idle.py": IDLE}
        if POOL is not None:  # the workers through the pool; a manager connects directly
            files["workers/bench/uniphant.conf"] = (f"PGHOST={POOL.server.dir}\nPGPORT={POOL.port}\n"
                                                    "pooler=transaction\n")
        _fleet_root(self.root, files)
        self.prepare()

    def teardown(self) -> None:
        try:
            self.stop_supervisor()
        finally:
            left = _end_processes_in(self.dir)
            if left:
                self.details["left_running_after_stop"] = left
            if self.db is not None:
                self.db.close()
                self.db = None
                conn = self.server.connect()
                try:
                    conn.cursor().execute(f'DROP DATABASE IF EXISTS "{self.database}" WITH (FORCE)')
                finally:
                    conn.close()
            shutil.rmtree(self.dir, ignore_errors=True)

    def measure_start(self) -> None:
        def registered() -> Optional[float]:
            count, last = self.rows(
                "SELECT count(*), extract(epoch FROM max(first))::float8 FROM ("
                "SELECT min(at) AS first FROM bench_events WHERE tbl = 'processes' AND op = 'INSERT' "
                "AND worker_type = %s GROUP BY worker_id) s", TYPE)[0]
            return last if count >= self.n else None

        timeout = 60 + self.n * 0.5
        cpu0 = self.cpu([])
        started, clock = time.time(), time.monotonic()
        command = self.start_all()
        last = _wait_until(registered, timeout, f"all {self.n} workers to register", every=0.05)
        self.add("start_all", last - started)
        cpu1 = self.cpu(list(self.pids().values()))
        self.add("start_cpu", sum(cpu1) - sum(cpu0))
        self.details["start_cpu_s"] = {"supervisor_and_workers": cpu1[0] - cpu0[0], "postgresql": cpu1[1] - cpu0[1]}
        if command is not None:
            self.details["start_command_s"] = _finish(command, "the start command", timeout) - clock
        def live() -> Optional[Dict[str, int]]:
            pids = self.pids()
            return pids if len(pids) == self.n else None

        pids = _wait_until(live, 30, f"{self.n} live process rows")
        _wait_settled(list(pids.values()), 60 + self.n * 0.1)

    def measure_idle(self) -> None:
        workers = list(self.pids().values())
        supervisor = self.supervisor_pid()
        cpu0 = (sum(map(_cpu, workers)), _cpu(supervisor), self.cpu([])[1])
        since, started = self.value("SELECT now()"), time.monotonic()
        time.sleep(self.window)  # the measuring window
        cpu1 = (sum(map(_cpu, workers)), _cpu(supervisor), self.cpu([])[1])
        elapsed = time.monotonic() - started
        self.add("workers_cpu", (cpu1[0] - cpu0[0]) / elapsed * 100)
        self.add("supervisor_cpu", (cpu1[1] - cpu0[1]) / elapsed * 100)
        self.add("server_cpu", (cpu1[2] - cpu0[2]) / elapsed * 100)
        # Each row's heartbeat_at is its last write: over a window of one heartbeat
        # period every worker writes once, so the rows written in it are its writes.
        self.add("heartbeats", self.value("SELECT count(*) FROM uniphant.processes WHERE worker_type = %s "
                                          "AND heartbeat_at > %s", TYPE, since) / elapsed)
        sizes = [m for m in map(_memory_mb, workers) if m is not None]
        self.add("worker_pss", statistics.median(pss for _, pss in sizes))
        self.details["worker_rss_mb"] = statistics.median(rss for rss, _ in sizes)
        memory = _memory_mb(supervisor)
        if memory is not None:
            self.add("supervisor_pss", memory[1])

    def measure_kills(self) -> None:
        for worker, pid in list(self.pids().items())[:KILLS]:
            since = time.time()
            os.kill(pid, signal.SIGKILL)
            again = _wait_until(lambda: self.value(
                "SELECT extract(epoch FROM min(at))::float8 FROM bench_events WHERE tbl = 'processes' "
                "AND op = 'INSERT' AND worker_id = %s::uuid AND at > to_timestamp(%s)", worker, since),
                60, "a killed worker's replacement to register", every=0.01)
            self.add("kill_restart", (again - since) * 1000)
            replacement = _wait_until(lambda: self.value(
                "SELECT pid FROM uniphant.processes WHERE worker_id = %s::uuid AND pid <> %s", worker, pid),
                30, "the replacement's process row")
            _wait_settled([replacement], 60)

    def measure_row_stops(self) -> None:
        """A deleted process row stops its process (each supervisor then starts the worker again)."""
        for worker, pid in list(self.pids().items())[KILLS:2 * KILLS]:
            pidfd = os.pidfd_open(pid)
            try:
                started = time.monotonic()
                self.rows("DELETE FROM uniphant.processes WHERE worker_id = %s::uuid", worker)
                exited = _wait_exits({pidfd: worker}, 30)[worker]
            finally:
                os.close(pidfd)
            self.add("row_stop", (exited - started) * 1000)
            replacement = _wait_until(lambda: self.value(
                "SELECT pid FROM uniphant.processes WHERE worker_id = %s::uuid AND pid <> %s", worker, pid),
                60, "the stopped worker's replacement")
            _wait_settled([replacement], 60)

    def measure_stop(self) -> None:
        timeout = 60 + self.n * 0.1
        pidfds: Dict[int, str] = {}
        try:
            workers = self.pids()
            for worker, pid in workers.items():
                pidfds[os.pidfd_open(pid)] = worker
            cpu0 = self.cpu(list(workers.values()))
            started = time.monotonic()
            command = self.stop_all()
            exited = _wait_exits(pidfds, timeout)
            # A worker's CPU counts in its supervisor's once reaped.
            _wait_until(lambda: not set(_children(self.supervisor_pid())) & set(workers.values()), 30,
                        "the supervisor to reap its workers")
            cpu1 = self.cpu([])
        finally:
            for fd in pidfds:
                os.close(fd)
        self.add("stop_all", (max(exited.values()) - started) * 1000)
        self.add("stop_cpu", sum(cpu1) - sum(cpu0))
        self.details["stop_cpu_s"] = {"supervisor_and_workers": cpu1[0] - cpu0[0], "postgresql": cpu1[1] - cpu0[1]}
        if command is not None:
            self.details["stop_command_ms"] = (_finish(command, "the stop command", timeout) - started) * 1000


class Supervisord(Peer):
    key = "supervisord"
    label = "supervisord"
    daemon: Optional[subprocess.Popen] = None

    def prepare(self) -> None:
        self.conf = os.path.join(self.dir, "supervisord.conf")
        self.socket = os.path.join(self.dir, "supervisor.sock")
        os.makedirs(os.path.join(self.dir, "log"))
        # Each program holds three pipes and two log files open in supervisord.
        lines = ["[unix_http_server]", f"file={self.socket}", "",
                 "[supervisord]", f"logfile={self.dir}/supervisord.log",
                 f"pidfile={self.dir}/supervisord.pid", f"childlogdir={self.dir}/log",
                 "nodaemon=true", "silent=true", f"minfds={max(1024, 8 * self.n + 64)}", "",
                 "[rpcinterface:supervisor]",
                 "supervisor.rpcinterface_factory = supervisor.rpcinterface:make_main_rpcinterface", "",
                 "[supervisorctl]", f"serverurl=unix://{self.socket}", ""]
        for i in range(self.n):
            lines += [f"[program:w{i}]",
                      f"command={PYTHON} workers/bench/idle.py {uuid.uuid4()} start -f",
                      f"directory={self.root}", "autostart=false", "autorestart=true", ""]
        with open(self.conf, "w") as f:
            f.write("\n".join(lines))
        supervisord = os.path.join(BIN, "supervisord")
        if not os.access(supervisord, os.X_OK):
            raise BenchError(f"no supervisord beside {PYTHON}: install requirements-dev.txt (dev/setup)")
        # A session of its own: a Ctrl-C reaches the benchmark alone, which then stops it.
        self.daemon = subprocess.Popen([supervisord, "-c", self.conf], cwd=self.root, env=self.env,
                                       stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                       stderr=subprocess.DEVNULL, start_new_session=True)
        _wait_until(lambda: self.daemon.poll() is not None or self._answers(), 60, "supervisord to listen")
        if self.daemon.poll() is not None:
            raise BenchError(f"supervisord exited at once (status {self.daemon.returncode}): "
                             f"{self._log_tail()}")

    def _answers(self) -> bool:
        with socket.socket(socket.AF_UNIX) as s:
            try:
                s.connect(self.socket)
            except OSError:
                return False
        return True

    def _log_tail(self) -> str:
        try:
            with open(os.path.join(self.dir, "supervisord.log")) as f:
                return " / ".join(f.read().strip().splitlines()[-3:]) or "(its log is empty)"
        except OSError:
            return "(no log)"

    def _ctl(self, *args: str) -> subprocess.Popen:
        return subprocess.Popen([os.path.join(BIN, "supervisorctl"), "-c", self.conf, *args], cwd=self.root,
                                env=self.env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)

    def start_all(self) -> Optional[subprocess.Popen]:
        return self._ctl("start", "all")

    def stop_all(self) -> Optional[subprocess.Popen]:
        return self._ctl("stop", "all")

    def supervisor_pid(self) -> int:
        return self.daemon.pid

    def stop_supervisor(self) -> None:
        if self.daemon is None or self.daemon.poll() is not None:
            return
        self.daemon.terminate()  # supervisord stops its programs, then exits
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.daemon.wait(timeout=60)
        if self.daemon.poll() is None:
            self.daemon.kill()
            self.daemon.wait()


class Uniphant(Peer):
    key = "uniphant"
    label = "uniphant"
    manager: Optional[str] = None

    def prepare(self) -> None:
        self.manager = str(uuid.uuid4())
        start = subprocess.run([PYTHON, "workers/uniphant/manager.py", self.manager, "start"], cwd=self.root,
                               env=self.env, capture_output=True, text=True, timeout=60)
        if start.returncode:
            raise BenchError(f"the manager did not start (exit {start.returncode}): "
                             f"{(start.stderr or start.stdout).strip()}")
        _wait_until(lambda: self.value("SELECT count(*) FROM uniphant.managers m JOIN uniphant.processes p "
                                       "ON p.id = m.process_id") == 1, 30, "the manager to register")

    def start_all(self) -> Optional[subprocess.Popen]:
        self.value("SELECT uniphant.scale(%s, %s)", TYPE, self.n)
        return None

    def stop_all(self) -> Optional[subprocess.Popen]:
        self.rows("DELETE FROM uniphant.workers WHERE worker_type = %s", TYPE)
        return None

    def supervisor_pid(self) -> int:
        return self.value("SELECT pid FROM uniphant.processes WHERE worker_id = %s::uuid", self.manager)

    def stop_supervisor(self) -> None:
        if self.manager is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                subprocess.run([PYTHON, "workers/uniphant/manager.py", self.manager, "stop"], cwd=self.root,
                               env=self.env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=60)


class Systemd(Peer):
    key = "systemd"
    label = "systemd-run"
    scope: List[str] = []  # set by main() from _systemd()
    started = False

    def prepare(self) -> None:
        # No dash: in a slice's name a dash nests it in a parent slice.
        self.slice = f"uniphant_peer_{uuid.uuid4().hex[:12]}"

    def _env(self) -> List[str]:
        """What the worker needs of the benchmark's environment: a unit starts with a clean one."""
        keep = [*self.server.env(self.database), "PYTHONPATH", "HOME"]
        return [f"--setenv={key}={self.env[key]}" for key in keep]

    def start_all(self) -> Optional[subprocess.Popen]:
        self.started = True
        for i in range(self.n):
            run = subprocess.run(
                ["systemd-run", *self.scope, "--quiet", "--collect", f"--unit={self.slice}_w{i}",
                 f"--slice={self.slice}.slice", "--property=Restart=always",
                 f"--working-directory={self.root}", *self._env(),
                 PYTHON, "workers/bench/idle.py", str(uuid.uuid4()), "start", "-f"],
                capture_output=True, text=True, timeout=60)
            if run.returncode:
                raise BenchError(f"systemd-run failed (exit {run.returncode}): {run.stderr.strip()}")
        return None

    def stop_all(self) -> Optional[subprocess.Popen]:
        return subprocess.Popen(["systemctl", *self.scope, "stop", f"{self.slice}.slice"], cwd=self.root,
                                stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True)

    def supervisor_pid(self) -> int:
        if not self.scope:
            return 1
        return int(subprocess.run(["systemctl", "show", f"user@{os.getuid()}.service", "--property=MainPID",
                                   "--value"], capture_output=True, text=True, timeout=30).stdout)

    def stop_supervisor(self) -> None:
        """The units stop (the service manager itself runs on); --collect unloads them."""
        if self.started:
            with contextlib.suppress(subprocess.TimeoutExpired):
                subprocess.run(["systemctl", *self.scope, "stop", f"{self.slice}.slice"],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=120)


def run_peer(kind: Type[Peer], server: pgserver.Server, base: str, n: int, number: int,
             window: float) -> Peer:
    peer = kind(server, base, n, number, window)
    try:
        peer.setup()
        steps = (("start all", peer.measure_start), ("idle window", peer.measure_idle),
                 ("kill -9", peer.measure_kills), ("row deleted", peer.measure_row_stops),
                 ("stop all", peer.measure_stop))
        for name, step in steps:
            print(f"  N={n} run {number}, {peer.label}: {name}", file=sys.stderr, flush=True)
            step()
    finally:
        with pgserver.interrupts_deferred():
            peer.teardown()
    return peer


# ---------------------------------------------------------------------------
# Reporting
# ---------------------------------------------------------------------------

def _summarise(peers: List[Peer]) -> Dict[str, Dict[str, Dict[str, Any]]]:
    """measure key -> peer key -> median, min, max and the samples, over all runs."""
    summary: Dict[str, Dict[str, Dict[str, Any]]] = {}
    for key, _, _, _ in MEASURES:
        for peer in peers:
            summary.setdefault(key, {}).setdefault(peer.key, {"samples": []})["samples"] += peer.samples.get(key, [])
        for cell in summary[key].values():
            if cell["samples"]:
                cell.update(median=statistics.median(cell["samples"]), min=min(cell["samples"]),
                            max=max(cell["samples"]))
    return summary


def _cell(cell: Dict[str, Any], unit: str, decimals: int) -> str:
    if not cell.get("samples"):
        return ""
    text = f"{cell['median']:,.{decimals}f} {unit}"
    if len(cell["samples"]) > 1:
        text += f" ({cell['min']:,.{decimals}f}-{cell['max']:,.{decimals}f})"
    return text


def _ratio(cell: Dict[str, Any], peer: Dict[str, Any]) -> str:
    if not cell.get("samples") or not peer.get("samples") or peer["median"] == 0:
        return ""
    return f"{cell['median'] / peer['median']:.2f}"


def _print_table(n: int, runs: int, labels: Dict[str, str], summary: Dict[str, Dict[str, Dict[str, Any]]],
                 notes: List[str]) -> None:
    """One table: a column per supervisor, then uniphant's ratio to each peer."""
    peers = [key for key in labels if key != "uniphant"]
    header = ["measure", *(labels[k] for k in peers), "uniphant",
              *(("ratio",) if len(peers) == 1 else (f"ratio to {labels[k]}" for k in peers))]
    table = []
    for key, label, unit, decimals in MEASURES:
        cells = summary[key]
        table.append([label, *(_cell(cells.get(k, {}), unit, decimals) for k in peers),
                      _cell(cells.get("uniphant", {}), unit, decimals),
                      *(_ratio(cells.get("uniphant", {}), cells.get(k, {})) for k in peers)])
    widths = [max(len(row[i]) for row in [header, *table]) for i in range(len(header))]
    print(f"\nN = {n} idle workers, {runs} run{'s' * (runs > 1)}: median (min-max)\n")
    print("| " + " | ".join(h.ljust(w) if i == 0 else h.rjust(w) for i, (h, w) in enumerate(zip(header, widths)))
          + " |")
    print("|" + "|".join("-" * (w + 2) if i == 0 else "-" * (w + 1) + ":" for i, w in enumerate(widths)) + "|")
    for row in table:
        print("| " + " | ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths)))
              + " |")
    for note in notes:
        print(note)


def _notes(peers: List[Peer]) -> List[str]:
    """What the commands took themselves, and anything left running."""
    notes = []
    for kind, start, stop in ((Supervisord, "supervisorctl start all", "supervisorctl stop all"),
                              (Systemd, "", "systemctl stop <slice>")):
        starts = [p.details["start_command_s"] for p in peers if isinstance(p, kind) and "start_command_s" in p.details]
        stops = [p.details["stop_command_ms"] for p in peers if isinstance(p, kind) and "stop_command_ms" in p.details]
        if starts:
            notes.append(f"`{start}` returned after {statistics.median(starts):.2f} s (median; it waits until "
                         f"each program has run startsecs=1)")
        if stops:
            notes.append(f"`{stop}` returned after {statistics.median(stops):,.0f} ms (median)")
    left = [(p.label, p.details["left_running_after_stop"]) for p in peers if p.details.get("left_running_after_stop")]
    for label, count in left:
        notes.append(f"WARNING: {count} processes of {label} were still running after it was stopped")
    return notes


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=3, help="runs per size (default 3)")
    parser.add_argument("--sizes", default="200", help="numbers of idle workers, comma-separated (default 200)")
    parser.add_argument("--window", type=float, default=None,
                        help="seconds of the idle window (default: one heartbeat period, 0.35 stale_after)")
    parser.add_argument("--peers", default="supervisord,uniphant,systemd",
                        help="which supervisors, comma-separated (default all: supervisord,uniphant,systemd)")
    parser.add_argument("--pgbouncer", type=int, default=0, metavar="POOL_SIZE",
                        help="the workers reach the server through PgBouncer in transaction mode, "
                             "with a pool of POOL_SIZE server connections (default: directly)")
    args = parser.parse_args(argv)
    try:
        sizes = [int(s) for s in args.sizes.split(",") if s.strip()]
    except ValueError:
        parser.error("--sizes: a comma-separated list of whole numbers")
    if args.window is None:
        import uniphant
        args.window = 0.35 * float(uniphant.RUNTIME_DEFAULTS["stale_after"])
    if not sizes or min(sizes) < 1 or args.runs < 1 or args.window <= 0:
        parser.error("sizes and runs must be at least 1, --window above 0")
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, signal.default_int_handler)  # end as Ctrl-C does: everything cleaned up

    chosen = {key.strip() for key in args.peers.split(",") if key.strip()}
    if not chosen or chosen - {kind.key for kind in (Supervisord, Uniphant, Systemd)}:
        parser.error("--peers: a comma-separated list of supervisord, uniphant, systemd")
    scope, skipped = _systemd() if Systemd.key in chosen else (None, "not chosen (--peers)")
    kinds: List[Type[Peer]] = [kind for kind in (Supervisord, Uniphant) if kind.key in chosen]
    if scope is not None:
        Systemd.scope = scope
        kinds.append(Systemd)
    if scope is None:
        print(f"systemd-run: skipped, {skipped}", file=sys.stderr)

    server = None
    base = tempfile.mkdtemp(prefix="uniphant-peer-")
    results: Dict[int, List[Peer]] = {}
    try:
        try:
            server = pgserver.Server()
            server.init()
            with open(os.path.join(server.data, "postgresql.conf"), "a") as f:
                f.write(f"max_connections = {max(300, max(sizes) + 60)}\n"
                        "fsync = on\nsynchronous_commit = on\nfull_page_writes = on\n")
            server.start()
            if args.pgbouncer:
                global POOL
                POOL = pgserver.PgBouncer(server, pool_size=args.pgbouncer).start()
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
                turn = (number - 1) % len(kinds)  # rotated, so that no supervisor always goes first
                for kind in kinds[turn:] + kinds[:turn]:
                    results.setdefault(n, []).append(run_peer(kind, server, base, n, number, args.window))
    except BenchError as e:
        print(f"bench: {e}", file=sys.stderr)
        return 1
    finally:
        with pgserver.interrupts_deferred():
            _end_processes_in(base)
            if POOL is not None:
                POOL.stop()
            if server is not None:
                server.destroy()
            shutil.rmtree(base, ignore_errors=True)

    revision = _revision()
    labels = {kind.key: kind.label for kind in kinds}
    print(f"\nuniphant peer benchmark at {revision}; {machine['cpu']}, {machine['cores']} cores, "
          f"Python {machine['python']}, PostgreSQL {machine['postgresql']} ({machine['server']}); "
          f"idle window {args.window:g} s" + (f"; workers through PgBouncer (transaction mode, a pool of "
                                             f"{args.pgbouncer})" if args.pgbouncer else ""))
    if scope is None:
        print(f"systemd-run: skipped, {skipped}")
    sizes_out = []
    for n, peers in results.items():
        summary = _summarise(peers)
        _print_table(n, args.runs, labels, summary, _notes(peers))
        sizes_out.append({"n": n, "summary": summary,
                          "runs": [dict(p.details, samples=p.samples) for p in peers]})
    out = os.path.join(REPO, "bench", "results", "peer.json")
    os.makedirs(os.path.dirname(out), exist_ok=True)
    with open(out, "w") as f:
        json.dump({"machine": machine, "revision": revision,
                   "settings": {"runs": args.runs, "sizes": sizes, "window_s": args.window, "kills": KILLS,
                                "pgbouncer_pool": args.pgbouncer or None},
                   "systemd": {"measured": scope is not None, "skipped": skipped}, "sizes": sizes_out},
                  f, indent=1)
    print(f"\nsamples: {os.path.relpath(out, REPO)}")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:  # everything is gone already (main's finally)
        print("bench: interrupted", file=sys.stderr)
        sys.exit(130)
