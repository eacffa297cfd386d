"""Human-readable units for reports (a leaf: the CLI and the library both print sizes)."""

__all__ = ["format_bytes"]


def format_bytes(n: float) -> str:
    """Sizes in decimal units: 177 KB, 521 MB, 4.83 GB."""
    for scale, unit in ((1e12, "TB"), (1e9, "GB"), (1e6, "MB"), (1e3, "KB")):
        if abs(n) >= scale:
            return f"{n / scale:.4g} {unit}"
    return f"{n:g} B"
