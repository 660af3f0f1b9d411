"""benchmarks/common.py: CPU timing samples, the environment record, the result writer."""

import datetime as dt
import json

import common
import pytest
import torch


def test_cpu_timing_gives_one_sample_per_repeat_after_the_warmup():
    calls = []
    times = common.time_runs(lambda: calls.append(1), torch.device("cpu"), repeats=3, warmup=2)
    assert len(times) == 3 and all(t > 0 for t in times)
    assert len(calls) >= 2 + 3  # warm-up and timed calls (Timer adds untimed calls of its own)
    assert common.median([3.0, 1.0, 2.0]) == 2.0
    with pytest.raises(ValueError, match="repeats >= 1"):
        common.time_runs(lambda: None, torch.device("cpu"), repeats=0)


def test_cpu_timing_keeps_the_thread_count():
    seen = []
    common.time_runs(lambda: seen.append(torch.get_num_threads()), torch.device("cpu"), repeats=1, warmup=0)
    assert set(seen) == {torch.get_num_threads()}


def test_environment_records_device_versions_isa_and_commit():
    env = common.environment(torch.device("cpu"))
    assert set(env) == {"date", "commit", "device"} and env["commit"]
    device = env["device"]
    assert device["name"] == device["cpu"] and device["torch"] == torch.__version__ and device["python"]
    assert isinstance(device["cpu_isa"], list) and set(device["cpu_isa"]) <= set(common.CPU_ISA_FLAGS)
    assert "triton" in device and device["threads"] == torch.get_num_threads()


def test_write_result_to_a_path_or_the_results_folder(tmp_path, monkeypatch):
    result = {"benchmark": "x", "device": {"name": "Some CPU @ 2.0GHz", "type": "cpu"}, "value": 1.5}
    out = common.write_result(result, "x", tmp_path / "sub" / "r.json")
    assert json.loads(out.read_text()) == result
    monkeypatch.setattr(common, "RESULTS_DIR", tmp_path)
    out = common.write_result(result, "micro")
    assert out == tmp_path / f"micro_some-cpu---2-0ghz_{dt.date.today()}.json" and json.loads(out.read_text()) == result
    second = common.write_result({**result, "value": 2.5}, "micro")  # a second run that day keeps the first
    assert second == tmp_path / f"micro_some-cpu---2-0ghz_{dt.date.today()}_2.json"
    assert json.loads(out.read_text())["value"] == 1.5 and json.loads(second.read_text())["value"] == 2.5
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []  # no temporary left


def test_shared_names():
    assert issubclass(common.Unavailable, Exception)
    assert common.DTYPES["bf16"] is torch.bfloat16 and common.RESULTS_DIR.name == "results"
