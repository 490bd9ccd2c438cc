"""Process memory readings for the CPU benchmarks (Linux /proc)."""


def rss_mb(field: str) -> float:
    """A /proc/self/status memory field (VmRSS, VmHWM, ...) in MB."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    raise RuntimeError(f"/proc/self/status has no {field} line")


def reset_peak() -> None:
    """Reset VmHWM to the current resident set, so the next peak is measured from here."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
