"""benchmarks/inner_loop.py at a tiny size: the JSON it writes, the correctness gate, sweeps, training mode."""

import datetime as dt
import importlib.util
import json
from pathlib import Path

import pytest
import torch

from ltm import LTMConfig
from ltm.backends import select_ops

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "inner_loop.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("inner_loop_benchmark", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


TINY = [
    "--preset",
    "ltm-tiny",
    "--batch",
    "2",
    "--seq",
    "24",
    "--steps",
    "3",
    "--device",
    "cpu",
    "--dtype",
    "fp32",
    "--no-memory",
]


def test_writes_the_result_file(bench, tmp_path):
    out = tmp_path / "result.json"
    argv = [a for a in TINY if a != "--no-memory"]  # this test also runs the peak-memory pass
    result = bench.main(argv + ["--variants", "reference,eager,fused,fused+graph", "--out", str(out)])
    on_disk = json.loads(out.read_text())
    assert on_disk == json.loads(json.dumps(result))
    assert on_disk["benchmark"] == "inner_loop"
    assert {"commit", "date", "device", "backends", "peak_tflops", "runs"} <= set(on_disk)
    assert on_disk["device"]["torch"] and on_disk["device"]["name"]
    device = on_disk["device"]
    assert {"cpu", "cpu_isa", "bf16_dot", "threads", "blas", "onednn", "aten_cpu_capability", "cpu_bf16_engine"} <= set(
        device
    )
    assert on_disk["peak_tflops"]["measured_matmul"] > 0
    assert on_disk["matmul_tflops"]["best"] == max(v for k, v in on_disk["matmul_tflops"].items() if k != "best")
    (run,) = on_disk["runs"]
    assert run["config"]["steps"] == 3 and run["config"]["batch"] == 2 and run["config"]["seq"] == 24
    assert run["config"]["model_flops_per_loop"] > 0
    assert run["config"]["final_nll"] is False  # every variant times the same work as the reference
    rows = run["variants"]
    assert set(rows) == {"reference", "eager", "fused", "fused+graph"}
    for name in ("reference", "eager", "fused"):
        row = rows[name]
        assert row["status"] == "ok", row
        assert len(row["times_s"]) == 1 and row["ms_per_loop"] > 0 and row["tokens_per_s"] > 0
        assert 0 < row["mfu_vs_measured_matmul"]
        # Each variant's own process: a high-water mark above torch's import, and the run's page faults.
        assert row["peak_memory_bytes"] > 10**8 and row["minor_faults_per_loop"] >= 0
    # Which implementation each op ran: the file says what was timed.
    assert rows["eager"]["ops"] == {name: "eager" for name in rows["eager"]["ops"]}
    assert rows["fused"]["ops"] == dict(select_ops("auto", torch.device("cpu")).impl)
    assert rows["reference"]["ops"]["lm_head_nll"] == "full logits"
    assert rows["reference"]["speedup_vs_reference"] == pytest.approx(1.0)
    assert rows["fused+graph"]["status"] == "unavailable" and "CUDA" in rows["fused+graph"]["reason"]


def test_a_second_run_on_a_day_keeps_the_first(bench, tmp_path, monkeypatch):
    import common  # the benchmarks' module, as inner_loop.py imports it

    monkeypatch.setattr(common, "RESULTS_DIR", tmp_path)
    bench.main(TINY + ["--variants", "eager"])
    bench.main(TINY + ["--variants", "eager", "--train"])
    bench.main(TINY + ["--variants", "eager"])
    names = sorted(p.name for p in tmp_path.glob("*.json"))
    assert len(names) == 3 and all(str(dt.date.today()) in n for n in names), names
    first, second = sorted(n for n in names if n.startswith("inner_loop_") and "_train_" not in n)
    assert second == first.replace(".json", "_2.json")
    assert sum(n.startswith("inner_loop_train_") for n in names) == 1


def test_cpu_timed_runs_are_interleaved_across_variants(bench, tmp_path, monkeypatch):
    order = []
    time_runs = bench.time_runs

    def logged(run, device, repeats, faults=None):
        order.append(run)
        return time_runs(run, device, repeats, faults)

    monkeypatch.setattr(bench, "time_runs", logged)
    result = bench.main(TINY + ["--variants", "eager,fused", "--repeats", "3", "--out", str(tmp_path / "r.json")])
    rows = result["runs"][0]["variants"]
    assert [len(rows[v]["times_s"]) for v in ("eager", "fused")] == [3, 3]
    eager, fused = order[0], order[1]
    assert order == [eager, fused] * 3  # round-robin, one timed run at a time


def test_a_wrong_variant_is_reported_not_timed(bench, tmp_path):
    result = bench.main(
        TINY + ["--variants", "eager,reference", "--out", str(tmp_path / "r.json")], wrong_variant="reference"
    )
    rows = result["runs"][0]["variants"]
    assert rows["reference"]["status"] == "wrong" and "times_s" not in rows["reference"]
    assert rows["eager"]["status"] == "ok"


def test_sweep_and_training_mode(bench, tmp_path):
    result = bench.main(
        TINY + ["--variants", "eager", "--sweep", "steps", "--sweep-values", "1,2", "--out", str(tmp_path / "s.json")]
    )
    assert [run["config"]["steps"] for run in result["runs"]] == [1, 2]
    result = bench.main(
        TINY + ["--variants", "eager", "--sweep", "latents", "--sweep-values", "1,2", "--out", str(tmp_path / "l.json")]
    )
    assert [run["config"]["n_z"] for run in result["runs"]] == [2, 4]
    result = bench.main(TINY + ["--variants", "reference,fused", "--train", "--out", str(tmp_path / "t.json")])
    assert result["benchmark"] == "inner_loop_train"
    assert all(row["status"] == "ok" for row in result["runs"][0]["variants"].values())


def test_flop_count_matches_a_hand_count():
    """1 layer, d 64, window 2, 3 tokens, 1 latent, vocab 10: counted term by term."""
    cfg = LTMConfig(vocab_size=10, n_layer=1, n_head=1, d_model=64, max_seq_len=4, window_size=2, n_z=1, d_ff=32)
    d, f, n, m, keys = 64, 32, 3, 1, 1 + 2 + 2
    linear = n * (2 * 4 * d * d + 2 * 2 * d * d + 2 * 3 * d * f) + m * 2 * 2 * d * d
    attention = 4 * d * keys + 4 * d * m * n
    head = 2 * n * d * 10
    spec = importlib.util.spec_from_file_location("inner_loop_benchmark", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.inner_step_flops(cfg, 2, n) == 2 * ((linear + attention + head) + (linear + 2 * attention + head))


def test_bad_arguments_are_refused(bench):
    with pytest.raises(SystemExit):
        bench.main(TINY + ["--variants", "fastest"])
    with pytest.raises(SystemExit):
        bench.main(["--preset", "ltm-tiny", "--seq", "65", "--device", "cpu"])
    with pytest.raises(SystemExit):
        bench.main(TINY + ["--sweep-values", "1,2"])
