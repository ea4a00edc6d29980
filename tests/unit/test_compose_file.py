"""docker-compose.yml, .env.example and the Dockerfile checked offline: docker-compose 1.29 accepts the file and
refuses it without each secret; the resolved configuration has the start-up order, health checks, privileges,
per-service database URLs, overridable images and the Grafana profile the deployment promises
(docs/contract.md#reliability R6, #deployment-and-observability). tests/deploy/test_compose.py brings the same file
up for real."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest
import yaml
from yarl import URL

from services.binding.watcher_users import watcher_user
from shared.db import database_address
from shared.events import DEFAULT_SEGMENT

ROOT = Path(__file__).resolve().parents[2]
COMPOSE_FILE = ROOT / "docker-compose.yml"
HA_COMPOSE_FILE = ROOT / "docker-compose.ha.yml"  # the ha profile's wiring
SECRETS = {
    "HAVIP_POSTGRES_PASSWORD": "pg-secret",
    "HAVIP_RABBITMQ_PASSWORD": "amqp-secret",
    "HAVIP_RABBITMQ_MIGRATE_PASSWORD": "amqp-migrate-secret",
    "HAVIP_RABBITMQ_ALLOCATOR_PASSWORD": "amqp-allocator-secret",
    "HAVIP_RABBITMQ_BINDING_PASSWORD": "amqp-binding-secret",
    "HAVIP_RABBITMQ_WATCHER_PASSWORD": "amqp-watcher-secret",
    "HAVIP_API_TOKEN": "api-token-0123456789",
    "HAVIP_GRAFANA_ADMIN_PASSWORD": "grafana-secret",
    "HAVIP_GRAFANA_DATABASE_PASSWORD": "grafana-db-secret",
}
REQUIRED = {**SECRETS, "HAVIP_INTERFACE": "eth0"}
ALLOCATORS = ("allocator", "allocator-2")
BINDINGS = ("binding", "binding-2")
HAVIP_SERVICES = ("migrate", *ALLOCATORS, *BINDINGS, "arp_watcher")
BALANCER = "api"
BROKER_USERS = "rabbitmq-users"  # the one-shot that makes the processes' broker users
# Each HAVIP service's broker user (scripts/rabbitmq-users.sh) and the secret of its password.
AMQP_USERS = {
    "migrate": ("havip-migrate", "HAVIP_RABBITMQ_MIGRATE_PASSWORD"),
    **dict.fromkeys(ALLOCATORS, ("havip-allocator", "HAVIP_RABBITMQ_ALLOCATOR_PASSWORD")),
    **dict.fromkeys(BINDINGS, ("havip-binding", "HAVIP_RABBITMQ_BINDING_PASSWORD")),
    "arp_watcher": (f"havip-watcher-{DEFAULT_SEGMENT}", "HAVIP_RABBITMQ_WATCHER_PASSWORD"),
}
HAPROXY_CONFIG = ROOT / "deploy/haproxy/haproxy.cfg"
# The ha profile's engines, in place of rabbitmq and postgres.
RABBITMQ_NODES = ("rabbitmq-1", "rabbitmq-2", "rabbitmq-3")
POSTGRES_NODES = ("pg-1", "pg-2")
HA_ENGINES = (*RABBITMQ_NODES, "pg-monitor", *POSTGRES_NODES)
HA_SECRET = "HAVIP_RABBITMQ_ERLANG_COOKIE"
LONG_RUNNING = (
    "postgres",
    "rabbitmq",
    *ALLOCATORS,
    BALANCER,
    *BINDINGS,
    "arp_watcher",
    "prometheus",
    "grafana",
)


def compose_config(tmp_path: Path, env: dict[str, str], ha: bool = False) -> subprocess.CompletedProcess[str]:
    """`docker-compose config` with exactly `env` as its variables (an env file of its own: never a .env lying
    in the checkout, nor the caller's HAVIP_* variables); with `ha`, docker-compose.ha.yml and the ha profile."""
    executable = shutil.which("docker-compose")
    assert executable is not None, "docker-compose not found: install the Debian package (scripts/setup.sh)"
    env_file = tmp_path / "compose.env"
    env_file.write_text("".join(f"{k}={v}\n" for k, v in env.items()), encoding="utf-8")
    clean = {"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": str(tmp_path)}
    files = ["-f", str(COMPOSE_FILE)]
    if ha:
        clean["COMPOSE_PROFILES"] = "ha"
        files += ["-f", str(HA_COMPOSE_FILE)]
    return subprocess.run(
        [executable, *files, "--env-file", str(env_file), "config"],
        env=clean,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def resolved(tmp_path: Path, **extra: str) -> dict[str, Any]:
    result = compose_config(tmp_path, {**REQUIRED, **extra})
    assert result.returncode == 0, result.stderr
    config: dict[str, Any] = yaml.safe_load(result.stdout)
    return config


def bind_mounts(service: dict[str, Any]) -> dict[str, str]:
    """Target -> source of a service's volumes (docker-compose 1.29 prints them as "source:target:mode")."""
    mounts = {}
    for volume in service["volumes"]:
        source, target, _mode = volume.split(":")
        mounts[target] = source
    return mounts


def targets_of(scrape: dict[str, Any]) -> list[tuple[str, str]]:
    """(job, target) of every scrape target of a Prometheus configuration."""
    return [
        (job["job_name"], target)
        for job in scrape["scrape_configs"]
        for c in job["static_configs"]
        for target in c["targets"]
    ]


def haproxy_config() -> dict[str, list[str]]:
    """deploy/haproxy/haproxy.cfg as its sections ("backend allocators", …) and their lines, comments left out."""
    sections: dict[str, list[str]] = {}
    current: list[str] = []
    for raw in HAPROXY_CONFIG.read_text(encoding="utf-8").splitlines():
        line = raw.split("#", 1)[0].rstrip()
        if not line:
            continue
        if not line[0].isspace():
            current = sections.setdefault(line, [])
        else:
            current.append(" ".join(line.split()))
    return sections


@pytest.fixture(scope="module")
def config(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    return resolved(tmp_path_factory.mktemp("compose"))


@pytest.mark.parametrize("variable", sorted(REQUIRED))
def test_the_stack_refuses_to_start_without_each_secret(tmp_path: Path, variable: str) -> None:
    result = compose_config(tmp_path, {k: v for k, v in REQUIRED.items() if k != variable})
    assert result.returncode != 0
    assert variable in result.stderr


def test_an_empty_secret_is_no_secret(tmp_path: Path) -> None:
    result = compose_config(tmp_path, {**REQUIRED, "HAVIP_API_TOKEN": ""})
    assert result.returncode != 0
    assert "HAVIP_API_TOKEN" in result.stderr


def test_the_services_and_the_grafana_profile(config: dict[str, Any]) -> None:
    services = config["services"]
    assert set(services) == {
        *HAVIP_SERVICES, BALANCER, BROKER_USERS, "postgres", "rabbitmq", "prometheus", "grafana", *HA_ENGINES
    }  # fmt: skip
    assert {name for name, s in services.items() if s.get("profiles")} == {"grafana", *HA_ENGINES}
    assert services["grafana"]["profiles"] == ["grafana"]
    for name in HA_ENGINES:  # off unless the ha profile is on
        assert services[name]["profiles"] == ["ha"], name


def test_start_up_order(config: dict[str, Any]) -> None:
    services = config["services"]
    healthy = {"condition": "service_healthy"}
    completed = {"condition": "service_completed_successfully"}
    assert services[BROKER_USERS]["depends_on"] == {"rabbitmq": healthy}
    assert services["migrate"]["depends_on"] == {"postgres": healthy, BROKER_USERS: completed}
    for name in (*ALLOCATORS, *BINDINGS, "arp_watcher"):
        assert services[name]["depends_on"] == {"migrate": {"condition": "service_completed_successfully"}}
    started = {"condition": "service_started"}
    assert services[BALANCER]["depends_on"] == dict.fromkeys(ALLOCATORS, started)
    assert services["grafana"]["depends_on"] == {"prometheus": healthy, "postgres": healthy}
    assert services["migrate"]["restart"] == services[BROKER_USERS]["restart"] == "no"


def test_every_long_running_service_has_a_health_check_podman_can_run(config: dict[str, Any]) -> None:
    for name in LONG_RUNNING:
        test = config["services"][name]["healthcheck"]["test"]
        assert test[0] in ("CMD", "CMD-SHELL"), name
        if test[0] == "CMD":
            # podman's Docker API splits CMD arguments at spaces (podman#26519): a shell command then.
            assert not any(re.search(r"\s", arg) for arg in test[1:]), (name, test)
        else:
            assert len(test) == 2, (name, test)


def test_the_watcher_is_on_the_host_network_with_net_raw_alone(config: dict[str, Any]) -> None:
    watcher = config["services"]["arp_watcher"]
    assert watcher["network_mode"] == "host"
    assert watcher["cap_drop"] == ["ALL"]
    assert watcher["cap_add"] == ["NET_RAW"]
    assert watcher["environment"]["HAVIP_INTERFACE"] == "eth0"
    assert watcher["environment"]["HAVIP_SEGMENT"] == DEFAULT_SEGMENT
    assert "ports" not in watcher


def test_the_services_run_from_one_image_without_privileges(config: dict[str, Any]) -> None:
    services = config["services"]
    assert len({services[name]["image"] for name in HAVIP_SERVICES}) == 1
    for name in HAVIP_SERVICES:
        service = services[name]
        assert service["build"]["context"] == str(ROOT), name
        assert service["cap_drop"] == ["ALL"], name
        assert service["read_only"] is True, name
        assert "no-new-privileges:true" in service["security_opt"], name
        assert service.get("privileged") is not True, name
    commands = {name: services[name]["command"] for name in HAVIP_SERVICES}
    assert commands["allocator"] == commands["allocator-2"] == ["python", "-m", "services.allocator"]
    assert commands["binding"] == commands["binding-2"] == ["python", "-m", "services.binding"]
    assert commands["arp_watcher"] == ["python", "-m", "services.arp_watcher"]
    assert "services.allocator migrate" in commands["migrate"][-1]
    assert "services.binding migrate" in commands["migrate"][-1]


def test_each_service_reads_its_own_database_url(tmp_path: Path) -> None:
    urls = {
        "migrate": "postgresql://owner:pw@postgres:5432/havip",
        "allocator": "postgresql://allocator:pw@postgres:5432/havip",
        "binding": "postgresql://binding:pw@postgres:5432/havip",
    }
    config = resolved(tmp_path, **{f"HAVIP_{name.upper()}_DATABASE_URL": url for name, url in urls.items()})
    for name, url in urls.items():
        assert config["services"][name]["environment"]["HAVIP_DATABASE_URL"] == url
    assert config["services"]["allocator-2"]["environment"]["HAVIP_DATABASE_URL"] == urls["allocator"]
    assert config["services"]["binding-2"]["environment"]["HAVIP_DATABASE_URL"] == urls["binding"]
    assert "HAVIP_DATABASE_URL" not in config["services"]["arp_watcher"]["environment"]


def test_secrets_reach_the_services_only_from_the_environment(config: dict[str, Any]) -> None:
    services = config["services"]
    assert services["postgres"]["environment"]["POSTGRES_PASSWORD"] == SECRETS["HAVIP_POSTGRES_PASSWORD"]
    assert services["rabbitmq"]["environment"]["RABBITMQ_DEFAULT_PASS"] == SECRETS["HAVIP_RABBITMQ_PASSWORD"]
    for name in ALLOCATORS:
        assert services[name]["environment"]["HAVIP_API_TOKEN"] == SECRETS["HAVIP_API_TOKEN"], name
    assert (
        services["grafana"]["environment"]["GF_SECURITY_ADMIN_PASSWORD"] == SECRETS["HAVIP_GRAFANA_ADMIN_PASSWORD"]
    )
    for name in HAVIP_SERVICES:  # each as its own broker user; the administrator's password nowhere
        user, password = AMQP_USERS[name]
        url = URL(services[name]["environment"]["HAVIP_AMQP_URL"])
        assert (url.user, url.password) == (user, SECRETS[password]), name
    for password in ("HAVIP_RABBITMQ_MIGRATE_PASSWORD", "HAVIP_RABBITMQ_ALLOCATOR_PASSWORD",
                     "HAVIP_RABBITMQ_BINDING_PASSWORD", "HAVIP_RABBITMQ_WATCHER_PASSWORD"):  # fmt: skip
        assert services[BROKER_USERS]["environment"][password] == SECRETS[password], password
    # No default for a secret anywhere in the file: ${VAR:?…} for each, never ${VAR:-…}.
    text = COMPOSE_FILE.read_text(encoding="utf-8")
    for variable in SECRETS:
        assert f"${{{variable}:-" not in text, variable
        assert f"${{{variable}}}" not in text, variable
        assert f"${{{variable}:?" in text, variable


def test_images_are_the_official_names_and_overridable(tmp_path: Path, config: dict[str, Any]) -> None:
    defaults = {name: s["image"] for name, s in config["services"].items()}
    assert defaults["postgres"].startswith("postgres:")
    assert defaults["rabbitmq"].startswith("rabbitmq:")
    assert defaults["prometheus"].startswith("prom/prometheus:")
    assert defaults["grafana"].startswith("grafana/grafana:")
    assert defaults[BALANCER].startswith("haproxy:")
    assert config["services"]["migrate"]["build"]["args"]["PYTHON_IMAGE"].startswith("python:3.11")
    variables = {
        "postgres": "HAVIP_POSTGRES_IMAGE",
        "rabbitmq": "HAVIP_RABBITMQ_IMAGE",
        "prometheus": "HAVIP_PROMETHEUS_IMAGE",
        "grafana": "HAVIP_GRAFANA_IMAGE",
        "allocator": "HAVIP_IMAGE",
        "allocator-2": "HAVIP_IMAGE",
        "binding": "HAVIP_IMAGE",
        "binding-2": "HAVIP_IMAGE",
        BALANCER: "HAVIP_HAPROXY_IMAGE",
    }
    images = {variable: f"registry.example/{variable.lower()}:1" for variable in variables.values()}
    overridden = resolved(tmp_path, **images)
    for service, variable in variables.items():
        assert overridden["services"][service]["image"] == images[variable], service
    # The broker users are made with the broker's own rabbitmqctl.
    assert defaults[BROKER_USERS] == defaults["rabbitmq"]
    assert overridden["services"][BROKER_USERS]["image"] == images["HAVIP_RABBITMQ_IMAGE"]


def test_prometheus_reaches_every_target_of_its_configuration(config: dict[str, Any]) -> None:
    prometheus = config["services"]["prometheus"]
    scrape = yaml.safe_load((ROOT / "deploy/prometheus/prometheus.yml").read_text(encoding="utf-8"))
    extra_hosts = {entry.split(":", 1)[0] for entry in prometheus["extra_hosts"]}
    for job, target in targets_of(scrape):
        host, port = target.rsplit(":", 1)
        if host in extra_hosts:  # the watcher, on the host network
            assert config["services"][job]["network_mode"] == "host"
            assert config["services"][job]["environment"]["HAVIP_METRICS_PORT"] == port
        else:
            assert host == job or host.startswith(f"{job}-"), target  # a service of the job, or a replica of it
            assert host in config["services"], target
    allocator_targets = {target for job, target in targets_of(scrape) if job == "allocator"}
    assert allocator_targets == {f"{name}:8080" for name in ALLOCATORS}  # each replica, not the balancer
    binding_targets = {target for job, target in targets_of(scrape) if job == "binding"}
    ports = {config["services"][name]["environment"]["HAVIP_METRICS_PORT"] for name in BINDINGS}
    assert binding_targets == {f"{name}:{port}" for name in BINDINGS for port in ports}  # every replica
    assert prometheus["extra_hosts"] == ["host.docker.internal:host-gateway"]
    mounts = bind_mounts(prometheus)
    assert mounts["/etc/prometheus/prometheus.yml"] == str(ROOT / "deploy/prometheus/prometheus.yml")
    assert mounts["/etc/prometheus/rules"] == str(ROOT / "deploy/prometheus/rules")


def test_grafana_mounts_the_provisioning(config: dict[str, Any]) -> None:
    mounts = bind_mounts(config["services"]["grafana"])
    assert mounts["/etc/grafana/provisioning"] == str(ROOT / "deploy/grafana/provisioning")
    assert mounts["/var/lib/grafana/dashboards"] == str(ROOT / "deploy/grafana/dashboards")


def test_env_example_names_every_variable_and_no_secret() -> None:
    # ${VAR…} is compose's; $${VAR} is left to the container's shell.
    text = COMPOSE_FILE.read_text(encoding="utf-8") + HA_COMPOSE_FILE.read_text(encoding="utf-8")
    used = set(re.findall(r"(?<!\$)\$\{(\w+)", text))
    example = (ROOT / ".env.example").read_text(encoding="utf-8")
    named = set(re.findall(r"^#?(\w+)=", example, re.M))
    assert used - named == set(), "variables of docker-compose.yml that .env.example does not mention"
    for variable in SECRETS:
        assert re.search(rf"^{variable}=$", example, re.M), f"{variable} must be present and empty"


def test_dockerfile_final_stage_is_unprivileged_and_offline() -> None:
    text = (ROOT / "Dockerfile").read_text(encoding="utf-8")
    stages = re.split(r"^FROM ", text, flags=re.M)
    assert len(stages) == 3, "a builder stage and a final stage"
    builder, final = stages[1], stages[2]
    assert builder.startswith("${PYTHON_IMAGE} AS builder")
    assert final.startswith("${PYTHON_IMAGE}")
    assert "--no-index --find-links /wheels" in builder
    assert "--constraint requirements.lock" in builder
    assert re.search(r"^USER havip$", final, re.M)
    for tool in ("pip ", "apt-get", "gcc", "build-essential"):
        assert tool not in final, tool


def test_the_allocator_runs_as_two_identical_replicas_behind_the_balancer(config: dict[str, Any]) -> None:
    services = config["services"]
    first, second = (services[name] for name in ALLOCATORS)
    assert first == second  # one definition: a replica differs only by its name
    for name in ALLOCATORS:
        assert "ports" not in services[name], name  # reached through the balancer only
    balancer = services[BALANCER]
    assert balancer["ports"] == ["127.0.0.1:8080:8080/tcp"]  # the API's port (docker-compose 1.29's notation)
    assert balancer["cap_drop"] == ["ALL"]
    assert balancer["read_only"] is True
    assert "no-new-privileges:true" in balancer["security_opt"]
    assert bind_mounts(balancer)["/usr/local/etc/haproxy/haproxy.cfg"] == str(HAPROXY_CONFIG)


def test_the_balancer_sends_to_every_replica_that_answers_its_readiness_check(config: dict[str, Any]) -> None:
    from services.allocator.health import router as health_routes

    sections = haproxy_config()
    frontend = sections["frontend api"]
    backend = sections["backend allocators"]
    assert "bind :8080" in frontend  # the port the compose file publishes
    assert "default_backend allocators" in frontend
    servers = {line.split()[1]: line.split()[2] for line in backend if line.startswith("server ")}
    ports = {name: config["services"][name]["environment"]["HAVIP_PORT"] for name in ALLOCATORS}
    assert servers == {name: f"{name}:{ports[name]}" for name in ALLOCATORS}
    # Health-checked on the allocator's readiness route (its database and broker), every server.
    assert "option httpchk" in backend
    assert "http-check send meth GET uri /readyz" in backend
    assert "/readyz" in {route.path for route in health_routes.routes}  # type: ignore[attr-defined]
    assert "http-check expect status 200" in backend
    [defaults] = [line for line in backend if line.startswith("default-server ")]
    assert " check " in f"{defaults} "
    # The balancer's own health check asks its monitor URI, which fails when no replica is up.
    [monitor] = [line.split()[1] for line in frontend if line.startswith("monitor-uri ")]
    assert "monitor fail if { nbsrv(allocators) lt 1 }" in frontend
    test = config["services"][BALANCER]["healthcheck"]["test"]
    assert test[0] == "CMD-SHELL"
    assert f"GET {monitor} HTTP/1.0" in test[1]


def test_the_binding_runs_as_replicas_with_ids_of_their_own_and_one_partition_count(tmp_path: Path) -> None:
    config = resolved(tmp_path)
    services = config["services"]
    first, second = (services[name] for name in BINDINGS)
    # One definition: a replica differs only by its id, which is stable (not the container's host name).
    assert {k: v for k, v in first.items() if k != "environment"} == {
        k: v for k, v in second.items() if k != "environment"
    }
    environments = [dict(services[name]["environment"]) for name in BINDINGS]
    ids = [environment.pop("HAVIP_REPLICA_ID") for environment in environments]
    assert ids == list(BINDINGS)
    assert environments[0] == environments[1]
    for name in BINDINGS:
        assert "ports" not in services[name], name  # metrics inside the network only
    # The watcher computes a claim's partition with the same count; migrate declares that many partition queues.
    partitioned = (*BINDINGS, "arp_watcher", "migrate")
    assert {services[name]["environment"]["HAVIP_PARTITIONS"] for name in partitioned} == {"8"}
    overridden = resolved(tmp_path, HAVIP_PARTITIONS="16")["services"]
    assert {overridden[name]["environment"]["HAVIP_PARTITIONS"] for name in partitioned} == {"16"}


def test_each_process_logs_in_as_a_broker_user_the_one_shot_makes(tmp_path: Path) -> None:
    config = resolved(tmp_path, HAVIP_SEGMENT="edge-1")
    services = config["services"]
    users = services[BROKER_USERS]
    # The script, with the segment of the watcher, on the broker's default virtual host (the services' URLs').
    assert users["entrypoint"] == ["sh", "/usr/local/lib/havip/rabbitmq-users.sh"]
    assert users["command"] == ["--segment", "edge-1", "/"]
    assert "--node rabbit@rabbitmq" in users["environment"]["RABBITMQCTL"]
    assert services["rabbitmq"]["hostname"] == "rabbitmq"  # the node rabbitmqctl reaches: rabbit@rabbitmq
    mounts = dict(volume.split(":", 1) for volume in users["volumes"])
    assert mounts[str(ROOT / "scripts/rabbitmq-users.sh")] == "/usr/local/lib/havip/rabbitmq-users.sh:ro"
    # The node's cookie, from its data volume, read-only; and no privilege.
    [data] = [volume for volume in services["rabbitmq"]["volumes"] if volume.endswith(":/var/lib/rabbitmq:rw")]
    assert f"{data.split(':')[0]}:/var/lib/rabbitmq:ro" in users["volumes"]
    assert users["environment"]["HOME"] == "/var/lib/rabbitmq"
    assert users["cap_drop"] == ["ALL"]
    assert users["read_only"] is True
    assert users["user"] == "rabbitmq"
    for name in HAVIP_SERVICES:
        assert URL(services[name]["environment"]["HAVIP_AMQP_URL"]).path == "/", name
    # The watcher logs in as its segment's user, the one the binding replicas take that segment's claims from.
    watcher = URL(services["arp_watcher"]["environment"]["HAVIP_AMQP_URL"]).user
    assert watcher == "havip-watcher-edge-1"
    for name in BINDINGS:
        template = services[name]["environment"]["HAVIP_WATCHER_USER_TEMPLATE"]
        assert watcher_user(template, "edge-1") == watcher, name
    # The script makes exactly these users (its dry run: the same command, no broker).
    script_env = {k: v for k, v in users["environment"].items() if k.startswith("HAVIP_")}
    dry = subprocess.run(
        ["sh", str(ROOT / "scripts/rabbitmq-users.sh"), "--dry-run", *users["command"]],
        env={"PATH": "/usr/bin:/bin", **script_env}, capture_output=True, text=True, timeout=30, check=True,
    )  # fmt: skip
    made = {line.split()[2].strip("'") for line in dry.stdout.splitlines() if line.split()[1] == "'add_user'"}
    assert made == {URL(services[name]["environment"]["HAVIP_AMQP_URL"]).user for name in HAVIP_SERVICES}


# ---- the ha profile (docker-compose.yml's profile `ha` with docker-compose.ha.yml) ------------------------------


@pytest.fixture(scope="module")
def ha_config(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    result = compose_config(tmp_path_factory.mktemp("compose-ha"), {**REQUIRED, HA_SECRET: "cookie-0123"}, ha=True)
    assert result.returncode == 0, result.stderr
    config: dict[str, Any] = yaml.safe_load(result.stdout)
    return config


def test_the_ha_profile_refuses_to_start_without_the_erlang_cookie(tmp_path: Path) -> None:
    result = compose_config(tmp_path, REQUIRED, ha=True)
    assert result.returncode != 0
    assert HA_SECRET in result.stderr
    # Without the profile nobody needs it: the default stack is as it was.
    assert f"${{{HA_SECRET}" not in COMPOSE_FILE.read_text(encoding="utf-8")
    assert compose_config(tmp_path, REQUIRED).returncode == 0


def test_the_ha_profile_runs_a_broker_cluster_and_a_postgres_pair_in_place_of_one_each(
    ha_config: dict[str, Any],
) -> None:
    services = ha_config["services"]
    # Compose cannot remove a service in an override: scaled to 0, no container; depending on them is then met.
    assert services["rabbitmq"]["scale"] == services["postgres"]["scale"] == 0
    assert all(services[name].get("scale", 1) == 1 for name in (*HA_ENGINES, *HAVIP_SERVICES, BALANCER))
    for name in RABBITMQ_NODES:
        node = services[name]
        assert node["hostname"] == name  # rabbit@<name>, as cluster.conf lists them
        assert node["environment"][HA_SECRET] == "cookie-0123", name
        mounts = bind_mounts(node)
        assert mounts["/etc/rabbitmq/conf.d/20-havip-cluster.conf"] == str(ROOT / "deploy/rabbitmq/cluster.conf")
        assert mounts["/etc/rabbitmq/enabled_plugins"] == str(ROOT / "deploy/rabbitmq/enabled_plugins")
        assert mounts["/var/lib/rabbitmq"] == f"{name}-data", name  # a volume of its own
        assert node["entrypoint"] == ["sh", "/usr/local/lib/havip/cluster-node.sh"]
    published = {services[name]["ports"][0].split(":")[1] for name in RABBITMQ_NODES}
    assert published == {"5672", "5673", "5674"}
    conf = rabbitmq_cluster_conf()
    assert conf["cluster_formation.peer_discovery_backend"] == "classic_config"
    listed = {v for k, v in conf.items() if k.startswith("cluster_formation.classic_config.nodes.")}
    assert listed == {f"rabbit@{name}" for name in RABBITMQ_NODES}
    assert conf["net_ticktime"] == "10"
    assert "rabbitmq_prometheus" in (ROOT / "deploy/rabbitmq/enabled_plugins").read_text(encoding="utf-8")
    for name in ("pg-monitor", *POSTGRES_NODES):
        assert services[name]["hostname"] == name
        assert bind_mounts(services[name])["/var/lib/postgresql"] == f"{name}-data", name
    assert services["pg-monitor"]["command"] == ["monitor"]
    for name in POSTGRES_NODES:
        environment = services[name]["environment"]
        assert services[name]["command"] == ["node"]
        assert URL(environment["PG_AUTOCTL_MONITOR"]).host == "pg-monitor"
        assert environment["POSTGRES_PASSWORD"] == SECRETS["HAVIP_POSTGRES_PASSWORD"]
        assert services[name]["depends_on"] == {"pg-monitor": {"condition": "service_healthy"}}
        assert "ports" not in services[name]  # not published
    for name in HA_ENGINES:
        test = services[name]["healthcheck"]["test"]
        assert (test[0] == "CMD-SHELL" and len(test) == 2) or not any(" " in arg for arg in test[1:]), name


def rabbitmq_cluster_conf() -> dict[str, str]:
    """deploy/rabbitmq/cluster.conf, the ha profile's nodes' settings."""
    return dict(
        line.split(" = ", 1)
        for line in (ROOT / "deploy/rabbitmq/cluster.conf").read_text(encoding="utf-8").splitlines()
        if line and not line.startswith("#")
    )


def test_in_the_ha_profile_every_service_has_every_node(ha_config: dict[str, Any]) -> None:
    services = ha_config["services"]
    healthy = {"condition": "service_healthy"}
    for name in HAVIP_SERVICES:
        environment = services[name]["environment"]
        user, password = AMQP_USERS[name]
        urls = [URL(url) for url in environment["HAVIP_AMQP_URL"].split(",")]
        assert {(url.user, url.password, url.path) for url in urls} == {(user, SECRETS[password], "/")}, name
        if name == "arp_watcher":  # on the host network: the nodes' published ports
            assert [(url.host, url.port) for url in urls] == [("127.0.0.1", p) for p in (5672, 5673, 5674)]
            assert "HAVIP_DATABASE_URL" not in environment
        else:
            assert [(url.host, url.port) for url in urls] == [(node, 5672) for node in RABBITMQ_NODES], name
            database = environment["HAVIP_DATABASE_URL"]
            assert database_address(database).hosts == ("pg-1:5432", "pg-2:5432"), name
            assert parse_qs(urlsplit(database).query)["target_session_attrs"] == ["read-write"], name
        assert environment["HAVIP_AMQP_HEARTBEAT_S"] == "3", name
        assert environment["HAVIP_AMQP_NET_TICKTIME_S"] == rabbitmq_cluster_conf()["net_ticktime"], name
    for name in BINDINGS:
        assert URL(services[name]["environment"]["HAVIP_DATABASE_MONITOR_URL"]).host == "pg-monitor", name
    assert services[ALLOCATORS[0]] == services[ALLOCATORS[1]]
    # migrate waits for a primary with its synchronous standby (both nodes healthy) and for the broker users.
    assert services["migrate"]["depends_on"] == {
        "postgres": healthy, "pg-1": healthy, "pg-2": healthy,
        BROKER_USERS: {"condition": "service_completed_successfully"},
    }  # fmt: skip
    # The broker users are the cluster's: made through rabbitmq-1 with its cookie, once the three run as one.
    users = services[BROKER_USERS]
    assert users["depends_on"] == dict.fromkeys(("rabbitmq", *RABBITMQ_NODES), healthy)
    assert users["environment"]["RABBITMQCTL"] == "rabbitmqctl --node rabbit@rabbitmq-1"
    assert "rabbitmq-1-data:/var/lib/rabbitmq:ro" in users["volumes"]
    assert "await_online_nodes 3" in users["entrypoint"][2]
    assert "rabbitmq-users.sh" in users["entrypoint"][2]


def test_in_the_ha_profile_prometheus_scrapes_the_broker_nodes_too(ha_config: dict[str, Any]) -> None:
    prometheus = ha_config["services"]["prometheus"]
    ha = ROOT / "deploy/prometheus/prometheus-ha.yml"
    assert bind_mounts(prometheus)["/etc/prometheus/prometheus.yml"] == str(ha)
    scrape = yaml.safe_load(ha.read_text(encoding="utf-8"))
    single = yaml.safe_load((ROOT / "deploy/prometheus/prometheus.yml").read_text(encoding="utf-8"))
    # Each node twice: its aggregated metrics (alarms), and per object (the quorum-queue replicas it holds).
    assert set(targets_of(scrape)) == {
        *targets_of(single),
        *((job, f"{name}:15692") for name in RABBITMQ_NODES for job in ("rabbitmq", "rabbitmq_queues")),
    }  # fmt: skip
    paths = {job["job_name"]: job.get("metrics_path", "/metrics") for job in scrape["scrape_configs"]}
    assert (paths["rabbitmq"], paths["rabbitmq_queues"]) == ("/metrics", "/metrics/per-object")
    assert {k: v for k, v in scrape.items() if k != "scrape_configs"} == {
        k: v for k, v in single.items() if k != "scrape_configs"
    }
