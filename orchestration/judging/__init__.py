"""Judging generators: jobs.evaluate's pass over a split (seg-score, FID/KID, L1, its report) and the selection
metric that trials, stages and the registry's alias are decided by.
Imports: orchestration.run, .cluster, .records, data/, model/, evaluation/, serving/."""
