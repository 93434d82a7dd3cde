"""The main job: ``python -m embr_rl.run CONFIG.yaml [key=value ...]``.

Under ``ray job submit`` it joins that cluster (``RAY_ADDRESS``); with ``cluster.address``
it joins the named one; otherwise it starts a local cluster (dashboard on
``cluster.dashboard_host:dashboard_port``). Then:

1. base model: for ``model.path=builtin`` the built-in model is pre-trained once on the
   synthetic task and cached under ``<run_dir>/<pretrain.output_dir>``;
2. actors (this is the only module that makes Ray actors): the experience buffer,
   ``rollout.num_workers`` rollout workers (CPUs/GPUs per worker from ``rollout.*``,
   restarted up to ``rollout.max_restarts`` times), the learner group (``learner.num_ranks``
   ranks in a placement group) and the evaluator;
3. training (:mod:`embr_rl.driver`) in ``algo.mode`` online, sync or offline, evaluating
   every ``eval.every`` steps and checkpointing every ``checkpoint.every`` steps; resumes
   from the newest checkpoint with ``checkpoint.resume=auto``; SIGTERM (``ray job stop``)
   saves a checkpoint before exit;
4. outputs in ``logging.run_dir``: ``config.yaml``, ``metrics.jsonl``, ``tensorboard/``,
   ``eval/``, ``checkpoints/``, ``summary.json`` and ``reward.png``.

A bad key, type or value exits with status 2 and a message naming it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

from embr_rl.cluster import local_cluster_auth
from embr_rl.core.config import Config, ConfigError, load_config, save_config
from embr_rl.core.models.loader import ModelLoadError
from embr_rl.core.runtime import quiet_libraries
from embr_rl.pretrain import base_model_dir, is_trained, pretrain

USAGE = "usage: python -m embr_rl.run CONFIG.yaml [key=value ...]"
REPO = Path(__file__).resolve().parents[1]


def _log(msg: str) -> None:
    print(f"[run] {msg}", flush=True)


def base_model_stage(cfg: Config) -> str:
    """The path of the model to start from, pre-training the built-in one when needed."""
    if cfg.model.path != "builtin":
        return cfg.model.path
    path = base_model_dir(cfg)
    if is_trained(path):
        _log(f"base model: cached at {path}")
    else:
        _log(
            f"base model: none at {path}; pre-training it "
            f"(pretrain.max_steps={cfg.pretrain.max_steps})"
        )
        pretrain(cfg)
    return str(path.resolve())


# --------------------------------------------------------------------------- Ray


JOB_RUNS_DIR = "embr_runs"


def resolve_run_dir(run_dir: str) -> Path:
    """The absolute run directory. Under ``ray job submit --working-dir``, the job runs in
    Ray's temporary copy of that folder, deleted with the cluster: a relative
    ``logging.run_dir`` is then redirected to ``~/embr_runs/<run_dir>`` (as Ray Train keeps
    results in ``~/ray_results``), and an absolute one inside the copy is refused."""
    path = Path(run_dir).expanduser()
    cwd = Path.cwd().resolve()
    in_job_copy = bool(os.environ.get("RAY_JOB_ID")) and "runtime_resources" in cwd.parts
    if not in_job_copy:
        return path.resolve()
    if not path.is_absolute():
        target = (Path.home() / JOB_RUNS_DIR / path).resolve()
        _log(
            f"logging.run_dir={run_dir!r} is relative and this job runs in Ray's temporary "
            f"copy of its working dir ({cwd}), deleted with the cluster: writing to {target} "
            "instead (give an absolute path on shared storage to choose)"
        )
        return target
    if path.resolve().is_relative_to(cwd):
        raise ConfigError(
            f"bad value for 'logging.run_dir': {run_dir!r} lies inside the job's temporary "
            f"working directory {cwd}, which Ray deletes; allowed: a path outside it (shared "
            "storage for multi-node clusters) or a relative one (goes to ~/embr_runs)"
        )
    return path.resolve()


def preflight(cfg: Config) -> None:
    """Check what can be checked before Ray starts; raise :class:`ConfigError` naming the key.

    A local ``model.path`` must be a folder with a readable ``config.json`` (a name that is
    not on disk is taken for a Hugging Face hub id, unless it reads as a path);
    ``buffer.offline_path`` must exist in offline mode; a benchmark task needs its
    ``task.data_dir`` on disk, or the ``datasets`` package to load it from the Hub.
    """
    import importlib.util

    path = cfg.model.path
    if path != "builtin":
        p = Path(path).expanduser()
        looks_local = path.startswith(("/", ".", "~")) or path.count("/") > 1
        if p.exists():
            config = p / "config.json"
            if not p.is_dir() or not config.is_file():
                raise ConfigError(
                    f"bad value for 'model.path': {path!r}; allowed: a model folder with a "
                    "config.json (as save_pretrained writes it), a Hugging Face hub id, or 'builtin'"
                )
            try:
                parsed = json.loads(config.read_text())
            except (OSError, UnicodeDecodeError, ValueError) as exc:
                raise ConfigError(
                    f"bad value for 'model.path': {path!r}; its config.json cannot be read: {exc}"
                ) from None
            if not isinstance(parsed, dict):
                raise ConfigError(
                    f"bad value for 'model.path': {path!r}; its config.json is not a JSON object"
                )
        elif looks_local:
            raise ConfigError(
                f"bad value for 'model.path': {path!r}; no such folder (a hub id reads "
                "'org/name'; 'builtin' builds the built-in model)"
            )
    b = cfg.buffer
    if cfg.algo.mode == "offline" and b.offline_path and not Path(b.offline_path).is_file():
        raise ConfigError(f"bad value for 'buffer.offline_path': {b.offline_path!r}; no such file")
    t = cfg.task
    if t.name != "arith":
        if t.data_dir is not None and not Path(t.data_dir).is_dir():
            raise ConfigError(f"bad value for 'task.data_dir': {t.data_dir!r}; no such folder")
        if t.data_dir is None and importlib.util.find_spec("datasets") is None:
            raise ConfigError(
                f"missing 'task.data_dir' for task.name={t.name!r}: loading it from the Hugging "
                "Face Hub needs the 'datasets' package, which is not installed; allowed: a "
                "folder holding the benchmark files (e.g. ../shared/data, see its README)"
            )


def start_ray(cfg: Config) -> str:
    """Join ``cluster.address`` / ``RAY_ADDRESS``, or start a local cluster; returns which
    (``existing`` when this process already runs Ray, e.g. a notebook or a test)."""
    import ray

    if ray.is_initialized():
        _log("using the Ray instance this process already started")
        return "existing"
    address = cfg.cluster.address or os.environ.get("RAY_ADDRESS")
    if address:
        kwargs: dict[str, Any] = {}
        if address.startswith("ray://"):  # Ray Client: ship this checkout to the cluster
            kwargs["runtime_env"] = {
                "working_dir": str(REPO),
                "excludes": [".venv", "runs", ".git", "*.parquet"],
            }
        ray.init(address=address, namespace=cfg.cluster.namespace, log_to_driver=True, **kwargs)
        _log(f"joined the Ray cluster at {address} (namespace {cfg.cluster.namespace})")
        return "joined"
    auth = local_cluster_auth()
    if auth != "token":
        _log(
            f"RAY_AUTH_MODE={auth}: this local cluster accepts clients from anyone who can "
            "reach this machine's network ports (docs/deploy.md)"
        )
    c = cfg.cluster
    ray.init(
        address="local",
        num_cpus=c.num_cpus,
        num_gpus=c.num_gpus,
        namespace=c.namespace,
        include_dashboard=c.dashboard,
        dashboard_host=c.dashboard_host,
        dashboard_port=c.dashboard_port,
        log_to_driver=True,
    )
    if auth == "token":
        _private_token_file()
    ctx = ray.get_runtime_context()
    url = getattr(ray.worker.global_worker.node, "webui_url", None) if c.dashboard else None
    _log(
        f"started a local Ray cluster ({ray.cluster_resources().get('CPU', 0):g} CPUs"
        + (f", dashboard http://{url}" if url else "")
        + (" (its token: `ray get-auth-token`)" if url and auth == "token" else "")
        + f", job {ctx.get_job_id()})"
    )
    return "local"


def _private_token_file() -> None:
    """Ray writes ``~/.ray/auth_token`` readable by every local user; make it the owner's."""
    path = Path(os.environ.get("RAY_AUTH_TOKEN_PATH") or Path.home() / ".ray" / "auth_token")
    with contextlib.suppress(OSError):
        if path.stat().st_mode & 0o077:
            path.chmod(0o600)


def check_resources(cfg: Config, local: bool) -> None:
    """Fail early (local cluster) or warn (elsewhere) when the actors cannot fit."""
    import ray

    r, lc, e = cfg.rollout, cfg.learner, cfg.eval
    workers = r.num_workers if cfg.algo.mode != "offline" else 0
    need = {
        "CPU": workers * r.num_cpus_per_worker + lc.num_ranks * lc.num_cpus_per_rank + e.num_cpus,
        "GPU": workers * r.num_gpus_per_worker + lc.num_ranks * lc.num_gpus_per_rank + e.num_gpus,
    }
    have = ray.cluster_resources()
    short = {k: (v, have.get(k, 0.0)) for k, v in need.items() if v > have.get(k, 0.0) + 1e-9}
    if not short:
        return
    text = "; ".join(f"{k}: needs {v:g}, the cluster has {h:g}" for k, (v, h) in short.items())
    msg = (
        f"the actors do not fit: {text} (rollout.num_workers x rollout.num_cpus_per_worker/"
        "num_gpus_per_worker + learner.num_ranks x learner.num_cpus_per_rank/num_gpus_per_rank "
        "+ eval.num_cpus/num_gpus)"
    )
    if local:
        raise ConfigError(msg)
    _log(f"warning: {msg}; waiting for an autoscaler to add nodes")


def _threads(num_cpus: float) -> int:
    return max(1, int(num_cpus))


def make_fleet(cfg: Config, run_dir: Path) -> Any:
    """Create the buffer, rollout workers, learner group and evaluator actors."""
    import ray

    from actors.rollout import ConfiguredRolloutWorker
    from buffer.replay import ExperienceBuffer
    from embr_rl.driver import Fleet
    from embr_rl.evaluation.actor import Evaluator
    from embr_rl.learner_group import LearnerGroup

    r, mode = cfg.rollout, cfg.algo.mode
    staleness: Any = 0 if mode == "sync" else "config"
    buffer = (
        ray.remote(ExperienceBuffer)
        .options(num_cpus=0, max_restarts=0)
        .remote(
            **ExperienceBuffer.config_kwargs(
                cfg.buffer,
                seed=cfg.seed,
                snapshot_dir=cfg.buffer.snapshot_dir or str(run_dir / "buffer"),
                max_staleness=staleness,
            )
        )
    )
    worker_cls = ray.remote(ConfiguredRolloutWorker)
    workers = [
        worker_cls.options(
            num_cpus=r.num_cpus_per_worker,
            num_gpus=r.num_gpus_per_worker,
            max_restarts=r.max_restarts,
            max_task_retries=0,
            max_concurrency=2,  # weight updates arrive while a batch is being generated
        ).remote(
            cfg,
            worker_id=f"rollout-{i}",
            seed=cfg.seed * 1000 + i,
            num_threads=_threads(r.num_cpus_per_worker),
        )
        for i in range(r.num_workers if mode != "offline" else 0)
    ]
    evaluator = (
        ray.remote(Evaluator)
        .options(num_cpus=cfg.eval.num_cpus, num_gpus=cfg.eval.num_gpus, max_concurrency=2)
        .remote(cfg, cfg.model.path, num_threads=_threads(cfg.eval.num_cpus), run_dir=str(run_dir))
    )
    learners = LearnerGroup(cfg)
    pids = ray.get([w.ping.remote() for w in workers] + [evaluator.ping.remote()])
    others = ray.get(
        [a.__ray_call__.remote(_pid_of) for a in [buffer, *getattr(learners, "ranks", [])]]
    )
    (run_dir / "actors.json").write_text(
        json.dumps(
            {
                "rollout_workers": [p["pid"] for p in pids[: len(workers)]],
                "evaluator": pids[-1]["pid"],
                "buffer": others[0],
                "learner_ranks": others[1:],
            },
            indent=2,
        )
    )
    return Fleet(buffer=buffer, workers=workers, learners=learners, evaluator=evaluator)


# --------------------------------------------------------------------------- the run


def _pid_of(actor: Any) -> int:
    """The process id of the actor this runs in (through ``__ray_call__``)."""
    return os.getpid()


def _describe(cfg: Config) -> str:
    r, lc, a = cfg.rollout, cfg.learner, cfg.algo
    workers = f"{r.num_workers} rollout workers" if a.mode != "offline" else "no rollout workers"
    return (
        f"{a.name} ({a.mode}), {workers}, {lc.num_ranks} learner rank(s) ZeRO-{lc.zero_stage}, "
        f"{lc.total_steps} steps of {lc.batch_size} rows, sync every {lc.sync_every}, "
        f"eval every {cfg.eval.every}, checkpoint every {cfg.checkpoint.every}"
    )


def _load_offline(cfg: Config, fleet: Any) -> int:
    import ray

    from buffer.offline import load_offline
    from embr_rl.core.models.loader import load_tokenizer

    b = cfg.buffer
    assert b.offline_path is not None
    tok = load_tokenizer(
        cfg.model.tokenizer or cfg.model.path,
        cfg.model.trust_remote_code,
        revision=cfg.model.revision if cfg.model.tokenizer is None else None,
    )
    data = load_offline(
        b.offline_path,
        tok,
        shape=b.offline_format,
        strict=b.strict,
        task=b.offline_task,
        cache_dir=b.offline_cache_dir,
    )
    ray.get(fleet.buffer.add.remote(data.table))
    _log(
        f"offline dataset {b.offline_path}: {data.table.num_rows} rows ({data.shape}), "
        f"{data.skipped} malformed records skipped"
    )
    return data.table.num_rows


def run(cfg: Config) -> dict[str, Any]:  # noqa: C901, PLR0912, PLR0915  (the job's stages in order; each stage is a function)
    """Run the whole job; returns the summary written to ``summary.json``."""
    import ray

    from embr_rl import driver, report
    from embr_rl.checkpointing import CheckpointManager
    from embr_rl.core.tasks import load_task
    from embr_rl.core.tasks.stream import PromptStream
    from embr_rl.telemetry import build_logger, read_jsonl

    t0 = time.perf_counter()
    run_dir = resolve_run_dir(cfg.logging.run_dir)
    cfg = dataclasses.replace(cfg, logging=dataclasses.replace(cfg.logging, run_dir=str(run_dir)))
    save_config(cfg, run_dir)
    _log(f"run directory {run_dir} (resolved config in {run_dir / 'config.yaml'})")
    model_path = base_model_stage(cfg)
    cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, path=model_path))
    preflight(cfg)
    ckpt = CheckpointManager(run_dir, cfg.checkpoint.keep_last)
    resume_from = ckpt.resolve(cfg.checkpoint.resume)
    for path, why in ckpt.skipped:
        _log(f"warning: skipping checkpoint {path}: {why}")

    stream = None
    if cfg.algo.mode != "offline":
        train = load_task(cfg.task, cfg.task.train_split)
        stream = PromptStream(train, seed=cfg.seed)

    started = start_ray(cfg)
    stop = driver.StopFlag()
    stop.install()
    logger = None
    fleet = None
    try:
        check_resources(cfg, local=started == "local")
        _log(f"starting actors: {_describe(cfg)}")
        t_actors = time.perf_counter()
        fleet = make_fleet(cfg, run_dir)
        _log(f"actors ready in {time.perf_counter() - t_actors:.1f}s")
        logger = build_logger(cfg, run_dir, ray_metrics=True)
        state = driver.RunState()
        if resume_from is not None:
            state = driver.restore(fleet, resume_from, stream, logger)
        else:
            logger.event(0, "started", config=str(run_dir / "config.yaml"))
            if cfg.algo.mode == "offline":
                _load_offline(cfg, fleet)
        source = driver.SOURCES[cfg.algo.mode](fleet, cfg, stream)
        state = driver.train(cfg, fleet, source, logger, state=state, ckpt=ckpt, stop=stop)
        source.close()
    finally:
        if logger is not None:
            logger.close()
        if fleet is not None:
            try:
                fleet.learners.shutdown()
            except Exception as exc:  # the run's outputs are already on disk
                _log(f"warning: learner shutdown: {exc}")
            # Free the CPUs/GPUs now, not whenever the handles are garbage-collected.
            for actor in [*fleet.workers, fleet.evaluator, fleet.buffer]:
                if actor is not None:
                    ray.kill(actor)
        stop.uninstall()
        if started != "existing":
            ray.shutdown()

    wall = time.perf_counter() - t0
    # metrics.jsonl also holds the steps before a resume; without it, this process's records.
    jsonl = run_dir / "metrics.jsonl"
    records = read_jsonl(jsonl) if cfg.logging.jsonl and jsonl.is_file() else logger.records
    rows = report.summary_rows(records, wall)
    flips = None
    first, last = run_dir / "eval" / "step_00000000.jsonl", run_dir / "eval" / "final.jsonl"
    if first.is_file() and last.is_file():
        flips = report.paired_flips(report.read_eval_samples(first), report.read_eval_samples(last))
        rows.insert(
            len(rows) - 2,
            (
                "held-out problems fixed / broken",
                f"{flips[0]} / {flips[1]} (sign test p={report.sign_test_p(*flips):.3g})",
            ),
        )
    print("\n" + report.format_table(rows), flush=True)
    if cfg.logging.plot:
        png = report.plot_rewards(
            records, run_dir / "reward.png", title=f"{cfg.name}: {cfg.algo.name}"
        )
        _log(f"reward curve: {png}")
    acc_steps, acc = report.series(records, "eval/accuracy")
    # "After" is the evaluation of the final policy or nothing: never an earlier one.
    final_missing = not stop and (not acc_steps or acc_steps[-1] != state.step)
    latest = ckpt.latest()
    summary: dict[str, Any] = {
        "model": model_path,
        "task": cfg.task.name,
        "algo": cfg.algo.name,
        "mode": cfg.algo.mode,
        "steps": state.step,
        "policy_version": state.version,
        "samples": state.samples,
        "worker_restarts": state.restarts,
        "eval/accuracy_before": acc[0] if acc else None,
        "eval/accuracy_after": None if final_missing or not acc else acc[-1],
        "eval/final_missing": final_missing,
        "eval/steps": acc_steps,
        "eval/fixed_broken": list(flips) if flips else None,
        "stopped_by": None if not stop else stop.signal,
        "checkpoint": str(latest) if latest else None,
        "wall_seconds": round(wall, 1),
    }
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    if final_missing:
        last = f"step {acc_steps[-1]}" if acc_steps else "none"
        _log(
            f"error: the final policy (step {state.step}) was not evaluated (last evaluation: "
            f"{last}; did the evaluator die? see metrics.jsonl); summary.json reports no "
            "accuracy after training"
        )
    if stop:
        _log(f"stopped at step {state.step}; resume with checkpoint.resume=auto")
    else:
        _log(
            f"done in {wall:.0f}s: eval accuracy {summary['eval/accuracy_before']} -> "
            f"{summary['eval/accuracy_after']}; final model in {summary['checkpoint']}/learner/hf"
        )
    return summary


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        return 0 if argv else 2
    quiet_libraries()
    try:
        cfg = load_config(argv[0], argv[1:])
    except ConfigError as exc:
        print(f"config error: {exc}", file=sys.stderr)
        return 2
    try:
        summary = run(cfg)
    except ConfigError as exc:
        print(f"config error: {exc}", file=sys.stderr)
        return 2
    except (ModelLoadError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    if summary.get("stopped_by"):
        return 128 + int(summary["stopped_by"])
    return 1 if summary.get("eval/final_missing") else 0


if __name__ == "__main__":
    sys.exit(main())
