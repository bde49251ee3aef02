"""Curvature that is not finite at the checkpoint is an analysis failure (exit 1), said in one line."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import hesscli
from hesscli.cli import main


class PowNet(nn.Module):
    """``y = x · |w|^1.5``: finite loss and gradient at ``w = 0``, infinite second derivative there."""

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.zeros(12))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x * self.w.abs().pow(1.5)).sum(1, keepdim=True)


def _data():
    g = torch.Generator().manual_seed(0)
    return torch.randn(16, 12, generator=g), torch.randn(16, 1, generator=g)


@pytest.mark.parametrize("analysis, options", [("eigs", {"top_k": 2}), ("trace", {}), ("extremes", {}),
                                               ("density", {"iters": 5, "runs": 2}),
                                               ("landscape", {"directions": "eigs", "steps": 3})])
def test_non_finite_curvature_raises_analysis_error(analysis, options):
    with pytest.raises(hesscli.AnalysisError, match="curvature products are not finite"):
        getattr(hesscli, analysis)(PowNet(), "mse", _data(), dtype="float64", **options)


def test_the_cli_says_so_in_one_line_with_exit_1(tmp_path, capsys):
    (tmp_path / "net.py").write_text(
        "import torch\nfrom torch import nn\n\n"
        "class PowNet(nn.Module):\n"
        "    def __init__(self):\n"
        "        super().__init__()\n"
        "        self.w = nn.Parameter(torch.zeros(12))\n\n"
        "    def forward(self, x):\n"
        "        return (x * self.w.abs().pow(1.5)).sum(1, keepdim=True)\n")
    torch.save(PowNet().state_dict(), tmp_path / "ckpt.pt")
    X, y = _data()
    torch.save({"inputs": X, "targets": y}, tmp_path / "data.pt")
    with pytest.raises(SystemExit) as e:
        main(["eigs", str(tmp_path / "ckpt.pt"), "--model", f"{tmp_path / 'net.py'}:PowNet", "--data",
              str(tmp_path / "data.pt"), "--loss", "mse", "--top-k", "2", "--out", str(tmp_path / "out"), "--quiet"])
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 1 and len(err) == 1 and "curvature products are not finite" in err[0]


def test_only_a_non_finite_product_of_a_finite_vector_is_an_error():
    from hesscli.operators.base import DenseOperator

    A = torch.eye(3, dtype=torch.float64)
    v = torch.tensor([1.0, float("nan"), 0.0], dtype=torch.float64)
    assert torch.isnan(DenseOperator(A).matvec(v)).any()  # NaN in, NaN out: the caller's vector, not the curvature
    A[1, 1] = float("inf")
    with pytest.raises(hesscli.AnalysisError, match="curvature products are not finite"):
        DenseOperator(A).matvec(torch.ones(3, dtype=torch.float64))
