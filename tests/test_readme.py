"""README.md and docs/*.md as written: every code block in them is run here as
typed (shell commands against the test server, SQL, the worker examples), or by
the test or the CI stage this file names for it.  A block no rule covers fails,
and so does a relative link to a file or a heading that is not there."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import uuid
from typing import Callable, Dict, List, Set, Tuple

import pytest

from conftest import host_of, with_manager
from test_install import doc_blocks
from test_uniphant import REPO, Project, wait_for, worker_env

pytestmark = pytest.mark.own_database  # managers of the README's fleet act on every worker they see


DOCS = ["README.md"] + sorted(os.path.join("docs", name) for name in os.listdir(os.path.join(REPO, "docs"))
                              if name.endswith(".md"))


def readme_blocks() -> List[Tuple[str, str, str, str]]:
    """(document, section, language, text) of each fenced code block of README.md and
    docs/*.md: its section is the nearest heading above it."""
    return [(doc, headings[-1], language, text) for doc in DOCS for headings, language, text in doc_blocks(doc)]


def sh(text: str, cwd: str, env: Dict[str, str], timeout: float = 120) -> subprocess.CompletedProcess:
    """A shell block, run by bash as typed, where `python` is this virtual
    environment's (as once activated): each command must succeed."""
    env = dict(env, PATH=os.path.dirname(sys.executable) + os.pathsep + os.environ["PATH"])
    return subprocess.run(["bash", "-e", "-c", text], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=timeout)


def examples_project(tmp_path, db) -> Project:
    """A project with the examples and the manager, as the README's fleet has it."""
    project = Project(str(tmp_path / "project"), str(tmp_path), worker_env(db.env, str(tmp_path)))
    shutil.copytree(os.path.join(REPO, "workers", "examples"), project.path("workers/examples"))
    return project


# ---------------------------------------------------------------------------
# The rules: what runs each block
# ---------------------------------------------------------------------------

def covered_elsewhere(block: str, tmp_path, db) -> None:
    """The test runner's own commands: `.ci/run` runs them, with the variables the
    README gives (or the test named in it runs them)."""
    with open(os.path.join(REPO, ".ci", "run"), encoding="utf-8") as f:
        ci = f.read()
    for command in block.splitlines():
        command = command.split("#")[0].strip()
        if command.endswith("./dev/demo"):
            with open(os.path.join(REPO, "tests", "test_try_it.py"), encoding="utf-8") as f:
                assert "def test_the_demo_runs_the_example_worker" in f.read()
        elif command:
            words = command.split()
            assert words[-1] in ci, f"{command!r}: .ci/run does not run it"
            for word in words[:-1]:
                assert word.split("=")[0] + "=" in ci, f"{command!r}: .ci/run does not set {word}"


def try_it_in_a_clone(block: str, tmp_path, db) -> None:
    """psql, the virtual environment and the hello example, in a copy of the tree
    whose .venv is this interpreter's."""
    if not shutil.which("psql"):
        pytest.skip("no psql here (Debian: apt-get install postgresql-client)")
    tree = tmp_path / "tree"
    shutil.copytree(REPO, tree, ignore=shutil.ignore_patterns(".venv*", ".git", "log", "pid", "__pycache__",
                                                              ".host_id", ".lock", "bench"))
    os.symlink(sys.prefix, tree / ".venv")
    env = dict(worker_env(db.env, str(tmp_path)), PATH=os.environ["PATH"])
    done = sh(block, str(tree), env)
    assert done.returncode == 0, done.stderr
    assert "started with PID" in done.stdout and "is running with PID" in done.stdout and "stopped." in done.stdout


def runtime_tests_on_their_own(block: str, tmp_path, db) -> None:
    """test_uniphant.py beside uniphant.py and schema.sql, and nothing else, as typed against
    the test server (a few of its tests: database, project and pure ones)."""
    vendored = tmp_path / "vendored"
    vendored.mkdir()
    for name in ("uniphant.py", "schema.sql", "test_uniphant.py"):
        shutil.copy(os.path.join(REPO, name), vendored / name)
    server = {key: db.env.get(key, "") for key in ("PGHOST", "PGPORT", "PGUSER")}
    typed = re.sub(r"\bUNIPHANT_TEST_(PG\w+)=\S*", lambda m: f"UNIPHANT_TEST_{m.group(1)}={server[m.group(1)]}",
                   block)
    env = {k: v for k, v in os.environ.items() if k not in {f"UNIPHANT_TEST_{key}" for key in server}}
    done = sh(typed.strip() + " -p no:cacheprovider -k 'schema_loads_twice or manuals_one_argument or "
              "stop_ends_the_daemon_and_removes_its_row or a_good_value_is_stored'", str(vendored), env)
    assert done.returncode == 0, done.stdout + done.stderr
    assert re.search(r"\b9 passed", done.stdout) and "skipped" not in done.stdout, done.stdout


def layout(block: str, tmp_path, db) -> None:
    """The vendored project's layout: test_install.py builds exactly these files."""
    with open(os.path.join(REPO, "tests", "test_install.py"), encoding="utf-8") as f:
        install = f.read()
    assert "readme_roles" in install and 'readme_blocks("A first fleet", "sh")' in install
    for name in re.findall(r"[\w/.-]+\.(?:py|conf)\b", block):
        assert os.path.basename(name) in install, f"test_install.py does not build {name}"


def gitignore(block: str, tmp_path, db) -> None:
    with open(os.path.join(REPO, ".gitignore"), encoding="utf-8") as f:
        ours = f.read().splitlines()
    assert set(block.split()) <= set(ours)
    assert {"/.host_id", "/.lock", "/.server_generation"} <= set(block.split())  # every file a host writes


def first_worker(block: str, tmp_path, db) -> None:
    """The first worker: it runs, and calls the database once per interval (no busy loop)."""
    project = examples_project(tmp_path, db)
    project.write("workers/readme/first.py", block)
    project.write("workers/readme/uniphant.conf", "interval=0.2\n")
    worker = str(uuid.uuid4())
    child = project.popen(worker, "start", "-f", script="workers/readme/first.py")
    try:
        wait_for(lambda: project.log(worker, "readme.first").count("sessions") >= 5, what="five calls")
        process = db.value("SELECT id::text FROM processes WHERE worker_id = %s::uuid", worker)
        before = db.value("SELECT xact_commit FROM pg_stat_database WHERE datname = current_database()")
        calls = project.log(worker, "readme.first").count("sessions")
        wait_for(lambda: project.log(worker, "readme.first").count("sessions") >= calls + 5, what="five more")
        assert process and db.value("SELECT xact_commit FROM pg_stat_database WHERE datname = current_database()") \
            - before < 30  # five calls, a query each, and this test's own: nothing that spins
    finally:
        child.terminate()
        child.communicate(timeout=10)


def loop_worker(block: str, tmp_path, db) -> None:
    """The looping worker, with the imports and main() of the first, drains its table."""
    db.rows("CREATE TABLE IF NOT EXISTS outbox (id serial PRIMARY KEY)")
    db.rows("INSERT INTO outbox SELECT FROM generate_series(1, 5)")
    project = examples_project(tmp_path, db)
    project.write("workers/readme/loop.py", "from uniphant import alive, main\n\n" + block +
                  "\n\nif __name__ == '__main__':\n    main(work)\n")
    worker = str(uuid.uuid4())
    child = project.popen(worker, "start", "-f", script="workers/readme/loop.py")
    try:
        wait_for(lambda: db.value("SELECT count(*) FROM outbox") == 0, what="the outbox drained")
    finally:
        child.terminate()
        child.communicate(timeout=10)


def sketch(block: str, tmp_path, db) -> None:
    """A sketch of code (with `...` for what is the reader's): it compiles."""
    compile(block, "README.md", "exec")


def sql(block: str, tmp_path, db) -> None:
    """SQL, with each <placeholder> filled in with a real value of its kind."""
    project = examples_project(tmp_path, db)
    with_manager(project)
    worker = str(db.value("SELECT add_worker('examples.hello')"))
    text = block.replace("<host id>", host_of(project)).replace("<worker id>", worker)
    conn = db.connect()
    try:
        conn.execute_simple(text)
    finally:
        conn.close()


def manager_and_ops(block: str, tmp_path, db) -> None:
    """The fleet's shell commands, in a project of the examples with the manager."""
    project = examples_project(tmp_path, db)
    os.makedirs(project.path("workers/uniphant"))
    shutil.copy(os.path.join(REPO, "workers", "uniphant", "manager.py"), project.path("workers/uniphant"))
    shutil.copy(os.path.join(REPO, "uniphant.py"), project.root)
    shutil.copy(os.path.join(REPO, "uniphant_fleet.py"), project.root)
    if "manager.py start" not in block:
        with_manager(project)
        db.value("SELECT scale('examples.hello', 2, %s::uuid)", host_of(project))
        wait_for(lambda: db.value("SELECT count(*) FROM fleet WHERE state = 'running'") == 2, what="two workers")
    watch = [line for line in block.splitlines() if "--watch" in line]
    done = sh("\n".join(line for line in block.splitlines() if line not in watch), project.root, project.env)
    assert done.returncode == 0, done.stderr
    for line in watch:  # runs until Ctrl-C: it draws, then ends on SIGINT
        child = subprocess.Popen(["bash", "-c", "exec " + line.split("#")[0]], cwd=project.root,
                                 env=dict(project.env, PATH=os.path.dirname(sys.executable) + os.pathsep +
                                          os.environ["PATH"]), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        assert child.stdout.readline()
        child.send_signal(signal.SIGINT)
        child.communicate(timeout=10)
        assert child.returncode == 130
    project.cleanup()


def rolling_deploy(block: str, tmp_path, db) -> None:
    project = examples_project(tmp_path, db)
    project.write("workers/app/echo.py", "from uniphant import main\n\ndef work(config, logger, connection):\n"
                                         "    pass\n\nif __name__ == '__main__':\n    main(work)\n")
    with_manager(project)
    db.value("SELECT scale('app.echo', 3, %s::uuid)", host_of(project))
    wait_for(lambda: db.value("SELECT count(*) FROM fleet WHERE state = 'running'") == 3, what="three workers")
    done = sh(block.replace("python uniphant.py", f"{sys.executable} {REPO}/uniphant.py"), project.root,
              project.env)
    assert done.returncode == 0, done.stderr
    project.cleanup()


def first_fleet(block: str, tmp_path, db) -> None:
    """test_install.py runs the first fleet's SQL and commands as typed, in its layout:
    the roles, their parts, the manager and the operator's commands."""
    with open(os.path.join(REPO, "tests", "test_install.py"), encoding="utf-8") as f:
        install = f.read()
    assert 'readme_blocks("A first fleet", "sql")' in install and 'readme_blocks("A first fleet", "sh")' in install
    assert 'readme_blocks("A first fleet", "text")' in install


def page_as_typed(block: str, tmp_path, db) -> None:
    """test_seeing_the_fleet.py runs the page's SQL and commands as typed, in its layout."""
    with open(os.path.join(REPO, "tests", "test_seeing_the_fleet.py"), encoding="utf-8") as f:
        tests = f.read()
    assert 'readme_blocks("Running the page", "sql", doc="docs/page.md")' in tests
    assert 'readme_block("Running the page", "sh", doc="docs/page.md")' in tests
    for name in re.findall(r"[\w/.-]+\.(?:py|conf)\b", block):
        assert os.path.basename(name) in tests, f"test_seeing_the_fleet.py does not build {name}"


def prometheus(block: str, tmp_path, db) -> None:
    """The scrape config and the alert rules: the page's address, and metrics it exports."""
    with open(os.path.join(REPO, "workers", "uniphant", "web.py"), encoding="utf-8") as f:
        web = f.read()
    if "scrape_configs:" in block:
        default = re.search(r'DEFAULT_LISTEN = "(.*)"', web).group(1)
        assert f'targets: ["{default}"]' in block
        return
    exported = set(re.findall(r'out\.family\("(\w+)"', web))
    named = set(re.findall(r"\buniphant_\w+", block))
    assert named and named <= exported, named - exported
    assert block.count("- alert:") == block.count("expr:") == block.count("for:") == 3


def benchmarks(block: str, tmp_path, db) -> None:
    """The benchmarks take minutes: each script named is there and says how it runs."""
    for command in block.splitlines():
        script = command.split()[0]
        assert os.access(os.path.join(REPO, script), os.X_OK), script
        with open(os.path.join(REPO, script), encoding="utf-8") as f:
            target = re.search(r"bench/\w+\.py", f.read()).group(0)
        shown = subprocess.run([sys.executable, os.path.join(REPO, target), "--help"], capture_output=True,
                               text=True, timeout=60)
        assert shown.returncode == 0 and "usage:" in shown.stdout, shown.stderr


def runtime_words(block: str, tmp_path, db) -> None:
    """A sample of what uniphant prints (test_ha.py checks the lines against real
    servers): every word of it, but the addresses, ids and numbers, is the runtime's."""
    with open(os.path.join(REPO, "uniphant.py"), encoding="utf-8") as f:
        source = f.read()
    words = set(re.findall(r"(?<![\w.])[a-z_]{4,}(?![\w.:])", block)) - {"worker", "host"}
    missing = sorted(word for word in words if word not in source)
    assert not missing, f"words of the sample that uniphant.py never prints: {missing}"


# (document, section, language, a line in the block) -> its rule
FLEET = "The fleet: desired state in SQL, a manager per host"
RULES: List[Tuple[str, str, str, str, Callable]] = [
    ("README.md", "Try it", "sh", "./dev/demo", covered_elsewhere),
    ("README.md", "Try it", "sh", "psql -v ON_ERROR_STOP=1 -f schema.sql", try_it_in_a_clone),
    ("README.md", "Writing a worker", "python", "from uniphant import alive, main", first_worker),
    ("README.md", "Writing a worker", "python", "while alive(config, connection):", loop_worker),
    ("README.md", "A first fleet", "sql", "CREATE ROLE app_worker", first_fleet),
    ("README.md", "A first fleet", "sql", "grant_role('app_worker'", first_fleet),
    ("README.md", "A first fleet", "text", "myproject/", layout),
    ("README.md", "A first fleet", "text", "PGUSER=app_operator", first_fleet),
    ("README.md", "A first fleet", "sh", "manager.py start", first_fleet),
    ("README.md", "A first fleet", "sh", "python uniphant.py ps", first_fleet),
    ("docs/development.md", "Other environments, and CI", "sh", "VENV=.venv-newest", covered_elsewhere),
    ("docs/development.md", "The runtime's tests, on their own", "sh", "pytest test_uniphant.py",
     runtime_tests_on_their_own),
    ("docs/python-api.md", "Hooks", "python", "work.prepare", sketch),
    ("docs/python-api.md", "Python API", "text", "/.host_id", gitignore),
    ("docs/sql-api.md", "Upgrading the schema", "sql", "DELETE FROM uniphant.processes", sql),
    ("docs/fleet.md", FLEET, "sh", "manager.py start", manager_and_ops),
    ("docs/fleet.md", FLEET, "sql", "uniphant.add_worker", sql),
    ("docs/fleet.md", FLEET, "sh", "python uniphant.py ps", manager_and_ops),
    ("docs/changing-the-fleet.md", "Changing the fleet", "sh", "--rolling", rolling_deploy),
    ("docs/page.md", "Running the page", "sql", "CREATE ROLE app_page", page_as_typed),
    ("docs/page.md", "Running the page", "sql", "grant_role('app_page'", page_as_typed),
    ("docs/page.md", "Running the page", "text", "web.uniphant.conf", page_as_typed),
    ("docs/page.md", "Running the page", "sh", "add uniphant.web", page_as_typed),
    ("docs/page.md", "Metrics and alerts", "yaml", "scrape_configs:", prometheus),
    ("docs/page.md", "Metrics and alerts", "yaml", "- alert:", prometheus),
    ("docs/high-availability.md", "PostgreSQL high availability", "", "could not connect to PostgreSQL at",
     runtime_words),
    ("docs/high-availability.md", "PostgreSQL high availability", "", "database connection restored after",
     runtime_words),
    ("docs/high-availability.md", "PostgreSQL high availability", "", "no writable server answered", runtime_words),
    ("docs/high-availability.md", "A failover, and never two copies", "", "an old primary", runtime_words),
    ("docs/benchmarks.md", "Benchmarks", "sh", "./dev/bench", benchmarks),
]


def rule_of(doc: str, section: str, language: str, text: str) -> Callable:
    for rule_doc, rule_section, rule_language, line, rule in RULES:
        if (doc, section, language) == (rule_doc, rule_section, rule_language) and line in text:
            return rule
    pytest.fail(f"{doc}, {section!r}: a {language or 'plain'} block that no rule of test_readme.py runs:\n{text}")


@pytest.mark.parametrize("doc, section, language, text", readme_blocks(),
                         ids=[f"{d}:{s}:{i}" for i, (d, s, _, _) in enumerate(readme_blocks())])
def test_every_code_block_of_the_readme_runs_as_written(doc, section, language, text, tmp_path, db):
    rule_of(doc, section, language, text)(text, tmp_path, db)


# ---------------------------------------------------------------------------
# Links between the pages
# ---------------------------------------------------------------------------

def prose_of(doc: str) -> str:
    """The document without its fenced code blocks."""
    with open(os.path.join(REPO, doc), encoding="utf-8") as f:
        return re.sub(r"^```.*?^```$", "", f.read(), flags=re.S | re.M)


def anchors_of(doc: str) -> Set[str]:
    """The anchors GitHub gives the headings of a document: lower case, punctuation
    dropped, spaces as hyphens, and -1, -2... after a repeated one."""
    anchors: Set[str] = set()
    for heading in re.findall(r"^#+ (.*)$", prose_of(doc), re.M):
        anchor = re.sub(r"[^\w\- ]", "", heading.lower()).replace(" ", "-")
        taken = anchor
        for n in range(1, 100):
            if taken not in anchors:
                break
            taken = f"{anchor}-{n}"
        anchors.add(taken)
    return anchors


def links_of(doc: str) -> List[str]:
    """The targets of the relative links and images of a document's prose."""
    targets = re.findall(r"\]\(([^)\s]+)\)", prose_of(doc))
    return [target for target in targets if not re.match(r"[a-z]+:", target)]


@pytest.mark.parametrize("doc", DOCS)
def test_every_relative_link_points_at_a_file_and_a_heading_that_exist(doc):
    assert links_of("README.md"), "the link pattern finds no link"
    for target in links_of(doc):
        path, _, anchor = target.partition("#")
        linked = os.path.normpath(os.path.join(os.path.dirname(doc), path)) if path else doc
        assert os.path.exists(os.path.join(REPO, linked)), f"{doc}: {target} names no file"
        if anchor:
            assert anchor in anchors_of(linked), f"{doc}: {target} names no heading of {linked}"
