"""Verifiers that read text and nothing else: `math` (final-answer extraction + math-verify,
under a hard time limit per check). Import the submodule you need."""
