"""Where model/ and data/ meet Ray and MLflow. Rooms, each importing only from the rooms before it (and from
data/, model/, evaluation/, serving/), as tests/test_code_shape.py checks:

    run       a run's config, checkpoints, run.json, lease, stop handling, pictures: no Ray, no MLflow
    cluster   joining Ray, the cluster's resources, which failures Ray Train retries, Ray's log noise
    records   MLflow: run tracking, the model registry, the segmenter registry, evaluation runs
    judging   scoring generators: jobs.evaluate's pass, the selection metric trials and stages are judged by
    training  Ray Train and Tune: the curriculum, its stage loop, sweeps, the segmenter's training
    services  built on all of them: feature clusters, the editor on Ray Serve, the demo
"""
