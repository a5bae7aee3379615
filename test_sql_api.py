"""README, "The SQL API": schema.sql, its functions, its upgrades, and what
uniphant uses of pg8000."""

from __future__ import annotations

import os
import uuid

import pg8000.dbapi
import pytest

import pgserver  # dev/pgserver.py, on the path by conftest.py
import uniphant
from conftest import REPO, assert_clean_error, project_on, register, wait_for


def test_schema_loads_twice_and_keeps_rows(cluster):
    database = cluster.database("uniphant_schema_twice")
    host = str(uuid.uuid4())
    database.rows("SELECT register_host(%s::uuid, 'h')", host)
    pgserver.load_sql(database.connect(), os.path.join(REPO, "schema.sql"))
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
    pgserver.load_sql(upgraded.connect(), os.path.join(REPO, "tests", "fixtures", release))
    host, worker, process = (str(uuid.uuid4()) for _ in range(3))
    upgraded.rows("INSERT INTO public.hosts (id, name) VALUES (%s::uuid, 'old-host')", host)
    upgraded.rows("INSERT INTO public.processes (id, worker_id, host_id, worker_type, pid) "
                  "VALUES (%s::uuid, %s::uuid, %s::uuid, 'a.b', 42)", process, worker, host)
    role = f"upgrade_{uuid.uuid4().hex[:8]}"
    upgraded.rows(f"CREATE ROLE {role}")
    try:
        upgraded.rows(f"GRANT EXECUTE ON FUNCTION {grants} TO {role}")
        pgserver.load_sql(upgraded.connect(), os.path.join(REPO, "schema.sql"))
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
    pgserver.load_sql(database.connect(), os.path.join(REPO, "tests", "fixtures", "schema-v1.sql"))
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
