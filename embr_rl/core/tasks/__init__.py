"""Tasks: one interface (:class:`Problem`) and loaders for arith, GSM8K, MATH500 and HumanEval."""

from embr_rl.core.tasks import arith, benchmarks  # noqa: F401  (register the loaders)
from embr_rl.core.tasks.base import Problem, load_task, register_task, task_names
from embr_rl.core.tasks.prompts import D1_SYSTEM_PROMPT, LLADA_CHAT_TEMPLATE, format_prompt

__all__ = [
    "D1_SYSTEM_PROMPT",
    "LLADA_CHAT_TEMPLATE",
    "Problem",
    "format_prompt",
    "load_task",
    "register_task",
    "task_names",
]
