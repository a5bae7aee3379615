"""The page benchmark: how soon a change of the fleet shows on an open page, in a
real browser, and what the page's worker costs with N workers in the fleet and
one page open.

    python bench/page.py [--workers 200] [--changes 20] [--windows 3] [--window 20]

Starts a throwaway PostgreSQL (dev/pgserver.py, the tests' settings), one
project root with a manager (a daemon), N idle workers (`scale('bench.idle',
N)`) and the page as a worker of that manager (`add uniphant.web --host here`,
logging in as a role of its own, as README's "Seeing the fleet" lays it out),
then opens the page in headless Chromium (Debian's chromium and chromedriver,
driven by selenium).  It prints medians with min and max; the samples go to
bench/results/page.json.

How it measures.  Nothing waits a fixed time to synchronise but the pause
after each change, so that every change meets a quiet fleet.
- Change to page: the benchmark notes the time, then commits one change as an
  operator would, in one statement; a MutationObserver on the page's table
  notes when the browser's DOM first shows it (a row that appears, a row whose
  state reads `paused`, a row that goes): the wall clock on both sides, on one
  machine.  Three kinds, --changes of each: add_worker() of an any-host worker
  (its row appears), pause_worker() of a running worker (it reads paused),
  remove_worker() (its row goes).  This is the database's notification, the
  page's read of the fleet, the event stream and the browser's rendering of N
  rows; what the manager does next (a start, a stop) is not waited for.
- The page's worker: its CPU (every thread's, from /proc/<pid>/task/*/schedstat)
  over --windows windows of --window seconds with the page open and nothing
  changing, as % of one core; its CPU per change over all the changes (what
  the manager's starts and stops that follow a change make it read again
  included); its RSS and PSS (/proc/<pid>/smaps_rollup) at the end.  The
  machine's whole load in each idle window (/proc/stat's busy time, this fleet
  and the browser included) is printed too: a busy machine slows everything.
- A scrape of /metrics: its wall time, and the notification lag it reports,
  --changes times, at the end.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from typing import Any, Callable, Dict, List, Optional

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "dev"))
import pgserver  # noqa: E402
from fleet import (BenchError, _cpu, _end_processes_in, _machine, _machine_cpu, _memory_mb,  # noqa: E402
                   _revision, _wait_until)
from lifecycle import IDLE  # noqa: E402  (bench/ is on the path: the script's own directory)

PYTHON = sys.executable
PAGE_ROLE, PAGE_PASSWORD = "bench_page", "bench-page-secret"
CHROMIUM_FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync")
QUIET = 0.5  # after each change, so that the next meets a quiet fleet

# Notes, in the page, when each row first shows each state and when it goes:
# seen["<worker id> <state>"] and gone["<worker id>"], epoch milliseconds.
OBSERVER = """
window.seen = {}; window.gone = {};
let present = new Set();
const note = () => {
  const at = performance.timeOrigin + performance.now(), now = new Set();
  for (const tr of document.querySelectorAll('#workers tbody tr')) {
    now.add(tr.dataset.worker);
    const key = tr.dataset.worker + ' ' + tr.dataset.state;
    if (!(key in window.seen)) window.seen[key] = at;
  }
  for (const worker of present) if (!now.has(worker) && !(worker in window.gone)) window.gone[worker] = at;
  present = now;
};
note();
new MutationObserver(note).observe(document.querySelector('#workers'), {childList: true, subtree: true});
"""


class Bench:
    """One fleet, its page, and a browser on it."""

    def __init__(self, server: pgserver.Server, base: str, args: argparse.Namespace) -> None:
        self.server = server
        self.args = args
        self.root = os.path.join(base, "root")
        self.home = os.path.join(base, "home")
        self.port = pgserver.free_port()
        self.url = f"http://127.0.0.1:{self.port}/"
        self.env = dict({k: v for k, v in os.environ.items() if not k.startswith("PG")},
                        HOME=self.home, PYTHONPATH=REPO, **server.env("uniphant"))
        self.db = None
        self.browser = None
        self.manager = str(uuid.uuid4())
        self.page_pid = 0
        self.samples: Dict[str, List[float]] = {}
        self.details: Dict[str, Any] = {}

    def value(self, query: str, *params: Any) -> Any:
        cursor = self.db.cursor()
        cursor.execute(query, params)
        row = cursor.fetchone()
        return row[0] if row else None

    def add(self, key: str, value: float) -> None:
        self.samples.setdefault(key, []).append(value)

    def ops(self, *args: str) -> str:
        done = subprocess.run([PYTHON, os.path.join(REPO, "uniphant.py"), *args], cwd=self.root, env=self.env,
                              capture_output=True, text=True, timeout=60)
        if done.returncode:
            raise BenchError(f"uniphant.py {' '.join(args)}: {done.stderr.strip()}")
        return done.stdout.strip()

    # -- the fleet and its page ---------------------------------------------

    def setup(self) -> None:
        self.server.create_database("uniphant")
        self.db = self.server.connect("uniphant")
        self.db.cursor().execute(f"CREATE ROLE {PAGE_ROLE} LOGIN PASSWORD '{PAGE_PASSWORD}'")
        self.db.cursor().execute("SELECT uniphant.grant_role(%s, 'worker'), uniphant.grant_role(%s, 'operator')",
                                 (PAGE_ROLE, PAGE_ROLE))
        for directory in ("workers/uniphant", "workers/bench"):
            os.makedirs(os.path.join(self.root, directory))
        for name in ("manager.py", "web.py"):
            shutil.copy(os.path.join(REPO, "workers", "uniphant", name), os.path.join(self.root, "workers", "uniphant"))
        self.write("workers/bench/idle.py", IDLE)
        self.write("workers/uniphant/web.uniphant.conf",
                   f"PGUSER={PAGE_ROLE}\nPGHOST=127.0.0.1\nPGPORT={self.server.port}\n"
                   f"web_listen=127.0.0.1:{self.port}\n")
        secrets = os.path.join(self.home, ".uniphant", "secrets", "workers", "uniphant", "web.secrets.conf")
        os.makedirs(os.path.dirname(secrets))
        self.write(secrets, f"PGPASSWORD={PAGE_PASSWORD}\nweb_token={uuid.uuid4().hex}\n")
        os.chmod(secrets, 0o600)
        started = subprocess.run([PYTHON, "workers/uniphant/manager.py", self.manager, "start"], cwd=self.root,
                                 env=self.env, capture_output=True, text=True, timeout=60)
        if started.returncode:
            raise BenchError(f"the manager did not start: {(started.stderr or started.stdout).strip()}")
        self.ops("scale", "bench.idle", str(self.args.workers))
        _wait_until(lambda: self.value("SELECT count(*) FROM uniphant.fleet WHERE worker_type = 'bench.idle' "
                                       "AND state = 'running'") == self.args.workers,
                    60 + self.args.workers * 0.2, f"all {self.args.workers} workers running", every=0.2)
        page = self.ops("add", "uniphant.web", "--host", "here")
        self.page_pid = _wait_until(lambda: self.value("SELECT pid FROM uniphant.fleet WHERE worker_id = %s::uuid "
                                                       "AND state = 'running'", page), 30, "the page running")
        _wait_until(self.answers, 30, "the page answering")

    def write(self, relative: str, text: str) -> None:
        with open(os.path.join(self.root, relative), "w") as f:
            f.write(text)

    def answers(self) -> bool:
        try:
            with urllib.request.urlopen(self.url + "api/fleet", timeout=5) as response:
                return response.status == 200
        except OSError:
            return False

    def open_page(self) -> None:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service

        chromium, driver = shutil.which("chromium"), shutil.which("chromedriver")
        if not chromium or not driver:
            raise BenchError("no Chromium here: apt-get install chromium chromium-driver")
        options = webdriver.ChromeOptions()
        options.binary_location = chromium
        for flag in (*CHROMIUM_FLAGS, f"--user-data-dir={os.path.join(self.root, 'chromium')}"):
            options.add_argument(flag)
        self.browser = webdriver.Chrome(options=options, service=Service(driver))
        self.browser.execute_cdp_cmd("Emulation.setDeviceMetricsOverride",
                                     {"width": 1280, "height": 800, "deviceScaleFactor": 1, "mobile": False})
        self.browser.get(self.url)
        _wait_until(lambda: self.browser.execute_script(
            "return document.querySelectorAll('#workers tbody tr').length") >= self.args.workers + 1,
            30, "the page showing the fleet")
        self.browser.execute_script(OBSERVER)

    def teardown(self) -> None:
        if self.browser is not None:
            self.browser.quit()
        subprocess.run([PYTHON, "workers/uniphant/manager.py", self.manager, "stop"], cwd=self.root, env=self.env,
                       capture_output=True, timeout=120)
        if self.db is not None:
            self.db.close()

    # -- the measurements ---------------------------------------------------

    def shown(self, script: str, key: str) -> Optional[float]:
        return self.browser.execute_script(f"return window.{script}[arguments[0]]", key)

    def change(self, kind: str, statement: str, worker: str, shown: Callable[[], Optional[float]]) -> None:
        """Commit statement (about worker); the time until the page shows it."""
        before = time.time()
        self.value(statement, worker)
        at = _wait_until(shown, 10, f"the page to show {kind} of {worker}")
        self.add(f"{kind}_ms", at - before * 1000)

    def changes(self) -> None:
        """--changes of each kind, and the page worker's CPU over them all."""
        cpu0 = _cpu(self.page_pid)
        for _ in range(self.args.changes):
            before = time.time()
            worker = self.value("SELECT uniphant.add_worker('bench.idle')::text")
            self.add("add_ms", _wait_until(lambda: self.browser.execute_script(
                "return Object.entries(window.seen).find(([key]) => key.startsWith(arguments[0]))?.[1]", worker),
                10, "the page to show the new worker") - before * 1000)
            self.settle(worker, "running")
            self.change("pause", "SELECT uniphant.pause_worker(%s::uuid)", worker,
                        lambda: self.shown("seen", f"{worker} paused"))
            self.settle(worker, "paused")
            self.change("remove", "SELECT uniphant.remove_worker(%s::uuid)", worker,
                        lambda: self.shown("gone", worker))
            _wait_until(lambda: not self.value("SELECT count(*) FROM uniphant.processes WHERE worker_id = %s::uuid",
                                               worker), 30, "the removed worker's process to end")
            time.sleep(QUIET)
        self.add("cpu_per_change_ms", (_cpu(self.page_pid) - cpu0) / (3 * self.args.changes) * 1000)

    def settle(self, worker: str, state: str) -> None:
        """Until the fleet and the page agree that worker is in state, then a quiet moment."""
        _wait_until(lambda: self.value("SELECT state FROM uniphant.fleet WHERE worker_id = %s::uuid", worker)
                    == state and self.shown("seen", f"{worker} {state}"), 30, f"{worker} {state}")
        time.sleep(QUIET)

    def idle(self) -> None:
        """The page open, nothing changing: the page worker's CPU, and the machine's."""
        for _ in range(self.args.windows):
            cpu0, machine0, t0 = _cpu(self.page_pid), _machine_cpu()[0], time.monotonic()
            time.sleep(self.args.window)
            elapsed = time.monotonic() - t0
            self.add("idle_cpu_pct", (_cpu(self.page_pid) - cpu0) / elapsed * 100)
            self.add("machine_busy_pct", (_machine_cpu()[0] - machine0) / elapsed * 100)

    def scrapes(self) -> None:
        """/metrics: the wall time of a scrape, and the notification lag it reports."""
        for _ in range(self.args.changes):
            before = time.monotonic()
            with urllib.request.urlopen(self.url + "metrics", timeout=10) as response:
                text = response.read().decode()
            self.add("scrape_ms", (time.monotonic() - before) * 1000)
            lag = next(line for line in text.splitlines() if line.startswith("uniphant_notification_lag_seconds "))
            self.add("lag_ms", float(lag.split()[1]) * 1000)
        self.details["metrics_bytes"] = len(text)

    def memory(self) -> None:
        rss, pss = _memory_mb(self.page_pid)
        self.add("rss_mb", rss)
        self.add("pss_mb", pss)


ROWS = [  # sample key, what it is
    ("add_ms", "add_worker() committed -> its row on the page (ms)"),
    ("pause_ms", "pause_worker() committed -> the row reads paused (ms)"),
    ("remove_ms", "remove_worker() committed -> the row gone (ms)"),
    ("idle_cpu_pct", "page worker CPU, page open, nothing changing (% of a core)"),
    ("cpu_per_change_ms", "page worker CPU per change, what follows it included (ms)"),
    ("scrape_ms", "GET /metrics, wall time (ms)"),
    ("lag_ms", "uniphant_notification_lag_seconds, as scraped (ms)"),
    ("rss_mb", "page worker RSS (MB)"),
    ("pss_mb", "page worker PSS (MB)"),
    ("machine_busy_pct", "the machine's whole load in the idle windows (% of a core)"),
]


def _summary(values: List[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.1f}"
    return f"{statistics.median(values):.1f} ({min(values):.1f}-{max(values):.1f})"


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workers", type=int, default=200, help="idle workers in the fleet (default 200)")
    parser.add_argument("--changes", type=int, default=20, help="changes of each kind (default 20)")
    parser.add_argument("--windows", type=int, default=3, help="idle windows (default 3)")
    parser.add_argument("--window", type=float, default=20.0, help="seconds of each idle window (default 20)")
    args = parser.parse_args(argv)
    if args.workers < 1 or args.changes < 1 or args.windows < 1 or args.window <= 0:
        parser.error("--workers, --changes and --windows must be at least 1, --window above 0")
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, signal.default_int_handler)  # end as Ctrl-C does: everything cleaned up

    server, bench = None, None
    base = tempfile.mkdtemp(prefix="uniphant-page-")
    try:
        try:
            server = pgserver.Server.started()
        except pgserver.ServerError as e:
            print(f"bench: the throwaway PostgreSQL could not be started: {e}", file=sys.stderr)
            return 1
        machine = _machine(server, args)
        bench = Bench(server, base, args)
        bench.setup()
        bench.open_page()
        bench.idle()
        bench.changes()
        bench.scrapes()
        bench.memory()
    except BenchError as e:
        print(f"bench: {e}", file=sys.stderr)
        return 1
    finally:
        with pgserver.interrupts_deferred():
            if bench is not None:
                bench.teardown()
            _end_processes_in(base)
            if server is not None:
                server.destroy()
            shutil.rmtree(base, ignore_errors=True)

    revision = _revision()
    print(f"\nuniphant page benchmark at {revision}; {machine['cpu']}, {machine['cores']} cores, "
          f"Python {machine['python']}, PostgreSQL {machine['postgresql']}; {args.workers} idle workers, "
          f"one page open in headless Chromium")
    width = max(len(text) for _, text in ROWS)
    print(f"{'measure':<{width}}  median (min-max)")
    for key, text in ROWS:
        print(f"{text:<{width}}  {_summary(bench.samples[key])}")
    out = os.path.join(REPO, "bench", "results", "page.json")
    os.makedirs(os.path.dirname(out), exist_ok=True)
    with open(out, "w") as f:
        json.dump({"machine": machine, "revision": revision, "settings": vars(args), "details": bench.details,
                   "samples": bench.samples}, f, indent=1)
    print(f"\nsamples: {os.path.relpath(out, REPO)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
