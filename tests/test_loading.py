"""Loading: every checkpoint format, data spec, loss, and bad input (one-line InputError)."""

from __future__ import annotations

import hashlib
import pickle
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import nn
from torch.func import functional_call, grad, hessian, jvp
from torch.utils.data import DataLoader, TensorDataset

from hesscli.config import Settings
from hesscli.errors import InputError
from hesscli.loading import (
    Dataset,
    build_problem,
    describe,
    epoch_from,
    evaluate,
    load_checkpoint,
    load_data,
    load_loss,
    load_problem,
    problem_from_python,
    resolve_device,
    resolve_dtype,
    step_from,
)
from hesscli.loading.checkpoint import NESTED_KEYS
from hesscli.loading.model import build_model
from hesscli.loading.loss import LOSSES

CPU = torch.device("cpu")


def _input_error(fn, *args, **kwargs) -> str:
    """Run ``fn`` expecting an InputError; return its (one-line) message."""
    with pytest.raises(InputError) as ei:
        fn(*args, **kwargs)
    message = str(ei.value)
    assert "\n" not in message, message
    return message


def _assert_same_model(a: nn.Module, b: nn.Module, x: torch.Tensor) -> None:
    with torch.no_grad():
        torch.testing.assert_close(a(x), b(x), rtol=0, atol=0)


def _data(settings: Settings, **kw) -> Dataset:
    return load_data(settings, device=CPU, dtype=kw.pop("dtype", torch.float32), **kw)


def _cat(ds: Dataset) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.cat([x for x, _ in ds.batches]), torch.cat([y for _, y in ds.batches])


# ------------------------------------------------------------------------------------------
# checkpoint formats
# ------------------------------------------------------------------------------------------


def test_bare_state_dict(tiny):
    loaded = load_checkpoint(tiny.ckpt, Settings(model=tiny.spec))
    assert loaded.format == "state_dict"
    assert loaded.sha256 == hashlib.sha256(tiny.ckpt.read_bytes()).hexdigest()
    _assert_same_model(loaded.model, tiny.model, tiny.inputs)


@pytest.mark.parametrize("key", NESTED_KEYS)
def test_state_dict_nested_under_common_keys(tiny, key):
    path = tiny.folder / f"nested_{key}.pt"
    torch.save({key: tiny.model.state_dict(), "epoch": 2, "optimizer_state_dict": {"state": {}, "param_groups": []}},
               path)
    loaded = load_checkpoint(path, Settings(model=tiny.spec))
    assert loaded.format == "state_dict" and loaded.epoch == 2
    _assert_same_model(loaded.model, tiny.model, tiny.inputs)


@pytest.mark.parametrize("prefix", ["module.", "model.", "_orig_mod.", "_orig_mod.module."])
def test_wrapper_prefixes_are_stripped(tiny, prefix):
    path = tiny.folder / "prefixed.pt"
    torch.save({"state_dict": {prefix + k: v for k, v in tiny.model.state_dict().items()}}, path)
    loaded = load_checkpoint(path, Settings(model=tiny.spec))
    _assert_same_model(loaded.model, tiny.model, tiny.inputs)


def test_real_submodule_named_model_is_not_stripped(tiny):
    wrapped = {"model." + k: v for k, v in tiny.model.state_dict().items()}
    path = tiny.folder / "wrapped.pt"
    torch.save(wrapped, path)
    loaded = load_checkpoint(path, Settings(model=tiny.factory("Wrapped")))
    _assert_same_model(loaded.model, tiny.model, tiny.inputs)


def test_module_factory_spec_with_model_args(tmp_path):
    torch.manual_seed(3)
    lin = nn.Linear(4, 3)
    torch.save(lin.state_dict(), tmp_path / "lin.pt")
    settings = Settings(model="torch.nn:Linear", model_args={"in_features": 4, "out_features": 3})
    loaded = load_checkpoint(tmp_path / "lin.pt", settings)
    assert isinstance(loaded.model, nn.Linear)
    _assert_same_model(loaded.model, lin, torch.randn(5, 4))


def test_safetensors_with_factory_and_metadata(tiny):
    path = tiny.folder / "weights.safetensors"
    save_file({k: v.contiguous() for k, v in tiny.model.state_dict().items()}, str(path),
              metadata={"step": "300", "epoch": "4"})
    loaded = load_checkpoint(path, Settings(model=tiny.spec))
    assert (loaded.format, loaded.step, loaded.epoch) == ("safetensors", 300, 4)
    _assert_same_model(loaded.model, tiny.model, tiny.inputs)


@pytest.mark.parametrize("how", ["script", "trace"])
def test_torchscript_needs_no_factory(tiny, how):
    scripted = torch.jit.script(tiny.model) if how == "script" else torch.jit.trace(tiny.model, tiny.inputs[:2])
    path = tiny.folder / f"ts_{how}.pt"
    torch.jit.save(scripted, str(path))
    loaded = load_checkpoint(path, Settings(trust_code=True))  # TorchScript is code: loaded only when trusted
    assert loaded.format == "torchscript"
    _assert_same_model(loaded.model, tiny.model, tiny.inputs)


def test_torchscript_problem_end_to_end(tiny):
    path = tiny.folder / "ts.pt"
    torch.jit.save(torch.jit.script(tiny.model), str(path))
    problem = load_problem(path, Settings(data=tiny.data, device="cpu", dtype="float64", trust_code=True))
    loss, _ = evaluate(problem)
    expected = F.cross_entropy(tiny.model.double()(tiny.inputs.double()), tiny.targets).item()
    assert loss == pytest.approx(expected, rel=1e-12)
    assert describe(problem).model_class == "TinyMLP"


def test_pickled_module_needs_trust_pickle(tmp_path):
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 3))
    path = tmp_path / "whole.pt"
    torch.save(net, path)
    message = _input_error(load_checkpoint, path, Settings())
    assert "--trust-pickle" in message and "arbitrary code" in message
    assert "torch.nn.modules.container.Sequential" in message
    loaded = load_checkpoint(path, Settings(trust_pickle=True))
    assert loaded.format == "pickle"
    _assert_same_model(loaded.model, net, torch.randn(2, 4))


class _Payload:
    """Unpickling this creates ``marker`` (a stand-in for arbitrary code)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


@pytest.mark.parametrize("writer", ["torch.save", "pickle.dump"])
def test_malicious_pickle_never_runs_without_trust_pickle(tmp_path, writer):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    if writer == "torch.save":
        torch.save({"state_dict": _Payload(marker)}, path)
    else:
        with open(path, "wb") as fh:
            pickle.dump({"state_dict": _Payload(marker)}, fh)
    message = _input_error(load_checkpoint, path, Settings(model="torch.nn:Linear"))
    assert "--trust-pickle" in message and "arbitrary code" in message
    assert not marker.exists()
    # as data too
    message = _input_error(load_data, Settings(data=str(path)), device=CPU, dtype=torch.float32)
    assert "--trust-pickle" in message
    assert not marker.exists()
    # the payload is live: with the flag the file *is* created, so the refusal above is what protected us
    with pytest.raises(InputError):
        load_checkpoint(path, Settings(trust_pickle=True))
    assert marker.exists()


# ------------------------------------------------------------------------------------------
# step / epoch metadata
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "meta", "step"),
    [
        ("step=1500.ckpt", None, 1500),
        ("epoch=3-step=200.ckpt", None, 200),
        ("ckpt_000500.pt", None, 500),
        ("model_step200.pt", None, 200),
        ("step_200.pt", None, 200),
        ("ckpt_step000400.pt", None, 400),
        ("iter1000.pth", None, 1000),
        ("epoch_3.pt", None, 3),
        ("last.pt", None, None),
        ("resnet18.pt", None, None),
        ("last.pt", {"global_step": 7, "epoch": 1}, 7),
        ("step_5.pt", {"step": 9, "global_step": 7}, 9),
        ("ckpt_000500.pt", {"epoch": 7}, 500),
        ("epoch_3.pt", {"epoch": 5}, 5),
        ("last.pt", {"step": torch.tensor(12)}, 12),
        ("last.pt", {"epoch": 2.0}, 2),
        ("last.pt", {"step": "40"}, 40),
    ],
)
def test_step_from(name, meta, step):
    assert step_from(Path("runs") / name, meta) == step


@pytest.mark.parametrize(
    ("name", "meta", "epoch"),
    [("epoch=3-step=200.ckpt", None, 3), ("epoch_3.pt", None, 3), ("ckpt_000500.pt", None, None),
     ("epoch_3.pt", {"epoch": 4}, 4), ("last.pt", {"step": 5}, None)],
)
def test_epoch_from(name, meta, epoch):
    assert epoch_from(name, meta) == epoch


def test_sample_checkpoint_metadata(samples_dir):
    path = samples_dir / "ckpt_step000200.pt"
    raw = torch.load(path, weights_only=True)
    loaded = load_checkpoint(path, Settings(model=f"{samples_dir / 'model.py'}:DigitsCNN"))
    assert (loaded.step, loaded.epoch) == (200, raw["epoch"])
    assert loaded.metadata["loss"] == pytest.approx(raw["loss"])
    assert loaded.sha256 == hashlib.sha256(path.read_bytes()).hexdigest()


# ------------------------------------------------------------------------------------------
# checkpoint errors
# ------------------------------------------------------------------------------------------


def test_missing_and_folder_and_empty(tiny):
    assert "not found" in _input_error(load_checkpoint, tiny.folder / "nope.pt", Settings(model=tiny.spec))
    assert "folder" in _input_error(load_checkpoint, tiny.folder, Settings(model=tiny.spec))
    (tiny.folder / "empty.pt").write_bytes(b"")
    assert "empty" in _input_error(load_checkpoint, tiny.folder / "empty.pt", Settings(model=tiny.spec))


def test_truncated_file(tiny):
    data = tiny.ckpt.read_bytes()
    (tiny.folder / "trunc.pt").write_bytes(data[: len(data) // 2])
    message = _input_error(load_checkpoint, tiny.folder / "trunc.pt", Settings(model=tiny.spec))
    assert "truncated or corrupt" in message


def test_random_bytes_are_corrupt_not_a_pickle_question(tiny):
    (tiny.folder / "rand.pt").write_bytes(bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8)))
    message = _input_error(load_checkpoint, tiny.folder / "rand.pt", Settings(model=tiny.spec))
    assert "corrupt" in message and "--trust-pickle" not in message


def test_corrupt_safetensors(tiny):
    (tiny.folder / "bad.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all}")
    assert "safetensors" in _input_error(load_checkpoint, tiny.folder / "bad.safetensors", Settings(model=tiny.spec))


def test_state_dict_without_model_says_so(tiny):
    message = _input_error(load_checkpoint, tiny.ckpt, Settings())
    assert "state_dict" in message and "--model" in message


def test_not_a_state_dict(tiny):
    torch.save([1, 2, 3], tiny.folder / "list.pt")
    assert "not a state_dict" in _input_error(load_checkpoint, tiny.folder / "list.pt", Settings(model=tiny.spec))


def test_missing_and_unexpected_keys_are_named(tiny):
    sd = dict(tiny.model.state_dict())
    del sd["fc2.bias"]
    sd["extra.weight"] = torch.zeros(2)
    torch.save(sd, tiny.folder / "keys.pt")
    message = _input_error(load_checkpoint, tiny.folder / "keys.pt", Settings(model=tiny.spec))
    assert "missing keys: fc2.bias" in message and "unexpected keys: extra.weight" in message


def test_shape_mismatch_names_param_and_shapes(tiny):
    message = _input_error(load_checkpoint, tiny.ckpt, Settings(model=tiny.factory("make"), model_args={"hidden": 6}))
    assert "fc1.weight checkpoint [5, 4] vs model [6, 4]" in message


@pytest.mark.parametrize(
    ("factory", "expected"),
    [
        ("{folder}/missing.py:Net", "not found"),
        ("{folder}/nets.py:Nope", "has no attribute 'Nope'"),
        ("{folder}/nets.py:broken", "factory exploded"),
        ("{folder}/nets.py:not_a_module", "not a torch.nn.Module"),
        ("no_such_pkg_xyz.models:Net", "cannot import module"),
        ("nets_without_colon", "expected pkg.module:callable"),
    ],
)
def test_factory_errors(tiny, factory, expected):
    message = _input_error(load_checkpoint, tiny.ckpt, Settings(model=factory.format(folder=tiny.folder)))
    assert expected in message


def test_factory_file_with_syntax_error(tiny):
    (tiny.folder / "bad_syntax.py").write_text("def f(:\n")
    message = _input_error(load_checkpoint, tiny.ckpt, Settings(model=f"{tiny.folder / 'bad_syntax.py'}:f"))
    assert "importing" in message and "SyntaxError" in message


# ------------------------------------------------------------------------------------------
# data specs
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("keys", [("inputs", "targets"), ("x", "y"), ("X", "y")])
def test_pt_dict_keys(tiny, keys):
    path = tiny.folder / "d.pt"
    torch.save({keys[0]: tiny.inputs, keys[1]: tiny.targets}, path)
    x, y = _cat(_data(Settings(data=str(path))))
    assert torch.equal(x, tiny.inputs) and torch.equal(y, tiny.targets)


@pytest.mark.parametrize("form", ["tuple", "tensordataset"])
def test_pt_tuple_and_tensordataset(tiny, form):
    path = tiny.folder / "d.pt"
    obj = (tiny.inputs, tiny.targets) if form == "tuple" else TensorDataset(tiny.inputs, tiny.targets)
    torch.save(obj, path)
    ds = _data(Settings(data=str(path)))
    x, y = _cat(ds)
    assert torch.equal(x, tiny.inputs) and torch.equal(y, tiny.targets)
    assert (ds.n_samples, ds.n_total, ds.input_shape, ds.target_shape, ds.target_dtype) == (40, 40, (4,), (), "int64")


@pytest.mark.parametrize("keys", [("inputs", "targets"), ("x", "y"), ("X", "y")])
def test_npz(tiny, keys):
    path = tiny.folder / "d.npz"
    np.savez(path, **{keys[0]: tiny.inputs.double().numpy(), keys[1]: tiny.targets.int().numpy()})
    x, y = _cat(_data(Settings(data=str(path))))
    assert x.dtype == torch.float32 and y.dtype == torch.int64
    assert torch.equal(x, tiny.inputs) and torch.equal(y, tiny.targets)


@pytest.mark.parametrize("name", ["pair", "dataset", "loader"])
def test_callable_file_specs(tiny, name):
    x, y = _cat(_data(Settings(data=tiny.factory(name))))
    assert torch.equal(x, tiny.inputs) and torch.equal(y, tiny.targets)


def test_callable_module_spec(tiny, monkeypatch):
    monkeypatch.syspath_prepend(str(tiny.folder))
    x, y = _cat(_data(Settings(data="nets:dataset")))
    assert torch.equal(x, tiny.inputs) and torch.equal(y, tiny.targets)


def test_max_samples_is_a_seeded_sorted_subset(tiny):
    def subset(seed: int) -> torch.Tensor:
        return _cat(_data(Settings(data=tiny.data, max_samples=10, seed=seed)))[0]

    expected_idx = torch.randperm(40, generator=torch.Generator().manual_seed(3))[:10].sort().values
    torch.testing.assert_close(subset(3), tiny.inputs[expected_idx], rtol=0, atol=0)
    torch.testing.assert_close(subset(3), subset(3), rtol=0, atol=0)
    assert not torch.equal(subset(3), subset(4))
    assert torch.equal(_cat(_data(Settings(data=tiny.data, max_samples=99)))[0], tiny.inputs)


def test_batch_size_and_dtype(tiny):
    ds = _data(Settings(data=tiny.data, batch_size=16), dtype=torch.float64)
    assert [len(x) for x, _ in ds.batches] == [16, 16, 8]
    assert ds.batches[0][0].dtype == torch.float64 and ds.batches[0][1].dtype == torch.int64
    path = tiny.folder / "reg.pt"
    torch.save((tiny.inputs, tiny.inputs[:, :1]), path)
    assert _data(Settings(data=str(path)), dtype=torch.float64).batches[0][1].dtype == torch.float64


@pytest.mark.parametrize(("n", "world"), [(40, 3), (10, 4), (7, 7)])
def test_shards_are_disjoint_contiguous_and_cover_everything(tiny, n, world):
    settings = Settings(data=tiny.data, max_samples=n, batch_size=4)
    full = _cat(_data(settings))[0]
    shards = [_data(settings, rank=r, world_size=world) for r in range(world)]
    sizes = [s.n_samples for s in shards]
    assert max(sizes) - min(sizes) <= 1 and sum(sizes) == n
    assert all(s.n_total == n for s in shards)
    torch.testing.assert_close(torch.cat([_cat(s)[0] for s in shards]), full, rtol=0, atol=0)


def test_data_errors(tiny):
    assert "--data" in _input_error(_data, Settings(data=None))
    assert "not found" in _input_error(_data, Settings(data=str(tiny.folder / "none.pt")))
    torch.save((tiny.inputs, tiny.targets[:-1]), tiny.folder / "mismatch.pt")
    assert "40 inputs but 39 targets" in _input_error(_data, Settings(data=str(tiny.folder / "mismatch.pt")))
    torch.save((tiny.inputs[:0], tiny.targets[:0]), tiny.folder / "empty.pt")
    assert "no samples" in _input_error(_data, Settings(data=str(tiny.folder / "empty.pt")))
    torch.save({"a": tiny.inputs, "b": tiny.targets}, tiny.folder / "keys.pt")
    message = _input_error(_data, Settings(data=str(tiny.folder / "keys.pt")))
    assert "expected arrays 'inputs' and 'targets'" in message and "['a', 'b']" in message
    np.savez(tiny.folder / "keys.npz", a=np.zeros(3))
    assert "found ['a']" in _input_error(_data, Settings(data=str(tiny.folder / "keys.npz")))
    torch.save({"inputs": "text", "targets": tiny.targets}, tiny.folder / "text.pt")
    assert "str" in _input_error(_data, Settings(data=str(tiny.folder / "text.pt")))
    assert "factory exploded" in _input_error(_data, Settings(data=tiny.factory("broken")))
    assert "got a int" in _input_error(_data, Settings(data=tiny.factory("not_a_module")))
    assert "cannot be split" in _input_error(_data, Settings(data=tiny.data, max_samples=2), rank=0, world_size=3)


def test_torchvision_import_failure_is_an_input_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "torchvision", None)  # makes `import torchvision` raise ImportError
    message = _input_error(_data, Settings(data="torchvision:MNIST?root=/data&train=false"))
    assert "torchvision could not be imported" in message


def test_a_torchvision_built_for_another_torch_is_named(tmp_path):
    """A factory whose import fails the way a CUDA torchvision next to a CPU-only torch fails."""
    (tmp_path / "zoo.py").write_text('raise RuntimeError("operator torchvision::nms does not exist")\n')
    message = _input_error(build_model, f"{tmp_path / 'zoo.py'}:resnet18")
    assert "built for another torch" in message and torch.__version__ in message and "torchvision::nms" in message
    (tmp_path / "other.py").write_text('raise RuntimeError("something else")\n')
    assert "another torch" not in _input_error(build_model, f"{tmp_path / 'other.py'}:net")


@pytest.fixture
def fake_torchvision(monkeypatch):
    """A stand-in torchvision whose dataset records its arguments."""
    calls: list[dict] = []

    class FakeDigits(torch.utils.data.Dataset):
        def __init__(self, root, train=True, download=False, transform=None):
            calls.append({"root": root, "train": train, "download": download})
            if root == "/missing":
                raise RuntimeError("Dataset not found. You can use download=True to download it")
            self.transform = transform

        def __len__(self):
            return 6

        def __getitem__(self, i):
            return self.transform(i), i % 2

    tv = types.ModuleType("torchvision")
    tv.datasets = types.SimpleNamespace(FakeDigits=FakeDigits)
    tv.transforms = types.SimpleNamespace(ToTensor=lambda: (lambda i: torch.full((1, 2, 2), float(i))))
    monkeypatch.setitem(sys.modules, "torchvision", tv)
    return calls


def test_torchvision_spec_never_downloads(fake_torchvision):
    ds = _data(Settings(data="torchvision:FakeDigits?root=/some/dir&train=false", max_samples=4, seed=0))
    assert fake_torchvision == [{"root": "/some/dir", "train": False, "download": False}]
    idx = torch.randperm(6, generator=torch.Generator().manual_seed(0))[:4].sort().values
    x, y = _cat(ds)
    assert torch.equal(x[:, 0, 0, 0], idx.float()) and torch.equal(y, idx % 2)
    assert "unknown torchvision dataset" in _input_error(_data, Settings(data="torchvision:Nope?root=/d"))
    assert "unknown option" in _input_error(_data, Settings(data="torchvision:FakeDigits?colour=red"))
    assert "never downloads" in _input_error(_data, Settings(data="torchvision:FakeDigits?root=/missing"))


# ------------------------------------------------------------------------------------------
# losses
# ------------------------------------------------------------------------------------------


def _loss_case(name: str, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(outputs, targets, torch reference value) for one named loss."""
    out = torch.randn(6, 4, generator=g, dtype=torch.float64)
    cls = torch.randint(0, 4, (6,), generator=g)
    real = torch.randn(6, 4, generator=g, dtype=torch.float64)
    if name == "cross_entropy":
        return out, cls, F.cross_entropy(out, cls)
    if name == "nll":
        logp = torch.log_softmax(out, 1)
        return logp, cls, F.nll_loss(logp, cls)
    if name == "mse":
        return out, real, F.mse_loss(out, real)
    if name == "huber":
        return out, 2 * real, F.huber_loss(out, 2 * real)
    if name in ("causal_lm", "token_cross_entropy"):  # [batch 2, sequence 3, vocabulary 4]; -100 left out
        logits, labels = out.reshape(2, 3, 4), cls.reshape(2, 3).clone()
        labels[0, 2] = labels[1, 0] = -100
        if name == "causal_lm":
            return logits, labels, F.cross_entropy(logits[:, :-1].reshape(-1, 4), labels[:, 1:].reshape(-1))
        return logits, labels, F.cross_entropy(logits.reshape(-1, 4), labels.reshape(-1))
    binary = (real > 0).double()
    return out, binary, F.binary_cross_entropy_with_logits(out, binary)


@pytest.mark.parametrize("name", list(LOSSES))
def test_named_losses_match_torch(name):
    out, target, ref = _loss_case(name, torch.Generator().manual_seed(0))
    torch.testing.assert_close(load_loss(name).fn(out, target), ref)


def test_loss_target_conventions():
    g = torch.Generator().manual_seed(1)
    out = torch.randn(5, 3, generator=g, dtype=torch.float64)
    cls = torch.randint(0, 3, (5,), generator=g)
    one_hot = F.one_hot(cls, 3).double()
    torch.testing.assert_close(load_loss("mse").fn(out, cls), F.mse_loss(out, one_hot))
    torch.testing.assert_close(load_loss("huber").fn(out, cls), F.huber_loss(out, one_hot))
    probs = torch.softmax(torch.randn(5, 3, generator=g, dtype=torch.float64), 1)
    torch.testing.assert_close(load_loss("cross_entropy").fn(out, probs), F.cross_entropy(out, probs))
    seg, seg_t = torch.randn(2, 3, 7, generator=g), torch.randint(0, 3, (2, 7), generator=g)
    torch.testing.assert_close(load_loss("cross-entropy").fn(seg, seg_t), F.cross_entropy(seg, seg_t))
    col, flat = torch.randn(5, 1, generator=g), torch.randn(5, generator=g)
    torch.testing.assert_close(load_loss("mse").fn(col, flat), F.mse_loss(col[:, 0], flat))
    torch.testing.assert_close(load_loss("bce_with_logits").fn(col, (flat > 0).long()),
                               F.binary_cross_entropy_with_logits(col[:, 0], (flat > 0).float()))
    with pytest.raises(ValueError, match="use --loss mse"):
        load_loss("cross_entropy").fn(out, flat)


@pytest.mark.parametrize("name", list(LOSSES))
def test_losses_are_twice_differentiable_by_func_and_autograd(name):
    """HVPs through torch.func (forward-over-reverse) and double backward equal the exact Hessian."""
    g = torch.Generator().manual_seed(2)
    net = nn.Linear(3, 4).double()
    x = torch.randn(6, 3, generator=g, dtype=torch.float64)
    _, target, _ = _loss_case(name, g)
    if target.ndim == 2 and not target.is_floating_point():  # token labels [2, 3]: per-token logits
        x = x.reshape(2, 3, 3)
    if name == "nll":
        net = nn.Sequential(net, nn.LogSoftmax(dim=1))
    fn = load_loss(name).fn
    params = {k: v.detach() for k, v in net.named_parameters()}
    names = list(params)
    shapes = [params[k].shape for k in names]
    flat = torch.cat([params[k].reshape(-1) for k in names])

    def f(theta: torch.Tensor) -> torch.Tensor:
        chunks = theta.split([s.numel() for s in shapes])
        ps = {k: c.reshape(s) for k, c, s in zip(names, chunks, shapes)}
        return fn(functional_call(net, ps, (x,)), target)

    H = hessian(f)(flat)
    assert H.abs().sum() > 0
    v = torch.randn(flat.numel(), generator=g, dtype=torch.float64)
    _, hvp_func = jvp(grad(f), (flat,), (v,))
    theta = flat.clone().requires_grad_(True)
    (gr,) = torch.autograd.grad(f(theta), theta, create_graph=True)
    (hvp_autograd,) = torch.autograd.grad(gr @ v, theta)
    torch.testing.assert_close(hvp_func, H @ v)
    torch.testing.assert_close(hvp_autograd, H @ v)


def test_loss_specs(tiny):
    assert [load_loss(n).is_classification for n in LOSSES] == [True, False, True, True, False, False, False]
    assert [load_loss(n).unit for n in LOSSES] == ["samples"] * 5 + ["tokens"] * 2
    message = _input_error(load_loss, "hinge")
    assert "unknown loss" in message and "cross_entropy" in message and "huber" in message
    custom = load_loss(tiny.factory("sq_loss"))
    out, cls = torch.randn(4, 3), torch.tensor([0, 1, 2, 0])
    torch.testing.assert_close(custom.fn(out, cls), F.mse_loss(out, F.one_hot(cls, 3).float()))
    assert not custom.is_classification
    smooth = load_loss("torch.nn:SmoothL1Loss")
    torch.testing.assert_close(smooth.fn(out, out + 3), torch.tensor(2.5))


# ------------------------------------------------------------------------------------------
# building the problem
# ------------------------------------------------------------------------------------------


def _settings(tiny, **kw) -> Settings:
    return Settings(**{"model": tiny.spec, "data": tiny.data, "device": "cpu", "dtype": "float64", **kw})


def test_load_problem_eval_mode_and_params(tiny):
    problem = load_problem(tiny.ckpt, _settings(tiny))
    assert not problem.model.training
    assert list(problem.params) == ["fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias"] and problem.n_params == 43
    assert all(p.dtype == torch.float64 for p in problem.params.values())
    sub = load_problem(tiny.ckpt, _settings(tiny, params=("fc1.*",)))
    assert list(sub.params) == ["fc1.weight", "fc1.bias"] and sub.n_params == 25
    message = _input_error(load_problem, tiny.ckpt, _settings(tiny, params=("conv*",)))
    assert "'conv*'" in message and "fc1.weight" in message


def test_frozen_parameters_excluded_and_listed(tiny):
    problem = load_problem(tiny.ckpt, _settings(tiny, model=tiny.factory("frozen_head")))
    assert problem.frozen == ["fc2.weight", "fc2.bias"] and list(problem.params) == ["fc1.weight", "fc1.bias"]
    assert not any(p.requires_grad for p in problem.model.fc2.parameters())
    describe(problem)
    assert all(p.grad is None for p in problem.model.parameters())
    message = _input_error(load_problem, tiny.ckpt, _settings(tiny, model=tiny.factory("frozen_head"), params=("fc2.*",)))
    assert "only frozen" in message


def test_problem_from_python_leaves_the_model_alone(tiny):
    model = tiny.model.double()
    model.fc2.bias.requires_grad_(False)
    model.fc1.weight.grad = torch.full_like(model.fc1.weight, 7.0)
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    problem = problem_from_python(model, "cross_entropy", (tiny.inputs, tiny.targets))
    describe(problem)
    evaluate(problem)
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    assert torch.equal(model.fc1.weight.grad, torch.full_like(model.fc1.weight, 7.0))
    assert all(p.grad is None for n, p in model.named_parameters() if n != "fc1.weight")
    assert problem.frozen == ["fc2.bias"]
    assert model.fc1.weight.dtype == torch.float64  # stays where it was: no settings, no cast
    assert problem.checkpoint.metadata["was_training"] is True


@pytest.mark.parametrize("form", ["tuple", "dict", "tensordataset", "dataloader", "ours"])
def test_problem_from_python_data_forms(tiny, form):
    x, y = tiny.inputs, tiny.targets
    data = {
        "tuple": (x, y),
        "dict": {"inputs": x, "targets": y},
        "tensordataset": TensorDataset(x, y),
        "dataloader": DataLoader(TensorDataset(x, y), batch_size=9),
        "ours": Dataset(batches=[(x[:25], y[:25]), (x[25:], y[25:])], n_samples=40, n_total=40),
    }[form]
    problem = problem_from_python(tiny.model, "cross_entropy", data, Settings(batch_size=16))
    loss, acc = evaluate(problem)
    with torch.no_grad():
        out = tiny.model(x)
    assert loss == pytest.approx(F.cross_entropy(out, y).item(), rel=1e-6)
    assert acc == pytest.approx((out.argmax(1) == y).double().mean().item())


@pytest.mark.parametrize("batch_size", [1, 7, 40])
def test_evaluate_and_gradient_do_not_depend_on_batch_size(tiny, batch_size):
    problem = load_problem(tiny.ckpt, _settings(tiny, batch_size=batch_size))
    info = describe(problem)
    model = tiny.model.double()
    out = model(tiny.inputs.double())
    ref_loss = F.cross_entropy(out, tiny.targets)
    grads = torch.autograd.grad(ref_loss, list(model.parameters()))
    assert info.loss_value == pytest.approx(ref_loss.item(), rel=1e-12)
    assert info.accuracy == pytest.approx((out.argmax(1) == tiny.targets).double().mean().item())
    assert info.grad_norm == pytest.approx(torch.sqrt(sum((g**2).sum() for g in grads)).item(), rel=1e-10)
    assert (info.n_params_total, info.n_selected, info.n_batches) == (43, 43, -(-40 // batch_size))
    assert evaluate(problem)[0] == pytest.approx(info.loss_value, rel=1e-12)


def test_inputs_incompatible_with_model(tiny):
    torch.save((torch.randn(40, 5), tiny.targets), tiny.folder / "wide.pt")
    message = _input_error(load_problem, tiny.ckpt, _settings(tiny, data=str(tiny.folder / "wide.pt")))
    assert "[40, 5]" in message and "TinyMLP" in message and "mat1 and mat2" in message


def test_targets_incompatible_with_loss(tiny):
    torch.save((tiny.inputs, tiny.inputs[:, 0]), tiny.folder / "regression.pt")
    message = _input_error(load_problem, tiny.ckpt, _settings(tiny, data=str(tiny.folder / "regression.pt")))
    assert "--loss cross_entropy" in message and "targets" in message
    torch.save((tiny.inputs, tiny.targets + 3), tiny.folder / "range.pt")
    message = _input_error(load_problem, tiny.ckpt, _settings(tiny, data=str(tiny.folder / "range.pt")))
    assert "class targets range 3..5 but the model outputs 3 classes" in message


def test_model_returning_a_tuple_or_dict(tiny):
    """Tuple outputs give their first element, dict outputs their logits, unless --output says otherwise."""

    class Pair(nn.Module):
        def forward(self, x):
            return x, 2 * x

    class Named(nn.Module):
        def forward(self, x):
            return {"hidden": x, "logits": 3 * x}

    net, data = nn.Linear(4, 3), (tiny.inputs, tiny.inputs[:, :3])
    x = tiny.inputs[:5]
    with torch.no_grad():
        first = problem_from_python(nn.Sequential(net, Pair()), "mse", data)
        torch.testing.assert_close(first.output(x), net(x))
        second = problem_from_python(nn.Sequential(net, Pair()), "mse", data, Settings(output="1"))
        torch.testing.assert_close(second.output(x), 2 * net(x))
        logits = problem_from_python(nn.Sequential(net, Named()), "mse", data)
        torch.testing.assert_close(logits.output(x), 3 * net(x))
    message = _input_error(problem_from_python, nn.Sequential(net, Pair()), "mse", data, Settings(output="5"))
    assert "--output 5" in message and "tuple of only 2" in message
    message = _input_error(problem_from_python, nn.Sequential(net, Named()), "mse", data, Settings(output="loss"))
    assert "--output loss" in message and "['hidden', 'logits']" in message


def test_nan_weights_and_nan_loss(tiny):
    sd = dict(tiny.model.state_dict())
    sd["fc2.weight"] = sd["fc2.weight"].clone()
    sd["fc2.weight"][0, 0] = float("nan")
    torch.save(sd, tiny.folder / "nan.pt")
    message = _input_error(load_problem, tiny.folder / "nan.pt", _settings(tiny))
    assert "fc2.weight contains NaN" in message
    x = tiny.inputs.clone()
    x[3, 1] = float("inf")
    torch.save((x, tiny.targets), tiny.folder / "inf.pt")
    message = _input_error(load_problem, tiny.ckpt, _settings(tiny, data=str(tiny.folder / "inf.pt"), batch_size=2))
    assert "inputs contain NaN/Inf (first at sample 3" in message

    def nan_loss(outputs, targets):
        return outputs.sum() * float("nan")

    message = _input_error(problem_from_python, tiny.model, nan_loss, (tiny.inputs, tiny.targets))
    assert "loss on the first batch is nan" in message


def test_devices_and_dtypes():
    assert resolve_device("auto") == torch.device("cuda" if torch.cuda.is_available() else "cpu")
    assert resolve_device("cpu") == torch.device("cpu")
    message = _input_error(resolve_device, "cuda:99")  # unavailable on any machine that runs these tests
    assert "CUDA" in message and "--device" in message
    if not torch.cuda.is_available():
        assert "not available" in _input_error(resolve_device, "cuda")
    else:
        assert resolve_device("cuda").type == "cuda"
    assert "not a device" in _input_error(resolve_device, "gpu-please")
    assert resolve_dtype("float64") is torch.float64 and resolve_dtype("float32") is torch.float32
    assert "float32 or float64" in _input_error(resolve_dtype, "float16")


def test_build_problem_from_pieces(tiny):
    settings = _settings(tiny)
    loaded = load_checkpoint(tiny.ckpt, settings)
    data = load_data(settings, device=CPU, dtype=torch.float64)
    problem = build_problem(loaded, data, load_loss("cross_entropy"), settings, device=CPU, dtype=torch.float64)
    assert problem.checkpoint is loaded and problem.data is data and problem.dtype is torch.float64


@pytest.mark.slow
def test_sample_run_is_reproducible(samples_dir, tmp_path):
    """make_samples.py regenerates the committed tensors exactly."""
    import runpy

    runpy.run_path(str(samples_dir / "make_samples.py"), run_name="samples")["make"](tmp_path)
    for name in ["digits.pt"] + [f"ckpt_step{s:06d}.pt" for s in (0, 25, 50, 100, 200, 400)]:
        new, old = torch.load(tmp_path / name, weights_only=True), torch.load(samples_dir / name, weights_only=True)
        if name == "digits.pt":
            assert torch.equal(new["inputs"], old["inputs"]) and torch.equal(new["targets"], old["targets"])
            continue
        assert (new["step"], new["epoch"]) == (old["step"], old["epoch"])
        for k, v in old["model_state_dict"].items():
            assert torch.equal(new["model_state_dict"][k], v), (name, k)
    assert (tmp_path / "model.py").read_text() == (samples_dir / "model.py").read_text()
    assert (tmp_path / "hesscli.toml").read_text() == (samples_dir / "hesscli.toml").read_text()
