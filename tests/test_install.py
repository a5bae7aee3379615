"""README, "Install" and "Database privileges": a project that vendors uniphant,
laid out and set up exactly as the README says, runs as typed."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import sysconfig
import uuid
from typing import List

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


def readme_block(section: str, language: str) -> str:
    """The first code block of that language in the README's section."""
    with open(os.path.join(REPO, "README.md"), encoding="utf-8") as f:
        text = f.read().split(f"\n## {section}\n", 1)[1].split("\n## ", 1)[0]
    return re.search(rf"```{language}\n(.*?)```", text, re.S).group(1)


def readme_blocks_of(section: str, language: str) -> List[str]:
    """Every code block of that language in the README's section, in order."""
    with open(os.path.join(REPO, "README.md"), encoding="utf-8") as f:
        text = f.read().split(f"\n## {section}\n", 1)[1].split("\n## ", 1)[0]
    return re.findall(rf"```{language}\n(.*?)```", text, re.S)


def vendored(tmp_path, db) -> Project:
    """A project laid out as README's "Install" shows, with only the files it names;
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
    """The roles of README's "Database privileges", made by its SQL as typed."""
    conn = db.connect()
    conn.execute_simple("".join(readme_blocks_of("Database privileges", "sql")))
    conn.close()
    yield
    for role in ("app_worker", "app_manager", "app_operator"):
        db.rows(f"DROP OWNED BY {role}")
        db.rows(f"DROP ROLE {role}")


def test_a_vendored_project_runs_its_manager_and_workers_as_three_roles_with_no_pythonpath(
        tmp_path, db, readme_roles):
    project = vendored(tmp_path, db)
    try:
        manager = project.run(None, "start", script="workers/uniphant/manager.py")
        assert manager.returncode == 0, manager.stderr
        operator = dict(project.env, PGUSER="app_operator", PGPASSWORD="operator-secret")
        added = [subprocess.run([sys.executable, "uniphant.py", "add", "app.hello", "--host", "here"],
                                cwd=project.root, env=operator, capture_output=True, text=True)
                 for _ in range(2)]
        assert all(a.returncode == 0 for a in added), [a.stderr for a in added]
        workers = [a.stdout.strip() for a in added]
        for worker in workers:
            wait_for(lambda: fleet(db, worker).get("state") == "running", what="a worker of the vendored project")
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
        ps = subprocess.run([sys.executable, "uniphant.py", "ps"], cwd=project.root, env=operator,
                            capture_output=True, text=True)
        assert ps.returncode == 0 and all(worker in ps.stdout for worker in workers), ps.stderr
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
    """README, "Database privileges": a role of its own owns uniphant's objects,
    loads schema.sql and gives a worker role its part; the worker runs."""
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
    """README, "Database privileges": the block marked for a role with CREATEROLE
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
        for block in readme_blocks_of("Database privileges", "sql"):
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
