"""bench.py: metrics on hand-worked cases, the EditScore aggregation, smoke runs on a tiny fixture of every
benchmark format and of the verifier mode (a checkpoint with Avg@2, the EditScore rubric zero-shot), and
kill-and-resume. Fixtures are written here, in each format's real schema."""
import io
import json
import math
import os
import signal
import subprocess
import sys
import time
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import bench  # noqa: E402
from bench import (editscore_bench_table, group_accuracy, pairwise_accuracy,  # noqa: E402
                   tie_calibrated_accuracy)
from data import Dist  # noqa: E402

# ----------------------------------------------------------------------------- metrics


def brute_tie_calibrated(h, d):
    """The definition, spelled out: try eps = 0 and every |diff|, keep the best (smallest eps on a tie)."""
    best = (-1.0, 0.0)
    for eps in sorted({0.0, *map(abs, d)}):
        pred = [0 if abs(x) <= eps else (1 if x > 0 else -1) for x in d]
        acc = sum(p == y for p, y in zip(pred, h)) / len(h)
        if acc > best[0]:
            best = (acc, eps)
    return best


def test_worked_example_with_and_without_ties():
    # 6 ordered pairs, 5 right; 3 human ties, one of them with a small model gap (0.05)
    h = [1, 1, 1, -1, -1, -1, 0, 0, 0]
    d = [0.5, 0.4, 0.3, -0.6, -0.2, 0.1, 0.05, -0.8, 0.7]
    acc, eps = tie_calibrated_accuracy(h, d)
    assert (round(acc, 4), eps) == (0.6667, 0.05)                 # calling |d| <= 0.05 a tie gains one pair
    assert round(pairwise_accuracy(h, d, include_ties=False), 4) == 0.8333
    assert pairwise_accuracy(h, d) == pytest.approx(5 / 9)        # eps = 0: no tie is ever predicted


def test_tie_calibrated_edge_cases():
    acc, eps = tie_calibrated_accuracy([], [])
    assert math.isnan(acc) and eps == 0.0
    assert tie_calibrated_accuracy([0, 0, 0], [0.3, -0.1, 0.2]) == (1.0, 0.3)   # all ties: widest eps
    assert tie_calibrated_accuracy([0, 0], [0.0, 0.0]) == (1.0, 0.0)
    assert tie_calibrated_accuracy([1, -1], [0.2, -0.3]) == (1.0, 0.0)          # eps = 0 must be tried
    assert tie_calibrated_accuracy([1, -1], [0.0, 0.0]) == (0.0, 0.0)           # equal scores never win
    # duplicate |diff|: both pairs at |0.2| flip to "tie" together; calling only the first one a tie (1.0)
    # is a state no eps produces
    assert tie_calibrated_accuracy([0, 1], [0.2, 0.2]) == (0.5, 0.0)
    assert tie_calibrated_accuracy([0, 1, 1], [-0.2, 0.2, 0.5]) == pytest.approx((2 / 3, 0.0))
    assert tie_calibrated_accuracy([0, 0, 1], [-0.2, 0.2, 0.5]) == pytest.approx((1.0, 0.2))
    # an unscorable image (nan) is wrong whatever eps, and nan is never an eps candidate
    assert tie_calibrated_accuracy([0, 1, 0], [math.nan, 0.5, 0.1]) == pytest.approx((2 / 3, 0.1))
    assert pairwise_accuracy([0, 1], [math.nan, math.nan]) == 0.0
    with pytest.raises(ValueError):
        tie_calibrated_accuracy([1], [0.1, 0.2])


def test_tie_calibrated_matches_definition_on_random_inputs():
    rng = np.random.default_rng(0)
    for _ in range(200):
        n = int(rng.integers(1, 12))
        h = rng.integers(-1, 2, n).tolist()
        d = np.round(rng.normal(size=n), 1).tolist()              # rounding makes duplicate |diff| common
        acc, eps = tie_calibrated_accuracy(h, d)
        assert (acc, eps) == pytest.approx(brute_tie_calibrated(h, d))


def test_pairwise_accuracy():
    assert pairwise_accuracy([1, -1, 0, 1], [0.2, -0.1, 0.0, 0.0]) == 0.75      # tie right only at diff 0
    assert pairwise_accuracy([1, -1, 0, 1], [0.2, -0.1, 0.0, 0.0], include_ties=False) == pytest.approx(2 / 3)
    assert math.isnan(pairwise_accuracy([0, 0], [1.0, 2.0], include_ties=False))  # all ties, dropped
    assert math.isnan(pairwise_accuracy([], []))


def test_group_accuracy():
    ranks = [[0, 1, 2], [0, 1, 2], [0, 0, 1], [1, 0, 2, 3]]
    scores = [[3, 2, 1], [3, 1, 2], [5, 5.05, 1], [1, 2, 0.5, 0]]
    assert group_accuracy(ranks, scores) == 0.5                   # group 2 misorders, group 3 misses a tie
    assert group_accuracy(ranks, scores, eps=0.1) == 0.75         # the 0.05 gap now reads as a tie
    assert group_accuracy([[0, 0]], [[1.0, 1.0]]) == 1.0
    assert group_accuracy([[0, 1, 2]], [[1.0, 0.95, 0.0]], eps=0.1) == 1.0  # ordered pairs: the order, not eps
    assert math.isnan(group_accuracy([], []))


def test_editscore_aggregation():
    # (task, dimension, score[preferred] - score[rejected]); task names as the hub and scripts spell them
    rows = [("subject-add", "overall", 1.0), ("subject_add", "overall", 0.0),            # tie is wrong
            ("subject_remove", "overall", 2.0), ("style_change", "overall", -1.0),
            ("color_alter", "overall", 1.0), ("color_alter", "prompt_following", 1.0),
            ("ps_human", "consistency", 0.5), ("ps_human", "consistency", -0.5)]
    t = editscore_bench_table(*zip(*rows))
    assert t["tasks"]["subject_add"] == {"overall": 0.5}
    assert t["tasks"]["style"] == {"overall": 0.0}
    assert t["groups"]["object"] == {"overall": 0.75}                        # mean of 0.5 and 1.0
    assert t["groups"]["appearance"] == {"overall": 0.5, "prompt_following": 1.0}
    assert t["groups"]["advanced"] == {"consistency": 0.5}
    assert "scene" not in t["groups"]
    assert t["overall"]["overall"] == pytest.approx((0.5 + 1 + 0 + 1) / 4)  # unweighted over tasks
    assert t["overall"]["consistency"] == 0.5


def test_evaluate_by_label():
    """The report's numbers from hand-made comparisons: each --by label is measured on its own pairs."""
    C = bench.Comparison
    comps = [C("overall", 1, "a", "b", "t", "x"), C("overall", -1, "c", "d", "t", "x"),   # diffs 2, -0.5: right
             C("overall", 0, "a", "c", "t", "y"), C("overall", 1, "b", "d", "t", "y")]    # diffs 1 (a tie), -1.5
    scores = {"a": {"overall": 3.0}, "b": {"overall": 1.0}, "c": {"overall": 2.0}, "d": {"overall": 2.5}}
    r = bench.evaluate(comps, [([0, 1], ["a", "b"])], scores, editscore=False)
    o = r["pairwise"]["overall"]
    assert (o["pairs"], o["human_ties"], o["with_ties"], o["without_ties"]) == (4, 1, 0.5, pytest.approx(2 / 3))
    assert (o["tie_calibrated"], o["epsilon"]) == (0.5, 0.0)
    assert (o["by"]["x"]["tie_calibrated"], o["by"]["x"]["without_ties"]) == (1.0, 1.0)
    y = o["by"]["y"]                                  # eps = 1 calls the tie right; b-d is wrong at every eps
    assert (y["pairs"], y["human_ties"], y["without_ties"], y["tie_calibrated"], y["epsilon"]) == (2, 1, 0.0, 0.5, 1.0)
    assert r["groups"] == {"epsilon": 0.0, "sizes": {2: {"groups": 1, "accuracy": 1.0}}}
    assert r["unparsed"] == {"passes": 0, "images": 0, "unscored_images": 0}


def test_group_epsilon_is_fitted_on_the_two_pair_groups_alone():
    """As EditReward's evaluation: a run over 2- and 3-pair groups fits the K = 2 tie epsilon on the 2-pair groups,
    not on every pair (the 3-pair group's close but ordered a-b pair would pull it to 0 and lose the K = 2 tie)."""
    C = bench.Comparison
    scores = {x: {"overall": v} for x, v in zip("pqrsabc", (1.0, 1.1, 2.0, 1.0, 3.0, 2.95, 0.0))}
    groups = [([0, 0], ["p", "q"]), ([0, 1], ["r", "s"]), ([0, 1, 2], ["a", "b", "c"])]
    comps = [C("overall", h, x, y, "t", "") for h, x, y in ((0, "p", "q"), (1, "r", "s"), (1, "a", "b"),
                                                            (1, "a", "c"), (1, "b", "c"))]
    r = bench.evaluate(comps, groups, scores, editscore=False)
    assert r["pairwise"]["overall"]["epsilon"] == 0.0                    # all pairs: eps 0.1 would cost a-b
    assert r["groups"]["epsilon"] == pytest.approx(0.1)                  # the 2-pair groups alone: the tie is right
    assert r["groups"]["sizes"] == {2: {"groups": 2, "accuracy": 1.0}, 3: {"groups": 1, "accuracy": 1.0}}
    assert bench.evaluate(comps[2:], groups[2:], scores, editscore=False)["groups"]["epsilon"] == 0.0  # no 2-pair


def test_a_human_tie_in_a_larger_group_is_wrong_whatever_the_sizes_in_the_run():
    """EditReward's evaluate/eval_bench.py reads an N-pair ranking with '=' as malformed: the group counts wrong.
    So here, with or without 2-pair groups in the run (a fitted eps, or none), the same B>A=C group counts wrong."""
    C = bench.Comparison
    scores = {x: {"overall": v} for x, v in zip("pqxyz", (1.0, 1.1, 1.0, 2.0, 1.05))}
    groups = [([0, 0], ["p", "q"]), ([1, 0, 1], ["x", "y", "z"])]     # z within eps of x: a tie at eps 0.1
    comps = [C("overall", h, a, b, "t", "") for h, a, b in ((0, "p", "q"), (-1, "x", "y"), (0, "x", "z"),
                                                            (1, "y", "z"))]
    both, alone = (bench.evaluate(comps[i:], groups[i // 2:], scores, editscore=False)["groups"] for i in (0, 1))
    assert both["epsilon"] == pytest.approx(0.1) and both["sizes"][2]["accuracy"] == 1.0
    assert both["sizes"][3]["accuracy"] == alone["sizes"][3]["accuracy"] == 0.0


def test_by_label():
    from data import PreferencePair
    p = PreferencePair("p", "edit", ["s.png"], "a.png", "b.png", {"overall": 1}, category="color",
                       meta={"outcomes": {"preferred": "correct", "rejected": "wrong"}})
    assert [bench.by_label(p, "outcomes", h) for h in (1, -1, 0)] == ["correct > wrong", "wrong > correct", ""]
    assert bench.by_label(p, "category", 0) == "color" and bench.by_label(p, "nothing", 1) == ""


# ----------------------------------------------------------------------------- fixtures in the real schemas

COLORS = [(200, 30, 30), (30, 200, 30), (30, 30, 200), (200, 200, 30), (30, 200, 200), (120, 120, 120)]


def img(i, size=32):
    """A small distinct image: colour from the list, a grey square whose place depends on i."""
    a = np.full((size, size, 3), COLORS[i % len(COLORS)], np.uint8)
    o = (i * 5) % (size - 8)
    a[o:o + 8, o:o + 8] = 128
    return Image.fromarray(a)


def png_bytes(i):
    buf = io.BytesIO()
    img(i).save(buf, format="PNG")
    return buf.getvalue()


def write_jsonl(path, rows):
    with open(path, "w") as f:
        f.write("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def write_parquet(path, columns, image_cols=(), list_image_cols=()):
    """A parquet file with embedded images, typed as the hub's `datasets.Image` columns are."""
    import datasets
    ds = datasets.Dataset.from_dict(columns)
    for name in image_cols:
        ds = ds.cast_column(name, datasets.Image())
    for name in list_image_cols:
        ds = ds.cast_column(name, datasets.List(datasets.Image()))
    ds.to_parquet(str(path))
    return str(path)


def embedded(i):
    return {"bytes": png_bytes(i), "path": None}


def project_pairs(tmp, n=6):
    os.makedirs(tmp / "images", exist_ok=True)
    rows = []
    for i in range(n):
        for j, name in enumerate(("src", "a", "b")):
            img(3 * i + j).save(tmp / "images" / f"{i}_{name}.png")
        prefs = {"instruction_following": 1, "visual_quality": [1, -1, 0][i % 3], "overall": 0 if i == 2 else 1}
        rows.append({"id": f"p{i}", "instruction": f"edit {i}", "source": f"images/{i}_src.png",
                     "preferred": f"images/{i}_a.png", "rejected": f"images/{i}_b.png", "prefs": prefs,
                     "category": "color"})
    return write_jsonl(tmp / "pairs_val.jsonl", rows)


def project_groups(tmp, n=4):
    # the toy bench.jsonl schema: ranks (0 = best, equal = tie) and per-candidate human scores
    os.makedirs(tmp / "images", exist_ok=True)
    rows = []
    for i in range(n):
        for j in range(4):
            img(40 + 4 * i + j).save(tmp / "images" / f"g{i}_{j}.png")
        follow, quality = [[3, 2, 1], [2, 3, 2], [1, 1, 3], [1, 2, 3]][i], [1, 2, 1]
        overall = [f + q for f, q in zip(follow, quality)]
        rows.append({"id": f"g{i}", "instruction": f"group edit {i}", "source": f"images/g{i}_0.png",
                     "candidates": [f"images/g{i}_{j}.png" for j in (1, 2, 3)],
                     "ranks": [sorted(set(overall), reverse=True).index(o) for o in overall],
                     "scores": [{"instruction_following": f, "visual_quality": q, "overall": o}
                                for f, q, o in zip(follow, quality, overall)], "category": "add",
                     "outcomes": ["correct", "partial", "wrong"]})
    return write_jsonl(tmp / "bench.jsonl", rows)


def editscore_bench(tmp):
    # each image pair appears under every dimension, as in the hub data: 2 tasks x 2 pairs x 3 dimensions
    cols = {k: [] for k in ("key", "instruction", "input_image", "output_images", "task_type", "dimension")}
    for t, task in enumerate(("subject-add", "background_change")):
        for i in range(2):
            for dim in ("prompt_following", "consistency", "overall"):
                base = 10 * t + 3 * i
                cols["key"].append([f"k{base}", f"k{base + 1}"])
                cols["instruction"].append(f"{task} {i}")
                cols["input_image"].append(embedded(base + 2))
                cols["output_images"].append([embedded(base), embedded(base + 1)])
                cols["task_type"].append(task)
                cols["dimension"].append(dim)
    return write_parquet(tmp / "editscore.parquet", cols, {"input_image"}, {"output_images"})


def tiger_bench(tmp, groups=((("A>B", "A>C", "B>C"), "x"), (("B>A", "A=C", "B>C"), "y"))):
    # TIGER-Lab/EditReward-Bench 3pair rows as the hub serves them (TIGER-AI-Lab/EditReward
    # evaluate/inference_3pair_hf.py): one comparison a row, the group in the id prefix, the letters positions
    cols = {k: [] for k in ("id", "instruction", "source_image", "candidate_1", "candidate_2", "ranking",
                            "comparison_type", "dataset", "score_1", "score_2", "model_1", "model_2")}
    for g, (verdicts, dataset) in enumerate(groups):
        for verdict, (a, b) in zip(verdicts, ("AB", "AC", "BC")):
            pa, pb = ord(a) - 65, ord(b) - 65
            for k, v in {"id": f"t{g}_{a}vs{b}", "instruction": f"edit {g}", "source_image": embedded(60 + g),
                         "candidate_1": embedded(62 + 3 * g + pa), "candidate_2": embedded(62 + 3 * g + pb),
                         "ranking": verdict, "comparison_type": f"{a}vs{b}", "dataset": dataset,
                         "score_1": float(3 - pa), "score_2": float(3 - pb), "model_1": f"m{pa}",
                         "model_2": f"m{pb}"}.items():
                cols[k].append(v)
    return write_parquet(tmp / "tiger3.parquet", cols, {"source_image", "candidate_1", "candidate_2"})


def genai_bench(tmp):
    votes = ["leftvote", "rightvote", "tievote", "bothbad_vote"]  # TIGER-AI-Lab/GenAI-Bench inference.py
    cols = {"source_prompt": ["a dog"] * 4, "target_prompt": ["a red dog"] * 4,
            "instruct_prompt": [f"make it red {i}" for i in range(4)],
            "source_image": [embedded(70 + i) for i in range(4)],
            "left_model": ["m1"] * 4, "right_model": ["m2"] * 4,
            "left_output_image": [embedded(74 + i) for i in range(4)],
            "right_output_image": [embedded(78 + i) for i in range(4)],
            "vote_type": votes}
    return write_parquet(tmp / "genai.parquet", cols, {"source_image", "left_output_image", "right_output_image"})


def editreward_data(tmp):
    # EditReward-Data rows: per side 1..4 scores per dimension, overall = their sum; row 1 is tied overall
    cols = {"instruction": ["add a hat", "remove the car"], "source_img": [embedded(90), embedded(91)],
            "left_output_image": [embedded(92), embedded(93)], "right_output_image": [embedded(94), embedded(95)],
            "left_instruction_following_score": [4, 3], "left_quality_aesthetic_score": [2, 2],
            "left_overall_score": [6, 5], "right_instruction_following_score": [1, 2],
            "right_quality_aesthetic_score": [3, 3], "right_overall_score": [4, 5], "vote_type": ["left", "tie"]}
    return write_parquet(tmp / "editreward_data.parquet", cols,
                         ("source_img", "left_output_image", "right_output_image"))


def run_bench(tmp, data, *extra, model="tiny"):
    """One in-process run; every run of a test shares tmp/bench (its report.json and its score cache)."""
    bench.main(["--bench", data, "--model", model, "--device", "cpu", "--out_dir", str(tmp / "bench"), *extra])
    return json.loads((tmp / "bench" / "report.json").read_text())


# ----------------------------------------------------------------------------- smoke runs


def test_smoke_every_format(tmp_path, capsys):
    data = project_pairs(tmp_path)
    r = run_bench(tmp_path, data)
    assert set(r["pairwise"]) == {"instruction_following", "visual_quality", "overall"}
    assert r["pairwise"]["overall"]["human_ties"] == 1 and r["images"] == 12 and "by" not in r["pairwise"]["overall"]
    # the worst-case sheet, on the pairs as they are and with the human order reversed (the same images, so
    # the same scores): the 5 ordered pairs' misses split between the two, one 188 px row each
    rows = [json.loads(line) for line in open(data)]
    reversed_pairs = write_jsonl(tmp_path / "reversed.jsonl", [{**r, "preferred": r["rejected"],
                                                                "rejected": r["preferred"]} for r in rows])
    capsys.readouterr()
    misses = []
    for path in (data, reversed_pairs):
        r = run_bench(tmp_path, path, "--worst", "8")
        misses.append(round(5 * (1 - r["pairwise"]["overall"]["without_ties"])))
        assert f"wrote {misses[-1]} worst disagreements" in capsys.readouterr().out
        assert Image.open(tmp_path / "bench" / "worst.png").size == ((3 if misses[-1] else 1) * 160,
                                                                     max(1, misses[-1]) * 188)
    assert sum(misses) == 5 and r["scored_now"] == 0

    r = run_bench(tmp_path, project_groups(tmp_path), "--by", "outcomes")
    assert list(r["groups"]["sizes"]) == ["3"] and r["groups"]["sizes"]["3"]["groups"] == 4
    assert r["pairwise"]["overall"]["pairs"] == 12
    assert r["pairwise"]["overall"]["human_ties"] == 3                 # groups 0, 1 and 3 hold one tie each
    assert r["pairwise"]["visual_quality"]["human_ties"] == 4          # per-dimension labels from the scores
    # by outcome: the human-preferred candidate's first, from the groups' follow levels by hand; ties left out
    by = r["pairwise"]["instruction_following"]["by"]
    assert {o: v["pairs"] for o, v in by.items()} == {"correct > partial": 1, "correct > wrong": 1, "partial > wrong": 2,
                                                      "partial > correct": 2, "wrong > correct": 2, "wrong > partial": 2}
    assert sum(v["pairs"] * v["without_ties"] for v in by.values()) / 10 == pytest.approx(
        r["pairwise"]["instruction_following"]["without_ties"])
    assert "| instruction_following / outcomes correct > wrong | 1 | 0 |" in capsys.readouterr().out

    r = run_bench(tmp_path, editscore_bench(tmp_path))
    assert r["images"] == 8                                     # 12 rows x 2 images, shared across dimensions
    assert set(r["editscore"]["tasks"]) == {"subject_add", "background_change"}
    assert set(r["editscore"]["groups"]) == {"object", "scene"}
    assert "| Object |" in capsys.readouterr().out

    r = run_bench(tmp_path, tiger_bench(tmp_path), "--by", "category")   # TIGER's category: the source dataset
    assert r["groups"]["sizes"]["3"]["groups"] == 2 and r["pairwise"]["overall"]["human_ties"] == 1
    by = r["pairwise"]["overall"]["by"]                                 # "A>B>C" in x; "B>A=C" in y, one tie
    assert {c: (v["pairs"], v["human_ties"]) for c, v in by.items()} == {"x": (3, 0), "y": (3, 1)}

    r = run_bench(tmp_path, editreward_data(tmp_path))
    assert r["pairwise"]["visual_quality"]["score_key"] == "visual_quality"
    assert r["pairwise"]["overall"]["human_ties"] == 1

    r = run_bench(tmp_path, genai_bench(tmp_path), "--limit", "3")
    assert r["items"] == 3 and r["pairwise"]["overall"]["human_ties"] == 1
    assert r["unparsed"]["passes"] == 0


def test_the_worst_sheet_takes_the_worst_disagreements_whatever_a_nan_score(tmp_path, monkeypatch):
    """A NaN score (an image every verifier pass left unparsed) is no disagreement: it took one of the --worst slots
    in the sort, then dropped out, and the sheet showed fewer rows than it should."""
    img, C, rows = Image.new("RGB", (8, 8)), bench.Comparison, []
    monkeypatch.setattr(bench, "image_sheet", lambda r, *a, **k: rows.extend(title for title, _ in r))
    comps, scores, units = [], {}, {}
    for i, (pa, pb) in enumerate([(math.nan, 1.0), (0.0, 0.5), (0.0, 0.2), (1.0, 0.0)]):  # preferred, other
        scores |= {f"a{i}": {"overall": pa}, f"b{i}": {"overall": pb}}
        it = SimpleNamespace(instruction=f"edit {i}", sources=[img])
        units |= {f"a{i}": bench.Unit(it, img), f"b{i}": bench.Unit(it, img)}
        comps.append(C("overall", 1, f"a{i}", f"b{i}", "t", ""))
    bench.write_report(SimpleNamespace(out_dir=str(tmp_path), worst=2, by=""), {}, comps, [], units, scores, False)
    assert rows == ["edit 1", "edit 2"]  # the gaps -0.5 and -0.2
    assert json.loads((tmp_path / "report.json").read_text())["unparsed"]["unscored_images"] == 1


def test_the_cache_key_reads_the_models_files_not_the_bench_outputs_beside_them(tmp_path):
    """A checkpoint folder may hold several benchmarks' outputs (--out_dir inside it): their caches, reports and
    sheets change while another benchmark runs, and were read as the model's files (every score redone; under
    torchrun, ranks that read different files crashed at the end). A changed model file still changes the key."""
    (tmp_path / "rm" / "backbone").mkdir(parents=True)
    (tmp_path / "rm" / "args.json").write_text("{}")
    (tmp_path / "rm" / "backbone" / "adapter_model.safetensors").write_bytes(b"w")
    key = bench.scorer_id(str(tmp_path / "rm"))
    for f in ("genai/cache/scores.rank0.jsonl", "genai/report.json", "genai/worst.png"):
        (tmp_path / "rm" / f).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / "rm" / f).write_text("x")
    assert bench.scorer_id(str(tmp_path / "rm")) == key
    (tmp_path / "rm" / "backbone" / "adapter_model.safetensors").write_bytes(b"retrained")
    assert bench.scorer_id(str(tmp_path / "rm")) != key


def test_a_scoring_error_names_the_images_and_the_device_keys_the_cache(tmp_path, monkeypatch):
    """An image the load checks pass can still fail in the processor or the model (an extreme aspect ratio, an OOM):
    the error names the batch's rows. The "auto" dtype is bf16 on CUDA and fp32 on the CPU: the device type is in
    the cache key, so a CPU dry run's scores are not reused on a GPU."""
    data = project_pairs(tmp_path)
    run_bench(tmp_path, data, "--limit", "2")
    import rewardmodel
    real = rewardmodel.RewardModel.score
    monkeypatch.setattr(rewardmodel.RewardModel, "score",
                        lambda *a, **k: (_ for _ in ()).throw(ValueError("bad ratio")))
    with pytest.raises(RuntimeError, match=r"scoring .*val.jsonl:3, .*val.jsonl:4, .*ValueError\('bad ratio'\)"):
        run_bench(tmp_path, data)  # 2 images are cached, the others are scored
    monkeypatch.setattr(rewardmodel.RewardModel, "score", real)

    class Cuda(str):  # loads on the CPU, keys as a CUDA device would
        type = "cuda"
    monkeypatch.setattr(bench, "setup_distributed", lambda device: Dist(device=Cuda("cpu")))
    assert run_bench(tmp_path, data, "--limit", "2")["scored_now"] == 4


def test_a_group_dropped_by_skip_bad_is_listed_and_none_left_is_an_error(tmp_path, capsys):
    """A TIGER group whose comparisons contradict is dropped under --skip_bad, and said; when no group is left, the
    run stops instead of writing an empty table."""
    cycle = (("A>B", "C>A", "B>C"), "y")  # A>B>C>A
    r = run_bench(tmp_path, tiger_bench(tmp_path, ((("A>B", "A>C", "B>C"), "x"), cycle)), "--skip_bad")
    assert r["groups"]["sizes"]["3"]["groups"] == 1 and r["skipped_rows"] == 1
    assert "skipped group 'y/t1'" in capsys.readouterr().err
    with pytest.raises(SystemExit, match="no groups left"):
        run_bench(tmp_path, tiger_bench(tmp_path, (cycle,)), "--skip_bad")


def test_smoke_verifier_mode(tmp_path):
    """A tiny verifier checkpoint (30 SFT steps on 8 templated traces: it learns the answer format, not the
    images) scored with Avg@2 through RewardModel.from_pretrained; then EditScore's rubric zero-shot on the
    random tiny VLM, which never answers in the rubric's format: every pass is counted, no score is invented."""
    data = project_pairs(tmp_path)
    traces = write_jsonl(tmp_path / "traces.jsonl", [
        {"id": f"t{i}", "instruction": f"edit {i}", "source": f"images/{i % 6}_src.png",
         "edited": f"images/{i % 6}_a.png", "response": f'follow {i % 4}/4\n{{"follow": {i % 4}, "score": {i}}}'}
        for i in range(8)])
    subprocess.run([sys.executable, "rewardmodel.py", "--mode", "verifier", "--stage", "sft", "--train", traces,
                    "--out_dir", str(tmp_path / "verifier"), "--max_steps", "30", "--batch_size", "8", "--lr", "1e-2",
                    "--warmup_steps", "3", "--lora_rank", "64", "--lora_alpha", "128", "--max_pixels", "3136"],
                   cwd=ROOT, env={**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}, check=True,
                   capture_output=True)
    r = run_bench(tmp_path, data, "--k", "2", model=str(tmp_path / "verifier"))
    assert r["k"] == 2 and r["images"] == 12
    assert all(isinstance(v[m], float) for v in r["pairwise"].values() for m in ("tie_calibrated", "with_ties"))
    scores = bench.read_cache(tmp_path / "bench" / "cache")
    assert all(set(s) == {"overall", "follow", "unparsed"} for s in scores.values())  # the principle it was taught
    assert r["unparsed"]["passes"] == sum(s["unparsed"] for s in scores.values()) < 2 * 12  # most passes parse

    r = run_bench(tmp_path, data, "--rubric", "editscore", "--k", "2", "--max_new_tokens", "4", "--limit", "2")
    assert r["unparsed"] == {"passes": 4 * 2, "images": 4, "unscored_images": 4} and r["scored_now"] == 4
    assert r["pairwise"]["overall"]["without_ties"] == 0.0  # a NaN score never wins a pair
    assert run_bench(tmp_path, data, "--limit", "2")["scored_now"] == 4  # the Gaussian tiny is another scorer


def test_k_passes_and_max_new_tokens_on_a_gaussian_model_are_unused_and_it_says_so(tmp_path, capsys):
    data = project_pairs(tmp_path)
    run_bench(tmp_path, data, "--limit", "2")
    one = bench.read_cache(tmp_path / "bench" / "cache")
    assert "a Gaussian reward model is deterministic" not in capsys.readouterr().out
    run_bench(tmp_path, data, "--limit", "2", "--k", "3")
    assert "--k 3: a Gaussian reward model is deterministic, so each image is scored once" in capsys.readouterr().out
    three = {k: v for k, v in bench.read_cache(tmp_path / "bench" / "cache").items() if k not in one}
    assert sorted(map(json.dumps, three.values())) == sorted(map(json.dumps, one.values()))  # the same scores
    run_bench(tmp_path, data, "--limit", "2", "--max_new_tokens", "64")  # an EditScore command's flag
    assert "--max_new_tokens 64: a Gaussian reward model generates no answer" in capsys.readouterr().out


def test_cache_shares_images_and_skips_rescoring(tmp_path):
    data = editscore_bench(tmp_path)
    first = run_bench(tmp_path, data)
    second = run_bench(tmp_path, data)
    assert (first["scored_now"], second["scored_now"]) == (8, 0)
    assert first["editscore"] == second["editscore"]


def test_the_cache_key_follows_the_scoring_code(tmp_path, monkeypatch):
    """A changed default, sampler or prompt in rewardmodel.py changes the scores: a run after it scores anew."""
    data, code = editscore_bench(tmp_path), tmp_path / "rewardmodel.py"
    code.write_text(bench.SCORER_CODE.read_text())
    monkeypatch.setattr(bench, "SCORER_CODE", code)
    assert [run_bench(tmp_path, data)["scored_now"] for _ in range(2)] == [8, 0]
    code.write_text(code.read_text() + "# an edit\n")
    assert run_bench(tmp_path, data)["scored_now"] == 8


def cached_keys(cache):
    keys = []
    for p in cache.glob("*.jsonl"):
        for line in open(p):
            try:
                keys.append(json.loads(line)["key"])
            except json.JSONDecodeError:
                pass  # the torn line a SIGKILL can leave
    return keys


def test_the_cache_key_ignores_bench_output_inside_the_model_and_follows_a_gcpo_checkpoints_sft_model(tmp_path):
    """bench.py --out_dir inside --model must not make every rerun a cache miss (its cache files are not the
    model's); a GCPO checkpoint loads the SFT model named by its --init, so a new SFT model is a new scorer, unless
    the checkpoint carries its own copy (init/): then that copy's files are in the key, and --init's folder is not."""
    sft, gcpo = tmp_path / "sft", tmp_path / "gcpo"
    for d, flags in ((sft, {"init": None}), (gcpo, {"init": str(sft)})):
        d.mkdir()
        (d / "args.json").write_text(json.dumps(flags))
    key = bench.scorer_id(str(gcpo), str(gcpo / "bench"))
    (gcpo / "bench" / "cache").mkdir(parents=True)
    (gcpo / "bench" / "cache" / "scores.rank0.jsonl").write_text("{}")
    assert bench.scorer_id(str(gcpo), str(gcpo / "bench")) == key
    (sft / "adapter.safetensors").write_text("retrained")
    assert bench.scorer_id(str(gcpo), str(gcpo / "bench")) != key
    (gcpo / "init").mkdir()  # a checkpoint with its own copy of the SFT model loads that: the copy is in its key,
    (gcpo / "init" / "args.json").write_text(json.dumps({"init": None}))  # the folder --init names is not
    key = bench.scorer_id(str(gcpo), str(gcpo / "bench"))
    (sft / "adapter.safetensors").write_text("retrained again")
    assert bench.scorer_id(str(gcpo), str(gcpo / "bench")) == key
    (gcpo / "init" / "adapter.safetensors").write_text("another copy")
    assert bench.scorer_id(str(gcpo), str(gcpo / "bench")) != key


def test_kill_and_resume_and_torchrun(tmp_path):
    """SIGKILL a run once it has cached a few images; the rerun scores only the rest, and reports the same
    numbers as an uninterrupted run sharded over two torchrun ranks (gloo). One image per scoring call in
    both, so that padding cannot move a score by a rounding error and an epsilon with it."""
    data = project_pairs(tmp_path, n=30)
    flags = ["bench.py", "--bench", data, "--model", "tiny", "--device", "cpu"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    cache = tmp_path / "bench" / "cache"                                 # run_bench's
    proc = subprocess.Popen([sys.executable, *flags, "--batch_size", "1", "--out_dir", str(tmp_path / "bench")],
                            cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 60
    while len(cached_keys(cache)) < 3 and proc.poll() is None and time.time() < deadline:
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done = len(cached_keys(cache))
    assert 0 < done < 60, "the run was not interrupted halfway"

    resumed = run_bench(tmp_path, data, "--batch_size", "1")            # same cache dir, in-process
    keys = cached_keys(cache)
    assert resumed["scored_now"] == 60 - done
    assert len(keys) == len(set(keys)) == 60                             # every image scored exactly once

    torchrun = os.path.join(os.path.dirname(sys.executable), "torchrun")
    res = subprocess.run([torchrun, "--standalone", "--nproc_per_node=2", *flags, "--batch_size=2",
                          "--out_dir", str(tmp_path / "fresh")], cwd=ROOT, env=env, capture_output=True, text=True)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-5000:]
    fresh = json.loads((tmp_path / "fresh" / "report.json").read_text())
    assert len(list((tmp_path / "fresh" / "cache").glob("*.jsonl"))) == 2 and fresh["scored_now"] == 60
    assert resumed["pairwise"] == fresh["pairwise"]


def test_matches_rewardmodel_heldout_accuracy(tmp_path):
    """bench.py's accuracy without ties is rewardmodel.py's held-out accuracy: same RewardModel.score, same
    pairs (read without tie-disentanglement, so a tied pair counts as a tie in every dimension)."""
    from data import load_pairs
    from rewardmodel import RewardModel, evaluate
    data = project_pairs(tmp_path)
    report = run_bench(tmp_path, data)
    expected = evaluate(RewardModel.from_pretrained("tiny"), load_pairs(data, disentangle=False), batch_size=5)
    accuracy = {d: v for d, v in expected.items() if not d.startswith("sigma_")}
    assert {d: report["pairwise"][d]["without_ties"] for d in accuracy} == accuracy and len(accuracy) == 3
