"""Packaging: configs ship in the wheel and resolve by name anywhere, `--version`, the
tensorboard extra, and the mathematics the code cites lives in docs/."""

import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from qvae.cli import main as cli_main
from qvae.config import ConfigError, load_config
from qvae.configs_path import resolve_config_path, shipped_config_names

ROOT = Path(__file__).resolve().parents[1]
DOCS = ("relaxation.md", "bounds.md", "sde.md", "qpu-temperature.md")
#: what a wheel is built from; qvae/configs (a symlink to configs/) is copied as a symlink
SOURCES = ("pyproject.toml", "README.md", "qvae", "backends", "configs")
SKIP_DIRS = {".git", ".ci", "build", "dist", "runs", "__pycache__", ".venv", "venv",
             ".pytest_cache", ".ruff_cache", ".hypothesis", ".benchmarks"}


def repo_configs() -> set[str]:
    return {p.relative_to(ROOT / "configs").as_posix()
            for p in (ROOT / "configs").rglob("*.yaml")}


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """A wheel built from a copy of the tree (the checkout itself stays untouched)."""
    tmp = tmp_path_factory.mktemp("wheel")
    src = tmp / "src"
    for name in SOURCES:
        if (ROOT / name).is_dir():
            shutil.copytree(ROOT / name, src / name, symlinks=True,
                            ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
        else:
            src.mkdir(exist_ok=True)
            shutil.copy2(ROOT / name, src / name)
    # a nested folder the package-data pattern must pick up, whatever configs/ holds today
    (src / "configs" / "zz_probe").mkdir()
    (src / "configs" / "zz_probe" / "nested.yaml").write_text("name: probe\n")
    cmd = [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(tmp / "dist")]
    if importlib.util.find_spec("setuptools") is not None:  # offline and fast; else isolated
        cmd.append("--no-build-isolation")
    done = subprocess.run([*cmd, str(src)], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    (path,) = (tmp / "dist").glob("qvae-*.whl")
    return path


def test_wheel_ships_every_config_and_the_tensorboard_extra(wheel):
    with zipfile.ZipFile(wheel) as zf:
        names = zf.namelist()
        metadata = zf.read(next(n for n in names if n.endswith(".dist-info/METADATA"))).decode()
    shipped = {n.removeprefix("qvae/configs/") for n in names if n.startswith("qvae/configs/")}
    assert "quickstart.yaml" in shipped and "zz_probe/nested.yaml" in shipped
    assert shipped - {"zz_probe/nested.yaml"} == repo_configs()  # paper/ included when present
    assert "Provides-Extra: tensorboard" in metadata
    assert re.search(r"Requires-Dist: tensorboard\S*.*extra == .tensorboard.", metadata)


#: run inside the installed wheel: several CLI calls for the price of one torch import
PROBE = """
import contextlib, io, json, sys
import qvae
from qvae.cli import main

def run(*args):
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main(list(args))
        except SystemExit as exc:
            code = exc.code
    return {"rc": code, "out": out.getvalue(), "err": err.getvalue()}

print(json.dumps({"file": qvae.__file__, "version": run("--version"),
                  "quickstart": run("config", "--config", "quickstart"),
                  "nested": run("config", "--config", "zz_probe/nested"),
                  "missing": run("config", "--config", "configs/quickstart.yaml")}))
"""


def test_installed_wheel_resolves_names_from_any_directory(wheel, tmp_path):
    """Install the wheel (no deps: they are this venv's) and use it from an unrelated folder."""
    target, elsewhere = tmp_path / "site", tmp_path / "elsewhere"
    elsewhere.mkdir()
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target",
                    str(target), str(wheel)], check=True, capture_output=True, timeout=300)
    env = {**os.environ, "PYTHONPATH": str(target), "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-c", PROBE], cwd=elsewhere, env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    got = json.loads(done.stdout.strip().splitlines()[-1])
    assert Path(got["file"]).is_relative_to(target)  # the wheel's qvae, not the checkout's
    assert got["version"]["rc"] == 0 and got["version"]["out"].startswith("qvae ")
    quickstart = got["quickstart"]
    assert quickstart["rc"] == 0, quickstart["err"]
    expected = load_config(ROOT / "configs/quickstart.yaml").model_dump(mode="json")
    assert json.loads(quickstart["out"]) == expected
    assert json.loads(got["nested"]["out"])["name"] == "probe"
    missing = got["missing"]  # a repository path, and no repository here
    assert missing["rc"] == 2 and len(missing["err"].strip().splitlines()) == 1
    assert "did you mean 'quickstart'" in missing["err"] and "zz_probe/nested" in missing["err"]


def test_every_shipped_config_resolves_by_name_from_another_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    names = shipped_config_names()
    assert {f"{n}.yaml" for n in names} == repo_configs()
    for name in names:
        resolved = resolve_config_path(name)
        assert resolved.read_bytes() == (ROOT / "configs" / f"{name}.yaml").read_bytes()
        assert resolve_config_path(f"{name}.yaml") == resolved
    assert load_config("smoke") == load_config(ROOT / "configs/smoke.yaml")
    from qvae.service.settings import load_service_config

    assert load_service_config("service") == load_service_config(ROOT / "configs/service.yaml")


def test_train_with_a_config_name_outside_the_repository(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    sets = ["train.steps=2", "train.log_every=1", "train.sample_grid=0", "data.batch_size=20",
            "backend.num_samples=20", "model.encoder_hidden=[16]", "model.decoder_hidden=[16]"]
    args = ["train", "--config", "smoke", "--no-eval", "--no-progress", "--out", "run"]
    assert cli_main([*args, *[a for s in sets for a in ("--set", s)]]) == 0
    assert json.loads((tmp_path / "run" / "config.json").read_text())["name"] == "smoke"
    assert (tmp_path / "run" / "last.pt").is_file()


def test_unknown_config_name_is_one_line_listing_the_shipped_names(tmp_path, monkeypatch,
                                                                     capsys):
    monkeypatch.chdir(tmp_path)
    assert cli_main(["train", "--config", "quikstart", "--out", "run"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "quikstart" in err
    assert "did you mean 'quickstart'" in err
    assert all(name in err for name in shipped_config_names())
    assert not (tmp_path / "run").exists()
    with pytest.raises(ConfigError, match="shipped"):
        load_config("../configs/smoke")  # a name cannot leave the shipped folder (qvae/configs)


def test_an_existing_file_wins_over_a_shipped_name(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "smoke").write_text("name: mine\n")
    assert load_config("smoke").name == "mine"
    assert load_config("smoke.yaml").name == "smoke"  # no such file here: the shipped one


def test_version_comes_from_the_installed_metadata(capsys, monkeypatch):
    from importlib import metadata

    import qvae
    from qvae import cli

    with pytest.raises(SystemExit) as done:
        cli_main(["--version"])
    assert done.value.code == 0
    assert capsys.readouterr().out.strip() == f"qvae {metadata.version('qvae')}"
    assert metadata.version("qvae") == qvae.__version__  # pyproject and the package agree

    def not_installed(name):
        raise metadata.PackageNotFoundError(name)

    monkeypatch.setattr(metadata, "version", not_installed)
    assert cli._version() == f"{qvae.__version__} (not installed)"


def test_missing_tensorboard_says_which_extra_to_install(tmp_path, monkeypatch, capsys):
    from qvae import train

    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # import fails
    assert train._tensorboard(tmp_path) is None
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and 'pip install "qvae[tensorboard]"' in err


# ------------------------------------------------------------------------------ docs
def tree_files(*suffixes: str):
    for dirpath, dirnames, filenames in os.walk(ROOT):
        dirnames[:] = [d for d in dirnames if d not in SKIP_DIRS and not d.endswith(".egg-info")]
        for name in filenames:
            if name.endswith(suffixes):
                yield Path(dirpath) / name


def test_docs_exist():
    for name in DOCS:
        text = (ROOT / "docs" / name).read_text()
        assert text.startswith("# ") and len(text) > 2000, name


def test_every_docs_citation_points_to_a_file():
    cited: dict[str, list[str]] = {}
    for path in tree_files(".py", ".md", ".yaml", ".toml"):
        for ref in re.findall(r"(?<![\w/.])docs/[\w./-]+?\.md", path.read_text(errors="replace")):
            cited.setdefault(ref, []).append(str(path.relative_to(ROOT)))
    for path in (ROOT / "docs").glob("*.md"):  # links between the docs pages
        for ref in re.findall(r"\]\(([\w./-]+\.md)(?:#[\w-]*)?\)", path.read_text()):
            if not ref.startswith(("http", "/")):
                cited.setdefault(f"docs/{ref}", []).append(str(path.relative_to(ROOT)))
    assert {f"docs/{name}" for name in DOCS} <= set(cited)  # each page is cited somewhere
    missing = {ref: where for ref, where in cited.items() if not (ROOT / ref).is_file()}
    assert not missing, missing


def test_no_citation_of_sources_outside_the_repository():
    """The team's design brief and the lecture notes are not shipped: cite docs/ instead."""
    pattern = re.compile("DESIGN" + r"\.md|notes 0\d\d")
    me = Path(__file__).resolve()
    offenders = [f"{path.relative_to(ROOT)}:{n}"
                 for path in tree_files(".py", ".md") if path.resolve() != me
                 for n, line in enumerate(path.read_text(errors="replace").splitlines(), 1)
                 if pattern.search(line)]
    assert not offenders, offenders
