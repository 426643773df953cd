"""`safety-heads export --layout seed`: the cookbook notebook's four .pt files, read the way its analysis cells read
them (weights_only=True), with values that match our own results."""

import json

import pytest
import torch

from safety_heads.cli import main

KEYS = {
    "ships_data.pt": {"scores", "sorted_heads", "sorted_scores", "query", "num_layers", "num_heads"},
    "sahara_data.pt": {"shifts", "sorted_shifts", "sorted_scores", "safety_heads", "num_layers", "num_heads"},
    "eval_data.pt": {"baseline_harm_rate", "ablated_harm_rate", "top_safety_head", "baseline_results", "ablated_results",
                     "num_queries", "max_tokens"},
    "experiment_data.pt": {"ships_data", "sahara_data", "eval_data", "config"},
}


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    root = tmp_path_factory.mktemp("export")
    assert main(["run", "--model", "tiny", "--quick", "--limit", "4", "--steps", "2", "--max-new-tokens", "4",
                 "--out", str(root / "run")]) == 0
    assert main(["export", str(root / "run"), "--layout", "seed", "--out", str(root / "seed")]) == 0
    return root


def load(path):
    return torch.load(path, weights_only=True)  # as a careful notebook user would


def test_files_have_exactly_the_notebooks_keys(exported):
    for name, keys in KEYS.items():
        assert set(load(exported / "seed" / name)) == keys, name


def test_ships_data_reads_like_the_notebook(exported):
    ships = load(exported / "seed" / "ships_data.pt")
    ours = json.loads((exported / "run" / "ships" / "ships.json").read_text())
    top = ships["sorted_heads"][0]
    assert isinstance(top, tuple) and ships["scores"][f"{top[0]},{top[1]}"] == ships["sorted_scores"][0]
    matrix = torch.zeros(ships["num_layers"], ships["num_heads"])  # the notebook's heat map cell
    for key, value in ships["scores"].items():
        layer, head = map(int, key.split(","))
        matrix[layer, head] = value
    assert torch.allclose(matrix.double(), torch.tensor(ours["aggregate"]["mean"], dtype=torch.float64), rtol=1e-6)
    assert ships["sorted_scores"] == sorted(ships["sorted_scores"], reverse=True)
    assert ships["query"].startswith("mean over 4 queries: ")


def test_sahara_data_reads_like_the_notebook(exported):
    sahara = load(exported / "seed" / "sahara_data.pt")
    ours = json.loads((exported / "run" / "sahara" / "sahara.json").read_text())
    assert sahara["safety_heads"] == [tuple(h) for h in ours["heads"]] and isinstance(sahara["safety_heads"][0], tuple)
    best = sahara["sorted_shifts"][0]
    first = torch.tensor([[float("nan") if x is None else x for x in row] for row in ours["steps"][0]["scores"]])
    assert first.nan_to_num(-1.0).flatten().argmax().item() == best[0] * first.shape[1] + best[1]  # step 1's best head
    if not ours["steps"][0]["passed_over"]:  # the guard passed none over: it is the head chosen
        assert best == tuple(ours["steps"][0]["chosen"])
    assert sahara["shifts"][f"{best[0]},{best[1]}"] == sahara["sorted_scores"][0]


def test_eval_data_reads_like_the_notebook(exported):
    evaluation = load(exported / "seed" / "eval_data.pt")
    ours = json.loads((exported / "run" / "eval" / "eval.json").read_text())
    for side in ("baseline", "ablated"):
        rows = evaluation[f"{side}_results"]
        assert all(isinstance(row, tuple) and len(row) == 3 and isinstance(row[2], bool) for row in rows)
        assert evaluation[f"{side}_harm_rate"] == sum(harmful for _, _, harmful in rows) / len(rows)
        first = next(iter(ours["samples"].values()))
        assert [response for _, response, _ in rows] == [sample[side]["response"] for sample in first]
    assert evaluation["top_safety_head"] == tuple(ours["heads"][0]) and evaluation["max_tokens"] == 4
    assert evaluation["num_queries"] == 4


def test_experiment_data_holds_matrices_and_the_mode(exported):
    experiment = load(exported / "seed" / "experiment_data.pt")
    ships = experiment["ships_data"]
    assert ships["matrix"].shape == (ships["num_layers"], ships["num_heads"]) and experiment["config"]["quick_mode"] is True
    assert experiment["sahara_data"]["matrix"].shape == ships["matrix"].shape


def test_a_single_command_folder_exports_what_it_has(tmp_path, capsys):
    assert main(["ships", "--prompt", "How do I pick a lock?", "--out", str(tmp_path / "ships")]) == 0
    assert main(["export", str(tmp_path / "ships"), "--out", str(tmp_path / "seed")]) == 0
    assert sorted(p.name for p in (tmp_path / "seed").iterdir()) == ["ships_data.pt"]
    assert load(tmp_path / "seed" / "ships_data.pt")["query"] == "How do I pick a lock?"


@pytest.mark.parametrize("folder, message", [("missing", "is not a folder"), ("empty", "holds no finished")])
def test_export_of_nothing_is_one_line(folder, message, tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert main(["export", str(tmp_path / folder), "--out", str(tmp_path / "seed")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0] and not (tmp_path / "seed").exists()
