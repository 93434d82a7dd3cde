"""Process set-up every role and entry point shares: quiet library chatter."""

from __future__ import annotations

import os


def quiet_libraries() -> None:
    """Silence library chatter that hides our own progress lines (HF progress bars, DeepSpeed's
    accelerator notice on CPU-only hosts)."""
    import torch
    from transformers.utils import logging as hf_logging

    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
