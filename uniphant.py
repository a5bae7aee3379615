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
# start fast.  signal, logging, socket, threading, random and pg8000 are
# imported where they are used.
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

# The version of schema.sql this file needs (uniphant_schema_version()).
SCHEMA_VERSION = 2


class UniphantError(Exception):
    """A failure to report in one line, without a traceback: exit 1."""

    exit_code = EXIT_FAILURE


class ConfigError(UniphantError, ValueError):
    """Bad configuration or usage: exit 2."""

    exit_code = EXIT_USAGE


def _reason(error: BaseException) -> str:
    """An exception as a user should read it: its message, else its type's name."""
    fields = error.args[0] if error.args and isinstance(error.args[0], dict) else None
    if fields is not None and "M" in fields:  # pg8000's DatabaseError: the server's message
        return fields["M"]
    return str(error).strip() or type(error).__name__


def _explain(error: BaseException) -> str:
    """An exception in one line: uniphant's own as their message, others with their type."""
    text, name = _reason(error), type(error).__name__
    return text if isinstance(error, UniphantError) or text == name else f"{name}: {text}"


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

# No duration may exceed a day: larger values are typing mistakes, and some
# (1e400 is infinity) would break the waits they set.
_MAX_SECONDS = 86400


def _is_decimal(value: str) -> bool:
    """Whether value is a plain decimal number in ASCII digits: "2", "0.5", ".5".

    float() also takes "nan", "1e400", "1_000" and the digits of every script,
    and str.isdigit() takes superscripts: none of them is a setting.
    """
    whole, _, fraction = value.partition(".")
    digits = whole + fraction
    return bool(digits) and all("0" <= c <= "9" for c in digits)


def _seconds(minimum: float, above: bool = False) -> Callable[[str], float]:
    """A check for a number of seconds from minimum (exclusive if above) to a day."""
    def check(value: str) -> float:
        number = float(value) if _is_decimal(value) else -1.0
        if not (number > minimum if above else number >= minimum) or number > _MAX_SECONDS:
            raise ValueError(f"expected a number of seconds {'>' if above else '>='} "
                             f"{minimum:g} and <= {_MAX_SECONDS}")
        return number
    return check


def _is_whole(value: str, low: int, high: int) -> bool:
    return value.isascii() and value.isdigit() and low <= int(value) <= high


def _port_list(value: str) -> str:
    if not all(_is_whole(port.strip(), 1, 65535) for port in value.split(",")):
        raise ValueError("expected a port number from 1 to 65535 (or a comma-separated list)")
    return value


def _connect_timeout(value: str) -> str:
    if not _is_whole(value, 0, _MAX_SECONDS):
        raise ValueError(f"expected a whole number of seconds from 0 to {_MAX_SECONDS}")
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
    "interval": _seconds(0),
    "stop_timeout": _seconds(0, above=True),
    # A heartbeat every stale_after / 3 seconds, and never more than one a second.
    "stale_after": _seconds(3),
    "PGPORT": _port_list,
    "PGCONNECT_TIMEOUT": _connect_timeout,
    "PGSSLMODE": _choice(SSL_MODES, str.lower),
}


def _shorten(text: str, limit: int = 60) -> str:
    return repr(text if len(text) <= limit else text[:limit] + "...")


def _config_entries(path: str, private: bool = False) -> List[Tuple[str, str, str]]:
    """(where, key, value) for each setting in a config file; [] if there is no file.

    ``private`` files must not be readable by group or others.  No error shows a
    line's text: in a secrets file, any line may be a password.
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
            raise ConfigError(f"{where}: expected key=value, but the line has no '='")
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
        raise ConfigError(f"{where}: bad value for {key}: {e}") from None


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


def _home() -> Optional[str]:
    """The user's home directory, or None where there is none (a container's
    arbitrary user ID with no passwd entry and no HOME)."""
    home = os.path.expanduser("~")
    return None if home == "~" else home


def _secret_entries(config: Config) -> List[Tuple[str, str, str]]:
    home = _home()
    if home is None:
        return []
    secrets = os.path.join(home, ".uniphant", "secrets")
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


def _workers_dir(path: str) -> str:
    """The nearest ancestor of path named `workers`."""
    workers = os.path.dirname(path)
    while os.path.basename(workers) != "workers":
        parent = os.path.dirname(workers)
        if parent == workers:
            raise ConfigError(f"{path}: a worker script must be inside a directory named 'workers'")
        workers = parent
    return workers


def _worker_type(workers: str, path: str) -> str:
    return os.path.splitext(os.path.relpath(path, workers))[0].replace(os.sep, ".")


def get_script_details() -> Tuple[str, str, str]:
    """(root_dir, script_dir, worker_type) of the calling script."""
    path = get_calling_file_path()
    workers = _workers_dir(path)
    return os.path.dirname(workers), os.path.dirname(path), _worker_type(workers, path)


def _scripts_of_type(root_dir: str, worker_type: str) -> List[str]:
    """Every Python script below root_dir/workers whose worker type is worker_type:
    `a.b.c` may be workers/a/b/c.py, workers/a/b.c.py, workers/a.b/c.py or workers/a.b.c.py."""
    parts = worker_type.split(".")
    found = []
    for joins in range(2 ** (len(parts) - 1)):  # each way to join the parts with / or .
        name = parts[0]
        for i, part in enumerate(parts[1:]):
            name += ("/" if joins >> i & 1 else ".") + part
        path = os.path.join(root_dir, "workers", name + ".py")
        if os.path.isfile(path):
            found.append(path)
    return found


def _refuse_shared_type(config: Config) -> None:
    """Two scripts of one worker type would share a PID file and a log: refuse to start either."""
    path = get_calling_file_path()
    others = [p for p in _scripts_of_type(config["root_dir"], config["worker_type"])
              if not os.path.samefile(p, path)]
    if others:
        raise ConfigError(f"{path} and {others[0]} are both worker type "
                          f"{config['worker_type']!r}: rename one of them")


def get_pid_file_path(config: Config) -> str:
    return os.path.join(config["root_dir"], "pid", config["worker_type"], f"{config['worker_id']}.pid")


def _log_file_path(config: Config) -> str:
    return os.path.join(config["root_dir"], "log", config["worker_type"], f"{config['worker_id']}.log")


def _script_config() -> Config:
    """The keys that locate the calling worker's files; no config file is read."""
    root_dir, script_dir, worker_type = get_script_details()
    return {
        "root_dir": root_dir,
        "script_dir": script_dir,
        "worker_type": worker_type,
        "lock_file": os.path.join(root_dir, ".lock"),
        "host_id_file": os.path.join(root_dir, ".host_id"),
    }


def setup_config() -> Config:
    """The configuration of the calling worker: the reserved keys, then the files' keys."""
    config = _script_config()
    config.update(RUNTIME_DEFAULTS)
    config.update(read_config_files(config))
    for key in ("PGPORT", "PGCONNECT_TIMEOUT", "PGSSLMODE"):
        _pg_setting(config, key)  # a bad value in the environment fails here, before anything starts
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


def _write_atomically(path: str, text: str) -> None:
    """Write path whole or not at all (a full disk leaves no half-written file behind)."""
    temporary = f"{path}.{os.getpid()}"
    try:
        with open(temporary, "x", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(temporary, path)
    except BaseException:
        if os.path.lexists(temporary):
            os.unlink(temporary)
        raise


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
            _write_atomically(host_id_file, host_id + "\n")
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
            if os.path.islink(path) or not os.path.isdir(path):
                raise UniphantError(f"{path} must be a directory, not a symlink or a file") from None
        except OSError as e:
            raise UniphantError(f"cannot create directory {path}: {e.strerror}") from None
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


def _open_log_stream(config: Config):
    """The log file, opened for appending (its directory made again if it was removed)."""
    _real_dir(config["root_dir"], "log", config["worker_type"])
    fd = _open_own_file(_log_file_path(config), os.O_WRONLY | os.O_APPEND | os.O_CREAT)
    return os.fdopen(fd, "a", encoding="utf-8")


def _prepare_paths(config: Config) -> None:
    """Make the log and PID directories and check the log file, before anything starts."""
    _real_dir(config["root_dir"], "pid", config["worker_type"])
    _open_log_stream(config).close()


def setup_logging(config: Config) -> logging.Logger:
    """The worker's logger: root_dir/log/<worker_type>/<worker_id>.log, and stdout in the foreground."""
    import logging

    logger = _logger(config)
    logger.setLevel(config["log_level"])
    logger.propagate = False
    for handler in list(logger.handlers):
        logger.removeHandler(handler)
        handler.close()
    formatter = logging.Formatter("%(asctime)s %(levelname)s %(name)s[%(process)d]: %(message)s")
    _runtime.log_handler = logging.StreamHandler(_open_log_stream(config))
    handlers: List[logging.Handler] = [_runtime.log_handler]
    if config["foreground"]:
        handlers.append(logging.StreamHandler(sys.stdout))
    for handler in handlers:
        handler.setFormatter(formatter)
        logger.addHandler(handler)
    return logger


def _logger(config: Config) -> logging.Logger:
    import logging

    return logging.getLogger(f"uniphant.{config['worker_type']}")


def _reopen_log(config: Config) -> None:
    """Reopen the log file (on SIGHUP): a file rotated away or removed is made anew."""
    logger, handler = _logger(config), _runtime.log_handler
    if handler is None:
        return
    try:
        stream = _open_log_stream(config)
    except (UniphantError, OSError) as e:
        logger.error("SIGHUP: cannot reopen the log file, still writing to the old one: %s", _reason(e))
        return
    handler.setStream(stream).close()
    logger.info("SIGHUP: reopened the log file")


# ---------------------------------------------------------------------------
# Database
# ---------------------------------------------------------------------------

class ConnectError(UniphantError):
    """No connection could be made; permanent when retrying cannot help (authentication)."""

    def __init__(self, message: str, permanent: bool = False) -> None:
        super().__init__(message)
        self.permanent = permanent


class _Refused(UniphantError):
    """register_process() refused: another process runs the worker (SQLSTATE in code)."""

    def __init__(self, message: str, code: str) -> None:
        super().__init__(message)
        self.code = code


class _SchemaMissing(UniphantError):
    """The database lacks a function or table of schema.sql."""


class _SessionChanged(UniphantError):
    """The worker function changed who its session is: the runtime cannot act on it."""


def _readable(fd: int, timeout: float = 0.0) -> bool:
    """Whether fd has input, waiting up to timeout seconds (poll: any descriptor number)."""
    poller = select.poll()
    poller.register(fd, select.POLLIN)
    return bool(poller.poll(int(timeout * 1000)))


class _Wire:
    """The socket pg8000 talks through, posing as the file its makefile() returns.

    pg8000 reads through a BufferedReader, which may hold a notification that
    arrived right behind a reply while poll() reports the socket idle.  This
    buffer is ours, so pending() can tell, and waiting never misses a stop.
    It also remembers who the session was when it connected (``identity``).
    """

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.identity: Tuple[Optional[str], Optional[str]] = (None, None)
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
        """Whether bytes are waiting in a buffer, where poll() cannot see them."""
        ssl_pending = getattr(self.sock, "pending", None)
        return bool(self._in) or bool(ssl_pending and ssl_pending())

    def readable(self) -> bool:
        return self.pending() or _readable(self.sock.fileno())


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


def _os_user() -> str:
    """libpq's default user: the name of the effective user ID."""
    import pwd

    try:
        return pwd.getpwuid(os.geteuid()).pw_name
    except KeyError:
        raise ConfigError(f"user ID {os.geteuid()} has no name in the password database "
                          f"(a container's --user, say): set PGUSER") from None


def _pgpass_path(config: Config) -> Optional[str]:
    home = _home()
    return _pg_setting(config, "PGPASSFILE") or (home and os.path.join(home, ".pgpass"))


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
    path = _pgpass_path(config)
    if host.startswith("/"):
        host = "localhost" if host == _default_socket_dir() else host
    try:
        with open(path or "", encoding="utf-8") as f:
            if os.fstat(f.fileno()).st_mode & 0o077:
                return None  # libpq ignores a password file others can read
            lines = f.read().splitlines()
    except (OSError, UnicodeDecodeError):
        return None  # no usable file: as libpq, connect without a password
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
        root = os.path.join(_home() or "/", ".postgresql", "root.crt")
        context = ssl.create_default_context(cafile=root if os.path.exists(root) else None)
        context.check_hostname = mode == "verify-full"
    else:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    return context


def _detect_dead_peers(sock: socket.socket, stale_after: float) -> None:
    """Make a silent peer (a network partition, a server host that died) an error on
    this socket within half of stale_after, so the process learns it has lost its
    session well before another host may take its worker over."""
    import socket

    probe = max(1, int(stale_after / 12))
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, 3 * probe)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, probe)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT, 3)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT, 6000 * probe)


def _open_wire(host: str, port: int, sslmode: str, timeout: Optional[float], stale_after: float) -> _Wire:
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
        _detect_dead_peers(sock, stale_after)
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
    import pg8000.dbapi

    user = _pg_setting(config, "PGUSER") or _os_user()
    database = _pg_setting(config, "PGDATABASE") or user
    sslmode = _pg_setting(config, "PGSSLMODE") or "prefer"
    timeout: Optional[float] = int(_pg_setting(config, "PGCONNECT_TIMEOUT") or 10)
    timeout = max(timeout, 2) if timeout else None  # libpq: 0 waits forever, 2 s at least
    failures = []
    for host, port in _targets(config):
        where = f"socket {host}/.s.PGSQL.{port}" if host.startswith("/") else f"{host}:{port}"
        password = _pg_setting(config, "PGPASSWORD") or _pgpass_password(config, host, port, database, user)
        try:
            wire = _open_wire(host, port, sslmode, timeout, config.get("stale_after", 60.0))
            connection = pg8000.dbapi.connect(
                user=user, database=database, password=password, sock=wire,
                ssl_context=False, application_name=config["process_id"])
        except ConnectError as e:
            raise ConnectError(f"could not connect to PostgreSQL at {where}: {e}", e.permanent) from None
        except Exception as e:
            if password is None and _asks_for_password(e):
                raise ConnectError(
                    f"could not connect to PostgreSQL at {where}: the server asks for a password "
                    f"and none is configured: set PGPASSWORD (in a secrets.conf, say) or add a "
                    f"line for this server to {_pgpass_path(config) or 'a PGPASSFILE'}",
                    permanent=True) from None
            reason, permanent = _connect_failure(e, timeout)
            if permanent:
                raise ConnectError(f"could not connect to PostgreSQL at {where}: {reason}",
                                   permanent=True) from None
            failures.append(f"{where}: {reason}")
            continue
        wire.sock.settimeout(None)  # the timeout is for connecting, not for the worker's queries
        statuses = connection.parameter_statuses
        wire.identity = (statuses.get("application_name"), statuses.get("session_authorization"))
        connection.autocommit = True
        return connection
    raise ConnectError("could not connect to PostgreSQL at " + "; ".join(failures))


def _asks_for_password(error: BaseException) -> bool:
    # pg8000 says so for clear-text and MD5; for SCRAM it fails on the missing
    # password itself, with an AttributeError.
    return isinstance(error, AttributeError) or "no password was provided" in str(error)


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
    if isinstance(cause, socket.gaierror):
        return f"unknown host ({cause.strerror})", False
    return getattr(cause, "strerror", None) or _reason(cause), False


def _wire_of(connection) -> Optional[_Wire]:
    # pg8000 keeps the socket it was given as _usock; only ours are _Wires.
    wire = getattr(connection, "_usock", None)
    return wire if isinstance(wire, _Wire) else None


def _in_transaction(connection) -> bool:
    # pg8000 keeps the status of the last ReadyForQuery: b"I" idle, b"T" in a
    # transaction, b"E" in a failed one; None before the first query.
    return connection._transaction_status in (b"T", b"E")


def _check_session(config: Config, connection) -> None:
    """Refuse to act for this process on a session whose identity the worker function
    changed: keyed by application_name and bound to the session's user, the
    runtime's calls would act on another row, or on none."""
    wire = _wire_of(connection)
    statuses = connection.parameter_statuses
    if statuses.get("application_name") != config["process_id"]:
        raise _SessionChanged("the worker function changed its session's application_name")
    if wire is not None and statuses.get("session_authorization") != wire.identity[1]:
        raise _SessionChanged("the worker function changed its session's user "
                              "(SET SESSION AUTHORIZATION)")


def _channel(config: Config) -> str:
    """The channel a deleted process row is announced on (schema.sql: processes_notify_stop)."""
    return "uniphant_" + config["process_id"].replace("-", "")


def _call(connection, sql: str, params: tuple = ()) -> Optional[list]:
    """The first row of one of the runtime's own calls, SQL with $1-style parameters.

    It goes around pg8000's cursor, which would open a transaction if the worker
    function had switched autocommit off.  A refusal, a missing schema or any
    other SQL error becomes a UniphantError.
    """
    import pg8000.dbapi

    try:
        if params:
            context = connection.execute_unnamed(sql, params)
        else:
            context = connection.execute_simple(sql)
    except pg8000.dbapi.DatabaseError as e:
        code, message = _sql_error(e)
        if code in ("UN001", "UN003", "UN004", "22023"):
            raise _Refused(message, code) from None
        if code in ("42883", "42P01", "3F000"):
            raise _SchemaMissing(f"the database has no uniphant schema ({message}): "
                                f"load schema.sql") from None
        raise UniphantError(f"database error {code}: {message}") from None
    rows = context.rows
    return rows[0] if rows else None


def register_host(config: Config, connection) -> None:
    """Register this host, and check that the database's schema is recent enough."""
    try:
        row = _call(connection, "SELECT public.uniphant_schema_version(), "
                    "public.register_host($1::uuid, $2)", (config["host_id"], config["host_name"]))
    except _SchemaMissing:
        # Version 1 had no version function; its keepalive() tells it apart from nothing.
        row = _call(connection, "SELECT 1 WHERE to_regprocedure('public.keepalive()') IS NOT NULL")
    version = row[0] if row else None
    if version is None or version < SCHEMA_VERSION:
        found = "no uniphant schema" if version is None else f"uniphant schema version {version}"
        raise UniphantError(f"the database has {found}, and this uniphant needs version "
                            f"{SCHEMA_VERSION}: load schema.sql")


def _listen(config: Config, connection) -> None:
    # The channel is built from hex digits of our own process id: safe to format.
    connection.execute_simple(f"LISTEN {_channel(config)}")


# How long a start waits for the session of this host's previous process of
# the worker to end (its process is gone: the caller holds the PID-file lock).
_SESSION_END_WAIT = 2.0


def register_process(config: Config, connection) -> None:
    """Register this process for its worker, then listen for the deletion of its row.

    Raises UniphantError naming the running process when another one runs the worker.
    """
    deadline = time.monotonic() + _SESSION_END_WAIT
    while True:
        try:
            _call(connection, "SELECT public.register_process($1::uuid, $2::uuid, $3, $4, "
                  "make_interval(secs => $5))",
                  (config["worker_id"], config["host_id"], config["worker_type"], os.getpid(),
                   float(config["stale_after"])))
            break
        except _Refused as e:
            if e.code != "UN003" or time.monotonic() >= deadline:
                raise
        time.sleep(0.02)
    _listen(config, connection)


def keepalive(connection) -> bool:
    """Record a heartbeat; false when the process row is gone and the worker must stop."""
    return bool(_call(connection, "SELECT public.keepalive()")[0])


def _close_quietly(connection) -> None:
    """Close a connection that may be dead: one that cannot say goodbye is closed all the same."""
    import pg8000.dbapi

    try:
        connection.close()
    except (pg8000.dbapi.InterfaceError, OSError):
        return  # pg8000 closes the socket even when the goodbye cannot be sent


def disconnect(connection) -> None:
    """Remove this process's row, then close the connection."""
    try:
        _call(connection, "SELECT public.disconnect()")
    finally:
        _close_quietly(connection)


# ---------------------------------------------------------------------------
# Process management
# ---------------------------------------------------------------------------

class _Runtime:
    """What one uniphant process knows while it runs.

    One instance per process: a worker that the manager forks starts with a
    fresh one, so nothing of its parent's run carries over.
    """

    def __init__(self) -> None:
        self.signals: List[int] = []             # caught by signal_handler, not yet acted on
        self.stop_signal: Optional[str] = None   # the name of the signal that asked us to stop
        self.wakeup_fd: Optional[int] = None     # readable when a signal arrived
        self.parent_fd: Optional[int] = None     # a pidfd of the parent (foreground): readable when it exits
        self.poll_parent = False                 # foreground without pidfds: look every _PARENT_POLL
        self.log_handler = None                  # the log file's handler, reopened on SIGHUP
        self.pid_file_fd: Optional[int] = None   # the locked PID file
        self.next_call = 0.0                     # when the worker function is due (time.monotonic)
        self.next_heartbeat = 0.0                # when keepalive() is due
        self.confirmed_at = 0.0                  # when the last call that found the row was sent
        self.row_gone = False                    # keepalive() found the row deleted
        self.watchdog: Optional[_Watchdog] = None
        self.warned: set = set()                 # the one-time warnings already given


_runtime = _Runtime()

# What each catchable signal whose default action ends a process does to a
# worker (README, "Signals").  Faults (SIGSEGV, SIGBUS, SIGILL, SIGFPE, SIGSYS)
# keep their default: a process that got a real one cannot run on.
_STOP_SIGNALS = ("SIGTERM", "SIGINT", "SIGQUIT", "SIGABRT", "SIGXCPU", "SIGPWR")
_REOPEN_SIGNAL = "SIGHUP"
_IGNORED_SIGNALS = ("SIGUSR1", "SIGUSR2", "SIGALRM", "SIGVTALRM", "SIGPROF", "SIGIO",
                    "SIGSTKFLT", "SIGTRAP")  # and every real-time signal


def signal_handler(sig: int, frame: Any) -> None:
    """Note a signal; the run loop acts on it at once (the wakeup pipe wakes it)."""
    _runtime.signals.append(sig)


def _signal_name(sig: int) -> str:
    import signal

    try:
        return signal.Signals(sig).name
    except ValueError:
        return f"SIGRTMIN+{sig - signal.SIGRTMIN}"


def _install_signal_handlers() -> None:
    import signal

    names = _STOP_SIGNALS + (_REOPEN_SIGNAL,) + _IGNORED_SIGNALS
    signals = [getattr(signal, name) for name in names if hasattr(signal, name)]
    for sig in signals + list(range(signal.SIGRTMIN, signal.SIGRTMAX + 1)):
        signal.signal(sig, signal_handler)


def _act_on_signals(config: Config) -> None:
    """Act on the signals caught since the last look: note a stop, reopen the log,
    or log that one was ignored."""
    rt = _runtime
    while rt.signals:
        name = _signal_name(rt.signals.pop(0))
        if name in _STOP_SIGNALS:
            rt.stop_signal = rt.stop_signal or name
        elif name == _REOPEN_SIGNAL:
            _reopen_log(config)
        else:
            _logger(config).info("ignoring %s", name)


def is_pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # it exists, and belongs to another user
    return True


def is_parent_alive(parent_pid: int) -> bool:
    # An orphan is adopted by init or a subreaper: its parent PID changes.
    return os.getppid() == parent_pid


# struct flock on Linux: l_type, l_whence, l_start, l_len, l_pid (and padding).
_FLOCK = "hhqqi4x"


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
    _runtime.pid_file_fd = fd
    return True


def _release_pid_file() -> None:
    """Empty the PID file on the way out, so that its stale PID misleads no one."""
    if _runtime.pid_file_fd is not None:
        os.ftruncate(_runtime.pid_file_fd, 0)


def _process_id_in(pid_file: str) -> Optional[str]:
    """The process id that the PID file's holder wrote on its second line."""
    try:
        with open(pid_file, encoding="ascii", errors="replace") as f:
            lines = f.read(200).splitlines()
    except OSError:
        return None  # no file, or not ours to read: no process id to clean up after
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
    """Close every descriptor above stderr except keep (closerange skips those not open)."""
    try:
        top = max(int(name) for name in os.listdir("/proc/self/fd")) + 1
    except (OSError, ValueError):  # no /proc: every possible descriptor
        top = os.sysconf("SC_OPEN_MAX")
    os.closerange(3, keep)
    os.closerange(keep + 1, top)


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
    import contextlib

    with contextlib.suppress(BrokenPipeError):
        os.write(fd, message.encode("utf-8", "replace"))
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
            raise UniphantError(rest or "the daemon was killed before it was ready")
        print(f"{_describe(config)} started with PID {rest}.")
        return EXIT_OK
    os.close(ready_r)
    code = EXIT_FAILURE
    try:
        code = _daemon_main(config, worker_function, pid_file, ready_w)
    finally:
        import logging

        logging.shutdown()
        os._exit(code)  # never return into the caller's code: that is the parent's


def _daemon_main(config: Config, worker_function: WorkerFunction, pid_file: str, ready_w: int) -> int:
    """Detach, lock, connect and register, tell the waiting parent how that went, then run."""
    try:
        _detach(config, ready_w)
        if not _lock_pid_file(config, pid_file):
            raise UniphantError(_already_running(config, get_pid_for_running_process(pid_file)))
        setup_logging(config)
        connection = connect_to_database(config)
        try:
            register_process(config, connection)
        except BaseException:
            _close_quietly(connection)
            raise
    except BaseException as e:
        _tell(ready_w, f"error {_explain(e)}")
        return EXIT_FAILURE
    _tell(ready_w, f"ready {os.getpid()}")
    return run(config, connection, worker_function, pid_file)


# ---------------------------------------------------------------------------
# The run loop
# ---------------------------------------------------------------------------

# Reconnection backoff: doubles from the first delay up to the cap, each wait
# drawn at random from its upper half so a fleet does not retry in step.
_BACKOFF_FIRST, _BACKOFF_CAP = 0.05, 2.0
# How often to look for the parent's death where pidfds are not available.
_PARENT_POLL = 0.25


class _WorkerExit(Exception):
    """The worker function ended the worker (an exception, SystemExit): exit with code."""

    def __init__(self, code: int) -> None:
        super().__init__(code)
        self.code = code


class _ConnectionLost(Exception):
    """The connection broke during a call of the worker function."""

    def __init__(self, error: BaseException) -> None:
        super().__init__(_explain(error))


def _heartbeat_period(config: Config) -> float:
    """Seconds between heartbeats: a third of stale_after, so the row never looks
    stale.  A deleted row reaches the process by notification, not by heartbeat."""
    return config["stale_after"] / 3


def _warn_once(logger: logging.Logger, message: str) -> None:
    if message not in _runtime.warned:
        _runtime.warned.add(message)
        logger.warning(message)


def _local_stop_reason(config: Config) -> Optional[str]:
    """A reason to stop that needs no database: a signal, or the parent's death."""
    _act_on_signals(config)
    if _runtime.stop_signal:
        return f"{_runtime.stop_signal} received"
    if config["foreground"] and not is_parent_alive(config["parent_pid"]):
        return "the parent process has gone"
    return None


def _stop_hinted(config: Config, connection) -> bool:
    """Whether a notification came on this process's channel (taking it off the queue).

    A hint only: any role may NOTIFY any channel, so keepalive() confirms it.  A
    full queue may have dropped one: that is a hint too.
    """
    notes = connection.notifications
    if not notes:
        return False
    channel = _channel(config)
    full = notes.maxlen is not None and len(notes) >= notes.maxlen
    others = [note for note in notes if note[1] != channel]
    if len(others) == len(notes) and not full:
        return False
    notes.clear()
    notes.extend(others)
    return True


def _stop_reason(config: Config, connection) -> Optional[str]:
    """Why the worker must stop now, or None.

    Between transactions it reads what the database sent, and asks keepalive()
    when a notification hints at a deleted row or a heartbeat is due.  Inside
    one of the worker function's transactions it looks at signals only: a
    heartbeat there would hold the row's lock until the transaction ends.
    """
    reason = _local_stop_reason(config)
    if reason is not None or _in_transaction(connection):
        return reason
    if _runtime.row_gone:
        return "its process row was deleted"
    wire = _wire_of(connection)
    if wire is not None and wire.readable():
        connection.execute_simple("")  # lets pg8000 read what has arrived
    now = time.monotonic()
    hinted = _stop_hinted(config, connection)
    if hinted or now >= _runtime.next_heartbeat:
        _check_session(config, connection)
        if not keepalive(connection):
            _runtime.row_gone = True
            return "its process row was deleted"
        if hinted:
            _logger(config).debug("a notification on this process's channel, but its row is "
                                  "still there: not a stop")
        _runtime.confirmed_at = now
        _runtime.next_heartbeat = now + _heartbeat_period(config)
    return None


def alive(config: Config, connection) -> bool:
    """Whether the worker should go on: no signal, parent alive (foreground), row present.

    Cheap enough to call in a tight loop: it writes a heartbeat every
    stale_after / 3 seconds and asks the database nothing else unless a
    message has arrived.  Inside a transaction it looks at signals only.
    """
    return _stop_reason(config, connection) is None


def _drain(fd: int) -> None:
    try:
        while os.read(fd, 512):
            continue
    except BlockingIOError:
        return  # empty: what it was for has been seen


def _watch_for_wakeups(config: Config) -> None:
    """Make signals and the parent's death wake _wait()."""
    import signal

    rt = _runtime
    read_fd, write_fd = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
    signal.set_wakeup_fd(write_fd)
    rt.wakeup_fd = read_fd
    if config["foreground"]:
        try:
            rt.parent_fd = os.pidfd_open(config["parent_pid"])
        except (AttributeError, OSError):
            rt.poll_parent = True  # no pidfd support, or already gone


def _wait(seconds: float, connection=None) -> None:
    """Sleep up to seconds; wake early for a signal, a database message or the parent's death."""
    rt = _runtime
    poller = select.poll()
    poller.register(rt.wakeup_fd, select.POLLIN)
    if rt.parent_fd is not None:
        poller.register(rt.parent_fd, select.POLLIN)
    if rt.poll_parent:
        seconds = min(seconds, _PARENT_POLL)
    wire = _wire_of(connection)
    if wire is not None:
        if wire.pending():
            return
        poller.register(wire.fileno(), select.POLLIN)
    if seconds > 0:
        poller.poll(int(seconds * 1000) + 1)
    _drain(rt.wakeup_fd)


class _Watchdog:
    """Ends the process when it loses its database session while the worker
    function runs and cannot confirm its row before another host may take the
    worker over (DESIGN: one copy at a time is a lease).

    A thread, since the worker function may be anywhere (asleep, computing, in a
    C call).  It never touches the connection's protocol: it polls the socket
    for a hang-up and watches the clock.
    """

    def __init__(self, config: Config, logger: logging.Logger) -> None:
        import threading

        stale_after = config["stale_after"]
        # keepalive() writes at most once a second, so the row's heartbeat may be
        # a second older than the last confirmation; the margin is for scheduling.
        self._grace = stale_after - 1.0 - max(0.5, stale_after / 10)
        self._logger = logger
        self._lock = threading.Condition()
        self._call: Optional[Tuple[int, int, float]] = None  # generation, fd, confirmed_at
        self._generation = 0
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        threading.Thread(target=self._watch, name="uniphant-watchdog", daemon=True).start()

    def enter(self, wire: Optional[_Wire], confirmed_at: float) -> None:
        """A call of the worker function begins on wire's session."""
        with self._lock:
            self._generation += 1
            self._call = None if wire is None else (self._generation, wire.fileno(), confirmed_at)
            self._lock.notify()

    def leave(self) -> None:
        with self._lock:
            self._generation += 1
            self._call = None
            self._lock.notify()
        try:
            os.write(self._wake_w, b".")
        except BlockingIOError:
            return  # the pipe is full: the thread has wake-ups enough

    def _watch(self) -> None:
        while True:
            with self._lock:
                while self._call is None:
                    self._lock.wait()
                generation, fd, confirmed_at = self._call
            if self._hung_up(fd):
                self._expire_unless_left(generation, confirmed_at + self._grace)

    def _hung_up(self, fd: int) -> bool:
        """Wait until the session's socket hangs up (true) or the call ends (false)."""
        poller = select.poll()
        poller.register(fd, select.POLLRDHUP)  # hang-ups and errors are always reported
        poller.register(self._wake_r, select.POLLIN)
        events = dict(poller.poll())
        _drain(self._wake_r)
        lost = select.POLLRDHUP | select.POLLHUP | select.POLLERR | select.POLLNVAL
        return bool(events.get(fd, 0) & lost)

    def _expire_unless_left(self, generation: int, deadline: float) -> None:
        with self._lock:
            while self._generation == generation:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    self._logger.critical(
                        "exiting: the database session was lost during a call of the worker "
                        "function, and the call did not return in time to confirm the process "
                        "row before another host may take the worker over")
                    os._exit(EXIT_FAILURE)
                self._lock.wait(remaining)


def _tolerate_any_notification(connection) -> None:
    """Decode notifications leniently on this connection.

    pg8000 decodes a notification's channel and payload as ASCII and, on any
    other byte, stops reading in the middle of a reply, out of step with the
    server.  Any role can send one to any channel.
    """
    def handle(data: bytes, context: Any) -> None:
        channel, payload = data[4:].split(b"\0")[:2]
        connection.notifications.append((struct.unpack("!i", data[:4])[0],
                                         channel.decode("utf-8", "replace"),
                                         payload.decode("utf-8", "replace")))
    connection.message_types[b"A"] = handle


def _settle(config: Config, connection, logger: logging.Logger) -> None:
    """After a call: roll back a transaction the worker function left open (it
    would hold back the heartbeat and a DELETE of the row), and make sure the
    session is still this process's."""
    if _in_transaction(connection):
        connection.execute_simple("ROLLBACK")
        _warn_once(logger, "the worker function returned inside a transaction: rolled it back "
                           "(commit or roll back before returning)")
    _check_session(config, connection)


def _call_worker(config: Config, connection, worker_function: WorkerFunction,
                 logger: logging.Logger) -> None:
    """Call the worker function once, under the watchdog, and settle the session.

    Raises _WorkerExit when the worker function ends the worker, and
    _ConnectionLost when the connection broke under it.
    """
    rt = _runtime
    rt.watchdog.enter(_wire_of(connection), rt.confirmed_at)
    try:
        worker_function(config, logger, connection)
    except UniphantError:
        raise  # from alive(): the runtime's own, never the worker function's failure
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else EXIT_OK if e.code is None else EXIT_FAILURE
        (logger.info if code == EXIT_OK else logger.error)(
            "stopping: the worker function raised SystemExit(%r)", e.code)
        raise _WorkerExit(code) from None
    except BaseException as e:
        if _is_lost(connection):
            raise _ConnectionLost(e) from None
        logger.exception("stopping: the worker function failed")
        raise _WorkerExit(EXIT_FAILURE) from None
    finally:
        rt.watchdog.leave()
    _settle(config, connection, logger)


def _serve(config: Config, connection, worker_function: WorkerFunction, logger: logging.Logger) -> str:
    """Call the worker function every interval until it must stop; return why.

    The schedule lives in the runtime state, so a reconnect does not bring the
    next call forward.
    """
    rt = _runtime
    while True:
        reason = _stop_reason(config, connection)
        if reason is not None:
            return reason
        now = time.monotonic()
        if now >= rt.next_call:
            _call_worker(config, connection, worker_function, logger)
            rt.next_call = time.monotonic() + config["interval"]
        else:
            _wait(min(rt.next_call, rt.next_heartbeat) - now, connection)


def _is_lost(connection) -> bool:
    try:
        connection.execute_simple("")
    except Exception:
        return True
    return False


def _reconnect(config: Config, logger: logging.Logger, error: str):
    """A new connection with the same process id, or None if told to stop meanwhile.

    Waits with capped, jittered backoff.  Logs the loss and the recovery once
    each, the first failure of each kind at WARNING and the others at DEBUG.
    """
    import random

    logger.warning("lost the database connection (%s); reconnecting", error)
    lost_at, delay, seen = time.monotonic(), _BACKOFF_FIRST, set()
    while _local_stop_reason(config) is None:
        try:
            connection = connect_to_database(config)
        except ConnectError as e:
            if e.permanent:
                raise
            failure = str(e)
        else:
            try:
                _listen(config, connection)
                _tolerate_any_notification(connection)
            except Exception as e:
                _close_quietly(connection)
                failure = _explain(e)
            else:
                logger.info("database connection restored after %.1f s", time.monotonic() - lost_at)
                _runtime.next_heartbeat = 0.0  # ask at once whether the row survived the outage
                return connection
        (logger.debug if failure in seen else logger.warning)("reconnecting: %s", failure)
        seen.add(failure)
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
    logger = _logger(config)
    rt = _runtime
    _watch_for_wakeups(config)
    _tolerate_any_notification(connection)
    rt.watchdog = _Watchdog(config, logger)
    rt.confirmed_at = time.monotonic()  # registering has just made the row
    rt.next_heartbeat = rt.confirmed_at + _heartbeat_period(config)
    logger.info("worker %s started: process %s, PID %d, host %s",
                config["worker_id"], config["process_id"], os.getpid(), config["host_name"])
    code = EXIT_FAILURE
    try:
        while True:
            try:
                logger.info("stopping: %s", _serve(config, connection, worker_function, logger))
                code = EXIT_OK
                break
            except _WorkerExit as e:
                code = e.code
                break
            except _ConnectionLost as e:
                error = str(e)
            except UniphantError:
                raise
            except Exception as e:
                if not _is_lost(connection):
                    raise
                error = _explain(e)
            _close_quietly(connection)
            connection = None
            connection = _reconnect(config, logger, error)
            if connection is None:
                logger.info("stopping: %s", _local_stop_reason(config))
                code = EXIT_OK
                break
    except UniphantError as e:
        logger.error("stopping: %s", e)
    except Exception:
        logger.exception("stopping: uniphant failed")
    finally:
        _leave(config, connection, logger)
        _release_pid_file()
        _note_leftover_threads(logger)
    return code


def _leave(config: Config, connection, logger: logging.Logger) -> None:
    """Remove this process's row and close its connection: on that connection if
    the worker function left it fit, else on a new one."""
    if connection is None:
        logger.warning("could not remove the process row (database unreachable); "
                       "the next start takes it over")
        return
    try:
        if _in_transaction(connection):
            connection.execute_simple("ROLLBACK")
        _check_session(config, connection)
        disconnect(connection)
        return
    except Exception as e:
        _close_quietly(connection)
        logger.debug("cannot remove the process row on its own connection: %s", _explain(e))
    try:
        disconnect(connect_to_database(config))  # a new session is this process's own again
    except Exception as e:
        logger.warning("could not remove the process row (%s); the next start takes it over",
                       _explain(e))


def _leftover_threads() -> list:
    """Threads other than the main one that the interpreter would wait for at exit."""
    threading = sys.modules.get("threading")
    if threading is None:
        return []
    return [t for t in threading.enumerate() if not t.daemon and t is not threading.main_thread()]


def _note_leftover_threads(logger: logging.Logger) -> None:
    names = [thread.name for thread in _leftover_threads()]
    if names:
        logger.warning("exiting without waiting for threads the worker function left running: %s",
                       ", ".join(names))


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


def _stop_config(prog: str, worker_id: str) -> Config:
    """The configuration `stop` needs: a running worker must stay stoppable when a
    config file has since become invalid, so a bad one costs only its settings."""
    config = dict(_script_config(), worker_id=worker_id, foreground=False, **RUNTIME_DEFAULTS)
    try:
        config.update(read_config_files(config))
    except ConfigError as e:
        print(f"{prog}: warning: {e}; stopping with the default stop_timeout of "
              f"{RUNTIME_DEFAULTS['stop_timeout']:g} s", file=sys.stderr)
    return config


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
    except UniphantError as e:
        print(f"Its process row stays until the next start takes it over: {e}", file=sys.stderr)


def _start(config: Config, worker_function: WorkerFunction, pid_file: str) -> int:
    _install_signal_handlers()
    _refuse_shared_type(config)
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


def _exit(code: int) -> None:
    """Exit with code, also when the worker function left threads running (the
    interpreter would wait for them for ever)."""
    if _leftover_threads():
        logging = sys.modules.get("logging")
        if logging is not None:
            logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)


def main(worker_function: WorkerFunction) -> None:
    """The command line of a worker script: <worker_id> {start,restart,stop,status} [-f].

    `status` reads no config file and `stop` survives a bad one: both need only
    the PID file.  Signals are caught (signal_handler) once a start begins.
    """
    prog = os.path.basename(sys.argv[0])
    try:
        worker_id, command, foreground = _parse_arguments(prog, sys.argv[1:])
        if command == "status":
            config = dict(_script_config(), worker_id=worker_id)
            code = _status(config, get_pid_file_path(config))
        elif command == "stop":
            config = _stop_config(prog, worker_id)
            code = _stop(config, get_pid_file_path(config))
        else:
            config = setup_config()
            config.update(worker_id=worker_id, foreground=foreground,
                          parent_pid=os.getppid() if foreground else None)
            pid_file = get_pid_file_path(config)
            if command == "restart" and get_pid_for_running_process(pid_file) is not None:
                _stop(config, pid_file)
            code = _start(config, worker_function, pid_file)
    except UniphantError as e:
        if isinstance(e, UsageError):
            print(_usage(prog), file=sys.stderr)
        print(f"{prog}: error: {e}", file=sys.stderr)
        code = e.exit_code
    except OSError as e:
        print(f"{prog}: error: {_explain(e)}", file=sys.stderr)
        code = EXIT_FAILURE
    except Exception as e:
        if not type(e).__module__.startswith("pg8000"):
            raise  # a bug: its traceback is the report
        print(f"{prog}: error: the database connection failed: {_explain(e)}", file=sys.stderr)
        code = EXIT_FAILURE
    _exit(code)
