"""The MLflow server is down when training starts and comes back mid-run: training completes and what was
logged during and after the outage reaches the server. (Registration after an outage that outlasts the job:
tests/test_bad_input_runs.py.)"""

import subprocess
import sys
import time

import pytest
from mlflow import MlflowClient

from data.shards import PrepareOptions, prepare
from data.synthetic.write import write_city
from tests.services import Outage, make_bucket, mlflow_server

pytestmark = pytest.mark.slow


def test_training_survives_a_tracking_outage_and_logs_after_recovery(s3, tmp_path):
    src = write_city(tmp_path / "src", count=24, height=64, width=128)
    data = str(tmp_path / "data")
    prepare(PrepareOptions("flat", str(src), data, val_fraction=0.15), log=lambda m: None)
    make_bucket(s3, "outage")
    log_path = tmp_path / "train.log"
    with mlflow_server(tmp_path, s3, "outage") as server, open(log_path, "w") as log:
        outage = Outage(int(server.rsplit(":", 1)[1]))  # the job's tracking address refuses connections
        tracking = f"http://127.0.0.1:{outage.port}"
        train = f"jobs.train --config configs/tiny.yaml --data {data} --storage {tmp_path}/runs --run-id outage --stages 1,2"
        proc = subprocess.Popen(
            [sys.executable, "-m", *train.split(), "--tracking-uri", tracking], stdout=log, stderr=subprocess.STDOUT
        )
        try:
            deadline = time.monotonic() + 300
            while "[stage 1] epoch 1/" not in log_path.read_text():
                assert proc.poll() is None, log_path.read_text()[-3000:]
                assert time.monotonic() < deadline
                time.sleep(0.5)
            assert f"mlflow: cannot log to {tracking}" in log_path.read_text()
            outage.end()
            assert proc.wait(600) == 0, log_path.read_text()[-4000:]
            c = MlflowClient(tracking_uri=server, registry_uri=server)
            exp = c.get_experiment_by_name("pix2pixhd-synthetic-city")
            runs = c.search_runs([exp.experiment_id], "tags.`p2p.run_id` = 'outage'")
            by_stage = {r.data.tags["p2p.stage"]: r for r in runs}
            assert set(by_stage) == {"parent", "1", "2"}
            statuses = sorted((r.info.run_name, r.info.status) for r in runs)
            assert len(runs) == 3 and {s for _, s in statuses} == {"FINISHED"}, (statuses, log_path.read_text()[-4000:])
            for k, epochs in (("1", 3), ("2", 2)):
                history = c.get_metric_history(by_stage[k].info.run_id, "G_GAN")
                assert len(history) == epochs, (k, history)  # queued during the outage, none lost
        finally:
            outage.close()
            if proc.poll() is None:
                proc.kill()
    text = log_path.read_text()
    assert "training continues, records are queued and retried" in text
    assert "reachable again" in text
    assert "Traceback" not in text
    assert "\n\n\n" not in text  # no progress-bar residue (Ray's tqdm in the workers printed blank lines)
    assert not (tmp_path / "runs" / "outage" / "tracking-unsent").exists() or not any(
        (tmp_path / "runs" / "outage" / "tracking-unsent").iterdir()
    )  # records a stage kept during the outage were sent at the next stage's end
