"""Training on Ray Train and Tune: the three-stage curriculum and its stage loop (what each worker runs), sweeps,
the segmenter's training.
Imports: orchestration.run, .cluster, .records, .judging, data/, model/, evaluation/, serving/."""
