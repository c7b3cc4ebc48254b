"""
Benchmark a reward model the way the papers' tables do: score every distinct edited image once, then compare.

- EditScore/EditReward-Bench (EditScore, arXiv 2509.23909): strict accuracy of score[preferred] > score[rejected]
  per task x {prompt_following, consistency, overall}, per task group, and Overall = the mean over the tasks.
- TIGER-Lab/EditReward-Bench 2/3/4-pair, GenAI-Bench image_edition, EditReward-Data, the toy bench and the
  project's JSONL (EditReward, arXiv 2509.26346): tie-calibrated pairwise accuracy (Deutsch et al., arXiv
  2305.14324), accuracy with ties (eps = 0) and without ties (= rewardmodel.py's held-out accuracy), and per group
  size K the strict ranking (group) accuracy. Avg@K self-ensemble (EditScore) is `--k`: K sampled passes per image.
- `--by COLUMN`: accuracy without ties per value of an item column, e.g. `category`, or the toy's per-candidate
  `outcomes` read as "winner > loser" ("correct > wrong": which mistakes a scorer cannot see).
- Scores are cached per image in <out_dir>/cache, flushed per batch: a killed run resumes where it stopped.

Simplified: one scorer per run; the tie epsilon is calibrated on the set it is reported on (the metric's
definition: optimistic by design); each edited image is scored alone, never beside its rival; a benchmark
dimension the scorer has no output for is ranked by its "overall".

  python bench.py --bench data/toy/bench.jsonl --model tiny --limit 20 --worst 8       # CPU, seconds
  python bench.py --bench data/toy/pairs_val.jsonl --model out/rm_toy --by outcomes    # toy held-out accuracy
  python bench.py --bench EditScore/EditReward-Bench --model out/verifier --k 4        # one GPU: a verifier, Avg@4
  python bench.py --bench EditScore/EditReward-Bench --model EditScore/EditScore-7B --k 4 --prompt_file es.json
  torchrun --standalone --nproc_per_node=8 bench.py --bench TIGER-Lab/EditReward-Bench --config 4pair \\
      --model out/rm --by category                                                     # 8 GPUs, NCCL
"""
import argparse
import glob
import hashlib
import json
import os
import sys
import time
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
import torch.distributed as tdist
from tqdm import tqdm

from data import (CandidateGroup, PreferencePair, atomic_write, check_least, image_sheet, leave_distributed, load_image,
                  load_items, load_sources, print0, regroup, setup_distributed, shard)

# ----------------------------------------------------------------------------- metrics (pure functions)
def pairwise_accuracy(human, model_diff, include_ties=True):
    """Fraction of pairs where sign(score_A - score_B) equals the human label (1: A, -1: B, 0: tie). Tied pairs
    count right only if the model's scores are equal ("with ties", eps = 0), or are dropped with
    include_ties=False ("without ties"). A zero model difference on an untied pair is wrong. Empty -> nan."""
    h, d = np.asarray(human, dtype=np.int64), np.asarray(model_diff, dtype=np.float64)
    if not include_ties:
        h, d = h[h != 0], d[h != 0]
    return float(np.mean(np.sign(d) == h)) if len(h) else float("nan")

def tie_calibrated_accuracy(human, model_diff):
    """Tie-calibrated pairwise accuracy (Deutsch et al. 2023, arXiv 2305.14324) -> (accuracy, epsilon).
    The model predicts a tie when |diff| <= eps; eps is chosen to maximise accuracy over all pairs, ties
    included. Only eps = 0 (model never ties unless scores are equal) and eps = each distinct |diff| can
    change the outcome, so those are exactly the candidates tried, and all pairs at one |diff| become predicted
    ties together; on equal accuracy the smallest eps wins. Empty input -> (nan, 0.0): there is no accuracy
    over zero pairs. A nan difference (an image the scorer could not score) is wrong whatever the label or eps."""
    h = np.asarray(human, dtype=np.int64)
    d = np.asarray(model_diff, dtype=np.float64)
    if len(h) != len(d):
        raise ValueError(f"human ({len(h)}) and model_diff ({len(d)}) differ in length")
    if len(h) == 0:
        return float("nan"), 0.0
    a = np.abs(d)
    eps = np.unique(np.append(a[~np.isnan(a)], 0.0))          # (m,) sorted candidates, 0 first
    tied = np.sort(a[h == 0])                                 # human ties: right iff |diff| <= eps
    agree = np.sort(a[(h != 0) & (np.sign(d) == h)])          # right order: right iff |diff| > eps
    right = np.searchsorted(tied, eps, side="right") + len(agree) - np.searchsorted(agree, eps, side="right")
    best = int(np.argmax(right))                              # first max = smallest eps
    return float(right[best] / len(h)), float(eps[best])

def group_accuracy(ranks, scores, eps=0.0):
    """EditReward-Bench's strict ranking accuracy (TIGER-AI-Lab/EditReward evaluate/eval_bench.py): the fraction of
    groups whose every pair is right. ranks: per group, human ranks (0 = best, equal = tie); scores: per group, model
    scores. A pair humans order is right if the model orders it alike, a tie (only K=2 in the paper) if |d| <= eps."""
    if len(ranks) == 0:
        return float("nan")
    hits = 0
    for r, s in zip(ranks, scores):
        r, s = np.asarray(r), np.asarray(s, dtype=np.float64)
        i, j = np.triu_indices(len(r), k=1)                   # all pairs i < j
        h, d = np.sign(r[j] - r[i]), s[i] - s[j]              # h = 1: i ranked better
        ok = np.where(h == 0, np.abs(d) <= eps, np.sign(d) == h)
        hits += bool(ok.all())
    return hits / len(ranks)

# The four groups EditScore's evaluation scripts average its 13 task types into.
EDITSCORE_GROUPS = {"object": ("subject_add", "subject_remove", "subject_replace"),
                    "appearance": ("color_alter", "material_alter", "style", "tone_transfer"),
                    "scene": ("background_change", "extract"),
                    "advanced": ("ps_human", "text_change", "motion_change", "compose")}
EDITSCORE_DIMS = ("prompt_following", "consistency", "overall")
SCORER_CODE = Path(__file__).with_name("rewardmodel.py")  # its text keys the score cache too

def editscore_bench_table(tasks, dimensions, model_diff):
    """EditScore/EditReward-Bench aggregation. One entry per benchmark row: task type, dimension and
    score[preferred] - score[rejected]. Strict: a row is right only if the difference is > 0 (ties are
    wrong). Returns {"tasks": {task: {dim: acc}}, "groups": {group: {dim: mean over its tasks}},
    "overall": {dim: unweighted mean over tasks}}; groups with no task present are left out."""
    right = {}
    for t, dim, d in zip(tasks, dimensions, model_diff):  # the hub data also spells "subject-add", "style_change"
        t = t.lower().replace("-", "_").replace("style_change", "style")
        right.setdefault(t, {}).setdefault(dim, []).append(d > 0)
    table = {t: {dim: float(np.mean(v)) for dim, v in per.items()} for t, per in sorted(right.items())}

    def mean_over(ts):
        return {dim: float(np.mean([table[t][dim] for t in ts if dim in table[t]]))
                for dim in EDITSCORE_DIMS if any(dim in table[t] for t in ts)}

    groups = {g: mean_over([t for t in ts if t in table]) for g, ts in EDITSCORE_GROUPS.items()
              if any(t in table for t in ts)}
    return {"tasks": table, "groups": groups, "overall": mean_over(list(table))}

# ----------------------------------------------------------------------------- what gets scored
# One human verdict on two scored images in one benchmark dimension (e.g. "overall", EditScore's "consistency"):
# human = 1 (a is better), -1 (b is better) or 0 (a tie); a, b = the images' unit keys, a the preferred one (or
# either of a tie); task = the item's category (EditScore: its task type); by = its --by label, "" when none.
Comparison = NamedTuple("Comparison", [("dim", str), ("human", int), ("a", str), ("b", str), ("task", str),
                                       ("by", str)])
Unit = NamedTuple("Unit", [("item", object), ("edited", object)])  # one image to score: its pair or group, its ref

def image_hash(ref, memo):
    """Content hash of an image reference (path, encoded bytes, PIL image, lazy cell). The encoded bytes are hashed,
    not the pixels, so a cached run never decodes an image; `memo` avoids re-reading a shared file."""
    k = ref if isinstance(ref, str) else id(ref)
    if k not in memo:
        ref = ref() if callable(ref) else ref  # a lazy dataset cell (data.py) is read now
        data = (Path(ref).read_bytes() if isinstance(ref, str) else bytes(ref) if isinstance(ref, (bytes, bytearray))
                else f"{ref.mode}{ref.size}".encode() + ref.tobytes())  # the last: a PIL image
        memo[k] = hashlib.sha1(data).hexdigest()
    return memo[k]

def scorer_id(model, skip=None):
    """The scorer's name in the cache key: its path + its files' sizes and mtimes (a retrained one is new), but not
    those under `skip` (bench.py's own --out_dir), and a GCPO checkpoint's SFT model (its --init) the same way, unless
    the checkpoint carries its own copy (init/, among its files): then the folder --init names is not what loads."""
    files = sorted(glob.glob(os.path.join(model, "**"), recursive=True)) if os.path.isdir(model) else []
    stats = [(os.path.relpath(p, model), os.stat(p).st_size, os.stat(p).st_mtime_ns) for p in files  # any bench's
             if os.path.isfile(p) and not p.endswith((".jsonl", ".png", "report.json"))  # output in it is no model file
             and not (skip and Path(skip).resolve() in Path(p).resolve().parents)]
    init = os.path.isfile(f"{model}/args.json") and not os.path.isfile(f"{model}/init/args.json") and json.load(
        open(f"{model}/args.json")).get("init")
    return f"{os.path.abspath(model)}:{hashlib.sha1(json.dumps(stats).encode()).hexdigest()[:12]}" + (
        f" on {scorer_id(init, skip)}" if init else "") if files else model

def by_label(pair, column, human):
    """The --by label of one comparison: the pair's meta entry or field `column`. A per-candidate value
    ({"preferred": x, "rejected": y}, e.g. the toy's outcomes) reads "winner > loser", with no label on a tie."""
    v = pair.meta[column] if column in pair.meta else getattr(pair, column, None)
    if isinstance(v, dict):  # human = 1 or -1 reads the pair forwards or backwards
        return " > ".join(map(str, [v["preferred"], v["rejected"]][::human])) if human else ""
    return "" if v is None else str(v)

def plan(items, scorer, k, seed, by=""):
    """Benchmark items -> ({key: Unit}, [Comparison], [(ranks, keys)] per candidate group).
    A key hashes all a score depends on: the images (sources too), instruction, scorer, K and seed. An EditScore-
    bench row judges one dimension, meta["dimension"]; a group gives its pairs, labelled per dimension by humans."""
    memo, units, comps, groups = {}, {}, [], []

    def unit(it, img):
        parts = [[image_hash(s, memo) for s in it.sources], image_hash(img, memo), it.instruction, scorer, k, seed]
        key = hashlib.sha256(json.dumps(parts).encode()).hexdigest()[:32]
        units.setdefault(key, Unit(it, img))
        return key

    for it in items:
        pairs = [it]
        if isinstance(it, CandidateGroup):
            groups.append((list(it.ranks), [unit(it, c) for c in it.candidates]))
            pairs = it.to_pairs()
        for p in pairs:
            a, b = unit(p, p.preferred), unit(p, p.rejected)
            # a pair without an overall label is preferred overall unless tied (as rewardmodel.py reads it)
            prefs = {p.meta["dimension"]: 1} if "dimension" in p.meta else \
                {**p.prefs, "overall": 0 if p.tie else p.prefs.get("overall", 1)}
            comps += [Comparison(dim, int(h), a, b, p.category, by_label(p, by, h) if by else "")
                      for dim, h in prefs.items()]
    return units, comps, groups

# ----------------------------------------------------------------------------- scoring, with a cache per rank
def read_cache(cache_dir):
    """All cached scores {key: {name: value}} from every rank's JSONL file in cache_dir."""
    cache = {}
    for path in sorted(glob.glob(os.path.join(cache_dir, "*.jsonl"))):
        for line in Path(path).read_text(encoding="utf-8").splitlines():
            try:
                row = json.loads(line)
                cache[row["key"]] = row["scores"]
            except (json.JSONDecodeError, KeyError, TypeError):
                continue  # a torn line (killed mid-write) or a blank one: that unit is scored again
    return cache

def score_all(args, dist, units, scorer_flags):
    """Every unit's scores: the cached ones read back, this rank's share of the rest scored batch by batch and
    appended to its cache file, the ranks' new scores gathered -> ({key: scores}, how many were scored now)."""
    cache_dir = os.path.join(args.out_dir, "cache")
    cache = read_cache(cache_dir)
    # shard all units (not only the uncached ones) so every rank agrees on the split whatever the cache holds
    todo = [key for key in shard(list(units), dist.rank, dist.world) if key not in cache]
    print0(f"{len(units)} distinct images, {sum(key in cache for key in units)} cached, {dist.world} rank(s)")
    new, batch = {}, args.batch_size // dist.world
    if todo:
        from rewardmodel import RewardModel  # transformers & co. load only when there is something to score
        torch.manual_seed(args.seed)  # anything the model draws at build time is then the same on every rank
        rm = RewardModel.from_pretrained(args.model, device=str(dist.device), **scorer_flags)
        if args.k > 1 and rm.mode == "gaussian":  # its score is one deterministic forward: K passes would agree
            print0(f"--k {args.k}: a Gaussian reward model is deterministic, so each image is scored once (Avg@1)")
        if args.max_new_tokens and rm.mode == "gaussian":  # a flag copied from a generative scorer's command
            print0(f"--max_new_tokens {args.max_new_tokens}: a Gaussian reward model generates no answer (unused)")
        os.makedirs(cache_dir, exist_ok=True)
        with open(os.path.join(cache_dir, f"scores.rank{dist.rank}.jsonl"), "a", encoding="utf-8") as f, \
                tqdm(total=len(todo), disable=not dist.master, desc="scoring") as bar:
            f.write("\n" if f.tell() else "")  # closes off the torn last line a killed run may have left
            for i in range(0, len(todo), batch):
                keys = todo[i:i + batch]
                us = [units[key] for key in keys]
                # pass i of a sampled (verifier) score uses seed + i whatever the batch or rank: reproducible
                try:  # an image the checks passed may still fail in the processor or the model: say which
                    out = rm.score([load_sources(u.item) for u in us], [u.item.instruction for u in us],
                                   [load_image(u.edited, u.item.origin) for u in us], num_samples=args.k,
                                   batch_size=len(keys), seed=args.seed)
                except Exception as e:
                    raise RuntimeError(f"scoring {', '.join(dict.fromkeys(u.item.origin for u in us))}: {e!r}") from e
                out = {key: {name: float(v[j]) for name, v in out.items()} for j, key in enumerate(keys)}
                f.write("".join(json.dumps({"key": key, "scores": s}) + "\n" for key, s in out.items()))
                f.flush()  # a killed run loses at most this batch
                new.update(out)
                bar.update(len(out))
    if dist.ddp:
        gathered = [None] * dist.world
        tdist.all_gather_object(gathered, new)
        new = {key: s for part in gathered for key, s in part.items()}
    return {key: new[key] if key in new else cache[key] for key in units}, len(new)

# ----------------------------------------------------------------------------- reporting
# Benchmark dimension -> scorer output names that measure it, best match first; anything else falls back to
# "overall" (e.g. EditScore's consistency on a Gaussian head trained on instruction following + quality).
SCORE_ALIASES = {"prompt_following": ("prompt_following", "instruction_following"),
                 "instruction_following": ("instruction_following", "prompt_following"),
                 "visual_quality": ("visual_quality", "perceptual_quality")}

def pairwise_metrics(h, d):
    """EditReward's numbers for one set of pairs: human labels h (n,), model differences d (n,)."""
    acc, eps = tie_calibrated_accuracy(h, d)
    return {"pairs": len(h), "human_ties": int(np.sum(h == 0)), "tie_calibrated": acc, "epsilon": eps,
            "with_ties": pairwise_accuracy(h, d), "without_ties": pairwise_accuracy(h, d, include_ties=False)}

def evaluate(comps, groups, scores, editscore):
    """Every number of the report, from the comparisons and the units' scores. With --by, each label's pairs
    are also measured on their own, as if they were the whole benchmark."""
    names = set().union(*(s.keys() for s in scores.values())) if scores else {"overall"}
    key = {dim: next((k for k in SCORE_ALIASES.get(dim, (dim,)) if k in names), "overall")
           for dim in dict.fromkeys(c.dim for c in comps)}
    diff = np.array([scores[c.a][key[c.dim]] - scores[c.b][key[c.dim]] for c in comps], dtype=np.float64)
    human = np.array([c.human for c in comps], dtype=np.int64)
    dims, labels = (np.array([getattr(c, f) for c in comps], dtype=object) for f in ("dim", "by"))
    report = {"pairwise": {}}
    for dim in key:
        m = dims == dim
        report["pairwise"][dim] = {"score_key": key[dim], **pairwise_metrics(human[m], diff[m])}
        by = {lab: m & (labels == lab) for lab in sorted(set(labels[m]) - {""})}
        if by:
            report["pairwise"][dim]["by"] = {lab: pairwise_metrics(human[mb], diff[mb]) for lab, mb in by.items()}
    if groups:  # per group size K, as the paper reports 2-, 3- and 4-pair; eps is fitted on the 2-pair groups alone,
        # as EditReward's evaluation does (a run over all sizes would otherwise fit it to the 3- and 4-pair groups too)
        by_k = {k: [(r, [scores[x]["overall"] for x in ks]) for r, ks in groups if len(r) == k]  # every scorer has one
                for k in sorted({len(r) for r, _ in groups})}
        two = by_k.get(2, [])
        eps = tie_calibrated_accuracy([np.sign(r[1] - r[0]) for r, _ in two], [s[0] - s[1] for _, s in two])[1]
        report["groups"] = {"epsilon": eps, "sizes": {k: {"groups": len(g), "accuracy": group_accuracy(
            *zip(*g), eps if k == 2 else -np.inf)} for k, g in by_k.items()}}  # a tie in K > 2: always wrong there
    if editscore:
        report["editscore"] = editscore_bench_table([c.task for c in comps], list(dims), diff)
    unparsed = [s.get("unparsed", 0) for s in scores.values()]
    report["unparsed"] = {"passes": int(sum(unparsed)), "images": int(sum(u > 0 for u in unparsed)),
                          "unscored_images": int(sum(s["overall"] != s["overall"] for s in scores.values()))}  # NaN
    return report

def fmt(x):
    return "n/a" if x is None or x != x else f"{x:.4f}"  # x != x: nan

def table(head, rows):
    """A markdown table: a header row, then rows of cells."""
    return ["| " + " | ".join(head) + " |", "|---" * len(head) + "|"] + ["| " + " | ".join(r) + " |" for r in rows]

def markdown(report, by=""):
    """The report as markdown tables in the papers' layouts: EditScore's per task group, or EditReward's per
    dimension (and --by label), then the group accuracy."""
    if "editscore" in report:
        es = report["editscore"]
        order = [t for ts in EDITSCORE_GROUPS.values() for t in ts]  # unknown tasks last
        rows = [(g.title(), r) for g, r in [*es["groups"].items(), ("overall", es["overall"])]] + [("", {})]
        rows += sorted(es["tasks"].items(), key=lambda tr: (order + [tr[0]]).index(tr[0]))  # group by group
        lines = table(["EditReward-Bench (EditScore)"] + [d.replace("_", " ").title() for d in EDITSCORE_DIMS],
                      [[n] + [fmt(r.get(d)) if r else "" for d in EDITSCORE_DIMS] for n, r in rows])
    else:
        rows = [(d, v) for dim, w in report["pairwise"].items()  # each dimension, then its --by labels
                for d, v in [(dim, w)] + [(f"{dim} / {by} {lab}", x) for lab, x in w.get("by", {}).items()]]
        lines = table(["dimension", "pairs", "human ties", "acc w/ ties (tie-calibrated)", "epsilon", "acc w/o ties",
                       "acc w/ ties (eps=0)"],
                      [[d, str(v["pairs"]), str(v["human_ties"]), fmt(v["tie_calibrated"]), f"{v['epsilon']:.4g}",
                        fmt(v["without_ties"]), fmt(v["with_ties"])] for d, v in rows])
    if "groups" in report:
        g = report["groups"]
        lines += [""] + table(["K", "groups", "group accuracy", "epsilon"], [
            [str(k), str(v["groups"]), fmt(v["accuracy"]), f"{g['epsilon']:.4g}"] for k, v in g["sizes"].items()])
    u = report["unparsed"]
    lines += ["", f"unparseable passes: {u['passes']} (on {u['images']} images); images without a score (counted "
              f"wrong): {u['unscored_images']}"]
    return "\n".join(lines)

# ----------------------------------------------------------------------------- the run
def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    # --- benchmark (its format is read from its columns)
    p.add_argument("--bench", required=True, help="benchmark file (.jsonl/.json/.parquet), folder or hub name")
    p.add_argument("--config", default=None, help="hub config, e.g. 2pair / 3pair / 4pair for TIGER-Lab")
    p.add_argument("--split", default=None, help="hub split (default train; GenAI-Bench test_v1)")
    p.add_argument("--limit", type=int, default=0, help="only the first N items (pairs / groups / rows); 0 = all")
    p.add_argument("--skip_bad", action="store_true", help="skip and count bad rows instead of stopping")
    p.add_argument("--by", default="", help="accuracy w/o ties per value of this column, e.g. category, outcomes")
    # --- scorer
    p.add_argument("--model", default="tiny", help="reward model checkpoint, 'tiny' (random), or with --rubric any VLM")
    p.add_argument("--rubric", default=None, choices=("verifier", "editscore"), help="score generatively (verifier "
                   "mode) with this prompt, e.g. EditScore's rubric zero-shot on any VLM; default: the checkpoint's")
    p.add_argument("--max_new_tokens", type=int, default=0, help="verifier mode: longest answer; 0 = the checkpoint's")
    p.add_argument("--prompt_file", default=None, help="JSON of the scorer's prompt templates (rewardmodel.py)")
    p.add_argument("--k", type=int, default=1, help="Avg@K of a generative scorer: K sampled passes averaged per image")
    p.add_argument("--seed", type=int, default=42, help="sampling seed: Avg@K pass i uses seed + i (as EditScore)")
    p.add_argument("--batch_size", type=int, default=8, help="edited images per scoring step, all ranks together")
    p.add_argument("--device", default="auto", help="auto (cuda when there is one) | cpu | cuda")
    # --- output
    p.add_argument("--out_dir", default="out/bench", help="report.json, the score cache (cache/) and worst.png")
    p.add_argument("--worst", type=int, default=0, help="draw the N most confident misses into worst.png; 0 = none")
    args = p.parse_args(argv)
    check_least(p, args, dict(k=1, batch_size=1, limit=0, max_new_tokens=0, worst=0))
    return args

def write_report(args, info, comps, groups, units, scores, editscore):
    """Rank 0: print the tables, draw the misses, and write report.json atomically."""
    report = {**info, **evaluate(comps, groups, scores, editscore)}
    print(markdown(report, args.by))
    os.makedirs(args.out_dir, exist_ok=True)
    if args.worst:  # for a person: the overall rewards most confidently against the human order, one row each
        gaps = sorted((scores[a]["overall"] - scores[b]["overall"], a, b) for c in comps if c.human and c.dim ==
                      "overall" for a, b in [[c.a, c.b][::c.human]] if scores[a]["overall"] < scores[b]["overall"])
        rows = [(units[a].item.instruction, [(units[a].item.sources[0], "source"),
                                             (units[a].edited, f"preferred {scores[a]['overall']:.3f}"),
                                             (units[b].edited, f"other {scores[b]['overall']:.3f}")])
                for gap, a, b in gaps[:args.worst]]  # preferred first; a NaN score is no disagreement
        image_sheet(rows, os.path.join(args.out_dir, "worst.png"), cell=160)
        print(f"wrote {len(rows)} worst disagreements to {os.path.join(args.out_dir, 'worst.png')}")
    path = os.path.join(args.out_dir, "report.json")
    clean = json.loads(json.dumps(report), parse_constant=lambda c: None)  # nan -> null: strict JSON has no NaN
    atomic_write(path, lambda f: json.dump(clean, f, indent=1))
    print(f"report: {path}")

def main(argv=None):
    args = parse_args(argv)
    dist = setup_distributed(args.device)  # one script for python and torchrun: ranks split the images
    if args.batch_size % dist.world:
        raise SystemExit(f"--batch_size {args.batch_size} does not split into {dist.world} ranks")
    t0 = time.time()
    items = load_items(args.bench, "auto", args.split, args.config, skip_bad=args.skip_bad)
    if any("positions" in it.meta for it in items):  # TIGER's comparisons: scored as the groups they come from
        items.skipped, n = list(items.skipped), len(items.skipped)  # --skip_bad: a contradicting group is skipped
        items[:] = regroup(items, items.skipped if args.skip_bad else None)
        for o, why in items.skipped[n:]:  # load_items listed the bad rows; the groups dropped here are listed here
            print(f"skipped {o}: {why}", file=sys.stderr)
        if not items:
            raise SystemExit(f"{args.bench}: no groups left ({len(items.skipped)} bad rows or groups skipped)")
    if any(not isinstance(it, (PreferencePair, CandidateGroup)) for it in items):
        raise SystemExit(f"{args.bench}: bench.py evaluates preference pairs and candidate groups, not edit prompts")
    skipped, items = len(items.skipped), (items[:args.limit] if args.limit else list(items))
    # the score cache's key: the scorer's files, the flags that change its scores, the templates' text (an edited file:
    # new scores), the code that scores (a changed default, sampler or prompt in it: new scores) and the device type
    # (the "auto" dtype: bf16 on CUDA, fp32 on CPU)
    flags = {k: v for k, v in (("rubric", args.rubric), ("max_new_tokens", args.max_new_tokens),
                               ("prompt_file", args.prompt_file)) if v}
    scorer = [scorer_id(args.model, args.out_dir), flags, hashlib.sha1(SCORER_CODE.read_bytes()).hexdigest(),
              Path(args.prompt_file).read_text(encoding="utf-8") if args.prompt_file else "", dist.device.type]
    tdist.broadcast_object_list(scorer, 0) if dist.ddp else None  # rank 0's key: a file written meanwhile splits none
    units, comps, groups = plan(items, scorer, args.k, args.seed, args.by)
    if args.by and not any(c.by for c in comps):
        raise SystemExit(f"--by {args.by}: no item of {args.bench} has a value in that column")
    scores, scored_now = score_all(args, dist, units, {**flags, "mode": "verifier"} if args.rubric else flags)
    if dist.master:
        info = {"bench": args.bench, "config": args.config, "split": args.split, "model": args.model, "k": args.k,
                "seed": args.seed, "by": args.by, "items": len(items), "images": len(units), "scored_now": scored_now,
                "seconds": round(time.time() - t0, 2), "skipped_rows": skipped}
        write_report(args, info, comps, groups, units, scores, any("dimension" in it.meta for it in items))
    if dist.ddp:
        leave_distributed()

if __name__ == "__main__":
    main()
