"""Write the sample training run in this folder: a small CNN trained on scikit-learn's digits.

Deterministic: the same torch version on the same platform writes the same tensors.
Run from anywhere (``make samples`` or ``python sample_checkpoints/make_samples.py``);
``--out DIR`` writes somewhere else.

Writes ``model.py`` (``DigitsCNN``), ``digits.pt`` (dict ``inputs`` float32 [1797, 1, 8, 8]
in [0, 1], ``targets`` int64 [1797]), ``ckpt_step{S:06d}.pt`` for S in 0, 25, 50, 100,
200, 400 (Adam, lr 1e-2, batch 128), each a dict with ``model_state_dict``,
``optimizer_state_dict``, ``epoch``, ``step`` and ``loss`` as a training loop saves it,
and ``hesscli.toml`` so that ``hesscli info ckpt_step000400.pt`` works with no flags.
"""

from __future__ import annotations

import argparse
import importlib.util
import logging
from pathlib import Path

import torch

logger = logging.getLogger("make_samples")

HERE = Path(__file__).resolve().parent
STEPS = (0, 25, 50, 100, 200, 400)
SEED = 0
LR = 1e-2
BATCH = 128

MODEL_SOURCE = '''"""DigitsCNN: the model of the sample training run (written by make_samples.py)."""

from torch import nn


class DigitsCNN(nn.Module):
    """Two conv + BatchNorm + ReLU blocks, a 2x2 max-pool and a two-layer head: 8x8 digits -> 10 classes."""

    def __init__(self, width: int = 8, hidden: int = 32, n_classes: int = 10) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, width, 3, padding=1),
            nn.BatchNorm2d(width),
            nn.ReLU(),
            nn.Conv2d(width, 2 * width, 3, padding=1),
            nn.BatchNorm2d(2 * width),
            nn.ReLU(),
            nn.MaxPool2d(2),
        )
        self.head = nn.Sequential(
            nn.Flatten(),
            nn.Linear(2 * width * 4 * 4, hidden),
            nn.ReLU(),
            nn.Linear(hidden, n_classes),
        )

    def forward(self, x):
        return self.head(self.features(x))
'''

TOML = '''# hesscli settings for this folder: `hesscli info ckpt_step000400.pt` needs no flags.
model = "model.py:DigitsCNN"
data = "digits.pt"
loss = "cross_entropy"

[scan]
glob = "ckpt_*.pt"  # the data file and model.py live in this folder too
'''


def _load_model_class(path: Path) -> type:
    spec = importlib.util.spec_from_file_location("_digits_model", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.DigitsCNN


def make(out: Path) -> list[Path]:
    """Write the model, the data, the checkpoints and the settings file into ``out``."""
    from sklearn.datasets import load_digits

    out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(1)  # bitwise reproducible on one platform
    torch.manual_seed(SEED)

    (out / "model.py").write_text(MODEL_SOURCE)
    (out / "hesscli.toml").write_text(TOML)
    digits = load_digits()
    inputs = torch.tensor(digits.data, dtype=torch.float32).reshape(-1, 1, 8, 8) / 16.0
    targets = torch.tensor(digits.target, dtype=torch.int64)
    torch.save({"inputs": inputs, "targets": targets}, out / "digits.pt")

    model = _load_model_class(out / "model.py")()
    opt = torch.optim.Adam(model.parameters(), lr=LR)
    gen = torch.Generator().manual_seed(SEED)
    n = len(inputs)
    per_epoch = -(-n // BATCH)
    written: list[Path] = []
    step = 0
    order = torch.randperm(n, generator=gen)

    def save() -> None:
        path = out / f"ckpt_step{step:06d}.pt"
        torch.save(
            {
                "model_state_dict": model.state_dict(),
                "optimizer_state_dict": opt.state_dict(),
                "epoch": step // per_epoch,
                "step": step,
                "loss": last_loss,
            },
            path,
        )
        written.append(path)
        logger.info("step %4d  loss %.4f  -> %s", step, last_loss, path.name)

    model.eval()  # step 0 records the loss of the first batch before any update (BatchNorm stats untouched)
    with torch.no_grad():
        last_loss = float(torch.nn.functional.cross_entropy(model(inputs[order[:BATCH]]), targets[order[:BATCH]]))
    model.train()
    while True:
        if step in STEPS:
            save()
        if step == STEPS[-1]:
            break
        b = step % per_epoch
        if b == 0 and step > 0:
            order = torch.randperm(n, generator=gen)
        idx = order[b * BATCH:(b + 1) * BATCH]
        loss = torch.nn.functional.cross_entropy(model(inputs[idx]), targets[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
        last_loss = float(loss.detach())
        step += 1
    return written


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=HERE, help="output folder (default: this folder)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    make(args.out)


if __name__ == "__main__":
    main()
