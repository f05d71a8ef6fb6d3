"""Experiment tooling: reading training runs back and measuring their entropy dynamics.

- `runs`: what a run wrote into its workdir (metrics.jsonl, cov dumps, config.json) as series;
- `stats`: the entropy-performance law R = -a exp(H) + b, covariance concentration, the live
  entropy check's agreement, and one run's summary;
- `plots`: the matplotlib figures of those;
- `toy_sweep`: the toy reproduction, run as a sweep of methods and seeds and tabulated
  (`python -m covjax.analysis.toy_sweep`).

`python -m covjax.analyze` is the report of any runs. NumPy, SciPy and matplotlib only (no JAX),
so the analysis runs anywhere.
"""
