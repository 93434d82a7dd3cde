"""Shared command-line plumbing for the ``python -m embr_rl.*`` entry points."""

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


def local_cluster_auth() -> str:
    """The ``RAY_AUTH_MODE`` a Ray cluster this process starts itself will run with: the
    user's, or ``token`` when unset (Ray 2.60 then turns token authentication on for a new
    local cluster and keeps its token in ``~/.ray/auth_token``, created when missing).

    Ray 2.60 listens on every interface whatever node address it is given, so a local
    cluster without a token takes jobs, and runs code, from anyone on the network.
    ``ray get-auth-token`` prints the token the dashboard asks for (docs/deploy.md).
    """
    return os.environ.get("RAY_AUTH_MODE", "token").lower()
