"""The README's Python example runs as written (in a fresh folder, where it writes runs/py-sahara)."""

import re
from pathlib import Path

README = Path(__file__).parents[1] / "README.md"


def test_readme_python_example_runs(tmp_path, monkeypatch, capsys):
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)
    assert len(blocks) == 1, "the README has one Python example"
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(compile(blocks[0], str(README), "exec"), namespace)
    assert (tmp_path / "runs" / "py-sahara" / "sahara.json").is_file()
    assert namespace["saved"].heads == namespace["group"]  # written or not, the same search finds the same group
    assert tuple(namespace["result"].logits.shape[:2]) == (2, 2)
