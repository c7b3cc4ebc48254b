"""
Benchmark a reward model the way the papers' tables do (REFERENCE.md sections 3, 4, 5, 8).

Scores every distinct edited image of a benchmark once (cached on disk, so a killed run resumes), then:
- EditScore/EditReward-Bench (EditScore, arXiv 2509.23909): strict accuracy of score[preferred] >
  score[rejected] per task type x {prompt_following, consistency, overall}, the four task groups (object,
  appearance, scene, advanced), and Overall = unweighted mean over the 13 tasks.
- TIGER-Lab EditReward-Bench 2/3/4-pair, GenAI-Bench image_edition, AURORA-style pair sets, the toy bench and
  the project's JSONL (EditReward, arXiv 2509.26346): tie-calibrated pairwise accuracy (Deutsch et al.,
  arXiv 2305.14324), accuracy with ties (eps = 0) and without ties, and group accuracy on K-candidate groups.
  "acc w/o ties" is exactly the held-out accuracy rewardmodel.py prints, from the same RewardModel.score.
  Where the data says what each candidate is (the toy's "outcomes"), that accuracy per pair of outcomes too
  ("correct > wrong": which mistakes a scorer cannot see).
- Avg@K self-ensemble (EditScore) is `--k`: the scorer averages K sampled passes per image; with K > 1 the
  wall time of Avg@K over Avg@1 on the first batch is printed.

Simplified: one scorer per run; the tie epsilon is calibrated on the very set it is reported on (that is the
metric's definition, so it is optimistic by design); each edited image is scored alone, never side by side
with its rival; a benchmark dimension the scorer has no output for is ranked by its "overall".

  python bench.py --bench data/toy/bench.jsonl --model tiny --limit 20             # CPU, seconds
  python bench.py --bench data/toy/pairs_val.jsonl --model out/rm_toy              # toy held-out accuracy
  python bench.py --bench EditScore/EditReward-Bench --model out/verifier --k 4    # one GPU: a verifier, Avg@4
  python bench.py --bench EditScore/EditReward-Bench --model Qwen/Qwen2.5-VL-7B-Instruct --rubric editscore \\
      --k 4 --max_new_tokens 512                                                   # EditScore-style, zero-shot
  torchrun --standalone --nproc_per_node=8 bench.py --bench TIGER-Lab/EditReward-Bench --config 4pair \\
      --model out/rm                                                               # 8 GPUs, NCCL
  python bench.py --bench TIGER-Lab/GenAI-Bench --config image_edition --split test --model out/rm \\
      --report_images worst.png                                                    # look at the misses
"""
import argparse
import glob
import hashlib
import json
import math
import os
import time

import numpy as np
import torch
from tqdm import tqdm

from data import FORMATS, CandidateGroup, PreferencePair, leave_distributed, load_image, load_items, shard

# ----------------------------------------------------------------------------- metrics (pure functions)


def pairwise_accuracy(human, model_diff, include_ties=True):
    """Fraction of pairs where sign(score_A - score_B) equals the human label (1: A, -1: B, 0: tie).
    include_ties=True keeps tied pairs, which then count right only if the model gives exactly equal
    scores (accuracy "with ties", eps = 0); False drops them ("without ties"). A zero model difference on
    an untied pair is wrong. Empty input -> nan."""
    h = np.asarray(human, dtype=np.int64)
    d = np.asarray(model_diff, dtype=np.float64)
    if not include_ties:
        h, d = h[h != 0], d[h != 0]
    return float(np.mean(np.sign(d) == h)) if len(h) else float("nan")


def tie_calibrated_accuracy(human, model_diff):
    """Tie-calibrated pairwise accuracy (Deutsch et al. 2023, arXiv 2305.14324) -> (accuracy, epsilon).
    The model predicts a tie when |diff| <= eps; eps is chosen to maximise accuracy over all pairs, ties
    included. Only eps = 0 (model never ties unless scores are equal) and eps = each distinct |diff| can
    change the outcome, so those are exactly the candidates tried; on equal accuracy the smallest eps wins.
    Empty input -> (nan, 0.0): there is no accuracy over zero pairs, and nan cannot pass for a real score.
    A nan difference (a scorer that could not score an image) is wrong whatever the label or eps.
    Where EditReward's public code goes wrong (its two versions disagree on ~17% of random inputs): the
    incremental one sorts pairs by |diff| and scores after moving each single pair into "model tie", so
    (1) the state it starts from, no predicted ties, is never scored (a model whose best eps is 0 is
    under-reported), and (2) with duplicate |diff| it scores states no eps produces (only some of the pairs
    at one |diff| called ties), which can over-report. Here every pair at one |diff| moves together."""
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
    """Fraction of candidate groups whose every pairwise comparison is right (EditReward-Bench K=3,4).
    ranks: per group, human ranks (0 = best, equal = tie); scores: per group, model scores. A pair is right
    when the human ties it and |diff| <= eps, or the human orders it and the model agrees by more than eps.
    Empty input -> nan."""
    if len(ranks) == 0:
        return float("nan")
    hits = 0
    for r, s in zip(ranks, scores):
        r, s = np.asarray(r), np.asarray(s, dtype=np.float64)
        i, j = np.triu_indices(len(r), k=1)                   # all pairs i < j
        h, d = np.sign(r[j] - r[i]), s[i] - s[j]              # h = 1: i ranked better
        ok = np.where(h == 0, np.abs(d) <= eps, (np.abs(d) > eps) & (np.sign(d) == h))
        hits += bool(ok.all())
    return hits / len(ranks)


# The four groups EditScore's evaluation scripts average its 13 task types into.
EDITSCORE_GROUPS = {
    "object": ("subject_add", "subject_remove", "subject_replace"),
    "appearance": ("color_alter", "material_alter", "style", "tone_transfer"),
    "scene": ("background_change", "extract"),
    "advanced": ("ps_human", "text_change", "motion_change", "compose"),
}
EDITSCORE_DIMS = ("prompt_following", "consistency", "overall")


def editscore_task(name):
    """Canonical task name: the hub data and EditScore's own scripts spell some names with '-' or
    '_change' ("subject-add", "style_change")."""
    name = name.lower().replace("-", "_")
    return "style" if name == "style_change" else name


def editscore_bench_table(tasks, dimensions, model_diff):
    """EditScore/EditReward-Bench aggregation. One entry per benchmark row: task type, dimension and
    score[preferred] - score[rejected]. Strict: a row is right only if the difference is > 0 (ties are
    wrong). Returns {"tasks": {task: {dim: acc}}, "groups": {group: {dim: mean over its tasks}},
    "overall": {dim: unweighted mean over tasks}}; groups with no task present are left out."""
    right = {}
    for t, dim, d in zip(tasks, dimensions, model_diff):
        right.setdefault(editscore_task(t), {}).setdefault(dim, []).append(d > 0)
    table = {t: {dim: float(np.mean(v)) for dim, v in per.items()} for t, per in sorted(right.items())}

    def mean_over(ts):
        return {dim: float(np.mean([table[t][dim] for t in ts if dim in table[t]]))
                for dim in EDITSCORE_DIMS if any(dim in table[t] for t in ts)}

    groups = {g: mean_over([t for t in ts if t in table]) for g, ts in EDITSCORE_GROUPS.items()
              if any(t in table for t in ts)}
    return {"tasks": table, "groups": groups, "overall": mean_over(list(table))}


# ----------------------------------------------------------------------------- what gets scored


def image_hash(ref, memo):
    """Content hash of an image reference (path, encoded bytes or PIL image). The encoded bytes are hashed,
    not the pixels, so a cached run never decodes an image; `memo` avoids re-reading a shared file."""
    k = ref if isinstance(ref, str) else id(ref)
    if k not in memo:
        if isinstance(ref, str):
            with open(ref, "rb") as f:
                data = f.read()
        elif isinstance(ref, (bytes, bytearray)):
            data = bytes(ref)
        else:
            data = f"{ref.mode}{ref.size}".encode() + ref.tobytes()
        memo[k] = hashlib.sha1(data).hexdigest()
    return memo[k]


def unit_key(sources, edited, instruction, scorer, k, seed, memo):
    """Cache key of one scoring: (images, instruction, scorer, K, seed). Sources are part of it because a
    reward model scores the edit relative to them."""
    parts = [[image_hash(s, memo) for s in sources], image_hash(edited, memo), instruction, scorer, k, seed]
    return hashlib.sha256(json.dumps(parts).encode()).hexdigest()[:32]


def scorer_id(model):
    """Names the scorer in the cache key: the checkpoint's path plus the size and mtime of its files, so a
    retrained checkpoint at the same path is never served stale scores."""
    if not os.path.isdir(model):
        return model
    stats = [(os.path.relpath(p, model), os.path.getsize(p), os.stat(p).st_mtime_ns)
             for p in sorted(glob.glob(os.path.join(model, "**"), recursive=True)) if os.path.isfile(p)]
    return os.path.abspath(model) + ":" + hashlib.sha1(json.dumps(stats).encode()).hexdigest()[:12]


# Benchmark dimension -> scorer output names that measure it, best match first; anything else falls back to
# "overall" (e.g. EditScore's consistency on a Gaussian head trained on instruction following + quality).
SCORE_ALIASES = {
    "prompt_following": ("prompt_following", "instruction_following"),
    "instruction_following": ("instruction_following", "prompt_following"),
    "visual_quality": ("visual_quality", "perceptual_quality"),
    "quality_aesthetic": ("visual_quality", "perceptual_quality"),
}


def score_key(dim, available):
    return next((k for k in SCORE_ALIASES.get(dim, (dim,)) if k in available), "overall")


def plan(items, scorer, k, seed):
    """Turn benchmark items into unique scoring units and the comparisons that use them.
    -> units {key: (sources, instruction, edited, origin)}, comparisons [(dim, human, key_a, key_b, outcomes, task)],
       groups [(ranks, [keys])]. EditScore-bench rows carry their dimension in meta["dimension"]; outcomes names
       what the human-preferred and the other candidate are, as "correct > wrong", where the data says (the toy's
       meta["outcomes"]), else ""."""
    memo, units, comps, groups = {}, {}, [], []

    def unit(it, img):
        key = unit_key(it.sources, img, it.instruction, scorer, k, seed, memo)
        units.setdefault(key, (it.sources, it.instruction, img, it.origin))
        return key

    def outcomes(p, h):  # "correct > wrong": the human-preferred candidate's first; "" when unknown or tied
        o = p.meta.get("outcomes")
        if not o or h == 0:
            return ""
        return f"{o['preferred']} > {o['rejected']}" if h > 0 else f"{o['rejected']} > {o['preferred']}"

    for it in items:
        if isinstance(it, CandidateGroup):
            groups.append((list(it.ranks), [unit(it, c) for c in it.candidates]))
        pairs = it.to_pairs() if isinstance(it, CandidateGroup) else [it]  # per-dimension labels from scores
        for p in pairs:
            a, b = unit(p, p.preferred), unit(p, p.rejected)
            if "dimension" in p.meta:
                comps.append((p.meta["dimension"], 1, a, b, outcomes(p, 1), p.category))
                continue
            # a pair without an overall label is preferred overall unless tied (as rewardmodel.py reads it)
            prefs = {**p.prefs, "overall": 0 if p.tie else p.prefs.get("overall", 1)}
            comps.extend((dim, int(h), a, b, outcomes(p, h), p.category) for dim, h in prefs.items())
    return units, comps, groups


# ----------------------------------------------------------------------------- cache, metrics, report


def read_cache(cache_dir):
    """All cached scores {key: {name: value}} from every rank's JSONL file in cache_dir."""
    cache = {}
    for path in sorted(glob.glob(os.path.join(cache_dir, "*.jsonl"))):
        with open(path, encoding="utf-8") as f:
            for line in f:
                try:
                    row = json.loads(line)
                    cache[row["key"]] = row["scores"]
                except (json.JSONDecodeError, KeyError, TypeError):
                    continue  # a run killed mid-write leaves one torn line: that unit is simply scored again
    return cache


def open_cache(cache_dir, rank):
    """This rank's append-only cache file; a torn last line from a killed run is closed off first so the
    next record starts on a line of its own."""
    os.makedirs(cache_dir, exist_ok=True)
    path = os.path.join(cache_dir, f"scores.rank{rank}.jsonl")
    torn = False
    if os.path.exists(path) and os.path.getsize(path) > 0:
        with open(path, "rb") as f:
            f.seek(-1, os.SEEK_END)
            torn = f.read(1) != b"\n"
    f = open(path, "a", encoding="utf-8")
    if torn:
        f.write("\n")
    return f


def evaluate(comps, groups, scores, editscore):
    """Every number of the report from the comparisons and the unit scores."""
    names = set().union(*(s.keys() for s in scores.values())) if scores else {"overall"}
    dims = {}
    for dim, h, a, b, outcome, task in comps:
        key = score_key(dim, names)
        dims.setdefault(dim, {"key": key, "h": [], "d": [], "task": [], "outcome": []})
        dims[dim]["h"].append(h)
        dims[dim]["d"].append(scores[a][key] - scores[b][key])
        dims[dim]["task"].append(task)
        dims[dim]["outcome"].append(outcome)
    report = {"pairwise": {}}
    for dim, v in dims.items():
        acc, eps = tie_calibrated_accuracy(v["h"], v["d"])
        report["pairwise"][dim] = {
            "score_key": v["key"], "pairs": len(v["h"]), "human_ties": int(np.sum(np.asarray(v["h"]) == 0)),
            "tie_calibrated": acc, "epsilon": eps, "with_ties": pairwise_accuracy(v["h"], v["d"]),
            "without_ties": pairwise_accuracy(v["h"], v["d"], include_ties=False)}
        by_cat = {}
        for h, d, t in zip(v["h"], v["d"], v["task"]):
            by_cat.setdefault(t, []).append((h, d))
        if len(by_cat) > 1:  # e.g. the toy's edit kinds, TIGER's source datasets: accuracy w/o ties per category
            report["pairwise"][dim]["categories"] = {t: pairwise_accuracy(*zip(*hd), include_ties=False)
                                                     for t, hd in sorted(by_cat.items())}
        by_outcome = {}
        for h, d, o in zip(v["h"], v["d"], v["outcome"]):
            if o:  # strict pairs whose candidates say what they are: which kinds of edit the scorer tells apart
                by_outcome.setdefault(o, []).append((h, d))
        if by_outcome:
            report["pairwise"][dim]["outcomes"] = {
                o: {"pairs": len(hd), "without_ties": pairwise_accuracy(*zip(*hd), include_ties=False)}
                for o, hd in sorted(by_outcome.items())}
    if groups:
        eps = report["pairwise"]["overall"]["epsilon"]  # the tie threshold calibrated on the same pairs
        ranks = [r for r, _ in groups]
        group_scores = [[scores[k][score_key("overall", names)] for k in keys] for _, keys in groups]
        report["groups"] = {"groups": len(groups), "sizes": sorted({len(r) for r in ranks}),
                            "accuracy": group_accuracy(ranks, group_scores, eps), "epsilon": eps}
    if editscore:
        tasks, ds, diffs = [], [], []
        for dim, v in dims.items():
            tasks += v["task"]
            ds += [dim] * len(v["d"])
            diffs += v["d"]
        report["editscore"] = editscore_bench_table(tasks, ds, diffs)
    unparsed = [s.get("unparsed", 0) for s in scores.values()]
    report["unparsed"] = {"passes": int(sum(unparsed)), "images": int(sum(u > 0 for u in unparsed))}
    return report


def fmt(x):
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.4f}"


def markdown(report):
    """The report as markdown tables in the papers' layouts."""
    lines = []
    if "editscore" in report:
        es = report["editscore"]
        head = [d.replace("_", " ").title() for d in EDITSCORE_DIMS]
        lines += ["| EditReward-Bench (EditScore) | " + " | ".join(head) + " |", "|---" * 4 + "|"]
        for name, row in [*es["groups"].items(), ("Overall", es["overall"])]:
            lines.append(f"| {name.title()} | " + " | ".join(fmt(row.get(d)) for d in EDITSCORE_DIMS) + " |")
        lines += ["", "| task | " + " | ".join(head) + " |", "|---" * 4 + "|"]
        order = [t for ts in EDITSCORE_GROUPS.values() for t in ts]  # group by group, unknown tasks last
        for task, row in sorted(es["tasks"].items(), key=lambda tr: (order + [tr[0]]).index(tr[0])):
            lines.append(f"| {task} | " + " | ".join(fmt(row.get(d)) for d in EDITSCORE_DIMS) + " |")
    else:
        lines += ["| dimension | pairs | human ties | acc w/ ties (tie-calibrated) | epsilon | acc w/o ties "
                  "| acc w/ ties (eps=0) |", "|---" * 7 + "|"]
        for dim, v in report["pairwise"].items():
            lines.append(f"| {dim} | {v['pairs']} | {v['human_ties']} | {fmt(v['tie_calibrated'])} | "
                         f"{v['epsilon']:.4g} | {fmt(v['without_ties'])} | {fmt(v['with_ties'])} |")
        outs = {d: v["outcomes"] for d, v in report["pairwise"].items() if "outcomes" in v}
        if outs:  # accuracy w/o ties by what the two candidates are, most frequent first
            rows = sorted({o for t in outs.values() for o in t},
                          key=lambda o: -sum(t[o]["pairs"] for t in outs.values() if o in t))
            lines += ["", "| preferred > other | " + " | ".join(outs) + " |", "|---" * (len(outs) + 1) + "|"]
            for o in rows:
                cells = [f"{fmt(t[o]['without_ties'])} ({t[o]['pairs']})" if o in t else "" for t in outs.values()]
                lines.append(f"| {o} | " + " | ".join(cells) + " |")
        if "groups" in report:
            g = report["groups"]
            lines += ["", "| groups | K | group accuracy | epsilon |", "|---" * 4 + "|",
                      f"| {g['groups']} | {'/'.join(map(str, g['sizes']))} | {fmt(g['accuracy'])} | {g['epsilon']:.4g} |"]
    u = report["unparsed"]
    lines += ["", f"unparseable passes: {u['passes']} (on {u['images']} images)"]
    if report.get("avg_k_over_avg_1_time"):
        lines.append(f"Avg@{report['k']} / Avg@1 wall time: {report['avg_k_over_avg_1_time']:.2f}x")
    return "\n".join(lines)


def worst_disagreements(comps, units, scores, path, n, size=160):
    """PNG of the n overall comparisons the model gets most confidently wrong (largest score gap against the
    human order): source | human-preferred | other, with the instruction and both scores, for a person."""
    from PIL import Image, ImageDraw

    key = score_key("overall", set().union(*(s.keys() for s in scores.values())))
    wrong = []
    for dim, h, a, b, _, _ in comps:
        if h != 0 and dim == "overall":  # one scale to rank by: the reward itself
            a, b = (a, b) if h > 0 else (b, a)  # the human-preferred image first
            wrong.append((scores[a][key] - scores[b][key], a, b))
    rows = [(a, b) for gap, a, b in sorted(wrong)[:n] if gap < 0]
    sheet = Image.new("RGB", (3 * size, max(1, len(rows)) * (size + 30)), "white")
    draw = ImageDraw.Draw(sheet)
    for r, (a, b) in enumerate(rows):
        sources, instruction = units[a][:2]
        y = r * (size + 30)
        for c, ref in enumerate([sources[0], units[a][2], units[b][2]]):
            sheet.paste(load_image(ref).resize((size, size)), (c * size, y + 30))
        draw.text((2, y + 2), instruction[:80], fill="black")
        draw.text((2, y + 15), f"source | preferred {scores[a][key]:.3f} | other {scores[b][key]:.3f}", fill="red")
    sheet.save(path)
    return len(rows)


# ----------------------------------------------------------------------------- the run


def score_batch(rm, units, keys, k, seed):
    """Scores of one batch of units as {key: {name: float}}. A sampled (verifier) pass i of every image uses
    seed + i, so a score does not depend on the batch or the rank it was scored in."""
    srcs = [[load_image(s, units[u][3]) for s in units[u][0]] for u in keys]
    edited = [load_image(units[u][2], units[u][3]) for u in keys]
    out = rm.score(srcs, [units[u][1] for u in keys], edited, num_samples=k, batch_size=len(keys), seed=seed)
    return {u: {name: float(v[i]) for name, v in out.items()} for i, u in enumerate(keys)}


def avg_k_time_ratio(rm, units, keys, k, seed):
    """Scores one batch at Avg@K and returns them with the wall time of Avg@K over Avg@1 on that batch.
    A first Avg@1 call only warms up (allocations, kernels), so neither timing pays for it."""
    score_batch(rm, units, keys, 1, seed)
    t = time.perf_counter()
    score_batch(rm, units, keys, 1, seed)
    t1 = time.perf_counter() - t
    t = time.perf_counter()
    out = score_batch(rm, units, keys, k, seed)
    return out, (time.perf_counter() - t) / t1


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    # --- benchmark
    p.add_argument("--bench", required=True, help="benchmark file (.jsonl/.json/.parquet), folder or hub name")
    p.add_argument("--fmt", default="auto", choices=("auto", *FORMATS), help="data format; auto = from the columns")
    p.add_argument("--config", default=None, help="hub config, e.g. 2pair / 3pair / 4pair for TIGER-Lab")
    p.add_argument("--split", default=None, help="hub split (default train; GenAI-Bench: test or test_v1)")
    p.add_argument("--limit", type=int, default=0, help="only the first N items (pairs / groups / rows); 0 = all")
    p.add_argument("--skip_bad", action="store_true", help="skip and count bad rows instead of stopping")
    # --- scorer
    p.add_argument("--model", default="tiny", help="reward model checkpoint dir (either mode), or 'tiny' (random, for tests); "
                   "with --rubric also any instruct VLM (hub name or folder)")
    p.add_argument("--rubric", default=None, choices=("verifier", "editscore"),
                   help="score generatively with this prompt (verifier mode): the verifier's own, or EditScore's "
                   "rubric, zero-shot on any instruct VLM (default: as the checkpoint was trained)")
    p.add_argument("--max_new_tokens", type=int, default=0, help="longest generated answer (verifier mode; 0 = the checkpoint's)")
    p.add_argument("--k", type=int, default=1, help="Avg@K self-ensemble: sampled passes averaged per image")
    p.add_argument("--seed", type=int, default=42, help="sampling seed (EditScore: pass i uses seed + i); global seed at build")
    p.add_argument("--batch_size", type=int, default=8, help="edited images per scoring step, all ranks together")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cpu | cuda")
    # --- output
    p.add_argument("--cache_dir", default="out/bench/cache", help="score cache (JSONL), shared by runs")
    p.add_argument("--out", default="out/bench/report.json", help="JSON report path")
    p.add_argument("--report_images", default="", help="write a PNG of the worst disagreements here")
    p.add_argument("--report_n", type=int, default=8, help="rows in the --report_images PNG")
    args = p.parse_args(argv)
    for name in ("k", "batch_size", "report_n"):
        if getattr(args, name) < 1:
            p.error(f"--{name} must be >= 1, got {getattr(args, name)}")
    for name in ("limit", "max_new_tokens"):
        if getattr(args, name) < 0:
            p.error(f"--{name} must be >= 0, got {getattr(args, name)}")

    # one script for python and torchrun: ranks split the images, rank 0 reports
    ddp = "RANK" in os.environ
    rank, world, device = 0, 1, args.device
    if ddp:
        import torch.distributed as dist
        dist.init_process_group("nccl" if device.startswith("cuda") else "gloo")
        rank, world = dist.get_rank(), dist.get_world_size()
        if device.startswith("cuda"):
            device = f"cuda:{int(os.environ['LOCAL_RANK'])}"
            torch.cuda.set_device(device)
    master = rank == 0
    if args.batch_size % world:
        p.error(f"--batch_size {args.batch_size} does not split into {world} ranks")
    batch = args.batch_size // world
    t0 = time.time()

    items = load_items(args.bench, args.fmt, args.split, args.config, skip_bad=args.skip_bad)
    bad = [it.origin for it in items if not isinstance(it, (PreferencePair, CandidateGroup))]
    if bad:
        raise SystemExit(f"{bad[0]}: bench.py evaluates preference pairs and candidate groups, not this row")
    skipped = len(items.skipped)
    items = items[:args.limit] if args.limit else list(items)
    # the flags that change a generative scorer's answers are part of its name in the cache key
    overrides = {k: v for k, v in (("rubric", args.rubric), ("max_new_tokens", args.max_new_tokens)) if v}
    scorer = scorer_id(args.model) + (json.dumps(overrides, sort_keys=True) if overrides else "")
    units, comps, groups = plan(items, scorer, args.k, args.seed)
    cache = read_cache(args.cache_dir)
    # shard all units (not only the uncached ones) so every rank agrees on the split whatever the cache holds
    todo = [u for u in shard(list(units), rank, world) if u not in cache]
    if master:
        print(f"{len(items)} items, {len(units)} distinct images, {len(units) - sum(u not in cache for u in units)}"
              f" cached, {world} rank(s)")

    new, ratio = {}, None
    if todo:
        from rewardmodel import RewardModel  # transformers & co. load only when there is something to score
        torch.manual_seed(args.seed)  # anything the model draws at build time is then the same on every rank
        rm = RewardModel.from_pretrained(args.model, device=device, **overrides,
                                         **({"mode": "verifier"} if args.rubric else {}))
        with open_cache(args.cache_dir, rank) as f, tqdm(total=len(todo), disable=not master, desc="scoring") as bar:
            for i in range(0, len(todo), batch):
                keys = todo[i:i + batch]
                if master and i == 0 and args.k > 1:
                    out, ratio = avg_k_time_ratio(rm, units, keys, args.k, args.seed)
                    bar.write(f"Avg@{args.k} / Avg@1 wall time on a batch of {len(keys)}: {ratio:.2f}x")
                else:
                    out = score_batch(rm, units, keys, args.k, args.seed)
                for u, s in out.items():  # flushed per batch: a killed run loses at most this batch
                    f.write(json.dumps({"key": u, "scores": s}) + "\n")
                f.flush()
                new.update(out)
                bar.update(len(keys))
    if ddp:
        gathered = [None] * world
        dist.all_gather_object(gathered, new)
        new = {u: s for part in gathered for u, s in part.items()}
    scores = {u: new[u] if u in new else cache[u] for u in units}

    if master:
        report = {"bench": args.bench, "config": args.config, "split": args.split, "model": args.model,
                  "k": args.k, "seed": args.seed, "items": len(items), "images": len(units),
                  "scored_now": len(new), "seconds": round(time.time() - t0, 2), "avg_k_over_avg_1_time": ratio,
                  "skipped_rows": skipped}
        report.update(evaluate(comps, groups, scores, any("dimension" in it.meta for it in items)))
        print(markdown(report))
        if args.report_images:
            n = worst_disagreements(comps, units, scores, args.report_images, args.report_n)
            print(f"wrote {n} worst disagreements to {args.report_images}")
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out + ".tmp", "w") as f:  # atomic: a reader never sees half a report
            # undefined metrics (nan, e.g. no tied pairs) become null: strict JSON has no NaN
            json.dump(json.loads(json.dumps(report), parse_constant=lambda c: None), f, indent=1)
        os.replace(args.out + ".tmp", args.out)
        print(f"report: {args.out}")
    if ddp:
        leave_distributed()


if __name__ == "__main__":
    main()
