"""benchmarks/profile_inner_loop.py at a tiny size: the ops table it writes, and its argument checks."""

import json

import profile_inner_loop as profiler
import pytest

TINY = ["--preset", "ltm-tiny", "--batch", "1", "--seq", "16", "--steps", "2", "--variant", "eager"]


def test_writes_the_ops_table(tmp_path):
    out = tmp_path / "profile.json"
    result = profiler.main(TINY + ["--out", str(out)])
    on_disk = json.loads(out.read_text())
    assert on_disk == json.loads(json.dumps(result))
    assert on_disk["benchmark"] == "profile" and on_disk["config"]["variant"] == "eager"
    assert {"commit", "device"} <= set(on_disk) and on_disk["ms_per_loop"] > 0
    ops = on_disk["ops"]
    assert ops and abs(sum(r["share"] for r in ops) - 1) < 1e-6
    assert [r["share"] for r in ops] == sorted((r["share"] for r in ops), reverse=True)
    assert any(r["op"].startswith("aten::") for r in ops)


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--batch", "0"], "--batch must be >= 1"),
        (["--loops", "-1"], "--loops must be >= 1"),
        (["--variant", "nope"], "invalid choice: 'nope'"),
        (["--preset", "ltm-huge"], "invalid choice: 'ltm-huge'"),
        (["--device", "tpu"], "invalid choice: 'tpu'"),
    ],
)
def test_bad_arguments_name_the_argument(capsys, argv, message):
    with pytest.raises(SystemExit) as exc:
        profiler.parse_args(argv)
    assert exc.value.code == 2 and message in capsys.readouterr().err
