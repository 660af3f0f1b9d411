"""benchmarks/bench_lm_head.py at a tiny size on CPU: the JSON it writes and the correctness gate."""

import importlib.util
import json
from pathlib import Path

from ltm_kernels import extension_status

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "bench_lm_head.py"


def load():
    spec = importlib.util.spec_from_file_location("bench_lm_head", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_writes_the_result_file(tmp_path):
    out = tmp_path / "lm_head.json"
    result = load().main(
        [
            "--device",
            "cpu",
            "--tokens",
            "96",
            "--batch",
            "3",
            "--d",
            "16",
            "--vocab",
            "4099",
            "--chunk-size",
            "16",
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
    assert on_disk["benchmark"] == "lm_head" and on_disk["commit"] and on_disk["device"]["torch"]
    assert isinstance(on_disk["device"]["cpu_isa"], list) and on_disk["device"]["cpu"]  # common.environment
    assert on_disk["config"]["tokens"] == 96 and on_disk["config"]["chunk_rows"] == 16
    for mode in ("inner", "train"):
        rows = on_disk["runs"][mode]
        assert rows["eager"]["status"] == "ok" and rows["chunked"]["status"] == "ok", rows
        assert len(rows["chunked"]["times_ms"]) == 2
        assert max(rows["chunked"]["max_rel_error_vs_eager"].values()) < 1e-4
        # 96 x 4099 logits vs 16-row chunks: the measured peak must show it
        assert rows["chunked"]["memory_ratio_vs_eager"] > 2, rows
        assert rows["triton"]["status"] == "unavailable" and rows["liger"]["status"] == "unavailable"
        if extension_status()[0]:
            assert rows["cpp"]["status"] == "ok", rows
            assert max(rows["cpp"]["max_rel_error_vs_eager"].values()) < 1e-4
        else:
            assert rows["cpp"]["status"] == "unavailable"


def test_without_eager_the_ratios_are_absent_not_nan(tmp_path, capsys):
    tiny = ["--device", "cpu", "--tokens", "32", "--batch", "2", "--d", "16", "--vocab", "301", "--repeats", "1"]
    result = load().main([*tiny, "--warmup", "0", "--variants", "chunked", "--out", str(tmp_path / "r.json")])
    printed = capsys.readouterr().out
    assert "nan" not in printed.lower(), printed
    for rows in result["runs"].values():
        assert rows["chunked"]["status"] == "ok", rows
        assert "speedup_vs_eager" not in rows["chunked"] and "memory_ratio_vs_eager" not in rows["chunked"]
