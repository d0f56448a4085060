"""The KubeRay manifest stays deployable: its import path exists, its catalog validates."""

from __future__ import annotations

import importlib
from pathlib import Path

import yaml

from gateway.settings import FileConfig

MANIFEST = Path(__file__).resolve().parents[2] / "deployments" / "kuberay" / "rayservice.yaml"


def test_rayservice_points_at_our_builder_and_carries_a_valid_catalog() -> None:
    documents = {doc["kind"]: doc for doc in yaml.safe_load_all(MANIFEST.read_text())}
    serve_config = yaml.safe_load(documents["RayService"]["spec"]["serveConfigV2"])
    assert serve_config["proxy_location"] == "Disabled"  # the gateway serves HTTP itself
    (application,) = serve_config["applications"]
    module, function = application["import_path"].split(":")
    assert callable(getattr(importlib.import_module(module), function))
    catalog = FileConfig.model_validate(
        yaml.safe_load(documents["ConfigMap"]["data"]["sluis.yaml"])
    )
    assert catalog.upstream.kind == "ray"
    residency = catalog.models[0].placement.node_labels
    workers = documents["RayService"]["spec"]["rayClusterConfig"]["workerGroupSpecs"]
    labelled = [group["rayStartParams"]["labels"] for group in workers]
    assert any(all(f"{k}={v}" in labels for k, v in residency.items()) for labels in labelled)
    assert set(catalog.prices) == {model.id for model in catalog.models}
