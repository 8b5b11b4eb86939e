"""kanc.tune: before with the cached/default configs, every launched kernel re-timed, the cache written and read
back, after with the tuned configs. The launcher is a stand-in that uses kanc.codegen.tuning as kanc's kernels do."""

import json

import pytest
import torch
from torch import nn

import kanc
from kanc.codegen import tuning


def _model(tunable_layer):
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), tunable_layer(), nn.Linear(16, 4))


def test_tune_writes_the_cache_and_reports_the_configs(tunable_layer, cache_dir):
    report = kanc.tune(_model(tunable_layer), torch.randn(5, 8), warmup=1, iters=2)
    assert [(e.kernel, e.key, e.config, e.previous) for e in report.entries] == [
        ("_tuned_bwd_kernel", "80,torch.float32", {"BLOCK": 128}, None),
        ("_tuned_fwd_kernel", "80,torch.float32", {"BLOCK": 128}, None),
    ]
    assert all(e.timings_ms == [3.0, 1.0, 2.0] and e.changed for e in report.entries)
    # before: nothing cached, timing off -> the launcher's default; after: the tuned config, read from disk
    assert report.configs_before == {"_tuned_fwd_kernel": [{"BLOCK": 64}], "_tuned_bwd_kernel": [{"BLOCK": 64}]}
    assert report.configs_after == {"_tuned_fwd_kernel": [{"BLOCK": 128}], "_tuned_bwd_kernel": [{"BLOCK": 128}]}
    assert len(report.before_ms) == 2 and len(report.after_ms) == 2 and report.speedup > 0
    cache = json.loads(tuning.cache_path("cpu").read_text())
    assert cache["kernels"]["_tuned_fwd_kernel"]["80,torch.float32"]["config"] == {"BLOCK": 128}
    assert str(tuning.cache_path("cpu")).startswith(str(cache_dir)) and report.cache_path == str(
        tuning.cache_path("cpu")
    )
    text = report.table()
    assert "_tuned_fwd_kernel" in text and "BLOCK=128" in text and "(default)" in text and "ms after" in text
    assert json.loads(json.dumps(report.to_json(), allow_nan=False))["entries"][0]["config"] == {"BLOCK": 128}


def test_second_tune_re_times_and_keeps_the_choice(tunable_layer, cache_dir):
    kanc.tune(_model(tunable_layer), torch.randn(5, 8), warmup=1, iters=1)
    again = kanc.tune(_model(tunable_layer), torch.randn(5, 8), warmup=1, iters=1)
    assert [e.previous for e in again.entries] == [{"BLOCK": 128}, {"BLOCK": 128}]
    assert not any(e.changed for e in again.entries)
    assert again.configs_before == again.configs_after  # the cache already held the tuned configs


def test_forward_only_tunes_the_forward_kernel(tunable_layer, cache_dir):
    report = kanc.tune(_model(tunable_layer), torch.randn(5, 8), train=False, warmup=1, iters=1)
    assert [e.kernel for e in report.entries] == ["_tuned_fwd_kernel"]


def test_no_kernel_means_nothing_to_tune(cache_dir):
    report = kanc.tune(nn.Sequential(kanc.nn.GRKANMlp(8, 16, 8, groups=4)), torch.randn(3, 8), warmup=1, iters=1)
    assert report.entries == [] and report.after_ms == []
    assert report.notes[0].startswith("no tunable kanc kernel ran on cpu: nothing to tune")
    assert not tuning.cache_path("cpu").exists()


def test_tune_restores_the_autotune_mode_and_model_state(tunable_layer, cache_dir):
    model = _model(tunable_layer).eval()
    tuning.set_autotune("1")
    kanc.tune(model, torch.randn(5, 8), warmup=0, iters=1)
    assert tuning.autotune_mode() == "1" and not model.training
    assert all(p.grad is None for p in model.parameters())
    with pytest.raises(kanc.KancError, match="iters"):
        kanc.tune(model, torch.randn(5, 8), iters=0)
