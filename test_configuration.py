"""README, "Configuration": config files and secrets, runtime and connection
settings as libpq reads them, and the host's identity."""

from __future__ import annotations

import os
import shutil
import uuid

import pytest

import uniphant
from conftest import assert_clean_error, server_project, show_config, start_daemon, wait_for


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
