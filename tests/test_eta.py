"""Tests for the remaining-time estimator (pure; no server needed)."""

from __future__ import annotations

import json
import math
from collections.abc import Sequence

from hypothesis import given, settings
from hypothesis import strategies as st

from progress_sse import control_rules, jobs, worker_rules
from progress_sse.eta import (
    EtaState,
    FinishedRun,
    StageSpec,
    estimate,
    estimate_wait,
    new_state,
    observe,
)

QUICK = settings(max_examples=200, deadline=None)


def feed(obs: Sequence[tuple[float, float, str | None]], state: EtaState | None = None) -> EtaState:
    state = state or new_state()
    for t, f, stage in obs:
        state = observe(state, elapsed_s=t, fraction=f, stage=stage)
    return state


def est(
    state: EtaState,
    stages: Sequence[StageSpec] = (),
    total: float | None = None,
    history: Sequence[FinishedRun] = (),
) -> float | None:
    assert state.elapsed_s is not None
    return estimate(
        state, elapsed_s=state.elapsed_s, fraction=state.fraction, stage=state.stage,
        stages=stages, total=total, history=history,
    )  # fmt: skip


def linear(duration: float, until: float, every: float) -> list[tuple[float, float, str | None]]:
    n = int(until / every)
    return [(i * every, i * every / duration, None) for i in range(1, n + 1)]


def test_constant_rate_converges_to_truth() -> None:
    """A job progressing at a constant rate gets the true remaining time."""
    for until in (100.0, 500.0, 900.0):
        got = est(feed(linear(1000.0, until, 10.0)))
        assert got is not None
        assert math.isclose(got, 1000.0 - until, rel_tol=0.02)


def test_posting_frequency_does_not_matter() -> None:
    """Posting every second or every minute gives the same estimate for the same job."""
    fast = est(feed(linear(3600.0, 1800.0, 1.0)))
    slow = est(feed(linear(3600.0, 1800.0, 60.0)))
    assert fast is not None and slow is not None
    assert math.isclose(fast, slow, rel_tol=0.02)


def test_single_burst_does_not_swing_estimate() -> None:
    """One 5% jump in a second barely changes the remaining-time estimate."""
    state = feed(linear(1000.0, 500.0, 10.0))
    before = est(state)
    after = est(feed([(501.0, 0.55, None)], state))
    assert before is not None and after is not None
    # Only the work actually done should come off; the rate itself should hardly move.
    assert math.isclose(after, 450.0, rel_tol=0.1)


def test_same_instant_burst_does_not_swing_estimate() -> None:
    """A jump posted with an unchanged elapsed time is not read as infinite speed."""
    state = feed(linear(1000.0, 500.0, 10.0))
    burst = feed([(500.0, 0.55, None), (510.0, 0.56, None)], state)
    got = est(burst)
    assert got is not None
    assert math.isclose(got, 440.0, rel_tol=0.15)  # the 6% jump is believed only partly


def test_short_stall_does_not_swing_estimate() -> None:
    """A stall of 5% of the elapsed time moves the estimate by well under a quarter."""
    state = feed(linear(1000.0, 500.0, 10.0))
    before = est(state)
    stalled = feed([(500.0 + s, 0.5, None) for s in range(5, 30, 5)], state)
    after = est(stalled)
    assert before is not None and after is not None
    assert after > before  # it notices the stall...
    assert after < 1.25 * before  # ...without panicking


def test_follows_a_lasting_speed_change() -> None:
    """After a lasting doubling of speed the estimate reflects the new speed, unlike f/t."""
    obs = linear(1000.0, 400.0, 10.0)  # 40% in 400 s, then twice as fast
    obs += [(400.0 + i * 10.0, 0.4 + i * 0.02, None) for i in range(1, 16)]  # 70% at 550 s
    got = est(feed(obs))
    assert got is not None
    truth = 0.3 / 0.002  # 150 s at the new speed
    naive = 550.0 / 0.7 - 550.0
    assert abs(got - truth) < 0.5 * abs(naive - truth)


def test_none_without_evidence_or_history() -> None:
    """With no history, too little progress or too few observations gives None."""
    assert est(feed([(10.0, 0.005, None), (20.0, 0.009, None)])) is None  # < 1%
    assert est(feed([(10.0, 0.2, None)])) is None  # a single observation
    assert est(feed([(0.0, 0.0, None)])) is None
    fresh = estimate(
        new_state(), elapsed_s=0.0, fraction=0.0, stage=None, stages=(), total=None, history=()
    )
    assert fresh is None


def test_zero_at_completion() -> None:
    """A finished job has exactly zero remaining, with or without evidence."""
    done = estimate(
        new_state(), elapsed_s=5.0, fraction=1.0, stage=None, stages=(), total=None, history=()
    )
    assert done == 0.0
    assert est(feed([*linear(100.0, 50.0, 5.0), (60.0, 1.0, None)])) == 0.0


def test_history_dominates_early() -> None:
    """Early on, consistent history outweighs a run that briefly looks fast."""
    history = [FinishedRun(1000.0 + d, None, {}) for d in (-20.0, 0.0, 20.0, 10.0, -10.0)]
    # 3% after 10 s looks like a 333 s job, history says 1000 s.
    state = feed([(5.0, 0.015, None), (10.0, 0.03, None)])
    got = est(state, history=history)
    assert got is not None
    assert abs(got - 970.0) < 0.2 * 970.0


def test_run_takes_over_late() -> None:
    """Late in a run its own steady speed outweighs history that disagrees."""
    history = [FinishedRun(1000.0, None, {}) for _ in range(5)]
    got = est(feed(linear(500.0, 400.0, 5.0)), history=history)  # a 500 s job at 80%
    assert got is not None
    assert abs(got - 100.0) < abs(got - 200.0)  # history alone would say 200 s


def test_history_gives_estimate_before_any_progress() -> None:
    """With history, a job that has not progressed yet gets history's duration."""
    history = [FinishedRun(300.0, None, {}), FinishedRun(300.0, None, {})]
    got = estimate(
        new_state(), elapsed_s=0.0, fraction=0.0, stage=None, stages=(), total=None,
        history=history,
    )  # fmt: skip
    assert got is not None and math.isclose(got, 300.0, rel_tol=0.01)


def test_history_scales_with_total() -> None:
    """A job twice the size of past jobs is predicted to take about twice as long."""
    history = [FinishedRun(10.0 * n, float(n), {}) for n in (50, 100, 200, 400, 800)]
    got = estimate(
        new_state(), elapsed_s=0.0, fraction=0.0, stage=None, stages=(), total=1600.0,
        history=history,
    )  # fmt: skip
    assert got is not None and math.isclose(got, 16000.0, rel_tol=0.05)


def test_history_stage_shares_correct_declared_weights() -> None:
    """History showing the last stage takes most of the time beats the declared weights."""
    stages = [StageSpec("a", 50.0), StageSpec("b", 50.0)]
    # Stage a really takes 20% of the time, b 80%: a 1000 s job.
    history = [FinishedRun(1000.0, None, {"a": 200.0, "b": 800.0}) for _ in range(5)]
    obs = [(t, t / 400.0, "a") for t in range(10, 200, 10)]  # 47.5% at 190 s
    with_hist = est(feed(obs), stages=stages, history=history)
    alone = est(feed(obs), stages=stages)
    assert with_hist is not None and alone is not None
    truth = 810.0
    assert abs(with_hist - truth) < 0.1 * truth
    assert abs(with_hist - truth) < abs(alone - truth)


def test_unstarted_stage_uses_declared_weights_not_current_speed() -> None:
    """A fast first stage does not make the next stage look fast."""
    stages = [StageSpec("fast", 50.0), StageSpec("slow", 50.0)]
    obs = [(t, t / 100.0, "fast") for t in range(2, 40, 2)]  # 38% in 38 s
    got = est(feed(obs), stages=stages)
    assert got is not None
    # Stage speed says 0.12 / 0.01 = 12 s left in this stage; the later stage gets
    # the run's pace: 50% of the weight at 38 s / 38% = 50 s.
    assert math.isclose(got, 12.0 + 50.0, rel_tol=0.05)


def test_current_stage_uses_its_own_speed() -> None:
    """A slow current stage is finished at its own speed, not the run's average pace."""
    stages = [StageSpec("a", 50.0), StageSpec("b", 50.0)]
    obs: list[tuple[float, float, str | None]] = [(t, t / 100.0, "a") for t in range(2, 52, 2)]
    obs += [(50.0 + t, 0.5 + t * 0.005, "b") for t in range(2, 42, 2)]  # 70% at 90 s
    got = est(feed(obs), stages=stages)
    assert got is not None
    assert math.isclose(got, 0.3 / 0.005, rel_tol=0.1)  # average pace would say ~39 s


def test_estimate_does_not_mutate_state() -> None:
    """Estimating is pure: the state is unchanged and can be reused."""
    state = feed(linear(100.0, 50.0, 5.0))
    snapshot = state.to_dict()
    est(state)
    estimate(state, elapsed_s=80.0, fraction=0.6, stage=None, stages=(), total=None, history=())
    assert state.to_dict() == snapshot


def test_estimate_wait_scales_with_position_and_concurrency() -> None:
    """The n-th queued job waits about n - 1/2 average durations per slot."""
    history = [FinishedRun(100.0, None, {}), FinishedRun(300.0, None, {})]
    assert estimate_wait(1, history, 1.0) == 100.0
    assert estimate_wait(3, history, 2.0) == 250.0
    assert estimate_wait(1, [], 1.0) is None


# --- properties -------------------------------------------------------------

STAGE_KEYS = st.sampled_from([None, "a", "b", "c"])


@st.composite
def observations(draw: st.DrawFn) -> list[tuple[float, float, str | None]]:
    steps = draw(
        st.lists(
            st.tuples(
                st.floats(0, 1e4, allow_nan=False), st.floats(0, 0.3, allow_nan=False), STAGE_KEYS
            ),
            max_size=30,
        )
    )
    t = f = 0.0
    out = []
    for dt, df, stage in steps:
        t, f = t + dt, min(1.0, f + df)
        out.append((t, f, stage))
    return out


runs = st.builds(
    FinishedRun,
    duration_s=st.floats(-10, 1e6) | st.sampled_from([math.nan, math.inf, 0.0]),
    total=st.none() | st.floats(-5, 1e6, allow_nan=False),
    stage_durations=st.dictionaries(
        st.sampled_from(["a", "b", "c", "x"]), st.floats(0, 1e5, allow_nan=False), max_size=3
    ),
)
specs = st.lists(
    st.builds(StageSpec, key=st.sampled_from(["a", "b", "c"]), weight=st.floats(0.01, 100)),
    max_size=3,
)


@QUICK
@given(
    obs=observations(),
    stages=specs,
    total=st.none() | st.floats(1, 1e6),
    history=st.lists(runs, max_size=6),
)
def test_estimate_is_none_or_finite_nonnegative(
    obs: list[tuple[float, float, str | None]],
    stages: list[StageSpec],
    total: float | None,
    history: list[FinishedRun],
) -> None:
    """For any valid observation sequence the estimate is None or a finite number >= 0."""
    state = new_state()
    for t, f, stage in obs:
        state = observe(state, elapsed_s=t, fraction=f, stage=stage)
        got = estimate(
            state, elapsed_s=t, fraction=f, stage=stage, stages=stages, total=total,
            history=history,
        )  # fmt: skip
        assert got is None or (math.isfinite(got) and got >= 0)
        if f >= 1.0:
            assert got == 0.0


@QUICK
@given(obs=observations())
def test_state_round_trips_through_json(obs: list[tuple[float, float, str | None]]) -> None:
    """EtaState survives json.dumps/loads unchanged, and so do its estimates."""
    state = feed(obs)
    back = EtaState.from_dict(json.loads(json.dumps(state.to_dict())))
    assert back == state
    if state.elapsed_s is not None:
        assert est(back) == est(state)


@QUICK
@given(
    history=st.lists(runs, max_size=6),
    concurrency=st.floats(-1, 64) | st.just(math.nan),
    position=st.integers(-2, 500),
)
def test_estimate_wait_nonnegative_and_monotone(
    history: list[FinishedRun], concurrency: float, position: int
) -> None:
    """estimate_wait is None or >= 0, and never shrinks as the position grows."""
    here = estimate_wait(position, history, concurrency)
    behind = estimate_wait(position + 1, history, concurrency)
    if here is None:
        assert behind is None
    else:
        assert behind is not None and math.isfinite(here)
        assert 0 <= here <= behind


# --- the job's estimate around pauses and silence (jobs.py drives the estimator) ---


class Worker:
    """A 100 s job at constant speed, driven through the job rules as the store does:
    every post is followed by with_estimate, at most once a second."""

    def __init__(self, heartbeat_timeout_s: float = 30.0) -> None:
        spec = worker_rules.NewJob("j", "o", "k", "t", "default", (), None, {}, heartbeat_timeout_s,
                           "h")
        self.job, _ = worker_rules.create_job(spec, 0.0)
        self.history: list[FinishedRun] = []

    def apply(self, outcome: jobs.Outcome, now: float) -> None:
        job = outcome[0]
        self.job = worker_rules.with_estimate(job, now, self.history) if job.status == "running" \
            else job

    def work(self, start: float, until: float, at_progress: float) -> float:
        """Post a point a second from `start` to `until`; returns the progress reached."""
        t, p = start, at_progress
        while t < until:
            t, p = t + 1.0, p + 1.0
            self.apply(worker_rules.record_progress(
                self.job, worker_rules.ProgressUpdate(progress=p), t), t)
        return p

    def eta(self, now: float) -> float | None:
        value = self.job.public(now)["eta_s"]
        assert value is None or isinstance(value, float)
        return value


def paused_worker() -> Worker:
    """Half done at t=50, then paused (asked and acknowledged) at t=50."""
    w = Worker()
    w.work(0.0, 50.0, 0.0)
    w.apply(control_rules.request_pause(w.job, None, 50.0), 50.0)
    w.apply(worker_rules.record_progress(
        w.job, worker_rules.ProgressUpdate(paused=True), 50.0), 50.0)
    assert w.job.status == "paused"
    return w


def test_paused_job_remaining_time_is_frozen() -> None:
    """While paused, the remaining time stays where the pause found it."""
    w = paused_worker()
    at_pause = w.eta(50.0)
    assert at_pause is not None and math.isclose(at_pause, 50.0, rel_tol=0.1)
    assert w.eta(80.0) == at_pause
    assert w.eta(400.0) == at_pause
    assert w.job.public(80.0)["finish_estimate"] is None  # depends on when it resumes
    w.apply(worker_rules.heartbeat(w.job, None, 90.0), 90.0)
    assert w.eta(95.0) == at_pause


def test_resume_leaves_paused_time_out_of_the_rate() -> None:
    """After a long pause the estimate is the work left, not inflated by the pause."""
    w = paused_worker()
    w.apply(control_rules.request_resume(w.job, None, 350.0), 350.0)
    w.apply(worker_rules.record_progress(
        w.job, worker_rules.ProgressUpdate(progress=50.0), 350.0), 350.0)
    assert w.job.status == "running"
    right_after = w.eta(350.0)
    assert right_after is not None and math.isclose(right_after, 50.0, rel_tol=0.1)
    w.work(350.0, 393.0, 50.0)  # 93% at 393 s: 7 s of work left
    late = w.eta(393.0)
    assert late is not None and abs(late - 7.0) < 2.0, late


def test_history_leaves_paused_time_out() -> None:
    """A succeeded run that was paused teaches history its working time only."""
    w = paused_worker()
    w.apply(control_rules.request_resume(w.job, None, 350.0), 350.0)
    w.apply(worker_rules.record_progress(
        w.job, worker_rules.ProgressUpdate(progress=50.0), 350.0), 350.0)
    w.work(350.0, 399.0, 50.0)
    w.apply(worker_rules.finish(w.job, worker_rules.Finish("succeeded"), 400.0), 400.0)
    run = worker_rules.finished_run(w.job)
    # started at its first post (t=1): 49 s of work, 300 s paused, 50 s of work
    assert run is not None and math.isclose(run.duration_s, 99.0)


def test_stalled_job_has_no_estimate() -> None:
    """A stalled job's remaining time is unknown (null), not a countdown to zero."""
    w = Worker(heartbeat_timeout_s=10.0)
    w.work(0.0, 50.0, 0.0)
    assert w.eta(55.0) is not None
    w.apply(control_rules.mark_stalled(w.job, 61.0), 61.0)
    assert w.job.stalled
    assert w.eta(61.0) is None and w.eta(200.0) is None
    assert w.job.public(200.0)["finish_estimate"] is None
    w.apply(worker_rules.record_progress(
        w.job, worker_rules.ProgressUpdate(progress=51.0), 62.0), 62.0)
    assert not w.job.stalled and w.eta(62.0) is not None
