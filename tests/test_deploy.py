"""deploy/: every file parses, and every command in it is valid.

No Docker engine or Kubernetes runs on our machines, so nothing here builds an image or starts a
container. Instead: the YAML and JSON files parse (PyYAML, json), the Dockerfiles are read
instruction by instruction, the manifests fit together (selectors, ports, secrets, the GPU worker
group), and every `lumos ...` command found in them (and in docs/DEPLOY.md) is parsed by the real
argparse parsers of `lumos` (stopped right after parsing: nothing is started), every `ray ...`
command by Ray's own click parser. The dashboard may chart only metrics that /metrics serves.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import re
import shlex
from pathlib import Path
from unittest import mock

import pytest
import yaml

import lumos.cli
from lumos.api.metrics import Metrics
from lumos.cluster.serve import build_config

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
ENV = {  # values for the variables the files use, to parse their commands
    "RAY_ADDRESS": "lumos-head-svc.lumos.svc.cluster.local:6379",
    "KUBERAY_GEN_RAY_START_CMD": "ray start --address=lumos-head-svc:6379 --block",
}


class _Parsed(Exception):
    def __init__(self, prog: str, args: argparse.Namespace) -> None:
        super().__init__(prog)
        self.prog, self.namespace = prog, args


def parse_lumos(argv: list[str]) -> tuple[str, argparse.Namespace]:
    """Run `lumos argv` up to its subcommand's argument parsing; (prog, namespace) or an
    AssertionError with argparse's message. Nothing after the parsing runs."""
    original = argparse.ArgumentParser.parse_args

    def parse_then_stop(self, args=None, namespace=None):
        ns = original(self, args, namespace)
        if self.prog.startswith("lumos "):
            raise _Parsed(self.prog, ns)
        return ns

    err = io.StringIO()
    with mock.patch.object(argparse.ArgumentParser, "parse_args", parse_then_stop):
        try:
            with contextlib.redirect_stderr(err):
                lumos.cli.main(list(argv))
        except _Parsed as parsed:
            return parsed.prog, parsed.namespace
        except SystemExit as e:
            raise AssertionError(f"`lumos {shlex.join(argv)}` is invalid: {err.getvalue()}") from e
    raise AssertionError(f"`lumos {shlex.join(argv)}` did not reach a subcommand parser")


def parse_ray(argv: list[str]) -> None:
    """Parse `ray argv` with Ray's click command (nothing is run)."""
    from ray.scripts.scripts import cli

    name, *rest = argv
    command = cli.commands.get(name)
    assert command is not None, f"`ray {name}` is not a Ray command"
    command.make_context(f"ray {name}", list(rest))


def shell_commands(text: str) -> list[list[str]]:
    """The simple commands of a shell line (split at && || ; & | and newlines), variables
    expanded from ENV, a leading `exec` dropped."""
    text = re.sub(  # bash's ${NAME/pattern/replacement}
        r"\$\{(\w+)/([^/}]*)/([^}]*)\}", lambda m: ENV[m[1]].replace(m[2], m[3]), text
    )
    for name, value in ENV.items():
        text = text.replace(f'"${name}"', value).replace(f"${name}", value)
    text = re.sub(r"\d*>&\d+|\d*>>?\s*\S+", " ", text)  # redirections
    out = []
    for part in re.split(r"&&|\|\||[;&|\n]", text):
        words = shlex.split(part)
        while words and words[0] in ("exec", "do", "then", "until", "while", "if", "!"):
            words = words[1:]
        if words:
            out.append(words)
    return out


def commands_of(argv_or_text) -> list[list[str]]:
    """A command as a container spec gives it: an argv list (maybe `sh -c SCRIPT`) or a string."""
    if isinstance(argv_or_text, str):
        return shell_commands(argv_or_text)
    argv = [str(a) for a in argv_or_text]
    if len(argv) >= 2 and argv[0] in ("sh", "bash", "/bin/sh", "/bin/bash"):
        scripts = [a for a in argv[1:] if not a.startswith("-")]
        return [c for s in scripts for c in shell_commands(s)]
    return [argv]


def check_command(words: list[str]) -> str | None:
    """Validate one command; the program name if it is lumos or ray."""
    if words[0] == "lumos":
        prog, _ = parse_lumos(words[1:])
        if prog == "lumos serve":
            build_config(words[2:])  # the values, too (ServeConfig validates them)
        return "lumos"
    if words[0] == "ray":
        parse_ray(words[1:])
        return "ray"
    return None


# -- the checker itself --------------------------------------------------------------------------


def test_the_command_checker_rejects_bad_commands():
    assert parse_lumos(["worker", "--ray-address", "h:6380", "--gpus", "1"])[0] == "lumos worker"
    prog, ns = parse_lumos(["serve", "--workers", "0", "--host", "0.0.0.0"])
    assert prog == "lumos serve" and ns.workers == 0
    for bad in (["serve", "--no-such-flag"], ["wrker"], ["worker", "--gpus", "two"]):
        with pytest.raises(AssertionError, match="invalid"):
            parse_lumos(bad)
    parse_ray(["start", "--head", "--port", "6380", "--block"])
    with pytest.raises(Exception, match="no-such"):
        parse_ray(["start", "--no-such-option"])
    assert shell_commands('ray start --address "$RAY_ADDRESS" && exec lumos worker --gpus 1') == [
        ["ray", "start", "--address", ENV["RAY_ADDRESS"]],
        ["lumos", "worker", "--gpus", "1"],
    ]


# -- Dockerfiles ---------------------------------------------------------------------------------


def dockerfile(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of a Dockerfile, continuation lines joined, comments dropped."""
    lines, current = [], ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        current += line[:-1] + " " if line.endswith("\\") else line
        if not line.endswith("\\"):
            lines.append(current)
            current = ""
    assert not current, f"{path.name}: a continuation line runs off the end"
    out = []
    for line in lines:
        word, _, rest = line.partition(" ")
        assert word.isupper(), f"{path.name}: not an instruction: {line}"
        out.append((word, rest.strip()))
    return out


@pytest.mark.parametrize("name", ["Dockerfile", "Dockerfile.cuda"])
def test_dockerfiles(name):
    steps = dockerfile(DEPLOY / name)
    known = {"FROM", "ARG", "ENV", "RUN", "WORKDIR", "COPY", "USER", "EXPOSE", "CMD", "LABEL"}
    assert {w for w, _ in steps} <= known
    assert steps[0] == ("FROM", "python:3.11-slim")
    runs = [a for w, a in steps if w == "RUN"]
    torch = [r for r in runs if "torch==" in r]
    assert len(torch) == 1 and "torch==2.13.0" in torch[0] and "--index-url" in torch[0]
    if name == "Dockerfile":
        assert "https://download.pytorch.org/whl/cpu" in torch[0]
    else:
        assert "${TORCH_INDEX}" in torch[0]
        arg = [a for w, a in steps if w == "ARG" and a.startswith("TORCH_INDEX=")]
        assert arg and arg[0].startswith("TORCH_INDEX=https://download.pytorch.org/whl/cu")
    assert runs.index(torch[0]) < next(i for i, r in enumerate(runs) if "pip install ." in r)
    for w, a in steps:
        if w == "COPY":
            *sources, _dest = a.split()
            for src in sources:
                assert (ROOT / src).exists(), f"{name}: COPY {src}: no such path in the repo"
    ignore = (DEPLOY / f"{name}.dockerignore").read_text().split()
    for needed in ("!pyproject.toml", "!README.md", "!LICENSE", "!src/"):
        assert needed in ignore
    assert ("USER", "lumos") in steps
    cmd = [a for w, a in steps if w == "CMD"]
    assert len(cmd) == 1
    argv = json.loads(cmd[0])  # exec form
    assert argv[:2] == ["lumos", "serve"] and check_command(argv) == "lumos"
    assert "0.0.0.0" in argv
    assert ("EXPOSE", "8000") in steps


# -- docker compose ------------------------------------------------------------------------------


def compose(name: str = "docker-compose.yml") -> dict:
    return yaml.safe_load((DEPLOY / name).read_text())


def test_compose_services_and_commands():
    services = compose()["services"]
    assert {"redis", "ray-head", "worker", "api", "prometheus", "grafana"} <= set(services)
    seen = {}
    for name, svc in services.items():
        if "command" not in svc:
            continue
        for words in commands_of(svc["command"]):
            prog = check_command(words)
            if prog:
                seen.setdefault(name, []).append(words)
    head = seen["ray-head"][0]
    assert head[:3] == ["ray", "start", "--head"] and "--block" in head
    port = head[head.index("--port") + 1]
    assert port == "6380"  # Redis keeps 6379
    address = f"ray-head:{port}"
    worker = [w for w in seen["worker"] if w[0] == "lumos"]
    assert worker == [["lumos", "worker", "--ray-address", address]]
    assert ["ray", "start", "--address", address] in seen["worker"]  # a Ray node first
    (api,) = [w for w in seen["api"] if w[0] == "lumos"]
    cfg = build_config(api[2:])
    assert cfg.ray_address == address and cfg.workers == 0 and cfg.host == "0.0.0.0"
    assert cfg.store_url == "redis://redis:6379/0"
    assert any(w[:2] == ["ray", "start"] and address in w for w in seen["api"])
    assert services["api"]["ports"] == ["${LUMOS_PORT:-8000}:8000"] and cfg.port == 8000
    for name in ("ray-head", "worker", "api"):
        env = services[name]["environment"]
        assert env["RAY_AUTH_MODE"] == "token", name
        assert env["RAY_AUTH_TOKEN"].startswith("${RAY_AUTH_TOKEN:?"), name  # required, no default
        assert services[name]["build"]["dockerfile"] == "deploy/Dockerfile"
        assert services[name]["shm_size"]
    assert (DEPLOY / services["api"]["build"]["context"] / "pyproject.toml").exists()
    assert services["worker"]["depends_on"]["ray-head"]["condition"] == "service_healthy"
    for mount in services["grafana"]["volumes"] + services["prometheus"]["volumes"]:
        src = mount.split(":")[0]
        if src.startswith("./"):
            assert (DEPLOY / src).exists(), mount


def test_compose_gpu_override():
    services = compose("docker-compose.gpu.yml")["services"]
    assert set(services) <= set(compose()["services"])
    worker = services["worker"]
    assert worker["build"]["dockerfile"] == "deploy/Dockerfile.cuda"
    assert worker["deploy"]["resources"]["reservations"]["devices"][0]["capabilities"] == ["gpu"]
    words = [w for w in commands_of(worker["command"]) if check_command(w) == "lumos"]
    assert words == [["lumos", "worker", "--ray-address", "ray-head:6380", "--gpus", "1"]]


# -- Kubernetes ----------------------------------------------------------------------------------


def manifests() -> list[dict]:
    docs = []
    for path in sorted((DEPLOY / "k8s").glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if doc is not None:
                assert "apiVersion" in doc and "kind" in doc, path.name
                docs.append(doc)
    return docs


def by_kind(kind: str, name: str | None = None) -> list[dict]:
    return [d for d in manifests() if d["kind"] == kind and name in (None, d["metadata"]["name"])]


def containers(pod_spec: dict) -> list[dict]:
    return pod_spec.get("initContainers", []) + pod_spec["containers"]


def commands_in(container: dict) -> list[list[str]]:
    argv = list(container.get("command") or []) + list(container.get("args") or [])
    return commands_of(argv) if argv else []


def check_ray_auth(container: dict) -> None:
    env = {e["name"]: e for e in container.get("env", [])}
    assert env["RAY_AUTH_MODE"]["value"] == "token", container["name"]
    ref = env["RAY_AUTH_TOKEN"]["valueFrom"]["secretKeyRef"]
    assert ref == {"name": "lumos-ray-auth", "key": "token"}, container["name"]


def test_kustomization_lists_every_manifest():
    kustomization = yaml.safe_load((DEPLOY / "k8s" / "kustomization.yaml").read_text())
    files = {p.name for p in (DEPLOY / "k8s").glob("*.yaml")} - {"kustomization.yaml"}
    assert set(kustomization["resources"]) == files


def test_raycluster_has_a_gpu_worker_group_running_lumos_worker():
    (cluster,) = by_kind("RayCluster")
    assert cluster["apiVersion"] == "ray.io/v1"
    assert cluster["metadata"]["annotations"]["ray.io/overwrite-container-cmd"] == "true"
    import ray

    assert cluster["spec"]["rayVersion"] == ray.__version__  # the image's Ray
    head = cluster["spec"]["headGroupSpec"]
    groups = cluster["spec"]["workerGroupSpecs"]
    for spec in [head, *groups]:
        assert all(isinstance(v, str) for v in spec["rayStartParams"].values())  # KubeRay: strings
    (head_c,) = head["template"]["spec"]["containers"]
    check_ray_auth(head_c)
    assert any("$KUBERAY_GEN_RAY_START_CMD" in a for a in head_c["args"])
    gcs = {p["name"]: p["containerPort"] for p in head_c["ports"]}["gcs-server"]
    gpu = [g for g in groups if "nvidia.com/gpu" in str(g)]
    assert gpu, "no GPU worker group"
    (worker_c,) = gpu[0]["template"]["spec"]["containers"]
    assert worker_c["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert gpu[0]["rayStartParams"]["num-gpus"] == "1"
    check_ray_auth(worker_c)
    env = {e["name"]: e.get("value") for e in worker_c["env"]}
    assert (
        env["RAY_ADDRESS"]
        == f"{cluster['metadata']['name']}-head-svc.lumos.svc.cluster.local:{gcs}"
    )
    assert env["RAY_ADDRESS"] == ENV["RAY_ADDRESS"]
    cmds = commands_in(worker_c)
    starts = [w for w in cmds if w[:2] == ["ray", "start"]]
    assert len(starts) == 1 and "--block" not in starts[0]  # returns once the node is up
    assert cmds.index(starts[0]) < next(i for i, w in enumerate(cmds) if w[0] == "lumos")
    lumos_cmds = [w for w in cmds if check_command(w) == "lumos"]
    assert lumos_cmds == [["lumos", "worker", "--ray-address", env["RAY_ADDRESS"], "--gpus", "1"]]
    assert worker_c["image"].endswith(":cuda") and head_c["image"].startswith("lumos:")


def pod_labels() -> dict[str, dict]:
    """app.kubernetes.io/name -> labels of every pod template in the manifests."""
    out = {}
    for d in manifests():
        templates = []
        if d["kind"] == "Deployment":
            templates = [d["spec"]["template"]]
        elif d["kind"] == "RayCluster":
            groups = [d["spec"]["headGroupSpec"], *d["spec"]["workerGroupSpecs"]]
            templates = [g["template"] for g in groups]
        for t in templates:
            labels = t["metadata"]["labels"]
            out[labels["app.kubernetes.io/name"]] = labels
    return out


def test_network_policy_closes_redis_and_ray_to_other_pods():
    (policy,) = by_kind("NetworkPolicy")
    labels = pod_labels()
    (expr,) = policy["spec"]["podSelector"]["matchExpressions"]
    assert expr["key"] == "app.kubernetes.io/name" and expr["operator"] == "In"
    assert set(expr["values"]) == {"lumos-redis", "lumos-ray-head", "lumos-ray-gpu"}
    assert set(expr["values"]) <= set(labels)  # it selects pods that exist
    (allowed,) = policy["spec"]["ingress"][0]["from"]
    wanted = allowed["podSelector"]["matchLabels"].items()
    assert all(wanted <= lab.items() for lab in labels.values())  # every Lumos pod may talk


def test_api_and_redis_deployments_with_services():
    for name, port in (("lumos-api", "http"), ("lumos-redis", "redis")):
        (dep,) = by_kind("Deployment", name)
        (svc,) = by_kind("Service", name)
        labels = dep["spec"]["template"]["metadata"]["labels"]
        assert dep["spec"]["selector"]["matchLabels"].items() <= labels.items()
        assert svc["spec"]["selector"].items() <= labels.items()
        ports = {p["name"] for c in containers(dep["spec"]["template"]["spec"]) for p in c["ports"]}
        assert all(p["targetPort"] in ports for p in svc["spec"]["ports"]) and port in ports
    (api,) = by_kind("Deployment", "lumos-api")
    (c,) = api["spec"]["template"]["spec"]["containers"]
    check_ray_auth(c)
    cmds = commands_in(c)
    assert all(check_command(w) in ("lumos", "ray") for w in cmds)
    (serve,) = [w for w in cmds if w[0] == "lumos"]
    cfg = build_config(serve[2:])
    redis_port = by_kind("Service", "lumos-redis")[0]["spec"]["ports"][0]["port"]
    assert cfg.store_url == f"redis://lumos-redis.lumos.svc.cluster.local:{redis_port}/0"
    assert cfg.workers == 0 and cfg.host == "0.0.0.0" and cfg.ray_address == ENV["RAY_ADDRESS"]
    assert ["ray", "start", "--address", ENV["RAY_ADDRESS"], "--num-cpus", "0"] in cmds
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    assert ports["http"] == cfg.port
    annotations = api["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/path"] == "/metrics"
    assert int(annotations["prometheus.io/port"]) == cfg.port
    assert c["readinessProbe"]["httpGet"]["path"] == "/api/health"


# -- monitoring ----------------------------------------------------------------------------------


def served_metric_names() -> dict[str, set[str]]:
    """Every sample name /metrics can serve (a worker reporting every figure, a refusal), with
    its label names."""
    from prometheus_client import generate_latest
    from prometheus_client.parser import text_string_to_metric_families

    m = Metrics()
    load = {
        "sessions": 1,
        "running": 1,
        "waiting": 0,
        "streams": 1,
        "kv_bytes": 10,
        "kv_budget_bytes": 100,
        "frames": 3,
        "steps": 9,
        "step_seconds": 0.5,
        "cached_sessions": 2,
    }
    hosts = [{"name": "h", "active": 2, "subscribed": 1, "rss_bytes": 9, "activations": 3}]
    for now in (0.0, 1.0):
        m.cluster.update(
            [{"name": "w", "alive": True, "load": load}], {"rate_limit": 1}, now, hosts
        )
    m.commit_to_browser.observe(0.01)
    m.http_requests.labels("GET", "200").inc()
    out: dict[str, set[str]] = {}
    for family in text_string_to_metric_families(generate_latest(m.registry).decode()):
        for sample in family.samples:
            out.setdefault(sample.name, set()).update(sample.labels)
    return out


PROMQL_CALLS = {"sum", "max", "min", "avg", "rate", "increase", "histogram_quantile", "by"}


def test_grafana_dashboard_charts_served_metrics():
    dash = json.loads((DEPLOY / "grafana" / "lumos.json").read_text())
    assert dash["uid"] == "lumos" and dash["panels"]
    served = served_metric_names()
    used = set()
    for panel in dash["panels"]:
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            expr = target["expr"]
            names = re.findall(r"\blumos_[a-z_]+", expr)
            assert names, expr
            depth = 0
            for ch in expr:  # balanced parentheses, never closing more than opened
                depth += {"(": 1, ")": -1}.get(ch, 0)
                assert depth >= 0, expr
            assert depth == 0, expr
            calls = set(re.findall(r"\b([a-z_]+)\s*\(", expr)) - set(names)
            assert calls <= PROMQL_CALLS, f"{expr}: unknown function {calls - PROMQL_CALLS}"
            labels = set().union(*(served.get(n, set()) for n in names))
            for group in re.findall(r"\bby\s*\(([^)]*)\)", expr):
                for label in (x.strip() for x in group.split(",")):
                    assert label in labels, f"{expr}: no metric here has the label {label}"
            for window in re.findall(r"\[([^\]]+)\]", expr):
                assert re.fullmatch(r"\d+[smh]", window), expr
            for name in names:
                assert name in served, f"{panel['title']}: {name} is not served by /metrics"
            used |= set(names)
    for needed in (
        "lumos_sessions",
        "lumos_frames_generated_total",
        "lumos_diffusion_step_seconds_sum",
        "lumos_queue_depth",
        "lumos_time_to_first_frame_seconds_bucket",
        "lumos_commit_to_browser_seconds_bucket",
        "lumos_worker_kv_bytes",
        "lumos_worker_up",
        "lumos_refused_requests_total",
    ):
        assert needed in used, f"the dashboard does not chart {needed}"
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids))


def test_prometheus_and_grafana_provisioning():
    prom = yaml.safe_load((DEPLOY / "prometheus.yml").read_text())
    (job,) = prom["scrape_configs"]
    assert job["metrics_path"] == "/metrics"
    assert job["static_configs"][0]["targets"] == ["api:8000"]
    services = compose()["services"]
    assert "api" in services and services["api"]["ports"][0].endswith(":8000")
    prov = DEPLOY / "grafana" / "provisioning"
    ds = yaml.safe_load((prov / "datasources" / "prometheus.yml").read_text())
    assert ds["datasources"][0]["url"] == "http://prometheus:9090"
    dashboards = yaml.safe_load((prov / "dashboards" / "lumos.yml").read_text())
    path = dashboards["providers"][0]["options"]["path"]
    assert any(v.split(":")[1].startswith(path) for v in services["grafana"]["volumes"])


# -- docs/DEPLOY.md ------------------------------------------------------------------------------


def test_deploy_doc_commands_are_valid():
    text = (ROOT / "docs" / "DEPLOY.md").read_text()
    blocks = re.findall(r"```(?:bash|sh|console)?\n(.*?)```", text, flags=re.S)
    checked = 0
    for block in blocks:
        for line in block.replace("\\\n", " ").splitlines():
            line = line.split(" #")[0].strip()
            if not re.search(r"(^|[\s/])(lumos|ray)\s", line) or line.startswith("#"):
                continue  # only lines that run lumos or ray are parsed
            for words in shell_commands(line):
                words = ["lumos" if w == ".venv/bin/lumos" else w for w in words]
                if words[0] == "ray":
                    check_command(words)
                starts = [
                    i
                    for i, w in enumerate(words)
                    if w == "lumos" and (i == 0 or words[i - 1].startswith("lumos:"))
                ]  # `lumos ...`, or `docker run ... lumos:cpu lumos ...`
                for i in starts:
                    assert check_command(words[i:]) == "lumos"
                    checked += 1
    assert checked >= 3, "docs/DEPLOY.md shows no lumos commands"
    assert "not run" in text.lower()
