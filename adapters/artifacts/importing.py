"""Imports: an uploaded zip becomes verified version files, or is refused with the reason why.

An import is untrusted input. Nothing in it is stored before every check below has passed:
- the archive: a real zip, at most `max_bytes` compressed and uncompressed (checked while reading,
  not trusted from the headers: zip bombs stop at the cap), flat (no folders, no `..`, no absolute
  paths, no symlinks), not encrypted, no duplicate names, only `.json` and `.safetensors` files;
- integrity: when `manifest.json` is present, every file must match its sha256 and nothing may be
  missing or extra (a download from loradock always has it);
- fit with this base: `loradock.json` names the same base fingerprint; the head is
  [classes or 1, hidden] with a matching bias; every LoRA matrix targets a Linear layer of this base
  that the serving slots cover, with A [rank, in] and B [out, rank] of that layer's shape, a rank no
  larger than the server's maximum and agreeing with `adapter_config.json`; every tensor is
  floating point and finite; the optional reference profile has embeddings of the hidden size.
Only safetensors and JSON are parsed; nothing is unpickled or executed.
"""

from __future__ import annotations

import io
import json
import math
import re
import stat
import zipfile
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from safetensors.torch import load as st_load

from loradock.adapters import tasks
from loradock.adapters.artifacts.files import (
    HEAD,
    META,
    PEFT_CONFIG,
    PEFT_WEIGHTS,
    REFERENCE_JSON,
    REFERENCE_TENSORS,
    ArtifactError,
    check_fits_base,
)
from loradock.adapters.artifacts.store import (
    MANIFEST,
    ArtifactCorrupt,
    Manifest,
    StoreError,
    validate_filename,
    verify_file,
)
from loradock.adapters.core.base import BaseModel
from loradock.adapters.core.lora import PEFT_PREFIX
from loradock.adapters.tasks.base import Task, TaskStateError

MAX_FILES = 16
_LORA_KEY = re.compile(rf"^{re.escape(PEFT_PREFIX)}(.+)\.lora_([AB])\.weight$")


class ImportRejected(ArtifactError):
    """The upload is not an adapter this server can take; the message says why."""


class ImportTooLarge(ImportRejected):
    """The archive, packed or unpacked, is over the size limit."""


@dataclass
class ImportedVersion:
    """Verified files of one version (manifest excluded: the store writes a new one)."""

    meta: dict[str, Any]
    files: dict[str, bytes]

    @property
    def task(self) -> Task:
        return tasks.from_meta(self.meta)


def read_zip(data: bytes, *, max_bytes: int) -> dict[str, bytes]:
    """The files of a flat zip of JSON and safetensors, read with a hard size cap."""
    if len(data) > max_bytes:
        raise ImportTooLarge(f"the archive is {len(data)} bytes, the limit is {max_bytes}")
    try:
        zf = zipfile.ZipFile(io.BytesIO(data))
    except (zipfile.BadZipFile, ValueError) as e:
        raise ImportRejected(f"not a zip archive: {e}") from e
    files: dict[str, bytes] = {}
    total = 0
    with zf:
        infos = zf.infolist()
        if len(infos) > MAX_FILES:
            raise ImportRejected(f"the archive holds {len(infos)} entries, at most {MAX_FILES}")
        for info in infos:
            name = info.filename
            _check_entry(info)
            if name in files:
                raise ImportRejected(f"{name!r} appears twice in the archive")
            total += info.file_size
            if total > max_bytes:
                raise ImportTooLarge(f"the archive unpacks to more than {max_bytes} bytes")
            try:
                with zf.open(info) as f:
                    raw = f.read(max_bytes - (total - info.file_size) + 1)
            except (zipfile.BadZipFile, NotImplementedError, RuntimeError, OSError) as e:
                raise ImportRejected(f"{name!r} cannot be read from the archive: {e}") from e
            if len(raw) != info.file_size:  # headers lie: the real size decides
                raise ImportRejected(f"{name!r} is not the size its zip header says")
            files[name] = raw
    if not files:
        raise ImportRejected("the archive is empty")
    return files


def _check_entry(info: zipfile.ZipInfo) -> None:
    name = info.filename
    if info.is_dir() or "/" in name or "\\" in name or name.startswith(".") or ":" in name:
        raise ImportRejected(
            f"{name!r}: the archive must hold the version's files at its top level "
            "(no folders, no '..', no absolute paths)"
        )
    if stat.S_ISLNK(info.external_attr >> 16):
        raise ImportRejected(f"{name!r} is a symbolic link")
    if info.flag_bits & 0x1:
        raise ImportRejected(f"{name!r} is encrypted")
    if name == MANIFEST:
        return
    try:
        validate_filename(name)
    except StoreError as e:
        raise ImportRejected(f"{e}; only .json and .safetensors files are accepted") from e


def validate_import(
    files: Mapping[str, bytes],
    base: BaseModel,
    *,
    served_modules: Collection[str],
    max_rank: int,
) -> ImportedVersion:
    """Check the files against this base and these serving slots; refuse anything off."""
    files = dict(files)
    manifest_raw = files.pop(MANIFEST, None)
    if manifest_raw is not None:
        _check_manifest(manifest_raw, files)
    if META not in files:
        raise ImportRejected(f"{META} is missing: the archive is not a loradock adapter version")
    meta = _json_object(files, META)
    try:
        check_fits_base(meta, base, META)
    except ArtifactError as e:
        raise ImportRejected(str(e)) from e
    try:
        task = tasks.get(str(meta.get("task")))
    except tasks.UnknownTask:
        raise ImportRejected(
            f"{META}: task must be one of {tasks.names()}, not {meta.get('task')!r}"
        ) from None
    if task.base_kind != base.kind:
        raise ImportRejected(
            f"{META}: task {task.name!r} is served by a {task.base_kind} base; this server's "
            f"base is a {base.kind}"
        )
    try:
        outputs = task.from_meta(meta).n_outputs
    except TaskStateError as e:
        raise ImportRejected(f"{META}: {e}") from e
    if task.has_head:
        _check_head(files, outputs, base.hidden_size)
    peft_files = {PEFT_CONFIG, PEFT_WEIGHTS} & files.keys()
    if meta.get("has_lora"):
        _check_lora(files, meta, base, served_modules, max_rank)
    elif peft_files:
        raise ImportRejected(f"{META} says has_lora=false but {sorted(peft_files)} are present")
    _check_reference(files, base.hidden_size)
    unknown = sorted(
        set(files) - {META, HEAD, PEFT_CONFIG, PEFT_WEIGHTS, REFERENCE_JSON, REFERENCE_TENSORS}
    )
    if unknown:
        raise ImportRejected(f"unexpected files {unknown}")
    return ImportedVersion(meta=meta, files=files)


def _check_manifest(raw: bytes, files: Mapping[str, bytes]) -> None:
    try:
        manifest = Manifest.from_json(raw, "import")
    except StoreError as e:
        raise ImportRejected(f"{MANIFEST}: {e}") from e
    missing = sorted(set(manifest.files) - set(files))
    extra = sorted(set(files) - set(manifest.files))
    if missing or extra:
        raise ImportRejected(
            f"{MANIFEST} does not match the archive: missing {missing}, not listed {extra}"
        )
    for name, entry in manifest.files.items():
        try:
            verify_file("import", name, entry, files[name])
        except ArtifactCorrupt as e:
            raise ImportRejected(f"{name!r} does not match its sha256 in {MANIFEST}") from e


def _json_object(files: Mapping[str, bytes], name: str) -> dict[str, Any]:
    try:
        value = json.loads(files[name])
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ImportRejected(f"{name}: not valid JSON: {e}") from e
    if not isinstance(value, dict):
        raise ImportRejected(f"{name}: must be a JSON object")
    return value


def _tensors(files: Mapping[str, bytes], name: str) -> dict[str, torch.Tensor]:
    try:
        tensors = st_load(files[name])
    except Exception as e:  # safetensors raises its own error types for malformed headers
        raise ImportRejected(f"{name}: not a valid safetensors file: {e}") from e
    for key, t in tensors.items():
        if not t.is_floating_point():
            raise ImportRejected(f"{name}: tensor {key!r} is {t.dtype}, not floating point")
        if not bool(torch.isfinite(t).all()):
            raise ImportRejected(f"{name}: tensor {key!r} holds NaN or infinite values")
    return tensors


def _check_head(files: Mapping[str, bytes], outputs: int, hidden: int) -> None:
    if HEAD not in files:
        raise ImportRejected(f"{HEAD} is missing")
    head = _tensors(files, HEAD)
    if set(head) != {"weight", "bias"}:
        raise ImportRejected(
            f"{HEAD}: needs exactly the tensors weight and bias, has {sorted(head)}"
        )
    if tuple(head["weight"].shape) != (outputs, hidden) or tuple(head["bias"].shape) != (outputs,):
        raise ImportRejected(
            f"{HEAD}: weight {tuple(head['weight'].shape)} / bias {tuple(head['bias'].shape)}, "
            f"this base and task need ({outputs}, {hidden}) / ({outputs},)"
        )


def _check_lora(
    files: Mapping[str, bytes],
    meta: dict[str, Any],
    base: BaseModel,
    served_modules: Collection[str],
    max_rank: int,
) -> None:
    for name in (PEFT_CONFIG, PEFT_WEIGHTS):
        if name not in files:
            raise ImportRejected(f"{META} says has_lora=true but {name} is missing")
    spec = meta.get("lora")
    if not isinstance(spec, dict):
        raise ImportRejected(f"{META}: lora must be an object")
    rank, alpha, dropout = spec.get("rank"), spec.get("alpha"), spec.get("dropout", 0.0)
    if not isinstance(rank, int) or not 1 <= rank <= max_rank:
        raise ImportRejected(
            f"{META}: LoRA rank {rank!r} must be an integer from 1 to {max_rank} "
            "(this server's max_lora_rank)"
        )
    if not isinstance(alpha, int | float) or not math.isfinite(alpha) or alpha <= 0:
        raise ImportRejected(f"{META}: LoRA alpha must be a finite number > 0")
    if not isinstance(dropout, int | float) or not 0 <= dropout < 1:
        raise ImportRejected(f"{META}: LoRA dropout must be in [0, 1)")
    targets = spec.get("target_modules")
    if not isinstance(targets, list) or not all(isinstance(t, str) for t in targets):
        raise ImportRejected(f"{META}: lora.target_modules must be a list of names")
    config = _json_object(files, PEFT_CONFIG)
    if config.get("peft_type") != "LORA" or config.get("r") != rank:
        raise ImportRejected(
            f"{PEFT_CONFIG}: peft_type {config.get('peft_type')!r} r={config.get('r')!r} does not "
            f"match {META} (LORA, rank {rank})"
        )
    shapes = {t.name: (t.in_features, t.out_features) for t in base.linear_targets()}
    tensors = _tensors(files, PEFT_WEIGHTS)
    seen: set[str] = set()
    for key, t in tensors.items():
        match = _LORA_KEY.match(key)
        if match is None:
            raise ImportRejected(f"{PEFT_WEIGHTS}: unexpected tensor {key!r}")
        module, part = match.group(1), match.group(2)
        if base.lm_prefix and module.startswith(base.lm_prefix):  # keys of the whole causal LM
            module = module.removeprefix(base.lm_prefix)
        if module not in shapes:
            raise ImportRejected(f"{PEFT_WEIGHTS}: {module!r} is not a Linear layer of this base")
        if module not in served_modules:
            raise ImportRejected(
                f"{PEFT_WEIGHTS}: {module!r} is not served by this server "
                "(setting LORADOCK_SERVE_TARGET_MODULES)"
            )
        d_in, d_out = shapes[module]
        want = (rank, d_in) if part == "A" else (d_out, rank)
        if tuple(t.shape) != want:
            raise ImportRejected(
                f"{PEFT_WEIGHTS}: {key} has shape {tuple(t.shape)}, this base needs {want}"
            )
        seen.add(f"{module}:{part}")
    modules = {s.split(":")[0] for s in seen}
    if not modules:
        raise ImportRejected(f"{PEFT_WEIGHTS} holds no LoRA matrices")
    unpaired = sorted(m for m in modules if not {f"{m}:A", f"{m}:B"} <= seen)
    if unpaired:
        raise ImportRejected(f"{PEFT_WEIGHTS}: {unpaired[:3]} lack lora_A or lora_B")


def _check_reference(files: Mapping[str, bytes], hidden: int) -> None:
    present = {REFERENCE_JSON, REFERENCE_TENSORS} & files.keys()
    if not present:
        return  # allowed: monitoring then reports that there is no reference profile
    if len(present) == 1:
        raise ImportRejected(f"the reference profile needs both {REFERENCE_JSON} and "
                             f"{REFERENCE_TENSORS}, only {sorted(present)} is present")  # fmt: skip
    profile = _json_object(files, REFERENCE_JSON)
    if profile.get("format") != 1:
        raise ImportRejected(f"{REFERENCE_JSON}: unsupported format {profile.get('format')!r}")
    emb = _tensors(files, REFERENCE_TENSORS).get("embeddings")
    if emb is None or emb.dim() != 2 or emb.shape[1] != hidden or emb.shape[0] < 1:
        raise ImportRejected(
            f"{REFERENCE_TENSORS}: needs embeddings of shape [n, {hidden}] for this base"
        )
