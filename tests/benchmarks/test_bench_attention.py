"""benchmarks/bench_attention.py at a tiny size on CPU: the JSON it writes and the correctness gate."""

import importlib.util
import json
from pathlib import Path

import ltm_kernels

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "bench_attention.py"


def load():
    spec = importlib.util.spec_from_file_location("bench_attention", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_exact_window_flops():
    bench = load()
    # 5 tokens, window 2: keys seen 1 + 2 + 2 + 2 + 2 = 9
    assert bench.window_keys(5, 2) == 9 and bench.window_keys(4, 100) == 10
    fwd, bwd = bench.self_attention_flops(2, 3, 5, 8, 2)
    assert fwd == 4 * 2 * 3 * 8 * 9 and bwd == 2 * fwd


def test_writes_the_result_file(tmp_path):
    out = tmp_path / "attention.json"
    result = load().main(
        [
            "--device",
            "cpu",
            "--batch",
            "2",
            "--heads",
            "2",
            "--seq",
            "37",
            "--window",
            "5",
            "--head-dim",
            "16",
            "--latents",
            "3",
            "--repeats",
            "2",
            "--warmup",
            "0",
            "--out",
            str(out),
        ]
    )
    on_disk = json.loads(out.read_text())
    assert on_disk == json.loads(json.dumps(result))
    assert on_disk["benchmark"] == "attention" and on_disk["commit"] and on_disk["device"]["torch"]
    assert isinstance(on_disk["device"]["cpu_isa"], list) and on_disk["device"]["cpu"]  # common.environment
    assert on_disk["config"]["seq"] == 37 and on_disk["copy_bandwidth_bytes_per_s"] > 0
    self_rows, cross_rows = on_disk["self_attention"], on_disk["latent_attention"]
    for rows, base in ((self_rows, "sdpa-dense-mask"), (cross_rows, "sdpa")):
        assert rows[base]["status"] == "ok" and len(rows[base]["forward_times_s"]) == 2, rows
        assert rows["triton"]["status"] == "unavailable", rows  # the interpreter is not benchmarked
    assert self_rows["sdpa-causal"]["status"] == "ok" and self_rows["flex-window"]["status"] == "unavailable"
    if ltm_kernels.has_op("self_attention", "cpu"):
        for rows in (self_rows, cross_rows):
            assert rows["cpp"]["status"] == "ok", rows["cpp"]
            assert max(rows["cpp"]["max_rel_error"].values()) < 1e-4
    else:
        assert self_rows["cpp"]["status"] == cross_rows["cpp"]["status"] == "unavailable"
