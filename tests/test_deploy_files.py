"""The cluster files in docker/ (compose, KubeRay) agree with what the code reads. No image can be pulled or built
here: the compose file runs as a cluster of hosts in tests/test_cluster.py; here it and the KubeRay manifests are
checked by reading them: services, ports, the environment names the code and MLflow read, where the secrets come
from, the RayJob's entrypoint through jobs.train's own argument parser and config loader, and every KubeRay
manifest against KubeRay's own CRD schemas (../shared/schemas/kuberay/), strictly: an unknown field is an error,
as `kubectl apply --validate=strict` makes it."""

import copy
import re
import shlex
import tomllib
from pathlib import Path

import jsonschema
import pytest
import yaml

from jobs.train import parse, plan_from_args
from orchestration.run.config import load_config

DOCKER = Path(__file__).resolve().parents[1] / "docker"
READ_BY_THE_CODE = {"AWS_ENDPOINT_URL_S3", "MLFLOW_TRACKING_URI"}  # data/storage.py, orchestration/records/tracking.py
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

    from orchestration.services.serve import ServeSettings

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


# ---- KubeRay manifests against KubeRay's CRD schemas ------------------------------------------------------------

SCHEMAS = DOCKER.parents[1] / "shared" / "schemas" / "kuberay"
MANIFESTS = ("raycluster.yaml", "rayjob.yaml", "rayservice.yaml")


def strict(schema: dict) -> dict:
    """The CRD schema with unknown fields refused where Kubernetes would prune them (objects with properties and
    neither additionalProperties nor x-kubernetes-preserve-unknown-fields)."""
    schema = copy.deepcopy(schema)

    def walk(node):
        if isinstance(node, dict):
            if (
                "properties" in node
                and "additionalProperties" not in node
                and not node.get("x-kubernetes-preserve-unknown-fields")
            ):
                node["additionalProperties"] = False
            for v in node.values():
                walk(v)
        elif isinstance(node, list):
            for v in node:
                walk(v)

    walk(schema)
    return schema


@pytest.fixture(scope="module")
def crd_schemas() -> dict:
    if not SCHEMAS.is_dir():
        pytest.skip(f"KubeRay's CRD schemas are not at {SCHEMAS} (they ship in ../shared, not the repo)")
    out = {}
    for f in SCHEMAS.glob("ray.io_*.yaml"):
        crd = yaml.safe_load(f.read_text())
        for v in crd["spec"]["versions"]:
            out[(f"{crd['spec']['group']}/{v['name']}", crd["spec"]["names"]["kind"])] = strict(
                v["schema"]["openAPIV3Schema"]
            )
    return out


def schema_errors(crd_schemas: dict, doc: dict) -> list[str]:
    schema = crd_schemas[(doc["apiVersion"], doc["kind"])]
    errors = jsonschema.Draft7Validator(schema).iter_errors(doc)
    return [f"{'.'.join(map(str, e.path))}: {e.message[:200]}" for e in errors]


@pytest.mark.parametrize("name", MANIFESTS)
def test_kuberay_manifests_are_valid_against_kuberays_crd_schemas(crd_schemas, name):
    (doc,) = kuberay(name)
    assert schema_errors(crd_schemas, doc) == []


def test_the_strict_schemas_refuse_a_misspelt_field_and_a_wrong_type(crd_schemas):
    (doc,) = kuberay("rayjob.yaml")
    typo = copy.deepcopy(doc)
    typo["spec"]["rayClusterSpec"]["enableInTreeAutoscalng"] = True
    assert any("enableInTreeAutoscalng" in e for e in schema_errors(crd_schemas, typo))
    wrong = copy.deepcopy(doc)
    wrong["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["minReplicas"] = "four"
    assert any("minReplicas" in e for e in schema_errors(crd_schemas, wrong))


def cluster_specs():
    (cluster,) = kuberay("raycluster.yaml")
    (job,) = kuberay("rayjob.yaml")
    (service,) = kuberay("rayservice.yaml")
    return {
        "raycluster": cluster["spec"],
        "rayjob": job["spec"]["rayClusterSpec"],
        "rayservice": service["spec"]["rayClusterConfig"],
    }


@pytest.mark.parametrize("name", ["raycluster", "rayjob", "rayservice"])
def test_worker_groups_with_a_range_have_the_autoscaler_and_the_head_runs_no_tasks(name):
    spec = cluster_specs()[name]
    if any(g.get("minReplicas") != g.get("maxReplicas") for g in spec["workerGroupSpecs"]):
        assert spec.get("enableInTreeAutoscaling") is True  # else KubeRay keeps `replicas` and ignores the range
    assert spec["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"


def test_the_rayservice_deploys_the_serve_config_of_docker_serve_yaml():
    (service,) = kuberay("rayservice.yaml")
    assert yaml.safe_load(service["spec"]["serveConfigV2"]) == yaml.safe_load((DOCKER / "serve.yaml").read_text())


def test_mlflow_allows_the_host_names_the_nodes_use():
    """MLflow >= 3.5 refuses a Host header it does not allow; compose's and KubeRay's nodes name the server."""
    allowed = compose()["services"]["mlflow"]["environment"]["MLFLOW_SERVER_ALLOWED_HOSTS"]
    default = re.fullmatch(r"\$\{MLFLOW_ALLOWED_HOSTS:-(.*)\}", allowed).group(1).split(",")
    assert {"mlflow", "mlflow:5000"} <= set(default)
    deployment, _ = kuberay("mlflow.yaml")
    env = {e["name"]: e.get("value") for e in containers(deployment["spec"]["template"])[0]["env"]}
    (job,) = kuberay("rayjob.yaml")
    host = re.search(r"--tracking-uri http://(\S+)", job["spec"]["entrypoint"]).group(1)
    assert host in env["MLFLOW_SERVER_ALLOWED_HOSTS"].split(",")


def test_compose_publishes_the_editor_and_restarts_its_services():
    s = compose()["services"]
    # jobs.serve binds 0.0.0.0:8000 on the head, which only the gateway reaches: users get 8000 from the gateway
    assert "8000" not in {p.split(":")[-1] for p in s["ray-head"]["ports"]}
    gateway = s["editor-gateway"]
    assert "8000:8000" in gateway["ports"] and gateway["depends_on"] == {"ray-head": {"condition": "service_started"}}
    conf_file = DOCKER / gateway["volumes"][0].split(":")[0]
    conf = conf_file.read_text()
    assert "proxy_pass http://ray-head:8000;" in conf and "client_header_timeout 10s;" in conf
    assert "client_body_timeout 15s;" in conf and "client_max_body_size 16m;" in conf
    assert "--num-cpus=0" in s["ray-head"]["command"]
    for name in ("minio", "postgres", "mlflow", "ray-head", "ray-worker", "editor-gateway"):
        assert s[name].get("restart") == "unless-stopped", name
