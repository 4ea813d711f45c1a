import subprocess
import sys

import pytest
import torch

from loradock.service.settings import Settings


def run_cli(*args, timeout=120):
    return subprocess.run(
        [sys.executable, "-m", "loradock.service.cli", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def test_serve_help_lists_every_setting():
    result = run_cli("serve", "--help")
    assert result.returncode == 0
    for name in Settings.model_fields:
        assert "--" + name.replace("_", "-") in result.stdout
        assert f"LORADOCK_{name.upper()}" in result.stdout


def test_wrong_base_model_path_fails_fast_and_names_it(tmp_path):
    missing = tmp_path / "no-model-here"
    result = run_cli("serve", "--base-model", str(missing), "--data-dir", str(tmp_path / "d"))
    assert result.returncode == 2
    assert str(missing) in result.stderr
    assert "config.json" in result.stderr  # says what was expected
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "d").exists()  # failed before touching state


def test_directory_that_is_not_a_model_fails_fast(tmp_path):
    (tmp_path / "notes.txt").write_text("hi")
    result = run_cli("serve", "--base-model", str(tmp_path))
    assert result.returncode == 2
    assert "has no config.json" in result.stderr


def test_invalid_setting_is_reported(tmp_path):
    result = run_cli("serve", "--port", "not-a-port")
    assert result.returncode == 2
    assert "port" in result.stderr


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU error path")
def test_cuda_on_a_cpu_machine_fails_fast(tmp_path):
    result = run_cli("serve", "--device", "cuda", "--data-dir", str(tmp_path / "d"))
    assert result.returncode == 2
    assert "CUDA is not available" in result.stderr


def test_no_command_shows_usage():
    result = run_cli()
    assert result.returncode == 2
    assert "serve" in result.stderr


@pytest.mark.parametrize("given", ['["query", "value"]', "query,value", " query , value "])
def test_list_settings_work_as_options_like_their_environment_variable(given, monkeypatch):
    from loradock.service.cli import build_parser, load_settings

    args = build_parser().parse_args(["serve", "--serve-target-modules", given])
    overrides = {k: v for k, v in vars(args).items() if k != "command"}
    assert load_settings(overrides).serve_target_modules == ["query", "value"]
    monkeypatch.setenv("LORADOCK_SERVE_TARGET_MODULES", '["query", "value"]')
    assert Settings().serve_target_modules == ["query", "value"]  # the same as the env var


def test_a_malformed_list_option_is_a_clear_error():
    result = run_cli("serve", "--serve-target-modules", '["query"')
    assert result.returncode == 2
    assert "serve_target_modules" in result.stderr
    assert "Traceback" not in result.stderr
