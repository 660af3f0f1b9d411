"""benchmarks/inner_loop.py at a tiny size: the JSON it writes, and the correctness gate."""
import importlib.util
import json
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "inner_loop.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("inner_loop_benchmark", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


TINY = ["--preset", "ltm-tiny", "--batch", "2", "--seq", "24", "--steps", "3", "--device", "cpu", "--dtype", "fp32"]


def test_writes_the_result_file(bench, tmp_path):
    out = tmp_path / "result.json"
    result = bench.main(TINY + ["--out", str(out)])
    on_disk = json.loads(out.read_text())
    assert on_disk == json.loads(json.dumps(result))
    assert on_disk["benchmark"] == "inner_loop"
    assert {"commit", "date", "device", "backends", "config", "variants"} <= set(on_disk)
    assert on_disk["device"]["torch"] and on_disk["device"]["name"]
    assert on_disk["config"]["steps"] == 3 and on_disk["config"]["batch"] == 2 and on_disk["config"]["seq"] == 24
    assert set(on_disk["variants"]) == set(bench.VARIANTS)
    for name in ("reference", "eager", "auto"):
        row = on_disk["variants"][name]
        assert row["status"] == "ok", row
        assert len(row["times_s"]) == 1 and row["ms_per_loop"] > 0 and row["tokens_per_s"] > 0
    assert on_disk["variants"]["reference"]["speedup_vs_reference"] == pytest.approx(1.0)


def test_a_wrong_variant_is_reported_not_timed(bench, tmp_path):
    result = bench.main(TINY + ["--variants", "eager,reference", "--out", str(tmp_path / "r.json")],
                        wrong_variant="reference")
    row = result["variants"]["reference"]
    assert row["status"] == "wrong" and "times_s" not in row
    assert result["variants"]["eager"]["status"] == "ok"


def test_bad_arguments_are_refused(bench):
    with pytest.raises(SystemExit):
        bench.main(TINY + ["--variants", "fastest"])
    with pytest.raises(SystemExit):
        bench.main(["--preset", "ltm-tiny", "--seq", "65", "--device", "cpu"])
