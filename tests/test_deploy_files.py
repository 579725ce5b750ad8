"""The cluster files in docker/ (compose, KubeRay) agree with what the code reads. No image can be pulled or built
here, so they are checked by parsing: services, ports, the environment names the code and MLflow read, where the
secrets come from, and the RayJob's entrypoint through jobs.train's own argument parser and config loader."""

import re
import shlex
import tomllib
from pathlib import Path

import yaml

from jobs.train import parse, plan_from_args
from orchestration.config import load_config

DOCKER = Path(__file__).resolve().parents[1] / "docker"
READ_BY_THE_CODE = {"AWS_ENDPOINT_URL_S3", "MLFLOW_TRACKING_URI"}  # data/storage.py, orchestration/tracking.py
AWS_CREDENTIALS = {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"}


def compose():
    return yaml.safe_load((DOCKER / "compose.yaml").read_text())


def test_compose_has_the_cluster_the_readme_describes():
    services = compose()["services"]
    assert {"ray-head", "ray-worker", "minio", "minio-bucket", "postgres", "mlflow"} <= set(services)
    ports = {name: {p.split(":")[-1] for p in s.get("ports", [])} for name, s in services.items()}
    assert {"8265", "6379"} <= ports["ray-head"] and ports["mlflow"] == {"5000"} and "9000" in ports["minio"]
    head, worker = services["ray-head"], services["ray-worker"]
    assert head["command"].startswith("ray start --head --block") and "--address=ray-head:6379" in worker["command"]
    assert worker["deploy"]["resources"]["reservations"]["devices"][0]["capabilities"] == ["gpu"]
    for node in (head, worker):
        env = node["environment"]
        assert set(env) >= READ_BY_THE_CODE | AWS_CREDENTIALS
        assert env["AWS_ENDPOINT_URL_S3"] == "http://minio:9000" and env["MLFLOW_TRACKING_URI"] == "http://mlflow:5000"
        assert env["AWS_SECRET_ACCESS_KEY"] == "${MINIO_ROOT_PASSWORD}"  # from the .env file, never written here


def test_compose_mlflow_uses_postgres_and_minio_artifacts():
    s = compose()["services"]
    cmd = s["mlflow"]["command"]
    assert "--backend-store-uri postgresql://mlflow:${POSTGRES_PASSWORD}@postgres:5432/mlflow" in cmd
    assert "--artifacts-destination s3://${BUCKET:-pix2pixhd}/mlflow" in cmd
    env = s["mlflow"]["environment"]
    assert env["MLFLOW_S3_ENDPOINT_URL"] == "http://minio:9000" and env["MLFLOW_SERVER_ENABLE_JOB_EXECUTION"] == "false"
    assert "mc mb -p local/$$BUCKET" in " ".join(s["minio-bucket"]["entrypoint"])
    referenced = set(re.findall(r"\$\{(\w+)", (DOCKER / "compose.yaml").read_text()))
    example = {line.split("=")[0] for line in (DOCKER / ".env.example").read_text().splitlines() if "=" in line}
    assert referenced <= example, referenced - example  # every variable compose needs is in the example


def test_the_image_installs_what_the_services_run():
    dockerfile = (DOCKER / "Dockerfile").read_text()
    assert '".[postgres]"' in dockerfile  # mlflow server with a PostgreSQL store (psycopg 3, as the test bed runs it)
    assert "rayproject/ray:2.60.0" in dockerfile  # the Ray of the nodes is the Ray of the clients (pyproject)
    pyproject = tomllib.loads((DOCKER.parent / "pyproject.toml").read_text())
    packages = {p.rstrip("*") for p in pyproject["tool"]["setuptools"]["packages"]["find"]["include"]}
    copied = set(re.findall(r"^COPY (\w+) \1$", dockerfile, re.M))
    assert packages <= copied, f"the image lacks {packages - copied}: jobs importing them fail on the nodes"
    assert "editor/*.js" in str(pyproject["tool"]["setuptools"]["package-data"]["serving"])  # the page ships


def kuberay(name):
    return list(yaml.safe_load_all((DOCKER / "kuberay" / name).read_text()))


def containers(pod_template):
    return pod_template["spec"]["containers"]


def test_kuberay_nodes_take_s3_credentials_from_the_secret():
    (secret,) = kuberay("secret.example.yaml")
    assert secret["kind"] == "Secret" and AWS_CREDENTIALS | {"AWS_ENDPOINT_URL_S3"} <= set(secret["stringData"])
    (cluster,) = kuberay("raycluster.yaml")
    (job,) = kuberay("rayjob.yaml")
    assert cluster["kind"] == "RayCluster" and job["kind"] == "RayJob"
    for spec in (cluster["spec"], job["spec"]["rayClusterSpec"]):
        assert spec["rayVersion"] == "2.60.0"
        groups = [spec["headGroupSpec"], *spec["workerGroupSpecs"]]
        for group in groups:
            for c in containers(group["template"]):
                assert {"secretRef": {"name": secret["metadata"]["name"]}} in c["envFrom"]
                assert not AWS_CREDENTIALS & {e["name"] for e in c.get("env", [])}  # never inline
        head_ports = {p["containerPort"] for p in containers(spec["headGroupSpec"]["template"])[0]["ports"]}
        assert {6379, 8265, 10001} <= head_ports
        gpu = containers(spec["workerGroupSpecs"][0]["template"])[0]["resources"]["limits"]["nvidia.com/gpu"]
        assert gpu == "1"


def test_the_rayjob_entrypoint_is_a_valid_jobs_train_command(monkeypatch):
    (job,) = kuberay("rayjob.yaml")
    argv = shlex.split(job["spec"]["entrypoint"])
    assert argv[:3] == ["python", "-m", "jobs.train"]
    a = parse(argv[3:])
    assert Path(a.config).is_file() and a.config == "configs/cityscapes_1024p.yaml"
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    plan = plan_from_args(a)  # the config loads with the entrypoint's overrides: elastic workers and all
    assert plan.cfg.workers == (4, 8) and plan.cfg.train.checkpoint_every_steps == 500
    assert plan.data_uri.startswith("s3://") and plan.storage_uri.startswith("s3://") and plan.tracking_uri
    assert plan.cfg == load_config(a.config, a.set)


def test_the_serve_config_builds_the_application_jobs_serve_builds():
    """docker/serve.yaml's import_path and args make the same Serve application as jobs.serve (not deployed: no
    GPU cluster here; the application graph is built and its deployments' options checked)."""
    import importlib

    from orchestration.serve import ServeSettings

    config = yaml.safe_load((DOCKER / "serve.yaml").read_text())
    (app,) = config["applications"]
    module, name = app["import_path"].split(":")
    built = getattr(importlib.import_module(module), name)(app["args"])
    editor = built._bound_deployment
    generator = editor.init_args[0]._bound_deployment
    assert editor.name == "Editor" and generator.name == "Generator"
    assert (
        generator.ray_actor_options["num_gpus"] == 1
        and generator._deployment_config.autoscaling_config.max_replicas == 4
    )
    assert ServeSettings(**app["args"]).reload_s == 30
