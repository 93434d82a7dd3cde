"""The evaluation command's parts: accuracy tables, a progress display and the CLI driver.

``python -m embr_rl.eval`` (see :func:`embr_rl.eval.main`) is the entry point; the
decode-and-score loop itself is :func:`embr_rl.eval.evaluate`.
"""
