"""From sweep files to laws: sweeps, launchers, results, fits and reports (the fitter knows nothing of JAX)."""
