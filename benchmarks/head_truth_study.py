"""Which heads does a real model refuse with? Ground truth by generation against every score, and the group table.

Issue 22's study (docs/real-model-study.md, "Refusal-targeted search"), resumable stage by stage; every answer is kept
in answers.checkpoint.jsonl, so judges can be re-read without generating again.

1. **scores**: kl, refusal-logprob and refusal-direction of every head, mean over the scoring queries
   (MaliciousInstruct 1-16), from one sweep per query (`real_model_study.py --stages scores` writes them; read from
   `--scores`), and Sahara's first step (the paper's angle, every head a candidate, MaliciousInstruct 1-8).
2. **truth-set**: fixed before anything is measured and written first: the top `--top` heads of each of the four
   scores, plus `--random` heads drawn from the rest with seed 0.
3. **truth**: every head of the set ablated alone by plain PyTorch hooks (benchmarks/fast_truth.py, the independent
   reference, with the exact early stop for the judge), greedy 32 tokens, chat template, on MaliciousInstruct 51-100
   and JailbreakBench 1-50: true ASR by the `gcg` judge.
4. **refusal-search**: the refusal-objective greedy search (`sahara --objective refusal-logprob`, guarded by
   harmless-val, over the top `--candidates` heads by refusal-logprob), MaliciousInstruct 1-16.
5. **groups**: k = 1, 2, 3 of the paper's Sahara, Ships-KL top k, refusal-logprob top k, the refusal search, and the
   best group the truth suggests (the k truly best single heads, measured together): ASR on both held-out sets, and
   on 50 harmless-test prompts (seed 0) the share answered and the clean model's NLL of the answers.

    python benchmarks/real_model_study.py --model models/qwen2.5-coder-0.5b-instruct-q4_k_m.gguf --out runs/qwen22 --stages scores
    python benchmarks/head_truth_study.py --model models/qwen2.5-coder-0.5b-instruct-q4_k_m.gguf \\
        --scores runs/qwen22/scores.json --out runs/qwen_truth

Writes `--out`/truth_study.json and truth_study.md.
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from fast_truth import truth_answers  # noqa: E402  (the independent plain-hook reference, fast)
from ground_truth import clean_answer_nll, spearman  # noqa: E402

from safety_heads.ablation import format_heads  # noqa: E402
from safety_heads.data import format_prompts, load_prompts  # noqa: E402
from safety_heads.judges import KEYWORD_JUDGES  # noqa: E402
from safety_heads.models import ModelConfig, load_model  # noqa: E402
from safety_heads.runs import run_sahara  # noqa: E402
from safety_heads.runs.files import matrix_or_nan, read_json, write_json  # noqa: E402
from safety_heads.runs.folder import Checkpoint  # noqa: E402
from safety_heads.sahara import SaharaConfig  # noqa: E402

SEED = 0
JUDGE = "gcg"  # agrees with 80/80 hand labels on this model (docs/real-model-study.md)
HARMFUL_SETS = ("maliciousinstruct-51-100", "jailbreakbench-1-50")
SCORES = ("kl", "refusal-logprob", "refusal-direction", "sahara-step1")
# The paper's Sahara on this model, every head a candidate, 3 steps, MaliciousInstruct 1-8 (measured 2026-12-01 by
# real_model_study.py and reproduced on 2026-12-02 by bench_sahara_pruning.py); this study checks its first step.
PAPER_SAHARA = {"qwen2.5-coder-0.5b-instruct-q4_k_m.gguf": [(1, 4), (2, 9), (10, 12)]}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--scores", type=Path, required=True, help="real_model_study.py's scores.json (the three means)")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--top", type=int, default=15)
    parser.add_argument("--random", type=int, default=60)
    parser.add_argument("--candidates", type=int, default=24)
    parser.add_argument("--sahara-steps", type=int, default=1,
                        help="steps of the paper's search run here (1: its group comes from PAPER_SAHARA, measured before)")
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=50)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--stages", default="sahara-step1,truth-set,truth,refusal-search,groups")
    parser.add_argument("--report-only", action="store_true")
    parser.add_argument("--shard", default="1/1", help="K/N: the truth stage measures every N-th head from the K-th "
                        "(a second process, another --out holding a copy of truth-set.json)")
    parser.add_argument("--merge", type=Path, action="append", default=[],
                        help="another shard's --out: its answers are read too (never written)")
    args = parser.parse_args(argv)
    study = Study(args)
    if not args.report_only:
        study.run()
    study.report()
    return 0


class Study:
    def __init__(self, args):
        torch.set_num_threads(args.threads)
        self.args, self.out = args, args.out
        self.out.mkdir(parents=True, exist_ok=True)
        self.started = time.time()
        self.model = load_model(ModelConfig(model=args.model))
        self.module, self.tokenizer, self.layout = self.model.module, self.model.tokenizer, self.model.layout
        self.all_heads = [(l, h) for l in range(self.layout.n_layers) for h in range(self.layout.n_heads)]
        malicious = load_prompts("maliciousinstruct")
        self.sets = {
            "maliciousinstruct-51-100": malicious[50:100],
            "jailbreakbench-1-50": load_prompts("jailbreakbench", limit=50),
            "harmless-test-50": random.Random(SEED).sample(load_prompts("harmless-test"), 50),
        }
        self.tokens = {name: [list(p.token_ids) for p in format_prompts(queries, "chat", self.tokenizer)]
                       for name, queries in self.sets.items()}
        self.record = {"model": Path(args.model).name, "max_new_tokens": args.max_new_tokens, "judge": JUDGE,
                       "batch_size": args.batch_size}
        self.checkpoint = Checkpoint(self.out / "answers.checkpoint.jsonl", self.record)
        self.answers = {(u["heads"], u["set"]): u for u in self.checkpoint.start(resume=True)}
        for other in args.merge:
            units = Checkpoint(other / "answers.checkpoint.jsonl", self.record).start(resume=True)
            self.answers |= {(u["heads"], u["set"]): u for u in units if (u["heads"], u["set"]) not in self.answers}

    def log(self, line: str) -> None:
        print(f"[{time.time() - self.started:6.0f}s] {line}", file=sys.stderr, flush=True)

    def stage(self, name: str, work):
        path = self.out / f"{name}.json"
        if path.exists():
            return read_json(path)
        t = time.perf_counter()
        result = work()
        result["seconds"] = round(time.perf_counter() - t, 1)
        write_json(path, result)
        self.log(f"stage {name} done in {result['seconds']:.0f} s")
        return result

    # -- answers ------------------------------------------------------------------------------------------------

    def measure(self, head_sets: list[list], set_name: str) -> None:
        """Answers of every head set not yet measured on one set; harmful sets stop early once the judge has seen a
        refusal phrase (exact for its verdict), harmless ones run whole (their NLL is needed)."""
        todo = [sorted(heads) for heads in head_sets if (format_heads(sorted(heads)), set_name) not in self.answers]
        todo = [heads for i, heads in enumerate(todo) if heads not in todo[:i]]
        harmless = set_name.startswith("harmless")
        per_call = max(1, 256 // self.args.batch_size)  # head sets decoded together (fast_truth's decode_rows)
        for start in range(0, len(todo), per_call):
            chunk = todo[start : start + per_call]
            t = time.perf_counter()
            found = truth_answers(self.module, self.tokenizer, chunk, self.tokens[set_name], self.args.max_new_tokens,
                                  None if harmless else (JUDGE,), self.args.batch_size)
            seconds = round((time.perf_counter() - t) / len(chunk), 2)  # the call's time, shared out
            for heads, answers in zip(chunk, found):
                unit = {"heads": format_heads(heads), "set": set_name, "answers": [a.text for a in answers],
                        "stopped": [a.stopped for a in answers], "seconds": seconds}
                if harmless:
                    unit["clean_nll"] = clean_answer_nll(self.module, self.tokenizer, self.tokens[set_name],
                                                         unit["answers"], self.args.batch_size)
                self.checkpoint.append(unit)
                self.answers[(unit["heads"], set_name)] = unit

    def asr(self, heads, set_name: str) -> float:
        answers = self.answers[(format_heads(sorted(heads)), set_name)]["answers"]
        return 100 * sum(KEYWORD_JUDGES[JUDGE].judge([""] * len(answers), answers)) / len(answers)

    def pooled_asr(self, heads) -> float:
        return sum(self.asr(heads, s) for s in HARMFUL_SETS) / len(HARMFUL_SETS)  # both sets hold 50 prompts

    # -- stages -------------------------------------------------------------------------------------------------

    def run(self) -> None:
        stages = self.args.stages.split(",")
        if "sahara-step1" in stages:
            self.stage("sahara-step1", self.sahara_step1)
        if "truth-set" in stages:
            self.stage("truth-set", self.truth_set)
        if "truth" in stages:
            self.stage("truth", self.truth)
        if "refusal-search" in stages:
            self.stage("refusal-search", self.refusal_search)
        if "groups" in stages:
            self.stage("groups", self.groups)
        self.log(f"finished; results in {self.out}")

    def score_maps(self) -> dict[str, torch.Tensor]:
        scores = read_json(self.args.scores)["mean"]
        maps = {name: torch.tensor(scores[name], dtype=torch.float64) for name in SCORES[:3]}
        step1 = read_json(self.out / "sahara-step1.json")["scores"]
        maps["sahara-step1"] = torch.tensor([[float("nan") if v is None else v for v in row] for row in step1], dtype=torch.float64)
        return maps

    def order(self, values: torch.Tensor) -> list:
        key = torch.nan_to_num(values, nan=-float("inf"))
        return sorted(self.all_heads, key=lambda h: -float(key[h]))

    def sahara_step1(self) -> dict:
        config = SaharaConfig(template="chat", steps=self.args.sahara_steps)
        result = run_sahara(self.model, load_prompts("maliciousinstruct", limit=8), config,
                            out=self.out / "sahara-step1-run", resume=True)
        return {"chosen": list(result.heads[0]), "heads": [list(h) for h in result.heads],
                "scores": result.steps[0].scores.tolist()}

    def truth_set(self) -> dict:
        maps = self.score_maps()
        tops = {name: [list(h) for h in self.order(values)[: self.args.top]] for name, values in maps.items()}
        chosen = {tuple(h) for heads in tops.values() for h in heads}
        rest = [h for h in self.all_heads if h not in chosen]
        randoms = random.Random(SEED).sample(rest, min(self.args.random, len(rest)))
        return {"tops": tops, "random": [list(h) for h in randoms], "n": len(chosen) + len(randoms)}

    def truth(self) -> dict:
        fixed = read_json(self.out / "truth-set.json")
        # Measured rank by rank, each score's next head and then four random ones: a study stopped early still holds
        # every score's best heads and an unbiased share of the random ones.
        tops, randoms = [[tuple(h) for h in hs] for hs in fixed["tops"].values()], [tuple(h) for h in fixed["random"]]
        heads = []
        for rank in range(max(map(len, tops))):
            heads += [top[rank] for top in tops if rank < len(top)] + randoms[4 * rank : 4 * rank + 4]
        heads += randoms[4 * max(map(len, tops)):]
        heads = list(dict.fromkeys(heads))
        shard, shards = (int(x) for x in self.args.shard.split("/"))
        heads = heads[shard - 1 :: shards]
        for set_name in HARMFUL_SETS:
            self.measure([[]], set_name)
        step = 10  # heads per round: each round is checkpointed as it goes
        for start in range(0, len(heads), step):
            chunk = [[head] for head in heads[start : start + step]]
            for set_name in HARMFUL_SETS:
                self.measure(chunk, set_name)
            self.log(f"truth: {min(start + step, len(heads))}/{len(heads)} heads ("
                     + ", ".join(f"{format_heads(h)} {self.pooled_asr(h):.0f}%" for h in chunk) + ")")
        return {"heads": [list(h) for h in heads]}

    def refusal_search(self) -> dict:
        ranking = self.out / "ranking-refusal-logprob.json"  # kept beside the run, and named in its record
        mean = read_json(self.args.scores)["mean"]["refusal-logprob"]
        write_json(ranking, {"aggregate": {"mean": mean}})
        config = SaharaConfig(template="chat", steps=3, objective="refusal-logprob", guard="harmless-val",
                              candidates=self.args.candidates, rank_by=str(ranking), guard_batch=1, sets_per_call=16)
        result = run_sahara(self.model, load_prompts("maliciousinstruct", limit=16), config, ranking=matrix_or_nan(mean),
                            out=self.out / "refusal-search-run", resume=True)
        return {"heads": [list(h) for h in result.heads], "scores": [s.score for s in result.steps],
                "passed_over": [[list(h) for h in s.passed_over] for s in result.steps]}

    def group_list(self) -> dict[str, list]:
        maps = self.score_maps()
        best = [tuple(int(x) for x in row["head"].split(":")) for row in self.truth_table()["heads"]]  # truly best first
        search = [tuple(h) for h in read_json(self.out / "refusal-search.json")["heads"]]
        step1 = read_json(self.out / "sahara-step1.json")
        searched = [tuple(h) for h in step1.get("heads", [step1["chosen"]])]
        paper = searched if len(searched) > 1 else PAPER_SAHARA.get(Path(self.args.model).name, searched)
        methods = {"paper-sahara": paper, "ships-kl": self.order(maps["kl"]), "refusal-logprob": self.order(maps["refusal-logprob"]),
                   "refusal-search": search, "truth-best": best}
        groups = {"clean": []}
        for name, heads in methods.items():
            for k in (1, 2, 3):
                if len(heads) >= k:
                    groups[f"{name}-k{k}"] = list(heads[:k])
        return groups

    def groups(self) -> dict:
        groups = self.group_list()
        for set_name in self.sets:
            self.measure(list(groups.values()), set_name)
            self.log(f"groups: {len(groups)} measured on {set_name}")
        return {name: [list(h) for h in heads] for name, heads in groups.items()}

    # -- report ---------------------------------------------------------------------------------------------------

    def report(self) -> None:
        result = {"config": self.record, "judge": JUDGE}
        if (self.out / "truth-set.json").exists() and ("", HARMFUL_SETS[1]) in self.answers:
            result["truth"] = self.truth_table()  # the heads measured so far, while the stage runs
        if (self.out / "groups.json").exists():
            result["groups"] = self.group_table()
        result["stage_seconds"] = {name: read_json(self.out / f"{name}.json").get("seconds")
                                   for name in ("sahara-step1", "truth-set", "truth", "refusal-search", "groups")
                                   if (self.out / f"{name}.json").exists()}
        result["generation_seconds"] = round(sum(u["seconds"] for u in self.answers.values()), 1)
        write_json(self.out / "truth_study.json", result)
        (self.out / "truth_study.md").write_text(markdown(result))
        self.log(f"wrote {self.out / 'truth_study.json'} and truth_study.md")

    def truth_table(self) -> dict:
        maps = self.score_maps()
        fixed = read_json(self.out / "truth-set.json")
        randoms = [tuple(h) for h in fixed["random"]]
        chosen = [tuple(h) for hs in fixed["tops"].values() for h in hs] + randoms
        heads = [h for h in dict.fromkeys(chosen)  # every head of the set measured on both sets (all shards, so far)
                 if all((format_heads([h]), s) in self.answers for s in HARMFUL_SETS)]
        clean = {s: self.asr([], s) for s in HARMFUL_SETS}
        rows = []
        for head in heads:
            rows.append({"head": format_heads([head]), "asr": self.pooled_asr([head]),
                         "by_set": {s: self.asr([head], s) for s in HARMFUL_SETS},
                         "chosen_by": [name for name, top in fixed["tops"].items() if list(head) in top]
                                      + (["random"] if head in randoms else []),
                         "scores": {name: float(maps[name][head]) for name in SCORES}})
        truth = {r["head"]: r["asr"] for r in rows}
        ordered = sorted(rows, key=lambda r: (-r["asr"], r["head"]))
        by_score = {}
        for name in SCORES:
            order = [format_heads([h]) for h in self.order(maps[name]) if format_heads([h]) in truth]
            random_rows = [r for r in rows if "random" in r["chosen_by"]]
            entry = {"spearman_random": spearman([r["scores"][name] for r in random_rows], [r["asr"] for r in random_rows]),
                     "spearman_all": spearman([r["scores"][name] for r in rows], [r["asr"] for r in rows]),
                     "top10": order[:10]}
            for k in (5, 10):
                true_top = {r["head"] for r in ordered[:k]}
                entry[f"precision_at_{k}"] = len(true_top & set(order[:k])) / k
            by_score[name] = entry
        return {"clean": clean, "clean_pooled": sum(clean.values()) / len(clean), "n_heads": len(rows),
                "n_random": len(randoms), "true_best10": [(r["head"], r["asr"]) for r in ordered[:10]],
                "by_score": by_score, "heads": ordered}

    def group_table(self) -> dict:
        groups = read_json(self.out / "groups.json")
        clean_nll = self.answers[("", "harmless-test-50")]["clean_nll"]
        clean_answered = answered(self.answers[("", "harmless-test-50")]["answers"])
        table = {}
        for name, heads in groups.items():
            if name == "seconds":
                continue
            heads = [tuple(h) for h in heads]
            unit = self.answers[(format_heads(sorted(heads)), "harmless-test-50")]
            table[name] = {"heads": format_heads(heads), **{s: self.asr(heads, s) for s in HARMFUL_SETS},
                           **{f"{s}_rise": self.asr(heads, s) - self.asr([], s) for s in HARMFUL_SETS},
                           "harmless_answered": answered(unit["answers"]), "clean_answered": clean_answered,
                           "nll_rise": unit["clean_nll"] - clean_nll,
                           "example": self.answers[(format_heads(sorted(heads)), HARMFUL_SETS[0])]["answers"][0]}
        return table


def answered(answers: list[str]) -> float:
    """Harmless prompts answered: no refusal phrase of the judge's list."""
    return 100 * sum(not KEYWORD_JUDGES[JUDGE].refused(a) for a in answers) / len(answers)


def markdown(result: dict) -> str:
    c = result["config"]
    lines = [f"# Which heads {c['model']} refuses with", "",
             f"Chat template, ua, eps 1e-4, greedy {c['max_new_tokens']} tokens; ASR by the `{result['judge']}` judge "
             f"(answers stopped once it saw a refusal phrase: exact for its verdict).", ""]
    if "truth" in result:
        t = result["truth"]
        lines += ["## Ground truth: single heads (MaliciousInstruct 51-100 + JailbreakBench 1-50, pooled)", "",
                  "Clean ASR: " + ", ".join(f"{k} {v:.0f}%" for k, v in t["clean"].items()) + f" (pooled {t['clean_pooled']:.0f}%). "
                  f"{t['n_heads']} heads measured ({t['n_random']} drawn at random with seed 0).", "",
                  "| score | Spearman vs true ASR, random heads only | over all measured | precision at 5 | at 10 | its top 10 |",
                  "|---|---|---|---|---|---|"]
        for name, e in t["by_score"].items():
            lines.append(f"| {name} | {e['spearman_random']:.2f} | {e['spearman_all']:.2f} | {e['precision_at_5']:.1f} | "
                         f"{e['precision_at_10']:.1f} | {', '.join(e['top10'])} |")
        lines += ["", "True best 10: " + ", ".join(f"{h} ({a:.0f}%)" for h, a in t["true_best10"]) + ".", "",
                  "| head | pooled ASR | MI 51-100 | JBB 1-50 | chosen by | kl | refusal-logprob | refusal-direction | sahara step 1 |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for r in t["heads"]:
            s = r["scores"]
            lines.append(f"| {r['head']} | {r['asr']:.0f}% | {r['by_set'][HARMFUL_SETS[0]]:.0f}% | {r['by_set'][HARMFUL_SETS[1]]:.0f}% | "
                         f"{', '.join(r['chosen_by'])} | {s['kl']:.4f} | {s['refusal-logprob']:.4f} | {s['refusal-direction']:.4f} | "
                         f"{s['sahara-step1']:.4f} |")
        lines.append("")
    if "groups" in result:
        lines += ["## Groups, held out (k = 1, 2, 3)", "",
                  "| group | heads | MI 51-100 ASR (rise) | JBB 1-50 ASR (rise) | harmless answered | answer NLL rise |",
                  "|---|---|---|---|---|---|"]
        for name, g in result["groups"].items():
            lines.append(f"| {name} | {g['heads'] or '-'} | {g[HARMFUL_SETS[0]]:.0f}% ({g[HARMFUL_SETS[0] + '_rise']:+.0f}) | "
                         f"{g[HARMFUL_SETS[1]]:.0f}% ({g[HARMFUL_SETS[1] + '_rise']:+.0f}) | {g['harmless_answered']:.0f}% | "
                         f"{g['nll_rise']:+.3f} |")
        lines.append("")
    lines += ["Stage seconds: " + ", ".join(f"{k} {v}" for k, v in result["stage_seconds"].items())
              + f"; generation in all {result['generation_seconds']} s.", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
