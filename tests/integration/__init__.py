"""Integration tests (a package, so module names such as test_eval_cli may repeat under unit/)."""
