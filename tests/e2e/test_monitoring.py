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

from e2e_util import (Prometheus, exported_metric_names, http_get, main, metrics_in_expression, start_process,
                      start_server, stop)

try:
    import numpy as np
    import tritonclient.grpc as grpcclient
except ImportError as error:  # pragma: no cover
    print(f"SKIP: tritonclient/numpy not installed ({error}); run scripts/setup_test_tools.sh")
    sys.exit(77)

ARGS = None
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
HIDDEN, EXPERTS, TOP_K, LAYERS = 32, 6, 2, 3


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
                                           "--host=127.0.0.1", "--port=0", "--metrics_port=0"],
                                          {"grpc": r"listening on gRPC port (\d+)", "metrics": r"metrics on port (\d+)"})
        cls.worker_metrics_url = f"http://127.0.0.1:{found['metrics']}/metrics"
        cls.server, cls.grpc_url, metrics_port = start_server(
            ARGS.serve, cls.tmp, "--metrics_port=0", f"--workers=127.0.0.1:{found['grpc']}=0-1")
        cls.metrics_url = f"http://127.0.0.1:{metrics_port}/metrics"

    @classmethod
    def tearDownClass(cls):
        stop(cls.server)
        stop(cls.worker)
        shutil.rmtree(cls.tmp, ignore_errors=True)

    def test_dashboard_queries_name_only_exported_metrics(self):
        # The dashboard shows the front end's series and the workers' own.
        exported = exported_metric_names(http_get(self.metrics_url) + http_get(self.worker_metrics_url))
        with open(os.path.join(ROOT, "deploy", "grafana", "dashboards", "moe-serve.json")) as f:
            dashboard = json.load(f)
        expressions = [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]
        for variable in dashboard["templating"]["list"]:
            if variable.get("type") == "query":
                expressions.append(variable["definition"])
        self.assertGreater(len(expressions), 10)
        for expr in expressions:
            for name in metrics_in_expression(expr):
                self.assertIn(name, exported, f"dashboard query uses {name}, which no process exports: {expr}")

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
            server = Prometheus(prometheus, "global:\n  scrape_interval: 1s\nscrape_configs:\n  - job_name: moe-serve\n"
                                f"    static_configs:\n      - targets: ['{self.metrics_url.split('/')[2]}']\n", work)
            try:
                self._check_through_prometheus(server, tokens, direct)
            finally:
                server.stop()
        finally:
            shutil.rmtree(work, ignore_errors=True)

    def _check_through_prometheus(self, server, tokens, direct):
        query = server.query
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
