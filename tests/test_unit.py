"""Pure logic, in-process and without a server: `./dev/test -m unit` answers in
seconds.  Each test is one rule that the slower tests rely on."""

from __future__ import annotations

import os
import re

import pytest

import uniphant
import uniphant_fleet
from test_uniphant import REPO

pytestmark = pytest.mark.unit


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
    with open(os.path.join(REPO, "docs", "failure-behaviour.md"), encoding="utf-8") as f:
        section = f.read()
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
    with open(os.path.join(REPO, "docs", "sql-api.md"), encoding="utf-8") as f:
        api = f.read()
    names = set(re.findall(r"(?:FUNCTION|TABLE IF NOT EXISTS|VIEW) uniphant\.(\w+)", schema))
    assert len(names) > 40
    missing = sorted(name for name in names if f"`{name}" not in api)
    assert not missing, f"docs/sql-api.md does not name {missing}"
