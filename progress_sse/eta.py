"""Remaining-time estimates for running and queued jobs.

Everything here is pure: time is passed in and state is an immutable value that
round-trips through JSON, so any process can persist it and resume estimating.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any

# Rate memory as a share of how long we have watched: a short stall or burst only
# moves the rate a little, while a lasting change takes over within ~1/3 of the run.
TAU_SHARE = 0.3
BURST_CAP = 3.0  # see Segment.advance
MIN_FRACTION = 0.01  # below this, extrapolating the run alone is guesswork
MIN_PROGRESS_OBS = 2
RUN_SIGMA = 0.25  # rough relative error of the run's own estimate at fraction 1/2
PRIOR_SIGMA = 0.3  # assumed spread of durations before history shows its own
MIN_SIGMA = 0.05
SIZE_BANDWIDTH = 1.0  # log-units: runs e times larger/smaller count ~0.6 as much
MAX_HISTORY = 200
MAX_SEGMENTS = 32


@dataclass(frozen=True)
class StageSpec:
    key: str
    weight: float


@dataclass(frozen=True)
class FinishedRun:
    """A finished job of the same kind, as history."""

    duration_s: float
    total: float | None
    stage_durations: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class Segment:
    """Progress seen while in one stage (or the whole run), with a time-decayed rate.

    The rate is decayed progress over decayed time rather than an average of
    per-sample rates, so it does not depend on how often the worker posts.
    """

    key: str | None
    t0: float
    f0: float
    t: float
    f: float
    sum_df: float = 0.0
    sum_dt: float = 0.0
    n: int = 0  # observations that advanced progress

    def advance(self, t: float, f: float) -> Segment:
        dt, df = t - self.t, max(f - self.f, 0.0)
        if dt <= 0:  # progress posted at the same instant joins the next interval
            return self
        rate = self.rate()
        if rate is not None:
            # The fraction keeps a burst, but the speed only believes a few times the
            # usual rate of it; "usual" includes the long-run average so that the
            # recovery after a stall is not mistaken for a burst.
            usual = max(rate, (self.f - self.f0) / (self.t - self.t0))
            df = min(df, BURST_CAP * usual * dt)
        tau = TAU_SHARE * (t - self.t0)
        decay = math.exp(-dt / tau) if tau > 0 else 0.0
        return replace(
            self, t=t, f=f, n=self.n + (df > 0),
            sum_df=self.sum_df * decay + df, sum_dt=self.sum_dt * decay + dt,
        )  # fmt: skip

    def rate(self) -> float | None:
        if self.n < MIN_PROGRESS_OBS or self.sum_dt <= 0 or self.sum_df <= 0:
            return None
        return self.sum_df / self.sum_dt

    def to_dict(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in self.__dataclass_fields__}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Segment:
        key = d.get("key")
        nums = {k: float(d[k]) for k in ("t0", "f0", "t", "f", "sum_df", "sum_dt")}
        return cls(key=None if key is None else str(key), n=int(d["n"]), **nums)


@dataclass(frozen=True)
class EtaState:
    """Per-job estimator state carried between observations; must round-trip through JSON."""

    elapsed_s: float | None = None  # time of the latest observation
    fraction: float = 0.0
    stage: str | None = None
    overall: Segment = Segment(None, 0.0, 0.0, 0.0, 0.0)
    segments: tuple[Segment, ...] = ()  # one per stage key seen

    def segment(self, key: str | None) -> Segment | None:
        return next((s for s in self.segments if s.key == key), None)

    def to_dict(self) -> dict[str, Any]:
        return {
            "elapsed_s": self.elapsed_s,
            "fraction": self.fraction,
            "stage": self.stage,
            "overall": self.overall.to_dict(),
            "segments": [s.to_dict() for s in self.segments],
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> EtaState:
        elapsed, stage = d.get("elapsed_s"), d.get("stage")
        return cls(
            elapsed_s=None if elapsed is None else float(elapsed),
            fraction=float(d.get("fraction", 0.0)),
            stage=None if stage is None else str(stage),
            overall=Segment.from_dict(d["overall"]) if "overall" in d else EtaState.overall,
            segments=tuple(Segment.from_dict(s) for s in d.get("segments", ())),
        )


def new_state() -> EtaState:
    return EtaState()


def observe(state: EtaState, *, elapsed_s: float, fraction: float, stage: str | None) -> EtaState:
    """Fold one progress observation in.

    Time going backwards or progress going down is clamped rather than rejected,
    because workers retry and clocks jitter; non-finite input is ignored.
    """
    if not (math.isfinite(elapsed_s) and math.isfinite(fraction)):
        return state
    t = max(elapsed_s, state.elapsed_s or 0.0, 0.0)
    f = min(max(fraction, state.fraction, 0.0), 1.0)
    seg = state.segment(stage)
    if state.elapsed_s is None:  # the job has been in its first stage since t=0
        seg = Segment(stage, 0.0, 0.0, 0.0, 0.0).advance(t, f)
    elif seg is None:
        seg = Segment(stage, t, f, t, f)
    elif stage == state.stage:
        seg = seg.advance(t, f)
    else:  # re-entering an earlier stage: resume without counting the time away
        seg = replace(seg, t=t, f=f)
    others = tuple(s for s in state.segments if s.key != stage)
    return EtaState(
        elapsed_s=t, fraction=f, stage=stage,
        overall=state.overall.advance(t, f),
        segments=(*others, seg)[-MAX_SEGMENTS:],
    )  # fmt: skip


@dataclass(frozen=True)
class _Plan:
    """Declared stages as contiguous slices of the overall fraction."""

    keys: tuple[str, ...]
    weights: tuple[float, ...]  # normalised to sum to 1

    @classmethod
    def of(cls, stages: Sequence[StageSpec]) -> _Plan:
        valid = [s for s in stages if math.isfinite(s.weight) and s.weight > 0]
        total = sum(s.weight for s in valid)
        return cls(tuple(s.key for s in valid), tuple(s.weight / total for s in valid))

    def index(self, stage: str | None, f: float) -> int:
        if stage in self.keys:
            return self.keys.index(stage)
        lo = 0.0
        for i, w in enumerate(self.weights):
            if f < lo + w:
                return i
            lo += w
        return len(self.weights) - 1

    def position(self, shares: Sequence[float], k: int, f: float) -> float:
        """Where `f` sits on the time axis when stage i takes `shares[i]` of the run."""
        lo = sum(self.weights[:k])
        inside = min(max((f - lo) / self.weights[k], 0.0), 1.0)
        return sum(shares[:k]) + shares[k] * inside


@dataclass(frozen=True)
class _Prior:
    duration: float  # expected total duration of this job
    sigma: float  # relative (log) uncertainty of `duration`
    shares: tuple[float, ...] | None  # observed time share per plan stage


def _valid(x: float | None) -> bool:
    return x is not None and math.isfinite(x) and x > 0


def _prior(history: Sequence[FinishedRun], total: float | None, plan: _Plan) -> _Prior | None:
    """Predict this job's duration from earlier runs, preferring ones of similar size."""
    runs = [r for r in history[-MAX_HISTORY:] if _valid(r.duration_s)]
    if not runs:
        return None
    sized = [r for r in runs if _valid(r.total)] if _valid(total) else []
    ys = [math.log(r.duration_s) for r in (sized or runs)]
    if sized:
        assert total is not None
        x0 = math.log(total)
        xs = [math.log(r.total or 1.0) - x0 for r in sized]
        ws = [math.exp(-0.5 * (x / SIZE_BANDWIDTH) ** 2) + 1e-3 for x in xs]
        slope = _slope(xs, ys, ws)
        ys = [y - slope * x for x, y in zip(xs, ys, strict=True)]  # as if of this job's size
    else:
        ws = [1.0] * len(ys)
    sw = sum(ws)
    mean = sum(w * y for w, y in zip(ws, ys, strict=True)) / sw
    var = sum(w * (y - mean) ** 2 for w, y in zip(ws, ys, strict=True)) / sw
    n_eff = sw * sw / sum(w * w for w in ws)
    # Shrink toward an assumed spread so one or two lucky-similar runs do not look certain.
    sigma = math.sqrt((var * n_eff + PRIOR_SIGMA**2) / (n_eff + 1) * (1 + 1 / n_eff))
    return _Prior(math.exp(min(mean, 700.0)), max(sigma, MIN_SIGMA), _shares(runs, plan))


def _slope(xs: list[float], ys: list[float], ws: list[float]) -> float:
    """Weighted log-log slope; 1 (duration proportional to size) unless sizes really vary."""
    sw = sum(ws)
    mx = sum(w * x for w, x in zip(ws, xs, strict=True)) / sw
    my = sum(w * y for w, y in zip(ws, ys, strict=True)) / sw
    sxx = sum(w * (x - mx) ** 2 for w, x in zip(ws, xs, strict=True))
    if len(xs) < 3 or sxx / sw < 0.05:
        return 1.0
    sxy = sum(w * (x - mx) * (y - my) for w, x, y in zip(ws, xs, ys, strict=True))
    return min(max(sxy / sxx, 0.3), 1.5)


def _shares(runs: Sequence[FinishedRun], plan: _Plan) -> tuple[float, ...] | None:
    """Median time share of each declared stage; declared weights are often wrong."""
    per_run = []
    for r in runs:
        ds = [r.stage_durations.get(k, 0.0) for k in plan.keys]
        ds = [d if math.isfinite(d) and d > 0 else 0.0 for d in ds]
        if sum(ds) > 0:
            per_run.append([d / sum(ds) for d in ds])
    if not per_run:
        return None
    med = [max(sorted(col)[len(col) // 2], 1e-3) for col in zip(*per_run, strict=True)]
    return tuple(m / sum(med) for m in med)


def _own_remaining(st: EtaState, plan: _Plan, shares: Sequence[float]) -> float | None:
    """Remaining time from this run alone: current stage at its own recent speed,
    later stages at the run's overall pace spread by their expected time shares."""
    t, f = st.elapsed_s or 0.0, st.fraction
    if st.overall.n < MIN_PROGRESS_OBS or f < MIN_FRACTION or t <= 0:
        return None
    if not plan.keys:
        rate = st.overall.rate()
        return (1 - f) / rate if rate else t / f * (1 - f)
    k = plan.index(st.stage, f)
    pos = plan.position(shares, k, f)
    if pos <= 0:
        return None
    pace = t / pos  # implied total duration
    left = max(sum(plan.weights[: k + 1]) - f, 0.0)
    seg = st.segment(plan.keys[k]) if st.stage == plan.keys[k] else None
    rate = seg.rate() if seg else None
    current = left / rate if rate else pace * shares[k] * left / plan.weights[k]
    return current + pace * sum(shares[k + 1 :])


def estimate(
    state: EtaState,
    *,
    elapsed_s: float,
    fraction: float,
    stage: str | None,
    stages: Sequence[StageSpec],
    total: float | None,
    history: Sequence[FinishedRun],
) -> float | None:
    """Seconds remaining, or None when unknown. Never negative. 0.0 when fraction >= 1.

    History predicts the whole duration; the run's own speed predicts the rest of
    it. They are blended by their rough uncertainties, so history leads early
    and the run takes over as evidence accumulates.
    """
    if not (math.isfinite(elapsed_s) and math.isfinite(fraction)):
        return None
    st = observe(state, elapsed_s=elapsed_s, fraction=fraction, stage=stage)
    if st.fraction >= 1.0:
        return 0.0
    plan = _Plan.of(stages)
    prior = _prior(history, total, plan)
    shares = prior.shares if prior and prior.shares else plan.weights
    own = _own_remaining(st, plan, shares)
    if prior is None:
        out = own
    else:
        pos = st.fraction
        if plan.keys:
            pos = plan.position(shares, plan.index(st.stage, pos), pos)
        hist = prior.duration * (1 - pos)
        if own is None:
            out = hist
        else:
            f = st.fraction
            run_var = RUN_SIGMA**2 * (1 - f) / f
            w = prior.sigma**2 / (prior.sigma**2 + run_var)
            out = w * own + (1 - w) * hist
    if out is None or not math.isfinite(out):
        return None
    return max(out, 0.0)


def estimate_wait(
    position: int, history: Sequence[FinishedRun], concurrency: float
) -> float | None:
    """Expected wait (s) for a queued job at 1-based `position` in its queue.

    Slots free up at about `concurrency / mean duration` per second and the job
    ahead is on average half done, hence (position - 1/2) mean durations per slot.
    """
    durations = [r.duration_s for r in history[-MAX_HISTORY:] if _valid(r.duration_s)]
    if not durations:
        return None
    if position <= 0:
        return 0.0
    slots = concurrency if math.isfinite(concurrency) and concurrency >= 1 else 1.0
    return (position - 0.5) * (sum(durations) / len(durations)) / slots
