"""The KubeRay manifest stays deployable: its import path exists, its catalog validates."""

from __future__ import annotations

import importlib
import re
from pathlib import Path

import yaml

from gateway.settings import FileConfig, Settings

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


def test_the_head_pod_outlives_the_gateways_shutdown_and_keeps_its_spool() -> None:
    documents = {doc["kind"]: doc for doc in yaml.safe_load_all(MANIFEST.read_text())}
    head = documents["RayService"]["spec"]["rayClusterConfig"]["headGroupSpec"]["template"]
    (container,) = head["spec"]["containers"]
    env = {var["name"]: var["value"] for var in container["env"] if "value" in var}
    settings = Settings(
        shutdown_drain_s=env["SLUIS_SHUTDOWN_DRAIN_S"],
        shutdown_flush_s=env["SLUIS_SHUTDOWN_FLUSH_S"],
    )
    # Serve kills the gateway replica this long after asking it to stop (deployments/app.py).
    serve_kills_after = settings.shutdown_drain_s + settings.shutdown_flush_s + 5
    hook = container["lifecycle"]["preStop"]["exec"]["command"][-1]
    assert hook.startswith("serve shutdown -y;")  # SIGTERM reaches the shell, never Ray
    waits = re.search(r"\$\(date \+%s\) \+ (\d+)", hook)
    ray_stop = re.search(r"ray stop --grace-period (\d+)$", hook)
    assert waits is not None and ray_stop is not None, hook
    assert int(waits[1]) > serve_kills_after
    assert head["spec"]["terminationGracePeriodSeconds"] >= int(waits[1]) + int(ray_stop[1])

    mounts = {mount["mountPath"]: mount["name"] for mount in container["volumeMounts"]}
    volumes = {volume["name"]: volume for volume in head["spec"]["volumes"]}
    state = volumes[mounts[env["SLUIS_STATE_DIR"]]]
    claim = documents["PersistentVolumeClaim"]
    assert state["persistentVolumeClaim"]["claimName"] == claim["metadata"]["name"]
    # The next cluster's head (a RayService upgrade) mounts it while the old one still runs.
    assert claim["spec"]["accessModes"] == ["ReadWriteMany"]
