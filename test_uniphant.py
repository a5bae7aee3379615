"""The runtime's contract: uniphant.py against a real PostgreSQL, by the
manual's sections (configuration, signals, the command line, writing a worker,
the SQL API, one copy at a time, failure behaviour, restricted environments),
then its pure logic.

It runs on its own: a project that vendors uniphant.py may copy this file
beside it and schema.sql, and run it with pytest and pg8000 installed:

    UNIPHANT_TEST_PGHOST=/var/run/postgresql UNIPHANT_TEST_PGUSER=postgres pytest test_uniphant.py

UNIPHANT_TEST_PGHOST (a host name or socket directory), UNIPHANT_TEST_PGPORT,
UNIPHANT_TEST_PGUSER (a superuser) and, if needed, UNIPHANT_TEST_PGPASSWORD
name the server; the tests work in databases they create and drop.  Without
them, the tests that need a database are skipped.  The few that need a server
of their own (to stop it, or to speak SSL) start one with dev/pgserver.py of
uniphant's repository, and are skipped where it is not.  In the repository,
conftest.py starts a throwaway server and sets these variables, and the
other suites (tests/) use this file's fixtures and helpers.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import time
import uuid
import warnings
from typing import Callable, Dict, List, Optional

import pg8000.dbapi
import pytest

import uniphant

# A copy run on its own has no pyproject.toml to register the marks it uses.
warnings.filterwarnings("ignore", r"Unknown pytest\.mark\.(faults|unit)\b", pytest.PytestUnknownMarkWarning)

REPO = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(REPO, "dev"))
try:
    import pgserver  # uniphant's repository's throwaway servers
except ImportError:  # a copy beside a vendored uniphant.py
    pgserver = None

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
    env = {key: os.environ.get(f"UNIPHANT_TEST_{key}", "") for key in ("PGHOST", "PGPORT", "PGUSER", "PGPASSWORD")}
    return dict(env, PGPORT=env["PGPORT"] or "5432")  # libpq's default, which the tests' TCP connections name


def load_sql(conn, path: str) -> None:
    """Run a SQL file through the simple query protocol, then close conn."""
    try:
        with open(path, encoding="utf-8") as f:
            conn.execute_simple(f.read())
    finally:
        conn.close()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def earlier_schema(name: str) -> str:
    """The path of an earlier release's schema.sql, kept in the repository's tests/fixtures/."""
    path = os.path.join(REPO, "tests", "fixtures", name)
    if not os.path.exists(path):
        pytest.skip(f"the earlier release's schema tests/fixtures/{name} of uniphant's repository is not here")
    return path


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

    def __init__(self, env: Dict[str, str]) -> None:
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
            load_sql(connect(), os.path.join(REPO, "schema.sql"))
        env = dict(self.env, PGDATABASE=name)
        return Database({k: v for k, v in env.items() if v}, connect)


@pytest.fixture(scope="session")
def cluster():
    external = _external_env()
    if not external:
        pytest.skip("no PostgreSQL to test against: set UNIPHANT_TEST_PGHOST (a host name or socket directory), "
                    "UNIPHANT_TEST_PGPORT, UNIPHANT_TEST_PGUSER (a superuser) and, if needed, "
                    "UNIPHANT_TEST_PGPASSWORD")
    cluster = Cluster(external)
    yield cluster
    cluster._admin(*(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)' for name in cluster.created))


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


def throwaway_server() -> pgserver.Server:
    """A new server of dev/pgserver.py's, not yet made (a context manager that removes it)."""
    if pgserver is None:
        pytest.skip("needs a server of its own, which dev/pgserver.py of uniphant's repository starts")
    return pgserver.Server()


@contextlib.contextmanager
def own_server(ssl: bool = False):
    """A server of the test's own, with the schema in database `uniphant`."""
    with throwaway_server() as server:
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
    """A project root with workers/, a HOME of its own, and helpers to run workers.

    Every project built is cleaned up when its test ends (every_project_cleaned),
    however the test built it."""

    built: List["Project"] = []

    def __init__(self, root: str, home: str, env: Dict[str, str]) -> None:
        self.root = root
        self.home = home
        self.env = env
        self.children: List[subprocess.Popen] = []
        Project.built.append(self)
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
        return uniphant.get_pid_for_running_process(self.path(f"pid/{worker_type}/{worker_id}.pid"))

    def cleanup(self) -> None:
        """Kill whatever a test left running: daemons (by their PID files) and children."""
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
        self.children.clear()


def worker_env(database_env: Dict[str, str], home: str) -> Dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
    env.update(database_env)
    env.update(HOME=home, PYTHONPATH=REPO)
    return env


@pytest.fixture(autouse=True)
def every_project_cleaned():
    """Kill what the test's projects left running when it ends: also those a test
    built for a second host or another server, and those of a failed test."""
    yield
    while Project.built:
        Project.built.pop().cleanup()


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
    examples = os.path.join(REPO, "workers", "examples")
    if not os.path.isdir(examples):
        pytest.skip("the examples, workers/examples/ of uniphant's repository, are not here")
    shutil.copytree(examples, project.path("workers/examples"))


# ---------------------------------------------------------------------------
# Helpers the tests share
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



# ===========================================================================
# Configuration
#
# docs/configuration.md, "Configuration": config files and secrets, runtime and connection settings as libpq reads
# them, and the host's identity.
# ===========================================================================

def test_config_file_gives_pairs_and_skips_comments_and_blank_lines(tmp_path):
    path = tmp_path / "uniphant.conf"
    path.write_text("# a comment\n\n  key1 = value1\nkey2=a=b\n   # indented comment\nempty=\n")
    assert uniphant.parse_key_value_format(str(path)) == {"key1": "value1", "key2": "a=b", "empty": ""}


def test_config_file_with_bom_and_crlf_line_ends_parses(tmp_path):
    path = tmp_path / "uniphant.conf"
    path.write_bytes(b"\xef\xbb\xbfkey1=value1\r\nkey2=value2\r\n")
    assert uniphant.parse_key_value_format(str(path)) == {"key1": "value1", "key2": "value2"}


@pytest.mark.parametrize("content, line, message", [
    ("ok=1\nno equals sign here\n", 2, "expected key=value"),
    ("=value\n", 1, "empty key"),
    ("a=1\na=2\n", 2, "'a' is already defined at"),
    ("worker_id=x\n", 1, "'worker_id' is reserved"),
    ("interval=soon\n", 1, "bad value for interval"),
    ("stop_timeout=0\n", 1, "bad value for stop_timeout"),
    ("log_level=LOUD\n", 1, "bad value for log_level"),
    ("PGPORT=fivefour\n", 1, "bad value for PGPORT"),
    ("PGSSLMODE=maybe\n", 1, "bad value for PGSSLMODE"),
])
def test_bad_config_line_is_an_error_naming_file_and_line(project, db, worker_id, content, line, message):
    conf = project.write("workers/test/uniphant.conf", content)
    hosts_before = db.value("SELECT count(*) FROM hosts")
    result = project.run(worker_id, "start", "-f")
    assert_clean_error(result, 2, f"{conf}:{line}", message)
    assert db.process(worker_id) is None
    assert db.value("SELECT count(*) FROM hosts") == hosts_before


def test_duplicate_key_across_the_hierarchy_is_an_error(project, worker_id):
    project.write("uniphant.conf", "colour=blue\n")
    project.write("workers/test/uniphant.conf", "colour=red\n")
    result = project.run(worker_id, "start", "-f")
    assert_clean_error(result, 2, "'colour' is already defined at", project.path("uniphant.conf"))


def test_unreadable_config_file_is_an_error(project, worker_id):
    os.makedirs(project.path("workers/uniphant.conf"))
    result = project.run(worker_id, "start", "-f")
    assert_clean_error(result, 2, project.path("workers/uniphant.conf"), "cannot read")


def test_config_is_read_from_every_directory_up_to_the_root(project, db, worker_id):
    project.write("uniphant.conf", "from_root=1\n")
    project.write("workers/uniphant.conf", "from_workers=2\n")
    project.write("workers/test/uniphant.conf", "from_script_dir=3\n")
    assert show_config(project, "from_root", "from_workers", "from_script_dir") == ["1", "2", "3"]


def test_secrets_are_read_from_home_in_the_manual_layout(project):
    secrets = os.path.join(project.home, ".uniphant", "secrets")
    project.write("workers/test/secrets.conf", "api_key=s3cret\n", mode=0o600, base=secrets)
    project.write("workers/secrets.conf", "token=t0ken\n", mode=0o600, base=secrets)
    project.write("secrets.conf", "root_secret=r00t\n", mode=0o600, base=secrets)
    assert show_config(project, "api_key", "token", "root_secret") == ["s3cret", "t0ken", "r00t"]


@pytest.mark.faults
def test_secrets_file_readable_by_others_is_refused(project, worker_id):
    secrets = os.path.join(project.home, ".uniphant", "secrets")
    path = project.write("secrets.conf", "api_key=s3cret\n", mode=0o644, base=secrets)
    result = project.run(worker_id, "start", "-f")
    assert_clean_error(result, 2, path, f"chmod 600 {path}")
    assert "s3cret" not in result.stderr + result.stdout


def test_secret_key_may_not_repeat_a_config_key(project, worker_id):
    secrets = os.path.join(project.home, ".uniphant", "secrets")
    project.write("uniphant.conf", "api_key=public\n")
    project.write("secrets.conf", "api_key=s3cret\n", mode=0o600, base=secrets)
    result = project.run(worker_id, "start", "-f")
    assert_clean_error(result, 2, "'api_key' is already defined")


def test_password_file_is_read_as_libpq_reads_it(tmp_path):
    path = tmp_path / "pgpass"
    path.write_text("# comment\n"
                    "other:5432:*:*:wrong\n"
                    "db\\:host:5432:app:*:c\\:olon\\\\and:more\n"
                    "*:*:*:alice:fallback\n")
    path.chmod(0o600)
    config = {"PGPASSFILE": str(path)}
    assert uniphant._pgpass_password(config, "db:host", 5432, "app", "bob") == "c:olon\\and:more"
    assert uniphant._pgpass_password(config, "elsewhere", 1, "x", "alice") == "fallback"
    assert uniphant._pgpass_password(config, "elsewhere", 1, "x", "bob") is None
    path.chmod(0o644)  # readable by others: ignored, as libpq does
    assert uniphant._pgpass_password(config, "elsewhere", 1, "x", "alice") is None


@pytest.mark.parametrize("script, worker_type", [
    ("workers/happy.py", "happy"),
    ("workers/a/b.py", "a.b"),
    ("workers/x/my.job.py", "x.my.job"),
])
def test_worker_type_is_the_path_below_workers(project, worker_id, script, worker_type):
    project.write(script, open(project.path("workers/test/probe.py")).read())
    result = project.run(worker_id, "status", script=script)
    assert result.stdout.strip() == f"Worker {worker_type} with ID {worker_id} is not running."


def test_script_outside_a_workers_directory_is_an_error(project, worker_id):
    project.write("jobs/probe.py", open(project.path("workers/test/probe.py")).read())
    result = project.run(worker_id, "status", script="jobs/probe.py")
    assert_clean_error(result, 2, "inside a directory named 'workers'")


def test_connection_keys_in_config_files_win_over_the_environment(project, db, worker_id):
    project.write("uniphant.conf", f"PGDATABASE={db.env['PGDATABASE']}\n")
    result = project.run(worker_id, "start", env={"PGDATABASE": "no_such_database"})
    assert result.returncode == 0, result.stderr
    assert db.process(worker_id) is not None


def test_bad_connection_key_in_the_environment_is_an_error(project, db, worker_id):
    result = project.run(worker_id, "start", env={"PGPORT": "fivefour"})
    assert_clean_error(result, 2, "the environment: bad value for PGPORT")
    assert db.process(worker_id) is None


def test_runtime_keys_are_in_config_as_numbers(project):
    project.write("uniphant.conf", "interval=0.5\nlog_level=debug\n")
    assert show_config(project, "interval", "stop_timeout", "stale_after", "log_level") == [
        "0.5", "10.0", "60.0", "DEBUG"]


def test_config_errors_never_show_a_line_or_a_value(project, worker_id):
    secrets = os.path.join(project.home, ".uniphant", "secrets")
    path = project.write("secrets.conf", "ok=1\nPGPASSWORD hunter2-line\n", mode=0o600, base=secrets)
    result = project.run(worker_id, "start", "-f")
    assert_clean_error(result, 2, f"{path}:2", "expected key=value")
    assert "hunter2" not in result.stdout + result.stderr
    project.write("secrets.conf", "PGPORT=hunter2-value\n", mode=0o600, base=secrets)
    result = project.run(worker_id, "start", "-f")
    assert_clean_error(result, 2, f"{path}:1", "bad value for PGPORT")
    assert "hunter2" not in result.stdout + result.stderr


@pytest.mark.parametrize("key, value", [
    ("interval", "\u00b2"), ("interval", "\u0661"), ("interval", "nan"), ("interval", "inf"),
    ("interval", "1e400"), ("interval", "1_0"), ("interval", "-1"), ("interval", "86401"),
    ("stop_timeout", "0"), ("stale_after", "2.9"), ("stale_after", "Infinity"),
    ("PGPORT", "5\u20743"), ("PGPORT", "70000"), ("PGCONNECT_TIMEOUT", "\u0661\u0660"),
    ("PGCONNECT_TIMEOUT", "NaN"), ("PGCONNECT_TIMEOUT", "1.5"),
])
def test_numeric_settings_take_ascii_digits_and_finite_values_only(project, db, worker_id, key, value):
    conf = project.write("workers/test/uniphant.conf", f"{key}={value}\n")
    result = project.run(worker_id, "start", "-f")
    assert_clean_error(result, 2, f"{conf}:1", f"bad value for {key}")
    assert db.process(worker_id) is None
    assert not os.path.exists(project.path("log")) and not os.path.exists(project.path(".host_id"))


@pytest.mark.parametrize("key, value", [
    ("PGPORT", "\u00b9\u00b2"), ("PGPORT", "0"), ("PGCONNECT_TIMEOUT", "inf"), ("PGCONNECT_TIMEOUT", "\u0967"),
])
def test_numeric_settings_from_the_environment_are_checked_before_anything_starts(project, worker_id, key, value):
    result = project.run(worker_id, "start", "-f", env={key: value})
    assert_clean_error(result, 2, f"the environment: bad value for {key}")
    assert not os.path.exists(project.path("log")) and not os.path.exists(project.path(".host_id"))


def test_host_id_is_created_once_and_kept(project):
    first = show_config(project, "host_id")
    assert open(project.path(".host_id")).read().strip() == first[0]
    assert show_config(project, "host_id") == first
    assert uniphant.is_valid_uuid(first[0])


@pytest.mark.faults
def test_concurrent_first_starts_agree_on_one_host_id(project, db):
    worker_ids = [str(uuid.uuid4()) for _ in range(20)]
    children = [project.popen(w, "start") for w in worker_ids]
    assert [child.wait(timeout=120) for child in children] == [0] * 20
    host_id = open(project.path(".host_id")).read().strip()
    hosts = db.rows("SELECT DISTINCT host_id::text FROM processes WHERE worker_id = ANY(%s::uuid[])",
                    worker_ids)
    assert hosts == [(host_id,)]


def test_sslmode_require_encrypts_the_connection_and_stops_still_wake_it(ssl_server, tmp_path, worker_id):
    project = server_project(tmp_path, "ssl", ssl_server, "mode=query\ninterval=0.05\n")
    tcp = {"PGHOST": "127.0.0.1", "PGUSER": "alice", "PGPASSWORD": "alice-pw", "PGSSLMODE": "require"}
    admin = ssl_server.connect("uniphant")
    try:
        child = project.popen(worker_id, "start", "-f", env=tcp)
        wait_for(lambda: "query answered" in project.log(worker_id), what="a query over SSL")
        cursor = admin.cursor()
        cursor.execute("SELECT s.ssl FROM pg_stat_ssl s JOIN pg_stat_activity a USING (pid) "
                       "JOIN processes p ON a.application_name = p.id::text WHERE p.worker_id = %s::uuid",
                       (worker_id,))
        assert [tuple(r) for r in cursor.fetchall()] == [(True,)]
        cursor.execute("DELETE FROM processes WHERE worker_id = %s::uuid", (worker_id,))
        out, err = child.communicate(timeout=10)
        assert child.returncode == 0, err
        assert "stopping: its process row was deleted" in out
    finally:
        admin.close()
        project.cleanup()


def test_sslmode_verify_full_checks_the_server_certificate(ssl_server, tmp_path, worker_id):
    project = server_project(tmp_path, "verify", ssl_server)
    tcp = {"PGHOST": "localhost", "PGUSER": "alice", "PGPASSWORD": "alice-pw", "PGSSLMODE": "verify-full"}
    try:
        assert_clean_error(project.run(worker_id, "start", env=tcp), 1, "certificate verify failed")
        os.makedirs(os.path.join(project.home, ".postgresql"))
        shutil.copy(ssl_server.certificate, os.path.join(project.home, ".postgresql", "root.crt"))
        result = project.run(worker_id, "start", env=tcp)
        assert result.returncode == 0, result.stderr
    finally:
        project.cleanup()


def test_hosts_of_pghost_are_tried_in_order(project, db, worker_id, tmp_path):
    hosts = f"{tmp_path}/no_server_here,{db.env['PGHOST']}"
    pid = start_daemon(project, worker_id, env={"PGHOST": hosts})
    assert db.process(worker_id)[2] == pid


@pytest.mark.parametrize("space", ["\u00a0", "\u2003", "\u3000", "\x1c", "\x85"])
def test_other_scripts_spaces_around_a_number_are_an_error(project, worker_id, space):
    conf = project.write("workers/test/uniphant.conf", f"stale_after={space}5\n")
    assert_clean_error(project.run(worker_id, "start", "-f"), 2, f"{conf}:1", "bad value for stale_after")


@pytest.mark.parametrize("line, meant", [("intervall=2", "interval"), ("restart_dealy=3", "restart_delay"),
                                         ("Stale_After=30", "stale_after"), ("sslmode=require", "PGSSLMODE"),
                                         ("pghost=/tmp", "PGHOST")])
def test_a_key_one_slip_from_one_uniphant_reads_gets_a_warning_naming_it(project, db, worker_id, line, meant):
    project.write("workers/test/uniphant.conf", line + "\n")
    result = project.run(worker_id, "start")
    assert result.returncode == 0, result.stderr
    assert f"uniphant.conf:1: '{line.split('=')[0]}' is not a key uniphant reads; did you mean '{meant}'?" \
        in result.stderr
    wait_for(lambda: f"did you mean '{meant}'" in project.log(worker_id), what="the warning in the log too")


def test_a_key_of_the_workers_own_is_not_taken_for_a_slip(project, db, worker_id):
    project.write("workers/test/uniphant.conf", "queue=mail\nport=8080\nbatch_size=10\n")
    result = project.run(worker_id, "start")
    assert result.returncode == 0 and "warning" not in result.stderr


# ===========================================================================
# Signals
#
# docs/command-line.md, "Signals": what each signal does to a worker, and descriptors.
# ===========================================================================

def test_sighup_reopens_the_log_file_and_the_worker_runs_on(project, db, worker_id):
    pid = start_daemon(project, worker_id)
    log = project.path(f"log/test.probe/{worker_id}.log")
    os.rename(log, log + ".1")  # as logrotate does
    os.kill(pid, signal.SIGHUP)
    wait_for(lambda: "SIGHUP: reopened the log file" in project.log(worker_id), what="a new log file")
    os.remove(log)  # by hand, this time
    os.kill(pid, signal.SIGHUP)
    wait_for(lambda: "SIGHUP: reopened the log file" in project.log(worker_id), what="the log file back")
    assert not gone(pid) and db.process(worker_id)[2] == pid


@pytest.mark.parametrize("sig", ["SIGQUIT", "SIGABRT", "SIGXCPU", "SIGPWR"])
def test_signals_that_ask_a_process_to_end_stop_the_worker_cleanly(project, db, worker_id, sig):
    child = project.popen(worker_id, "start", "-f")
    wait_for(lambda: db.process(worker_id), what="the process row")
    child.send_signal(getattr(signal, sig))
    out, err = child.communicate(timeout=10)
    assert child.returncode == 0, err
    assert f"stopping: {sig} received" in out
    assert db.process(worker_id) is None


@pytest.mark.parametrize("sig", ["SIGUSR2", "SIGALRM", "SIGVTALRM", "SIGPROF", "SIGIO",
                                 "SIGTRAP", "SIGRTMIN+3"])
def test_other_signals_that_would_end_a_process_are_ignored(project, db, worker_id, sig):
    pid = start_daemon(project, worker_id)
    os.kill(pid, signal.SIGRTMIN + 3 if sig == "SIGRTMIN+3" else getattr(signal, sig))
    wait_for(lambda: f"ignoring {sig}" in project.log(worker_id), what=f"{sig} to be ignored")
    assert not gone(pid) and db.process(worker_id)[2] == pid


def test_sigusr1_makes_a_worker_confirm_its_row_at_once(project, db, worker_id):
    project.write("workers/test/uniphant.conf", "log_level=DEBUG\npooler=transaction\n")
    pid = start_daemon(project, worker_id)
    os.kill(pid, signal.SIGUSR1)
    wait_for(lambda: "but the row is still there: not a stop" in project.log(worker_id), what="a confirmation")
    db.rows("DELETE FROM processes WHERE worker_id = %s::uuid", worker_id)  # no LISTEN: no notification
    os.kill(pid, signal.SIGUSR1)
    wait_for(lambda: gone(pid), what="the worker to find its row gone")
    assert "stopping: its process row was deleted" in project.log(worker_id)


def test_worker_whose_connection_is_above_descriptor_1024_runs_and_stops(project, db, worker_id):
    import resource
    if resource.getrlimit(resource.RLIMIT_NOFILE)[1] < 2048:
        pytest.skip("the hard limit on open files is below 2048")
    write_worker(project, "hoarder", "logger.info('tick')", prelude="""
        import resource
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, 2048), hard))
        held = [os.open(os.devnull, os.O_RDONLY) for _ in range(1100)]
        """)
    child = project.popen(worker_id, "start", "-f", script="workers/test/hoarder.py")
    wait_for(lambda: "tick" in project.log(worker_id, "test.hoarder"), what="a tick")
    sockets = [int(fd) for fd in os.listdir(f"/proc/{child.pid}/fd")
               if os.readlink(f"/proc/{child.pid}/fd/{fd}").startswith("socket:")]
    assert max(sockets) > 1024
    db.rows("DELETE FROM processes WHERE worker_id = %s::uuid", worker_id)
    out, err = child.communicate(timeout=10)
    assert child.returncode == 0, err
    assert "stopping: its process row was deleted" in out


# ===========================================================================
# Command line
#
# docs/command-line.md, "Command line": start, stop, restart and status, as a daemon and in the foreground; and
# the waits the benchmark's figures rest on.
# ===========================================================================

@pytest.mark.parametrize("args, message", [
    (["not-a-uuid", "status"], "worker_id must be a UUID"),
    ([str(uuid.uuid4()), "launch"], "invalid command 'launch'"),
    ([str(uuid.uuid4())], "expected a worker_id and a command"),
    ([str(uuid.uuid4()), "start", "--daemon"], "unrecognized option '--daemon'"),
    ([str(uuid.uuid4()), "start", "now"], "unexpected argument 'now'"),
])
def test_bad_arguments_exit_2_with_usage(project, args, message):
    result = subprocess.run([sys.executable, "workers/test/probe.py", *args], cwd=project.root,
                            env=project.env, capture_output=True, text=True)
    assert_clean_error(result, 2, "usage:", message)


def test_is_pid_alive_tells_a_live_process_from_a_reaped_one():
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    assert uniphant.is_pid_alive(os.getpid())
    assert uniphant.is_pid_alive(1)
    assert not uniphant.is_pid_alive(child.pid)


def test_is_parent_alive_compares_with_the_parent_pid():
    assert uniphant.is_parent_alive(os.getppid())
    assert not uniphant.is_parent_alive(os.getppid() + 1)


def test_status_when_not_running_exits_3(project, worker_id):
    result = project.run(worker_id, "status")
    assert result.returncode == 3
    assert result.stdout.strip() == f"Worker test.probe with ID {worker_id} is not running."


def test_stop_when_not_running_exits_1(project, worker_id):
    result = project.run(worker_id, "stop")
    assert result.returncode == 1
    assert "is not running" in result.stdout


def test_daemon_start_returns_once_registered(project, db, worker_id):
    pid = start_daemon(project, worker_id)
    row = db.process(worker_id)
    assert row is not None and row[2] == pid
    result = project.run(worker_id, "status")
    assert result.returncode == 0
    assert result.stdout.strip() == f"Worker test.probe with ID {worker_id} is running with PID {pid}."


def test_daemon_is_detached_with_a_clean_slate(project, worker_id):
    pid = start_daemon(project, worker_id)
    assert os.getsid(pid) != os.getsid(0)
    assert os.getsid(pid) != pid  # not a session leader: it can never regain a terminal
    assert os.readlink(f"/proc/{pid}/cwd") == project.path("workers/test")
    for fd in (0, 1, 2):
        assert os.readlink(f"/proc/{pid}/fd/{fd}") == "/dev/null"
    with open(f"/proc/{pid}/status") as f:
        assert "Umask:\t0002" in f.read()
    targets = {os.readlink(f"/proc/{pid}/fd/{fd}") for fd in os.listdir(f"/proc/{pid}/fd")}
    assert not any(t.startswith("/dev/pts") or t.endswith(".pytest_cache") for t in targets)


def test_stop_ends_the_daemon_and_removes_its_row(project, db, worker_id):
    pid = start_daemon(project, worker_id)
    result = project.run(worker_id, "stop")
    assert result.returncode == 0, result.stderr
    assert gone(pid)
    assert db.process(worker_id) is None
    assert project.run(worker_id, "status").returncode == 3


def test_restart_replaces_the_running_process(project, db, worker_id):
    old = start_daemon(project, worker_id)
    result = project.run(worker_id, "restart")
    assert result.returncode == 0, result.stderr
    new = int(result.stdout.strip().rsplit(" ", 1)[1].rstrip("."))
    assert new != old and gone(old)
    assert db.process(worker_id)[2] == new


def test_restart_when_not_running_starts(project, db, worker_id):
    result = project.run(worker_id, "restart")
    assert result.returncode == 0, result.stderr
    assert db.process(worker_id) is not None


def test_start_when_running_says_so_with_the_pid(project, worker_id):
    pid = start_daemon(project, worker_id)
    for args in (["start"], ["start", "-f"]):
        result = project.run(worker_id, *args)
        assert result.returncode == 1
        assert f"already running with PID {pid}" in result.stderr


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_foreground_worker_stops_cleanly_on_signal(project, db, worker_id, sig):
    child = project.popen(worker_id, "start", "-f")
    wait_for(lambda: db.process(worker_id), what="the process row")
    child.send_signal(sig)
    out, err = child.communicate(timeout=10)
    assert child.returncode == 0, err
    assert f"stopping: {sig.name} received" in out
    assert db.process(worker_id) is None


def test_foreground_worker_logs_to_stdout_and_to_its_log_file(project, db, worker_id):
    child = project.popen(worker_id, "start", "-f")
    wait_for(lambda: "tick" in project.log(worker_id), what="a tick in the log file")
    child.terminate()
    out, _ = child.communicate(timeout=10)
    assert "tick" in out


@pytest.mark.faults
def test_status_and_stop_work_while_the_database_is_down(project, worker_id, tmp_path):
    pid = start_daemon(project, worker_id)
    down = {"PGHOST": str(tmp_path / "nowhere"), "PGPORT": "1"}
    status = project.run(worker_id, "status", env=down)
    assert status.returncode == 0 and str(pid) in status.stdout
    stop = project.run(worker_id, "stop", env=down)
    assert stop.returncode == 0, stop.stderr
    assert gone(pid)


@pytest.mark.faults
def test_start_while_the_database_is_unreachable_fails_in_one_line(project, worker_id, tmp_path):
    result = project.run(worker_id, "start", env={"PGHOST": "127.0.0.1", "PGPORT": "1"})
    assert_clean_error(result, 1, "could not connect to PostgreSQL at 127.0.0.1:1")
    assert len(result.stderr.strip().splitlines()) == 1
    assert project.run(worker_id, "status").returncode == 3


def test_deleting_the_row_stops_the_worker(project, db, worker_id):
    child = project.popen(worker_id, "start", "-f")
    wait_for(lambda: db.process(worker_id), what="the process row")
    db.rows("DELETE FROM processes WHERE worker_id = %s::uuid", worker_id)
    out, err = child.communicate(timeout=10)
    assert child.returncode == 0, err
    assert "stopping: its process row was deleted" in out


def test_deleting_the_row_stops_a_daemon(project, db, worker_id):
    pid = start_daemon(project, worker_id)
    db.rows("DELETE FROM processes WHERE worker_id = %s::uuid", worker_id)
    wait_for(lambda: gone(pid), what="the daemon to exit")
    assert project.run(worker_id, "status").returncode == 3


def test_second_process_for_a_worker_is_refused_from_another_host(project, db, worker_id, tmp_path):
    pid = start_daemon(project, worker_id)
    other = type(project)(str(tmp_path / "other_host"), project.home, project.env)
    try:
        result = other.run(worker_id, "start", "-f")
        assert_clean_error(result, 1, f"worker {worker_id} is already running", f"PID {pid}",
                           os.uname().nodename)
        assert db.process(worker_id)[2] == pid
    finally:
        other.cleanup()


@pytest.mark.faults
def test_start_after_kill_9_takes_over_the_row(project, db, worker_id):
    pid = start_daemon(project, worker_id)
    os.kill(pid, signal.SIGKILL)
    wait_for(lambda: gone(pid), what="the killed daemon to go")
    assert project.run(worker_id, "status").returncode == 3
    new = start_daemon(project, worker_id)
    assert db.process(worker_id)[2] == new


def test_worker_function_that_raises_exits_1_and_removes_its_row(project, db, worker_id):
    project.write("workers/test/uniphant.conf", "mode=raise\n")
    result = project.run(worker_id, "start", "-f")
    assert result.returncode == 1
    assert "RuntimeError: boom from the worker" in project.log(worker_id)
    assert "Traceback" in project.log(worker_id)
    assert db.process(worker_id) is None


def test_foreground_worker_stops_when_its_parent_dies(project, db, worker_id):
    launcher = subprocess.Popen(
        [sys.executable, "-c", "import subprocess, sys; subprocess.run(sys.argv[1:])",
         *project.command(worker_id, "start", "-f")],
        cwd=project.root, env=project.env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    project.children.append(launcher)
    row = wait_for(lambda: db.process(worker_id), what="the process row")
    launcher.kill()
    launcher.wait()
    wait_for(lambda: gone(row[2]), what="the orphaned worker to exit")
    assert db.process(worker_id) is None
    assert "stopping: the parent process has gone" in project.log(worker_id)


def test_worker_function_can_use_the_connection(project, db, worker_id):
    project.write("workers/test/uniphant.conf", "mode=query\ninterval=0.05\n")
    start_daemon(project, worker_id)
    wait_for(lambda: f"query answered {worker_id}" in project.log(worker_id), what="the query")


def test_help_works_outside_a_project(tmp_path):
    script = tmp_path / "loose.py"
    script.write_text("from uniphant import main\nmain(lambda config, logger, connection: None)\n")
    for flag in ("-h", "--help"):
        result = subprocess.run([sys.executable, str(script), flag], capture_output=True, text=True,
                                env=dict(os.environ, PYTHONPATH=REPO))
        assert result.returncode == 0, result.stderr
        assert result.stdout.startswith("usage: loose.py")


def test_status_and_stop_work_when_a_config_file_became_invalid(project, worker_id):
    pid = start_daemon(project, worker_id)
    conf = project.write("workers/test/uniphant.conf", "this line is broken\n")
    status = project.run(worker_id, "status")
    assert status.returncode == 0 and f"running with PID {pid}" in status.stdout
    stop = project.run(worker_id, "stop")
    assert stop.returncode == 0, stop.stderr
    assert f"{conf}:1" in stop.stderr and "the default stop_timeout of 10 s" in stop.stderr
    assert gone(pid)


@pytest.mark.parametrize("args", [["start"], ["start", "-f"]], ids=["daemon", "foreground"])
def test_start_that_fails_before_the_worker_is_ready_tells_why(project, worker_id, args):
    # A registration that fails with a bare TimeoutError, as pg8000 raises on a read timeout.
    project.write("workers/test/unlucky.py", (
        "import uniphant\n"
        "def register(config, connection):\n"
        "    raise TimeoutError()\n"
        "uniphant.register_process = register\n"
        "if __name__ == '__main__':\n"
        "    uniphant.main(lambda config, logger, connection: None)\n"))
    result = project.run(worker_id, *args, script="workers/test/unlucky.py")
    assert_clean_error(result, 1, "error: TimeoutError")


def test_two_scripts_of_one_worker_type_are_refused(project, worker_id):
    project.write("workers/test.probe.py", PROBE)
    for script in ("workers/test/probe.py", "workers/test.probe.py"):
        result = project.run(worker_id, "start", "-f", script=script)
        assert_clean_error(result, 2, project.path("workers/test/probe.py"),
                           project.path("workers/test.probe.py"), "both worker type 'test.probe'")
    assert not os.path.exists(project.path("pid"))


def test_signal_interrupts_the_wait_between_calls(project, db, worker_id):
    project.write("workers/test/uniphant.conf", "interval=3600\n")
    child = project.popen(worker_id, "start", "-f")
    wait_for(lambda: "tick" in project.log(worker_id), what="the first call")
    child.terminate()
    child.communicate(timeout=10)  # long before the hour is up
    assert child.returncode == 0


def test_deleted_row_wakes_the_worker_before_its_next_heartbeat(project, db, worker_id):
    # Heartbeats come every stale_after / 3 = 20 minutes here: only the notification can wake it.
    project.write("workers/test/uniphant.conf", "interval=3600\nstale_after=3600\n")
    child = project.popen(worker_id, "start", "-f")
    wait_for(lambda: "tick" in project.log(worker_id), what="the first call")
    db.rows("DELETE FROM processes WHERE worker_id = %s::uuid", worker_id)
    out, _ = child.communicate(timeout=10)
    assert "stopping: its process row was deleted" in out


def test_alive_in_a_tight_loop_does_not_write_per_call(cluster, tmp_path, worker_id):
    database = cluster.database("uniphant_heartbeats")
    database.rows("CREATE TABLE updates (at timestamptz)")
    database.rows("CREATE FUNCTION count_update() RETURNS trigger LANGUAGE plpgsql AS "
                  "$$ BEGIN INSERT INTO updates VALUES (now()); RETURN NULL; END $$")
    database.rows("CREATE TRIGGER count_update AFTER UPDATE ON processes "
                  "FOR EACH ROW EXECUTE FUNCTION count_update()")
    (tmp_path / "home").mkdir()
    project = Project(str(tmp_path / "project"), str(tmp_path / "home"),
                      worker_env(database.env, str(tmp_path / "home")))
    project.write("workers/test/uniphant.conf", "mode=spin\n")
    try:
        child = project.popen(worker_id, "start", "-f")
        wait_for(lambda: database.process(worker_id), what="the process row")
        time.sleep(2.5)  # the span being measured, not a wait for a condition
        database.rows("DELETE FROM processes WHERE worker_id = %s::uuid", worker_id)
        child.communicate(timeout=10)
        calls = int(project.log(worker_id).split("alive() calls: ")[1].split()[0])
        assert calls > 10_000
        assert database.value("SELECT count(*) FROM updates") <= 4  # one a second, and the first
    finally:
        project.cleanup()


@pytest.mark.parametrize("command", ["status", "stop"])
def test_status_and_stop_import_no_database_driver(project, worker_id, command):
    result = subprocess.run([sys.executable, "-X", "importtime", "workers/test/probe.py", worker_id, command],
                            cwd=project.root, env=project.env, capture_output=True, text=True)
    assert result.returncode in (1, 3)
    assert "uniphant" in result.stderr  # the import log is there
    assert "pg8000" not in result.stderr


@pytest.mark.parametrize("command", [["workers/test/probe.py", "--help"], pytest.param(
    [os.path.join(REPO, "uniphant.py"), "-h"], marks=pytest.mark.skipif(
        not os.path.exists(os.path.join(REPO, "uniphant_fleet.py")),
        reason="uniphant.py -h is the fleet's help, and uniphant_fleet.py is not beside uniphant.py"))])
def test_help_into_a_reader_that_has_gone_ends_quietly(project, command):
    read_end, write_end = os.pipe()
    os.close(read_end)  # `| head` that has read enough
    result = subprocess.run([sys.executable, *command], cwd=project.root, env=project.env, stdout=write_end,
                            stderr=subprocess.PIPE, text=True)
    os.close(write_end)
    assert result.returncode == 0 and result.stderr == ""


def test_a_socket_where_no_server_listens_asks_whether_the_server_runs(project, worker_id, tmp_path):
    result = project.run(worker_id, "start", env={"PGHOST": str(tmp_path)})
    assert_clean_error(result, 1, f"socket {tmp_path}/.s.PGSQL.", "is the server running")


# ===========================================================================
# Writing a worker
#
# README, "Writing a worker": the worker function, its transactions, exits, forks and session, and
# the examples as typed.
# ===========================================================================

@pytest.mark.parametrize("aborted", [False, True], ids=["open", "aborted"])
def test_exception_inside_a_transaction_still_removes_the_row(project, db, worker_id, aborted):
    write_worker(project, "tx_raise", f"""
        cursor = connection.cursor()
        cursor.execute("BEGIN")
        try:
            cursor.execute("SELECT {'1/0' if aborted else '1'}")
        except Exception:
            logger.info("the transaction is aborted")
        raise RuntimeError("boom inside a transaction")
        """)
    result = project.run(worker_id, "start", "-f", script="workers/test/tx_raise.py")
    assert result.returncode == 1
    log = project.log(worker_id, "test.tx_raise")
    assert "RuntimeError: boom inside a transaction" in log and "Traceback" in log
    assert db.process(worker_id) is None


def test_transaction_left_open_is_rolled_back_warned_once_and_blocks_no_delete(project, db, worker_id):
    table = f"left_open_{uuid.uuid4().hex[:8]}"
    db.rows(f"CREATE TABLE {table} (n int)")
    write_worker(project, "tx_open", f"""
        cursor = connection.cursor()
        cursor.execute("BEGIN")
        cursor.execute("INSERT INTO {table} VALUES (1)")
        logger.info("returning inside a transaction")
        """)
    project.write("workers/test/uniphant.conf", "interval=0.05\nstale_after=3\n")
    child = project.popen(worker_id, "start", "-f", script="workers/test/tx_open.py")
    log = lambda: project.log(worker_id, "test.tx_open")  # noqa: E731
    wait_for(lambda: log().count("returning inside a transaction") >= 5, what="five calls")
    assert log().count("returned inside a transaction: rolled it back") == 1
    assert db.value(f"SELECT count(*) FROM {table}") == 0
    deleter = db.connect()
    try:
        deleter.cursor().execute("SET lock_timeout = '2s'")
        deleter.cursor().execute("DELETE FROM processes WHERE worker_id = %s::uuid", (worker_id,))
    finally:
        deleter.close()
    out, err = child.communicate(timeout=10)
    assert "stopping: its process row was deleted" in out, err


def test_alive_inside_a_transaction_takes_no_lock_on_the_row(project, db, worker_id):
    write_worker(project, "tx_alive", """
        cursor = connection.cursor()
        cursor.execute("BEGIN")
        cursor.execute("SELECT 1")
        logger.info("in a transaction")
        while alive(config, connection) and not os.path.exists("done"):
            time.sleep(0.01)
        cursor.execute("COMMIT")
        """)
    project.write("workers/test/uniphant.conf", "stale_after=3\n")
    child = project.popen(worker_id, "start", "-f", script="workers/test/tx_alive.py")
    wait_for(lambda: "in a transaction" in project.log(worker_id, "test.tx_alive"), what="the transaction")
    wait_for(lambda: db.value("SELECT heartbeat_at < now() - interval '1.5 seconds' FROM processes "
                              "WHERE worker_id = %s::uuid", worker_id), what="a heartbeat to fall due")
    deleter = db.connect()
    try:
        deleter.cursor().execute("SET lock_timeout = '1s'")
        deleter.cursor().execute("DELETE FROM processes WHERE worker_id = %s::uuid", (worker_id,))
    finally:
        deleter.close()
    project.write("done", "")
    out, err = child.communicate(timeout=10)
    assert child.returncode == 0, err
    assert "stopping: its process row was deleted" in out


@pytest.mark.parametrize("raised, code, said", [
    ("SystemExit(7)", 7, "stopping: the worker function raised SystemExit(7)"),
    ("SystemExit(None)", 0, "stopping: the worker function raised SystemExit(None)"),
    ("KeyboardInterrupt()", 1, "stopping: the worker function failed"),
])
def test_worker_function_that_raises_systemexit_or_keyboardinterrupt(project, db, worker_id, raised, code, said):
    write_worker(project, "leaver", f"raise {raised}")
    result = project.run(worker_id, "start", "-f", script="workers/test/leaver.py")
    assert result.returncode == code, result.stderr
    assert said in project.log(worker_id, "test.leaver")
    assert db.process(worker_id) is None


def test_worker_that_leaves_a_thread_running_still_exits(project, db, worker_id):
    write_worker(project, "threader", """
        if not hasattr(work, "thread"):
            work.thread = threading.Thread(target=time.sleep, args=(3600,), name="forgotten")
            work.thread.start()
        logger.info("tick")
        """)
    child = project.popen(worker_id, "start", "-f", script="workers/test/threader.py")
    wait_for(lambda: "tick" in project.log(worker_id, "test.threader"), what="a tick")
    db.rows("DELETE FROM processes WHERE worker_id = %s::uuid", worker_id)
    out, err = child.communicate(timeout=10)
    assert child.returncode == 0, err
    assert "exiting without waiting for threads the worker function left running: forgotten" in out


def test_worker_that_changes_its_application_name_touches_no_other_row(project, db, worker_id):
    victim = str(uuid.uuid4())
    victim_pid = start_daemon(project, victim)
    write_worker(project, "impostor", f"""
        connection.cursor().execute("SET application_name = '{db.process(victim)[0]}'")
        """)
    result = project.run(worker_id, "start", "-f", script="workers/test/impostor.py")
    assert result.returncode == 1
    assert "stopping: the worker function changed its session's application_name" in \
        project.log(worker_id, "test.impostor")
    assert db.process(worker_id) is None
    assert db.process(victim)[2] == victim_pid and not gone(victim_pid)


@pytest.mark.parametrize("change", ["SET SESSION AUTHORIZATION", "SET ROLE"])
def test_worker_that_changes_its_session_user_is_stopped_and_its_row_removed(project, db, worker_id, change):
    role = f"other_{uuid.uuid4().hex[:8]}"
    db.rows(f"CREATE ROLE {role}")
    try:
        write_worker(project, "shapeshifter", f'connection.cursor().execute("{change} {role}")')
        project.write("workers/test/uniphant.conf", "stale_after=3\n")
        result = project.run(worker_id, "start", "-f", script="workers/test/shapeshifter.py")
        assert result.returncode == 1
        assert "ERROR" in project.log(worker_id, "test.shapeshifter")
        assert db.process(worker_id) is None
    finally:
        db.rows(f"DROP ROLE {role}")


def test_worker_that_changes_its_search_path_still_reaches_uniphant(project, db, worker_id):
    schema = f"trap_{uuid.uuid4().hex[:8]}"
    db.rows(f"CREATE SCHEMA {schema}")
    db.rows(f"CREATE FUNCTION {schema}.keepalive() RETURNS boolean LANGUAGE sql AS 'SELECT false'")
    db.rows(f"CREATE FUNCTION {schema}.disconnect() RETURNS void LANGUAGE plpgsql AS 'BEGIN END'")
    write_worker(project, "wanderer", f'connection.cursor().execute("SET search_path = {schema}, public")')
    project.write("workers/test/uniphant.conf", "stale_after=3\n")
    child = project.popen(worker_id, "start", "-f", script="workers/test/wanderer.py")
    first = wait_for(lambda: db.value("SELECT heartbeat_at FROM processes WHERE worker_id = %s::uuid",
                                      worker_id), what="the process row")
    wait_for(lambda: db.value("SELECT heartbeat_at > %s FROM processes WHERE worker_id = %s::uuid",
                              first, worker_id), what="a heartbeat through uniphant.keepalive()")
    child.terminate()
    out, err = child.communicate(timeout=10)
    assert child.returncode == 0, err
    assert db.process(worker_id) is None


@pytest.mark.faults
def test_reconnects_do_not_bring_the_next_call_forward(project, db, worker_id, password_role):
    role, password = password_role
    db.rows(f"ALTER ROLE {role} SET idle_session_timeout = '300ms'")
    project.write("workers/test/uniphant.conf", "interval=2\n")
    child = project.popen(worker_id, "start", "-f", env=dict(tcp_env(db, role), PGPASSWORD=password))
    wait_for(lambda: project.log(worker_id).count("tick") >= 3, timeout=30, what="three ticks")
    child.terminate()
    child.communicate(timeout=10)
    log = project.log(worker_id)
    assert log.count("database connection restored") >= 4  # the server ended idle sessions
    ticks = [log_time(line) for line in log.splitlines() if line.endswith(": tick")]
    assert min(b - a for a, b in zip(ticks, ticks[1:])) >= 1.9, ticks


def log_time(line: str) -> float:
    import datetime
    return datetime.datetime.strptime(line[:23], "%Y-%m-%d %H:%M:%S,%f").timestamp()


def test_example_hello_runs_as_typed(project, db, worker_id):
    copy_examples(project)
    script = "workers/examples/hello.py"
    result = project.run(worker_id, "start", script=script)
    assert result.returncode == 0, result.stderr
    wait_for(lambda: "hello from worker" in project.log(worker_id, "examples.hello"), what="hello")
    assert project.run(worker_id, "stop", script=script).returncode == 0


def test_example_jobs_drains_the_queue(project, db, worker_id):
    copy_examples(project)
    load_sql(db.connect(), project.path("workers/examples/jobs.sql"))
    db.rows("INSERT INTO jobs (payload) SELECT 'job ' || g FROM generate_series(1, 50) g")
    script = "workers/examples/jobs.py"
    result = project.run(worker_id, "start", script=script)
    assert result.returncode == 0, result.stderr
    wait_for(lambda: db.value("SELECT count(*) FROM jobs WHERE done_at IS NULL") == 0,
             what="the queue to drain")
    assert project.run(worker_id, "stop", script=script).returncode == 0


@pytest.mark.parametrize("how", ["raise SystemExit(0)", "return"])
def test_a_process_the_worker_forks_never_acts_for_the_worker(project, db, worker_id, how):
    write_worker(project, "forker", f"""
        if not os.path.exists("forked"):
            open("forked", "w").close()
            if os.fork() == 0:
                {how}
        logger.info("tick")
        """)
    pid = start_daemon(project, worker_id, script="workers/test/forker.py")
    log = lambda: project.log(worker_id, "test.forker")  # noqa: E731
    wait_for(lambda: "returned into uniphant" in log(), what="the child to be ended")
    ticks = log().count("tick")
    wait_for(lambda: log().count("tick") >= ticks + 2, what="the worker to go on")
    assert db.process(worker_id)[2] == pid and not gone(pid)


def test_a_worker_that_changes_its_configs_process_id_touches_no_other_row(project, db, worker_id):
    victim = str(uuid.uuid4())
    victim_pid = start_daemon(project, victim)
    write_worker(project, "meddler", f"""
        config["process_id"] = "{db.process(victim)[0]}"
        logger.info("meddled")
        """)
    child = project.popen(worker_id, "start", "-f", script="workers/test/meddler.py")
    wait_for(lambda: "meddled" in project.log(worker_id, "test.meddler"), what="the meddling")
    child.terminate()
    child.communicate(timeout=10)
    assert db.process(worker_id) is None
    assert db.process(victim)[2] == victim_pid and not gone(victim_pid)


# ===========================================================================
# The SQL API
#
# docs/sql-api.md, "The SQL API": schema.sql, its functions, its upgrades, and what uniphant uses of pg8000.
# ===========================================================================

def test_schema_loads_twice_and_keeps_rows(cluster):
    database = cluster.database("uniphant_schema_twice")
    host = str(uuid.uuid4())
    database.rows("SELECT register_host(%s::uuid, 'h')", host)
    load_sql(database.connect(), os.path.join(REPO, "schema.sql"))
    assert database.value("SELECT name FROM hosts WHERE id = %s::uuid", host) == "h"


def test_register_process_with_the_manuals_one_argument(db, worker_id):
    process_id = str(uuid.uuid4())
    conn = db.connect(application_name=process_id)
    try:
        cursor = conn.cursor()
        cursor.execute("SELECT register_process(%s::uuid)", (worker_id,))
        assert db.process(worker_id)[0] == uuid.UUID(process_id)
        cursor.execute("SELECT keepalive()")
        assert cursor.fetchone()[0] is True
        cursor.execute("SELECT disconnect()")
        assert db.process(worker_id) is None
        cursor.execute("SELECT keepalive()")
        assert cursor.fetchone()[0] is False
    finally:
        conn.close()


def test_refusal_hidden_behind_a_failed_goodbye_is_still_reported():
    import pg8000.dbapi
    # pg8000 writes Terminate to a server that has refused it and hung up; the
    # broken pipe then carries the server's answer only as its context.
    refusal = pg8000.dbapi.DatabaseError({"C": "3D000", "M": 'database "x" does not exist'})
    try:
        try:
            try:
                raise refusal
            except pg8000.dbapi.DatabaseError:
                raise BrokenPipeError(32, "Broken pipe")
        except OSError as e:
            raise pg8000.dbapi.InterfaceError("network error") from e
    except pg8000.dbapi.InterfaceError as e:
        error = e
    assert uniphant._connect_failure(error, 10) == ('database "x" does not exist', True)


@pytest.mark.faults
def test_register_host_stores_names_as_parameters(db):
    host = str(uuid.uuid4())
    name = "o'brien\\\"; DROP TABLE hosts; --"
    db.rows("SELECT register_host(%s::uuid, %s)", host, name)
    assert db.value("SELECT name FROM hosts WHERE id = %s::uuid", host) == name


def _catalog(database) -> dict:
    """What schema.sql makes: columns, constraints, storage parameters, function
    sources and settings, triggers, and that nothing of it is left in public."""
    return {
        "columns": database.rows(
            "SELECT table_name::text, column_name::text, data_type::text, column_default "
            "FROM information_schema.columns WHERE table_schema = 'uniphant' ORDER BY 1, 2"),
        "constraints": database.rows(
            "SELECT conrelid::regclass::text, conname::text, pg_get_constraintdef(oid), convalidated "
            "FROM pg_constraint WHERE connamespace = 'uniphant'::regnamespace ORDER BY 1, 2"),
        "options": database.rows(
            "SELECT relname::text, reloptions::text FROM pg_class "
            "WHERE relnamespace = 'uniphant'::regnamespace AND relkind = 'r' ORDER BY 1"),
        "functions": database.rows(
            "SELECT p.oid::regprocedure::text, prosrc, proconfig::text, prosecdef FROM pg_proc p "
            "WHERE pronamespace = 'uniphant'::regnamespace ORDER BY 1"),
        "triggers": database.rows("SELECT tgrelid::regclass::text, tgname::text, tgfoid::regproc::text "
                                  "FROM pg_trigger WHERE NOT tgisinternal ORDER BY 1, 2"),
        "public": database.rows("SELECT oid::regclass::text FROM pg_class WHERE relnamespace = "
                                "'public'::regnamespace UNION ALL SELECT oid::regprocedure::text FROM "
                                "pg_proc WHERE pronamespace = 'public'::regnamespace"),
    }


@pytest.mark.parametrize("release, grants", [
    ("schema-v1.sql", "register_process(uuid, uuid, text, integer, interval), keepalive()"),
    ("schema-v2.sql", "register_process(uuid, uuid, text, integer, interval, boolean, integer), keepalive(), "
                      "manager_plan(uuid)"),
])
def test_schema_upgrade_from_an_earlier_release_keeps_rows_and_grants_and_applies_every_change(
        cluster, release, grants):
    upgraded = cluster.database(f"uniphant_upgrade_{release[8:10]}", schema=False)
    load_sql(upgraded.connect(), earlier_schema(release))
    host, worker, process = (str(uuid.uuid4()) for _ in range(3))
    upgraded.rows("INSERT INTO public.hosts (id, name) VALUES (%s::uuid, 'old-host')", host)
    upgraded.rows("INSERT INTO public.processes (id, worker_id, host_id, worker_type, pid) "
                  "VALUES (%s::uuid, %s::uuid, %s::uuid, 'a.b', 42)", process, worker, host)
    role = f"upgrade_{uuid.uuid4().hex[:8]}"
    upgraded.rows(f"CREATE ROLE {role}")
    try:
        upgraded.rows(f"GRANT EXECUTE ON FUNCTION {grants} TO {role}")
        load_sql(upgraded.connect(), os.path.join(REPO, "schema.sql"))
        assert upgraded.rows("SELECT id::text, name FROM uniphant.hosts") == [(host, "old-host")]
        assert upgraded.rows("SELECT id::text, worker_id::text, pid FROM uniphant.processes") == \
            [(process, worker, 42)]
        assert upgraded.value("SELECT uniphant.schema_version()") == uniphant.SCHEMA_VERSION
        assert upgraded.value("SELECT has_function_privilege(%s, 'uniphant.keepalive()', 'EXECUTE')", role)
        assert upgraded.value("SELECT has_function_privilege(%s, 'uniphant.register_process(uuid, uuid, text, "
                              "integer, interval, boolean, integer)', 'EXECUTE')", role)
        assert upgraded.value("SELECT has_function_privilege(%s, 'uniphant.manager_plan(uuid)', 'EXECUTE')",
                              role) == ("manager_plan" in grants)
        fresh = cluster.database(f"uniphant_fresh_{release[8:10]}")
        assert _catalog(upgraded) == _catalog(fresh)
    finally:
        upgraded.rows(f"DROP OWNED BY {role}")
        upgraded.rows(f"DROP ROLE {role}")


def test_start_against_a_database_without_the_schema_says_load_schema_sql(cluster, tmp_path, worker_id):
    project = project_on(cluster.database("uniphant_no_schema", schema=False), tmp_path)
    assert_clean_error(project.run(worker_id, "start", "-f"), 1, "has no uniphant schema", "load schema.sql")


def test_start_against_the_first_schema_says_which_version_to_load(cluster, tmp_path, worker_id):
    database = cluster.database("uniphant_old_schema", schema=False)
    load_sql(database.connect(), earlier_schema("schema-v1.sql"))
    project = project_on(database, tmp_path)
    assert_clean_error(project.run(worker_id, "start", "-f"), 1, f"database {database.env['PGDATABASE']} has "
                       "uniphant schema version 1", f"needs version {uniphant.SCHEMA_VERSION}: load schema.sql")


def test_worker_whose_database_lost_the_schema_says_so(cluster, tmp_path, worker_id):
    database = cluster.database("uniphant_lost_schema")
    project = project_on(database, tmp_path)
    project.write("workers/test/uniphant.conf", "stale_after=3\n")
    child = project.popen(worker_id, "start", "-f")
    wait_for(lambda: database.process(worker_id), what="the process row")
    database.rows("DROP FUNCTION keepalive()")
    out, err = child.communicate(timeout=15)
    assert child.returncode == 1, err
    assert "stopping: the database has no uniphant schema" in out and "load schema.sql" in out
    assert "worker function failed" not in out


def test_pg8000_still_has_what_uniphant_uses(db):
    import pg8000
    config = dict(db.env, process_id=str(uuid.uuid4()), stale_after=60.0)
    connection = uniphant.connect_to_database(config)
    version = getattr(pg8000, "__version__", "?")
    uses = {
        "_usock": lambda value: isinstance(value, uniphant._Wire),
        "_transaction_status": lambda value: value == b"I",  # after the query below
        "notifications": lambda value: getattr(value, "maxlen", None) is not None,
        "parameter_statuses": lambda value: value.get("application_name") == config["process_id"],
        "password": lambda value: value is None,  # dropped once logged in
        "message_types": lambda value: callable(value.get(b"A")),
        "execute_simple": callable,
        "execute_unnamed": callable,
    }
    try:
        connection.execute_simple("")
        for name, fits in uses.items():
            assert hasattr(connection, name), f"pg8000 {version} has no connection.{name}, which uniphant uses"
            assert fits(getattr(connection, name)), \
                f"pg8000 {version}: connection.{name} is no longer what uniphant expects"
    finally:
        connection.close()


def test_register_process_refuses_a_staleness_above_a_day(db, worker_id):
    conn = db.connect(application_name=str(uuid.uuid4()))
    try:
        with pytest.raises(pg8000.dbapi.DatabaseError) as refused:
            register(conn, worker_id, str(uuid.uuid4()), "1000 years")
        assert refused.value.args[0]["C"] == "22023"
    finally:
        conn.close()


# ===========================================================================
# One copy at a time
#
# docs/sql-api.md, "One copy at a time: the guarantee and its limits": the lease, its takeover rules, the
# watchdog, and who may act on a row.
# ===========================================================================

@pytest.mark.faults
def test_notification_from_any_role_is_only_a_hint(project, db, worker_id, make_role):
    stranger, password = make_role("stranger")
    db.rows(f"REVOKE ALL ON FUNCTION keepalive(), disconnect() FROM {stranger}")
    project.write("workers/test/uniphant.conf", "log_level=DEBUG\ninterval=0.1\n")
    pid = start_daemon(project, worker_id)
    channel = "uniphant_" + str(db.process(worker_id)[0]).replace("-", "")
    conn = session_of(db, stranger, password, "nobody")
    try:
        conn.cursor().execute(f"NOTIFY {channel}, 'stop'")
        conn.cursor().execute(f"NOTIFY {channel}, 'st\u00f6p \u2603'")  # not ASCII
    finally:
        conn.close()
    wait_for(lambda: "but the row is still there: not a stop" in project.log(worker_id), what="the hint")
    ticks = project.log(worker_id).count("tick")
    wait_for(lambda: project.log(worker_id).count("tick") >= ticks + 3, what="work to go on")
    assert not gone(pid) and db.process(worker_id)[2] == pid


def test_start_never_stops_a_live_copy_whose_pid_directory_was_removed(project, db, worker_id):
    pid = start_daemon(project, worker_id)
    shutil.rmtree(project.path("pid"))
    assert_clean_error(project.run(worker_id, "start"), 1, "already running", f"PID {pid}")
    assert not gone(pid) and db.process(worker_id)[2] == pid


def test_a_symlinked_alias_cannot_start_a_second_copy(project, db, worker_id):
    pid = start_daemon(project, worker_id)
    os.symlink(project.path("workers/test/probe.py"), project.path("workers/alias.py"))
    result = project.run(worker_id, "start", "-f", script="workers/alias.py")
    assert_clean_error(result, 1, "already running", f"PID {pid}")
    assert not gone(pid) and db.process(worker_id)[2] == pid


@pytest.mark.faults
def test_worker_that_lost_its_session_in_a_long_call_exits_before_another_host_takes_over(
        project, db, worker_id, tmp_path):
    project.write("uniphant.conf", "stale_after=3\n")
    project.write("workers/test/uniphant.conf", "mode=sleep\n")
    pid = start_daemon(project, worker_id)
    wait_for(lambda: "sleeping" in project.log(worker_id), what="the worker asleep in its call")
    db.rows("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name = %s",
            str(db.process(worker_id)[0]))
    other = type(project)(str(tmp_path / "other_host"), project.home, project.env)
    other.write("uniphant.conf", "stale_after=3\n")

    def taken_over() -> bool:
        result = other.run(worker_id, "start")
        assert result.returncode == 0 or "already running" in result.stderr, result.stderr
        return result.returncode == 0

    try:
        wait_for(taken_over, timeout=20, what="another host to take the worker over")
        assert gone(pid), "two copies of the worker ran at once"
        assert "exiting: the database session was lost during a call" in project.log(worker_id)
    finally:
        other.cleanup()


# (is connected, heartbeat age in seconds) of a row whose process declared stale_after = 5 s.
ROW_STATES = {
    "live": (True, 0), "live, stale": (True, 10), "gone": (False, 0),
    "gone, stale by the caller's rule only": (False, 4), "gone, stale": (False, 10),
}


@pytest.mark.faults
@pytest.mark.parametrize("state", ROW_STATES)
@pytest.mark.parametrize("looked", [True, False], ids=["its PID found gone", "its PID not looked at"])
@pytest.mark.parametrize("same_host", [True, False], ids=["same host", "other host"])
@pytest.mark.parametrize("same_role", [True, False], ids=["same role", "other role"])
def test_a_row_is_taken_over_only_without_a_session_and_by_its_own_host_and_role_or_once_stale(
        db, make_role, same_role, same_host, looked, state):
    owner, other = make_role("owner"), make_role("other")
    host, elsewhere, worker = (str(uuid.uuid4()) for _ in range(3))
    for h in (host, elsewhere):
        db.rows("SELECT register_host(%s::uuid, %s)", h, f"host-{h[:8]}")
    first_process, second_process = str(uuid.uuid4()), str(uuid.uuid4())
    first = session_of(db, *owner, first_process)
    register(first, worker, host)
    connected, age = ROW_STATES[state]
    db.rows("UPDATE processes SET heartbeat_at = now() - make_interval(secs => %s) "
            "WHERE worker_id = %s::uuid", age, worker)
    if not connected:
        first.close()
        wait_for(lambda: no_session(db, first_process), what="the session to end")
    caller = session_of(db, *(owner if same_role else other), second_process)
    expected = not connected and ((same_host and same_role and looked) or age > 5)
    try:
        register(caller, worker, host if same_host else elsewhere, "3 seconds", 1 if looked else None)
        taken = True
    except pg8000.dbapi.DatabaseError as e:
        taken, message = False, e.args[0]["M"]
        assert "PID 1 on host host-" in message and host not in message and elsewhere not in message
        assert e.args[0]["C"] == ("UN003" if same_host and same_role else "UN001")
    finally:
        caller.close()
        if connected:
            first.close()
    assert taken == expected
    assert str(db.value("SELECT id FROM processes WHERE worker_id = %s::uuid", worker)) == \
        (second_process if expected else first_process)


@pytest.mark.faults
def test_a_borrowed_application_name_cannot_block_a_takeover(db, make_role):
    owner, stranger = make_role("owner"), make_role("stranger")
    host, elsewhere, worker, dead = (str(uuid.uuid4()) for _ in range(4))
    first = session_of(db, *owner, dead)
    register(first, worker, host)
    first.close()
    db.rows("UPDATE processes SET heartbeat_at = now() - interval '10 seconds' WHERE worker_id = %s::uuid",
            worker)
    borrower = session_of(db, *stranger, dead)
    caller = session_of(db, *owner, str(uuid.uuid4()))
    try:
        wait_for(lambda: db.value("SELECT count(*) FROM pg_stat_activity WHERE application_name = %s "
                                  "AND usename = %s", dead, owner[0]) == 0, what="the owner's session to end")
        register(caller, worker, elsewhere)
    finally:
        caller.close()
        borrower.close()
    assert db.value("SELECT id::text <> %s FROM processes WHERE worker_id = %s::uuid", dead, worker)


@pytest.mark.faults
def test_a_session_that_runs_one_worker_cannot_register_another(db):
    host = str(uuid.uuid4())
    conn = db.connect(application_name=str(uuid.uuid4()))
    try:
        conn.cursor().execute("SET statement_timeout = '5s'")  # a loop would end as a timeout
        register(conn, str(uuid.uuid4()), host)
        with pytest.raises(pg8000.dbapi.DatabaseError) as refused:
            register(conn, str(uuid.uuid4()), host)
        assert refused.value.args[0]["C"] == "UN004"
    finally:
        conn.close()
        db.rows("DELETE FROM processes WHERE host_id = %s::uuid", host)


def test_heartbeats_find_their_row_by_primary_key_whatever_the_statistics(cluster):
    database = cluster.database("uniphant_plans")
    host = str(uuid.uuid4())
    conn = database.connect(application_name=str(uuid.uuid4()))
    try:
        cursor = conn.cursor()
        register(conn, str(uuid.uuid4()), host)
        database.rows("ANALYZE processes")  # statistics of a table with one row
        for _ in range(10):  # plans made now, and kept by this session
            cursor.execute("SELECT keepalive()")
        database.rows("INSERT INTO processes (id, worker_id, host_id) SELECT gen_random_uuid(), "
                      "gen_random_uuid(), %s::uuid FROM generate_series(1, 2000)", host)
        cursor.execute("BEGIN")
        for _ in range(20):
            cursor.execute("SELECT keepalive()")
        cursor.execute("SELECT seq_scan, idx_scan FROM pg_stat_xact_user_tables WHERE relname = 'processes'")
        seq_scans, index_scans = cursor.fetchone()
        cursor.execute("SHOW synchronous_commit")
        assert cursor.fetchone()[0] == "off"  # the heartbeat's commit does not wait for the disk
        cursor.execute("COMMIT")
    finally:
        conn.close()
    assert seq_scans == 0 and index_scans >= 20


def test_keepalive_writes_at_most_once_a_second_however_often_it_is_called(db, worker_id):
    conn = db.connect(application_name=str(uuid.uuid4()))
    try:
        register(conn, worker_id, str(uuid.uuid4()))
        cursor, versions = conn.cursor(), set()
        started = time.monotonic()
        for _ in range(200):
            cursor.execute("SELECT keepalive()")
            assert cursor.fetchone()[0] is True
            versions.add(db.value("SELECT xmin::text FROM processes WHERE worker_id = %s::uuid", worker_id))
        assert len(versions) <= 2 + time.monotonic() - started  # the insert, then one write a second
        cursor.execute("SELECT disconnect()")
    finally:
        conn.close()


@pytest.mark.faults
def test_a_removed_pid_directory_and_a_dropped_session_do_not_let_a_second_copy_start(project, db, worker_id):
    project.write("workers/test/uniphant.conf", "mode=sleep\n")
    pid = start_daemon(project, worker_id)
    wait_for(lambda: "sleeping" in project.log(worker_id), what="the worker asleep in its call")
    shutil.rmtree(project.path("pid"))
    db.rows("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name = %s",
            str(db.process(worker_id)[0]))
    wait_for(lambda: no_session(db, str(db.process(worker_id)[0])), what="its session to end")
    assert_clean_error(project.run(worker_id, "start", "-f"), 1, "already running", f"PID {pid}")
    assert not gone(pid) and db.process(worker_id)[2] == pid


@pytest.mark.faults
def test_stop_leaves_the_row_of_a_killed_worker_whose_backend_still_runs_its_statement(project, db, worker_id):
    write_worker(project, "stuck", """
        logger.info("querying")
        connection.cursor().execute("SELECT pg_sleep(60)")
        """, prelude="import signal\nsignal.signal(signal.SIGTERM, signal.SIG_IGN)")
    project.write("workers/test/uniphant.conf", "stop_timeout=0.5\n")
    start_daemon(project, worker_id, script="workers/test/stuck.py")
    wait_for(lambda: "querying" in project.log(worker_id, "test.stuck"), what="the long statement")
    process_id = str(db.process(worker_id)[0])
    stop = project.run(worker_id, "stop", script="workers/test/stuck.py")
    assert stop.returncode == 0 and "still runs a statement" in stop.stderr
    assert db.process(worker_id) is not None  # its backend still works for it
    assert_clean_error(project.run(worker_id, "start", "-f", script="workers/test/stuck.py"), 1, "already running")
    db.rows("SELECT pg_cancel_backend(pid) FROM pg_stat_activity WHERE application_name = %s", process_id)
    wait_for(lambda: no_session(db, process_id), what="the killed worker's backend to end")
    start_daemon(project, worker_id, script="workers/test/stuck.py")


@pytest.mark.faults
def test_a_worker_that_closes_its_connection_and_works_on_is_ended_before_a_takeover(project, db, worker_id):
    write_worker(project, "closer", """
        connection.close()
        held = open(os.devnull)  # the connection's descriptor number now names a file
        logger.info("working on without a session")
        time.sleep(60)
        """)
    project.write("workers/test/uniphant.conf", "stale_after=3\n")
    child = project.popen(worker_id, "start", "-f", script="workers/test/closer.py")
    wait_for(lambda: "working on without a session" in project.log(worker_id, "test.closer"), what="the call")
    child.communicate(timeout=10)  # its lease of 3 s runs out long before
    assert "exiting: the database session was lost" in project.log(worker_id, "test.closer")


def test_a_full_queue_of_the_workers_own_notifications_costs_no_queries(project, db, worker_id):
    write_worker(project, "busy_listener", """
        connection.cursor().execute("LISTEN jobs")
        logger.info("listening")
        while not os.path.exists("sent"):
            time.sleep(0.01)
        calls, started = 0, time.monotonic()
        while alive(config, connection) and time.monotonic() < started + 2:
            calls += 1
        logger.info("alive() calls: %d", calls)
        raise SystemExit(0)
        """)
    project.popen(worker_id, "start", "-f", script="workers/test/busy_listener.py")
    wait_for(lambda: "listening" in project.log(worker_id, "test.busy_listener"), what="the LISTEN")
    for n in range(150):
        db.rows(f"NOTIFY jobs, '{n}'")
    project.write("sent", "")
    wait_for(lambda: "alive() calls:" in project.log(worker_id, "test.busy_listener"), what="the count")
    calls = int(project.log(worker_id, "test.busy_listener").split("alive() calls: ")[1].split()[0])
    assert calls > 100_000  # a query per call would allow some thousands


# ===========================================================================
# Failure behaviour
#
# docs/failure-behaviour.md, "Failure behaviour": crashes, outages, races and hostile input (pytest -m faults).
# ===========================================================================

@pytest.mark.faults
@pytest.mark.parametrize("case", ["refused", "unknown host", "unknown role", "password needed"])
def test_each_kind_of_connection_failure_is_one_line(project, db, worker_id, password_role, case):
    role, _ = password_role
    env, expected = {
        "refused": ({"PGHOST": "127.0.0.1", "PGPORT": str(free_port())}, "Connection refused"),
        "unknown host": ({"PGHOST": "no-such-host.invalid"}, "unknown host"),
        "unknown role": ({"PGUSER": "no_such_role"}, 'role "no_such_role" does not exist'),
        "password needed": (tcp_env(db, role), "asks for a password and none is configured"),
    }[case]
    for args in (["start"], ["start", "-f"]):
        result = project.run(worker_id, *args, env=env)
        assert_clean_error(result, 1, expected)
        assert len(result.stderr.strip().splitlines()) == 1
        if case == "password needed":
            assert "PGPASSWORD" in result.stderr and os.path.join(project.home, ".pgpass") in result.stderr


@pytest.mark.faults
@pytest.mark.skipif(os.geteuid() != 0, reason="only root can take on a user ID without a name")
def test_user_id_without_a_name_is_told_to_set_pguser():
    import pwd
    uid = next(u for u in range(54321, 60000) if not _has_passwd_entry(pwd, u))
    read_end, write_end = os.pipe()
    child = os.fork()
    if child == 0:
        try:
            os.close(read_end)
            os.setgid(uid)
            os.setuid(uid)
            os.environ.pop("PGUSER", None)
            uniphant.connect_to_database({"process_id": str(uuid.uuid4()), "stale_after": 60.0})
        except uniphant.ConfigError as e:
            os.write(write_end, str(e).encode())
        finally:
            os._exit(0)
    os.close(write_end)
    with os.fdopen(read_end) as pipe:
        message = pipe.read()
    os.waitpid(child, 0)
    assert message == f"user ID {uid} has no name in the password database " \
                      f"(a container's --user, say): set PGUSER"


@pytest.mark.faults
def test_sslmode_require_against_a_server_without_ssl_is_a_clear_error(project, db, worker_id):
    result = project.run(worker_id, "start", env={
        "PGHOST": "127.0.0.1", "PGPORT": db.env["PGPORT"], "PGSSLMODE": "require"})
    assert_clean_error(result, 1, "does not support SSL (PGSSLMODE=require)")


@pytest.mark.faults
def test_a_stop_signal_ends_a_start_that_waits_for_a_silent_server(project, worker_id):
    import socket
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(5)
        child = project.popen(worker_id, "start", "-f", env={
            "PGHOST": "127.0.0.1", "PGPORT": str(silent.getsockname()[1]), "PGCONNECT_TIMEOUT": "0"})
        wait_for(lambda: tcp_sockets(child.pid), what="the connection attempt")
        child.terminate()
        _, err = child.communicate(timeout=10)
    assert child.returncode == 1 and "SIGTERM received while connecting" in err


@pytest.mark.faults
def test_a_fifo_planted_at_the_pid_file_is_refused_not_waited_on(project, worker_id):
    os.makedirs(project.path("pid/test.probe"))
    os.mkfifo(project.path(f"pid/test.probe/{worker_id}.pid"))
    for command in ("status", "stop", "start"):
        assert_clean_error(project.run(worker_id, command, timeout=10), 1, "not a regular file")


@pytest.mark.faults
def test_workers_survive_a_database_restart(private_server, tmp_path):
    project = server_project(tmp_path, "restart", private_server, "interval=0.1\n")
    admin = private_server.connect("uniphant")
    try:
        ids = [str(uuid.uuid4()) for _ in range(5)]
        pids = [start_daemon(project, w) for w in ids]
        rows_before = sorted(sql_rows(admin, "SELECT id::text, worker_id::text, pid FROM processes"))
        admin.close()
        private_server.stop("fast")
        private_server.start()
        admin = private_server.connect("uniphant")
        for w in ids:
            wait_for(lambda: "tick" in project.log(w).partition("database connection restored")[2],
                     what=f"{w} to reconnect and work")
        assert sorted(sql_rows(admin, "SELECT id::text, worker_id::text, pid FROM processes")) == rows_before
        for w, pid in zip(ids, pids):
            log = project.log(w)
            assert log.count("lost the database connection") == 1, log
            assert log.count("database connection restored") == 1, log
            assert log.rsplit("database connection restored", 1)[1].count("tick") >= 1, log
            assert not gone(pid)
    finally:
        admin.close()
        project.cleanup()


@pytest.mark.faults
def test_workers_wait_out_a_30_second_outage_without_spinning(private_server, tmp_path):
    project = server_project(tmp_path, "outage", private_server, "interval=0.1\n")
    try:
        kept, deleted, stopped = (str(uuid.uuid4()) for _ in range(3))
        kept_pid, deleted_pid = start_daemon(project, kept), start_daemon(project, deleted)
        stopped_pid = start_daemon(project, stopped)
        cpu_before = cpu_seconds(kept_pid)
        private_server.stop("fast")
        log_size = len(project.log(kept))
        time.sleep(10)  # the outage itself: the span being tested, not a wait for a condition
        status = project.run(kept, "status")
        assert status.returncode == 0 and str(kept_pid) in status.stdout
        assert project.run(stopped, "stop").returncode == 0
        assert gone(stopped_pid)
        # Back for an operator only (on another port), who deletes one worker's row.
        private_server.start(port=private_server.port + 1 if private_server.port < 65535 else 1024)
        operator = pg8000_connect(private_server, private_server.port + 1)
        operator.cursor().execute("DELETE FROM uniphant.processes WHERE worker_id = %s::uuid", (deleted,))
        operator.close()
        private_server.stop("fast")
        time.sleep(20)  # more of the outage
        assert cpu_seconds(kept_pid) - cpu_before < 1.0
        outage_log = project.log(kept)[log_size:]
        assert len(outage_log) < 1000, outage_log  # the loss, said once
        private_server.start()
        wait_for(lambda: "database connection restored" in project.log(kept), what="the reconnect")
        wait_for(lambda: gone(deleted_pid), what="the worker whose row was deleted to exit")
        assert "stopping: its process row was deleted" in project.log(deleted)
        assert not gone(kept_pid)
    finally:
        project.cleanup()


@pytest.mark.faults
def test_a_server_out_of_connections_is_one_line_that_says_what_to_do(tmp_path):
    with throwaway_server() as server:
        server.init(settings="max_connections = 4\nsuperuser_reserved_connections = 0\n").start()
        server.create_database("uniphant")
        project = server_project(tmp_path, "crowded", server)
        held = []
        try:
            with pytest.raises(Exception):
                while len(held) < 10:
                    held.append(server.connect("uniphant"))
            result = project.run(str(uuid.uuid4()), "start", "-f")
            assert_clean_error(result, 1, "too many clients", "raise it, or put PgBouncer in transaction mode")
        finally:
            for conn in held:
                conn.close()
            project.cleanup()


def test_a_worker_connected_as_a_superuser_says_so_once(project, db, worker_id, password_role):
    role, password = password_role
    start_daemon(project, worker_id)  # the test server's superuser
    wait_for(lambda: "tick" in project.log(worker_id), what="a tick")
    assert project.log(worker_id).count("connected as a superuser") == 1
    other = str(uuid.uuid4())
    start_daemon(project, other, env=dict(tcp_env(db, role), PGPASSWORD=password))
    wait_for(lambda: "tick" in project.log(other), what="a tick")
    assert "connected as a superuser" not in project.log(other)


def pg8000_connect(server, port):
    import pg8000.dbapi
    conn = pg8000.dbapi.connect(user="postgres", database="uniphant",
                                unix_sock=f"{server.dir}/.s.PGSQL.{port}")
    conn.autocommit = True
    return conn


@pytest.mark.faults
def test_start_gives_up_on_a_silent_server_within_the_connect_timeout(project, worker_id):
    import socket
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(5)  # accepts connections into the backlog, never answers
        port = silent.getsockname()[1]
        started = time.monotonic()
        result = project.run(worker_id, "start", env={
            "PGHOST": "127.0.0.1", "PGPORT": str(port), "PGCONNECT_TIMEOUT": "2"})
        elapsed = time.monotonic() - started
    assert_clean_error(result, 1, f"127.0.0.1:{port}", "timed out after 2 s")
    assert elapsed < 5
    assert project.run(worker_id, "status").returncode == 3


@pytest.mark.faults
def test_wrong_password_is_a_clear_error_that_never_shows_the_password(project, db, worker_id, password_role):
    role, password = password_role
    project.write("workers/uniphant.conf", "log_level=DEBUG\n")
    secrets = os.path.join(project.home, ".uniphant", "secrets")
    wrong = password + "-wrong"
    project.write("secrets.conf", f"PGPASSWORD={wrong}\n", mode=0o600, base=secrets)
    for args in (["start"], ["start", "-f"]):
        result = project.run(worker_id, *args, env=tcp_env(db, role))
        assert_clean_error(result, 1, f'password authentication failed for user "{role}"')
        assert wrong not in result.stdout + result.stderr + project.log(worker_id)


@pytest.mark.faults
def test_missing_database_is_a_clear_error(project, worker_id):
    result = project.run(worker_id, "start", env={"PGDATABASE": "no_such_db"})
    assert_clean_error(result, 1, 'database "no_such_db" does not exist')


@pytest.mark.faults
def test_password_is_found_in_pgpass(project, db, worker_id, password_role):
    role, password = password_role
    project.write(".pgpass", f"127.0.0.1:{db.env['PGPORT']}:*:{role}:{password}\n", mode=0o600,
                  base=project.home)
    pid = start_daemon(project, worker_id, env=tcp_env(db, role))
    assert db.process(worker_id)[2] == pid


@pytest.mark.faults
def test_least_privilege_role_runs_a_worker(project, db, worker_id, password_role):
    role, password = password_role
    env = dict(tcp_env(db, role), PGPASSWORD=password)
    project.write("workers/test/uniphant.conf", "mode=query\n")
    pid = start_daemon(project, worker_id, env=env)
    assert db.value("SELECT role FROM processes WHERE worker_id = %s::uuid", worker_id) == role
    wait_for(lambda: "tick" in project.log(worker_id), what="a tick")
    assert project.run(worker_id, "stop", env=env).returncode == 0
    assert gone(pid) and db.process(worker_id) is None


@pytest.mark.faults
def test_another_role_cannot_heartbeat_or_remove_a_process_row(project, db, worker_id, password_role):
    role, password = password_role
    pid = start_daemon(project, worker_id)  # registered by the superuser's session
    process_id = str(db.process(worker_id)[0])
    impostor = db.connect(user=role, password=password, host="127.0.0.1",
                          port=int(db.env["PGPORT"]), unix_sock=None, application_name=process_id)
    try:
        cursor = impostor.cursor()
        cursor.execute("SELECT keepalive()")
        assert cursor.fetchone()[0] is False
        cursor.execute("SELECT disconnect()")
    finally:
        impostor.close()
    assert db.process(worker_id)[2] == pid


@pytest.mark.faults
def test_fresh_row_of_another_host_is_refused_then_taken_over_once_stale(project, db, worker_id, tmp_path):
    project.write("uniphant.conf", "stale_after=3\n")
    pid = start_daemon(project, worker_id)
    os.kill(pid, signal.SIGKILL)
    wait_for(lambda: gone(pid), what="the killed daemon")
    other = type(project)(str(tmp_path / "other_host"), project.home, project.env)
    other.write("uniphant.conf", "stale_after=3\n")
    try:
        refused = other.run(worker_id, "start")
        assert_clean_error(refused, 1, f"PID {pid}", os.uname().nodename)
        wait_for(lambda: other.run(worker_id, "start").returncode == 0, what="the take-over")
        assert db.process(worker_id)[2] == other.running_pid(worker_id)
    finally:
        other.cleanup()


@pytest.mark.faults
def test_slow_worker_with_a_live_session_is_not_taken_over(project, db, worker_id, tmp_path):
    project.write("uniphant.conf", "stale_after=3\n")
    project.write("workers/test/uniphant.conf", "mode=sleep\n")
    pid = start_daemon(project, worker_id)
    wait_for(lambda: db.value("SELECT heartbeat_at < now() - interval '3.5 seconds' FROM processes "
                              "WHERE worker_id = %s::uuid", worker_id), what="a stale heartbeat")
    other = type(project)(str(tmp_path / "other_host"), project.home, project.env)
    other.write("uniphant.conf", "stale_after=3\n")
    try:
        assert_clean_error(other.run(worker_id, "start"), 1, "already running", f"PID {pid}")
        assert db.process(worker_id)[2] == pid and not gone(pid)
    finally:
        other.cleanup()


@pytest.mark.faults
def test_stop_kills_a_worker_that_ignores_sigterm_and_removes_its_row(project, db, worker_id):
    project.write("workers/test/uniphant.conf", "mode=sleep\nstop_timeout=0.5\n")
    pid = start_daemon(project, worker_id)
    result = project.run(worker_id, "stop")
    assert result.returncode == 0
    assert "sent SIGKILL" in result.stderr
    assert gone(pid)
    assert db.process(worker_id) is None


@pytest.mark.faults
@pytest.mark.parametrize("content", ["", "garbage\n", "1\n", "{self}\n", "99999999\n"])
def test_pid_file_without_a_lock_is_never_signalled(project, worker_id, content):
    pid_file = project.write(f"pid/test.probe/{worker_id}.pid", content.format(self=os.getpid()))
    assert project.run(worker_id, "status").returncode == 3
    assert project.run(worker_id, "stop").returncode == 1
    pid = start_daemon(project, worker_id)
    assert project.running_pid(worker_id) == pid
    assert open(pid_file).read().split()[0] == str(pid)


@pytest.mark.faults
def test_child_forked_by_the_worker_does_not_hold_the_lock(project, worker_id):
    project.write("workers/test/uniphant.conf", "mode=fork\n")
    pid = start_daemon(project, worker_id)
    child_pid = int(wait_for(lambda: os.path.exists(project.path("workers/test/child.pid"))
                             and open(project.path("workers/test/child.pid")).read(), what="the child"))
    try:
        os.kill(pid, signal.SIGKILL)
        wait_for(lambda: gone(pid), what="the worker")
        assert not gone(child_pid)
        assert project.run(worker_id, "status").returncode == 3
    finally:
        os.kill(child_pid, signal.SIGKILL)


def _symlinked_log_file(project, worker_id):
    os.makedirs(project.path("log/test.probe"))
    os.symlink(project.path("elsewhere.log"), project.path(f"log/test.probe/{worker_id}.log"))


@pytest.mark.faults
@pytest.mark.parametrize("make, message", [
    (lambda p, w: p.write("log", "a file where the log directory goes\n"), "must be a directory"),
    (lambda p, w: os.symlink(p.home, p.path("pid")), "must be a directory, not a symlink"),
    (_symlinked_log_file, "it is a symlink"),
], ids=["log-is-a-file", "pid-is-a-symlink", "log-file-is-a-symlink"])
def test_unusable_log_or_pid_path_fails_before_starting(project, db, worker_id, make, message):
    make(project, worker_id)
    for args in (["start"], ["start", "-f"]):
        result = project.run(worker_id, *args)
        assert_clean_error(result, 1, message)
        assert db.process(worker_id) is None
    assert project.running_pid(worker_id) is None
    assert not os.path.exists(project.path("elsewhere.log"))


@pytest.mark.faults
def test_twenty_concurrent_starts_run_exactly_one(project, db, worker_id):
    children = [project.popen(worker_id, "start") for _ in range(20)]
    results = [(c.wait(timeout=60), c.communicate()) for c in children]
    codes = sorted(code for code, _ in results)
    assert codes == [0] + [1] * 19, results
    assert all("already running" in err for code, (out, err) in results if code == 1)
    pid = project.running_pid(worker_id)
    assert db.rows("SELECT pid FROM processes WHERE worker_id = %s::uuid", worker_id) == [(pid,)]


@pytest.mark.faults
def test_same_worker_from_two_hosts_at_once_runs_once(project, db, worker_id, tmp_path):
    other = type(project)(str(tmp_path / "other_host"), project.home, project.env)
    try:
        children = [p.popen(worker_id, "start") for p in (project, other)]
        results = [(c.wait(timeout=60), c.communicate()[1]) for c in children]
        assert sorted(code for code, _ in results) == [0, 1], results
        assert any("already running" in err for code, err in results if code == 1)
        wait_for(lambda: [p.running_pid(worker_id) for p in (project, other)].count(None) == 1,
                 what="the refused daemon to exit")
        pid = next(p for p in (project.running_pid(worker_id), other.running_pid(worker_id)) if p)
        assert db.rows("SELECT pid FROM processes WHERE worker_id = %s::uuid", worker_id) == [(pid,)]
    finally:
        other.cleanup()


def consistent(project, db, worker_id) -> bool:
    """Either one process holds the lock and owns the row, or neither exists."""
    pid = project.running_pid(worker_id)
    rows = db.rows("SELECT pid FROM processes WHERE worker_id = %s::uuid", worker_id)
    strays = subprocess.run(["pgrep", "-f", worker_id], capture_output=True, text=True).stdout.split()
    return rows == ([(pid,)] if pid else []) and {int(p) for p in strays} <= ({pid} if pid else set())


@pytest.mark.faults
def test_stop_racing_start_leaves_no_orphans(project, db, worker_id):
    for _ in range(3):
        children = [project.popen(worker_id, "start"), project.popen(worker_id, "stop")]
        for child in children:
            child.communicate(timeout=60)
        wait_for(lambda: consistent(project, db, worker_id), what="one process with its row, or none")
    project.run(worker_id, "stop")
    assert project.running_pid(worker_id) is None
    wait_for(lambda: consistent(project, db, worker_id), what="no process and no row")


@pytest.mark.faults
def test_two_restarts_in_parallel_leave_one_process(project, db, worker_id):
    start_daemon(project, worker_id)
    children = [project.popen(worker_id, "restart") for _ in range(2)]
    codes = sorted(child.wait(timeout=60) for child in children)
    assert codes[0] == 0
    assert project.running_pid(worker_id) is not None
    wait_for(lambda: consistent(project, db, worker_id), what="one process with its row")


@pytest.mark.faults
@pytest.mark.parametrize("content, error", [
    (b"key=\x00value\n", "contains a NUL byte"),
    (b"ok=1\nkey=\xff\xfe\n", "not valid UTF-8"),
    (bytes(range(256)) * 4, "contains a NUL byte"),
    (b"ok=1\n" + b"x" * 10_000_000 + b"\n", "expected key=value"),
    (b"\xef\xbb\xbfmode=tick\r\nlog_level=INFO\r\n", None),
    (b"big=" + b"v" * 10_000_000 + b"\n", None),
], ids=["nul", "bad-utf8", "binary", "10MB-line", "bom-crlf", "10MB-value"])
def test_hostile_config_parses_or_fails_with_file_and_line(project, worker_id, content, error):
    with open(project.path("workers/test/uniphant.conf"), "wb") as f:
        f.write(content)
    if error is None:
        assert show_config(project, "worker_type") == ["test.show"]
    else:
        result = project.run(worker_id, "start", "-f")
        assert_clean_error(result, 2, project.path("workers/test/uniphant.conf") + ":", error)
        assert len(result.stderr) < 500


@pytest.mark.faults
def test_secret_values_never_reach_the_log(project, db, worker_id):
    secrets = os.path.join(project.home, ".uniphant", "secrets")
    project.write("workers/test/secrets.conf", "api_key=TOPSECRET-42\n", mode=0o600, base=secrets)
    project.write("workers/test/uniphant.conf", "log_level=DEBUG\ninterval=0.05\n")
    start_daemon(project, worker_id)
    wait_for(lambda: project.log(worker_id).count("tick") >= 3, what="some ticks")
    db.rows("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name = %s",
            str(db.process(worker_id)[0]))
    wait_for(lambda: "restored" in project.log(worker_id), what="a reconnect")
    project.run(worker_id, "stop")
    assert "TOPSECRET-42" not in project.log(worker_id)


@pytest.mark.faults
def test_reconnect_says_why_each_attempt_failed(private_server, tmp_path):
    project = server_project(tmp_path, "why", private_server, "log_level=DEBUG\n")
    worker = str(uuid.uuid4())
    try:
        start_daemon(project, worker)
        private_server.stop("fast")
        said = lambda level: [line.split("reconnecting: ", 1)[1] for line in project.log(worker).splitlines()  # noqa: E731
                              if f" {level} " in line and "reconnecting: " in line]
        wait_for(lambda: said("WARNING"), what="the first failure, at WARNING")
        wait_for(lambda: set(said("DEBUG")) & set(said("WARNING")), what="a repeated failure, at DEBUG")
        private_server.start()
        wait_for(lambda: "database connection restored" in project.log(worker), what="the reconnect")
        assert len(said("WARNING")) == len(set(said("WARNING")))
        assert all("could not connect to PostgreSQL" in reason for reason in said("WARNING"))
    finally:
        project.cleanup()


def _has_passwd_entry(pwd, uid: int) -> bool:
    try:
        pwd.getpwuid(uid)
    except KeyError:
        return False
    return True


def tcp_sockets(pid: int) -> list:
    """The TCP sockets of process pid, from /proc."""
    inodes = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except FileNotFoundError:
            continue  # closed meanwhile
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    with open(f"/proc/{pid}/net/tcp") as f:
        return [line for line in f.read().splitlines()[1:] if line.split()[9] in inodes]


# ===========================================================================
# Restricted environments
#
# docs/configuration.md, "Restricted environments": a read-only tree, logs on stdout only.
# ===========================================================================

def tree(root: str) -> set:
    return {os.path.relpath(os.path.join(d, name), root) for d, dirs, files in os.walk(root)
            for name in dirs + files}


def test_a_read_only_tree_runs_with_its_state_in_the_state_directory(project, db, worker_id, tmp_path):
    shutil.copy(os.path.join(REPO, "uniphant.py"), project.path("workers/uniphant.py"))  # vendored
    state = tmp_path / "state"
    env = {"UNIPHANT_STATE_DIR": str(state), "PYTHONDONTWRITEBYTECODE": "1",
           "PYTHONPATH": project.path("workers")}
    before = tree(project.root)
    pid = start_daemon(project, worker_id, env=env)
    assert project.run(worker_id, "status", env=env).stdout.strip().endswith(f"running with PID {pid}.")
    wait_for(lambda: "tick" in (state / "log" / "test.probe" / f"{worker_id}.log").read_text(), what="a tick")
    assert project.run(worker_id, "stop", env=env).returncode == 0
    assert tree(project.root) == before
    assert {".host_id", ".lock", "pid", "log"} <= set(os.listdir(state))
    assert db.process(worker_id) is None


def test_log_file_off_logs_to_stdout_only(project, db, worker_id):
    project.write("workers/test/uniphant.conf", "log_file=off\n")
    assert_clean_error(project.run(worker_id, "start"), 2, "log_file=off", "start -f")
    child = project.popen(worker_id, "start", "-f")
    seen = read_until(child.stdout, "tick")
    child.terminate()
    out, err = child.communicate(timeout=10)
    assert child.returncode == 0, err
    assert "stopping: SIGTERM received" in seen + out
    assert not os.path.exists(project.path("log"))


# ===========================================================================
# Pure logic, in-process and without a server (-m unit): each test is one rule
# that the slower tests rely on.
# ===========================================================================

# ---------------------------------------------------------------------------
# Configuration
# ---------------------------------------------------------------------------

@pytest.mark.unit
def test_every_runtime_key_has_its_default_and_a_check_that_takes_the_default():
    for key, (default, check) in uniphant._RUNTIME_KEYS.items():
        text = default if isinstance(default, str) else f"{default:g}"
        assert check(text) == default, key
    assert uniphant.RUNTIME_DEFAULTS == {key: default for key, (default, _) in uniphant._RUNTIME_KEYS.items()}


@pytest.mark.unit
@pytest.mark.parametrize("key, text, value", [
    ("interval", "0.5", 0.5), ("interval", ".5", 0.5), ("stale_after", "3", 3.0),
    ("log_level", "debug", "DEBUG"), ("pooler", "Transaction", "transaction"), ("PGPORT", "5432,5433", "5432,5433"),
])
def test_a_good_value_is_stored_as_uniphant_uses_it(key, text, value):
    assert uniphant._checked(key, text, "f:1") == value


@pytest.mark.unit
@pytest.mark.parametrize("key, text", [
    ("interval", "nan"), ("interval", "1e3"), ("interval", "-1"), ("interval", "86401"), ("interval", "\u0661"),
    ("stale_after", "2.9"), ("stop_timeout", "0.0"), ("log_level", "LOUD"), ("PGPORT", "0"), ("PGSSLMODE", "maybe"),
])
def test_a_bad_value_is_a_config_error_naming_where_and_the_key_never_the_value(key, text):
    with pytest.raises(uniphant.ConfigError) as error:
        uniphant._checked(key, text, "f:7")
    assert str(error.value).startswith(f"f:7: bad value for {key}:") and text not in str(error.value)


@pytest.mark.unit
def test_a_key_uniphant_does_not_read_is_kept_as_text():
    assert uniphant._checked("queue", " x ", "f:1") == " x "


# ---------------------------------------------------------------------------
# Worker types and what operators read
# ---------------------------------------------------------------------------

@pytest.mark.unit
@pytest.mark.parametrize("text, printed", [
    ("plain text", "plain text"), ("\x1b[2J", "\\x1b[2J"), ("a\nb", "a\\x0ab"), ("\u202e", "\\u202e"),
    ("\U000e0001", "\\U000e0001"), ("é ✓", "é ✓"),
])
def test_printable_shows_every_character_that_is_not_printable_as_an_escape(text, printed):
    assert uniphant.printable(text) == printed


@pytest.mark.unit
def test_the_worker_types_of_a_root_are_its_scripts_of_valid_types(tmp_path):
    for path in ("a/b.py", "a/c.py", "x.y.py", "a/.hidden.py", "a/__pycache__/z.py", "bad name.py", "notes.txt",
                 "/".join(["d"] * 11) + ".py"):
        (tmp_path / "workers" / path).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / "workers" / path).write_text("")
    assert uniphant.worker_types_under(str(tmp_path)) == ["a.b", "a.c", "x.y"]


# ---------------------------------------------------------------------------
# The report pipe
# ---------------------------------------------------------------------------

@pytest.mark.unit
@pytest.mark.parametrize("word, fields", [
    ("ready", [4242, 10.0]), ("error", ["no script a/b.py"]),
    ("exit", ["row-deleted", "its process row was deleted"]), ("exit", ["failed", "RuntimeError: a\nb  c"]),
])
def test_a_report_reads_back_as_it_was_written(word, fields):
    line = uniphant._report_line(word, *fields)
    assert line.endswith(b"\n") and line.count(b"\n") == 1
    assert uniphant.parse_report(line[:-1]) == (word, [str(f) if i < len(fields) - 1 else " ".join(str(f).split())
                                                        for i, f in enumerate(fields)])


@pytest.mark.unit
def test_a_short_report_gives_empty_fields():
    assert uniphant.parse_report(b"exit") == ("exit", ["", ""])


# ---------------------------------------------------------------------------
# The public API
# ---------------------------------------------------------------------------

@pytest.mark.unit
def test_the_public_api_is_stated_and_its_exceptions_carry_what_a_caller_needs():
    assert re.fullmatch(r"\d+\.\d+\.\d+", uniphant.__version__)
    assert all(hasattr(uniphant, name) for name in uniphant.__all__)
    refusal = uniphant.AlreadyRunning.refused({"C": "UN001", "D": "42", "M": "worker w is already running: "
                                                                        "PID 42 on host web-\x1b1"})
    assert (refusal.sqlstate, refusal.pid, refusal.host) == ("UN001", 42, "web-\x1b1")
    assert "\x1b" not in str(refusal) and isinstance(refusal, uniphant.UniphantError)
    assert issubclass(uniphant.ConfigError, ValueError) and uniphant.ConfigError.exit_code == 2
