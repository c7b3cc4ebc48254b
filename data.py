"""data.py: the data nanoEditRL reads, the ground its scripts share, and a procedural toy editing world.

Items (the dataclasses below): PreferencePair, CandidateGroup (K edits ranked, ties allowed), EditPrompt, CotTrace.
Formats (told from the columns of the first row, or fmt=):
  editreward_json  EditReward train / validation JSON (TIGER-AI-Lab/EditReward): path1 preferred (no tie_case: dim1)
  editreward_data  TIGER-Lab/EditReward-Data: left/right edits with 1..4 human scores per dimension
  editscore_bench  EditScore/EditReward-Bench: output_images[0] is preferred on one dimension
  tiger_bench      TIGER-Lab/EditReward-Bench 2pair/3pair/4pair: a comparison a row; load_groups rebuilds the groups
  genai_bench      TIGER-Lab/GenAI-Bench image_edition (split test_v1 by default): left/right/tie votes
  editscore_rl, gedit   EditScore-RL-Data and stepfun-ai/GEdit-Bench prompts
  jsonl            the project's own: {"id", "instruction", "source"} + "preferred", "rejected", "prefs" | "candidates",
                   "ranking" ("A>B=C") or "ranks" | "edited", "response" | optional "target"; image paths relative
A source is a .json/.jsonl/.parquet file, a folder (save_to_disk ones too) or a hub name; a bad row is a DataError
naming source, row and column (skip_bad: skipped and reported). Tie-disentanglement: EditReward (arXiv 2509.26346,
section 3.3). The toy world: shapes on a plain background at 56 px, edited by instructions ("make the red circle
blue", "remove / add / move ...", "change the background to ..."); toy_oracle() scores any edit from its pixels.

  python data.py --toy --out data/toy                 # write the toy world (~1 min on 2 cores)
  python data.py --inspect data/toy/bench.jsonl       # counts, ties, dimensions + a contact sheet PNG
  python data.py --inspect TIGER-Lab/EditReward-Bench --config 3pair --skip_bad
"""
import argparse
import datetime
import io
import json
import math
import multiprocessing
import os
import random
import re
import sys
from dataclasses import dataclass, field, replace
from contextlib import nullcontext
from functools import partial

import numpy as np
from PIL import Image, ImageDraw, ImageOps
from tqdm import tqdm

DIMS = ("instruction_following", "visual_quality")  # the default reward dimensions

class DataError(ValueError):
    """Bad input. The message always names the source and the row (or the group)."""

# ---------------------------------------------------------------------------------- the things the project moves
@dataclass
class _Item:  # what every item has
    id: str
    instruction: str
    sources: list          # source image(s): PIL.Image | path | bytes | a lazy dataset cell

@dataclass
class PreferencePair(_Item):
    preferred: object      # image ref
    rejected: object       # image ref
    prefs: dict            # dim -> +1 (preferred better) | -1 (rejected better) | 0 (tie); "overall" included
    tie: bool = False      # tied overall: then preferred/rejected is only an order, not a preference
    category: str = ""
    scores: dict = None    # raw human scores {"preferred": {dim: x}, "rejected": {dim: x}} when known
    origin: str = ""       # "source:row", for error messages
    meta: dict = field(default_factory=dict)  # e.g. "outcomes" / "models": {"preferred": .., "rejected": ..}

@dataclass
class CandidateGroup(_Item):
    candidates: list       # K image refs
    ranks: list            # K ints, 0 = best, equal ranks = tie
    category: str = ""
    scores: list = None    # per-candidate {dim: x} when known
    origin: str = ""
    meta: dict = field(default_factory=dict)  # e.g. "outcomes" / "models": K strings, one per candidate

    def to_pairs(self):
        """All K(K-1)/2 pairs, the better candidate first; tied candidates give tie pairs."""
        pairs, k = [], len(self.candidates)
        for i, j in ((i, j) for i in range(k) for j in range(i + 1, k)):
            a, b = (i, j) if self.ranks[i] <= self.ranks[j] else (j, i)
            tie, sc = self.ranks[a] == self.ranks[b], self.scores
            prefs = {"overall": int(not tie), **{d: int(np.sign(x - sc[b][d])) for d, x in (sc[a] if sc else {}).items()
                                                if d != "overall"}}
            meta = {key: _sides(v[a], v[b]) if key in ("outcomes", "models") and isinstance(v, list) else v
                    for key, v in self.meta.items()}  # per candidate -> these two
            pairs.append(PreferencePair(f"{self.id}:{a}-{b}", self.instruction, self.sources, self.candidates[a],
                                        self.candidates[b], prefs, tie, self.category,
                                        _sides(sc[a], sc[b]) if sc else None, self.origin, meta))
        return pairs

@dataclass
class EditPrompt(_Item):
    category: str = ""
    target: object = None  # a reference edit (editor warm-up data); None for RL prompts
    origin: str = ""
    meta: dict = field(default_factory=dict)

@dataclass
class CotTrace(_Item):
    edited: object
    response: str
    scores: dict = None
    origin: str = ""

class Loaded(list):
    skipped: list = ()  # under skip_bad, what was skipped: [(origin, reason)]

_sides = lambda preferred, rejected: {"preferred": preferred, "rejected": rejected}  # noqa: E731

# ---------------------------------------------------------------------------------- images and rows
def _cell(table, col, i, j=None):  # a lazy ref (see _rows): row i's image (list element j) in a column -> bytes or path
    return (cell := (table[i][col] if j is None else table[i][col][j]) or {}).get("bytes") or cell.get("path")

def load_image(ref, origin="", verify=False):
    """An image ref (PIL image, path, bytes or a lazy dataset cell) -> RGB, EXIF-rotated; verify: only check it."""
    ref = ref() if callable(ref) else ref  # a lazy dataset cell is read now
    if isinstance(ref, Image.Image):
        return None if verify else ImageOps.exif_transpose(ref).convert("RGB")
    if ref is None or isinstance(ref, str) and not os.path.exists(ref):
        raise DataError(f"{origin}: " + (f"image file not found: {ref}" if ref else "no image (a column missing?)"))
    try:  # PIL raises OSError, SyntaxError, ValueError... for corrupt files
        with Image.open(ref if isinstance(ref, str) else io.BytesIO(ref)) as img:  # verify() checks a PNG's data,
            decoded = verify and img.format != "PNG" and (img.draft(img.mode, (1, 1)), img.load())  # decode others
            return None if decoded else img.verify() if verify else ImageOps.exif_transpose(img).convert("RGB")
    except Exception as e:
        what = "corrupt" if verify else "cannot decode"
        raise DataError(f"{origin}: {what} image {ref if isinstance(ref, str) else '<bytes>'}: {e}") from e

def _rows(path, split=None, config=None):
    """Yield (origin, row) from a .json(l) file or, via `datasets`, parquet, a save_to_disk folder or a hub name."""
    if os.path.isfile(path) and path.endswith((".jsonl", ".json")):
        with open(path, encoding="utf-8-sig") as f:  # a BOM (Windows editors) is no part of row 1
            text = f.read()
        if path.endswith(".json") and text.lstrip().startswith("["):
            try:
                yield from ((f"{path}:{i}", row) for i, row in enumerate(json.loads(text)))
            except json.JSONDecodeError as e:
                raise DataError(f"{path}: not valid JSON: {e}") from e
            return
        for i, line in enumerate(text.split("\n"), start=1):  # not splitlines(): JSON strings may hold U+2028 etc.
            try:
                yield from [(f"{path}:{i}", json.loads(line))] if line.strip() else []
            except json.JSONDecodeError as e:
                yield f"{path}:{i}", DataError(f"{path}:{i}: malformed JSON line: {e}")
        return
    import datasets
    try:  # whatever fails while opening (a wrong config, a missing split, no network) names the source
        if os.path.isfile(path):
            ds = datasets.load_dataset("parquet", data_files=path, split="train")
        elif any(os.path.exists(os.path.join(path, f)) for f in ("state.json", "dataset_dict.json")):
            ds = datasets.load_from_disk(path)
            ds = ds[split or ("train" if "train" in ds or len(ds) > 1 else next(iter(ds)))] if isinstance(
                ds, datasets.DatasetDict) else ds  # a saved GenAI-Bench holds test_v1 alone
        else:  # GenAI-Bench: image_edition, split test_v1 (its README); TIGER-Lab/EditReward-Bench: 2pair.. are folders
            hub = ("image_edition", "test_v1") if path == "TIGER-Lab/GenAI-Bench" else (None, "train")
            sub = config and (path == "TIGER-Lab/EditReward-Bench" or os.path.isdir(os.path.join(path, config)))
            ds = datasets.load_dataset(path, **{"data_dir" if sub else "name": config or hub[0]}, split=split or hub[1])
        # A hub set's images exceed RAM: image columns (an image or a list a row) stay on disk, a row holds lazy refs
        # decoded when used (errors name the row). cells: column -> (its table, per row: None null, -1 image, n list)
        cells, raw = {}, datasets.Image(decode=False)
        for name, feat in ds.features.items():
            many = isinstance(feat, (datasets.List, datasets.Sequence)) and isinstance(feat.feature, datasets.Image)
            if many or isinstance(feat, datasets.Image):
                one = ds.select_columns(name).cast_column(name, datasets.List(raw) if many else raw)
                col = one.data.column(name)
                cells[name], ds = (one, [x for c in col.chunks for x in c.value_lengths().to_pylist()] if many else
                                   [None if x else -1 for x in col.is_null().to_pylist()]), ds.remove_columns(name)
    except Exception as e:
        raise DataError(f"{path}: cannot open{' (no such local path)' * (not os.path.exists(path))}: {e!r}") from e
    for i, row in enumerate(ds):
        row.update({name: None if n[i] is None else partial(_cell, t, name, i) if n[i] < 0 else
                    [partial(_cell, t, name, i, j) for j in range(n[i])] for name, (t, n) in cells.items()})
        yield path + "".join(f"[{x}]" for x in (config, split) if x) + f":{i}", row

class _Row:
    """Column access for one row, with errors that name the source, the row and the column."""

    def __init__(self, row, origin, base):
        self.row, self.origin, self.base, self.get = row, origin, base, row.get

    def fail(self, msg):
        raise DataError(f"{self.origin}: {msg}")

    def req(self, col):
        v = self.row.get(col)
        return v if v is not None else self.fail(f"column '{col}' is null" if col in self.row else
                                                 f"missing column '{col}'")

    def id(self, *cols):  # else the origin (source and row): ids from two files without an id column never collide
        return next((str(self.row[c]) for c in cols if self.row.get(c) is not None), self.origin)

    def text(self, col):
        v = self.req(col)
        return v.strip() if type(v) is str and v.strip() else self.fail(f"column '{col}' must be a non-empty string")

    def num(self, col, optional=False):  # a finite number: a boolean, NaN or inf is not; optional: None if absent
        v = self.get(col) if optional else self.req(col)
        if v is None or isinstance(v, (int, float, np.number)) and not isinstance(v, bool) and math.isfinite(v):
            return None if v is None else float(v)
        self.fail(f"column '{col}' must be a finite number, got {v!r}")

    def image(self, col, v=None):  # a path (relative to the manifest, else to the working directory, as EditReward's
        v = self.req(col) if v is None else v  # own JSON files are written), embedded bytes or a PIL image
        v = v.get("bytes") or v.get("path") if isinstance(v, dict) else v
        j = os.path.join(self.base, v) if isinstance(v, str) and v else None
        v = j if j and (os.path.exists(j) or not os.path.exists(v)) else bytes(v) if isinstance(v, bytearray) else v
        return v if isinstance(v, (str, bytes, Image.Image, partial)) and v != "" else self.fail(
            f"column '{col}' holds no image (got {type(v).__name__})")

    def images(self, col):
        vs = self.req(col) if isinstance(self.req(col), (list, tuple)) else [self.req(col)]
        return [self.image(col, x) for x in vs] if vs else self.fail(f"column '{col}' is an empty list of images")

# ---------------------------------------------------------------------------------- one parser per format
def _parse_editreward_json(c):
    # TIGER-AI-Lab/EditReward: path1 is preferred, tie_case marks ties (EditReward/TRAIN_README.md); files without
    # tie_case (data/dataset/valid_dataset_*.json) rank by dim1, equal a tie, as its evaluate/eval_bench.py reads them
    s = [{d: c.num(f"model{k}_{col}_score", optional=col != "dim1") for d, col in
          (("instruction_following", "dim1"), ("visual_quality", "dim2"), ("overall", "overall"))} for k in (1, 2)]
    s = [{d: x for d, x in side.items() if None not in (x, s[1 - i][d])} for i, side in enumerate(s)]
    dim1 = s[0]["instruction_following"] - s[1]["instruction_following"]
    o = int(not c.get("tie_case")) if "tie_case" in c.row else int(np.sign(dim1))
    k, s = ((2, 1), s[::-1]) if o < 0 else ((1, 2), s)  # path numbers, the preferred first
    prefs = {**{d: int(np.sign(x - s[1][d])) for d, x in s[0].items() if d != "overall"}, "overall": abs(o)}
    return PreferencePair(c.id("id"), c.text("prompt"), [c.image("path_src")], *(c.image(f"path{n}") for n in k),
                          prefs, o == 0, "", _sides(*s), c.origin, {"models": _sides(*(c.get(f"model{n}") for n in k))})

def _parse_editreward_data(c):
    # TIGER-Lab/EditReward-Data card: left/right_{instruction_following, quality_aesthetic, overall}_score (1..4 per
    # dimension, overall their sum; the higher overall is preferred, equal is a tie), key / unique_key the row's id
    s = [{d: c.num(f"{side}_{col}_score") for d, col in (("instruction_following", "instruction_following"),
         ("visual_quality", "quality_aesthetic"), ("overall", "overall"))} for side in ("left", "right")]
    two = [(c.image(f"{x}_output_image"), c.get(f"{x}_model")) for x in ("left", "right")]  # (image, model) a side
    two, s = (two[::-1], s[::-1]) if s[1]["overall"] > s[0]["overall"] else (two, s)  # the preferred first
    prefs, (imgs, models) = {d: int(np.sign(x - s[1][d])) for d, x in s[0].items()}, zip(*two)
    return PreferencePair(c.id("unique_key", "key"), c.text("instruction"), [c.image("source_img")], *imgs, prefs,
                          prefs["overall"] == 0, "", _sides(*s), c.origin,
                          {"vote_type": c.get("vote_type"), "models": _sides(*models)})

def _parse_editscore_bench(c):
    # EditScore/EditReward-Bench card, VectorSpaceLab/EditScore evaluation.py: key [2] and output_images [2], element 0
    # the one humans preferred on `dimension` (prompt_following | consistency | overall)
    outs, key, dim = c.images("output_images"), c.req("key"), c.text("dimension")
    len(outs) == 2 or c.fail(f"column 'output_images' must hold 2 images, got {len(outs)}")
    id = "~".join(map(str, key)) if isinstance(key, (list, tuple)) else str(key)
    return PreferencePair(f"{id}~{dim}", c.text("instruction"), c.images("input_image"), *outs, {dim: 1}, False,
                          c.text("task_type"), None, c.origin, {"dimension": dim})

def _parse_genai_bench(c):
    # TIGER-AI-Lab/GenAI-Bench inference.py (parse_response) and results/image_edition/*/pairwise.jsonl: vote_type is
    # leftvote, rightvote, tievote (both good) or bothbad_vote; both tie votes are ties, meta says which
    if (vote := c.text("vote_type")) not in (votes := ("leftvote", "rightvote", "tievote", "bothbad_vote")):
        c.fail(f"column 'vote_type' must be one of {', '.join(votes)}, got {vote!r}")
    two = [(c.image(f"{s}_output_image"), c.get(f"{s}_model")) for s in ("left", "right")]
    (imgs, models), tie = zip(*(two[::-1] if vote == "rightvote" else two)), vote in votes[2:]
    return PreferencePair(c.id("id"), c.text("instruct_prompt"), [c.image("source_image")], *imgs,
                          {"overall": int(not tie)}, tie, "", None, c.origin,
                          {"vote_type": vote, "models": _sides(*models)})

def _parse_tiger_bench(c):
    # TIGER-AI-Lab/EditReward evaluate/inference_{2,3,4}pair_hf.py and evaluate/README.md: a row compares candidate_1
    # (left) with candidate_2 (right); comparison_type (AvsB, AvsC, ... CvsD) names their positions in the group,
    # ranking ("A>C", "C>A", "A=C") the human verdict; score_1/2, model_1/2 belong to the two. The group is the id up
    # to its first "_" (else its first 10 characters), as those scripts group them, within its `dataset` (2pair...).
    m = re.fullmatch(r"([A-Z])vs([A-Z])", str(c.req("comparison_type")))
    r = re.fullmatch(r"([A-Z])([<>=])([A-Z])", str(c.req("ranking")).replace(" ", "").upper())
    m and m[1] < m[2] or c.fail(f"column 'comparison_type' must read like AvsC, got {c.get('comparison_type')!r}")
    r and {r[1], r[3]} == {m[1], m[2]} or c.fail(f"column 'ranking' {c.get('ranking')!r} is no verdict on {m[0]}")
    two = [(ord(m[k]) - 65, c.image(f"candidate_{k}"), c.num(f"score_{k}", True), c.get(f"model_{k}")) for k in (1, 2)]
    right_won = r[2] != "=" and (r[2] == ">") == (r[1] == m[2])
    (pos, imgs, scores, models), id, size = zip(*(two[::-1] if right_won else two)), str(c.req("id")), c.get("dataset")
    group = (f"{size}/" if size else "") + (id.split("_")[0] if "_" in id else id[:10])
    return PreferencePair(id, c.text("instruction"), [c.image("source_image")], *imgs, {"overall": int(r[2] != "=")},
                          r[2] == "=", str(size or ""),
                          None if None in scores else _sides(*({"overall": x} for x in scores)), c.origin,
                          {"group": group, "positions": list(pos), "comparison_type": m[0], "models": _sides(*models)})

def _parse_prompts(c):
    # EditScore-RL-Data card: instruction, input_images (relative paths), task_type, meta_data; stepfun-ai/GEdit-Bench
    # card: key, task_type, instruction, instruction_language, input_image
    meta = {k: c.get(k) for k in ("meta_data", "instruction_language") if k in c.row}
    return EditPrompt(c.id("id", "key"), c.text("instruction"), c.images("input_images" if "input_images" in c.row
                      else "input_image"), str(c.get("task_type") or ""), None, c.origin, meta)

def _parse_jsonl(c):
    id, instruction, cat, sources = c.id("id"), c.text("instruction"), str(c.get("category") or ""), c.images("source")
    outcomes, k = c.get("outcomes"), len(c.get("candidates") or ())  # what each candidate is (the toy's correct, ...)
    if outcomes is not None and not (isinstance(outcomes, list) and len(outcomes) == k if k else
                                     isinstance(outcomes, dict) and set(outcomes) == {"preferred", "rejected"}):
        c.fail(f"'outcomes' must be {f'a list of {k} strings' if k else 'a preferred/rejected dict'}, got {outcomes!r}")
    meta = {} if outcomes is None else {"outcomes": outcomes}
    if k:
        ranks, sc = c.get("ranks") or parse_ranking(c.req("ranking"), k, c.origin), c.get("scores")
        len(ranks) == k and all(type(r) is int for r in ranks) or c.fail(f"'ranks' must be {k} integers, got {ranks!r}")
        same = sc is None or type(sc) is list and all(type(s) is dict and s.keys() == sc[0].keys() for s in sc)
        same and (not sc or len(sc) == k) or c.fail(f"'scores' must be {k} dicts of the same dimensions")
        sc = sc and [{d: _Row(s, f"{c.origin}: scores[{j}]", "").num(d) for d in s} for j, s in enumerate(sc)]
        return CandidateGroup(id, instruction, sources, c.images("candidates"), ranks, cat, sc, c.origin, meta)
    if "preferred" in c.row or "rejected" in c.row:
        prefs, tie = c.get("prefs") or {"overall": 1}, c.get("tie")  # dimension -> -1, 0 or 1; tie: a boolean
        if not isinstance(prefs, dict) or {*prefs.values()} - {-1, 0, 1} or not isinstance(tie, (bool, type(None))):
            c.fail(f"'prefs' must map dimensions to -1, 0 or 1 and 'tie' be true or false, got {prefs!r}, {tie!r}")
        return PreferencePair(id, instruction, sources, c.image("preferred"), c.image("rejected"), prefs, tie if
                              tie is not None else prefs.get("overall", 1) == 0, cat, c.get("scores"), c.origin, meta)
    if "response" in c.row:
        return CotTrace(id, instruction, sources, c.image("edited"), c.text("response"), c.get("scores"), c.origin)
    return EditPrompt(id, instruction, sources, cat, c.image("target") if c.get("target") else None, c.origin,
                      {"correct": c.get("correct")})

# format -> (the columns that tell it, its parser); the first match wins
PARSERS = {"editreward_json": ({"path1", "path2", "path_src"}, _parse_editreward_json),
           "editreward_data": ({"left_output_image", "source_img"}, _parse_editreward_data),
           "genai_bench": ({"left_output_image", "instruct_prompt"}, _parse_genai_bench),
           "editscore_bench": ({"output_images", "dimension"}, _parse_editscore_bench),
           "tiger_bench": ({"candidate_1", "ranking"}, _parse_tiger_bench),
           "editscore_rl": ({"input_images"}, _parse_prompts),
           "gedit": ({"input_image", "instruction"}, _parse_prompts),
           "jsonl": ({"source", "instruction"}, _parse_jsonl)}

def parse_ranking(ranking, k, origin=""):
    """Ranking text -> ranks (0 = best): a chain "A>B=C" or relations "A>B, B=C" (or their list), complete, no cycle."""
    text = ",".join(ranking) if isinstance(ranking, (list, tuple)) else str(ranking)
    ge, gt = np.eye(k, dtype=bool), np.zeros((k, k), dtype=bool)  # i >= j and i > j, by the relations given
    for chain in filter(None, re.split(r"[,;\s]+", re.sub(r"\s*([<>=])\s*", r"\1", text).strip().upper())):
        toks = re.split(r"([<>=])", chain)
        if any(len(n) != 1 or not "A" <= n < chr(65 + k) for n in toks[0::2]):
            raise DataError(f"{origin}: bad ranking {ranking!r} for {k} candidates")
        for x, op, y in zip(toks[0::2], toks[1::2], toks[2::2]):
            (a, b) = (ord(y) - 65, ord(x) - 65) if op == "<" else (ord(x) - 65, ord(y) - 65)
            ge[a, b] = True
            ge[b, a] |= op == "="
            gt[a, b] |= op != "="
    for m in range(k):  # transitive closure of >= (Floyd-Warshall); then i > j if i >= a > b >= j
        ge |= ge[:, m:m + 1] & ge[m:m + 1, :]
    gt = (ge.astype(int) @ gt @ ge) > 0
    if gt.diagonal().any():
        raise DataError(f"{origin}: ranking {ranking!r} contradicts itself (a cycle, or a tie that is also a win)")
    if not (ge | ge.T).all():
        raise DataError(f"{origin}: ranking {ranking!r} leaves some candidates unordered")
    first = [int(np.flatnonzero(ge[j] & ge[:, j])[0]) for j in range(k)]  # the first of each tied class
    return [len({first[j] for j in np.flatnonzero(gt[:, i])}) for i in range(k)]  # tied classes above i

def regroup(items, skipped=None):
    """TIGER comparisons (meta "group", "positions") -> their groups, ranked by all their comparisons together; a
    contradiction or gap is a DataError naming the group (given a `skipped` list: recorded there, the group dropped)."""
    parts, out = {}, []  # a group's id (str) -> its comparisons, in the place of the first; others under id()
    for p in items:
        parts.setdefault(p.meta.get("group", id(p)) if isinstance(p, PreferencePair) else id(p), []).append(p)
    for gid, comps in parts.items():
        if not isinstance(gid, str):
            out += comps
            continue
        at = {pos: (getattr(p, side), p.meta["models"][side], p.scores and p.scores[side]) for p in comps
              for pos, side in zip(p.meta["positions"], ("preferred", "rejected"))}  # -> (image, model, score)
        try:
            rel = [("=" if p.tie else ">").join(chr(65 + x) for x in p.meta["positions"]) for p in comps]  # "C>A"
            size = re.match(r"(\d+)pair/", gid)  # the `dataset` column's size: a group that lost a candidate is bad
            ranks = parse_ranking(rel, int(size[1]) if size else 1 + max(at), comps[0].origin)
        except DataError as e:
            if skipped is None:
                raise DataError(f"group {gid!r} ({len(comps)} comparisons): {e}") from None
            skipped.append((f"group {gid!r}", str(e)))
            continue
        cands, models, scores = zip(*(at[pos] for pos in range(len(ranks))))
        out.append(CandidateGroup(gid, comps[0].instruction, comps[0].sources, list(cands), ranks, comps[0].category,
                                  None if None in scores else list(scores), comps[0].origin, {"models": list(models)}))
    return out

# ---------------------------------------------------------------------------------- loading: one path for all kinds
def _image_refs(item):
    edits = (zip(item.candidates, (f"rank {r}" for r in item.ranks)) if isinstance(item, CandidateGroup) else
             ((getattr(item, a, None), a) for a in ("preferred", "rejected", "edited", "target")))
    return [(x, "source") for x in item.sources] + [(x, a) for x, a in edits if x is not None]

CHECK_POOL_MIN = 2000  # images a load checks in forked processes when it has more (few: forking costs more)
_to_check = []  # the images being checked: forked workers inherit it (a lazy dataset cell does not pickle)

def _image_error(j):  # why image _to_check[j] cannot be used (a DataError's text after its row's origin), or None
    try:
        load_image(_to_check[j], verify=True)
    except DataError as e:
        return str(e)

def load_items(path, fmt="auto", split=None, config=None, skip_bad=False, check_images=True, want=None,
               disentangle=False):
    """The one loading path: every row as a dataclass, as parsed or as `want` (groups -> pairs, TIGER comparisons ->
    groups). A bad row is a DataError naming source and row; skip_bad skips it, keeps it in .skipped, reports it."""
    items, rows, skipped, uses = [], [], [], {}  # rows: each item's (row number, origin); uses: image -> its items
    rank, world = (int(os.environ.get(k, d)) for k, d in (("RANK", 0), ("WORLD_SIZE", 1)))
    base = os.path.dirname(os.path.abspath(path)) if os.path.isfile(path) else os.path.abspath(path)
    for n, (origin, row) in enumerate(tqdm(_rows(path, split, config), f"reading {path}", unit=" rows", delay=5,
                                           disable=rank > 0)):
        try:
            if not isinstance(row, dict):
                raise row if isinstance(row, Exception) else DataError(f"{origin}: a row must be an object")
            if fmt == "auto":  # the first good row fixes the format
                fmt = next((name for name, (cols, _) in PARSERS.items() if cols <= set(row)), "auto")
            if fmt not in PARSERS:
                raise DataError(f"{origin}: cannot read the columns {sorted(row)} as {fmt!r} ({', '.join(PARSERS)})")
            item = PARSERS[fmt][1](_Row(row, origin, base))
            for ref in dict.fromkeys(x for x, _ in _image_refs(item)) if check_images else ():
                uses.setdefault(ref, []).append(len(items))
            items.append(item), rows.append((n, origin))
        except (ValueError, TypeError) as e:  # a DataError names its row; any other bad value is given its row here
            e = e if isinstance(e, DataError) else DataError(f"{origin}: {type(e).__name__}: {e}")
            if not skip_bad:
                raise e
            skipped.append((n, origin, str(e)))
    # each image once, a share of the CPUs each in forked processes; torchrun: a rank checks every world-th image (a
    # bad one stops the job), skip_bad: all of them, so that every rank skips the same rows
    global _to_check
    share = [(ref, its) for j, (ref, its) in enumerate(uses.items()) if skip_bad or j % world == rank]
    _to_check, broken, procs = [ref for ref, _ in share], {}, (os.cpu_count() or 1) // world
    fork = procs > 1 and len(share) >= CHECK_POOL_MIN and "fork" in multiprocessing.get_all_start_methods()
    try:
        with multiprocessing.get_context("fork").Pool(procs) if fork else nullcontext() as pool:  # leaving: terminated
            errors = pool.imap(_image_error, range(len(share)), 64) if fork else map(_image_error, range(len(share)))
            for (_, its), err in zip(share, tqdm(errors, f"checking {path}", len(share), unit=" images", delay=5,
                                                 disable=rank > 0)):
                if err and not skip_bad:  # the first bad image in row order stops the load
                    raise DataError(rows[its[0]][1] + err)
                broken.update({i: rows[i][1] + err for i in its if err and i not in broken})
    finally:
        _to_check = []  # the refs are not kept past the load, bad or not
    skipped = [(o, why) for _, o, why in sorted(skipped + [(*rows[i], why) for i, why in broken.items()])]
    items = [it for i, it in enumerate(items) if i not in broken]
    if want is CandidateGroup:
        items = regroup(items, skipped if skip_bad else None)
    elif want is PreferencePair:
        items = [p for it in items for p in (it.to_pairs() if isinstance(it, CandidateGroup) else [it])]
    if bad := next((it for it in items if want and not isinstance(it, want)), None):
        raise DataError(f"{bad.origin}: a {type(bad).__name__} where {want.__name__} items were expected")
    out = Loaded(disentangle_ties(items) if disentangle else items)
    out.skipped = skipped
    if skipped:
        print(f"skipped {len(skipped)} bad row(s) of {path}:", *(w for _, w in skipped), sep="\n  ", file=sys.stderr)
    if not out:  # an empty file, or one whose every row was skipped, would train or score nothing
        raise DataError(f"{path}: no {want.__name__ if want else 'item'}s in it ({len(skipped)} bad rows skipped)")
    return out

# Each kind of item from any format that holds it: pairs from group formats too (all of a group's pairs), and
# tie-disentangled unless disentangle=False; groups from TIGER's comparisons too, rebuilt.
load_pairs = partial(load_items, want=PreferencePair, disentangle=True)
load_groups = partial(load_items, want=CandidateGroup)
load_prompts = partial(load_items, want=EditPrompt)  # RL prompts, and editor warm-up triples (they carry a target)
load_traces = partial(load_items, want=CotTrace)  # chain-of-thought traces for verifier SFT

def disentangle_ties(pairs):
    """EditReward's tie-disentanglement: a pair tied overall whose dimensions disagree becomes one strict sample per
    disagreeing dimension, with "overall": 0 so that none reads as an overall preference. Full ties stay ties."""
    out = []
    for p in pairs:
        dim_prefs = {d: v for d, v in p.prefs.items() if d != "overall" and v != 0}
        split = p.tie and set(dim_prefs.values()) == {-1, 1}
        out += [] if split else [p]
        for d, v in dim_prefs.items() if split else ():
            w, l, sc, meta = p.preferred, p.rejected, p.scores, {**p.meta, "disentangled": True}
            if v < 0:  # the dimension's winner goes first, and with it its scores, outcome and model
                w, l, sc = l, w, sc and _sides(sc["rejected"], sc["preferred"])
                meta.update({k: _sides(x["rejected"], x["preferred"]) for k, x in meta.items()
                             if k in ("outcomes", "models") and isinstance(x, dict)})
            out.append(replace(p, id=f"{p.id}#{d}", preferred=w, rejected=l, prefs={d: 1, "overall": 0}, tie=False,
                               scores=sc, meta=meta))
    return out

def shard(items, rank, world_size):
    """Rank's strided slice: the shards of all ranks partition the items exactly (sizes differ by <= 1)."""
    return list(items)[rank::world_size]

# ---------------------------------------------------------------------------------- the ground every script shares
def check_resume(where, saved, now, free):
    """--resume goes on as the run began: SystemExit if a flag outside `free` differs from the saved run's (a dict)."""
    if diff := [f"--{k} {v}->{now[k]}" for k, v in saved.items() if now.get(k, v) != v and k not in free]:
        raise SystemExit(f"{where} was trained with other flags ({', '.join(diff)}): --resume goes on as the run began")

def check_least(parser, args, least):
    """parser.error on the first flag below its least value (least: {flag: value}); a NaN is refused too."""
    if bad := next((k for k, v in least.items() if not getattr(args, k) >= v), None):
        parser.error(f"--{bad} must be >= {least[bad]}, got {getattr(args, bad)}")

def check_unused(parser, args, names, why):
    """parser.error if a flag of `names`, those this run does not use (`why`: the flag that decides), differs from its
    default (the parser's, a preset's included): a flag that would do nothing stops the run, never goes unnoticed."""
    if unused := [f"--{k}" for k in names if getattr(args, k) != parser.get_default(k)]:
        parser.error(f"{why} does not use {', '.join(unused)} (flags of the other {why.split()[0]})")

@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    device: object = "cpu"  # a torch.device
    master = property(lambda self: self.rank == 0)
    ddp = property(lambda self: self.world > 1 or "RANK" in os.environ)

COLLECTIVE_TIMEOUT_S = 2 * 3600  # how long a rank waits for the others at a collective before the run stops

def setup_distributed(device="auto"):
    """Under torchrun (RANK set) join the process group: NCCL on CUDA, gloo on CPU. -> Dist (rank, world, device)."""
    import torch
    import torch.distributed as tdist
    cuda = torch.cuda.is_available() and device in ("auto", "cuda") or str(device).startswith("cuda")
    if "RANK" not in os.environ:
        return Dist(device=torch.device(("cuda" if cuda else "cpu") if device == "auto" else device))
    local = int(os.environ.get("LOCAL_RANK", 0))
    if cuda:  # before the group, so that NCCL's communicator is made on this rank's GPU, not on GPU 0
        torch.cuda.set_device(local)
    # ranks may wait long at a collective: rank 0 writing a 7B full fine-tune's checkpoint (~84 GB with AdamW), bench
    # ranks whose shards generate for different times; NCCL's default 10 minutes would kill the run there
    tdist.init_process_group("nccl" if cuda else "gloo", timeout=datetime.timedelta(seconds=COLLECTIVE_TIMEOUT_S))
    if not cuda:  # CPU ranks on one machine share its cores
        torch.set_num_threads(max(1, torch.get_num_threads() // int(os.environ.get("LOCAL_WORLD_SIZE", 1))))
    return Dist(tdist.get_rank(), tdist.get_world_size(), torch.device(f"cuda:{local}" if cuda else "cpu"))

def print0(*args, **kwargs):
    """print on rank 0 only (torchrun's RANK), flushed (torchrun interleaves the ranks' buffered output)."""
    print(*args, **kwargs, flush=True) if int(os.environ.get("RANK", 0)) == 0 else None

def leave_distributed():
    """End a finished worker: wait for the others (one may still write), destroy the group, exit (gloo may abort)."""
    import torch.distributed as tdist
    if tdist.is_available() and tdist.is_initialized():
        tdist.barrier()
        tdist.destroy_process_group()
    print(end="", flush=True)
    os._exit(0)

def atomic_write(path, write, mode="w"):
    """write(f) into a temporary sibling, then rename it over `path`: a kill never leaves a half-written file."""
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, mode) as f:
        write(f)
    os.replace(tmp, path)

def atomic_dir(final, write, link=None, own=()):
    """write(folder) into a sibling swapped in for `final`, then `link` pointed at it. `final` keeps its other files
    (a log, a bench report), but not those named in `own`: what `write` writes when it has them (an old run's)."""
    import shutil
    final = final.rstrip("/")
    tmp, old = final + ".tmp", final + ".old"
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.rmtree(old, ignore_errors=True) if os.path.exists(final) else None  # a killed save's half-deleted .old
    os.makedirs(tmp)
    write(tmp)
    os.replace(final, old) if os.path.exists(final) else None
    os.replace(tmp, final)
    for name in set(os.listdir(old) if os.path.isdir(old) else ()) - set(os.listdir(final)) - set(own):
        os.replace(os.path.join(old, name), os.path.join(final, name))
    shutil.rmtree(old, ignore_errors=True)
    if link:
        prev = os.path.realpath(link) if os.path.islink(link) else None
        os.symlink(os.path.basename(final), f"{link}.tmp{os.getpid()}")  # per process: no leftover blocks it
        os.replace(f"{link}.tmp{os.getpid()}", link)
        if prev and prev != os.path.realpath(final):
            shutil.rmtree(prev, ignore_errors=True)

def image_sheet(rows, path, cell=128):
    """One PNG of rows (title, [(image ref or PIL, caption), ...]) for --inspect, bench.py and grpo.py."""
    ncol = max([len(pics) for _, pics in rows] + [1])
    draw = ImageDraw.Draw(sheet := Image.new("RGB", (ncol * cell, max(1, len(rows)) * (cell + 28)), "white"))
    for r, (title, pics) in enumerate(rows):
        y = r * (cell + 28)
        draw.text((2, y + 1), str(title)[:ncol * cell // 6], fill="black")
        for c, (ref, caption) in enumerate(pics):
            sheet.paste(load_image(ref, str(title)).resize((cell, cell - 14), Image.NEAREST), (c * cell, y + 14))
            draw.text((c * cell + 2, y + cell + 1), str(caption), fill="black")
    atomic_write(path, lambda f: sheet.save(f, format="PNG"), "wb")

def load_sources(item):
    """The source image(s) of any item as RGB PIL images, errors naming the item's file and row."""
    return [load_image(s, item.origin) for s in item.sources]

# ---------------------------------------------------------------------------------- the toy world
SHAPE_COLORS = {"red": (220, 30, 30), "green": (30, 180, 30), "blue": (30, 60, 220), "yellow": (240, 220, 30),
                "magenta": (200, 40, 200), "cyan": (30, 200, 210)}
BG_COLORS = {"white": (245, 245, 245), "black": (15, 15, 15), "gray": (128, 128, 128)}
PALETTE_NAMES = list(SHAPE_COLORS) + list(BG_COLORS)
PALETTE = np.array([SHAPE_COLORS.get(n) or BG_COLORS[n] for n in PALETTE_NAMES], dtype=np.float32)
CELLS = {"top left": (0, 0), "top": (1, 0), "top right": (2, 0), "left": (0, 1), "center": (1, 1),
         "right": (2, 1), "bottom left": (0, 2), "bottom": (1, 2), "bottom right": (2, 2)}
SHAPES, EDIT_KINDS = ("circle", "square", "triangle"), ("recolor", "remove", "add", "move", "background")
NOISE_LEVELS = (0.0, 0.05, 0.095, 0.135)  # Gaussian noise std (0..1 scale) of the four degradation levels
OUTCOMES = ("correct", "partial", "overedit", "wrong", "unchanged")  # what a candidate edit does
_C, _S, _P, _B = ("(" + "|".join(words) + ")" for words in (SHAPE_COLORS, SHAPES, CELLS, BG_COLORS))  # toy words only
_INSTR = [("recolor", f"make the {_C} {_S} {_C}"), ("remove", f"remove the {_C} {_S}"),
          ("add", f"add a {_C} {_S} at the {_P}"), ("move", f"move the {_C} {_S} to the {_P}"),
          ("background", f"change the background to {_B}")]

def _shape_mask(kind, cell, size):
    """Boolean (size, size) mask of a shape drawn in one of the 3x3 cells."""
    y, x = np.mgrid[0:size, 0:size].astype(np.float32) + 0.5
    cx, cy, r = (cell[0] * 2 + 1) * size / 6, (cell[1] * 2 + 1) * size / 6, 0.13 * size
    return {"circle": lambda: (x - cx) ** 2 + (y - cy) ** 2 <= r * r,
            "square": lambda: (abs(x - cx) <= 0.85 * r) & (abs(y - cy) <= 0.85 * r),
            "triangle": lambda: (y <= cy + 0.8 * r) & (abs(x - cx) <= (y - (cy - r)) / 1.8)}[kind]()  # apex up

def render_scene(scene, size=56):
    """scene = {"bg": name, "shapes": [(kind, color, cell name)]} -> uint8 (size, size, 3)."""
    img = np.full((size, size, 3), BG_COLORS[scene["bg"]], np.uint8)
    for kind, color, cell in scene["shapes"]:
        img[_shape_mask(kind, CELLS[cell], size)] = SHAPE_COLORS[color]
    return img

def classify(img, smooth=True):
    """uint8 (H, W, 3) -> (H, W) nearest palette colour index; smooth: 3x3 median first, so noise hides no content."""
    a = np.asarray(img, dtype=np.float32)
    if smooth:
        pad, (h, w) = np.pad(a, ((1, 1), (1, 1), (0, 0)), mode="edge"), a.shape[:2]
        a = np.median(np.stack([pad[i:i + h, j:j + w] for i in range(3) for j in range(3)]), axis=0)
    return ((a[:, :, None, :] - PALETTE) ** 2).sum(-1).argmin(-1)

def parse_toy_instruction(instruction):
    """'make the red circle blue' -> ("recolor", ("red", "circle", "blue")); None if not a toy instruction."""
    return next(((k, m.groups()) for k, pat in _INSTR if (m := re.fullmatch(pat, instruction.strip().lower()))), None)

def toy_target(source, instruction):
    """The correct edit of `source` as pixels, worked out from the source pixels and the instruction alone."""
    src = np.asarray(source, dtype=np.uint8)
    cls, size = classify(src, smooth=False), src.shape[0]  # sources are clean renders: keep every pixel
    bg = np.bincount(np.concatenate([cls[0], cls[-1], cls[:, 0], cls[:, -1]])).argmax()  # border = background
    (kind, args), out = parse_toy_instruction(instruction), PALETTE[cls].astype(np.uint8)
    if kind in ("recolor", "remove", "move"):  # args: colour, shape, then a new colour or cell
        out[cls == PALETTE_NAMES.index(args[0])] = SHAPE_COLORS[args[2]] if kind == "recolor" else PALETTE[bg]
    if kind in ("add", "move"):
        out[_shape_mask(args[1], CELLS[args[2]], size)] = SHAPE_COLORS[args[0]]
    if kind == "background":
        out[cls == bg] = BG_COLORS[args[0]]
    return out

def toy_oracle(source, instruction, edited):
    """Ground-truth scores in [0, 1] of an edit, from pixels (PIL or uint8 arrays of any equal-aspect size).
    instruction_following = correct changed pixels / |pixels that should change  U  pixels that did change|
      (an unchanged image or a wrong edit scores 0, an edit that also changes other things is penalised);
    visual_quality = 1 - mean distance of each pixel to its nearest palette colour / 0.2 (noise, blur);
    overall = their mean; and instruction following's two parts, "change" and "keep". A list of edits: a list."""
    src = np.asarray(source, dtype=np.uint8)
    cs, ct = classify(src), classify(toy_target(src, instruction))
    should, out, edits = ct != cs, [], edited if isinstance(edited, list) else [edited]
    for ed in edits:
        ed = ed if isinstance(ed, Image.Image) else Image.fromarray(np.asarray(ed, dtype=np.uint8))
        ed = np.asarray(ed.convert("RGB").resize(src.shape[1::-1], Image.BILINEAR), dtype=np.float32)
        did = (ce := classify(ed)) != cs
        correct, union = (should & (ce == ct)).sum(), (should | did).sum()
        dist = np.sqrt(((ed[:, :, None, :] - PALETTE) ** 2).sum(-1).min(-1)) / 255.0
        f, q = float(correct / max(union, 1)), float(np.clip(1.0 - dist.mean() / 0.2, 0.0, 1.0))
        out.append({"instruction_following": f, "visual_quality": q, "change": float(correct / max(should.sum(), 1)),
                    "keep": float(1.0 - (did & ~should).sum() / max(union, 1)), "overall": (f + q) / 2})
    return out if edits is edited else out[0]

def toy_level(x):
    """A 0..1 score -> a 1..4 rating, the scale of EditReward-Data's human scores."""
    return 1 + (x >= 0.2) + (x >= 0.45) + (x >= 0.8)

def toy_cot_response(instruction, scores):
    """A teacher's chain of thought for verifier SFT: a 1..4 verdict per principle, then a JSON score, round(10 *
    instruction following), blind to the quality the human-like pair labels weigh (the gap GCPO closes in Edit-R1)."""
    kind = (parse_toy_instruction(instruction) or ("edit",))[0]
    f, k, q = (int(toy_level(scores[d])) for d in ("change", "keep", "visual_quality"))
    return (f"{kind}: follow {f}/4; keep {k}/4; quality {q}/4\n"
            f'{{"follow": {f}, "keep": {k}, "quality": {q}, "score": {round(10 * scores["instruction_following"])}}}')

def _random_scene(rng):
    cells = rng.sample(list(CELLS), rng.randint(1, 3))
    colors = rng.sample(list(SHAPE_COLORS), len(cells))
    return {"bg": rng.choice(list(BG_COLORS)), "shapes": [(rng.choice(SHAPES), c, p) for c, p in zip(colors, cells)]}

def _random_instruction(rng, scene, kind=None):
    """A valid instruction for the scene (unique colours, free cells), optionally of a given kind."""
    free_cells = [p for p in CELLS if p not in {p for _, _, p in scene["shapes"]}]
    new_colors = [c for c in SHAPE_COLORS if c not in {c for _, c, _ in scene["shapes"]}]
    kinds = [k for k in EDIT_KINDS if k not in ("add", "move") or free_cells and new_colors]
    kind = kind if kind in kinds else rng.choice(kinds)
    form, color, _ = rng.choice(scene["shapes"])
    return {"recolor": lambda: f"make the {color} {form} {rng.choice(new_colors)}",  # only the one asked for draws
            "remove": lambda: f"remove the {color} {form}",
            "add": lambda: f"add a {rng.choice(new_colors)} {rng.choice(SHAPES)} at the {rng.choice(free_cells)}",
            "move": lambda: f"move the {color} {form} to the {rng.choice(free_cells)}",
            "background": lambda: "change the background to " + rng.choice([b for b in BG_COLORS if b != scene["bg"]])
            }[kind]()

def toy_candidate(rng, scene, instruction, outcome, noise_level, size):
    """One candidate edit: what it does (outcome) x its noise level, drawn apart, so content does not tell quality."""
    src = render_scene(scene, size)
    if outcome == "unchanged":
        img = src.copy()
    elif outcome == "wrong":  # another valid edit of the same kind: right idea, wrong execution
        tries = (_random_instruction(rng, scene, parse_toy_instruction(instruction)[0]) for _ in range(20))
        other = next((x for x in tries if x != instruction), instruction)
        img = toy_target(src, other) if other != instruction else src.copy()
    else:
        img = toy_target(src, instruction)
        if outcome == "partial":  # only the upper part of the requested change is done
            changed = np.argwhere((img != src).any(-1))
            cut = np.median(changed[:, 0]) if len(changed) else 0
            img = np.where((np.arange(size) > cut)[:, None, None], src, img)
        elif outcome == "overedit":  # the edit plus an unrequested one
            img = toy_target(img, _random_instruction(rng, scene, rng.choice(["recolor", "background"])))
    sigma = NOISE_LEVELS[noise_level] * 255.0
    noise = np.random.default_rng(rng.getrandbits(32)).normal(0.0, sigma, img.shape) if sigma else 0.0
    return np.clip(img.astype(np.float32) + noise, 0, 255).round().astype(np.uint8)

def _save(out, name, content):
    """Write an image array as images/<name>.png (-> that path) or rows as the JSONL file out/<name> (-> its path)."""
    if isinstance(content, np.ndarray):
        rel = f"images/{name}.png"
        atomic_write(os.path.join(out, rel), lambda f: Image.fromarray(content).save(f, "PNG"), "wb")
        return rel
    atomic_write(os.path.join(out, name), lambda f: f.writelines(json.dumps(r) + "\n" for r in content))
    return os.path.join(out, name)

def _toy_group(rng, gid, k, size, out):
    """k candidates of outcome x noise level drawn independently, rated 1..4 per dimension from the oracle (+ sum)."""
    scene = _random_scene(rng)
    instruction, src, outcomes, cands = _random_instruction(rng, scene), render_scene(scene, size), [], []
    for _ in range(k):
        outcomes.append(rng.choice(OUTCOMES))
        cands.append(toy_candidate(rng, scene, instruction, outcomes[-1], rng.randrange(4), size))
    oracle = toy_oracle(src, instruction, cands)
    human = [{**h, "overall": sum(h.values())} for h in ({d: int(toy_level(s[d])) for d in DIMS} for s in oracle)]
    return {"id": gid, "instruction": instruction, "source": _save(out, gid + "_src", src),
            "candidates": [_save(out, f"{gid}_c{j}", c) for j, c in enumerate(cands)],
            "ranks": [sorted({-h["overall"] for h in human}).index(-h["overall"]) for h in human],  # equal: a tie
            "category": parse_toy_instruction(instruction)[0], "scores": human, "outcomes": outcomes, "oracle": oracle}

def _toy_pairs(groups):
    cols = ("id", "instruction", "preferred", "rejected", "prefs", "tie", "category", "scores")
    return [{**{c: getattr(p, c) for c in cols}, "source": g["source"], "outcomes": p.meta["outcomes"]} for g in groups
            for p in CandidateGroup(g["id"], g["instruction"], [g["source"]], g["candidates"], g["ranks"],
                                    g["category"], g["scores"], meta={"outcomes": g["outcomes"]}).to_pairs()]

def _toy_prompt(rng, pid, size, out, editor_wrong=None):
    """An RL prompt; with editor_wrong, an editor warm-up triple whose target is, that often, another edit."""
    instruction = _random_instruction(rng, scene := _random_scene(rng))
    row = {"id": pid, "instruction": instruction, "source": _save(out, pid + "_src", render_scene(scene, size)),
           "category": parse_toy_instruction(instruction)[0]}
    if editor_wrong is not None:
        correct = rng.random() >= editor_wrong
        tgt = toy_candidate(rng, scene, instruction, "correct" if correct else "wrong", 0, size)
        row.update(target=_save(out, pid + "_tgt", tgt), correct=correct)
    return row

def make_toy(out, seed=0, size=56, n_train=2400, n_val=120, n_rl=200, n_rl_test=48, n_editor=1000, k=4,
             editor_wrong=0.65):
    """Write the toy world as the project's JSONL files under `out` -> {name: path}. The last quarter of the training
    groups is kept apart for GCPO, which needs far fewer pairs than SFT."""
    rng, ids = random.Random(seed), [f"train{i:05d}" for i in range(n_train)] + [f"val{i:05d}" for i in range(n_val)]
    os.makedirs(os.path.join(out, "images"), exist_ok=True)
    groups = [_toy_group(rng, gid, k, size, out) for gid in tqdm(ids, "toy candidate groups", disable=len(ids) < 500)]
    sft, gcpo, val = groups[:n_train - n_train // 4], groups[n_train - n_train // 4:n_train], groups[n_train:]
    files = {"bench.jsonl": [{key: v for key, v in g.items() if key != "oracle"} for g in val],
             "pairs_train.jsonl": _toy_pairs(sft), "gcpo_train.jsonl": [r for r in _toy_pairs(gcpo) if not r["tie"]],
             "pairs_val.jsonl": _toy_pairs(val),
             "cot_train.jsonl": [{"id": f"{g['id']}_c{j}", "instruction": g["instruction"], "source": g["source"],
                                  "edited": g["candidates"][j], "response": toy_cot_response(g["instruction"], o),
                                  "scores": g["scores"][j]} for g in sft for j, o in enumerate(g["oracle"])],
             "rl_train.jsonl": [_toy_prompt(rng, f"rl{i:05d}", size, out) for i in range(n_rl)],
             "rl_test.jsonl": [_toy_prompt(rng, f"rltest{i:05d}", size, out) for i in range(n_rl_test)],
             "editor_train.jsonl": [_toy_prompt(rng, f"ed{i:05d}", size, out, editor_wrong) for i in range(n_editor)]}
    _save(out, "toy.json", [dict(seed=seed, size=size, n_train=n_train, n_val=n_val, k=k, editor_wrong=editor_wrong)])
    return {name: _save(out, name, rows) for name, rows in files.items()}

# ---------------------------------------------------------------------------------- looking at data
def inspect(path, fmt="auto", split=None, config=None, skip_bad=False, sheet=None, rows=6):
    """Print counts and tie shares of any source and draw its first rows; skip_bad skips rows with bad images too."""
    items = load_items(path, fmt, split, config, skip_bad, check_images=skip_bad)
    kinds = [type(it).__name__ for it in items]
    print(f"{path}: {len(items)} rows " + ", ".join(f"{kinds.count(k)} {k}" for k in dict.fromkeys(kinds)) +
          (f" | skipped {len(items.skipped)} bad row(s), listed above" if items.skipped else ""))
    pairs = [p for it in items for p in (it.to_pairs() if isinstance(it, CandidateGroup) else [it])
             if isinstance(p, PreferencePair)]
    if pairs:
        ties, dims = sum(p.tie for p in pairs), sorted({d for p in pairs for d in p.prefs})
        print(f"pairs: {len(pairs)} | tied overall {ties} ({ties / len(pairs):.1%}) | dimensions {', '.join(dims)}")
    sheet = sheet or os.path.splitext(os.path.basename(path.rstrip("/")))[0].replace("/", "_") + "_sheet.png"
    image_sheet([(it.instruction, _image_refs(it)) for it in items[:rows]], sheet)
    print(f"contact sheet: {sheet}")

if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    # --- the toy world (image size, group size and editor noise are make_toy arguments)
    ap.add_argument("--toy", action="store_true", help="write the procedural toy world to --out")
    ap.add_argument("--out", default="data/toy", help="output folder for --toy")
    ap.add_argument("--seed", type=int, default=0, help="toy world seed (same seed, same files)")
    ap.add_argument("--n_train", type=int, default=2400, help="training candidate groups (a quarter goes to GCPO)")
    ap.add_argument("--n_val", type=int, default=120, help="held-out candidate groups (the toy benchmark)")
    ap.add_argument("--n_rl", type=int, default=200, help="RL training prompts")
    ap.add_argument("--n_rl_test", type=int, default=48, help="held-out RL prompts")
    ap.add_argument("--n_editor", type=int, default=1000, help="editor warm-up triples")
    # --- inspecting any source (the format is told from its columns; the sheet goes to ./<name>_sheet.png)
    ap.add_argument("--inspect", default=None, help="file, folder or hub name to summarise")
    ap.add_argument("--split", default=None, help="split of a folder / hub dataset")
    ap.add_argument("--config", default=None, help="config of a hub dataset (e.g. 2pair)")
    ap.add_argument("--skip_bad", action="store_true", help="skip bad rows and images (reported) instead of stopping")
    args = ap.parse_args()
    ap.error("toy world sizes must be >= 0") if min(v for k, v in vars(args).items() if k[:2] == "n_") < 0 else None
    if args.toy:
        make_toy(args.out, args.seed, **{k: v for k, v in vars(args).items() if k.startswith("n_")})
        print(f"toy world written to {args.out}")
    elif args.inspect:
        try:
            inspect(args.inspect, split=args.split, config=args.config, skip_bad=args.skip_bad)
        except DataError as e:
            sys.exit(f"error: {e}")
    else:
        ap.print_help()
