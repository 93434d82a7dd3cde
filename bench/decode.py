"""Decoding speed and accuracy: exact LLaDA decoding vs each fast mode, side by side.

    .venv/bin/python bench/decode.py [--model DIR] [--problems 128] [--batch 64] [--repeats 3]

Part 1 decodes held-out arithmetic problems with the demo base model (default: the demo's
``runs/demo/base_model``, else ``runs/decode_base/base_model``) at temperature 0, at the
demo's length (32, block 8, 16 steps) and at 128/256 (block 32, steps = length / 2, the d1
protocol). Part 2 times the native LLaDA implementation with random weights in LLaDA-8B's shape
scaled down to fit a CPU (head dim 128, FFN 3x hidden, vocabulary scaled down too). Modes run round-robin and the
median wall time of ``--repeats`` runs is kept; every ratio is against exact mode in the
same run. "agree" is the share of completions identical to exact mode's. ``+cont`` decodes
all of a length's problems through ``--batch`` slots with continuous batching
(``actors.decoding.generate`` with ``slots``) instead of in chunks of ``--batch``.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from collections.abc import Callable
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from actors.decoding import DecodeStats, generate  # noqa: E402

MODES: dict[str, dict] = {
    "exact": {},
    "thr0.9": {"threshold": 0.9},
    "prefix": {"cache": "prefix"},
    "dual": {"cache": "dual"},
    "thr0.9+prefix": {"threshold": 0.9, "cache": "prefix"},
    "thr0.9+dual": {"threshold": 0.9, "cache": "dual"},
    "thr0.9+prefix+eos": {"threshold": 0.9, "cache": "prefix", "stop_at_eos": True},
    "thr0.9+dual+eos": {"threshold": 0.9, "cache": "dual", "stop_at_eos": True},
    # Continuous batching: all problems through --batch slots (demo model only).
    "thr0.9+dual+eos+cont": {
        "threshold": 0.9,
        "cache": "dual",
        "stop_at_eos": True,
        "continuous": True,
    },
}

LONG_MODES = [
    "exact",
    "prefix",
    "dual",
    "thr0.9+prefix",
    "thr0.9+dual",
    "thr0.9+dual+eos",
    "thr0.9+dual+eos+cont",
]


def default_model() -> Path:
    for name in ("demo", "decode_base"):
        path = REPO / "runs" / name / "base_model"
        if (path / "pretrain_summary.json").is_file():
            return path
    raise SystemExit(
        "no demo base model: train one with `.venv/bin/python -m embr_rl.pretrain "
        "configs/demo_base.yaml name=decode_base pretrain.max_steps=800`, or pass --model"
    )


def settings(gen_length: int) -> tuple[int, int]:
    """(block_length, steps): the demo's 8/16 at length 32, else block 32 and length/2 steps."""
    return (8, 16) if gen_length == 32 else (32, gen_length // 2)


def run_modes(
    run: Callable[[dict], tuple[list, DecodeStats]], modes: list[str], repeats: int
) -> dict[str, dict]:
    """Run every mode ``repeats`` times round-robin; keep outputs and the median wall time."""
    walls: dict[str, list[float]] = {m: [] for m in modes}
    results: dict[str, dict] = {}
    for _ in range(repeats):
        for m in modes:
            outputs, stats = run(MODES[m])
            walls[m].append(stats.wall_s)
            results[m] = {"outputs": outputs, "stats": stats}
    for m in modes:
        results[m]["wall"] = statistics.median(walls[m])
    return results


def report(title: str, results: dict[str, dict], score: Callable[[list], float] | None) -> None:
    exact = results["exact"]
    base_acc = score(exact["outputs"]) if score else None
    print(f"\n{title}")
    head = f"{'mode':<20}{'fwd':>6}{'pos(M)':>8}{'wall s':>8}{'tok/s':>9}{'speed-up':>10}"
    head += f"{'agree':>7}" + (f"{'acc %':>7}{'Δacc':>7}" if score else "")
    print(head)
    n_tokens = exact["stats"].tokens_committed
    for m, r in results.items():
        st = r["stats"]
        agree = sum(a == b for a, b in zip(r["outputs"], exact["outputs"], strict=True))
        line = (
            f"{m:<20}{st.forward_passes:>6}{st.positions_computed / 1e6:>8.2f}{r['wall']:>8.2f}"
            f"{n_tokens / r['wall']:>9.0f}{exact['wall'] / r['wall']:>9.2f}x"
            f"{agree / len(r['outputs']):>7.2f}"
        )
        if score:
            acc = score(r["outputs"])
            line += f"{100 * acc:>7.1f}{100 * (acc - base_acc):>+7.1f}"
        print(line, flush=True)


def bench_demo(args: argparse.Namespace) -> None:
    from embr_rl.core.config import ModelConfig, TaskConfig
    from embr_rl.core.models.loader import load_model
    from embr_rl.core.models.tokenizer import decode_completions, encode_prompts
    from embr_rl.core.tasks import format_prompt, load_task
    from embr_rl.evaluation.evaluate import correctness_scorer

    path = Path(args.model) if args.model else default_model()
    loaded = load_model(ModelConfig(path=str(path), device="cpu"))
    loaded.model.eval()
    problems = load_task(TaskConfig(name="arith"), "test")[: args.problems]
    texts = [format_prompt(p, "plain") for p in problems]
    print(
        f"demo base model {path} ({sum(p.numel() for p in loaded.model.parameters()) / 1e6:.2f}M"
        f" parameters), {len(problems)} held-out arith problems, batch {args.batch}, T=0"
    )

    scorer = correctness_scorer()

    def score(outputs: list) -> float:
        return sum(scorer(c, p) for c, p in zip(outputs, problems, strict=False)) / len(outputs)

    for gen_length in args.gen_lengths:
        block, steps = settings(gen_length)
        n = len(problems) if gen_length <= 32 else min(len(problems), args.long_problems)
        width = min(args.batch, n)
        chunks = [
            encode_prompts(loaded.tokenizer, texts[i : i + width]) for i in range(0, n, width)
        ]

        def run(
            mode: dict,
            gen_length: int = gen_length,
            block: int = block,
            steps: int = steps,
            chunks: list = chunks,
            width: int = width,
            n: int = n,
        ):
            stats = DecodeStats()
            outputs: list[str] = []
            mode = dict(mode)
            parts, slots = chunks, None
            if mode.pop("continuous", False):
                parts, slots = [encode_prompts(loaded.tokenizer, texts[:n])], width
            for ids, mask in parts:
                out = generate(
                    loaded.model,
                    ids,
                    mask,
                    gen_length=gen_length,
                    block_length=block,
                    steps=steps,
                    mask_id=loaded.mask_token_id,
                    eos_id=loaded.eos_token_id,
                    stop_ids=loaded.stop_token_ids,
                    slots=slots,
                    stats=stats,
                    **mode,
                )
                outputs += decode_completions(
                    loaded.tokenizer,
                    out[:, ids.shape[1] :],
                    loaded.eos_token_id,
                    loaded.stop_token_ids,
                )
            return outputs, stats

        repeats = args.repeats if gen_length <= 32 else 1
        modes = list(MODES) if gen_length <= 32 else LONG_MODES
        results = run_modes(run, modes, repeats)
        report(
            f"gen_length {gen_length}, block {block}, steps {steps}, {n} problems in batches of "
            f"{width} (median of {repeats})",
            results,
            score,
        )


def llada_shaped(args: argparse.Namespace) -> torch.nn.Module:
    """The native LLaDA (``embr_rl.core.models.native``) with LLaDA-8B's structure scaled down:
    head dimension 128, as many key/value heads as heads, SwiGLU FFN 3x the width, RoPE
    theta 500000, untied head; random weights, the output head scaled by ``--head-scale`` so
    that some predictions are confident (flat random logits never cross a threshold)."""
    from embr_rl.core.models.native import LLaDANativeConfig, LLaDANativeModel

    heads = args.random_width // 128
    cfg = LLaDANativeConfig(
        d_model=args.random_width,
        n_heads=heads,
        n_kv_heads=heads,
        n_layers=args.random_layers,
        mlp_hidden_size=3 * args.random_width,
        vocab_size=args.random_vocab,
        embedding_size=args.random_vocab,
        block_type="llama",
        activation_type="silu",
        layer_norm_type="rms",
        rope=True,
        rope_theta=500000.0,
        weight_tying=False,
        attention_dropout=0.0,
        residual_dropout=0.0,
        embedding_dropout=0.0,
        max_sequence_length=4096,
        mask_token_id=args.random_vocab - 1,
        pad_token_id=0,
        eos_token_id=1,
    )
    torch.manual_seed(0)
    model = LLaDANativeModel(cfg).eval()
    with torch.no_grad():
        model.transformer["ff_out"].weight.mul_(args.head_scale)
    return model


def bench_random(args: argparse.Namespace) -> None:
    model = llada_shaped(args)
    mask_id = args.random_vocab - 1
    prompts = torch.randint(0, args.random_vocab - 2, (args.random_batch, 32))
    print(
        f"\nnative LLaDA of LLaDA-8B's shape scaled down: {args.random_layers} layers x "
        f"{args.random_width} ({args.random_width // 128} heads of 128, FFN "
        f"{3 * args.random_width}), vocabulary {args.random_vocab}, "
        f"{sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters, batch "
        f"{args.random_batch}, prompt 32, T=0, head scale {args.head_scale}, median of "
        f"{args.repeats}. Random weights: read this part for cost, 'agree' for how far each "
        "approximation moves the output."
    )
    modes = ["exact", "thr0.9", "prefix", "dual", "thr0.9+prefix", "thr0.9+dual"]
    for gen_length in args.random_gen_lengths:
        block, steps = settings(gen_length)

        def run(mode: dict, gen_length: int = gen_length, block: int = block, steps: int = steps):
            stats = DecodeStats()
            out = generate(
                model,
                prompts,
                gen_length=gen_length,
                block_length=block,
                steps=steps,
                mask_id=mask_id,
                stats=stats,
                **mode,
            )
            return out[:, 32:].tolist(), stats

        results = run_modes(run, modes, args.repeats)
        report(
            f"native LLaDA-shaped, gen_length {gen_length}, block {block}, steps {steps}",
            results,
            None,
        )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", help="demo base model directory")
    ap.add_argument("--problems", type=int, default=128)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--long-problems", type=int, default=32, help="problems at lengths > 32")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--gen-lengths", type=int, nargs="+", default=[32, 128, 256])
    ap.add_argument("--random-gen-lengths", type=int, nargs="+", default=[128, 256])
    ap.add_argument("--random-batch", type=int, default=8)
    ap.add_argument("--random-width", type=int, default=512, help="a multiple of 128")
    ap.add_argument("--head-scale", type=float, default=1.0)
    ap.add_argument("--random-vocab", type=int, default=4096)
    ap.add_argument("--random-layers", type=int, default=2)
    ap.add_argument("--skip-demo", action="store_true")
    ap.add_argument("--skip-random", action="store_true")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if not args.skip_demo:
        bench_demo(args)
    if not args.skip_random:
        bench_random(args)


if __name__ == "__main__":
    main()
