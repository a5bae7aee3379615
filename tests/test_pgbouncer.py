"""docs/pgbouncer.md, "Behind PgBouncer (transaction mode)": a fleet larger than the
server's max_connections, through a pool."""

from __future__ import annotations

import os

import pytest

import pgserver  # dev/pgserver.py, on the path by conftest.py
from conftest import with_manager
from test_uniphant import gone, server_project, sql_rows, wait_for


@pytest.mark.faults
def test_300_workers_run_through_a_pool_of_20_on_a_server_of_50_connections(tmp_path):
    if not os.access(pgserver.PgBouncer.binary_path(), os.X_OK):
        pytest.skip("pgbouncer is not installed (Debian: apt-get install pgbouncer)")
    with pgserver.Server() as server:
        server.init(settings="max_connections = 50\n").start()
        server.create_database("uniphant")
        with pgserver.PgBouncer(server, pool_size=20) as bouncer:
            admin = server.connect("uniphant")
            roots = [server_project(tmp_path, f"host{i}", server) for i in range(3)]
            try:
                for root in roots:  # managers connect directly; their workers through the pool
                    root.write("workers/test/uniphant.conf",
                               f"PGHOST={bouncer.server.dir}\nPGPORT={bouncer.port}\npooler=transaction\n"
                               f"stale_after=6\n")
                    with_manager(root)
                count = lambda sql, *args: sql_rows(admin, sql, *args)[0][0]  # noqa: E731
                sql_rows(admin, "SELECT scale('test.probe', 300)")
                wait_for(lambda: count("SELECT count(*) FROM processes WHERE pooled") == 300, timeout=120,
                         what="300 pooled workers registered")
                assert count("SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'client backend'") <= 50
                assert sorted(n for _, n in sql_rows(admin, "SELECT host_id, count(*) FROM processes "
                                                         "WHERE pooled GROUP BY 1")) == [100, 100, 100]
                started = sql_rows(admin, "SELECT now()")[0][0]
                wait_for(lambda: count("SELECT count(*) FROM processes WHERE pooled AND heartbeat_at > %s",
                                       started) == 300, timeout=60, what="every worker to heartbeat")
                # A deleted row stops its worker through its manager's relay (no LISTEN through the pool).
                worker, pid = sql_rows(admin, "SELECT worker_id::text, pid FROM processes WHERE pooled LIMIT 1")[0]
                admin.cursor().execute("DELETE FROM processes WHERE worker_id = %s::uuid", (worker,))
                wait_for(lambda: gone(pid), timeout=5, what="the worker whose row was deleted")
                log = next(r.log(worker) for r in roots if r.log(worker))
                assert "stopping: its process row was deleted" in log
                # A restart of PgBouncer: every worker reconnects, keeps its row and heartbeats again.
                wait_for(lambda: count("SELECT count(*) FROM processes WHERE pooled") == 300,
                         what="the stopped worker started again by its manager")
                pids = dict(sql_rows(admin, "SELECT id::text, pid FROM processes WHERE pooled"))
                bouncer.stop()
                bouncer.start()
                restarted = sql_rows(admin, "SELECT now()")[0][0]
                wait_for(lambda: count("SELECT count(*) FROM processes WHERE pooled AND heartbeat_at > %s",
                                       restarted) == 300, timeout=90, what="every worker back after the restart")
                assert dict(sql_rows(admin, "SELECT id::text, pid FROM processes WHERE pooled")) == pids
                admin.cursor().execute("DELETE FROM workers")
                wait_for(lambda: count("SELECT count(*) FROM processes WHERE pooled") == 0, timeout=60,
                         what="every worker stopped")
            finally:
                admin.close()
                for root in roots:
                    root.cleanup()
