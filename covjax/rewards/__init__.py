"""Rewards: `math` (final-answer extraction + math-verify, under a hard time limit per check) and
`toy` (the embedded task's exact checker). Import the submodule you need."""
