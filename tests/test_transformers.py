"""Hugging Face model folders and token losses, end to end through the CLI, against dense float64 Hessians.

Tiny GPT-2, Llama-style and BERT models are built from configs (nothing is downloaded) and saved as
``save_pretrained`` writes them. The reference is the dense Hessian of the token-mean loss over the
whole dataset, computed independently: ``torch.nn.functional.cross_entropy`` with ``ignore_index=-100``
on the whole dataset at once, and ``torch.autograd.functional.hessian``.
"""

from __future__ import annotations

import copy

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch.func import functional_call
from torch.nn.attention import SDPBackend, sdpa_kernel
from typer.testing import CliRunner

from hesscli.cli import app, main

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
    scale = float(lam.abs().max())
    for batch_size in (2, 3):
        r = _cli("eigs", *common, "--top-k", "3", "--which", "both", "--batch-size", str(batch_size))["result"]
        got = dict(zip(zip(r["which"], r["rank"]), r["eigenvalues"]))
        for i in range(3):
            assert abs(got[("largest", i + 1)] - float(lam[-1 - i])) <= REL * scale, (batch_size, i)
            assert abs(got[("smallest", i + 1)] - float(lam[i])) <= REL * scale, (batch_size, i)


def test_trainer_output_folder_is_a_series_ordered_by_step(hf):
    """checkpoint-N/ folders: steps from trainer_state.json (else the name), numeric order, labelled by folder."""
    import pandas as pd

    root, models = hf
    _, model = models["gpt2"]
    run = root / "trainer_out"
    for step, with_state in ((100, True), (5, True), (10, False)):
        folder = run / f"checkpoint-{step}"
        trained = copy.deepcopy(model)  # other weights at every step (the same bytes are analysed once)
        with torch.no_grad():
            trained.transformer.ln_f.bias.add_(1e-3 * step)
        trained.save_pretrained(folder)
        if with_state:
            (folder / "trainer_state.json").write_text(json.dumps({"global_step": step, "epoch": 1.0}))
    (run / "runs").mkdir()  # TensorBoard logs and other folders without a model are not checkpoints
    torch.save({"learning_rate": 0.1}, run / "training_args.bin")  # a Trainer file that holds no model
    out = root / "trainer_scan"
    result = runner.invoke(app, ["scan", str(run), "--data", str(root / "gpt2.pt"), "--loss", "causal_lm",
                                 "--analyses", "trace", "--method", "exact", "--batch-size", "2",
                                 "--dtype", "float64", "--device", "cpu", "--out", str(out), "--quiet"])
    assert result.exit_code == 0, result.output
    runs = pd.read_parquet(out / "runs").sort_values("started_at", kind="stable")
    assert list(runs["step"]) == [5, 10, 100]
    assert [Path(c).name for c in runs["checkpoint"]] == ["checkpoint-5", "checkpoint-10", "checkpoint-100"]
    assert runs["status"].eq("ok").all() and runs["checkpoint_sha256"].nunique() == 3
    trace = pd.read_parquet(out / "trace")
    assert len(trace[trace["param_group"] == "all"]) == 3


def test_errors_speak_the_users_terms(hf, tmp_path, capsys):
    root, models = hf
    gpt2 = str(models["gpt2"][0])

    def error(*args: str) -> str:
        with pytest.raises(SystemExit) as ei:
            main([*args, "--device", "cpu", "--out", str(tmp_path / "out")])
        err = capsys.readouterr().err
        lines = [ln for ln in err.splitlines() if ln.strip()]
        assert ei.value.code == 2 and len(lines) == 1 and lines[0].startswith("error: "), err
        return lines[0]

    # per-token logits under a classification loss: says so, and names the token losses
    text = error("trace", gpt2, "--data", str(root / "gpt2.pt"))
    assert "per-token logits" in text and "--loss causal_lm" in text and "classes" in text
    # dict samples without the target field
    text = error("trace", gpt2, "--data", str(root / "llama.pt"), "--loss", "token_cross_entropy")
    assert "no 'labels'" in text and "--target-key" in text and "--loss causal_lm" in text
    # an output the model does not have
    text = error("trace", gpt2, "--data", str(root / "gpt2.pt"), "--loss", "causal_lm", "--output", "hidden")
    assert "--output hidden" in text and "logits" in text
    # a folder with a config but no weights
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "config.json").write_text("{}")
    text = error("trace", str(tmp_path / "empty"), "--data", str(root / "gpt2.pt"))
    assert "config.json but no weights" in text
    # one weights file of a model folder, without --model
    text = error("trace", str(models["bert"][0] / "model.safetensors"), "--data", str(root / "bert.pt"))
    assert "Hugging Face model folder" in text and f"pass the folder {models['bert'][0]}" in text
    # token labels outside the vocabulary
    bad = torch.load(root / "gpt2.pt")
    bad["labels"] = bad["labels"].masked_fill(bad["labels"] == 3, VOCAB + 2)
    torch.save(bad, tmp_path / "bad.pt")
    text = error("trace", gpt2, "--data", str(tmp_path / "bad.pt"), "--loss", "causal_lm")
    assert f"token labels range 0..{VOCAB + 2}" in text and f"{VOCAB} logits per token" in text


def test_forward_args_and_a_callable_of_dict_samples(tmp_path):
    """--forward-arg reaches forward(); a callable returning dict samples is stacked and split by --batch-size."""
    (tmp_path / "net.py").write_text(
        "import torch\n"
        "class Scaled(torch.nn.Module):\n"
        "    def __init__(self):\n"
        "        super().__init__()\n"
        "        self.lin = torch.nn.Linear(3, 2)\n"
        "    def forward(self, features, offset, scale=1.0):\n"
        "        return {'logits': torch.tanh(self.lin(features)) * scale + offset}\n"
        "def samples():\n"
        "    g = torch.Generator().manual_seed(0)\n"
        "    x, o, y = torch.randn(7, 3, generator=g), torch.randn(7, 2, generator=g), torch.randn(7, 2, generator=g)\n"
        "    return [{'features': x[i], 'offset': o[i], 'target': y[i]} for i in range(7)]\n"
    )
    torch.manual_seed(0)
    import importlib.util

    spec = importlib.util.spec_from_file_location("net_under_test", tmp_path / "net.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    net = mod.Scaled().double()
    torch.save(net.state_dict(), tmp_path / "net.pt")
    rows = mod.samples()
    x = torch.stack([r["features"] for r in rows]).double()
    o = torch.stack([r["offset"] for r in rows]).double()
    y = torch.stack([r["target"] for r in rows]).double()
    names = [n for n, _ in net.named_parameters()]
    shapes = [p.shape for _, p in net.named_parameters()]
    flat = torch.cat([p.detach().reshape(-1) for _, p in net.named_parameters()])

    def f(theta):
        ps = dict(zip(names, (t.reshape(s) for t, s in zip(theta.split([s.numel() for s in shapes]), shapes))))
        return ((torch.tanh(functional_call(net.lin, {k[4:]: v for k, v in ps.items()}, (x,))) * 2.5 + o - y) ** 2).mean()

    H = torch.autograd.functional.hessian(f, flat)
    lam = torch.linalg.eigvalsh(H)
    for batch_size in ("2", "7"):
        doc = _cli("eigs", str(tmp_path / "net.pt"), "--model", f"{tmp_path / 'net.py'}:Scaled",
                   "--data", f"{tmp_path / 'net.py'}:samples", "--target-key", "target", "--loss", "mse",
                   "--forward-arg", "scale=2.5", "--top-k", "2", "--batch-size", batch_size,
                   "--out", str(tmp_path / "out"))
        got = doc["result"]["eigenvalues"]
        assert abs(got[0] - float(lam[-1])) <= REL * float(lam.abs().max())
        assert abs(got[1] - float(lam[-2])) <= REL * float(lam.abs().max())


def test_a_datasets_folder_is_the_same_data_as_the_tensors(hf, tmp_path, capsys):
    """A folder from datasets' save_to_disk gives the same batches (hence the same trace) as the .pt dict."""
    datasets = pytest.importorskip("datasets")
    root, models = hf
    tensors = torch.load(root / "gpt2.pt")
    ds = datasets.Dataset.from_dict({k: v.tolist() for k, v in tensors.items()})
    ds.save_to_disk(str(tmp_path / "val"))
    common = [str(models["gpt2"][0]), "--loss", "causal_lm", "--method", "exact", "--batch-size", "2",
              "--out", str(tmp_path / "out")]
    from_folder = _cli("trace", *common, "--data", str(tmp_path / "val"))["result"]["estimate"]
    from_file = _cli("trace", *common, "--data", str(root / "gpt2.pt"))["result"]["estimate"]
    assert from_folder == pytest.approx(from_file, rel=1e-12)
    datasets.DatasetDict({"train": ds, "validation": ds}).save_to_disk(str(tmp_path / "both"))
    with pytest.raises(SystemExit) as ei:
        main(["trace", *common, "--data", str(tmp_path / "both")])
    err = capsys.readouterr().err
    assert ei.value.code == 2 and "several splits" in err and "both/train" in " ".join(err.split())
