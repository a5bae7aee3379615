"""Fixtures: a real PostgreSQL server for the session, and throwaway projects.

The server is started in a temporary directory and removed afterwards (see
dev/pgserver.py for how its binaries are found).  To use an existing server
instead, set UNIPHANT_TEST_PGHOST (a host name or socket directory),
UNIPHANT_TEST_PGPORT, UNIPHANT_TEST_PGUSER (a superuser) and, if needed,
UNIPHANT_TEST_PGPASSWORD: the tests then work in databases they create and drop.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
import uuid
from typing import Callable, Dict, List, Optional

import pg8000.dbapi
import pytest

REPO = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(REPO, "dev"))
import pgserver  # noqa: E402

# A test session started in the background by a shell without job control
# inherits SIGINT and SIGQUIT ignored, and so would every program it starts:
# the tests of what Ctrl-C does need the programs to get them as a terminal
# gives them.  (A caught signal is reset to its default in a child.)
signal.signal(signal.SIGINT, signal.default_int_handler)
if signal.getsignal(signal.SIGQUIT) == signal.SIG_IGN:
    signal.signal(signal.SIGQUIT, signal.SIG_DFL)

PROBE = '''\
"""A worker whose behaviour its config key `mode` picks."""
import os, sys, time
from uniphant import alive, main

def work(config, logger, connection):
    mode = config.get("mode", "tick")
    if mode == "raise":
        raise RuntimeError("boom from the worker")
    if mode == "sleep":
        logger.info("sleeping")
        time.sleep(float(config.get("sleep", "3600")))
    if mode == "spin":
        calls = 0
        while alive(config, connection):
            calls += 1
        logger.info("alive() calls: %d", calls)
        return
    if mode == "fork" and not os.path.exists("child.pid"):
        child = os.fork()
        if child == 0:
            time.sleep(3600)
            os._exit(0)
        with open("child.pid", "w") as f:
            f.write(str(child))
    if mode == "query":
        cursor = connection.cursor()
        cursor.execute("SELECT %s::text", (config["worker_id"],))
        logger.info("query answered %s", cursor.fetchone()[0])
    logger.info("tick")

if __name__ == "__main__":
    main(work)
'''


def wait_for(condition: Callable[[], object], timeout: float = 15.0, what: str = "condition"):
    """Poll condition until it is truthy; fail the test after timeout seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.02)


class Database:
    """The test database, and the environment that points a worker at it."""

    def __init__(self, env: Dict[str, str], connect: Callable[..., object]) -> None:
        self.env = env
        self._connect = connect
        self.conn = connect()

    def connect(self, **kwargs):
        return self._connect(**kwargs)

    def rows(self, sql: str, *params) -> List[tuple]:
        cursor = self.conn.cursor()
        cursor.execute(sql, params)
        return [tuple(r) for r in cursor.fetchall()] if cursor.description else []

    def value(self, sql: str, *params):
        rows = self.rows(sql, *params)
        return rows[0][0] if rows else None

    def process(self, worker_id: str) -> Optional[tuple]:
        rows = self.rows("SELECT id, host_id, pid, worker_type FROM processes WHERE worker_id = %s::uuid",
                         worker_id)
        return rows[0] if rows else None


def _external_env() -> Optional[Dict[str, str]]:
    if not os.environ.get("UNIPHANT_TEST_PGHOST"):
        return None
    return {key: os.environ.get(f"UNIPHANT_TEST_{key}", "")
            for key in ("PGHOST", "PGPORT", "PGUSER", "PGPASSWORD")}


def _connector(env: Dict[str, str], database: str) -> Callable[..., object]:
    def connect(**kwargs):
        host = env["PGHOST"]
        port = int(env.get("PGPORT") or 5432)
        where = ({"unix_sock": f"{host}/.s.PGSQL.{port}"} if host.startswith("/")
                 else {"host": host, "port": port})
        params = dict(user=env["PGUSER"], password=env.get("PGPASSWORD") or None, database=database, **where)
        params.update(kwargs)
        conn = pg8000.dbapi.connect(**params)
        conn.autocommit = True
        # The tests name uniphant's objects as a user who set search_path would
        # (pg8000 takes startup parameters only from 1.31.3).
        conn.execute_simple("SET search_path = public, uniphant")
        return conn
    return connect


class Cluster:
    """A server the session may create databases in."""

    def __init__(self, server: Optional[pgserver.Server], env: Dict[str, str]) -> None:
        self.server = server
        self.env = env
        self.created: List[str] = []

    def _admin(self, *statements: str) -> None:
        admin = _connector(self.env, "postgres")()
        try:
            for statement in statements:
                admin.cursor().execute(statement)
        finally:
            admin.close()

    def database(self, name: str, schema: bool = True) -> Database:
        name = f"{name}_{os.getpid()}"  # xdist workers may share an existing server
        self._admin(f'DROP DATABASE IF EXISTS "{name}"', f'CREATE DATABASE "{name}"')
        self.created.append(name)
        connect = _connector(self.env, name)
        if schema:
            pgserver.load_sql(connect(), os.path.join(REPO, "schema.sql"))
        env = dict(self.env, PGDATABASE=name)
        return Database({k: v for k, v in env.items() if v}, connect)


@pytest.fixture(scope="session")
def cluster(request):
    external = _external_env()
    if external:
        cluster = Cluster(None, external)
        yield cluster
        cluster._admin(*(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)' for name in cluster.created))
        return
    try:
        server = pgserver.Server.started()
    except pgserver.ServerError as e:
        reason = f"the test server could not be started: {e}"
    else:
        with server:
            yield Cluster(server, server.env())
        return
    request.session.shouldstop = "the test server could not be started"  # xdist too
    pytest.fail(reason, pytrace=False)


@pytest.fixture(scope="session")
def shared_db(cluster) -> Database:
    database = cluster.database("uniphant_test")
    yield database
    database.conn.close()


@pytest.fixture
def db(request, cluster, shared_db) -> Database:
    """The test's database: the session's, or, for a test marked own_database, one
    of its own (a manager acts on every worker its database holds)."""
    if request.node.get_closest_marker("own_database") is None:
        yield shared_db
        return
    database = cluster.database(f"own_{uuid.uuid4().hex[:8]}")
    yield database
    database.conn.close()


@contextlib.contextmanager
def own_server(ssl: bool = False):
    """A server of the test's own, with the schema in database `uniphant`."""
    with pgserver.Server() as server:
        if ssl and not server.supports_ssl():
            pytest.skip(f"the server binaries in {server.bindir} (or openssl) lack SSL support")
        server.init(ssl=ssl).start()
        server.create_database("uniphant")
        yield server


@pytest.fixture
def private_server():
    """A server of this test's own, which it may stop and start."""
    with own_server() as server:
        yield server


@pytest.fixture
def ssl_server():
    """A server of this test's own that speaks SSL, with a password role `alice` (password `alice-pw`)."""
    with own_server(ssl=True) as server:
        conn = server.connect("uniphant")
        conn.cursor().execute("CREATE ROLE alice LOGIN PASSWORD 'alice-pw'")
        conn.cursor().execute("SELECT uniphant.grant_role('alice', 'worker')")
        conn.close()
        yield server


class Project:
    """A project root with workers/, a HOME of its own, and helpers to run workers."""

    def __init__(self, root: str, home: str, env: Dict[str, str]) -> None:
        self.root = root
        self.home = home
        self.env = env
        self.children: List[subprocess.Popen] = []
        self.write("workers/test/probe.py", PROBE)

    def path(self, relative: str) -> str:
        return os.path.join(self.root, relative)

    def write(self, relative: str, text: str, mode: Optional[int] = None, base: Optional[str] = None) -> str:
        path = os.path.join(base or self.root, relative)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "w", encoding="utf-8") as f:
            f.write(text)
        if mode is not None:
            os.chmod(path, mode)
        return path

    def command(self, worker_id: Optional[str], *args: str, script: str = "workers/test/probe.py") -> List[str]:
        """The command line of a worker script; worker_id None gives none (a worker run once per host)."""
        return [sys.executable, script, *([worker_id] if worker_id else []), *args]

    def run(self, worker_id: str, *args: str, script: str = "workers/test/probe.py",
            timeout: float = 60, env: Optional[Dict[str, str]] = None) -> subprocess.CompletedProcess:
        return subprocess.run(self.command(worker_id, *args, script=script), cwd=self.root,
                              env=dict(self.env, **(env or {})), capture_output=True, text=True,
                              timeout=timeout, stdin=subprocess.DEVNULL)

    def popen(self, worker_id: str, *args: str, script: str = "workers/test/probe.py",
              env: Optional[Dict[str, str]] = None, **kwargs) -> subprocess.Popen:
        kwargs.setdefault("stdout", subprocess.PIPE)
        kwargs.setdefault("stderr", subprocess.PIPE)
        child = subprocess.Popen(self.command(worker_id, *args, script=script), cwd=self.root,
                                 env=dict(self.env, **(env or {})), text=True,
                                 stdin=subprocess.DEVNULL, **kwargs)
        self.children.append(child)
        return child

    def log(self, worker_id: str, worker_type: str = "test.probe") -> str:
        try:
            with open(self.path(f"log/{worker_type}/{worker_id}.log"), encoding="utf-8") as f:
                return f.read()
        except FileNotFoundError:
            return ""

    def running_pid(self, worker_id: str, worker_type: str = "test.probe") -> Optional[int]:
        import uniphant

        return uniphant.get_pid_for_running_process(self.path(f"pid/{worker_type}/{worker_id}.pid"))

    def cleanup(self) -> None:
        """Kill whatever a test left running: daemons (by their PID files) and children."""
        import uniphant

        # Every process at work in the project: daemons whose PID file a test
        # removed, and workers that a killed manager forked before they registered.
        for name in os.listdir("/proc"):
            try:
                cwd = os.readlink(f"/proc/{name}/cwd")
                if name.isdigit() and int(name) != os.getpid() and \
                        (cwd + "/").startswith(self.root + "/"):
                    os.kill(int(name), signal.SIGKILL)
            except OSError:
                continue  # gone, or not a process
        if os.path.islink(self.path("pid")):
            return
        for directory, _, files in os.walk(self.path("pid")):
            for name in files:
                try:
                    pid = uniphant.get_pid_for_running_process(os.path.join(directory, name))
                except uniphant.UniphantError:
                    continue  # not a PID file (a test planted something else there)
                if pid:
                    os.kill(pid, signal.SIGKILL)
        for child in self.children:
            if child.poll() is None:
                child.kill()
            child.communicate()


def worker_env(database_env: Dict[str, str], home: str) -> Dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
    env.update(database_env)
    env.update(HOME=home, PYTHONPATH=REPO)
    return env


@pytest.fixture
def project(tmp_path, db):
    home = tmp_path / "home"
    home.mkdir()
    root = tmp_path / "project"
    root.mkdir()
    proj = Project(str(root), str(home), worker_env(db.env, str(home)))
    yield proj
    proj.cleanup()


@pytest.fixture
def worker_id() -> str:
    return str(uuid.uuid4())


def copy_examples(project: Project) -> None:
    shutil.copytree(os.path.join(REPO, "workers", "examples"), project.path("workers/examples"))


# ---------------------------------------------------------------------------
# Helpers the test files share
# ---------------------------------------------------------------------------

def assert_clean_error(result: subprocess.CompletedProcess, code: int, *fragments: str) -> None:
    assert result.returncode == code, (result.stdout, result.stderr)
    assert "Traceback" not in result.stderr
    for fragment in fragments:
        assert fragment in result.stderr, result.stderr


def start_daemon(project, worker_id, *args, **kwargs) -> int:
    result = project.run(worker_id, "start", *args, **kwargs)
    assert result.returncode == 0, (result.stdout, result.stderr)
    return int(result.stdout.strip().rsplit(" ", 1)[1].rstrip("."))


def show_config(project, *keys: str) -> list:
    """The values of keys in the config that setup_config() gives a worker of the project."""
    project.write("workers/test/show.py", (
        "from uniphant import setup_config\n"
        "c = setup_config()\n"
        f"print(*(c[k] for k in {keys!r}))\n"))
    result = subprocess.run([sys.executable, "workers/test/show.py"], cwd=project.root,
                            env=project.env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    return result.stdout.split()


def proc_stat(pid: int) -> List[str]:
    """The fields of /proc/<pid>/stat after the command name: [0] is the state, [1] the parent's PID."""
    with open(f"/proc/{pid}/stat") as f:
        return f.read().rsplit(") ", 1)[1].split()


def gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return proc_stat(pid)[0] == "Z"  # a daemon is reaped by init; a zombie has exited all the same


def write_worker(project, name: str, body: str, prelude: str = "") -> str:
    """workers/test/<name>.py, whose work function runs body (worker type test.<name>)."""
    return project.write(f"workers/test/{name}.py", (
        "import os, sys, threading, time\n"
        "from uniphant import alive, main\n"
        f"{textwrap.dedent(prelude)}\n\n"
        "def work(config, logger, connection):\n"
        f"{textwrap.indent(textwrap.dedent(body).strip(), '    ')}\n\n\n"
        "if __name__ == '__main__':\n"
        "    main(work)\n"))


def project_on(database, tmp_path):
    """A project whose workers use database."""
    home = tmp_path / "home"
    home.mkdir(exist_ok=True)
    return Project(str(tmp_path / "project"), str(home), worker_env(database.env, str(home)))


@pytest.fixture
def make_role(db):
    """A factory of login roles with a password and EXECUTE on the worker functions."""
    made = []

    def make(name: str = "role") -> tuple:
        role, password = f"{name}_{uuid.uuid4().hex[:8]}", "Secr3t-" + uuid.uuid4().hex
        db.rows(f"CREATE ROLE {role} LOGIN PASSWORD '{password}'")
        db.rows("SELECT uniphant.grant_role(%s, 'worker')", role)
        made.append(role)
        return role, password
    yield make
    for role in made:
        db.rows("DELETE FROM processes WHERE role = %s", role)
        db.rows(f"DROP OWNED BY {role}")
        db.rows(f"DROP ROLE {role}")


def session_of(db, role: str, password: str, process_id: str):
    return db.connect(user=role, password=password, host="127.0.0.1", port=int(db.env["PGPORT"]),
                      unix_sock=None, application_name=process_id)


def no_session(db, process_id: str) -> bool:
    return not db.value("SELECT count(*) FROM pg_stat_activity WHERE application_name = %s", process_id)


def cpu_seconds(pid: int) -> float:
    fields = proc_stat(pid)
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def server_project(tmp_path, name: str, server, conf: str = "") -> Project:
    home = tmp_path / f"{name}_home"
    home.mkdir(exist_ok=True)
    project = Project(str(tmp_path / name), str(home), worker_env(server.env("uniphant"), str(home)))
    if conf:
        project.write("uniphant.conf", conf)
    return project


def sql_rows(conn, sql, *params):
    cursor = conn.cursor()
    cursor.execute(sql, params)
    return [tuple(r) for r in cursor.fetchall()]


@pytest.fixture
def password_role(db):
    role = f"pw_{uuid.uuid4().hex[:8]}"
    password = "Secr3t-" + uuid.uuid4().hex
    db.rows(f"CREATE ROLE {role} LOGIN PASSWORD '{password}'")
    db.rows("SELECT uniphant.grant_role(%s, 'worker')", role)
    yield role, password
    db.rows("DELETE FROM processes WHERE role = %s", role)
    db.rows(f"DROP OWNED BY {role}")
    db.rows(f"DROP ROLE {role}")


def tcp_env(db, role):
    return {"PGHOST": "127.0.0.1", "PGPORT": db.env["PGPORT"], "PGUSER": role}


def read_until(stream, text: str, timeout: float = 15) -> str:
    """Lines of a child's output up to the first that holds text."""
    import select
    got, deadline = "", time.monotonic() + timeout
    while text not in got:
        if not select.select([stream], [], [], max(deadline - time.monotonic(), 0))[0]:
            pytest.fail(f"timed out after {timeout} s waiting for {text!r} in {got!r}")
        line = stream.readline()
        if not line:
            pytest.fail(f"the output ended before {text!r}: {got!r}")
        got += line
    return got


def register(conn, worker_id: str, host_id: str, stale_after: str = "5 seconds", gone_pid=None) -> None:
    """register_process() for a process of PID 1; gone_pid: the PID the caller found gone."""
    conn.cursor().execute("SELECT register_host(%s::uuid, %s)", (host_id, f"host-{host_id[:8]}"))
    conn.cursor().execute("SELECT register_process(%s::uuid, %s::uuid, 'test.sql', 1, %s::interval, "
                          "false, %s)", (worker_id, host_id, stale_after, gone_pid))


# ---------------------------------------------------------------------------
# The fleet: a manager per project root, which plays a host
# ---------------------------------------------------------------------------

def with_manager(project, conf: str = "", *args: str, env=None) -> str:
    """Start the project's manager as a daemon; return its worker id."""
    os.makedirs(project.path("workers/uniphant"), exist_ok=True)
    shutil.copy(os.path.join(REPO, "workers", "uniphant", "manager.py"), project.path("workers/uniphant"))
    if conf:
        project.write("workers/uniphant/uniphant.conf", conf)
    manager_id = str(uuid.uuid4())
    start_daemon(project, manager_id, *args, script="workers/uniphant/manager.py", env=env)
    return manager_id


def host_of(project) -> str:
    with open(project.path(".host_id")) as f:
        return f.read().strip()


def another_host(project, tmp_path, name: str = "other_host") -> Project:
    return type(project)(str(tmp_path / name), project.home, project.env)


def fleet(db, worker_id: str) -> dict:
    rows = db.rows("SELECT state, host_id::text, pid, restarts, last_exit, next_start_at FROM fleet "
                   "WHERE worker_id = %s::uuid", worker_id)
    keys = ("state", "host_id", "pid", "restarts", "last_exit", "next_start_at")
    return dict(zip(keys, rows[0])) if rows else {}


def running(db, worker_id: str):
    """The PID of worker_id's live process row, or None."""
    return db.value("SELECT pid FROM processes WHERE worker_id = %s::uuid", worker_id)


def ops(project, *args: str) -> subprocess.CompletedProcess:
    """python uniphant.py ARGS, in the project."""
    return subprocess.run([sys.executable, os.path.join(REPO, "uniphant.py"), *args], cwd=project.root,
                          env=project.env, capture_output=True, text=True, timeout=60)
