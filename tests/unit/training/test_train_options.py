"""`bot add --min-per-label` (rare labels) and `bot train` run with passive OpenMP waiting."""

from __future__ import annotations

import pytest

from bot.cli import main
from bot.manifests.spec import AdapterSpec
from bot.training.train import training_rows


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


@pytest.mark.slow
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
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    monkeypatch.setattr(cli.os, "cpu_count", lambda: 4)
    for busy, threads in ((0.2, 4), (2.7, 1), (9.0, 1), (1.4, 3)):
        monkeypatch.setattr(cli, "_busy_cores", lambda busy=busy: busy)
        assert cli._training_threads() == threads
    # two processes launched together (accelerate) split the free cores between them
    monkeypatch.setattr(cli, "_busy_cores", lambda: 0.0)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    assert cli._training_threads() == 2
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "8")
    assert cli._training_threads() == 1
    monkeypatch.setenv("BOT_TRAIN_THREADS", "3")
    assert cli._training_threads() == 3


def test_busy_cores_are_measured_now_not_from_the_lagging_load_average(monkeypatch):
    from bot import cli

    monkeypatch.setattr(cli.os, "cpu_count", lambda: 2)
    # a job that just ended still shows in the 1-minute load average ...
    monkeypatch.setattr(cli.os, "getloadavg", lambda: (1.3, 1.3, 1.8))
    # ... but over the sampled second the machine was 95 % idle
    samples = iter([(10_000, 4_000), (10_200, 4_190)])
    monkeypatch.setattr(cli, "_cpu_times", lambda: next(samples))
    monkeypatch.setattr(cli.time, "sleep", lambda s: None)
    assert abs(cli._busy_cores() - 0.1) < 1e-9
    samples = iter([(10_000, 4_000), (10_200, 4_190)])
    assert cli._training_threads() == 2
    # one core busy: half the jiffies idle
    samples = iter([(0, 0), (200, 100)])
    assert cli._busy_cores() == 1.0
    # no /proc/stat: the load average
    monkeypatch.setattr(cli, "_cpu_times", lambda: None)
    assert cli._busy_cores() == 1.3


def test_saving_elsewhere_carries_the_data_file_from_the_manifests_own_folder(tmp_path):
    from helpers import make_tiny_backbone

    from bot.tasks import task_class
    from bot.training.train import save_adapter_folder

    staging, dest = tmp_path / "staging", tmp_path / "dest"
    staging.mkdir()
    (staging / "data.csv").write_text("text,label\na,x\nb,y\n")
    dest.mkdir()
    (dest / "data.csv").write_text("text,label\nstale,x\n")  # the previous adapter's copy
    spec = AdapterSpec.from_dict({"name": "pets", "kind": "classify", "labels": ["x", "y"],
                                  "template": "{text}", "lora": {"r": 4, "layers": [1]},
                                  "data": {"path": "data.csv", "text_col": "text", "label_col": "label"}},
                                 staging / "adapter.yaml")
    bb = make_tiny_backbone()
    bb.add_adapter("pets", spec.lora.to_peft(bb.base.config.num_hidden_layers))
    save_adapter_folder(spec, bb, task_class("classify")(spec, bb), {}, dest)
    assert (dest / "data.csv").read_text() == "text,label\na,x\nb,y\n"
