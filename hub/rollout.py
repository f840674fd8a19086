"""The rollout campaign as a pure state machine: states, events, one transition table,
the resume table, wave plans and gate verdicts. No IO; :mod:`hub.campaigns` does it.

::

                 settled              soak over, gates pass
    running ───────────────▶ soaking ─────────────────────────▶ running (next wave)
      ▲  │                     │  │  gates pass, approval wanted
      │  │ gate fails          │  └──────────────────────────▶ awaiting_approval ─approve─▶ running
      │  ▼                     ▼
      │ paused ◀──────── (on_fail=pause)     last wave passes ─▶ completing ─drained─▶ completed
      │  │ resume                            (offline devices still pending) (or completed at once)
      └──┘
    completing ─a count gate fails (a late failure)─▶ paused or rolling_back, per on_fail
    (on_fail=rollback, or the rollback command) ─▶ rolling_back ─reverted─▶ rolled_back
    abort (any active state but rolling_back) ─▶ aborted

Each state's work is done by the engine on every tick while the campaign is in it;
the work ends in an :class:`Event`, never in a chosen successor: :data:`TRANSITIONS`
is the only place successors are declared. The engine saves the new state (and the
audit entry that says why) in the same transaction, *before* any side effect of the
new state, so a hub killed at any point resumes from :data:`RESUME`.

Operator commands are events too; :func:`apply_command` makes them idempotent: a
command that would move the campaign to the state it is already in is a no-op, one
that does not apply in the current state is refused.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import Any, Literal

from hub.errors import CommandRefused, InvalidCampaign

__all__ = [
    "MIN_QUALITY_SAMPLES",
    "CampaignState",
    "Event",
    "DeviceState",
    "TRANSITIONS",
    "RESUME",
    "ACTIVE",
    "TERMINAL",
    "COMMANDS",
    "MAX_SAVES",
    "next_state",
    "capped_event",
    "apply_command",
    "WaveSpec",
    "parse_waves",
    "plan_waves",
    "Gate",
    "parse_gate",
    "GateVerdict",
    "WaveMetrics",
    "evaluate_gates",
    "parse_rate",
    "parse_duration",
]

MAX_SAVES = 10_000
"""Cap on state saves per campaign: a campaign that keeps bouncing between states
(a misbehaving operator script resuming a failing gate forever) ends ``aborted``.
A transition into a terminal state is never replaced (see :func:`capped_event`):
it ends the loop by itself, and a rollback finishing must not be reported as an abort."""

MIN_QUALITY_SAMPLES = 200
"""Default least number of inferences an ``error_rate`` or ``p95_regression`` gate
judges on (``min=N`` in the gate overrides it). Fewer is "not enough data", which
passes and says so, as ``psi`` does with fewer than 50 prediction rows a side."""


class CampaignState(StrEnum):
    RUNNING = "running"  # starting the current wave's devices, waiting for their results (or held)
    SOAKING = "soaking"  # the wave has settled; gates are evaluated when the soak ends
    AWAITING_APPROVAL = "awaiting_approval"  # gates passed; an operator must approve
    PAUSED = "paused"  # nothing new is started; results still come in
    COMPLETING = "completing"  # every wave passed; offline devices still to update; count gates watched
    ROLLING_BACK = "rolling_back"  # updated devices are sent their previous version
    COMPLETED = "completed"
    ROLLED_BACK = "rolled_back"
    ABORTED = "aborted"


class Event(StrEnum):
    SETTLED = "settled"  # every started device has an outcome (or timed out); none left to start
    NEXT_WAVE = "next_wave"  # soak over, gates passed, more waves to go
    NEEDS_APPROVAL = "needs_approval"  # as NEXT_WAVE, but approve_waves is set
    LAST_WAVE_PASSED = "last_wave_passed"  # gates of the last wave passed; some devices pending
    DRAINED = "drained"  # nothing pending or in flight
    GATE_FAILED_PAUSE = "gate_failed_pause"
    GATE_FAILED_ROLLBACK = "gate_failed_rollback"
    REVERTED = "reverted"  # every updated device was sent back and answered
    PAUSE = "pause"
    RESUME = "resume"
    APPROVE = "approve"
    ABORT = "abort"
    ROLLBACK = "rollback"
    LOOPED = "looped"


class DeviceState(StrEnum):
    PENDING = "pending"  # waiting for its wave, or offline
    DEPLOYING = "deploying"  # a deployment was recorded (and published once `published`)
    UPDATED = "updated"  # the device installed the target and passed its health window
    FAILED = "failed"  # install failed or was rejected; the old model still serves
    HEALTH_FAILED = "health_failed"  # the agent rolled back on its own (health window)
    TIMED_OUT = "timed_out"  # sent, but no result within the report timeout: an install failure
    SKIPPED = "skipped"  # no compatible bundle (or already newer); nothing sent
    CANCELLED = "cancelled"  # campaign ended before this device started
    REVERTING = "reverting"  # rollback deployment of its previous version sent
    REVERTED = "reverted"  # back on its previous version
    REVERT_FAILED = "revert_failed"


S, E = CampaignState, Event

TRANSITIONS: dict[tuple[CampaignState, Event], CampaignState] = {
    (S.RUNNING, E.SETTLED): S.SOAKING,
    # Install-failure gates are checked while a wave runs, so a bad canary stops early.
    (S.RUNNING, E.GATE_FAILED_PAUSE): S.PAUSED,
    (S.RUNNING, E.GATE_FAILED_ROLLBACK): S.ROLLING_BACK,
    (S.SOAKING, E.NEXT_WAVE): S.RUNNING,
    (S.SOAKING, E.NEEDS_APPROVAL): S.AWAITING_APPROVAL,
    (S.SOAKING, E.LAST_WAVE_PASSED): S.COMPLETING,
    (S.SOAKING, E.DRAINED): S.COMPLETED,
    (S.SOAKING, E.GATE_FAILED_PAUSE): S.PAUSED,
    (S.SOAKING, E.GATE_FAILED_ROLLBACK): S.ROLLING_BACK,
    (S.AWAITING_APPROVAL, E.APPROVE): S.RUNNING,
    (S.COMPLETING, E.DRAINED): S.COMPLETED,
    # Count gates are cumulative and still watched while completing: a failure reported
    # after its wave passed (a device that was offline, or timed out) stops the campaign.
    (S.COMPLETING, E.GATE_FAILED_PAUSE): S.PAUSED,
    (S.COMPLETING, E.GATE_FAILED_ROLLBACK): S.ROLLING_BACK,
    (S.ROLLING_BACK, E.REVERTED): S.ROLLED_BACK,
    # Operator commands.
    (S.RUNNING, E.PAUSE): S.PAUSED,
    (S.SOAKING, E.PAUSE): S.PAUSED,
    (S.AWAITING_APPROVAL, E.PAUSE): S.PAUSED,
    (S.PAUSED, E.RESUME): S.RUNNING,
    (S.AWAITING_APPROVAL, E.RESUME): S.RUNNING,
    **{(s, E.ABORT): S.ABORTED for s in (S.RUNNING, S.SOAKING, S.AWAITING_APPROVAL, S.PAUSED,
                                          S.COMPLETING)},
    **{(s, E.ROLLBACK): S.ROLLING_BACK for s in (S.RUNNING, S.SOAKING, S.AWAITING_APPROVAL,
                                                 S.PAUSED, S.COMPLETING, S.COMPLETED,
                                                 S.ABORTED)},
    **{(s, E.LOOPED): S.ABORTED for s in (S.RUNNING, S.SOAKING, S.AWAITING_APPROVAL, S.PAUSED,
                                          S.COMPLETING)},
}

# Where a restarted hub continues from each saved state. Every state's work is
# idempotent (devices are started at most once: their deployment id is saved before
# it is published, and republishing the same id is a no-op on the agent), so each
# state resumes as itself; the soak timer and wave start are saved timestamps.
RESUME: dict[CampaignState, CampaignState] = {s: s for s in CampaignState}

TERMINAL = frozenset({S.COMPLETED, S.ROLLED_BACK, S.ABORTED})
ACTIVE = frozenset(set(CampaignState) - TERMINAL)

COMMANDS: dict[str, Event] = {
    "pause": E.PAUSE,
    "resume": E.RESUME,
    "approve": E.APPROVE,
    "abort": E.ABORT,
    "rollback": E.ROLLBACK,
}
# A command that finds the campaign already where it would lead is a no-op.
_ALREADY: dict[Event, frozenset[CampaignState]] = {
    E.PAUSE: frozenset({S.PAUSED}),
    E.RESUME: frozenset({S.RUNNING, S.SOAKING, S.COMPLETING}),
    E.APPROVE: frozenset({S.RUNNING, S.SOAKING, S.COMPLETING, S.COMPLETED}),
    E.ABORT: frozenset({S.ABORTED}),
    E.ROLLBACK: frozenset({S.ROLLING_BACK, S.ROLLED_BACK}),
}


def next_state(state: CampaignState, event: Event) -> CampaignState:
    """The successor of ``state`` on ``event``.

    Raises:
        KeyError: the table has no such transition (a bug in the engine).
    """
    return TRANSITIONS[(state, event)]


def capped_event(state: CampaignState, event: Event, saves: int) -> Event:
    """``event``, or :attr:`Event.LOOPED` when the campaign has been saved more than
    :data:`MAX_SAVES` times and ``event`` would keep it going.

    A move into a terminal state is left alone: it already ends the campaign, and
    turning the end of a rollback into ``aborted`` would misreport where the devices
    are. ``rolling_back`` has no move to another active state, so it is never capped.

    Raises:
        KeyError: the table has no such transition (a bug in the engine).
    """
    if saves <= MAX_SAVES or event == E.LOOPED or state not in ACTIVE:
        return event
    if next_state(state, event) in TERMINAL:
        return event
    return E.LOOPED


def apply_command(state: CampaignState, command: str) -> CampaignState | None:
    """The state an operator command leads to, or None when it is already there.

    Raises:
        CommandRefused: unknown command, or it does not apply in ``state``.
    """
    event = COMMANDS.get(command)
    if event is None:
        raise CommandRefused(f"unknown command {command!r} (one of {', '.join(COMMANDS)})")
    if state in _ALREADY[event]:
        return None
    try:
        return next_state(state, event)
    except KeyError:
        raise CommandRefused(f"cannot {command} a campaign that is {state.value}") from None


# --------------------------------------------------------------------------- waves


@dataclass(frozen=True)
class WaveSpec:
    """One cumulative wave target: a percentage of the devices or a device count."""

    percent: float | None = None
    count: int | None = None

    def cumulative(self, total: int) -> int:
        if self.count is not None:
            return min(total, self.count)
        assert self.percent is not None
        return min(total, math.ceil(total * self.percent / 100 - 1e-9))

    def as_dict(self) -> dict[str, Any]:
        return {"percent": self.percent} if self.percent is not None else {"count": self.count}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> WaveSpec:
        return cls(percent=d.get("percent"), count=d.get("count"))

    def __str__(self) -> str:
        return f"{self.percent:g}%" if self.percent is not None else f"{self.count}n"


def parse_waves(text: str | Sequence[str]) -> list[WaveSpec]:
    """``"5,25,100"`` (percent; ``%`` optional) or counts with an ``n`` suffix
    (``"1n,10n,100%"``). Targets are cumulative, strictly increasing within each
    kind, and the last wave must be 100% so that every device is covered.

    Raises:
        InvalidCampaign: a term does not parse, targets decrease, or the last is not 100%.
    """
    terms = [t.strip() for t in (text.split(",") if isinstance(text, str) else text)]
    if not terms or any(not t for t in terms):
        raise InvalidCampaign("waves: give cumulative targets like 10,50,100")
    if len(terms) > 100:
        raise InvalidCampaign("waves: at most 100 waves")
    out: list[WaveSpec] = []
    for t in terms:
        try:
            if t.endswith("n"):
                n = int(t[:-1])
                if n < 1:
                    raise ValueError
                out.append(WaveSpec(count=n))
            else:
                p = float(t.rstrip("%"))
                if not (0 < p <= 100):
                    raise ValueError
                out.append(WaveSpec(percent=p))
        except ValueError:
            raise InvalidCampaign(
                f"waves: {t!r} is neither a percentage in (0, 100] nor a count like 5n"
            ) from None
    last_p = last_c = 0.0
    for w in out:
        if w.percent is not None:
            if w.percent <= last_p:
                raise InvalidCampaign("waves: percentages must increase (they are cumulative)")
            last_p = w.percent
        else:
            assert w.count is not None
            if w.count <= last_c:
                raise InvalidCampaign("waves: counts must increase (they are cumulative)")
            last_c = w.count
    if out[-1].percent != 100:
        raise InvalidCampaign("waves: the last wave must be 100 so every device is covered")
    return out


def plan_waves(specs: Sequence[WaveSpec], total: int) -> list[int]:
    """Cumulative device counts per wave for ``total`` devices: non-decreasing, the
    first at least 1 (a canary) when there is any device, the last ``total``."""
    cum: list[int] = []
    prev = 0
    for i, w in enumerate(specs):
        n = max(prev, w.cumulative(total))
        if i == 0 and total > 0:
            n = max(n, 1)
        cum.append(n)
        prev = n
    if cum:
        cum[-1] = total
    return cum


# --------------------------------------------------------------------------- gates

Metric = Literal["install_failures", "health_failures", "error_rate", "p95_regression", "psi"]
_COUNTS = ("install_failures", "health_failures")
_METRICS: dict[str, str] = {
    "install_failures": "devices whose install failed, was rejected or timed out, in this wave and the "
                        "earlier ones, less those an operator's override accepted (N, or N% of the "
                        "devices started)",
    "health_failures": "devices the agent rolled back after its health window, in this wave and the "
                       "earlier ones, less those an operator's override accepted (N, or N%)",
    "error_rate": "inference errors / inferences on the wave's updated devices during the soak",
    "p95_regression": "median over the wave's devices of p95 latency on the new version / on the old",
    "psi": "prediction PSI of the wave's updated devices against the control cohort",
}
# Largest limit each metric takes: beyond it a gate can never fail, so it is a typo.
_MAX_LIMIT: dict[str, float] = {
    "install_failures": 10_000_000, "health_failures": 10_000_000,
    "error_rate": 1.0, "p95_regression": 1000.0, "psi": 100.0,
}
_MAX_MIN_SAMPLES = 1_000_000_000
_MAX_GATE_TEXT = 200
_SAMPLED = ("error_rate", "p95_regression")  # the gates that take min=N
_GATE = re.compile(
    r"^\s*([a-z0-9_]+)\s*<=\s*([0-9]*\.?[0-9]+)\s*(%?)(?:\s+min\s*=\s*([0-9]+))?\s*$"
)


@dataclass(frozen=True)
class Gate:
    """``metric <= limit``; counts gates take ``rate=True`` when written with ``%``;
    ``error_rate`` and ``p95_regression`` judge on at least ``min_samples`` inferences
    (None: :data:`MIN_QUALITY_SAMPLES`)."""

    metric: str
    limit: float
    rate: bool = False
    min_samples: int | None = None

    def as_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"metric": self.metric, "limit": self.limit, "rate": self.rate}
        if self.min_samples is not None:
            d["min_samples"] = self.min_samples
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Gate:
        n = d.get("min_samples")
        return cls(str(d["metric"]), float(d["limit"]), bool(d.get("rate", False)),
                   None if n is None else int(n))

    @property
    def samples_needed(self) -> int:
        return MIN_QUALITY_SAMPLES if self.min_samples is None else self.min_samples

    def __str__(self) -> str:
        # Positional, not %g: "1e+07" would not parse back.
        text = f"{self.metric}<={_plain(self.limit * 100)}%" if self.rate else f"{self.metric}<={_plain(self.limit)}"
        return text if self.min_samples is None else f"{text} min={self.min_samples}"


def _plain(x: float) -> str:
    return f"{x:.12f}".rstrip("0").rstrip(".")


def parse_gate(text: str) -> Gate:
    """``install_failures<=1``, ``install_failures<=10%``, ``health_failures<=0``,
    ``error_rate<=0.05``, ``p95_regression<=1.2``, ``psi<=0.25``; ``error_rate`` and
    ``p95_regression`` take ``min=N``, the least inferences they judge on
    (``error_rate<=0.05 min=1000``; default :data:`MIN_QUALITY_SAMPLES`).

    Raises:
        InvalidCampaign: not ``METRIC<=NUMBER [min=N]``, an unknown metric, ``%`` or
            ``min=`` on a metric that does not take it, a fractional device count, or a
            limit outside what the metric can measure (a count over 10,000,000, a rate
            over 100%, an error rate over 1, a p95 ratio over 1000, a PSI over 100);
            each message names the gate.
    """
    shown = text if len(text) <= 60 else text[:57] + "..."
    if len(text) > _MAX_GATE_TEXT:
        raise InvalidCampaign(f"gate {shown!r}: longer than {_MAX_GATE_TEXT} characters")
    m = _GATE.match(text)
    if not m:
        raise InvalidCampaign(
            f"gate {shown!r} is not METRIC<=LIMIT [min=N] (metrics: {', '.join(_METRICS)})"
        )
    metric, value, pct, min_text = m.group(1), float(m.group(2)), bool(m.group(3)), m.group(4)
    if metric not in _METRICS:
        raise InvalidCampaign(f"gate {shown!r}: unknown metric {metric!r} (one of {', '.join(_METRICS)})")
    if pct and metric not in _COUNTS:
        raise InvalidCampaign(f"gate {shown!r}: only device counts take a % limit")
    top = 100.0 if pct else _MAX_LIMIT[metric]
    if not math.isfinite(value) or value > top:
        limit = m.group(2) if len(m.group(2)) <= 20 else m.group(2)[:17] + "..."
        unit = "%" if pct else ""
        raise InvalidCampaign(
            f"gate {shown!r}: limit {limit}{unit} is out of range; {metric} takes 0 to {top:,.12g}{unit}"
        )
    min_samples: int | None = None
    if min_text is not None:
        if metric not in _SAMPLED:
            raise InvalidCampaign(f"gate {shown!r}: only {' and '.join(_SAMPLED)} take min=N")
        min_samples = int(min_text) if len(min_text) <= 10 else _MAX_MIN_SAMPLES + 1
        if not 1 <= min_samples <= _MAX_MIN_SAMPLES:
            raise InvalidCampaign(f"gate {shown!r}: min= takes 1 to {_MAX_MIN_SAMPLES} inferences")
    if pct:
        return Gate(metric, value / 100, rate=True)
    if metric in _COUNTS and not value.is_integer():
        raise InvalidCampaign(f"gate {shown!r}: a device count must be whole (or write N%)")
    return Gate(metric, value, min_samples=min_samples)


@dataclass(frozen=True)
class WaveMetrics:
    """What was measured for one wave; None means no data for that metric.

    The device counts (``started`` and the failures) are cumulative: they cover the
    wave and every earlier one, so a failure reported after its own wave was judged
    is still gated. ``accepted`` holds the failures an operator's override already
    accepted (install, health); count gates judge what is left over.
    """

    started: int
    install_failures: int  # timed-out devices included
    health_failures: int
    error_rate: float | None = None
    inferences: int = 0
    p95_regression: float | None = None
    psi: float | None = None
    psi_rows: tuple[int, int] = (0, 0)  # (control, canary) prediction rows
    p95_inferences: int = 0  # the smaller of new- and old-version inferences behind the p95 ratio
    timed_out: int = 0
    accepted: tuple[int, int] = (0, 0)

    def as_dict(self) -> dict[str, Any]:
        return {
            "started": self.started,
            "install_failures": self.install_failures,
            "health_failures": self.health_failures,
            "error_rate": self.error_rate,
            "inferences": self.inferences,
            "p95_regression": self.p95_regression,
            "psi": self.psi,
            "psi_rows": list(self.psi_rows),
            "p95_inferences": self.p95_inferences,
            "timed_out": self.timed_out,
            "accepted": list(self.accepted),
        }


@dataclass(frozen=True)
class GateVerdict:
    gate: Gate
    passed: bool
    value: float | None
    note: str

    def as_dict(self) -> dict[str, Any]:
        return {"gate": str(self.gate), "passed": self.passed, "value": self.value, "note": self.note}


def _count_note(g: Gate, m: WaveMetrics, n: int, accepted: int) -> str:
    note = f"{n} of {m.started} devices so far"
    if g.metric == "install_failures" and m.timed_out:
        note += f", {m.timed_out} timed out"
    if accepted:
        note += f", {accepted} accepted by an override"
    return note


def evaluate_gates(gates: Sequence[Gate], m: WaveMetrics) -> list[GateVerdict]:
    """Each gate against the wave's metrics. Pure.

    Count gates judge the failures so far less those an override accepted (a rate:
    over the devices started so far). A quality metric without data, or measured on
    fewer inferences than the gate's ``min_samples`` (``error_rate``,
    ``p95_regression``) or on fewer than 50 prediction rows a side (``psi``), passes,
    and the verdict says so ("no data", "not enough data"): a quiet canary must not
    block a rollout forever; pair these gates with a soak long enough to see traffic.
    """
    out: list[GateVerdict] = []
    for g in gates:
        value: float | None
        if g.metric in _COUNTS:
            install = g.metric == "install_failures"
            n = m.install_failures if install else m.health_failures
            accepted = min(n, m.accepted[0] if install else m.accepted[1])
            left = n - accepted
            value = (left / m.started if m.started else 0.0) if g.rate else float(left)
            note = _count_note(g, m, n, accepted)
        elif g.metric in _SAMPLED:
            if g.metric == "error_rate":
                value, sample, note = m.error_rate, m.inferences, f"{m.inferences} inferences"
            else:
                value, sample = m.p95_regression, m.p95_inferences
                note = f"new/old p95, median over devices, {sample} inferences"
            if value is not None and sample < g.samples_needed:
                out.append(GateVerdict(g, True, None, f"not enough data: {sample} inferences, fewer than "
                                                      f"{g.samples_needed} (measured {value:.4g})"))
                continue
        else:
            value = m.psi
            note = f"control {m.psi_rows[0]} rows, canary {m.psi_rows[1]} rows"
        if value is None:
            out.append(GateVerdict(g, True, None, f"no data ({note})"))
        else:
            out.append(GateVerdict(g, value <= g.limit + 1e-12, value, note))
    return out


# --------------------------------------------------------------------------- options


def parse_rate(text: str) -> int:
    """``"20/min"`` or ``"20"`` devices started per minute.

    Raises:
        InvalidCampaign: not a positive whole number per minute.
    """
    t = text.strip().removesuffix("/min").removesuffix("/m")
    try:
        n = int(t)
    except ValueError:
        raise InvalidCampaign(f"rate {text!r}: write N/min") from None
    if n < 1 or n > 100_000:
        raise InvalidCampaign(f"rate {text!r}: between 1 and 100000 per minute")
    return n


def parse_duration(text: str) -> float:
    """``"30s"``, ``"5m"``, ``"1h"``, ``"0"`` or a number of seconds.

    Raises:
        InvalidCampaign: not a non-negative duration.
    """
    t = text.strip()
    scale = {"s": 1, "m": 60, "h": 3600}.get(t[-1:], None) if t else None
    try:
        v = float(t[:-1]) * scale if scale else float(t)
    except ValueError:
        raise InvalidCampaign(f"duration {text!r}: write e.g. 30s, 5m or 1h") from None
    if v < 0 or v > 30 * 86400:
        raise InvalidCampaign(f"duration {text!r}: between 0 and 30 days")
    return v
