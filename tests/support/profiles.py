"""Write simulated node profiles of any size for tests and benchmarks."""

from __future__ import annotations

from pathlib import Path


def pci_address(index: int) -> str:
    """Distinct kernel-form PCI addresses for up to 8192 devices."""
    return f"0000:{index // 32 + 1:02x}:{index % 32:02x}.0"


def write_profile(
    path: Path, count: int, model: str = "h100-sxm5-80gb", domain: str | None = None
) -> Path:
    lines = [f"description: {count} x {model}", "devices:", f"  - model: {model}"]
    if domain:
        lines.append(f"    interconnectDomain: {domain}")
    lines.append("    instances:")
    lines += [f'      - {{pciBusID: "{pci_address(i)}", numaNode: {i % 2}}}' for i in range(count)]
    path.write_text("\n".join(lines) + "\n")
    return path
