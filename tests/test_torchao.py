"""modsparse composes with torchao: a real diffusers model whose linear layers torchao quantized
to float8 (weight-only, which runs on CPU) still compiles with backend="modsparse" in both styles,
runs its video self-attention block-sparse, and every sparse call equals a float64 attention over
the lists its plan returned (tests/test_zoo_sparse.py's check). torchao is an optional extra
(``pip install -e ".[test]"`` installs it); without it these tests skip."""
import pytest
import torch

torchao = pytest.importorskip("torchao")
pytest.importorskip("diffusers")

from torchao.quantization import Float8Tensor, Float8WeightOnlyConfig, quantize_  # noqa: E402

from test_zoo_sparse import run_matrix_case  # noqa: E402

pytestmark = pytest.mark.usefixtures("fresh_modcompile")


def quantize_linears(model):
    quantize_(model, Float8WeightOnlyConfig())
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    assert linears and all(isinstance(m.weight, Float8Tensor) for m in linears)
    assert all(m.weight.qdata.dtype == torch.float8_e4m3fn for m in linears)


@pytest.mark.parametrize("style,policy", [("regional", "vmoba"), pytest.param("whole", "mod", marks=pytest.mark.slow)])
def test_float8_quantized_wan_runs_sparse_and_exact_over_its_lists(style, policy, monkeypatch):
    rows, checker = run_matrix_case("wan", style, policy, monkeypatch, prepare=quantize_linears)
    assert rows and any(not dense and d < 1.0 for *_, dense, d in checker.calls)


@pytest.mark.slow
def test_e2e_level_times_a_float8_quantized_wan_in_both_styles(tmp_path):
    """``run e2e --torchao float8``: the dense baseline and both compile styles run the quantized model."""
    import json

    from benchmarks.cli import main
    main(["run", "e2e", "--tiny", "--torchao", "float8", "--policies", "vmoba", "--styles", "whole,regional",
          "--warmup-steps", "1", "--timed-steps", "1", "--num-steps", "4", "--no-attention-share", "--device", "cpu",
          "--out", str(tmp_path), "--no-progress"])
    payload = json.loads((tmp_path / "e2e.json").read_text())
    assert payload["settings"]["linear_layers"] == "torchao float8: weights only"
    assert not payload["settings"]["skipped"], payload["settings"]["skipped"]
    styles = {(r["style"], r["phase"]) for r in payload["rows"] if r["backend"] == "modsparse"}
    assert {("whole", "sparse"), ("regional", "sparse")} <= styles
