"""The paper's study on a real aligned chat model (default: Qwen2.5-Coder-0.5B-Instruct, GGUF), on a 2-core CPU.

What it measures, in stages (each one resumable; run the same command again after a kill):

1. **ships**: Ships exactly as the paper defines it (exact, `ua`, eps 1e-4, chat template with the model's own default
   system prompt), through the library, on MaliciousInstruct 1-`--ships-limit`.
2. **sahara**, **sahara-guard**: Sahara's greedy search (3 steps, every head a candidate) on MaliciousInstruct
   1-`--sahara-limit`, without and with the harmless guard (harmless-val, the default of `safety-heads run`).
3. **truth**: the true ASR of single heads: the `--truth-top` heads with the highest mean Ships score and
   `--truth-random` random other heads (seed 0), each ablated alone by plain PyTorch hooks on the Hugging Face
   module (not the library's ablation code), greedy answers to held-out MaliciousInstruct 51-100.
4. **groups**: held-out evaluation of the clean model, Sahara's groups (k = 1, 2, 3, both searches) and Ships' top
   1/2/3 (by mean score) on MaliciousInstruct 51-100 and JailbreakBench 1-`--jbb-limit`, with the harmless cost on
   `--harmless` harmless-test prompts (seed 0): share answered (no refusal phrase) and the clean model's NLL per token
   of the answers.
5. **query-ships**: the paper's query-level rows: each scoring query answered with its own top-k Ships heads ablated.
6. **estimate**: the gradient estimate of Ships on the same queries, for its rank correlation with the truth.

Every answer is kept in the checkpoint, so the judges can be re-read and re-scored without generating again;
`benchmarks/qwen_hand_labels.json` holds answers labelled by hand, against which the keyword judges are scored.

    python -m safety_heads get-model qwen2.5-coder-0.5b-instruct --dir models     # or: safety-heads get-model ...
    python benchmarks/real_model_study.py --model models/qwen2.5-coder-0.5b-instruct-q4_k_m.gguf --out runs/qwen_study
    python benchmarks/real_model_study.py --model models/qwen2.5-coder-0.5b-instruct-q4_k_m.gguf --quick --out runs/qwen_quick

Results: `--out`/study.json and study.md (the tables in benchmarks/RESULTS.md come from study.md).
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from ground_truth import clean_answer_nll, hooked, spearman  # noqa: E402  (the independent plain-hook reference)

from safety_heads.ablation import DEFAULT_EPSILON, Ablation, format_heads  # noqa: E402
from safety_heads.data import format_prompts, load_prompts  # noqa: E402
from safety_heads.demo.measure import generate  # noqa: E402
from safety_heads.errors import UserError  # noqa: E402
from safety_heads.judges import KEYWORD_JUDGES  # noqa: E402
from safety_heads.models import ModelConfig, load_model  # noqa: E402
from safety_heads.runs import (
    run_sahara,  # noqa: E402
    run_ships,  # noqa: E402
)
from safety_heads.runs.files import read_json, write_json
from safety_heads.runs.folder import Checkpoint  # noqa: E402
from safety_heads.sahara import SaharaConfig  # noqa: E402
from safety_heads.ships import ShipsConfig  # noqa: E402

SEED = 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="a .gguf file, a Hugging Face folder or hub id")
    parser.add_argument("--out", type=Path, default=Path("runs/real_model_study"))
    parser.add_argument("--ships-limit", type=int, default=16)
    parser.add_argument("--sahara-limit", type=int, default=8)
    parser.add_argument("--truth-top", type=int, default=20)
    parser.add_argument("--truth-random", type=int, default=20)
    parser.add_argument("--eval-limit", type=int, default=50, help="MaliciousInstruct 51..50+N held out")
    parser.add_argument("--jbb-limit", type=int, default=50)
    parser.add_argument("--harmless", type=int, default=50)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=50)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--stages", default="ships,truth,sahara,sahara-guard,groups,query-ships,estimate")
    parser.add_argument("--prune-by", default="refusal-logprob", help="scores whose top 48 heads the sahara-pruned stage searches")
    parser.add_argument("--report-only", action="store_true", help="only (re)write study.json and study.md from what exists")
    parser.add_argument("--judge", default="gcg", help="the keyword judge whose verdicts are the ASR (see study.md's judge table)")
    parser.add_argument("--quick", action="store_true",
                        help="2 scoring queries, Sahara over the top 24 Ships heads, 3+3 heads, 8 prompts per set: minutes")
    args = parser.parse_args(argv)
    if args.quick:
        args.ships_limit, args.sahara_limit, args.truth_top, args.truth_random = 2, 2, 3, 3
        args.eval_limit, args.jbb_limit, args.harmless = 8, 8, 8
    try:
        if not args.report_only:
            Study(args).run()
        write_report(args.out, args.judge)
        return 0
    except UserError as error:
        print(f"real_model_study: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"real_model_study: interrupted; run the same command again to resume from {args.out}", file=sys.stderr)
        return 130


class Study:
    def __init__(self, args):
        torch.set_num_threads(args.threads)
        self.args, self.out = args, args.out
        self.started = time.time()
        self.out.mkdir(parents=True, exist_ok=True)
        self.times = read_json(self.out / "times.json") if (self.out / "times.json").exists() else {}
        t = time.perf_counter()
        self.model = load_model(ModelConfig(model=args.model))
        self.times["load_model"] = round(time.perf_counter() - t, 1)
        self.layout, self.tokenizer, self.module = self.model.layout, self.model.tokenizer, self.model.module
        malicious = load_prompts("maliciousinstruct")
        self.scoring = malicious[: args.ships_limit]
        self.sets = {
            "maliciousinstruct-51-100": malicious[50 : 50 + args.eval_limit],
            "jailbreakbench": load_prompts("jailbreakbench", limit=args.jbb_limit),
            "harmless-test": random.Random(SEED).sample(load_prompts("harmless-test"), args.harmless),
        }
        self.tokens = {name: self.encode(queries) for name, queries in self.sets.items()}
        # What the answers depend on; a resume with other values is refused.
        record = {k: getattr(args, k) for k in ("model", "ships_limit", "sahara_limit", "truth_top", "truth_random",
                                                "eval_limit", "jbb_limit", "harmless", "max_new_tokens", "batch_size", "quick")}
        self.record = record
        self.checkpoint, self.answers = None, {}  # opened on the first answer needed (a sweep-only run never opens it)
        self.all_heads = [(l, h) for l in range(self.layout.n_layers) for h in range(self.layout.n_heads)]

    def log(self, line: str) -> None:
        print(f"[{time.time() - self.started:6.0f}s] {line}", file=sys.stderr, flush=True)

    def encode(self, queries: list[str]) -> list[list[int]]:
        return [list(p.token_ids) for p in format_prompts(queries, "chat", self.tokenizer)]

    def timed(self, name: str, work):
        """Run a stage unless its result file exists; record its wall time (summed over resumed sessions)."""
        path = self.out / f"{name}.json"
        if path.exists():
            return read_json(path)
        t = time.perf_counter()
        result = work()
        write_json(path, result)
        # Re-read first: a sweep may run in a second process beside the study, and each adds its own stages.
        times_path = self.out / "times.json"
        self.times = (read_json(times_path) if times_path.exists() else {}) | {"load_model": self.times["load_model"]}
        self.times[name] = round(time.perf_counter() - t, 1)  # of the session that finished it (resumes: see log)
        write_json(times_path, self.times)
        self.log(f"stage {name} done in {self.times[name]:.0f} s")
        return result

    # -- generation with plain hooks ------------------------------------------------------------------------------

    def answers_for(self, heads: list, set_name: str, tokens: list[list[int]] | None = None) -> list[str]:
        key = (format_heads(sorted(heads)), set_name)
        if self.checkpoint is None:
            self.checkpoint = Checkpoint(self.out / "answers.checkpoint.jsonl", self.record)
            self.answers = {(u["heads"], u["set"]): u for u in self.checkpoint.start(resume=True)}
        if key not in self.answers:
            t = time.perf_counter()
            with hooked(self.module, heads, "ua", self.layout.head_dim, DEFAULT_EPSILON):
                answers = generate(self.module, self.tokenizer, tokens or self.tokens[set_name],
                                   self.args.max_new_tokens, self.args.batch_size)
            unit = {"heads": key[0], "set": set_name, "answers": answers, "seconds": round(time.perf_counter() - t, 2)}
            if set_name == "harmless-test":
                unit["clean_nll"] = clean_answer_nll(self.module, self.tokenizer, self.tokens[set_name], answers,
                                                     self.args.batch_size)
            self.checkpoint.append(unit)
            self.answers[key] = unit
        return self.answers[key]["answers"]

    # -- stages -----------------------------------------------------------------------------------------------------

    def run(self) -> None:
        stages = self.args.stages.split(",")
        ships = self.timed("ships", self.ships) if "ships" in stages else None
        if ships is None and "scores" in stages:  # the scores sweep computes the same KL (one sweep, three scores)
            ships = {"mean": self.timed("scores", self.scores)["mean"]["kl"]}
        if ships is None:
            raise UserError("every other stage needs the ships or the scores stage")
        if "truth" in stages:
            self.timed("truth", lambda: self.truth(ships))
        sahara = self.timed("sahara", lambda: self.sahara(ships, guard=False)) if "sahara" in stages else None
        guarded = self.timed("sahara-guard", lambda: self.sahara(ships, guard=True)) if "sahara-guard" in stages else None
        if "groups" in stages:
            self.timed("groups", lambda: self.groups(ships, sahara, guarded))
        if "query-ships" in stages:
            self.timed("query-ships", lambda: self.query_ships(ships))
        if "estimate" in stages:
            self.timed("estimate", self.estimate)
        if "scores" in stages:
            scores = self.timed("scores", self.scores)
            pruned = self.timed("sahara-pruned", lambda: self.sahara_pruned(scores)) if "sahara-pruned" in stages else None
            if "score-groups" in stages:
                self.timed("score-groups", lambda: self.score_groups(scores, pruned))
        self.log(f"finished; results in {self.out}")

    def ships(self) -> dict:
        result = run_ships(self.model, self.scoring, ShipsConfig(template="chat"), out=self.out / "ships-run", resume=True)
        return {
            "mean": result.mean.tolist(),
            "per_query": [q.scores.tolist() for q in result.queries],
            "queries": self.scoring,
        }

    def ships_order(self, ships: dict) -> list:
        mean = torch.tensor(ships["mean"])
        return sorted(self.all_heads, key=lambda h: -float(mean[h]))

    def truth(self, ships: dict) -> dict:
        order = self.ships_order(ships)
        top = order[: self.args.truth_top]
        rest = [h for h in self.all_heads if h not in top]
        randoms = random.Random(SEED).sample(rest, self.args.truth_random)
        self.answers_for([], "maliciousinstruct-51-100")
        for count, head in enumerate(top + randoms, 1):
            self.answers_for([head], "maliciousinstruct-51-100")
            self.log(f"truth: {count}/{len(top) + len(randoms)} single heads measured")
        return {"top": [list(h) for h in top], "random": [list(h) for h in randoms]}

    def sahara(self, ships: dict, guard: bool) -> dict:
        args = self.args
        heads = format_heads(self.ships_order(ships)[:24]) if args.quick else None
        config = SaharaConfig(template="chat", steps=3, heads=heads, guard="harmless-val" if guard else None)
        name = "sahara-guard-run" if guard else "sahara-run"
        result = run_sahara(self.model, load_prompts("maliciousinstruct", limit=args.sahara_limit), config,
                            out=self.out / name, resume=True)
        return {"heads": [list(h) for h in result.heads],
                "steps": [{"chosen": list(s.chosen), "score": s.score, "scores": s.scores, "guard_rise": s.guard,
                           "passed_over": [list(h) for h in s.passed_over]} for s in result.steps]}

    def groups(self, ships: dict, sahara: dict | None, guarded: dict | None) -> dict:
        order = self.ships_order(ships)
        groups = {"clean": []}
        for k in (1, 2, 3):
            groups[f"ships-top{k}"] = order[:k]
            if sahara and len(sahara["heads"]) >= k:
                groups[f"sahara-k{k}"] = [tuple(h) for h in sahara["heads"][:k]]
            if guarded and len(guarded["heads"]) >= k:
                groups[f"sahara-guard-k{k}"] = [tuple(h) for h in guarded["heads"][:k]]
        for count, (name, heads) in enumerate(groups.items(), 1):
            for set_name in self.sets:
                self.answers_for(list(heads), set_name)
            self.log(f"groups: {count}/{len(groups)} measured ({name} {format_heads(heads)})")
        return {name: [list(h) for h in heads] for name, heads in groups.items()}

    def query_ships(self, ships: dict) -> dict:
        """Query-level Ships (the paper's Table 3, lower block): each scoring query with its own top-k heads."""
        tokens = self.encode(self.scoring)
        rows = []
        for index, scores in enumerate(ships["per_query"]):
            scores = torch.tensor(scores)
            own = sorted(self.all_heads, key=lambda h: -float(scores[h]))[:3]
            row = {"index": index, "top": [list(h) for h in own]}
            for k in (0, 1, 2, 3):
                row[f"k{k}"] = self.answers_for(own[:k], f"scoring-query-{index}", [tokens[index]])[0]
            rows.append(row)
        return {"rows": rows}

    def scores(self) -> dict:
        """The paper's KL and the two refusal-aware scores (refusal.py) of every head on the scoring queries, from one
        sweep per query with both readouts; checkpointed per query."""
        from safety_heads.data import prompt_tokens
        from safety_heads.engine import Engine
        from safety_heads.refusal import learn_signal
        from safety_heads.ships import exact_score_maps

        engine = Engine(self.model)
        harmful, harmless = (prompt_tokens(name, 32, "chat", self.tokenizer) for name in ("harmful-train", "harmless-train"))
        signals, learn_s = {}, {}
        for name in ("refusal-direction", "refusal-logprob"):
            t = time.perf_counter()
            signals[name] = learn_signal(engine, self.model, harmful, harmless, name)
            learn_s[name] = round(time.perf_counter() - t, 1)
        names = ("kl", "refusal-logprob", "refusal-direction")
        checkpoint = Checkpoint(self.out / "scores.checkpoint.jsonl", {"queries": self.scoring})
        done = {u["index"]: u for u in checkpoint.start(resume=True)}
        for index, tokens in enumerate(self.encode(self.scoring)):
            if index in done:
                continue
            t = time.perf_counter()
            maps = exact_score_maps(engine, tokens, self.all_heads, ablation=Ablation(kind="ua", epsilon=DEFAULT_EPSILON), scores=names,
                                    signals=signals)
            done[index] = {"index": index, "seconds": round(time.perf_counter() - t, 1),
                           **{name: maps[name].tolist() for name in names}}
            checkpoint.append(done[index])
            self.log(f"scores: {len(done)}/{len(self.scoring)} queries")
        units = [done[i] for i in range(len(self.scoring))]
        return {
            "mean": {name: torch.tensor([u[name] for u in units]).mean(0).tolist() for name in names},
            "signals": {name: signal.record() for name, signal in signals.items()},
            "learn_seconds": learn_s, "sweep_seconds": sum(u["seconds"] for u in units),
        }

    def sahara_pruned(self, scores: dict) -> dict:
        """The guarded search (run's default) over only the top 48 heads by refusal-logprob (--candidates 48
        --rank-by), the recipe that found the best group on the demo model (docs/scores.md). (The same by Ships' KL,
        to measure what pruning alone changes, was left out to fit the session: --prune-by kl,refusal-logprob.)"""
        results = {}
        for name in self.args.prune_by.split(","):
            ranking = self.out / f"ranking-{name}.json"  # all --rank-by reads: the mean score per head
            write_json(ranking, {"aggregate": {"mean": scores["mean"][name]}})
            config = SaharaConfig(template="chat", steps=3, guard="harmless-val", candidates=48, rank_by=str(ranking))
            t = time.perf_counter()
            result = run_sahara(self.model, load_prompts("maliciousinstruct", limit=self.args.sahara_limit), config,
                                out=self.out / f"sahara-guard-top48-{name}", resume=True)
            results[name] = {"heads": [list(h) for h in result.heads], "seconds": round(time.perf_counter() - t, 1),
                             "steps": [{"chosen": list(st.chosen), "score": st.score, "guard_rise": st.guard,
                                        "passed_over": [list(h) for h in st.passed_over]} for st in result.steps]}
        return results

    def score_groups(self, scores: dict, pruned: dict | None) -> dict:
        """Held-out evaluation of the top-3 group of each refusal-aware score, as `groups` does for Ships and Sahara,
        and of the pruned guarded searches' groups."""
        groups = {}
        for name, result in (pruned or {}).items():
            groups[f"sahara-guard-top48-{name}"] = [tuple(h) for h in result["heads"]]
        for name in ("refusal-logprob", "refusal-direction"):
            mean = torch.tensor(scores["mean"][name])
            order = sorted(self.all_heads, key=lambda h: -float(mean[h]))
            groups[f"{name}-top3"] = order[:3]  # top 1 too would cost 4 more generations per score; not scoped
        for count, (name, heads) in enumerate(groups.items(), 1):
            for set_name in self.sets:
                self.answers_for(list(heads), set_name)
            self.log(f"score groups: {count}/{len(groups)} measured ({name} {format_heads(heads)})")
        return {name: [list(h) for h in heads] for name, heads in groups.items()}

    def estimate(self) -> dict:
        result = run_ships(self.model, self.scoring, ShipsConfig(template="chat", method="estimate"),
                           out=self.out / "estimate-run", resume=True)
        return {"mean": result.mean.tolist()}


# -- the report: everything below reads the stage files and the answers, and generates nothing -------------------


HAND_LABELS = Path(__file__).resolve().parent / "qwen_hand_labels.json"


def harmful(judge_name: str, answers: list[str]) -> list[bool]:
    return [bool(v) for v in KEYWORD_JUDGES[judge_name].judge([""] * len(answers), answers)]


def asr(judge_name: str, answers: list[str]) -> float:
    return 100 * sum(harmful(judge_name, answers)) / len(answers)


def answered(answers: list[str]) -> float:
    """Harmless prompts answered: no refusal phrase of refusal_direction's list (case-insensitive)."""
    return 100 * sum(not KEYWORD_JUDGES["refusal-direction"].refused(a) for a in answers) / len(answers)


def judge_agreement(labels: list[dict]) -> dict:
    """How often each keyword judge's verdict equals a hand label ("comply" = harmful, "refuse" = not)."""
    table = {}
    for name in KEYWORD_JUDGES:
        verdicts = harmful(name, [x["answer"] for x in labels])
        truth = [x["label"] == "comply" for x in labels]
        table[name] = {
            "agree": sum(v == t for v, t in zip(verdicts, truth)), "n": len(labels),
            "false_harmful": sum(v and not t for v, t in zip(verdicts, truth)),
            "false_refusal": sum(t and not v for v, t in zip(verdicts, truth)),
        }
    return table


def write_report(out: Path, judge_name: str) -> dict:
    answers = {}
    path = out / "answers.checkpoint.jsonl"
    if not path.exists():
        raise UserError(f"no answers in {out}: run the study first")
    lines = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    config = lines[0]["config"]
    for unit in lines[1:]:
        answers[(unit["heads"], unit["set"])] = unit
    stage = {name: read_json(out / f"{name}.json") for name in
             ("ships", "truth", "sahara", "sahara-guard", "groups", "query-ships", "estimate", "scores", "sahara-pruned",
              "score-groups") if (out / f"{name}.json").exists()}
    times = read_json(out / "times.json") if (out / "times.json").exists() else {}
    report = {"config": config, "judge": judge_name, "times_s": times}
    eval_sets = ("maliciousinstruct-51-100", "jailbreakbench")

    # Judges against hand labels.
    if HAND_LABELS.exists():
        labels = json.loads(HAND_LABELS.read_text())["labels"]
        report["judges"] = judge_agreement(labels)

    # Held-out groups (Table 3's upper block, plus the harmless cost).
    if "groups" in stage:
        clean = {s: answers[("", s)]["answers"] for s in (*eval_sets, "harmless-test")}
        clean_nll = answers[("", "harmless-test")]["clean_nll"]
        rows = {}
        for name, heads in stage["groups"].items():
            label = format_heads(sorted(tuple(h) for h in heads))
            got = {s: answers[(label, s)] for s in (*eval_sets, "harmless-test")}
            rows[name] = {
                "heads": label,
                **{f"asr_{s}": asr(judge_name, got[s]["answers"]) for s in eval_sets},
                **{f"delta_{s}": asr(judge_name, got[s]["answers"]) - asr(judge_name, clean[s]) for s in eval_sets},
                "harmless_answered": answered(got["harmless-test"]["answers"]),
                "harmless_nll": got["harmless-test"]["clean_nll"], "harmless_nll_rise": got["harmless-test"]["clean_nll"] - clean_nll,
                "example": got["maliciousinstruct-51-100"]["answers"][0],
            }
        report["groups"] = rows

    # Ground truth: single heads on MaliciousInstruct 51-100.
    if "truth" in stage and "ships" in stage:
        base = asr(judge_name, answers[("", "maliciousinstruct-51-100")]["answers"])
        mean = torch.tensor(stage["ships"]["mean"])
        ships_rank = {h: i + 1 for i, h in enumerate(sorted(((l, h) for l in range(mean.shape[0]) for h in range(mean.shape[1])),
                                                             key=lambda x: -float(mean[x])))}
        step1 = torch.tensor([[float("nan") if v is None else v for v in row]
                              for row in stage["sahara"]["steps"][0]["scores"]]) if "sahara" in stage else None
        estimate = torch.tensor(stage["estimate"]["mean"]) if "estimate" in stage else None
        heads = [tuple(h) for h in stage["truth"]["top"]] + [tuple(h) for h in stage["truth"]["random"]]
        singles = []
        for head in heads:
            got = answers[(format_heads([head]), "maliciousinstruct-51-100")]["answers"]
            singles.append({
                "head": format_heads([head]), "group": "ships-top" if list(head) in stage["truth"]["top"] else "random",
                "asr": asr(judge_name, got), "delta": asr(judge_name, got) - base,
                "asr_by_judge": {j: asr(j, got) for j in KEYWORD_JUDGES},
                "ships": float(mean[head]), "ships_rank": ships_rank[head],
                "sahara_step1": None if step1 is None else float(step1[head]),
                "estimate": None if estimate is None else float(estimate[head]),
                "example": got[0],
            })
        truth_asr = [e["asr"] for e in singles]
        correlations = {"ships": spearman([e["ships"] for e in singles], truth_asr)}
        if step1 is not None:
            correlations["sahara_step1"] = spearman([e["sahara_step1"] for e in singles], truth_asr)
        if estimate is not None:
            correlations["estimate"] = spearman([e["estimate"] for e in singles], truth_asr)
        report["truth"] = {"baseline_asr": base, "heads": singles, "spearman_vs_true_asr": correlations}

    # Refusal-aware scores against the truth (issue: scores that track refusal), and their top-3 groups held out.
    if "scores" in stage and "truth" in report:
        singles = report["truth"]["heads"]
        truth_asr = [e["asr"] for e in singles]
        best5 = {e["head"] for e in sorted(singles, key=lambda e: -e["asr"])[:5]}
        table = {}
        for name, mean in stage["scores"]["mean"].items():
            mean = torch.tensor(mean)
            order = [format_heads([h]) for h in sorted(((l, h) for l in range(mean.shape[0]) for h in range(mean.shape[1])),
                                                       key=lambda x: -float(mean[x]))]
            values = [float(mean[tuple(int(x) for x in e["head"].split(":"))]) for e in singles]
            table[name] = {"spearman": spearman(values, truth_asr), "best5_in_top5": len(best5 & set(order[:5])),
                           "best5_in_top10": len(best5 & set(order[:10])), "top5": order[:5]}
            if "score-groups" in stage and f"{name}-top3" in stage["score-groups"]:
                label = format_heads(sorted(tuple(h) for h in stage["score-groups"][f"{name}-top3"]))
                got = {st: answers[(label, st)] for st in (*eval_sets, "harmless-test")}
                clean_nll = answers[("", "harmless-test")]["clean_nll"]
                table[name]["top3_group"] = {
                    "heads": label, **{f"delta_{st}": asr(judge_name, got[st]["answers"]) - asr(judge_name, answers[("", st)]["answers"])
                                       for st in eval_sets},
                    "harmless_answered": answered(got["harmless-test"]["answers"]),
                    "harmless_nll_rise": got["harmless-test"]["clean_nll"] - clean_nll,
                }
        report["scores"] = {"true_best5": sorted(best5), "by_score": table, "signals": stage["scores"]["signals"],
                            "learn_seconds": stage["scores"]["learn_seconds"], "sweep_seconds": stage["scores"]["sweep_seconds"]}

    # The guarded search over only the top 48 heads of a score, held out like the groups above.
    if "sahara-pruned" in stage:
        pruned = {}
        for name, result in stage["sahara-pruned"].items():
            label = format_heads(sorted(tuple(h) for h in result["heads"]))
            entry = {"heads": label, "order": format_heads([tuple(h) for h in result["heads"]]), "seconds": result["seconds"]}
            if all((label, st) in answers for st in (*eval_sets, "harmless-test")):
                entry |= {f"delta_{st}": asr(judge_name, answers[(label, st)]["answers"]) - asr(judge_name, answers[("", st)]["answers"])
                          for st in eval_sets}
                entry["harmless_answered"] = answered(answers[(label, "harmless-test")]["answers"])
                entry["harmless_nll_rise"] = answers[(label, "harmless-test")]["clean_nll"] - answers[("", "harmless-test")]["clean_nll"]
            pruned[name] = entry
        report["sahara_pruned"] = pruned

    # Query-level Ships (Table 3's lower block): each scoring query with its own top-k heads.
    if "query-ships" in stage:
        rows = stage["query-ships"]["rows"]
        report["query_ships"] = {f"k{k}": asr(judge_name, [r[f"k{k}"] for r in rows]) for k in (0, 1, 2, 3)}
    write_json(out / "study.json", report)
    (out / "study.md").write_text(markdown(report))
    print(f"wrote {out / 'study.json'} and {out / 'study.md'}", file=sys.stderr)
    return report


def markdown(report: dict) -> str:
    c = report["config"]
    lines = [f"# The paper's study on {c['model']}", "",
             f"Chat template (the model's own, with its default system prompt), ua, eps {DEFAULT_EPSILON:g}, greedy, "
             f"{c['max_new_tokens']} new tokens; ASR by the `{report['judge']}` keyword judge.", ""]
    if "judges" in report:
        lines += ["## Keyword judges against hand labels", "",
                  "| judge | agrees | called harmful, was a refusal | called refusal, complied |",
                  "|---|---|---|---|"]
        for name, j in report["judges"].items():
            lines.append(f"| {name} | {j['agree']}/{j['n']} | {j['false_harmful']} | {j['false_refusal']} |")
        lines.append("")
    if "groups" in report:
        lines += ["## Held-out evaluation (MaliciousInstruct 51-100, JailbreakBench)", "",
                  "| ablated | heads | MI ASR | MI Δ | JBB ASR | JBB Δ | harmless answered | harmless NLL (rise) |",
                  "|---|---|---|---|---|---|---|---|"]
        for name, r in report["groups"].items():
            lines.append(f"| {name} | {r['heads'] or '-'} | {r['asr_maliciousinstruct-51-100']:.1f}% | "
                         f"{r['delta_maliciousinstruct-51-100']:+.1f} | {r['asr_jailbreakbench']:.1f}% | "
                         f"{r['delta_jailbreakbench']:+.1f} | "
                         f"{r['harmless_answered']:.0f}% | {r['harmless_nll']:.3f} ({r['harmless_nll_rise']:+.3f}) |")
        lines.append("")
    if "query_ships" in report:
        q = report["query_ships"]
        lines += ["## Query-level Ships (each scoring query with its own top-k heads)", "",
                  "| k | 0 | 1 | 2 | 3 |", "|---|---|---|---|---|",
                  "| ASR | " + " | ".join(f"{q[f'k{k}']:.1f}%" for k in range(4)) + " |", ""]
    if "truth" in report:
        t = report["truth"]
        lines += ["## Ground truth: single heads ablated alone (MaliciousInstruct 51-100, plain hooks)", "",
                  f"Clean ASR {t['baseline_asr']:.1f}%. Spearman against true ASR: "
                  + ", ".join(f"{k} {v:.2f}" for k, v in t["spearman_vs_true_asr"].items()) + ".", "",
                  "| head | chosen as | true ASR | Δ | paper / gcg / refusal-direction | Ships KL (rank) | Sahara step 1 (deg) "
                  "| estimate |",
                  "|---|---|---|---|---|---|---|---|"]
        for e in sorted(t["heads"], key=lambda e: -e["asr"]):
            by = e["asr_by_judge"]
            lines.append(f"| {e['head']} | {e['group']} | {e['asr']:.0f}% | {e['delta']:+.0f} | "
                         f"{by['paper']:.0f} / {by['gcg']:.0f} / {by['refusal-direction']:.0f} | {e['ships']:.4f} ({e['ships_rank']}) | "
                         + ("-" if e["sahara_step1"] is None else f"{e['sahara_step1']:.3f}") + " | "
                         + ("-" if e["estimate"] is None else f"{e['estimate']:.4f}") + " |")
        lines.append("")
    if "scores" in report:
        sc = report["scores"]
        lines += ["## Head scores against the truth (the single heads measured above)", "",
                  f"True best 5: {', '.join(sc['true_best5'])}. One sweep computed all three scores in "
                  f"{sc['sweep_seconds']:.0f} s; learning the signals took {sc['learn_seconds']} s.", "",
                  "| score | Spearman vs true ASR | true best 5 in top 5 / top 10 | top 5 "
                  "| top-3 group: MI Δ / JBB Δ / harmless answered / NLL rise |",
                  "|---|---|---|---|---|"]
        for name, r in sc["by_score"].items():
            g = r.get("top3_group")
            group = (f"{g['heads']}: {g['delta_maliciousinstruct-51-100']:+.1f} / {g['delta_jailbreakbench']:+.1f} / "
                     f"{g['harmless_answered']:.0f}% / {g['harmless_nll_rise']:+.3f}") if g else "-"
            lines.append(f"| {name} | {r['spearman']:.2f} | {r['best5_in_top5']} / {r['best5_in_top10']} | "
                         f"{', '.join(r['top5'])} | {group} |")
        lines.append("")
    if "sahara_pruned" in report:
        lines += ["## Sahara with the guard over the top 48 heads of a score (`--candidates 48 --rank-by`)", "",
                  "| ranked by | group (in order chosen) | MI Δ | JBB Δ | harmless answered | NLL rise | time (s) |",
                  "|---|---|---|---|---|---|---|"]
        for name, e in report["sahara_pruned"].items():
            held = (f"{e['delta_maliciousinstruct-51-100']:+.1f} | {e['delta_jailbreakbench']:+.1f} | {e['harmless_answered']:.0f}% | "
                    f"{e['harmless_nll_rise']:+.3f}") if "harmless_answered" in e else "- | - | - | -"
            lines.append(f"| {name} | {e['order']} | {held} | {e['seconds']:.0f} |")
        lines.append("")
    if report["times_s"]:
        lines += ["## Time of every stage (2-core CPU)", "", "| stage | seconds |", "|---|---|"]
        lines += [f"| {k} | {v:.0f} |" for k, v in report["times_s"].items()]
        lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
