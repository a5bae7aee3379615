"""uniphant: background workers whose every process is a row in PostgreSQL.

Write a worker as a script below a directory named ``workers``::

    from uniphant import main

    def work(config, logger, connection):
        logger.info("hello")        # called every `interval` seconds

    if __name__ == "__main__":
        main(work)

and run it on any host with a worker id of your choosing::

    python workers/examples/hello.py 8c7e...-uuid start [-f]   # also: stop, restart, status

While it runs, ``processes`` holds one row for it; deleting that row stops it
(within milliseconds), from anywhere.  ``connection`` is a pg8000 DB-API
connection in autocommit mode; a worker function that loops for long should
call ``alive(config, connection)`` and return when it is false.

Configuration comes from ``uniphant.conf`` files in the script's directory and
every directory up to the project root (the parent of ``workers``), then from
``~/.uniphant/secrets/<same relative path>/secrets.conf``; lines are
``key=value``.  PostgreSQL is found as libpq would: ``PGHOST``, ``PGPORT``,
``PGDATABASE``, ``PGUSER``, ``PGPASSWORD``, ``PGPASSFILE``, ``PGSSLMODE``,
``PGCONNECT_TIMEOUT`` from the files, else the environment, else the defaults.

The whole runtime is this file, on the standard library and pg8000 (Linux).
The database objects are in ``schema.sql``.  See README.md for the rest.
"""

from __future__ import annotations

# Only what every command needs is imported here: `status` and `stop` must
# start fast.  signal, logging, socket, random and pg8000 are imported where used.
import errno
import fcntl
import gc
import os
import select
import struct
import sys
import time

TYPE_CHECKING = False
if TYPE_CHECKING:
    import logging
    import socket
    from typing import Any, Callable, Dict, List, Optional, Tuple

    Config = Dict[str, Any]
    WorkerFunction = Callable[[Config, logging.Logger, Any], None]

__all__ = [
    "main", "alive", "connect_to_database", "setup_config", "setup_logging",
    "register_host", "register_process", "keepalive", "disconnect",
]

# Exit codes of the command line.
EXIT_OK, EXIT_FAILURE, EXIT_USAGE, EXIT_NOT_RUNNING = 0, 1, 2, 3


class UniphantError(Exception):
    """A failure to report in one line, without a traceback: exit 1."""

    exit_code = EXIT_FAILURE


class ConfigError(UniphantError, ValueError):
    """Bad configuration or usage: exit 2."""

    exit_code = EXIT_USAGE


# ---------------------------------------------------------------------------
# Configuration
# ---------------------------------------------------------------------------

RESERVED_KEYS = frozenset({
    "root_dir", "script_dir", "worker_type", "lock_file", "host_id_file", "host_id",
    "process_id", "host_name", "foreground", "worker_id", "parent_pid",
})

LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
SSL_MODES = ("disable", "allow", "prefer", "require", "verify-ca", "verify-full")

# Runtime keys and their defaults; config files hold them as text.
RUNTIME_DEFAULTS: Dict[str, Any] = {
    "log_level": "INFO", "interval": 1.0, "stop_timeout": 10.0, "stale_after": 60.0,
}


def _seconds(value: str, minimum: float, inclusive: bool) -> float:
    try:
        number = float(value)
    except ValueError:
        number = float("nan")
    if not (number >= minimum if inclusive else number > minimum) or number == float("inf"):
        raise ValueError(f"expected a number of seconds {'>=' if inclusive else '>'} {minimum:g}")
    return number


def _port_list(value: str) -> str:
    for port in value.split(","):
        if not port.strip().isdigit() or not 0 < int(port) < 65536:
            raise ValueError("expected a port number (or a comma-separated list)")
    return value


def _connect_timeout(value: str) -> str:
    if not value.isdigit():
        raise ValueError("expected a whole number of seconds")
    return value


def _choice(choices: Tuple[str, ...], fold: Callable[[str], str]) -> Callable[[str], str]:
    def check(value: str) -> str:
        if fold(value) not in choices:
            raise ValueError(f"expected one of {', '.join(choices)}")
        return fold(value)
    return check


# Each checker returns the value to store, or raises ValueError saying what is wrong.
_CHECKS: Dict[str, Callable[[str], Any]] = {
    "log_level": _choice(LOG_LEVELS, str.upper),
    "interval": lambda v: _seconds(v, 0, inclusive=True),
    "stop_timeout": lambda v: _seconds(v, 0, inclusive=False),
    "stale_after": lambda v: _seconds(v, 0, inclusive=False),
    "PGPORT": _port_list,
    "PGCONNECT_TIMEOUT": _connect_timeout,
    "PGSSLMODE": _choice(SSL_MODES, str.lower),
}


def _shorten(text: str, limit: int = 60) -> str:
    return repr(text if len(text) <= limit else text[:limit] + "...")


def _config_entries(path: str, private: bool = False) -> List[Tuple[str, str, str]]:
    """(where, key, value) for each setting in a config file; [] if there is no file.

    ``private`` files must not be readable by group or others.
    """
    try:
        with open(path, "rb") as f:
            if private and os.fstat(f.fileno()).st_mode & 0o077:
                raise ConfigError(f"{path}: readable by group or others; "
                                  f"make it private with: chmod 600 {path}")
            data = f.read()
    except FileNotFoundError:
        return []
    except OSError as e:
        raise ConfigError(f"{path}: cannot read: {e.strerror}") from None
    if data.startswith(b"\xef\xbb\xbf"):
        data = data[3:]
    entries = []
    for number, raw in enumerate(data.split(b"\n"), 1):
        where = f"{path}:{number}"
        try:
            line = raw.decode("utf-8").strip()
        except UnicodeDecodeError:
            raise ConfigError(f"{where}: not valid UTF-8") from None
        if "\0" in line:
            raise ConfigError(f"{where}: contains a NUL byte")
        if not line or line.startswith("#"):
            continue
        key, sep, value = line.partition("=")
        key, value = key.strip(), value.strip()
        if not sep:
            raise ConfigError(f"{where}: expected key=value, got {_shorten(line)}")
        if not key:
            raise ConfigError(f"{where}: empty key before '='")
        entries.append((where, key, value))
    return entries


def _settings(entries: List[Tuple[str, str, str]]) -> Dict[str, Any]:
    """The settings of config entries, enforcing the rules: no reserved key, no key
    twice, a valid value for every key uniphant reads."""
    found: Dict[str, Tuple[Any, str]] = {}  # key -> (value, where)
    for where, key, value in entries:
        if key in RESERVED_KEYS:
            raise ConfigError(f"{where}: {key!r} is reserved and cannot be set in a config file")
        if key in found:
            raise ConfigError(f"{where}: {key!r} is already defined at {found[key][1]}")
        found[key] = (_checked(key, value, where), where)
    return {key: value for key, (value, _) in found.items()}


def _checked(key: str, value: str, where: str) -> Any:
    """value as uniphant uses it, if key is one it reads; a ConfigError saying where, if bad."""
    check = _CHECKS.get(key)
    if check is None:
        return value
    try:
        return check(value)
    except ValueError as e:
        raise ConfigError(f"{where}: bad value for {key}: {e}, got {_shorten(value)}") from None


def parse_key_value_format(conf_file: str) -> Dict[str, Any]:
    """The key-value pairs of one config file ({} if it does not exist)."""
    return _settings(_config_entries(conf_file))


def _config_dirs(config: Config) -> List[str]:
    """script_dir and each directory above it, up to and including root_dir."""
    directory, dirs = config["script_dir"], []
    while True:
        dirs.append(directory)
        if directory == config["root_dir"]:
            return dirs
        directory = os.path.dirname(directory)


def _secret_entries(config: Config) -> List[Tuple[str, str, str]]:
    secrets = os.path.join(os.path.expanduser("~"), ".uniphant", "secrets")
    entries = []
    for directory in _config_dirs(config):
        relative = os.path.relpath(directory, config["root_dir"])
        path = os.path.normpath(os.path.join(secrets, relative, "secrets.conf"))
        entries += _config_entries(path, private=True)
    return entries


def read_secret_config_files(config: Config) -> Dict[str, Any]:
    """The settings of ~/.uniphant/secrets/<each config directory relative to root_dir>/secrets.conf."""
    return _settings(_secret_entries(config))


def read_config_files(config: Config) -> Dict[str, Any]:
    """Every setting of the uniphant.conf hierarchy and of the secrets files."""
    entries = [entry for directory in _config_dirs(config)
               for entry in _config_entries(os.path.join(directory, "uniphant.conf"))]
    return _settings(entries + _secret_entries(config))


def get_calling_file_path() -> str:
    """The absolute path of the script that called into this module."""
    frame = sys._getframe(1)
    here = os.path.abspath(__file__)
    while frame is not None and os.path.abspath(frame.f_code.co_filename) == here:
        frame = frame.f_back
    if frame is None or frame.f_code.co_filename.startswith("<"):
        raise ConfigError("uniphant.main() must be called from a worker script file")
    return os.path.abspath(frame.f_code.co_filename)


def get_script_details() -> Tuple[str, str, str]:
    """(root_dir, script_dir, worker_type) of the calling script."""
    path = get_calling_file_path()
    script_dir = os.path.dirname(path)
    workers = script_dir
    while os.path.basename(workers) != "workers":
        parent = os.path.dirname(workers)
        if parent == workers:
            raise ConfigError(f"{path}: a worker script must be inside a directory named 'workers'")
        workers = parent
    relative = os.path.splitext(os.path.relpath(path, workers))[0]
    return os.path.dirname(workers), script_dir, relative.replace(os.sep, ".")


def get_pid_file_path(config: Config) -> str:
    return os.path.join(config["root_dir"], "pid", config["worker_type"], f"{config['worker_id']}.pid")


def _log_file_path(config: Config) -> str:
    return os.path.join(config["root_dir"], "log", config["worker_type"], f"{config['worker_id']}.log")


def setup_config() -> Config:
    """The configuration of the calling worker: the reserved keys, then the files' keys."""
    root_dir, script_dir, worker_type = get_script_details()
    config: Config = {
        "root_dir": root_dir,
        "script_dir": script_dir,
        "worker_type": worker_type,
        "lock_file": os.path.join(root_dir, ".lock"),
        "host_id_file": os.path.join(root_dir, ".host_id"),
    }
    config.update(RUNTIME_DEFAULTS)
    config.update(read_config_files(config))
    config["host_id"] = get_or_create_host_id(config["lock_file"], config["host_id_file"])
    config["process_id"] = _new_uuid()
    config["host_name"] = os.uname().nodename
    return config


# ---------------------------------------------------------------------------
# Host identity
# ---------------------------------------------------------------------------

def _canonical_uuid(text: str) -> Optional[str]:
    """text as a lower-case hyphenated UUID, in any form uuid.UUID() accepts; else None."""
    digits = text.strip().lower()
    if digits.startswith("urn:uuid:"):
        digits = digits[9:]
    digits = digits.strip("{}").replace("-", "")
    if len(digits) != 32 or not all(c in "0123456789abcdef" for c in digits):
        return None
    return f"{digits[:8]}-{digits[8:12]}-{digits[12:16]}-{digits[16:20]}-{digits[20:]}"


def _new_uuid() -> str:
    """A random (version 4) UUID, without the import cost of the uuid module."""
    octets = bytearray(os.urandom(16))
    octets[6] = octets[6] & 0x0F | 0x40
    octets[8] = octets[8] & 0x3F | 0x80
    return _canonical_uuid(octets.hex())


def is_valid_uuid(text: Any) -> bool:
    return _canonical_uuid(str(text)) is not None


def _read_host_id(host_id_file: str) -> Optional[str]:
    try:
        with open(host_id_file, encoding="utf-8", errors="replace") as f:
            text = f.read().strip()
    except FileNotFoundError:
        return None
    host_id = _canonical_uuid(text)
    if host_id is None:
        raise UniphantError(f"{host_id_file} does not hold a UUID; remove it to make a new host id")
    return host_id


def get_or_create_host_id(lock_file: str, host_id_file: str) -> str:
    """This host's id from host_id_file, created once under a lock on lock_file."""
    host_id = _read_host_id(host_id_file)
    if host_id is not None:
        return host_id
    fd = os.open(lock_file, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o644)
    try:
        fcntl.lockf(fd, fcntl.LOCK_EX)
        host_id = _read_host_id(host_id_file)  # a concurrent first start may have won
        if host_id is None:
            host_id = _new_uuid()
            temporary = f"{host_id_file}.{os.getpid()}"
            with open(temporary, "w", encoding="utf-8") as f:
                f.write(host_id + "\n")
                f.flush()
                os.fsync(f.fileno())
            os.replace(temporary, host_id_file)
    finally:
        os.close(fd)
    return host_id


# ---------------------------------------------------------------------------
# Logging
# ---------------------------------------------------------------------------

def _real_dir(root_dir: str, *names: str) -> str:
    """root_dir/names..., created as needed; a symlink or a file on the way is an error."""
    path = root_dir
    for name in names:
        path = os.path.join(path, name)
        try:
            os.mkdir(path, 0o775)
        except FileExistsError:
            pass
        except OSError as e:
            raise UniphantError(f"cannot create directory {path}: {e.strerror}") from None
        if os.path.islink(path) or not os.path.isdir(path):
            raise UniphantError(f"{path} must be a directory, not a symlink or a file")
    return path


def _open_own_file(path: str, flags: int) -> int:
    """os.open() for a file of uniphant's own: never through a symlink, one-line errors.

    FileNotFoundError passes unchanged, for the callers to whom it means "none".
    """
    try:
        return os.open(path, flags | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
    except FileNotFoundError:
        raise
    except OSError as e:
        reason = "it is a symlink" if e.errno == errno.ELOOP else e.strerror
        raise UniphantError(f"cannot open {path}: {reason}") from None


def _open_for_append(path: str) -> int:
    return _open_own_file(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT)


def _prepare_paths(config: Config) -> None:
    """Make the log and PID directories and check the log file, before anything starts."""
    _real_dir(config["root_dir"], "pid", config["worker_type"])
    _real_dir(config["root_dir"], "log", config["worker_type"])
    os.close(_open_for_append(_log_file_path(config)))


def setup_logging(config: Config) -> logging.Logger:
    """The worker's logger: root_dir/log/<worker_type>/<worker_id>.log, and stdout in the foreground."""
    import logging

    _real_dir(config["root_dir"], "log", config["worker_type"])
    logger = logging.getLogger(f"uniphant.{config['worker_type']}")
    logger.setLevel(config["log_level"])
    logger.propagate = False
    for handler in list(logger.handlers):
        logger.removeHandler(handler)
        handler.close()
    formatter = logging.Formatter("%(asctime)s %(levelname)s %(name)s[%(process)d]: %(message)s")
    stream = os.fdopen(_open_for_append(_log_file_path(config)), "a", encoding="utf-8")
    handlers: List[logging.Handler] = [logging.StreamHandler(stream)]
    if config["foreground"]:
        handlers.append(logging.StreamHandler(sys.stdout))
    for handler in handlers:
        handler.setFormatter(formatter)
        logger.addHandler(handler)
    return logger


# ---------------------------------------------------------------------------
# Database
# ---------------------------------------------------------------------------

class ConnectError(UniphantError):
    """No connection could be made; permanent when retrying cannot help (authentication)."""

    def __init__(self, message: str, permanent: bool = False) -> None:
        super().__init__(message)
        self.permanent = permanent


class _Wire:
    """The socket pg8000 talks through, posing as the file its makefile() returns.

    pg8000 reads through a BufferedReader, which may hold a notification that
    arrived right behind a reply while select() reports the socket idle.  This
    buffer is ours, so pending() can tell, and waiting never misses a stop.
    """

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self._in = bytearray()
        self._out = bytearray()

    def makefile(self, mode: str = "rwb") -> "_Wire":
        return self

    def read(self, size: int) -> bytes:
        while len(self._in) < size:
            chunk = self.sock.recv(max(size - len(self._in), 65536))
            if not chunk:
                break
            self._in += chunk
        data = bytes(self._in[:size])
        del self._in[:size]
        return data

    def write(self, data: bytes) -> None:
        self._out += data

    def flush(self) -> None:
        data, self._out = self._out, bytearray()
        self.sock.sendall(data)

    def close(self) -> None:
        self.sock.close()

    def fileno(self) -> int:
        return self.sock.fileno()

    def pending(self) -> bool:
        """Whether bytes are waiting in a buffer, where select() cannot see them."""
        ssl_pending = getattr(self.sock, "pending", None)
        return bool(self._in) or bool(ssl_pending and ssl_pending())

    def readable(self) -> bool:
        return self.pending() or bool(select.select([self.sock], [], [], 0)[0])


def _pg_setting(config: Config, key: str) -> str:
    """A connection key from the config files (checked when read), else the
    environment ('' if unset)."""
    value = str(config.get(key) or "").strip()
    if value:
        return value
    value = os.environ.get(key, "").strip()
    return _checked(key, value, "the environment") if value else ""


def _default_socket_dir() -> str:
    return "/var/run/postgresql" if os.path.isdir("/var/run/postgresql") else "/tmp"


def _targets(config: Config) -> List[Tuple[str, int]]:
    """The (host, port) pairs to try in order, as libpq reads PGHOST and PGPORT."""
    hosts = [h.strip() for h in _pg_setting(config, "PGHOST").split(",") if h.strip()]
    hosts = hosts or [_default_socket_dir()]
    ports = [int(p) for p in (_pg_setting(config, "PGPORT") or "5432").split(",")]
    if len(ports) == 1:
        ports *= len(hosts)
    if len(ports) != len(hosts):
        raise ConfigError(f"PGPORT names {len(ports)} ports for {len(hosts)} hosts in PGHOST")
    return list(zip(hosts, ports))


def _split_pgpass_line(line: str) -> List[str]:
    """host, port, database, user and password; the password may hold unescaped colons."""
    fields, field, escaped = [], "", False
    for char in line:
        if escaped:
            field, escaped = field + char, False
        elif char == "\\":
            escaped = True
        elif char == ":" and len(fields) < 4:
            fields.append(field)
            field = ""
        else:
            field += char
    return fields + [field]


def _pgpass_password(config: Config, host: str, port: int, database: str, user: str) -> Optional[str]:
    """The password for this connection from the password file, as libpq finds it."""
    path = _pg_setting(config, "PGPASSFILE") or os.path.join(os.path.expanduser("~"), ".pgpass")
    if host.startswith("/"):
        host = "localhost" if host == _default_socket_dir() else host
    try:
        with open(path, encoding="utf-8") as f:
            if os.fstat(f.fileno()).st_mode & 0o077:
                return None  # libpq ignores a password file others can read
            lines = f.read().splitlines()
    except (OSError, UnicodeDecodeError):
        return None
    wanted = (host, str(port), database, user)
    for line in lines:
        if not line.strip() or line.startswith("#"):
            continue
        fields = _split_pgpass_line(line)
        if len(fields) == 5 and all(f in ("*", w) for f, w in zip(fields, wanted)):
            return fields[4]
    return None


def _ssl_context(mode: str):
    """As libpq: verify-* check the server's certificate against ~/.postgresql/root.crt
    (else the system's authorities); the other modes encrypt without verifying."""
    import ssl

    if mode in ("verify-ca", "verify-full"):
        root = os.path.join(os.path.expanduser("~"), ".postgresql", "root.crt")
        context = ssl.create_default_context(cafile=root if os.path.exists(root) else None)
        context.check_hostname = mode == "verify-full"
    else:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    return context


def _open_wire(host: str, port: int, sslmode: str, timeout: Optional[float]) -> _Wire:
    """A connected socket, with SSL negotiated as PGSSLMODE asks (sockets never use SSL)."""
    import socket

    if host.startswith("/"):
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.settimeout(timeout)
            sock.connect(f"{host}/.s.PGSQL.{port}")
        except BaseException:
            sock.close()
            raise
        return _Wire(sock)
    sock = socket.create_connection((host, port), timeout)
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        if sslmode != "disable":
            sock.sendall(struct.pack("!ii", 8, 80877103))  # SSLRequest
            if sock.recv(1) == b"S":
                sock = _ssl_context(sslmode).wrap_socket(sock, server_hostname=host)
            elif sslmode in ("require", "verify-ca", "verify-full"):
                raise ConnectError(f"the server at {host}:{port} does not support SSL "
                                   f"(PGSSLMODE={sslmode})", permanent=True)
    except BaseException:
        sock.close()
        raise
    return _Wire(sock)


def connect_to_database(config: Config):
    """A pg8000 connection in autocommit mode whose application_name is the process id.

    Tries each host of PGHOST in turn; raises ConnectError with one line naming
    where it tried and why it failed.
    """
    import pwd

    import pg8000.dbapi

    user = _pg_setting(config, "PGUSER") or pwd.getpwuid(os.geteuid()).pw_name
    database = _pg_setting(config, "PGDATABASE") or user
    sslmode = _pg_setting(config, "PGSSLMODE") or "prefer"
    timeout: Optional[float] = int(_pg_setting(config, "PGCONNECT_TIMEOUT") or 10)
    timeout = max(timeout, 2) if timeout else None  # libpq: 0 waits forever, 2 s at least
    failures = []
    for host, port in _targets(config):
        where = f"socket {host}/.s.PGSQL.{port}" if host.startswith("/") else f"{host}:{port}"
        password = _pg_setting(config, "PGPASSWORD") or _pgpass_password(config, host, port, database, user)
        try:
            wire = _open_wire(host, port, sslmode, timeout)
            connection = pg8000.dbapi.connect(
                user=user, database=database, password=password, sock=wire,
                ssl_context=False, application_name=config["process_id"])
        except (OSError, pg8000.dbapi.Error) as e:
            reason, permanent = _connect_failure(e, timeout)
            if permanent:
                raise ConnectError(f"could not connect to PostgreSQL at {where}: {reason}",
                                   permanent=True) from None
            failures.append(f"{where}: {reason}")
            continue
        wire.sock.settimeout(None)  # the timeout is for connecting, not for the worker's queries
        connection.autocommit = True
        return connection
    raise ConnectError("could not connect to PostgreSQL at " + "; ".join(failures))


def _sql_error(error: BaseException) -> Tuple[str, str]:
    """(SQLSTATE, message) of a pg8000 DatabaseError."""
    fields = error.args[0] if error.args and isinstance(error.args[0], dict) else {}
    return fields.get("C", ""), fields.get("M", str(error))


def _connect_failure(error: BaseException, timeout: Optional[float]) -> Tuple[str, bool]:
    """Why a connection attempt failed, and whether retrying cannot help."""
    import socket

    import pg8000.dbapi

    # pg8000 says goodbye to a server that refused it; when that write fails,
    # the server's answer is somewhere in the context of the write's error.
    answer: Optional[BaseException] = error
    while answer is not None:
        if isinstance(answer, pg8000.dbapi.DatabaseError):
            code, message = _sql_error(answer)
            return message, code.startswith("28") or code == "3D000"
        answer = answer.__context__
    cause = error.__cause__ if isinstance(error.__cause__, OSError) else error
    if isinstance(cause, socket.timeout):
        return f"timed out after {timeout:g} s", False
    reason = getattr(cause, "strerror", None) or str(cause) or type(cause).__name__
    return reason, "password" in reason  # pg8000: the server asked for one and none was given


def _wire_of(connection) -> Optional[_Wire]:
    # pg8000 keeps the socket it was given as _usock; only ours are _Wires.
    wire = getattr(connection, "_usock", None)
    return wire if isinstance(wire, _Wire) else None


def _channel(config: Config) -> str:
    """The channel a deleted process row is announced on (schema.sql: processes_notify_stop)."""
    return "uniphant_" + config["process_id"].replace("-", "")


def _scalar(connection, sql: str, params: tuple = ()) -> Any:
    """The first value of one of our API calls; an SQL error becomes a UniphantError."""
    import pg8000.dbapi

    cursor = connection.cursor()
    try:
        cursor.execute(sql, params)
        row = cursor.fetchone() if cursor.description else None
        return row[0] if row else None
    except pg8000.dbapi.DatabaseError as e:
        code, message = _sql_error(e)
        if code == "UN001":
            raise UniphantError(message) from None
        hint = "; is schema.sql loaded?" if code in ("42883", "42P01") else ""
        raise UniphantError(f"database error {code}: {message}{hint}") from None
    finally:
        cursor.close()


def register_host(config: Config, connection) -> None:
    _scalar(connection, "SELECT register_host(%s::uuid, %s)", (config["host_id"], config["host_name"]))


def _listen(config: Config, connection) -> None:
    # The channel is built from hex digits of our own process id: safe to format.
    _scalar(connection, f"LISTEN {_channel(config)}")


def register_process(config: Config, connection) -> None:
    """Register this process for its worker, then listen for the deletion of its row.

    Raises UniphantError naming the running process when another one runs the worker.
    """
    _scalar(connection,
            "SELECT register_process(%s::uuid, %s::uuid, %s, %s, make_interval(secs => %s))",
            (config["worker_id"], config["host_id"], config["worker_type"], os.getpid(),
             float(config["stale_after"])))
    _listen(config, connection)


def keepalive(connection) -> bool:
    """Record a heartbeat; false when the process row is gone and the worker must stop."""
    return bool(_scalar(connection, "SELECT keepalive()"))


def _close_quietly(connection) -> None:
    try:
        connection.close()
    except Exception:
        pass  # a dead connection cannot even say goodbye


def disconnect(connection) -> None:
    """Remove this process's row, then close the connection."""
    try:
        _scalar(connection, "SELECT disconnect()")
    finally:
        _close_quietly(connection)


# ---------------------------------------------------------------------------
# Process management
# ---------------------------------------------------------------------------

termination_requested = False
_termination_signal = 0


def signal_handler(sig: int, frame: Any) -> None:
    global termination_requested, _termination_signal
    termination_requested, _termination_signal = True, sig


def is_pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # it exists, and belongs to another user
    return True


def is_parent_alive(parent_pid: int) -> bool:
    # An orphan is adopted by init or a subreaper: its parent PID changes.
    return os.getppid() == parent_pid


# struct flock on Linux: l_type, l_whence, l_start, l_len, l_pid (and padding).
_FLOCK = "hhqqi4x"
_pid_file_fd: Optional[int] = None


def get_pid_for_running_process(pid_file: str) -> Optional[int]:
    """The PID holding the lock on pid_file, or None: a file whose lock is free is stale.

    The PID comes from the kernel (F_GETLK), not from the file's contents.
    """
    try:
        fd = _open_own_file(pid_file, os.O_RDONLY)
    except FileNotFoundError:
        return None
    try:
        query = struct.pack(_FLOCK, fcntl.F_WRLCK, os.SEEK_SET, 0, 0, 0)
        lock_type, _, _, _, pid = struct.unpack(_FLOCK, fcntl.fcntl(fd, fcntl.F_GETLK, query))
    finally:
        # Closing drops any POSIX lock this process holds on the file: never call
        # this on the PID file of the running process itself.
        os.close(fd)
    return None if lock_type == fcntl.F_UNLCK else pid


def _lock_pid_file(config: Config, pid_file: str) -> bool:
    """Take the PID file's lock for the life of this process; false if another holds it.

    Its directory is made by _prepare_paths().  lockf() locks are not inherited
    by children the worker forks, so the lock dies with this process and nothing else.
    """
    global _pid_file_fd
    fd = _open_own_file(pid_file, os.O_RDWR | os.O_CREAT)
    try:
        fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
        os.close(fd)
        if e.errno in (errno.EACCES, errno.EAGAIN):
            return False
        raise
    os.ftruncate(fd, 0)
    os.write(fd, f"{os.getpid()}\n{config['process_id']}\n".encode())
    _pid_file_fd = fd
    return True


def _release_pid_file() -> None:
    """Empty the PID file on the way out, so that its stale PID misleads no one."""
    if _pid_file_fd is not None:
        os.ftruncate(_pid_file_fd, 0)


def _process_id_in(pid_file: str) -> Optional[str]:
    """The process id that the PID file's holder wrote on its second line."""
    try:
        with open(pid_file, encoding="ascii", errors="replace") as f:
            lines = f.read(200).splitlines()
    except OSError:
        return None
    return lines[1] if len(lines) > 1 and is_valid_uuid(lines[1]) else None


def _wait_for_exit(pid_file: str, pid: int, timeout: float) -> bool:
    """Wait until pid no longer holds the PID file's lock; false on timeout."""
    deadline = time.monotonic() + timeout
    pause = 0.001
    while get_pid_for_running_process(pid_file) == pid:
        if time.monotonic() >= deadline:
            return False
        time.sleep(pause)
        pause = min(pause * 2, 0.02)
    return True


def _signal_holder(pid_file: str, pid: int, sig: int) -> bool:
    """Send sig to pid if, and only if, it holds pid_file's lock; whether it was sent.

    A pidfd pins the process before the lock is checked again, so the signal
    cannot reach another process that has reused the PID in between.
    """
    import signal

    try:
        pidfd = os.pidfd_open(pid)
    except ProcessLookupError:
        return False
    except (AttributeError, OSError):  # no pidfds (before Linux 5.3): a narrower check
        if get_pid_for_running_process(pid_file) != pid:
            return False
        os.kill(pid, sig)
        return True
    try:
        if get_pid_for_running_process(pid_file) != pid:
            return False
        signal.pidfd_send_signal(pidfd, sig)
        return True
    except ProcessLookupError:
        return False  # it exited meanwhile
    finally:
        os.close(pidfd)


def stop_running_process(pid_file: str, timeout: float = 10.0) -> Optional[int]:
    """Stop the worker holding pid_file: SIGTERM, then SIGKILL after timeout seconds.

    Returns the signal that ended it, or None if it was not running.  Only the
    holder of the PID file's lock is ever signalled.
    """
    import signal

    pid = get_pid_for_running_process(pid_file)
    if pid is None:
        return None
    _signal_holder(pid_file, pid, signal.SIGTERM)
    if _wait_for_exit(pid_file, pid, timeout):
        return signal.SIGTERM
    if not _signal_holder(pid_file, pid, signal.SIGKILL):
        return signal.SIGTERM  # it went just in time
    _wait_for_exit(pid_file, pid, 10.0)
    return signal.SIGKILL


def _close_inherited_fds(keep: int) -> None:
    try:
        fds = [int(name) for name in os.listdir("/proc/self/fd")]
    except OSError:
        fds = list(range(3, os.sysconf("SC_OPEN_MAX")))
    for fd in fds:
        if fd > 2 and fd != keep:
            try:
                os.close(fd)
            except OSError:
                pass


def _detach(config: Config, keep_fd: int) -> None:
    """Become a daemon (PEP 3143): new session, no controlling terminal, clean slate.

    Runs in the child of the first fork; returns in the grandchild.
    """
    os.setsid()
    if os.fork():
        os._exit(0)  # the session leader goes, so the daemon can never reacquire a terminal
    os.chdir(config["script_dir"])
    os.umask(0o002)
    _close_inherited_fds(keep_fd)
    null = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(null, fd)
    if null > 2:
        os.close(null)


def _tell(fd: int, message: str) -> None:
    """Report to the waiting `start` command, which may have gone: the daemon runs on regardless."""
    try:
        os.write(fd, message.encode("utf-8", "replace"))
    except BrokenPipeError:
        pass
    os.close(fd)


def start_daemon(config: Config, connection, worker_function: WorkerFunction, pid_file: str) -> int:
    """Start the worker as a daemon; return 0 once it has registered its row.

    Raises UniphantError with the daemon's reason when it could not start.  The
    caller's connection proved the database reachable; it is closed here, and
    the daemon connects anew after forking.
    """
    connection.close()
    ready_r, ready_w = os.pipe()
    child = os.fork()
    if child:
        os.close(ready_w)
        with os.fdopen(ready_r, "rb") as pipe:
            report = pipe.read().decode("utf-8", "replace")
        os.waitpid(child, 0)
        word, _, rest = report.partition(" ")
        if word != "ready":
            raise UniphantError(rest or "the daemon exited before it was ready")
        print(f"{_describe(config)} started with PID {rest}.")
        return EXIT_OK
    os.close(ready_r)
    code = EXIT_FAILURE
    try:
        _detach(config, ready_w)
        code = _daemon_main(config, worker_function, pid_file, ready_w)
    finally:
        import logging

        logging.shutdown()
        os._exit(code)  # never return into the caller's code: that is the parent's


def _daemon_main(config: Config, worker_function: WorkerFunction, pid_file: str, ready_w: int) -> int:
    """Lock, connect and register, tell the waiting parent how that went, then run."""
    try:
        if not _lock_pid_file(config, pid_file):
            raise UniphantError(_already_running(config, get_pid_for_running_process(pid_file)))
        setup_logging(config)
        connection = connect_to_database(config)
        try:
            register_process(config, connection)
        except BaseException:
            _close_quietly(connection)
            raise
    except Exception as e:
        _tell(ready_w, f"error {e}")
        return EXIT_FAILURE
    _tell(ready_w, f"ready {os.getpid()}")
    return run(config, connection, worker_function, pid_file)


# ---------------------------------------------------------------------------
# The run loop
# ---------------------------------------------------------------------------

_next_heartbeat = 0.0
_wakeup_fd: Optional[int] = None  # readable when a signal arrived
_parent_fd: Optional[int] = None  # a pidfd of the parent: readable when it exits
_poll_parent = False  # foreground without a pidfd: look at the parent every _PARENT_POLL

# Reconnection backoff: doubles from the first delay up to the cap, each wait
# drawn at random from its upper half so a fleet does not retry in step.
_BACKOFF_FIRST, _BACKOFF_CAP = 0.05, 2.0
# How often to look for the parent's death where pidfds are not available.
_PARENT_POLL = 0.25


def _heartbeat_period(config: Config) -> float:
    """Seconds between heartbeats: once per interval, at most once a second, and
    often enough that the row never looks stale to another host."""
    return min(max(config["interval"], 1.0), config["stale_after"] / 3)


def _local_stop_reason(config: Config) -> Optional[str]:
    """A reason to stop that needs no database: a signal, or the parent's death."""
    import signal

    if termination_requested:
        return f"{signal.Signals(_termination_signal).name} received"
    if config["foreground"] and not is_parent_alive(config["parent_pid"]):
        return "the parent process has gone"
    return None


def _stop_reason(config: Config, connection) -> Optional[str]:
    """Why the worker must stop now, or None.  One heartbeat per period at most."""
    global _next_heartbeat
    reason = _local_stop_reason(config)
    if reason is not None:
        return reason
    wire = _wire_of(connection)
    if wire is not None and wire.readable():
        connection.execute_simple("")  # lets pg8000 read the waiting notification
    channel = _channel(config)
    deleted = "its process row was deleted"
    if any(n[1] == channel for n in connection.notifications):
        return deleted
    now = time.monotonic()
    if now >= _next_heartbeat:
        _next_heartbeat = now + _heartbeat_period(config)
        if not keepalive(connection):
            return deleted
    return None


def alive(config: Config, connection) -> bool:
    """Whether the worker should go on: no signal, parent alive (foreground), row present.

    Cheap enough to call in a tight loop: it writes a heartbeat at most once per
    interval and asks the database nothing else unless a message has arrived.
    """
    return _stop_reason(config, connection) is None


def _watch_for_wakeups(config: Config) -> None:
    """Make signals and the parent's death wake _wait()."""
    import signal

    global _wakeup_fd, _parent_fd, _poll_parent
    read_fd, write_fd = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
    signal.set_wakeup_fd(write_fd)
    _wakeup_fd = read_fd
    if config["foreground"]:
        try:
            _parent_fd = os.pidfd_open(config["parent_pid"])
        except (AttributeError, OSError):
            _poll_parent = True  # no pidfd support, or already gone


def _wait(seconds: float, connection=None) -> None:
    """Sleep up to seconds; wake early for a signal, a database message or the parent's death."""
    fds = [_wakeup_fd]
    if _parent_fd is not None:
        fds.append(_parent_fd)
    if _poll_parent:
        seconds = min(seconds, _PARENT_POLL)
    wire = _wire_of(connection)
    if wire is not None:
        if wire.pending():
            return
        fds.append(wire.fileno())
    if seconds > 0:
        select.select(fds, [], [], seconds)
    try:
        while os.read(_wakeup_fd, 512):
            pass
    except BlockingIOError:
        pass


def _serve(config: Config, connection, worker_function: WorkerFunction, logger: logging.Logger) -> str:
    """Call the worker function every interval until it must stop; return why."""
    next_call = 0.0
    while True:
        reason = _stop_reason(config, connection)
        if reason is not None:
            return reason
        now = time.monotonic()
        if now >= next_call:
            worker_function(config, logger, connection)
            next_call = time.monotonic() + config["interval"]
        else:
            _wait(min(next_call, _next_heartbeat) - now, connection)


def _is_lost(connection) -> bool:
    try:
        connection.execute_simple("")
    except Exception:
        return True
    return False


def _reconnect(config: Config, logger: logging.Logger, error: BaseException):
    """A new connection with the same process id, or None if told to stop meanwhile.

    Waits with capped, jittered backoff; logs the loss and the recovery once each.
    """
    import random

    global _next_heartbeat
    logger.warning("lost the database connection (%s); reconnecting",
                   str(error) or type(error).__name__)
    lost_at, delay = time.monotonic(), _BACKOFF_FIRST
    while _local_stop_reason(config) is None:
        try:
            connection = connect_to_database(config)
            try:
                _listen(config, connection)
            except Exception:
                _close_quietly(connection)
                raise
        except ConnectError as e:
            if e.permanent:
                raise
        except Exception:
            pass  # the server is still coming up; try again
        else:
            logger.info("database connection restored after %.1f s", time.monotonic() - lost_at)
            _next_heartbeat = 0.0  # ask at once whether the row survived the outage
            return connection
        _wait(random.uniform(delay / 2, delay))
        delay = min(delay * 2, _BACKOFF_CAP)
    return None


def run(config: Config, connection, worker_function: WorkerFunction, pid_file: str) -> int:
    """Run the worker until it must stop; remove its row and return the exit code.

    The caller has registered the process and holds the lock on pid_file, which
    is emptied on the way out.  A lost connection is not a failure: the loop
    reconnects and resumes if the row is still there.  An exception from the
    worker function is: exit 1.
    """
    import logging

    logger = logging.getLogger(f"uniphant.{config['worker_type']}")
    _watch_for_wakeups(config)
    logger.info("worker %s started: process %s, PID %d, host %s",
                config["worker_id"], config["process_id"], os.getpid(), config["host_name"])
    status = EXIT_OK
    try:
        while connection is not None:
            try:
                logger.info("stopping: %s", _serve(config, connection, worker_function, logger))
                break
            except Exception as e:
                if not _is_lost(connection):
                    logger.exception("the worker function failed")
                    status = EXIT_FAILURE
                    break
                _close_quietly(connection)
                connection = _reconnect(config, logger, e)
        if connection is None:
            logger.info("stopping: %s", _local_stop_reason(config))
    except UniphantError as e:
        logger.error("stopping: %s", e)
        status = EXIT_FAILURE
    finally:
        _leave(connection, logger)
        _release_pid_file()
    return status


def _leave(connection, logger: logging.Logger) -> None:
    if connection is not None:
        try:
            disconnect(connection)
            return
        except Exception as e:
            logger.debug("disconnect failed: %s", e)
    logger.warning("could not remove the process row (database unreachable); "
                   "the next start takes it over")


# ---------------------------------------------------------------------------
# The command line
# ---------------------------------------------------------------------------

COMMANDS = ("start", "restart", "stop", "status")

_HELP = """Run, stop or query one uniphant worker process.

positional arguments:
  worker_id         the worker's UUID
  command           start, restart, stop or status

options:
  -h, --help        show this help message and exit
  -f, --foreground  run in the foreground, logging to stdout too"""


class UsageError(ConfigError):
    """A bad command line: the usage goes with the message."""


def _usage(prog: str) -> str:
    return f"usage: {prog} [-h] [-f] worker_id {{{','.join(COMMANDS)}}}"


def _parse_arguments(prog: str, argv: List[str]) -> Tuple[str, str, bool]:
    """(worker_id, command, foreground) from the command line.

    Hand-made rather than argparse, whose import would double the time `status` takes.
    """
    positional, foreground = [], False
    for arg in argv:
        if arg in ("-h", "--help"):
            print(f"{_usage(prog)}\n\n{_HELP}")
            sys.exit(EXIT_OK)
        elif arg in ("-f", "--foreground"):
            foreground = True
        elif arg.startswith("-") and arg != "-":
            raise UsageError(f"unrecognized option {_shorten(arg)}")
        else:
            positional.append(arg)
    if len(positional) != 2:
        raise UsageError(f"expected a worker_id and a command, got {len(positional)} arguments")
    worker_id, command = _canonical_uuid(positional[0]), positional[1]
    if worker_id is None:
        raise UsageError(f"worker_id must be a UUID, got {_shorten(positional[0])}")
    if command not in COMMANDS:
        raise UsageError(f"invalid command {_shorten(command)} (choose from {', '.join(COMMANDS)})")
    return worker_id, command, foreground


def _describe(config: Config) -> str:
    return f"Worker {config['worker_type']} with ID {config['worker_id']}"


def _already_running(config: Config, pid: Optional[int]) -> str:
    return f"{_describe(config)} is already running with PID {pid}."


def _status(config: Config, pid_file: str) -> int:
    pid = get_pid_for_running_process(pid_file)
    if pid is None:
        print(f"{_describe(config)} is not running.")
        return EXIT_NOT_RUNNING
    print(f"{_describe(config)} is running with PID {pid}.")
    return EXIT_OK


def _stop(config: Config, pid_file: str) -> int:
    import signal

    process_id = _process_id_in(pid_file)
    ended_by = stop_running_process(pid_file, config["stop_timeout"])
    if ended_by is None:
        print(f"{_describe(config)} is not running.")
        return EXIT_FAILURE
    if ended_by == signal.SIGKILL:
        print(f"{_describe(config)} did not stop within {config['stop_timeout']:g} s "
              f"of SIGTERM: sent SIGKILL.", file=sys.stderr)
        if process_id is not None:
            _remove_row_of(config, process_id)
    print(f"{_describe(config)} stopped.")
    return EXIT_OK


def _remove_row_of(config: Config, process_id: str) -> None:
    """Remove the row of a killed process, connecting under its process id."""
    try:
        disconnect(connect_to_database(dict(config, process_id=process_id)))
    except Exception as e:
        print(f"Its process row stays until the next start takes it over: {e}", file=sys.stderr)


def _start(config: Config, worker_function: WorkerFunction, pid_file: str) -> int:
    import signal

    signal.signal(signal.SIGTERM, signal_handler)
    signal.signal(signal.SIGINT, signal_handler)
    pid = get_pid_for_running_process(pid_file)
    if pid is not None:
        print(_already_running(config, pid), file=sys.stderr)
        return EXIT_FAILURE
    _prepare_paths(config)
    if config["foreground"] and not _lock_pid_file(config, pid_file):
        print(_already_running(config, get_pid_for_running_process(pid_file)), file=sys.stderr)
        return EXIT_FAILURE
    connection = connect_to_database(config)
    # What exists now, pg8000's many modules above all, lives until exit: kept
    # out of the collector's way, it makes every collection, and the exit of
    # this process and of the daemon, some 30 ms cheaper.
    gc.freeze()
    try:
        register_host(config, connection)
        if not config["foreground"]:
            return start_daemon(config, connection, worker_function, pid_file)
        setup_logging(config)
        register_process(config, connection)
    except BaseException:
        _close_quietly(connection)
        raise
    return run(config, connection, worker_function, pid_file)


def main(worker_function: WorkerFunction) -> None:
    """The command line of a worker script: <worker_id> {start,restart,stop,status} [-f].

    SIGTERM and SIGINT are caught (signal_handler) once a start begins.
    """
    prog = os.path.basename(sys.argv[0])
    try:
        config = setup_config()
        worker_id, command, foreground = _parse_arguments(prog, sys.argv[1:])
        config.update(worker_id=worker_id, foreground=foreground,
                      parent_pid=os.getppid() if foreground else None)
        pid_file = get_pid_file_path(config)
        if command == "status":
            code = _status(config, pid_file)
        elif command == "stop":
            code = _stop(config, pid_file)
        else:
            if command == "restart" and get_pid_for_running_process(pid_file) is not None:
                _stop(config, pid_file)
            code = _start(config, worker_function, pid_file)
    except UniphantError as e:
        if isinstance(e, UsageError):
            print(_usage(prog), file=sys.stderr)
        print(f"{prog}: error: {e}", file=sys.stderr)
        code = e.exit_code
    except OSError as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        code = EXIT_FAILURE
    sys.exit(code)
