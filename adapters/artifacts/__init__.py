"""Artifacts: a version's files (build, load, import checks) and the stores that publish them."""
