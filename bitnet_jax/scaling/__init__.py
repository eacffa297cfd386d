"""From sweep files to laws (the fitting modules know nothing of JAX).

    laws       L(N), L(N) with a floor, L(N, D): the fits and their `Fit` results
    bootstrap  percentile intervals by refitting resamples (`DEFAULT_N_BOOT`)
    isoflop    Chinchilla approach 2
    compare    recipes against a reference: loss ratio, parameter multiplier, resources
    results    the results table: column names, reader, writers, accounting columns
    fit        the one fitter of a results table (`bitnet fit`, `bitnet sweep report`)
    sweep      sweep files, plans, status, collection; launch: local, Slurm, print
    report     report.md and its plots
"""
