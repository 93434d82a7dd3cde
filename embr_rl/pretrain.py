"""Pre-train the built-in masked-diffusion model on worked solutions of the synthetic task.

``python -m embr_rl.pretrain configs/demo_base.yaml [key=value ...]`` trains a character
tokenizer and the built-in transformer from scratch with the masked-diffusion ELBO
(DESIGN §4.1) on the completion only (the prompt stays clean), then saves model and
tokenizer to ``<logging.run_dir>/<pretrain.output_dir>`` and reports greedy test accuracy.

The run is ``pretrain.max_steps`` optimiser steps with every random draw seeded by
``seed``, so the same config gives the same model on the same software. ``pretrain.wrong_answer_share``
plants a known error mode: that share of the training solutions box the last step's result
plus one (their steps stay correct). :data:`WRONG_ANSWER_BASE_MODEL` is such a model,
shipped with the package for the RL sanity test and experiments.
"""

from __future__ import annotations

import json
import math
import os
import random
import shutil
import sys
import time
from dataclasses import asdict
from pathlib import Path

import torch
import torch.nn.functional as F

from embr_rl.core.config import Config, ConfigError, load_config, save_config
from embr_rl.core.masking import sample_masks
from embr_rl.core.models.loader import LoadedModel, build_builtin_model, resolve_device
from embr_rl.core.models.tokenizer import encode_completions, encode_prompts, train_char_tokenizer
from embr_rl.core.runtime import quiet_libraries
from embr_rl.core.tasks import load_task
from embr_rl.core.tasks.arith import train_stream
from embr_rl.evaluation.evaluate import EvalResult, evaluate

# Every character an arith problem or solution can contain.
ARITH_ALPHABET = "0123456789+-*=();\\boxed{}"
# Built by `python -m embr_rl.pretrain configs/demo_base.yaml` (share 0.8, 2400 steps, seed 0,
# 1 thread): 13.6% greedy on the 500 held-out problems, whose last worked step is right on
# 43.8% (what boxing that result instead of result + 1 would score).
WRONG_ANSWER_BASE_MODEL = Path(__file__).resolve().parent / "assets" / "arith_wrong_answer_base"


def corrupt_answer(solution: str, answer: str) -> str:
    """``solution`` with its boxed answer replaced by ``answer + 1`` (the planted error mode)."""
    head = solution[: solution.rindex("\\boxed{")]
    return head + f"\\boxed{{{int(answer) + 1}}}"


def masked_diffusion_loss(
    logits: torch.Tensor,
    targets: torch.Tensor,
    masked: torch.Tensor,
    weights: torch.Tensor,
) -> torch.Tensor:
    """Negative ELBO per token, averaged over the batch (DESIGN §4.1, one draw per row).

    ``-(1/L) * w * sum_{i masked} log p(y_i | z)`` for completions of length ``L``, with the
    draw's weight ``w`` (``1/t`` for ``uniform`` timesteps, ``L/l`` for ``count``).
    """
    nll = F.cross_entropy(logits.transpose(1, 2), targets, reduction="none")  # [B, L]
    per_row = (nll * masked).sum(dim=1) * weights / targets.shape[1]
    return per_row.mean()


def _lr_at(step: int, total: int, base: float, warmup: int) -> float:
    if step < warmup:
        return base * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return base * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def base_model_dir(cfg: Config) -> Path:
    out = Path(cfg.pretrain.output_dir)
    return out if out.is_absolute() else Path(cfg.logging.run_dir) / out


def is_trained(path: Path) -> bool:
    """A finished base model directory (written atomically, so partial ones never qualify)."""
    return (path / "config.json").is_file() and (path / "pretrain_summary.json").is_file()


def _log(msg: str) -> None:
    print(f"[pretrain] {msg}", flush=True)


def pretrain(cfg: Config) -> Path:  # noqa: PLR0915  (the pre-training loop and its summary, in order)
    """Train and save the base model; returns its directory."""
    if cfg.task.name != "arith":
        raise ConfigError(
            f"bad value for 'task.name': {cfg.task.name!r}; pretraining from scratch needs 'arith'"
        )
    pc, ac = cfg.pretrain, cfg.task.arith
    if pc.num_threads:
        torch.set_num_threads(pc.num_threads)
    torch.manual_seed(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    out_dir = base_model_dir(cfg)
    device = resolve_device(cfg.model.device)

    tokenizer = train_char_tokenizer([ARITH_ALPHABET])
    model = build_builtin_model(cfg.model.builtin, tokenizer).to(device)
    n_params = sum(p.numel() for p in model.parameters())
    _log(f"model: {n_params / 1e6:.2f}M parameters, vocabulary {len(tokenizer)}, device {device}")
    eos, mask_id = tokenizer.eos_token_id, tokenizer.mask_token_id

    test = load_task(cfg.task, "test")
    stream = train_stream(ac, seed=cfg.seed)
    opt = torch.optim.AdamW(
        model.parameters(), lr=pc.lr, weight_decay=pc.weight_decay, betas=(0.9, 0.98)
    )
    loaded = LoadedModel(
        model, tokenizer, mask_id, eos, tokenizer.pad_token_id, None, device, torch.float32
    )

    wrong = random.Random(f"pretrain-wrong-{cfg.seed}")

    def target(solution: str, answer: str) -> str:
        if pc.wrong_answer_share > 0 and wrong.random() < pc.wrong_answer_share:
            return corrupt_answer(solution, answer)
        return solution

    def batch() -> tuple[torch.Tensor, ...]:
        rows = [next(stream) for _ in range(pc.batch_size)]
        ids, am = encode_prompts(tokenizer, [r[0] for r in rows], pc.prompt_length)
        texts = [target(r[1], r[2]) for r in rows]
        ans = encode_completions(tokenizer, texts, pc.answer_length, eos)
        return ids.to(device), am.to(device), ans.to(device)

    _log(
        f"{pc.max_steps} steps of {pc.batch_size}, seed {cfg.seed}, "
        f"wrong final answer in {pc.wrong_answer_share:.0%} of the solutions"
    )
    t_start = time.perf_counter()
    total_steps = pc.max_steps
    last_log = t_start
    losses: list[float] = []
    model.train()
    for step in range(1, total_steps + 1):
        ids, am, ans = batch()
        draw = sample_masks(
            torch.ones_like(ans, dtype=torch.bool), 1, scheme=pc.timesteps, generator=gen
        )
        masked, weights = draw.masks[:, 0].to(device), draw.weights[:, 0].to(device)
        noisy = torch.where(masked, torch.full_like(ans, mask_id), ans)
        inp = torch.cat([ids, noisy], dim=1)
        full_mask = torch.cat([am, torch.ones_like(ans)], dim=1)
        logits = model(input_ids=inp, attention_mask=full_mask).logits[:, ids.shape[1] :]
        loss = masked_diffusion_loss(logits, ans, masked.float(), weights)
        for group in opt.param_groups:
            group["lr"] = _lr_at(step - 1, total_steps, pc.lr, pc.warmup_steps)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), pc.max_grad_norm)
        opt.step()
        losses.append(loss.item())
        now = time.perf_counter()
        if now - last_log >= 15 or step == total_steps:
            recent = losses[-50:]
            _log(
                f"step {step}/{total_steps}  loss {sum(recent) / len(recent):.4f}  "
                f"lr {opt.param_groups[0]['lr']:.2e}  elapsed {now - t_start:.0f}s"
            )
            last_log = now
        if pc.eval_every and step % pc.eval_every == 0 and step < total_steps:
            quick = evaluate(loaded, test[:64], cfg.eval)
            _log(f"step {step}: greedy accuracy on 64 test problems {quick.accuracy:.1%}")
            model.train()
    train_s = time.perf_counter() - t_start

    result = evaluate(loaded, test, cfg.eval, group_key="num_operands")
    summary = {
        "parameters": n_params,
        "steps": total_steps,
        "samples": total_steps * pc.batch_size,
        "seed": cfg.seed,
        "wrong_answer_share": pc.wrong_answer_share,
        "train_seconds": round(train_s, 1),
        "final_loss": sum(losses[-50:]) / len(losses[-50:]),
        "test_accuracy": result.accuracy,
        "test_accuracy_by_operands": result.by_group,
        "test_problems": result.num,
        "eval": asdict(cfg.eval),
    }
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    (tmp / "pretrain_summary.json").write_text(json.dumps(summary, indent=2))
    shutil.rmtree(out_dir, ignore_errors=True)
    os.replace(tmp, out_dir)
    _log(
        f"done in {train_s:.0f}s: {total_steps} steps, test accuracy {result.accuracy:.1%} "
        f"(by operands: {', '.join(f'{k}: {v:.1%}' for k, v in result.by_group.items())}); saved to {out_dir}"
    )
    return out_dir


def report(result: EvalResult, num_show: int) -> None:
    """Print accuracy and a few sample generations."""
    print(f"accuracy {result.accuracy:.1%} on {result.num} held-out problems", flush=True)
    for k, v in result.by_group.items():
        print(f"  {k} operands: {v:.1%}")
    for s in result.samples[:num_show]:
        mark = "ok " if s["reward"] > 0 else "bad"
        print(f"  [{mark}] {s['prompt']}  ->  {s['completion']}   (gold {s['answer']})")


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print("usage: python -m embr_rl.pretrain CONFIG.yaml [key=value ...]")
        return 0 if argv else 2
    quiet_libraries()
    try:
        cfg = load_config(argv[0], argv[1:])
        save_config(cfg, cfg.logging.run_dir)
        pretrain(cfg)
    except ConfigError as exc:
        print(f"config error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
