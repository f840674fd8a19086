"""The update lifecycle: named states, one transition table, persisted before side effects.

::

    idle ─start─▶ downloading ─ok─▶ verifying ─ok─▶ installing ─ok─▶ self_test
                      │ fail/reject      │ reject        │ fail          │ fail
                      ▼                  ▼               ▼               ▼
                    failed ◀─────────────┴───────────────┴───────────────┘
    self_test ─ok─▶ activating ─ok─▶ health_check ─ok─▶ committed
                        │ fail            │ fail
                        ▼                 ▼
                    rolling_back ─ok─▶ rolled_back      (fail ─▶ failed)

Each state's handler does its work on entry and returns an :class:`Event`; it never
picks its successor. :data:`TRANSITIONS` is the only place successors are declared.

The record is written atomically *before* the handler of the new state runs, so after
a crash the saved state is the one whose side effects may be half done. On start,
:data:`RESUME` says where to continue from each saved state: work that is safe to
redo is redone; anything after the pointer may have flipped goes to rolling back,
since a model that was live when the agent died has not proven itself.

:attr:`DeploymentRecord.saves` caps the number of saves per deployment, so a device
that keeps crashing in a loop ends in ``failed``, or in ``rolled_back`` when the new model
may have been live: the rollback still runs past the cap, within
:data:`ROLLBACK_SAVES_PAST_CAP` saves of its own.
"""

from __future__ import annotations

import time
from enum import StrEnum
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from agent.slots import atomic_write, set_aside_unreadable

__all__ = [
    "State",
    "Event",
    "TRANSITIONS",
    "RESUME",
    "TERMINAL",
    "OUTCOME",
    "DeploymentRecord",
    "StateStore",
    "next_state",
    "MAX_SAVES_PER_DEPLOYMENT",
    "ROLLBACK_SAVES_PAST_CAP",
]

MAX_SAVES_PER_DEPLOYMENT = 64
# Saves a rollback may still take once the cap is reached: the new model may be live, so
# the previous one must serve again; a rollback that keeps crashing ends in failed.
ROLLBACK_SAVES_PAST_CAP = 8


class State(StrEnum):
    IDLE = "idle"
    DOWNLOADING = "downloading"
    VERIFYING = "verifying"
    INSTALLING = "installing"
    SELF_TEST = "self_test"
    ACTIVATING = "activating"
    HEALTH_CHECK = "health_check"
    COMMITTED = "committed"
    CANDIDATE = "candidate"  # self-tested, running in shadow or split beside the active model
    ROLLING_BACK = "rolling_back"
    ROLLED_BACK = "rolled_back"
    FAILED = "failed"


class Event(StrEnum):
    START = "start"
    OK = "ok"
    FAIL = "fail"
    REJECT = "reject"  # bad data: signature, hash, downgrade, expiry. Never retried.
    HOLD = "hold"  # passed, but the deployment asked for shadow/split rather than activation


S, E = State, Event

TRANSITIONS: dict[tuple[State, Event], State] = {
    (S.IDLE, E.START): S.DOWNLOADING,
    (S.COMMITTED, E.START): S.DOWNLOADING,
    (S.ROLLED_BACK, E.START): S.DOWNLOADING,
    (S.FAILED, E.START): S.DOWNLOADING,
    (S.CANDIDATE, E.START): S.DOWNLOADING,
    # Metadata refresh, downgrade policy and the transfer itself.
    (S.DOWNLOADING, E.OK): S.VERIFYING,
    (S.DOWNLOADING, E.FAIL): S.FAILED,
    (S.DOWNLOADING, E.REJECT): S.FAILED,
    # Length and hashes against signed metadata; manifest against signed identity.
    (S.VERIFYING, E.OK): S.INSTALLING,
    (S.VERIFYING, E.FAIL): S.FAILED,
    (S.VERIFYING, E.REJECT): S.FAILED,
    # Unpack into the inactive slot; the active slot keeps serving.
    (S.INSTALLING, E.OK): S.SELF_TEST,
    (S.INSTALLING, E.FAIL): S.FAILED,
    (S.INSTALLING, E.REJECT): S.FAILED,
    # Load in its runtime, run the bundle's vectors, check the latency budget.
    (S.SELF_TEST, E.OK): S.ACTIVATING,
    (S.SELF_TEST, E.FAIL): S.FAILED,
    # Shadow/split deployments stop here: the candidate serves beside the active model.
    (S.SELF_TEST, E.HOLD): S.CANDIDATE,
    # Flip the slot pointer and hot-swap the served model.
    (S.ACTIVATING, E.OK): S.HEALTH_CHECK,
    (S.ACTIVATING, E.FAIL): S.ROLLING_BACK,
    # Live error rate and latency over the health window.
    (S.HEALTH_CHECK, E.OK): S.COMMITTED,
    (S.HEALTH_CHECK, E.FAIL): S.ROLLING_BACK,
    # Flip back to the previous slot; needs no network.
    (S.ROLLING_BACK, E.OK): S.ROLLED_BACK,
    (S.ROLLING_BACK, E.FAIL): S.FAILED,
}

# Where to continue after a restart that found the record in each state.
RESUME: dict[State, State] = {
    S.IDLE: S.IDLE,
    S.DOWNLOADING: S.DOWNLOADING,  # verified chunks on disk are kept
    S.VERIFYING: S.VERIFYING,  # pure checks: redo
    S.INSTALLING: S.INSTALLING,  # the inactive slot is rewritten from scratch
    S.SELF_TEST: S.SELF_TEST,  # the candidate was never live: redo
    S.ACTIVATING: S.ROLLING_BACK,  # the pointer may have flipped
    S.HEALTH_CHECK: S.ROLLING_BACK,  # the candidate was live when we died
    S.ROLLING_BACK: S.ROLLING_BACK,  # idempotent
    S.COMMITTED: S.COMMITTED,
    S.CANDIDATE: S.CANDIDATE,  # the candidate is reloaded from its slot
    S.ROLLED_BACK: S.ROLLED_BACK,
    S.FAILED: S.FAILED,
}

TERMINAL = frozenset({S.IDLE, S.COMMITTED, S.CANDIDATE, S.ROLLED_BACK, S.FAILED})

# What the hub is told for each state.
OUTCOME: dict[State, str] = {
    S.IDLE: "idle",
    S.COMMITTED: "installed",
    S.CANDIDATE: "candidate",
    S.ROLLED_BACK: "rolled_back",
    S.FAILED: "failed",
}


def next_state(state: State, event: Event) -> State:
    """The successor of ``state`` on ``event``.

    Raises:
        KeyError: the pair is not in the table (a bug in a handler).
    """
    try:
        return TRANSITIONS[(state, event)]
    except KeyError:
        raise KeyError(f"no transition from {state} on {event}") from None


class DeploymentRecord(BaseModel):
    """Everything needed to continue a deployment after a crash."""

    model_config = ConfigDict(extra="ignore")
    state: State = State.IDLE
    deployment_id: str | None = None
    model: str | None = None
    target_path: str | None = None
    health_window_s: float = 5.0
    mode: str = "activate"
    ratio: float = 0.1
    from_slot: str | None = None
    to_slot: str | None = None
    target_length: int | None = None
    target_sha256: str | None = None
    target_custom: dict[str, Any] | None = None
    outcome: str = "idle"
    rejected: bool = False
    error: str | None = None
    error_kind: str | None = None
    saves: int = 0
    attempts: int = 0
    history: list[str] = Field(default_factory=list, description="States entered, in order.")
    updated: float = Field(default_factory=time.time)


class StateStore:
    """Persists the :class:`DeploymentRecord` atomically as JSON."""

    def __init__(self, path: Path):
        self.path = path

    def load(self, *, set_aside: bool = False) -> DeploymentRecord:
        """The saved record; a new idle one when there is none. An unreadable record
        loads as a failed one (see below); with ``set_aside`` (the daemon at start-up)
        the unreadable file is set aside as ``state.json.unreadable-<unix time>``
        (:func:`agent.slots.set_aside_unreadable`) for diagnosis."""
        try:
            return DeploymentRecord.model_validate_json(self.path.read_bytes())
        except FileNotFoundError:
            return DeploymentRecord()
        except (ValidationError, ValueError, OSError) as e:
            # Records are written atomically, so only outside interference (a bad disk,
            # a hand edit, a newer agent's format) leaves one unreadable. What was half
            # done is unknown, and so is the slot to roll back to: rolling back to
            # "nothing" would stop a device that was serving. The slot pointer, written
            # atomically at activation and rollback, still names the model to serve, so
            # the record becomes a failed one and the agent serves what the pointer names.
            if set_aside:
                try:
                    set_aside_unreadable(self.path)
                except OSError:
                    pass
            return DeploymentRecord(state=State.FAILED, outcome="failed", error_kind="state",
                                    error=f"state record unreadable ({str(e)[:200]}); serving what the slot "
                                          "pointer names")

    def save(self, record: DeploymentRecord) -> None:
        record.updated = time.time()
        atomic_write(self.path, record.model_dump_json().encode())
