"""A small character-level tokenizer trained with ``tokenizers`` for the built-in model.

Every character is one token, which suits arithmetic (digits are never merged). The
special tokens are a pad, an end-of-sequence (also the fill of the completion window),
a mask (the diffusion ``[MASK]``) and an unknown token.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerBase, PreTrainedTokenizerFast

from embr_rl.core.masking import stop_id_set

PAD, EOS, MASK, UNK = "<|pad|>", "<|eos|>", "<|mask|>", "<|unk|>"
SPECIAL_TOKENS = [PAD, EOS, MASK, UNK]


def train_char_tokenizer(
    texts: Iterable[str], max_vocab: int | None = None
) -> PreTrainedTokenizerFast:
    """Train a character-level tokenizer on ``texts``; specials take ids 0-3 (pad, eos, mask, unk)."""
    tok = Tokenizer(models.WordLevel(unk_token=UNK))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    tok.decoder = decoders.Fuse()
    trainer = trainers.WordLevelTrainer(
        special_tokens=SPECIAL_TOKENS,
        min_frequency=1,
        vocab_size=max_vocab if max_vocab is not None else 1 << 20,
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token=PAD, eos_token=EOS, mask_token=MASK, unk_token=UNK
    )


def left_pad(
    prompts: Sequence[Sequence[int]], pad_id: int, width: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-padded ids and attention mask ``[N, width]`` (default width: the longest prompt)."""
    width = max((len(p) for p in prompts), default=0) if width is None else width
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for i, p in enumerate(prompts):
        if len(p):
            ids[i, width - len(p) :] = torch.as_tensor(list(p), dtype=torch.long)
            mask[i, width - len(p) :] = 1
    return ids, mask


def encode_prompts(
    tokenizer: PreTrainedTokenizerBase, texts: Sequence[str], max_length: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-padded prompt ids and attention mask [N, P] (P = longest, or ``max_length``).

    A prompt longer than ``max_length`` raises ``ValueError`` naming its index; prompts are
    never silently truncated.
    """
    encoded = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
    if max_length is not None:
        for i, e in enumerate(encoded):
            if len(e) > max_length:
                raise ValueError(
                    f"prompt {i} has {len(e)} tokens, more than max_length={max_length}"
                )
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    return left_pad(encoded, pad, max_length)


def encode_completions(
    tokenizer: PreTrainedTokenizerBase, texts: Sequence[str], length: int, eos_id: int
) -> torch.Tensor:
    """Completion windows [N, length]: the text's tokens, then EOS to the end of the window.

    At least one EOS must fit; a longer text raises ``ValueError`` naming its index.
    """
    out = torch.full((len(texts), length), eos_id, dtype=torch.long)
    for i, t in enumerate(texts):
        e = tokenizer(t, add_special_tokens=False)["input_ids"]
        if len(e) >= length:
            raise ValueError(
                f"completion {i} has {len(e)} tokens; the window holds {length - 1} plus EOS"
            )
        out[i, : len(e)] = torch.tensor(e, dtype=torch.long)
    return out


def decode_completions(
    tokenizer: PreTrainedTokenizerBase,
    completion_ids: torch.Tensor,
    eos_id: int | None,
    stop_ids: Sequence[int] | None = None,
) -> list[str]:
    """Completion texts, each cut at its first stop id (``eos_id`` or one of ``stop_ids``)."""
    stops = set(stop_id_set(eos_id, stop_ids))
    texts = []
    for row in completion_ids.tolist():
        cut = next((i for i, t in enumerate(row) if t in stops), len(row))
        texts.append(tokenizer.decode(row[:cut], skip_special_tokens=True))
    return texts
