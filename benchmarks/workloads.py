"""The benchmark workloads: fixed, seeded models and datasets, trained once and cached.

Every workload is built at run time from scikit-learn's bundled ``load_digits`` (no download)
or synthesised deterministically, trained briefly with full-batch Adam from seed 0, then put in
eval mode. Trained weights are cached under ``benchmarks/out/`` (git-ignored), keyed by the
workload's configuration, so reruns skip training.

* ``W1``: MLP 64-32-10, tanh, cross-entropy on digits (2,410 parameters; the exact float64
  Hessian is affordable and serves as the truth).
* ``W2``: CNN with BatchNorm (eval) on digits as 1x8x8 images (conv 1->16, conv 16->32, BN,
  ReLU, linear 2048->48->10), cross-entropy.
* ``W3``: a small transformer (token + position embeddings, two pre-LayerNorm self-attention
  blocks with ``scaled_dot_product_attention``, MLP head) on a synthetic majority-token task.
* ``W4``: the W2 CNN widened, on digits augmented to ~20k samples (one product takes seconds).
* ``tiny``: a 2-layer MLP on 64 digits, used by the smoke test.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from hesscli.loading.problem import Dataset, LoadedModel, LossSpec, Problem

logger = logging.getLogger(__name__)

OUT_DIR = Path(__file__).resolve().parent / "out"
"""Cache folder for trained weights and references (git-ignored)."""


def cross_entropy(outputs: Tensor, targets: Tensor) -> Tensor:
    """Mean cross-entropy over the batch (the loss every workload uses)."""
    return F.cross_entropy(outputs, targets)


CE = LossSpec("cross_entropy", cross_entropy, is_classification=True)


# ----------------------------------------------------------------------------- models
def digits_mlp(hidden: int = 32) -> nn.Module:
    """MLP 64-hidden-10 with tanh (W1)."""
    return nn.Sequential(nn.Linear(64, hidden), nn.Tanh(), nn.Linear(hidden, 10))


def digits_cnn(c1: int = 8, c2: int = 16, hidden: int = 384) -> nn.Module:
    """CNN on 1x8x8 digits: conv 1->c1, ReLU, 2x2 max-pool, conv c1->c2, BatchNorm, ReLU,
    linear c2*16->hidden->10.

    Built from standard modules only (``nn.Sequential``), so BackPACK's ``extend`` can try it.
    """
    return nn.Sequential(
        nn.Conv2d(1, c1, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(c1, c2, 3, padding=1),
        nn.BatchNorm2d(c2),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(c2 * 16, hidden),
        nn.ReLU(),
        nn.Linear(hidden, 10),
    )


class SelfAttention(nn.Module):
    """Multi-head self-attention through ``F.scaled_dot_product_attention``."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(x).reshape(b, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        h = F.scaled_dot_product_attention(q, k, v)
        return self.proj(h.transpose(1, 2).reshape(b, t, d))


class Block(nn.Module):
    """Pre-LayerNorm transformer block: attention and a GELU MLP, both residual."""

    def __init__(self, dim: int, heads: int, mlp: int) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(dim)
        self.attn = SelfAttention(dim, heads)
        self.ln2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, mlp), nn.GELU(), nn.Linear(mlp, dim))

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))


class TinyTransformer(nn.Module):
    """Token + position embeddings, ``depth`` blocks, final LayerNorm, flatten, MLP head."""

    def __init__(self, vocab: int = 8, seq: int = 8, dim: int = 64, heads: int = 4, mlp: int = 128,
                 depth: int = 2, head_hidden: int = 64, classes: int = 8) -> None:
        super().__init__()
        self.tok = nn.Embedding(vocab, dim)
        self.pos = nn.Parameter(torch.randn(seq, dim) * 0.02)
        self.blocks = nn.ModuleList(Block(dim, heads, mlp) for _ in range(depth))
        self.ln = nn.LayerNorm(dim)
        self.head = nn.Sequential(nn.Linear(seq * dim, head_hidden), nn.GELU(), nn.Linear(head_hidden, classes))

    def forward(self, tokens: Tensor) -> Tensor:
        x = self.tok(tokens) + self.pos
        for block in self.blocks:
            x = block(x)
        return self.head(self.ln(x).flatten(1))


# ----------------------------------------------------------------------------- data
def digits() -> tuple[Tensor, Tensor]:
    """scikit-learn's bundled digits: ``X [1797, 64]`` in [0, 1] (float32) and labels ``[1797]``."""
    from sklearn.datasets import load_digits

    d = load_digits()
    X = torch.tensor(d.data, dtype=torch.float32) / 16.0
    y = torch.tensor(d.target, dtype=torch.long)
    return X, y


def augmented_digits(copies: int = 11, seed: int = 0) -> tuple[Tensor, Tensor]:
    """Digits tiled ``copies`` times as 1x8x8 images; every copy but the first is shifted by one
    pixel in a seeded direction and gets small seeded noise (``copies * 1797`` samples)."""
    X, y = digits()
    img = X.reshape(-1, 1, 8, 8)
    g = torch.Generator().manual_seed(seed)
    xs, ys = [img], [y]
    shifts = [(0, 1), (0, -1), (1, 0), (-1, 0), (1, 1), (-1, -1), (1, -1), (-1, 1)]
    for c in range(1, copies):
        dy, dx = shifts[(c - 1) % len(shifts)]
        shifted = torch.roll(img, shifts=(dy, dx), dims=(2, 3))
        xs.append((shifted + 0.05 * torch.randn(shifted.shape, generator=g)).clamp(0.0, 1.0))
        ys.append(y)
    return torch.cat(xs), torch.cat(ys)


def majority_tokens(n: int = 1024, seq: int = 8, vocab: int = 8, seed: int = 0) -> tuple[Tensor, Tensor]:
    """Synthetic sequences: label = the most frequent token (ties -> the smallest token id)."""
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, vocab, (n, seq), generator=g)
    counts = F.one_hot(tokens, vocab).sum(1)
    return tokens, counts.argmax(1)


# ----------------------------------------------------------------------------- workloads
@dataclass
class WorkloadSpec:
    """How to build one workload (everything that changes its weights goes into ``key``)."""

    name: str
    title: str
    build_model: Callable[[], nn.Module]
    build_data: Callable[[], tuple[Tensor, Tensor]]
    steps: int
    lr: float
    config: dict[str, object] = field(default_factory=dict)
    repeats: int | None = None  # cap on timed repeats (None: the suite's --repeats)

    def key(self) -> str:
        blob = json.dumps({"name": self.name, "steps": self.steps, "lr": self.lr, **self.config},
                          sort_keys=True, default=str)
        return hashlib.sha256(blob.encode()).hexdigest()[:12]


@dataclass
class Workload:
    """A trained model in eval mode plus its whole dataset (one batch, identical for every library).

    Attributes:
        name, title: ``"W2"`` and a one-line description.
        model: float32, eval mode.
        inputs, targets: the full dataset (float32 inputs, integer labels).
        loss: the mean loss as a :class:`LossSpec` (native engine).
        train_loss: mean loss after training.
        accuracy: training-set accuracy.
        key: cache key of the trained weights.
        repeats: cap on timed repeats for slow workloads.
    """

    name: str
    title: str
    model: nn.Module
    inputs: Tensor
    targets: Tensor
    loss: LossSpec
    train_loss: float
    accuracy: float
    key: str
    repeats: int | None = None

    @property
    def n_params(self) -> int:
        return sum(p.numel() for p in self.model.parameters() if p.requires_grad)

    @property
    def n_samples(self) -> int:
        return int(self.inputs.shape[0])

    def criterion(self) -> nn.Module:
        """The loss as an ``nn.Module`` (``reduction='mean'``) for the peer libraries."""
        return nn.CrossEntropyLoss()

    def model_copy(self, dtype: torch.dtype = torch.float32) -> nn.Module:
        """An independent copy of the model in ``dtype`` and eval mode (peers mutate ``.grad``)."""
        return copy.deepcopy(self.model).to(dtype).eval()

    def data(self, dtype: torch.dtype = torch.float32) -> tuple[Tensor, Tensor]:
        """``(inputs, targets)`` with floating inputs cast to ``dtype``."""
        x = self.inputs.to(dtype) if self.inputs.is_floating_point() else self.inputs
        return x, self.targets

    def problem(self, dtype: torch.dtype = torch.float32, model: nn.Module | None = None) -> Problem:
        """The native engine's :class:`Problem`: the whole dataset as one batch, all parameters."""
        model = self.model_copy(dtype) if model is None else model
        x, y = self.data(dtype)
        n = int(x.shape[0])
        data = Dataset(batches=[(x, y)], n_samples=n, n_total=n, source=f"benchmark:{self.name}",
                       input_shape=tuple(x.shape[1:]), target_shape=tuple(y.shape[1:]),
                       target_dtype=str(y.dtype).replace("torch.", ""))
        params = {k: p for k, p in model.named_parameters() if p.requires_grad}
        return Problem(model=model, loss=self.loss, data=data, params=params, frozen=[],
                       device=torch.device("cpu"), dtype=dtype,
                       checkpoint=LoadedModel(model=model, source=f"benchmark:{self.name}"))


def _cnn_data() -> tuple[Tensor, Tensor]:
    X, y = digits()
    return X.reshape(-1, 1, 8, 8), y


SPECS: dict[str, WorkloadSpec] = {
    "tiny": WorkloadSpec("tiny", "MLP 64-8-10 tanh, CE, 64 digits (smoke test)",
                         lambda: digits_mlp(8), lambda: tuple(t[:64] for t in digits()),  # type: ignore[misc]
                         steps=50, lr=1e-2, config={"hidden": 8, "n": 64}),
    "W1": WorkloadSpec("W1", "MLP 64-32-10 tanh, CE, digits (1,797)", digits_mlp, digits,
                       steps=300, lr=1e-2, config={"hidden": 32}),
    "W2": WorkloadSpec("W2", "CNN conv8-pool-conv16-BN(eval)-fc384, CE, digits 1x8x8 (1,797)", digits_cnn,
                       _cnn_data, steps=60, lr=3e-3, config={"c1": 8, "c2": 16, "hidden": 384, "pool": True}),
    "W3": WorkloadSpec("W3", "Transformer 2x(LN+SDPA attention+MLP), CE, majority of 8 tokens (256)",
                       TinyTransformer, lambda: majority_tokens(256), steps=60, lr=3e-3,
                       config={"vocab": 8, "seq": 8, "dim": 64, "heads": 4, "mlp": 128, "depth": 2, "n": 256}),
    "W4": WorkloadSpec("W4", "Wide CNN conv16-pool-conv32-BN(eval)-fc384, CE, augmented digits (19,767)",
                       lambda: digits_cnn(16, 32, 384), lambda: augmented_digits(11), steps=40, lr=3e-3,
                       config={"c1": 16, "c2": 32, "hidden": 384, "copies": 11, "pool": True}, repeats=1),
}
"""Every workload by name."""

ALL = ("W1", "W2", "W3", "W4")
"""The workloads ``python -m benchmarks.run`` runs by default."""


def _train(model: nn.Module, X: Tensor, y: Tensor, steps: int, lr: float) -> None:
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    model.train()
    for _ in range(steps):
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(model(X), y).backward()
        opt.step()
    opt.zero_grad(set_to_none=True)


@torch.no_grad()
def _evaluate(model: nn.Module, X: Tensor, y: Tensor) -> tuple[float, float]:
    out = model(X)
    return float(F.cross_entropy(out, y)), float((out.argmax(1) == y).float().mean())


def load_workload(name: str, *, cache_dir: Path = OUT_DIR) -> Workload:
    """Build (or load from the cache) the trained workload ``name``.

    Args:
        name: a key of :data:`SPECS` (``W1`` .. ``W4``, ``tiny``).
        cache_dir: where trained weights are cached.

    Returns:
        The workload with its model in float32 eval mode.

    Raises:
        KeyError: unknown workload name.
    """
    if name not in SPECS:
        raise KeyError(f"unknown workload {name!r}; choose from {', '.join(SPECS)}")
    spec = SPECS[name]
    X, y = spec.build_data()
    torch.manual_seed(0)
    model = spec.build_model()
    path = cache_dir / f"weights_{name}_{spec.key()}.pt"
    if path.is_file():
        model.load_state_dict(torch.load(path, weights_only=True))
    else:
        logger.info("training %s (%d Adam steps)", name, spec.steps)
        torch.manual_seed(0)
        _train(model, X, y, spec.steps, spec.lr)
        cache_dir.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        torch.save(model.state_dict(), tmp)
        tmp.replace(path)
    model.eval()
    for p in model.parameters():
        p.grad = None
    loss, acc = _evaluate(model, X, y)
    if not math.isfinite(loss):
        raise RuntimeError(f"workload {name}: training diverged (loss {loss}); delete {path} and lower lr")
    return Workload(name=name, title=spec.title, model=model, inputs=X, targets=y, loss=CE,
                    train_loss=loss, accuracy=acc, key=spec.key(), repeats=spec.repeats)
