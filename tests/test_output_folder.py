"""A user's files are never ours to touch: the output-folder rule, export's separate folder, and checkpoints that a
kill, a full disk or a hand edit left (resumed to the uninterrupted result, or refused in one line, untouched)."""

import json
from pathlib import Path

import pytest

from safety_heads.cli import main
from safety_heads.errors import UserError
from safety_heads.runs.files import TEMPORARY_SUFFIX
from safety_heads.runs.folder import Checkpoint

QUERIES = [f"How would someone do forbidden thing {i}?" for i in range(4)]
PROMPT = ["ships", "--prompt", "How to pick a lock?", "--heads", "0:0"]


def one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("safety-heads: error: "), err
    return err[0]


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


@pytest.fixture
def dataset(tmp_path):
    path = tmp_path / "queries.json"
    path.write_text(json.dumps(QUERIES))
    return path


def ships(dataset, out) -> list[str]:
    return ["ships", "--dataset", str(dataset), "--heads", "0:*", "--out", str(out)]


@pytest.mark.parametrize("argv", [PROMPT, ["run", "--quick", "--limit", "2", "--max-new-tokens", "2"],
                                  ["run", "--quick", "--limit", "2", "--max-new-tokens", "2", "--resume"]])
def test_a_folder_holding_the_users_files_is_refused_and_left_as_it_was(argv, tmp_path, capsys):
    out = tmp_path / "u"
    out.mkdir()
    (out / ".notes.tmp").write_text("precious\n")
    (out / "ships_heatmap.png").write_text("mine\n")
    before = snapshot(out)
    assert main([*argv, "--out", str(out)]) == 2
    assert "is not empty" in one_error_line(capsys)
    assert snapshot(out) == before and sorted(p.name for p in out.iterdir()) == [".notes.tmp", "ships_heatmap.png"]


def test_the_root_folder_is_refused(capsys):
    assert main([*PROMPT, "--out", "/"]) == 2
    assert "'/' is not empty" in one_error_line(capsys)
    assert not Path("/ships.json").exists()


def test_an_empty_folder_or_one_with_a_left_lock_is_used(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert main([*PROMPT, "--out", str(tmp_path / "empty")]) == 0
    assert (tmp_path / "empty" / "ships.json").exists()


def stopped_ships(dataset, out, monkeypatch, after: int = 1) -> Path:
    """A ships run stopped after `after` queries (as Ctrl-C would): its checkpoint has a header and `after` units."""
    import safety_heads.ships as ships_module

    seen = []

    def stop(line):
        seen.append(line)
        if len([s for s in seen if s.startswith("[")]) >= after:
            raise KeyboardInterrupt

    with monkeypatch.context() as patch:
        patch.setattr(ships_module, "print_progress", stop)
        assert main(ships(dataset, out)) == 130
    return out / "ships.checkpoint.jsonl"


def test_resume_removes_only_our_temporaries(dataset, tmp_path, monkeypatch, capsys):
    checkpoint = stopped_ships(dataset, tmp_path / "run", monkeypatch)
    ours = checkpoint.parent / f".ships.json.abcd1234{TEMPORARY_SUFFIX}"
    ours.write_bytes(b"half")
    (checkpoint.parent / ".notes.tmp").write_text("precious\n")
    assert main(ships(dataset, tmp_path / "run") + ["--resume"]) == 0
    assert not ours.exists() and (checkpoint.parent / ".notes.tmp").read_text() == "precious\n"


@pytest.mark.parametrize("value", ["NaN", "Infinity", "-Infinity", "1e400"])
def test_a_checkpoint_line_with_nan_or_infinity_is_one_line_and_left_as_it_was(value, dataset, tmp_path, monkeypatch, capsys):
    checkpoint = stopped_ships(dataset, tmp_path / "run", monkeypatch)
    header, unit = checkpoint.read_text().splitlines()
    checkpoint.write_text(header + "\n" + unit.replace("[[", f"[[{value}, ", 1) + "\n")
    before = checkpoint.read_bytes()
    capsys.readouterr()
    for _ in range(2):  # and again: the refusal changed nothing
        assert main(ships(dataset, tmp_path / "run") + ["--resume"]) == 2
        line = one_error_line(capsys)
        assert "line 2 of" in line and "remove that line" in line, line
        assert checkpoint.read_bytes() == before


@pytest.mark.parametrize("content", [b"", b'{"config": {"mod', b'{"config"'])
def test_an_empty_or_torn_header_checkpoint_resumes_to_the_uninterrupted_result(content, dataset, tmp_path, capsys):
    assert main(ships(dataset, tmp_path / "reference")) == 0
    out = tmp_path / "torn"
    out.mkdir()
    (out / "ships.checkpoint.jsonl").write_bytes(content)  # a kill or a full disk between the open and the write
    assert main(ships(dataset, out) + ["--resume"]) == 0
    first, second = (json.loads((folder / "ships.json").read_text()) for folder in (tmp_path / "reference", out))
    assert first["queries"] == second["queries"] and first["aggregate"] == second["aggregate"]


def test_the_header_is_written_atomically(tmp_path, monkeypatch):
    import safety_heads.runs.folder as folder

    def full_disk(path, write):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(folder, "atomic_write", full_disk)
    with pytest.raises(OSError):
        Checkpoint(tmp_path / "x.checkpoint.jsonl", {"a": 1}).start(resume=False)
    assert list(tmp_path.iterdir()) == []  # no checkpoint at all, rather than a torn one


@pytest.mark.parametrize("lines, where", [
    ([b'{"config": {"a": 1}}', b'{"unit": NaN}', b'{"unit": 2}'], "line 2"),
    ([b'{"config": {"a": 1}}', b"garbage", b'{"unit": 2}'], "line 2"),  # mid-file: not a torn line, never dropped
    ([b'["not", "a", "header"]', b'{"unit": 1}'], "line 1"),
    ([b'{"config": {"a": Infinity}}'], "line 1"),
])
def test_an_unreadable_whole_line_is_refused_and_nothing_is_written(lines, where, tmp_path):
    path = tmp_path / "x.checkpoint.jsonl"
    path.write_bytes(b"\n".join(lines) + b"\n" + b'{"unit": 3, "to')
    before = path.read_bytes()
    with pytest.raises(UserError, match=where):
        Checkpoint(path, {"a": 1}).start(resume=True)
    assert path.read_bytes() == before


def test_a_torn_last_line_is_cut_only_when_the_next_line_is_written(tmp_path):
    path = tmp_path / "x.checkpoint.jsonl"
    path.write_bytes(b'{"config": {"a": 1}}\n{"unit": 1}\n{"unit": 2, "to')
    checkpoint = Checkpoint(path, {"a": 1})
    assert checkpoint.start(resume=True) == [{"unit": 1}]
    assert path.read_bytes().endswith(b'"to')  # a refused resume would have left it as it was
    checkpoint.append({"unit": 2})
    assert path.read_bytes() == b'{"config": {"a": 1}}\n{"unit": 1}\n{"unit": 2}\n'


# -- export never writes into the run it reads ---------------------------------------------------------------------


@pytest.fixture
def finished_ships(dataset, tmp_path):
    out = tmp_path / "r"
    assert main(ships(dataset, out)) == 0
    return out


@pytest.mark.parametrize("target", [".", "seed", "../r"])
def test_export_into_the_run_it_reads_is_refused(target, finished_ships, capsys):
    before = snapshot(finished_ships)
    capsys.readouterr()
    assert main(["export", str(finished_ships), "--out", str(finished_ships / target)]) == 2
    assert "overlaps the run folder" in one_error_line(capsys)
    assert snapshot(finished_ships) == before


def test_export_into_a_folder_holding_files_is_refused(finished_ships, tmp_path, capsys):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "ships_data.pt").write_text("mine\n")
    capsys.readouterr()
    assert main(["export", str(finished_ships), "--out", str(tmp_path / "mine")]) == 2
    assert "is not empty" in one_error_line(capsys)
    assert (tmp_path / "mine" / "ships_data.pt").read_text() == "mine\n"
    assert main(["export", str(finished_ships), "--out", str(tmp_path / "seed")]) == 0
