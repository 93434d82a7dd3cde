"""The Ray cluster a run starts for itself: who may use it (token authentication)."""

from __future__ import annotations

import os


def local_cluster_auth() -> str:
    """The ``RAY_AUTH_MODE`` a Ray cluster this process starts itself will run with: the
    user's, or ``token`` when unset (Ray 2.60 then turns token authentication on for a new
    local cluster and keeps its token in ``~/.ray/auth_token``, created when missing).

    Ray 2.60 listens on every interface whatever node address it is given, so a local
    cluster without a token takes jobs, and runs code, from anyone on the network.
    ``ray get-auth-token`` prints the token the dashboard asks for (docs/deploy.md).
    """
    return os.environ.get("RAY_AUTH_MODE", "token").lower()
