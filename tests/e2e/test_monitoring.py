#!/usr/bin/env python3
"""Monitoring with real parts: moe-serve's /metrics scraped by a real
Prometheus server (Debian's prometheus package) on loopback, the exact
per-expert accounting checked through Prometheus's HTTP API, and the Grafana
dashboard's queries checked against the metrics the server really exports.

Usage: test_monitoring.py --serve PATH/moe-serve --gen PATH/moe-gen (moe-worker
beside moe-serve)
"""
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import unittest
import urllib.parse
import urllib.request

from e2e_util import main, start_process, start_server, stop

try:
    import numpy as np
    import tritonclient.grpc as grpcclient
except ImportError as error:  # pragma: no cover
    print(f"SKIP: tritonclient/numpy not installed ({error}); run scripts/setup_test_tools.sh")
    sys.exit(77)

ARGS = None
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
HIDDEN, EXPERTS, TOP_K, LAYERS = 32, 6, 2, 3

PROMQL_WORDS = {
    "sum", "by", "rate", "increase", "histogram_quantile", "topk", "max", "min", "avg", "count", "without", "le",
    "label_values", "irate", "on", "ignoring", "group_left", "group_right", "and", "or", "unless", "bool", "offset",
}


def http_get(url):
    with urllib.request.urlopen(url, timeout=10) as response:
        return response.read().decode()


def exported_metric_names(metrics_text):
    names = set()
    for line in metrics_text.splitlines():
        match = re.match(r"# TYPE (\S+) (\S+)", line)
        if match:
            name, kind = match.groups()
            names.add(name)
            if kind == "histogram":
                names.update({name + "_bucket", name + "_sum", name + "_count"})
    return names


def metrics_in_expression(expr):
    expr = re.sub(r"label_values\(([^,)]+),[^)]*\)", r"\1", expr)  # Grafana: label_values(metric, label)
    expr = re.sub(r"\{[^}]*\}", "", expr)        # label matchers
    expr = re.sub(r"\[[^\]]*\]", "", expr)        # range selectors
    expr = re.sub(r"\bby\s*\([^)]*\)", "", expr)  # grouping labels
    names = set()
    for token in re.findall(r"[a-zA-Z_:][a-zA-Z0-9_:]*", expr):
        if token in PROMQL_WORDS or token.startswith("$"):
            continue
        names.add(token)
    return names


class MonitoringTest(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.tmp = tempfile.mkdtemp()
        subprocess.check_call([ARGS.gen, "--format=repository", f"--out={cls.tmp}", "--name=toy", "--dtype=fp32",
                               f"--hidden={HIDDEN}", "--intermediate=48", f"--experts={EXPERTS}", f"--top_k={TOP_K}",
                               f"--layers={LAYERS}", "--max_batch_size=256"])
        # A moe-worker (beside moe-serve) holds two experts, so that the
        # worker series exist too.
        worker_binary = os.path.join(os.path.dirname(ARGS.serve), "moe-worker")
        cls.worker, found = start_process([worker_binary, f"--model_dir={cls.tmp}/toy", "--experts=0-1",
                                           "--host=127.0.0.1", "--port=0", "--metrics_port=0"], {"grpc": r"listening on gRPC port (\d+)"})
        cls.server, cls.grpc_url, metrics_port = start_server(
            ARGS.serve, cls.tmp, "--metrics_port=0", f"--workers=127.0.0.1:{found['grpc']}=0-1")
        cls.metrics_url = f"http://127.0.0.1:{metrics_port}/metrics"

    @classmethod
    def tearDownClass(cls):
        stop(cls.server)
        stop(cls.worker)
        shutil.rmtree(cls.tmp, ignore_errors=True)

    def test_dashboard_queries_name_only_exported_metrics(self):
        exported = exported_metric_names(http_get(self.metrics_url))
        with open(os.path.join(ROOT, "deploy", "grafana", "dashboards", "moe-serve.json")) as f:
            dashboard = json.load(f)
        expressions = [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]
        for variable in dashboard["templating"]["list"]:
            if variable.get("type") == "query":
                expressions.append(variable["definition"])
        self.assertGreater(len(expressions), 10)
        for expr in expressions:
            for name in metrics_in_expression(expr):
                self.assertIn(name, exported, f"dashboard query uses {name}, which moe-serve does not export: {expr}")

    def test_prometheus_scrapes_exact_per_expert_accounting(self):
        prometheus = shutil.which("prometheus")
        if prometheus is None:
            self.skipTest("the prometheus package could not be installed")
        # Known load: sequential requests, so every token is counted once per layer.
        client = grpcclient.InferenceServerClient(self.grpc_url)
        rng = np.random.default_rng(3)
        tokens = 0
        for request in range(15):
            t = 1 + request % 5
            x = rng.standard_normal((t, HIDDEN)).astype(np.float32)
            tensor = grpcclient.InferInput("hidden_states", [t, HIDDEN], "FP32")
            tensor.set_data_from_numpy(x)
            client.infer("toy", [tensor])
            tokens += t
        client.close()
        direct = http_get(self.metrics_url)

        work = tempfile.mkdtemp()
        try:
            config = os.path.join(work, "prometheus.yml")
            with open(config, "w") as f:
                f.write("global:\n  scrape_interval: 1s\nscrape_configs:\n  - job_name: moe-serve\n"
                        f"    static_configs:\n      - targets: ['{self.metrics_url.split('/')[2]}']\n")
            process, _ = start_process([prometheus, f"--config.file={config}", f"--storage.tsdb.path={work}/data",
                                    "--web.listen-address=127.0.0.1:0"],
                                       {"ready": r"(Server is ready to receive web requests)"})
            try:
                self._check_through_prometheus(process, work, tokens, direct)
            finally:
                stop(process)
        finally:
            shutil.rmtree(work, ignore_errors=True)

    def _check_through_prometheus(self, process, work, tokens, direct):
        # Prometheus logs its listen address; with port 0 find it from /proc.
        port = None
        deadline = time.time() + 10
        while port is None and time.time() < deadline:
            out = subprocess.run(["ss", "-ltnpH"], capture_output=True, text=True).stdout
            for line in out.splitlines():
                if f"pid={process.pid}," in line:
                    port = int(line.split()[3].rsplit(":", 1)[1])
            time.sleep(0.2)
        self.assertIsNotNone(port, "could not find Prometheus's port")
        api = f"http://127.0.0.1:{port}/api/v1/query?query="

        def query(expr):
            body = json.loads(http_get(api + urllib.parse.quote(expr)))
            self.assertEqual(body["status"], "success", body)
            return body["data"]["result"]

        expected = tokens * TOP_K
        deadline = time.time() + 30
        per_layer = {}
        while time.time() < deadline:
            per_layer = {r["metric"]["layer"]: float(r["value"][1])
                         for r in query('sum by (layer) (moe_expert_tokens_routed_total{model="toy"})')}
            if len(per_layer) == LAYERS and all(v == expected for v in per_layer.values()):
                break
            time.sleep(0.5)
        self.assertEqual(per_layer, {str(l): float(expected) for l in range(LAYERS)})
        # Every per-expert series in Prometheus equals what the server exported.
        series = query('moe_expert_tokens_routed_total{model="toy"}')
        self.assertEqual(len(series), LAYERS * EXPERTS)
        for s in series:
            labels = s["metric"]
            line = re.search(r'moe_expert_tokens_routed_total\{expert="%s",layer="%s",model="toy",version="1"\} (\S+)'
                             % (labels["expert"], labels["layer"]), direct)
            self.assertIsNotNone(line, labels)
            self.assertEqual(float(line.group(1)), float(s["value"][1]), labels)
        success = query('moe_requests_total{model="toy",outcome="success"}')
        self.assertEqual(float(success[0]["value"][1]), 15.0)


if __name__ == "__main__":
    ARGS, run = main()
    run()
