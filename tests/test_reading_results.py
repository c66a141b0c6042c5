"""Issue 11, "Threads" and "Reading results": the thread policy and its setting, one bound in the
progress bar, a validation curve, plain log lines off a terminal, and a `compare` report whose
noise floor, β interval and mixing warnings mean what they say, with progress while it runs."""

import json
from pathlib import Path

import pytest
import torch

import backends
from backends.testing import exact_visible_marginal, random_rbm, total_variation
from qvae import compare
from qvae import train as train_module
from qvae.cli import main as cli_main
from qvae.config import load_config
from qvae.train import train

ROOT = Path(__file__).resolve().parents[1]
TINY = [
    "model.n_visible=8", "model.n_hidden=8", "model.encoder_hidden=[32]",
    "model.decoder_hidden=[32]", "data.batch_size=50", "backend.num_samples=50",
    "backend.options={num_sweeps: 2, burn_in: 20}", "train.log_every=5",
    "train.checkpoint_every=10", "train.sample_grid=0", "eval.at_end=false",
]


def tiny(*extra):
    return load_config(ROOT / "configs/smoke.yaml", [*TINY, *extra])


def rows(run):
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture
def keep_threads():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


# ------------------------------------------------------------------------------- threads
def test_policy_picks_one_thread_for_the_shipped_training_configs():
    from qvae import threads

    for name in ("quickstart", "smoke", "mnist", "paper/1-layer-nonlin"):
        cfg = load_config(ROOT / "configs" / f"{name}.yaml")
        assert threads.training_macs(cfg) < threads.MACS_PER_THREAD, name
        assert threads.choose_threads(threads.training_macs(cfg), available=64) == 1, name


def test_policy_grows_with_the_work_and_stops_at_the_cores(monkeypatch):
    from qvae import threads

    assert threads.choose_threads(0, available=8) == 1
    assert threads.choose_threads(3 * threads.MACS_PER_THREAD, available=8) == 3
    assert threads.choose_threads(1e15, available=8) == 8
    # An evaluation batch (100 examples × K = 1000) is big enough for more than one thread.
    mnist = load_config(ROOT / "configs/mnist.yaml")
    assert threads.choose_threads(threads.evaluation_macs(mnist), available=8) > 1
    monkeypatch.setenv("OMP_NUM_THREADS", "3")  # the user's cap is the ceiling
    assert threads.available_cores() == 3 and threads.choose_threads(1e15) == 3


def test_an_explicit_setting_wins_and_bad_ones_are_refused():
    from qvae import threads

    assert threads.resolve(4, macs=0) == 4
    assert threads.resolve(None, macs=0) == 1
    with pytest.raises(ValueError, match="threads"):
        threads.resolve(0, macs=0)


def test_train_threads_reach_torch_and_are_restored(tmp_path, keep_threads):
    torch.set_num_threads(2)
    cli = ["train", "--config", str(ROOT / "configs/smoke.yaml"), "--no-progress",
           *[a for s in [*TINY, "train.steps=5"] for a in ("--set", s)]]
    assert cli_main([*cli, "--out", str(tmp_path / "one"), "--threads", "1"]) == 0
    assert {r["threads"] for r in rows(tmp_path / "one")} == {1}
    assert cli_main([*cli, "--out", str(tmp_path / "default")]) == 0
    assert {r["threads"] for r in rows(tmp_path / "default")} == {1}  # small work: one thread
    torch.set_num_threads(1)
    assert cli_main([*cli, "--out", str(tmp_path / "two"), "--threads", "2"]) == 0
    assert {r["threads"] for r in rows(tmp_path / "two")} == {2}
    saved = json.loads((tmp_path / "two" / "config.json").read_text())
    assert saved["threads"] == 2
    assert torch.get_num_threads() == 1  # train() restores the caller's setting


def test_threads_option_on_evaluate_sample_and_compare(tmp_path, keep_threads, capsys):
    run = tmp_path / "run"
    train(tiny("train.steps=2"), run, progress=False)
    torch.set_num_threads(1)
    assert cli_main(["evaluate", str(run), "--num-iw", "2", "--max-examples", "10",
                     "--out", str(tmp_path / "e.json"), "--no-progress", "--threads", "2"]) == 0
    assert torch.get_num_threads() == 2
    assert cli_main(["sample", str(run), "-n", "4", "--out", str(tmp_path / "s.png"),
                     "--threads", "1"]) == 0
    assert torch.get_num_threads() == 1
    assert cli_main(["compare", str(run), "--backends", "exact", "-n", "50", "--grid", "4",
                     "--out", str(tmp_path / "cmp"), "--threads", "2"]) == 0
    assert json.loads((tmp_path / "cmp" / "compare.json").read_text())["threads"] == 2
    with pytest.raises(SystemExit):
        cli_main(["sample", str(run), "--threads", "0"])
    assert "expected a whole number >= 1" in capsys.readouterr().err


# ------------------------------------------------------------------- progress and logs
def test_the_progress_bar_shows_one_bound_under_one_name(tmp_path, monkeypatch):
    seen: list[tuple[str, ...]] = []
    make_bar = train_module._progress

    def spy(*args, **kwargs):
        bar = make_bar(*args, **kwargs)
        original = bar.set_postfix

        def record(*a, **kw):
            seen.append(tuple(k for k in kw if k != "refresh"))
            return original(*a, **kw)

        bar.set_postfix = record
        return bar

    monkeypatch.setattr(train_module, "_progress", spy)
    monkeypatch.setattr(train_module, "_stderr_is_tty", lambda: True, raising=False)
    # 8 + 8 units: log Z is cheap, so the old bar switched to `elbo` at every metrics row.
    train(tiny("train.steps=12", "train.log_every=3"), tmp_path, progress=True)
    assert len(seen) == 12 and set(seen) == {("loss", "elbo+logZ", "sampler")}


def test_off_a_terminal_training_logs_plain_lines(tmp_path, capsys):
    train(tiny("train.steps=10"), tmp_path / "a", progress=True)
    err = capsys.readouterr().err
    assert "\r" not in err  # no carriage-return bar updates in a log file
    lines = [line for line in err.splitlines() if line.startswith("train: step")]
    assert [line.split(",")[0] for line in lines] == ["train: step 5/10", "train: step 10/10"]
    assert "elbo+logZ" in lines[0] and "valid elbo+logZ" in lines[0]
    train(tiny("train.steps=10"), tmp_path / "b", progress=False)  # --no-progress: lines too
    err = capsys.readouterr().err
    assert len([x for x in err.splitlines() if x.startswith("train: step")]) == 2


def test_validation_curve_is_logged_plotted_and_resume_exact(tmp_path, monkeypatch):
    cfg = tiny("train.steps=20")
    train(cfg, tmp_path / "full", progress=False)

    def interrupt(step, _):
        if step == 7:
            raise KeyboardInterrupt

    train(cfg, tmp_path / "part", progress=False, callback=interrupt)
    train(cfg, tmp_path / "part", resume=True, progress=False)
    full, part = rows(tmp_path / "full"), rows(tmp_path / "part")
    values = [r["valid_bound_minus_logz"] for r in full]
    assert len(values) == 4 and all(v == v and v < 0 for v in values)
    assert "valid_elbo_relaxed" in full[-1]  # small prior: with exact log Z too
    assert values == [r["valid_bound_minus_logz"] for r in part]

    from qvae import report

    labels: list[str] = []
    real_plot = report.plt.Axes.plot

    def plot(ax, *args, **kwargs):
        labels.append(kwargs.get("label", ""))
        return real_plot(ax, *args, **kwargs)

    monkeypatch.setattr(report.plt.Axes, "plot", plot)
    out = report.plot_training_curve(tmp_path / "full" / "metrics.jsonl", tmp_path / "c.png")
    assert out.stat().st_size > 1000
    assert any(label.startswith("validation") for label in labels)


# ------------------------------------------------------------------------------ compare
def test_tv_noise_floor_is_a_total_variation():
    # Near-uniform over 2^12 states, 200 samples: Σ√(p(1−p)/n)/2 was ≈ 2.3 here, above 1.
    rbm = random_rbm(12, 4, scale=0.05, seed=3)
    p = exact_visible_marginal(rbm)
    old = 0.5 * float(torch.sqrt(p * (1 - p) / 200).sum())
    assert old > 1
    mean, q99 = compare.tv_noise_floor(p, 200)
    assert 0 < mean <= q99 <= 1
    exact = backends.get_sampler("exact")
    tvs = [total_variation(exact.sample(rbm, 200, seed=s).visible, p) for s in range(10)]
    assert abs(sum(tvs) / len(tvs) - mean) < 0.05  # the floor is what exact samples score
    res = compare.compare_backends(rbm, ["exact"], num_samples=200)["backends"]["exact"]
    assert res["tv_noise_floor"] <= 1 and res["tv_visible"] <= res["tv_noise_floor_q99"]


def test_beta_interval_covers_the_truth_and_excludes_a_wrong_temperature():
    rbm = random_rbm(6, 4, seed=1)
    exact = backends.get_sampler("exact")
    covered = 0
    for s in range(20):
        out = exact.sample(rbm, 500, seed=s)
        beta, lo, hi = compare.fit_beta_interval(rbm, out.visible, out.hidden)
        assert lo < beta < hi and hi - lo < 0.5
        covered += lo <= 1.0 <= hi
    assert covered >= 16  # 95 % nominal: 19 of 20 expected
    hot = backends.get_sampler("gibbs", beta=2.0).sample(rbm, 2000, seed=0)
    _, lo, _ = compare.fit_beta_interval(rbm, hot.visible, hot.hidden)
    assert lo > 1.5


def test_compare_flags_samples_that_are_not_from_the_model(tmp_path):
    rbm = random_rbm(20, 10, scale=0.3, seed=4)  # 20 visible units: the gibbs reference
    res = compare.compare_backends(rbm, ["gibbs", "neal"], num_samples=1000, reference_samples=4000,
                           options={"gibbs": {"beta": 2.0}, "neal": {"num_sweeps": 200}})
    rows_ = res["backends"]
    assert rows_["neal"]["warnings"] == []  # mixed: no false alarm
    flagged = " ".join(rows_["gibbs"]["warnings"])
    assert "mean energy" in flagged and "excludes 1" in flagged
    assert rows_["gibbs"]["beta_fit_ci"][0] > 1
    report = compare.table(res)
    assert "warning: gibbs: mean energy" in report and "warning: neal" not in report
    assert "beta_95ci" in report and "reference" in report


def test_compare_shows_progress_while_a_backend_runs():
    lines: list[str] = []

    class Sink:
        def write(self, text):
            lines.append(text)

        def flush(self):
            pass

    with compare.heartbeat("sampling mala", every_s=1e-3, stream=Sink()):
        backends.get_sampler("gibbs", burn_in=3000).sample(random_rbm(20, 10), 200, seed=0)
    text = "".join(lines)
    assert text.startswith("  sampling mala ...")
    assert "sampling mala: still running" in text and "sampling mala: done in" in text


def test_max_examples_draws_a_random_subset_not_the_sorted_head():
    """The MNIST test split is sorted by label: its first 1,000 images are nearly all zeros, so
    `eval.max_examples` must draw across the split (the same subset in every run)."""
    from qvae.datasets import load_dataset
    from qvae.evaluate import evaluation_subset

    test = load_dataset("mnist", "test")
    sub = evaluation_subset(test, 1000)
    assert sub.shape == (1000, test.shape[1])
    assert torch.equal(sub, evaluation_subset(test, 1000))
    # the head's mean ink (zeros: ~0.19, ones: ~0.08) vs the whole split's mean ink
    whole, head = float(test.mean()), float(test[:1000].mean())
    assert abs(float(sub.mean()) - whole) < 0.25 * abs(head - whole)
