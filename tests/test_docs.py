"""The documentation: every command of README.md and docs/migration.md runs and answers what the page shows, the
configuration reference is what its generator renders from the settings schema, and links between pages resolve.

Commands are the lines of a page's ```bash blocks (a line ending in ``\\`` goes on on the next one). A page's blocks
run in order in one bash session, so that variables carry from block to block, in a scratch folder laid out like the
repository (``model_store/``, ``examples/``, ``configs/config.properties``) with ``$TMPDIR`` there too, against
servers that the commands themselves start. ``127.0.0.1:8080``/``8081``/``8082`` in a command, and in
``configs/config.properties``, become free ports.

- Each command must exit 0. ``curl`` runs with ``--fail-with-body``, so it must get a 2xx, unless it prints the status
  itself (``-w``): that is an error example, and its output, status included, is compared with the page.
- A comment under a command, or after it on its line, that starts with ``{``, ``[`` or ``Name(`` is the command's
  output as the page shows it: the output must match it, ``...`` standing for any text. Text after the output, from
  the first ``: `` or `` (`` outside brackets and strings on, explains it and is not compared.
- Commands quoted inline in a page's text and tables (`` `servekit ...` ``, `` `torch-model-archiver ...` ``) hold
  placeholders (``S``, ``m.mar``, ``...``): each flag they use must be one that servekit has.

Commands not run as written (``SUBSTITUTED``), each with its reason, and the one command a page names in its text
that runs first (``PREPARE``).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import importlib.util
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path
from types import ModuleType

import pytest

from servekit import archiver, cli
from tests.helpers import free_port

ROOT = Path(__file__).parent.parent
DOCS = ROOT / "docs"
README = ROOT / "README.md"
MIGRATION = DOCS / "migration.md"
VENV = Path(sys.prefix)  # the environment running the tests: the one `make` installs into
DEFAULT_PORTS = (8080, 8081, 8082)  # configs/config.properties, whose ports the pages' commands use
SUBSTITUTED = {
    "make serve": "runs the Makefile's serve recipe (`make -n serve`, without its install step: the tests run in the "
    "installed environment) in the background; the session goes on once /ping answers, as the README's 'Then, from "
    "another shell' does",
    "make test": "not run: it runs the whole test suite, this test included",
}
# Commands a page names in its text that its blocks depend on: they run before the page's blocks.
PREPARE = {README: ["python model_store/build_examples.py"]}  # the model store that `make serve` serves
OUTPUT = re.compile(r"[\[{]|\w+\(")
FENCE = re.compile(r"^```(\S*)\s*$")
PREAMBLE = r"""
set -o pipefail
curl() {  # an HTTP error fails the command, unless the command prints its status (-w): an error example
    case " $* " in
        *" -w "* | *" --write-out "*) command curl "$@" ;;
        *) command curl --fail-with-body "$@" ;;
    esac
}
serve_until_healthy() {  # $1: the inference port, $2: the server's pid
    for _ in $(seq 1200); do
        command curl -fs "127.0.0.1:$1/ping" >/dev/null && return 0
        kill -0 "$2" 2>/dev/null || { echo "the server exited: $(tail -20 serve.log)" >&2; return 1; }
        sleep 0.1
    done
    echo "the server was not healthy after 120 s: $(tail -20 serve.log)" >&2
    return 1
}
"""


@dataclass(frozen=True, slots=True)
class Command:
    text: str
    line: int  # where it starts in its page
    output: str | None = None  # what the page shows it prints


def split_comment(line: str) -> tuple[str, str | None]:
    """A shell line's code and its comment (from a ``#`` outside quotes that starts a word)."""
    quote: str | None = None
    escaped = False
    for i, char in enumerate(line):
        if escaped:
            escaped = False
        elif char == "\\" and quote != "'":
            escaped = True
        elif quote is not None:
            quote = None if char == quote else quote
        elif char in "'\"":
            quote = char
        elif char == "#" and (i == 0 or line[i - 1].isspace()):
            return line[:i], line[i + 1 :].strip()
    return line, None


def shown_output(comment: str) -> str | None:
    """The output a comment shows, without the explanation after it; ``None`` if the comment shows no output."""
    if not OUTPUT.match(comment):
        return None
    depth, in_string, escaped = 0, False, False
    for i, char in enumerate(comment):
        if in_string:
            escaped, in_string = (False, True) if escaped else (char == "\\", char != '"')
        elif char == '"':
            in_string = True
        elif char in "([{":
            depth += 1
        elif char in ")]}":
            depth -= 1
        elif depth == 0 and comment.startswith((": ", " ("), i):
            return comment[:i]
    return comment


def shell_commands(page: Path) -> list[Command]:
    """The commands of the page's ```bash blocks, in order, each with the output shown for it."""
    found: list[Command] = []
    language: str | None = None  # of the block the line is in; None outside blocks
    pending, start = "", 0
    for number, line in enumerate(page.read_text().splitlines(), 1):
        fence = FENCE.match(line)
        if fence:
            language = fence.group(1) if language is None else None
            continue
        stripped = line.strip()
        if language != "bash" or not (stripped or pending):
            continue
        if not pending and stripped.startswith("#"):
            output = shown_output(stripped[1:].strip())
            if output is not None and found and found[-1].output is None:
                found[-1] = replace(found[-1], output=output)
            continue
        start = start if pending else number
        if stripped.endswith("\\"):
            pending += stripped[:-1].rstrip() + " "
            continue
        code, comment = split_comment(pending + stripped)
        pending = ""
        found.append(Command(code.strip(), start, shown_output(comment) if comment else None))
    assert language is None, f"{page.name}: a code block is not closed"
    return found


def matches(actual: str, shown: str) -> bool:
    pattern = ".*?".join(re.escape(piece) for piece in shown.split("..."))
    return re.fullmatch(pattern, actual.strip(), re.DOTALL) is not None


def with_ports(text: str, ports: tuple[int, ...]) -> str:
    for default, port in zip(DEFAULT_PORTS, ports, strict=True):
        text = re.sub(rf"(?<=:){default}\b", str(port), text)
    return text


def serve_recipe() -> str:
    """What `make serve` runs once the environment is installed."""
    make = ["make", "-s", "-n", "--no-print-directory", "-C", str(ROOT), f"VENV={VENV}", "-o", f"{VENV}/.installed"]
    done = subprocess.run([*make, "serve"], capture_output=True, text=True, check=True)
    lines = done.stdout.strip().splitlines()
    assert len(lines) == 1, f"`make serve` runs more than one command:\n{done.stdout}"
    return lines[0]


def scratch_folder(work: Path, ports: tuple[int, ...], copy_store: bool) -> None:
    """The repository's layout, as the pages' commands expect it, with the config's ports replaced."""
    work.mkdir()
    ignore = shutil.ignore_patterns("__pycache__")
    for name in ("model_store", "examples"):
        if copy_store:
            shutil.copytree(ROOT / name, work / name, ignore=ignore)
        else:
            (work / name).symlink_to(ROOT / name)
    config = (ROOT / "configs" / "config.properties").read_text()
    for port in DEFAULT_PORTS:
        assert f":{port}\n" in config, f"configs/config.properties does not use port {port}: update DEFAULT_PORTS"
    (work / "configs").mkdir()
    # gRPC on free ports too (the pages run side by side; both would take TorchServe's 7070/7071)
    grpc_ports = f"grpc_inference_port={free_port()}\ngrpc_management_port={free_port()}\n"
    (work / "configs" / "config.properties").write_text(with_ports(config, ports) + grpc_ports)


def session_environment(work: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TS_") and k != "LOG_LOCATION"}
    env.update(PATH=f"{VENV / 'bin'}:{env.get('PATH', '/usr/bin:/bin')}", TMPDIR=str(work), PYTHONUNBUFFERED="1")
    return env


def script(commands: list[Command], ports: tuple[int, ...], results: Path) -> str:
    """The bash session: each command's output, errors and exit code into ``results``; stop at the first failure."""
    lines = [PREAMBLE]
    for i, command in enumerate(commands):
        code = with_ports(command.text, ports)
        if command.text == "make serve":
            pids = shlex.quote(str(results / "servers"))
            code = f"{serve_recipe()} </dev/null >serve.log 2>&1 & echo $! >>{pids}; serve_until_healthy {ports[0]} $!"
        elif command.text in SUBSTITUTED:
            code = ":"
        out = shlex.quote(str(results / str(i)))
        lines.append(f"{{ {code}\n}} >{out}.out 2>{out}.err </dev/null; echo $? >{out}.rc\n")
        lines.append(f'[ "$(cat {out}.rc)" = 0 ] || exit 1\n')
    return "".join(lines)


def gone(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return True
    return state == "Z"


def stop_servers(work: Path, results: Path, env: dict[str, str]) -> None:
    """End the servers the session started: `make serve`'s by pid, `servekit start`'s with `servekit stop`."""
    pids = [int(p) for p in (results / "servers").read_text().split()] if (results / "servers").exists() else []
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
    if (work / ".servekit.pid").exists():
        subprocess.run([str(VENV / "bin" / "servekit"), "stop"], cwd=work, env=env, capture_output=True, timeout=90)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and not all(gone(p) for p in pids):
        time.sleep(0.1)
    for pid in pids:
        if not gone(pid):
            os.kill(pid, signal.SIGKILL)


def run_page(page: Path, tmp_path: Path, copy_store: bool) -> None:
    """Run the page's commands; fail naming the first one that exits non-zero or prints what the page does not show."""
    ports = (free_port(), free_port(), free_port())
    work, results = tmp_path / "work", tmp_path / "results"
    scratch_folder(work, ports, copy_store)
    results.mkdir()
    text = page.read_text()
    prepare = [Command(c, 0) for c in PREPARE.get(page, [])]
    for command in prepare:
        assert f"`{command.text}`" in text, f"{page.name} no longer says `{command.text}`: update PREPARE"
    commands = [*prepare, *shell_commands(page)]
    env = session_environment(work)
    try:
        session = subprocess.run(
            ["bash", "-c", script(commands, ports, results)], cwd=work, env=env, capture_output=True, text=True,
            timeout=240,
        )  # fmt: skip
    finally:
        stop_servers(work, results, env)
    for i, command in enumerate(commands):
        where = f"{page.name}:{command.line}: {command.text}"
        rc_file = results / f"{i}.rc"
        assert rc_file.exists(), f"{where} did not run:\n{session.stdout}\n{session.stderr}"
        out, err = (results / f"{i}.out").read_text(), (results / f"{i}.err").read_text()
        assert rc_file.read_text().strip() == "0", f"{where}\nexited {rc_file.read_text().strip()}:\n{out}\n{err}"
        if command.output is not None:
            assert matches(out, command.output), f"{where}\nprinted:\n{out}\nthe page shows:\n{command.output}"


@pytest.fixture(scope="module")
def page_runs(tmp_path_factory: pytest.TempPathFactory) -> dict[Path, BaseException | None]:
    """Both pages' sessions, side by side (they share nothing, and each mostly waits for its server): what failed
    in each, or ``None``."""
    copy_store = {README: True, MIGRATION: False}  # the README rebuilds the example models
    with concurrent.futures.ThreadPoolExecutor(len(copy_store)) as pool:
        runs = {
            page: pool.submit(run_page, page, tmp_path_factory.mktemp(page.stem), copy)
            for page, copy in copy_store.items()
        }
        return {page: run.exception() for page, run in runs.items()}


def test_docs_readme_commands_run_and_answer_as_shown(page_runs: dict[Path, BaseException | None]) -> None:
    assert any(c.text == "make serve" for c in shell_commands(README))
    if (error := page_runs[README]) is not None:
        raise error


def test_docs_migration_guide_commands_run_and_answer_as_shown(page_runs: dict[Path, BaseException | None]) -> None:
    commands = [c.text for c in shell_commands(MIGRATION)]
    assert any(c.startswith("servekit start") for c in commands) and "servekit stop" in commands
    if (error := page_runs[MIGRATION]) is not None:
        raise error


def command_parsers() -> dict[str, argparse.ArgumentParser]:
    parsers = {name: argparse.ArgumentParser(prog=f"servekit {name}") for name in ("start", "stop", "archive")}
    cli._add_start_arguments(parsers["start"])
    archiver.add_arguments(parsers["archive"])
    return parsers


@pytest.mark.parametrize("page", [README, MIGRATION], ids=lambda p: p.name)
def test_docs_inline_commands_use_only_flags_servekit_has(page: Path) -> None:
    parsers = command_parsers()
    quoted = re.findall(r"`((?:servekit (?:start|stop|archive)|torch-model-archiver)\b[^`]*)`", page.read_text())
    assert quoted
    for command in quoted:
        words = command.split()
        name, args = ("archive", words[1:]) if words[0] == "torch-model-archiver" else (words[1], words[2:])
        assert name in parsers, f"{page.name}: `{command}`: servekit has no command {name}"
        known = {flag for action in parsers[name]._actions for flag in action.option_strings}
        unknown = [word for word in args if word.startswith("-") and word.partition("=")[0] not in known]
        assert not unknown, f"{page.name}: `{command}`: servekit {name} has no {unknown}"


def test_docs_commands_are_read_with_the_outputs_shown_for_them(tmp_path: Path) -> None:
    page = tmp_path / "page.md"
    page.write_text(
        "```bash\n"
        "X=1  # set X\n"
        'curl -s 127.0.0.1:8080/ping   # {"status":"Healthy"} (no key needed)\n'
        "curl -s a \\\n"
        "    | python3 -c 'print(\"# not a comment\")'\n"
        "# Counter({7: 1555, 6: 1280}): pixels of blue and green\n"
        "```\n"
        "```yaml\n"
        "not: a command\n"
        "```\n"
    )
    commands = shell_commands(page)
    assert [c.text for c in commands] == [
        "X=1",
        "curl -s 127.0.0.1:8080/ping",
        "curl -s a | python3 -c 'print(\"# not a comment\")'",
    ]
    assert [c.output for c in commands] == [None, '{"status":"Healthy"}', "Counter({7: 1555, 6: 1280})"]
    assert [c.line for c in commands] == [2, 3, 4]
    assert matches('{"blue":0.4931,"green":0.38}\n', '{"blue":0.493...,"green":0.38...}')
    assert not matches('{"blue":0.5}', '{"blue":0.493...}')
    assert (
        with_ports("curl 127.0.0.1:8080/a 127.0.0.1:8081/b :80800", (1, 2, 3))
        == "curl 127.0.0.1:1/a 127.0.0.1:2/b :80800"
    )


def config_generator() -> ModuleType:
    path = DOCS / "gen_config_reference.py"
    spec = importlib.util.spec_from_file_location("gen_config_reference", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_docs_configuration_reference_is_generated_from_the_settings_schema() -> None:
    rendered = config_generator().render()
    assert (DOCS / "configuration.md").read_text() == rendered, (
        "docs/configuration.md is out of date: run python docs/gen_config_reference.py"
    )


def anchors(page: Path) -> set[str]:
    """The anchors of the page's headings, as GitHub makes them."""
    found, in_block = set(), False
    for line in page.read_text().splitlines():
        if FENCE.match(line):
            in_block = not in_block
        elif not in_block and (heading := re.match(r"#+\s+(.*)", line)):
            slug = re.sub(r"[^\w\- ]", "", heading.group(1).strip().lower()).replace(" ", "-")
            found.add(slug)
    return found


def test_docs_links_point_to_existing_pages_and_headings() -> None:
    for page in [README, *sorted(DOCS.glob("*.md"))]:
        for target in re.findall(r"\]\(([^)\s]+)\)", page.read_text()):
            if re.match(r"[a-z]+:", target):
                continue
            path, _, anchor = target.partition("#")
            linked = (page.parent / path).resolve() if path else page
            assert linked.exists(), f"{page.name}: ({target}): no such file"
            if anchor and linked.suffix == ".md":
                assert anchor in anchors(linked), f"{page.name}: ({target}): no such heading"
