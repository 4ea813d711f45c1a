from pathlib import Path

import pytest
import torch

from loradock.adapters.core.device import DeviceError, resolve_device, resolve_dtype


def test_auto_picks_cuda_only_when_available():
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert resolve_device("auto").type == expected


def test_cpu_is_always_available():
    assert resolve_device("cpu") == torch.device("cpu")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU error path")
@pytest.mark.parametrize("requested", ["cuda", "cuda:0", "cuda:3"])
def test_cuda_without_gpu_is_an_error_not_a_fallback(requested):
    with pytest.raises(DeviceError, match="CUDA is not available"):
        resolve_device(requested)


@pytest.mark.parametrize("requested", ["tpu", "gpu", "", "meta"])
def test_unknown_devices_are_rejected_with_the_value(requested):
    with pytest.raises(DeviceError, match=repr(requested) if requested else "device"):
        resolve_device(requested)


@pytest.mark.parametrize(
    ("requested", "expected"),
    [("float32", torch.float32), ("bfloat16", torch.bfloat16)],
)
def test_dtype_on_cpu(requested, expected):
    assert resolve_dtype(requested, torch.device("cpu")) is expected


def test_auto_on_cpu_is_bf16_for_an_encoder_only_where_the_cpu_runs_bf16():
    from loradock.adapters.core.device import cpu_has_native_bf16

    cpuinfo = Path("/proc/cpuinfo")
    flags = cpuinfo.read_text().split() if cpuinfo.exists() else []
    if "avx512_bf16" in flags or "amx_bf16" in flags:
        assert cpu_has_native_bf16()
    expected = torch.bfloat16 if cpu_has_native_bf16() else torch.float32
    assert resolve_dtype("auto", torch.device("cpu"), "encoder") is expected
    # a causal LM stays float32 on the CPU (bf16 decoding not measured yet)
    assert resolve_dtype("auto", torch.device("cpu"), "causal_lm") is torch.float32


def test_float16_on_cpu_is_refused():
    with pytest.raises(DeviceError, match="float16"):
        resolve_dtype("float16", torch.device("cpu"))


def test_unknown_dtype_is_refused():
    with pytest.raises(DeviceError, match="int8"):
        resolve_dtype("int8", torch.device("cpu"))


@pytest.mark.gpu
def test_auto_dtype_on_cuda_is_half_precision():
    dtype = resolve_dtype("auto", resolve_device("auto"))
    assert dtype in (torch.bfloat16, torch.float16)


# --- CPU threads: the cgroup files as the kernel writes them, in a temporary folder -------------


def cgroup(tmp_path, files: dict[str, str]):
    for name, text in files.items():
        path = tmp_path / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return tmp_path


@pytest.mark.parametrize(
    ("files", "limit"),
    [
        ({"cpu.max": "max 100000\n"}, None),  # v2, no quota
        ({"cpu.max": "150000 100000\n"}, 1.5),  # v2, 1.5 CPUs
        ({"cpu.max": "50000 100000\n"}, 0.5),
        ({"cpu/cpu.cfs_quota_us": "-1\n", "cpu/cpu.cfs_period_us": "100000\n"}, None),  # v1
        ({"cpu/cpu.cfs_quota_us": "300000\n", "cpu/cpu.cfs_period_us": "100000\n"}, 3.0),
        ({"cpu.max": "garbage\n"}, None),  # unreadable: no limit assumed
        ({}, None),  # no cgroup files at all
    ],
)
def test_cgroup_cpu_limit_reads_v1_and_v2(tmp_path, files, limit):
    from loradock.adapters.core.device import cgroup_cpu_limit

    assert cgroup_cpu_limit(cgroup(tmp_path, files)) == limit


def test_available_cpus_is_the_affinity_capped_by_the_quota_rounded_up(tmp_path):
    import os

    from loradock.adapters.core.device import available_cpus

    affinity = len(os.sched_getaffinity(0))
    assert available_cpus(cgroup(tmp_path / "a", {"cpu.max": "max 100000"})) == affinity
    assert available_cpus(cgroup(tmp_path / "b", {"cpu.max": "50000 100000"})) == 1
    assert available_cpus(cgroup(tmp_path / "c", {"cpu.max": "150000 100000"})) == min(affinity, 2)
    assert available_cpus(cgroup(tmp_path / "d", {"cpu.max": "6400000 100000"})) == affinity


def test_configure_threads_sets_torch_and_respects_omp_num_threads(monkeypatch):
    from loradock.adapters.core.device import available_cpus, configure_threads

    before = torch.get_num_threads()
    try:
        monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
        assert configure_threads(3) == 3
        assert torch.get_num_threads() == 3
        assert configure_threads(0) == available_cpus()
        assert torch.get_num_threads() == available_cpus()
        torch.set_num_threads(1)
        monkeypatch.setenv("OMP_NUM_THREADS", "1")  # the operator chose: auto leaves it
        assert configure_threads(0) == 1
        assert configure_threads(2) == 2  # an explicit setting still wins
    finally:
        torch.set_num_threads(before)
