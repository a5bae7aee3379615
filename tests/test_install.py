"""README, "A first fleet" (and docs/install.md): a project that vendors uniphant,
laid out and set up exactly as the README says, runs as typed."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import sysconfig
import uuid
from typing import List, Tuple

import pg8000.dbapi
import pytest

from conftest import fleet, host_of, running
from test_uniphant import REPO, Project, assert_clean_error, load_sql, wait_for

pytestmark = pytest.mark.own_database  # a manager acts on every worker its database holds

HELLO = '''\
import uniphant
from uniphant import main

def work(config, logger, connection):
    logger.info("runtime %s", uniphant.__file__)

if __name__ == "__main__":
    main(work)
'''


def doc_blocks(doc: str = "README.md") -> List[Tuple[List[str], str, str]]:
    """(headings, language, text) of each fenced code block of a document (README.md,
    or a page of docs/): its headings are the titles that enclose it, outermost first."""
    with open(os.path.join(REPO, doc), encoding="utf-8") as f:
        lines = f.read().splitlines()
    blocks, headings, i = [], [], 0
    while i < len(lines):
        heading = re.match(r"(#+) (.*)", lines[i])
        if heading:
            level = len(heading.group(1))
            headings = (headings + [""] * level)[:level - 1] + [heading.group(2)]
        elif lines[i].startswith("```"):
            end = lines.index("```", i + 1)
            blocks.append((headings, lines[i][3:].strip(), "\n".join(lines[i + 1:end]) + "\n"))
            i = end
        i += 1
    return blocks


def readme_blocks(section: str, language: str, doc: str = "README.md") -> List[str]:
    """The code blocks of that language under that heading of the document, in order."""
    return [text for headings, found, text in doc_blocks(doc) if section in headings and found == language]


def readme_block(section: str, language: str, doc: str = "README.md") -> str:
    """The first code block of that language under that heading of the document."""
    return readme_blocks(section, language, doc)[0]


def as_typed(block: str, project: Project) -> subprocess.CompletedProcess:
    """A shell block run by bash as typed in the project root, where `python` is
    this virtual environment's (as once activated)."""
    env = dict(project.env, PATH=os.path.dirname(sys.executable) + os.pathsep + os.environ["PATH"])
    return subprocess.run(["bash", "-e", "-c", block], cwd=project.root, env=env, capture_output=True, text=True,
                          timeout=120)


def vendored(tmp_path, db) -> Project:
    """A project laid out as the README's "A first fleet" shows, with only the files it names;
    its environment has no PYTHONPATH and no connection settings."""
    home = tmp_path / "home"
    home.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith("PG") and k != "PYTHONPATH"}
    project = Project(str(tmp_path / "myproject"), str(home), dict(env, HOME=str(home)))
    os.remove(project.path("workers/test/probe.py"))
    shutil.copy(os.path.join(REPO, "uniphant.py"), project.root)
    shutil.copy(os.path.join(REPO, "uniphant_fleet.py"), project.root)
    os.makedirs(project.path("workers/uniphant"))
    shutil.copy(os.path.join(REPO, "workers", "uniphant", "manager.py"), project.path("workers/uniphant"))
    project.write("uniphant.conf", f"PGHOST=127.0.0.1\nPGPORT={db.env['PGPORT']}\n"
                                   f"PGDATABASE={db.env['PGDATABASE']}\n")
    project.write("workers/uniphant/manager.uniphant.conf", "PGUSER=app_manager\n")
    project.write("workers/app/uniphant.conf", "PGUSER=app_worker\n")
    project.write("workers/app/hello.py", HELLO)
    project.write(".uniphant/secrets/workers/uniphant/manager.secrets.conf", "PGPASSWORD=manager-secret\n",
                  mode=0o600, base=project.home)
    project.write(".uniphant/secrets/workers/app/secrets.conf", "PGPASSWORD=worker-secret\n",
                  mode=0o600, base=project.home)
    return project


@pytest.fixture
def readme_roles(db):
    """The roles of the README's "A first fleet", made and given their parts by its SQL as typed."""
    conn = db.connect()
    for sql in readme_blocks("A first fleet", "sql"):
        conn.execute_simple(sql)
    conn.close()
    yield
    for role in ("app_worker", "app_manager", "app_operator"):
        db.rows(f"DROP OWNED BY {role}")
        db.rows(f"DROP ROLE {role}")


def test_a_vendored_project_runs_its_manager_and_workers_as_three_roles_with_no_pythonpath(
        tmp_path, db, readme_roles):
    project = vendored(tmp_path, db)
    manager, operator = readme_blocks("A first fleet", "sh")
    try:
        started = as_typed(manager, project)
        assert started.returncode == 0, started.stderr
        operator_conf = next(b for b in readme_blocks("A first fleet", "text") if "PGUSER=app_operator" in b)
        project.write(".uniphant/operator.conf", operator_conf, mode=0o600, base=project.home)
        done = as_typed(operator, project)
        assert done.returncode == 0, done.stderr
        pinned = done.stdout.splitlines()[0]
        assert done.stdout.count(pinned) == 2, done.stdout  # printed by add, listed by ps
        wait_for(lambda: db.value("SELECT count(*) FROM fleet WHERE worker_type = 'app.hello' AND state = 'running'")
                 == 4, what="the operator's four workers running")
        workers = [row[0] for row in db.rows("SELECT worker_id::text FROM workers")]
        for worker in workers:
            wait_for(lambda: "runtime" in project.log(worker, "app.hello"), what="its first call")
            assert f"runtime {project.path('uniphant.py')}" in project.log(worker, "app.hello")
        roles = dict(db.rows("SELECT worker_type, role::text FROM processes WHERE host_id = %s::uuid "
                             "GROUP BY 1, 2", host_of(project)))
        assert roles == {"app.hello": "app_worker", "uniphant.manager": "app_manager"}
        by_hand = str(uuid.uuid4())
        started = subprocess.run([sys.executable, "-m", "workers.app.hello", by_hand, "start"], cwd=project.root,
                                 env=project.env, capture_output=True, text=True)
        assert started.returncode == 0, started.stderr
        wait_for(lambda: "runtime" in project.log(by_hand, "app.hello"), what="the worker started by hand")
        assert f"runtime {project.path('uniphant.py')}" in project.log(by_hand, "app.hello")
    finally:
        project.cleanup()


def test_a_manager_needs_no_worker_id_and_one_command_serves_every_host(tmp_path, db):
    import uniphant_fleet
    hosts = [Project(str(tmp_path / name), str(tmp_path / "home"), db_env(db, tmp_path)) for name in ("a", "b")]
    try:
        for project in hosts:
            os.makedirs(project.path("workers/uniphant"))
            shutil.copy(os.path.join(REPO, "workers", "uniphant", "manager.py"), project.path("workers/uniphant"))
            assert project.run(None, "status", script="workers/uniphant/manager.py").returncode == 3
            started = project.run(None, "start", script="workers/uniphant/manager.py")
            assert started.returncode == 0, started.stderr
        ids = []
        for project in hosts:
            manager_id = str(uuid.uuid5(uuid.UUID(host_of(project)), "uniphant.manager"))
            ids.append(manager_id)
            status = project.run(None, "status", script="workers/uniphant/manager.py")
            assert status.returncode == 0 and manager_id in status.stdout
            assert running(db, manager_id) == project.running_pid(manager_id, "uniphant.manager")
            assert_clean_error(project.run(None, "start", script="workers/uniphant/manager.py"), 1,
                               "already running")
        assert ids[0] != ids[1] and db.value("SELECT count(*) FROM managers") == 2
        assert hosts[0].run(None, "stop", script="workers/uniphant/manager.py").returncode == 0
        assert running(db, ids[0]) is None and running(db, ids[1]) is not None
        assert_clean_error(hosts[0].run(None, "frobnicate", script="workers/uniphant/manager.py"), 2,
                           "[worker_id]")
        assert uniphant_fleet.manage.one_per_host
    finally:
        for project in hosts:
            project.cleanup()


def db_env(db, tmp_path) -> dict:
    from test_uniphant import worker_env
    (tmp_path / "home").mkdir(exist_ok=True)
    return worker_env(db.env, str(tmp_path / "home"))


def test_the_schema_owner_needs_no_superuser(tmp_path, cluster):
    """README, "A first fleet" (docs/trust-model.md, "Database privileges"): a role of
    its own owns uniphant's objects, loads schema.sql and gives a worker role its part;
    the worker runs."""
    suffix = uuid.uuid4().hex[:8]
    owner, worker_role = f"owner_{suffix}", f"worker_{suffix}"
    database = cluster.database(f"owned_{suffix}", schema=False)
    name = database.env["PGDATABASE"]
    cluster._admin(f"CREATE ROLE {owner} LOGIN NOSUPERUSER PASSWORD 'owner-secret'",
                   f"CREATE ROLE {worker_role} LOGIN PASSWORD 'worker-secret'",
                   f'ALTER DATABASE "{name}" OWNER TO {owner}')
    project = Project(str(tmp_path / "project"), str(tmp_path),
                      dict(db_env(database, tmp_path), PGUSER=worker_role, PGPASSWORD="worker-secret"))
    try:
        conn = database.connect(user=owner, password="owner-secret")
        try:
            with open(os.path.join(REPO, "schema.sql"), encoding="utf-8") as f:
                conn.execute_simple(f.read())
            conn.execute_simple(f"SELECT uniphant.grant_role('{worker_role}', 'worker')")
        finally:
            conn.close()
        worker = str(uuid.uuid4())
        started = project.run(worker, "start")
        assert started.returncode == 0, started.stderr
        assert database.value("SELECT role::text FROM uniphant.processes WHERE worker_id = %s::uuid",
                              worker) == worker_role
        assert project.run(worker, "stop").returncode == 0
    finally:
        project.cleanup()
        cluster._admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)', f"DROP ROLE {worker_role}",
                       f"DROP ROLE {owner}")


def test_the_privileges_sql_runs_as_typed_with_a_non_superuser_owner(cluster):
    """docs/trust-model.md, "Database privileges": the block marked for a role with CREATEROLE
    runs as one, every other block as the owner the README recommends, which has
    neither SUPERUSER nor CREATEROLE."""
    suffix = uuid.uuid4().hex[:8]
    owner, creator = f"owner_{suffix}", f"creator_{suffix}"
    database = cluster.database(f"privileges_{suffix}", schema=False)
    name = database.env["PGDATABASE"]
    cluster._admin(f"CREATE ROLE {owner} LOGIN NOSUPERUSER NOCREATEROLE PASSWORD 'owner-secret'",
                   f"CREATE ROLE {creator} LOGIN NOSUPERUSER CREATEROLE PASSWORD 'creator-secret'",
                   f'ALTER DATABASE "{name}" OWNER TO {owner}')
    try:
        load_sql(database.connect(user=owner, password="owner-secret"), os.path.join(REPO, "schema.sql"))
        for block in readme_blocks("A first fleet", "sql"):
            as_creator = block.startswith("-- as a role with CREATEROLE\n")
            conn = database.connect(user=creator if as_creator else owner,
                                    password="creator-secret" if as_creator else "owner-secret")
            try:
                conn.execute_simple(block)
            finally:
                conn.close()
        assert database.value("SELECT has_function_privilege('app_worker', 'uniphant.keepalive()', 'EXECUTE') "
                              "AND has_table_privilege('app_operator', 'uniphant.fleet', 'SELECT')")
    finally:
        cluster._admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)',
                       *(f"DROP ROLE IF EXISTS {role}" for role in ("app_worker", "app_manager", "app_operator",
                                                                     creator, owner)))


def test_grant_role_of_a_missing_role_says_which_and_what_to_run(db):
    missing = f"app_{uuid.uuid4().hex[:8]}"
    with pytest.raises(pg8000.dbapi.DatabaseError) as refused:
        db.rows("SELECT uniphant.grant_role(%s, 'worker')", missing)
    message = refused.value.args[0]["M"]
    assert message == (f'role "{missing}" does not exist: CREATE ROLE {missing} LOGIN PASSWORD \'...\' first '
                       f"(as a role with CREATEROLE)"), message
    assert not db.rows("SELECT FROM uniphant.role_grants WHERE role = %s", missing)


def readme_opening_command() -> str:
    """The command the README's opening paragraph runs a worker with."""
    with open(os.path.join(REPO, "README.md"), encoding="utf-8") as f:
        opening = f.read().split("\n## ", 1)[0]
    return " ".join(re.search(r"`(python [^`]*<uuid>[^`]*)`", opening).group(1).split())


def python_without_uniphant(tmp_path) -> str:
    """The bin directory of a Python with pg8000 but no uniphant, as a project that
    vendors it has: this environment's puts uniphant's repository on the path."""
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    # A directory named in a .pth file is on the path, but .pth files in it are not read.
    (next(venv.glob("lib/python*/site-packages")) / "dependencies.pth").write_text(
        sysconfig.get_paths()["purelib"] + "\n")
    return str(venv / "bin")


def test_the_readmes_opening_command_runs_a_worker_in_a_vendored_project(tmp_path, db, readme_roles):
    command = readme_opening_command()
    named = re.search(r"workers[\w./]*", command).group(0)
    script = named if named.endswith(".py") else named.replace(".", "/") + ".py"
    worker_type = script[len("workers/"):-len(".py")].replace("/", ".")
    project = vendored(tmp_path, db)
    project.write(script, HELLO)
    worker = str(uuid.uuid4())
    child = subprocess.Popen(["bash", "-c", "exec " + command.replace("<uuid>", worker)], cwd=project.root,
                             env=dict(project.env, PATH=python_without_uniphant(tmp_path) + os.pathsep +
                                      os.environ["PATH"]),
                             stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_for(lambda: "runtime" in project.log(worker, worker_type) or child.poll() is not None,
                 what="the worker's first call")
        assert child.poll() is None, child.communicate()
        assert f"runtime {project.path('uniphant.py')}" in project.log(worker, worker_type)
    finally:
        child.terminate()
        child.communicate(timeout=15)
