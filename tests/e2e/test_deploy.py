#!/usr/bin/env python3
"""The deployment files against the real binaries: every YAML parses, every
flag they pass to moe-serve and moe-worker exists, the ports, probe services,
worker placement and Prometheus targets agree with what the processes serve,
and the Kubernetes arguments start a server. (No Docker engine or cluster
runs here: this is what can be checked without one.)

Usage: test_deploy.py --serve PATH/moe-serve --gen PATH/moe-gen (moe-worker
beside moe-serve)
"""
import os
import re
import subprocess
import sys
import unittest

try:
    import yaml
except ImportError as error:  # pragma: no cover
    print(f"SKIP: pyyaml not installed ({error}); run scripts/setup_test_tools.sh")
    sys.exit(77)

from e2e_util import main, start_process, stop

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
DEPLOY = os.path.join(ROOT, "deploy")
ARGS = None


def flag_names(arguments):
    return [re.match(r"--([a-z_0-9]+)", a).group(1) for a in arguments if a.startswith("--")]


def flag_value(arguments, name):
    for argument in arguments:
        if argument.startswith(f"--{name}="):
            return argument.split("=", 1)[1]
    return None


def known_flags(binary):
    help_text = subprocess.run([binary, "--helpfull"], capture_output=True, text=True).stdout
    return set(re.findall(r"--([a-z_0-9]+)", help_text))


class DeployTest(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.known_flags = known_flags(ARGS.serve)
        cls.worker_flags = known_flags(os.path.join(os.path.dirname(ARGS.serve), "moe-worker"))
        with open(os.path.join(ROOT, "docker-compose.yml")) as f:
            cls.compose = yaml.safe_load(f)
        with open(os.path.join(DEPLOY, "kubernetes", "moe-serve.yaml")) as f:
            cls.k8s = list(yaml.safe_load_all(f))
        cls.deployment = next(d for d in cls.k8s if d["kind"] == "Deployment")
        cls.container = cls.deployment["spec"]["template"]["spec"]["containers"][0]

    def test_every_yaml_file_parses(self):
        count = 0
        for folder, _, files in os.walk(DEPLOY):
            for name in files:
                if name.endswith((".yml", ".yaml", ".json")):
                    with open(os.path.join(folder, name)) as f:
                        list(yaml.safe_load_all(f))
                    count += 1
        self.assertGreaterEqual(count, 9)

    def test_flags_passed_to_moe_serve_and_moe_worker_exist(self):
        with open(os.path.join(DEPLOY, "docker", "Dockerfile")) as f:
            cmd = re.search(r'^CMD (\[.*\])', f.read(), re.M).group(1)
        for arguments in (self.container["args"], self.compose["services"]["moe-serve"]["command"],
                          yaml.safe_load(cmd)):
            for name in flag_names(arguments):
                self.assertIn(name, self.known_flags, f"moe-serve has no --{name}")
        workers = [s for s in self.compose["services"].values() if s.get("entrypoint") == ["moe-worker"]]
        self.assertEqual(len(workers), 2)
        for service in workers:
            for name in flag_names(service["command"]):
                self.assertIn(name, self.worker_flags, f"moe-worker has no --{name}")

    def test_compose_placement_names_its_workers_and_covers_every_expert(self):
        services = self.compose["services"]
        placement = flag_value(services["moe-serve"]["command"], "workers")
        covered = set()
        for item in placement.split(";"):
            address, experts = item.split("=")
            host, port = address.split(":")
            worker = services[host]["command"]
            self.assertEqual(flag_value(worker, "port"), port, host)
            self.assertEqual(flag_value(worker, "experts"), experts, host)
            first, last = map(int, experts.split("-"))
            covered |= set(range(first, last + 1))
        self.assertEqual(covered, set(range(8)))  # the demo model's experts

    def test_kubernetes_ports_probes_and_scrape_annotations_agree(self):
        args = self.container["args"]
        ports = {p["name"]: p["containerPort"] for p in self.container["ports"]}
        self.assertEqual(ports["grpc"], int(flag_value(args, "grpc_port")))
        self.assertEqual(ports["metrics"], int(flag_value(args, "metrics_port")))
        annotations = self.deployment["spec"]["template"]["metadata"]["annotations"]
        self.assertEqual(int(annotations["prometheus.io/port"]), ports["metrics"])
        for probe, service in (("startupProbe", "readiness"), ("readinessProbe", "readiness"), ("livenessProbe", "liveness")):
            self.assertEqual(self.container[probe]["grpc"], {"port": ports["grpc"], "service": service}, probe)
        grace = self.deployment["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
        self.assertGreater(grace, float(flag_value(args, "grace_period_s")))

    def test_compose_prometheus_scrapes_the_metrics_port(self):
        with open(os.path.join(DEPLOY, "prometheus", "prometheus-compose.yml")) as f:
            config = yaml.safe_load(f)
        targets = {job["job_name"]: job["static_configs"][0]["targets"] for job in config["scrape_configs"]}
        self.assertEqual(targets["moe-serve"], ["moe-serve:8002"])
        services = self.compose["services"]
        expected = [f"{name}:{flag_value(s['command'], 'metrics_port')}" for name, s in services.items()
                    if s.get("entrypoint") == ["moe-worker"]]
        self.assertEqual(sorted(targets["moe-worker"]), sorted(expected))

    def test_kubernetes_arguments_start_a_server(self):
        args = [a for a in self.container["args"] if not a.startswith(("--grpc_port", "--metrics_port"))]
        process, found = start_process([ARGS.serve, *args, "--host=127.0.0.1", "--grpc_port=0", "--metrics_port=0"],
                                       {"grpc": r"listening on gRPC port (\d+)"})
        self.assertGreater(int(found["grpc"]), 0)
        self.assertEqual(stop(process), 0)


if __name__ == "__main__":
    ARGS, run = main()
    run()
