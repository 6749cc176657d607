#!/usr/bin/env python3
"""Checks the deployment files in deploy/: every YAML and JSON file parses,
and the Kubernetes manifests, Prometheus configuration, Grafana dashboard and
systemd unit have what kvcached needs. Run from the repository root:

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
