"""Versions (bot.manifests.versions) and the interruptible folder swap (bot.util.fsutil.swap_in / recover).

The kill tests run the swap in a child process whose k-th ``os.rename`` calls ``os._exit``
first (no cleanup, like SIGKILL), then check that the next start puts a whole folder back.
"""

from __future__ import annotations

import inspect
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from helpers import REPO, fake_adapter, save_new, tree

from bot.errors import DataError
from bot.manifests import versions
from bot.util.fsutil import atomic_dir_write, recover, swap_in


def test_a_second_save_keeps_the_previous_version_and_rollback_restores_it(tmp_path):
    folder = fake_adapter(tmp_path / "pets", "v1")
    first = tree(folder)
    save_new(folder, "v22")
    assert (folder / "adapter.yaml").read_text().endswith("version v22\n")
    (kept,) = versions.list_versions(folder)
    assert kept["reason"] == "replaced" and tree(kept["source"]) == first
    assert versions.score_line(kept["metrics"]) == "text 70.0 %"
    done = versions.rollback(tmp_path, "pets")
    assert tree(folder) == first and not done["absent"]
    assert "pets-" in done["replaced"].name and done["replaced"].parent == tmp_path / ".trash"
    assert tree(done["replaced"])["adapter_model.safetensors"]  # the replaced one is kept, not deleted
    assert versions.list_versions(folder) == []  # the restored version left the history
    with pytest.raises(DataError, match="no earlier version of 'pets'.*Fix:"):
        versions.rollback(tmp_path, "pets")


def test_history_keeps_the_newest_versions_and_trashes_older_ones(tmp_path):
    folder = fake_adapter(tmp_path / "pets", "v")
    for i in range(versions.KEEP + 2):
        save_new(folder, "v" * (i + 2))
    kept = versions.list_versions(folder)
    assert len(kept) == versions.KEEP
    assert [len(v["metrics"]["date"]) for v in kept]  # newest first:
    assert kept[0]["source"].joinpath("adapter_model.safetensors").read_bytes().startswith(b"v" * (versions.KEEP + 2))
    trashed = list((tmp_path / ".trash" / "versions" / "pets").iterdir())
    assert len(trashed) == 2  # nothing deleted


def test_an_absent_version_removes_a_new_adapter_again(tmp_path):
    folder = tmp_path / "spam"
    versions.record_absent(folder, "bot add --train")
    swap_in(fake_adapter(tmp_path / ".staging" / "spam", "v1", "spam"), folder)
    done = versions.rollback(tmp_path, "spam")
    assert done["absent"] and not folder.exists()
    assert (done["replaced"] / "adapter_model.safetensors").read_bytes() == b"v1" * 100


def test_rm_moves_to_the_trash_and_rollback_brings_it_back(tmp_path):
    folder = fake_adapter(tmp_path / "pets", "v1")
    before = tree(folder)
    moved = versions.remove(tmp_path, "pets")
    assert not folder.exists() and moved.parent == tmp_path / ".trash" and tree(moved) == before
    (entry,) = versions.list_versions(folder)
    assert entry["reason"] == "bot rm"
    versions.rollback(tmp_path, "pets")
    assert tree(folder) == before and not moved.exists()
    with pytest.raises(DataError, match="does not exist"):
        versions.remove(tmp_path, "ghost")


def test_bot_list_shows_versions_with_scores_and_dates(tmp_path, capsys):
    from bot.cli import main

    folder = fake_adapter(tmp_path / "pets", "v1")
    save_new(folder, "v22")
    assert main(["list", "--adapters-dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "previous 1: " in out and "text 70.0 %" in out and "(bot rollback restores it)" in out
    assert main(["rollback", "pets", "--adapters-dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "restored the version of" in out and "text 70.0 %" in out


# ----- an interrupted swap (issue 28, item 7) ---------------------------------------------------

# The child runs helpers.save_new (and the fake_adapter it writes with) from their source, so
# that it loads only what they use: importing helpers would load torch, seconds per child.
CHILD = textwrap.dedent("""
    import json, os, sys
    from pathlib import Path
    sys.path.insert(0, {root!r})
    from bot.manifests import versions
    from bot.util.fsutil import atomic_dir_write
""")
KILL = textwrap.dedent("""
    real, calls = os.rename, [0]

    def rename(src, dst, *a, **k):
        calls[0] += 1
        if calls[0] == {kill_at}:
            os._exit(137)  # like SIGKILL: no finally, no cleanup
        return real(src, dst, *a, **k)

    os.rename = rename
    save_new(Path({folder!r}), "v22")
""")


def run_killed(folder: Path, kill_at: int) -> int:
    code = "\n".join([CHILD.format(root=str(REPO)), inspect.getsource(fake_adapter), inspect.getsource(save_new),
                      KILL.format(kill_at=kill_at, folder=str(folder))])
    return subprocess.run([sys.executable, "-c", code], capture_output=True, timeout=120).returncode


@pytest.mark.parametrize("kill_at", [1, 2, 3, 4, 99])
def test_a_kill_at_any_rename_of_the_swap_is_repaired_at_the_next_start(tmp_path, kill_at, capsys):
    """Renames: 1 temp -> .pets.new-PID, 2 pets -> .pets.old-PID, 3 .new -> pets,
    4 .old -> .versions/pets/<stamp>/files. 99: not killed."""
    from bot.cli import main

    folder = fake_adapter(tmp_path / "pets", "v1")
    old, new = tree(folder), None
    code = run_killed(folder, kill_at)
    assert code == (0 if kill_at == 99 else 137)
    assert main(["list", "--adapters-dir", str(tmp_path)]) == 0  # the next start
    captured = capsys.readouterr()
    assert "pets" in captured.out and "FAILED" not in captured.out
    now = tree(folder)
    assert now["adapter.yaml"]  # whole again
    kept = [tree(v["source"]) for v in versions.list_versions(folder)]
    if kill_at == 1:  # the new folder was not complete yet: the old one stays, nothing said
        assert now == old and kept == []
    else:  # the new folder was complete: the swap is finished, the old one kept as a version
        new = now
        assert "v22" in (folder / "adapter.yaml").read_text() and kept == [old]
        if kill_at in (2, 3, 4):
            assert "interrupted save" in captured.err or "restored" in captured.err \
                or "put away" in captured.err, captured.err
    assert not [p.name for p in tmp_path.iterdir() if ".old-" in p.name or ".new-" in p.name]
    assert new is None or new != old


def test_recover_restores_a_folder_left_only_as_old(tmp_path):
    """What the swap before issue 28 left after a kill between its two renames."""
    fake_adapter(tmp_path / ".pets.old-999999", "v1", "pets")
    said = recover(tmp_path / "pets")
    assert (tmp_path / "pets" / "adapter.yaml").is_file()
    assert said and "restored" in said[0] and "999999" in said[0]


def test_recover_leaves_a_live_process_alone(tmp_path):
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        fake_adapter(tmp_path / f".pets.old-{live.pid}", "v1", "pets")
        assert recover(tmp_path / "pets") == [] and not (tmp_path / "pets").exists()
    finally:
        live.kill()
        live.wait()
    assert recover(tmp_path / "pets") and (tmp_path / "pets").is_dir()


def test_an_error_between_renames_is_repaired_before_it_propagates(tmp_path, monkeypatch):
    folder = fake_adapter(tmp_path / "pets", "v1")
    real, calls = os.rename, [0]

    def flaky(src, dst, *a, **k):
        calls[0] += 1
        if calls[0] == 3:  # the new folder's rename onto pets
            raise OSError(28, "No space left on device")
        return real(src, dst, *a, **k)

    monkeypatch.setattr(os, "rename", flaky)
    with pytest.raises(OSError):
        save_new(folder, "v22")
    monkeypatch.setattr(os, "rename", real)
    assert (folder / "adapter.yaml").is_file()
    assert not [p.name for p in tmp_path.iterdir() if ".old-" in p.name or ".new-" in p.name]


def test_rollback_puts_back_the_second_stage_fitted_for_the_restored_routes(tmp_path):
    from bot.manifests import router_folder

    for name in ("a", "b", "c"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "adapter.yaml").write_text(f"name: {name}\nkind: base\n")
    stage = router_folder.folder_of(tmp_path)

    def fitted(tag: str, routes: list[str]):
        def write(tmp):
            fake_adapter(tmp, tag, "router")
            (tmp / "stage.json").write_text(json.dumps({"routes": routes, "gate": 0.9, "weight": 0.5}))
        atomic_dir_write(stage, write, versions.retirer(stage))

    fitted("v1", ["a", "b", "c"])
    old = tree(stage)
    fitted("v22", ["a", "b", "c", "d"])  # bot train-router after adding d
    assert router_folder.fitted_routes(stage) == ["a", "b", "c", "d"]
    said = versions.restore_second_stage(tmp_path)  # d is gone again (rolled back)
    assert "restored" in said and tree(stage) == old
    assert versions.restore_second_stage(tmp_path).endswith("unchanged, fitted for these routes")
