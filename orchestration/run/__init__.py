"""A run's own files and rules, without Ray or MLflow: the validated config, checkpoints (atomic, verified, their
networks' shapes), run.json, the one-writer lease, how a stopped job ends, memory estimates, image grids.
Imports: data/, model/, serving/ only."""
