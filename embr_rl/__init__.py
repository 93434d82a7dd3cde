"""EMBR-RL: distributed RL post-training of masked diffusion LMs with Energy Matching Based Realignment."""

__version__ = "0.1.0"
