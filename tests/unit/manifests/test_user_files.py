"""A user's data files read as the user meant them (issue 9, section 3): quoting, odd line ends,
JSON labels, symlinks, and errors that name the line and column.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from helpers import toy_csv, write_exact

from bot.cli import main
from bot.errors import DataError
from bot.manifests.data import load_user_file, read_table
from bot.manifests.spec import AdapterSpec


def test_3_quoted_newlines_are_kept(tmp_path):
    path = write_exact(tmp_path / "d.csv", 'text,label\n"first line\nsecond line",a\r\n"x\r\ny",b\n')
    rows, _ = read_table(path)
    assert [r["text"] for r in rows] == ["first line\nsecond line", "x\r\ny"]


def test_3_u2028_and_form_feed_stay_inside_the_field_with_true_line_numbers(tmp_path):
    text = 'text,label\nsee\u2028you,a\npage\x0cbreak,b\n"two\nlines",a\nempty label,\n'
    path = write_exact(tmp_path / "d.csv", text)
    rows, _ = read_table(path)
    assert [r["text"] for r in rows[:2]] == ["see\u2028you", "page\x0cbreak"]
    assert len(rows) == 4


def test_3_empty_cell_error_names_the_physical_line(tmp_path, capsys):
    text = 'text,label\nsee\u2028you,a\npage\x0cbreak,b\n"two\nlines",a\nempty label,\n'
    path = write_exact(tmp_path / "d.csv", text)
    assert main(["add", "x", "--from", str(path), "--adapters-dir", str(tmp_path / "a")]) == 2
    assert "empty 'label' (line 6)" in capsys.readouterr().err


@pytest.mark.parametrize("zero, one", [("0", "1"), ("false", "true"), ("0", "1.0")])
def test_3_json_labels_zero_false_and_numbers_are_labels(tmp_path, zero, one):
    lines = [f'{{"text": "row {i}", "label": {zero if i % 2 else one}}}' for i in range(12)]
    path = write_exact(tmp_path / "d.jsonl", "\n".join(lines) + "\n")
    rows = load_user_file(path, "classify")
    assert len(rows) == 12
    assert {r["label"] for r in rows} == {zero, one.replace(".0", "")}


def test_3_numeric_labels_1_and_1_0_are_one_class(tmp_path):
    lines = [f'{{"text": "t{i}", "label": {["1", "1.0", "0", "0.0"][i % 4]}}}' for i in range(20)]
    path = write_exact(tmp_path / "d.jsonl", "\n".join(lines) + "\n")
    assert sorted({r["label"] for r in load_user_file(path, "classify")}) == ["0", "1"]
    csv = write_exact(tmp_path / "d.csv", "text,label\n" + "".join(f"t{i},{['1', '1.0'][i % 2]}\n" for i in range(6)))
    assert {r["label"] for r in load_user_file(csv, "classify")} == {"1"}


def test_3_json_labels_accepted_by_add(tmp_path):
    lines = [f'{{"text": "row {i}", "label": {i % 2}}}' for i in range(12)]
    path = write_exact(tmp_path / "d.jsonl", "\n".join(lines) + "\n")
    assert main(["add", "x", "--from", str(path), "--adapters-dir", str(tmp_path / "a")]) == 0
    assert AdapterSpec.from_dir(tmp_path / "a" / "x").labels == ["0", "1"]


def test_3_truncated_json_array_is_a_data_error_with_line_and_column(tmp_path):
    path = write_exact(tmp_path / "d.json", '[\n {"text": "a", "label": "x"},\n {"text": "b", "lab')
    with pytest.raises(DataError) as err:
        read_table(path)
    msg = str(err.value)
    assert str(path) in msg and "line 3" in msg and "column" in msg and "Fix:" in msg


def test_3_nan_is_not_json(tmp_path):
    path = write_exact(tmp_path / "d.jsonl", '{"text": "a", "label": NaN}\n')
    with pytest.raises(DataError, match="line 1"):
        read_table(path)


def test_3_symlink_outside_the_data_is_refused_without_echo(tmp_path, capsys):
    secret = tmp_path / "private" / "secret.txt"
    secret.parent.mkdir()
    write_exact(secret, "TOPSECRET-FIRST-LINE\nhunter2\n")
    data = tmp_path / "data"
    data.mkdir()
    (data / "pets.csv").symlink_to(secret)
    with pytest.raises(DataError) as err:
        read_table(data / "pets.csv")
    assert "TOPSECRET" not in str(err.value) and "symbolic link" in str(err.value)
    assert main(["add", "x", "--from", str(data / "pets.csv"), "--adapters-dir", str(tmp_path / "a")]) == 2
    captured = capsys.readouterr()
    assert "TOPSECRET" not in captured.err + captured.out and "symbolic link" in captured.err


def test_3_symlink_inside_the_same_folder_is_fine(tmp_path):
    real = toy_csv(tmp_path / "real.csv", n=20)
    (tmp_path / "link.csv").symlink_to(real)
    assert len(read_table(tmp_path / "link.csv")[0]) == 20


@pytest.mark.parametrize("target, words", [("folder", "is a folder"), ("/dev/null", "is not a regular file")])
def test_3_from_a_folder_or_device_says_what_it_is(tmp_path, capsys, target, words):
    path = tmp_path if target == "folder" else Path(target)
    assert main(["add", "x", "--from", str(path), "--adapters-dir", str(tmp_path / "a")]) == 2
    err = capsys.readouterr().err
    assert words in err and "does not exist" not in err


def test_3_extra_cells_are_refused_with_line_and_column(tmp_path):
    path = write_exact(tmp_path / "d.csv", "text,label\nhello,a\nhello, world,b\n")
    with pytest.raises(DataError) as err:
        read_table(path)
    assert "line 3" in str(err.value) and "column 3" in str(err.value) and "Fix:" in str(err.value)


def test_3_duplicate_header_names_are_refused(tmp_path):
    path = write_exact(tmp_path / "d.tsv", "text\tlabel\ttext\nhi\ta\tho\n")
    with pytest.raises(DataError) as err:
        read_table(path)
    msg = str(err.value)
    assert "line 1" in msg and "'text'" in msg and "columns 1 and 3" in msg


def test_3_unclosed_quote_is_refused_not_glued(tmp_path):
    path = write_exact(tmp_path / "d.csv", 'text,label\n"oops,a\nnext,b\nlast,a\n')
    with pytest.raises(DataError) as err:
        read_table(path)
    assert "line 2" in str(err.value) and "quote" in str(err.value)
