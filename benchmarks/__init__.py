"""Benchmark suite: hesscli's native engine against PyHessian, hessian-eigenthings, BackPACK and curvlinops.

``python -m benchmarks.run`` (``make bench``) builds the workloads, computes float64 references,
times every library on the same data in the same process, and writes ``benchmarks/results.json``
and ``benchmarks/RESULTS.md``.

Modules:
    workloads: the fixed, seeded models and datasets (W1-W4), trained once and cached.
    measure: timing harness (warm-up, gc + malloc_trim, median of repeats, peak-RSS sampler,
        contention guard) and the HVP-counting wrappers.
    reference: float64 ground truth (dense Hessian, long Lanczos, exact or deflated traces).
    peers: one function per (library, call) returning the comparable quantity and its HVP count.
    suite: the benchmark plan (which rows run on which workload) and the equal-accuracy sweeps.
    report: RESULTS.md from results.json.
    run: the command line.
"""
