"""Speed of the native engine on a ~10M-parameter transformer: products per second, HVP ÷ gradient.

``python -m benchmarks.transformer`` builds a GPT-2 from its config (2 layers, width 512, 8 heads,
vocabulary 8192, 128 positions: 10.6M parameters; nothing is downloaded), 64 seeded random sequences
of 128 tokens and ``--loss causal_lm`` in float32, as ``hesscli trace|eigs`` would load them, and
times on this machine's threads:

* the mean-loss gradient over the 64x128 tokens (median of ``--repeats``);
* Hessian products on each product path: double backward over the cached gradient graph (what
  ``--hvp auto`` uses on the CPU; the first product builds the graph and is timed apart) and a
  ``torch.func`` block of ``--block`` columns;
* the foreign CPU load over each measurement (see :mod:`benchmarks.measure`).

Every product of ``trace`` and ``eigs`` is one such column, so products per second are the
inverse of the per-column time. Prints one JSON document.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from benchmarks.measure import LoadWindow, machine_info, rss_bytes


def _timed(fn, repeats: int = 1) -> tuple[float, float]:
    """(median seconds, foreign load) of ``repeats`` calls."""
    times = []
    with LoadWindow() as load:
        for _ in range(repeats):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    return statistics.median(times), load.value


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--block", type=int, default=2, help="columns of the timed product blocks")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)

    import transformers

    from hesscli.config import Settings
    from hesscli.loading import problem_from_python
    from hesscli.operators.empirical import HessianOperator

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(n_layer=2, n_embd=512, n_head=8, vocab_size=8192, n_positions=args.seq,
                                  bos_token_id=0, eos_token_id=0)
    model = transformers.GPT2LMHeadModel(cfg).eval()
    ids = torch.randint(0, cfg.vocab_size, (args.batch, args.seq), generator=torch.Generator().manual_seed(0))
    problem = problem_from_python(model, "causal_lm", {"input_ids": ids}, Settings(batch_size=args.batch))
    out: dict[str, object] = {"machine": machine_info(), "n_params": problem.n_params,
                              "tokens": args.batch * args.seq, "threads": args.threads}
    rss0 = rss_bytes()

    op = HessianOperator(problem, hvp="autograd")
    out["gradient_s"], out["gradient_foreign_load"] = _timed(op.loss_and_gradient, args.repeats)
    out["autograd_first_product_s"], _ = _timed(lambda: op.matmat(torch.randn(op.size, 1)))
    per_block, load = _timed(lambda: op.matmat(torch.randn(op.size, args.block)))
    out["autograd_product_s"], out["autograd_foreign_load"] = per_block / args.block, load
    out["autograd_rss_gb"] = (rss_bytes() - rss0) / 2**30
    del op

    op = HessianOperator(problem, hvp="func", block_size=args.block)
    per_block, load = _timed(lambda: op.matmat(torch.randn(op.size, args.block)))
    out["func_product_s"], out["func_foreign_load"] = per_block / args.block, load

    out["products_per_s"] = 1.0 / min(out["autograd_product_s"], out["func_product_s"])  # type: ignore[type-var]
    out["hvp_over_gradient"] = out["autograd_product_s"] / out["gradient_s"]  # type: ignore[operator]
    print(json.dumps(out, indent=2, default=str))


if __name__ == "__main__":
    main()
