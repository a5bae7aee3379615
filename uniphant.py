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
``PGCONNECT_TIMEOUT``, ``PGTARGETSESSIONATTRS``, ``PGLOADBALANCEHOSTS`` from the
files, else the environment, else the defaults.

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
import stat
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

__version__ = "0.3.0"

# The supported API (docs/python-api.md, "Python API"): what a worker script uses, and the
# exceptions a caller may catch.
__all__ = [
    "main", "alive", "connect_to_database", "setup_config", "setup_logging",
    "register_host", "register_process", "keepalive", "disconnect",
    "UniphantError", "ConfigError", "ConnectError", "AlreadyRunning",
]
# The extension API (docs/python-api.md, "Python API"): what a worker-shaped extension of
# uniphant needs beyond __all__; the fleet (uniphant_fleet.py) and the page
# (workers/uniphant/web.py) use nothing else of this file.
EXTENSION_API = [
    # configuration: its defaults, each key with where it was defined, and its values
    "RUNTIME_DEFAULTS", "config_sources", "read_config_files", "read_operator_config", "desired_settings",
    "pg_setting", "is_whole", "shorten", "printable", "explain", "shown_settings", "resembling",
    # names: UUIDs, worker types and the files of a worker
    "canonical_uuid", "new_uuid", "is_worker_type", "TYPE_LENGTH", "TYPE_PARTS", "scripts_of_type",
    "worker_types_under", "state_dir_of", "pid_file_of", "log_file_of", "read_host_id", "open_own_file",
    # the database: connecting, the row reader, notifications, errors
    "connect_to_server", "query_row", "query_rows", "in_one_transaction", "take_notifications",
    "wire_of", "is_lost", "close_quietly", "sql_error_of",
    # processes: locks, signals, the report pipe, systemd, the run loop's wait
    "get_pid_for_running_process", "holds_open", "signal_name", "close_inherited_fds", "fd_readable",
    "parse_report", "report_to_manager", "sd_notify", "watchdog_period", "wait_for_wakeup", "BACKOFF_CAP",
    "Ending", "ONE_PER_HOST", "begin_managed_child", "handing_over",
    # the command line
    "EXIT_OK", "EXIT_FAILURE", "UsageError", "print_or_leave_quietly", "leave_quietly",
]
# Kept under the manual's names (its section 3) for whoever ports code written
# against it, though a worker needs none of them: is_parent_alive,
# get_or_create_host_id, is_valid_uuid, run, start_daemon, signal_handler,
# is_pid_alive, get_pid_for_running_process, stop_running_process,
# parse_key_value_format, read_secret_config_files, read_config_files,
# get_calling_file_path, get_script_details, get_pid_file_path.

# Why a script that runs once per host (its worker function's one_per_host, a
# manager) is never started by a manager: the copy would read that script's
# configuration, the manager's own password included.
ONE_PER_HOST = "a script that runs once per host (a manager) is never a desired worker"

# Exit codes of the command line.
EXIT_OK, EXIT_FAILURE, EXIT_USAGE, EXIT_NOT_RUNNING = 0, 1, 2, 3

# The version of schema.sql this file needs (uniphant.schema_version()).
SCHEMA_VERSION = 4


class UniphantError(Exception):
    """What uniphant reports in one line, without a traceback: the base of its
    errors; exit 1."""

    exit_code = EXIT_FAILURE


class ConfigError(UniphantError, ValueError):
    """Bad configuration or usage; the message names the file and line: exit 2."""

    exit_code = EXIT_USAGE


def printable(text: str) -> str:
    """text with each character that is not printable shown as an escape (\\x1b,
    \\u202e): text from the database or from a worker can then neither move a
    terminal's cursor, retitle it, forge a line, nor reverse what follows."""
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else
                   f"\\x{ord(c):02x}" if ord(c) < 0x100 else
                   f"\\u{ord(c):04x}" if ord(c) < 0x10000 else f"\\U{ord(c):08x}" for c in text)


def _reason(error: BaseException) -> str:
    """An exception as a user should read it: its message, else its type's name."""
    fields = error.args[0] if error.args and isinstance(error.args[0], dict) else None
    if fields is not None and "M" in fields:  # pg8000's DatabaseError: the server's message
        return printable(fields["M"])
    return str(error).strip() or type(error).__name__


def explain(error: BaseException) -> str:
    """An exception in one line: uniphant's own as their message, others with their type."""
    text, name = _reason(error), type(error).__name__
    return text if isinstance(error, UniphantError) or text == name else f"{name}: {text}"


# ---------------------------------------------------------------------------
# Configuration
# ---------------------------------------------------------------------------

RESERVED_KEYS = frozenset({
    "root_dir", "script_dir", "worker_type", "lock_file", "host_id_file", "host_id",
    "process_id", "host_name", "foreground", "worker_id", "parent_pid", "state_dir",
})

# Where a project keeps what it writes (.host_id, .lock, pid/, log/): its root,
# unless this environment variable names another directory (a read-only tree).
STATE_DIR_VARIABLE = "UNIPHANT_STATE_DIR"

LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
SSL_MODES = ("disable", "allow", "prefer", "require", "verify-ca", "verify-full")
SESSION_ATTRS = ("any", "read-write", "read-only", "primary", "standby", "prefer-standby")
LOAD_BALANCE = ("disable", "random")

# What config files and settings strip around keys and values: ASCII
# whitespace only, so that no other script's spaces pass for nothing.
_SPACE = " \t\n\r\x0b\x0c"

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


def _number(minimum: float, above: bool = False, maximum: float = _MAX_SECONDS,
            unit: str = "seconds") -> Callable[[str], float]:
    """A check for a number from minimum (exclusive if above) to maximum."""
    def check(value: str) -> float:
        number = float(value) if _is_decimal(value) else -1.0
        if not (number > minimum if above else number >= minimum) or number > maximum:
            raise ValueError(f"expected a number of {unit} {'>' if above else '>='} "
                             f"{minimum:g} and <= {maximum:g}")
        return number
    return check


def is_whole(value: str, low: int, high: int) -> bool:
    return value.isascii() and value.isdigit() and low <= int(value) <= high


def _port_list(value: str) -> str:
    if not all(is_whole(port.strip(_SPACE), 1, 65535) for port in value.split(",")):
        raise ValueError("expected a port number from 1 to 65535 (or a comma-separated list)")
    return value


def _connect_timeout(value: str) -> str:
    if not is_whole(value, 0, _MAX_SECONDS):
        raise ValueError(f"expected a whole number of seconds from 0 to {_MAX_SECONDS}")
    return value


def _choice(choices: Tuple[str, ...], fold: Callable[[str], str]) -> Callable[[str], str]:
    def check(value: str) -> str:
        if fold(value) not in choices:
            raise ValueError(f"expected one of {', '.join(choices)}")
        return fold(value)
    return check


# Each check returns the value to store, or raises ValueError saying what is wrong.
# The runtime keys: their defaults and their checks; config files hold them as
# text, `config` as checked values.  Six are the manager's (docs/fleet.md, "The
# fleet"), `restart` is a worker type's ("Changing the fleet").
_RUNTIME_KEYS: Dict[str, Tuple[Any, Callable[[str], Any]]] = {
    "log_level": ("INFO", _choice(LOG_LEVELS, str.upper)),
    "log_file": ("on", _choice(("on", "off"), str.lower)),
    "interval": (1.0, _number(0)),
    "stop_timeout": (10.0, _number(0, above=True)),
    # A heartbeat every 0.35 stale_after seconds, and never more than one a second.
    "stale_after": (60.0, _number(3)),
    "pooler": ("none", _choice(("none", "transaction"), str.lower)),
    "restart_delay": (1.0, _number(0, above=True)),
    "restart_delay_max": (60.0, _number(0, above=True)),
    "restart_reset_after": (600.0, _number(0)),
    "start_timeout": (30.0, _number(1)),
    # A cap an operator may set; without one the host's cores and load pace starts.
    "starts_per_second": (1000.0, _number(0, above=True, maximum=1000, unit="starts a second")),
    "file_retention": (604800.0, _number(0, maximum=366 * 86400)),
    # A worker type's: restart a worker that exited 0 (always), or take it as finished.
    "restart": ("always", _choice(("always", "on-failure"), str.lower)),
}
RUNTIME_DEFAULTS: Dict[str, Any] = {key: default for key, (default, _) in _RUNTIME_KEYS.items()}

# The connection keys uniphant checks; their defaults are libpq's (docs/configuration.md, "Configuration").
_CONNECTION_CHECKS: Dict[str, Callable[[str], Any]] = {
    "PGPORT": _port_list,
    "PGCONNECT_TIMEOUT": _connect_timeout,
    "PGSSLMODE": _choice(SSL_MODES, str.lower),
    "PGTARGETSESSIONATTRS": _choice(SESSION_ATTRS, str.lower),
    "PGLOADBALANCEHOSTS": _choice(LOAD_BALANCE, str.lower),
}


def shorten(text: str, limit: int = 60) -> str:
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
            line = raw.decode("utf-8").strip(_SPACE)
        except UnicodeDecodeError:
            raise ConfigError(f"{where}: not valid UTF-8") from None
        if "\0" in line:
            raise ConfigError(f"{where}: contains a NUL byte")
        if not line or line.startswith("#"):
            continue
        key, sep, value = line.partition("=")
        key, value = key.strip(_SPACE), value.strip(_SPACE)
        if not sep:
            raise ConfigError(f"{where}: expected key=value, but the line has no '='")
        if not key:
            raise ConfigError(f"{where}: empty key before '='")
        entries.append((where, key, value))
    return entries


def _checked(key: str, value: str, where: str) -> Any:
    """value as uniphant uses it, if key is one it reads; a ConfigError saying where, if bad."""
    check = _RUNTIME_KEYS[key][1] if key in _RUNTIME_KEYS else _CONNECTION_CHECKS.get(key)
    if check is None:
        return value
    try:
        return check(value)
    except ValueError as e:
        raise ConfigError(f"{where}: bad value for {key}: {e}") from None


# The connection keys uniphant reads, as libpq's environment names them, and
# libpq's connection-string names for some, which a config file does not take.
_CONNECTION_KEYS = ("PGHOST", "PGPORT", "PGDATABASE", "PGUSER", "PGPASSWORD", "PGPASSFILE", "PGSSLMODE",
                    "PGCONNECT_TIMEOUT", "PGTARGETSESSIONATTRS", "PGLOADBALANCEHOSTS")


_CONNINFO_NAMES = {"dbname": "PGDATABASE", "passfile": "PGPASSFILE", "sslmode": "PGSSLMODE",
                   "connect_timeout": "PGCONNECT_TIMEOUT", "target_session_attrs": "PGTARGETSESSIONATTRS",
                   "load_balance_hosts": "PGLOADBALANCEHOSTS"}


def _one_slip_apart(a: str, b: str) -> bool:
    """Whether b is a with one letter added, dropped, changed, or swapped with the next."""
    if abs(len(a) - len(b)) > 1 or a == b:
        return False
    first = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
    if len(a) == len(b):
        return a[first + 1:] == b[first + 1:] or (a[first:first + 2] == b[first:first + 2][::-1]
                                                   and a[first + 2:] == b[first + 2:])
    longer, shorter = (a, b) if len(a) > len(b) else (b, a)
    return longer[first + 1:] == shorter[first:]


def resembling(word: str, known: List[str]) -> Optional[str]:
    """The first of known that word is one slip away from (a letter more, less, other
    or swapped; another case), else None (also when word is one of them)."""
    if word in known:
        return None
    return next((k for k in known if k.lower() == word.lower() or _one_slip_apart(k, word)), None)


def _resembles(key: str) -> Optional[str]:
    """The key uniphant reads that key is one slip away from (a letter more, less,
    other or swapped; another case; libpq's connection-string name), else None."""
    known = [*_RUNTIME_KEYS, *_CONNECTION_KEYS]
    if key not in known and key.lower() in _CONNINFO_NAMES:
        return _CONNINFO_NAMES[key.lower()]
    return resembling(key, known)


def _settings(entries: List[Tuple[str, str, str]],
              warnings: Optional[List[str]] = None) -> Dict[str, Any]:
    """The settings of config entries, enforcing the rules: no reserved key, no key
    twice, a valid value for every key uniphant reads.  A key one slip away from
    one uniphant reads is noted in warnings, if given."""
    found: Dict[str, Tuple[Any, str]] = {}  # key -> (value, where)
    for where, key, value in entries:
        if key in RESERVED_KEYS:
            raise ConfigError(f"{where}: {key!r} is reserved and cannot be set in a config file")
        if key in found:
            raise ConfigError(f"{where}: {key!r} is already defined at {found[key][1]}")
        found[key] = (_checked(key, value, where), where)
        meant = _resembles(key)
        if meant is not None and warnings is not None:
            warnings.append(f"{where}: {printable(key)!r} is not a key uniphant reads; "
                            f"did you mean {meant!r}?")
    return {key: value for key, (value, _) in found.items()}


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


def _script_stem(config: Config) -> Optional[str]:
    """The calling script's name without .py (workers/x/my.job.py: my.job), or None
    where there is no script (the ops commands)."""
    if config["script_dir"] == config["root_dir"]:
        return None
    below = os.path.relpath(config["script_dir"], os.path.join(config["root_dir"], "workers"))
    prefix = "" if below == os.curdir else below.replace(os.sep, ".") + "."
    return config["worker_type"][len(prefix):]


def _secret_entries(config: Config) -> List[Tuple[str, str, str]]:
    """The entries of the secrets files: the script's own, then each directory's."""
    home = _home()
    if home is None:
        return []
    secrets = os.path.join(home, ".uniphant", "secrets")
    entries, stem = [], _script_stem(config)
    for directory in _config_dirs(config):
        relative = os.path.normpath(os.path.join(secrets, os.path.relpath(directory, config["root_dir"])))
        if stem is not None and directory == config["script_dir"]:
            entries += _config_entries(os.path.join(relative, f"{stem}.secrets.conf"), private=True)
        entries += _config_entries(os.path.join(relative, "secrets.conf"), private=True)
    return entries


def read_secret_config_files(config: Config) -> Dict[str, Any]:
    """The settings of ~/.uniphant/secrets/<each config directory relative to root_dir>/secrets.conf."""
    return _settings(_secret_entries(config))


# Where a desired worker's settings come from, for the messages about them.
_DESIRED_SETTINGS = "the worker's settings in the desired state (workers.settings)"


# The keys no desired worker's settings may hold, beside the reserved ones and
# credentials: those that say where or as whom it connects.  schema.sql's
# setting_problem refuses the same; this refuses a row that never passed it
# (the owner's own insert, an earlier release's row).
_CONNECTION_WORDS = frozenset({
    "host", "hostaddr", "port", "dbname", "user", "password", "passfile", "require_auth", "channel_binding",
    "connect_timeout", "client_encoding", "options", "application_name", "fallback_application_name",
    "keepalives", "keepalives_idle", "keepalives_interval", "keepalives_count", "tcp_user_timeout",
    "replication", "gssencmode", "sslmode", "requiressl", "sslnegotiation", "sslcompression", "sslcert", "sslkey",
    "sslpassword", "sslcertmode", "sslrootcert", "sslcrl", "sslcrldir", "sslsni", "requirepeer",
    "ssl_min_protocol_version", "ssl_max_protocol_version", "min_protocol_version", "max_protocol_version",
    "krbsrvname", "gsslib", "gssdelegation", "service", "target_session_attrs", "load_balance_hosts", "pooler",
})


_CREDENTIAL_PATTERN = (r"password|passwd|passphrase|secret|token|passfile|credential|private|auth|cert|dsn|"
                       r"(^|[_.-])(api|access|signing|encryption)?keys?($|[_.-])")


def _refuse_credential(key: str, where: str) -> None:
    import re

    if re.search(_CREDENTIAL_PATTERN, key, re.IGNORECASE):
        raise ConfigError(f"{where}: {key!r} looks like a credential, which every operator could read "
                          f"there: put it in a secrets.conf")


def _refuse_desired_key(key: str, where: str) -> None:
    """A ConfigError naming key if a desired worker may not have it (schema.sql: setting_problem)."""
    if key in RESERVED_KEYS:
        raise ConfigError(f"{where}: {key!r} is reserved: uniphant sets it")
    if key.lower().startswith("pg") or key.lower() in _CONNECTION_WORDS:
        raise ConfigError(f"{where}: {key!r} says where or as whom the worker connects, "
                          f"which only its config files say (a password: a secrets.conf)")
    _refuse_credential(key, where)


def _desired_entries(settings: Dict[str, Any]) -> List[Tuple[str, str, str]]:
    """(where, key, value) of a desired worker's settings, as a config file's: the
    same rules hold (a key a config file defines too is defined twice), and no key
    says where or as whom the worker connects, whatever its config files define."""
    entries = []
    for key, value in settings.items():
        _refuse_desired_key(key, _DESIRED_SETTINGS)
        text = ("true" if value else "false") if isinstance(value, bool) else str(value)
        entries.append((_DESIRED_SETTINGS, key, text))
    return entries


def config_sources(config: Config, desired: Optional[Dict[str, Any]] = None) -> List[Tuple[str, str, str]]:
    """Every (where, key, value) that makes the configuration of config's script,
    in the order they are read: the script's own <name>.uniphant.conf, the
    uniphant.conf of each directory up to root_dir, the secrets files, then the
    desired settings its manager gave it (desired_settings())."""
    stem = _script_stem(config)
    entries = [] if stem is None else _config_entries(os.path.join(config["script_dir"], f"{stem}.uniphant.conf"))
    entries += [entry for directory in _config_dirs(config)
                for entry in _config_entries(os.path.join(directory, "uniphant.conf"))]
    return entries + _secret_entries(config) + _desired_entries(desired or {})


def read_config_files(config: Config, warnings: Optional[List[str]] = None,
                      desired: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
    """Every setting of the uniphant.conf hierarchy (with the script's own
    <name>.uniphant.conf beside it) and of the secrets files, and the desired
    settings given; a key that looks misspelt is noted in warnings."""
    return _settings(config_sources(config, desired), warnings)


# Where an operator's settings live (docs/install.md, "Operators' settings"), unless
# UNIPHANT_OPERATOR_CONF names another file: no worker reads it.
OPERATOR_CONF = os.path.join("~", ".uniphant", "operator.conf")


def read_operator_config(config: Config, warnings: Optional[List[str]] = None) -> Dict[str, Any]:
    """The ops commands' settings: the uniphant.conf of config's root_dir, then the
    operator's own file, private as a secrets file is (never the workers'
    secrets.conf, which every worker of the OS user reads too)."""
    path = os.environ.get("UNIPHANT_OPERATOR_CONF") or os.path.expanduser(OPERATOR_CONF)
    entries = _config_entries(os.path.join(config["root_dir"], "uniphant.conf")) if config["root_dir"] else []
    if not path.startswith("~"):  # no home to find it in
        entries += _config_entries(path, private=True)
    return _settings(entries, warnings)


def _decoded_settings(text: Optional[str]) -> Dict[str, Any]:
    """A desired worker's settings from their JSON text (workers.settings::text),
    which the owner may have written past setting_problem: a ConfigError if they
    are no JSON object Python can read (a 5000-digit number, say)."""
    import json

    try:
        settings = json.loads(text or "{}")
    except (ValueError, RecursionError) as e:
        raise ConfigError(f"{_DESIRED_SETTINGS}: cannot be read: {type(e).__name__}") from None
    if not isinstance(settings, dict):
        raise ConfigError(f"{_DESIRED_SETTINGS}: not a JSON object")
    return settings


def shown_settings(text: Optional[str]) -> Optional[Dict[str, Any]]:
    """A desired worker's settings as ps and the page show them: None where they
    cannot be read, which is that worker's failure, never the reader's (or none:
    a process no desired worker accounts for)."""
    if text is None:
        return None
    try:
        return _decoded_settings(text)
    except ConfigError:
        return None


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


# A worker type the fleet can run (schema.sql: is_worker_type): up to 100
# characters in up to 10 dot-separated parts, each a file name of these.
_TYPE_CHARACTERS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_-")
TYPE_LENGTH, TYPE_PARTS = 100, 10


def is_worker_type(text: str) -> bool:
    parts = text.split(".")
    return (len(text) <= TYPE_LENGTH and len(parts) <= TYPE_PARTS
            and all(part and _TYPE_CHARACTERS.issuperset(part) for part in parts))


def scripts_of_type(root_dir: str, worker_type: str) -> List[str]:
    """Every Python script below root_dir/workers whose worker type is worker_type:
    `a.b.c` may be workers/a/b/c.py, workers/a/b.c.py, workers/a.b/c.py or workers/a.b.c.py.

    Only directories that exist are entered, so the cost follows the tree (a
    look per part where nothing matches), not the 2**(parts - 1) ways to split.
    """
    found: List[str] = []

    def look(directory: str, parts: List[str]) -> None:
        for taken in range(1, len(parts) + 1):
            path = os.path.join(directory, ".".join(parts[:taken]))
            if taken == len(parts):
                if os.path.isfile(path + ".py"):
                    found.append(path + ".py")
            elif os.path.isdir(path):
                look(path, parts[taken:])

    look(os.path.join(root_dir, "workers"), worker_type.split("."))
    return found


def worker_types_under(root_dir: str) -> List[str]:
    """The worker types of the scripts below root_dir/workers that the fleet can run."""
    workers = os.path.join(root_dir, "workers")
    types = set()
    for directory, subdirectories, files in os.walk(workers, followlinks=True):
        depth = os.path.relpath(directory, workers).count(os.sep) + 1
        # Deeper scripts make no worker type, and a symlink loop ends here.
        subdirectories[:] = [] if depth >= TYPE_PARTS else [
            name for name in subdirectories if not name.startswith(".") and name != "__pycache__"]
        types.update(_worker_type(workers, os.path.join(directory, name)) for name in files
                     if name.endswith(".py") and not name.startswith("."))
    return sorted(t for t in types if is_worker_type(t))


def _refuse_shared_type(config: Config) -> None:
    """Two scripts of one worker type would share a PID file and a log: refuse to start either."""
    path = get_calling_file_path()
    others = [p for p in scripts_of_type(config["root_dir"], config["worker_type"])
              if not os.path.samefile(p, path)]
    if others:
        raise ConfigError(f"{path} and {others[0]} are both worker type "
                          f"{config['worker_type']!r}: rename one of them")


def pid_file_of(state_dir: str, worker_type: str, worker_id: str) -> str:
    return os.path.join(state_dir, "pid", worker_type, f"{worker_id}.pid")


def get_pid_file_path(config: Config) -> str:
    return pid_file_of(config["state_dir"], config["worker_type"], config["worker_id"])


def log_file_of(state_dir: str, worker_type: str, worker_id: str) -> str:
    return os.path.join(state_dir, "log", worker_type, f"{worker_id}.log")


def _log_file_path(config: Config) -> str:
    return log_file_of(config["state_dir"], config["worker_type"], config["worker_id"])


def state_dir_of(root_dir: str) -> str:
    return os.path.abspath(os.environ.get(STATE_DIR_VARIABLE) or root_dir)


def _script_config() -> Config:
    """The keys that locate the calling worker's files; no config file is read."""
    root_dir, script_dir, worker_type = get_script_details()
    state_dir = state_dir_of(root_dir)
    return {
        "root_dir": root_dir,
        "script_dir": script_dir,
        "worker_type": worker_type,
        "state_dir": state_dir,
        "lock_file": os.path.join(state_dir, ".lock"),
        "host_id_file": os.path.join(state_dir, ".host_id"),
    }


# ---------------------------------------------------------------------------
# Host identity
# ---------------------------------------------------------------------------

def canonical_uuid(text: str) -> Optional[str]:
    """text as a lower-case hyphenated UUID, in any form uuid.UUID() accepts; else None."""
    digits = text.strip().lower()
    if digits.startswith("urn:uuid:"):
        digits = digits[9:]
    digits = digits.strip("{}").replace("-", "")
    if len(digits) != 32 or not all(c in "0123456789abcdef" for c in digits):
        return None
    return f"{digits[:8]}-{digits[8:12]}-{digits[12:16]}-{digits[16:20]}-{digits[20:]}"


def new_uuid() -> str:
    """A random (version 4) UUID, without the import cost of the uuid module."""
    octets = bytearray(os.urandom(16))
    octets[6] = octets[6] & 0x0F | 0x40
    octets[8] = octets[8] & 0x3F | 0x80
    return canonical_uuid(octets.hex())


def is_valid_uuid(text: Any) -> bool:
    return canonical_uuid(str(text)) is not None


def read_host_id(host_id_file: str) -> Optional[str]:
    try:
        with open(host_id_file, encoding="utf-8", errors="replace") as f:
            text = f.read().strip()
    except FileNotFoundError:
        return None
    host_id = canonical_uuid(text)
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


def _host_lock(lock_file: str) -> int:
    """The lock on lock_file, under which this host's files change; close it to release."""
    fd = os.open(lock_file, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o644)
    try:
        fcntl.lockf(fd, fcntl.LOCK_EX)
    except BaseException:
        os.close(fd)
        raise
    return fd


def get_or_create_host_id(lock_file: str, host_id_file: str) -> str:
    """This host's id from host_id_file, created once under a lock on lock_file."""
    host_id = read_host_id(host_id_file)
    if host_id is not None:
        return host_id
    fd = _host_lock(lock_file)
    try:
        host_id = read_host_id(host_id_file)  # a concurrent first start may have won
        if host_id is None:
            host_id = new_uuid()
            _write_atomically(host_id_file, host_id + "\n")
    finally:
        os.close(fd)
    return host_id


# The newest server generation (timeline) this host has seen of each PostgreSQL
# cluster (system identifier), one "<system identifier> <timeline>" line each,
# in the state directory next to .host_id (docs/high-availability.md, "PostgreSQL high availability").
GENERATION_FILE = ".server_generation"


def open_own_file(path: str, flags: int) -> int:
    """os.open() for a file of uniphant's own: never through a symlink, one-line errors.

    FileNotFoundError passes unchanged, for the callers to whom it means "none".
    """
    try:
        # Not blocking: a FIFO planted there must not hang us.
        fd = os.open(path, flags | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK, 0o644)
    except FileNotFoundError:
        raise
    except OSError as e:
        reason = "it is a symlink" if e.errno == errno.ELOOP else e.strerror
        raise UniphantError(f"cannot open {path}: {reason}") from None
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise UniphantError(f"cannot open {path}: it is not a regular file")
    return fd


def _read_generations(path: str) -> Tuple[Dict[int, int], Optional[str]]:
    """{system identifier: newest timeline} from path ({} if there is no file), and
    what is wrong with the file, if anything: the lines that are sound count."""
    try:
        fd = open_own_file(path, os.O_RDONLY)
    except FileNotFoundError:
        return {}, None
    except UniphantError as e:  # a symlink, a FIFO, a directory in its place
        return {}, str(e)
    try:
        with os.fdopen(fd, "rb") as f:
            data = f.read()
    except OSError as e:
        return {}, f"cannot read {path}: {e.strerror}"
    generations, problem = {}, None
    for number, line in enumerate(data.split(b"\n"), 1):
        fields = line.split()
        if not fields:
            continue
        # A system identifier is a bigint, which may be negative.
        numbers = (fields[0].lstrip(b"-"), fields[-1])
        if len(fields) != 2 or not all(f.isdigit() and len(f) <= 20 for f in numbers):
            problem = problem or f"{path}:{number}: expected a cluster's system identifier and timeline"
            continue
        generations[int(fields[0])] = max(int(fields[1]), generations.get(int(fields[0]), 0))
    return generations, problem


def _record_generation(config: Config, generations: Dict[int, int]) -> None:
    """Make the host's generation file hold at least generations, newest of each
    cluster, keeping its newer ones; a damaged file is written anew."""
    path = os.path.join(config["state_dir"], GENERATION_FILE)
    fd = _host_lock(config["lock_file"])
    try:
        on_file, problem = _read_generations(path)
        newest = dict(on_file)
        for system, timeline in generations.items():
            newest[system] = max(timeline, newest.get(system, 0))
        if problem or newest != on_file:
            _write_atomically(path, "".join(f"{s} {t}\n" for s, t in sorted(newest.items())))
    finally:
        os.close(fd)


def _file_identity(path: str) -> Optional[Tuple[int, int, int]]:
    """(inode, modification time, size) of path itself, None if there is none:
    a file replaced or written since differs."""
    try:
        status = os.lstat(path)
    except OSError:
        return None
    return status.st_ino, status.st_mtime_ns, status.st_size


# ---------------------------------------------------------------------------
# This process: what it knows while it runs, and its configuration
# ---------------------------------------------------------------------------


class _Signals:
    """The signals caught, and what wakes the run loop for them and for the
    foreground parent's death."""

    def __init__(self) -> None:
        self.caught: List[int] = []            # by signal_handler, not yet acted on
        self.stop: Optional[str] = None        # the name of the signal that asked the process to stop
        self.connecting = False                # a stop signal interrupts the connect under way
        self.wakeup_fd: Optional[int] = None   # readable when a signal arrived
        self.parent_fd: Optional[int] = None   # a pidfd of the parent (foreground): readable when it exits
        self.poll_parent = False               # foreground without pidfds: look every _PARENT_POLL
        self.handover: Optional[str] = None    # the worker function's handover signal (docs/python-api.md, "Hooks")


class _Lease:
    """The process row, held as a lease (docs/sql-api.md, "One copy at a time"): when to
    renew it, and when it was last confirmed."""

    def __init__(self) -> None:
        self.next_heartbeat = 0.0              # when keepalive() is due (time.monotonic)
        self.confirmed_at = 0.0                # when the last call that found the row was sent
        self.row_gone = False                  # keepalive() found the row deleted
        self.hinted = False                    # SIGUSR1: confirm the row at once
        self.watchdog: Optional[_Watchdog] = None


class _Log:
    """The worker's logger, its log file's handler (reopened on SIGHUP), the
    one-time warnings already given, and those waiting for the logger."""

    def __init__(self) -> None:
        self.logger: Optional[logging.Logger] = None
        self.handler = None
        self.warned: set = set()
        self.pending: List[str] = []  # warnings from before the logger was set up


class _Runtime:
    """What one uniphant process knows while it runs.

    One instance per process: a worker that the manager forks starts with a
    fresh one, so nothing of its parent's run carries over but the server
    generations it has seen (a host's file of them may be gone or damaged).
    """

    def __init__(self) -> None:
        self.signals = _Signals()
        self.lease = _Lease()
        self.log = _Log()
        self.pid_file_fd: Optional[int] = None   # the locked PID file
        self.managed = False                     # forked by a manager, which reads report_fd
        self.report_fd: Optional[int] = None
        self.settings: Dict[str, Any] = {}       # given it by the desired state (workers.settings)
        self.config: Optional[Config] = None     # the runtime's own copy of the configuration
        self.pid = os.getpid()                   # the process that runs the worker
        self.next_call = 0.0                     # when the worker function is due (time.monotonic)
        self.ending: Optional[Ending] = None    # why the run ended, for the manager
        self.generations: Dict[int, int] = {}    # newest timeline seen of each cluster (system identifier)
        self.generation_file: Optional[Tuple[int, int, int]] = None  # _file_identity() as last kept
        self.config_warnings: List[str] = []     # a managed worker's, for its manager (worker_states.warnings)


_runtime = _Runtime()


def _warn(message: str) -> None:
    """A warning for the log, or for it once it is set up."""
    if _runtime.log.logger is not None:
        _runtime.log.logger.warning("%s", message)
    else:
        _runtime.log.pending.append(message)


def desired_settings() -> Dict[str, Any]:
    """The settings the desired state gave this worker (workers.settings), in a
    worker its manager started; {} in any other process."""
    return dict(_runtime.settings)


def begin_managed_child(report_fd: int, settings: str) -> None:
    """In a child a manager forked: start afresh, as a process that reports to
    the manager on report_fd and takes its desired settings (JSON, decoded
    here, so that a row no reader can decode fails this worker only).  The
    parent's configuration (its password, say), which frames still reach, is
    emptied first; the server generations it has seen are kept."""
    global _runtime
    generations = _runtime.generations
    if _runtime.config is not None:
        _runtime.config.clear()
    _runtime = _Runtime()
    _runtime.managed, _runtime.report_fd = True, report_fd
    _runtime.settings = _decoded_settings(settings)
    _runtime.generations = generations


class Ending:
    """Why a run ended: a code, which the manager that forked the process acts
    on, and the words, for people (the log, worker_states.last_exit)."""

    ROW_DELETED = "row-deleted"    # its process row was deleted: a restart from SQL, or a stop
    SIGNAL = "signal"              # a stop signal came
    PARENT_GONE = "parent-gone"    # the foreground process's parent exited
    EXIT = "exit"                  # the worker function raised SystemExit
    FAILED = "failed"              # the worker function raised anything else
    UNIPHANT = "uniphant"          # the runtime could not go on (its schema gone, say)
    HANDOVER = "handover"          # its handover signal came: a successor takes over

    def __init__(self, code: str, text: str) -> None:
        self.code = code
        self.text = text

    def __str__(self) -> str:
        return self.text


def handing_over() -> bool:
    """Whether this process's run ended to hand over to its successor (restart)."""
    return _runtime.ending is not None and _runtime.ending.code == Ending.HANDOVER


def _remember_generations(on_file: Dict[int, int], problem: Optional[str]) -> None:
    """Add what the host's file holds to what this process remembers (which a
    damaged or missing file never takes away); warn of a damaged one."""
    if problem:
        _warn(f"{problem}: it is ignored, and the newest generations this host's processes "
              f"have seen are written back")
    known = _runtime.generations
    for system, timeline in on_file.items():
        known[system] = max(timeline, known.get(system, 0))


def _write_back_generations(config: Config, on_file: Dict[int, int], problem: Optional[str]) -> None:
    """Record what this process remembers in the host's file where the file (as read:
    on_file, problem) is damaged or behind it; only a process with a host id does."""
    known = _runtime.generations
    if not (config.get("state_dir") and config.get("host_id")):
        return
    if not problem and all(on_file.get(s, -1) >= t for s, t in known.items()):
        return
    try:
        _record_generation(config, known)
    except OSError as e:  # a full disk, a directory in its place: this process knows, and goes on
        _warn(f"cannot record the server's generation in {GENERATION_FILE} ({e.strerror}): a process "
              f"started on this host later will not know to refuse an old primary")


def _keep_generation_file(config: Config) -> None:
    """At a heartbeat: write the generations this process has seen back into the
    host's file if it has gone, been damaged, or lost them, so that a process
    started later knows them.  One lstat() while the file is as last seen."""
    state_dir = config.get("state_dir")
    if not (state_dir and config.get("host_id") and _runtime.generations):
        return
    path = os.path.join(state_dir, GENERATION_FILE)
    if _file_identity(path) == _runtime.generation_file:
        return
    on_file, problem = _read_generations(path)
    _remember_generations(on_file, problem)
    _write_back_generations(config, on_file, problem)
    _runtime.generation_file = _file_identity(path)


def pg_setting(config: Config, key: str) -> str:
    """A connection key from the config files (checked when read), else the
    environment ('' if unset)."""
    value = str(config.get(key) or "").strip(_SPACE)
    if value:
        return value
    value = os.environ.get(key, "").strip(_SPACE)
    return _checked(key, value, "the environment") if value else ""


def setup_config() -> Config:
    """The configuration of the calling worker: the reserved keys, then the files' keys."""
    config = _script_config()
    config.update(RUNTIME_DEFAULTS)
    warnings: List[str] = []
    config.update(read_config_files(config, warnings, _runtime.settings))
    for warning in warnings:
        _warn(warning)
        if _runtime.managed:  # its stderr is the manager's log: ps and the page show them instead
            _runtime.config_warnings.append(warning)
        else:
            print(f"{os.path.basename(sys.argv[0])}: warning: {warning}", file=sys.stderr)
    for key in _CONNECTION_CHECKS:
        pg_setting(config, key)  # a bad value in the environment fails here, before anything starts
    try:
        os.makedirs(config["state_dir"], 0o775, exist_ok=True)
    except OSError as e:
        raise UniphantError(f"cannot create the state directory {config['state_dir']}: {e.strerror}") from None
    config["host_id"] = get_or_create_host_id(config["lock_file"], config["host_id_file"])
    config["process_id"] = new_uuid()
    config["host_name"] = os.uname().nodename
    return config


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


def _open_log_stream(config: Config):
    """The log file, opened for appending (its directory made again if it was removed)."""
    _real_dir(config["state_dir"], "log", config["worker_type"])
    fd = open_own_file(_log_file_path(config), os.O_WRONLY | os.O_APPEND | os.O_CREAT)
    return os.fdopen(fd, "a", encoding="utf-8")


def _prepare_paths(config: Config) -> None:
    """Make the log and PID directories and check the log file, before anything starts."""
    if config["log_file"] == "off" and not config["foreground"] and not _runtime.managed:
        raise ConfigError("log_file=off logs to stdout only, which a daemon has not: "
                          "run it with start -f (or under the manager)")
    _real_dir(config["state_dir"], "pid", config["worker_type"])
    if config["log_file"] == "on":
        _open_log_stream(config).close()


def _logger(config: Config) -> logging.Logger:
    import logging

    return logging.getLogger(f"uniphant.{config['worker_type']}")


def setup_logging(config: Config) -> logging.Logger:
    """The worker's logger: state_dir/log/<worker_type>/<worker_id>.log (unless
    log_file is off), and stdout in the foreground or without a log file."""
    import logging

    logger = _logger(config)
    logger.setLevel(config["log_level"])
    logger.propagate = False
    for handler in list(logger.handlers):
        logger.removeHandler(handler)
        handler.close()
    formatter = logging.Formatter("%(asctime)s %(levelname)s %(name)s[%(process)d]: %(message)s")
    handlers: List[logging.Handler] = []
    if config["log_file"] == "on":
        _runtime.log.handler = logging.StreamHandler(_open_log_stream(config))
        handlers.append(_runtime.log.handler)
    if config["foreground"] or config["log_file"] == "off":
        handlers.append(logging.StreamHandler(sys.stdout))
    for handler in handlers:
        handler.setFormatter(formatter)
        logger.addHandler(handler)
    _runtime.log.logger = logger
    for warning in _runtime.log.pending:
        logger.warning("%s", warning)
    _runtime.log.pending.clear()
    return logger


def _reopen_log(config: Config) -> None:
    """Reopen the log file (on SIGHUP): a file rotated away or removed is made anew."""
    logger, handler = _logger(config), _runtime.log.handler
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
    """No connection could be made (the message names each host tried and why);
    ``permanent`` when retrying cannot help (authentication, a missing database)."""

    def __init__(self, message: str, permanent: bool = False) -> None:
        super().__init__(message)
        self.permanent = permanent


class AlreadyRunning(UniphantError):
    """Another live process runs the worker, or this host's manager: its ``pid``,
    and the name of its ``host`` where the database knows it.  ``sqlstate`` is
    the database's code: UN003 when it is this host's own previous process
    (schema.sql lists them all)."""

    def __init__(self, message: str, sqlstate: str, pid: Optional[int], host: Optional[str]) -> None:
        super().__init__(message)
        self.sqlstate = sqlstate
        self.pid = pid
        self.host = host

    @classmethod
    def refused(cls, fields: Dict[str, str]) -> "AlreadyRunning":
        """From the server's refusal: DETAIL holds the PID, the message ends with the host."""
        message, detail = fields.get("M", ""), fields.get("D", "")
        _, on_host, host = message.rpartition(" on host ")
        return cls(printable(message), fields.get("C", ""), int(detail) if detail.isdigit() else None,
                   host if on_host else None)


# What a role refused a privilege of uniphant's is told.
_GRANT_HINT = ("the database's owner gives a role its part with uniphant.grant_role() "
               "(docs/trust-model.md, \"Database privileges\")")


class _ConnectionLost(UniphantError):
    """The server was lost: the connection broke, or the server turned read-only or into a
    standby (SQLSTATE 25006).  A running process reconnects; to a command it is an error."""


class _SchemaMissing(UniphantError):
    """The database lacks a function or table of schema.sql."""


class _NotFinished(UniphantError):
    """finish() refused (UN008): no manager started this process for its worker, as
    far as the database knows yet."""


class _SessionChanged(UniphantError):
    """The worker function changed who its session is: the runtime cannot act on it."""


def fd_readable(fd: int, timeout: float = 0.0) -> bool:
    """Whether fd has input, waiting up to timeout seconds (poll: any descriptor number)."""
    poller = select.poll()
    poller.register(fd, select.POLLIN)
    return bool(poller.poll(int(timeout * 1000)))


class _Wire:
    """The socket pg8000 talks through, posing as the file its makefile() returns.

    pg8000 reads through a BufferedReader, which may hold a notification that
    arrived right behind a reply while poll() reports the socket idle.  This
    buffer is ours, so pending() can tell, and waiting never misses a stop.
    It also remembers who the session was when it connected (``identity``) and
    which server it reached.
    """

    def __init__(self, sock: socket.socket, target: Tuple[str, int]) -> None:
        self.sock = sock
        self.target = target  # the (host, port) of PGHOST and PGPORT it reached
        self.where = _where(*target)
        self.kind = ""        # what the server was at login: a primary, a standby, ...
        self.keep_to: Optional[str] = None  # the target_session_attrs it must go on matching
        self.passed_over: List[str] = []    # old primaries refused on the way to this server
        self.identity: Tuple[Optional[str], Optional[str]] = (None, None)
        self.pooled = False  # behind a transaction pooler: one transaction per statement
        self.newest_note: Any = None  # the newest notification seen on the last look
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
        return self.pending() or fd_readable(self.sock.fileno())


def _default_socket_dir() -> str:
    return "/var/run/postgresql" if os.path.isdir("/var/run/postgresql") else "/tmp"


def _targets(config: Config) -> List[Tuple[str, int]]:
    """The (host, port) pairs to try, as libpq reads PGHOST and PGPORT: in order, or
    shuffled anew for each connection with PGLOADBALANCEHOSTS=random."""
    hosts = [h.strip() for h in pg_setting(config, "PGHOST").split(",") if h.strip()]
    hosts = hosts or [_default_socket_dir()]
    ports = [int(p) for p in (pg_setting(config, "PGPORT") or "5432").split(",")]
    if len(ports) == 1:
        ports *= len(hosts)
    if len(ports) != len(hosts):
        raise ConfigError(f"PGPORT names {len(ports)} ports for {len(hosts)} hosts in PGHOST")
    targets = list(zip(hosts, ports))
    if pg_setting(config, "PGLOADBALANCEHOSTS") == "random":
        import random

        random.shuffle(targets)
    return targets


def _where(host: str, port: int) -> str:
    return f"socket {host}/.s.PGSQL.{port}" if host.startswith("/") else f"{host}:{port}"


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
    return pg_setting(config, "PGPASSFILE") or (home and os.path.join(home, ".pgpass"))


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
        return _Wire(sock, (host, port))
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
    return _Wire(sock, (host, port))


def close_quietly(connection) -> None:
    """Close a connection that may be dead: one that cannot say goodbye is closed all the same."""
    import pg8000.dbapi

    try:
        connection.close()
    except (pg8000.dbapi.InterfaceError, OSError):
        return  # pg8000 closes the socket even when the goodbye cannot be sent


def _kind(standby: bool, read_only: bool) -> str:
    return "a standby" if standby else "a read-only server" if read_only else "a primary"


def _server_state(connection) -> Tuple[bool, bool]:
    """(in hot standby, read-only by default) of the connection's server: as it
    reported them at login (PostgreSQL 14 and later), else as it answers."""
    statuses = connection.parameter_statuses
    standby, read_only = statuses.get("in_hot_standby"), statuses.get("default_transaction_read_only")
    if standby is None or read_only is None:
        standby, read_only = connection.execute_simple(
            "SELECT CASE WHEN pg_catalog.pg_is_in_recovery() THEN 'on' ELSE 'off' END, "
            "pg_catalog.current_setting('default_transaction_read_only')").rows[0]
    return standby == "on", read_only == "on"


def _suits(wanted: str, standby: bool, read_only: bool) -> bool:
    """Whether a server suits target_session_attrs wanted, as libpq judges it."""
    writable = not (standby or read_only)
    return {"any": True, "read-write": writable, "read-only": not writable,
            "primary": not standby, "standby": standby}[wanted]


def wire_of(connection) -> Optional[_Wire]:
    # pg8000 keeps the socket it was given as _usock; only ours are _Wires.
    wire = getattr(connection, "_usock", None)
    return wire if isinstance(wire, _Wire) else None


def _appraise(connection, wanted: str) -> bool:
    """Whether the connection's server suits target_session_attrs wanted; notes what it is."""
    standby, read_only = _server_state(connection)
    wire_of(connection).kind = _kind(standby, read_only)
    return _suits(wanted, standby, read_only)


def sql_error_of(error: BaseException) -> Tuple[str, str]:
    """(SQLSTATE, message) of a pg8000 DatabaseError."""
    fields = error.args[0] if error.args and isinstance(error.args[0], dict) else {}
    return fields.get("C", ""), printable(fields.get("M", str(error)))


def _check_generation(config: Config, connection) -> Optional[str]:
    """Why the connection's server is behind the newest generation of its cluster that
    this process or its host has seen (an old primary back after a failover), or None.

    A newer generation is remembered, and written down for the host by a process
    that has a host id (a worker or a manager: not the ops commands).
    """
    import pg8000.dbapi

    wire, known = wire_of(connection), _runtime.generations
    state_dir = config.get("state_dir")
    on_file, problem = _read_generations(os.path.join(state_dir, GENERATION_FILE)) if state_dir else ({}, None)
    _remember_generations(on_file, problem)
    try:
        row = connection.execute_simple("SELECT system_identifier, timeline "
                                        "FROM uniphant.server_generation()").rows[0]
    except pg8000.dbapi.DatabaseError as e:
        code, message = sql_error_of(e)
        if code == "42501":
            message += f": {_GRANT_HINT}"
        if code not in ("42883", "3F000"):
            raise ConnectError(f"could not connect to PostgreSQL at {wire.where}: {message}",
                               permanent=True) from None
        if known:
            return "it has no uniphant.server_generation() to tell how new it is: load schema.sql"
        return None  # no uniphant schema: registering says so
    system, timeline = row
    if not (isinstance(system, int) and isinstance(timeline, int) and timeline >= 0):
        return f"its uniphant.server_generation() answered {shorten(str(row))}"
    seen = known.get(system, 0)
    if timeline < seen:
        what = "a standby behind a failover" if wire.kind == "a standby" else "an old primary"
        return f"{what}: timeline {timeline}, but timeline {seen} of this cluster has been seen; fence it"
    known[system] = timeline
    _write_back_generations(config, on_file, problem)
    return None


class _Interrupted(UniphantError):
    """A stop signal came while connecting, which may wait for ever (PGCONNECT_TIMEOUT=0)."""


def _asks_for_password(error: BaseException) -> bool:
    # pg8000 says so for clear-text and MD5; for SCRAM it fails on the missing
    # password itself, with an AttributeError.
    return isinstance(error, AttributeError) or "no password was provided" in str(error)


def _connect_failure(error: BaseException, timeout: Optional[float]) -> Tuple[str, bool]:
    """Why a connection attempt failed, and whether retrying cannot help."""
    import socket

    import pg8000.dbapi

    # pg8000 says goodbye to a server that refused it; when that write fails,
    # the server's answer is somewhere in the context of the write's error.
    answer: Optional[BaseException] = error
    while answer is not None:
        if isinstance(answer, pg8000.dbapi.DatabaseError):
            code, message = sql_error_of(answer)
            if code == "53300":
                message += (" (the server's max_connections is reached: raise it, or put PgBouncer "
                            "in transaction mode between workers and server: docs/benchmarks.md, \"Sizing\")")
            return message, code.startswith("28") or code == "3D000"
        answer = answer.__context__
    cause = error.__cause__ if isinstance(error.__cause__, OSError) else error
    if isinstance(cause, socket.timeout):
        return f"timed out after {timeout:g} s", False
    if isinstance(cause, socket.gaierror):
        return f"unknown host ({cause.strerror})", False
    if getattr(cause, "errno", None) in (errno.ENOENT, errno.ECONNREFUSED):
        return f"{cause.strerror} (is the server running, and accepting connections there?)", False
    return getattr(cause, "strerror", None) or _reason(cause), False


def _login(config: Config, host: str, port: int, user: str, database: str, sslmode: str):
    """A logged-in connection to one host, in autocommit mode; ConnectError if not."""
    import pg8000.dbapi

    timeout: Optional[float] = int(pg_setting(config, "PGCONNECT_TIMEOUT") or 10)
    timeout = max(timeout, 2) if timeout else None  # libpq: 0 waits forever, 2 s at least
    password = pg_setting(config, "PGPASSWORD") or _pgpass_password(config, host, port, database, user)
    wire = None
    try:
        wire = _open_wire(host, port, sslmode, timeout, config.get("stale_after", 60.0))
        connection = pg8000.dbapi.connect(
            user=user, database=database, password=password, sock=wire,
            ssl_context=False, application_name=config["process_id"])
    except _Interrupted:
        if wire is not None:
            wire.close()
        raise
    except ConnectError:
        raise
    except Exception as e:
        who = f"as user {printable(user)!r} to database {printable(database)!r}"
        if password is None and _asks_for_password(e):
            raise ConnectError(
                f"{who}: the server asks for a password and none is configured: set PGPASSWORD "
                f"(in a secrets.conf, say) or add a line for this server, database and user to "
                f"{_pgpass_path(config) or 'a PGPASSFILE'}", permanent=True) from None
        why, permanent = _connect_failure(e, timeout)
        raise ConnectError(f"{who}: {why}" if permanent else why, permanent) from None
    wire.sock.settimeout(None)  # the timeout is for connecting, not for the worker's queries
    statuses = connection.parameter_statuses
    wire.identity = (statuses.get("application_name"), statuses.get("session_authorization"))
    wire.pooled = config.get("pooler") == "transaction"
    connection.autocommit = True
    # pg8000 keeps the password, and what SCRAM derived from it, for logging in only.
    connection.password = connection.auth = None
    return connection


def _try_host(config: Config, target: Tuple[str, int], login: Tuple[str, str, str], attrs: str,
              may_fall_back: bool, passed_over: List[str]) -> Tuple[Any, str]:
    """Log in to one host: (the connection, "") if its server suits attrs, (the connection,
    why not) if it does not but may_fall_back, else (None, why not).  An old primary
    is refused, and noted in passed_over."""
    where = _where(*target)
    try:
        connection = _login(config, *target, *login)
    except ConnectError as e:
        if e.permanent:
            raise ConnectError(f"could not connect to PostgreSQL at {where}: {e}", permanent=True) from None
        return None, str(e)
    wanted = "standby" if attrs == "prefer-standby" else attrs
    try:
        suits = _appraise(connection, wanted)
        behind = _check_generation(config, connection) if suits or may_fall_back else None
    except UniphantError:
        close_quietly(connection)
        raise
    except Exception as e:  # the connection was lost on the way
        close_quietly(connection)
        return None, explain(e)
    wire = wire_of(connection)
    if behind is None and suits:
        wire.keep_to = wanted
        return connection, ""
    why = behind or f"{wire.kind} (target_session_attrs={attrs})"
    if behind is None and may_fall_back:
        return connection, why
    if behind is not None:
        passed_over.append(f"{where}: {behind}")
    close_quietly(connection)
    return None, why


def connect_to_server(config: Config, attrs: str, fallback: bool = False,
                tried: Optional[Dict[Tuple[str, int], str]] = None):
    """A connection to the first host whose server suits attrs (target_session_attrs);
    else, for prefer-standby or with fallback, to the first that answered (libpq's
    second pass, without logging in twice).  Never to one behind the newest
    generation of its cluster seen here.  tried: the hosts tried already, and why
    they would not do: they are not tried again, and those tried now are added."""
    tried = {} if tried is None else tried
    fallback = fallback or attrs == "prefer-standby"
    user = pg_setting(config, "PGUSER") or _os_user()
    login = (user, pg_setting(config, "PGDATABASE") or user, pg_setting(config, "PGSSLMODE") or "prefer")
    targets, passed_over = _targets(config), []
    connection = second = None  # second: the fallback, the first server that answered but did not suit
    try:
        for target in targets:
            if target in tried:
                continue
            connection, why = _try_host(config, target, login, attrs, fallback and second is None,
                                        passed_over)
            if connection is None:
                tried[target] = why
            elif why:
                second = connection
            else:
                break
        else:
            connection, second = second, None
    finally:
        if second is not None:
            close_quietly(second)
    if connection is None:
        raise ConnectError("could not connect to PostgreSQL at " + "; ".join(
            f"{_where(*target)}: {tried[target]}" for target in targets if target in tried))
    wire_of(connection).passed_over = passed_over
    return connection


def _session_attrs(config: Config) -> str:
    """target_session_attrs as set; else read-write, since uniphant's processes write."""
    return pg_setting(config, "PGTARGETSESSIONATTRS") or "read-write"


def _connect(config: Config, tried: Optional[Dict[Tuple[str, int], str]] = None):
    """connect_to_database(), given up at once when a stop signal comes (_Interrupted);
    tried: see connect_to_server."""
    _runtime.signals.connecting = True
    try:
        return connect_to_server(config, _session_attrs(config), tried=tried)
    finally:
        _runtime.signals.connecting = False


def connect_to_database(config: Config):
    """A pg8000 connection in autocommit mode whose application_name is the process id.

    Tries each host of PGHOST in turn (shuffled with PGLOADBALANCEHOSTS=random) and
    takes the first whose server suits PGTARGETSESSIONATTRS (read-write unless set)
    and is not an old primary (_check_generation); raises ConnectError with one
    line naming each host tried and why it was not taken.
    """
    return connect_to_server(config, _session_attrs(config))


def _server(connection) -> str:
    """The server a connection reached, and what it was: "host:port, a primary"."""
    wire = wire_of(connection)
    return f"{wire.where}, {wire.kind}" if wire is not None else "the database server"


def _check_server(connection) -> None:
    """A server that no longer suits the target_session_attrs it was chosen for (it
    turned read-only, or into a standby) is a lost server."""
    wire = wire_of(connection)
    if wire is None or wire.keep_to is None:
        return
    statuses = connection.parameter_statuses
    standby = statuses.get("in_hot_standby") == "on"
    read_only = statuses.get("default_transaction_read_only") == "on"
    if not _suits(wire.keep_to, standby, read_only):
        raise _ConnectionLost(f"{wire.where} is {_kind(standby, read_only)} now "
                              f"(target_session_attrs={wire.keep_to})")


def _in_transaction(connection) -> bool:
    # pg8000 keeps the status of the last ReadyForQuery: b"I" idle, b"T" in a
    # transaction, b"E" in a failed one; None before the first query.
    return connection._transaction_status in (b"T", b"E")


def _check_session(config: Config, connection) -> None:
    """Refuse to act for this process on a session whose identity the worker function
    changed: keyed by application_name and bound to the session's user, the
    runtime's calls would act on another row, or on none."""
    wire = wire_of(connection)
    statuses = connection.parameter_statuses
    if statuses.get("application_name") != config["process_id"]:
        raise _SessionChanged("the worker function changed its session's application_name")
    if wire is not None and statuses.get("session_authorization") != wire.identity[1]:
        raise _SessionChanged("the worker function changed its session's user "
                              "(SET SESSION AUTHORIZATION)")


# The channel a process hears the deletion of its row on is this prefix and
# its process id's hex digits (schema.sql: processes_notify_stop).
_PROCESS_CHANNEL = "uniphant_"


def _channel(config: Config) -> str:
    """The channel a deleted process row is announced on (schema.sql: processes_notify_stop)."""
    return _PROCESS_CHANNEL + config["process_id"].replace("-", "")


def take_notifications(connection, channel: str) -> bool:
    """Whether notifications came on channel (taking them off the queue, and leaving
    those of the worker's own channels); a full queue may have dropped one, so it
    counts too."""
    notes = connection.notifications
    if not notes:
        return False
    wire = wire_of(connection)
    full = (notes.maxlen is not None and len(notes) >= notes.maxlen
            and (wire is None or notes[-1] is not wire.newest_note))  # and something came since
    others = [note for note in notes if note[1] != channel]
    hinted = full or len(others) != len(notes)
    if hinted:
        notes.clear()
        notes.extend(others)
    if wire is not None:
        wire.newest_note = notes[-1] if notes else None
    return hinted


def in_one_transaction(connection, action: Callable[[], Any]) -> Any:
    """action()'s result, with all it sends in one transaction (rolled back if it fails)."""
    connection.execute_simple("BEGIN")
    try:
        result = action()
    except BaseException:
        connection.execute_simple("ROLLBACK")
        raise
    connection.execute_simple("COMMIT")
    return result


def query_rows(connection, sql: str, params: tuple = ()) -> List[list]:
    """The rows of one of the runtime's own calls, SQL with $1-style parameters.

    It goes around pg8000's cursor, which would open a transaction if the worker
    function had switched autocommit off.  A refusal, a missing schema or any
    other SQL error becomes a UniphantError; a server found read-only, _ConnectionLost.
    """
    import pg8000.dbapi

    wire = wire_of(connection)
    try:
        if not params:
            context = connection.execute_simple(sql)
        elif wire is not None and wire.pooled and not _in_transaction(connection):
            # A parameterised statement takes pg8000 three round trips, which a
            # transaction pooler may give to three server connections: one
            # transaction keeps them on one.
            context = in_one_transaction(connection, lambda: connection.execute_unnamed(sql, params))
        else:
            context = connection.execute_unnamed(sql, params)
    except pg8000.dbapi.DatabaseError as e:
        code, message = sql_error_of(e)
        if code == "25006":  # read_only_sql_transaction: a standby, or a server made read-only
            raise _ConnectionLost(f"{wire.where if wire else 'the server'} is read-only: {message}") from None
        if code in ("UN001", "UN003", "UN005"):
            raise AlreadyRunning.refused(e.args[0]) from None
        if code in ("UN004", "UN007"):
            raise UniphantError(message) from None
        if code == "22023":  # a bad argument: bad usage, as the command line has it
            raise ConfigError(message) from None
        if code == "UN008":
            raise _NotFinished(message) from None
        if code in ("42883", "42P01", "3F000"):
            raise _SchemaMissing(f"the database has no uniphant schema ({message}): "
                                f"load schema.sql") from None
        if code == "42501":
            raise UniphantError(f"{message}: {_GRANT_HINT}") from None
        raise UniphantError(f"database error {code}: {message}") from None
    return context.rows or []


def query_row(connection, sql: str, params: tuple = ()) -> Optional[list]:
    """The first row of one of the runtime's own calls (see query_rows)."""
    rows = query_rows(connection, sql, params)
    return rows[0] if rows else None


def register_host(config: Config, connection) -> None:
    """Register this host, and check that the database's schema is recent enough."""
    try:
        row = query_row(connection, "SELECT uniphant.schema_version(), current_database(), "
                    "uniphant.register_host($1::uuid, $2)", (config["host_id"], config["host_name"]))
    except _SchemaMissing:
        # Releases 1 and 2 kept their objects in public; 1 had no version function.
        row = query_row(connection, "SELECT CASE WHEN to_regprocedure('public.uniphant_schema_version()') "
                    "IS NOT NULL THEN 2 WHEN to_regprocedure('public.keepalive()') IS NOT NULL THEN 1 END, "
                    "current_database()")
    version, database = row[:2]
    if version is None or version < SCHEMA_VERSION:
        found = "no uniphant schema" if version is None else f"uniphant schema version {version}"
        raise UniphantError(f"the database {printable(database)} has {found}, and this uniphant "
                            f"needs version {SCHEMA_VERSION}: load schema.sql")


def _listen(config: Config, connection) -> None:
    """Listen for the deletion of this process's row, unless a transaction pooler
    is in the way (it would lose the LISTEN: the manager relays with SIGUSR1)."""
    import pg8000.dbapi

    if config["pooler"] == "none":
        try:
            # The channel is built from hex digits of our own process id: safe to format.
            connection.execute_simple(f"LISTEN {_channel(config)}")
        except pg8000.dbapi.DatabaseError as e:
            code, message = sql_error_of(e)
            if code == "25006":  # a standby
                raise _ConnectionLost(f"{wire_of(connection).where} is read-only: {message}") from None
            raise


# How long a start waits for this host's previous process of the worker, and
# its session, to end.
_SESSION_END_WAIT = 2.0


def holds_open(pid: int, path: str) -> bool:
    """Whether process pid has the file at path open, also if it was removed since.

    The kernel's word on a PID that a process row names: a live copy of a
    worker keeps its PID file open (a removed pid/ directory or not), any other
    process does not.  A process this user may not look into is not one of its
    workers: a project root's PID files are one user's.
    """
    target = os.path.join(os.path.realpath(os.path.dirname(path)), os.path.basename(path))
    try:
        descriptors = os.listdir(f"/proc/{pid}/fd")
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return False
    for name in descriptors:
        try:
            if os.readlink(f"/proc/{pid}/fd/{name}") in (target, target + " (deleted)"):
                return True
        except OSError:
            continue  # closed meanwhile
    return False


def _take_lease(config: Config, connection, granted: float) -> None:
    """Keep to the shorter lease the database granted: heartbeats, the watchdog and the
    socket's dead-peer probes all follow config's stale_after."""
    import socket

    _logger(config).warning("stale_after %g s is above the longest lease the database grants; "
                            "running with %g s (docs/configuration.md)", config["stale_after"], granted)
    config["stale_after"] = granted
    wire = wire_of(connection)
    if wire is not None and wire.sock.family != socket.AF_UNIX:
        _detect_dead_peers(wire.sock, granted)


def register_process(config: Config, connection) -> None:
    """Listen for the deletion of this process's row, then register the process for
    its worker (in that order: a deletion right after the registration is heard).

    A row of this host's previous process is taken over once the kernel says
    that PID does not run the worker here, that is has not its PID file open
    (the database cannot look: it asks, UN003).  Raises UniphantError
    naming the running process (AlreadyRunning) when another one runs the worker.
    The database may grant a shorter lease than stale_after asks: config then
    holds the lease granted, which the heartbeats and the watchdog keep to.
    """
    _listen(config, connection)
    deadline, gone_pid = time.monotonic() + _SESSION_END_WAIT, None
    while True:
        try:
            granted = query_row(connection, "SELECT extract(epoch FROM uniphant.register_process($1::uuid, "
                            "$2::uuid, $3, $4, make_interval(secs => $5), $6, $7))::float8",
                            (config["worker_id"], config["host_id"], config["worker_type"], os.getpid(),
                             float(config["stale_after"]), config["pooler"] != "none", gone_pid))[0]
            break
        except AlreadyRunning as e:
            if e.sqlstate != "UN003" or time.monotonic() >= deadline:
                raise
            holder = e.pid
            if holder is not None and holder != gone_pid and not holds_open(holder, get_pid_file_path(config)):
                gone_pid = holder
                continue  # ask again at once, now that we have looked
        time.sleep(0.02)
    if granted < config["stale_after"]:
        _take_lease(config, connection, granted)


def keepalive(connection) -> bool:
    """Record a heartbeat; false when the process row is gone and the worker must stop."""
    return bool(query_row(connection, "SELECT uniphant.keepalive()")[0])


# How a process leaves: its row removed, and, for a worker that finished
# (restart=on-failure, exit 0), its desired worker marked done too.
_LEAVE, _FINISH = "SELECT uniphant.disconnect()", "SELECT uniphant.finish()"


def _call_leave(config: Config, connection, leave: str) -> None:
    """Leave on connection.  A finish the database refuses (UN008) is asked again for
    a moment in a worker a manager forked (one that ends at once may finish before
    its manager has reported starting it), then the row is only removed: the
    worker is not done, and its manager starts it again."""
    deadline = time.monotonic() + _SESSION_END_WAIT
    while True:
        try:
            query_row(connection, leave)
            return
        except _NotFinished as e:
            if not _runtime.managed or time.monotonic() >= deadline:
                _logger(config).warning("%s", e)
                break
        time.sleep(0.05)
    query_row(connection, _LEAVE)


def disconnect(connection) -> None:
    """Remove this process's row, then close the connection."""
    try:
        query_row(connection, _LEAVE)
    finally:
        close_quietly(connection)


def _disconnect_quietly(connection) -> None:
    """After a failed start: remove a row it may have made, as far as the database
    still answers (the start's own error is the one to report)."""
    try:
        disconnect(connection)
    except Exception:
        return  # the start's error says what went wrong; a row left is taken over


def _connect_for(config: Config, first_write: Callable[[Any], None],
                 leave: Callable[[Any], None] = close_quietly):
    """A connection on which first_write went through: a server that turns out read-only
    only then (SQLSTATE 25006) is passed over like a standby, and the next host
    tried; no host is tried twice.  leave: what to do with a connection given up."""
    tried: Dict[Tuple[str, int], str] = {}
    while True:
        connection = _connect(config, tried)
        target = wire_of(connection).target
        try:
            first_write(connection)
            return connection
        except _ConnectionLost as e:
            tried[target] = f"read-only at the first write ({e})"
            leave(connection)
        except BaseException:
            leave(connection)
            raise

def _remove_row(config: Config, patience: float, leave: str = _LEAVE) -> bool:
    """Remove this process's row from a new session (with leave); whether it did.

    Not while another session of the process is still connected (the backend
    of a process that was killed may run on in one of its statements): wait
    for that up to patience seconds.  Behind a pooler there is no such session.
    """
    connection = _connect(config)
    deadline = time.monotonic() + patience
    try:
        while config["pooler"] == "none" and query_row(
                connection, "SELECT EXISTS (SELECT 1 FROM pg_stat_activity WHERE pid <> pg_backend_pid() "
                "AND application_name = current_setting('application_name'))")[0]:
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.05)
        _call_leave(config, connection, leave)
        return True
    finally:
        close_quietly(connection)


# ---------------------------------------------------------------------------
# Process management
# ---------------------------------------------------------------------------


# What each catchable signal whose default action ends a process does to a
# worker (docs/command-line.md, "Signals").  Faults (SIGSEGV, SIGBUS, SIGILL, SIGFPE, SIGSYS)
# keep their default: a process that got a real one cannot run on.
_STOP_SIGNALS = ("SIGTERM", "SIGINT", "SIGQUIT", "SIGABRT", "SIGXCPU", "SIGPWR")
_REOPEN_SIGNAL = "SIGHUP"
_CONFIRM_SIGNAL = "SIGUSR1"  # confirm the row now: the manager's relay of a stop behind a pooler
_IGNORED_SIGNALS = ("SIGUSR2", "SIGALRM", "SIGVTALRM", "SIGPROF", "SIGIO",
                    "SIGSTKFLT", "SIGTRAP")  # and every real-time signal


def signal_name(sig: int) -> str:
    import signal

    try:
        return signal.Signals(sig).name
    except ValueError:
        return f"SIGRTMIN+{sig - signal.SIGRTMIN}"


def signal_handler(sig: int, frame: Any) -> None:
    """Note a signal; the run loop acts on it at once (the wakeup pipe wakes it).
    A stop signal also interrupts a connection attempt under way."""
    _runtime.signals.caught.append(sig)
    if _runtime.signals.connecting and signal_name(sig) in _STOP_SIGNALS:
        _runtime.signals.connecting = False
        raise _Interrupted(f"{signal_name(sig)} received while connecting")


def _signal_number(name: str) -> int:
    import signal

    return getattr(signal, name)


def _install_signal_handlers() -> None:
    import signal

    names = _STOP_SIGNALS + (_REOPEN_SIGNAL, _CONFIRM_SIGNAL) + _IGNORED_SIGNALS
    signals = [getattr(signal, name) for name in names if hasattr(signal, name)]
    for sig in signals + list(range(signal.SIGRTMIN, signal.SIGRTMAX + 1)):
        signal.signal(sig, signal_handler)


def _act_on_signals(config: Config) -> None:
    """Act on the signals caught since the last look: note a stop or a hint to
    confirm the row, reopen the log, or log that one was ignored."""
    signals = _runtime.signals
    while signals.caught:
        name = signal_name(signals.caught.pop(0))
        if name in _STOP_SIGNALS or name == signals.handover:
            signals.stop = signals.stop or name
        elif name == _CONFIRM_SIGNAL:
            _runtime.lease.hinted = True
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
        fd = open_own_file(pid_file, os.O_RDONLY)
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
    fd = open_own_file(pid_file, os.O_RDWR | os.O_CREAT)
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
        with os.fdopen(open_own_file(pid_file, os.O_RDONLY), encoding="ascii", errors="replace") as f:
            lines = f.read(200).splitlines()
    except (OSError, UniphantError):
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


def stop_running_process(pid_file: str, timeout: float = 10.0, sig: Optional[int] = None) -> Optional[int]:
    """Stop the worker holding pid_file: sig (SIGTERM), then SIGKILL after timeout seconds.

    Returns the signal that ended it, or None if it was not running.  Only the
    holder of the PID file's lock is ever signalled.
    """
    import signal

    sig = sig or signal.SIGTERM
    pid = get_pid_for_running_process(pid_file)
    if pid is None:
        return None
    _signal_holder(pid_file, pid, sig)
    if _wait_for_exit(pid_file, pid, timeout):
        return sig
    if not _signal_holder(pid_file, pid, signal.SIGKILL):
        return sig  # it went just in time
    _wait_for_exit(pid_file, pid, 10.0)
    return signal.SIGKILL


# What a starting process tells whoever waits for it (the `start` command, or
# the manager that forked it), one line each: a word, then its fields, the
# last of which is any text (on one line).  `ready PID STOP_TIMEOUT`: it has
# registered; `error WHY`: it could not start; `exit CODE WHY`: its run ended
# (the codes: see Ending); `warning TEXT`: one of its configuration's warnings.
_REPORT_FIELDS = {"ready": 2, "error": 1, "exit": 2, "warning": 1}


def _report_line(word: str, *fields: Any) -> bytes:
    text = " ".join(str(fields[-1]).split())
    return (" ".join([word, *map(str, fields[:-1]), text]) + "\n").encode("utf-8", "replace")


def parse_report(line: bytes) -> Tuple[str, List[str]]:
    """(word, fields) of a report line; missing fields are empty."""
    word, _, rest = line.decode("utf-8", "replace").rstrip("\n").partition(" ")
    count = _REPORT_FIELDS.get(word, 1)
    fields = rest.split(" ", count - 1)
    return word, fields + [""] * (count - len(fields))


def _tell(fd: int, word: str, *fields: Any) -> None:
    """Report to the waiting `start` command, which may have gone: the daemon runs on regardless."""
    import contextlib

    with contextlib.suppress(BrokenPipeError):
        os.write(fd, _report_line(word, *fields))
    os.close(fd)


def report_to_manager(word: str, *fields: Any) -> None:
    """In a worker the manager forked: tell it how the start went, or why the run
    ended (see _Child.read_reports)."""
    import contextlib

    if _runtime.managed:
        with contextlib.suppress(BrokenPipeError):  # the manager has gone: we run on regardless
            os.write(_runtime.report_fd, _report_line(word, *fields))


def _warn_once(logger: logging.Logger, message: str) -> None:
    if message not in _runtime.log.warned:
        _runtime.log.warned.add(message)
        logger.warning(message)


def sd_notify(*lines: str) -> None:
    """Tell systemd about this process, where NOTIFY_SOCKET asks (sd_notify(3)):
    one datagram of KEY=VALUE lines; a leading @ names an abstract socket."""
    import socket

    address = os.environ.get("NOTIFY_SOCKET", "")
    if not address:
        return
    if address.startswith("@"):
        address = "\0" + address[1:]
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
        try:
            sock.sendto("\n".join(lines).encode(), address)
        except OSError as e:
            if _runtime.log.logger is not None:
                _warn_once(_runtime.log.logger, f"cannot notify systemd at {address!r}: {e.strerror}")


def watchdog_period() -> float:
    """Seconds between WATCHDOG=1 messages: half of WATCHDOG_USEC, if systemd asks
    this process for them; else 0."""
    usec, pid = os.environ.get("WATCHDOG_USEC", ""), os.environ.get("WATCHDOG_PID", "")
    if not is_whole(usec, 1, 2 ** 63) or (pid and pid != str(os.getpid())):
        return 0.0
    return int(usec) / 2e6


def _describe(config: Config) -> str:
    return f"Worker {config['worker_type']} with ID {config['worker_id']}"


def _already_running(config: Config, pid: Optional[int]) -> str:
    return f"{_describe(config)} is already running with PID {pid}."


# ---------------------------------------------------------------------------
# The run loop
# ---------------------------------------------------------------------------

def _register(config: Config, connection, worker_function: WorkerFunction) -> None:
    """Register this process for its worker, then run the worker function's
    prepare hook, if it has one; a failure of either removes the row it may
    have made, and is a failed start."""
    try:
        register_process(config, connection)
        prepare = getattr(worker_function, "prepare", None)
        if prepare is not None:
            prepare(config, _logger(config), connection)
    except BaseException:
        _disconnect_quietly(connection)
        raise


class _Watchdog:
    """Ends the process when it loses its database session while the worker
    function runs and cannot confirm its row before another host may take the
    worker over (docs/sql-api.md, "One copy at a time").

    A thread, since the worker function may be anywhere (asleep, computing, in a
    C call).  It never touches the connection's protocol: it polls the socket
    for a hang-up and watches the clock.  Nothing can happen before the lease's
    deadline, so it sleeps until then: a call that ends before it costs the
    thread no wake-up (an idle worker calls its function every interval).
    """

    def __init__(self, config: Config, logger: logging.Logger) -> None:
        import threading

        # Behind a transaction pooler no session proves the process alive: the
        # lease runs out whether or not the socket hangs up.
        self._pooled = config["pooler"] != "none"
        stale_after = config["stale_after"]
        # The lease counts from the heartbeat before the last confirmed one: the
        # last may be lost in a crash of the server (schema.sql: keepalive), and
        # keepalive() writes at most once a second.  The margin is for scheduling.
        self._grace = stale_after - _heartbeat_period(config) - 1.0 - max(0.5, stale_after / 10)
        self._logger = logger
        self._lock = threading.Condition()
        self._call: Optional[Tuple[int, int]] = None  # generation, fd
        self._generation = 0
        self._wakes_at = 0.0     # when the thread looks next (time.monotonic; inf: when told)
        self._watching = False   # it watches a call that has outlived the deadline
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        threading.Thread(target=self._watch, name="uniphant-watchdog", daemon=True).start()

    def _deadline(self) -> float:
        """When a call still running must be watched: its lease's grace is over then."""
        return _runtime.lease.confirmed_at + self._grace

    def enter(self, wire: Optional[_Wire]) -> None:
        """A call of the worker function begins on wire's session.

        The thread watches a duplicate of the socket: the worker function may
        close its connection, and its descriptor number may then name a file.
        """
        with self._lock:
            self._generation += 1
            self._call = None if wire is None else (self._generation, os.dup(wire.fileno()))
            if self._wakes_at > self._deadline():
                self._lock.notify()  # it sleeps past the deadline: no call was running then

    def leave(self) -> None:
        with self._lock:
            self._generation += 1
            call, self._call = self._call, None
            watching = self._watching
            if watching:
                self._lock.notify()
        if watching:
            _poke(self._wake_w)
        if call is not None:
            # The thread may still poll this number, even once reused: the wake-up
            # ends that poll, and the generation voids what it saw.
            os.close(call[1])

    def _watch(self) -> None:
        import math

        while True:
            with self._lock:
                now, deadline = time.monotonic(), self._deadline()
                if now < deadline or self._call is None:
                    self._wakes_at = deadline if now < deadline else math.inf
                    self._lock.wait(None if self._wakes_at == math.inf else self._wakes_at - now)
                    continue
                generation, fd = self._call
                self._watching = True
            try:
                if self._pooled or self._hung_up(fd):
                    self._expire_unless_left(generation)
            finally:
                with self._lock:
                    self._watching = False

    def _hung_up(self, fd: int) -> bool:
        """Wait until the session's socket hangs up (true) or the call ends (false)."""
        poller = select.poll()
        poller.register(fd, select.POLLRDHUP)  # hang-ups and errors are always reported
        poller.register(self._wake_r, select.POLLIN)
        events = dict(poller.poll())
        _drain(self._wake_r)
        lost = select.POLLRDHUP | select.POLLHUP | select.POLLERR | select.POLLNVAL
        return bool(events.get(fd, 0) & lost)

    def _expire_unless_left(self, generation: int) -> None:
        """Exit unless the call ends before the lease runs out (alive() renews it)."""
        with self._lock:
            while self._generation == generation:
                remaining = self._deadline() - time.monotonic()
                if remaining <= 0:
                    self._logger.critical(
                        "exiting: %s, and the call did not return in time to confirm the process "
                        "row before another host may take the worker over",
                        "the worker function ran long behind a transaction pooler" if self._pooled
                        else "the database session was lost during a call of the worker function")
                    os._exit(EXIT_FAILURE)
                self._lock.wait(remaining)


def _heartbeat_period(config: Config) -> float:
    """Seconds between heartbeats: 0.35 of stale_after (21 s at the default 60), so
    the row never looks stale, a 200-worker fleet writes under 10 a second, and the
    smallest stale_after (3 s) writes no more than one a second.  A deleted row
    reaches the process by notification, not by heartbeat."""
    return config["stale_after"] * 0.35


def _log_passed_over(logger: logging.Logger, connection) -> None:
    """Log each old primary refused on the way to the connection's server."""
    wire = wire_of(connection)
    for refusal in wire.passed_over if wire is not None else ():
        logger.warning("refused %s", refusal)


class _WorkerExit(Exception):
    """The worker function ended the worker (an exception, SystemExit): exit with code."""

    def __init__(self, code: int) -> None:
        super().__init__(code)
        self.code = code


def is_lost(connection) -> bool:
    try:
        connection.execute_simple("")
    except Exception:
        return True
    return False


def _local_stop_reason(config: Config) -> Optional[Ending]:
    """A reason to stop that needs no database: a signal, or the parent's death."""
    _act_on_signals(config)
    signals = _runtime.signals
    if signals.stop:
        code = Ending.HANDOVER if signals.stop == signals.handover else Ending.SIGNAL
        return Ending(code, f"{signals.stop} received")
    if config["foreground"] and not is_parent_alive(config["parent_pid"]):
        return Ending(Ending.PARENT_GONE, "the parent process has gone")
    return None


# Reconnection backoff: doubles from the first delay up to the cap, each wait
# drawn at random from its upper half so a fleet does not retry in step.
_BACKOFF_FIRST, BACKOFF_CAP = 0.05, 2.0


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


# How often to look for the parent's death where pidfds are not available.
_PARENT_POLL = 0.25


def _drain(fd: int) -> None:
    try:
        while os.read(fd, 512):
            continue
    except BlockingIOError:
        return  # empty: what it was for has been seen


def wait_for_wakeup(seconds: float, connection=None, also: Tuple[int, ...] = ()) -> bool:
    """Sleep up to seconds; wake early for a signal, a database message, the parent's
    death, or input on one of the descriptors also (then return true)."""
    signals = _runtime.signals
    poller = select.poll()
    for fd in (signals.wakeup_fd, *also):
        poller.register(fd, select.POLLIN)
    if signals.parent_fd is not None:
        poller.register(signals.parent_fd, select.POLLIN)
    if signals.poll_parent:
        seconds = min(seconds, _PARENT_POLL)
    wire = wire_of(connection)
    if wire is not None:
        if wire.pending():
            return False
        poller.register(wire.fileno(), select.POLLIN)
    events = poller.poll(int(seconds * 1000) + 1) if seconds > 0 else poller.poll(0)
    if any(fd == signals.wakeup_fd for fd, _ in events):
        _drain(signals.wakeup_fd)  # a byte written after the poll wakes the next one at once
    return any(fd in also for fd, _ in events)


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
            connection = _connect_for(config, lambda c: _listen(config, c))
        except _Interrupted:
            continue  # the loop's condition sees the signal
        except ConnectError as e:
            if e.permanent:
                raise
            failure = str(e)
        except UniphantError:
            raise
        except Exception as e:
            failure = explain(e)
        else:
            _tolerate_any_notification(connection)
            _log_passed_over(logger, connection)
            logger.info("database connection restored after %.1f s: %s",
                        time.monotonic() - lost_at, _server(connection))
            _runtime.lease.next_heartbeat = 0.0  # ask at once whether the row survived the outage
            return connection
        (logger.debug if failure in seen else logger.warning)("reconnecting: %s", failure)
        seen.add(failure)
        wait_for_wakeup(random.uniform(delay / 2, delay))
        delay = min(delay * 2, BACKOFF_CAP)
    return None


def _end_forked_child(logger: logging.Logger, code: int) -> None:
    """A process that the worker function forked came back into the runtime
    (returned or raised instead of exiting): end it, touching nothing of the
    worker's (its row, its session, its PID file)."""
    logger.warning("a process the worker function forked returned into uniphant: "
                   "ending it with exit code %d", code)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def _exit_code(error: BaseException) -> int:
    if isinstance(error, SystemExit):
        code = error.code
        return code if isinstance(code, int) else EXIT_OK if code is None else EXIT_FAILURE
    return EXIT_FAILURE


def _settle(config: Config, connection, logger: logging.Logger) -> None:
    """After a call: roll back a transaction the worker function left open (it
    would hold back the heartbeat and a DELETE of the row), and make sure the
    session is still this process's."""
    if _in_transaction(connection):
        connection.execute_simple("ROLLBACK")
        _warn_once(logger, "the worker function returned inside a transaction: rolled it back "
                           "(commit or roll back before returning)")
    _check_session(config, connection)


def _worker_failure(config: Config, connection, logger: logging.Logger, error: BaseException) -> BaseException:
    """What a worker function's exception means: the runtime's own error, an exit
    it asked for, a lost connection, or its failure (logged with its traceback)."""
    rt = _runtime
    if isinstance(error, UniphantError):
        return error  # from alive(): the runtime's own, never the worker function's failure
    if isinstance(error, SystemExit):
        code = _exit_code(error)
        rt.ending = Ending(Ending.EXIT, f"the worker function raised SystemExit({error.code!r})")
        (logger.info if code == EXIT_OK else logger.error)("stopping: %s", rt.ending)
        return _WorkerExit(code)
    if is_lost(connection):
        return _ConnectionLost(explain(error))
    try:
        _check_server(connection)  # what it did failed because the server turned read-only
    except _ConnectionLost as e:
        return e
    logger.error("stopping: the worker function failed", exc_info=error)
    rt.ending = Ending(Ending.FAILED, explain(error))  # the exception's last line, for the manager
    return _WorkerExit(EXIT_FAILURE)


def _call_worker(config: Config, worker_config: Config, connection,
                 worker_function: WorkerFunction, logger: logging.Logger) -> None:
    """Call the worker function once (with worker_config, its own copy of the
    configuration), under the watchdog, and settle the session.

    Raises _WorkerExit when the worker function ends the worker, and
    _ConnectionLost when the connection broke under it.
    """
    rt = _runtime
    rt.lease.watchdog.enter(wire_of(connection))
    try:
        worker_function(worker_config, logger, connection)
        if os.getpid() != rt.pid:
            _end_forked_child(logger, EXIT_OK)
    except BaseException as e:
        if os.getpid() != rt.pid:
            _end_forked_child(logger, _exit_code(e))
        raise _worker_failure(config, connection, logger, e) from None
    finally:
        if os.getpid() == rt.pid:
            rt.lease.watchdog.leave()
    _settle(config, connection, logger)


_ROW_DELETED = Ending(Ending.ROW_DELETED, "its process row was deleted")


def _stop_reason(config: Config, connection) -> Optional[Ending]:
    """Why the worker must stop now, or None.

    Between transactions it reads what the database sent, and asks keepalive()
    when a notification hints at a deleted row or a heartbeat is due.  Inside
    one of the worker function's transactions it looks at signals only: a
    heartbeat there would hold the row's lock until the transaction ends.
    """
    reason = _local_stop_reason(config)
    lease = _runtime.lease
    if reason is not None or _in_transaction(connection):
        return reason
    if lease.row_gone:
        return _ROW_DELETED
    wire = wire_of(connection)
    if wire is not None and wire.readable():
        connection.execute_simple("")  # lets pg8000 read what has arrived
    _check_server(connection)
    now = time.monotonic()
    # A notification is a hint only: any role may NOTIFY any channel.
    hinted = take_notifications(connection, _channel(config)) or lease.hinted
    lease.hinted = False
    if hinted or now >= lease.next_heartbeat:
        _check_session(config, connection)
        if not keepalive(connection):
            lease.row_gone = True
            return _ROW_DELETED
        if hinted:
            _logger(config).debug("a hint to stop (a notification, or SIGUSR1), but the "
                                  "row is still there: not a stop")
        lease.confirmed_at = now
        lease.next_heartbeat = now + _heartbeat_period(config)
        _keep_generation_file(config)
    return None


def _serve(config: Config, worker_config: Config, connection, worker_function: WorkerFunction,
           logger: logging.Logger) -> Ending:
    """Call the worker function until it must stop; return why.

    It is called every interval, or, if it has a wakeup hook (docs/python-api.md, "Hooks"),
    whenever that says.  The schedule lives in the runtime state, so a
    reconnect does not bring the next call forward.
    """
    rt = _runtime
    wakeup = getattr(worker_function, "wakeup", None)
    woken = False
    while True:
        reason = _stop_reason(config, connection)
        if reason is not None:
            return reason
        due, fds = wakeup(worker_config, connection) if wakeup else (rt.next_call, ())
        now = time.monotonic()
        if woken or now >= due:
            _call_worker(config, worker_config, connection, worker_function, logger)
            if wakeup and rt.next_call == 0.0 and config["foreground"]:
                sd_notify("READY=1")  # a stepping worker is ready once its first step is done
            rt.next_call = time.monotonic() + config["interval"]
            woken = False
        else:
            woken = wait_for_wakeup(min(due, rt.lease.next_heartbeat) - now, connection, fds)


def _run_loop(config: Config, worker_config: Config, connection, worker_function: WorkerFunction,
              logger: logging.Logger) -> Tuple[int, Any]:
    """Serve, reconnecting after each lost connection, until the run ends; the exit
    code, and the connection it ended on (None if it ended unconnected)."""
    rt = _runtime
    try:
        while True:
            try:
                rt.ending = _serve(config, worker_config, connection, worker_function, logger)
                logger.info("stopping: %s", rt.ending)
                return EXIT_OK, connection
            except _WorkerExit as e:
                return e.code, connection
            except _ConnectionLost as e:
                error = str(e)
            except UniphantError:
                raise
            except Exception as e:
                if not is_lost(connection):
                    raise
                error = explain(e)
            close_quietly(connection)
            connection = None  # should reconnecting fail, there is none to leave on
            connection = _reconnect(config, logger, error)
            if connection is None:
                rt.ending = _local_stop_reason(config)
                logger.info("stopping: %s", rt.ending)
                return EXIT_OK, None
    except UniphantError as e:
        rt.ending = Ending(Ending.UNIPHANT, str(e))
        logger.error("stopping: %s", e)
    except Exception as e:
        rt.ending = Ending(Ending.UNIPHANT, f"uniphant failed: {explain(e)}")
        logger.exception("stopping: uniphant failed")
    return EXIT_FAILURE, connection


def _leave(config: Config, connection, logger: logging.Logger, leave: str = _LEAVE) -> None:
    """Remove this process's row (with leave) and close its connection: on that
    connection if the worker function left it fit, else on a new one."""
    if connection is None:
        logger.warning("could not remove the process row (database unreachable); "
                       "the next start takes it over")
        return
    try:
        if _in_transaction(connection):
            connection.execute_simple("ROLLBACK")
        _check_session(config, connection)
        _call_leave(config, connection, leave)
        close_quietly(connection)
        return
    except Exception as e:
        close_quietly(connection)
        logger.debug("cannot remove the process row on its own connection: %s", explain(e))
    try:
        # A new session is this process's own again, once the old one has ended.
        if _remove_row(config, patience=_SESSION_END_WAIT, leave=leave):
            return
        reason = "its old session did not end"
    except Exception as e:
        reason = explain(e)
    logger.warning("could not remove the process row (%s); the next start takes it over", reason)


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


def _teardown(config: Config, worker_config: Config, connection, worker_function: WorkerFunction,
              logger: logging.Logger, code: int) -> None:
    """The end of every run: the worker function's teardown hook, then the row
    removed (and, where restart=on-failure and the worker function exited 0,
    its desired worker marked done), the PID file emptied, and the manager (if
    one forked this process) told why."""
    if config["foreground"]:
        sd_notify("STOPPING=1")
    teardown = getattr(worker_function, "teardown", None)
    if teardown is not None:
        try:
            teardown(worker_config, logger)
        except Exception:
            logger.exception("the worker function's teardown hook failed")
    ending = _runtime.ending or Ending(Ending.UNIPHANT, "uniphant failed")
    finished = code == EXIT_OK and ending.code == Ending.EXIT and config["restart"] == "on-failure"
    if _runtime.lease.row_gone:  # keepalive() saw it deleted: there is nothing to remove
        close_quietly(connection)
    else:
        _leave(config, connection, logger, _FINISH if finished else _LEAVE)
    _release_pid_file()
    _note_leftover_threads(logger)
    report_to_manager("exit", ending.code, ending.text)


def _watch_for_wakeups(config: Config) -> None:
    """Make signals and the parent's death wake wait_for_wakeup()."""
    import signal

    signals = _runtime.signals
    read_fd, write_fd = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
    signal.set_wakeup_fd(write_fd)
    signals.wakeup_fd = read_fd
    if config["foreground"]:
        try:
            signals.parent_fd = os.pidfd_open(config["parent_pid"])
        except (AttributeError, OSError):
            signals.poll_parent = True  # no pidfd support, or already gone


def run(config: Config, connection, worker_function: WorkerFunction, pid_file: str) -> int:
    """Run the worker until it must stop; remove its row and return the exit code.

    The caller has registered the process and holds the lock on pid_file, which
    is emptied on the way out.  A lost connection is not a failure: the loop
    reconnects and resumes if the row is still there.  An exception from the
    worker function is: exit 1.
    """
    logger = _logger(config)
    rt = _runtime
    # The worker function gets config, and may change it; the runtime acts on
    # its own copy (a changed process_id must not aim its calls at another row).
    worker_config, config = config, dict(config)
    rt.config, rt.pid = config, os.getpid()
    _watch_for_wakeups(config)
    _tolerate_any_notification(connection)
    rt.lease.watchdog = _Watchdog(config, logger)
    rt.lease.confirmed_at = time.monotonic()  # registering has just made the row
    rt.lease.next_heartbeat = rt.lease.confirmed_at + _heartbeat_period(config)
    _log_passed_over(logger, connection)
    logger.info("worker %s started: process %s, PID %d, host %s, uniphant %s, database %s",
                config["worker_id"], config["process_id"], os.getpid(), config["host_name"],
                __version__, _server(connection))
    if config["foreground"] and not hasattr(worker_function, "wakeup"):
        sd_notify("READY=1", f"STATUS=worker {config['worker_id']} running")
    if connection.parameter_statuses.get("is_superuser") == "on":
        logger.warning("connected as a superuser: each such worker takes one of the connections "
                       "the server keeps for administrators (superuser_reserved_connections); "
                       "give workers a role of their own (docs/trust-model.md, \"Database privileges\")")
    code = EXIT_FAILURE
    try:
        code, connection = _run_loop(config, worker_config, connection, worker_function, logger)
    finally:
        _teardown(config, worker_config, connection, worker_function, logger, code)
    return code


def alive(config: Config, connection) -> bool:
    """Whether the worker should go on: no signal, parent alive (foreground), row present.

    Cheap enough to call in a tight loop: it writes a heartbeat every
    0.35 stale_after seconds and asks the database nothing else unless a
    message has arrived.  Inside a transaction it looks at signals only.
    """
    return _stop_reason(_runtime.config or config, connection) is None


def _poke(fd: int) -> None:
    """Wake whoever polls the pipe that fd writes to."""
    try:
        os.write(fd, b".")
    except BlockingIOError:
        return  # the pipe is full: it is awake already


# ---------------------------------------------------------------------------
# The daemon
# ---------------------------------------------------------------------------

def close_inherited_fds(keep: int) -> None:
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
    close_inherited_fds(keep_fd)
    null = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(null, fd)
    if null > 2:
        os.close(null)


def _daemon_main(config: Config, worker_function: WorkerFunction, pid_file: str, ready_w: int) -> int:
    """Detach, lock, connect and register, tell the waiting parent how that went, then run."""
    try:
        _detach(config, ready_w)
        if not _lock_pid_file(config, pid_file):
            raise UniphantError(_already_running(config, get_pid_for_running_process(pid_file)))
        setup_logging(config)
        connection = _connect_for(config, lambda c: _register(config, c, worker_function))
    except BaseException as e:
        _tell(ready_w, "error", explain(e))
        return EXIT_FAILURE
    _tell(ready_w, "ready", os.getpid(), config["stop_timeout"])
    return run(config, connection, worker_function, pid_file)


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
            word, fields = parse_report(pipe.readline())
        os.waitpid(child, 0)
        if word != "ready":
            raise UniphantError(fields[0] or "the daemon was killed before it was ready")
        print(f"{_describe(config)} started with PID {fields[0]}.")
        return EXIT_OK
    os.close(ready_r)
    code = EXIT_FAILURE
    try:
        code = _daemon_main(config, worker_function, pid_file, ready_w)
    finally:
        import logging

        logging.shutdown()
        os._exit(code)  # never return into the caller's code: that is the parent's


# ---------------------------------------------------------------------------
# The command line
# ---------------------------------------------------------------------------

COMMANDS = ("start", "restart", "stop", "status")


def leave_quietly() -> None:
    """Exit 0 after a reader that had read enough closed stdout: Python would
    otherwise complain again while flushing it at exit."""
    null = os.open(os.devnull, os.O_WRONLY)
    os.dup2(null, sys.stdout.fileno())
    os.close(null)
    sys.exit(EXIT_OK)


def print_or_leave_quietly(text: str) -> None:
    """print(text), or exit quietly when the reader has gone (`ps | head`)."""
    try:
        print(text, flush=True)
    except BrokenPipeError:
        leave_quietly()


_HELP = """Run, stop or query one uniphant worker process.

positional arguments:
  worker_id         the worker's UUID
  command           start, restart, stop or status

options:
  -h, --help        show this help message and exit
  -f, --foreground  run in the foreground, logging to stdout too"""


class UsageError(ConfigError):
    """A bad command line: the usage goes with the message."""


def _usage(prog: str, one_per_host: bool = False) -> str:
    worker_id = "[worker_id]" if one_per_host else "worker_id"
    return f"usage: {prog} [-h] [-f] {worker_id} {{{','.join(COMMANDS)}}}"


def _parse_arguments(prog: str, argv: List[str], one_per_host: bool = False) -> Tuple[Optional[str], str, bool]:
    """(worker_id, command, foreground) from the command line; worker_id None
    where a worker that runs once per host was given none.

    Hand-made rather than argparse, whose import would double the time `status` takes.
    """
    positional, foreground = [], False
    for arg in argv:
        if arg in ("-h", "--help"):
            print_or_leave_quietly(f"{_usage(prog, one_per_host)}\n\n{_HELP}")
            sys.exit(EXIT_OK)
        elif arg in ("-f", "--foreground"):
            foreground = True
        elif arg.startswith("-") and arg != "-":
            raise UsageError(f"unrecognized option {shorten(arg)}")
        else:
            positional.append(arg)
    if one_per_host and len(positional) == 1:
        positional.insert(0, None)
    if len(positional) > 2:
        raise UsageError(f"unexpected argument {shorten(positional[2])} (expected a worker_id "
                         f"and a command)")
    if len(positional) < 2:
        raise UsageError("expected a worker_id and a command" if not positional else
                         f"expected a worker_id and a command, got only {shorten(positional[0])}")
    worker_id, command = positional[0] and canonical_uuid(positional[0]), positional[1]
    if positional[0] is not None and worker_id is None:
        raise UsageError(f"worker_id must be a UUID, got {shorten(positional[0])}")
    if command not in COMMANDS:
        raise UsageError(f"invalid command {shorten(command)} (choose from {', '.join(COMMANDS)})")
    return worker_id, command, foreground


def _one_per_host_id(config: Config, create: bool) -> Optional[str]:
    """The worker id of a worker that runs once per host (docs/python-api.md, "Hooks"): derived
    from this host's id and the worker type, so that no one has to choose one.
    None where the host has no id yet, and create is false."""
    import uuid

    if create:
        host_id: Optional[str] = get_or_create_host_id(config["lock_file"], config["host_id_file"])
    else:
        host_id = read_host_id(config["host_id_file"])
    return host_id and str(uuid.uuid5(uuid.UUID(host_id), config["worker_type"]))


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


def _remove_row_of(config: Config, process_id: str) -> None:
    """Remove the row of a killed process, connecting under its process id; not
    while its backend still runs a statement of the worker's."""
    try:
        if not _remove_row(dict(config, process_id=process_id), patience=0):
            print("Its process row stays while its database session still runs a statement; "
                  "the next start takes it over once that ends.", file=sys.stderr)
    except UniphantError as e:
        print(f"Its process row stays until the next start takes it over: {e}", file=sys.stderr)


def _stop(config: Config, pid_file: str, sig: Optional[int] = None) -> int:
    """stop: the process holding pid_file is sent sig (SIGTERM), then SIGKILL."""
    import signal

    process_id = _process_id_in(pid_file)
    ended_by = stop_running_process(pid_file, config["stop_timeout"], sig)
    if ended_by is None:
        print(f"{_describe(config)} is not running.")
        return EXIT_FAILURE
    if ended_by == signal.SIGKILL:
        print(f"{_describe(config)} did not stop within {config['stop_timeout']:g} s "
              f"of {signal_name(sig or signal.SIGTERM)}: sent SIGKILL.", file=sys.stderr)
        if process_id is not None:
            _remove_row_of(config, process_id)
    print(f"{_describe(config)} {'handed over to its successor' if sig else 'stopped'}.")
    return EXIT_OK


def _start(config: Config, worker_function: WorkerFunction, pid_file: str) -> int:
    _install_signal_handlers()
    _runtime.signals.handover = getattr(worker_function, "handover_signal", None)
    _refuse_shared_type(config)
    pid = get_pid_for_running_process(pid_file)
    if pid is not None:
        print(_already_running(config, pid), file=sys.stderr)
        return EXIT_FAILURE
    _prepare_paths(config)
    # In the foreground, and in a process the manager forked, the worker runs
    # in this process; else in a daemon.
    here = config["foreground"] or _runtime.managed
    if here and not _lock_pid_file(config, pid_file):
        print(_already_running(config, get_pid_for_running_process(pid_file)), file=sys.stderr)
        return EXIT_FAILURE
    connection = _connect_for(config, lambda c: register_host(config, c))
    # What exists now, pg8000's many modules above all, lives until exit: kept
    # out of the collector's way, it makes every collection, and the exit of
    # this process and of the daemon, some 30 ms cheaper.
    gc.freeze()
    try:
        if not here:
            return start_daemon(config, connection, worker_function, pid_file)
        setup_logging(config)
    except BaseException:
        close_quietly(connection)
        raise
    _register(config, connection, worker_function)
    for warning in _runtime.config_warnings:
        report_to_manager("warning", warning)
    report_to_manager("ready", os.getpid(), config["stop_timeout"])
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


def _prove_successor(config: Config) -> None:
    """restart, before it ends the running process: the new configuration connects
    and registers the host, as the new process will first; if it cannot, the
    restart fails with why, and the running process goes on untouched."""
    try:
        close_quietly(_connect_for(config, lambda c: register_host(config, c)))
    except Exception as e:
        if not isinstance(e, UniphantError) and not type(e).__module__.startswith("pg8000"):
            raise
        raise UniphantError(f"{explain(e)}; {_describe(config)} goes on running, untouched") from None


def main(worker_function: WorkerFunction) -> None:
    """The command line of a worker script: <worker_id> {start,restart,stop,status} [-f].

    `status` reads no config file and `stop` survives a bad one: both need only
    the PID file.  Signals are caught (signal_handler) once a start begins.
    """
    prog = os.path.basename(sys.argv[0])
    one_per_host = getattr(worker_function, "one_per_host", False)
    try:
        if one_per_host and _runtime.managed:  # before any of its configuration is read
            raise UniphantError(f"{_script_config()['worker_type']}: {ONE_PER_HOST}")
        worker_id, command, foreground = _parse_arguments(prog, sys.argv[1:], one_per_host)
        if command in ("status", "stop") and worker_id is None:
            worker_id = _one_per_host_id(_script_config(), create=False)
            if worker_id is None:  # this root has never started anything: nothing runs
                print(f"Worker {_script_config()['worker_type']} is not running.")
                _exit(EXIT_NOT_RUNNING if command == "status" else EXIT_FAILURE)
        if command == "status":
            config = dict(_script_config(), worker_id=worker_id)
            code = _status(config, get_pid_file_path(config))
        elif command == "stop":
            config = _stop_config(prog, worker_id)
            code = _stop(config, get_pid_file_path(config))
        else:
            config = setup_config()
            config.update(worker_id=worker_id or _one_per_host_id(config, create=True), foreground=foreground,
                          parent_pid=os.getppid() if foreground else None)
            pid_file = get_pid_file_path(config)
            if command == "restart" and get_pid_for_running_process(pid_file) is not None:
                _prove_successor(config)
                # A worker that can hand over gets its handover signal: its successor takes over.
                handover = getattr(worker_function, "handover_signal", None)
                _stop(config, pid_file, handover and _signal_number(handover))
            code = _start(config, worker_function, pid_file)
    except UniphantError as e:
        if isinstance(e, UsageError):
            print(_usage(prog, one_per_host), file=sys.stderr)
        print(f"{prog}: error: {e}", file=sys.stderr)
        report_to_manager("error", e)
        code = e.exit_code
    except OSError as e:
        print(f"{prog}: error: {explain(e)}", file=sys.stderr)
        code = EXIT_FAILURE
    except Exception as e:
        if not type(e).__module__.startswith("pg8000"):
            raise  # a bug: its traceback is the report
        print(f"{prog}: error: the database connection failed: {explain(e)}", file=sys.stderr)
        code = EXIT_FAILURE
    _exit(code)


def _fleet_main(argv: List[str]) -> None:
    """python uniphant.py COMMAND: the operators' commands are the fleet's, in
    uniphant_fleet.py beside this file, which is run (not imported: the runtime
    stands alone); without it, say so."""
    import runpy

    fleet = os.path.join(os.path.dirname(os.path.abspath(__file__)), "uniphant_fleet.py")
    if not os.path.isfile(fleet):
        print("uniphant.py: the fleet's commands (ps, add, scale, ...) are in uniphant_fleet.py, "
              "which is not beside this file: copy it here to use them", file=sys.stderr)
        sys.exit(EXIT_USAGE)
    sys.modules.setdefault("uniphant", sys.modules[__name__])  # one runtime, not a second copy
    sys.argv = [fleet, *argv]
    runpy.run_path(fleet, run_name="__main__")


if __name__ == "__main__":
    _fleet_main(sys.argv[1:])
