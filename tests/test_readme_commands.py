"""Every command of the README's ```bash blocks runs (and every ```python block not listed in
PYTHON_SKIP), so the documentation cannot drift.

Each command is run as written, in a scratch directory holding a `configs` link to the
repository's, with the venv's scripts first on PATH. Sizes shrink by appending flags (SHRINK:
later `--set`s and options win), never by editing the command. A command the test cannot run
here (installs, CI itself, a real QPU) is listed in SKIP with the reason; placeholders are
filled in by TEMPLATES. A command that matches neither a rule nor SKIP fails the test, so a new
README command is either run or consciously listed.

`qvae serve` commands start the service on a free loopback port (appended `--host 127.0.0.1
--port N`), wait for /healthz, and leave it running for the commands after them (`remote`
training, curl), whose `127.0.0.1:8700` becomes that port.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"

#: Appended to every `qvae train` (also under torchrun): a few steps, a tiny evaluation.
TRAIN_TINY = ("--set train.steps=2 --set train.validate_every=0 --set train.sample_grid=4 "
              "--set eval.max_examples=20 --set eval.num_iw=2 --set eval.ais_betas=20 "
              "--set eval.ais_runs=2 --no-progress")
#: (regex on the command, flags appended): the first match wins.
SHRINK: list[tuple[str, str]] = [
    (r"^(torchrun .* -m )?qvae train ", TRAIN_TINY),
    (r"^qvae evaluate ", "--num-iw 2 --ais-betas 20 --ais-runs 2 --pt-replicas 10 "
                         "--pt-chains 10 --pt-burn-in 20 --pt-sweeps 20 --max-examples 20 "
                         "--no-progress"),
    (r"^qvae sample ", "-n 16 --option num_sweeps=10"),
    (r"^qvae compare ", "-n 200 --option neal.num_sweeps=10 --grid 4"),
    (r"^qvae serve ", "--host 127.0.0.1 --port {port}"),
    (r"^qvae ", ""),  # any other subcommand (backends, config, --version) as written
    (r"^curl ", ""),
    (r"^export ", ""),
    (r"^ruff check \.$", ""),
]
#: Commands not run here, and why. Keys are the command with whitespace collapsed.
SKIP: dict[str, str] = {
    "pip install torch==2.13.0": "installs packages: CI's own setup (.ci/run) runs these installs",
    "pip install -e . -c constraints.txt":
        "installs packages: CI's own setup (.ci/run) runs these installs",
    "pip install torch==2.13.0 -c constraints.txt":
        "installs packages: CI's own setup (.ci/run) runs these installs",
    'pip install -e ".[dev]" -c constraints.txt':
        "installs packages: CI's own setup (.ci/run) runs these installs",
    "bash .ci/run": "is CI itself, which runs this test",
    "python -m pytest -q": "is the test suite, which runs this test",
    "qvae train --config configs/mnist.yaml --backend dwave "
    "--set backend.options.qpu_time_budget_s=600":
        "spends QPU time wherever a D-Wave token is configured; the emulator command beside it "
        "runs the same path offline",
    "qvae train --config configs/mnist.yaml --backend remote --set backend.target=dwave":
        "target dwave spends the service's QPU time wherever it has a token; the remote gibbs "
        "command beside it runs the same client path against the test's service",
}
#: ```python blocks not run, by (the heading above them, their index under it), and why.
PYTHON_SKIP: dict[tuple[str, int], str] = {
    ("Python API", 1): "a reference listing: v, h and m stand for the reader's tensors",
    ("Testing your code against every backend", 1):
        "defines pytest tests around MySampler, the reader's own class",
}
#: Commands with placeholders: run as this instead ({port}: the running service's).
TEMPLATES: dict[str, str] = {
    "export QVAE_API_KEY=<one of the keys> QVAE_SERVICE_URL=http://sampler-host:8700":
        "export QVAE_API_KEY=${QVAE_API_KEYS%%,*} QVAE_SERVICE_URL=http://127.0.0.1:{port}",
}
#: Made before the commands run: the run directory the README's examples refer to, holding
#: the model a new user has, that of the first command (configs/quickstart.yaml, 100 + 100).
SETUP = ("qvae train --config configs/quickstart.yaml --out runs/my-run --set train.steps=1 "
         "--set eval.at_end=false --no-progress")
TIMEOUT_S = 300


@dataclass
class Command:
    text: str  # as written (continuations joined, comments dropped)
    line: int  # README line where it starts

    @property
    def key(self) -> str:
        return " ".join(self.text.split())


def bash_blocks(markdown: str) -> list[tuple[int, str]]:
    """(first line number, body) of every ```bash fence, indented ones included."""
    blocks, lines, i = [], markdown.splitlines(), 0
    while i < len(lines):
        fence = re.match(r"^(\s*)```bash\s*$", lines[i])
        if fence:
            start, body = i + 2, []
            i += 1
            while i < len(lines) and lines[i].strip() != "```":
                body.append(lines[i][len(fence.group(1)):])
                i += 1
            blocks.append((start, "\n".join(body)))
        i += 1
    return blocks


def split_commands(body: str, first_line: int) -> list[Command]:
    """Shell commands of a block: newlines and `&&` outside quotes end one, a backslash before a
    newline continues it, `#` at the start of a word begins a comment."""
    commands: list[Command] = []
    current: list[str] = []
    quote, line, start, i = None, first_line, first_line, 0

    def flush() -> None:
        text = "".join(current).strip()
        if text:
            commands.append(Command(text, start))
        current.clear()

    while i < len(body):
        c = body[i]
        if quote:
            current.append(c)
            quote = None if c == quote else quote
        elif c in "'\"":
            quote = c
            current.append(c)
        elif c == "\\" and body[i + 1 : i + 2] == "\n":
            current.append(" ")
            i += 1
            line += 1
        elif c == "#" and (not current or current[-1].isspace()):
            while i + 1 < len(body) and body[i + 1] != "\n":
                i += 1
        elif c == "\n" or body.startswith("&&", i):
            flush()
            if c == "&":
                i += 1
            else:
                line += 1
            start = line
        else:
            if not "".join(current).strip():
                start = line
            current.append(c)
        if c == "\n" and quote:
            line += 1
        i += 1
    flush()
    return commands


def python_blocks(markdown: str) -> list[tuple[tuple[str, int], int, str]]:
    """((heading, index under it from 1), first line, body) of every ```python fence."""
    found, heading, count, lines = [], "", 0, markdown.splitlines()
    i = 0
    while i < len(lines):
        title = re.match(r"^#{2,4} (.+)$", lines[i])
        if title:
            heading, count = title.group(1).strip(), 0
        elif lines[i].strip() == "```python":
            count, start, body = count + 1, i + 2, []
            i += 1
            while i < len(lines) and lines[i].strip() != "```":
                body.append(lines[i])
                i += 1
            found.append(((heading, count), start, "\n".join(body)))
        i += 1
    return found


def readme_commands() -> list[Command]:
    return [cmd for first, body in bash_blocks(README.read_text())
            for cmd in split_commands(body, first)]


def plan(cmd: Command) -> tuple[str, str]:
    """("skip", reason) or ("run", the shell text to run, with {port} unfilled)."""
    if cmd.key in SKIP:
        return "skip", SKIP[cmd.key]
    text = TEMPLATES.get(cmd.key, cmd.text)
    for pattern, extra in SHRINK:
        if re.search(pattern, cmd.key):
            return "run", f"{text} {extra}".strip().replace("127.0.0.1:8700", "127.0.0.1:{port}")
    return "unlisted", ""


# ------------------------------------------------------------------------ the parser
def test_the_parser_reads_continuations_quotes_comments_and_chains():
    body = ("a --x 1   # a comment\n# only a comment\nb \\\n    --y 'q # not\n  a comment' && "
            "c\nd")
    got = [(c.text, c.line) for c in split_commands(body, 10)]
    assert got == [("a --x 1", 10), ("b      --y 'q # not\n  a comment'", 12), ("c", 14),
                   ("d", 15)]
    assert plan(Command("make all", 1)) == ("unlisted", "")  # a new kind of command fails
    assert plan(Command("qvae train --config x.yaml", 1)) == ("run", f"qvae train --config "
                                                                     f"x.yaml {TRAIN_TINY}")


def test_every_readme_command_is_run_or_listed():
    commands = readme_commands()
    assert len(commands) >= 20  # the parser found the README's blocks
    unlisted = [f"README line {c.line}: {c.key}" for c in commands if plan(c)[0] == "unlisted"]
    assert not unlisted, (
        "README commands that tests/test_readme_commands.py neither runs nor skips; add a SHRINK "
        "rule or a SKIP entry with the reason:\n  " + "\n  ".join(unlisted))
    keys = {c.key for c in commands}
    stale = sorted(k for k in [*SKIP, *TEMPLATES] if k not in keys)
    assert not stale, f"SKIP/TEMPLATES entries no longer in the README: {stale}"
    blocks = {key for key, _, _ in python_blocks(README.read_text())}
    assert len(blocks) >= 3 and set(PYTHON_SKIP) <= blocks, set(PYTHON_SKIP) - blocks


@pytest.mark.slow
def test_readme_python_blocks_run(tmp_path):
    """Every ```python block not in PYTHON_SKIP runs as a script without error."""
    (tmp_path / "configs").symlink_to(ROOT / "configs")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    failed = []
    for key, line, body in python_blocks(README.read_text()):
        if key in PYTHON_SKIP:
            continue
        out = subprocess.run([sys.executable, "-c", body], cwd=tmp_path, env=env,
                             capture_output=True, text=True, timeout=TIMEOUT_S)
        if out.returncode != 0:
            failed.append(f"README line {line} ({key}):\n{out.stderr[-2500:]}")
    assert not failed, "\n\n".join(failed)


# ---------------------------------------------------------------------- running them
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_healthy(url: str, proc: subprocess.Popen, attempts: int = 300) -> bool:
    """Poll /healthz (bounded: `attempts` tries 0.1 s apart); False if the server exits first
    or never answers 200."""
    for _ in range(attempts):
        if proc.poll() is not None:
            return False
        try:
            with urllib.request.urlopen(f"{url}/healthz", timeout=2) as response:
                if response.status == 200:
                    return True
        except OSError:
            pass
        time.sleep(0.1)
    return False


def stop(proc: subprocess.Popen | None) -> None:
    if proc is not None and proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def export(text: str, env: dict[str, str], cwd: Path) -> None:
    """Run an `export` line in bash and keep the variables it sets."""
    names = re.findall(r"\b([A-Z_][A-Z0-9_]*)=", text)
    shown = "; ".join(f'printf "%s\\0" "${name}"' for name in names)
    out = subprocess.run(["bash", "-c", f"{text}; {shown}"], cwd=cwd, env=env,
                         capture_output=True, text=True, check=True)
    values = out.stdout.split("\0")[: len(names)]
    assert len(values) == len(names) and all(values), f"{text!r} left a variable empty: {values}"
    env.update(zip(names, values, strict=True))


@pytest.mark.slow
def test_readme_commands_run_as_written(tmp_path):
    (tmp_path / "configs").symlink_to(ROOT / "configs")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DWAVE_", "DW_", "QVAE_"))}
    env.update(PATH=f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}",
               OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    port, service = free_port(), None
    ran, skipped = [], []

    def run(text: str, cwd: Path = tmp_path) -> subprocess.CompletedProcess:
        return subprocess.run(["bash", "-c", text], cwd=cwd, env=env, capture_output=True,
                              text=True, timeout=TIMEOUT_S)

    setup = run(SETUP)
    assert setup.returncode == 0, setup.stderr[-3000:]
    failed: list[str] = []  # every failing command is reported, not only the first
    try:
        for cmd in readme_commands():
            action, text = plan(cmd)
            if action == "skip":
                skipped.append(cmd.key)
                continue
            assert action == "run", f"README line {cmd.line}: {cmd.key} is not listed"
            text = text.replace("{port}", str(port))
            where = f"README line {cmd.line}: {cmd.key}\nran: {text}"
            ran.append(cmd.key)
            if text.startswith("export "):
                export(text, env, tmp_path)
            elif text.startswith("qvae serve "):
                stop(service)  # one service at a time: they share the state database
                log = tmp_path / f"serve-{cmd.line}.log"  # a file: a full pipe would block it
                with log.open("w") as fh:
                    service = subprocess.Popen(shlex.split(text), cwd=tmp_path, env=env,
                                               stdout=fh, stderr=subprocess.STDOUT,
                                               start_new_session=True)
                if not wait_healthy(f"http://127.0.0.1:{port}", service):
                    stop(service)
                    failed.append(f"{where}\nnot healthy: {log.read_text()[-2000:]}")
            else:
                out = run(text, ROOT if text.startswith("ruff ") else tmp_path)
                if out.returncode != 0:
                    failed.append(f"{where}\n{out.stdout[-1500:]}{out.stderr[-2500:]}")
                elif text.startswith("curl ") and "samples" not in json.loads(out.stdout):
                    failed.append(f"{where}\nno samples in {out.stdout[:500]}")
    finally:
        stop(service)
    assert not failed, f"{len(failed)} README command(s) failed:\n\n" + "\n\n".join(failed)
    assert len(ran) >= 12 and len(skipped) == len(SKIP), (ran, skipped)
