"""
data.py: every data format nanoEditRL reads, tie-disentanglement, and a procedural toy editing world.

Three things move through the project, each a plain dataclass:
  PreferencePair  one instruction, source image(s), a preferred and a rejected edit, and the preference in
                  every dimension (+1 preferred better, -1 rejected better, 0 tie)   -> rewardmodel.py, bench.py
  CandidateGroup  one instruction, source image(s), K candidate edits and their ranking with ties -> bench.py
  EditPrompt      one instruction and source image(s) (optionally a target edit) for the editor -> grpo.py
plus CotTrace (source, instruction, edited, written response) for the verifier's SFT cold start.

Supported formats (REFERENCE.md section 5), picked from the columns of the first row (or --fmt):
  editreward_json  EditReward training JSON: prompt, path_src, path1 (preferred), path2, model{1,2}_dim{1,2}_score
  editreward_data  EditReward-Data parquet: instruction, source_img, left/right_output_image, left/right_*_score
  editscore_bench  EditScore/EditReward-Bench: key, instruction, input_image, output_images (0 = preferred), dimension
  tiger_bench      TIGER-Lab/EditReward-Bench 2/3/4pair: source_image, candidate_1..K, ranking ("A>B=C")
  genai_bench      GenAI-Bench image_edition: instruct_prompt, source_image, left/right_output_image, vote_type
  editscore_rl     EditScore-RL-Data jsonl: instruction, input_images (list of paths), task_type
  gedit            GEdit-Bench: key, task_type, instruction, instruction_language, input_image
  jsonl            the project's own JSONL, one object per line; image fields are paths relative to the file:
                     pair:   {"id", "instruction", "source": path | [paths], "preferred", "rejected",
                              "prefs": {"instruction_following": 1, "visual_quality": -1, "overall": 0}, "category"}
                     group:  {"id", "instruction", "source", "candidates": [paths], "ranking": "A>B=C", "category"}
                     (+ optional "outcomes": what each candidate is, for bench.py's breakdown)
                     trace:  {"id", "instruction", "source", "edited", "response"}
                     prompt: {"id", "instruction", "source", "category"} (+ "target" for editor training)
A path can be a .jsonl / .json / .parquet file, a local folder, or a hub dataset name (via `datasets`).
Images are kept lazy (a path or embedded bytes) until load_image() decodes them.

The toy world draws shapes on a plain background at 56 px and edits them ("make the red circle blue",
"remove ...", "add ...", "move ...", "change the background to ..."). toy_oracle() scores any edit from
pixels alone, so it labels the data and later tells whether RL really improved the editor. Candidates are
made factorially (what the edit does x how noisy the image is) so that quality cannot be guessed from content.
Instruction twins (--n_twins, pairs_twins.jsonl) rank the same two edits under two instructions, each way round.

  python data.py --toy --out data/toy                 # write the toy world (~1 min, a progress bar)
  python data.py --inspect data/toy/bench.jsonl       # counts, ties, dimensions + a contact sheet PNG
  python data.py --inspect TIGER-Lab/EditReward-Bench --config 2pair --split train
"""
import argparse
import dataclasses
import hashlib
import io
import json
import os
import random
import re
import sys
from dataclasses import dataclass, field

import numpy as np
from PIL import Image, ImageDraw, ImageFile, ImageOps

DIMS = ("instruction_following", "visual_quality")  # the default reward dimensions
FORMATS = ("editreward_json", "editreward_data", "editscore_bench", "tiger_bench", "genai_bench",
           "editscore_rl", "gedit", "jsonl")


class DataError(ValueError):
    """Bad input. The message always names the file and the row."""


# ----------------------------------------------------------------------------------------------------------
# the three things the project moves around

@dataclass
class PreferencePair:
    id: str
    instruction: str
    sources: list          # source image(s): PIL.Image | path | bytes
    preferred: object      # image ref
    rejected: object       # image ref
    prefs: dict            # dim -> +1 (preferred better) | -1 (rejected better) | 0 (tie); "overall" included
    tie: bool = False      # tied overall: then preferred/rejected is only an order, not a preference
    category: str = ""
    scores: dict = None    # raw human scores {"preferred": {dim: x}, "rejected": {dim: x}} when known
    origin: str = ""       # "file:row", for error messages
    meta: dict = field(default_factory=dict)  # e.g. "outcomes": {"preferred": "correct", "rejected": "wrong"} (toy)


@dataclass
class CandidateGroup:
    id: str
    instruction: str
    sources: list
    candidates: list       # K image refs
    ranks: list            # K ints, 0 = best, equal ranks = tie
    category: str = ""
    scores: list = None    # per-candidate {dim: x} when known
    origin: str = ""
    meta: dict = field(default_factory=dict)  # e.g. "outcomes": what each candidate is, K strings (toy)

    def to_pairs(self):
        """All K(K-1)/2 pairs, the better candidate first; tied candidates give tie pairs."""
        pairs = []
        for i in range(len(self.candidates)):
            for j in range(i + 1, len(self.candidates)):
                a, b = (i, j) if self.ranks[i] <= self.ranks[j] else (j, i)
                tie = self.ranks[a] == self.ranks[b]
                prefs = {"overall": 0 if tie else 1}
                scores = None
                if self.scores:
                    scores = {"preferred": self.scores[a], "rejected": self.scores[b]}
                    for d in self.scores[a]:
                        if d != "overall":
                            prefs[d] = _sign(self.scores[a][d] - self.scores[b][d])
                meta = dict(self.meta)
                if "outcomes" in meta:  # per candidate -> this pair's two
                    meta["outcomes"] = {"preferred": meta["outcomes"][a], "rejected": meta["outcomes"][b]}
                pairs.append(PreferencePair(f"{self.id}:{a}-{b}", self.instruction, self.sources,
                                            self.candidates[a], self.candidates[b], prefs, tie,
                                            self.category, scores, self.origin, meta))
        return pairs


@dataclass
class EditPrompt:
    id: str
    instruction: str
    sources: list
    category: str = ""
    target: object = None  # a reference edit (editor warm-up data); None for RL prompts
    origin: str = ""
    meta: dict = field(default_factory=dict)


@dataclass
class CotTrace:
    id: str
    instruction: str
    sources: list
    edited: object
    response: str
    scores: dict = None
    origin: str = ""


class Loaded(list):
    """A list of items that also remembers which rows were skipped (origin, reason) under skip_bad."""
    skipped: list = ()


def _sign(x):
    return (x > 0) - (x < 0)


# ----------------------------------------------------------------------------------------------------------
# images

ImageFile.LOAD_TRUNCATED_IMAGES = False  # a truncated file is an error, never a half-grey image


def to_rgb(img):
    """Any PIL image -> 8-bit RGB: EXIF orientation applied, alpha composited on white, CMYK/palette/16-bit
    converted by value (16-bit greyscale is scaled, not clipped as PIL's convert would)."""
    img = ImageOps.exif_transpose(img)
    if img.mode in ("I;16", "I;16B", "I;16L", "I"):
        a = np.asarray(img, dtype=np.float64)
        top = 65535.0 if img.mode.startswith("I;16") or a.max() > 255 else 255.0
        img = Image.fromarray(np.clip(a / top * 255.0 + 0.5, 0, 255).astype(np.uint8), "L")
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "PA"):
        img = img.convert("RGBA")
        bg = Image.new("RGBA", img.size, (255, 255, 255, 255))
        img = Image.alpha_composite(bg, img)
    return img.convert("RGB")


def load_image(ref, origin=""):
    """Decode an image reference (PIL image, path, bytes, or a `datasets` {"bytes", "path"} dict) to RGB."""
    try:
        if isinstance(ref, Image.Image):
            return to_rgb(ref)
        if isinstance(ref, dict):
            ref = ref.get("bytes") or ref.get("path")
        if isinstance(ref, (bytes, bytearray)):
            img = Image.open(io.BytesIO(ref))
        elif isinstance(ref, str):
            if not os.path.exists(ref):
                raise DataError(f"{origin}: image file not found: {ref}")
            img = Image.open(ref)
        else:
            raise DataError(f"{origin}: not an image reference: {type(ref).__name__}")
        img.load()
        return to_rgb(img)
    except DataError:
        raise
    except Exception as e:  # PIL raises OSError, SyntaxError, ValueError... for corrupt files
        raise DataError(f"{origin}: cannot decode image {ref if isinstance(ref, str) else '<bytes>'}: {e}") from e


def fit_pixels(img, max_pixels, min_pixels=0, multiple=28):
    """Resize keeping the aspect ratio so that min_pixels <= h*w <= max_pixels, both sides a multiple of
    `multiple` (a VLM's patch size x merge size)."""
    w, h = img.size
    scale = 1.0
    if w * h > max_pixels:
        scale = (max_pixels / (w * h)) ** 0.5
    elif w * h < min_pixels:
        scale = (min_pixels / (w * h)) ** 0.5
    nw = max(multiple, int(round(w * scale / multiple)) * multiple)
    nh = max(multiple, int(round(h * scale / multiple)) * multiple)
    while nw * nh > max_pixels and max(nw, nh) > multiple:  # rounding up may overshoot the budget
        if nw >= nh:
            nw -= multiple
        else:
            nh -= multiple
    return img if (nw, nh) == (w, h) else img.resize((nw, nh), Image.BICUBIC)


# ----------------------------------------------------------------------------------------------------------
# reading rows from files, folders and the hub

def _rows(path, split=None, config=None):
    """Yield (origin, row) from a .jsonl / .json / .parquet file, a local folder or a hub dataset.
    A malformed line is yielded as a DataError in place of the row, so the caller can skip or stop."""
    if os.path.isfile(path) and path.endswith((".jsonl", ".json")):
        with open(path, encoding="utf-8") as f:
            text = f.read()
        if path.endswith(".json") and text.lstrip().startswith("["):
            try:
                rows = json.loads(text)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}: not valid JSON: {e}") from e
            for i, row in enumerate(rows):
                yield f"{path}:{i}", row
            return
        for i, line in enumerate(text.splitlines(), start=1):  # jsonl rows are numbered like the lines
            if not line.strip():
                continue
            try:
                yield f"{path}:{i}", json.loads(line)
            except json.JSONDecodeError as e:
                yield f"{path}:{i}", DataError(f"{path}:{i}: malformed JSON line: {e}")
        return
    if not (os.path.exists(path) or re.fullmatch(r"[\w.-]+/[\w.-]+", path)):
        raise DataError(f"{path}: no such file, folder or hub dataset name")
    import datasets  # parquet, folders and hub names all go through `datasets`
    if os.path.isfile(path):
        ds = datasets.load_dataset("parquet", data_files=path, split="train")
    else:
        ds = datasets.load_dataset(path, config, split=split or "train")
    for name, feat in ds.features.items():  # keep embedded images as bytes: decode lazily, with a row number
        if isinstance(feat, datasets.Image):
            ds = ds.cast_column(name, datasets.Image(decode=False))
        elif isinstance(feat, (datasets.List, datasets.Sequence)) and isinstance(feat.feature, datasets.Image):
            ds = ds.cast_column(name, datasets.List(datasets.Image(decode=False)))
    where = path if config is None else f"{path}[{config}]"
    for i, row in enumerate(ds):
        yield f"{where}:{i}", row


def _base_dir(path):
    return os.path.dirname(os.path.abspath(path)) if os.path.isfile(path) else os.path.abspath(path)


class _Rowctx:
    """Column access for one row with errors that name the file and the row."""

    def __init__(self, row, origin, base):
        self.row, self.origin, self.base = row, origin, base

    def get(self, col, default=None):
        return self.row.get(col, default)

    def req(self, col):
        if col not in self.row or self.row[col] is None:
            raise DataError(f"{self.origin}: missing column '{col}'")
        return self.row[col]

    def text(self, col):
        v = self.req(col)
        if not isinstance(v, str) or not v.strip():
            raise DataError(f"{self.origin}: column '{col}' must be a non-empty string, got {v!r}")
        return v.strip()

    def num(self, col):
        v = self.req(col)
        try:
            return float(v)
        except (TypeError, ValueError):
            raise DataError(f"{self.origin}: column '{col}' must be a number, got {v!r}") from None

    def image(self, col, value=None):
        """An image reference from a column: a path (relative to the manifest), embedded bytes or PIL."""
        v = self.req(col) if value is None else value
        if isinstance(v, dict):
            v = v.get("bytes") or v.get("path")
        if isinstance(v, str) and v:
            return v if os.path.isabs(v) else os.path.join(self.base, v)
        if isinstance(v, (bytes, bytearray, Image.Image)):
            return v
        raise DataError(f"{self.origin}: column '{col}' holds no image (got {type(v).__name__})")

    def images(self, col):
        v = self.req(col)
        vs = v if isinstance(v, (list, tuple)) else [v]
        if not vs:
            raise DataError(f"{self.origin}: column '{col}' is an empty list of images")
        return [self.image(col, x) for x in vs]


def check_image(ref, origin):
    """Cheap validity check of an image reference (exists, header + chunk checksums) without decoding."""
    if isinstance(ref, Image.Image):
        return
    try:
        if isinstance(ref, str) and not os.path.exists(ref):
            raise DataError(f"{origin}: image file not found: {ref}")
        with Image.open(ref if isinstance(ref, str) else io.BytesIO(ref)) as img:
            img.verify()
    except DataError:
        raise
    except Exception as e:
        raise DataError(f"{origin}: corrupt image {ref if isinstance(ref, str) else '<bytes>'}: {e}") from e


# ----------------------------------------------------------------------------------------------------------
# one parser per format: (row context, row index) -> PreferencePair | CandidateGroup | EditPrompt | CotTrace

def _oriented_pair(c, id, instruction, sources, a, b, sa, sb, category, meta):
    """A pair from two scored images, the higher overall score first; per-dimension prefs from the scores."""
    if sb["overall"] > sa["overall"]:
        a, b, sa, sb = b, a, sb, sa
    prefs = {d: _sign(sa[d] - sb[d]) for d in sa}
    return PreferencePair(id, instruction, sources, a, b, prefs, prefs["overall"] == 0, category,
                          {"preferred": sa, "rejected": sb}, c.origin, meta)


def _parse_editreward_json(c, i):
    # EditReward's dim1 is instruction following and dim2 visual quality; path1 is the preferred image
    s = [{"instruction_following": c.num(f"model{k}_dim1_score"), "visual_quality": c.num(f"model{k}_dim2_score"),
          "overall": c.num(f"model{k}_overall_score")} for k in (1, 2)]
    p = _oriented_pair(c, str(c.get("id", i)), c.text("prompt"), [c.image("path_src")], c.image("path1"),
                       c.image("path2"), s[0], s[1], c.get("category", ""), {"confidence": c.get("confidence")})
    if c.get("tie_case"):  # the annotators called it a tie even if the summed scores differ
        p.tie, p.prefs["overall"] = True, 0
    return p


def _parse_editreward_data(c, i):
    # quality_aesthetic is what the rest of the project calls visual_quality
    s = [{"instruction_following": c.num(f"{side}_instruction_following_score"),
          "visual_quality": c.num(f"{side}_quality_aesthetic_score"), "overall": c.num(f"{side}_overall_score")}
         for side in ("left", "right")]
    return _oriented_pair(c, str(c.get("id", i)), c.text("instruction"), [c.image("source_img")],
                          c.image("left_output_image"), c.image("right_output_image"), s[0], s[1], "",
                          {"vote_type": c.get("vote_type")})


def _parse_editscore_bench(c, i):
    outs = c.images("output_images")
    if len(outs) != 2:
        raise DataError(f"{c.origin}: 'output_images' must hold 2 images, got {len(outs)}")
    key = c.req("key")
    dim = c.text("dimension")
    id = "~".join(map(str, key)) if isinstance(key, (list, tuple)) else str(key)
    return PreferencePair(f"{id}~{dim}", c.text("instruction"), c.images("input_image"), outs[0], outs[1],
                          {dim: 1}, False, c.text("task_type"), None, c.origin, {"dimension": dim})


def _parse_genai_bench(c, i):
    vote = c.text("vote_type")
    left, right = c.image("left_output_image"), c.image("right_output_image")
    if vote not in ("leftvote", "rightvote", "tie", "bothbad_vote"):
        raise DataError(f"{c.origin}: unknown vote_type {vote!r}")
    a, b = (right, left) if vote == "rightvote" else (left, right)
    tie = vote in ("tie", "bothbad_vote")
    models = (c.get("left_model"), c.get("right_model"))
    return PreferencePair(str(c.get("id", i)), c.text("instruct_prompt"), [c.image("source_image")], a, b,
                          {"overall": 0 if tie else 1}, tie, "", None, c.origin,
                          {"vote_type": vote, "models": models[::-1] if vote == "rightvote" else models})


def parse_ranking(ranking, k, origin=""):
    """Ranking text -> ranks (0 = best). Accepts a chain "A>B=C", pairwise relations "A>B, B=C" (or a list of
    them) and "<". Every pair of candidates must end up ordered or tied; a cycle is an error."""
    text = ",".join(ranking) if isinstance(ranking, (list, tuple)) else str(ranking)
    parent = list(range(k))  # union-find over "=" so tied candidates share one node

    def find(x):
        while parent[x] != x:
            x = parent[x]
        return x
    better, seen = [], set()
    for chain in re.split(r"[,;\s]+", text.strip()):
        if not chain:
            continue
        toks = re.split(r"([<>=])", chain.upper())
        names, ops = toks[0::2], toks[1::2]
        if any(len(n) != 1 or not ("A" <= n < chr(ord("A") + k)) for n in names):
            raise DataError(f"{origin}: bad ranking {ranking!r} for {k} candidates")
        idx = [ord(n) - ord("A") for n in names]
        seen.update(idx)
        for x, op, y in zip(idx, ops, idx[1:]):
            if op == "=":
                parent[find(x)] = find(y)
            else:
                better.append((x, y) if op == ">" else (y, x))
    if len(seen) != k:
        raise DataError(f"{origin}: ranking {ranking!r} does not mention all {k} candidates")
    nodes = sorted({find(x) for x in range(k)})
    edges = {(find(a), find(b)) for a, b in better}
    if any(a == b for a, b in edges):
        raise DataError(f"{origin}: ranking {ranking!r} contradicts itself")
    level, remaining, depth = {}, set(nodes), 0
    while remaining:  # peel off the nodes nothing remaining beats: one level per round
        top = {n for n in remaining if not any(a in remaining and b == n for a, b in edges)}
        if not top:
            raise DataError(f"{origin}: ranking {ranking!r} has a cycle")
        if len(top) > 1:
            raise DataError(f"{origin}: ranking {ranking!r} leaves some candidates unordered")
        level.update({n: depth for n in top})
        remaining -= top
        depth += 1
    return [level[find(x)] for x in range(k)]


def _parse_tiger_bench(c, i):
    cands, k = [], 1
    while c.get(f"candidate_{k}") is not None:
        cands.append(c.image(f"candidate_{k}"))
        k += 1
    if len(cands) < 2:
        raise DataError(f"{c.origin}: needs columns candidate_1, candidate_2, ...")
    ranks = parse_ranking(c.req("ranking"), len(cands), c.origin)
    return CandidateGroup(str(c.get("id", i)), c.text("instruction"), [c.image("source_image")], cands, ranks,
                          str(c.get("dataset") or ""), None, c.origin,
                          {"comparison_type": c.get("comparison_type"), "dataset": c.get("dataset")})


def _parse_editscore_rl(c, i):
    return EditPrompt(str(c.get("id", i)), c.text("instruction"), c.images("input_images"),
                      str(c.get("task_type") or ""), None, c.origin)


def _parse_gedit(c, i):
    return EditPrompt(str(c.get("key", i)), c.text("instruction"), c.images("input_image"),
                      str(c.get("task_type") or ""), None, c.origin,
                      {"instruction_language": c.get("instruction_language")})


def _outcomes(c, k=None):
    """The optional "outcomes" column (what each candidate is, e.g. the toy's correct / wrong; bench.py breaks its
    accuracy down by them) as meta: K strings for a group of K, {"preferred": s, "rejected": s} for a pair."""
    v = c.get("outcomes")
    if v is None:
        return {}
    ok = (isinstance(v, list) and len(v) == k) if k else (isinstance(v, dict) and set(v) == {"preferred", "rejected"})
    if not ok or not all(isinstance(x, str) for x in (v if k else v.values())):
        want = f"a list of {k} strings" if k else '{"preferred": str, "rejected": str}'
        raise DataError(f"{c.origin}: 'outcomes' must be {want}, got {v!r}")
    return {"outcomes": v}


def _parse_jsonl(c, i):
    id, instruction, cat = str(c.get("id", i)), c.text("instruction"), str(c.get("category") or "")
    sources = c.images("source")
    if "candidates" in c.row:
        cands = c.images("candidates")
        ranks = c.get("ranks")
        if ranks is None:
            ranks = parse_ranking(c.req("ranking"), len(cands), c.origin)
        if len(ranks) != len(cands):
            raise DataError(f"{c.origin}: {len(ranks)} ranks for {len(cands)} candidates")
        return CandidateGroup(id, instruction, sources, cands, [int(r) for r in ranks], cat, c.get("scores"),
                              c.origin, _outcomes(c, len(cands)))
    if "preferred" in c.row or "rejected" in c.row:
        prefs = c.get("prefs") or {"overall": 1}
        if not isinstance(prefs, dict) or any(v not in (-1, 0, 1) for v in prefs.values()):
            raise DataError(f"{c.origin}: 'prefs' must map dimensions to -1, 0 or 1, got {prefs!r}")
        tie = bool(c.get("tie", prefs.get("overall", 1) == 0))
        return PreferencePair(id, instruction, sources, c.image("preferred"), c.image("rejected"), dict(prefs),
                              tie, cat, c.get("scores"), c.origin, _outcomes(c))
    if "response" in c.row:
        return CotTrace(id, instruction, sources, c.image("edited"), c.text("response"), c.get("scores"), c.origin)
    target = c.image("target") if c.get("target") else None
    return EditPrompt(id, instruction, sources, cat, target, c.origin, {"correct": c.get("correct")})


PARSERS = {"editreward_json": _parse_editreward_json, "editreward_data": _parse_editreward_data,
           "editscore_bench": _parse_editscore_bench, "tiger_bench": _parse_tiger_bench,
           "genai_bench": _parse_genai_bench, "editscore_rl": _parse_editscore_rl, "gedit": _parse_gedit,
           "jsonl": _parse_jsonl}


def detect_format(row):
    keys = set(row)
    rules = [("editreward_json", {"path1", "path2", "path_src"}), ("editreward_data", {"left_output_image", "source_img"}),
             ("genai_bench", {"left_output_image", "instruct_prompt"}), ("editscore_bench", {"output_images", "dimension"}),
             ("tiger_bench", {"candidate_1", "ranking"}), ("editscore_rl", {"input_images"}),
             ("gedit", {"input_image", "instruction"}), ("jsonl", {"source", "instruction"})]
    return next((name for name, cols in rules if cols <= keys), None)


def _image_refs(item):
    if isinstance(item, PreferencePair):
        return item.sources + [item.preferred, item.rejected]
    if isinstance(item, CandidateGroup):
        return item.sources + item.candidates
    if isinstance(item, CotTrace):
        return item.sources + [item.edited]
    return item.sources + ([item.target] if item.target is not None else [])


def load_items(path, fmt="auto", split=None, config=None, skip_bad=False, check_images=True):
    """Parse every row of `path` into dataclasses. A bad row (malformed line, missing column, empty
    instruction, missing or corrupt image) raises DataError naming the file and the row, or with skip_bad
    is skipped, counted and reported at the end; it is never dropped silently."""
    if fmt != "auto" and fmt not in PARSERS:
        raise DataError(f"{path}: unknown format {fmt!r}; choose from {', '.join(FORMATS)}")
    out, skipped, checked, base = Loaded(), [], set(), _base_dir(path)
    for i, (origin, row) in enumerate(_rows(path, split, config)):
        try:
            if isinstance(row, Exception):
                raise row
            if not isinstance(row, dict):
                raise DataError(f"{origin}: a row must be an object, got {type(row).__name__}")
            if fmt == "auto":  # the first good row fixes the format, so later rows get 'missing column' errors
                fmt = detect_format(row) or "auto"
                if fmt == "auto":
                    raise DataError(f"{origin}: cannot tell the format from the columns {sorted(row)}")
            item = PARSERS[fmt](_Rowctx(row, origin, base), i)
            if check_images:
                for ref in _image_refs(item):
                    if not (isinstance(ref, str) and ref in checked):
                        check_image(ref, origin)
                        if isinstance(ref, str):
                            checked.add(ref)
            out.append(item)
        except DataError as e:
            if not skip_bad:
                raise
            skipped.append((origin, str(e)))
    out.skipped = skipped
    if skipped:
        print(f"skipped {len(skipped)} bad row(s) of {path}:", file=sys.stderr)
        for origin, why in skipped:
            print(f"  {why}", file=sys.stderr)
    return out


def _relist(items, new):
    out = Loaded(new)
    out.skipped = items.skipped
    return out


def load_pairs(path, fmt="auto", split=None, config=None, skip_bad=False, disentangle=True, check_images=True):
    """Preference pairs from any pair or group format (groups expand to all their pairs)."""
    items = load_items(path, fmt, split, config, skip_bad, check_images)
    pairs = []
    for it in items:
        if isinstance(it, CandidateGroup):
            pairs += it.to_pairs()
        elif isinstance(it, PreferencePair):
            pairs.append(it)
        else:
            raise DataError(f"{it.origin}: a {type(it).__name__} where a preference pair was expected")
    return _relist(items, disentangle_ties(pairs) if disentangle else pairs)


def load_groups(path, fmt="auto", split=None, config=None, skip_bad=False, check_images=True):
    """Candidate groups from any group or pair format (a pair is a group of two)."""
    items = load_items(path, fmt, split, config, skip_bad, check_images)
    groups = []
    for it in items:
        if isinstance(it, PreferencePair):
            sc = [it.scores["preferred"], it.scores["rejected"]] if it.scores else None
            it = CandidateGroup(it.id, it.instruction, it.sources, [it.preferred, it.rejected],
                                [0, 0 if it.tie else 1], it.category, sc, it.origin, {**it.meta, "prefs": it.prefs})
        if not isinstance(it, CandidateGroup):
            raise DataError(f"{it.origin}: a {type(it).__name__} where a candidate group was expected")
        groups.append(it)
    return _relist(items, groups)


def _load_kind(kind, path, fmt, split, config, skip_bad, check_images):
    items = load_items(path, fmt, split, config, skip_bad, check_images)
    for it in items:
        if not isinstance(it, kind):
            raise DataError(f"{it.origin}: a {type(it).__name__} where a {kind.__name__} was expected")
    return items


def load_prompts(path, fmt="auto", split=None, config=None, skip_bad=False, check_images=True):
    """Edit prompts for RL (and editor warm-up triples, which carry a target)."""
    return _load_kind(EditPrompt, path, fmt, split, config, skip_bad, check_images)


def load_traces(path, fmt="auto", split=None, config=None, skip_bad=False, check_images=True):
    """Chain-of-thought verifier traces for SFT."""
    return _load_kind(CotTrace, path, fmt, split, config, skip_bad, check_images)


# ----------------------------------------------------------------------------------------------------------
# ties, order, shards

def _swap(sides):
    """{"preferred": a, "rejected": b} -> {"preferred": b, "rejected": a}; None stays None."""
    return sides and {"preferred": sides["rejected"], "rejected": sides["preferred"]}


def disentangle_ties(pairs):
    """EditReward's tie-disentanglement: a pair tied overall whose dimensions disagree (A better at following
    the instruction, B better looking) becomes one strict single-dimension sample per disagreeing dimension
    (with "overall": 0 in its prefs, so that no consumer reads it as an overall preference).
    Pairs tied on every dimension stay as ties for tie-aware losses and metrics."""
    out = []
    for p in pairs:
        dim_prefs = {d: v for d, v in p.prefs.items() if d != "overall" and v != 0}
        if not p.tie or set(dim_prefs.values()) != {-1, 1}:
            out.append(p)
            continue
        for d, v in dim_prefs.items():
            w, l, sc, meta = p.preferred, p.rejected, p.scores, {**p.meta, "disentangled": True}
            if v < 0:  # the dimension's winner goes first, and with it its scores and outcome
                w, l, sc = l, w, _swap(sc)
                if "outcomes" in meta:
                    meta["outcomes"] = _swap(meta["outcomes"])
            out.append(dataclasses.replace(p, id=f"{p.id}#{d}", preferred=w, rejected=l, prefs={d: 1, "overall": 0}, tie=False,
                                           scores=sc, meta=meta))
    return out


def shuffled(items, seed):
    """A copy of items in an order fixed by the seed (and only by it)."""
    items = list(items)
    random.Random(seed).shuffle(items)
    return items


def shard(items, rank, world_size):
    """Rank's strided slice: the shards of all ranks partition the items exactly (sizes differ by <= 1)."""
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} outside world size {world_size}")
    return list(items)[rank::world_size]


# ----------------------------------------------------------------------------------------------------------
# the shared ground of every script: torch.distributed, atomic writes, image sheets, source images

@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: object = "cpu"  # a torch.device

    @property
    def master(self):
        return self.rank == 0

    @property
    def ddp(self):
        return self.world > 1 or "RANK" in os.environ


_DIST = Dist()


def setup_distributed(device="auto"):
    """One script for `python` and `torchrun`: under torchrun (RANK in the environment) join the process group,
    NCCL on CUDA and gloo on CPU, one GPU per local rank; CPU ranks on one machine share its cores. Seed with
    `seed + dist.rank` where ranks must differ. Returns a Dist and remembers it for print0."""
    import torch
    import torch.distributed as tdist
    global _DIST
    cuda = torch.cuda.is_available() and device in ("auto", "cuda") or str(device).startswith("cuda")
    if "RANK" not in os.environ:
        _DIST = Dist(0, 1, 0, torch.device("cuda" if cuda and device == "auto" else
                                           ("cpu" if device == "auto" else device)))
        return _DIST
    local = int(os.environ.get("LOCAL_RANK", 0))
    tdist.init_process_group("nccl" if cuda else "gloo")
    if cuda:
        torch.cuda.set_device(local)
    else:
        local_world = int(os.environ.get("LOCAL_WORLD_SIZE", tdist.get_world_size()))
        torch.set_num_threads(max(1, torch.get_num_threads() // local_world))
    _DIST = Dist(tdist.get_rank(), tdist.get_world_size(), local, torch.device(f"cuda:{local}" if cuda else "cpu"))
    return _DIST


def print0(*args, **kwargs):
    """print on rank 0 only, flushed (torchrun interleaves the ranks' buffered output)."""
    if _DIST.master:
        print(*args, **kwargs, flush=True)


def leave_distributed():
    """End a torchrun worker whose work is done: destroy the process group, then exit without interpreter
    shutdown, where gloo threads that outlive the group sometimes aborted a finished run (SIGABRT, "terminate
    called without an active exception"; 3 of 6 CI runs on 2 CPU cores)."""
    import torch.distributed as tdist
    if tdist.is_available() and tdist.is_initialized():
        tdist.destroy_process_group()
    print(end="", flush=True)
    os._exit(0)


def atomic_write(path, write, mode="w"):
    """write(f) into a temporary sibling, then rename it over `path`: a kill never leaves a half-written file."""
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, mode) as f:
        write(f)
    os.replace(tmp, path)


def atomic_dir(final, write, link=None):
    """write(folder) into a temporary sibling folder that then replaces `final` in one rename; then optionally
    repoint the symlink `link` at it with another rename, so that a kill at any moment leaves `link` naming a
    complete folder (and the folder `link` named before is removed)."""
    import shutil
    final = final.rstrip("/")
    tmp, old = final + ".tmp", final + ".old"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    write(tmp)
    if os.path.exists(final):
        os.replace(final, old)
    os.replace(tmp, final)
    shutil.rmtree(old, ignore_errors=True)
    if link:
        prev = os.path.realpath(link) if os.path.islink(link) else None
        os.symlink(os.path.basename(final), link + ".tmp")
        os.replace(link + ".tmp", link)
        if prev and prev != os.path.realpath(final):
            shutil.rmtree(prev, ignore_errors=True)


def image_sheet(rows, path, cell=128):
    """One PNG for a person: rows of (title, [(image ref or PIL, caption), ...]), each row a title line above its
    images and a caption under each. Used by --inspect, bench.py's worst cases and grpo.py's sample grids."""
    ncol = max([len(pics) for _, pics in rows] + [1])
    sheet = Image.new("RGB", (ncol * cell, max(1, len(rows)) * (cell + 28)), "white")
    draw = ImageDraw.Draw(sheet)
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


# ----------------------------------------------------------------------------------------------------------
# the toy world: shapes on a plain background, edited by instructions, scored from pixels by an oracle

SHAPE_COLORS = {"red": (220, 30, 30), "green": (30, 180, 30), "blue": (30, 60, 220), "yellow": (240, 220, 30),
                "magenta": (200, 40, 200), "cyan": (30, 200, 210)}
BG_COLORS = {"white": (245, 245, 245), "black": (15, 15, 15), "gray": (128, 128, 128)}
PALETTE_NAMES = list(SHAPE_COLORS) + list(BG_COLORS)
PALETTE = np.array([SHAPE_COLORS.get(n) or BG_COLORS[n] for n in PALETTE_NAMES], dtype=np.float32)
SHAPES = ("circle", "square", "triangle")
CELLS = {"top left": (0, 0), "top": (1, 0), "top right": (2, 0), "left": (0, 1), "center": (1, 1),
         "right": (2, 1), "bottom left": (0, 2), "bottom": (1, 2), "bottom right": (2, 2)}
EDIT_KINDS = ("recolor", "remove", "add", "move", "background")
NOISE_LEVELS = (0.0, 0.05, 0.095, 0.135)  # Gaussian noise std (0..1 scale) of the four degradation levels
_INSTR = [("recolor", r"make the (\w+) (\w+) (\w+)"), ("remove", r"remove the (\w+) (\w+)"),
          ("add", r"add a (\w+) (\w+) at the ([\w ]+)"), ("move", r"move the (\w+) (\w+) to the ([\w ]+)"),
          ("background", r"change the background to (\w+)")]


def _shape_mask(kind, cell, size):
    """Boolean (size, size) mask of a shape drawn in one of the 3x3 cells."""
    y, x = np.mgrid[0:size, 0:size].astype(np.float32) + 0.5
    cx, cy, r = (cell[0] * 2 + 1) * size / 6, (cell[1] * 2 + 1) * size / 6, 0.13 * size
    if kind == "circle":
        return (x - cx) ** 2 + (y - cy) ** 2 <= r * r
    if kind == "square":
        return (abs(x - cx) <= 0.85 * r) & (abs(y - cy) <= 0.85 * r)
    return (y <= cy + 0.8 * r) & (abs(x - cx) <= (y - (cy - r)) / 1.8)  # triangle, apex up


def render_scene(scene, size=56):
    """scene = {"bg": name, "shapes": [(kind, color, cell name)]} -> uint8 (size, size, 3)."""
    img = np.empty((size, size, 3), np.uint8)
    img[:] = BG_COLORS[scene["bg"]]
    for kind, color, cell in scene["shapes"]:
        img[_shape_mask(kind, CELLS[cell], size)] = SHAPE_COLORS[color]
    return img


def classify(img, smooth=True):
    """uint8 (H, W, 3) -> (H, W) index of the nearest palette colour. With smooth, after a 3x3 median filter,
    so that pixel noise changes the image's quality but not what it shows."""
    a = np.asarray(img, dtype=np.float32)
    if smooth:
        pad = np.pad(a, ((1, 1), (1, 1), (0, 0)), mode="edge")
        h, w = a.shape[:2]
        a = np.median(np.stack([pad[i:i + h, j:j + w] for i in range(3) for j in range(3)]), axis=0)
    return ((a[:, :, None, :] - PALETTE) ** 2).sum(-1).argmin(-1)


def parse_toy_instruction(instruction):
    """'make the red circle blue' -> ("recolor", ("red", "circle", "blue")); None if not a toy instruction."""
    for kind, pat in _INSTR:
        m = re.fullmatch(pat, instruction.strip().lower())
        if m:
            return kind, m.groups()
    return None


def toy_target(source, instruction):
    """The correct edit of `source` as pixels, worked out from the source pixels and the instruction alone."""
    src = np.asarray(source, dtype=np.uint8)
    cls, size = classify(src, smooth=False), src.shape[0]  # sources are clean renders: keep every pixel
    bg = np.bincount(np.concatenate([cls[0], cls[-1], cls[:, 0], cls[:, -1]])).argmax()  # border = background
    kind, args = parse_toy_instruction(instruction)
    out = PALETTE[cls].astype(np.uint8)
    idx = PALETTE_NAMES.index
    if kind == "recolor":
        out[cls == idx(args[0])] = SHAPE_COLORS[args[2]]
    elif kind == "remove":
        out[cls == idx(args[0])] = PALETTE[bg]
    elif kind == "add":
        out[_shape_mask(args[1], CELLS[args[2]], size)] = SHAPE_COLORS[args[0]]
    elif kind == "move":
        out[cls == idx(args[0])] = PALETTE[bg]
        out[_shape_mask(args[1], CELLS[args[2]], size)] = SHAPE_COLORS[args[0]]
    else:
        out[cls == bg] = BG_COLORS[args[0]]
    return out


def toy_oracle(source, instruction, edited):
    """Ground-truth scores in [0, 1] of an edit, from pixels (PIL or uint8 arrays of any equal-aspect size).
    instruction_following = correct changed pixels / |pixels that should change  U  pixels that did change|
      (an unchanged image or a wrong edit scores 0, an edit that also changes other things is penalised);
    visual_quality = 1 - mean distance of each pixel to its nearest palette colour / 0.2 (noise, blur);
    overall = their mean. Also returns the two parts of instruction following, "change" and "keep"."""
    return toy_oracles(source, instruction, [edited])[0]


def toy_oracles(source, instruction, edits):
    """toy_oracle for several edits of one source under one instruction: the source's and the target's
    palette classes are worked out once."""
    src = np.asarray(source, dtype=np.uint8)
    cs, ct = classify(src), classify(toy_target(src, instruction))
    should = ct != cs
    out = []
    for edited in edits:
        ed = edited if isinstance(edited, Image.Image) else Image.fromarray(np.asarray(edited, dtype=np.uint8))
        if ed.size != (src.shape[1], src.shape[0]):
            ed = ed.resize((src.shape[1], src.shape[0]), Image.BILINEAR)
        ed = np.asarray(ed.convert("RGB"), dtype=np.float32)
        ce = classify(ed)
        did = ce != cs
        correct = (should & (ce == ct)).sum()
        union = (should | did).sum()
        dist = np.sqrt(((ed[:, :, None, :] - PALETTE) ** 2).sum(-1).min(-1)) / 255.0
        scores = {"instruction_following": float(correct / max(union, 1)),
                  "visual_quality": float(np.clip(1.0 - dist.mean() / 0.2, 0.0, 1.0)),
                  "change": float(correct / max(should.sum(), 1)),
                  "keep": float(1.0 - (did & ~should).sum() / max(union, 1))}
        scores["overall"] = (scores["instruction_following"] + scores["visual_quality"]) / 2
        out.append(scores)
    return out


def toy_level(x):
    """A 0..1 score -> a 1..4 rating, the scale of EditReward-Data's human scores."""
    return 1 + (x >= 0.2) + (x >= 0.45) + (x >= 0.8)


def toy_human(scores):
    """Human-like integer labels from oracle scores: 1..4 per dimension, overall = their sum (2..8)."""
    lv = {d: int(toy_level(scores[d])) for d in DIMS}
    lv["overall"] = sum(lv.values())
    return lv


def toy_ranks(human):
    """Candidates' ranks from their human-like labels: 0 = best overall, equal overall = equal rank (a tie)."""
    return [sorted({-h["overall"] for h in human}).index(-h["overall"]) for h in human]


COT_SCORES = ("instruction_following", "overall")


def toy_cot_response(instruction, scores, cot_score=COT_SCORES[0]):
    """A short templated chain of thought for verifier SFT, as a teacher model would write it: the principles
    the edit must satisfy, a 1..4 verdict for each, and a final JSON object (rewardmodel.parse_verifier_output).
      'recolor: follow 4/4; keep 4/4; quality 2/4\n{"follow": 4, "keep": 4, "quality": 2, "score": 9}'
    score = round(10 * oracle[cot_score]), 0..10. By default the teacher's final score is its instruction-following
    judgement: it rates quality but leaves it out of the score, while the human-like pair labels weigh both. That
    is the gap GCPO closes in Edit-R1 (SFT traces from a teacher, GCPO from human preferences). With "overall"
    the traces already agree with the pair labels and GCPO has nothing to add (README)."""
    kind = (parse_toy_instruction(instruction) or ("edit",))[0]
    f, k, q = (int(toy_level(scores[d])) for d in ("change", "keep", "visual_quality"))
    score = int(round(10 * scores[cot_score]))
    return (f"{kind}: follow {f}/4; keep {k}/4; quality {q}/4\n"
            f'{{"follow": {f}, "keep": {k}, "quality": {q}, "score": {score}}}')


def _random_scene(rng):
    cells = rng.sample(list(CELLS), rng.randint(1, 3))
    colors = rng.sample(list(SHAPE_COLORS), len(cells))
    return {"bg": rng.choice(list(BG_COLORS)), "shapes": [(rng.choice(SHAPES), c, p) for c, p in zip(colors, cells)]}


def _random_instruction(rng, scene, kind=None):
    """A valid instruction for the scene (unique colours, free cells), optionally of a given kind."""
    used_colors = {c for _, c, _ in scene["shapes"]}
    free_cells = [p for p in CELLS if p not in {p for _, _, p in scene["shapes"]}]
    new_colors = [c for c in SHAPE_COLORS if c not in used_colors]
    kinds = [k for k in EDIT_KINDS if (k in ("add", "move") and free_cells and new_colors) or
             k in ("recolor", "remove", "background")]
    kind = kind if kind in kinds else rng.choice(kinds)
    shape = rng.choice(scene["shapes"])
    if kind == "recolor":
        return f"make the {shape[1]} {shape[0]} {rng.choice(new_colors)}"
    if kind == "remove":
        return f"remove the {shape[1]} {shape[0]}"
    if kind == "add":
        return f"add a {rng.choice(new_colors)} {rng.choice(SHAPES)} at the {rng.choice(free_cells)}"
    if kind == "move":
        return f"move the {shape[1]} {shape[0]} to the {rng.choice(free_cells)}"
    return f"change the background to {rng.choice([b for b in BG_COLORS if b != scene['bg']])}"


OUTCOMES = ("correct", "partial", "overedit", "wrong", "unchanged")


def toy_candidate(rng, scene, instruction, outcome, noise_level, size):
    """One candidate edit, made factorially: what the edit does (outcome) x how noisy it is (level)."""
    src = render_scene(scene, size)
    if outcome == "unchanged":
        img = src.copy()
    elif outcome == "wrong":  # another valid edit of the same kind: right idea, wrong execution
        other = instruction
        for _ in range(20):
            other = _random_instruction(rng, scene, parse_toy_instruction(instruction)[0])
            if other != instruction:
                break
        img = toy_target(src, other) if other != instruction else src.copy()
    else:
        img = toy_target(src, instruction)
        if outcome == "partial":  # only the upper part of the requested change is done
            changed = np.argwhere((img != src).any(-1))
            cut = np.median(changed[:, 0]) if len(changed) else 0
            rows = np.arange(size)[:, None] > cut
            img = np.where(rows[..., None], src, img)
        elif outcome == "overedit":  # the edit plus an unrequested one
            img = toy_target(img, _random_instruction(rng, scene, rng.choice(["recolor", "background"])))
    sigma = NOISE_LEVELS[noise_level] * 255.0
    noise = np.random.default_rng(rng.getrandbits(32)).normal(0.0, sigma, img.shape) if sigma else 0.0
    return np.clip(img.astype(np.float32) + noise, 0, 255).round().astype(np.uint8)


def make_toy(out, seed=0, size=56, n_train=2400, n_val=120, n_rl=200, n_rl_test=48, n_editor=1000, k=4,
             editor_wrong=0.65, cot_score=COT_SCORES[0], n_twins=0):
    """Write the toy world in the project's own JSONL formats under `out`; returns {name: path}.
    n_twins: instruction-twin scenes for pairs_twins.jsonl (0: no such file), drawn from a random stream of
    their own so that every other file is the same whatever their number."""
    if cot_score not in COT_SCORES:
        raise ValueError(f"cot_score must be one of {COT_SCORES}, got {cot_score!r}")
    rng = random.Random(seed)
    os.makedirs(os.path.join(out, "images"), exist_ok=True)
    saved = {}

    def save(arr, name):
        path = f"images/{name}.png"
        Image.fromarray(arr).save(os.path.join(out, path))
        return path

    def write(name, rows):
        path = os.path.join(out, name)
        with open(path + ".tmp", "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)
        os.replace(path + ".tmp", path)
        saved[name] = path

    def group(i, split):
        scene = _random_scene(rng)
        instruction = _random_instruction(rng, scene)
        src = render_scene(scene, size)
        outcomes, cands = [], []
        for _ in range(k):  # factorial design: outcome and noise level drawn independently for each candidate
            outcomes.append(rng.choice(OUTCOMES))
            cands.append(toy_candidate(rng, scene, instruction, outcomes[-1], rng.randrange(4), size))
        scores = toy_oracles(src, instruction, cands)
        human = [toy_human(s) for s in scores]
        ranks = toy_ranks(human)
        gid = f"{split}{i:05d}"
        return {"id": gid, "instruction": instruction, "source": save(src, gid + "_src"),
                "candidates": [save(c, f"{gid}_c{j}") for j, c in enumerate(cands)], "ranks": ranks,
                "category": parse_toy_instruction(instruction)[0], "scores": human, "outcomes": outcomes,
                "oracle": scores}

    from tqdm import tqdm  # ~25 ms per group: the default world takes about a minute
    with tqdm(total=n_train + n_val, desc="toy candidate groups", disable=n_train + n_val < 500) as bar:
        train, val = [], []
        for split, n, into in (("train", n_train, train), ("val", n_val, val)):
            for i in range(n):
                into.append(group(i, split))
                bar.update()
    strip = lambda g: {k2: v for k2, v in g.items() if k2 != "oracle"}
    write("bench.jsonl", [strip(g) for g in val])

    def pair_rows(groups):
        rows = []
        for g in groups:
            cg = CandidateGroup(g["id"], g["instruction"], [g["source"]], g["candidates"], g["ranks"],
                                g["category"], g["scores"], meta={"outcomes": g["outcomes"]})
            for p in cg.to_pairs():
                rows.append({"id": p.id, "instruction": p.instruction, "source": g["source"], "preferred": p.preferred,
                             "rejected": p.rejected, "prefs": p.prefs, "tie": p.tie, "category": p.category,
                             "scores": p.scores, "outcomes": p.meta["outcomes"]})
        return rows
    # the last quarter of the training groups is kept apart for GCPO, which needs far fewer pairs than SFT
    n_gcpo = n_train // 4
    write("pairs_train.jsonl", pair_rows(train[:n_train - n_gcpo]))
    write("gcpo_train.jsonl", [r for r in pair_rows(train[n_train - n_gcpo:]) if not r["tie"]])
    write("pairs_val.jsonl", pair_rows(val))
    write("cot_train.jsonl", [{"id": f"{g['id']}_c{j}", "instruction": g["instruction"], "source": g["source"],
                               "edited": c, "response": toy_cot_response(g["instruction"], s, cot_score), "scores": h}
                              for g in train[:n_train - n_gcpo]
                              for j, (c, s, h) in enumerate(zip(g["candidates"], g["oracle"], g["scores"]))])

    def prompts(n, split, with_target=False):
        rows = []
        for i in range(n):
            scene = _random_scene(rng)
            instruction = _random_instruction(rng, scene)
            pid = f"{split}{i:05d}"
            row = {"id": pid, "instruction": instruction, "source": save(render_scene(scene, size), pid + "_src"),
                   "category": parse_toy_instruction(instruction)[0]}
            if with_target:  # a noisy editing dataset: some targets are another edit than the one asked for
                correct = rng.random() >= editor_wrong
                tgt = toy_candidate(rng, scene, instruction, "correct" if correct else "wrong", 0, size)
                row.update(target=save(tgt, pid + "_tgt"), correct=correct)
            rows.append(row)
        return rows
    write("rl_train.jsonl", prompts(n_rl, "rl"))
    write("rl_test.jsonl", prompts(n_rl_test, "rltest"))
    write("editor_train.jsonl", prompts(n_editor, "ed", with_target=True))

    def twins(n, trng, bar):
        """Instruction twins: a scene, two instructions A and B of one kind (not background) and the two edits
        they ask for, each at its own noise level, ranked once under A and once under B. The same two images win
        and lose by the instruction alone: what the toy's candidates rarely force a model to read (README)."""
        groups = []
        while len(groups) < 2 * n:
            scene = _random_scene(trng)
            kind = trng.choice([e for e in EDIT_KINDS if e != "background"])
            pair = [_random_instruction(trng, scene, kind) for _ in range(2)]
            if pair[0] == pair[1] or any(parse_toy_instruction(x)[0] != kind for x in pair):
                continue  # a scene where the kind has one way only (e.g. remove with one shape), or none
            src = render_scene(scene, size)
            imgs = [toy_candidate(trng, scene, x, "correct", trng.randrange(4), size) for x in pair]
            gid = f"twin{len(groups) // 2:05d}"
            source, edits = save(src, gid + "_src"), [save(im, f"{gid}_{c}") for im, c in zip(imgs, "ab")]
            for j, x in enumerate(pair):
                human = [toy_human(s) for s in toy_oracles(src, x, imgs)]
                groups.append({"id": f"{gid}{'ab'[j]}", "instruction": x, "source": source, "candidates": edits,
                               "ranks": toy_ranks(human), "category": kind, "scores": human,
                               "outcomes": ["correct", "wrong"] if j == 0 else ["wrong", "correct"]})
            bar.update()
        return groups
    if n_twins:  # opt-in: their labels cost 4 oracle scores a scene (2400 scenes double the world's time)
        with tqdm(total=n_twins, desc="toy instruction twins", disable=n_twins < 500) as bar:
            write("pairs_twins.jsonl", pair_rows(twins(n_twins, random.Random(f"twins {seed}"), bar)))
    with open(os.path.join(out, "toy.json"), "w") as f:
        json.dump({"seed": seed, "size": size, "n_train": n_train, "n_val": n_val, "k": k,
                   "editor_wrong": editor_wrong, "cot_score": cot_score, "n_twins": n_twins}, f)
    return saved


# ----------------------------------------------------------------------------------------------------------
# looking at data

def inspect(path, fmt="auto", split=None, config=None, skip_bad=False, sheet=None, rows=6):
    """Print counts, categories, tie share and dimensions of any supported source; write a contact sheet."""
    items = load_items(path, fmt, split, config, skip_bad, check_images=False)
    kinds = {}
    for it in items:
        kinds[type(it).__name__] = kinds.get(type(it).__name__, 0) + 1
    print(f"{path}: {len(items)} rows " + ", ".join(f"{n} {k}" for k, n in kinds.items()))
    cats = {}
    for it in items:
        cats[getattr(it, "category", "") or "-"] = cats.get(getattr(it, "category", "") or "-", 0) + 1
    print("categories: " + ", ".join(f"{c} {n}" for c, n in sorted(cats.items(), key=lambda x: -x[1])))
    pairs = [p for it in items for p in (it.to_pairs() if isinstance(it, CandidateGroup) else
                                         [it] if isinstance(it, PreferencePair) else [])]
    if pairs:
        dims = sorted({d for p in pairs for d in p.prefs})
        ties = sum(p.tie for p in pairs)
        split = sum(p.tie and {p.prefs[d] for d in p.prefs if d != "overall"} >= {-1, 1} for p in pairs)
        print(f"pairs: {len(pairs)} | tied overall {ties} ({ties / len(pairs):.1%}), of which {split} have "
              f"disagreeing dimensions (tie-disentangled into single-dimension samples)")
        for d in dims:
            v = [p.prefs[d] for p in pairs if d in p.prefs]
            print(f"  {d}: {len(v)} labelled | preferred better {v.count(1)} | tie {v.count(0)} | rejected better {v.count(-1)}")
    sheet = sheet or os.path.splitext(os.path.basename(path.rstrip("/")))[0].replace("/", "_") + "_sheet.png"
    contact_sheet(items[:rows], sheet)
    print(f"contact sheet: {sheet}")


def contact_sheet(items, path, cell=128):
    """A PNG with one row per item: source(s) | candidates, each labelled, and the instruction above."""
    rows = []
    for it in items:
        pics = [(s, "source") for s in it.sources]
        if isinstance(it, PreferencePair):
            pics += [(it.preferred, "preferred" if not it.tie else "tie A"),
                     (it.rejected, "rejected" if not it.tie else "tie B")]
        elif isinstance(it, CandidateGroup):
            pics += [(c, f"rank {r}") for c, r in zip(it.candidates, it.ranks)]
        elif isinstance(it, CotTrace):
            pics += [(it.edited, "edited")]
        elif it.target is not None:
            pics += [(it.target, "target")]
        rows.append((it.instruction, pics))
    image_sheet(rows, path, cell)


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    # --- toy world
    ap.add_argument("--toy", action="store_true", help="write the procedural toy world to --out")
    ap.add_argument("--out", default="data/toy", help="output folder for --toy")
    ap.add_argument("--seed", type=int, default=0, help="toy world seed (same seed, same files)")
    ap.add_argument("--size", type=int, default=56, help="toy image side in pixels")
    ap.add_argument("--n_train", type=int, default=2400, help="training candidate groups (a quarter goes to GCPO)")
    ap.add_argument("--n_val", type=int, default=120, help="held-out candidate groups (the toy benchmark)")
    ap.add_argument("--k", type=int, default=4, help="candidates per group")
    ap.add_argument("--n_rl", type=int, default=200, help="RL training prompts")
    ap.add_argument("--n_rl_test", type=int, default=48, help="held-out RL prompts")
    ap.add_argument("--n_editor", type=int, default=1000, help="editor warm-up triples")
    ap.add_argument("--editor_wrong", type=float, default=0.65, help="share of editor triples with a wrong target")
    ap.add_argument("--n_twins", type=int, default=0, help="instruction-twin scenes, 2 pairs each, for pairs_twins.jsonl (0: none)")
    ap.add_argument("--cot_score", default=COT_SCORES[0], choices=COT_SCORES,
                    help="what the final score of the SFT traces' teacher follows (the pair labels weigh both dimensions)")
    # --- inspecting any source
    ap.add_argument("--inspect", default=None, help="file, folder or hub name to summarise")
    ap.add_argument("--fmt", default="auto", choices=("auto",) + FORMATS, help="input format (auto: from columns)")
    ap.add_argument("--split", default=None, help="split of a folder / hub dataset")
    ap.add_argument("--config", default=None, help="config of a hub dataset (e.g. 2pair)")
    ap.add_argument("--skip_bad", action="store_true", help="skip bad rows (reported at the end) instead of stopping")
    ap.add_argument("--sheet", default=None, help="contact sheet PNG path for --inspect")
    args = ap.parse_args()
    if not (0.0 <= args.editor_wrong <= 1.0):
        ap.error("--editor_wrong must lie in [0, 1]")
    if args.n_twins < 0:
        ap.error(f"--n_twins must be >= 0, got {args.n_twins}")
    if args.toy:
        import time
        t0 = time.time()
        files = make_toy(args.out, args.seed, args.size, args.n_train, args.n_val, args.n_rl, args.n_rl_test,
                         args.n_editor, args.k, args.editor_wrong, args.cot_score, args.n_twins)
        for name, path in files.items():
            with open(path) as f:
                print(f"{path}: {sum(1 for _ in f)} rows")
        print(f"toy world written to {args.out} in {time.time() - t0:.1f}s")
    elif args.inspect:
        try:
            inspect(args.inspect, args.fmt, args.split, args.config, args.skip_bad, args.sheet)
        except DataError as e:
            sys.exit(f"error: {e}")
    else:
        ap.print_help()
