"""Efficiency against the hardware: achieved FLOP/s of the learner and of decoding as a share
of this machine's measured matmul FLOP/s, for the LLaDA-shaped native model, in one run.

    .venv/bin/python bench/flops.py [--width 512] [--layers 2] [--batch 8] [--gen 256] [--threads 1]

The ceiling is measured first, in the same process and thread count: the best of
``--repeats`` fp32 matmuls of the model's own largest GEMM shape (``[B*T, d] x [d, 3d]``, the
SwiGLU up-projection) and of a square 2048 matmul. Then:

- learner step: masked-diffusion cross-entropy over ``B x (32 + gen)`` tokens, forward,
  backward and an AdamW step; counted as ``6 x N x tokens`` (N: parameters outside the input
  embedding, whose lookup is no matmul). Attention's ``T^2`` terms are left out of the count,
  so the share slightly under-states the work done.
- decoding: :func:`actors.decoding.generate` in exact mode and with threshold 0.9 + the dual
  cache; counted as ``2 x N x positions computed`` (``DecodeStats.positions_computed``).

"share" is achieved FLOP/s over the matmul ceiling. Random weights (the cost does not depend
on them; the threshold mode's forward count does, as in bench/decode.py).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from actors.decoding import DecodeStats, generate  # noqa: E402
from bench.decode import llada_shaped  # noqa: E402

PROMPT = 32


def timings(fn: Callable[[], object], repeats: int) -> list[float]:
    """Seconds of ``repeats`` calls of ``fn`` after one warm-up call."""
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return times


def best_seconds(fn: Callable[[], object], repeats: int) -> float:
    """The fastest call (the ceiling is a best case)."""
    return min(timings(fn, repeats))


def median_seconds(fn: Callable[[], object], repeats: int) -> float:
    """The median call (what a workload achieves)."""
    return statistics.median(timings(fn, repeats))


def matmul_flops(m: int, k: int, n: int, repeats: int) -> float:
    """FLOP/s of ``[m, k] @ [k, n]`` in fp32: ``2 m k n`` per product."""
    a, b = torch.randn(m, k), torch.randn(k, n)
    return 2.0 * m * k * n / best_seconds(lambda: a @ b, repeats)


def matmul_params(model: torch.nn.Module) -> int:
    """Parameters that take part in matmuls: all but the input embedding table."""
    emb = model.get_input_embeddings()
    skip = {id(p) for p in emb.parameters()} if emb is not None else set()
    return sum(p.numel() for p in model.parameters() if id(p) not in skip)


def learner_step(
    model: torch.nn.Module, batch: int, length: int, mask_id: int, vocab: int
) -> Callable[[], None]:
    """One masked-diffusion training step over ``batch x length`` tokens (about half masked)."""
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5)
    gen = torch.Generator().manual_seed(0)
    clean = torch.randint(2, vocab - 2, (batch, length), generator=gen)
    masked = torch.rand(batch, length, generator=gen) < 0.5
    masked[:, :PROMPT] = False
    noisy = torch.where(masked, torch.full_like(clean, mask_id), clean)

    def step() -> None:
        logits = model(input_ids=noisy).logits
        loss = F.cross_entropy(logits[masked], clean[masked])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return step


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--width", type=int, default=512, help="a multiple of 128 (head dim 128)")
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--vocab", type=int, default=4096)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--gen", type=int, default=256)
    ap.add_argument("--block", type=int, default=32)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--head-scale", type=float, default=4.0)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    model_args = argparse.Namespace(
        random_width=args.width,
        random_layers=args.layers,
        random_vocab=args.vocab,
        head_scale=args.head_scale,
    )
    model = llada_shaped(model_args)
    n = matmul_params(model)
    length = PROMPT + args.gen
    tokens = args.batch * length
    mask_id = args.vocab - 1

    peak_gemm = matmul_flops(tokens, args.width, 3 * args.width, args.repeats)
    peak_square = matmul_flops(2048, 2048, 2048, args.repeats)
    peak = max(peak_gemm, peak_square)
    print(
        f"native LLaDA-shaped: {args.layers} layers x {args.width}, vocabulary {args.vocab}, "
        f"{n / 1e6:.2f}M matmul parameters; batch {args.batch} x ({PROMPT} + {args.gen}) "
        f"tokens; {args.threads} thread(s); fp32"
    )
    print(
        f"matmul ceiling: [{tokens}x{args.width}]x[{args.width}x{3 * args.width}] "
        f"{peak_gemm / 1e9:.1f} GFLOP/s, 2048^3 {peak_square / 1e9:.1f} GFLOP/s "
        f"(best of {args.repeats}); shares below are against {peak / 1e9:.1f}"
    )
    rows: list[tuple[str, float, float]] = []

    model.train()
    step_s = median_seconds(
        learner_step(model, args.batch, length, mask_id, args.vocab), args.repeats
    )
    rows.append(("learner step (fwd + bwd + AdamW)", 6.0 * n * tokens, step_s))
    model.eval()

    prompts = torch.randint(2, args.vocab - 2, (args.batch, PROMPT))
    for name, mode in (
        ("decode exact", {}),
        ("decode thr0.9+dual", {"threshold": 0.9, "cache": "dual"}),
    ):
        stats = DecodeStats()

        def run(mode: dict = mode, stats: DecodeStats = stats) -> None:
            with torch.no_grad():
                generate(
                    model,
                    prompts,
                    gen_length=args.gen,
                    block_length=args.block,
                    steps=args.gen // 2,
                    mask_id=mask_id,
                    stats=stats,
                    **mode,
                )

        run()  # warm-up, and the positions one call computes
        positions = stats.positions_computed
        forwards = stats.forward_passes
        secs = median_seconds(run, args.repeats)
        rows.append((f"{name} ({forwards} forwards)", 2.0 * n * positions, secs))

    print()
    print("| workload | GFLOP per call | seconds (median) | achieved GFLOP/s | share of ceiling |")
    print("|---|---:|---:|---:|---:|")
    for name, flop, secs in rows:
        rate = flop / secs
        print(f"| {name} | {flop / 1e9:.2f} | {secs:.3f} | {rate / 1e9:.1f} | {rate / peak:.0%} |")


if __name__ == "__main__":
    main()
