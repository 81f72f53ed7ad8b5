#!/usr/bin/env python3
"""The deployment files against the real binary: every YAML parses, every
flag they pass to moe-serve exists, the ports, probe services and Prometheus
targets agree with what the server serves, and the Kubernetes arguments
start a server. (No Docker engine or cluster runs here: this is what can be
checked without one.)

Usage: test_deploy.py --serve PATH/moe-serve --gen PATH/moe-gen
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


class DeployTest(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        help_text = subprocess.run([ARGS.serve, "--helpfull"], capture_output=True, text=True).stdout
        cls.known_flags = set(re.findall(r"--([a-z_0-9]+)", help_text))
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

    def test_flags_passed_to_moe_serve_exist(self):
        with open(os.path.join(DEPLOY, "docker-compose.yml")) as f:
            compose = yaml.safe_load(f)
        with open(os.path.join(DEPLOY, "docker", "Dockerfile")) as f:
            cmd = re.search(r'^CMD (\[.*\])', f.read(), re.M).group(1)
        for arguments in (self.container["args"], compose["services"]["moe-serve"]["command"], yaml.safe_load(cmd)):
            for name in flag_names(arguments):
                self.assertIn(name, self.known_flags, f"moe-serve has no --{name}")

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
        targets = config["scrape_configs"][0]["static_configs"][0]["targets"]
        self.assertEqual(targets, ["moe-serve:8002"])

    def test_kubernetes_arguments_start_a_server(self):
        args = [a for a in self.container["args"] if not a.startswith(("--grpc_port", "--metrics_port"))]
        process, found = start_process([ARGS.serve, *args, "--host=127.0.0.1", "--grpc_port=0", "--metrics_port=0"],
                                       {"grpc": r"listening on gRPC port (\d+)"})
        self.assertGreater(int(found["grpc"]), 0)
        self.assertEqual(stop(process), 0)


if __name__ == "__main__":
    ARGS, run = main()
    run()
