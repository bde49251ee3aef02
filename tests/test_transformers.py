"""Hugging Face model folders and token losses, end to end through the CLI, against dense float64 Hessians.

Tiny GPT-2, Llama-style and BERT models are built from configs (nothing is downloaded) and saved as
``save_pretrained`` writes them. The reference is the dense Hessian of the token-mean loss over the
whole dataset, computed independently: ``torch.nn.functional.cross_entropy`` with ``ignore_index=-100``
on the whole dataset at once, and ``torch.autograd.functional.hessian``.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch.func import functional_call
from torch.nn.attention import SDPBackend, sdpa_kernel
from typer.testing import CliRunner

from hesscli.cli import app

transformers = pytest.importorskip("transformers")

runner = CliRunner()
VOCAB, SEQ, N = 7, 6, 5
REL = 1e-8


def _tokens(seed: int) -> dict[str, torch.Tensor]:
    """Five padded sequences; padding differs per row, so batches hold different token counts."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (N, SEQ), generator=g)
    mask = torch.ones(N, SEQ, dtype=torch.long)
    for row, keep in ((1, 4), (3, 2), (4, 5)):
        mask[row, keep:] = 0
    return {"input_ids": ids, "attention_mask": mask}


def _save(model, folder: Path, how: str) -> None:
    if how == "bin":  # what older transformers (and many hub repos) have: pytorch_model.bin
        model.config.save_pretrained(folder)  # a bare config: no "architectures", so --model names the class
        torch.save(model.state_dict(), folder / "pytorch_model.bin")
    elif how == "sharded":
        model.save_pretrained(folder, max_shard_size="1KB")
    else:
        model.save_pretrained(folder)


def _gpt2():
    cfg = transformers.GPT2Config(n_layer=1, n_embd=4, n_head=2, vocab_size=VOCAB, n_positions=8,
                                  bos_token_id=0, eos_token_id=0)
    return transformers.GPT2LMHeadModel(cfg)


def _llama():
    cfg = transformers.LlamaConfig(hidden_size=4, intermediate_size=6, num_hidden_layers=1, num_attention_heads=2,
                                   num_key_value_heads=1, vocab_size=VOCAB, max_position_embeddings=8,
                                   tie_word_embeddings=True, bos_token_id=0, eos_token_id=0, pad_token_id=0)
    return transformers.LlamaForCausalLM(cfg)


def _bert():
    cfg = transformers.BertConfig(hidden_size=4, num_hidden_layers=1, num_attention_heads=2, intermediate_size=6,
                                  vocab_size=VOCAB, max_position_embeddings=8, type_vocab_size=1, num_labels=3,
                                  pad_token_id=0)
    return transformers.BertForSequenceClassification(cfg)


@pytest.fixture(scope="module")
def hf(tmp_path_factory):
    """Folders and data files: GPT-2 (sharded safetensors, labels given), Llama (pytorch_model.bin,
    labels from input_ids), BERT (model.safetensors, one class label per sequence)."""
    root = tmp_path_factory.mktemp("hf")
    torch.manual_seed(0)
    out = {}
    for name, build, how in (("gpt2", _gpt2, "sharded"), ("llama", _llama, "bin"), ("bert", _bert, "single")):
        model = build().eval()
        for p in model.parameters():  # away from the init's tiny values, so curvature is not ~0
            p.data.add_(0.3 * torch.randn_like(p))
        _save(model, root / name, how)
        out[name] = (root / name, model)
    gpt = _tokens(1)
    labels = gpt["input_ids"].clone()
    labels[:, :2] = -100  # a "prompt" left out of the loss
    labels[gpt["attention_mask"] == 0] = -100
    torch.save({**gpt, "labels": labels}, root / "gpt2.pt")
    torch.save(_tokens(2), root / "llama.pt")  # no labels: causal_lm predicts input_ids, padding left out
    bert = _tokens(3)
    torch.save({**bert, "labels": torch.tensor([0, 2, 1, 1, 0])}, root / "bert.pt")
    return root, out


def reference(model, data: dict, loss: str) -> torch.Tensor:
    ref = type(model)(model.config).double().eval()
    ref.load_state_dict(model.state_dict())
    named = list(ref.named_parameters())  # tied weights appear once
    names, shapes = [n for n, _ in named], [p.shape for _, p in named]
    flat = torch.cat([p.detach().reshape(-1) for _, p in named])
    inputs = {k: v for k, v in data.items() if k != "labels"}
    mask = data["attention_mask"]

    def f(theta: torch.Tensor) -> torch.Tensor:
        parts = dict(zip(names, (t.reshape(s) for t, s in zip(theta.split([s.numel() for s in shapes]), shapes))))
        logits = functional_call(ref, parts, (), inputs).logits
        if loss == "causal_lm":
            labels = data.get("labels", data["input_ids"]).masked_fill(mask == 0, -100)
            return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1),
                                   ignore_index=-100)
        return F.cross_entropy(logits, data["labels"])

    with sdpa_kernel([SDPBackend.MATH]):  # the fused CPU kernel has no double backward
        return torch.autograd.functional.hessian(f, flat, vectorize=True)


@pytest.fixture
def rmsnorm_in_model_dtype(monkeypatch):
    """transformers' LlamaRMSNorm normalises in float32 whatever the model's dtype, which makes a float64
    Llama's Hessian symmetric only to ~1e-7; for a 1e-8 comparison it runs in the model's dtype here."""
    from transformers.models.llama import modeling_llama

    def forward(self, hidden_states):
        variance = hidden_states.pow(2).mean(-1, keepdim=True)
        return self.weight * (hidden_states * torch.rsqrt(variance + self.variance_epsilon))

    monkeypatch.setattr(modeling_llama.LlamaRMSNorm, "forward", forward)


def _cli(*args: str) -> dict:
    result = runner.invoke(app, [*args, "--dtype", "float64", "--device", "cpu", "--json"])
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


CASES = {"gpt2": ("causal_lm",), "llama": ("causal_lm", "--model", "transformers:AutoModelForCausalLM"),
         "bert": ("cross_entropy",)}


@pytest.mark.parametrize("name", ["gpt2", "llama", "bert"])
def test_exact_trace_and_eigs_match_dense_hessian_for_every_batch_size(hf, name, rmsnorm_in_model_dtype):
    root, models = hf
    folder, model = models[name]
    loss, *extra = CASES[name]
    data = torch.load(root / f"{name}.pt")
    H = reference(model, data, loss)
    assert torch.allclose(H, H.T, rtol=0, atol=1e-12)
    lam = torch.linalg.eigvalsh(H)
    n_unique = sum(p.numel() for p in model.parameters())
    common = [str(folder), "--data", str(root / f"{name}.pt"), "--loss", loss, *extra, "--out", str(root / "out")]
    for batch_size in (2, 3, 5):  # 2+2+1 and 3+2 are ragged, and their batches hold different token counts
        doc = _cli("trace", *common, "--method", "exact", "--batch-size", str(batch_size))
        assert doc["run"]["n_params"] == n_unique == H.shape[0]
        est = doc["result"]["estimate"]
        assert abs(est - float(torch.trace(H))) <= REL * float(H.diagonal().abs().sum()), (batch_size, est)
    doc = _cli("eigs", *common, "--top-k", "3", "--which", "both", "--batch-size", "2")
    r = doc["result"]
    got = dict(zip(zip(r["which"], r["rank"]), r["eigenvalues"]))
    scale = float(lam.abs().max())
    for i in range(3):
        assert abs(got[("largest", i + 1)] - float(lam[-1 - i])) <= REL * scale
        assert abs(got[("smallest", i + 1)] - float(lam[i])) <= REL * scale
