"""Reproducible benchmarks for FailCore (issue 7): ``python -m benchmarks [--quick]``.

Every figure is a median from one run, compared only with baselines measured in the
same run (bare Pipe, ProcessPoolExecutor, multiprocessing.Pool, interpreter start and
the published ``failcore==0.1.3`` as an anchor): this machine type is noisy, so absolute
numbers from different runs are not comparable, ratios within a run are.
"""
