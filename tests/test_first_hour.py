"""The first hour of an operator: settings of their own, mistakes that show where
they look, a restart that skips a backoff, settings changed key by key, and
output that stays quiet and narrow (docs/changing-the-fleet.md, "Changing the fleet", "Operators'
settings")."""

from __future__ import annotations

import json
import os
import pty
import subprocess
import sys

import pytest

from conftest import fleet, host_of, ops, running, with_manager
from test_uniphant import REPO, wait_for

pytestmark = pytest.mark.own_database  # a manager acts on every worker its database holds


def operator_role(db, make_role) -> tuple:
    role, password = make_role("operator")
    db.rows("SELECT uniphant.grant_role(%s, 'operator')", role)
    return role, password


def on_a_terminal(project, columns: int, *args: str) -> str:
    """What python uniphant.py ARGS writes to a terminal columns wide (a pseudo-terminal)."""
    main, terminal = pty.openpty()
    try:
        subprocess.run([sys.executable, os.path.join(REPO, "uniphant.py"), *args], cwd=project.root,
                       env=dict(project.env, COLUMNS=str(columns)), stdout=terminal, timeout=60, check=True)
        os.close(terminal)
        terminal, out = -1, b""
        while True:
            try:
                chunk = os.read(main, 65536)
            except OSError:  # EIO: the terminal's last writer has gone
                break
            if not chunk:
                break
            out += chunk
        return out.decode().replace("\r\n", "\n")
    finally:
        os.close(main)
        if terminal >= 0:
            os.close(terminal)


def test_the_ops_commands_read_the_operators_own_settings_which_no_worker_reads(project, db, make_role,
                                                                                worker_id):
    role, password = operator_role(db, make_role)
    project.write(".uniphant/operator.conf", f"PGUSER={role}\nPGPASSWORD={password}\nPGHOST=127.0.0.1\n",
                  mode=0o600, base=project.home)
    project.env["PGUSER"] = "nobody_of_this_database"  # what the operator's file must win over
    shown = ops(project, "ps", "--json")
    assert shown.returncode == 0, shown.stderr
    # A worker of the same OS user and project never reads the operator's file: it connects as before.
    project.env["PGUSER"] = db.env["PGUSER"]
    assert project.run(worker_id, "start").returncode == 0
    assert db.value("SELECT role FROM processes WHERE worker_id = %s::uuid", worker_id) == db.env["PGUSER"]


def test_a_password_failure_names_the_user_and_database_it_tried(project, db, password_role):
    role, _ = password_role
    project.env.update(PGHOST="127.0.0.1", PGUSER=role, PGDATABASE=db.env["PGDATABASE"])
    project.env.pop("PGPASSWORD", None)
    result = ops(project, "ps")
    assert result.returncode == 1
    assert f"127.0.0.1:{db.env['PGPORT']}: as user '{role}' to database '{db.env['PGDATABASE']}':" \
        in result.stderr, result.stderr


def test_a_workers_configuration_warnings_show_in_ps(project, db):
    project.write("workers/test/uniphant.conf", "intervall=5\n")
    with_manager(project)
    worker = ops(project, "add", "test.probe", "--host", "here").stdout.strip()
    wait_for(lambda: fleet(db, worker).get("state") == "running", what="the worker running")
    shown = wait_for(lambda: (r := ops(project, "ps", worker)).returncode == 0 and "warnings:" in r.stdout
                     and r.stdout, what="its warnings in ps ID")
    assert "'intervall' is not a key uniphant reads; did you mean 'interval'?" in shown
    as_json = json.loads(ops(project, "ps", worker, "--json").stdout)
    assert "did you mean 'interval'?" in as_json["warnings"]
    table = ops(project, "ps").stdout
    assert any(worker in line and "1 config warning (ps ID)" in line for line in table.splitlines()), table


def test_adding_an_unknown_type_names_the_type_one_slip_away(project, db):
    with_manager(project)
    wait_for(lambda: db.value("SELECT 'test.probe' = ANY (worker_types) FROM managers"), what="its types")
    added = ops(project, "add", "test.prob")
    assert added.returncode == 0, added.stderr
    assert "no live manager on any host has a script of worker type test.prob" in added.stderr
    assert "did you mean test.probe?" in added.stderr


def test_restart_starts_a_worker_waiting_in_backoff_now(project, db):
    project.write("workers/test/uniphant.conf", "mode=raise\n")
    with_manager(project, "restart_delay=600\nrestart_delay_max=600\n")
    worker = ops(project, "add", "test.probe", "--host", "here").stdout.strip()
    wait_for(lambda: fleet(db, worker).get("state") == "backoff", timeout=30, what="its backoff")
    os.unlink(project.path("workers/test/uniphant.conf"))  # fixed
    restarted = ops(project, "restart", worker)
    assert restarted.returncode == 0, restarted.stderr
    assert restarted.stdout.strip() == "restart: 1 worker"
    wait_for(lambda: fleet(db, worker).get("state") == "running" and running(db, worker),
             what="the worker running again, long before its backoff ends")


def test_set_merges_keys_into_the_settings_unset_removes_and_replace_replaces(project, db):
    worker = ops(project, "add", "test.probe", "--set", "a=1", "--set", "b=2").stdout.strip()

    def settings() -> dict:
        return db.value("SELECT settings FROM workers WHERE worker_id = %s::uuid", worker)
    assert ops(project, "set", worker, "c=3", "a=4").returncode == 0
    assert settings() == {"a": "4", "b": "2", "c": "3"}
    assert ops(project, "set", worker, "--unset", "a", "--unset", "c").returncode == 0
    assert settings() == {"b": "2"}
    assert ops(project, "set", worker, "--replace", "d=5").returncode == 0
    assert settings() == {"d": "5"}
    nothing = ops(project, "set", worker)
    assert nothing.returncode == 2 and "no settings given" in nothing.stderr


def test_ops_commands_say_which_server_they_used_only_when_asked(project, db):
    quiet = ops(project, "ps")
    assert quiet.returncode == 0 and quiet.stderr == ""
    told = ops(project, "-v", "ps")
    assert told.returncode == 0 and told.stderr.startswith("uniphant.py: read from ") and "a primary" in told.stderr


def test_ps_keeps_its_table_within_the_terminal_and_shows_the_whole_detail_for_an_id(project, db):
    long = "x" * 300
    project.write("workers/test/long.py", "from uniphant import main\n\ndef work(config, logger, connection):\n"
                  f"    raise RuntimeError({long!r})\n\nif __name__ == '__main__':\n    main(work)\n")
    with_manager(project, "restart_delay=600\n")
    worker = ops(project, "add", "test.long", "--host", "here").stdout.strip()
    wait_for(lambda: (fleet(db, worker).get("last_exit") or "").endswith("x"), timeout=30, what="its exit")
    table = on_a_terminal(project, 120, "ps")
    assert all(len(line) <= 120 for line in table.splitlines()), table
    assert "\u2026" in table
    assert long in ops(project, "ps", worker).stdout


# The page's fixtures (a manager running the page, a headless Chromium).
from test_seeing_the_fleet import act, answer, browser, page_role, site, text_of  # noqa: E402,F401


def test_the_page_answers_an_add_with_the_type_meant_and_shows_a_workers_warnings(site, project, db):
    project.write("workers/test/uniphant.conf", "intervall=5\n")
    status, said = act(site, "add", {"worker_type": "test.prob"})
    assert status == 200 and "did you mean test.probe?" in said["message"], said
    status, said = act(site, "add", {"worker_type": "test.probe", "host_id": host_of(project)})
    worker = said["message"].split()[2]
    wait_for(lambda: fleet(db, worker).get("state") == "running", what="the worker running")
    detail = wait_for(lambda: (w := json.loads(answer(site.url + "api/worker/" + worker)[2])).get("warnings")
                      and w, what="its warnings on the page")
    assert "did you mean 'interval'?" in detail["warnings"]


def test_the_pages_header_says_stale_when_its_last_read_is_older_than_its_refresh(site, db, browser):
    browser.get(site.url)
    wait_for(lambda: text_of(browser, "#live") == "live", what="the page live")
    blocker = db.connect()
    try:
        cursor = blocker.cursor()
        cursor.execute("BEGIN")
        cursor.execute("LOCK TABLE uniphant.worker_states IN ACCESS EXCLUSIVE MODE")  # the page's reads wait
        wait_for(lambda: text_of(browser, "#live") == "stale", timeout=20, what="the header saying stale")
    finally:
        blocker.close()
    wait_for(lambda: text_of(browser, "#live") == "live", timeout=20, what="the page live again")
