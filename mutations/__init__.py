"""Mutation testing of the paper equations (python -m mutations.run; see run.py)."""
