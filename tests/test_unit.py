"""Pure logic, in-process and without a server: `./dev/test -m unit` answers in
seconds.  Each test is one rule that the slower tests rely on."""

from __future__ import annotations

import os
import re

import pytest

import uniphant
import uniphant_fleet
from conftest import REPO

pytestmark = pytest.mark.unit


# ---------------------------------------------------------------------------
# Configuration
# ---------------------------------------------------------------------------

def test_every_runtime_key_has_its_default_and_a_check_that_takes_the_default():
    for key, (default, check) in uniphant._RUNTIME_KEYS.items():
        text = default if isinstance(default, str) else f"{default:g}"
        assert check(text) == default, key
    assert uniphant.RUNTIME_DEFAULTS == {key: default for key, (default, _) in uniphant._RUNTIME_KEYS.items()}


@pytest.mark.parametrize("key, text, value", [
    ("interval", "0.5", 0.5), ("interval", ".5", 0.5), ("stale_after", "3", 3.0),
    ("log_level", "debug", "DEBUG"), ("pooler", "Transaction", "transaction"), ("PGPORT", "5432,5433", "5432,5433"),
])
def test_a_good_value_is_stored_as_uniphant_uses_it(key, text, value):
    assert uniphant._checked(key, text, "f:1") == value


@pytest.mark.parametrize("key, text", [
    ("interval", "nan"), ("interval", "1e3"), ("interval", "-1"), ("interval", "86401"), ("interval", "\u0661"),
    ("stale_after", "2.9"), ("stop_timeout", "0.0"), ("log_level", "LOUD"), ("PGPORT", "0"), ("PGSSLMODE", "maybe"),
])
def test_a_bad_value_is_a_config_error_naming_where_and_the_key_never_the_value(key, text):
    with pytest.raises(uniphant.ConfigError) as error:
        uniphant._checked(key, text, "f:7")
    assert str(error.value).startswith(f"f:7: bad value for {key}:") and text not in str(error.value)


def test_a_key_uniphant_does_not_read_is_kept_as_text():
    assert uniphant._checked("queue", " x ", "f:1") == " x "


# ---------------------------------------------------------------------------
# Worker types and what operators read
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("text, printed", [
    ("plain text", "plain text"), ("\x1b[2J", "\\x1b[2J"), ("a\nb", "a\\x0ab"), ("\u202e", "\\u202e"),
    ("\U000e0001", "\\U000e0001"), ("é ✓", "é ✓"),
])
def test_printable_shows_every_character_that_is_not_printable_as_an_escape(text, printed):
    assert uniphant._printable(text) == printed


def test_the_worker_types_of_a_root_are_its_scripts_of_valid_types(tmp_path):
    for path in ("a/b.py", "a/c.py", "x.y.py", "a/.hidden.py", "a/__pycache__/z.py", "bad name.py", "notes.txt",
                 "/".join(["d"] * 11) + ".py"):
        (tmp_path / "workers" / path).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / "workers" / path).write_text("")
    assert uniphant._worker_types(str(tmp_path)) == ["a.b", "a.c", "x.y"]


# ---------------------------------------------------------------------------
# The report pipe
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("word, fields", [
    ("ready", [4242, 10.0]), ("error", ["no script a/b.py"]),
    ("exit", ["row-deleted", "its process row was deleted"]), ("exit", ["failed", "RuntimeError: a\nb  c"]),
])
def test_a_report_reads_back_as_it_was_written(word, fields):
    line = uniphant._report_line(word, *fields)
    assert line.endswith(b"\n") and line.count(b"\n") == 1
    assert uniphant._parse_report(line[:-1]) == (word, [str(f) if i < len(fields) - 1 else " ".join(str(f).split())
                                                        for i, f in enumerate(fields)])


def test_a_short_report_gives_empty_fields():
    assert uniphant._parse_report(b"exit") == ("exit", ["", ""])


# ---------------------------------------------------------------------------
# The manager's worker states and backoff
# ---------------------------------------------------------------------------

def test_the_worker_states_are_the_ones_schema_sql_checks():
    with open(os.path.join(REPO, "schema.sql"), encoding="utf-8") as f:
        schema = f.read()
    check = re.search(r"'worker_states_state_check',\s*'state IN \(([^)]*)\)'", schema).group(1)
    assert sorted(re.findall(r"''(\w+)''", check)) == sorted(uniphant_fleet.SLOT_STATES + ("unplaced",))
    reported = re.search(r"report_worker\.state NOT IN \(([^)]*)\)", schema).group(1)
    assert sorted(re.findall(r"'(\w+)'", reported)) == sorted(uniphant_fleet.SLOT_STATES)
    assert set(uniphant_fleet._MOVES) == set(uniphant_fleet.SLOT_STATES) | {None}


@pytest.mark.parametrize("moves", [
    ["running", "starting", "running", None], ["running", "backoff", "starting", "moving", "starting", None],
    ["backoff", "starting"], ["moving", None],
])
def test_a_worker_moves_between_states_as_written_down(moves):
    slot = uniphant_fleet._Slot("w", "a.b")
    assert slot.state == "starting"
    for state in moves:
        slot.move(state)
        assert slot.state == state


@pytest.mark.parametrize("path", [["backoff", "running"], ["moving", "running"], ["moving", "backoff"],
                                  ["running", "moving"], [None, "running"]])
def test_a_move_not_written_down_is_refused_where_it_happens(path):
    slot = uniphant_fleet._Slot("w", "a.b")
    for state in path[:-1]:
        slot.move(state)
    with pytest.raises(AssertionError, match="no move from"):
        slot.move(path[-1])


def test_backoff_restarts_at_once_then_doubles_up_to_the_cap_from_the_upper_half():
    manager = uniphant_fleet._Manager(dict(uniphant.RUNTIME_DEFAULTS, restart_delay=1.0, restart_delay_max=8.0), None)
    assert manager._backoff(1) == 0.0
    for failures, cap in [(2, 1.0), (3, 2.0), (4, 4.0), (5, 8.0), (9, 8.0)]:
        delays = [manager._backoff(failures) for _ in range(200)]
        assert all(cap / 2 <= d <= cap for d in delays), failures


# ---------------------------------------------------------------------------
# The public API
# ---------------------------------------------------------------------------

def test_the_public_api_is_stated_and_its_exceptions_carry_what_a_caller_needs():
    assert re.fullmatch(r"\d+\.\d+\.\d+", uniphant.__version__)
    assert all(hasattr(uniphant, name) for name in uniphant.__all__)
    refusal = uniphant.AlreadyRunning.refused({"C": "UN001", "D": "42", "M": "worker w is already running: "
                                                                        "PID 42 on host web-\x1b1"})
    assert (refusal.sqlstate, refusal.pid, refusal.host) == ("UN001", 42, "web-\x1b1")
    assert "\x1b" not in str(refusal) and isinstance(refusal, uniphant.UniphantError)
    assert issubclass(uniphant.ConfigError, ValueError) and uniphant.ConfigError.exit_code == 2


# ---------------------------------------------------------------------------
# The tests themselves
# ---------------------------------------------------------------------------

def _tests_and_their_marks() -> dict:
    """Every test function of the suite, by name, with the marks on it or its module."""
    import ast
    import glob

    found = {}
    for path in glob.glob(os.path.join(REPO, "test_*.py")) + glob.glob(os.path.join(REPO, "tests", "test_*.py")):
        tree = ast.parse(open(path, encoding="utf-8").read())
        module_marks = {ast.unparse(node.value) for node in tree.body if isinstance(node, ast.Assign)
                        and any(getattr(t, "id", "") == "pytestmark" for t in node.targets)}
        for node in tree.body:
            if isinstance(node, ast.FunctionDef) and node.name.startswith("test_"):
                found[node.name] = module_marks | {ast.unparse(d) for d in node.decorator_list}
    return found


def test_each_line_of_the_readmes_failure_behaviour_names_fault_tests_that_exist():
    with open(os.path.join(REPO, "README.md"), encoding="utf-8") as f:
        section = f.read().split("## Failure behaviour\n", 1)[1].split("\n## ", 1)[0]
    tests = _tests_and_their_marks()
    lines = [line for line in section.splitlines() if line.startswith("- ")]
    assert len(lines) > 10
    for line in lines:
        names = re.findall(r"`(test_\w+)`", line)
        assert names, f"names no test: {line[:60]}"
        for name in names:
            assert name in tests, f"no test {name}"
            assert "pytest.mark.faults" in tests[name], f"{name} is not in the fault suite"


def test_the_readmes_sql_api_names_every_table_view_and_function_of_schema_sql():
    with open(os.path.join(REPO, "schema.sql"), encoding="utf-8") as f:
        schema = f.read()
    with open(os.path.join(REPO, "README.md"), encoding="utf-8") as f:
        api = f.read().split("\n## The SQL API\n", 1)[1].split("\n## ", 1)[0]
    names = set(re.findall(r"(?:FUNCTION|TABLE IF NOT EXISTS|VIEW) uniphant\.(\w+)", schema))
    assert len(names) > 40
    missing = sorted(name for name in names if f"`{name}" not in api)
    assert not missing, f"README's SQL API does not name {missing}"
