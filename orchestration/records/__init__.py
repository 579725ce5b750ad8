"""MLflow: runs tracked from drivers and workers through outages, the generator registry (versions, digests,
aliases, loading), the segmenter registry, evaluation runs and tags.
Imports: orchestration.run, data/, model/, evaluation/, serving/."""
