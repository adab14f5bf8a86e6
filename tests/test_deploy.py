"""The deployment files in deploy/ (docs/deployment.md): they must agree with the nanoserve they deploy.

- every YAML parses; the Kubernetes objects pass kubernetes-validate's offline JSON schemas, strict (skipped when
  the validator is not installed);
- the Deployments run the Dockerfile's entrypoint with flags that `nanoserve --help` lists, probe /health on the
  port the server listens on, and give a GPU (or CPU and memory) to each replica;
- the Service and the HPA point at that Deployment, and the HPA's metric is what prometheus-adapter's rule makes
  of a metric that a real nanoserve server exports at /metrics;
- deploy/ray_serve_app.py compiles, and when Ray Serve is installed it serves a tiny model for real.
"""
import glob
import os
import py_compile
import re
import shutil
import socket
import tempfile
import textwrap

import pytest
import yaml
from starlette.testclient import TestClient

from nanoserve import metrics
from nanoserve.async_engine import AsyncLLMEngine
from nanoserve.cli import build_parser
from nanoserve.config import EngineConfig
from nanoserve.engine import LLMEngine
from nanoserve.server import build_app

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEPLOY = os.path.join(ROOT, "deploy")
YAML_FILES = sorted(glob.glob(os.path.join(DEPLOY, "**", "*.yaml"), recursive=True))
HPA_METRIC = "vllm_num_requests_waiting"  # what the HPA asks the custom metrics API for
PROM_METRIC = "vllm:num_requests_waiting"  # what nanoserve exports


def _docs(path: str) -> list[dict]:
    with open(path) as f:
        return [d for d in yaml.safe_load_all(f) if d is not None]


def k8s_objects() -> list[tuple[str, dict]]:
    return [(os.path.relpath(p, ROOT), d) for p in YAML_FILES for d in _docs(p) if "kind" in d]


def of_kind(kind: str) -> list[dict]:
    return [d for _, d in k8s_objects() if d["kind"] == kind]


def container(deployment: dict) -> dict:
    (c,) = deployment["spec"]["template"]["spec"]["containers"]  # one nanoserve per pod
    return c


def adapter_rule() -> dict:
    (values,) = _docs(os.path.join(DEPLOY, "prometheus-adapter", "values.yaml"))
    (rule,) = [r for r in values["rules"]["custom"] if PROM_METRIC in r["seriesQuery"]]
    return rule


def test_every_yaml_parses():
    assert YAML_FILES, "no YAML in deploy/"
    for path in YAML_FILES:
        assert _docs(path), f"{path} is empty"
    kinds = sorted(d["kind"] for _, d in k8s_objects())
    assert kinds == ["Deployment", "Deployment", "HorizontalPodAutoscaler", "Service"]


@pytest.mark.parametrize("path, deployment", [(p, d) for p, d in k8s_objects() if d["kind"] == "Deployment"])
def test_deployment_runs_nanoserve_with_real_flags_and_probes_its_port(path, deployment):
    c = container(deployment)
    # The image's entrypoint, as the Dockerfile sets it.
    with open(os.path.join(ROOT, "Dockerfile")) as f:
        entrypoint = re.search(r"^ENTRYPOINT\s+(\[.*\])\s*$", f.read(), re.M).group(1)
    assert c["command"] == yaml.safe_load(entrypoint) == ["nanoserve"]
    # Every flag is one that `nanoserve --help` lists, and the parser accepts the whole command line.
    parser = build_parser("serve")
    help_text = parser.format_help()
    flags = [a.split("=")[0] for a in c["args"] if a.startswith("--")]
    assert flags and all(re.search(rf"(^|\s){re.escape(f)}\b", help_text) for f in flags), flags
    args = parser.parse_args(c["args"])  # exits (SystemExit) on an unknown flag or a bad value
    assert args.model and args.host == "0.0.0.0"
    # The probes ask /health on the port the server listens on.
    (port,) = c["ports"]
    assert port["containerPort"] == args.port == 8000
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        get = c[probe]["httpGet"]
        assert get["path"] == "/health", probe
        assert get["port"] in (port["name"], port["containerPort"]), probe
    # Kubernetes waits longer than nanoserve's drain before it kills.
    assert deployment["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] > args.shutdown_timeout
    assert deployment["spec"]["selector"]["matchLabels"].items() <= \
        deployment["spec"]["template"]["metadata"]["labels"].items()
    annotations = deployment["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/path"] == "/metrics" and int(annotations["prometheus.io/port"]) == args.port


def test_resources_gpu_and_cpu_variants():
    by_device = {}
    for d in of_kind("Deployment"):
        requests = container(d)["resources"]["requests"]
        by_device["gpu" if "nvidia.com/gpu" in requests else "cpu"] = container(d)
    gpu, cpu = by_device["gpu"], by_device["cpu"]
    assert gpu["resources"]["requests"]["nvidia.com/gpu"] == gpu["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert {"cpu", "memory"} <= cpu["resources"]["requests"].keys()
    assert build_parser("serve").parse_args(cpu["args"]).device == "cpu"


def test_service_and_hpa_point_at_the_deployment():
    (service,), (hpa,) = of_kind("Service"), of_kind("HorizontalPodAutoscaler")
    for d in of_kind("Deployment"):
        labels = d["spec"]["template"]["metadata"]["labels"]
        assert service["spec"]["selector"].items() <= labels.items()
        assert service["spec"]["ports"][0]["targetPort"] in (p["name"] for p in container(d)["ports"])
        assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment",
                                                 "name": d["metadata"]["name"]}
    (metric,) = hpa["spec"]["metrics"]
    assert metric["type"] == "Pods" and metric["pods"]["metric"]["name"] == HPA_METRIC


def test_adapter_rule_turns_the_exported_metric_into_the_hpa_metric():
    """Apply the adapter's renaming rule the way prometheus-adapter does (a regex on the series name; `${1}` is
    Go's spelling of a group reference) to the Prometheus name."""
    rule = adapter_rule()
    assert rule["resources"]["overrides"]["pod"] == {"resource": "pod"}  # a per-pod metric, as the HPA's Pods type
    series = re.match(r"[a-zA-Z_:][a-zA-Z0-9_:]*", rule["seriesQuery"]).group(0)
    assert series == PROM_METRIC
    renamed = re.sub(rule["name"]["matches"], rule["name"]["as"].replace("${1}", r"\1"), series)
    assert renamed == HPA_METRIC
    assert PROM_METRIC.removeprefix("vllm:") in metrics.GAUGES


def test_docs_show_the_rule_that_is_deployed():
    with open(os.path.join(ROOT, "docs", "deployment.md")) as f:
        blocks = re.findall(r"```yaml\n(.*?)```", f.read(), re.S)
    shown = [rule for block in blocks for rule in yaml.safe_load(textwrap.dedent(block))]
    assert shown == [adapter_rule()]


def test_a_real_server_exports_the_metric_and_health(llama_dir):
    engine = AsyncLLMEngine(LLMEngine(EngineConfig(model=llama_dir, served_model_name="tiny")))
    try:
        with TestClient(build_app(engine, "tiny", api_key="sk-k")) as client:  # probes need no key
            assert client.get("/health").status_code == 200
            text = client.get("/metrics").text
            engine.stop_accepting()  # what SIGTERM does first: readiness turns the pod out of the Service
            assert client.get("/health").status_code == 503
    finally:
        engine.shutdown()
    assert re.search(rf'^{re.escape(PROM_METRIC)}{{model_name="tiny"}} 0\.0$', text, re.M), text


def test_manifests_pass_the_kubernetes_schemas():
    kv = pytest.importorskip("kubernetes_validate", reason="kubernetes-validate is not installed")
    # The oldest and the newest Kubernetes whose schemas the validator ships; strict: unknown fields are errors.
    versions = sorted({kv.utils.all_versions()[0], kv.latest_version()})
    for path, obj in k8s_objects():
        for version in versions:
            kv.validate(obj, version, strict=True)  # raises ValidationError, naming the field
    bad = dict(container(of_kind("Deployment")[0]), readinesProbe={"httpGet": {"path": "/health", "port": 8000}})
    deployment = of_kind("Deployment")[0]
    deployment["spec"]["template"]["spec"]["containers"] = [bad]
    with pytest.raises(kv.ValidationError, match="readinesProbe"):  # a typo does not pass
        kv.validate(deployment, versions[-1], strict=True)


def test_ray_serve_app_compiles(tmp_path):
    py_compile.compile(os.path.join(DEPLOY, "ray_serve_app.py"), cfile=str(tmp_path / "app.pyc"), doraise=True)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_ray_serve_serves_a_tiny_model(llama_dir, monkeypatch):
    """The Ray Serve example for real, on CPU: a local Ray, one replica, requests through Serve's proxy."""
    pytest.importorskip("ray.serve", reason='ray[serve] is not installed (not a nanoserve dependency)')
    import httpx
    import ray
    from ray import serve

    monkeypatch.syspath_prepend(DEPLOY)
    monkeypatch.setenv("RAY_USAGE_STATS_ENABLED", "0")
    import ray_serve_app

    port, temp_dir = _free_port(), tempfile.mkdtemp(prefix="ray-")  # short: Ray's unix sockets live under it
    ray.init(num_cpus=2, include_dashboard=False, _node_ip_address="127.0.0.1", _temp_dir=temp_dir)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        serve.run(ray_serve_app.build({"model": llama_dir, "num_gpus": "0", "device": "cpu", "max_replicas": "1"}),
                  name="nanoserve", route_prefix="/")
        base = f"http://127.0.0.1:{port}"
        assert httpx.get(base + "/health", timeout=30).status_code == 200
        r = httpx.post(base + "/v1/completions", timeout=60,
                       json={"model": llama_dir, "prompt": "The cat eats", "max_tokens": 4, "temperature": 0})
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 4
        body = {"model": llama_dir, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4, "stream": True}
        with httpx.stream("POST", base + "/v1/chat/completions", json=body, timeout=60) as s:
            events = [line for line in s.iter_lines() if line.startswith("data:")]
        assert events[-1] == "data: [DONE]" and len(events) > 2  # streamed through Serve's proxy
        assert PROM_METRIC in httpx.get(base + "/metrics", timeout=30).text
    finally:
        serve.shutdown()
        ray.shutdown()
        shutil.rmtree(temp_dir, ignore_errors=True)
