#!/usr/bin/env python3
"""Checks the deployment files in deploy/: every YAML and JSON file parses,
and the Kubernetes manifests, Prometheus configuration, Grafana dashboard and
systemd unit have what kvcached needs. What is deployed is secure by
default: mutual TLS with certificates mounted from Secrets, callers
authenticated, metrics on loopback, etcd over TLS requiring client
certificates; only the single-host example config is plaintext, on
loopback. Run from the repository root:

    python3 deploy/check_deploy_files.py

Prints each problem and exits 1 if there is any.
"""
import configparser
import glob
import json
import re
import sys

import yaml

problems = []


def problem(path, message):
    problems.append(f"{path}: {message}")


def load_yaml(path):
    try:
        with open(path) as f:
            return [d for d in yaml.safe_load_all(f) if d is not None]
    except yaml.YAMLError as e:
        problem(path, f"not valid YAML: {e}")
        return []


def exported_metrics():
    """Metric names kvstore/prometheus_metrics.cc renders."""
    with open("kvstore/prometheus_metrics.cc") as f:
        source = f.read()
    names = set(re.findall(r'"(kvcache_[a-z_]+)"', source))
    names |= {f"kvcache_{n}_total"
              for n in re.findall(r'\{"([a-z_]+)", &node\.', source)}
    return names


def check_containers(path, doc):
    spec = doc["spec"]["template"]["spec"]
    for c in spec.get("containers", []):
        for field in ("name", "image"):
            if not c.get(field):
                problem(path, f"container without {field}")
        for arg in c.get("args", []) + c.get("command", []):
            if not isinstance(arg, str):
                problem(path, f"container {c.get('name')}: argument {arg!r} "
                        "is not a string (quote it)")
        hook = c.get("lifecycle", {}).get("preStop", {}).get("exec", {})
        for arg in hook.get("command", []):
            if not isinstance(arg, str):
                problem(path, f"preStop argument {arg!r} is not a string")


def check_secure_config(path, text):
    """A cluster node's kvcached config: TLS, mTLS, access, loopback metrics,
    etcd over TLS with a client certificate."""
    def section(name):
        m = re.search(r"\b" + name + r"\s*\{([^{}]*)\}", text)
        return m.group(1) if m else None
    tls = section("tls")
    if tls is None:
        problem(path, "no tls section: a cluster node must not serve "
                "plaintext")
    else:
        for field in ("cert_file:", "key_file:", "ca_file:",
                      "require_client_certificate: true"):
            if field not in tls:
                problem(path, f"tls section lacks {field}")
    if not re.search(r"\baccess\s*\{", text):
        problem(path, "no access section: every caller would act as admin")
    metrics = re.search(r'metrics_address:\s*"([^"]*)"', text)
    if metrics and metrics.group(1) and \
            not metrics.group(1).startswith("127.") and \
            "metrics_token_sha256" not in text:
        problem(path, f"metrics on {metrics.group(1)} without a token: keep "
                "them on 127.0.0.1")
    etcd_tls = section("etcd_tls")
    if etcd_tls is None or "ca_file:" not in etcd_tls or \
            "cert_file:" not in etcd_tls:
        problem(path, "cluster.etcd_tls lacks ca_file or cert_file: etcd "
                "must be reached over TLS with a client certificate")


def check_single_host_config():
    path = "deploy/kvcached.textproto"
    with open(path) as f:
        text = f.read()
    for field in ("listen_address", "metrics_address"):
        m = re.search(field + r':\s*"([^"]*)"', text)
        if m and m.group(1) and not m.group(1).startswith("127."):
            problem(path, f"{field} {m.group(1)}: the plaintext single-host "
                    "config stays on loopback")


def check_workload_security(path, name, doc):
    spec = doc["spec"]["template"]["spec"]
    secrets = {v["name"]: v["secret"].get("secretName")
               for v in spec.get("volumes", []) if "secret" in v}
    for c in spec.get("containers", []):
        mounts = {m["name"]: m["mountPath"] for m in c.get("volumeMounts", [])}
        mounted = {secrets[n]: mounts[n] for n in mounts if n in secrets}
        args = " ".join(a for a in c.get("args", []) + c.get("command", [])
                        if isinstance(a, str))
        if name == "etcd":
            if mounted.get("etcd-server-tls") is None:
                problem(path, "etcd does not mount the etcd-server-tls Secret")
            for flag in ("--client-cert-auth", "--trusted-ca-file=",
                         "--cert-file=", "--key-file=",
                         "--peer-client-cert-auth"):
                if flag not in args:
                    problem(path, f"etcd runs without {flag}")
            if "http://" in args:
                problem(path, "etcd has a plaintext (http://) URL")
            continue
        if mounted.get("kvcache-node-tls") != "/etc/kvcache/tls":
            problem(path, f"{name}: the kvcache-node-tls Secret is not "
                    "mounted at /etc/kvcache/tls (the ConfigMap's paths)")
        if mounted.get("kvcache-etcd-client") != "/etc/kvcache/etcd":
            problem(path, f"{name}: etcd's client certificate "
                    "(kvcache-etcd-client) is not mounted at /etc/kvcache/etcd")
        for probe in ("readinessProbe", "livenessProbe"):
            if "grpc" in c.get(probe, {}):
                problem(path, f"{name}: a grpc {probe} cannot speak TLS")
        if "0.0.0.0" in args:
            problem(path, f"{name}: binds 0.0.0.0 on the command line")
        if spec.get("hostNetwork") and "--listen=$(HOST_IP)" not in args:
            problem(path, f"{name}: with host networking, listen on the host "
                    "IP only (--listen=$(HOST_IP):50051)")
        for port in c.get("ports", []):
            if port.get("containerPort") == 9464:
                problem(path, f"{name}: exposes the metrics port, which "
                        "listens on loopback")
        hook = c.get("lifecycle", {}).get("preStop", {}).get("exec", {})
        hook_args = " ".join(a for a in hook.get("command", [])
                             if isinstance(a, str))
        if "kvcachectl" in hook_args:
            for flag in ("--ca=", "--cert=", "--key=", "--etcd_ca=",
                         "--etcd_cert=", "--etcd_key="):
                if flag not in hook_args:
                    problem(path, f"{name}: preStop kvcachectl without {flag}")


def check_kubernetes():
    kinds = {}
    for path in sorted(glob.glob("deploy/k8s/*.yaml")):
        for doc in load_yaml(path):
            for field in ("apiVersion", "kind", "metadata"):
                if field not in doc:
                    problem(path, f"document without {field}")
            if "kind" not in doc or "metadata" not in doc:
                continue
            name = doc["metadata"].get("name")
            if not name:
                problem(path, f"{doc['kind']} without metadata.name")
            kinds.setdefault(doc["kind"], {})[name] = (path, doc)
            if doc["kind"] in ("StatefulSet", "DaemonSet", "Deployment"):
                selector = doc["spec"]["selector"]["matchLabels"]
                labels = doc["spec"]["template"]["metadata"]["labels"]
                if any(labels.get(k) != v for k, v in selector.items()):
                    problem(path, f"{name}: selector does not match the "
                            "pod labels")
                check_containers(path, doc)
    for kind, name in [("StatefulSet", "kvcached"),
                       ("DaemonSet", "kvcached-local"),
                       ("Service", "kvcached"), ("ConfigMap", "kvcached-config"),
                       ("StatefulSet", "etcd"), ("Service", "etcd")]:
        if name not in kinds.get(kind, {}):
            problem("deploy/k8s", f"no {kind} named {name}")
    config = kinds.get("ConfigMap", {}).get("kvcached-config")
    if config:
        text = config[1].get("data", {}).get("kvcached.textproto", "")
        for needed in ("cluster {", "etcd_endpoints:", "listen_address:",
                       "metrics_address:"):
            if needed not in text:
                problem(config[0], f"kvcached.textproto lacks {needed}")
        check_secure_config(config[0], text)
    for kind, name in [("StatefulSet", "kvcached"),
                       ("DaemonSet", "kvcached-local"),
                       ("StatefulSet", "etcd")]:
        if name in kinds.get(kind, {}):
            path, doc = kinds[kind][name]
            check_workload_security(path, name, doc)
    storage = kinds.get("StatefulSet", {}).get("kvcached")
    if storage:
        service = storage[1]["spec"].get("serviceName")
        if service not in kinds.get("Service", {}):
            problem(storage[0], f"serviceName {service} is not a Service")
        if not storage[1]["spec"].get("volumeClaimTemplates"):
            problem(storage[0], "storage nodes have no volumeClaimTemplates")


def check_prometheus():
    path = "deploy/prometheus/prometheus.yml"
    docs = load_yaml(path)
    if len(docs) != 1 or not docs[0].get("scrape_configs"):
        problem(path, "no scrape_configs")
        return
    for job in docs[0]["scrape_configs"]:
        if not job.get("job_name"):
            problem(path, "scrape config without job_name")
        if job.get("metrics_path", "/metrics") != "/metrics":
            problem(path, f"{job.get('job_name')}: kvcached serves /metrics")


def check_grafana():
    metrics = exported_metrics()
    for path in sorted(glob.glob("deploy/grafana/*.json")):
        try:
            with open(path) as f:
                dashboard = json.load(f)
        except ValueError as e:
            problem(path, f"not valid JSON: {e}")
            continue
        for field in ("uid", "title", "panels"):
            if field not in dashboard:
                problem(path, f"dashboard without {field}")
        ids = [p.get("id") for p in dashboard.get("panels", [])]
        if len(ids) != len(set(ids)):
            problem(path, "panel ids repeat")
        for panel in dashboard.get("panels", []):
            if not panel.get("targets"):
                problem(path, f"panel {panel.get('title')} has no queries")
            for target in panel.get("targets", []):
                for name in re.findall(r"kvcache_[a-z_]+", target["expr"]):
                    base = re.sub(r"_(bucket|sum|count)$", "", name)
                    if name not in metrics and base not in metrics:
                        problem(path, f"panel {panel.get('title')}: {name} "
                                "is not a metric kvcached exports")


def check_other_json():
    for path in glob.glob("deploy/**/*.json", recursive=True):
        if path.startswith("deploy/grafana/"):
            continue
        try:
            with open(path) as f:
                json.load(f)
        except ValueError as e:
            problem(path, f"not valid JSON: {e}")


def check_systemd():
    path = "deploy/systemd/kvcached.service"
    unit = configparser.ConfigParser(strict=False, interpolation=None)
    unit.optionxform = str
    try:
        unit.read(path)
    except configparser.Error as e:
        problem(path, f"not a valid unit file: {e}")
        return
    for section in ("Unit", "Service", "Install"):
        if section not in unit:
            problem(path, f"no [{section}] section")
    if "kvcached" not in unit.get("Service", "ExecStart", fallback=""):
        problem(path, "ExecStart does not run kvcached")


def main():
    for path in glob.glob("deploy/**/*.y*ml", recursive=True):
        load_yaml(path)
    check_kubernetes()
    with open("deploy/kvcached-cluster.textproto") as f:
        check_secure_config("deploy/kvcached-cluster.textproto", f.read())
    check_single_host_config()
    check_prometheus()
    check_grafana()
    check_other_json()
    check_systemd()
    for p in problems:
        print(p)
    print(f"deploy files: {len(problems)} problems")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
