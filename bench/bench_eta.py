"""Evaluate progress_sse.eta against naive linear extrapolation on simulated jobs.

Each job is simulated from a known ground-truth speed curve (seeded, no sleeping)
and turned into the observations a worker would post. The estimator only sees
those observations plus earlier *finished* jobs as history; the true duration is
used solely to score it. Run: python bench/bench_eta.py [--quick] [--seed N]
"""

from __future__ import annotations

import argparse
import math
import random
import statistics
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from progress_sse.eta import (
    FinishedRun,
    StageSpec,
    estimate,
    new_state,
    observe,
)

CHECKPOINTS = (0.10, 0.25, 0.50, 0.75)
STEPS = 2000  # simulation steps per nominal duration


@dataclass(frozen=True)
class Job:
    duration: float
    total: float | None
    stages: tuple[StageSpec, ...]
    obs: tuple[tuple[float, float, str | None], ...]
    stage_durations: dict[str, float]

    def finished(self) -> FinishedRun:
        return FinishedRun(self.duration, self.total, dict(self.stage_durations))


# speed(t, f) -> true multiplier on the nominal speed at time t and fraction f
Speed = Callable[[float, float], float]


def simulate(
    rng: random.Random,
    t_nom: float,
    *,
    stages: tuple[StageSpec, ...] = (),
    shares: tuple[float, ...] = (),
    speed: Speed = lambda t, f: 1.0,
    noise: float = 0.05,
    total: float | None = None,
) -> Job:
    """Integrate the true progress curve and emit an observation every ~1% or heartbeat.

    With stages, stage k spans its declared weight of the fraction but really takes
    shares[k] of the nominal time, so declared weights are deliberately wrong.
    """
    dt = t_nom / STEPS
    heartbeat = t_nom * rng.uniform(0.01, 0.03)
    wsum = sum(s.weight for s in stages)
    bounds = [sum(s.weight for s in stages[: i + 1]) / wsum for i in range(len(stages))]
    corr = t_nom * 0.03
    rho, x = math.exp(-dt / corr), 0.0
    t = f = 0.0
    last_t, next_f = 0.0, rng.uniform(0.005, 0.015)
    obs: list[tuple[float, float, str | None]] = []
    spent: dict[str, float] = {}
    while f < 1.0:
        k = next((i for i, b in enumerate(bounds) if f < b), len(bounds) - 1)
        base = (stages[k].weight / wsum) / (shares[k] * t_nom) if stages else 1.0 / t_nom
        x = rho * x + math.sqrt(1 - rho * rho) * noise * rng.gauss(0.0, 1.0)
        df = base * speed(t, f) * math.exp(x - noise * noise / 2) * dt
        if f + df >= 1.0:  # finish exactly where the curve crosses 1
            step = dt * (1.0 - f) / df
            t, f = t + step, 1.0
        else:
            t, f = t + dt, f + df
            step = dt
        key = stages[k].key if stages else None
        if key is not None:
            spent[key] = spent.get(key, 0.0) + step
        if f < 1.0 and (f >= next_f or t - last_t >= heartbeat):
            obs.append((t, round(f, 5), key))
            last_t = t
            if f >= next_f:
                next_f = f + rng.uniform(0.005, 0.015)
        if t > 50 * t_nom:  # a stalled simulation is a bug in the scenario
            raise RuntimeError("simulation did not finish")
    return Job(t, total, stages, tuple(obs), spent)


def _stages(rng: random.Random, n: int) -> tuple[tuple[StageSpec, ...], tuple[float, ...]]:
    weights = [rng.uniform(5, 60) for _ in range(n)]
    raw = [rng.uniform(0.2, 1.0) for _ in range(n)]
    specs = tuple(StageSpec(f"s{i}", w) for i, w in enumerate(weights))
    return specs, tuple(r / sum(raw) for r in raw)


def constant(rng: random.Random, n: int) -> Iterator[list[Job]]:
    for _ in range(n):
        yield [simulate(rng, math.exp(rng.uniform(math.log(30), math.log(3600))), noise=0.05)]


def noisy(rng: random.Random, n: int) -> Iterator[list[Job]]:
    for _ in range(n):
        yield [simulate(rng, rng.uniform(60, 3600), noise=0.5)]


def stages(rng: random.Random, n: int) -> Iterator[list[Job]]:
    for _ in range(n):
        specs, shares = _stages(rng, rng.choice((3, 4)))
        yield [simulate(rng, rng.uniform(60, 3600), stages=specs, shares=shares, noise=0.1)]


def slow_start(rng: random.Random, n: int) -> Iterator[list[Job]]:
    for _ in range(n):
        t_nom = rng.uniform(60, 3600)
        warm, slow = t_nom * rng.uniform(0.1, 0.3), rng.uniform(0.15, 0.4)

        def speed(t: float, f: float, warm: float = warm, slow: float = slow) -> float:
            return slow if t < warm else 1.0

        yield [simulate(rng, t_nom, speed=speed)]


def stall(rng: random.Random, n: int) -> Iterator[list[Job]]:
    for _ in range(n):
        t_nom = rng.uniform(60, 3600)
        at, length = rng.uniform(0.15, 0.6), t_nom * rng.uniform(0.1, 0.3)
        state = {"from": -1.0}

        def speed(t: float, f: float, at: float = at, length: float = length,
                  state: dict[str, float] = state) -> float:  # fmt: skip
            if f >= at and state["from"] < 0:
                state["from"] = t
            return 0.0 if 0 <= state["from"] <= t < state["from"] + length else 1.0

        yield [simulate(rng, t_nom, speed=speed, noise=0.1)]


def sized_series(rng: random.Random, n: int) -> Iterator[list[Job]]:
    """Same-kind jobs of different sizes, run in sequence; earlier ones are history."""
    specs = (StageSpec("fetch", 30), StageSpec("process", 50), StageSpec("store", 20))
    per_series = 10
    for _ in range(max(1, n // per_series)):
        per_unit, overhead = rng.uniform(0.05, 0.5), rng.uniform(5, 60)
        series = []
        for _ in range(per_series):
            total = math.exp(rng.uniform(math.log(50), math.log(5000)))
            t_nom = (overhead + per_unit * total) * math.exp(rng.gauss(0, 0.1))
            jitter = [rng.uniform(0.8, 1.25) for _ in range(3)]
            raw = [0.15 * jitter[0], 0.70 * jitter[1], 0.15 * jitter[2]]
            shares = tuple(r / sum(raw) for r in raw)
            series.append(
                simulate(rng, t_nom, stages=specs, shares=shares, noise=0.15, total=total)
            )
        yield series


SCENARIOS: dict[str, Callable[[random.Random, int], Iterator[list[Job]]]] = {
    "constant": constant,
    "noisy": noisy,
    "stages": stages,
    "slow_start": slow_start,
    "stall": stall,
    "sized_series": sized_series,
}


@dataclass
class Scores:
    naive: dict[float, list[float]]
    ours: dict[float, list[float]]
    nones: int = 0
    jobs: int = 0

    @classmethod
    def empty(cls) -> Scores:
        return cls({c: [] for c in CHECKPOINTS}, {c: [] for c in CHECKPOINTS})

    def merge(self, other: Scores) -> None:
        for c in CHECKPOINTS:
            self.naive[c] += other.naive[c]
            self.ours[c] += other.ours[c]
        self.nones += other.nones
        self.jobs += other.jobs


def score_job(job: Job, history: list[FinishedRun], out: Scores) -> None:
    """Replay the job's observations and score both estimators at each checkpoint."""
    out.jobs += 1
    st, pending = new_state(), list(CHECKPOINTS)
    for t, f, stage in job.obs:
        st = observe(st, elapsed_s=t, fraction=f, stage=stage)
        while pending and f >= pending[0]:
            c = pending.pop(0)
            true_rem = job.duration - t
            if true_rem <= 0:
                continue
            est = estimate(
                st, elapsed_s=t, fraction=f, stage=stage,
                stages=job.stages, total=job.total, history=history,
            )  # fmt: skip
            out.naive[c].append(abs(t / f - t - true_rem) / true_rem)
            out.ours[c].append(1.0 if est is None else abs(est - true_rem) / true_rem)
            out.nones += est is None


def pct(xs: list[float]) -> str:
    return f"{100 * statistics.median(xs):6.1f}" if xs else "     -"


def row(name: str, s: Scores) -> str:
    naive = " ".join(pct(s.naive[c]) for c in CHECKPOINTS)
    ours = " ".join(pct(s.ours[c]) for c in CHECKPOINTS)
    return f"{name:<13}{s.jobs:>5} | {naive} | {ours} | {s.nones:>5}"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="fewer jobs per scenario")
    ap.add_argument("--seed", type=int, default=1)
    args = ap.parse_args(argv)
    n = 10 if args.quick else 40
    suite = Scores.empty()
    cps = "".join(f"{int(100 * c):>6}%" for c in CHECKPOINTS)
    print("Median absolute % error of remaining time at progress checkpoints")
    print(f"{'scenario':<13}{'jobs':>5} |{cps[1:]} |{cps[1:]} | Nones")
    print(f"{'':<18} | {'naive (elapsed/f - elapsed)':<27} | {'ours (progress_sse.eta)':<27} |")
    print("-" * 83)
    for i, (name, make) in enumerate(SCENARIOS.items()):
        rng, scores = random.Random(args.seed * 1000 + i), Scores.empty()
        for series in make(rng, n):
            history: list[FinishedRun] = []
            for job in series:
                score_job(job, history, scores)
                history.append(job.finished())
        print(row(name, scores))
        suite.merge(scores)
    print("-" * 83)
    print(row("ALL", suite))
    med_n = [statistics.median(suite.naive[c]) for c in CHECKPOINTS]
    med_o = [statistics.median(suite.ours[c]) for c in CHECKPOINTS]
    ratio = statistics.fmean(med_o) / statistics.fmean(med_n)
    at50 = statistics.median(suite.ours[0.5])
    samples = sum(len(v) for v in suite.ours.values())
    ok = at50 <= 0.10 and ratio <= 0.7
    print(
        f"SUMMARY ours@50%={100 * at50:.1f}% (goal <=10%), "
        f"ours/naive={ratio:.2f} (mean of the 4 suite-wide checkpoint medians; goal <=0.70), "
        f"Nones={suite.nones}/{samples} (scored as 100% error): {'PASS' if ok else 'MISS'}"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
