"""Issue 10, "Files": checkpoints never run code and are checksummed, unreadable files get one
line naming them (no traceback), eval.json is always valid JSON, atomic writes honour the umask
and clean up after killed writers, and a torn metrics line does not block --resume."""

import json
import os
import subprocess
import sys
import threading
import zipfile
from pathlib import Path

import pytest
import torch

from qvae import checkpoint
from qvae.atomic import write_atomic, write_bytes_atomic
from qvae.cli import main as cli_main
from qvae.config import load_config
from qvae.train import train

ROOT = Path(__file__).resolve().parents[1]
TINY = [
    "model.n_visible=8", "model.n_hidden=8", "model.encoder_hidden=[32]",
    "model.decoder_hidden=[32]", "data.batch_size=50", "backend.num_samples=50",
    "backend.options={num_sweeps: 2, burn_in: 20}", "train.log_every=5",
    "train.checkpoint_every=10", "train.sample_grid=4", "eval.num_iw=5",
    "eval.max_examples=20", "eval.at_end=false",
]


def tiny(*extra):
    return load_config(ROOT / "configs/smoke.yaml", [*TINY, *extra])


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A real 10-step run directory (last.pt at step 10), shared read-only by the tests."""
    out = tmp_path_factory.mktemp("run")
    train(tiny("train.steps=10"), out, progress=False)
    return out


def copy_run(run, dest):
    dest.mkdir(parents=True, exist_ok=True)
    (dest / "last.pt").write_bytes((run / "last.pt").read_bytes())
    return dest


def one_line_error(capsys, path):
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert str(path) in lines[0], err
    return lines[0]


class RunsCode:
    """A pickle that calls os.system when unpickled (and nothing when pickled)."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


# ----------------------------------------------------------------- checkpoints never run code
@pytest.mark.parametrize("command", ["evaluate", "sample"])
def test_pickled_code_in_a_checkpoint_never_runs(tmp_path, capsys, command):
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil"
    evil.mkdir()
    torch.save({"format_version": 1, "config": {}, "payload": RunsCode(marker)},
               evil / "last.pt")
    argv = [command, str(evil), "--out", str(tmp_path / "out")]
    if command == "evaluate":
        argv.append("--no-progress")
    assert cli_main(argv) == 2
    assert not marker.exists(), "the checkpoint's pickle ran code"
    line = one_line_error(capsys, evil / "last.pt")
    assert "refused" in line and "system" in line


def _truncated(run):
    return (run / "last.pt").read_bytes()[:4000]


BAD_FILES = {
    "empty": lambda run, p: p.write_bytes(b""),
    "truncated": lambda run, p: p.write_bytes(_truncated(run)),
    "random": lambda run, p: p.write_bytes(torch.randint(0, 256, (5000,),
                                                         generator=torch.Generator()
                                                         .manual_seed(0)).byte().numpy()
                                           .tobytes()),
    "text": lambda run, p: p.write_text("step: 10\nthis is not a checkpoint\n"),
    "plain-list": lambda run, p: torch.save([1, 2, 3], p),
    "dict-without-format": lambda run, p: torch.save({"model": {}}, p),
}


@pytest.mark.parametrize("kind", sorted(BAD_FILES))
@pytest.mark.parametrize("command", ["evaluate", "sample"])
def test_unreadable_checkpoints_give_one_line(run, tmp_path, capsys, kind, command):
    bad = tmp_path / "bad.pt"
    BAD_FILES[kind](run, bad)
    argv = [command, str(bad), "--out", str(tmp_path / "out.x")]
    assert cli_main(argv) == 2
    line = one_line_error(capsys, bad)
    assert any(word in line for word in ("restore", "retrain", "pass a run directory"))


def _tensor_entry_offset(path):
    """(offset, size) of the largest tensor's bytes inside a torch zip checkpoint."""
    with zipfile.ZipFile(path) as zf:
        info = max((i for i in zf.infolist() if "/data/" in i.filename), key=lambda i: i.file_size)
    with open(path, "rb") as fh:
        fh.seek(info.header_offset)
        header = fh.read(30)
    name_len = int.from_bytes(header[26:28], "little")
    extra_len = int.from_bytes(header[28:30], "little")
    return info.header_offset + 30 + name_len + extra_len, info.file_size


def test_corrupted_tensor_bytes_are_refused(run, tmp_path, capsys):
    bad = copy_run(run, tmp_path / "bad") / "last.pt"
    offset, size = _tensor_entry_offset(bad)
    data = bytearray(bad.read_bytes())
    data[offset + size // 2 : offset + size // 2 + 64] = b"\xff" * 64  # NaN bit patterns
    bad.write_bytes(bytes(data))
    out = tmp_path / "eval.json"
    assert cli_main(["evaluate", str(bad.parent), "--out", str(out), "--no-progress"]) == 2
    assert "checksum mismatch" in one_line_error(capsys, bad)
    assert not out.exists()
    with pytest.raises(checkpoint.CheckpointError, match="checksum"):
        checkpoint.load(bad)


def test_checkpoint_is_plain_data_with_checksum(run, tmp_path):
    state = torch.load(run / "last.pt", weights_only=True)  # loads without any allowlist
    assert state["format_version"] == checkpoint.FORMAT_VERSION
    assert state["checksum"] == checkpoint.checksum(state)
    with pytest.raises(TypeError, match="plain data"):
        checkpoint.save_atomic({"config": object()}, tmp_path / "x.pt")
    assert not (tmp_path / "x.pt").exists()


def test_format_1_checkpoints_still_load_safely(run, tmp_path, capsys):
    old = tmp_path / "old"
    old.mkdir()
    state = torch.load(run / "last.pt", weights_only=True)
    state.pop("checksum")
    torch.save({**state, "format_version": 1}, old / "last.pt")
    assert cli_main(["evaluate", str(old), "--out", str(tmp_path / "e.json"),
                     "--no-progress"]) == 0
    assert json.loads((tmp_path / "e.json").read_text())["num_examples"] == 20


# -------------------------------------------------------------------- eval.json is never NaN
def test_nan_parameters_never_reach_eval_json(run, tmp_path, capsys):
    state = checkpoint.load(run)
    state["model"] = {k: v.clone() for k, v in state["model"].items()}
    state["model"]["prior.weight"][0, 0] = float("nan")
    state.pop("format_version"), state.pop("checksum")
    checkpoint.save_atomic(state, tmp_path / "nan" / "last.pt")  # a valid, checksummed file
    out = tmp_path / "eval.json"
    assert cli_main(["evaluate", str(tmp_path / "nan"), "--out", str(out),
                     "--no-progress"]) == 2
    assert "prior.weight" in one_line_error(capsys, tmp_path / "nan" / "last.pt")
    assert not out.exists()


def test_non_finite_results_are_an_error_not_json_nan(run, tmp_path):
    from qvae.evaluate import NonFiniteResult, evaluate_model

    model, cfg, _ = checkpoint.load_model(run)
    # a bound that overflows on some examples (as corrupted or extreme weights make it)
    model.iw_bound = lambda x, *a, **k: torch.full((len(x),), float("-inf"))
    out = tmp_path / "eval.json"
    with pytest.raises(NonFiniteResult, match="nll = inf.*no result was written"):
        evaluate_model(model, cfg, out, progress=False)
    assert not out.exists()


# --------------------------------------------------------------------- CLI: no tracebacks
def test_cli_expected_failures_are_one_line(run, tmp_path, capsys):
    bad_yaml = tmp_path / "bad.yaml"
    bad_yaml.write_text("train:\n  steps: [1, 2\n")
    assert cli_main(["train", "--config", str(bad_yaml), "--no-progress"]) == 2
    assert "line" in one_line_error(capsys, bad_yaml)

    binary = tmp_path / "binary.yaml"
    binary.write_bytes(b"\xff\xfe\x00garbage")
    assert cli_main(["config", "--config", str(binary)]) == 2
    one_line_error(capsys, binary)

    assert cli_main(["config", "--set", "train.steps={1"]) == 2
    assert "Traceback" not in capsys.readouterr().err

    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    out = blocker / "eval.json"  # a path under a regular file: NotADirectoryError
    assert cli_main(["evaluate", str(run), "--out", str(out), "--no-progress"]) == 2
    one_line_error(capsys, blocker)
    assert cli_main(["sample", str(run), "-n", "4", "--out", str(blocker / "g.png")]) == 2
    one_line_error(capsys, blocker)
    assert cli_main(["train", "--config", str(ROOT / "configs/smoke.yaml"), "--out",
                     str(blocker / "run"), "--no-progress", "--set", "train.steps=1"]) == 2
    one_line_error(capsys, blocker)


# ----------------------------------------------------------------------------- atomic writes
@pytest.mark.parametrize("mask", [0o022, 0o027, 0o002])
def test_atomic_writes_honour_the_umask(tmp_path, mask):
    previous = os.umask(mask)
    try:
        path = write_bytes_atomic(tmp_path / "f.json", b"{}")
        checkpoint.save_atomic({"step": 1}, tmp_path / "last.pt")
    finally:
        os.umask(previous)
    assert (path.stat().st_mode & 0o777) == 0o666 & ~mask
    assert ((tmp_path / "last.pt").stat().st_mode & 0o777) == 0o666 & ~mask


KILLED_WRITER = """
import os, signal, sys
from qvae.atomic import write_atomic

def write(fh):
    fh.write(b"half a checkpoint")
    fh.flush()
    os.kill(os.getpid(), signal.SIGKILL)

write_atomic(sys.argv[1], write)
"""


def test_leftovers_of_killed_writes_are_removed_on_the_next_write(tmp_path):
    target = tmp_path / "last.pt"
    seen = set()
    for _ in range(2):  # the second killed writer already removes the first one's leftover
        proc = subprocess.run([sys.executable, "-c", KILLED_WRITER, str(target)], cwd=ROOT)
        assert proc.returncode == -9
        leftovers = sorted(tmp_path.glob(".last.pt.*.tmp"))
        assert len(leftovers) == 1 and leftovers[0] not in seen and not target.exists()
        seen.add(leftovers[0])
    unrelated = [tmp_path / ".last.pt.notours.tmp", tmp_path / ".other.pt.abcd1234.tmp",
                 tmp_path / "last.pt.abcd1234.tmp"]
    for path in unrelated:
        path.write_text("keep me")
    checkpoint.save_atomic({"step": 3}, target)
    assert checkpoint.load(target)["step"] == 3
    assert not any(p.exists() for p in leftovers)
    assert all(p.exists() for p in unrelated)


def test_a_live_writers_temporary_file_is_not_removed(tmp_path):
    from qvae.atomic import remove_leftovers

    target = tmp_path / "job.json"
    started, release = threading.Event(), threading.Event()
    errors = []

    def slow_write(fh):
        fh.write(b'{"slow": true}')
        started.set()
        assert release.wait(30)

    def writer():
        try:
            write_atomic(target, slow_write)
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    thread = threading.Thread(target=writer)
    thread.start()
    assert started.wait(30)
    (live,) = tmp_path.glob(".job.json.*.tmp")
    assert remove_leftovers(target) == []  # held by the live writer
    write_bytes_atomic(target, b'{"fast": true}')  # another write meanwhile
    assert live.exists()
    release.set()
    thread.join(30)
    assert not errors and not thread.is_alive()
    assert json.loads(target.read_text()) == {"slow": True}
    assert list(tmp_path.glob(".job.json.*.tmp")) == []


# ------------------------------------------------------------------ torn metrics line, resume
def test_a_torn_last_metrics_line_does_not_block_resume(run, tmp_path, capsys):
    part = copy_run(run, tmp_path / "part")
    rows = (run / "metrics.jsonl").read_text()
    (part / "metrics.jsonl").write_text(rows + '{"step": 15, "loss": 12')  # killed mid-write
    train(tiny("train.steps=14"), part, resume=True, progress=False)
    assert "half-written last line" in capsys.readouterr().err
    steps = [json.loads(line)["step"] for line in (part / "metrics.jsonl").read_text()
             .splitlines()]
    assert steps == [5, 10, 14]


def test_a_corrupt_metrics_line_names_the_file_and_line(run, tmp_path, capsys):
    part = copy_run(run, tmp_path / "part")
    (part / "metrics.jsonl").write_text('{"step": 5}\nGARBAGE\n{"step": 10}\n')
    assert cli_main(["train", "--out", str(part), "--resume", "--no-progress",
                     "--set", "train.steps=12"]) == 2
    line = one_line_error(capsys, part / "metrics.jsonl")
    assert "line 2" in line
