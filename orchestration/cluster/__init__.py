"""Ray itself: which cluster a job joins (RAY_ADDRESS), what its nodes can hold and when they are free, which stage
failures Ray Train retries (input errors: never), Ray's log noise kept out of job logs.
Imports: orchestration.run, data/, model/."""
