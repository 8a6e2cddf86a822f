"""The deployment files: the Dockerfile's facts, the image's install steps and start command run in a fresh virtual
environment, and the Kubernetes manifests (``deploy/kubernetes/``) against the Kubernetes schemas and against each
other, the image and servekit's config. Docker cannot run here, so the image is checked by what its file says and by
doing what it does, outside a container."""

from __future__ import annotations

import argparse
import functools
import importlib.metadata
import importlib.util
import json
import os
import re
import shlex
import shutil
import signal
import stat
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from types import ModuleType
from typing import Any

import httpx
import kubernetes_validate
import pytest
import torch
import yaml
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from servekit import cli
from servekit.api.keys import read_key_file
from servekit.config import KEY_VARIABLES, load_settings, parse_properties
from servekit.settings import Settings
from tests.helpers import build_mlp, free_port, stop_process, wait_healthy
from tests.test_cli import run_read_only
from tests.test_configs import metric_names

ROOT = Path(__file__).parent.parent
DOCKERFILE = ROOT / "Dockerfile"
CONSTRAINTS = ROOT / "constraints.txt"  # the image's package versions (deploy/constraints.py writes it)
KUBERNETES = ROOT / "deploy" / "kubernetes"
KSERVE = ROOT / "deploy" / "kserve"
VENV = PurePosixPath("/opt/venv")  # where the builder stage makes the virtual environment that the image copies
# The oldest and the newest Kubernetes versions whose schemas kubernetes-validate ships (offline, in the package).
K8S_VERSIONS = ("1.25", kubernetes_validate.latest_version())
# files that must not reach the build context (.dockerignore)
KEPT_OUT = (
    ".venv/bin/python",
    ".git/HEAD",
    "tests/test_deploy.py",
    "benchmarks/README.md",
    "model_store/mlp/mlp.pt",
    "logs/config/snapshot.json",
    "configs/config.properties",
    "servekit/__pycache__/cli.cpython-311.pyc",
    "servekit/api/__pycache__/v2.cpython-311.pyc",
)


# ---- the Dockerfile ----


@dataclass(frozen=True, slots=True)
class Instruction:
    keyword: str
    value: str


@dataclass(slots=True)
class Stage:
    base: str
    name: str | None
    instructions: list[Instruction] = field(default_factory=list)

    def values(self, keyword: str) -> list[str]:
        return [i.value for i in self.instructions if i.keyword == keyword]

    def last(self, keyword: str) -> str:
        """The value of the last ``keyword`` (the one Docker uses for ENTRYPOINT, CMD, USER, HEALTHCHECK)."""
        found = self.values(keyword)
        assert found, f"stage {self.name or self.base} has no {keyword}"
        return found[-1]


@dataclass(frozen=True, slots=True)
class Dockerfile:
    args: dict[str, str]  # the ARGs before the first FROM, with their defaults
    stages: list[Stage]

    def stage(self, name: str) -> Stage:
        return next(s for s in self.stages if s.name == name)

    @property
    def final(self) -> Stage:
        return self.stages[-1]


def read_dockerfile(path: Path = DOCKERFILE) -> Dockerfile:
    """Instructions by stage: continuation lines joined, comment lines dropped (also inside a continuation, as
    Docker does)."""
    logical: list[str] = []
    current = ""
    for line in path.read_text().splitlines():
        if line.lstrip().startswith("#") or (not line.strip() and not current):
            continue
        if line.endswith("\\"):
            current += line[:-1]
            continue
        logical.append(current + line)
        current = ""
    args: dict[str, str] = {}
    stages: list[Stage] = []
    for text in logical:
        keyword, _, value = text.strip().partition(" ")
        keyword, value = keyword.upper(), " ".join(value.split())
        if keyword == "FROM":
            base, *name = re.split(r" as ", value, maxsplit=1, flags=re.IGNORECASE)
            stages.append(Stage(base, name[0] if name else None))
        elif not stages:
            assert keyword == "ARG", f"only ARG may come before the first FROM, got {keyword}"
            key, _, default = value.partition("=")
            args[key] = default
        else:
            stages[-1].instructions.append(Instruction(keyword, value))
    return Dockerfile(args, stages)


def exec_form(value: str) -> list[str]:
    """A JSON-array (exec form) instruction value; the shell form would put /bin/sh between tini and servekit."""
    parsed = json.loads(value)
    assert isinstance(parsed, list) and all(isinstance(v, str) for v in parsed), f"not exec form: {value}"
    return [str(v) for v in parsed]


def copies(stage: Stage) -> list[tuple[dict[str, str], list[str], str]]:
    """Each COPY of a stage as (flags, sources, destination)."""
    found = []
    for value in stage.values("COPY"):
        words = shlex.split(value)
        flags = dict(w[2:].partition("=")[::2] for w in words if w.startswith("--"))
        *sources, dest = [w for w in words if not w.startswith("--")]
        found.append((flags, sources, dest))
    return found


def container_config(dockerfile: Dockerfile) -> tuple[Path, PurePosixPath]:
    """The config file of the repository that the image copies, and where it lands in the image."""
    for flags, sources, dest in copies(dockerfile.final):
        if "from" not in flags and sources[0].endswith(".properties"):
            return ROOT / sources[0], PurePosixPath(dest)
    raise AssertionError("the image copies no config.properties")


def start_settings(args: list[str], config: Path | None = None) -> tuple[argparse.Namespace, Settings | None]:
    """``servekit start`` arguments parsed by servekit's own parser, and the settings they give with ``config`` read
    in place of the ``--ts-config`` file."""
    assert args[:2] == ["start", "--foreground"], args
    parser = argparse.ArgumentParser()
    cli._add_start_arguments(parser)
    namespace = parser.parse_args(args[1:])
    if config is None:
        return namespace, None
    namespace.ts_config = str(config)
    return namespace, cli.settings_from_args(namespace)


# ---- .dockerignore ----


@dataclass(frozen=True, slots=True)
class IgnoreRule:
    regex: re.Pattern[str]
    excludes: bool  # False for a `!` rule
    prefix: str  # the pattern up to its first wildcard


@functools.cache
def ignore_rules() -> tuple[IgnoreRule, ...]:
    """``.dockerignore`` in order: Go's filepath.Match with ``**``, as Docker reads it."""
    rules = []
    for line in (ROOT / ".dockerignore").read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        pattern = line.lstrip("!").strip("/")
        regex = ""
        i = 0
        while i < len(pattern):
            if pattern.startswith("**/", i):
                regex, i = regex + "(?:.*/)?", i + 3
            elif pattern.startswith("**", i):
                regex, i = regex + ".*", i + 2
            elif pattern[i] == "*":
                regex, i = regex + "[^/]*", i + 1
            elif pattern[i] == "?":
                regex, i = regex + "[^/]", i + 1
            elif pattern[i] == "[":
                end = pattern.index("]", i)
                regex, i = regex + pattern[i : end + 1], end + 1
            else:
                regex, i = regex + re.escape(pattern[i]), i + 1
        prefix = re.split(r"[*?\[]", pattern, maxsplit=1)[0]
        rules.append(IgnoreRule(re.compile(regex), not line.startswith("!"), prefix))
    return tuple(rules)


def in_context(path: str) -> bool:
    """Whether ``path`` (relative to the repository) reaches the build context: the last rule that matches it or
    one of its parent folders decides."""
    parts = PurePosixPath(path).parts
    candidates = ["/".join(parts[: n + 1]) for n in range(len(parts))]
    included = True
    for rule in ignore_rules():
        if any(rule.regex.fullmatch(c) for c in candidates):
            included = not rule.excludes
    return included


def build_context() -> list[str]:
    """The files of the build context, relative to the repository. As Docker does, a folder that is left out and
    that no ``!`` rule can reach into is not walked (.venv, .git)."""
    reopened = [rule.prefix for rule in ignore_rules() if not rule.excludes]
    found = []
    for folder, dirs, files in os.walk(ROOT):
        relative = Path(folder).relative_to(ROOT)
        for name in list(dirs):
            path = str(relative / name)
            if not in_context(path) and not any(
                p.startswith(path + "/") or (path + "/").startswith(p) for p in reopened
            ):
                dirs.remove(name)
        found += [str(relative / name) for name in files if in_context(str(relative / name))]
    return sorted(found)


# ---- the manifests ----


def manifests(folder: Path = KUBERNETES) -> Iterator[tuple[Path, dict[str, Any]]]:
    for path in sorted(folder.rglob("*.yaml")):
        for document in yaml.safe_load_all(path.read_text()):
            if document:
                yield path, document


def manifest(kind: str, folder: Path = KUBERNETES) -> dict[str, Any]:
    found = [doc for _, doc in manifests(folder) if doc["kind"] == kind]
    assert len(found) == 1, f"expected one {kind} in {folder}, found {len(found)}"
    return found[0]


def only(items: list[dict[str, Any]], **match: object) -> dict[str, Any]:
    found = [item for item in items if all(item.get(k) == v for k, v in match.items())]
    assert len(found) == 1, f"expected one of {match} in {items}"
    return found[0]


def adapter_rules() -> list[dict[str, Any]]:
    adapter = manifest("ConfigMap", KUBERNETES / "prometheus-adapter")
    rules = yaml.safe_load(adapter["data"]["config.yaml"])["rules"]
    assert isinstance(rules, list)
    return rules


def adapter_metric_names() -> set[str]:
    """Every servekit metric that the adapter's rules read."""
    names = set()
    for rule in adapter_rules():
        names |= metric_names(rule["seriesQuery"])
        query = rule["metricsQuery"].replace("<<.GroupBy>>", "pod").replace("<<.LabelMatchers>>", 'pod="p"')
        names |= metric_names(query.replace("<<.Series>>", rule["seriesQuery"].partition("{")[0]))
    return names


# ---- Dockerfile facts ----


def test_dockerfile_is_multi_stage_on_a_slim_python_base_switchable_by_build_argument() -> None:
    dockerfile = read_dockerfile()
    assert dockerfile.args["BASE_IMAGE"] == "python:3.11-slim"
    assert len(dockerfile.stages) >= 2
    assert all(stage.base == "${BASE_IMAGE}" for stage in dockerfile.stages)
    builder = dockerfile.stage("builder")
    assert any("pip install torch==2.13.0 " in run for run in builder.values("RUN"))
    assert f"python -m venv {VENV}" in builder.values("RUN")
    # the final stage takes the virtual environment, not the build tools or the sources
    final_copies = copies(dockerfile.final)
    assert ({"from": "builder"}, [str(VENV)], str(VENV)) in final_copies
    assert all("from" in flags or src[0].startswith("configs/") for flags, src, _ in final_copies)
    assert f"PATH={VENV}/bin:$PATH" in dockerfile.final.last("ENV").split()


def test_dockerfile_runs_servekit_in_the_foreground_as_non_root_with_signals_reaching_it() -> None:
    final = read_dockerfile().final
    user = final.last("USER")
    uid = user.partition(":")[0]
    assert uid.isdigit() and int(uid) != 0, "a numeric non-root user, so that runAsNonRoot can check it"
    assert any(f"--uid {uid}" in run for run in final.values("RUN"))
    # tini is PID 1 and passes SIGTERM on to servekit, which drains (servekit/server.py)
    assert exec_form(final.last("ENTRYPOINT")) == ["tini", "--", "servekit"]
    assert any("apt-get install" in run and " tini" in run for run in final.values("RUN"))
    args, _ = start_settings(exec_form(final.last("CMD")))
    assert args.foreground and args.ts_config


def test_dockerfile_binds_inference_and_metrics_publicly_and_management_on_loopback() -> None:
    dockerfile = read_dockerfile()
    source, dest = container_config(dockerfile)
    args, _ = start_settings(exec_form(dockerfile.final.last("CMD")))
    assert args.ts_config == str(dest)
    settings = load_settings(source, environ={})
    assert settings.inference_address.host == "0.0.0.0"
    assert settings.metrics_address.host == "0.0.0.0"
    assert settings.management_address.host == "127.0.0.1"
    exposed = {int(port.partition("/")[0]) for value in dockerfile.final.values("EXPOSE") for port in value.split()}
    assert exposed == {settings.inference_address.port, settings.metrics_address.port}
    # the model store is the image's volume
    volumes = {v for value in dockerfile.final.values("VOLUME") for v in exec_form(value)}
    assert str(settings.model_store) in volumes
    assert settings.load_models == ("all",)


def test_dockerfile_healthcheck_pings_the_inference_port() -> None:
    dockerfile = read_dockerfile()
    settings = load_settings(container_config(dockerfile)[0], environ={})
    options, _, command = dockerfile.final.last("HEALTHCHECK").partition(" CMD ")
    assert "--interval=" in options and "--start-period=" in options
    argv = exec_form(command)
    assert f"http://127.0.0.1:{settings.inference_address.port}/ping" in argv[-1]


def test_dockerignore_keeps_only_what_the_image_needs() -> None:
    context = build_context()
    assert {
        "pyproject.toml",
        "README.md",
        "servekit/cli.py",
        "servekit/compat/ts/torch_handler/base_handler.py",
    } <= set(context)
    final = read_dockerfile().final
    assert all(src in context for flags, sources, _ in copies(final) if "from" not in flags for src in sources)
    for kept_out in KEPT_OUT:
        assert not in_context(kept_out), kept_out
    assert sum((ROOT / f).stat().st_size for f in context) < 2 * 2**20, "a build context of under 2 MiB"


# ---- constraints.txt: the image's package versions ----


def constraints_generator() -> ModuleType:
    spec = importlib.util.spec_from_file_location("constraints", ROOT / "deploy" / "constraints.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def constraint_pins() -> dict[str, str]:
    """``constraints.txt`` as {normalized name: version}."""
    pins: dict[str, str] = {}
    for line in CONSTRAINTS.read_text().splitlines():
        if line and not line.startswith("#"):
            name, separator, version = line.partition("==")
            assert separator and version, f"constraints.txt: {line!r} is not name==version"
            pins[canonicalize_name(name)] = version
    return pins


def test_constraints_pin_the_images_packages_at_the_versions_the_tests_run_with() -> None:
    assert CONSTRAINTS.read_text() == constraints_generator().render(), (
        "constraints.txt does not match this environment: run make constraints (docs/deploy.md, Pinned versions)"
    )
    pins = constraint_pins()
    assert pins["torch"] == "2.13.0", "the release, so that a CUDA index's 2.13.0+cu128 satisfies it too"
    assert {"fastapi", "uvicorn", "uvloop", "grpcio", "numpy", "typing-extensions"} <= pins.keys()
    requires = [Requirement(text) for text in importlib.metadata.requires("servekit") or ()]
    test_only = {
        canonicalize_name(r.name)
        for r in requires
        if r.marker is not None and r.marker.evaluate({"extra": "test"}) and not r.marker.evaluate({"extra": ""})
    }
    assert {"pytest", "ruff", "tritonclient", "grpcio-tools"} <= test_only
    assert not test_only & pins.keys(), "no test tool in the image"


def test_dockerfile_installs_servekit_and_numpy_at_the_constrained_versions() -> None:
    builder = read_dockerfile().stage("builder")
    torch_step, servekit_step = (run.split() for run in builder.values("RUN") if run.startswith("pip install "))
    # torch alone from its index: its dependencies come with servekit's, constrained
    assert f"torch=={constraint_pins()['torch']}" in torch_step and "--no-deps" in torch_step
    assert servekit_step[:4] == ["pip", "install", "--constraint", CONSTRAINTS.name]
    assert set(servekit_step[4:]) == {".", *constraints_generator().IMAGE_EXTRAS}
    assert in_context(CONSTRAINTS.name)
    assert ({}, ["."], ".") in copies(builder), "the builder copies the build context, constraints.txt with it"


def test_deploy_docs_publish_ports_on_loopback_and_say_what_a_container_must_write() -> None:
    """The `docker run` commands of docs/deploy.md and the Dockerfile: a bare ``-p 8080:8080`` publishes the port on
    every interface of the host. The Docker part says what a read-only root file system needs, as the Kubernetes
    manifests do, and that podman keeps HEALTHCHECK only in the docker format."""
    text = re.sub(r"\\\n\s*", " ", (ROOT / "docs" / "deploy.md").read_text() + DOCKERFILE.read_text())
    published = [p for command in re.findall(r"docker run [^`\n]*", text) for p in re.findall(r"-p (\S+)", command)]
    assert published and all(p.startswith("127.0.0.1:") for p in published), published
    docker_part = (ROOT / "docs" / "deploy.md").read_text().partition("## The image")[2].partition("\n## ")[0]
    home = read_dockerfile().final.last("WORKDIR")
    assert f"docker run --read-only --tmpfs /tmp --tmpfs {home}" in docker_part
    assert "podman build --format docker" in docker_part


# ---- the image's install steps and start command, in a fresh virtual environment ----


def link_torch(venv: Path, into: Path) -> None:
    """Do the Dockerfile's torch step without a 700 MB copy: this environment's torch (the pinned 2.13.0 CPU build)
    and the distributions it requires are linked into ``into``, which a .pth file puts on the venv's path. pip sees
    them installed, as after that step, and installs the rest of servekit's dependencies itself."""
    torch = importlib.metadata.distribution("torch")
    assert torch.version.partition("+")[0] == "2.13.0"
    into.mkdir(parents=True)
    todo, seen = [torch], set()
    while todo:
        dist = todo.pop()
        if canonicalize_name(dist.metadata["Name"]) in seen:
            continue
        seen.add(canonicalize_name(dist.metadata["Name"]))
        site = Path(str(dist.locate_file("")))
        for name in sorted({f.parts[0] for f in dist.files or () if f.parts[0] not in ("..", "__pycache__")}):
            if not (into / name).exists() and not name.endswith(".pth"):
                (into / name).symlink_to(site / name)
        for requirement in map(Requirement, dist.requires or ()):
            if requirement.marker is None or requirement.marker.evaluate({"extra": ""}):
                todo.append(importlib.metadata.distribution(requirement.name))
    (venv / "lib" / f"python{sys.version_info[0]}.{sys.version_info[1]}" / "site-packages" / "torch.pth").write_text(
        f"{into}\n"
    )


def build_stage(stage: Stage, rootfs: Path, work: Path) -> None:
    """Do what the builder stage does, with the image's paths under ``rootfs``: COPY from the build context (the
    repository as .dockerignore filters it), RUN each step, except torch's, which comes from ``link_torch``."""
    workdir = PurePosixPath("/")
    rootfs.mkdir(parents=True, exist_ok=True)
    context = build_context()
    env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "PYTHONPATH")}
    bin_dir = work / "bin"  # `python` on PATH before the venv exists: the base image's interpreter
    bin_dir.mkdir()
    (bin_dir / "python").symlink_to(sys.executable)
    env["PATH"] = f"{rootfs}{VENV}/bin:{bin_dir}:{env.get('PATH', '/usr/bin:/bin')}"
    for instruction in stage.instructions:
        if instruction.keyword == "WORKDIR":
            workdir = workdir / instruction.value
            (rootfs / workdir.relative_to("/")).mkdir(parents=True, exist_ok=True)
        elif instruction.keyword == "COPY":
            *sources, dest = shlex.split(instruction.value)
            assert not any(s.startswith("--") for s in sources), f"COPY {instruction.value}: flags are not done here"
            target = rootfs / (workdir / dest).relative_to("/")
            for source in sources:
                if (ROOT / source).is_file():
                    name = source.rpartition("/")[2]
                    files = {source: target / name if dest.endswith("/") or len(sources) > 1 else target}
                else:
                    inside = "" if source in (".", "./") else source.strip("/") + "/"
                    files = {f: target / f[len(inside) :] for f in context if f.startswith(inside)}
                for file, out in files.items():
                    out.parent.mkdir(parents=True, exist_ok=True)
                    shutil.copy2(ROOT / file, out)
        elif instruction.keyword == "RUN" and "torch==" in instruction.value:
            link_torch(rootfs / VENV.relative_to("/"), work / "torch")
        elif instruction.keyword == "RUN":
            command = instruction.value.replace(str(VENV), f"{rootfs}{VENV}")
            done = subprocess.run(
                ["bash", "-c", command],
                cwd=rootfs / workdir.relative_to("/"),
                env=env,
                capture_output=True,
                text=True,
                timeout=300,
            )
            assert done.returncode == 0, f"RUN {instruction.value}:\n{done.stdout}\n{done.stderr}"


def container_command(dockerfile: Dockerfile, rootfs: Path) -> list[str]:
    """ENTRYPOINT + CMD, without tini (not installed here; it only passes signals on), paths under ``rootfs``."""
    entrypoint = exec_form(dockerfile.final.last("ENTRYPOINT"))
    assert entrypoint[:2] == ["tini", "--"]
    command = entrypoint[2:] + exec_form(dockerfile.final.last("CMD"))
    return [f"{rootfs}{arg}" if arg.startswith("/") else arg for arg in command]


def write_container_config(dockerfile: Dockerfile, rootfs: Path, ports: list[int]) -> Settings:
    """The image's config at its place under ``rootfs``, changed only in ports (on loopback: tests listen nowhere
    else) and in the model store's path."""
    source, dest = container_config(dockerfile)
    values = parse_properties(source.read_text())
    keys = ("inference_address", "management_address", "metrics_address")
    values.update({key: f"http://127.0.0.1:{port}" for key, port in zip(keys, ports, strict=True)})
    values["model_store"] = f"{rootfs}{values['model_store']}"
    path = rootfs / dest.relative_to("/")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(f"{key}={value}\n" for key, value in values.items()))
    return load_settings(path, environ={})


def expected_mlp_output(data: list[float]) -> list[float]:
    """What model_store/mlp answers for one row: its weights in the MLP that tests.helpers builds."""
    model = build_mlp()
    model.load_state_dict(torch.load(ROOT / "model_store" / "mlp" / "mlp.pt", weights_only=True))
    with torch.no_grad():
        return [float(v) for v in model(torch.tensor([data]))[0]]


@pytest.mark.slow
def test_image_install_steps_and_start_command_serve_a_model_and_drain_on_sigterm(tmp_path: Path) -> None:
    dockerfile = read_dockerfile()
    rootfs = tmp_path / "rootfs"
    build_stage(dockerfile.stage("builder"), rootfs, tmp_path)
    venv = rootfs / VENV.relative_to("/")
    located = subprocess.run(
        [venv / "bin" / "python", "-c", "import servekit.cli; print(servekit.cli.__file__)"],
        cwd=tmp_path,
        env={"PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        check=True,
    )
    assert located.stdout.startswith(str(venv)), "servekit is installed into the venv, not linked to the sources"
    listed = subprocess.run(
        [venv / "bin" / "python", "-m", "pip", "list", "--format=json"],
        env={"PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        check=True,
    )
    installed: dict[str, str] = {canonicalize_name(p["name"]): p["version"] for p in json.loads(listed.stdout)}
    pins = constraint_pins()
    assert {name: installed.get(name, "(none)").partition("+")[0] for name in pins} == pins

    ports = [free_port() for _ in range(3)]
    settings = write_container_config(dockerfile, rootfs, ports)
    assert settings.model_store is not None
    shutil.copytree(ROOT / "model_store" / "mlp", settings.model_store / "mlp")
    home = rootfs / PurePosixPath(dockerfile.final.last("WORKDIR")).relative_to("/")
    home.mkdir(parents=True)
    (rootfs / "tmp").mkdir()
    env = {
        "PATH": f"{venv}/bin:/usr/local/bin:/usr/bin:/bin",
        "HOME": str(home),
        "TMPDIR": str(rootfs / "tmp"),
        "PYTHONUNBUFFERED": "1",
        "PYTHONDONTWRITEBYTECODE": "1",
    }
    log = tmp_path / "server.log"
    with open(log, "wb") as out:
        process = subprocess.Popen(
            container_command(dockerfile, rootfs), cwd=home, env=env, stdout=out, stderr=subprocess.STDOUT
        )
    inference, _, metrics = (f"http://127.0.0.1:{port}" for port in ports)
    try:
        wait_healthy(inference, process, log, timeout=120)
        # the image's HEALTHCHECK command, pointed at this port
        health = exec_form(dockerfile.final.last("HEALTHCHECK").partition(" CMD ")[2])
        image_port = load_settings(container_config(dockerfile)[0], environ={}).inference_address.port
        health[-1] = health[-1].replace(f"127.0.0.1:{image_port}/", f"127.0.0.1:{ports[0]}/")
        assert subprocess.run(health, env=env, timeout=30).returncode == 0
        # the Deployment's probes
        container = manifest("Deployment")["spec"]["template"]["spec"]["containers"][0]
        for probe in ("readinessProbe", "livenessProbe"):
            assert httpx.get(inference + container[probe]["httpGet"]["path"], timeout=10).status_code == 200
        # token authorization is on in the image: the key file is in the working directory
        key = json.loads((home / "key_file.json").read_text())["inference"]["key"]
        data = [float(i) for i in range(16)]
        response = httpx.post(
            inference + "/predictions/mlp", json={"data": data}, headers={"Authorization": f"Bearer {key}"}, timeout=60
        )
        assert response.status_code == 200, response.text
        assert response.json() == pytest.approx(expected_mlp_output(data), rel=1e-5, abs=1e-6)
        # numpy is in the image: torch does not warn at import (in the zygote or in each worker)
        assert "Failed to initialize NumPy" not in log.read_text(errors="replace")
        # every series the Prometheus adapter rules read (hpa.yaml's metrics) is there, for the model
        text = httpx.get(metrics + "/metrics", timeout=10).text
        for name in adapter_metric_names():
            assert re.search(rf'^{name}\{{[^}}]*model_name="mlp"', text, re.MULTILINE), name

        # SIGTERM (what tini passes on): drain, stop the workers, remove the key file, exit 0
        process.send_signal(signal.SIGTERM)
        assert process.wait(settings.drain_timeout + 30) == 0, log.read_text(errors="replace")
        assert not (home / "key_file.json").exists()
        with pytest.raises(httpx.ConnectError):
            httpx.get(inference + "/ping", timeout=5)
    finally:
        stop_process(process)

    # the same start with a read-only working directory (a read-only root file system, docs/deploy.md): exit 1 and
    # one line that names the path
    failed = run_read_only(home, container_command(dockerfile, rootfs), env)
    assert failed.returncode == 1, failed.stderr
    assert failed.stderr.startswith(f"servekit: cannot write the token keys to {home / 'key_file.json'} ")
    assert len(failed.stderr.splitlines()) == 1, failed.stderr


# ---- Kubernetes manifests ----


@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_kubernetes_manifests_are_valid_against_the_kubernetes_schemas(version: str) -> None:
    kinds = set()
    for path, document in manifests():
        try:
            kubernetes_validate.validate(document, version, strict=True)
        except kubernetes_validate.ValidationError as exc:
            pytest.fail(f"{path.relative_to(ROOT)}: {document['kind']} {'.'.join(map(str, exc.path))}: {exc.message}")
        kinds.add(document["kind"])
    assert {"Deployment", "Service", "HorizontalPodAutoscaler", "PodDisruptionBudget", "ConfigMap"} <= kinds


def deployment_settings(tmp_path: Path) -> tuple[dict[str, Any], Settings]:
    """The Deployment's container and the settings that its arguments and its ConfigMap give."""
    pod = manifest("Deployment")["spec"]["template"]["spec"]
    container = only(pod["containers"], name="servekit")
    name = only(pod["volumes"], name="config")["configMap"]["name"]
    config_map = next(doc for _, doc in manifests() if doc["kind"] == "ConfigMap" and doc["metadata"]["name"] == name)
    mount = only(container["volumeMounts"], name="config")
    args, _ = start_settings(container["args"])
    assert PurePosixPath(args.ts_config).parent == PurePosixPath(mount["mountPath"])
    (tmp_path / "config.properties").write_text(config_map["data"][PurePosixPath(args.ts_config).name])
    _, settings = start_settings(container["args"], tmp_path / "config.properties")
    assert settings is not None
    return container, settings


def test_kubernetes_deployment_ports_probes_and_store_match_servekits_config(tmp_path: Path) -> None:
    container, settings = deployment_settings(tmp_path)
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {"http": settings.inference_address.port, "metrics": settings.metrics_address.port}
    assert settings.inference_address.host == settings.metrics_address.host == "0.0.0.0"
    assert settings.management_address.host == "127.0.0.1"
    # ready only while /ping is 200 (models loaded, not draining); alive while the process answers
    assert container["readinessProbe"]["httpGet"] == {"path": "/ping", "port": "http"}
    assert container["livenessProbe"]["httpGet"] == {"path": "/v2/health/live", "port": "http"}
    assert container["resources"]["requests"]["cpu"] and container["resources"]["requests"]["memory"]
    # replicas are stateless: no snapshots, and keys every replica shares (a Secret), so a client behind the Service
    # holds one key
    assert not settings.snapshots and not settings.disable_token_authorization
    assert "--disable-token-auth" not in container["args"] and "--dt" not in container["args"]
    pod = manifest("Deployment")["spec"]["template"]["spec"]
    keys = only(container["volumeMounts"], name="keys")
    assert keys["readOnly"] and settings.key_file is not None
    assert settings.key_file.parent == Path(keys["mountPath"])
    secret = only(pod["volumes"], name="keys")["secret"]
    assert secret["items"] == [{"key": settings.key_file.name, "path": settings.key_file.name}]
    assert secret["defaultMode"] & 0o007 == 0, "no one outside servekit's group reads the keys"
    store = only(container["volumeMounts"], name="models")
    assert str(settings.model_store) == store["mountPath"] and store["readOnly"]
    claim = only(pod["volumes"], name="models")["persistentVolumeClaim"]["claimName"]
    assert claim == manifest("PersistentVolumeClaim")["metadata"]["name"]
    # the image's user, and writable folders for what servekit writes under a read-only root
    uid = int(read_dockerfile().final.last("USER").partition(":")[0])
    assert pod["securityContext"]["runAsNonRoot"] and pod["securityContext"]["runAsUser"] == uid
    assert container["securityContext"]["readOnlyRootFilesystem"]
    writable = {m["mountPath"] for m in container["volumeMounts"] if not m.get("readOnly")}
    assert {read_dockerfile().final.last("WORKDIR"), "/tmp"} <= writable


def test_kubernetes_secret_command_makes_a_key_file_that_servekit_accepts(tmp_path: Path) -> None:
    """The commands deployment.yaml's comment gives for the Secret: the first writes a key file servekit takes."""
    text = (KUBERNETES / "deployment.yaml").read_text()
    commands = [line.removeprefix("#").strip() for line in text.splitlines() if line.startswith("#   ")]
    make = next(c for c in commands if "secrets.token_urlsafe" in c)
    create = next(c for c in commands if c.startswith("kubectl create secret"))
    name = only(manifest("Deployment")["spec"]["template"]["spec"]["volumes"], name="keys")["secret"]["secretName"]
    assert f"generic {name} --from-file=key_file.json" in create
    subprocess.run(["bash", "-c", make], cwd=tmp_path, check=True, env={"PATH": os.environ["PATH"]})
    found = read_key_file(tmp_path / "key_file.json")
    assert set(found.keys) == {"inference", "management", "API"} and not found.expiry
    assert stat.S_IMODE((tmp_path / "key_file.json").stat().st_mode) == 0o600


def test_kubernetes_termination_grace_period_covers_prestop_and_drain(tmp_path: Path) -> None:
    container, settings = deployment_settings(tmp_path)
    pod = manifest("Deployment")["spec"]["template"]["spec"]
    sleep = container["lifecycle"]["preStop"]["exec"]["command"]
    assert sleep[0] == "sleep"
    assert pod["terminationGracePeriodSeconds"] >= int(sleep[1]) + settings.drain_timeout + 10


def test_kubernetes_service_pdb_and_hpa_select_the_deployment() -> None:
    deployment = manifest("Deployment")
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert deployment["spec"]["selector"]["matchLabels"].items() <= labels.items()
    service = manifest("Service")
    assert service["spec"]["selector"].items() <= labels.items()
    assert service["spec"].get("sessionAffinity", "None") == "None"
    assert {p["targetPort"] for p in service["spec"]["ports"]} == {"http", "metrics"}
    assert manifest("PodDisruptionBudget")["spec"]["selector"]["matchLabels"].items() <= labels.items()
    hpa = manifest("HorizontalPodAutoscaler")["spec"]
    assert hpa["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": "servekit"}
    assert hpa["minReplicas"] >= 2, "a PodDisruptionBudget of maxUnavailable 1 needs two replicas to keep one"
    assert "replicas" not in deployment["spec"], "the HPA owns the replica count"


def test_kubernetes_hpa_scales_on_servekit_metrics_from_the_adapter_rules_and_on_cpu() -> None:
    metrics = manifest("HorizontalPodAutoscaler")["spec"]["metrics"]
    pods_metrics = {m["pods"]["metric"]["name"] for m in metrics if m["type"] == "Pods"}
    assert pods_metrics == {rule["name"]["as"] for rule in adapter_rules()}
    assert any(m["type"] == "Resource" and m["resource"]["name"] == "cpu" for m in metrics)
    for rule in adapter_rules():
        assert rule["resources"]["overrides"] == {"namespace": {"resource": "namespace"}, "pod": {"resource": "pod"}}
    assert adapter_metric_names() >= {"servekit_queue_depth", "servekit_workers_busy", "servekit_workers_alive"}
    assert all(name.startswith("servekit_") for name in adapter_metric_names())


# ---- KServe ----


def test_kserve_runtime_runs_the_image_command_on_its_inference_port() -> None:
    dockerfile = read_dockerfile()
    settings = load_settings(container_config(dockerfile)[0], environ={})
    runtime = manifest("ServingRuntime", KSERVE)
    container = only(runtime["spec"]["containers"], name="kserve-container")
    args, _ = start_settings(container["args"])
    assert args.ts_config == str(container_config(dockerfile)[1])
    assert args.model_store == "/mnt/models" and args.models == ["all"]
    assert [p["containerPort"] for p in container["ports"]] == [settings.inference_address.port]
    assert container["readinessProbe"]["httpGet"] == {
        "path": "/v2/health/ready",
        "port": settings.inference_address.port,
    }
    assert "v2" in runtime["spec"]["protocolVersions"]
    # token authorization on, with keys from a Secret, the same for every replica
    assert "--disable-token-auth" not in container["args"] and "--dt" not in container["args"]
    env = {item["name"]: item["valueFrom"]["secretKeyRef"] for item in container["env"]}
    assert set(env) == {KEY_VARIABLES["inference"], KEY_VARIABLES["management"]}
    assert len({ref["name"] for ref in env.values()}) == 1 and not any(ref.get("optional") for ref in env.values())
    assert "Authorization: Bearer" in (KSERVE / "inferenceservice.yaml").read_text()
    service = manifest("InferenceService", KSERVE)
    assert service["spec"]["predictor"]["model"]["runtime"] == runtime["metadata"]["name"]
    assert service["spec"]["predictor"]["model"]["protocolVersion"] == "v2"
