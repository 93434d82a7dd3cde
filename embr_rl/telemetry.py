"""Where a run's metrics go: JSONL, TensorBoard, Ray metrics (Prometheus), a progress line.

The driver calls :meth:`MetricsLogger.log` with flat ``{"area/name": value}`` dicts; each
sink takes what it understands. Sinks are chosen once from ``logging.*`` by
:func:`build_logger`. The Ray sink is the only one importing Ray, and only when built.

Ray metric names (``ray_`` is prefixed by Ray on the metrics port):

========================================  ==============================================
``embr_reward_mean{task}``                rollout reward of the newest batch, per task
``embr_buffer_size``                      rows in the experience buffer
``embr_sample_staleness``                 mean policy versions between a learner row's
                                          sampler and the learner
``embr_rollout_tokens_per_s{worker}``     decode throughput of each rollout worker
``embr_learner_loss{component}``          ``total`` and every other ``learner/*`` scalar
``embr_weight_sync_seconds``              wall time of the last weight broadcast
``embr_eval_accuracy{task}``              accuracy of the newest evaluation
``embr_learner_step``                     learner steps done
``embr_rollout_samples_total``            samples generated (counter)
``embr_worker_restarts_total``            rollout worker restarts seen (counter)
========================================  ==============================================
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Protocol, TextIO

Metrics = Mapping[str, float]


class Sink(Protocol):
    def log(self, step: int, metrics: Metrics) -> None: ...

    def event(self, step: int, kind: str, detail: Mapping[str, Any]) -> None: ...

    def close(self) -> None: ...


def _finite(metrics: Metrics) -> dict[str, float]:
    out = {}
    for k, v in metrics.items():
        try:
            f = float(v)
        except (TypeError, ValueError):
            continue
        if math.isfinite(f):
            out[k] = f
    return out


class JsonlSink:
    """One JSON object per line in ``<run_dir>/metrics.jsonl``: ``{"step", "time", metrics...}``
    and events ``{"step", "time", "event": kind, ...}``. Appends, so a resumed run continues
    the same file."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._fh = open(self.path, "a", buffering=1)  # noqa: SIM115  (closed in close())

    def log(self, step: int, metrics: Metrics) -> None:
        self._fh.write(json.dumps({"step": step, "time": time.time(), **_finite(metrics)}) + "\n")

    def event(self, step: int, kind: str, detail: Mapping[str, Any]) -> None:
        rec = {"step": step, "time": time.time(), "event": kind, **detail}
        self._fh.write(json.dumps(rec, default=str) + "\n")

    def close(self) -> None:
        self._fh.close()


class TensorBoardSink:
    """Scalars to ``<run_dir>/tensorboard`` (``tensorboard --logdir runs``)."""

    def __init__(self, logdir: str | os.PathLike[str]) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self._writer = SummaryWriter(str(logdir))

    def log(self, step: int, metrics: Metrics) -> None:
        for k, v in _finite(metrics).items():
            self._writer.add_scalar(k, v, step)

    def event(self, step: int, kind: str, detail: Mapping[str, Any]) -> None:
        self._writer.add_text(f"events/{kind}", json.dumps(dict(detail), default=str), step)

    def close(self) -> None:
        self._writer.close()


class RayMetricsSink:
    """Gauges and counters from ``ray.util.metrics`` (see the module docstring for names)."""

    def __init__(self, task: str = "") -> None:
        from ray.util.metrics import Counter, Gauge

        self.task = task
        self.reward = Gauge("embr_reward_mean", "rollout reward of the newest batch", ("task",))
        self.buffer = Gauge("embr_buffer_size", "rows in the experience buffer")
        self.staleness = Gauge(
            "embr_sample_staleness", "mean policy versions between sampler and learner"
        )
        self.tokens = Gauge("embr_rollout_tokens_per_s", "decode tokens/s", ("worker",))
        self.loss = Gauge("embr_learner_loss", "learner loss and its components", ("component",))
        self.sync = Gauge("embr_weight_sync_seconds", "wall time of the last weight broadcast")
        self.accuracy = Gauge("embr_eval_accuracy", "accuracy of the newest evaluation", ("task",))
        self.step = Gauge("embr_learner_step", "learner steps done")
        self.samples = Counter("embr_rollout_samples_total", "samples generated")
        self.restarts = Counter("embr_worker_restarts_total", "rollout worker restarts")

    def log(self, step: int, metrics: Metrics) -> None:
        for k, v in _finite(metrics).items():
            if k.startswith("rollout/reward_mean/"):
                self.reward.set(v, {"task": k.rsplit("/", 1)[1]})
            elif k.startswith("rollout/tokens_per_s/"):
                self.tokens.set(v, {"worker": k.rsplit("/", 1)[1]})
            elif k == "rollout/samples" and v > 0:
                self.samples.inc(v)
            elif k == "buffer/size":
                self.buffer.set(v)
            elif k == "learner/staleness_mean":
                self.staleness.set(v)
            elif k == "learner/loss":
                self.loss.set(v, {"component": "total"})
            elif k == "learner/step":
                self.step.set(v)
            elif k.startswith("learner/"):
                self.loss.set(v, {"component": k.split("/", 1)[1]})
            elif k == "sync/wall_seconds":
                self.sync.set(v)
            elif k == "eval/accuracy":
                self.accuracy.set(v, {"task": self.task})

    def event(self, step: int, kind: str, detail: Mapping[str, Any]) -> None:
        if kind == "worker_restarted":
            self.restarts.inc(1)

    def close(self) -> None:
        pass


class ProgressSink:
    """A live line (step, reward, accuracy, throughput) on a terminal; plain lines otherwise.

    On a TTY the line is redrawn in place; elsewhere one line is printed every ``every``
    steps, so job logs stay readable.
    """

    def __init__(
        self, total_steps: int, *, tty: bool, every: int = 1, stream: TextIO | None = None
    ) -> None:
        self.total = total_steps
        self.tty = tty
        self.every = max(1, every)
        self.stream = stream or sys.stdout
        self.last: dict[str, float] = {}
        self.t0 = time.perf_counter()
        self.first_step: int | None = None
        self._drawn = False

    def line(self, step: int) -> str:
        m = self.last
        parts = [f"step {step}/{self.total}"]
        if "rollout/reward_mean" in m:
            parts.append(f"reward {m['rollout/reward_mean']:.3f}")
        if "eval/accuracy" in m:
            parts.append(f"acc {m['eval/accuracy']:.3f}")
        if "learner/loss" in m:
            parts.append(f"loss {m['learner/loss']:.4g}")
        if "rollout/tokens_per_s" in m:
            parts.append(f"{m['rollout/tokens_per_s']:.0f} tok/s")
        if "time/step_s" in m:
            split = "/".join(
                f"{m.get(f'time/{k}_s', 0.0):.1f}" for k in ("data_wait", "learner", "broadcast")
            )
            parts.append(
                f"step {m['time/step_s']:.1f}s (wait/learn/sync {split}, "
                f"learner busy {m.get('time/learner_busy', 0.0):.0%})"
            )
        elapsed = time.perf_counter() - self.t0
        if self.first_step is not None and step > self.first_step and elapsed > 0:
            rate = (step - self.first_step) / elapsed
            eta = (self.total - step) / rate if rate > 0 else float("inf")
            parts.append(f"{rate * 60:.1f} steps/min, eta {eta:.0f}s")
        return " | ".join(parts)

    def log(self, step: int, metrics: Metrics) -> None:
        self.last.update(_finite(metrics))
        if self.first_step is None:
            self.first_step = step
        if self.tty:
            self.stream.write("\r\x1b[2K" + self.line(step))
            self.stream.flush()
            self._drawn = True
        elif "learner/loss" in metrics and step % self.every == 0:
            self.stream.write(f"[progress] {self.line(step)}\n")
            self.stream.flush()

    def event(self, step: int, kind: str, detail: Mapping[str, Any]) -> None:
        pass

    def clear(self) -> None:
        """End the live line before other output is printed."""
        if self.tty and self._drawn:
            self.stream.write("\n")
            self.stream.flush()
            self._drawn = False

    def close(self) -> None:
        self.clear()


class MetricsLogger:
    """Fans ``log``/``event`` out to sinks and keeps every logged record (``records``, as
    metrics.jsonl would hold them) for the summary, whatever sinks are on."""

    def __init__(self, sinks: list[Any]) -> None:
        self.sinks = sinks
        self.progress = next((s for s in sinks if isinstance(s, ProgressSink)), None)
        self.records: list[dict[str, Any]] = []

    def log(self, step: int, metrics: Metrics) -> None:
        self.records.append({"step": step, "time": time.time(), **metrics})
        for s in self.sinks:
            s.log(step, metrics)

    def event(self, step: int, kind: str, **detail: Any) -> None:
        for s in self.sinks:
            s.event(step, kind, detail)

    def say(self, msg: str) -> None:
        """Print a log line without tearing the live progress line."""
        if self.progress is not None:
            self.progress.clear()
        print(f"[run] {msg}", flush=True)

    def close(self) -> None:
        for s in self.sinks:
            try:
                s.close()
            except Exception as exc:  # a broken sink must not hide the run's own result
                print(f"[run] warning: closing {type(s).__name__} failed: {exc}", flush=True)


def build_logger(cfg: Any, run_dir: str | os.PathLike[str], *, ray_metrics: bool) -> MetricsLogger:
    """Sinks from ``cfg.logging`` (``jsonl``, ``tensorboard``, ``ray_metrics``, ``progress``)."""
    lc = cfg.logging
    run_dir = Path(run_dir)
    sinks: list[Any] = []
    if lc.jsonl:
        sinks.append(JsonlSink(run_dir / "metrics.jsonl"))
    if lc.tensorboard:
        try:
            sinks.append(TensorBoardSink(run_dir / "tensorboard"))
        except ImportError as exc:
            print(f"[run] warning: TensorBoard logging off ({exc})", flush=True)
    if lc.ray_metrics and ray_metrics:
        sinks.append(RayMetricsSink(cfg.task.name))
    tty = sys.stdout.isatty()
    if lc.progress != "never":
        sinks.append(
            ProgressSink(
                cfg.learner.total_steps, tty=tty if lc.progress == "auto" else True,
                every=lc.log_every,
            )
        )  # fmt: skip
    return MetricsLogger(sinks)


def read_jsonl(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """Records of a ``metrics.jsonl`` (a torn last line from a crash is skipped)."""
    out = []
    p = Path(path)
    if not p.is_file():
        return out
    for line in p.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return out
