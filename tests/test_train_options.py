"""`bot add --min-per-label` (rare labels) and `bot train` run with passive OpenMP waiting."""

from __future__ import annotations

from bot.cli import main
from bot.spec import AdapterSpec
from bot.train import training_rows


def test_rare_labels_refused_by_default_and_kept_with_min_per_label(tmp_path, capsys):
    src = tmp_path / "q.csv"
    lines = ["text,label"] + [f"how do I do thing {i},manner" for i in range(30)]
    lines += [f"what is word {i},def" for i in range(30)] + ["who won the cup in 1966,rare", "who ran fastest,rare"]
    src.write_text("\n".join(lines) + "\n")
    adapters = tmp_path / "adapters"
    args = ["add", "q", "--adapters-dir", str(adapters), "--from", str(src)]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "{'rare': 2}" in err and "--min-per-label 1" in err
    assert main([*args, "--min-per-label", "1"]) == 0
    spec = AdapterSpec.from_dir(adapters / "q")
    assert spec.labels == ["def", "manner", "rare"] and spec.data["min_per_label"] == 1
    spec, splits = training_rows(spec)  # bot train accepts what bot add accepted
    assert sum(s for s in splits.sizes().values()) == 62


def test_bot_train_runs_with_passive_openmp_waiting(tmp_path):
    """A real `python -m bot.cli train` re-executes itself once with OMP_WAIT_POLICY=PASSIVE."""
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    out = subprocess.run([sys.executable, "-m", "bot.cli", "train", "ghost", "--adapters-dir", str(tmp_path)],
                         capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 2 and "does not exist" in out.stderr
    assert "OMP_WAIT_POLICY=PASSIVE" in out.stderr
    env["OMP_WAIT_POLICY"] = "ACTIVE"  # the user's own choice wins
    out = subprocess.run([sys.executable, "-m", "bot.cli", "train", "ghost", "--adapters-dir", str(tmp_path)],
                         capture_output=True, text=True, env=env, timeout=120)
    assert "OMP_WAIT_POLICY=ACTIVE" in out.stderr


def test_training_threads_leave_busy_cores_alone(monkeypatch):
    from bot import cli

    monkeypatch.delenv("BOT_TRAIN_THREADS", raising=False)
    monkeypatch.setattr(cli.os, "cpu_count", lambda: 4)
    monkeypatch.setattr(cli.os, "getloadavg", lambda: (0.2, 0.0, 0.0))
    assert cli._training_threads() == 4
    monkeypatch.setattr(cli.os, "getloadavg", lambda: (2.7, 0.0, 0.0))
    assert cli._training_threads() == 1
    monkeypatch.setattr(cli.os, "getloadavg", lambda: (9.0, 0.0, 0.0))
    assert cli._training_threads() == 1
    monkeypatch.setenv("BOT_TRAIN_THREADS", "3")
    assert cli._training_threads() == 3
