"""Shared by the end-to-end tests: starting processes that announce readiness
on stdout, and the common command line (--serve, --gen)."""
import argparse
import re
import subprocess
import sys
import threading
import time
import unittest


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


def main():
    """Parses --serve and --gen into the returned namespace and runs unittest."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--serve", required=True)
    parser.add_argument("--gen", required=True)
    args, rest = parser.parse_known_args()
    return args, lambda: unittest.main(module="__main__", argv=[sys.argv[0], "-v", *rest])
