"""uniphant's fleet: the manager that runs on each host what the `workers` table
asks of it, and the operators' commands (`python uniphant.py ps|add|scale|...`).

It stands on the runtime, uniphant.py, through its declared names only, and
lives beside it: a project that runs workers by hand needs only uniphant.py;
one that runs a fleet copies this file too (docs/install.md, "Install").
"""

from __future__ import annotations

import fcntl
import gc
import os
import select
import sys
import time
from typing import NamedTuple

from uniphant import (
    EXIT_FAILURE,
    EXIT_OK,
    RUNTIME_DEFAULTS,
    UniphantError,
    UsageError,
    BACKOFF_CAP,
    Ending,
    TYPE_LENGTH,
    TYPE_PARTS,
    query_row,
    canonical_uuid,
    close_inherited_fds,
    close_quietly,
    connect_to_server,
    ONE_PER_HOST,
    begin_managed_child,
    explain,
    handing_over,
    holds_open,
    in_one_transaction,
    is_whole,
    is_worker_type,
    leave_quietly,
    log_file_of,
    new_uuid,
    open_own_file,
    parse_report,
    pg_setting,
    pid_file_of,
    print_or_leave_quietly,
    printable,
    read_host_id,
    fd_readable,
    report_to_manager,
    query_rows,
    scripts_of_type,
    sd_notify,
    shorten,
    shown_settings,
    signal_name,
    state_dir_of,
    take_notifications,
    wait_for_wakeup,
    watchdog_period,
    wire_of,
    worker_types_under,
    get_pid_for_running_process,
    read_operator_config,
    resembling,
)

TYPE_CHECKING = False
if TYPE_CHECKING:
    import logging
    from typing import Any, Callable, Dict, List, Optional, Tuple

    from uniphant import Config


# ---------------------------------------------------------------------------
# The manager
# ---------------------------------------------------------------------------

# How often the manager reads its plan when no notification comes: a lost
# notification, or a host that died, costs at most this long to notice.
_PLAN_EVERY = 5.0
# How long a manager that has reconnected waits before it plans: the processes
# that lost their sessions with it (a failover, a restart of the server) have
# tried again within a backoff cap, and confirmed their rows, by then.  Until
# then their rows may look dead, and a plan would start their workers elsewhere.
_PLAN_AFTER_RECONNECT = BACKOFF_CAP + 0.5
# The channel the managers hear of changes to the fleet on (schema.sql: notify_fleet).
_FLEET_CHANNEL = "uniphant_fleet"
# The least time between two plans that notifications ask for: a burst of them
# costs a plan at once and at most one more after it, and a flood (any role
# may NOTIFY any channel) at most one plan per gap.
_PLAN_GAP = 0.05
# The least time between two writes of worker_states: each notifies the
# fleet's watchers, and PostgreSQL wakes every listening session of the
# database (each worker listens on its own channel) for each notifying commit.
# A burst of changes (a fleet starting or stopping) costs a write at once and
# at most one a gap after it, instead of one per worker.
_REPORT_GAP = 0.1
# How often to look for files of workers gone from the desired state.
_TIDY_EVERY = 3600.0
# Starting a worker costs the host a fork, an import and a database session:
# at most this many starts per core are under way at once (forked, not yet
# registered), half as many while the load average exceeds the cores.
_STARTS_PER_CORE = 2
# Restarts after a failure are paced besides: a fleet that crashes together
# comes back at most this many a second (jittered), whatever the host takes.
_FAILED_RESTARTS_PER_SECOND = 20.0
# How often a manager plans while a worker of its host is in a rolling
# restart's batch (schema.sql: advance_rolls waits for a second of running).
_ROLL_LOOK = 0.5

# The states of a worker that the plan gives this host, as worker_states.state
# holds them (schema.sql checks the same names, and `unplaced`, which only the
# planner writes), and the moves between them, written down as supervisor
# writes down its process states.  None: the manager has forgotten the worker.
STARTING, RUNNING, BACKOFF, MOVING = "starting", "running", "backoff", "moving"
PAUSED, DONE = "paused", "done"  # held: not started (docs/changing-the-fleet.md, "Changing the fleet")
SLOT_STATES = (STARTING, RUNNING, BACKOFF, MOVING, PAUSED, DONE)
_MOVES: Dict[Optional[str], Tuple[Optional[str], ...]] = {
    None: (STARTING,),                                       # placed here
    STARTING: (RUNNING, BACKOFF, MOVING, PAUSED, DONE, None),  # registered; failed, to start again
                                                             # later; a live copy elsewhere keeps it
    RUNNING: (STARTING, BACKOFF, PAUSED, DONE, None),        # ended, to start again at once, or later
    BACKOFF: (STARTING, PAUSED, DONE, None),                 # its delay is over
    MOVING: (STARTING, PAUSED, DONE, None),                  # the copy elsewhere has gone
    PAUSED: (STARTING, DONE, None),                          # resumed
    DONE: (STARTING, None),                                  # finished; resumed, or restarted
}
_HELD = (PAUSED, DONE)


def _start_limit() -> int:
    """How many starts may be under way at once: _STARTS_PER_CORE for each core this
    process may run on, half as many while the load average exceeds the cores."""
    cores = len(os.sched_getaffinity(0))
    limit = _STARTS_PER_CORE * cores
    return max(1, limit // 2 if os.getloadavg()[0] > cores else limit)


# This process's manager, once main(manage) has prepared it (see _prepare_manager).
_manager: Optional[_Manager] = None


class _Child:
    """A worker process on this host that the manager watches: one it forked, or
    one it adopted (started by an earlier manager, or by hand), found holding
    the worker's PID-file lock; never a PID that the database names."""

    def __init__(self, pid: int, report_fd: Optional[int]) -> None:
        self.pid = pid
        self.pidfd = os.pidfd_open(pid)      # readable once it has exited
        self.forked = report_fd is not None  # ours to reap; an adopted one is not
        # Its process group, if it made a session of its own as the workers a
        # manager forks do (the group outlives its leader while grandchildren
        # remain, and its number is not reused meanwhile).  A worker started in
        # a shell's job shares its group with the job: only the worker goes.
        self.group = pid if self.forked or os.getsid(pid) == pid else None
        self.report_fd = report_fd           # its reports, until it closes them
        self.started = time.monotonic()
        self.started_at = time.time()        # the same, by the wall clock, which files' times use
        self.ready = report_fd is None       # registered (an adopted one long since)
        self.stop_timeout = RUNTIME_DEFAULTS["stop_timeout"]
        self.ending = ""                     # the code of why its run ended, as it said (see Ending)
        self.words = ""                      # and the words
        self.warnings: List[str] = []        # its configuration's, as it told them
        self.unread = b""
        self.kill_at: Optional[float] = None  # when its process group gets SIGKILL
        self.ended_by = ""                   # why the manager ended it, if it did
        self.rowless_since: Optional[float] = None
        self.vouched = False                 # its process row has been proven (uniphant.prove_process)

    def signal(self, sig: int) -> None:
        import signal

        try:
            signal.pidfd_send_signal(self.pidfd, sig)
        except ProcessLookupError:
            return  # it has exited: the next look reaps it

    def kill_group(self) -> None:
        """SIGKILL its process group (grandchildren too), or itself if it has none of its own."""
        import signal

        if self.group is None:
            self.signal(signal.SIGKILL)
            return
        try:
            os.killpg(self.group, signal.SIGKILL)
        except ProcessLookupError:
            return  # the whole group has gone

    def read_reports(self) -> None:
        """Take in what it wrote (see _report_line)."""
        if self.report_fd is None:
            return
        try:
            data = os.read(self.report_fd, 65536)
        except BlockingIOError:
            return
        if not data:
            os.close(self.report_fd)
            self.report_fd = None
            return
        *lines, self.unread = (self.unread + data).split(b"\n")
        for line in lines:
            word, fields = parse_report(line)
            if word == "ready":
                self.ready, self.stop_timeout = True, float(fields[1])
            elif word == "error":
                self.words = fields[0]
            elif word == "warning" and len(self.warnings) < _WARNINGS_KEPT:
                self.warnings.append(printable(fields[0]))
            elif word == "exit":
                self.ending, self.words = fields

    def close(self) -> None:
        os.close(self.pidfd)
        if self.report_fd is not None:
            os.close(self.report_fd)


# The most configuration warnings a manager keeps of one run of a worker.
_WARNINGS_KEPT = 20


class _Slot:
    """A worker the plan gives this host, across the lives of its processes."""

    def __init__(self, worker_id: str, worker_type: str) -> None:
        self.worker_id = worker_id
        self.worker_type = worker_type
        self.wanted = True
        self.startable = True
        self.row_pid: Optional[int] = None  # its process row on this host says: data, not a PID to act on
        self.row_live = False
        self.child: Optional[_Child] = None
        self.state: Optional[str] = None
        self.due = 0.0                   # when it may start (time.monotonic)
        self.failures = 0                # runs in a row that ended before restart_reset_after
        self.restarts = 0
        self.started_once = False
        self.last_exit: Optional[str] = None
        self.log_tail: Optional[str] = None  # the last lines of a run that failed, not yet reported
        self.requested = False               # its last run ended on request: the next start is no restart
        self.settings = "{}"                 # its desired settings (JSON, read by its process), for its config
        self.warnings: Optional[str] = None  # its configuration's warnings at its last start, one a line
        self.reported: Optional[tuple] = None  # the facts last written to worker_states
        self.queued: Optional[tuple] = None    # the facts last seen, written or waiting
        self.unwritten: List[Tuple[Optional[tuple], Optional[str]]] = []  # facts and log tails, in order
        self.move(STARTING)

    def move(self, state: Optional[str]) -> None:
        """Enter state, a move _MOVES allows (staying is no move)."""
        if state != self.state and state not in _MOVES[self.state]:
            raise AssertionError(f"worker {self.worker_id}: no move from {self.state} to {state}")
        self.state = state


class _Manager:
    """The state of a manager process: what it runs, and when it next acts."""

    def __init__(self, config: Config, logger: logging.Logger) -> None:
        self.config = config
        self.logger = logger
        self.slots: Dict[str, _Slot] = {}
        self.connection = None           # the one it listens on
        self.next_plan = 0.0
        self.planned_at = -_PLAN_GAP      # when the last plan began (time.monotonic)
        self.plan_asked = False           # a notification asks for a plan, within _PLAN_GAP
        self.next_tidy = 0.0
        self.next_check = 0.0            # when to look at every process row of this host again
        self.next_start = 0.0            # starts are paced: starts_per_second, jittered
        self.next_restart = 0.0          # and restarts after a failure: _FAILED_RESTARTS_PER_SECOND
        self.status_told = ""
        self.reported_at = -_REPORT_GAP  # when worker_states was last written (time.monotonic)
        self.report_due: Optional[float] = None  # changes wait for the gap to pass
        self.next_watchdog = 0.0
        self.worker_types: Optional[List[str]] = None  # what this root provides, as last told

    # One pass: see who ended, read the plan when it may have changed, then
    # act on it and write down what changed.
    def step(self, connection) -> None:
        if connection is not self.connection:  # the first pass, or a new connection
            connection.execute_simple(f"LISTEN {_FLEET_CHANNEL}")
            # A new session may have missed a notification: plan soon.
            self.next_plan = time.monotonic() + _PLAN_AFTER_RECONNECT if self.connection else 0.0
            self.connection = connection
        self._reap()
        if self._plan_due(connection):
            self._plan(connection)
        self._enforce_deadlines()
        self._start_due(connection)
        self._report(connection)
        self._tell_systemd()

    def wakeup(self, connection) -> Tuple[float, Tuple[int, ...]]:
        """When the next pass is due (time.monotonic), and the descriptors that bring
        it forward: a child's exit (its pidfd) or its report."""
        if connection is not self.connection:
            return 0.0, ()
        self.plan_asked = take_notifications(connection, _FLEET_CHANNEL) or self.plan_asked
        children = [slot.child for slot in self.slots.values() if slot.child is not None]
        moments = [self.next_plan] + [c.kill_at for c in children if c.kill_at is not None]
        if self.plan_asked:
            moments.append(self.planned_at + _PLAN_GAP)
        moments += [c.started + self.config["start_timeout"] for c in children if not c.ready]
        if self._starting() < _start_limit():  # else a child's report of registering wakes it
            moments += [self._may_start(slot) for slot in self._startable()]
        if watchdog_period():
            moments.append(self.next_watchdog)
        if self.report_due is not None:
            moments.append(self.report_due)
        fds = [c.pidfd for c in children] + [c.report_fd for c in children if c.report_fd is not None]
        return min(moments), tuple(fds)

    def _plan_due(self, connection) -> bool:
        """Whether to plan now: the timer's plan is due, or a notification asked for
        one and the last began _PLAN_GAP ago."""
        self.plan_asked = take_notifications(connection, _FLEET_CHANNEL) or self.plan_asked
        now = time.monotonic()
        return now >= self.next_plan or (self.plan_asked and now >= self.planned_at + _PLAN_GAP)

    def _startable(self) -> List[_Slot]:
        """The slots whose worker should run here, and has no process."""
        return [slot for slot in self.slots.values() if slot.wanted and slot.startable
                and slot.child is None and slot.state not in _HELD]

    def _plan(self, connection) -> None:
        self.planned_at, self.plan_asked = time.monotonic(), False
        if self.worker_types is None or time.monotonic() >= self.next_plan:
            self._tell_worker_types(connection)
        if time.monotonic() >= self.next_tidy:
            self._tidy(connection)
            self.next_tidy = time.monotonic() + _TIDY_EVERY
        if time.monotonic() >= self.next_check:
            self._check_host(connection)
            self.next_check = time.monotonic() + _PLAN_EVERY
        rows = query_rows(connection, "SELECT worker_id::text, worker_type, wanted, startable, row_pid, row_live, "
                     "restarts, settings::text, paused, done, rolling, restart_requested "
                     "FROM uniphant.manager_plan($1::uuid, $2)",
                     (self.config["host_id"], float(self.config["start_timeout"])))
        self.next_plan = time.monotonic() + _PLAN_EVERY
        planned = {row[0] for row in rows if row[2]}
        for slot in list(self.slots.values()):
            if slot.wanted and slot.worker_id not in planned:
                self._unwant(slot, "no longer wanted on this host")
        rolling = False
        for (worker_id, worker_type, wanted, startable, row_pid, row_live, restarts, settings, paused, done,
             in_roll, restart_requested) in rows:
            slot = self.slots.get(worker_id)
            if slot is None:
                if not wanted and not is_worker_type(worker_type):
                    continue  # a process row of a type no worker of this root can have
                slot = self.slots[worker_id] = _Slot(worker_id, worker_type)
                slot.wanted, slot.restarts = wanted, restarts
                if not wanted:  # a copy here that should run elsewhere, or not at all
                    self._adopt(slot)
                    self._unwant(slot, "not wanted on this host")
                    continue
            elif wanted and not slot.wanted:
                slot.wanted = True
                slot.move(RUNNING if slot.child is not None and slot.child.ready else STARTING)
            slot.startable, slot.row_pid, slot.row_live = startable, row_pid, bool(row_live)
            slot.settings = settings or "{}"
            rolling = rolling or in_roll
            self._hold(slot, DONE if done else PAUSED if paused else None)
            if restart_requested and slot.state == BACKOFF:
                self._hurry(slot)
            if slot.child is None and slot.state in (STARTING, MOVING):
                target = STARTING if startable else MOVING
                if slot.state != target:
                    slot.move(target)
            self._check_row(slot)
        if rolling:  # a worker of a rolling restart's batch: the next batch is due once it has run a second
            self.next_plan = min(self.next_plan, time.monotonic() + _ROLL_LOOK)

    def _hold(self, slot: _Slot, held: Optional[str]) -> None:
        """A paused or done worker (held) is not started, and its process is stopped
        cleanly; resumed, it starts at once, with no failure counted."""
        if held is None:
            if slot.state in _HELD:
                slot.move(STARTING)
                slot.due, slot.failures, slot.started_once = 0.0, 0, False  # not a restart
            return
        if slot.state != held:
            slot.move(held)
            if slot.child is not None and slot.child.kill_at is None:
                self.logger.info("stopping worker %s (%s): %s", slot.worker_id, slot.worker_type, held)
                self._stop(slot.child)

    def _hurry(self, slot: _Slot) -> None:
        """A worker waiting in backoff that an operator restarted starts now, with its
        failures forgotten (it was fixed, say), and no restart counted."""
        self.logger.info("worker %s (%s): restarted on request while in backoff: starting it now",
                         slot.worker_id, printable(slot.worker_type))
        slot.move(STARTING)
        slot.due, slot.failures, slot.requested = 0.0, 0, True

    def _tell_worker_types(self, connection) -> None:
        """Tell the database which worker types this root has scripts for, when that
        changed: placement gives it any-host workers of those only."""
        types = [t for t in worker_types_under(self.config["root_dir"]) if t != self.config["worker_type"]]
        if types != self.worker_types:
            query_row(connection, "SELECT uniphant.set_worker_types($1::text[])", (types,))
            self.worker_types = types

    def _check_host(self, connection) -> None:
        """Prove or clear every process row of this host but the managers': one whose
        PID holds its worker's PID-file lock in this root is proven (the planners
        and the fleet view count it as a running copy); any other is stale or
        forged, and goes (uniphant.clear_process), wanted here or not."""
        for worker_id, worker_type, pid, proven in query_rows(
                connection, "SELECT worker_id::text, worker_type, pid, proven FROM uniphant.host_processes()"):
            if _runs_worker(self.config["state_dir"], worker_type, worker_id, pid):
                if not proven:
                    query_row(connection, "SELECT uniphant.prove_process($1::uuid, $2)", (worker_id, pid))
            elif query_row(connection, "SELECT uniphant.clear_process($1::uuid, $2)", (worker_id, pid))[0]:
                self.logger.warning("removed the process row of worker %s on this host: it names PID %s, "
                                    "which does not run the worker", worker_id, pid)

    def _tidy(self, connection) -> None:
        """Remove the PID and log files in this root of workers gone from the desired
        state, once unused for file_retention seconds: none that a process holds,
        and none of this manager's own."""
        cutoff, found = time.time() - self.config["file_retention"], {}
        for kind in ("pid", "log"):
            for path in _files_below(os.path.join(self.config["state_dir"], kind), f".{kind}"):
                worker_id = canonical_uuid(os.path.basename(path)[:-len(kind) - 1])
                if worker_id and worker_id != self.config["worker_id"] and worker_id not in self.slots:
                    found.setdefault(worker_id, []).append(path)
        old = {w: paths for w, paths in found.items() if all(_unused_since(p, cutoff) for p in paths)}
        if not old:
            return
        desired = {str(row[0]) for row in query_rows(connection, "SELECT uniphant.desired_workers($1::uuid[])",
                                                  (list(old),))}
        for worker_id in set(old) - desired:
            try:
                for path in old[worker_id]:
                    os.unlink(path)
            except OSError as e:
                self.logger.warning("cannot remove %s: %s", path, e.strerror)
                continue
            self.logger.info("removed the files of worker %s, gone from the desired state: %s",
                             worker_id, ", ".join(old[worker_id]))

    def _check_row(self, slot: _Slot) -> None:
        """A registered child without a live row (deleted, or a stale heartbeat with no
        session) is told to look at once (SIGUSR1: behind a transaction pooler it
        hears no notification), and killed if it still lives on at a plan
        _PLAN_EVERY later."""
        import signal

        child = slot.child
        if child is None or not child.ready or not slot.wanted or slot.state in _HELD:
            return
        if slot.row_pid == child.pid and slot.row_live:
            child.rowless_since = None
        elif child.rowless_since is None:
            child.rowless_since = time.monotonic()
            child.signal(signal.SIGUSR1)
        elif time.monotonic() - child.rowless_since >= _PLAN_EVERY:
            self._end(child, "lived on without a live process row")

    def _unwant(self, slot: _Slot, why: str) -> None:
        slot.wanted = False
        if slot.child is None:
            self._forget(slot)
        elif slot.child.kill_at is None:
            self.logger.info("stopping worker %s (%s): %s", slot.worker_id, printable(slot.worker_type), why)
            self._stop(slot.child)

    def _forget(self, slot: _Slot) -> None:
        slot.move(None)  # written as a deletion of its worker_states row
        if slot.reported is None and not slot.unwritten:
            del self.slots[slot.worker_id]

    def _stop(self, child: _Child) -> None:
        import signal

        child.signal(signal.SIGTERM)
        child.kill_at = time.monotonic() + child.stop_timeout

    def _end(self, child: _Child, why: str) -> None:
        """Kill a child at once, remembering why."""
        self.logger.warning("killing worker process %d: %s", child.pid, why)
        child.ended_by = why
        child.kill_group()
        child.kill_at = child.kill_at or time.monotonic()

    def _enforce_deadlines(self) -> None:
        now = time.monotonic()
        for slot in self.slots.values():
            child = slot.child
            if child is None:
                continue
            if child.kill_at is not None and now >= child.kill_at:
                child.kill_group()
            elif not child.ready and now - child.started >= self.config["start_timeout"]:
                self._end(child, f"did not register within {self.config['start_timeout']:g} s")

    def _reap(self) -> None:
        """Take note of every child that registered or exited (own children are
        reaped: waitpid)."""
        children = {slot.child.pidfd: slot for slot in self.slots.values() if slot.child is not None}
        if not children:
            return
        poller = select.poll()
        for fd in children:
            poller.register(fd, select.POLLIN)
        for slot in children.values():
            self._read_reports(slot, slot.child)
            if slot.child.ready and slot.state == STARTING:
                slot.move(RUNNING)
        for fd, _ in poller.poll(0):
            slot = children[fd]
            child, slot.child = slot.child, None
            status = os.waitpid(child.pid, 0)[1] if child.forked else None
            self._read_reports(slot, child)
            child.close()
            child.kill_group()  # what it left behind in its group goes with it
            requested = child.ending == Ending.ROW_DELETED and not child.ended_by
            if requested:  # a restart from SQL: no failure, and no restart counted
                slot.requested = True
                self._ended(slot, "restarted on request (its process row was deleted)", True, child.started)
                continue
            slot.log_tail = _log_tail(self._log_file(slot), child.started_at)
            self._ended(slot, _how_it_ended(child, status), False, child.started)

    @staticmethod
    def _read_reports(slot: _Slot, child: _Child) -> None:
        """Take in what a child reported; a forked one's warnings become its worker's
        (an adopted one reports nothing: the last reported stay)."""
        child.read_reports()
        if child.forked:
            slot.warnings = "\n".join(child.warnings) or None

    def _ended(self, slot: _Slot, how: str, at_once: bool, started: float) -> None:
        """A run of slot's worker ended (how), or its start failed: forget it if it is
        no longer wanted, else start it again at once (a restart from SQL is not a
        failure) or after its backoff."""
        self.next_plan = 0.0  # the plan says whether it finished (restart=on-failure), before a start
        if not slot.wanted or slot.state in _HELD:
            self.logger.info("worker %s (%s) stopped: %s", slot.worker_id, slot.worker_type, printable(how))
            slot.last_exit = how
            if not slot.wanted:
                self._forget(slot)
            return
        now = time.monotonic()
        if at_once:
            delay = 0.0
        else:
            slot.failures = 1 if now - started >= self.config["restart_reset_after"] else slot.failures + 1
            delay = self._backoff(slot.failures)
        slot.last_exit, slot.due = how, now + delay
        slot.move(BACKOFF if delay else STARTING)
        self.logger.warning("worker %s (%s) ended: %s; starting it again in %.1f s",
                            slot.worker_id, slot.worker_type, printable(how), delay)

    def _backoff(self, failures: int) -> float:
        """The first restart at once, then restart_delay doubling up to restart_delay_max,
        each drawn from its upper half so that a failing fleet does not restart in step."""
        import random

        if failures <= 1:
            return 0.0
        delay = min(self.config["restart_delay"] * 2 ** (failures - 2), self.config["restart_delay_max"])
        return random.uniform(delay / 2, delay)

    def _starting(self) -> int:
        """How many of its children have not registered yet."""
        return sum(1 for slot in self.slots.values() if slot.child is not None and not slot.child.ready)

    def _may_start(self, slot: _Slot) -> float:
        """When slot may start (time.monotonic), as far as the pace of starts allows."""
        return max(slot.due, self.next_start, self.next_restart if slot.failures else 0.0)

    def _start_due(self, connection) -> None:
        import random

        now = time.monotonic()
        due = [slot for slot in self._startable() if slot.due <= now]
        starting, limit = self._starting(), _start_limit()
        for slot in sorted(due, key=lambda s: s.due):
            if self._adopt(slot):
                continue  # no fork, so no pacing: a new manager adopts a whole fleet at once
            if starting >= limit or self._may_start(slot) > now:
                continue
            self._start(connection, slot)
            starting += 1
            pause = random.uniform(0.5, 1.5) / self.config["starts_per_second"]
            self.next_start = max(now, self.next_start) + pause
            if slot.failures:
                pause = random.uniform(0.5, 1.5) / _FAILED_RESTARTS_PER_SECOND
                self.next_restart = max(now, self.next_restart) + pause

    def _start(self, connection, slot: _Slot) -> None:
        """Fork a worker of slot.  Whatever keeps it from starting (no script, a name
        the file system refuses) is the worker's failure, shown in its state, never
        the manager's."""
        if slot.started_once and not slot.requested:
            slot.restarts += 1
        slot.started_once, slot.requested = True, False
        slot.move(STARTING)
        try:
            self._clear_stale_row(connection, slot)
            if slot.worker_type == self.config["worker_type"]:
                raise UniphantError(f"worker type {slot.worker_type} is this manager's own: {ONE_PER_HOST}")
            scripts = scripts_of_type(self.config["root_dir"], slot.worker_type)
            if len(scripts) != 1:
                raise UniphantError(f"no script {slot.worker_type.replace('.', '/')}.py below "
                                    f"{self.config['root_dir']}/workers" if not scripts
                                    else f"two scripts of its type: {scripts[0]} and {scripts[1]}")
            slot.child = self._fork(scripts[0], slot)
            self.logger.info("started worker %s (%s): PID %d, named %s", slot.worker_id,
                             printable(slot.worker_type), slot.child.pid, _process_title(slot.worker_type))
        except (UniphantError, OSError) as e:  # OSError: out of processes or descriptors, say
            self._ended(slot, f"could not start: {explain(e)}", False, time.monotonic())

    def _pid_file(self, slot: _Slot) -> str:
        return pid_file_of(self.config["state_dir"], slot.worker_type, slot.worker_id)

    def _log_file(self, slot: _Slot) -> str:
        return log_file_of(self.config["state_dir"], slot.worker_type, slot.worker_id)

    def _clear_stale_row(self, connection, slot: _Slot) -> None:
        """No process holds the worker's PID-file lock here; if its process row on this
        host names a PID that has not its PID file open either, the row is stale or
        forged, and this host's manager says so (uniphant.clear_process): it would
        keep the worker from registering until its stale_after passed."""
        if slot.row_pid is None or holds_open(slot.row_pid, self._pid_file(slot)):
            return
        if query_row(connection, "SELECT uniphant.clear_process($1::uuid, $2)", (slot.worker_id, slot.row_pid))[0]:
            self.logger.warning("removed the process row of worker %s on this host: it names PID %d, "
                                "which does not run the worker", slot.worker_id, slot.row_pid)
        slot.row_pid = None

    def _fork(self, script: str, slot: _Slot) -> _Child:
        import signal

        report_r, report_w = os.pipe2(os.O_CLOEXEC)
        gc.freeze()  # what the child shares with us stays shared: no collection touches it
        try:
            pid = os.fork()
        except OSError:
            os.close(report_r)
            os.close(report_w)
            raise
        if pid == 0:
            os.close(report_r)
            _become_worker(script, slot.worker_id, report_w, slot.settings, _process_title(slot.worker_type))
        os.close(report_w)
        os.set_blocking(report_r, False)
        try:
            return _Child(pid, report_r)
        except OSError:
            os.kill(pid, signal.SIGKILL)  # a child we could not watch must not run
            os.waitpid(pid, 0)
            os.close(report_r)
            raise

    def _adopt(self, slot: _Slot) -> bool:
        """Watch the process that holds slot's PID-file lock in this root, if one does;
        whether there was one.  Its PID comes from the kernel, never from a row."""
        pid_file = self._pid_file(slot)
        try:
            pid = get_pid_for_running_process(pid_file)
        except UniphantError as e:  # not a file of ours (a FIFO planted there, say)
            self.logger.warning("worker %s: %s", slot.worker_id, e)
            return False
        if pid is None:
            return False
        try:
            child = _Child(pid, None)
        except ProcessLookupError:
            return False
        except OSError as e:  # out of descriptors, say: looked at again at the next pass
            self.logger.warning("worker %s: cannot watch PID %d: %s", slot.worker_id, pid, e.strerror)
            return False
        if get_pid_for_running_process(pid_file) != pid:  # it went, and its PID may be another's now
            child.close()
            return False
        slot.child = child
        if slot.state == STARTING:
            slot.move(RUNNING)
        self.logger.info("adopted worker %s (%s): PID %d", slot.worker_id, slot.worker_type, pid)
        return True

    def _report(self, connection) -> None:
        """Write to worker_states what changed since the last write, and nothing else:
        every change each pass saw, in order (the history keeps each), in one
        transaction, at once and then at most one write a _REPORT_GAP, so that a
        burst of changes (a fleet starting or stopping) costs the server few
        commits."""
        now = time.monotonic()
        for slot in self.slots.values():
            state = slot.state
            facts = None if state is None else (
                state, slot.child.pid if slot.child else None, slot.restarts, slot.last_exit,
                slot.due if state == BACKOFF else None, slot.warnings)
            if facts != slot.queued:
                slot.unwritten.append((facts, slot.log_tail))
                slot.queued, slot.log_tail = facts, None
        changed = [slot for slot in self.slots.values() if slot.unwritten]
        # A process it forked or found holding the lock is a running copy: its row says so
        # at once, so that no planner takes the worker for gone while this one stops it.
        vouch = [slot for slot in self.slots.values()
                 if slot.child is not None and slot.child.ready and not slot.child.vouched]
        self.report_due = None
        if changed and now < self.reported_at + _REPORT_GAP:
            self.report_due, changed = self.reported_at + _REPORT_GAP, []
        if not changed and not vouch:
            return
        if changed:
            self.reported_at = now
        in_one_transaction(connection, lambda: [
            query_row(connection, "SELECT uniphant.report_worker($1::uuid, $2, $3, $4, $5, $6, $7, $8)",
                      (slot.worker_id, facts and facts[0], facts and facts[1], slot.restarts if facts is None
                       else facts[2], slot.last_exit if facts is None else facts[3],
                       max(facts[4] - now, 0.0) if facts and facts[4] is not None else None, tail,
                       facts and facts[5]))
            for slot in changed for facts, tail in slot.unwritten] + [
            query_row(connection, "SELECT uniphant.prove_process($1::uuid, $2)", (slot.worker_id, slot.child.pid))
            for slot in vouch])
        for slot in vouch:
            slot.child.vouched = True
        for slot in changed:
            slot.reported, slot.unwritten = slot.unwritten[-1][0], []
            if slot.reported is None:
                del self.slots[slot.worker_id]

    def _tell_systemd(self) -> None:
        """A STATUS= line when the counts change, and WATCHDOG=1 at half the period
        systemd asks for (the run loop says READY=1 after the first pass)."""
        running = sum(1 for slot in self.slots.values() if slot.state == RUNNING)
        wanted = sum(1 for slot in self.slots.values() if slot.wanted and slot.state not in _HELD)
        status = f"STATUS={running} of {wanted} workers running"
        lines = [status] if status != self.status_told else []
        period = watchdog_period()
        if period and time.monotonic() >= self.next_watchdog:
            lines.append("WATCHDOG=1")
            self.next_watchdog = time.monotonic() + period
        if lines:
            sd_notify(*lines)
        self.status_told = status

    def stop_all(self) -> None:
        """Stop every child (SIGTERM, then SIGKILL to its group after its stop_timeout)
        and wait for them: a manager that stops cleanly leaves nothing running."""
        for slot in self.slots.values():
            slot.wanted = False
            if slot.child is not None and slot.child.kill_at is None:
                self._stop(slot.child)
        children = [slot.child for slot in self.slots.values() if slot.child is not None]
        give_up = max((c.kill_at for c in children), default=0.0) + 10.0
        while children and time.monotonic() < give_up:
            wait_for_wakeup(max(min(c.kill_at for c in children) - time.monotonic(), 0.01), None,
                  tuple(c.pidfd for c in children))
            self._reap()
            self._enforce_deadlines()
            children = [slot.child for slot in self.slots.values() if slot.child is not None]
        if children:
            self.logger.error("workers still running after SIGKILL: PIDs %s",
                              ", ".join(str(c.pid) for c in children))


def _runs_worker(state_dir: str, worker_type: Optional[str], worker_id: str, pid: Optional[int]) -> bool:
    """Whether process pid holds (or has open) the PID file of worker_id in state_dir:
    the kernel's word on what a process row of this host says.  A row's type
    that is no single directory name of ours names no PID file at all."""
    if pid is None or not worker_type or worker_type in (".", "..") or "/" in worker_type or "\0" in worker_type:
        return False
    path = pid_file_of(state_dir, worker_type, worker_id)
    try:
        if get_pid_for_running_process(path) == pid:
            return True
    except (OSError, UniphantError):  # a name too long, or not a file of ours
        return False
    return holds_open(pid, path)


def _files_below(directory: str, suffix: str) -> List[str]:
    """The regular files ending in suffix one directory below directory (no symlinks)."""
    found = []
    try:
        kinds = [e for e in os.scandir(directory) if e.is_dir(follow_symlinks=False)]
    except FileNotFoundError:
        return []
    for kind in kinds:
        found += [e.path for e in os.scandir(kind.path)
                  if e.name.endswith(suffix) and e.is_file(follow_symlinks=False)]
    return found


def _unused_since(path: str, cutoff: float) -> bool:
    """Whether path was last written before cutoff (time.time), and no process holds
    it, if it is a PID file."""
    try:
        if os.lstat(path).st_mtime >= cutoff:
            return False
        return not path.endswith(".pid") or get_pid_for_running_process(path) is None
    except (OSError, UniphantError):
        return False  # gone meanwhile, or not a file of ours: leave it


# What a manager keeps of the log of a run that failed: its last lines, at most.
_TAIL_LINES, _TAIL_BYTES = 20, 4096


def _log_tail(path: str, since: float) -> Optional[str]:
    """The last lines of the log file at path, if it was written to since (time.time),
    each shown printable; None if there is none."""
    try:
        with os.fdopen(open_own_file(path, os.O_RDONLY), "rb") as f:
            if os.fstat(f.fileno()).st_mtime < since:
                return None
            f.seek(max(os.fstat(f.fileno()).st_size - _TAIL_BYTES, 0))
            lines = f.read(_TAIL_BYTES).decode("utf-8", "replace").splitlines()[-_TAIL_LINES:]
    except (OSError, UniphantError):
        return None  # no log file (log_file=off), or not a file of ours
    return "\n".join(printable(line) for line in lines)[-_TAIL_BYTES:] or None


def _how_it_ended(child: _Child, status: Optional[int]) -> str:
    """Why a worker's run ended, in one line: the manager's reason, its exit code or
    signal, and its last words (an exception's last line, say)."""
    if child.ended_by:
        return child.ended_by
    words = f": {child.words}" if child.words else ""
    if status is None:
        return f"ended{words or ' (no exit status: it was adopted)'}"
    if os.WIFSIGNALED(status):
        return f"killed by {signal_name(os.WTERMSIG(status))}{words}"
    return f"exit code {os.waitstatus_to_exitcode(status)}{words}"


# The most bytes of a process's name (/proc/PID/comm) that Linux keeps.
_COMM_BYTES = 15


def _process_title(worker_type: str) -> str:
    """The name a forked worker goes by in ps, top and pkill: `uniphant:` and its
    type, or the type's last part where the whole does not fit, cut to fit."""
    prefix = "uniphant:"
    whole = prefix + worker_type
    name = whole if len(whole.encode()) <= _COMM_BYTES else prefix + worker_type.rsplit(".", 1)[-1]
    return name.encode()[:_COMM_BYTES].decode(errors="ignore")


def _name_process(name: str) -> None:
    """Set this process's name (prctl PR_SET_NAME), where the C library offers it:
    forked from the manager, a worker would otherwise go by the manager's."""
    try:
        import ctypes

        ctypes.CDLL(None).prctl(15, name.encode(), 0, 0, 0)  # 15: PR_SET_NAME
    except (ImportError, OSError, AttributeError):
        return  # no prctl here: the worker keeps the manager's name


def _become_worker(script: str, worker_id: str, report_fd: int, settings: str, name: str) -> None:
    """In a child the manager has forked: run script's worker as `start` would, named
    name, with fresh runtime state and nothing of the manager's (descriptors,
    handlers, signals, configuration).  Never returns into the manager's code.
    settings: the worker's desired settings as JSON, decoded here, so that a row
    no reader can decode fails this worker only."""
    import logging
    import runpy
    import signal

    code = EXIT_FAILURE
    try:
        os.setsid()  # a process group of its own: stopped whole, and no terminal's signals
        _name_process(name)
        signal.set_wakeup_fd(-1)
        for sig in signal.valid_signals():
            if callable(signal.getsignal(sig)):
                signal.signal(sig, signal.SIG_DFL)
        close_inherited_fds(report_fd)
        null = os.open(os.devnull, os.O_RDONLY)
        os.dup2(null, 0)  # stdout and stderr stay the manager's: with log_file=off, its log
        os.close(null)
        os.chdir(os.path.dirname(script))
        os.umask(0o002)
        for variable in ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID"):
            os.environ.pop(variable, None)  # systemd listens to the manager, not to its workers
        for logger in logging.Logger.manager.loggerDict.values():
            if isinstance(logger, logging.Logger):
                logger.handlers.clear()  # the manager's: their files are closed here
        # The manager's configuration (its password, say) is not the worker's,
        # which reads its own: empty both copies, which its frames and objects
        # still reach (the one it was given, and the run loop's own).
        _manager.config.clear()
        begin_managed_child(report_fd, settings)
        sys.argv = [script, worker_id, "start"]
        runpy.run_path(script, run_name="__main__")
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else EXIT_OK if e.code is None else EXIT_FAILURE
    except BaseException as e:
        report_to_manager("error", explain(e))
    finally:
        os._exit(code)


def manage(config: Config, logger: logging.Logger, connection) -> None:
    """The manager (docs/fleet.md, "The fleet"), a worker function: one pass of making this
    host run what the `workers` table asks of it, supervising those workers, and
    recording what happened.

    Run it as the worker function of a script (workers/uniphant/manager.py).
    Its hooks (docs/python-api.md, "Hooks") take the project root's manager lock and
    register the host's manager (prepare), say when the next pass is due
    (wakeup), and stop every worker it runs when the manager stops (teardown).
    Its state outlives a lost connection: after a reconnect it carries on.
    """
    if _manager is None:
        raise UniphantError("the manager runs as main(manage), not inside another worker function")
    _manager.step(connection)


def _prepare_manager(config: Config, logger: logging.Logger, connection) -> None:
    """Before a manager says it is ready: hold this project root's manager lock and
    register as its host's manager; a second manager is refused, naming the first."""
    fd = open_own_file(os.path.join(config["state_dir"], "pid", "manager.lock"), os.O_RDWR | os.O_CREAT)
    try:
        fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        with os.fdopen(fd) as f:
            holder = f.read(200).split()
        raise UniphantError(f"a manager already runs in {config['root_dir']}: "
                            f"worker {' with PID '.join(reversed(holder[:2]))}") from None
    os.ftruncate(fd, 0)
    os.write(fd, f"{os.getpid()} {config['worker_id']}\n".encode())
    try:
        os.close(os.pidfd_open(os.getpid()))
    except (AttributeError, OSError):
        raise UniphantError("the manager needs pidfds (Linux 5.3 or newer)") from None
    query_row(connection, "SELECT uniphant.register_manager($1::uuid)", (config["host_id"],))
    global _manager
    _manager = _Manager(config, logger)


def _manager_wakeup(config: Config, connection) -> Tuple[float, Tuple[int, ...]]:
    return _manager.wakeup(connection)


def _stop_managed_workers(config: Config, logger: logging.Logger) -> None:
    """A manager that stops stops its workers; one that hands over (restart: a new
    manager, perhaps a new uniphant.py, adopts them) leaves them running."""
    if handing_over():
        running = sum(1 for slot in _manager.slots.values() if slot.child is not None)
        logger.info("leaving %d workers running for the next manager", running)
        return
    _manager.stop_all()


manage.one_per_host = True  # type: ignore[attr-defined]
manage.handover_signal = "SIGUSR2"  # type: ignore[attr-defined]
manage.prepare = _prepare_manager  # type: ignore[attr-defined]
manage.wakeup = _manager_wakeup  # type: ignore[attr-defined]
manage.teardown = _stop_managed_workers  # type: ignore[attr-defined]


# ---------------------------------------------------------------------------
# Operations on the desired state: each declared once, with its SQL, its
# checks and its messages; the command line and the page both use them
# ---------------------------------------------------------------------------

class Refused(UniphantError):
    """An operation that found nothing to act on: the message says what it looked for."""


def checked_type(text: str) -> str:
    """text, if it is a worker type the fleet can run; else a UsageError saying why not."""
    if not is_worker_type(text):
        raise UsageError(f"{shorten(text)} is not a worker type (like a.b: letters, digits, "
                         f"_ and -, in up to {TYPE_PARTS} parts joined with dots, up to "
                         f"{TYPE_LENGTH} characters)")
    return text


def checked_count(value: Any, low: int, high: int, what: str) -> int:
    """value (a whole number, or its text) if it is from low to high; else a UsageError."""
    if isinstance(value, int) and not isinstance(value, bool) and low <= value <= high:
        return value
    if isinstance(value, str) and is_whole(value, low, high):
        return int(value)
    raise UsageError(f"{what} must be a whole number from {low} to {high}, got {shorten(str(value))}")


def settings_of(words: List[str]) -> str:
    """The JSON object of KEY=VALUE words; the database checks it, by the rule it
    holds every desired worker's settings to (docs/changing-the-fleet.md, "Per-worker settings")."""
    import json

    settings: Dict[str, str] = {}
    for word in words:
        if not isinstance(word, str):
            raise UsageError("settings are KEY=VALUE texts")
        key, sep, value = word.partition("=")
        if not sep or not key:
            raise UsageError(f"setting {shorten(key)}: expected KEY=VALUE")
        if key in settings:
            raise UsageError(f"setting {shorten(key)}: given twice")
        settings[key] = value
    return json.dumps(settings)


class _Verb(NamedTuple):
    """An operation on one worker (by its id) or every worker of a type."""
    by_id: str   # SQL taking the worker id: 1 if it changed it, else 0
    by_type: str  # SQL taking the worker type: how many it changed
    none: str    # what no match means, for the id or type


VERBS: Dict[str, _Verb] = {
    "stop": _Verb("SELECT uniphant.remove_worker($1::uuid)::int", "SELECT uniphant.remove_workers($1)",
                  "no such worker: {}"),
    "restart": _Verb("SELECT uniphant.restart_worker($1::uuid)::int", "SELECT uniphant.restart_workers($1)",
                     "no running, done or backing-off worker {}"),
    "pause": _Verb("SELECT uniphant.pause_worker($1::uuid)::int", "SELECT uniphant.pause_workers($1)",
                   "no running worker to pause: {}"),
    "resume": _Verb("SELECT uniphant.resume_worker($1::uuid)::int", "SELECT uniphant.resume_workers($1)",
                    "no paused or done worker {}"),
}


def apply_verb(connection, verb: str, target: str) -> str:
    """Do verb (VERBS) to the worker whose id target is, or else to every worker of
    the type target is; what was done.  Refused when nothing matched."""
    worker_id = canonical_uuid(target)
    sql = VERBS[verb].by_id if worker_id else VERBS[verb].by_type
    target = worker_id or checked_type(target)
    count = int(query_row(connection, sql, (target,))[0])
    if not count:
        raise Refused(VERBS[verb].none.format(target))
    return f"{verb}: {count} worker{'s' if count != 1 else ''}"


def add_worker(connection, worker_type: str, host_id: Optional[str], words: List[str]) -> Tuple[str, str]:
    """Add a worker of worker_type (on host_id, else any host) with the settings of
    KEY=VALUE words: (its id, a warning when no live manager there has its script, or "")."""
    worker_id, provided = query_row(
        connection, "SELECT uniphant.add_worker($1, $2::uuid, $3::jsonb)::text, EXISTS (SELECT 1 FROM "
        "uniphant.live_managers() m WHERE $1 = ANY (m.worker_types) "
        "AND m.host_id = coalesce($2::uuid, m.host_id))", (checked_type(worker_type), host_id, settings_of(words)))
    if provided:
        return worker_id, ""
    where = f"host {host_id}" if host_id else "any host"
    known = [row[0] for row in query_rows(connection, "SELECT DISTINCT unnest(worker_types) FROM "
                                          "uniphant.live_managers() ORDER BY 1")]
    meant = resembling(worker_type, known)
    return worker_id, (f"no live manager on {where} has a script of worker type {worker_type}: the worker "
                       f"waits until one does (a manager sees a new script within 5 s)" + (f"; did you mean {printable(meant)}? (python uniphant.py "
                                                  f"stop {worker_id} removes it)" if meant else ""))


def scale(connection, worker_type: str, n: Any, host_id: Optional[str]) -> str:
    """Make it n workers of worker_type on host_id (else n any-host ones); what was done."""
    n = checked_count(n, 0, 100000, "N")
    change = query_row(connection, "SELECT uniphant.scale($1, $2, $3::uuid)", (checked_type(worker_type), n, host_id))[0]
    where = f"on host {host_id}" if host_id else "for any host"
    done = f"added {change}" if change > 0 else f"removed {-change}" if change < 0 else "unchanged"
    return f"{worker_type}: {n} workers {where} ({done})"


# A worker's settings, its keys in unset removed, then the new ones merged in
# (all of them replaced, with $4), in the one statement that writes them.
_SET_SQL = ("SELECT uniphant.set_worker_settings($1::uuid, CASE WHEN $4 THEN '{}'::jsonb ELSE coalesce(("
            "SELECT f.settings FROM uniphant.fleet f WHERE f.worker_id = $1::uuid AND f.settings IS NOT NULL "
            "LIMIT 1), '{}'::jsonb) END - $3::text[] || $2::jsonb)")


def set_settings(connection, worker_id: str, words: List[str], replace: bool = False,
                 unset: Tuple[str, ...] = ()) -> str:
    """Merge the settings of KEY=VALUE words into a worker's, after removing the keys
    of unset (replace: the words are all its settings): it restarts."""
    new = settings_of(words)
    if any(not isinstance(key, str) or not key for key in unset):
        raise UsageError("--unset takes a setting's KEY")
    if not query_row(connection, _SET_SQL, (worker_id, new, list(unset), replace))[0]:
        raise Refused(f"no such worker: {worker_id}")
    return f"set: worker {worker_id} restarts with its new settings"


def roll(connection, worker_type: str, batch: Any) -> str:
    """A rolling restart of worker_type, batch at a time; what it will do."""
    batch = checked_count(batch, 1, 100000, "--batch")
    count = query_row(connection, "SELECT uniphant.restart_workers($1, $2)", (checked_type(worker_type), batch))[0]
    if not count:
        raise Refused(f"no running worker {worker_type}")
    return (f"restart: a rolling restart of {count} workers of {worker_type}, {batch} at a time "
            f"(`python uniphant.py ps {worker_type}` follows it)")


# ---------------------------------------------------------------------------
# Ops commands: python uniphant.py {ps,add,scale,stop,restart}
# ---------------------------------------------------------------------------

_OPS_HELP = """usage: python uniphant.py [-v] {ps,add,scale,set,stop,restart,pause,resume,logs} ...

The fleet from the command line, as thin layers over schema.sql's functions.
Connection settings: the uniphant.conf of the project root (the nearest
directory above the current one that holds `workers`), then the operator's
own ~/.uniphant/operator.conf (or the file UNIPHANT_OPERATOR_CONF names),
which no worker reads, then the environment.  -v: say which server was used
(it is said anyway when that was not a primary).

commands:
  ps [ID|TYPE] [--host HOST] [--state STATE] [--json] [--watch]
                              every desired worker and every other process (or those
                              chosen): state, host, PID, since when, restarts, why its
                              last run ended; for an ID, all that is known of it;
                              --watch: again at every change
  add TYPE [--host HOST] [--set KEY=VALUE]...
                              add a worker of TYPE, pinned to HOST (a host id, or
                              `here`: this project's), else for any host, with settings
                              for its config; prints its id
  scale TYPE N [--host HOST]  make it N workers of TYPE on HOST (else N any-host ones)
  set ID [--replace] [--unset KEY]... [KEY=VALUE]...
                              change a worker's settings, keeping the others (--unset:
                              remove KEY; --replace: these and no others): it restarts
  stop ID|TYPE                remove a worker, or every worker of TYPE, from the
                              desired state: its manager stops it
  restart ID|TYPE [--rolling [--batch N]]
                              end the process of a worker, or of every worker of
                              TYPE: its manager starts it again at once (a done one
                              too); --rolling: N at a time (1), each batch once the
                              one before is back
  pause ID|TYPE               stop a worker's process, keeping it in the desired state
  resume ID|TYPE              start a paused or done worker again
  logs ID|TYPE [-n N] [-f]    the last N lines (20) of a worker's log, or of each worker
                              of TYPE, on this host; -f: and follow them (across
                              rotation and restarts); on another host: which has it"""


def _ops_config(warnings: List[str]) -> Config:
    """The settings of the project around the current directory (or none)."""
    root: Optional[str] = os.getcwd()
    while not os.path.isdir(os.path.join(root, "workers")):
        parent = os.path.dirname(root)
        root = None if parent == root else parent
        if root is None:
            break
    config: Config = dict(RUNTIME_DEFAULTS, root_dir=root, script_dir=root, process_id=new_uuid(),
                          state_dir=root and state_dir_of(root))
    config.update(read_operator_config(config, warnings))
    return config


def _ops_arguments(args: List[str], flags: Tuple[str, ...], valued: Tuple[str, ...],
                   repeated: Tuple[str, ...] = ()) -> Tuple[list, dict]:
    """(positional arguments, options) of an ops command's arguments; a repeated
    option's values are a list."""
    positional, options = [], {}
    words = iter(args)
    for word in words:
        if word in flags:
            options[word] = True
        elif word in valued or word in repeated:
            value = next(words, None)
            if value is None:
                raise UsageError(f"{word} needs a value")
            if word in repeated:
                options.setdefault(word, []).append(value)
            else:
                options[word] = value
        elif word.startswith("-"):
            raise UsageError(f"unrecognized option {shorten(word)}")
        else:
            positional.append(word)
    return positional, options


def _ops_host(config: Config, value: Optional[str]) -> Optional[str]:
    if value is None:
        return None
    if value == "here":
        host_id = config["root_dir"] and read_host_id(os.path.join(config["state_dir"], ".host_id"))
        if not host_id:
            raise UsageError("--host here: this project has no .host_id yet (start its manager first)")
        return host_id
    host_id = canonical_uuid(value)
    if host_id is None:
        raise UsageError(f"--host takes a host id (a UUID) or 'here', got {shorten(value)}")
    return host_id


def _age(seconds: Optional[float]) -> str:
    if seconds is None:
        return ""
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{int(seconds // size)}{unit}"
    return f"{max(int(seconds), 0)}s"


# What ps shows of each row of uniphant.fleet, in this order (the JSON keys).
_PS_COLUMNS = ("worker_id", "worker_type", "state", "host", "host_id", "pinned", "pid", "since_seconds",
               "restarts", "last_exit", "next_start_in", "detail", "settings", "log_tail", "warnings")
_PS_SQL = ("SELECT worker_id::text, worker_type, state, host, host_id::text, pinned, pid, "
           "extract(epoch FROM now() - since)::float8, restarts, last_exit, "
           "extract(epoch FROM next_start_at - now())::float8, detail, settings::text, log_tail, warnings "
           "FROM uniphant.fleet "
           "WHERE ($1::uuid IS NULL OR worker_id = $1::uuid) AND ($2::text IS NULL OR worker_type = $2) "
           "AND ($3::text IS NULL OR host_id::text = $3 OR host = $3) AND ($4::text IS NULL OR state = $4) "
           "ORDER BY worker_type, host, worker_id")


_PS_HISTORY = ("SELECT extract(epoch FROM now() - at)::float8, state, pid, last_exit FROM uniphant.worker_events "
               "WHERE worker_id = $1::uuid ORDER BY id DESC LIMIT 20")


def _ops_ps(args: List[str], config: Config) -> Callable[[Any], int]:
    positional, options = _ops_arguments(args, ("--json", "--watch"), ("--host", "--state"))
    if len(positional) > 1:
        raise UsageError(f"ps: unexpected argument {shorten(positional[1])} (it takes one ID or TYPE)")
    worker_id = canonical_uuid(positional[0]) if positional else None
    worker_type = checked_type(positional[0]) if positional and not worker_id else None
    host = options.get("--host")
    host = _ops_host(config, host) if host == "here" else (canonical_uuid(host or "") or host)
    chosen = (worker_id, worker_type, host, options.get("--state"))

    def ps(connection) -> int:
        if options.get("--watch"):
            connection.execute_simple(f"LISTEN {_FLEET_CHANNEL}; LISTEN {_WATCH_CHANNEL}")
        while True:
            rows = [dict(zip(_PS_COLUMNS, row)) for row in query_rows(connection, _PS_SQL, chosen)]
            for row in rows:
                row["settings"] = shown_settings(row["settings"])
            if worker_id and not rows:
                raise UniphantError(f"no such worker: {worker_id}")
            if worker_id:
                rows[0]["history"] = [dict(zip(("seconds_ago", "state", "pid", "last_exit"), event))
                                      for event in query_rows(connection, _PS_HISTORY, (worker_id,))]
            if options.get("--watch"):
                print("\x1b[H\x1b[2J", end="")  # the screen cleared, for the fleet as it is now
            if options.get("--json"):
                import json

                print(json.dumps(rows[0] if worker_id else rows, indent=2), flush=True)
            elif worker_id:
                _print_worker(rows[0])
            else:
                _print_table(rows)
            if not options.get("--watch"):
                return EXIT_OK
            _wait_for_the_fleet(connection)
    return ps


# The channel that watchers of the fleet hear every reported change on
# (schema.sql: notify_watchers).
_WATCH_CHANNEL = "uniphant_watch"


def _wait_for_the_fleet(connection) -> None:
    """Until the fleet changes (a notification), or 5 s have passed."""
    wire = wire_of(connection)
    if not connection.notifications and not wire.pending():
        fd_readable(wire.fileno(), _PLAN_EVERY)
    connection.execute_simple("")  # lets pg8000 read what has arrived
    time.sleep(0.1)  # a burst of changes is one redraw
    connection.execute_simple("")
    connection.notifications.clear()


def _cut(text: str, width: int) -> str:
    """text, or as much of it as fits width with an ellipsis (the whole is in ps ID)."""
    return text if len(text) <= width else text[:max(width - 1, 0)] + "\u2026"[:width]


def _fit(table: List[tuple], columns: int) -> List[tuple]:
    """table with its DETAIL (second last) and LAST EXIT (last) columns cut so that
    each line fits columns characters where the other columns leave room; DETAIL
    keeps at least half of that room if it needs it."""
    fixed = sum(max(len(row[i]) for row in table) + 2 for i in range(len(table[0]) - 2))
    detail = max(len(row[-2]) for row in table)
    last = max(len(row[-1]) for row in table)
    room = max(columns - fixed - 2, 0)
    if detail + last <= room:
        return table
    detail_width = min(detail, max(room // 2, room - last))
    return [(*row[:-2], _cut(row[-2], detail_width), _cut(row[-1], room - detail_width)) for row in table]


def _warned(row: Dict[str, Any]) -> str:
    """A table's word that a worker's configuration has warnings, which ps ID shows."""
    count = len((row["warnings"] or "").splitlines())
    return f"{count} config warning{'s' if count != 1 else ''} (ps ID)" if count else ""


def _print_table(rows: List[Dict[str, Any]]) -> None:
    """ps's table: every text from the database shown printable; the last column
    unpadded; on a terminal, within its width (shutil.get_terminal_size)."""
    import shutil

    table = [("WORKER", "TYPE", "STATE", "HOST", "HOST ID", "PLACED", "PID", "SINCE", "RESTARTS", "DETAIL",
              "LAST EXIT")]
    for row in rows:
        state = row["state"]
        if state == "backoff" and row["next_start_in"] is not None:
            state = f"backoff {_age(row['next_start_in'])}"
        table.append(tuple(printable(cell) for cell in (
            row["worker_id"], row["worker_type"], state, row["host"] or "", (row["host_id"] or "")[:8],
            "pinned" if row["pinned"] else "any", str(row["pid"] or ""), _age(row["since_seconds"]),
            str(row["restarts"]), row["detail"] or _warned(row), row["last_exit"] or "")))
    # Piped to a program (not a terminal), every line is whole.
    columns = shutil.get_terminal_size().columns if sys.stdout.isatty() else None
    if columns is not None:
        table = _fit(table, columns)
    widths = [max(len(row[i]) for row in table) for i in range(len(table[0]) - 1)]
    for row in table:  # cut at the terminal's edge where even the other columns do not fit
        line = "  ".join(cell.ljust(width) for cell, width in zip(row, widths)) + "  " + row[-1]
        print(line if columns is None else _cut(line, columns))


def _print_worker(row: Dict[str, Any]) -> None:
    """ps ID: all that is known of one worker, a line a fact."""
    settings = row["settings"] or {}
    facts = [
        ("worker", row["worker_id"]), ("type", row["worker_type"]), ("state", row["state"]),
        ("detail", row["detail"]), ("host", f"{row['host'] or '?'} ({row['host_id'] or 'none'})"),
        ("placed", "pinned to its host" if row["pinned"] else "on any host with its script"),
        ("pid", row["pid"]), ("since", _age(row["since_seconds"])), ("restarts", row["restarts"]),
        ("last exit", row["last_exit"]),
        ("next start", row["next_start_in"] is not None and f"in {_age(row['next_start_in'])}"),
        ("settings", ", ".join(f"{key}={value}" for key, value in sorted(settings.items()))),
    ]
    for name, value in facts:
        if value not in (None, "", False):
            print(f"{name + ':':<12}{printable(str(value))}")
    for number, warning in enumerate((row["warnings"] or "").splitlines()):
        print(f"{'warnings:' if not number else '':<12}{printable(warning)}")
    if row["log_tail"]:
        print("last lines: (before its last run ended)")
        for line in row["log_tail"].splitlines():
            print(f"  {printable(line)}")
    if row.get("history"):
        print("history:    (newest first)")
    for event in row.get("history", []):
        print(f"{_age(event['seconds_ago']) + ' ago':>12}  {event['state']:<9}"
              f"{'PID ' + str(event['pid']) if event['pid'] else '':<12}{printable(event['last_exit'] or '')}")


def _ops_type_and_host(args: List[str], config: Config, usage: str,
                       repeated: Tuple[str, ...] = ()) -> Tuple[str, Optional[str], list, dict]:
    """(worker type, host id or None, the other positional arguments, the options)
    of `TYPE ... [--host HOST]`."""
    positional, options = _ops_arguments(args, (), ("--host",), repeated)
    wanted = usage.count(" ") + 1
    if len(positional) > wanted:
        raise UsageError(f"unexpected argument {shorten(positional[wanted])} "
                         f"(expected {usage} [--host HOST])")
    if len(positional) < wanted:
        raise UsageError(f"expected {usage} [--host HOST]")
    return checked_type(positional[0]), _ops_host(config, options.get("--host")), positional[1:], options


def _ops_add(args: List[str], config: Config) -> Callable[[Any], int]:
    worker_type, host_id, _, options = _ops_type_and_host(args, config, "TYPE", ("--set",))
    words = options.get("--set", [])
    settings_of(words)  # a malformed KEY=VALUE is refused before connecting

    def add(connection) -> int:
        worker_id, warning = add_worker(connection, worker_type, host_id, words)
        print(worker_id)
        if warning:
            print(f"uniphant.py: warning: {warning}", file=sys.stderr)
        return EXIT_OK
    return add


def _ops_scale(args: List[str], config: Config) -> Callable[[Any], int]:
    worker_type, host_id, (count,), _ = _ops_type_and_host(args, config, "TYPE N")
    n = checked_count(count, 0, 100000, "N")
    return lambda connection: _say(scale(connection, worker_type, n, host_id))


def _ops_set(args: List[str], config: Config) -> Callable[[Any], int]:
    positional, options = _ops_arguments(args, ("--replace",), (), ("--unset",))
    worker_id = canonical_uuid(positional[0]) if positional else None
    if worker_id is None:
        raise UsageError("set takes a worker id, then settings as KEY=VALUE (and --unset KEY, --replace)")
    words, unset, replace = positional[1:], tuple(options.get("--unset", [])), bool(options.get("--replace"))
    if not (words or unset or replace):
        raise UsageError("set: no settings given (KEY=VALUE to set, --unset KEY to remove, "
                         "--replace alone to remove them all)")
    if unset and replace:
        raise UsageError("--unset goes without --replace, which removes every setting not given")
    settings_of(words)
    return lambda connection: _say(set_settings(connection, worker_id, words, replace, unset))


def _ops_restart(args: List[str], config: Config) -> Callable[[Any], int]:
    """restart ID|TYPE, or a rolling restart of TYPE (--rolling [--batch N])."""
    positional, options = _ops_arguments(args, ("--rolling",), ("--batch",))
    if not options.get("--rolling"):
        if "--batch" in options:
            raise UsageError("--batch goes with --rolling")
        return _ops_verb("restart")(args, config)
    if len(positional) != 1 or canonical_uuid(positional[0]):
        raise UsageError("restart --rolling takes a worker type")
    worker_type = checked_type(positional[0])
    batch = checked_count(options.get("--batch", "1"), 1, 100000, "--batch")
    return lambda connection: _say(roll(connection, worker_type, batch))


def _ops_verb(verb: str) -> Callable:
    """The ops command of a verb that takes a worker id or a worker type (VERBS)."""
    def parse(args: List[str], config: Config) -> Callable[[Any], int]:
        positional, _ = _ops_arguments(args, (), ())
        if len(positional) > 1:
            raise UsageError(f"unexpected argument {shorten(positional[1])} "
                             f"({verb} takes one worker id or worker type)")
        if not positional:
            raise UsageError(f"{verb} takes a worker id or a worker type")
        target = canonical_uuid(positional[0]) or checked_type(positional[0])
        return lambda connection: _say(apply_verb(connection, verb, target))
    return parse


def _say(text: str) -> int:
    print(text)
    return EXIT_OK


def _ops_logs(args: List[str], config: Config) -> Any:
    positional, options = _ops_arguments(args, ("-f", "--follow"), ("-n",))
    if len(positional) != 1:
        raise UsageError("logs takes one worker id or worker type")
    count = options.get("-n", "20")
    if not is_whole(count, 0, 100000):
        raise UsageError(f"-n takes a whole number of lines, got {shorten(count)}")
    if config["root_dir"] is None:
        raise UniphantError("no project here (no directory above this one holds workers/): logs are "
                            "read in the project whose workers wrote them")
    worker_id = canonical_uuid(positional[0])
    target = worker_id or checked_type(positional[0])
    logs = os.path.join(config["state_dir"], "log")
    if worker_id:
        paths = [p for p in _files_below(logs, ".log") if os.path.basename(p) == f"{worker_id}.log"]
    else:
        paths = _files_below(logs, ".log")
        paths = [p for p in paths if os.path.basename(os.path.dirname(p)) == target]
    if paths:
        _print_logs(sorted(paths), int(count), bool(options.get("-f") or options.get("--follow")))
        return EXIT_OK

    def elsewhere(connection) -> int:
        rows = query_rows(connection, "SELECT worker_id::text, host, host_id::text, log_tail FROM uniphant.fleet WHERE "
                     "worker_id::text = $1 OR worker_type = $1 ORDER BY host, worker_id", (target,))
        if not rows:
            raise UniphantError(f"no log of {target} here, and no such worker in the fleet")
        for worker, host, host_id, tail in rows:
            print(f"worker {worker} is on host {printable(host or '?')} ({host_id}): "
                  f"its log is there (python uniphant.py logs {worker})")
            for line in (tail or "").splitlines():
                print(f"  {printable(line)}")
        return EXIT_FAILURE
    return elsewhere


def _print_logs(paths: List[str], count: int, follow: bool) -> None:
    """The last count lines of each log file, named when there are more than one;
    then, following, what is written to them, also once rotated or made anew.
    Each is opened as the page opens it: never through a symlink, and only if it
    is a regular file (a FIFO put in its place is refused, not waited on)."""
    named = len(paths) > 1
    watched = {path: (0, 0, 0) for path in paths}  # path -> (device, inode, position)
    for path in paths:
        fd = _open_log(path)
        if fd is None:
            continue
        try:
            size = os.fstat(fd).st_size
            _print_lines(path, _last_lines(fd, size, count), named)
            watched[path] = (*_identity(fd), size)
        finally:
            os.close(fd)
    while follow:
        time.sleep(0.2)
        for path, (device, inode, position) in list(watched.items()):
            fd = _open_log(path)
            if fd is None:
                continue  # rotated away, not yet made anew
            try:
                now = _identity(fd)
                if now != (device, inode) or os.fstat(fd).st_size < position:
                    position = 0  # rotated away, or made anew: the new file from its start
                watched[path] = (*now, _print_from(fd, position, path, named))
            finally:
                os.close(fd)


# How much of a log `logs` reads at a time: it never holds a whole log.
_LOG_BLOCK = 1 << 16


def _open_log(path: str) -> Optional[int]:
    """A log file opened to read (open_own_file), or None if there is none."""
    try:
        return open_own_file(path, os.O_RDONLY)
    except FileNotFoundError:
        return None


def _last_lines(fd: int, size: int, count: int) -> List[str]:
    """The last count lines of fd's first size bytes, read backwards a block at a
    time until they are in."""
    blocks: List[bytes] = []
    newlines, start = 0, size
    # count + 1 newlines: the first block read may begin in the middle of a line.
    while count and start > 0 and newlines <= count:
        step = min(_LOG_BLOCK, start)
        start -= step
        blocks.append(os.pread(fd, step, start))
        newlines += blocks[-1].count(b"\n")
    lines = b"".join(reversed(blocks)).decode("utf-8", "replace").splitlines()
    return lines[-count:] if count else []


def _print_from(fd: int, position: int, path: str, named: bool) -> int:
    """Print fd's lines from position on, a block at a time; the position after them."""
    rest = b""
    while True:
        block = os.pread(fd, _LOG_BLOCK, position)
        position += len(block)
        data = rest + block
        cut = data.rfind(b"\n") + 1
        if not block or (not cut and len(data) > _LOG_BLOCK):
            cut = len(data)  # the end for now, or a line longer than a block: what there is
        _print_lines(path, data[:cut].decode("utf-8", "replace").splitlines(), named)
        rest = data[cut:]
        if not block:
            return position


def _identity(fd: int) -> Tuple[int, int]:
    status = os.fstat(fd)
    return status.st_dev, status.st_ino


def _print_lines(path: str, lines: List[str], named: bool) -> None:
    prefix = f"{os.path.basename(path)[:-4]}: " if named else ""
    for line in lines:
        print(prefix + printable(line), flush=True)


_OPS_COMMANDS = {
    "ps": _ops_ps,
    "add": _ops_add,
    "scale": _ops_scale,
    "set": _ops_set,
    "stop": _ops_verb("stop"),
    "restart": _ops_restart,
    "pause": _ops_verb("pause"),
    "resume": _ops_verb("resume"),
    "logs": _ops_logs,
}


def _reads_only(argv: List[str]) -> bool:
    """Whether the ops command only reads, so that a standby will do: ps, but not
    ps --watch, which listens (a standby cannot)."""
    return argv[0] == "ps" and "--watch" not in argv


def _ops_connect(prog: str, config: Config, reading: bool, verbose: bool):
    """The ops command's connection.  Unless PGTARGETSESSIONATTRS says otherwise, a
    command that only reads takes any server when no writable one answers; it says
    on stderr which server it read from when that was not a primary (or verbose)."""
    attrs = pg_setting(config, "PGTARGETSESSIONATTRS")
    connection = connect_to_server(config, attrs or "read-write", fallback=reading and not attrs)
    wire = wire_of(connection)
    for refusal in wire.passed_over:
        print(f"{prog}: warning: refused {printable(refusal)}", file=sys.stderr)
    if verbose and wire.kind == "a primary":
        print(f"{prog}: {'read from' if reading else 'connected to'} {wire.where}, a primary", file=sys.stderr)
    elif reading and wire.kind != "a primary":
        fell_back = "" if attrs else "no writable server answered: "
        print(f"{prog}: warning: {fell_back}read from {wire.where}, {wire.kind}: "
              f"what it shows may be stale", file=sys.stderr)
    return connection


def ops_main(argv: List[str]) -> None:
    """python uniphant.py COMMAND ...: exit 0, 1 when it failed, 2 for a bad command line."""
    prog = "uniphant.py"
    verbose = "-v" in argv[:1]
    argv = argv[1:] if verbose else argv
    if argv[:1] in (["-h"], ["--help"]):
        print_or_leave_quietly(_OPS_HELP)
        sys.exit(EXIT_OK)
    try:
        parse = _OPS_COMMANDS.get(argv[0] if argv else "")
        if parse is None:
            raise UsageError(f"expected a command ({', '.join(_OPS_COMMANDS)}), got "
                             f"{shorten(argv[0]) if argv else 'none'}")
        warnings: List[str] = []
        config = _ops_config(warnings)
        for warning in warnings:
            print(f"{prog}: warning: {warning}", file=sys.stderr)
        if config["root_dir"] is None:
            print(f"{prog}: no project here (no directory above this one holds workers/): connecting "
                  f"with the environment's settings, else libpq's defaults", file=sys.stderr)
        act = parse(argv[1:], config)  # a command done without the database gives its exit code
        if isinstance(act, int):
            sys.exit(act)
        connection = _ops_connect(prog, config, _reads_only(argv), verbose)
        try:
            code = act(connection)
        finally:
            close_quietly(connection)
    except UniphantError as e:
        if isinstance(e, UsageError):
            print(_OPS_HELP.splitlines()[0], file=sys.stderr)
        print(f"{prog}: error: {e}", file=sys.stderr)
        code = e.exit_code
    except BrokenPipeError:
        leave_quietly()
    except KeyboardInterrupt:  # Ctrl-C ends logs -f and ps --watch
        code = 130
    sys.exit(code)


if __name__ == "__main__":
    ops_main(sys.argv[1:])
