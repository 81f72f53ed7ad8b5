#!/usr/bin/env python3
"""moe-serve against real peers: the Python tritonclient (gRPC), and a
SIGTERM sent to a loaded server process.

The reference is an independent numpy implementation of the MoE stack that
reads the model's safetensors file directly.

Usage: test_tritonclient.py --serve PATH/moe-serve --gen PATH/moe-gen
Exits 77 (skipped) when tritonclient is not installed.
"""
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import unittest

from e2e_util import main, start_process, start_server, stop

try:
    import numpy as np
    import tritonclient.grpc as grpcclient
    from tritonclient.utils import InferenceServerException
except ImportError as error:  # pragma: no cover
    print(f"SKIP: tritonclient/numpy not installed ({error}); run scripts/setup_test_tools.sh")
    sys.exit(77)

ARGS = None
HIDDEN, EXPERTS, TOP_K, LAYERS = 64, 8, 2, 2


def read_safetensors(path):
    with open(path, "rb") as f:
        data = f.read()
    length = int.from_bytes(data[:8], "little")
    header = json.loads(data[8:8 + length])
    tensors = {}
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        assert entry["dtype"] == "F32", entry
        begin, end = entry["data_offsets"]
        raw = data[8 + length + begin:8 + length + end]
        tensors[name] = np.frombuffer(raw, dtype="<f4").reshape(entry["shape"]).astype(np.float64)
    return tensors


def reference(weights, x, layers=range(LAYERS)):
    """The MoE stack in float64: pre-norm, softmax top-k (renormalised), SwiGLU experts, residual."""
    h = x.astype(np.float64)
    chosen = []
    for l in layers:
        w = lambda name: weights[f"layers.{l}.{name}"]
        n = w("norm.weight") * h / np.sqrt((h * h).mean(-1, keepdims=True) + 1e-6)
        logits = n @ w("router.weight").T
        p = np.exp(logits - logits.max(-1, keepdims=True))
        p /= p.sum(-1, keepdims=True)
        top = np.argsort(-p, axis=-1, kind="stable")[:, :TOP_K]
        gates = np.take_along_axis(p, top, -1)
        gates /= gates.sum(-1, keepdims=True)
        y = h.copy()
        for t in range(h.shape[0]):
            for j in range(TOP_K):
                e = top[t, j]
                g = n[t] @ w(f"experts.{e}.w1.weight").T
                u = n[t] @ w(f"experts.{e}.w3.weight").T
                y[t] += gates[t, j] * ((g / (1 + np.exp(-g)) * u) @ w(f"experts.{e}.w2.weight").T)
        h = y
        chosen.append(np.sort(top, -1))
    return h, chosen


class TritonClientTest(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.tmp = tempfile.TemporaryDirectory()
        subprocess.check_call([ARGS.gen, "--format=repository", f"--out={cls.tmp.name}", "--name=toy", "--dtype=fp32",
                               f"--hidden={HIDDEN}", "--intermediate=96", f"--experts={EXPERTS}", f"--top_k={TOP_K}",
                               f"--layers={LAYERS}", "--max_batch_size=256", "--seed=5"])
        cls.weights = read_safetensors(os.path.join(cls.tmp.name, "toy", "1", "model.safetensors"))
        cls.process, cls.url, _ = start_server(ARGS.serve, cls.tmp.name, "--max_queue_delay_us=1000", "--metrics_port=-1")
        cls.client = grpcclient.InferenceServerClient(cls.url)

    @classmethod
    def tearDownClass(cls):
        cls.client.close()
        stop(cls.process)
        cls.tmp.cleanup()

    def infer(self, x, **kwargs):
        tensor = grpcclient.InferInput("hidden_states", list(x.shape), "FP32")
        tensor.set_data_from_numpy(x)
        return self.client.infer("toy", [tensor], **kwargs)

    def test_health_and_metadata(self):
        self.assertTrue(self.client.is_server_live())
        self.assertTrue(self.client.is_server_ready())
        self.assertTrue(self.client.is_model_ready("toy"))
        metadata = self.client.get_model_metadata("toy", as_json=True)
        self.assertEqual(metadata["inputs"][0]["name"], "hidden_states")
        self.assertEqual([int(d) for d in metadata["inputs"][0]["shape"]], [-1, HIDDEN])
        self.assertEqual(metadata["outputs"][0]["name"], "output")

    def test_infer_matches_reference(self):
        x = np.random.default_rng(1).standard_normal((5, HIDDEN)).astype(np.float32)
        result = self.infer(x, parameters={"return_routing": True})
        expected, chosen = reference(self.weights, x)
        out = result.as_numpy("output")
        self.assertEqual(out.shape, (5, HIDDEN))
        error = np.abs(out - expected).max() / np.abs(expected).max()
        self.assertLess(error, 1e-5, f"normalised max error {error}")
        ids = result.as_numpy("expert_ids")
        self.assertEqual(ids.shape, (5, LAYERS, TOP_K))
        for l in range(LAYERS):
            np.testing.assert_array_equal(np.sort(ids[:, l, :], -1), chosen[l])

    def test_one_layer(self):
        x = np.random.default_rng(2).standard_normal((3, HIDDEN)).astype(np.float32)
        result = self.infer(x, parameters={"layer": 1})
        expected, _ = reference(self.weights, x, layers=[1])
        self.assertLess(np.abs(result.as_numpy("output") - expected).max() / np.abs(expected).max(), 1e-5)

    def test_errors_are_statuses(self):
        x = np.zeros((2, HIDDEN + 1), dtype=np.float32)
        with self.assertRaises(InferenceServerException) as raised:
            self.infer(x)
        self.assertIn("hidden size", str(raised.exception))
        with self.assertRaises(InferenceServerException) as raised:
            self.client.get_model_metadata("missing")
        self.assertIn("NOT_FOUND", str(raised.exception.status()))

    def test_ambiguous_requests_are_refused_naming_the_field(self):
        x = np.zeros((2, HIDDEN), dtype=np.float32)
        cases = [
            ({"parameters": {"temperature": 0.5}}, "unknown parameter 'temperature'"),
            ({"sequence_id": 7, "sequence_start": True}, "is not stateful"),
            ({"outputs": [grpcclient.InferRequestedOutput("output", class_count=3)]},
             "parameter 'classification' is not supported"),
            ({"outputs": [grpcclient.InferRequestedOutput("logits")]}, "unknown output 'logits'"),
            ({"parameters": {"return_routing": False}, "outputs": [grpcclient.InferRequestedOutput("expert_ids")]},
             "parameter 'return_routing' is false"),
        ]
        for kwargs, message in cases:
            with self.assertRaises(InferenceServerException, msg=message) as raised:
                self.infer(x, **kwargs)
            self.assertIn("INVALID_ARGUMENT", str(raised.exception.status()))
            self.assertIn(message, str(raised.exception))
        # What tritonclient sends for a plain request at a priority is fine.
        self.assertEqual(self.infer(x, priority=2, timeout=10_000_000).as_numpy("output").shape, (2, HIDDEN))

    def test_perf_analyzer_startup_sequence(self):
        # perf_analyzer calls ModelMetadata, ModelConfig, then ServerMetadata
        # and reads these fields.
        self.client.get_model_metadata("toy")
        config = self.client.get_model_config("toy", as_json=True)["config"]
        self.assertEqual(int(config["max_batch_size"]), 256)  # moe-gen --max_batch_size=256
        # --max_queue_delay_us=1000 overrides the config's, and the config served says so.
        self.assertEqual(int(config["dynamic_batching"]["max_queue_delay_microseconds"]), 1000)
        self.assertEqual(config["input"][0]["data_type"], "TYPE_FP32")
        self.assertEqual(config["output"][0]["name"], "output")
        server = self.client.get_server_metadata(as_json=True)
        self.assertEqual(server["name"], "moe-serve")
        self.assertNotIn("statistics", server.get("extensions", []))


class AuthTest(unittest.TestCase):
    """--auth_token_file with tritonclient's headers; the file changes while the server runs."""

    def test_bearer_tokens_with_headers_and_a_reloaded_file(self):
        with tempfile.TemporaryDirectory() as tmp:
            subprocess.check_call([ARGS.gen, "--format=repository", f"--out={tmp}", "--name=toy", "--dtype=fp32",
                                   f"--hidden={HIDDEN}", "--intermediate=96", "--layers=1"])
            tokens = os.path.join(tmp, "tokens")
            with open(tokens, "w") as f:
                f.write("old-token\n")
            process, url, _ = start_server(ARGS.serve, tmp, f"--auth_token_file={tokens}", "--metrics_port=-1")
            client = grpcclient.InferenceServerClient(url)
            x = np.ones((1, HIDDEN), dtype=np.float32)
            tensor = grpcclient.InferInput("hidden_states", [1, HIDDEN], "FP32")
            tensor.set_data_from_numpy(x)

            def status(token):
                headers = {"authorization": f"Bearer {token}"} if token else None
                try:
                    client.infer("toy", [tensor], headers=headers)
                    return "OK"
                except InferenceServerException as error:
                    return str(error.status())

            try:
                self.assertEqual(status(None), "StatusCode.UNAUTHENTICATED")
                self.assertEqual(status("wrong"), "StatusCode.PERMISSION_DENIED")
                self.assertEqual(status("old-token"), "OK")
                self.assertTrue(client.is_server_live(headers={"authorization": "Bearer old-token"}))
                with self.assertRaises(InferenceServerException):
                    client.get_model_metadata("toy")
                # Replaced as a Secret update does; read again within about a second.
                with open(tokens + ".new", "w") as f:
                    f.write("new-token\n")
                os.rename(tokens + ".new", tokens)
                deadline = time.time() + 10
                while status("new-token") != "OK" and time.time() < deadline:
                    time.sleep(0.1)
                self.assertEqual(status("new-token"), "OK")
                self.assertEqual(status("old-token"), "StatusCode.PERMISSION_DENIED")
                # moe-client (built beside moe-serve) with --token_file, and without.
                moe_client = os.path.join(os.path.dirname(os.path.dirname(ARGS.serve)), "client", "moe-client")
                if os.path.exists(moe_client):
                    token_file = os.path.join(tmp, "client-token")
                    with open(token_file, "w") as f:
                        f.write("new-token\n")
                    command = [moe_client, "metadata", f"--server={url}", "--model=toy"]
                    subprocess.check_call(command + [f"--token_file={token_file}"], stdout=subprocess.DEVNULL)
                    refused = subprocess.run(command, capture_output=True, text=True)
                    self.assertNotEqual(refused.returncode, 0)
                    self.assertIn("UNAUTHENTICATED", refused.stderr)
            finally:
                client.close()
                self.assertEqual(stop(process), 0)


def openssl(*args, cwd):
    subprocess.check_call(["openssl", *args], cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


class TlsTest(unittest.TestCase):
    """Mutual TLS on the gRPC ports with tritonclient's ssl options and moe-client's TLS flags, and between a
    front end and a moe-worker."""

    def setUp(self):
        if subprocess.run(["openssl", "version"], capture_output=True).returncode != 0:
            self.skipTest("no openssl command")
        self.tmp = tempfile.TemporaryDirectory()
        tmp = self.tmp.name
        subprocess.check_call([ARGS.gen, "--format=repository", f"--out={tmp}", "--name=toy", "--dtype=fp32",
                               f"--hidden={HIDDEN}", "--intermediate=96", f"--experts={EXPERTS}", "--layers=1"])
        with open(os.path.join(tmp, "san.ext"), "w") as f:
            f.write("subjectAltName=DNS:localhost,IP:127.0.0.1\n")
        ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes"]
        openssl("req", "-x509", *ec, "-days", "30", "-subj", "/CN=ca", "-keyout", "ca.key", "-out", "ca.pem", cwd=tmp)
        for serial, name in enumerate(["server", "client"], 1):
            openssl("req", *ec, "-subj", "/CN=localhost", "-keyout", f"{name}.key", "-out", f"{name}.csr", cwd=tmp)
            openssl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-set_serial",
                    str(serial), "-days", "30", "-extfile", "san.ext", "-out", f"{name}.pem", cwd=tmp)
        self.tensor = grpcclient.InferInput("hidden_states", [1, HIDDEN], "FP32")
        self.tensor.set_data_from_numpy(np.linspace(-1, 1, HIDDEN, dtype=np.float32).reshape(1, HIDDEN))

    def tearDown(self):
        self.tmp.cleanup()

    def path(self, name):
        return os.path.join(self.tmp.name, name)

    def mutual_tls_flags(self, prefix=""):
        return [f"--{prefix}tls_cert={self.path('server.pem')}", f"--{prefix}tls_key={self.path('server.key')}",
                f"--{prefix}tls_ca={self.path('ca.pem')}"]

    def test_mutual_tls(self):
        process, url, _ = start_server(ARGS.serve, self.tmp.name, *self.mutual_tls_flags(), "--metrics_port=-1")
        try:
            client = grpcclient.InferenceServerClient(
                url, ssl=True, root_certificates=self.path("ca.pem"), private_key=self.path("client.key"),
                certificate_chain=self.path("client.pem"))
            self.assertEqual(client.infer("toy", [self.tensor]).as_numpy("output").shape, (1, HIDDEN))
            client.close()
            # Without a client certificate the handshake fails.
            bare = grpcclient.InferenceServerClient(url, ssl=True, root_certificates=self.path("ca.pem"))
            with self.assertRaises(InferenceServerException):
                bare.is_server_live(client_timeout=5)
            bare.close()
            moe_client = os.path.join(os.path.dirname(os.path.dirname(ARGS.serve)), "client", "moe-client")
            if os.path.exists(moe_client):
                subprocess.check_call([moe_client, "metadata", f"--server={url}", "--model=toy",
                                       f"--tls_ca={self.path('ca.pem')}", f"--tls_cert={self.path('client.pem')}",
                                       f"--tls_key={self.path('client.key')}"], stdout=subprocess.DEVNULL)
        finally:
            self.assertEqual(stop(process), 0)

    def test_front_end_to_worker_over_mutual_tls(self):
        worker_binary = os.path.join(os.path.dirname(ARGS.serve), "moe-worker")
        if not os.path.exists(worker_binary):
            self.skipTest("no moe-worker beside moe-serve")
        worker, found = start_process([worker_binary, f"--model_dir={self.path('toy')}", "--host=127.0.0.1",
                                       "--port=0", "--metrics_port=-1", *self.mutual_tls_flags()],
                                      {"grpc": r"listening on gRPC port (\d+)"})
        placement = f"--workers=127.0.0.1:{found['grpc']}=0-{EXPERTS - 1}"
        local, local_url, _ = start_server(ARGS.serve, self.tmp.name, "--metrics_port=-1")
        front, front_url, _ = start_server(ARGS.serve, self.tmp.name, placement, "--metrics_port=-1",
                                           *self.mutual_tls_flags("worker_"))
        plain, plain_url, _ = start_server(ARGS.serve, self.tmp.name, placement, "--metrics_port=-1",
                                           "--worker_deadline_ms=2000")
        try:
            expected = grpcclient.InferenceServerClient(local_url).infer("toy", [self.tensor]).as_numpy("output")
            out = grpcclient.InferenceServerClient(front_url).infer("toy", [self.tensor]).as_numpy("output")
            np.testing.assert_array_equal(out, expected)
            # A front end without the worker's trust gets no rows from it.
            with self.assertRaises(InferenceServerException) as raised:
                grpcclient.InferenceServerClient(plain_url).infer("toy", [self.tensor], client_timeout=20)
            self.assertIn("UNAVAILABLE", str(raised.exception.status()))
        finally:
            for process in (plain, front, local, worker):
                stop(process)


class ShutdownTest(unittest.TestCase):
    def test_sigterm_finishes_in_flight_requests_and_exits_zero(self):
        with tempfile.TemporaryDirectory() as tmp:
            subprocess.check_call([ARGS.gen, "--format=repository", f"--out={tmp}", "--name=toy", "--dtype=fp32",
                                   f"--hidden={HIDDEN}", "--intermediate=96", "--layers=1"])
            # Batches close after 2 s unless full, so requests are in flight at SIGTERM.
            process, url, _ = start_server(ARGS.serve, tmp, "--max_queue_delay_us=2000000", "--grace_period_s=20",
                                           "--metrics_port=-1")
            client = grpcclient.InferenceServerClient(url)
            results, errors = [], []
            x = np.ones((1, HIDDEN), dtype=np.float32)
            tensor = grpcclient.InferInput("hidden_states", [1, HIDDEN], "FP32")
            tensor.set_data_from_numpy(x)
            for _ in range(4):
                client.async_infer("toy", [tensor],
                                  callback=lambda result, error: (results if error is None else errors).append(error or result))
            time.sleep(0.5)
            started = time.time()
            process.send_signal(signal.SIGTERM)
            self.assertEqual(process.wait(timeout=30), 0)
            process.stdout.close()
            self.assertLess(time.time() - started, 1.9, "queued work should run at once when draining")
            deadline = time.time() + 10
            while len(results) + len(errors) < 4 and time.time() < deadline:
                time.sleep(0.05)
            self.assertEqual(errors, [])
            self.assertEqual(len(results), 4)
            client.close()


if __name__ == "__main__":
    ARGS, run = main()
    run()
