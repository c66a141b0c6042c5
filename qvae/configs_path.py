"""Where `--config VALUE` points: a YAML file, or the name of a config shipped with qvae.

The shipped configs live in the repository's `configs/` folder; `qvae/configs` is a symlink to
it, so they are package data of `qvae` (the wheel holds real files) and one copy cannot drift
from another. A value that is an existing file is used as given; otherwise a name such as
`quickstart` or `paper/1-layer-lin` (an optional `.yaml` suffix allowed) is looked up among the
shipped configs, so `qvae train --config quickstart` works from any directory.

>>> resolve_config_path("smoke").name
'smoke.yaml'
>>> "quickstart" in shipped_config_names()
True
"""

from __future__ import annotations

import difflib
from pathlib import Path

_SUFFIXES = (".yaml", ".yml")


def shipped_config_dir() -> Path | None:
    """The folder of shipped configs, or None when this installation has none.

    `qvae/configs` in an installed wheel or a checkout; the repository's `configs/` next to the
    package where the symlink did not survive (e.g. a Windows checkout without symlinks).
    """
    here = Path(__file__).resolve().parent
    for candidate in (here / "configs", here.parent / "configs"):
        if candidate.is_dir():
            return candidate
    return None


def shipped_config_names() -> list[str]:
    """Names usable as `--config NAME`: paths under the shipped folder, without `.yaml`."""
    root = shipped_config_dir()
    if root is None:
        return []
    return sorted(p.relative_to(root).with_suffix("").as_posix()
                  for p in root.rglob("*") if p.suffix in _SUFFIXES and p.is_file())


def _shipped_list() -> str:
    names = shipped_config_names()
    if not names:
        return "this installation ships no configs"
    return "shipped configs, usable by name from any directory: " + ", ".join(names)


def resolve_config_path(value: str | Path, what: str = "config") -> Path:
    """The file `--config value` means; ValueError naming the value and the shipped names.

    An existing file wins over a shipped name, so a local `quickstart` file is never shadowed.
    """
    path = Path(value)
    if path.is_file():
        return path
    if path.is_dir():
        raise ValueError(f"{what} {str(value)!r} is a directory; give a YAML file or a "
                         f"shipped name ({_shipped_list()})")
    text = path.as_posix()
    name = text[: -len(path.suffix)] if path.suffix in _SUFFIXES else text
    root, names = shipped_config_dir(), shipped_config_names()
    if root is not None and name in names:
        # the listing is the only way in: a name can never reach outside the shipped folder
        return next(root / f"{name}{s}" for s in _SUFFIXES if (root / f"{name}{s}").is_file())
    close = difflib.get_close_matches(name, names, n=1)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    raise ValueError(f"{what} file not found: {text} (no such file from {Path.cwd()}, and no "
                     f"shipped {what} of that name{hint}; {_shipped_list()})")
