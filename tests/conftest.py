"""Shared fixtures: a tiny model factory file and dataset in ``tmp_path``, the sample run, stable Rich output."""

from __future__ import annotations

import textwrap
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from torch import nn

REPO = Path(__file__).resolve().parents[1]
SAMPLES = REPO / "sample_checkpoints"

NETS_PY = textwrap.dedent(
    '''
    """Factories, data and losses for the loading tests (imported from a file spec)."""
    import torch
    from torch import nn
    from torch.utils.data import DataLoader, TensorDataset


    class TinyMLP(nn.Module):
        def __init__(self, d_in=4, hidden=5, n_out=3):
            super().__init__()
            self.fc1 = nn.Linear(d_in, hidden)
            self.act = nn.Tanh()
            self.fc2 = nn.Linear(hidden, n_out)

        def forward(self, x):
            return self.fc2(self.act(self.fc1(x)))


    def make(hidden=5):
        return TinyMLP(hidden=hidden)


    def frozen_head():
        net = TinyMLP()
        net.fc2.requires_grad_(False)
        return net


    class Wrapped(nn.Module):
        """Has a real submodule called ``model``: its keys must not be stripped."""

        def __init__(self):
            super().__init__()
            self.model = TinyMLP()

        def forward(self, x):
            return self.model(x)


    def broken():
        raise RuntimeError("factory exploded")


    def not_a_module():
        return 42


    def _data():
        g = torch.Generator().manual_seed(1)
        return torch.randn(40, 4, generator=g), torch.randint(0, 3, (40,), generator=g)


    def pair():
        return _data()


    def dataset():
        return TensorDataset(*_data())


    def loader():
        return DataLoader(TensorDataset(*_data()), batch_size=7, shuffle=False)


    def sq_loss(outputs, targets):
        return ((outputs - torch.nn.functional.one_hot(targets, outputs.shape[1]).to(outputs.dtype)) ** 2).mean()
    '''
)


@dataclass
class Tiny:
    """A tiny classification problem on disk: factory file, weights and data.

    Attributes:
        folder: where the files are.
        model: a seeded ``TinyMLP`` (4 -> 5 -> 3, 43 parameters), the weights saved in ``ckpt``.
        inputs, targets: 40 samples, float32 ``[40, 4]`` and int64 ``[40]`` (classes 0..2).
        spec: ``--model`` spec of the factory (``.../nets.py:TinyMLP``).
        data: path of ``data.pt`` (dict ``inputs``/``targets``).
        ckpt: path of ``ckpt.pt`` (bare state_dict of ``model``).
    """

    folder: Path
    model: nn.Module
    inputs: torch.Tensor
    targets: torch.Tensor
    spec: str
    data: str
    ckpt: Path

    def factory(self, name: str) -> str:
        """Spec of another callable in ``nets.py``."""
        return f"{self.folder / 'nets.py'}:{name}"


@pytest.fixture
def tiny(tmp_path: Path) -> Tiny:
    """Tiny problem files in ``tmp_path`` (fresh for each test)."""
    (tmp_path / "nets.py").write_text(NETS_PY)
    namespace: dict[str, object] = {}
    exec(compile(NETS_PY, str(tmp_path / "nets.py"), "exec"), namespace)  # same class as the file spec builds
    torch.manual_seed(0)
    model = namespace["TinyMLP"]()  # type: ignore[operator]
    g = torch.Generator().manual_seed(1)
    inputs, targets = torch.randn(40, 4, generator=g), torch.randint(0, 3, (40,), generator=g)
    torch.save({"inputs": inputs, "targets": targets}, tmp_path / "data.pt")
    torch.save(model.state_dict(), tmp_path / "ckpt.pt")
    return Tiny(folder=tmp_path, model=model, inputs=inputs, targets=targets, spec=f"{tmp_path / 'nets.py'}:TinyMLP",
                data=str(tmp_path / "data.pt"), ckpt=tmp_path / "ckpt.pt")


@pytest.fixture
def samples_dir() -> Path:
    """The committed sample training run (``sample_checkpoints/``)."""
    assert (SAMPLES / "ckpt_step000400.pt").is_file(), "run `make samples` to create sample_checkpoints/"
    return SAMPLES


@pytest.fixture(autouse=True, scope="session")
def _one_thread():
    """The tests use tiny tensors: one intra-op thread avoids OpenMP overhead and oversubscription."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(autouse=True)
def _stable_rich(monkeypatch: pytest.MonkeyPatch) -> None:
    """Wide, colourless Rich output so CLI assertions do not depend on the terminal."""
    monkeypatch.setenv("COLUMNS", "160")
    monkeypatch.setenv("NO_COLOR", "1")
    monkeypatch.delenv("FORCE_COLOR", raising=False)
