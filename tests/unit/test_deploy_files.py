"""The deployment files, checked offline (no Docker, no cluster on the build machines).

docker-compose.yml against the Compose specification's JSON schema (deploy/schemas/), the
manifests of deploy/k8s/ against the Kubernetes schemas of the ``kubernetes-validate`` package,
and what they rely on: files that exist, settings the code reads, pinned images, no secret in the
repository, a cluster layout that agrees with itself, and the container scripts themselves.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import jsonschema
import kubernetes_validate
import pytest
import yaml

from tests.tree import strings

REPO = Path(__file__).resolve().parents[2]
COMPOSE_FILE = REPO / "docker-compose.yml"
ENV_EXAMPLE = REPO / ".env.example"
K8S = REPO / "deploy" / "k8s"
MEMBER = REPO / "deploy" / "container" / "member.sh"
SET_PASSWORDS = REPO / "deploy" / "container" / "set_role_passwords.py"
#: The oldest and the newest Kubernetes release the manifests are checked against.
K8S_VERSIONS = ("1.30.0", "1.36.0")
#: What a deploy file may set for others to read: the code, the container scripts, and the
#: configuration files that take settings from the environment.
READERS = [
    *sorted((REPO / "dataflows").rglob("*.py")),
    *sorted((REPO / "connectors").rglob("*.py")),
    *sorted((REPO / "deploy" / "container").iterdir()),
    *sorted((REPO / "grafana" / "provisioning").rglob("*.yml")),
    REPO / "prometheus" / "alertmanager.yml",
    REPO / "deploy" / "local" / "redis-acl.sh",  # the Redis users, run in the redis container
]

# Compose interpolation: $$ (a literal $), ${NAME}, ${NAME:-default}, ${NAME-default},
# ${NAME:?error}, ${NAME?error}, $NAME.
INTERPOLATION = re.compile(
    r"\$\$|\$\{(?P<name>[A-Za-z_]\w*)(?:(?P<op>:?[-?])(?P<arg>[^}]*))?\}|\$(?P<bare>[A-Za-z_]\w*)"
)
PINNED = re.compile(r"[\w./-]+:v?\d+(\.\d+)+[\w.-]*(@sha256:[0-9a-f]{64})?")


class Unset(Exception):
    """A ${NAME:?...} whose variable is empty: docker compose refuses to start."""


def _interpolate(text: str, env: dict[str, str]) -> str:
    def one(m: re.Match[str]) -> str:
        if m[0] == "$$":
            return "$"
        name = m["name"] or m["bare"]
        value = env.get(name)
        op = m["op"] or ""
        if op.startswith(":") and not value or op in ("-", "?") and value is None:
            if op.endswith("?"):
                raise Unset(name)
            return m["arg"] or "" if op.endswith("-") else ""
        return value or ""

    return INTERPOLATION.sub(one, text)


def _walk(node, fn):
    if isinstance(node, dict):
        return {k: _walk(v, fn) for k, v in node.items()}
    if isinstance(node, list):
        return [_walk(v, fn) for v in node]
    if isinstance(node, str):
        return fn(node)
    return node


def _env_example() -> tuple[dict[str, str], set[str]]:
    """(NAME -> value of the lines that set one, names documented as commented-out lines)."""
    required, optional = {}, set()
    for line in ENV_EXAMPLE.read_text().splitlines():
        if m := re.fullmatch(r"([A-Z_][A-Z0-9_]*)=(.*)", line):
            required[m[1]] = m[2]
        elif m := re.fullmatch(r"# ([A-Z_][A-Z0-9_]*)=.*", line):
            optional.add(m[1])
    return required, optional


def _raw_compose() -> dict:
    return yaml.safe_load(COMPOSE_FILE.read_text())


def _compose(env: dict[str, str] | None = None) -> dict:
    """docker-compose.yml as docker compose sees it with .env holding ``env``."""
    if env is None:
        required, _ = _env_example()
        env = {name: f"example-{name.lower().replace('_', '-')}" for name in required}
    return _walk(_raw_compose(), lambda s: _interpolate(s, env))


def _manifests() -> dict[str, list[dict]]:
    return {
        p.name: [d for d in yaml.safe_load_all(p.read_text()) if d]
        for p in sorted(K8S.glob("*.yaml"))
        if p.name != "kustomization.yaml"
    }


def _k8s_kind(kind: str) -> dict:
    found = [d for docs in _manifests().values() for d in docs if d["kind"] == kind]
    assert len(found) == 1, f"one {kind} expected in deploy/k8s, found {len(found)}"
    return found[0]


def _config_map() -> dict[str, str]:
    return _k8s_kind("ConfigMap")["data"]


def _pod_specs() -> list[dict]:
    return [_k8s_kind("StatefulSet")["spec"]["template"]["spec"],
            _k8s_kind("Job")["spec"]["template"]["spec"]]


def _project_version() -> str:
    return tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]


# -- Compose -------------------------------------------------------------------------------------


def test_compose_validates_against_the_compose_specification():
    schema = json.loads((REPO / "deploy" / "schemas" / "compose-spec.json").read_text())
    validator = jsonschema.Draft202012Validator(schema)
    errors = [f"{'/'.join(map(str, e.absolute_path))}: {e.message}"
              for e in validator.iter_errors(_compose())]
    assert errors == []


def test_the_compose_schema_rejects_a_broken_file():
    # the schema is strict enough to catch a misspelt key and a wrong type
    schema = json.loads((REPO / "deploy" / "schemas" / "compose-spec.json").read_text())
    broken = _compose()
    broken["services"]["grafana"]["restrat"] = "always"
    broken["services"]["redis"]["ports"] = "6379"
    messages = [e.message for e in jsonschema.Draft202012Validator(schema).iter_errors(broken)]
    assert any("'restrat' was unexpected" in m for m in messages)
    assert "'6379' is not of type 'array'" in messages


def test_compose_refuses_to_start_without_every_password():
    required, _ = _env_example()
    assert set(required) == {"POSTGRES_PASSWORD", "WATERFLOW_WRITER_PASSWORD",
                             "WATERFLOW_READER_PASSWORD", "REDIS_PASSWORD",
                             "WATERFLOW_REDIS_PASSWORD", "GRAFANA_ADMIN_PASSWORD"}
    assert all(value == "" for value in required.values()), ".env.example holds a password"
    for name in required:
        env = {n: "x" for n in required if n != name}
        with pytest.raises(Unset, match=f"^{name}$"):
            _compose(env)


def test_every_compose_variable_is_documented_in_env_example_and_used():
    interpolated = {m["name"] or m["bare"] for s in strings(_raw_compose())
                    for m in INTERPOLATION.finditer(s) if m[0] != "$$"}
    required, optional = _env_example()
    assert interpolated == set(required) | optional


def test_only_grafana_is_published_and_only_on_loopback():
    compose = _compose()
    published = {name: s["ports"] for name, s in compose["services"].items() if "ports" in s}
    assert list(published) == ["grafana"]
    assert published["grafana"] == ["127.0.0.1:3000:3000"]
    assert compose["networks"]["backend"] == {"internal": True}
    outside = {name: s.get("networks", s.get("network_mode"))
               for name, s in compose["services"].items()
               if s.get("networks") != ["backend"]}
    assert outside == {"grafana": ["backend", "frontend"], "alertmanager": ["backend", "egress"],
                       "alertmanager-config": "none"}


def test_compose_runs_the_whole_stack():
    services = _compose()["services"]
    assert set(services) == {
        "postgres", "migrate", "redis", "kafka", "kafka-topics", "waterflow-0", "waterflow-1",
        "publisher", "prometheus", "alertmanager-config", "alertmanager", "grafana"}
    kafka = services["kafka"]["environment"]
    assert kafka["KAFKA_PROCESS_ROLES"] == "broker,controller"  # KRaft, no ZooKeeper
    assert services["publisher"]["command"][:3] == ["waterflow", "publish", "/srv/samples/"]
    assert "./dataflows/samples:/srv/samples:ro" in services["publisher"]["volumes"]
    for one_shot in ("migrate", "kafka-topics", "alertmanager-config", "publisher"):
        assert services[one_shot]["restart"] == "no"
    assert services["migrate"]["command"][-1].startswith("waterflow db migrate && ")


def test_compose_cluster_layout_agrees_with_itself():
    compose = _compose()
    services = compose["services"]
    members = sorted(n for n in services if n.startswith("waterflow-"))
    addresses = services[members[0]]["environment"]["CLUSTER_ADDRESSES"].split(";")
    assert addresses == [f"{name}:2101" for name in members]
    recovery_volumes = set()
    for i, name in enumerate(members):
        env = services[name]["environment"]
        assert env["PROCESS_ID"] == str(i) and env["CLUSTER_ADDRESSES"] == ";".join(addresses)
        assert services[name]["command"] == ["waterflow-member"]
        mounts = dict(v.split(":")[1::-1] for v in services[name]["volumes"])
        recovery_volumes.add(mounts[env["WATERFLOW_RECOVERY_DIR"]])
        assert mounts[env["WATERFLOW_RECOVERY_DIR"]] in compose["volumes"]
        assert mounts[env["WATERFLOW_NETWORK"]] == "./dataflows/samples/network.toml"
        assert env["WATERFLOW_RUN_ID"]  # per-process recovery folders share the run by its id
        health = " ".join(services[name]["healthcheck"]["test"])
        assert f":{env['METRICS_PUBLIC_PORT']}/healthz" in health
    assert len(recovery_volumes) == len(members), "each process needs its own recovery volume"
    # Prometheus scrapes every process on its forwarded port, as job "waterflow"
    prometheus = yaml.safe_load((REPO / "deploy" / "compose" / "prometheus.yml").read_text())
    jobs = {j["job_name"]: j["static_configs"][0]["targets"] for j in prometheus["scrape_configs"]}
    port = services[members[0]]["environment"]["METRICS_PUBLIC_PORT"]
    assert jobs["waterflow"] == [f"{name}:{port}" for name in members]
    assert prometheus["alerting"]["alertmanagers"][0]["static_configs"][0]["targets"] == [
        "alertmanager:9093"]


def test_every_file_the_compose_file_refers_to_exists():
    compose = _compose()
    sources = [v.split(":")[0] for s in compose["services"].values() for v in s.get("volumes", [])]
    binds = [s for s in sources if s.startswith("./")]
    assert len(binds) == 10
    for source in binds:
        assert (REPO / source).exists(), f"docker-compose.yml mounts missing {source}"
    named = {s for s in sources if not s.startswith("./")}
    assert named == set(compose["volumes"]), "every named volume declared, none left unused"
    for s in compose["services"].values():
        if "build" in s:
            assert (REPO / s["build"]["context"] / "Dockerfile").is_file()
    # Prometheus reads rules/*.yml beside its config: the rules folder is mounted there
    prometheus = next(s for s in compose["services"].values()
                      if s["image"].startswith("prom/prometheus:"))
    mounts = dict(v.split(":")[1::-1] for v in prometheus["volumes"])
    assert mounts["/etc/prometheus/rules"] == "./prometheus/rules"
    assert sorted((REPO / "prometheus" / "rules").glob("*.yml"))
    config = yaml.safe_load((REPO / mounts["/etc/prometheus/prometheus.yml"]).read_text())
    assert config["rule_files"] == ["rules/*.yml"]
    # the Alertmanager renderer is the local stack's, and it still has that command
    assert "render-alertmanager)" in (REPO / "deploy" / "local" / "prometheus.sh").read_text()


def test_every_file_the_dockerfile_copies_exists_and_is_not_ignored():
    dockerfile = (REPO / "Dockerfile").read_text()
    copied = [w for line in dockerfile.splitlines() if line.startswith("COPY ")
              for w in line.split()[1:-1] if not w.startswith("--")]
    assert "deploy/container/member.sh" in copied
    ignore = (REPO / ".dockerignore").read_text().splitlines()
    for source in copied:
        assert (REPO / source).exists(), source
        assert any(line.startswith("!") and source.startswith(line[1:].rstrip("/"))
                   for line in ignore), f".dockerignore leaves {source} out of the context"


def test_compose_prometheus_config_passes_promtool(tmp_path):
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool not installed (deploy/local/install-debs.sh installs it)")
    # the layout of the container: the config with the rules folder beside it
    shutil.copy(REPO / "deploy" / "compose" / "prometheus.yml", tmp_path / "prometheus.yml")
    shutil.copytree(REPO / "prometheus" / "rules", tmp_path / "rules")
    out = subprocess.run([promtool, "check", "config", str(tmp_path / "prometheus.yml")],
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "SUCCESS" in out.stdout and "rules found" in out.stdout


def test_alertmanager_renders_from_the_compose_environment(tmp_path):
    if shutil.which("envsubst") is None:
        pytest.skip("envsubst not installed (Debian package gettext-base)")
    env = {k: v for k, v in os.environ.items() if not k.startswith("WATERFLOW_")}
    env.update(_compose()["services"]["alertmanager-config"]["environment"])
    assert env["WATERFLOW_ONCALL_RECEIVER"] == ""  # unset in .env: the script's default applies
    out = tmp_path / "alertmanager.yml"
    subprocess.run(["bash", str(REPO / "deploy" / "local" / "prometheus.sh"),
                    "render-alertmanager", str(out)], env=env, check=True)
    rendered = yaml.safe_load(out.read_text())
    assert rendered["route"]["group_wait"] == "30s"
    assert rendered["route"]["routes"][0]["receiver"] == "oncall"
    assert "${" not in json.dumps(rendered)
    amtool = shutil.which("amtool")
    if amtool:
        check = subprocess.run([amtool, "check-config", str(out)], capture_output=True, text=True)
        assert check.returncode == 0, check.stdout + check.stderr


# -- Kubernetes ----------------------------------------------------------------------------------


@pytest.mark.parametrize("version", K8S_VERSIONS)
@pytest.mark.parametrize("name", sorted(p.name for p in K8S.glob("*.yaml")
                                        if p.name != "kustomization.yaml"))
def test_manifest_validates_against_the_kubernetes_schemas(name, version):
    docs = _manifests()[name]
    assert docs
    for doc in docs:
        kubernetes_validate.validate(doc, version, strict=True)


def test_the_kubernetes_schemas_reject_a_broken_manifest():
    sts = _k8s_kind("StatefulSet")
    sts["spec"]["replica"] = 2  # misspelt: strict schemas allow no unknown field
    with pytest.raises(kubernetes_validate.ValidationError, match="replica"):
        kubernetes_validate.validate(sts, K8S_VERSIONS[-1], strict=True)


def test_kustomization_lists_every_manifest_but_the_secret_example():
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    listed = set(kustomization["resources"])
    assert listed == set(_manifests()) - {"secret.example.yaml"}
    kinds = {d["kind"] for name in listed for d in _manifests()[name]}
    assert kinds == {"ConfigMap", "Service", "StatefulSet", "Job", "NetworkPolicy"}
    assert [i["newTag"] for i in kustomization["images"]] == [_project_version()]


def test_k8s_cluster_layout_agrees_with_itself():
    sts, service, config = _k8s_kind("StatefulSet"), _k8s_kind("Service"), _config_map()
    pod = sts["spec"]["template"]
    addresses = config["CLUSTER_ADDRESSES"].split(";")
    assert sts["spec"]["replicas"] == len(addresses) == 2
    cluster_port = next(p["port"] for p in service["spec"]["ports"] if p["name"] == "cluster")
    name, svc = sts["metadata"]["name"], sts["spec"]["serviceName"]
    assert addresses == [f"{name}-{i}.{svc}:{cluster_port}" for i in range(len(addresses))]
    assert svc == service["metadata"]["name"]
    assert service["spec"]["clusterIP"] == "None" and service["spec"]["publishNotReadyAddresses"]
    labels = pod["metadata"]["labels"]
    assert service["spec"]["selector"] == sts["spec"]["selector"]["matchLabels"] == labels
    assert sts["spec"]["podManagementPolicy"] == "Parallel"
    container = pod["spec"]["containers"][0]
    assert container["command"] == ["waterflow-member"]
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {"cluster": cluster_port, "metrics": int(config["METRICS_PUBLIC_PORT"])}
    assert pod["metadata"]["annotations"]["prometheus.io/port"] == config["METRICS_PUBLIC_PORT"]
    for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
        assert container[probe]["httpGet"] == {"path": "/healthz", "port": "metrics"}
    # the recovery folder is on the pod's own volume
    claims = [c["metadata"]["name"] for c in sts["spec"]["volumeClaimTemplates"]]
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    assert claims == ["data"]
    for setting in ("WATERFLOW_RECOVERY_DIR", "WATERFLOW_OUT"):
        assert config[setting].startswith(mounts["data"] + "/")
    assert config["WATERFLOW_NETWORK"].startswith(mounts["network"] + "/")
    assert config["WATERFLOW_RUN_ID"]


def test_k8s_pods_run_locked_down():
    for spec in _pod_specs():
        assert spec["securityContext"]["runAsNonRoot"] is True
        assert spec["securityContext"]["runAsUser"] != 0
        assert spec["automountServiceAccountToken"] is False
        for c in spec["containers"]:
            ctx = c["securityContext"]
            assert ctx["allowPrivilegeEscalation"] is False and ctx["readOnlyRootFilesystem"]
            assert ctx["capabilities"]["drop"] == ["ALL"]
            assert c["resources"]["requests"] and c["resources"]["limits"]["memory"]
    # the Dockerfile's user is the one the pods run as
    uid = _pod_specs()[0]["securityContext"]["runAsUser"]
    assert f"USER {uid}:" in (REPO / "Dockerfile").read_text()


# -- Across both ---------------------------------------------------------------------------------


def _k8s_env_names() -> set[str]:
    names = set(_config_map())
    for spec in _pod_specs():
        for c in spec["containers"]:
            names |= {e["name"] for e in c.get("env", [])}
    return names


def _compose_env_names() -> set[str]:
    return {k for s in _compose()["services"].values()
            for k in s.get("environment", {}) if isinstance(s.get("environment"), dict)}


def test_every_setting_the_deploy_files_give_is_read_somewhere():
    readers = "\n".join(p.read_text() for p in READERS if p.is_file())
    manifests = "\n".join(p.read_text() for p in K8S.glob("*.yaml"))
    compose_names = {n for n in _compose_env_names() if n.startswith("WATERFLOW_")}
    k8s_names = _k8s_env_names()
    assert {"WATERFLOW_WARM_URL", "WATERFLOW_RECOVERY_DIR", "CLUSTER_ADDRESSES"} <= k8s_names
    unread = sorted(
        name for name in compose_names | k8s_names
        if not re.search(rf"\b{name}\b", readers) and f"$({name})" not in manifests)
    assert unread == [], "set by a deploy file, read by nothing: a typo?"
    # a $(NAME) in a manifest names a variable defined before it
    for spec in _pod_specs():
        for c in spec["containers"]:
            defined = set(_config_map()) if c.get("envFrom") else set()
            for e in c.get("env", []):
                for ref in re.findall(r"\$\((\w+)\)", e.get("value", "")):
                    assert ref in defined, f"{e['name']} uses $({ref}) before it is defined"
                defined.add(e["name"])


def test_no_secret_is_committed():
    tracked = subprocess.run(["git", "ls-files", ".env", "deploy/k8s"], cwd=REPO,
                             capture_output=True, text=True, check=True).stdout.split()
    assert ".env" not in tracked
    assert subprocess.run(["git", "check-ignore", "-q", ".env"], cwd=REPO).returncode == 0
    assert "deploy/k8s/secret.yaml" not in tracked
    secretish = re.compile(r"PASSWORD|SECRET|TOKEN|_KEY$")
    # compose: every password-like value and every URL's password is an interpolation
    for s in _raw_compose()["services"].values():
        for name, value in (s.get("environment") or {}).items():
            if secretish.search(name) and not name.endswith("_FILE"):
                assert re.fullmatch(r"\$\{\w+(:?[-?][^}]*)?\}", value), f"{name}={value}"
    for text in strings(_raw_compose()):
        for password in re.findall(r"://[^:/@\s]*:([^@\s]+)@", text):
            assert re.fullmatch(r"\$\{\w+(:?[-?][^}]*)?\}", password), text
    # k8s: passwords only from the Secret, whose committed example holds placeholders
    assert not [k for k in _config_map() if secretish.search(k)]
    for spec in _pod_specs():
        for c in spec["containers"]:
            for e in c.get("env", []):
                if secretish.search(e["name"]):
                    assert e["valueFrom"]["secretKeyRef"]["name"] == "waterflow-secrets"
                for password in re.findall(r"://[^:/@\s]*:([^@\s]+)@", e.get("value", "")):
                    assert re.fullmatch(r"\$\(\w+\)", password), e
    example = _k8s_kind("Secret")
    assert set(example["stringData"].values()) == {"CHANGE-ME"}
    needed = {e["valueFrom"]["secretKeyRef"]["key"] for spec in _pod_specs()
              for c in spec["containers"] for e in c.get("env", []) if "valueFrom" in e
              and "secretKeyRef" in e["valueFrom"]}
    assert needed == set(example["stringData"]) <= set(_env_example()[0])


def test_every_image_is_pinned():
    images = {f"compose {n}": s["image"] for n, s in _compose()["services"].items()}
    assert all("image" in s for s in _compose()["services"].values())
    for spec in _pod_specs():
        images |= {f"k8s {c['name']}": c["image"] for c in spec["containers"]}
    base = re.findall(r"^FROM (\S+)", (REPO / "Dockerfile").read_text(), re.M)
    images |= {f"Dockerfile FROM {i}": image for i, image in enumerate(base)}
    assert len(images) >= 14
    for where, image in images.items():
        assert PINNED.fullmatch(image) and ":latest" not in image, f"{where}: {image}"
    ours = {image for image in images.values() if image.startswith("waterflow:")}
    assert ours == {f"waterflow:{_project_version()}"}


# -- The container scripts -----------------------------------------------------------------------


def _member(tmp_path: Path, **env: str) -> subprocess.CompletedProcess[str]:
    """deploy/container/member.sh with a stand-in ``waterflow`` that prints its arguments."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    stand_in = bin_dir / "waterflow"
    stand_in.write_text(
        '#!/bin/sh\necho "waterflow $*"\n'
        'echo "metrics ${WATERFLOW_METRICS_ADDR-}:${WATERFLOW_METRICS_PORT-}" >&2\n')
    stand_in.chmod(0o755)
    base = {"PATH": f"{bin_dir}:{Path(sys.executable).parent}:/usr/bin:/bin",
            "HOME": str(tmp_path), "WATERFLOW_RUN_ID": "test-run",
            "WATERFLOW_RECOVERY_DIR": str(tmp_path / "recovery"),
            "CLUSTER_ADDRESSES": "waterflow-0.c:2101;waterflow-1.c:2101"}
    return subprocess.run(["sh", str(MEMBER), "--until-end"], env=base | env,
                          capture_output=True, text=True, timeout=60)


def test_member_keeps_its_share_of_the_recovery_partitions(tmp_path):
    # the ordinal of the host name (a StatefulSet pod) is the process's index
    run = _member(tmp_path, HOSTNAME="waterflow-1", RECOVERY_PARTITIONS="5")
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == (
        "waterflow run -i 1 -a waterflow-0.c:2101;waterflow-1.c:2101 -w 1 --until-end")
    parts = sorted(p.name for p in (tmp_path / "recovery").iterdir())
    assert parts == ["part-1.sqlite3", "part-3.sqlite3"]
    # process 0 of the same cluster holds the others: together, each partition once
    other = tmp_path / "other"
    run = _member(tmp_path, PROCESS_ID="0", RECOVERY_PARTITIONS="5",
                  WATERFLOW_RECOVERY_DIR=str(other), WORKERS="2")
    assert run.returncode == 0, run.stderr
    assert run.stdout.startswith("waterflow run -i 0 ") and " -w 2 " in run.stdout
    assert sorted(p.name for p in other.iterdir()) == [
        "part-0.sqlite3", "part-2.sqlite3", "part-4.sqlite3"]
    # a restart finds its partitions and leaves them alone
    before = {p.name: p.stat().st_mtime_ns for p in other.iterdir()}
    assert _member(tmp_path, PROCESS_ID="0", RECOVERY_PARTITIONS="5",
                   WATERFLOW_RECOVERY_DIR=str(other)).returncode == 0
    assert {p.name: p.stat().st_mtime_ns for p in other.iterdir()} == before


@pytest.mark.parametrize(("env", "message"), [
    ({"PROCESS_ID": "2"}, "PROCESS_ID 2 is not an index of CLUSTER_ADDRESSES (2 processes)"),
    ({"PROCESS_ID": "one"}, "PROCESS_ID must be a whole number, got 'one'"),
    ({"PROCESS_ID": "0", "RECOVERY_PARTITIONS": "1"}, "RECOVERY_PARTITIONS (1) must be at least"),
    ({"PROCESS_ID": "0", "WATERFLOW_RUN_ID": ""}, "WATERFLOW_RUN_ID must be set"),
    ({"PROCESS_ID": "0", "METRICS_PUBLIC_PORT": "9190", "WATERFLOW_METRICS_PORT": "9108"},
     "set only one"),
    ({"PROCESS_ID": "0", "METRICS_PUBLIC_PORT": "91x"}, "METRICS_PUBLIC_PORT must be a whole"),
    ({"PROCESS_ID": "0", "METRICS_PUBLIC_PORT": "70000"}, "must be a port number"),
])
def test_member_refuses_an_inconsistent_cluster(tmp_path, env, message):
    run = _member(tmp_path, **env)
    assert run.returncode != 0 and message in run.stderr
    assert "waterflow run" not in run.stdout
    assert not (tmp_path / "recovery").exists(), "checked before anything is created"


def test_member_serves_metrics_on_the_public_port_whatever_its_index(tmp_path):
    # `waterflow run` serves on WATERFLOW_METRICS_PORT + index: every pod gets the same port,
    # on the address the deploy files give (no forwarder in the container)
    for index in ("0", "1"):
        run = _member(tmp_path, PROCESS_ID=index, METRICS_PUBLIC_PORT="9190",
                      WATERFLOW_METRICS_ADDR="0.0.0.0")
        assert run.returncode == 0, run.stderr
        assert f"metrics 0.0.0.0:{9190 - int(index)}" in run.stderr.splitlines()
    assert "metrics :" in _member(tmp_path, PROCESS_ID="0").stderr  # no port: no server
    for env in (_compose_env_names(), set(_config_map())):
        assert {"WATERFLOW_METRICS_ADDR", "METRICS_PUBLIC_PORT"} <= env
        assert "WATERFLOW_METRICS_PORT" not in env
    assert "socat" not in MEMBER.read_text() + (REPO / "Dockerfile").read_text()


def test_set_role_passwords_names_what_is_missing():
    env = {k: v for k, v in os.environ.items() if not k.startswith("WATERFLOW_")}
    env["WATERFLOW_WRITER_PASSWORD"] = "s3cret-writer"
    run = subprocess.run([sys.executable, str(SET_PASSWORDS)], env=env, capture_output=True,
                         text=True, timeout=30)
    assert run.returncode == 2
    assert run.stderr == "error: WATERFLOW_WARM_URL, WATERFLOW_READER_PASSWORD not set\n"
    assert "s3cret" not in run.stdout + run.stderr
