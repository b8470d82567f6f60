"""`bot export` lists what it writes and never deletes a user's files (issue 28, item 11 and
the export minor). Item 8 is tested in tests/unit/eval/test_metrics_size.py and
tests/unit/manifests/test_add_warnings.py."""

from __future__ import annotations

import json

import pytest
from helpers import make_adapter, make_tiny_backbone

from bot.cli import main
from bot.errors import ExportError
from bot.export.vllm import export

# ------------------------------------------------------------------ item 8


# ------------------------------------------------------------------ item 11
@pytest.fixture
def exported(tmp_path):
    bb = make_tiny_backbone()
    make_adapter(bb, tmp_path / "adapters", "talk", "generate")
    out = tmp_path / "out"
    export(["talk"], out, backbone=bb, adapters_dir=tmp_path / "adapters")
    return bb, tmp_path / "adapters", out


def test_11_an_export_lists_what_it_wrote(exported):
    _, _, out = exported
    files = json.loads((out / "export.json").read_text())["files"]
    on_disk = sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file())
    assert files == on_disk and "README.md" in files and "talk/adapter_config.json" in files


def test_11_re_export_refuses_to_delete_files_it_did_not_write(exported):
    bb, adapters, out = exported
    (out / "notes.txt").write_text("mine")
    (out / "talk" / "eval.md").write_text("mine too")
    with pytest.raises(ExportError, match=r"2 file\(s\) no export wrote \(notes.txt, talk/eval.md\)"
                                          r".*--force"):
        export(["talk"], out, backbone=bb, adapters_dir=adapters)
    assert (out / "notes.txt").read_text() == "mine" and (out / "talk" / "eval.md").exists()


def test_11_force_moves_them_to_the_trash_first(exported):
    bb, adapters, out = exported
    (out / "notes.txt").write_text("mine")
    (out / "talk" / "eval.md").write_text("mine too")
    export(["talk"], out, backbone=bb, adapters_dir=adapters, force=True)
    assert not (out / "notes.txt").exists() and (out / "README.md").exists()
    [trash] = (out.parent / ".trash").iterdir()
    assert trash.name.startswith("out-")
    assert (trash / "notes.txt").read_text() == "mine"
    assert (trash / "talk" / "eval.md").read_text() == "mine too"
    export(["talk"], out, backbone=bb, adapters_dir=adapters)  # its own files only: no refusal


def test_11_an_older_export_without_a_file_list_keeps_the_user_files(exported):
    bb, adapters, out = exported
    manifest = json.loads((out / "export.json").read_text())
    del manifest["files"]
    (out / "export.json").write_text(json.dumps(manifest))
    (out / "mine").mkdir()
    (out / "mine" / "run.sh").write_text("vllm serve ...")
    with pytest.raises(ExportError, match=r"mine/run.sh"):
        export(["talk"], out, backbone=bb, adapters_dir=adapters)
    (out / "mine" / "run.sh").unlink()
    (out / "mine").rmdir()
    export(["talk"], out, backbone=bb, adapters_dir=adapters)  # base/, talk/, README.md: ours


def test_minor_export_below_a_file_names_the_file_not_errno(tmp_path, capsys):
    (tmp_path / "file").write_text("x")
    assert main(["export", "talk", "--to", str(tmp_path / "file" / "sub"),
                 "--adapters-dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert f"{tmp_path / 'file'} is a file, so" in err and "Fix: pass --to a folder" in err
    assert "Errno" not in err
