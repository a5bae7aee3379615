"""docs/trust-model.md, "Trust model": what an operator writes in a desired row is the
worker's data, never its connection, its identity or another worker's fate.
Settings describe what a worker does, never where or as whom it connects; one
rule, in SQL, checks them; a row no reader can decode fails its worker only;
and a one-per-host script (a manager) is never a desired worker."""

from __future__ import annotations

import json
import select
import socket
import struct
import threading
from typing import Iterator, List

import pg8000.dbapi
import pytest

import uniphant
from conftest import fleet, host_of, ops, with_manager
from test_uniphant import assert_clean_error, wait_for
from test_changing_the_fleet import echo
from test_seeing_the_fleet import act, answer, page_role, serve_page  # noqa: F401 (page_role: a fixture)

pytestmark = pytest.mark.own_database  # a manager acts on every worker its database holds

SECRET = "s3cr3t-value-never-shown"


class FakeServer:
    """A listener on 127.0.0.1 that plays a PostgreSQL server which asks for a
    cleartext password: it records every startup packet and password it is sent."""

    def __init__(self) -> None:
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.heard: List[bytes] = []
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while not self.stopping.is_set():
            if select.select([self.listener], [], [], 0.1)[0]:
                conn, _ = self.listener.accept()
                with conn:
                    conn.settimeout(5)
                    try:
                        self._answer(conn)
                    except OSError:
                        continue

    def _answer(self, conn: socket.socket) -> None:
        packet = self._packet(conn)
        if packet[:4] == struct.pack("!i", 80877103):  # SSLRequest: no SSL here
            conn.sendall(b"N")
            packet = self._packet(conn)
        self.heard.append(packet)
        conn.sendall(b"R" + struct.pack("!ii", 8, 3))  # AuthenticationCleartextPassword
        self.heard.append(conn.recv(65536))

    @staticmethod
    def _packet(conn: socket.socket) -> bytes:
        length = struct.unpack("!i", conn.recv(4))[0]
        return conn.recv(length - 4)

    def close(self) -> None:
        self.stopping.set()
        self.thread.join()
        self.listener.close()


@pytest.fixture
def fake_server() -> Iterator[FakeServer]:
    server = FakeServer()
    yield server
    server.close()


def refusal(db, sql: str, *params) -> str:
    """The message of the 22023 that sql raises."""
    with pytest.raises(pg8000.dbapi.DatabaseError) as refused:
        db.rows(sql, *params)
    assert refused.value.args[0]["C"] == "22023", refused.value.args[0]
    return refused.value.args[0]["M"]


def insert_past_the_check(db, worker_type: str, host: str, settings: str) -> str:
    """A desired row the owner writes directly, past the check on settings (as an
    earlier release's row would be); its worker id."""
    db.rows("ALTER TABLE workers DROP CONSTRAINT workers_settings_check")
    try:
        return str(db.value("INSERT INTO workers (worker_type, host_id, settings) VALUES (%s, %s::uuid, %s::jsonb) "
                            "RETURNING worker_id", worker_type, host, settings))
    finally:
        db.rows("ALTER TABLE workers ADD CONSTRAINT workers_settings_check "
                "CHECK (uniphant.settings_problem(settings) IS NULL) NOT VALID")


# Keys that say where or as whom a worker connects, or which process is which.
CONNECTION_AND_IDENTITY = [
    "PGHOST", "PGPORT", "PGSSLMODE", "PGUSER", "PGDATABASE", "PGTARGETSESSIONATTRS", "PGPASSFILE", "pghost",
    "PGSERVICE", "PGOPTIONS", "PGAPPNAME", "host", "hostaddr", "port", "dbname", "user", "password", "passfile",
    "sslmode", "sslrootcert", "target_session_attrs", "load_balance_hosts", "application_name", "options",
    "service", "pooler", "worker_id", "process_id", "host_id", "worker_type", "root_dir", "state_dir",
    "script_dir", "lock_file",
]


def test_no_per_worker_setting_reaches_a_connection(project, db, page_role, fake_server):  # noqa: F811
    echo(project)
    site = serve_page(project, db, *page_role)
    host = host_of(project)
    port = str(fake_server.port)
    # uniphant.py refuses the same keys again in the worker: the two lists agree.
    for key in CONNECTION_AND_IDENTITY + sorted(getattr(uniphant, "_CONNECTION_WORDS", set()) | uniphant.RESERVED_KEYS):
        message = refusal(db, "SELECT add_worker('app.echo', %s::uuid, jsonb_build_object(%s::text, %s::text))",
                          host, key, port)
        assert f"'{key}'" in message and port not in message, message
    # The reproducer: the worker's user and password went to whoever listened on PGPORT.
    leak = ("--set", "PGHOST=127.0.0.1", "--set", f"PGPORT={port}")
    assert_clean_error(ops(project, "add", "app.echo", "--host", "here", *leak), 2,
                       "'PGHOST' says where or as whom the worker connects")
    assert_clean_error(ops(project, "add", "uniphant.manager", "--host", "here", *leak), 2, "never a desired worker")
    worker = str(db.value("SELECT add_worker('app.echo', %s::uuid)", host))
    assert_clean_error(ops(project, "set", worker, *leak[1::2]), 2, "'PGHOST' says where or as whom")
    status, body = act(site, "add", {"worker_type": "app.echo", "host_id": host, "settings": list(leak[1::2])})
    assert status == 400 and "'PGHOST' says where or as whom" in body["error"] and port not in body["error"], body
    # A row that never passed the check (the owner's own insert, an earlier release's
    # row): its worker refuses it before it connects, whatever its config files say.
    bypassed = insert_past_the_check(db, "app.echo", host,
                                     json.dumps({"PGHOST": "127.0.0.1", "PGPORT": port, "PGSSLMODE": "disable"}))
    failure = wait_for(lambda: fleet(db, bypassed).get("last_exit"), what="the worker's refusal")
    assert "says where or as whom the worker connects" in failure and port not in failure, failure
    wait_for(lambda: fleet(db, bypassed)["restarts"] >= 1, what="a second refusal")
    assert fake_server.heard == []


# Settings the database refuses (as JSON text: Python itself refuses to write the
# first), and what its message says.
REFUSED = [
    ('{"n": ' + "9" * 5000 + "}", "'n' must be a number below 1e15"),
    ('{"n": 1e15}', "'n' must be a number below 1e15"),
    ('{"n": 0.' + "1" * 40 + "}", "'n' must be a number below 1e15 of at most 30 characters"),
    (json.dumps({"worker_id": SECRET}), "'worker_id' is reserved"),
    (json.dumps({"state_dir": SECRET}), "'state_dir' is reserved"),
    (json.dumps({"stale_after": "abc"}), "bad value for stale_after: expected a number of seconds >= 3"),
    (json.dumps({"stale_after": 2}), "bad value for stale_after"),
    (json.dumps({"interval": -1}), "bad value for interval"),
    (json.dumps({"interval": "1e3"}), "bad value for interval"),
    (json.dumps({"restart": "never"}), "bad value for restart: expected one of always, on-failure"),
    (json.dumps({"log_level": "LOUD"}), "bad value for log_level"),
    (json.dumps({"api_key": SECRET}), "'api_key' looks like a credential"),
    (json.dumps({"private_key": SECRET}), "'private_key' looks like a credential"),
    (json.dumps({"dsn": SECRET}), "'dsn' looks like a credential"),
    (json.dumps({"authorization": SECRET}), "'authorization' looks like a credential"),
    (json.dumps({"client_cert": SECRET}), "'client_cert' looks like a credential"),
    (json.dumps({"aws_credentials": SECRET}), "'aws_credentials' looks like a credential"),
    (json.dumps({"target": f"postgres://u:{SECRET}@h/d"}), "the value of 'target' holds a password"),
    (json.dumps({"target": f"postgresql://u:{SECRET}@h:5432/d"}), "the value of 'target' holds a password"),
    (json.dumps({"conninfo": f"host=h password={SECRET}"}), "the value of 'conninfo' holds a password"),
]


def test_settings_are_checked_once_by_one_rule_in_sql_naming_the_key_never_the_value(project, db):
    worker = str(db.value("SELECT add_worker('app.echo')"))
    for text, fragment in REFUSED:
        message = refusal(db, "SELECT add_worker('app.echo', NULL, %s::jsonb)", text)
        assert fragment in message and SECRET not in message and "9999" not in message, message
        assert refusal(db, "SELECT set_worker_settings(%s::uuid, %s::jsonb)", worker, text) == message
        if '"' + SECRET in text or "abc" in text or "never" in text:  # the command line and the page send text
            key, value = next(iter(json.loads(text).items()))
            for refused in (ops(project, "add", "app.echo", "--set", f"{key}={value}"),
                            ops(project, "set", worker, f"{key}={value}")):
                assert_clean_error(refused, 2, message)
                assert SECRET not in refused.stderr + refused.stdout
    # What a config file would take is taken, and every reader decodes it.
    taken = {"queue": "mail", "interval": 0.5, "stale_after": "10", "restart": "on-failure", "log_level": "debug",
             "big": 10 ** 15 - 1, "url": "https://example.com/x?a=b", "keyspace": "k", "monkey": True}
    added = str(db.value("SELECT add_worker('app.echo', NULL, %s::jsonb)", json.dumps(taken)))
    assert json.loads(db.value("SELECT settings::text FROM workers WHERE worker_id = %s::uuid", added)) == taken
    assert ops(project, "add", "app.echo", "--set", "queue=mail", "--set", "interval=0.5").returncode == 0


def test_a_desired_row_no_reader_can_decode_is_that_workers_failure_never_a_readers(project, db,
                                                                                    page_role):  # noqa: F811
    echo(project)
    site = serve_page(project, db, *page_role)
    host = host_of(project)
    manager_pid = db.value("SELECT pid FROM fleet WHERE state = 'manager'")
    # Python's json module, which pg8000 decodes jsonb with, refuses an integer of
    # more than 4300 digits (Python 3.11 and later).
    bad = insert_past_the_check(db, "app.echo", host, '{"n": ' + "9" * 5000 + "}")
    good = str(db.value("SELECT add_worker('app.echo', %s::uuid)", host))
    failure = wait_for(lambda: fleet(db, bad).get("last_exit"), what="the bad row's failure")
    assert "workers.settings" in failure and "cannot be read" in failure, failure
    wait_for(lambda: fleet(db, good).get("state") == "running", what="a good worker beside it")
    assert db.value("SELECT pid FROM fleet WHERE state = 'manager'") == manager_pid
    for args in (["ps"], ["ps", bad], ["ps", "--json"]):
        shown = ops(project, *args)
        assert shown.returncode == 0 and "Traceback" not in shown.stderr, shown.stderr
    assert [w["settings"] for w in json.loads(ops(project, "ps", "--json").stdout) if w["worker_id"] == bad] == [None]
    for path in ("api/fleet", f"api/worker/{bad}", "metrics"):
        assert answer(site.url + path)[0] == 200, path
    assert fleet(db, site.worker_id)["state"] == "running"


def test_a_manager_never_runs_a_copy_of_a_one_per_host_script(project, db, fake_server):
    manager_id = with_manager(project, "restart_delay=0.2\nrestart_delay_max=1\n")
    host = host_of(project)
    manager_pid = project.running_pid(manager_id, "uniphant.manager")
    for sql, params in [("SELECT add_worker('uniphant.manager', %s::uuid)", (host,)),
                        ("SELECT add_worker('uniphant.manager')", ()),
                        ("SELECT scale('uniphant.manager', 1, %s::uuid)", (host,))]:
        assert "never a desired worker" in refusal(db, sql, *params)
    assert db.value("SELECT scale('uniphant.manager', 0, %s::uuid)", host) == 0
    assert_clean_error(ops(project, "add", "uniphant.manager", "--host", "here"), 2, "never a desired worker")
    # Another script that runs once per host, whose config would send it elsewhere.
    project.write("workers/ops/boss.py", "from uniphant import main\nfrom uniphant_fleet import manage\n\n"
                                         "if __name__ == '__main__':\n    main(manage)\n")
    project.write("workers/ops/boss.uniphant.conf", f"PGHOST=127.0.0.1\nPGPORT={fake_server.port}\n")
    # Rows the owner writes directly: the manager's own type, and the other.
    own = str(db.value("INSERT INTO workers (worker_type, host_id) VALUES ('uniphant.manager', %s::uuid) "
                       "RETURNING worker_id", host))
    other = str(db.value("SELECT add_worker('ops.boss', %s::uuid)", host))
    wait_for(lambda: "this manager's own: a script that runs once per host" in (fleet(db, own).get("last_exit") or ""),
             what="the manager's refusal of its own type")
    wait_for(lambda: "ops.boss: a script that runs once per host" in (fleet(db, other).get("last_exit") or ""),
             what="the other script's refusal")
    wait_for(lambda: fleet(db, own)["restarts"] >= 2 and fleet(db, other)["restarts"] >= 2, what="refused again")
    assert project.running_pid(manager_id, "uniphant.manager") == manager_pid
    assert db.value("SELECT count(*) FROM fleet WHERE state = 'manager'") == 1
    assert project.log(own, "uniphant.manager") == ""  # never started: no log of its own
    assert fake_server.heard == []
