"""The compose topology without containers: two service replicas and nginx on loopback.

Both replicas serve the store's `current` link of a tiny family. Under a bounded load
through nginx: deploy/redeploy.sh moves every replica to a new version with zero failed
requests, rolls a broken version back by itself, and --rollback returns to the previous
version; then one replica is killed mid-load and no request is lost after the client's
retry while the survivor keeps serving. The tests share one set of processes and run in
file order (the kill is last); each also runs on its own.
"""

import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

from deploy import nginx_conf, store
from flash.tiny import write_tiny_family
from service.testing import free_port

ROOT = Path(__file__).resolve().parents[1]
ADMIN = "admin-secret"
FAMILY = "tiny"
NGINX = shutil.which("nginx") or ("/usr/sbin/nginx" if os.access("/usr/sbin/nginx", os.X_OK) else None)
pytestmark = pytest.mark.skipif(
    NGINX is None, reason="nginx is not installed (deploy/install-test-tools.sh installs it as root)"
)


def wait_for(url: str, timeout: float, procs=()) -> None:
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        for p in procs:
            if p.poll() is not None:
                raise RuntimeError(f"{p.args} exited with {p.returncode} before {url} answered")
        try:
            r = httpx.get(url, timeout=2)
            if r.status_code == 200:
                return
            last = r.text
        except httpx.TransportError as e:
            last = repr(e)
        time.sleep(0.1)
    raise TimeoutError(f"{url} not ready after {timeout} s: {last}")


def figures():
    row = {"alignment": {"overall": 50.0}, "fid": 10.0, "n": 4}
    return {"n": 4, "rows": {"Imagine Flash, 3-step": row}}


@pytest.fixture(scope="module")
def topo(tmp_path_factory):
    """Store (v1, v2, broken; current -> v1), two replicas on it, nginx in front."""
    tmp = tmp_path_factory.mktemp("topology")
    fam = write_tiny_family(tmp / "fam")
    card = store.read_card(fam)
    store.write_json(fam / "flash.json", {**card, "eval": figures()})
    s = tmp / "store"
    for v in ("v1", "v2", "broken"):
        store.publish(s, FAMILY, fam, v)
    weights = s / FAMILY / "broken" / "students" / "3-step" / "diffusion_pytorch_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])  # truncated: the reload must fail
    store.set_current(s, FAMILY, "v1")

    procs, replicas = [], {}
    try:
        for name in ("a", "b"):
            port = free_port()
            env = {
                **os.environ,
                "OMP_NUM_THREADS": "1",
                "FLASH_MODEL_DIR": str(s / FAMILY / "current"),
                "FLASH_HOST": "127.0.0.1",
                "FLASH_PORT": str(port),
                "FLASH_ADMIN_TOKEN": ADMIN,
                "FLASH_LOG_LEVEL": "warning",
                "FLASH_DRAIN_TIMEOUT_S": "5",
            }
            log = open(tmp / f"replica-{name}.log", "w")  # noqa: SIM115 - closed with the process
            p = subprocess.Popen([sys.executable, "-m", "service"], env=env, cwd=ROOT, stdout=log, stderr=log)
            procs.append(p)
            replicas[name] = (f"http://127.0.0.1:{port}", p)
        for url, p in replicas.values():
            wait_for(f"{url}/health/ready", 120, [p])

        runtime = tmp / "nginx"
        runtime.mkdir()
        lb_port = free_port()
        upstreams = [url.removeprefix("http://") for url, _ in replicas.values()]
        conf = runtime / "nginx.conf"
        conf.write_text(nginx_conf.render(upstreams, f"127.0.0.1:{lb_port}", str(runtime), fail_timeout_s=10))
        cmd = [
            NGINX,
            "-c",
            str(conf),
            "-p",
            str(runtime),
            "-e",
            str(runtime / "error.log"),
            "-g",
            "daemon off;",
        ]
        lb = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=open(runtime / "stderr.log", "w"))  # noqa: SIM115
        procs.append(lb)
        lb_url = f"http://127.0.0.1:{lb_port}"
        wait_for(f"{lb_url}/nginx-health", 20, [lb])
        yield {"store": s, "lb": lb_url, "replicas": replicas, "tmp": tmp}
    finally:
        for p in reversed(procs):
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in procs:
            try:
                p.wait(timeout=15)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(timeout=5)


class Load:
    """Requests through the balancer from a few threads until stopped (bounded in count and
    time). The client retries a request up to `retries` times on a transport error or a
    502/503/504, as a client of a load-balanced service should."""

    def __init__(
        self, url: str, workers: int = 3, retries: int = 3, max_requests: int = 400, max_s: float = 90
    ):
        self.url, self.workers, self.retries = url, workers, retries
        self.max_requests, self.deadline = max_requests, time.monotonic() + max_s
        self.results: list[dict] = []
        self._lock, self._next, self._stop = threading.Lock(), 0, threading.Event()
        self._threads = [threading.Thread(target=self._work, daemon=True) for _ in range(workers)]

    def __enter__(self):
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        for t in self._threads:
            t.join(60)

    def ok_count(self) -> int:
        with self._lock:
            return sum(r["status"] == 200 for r in self.results)

    def wait_ok(self, n: int, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while self.ok_count() < n:
            assert time.monotonic() < deadline, f"fewer than {n} successful requests after {timeout} s"
            time.sleep(0.05)

    def _work(self) -> None:
        with httpx.Client(timeout=30) as client:
            while not self._stop.is_set() and time.monotonic() < self.deadline:
                with self._lock:
                    if self._next >= self.max_requests:
                        return
                    i, self._next = self._next, self._next + 1
                self.results.append(self._one(client, i))

    def _one(self, client: httpx.Client, i: int) -> dict:
        body = {"prompt": "a red circle above a blue square", "steps": 1, "seed": i}
        errors, start = [], time.monotonic()
        for attempt in range(1, self.retries + 2):
            try:
                r = client.post(f"{self.url}/v1/generate", json=body)
            except httpx.TransportError as e:
                errors.append(repr(e))
                time.sleep(0.1)
                continue
            if r.status_code in (502, 503, 504):
                errors.append(f"{r.status_code} {r.text[:200]}")
                time.sleep(0.1)
                continue
            return {
                "i": i, "status": r.status_code, "attempts": attempt, "start": start,
                "version": r.headers.get("x-model-version"), "upstream": r.headers.get("x-upstream", ""),
                "errors": errors, "body": "" if r.status_code == 200 else r.text[:300],
            }  # fmt: skip
        return {"i": i, "status": None, "attempts": self.retries + 1, "start": start, "errors": errors}


def run_script(topo, *args, timeout=180):
    env = {
        **os.environ,
        "PYTHON": sys.executable,
        "FLASH_STORE": str(topo["store"]),
        "FLASH_FAMILY": FAMILY,
        "FLASH_ADMIN_TOKEN": ADMIN,
        "FLASH_REPLICAS": ",".join(url for url, p in topo["replicas"].values() if p.poll() is None),
    }
    return subprocess.run(
        ["bash", str(ROOT / "deploy" / "redeploy.sh"), *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def served(topo) -> dict[str, str | None]:
    out = {}
    for name, (url, _) in topo["replicas"].items():
        r = httpx.get(f"{url}/health/ready", timeout=5)
        out[name] = r.json().get("version") if r.status_code == 200 else None
    return out


def failures(load: Load) -> list[dict]:
    return [r for r in load.results if r["status"] != 200]


def test_redeploy_under_load_moves_every_replica_with_zero_failed_requests(topo):
    with Load(topo["lb"]) as load:
        load.wait_ok(5)
        r = run_script(topo, "v2")
        after = load.ok_count()
        load.wait_ok(after + 5)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "done: 2 replica(s) serve v2" in r.stdout
    assert failures(load) == []
    assert all(x["attempts"] == 1 for x in load.results)  # nginx and the reload hid nothing from the client
    assert {x["version"] for x in load.results} <= {"v1", "v2"}
    assert served(topo) == {"a": "v2", "b": "v2"}
    assert httpx.get(f"{topo['lb']}/v1/models", timeout=5).json()["version"] == "v2"
    assert (store.current(topo["store"], FAMILY), store.previous(topo["store"], FAMILY)) == ("v2", "v1")


def test_a_broken_version_is_rolled_back_automatically(topo):
    if store.current(topo["store"], FAMILY) != "v2":
        assert run_script(topo, "v2").returncode == 0
    with Load(topo["lb"]) as load:
        load.wait_ok(3)
        r = run_script(topo, "broken")
        load.wait_ok(load.ok_count() + 3)
    assert r.returncode == 1, r.stdout + r.stderr
    assert "refused the reload" in r.stderr and "rolled back to v2 (every replica serves v2)" in r.stderr
    assert failures(load) == []
    assert served(topo) == {"a": "v2", "b": "v2"}
    assert (store.current(topo["store"], FAMILY), store.previous(topo["store"], FAMILY)) == ("v2", "v1")


def test_rollback_returns_to_the_previous_version(topo):
    if store.current(topo["store"], FAMILY) != "v2":
        assert run_script(topo, "v2").returncode == 0
    r = run_script(topo, "--rollback")
    assert r.returncode == 0, r.stdout + r.stderr
    assert served(topo) == {"a": "v1", "b": "v1"}
    assert (store.current(topo["store"], FAMILY), store.previous(topo["store"], FAMILY)) == ("v1", "v2")


def test_killing_a_replica_mid_load_loses_no_request(topo):
    victim_url, victim = topo["replicas"]["a"]
    survivor_url, _ = topo["replicas"]["b"]
    survivor = survivor_url.removeprefix("http://")
    with Load(topo["lb"], workers=4) as load:
        load.wait_ok(8)
        victim.send_signal(signal.SIGKILL)
        victim.wait(timeout=10)
        killed_at = time.monotonic()
        load.wait_ok(load.ok_count() + 30)
    assert failures(load) == [], failures(load)[:3]
    late = [x for x in load.results if x["start"] > killed_at]
    assert len(late) >= 20 and all(x["upstream"].split(", ")[-1] == survivor for x in late)
    assert any(", " in x["upstream"] for x in load.results)  # nginx met the dead replica and moved on
    # the survivor keeps serving, directly and through the balancer
    assert httpx.get(f"{survivor_url}/health/ready", timeout=5).status_code == 200
    for seed in range(3):
        r = httpx.post(
            f"{topo['lb']}/v1/generate",
            json={"prompt": "a blue square", "steps": 1, "seed": seed},
            timeout=30,
        )
        assert r.status_code == 200 and r.headers["x-upstream"].endswith(survivor)
