"""The fleet's web page and Prometheus metrics (docs/page.md, "Seeing the fleet").

    python uniphant.py add uniphant.web --host here     # run by this host's manager
    python -m workers.uniphant.web <uuid> start -f       # or by hand, from the project root

A uniphant worker like any other.  Its prepare hook checks its keys and its
role, and starts an HTTP server (the standard library's) in threads of its
own; its worker function is a step, called when a notification of the fleet
arrives on its connection (and every few seconds without one), that reads the
fleet and hands what changed to every open page as a Server-Sent Event; its
teardown stops the server.  The HTTP threads use database connections of
their own: a pg8000 connection serves one thread at a time.

Keys: `web_listen` (HOST:PORT, default 127.0.0.1:8765), `web_hosts` (the host
names it answers to, comma-separated; required beyond loopback), `web_token`
(only from a secrets.conf; without it the page is read-only).  Paths: `/` the page,
`/events` its live updates, `/api/fleet` and `/api/worker/<id>` as JSON,
`/api/<action>` (POST, with the token: add, scale, restart, stop, pause,
resume), `/metrics` for Prometheus.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import hmac
import http.server
import ipaddress
import json
import math
import os
import secrets
import socket
import stat
import sys
import threading
import time
import urllib.parse
from typing import Any, Callable, Dict, FrozenSet, Iterator, List, Optional, Tuple, TypeVar

# A vendored uniphant.py lies in the project root, two directories up (docs/install.md, "Install").
sys.path.insert(1, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

import uniphant  # noqa: E402
import uniphant_fleet  # noqa: E402
from uniphant import ConfigError, UniphantError, main  # noqa: E402

Config = Dict[str, Any]

DEFAULT_LISTEN = "127.0.0.1:8765"
# The channels of the fleet (schema.sql: notify_fleet, notify_watchers).
_CHANNELS = ("uniphant_fleet", "uniphant_watch")
# Without a notification the fleet is read this often: a process or a manager
# whose heartbeat goes stale changes the fleet without a word.
_POLL_EVERY = 5.0
# In a burst of notifications (200 workers starting), at most one read per gap.
_READ_GAP = 0.1
# How long a scrape waits for its probe of the notification lag.
_PROBE_WAIT = 2.0
# An open event stream hears at least this often how old the page's last read
# of the fleet is: as often as it reads, so that its header can say `stale`
# as soon as a read is late.
_TICK_EVERY = _POLL_EVERY
# Each open page holds a thread: a bound on them, and on what a request may send.
_MAX_STREAMS = 64
_MAX_BODY = 65536
# Each open connection holds a thread and a descriptor: at most this many at
# once, fewer where the open-file limit leaves less beside _FILES_KEPT for the
# worker's own files and database connections.  One more is answered 503 and
# closed, so that no number of clients can take the descriptors the worker needs.
_MAX_CONNECTIONS = 256
_FILES_KEPT = 64
# A request has this long from its connection's accept to the end of its answer
# (so a client that sends a byte now and then is cut off); an event stream, once
# it has begun, has no end.
_DEADLINE = 10.0
# What a refused client is told to wait before it asks again (seconds).
_RETRY_AFTER = 5
# Connections the kernel queues for the page while its threads are busy.
_BACKLOG = 128
# Database connections that the HTTP threads hold at once; a request waits for one.
_MAX_DATABASE = 8
# The page and /api/fleet list at most this many rows of the fleet (the desired
# workers and the managers first) and say how many they left out.
_MAX_ROWS = 1000
# What the detail view shows of a worker's log file on this host.
_LOG_LINES, _LOG_BYTES = 200, 65536
_HISTORY = 50


# ---------------------------------------------------------------------------
# Keys
# ---------------------------------------------------------------------------

def _defined_at(config: Config, key: str) -> Tuple[str, bool]:
    """Where key is defined (a file and line, or the desired state), and whether
    that is a secrets.conf; ("the default", False) if it is not defined."""
    for where, name, _ in uniphant.config_sources(config, uniphant.desired_settings()):
        if name == key:
            return where, where.rpartition(":")[0].endswith("secrets.conf")
    return "the default", False


def _listen_address(config: Config) -> Tuple[str, int]:
    """(host, port) of web_listen: an IPv4 address, [an IPv6 address] or a name, and a port."""
    text = config.get("web_listen", DEFAULT_LISTEN)
    host, sep, port = text.rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    elif ":" in host:
        host = ""  # an IPv6 address needs its brackets, or its port is ambiguous
    if not sep or not host or not uniphant.is_whole(port, 1, 65535):
        where, _ = _defined_at(config, "web_listen")
        raise ConfigError(f"{where}: bad value for web_listen: expected HOST:PORT with a port from 1 to "
                          f"65535 (127.0.0.1:8765, [::1]:8765, 0.0.0.0:8765)")
    return host, int(port)


def _host_name(text: str) -> str:
    """A host name as compared: lower case, without a port, brackets or a final dot."""
    name = text.strip().lower()
    if name.startswith("["):
        return name[1:name.find("]")] if "]" in name else name
    if name.count(":") == 1:
        name = name.split(":")[0]
    return name.rstrip(".")


def _is_host_name(name: str) -> bool:
    """Whether name is an IP address or a DNS name (letters, digits and hyphens, in dotted labels)."""
    with contextlib.suppress(ValueError):
        return bool(ipaddress.ip_address(name))
    labels = name.split(".")
    return 0 < len(name) <= 253 and all(
        0 < len(label) <= 63 and label.isascii() and label.replace("-", "").isalnum()
        and not label.startswith("-") and not label.endswith("-") for label in labels)


def _web_hosts(config: Config, loopback: bool) -> FrozenSet[str]:
    """The host names of web_hosts, which the page answers to besides loopback's
    names on a loopback address; required beyond loopback, where any site's name
    may point at the page (DNS rebinding)."""
    text = config.get("web_hosts")
    if text is None:
        if loopback:
            return frozenset()
        where, _ = _defined_at(config, "web_listen")
        raise ConfigError(f"{where}: web_listen listens beyond loopback, so web_hosts is required: the host "
                          f"names the page answers to, comma-separated (web_hosts=fleet.example.com,10.0.0.5)")
    names = [_host_name(item) for item in text.split(",")]
    if not all(_is_host_name(name) for name in names):
        where, _ = _defined_at(config, "web_hosts")
        raise ConfigError(f"{where}: bad value for web_hosts: expected host names or addresses separated by "
                          f"commas, without ports (fleet.example.com,10.0.0.5,[2001:db8::5])")
    return frozenset(names)


def _token(config: Config) -> Optional[bytes]:
    """web_token, checked: a credential, so from a secrets.conf only.  No message shows it."""
    token = config.get("web_token")
    if token is None:
        return None
    where, secret = _defined_at(config, "web_token")
    if not secret:
        raise ConfigError(f"{where}: web_token is a credential, taken only from a secrets.conf, which its "
                          f"owner alone may read (docs/page.md), not from where others read it")
    if len(token) < 16 or not all(33 <= ord(c) < 127 for c in token):
        raise ConfigError(f"{where}: bad value for web_token: expected 16 or more printable ASCII characters "
                          f"and no spaces (make one with: python -c \"import secrets; "
                          f"print(secrets.token_urlsafe())\")")
    return token.encode()


_ROLE_SQL = ("SELECT current_user::text, rolsuper, "
             "has_function_privilege('uniphant.manager_plan(uuid)', 'EXECUTE'), "
             "has_table_privilege('uniphant.fleet', 'SELECT') AND has_table_privilege('uniphant.managers', "
             "'SELECT') AND has_function_privilege('uniphant.add_worker(text, uuid, jsonb)', 'EXECUTE'), "
             "current_database()::text FROM pg_roles WHERE rolname = current_user")


def _check_role(connection) -> str:
    """The database's name, once the page's role is found to be an operator's and
    nothing more: never a superuser's, never a manager's (docs/page.md, "Seeing the fleet")."""
    cursor = connection.cursor()
    cursor.execute(_ROLE_SQL)
    role, superuser, manager, operator, database = cursor.fetchone()
    role = uniphant.printable(role)
    if superuser or manager:
        raise UniphantError(f"the page's role {role} {'is a superuser' if superuser else 'has the manager part'}: "
                            f"give the page a role of its own, with the worker and operator parts "
                            f"(docs/page.md, \"Running the page\")")
    if not operator:
        raise UniphantError(f"the page's role {role} lacks the operator part: the schema's owner gives it "
                            f"with SELECT uniphant.grant_role('{role}', 'operator'), once this release's "
                            f"schema.sql is loaded")
    return database


# ---------------------------------------------------------------------------
# What the page shows, read from the database
# ---------------------------------------------------------------------------

_FLEET_KEYS = ("worker_id", "worker_type", "state", "host", "host_id", "pinned", "pid", "since", "restarts",
               "last_exit", "next_start_at", "detail", "settings")
_FLEET_SQL = ("SELECT worker_id::text, worker_type, state, host, host_id::text, pinned, pid, "
              "extract(epoch FROM since)::float8, restarts, last_exit, "
              "extract(epoch FROM next_start_at)::float8, detail, settings::text, count(*) OVER () "
              "FROM uniphant.fleet ORDER BY state = 'not wanted', worker_type, host, worker_id LIMIT %s")


def _fleet_row(row: list, more: Tuple[str, ...] = ()) -> Dict[str, Any]:
    """A row of uniphant.fleet by its keys, its settings read from their JSON text:
    settings no reader can decode are their worker's failure, never the page's."""
    worker = dict(zip(_FLEET_KEYS + more, row))
    worker["settings"] = uniphant.shown_settings(worker["settings"])
    return worker


_MANAGERS_SQL = ("SELECT m.host_id::text, h.name, l.host_id IS NOT NULL, m.worker_types "
                 "FROM uniphant.managers m LEFT JOIN uniphant.hosts h ON h.id = m.host_id "
                 "LEFT JOIN uniphant.live_managers() l ON l.host_id = m.host_id ORDER BY h.name, m.host_id")


def _read_fleet(cursor) -> Tuple[Dict[str, Any], float]:
    """The fleet as the page shows it (at most _MAX_ROWS rows of uniphant.fleet,
    those of nobody's desired workers last, and how many it left out; every
    manager that ever registered, live or not), and the database's clock."""
    cursor.execute("SELECT extract(epoch FROM now())::float8")
    now = cursor.fetchone()[0]
    cursor.execute(_FLEET_SQL, (_MAX_ROWS,))
    rows = cursor.fetchall()
    workers = [_fleet_row(row) for row in rows]
    cursor.execute(_MANAGERS_SQL)
    processes = {row["host_id"]: row for row in workers if row["state"] == "manager"}
    managers = []
    for host_id, host, live, worker_types in cursor.fetchall():
        process = processes.get(host_id) or {}
        managers.append({"host_id": host_id, "host": host, "live": live, "worker_types": worker_types,
                         "worker_id": process.get("worker_id"), "pid": process.get("pid"),
                         "since": process.get("since")})
    return {"workers": workers, "managers": managers, "left_out": rows[0][-1] - len(rows) if rows else 0}, now


_WORKER_SQL = ("SELECT worker_id::text, worker_type, state, host, host_id::text, pinned, pid, "
               "extract(epoch FROM since)::float8, restarts, last_exit, "
               "extract(epoch FROM next_start_at)::float8, detail, settings::text, "
               "extract(epoch FROM heartbeat_at)::float8, paused_at IS NOT NULL, log_tail, warnings "
               "FROM uniphant.fleet WHERE worker_id = %s::uuid")
_HISTORY_SQL = ("SELECT extract(epoch FROM at)::float8, state, pid, last_exit, host_id::text "
                "FROM uniphant.worker_events WHERE worker_id = %s::uuid ORDER BY id DESC LIMIT %s")


def _read_worker(cursor, config: Config, worker_id: str) -> Optional[Dict[str, Any]]:
    """All the page shows of one worker: its row, its history (newest first) and
    its last log lines (its log file where it runs on this host, else the lines
    its manager kept of its last failed run); None if the fleet has no such worker."""
    cursor.execute(_WORKER_SQL, (worker_id,))
    row = cursor.fetchone()
    if row is None:
        return None
    worker = _fleet_row(row, ("heartbeat_at", "paused", "log_tail", "warnings"))
    cursor.execute(_HISTORY_SQL, (worker_id, _HISTORY))
    worker["history"] = [dict(zip(("at", "state", "pid", "last_exit", "host_id"), event))
                         for event in cursor.fetchall()]
    lines = None
    if worker["host_id"] == config["host_id"]:
        lines = _read_log(config["state_dir"], worker["worker_type"], worker_id)
    tail = worker.pop("log_tail")
    if lines is not None:
        worker["log"] = {"source": "file", "lines": lines}
    elif tail:
        worker["log"] = {"source": "tail", "lines": tail.splitlines()}
    else:
        worker["log"] = {"source": None, "lines": []}
    return worker


def _read_log(state_dir: str, worker_type: str, worker_id: str) -> Optional[List[str]]:
    """The last lines of a worker's log file in state_dir, or None where there is
    none.  Opened a directory at a time, never through a symlink (the worker
    type comes from the database), and only if it is a regular file."""
    if not uniphant.is_worker_type(worker_type):
        return None
    opened: List[int] = []
    flags = os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW
    try:
        opened.append(os.open(state_dir, os.O_RDONLY | os.O_CLOEXEC | os.O_DIRECTORY))
        for name in ("log", worker_type):
            opened.append(os.open(name, flags | os.O_DIRECTORY, dir_fd=opened[-1]))
        opened.append(os.open(f"{worker_id}.log", flags | os.O_NONBLOCK, dir_fd=opened[-1]))
        status = os.fstat(opened[-1])
        if not stat.S_ISREG(status.st_mode):
            return None
        start = max(status.st_size - _LOG_BYTES, 0)
        data = os.pread(opened[-1], _LOG_BYTES, start)
    except OSError:
        return None  # none here (log_file=off, another host's), or not a file of ours
    finally:
        for fd in opened:
            os.close(fd)
    lines = data.decode("utf-8", "replace").splitlines()
    return lines[1 if start else 0:][-_LOG_LINES:]  # a tail read from the middle starts mid-line


# ---------------------------------------------------------------------------
# Metrics (Prometheus' text format)
# ---------------------------------------------------------------------------

_METRICS_SQL = ("SELECT worker_id::text, worker_type, state, coalesce(host, ''), coalesce(host_id::text, ''), "
                "restarts, extract(epoch FROM now() - heartbeat_at)::float8, "
                "paused_at IS NOT NULL OR done_at IS NOT NULL FROM uniphant.fleet WHERE state <> 'not wanted'")
# Rows any worker role can make, of any type and host name: counted, never a series each.
_UNDESIRED_SQL = "SELECT count(*) FROM uniphant.fleet WHERE state = 'not wanted'"


def _label(text: str) -> str:
    """A label value: printable (as on a terminal), then escaped as the text format asks."""
    return uniphant.printable(text).replace("\\", "\\\\").replace('"', '\\"')


def _number(value: float) -> str:
    if isinstance(value, float) and math.isinf(value):
        return "+Inf"
    return str(value) if isinstance(value, int) else repr(round(value, 6))


class _Exposition:
    """Metric families in Prometheus' text exposition format (version 0.0.4)."""

    def __init__(self) -> None:
        self.lines: List[str] = []

    def family(self, name: str, kind: str, text: str, samples: List[Tuple[Dict[str, str], float]]) -> None:
        self.lines += [f"# HELP {name} {text}", f"# TYPE {name} {kind}"]
        for labels, value in samples:
            pairs = ",".join(f'{key}="{_label(label)}"' for key, label in labels.items())
            self.lines.append(f"{name}{{{pairs}}} {_number(value)}" if pairs else f"{name} {_number(value)}")

    def text(self) -> str:
        return "\n".join(self.lines) + "\n"


def _metrics(cursor, lag: float) -> str:
    """/metrics: the desired workers by state, type and host, and a count of the
    processes of none; each desired worker's restarts and heartbeat age; the
    managers; desired against running workers per type; and the lag and backlog
    of the fleet's notifications."""
    cursor.execute(_METRICS_SQL)
    rows = cursor.fetchall()
    cursor.execute(_UNDESIRED_SQL)
    undesired = cursor.fetchone()[0]
    cursor.execute(_MANAGERS_SQL)
    managers = cursor.fetchall()
    cursor.execute("SELECT pg_notification_queue_usage()")
    usage = cursor.fetchone()[0]
    counts: Dict[Tuple[str, str, str, str], int] = {}
    desired: Dict[str, int] = {}
    running: Dict[str, int] = {}
    restarts, heartbeats = [], []
    for worker_id, worker_type, state, host, host_id, restarted, heartbeat_age, held in rows:
        who = {"worker_id": worker_id, "worker_type": worker_type, "host": host, "host_id": host_id}
        if heartbeat_age is not None:
            heartbeats.append((who, max(heartbeat_age, 0.0)))
        if state == "manager":
            continue
        key = (state, worker_type, host, host_id)
        counts[key] = counts.get(key, 0) + 1
        if held:
            continue
        restarts.append((who, restarted))
        desired[worker_type] = desired.get(worker_type, 0) + 1
        running[worker_type] = running.get(worker_type, 0) + (state == "running")
    out = _Exposition()
    out.family("uniphant_workers", "gauge", "Desired workers by state, worker type and host.",
               [(dict(zip(("state", "worker_type", "host", "host_id"), key)), n) for key, n in sorted(counts.items())])
    out.family("uniphant_processes_undesired", "gauge", "Process rows of no desired worker (state 'not wanted' "
               "in uniphant.fleet): a count, as any worker role can make them.", [({}, undesired)])
    out.family("uniphant_worker_restarts_total", "counter", "Restarts of each desired worker after a failure, as "
               "its manager counts them (none for a requested restart; back to 0 after restart_reset_after "
               "seconds of running).", restarts)
    out.family("uniphant_worker_heartbeat_age_seconds", "gauge", "Seconds since the last heartbeat of each live "
               "process of a desired worker, and of each manager.", heartbeats)
    out.family("uniphant_managers_live", "gauge", "Managers whose process is live.",
               [({}, sum(1 for manager in managers if manager[2]))])
    out.family("uniphant_manager_up", "gauge", "1 if the manager of a host that ever had one is live, else 0.",
               [({"host": host or "", "host_id": host_id}, int(live)) for host_id, host, live, _ in managers])
    out.family("uniphant_desired_workers", "gauge", "Desired workers of each type, neither paused nor done.",
               [({"worker_type": t}, n) for t, n in sorted(desired.items())])
    out.family("uniphant_running_workers", "gauge", "Desired workers of each type that run under their manager.",
               [({"worker_type": t}, running[t]) for t in sorted(desired)])
    out.family("uniphant_notification_lag_seconds", "gauge", "Seconds from a notification's commit to the "
               "page's hearing it, probed at this scrape (+Inf: not within 2 s).", [({}, lag)])
    out.family("uniphant_notification_queue_usage_ratio", "gauge", "The part of PostgreSQL's notification queue "
               "in use (pg_notification_queue_usage()): above 0 while a listener falls behind.", [({}, usage)])
    return out.text()


# ---------------------------------------------------------------------------
# What the page's threads share
# ---------------------------------------------------------------------------

class _Fleet:
    """The fleet as the step last read it: each new state has a new version, and
    wakes every open event stream."""

    def __init__(self) -> None:
        self._changed = threading.Condition()
        self.version = 0
        self.document = ""       # JSON of the fleet
        self.database_now = 0.0  # the database's clock when it was read
        self.read_at = 0.0       # and ours (time.monotonic)
        self.closed = False

    def publish(self, fleet: Dict[str, Any], database_now: float) -> None:
        document = json.dumps(fleet, separators=(",", ":"))
        with self._changed:
            self.database_now, self.read_at = database_now, time.monotonic()
            if document != self.document:
                self.document, self.version = document, self.version + 1
                self._changed.notify_all()

    def close(self) -> None:
        with self._changed:
            self.closed = True
            self._changed.notify_all()

    def next(self, seen: int, timeout: float) -> Tuple[int, Optional[str], float]:
        """(version, the event's JSON or None if no newer version came within timeout,
        seconds since the fleet was last read)."""
        with self._changed:
            self._changed.wait_for(lambda: self.closed or (self.version != seen and self.document), timeout)
            age = time.monotonic() - self.read_at
            if self.closed or self.version == seen or not self.document:
                return seen, None, age
            now = self.database_now + age
            return self.version, f'{{"now":{now:.3f},"age":{age:.3f},"fleet":{self.document}}}', age


class _Probes:
    """Probes of the notification lag in flight: a token each, heard by the step."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._waiting: Dict[str, Tuple[threading.Event, List[float]]] = {}

    @contextlib.contextmanager
    def probe(self) -> Iterator[Tuple[str, threading.Event, List[float]]]:
        token, heard, at = secrets.token_hex(8), threading.Event(), []
        with self._lock:
            self._waiting[token] = (heard, at)
        try:
            yield token, heard, at
        finally:
            with self._lock:
                del self._waiting[token]

    def heard(self, token: str) -> None:
        with self._lock:
            waiting = self._waiting.get(token)
            if waiting is not None:
                waiting[1].append(time.monotonic())
                waiting[0].set()


T = TypeVar("T")


class _Connections:
    """Database connections for the HTTP threads, each used by one at a time, at
    most _MAX_DATABASE at once; a few are kept for the next request."""

    _KEEP = 4

    def __init__(self, config: Config) -> None:
        self._config = dict(config)
        self._idle: List[Any] = []
        self._lock = threading.Lock()
        self._closed = False
        self._in_use = threading.BoundedSemaphore(_MAX_DATABASE)

    def run(self, query: Callable[[Any], T], once: bool = False) -> T:
        """query(a connection)'s result.  A kept connection found lost (its server
        restarted, or ended its session) takes every kept one with it, as they
        shared its server, and query is tried once more on a new connection.
        once: query is never sent twice (an action, which may have been done
        though its answer was lost), so a kept connection is checked before it."""
        try:
            return self._run(query, once)
        except _Lost:
            return self._run(query, once)

    def _run(self, query: Callable[[Any], T], once: bool) -> T:
        if not self._in_use.acquire(timeout=_DEADLINE):
            raise _Refused(503, f"the page is busy: its {_MAX_DATABASE} database connections are in use",
                           _RETRY_AFTER)
        try:
            with self._lock:
                connection, kept = (self._idle.pop(), True) if self._idle else (None, False)
            if connection is None:
                connection = uniphant.connect_to_database(self._config)
            elif once and uniphant.is_lost(connection):
                uniphant.close_quietly(connection)
                self._drop()
                raise _Lost()
            try:
                result = query(connection)
            except BaseException as e:
                lost = uniphant.is_lost(connection)
                uniphant.close_quietly(connection)
                if lost:
                    self._drop()
                    if kept and not once:
                        raise _Lost() from e
                raise
        finally:
            self._in_use.release()
        with self._lock:
            if not self._closed and len(self._idle) < self._KEEP:
                self._idle.append(connection)
                return result
        uniphant.close_quietly(connection)
        return result

    def _drop(self) -> None:
        with self._lock:
            idle, self._idle = self._idle, []
        for connection in idle:
            uniphant.close_quietly(connection)

    def close(self) -> None:
        with self._lock:
            self._closed = True
        self._drop()


class _Lost(Exception):
    """A kept connection was found lost: the request may be tried again."""


class _Page:
    """One page server: its keys, its HTTP server, and what its threads share."""

    def __init__(self, config: Config, logger, token: Optional[bytes], database: str) -> None:
        self.config = config
        self.logger = logger
        self.token = token
        self.fleet = _Fleet()
        self.probes = _Probes()
        self.connections = _Connections(config)
        self.streams = threading.BoundedSemaphore(_MAX_STREAMS)
        self.probe_channel = "uniphant_probe_" + config["process_id"].replace("-", "")
        self.connection = None  # the one the step listens on
        # What every event tells the page about its server (JSON).
        self.about = json.dumps({"actions": token is not None, "database": database,
                                 "host_id": config["host_id"], "host": config["host_name"],
                                 "refresh": _POLL_EVERY, "tick": _TICK_EVERY})
        self.server: Optional[_Server] = None
        self.loopback = False
        self.hosts: FrozenSet[str] = frozenset()  # web_hosts

    def close(self) -> None:
        self.fleet.close()
        if self.server is not None:
            self.server.shutdown()
            self.server.server_close()
        self.connections.close()


_page: Optional[_Page] = None


# ---------------------------------------------------------------------------
# HTTP
# ---------------------------------------------------------------------------

class _Server(http.server.ThreadingHTTPServer):
    """The HTTP server: a thread per connection, at most `most` at once, each
    cut off at its deadline (_DEADLINE after its accept, unless lifted)."""

    daemon_threads = True  # an open page's stream never holds up the end of the worker
    request_queue_size = _BACKLOG
    page: _Page
    most: int

    def __init__(self, address: Tuple[str, int], handler) -> None:
        self.deadlines: Dict[socket.socket, float] = {}  # each open connection's
        self.deadlines_lock = threading.Lock()
        super().__init__(address, handler)

    def process_request(self, request, client_address) -> None:
        with self.deadlines_lock:
            full = len(self.deadlines) >= self.most
            if not full:
                self.deadlines[request] = time.monotonic() + _DEADLINE
        if not full:
            super().process_request(request, client_address)
            return
        # Told without a thread, never waiting: what fits in the socket's buffer.
        with contextlib.suppress(OSError):
            request.setblocking(False)
            request.send(_REFUSAL)
        self.page.logger.debug("%s refused: %d connections are open", client_address[0], self.most)
        super().shutdown_request(request)

    def lift_deadline(self, request) -> None:
        with self.deadlines_lock:
            self.deadlines[request] = math.inf

    def service_actions(self) -> None:
        """Cut off the connections past their deadline (the serve loop calls this
        every poll_interval); a connection's thread then finds it closed."""
        now = time.monotonic()
        with self.deadlines_lock:  # a connection leaves before it is closed: no other is shut down
            for request, deadline in self.deadlines.items():
                if deadline < now:
                    with contextlib.suppress(OSError):
                        request.shutdown(socket.SHUT_RDWR)
                    self.deadlines[request] = math.inf

    def shutdown_request(self, request) -> None:
        with self.deadlines_lock:
            self.deadlines.pop(request, None)
        super().shutdown_request(request)

    def handle_error(self, request, client_address) -> None:
        error = sys.exc_info()[1]
        if isinstance(error, OSError):  # the client went away, or was cut off
            self.page.logger.debug("%s went away: %s", client_address[0], uniphant.explain(error))
            return
        self.page.logger.exception("a request from %s failed", client_address[0])


class _Server6(_Server):
    address_family = socket.AF_INET6


def _serve_http(page: _Page, host: str, port: int) -> None:
    """Listen on host:port and serve in a thread of the server's own."""
    try:
        family, _, _, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    except socket.gaierror as e:
        where, _ = _defined_at(page.config, "web_listen")
        raise ConfigError(f"{where}: web_listen names an unknown host ({e.strerror})") from None
    page.loopback = ipaddress.ip_address(address[0]).is_loopback
    page.hosts = _web_hosts(page.config, page.loopback)
    most = _most_connections()
    try:
        server = (_Server6 if family == socket.AF_INET6 else _Server)(address[:2], _Handler)
    except OSError as e:
        raise UniphantError(f"the page cannot listen on {uniphant.printable(host)}:{port}: {e.strerror}") from None
    server.page, server.most, page.server = page, most, server
    threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.2}, name="uniphant-web",
                     daemon=True).start()


def _most_connections() -> int:
    """_MAX_CONNECTIONS, or fewer where the open-file limit leaves less beside _FILES_KEPT."""
    import resource

    limit = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    if limit == resource.RLIM_INFINITY:
        return _MAX_CONNECTIONS
    if limit < _FILES_KEPT + 16:
        raise UniphantError(f"the open-file limit (RLIMIT_NOFILE) is {limit}: the page needs {_FILES_KEPT + 16} "
                            f"or more, {_FILES_KEPT} for itself and the rest for its connections")
    return min(_MAX_CONNECTIONS, limit - _FILES_KEPT)


def _is_loopback_name(host: str) -> bool:
    """Whether a Host header's name (its port aside) is this machine's loopback."""
    name = host.rsplit(":", 1)[0] if not host.endswith("]") else host
    name = name.strip("[]").lower()
    if name == "localhost":
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


class _Refused(Exception):
    """A request the page answers with an error: its status, why, and when to ask
    again (seconds, for a Retry-After) if it is worth asking again."""

    def __init__(self, status: int, message: str, retry_after: Optional[int] = None) -> None:
        super().__init__(message)
        self.status = status
        self.retry_after = retry_after


def _text(body: Dict[str, Any], key: str) -> Optional[str]:
    value = body.get(key)
    if value is not None and not isinstance(value, str):
        raise _Refused(400, f"{key} must be a string")
    return value or None


def _host_id(body: Dict[str, Any]) -> Optional[str]:
    host_id = _text(body, "host_id")
    if host_id is not None and uniphant.canonical_uuid(host_id) is None:
        raise _Refused(400, "host_id: expected a host id (a UUID), or none for any host")
    return host_id


def _act(connection, verb: str, body: Dict[str, Any]) -> str:
    """Do what an action asks, by the fleet's own operations; what was done."""
    worker_type = _text(body, "worker_type") or ""
    if verb == "add":
        words = body.get("settings") or []
        if not isinstance(words, list):
            raise _Refused(400, "settings: expected a list of KEY=VALUE")
        worker_id, warning = uniphant_fleet.add_worker(connection, worker_type, _host_id(body), words)
        return f"added worker {worker_id} of {worker_type}" + (f"; warning: {warning}" if warning else "")
    if verb == "scale":
        return uniphant_fleet.scale(connection, worker_type, body.get("n"), _host_id(body))
    worker_id = _text(body, "worker_id")
    if worker_id is not None and uniphant.canonical_uuid(worker_id) is None:
        raise _Refused(400, "worker_id: expected a worker id (a UUID)")
    return uniphant_fleet.apply_verb(connection, verb, worker_id or worker_type)


class _Handler(http.server.BaseHTTPRequestHandler):
    server: _Server
    server_version = "uniphant-web"
    timeout = 30  # a client that sends nothing (or reads nothing) for this long is dropped

    def version_string(self) -> str:
        return self.server_version  # not Python's version: nobody's business

    # -- answers --

    def _send(self, status: int, content_type: str, body: bytes, retry_after: Optional[int] = None) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        if retry_after is not None:
            self.send_header("Retry-After", str(retry_after))
        self.end_headers()
        self.wfile.write(body)

    def _json(self, status: int, value: Any, retry_after: Optional[int] = None) -> None:
        self._send(status, "application/json", json.dumps(value, separators=(",", ":")).encode(), retry_after)

    def end_headers(self) -> None:
        """Every answer, the server's own errors included, with the security headers."""
        for name, value in _SECURITY_HEADERS:
            self.send_header(name, value)
        super().end_headers()

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 (the base class's name)
        self.server.page.logger.debug("%s %s", self.address_string(), uniphant.printable(format % args))

    # -- requests --

    def do_GET(self) -> None:  # noqa: N802 (the base class's name)
        self._answer(self._get)

    def do_POST(self) -> None:  # noqa: N802
        self._answer(self._post)

    def _answer(self, method) -> None:
        """method(), or its refusal as a JSON error; a connection lost or not made
        is a 503 (the next request connects anew), anything else a 500, logged.
        A client that goes away (or is cut off at its deadline) is a line in the
        debug log, whenever it goes."""
        try:
            self._answer_or_refuse(method)
        except (ConnectionError, TimeoutError) as e:
            self.close_connection = True
            self.server.page.logger.debug("%s went away: %s", self.address_string(), uniphant.explain(e))

    def _answer_or_refuse(self, method) -> None:
        import pg8000.dbapi

        try:
            self._host_allowed()
            method()
        except _Refused as e:
            self._json(e.status, {"error": str(e)}, e.retry_after)
        except (ConnectionError, TimeoutError):
            raise  # the client's, not the database's
        except (UniphantError, pg8000.dbapi.InterfaceError, OSError) as e:
            self.server.page.logger.warning("%s %s: %s", self.command, uniphant.printable(self.path),
                                            uniphant.explain(e))
            self._json(503, {"error": f"the page cannot reach the database: {uniphant.explain(e)}"})
        except Exception:
            self.server.page.logger.exception("%s %s failed", self.command, uniphant.printable(self.path))
            self._json(500, {"error": "the page failed: its log says why"})

    def _get(self) -> None:
        path = urllib.parse.urlsplit(self.path).path
        if path == "/":
            self._send(200, "text/html; charset=utf-8", _PAGE)
        elif path == "/events":
            self._events()
        elif path == "/api/fleet":
            self._json(200, self._fleet_now())
        elif path.startswith("/api/worker/"):
            self._worker(path[len("/api/worker/"):])
        elif path == "/metrics":
            self._send(200, "text/plain; version=0.0.4; charset=utf-8", self._metrics().encode())
        else:
            raise _Refused(404, "no such page")

    def _post(self) -> None:
        path = urllib.parse.urlsplit(self.path).path
        verb = path[len("/api/"):]
        if not path.startswith("/api/") or verb not in ("add", "scale", *uniphant_fleet.VERBS):
            raise _Refused(404, "no such action")
        self._authorised()
        body = self._body()
        done = self.server.page.connections.run(
            lambda connection: self._database(lambda: _act(connection, verb, body)), once=True)
        self.server.page.logger.info("%s (asked from %s)", uniphant.printable(done), self.address_string())
        self._json(200, {"message": done})

    def _host_allowed(self) -> None:
        """The page answers to the names of web_hosts, and on a loopback address to
        loopback names, so that a site whose name was rebound to the page's
        address (DNS rebinding) cannot read it through a browser."""
        page, host = self.server.page, self.headers.get("Host", "")
        if _host_name(host) in page.hosts or (page.loopback and _is_loopback_name(host)):
            return
        if page.loopback and not page.hosts:
            raise _Refused(403, "this page answers to localhost only (web_listen is a loopback address)")
        raise _Refused(403, "this page answers only to the host names of its web_hosts")

    def _authorised(self) -> None:
        """Actions need the token (in a header a cross-site form cannot send), from
        a request of the page's own origin."""
        page = self.server.page
        if page.token is None:
            raise _Refused(403, "the page is read-only: no web_token is configured")
        origin, site = self.headers.get("Origin"), self.headers.get("Sec-Fetch-Site")
        if (origin is not None and urllib.parse.urlsplit(origin).netloc != self.headers.get("Host")) \
                or site not in (None, "same-origin", "none"):
            raise _Refused(403, "a cross-site request is refused")
        if self.headers.get_content_type() != "application/json":
            raise _Refused(415, "an action is a JSON object (Content-Type: application/json)")
        given = self.headers.get("Authorization", "")
        if not given.startswith("Bearer ") or not hmac.compare_digest(given[7:].encode(errors="replace"),
                                                                       page.token):
            raise _Refused(401, "a wrong or missing token (Authorization: Bearer <web_token>)")

    def _body(self) -> Dict[str, Any]:
        length = self.headers.get("Content-Length", "")
        if not uniphant.is_whole(length, 0, _MAX_BODY):
            raise _Refused(413, f"an action is at most {_MAX_BODY} bytes, with a Content-Length")
        try:
            body = json.loads(self.rfile.read(int(length)) or b"{}")
        except ValueError:
            raise _Refused(400, "the body is not JSON") from None
        if not isinstance(body, dict):
            raise _Refused(400, "the body is not a JSON object")
        return body

    def _database(self, query):
        """query()'s result; a bad request, or the database's refusal of it, as the request's."""
        import pg8000.dbapi

        try:
            return query()
        except uniphant_fleet.Refused as e:  # nothing to act on
            raise _Refused(409, str(e)) from None
        except ConfigError as e:  # a request the ops commands would refuse
            raise _Refused(400, str(e)) from None
        except UniphantError as e:  # the database's refusal, as the ops commands say it
            raise _Refused(500, str(e)) from None
        except pg8000.dbapi.DatabaseError as e:
            code, message = uniphant.sql_error_of(e)
            raise _Refused(400 if code in ("22023", "23514", "22P02") else 500, message) from None

    def _fleet_now(self) -> Dict[str, Any]:
        page = self.server.page
        fleet, now = page.connections.run(lambda connection: self._database(lambda: _read_fleet(connection.cursor())))
        return {"now": now, "about": json.loads(page.about), "fleet": fleet}

    def _worker(self, text: str) -> None:
        worker_id = uniphant.canonical_uuid(text)
        if worker_id is None:
            raise _Refused(404, "not a worker id")
        page = self.server.page
        worker = page.connections.run(
            lambda connection: self._database(lambda: _read_worker(connection.cursor(), page.config, worker_id)))
        if worker is None:
            raise _Refused(404, "no such worker in the fleet")
        self._json(200, worker)

    def _metrics(self) -> str:
        return self.server.page.connections.run(self._scrape)

    def _scrape(self, connection) -> str:
        page = self.server.page
        cursor = connection.cursor()
        with page.probes.probe() as (token, heard, at):
            sent = time.monotonic()
            self._database(lambda: cursor.execute("SELECT pg_notify(%s, %s)", (page.probe_channel, token)))
            lag = at[0] - sent if heard.wait(_PROBE_WAIT) else math.inf
        return self._database(lambda: _metrics(cursor, lag))

    def _events(self) -> None:
        """The live updates: the fleet now, then each new state of it, and a tick
        (how old the page's last read is) when nothing changed for a while."""
        page = self.server.page
        if not page.streams.acquire(blocking=False):
            raise _Refused(503, f"too many open pages ({_MAX_STREAMS})", _RETRY_AFTER)
        self.server.lift_deadline(self.request)
        try:
            self.send_response(200)
            self.send_header("Content-Type", "text/event-stream")
            self.end_headers()
            about = page.about.encode()
            self.wfile.write(b"retry: 2000\nevent: about\ndata: " + about + b"\n\n")
            seen = 0
            while True:
                seen, event, age = page.fleet.next(seen, _TICK_EVERY)
                if page.fleet.closed:
                    return
                message = (f"data: {event}\n\n" if event is not None else
                           f'event: tick\ndata: {{"age":{age:.3f}}}\n\n')
                self.wfile.write(message.encode())
                self.wfile.flush()
        except (OSError, ValueError):
            return  # the page was closed (a broken pipe, a reset, a timeout)
        finally:
            page.streams.release()


# ---------------------------------------------------------------------------
# The worker: hooks and step
# ---------------------------------------------------------------------------

def _prepare(config: Config, logger, connection) -> None:
    """Check the keys and the role, then listen (a failed start says why)."""
    global _page
    token = _token(config)
    host, port = _listen_address(config)
    database = _check_role(connection)
    page = _Page(config, logger, token, database)
    _serve_http(page, host, port)
    _page = page
    shown = f"[{host}]" if ":" in host else host
    logger.info("serving the fleet on http://%s:%d/ (%s)", uniphant.printable(shown), port,
                "actions need the token" if token else "read-only: no web_token")


def _wakeup(config: Config, connection) -> Tuple[float, Tuple[int, ...]]:
    """A probe is answered at once; the fleet is read again after a notification
    (at most once per _READ_GAP), else every _POLL_EVERY seconds."""
    page = _page
    if connection is not page.connection:
        return 0.0, ()  # the first step, or a new connection: listen on it
    channels = {note[1] for note in connection.notifications}
    if page.probe_channel in channels:
        return 0.0, ()
    if channels.intersection(_CHANNELS):
        return page.fleet.read_at + _READ_GAP, ()
    return page.fleet.read_at + _POLL_EVERY, ()


def serve(config: Config, logger, connection) -> None:
    """One step of the page: answer the lag probes that came, and read the fleet
    if it may have changed (a notification), or if it is time to look again."""
    page = _page
    if connection is not page.connection:
        connection.execute_simple(f"LISTEN {_CHANNELS[0]}; LISTEN {_CHANNELS[1]}; LISTEN {page.probe_channel}")
        page.connection, page.fleet.read_at = connection, 0.0  # it may have missed a notification
    notes, channels = connection.notifications, {*_CHANNELS, page.probe_channel}
    ours = [note for note in notes if note[1] in channels]
    if ours:
        others = [note for note in notes if note[1] not in channels]
        notes.clear()
        notes.extend(others)
    for _, channel, payload in ours:
        if channel == page.probe_channel:
            page.probes.heard(payload)
    if any(note[1] in _CHANNELS for note in ours) or time.monotonic() >= page.fleet.read_at + _POLL_EVERY:
        page.fleet.publish(*_read_fleet(connection.cursor()))


def _teardown(config: Config, logger) -> None:
    if _page is not None:
        _page.close()


serve.prepare = _prepare  # type: ignore[attr-defined]
serve.wakeup = _wakeup  # type: ignore[attr-defined]
serve.teardown = _teardown  # type: ignore[attr-defined]


# ---------------------------------------------------------------------------
# The page: one document, its style and script inline (allowed by their
# hashes in the Content-Security-Policy), every text from the database set as
# text, never as markup
# ---------------------------------------------------------------------------

_STYLE = """
:root { color-scheme: light dark; --bg: #fff; --fg: #1f2328; --muted: #656d76; --line: #d8dee4;
  --head: #f6f8fa; --good: #1a7f37; --bad: #cf222e; --warn: #9a6700; --busy: #0969da; --held: #6e7781;
  --info: #8250df; }
@media (prefers-color-scheme: dark) { :root { --bg: #0d1117; --fg: #e6edf3; --muted: #8d96a0;
  --line: #30363d; --head: #161b22; --good: #3fb950; --bad: #f85149; --warn: #d29922; --busy: #58a6ff;
  --held: #8d96a0; --info: #bc8cff; } }
* { box-sizing: border-box; }
[hidden] { display: none !important; }
body { margin: 0; font: 14px/1.45 system-ui, -apple-system, "Segoe UI", sans-serif; background: var(--bg);
  color: var(--fg); }
header { display: flex; flex-wrap: wrap; gap: .4rem 1rem; align-items: center; padding: .6rem 1rem;
  border-bottom: 1px solid var(--line); background: var(--head); }
h1 { font-size: 1.05rem; margin: 0; }
h2 { font-size: .95rem; margin: 1.2rem 0 .4rem; }
h3 { font-size: .9rem; margin: 1rem 0 .3rem; }
main { padding: 0 1rem 2rem; }
.muted { color: var(--muted); }
.mono { font-family: ui-monospace, SFMono-Regular, Menlo, Consolas, monospace; font-size: .92em; }
.state { display: inline-block; padding: 0 .5em; border: 1px solid currentColor; border-radius: 1em;
  white-space: nowrap; font-size: .88em; }
.state::before { content: "\\25CF\\00A0"; }
.good { color: var(--good); } .bad { color: var(--bad); } .warn { color: var(--warn); }
.busy { color: var(--busy); } .held { color: var(--held); } .info { color: var(--info); }
#counts { display: flex; flex-wrap: wrap; gap: .3rem; }
#counts button { background: none; cursor: pointer; font: inherit; }
#live { margin-left: auto; }
#banner { margin: .6rem 0 0; padding: .4rem .6rem; border: 1px solid var(--bad); color: var(--bad);
  border-radius: .3rem; }
.filters { display: flex; flex-wrap: wrap; gap: .5rem; margin: .8rem 0 0; align-items: center; }
select, input, button { font: inherit; color: inherit; background: var(--bg); border: 1px solid var(--line);
  border-radius: .3rem; padding: .15rem .4rem; }
button { cursor: pointer; }
table { border-collapse: collapse; width: 100%; }
th, td { text-align: left; padding: .28rem .5rem; border-bottom: 1px solid var(--line); vertical-align: top; }
th { background: var(--head); font-weight: 600; white-space: nowrap; }
th button { border: 0; background: none; padding: 0; font-weight: 600; }
td.num, th.num { text-align: right; font-variant-numeric: tabular-nums; }
td.text { overflow-wrap: anywhere; min-width: 8rem; }
#workers tbody tr { cursor: pointer; }
#workers tbody tr:hover, #workers tbody tr:focus { background: var(--head); outline: none; }
#detail { position: fixed; top: 0; right: 0; bottom: 0; width: min(46rem, 100%); overflow: auto; padding: 1rem;
  background: var(--bg); border-left: 1px solid var(--line); box-shadow: -.5rem 0 1.5rem rgba(0, 0, 0, .18); }
#detail dl { display: grid; grid-template-columns: max-content 1fr; gap: .2rem 1rem; margin: 0; }
#detail dt { color: var(--muted); }
#detail dd { margin: 0; overflow-wrap: anywhere; }
#detail .close { float: right; }
.actions { display: flex; flex-wrap: wrap; gap: .4rem; margin: .8rem 0; }
pre.log { white-space: pre-wrap; overflow-wrap: anywhere; background: var(--head); padding: .5rem;
  border-radius: .3rem; max-height: 60vh; overflow: auto; font-size: .82rem; margin: 0; }
details.operate { margin: .8rem 0 0; }
details.operate form { display: flex; flex-wrap: wrap; gap: .4rem; align-items: center; margin: .4rem 0; }
#said { min-height: 1.4em; margin: .4rem 0 0; }
#said.bad { color: var(--bad); }
@media (max-width: 760px) {
  main { padding: 0 .5rem 2rem; }
  #workers thead { display: none; }
  #workers tr { display: block; border: 1px solid var(--line); border-radius: .4rem; margin: .5rem 0;
    padding: .3rem .6rem; }
  #workers td { display: flex; justify-content: space-between; gap: 1rem; border: 0; padding: .12rem 0;
    text-align: right; }
  #workers td::before { content: attr(data-label); color: var(--muted); text-align: left; }
  #workers td:empty { display: none; }
  #managers { display: block; overflow-x: auto; }
}
"""

_SCRIPT = r"""
"use strict";
// What each state looks like (its colour, always with its name) and its place when sorted by state.
const STATES = {"backoff": "bad", "waiting for its host": "warn", "unplaced": "warn",
  "running unsupervised": "warn", "moving": "busy", "starting": "busy", "rolling": "busy",
  "running": "good", "paused": "held", "done": "held", "not wanted": "held", "manager": "info"};
const ORDER = Object.keys(STATES);
const COLUMNS = [["state", "state"], ["worker_type", "type"], ["worker_id", "worker"], ["host", "host"],
  ["host_id", "host id"], ["pinned", "placed"], ["pid", "PID"], ["since", "since"], ["restarts", "restarts"],
  ["last_exit", "last exit"], ["next_start_at", "next start"], ["detail", "detail"]];
const $ = (selector) => document.querySelector(selector);
let about = {}, fleet = null, offset = 0, shownWorker = null, sortKey = "worker_type", ascending = true;
const view = new URLSearchParams(location.hash.slice(1));  // type, host, state, worker: a link keeps them

// Text from the database or a worker, with every character that is not printable
// (a control character, a bidirectional override) shown as an escape, as ps shows it.
function printable(text) {
  return String(text === null || text === undefined ? "" : text).replace(/(?! )[\p{C}\p{Z}]/gu, (c) => {
    const n = c.codePointAt(0), hex = n.toString(16);
    return n < 0x100 ? "\\x" + hex.padStart(2, "0") : n < 0x10000 ? "\\u" + hex.padStart(4, "0")
      : "\\U" + hex.padStart(8, "0");
  });
}

// An element; its children are elements or strings, which become text, never markup.
function el(tag, attributes, ...children) {
  const element = document.createElement(tag);
  for (const [name, value] of Object.entries(attributes || {})) {
    if (value !== null && value !== undefined && value !== false) element.setAttribute(name, value);
  }
  element.append(...children.filter((child) => child !== null && child !== undefined));
  return element;
}

function now() { return (Date.now() + offset) / 1000; }

function age(seconds) {
  if (seconds === null || seconds === undefined) return "";
  for (const [unit, size] of [["d", 86400], ["h", 3600], ["m", 60]]) {
    if (seconds >= size) return Math.floor(seconds / size) + unit;
  }
  return Math.max(Math.floor(seconds), 0) + "s";
}

function when(epoch) { return epoch ? new Date(epoch * 1000).toISOString().replace("T", " ").slice(0, 19) + " UTC" : ""; }

function badge(state) { return el("span", {"class": "state " + (STATES[state] || "held")}, printable(state)); }

function ago(epoch) {
  return epoch ? el("span", {"data-since": epoch, "title": when(epoch)}, age(now() - epoch)) : "";
}

function until(epoch) {
  return epoch ? el("span", {"data-next": epoch, "title": when(epoch)}, "in " + age(epoch - now())) : "";
}

function short(id) { return id ? el("span", {"class": "mono", "title": id}, id.slice(0, 8)) : ""; }

function cell(row, key) {
  switch (key) {
    case "state": return badge(row.state);
    case "worker_id": case "host_id": return short(row[key]);
    case "pinned": return row.state === "not wanted" ? "" : row.pinned ? "pinned" : "any";
    case "since": return ago(row.since);
    case "next_start_at": return until(row.next_start_at);
    case "pid": case "restarts": return row[key] === null ? "" : String(row[key]);
    default: return printable(row[key]);
  }
}

function sortValue(row, key) {
  if (key === "state") return ORDER.indexOf(row.state) < 0 ? ORDER.length : ORDER.indexOf(row.state);
  return row[key];
}

function compare(a, b) {
  for (const key of [sortKey, "worker_type", "host", "worker_id"]) {
    const x = sortValue(a, key), y = sortValue(b, key);
    if (x === y) continue;
    if (x === null || x === undefined) return 1;
    if (y === null || y === undefined) return -1;
    const order = typeof x === "number" ? x - y : String(x).localeCompare(String(y));
    return key === sortKey && !ascending ? -order : order;
  }
  return 0;
}

function workers() { return fleet ? fleet.workers.filter((row) => row.state !== "manager") : []; }

function chosen(row) {
  return (!view.get("type") || row.worker_type === view.get("type"))
    && (!view.get("host") || row.host_id === view.get("host"))
    && (!view.get("state") || row.state === view.get("state"));
}

function remember() { history.replaceState(null, "", "#" + view.toString()); }

function choose(name, value) {
  if (value) view.set(name, value); else view.delete(name);
  remember();
  render();
}

function renderCounts() {
  const counts = {};
  for (const row of workers()) counts[row.state] = (counts[row.state] || 0) + 1;
  const states = Object.keys(counts).sort((a, b) => ORDER.indexOf(a) - ORDER.indexOf(b));
  $("#counts").replaceChildren(...states.map((state) => {
    const button = el("button", {"type": "button", "class": "state " + (STATES[state] || "held"),
      "title": "show only these"}, counts[state] + " " + printable(state));
    button.addEventListener("click", () => choose("state", view.get("state") === state ? "" : state));
    return button;
  }));
}

// A filter's menu, made anew only when its choices change (a menu open in the browser stays open).
function fillSelect(select, all, values) {
  const current = view.get(select.name) || "";
  const known = new Map(values);
  if (current && !known.has(current)) known.set(current, printable(current));
  const choices = [...known].sort((a, b) => a[1].localeCompare(b[1]));
  if (select.dataset.choices !== JSON.stringify(choices)) {
    select.dataset.choices = JSON.stringify(choices);
    select.replaceChildren(el("option", {"value": ""}, all),
      ...choices.map(([value, label]) => el("option", {"value": value}, label)));
  }
  select.value = current;
}

function renderFilters() {
  const rows = workers();
  fillSelect($("#type"), "all types", rows.map((row) => [row.worker_type, printable(row.worker_type)]));
  fillSelect($("#host"), "all hosts", rows.filter((row) => row.host_id)
    .map((row) => [row.host_id, printable(row.host || "?") + " (" + row.host_id.slice(0, 8) + ")"]));
  fillSelect($("#state"), "all states", rows.map((row) => [row.state, printable(row.state)]));
}

function renderManagers() {
  const rows = fleet.managers.map((m) => el("tr", {"data-host": m.host_id},
    el("td", {}, el("span", {"class": "state " + (m.live ? "good" : "bad")}, m.live ? "live" : "down")),
    el("td", {"class": "text"}, printable(m.host || "?")), el("td", {}, short(m.host_id)),
    el("td", {"class": "num"}, m.pid === null ? "" : String(m.pid)), el("td", {}, ago(m.since)),
    el("td", {"class": "text"}, printable((m.worker_types || []).join(", ")))));
  $("#managers tbody").replaceChildren(...rows);
  $("#managers-none").hidden = rows.length > 0;
}

// Each worker's row, kept while the worker's data stays the same: a new state of
// the fleet makes anew only the rows that changed.
const rowsMade = new Map();  // worker id -> [its data as JSON, its <tr>]

function rowOf(row) {
  const data = JSON.stringify(row), made = rowsMade.get(row.worker_id);
  if (made && made[0] === data) return made[1];
  const tr = el("tr", {"data-worker": row.worker_id, "data-state": row.state, "tabindex": "0"});
  for (const [key, label] of COLUMNS) {
    const kind = ["pid", "restarts"].includes(key) ? "num" : ["last_exit", "detail", "host"].includes(key)
      ? "text" : null;
    tr.append(el("td", {"data-label": label, "class": kind}, cell(row, key)));
  }
  tr.addEventListener("click", () => openWorker(row.worker_id));
  tr.addEventListener("keydown", (e) => { if (e.key === "Enter") openWorker(row.worker_id); });
  rowsMade.set(row.worker_id, [data, tr]);
  return tr;
}

function renderWorkers() {
  const all = workers(), rows = all.filter(chosen).sort(compare), present = new Set(all.map((r) => r.worker_id));
  $("#workers tbody").replaceChildren(...rows.map(rowOf));
  for (const id of rowsMade.keys()) if (!present.has(id)) rowsMade.delete(id);
  for (const th of document.querySelectorAll("#workers th")) {
    th.setAttribute("aria-sort", th.dataset.key === sortKey ? (ascending ? "ascending" : "descending") : "none");
    th.querySelector("span").textContent = th.dataset.key === sortKey ? (ascending ? " \u25B2" : " \u25BC") : "";
  }
  $("#shown").textContent = rows.length === all.length ? `${all.length} workers`
    : `${rows.length} of ${all.length} workers`;
  $("#left-out").hidden = !fleet.left_out;
  $("#left-out").textContent = `${fleet.left_out} more rows of the fleet are not listed: the page lists at most `
    + `${fleet.workers.length}, the desired workers first (python uniphant.py ps lists them all).`;
}

function render() {
  if (!fleet) return;
  renderCounts();
  renderFilters();
  renderManagers();
  renderWorkers();
  const open = view.get("worker");
  if (open && open !== shownWorker) openWorker(open);
  else if (open && shownWorker) {
    const row = fleet.workers.find((r) => r.worker_id === open);
    if (JSON.stringify(row) !== $("#detail").dataset.row) loadWorker(open);
  }
}

function tick() {
  for (const span of document.querySelectorAll("[data-since]")) span.textContent = age(now() - span.dataset.since);
  for (const span of document.querySelectorAll("[data-next]")) {
    span.textContent = "in " + age(span.dataset.next - now());
  }
}

// The detail of one worker: all the fleet knows, its history and its last log lines.
function openWorker(id) {
  view.set("worker", id);
  remember();
  shownWorker = id;
  $("#detail").hidden = false;
  loadWorker(id);
}

function closeWorker() {
  view.delete("worker");
  remember();
  shownWorker = null;
  $("#detail").hidden = true;
  $("#detail-body").replaceChildren();
}

async function loadWorker(id) {
  let answer;
  try {
    answer = await fetch("/api/worker/" + encodeURIComponent(id), {cache: "no-store"});
  } catch (error) {
    return;  // the page's server is away: the header says so, and the next refresh tries again
  }
  if (shownWorker !== id) return;
  const row = fleet && fleet.workers.find((r) => r.worker_id === id);
  $("#detail").dataset.row = JSON.stringify(row);
  if (!answer.ok) {
    $("#detail-body").replaceChildren(el("p", {"class": "muted"}, "This worker is no longer in the fleet."));
    return;
  }
  renderWorker(await answer.json());
}

function renderWorker(w) {
  const settings = Object.entries(w.settings || {}).map(([k, v]) => printable(k) + "=" + printable(v)).join(", ");
  const facts = [["worker", el("span", {"class": "mono"}, w.worker_id)], ["type", printable(w.worker_type)],
    ["state", badge(w.state)], ["detail", printable(w.detail)], ["host", printable(w.host || "")],
    ["host id", w.host_id ? el("span", {"class": "mono"}, w.host_id) : ""],
    ["placed", w.state === "not wanted" ? "" : w.pinned ? "pinned to its host" : "on any host with its script"],
    ["PID", w.pid === null ? "" : String(w.pid)], ["since", ago(w.since)], ["restarts", String(w.restarts)],
    ["last exit", printable(w.last_exit)], ["next start", until(w.next_start_at)],
    ["heartbeat", w.heartbeat_at ? el("span", {}, ago(w.heartbeat_at), " ago") : ""], ["settings", settings],
    ["warnings", w.warnings ? el("span", {"class": "warnings"}, ...w.warnings.split("\n").map((line) => el("div", {}, printable(line)))) : ""]];
  const list = el("dl");
  for (const [name, value] of facts) {
    if (value === "" || value === null) continue;
    list.append(el("dt", {}, name), el("dd", {}, value));
  }
  const parts = [el("h2", {}, printable(w.worker_type), " ", el("span", {"class": "muted mono"}, w.worker_id.slice(0, 8))),
    list];
  if (about.actions && w.state !== "not wanted" && w.state !== "manager") {
    const buttons = [["restart", "Restart"], [w.paused ? "resume" : "pause", w.paused ? "Resume" : "Pause"],
      ["stop", "Stop (remove)"]].map(([verb, label]) => {
      const button = el("button", {"type": "button", "data-action": verb}, label);
      button.addEventListener("click", () => {
        if (verb !== "stop" || confirm("Remove worker " + w.worker_id + " from the desired state?")) {
          act(verb, {"worker_id": w.worker_id});
        }
      });
      return button;
    });
    parts.push(el("div", {"class": "actions"}, ...buttons));
  }
  parts.push(el("h3", {}, "History"));
  if (w.history.length) {
    // Each event carries the last exit so far: it is shown where it changed, at the end it tells of.
    const ended = (e, i) => i + 1 < w.history.length && w.history[i + 1].last_exit === e.last_exit ? "" : e.last_exit;
    parts.push(el("table", {"class": "history"}, el("thead", {}, el("tr", {}, ...["when", "state", "PID", "why it ended"]
      .map((h) => el("th", {}, h)))), el("tbody", {}, ...w.history.map((e, i) => el("tr", {},
      el("td", {}, ago(e.at), " ago"), el("td", {}, badge(e.state)),
      el("td", {"class": "num"}, e.pid === null ? "" : String(e.pid)),
      el("td", {"class": "text"}, printable(ended(e, i))))))));
  } else {
    parts.push(el("p", {"class": "muted"}, "No history: no manager has reported on it."));
  }
  parts.push(el("h3", {}, "Log"));
  const source = {"file": "The end of its log file on this host (" + printable(about.host) + ").",
    "tail": "The last lines it logged before its last run failed, kept by its manager; the whole log is on its host: python uniphant.py logs " + w.worker_id,
    null: "No log lines here: its log is on its host" + (w.host ? " (" + printable(w.host) + ")" : "") + ": python uniphant.py logs " + w.worker_id};
  parts.push(el("p", {"class": "muted"}, source[w.log.source]));
  if (w.log.lines.length) parts.push(el("pre", {"class": "log"}, w.log.lines.map(printable).join("\n")));
  $("#detail-body").replaceChildren(...parts);
  const log = $("#detail pre.log");
  if (log) log.scrollTop = log.scrollHeight;
}

// Actions: the token goes in a header, which no other site's form or script can send here.
async function act(verb, body) {
  const said = $("#said");
  try {
    const answer = await fetch("/api/" + verb, {method: "POST", cache: "no-store", body: JSON.stringify(body),
      headers: {"Content-Type": "application/json", "Authorization": "Bearer " + (sessionStorage.getItem("token") || "")}});
    const result = await answer.json().catch(() => ({"error": answer.statusText}));
    said.textContent = answer.ok ? printable(result.message) : verb + " refused: " + printable(result.error);
    said.className = answer.ok ? "" : "bad";
  } catch (error) {
    said.textContent = verb + " failed: " + printable(error.message);
    said.className = "bad";
  }
  if (shownWorker) loadWorker(shownWorker);
}

function formValues(form) { return Object.fromEntries(new FormData(form).entries()); }

function setUpActions() {
  $("#operate").hidden = !about.actions;
  $("#readonly").hidden = !!about.actions;
}

function live(text, kind) { $("#live").replaceChildren(el("span", {"class": "state " + kind}, text)); }

let refusals = 0;  // in a row: each doubles the wait before the next try
// The stream's last word (when, by this browser's clock, and how old the server's
// read of the fleet was then), while it is open.
let heard = null;

// The header: `stale` once the last read is older than the server's refresh (a
// second or two of grace), or the stream has been silent for longer than a tick.
function freshness() {
  if (heard === null || !about.refresh) return;
  const silent = (Date.now() - heard.at) / 1000;
  const late = heard.age > about.refresh + 2 || silent > about.tick + 2;
  live(late ? "stale" : "live", late ? "bad" : "good");
}

function hear(seconds) {
  heard = {"at": Date.now(), "age": seconds};
  stale(seconds);
  freshness();
}

function connect() {
  const events = new EventSource("/events");
  events.onopen = () => { refusals = 0; heard = {"at": Date.now(), "age": 0}; live("live", "good"); };
  // A lost stream the browser tries again itself; one refused (an answer, but no stream) it gives up.
  events.onerror = () => {
    heard = null;
    if (events.readyState === EventSource.CLOSED) refused(); else live("reconnecting", "bad");
  };
  events.addEventListener("about", (e) => { about = JSON.parse(e.data); $("#database").textContent = printable(about.database); setUpActions(); });
  events.addEventListener("tick", (e) => hear(JSON.parse(e.data).age));
  events.onmessage = (e) => {
    const message = JSON.parse(e.data);
    offset = message.now * 1000 - Date.now();
    fleet = message.fleet;
    hear(message.age);
    render();
  };
}

// Ask again to learn why (the refusal's words and its Retry-After), say so, and
// try again later, waiting twice as long after each refusal in a row (at most a minute).
async function refused() {
  let why = "the page's server did not answer", wait = 2;
  const asking = new AbortController();
  try {
    const answer = await fetch("/events", {cache: "no-store", signal: asking.signal});
    if (answer.ok) {
      asking.abort();
      connect();
      return;
    }
    why = (await answer.json().catch(() => ({"error": answer.statusText}))).error;
    wait = Number(answer.headers.get("Retry-After")) || wait;
  } catch (error) {
    // unreachable: the first reason stands
  }
  const delay = Math.min(wait * 2 ** refusals, 60) * (0.75 + Math.random() / 2);  // pages refused together spread
  refusals += 1;
  live("refused: " + printable(why) + "; trying again in " + Math.round(delay) + " s", "bad");
  setTimeout(connect, delay * 1000);
}

setInterval(freshness, 1000);

function stale(seconds) {
  $("#banner").hidden = seconds < 15;
  $("#banner").textContent = "The page's server has not read the fleet for " + age(seconds)
    + ": its database connection may be down.";
}

for (const select of document.querySelectorAll(".filters select")) {
  select.addEventListener("change", () => choose(select.name, select.value));
}
for (const [key, label] of COLUMNS) {
  const button = el("button", {"type": "button"}, label, el("span"));
  button.addEventListener("click", () => {
    ascending = key === sortKey ? !ascending : true;
    sortKey = key;
    render();
  });
  $("#workers thead tr").append(el("th", {"data-key": key, "class": ["pid", "restarts"].includes(key) ? "num" : null},
    button));
}
$("#detail .close").addEventListener("click", closeWorker);
document.addEventListener("keydown", (e) => { if (e.key === "Escape" && shownWorker) closeWorker(); });
$("#token").value = sessionStorage.getItem("token") || "";
$("#token").addEventListener("input", () => sessionStorage.setItem("token", $("#token").value));
$("#add").addEventListener("submit", (e) => {
  e.preventDefault();
  const v = formValues(e.target);
  act("add", {"worker_type": v.worker_type, "host_id": v.host_id || null,
    "settings": v.settings.split(/\s+/).filter((word) => word)});
});
$("#scale").addEventListener("submit", (e) => {
  e.preventDefault();
  const v = formValues(e.target);
  act("scale", {"worker_type": v.worker_type, "n": Number(v.n), "host_id": v.host_id || null});
});
$("#bytype").addEventListener("submit", (e) => {
  e.preventDefault();
  const verb = e.submitter.value, type = formValues(e.target).worker_type;
  if (verb !== "stop" || confirm("Remove every worker of " + type + " from the desired state?")) {
    act(verb, {"worker_type": type});
  }
});
setInterval(tick, 1000);
setInterval(() => { if (shownWorker) loadWorker(shownWorker); }, 5000);  // its log grows without a word
connect();
"""

_BODY = """<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<meta name="referrer" content="no-referrer">
<title>uniphant fleet</title>
<link rel="icon" href="data:,">
<style>{style}</style>
</head>
<body>
<header>
  <h1>uniphant fleet <span class="muted">of database <span id="database"></span></span></h1>
  <div id="counts"></div>
  <span id="readonly" class="state held" hidden title="no web_token is configured: the page only shows">read-only</span>
  <span id="live"><span class="state held">connecting</span></span>
</header>
<main>
  <p id="banner" hidden></p>
  <details class="operate" id="operate" hidden>
    <summary>Operate</summary>
    <form id="login"><label>Access token <input id="token" type="password" autocomplete="off" size="24"></label></form>
    <form id="add"><strong>Add</strong>
      <input name="worker_type" placeholder="worker type" required>
      <input name="host_id" placeholder="host id (any host if empty)" size="36">
      <input name="settings" placeholder="KEY=VALUE ..." size="24">
      <button type="submit">Add</button></form>
    <form id="scale"><strong>Scale</strong>
      <input name="worker_type" placeholder="worker type" required>
      <input name="n" type="number" min="0" max="100000" value="1" required>
      <input name="host_id" placeholder="host id (any host if empty)" size="36">
      <button type="submit">Scale</button></form>
    <form id="bytype"><strong>Every worker of</strong>
      <input name="worker_type" placeholder="worker type" required>
      <button type="submit" value="restart">Restart</button>
      <button type="submit" value="pause">Pause</button>
      <button type="submit" value="resume">Resume</button>
      <button type="submit" value="stop">Stop (remove)</button></form>
    <p id="said" role="status"></p>
  </details>
  <h2>Managers</h2>
  <table id="managers"><thead><tr><th>state</th><th>host</th><th>host id</th><th class="num">PID</th><th>since</th>
    <th>worker types</th></tr></thead><tbody></tbody></table>
  <p id="managers-none" class="muted" hidden>No manager has registered.</p>
  <h2>Workers <span class="muted" id="shown"></span></h2>
  <div class="filters">
    <select id="type" name="type" aria-label="worker type"></select>
    <select id="host" name="host" aria-label="host"></select>
    <select id="state" name="state" aria-label="state"></select>
  </div>
  <p id="left-out" class="muted" hidden></p>
  <table id="workers"><thead><tr></tr></thead><tbody></tbody></table>
</main>
<aside id="detail" hidden aria-label="worker detail">
  <button type="button" class="close" aria-label="close">Close</button>
  <div id="detail-body"></div>
</aside>
<script>{script}</script>
</body>
</html>
"""

def _digest(text: str) -> str:
    return "'sha256-" + base64.b64encode(hashlib.sha256(text.encode()).digest()).decode() + "'"


_PAGE = _BODY.format(style=_STYLE, script=_SCRIPT).encode()
# Only the page's own style and script run: no other inline code, no file from
# anywhere, no frame around it, no form sent anywhere.
_SECURITY_HEADERS = (
    ("Content-Security-Policy", f"default-src 'none'; script-src {_digest(_SCRIPT)}; "
                                f"style-src {_digest(_STYLE)}; connect-src 'self'; img-src data:; "
                                f"base-uri 'none'; form-action 'none'; frame-ancestors 'none'"),
    ("X-Frame-Options", "DENY"),
    ("X-Content-Type-Options", "nosniff"),
    ("Referrer-Policy", "no-referrer"),
    ("Cross-Origin-Opener-Policy", "same-origin"),
    ("Cross-Origin-Resource-Policy", "same-origin"),
    ("Cache-Control", "no-store"),
)

# The answer to a connection beyond the open connections' bound, sent as its socket takes it.
_BUSY = b'{"error":"too many open connections"}'
_REFUSAL = (f"HTTP/1.0 503 Service Unavailable\r\nContent-Type: application/json\r\nContent-Length: {len(_BUSY)}"
            f"\r\nRetry-After: {_RETRY_AFTER}\r\n"
            + "".join(f"{name}: {value}\r\n" for name, value in _SECURITY_HEADERS) + "\r\n").encode() + _BUSY

if __name__ == "__main__":
    main(serve)
