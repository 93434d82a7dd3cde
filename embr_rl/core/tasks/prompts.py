"""Prompt formats: plain, the d1 reasoning/answer format, and chat templates (LLaDA's by default)."""

from __future__ import annotations

from collections.abc import Sequence

from transformers import PreTrainedTokenizerBase

from embr_rl.core.tasks.base import Problem

# The d1 protocol asks for the reasoning and the final answer in tagged sections.
D1_SYSTEM_PROMPT = (
    "Respond in the following format:\n<reasoning>\n...\n</reasoning>\n<answer>\n...\n</answer>"
)

# LLaDA-8B-Instruct's chat layout, used for tokenizers that carry no chat template.
LLADA_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "<|start_header_id|>{{ message['role'] }}<|end_header_id|>\n\n"
    "{{ message['content'] }}<|eot_id|>{% endfor %}"
    "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"
)

CODE_INSTRUCTION = (
    "Complete the following Python function. Return the whole function in a ```python block.\n\n"
)


def format_question(problem: Problem, style: str) -> str:
    """The user message for ``problem`` in ``style`` (``plain`` or ``d1``)."""
    if style == "plain":
        return problem.question
    if style == "d1":
        body = (
            CODE_INSTRUCTION + problem.question if problem.verifier == "code" else problem.question
        )
        return f"{D1_SYSTEM_PROMPT}\n\n{body}"
    raise ValueError(f"unknown prompt format {style!r}; allowed: 'plain', 'd1'")


def format_prompt(
    problem: Problem,
    style: str,
    tokenizer: PreTrainedTokenizerBase | None = None,
    chat_template: bool = False,
) -> str:
    """The full prompt text; with ``chat_template`` it is wrapped as one user turn."""
    text = format_question(problem, style)
    if not chat_template:
        return text
    if tokenizer is None:
        raise ValueError("chat_template=True needs the tokenizer")
    template = getattr(tokenizer, "chat_template", None) or LLADA_CHAT_TEMPLATE
    return tokenizer.apply_chat_template(
        [{"role": "user", "content": text}],
        chat_template=template,
        add_generation_prompt=True,
        tokenize=False,
    )


def encode_problems(
    problems: Sequence[Problem],
    tokenizer: PreTrainedTokenizerBase,
    style: str,
    chat_template: bool = False,
    max_length: int | None = None,
) -> tuple[list[str], list[list[int]]]:
    """Prompt texts and their token ids (no special tokens added) for ``problems``.

    A prompt longer than ``max_length`` raises ``ValueError`` naming the problem; prompts
    are never silently truncated.
    """
    texts, ids = [], []
    for i, p in enumerate(problems):
        text = format_prompt(p, style, tokenizer, chat_template)
        tokens = list(tokenizer(text, add_special_tokens=False)["input_ids"])
        if max_length is not None and len(tokens) > max_length:
            raise ValueError(
                f"problem {i} ({p.id}) has {len(tokens)} prompt tokens, more than "
                f"max_prompt_length={max_length}"
            )
        texts.append(text)
        ids.append(tokens)
    return texts, ids
