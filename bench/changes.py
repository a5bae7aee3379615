"""The changes benchmark: how the fleet takes a rolling restart and a manager
upgrade (docs/changing-the-fleet.md, "Changing the fleet").

Against a durable throwaway PostgreSQL (as bench/fleet.py), it measures, over
--runs runs each:

- a rolling restart of 50 idle any-host workers on two project roots (hosts),
  5 at a time: the wall time from restart_workers() until every worker runs a
  new process, and the fewest workers registered at any moment of it, sampled
  every 10 ms;
- a restart of a manager under 200 idle workers (python
  workers/uniphant/manager.py restart): the wall time until the new manager has
  adopted all 200, whether each kept its PID, and the restarts counted.

    python bench/changes.py [--runs 3]

Raw samples go to bench/results/changes.json.  Benchmarks are not tests: the
figures are medians with min and max.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Dict, List

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from fleet import IDLE, PYTHON, REPO, BenchError, _end_processes_in, _fleet_root, _wait_until  # noqa: E402

import pgserver  # noqa: E402  (dev/, on the path through fleet)

ROLL_WORKERS, ROLL_BATCH, UPGRADE_WORKERS = 50, 5, 200


class Fleet:
    """A database and project roots with a manager each, for one measurement."""

    def __init__(self, server: pgserver.Server, base: str, name: str, hosts: int) -> None:
        self.server, self.name = server, name
        self.dir = tempfile.mkdtemp(prefix=f"{name}-", dir=base)
        self.roots = [os.path.join(self.dir, f"host{i}") for i in range(hosts)]
        self.env = {k: v for k, v in os.environ.items()
                    if not k.startswith("PG") and k not in ("UNIPHANT_STATE_DIR", "NOTIFY_SOCKET")}
        self.env.update(server.env(name), PYTHONPATH=REPO, HOME=self.dir)
        server.create_database(name)
        self.db = server.connect(name)
        for root in self.roots:
            _fleet_root(root, {"workers/bench/idle.py": IDLE})
            self.manager(root, "start")

    def manager(self, root: str, command: str) -> float:
        """Run the root's manager script with command; its wall time."""
        started = time.monotonic()
        done = subprocess.run([PYTHON, "workers/uniphant/manager.py", command], cwd=root, env=self.env,
                              capture_output=True, text=True, timeout=120)
        if done.returncode:
            raise BenchError(f"manager {command} failed: {(done.stderr or done.stdout).strip()}")
        return time.monotonic() - started

    def value(self, query: str, *params):
        cursor = self.db.cursor()
        cursor.execute(query, params)
        return cursor.fetchone()[0]

    def pids(self) -> Dict[str, int]:
        cursor = self.db.cursor()
        cursor.execute("SELECT worker_id::text, pid FROM uniphant.processes WHERE worker_type = 'bench.idle'")
        return dict(cursor.fetchall())

    def running(self) -> int:
        return self.value("SELECT count(*) FROM uniphant.fleet WHERE worker_type = 'bench.idle' "
                          "AND state = 'running'")

    def close(self) -> None:
        for root in self.roots:
            subprocess.run([PYTHON, "workers/uniphant/manager.py", "stop"], cwd=root, env=self.env,
                           capture_output=True, timeout=120)
        _end_processes_in(self.dir)
        self.db.close()
        shutil.rmtree(self.dir, ignore_errors=True)


def rolling_restart(server: pgserver.Server, base: str, number: int) -> Dict[str, float]:
    fleet = Fleet(server, base, f"roll_{number}", hosts=2)
    try:
        fleet.value("SELECT uniphant.scale('bench.idle', %s)", ROLL_WORKERS)
        _wait_until(lambda: fleet.running() == ROLL_WORKERS, 60, "the workers to run")
        before = fleet.pids()
        started, fewest = time.monotonic(), ROLL_WORKERS
        fleet.value("SELECT uniphant.restart_workers('bench.idle', %s)", ROLL_BATCH)
        while fleet.value("SELECT count(*) FROM uniphant.rolls") or fleet.running() < ROLL_WORKERS:
            fewest = min(fewest, fleet.value("SELECT count(*) FROM uniphant.processes p WHERE "
                                             "worker_type = 'bench.idle' AND uniphant.process_live(p)"))
            if time.monotonic() - started > 300:
                raise BenchError("the rolling restart did not end within 300 s")
            time.sleep(0.01)
        elapsed = time.monotonic() - started
        after = fleet.pids()
        if any(after.get(w) == pid for w, pid in before.items()):
            raise BenchError("the rolling restart left a worker on its old process")
        return {"roll_seconds": elapsed, "roll_fewest_registered": fewest}
    finally:
        fleet.close()


def manager_restart(server: pgserver.Server, base: str, number: int) -> Dict[str, float]:
    fleet = Fleet(server, base, f"upgrade_{number}", hosts=1)
    try:
        root = fleet.roots[0]
        with open(os.path.join(root, ".host_id")) as f:
            host = f.read().strip()
        fleet.value("SELECT uniphant.scale('bench.idle', %s, %s::uuid)", UPGRADE_WORKERS, host)
        _wait_until(lambda: fleet.running() == UPGRADE_WORKERS, 120, "the workers to run")
        before = fleet.pids()
        started = time.monotonic()
        fleet.manager(root, "restart")
        log = os.path.join(root, "log", "uniphant.manager")

        def adopted() -> int:
            with open(os.path.join(log, os.listdir(log)[0]), encoding="utf-8") as f:
                return f.read().rsplit("leaving", 1)[-1].count("adopted worker")
        _wait_until(lambda: adopted() == UPGRADE_WORKERS and fleet.running() == UPGRADE_WORKERS, 120,
                    "the new manager to adopt every worker", every=0.01)
        elapsed = time.monotonic() - started
        kept = sum(1 for w, pid in fleet.pids().items() if before.get(w) == pid)
        restarts = fleet.value("SELECT coalesce(sum(restarts), 0) FROM uniphant.fleet "
                               "WHERE worker_type = 'bench.idle'")
        return {"upgrade_seconds": elapsed, "upgrade_kept_pids": kept, "upgrade_restarts": restarts}
    finally:
        fleet.close()


def main(argv: List[str] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=3, help="runs of each measurement (default 3)")
    args = parser.parse_args(argv)
    server, base = None, tempfile.mkdtemp(prefix="uniphant-changes-")
    samples: Dict[str, List[float]] = {}
    try:
        server = pgserver.Server()
        server.init(settings=f"max_connections = {UPGRADE_WORKERS + 60}\n"
                             "fsync = on\nsynchronous_commit = on\nfull_page_writes = on\n")
        server.start()
        for number in range(1, args.runs + 1):
            for measure in (rolling_restart, manager_restart):
                for key, value in measure(server, base, number).items():
                    samples.setdefault(key, []).append(value)
    except (BenchError, pgserver.ServerError) as e:
        print(f"bench: {e}", file=sys.stderr)
        return 1
    finally:
        with pgserver.interrupts_deferred():
            _end_processes_in(base)
            if server is not None:
                server.destroy()
            shutil.rmtree(base, ignore_errors=True)
    print(f"\nuniphant changes benchmark: {args.runs} runs\n")
    print(f"| {'measure':<62} | {'median':>8} | {'min':>8} | {'max':>8} |")
    print(f"|{'-' * 64}|{'-' * 9}:|{'-' * 9}:|{'-' * 9}:|")
    labels = {
        "roll_seconds": f"rolling restart of {ROLL_WORKERS} at batch {ROLL_BATCH}, 2 hosts (s)",
        "roll_fewest_registered": f"... fewest of the {ROLL_WORKERS} registered meanwhile",
        "upgrade_seconds": f"manager restart under {UPGRADE_WORKERS}: until all adopted (s)",
        "upgrade_kept_pids": "... workers that kept their PID",
        "upgrade_restarts": "... restarts counted",
    }
    for key, label in labels.items():
        values = samples[key]
        print(f"| {label:<62} | {statistics.median(values):8.2f} | {min(values):8.2f} | {max(values):8.2f} |")
    out = os.path.join(REPO, "bench", "results", "changes.json")
    os.makedirs(os.path.dirname(out), exist_ok=True)
    with open(out, "w") as f:
        json.dump({"runs": args.runs, "samples": samples}, f, indent=1)
    print(f"\nsamples: {os.path.relpath(out, REPO)}")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        sys.exit(130)
