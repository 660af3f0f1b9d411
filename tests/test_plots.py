"""The `plot` extra: `ltm eval --plot` (the inference-time scaling curve) and `benchmarks/inner_loop.py --plot`
render real PNG files, drawn from the results they are given."""

import importlib.util
from pathlib import Path

import pytest
import torch

from ltm import LTMConfig, LTMDecoder
from ltm.cli import main as ltm_main
from ltm.evaluate import plot_scaling

matplotlib = pytest.importorskip("matplotlib", reason="the plot extra (matplotlib) is not installed")
from matplotlib import image  # noqa: E402  (after the skip: needs matplotlib)

ROOT = Path(__file__).resolve().parents[1]
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def check_png(path: Path):
    """A readable PNG of a plot: its signature, a plausible size, and more than a blank canvas."""
    assert path.is_file(), f"{path} was not written"
    assert path.read_bytes()[:8] == PNG_SIGNATURE, f"{path} is not a PNG"
    pixels = torch.from_numpy(image.imread(path))
    height, width = pixels.shape[:2]
    assert height >= 200 and width >= 200, f"{path}: {width} x {height} pixels"
    rgb = pixels[..., :3].reshape(-1, 3)
    drawn = (rgb < 0.9).any(-1).float().mean().item()
    assert drawn > 0.01, f"{path}: only {drawn:.2%} of the pixels are not white"
    assert len(torch.unique(rgb, dim=0)) > 10, f"{path}: too few colours for a plot with axes and data"
    return pixels


@pytest.mark.slow
def test_eval_plot_renders_the_scaling_curve(tmp_path):
    torch.manual_seed(0)
    LTMDecoder(LTMConfig.from_name("ltm-tiny"), backend="eager").save_pretrained(tmp_path / "model")
    (tmp_path / "text.txt").write_text("the quick brown fox jumps over the lazy dog. " * 8)
    png = tmp_path / "curve.png"
    status = ltm_main(
        [
            "eval",
            str(tmp_path / "model"),
            "--text",
            str(tmp_path / "text.txt"),
            "--steps",
            "0",
            "2",
            "--seq-len",
            "16",
            "--batch-size",
            "2",
            "--max-blocks",
            "4",
            "--iw-samples",
            "2",
            "--backend",
            "eager",
            "--plot",
            str(png),
        ]
    )
    assert status == 0
    check_png(png)


def test_eval_plot_draws_the_results_it_is_given(tmp_path):
    def results(scale):
        return [
            dict(T=t, ppl_bound=scale * p, ppl_iw=scale * p * 0.9, iw_samples=4)
            for t, p in ((0, 300.0), (4, 120.0), (16, 80.0))
        ]

    assert plot_scaling(results(1.0), tmp_path / "a.png") and plot_scaling(results(5.0), tmp_path / "b.png")
    a, b = check_png(tmp_path / "a.png"), check_png(tmp_path / "b.png")
    assert a.shape == b.shape and not torch.equal(a, b), "different results must give different plots"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("inner_loop_for_plots", ROOT / "benchmarks" / "inner_loop.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


TINY = [
    "--preset",
    "ltm-tiny",
    "--batch",
    "1",
    "--seq",
    "16",
    "--steps",
    "2",
    "--device",
    "cpu",
    "--dtype",
    "fp32",
    "--check-steps",
    "1",
    "--plot",
]


@pytest.mark.slow
@pytest.mark.parametrize("shape", ["variants", "sweep"])
def test_benchmark_plot_renders(bench, tmp_path, monkeypatch, shape):
    """Bars per variant for one configuration; a curve per variant for a sweep."""
    monkeypatch.setattr(
        bench,
        "measured_matmul_tflops",  # timing the machine: not needed
        lambda device, dtype: {"torch.mm": 1.0, "best": 1.0},
    )
    args = (
        ["--variants", "reference,eager"]
        if shape == "variants"
        else ["--variants", "eager", "--sweep", "steps", "--sweep-values", "1,2"]
    )
    out = tmp_path / "result.json"
    bench.main(TINY + args + ["--out", str(out)])
    check_png(out.with_suffix(".png"))
