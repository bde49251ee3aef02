"""Loss landscapes: grid losses against closed forms, direction normalisation by hand, reproducibility,
vmapped against looped evaluation, accuracy by hand count, and the two figures."""

from __future__ import annotations

import copy

import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn

from cases import CE, TinyCNN, attention_ce, cnn_bn_ce, linreg, make_problem, mlp_ce, tied_ae
from hesscli.algorithms.landscape import (
    FILTER_EPS,
    LandscapeResult,
    evaluate_grid,
    grid,
    normalize_direction,
    random_directions,
)
from hesscli.api import loss_value
from hesscli.errors import InputError
from hesscli.loading.loss import accuracy_fn, load_loss
from hesscli.loading.problem import LossSpec
from hesscli.results.landscape_plots import LANDSCAPE_COLUMNS, landscape_rows, plot_landscape_1d, plot_landscape_2d

F64 = torch.float64


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def flat_params(problem) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for p in problem.params.values()])


def snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict(keep_vars=True).items()}


def unchanged(model: nn.Module, before: dict[str, torch.Tensor]) -> bool:
    now = model.state_dict(keep_vars=True)
    return now.keys() == before.keys() and all(torch.equal(now[k].detach(), before[k]) for k in before)


# ----------------------------------------------------------------------------- exactness on a quadratic


def _linreg_hessian(problem):
    """Exact gradient and Hessian of the mean MSE of the linear model over the whole dataset."""
    x = torch.cat([b[0] for b in problem.data.batches])
    y = torch.cat([b[1] for b in problem.data.batches])
    n_in = x.shape[1]

    def mean_loss(flat):
        w, b = flat[:n_in].reshape(1, n_in), flat[n_in:]
        return ((x @ w.T + b - y) ** 2).mean()

    theta = flat_params(problem)
    g = torch.func.grad(mean_loss)(theta)
    H = torch.func.hessian(mean_loss)(theta)
    lam, V = torch.linalg.eigh(H)
    return float(mean_loss(theta)), g, lam.flip(0), V.flip(1)  # largest first


def test_grid_is_the_exact_quadratic_along_hessian_eigenvectors():
    problem = linreg()  # 21 samples in batches of 7: every batch weighs in
    L0, g, lam, V = _linreg_hessian(problem)
    v1, v2 = V[:, 0], V[:, 1]
    alphas, betas = grid(0.8, 7, 2)
    res = evaluate_grid(problem, torch.stack([v1, v2]), alphas, betas, direction_kind="eigs",
                        eigenvalues=lam[:2].tolist())
    assert res.loss.shape == (7, 7) and res.dims == 2 and res.accuracy is None
    assert res.n_forward == 1 + 49
    assert res.eigenvalues == (float(lam[0]), float(lam[1]))
    A, B = torch.meshgrid(alphas, betas, indexing="ij")
    expected = L0 + A * (g @ v1) + 0.5 * lam[0] * A**2 + B * (g @ v2) + 0.5 * lam[1] * B**2
    torch.testing.assert_close(res.loss, expected, rtol=1e-12, atol=1e-13)

    # Least-squares quadratic fit: curvatures are the eigenvalues, no αβ term, centre = loss_value.
    a, b, z = A.reshape(-1).numpy(), B.reshape(-1).numpy(), res.loss.reshape(-1).numpy()
    design = np.stack([np.ones_like(a), a, b, a * a, b * b, a * b], axis=1)
    c, *_ = np.linalg.lstsq(design, z, rcond=None)
    assert 2 * c[3] == pytest.approx(float(lam[0]), rel=1e-8)
    assert 2 * c[4] == pytest.approx(float(lam[1]), rel=1e-8)
    assert abs(c[5]) < 1e-8 * float(lam[0])
    lv = loss_value(problem)
    assert c[0] == pytest.approx(lv, rel=1e-8)
    assert res.center_loss == pytest.approx(lv, rel=1e-12)
    assert L0 == pytest.approx(lv, rel=1e-12)


def test_one_dimensional_grid_walks_each_direction_on_its_own():
    problem = linreg()
    L0, g, lam, V = _linreg_hessian(problem)
    alphas, _ = grid(1.0, 5)
    res = evaluate_grid(problem, V[:, :3].T, alphas, direction_kind="eigs", eigenvalues=lam[:3].tolist())
    assert res.loss.shape == (3, 5) and res.betas is None and res.n_forward == 1 + 15
    for i in range(3):
        expected = L0 + alphas * (g @ V[:, i]) + 0.5 * lam[i] * alphas**2
        torch.testing.assert_close(res.loss[i], expected, rtol=1e-12, atol=1e-13)
    assert torch.equal(res.loss[:, 2], torch.full((3,), res.center_loss, dtype=F64))  # α = 0 is θ itself


def test_only_selected_parameters_move():
    """A direction over ``fc.*`` only, against a model copy whose fc parameters are set by hand."""
    problem = cnn_bn_ce(params=("fc.*",))
    assert list(problem.params) == ["fc.weight", "fc.bias"]
    (d,) = random_directions(problem.params, 1, gen(3), normalize="filter")
    alphas = torch.tensor([-0.7, 0.3, 1.1], dtype=F64)
    res = evaluate_grid(problem, d, alphas)
    for i, a in enumerate(alphas.tolist()):
        moved = copy.deepcopy(problem.model)
        with torch.no_grad():
            moved.fc.weight.add_(a * d[:24].reshape(3, 8))
            moved.fc.bias.add_(a * d[24:])
        ref = 0.0
        for (x, y), w in zip(problem.data.batches, [len(y) / problem.data.n_total for _, y in problem.data.batches]):
            with torch.no_grad():
                ref += w * float(problem.loss.fn(moved(x), y))
        assert float(res.loss[0, i]) == pytest.approx(ref, rel=1e-12)


# ----------------------------------------------------------------------------- normalisation by hand


def _raw(problem, seed):
    g = gen(seed)
    return {k: torch.randn(p.shape, generator=g, dtype=F64) for k, p in problem.params.items()}


def _by_hand_filter(d, w):
    out = d.clone()
    for i in range(d.shape[0]):
        dn = float(torch.sqrt((d[i] ** 2).sum()))
        wn = float(torch.sqrt((w[i] ** 2).sum()))
        out[i] = d[i] * (wn / (dn + FILTER_EPS))
    return out


def test_filter_normalisation_by_hand_on_a_small_cnn():
    problem = cnn_bn_ce()
    names = list(problem.params)
    assert names == ["conv.weight", "conv.bias", "bn.weight", "bn.bias", "fc.weight", "fc.bias"]
    raw = _raw(problem, 5)
    w = {k: p.detach() for k, p in problem.params.items()}
    for ignore in ("bias-bn", None):
        (d,) = random_directions(problem.params, 1, gen(5), normalize="filter", ignore=ignore)
        assert d.dtype == F64 and d.shape == (problem.n_params,)
        parts = dict(zip(names, d.split([p.numel() for p in w.values()])))
        for k in ("conv.weight", "fc.weight"):  # per filter: conv output channels, linear rows
            got = parts[k].reshape(w[k].shape)
            torch.testing.assert_close(got, _by_hand_filter(raw[k], w[k]), rtol=1e-14, atol=0)
            filter_norms = got.reshape(len(got), -1).norm(dim=1)
            torch.testing.assert_close(filter_norms, w[k].reshape(len(got), -1).norm(dim=1), rtol=1e-9, atol=0)
        for k in ("conv.bias", "bn.weight", "bn.bias", "fc.bias"):
            expected = torch.zeros_like(w[k]) if ignore == "bias-bn" else w[k]  # reference convention: d = θ
            assert torch.equal(parts[k], expected.reshape(-1))
        # the same normalisation of a given direction
        flat_raw = torch.cat([r.reshape(-1) for r in raw.values()])
        assert torch.equal(normalize_direction(flat_raw, problem.params, mode="filter", ignore=ignore), d)


def test_layer_and_none_normalisation_by_hand():
    problem = cnn_bn_ce()
    names = list(problem.params)
    raw = _raw(problem, 6)
    w = {k: p.detach() for k, p in problem.params.items()}
    sizes = [p.numel() for p in w.values()]
    (layer,) = random_directions(problem.params, 1, gen(6), normalize="layer", ignore="bias-bn")
    parts = dict(zip(names, layer.split(sizes)))
    for k in ("conv.weight", "fc.weight"):
        expected = raw[k] * (torch.sqrt((w[k] ** 2).sum()) / torch.sqrt((raw[k] ** 2).sum()))
        torch.testing.assert_close(parts[k].reshape(w[k].shape), expected, rtol=1e-14, atol=0)
        assert float(parts[k].norm()) == pytest.approx(float(w[k].norm()), rel=1e-12)
    for k in ("conv.bias", "bn.weight", "bn.bias", "fc.bias"):
        assert not parts[k].any()

    (none,) = random_directions(problem.params, 1, gen(6), normalize="none")
    assert torch.equal(none, torch.cat([r.reshape(-1) for r in raw.values()]))
    (none_bb,) = random_directions(problem.params, 1, gen(6), normalize="none", ignore="bias-bn")
    parts = dict(zip(names, none_bb.split(sizes)))
    for k in names:
        expected = torch.zeros_like(raw[k]) if w[k].dim() <= 1 else raw[k]
        assert torch.equal(parts[k].reshape(w[k].shape), expected)
    # shapes alone are enough for raw directions
    (from_shapes,) = random_directions([p.shape for p in w.values()], 1, gen(6), normalize="none", dtype=F64)
    assert torch.equal(from_shapes, none)
    with pytest.raises(InputError, match="parameter values"):
        random_directions([p.shape for p in w.values()], 1, gen(6), normalize="filter")


def test_directions_are_cast_to_the_parameters_dtype_and_checked():
    model = nn.Linear(3, 2)  # float32
    dirs = random_directions(dict(model.named_parameters()), 2, gen(0))
    assert len(dirs) == 2 and all(d.dtype == torch.float32 and d.shape == (8,) for d in dirs)
    with pytest.raises(InputError, match="normalize"):
        random_directions(dict(model.named_parameters()), 1, gen(0), normalize="unit")
    with pytest.raises(InputError, match="ignore"):
        random_directions(dict(model.named_parameters()), 1, gen(0), ignore="bias")
    with pytest.raises(InputError, match="CPU torch.Generator|torch.Generator"):
        random_directions(dict(model.named_parameters()), 1, 0)  # type: ignore[arg-type]


# ----------------------------------------------------------------------------- reproducibility


def test_same_seed_same_grid_bit_for_bit_and_another_seed_differs():
    problem = cnn_bn_ce()
    a, b = grid(0.5, 3, 2)
    r1 = evaluate_grid(problem, random_directions(problem.params, 2, gen(7), ignore="bias-bn"), a, b)
    r2 = evaluate_grid(problem, random_directions(problem.params, 2, gen(7), ignore="bias-bn"), a, b)
    r3 = evaluate_grid(problem, random_directions(problem.params, 2, gen(8), ignore="bias-bn"), a, b)
    assert torch.equal(r1.directions, r2.directions) and torch.equal(r1.loss, r2.loss)
    assert torch.equal(r1.accuracy, r2.accuracy)
    assert not torch.equal(r1.directions, r3.directions) and not torch.equal(r1.loss, r3.loss)
    # the first of two directions is the single direction of the same seed
    assert torch.equal(random_directions(problem.params, 1, gen(7))[0], random_directions(problem.params, 2, gen(7))[0])


def test_same_seed_same_raw_directions_on_another_checkpoint_of_the_same_shapes():
    one, other = mlp_ce(), mlp_ce()
    with torch.no_grad():
        for p in other.model.parameters():
            p.mul_(3.0).add_(0.1)
    d1 = random_directions(one.params, 2, gen(9), normalize="none")
    d2 = random_directions(other.params, 2, gen(9), normalize="none")
    assert all(torch.equal(x, y) for x, y in zip(d1, d2))


# ----------------------------------------------------------------------------- vmapped against looped


class DataDependent(nn.Module):
    """Python control flow on a tensor value: ``vmap`` refuses it, the loop takes over."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(5, 3)

    def forward(self, x):
        h = self.fc(x)
        return h if float(h.sum()) > 0 else -h


def _data_dependent():
    problem = mlp_ce()
    torch.manual_seed(1)
    x = torch.cat([b[0] for b in problem.data.batches])
    y = torch.cat([b[1] for b in problem.data.batches])
    return make_problem(DataDependent(), CE, x, y)


@pytest.mark.parametrize("factory", [mlp_ce, cnn_bn_ce, tied_ae, attention_ce, _data_dependent],
                         ids=["mlp-ce", "cnn-bn-ce", "tied-ae", "attention-ce", "data-dependent"])
def test_vmapped_and_looped_evaluation_agree_and_leave_the_model_alone(factory):
    problem = factory()
    before = snapshot(problem.model)
    grads = [p.grad for p in problem.model.parameters()]
    dirs = random_directions(problem.params, 2, gen(11), normalize="filter")
    a, b = grid(1.0, 3, 2)
    seen: list[int] = []
    batched = evaluate_grid(problem, dirs, a, b, on_progress=seen.append)  # default chunk: vmap
    looped = evaluate_grid(problem, dirs, a, b, chunk=1)
    ragged = evaluate_grid(problem, dirs, a, b, chunk=4)
    for other in (looped, ragged):
        torch.testing.assert_close(batched.loss, other.loss, rtol=1e-12, atol=1e-12)
        if batched.accuracy is not None:
            torch.testing.assert_close(batched.accuracy, other.accuracy, rtol=0, atol=1e-12)
    assert batched.center_loss == pytest.approx(loss_value(problem), rel=1e-12)
    assert seen == sorted(seen) and seen[-1] == batched.n_forward == 10
    assert unchanged(problem.model, before)
    assert [p.grad for p in problem.model.parameters()] == grads
    assert not problem.model.training


def test_torchscript_models_are_evaluated_on_a_private_copy():
    eager = mlp_ce()
    scripted = mlp_ce()
    scripted.model = torch.jit.script(scripted.model)
    scripted.params = dict(scripted.model.named_parameters())
    before = snapshot(scripted.model)
    dirs = random_directions(eager.params, 1, gen(13))
    alphas, _ = grid(1.0, 5)
    torch.testing.assert_close(evaluate_grid(scripted, dirs, alphas).loss, evaluate_grid(eager, dirs, alphas).loss,
                               rtol=1e-12, atol=1e-12)
    assert unchanged(scripted.model, before)


def test_data_parallel_sums_match_one_process():
    """Two shards of the batches, the second shard's sums handed to the first by ``reduce``."""
    full = cnn_bn_ce(batch_size=5)
    dirs = random_directions(full.params, 1, gen(12))
    alphas, _ = grid(0.5, 5)
    whole = evaluate_grid(full, dirs, alphas)
    shards = []
    for part in (full.data.batches[:2], full.data.batches[2:]):
        p = copy.copy(full)
        p.data = copy.copy(full.data)
        p.data.batches = part
        shards.append(p)
    captured: list[torch.Tensor] = []
    evaluate_grid(shards[1], dirs, alphas, reduce=lambda t: captured.append(t.clone()) or t)
    combined = evaluate_grid(shards[0], dirs, alphas, reduce=lambda t: t + captured[0])
    torch.testing.assert_close(combined.loss, whole.loss, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(combined.accuracy, whole.accuracy, rtol=1e-12, atol=1e-14)
    assert combined.center_loss == pytest.approx(whole.center_loss, rel=1e-12)


def test_bad_grids_are_refused():
    problem = mlp_ce()
    d = random_directions(problem.params, 1, gen(0))
    with pytest.raises(InputError, match="exactly 2 directions"):
        evaluate_grid(problem, d, [0.0, 1.0], [0.0, 1.0])
    with pytest.raises(InputError, match="flat vectors"):
        evaluate_grid(problem, torch.zeros(3), [0.0, 1.0])
    with pytest.raises(InputError, match="eigenvalues"):
        evaluate_grid(problem, d, [0.0, 1.0], eigenvalues=[1.0, 2.0])
    with pytest.raises(InputError, match="span"):
        grid(0.0, 5)
    with pytest.raises(InputError, match="steps"):
        grid(1.0, 1)
    with pytest.raises(InputError, match="dims"):
        grid(1.0, 5, 3)


# ----------------------------------------------------------------------------- accuracy


def test_accuracy_at_the_centre_is_the_hand_count():
    torch.manual_seed(0)
    model = nn.Linear(3, 4)
    x = torch.randn(13, 3, generator=gen(20))
    y = torch.randint(0, 4, (13,), generator=gen(21))
    problem = make_problem(model, CE, x, y, batch_size=5)  # batches of 5, 5, 3
    with torch.no_grad():
        logits = problem.model(x.to(F64))
    hits = sum(int(logits[i].argmax()) == int(y[i]) for i in range(13))
    alphas, _ = grid(1.0, 5)
    res = evaluate_grid(problem, random_directions(problem.params, 1, gen(22)), alphas)
    assert res.center_accuracy == pytest.approx(hits / 13, abs=1e-15)
    assert float(res.accuracy[0, 2]) == pytest.approx(hits / 13, abs=1e-15)  # α = 0
    assert ((res.accuracy >= 0) & (res.accuracy <= 1)).all()


def test_which_losses_have_classes_and_their_accuracy_by_hand():
    assert accuracy_fn(load_loss("mse")) is None and accuracy_fn(load_loss("huber")) is None
    assert accuracy_fn(LossSpec("cross_entropy", lambda o, t: o.sum())) is None  # a callable named so
    out = torch.tensor([[1.0, -2.0], [-0.5, 0.2], [3.0, 1.0]])
    y = torch.tensor([[1.0, 0.0], [1.0, 1.0], [0.0, 1.0]])
    assert float(accuracy_fn(load_loss("bce_with_logits"))(out, y)) == pytest.approx(4 / 6)
    logits = torch.zeros(1, 4, 3)
    logits[0, torch.arange(4), torch.tensor([2, 0, 1, 1])] = 1.0  # argmax per position: 2, 0, 1, 1
    labels = torch.tensor([[5, 0, -100, 1]])  # positions 0..2 predict 0 (argmax 2: miss), skipped, 1 (hit)
    assert float(accuracy_fn(load_loss("causal_lm"))(logits, labels)) == pytest.approx(1 / 2)
    tok = torch.tensor([[2, 1, -100, 1]])  # hit, miss, skipped, hit
    assert float(accuracy_fn(load_loss("token_cross_entropy"))(logits, tok)) == pytest.approx(2 / 3)
    probs = torch.tensor([[0.1, 0.9], [0.8, 0.2]])
    assert float(accuracy_fn(load_loss("cross_entropy"))(torch.tensor([[0.0, 1.0], [0.0, 1.0]]), probs)) == 0.5


# ----------------------------------------------------------------------------- table rows and figures


def _result(dims, eigs, shift=0.0):
    alphas = torch.linspace(-1.0, 1.0, 9, dtype=F64)
    if dims == 1:
        lam = torch.tensor(eigs or [2.0, 0.5], dtype=F64)
        loss = 0.3 + shift + 0.5 * lam[:, None] * alphas[None] ** 2 + 0.1 * alphas[None] ** 4
        acc = 0.9 - 0.3 * alphas.abs()[None].repeat(2, 1)
        return LandscapeResult(alphas, None, loss, acc, "eigs" if eigs else "random", "none" if eigs else "filter",
                               tuple(eigs) if eigs else None, torch.zeros(2, 4), 19, 0.3 + shift, 0.9)
    A, B = torch.meshgrid(alphas, alphas, indexing="ij")
    loss = 0.2 + shift + 3.0 * A**2 + 0.4 * B**2 + 0.5 * A * B + A**4 * 20
    return LandscapeResult(alphas, alphas.clone(), loss, None, "random", "filter", None, torch.zeros(2, 4), 82,
                           0.2 + shift, None)


def _frame(dims, eigs=None):
    rows = []
    runs = []
    for i, step in enumerate((100, 2000)):
        ckpt = f"/ckpts/step{step}.pt"
        rows += landscape_rows(_result(dims, eigs, shift=0.2 * i), run_id=f"r{i}", checkpoint=ckpt, step=step)
        runs.append({"run_id": f"r{i}", "checkpoint": ckpt, "step": step})
    return pd.DataFrame(rows, columns=list(LANDSCAPE_COLUMNS)), pd.DataFrame(runs)


def _is_png(path) -> None:
    import matplotlib.image as mpimg

    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    image = mpimg.imread(path)
    assert image.ndim == 3 and image.shape[0] > 100 and image.shape[1] > 100


def test_landscape_rows_follow_the_columns():
    df, _ = _frame(1, [2.0, 0.5])
    assert list(df.columns) == list(LANDSCAPE_COLUMNS) and len(df) == 2 * 2 * 9
    assert df["beta"].isna().all() and set(df["direction"]) == {1, 2}
    assert set(df.loc[df["direction"] == 2, "eigenvalue_1"]) == {0.5}
    df2, _ = _frame(2)
    assert len(df2) == 2 * 81 and df2["direction"].isna().all() and df2["accuracy"].isna().all()


def test_plot_landscape_1d_writes_a_png(tmp_path):
    df, runs = _frame(1, [2.0, 0.5])
    _is_png(plot_landscape_1d(df, runs, tmp_path / "landscape_1d.png"))
    df, runs = _frame(1)  # random directions, no eigenvalue: no quadratic
    _is_png(plot_landscape_1d(df[df["direction"] == 1], None, tmp_path / "random_1d.png"))


def test_plot_landscape_2d_writes_a_png(tmp_path):
    df, runs = _frame(2)
    _is_png(plot_landscape_2d(df, runs, tmp_path / "landscape_2d.png"))
    with pytest.raises(InputError, match="2-D"):
        plot_landscape_2d(_frame(1)[0], None, tmp_path / "no.png")
