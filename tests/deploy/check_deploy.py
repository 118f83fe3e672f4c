#!/usr/bin/env python3
"""Structural checks of the deployment files that no validator covers: the compose file (every
image pinned, every host port on loopback, every file it mounts or builds from exists in the
repository), the ServiceMonitor (a CRD kubernetes-validate does not know), the wiring between
the Kubernetes objects, and the systemd unit's sandboxing. Prints one line per problem; exits 1
when there is any."""
import configparser
import os
import sys

import yaml

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
problems = []


def check(cond, msg):
    if not cond:
        problems.append(msg)


def load(rel):
    with open(os.path.join(ROOT, rel)) as f:
        return yaml.safe_load(f)


# --- compose ---
compose_dir = os.path.join(ROOT, "deploy/compose")
compose = load("deploy/compose/compose.yaml")
services = compose.get("services", {})
for name in ["gateway", "synapse", "op", "prometheus", "grafana"]:
    check(name in services, f"compose: service {name} missing")
for name, svc in services.items():
    image = svc.get("image", "")
    check(image and ":" in image and not image.endswith(":latest"), f"compose: {name}: image {image!r} not pinned")
    for port in svc.get("ports", []):
        check(str(port).startswith("127.0.0.1:"), f"compose: {name}: port {port} not bound to loopback")
    for vol in svc.get("volumes", []):
        source = str(vol).split(":")[0]
        if source.startswith(".") or source.startswith("/"):
            path = os.path.normpath(os.path.join(compose_dir, source))
            check(os.path.exists(path), f"compose: {name}: mounted {source} does not exist")
    build = svc.get("build")
    if build:
        ctx = os.path.normpath(os.path.join(compose_dir, build["context"]))
        check(os.path.isdir(ctx), f"compose: {name}: build context missing")
        check(os.path.isfile(os.path.join(ctx, build["dockerfile"])), f"compose: {name}: dockerfile missing")
for name, secret in compose.get("secrets", {}).items():
    check(os.path.isfile(os.path.join(compose_dir, secret["file"])), f"compose: secret {name} file missing")
check("gateway:9090" in open(os.path.join(ROOT, "deploy/prometheus/prometheus.yml")).read(),
      "prometheus.yml does not scrape the gateway's admin listener")

# --- kubernetes wiring ---
deployment = load("deploy/kubernetes/deployment.yaml")
service = load("deploy/kubernetes/service.yaml")
monitor = load("deploy/kubernetes/servicemonitor.yaml")
hpa = load("deploy/kubernetes/hpa.yaml")
pdb = load("deploy/kubernetes/pdb.yaml")
pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
container = deployment["spec"]["template"]["spec"]["containers"][0]
container_ports = {p["name"] for p in container["ports"]}
check(container["livenessProbe"]["httpGet"]["path"] == "/healthz", "liveness probe is not /healthz")
check(container["readinessProbe"]["httpGet"]["path"] == "/readyz", "readiness probe is not /readyz")
check(container["readinessProbe"]["httpGet"]["port"] in container_ports, "readiness probe port is not a container port")
check("requests" in container.get("resources", {}), "no resource requests")
check(all(pod_labels.get(k) == v for k, v in service["spec"]["selector"].items()), "the Service does not select the pods")
check(all(pod_labels.get(k) == v for k, v in pdb["spec"]["selector"]["matchLabels"].items()), "the PDB does not select the pods")
check(hpa["spec"]["scaleTargetRef"]["name"] == deployment["metadata"]["name"], "the HPA does not target the Deployment")
service_ports = {p["name"] for p in service["spec"]["ports"]}
check(monitor.get("apiVersion") == "monitoring.coreos.com/v1", "ServiceMonitor apiVersion")
check(monitor.get("kind") == "ServiceMonitor", "ServiceMonitor kind")
check(all(service["metadata"]["labels"].get(k) == v for k, v in monitor["spec"]["selector"]["matchLabels"].items()),
      "the ServiceMonitor does not select the Service")
for ep in monitor["spec"]["endpoints"]:
    check(ep.get("port") in service_ports, f"ServiceMonitor endpoint port {ep.get('port')} is not a Service port")
    check(ep.get("path", "/metrics") == "/metrics", "ServiceMonitor path is not /metrics")
secret_names = {v["secret"]["secretName"] for v in deployment["spec"]["template"]["spec"]["volumes"] if "secret" in v}
check(load("deploy/kubernetes/secret.example.yaml")["metadata"]["name"] in secret_names, "the Deployment does not mount the Secret")

# --- systemd ---
unit = configparser.ConfigParser(strict=False, interpolation=None)
unit.optionxform = str
unit.read(os.path.join(ROOT, "deploy/systemd/matrix-oidc-gateway.service"))
for section in ["Unit", "Service", "Install"]:
    check(unit.has_section(section), f"systemd: [{section}] missing")
svc = unit["Service"] if unit.has_section("Service") else {}
for key, want in [("NoNewPrivileges", "yes"), ("ProtectSystem", "strict"), ("ProtectHome", "yes"),
                  ("PrivateTmp", "yes"), ("DynamicUser", "yes"), ("RestrictNamespaces", "yes")]:
    check(svc.get(key) == want, f"systemd: {key}={want} missing")
check("--config" in svc.get("ExecStart", ""), "systemd: ExecStart has no --config")
# Graceful upgrade: the reloaded process announces itself (MAINPID=) from outside the main pid.
check(svc.get("Type") == "notify" and svc.get("NotifyAccess") == "all",
      "systemd: the reload needs Type=notify and NotifyAccess=all")
check("--reload" in svc.get("ExecReload", ""), "systemd: ExecReload does not run --reload")
runtime = "/run/" + svc.get("RuntimeDirectory", "?")
check(f"MATRIX_OIDC_GATEWAY__LISTEN__RUNTIME_DIR={runtime}" in svc.get("Environment", ""),
      "systemd: listen.runtime_dir is not the unit's RuntimeDirectory")
check(svc.get("RuntimeDirectoryMode") == "0700", "systemd: RuntimeDirectoryMode is not 0700")

# --- Kubernetes stop timing: preStop sleep + shutdown_grace (35 s) inside the termination grace ---
pod = deployment["spec"]["template"]["spec"]
gw = pod["containers"][0]
pre_stop = gw.get("lifecycle", {}).get("preStop", {}).get("sleep", {}).get("seconds", 0)
check(pre_stop >= 1, "Deployment: no preStop sleep (new connections reach a terminating pod)")
check(pod.get("terminationGracePeriodSeconds", 30) > pre_stop + 35,
      "Deployment: terminationGracePeriodSeconds does not exceed preStop + shutdown_grace")

for p in problems:
    print(p)
sys.exit(1 if problems else 0)
