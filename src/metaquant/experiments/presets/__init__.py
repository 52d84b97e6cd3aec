"""Ready sweep files: the paper's CIFAR and ImageNet protocols, and a Fashion-MNIST study sized for a CPU.

``metaquant sweep NAME`` accepts a preset's name in place of a file path.
"""

from __future__ import annotations

from pathlib import Path

__all__ = ["preset_names", "resolve_preset", "PRESET_DIR"]

PRESET_DIR = Path(__file__).parent


def preset_names() -> list[str]:
    """The names of the sweep presets shipped with the package (``metaquant sweep NAME``), sorted."""
    return sorted(p.stem for p in PRESET_DIR.glob("*.toml"))


def resolve_preset(name_or_path: str) -> Path:
    """A file path as it is, or the file of the preset with that name.

    Raises:
        FileNotFoundError: neither a file nor a preset (the message lists the presets).
    """
    path = Path(name_or_path)
    if path.is_file():
        return path
    preset = PRESET_DIR / f"{name_or_path}.toml"
    if preset.is_file():
        return preset
    raise FileNotFoundError(
        f"{name_or_path} is neither a sweep file nor a preset; presets: {', '.join(preset_names())}"
    )
