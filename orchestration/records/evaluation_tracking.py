"""An evaluation in MLflow: for each model, a run nested under the run it was trained in (its metrics, which
segmenter and feature network made them, the report, grid and chart as artifacts), and, for a registry version,
the metrics as tags on the version (`eval.<split>.<metric>`, `eval.<split>.segmenter`), so versions compare by
them in the registry, with what they scored (`eval.<split>.weights_sha256`, `eval.<split>.data_sha256`: the files
and the split's content)."""

from __future__ import annotations

from orchestration.records.tracking import RUN_TAG, STAGE_TAG, configure_mlflow_client, ensure_experiment, filter_value


def _training_run(client, model, experiment_id: str) -> str | None:
    """The MLflow run the model was trained in: the registry version's run, else the curriculum's parent run."""
    if model.mlflow_run:
        return model.mlflow_run
    if model.run_id:
        found = client.search_runs(
            [experiment_id],
            f"tags.`{RUN_TAG}` = {filter_value(model.run_id)} and tags.`{STAGE_TAG}` = 'parent'",
            max_results=1,
        )
        return found[0].info.run_id if found else None
    return None


def log_evaluation(plan, models, metrics: dict, report: dict, files: list, log=print) -> None:
    configure_mlflow_client()
    from mlflow import MlflowClient
    from mlflow.entities import Metric, Param

    client = MlflowClient(tracking_uri=plan.tracking_uri, registry_uri=plan.tracking_uri)
    dataset = report.get("dataset") or "dataset"
    default_exp = ensure_experiment(client, f"pix2pixhd-{dataset}", plan.tracking_uri)
    real = metrics.get("real photos", {})
    for model in models:
        parent = _training_run(client, model, default_exp)
        exp = client.get_run(parent).info.experiment_id if parent else default_exp
        tags = {"p2p.kind": "evaluation", "p2p.evaluated": model.spec}
        if parent:
            tags["mlflow.parentRunId"] = parent
        run = client.create_run(exp, tags=tags, run_name=f"evaluate {model.name} on {plan.split}")
        rid = run.info.run_id
        params = {
            "data": plan.data_uri,
            "split": plan.split,
            "model": model.spec,
            "segmenter": report["segmenter"] or "none",
            "feature_network": report["feature_network"] or "none",
            "model_sha256": model.sha256 or "unknown",
            "data_sha256": report["data_sha256"],
        }
        values = {k: v for k, v in metrics[model.name].items() if v == v}  # NaN: not logged
        values |= {f"real_{k}": v for k, v in real.items() if k.startswith("seg_") and v == v}
        client.log_batch(
            rid,
            metrics=[Metric(k, float(v), 0, 0) for k, v in values.items()],
            params=[Param(k, str(v)[:500]) for k, v in params.items()],
        )
        for path in files:
            client.log_artifact(rid, str(path))
        client.set_terminated(rid, "FINISHED")
        where = f"nested under {parent}" if parent else "(no training run found to nest it under)"
        if model.registry:
            name, version = model.registry
            prefix = f"eval.{plan.split}."
            for k, v in values.items():
                if not k.startswith("real_"):
                    client.set_model_version_tag(name, version, prefix + k, f"{v:.6g}")
            for k in ("segmenter", "feature_network", "data_sha256"):
                client.set_model_version_tag(name, version, prefix + k, params[k])
            client.set_model_version_tag(name, version, prefix + "weights_sha256", params["model_sha256"])
            where += f"; tags {prefix}* on {name} version {version}"
        log(f"evaluate: MLflow run {rid} for {model.name} {where}")
