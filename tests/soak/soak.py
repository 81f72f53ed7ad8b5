#!/usr/bin/env python3
"""Soak: moe-serve as a front end with two moe-workers (the experts split,
two replicated), driven at saturation for --seconds by closed-loop clients
with mixed request sizes, some requests cancelled and some given deadlines
too short to meet. It checks:

  - every answer that came back: a sample of them bit for bit against a
    second moe-serve running the same model alone (the engine without
    workers); every other one for its shape;
  - errors: only the expected kinds (DEADLINE_EXCEEDED for the short
    deadlines, CANCELLED for the cancelled calls); any other fails;
  - resident memory of the three processes, sampled every second: after the
    warm-up (the first fifth), none may grow beyond 10% over its level then;
  - every process still up and serving at the end.

It prints p50/p99 latency of the answered requests, throughput, error
counts by code and the memory series' bounds, and exits 1 when a check
fails (77 when tritonclient is missing).

  tests/soak/soak.py --serve build/server/moe-serve --seconds 600
"""
import argparse
import os
import queue
import random
import statistics
import sys
import threading
import time

try:
    import numpy as np
    import tritonclient.grpc as grpcclient
    from tritonclient.utils import InferenceServerException
except ImportError as error:  # pragma: no cover
    print(f"SKIP: tritonclient not installed ({error}); run scripts/setup_test_tools.sh")
    sys.exit(77)

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "e2e"))
from e2e_util import start_process, stop  # noqa: E402

HIDDEN = 256  # the demo model's
SIZES = [1, 1, 2, 4, 8, 16, 32, 64]  # tokens per request, small ones most often
EXPECTED_ERRORS = {"StatusCode.DEADLINE_EXCEEDED", "StatusCode.CANCELLED"}


def resident_kib(pid):
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def start_worker(worker, experts):
    process, found = start_process([worker, "--host=127.0.0.1", "--port=0", "--metrics_port=-1",
                                    f"--experts={experts}"], {"port": r"listening on gRPC port (\d+)"})
    return process, f"127.0.0.1:{found['port']}"


def start_serve(serve, *flags):
    process, found = start_process([serve, "--host=127.0.0.1", "--grpc_port=0", "--metrics_port=-1", *flags],
                                   {"port": r"listening on gRPC port (\d+)"})
    return process, f"127.0.0.1:{found['port']}"


def request_inputs(tokens, seed):
    data = np.random.default_rng(seed).standard_normal((tokens, HIDDEN), dtype=np.float32)
    tensor = grpcclient.InferInput("hidden_states", [tokens, HIDDEN], "FP32")
    tensor.set_data_from_numpy(data)
    return [tensor]


class Stats:
    def __init__(self):
        self.lock = threading.Lock()
        self.latencies = []
        self.errors = {}
        self.unexpected = []
        self.samples = []  # (tokens, seed, output) to check against the engine alone
        self.bad_shapes = 0

    def error(self, code, message):
        with self.lock:
            self.errors[code] = self.errors.get(code, 0) + 1
            if code not in EXPECTED_ERRORS and len(self.unexpected) < 10:
                self.unexpected.append(f"{code}: {message}")


def client_loop(address, stop_at, stats, index):
    client = grpcclient.InferenceServerClient(address)
    rng = random.Random(index)
    while time.time() < stop_at:
        tokens, seed = rng.choice(SIZES), rng.randrange(1 << 30)
        kind = rng.random()
        try:
            if kind < 0.05:  # a deadline no batch can meet
                client.infer("demo", request_inputs(tokens, seed), client_timeout=0.0002)
                continue
            if kind < 0.10:  # cancelled in flight
                done = queue.Queue()
                call = client.async_infer("demo", request_inputs(tokens, seed),
                                          callback=lambda result, error: done.put(error))
                call.cancel()
                error = done.get(timeout=30)
                if error is not None:
                    stats.error(str(error.status()), error.message())
                continue
            start = time.time()
            result = client.infer("demo", request_inputs(tokens, seed))
            elapsed = time.time() - start
            output = result.as_numpy("output")
            with stats.lock:
                stats.latencies.append(elapsed)
                if output is None or output.shape != (tokens, HIDDEN):
                    stats.bad_shapes += 1
                elif rng.random() < 0.02:
                    stats.samples.append((tokens, seed, output))
        except InferenceServerException as error:
            stats.error(str(error.status()), error.message())
    client.close()


def memory_loop(processes, stop_at, series):
    while time.time() < stop_at:
        for name, process in processes.items():
            series.setdefault(name, []).append(resident_kib(process.pid))
        time.sleep(1)


def memory_growth(series, warm_fraction=0.2):
    """Per process: (level after warm-up, most after, growth as a fraction)."""
    out = {}
    for name, values in series.items():
        after = values[max(1, int(len(values) * warm_fraction)):]
        if not after:
            continue
        level = after[0]
        out[name] = (level, max(after), max(after) / level - 1.0)
    return out


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--serve", required=True, help="moe-serve (moe-worker beside it)")
    parser.add_argument("--gen", help="unused; accepted as the e2e tests take it")
    parser.add_argument("--seconds", type=float, default=60)
    parser.add_argument("--clients", type=int, default=8)
    args = parser.parse_args()
    worker = os.path.join(os.path.dirname(args.serve), "moe-worker")

    workers = [start_worker(worker, "0-4"), start_worker(worker, "3-7")]
    placement = ";".join(f"{address}={experts}" for (_, address), experts in zip(workers, ["0-4", "3-7"]))
    front, front_address = start_serve(args.serve, f"--workers={placement}", "--worker_deadline_ms=5000")
    alone, alone_address = start_serve(args.serve)
    processes = {"front end": front, "worker 0-4": workers[0][0], "worker 3-7": workers[1][0]}
    failures = []
    try:
        stats, series = Stats(), {}
        start = time.time()
        stop_at = start + args.seconds
        threads = [threading.Thread(target=client_loop, args=(front_address, stop_at, stats, i))
                   for i in range(args.clients)]
        threads.append(threading.Thread(target=memory_loop, args=(processes, stop_at, series)))
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        elapsed = time.time() - start

        reference = grpcclient.InferenceServerClient(alone_address)
        mismatches = 0
        for tokens, seed, output in stats.samples:
            expected = reference.infer("demo", request_inputs(tokens, seed)).as_numpy("output")
            mismatches += not np.array_equal(output, expected)
        for name, process in processes.items():
            if process.poll() is not None:
                failures.append(f"{name} exited with {process.returncode}")
        if grpcclient.InferenceServerClient(front_address).is_server_ready() is not True:
            failures.append("the front end no longer ready")

        latencies = sorted(stats.latencies)
        answered = len(latencies)
        print(f"soak: {elapsed:.0f} s, {args.clients} clients: {answered} answered ({answered / elapsed:.0f}/s), "
              f"errors {stats.errors or 'none'}")
        if latencies:
            p50 = latencies[len(latencies) // 2] * 1000
            p99 = latencies[min(len(latencies) - 1, int(len(latencies) * 0.99))] * 1000
            print(f"soak: latency p50 {p50:.1f} ms, p99 {p99:.1f} ms, mean "
                  f"{statistics.mean(latencies) * 1000:.1f} ms")
        print(f"soak: {len(stats.samples)} answers checked against the engine alone, {mismatches} differ")
        for name, (level, most, growth) in memory_growth(series).items():
            print(f"soak: {name} resident {level / 1024:.1f} MiB after warm-up, at most {most / 1024:.1f} MiB "
                  f"({growth * 100:+.1f}%)")
            if growth > 0.10:
                failures.append(f"{name}'s resident memory grew {growth * 100:.1f}% after warm-up")
        if answered == 0:
            failures.append("no request was answered")
        if stats.unexpected:
            failures.append(f"unexpected errors: {stats.unexpected}")
        if stats.bad_shapes:
            failures.append(f"{stats.bad_shapes} answers of the wrong shape")
        if mismatches:
            failures.append(f"{mismatches} answers differ from the engine alone")
    finally:
        for process in [front, alone] + [w for w, _ in workers]:
            if process.poll() is None:
                stop(process)
    for failure in failures:
        print(f"soak: FAILED: {failure}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
