"""docs/page.md, "Seeing the fleet": the page that workers/uniphant/web.py serves, run
by a manager as README's layout has it, in a real browser (headless Chromium);
its safety rules; and its metrics, read by Prometheus' own parser."""

from __future__ import annotations

import contextlib
import http.client
import http.server
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import urllib.parse
import uuid
from typing import Dict, Iterator, NamedTuple, Optional, Tuple

import pytest

import pgserver  # dev/pgserver.py, on the path by conftest.py
import uniphant
from conftest import another_host, fleet, host_of, ops, running, with_manager
from test_uniphant import REPO, assert_clean_error, session_of, wait_for, write_worker
from test_install import readme_block, readme_blocks

pytestmark = pytest.mark.own_database  # a manager acts on every worker its database holds

TOKEN = "test-token-" + uuid.uuid4().hex
WEB = os.path.join(REPO, "workers", "uniphant", "web.py")
# What a worker role can write where operators read it: markup, a terminal's
# control sequences, and a bidirectional override.
MARKUP = "<img src=x onerror=\"document.title='pwned'\"><script>document.title='pwned'</script>"
HOSTILE = MARKUP + "\x1b]0;owned\x07\u202eesrever"


# ---------------------------------------------------------------------------
# The page of a project, and a browser to look at it
# ---------------------------------------------------------------------------

class Site(NamedTuple):
    url: str        # http://127.0.0.1:<port>/
    worker_id: str  # the page's own worker


@pytest.fixture
def page_role(make_role, db) -> Tuple[str, str]:
    """The page's own role: a worker (it is a uniphant process) and an operator."""
    role, password = make_role("page")
    db.rows("SELECT uniphant.grant_role(%s, 'operator')", role)
    return role, password


def page_files(project, db, role: str, password: str, token: Optional[str] = TOKEN,
               listen: Optional[str] = None) -> str:
    """web.py beside the manager, with its own role and keys as README lays them
    out (web.uniphant.conf, web.secrets.conf); the page's address."""
    os.makedirs(project.path("workers/uniphant"), exist_ok=True)
    shutil.copy(WEB, project.path("workers/uniphant"))
    listen = listen or f"127.0.0.1:{pgserver.free_port()}"
    project.write("workers/uniphant/web.uniphant.conf",
                  f"PGUSER={role}\nPGHOST=127.0.0.1\nPGPORT={db.env['PGPORT']}\nweb_listen={listen}\n")
    project.write(".uniphant/secrets/workers/uniphant/web.secrets.conf",
                  f"PGPASSWORD={password}\n" + (f"web_token={token}\n" if token else ""), mode=0o600,
                  base=project.home)
    return f"http://{listen}/"


def serve_page(project, db, role: str, password: str, token: Optional[str] = TOKEN) -> Site:
    """The project's manager, running the page as a worker pinned to its host."""
    with_manager(project)
    url = page_files(project, db, role, password, token)
    added = ops(project, "add", "uniphant.web", "--host", "here")
    assert added.returncode == 0, added.stderr
    page = added.stdout.strip()
    wait_for(lambda: fleet(db, page).get("state") == "running", what="the page running")
    wait_for(lambda: answer(url + "api/fleet")[0] == 200, what="the page answering")
    return Site(url, page)


@pytest.fixture
def site(project, db, page_role) -> Site:
    return serve_page(project, db, *page_role)


def answer(url: str, method: str = "GET", body: Optional[dict] = None,
           headers: Optional[Dict[str, str]] = None) -> Tuple[int, Dict[str, str], bytes]:
    """(status, headers, body) of one request."""
    parts = urllib.parse.urlsplit(url)
    connection = http.client.HTTPConnection(parts.hostname, parts.port, timeout=10)
    try:
        data = None if body is None else json.dumps(body)
        connection.request(method, parts.path or "/", body=data, headers=headers or {})
        response = connection.getresponse()
        return response.status, dict(response.getheaders()), response.read()
    except ConnectionError:
        return 0, {}, b""
    finally:
        connection.close()


def act(site: Site, verb: str, body: dict, token: Optional[str] = TOKEN,
        headers: Optional[Dict[str, str]] = None) -> Tuple[int, dict]:
    """An action as a program sends it: JSON, with the token."""
    headers = {"Content-Type": "application/json", **(headers or {})}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    status, _, data = answer(site.url + "api/" + verb, "POST", body, headers)
    return status, json.loads(data)


@pytest.fixture(scope="module")
def browser() -> Iterator:
    """Headless Chromium from Debian's packages, driven by its chromedriver."""
    chromium, driver = shutil.which("chromium"), shutil.which("chromedriver")
    if not chromium or not driver:
        pytest.skip("no Chromium here: apt-get install chromium chromium-driver (.ci/run installs them)")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    profile = tempfile.mkdtemp(prefix="uniphant-chromium-")
    for argument in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
                     "--disable-background-networking", "--disable-component-update", "--disable-sync",
                     f"--user-data-dir={profile}"):
        options.add_argument(argument)
    chrome = webdriver.Chrome(options=options, service=Service(driver))
    try:
        yield chrome
    finally:
        chrome.quit()
        shutil.rmtree(profile, ignore_errors=True)


def viewport(browser, width: int, height: int) -> None:
    browser.execute_cdp_cmd("Emulation.setDeviceMetricsOverride",
                            {"width": width, "height": height, "deviceScaleFactor": 1, "mobile": width < 700})


def shown(browser) -> Dict[str, str]:
    """The workers the page's table shows: worker id -> state."""
    return browser.execute_script(
        "return Object.fromEntries([...document.querySelectorAll('#workers tbody tr')]"
        ".map((tr) => [tr.dataset.worker, tr.dataset.state]))")


def cells(browser, worker_id: str) -> Dict[str, str]:
    """The text of each cell of a worker's row, by column."""
    return browser.execute_script(
        "const tr = document.querySelector(`#workers tbody tr[data-worker='${arguments[0]}']`);"
        "return tr ? Object.fromEntries([...tr.cells].map((td) => [td.dataset.label, td.textContent])) : {};",
        worker_id)


def text_of(browser, selector: str) -> str:
    return browser.execute_script("const e = document.querySelector(arguments[0]); return e ? e.textContent : ''",
                                  selector)


def add(project, *args: str) -> str:
    added = ops(project, "add", *args)
    assert added.returncode == 0, added.stderr
    return added.stdout.strip()


def web_module():
    """web.py, imported here for what needs no server."""
    spec = importlib.util.spec_from_file_location("uniphant_web", WEB)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# ---------------------------------------------------------------------------
# The page, live
# ---------------------------------------------------------------------------

def test_the_page_shows_the_fleet_as_ps_does_and_a_worker_added_appears_without_a_reload(
        site, project, db, browser):
    browser.get(site.url)
    wait_for(lambda: site.worker_id in shown(browser), what="the page showing itself")
    assert text_of(browser, "#managers tbody").startswith("live" + uniphant.printable(os.uname().nodename))
    browser.execute_script("window.loaded = 'once'")
    worker = add(project, "test.probe")
    wait_for(lambda: shown(browser).get(worker) == "running", what="the new worker running on the page")
    assert browser.execute_script("return window.loaded") == "once"  # the same document: no reload
    row = cells(browser, worker)
    assert row["PID"] == str(running(db, worker)) and row["type"] == "test.probe" and row["placed"] == "any"
    assert row["host id"] == host_of(project)[:8] and row["host"] == os.uname().nodename
    assert row["worker"] == worker[:8] and row["since"].endswith("s") and row["restarts"] == "0"


def test_a_worker_whose_script_raises_turns_to_backoff_with_its_history_and_last_log_lines(
        site, project, browser):
    browser.get(site.url)
    wait_for(lambda: site.worker_id in shown(browser), what="the page")
    worker = add(project, "test.probe", "--set", "mode=raise")
    wait_for(lambda: shown(browser).get(worker) == "backoff", what="the worker in backoff on the page")
    assert "RuntimeError: boom from the worker" in cells(browser, worker)["last exit"]
    browser.execute_script(f"document.querySelector(\"tr[data-worker='{worker}']\").click()")
    wait_for(lambda: "Traceback" in text_of(browser, "#detail pre.log"), what="its log lines in its detail")
    assert "boom from the worker" in text_of(browser, "#detail pre.log")
    assert "log file on this host" in text_of(browser, "#detail-body")
    history = browser.execute_script("return [...document.querySelectorAll('#detail table.history tbody tr')]"
                                      ".map((tr) => tr.cells[1].textContent)")
    assert {"starting", "running", "backoff"} <= set(history)
    assert "#worker=" + worker in browser.current_url  # a link to it opens it


def test_an_action_needs_the_token_and_works_with_it(site, project, db, browser):
    worker = add(project, "test.probe")
    browser.get(site.url + "#worker=" + worker)
    wait_for(lambda: shown(browser).get(worker) == "running", what="the worker")
    pause = "document.querySelector('#detail button[data-action=pause]').click()"
    wait_for(lambda: browser.execute_script("return !!document.querySelector('#detail button[data-action=pause]')"),
             what="its actions")
    browser.execute_script(pause)
    wait_for(lambda: "refused" in text_of(browser, "#said"), what="the refusal")
    assert "token" in text_of(browser, "#said") and fleet(db, worker)["state"] == "running"
    browser.execute_script("document.querySelector('#operate').open = true")
    browser.find_element("id", "token").send_keys(TOKEN)
    browser.execute_script(pause)
    wait_for(lambda: shown(browser).get(worker) == "paused", what="the worker paused, on the page")
    assert fleet(db, worker)["state"] == "paused"
    wait_for(lambda: running(db, worker) is None, what="its process stopped")
    assert text_of(browser, "#said") == "pause: 1 worker"


def test_a_read_only_page_offers_no_action_and_refuses_every_one(project, db, page_role, browser):
    site = serve_page(project, db, *page_role, token=None)
    worker = add(project, "test.probe")
    browser.get(site.url + "#worker=" + worker)
    wait_for(lambda: shown(browser).get(worker) == "running", what="the worker")
    wait_for(lambda: "Log" in text_of(browser, "#detail-body"), what="its detail")
    assert browser.execute_script("return document.querySelector('#operate').hidden "
                                  "&& !document.querySelector('#readonly').hidden "
                                  "&& !document.querySelector('#detail button[data-action]')")
    for verb, body in [("stop", {"worker_id": worker}), ("add", {"worker_type": "test.probe"}),
                       ("scale", {"worker_type": "test.probe", "n": 0})]:
        status, refused = act(site, verb, body, token=TOKEN)
        assert status == 403 and "read-only" in refused["error"], refused
    assert fleet(db, worker)["state"] == "running" and db.value("SELECT count(*) FROM workers") == 2


ATTACK = """<!doctype html><title>attack</title>
<form id="form" method="post" action="{target}" enctype="text/plain">
<input name='{{"worker_type": "test.probe", "x": "' value='"}}'></form>
<script>
fetch("{target}", {{method: "POST", mode: "no-cors", headers: {{"Content-Type": "text/plain"}},
                    body: '{{"worker_type": "test.probe"}}'}})
  .then(() => fetch("{target}", {{method: "POST", headers: {{"Content-Type": "application/json",
                                  "Authorization": "Bearer guessed"}}, body: "{{}}"}}))
  .catch(() => {{}}).finally(() => document.getElementById("form").submit());
</script>"""


@contextlib.contextmanager
def another_site(html: str) -> Iterator[str]:
    """Another origin (another host name and port) that serves html; its address."""
    class Attack(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802
            self.send_response(200)
            self.send_header("Content-Type", "text/html")
            self.end_headers()
            self.wfile.write(html.encode())

        def log_message(self, *args):
            pass
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Attack)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://localhost:{server.server_address[1]}/"
    finally:
        server.shutdown()
        server.server_close()


def test_another_site_cannot_act_through_an_operators_browser_nor_with_the_token(site, project, db, browser):
    worker = add(project, "test.probe")
    wait_for(lambda: fleet(db, worker).get("state") == "running", what="the worker")
    with another_site(ATTACK.format(target=site.url + "api/stop")) as attacker:
        browser.get(attacker)
        wait_for(lambda: browser.current_url == site.url + "api/stop", what="the form sent")
        assert "cross-site request is refused" in browser.page_source
        origin = attacker.rstrip("/")
    assert db.value("SELECT count(*) FROM workers WHERE worker_type = 'test.probe'") == 1
    # The token does not make another origin's request good (nor a request a browser marks cross-site).
    for headers in ({"Origin": origin}, {"Sec-Fetch-Site": "cross-site"}, {"Sec-Fetch-Site": "same-site"}):
        status, refused = act(site, "stop", {"worker_id": worker}, headers=headers)
        assert status == 403 and "cross-site" in refused["error"], (headers, refused)
    assert act(site, "stop", {"worker_id": worker}, token="wrong-" + TOKEN)[0] == 401
    assert act(site, "stop", {"worker_id": worker}, token=None)[0] == 401
    assert fleet(db, worker)["state"] == "running"
    assert act(site, "stop", {"worker_id": worker}, headers={"Origin": site.url.rstrip("/")}) == \
        (200, {"message": "stop: 1 worker"})
    assert db.value("SELECT count(*) FROM workers WHERE worker_id = %s::uuid", worker) == 0


def test_texts_from_the_database_and_from_workers_show_as_text_never_as_markup(
        site, project, db, browser, make_role):
    project.write("workers/test/shout.py", (
        "from uniphant import main\n"
        f"def work(config, logger, connection):\n    logger.error({HOSTILE!r})\n    raise RuntimeError({HOSTILE!r})\n"
        "if __name__ == '__main__':\n    main(work)\n"))
    shouter = add(project, "test.shout")
    role, password = make_role("painter")  # a worker role forges a host name and a worker type
    forger, forged, host = session_of(db, role, password, str(uuid.uuid4())), str(uuid.uuid4()), str(uuid.uuid4())
    try:
        forger.cursor().execute("SELECT register_host(%s::uuid, %s)", (host, HOSTILE))
        forger.cursor().execute("SELECT register_process(%s::uuid, %s::uuid, %s, 1)", (forged, host, HOSTILE))
        browser.get(site.url + "#worker=" + shouter)
        wait_for(lambda: shown(browser).get(shouter) == "backoff" and forged in shown(browser), what="both rows")
        wait_for(lambda: "RuntimeError" in text_of(browser, "#detail pre.log"), what="the shouter's log")
        shown_forged = cells(browser, forged)
        assert shown_forged["type"] == shown_forged["host"] == uniphant.printable(HOSTILE)  # as ps shows it
        assert uniphant.printable(HOSTILE) in cells(browser, shouter)["last exit"]
        assert f"ERROR uniphant.test.shout[" in text_of(browser, "#detail pre.log")
        assert uniphant.printable(HOSTILE) in text_of(browser, "#detail pre.log")
        assert browser.title == "uniphant fleet"
        assert browser.execute_script("return document.querySelectorAll('img, svg, iframe, object, embed').length "
                                      "+ document.querySelectorAll('script').length") == 1  # the page's own
        status, _, data = answer(site.url + "api/fleet")
        exact = {row["worker_id"]: row for row in json.loads(data)["fleet"]["workers"]}
        assert status == 200 and exact[forged]["worker_type"] == exact[forged]["host"] == HOSTILE
        add(project, "test.probe", "--host", host)  # a desired worker on the forged host: its name is a label
        families = metrics(site)
        forged_host = {s.labels["host"] for s in families["uniphant_workers"].samples if s.labels["host_id"] == host}
        assert forged_host == {uniphant.printable(HOSTILE)}
        assert value(families, "uniphant_processes_undesired") == 1  # the forged process: counted, not labelled
    finally:
        forger.close()


SCREENSHOT_WORKERS = {  # worker type: what its worker function does
    "app.mailer": "time.sleep(0.1)",
    "app.thumbnails": "time.sleep(0.1)",
    "app.billing": "raise ConnectionError('payment gateway: connection refused')",
}


def test_a_screenshot_of_the_fleet_page_at_1280_by_800(site, project, db, browser):
    """For the README: a fleet of three types, one worker failing, one paused."""
    for worker_type, body in SCREENSHOT_WORKERS.items():
        project.write(f"workers/{worker_type.replace('.', '/')}.py", "import time\nfrom uniphant import main\n\n"
                      f"def work(config, logger, connection):\n    {body}\n\n"
                      "if __name__ == '__main__':\n    main(work)\n")
    assert ops(project, "scale", "app.mailer", "3").returncode == 0
    assert ops(project, "scale", "app.thumbnails", "2").returncode == 0
    billing = add(project, "app.billing")
    paused = add(project, "app.thumbnails", "--host", "here")
    wait_for(lambda: fleet(db, paused).get("state") == "running", what="the worker to pause")
    assert ops(project, "pause", paused).returncode == 0
    viewport(browser, 1280, 800)
    try:
        browser.get(site.url)
        wait_for(lambda: sorted(shown(browser).values()) == ["backoff", "paused"] + ["running"] * 6
                 and (fleet(db, billing).get("restarts") or 0) >= 2, what="the fleet on the page")
        path = os.path.join(REPO, "bench", "results", "page.png")
        os.makedirs(os.path.dirname(path), exist_ok=True)
        assert browser.save_screenshot(path)
        with open(path, "rb") as f:
            assert f.read(24)[16:] == (1280).to_bytes(4, "big") + (800).to_bytes(4, "big")  # PNG's width, height
        viewport(browser, 390, 844)  # a phone: each worker a card, nothing wider than the screen
        assert browser.execute_script("return document.documentElement.scrollWidth") <= 390
    finally:
        browser.execute_cdp_cmd("Emulation.clearDeviceMetricsOverride", {})


# ---------------------------------------------------------------------------
# Metrics
# ---------------------------------------------------------------------------

def metrics(site: Site) -> dict:
    """/metrics, read by Prometheus' own parser: family name -> family."""
    from prometheus_client.parser import text_string_to_metric_families

    status, headers, data = answer(site.url + "metrics")
    assert status == 200 and headers["Content-Type"].startswith("text/plain; version=0.0.4")
    return {family.name: family for family in text_string_to_metric_families(data.decode())}


def value(families: dict, name: str, **labels: str) -> Optional[float]:
    """The value of the first sample of family name whose labels include labels."""
    return next((s.value for s in families[name].samples if labels.items() <= s.labels.items()), None)


def test_metrics_count_the_fleet_the_test_built(site, project, db, tmp_path):
    here = host_of(project)
    other = another_host(project, tmp_path)
    try:
        manager = with_manager(other)  # a host whose manager then stops: down
        assert other.run(manager, "stop", script="workers/uniphant/manager.py").returncode == 0
    finally:
        other.cleanup()
    write_worker(project, "crash", "raise RuntimeError('boom')")
    workers = [add(project, "test.probe", "--host", "here") for _ in range(3)]
    crashing = add(project, "test.crash")
    assert ops(project, "pause", workers[2]).returncode == 0
    wait_for(lambda: [fleet(db, w).get("state") for w in workers] == ["running", "running", "paused"]
             and (fleet(db, crashing).get("restarts") or 0) >= 2, what="the fleet built")
    families = metrics(site)
    assert value(families, "uniphant_workers", state="running", worker_type="test.probe", host_id=here) == 2
    assert value(families, "uniphant_workers", state="paused", worker_type="test.probe", host_id=here) == 1
    assert value(families, "uniphant_workers", state="running", worker_type="uniphant.web") == 1
    assert families["uniphant_worker_restarts"].type == "counter"
    restarts = {s.labels["worker_id"]: s.value for s in families["uniphant_worker_restarts"].samples}
    assert restarts[crashing] >= 2 and restarts[workers[0]] == 0 and workers[2] not in restarts  # paused
    live = {worker for worker, in db.rows("SELECT worker_id::text FROM fleet WHERE heartbeat_at IS NOT NULL")}
    ages = {s.labels["worker_id"]: s.value for s in families["uniphant_worker_heartbeat_age_seconds"].samples}
    assert set(ages) - {crashing} == live - {crashing}  # it comes and goes
    assert all(0 <= age < 60 for age in ages.values())
    assert value(families, "uniphant_managers_live") == 1
    assert value(families, "uniphant_manager_up", host_id=here) == 1
    assert value(families, "uniphant_manager_up", host_id=host_of(other)) == 0
    # Desired: neither paused nor done; running: under its manager.
    assert value(families, "uniphant_desired_workers", worker_type="test.probe") == 3 - 1
    assert value(families, "uniphant_running_workers", worker_type="test.probe") == 2
    assert value(families, "uniphant_desired_workers", worker_type="test.crash") == 1
    assert 0 <= value(families, "uniphant_notification_lag_seconds") < 0.5
    assert 0 <= value(families, "uniphant_notification_queue_usage_ratio") < 0.01


# ---------------------------------------------------------------------------
# Safety: where it listens, the token, the role, the headers, the files
# ---------------------------------------------------------------------------

def test_the_page_listens_on_127_0_0_1_unless_web_listen_says_otherwise(project, db, page_role, worker_id):
    assert web_module()._listen_address({}) == ("127.0.0.1", 8765)
    port = pgserver.free_port()
    url = page_files(project, db, *page_role, listen=f"127.0.0.2:{port}")
    child = project.popen(worker_id, "start", "-f", script="workers/uniphant/web.py")
    wait_for(lambda: answer(url + "api/fleet")[0] == 200, what="the page on 127.0.0.2")
    assert answer(f"http://127.0.0.1:{port}/api/fleet")[0] == 0  # refused: nothing listens there
    child.terminate()
    child.communicate(timeout=15)
    for bad in ("8765", "localhost", "127.0.0.1:0", "127.0.0.1:65536", "::1:8765", "127.0.0.1:http"):
        page_files(project, db, *page_role, listen=bad)
        assert_clean_error(project.run(worker_id, "start", "-f", script="workers/uniphant/web.py"), 2,
                           "web.uniphant.conf:4: bad value for web_listen")


def test_a_page_that_cannot_listen_says_why_in_its_state(site, project, db):
    second = add(project, "uniphant.web", "--host", "here")  # the same web_listen as the first
    wait_for(lambda: fleet(db, second).get("state") == "backoff", what="the second page failing")
    assert "the page cannot listen on 127.0.0.1:" in fleet(db, second)["last_exit"]
    assert "Address already in use" in fleet(db, second)["last_exit"]
    assert fleet(db, site.worker_id)["state"] == "running"


def test_web_token_is_taken_only_from_a_secrets_conf(project, db, page_role, worker_id):
    page_files(project, db, *page_role, token=None)
    conf = project.path("workers/uniphant/web.uniphant.conf")
    with open(conf, "a") as f:
        f.write(f"web_token={TOKEN}\n")
    started = project.run(worker_id, "start", "-f", script="workers/uniphant/web.py")
    assert_clean_error(started, 2, "web.uniphant.conf:5: web_token is a credential", "secrets.conf")
    assert TOKEN not in started.stderr + started.stdout
    assert_clean_error(ops(project, "add", "uniphant.web", "--set", f"web_token={TOKEN}"), 2,
                       "looks like a credential", "secrets.conf")
    page_files(project, db, *page_role, token="short")
    assert_clean_error(project.run(worker_id, "start", "-f", script="workers/uniphant/web.py"), 2,
                       "web.secrets.conf:2: bad value for web_token: expected 16 or more")


def test_the_page_logs_in_as_an_operator_never_as_a_manager_or_a_superuser(project, db, make_role, worker_id):
    page_files(project, db, "unused", "unused")
    os.remove(project.path("workers/uniphant/web.uniphant.conf"))  # the environment's role: a superuser
    assert_clean_error(project.run(worker_id, "start", "-f", script="workers/uniphant/web.py"), 1,
                       "is a superuser: give the page a role of its own")
    for part, refusal in (("manager", "has the manager part"), (None, "lacks the operator part")):
        role, password = make_role("page")
        if part:
            db.rows("SELECT uniphant.grant_role(%s, 'operator'), uniphant.grant_role(%s, %s)", role, role, part)
        page_files(project, db, role, password)
        assert_clean_error(project.run(worker_id, "start", "-f", script="workers/uniphant/web.py"), 1, refusal)
    assert db.value("SELECT count(*) FROM processes WHERE worker_id = %s::uuid", worker_id) == 0


def test_the_readmes_page_runs_as_typed_with_the_manager_as_another_role(project, db, make_role):
    """README's SQL and commands as typed, in its layout: the manager and the page
    in one directory, each with its own role in files named after its script."""
    sql = "".join(readme_blocks("Running the page", "sql", doc="docs/page.md"))
    password = re.search(r"PASSWORD '([^']+)'", sql).group(1)
    conn = db.connect()
    conn.execute_simple(sql)
    conn.close()
    try:
        manager_role, manager_password = make_role("manager")
        db.rows("SELECT uniphant.grant_role(%s, 'manager')", manager_role)
        project.write("workers/uniphant/manager.uniphant.conf",
                      f"PGUSER={manager_role}\nPGHOST=127.0.0.1\nPGPORT={db.env['PGPORT']}\n")
        project.write(".uniphant/secrets/workers/uniphant/manager.secrets.conf", f"PGPASSWORD={manager_password}\n",
                      mode=0o600, base=project.home)
        url = page_files(project, db, "app_page", password)
        with_manager(project)
        shutil.copy(os.path.join(REPO, "uniphant.py"), project.root)  # vendored, as README's commands have it
        shutil.copy(os.path.join(REPO, "uniphant_fleet.py"), project.root)
        done = subprocess.run(["bash", "-e", "-c", readme_block("Running the page", "sh", doc="docs/page.md")], cwd=project.root,
                              env=dict(project.env, PATH=os.path.dirname(sys.executable) + os.pathsep +
                                       os.environ["PATH"]), capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stderr
        page = done.stdout.splitlines()[0]
        wait_for(lambda: fleet(db, page).get("state") == "running", what="the page running")
        wait_for(lambda: answer(url)[0] == 200, what="the page answering")
        roles = dict(db.rows("SELECT worker_type, role::text FROM processes"))
        assert roles == {"uniphant.manager": manager_role, "uniphant.web": "app_page"}
    finally:
        project.cleanup()
        db.rows("DELETE FROM processes WHERE role = 'app_page'")
        db.rows("DROP OWNED BY app_page")
        db.rows("DROP ROLE app_page")


def test_every_answer_carries_the_security_headers_and_a_foreign_host_name_is_refused(site):
    for path in ("", "events", "api/fleet", "api/worker/" + site.worker_id, "metrics", "nothing", "api/worker/x"):
        headers = stream_headers(site.url + path) if path == "events" else answer(site.url + path)[1]
        policy = headers["Content-Security-Policy"]
        assert "default-src 'none'" in policy and "frame-ancestors 'none'" in policy, path
        assert "'unsafe-inline'" not in policy and "script-src 'sha256-" in policy
        assert headers["X-Frame-Options"] == "DENY" and headers["X-Content-Type-Options"] == "nosniff", path
    assert answer(site.url, "OPTIONS")[1]["X-Frame-Options"] == "DENY"  # the server's own errors too
    # A name rebound to 127.0.0.1 (DNS rebinding) gets nothing from a page on a loopback address.
    status, _, data = answer(site.url + "api/fleet", headers={"Host": "attacker.example"})
    assert status == 403 and b"localhost only" in data
    assert answer(site.url + "api/fleet", headers={"Host": f"localhost:{site.url.rsplit(':', 1)[1]}"})[0] == 200


def stream_headers(url: str) -> Dict[str, str]:
    parts = urllib.parse.urlsplit(url)
    connection = http.client.HTTPConnection(parts.hostname, parts.port, timeout=10)
    try:
        connection.request("GET", parts.path)
        response = connection.getresponse()
        assert response.status == 200 and response.getheader("Content-Type") == "text/event-stream"
        assert response.readline() == b"retry: 2000\n"
        return dict(response.getheaders())
    finally:
        connection.close()


def state_with_a_log(directory, worker: str) -> str:
    """A state directory with log/app.echo/<worker>.log of 300 lines."""
    os.makedirs(os.path.join(directory, "log", "app.echo"))
    with open(os.path.join(directory, "log", "app.echo", f"{worker}.log"), "w") as f:
        f.writelines(f"line {i}\n" for i in range(300))
    return str(directory)


@pytest.mark.unit
def test_a_log_file_shows_its_last_lines(tmp_path):
    worker = str(uuid.uuid4())
    state = state_with_a_log(tmp_path, worker)
    assert web_module()._read_log(state, "app.echo", worker) == [f"line {i}" for i in range(100, 300)]


@pytest.mark.unit
@pytest.mark.parametrize("planted", ["log", "log/app.echo", "log/app.echo/{worker}.log"])
def test_a_log_file_is_never_read_through_a_symlink(tmp_path, planted):
    worker = str(uuid.uuid4())
    state, real = state_with_a_log(tmp_path / "state", worker), state_with_a_log(tmp_path / "real", worker)
    path = os.path.join(state, planted.format(worker=worker))
    (shutil.rmtree if os.path.isdir(path) else os.unlink)(path)
    os.symlink(os.path.join(real, planted.format(worker=worker)), path)
    assert web_module()._read_log(state, "app.echo", worker) is None


@pytest.mark.unit
def test_a_log_that_is_a_fifo_or_of_no_worker_type_is_not_read(tmp_path):
    worker = str(uuid.uuid4())
    state = state_with_a_log(tmp_path, worker)
    assert web_module()._read_log(state, "../log/app.echo", worker) is None  # a type from the database
    os.unlink(os.path.join(state, "log", "app.echo", f"{worker}.log"))
    os.mkfifo(os.path.join(state, "log", "app.echo", f"{worker}.log"))
    assert web_module()._read_log(state, "app.echo", worker) is None  # not waited on
