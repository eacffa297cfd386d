"""Human-readable units for reports (a leaf: the CLI and the library both print sizes)."""

__all__ = ["format_bytes", "format_count", "format_energy"]


def format_bytes(n: float) -> str:
    """Sizes in decimal units: 177 KB, 521 MB, 4.83 GB."""
    for scale, unit in ((1e12, "TB"), (1e9, "GB"), (1e6, "MB"), (1e3, "KB")):
        if abs(n) >= scale:
            return f"{n / scale:.4g} {unit}"
    return f"{n:g} B"


def format_count(n: float) -> str:
    """Parameter counts to three significant digits: 41.0K, 1.69M, 328M, 2.41B."""
    for scale, suffix in ((1e12, "T"), (1e9, "B"), (1e6, "M"), (1e3, "K")):
        if abs(n) >= scale:
            value = n / scale
            decimals = 2 if abs(value) < 10 else 1 if abs(value) < 100 else 0
            return f"{value:.{decimals}f}{suffix}"
    return f"{n:g}"


def format_energy(pj: float) -> str:
    """Energies from picojoules: 512.0 pJ, 14.6 uJ, 1.23 mJ."""
    for scale, unit in ((1e12, "J"), (1e9, "mJ"), (1e6, "uJ"), (1e3, "nJ")):
        if abs(pj) >= scale:
            return f"{pj / scale:.4g} {unit}"
    return f"{pj:.4g} pJ"
