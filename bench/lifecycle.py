"""The lifecycle benchmark: how fast uniphant starts, stops and notices, and how
quiet it is on the database.

Starts a throwaway PostgreSQL (as the tests do, dev/pgserver.py), runs real
worker scripts with this interpreter, and prints a table of medians with min
and max over repeated runs; the raw samples go to bench/results/lifecycle.json.

    python bench/lifecycle.py [--runs N]

Timings are wall-clock, taken by this process around what a user would do.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from typing import Callable, Dict, List, Optional

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "dev"))
import pgserver  # noqa: E402

PYTHON = sys.executable

IDLE = """\
from uniphant import main

def work(config, logger, connection):
    pass

if __name__ == "__main__":
    main(work)
"""

SPIN = """\
import time
from uniphant import alive, main

def work(config, logger, connection):
    calls, started = 0, time.monotonic()
    while alive(config, connection):
        calls += 1
    logger.info("alive() calls per second: %d", calls / (time.monotonic() - started))

if __name__ == "__main__":
    main(work)
"""

# Counts every UPDATE of processes: the heartbeat writes.
COUNTER = """
CREATE UNLOGGED TABLE bench_updates (at timestamptz NOT NULL);
CREATE FUNCTION bench_count() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN INSERT INTO public.bench_updates VALUES (clock_timestamp()); RETURN NULL; END $$;
CREATE TRIGGER bench_count AFTER UPDATE ON uniphant.processes FOR EACH ROW EXECUTE FUNCTION bench_count();
"""


class Bench:
    def __init__(self, server: pgserver.Server, root: str) -> None:
        self.server = server
        self.root = root
        self.db = server.connect("bench")
        self.env = {k: v for k, v in os.environ.items()
                    if not k.startswith("PG") and k != "PYTHONDONTWRITEBYTECODE"}
        self.env.update(server.env("bench"), PYTHONPATH=REPO, HOME=root)

    def sql(self, query: str):
        cursor = self.db.cursor()
        cursor.execute(query)
        return cursor.fetchall() if cursor.description else None

    def row_exists(self) -> bool:
        return self.sql("SELECT EXISTS (SELECT 1 FROM processes)")[0][0]

    def wait_row(self, present: bool = True, timeout: float = 10.0) -> float:
        deadline = time.perf_counter() + timeout
        while self.row_exists() != present:
            if time.perf_counter() > deadline:
                raise RuntimeError("timed out waiting for the process row")
        return time.perf_counter()

    def command(self, script: str, worker_id: str, *args: str) -> List[str]:
        """A worker script's command line: workers/bench/ has the defaults, workers/quiet/
        the smallest stale_after (3 s), for a heartbeat period (1.05 s) that the
        updates window spans ten times."""
        return [PYTHON, f"workers/{script}.py", worker_id, *args]

    def run(self, script: str, worker_id: str, *args: str) -> subprocess.CompletedProcess:
        return subprocess.run(self.command(script, worker_id, *args), cwd=self.root, env=self.env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, check=True)

    def popen(self, script: str, worker_id: str, *args: str) -> subprocess.Popen:
        return subprocess.Popen(self.command(script, worker_id, *args), cwd=self.root, env=self.env,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def daemon(self, script: str = "bench/idle") -> tuple:
        worker_id = str(uuid.uuid4())
        out = self.run(script, worker_id, "start").stdout
        return worker_id, int(out.strip().rsplit(" ", 1)[1].rstrip("."))

    # -- one sample of each measurement, in milliseconds -------------------

    def start_foreground_to_row(self) -> float:
        started = time.perf_counter()
        child = self.popen("bench/idle", str(uuid.uuid4()), "start", "-f")
        elapsed = self.wait_row() - started
        child.terminate()
        child.wait()
        self.wait_row(present=False)
        return elapsed * 1000

    def start_daemon(self) -> Dict[str, float]:
        worker_id = str(uuid.uuid4())
        started = time.perf_counter()
        child = subprocess.Popen(self.command("bench/idle", worker_id, "start"), cwd=self.root,
                                 env=self.env, stdout=subprocess.DEVNULL)
        row_at = command_at = None
        while row_at is None or command_at is None:
            if command_at is None and child.poll() is not None:
                command_at = time.perf_counter()
            if row_at is None and self.row_exists():
                row_at = time.perf_counter()
        self.stop_daemon(worker_id)
        return {"daemon start: row": (row_at - started) * 1000,
                "daemon start: command": (command_at - started) * 1000}

    def stop_daemon(self, worker_id: str) -> float:
        started = time.perf_counter()
        self.run("bench/idle", worker_id, "stop")
        elapsed = time.perf_counter() - started
        self.wait_row(present=False)
        return elapsed * 1000

    def stop(self) -> float:
        worker_id, _ = self.daemon()
        return self.stop_daemon(worker_id)

    def sigterm_to_exit(self) -> float:
        child = self.popen("bench/idle", str(uuid.uuid4()), "start", "-f")
        self.wait_row()
        _wait_idle(child.pid)
        started = time.perf_counter()
        child.send_signal(signal.SIGTERM)
        child.wait()
        return (time.perf_counter() - started) * 1000

    def row_deleted_to_exit(self, script: str = "bench/idle") -> float:
        child = self.popen(script, str(uuid.uuid4()), "start", "-f")
        self.wait_row()
        if script == "bench/idle":
            _wait_idle(child.pid)
        started = time.perf_counter()
        self.sql("DELETE FROM processes")
        child.wait()
        return (time.perf_counter() - started) * 1000

    def wall_ms(self, argv: List[str]) -> float:
        """The wall time of one command, in milliseconds."""
        started = time.perf_counter()
        subprocess.run(argv, cwd=self.root, env=self.env, stdout=subprocess.DEVNULL)
        return (time.perf_counter() - started) * 1000

    def status(self) -> float:
        return self.wall_ms(self.command("bench/idle", str(uuid.uuid4()), "status"))

    def idle_rss(self) -> float:
        worker_id, pid = self.daemon()
        _wait_idle(pid)
        rss = _rss_kib(pid) / 1024
        self.stop_daemon(worker_id)
        return rss

    def updates_per_second(self, script: str, seconds: float = 10.5) -> float:
        """Heartbeat writes a second over a window of ten heartbeat periods."""
        child = self.popen(script, str(uuid.uuid4()), "start", "-f")
        self.wait_row()
        self.sql("TRUNCATE bench_updates")
        time.sleep(seconds)  # the window measured
        count = self.sql("SELECT count(*) FROM bench_updates")[0][0]
        child.terminate()
        child.wait()
        self.wait_row(present=False)
        return count / seconds

    def floor_python(self) -> float:
        return self.wall_ms([PYTHON, "-c", "pass"])

    def _bare_connect(self) -> str:
        return ("import pg8000.dbapi, time\n"
                f"c = pg8000.dbapi.connect(user='postgres', database='bench', "
                f"unix_sock='{self.server.dir}/.s.PGSQL.{self.server.port}')\n")

    def floor_pg8000(self) -> float:
        return self.wall_ms([PYTHON, "-c", self._bare_connect() +
                             "cur = c.cursor(); cur.execute('SELECT 1'); cur.fetchall()\n"])

    def bare_pg8000_rss(self) -> float:
        code = self._bare_connect() + "print(flush=True); time.sleep(60)\n"
        child = subprocess.Popen([PYTHON, "-c", code], env=self.env, stdout=subprocess.PIPE)
        child.stdout.readline()
        _wait_idle(child.pid)
        rss = _rss_kib(child.pid) / 1024
        child.kill()
        child.wait()
        return rss


def _wait_idle(pid: int, timeout: float = 10.0) -> None:
    """Wait until process pid is asleep and has used no CPU for 50 ms: started up,
    and in its wait."""
    deadline, last = time.monotonic() + timeout, None
    while True:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(") ", 1)[1].split()
        now = (fields[0], fields[11], fields[12])  # state, user and system CPU ticks
        if now == last and now[0] == "S":
            return
        if time.monotonic() > deadline:
            raise RuntimeError(f"process {pid} did not settle within {timeout:g} s")
        last = now
        time.sleep(0.05)


def _rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for {pid}")


def _repeat(sample: Callable[[], object], runs: int) -> Dict[str, List[float]]:
    samples: Dict[str, List[float]] = {}
    for _ in range(runs):
        value = sample()
        for name, number in (value.items() if isinstance(value, dict) else [("", value)]):
            samples.setdefault(name, []).append(number)
    return samples


def _machine(server: pgserver.Server) -> Dict[str, str]:
    model = "unknown"
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    conn = server.connect("bench")
    cursor = conn.cursor()
    cursor.execute("SHOW server_version")
    version = cursor.fetchone()[0]
    conn.close()
    return {"cpu": model, "cores": str(os.cpu_count()), "python": platform.python_version(),
            "postgresql": version, "kernel": platform.release()}


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=15, help="samples of each timing (default 15)")
    args = parser.parse_args(argv)

    try:
        server = pgserver.Server.started()
    except pgserver.ServerError as e:
        print(f"bench: the throwaway PostgreSQL could not be started: {e}", file=sys.stderr)
        return 1
    root = tempfile.mkdtemp(prefix="uniphant-bench-")
    try:
        server.create_database("bench")
        conn = server.connect("bench")
        conn.execute_simple(COUNTER)
        conn.close()
        for directory in ("bench", "quiet"):
            os.makedirs(os.path.join(root, "workers", directory), exist_ok=True)
            for name, text in (("idle", IDLE), ("spin", SPIN)):
                with open(os.path.join(root, "workers", directory, f"{name}.py"), "w") as f:
                    f.write(text)
        with open(os.path.join(root, "workers", "quiet", "uniphant.conf"), "w") as f:
            f.write("stale_after=3\n")
        bench = Bench(server, root)
        bench.status()  # compiles uniphant.py once, as an installed copy would be

        runs = args.runs
        rows = []  # (name, samples, unit, bound)
        floor_pg = _repeat(bench.floor_pg8000, runs)[""]
        rows.append(("floor: python -c pass", _repeat(bench.floor_python, runs)[""], "ms", None))
        rows.append(("floor: pg8000 import + connect + SELECT 1", floor_pg, "ms", None))
        start_fg = _repeat(bench.start_foreground_to_row, runs)[""]
        rows.append(("start -f until the row exists", start_fg, "ms",
                     statistics.median(floor_pg) + 25))
        for name, samples in _repeat(bench.start_daemon, runs).items():
            rows.append((name.replace("row", "until the row exists").replace("command", "command wall time"),
                         samples, "ms", None))
        rows.append(("stop wall time", _repeat(bench.stop, runs)[""], "ms", 80))
        rows.append(("SIGTERM to exit, foreground", _repeat(bench.sigterm_to_exit, runs)[""], "ms", 50))
        rows.append(("row deleted to exit", _repeat(bench.row_deleted_to_exit, runs)[""], "ms", 100))
        rows.append(("status wall time", _repeat(bench.status, runs)[""], "ms", 40))
        rows.append(("idle RSS", _repeat(bench.idle_rss, 3)[""], "MB", 30))
        rows.append(("bare pg8000 connection RSS", _repeat(bench.bare_pg8000_rss, 3)[""], "MB", None))
        rows.append(("heartbeats/s, stale_after 3, idle worker", [bench.updates_per_second("quiet/idle")],
                     "/s", 1))
        rows.append(("heartbeats/s, stale_after 3, alive() in a loop",
                     [bench.updates_per_second("quiet/spin")], "/s", 1))
        rows.append(("row deleted to exit, alive() in a tight loop",
                     _repeat(lambda: bench.row_deleted_to_exit("bench/spin"), 5)[""], "ms", 100))
        machine = _machine(server)
    finally:
        server.destroy()
        shutil.rmtree(root, ignore_errors=True)

    print(f"\nuniphant lifecycle benchmark: {runs} runs; {machine['cpu']}, {machine['cores']} cores, "
          f"Python {machine['python']}, PostgreSQL {machine['postgresql']}\n")
    print(f"| {'measure':<54} | {'median':>8} | {'min':>8} | {'max':>8} | {'bound':>8} |")
    print(f"|{'-' * 56}|{'-' * 9}:|{'-' * 9}:|{'-' * 9}:|{'-' * 9}:|")
    results = []
    for name, samples, unit, bound in rows:
        median = statistics.median(samples)
        verdict = "" if bound is None else ("ok" if median <= bound else "OVER")
        bound_text = "" if bound is None else f"<= {bound:.0f}"
        print(f"| {name + ' (' + unit + ')':<54} | {median:8.1f} | {min(samples):8.1f} | "
              f"{max(samples):8.1f} | {bound_text:>5} {verdict:<2} |")
        results.append({"measure": name, "unit": unit, "median": median, "min": min(samples),
                        "max": max(samples), "bound": bound, "samples": samples})
    out = os.path.join(REPO, "bench", "results", "lifecycle.json")
    os.makedirs(os.path.dirname(out), exist_ok=True)
    with open(out, "w") as f:
        json.dump({"machine": machine, "runs": runs, "results": results}, f, indent=1)
    print(f"\nsamples: {os.path.relpath(out, REPO)}")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:  # the server is gone already (main's finally)
        sys.exit(130)
