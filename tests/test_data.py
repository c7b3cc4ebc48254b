"""Tests of data.py: every loader on a fixture in its real schema, ties, rankings, bad input, the toy world."""
import hashlib
import io
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

import data
from data import DataError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def png_bytes(color, size=(8, 8), mode="RGB"):
    buf = io.BytesIO()
    Image.new(mode, size, color).save(buf, "PNG")
    return buf.getvalue()


def write_png(path, color, size=(8, 8)):
    Image.new("RGB", size, color).save(path)
    return os.path.basename(path)


def write_jsonl(path, rows):
    with open(path, "w") as f:
        for r in rows:
            f.write((r if isinstance(r, str) else json.dumps(r)) + "\n")
    return str(path)


def to_parquet(path, columns, images=(), image_lists=()):
    """A parquet file in the `datasets` layout: image columns use the Image feature with embedded bytes."""
    import datasets
    feats = {}
    for k, v in columns.items():
        if k in images:
            feats[k] = datasets.Image()
        elif k in image_lists:
            feats[k] = datasets.List(datasets.Image())
        else:
            feats[k] = datasets.Dataset.from_dict({k: v}).features[k]
    ds = datasets.Dataset.from_dict(columns, features=datasets.Features(feats))
    ds.to_parquet(str(path))
    return str(path)


def img(color):
    return {"bytes": png_bytes(color), "path": None}


def rgb(ref):
    return tuple(np.asarray(data.load_image(ref))[0, 0])


# ---------------------------------------------------------------------------------------------------- loaders

def test_editreward_training_json(tmp_path):
    """TIGER-AI-Lab/EditReward EditReward/TRAIN_README.md: path1 is always the preferred image; dim1 instruction
    following, dim2 visual quality; tie_case marks the annotated ties."""
    for n, c in [("s", (0, 0, 0)), ("a", (255, 0, 0)), ("b", (0, 255, 0))]:
        write_png(tmp_path / f"{n}.png", c)
    base = {"prompt": "make it red", "path_src": "s.png", "path1": "a.png", "path2": "b.png", "confidence": 0.9}
    rows = [dict(base, model1_dim1_score=4, model1_dim2_score=3, model1_overall_score=7,
                 model2_dim1_score=2, model2_dim2_score=3, model2_overall_score=5, tie_case=0),
            # tied overall, dimensions disagree: tie-disentanglement makes two samples
            dict(base, model1_dim1_score=4, model1_dim2_score=1, model1_overall_score=5,
                 model2_dim1_score=1, model2_dim2_score=4, model2_overall_score=5, tie_case=1)]
    (tmp_path / "train.json").write_text(json.dumps(rows))
    pairs = data.load_pairs(str(tmp_path / "train.json"))
    assert len(pairs) == 3
    p = pairs[0]
    assert p.prefs == {"instruction_following": 1, "visual_quality": 0, "overall": 1} and not p.tie
    assert rgb(p.preferred) == (255, 0, 0) and rgb(p.sources[0]) == (0, 0, 0)
    by_dim = {next(d for d in q.prefs if d != "overall"): q for q in pairs[1:]}
    assert rgb(by_dim["instruction_following"].preferred) == (255, 0, 0)
    assert rgb(by_dim["visual_quality"].preferred) == (0, 255, 0)
    assert all(q.prefs == {d: 1, "overall": 0} and not q.tie for d, q in by_dim.items())
    kept = data.load_pairs(str(tmp_path / "train.json"), disentangle=False)
    assert len(kept) == 2 and kept[1].tie and kept[1].prefs["overall"] == 0
    # path1 first even where path2 has the larger overall score; equal scores with tie_case false are no tie
    rows = [dict(base, model1_dim1_score=2, model1_dim2_score=2, model1_overall_score=4, model1="m1", model2="m2",
                 model2_dim1_score=4, model2_dim2_score=3, model2_overall_score=7, tie_case=False),
            dict(base, model1_dim1_score=2, model1_dim2_score=3, model1_overall_score=5,
                 model2_dim1_score=3, model2_dim2_score=2, model2_overall_score=5, tie_case=False)]
    (tmp_path / "t2.json").write_text(json.dumps(rows))
    a, b = data.load_pairs(str(tmp_path / "t2.json"))
    assert rgb(a.preferred) == (255, 0, 0) and a.prefs == {"instruction_following": -1, "visual_quality": -1,
                                                           "overall": 1}
    assert a.meta["models"] == {"preferred": "m1", "rejected": "m2"} and a.scores["rejected"]["overall"] == 7
    assert not b.tie and b.prefs["overall"] == 1 and rgb(b.preferred) == (255, 0, 0)


def test_editreward_validation_json(tmp_path):
    """TIGER-AI-Lab/EditReward data/dataset/valid_dataset_1.json: dim1 scores only and a 0..1 float overall score
    (which may favour path2); no tie_case. As its evaluate/eval_bench.py, the higher dim1 is preferred (path1 in
    that file's rows, whatever the float overall), equal dim1 scores are a tie."""
    for n, c in [("s", (0, 0, 0)), ("a", (255, 0, 0)), ("b", (0, 255, 0))]:
        write_png(tmp_path / f"{n}.png", c)
    row = {"prompt": "Put popcorn in the plate.", "choice_dist": None, "confidence": None, "path_src": "s.png",
           "path1": "a.png", "path2": "b.png", "model1": "Prompt2prompt", "model2": "InstructPix2Pix",
           "model1_dim1_score": 4, "model2_dim1_score": 2, "model1_overall_score": 0.29556744009866087,
           "model2_overall_score": 0.64284362778929}
    rows = [row, {**row, "model1_dim1_score": 2, "model2_dim1_score": 4}, {**row, "model2_dim1_score": 4}]
    (tmp_path / "valid_dataset_1.json").write_text(json.dumps(rows))
    p, q, t = data.load_pairs(str(tmp_path / "valid_dataset_1.json"), disentangle=False)
    assert rgb(p.preferred) == (255, 0, 0) and not p.tie
    assert p.prefs == {"instruction_following": 1, "overall": 1}
    assert p.scores["preferred"] == {"instruction_following": 4, "overall": 0.29556744009866087}
    assert rgb(q.preferred) == (0, 255, 0) and q.prefs == {"instruction_following": 1, "overall": 1} and not q.tie
    assert q.meta["models"] == {"preferred": "InstructPix2Pix", "rejected": "Prompt2prompt"}
    assert q.scores["preferred"]["instruction_following"] == 4
    assert t.tie and t.prefs == {"instruction_following": 0, "overall": 0}


def test_editreward_json_paths_from_the_working_directory(tmp_path, monkeypatch):
    """EditReward's own JSON files name images relative to its repository's root, where its scripts run (its
    evaluate/eval_bench.py opens them as given): a path not found beside the file is read from the working directory.
    One found beside the file wins."""
    for d in ("imgs", "data", "data/imgs"):
        (tmp_path / d).mkdir()
    for n, c in [("s", (0, 0, 0)), ("a", (255, 0, 0)), ("b", (0, 255, 0))]:
        write_png(tmp_path / "imgs" / f"{n}.png", c)
    row = {"prompt": "Put popcorn in the plate.", "path_src": "imgs/s.png", "path1": "imgs/a.png",
           "path2": "imgs/b.png", "model1_dim1_score": 4, "model2_dim1_score": 2}
    (tmp_path / "data" / "v.json").write_text(json.dumps([row]))
    monkeypatch.chdir(tmp_path)
    (p,) = data.load_pairs("data/v.json")
    assert rgb(p.preferred) == (255, 0, 0) and rgb(p.rejected) == (0, 255, 0)
    write_png(tmp_path / "data" / "imgs" / "a.png", (0, 0, 255))
    assert rgb(data.load_pairs("data/v.json")[0].preferred) == (0, 0, 255)


def test_a_file_saved_with_a_bom_reads_its_first_row(tmp_path):
    """Windows editors save UTF-8 with a byte-order mark: it is no part of row 1 (a .jsonl's first row was lost, a
    .json array was read as lines)."""
    write_png(tmp_path / "ok.png", (10, 20, 30))
    rows = [{"id": i, "instruction": "make it red", "source": "ok.png", "preferred": "ok.png", "rejected": "ok.png"}
            for i in "ab"]
    (tmp_path / "p.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8-sig")
    (tmp_path / "p.json").write_text(json.dumps(rows), encoding="utf-8-sig")
    for name in ("p.jsonl", "p.json"):
        assert [p.id for p in data.load_pairs(str(tmp_path / name), disentangle=False)] == ["a", "b"]


def test_a_truncated_image_of_any_format_is_found_at_load(tmp_path):
    """verify() checks the pixel data of a PNG only: a BMP, TIFF or GIF cut short passed the load's check and failed
    hours into a run. Every format is decoded at the check (a JPEG at 1/8 size)."""
    for fmt in ("BMP", "TIFF", "GIF", "JPEG", "PNG"):
        buf = io.BytesIO()
        Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(buf, fmt)
        (tmp_path / f"cut.{fmt}").write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
        (tmp_path / f"ok.{fmt}").write_bytes(buf.getvalue())
        assert data.load_image(str(tmp_path / f"ok.{fmt}"), verify=True) is None
        with pytest.raises(DataError, match=f"corrupt image .*cut.{fmt}"):
            data.load_image(str(tmp_path / f"cut.{fmt}"), "row 1", verify=True)


def test_a_jsonl_string_may_hold_unicode_line_separators(tmp_path):
    """json.dumps(ensure_ascii=False) writes U+2028, U+0085 and the like raw inside strings: one row each still,
    numbered by its line."""
    write_png(tmp_path / "ok.png", (10, 20, 30))
    row = {"instruction": "make the sky pink\u2028then add a\x85moon", "source": "ok.png", "preferred": "ok.png",
           "rejected": "ok.png"}
    (tmp_path / "u.jsonl").write_text("".join(json.dumps({**row, "id": i}, ensure_ascii=False) + "\n" for i in "ab"),
                                      encoding="utf-8")
    pairs = data.load_pairs(str(tmp_path / "u.jsonl"), disentangle=False)
    assert [(p.id, p.origin, p.instruction) for p in pairs] == [(i, f"{tmp_path}/u.jsonl:{n}", row["instruction"])
                                                                for n, i in ((1, "a"), (2, "b"))]


def test_editreward_data_parquet_with_embedded_images(tmp_path):
    """TIGER-Lab/EditReward-Data card: left/right_{instruction_following, quality_aesthetic, overall}_score, vote_type,
    key / unique_key; images embedded in the parquet."""
    cols = {"instruction": ["add a hat", "remove the dog"],
            "source_img": [img((0, 0, 0))] * 2,
            "left_output_image": [img((255, 0, 0))] * 2, "right_output_image": [img((0, 0, 255))] * 2,
            "left_instruction_following_score": [2, 3], "left_quality_aesthetic_score": [2, 3],
            "left_overall_score": [4, 6], "right_instruction_following_score": [4, 3],
            "right_quality_aesthetic_score": [3, 3], "right_overall_score": [7, 6],
            "vote_type": ["rightvote", "tie"], "unique_key": ["u0", "u1"], "left_model": ["a", "a"],
            "right_model": ["b", "b"]}
    path = to_parquet(tmp_path / "d.parquet", cols, images=("source_img", "left_output_image", "right_output_image"))
    pairs = data.load_pairs(path)
    assert len(pairs) == 2
    assert rgb(pairs[0].preferred) == (0, 0, 255)  # right scored higher, so it is the preferred image, with its model
    assert pairs[0].meta["models"] == {"preferred": "b", "rejected": "a"} and pairs[1].meta["models"]["preferred"] == "a"
    assert pairs[0].prefs == {"instruction_following": 1, "visual_quality": 1, "overall": 1}
    assert pairs[1].tie and pairs[1].prefs == {"instruction_following": 0, "visual_quality": 0, "overall": 0}
    assert pairs[0].origin.endswith(":0") and pairs[1].origin.endswith(":1")
    assert [p.id for p in pairs] == ["u0", "u1"]  # TIGER-Lab/EditReward-Data's unique_key, not the row index


def noise_blobs(k):
    """k random 160 px images as `datasets` image cells: incompressible, ~77 KB of PNG each -> (arrays, cells)."""
    noise = [np.random.default_rng(i).integers(0, 256, (160, 160, 3), dtype=np.uint8) for i in range(k)]
    blobs = []
    for x in noise:
        Image.fromarray(x).save(buf := io.BytesIO(), "PNG")
        blobs.append({"bytes": buf.getvalue(), "path": None})
    return noise, blobs


def load_holding(path):
    """load_pairs(path), checking every image, on a warm `datasets` cache -> (pairs, bytes still held after it)."""
    import tracemalloc
    data.load_pairs(path, check_images=False)  # the first load builds `datasets`' on-disk cache
    tracemalloc.start()
    pairs = data.load_pairs(path)
    held = tracemalloc.get_traced_memory()[0]
    tracemalloc.stop()
    return pairs, held


def test_hub_images_stay_on_disk_until_used(tmp_path):
    """EditReward-Data's images (338 GB per its card) cannot all sit in RAM: a loaded row holds a lazy ref to its
    image cell, read when the image is used; a null cell is still an error naming the row and column."""
    noise, blobs = noise_blobs(3)
    n = 24
    cols = {"instruction": ["add a hat"] * n, "source_img": [{"bytes": png_bytes((i, 0, 0)), "path": None}
                                                             for i in range(n)],
            **{f"{s}_{d}_score": [1 + (s == "left")] * n for s in ("left", "right")
               for d in ("instruction_following", "quality_aesthetic", "overall")},
            "left_output_image": [blobs[0]] * n, "right_output_image": [blobs[1]] * (n - 1) + [blobs[2]]}
    pairs, held = load_holding(to_parquet(tmp_path / "d.parquet", cols, images=("source_img", "left_output_image",
                                                                              "right_output_image")))
    assert len(pairs) == n and held < 2 * n * len(blobs[0]["bytes"]) / 5, held  # 1/5 of the edits alone
    assert not any(isinstance(x, bytes) for p in pairs for x in [*p.sources, p.preferred, p.rejected])
    assert rgb(pairs[5].sources[0]) == (5, 0, 0) and (np.asarray(data.load_image(pairs[-1].rejected)) == noise[2]).all()
    cols["source_img"][3] = None
    with pytest.raises(DataError, match=r"n.parquet:3: column 'source_img' is null"):
        data.load_pairs(to_parquet(tmp_path / "n.parquet", cols, images=("source_img", "left_output_image",
                                                                          "right_output_image")))


def test_editscore_bench(tmp_path):
    """EditScore/EditReward-Bench card and VectorSpaceLab/EditScore evaluation.py: key [2], output_images [2] with
    element 0 preferred on `dimension`."""
    cols = {"key": [["k1", "k2"], ["k1", "k2"]], "instruction": ["make the sky pink"] * 2,
            "input_image": [img((1, 1, 1))] * 2, "output_images": [[img((9, 9, 9)), img((200, 0, 0))]] * 2,
            "task_type": ["color_alter", "color_alter"], "dimension": ["prompt_following", "overall"]}
    path = to_parquet(tmp_path / "b.parquet", cols, images=("input_image",), image_lists=("output_images",))
    pairs = data.load_pairs(path)
    assert [p.prefs for p in pairs] == [{"prompt_following": 1}, {"overall": 1}]
    assert rgb(pairs[0].preferred) == (9, 9, 9) and pairs[0].category == "color_alter"
    assert pairs[0].id != pairs[1].id  # one image pair judged on two dimensions stays two items


def test_hub_lists_of_images_stay_on_disk_until_used(tmp_path):
    """EditScore/EditReward-Bench holds its two edits a row in a list-of-images column: each element is a lazy ref,
    read when used, as a single image column's cell is; a null or empty list is an error naming the row."""
    noise, blobs = noise_blobs(2)
    n = 24
    cols = {"key": [[f"k{i}", "x"] for i in range(n)], "instruction": ["make the sky pink"] * n,
            "input_image": [img((i, 0, 0)) for i in range(n)], "output_images": [blobs] * (n - 1) + [blobs[::-1]],
            "task_type": ["color_alter"] * n, "dimension": ["overall"] * n}
    pairs, held = load_holding(to_parquet(tmp_path / "b.parquet", cols, images=("input_image",),
                                          image_lists=("output_images",)))
    assert len(pairs) == n and held < 2 * n * len(blobs[0]["bytes"]) / 5, held  # 1/5 of the edits alone
    assert all(callable(x) for p in pairs for x in [*p.sources, p.preferred, p.rejected])
    assert rgb(pairs[5].sources[0]) == (5, 0, 0)
    assert (np.asarray(data.load_image(pairs[-1].preferred)) == noise[1]).all()  # the last row's list is reversed
    for name, bad, err in (("empty", [], "is an empty list of images"), ("null", None, "is null")):
        cols["output_images"][3] = bad
        with pytest.raises(DataError, match=f"{name}.parquet:3: column 'output_images' {err}"):
            data.load_pairs(to_parquet(tmp_path / f"{name}.parquet", cols, images=("input_image",),
                                       image_lists=("output_images",)))

def test_editscore_bench_save_to_disk_folder(tmp_path):
    """EditScore/EditReward-Bench on the hub is a save_to_disk folder (state.json + data-*.arrow; its card loads it
    with load_dataset(..., split="train"), VectorSpaceLab/EditScore evaluation.py): a local copy reads the same."""
    import datasets
    feats = datasets.Features({"key": datasets.List(datasets.Value("string")), "instruction": datasets.Value("string"),
                               "input_image": datasets.Image(), "output_images": datasets.List(datasets.Image()),
                               "task_type": datasets.Value("string"), "dimension": datasets.Value("string")})
    cols = {"key": [["k1", "k2"]], "instruction": ["make the sky pink"], "input_image": [img((1, 1, 1))],
            "output_images": [[img((9, 9, 9)), img((200, 0, 0))]], "task_type": ["color_alter"],
            "dimension": ["consistency"]}
    datasets.Dataset.from_dict(cols, features=feats).save_to_disk(str(tmp_path / "bench"))
    assert (tmp_path / "bench" / "state.json").exists()
    (p,) = data.load_pairs(str(tmp_path / "bench"))
    assert p.prefs == {"consistency": 1} and rgb(p.preferred) == (9, 9, 9) and p.id == "k1~k2~consistency"
    # a saved DatasetDict of one split (a saved GenAI-Bench holds test_v1 alone) reads that split without --split
    datasets.DatasetDict({"test_v1": datasets.Dataset.from_dict(cols, features=feats)}).save_to_disk(
        str(tmp_path / "dict"))
    assert [q.id for q in data.load_pairs(str(tmp_path / "dict"))] == [p.id]
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "state.json").write_text("{not json")
    with pytest.raises(DataError, match="broken: cannot open"):  # never a raw traceback from `datasets`
        data.load_pairs(str(tmp_path / "broken"))


def tiger_rows(groups):
    """Rows in the TIGER-Lab/EditReward-Bench schema (TIGER-AI-Lab/EditReward evaluate/inference_{2,3,4}pair_hf.py):
    one comparison a row; candidate_1 is the left, candidate_2 the right image of comparison_type."""
    cols = {k: [] for k in ("id", "instruction", "source_image", "candidate_1", "candidate_2", "ranking",
                            "comparison_type", "dataset", "score_1", "score_2", "model_1", "model_2")}
    for gid, shades, scores, rankings in groups:
        for n, (ct, ranking) in enumerate(rankings.items()):
            i, j = ord(ct[0]) - 65, ord(ct[3]) - 65
            for k, v in [("id", f"{gid}_{n}"), ("instruction", "turn it blue"), ("source_image", img((0, 0, 0))),
                         ("candidate_1", img((shades[i], 0, 0))), ("candidate_2", img((shades[j], 0, 0))),
                         ("ranking", ranking), ("comparison_type", ct), ("dataset", f"{len(shades)}pair"),
                         ("score_1", scores[i]), ("score_2", scores[j]), ("model_1", f"m{i}"), ("model_2", f"m{j}")]:
                cols[k].append(v)
    return cols


TIGER_IMAGES = ("source_image", "candidate_1", "candidate_2")


def test_tiger_bench_pairs_and_rebuilt_groups(tmp_path):
    three = ("g3", (10, 20, 30), (5.0, 8.0, 5.0), {"AvsB": "B>A", "AvsC": "A=C", "BvsC": "B>C"})
    four = ("g4", (1, 2, 3, 4), (9.0, 4.0, 6.0, 4.0),
            {"AvsB": "A>B", "AvsC": "A>C", "AvsD": "A>D", "BvsC": "C>B", "BvsD": "B=D", "CvsD": "C>D"})
    two = ("g2", (7, 8), (3.0, 3.0), {"AvsB": "A=B"})
    path = to_parquet(tmp_path / "t.parquet", tiger_rows([three, four, two]), images=TIGER_IMAGES)
    pairs = data.load_pairs(path)
    assert len(pairs) == 3 + 6 + 1 and [p.tie for p in pairs[:3]] == [False, True, False]
    p = pairs[0]  # B>A: the right image first, with its score and model
    assert rgb(p.preferred) == (20, 0, 0) and p.scores == {"preferred": {"overall": 8.0}, "rejected": {"overall": 5.0}}
    assert p.meta["models"] == {"preferred": "m1", "rejected": "m0"} and p.meta["group"] == "3pair/g3"
    groups = data.load_groups(path)
    assert [(g.id, g.ranks) for g in groups] == [("3pair/g3", [1, 0, 1]), ("4pair/g4", [0, 2, 1, 2]),
                                                      ("2pair/g2", [0, 0])]
    assert [rgb(c)[0] for c in groups[1].candidates] == [1, 2, 3, 4] and groups[1].meta["models"][2] == "m2"
    assert [s["overall"] for s in groups[0].scores] == [5.0, 8.0, 5.0]
    assert len(groups[1].to_pairs()) == 6 and sum(q.tie for q in groups[1].to_pairs()) == 1


def test_tiger_bench_sizes_are_folders_and_stay_apart(tmp_path):
    """TIGER-Lab/EditReward-Bench declares no configs: 2pair/, 3pair/, 4pair/ are folders of parquet shards, and the
    authors' scripts load everything and filter on `dataset`. A group id prefix may recur across sizes."""
    for size, shades, ranking in (("2pair", (7, 8), {"AvsB": "B>A"}), ("3pair", (1, 2, 3),
                                  {"AvsB": "A>B", "AvsC": "A>C", "BvsC": "B>C"})):
        (tmp_path / "bench" / size).mkdir(parents=True)
        to_parquet(tmp_path / "bench" / size / "train-00000-of-00001.parquet",
                   tiger_rows([("s1", shades, (1.0,) * len(shades), ranking)]), images=TIGER_IMAGES)
    (g,) = data.load_groups(str(tmp_path / "bench"), config="2pair")  # --config reads the folder
    assert g.id == "2pair/s1" and g.ranks == [1, 0] and g.category == "2pair"
    groups = data.load_groups(str(tmp_path / "bench"))  # everything: the same prefix "s1" in both sizes stays apart
    assert sorted((g.id, len(g.candidates)) for g in groups) == [("2pair/s1", 2), ("3pair/s1", 3)]


def test_tiger_bench_contradictions_name_the_group(tmp_path):
    cyc = ("g7", (1, 2, 3), (1.0, 2.0, 3.0), {"AvsB": "A>B", "AvsC": "C>A", "BvsC": "B>C"})
    ok = ("g8", (1, 2, 3), (3.0, 2.0, 1.0), {"AvsB": "A>B", "AvsC": "A>C", "BvsC": "B>C"})
    path = to_parquet(tmp_path / "c.parquet", tiger_rows([cyc, ok]), images=TIGER_IMAGES)
    assert len(data.load_pairs(path)) == 6  # each comparison alone is fine
    with pytest.raises(DataError, match="group '3pair/g7'.*cycle"):
        data.load_groups(path)
    (g,) = data.load_groups(path, skip_bad=True)
    assert g.id == "3pair/g8" and g.ranks == [0, 1, 2]
    tie = ("g9", (1, 2, 3), (1.0, 1.0, 1.0), {"AvsB": "A=B", "AvsC": "A>C", "BvsC": "B=C"})  # ties are transitive
    with pytest.raises(DataError, match="group '3pair/g9'.*contradicts"):
        data.load_groups(to_parquet(tmp_path / "t.parquet", tiger_rows([tie]), images=TIGER_IMAGES))
    bad = tiger_rows([ok])
    bad["ranking"][0] = "A>C"  # a verdict on another pair than comparison_type's
    with pytest.raises(DataError, match=r"b.parquet:0: column 'ranking'"):
        data.load_pairs(to_parquet(tmp_path / "b.parquet", bad, images=TIGER_IMAGES))


def test_a_tiger_group_that_lost_a_candidate_is_skipped_not_ranked_as_a_smaller_group(tmp_path):
    """A 4pair group whose rows with D were all skipped (a bad image) or are absent has 3 candidates left: it is
    no 3pair group. The `dataset` column gives the size; the group is skipped under skip_bad, else an error."""
    four = ("g4", (1, 2, 3, 4), (9.0, 4.0, 6.0, 4.0),
            {"AvsB": "A>B", "AvsC": "A>C", "AvsD": "A>D", "BvsC": "C>B", "BvsD": "B=D", "CvsD": "C>D"})
    rows, d_rows = tiger_rows([four]), [n for n, ct in enumerate(tiger_rows([four])["comparison_type"]) if "D" in ct]
    for n in d_rows:
        rows["candidate_2"][n] = {"bytes": b"not an image", "path": None}
    whole = tiger_rows([("g5",) + four[1:]])  # a second group, whole
    rows = {k: col + whole[k] for k, col in rows.items()}
    groups = data.load_groups(to_parquet(tmp_path / "d.parquet", rows, images=TIGER_IMAGES), skip_bad=True)
    assert [g.id for g in groups] == ["4pair/g5"] and len(groups.skipped) == 3 + 1
    assert groups.skipped[-1][0] == "group '4pair/g4'"
    absent = {k: [v for n, v in enumerate(col) if n not in d_rows] for k, col in tiger_rows([four]).items()}
    with pytest.raises(DataError, match="group '4pair/g4' .3 comparisons.*unordered"):
        data.load_groups(to_parquet(tmp_path / "a.parquet", absent, images=TIGER_IMAGES))


def test_a_checkpoint_folder_swapped_in_keeps_the_other_files_there(tmp_path):
    """atomic_dir replaces what write() writes and keeps the rest of the folder: a log tee'd there, a bench report."""
    final = tmp_path / "rm"
    data.atomic_dir(str(final), lambda d: open(os.path.join(d, "w.txt"), "w").write("1"))
    (final / "train.log").write_text("step 1")
    (final / "bench").mkdir()
    (final / "bench" / "report.json").write_text("{}")
    data.atomic_dir(str(final) + "/", lambda d: open(os.path.join(d, "w.txt"), "w").write("2"))
    assert (final / "w.txt").read_text() == "2" and (final / "train.log").read_text() == "step 1"
    assert (final / "bench" / "report.json").exists() and sorted(os.listdir(tmp_path)) == ["rm"]
    os.symlink("ckpt_1", tmp_path / "ckpt.tmp")  # the link a run killed while re-pointing `ckpt` left behind
    data.atomic_dir(str(tmp_path / "ckpt_2"), lambda d: None, link=str(tmp_path / "ckpt"))
    assert os.readlink(tmp_path / "ckpt") == "ckpt_2"
    (tmp_path / "rm.old").mkdir()  # a save killed while deleting the checkpoint before (hours of a 7B model's GBs)
    (tmp_path / "rm.old" / "optimizer.pt").write_text("half deleted")
    data.atomic_dir(str(final), lambda d: open(os.path.join(d, "w.txt"), "w").write("3"))  # failed: .old not empty
    assert (final / "w.txt").read_text() == "3" and not (final / "optimizer.pt").exists()
    assert (final / "train.log").exists() and not (tmp_path / "rm.old").exists()


def test_parse_ranking_by_hand():
    assert data.parse_ranking("A>B", 2) == [0, 1]
    assert data.parse_ranking("B>A", 2) == [1, 0]
    assert data.parse_ranking("A=B", 2) == [0, 0]
    assert data.parse_ranking("C>A=B>D", 4) == [1, 1, 0, 2]
    assert data.parse_ranking(["A<B", "B>C", "A=C"], 3) == [1, 0, 1]
    assert data.parse_ranking("B > A = C", 3) == data.parse_ranking("B>A, A=C", 3) == [1, 0, 1]  # spaces
    for bad in ["A>B>A", "A>B", "A>B, C>B", "A>E>B>C", "A?B>C"]:
        with pytest.raises(DataError, match="row 7"):
            data.parse_ranking(bad, 3, origin="row 7")


def test_group_to_pairs_by_hand():
    g = data.CandidateGroup("g", "x", ["s"], ["a", "b", "c"], [1, 0, 1],
                            scores=[{"q": 2, "overall": 3}, {"q": 1, "overall": 5}, {"q": 2, "overall": 3}])
    pairs = g.to_pairs()
    got = {(p.preferred, p.rejected): (p.tie, p.prefs) for p in pairs}
    assert got == {("b", "a"): (False, {"overall": 1, "q": -1}),
                   ("a", "c"): (True, {"overall": 0, "q": 0}),
                   ("b", "c"): (False, {"overall": 1, "q": -1})}


def test_genai_bench_votes(tmp_path, monkeypatch):
    """TIGER-AI-Lab/GenAI-Bench inference.py (parse_response) and results/image_edition/*/pairwise.jsonl: vote_type is
    leftvote, rightvote, tievote or bothbad_vote."""
    votes = ["leftvote", "rightvote", "tievote", "bothbad_vote"]
    cols = {"source_prompt": ["a cat"] * 4, "target_prompt": ["a dog"] * 4, "instruct_prompt": ["make it a dog"] * 4,
            "source_image": [img((0, 0, 0))] * 4, "left_model": ["m1"] * 4, "right_model": ["m2"] * 4,
            "left_output_image": [img((255, 0, 0))] * 4, "right_output_image": [img((0, 255, 0))] * 4,
            "vote_type": votes}
    path = to_parquet(tmp_path / "g.parquet", cols, images=("source_image", "left_output_image", "right_output_image"))
    pairs = data.load_pairs(path)
    assert [p.tie for p in pairs] == [False, False, True, True]
    assert rgb(pairs[0].preferred) == (255, 0, 0) and rgb(pairs[1].preferred) == (0, 255, 0)
    assert pairs[1].meta["models"] == {"preferred": "m2", "rejected": "m1"}
    assert [p.meta["vote_type"] for p in pairs[2:]] == ["tievote", "bothbad_vote"]
    cols["vote_type"] = ["leftvote", "tie", "leftvote", "leftvote"]  # not a GenAI-Bench vote
    with pytest.raises(DataError, match=r"h.parquet:1: column 'vote_type' must be one of"):
        data.load_pairs(to_parquet(tmp_path / "h.parquet", cols, images=("source_image", "left_output_image",
                                                                        "right_output_image")))
    import datasets  # by hub name: the image_edition config and its test_v1 split (919 votes) unless told otherwise
    seen = []
    monkeypatch.setattr(datasets, "load_dataset", lambda *a, **kw: seen.append((a, kw)) or datasets.Dataset.from_dict(
        {k: v[:1] for k, v in cols.items()}))
    data.load_items("TIGER-Lab/GenAI-Bench", check_images=False)
    data.load_items("TIGER-Lab/GenAI-Bench", split="test", check_images=False)
    data.load_items("TIGER-Lab/EditReward-Bench", config="4pair", check_images=False)  # no configs: 4pair/ a folder
    assert seen == [(("TIGER-Lab/GenAI-Bench",), {"name": "image_edition", "split": "test_v1"}),
                    (("TIGER-Lab/GenAI-Bench",), {"name": "image_edition", "split": "test"}),
                    (("TIGER-Lab/EditReward-Bench",), {"data_dir": "4pair", "split": "train"})]


def test_rl_prompt_sets(tmp_path):
    os.makedirs(tmp_path / "imgs")
    write_png(tmp_path / "imgs" / "a.png", (1, 2, 3))
    write_png(tmp_path / "imgs" / "b.png", (4, 5, 6))
    path = write_jsonl(tmp_path / "rl.jsonl", [
        {"instruction": "add a tree", "input_images": ["imgs/a.png", "imgs/b.png"], "task_type": "subject_add",
         "meta_data": {"source": "x"}}])
    (p,) = data.load_prompts(path)
    assert len(p.sources) == 2 and rgb(p.sources[1]) == (4, 5, 6) and p.category == "subject_add"
    assert p.meta["meta_data"] == {"source": "x"}  # EditScore-RL-Data's meta_data is kept
    other = write_jsonl(tmp_path / "rl_test.jsonl", [json.loads(open(path).read())])
    (q,) = data.load_prompts(other)
    assert p.id != q.id  # no id column: ids derived from file and row never collide across files
    cols = {"key": ["g1"], "task_type": ["style"], "instruction": ["in van gogh style"],
            "instruction_language": ["en"], "input_image": [img((7, 8, 9))]}
    gpath = to_parquet(tmp_path / "gedit.parquet", cols, images=("input_image",))
    (q,) = data.load_prompts(gpath)  # stepfun-ai/GEdit-Bench card: key is the id
    assert q.id == "g1" and rgb(q.sources[0]) == (7, 8, 9) and q.meta["instruction_language"] == "en"


def test_local_folder_through_datasets(tmp_path):
    os.makedirs(tmp_path / "bench" / "data")
    cols = {"key": ["g1"], "task_type": ["style"], "instruction": ["x"], "instruction_language": ["en"],
            "input_image": [img((7, 8, 9))]}
    to_parquet(tmp_path / "bench" / "data" / "train-00000.parquet", cols, images=("input_image",))
    (q,) = data.load_prompts(str(tmp_path / "bench"), split="train")
    assert rgb(q.sources[0]) == (7, 8, 9)


def test_project_jsonl_all_kinds(tmp_path):
    for n, c in [("s", (0, 0, 0)), ("a", (255, 0, 0)), ("b", (0, 255, 0))]:
        write_png(tmp_path / f"{n}.png", c)
    path = write_jsonl(tmp_path / "mine.jsonl", [
        {"id": "p", "instruction": "i", "source": "s.png", "preferred": "a.png", "rejected": "b.png",
         "prefs": {"instruction_following": 1, "visual_quality": -1, "overall": 0}},
        {"id": "g", "instruction": "i", "source": ["s.png"], "candidates": ["a.png", "b.png"], "ranking": "B>A"}])
    items = data.load_items(path)
    assert isinstance(items[0], data.PreferencePair) and items[0].tie
    assert isinstance(items[1], data.CandidateGroup) and items[1].ranks == [1, 0]
    pairs = data.load_pairs(path)
    assert len(pairs) == 3  # the tied pair is disentangled into two, the group gives one
    tpath = write_jsonl(tmp_path / "t.jsonl", [{"id": "t", "instruction": "i", "source": "s.png",
                                               "edited": "a.png", "response": "ok"}])
    assert data.load_traces(tpath)[0].response == "ok"
    with pytest.raises(DataError, match="t.jsonl:1: a CotTrace where PreferencePair items were expected"):
        data.load_pairs(tpath)


def test_outcomes_follow_their_candidates(tmp_path):
    """The optional "outcomes" column: per candidate in a group, per side in a pair; it moves with its image
    when to_pairs orders a group and when tie-disentanglement swaps a pair."""
    for n, c in [("s", (0, 0, 0)), ("a", (255, 0, 0)), ("b", (0, 255, 0)), ("c", (0, 0, 255))]:
        write_png(tmp_path / f"{n}.png", c)
    path = write_jsonl(tmp_path / "o.jsonl", [
        {"id": "p", "instruction": "i", "source": "s.png", "preferred": "a.png", "rejected": "b.png",
         "prefs": {"if": 1, "vq": -1, "overall": 0}, "outcomes": {"preferred": "correct", "rejected": "wrong"}},
        {"id": "g", "instruction": "i", "source": "s.png", "candidates": ["a.png", "b.png", "c.png"],
         "ranking": "C>A>B", "outcomes": ["partial", "wrong", "correct"]}])
    got = {p.id: (os.path.basename(p.preferred), p.meta["outcomes"]) for p in data.load_pairs(path)}
    assert got == {"p#if": ("a.png", {"preferred": "correct", "rejected": "wrong"}),
                   "p#vq": ("b.png", {"preferred": "wrong", "rejected": "correct"}),
                   "g:2-0": ("c.png", {"preferred": "correct", "rejected": "partial"}),
                   "g:2-1": ("c.png", {"preferred": "correct", "rejected": "wrong"}),
                   "g:0-1": ("a.png", {"preferred": "partial", "rejected": "wrong"})}
    for bad, line in [({"preferred": "correct"}, 1), (["a", "b"], 2)]:  # a side missing; 2 names for 3 candidates
        rows = [json.loads(r) for r in open(path)]
        rows[line - 1]["outcomes"] = bad
        with pytest.raises(DataError, match=rf"bad.jsonl:{line}: 'outcomes' must be"):
            data.load_items(write_jsonl(tmp_path / "bad.jsonl", rows))


def test_tie_disentanglement_by_hand():
    mk = lambda prefs, tie: data.PreferencePair("x", "i", ["s"], "A", "B", prefs, tie)
    out = data.disentangle_ties([
        mk({"if": 1, "vq": -1, "overall": 0}, True),   # split: A wins if, B wins vq
        mk({"if": 0, "vq": 0, "overall": 0}, True),    # tied everywhere: kept as a tie
        mk({"if": 1, "vq": 0, "overall": 0}, True),    # tied overall, one dimension decided: kept
        mk({"if": 1, "vq": -1, "overall": 1}, False)])  # strict overall: kept
    assert [(p.preferred, p.rejected, p.prefs, p.tie) for p in out] == [
        ("A", "B", {"if": 1, "overall": 0}, False), ("B", "A", {"vq": 1, "overall": 0}, False),
        ("A", "B", {"if": 0, "vq": 0, "overall": 0}, True), ("A", "B", {"if": 1, "vq": 0, "overall": 0}, True),
        ("A", "B", {"if": 1, "vq": -1, "overall": 1}, False)]


# ---------------------------------------------------------------------------------------------------- bad input

@pytest.fixture
def corpus(tmp_path):
    """The bad-input corpus: every row of bad.jsonl is broken in its own way, except row 1."""
    write_png(tmp_path / "ok.png", (10, 20, 30))
    (tmp_path / "trunc.png").write_bytes(png_bytes((1, 2, 3), (64, 64))[:60])
    row = lambda **kw: {"id": "r", "instruction": "edit it", "source": "ok.png", "preferred": "ok.png",
                        "rejected": "ok.png", **kw}
    rows = [row(), row(preferred="missing.png"), row(rejected="trunc.png"), '{"id": "x", "instruction": ',
            {"id": "y", "instruction": "no source", "preferred": "ok.png", "rejected": "ok.png"}, row(instruction="  "),
            row(prefs=[1]), {"id": "g", "instruction": "edit it", "source": "ok.png", "candidates": ["ok.png"] * 2,
                             "ranks": ["first", 0]}]
    return write_jsonl(tmp_path / "bad.jsonl", rows)


@pytest.mark.parametrize("line, pattern", [
    (2, r"one.jsonl:2: image file not found: .*missing.png"),
    (3, r"one.jsonl:3: corrupt image .*trunc.png"),
    (4, r"one.jsonl:4: malformed JSON line"),
    (5, r"one.jsonl:5: missing column 'source'"),
    (6, r"one.jsonl:6: column 'instruction' must be a non-empty string"),
    (7, r"one.jsonl:7: 'prefs' must map dimensions to -1, 0 or 1"),  # a wrong type is a DataError, never a traceback
    (8, r"one.jsonl:8: 'ranks' must be 2 integers, got \['first', 0\]")])
def test_bad_rows_stop_with_file_and_row(corpus, tmp_path, line, pattern):
    src = open(corpus).read().splitlines()  # good rows up to `line`, which is the one broken row
    path = write_jsonl(tmp_path / "one.jsonl", [src[0]] * (line - 1) + [src[line - 1]])
    with pytest.raises(DataError, match=pattern):
        data.load_pairs(path)


def test_skip_bad_counts_and_names_every_skipped_row(corpus, capsys):
    pairs = data.load_pairs(corpus, skip_bad=True)
    assert len(pairs) == 1
    assert [o.rsplit(":", 1)[1] for o, _ in pairs.skipped] == ["2", "3", "4", "5", "6", "7", "8"]
    err = capsys.readouterr().err
    assert "skipped 7 bad row(s)" in err and "bad.jsonl:6" in err and "bad.jsonl:8: 'ranks'" in err


@pytest.mark.parametrize("field, value", [("prefs", {"overall": 5}), ("prefs", {"overall": 0.5}),
                                          ("prefs", {"overall": "1"}), ("tie", "false"), ("tie", 1)])
def test_a_pairs_prefs_are_minus_one_zero_or_one_and_its_tie_a_boolean(tmp_path, field, value):
    """A 5 (a rating, not a preference) would score as a loss, a 0.5 as a tie, and the string "false" as a tie."""
    write_png(tmp_path / "s.png", (1, 2, 3))
    row = {"id": "p", "instruction": "i", "source": "s.png", "preferred": "s.png", "rejected": "s.png"}
    ok = data.load_pairs(write_jsonl(tmp_path / "ok.jsonl", [{**row, "prefs": {"overall": -1, "vq": 0}, "tie": False}]))
    assert ok[0].prefs == {"overall": -1, "vq": 0} and ok[0].tie is False
    with pytest.raises(DataError, match=rf"p.jsonl:1: 'prefs' must map dimensions to -1, 0 or 1 .*{value!r}"):
        data.load_pairs(write_jsonl(tmp_path / "p.jsonl", [{**row, field: value}]))


@pytest.mark.parametrize("field, value, pattern", [
    ("ranks", [0.9, 1.5], r"'ranks' must be 2 integers, got \[0.9, 1.5\]"),  # int() would truncate them to 0, 1
    ("ranks", [0, 1, 2], r"'ranks' must be 2 integers"),
    ("scores", [{"overall": 3}], r"'scores' must be 2 dicts of the same dimensions"),
    ("scores", [{"overall": 3}, {"if": 2}], r"'scores' must be 2 dicts of the same dimensions"),
    ("scores", ["high", "low"], r"'scores' must be 2 dicts"),
    ("scores", [{"overall": 3}, {"overall": "2"}], r"scores\[1\]: column 'overall' must be a finite number")])
def test_a_groups_ranks_and_scores_are_checked_where_the_row_is_read(tmp_path, field, value, pattern):
    """A bad group row fails with its file and row at load time, not later in to_pairs with a raw IndexError."""
    write_png(tmp_path / "s.png", (1, 2, 3))
    row = {"id": "g", "instruction": "i", "source": "s.png", "candidates": ["s.png"] * 2, "ranks": [1, 0],
           "scores": [{"overall": 2}, {"overall": 5}]}
    assert [p.scores for p in data.load_pairs(write_jsonl(tmp_path / "ok.jsonl", [row]))] == \
        [{"preferred": {"overall": 5.0}, "rejected": {"overall": 2.0}}]
    with pytest.raises(DataError, match=rf"g.jsonl:1: {pattern}"):
        data.load_pairs(write_jsonl(tmp_path / "g.jsonl", [{**row, field: value}]))


def test_an_empty_or_missing_source_and_a_missing_image_column_are_named(tmp_path, capsys):
    write_png(tmp_path / "s.png", (1, 2, 3))
    with pytest.raises(DataError, match=r"empty.jsonl: no PreferencePairs in it \(0 bad rows skipped\)"):
        data.load_pairs(write_jsonl(tmp_path / "empty.jsonl", []))
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"id": "p", "instruction": "i", "source": "gone.png",
                                               "preferred": "s.png", "rejected": "s.png"}])
    with pytest.raises(DataError, match=r"bad.jsonl: no PreferencePairs in it \(1 bad rows skipped\)"):
        data.load_pairs(bad, skip_bad=True)
    assert "gone.png" in capsys.readouterr().err  # what was skipped is listed before the error
    with pytest.raises(DataError, match=r"nowhere.jsonl: cannot open \(no such local path\)"):
        data.load_pairs(str(tmp_path / "nowhere.jsonl"))  # not "Couldn't reach ... on the Hub" alone
    triple = data.load_prompts(write_jsonl(tmp_path / "p.jsonl", [{"id": "e", "instruction": "i", "source": "s.png"}]))
    with pytest.raises(DataError, match=r"p.jsonl:1: no image"):  # a warm-up triple without its target
        data.load_image(triple[0].target, triple[0].origin)


def test_a_long_load_shows_its_progress_on_rank_zero_only(tmp_path, monkeypatch, capsys):
    import tqdm.std
    for side in "spr":
        write_png(tmp_path / f"{side}.png", (1, 2, 3))
    path = write_jsonl(tmp_path / "d.jsonl", [{"id": str(i), "instruction": "x", "source": "s.png", "preferred":
                                               "p.png", "rejected": "r.png"} for i in range(50)])
    assert len(data.load_pairs(path)) == 50 and "reading" not in capsys.readouterr().err  # a quick load: no bar
    clock = iter(range(10**6))  # each reading of tqdm's clock a second later: a load of minutes
    monkeypatch.setattr(tqdm.std, "time", lambda: float(next(clock)))
    monkeypatch.setenv("WORLD_SIZE", "2")
    for rank, shown in (("0", True), ("1", False)):
        monkeypatch.setenv("RANK", rank)
        assert len(data.load_pairs(path)) == 50
        assert (f"reading {path}: " in capsys.readouterr().err) is shown


def test_ranks_wait_hours_not_nccls_10_minutes_at_a_collective(monkeypatch):
    """Rank 0 writing a 7B full fine-tune's checkpoint, or bench ranks with slower shards, keep the others at a
    barrier for longer than NCCL's default timeout (10 minutes), which would stop the run; the group waits hours.
    On GPUs each rank sets its device before it joins the group."""
    import datetime

    import torch
    import torch.distributed as tdist
    called = {}
    monkeypatch.setattr(tdist, "init_process_group", lambda backend, **kw: called.update(kw, backend=backend))
    monkeypatch.setattr(tdist, "get_rank", lambda: 1)
    monkeypatch.setattr(tdist, "get_world_size", lambda: 2)
    monkeypatch.setattr(torch, "set_num_threads", lambda n: None)
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("LOCAL_RANK", "1")
    d = data.setup_distributed("cpu")
    assert (d.rank, d.world, called["backend"]) == (1, 2, "gloo")
    assert called["timeout"] >= datetime.timedelta(hours=1)
    # on GPUs: NCCL, and each rank's device is set before the group is made (its communicator lives there)
    order = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "set_device", lambda i: order.append(f"set_device {i}"))
    monkeypatch.setattr(tdist, "init_process_group", lambda backend, **kw: order.append(f"{backend} group"))
    assert data.setup_distributed("auto").device == torch.device("cuda:1")
    assert order == ["set_device 1", "nccl group"]


def test_under_torchrun_each_rank_verifies_its_share_of_the_images(tmp_path, monkeypatch):
    for i in range(3):
        for side in "spr":
            write_png(tmp_path / f"{side}{i}.png", (i, 0, 0))
    (tmp_path / "r1.png").write_bytes(png_bytes((1, 2, 3), (64, 64))[:60])  # the 6th image: rank 1 of 2 checks it
    path = write_jsonl(tmp_path / "d.jsonl", [{"id": str(i), "instruction": "x", "source": f"s{i}.png",
                                               "preferred": f"p{i}.png", "rejected": f"r{i}.png"} for i in range(3)])
    seen, real = [], data.load_image
    monkeypatch.setattr(data, "load_image", lambda ref, origin="", verify=False:
                        seen.append(os.path.basename(ref)) or real(ref, origin, verify))
    with pytest.raises(DataError, match=r"d.jsonl:2: corrupt image .*r1.png"):
        data.load_pairs(path)  # one process: all of them
    assert seen == ["s0.png", "p0.png", "r0.png", "s1.png", "p1.png", "r1.png"]
    monkeypatch.setenv("WORLD_SIZE", "2")
    shares = {}
    for rank in ("0", "1"):
        monkeypatch.setenv("RANK", rank)
        seen.clear()
        try:
            shares[rank] = (len(data.load_pairs(path)), list(seen))
        except DataError as e:
            shares[rank] = (str(e), list(seen))
    assert shares["0"] == (3, ["s0.png", "r0.png", "p1.png", "s2.png", "r2.png"])  # every other image, in order
    assert shares["1"][1] == ["p0.png", "s1.png", "r1.png"] and "d.jsonl:2: corrupt image" in shares["1"][0]
    for rank in ("0", "1"):  # skip_bad: every rank checks every image and skips the same row
        monkeypatch.setenv("RANK", rank)
        seen.clear()
        pairs = data.load_pairs(path, skip_bad=True)
        assert len(pairs) == 2 and [o for o, _ in pairs.skipped] == [f"{path}:2"] and len(seen) == 9


@pytest.mark.parametrize("forked", [False, True])
def test_a_bad_image_skips_every_row_that_shows_it_in_row_order(tmp_path, monkeypatch, forked):
    """The same rows are skipped whether the images are checked here or, for many of them, in forked processes."""
    seen, real = [], data.load_image
    monkeypatch.setattr(data, "load_image", lambda ref, origin="", verify=False: seen.append(ref) or real(ref, origin,
                                                                                                           verify))
    monkeypatch.setattr(data, "CHECK_POOL_MIN", 0 if forked else 10 ** 9)
    monkeypatch.setattr(data.os, "cpu_count", lambda: 2)
    for name in ("s", "p", "r"):
        write_png(tmp_path / f"{name}.png", (1, 2, 3))
    (tmp_path / "bad.png").write_bytes(png_bytes((1, 2, 3), (64, 64))[:60])
    rows = [{"id": str(i), "instruction": "x", "source": "s.png", "preferred": "p.png", "rejected": r}
            for i, r in enumerate(["r.png", "bad.png", "r.png", "bad.png"])]
    path = write_jsonl(tmp_path / "d.jsonl", rows[:2] + [{"id": "2", "source": "s.png"}] + rows[2:])
    pairs = data.load_pairs(path, skip_bad=True)  # rows 2 and 5 show the bad image, row 3 lacks columns
    assert [p.id for p in pairs] == ["0", "2"]
    assert [o for o, _ in pairs.skipped] == [f"{path}:{i}" for i in (2, 3, 5)]
    assert "corrupt image" in pairs.skipped[0][1] and "corrupt image" in pairs.skipped[2][1]
    assert len(seen) == (0 if forked else 4)  # forked: checked in the children (their calls are not seen here)
    with pytest.raises(DataError, match=r"e.jsonl:2: corrupt image"):  # without skip_bad: the first bad image's row
        data.load_pairs(write_jsonl(tmp_path / "e.jsonl", rows))


@pytest.mark.parametrize("value, pattern", [
    (float("nan"), "must be a finite number, got nan"), (float("inf"), "must be a finite number, got inf"),
    (True, "must be a finite number, got True"), (None, "column 'model2_dim1_score' is null"),
    ("four", "must be a finite number, got 'four'")])
def test_bad_scores_name_file_row_and_column(tmp_path, value, pattern):
    write_png(tmp_path / "s.png", (0, 0, 0))
    row = {"prompt": "p", "path_src": "s.png", "path1": "s.png", "path2": "s.png", "model1_dim1_score": 4,
           "model2_dim1_score": 2}
    (tmp_path / "v.json").write_text(json.dumps([row, dict(row, model2_dim1_score=value)]))
    with pytest.raises(DataError, match=r"v.json:1: column 'model2_dim1_score'") as e:
        data.load_pairs(str(tmp_path / "v.json"))
    assert pattern in str(e.value)
    pairs = data.load_pairs(str(tmp_path / "v.json"), skip_bad=True)
    assert len(pairs) == 1 and pairs.skipped[0][0].endswith("v.json:1")


@pytest.mark.parametrize("damage", ["truncated", "flipped"])
def test_a_damaged_jpeg_is_caught_when_the_data_loads_not_mid_run(tmp_path, damage):
    """PIL's verify() reads none of a JPEG's image data, so a cut or garbled JPEG used to pass the check and stop
    training at the step that decoded it, and again at that step after every --resume."""
    rng = np.random.default_rng(0)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (256, 256, 3), dtype=np.uint8)).save(buf, "JPEG")
    raw = bytearray(buf.getvalue())
    if damage == "flipped":
        raw[len(raw) // 2:len(raw) // 2 + 500] = bytes(b ^ 0xFF for b in raw[len(raw) // 2:len(raw) // 2 + 500])
    (tmp_path / "bad.jpg").write_bytes(raw[:len(raw) * 6 // 10] if damage == "truncated" else raw)
    write_png(tmp_path / "s.png", (1, 2, 3))
    row = {"id": "p", "instruction": "i", "source": "s.png", "preferred": "s.png", "rejected": "bad.jpg"}
    with pytest.raises(DataError, match=r"j.jsonl:1: corrupt image .*bad.jpg"):
        data.load_pairs(write_jsonl(tmp_path / "j.jsonl", [row]))
    (tmp_path / "ok.jpg").write_bytes(buf.getvalue())
    assert len(data.load_pairs(write_jsonl(tmp_path / "k.jsonl", [{**row, "rejected": "ok.jpg"}]))) == 1


def test_decoding_a_corrupt_embedded_image_names_the_row(tmp_path):
    cols = {"key": ["g1"], "task_type": ["style"], "instruction": ["x"], "instruction_language": ["en"],
            "input_image": [{"bytes": png_bytes((1, 1, 1), (32, 32))[:50], "path": None}]}
    path = to_parquet(tmp_path / "c.parquet", cols, images=("input_image",))
    with pytest.raises(DataError, match=r"c.parquet:0: corrupt image"):
        data.load_prompts(path)
    (p,) = data.load_prompts(path, check_images=False)  # lazily: the error comes at decode time, same message
    with pytest.raises(DataError, match=r"c.parquet:0: cannot decode image"):
        data.load_image(p.sources[0], p.origin)


def test_other_image_modes_become_rgb(tmp_path):
    Image.new("CMYK", (4, 4), (0, 255, 255, 0)).save(tmp_path / "cmyk.jpg", quality=100)
    r, g, b = rgb(str(tmp_path / "cmyk.jpg"))
    assert r > 230 and g < 30 and b < 30  # pure red in CMYK
    Image.new("P", (4, 4), 3).save(tmp_path / "p.png")
    assert data.load_image(str(tmp_path / "p.png")).mode == "RGB"


def test_exif_orientation_is_applied(tmp_path):
    im = Image.new("RGB", (6, 2), (0, 0, 0))
    exif = im.getexif()
    exif[0x0112] = 6  # rotate 90 degrees on display
    im.save(tmp_path / "rot.jpg", exif=exif)
    assert data.load_image(str(tmp_path / "rot.jpg")).size == (2, 6)


# ---------------------------------------------------------------------------------------------------- order, shards

@pytest.mark.parametrize("world_size", [1, 2, 3, 4])
def test_shards_partition_exactly(world_size):
    items = list(range(23))
    shards = [data.shard(items, r, world_size) for r in range(world_size)]
    flat = sorted(x for s in shards for x in s)
    assert flat == items
    assert max(map(len, shards)) - min(map(len, shards)) <= 1


# ---------------------------------------------------------------------------------------------------- toy world

def test_toy_oracle_on_hand_made_edits():
    scene = {"bg": "white", "shapes": [("circle", "red", "left"), ("square", "blue", "top right")]}
    src = data.render_scene(scene)
    instr = "make the red circle green"
    perfect = data.render_scene({"bg": "white", "shapes": [("circle", "green", "left"), ("square", "blue", "top right")]})
    s = data.toy_oracle(src, instr, perfect)
    assert s["instruction_following"] == 1.0 and s["visual_quality"] == 1.0 and s["overall"] == 1.0
    s = data.toy_oracle(src, instr, src)
    assert s["instruction_following"] == 0.0 and s["visual_quality"] == 1.0
    noisy = np.clip(perfect + np.random.default_rng(0).normal(0, 20, perfect.shape), 0, 255).astype(np.uint8)
    s = data.toy_oracle(src, instr, noisy)
    assert s["instruction_following"] == 1.0 and s["visual_quality"] < 0.8  # noise lowers quality only
    over = data.render_scene({"bg": "black", "shapes": [("circle", "green", "left"), ("square", "blue", "top right")]})
    s = data.toy_oracle(src, instr, over)
    assert s["change"] == 1.0 and s["instruction_following"] < 0.2  # done, but the background changed too
    # scoring works at another size than the source (the editor may output a different resolution)
    big = Image.fromarray(perfect).resize((112, 112), Image.NEAREST)
    assert data.toy_oracle(src, instr, big)["instruction_following"] > 0.9


@pytest.mark.parametrize("instruction, expect", [
    ("remove the red circle", {"bg": "white", "shapes": [("square", "blue", "top right")]}),
    ("add a cyan triangle at the center", {"bg": "white", "shapes": [("circle", "red", "left"),
                                                                      ("square", "blue", "top right"),
                                                                      ("triangle", "cyan", "center")]}),
    ("move the red circle to the bottom", {"bg": "white", "shapes": [("circle", "red", "bottom"),
                                                                      ("square", "blue", "top right")]}),
    ("change the background to gray", {"bg": "gray", "shapes": [("circle", "red", "left"),
                                                                ("square", "blue", "top right")]})])
def test_toy_target_matches_the_rendered_edit(instruction, expect):
    scene = {"bg": "white", "shapes": [("circle", "red", "left"), ("square", "blue", "top right")]}
    assert np.array_equal(data.toy_target(data.render_scene(scene), instruction), data.render_scene(expect))


def _digest(folder):
    h = hashlib.sha256()
    for root, _, files in sorted(os.walk(folder)):
        for f in sorted(files):
            h.update(f.encode())
            h.update(open(os.path.join(root, f), "rb").read())
    return h.hexdigest()


def test_toy_cot_response_score_is_instruction_following():
    scores = {"instruction_following": 0.93, "visual_quality": 0.3, "overall": 0.615, "change": 1.0, "keep": 0.93}
    follow = data.toy_cot_response("make the red circle blue", scores)
    assert follow == 'recolor: follow 4/4; keep 4/4; quality 2/4\n{"follow": 4, "keep": 4, "quality": 2, "score": 9}'


def test_toy_world_is_deterministic_and_loads(tmp_path):
    kw = dict(n_train=8, n_val=4, n_rl=4, n_rl_test=2, n_editor=6)
    data.make_toy(str(tmp_path / "a"), seed=3, **kw)
    data.make_toy(str(tmp_path / "b"), seed=3, **kw)
    data.make_toy(str(tmp_path / "c"), seed=4, **kw)
    assert _digest(tmp_path / "a") == _digest(tmp_path / "b") != _digest(tmp_path / "c")
    a = str(tmp_path / "a")
    groups = data.load_groups(f"{a}/bench.jsonl")
    assert len(groups) == 4 and all(len(g.candidates) == 4 and min(g.ranks) == 0 for g in groups)
    pairs = data.load_pairs(f"{a}/pairs_train.jsonl")
    assert pairs and all(set(p.prefs) <= {"instruction_following", "visual_quality", "overall"} for p in pairs)
    # the human-like labels agree with the oracle: the preferred image is never worse overall
    for g in groups:
        for p in g.to_pairs():
            i, j = g.candidates.index(p.preferred), g.candidates.index(p.rejected)
            assert g.scores[i]["overall"] >= g.scores[j]["overall"]
    for g in groups:  # each candidate's outcome is what it is: its instruction-following level shows it
        for c, o in zip(g.candidates, g.meta["outcomes"]):
            s = data.toy_oracle(data.load_image(g.sources[0]), g.instruction, data.load_image(c))
            lv = data.toy_level(s["instruction_following"])
            assert {"correct": lv == 4, "partial": lv == 3, "unchanged": lv == 1}.get(o, o in data.OUTCOMES), (o, lv)
    assert all(p.meta["outcomes"]["preferred"] in data.OUTCOMES for p in pairs)
    assert json.load(open(f"{a}/toy.json")) == {"seed": 3, "size": 56, "n_train": 8, "n_val": 4, "k": 4,
                                                 "editor_wrong": 0.65}
    assert not [f for f in os.listdir(a) if ".tmp" in f]  # every file written atomically, no leftovers
    traces = data.load_traces(f"{a}/cot_train.jsonl")
    assert traces and traces[0].response.count("\n") == 1 and '"score":' in traces[0].response
    # the teacher's final score follows instruction following alone; its verdicts include quality
    for t in traces:
        s = data.toy_oracle(data.load_image(t.sources[0]), t.instruction, data.load_image(t.edited))
        answer = json.loads(t.response.split("\n")[1])
        assert answer["score"] == round(10 * s["instruction_following"])
        assert answer["quality"] == data.toy_level(s["visual_quality"])
    ed = data.load_prompts(f"{a}/editor_train.jsonl")
    assert all(p.target is not None for p in ed)
    for p in ed:  # correct targets really are the oracle's perfect edit
        if p.meta["correct"]:
            s = data.toy_oracle(data.load_image(p.sources[0]), p.instruction, data.load_image(p.target))
            assert s["overall"] == 1.0
    rl = data.load_prompts(f"{a}/rl_test.jsonl")
    assert len(rl) == 2 and all(p.target is None for p in rl)


def test_toy_candidates_are_factorial():
    """Quality must not be guessable from what the edit does: noise level and outcome are independent."""
    import random
    rng = random.Random(0)
    seen = set()
    for _ in range(300):
        scene = data._random_scene(rng)
        instr = data._random_instruction(rng, scene)
        outcome, level = rng.choice(data.OUTCOMES), rng.randrange(4)
        c = data.toy_candidate(rng, scene, instr, outcome, level, 56)
        s = data.toy_oracle(data.render_scene(scene), instr, c)
        seen.add((outcome, data.toy_level(s["visual_quality"])))
    for outcome in data.OUTCOMES:  # every outcome appears at both the top and a low quality rating
        assert (outcome, 4) in seen and any((outcome, q) in seen for q in (1, 2))


def test_cli_toy_and_inspect(tmp_path):
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    out, script = tmp_path / "toy", os.path.join(ROOT, "data.py")
    r = subprocess.run([sys.executable, script, "--toy", "--out", str(out), "--n_train", "8", "--n_val", "4",
                        "--n_rl", "4", "--n_rl_test", "2", "--n_editor", "4"], cwd=tmp_path, env=env,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "toy world written" in r.stdout
    r = subprocess.run([sys.executable, script, "--inspect", str(out / "bench.jsonl")], cwd=tmp_path, env=env,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "4 rows 4 CandidateGroup" in r.stdout and "tied overall" in r.stdout
    assert Image.open(tmp_path / "bench_sheet.png").size[0] == 5 * 128
    r = subprocess.run([sys.executable, script, "--inspect", str(tmp_path / "nope.jsonl")], cwd=tmp_path, env=env,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode != 0 and "nope.jsonl" in r.stderr
    with open(script) as f:
        assert f.read().count("add_argument(") <= 12


def test_cli_inspect_skip_bad_skips_missing_and_corrupt_images(corpus, tmp_path):
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    r = subprocess.run([sys.executable, os.path.join(ROOT, "data.py"), "--inspect", corpus], cwd=tmp_path, env=env,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode != 0 and "bad.jsonl:" in r.stderr and "Traceback" not in r.stderr
    r = subprocess.run([sys.executable, os.path.join(ROOT, "data.py"), "--inspect", corpus, "--skip_bad"],
                       cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "1 rows 1 PreferencePair" in r.stdout and "skipped 7 bad row(s)" in r.stdout
    assert "missing.png" in r.stderr and "trunc.png" in r.stderr  # each skipped row is reported with its reason
    assert Image.open(tmp_path / "bad_sheet.png").size[0] == 3 * 128
