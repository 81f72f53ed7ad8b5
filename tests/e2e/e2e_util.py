"""Shared by the end-to-end tests: starting processes that announce readiness
on stdout, a real Prometheus server on loopback, reading metric names out of
/metrics and PromQL, and the common command line (--serve, --gen)."""
import argparse
import json
import re
import subprocess
import sys
import threading
import time
import unittest
import urllib.error
import urllib.parse
import urllib.request


def start_process(command, patterns, timeout=60):
    """Starts `command` and waits until its output has matched every regex in
    `patterns` (name -> regex with one group). Returns (process, {name: group})."""
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    found = {}
    deadline = time.time() + timeout
    for line in process.stdout:
        for key, pattern in patterns.items():
            match = re.search(pattern, line)
            if match:
                found[key] = match.group(1)
        if len(found) == len(patterns):
            # Keep draining the pipe so the process never blocks on it.
            threading.Thread(target=lambda: [None for _ in process.stdout], daemon=True).start()
            return process, found
        if time.time() > deadline:
            break
    process.kill()
    raise RuntimeError(f"{command[0]} did not start")


def start_server(serve, repository, *flags):
    """moe-serve on a free loopback port; returns (process, "127.0.0.1:port", metrics port or None)."""
    patterns = {"grpc": r"listening on gRPC port (\d+)"}
    if any(flag.startswith("--metrics_port") and flag != "--metrics_port=-1" for flag in flags):
        patterns["metrics"] = r"metrics on port (\d+)"
    process, found = start_process([serve, f"--model_repository={repository}", "--host=127.0.0.1", "--grpc_port=0",
                                    *flags], patterns)
    return process, f"127.0.0.1:{found['grpc']}", found.get("metrics")


def stop(process, timeout=60):
    process.terminate()
    code = process.wait(timeout=timeout)
    process.stdout.close()
    return code


def http_get(url):
    with urllib.request.urlopen(url, timeout=10) as response:
        return response.read().decode()


def exported_metric_names(metrics_text):
    """The series names a /metrics text exports (a histogram's with their
    _bucket, _sum and _count suffixes)."""
    names = set()
    for line in metrics_text.splitlines():
        match = re.match(r"# TYPE (\S+) (\S+)", line)
        if match:
            name, kind = match.groups()
            names.add(name)
            if kind == "histogram":
                names.update({name + "_bucket", name + "_sum", name + "_count"})
    return names


PROMQL_WORDS = {
    "sum", "by", "rate", "increase", "histogram_quantile", "topk", "max", "min", "avg", "count", "without", "le",
    "label_values", "irate", "on", "ignoring", "group_left", "group_right", "and", "or", "unless", "bool", "offset",
    "clamp_min", "clamp_max", "printf", "humanizeDuration",
}


def metrics_in_expression(expr):
    """The metric names a PromQL expression (or Grafana's label_values, or a
    prometheus-adapter query with its <<...>> templates) reads."""
    expr = re.sub(r"<<[^>]*>>", "", expr)           # prometheus-adapter templates
    expr = re.sub(r"label_values\(([^,)]+),[^)]*\)", r"\1", expr)  # Grafana: label_values(metric, label)
    expr = re.sub(r"\{[^}]*\}", "", expr)        # label matchers
    expr = re.sub(r"\[[^\]]*\]", "", expr)        # range selectors
    expr = re.sub(r"\b(by|without)\s*\([^)]*\)", "", expr)  # grouping labels
    expr = re.sub(r"\b\d+(\.\d+)?(e-?\d+)?\b", "", expr)  # numbers
    names = set()
    for token in re.findall(r"[a-zA-Z_:][a-zA-Z0-9_:]*", expr):
        if token in PROMQL_WORDS or token.startswith("$"):
            continue
        names.add(token)
    return names


class Prometheus:
    """A real Prometheus server (Debian's prometheus package) on a free
    loopback port, with `config` (YAML text) in a fresh data folder `work`.
    query() runs an instant query and returns its result list."""

    def __init__(self, binary, config, work):
        path = f"{work}/prometheus.yml"
        with open(path, "w") as f:
            f.write(config)
        self.process, _ = start_process([binary, f"--config.file={path}", f"--storage.tsdb.path={work}/data",
                                         "--web.listen-address=127.0.0.1:0"],
                                        {"ready": r"(Server is ready to receive web requests)"})
        # Prometheus does not log the port it got: find it with ss.
        port = None
        deadline = time.time() + 10
        while port is None and time.time() < deadline:
            out = subprocess.run(["ss", "-ltnpH"], capture_output=True, text=True).stdout
            for line in out.splitlines():
                if f"pid={self.process.pid}," in line:
                    port = int(line.split()[3].rsplit(":", 1)[1])
            time.sleep(0.2)
        if port is None:
            stop(self.process)
            raise RuntimeError("could not find Prometheus's port")
        self.api = f"http://127.0.0.1:{port}/api/v1/"

    def get(self, path):
        try:
            body = json.loads(http_get(self.api + path))
        except urllib.error.HTTPError as error:  # a bad query: 400 with the reason
            raise RuntimeError(f"Prometheus {urllib.parse.unquote(path)}: {error.read().decode()}") from None
        if body["status"] != "success":
            raise RuntimeError(f"Prometheus {path}: {body}")
        return body["data"]

    def query(self, expr):
        return self.get("query?query=" + urllib.parse.quote(expr))["result"]

    def stop(self):
        return stop(self.process)


def parse_args():
    """(--serve and --gen as a namespace, the other arguments: unittest's)."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--serve", required=True)
    parser.add_argument("--gen", required=True)
    return parser.parse_known_args()


def main():
    """Parses --serve and --gen into the returned namespace and runs unittest."""
    args, rest = parse_args()
    return args, lambda: unittest.main(module="__main__", argv=[sys.argv[0], "-v", *rest])
