"""The training loop over the run's actors: data sources per mode, steps, sync, eval, checkpoints.

``embr_rl/run.py`` makes the actors and hands their handles over as a :class:`Fleet`;
this module only calls them. One loop (:func:`train`) serves every mode; what differs is
where the learner's data comes from, a :class:`DataSource` chosen once by ``algo.mode``:

- ``online`` (:class:`OnlineSource`): every rollout worker always has one batch in flight;
  its rows go straight from the worker to the buffer (the driver sees only the small
  ``AddResult``); the learner samples while workers generate, and weights are broadcast
  every ``learner.sync_every`` steps, so rows can be up to ``buffer.max_staleness``
  versions old.
- ``sync`` (:class:`SyncSource`): Algorithm 1 as written: generate ``group_size``
  completions for ``num_workers * prompts_per_batch`` prompts with the current policy,
  take ``algo.inner_iterations`` learner steps on them, broadcast, repeat (the buffer keeps
  only the newest version: ``max_staleness = 0``).
- ``offline`` (:class:`OfflineSource`): the buffer holds a dataset; no workers.

Worker faults: a rollout worker that dies is restarted by Ray (``max_restarts``); its
prompts go back to the stream, and when it answers again it rejoins the weight broadcast and
gets the current weights before its next batch.
"""

from __future__ import annotations

import signal
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import ray
from ray.exceptions import ActorDiedError, RayError

from embr_rl.checkpointing import CheckpointManager
from embr_rl.core.config import Config
from embr_rl.core.tasks import Problem
from embr_rl.core.tasks.stream import PromptStream
from embr_rl.learner_group import LearnerGroup, mean_metrics
from embr_rl.telemetry import MetricsLogger

# --------------------------------------------------------------------------- state


@dataclass
class Fleet:
    """Handles of the run's actors (made by ``embr_rl/run.py``)."""

    buffer: Any
    workers: list[Any]
    learners: LearnerGroup
    evaluator: Any | None = None


@dataclass
class RunState:
    """What the driver itself must remember across a restart (``state.json``)."""

    step: int = 0
    version: int = 0
    samples: int = 0
    batches: int = 0
    restarts: int = 0
    stream: dict[str, Any] = field(default_factory=dict)
    # Training wall time before this process started (restored from a checkpoint).
    wall_seconds: float = 0.0


ROLLOUT_TIMES = (
    "rollout/decode_s",
    "rollout/score_s",
    "rollout/behaviour_logp_s",
    "rollout/reference_s",
)


class StopFlag:
    """Set by SIGTERM/SIGINT; the loop checks it between steps, checkpoints and exits."""

    def __init__(self) -> None:
        self.signal: int | None = None
        self._previous: dict[int, Any] = {}

    def __bool__(self) -> bool:
        return self.signal is not None

    def install(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return
        for sig in (signal.SIGTERM, signal.SIGINT):
            self._previous[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum: int, frame: Any) -> None:
        if self.signal is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt  # a second Ctrl-C: stop without the checkpoint
        self.signal = signum

    def uninstall(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()


def _brief(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"[:300]


# --------------------------------------------------------------------------- weight sync


class SyncManager:
    """Keeps the learner's broadcast group equal to the live receivers and pushes versions."""

    def __init__(
        self,
        fleet: Fleet,
        cfg: Config,
        logger: MetricsLogger,
        on_failure: Callable[[Any, Exception], None] | None = None,
    ) -> None:
        self.fleet, self.cfg, self.logger = fleet, cfg, logger
        self.on_failure = on_failure
        self.members: tuple[Any, ...] = ()
        self.device = "cuda" if cfg.rollout.num_gpus_per_worker > 0 else "cpu"

    def receivers(self, workers: Sequence[Any]) -> tuple[Any, ...]:
        extra = (self.fleet.evaluator,) if self.fleet.evaluator is not None else ()
        return tuple(workers) + extra

    def broadcast(
        self, state: RunState, workers: Sequence[Any], *, bump: bool = True, age_buffer: bool = True
    ) -> dict:
        """Push the learner's weights (as a new version when ``bump``) to ``workers`` and the
        evaluator, reconnecting first when the set of receivers changed. ``age_buffer`` tells
        the buffer the new version at once (rows then age by it); otherwise the buffer learns
        it from the first rows generated with it."""
        members = self.receivers(workers)
        if not members:
            return {}
        if members != self.members:
            self.fleet.learners.connect_workers(list(members), device=self.device)
            self.members = members
        if bump:
            state.version += 1
        metrics = self.fleet.learners.broadcast(state.version)
        for receiver, exc in self.fleet.learners.failed:
            if receiver is self.fleet.evaluator:
                self.logger.say(f"the evaluator died ({_brief(exc)}); evaluation is off from now")
                self.fleet.evaluator = None
            elif self.on_failure is not None:
                self.on_failure(receiver, exc)
        if self.fleet.learners.failed:
            self.members = ()  # reconnect the live receivers at the next broadcast
        if age_buffer:
            ray.get(self.fleet.buffer.set_policy_version.remote(state.version))
        return metrics


# --------------------------------------------------------------------------- data sources


class DataSource:
    """Where the learner's rows come from; one per ``algo.mode``.

    ``age_buffer``: whether a broadcast immediately makes older rows older in the buffer's
    eyes (online). A sync round keeps its rows eligible until the next round's rows arrive,
    even when an evaluation forces a broadcast in the middle of the round.
    """

    age_buffer = True

    def __init__(self, fleet: Fleet, cfg: Config, stream: PromptStream | None) -> None:
        self.fleet, self.cfg, self.stream = fleet, cfg, stream
        self.logger: MetricsLogger | None = None
        self.sync: SyncManager | None = None
        self.state: RunState | None = None
        self.pending: dict[str, float] = {}

    def bind(self, logger: MetricsLogger, sync: SyncManager, state: RunState) -> None:
        self.logger, self.sync, self.state = logger, sync, state

    def live_workers(self) -> list[Any]:
        return []

    def before_step(self) -> None:
        """Make sure the buffer can serve the next learner step."""

    def during_step(self, refs: list[Any]) -> None:
        """Called while the learner step ``refs`` runs; returns once they are done."""
        ray.wait(refs, num_returns=len(refs))

    def after_step(self) -> bool:
        """Whether weights must be broadcast after this step (besides eval steps)."""
        assert self.state is not None
        return self.state.step % self.cfg.learner.sync_every == 0

    def drain(self) -> None:
        """Finish every batch in flight (before a checkpoint)."""

    def metrics(self) -> dict[str, float]:
        """Rollout metrics gathered since the last call."""
        out, self.pending = self.pending, {}
        return out

    def close(self) -> None:
        pass


class OfflineSource(DataSource):
    """A fixed dataset in the buffer; nothing to generate."""

    def after_step(self) -> bool:
        return False


@dataclass
class _Job:
    worker: int
    problems: list[Problem]
    metrics_ref: Any
    started: float


class _Rollouts(DataSource):
    """Shared worker bookkeeping: dispatch, results, failures and restarts."""

    RECOVERY_TIMEOUT_S = 300.0

    def __init__(self, fleet: Fleet, cfg: Config, stream: PromptStream | None) -> None:
        super().__init__(fleet, cfg, stream)
        self.alive: list[bool] = [True] * len(fleet.workers)
        self.inflight: dict[Any, _Job] = {}
        self.recovering: dict[int, tuple[Any, float]] = {}
        self._rewards: list[tuple[float, float]] = []
        self._tokens: dict[int, float] = {}

    def live_workers(self) -> list[Any]:
        return [w for w, ok in zip(self.fleet.workers, self.alive) if ok]

    def busy(self) -> set[int]:
        return {j.worker for j in self.inflight.values()}

    def dispatch(self, i: int) -> None:
        assert self.stream is not None
        problems = self.stream.take(self.cfg.rollout.prompts_per_batch)
        worker = self.fleet.workers[i]
        rows_ref, metrics_ref = worker.generate_with_metrics.options(num_returns=2).remote(problems)
        add_ref = self.fleet.buffer.add.remote(rows_ref)
        self.inflight[add_ref] = _Job(i, problems, metrics_ref, time.perf_counter())

    def collect(self, add_ref: Any) -> Any:
        """Account for one finished batch; on a worker failure start its recovery."""
        assert self.state is not None and self.logger is not None and self.stream is not None
        job = self.inflight.pop(add_ref)
        try:
            metrics = ray.get(job.metrics_ref)
        except RayError as exc:
            self.stream.give_back(job.problems)
            self._failed(job.worker, exc)
            return None
        result = ray.get(add_ref)  # a buffer failure is fatal: it holds the run's data
        self.state.samples += int(result.accepted)
        self.state.batches += 1
        n = metrics.get("rollout/samples", 0.0)
        self._rewards.append((metrics.get("rollout/reward_mean", 0.0), n))
        self._tokens[job.worker] = metrics.get("rollout/tokens_per_s", 0.0)
        for k, v in metrics.items():
            if k.startswith("rollout/reward_mean/"):
                self.pending[k] = v
        self.pending["rollout/samples"] = self.pending.get("rollout/samples", 0.0) + n
        self.pending["rollout/mixed_group_share"] = metrics.get("rollout/mixed_group_share", 0.0)
        self.pending["rollout/verifier_errors"] = self.pending.get(
            "rollout/verifier_errors", 0.0
        ) + metrics.get("rollout/verifier_errors", 0.0)
        # Worker seconds spent since the last step, summed over the batches that finished.
        for k in ROLLOUT_TIMES:
            if k in metrics:
                self.pending[k] = self.pending.get(k, 0.0) + metrics[k]
        return result

    def receiver_failed(self, worker: Any, exc: BaseException) -> None:
        """A worker that died while receiving weights (its batch fails on its own later)."""
        for i, w in enumerate(self.fleet.workers):
            if w is worker:
                self._failed(i, exc)

    def _failed(self, i: int, exc: BaseException) -> None:
        assert self.state is not None and self.logger is not None
        if i in self.recovering:
            return
        self.alive[i] = False
        if self.sync is not None:
            self.sync.members = ()  # the next broadcast reconnects the live receivers
        self.logger.say(
            f"rollout worker {i} failed ({_brief(exc)}); its prompts go back to the stream and "
            f"Ray restarts it (rollout.max_restarts={self.cfg.rollout.max_restarts})"
        )
        self.logger.event(self.state.step, "worker_failed", worker=i, error=_brief(exc))
        self.recovering[i] = (self.fleet.workers[i].ping.remote(), time.monotonic())

    def check_recovering(self) -> None:
        """Bring back restarted workers: rejoin the broadcast, current weights, then work."""
        assert self.state is not None and self.logger is not None and self.sync is not None
        for i, (ref, since) in list(self.recovering.items()):
            ready, _ = ray.wait([ref], timeout=0)
            if not ready:
                if time.monotonic() - since > self.RECOVERY_TIMEOUT_S:
                    self._give_up(i, f"no answer in {self.RECOVERY_TIMEOUT_S:.0f}s")
                continue
            try:
                info = ray.get(ref)
            except RayError as exc:
                # Dead for good once Ray's restart budget is spent; otherwise still restarting.
                if isinstance(exc, ActorDiedError) and time.monotonic() - since > 30:
                    self._give_up(i, _brief(exc))
                else:
                    time.sleep(0.5)
                    self.recovering[i] = (self.fleet.workers[i].ping.remote(), since)
                continue
            del self.recovering[i]
            self.alive[i] = True
            self.state.restarts += 1
            self.logger.say(f"rollout worker {i} restarted (pid {info['pid']}); re-syncing weights")
            self.sync.members = ()  # the new process has not joined the broadcast yet
            self.sync.broadcast(self.state, self.live_workers(), bump=False)
            self.logger.say(
                f"rollout worker {i} re-synced to policy version {self.state.version}; back at work"
            )
            self.logger.event(
                self.state.step,
                "worker_restarted",
                worker=i,
                pid=info["pid"],
                version=self.state.version,
            )
            self.on_recovered(i)

    def _give_up(self, i: int, why: str) -> None:
        assert self.logger is not None
        del self.recovering[i]
        self.logger.say(f"rollout worker {i} is gone for good ({why}); going on without it")
        if not any(self.alive) and not self.recovering:
            raise RuntimeError(
                "every rollout worker is dead and Ray's restart budget is spent "
                "(rollout.max_restarts); the last checkpoint holds the run"
            )

    def on_recovered(self, i: int) -> None:
        pass

    def metrics(self) -> dict[str, float]:
        out = super().metrics()
        if self._rewards:
            total = sum(n for _, n in self._rewards) or 1.0
            out["rollout/reward_mean"] = sum(r * n for r, n in self._rewards) / total
            self._rewards = []
        if self._tokens:
            out["rollout/tokens_per_s"] = sum(self._tokens.values())
            for i, v in self._tokens.items():
                out[f"rollout/tokens_per_s/{i}"] = v
        assert self.state is not None
        out["rollout/samples_total"] = float(self.state.samples)
        out["rollout/live_workers"] = float(sum(self.alive))
        return out


class OnlineSource(_Rollouts):
    """Workers generate continuously; back-pressure pauses them when the learner lags."""

    def __init__(self, fleet: Fleet, cfg: Config, stream: PromptStream | None) -> None:
        super().__init__(fleet, cfg, stream)
        self.paused: set[int] = set()
        self.draining = False
        self._last_poll = 0.0
        lc = cfg.learner
        self.min_size = cfg.buffer.min_size or lc.batch_size

    def start(self) -> None:
        for i in range(len(self.fleet.workers)):
            if self.alive[i]:
                self.dispatch(i)

    def on_recovered(self, i: int) -> None:
        if not self.draining:
            self.dispatch(i)

    def pump(self, timeout: float, extra: Sequence[Any] = ()) -> None:
        """Wait up to ``timeout`` for a batch (or ``extra``) and handle whatever finished."""
        waiting = list(self.inflight) + list(extra)
        if waiting:
            ready, _ = ray.wait(waiting, num_returns=1, timeout=timeout)
        else:
            ready = []
            time.sleep(min(timeout, 0.2))
        for ref in ready:
            if ref in self.inflight:
                job_worker = self.inflight[ref].worker
                result = self.collect(ref)
                if result is None or self.draining:
                    continue
                if result.should_wait:
                    self.paused.add(job_worker)
                else:
                    self.dispatch(job_worker)
        self.check_recovering()
        now = time.monotonic()
        if self.paused and not self.draining and now - self._last_poll > 0.2:
            self._last_poll = now
            if not ray.get(self.fleet.buffer.should_wait.remote()):
                for i in sorted(self.paused):
                    if self.alive[i]:
                        self.dispatch(i)
                self.paused.clear()

    def before_step(self) -> None:
        if not self.inflight and not self.paused and not self.recovering:
            self.draining = False
            self.start()
        size = ray.get(self.fleet.buffer.eligible_size.remote())
        while size < self.min_size:
            # The learner is starved (rows went stale or were never made): back-pressure
            # must not hold the producers now.
            for i in sorted(self.paused):
                if self.alive[i]:
                    self.dispatch(i)
            self.paused.clear()
            self.pump(1.0)
            size = ray.get(self.fleet.buffer.eligible_size.remote())

    def during_step(self, refs: list[Any]) -> None:
        pending = list(refs)
        while pending:
            self.pump(0.5, extra=pending)
            _, pending = ray.wait(pending, num_returns=len(pending), timeout=0)

    def drain(self) -> None:
        self.draining = True
        while self.inflight:
            self.pump(1.0)
        self.paused.clear()

    def close(self) -> None:
        self.drain()


class SyncSource(_Rollouts):
    """Algorithm 1: a fresh batch per ``algo.inner_iterations`` learner steps."""

    age_buffer = False

    def before_step(self) -> None:
        assert self.state is not None
        if self.state.step % self.cfg.algo.inner_iterations:
            return
        for i in range(len(self.fleet.workers)):
            if self.alive[i]:
                self.dispatch(i)
        retry: list[list[Problem]] = []
        while self.inflight or self.recovering or retry:
            if not self.inflight:
                time.sleep(0.2)  # only restarts to wait for
            if self.inflight:
                ready, _ = ray.wait(list(self.inflight), num_returns=1, timeout=1.0)
                for ref in ready:
                    job = self.inflight[ref]
                    if self.collect(ref) is None:
                        retry.append(job.problems)
            self.check_recovering()
            idle = [i for i in range(len(self.alive)) if self.alive[i] and i not in self.busy()]
            while retry and idle:
                retry.pop()  # the prompts are back in the stream; take them again
                self.dispatch(idle.pop())
            if not self.inflight and not self.recovering and retry and not any(self.alive):
                raise RuntimeError("no rollout worker is left to generate the batch")
            if not self.inflight and not retry:
                break

    def after_step(self) -> bool:
        assert self.state is not None
        return self.state.step % self.cfg.algo.inner_iterations == 0


SOURCES: dict[str, Callable[[Fleet, Config, PromptStream | None], DataSource]] = {
    "online": OnlineSource,
    "sync": SyncSource,
    "offline": OfflineSource,
}


# --------------------------------------------------------------------------- evaluation


class EvalRunner:
    """At most one evaluation in flight; results are logged at the step they were asked for."""

    def __init__(self, fleet: Fleet, logger: MetricsLogger) -> None:
        self.fleet, self.logger = fleet, logger
        self.inflight: tuple[int, Any] | None = None
        self.results: list[tuple[int, dict[str, Any]]] = []

    def start(self, step: int, *, final: bool = False) -> None:
        if self.fleet.evaluator is None:
            return
        self.wait()
        self.inflight = (step, self.fleet.evaluator.evaluate.remote(step, final=final))

    def poll(self) -> None:
        if self.inflight is None:
            return
        ready, _ = ray.wait([self.inflight[1]], timeout=0)
        if ready:
            self._finish()

    def wait(self) -> None:
        if self.inflight is not None:
            self._finish()

    def _finish(self) -> None:
        assert self.inflight is not None
        step, ref = self.inflight
        self.inflight = None
        try:
            result = ray.get(ref)
        except RayError as exc:
            self.logger.say(f"evaluation at step {step} failed: {_brief(exc)}")
            return
        samples = result.pop("samples", [])
        self.results.append((step, result))
        self.logger.log(step, result)
        groups = ", ".join(
            f"{k.split('/', 2)[2]}: {v:.3f}" for k, v in result.items() if k.count("/") == 2
        )
        self.logger.say(
            f"eval at step {step} (policy version {result['eval/policy_version']:.0f}): "
            f"accuracy {result['eval/accuracy']:.3f} on {result['eval/num']:.0f} problems"
            + (f" ({groups})" if groups else "")
            + f" in {result['eval/seconds']:.1f}s"
        )
        for s in samples:
            self.logger.say(
                f"  sample {s['id']}: {s['prompt']!r} -> {s['completion']!r} "
                f"(gold {s['answer']}, reward {s['reward']:g})"
            )


# --------------------------------------------------------------------------- the loop


def save_checkpoint(
    fleet: Fleet,
    source: DataSource,
    state: RunState,
    ckpt: CheckpointManager,
    logger: MetricsLogger,
    started: float,
    why: str,
) -> Path:
    """Learner state, buffer copy, then ``state.json`` (the checkpoint is complete from then)."""
    t0 = time.perf_counter()
    source.drain()
    path = ckpt.path_for(state.step)
    path.mkdir(parents=True, exist_ok=True)
    fleet.learners.save(str(path / "learner"))
    rows = ray.get(fleet.buffer.size.remote())
    ray.get(fleet.buffer.save_to.remote(str(path / "buffer.parquet")))
    if source.stream is not None:
        state.stream = source.stream.state()
    record = asdict(state) | {"wall_seconds": state.wall_seconds + time.perf_counter() - started}
    ckpt.write_state(path, record)
    ckpt.prune()
    logger.event(state.step, "checkpoint", path=str(path), why=why, buffer_rows=rows)
    logger.say(
        f"checkpoint at step {state.step} ({why}): {path} "
        f"[{rows} buffer rows, {time.perf_counter() - t0:.1f}s]"
    )
    return path


def restore(
    fleet: Fleet, path: Path, stream: PromptStream | None, logger: MetricsLogger
) -> RunState:
    """Load a checkpoint into the learner group and buffer; returns the driver state."""
    raw = CheckpointManager.read_state(path)
    known = {f for f in RunState.__dataclass_fields__}
    state = RunState(**{k: v for k, v in raw.items() if k in known})
    step = fleet.learners.load(str(path / "learner"))
    if step != state.step:
        raise RuntimeError(
            f"checkpoint {path}: learner state is at step {step} but state.json says {state.step}"
        )
    rows = ray.get(fleet.buffer.restore.remote(str(path / "buffer.parquet")))
    ray.get(fleet.buffer.set_policy_version.remote(state.version))
    if stream is not None and state.stream:
        stream.load_state(state.stream)
    logger.say(
        f"resumed from {path}: step {state.step}, policy version {state.version}, "
        f"{rows} buffer rows, prompt position {state.stream.get('position', 0)}"
    )
    logger.event(state.step, "resumed", path=str(path), buffer_rows=rows)
    return state


class StepClock:
    """Where the driver's wall time goes, per learner step: ``time/data_wait_s`` (the learner
    idles until the buffer can serve a step), ``time/learner_s`` (the step itself, its buffer
    draw included; the ranks split it into ``time/learner_draw_s`` and
    ``time/learner_compute_s``, forward, backward and optimiser), ``time/broadcast_s``
    (weights to the receivers), ``time/step_s`` (all of it), and ``time/learner_busy``
    (learner seconds over wall seconds since the first step).
    Rollout decoding and scoring run beside the learner: ``rollout/decode_s``,
    ``rollout/score_s`` (and ``rollout/behaviour_logp_s``, ``rollout/reference_s`` when on)
    are the worker seconds of the batches that finished since the last step, summed over
    workers; evaluation reports ``eval/seconds``."""

    def __init__(self) -> None:
        self.t0: float | None = None
        self.last = 0.0
        self.parts: dict[str, float] = {}
        self.busy = 0.0

    def start(self) -> None:
        now = time.perf_counter()
        if self.t0 is None:
            self.t0 = now
        self.last, self.parts = now, {}

    def mark(self, part: str) -> None:
        """The time since the previous mark belongs to ``part``."""
        now = time.perf_counter()
        self.parts[part] = self.parts.get(part, 0.0) + now - self.last
        self.last = now

    def metrics(self) -> dict[str, float]:
        assert self.t0 is not None
        out = {f"time/{k}_s": v for k, v in self.parts.items()}
        out["time/step_s"] = sum(self.parts.values())
        self.busy += self.parts.get("learner", 0.0)
        wall = time.perf_counter() - self.t0
        out["time/learner_busy"] = self.busy / wall if wall > 0 else 0.0
        return out


def train(
    cfg: Config,
    fleet: Fleet,
    source: DataSource,
    logger: MetricsLogger,
    *,
    state: RunState,
    ckpt: CheckpointManager,
    stop: StopFlag,
) -> RunState:
    """Learner steps until ``learner.total_steps`` (or a stop signal); see the module docstring."""
    sync = SyncManager(fleet, cfg, logger, on_failure=getattr(source, "receiver_failed", None))
    source.bind(logger, sync, state)
    evals = EvalRunner(fleet, logger)
    started = time.perf_counter()
    every_eval, every_ckpt = cfg.eval.every, cfg.checkpoint.every
    total = cfg.learner.total_steps

    # Every receiver starts from the learner's weights (the base model, or a checkpoint's).
    sync.broadcast(state, source.live_workers(), bump=False)
    if cfg.eval.at_start and state.step == 0:
        evals.start(0)
        evals.wait()

    synced_at = state.step
    clock = StepClock()
    while state.step < total and not stop:
        clock.start()
        source.before_step()
        clock.mark("data_wait")
        refs = fleet.learners.train_step_async(fleet.buffer, state.version)
        source.during_step(refs)
        try:
            metrics = mean_metrics(ray.get(refs))
        except RayError as exc:
            raise RuntimeError(f"learner step {state.step + 1} failed: {_brief(exc)}") from exc
        clock.mark("learner")
        state.step += 1
        eval_due = every_eval > 0 and state.step % every_eval == 0 and state.step < total
        if source.after_step() or eval_due:
            metrics.update(
                sync.broadcast(state, source.live_workers(), age_buffer=source.age_buffer)
            )
            synced_at = state.step
        clock.mark("broadcast")
        metrics.update(source.metrics())
        metrics.update(clock.metrics())
        if state.step % cfg.logging.log_every == 0 or state.step == total:
            metrics.update(ray.get(fleet.buffer.stats.remote()))
        metrics["learner/policy_version"] = float(state.version)
        logger.log(state.step, metrics)
        evals.poll()
        if eval_due:
            evals.start(state.step)
        if every_ckpt > 0 and state.step % every_ckpt == 0 and state.step < total:
            save_checkpoint(fleet, source, state, ckpt, logger, started, "every")

    if stop:
        name = signal.Signals(stop.signal).name if stop.signal else "stop"
        logger.say(f"{name} received at step {state.step}: saving a checkpoint before exit")
        evals.wait()
        save_checkpoint(fleet, source, state, ckpt, logger, started, name)
        return state

    source.drain()
    if isinstance(source, _Rollouts):  # batches that finished during the drain
        logger.log(state.step, {"rollout/samples_total": float(state.samples)})
    if synced_at != state.step:  # the final evaluation must see the final weights
        sync.broadcast(state, source.live_workers())
    evals.start(state.step, final=True)
    evals.wait()
    save_checkpoint(fleet, source, state, ckpt, logger, started, "final")
    return state
