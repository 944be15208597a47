"""train.precision: what auto picks from the CPU's features, the notice it prints, bad values, the
gradient scaler of fp16, and bf16 training reaching fp32's validation loss."""
from __future__ import annotations

import math

import pytest
import torch
from helpers import needs_shared_data, tiny

from engine.core.errors import InputError
from engine.core.hardware import CpuInfo, cpu_info, parse_cpuinfo
from engine.train.precision import choose_precision
from engine.train.step import MicroBatch, train_step

CPUINFO = """processor\t: 0
vendor_id\t: AuthenticAMD
model name\t: Test CPU 9000
flags\t\t: fpu sse sse2 avx avx2 fma {extra}
"""
CPU = torch.device("cpu")


def _cpu(extra: str) -> CpuInfo:
    return parse_cpuinfo(CPUINFO.format(extra=extra))


@pytest.mark.quick
def test_features_are_read_from_the_cpuinfo_flags():
    c = _cpu("avx512f avx512_bf16")
    assert c.model == "Test CPU 9000"
    assert c.features == {"AMX": False, "AVX512-BF16": True, "AVX-512": True, "AVX2": True}
    assert c.native_bf16
    assert _cpu("amx_bf16 amx_tile avx512f").native_bf16
    assert not _cpu("avx512f").native_bf16
    assert parse_cpuinfo("no flags here") is None
    real = cpu_info()  # this machine, whatever it is: the four features are always answered
    assert set(real.features) == {"AMX", "AVX512-BF16", "AVX-512", "AVX2"}


@pytest.mark.quick
def test_auto_takes_bf16_only_where_the_cpu_computes_it():
    p = choose_precision("auto", CPU, _cpu("avx512f avx512_bf16"))
    assert (p.name, p.warning) == ("bf16", False) and "AVX512-BF16" in p.reason
    p = choose_precision("auto", CPU, _cpu("amx_bf16 avx512f"))
    assert p.name == "bf16" and "AMX" in p.reason
    p = choose_precision("auto", CPU, _cpu("avx512f"))
    assert (p.name, p.warning) == ("fp32", False)
    assert "neither AMX nor AVX512-BF16" in p.reason and "\n" not in p.reason


@pytest.mark.quick
def test_explicit_bf16_without_native_support_runs_with_a_warning():
    p = choose_precision("bf16", CPU, _cpu("avx2"))
    assert (p.name, p.warning) == ("bf16", True)
    assert "emulates" in p.reason and "slow" in p.reason
    assert choose_precision("fp32", CPU, _cpu("avx512_bf16")).name == "fp32"
    with pytest.raises(InputError) as e:
        choose_precision("fp16", CPU, _cpu("avx512_bf16"))
    assert e.value.key == "train.precision"


def test_bad_precision_exits_2_naming_the_key_and_leaves_no_run(cli):
    for value in ("fp8", "fp16"):  # not a precision; a CUDA-only precision on a CPU run
        r = cli("train", "demo", *tiny(f"train.precision={value}"))
        assert r.rc == 2, r.stderr
        assert "train.precision" in r.stderr and r.stderr.count("\n") <= 2
    assert cli("runs", "list", "--json").stdout.strip() == "[]"


@pytest.mark.quick
def test_fp16_scaler_step_skips_an_overflow_without_calling_it_non_finite():
    torch.manual_seed(0)
    w = torch.nn.Parameter(torch.randn(4, 4))
    opt = torch.optim.AdamW([w], lr=0.1)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 8)
    x = torch.randn(8, 4)

    def mb(scale=1.0):
        def f():
            with torch.autocast("cpu", dtype=torch.float16):
                y = x @ w
            return MicroBatch((y.float() * scale).pow(2).mean(), 8)
        return f

    before = w.detach().clone()
    r = train_step(opt, mb(), 1, 1.0, scaler)
    assert r.finite and not torch.equal(w, before)  # an ordinary step updates
    after_ok = w.detach().clone()
    r = train_step(opt, mb(1e30), 1, 1.0, scaler)  # the scaled gradient overflows fp16
    if math.isfinite(r.loss):
        assert r.finite and torch.equal(w, after_ok)  # skipped by the scaler, not a failure
        assert scaler.get_scale() < 2.0 ** 8
    else:
        assert not r.finite and torch.equal(w, after_ok)


def test_auto_on_a_cpu_without_bf16_trains_fp32_with_a_one_line_notice(cli, tmp_path, monkeypatch):
    info = tmp_path / "cpuinfo"
    info.write_text(CPUINFO.format(extra="avx512f"))
    monkeypatch.setenv("MEDISWIFT_CPUINFO", str(info))
    r = cli("train", "demo", *tiny("train.max_steps=2", "train.eval_every=2", "train.checkpoint_every=2", "sparsity.level=0"))
    assert r.rc == 0, r.stderr
    lines = [ln for ln in r.stderr.splitlines() if "precision" in ln]
    assert lines == ["[mediswift] precision fp32 (auto): the CPU (Test CPU 9000) has neither AMX nor AVX512-BF16, "
                     "so bf16 would be emulated"]
    info_json = cli("inspect", r.run_id, "--json")
    import json

    report = json.loads(info_json.stdout)
    assert report["precision"] == "fp32"
    assert report["cpu"]["model"] == "Test CPU 9000" and report["cpu"]["features"]["AVX512-BF16"] is False


@needs_shared_data()
def test_bf16_and_fp32_runs_of_the_demo_preset_reach_the_same_validation_loss(cli):
    """The demo preset (75 % sparse) on the sparse core, shortened to 8 steps of 8 sequences and 2
    validation batches: bf16 (emulated where the CPU lacks it) ends within 0.03 nats of fp32's
    validation loss."""
    val = {}
    for p in ("fp32", "bf16"):
        r = cli("train", "demo", "--set", f"train.precision={p}", "--set", "train.max_steps=8",
                "--set", "train.eval_every=8", "--set", "train.checkpoint_every=8", "--set", "train.eval_batches=2",
                "--set", "train.batch_size=8", "--set", "sparsity.kernel=sparse", timeout=600)
        assert r.rc == 0, r.stderr
        done = r.of_type("run_finished")[0]
        val[p] = done["summary"]["val_loss"]
        assert f"precision {p}" in r.stderr
    assert abs(val["bf16"] - val["fp32"]) < 0.03, val


@pytest.mark.quick
def test_the_sparse_cores_self_check_holds_inside_autocast(monkeypatch):
    """A resumed bf16 run checks the core first inside a training step: under autocast the check once
    compared against bf16 products, failed, and the run left the core for the dense fallback."""
    from engine.model.kernels import ops

    if ops._kernels() is None:
        pytest.skip("numba kernels unavailable")
    monkeypatch.setattr(ops, "_AVAILABLE", {})
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert ops.kernel_available("bf16") and ops.kernel_available("fp32")
