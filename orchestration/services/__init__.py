"""What is built on the rest: feature clusters of a trained encoder, the editor on Ray Serve, the demo.
Imports: any room of orchestration, data/, model/, evaluation/, serving/."""
