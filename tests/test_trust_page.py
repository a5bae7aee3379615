"""docs/page.md, "Seeing the fleet" and "Trust model": the page stays up, and stays
bounded, whatever its clients do and whatever the tables hold: it answers only
its own host names, outlives a lost server, many slow clients and clients that
go away, and tells a browser it refused why."""

from __future__ import annotations

import contextlib
import http.client
import json
import resource
import select
import socket
import struct
import subprocess
import threading
import time
import uuid
from typing import Dict, Iterator, List, NamedTuple, Optional

import pytest

import pgserver  # dev/pgserver.py, on the path by conftest.py
from test_uniphant import assert_clean_error, wait_for
from test_seeing_the_fleet import TOKEN, browser, page_files, page_role, text_of  # noqa: F401 (fixtures)

pytestmark = pytest.mark.own_database

WEB = "workers/uniphant/web.py"
DEADLINE = 10.0  # web.py's _DEADLINE: a request's time from accept to the end of its answer


class Page(NamedTuple):
    url: str                 # http://<web_listen>/
    child: subprocess.Popen  # python workers/uniphant/web.py <id> start -f
    output: str              # the file of its stdout and stderr
    worker_id: str


@contextlib.contextmanager
def running_page(project, db, role: str, password: str, tmp_path, listen: Optional[str] = None,
                 conf: str = "", host: Optional[str] = None, nofile: Optional[int] = None) -> Iterator[Page]:
    """The page run by hand (start -f), its keys in web.uniphant.conf plus conf;
    nofile: its open-file limit.  It answers before this yields; it is stopped after."""
    url = page_files(project, db, role, password, listen=listen)
    with open(project.path("workers/uniphant/web.uniphant.conf"), "a") as f:
        f.write(conf)
    worker_id, output = str(uuid.uuid4()), str(tmp_path / f"page-{uuid.uuid4().hex[:8]}.out")
    limit = (lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (nofile, nofile))) if nofile else None
    with open(output, "w") as out:
        child = project.popen(worker_id, "start", "-f", script=WEB, stdout=out, stderr=subprocess.STDOUT,
                              preexec_fn=limit)
    page = Page(url, child, output, worker_id)
    try:
        wait_for(lambda: get(page, "api/fleet", host=host)[0] == 200 or child.poll() is not None,
                 what="the page answering")
        assert child.poll() is None, logged(project, page)
        yield page
    finally:
        child.terminate()
        child.wait(timeout=15)


def logged(project, page: Page) -> str:
    """All the page wrote: its log file and its output."""
    with open(page.output) as f:
        return project.log(page.worker_id, "uniphant.web") + f.read()


def get(page: Page, path: str, host: Optional[str] = None, method: str = "GET", body: Optional[dict] = None,
        headers: Optional[Dict[str, str]] = None):
    """(status, headers, body) of one request; host: its Host header (the address's by default)."""
    port = int(page.url.rsplit(":", 1)[1].strip("/"))
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=15)
    try:
        connection.request(method, "/" + path, body=None if body is None else json.dumps(body),
                           headers={**({"Host": host} if host else {}), **(headers or {})})
        response = connection.getresponse()
        return response.status, dict(response.getheaders()), response.read()
    except ConnectionError:
        return 0, {}, b""
    finally:
        connection.close()


def connected(port: int) -> socket.socket:
    return socket.create_connection(("127.0.0.1", port), timeout=10)


def reset(sock: socket.socket) -> None:
    """Close sock with a reset (SO_LINGER 0), as a client that vanishes does."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


def port_of(page: Page) -> int:
    return int(page.url.rsplit(":", 1)[1].strip("/"))


# ---------------------------------------------------------------------------
# Host names, a lost server, the backlog
# ---------------------------------------------------------------------------

def test_a_page_beyond_loopback_answers_only_the_names_of_web_hosts(project, db, page_role, tmp_path):
    port = pgserver.free_port()
    page_files(project, db, *page_role, listen=f"0.0.0.0:{port}")
    assert_clean_error(project.run(str(uuid.uuid4()), "start", "-f", script=WEB), 2,
                       "web.uniphant.conf:4: web_listen listens beyond loopback, so web_hosts is required")
    page_files(project, db, *page_role, listen=f"0.0.0.0:{port}")
    with open(project.path("workers/uniphant/web.uniphant.conf"), "a") as f:
        f.write("web_hosts=fleet.example.com, bad name\n")
    assert_clean_error(project.run(str(uuid.uuid4()), "start", "-f", script=WEB), 2,
                       "web.uniphant.conf:5: bad value for web_hosts")
    with running_page(project, db, *page_role, tmp_path, listen=f"0.0.0.0:{port}",
                      conf="web_hosts=Fleet.Example.com,10.0.0.5\n", host=f"fleet.example.com:{port}") as page:
        for host in ("attacker.example", "localhost", f"127.0.0.1:{port}", "fleet.example.com.evil"):
            status, _, data = get(page, "api/fleet", host=host)
            assert status == 403 and b"web_hosts" in data, (host, status, data)
        assert get(page, "metrics", host="attacker.example")[0] == 403
        for host in (f"FLEET.example.com:{port}", "10.0.0.5"):
            assert get(page, "api/fleet", host=host)[0] == 200, host


def terminate_sessions(db, role: str) -> None:
    """End every session of role, as a server restart does, and wait until they are gone."""
    pids = [pid for pid, in db.rows("SELECT pid FROM pg_stat_activity WHERE usename = %s", role)]
    db.rows("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE pid = ANY(%s)", pids)
    wait_for(lambda: not db.value("SELECT count(*) FROM pg_stat_activity WHERE pid = ANY(%s)", pids),
             what="the page's sessions ended")


def test_the_first_request_after_a_lost_server_succeeds(project, db, page_role, tmp_path):
    role, _ = page_role
    with running_page(project, db, *page_role, tmp_path) as page:
        scrapes = [threading.Thread(target=get, args=(page, "metrics")) for _ in range(4)]
        for thread in scrapes:
            thread.start()
        for thread in scrapes:
            thread.join()
        assert db.value("SELECT count(*) FROM pg_stat_activity WHERE usename = %s", role) >= 3  # kept
        terminate_sessions(db, role)
        worker = db.value("SELECT uniphant.add_worker('test.probe')::text")
        for path in ("api/fleet", "metrics", f"api/worker/{worker}", "api/fleet"):
            status, _, data = get(page, path)
            assert status == 200, (path, data)
        terminate_sessions(db, role)
        status, _, data = get(page, "api/scale", method="POST", body={"worker_type": "test.probe", "n": 2},
                              headers={"Content-Type": "application/json", "Authorization": f"Bearer {TOKEN}"})
        assert status == 200 and json.loads(data) == {"message": "test.probe: 2 workers for any host (added 1)"}, data
        assert db.value("SELECT count(*) FROM uniphant.workers WHERE worker_type = 'test.probe'") == 2


def test_the_page_listens_with_a_backlog_of_128(project, db, page_role, tmp_path):
    with running_page(project, db, *page_role, tmp_path) as page:
        listening = subprocess.run(["ss", "-Hltn", f"sport = :{port_of(page)}"], capture_output=True, text=True,
                                   check=True).stdout.split()
        assert listening[0] == "LISTEN" and int(listening[2]) >= 128, listening  # Send-Q: the backlog


# ---------------------------------------------------------------------------
# Slow clients, refused clients, clients that go away
# ---------------------------------------------------------------------------

def test_no_number_of_slow_clients_ends_the_page(project, db, page_role, tmp_path):
    """300 clients that each send a byte every 2 s, to a page whose open-file
    limit is 200: each is cut off at the deadline (or refused at once), and the
    page stays up and answers once they are gone."""
    with running_page(project, db, *page_role, tmp_path, nofile=200) as page:
        opened: Dict[socket.socket, float] = {}
        cut: Dict[socket.socket, float] = {}
        try:
            for _ in range(300):
                opened[connected(port_of(page))] = time.monotonic()
            request = b"GET /metrics HTTP/1.1\r\nHost: localhost\r\nX-Slow: " + b"x" * 1000
            sent = 0
            deadline = time.monotonic() + DEADLINE + 5
            while len(cut) < len(opened) and time.monotonic() < deadline:
                for sock in opened:
                    if sock not in cut:
                        with contextlib.suppress(OSError):
                            sock.send(request[sent:sent + 1])
                sent += 1
                finish = time.monotonic() + 2
                while time.monotonic() < finish and len(cut) < len(opened):
                    readable, _, _ = select.select([s for s in opened if s not in cut], [], [],
                                                   max(finish - time.monotonic(), 0))
                    for sock in readable:
                        try:
                            if sock.recv(65536):
                                continue  # a refusal's 503, before its end
                        except OSError:
                            pass
                        cut[sock] = time.monotonic()
                assert page.child.poll() is None, logged(project, page)
            assert len(cut) == len(opened), f"{len(opened) - len(cut)} slow clients not cut off"
            assert max(cut[sock] - opened[sock] for sock in opened) < DEADLINE + 3
        finally:
            for sock in opened:
                sock.close()
        # Cut off, each thread still has to see it and end before its place is free.
        wait_for(lambda: get(page, "metrics")[0] == 200, timeout=10, what="the page answering again")
        assert page.child.poll() is None
        text = logged(project, page)
        assert "Traceback" not in text and "Too many open files" not in text, text[-3000:]


def fill_the_streams(page: Page, n: int = 64) -> List[socket.socket]:
    """n open event streams, each begun."""
    streams = []
    for _ in range(n):
        sock = connected(port_of(page))
        sock.sendall(b"GET /events HTTP/1.1\r\nHost: localhost\r\n\r\n")
        streams.append(sock)
    for sock in streams:
        got = b""
        while b"event: about" not in got:
            chunk = sock.recv(65536)
            assert chunk, got
            got += chunk
    return streams


def test_a_page_refused_for_too_many_open_pages_says_why_and_tries_again(project, db, page_role, tmp_path,
                                                                           browser):
    with running_page(project, db, *page_role, tmp_path) as page:
        streams = fill_the_streams(page)
        try:
            status, headers, data = get(page, "events")
            assert status == 503 and headers["Retry-After"] == "5", headers
            assert json.loads(data) == {"error": "too many open pages (64)"}
            browser.get(page.url)
            wait_for(lambda: "trying again in" in text_of(browser, "#live"), what="the page saying why")
            assert text_of(browser, "#live").startswith("refused: too many open pages (64); trying again in ")
        finally:
            for sock in streams:
                reset(sock)
        db.rows("SELECT uniphant.add_worker('test.probe')")  # a change: the streams' next write finds them gone
        wait_for(lambda: text_of(browser, "#live") == "live", timeout=30, what="the page live again")


def test_a_client_that_goes_away_is_a_quiet_line_never_a_traceback(project, db, page_role, tmp_path):
    with running_page(project, db, *page_role, tmp_path, conf="log_level=DEBUG\n") as page:
        streams = fill_the_streams(page)
        try:
            for _ in range(50):
                sock = connected(port_of(page))
                sock.sendall(b"GET /events HTTP/1.1\r\nHost: localhost\r\n\r\n")
                reset(sock)
            sock = connected(port_of(page))
            reset(sock)  # before it asked anything
        finally:
            for sock in streams:
                reset(sock)
        assert get(page, "metrics")[0] == 200
        text = logged(project, page)
        assert "went away" in text and "Traceback" not in text, text[-3000:]


# ---------------------------------------------------------------------------
# Whatever the tables hold
# ---------------------------------------------------------------------------

def test_the_page_and_metrics_stay_bounded_whatever_the_processes_table_holds(project, db, page_role, tmp_path,
                                                                               browser):
    host = str(uuid.uuid4())
    db.rows("INSERT INTO uniphant.hosts (id, name) VALUES (%s::uuid, 'forged')", host)
    db.rows("INSERT INTO uniphant.processes (id, worker_id, host_id, worker_type, pid) "
            "SELECT gen_random_uuid(), gen_random_uuid(), %s::uuid, 'forged.t' || i, i FROM generate_series(1, 3000) i",
            host)
    desired = db.value("SELECT uniphant.add_worker('test.probe')::text")
    with running_page(project, db, *page_role, tmp_path) as page:
        status, _, data = get(page, "api/fleet")
        fleet = json.loads(data)["fleet"]
        rows = {row["worker_id"] for row in fleet["workers"]}
        assert status == 200 and len(rows) == 1000 and len(data) < 1_000_000
        total = db.value("SELECT count(*) FROM uniphant.fleet")
        assert total == 3000 + 2 and fleet["left_out"] == total - 1000
        assert desired in rows  # the desired workers first
        status, _, data = get(page, "metrics")
        series = [line for line in data.decode().splitlines() if not line.startswith("#")]
        assert status == 200 and len(series) < 30, len(series)
        assert "uniphant_processes_undesired 3001" in series  # the page is one: nobody asked for it
        assert "forged" not in data.decode()
        browser.get(page.url)
        wait_for(lambda: text_of(browser, "#left-out"), what="the page saying what it left out")
        assert text_of(browser, "#left-out").startswith(f"{total - 1000} more rows of the fleet are not listed")
