"""`make deploy-check`, Kubernetes: deploy/kubernetes rendered as kustomize would and
every object validated offline against the Kubernetes schema (kubernetes-validate,
strict: an unknown field is an error), then checked against the code: the config the
ConfigMap carries loads, the ports agree with it, each container holds only the
capabilities its process needs, the database URL's secret file passes the auth
service's own mode check.

The custom resources (CloudNativePG's Cluster, the Prometheus Operator's
ServiceMonitor) have no schema here: they are checked for the fields pushgate relies
on, not validated against their CRDs.
"""

import copy
import os
from pathlib import Path

import kubernetes_validate
import pytest
import yaml

from pushgate_io import gateway_config

KUBERNETES = Path(__file__).resolve().parent.parent / "deploy" / "kubernetes"
KUBERNETES_VERSION = "1.30.0"
CUSTOM_KINDS = {"ServiceMonitor", "Cluster"}


def render(directory: Path) -> list[dict]:
    """The objects kustomize builds from `directory`, for the subset used here:
    `resources` (files or directories), `components` and `namespace`."""
    kustomization = yaml.safe_load((directory / "kustomization.yaml").read_text())
    allowed = {"apiVersion", "kind", "resources", "components", "namespace"}
    assert set(kustomization) <= allowed, f"{directory}: kustomize features this check lacks"
    objects = []
    for entry in kustomization.get("resources", []) + kustomization.get("components", []):
        path = (directory / entry).resolve()
        if path.is_dir():
            objects += render(path)
        else:
            objects += [doc for doc in yaml.safe_load_all(path.read_text()) if doc]
    namespace = kustomization.get("namespace")
    for obj in objects:
        if namespace and obj["kind"] != "Namespace":
            obj["metadata"]["namespace"] = namespace
    return objects


BUILDS = ["base", "overlays/cloudnative-pg"]


@pytest.fixture(params=BUILDS)
def objects(request) -> list[dict]:
    return render(KUBERNETES / request.param)


def by_kind(objects: list[dict], kind: str) -> dict:
    found = [obj for obj in objects if obj["kind"] == kind]
    assert len(found) == 1, kind
    return found[0]


def test_every_object_validates_against_the_kubernetes_schema(objects):
    for obj in objects:
        if obj["kind"] in CUSTOM_KINDS:
            continue
        kubernetes_validate.validate(obj, KUBERNETES_VERSION, strict=True)


def test_a_misspelled_field_is_refused():
    """The check can fail: a typo in the DaemonSet is a validation error."""
    daemonset = copy.deepcopy(by_kind(render(KUBERNETES / "base"), "DaemonSet"))
    daemonset["spec"]["template"]["spec"]["hostNetwrok"] = True
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(daemonset, KUBERNETES_VERSION, strict=True)


def test_the_custom_resources_carry_what_pushgate_relies_on():
    objects = render(KUBERNETES / "overlays/cloudnative-pg")
    cluster = by_kind(objects, "Cluster")
    assert cluster["apiVersion"] == "postgresql.cnpg.io/v1"
    # CloudNativePG names the app secret <cluster>-app; the gateways mount its `uri`
    secret_volume = next(
        volume["secret"]
        for volume in by_kind(objects, "DaemonSet")["spec"]["template"]["spec"]["volumes"]
        if volume["name"] == "database-url"
    )
    assert secret_volume["secretName"] == cluster["metadata"]["name"] + "-app"
    assert secret_volume["items"] == [{"key": "uri", "path": "database-url"}]
    assert cluster["spec"]["instances"] >= 2  # a standby to fail over to
    monitor = by_kind(objects, "ServiceMonitor")
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    service = by_kind(objects, "Service")
    assert monitor["spec"]["selector"]["matchLabels"] == service["spec"]["selector"]
    assert {e["port"] for e in monitor["spec"]["endpoints"]} == {
        p["name"] for p in service["spec"]["ports"]
    }


def test_the_manifests_agree_with_the_code(tmp_path):
    objects = render(KUBERNETES / "base")
    text = by_kind(objects, "ConfigMap")["data"]["pushgate.toml"]
    pod = by_kind(objects, "DaemonSet")["spec"]["template"]["spec"]
    containers = {container["name"]: container for container in pod["containers"]}
    # the config loads as the auth service would load it, mounted where the pod mounts it
    mounted = containers["auth"]["volumeMounts"][0]
    assert mounted["subPath"] == "pushgate.toml"
    config = gateway_config.parse(text, mounted["mountPath"], auth=True)
    auth, dataplane = config.auth, config.dataplane
    assert auth.database_url_file == "/var/lib/pushgate/secret/database-url"
    mounts = {m["name"]: m["mountPath"] for m in containers["auth"]["volumeMounts"]}
    assert os.path.dirname(auth.database_url_file) == mounts["database-url"]
    assert os.path.dirname(auth.tls_key) == mounts["tls"]
    run_dir = os.path.dirname(config.gateway.control_socket)
    assert run_dir == mounts["run"] == os.path.dirname(auth.admin_socket)
    assert {m["mountPath"] for m in containers["dataplane"]["volumeMounts"]} >= {run_dir}
    # the secret file's mode passes the auth service's own check
    volumes = {volume["name"]: volume for volume in pod["volumes"]}
    url_file = tmp_path / "database-url"
    url_file.write_text("postgresql://app:secret@pushgate-db-rw/app\n")
    url_file.chmod(volumes["database-url"]["secret"]["defaultMode"])
    local = gateway_config.parse(
        text.replace('"secret/database-url"', f'"{url_file}"'), str(tmp_path / "x.toml"), auth=True
    )
    assert gateway_config.database_location(local.auth).startswith("postgresql://")
    # each pod names itself in [cluster] by its node's name
    env = {e["name"]: e for e in containers["auth"]["env"]}
    node = env[gateway_config.GATEWAY_ID_ENVIRONMENT]["valueFrom"]["fieldRef"]["fieldPath"]
    assert node == "spec.nodeName" and len(config.cluster.gateways) >= 2
    # ports: what the containers declare is what the config listens on
    ports = {
        (p["containerPort"], p["protocol"])
        for container in containers.values()
        for p in container["ports"]
    }
    assert ports == {
        (gateway_config.host_port(auth.listen)[1], "TCP"),
        (auth.metrics_listen[1], "TCP"),
        (dataplane.listen[1], "UDP"),
        (dataplane.metrics_listen[1], "TCP"),
    }
    annotations = by_kind(objects, "DaemonSet")["spec"]["template"]["metadata"]["annotations"]
    assert int(annotations["prometheus.io/port"]) == dataplane.metrics_listen[1]
    # capabilities: none for the auth service; the dataplane's unit's bounding set
    assert containers["auth"]["securityContext"]["capabilities"] == {"drop": ["ALL"]}
    unit = (KUBERNETES.parent / "systemd" / "pushgate-dataplane.service").read_text()
    bounding = next(
        line.split("=", 1)[1].split()
        for line in unit.splitlines()
        if line.startswith("CapabilityBoundingSet=")
    )
    added = containers["dataplane"]["securityContext"]["capabilities"]["add"]
    assert sorted("CAP_" + name for name in added) == sorted(bounding)
    for container in containers.values():
        assert container["securityContext"]["readOnlyRootFilesystem"] is True
    assert pod["hostNetwork"] is True and pod["securityContext"]["runAsNonRoot"] is True
