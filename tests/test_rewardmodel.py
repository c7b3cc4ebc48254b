"""rewardmodel.py (Gaussian mode): losses against closed forms and reference values, pooling under left and
right padding, checkpoint round trips, a resumed run that matches an uninterrupted one exactly, torchrun."""
import json
import math
import os
import re
import shutil
import subprocess
import sys

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import rewardmodel as R  # noqa: E402
from data import load_image, load_pairs, make_toy  # noqa: E402

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
torch.set_num_threads(1)  # as rewardmodel.py does on CPU: spinning OpenMP threads crawl on a shared machine


def phi_cdf(x):
    return 0.5 * (1 + math.erf(x / math.sqrt(2)))


def t(*xs, dtype=torch.float64):
    return [torch.tensor([x], dtype=dtype) for x in xs]


# ----------------------------------------------------------------------------- losses

@pytest.mark.parametrize("mu_w,s_w,mu_l,s_l", [(0, 0, 0, 0), (1, -1, 0, -1), (2, 0.5, -1, 0), (-0.3, 0.2, 0.4, -0.7)])
def test_gaussian_ranking_loss_closed_form(mu_w, s_w, mu_l, s_l):
    want = -math.log(phi_cdf((mu_w - mu_l) / math.sqrt(math.exp(2 * s_w) + math.exp(2 * s_l))))
    assert R.gaussian_ranking_loss(*t(mu_w, s_w, mu_l, s_l)).item() == pytest.approx(want, rel=1e-9)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_gaussian_ranking_loss_far_wrong_pair_is_finite(dtype):
    # dmu = -40 over scale sqrt(2): Phi underflows to 0 in float32, -log Phi(-x) ~ x^2/2 + log x + log sqrt(2 pi)
    mu_w, s_w, mu_l, s_l = t(0.0, 0.0, 40.0, 0.0, dtype=dtype)
    mu_w.requires_grad_(True)
    loss = R.gaussian_ranking_loss(mu_w, s_w, mu_l, s_l)
    loss.backward()
    x = 40 / math.sqrt(2)
    assert loss.dtype == dtype and torch.isfinite(loss).all()
    assert loss.item() == pytest.approx(x * x / 2 + math.log(x) + 0.5 * math.log(2 * math.pi) - 1 / x ** 2, rel=1e-4)
    # d loss / d mu_w = -(phi/Phi)(-x) / sqrt(2), and the Mills ratio phi/Phi(-x) ~ x + 1/x - 2/x^3
    assert mu_w.grad.item() == pytest.approx(-(x + 1 / x - 2 / x ** 3) / math.sqrt(2), rel=1e-4)
    big = R.gaussian_ranking_loss(*t(40.0, 0.0, 0.0, 0.0, dtype=dtype))  # right by a mile: loss ~ 0, not nan
    assert torch.isfinite(big).all() and 0 <= big.item() < 1e-30


def test_gaussian_ranking_loss_large_sigma_softens_a_wrong_pair():
    wrong_sure = R.gaussian_ranking_loss(*t(0.0, -2.0, 1.0, -2.0))
    wrong_unsure = R.gaussian_ranking_loss(*t(0.0, 1.0, 1.0, 1.0))
    assert wrong_unsure < wrong_sure


@pytest.mark.parametrize("args,want", [((0, 0, 0, 0), 0.902662), ((1, -1, 0, -1), 0.339532),
                                       ((2, 0.5, -1, 0), 0.171080)])
def test_mc_ranking_loss_reference_values(args, want):
    torch.manual_seed(0)
    assert R.mc_ranking_loss(*t(*args), num_samples=1000).item() == pytest.approx(want, abs=0.05)   # EditReward's 1000
    # converges (4 standard errors)
    assert R.mc_ranking_loss(*t(*args), num_samples=2_000_000).item() == pytest.approx(want, abs=3e-3)


def test_bt_loss_and_fusion():
    assert R.bt_loss(*t(1.0, 0.0)).item() == pytest.approx(math.log(1 + math.exp(-1)))
    mu = torch.tensor([[1.0, 3.0], [2.0, -1.0]])
    log_sigma = torch.log(torch.tensor([[3.0, 4.0], [1.0, 2.0]]))
    m, s = R.fuse_gaussians(mu, log_sigma)
    assert torch.allclose(m, torch.tensor([2.0, 0.5]))
    assert torch.allclose(s.exp(), torch.tensor([2.5, math.sqrt(5) / 2]))


def test_preference_loss_orients_skips_and_weights():
    mu_a, mu_b = torch.tensor([[1.0, 0.0, 2.0]]), torch.tensor([[0.0, 1.0, 2.0]])
    ls = torch.zeros(1, 3)
    total, n = R.preference_loss(mu_a, ls, mu_b, ls, torch.tensor([[1, -1, 0]]), torch.tensor([1.0, 2.0, 5.0]))
    right = R.gaussian_ranking_loss(*t(1.0, 0.0, 0.0, 0.0, dtype=torch.float32))  # both orientations are "right by 1"
    assert n.item() == 3 and total.item() == pytest.approx(3 * right.item())  # n = sum of the weights used


def test_pairwise_accuracy_and_schedule():
    right, total = R.pairwise_accuracy(torch.tensor([1.0, 0.0, 2.0, 5.0]), torch.tensor([0.0, 1.0, 2.0, 5.0]),
                                       torch.tensor([1, -1, 1, 0]))
    assert (right, total) == (2, 3)  # an exact score tie is wrong, a human tie is not counted
    assert R.lr_factor(0, 10, 100, 0.1) == pytest.approx(0.1)
    assert R.lr_factor(10, 10, 100, 0.1) == pytest.approx(1.0)
    assert R.lr_factor(100, 10, 100, 0.1) == pytest.approx(0.1) == R.lr_factor(500, 10, 100, 0.1)


def test_step_indices_split_ranks_and_cover_epochs():
    n, bs = 10, 4
    seen = [i for s in range(5) for r in range(2) for i in R.step_indices(s, n, bs, r, 2, seed=1)]
    assert sorted(seen[:10]) == list(range(10)) and sorted(seen[10:20]) == list(range(10))  # epochs are permutations
    assert R.step_indices(3, n, bs, 1, 2, seed=1) == R.step_indices(3, n, bs, 1, 2, seed=1)


# ----------------------------------------------------------------------------- pooling and the model

def test_pool_hidden_left_and_right_padding():
    hidden = torch.arange(2 * 5, dtype=torch.float32).reshape(2, 5, 1)
    ids = torch.tensor([[0, 0, 7, 9, 4], [7, 3, 9, 0, 0]])  # 9 = reward token, 0 = pad
    mask = (ids != 0).long()
    assert R.pool_hidden(hidden, ids, mask, token_id=9).squeeze(-1).tolist() == [3.0, 7.0]
    assert R.pool_hidden(hidden, ids, mask).squeeze(-1).tolist() == [4.0, 7.0]  # last attended token
    with pytest.raises(ValueError):
        R.pool_hidden(hidden, torch.zeros_like(ids), mask, token_id=9)


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    out = tmp_path_factory.mktemp("toy")
    make_toy(str(out), n_train=6, n_val=3, n_rl=1, n_rl_test=1, n_editor=1)
    return out


@pytest.fixture(scope="module")
def tiny():
    return R.RewardModel.from_pretrained("tiny")


def test_tiny_scores_every_key_and_padding_side_does_not_matter(tiny, toy):
    pairs = load_pairs(str(toy / "pairs_val.jsonl"))[:3]
    src, ins = [p.sources for p in pairs], [p.instruction + " please" * i for i, p in enumerate(pairs)]
    ed = [p.preferred for p in pairs]
    out = tiny.score(src, ins, ed, batch_size=3)  # one padded batch of unequal lengths
    assert set(out) == {"overall", *tiny.dims, *(f"sigma_{d}" for d in tiny.dims + ["overall"])}
    assert all(v.shape == (3,) and v.dtype == torch.float32 for v in out.values())
    alone = [tiny.score(src[i:i + 1], ins[i:i + 1], ed[i:i + 1])["overall"] for i in range(3)]
    assert torch.allclose(torch.cat(alone), out["overall"], atol=1e-5)
    tiny.processor.tokenizer.padding_side = "right"
    try:
        assert torch.allclose(tiny.score(src, ins, ed, batch_size=3)["overall"], out["overall"], atol=1e-5)
    finally:
        tiny.processor.tokenizer.padding_side = "left"


def test_held_out_evaluation_shows_progress_on_rank_0_and_scores_as_one_call(tiny, toy, monkeypatch):
    """evaluate() scores batch by batch under a progress bar (a 7B verifier's Avg@K evaluation takes minutes), shown
    on rank 0 only; the batches' scores join in order: the accuracies are those of one batch of all the edits."""
    pairs = load_pairs(str(toy / "pairs_val.jsonl"))[:5]
    bars, real = [], R.tqdm
    monkeypatch.setattr(R, "tqdm", lambda it, *a, **kw: bars.append((len(it), kw["disable"])) or real(it, *a, **kw))
    batched, whole = R.evaluate(tiny, pairs, batch_size=4), R.evaluate(tiny, pairs, batch_size=10)
    R.evaluate(tiny, pairs, batch_size=4, rank=1, world_size=2)  # rank 1 of 2: pairs 1 and 3, one batch, no bar
    assert len(pairs) == 5 and bars == [(3, False), (1, False), (1, True)]
    assert set(batched) == {"overall", *tiny.dims, *(f"sigma_{d}" for d in tiny.dims)}
    assert batched == pytest.approx(whole, abs=1e-6, nan_ok=True) and not math.isnan(batched["overall"])


@pytest.mark.parametrize("dims", ["overall,visual_quality", "visual_quality,visual_quality", "sigma_x,visual_quality",
                                  ""])  # none: the fused overall of no dimension would be a math domain error
def test_dimension_names_that_would_collide_with_score_keys_are_refused(dims):
    with pytest.raises(ValueError, match="--dims must be distinct"):
        R.RewardModel({**vars(R.parser.parse_args([])), "dims": dims})


@pytest.mark.parametrize("finetune", ["lora", "full"])
def test_gaussian_step_with_grad_checkpointing_recomputes_and_updates_as_without(toy, finetune):
    """On CUDA --grad_checkpointing auto is on, so every real Gaussian run trains checkpointed: each checkpointed
    layer (text and vision) runs through its checkpoint function, and the step's weights equal those without it."""
    from transformers.modeling_layers import GradientCheckpointingLayer
    args = R.parser.parse_args(["--toy", f"--finetune={finetune}", "--micro_batch=2", "--batch_size=2"])
    pairs, after, calls = load_pairs(str(toy / "pairs_train.jsonl"))[:2], {}, []
    for mode in ("off", "on"):
        rm = R.RewardModel({**vars(args), "model": "tiny", "head_hidden": 32, "grad_checkpointing": mode}).train()
        layers = [m for m in rm.backbone.modules() if isinstance(m, GradientCheckpointingLayer)
                  and m.gradient_checkpointing]
        for m in layers:
            f = m._gradient_checkpointing_func
            m._gradient_checkpointing_func = lambda *a, f=f, **k: calls.append(1) or f(*a, **k)
        opt = torch.optim.AdamW([p for p in rm.parameters() if p.requires_grad], lr=1e-3)
        torch.manual_seed(0)  # the same dropout draws in both runs
        R.train_step(rm, rm, opt, [pairs], args)
        after[mode] = {k: v.detach().clone() for k, v in rm.named_parameters() if v.requires_grad}
        assert (len(layers) >= 4) == (mode == "on")  # 2 text layers, 2 vision blocks
    assert len(calls) >= 4
    assert all(torch.allclose(after["on"][k], v, atol=1e-6) for k, v in after["off"].items())


def test_the_gaussian_step_is_the_same_at_any_micro_batch(toy):
    """--micro_batch is a memory setting (--resume may change it): the step's gradient is that of the mean over all the
    step's strict (pair, dimension) terms, not a mean of micro-batch means, which weighs a micro-batch with ties more."""
    args = R.parser.parse_args(["--toy", "--batch_size=4", "--grad_clip=0"])
    pairs = load_pairs(str(toy / "pairs_train.jsonl"))
    strict = lambda p: int((R.pair_prefs([p], R.DIMS) != 0).sum())  # noqa: E731
    pairs = [p for p in pairs if strict(p) == 3][:1] + [p for p in pairs if strict(p) < 3][:1] + [
        p for p in pairs if strict(p) == 3][1:3]  # micro-batches of 2 with 5 and 6 terms
    after = []
    for micro_batches in ([pairs], [pairs[:2], pairs[2:]]):
        rm = R.RewardModel({**vars(args), "model": "tiny", "head_hidden": 32}).eval()  # no dropout: one function
        R.train_step(rm, rm, torch.optim.SGD([p for p in rm.parameters() if p.requires_grad], lr=1.0), micro_batches,
                     args)
        after.append({k: v.detach().clone() for k, v in rm.named_parameters() if v.requires_grad})
    assert all(torch.allclose(after[1][k], v, rtol=1e-4, atol=1e-5) for k, v in after[0].items())


@pytest.mark.parametrize("finetune, dtype", [("lora", "auto"), ("full", "auto"), ("lora", "bfloat16"),
                                             ("full", "bfloat16")])
def test_from_pretrained_scores_equal_in_memory(toy, tmp_path, finetune, dtype):
    """A checkpoint loads back exactly: the same weights, in the same dtypes (a bf16 full fine-tune's trained weights
    fp32, as training kept them), and the same scores."""
    args = R.parser.parse_args(["--toy", f"--finetune={finetune}", "--micro_batch=4", "--batch_size=4",
                                f"--dtype={dtype}"])
    rm = R.RewardModel({**vars(args), "model": "tiny", "head_hidden": 32})
    pairs = load_pairs(str(toy / "pairs_train.jsonl"))
    opt = torch.optim.AdamW([p for p in rm.parameters() if p.requires_grad], lr=1e-2)
    for step in range(2):  # move every trained weight (LoRA B starts at zero) away from its init
        R.train_step(rm, rm, opt, [pairs[4 * step:4 * step + 4]], args)
    R.save_checkpoint(str(tmp_path / "ck"), rm, opt, 2)
    val = load_pairs(str(toy / "pairs_val.jsonl"))[:4]
    items = ([p.sources for p in val], [p.instruction for p in val], [p.rejected for p in val])
    want = rm.score(*items)
    back = R.RewardModel.from_pretrained(str(tmp_path / "ck"), model=None)  # None: no override
    got, mine = back.score(*items), dict(rm.state_dict())
    assert all(torch.equal(want[k], got[k]) for k in want)
    assert all(v.dtype == mine[k].dtype and torch.equal(v, mine[k]) for k, v in back.state_dict().items())
    assert sorted(os.listdir(tmp_path / "ck")) == ["args.json", "backbone", "head.safetensors", "train_state.pt"]


def test_per_dim_layout_gives_one_column_per_prompt(tiny, toy):
    pairs = load_pairs(str(toy / "pairs_val.jsonl"))[:2]
    src, ins, ed = [p.sources for p in pairs], [p.instruction for p in pairs], [p.preferred for p in pairs]
    batches = tiny.encode(src, ins, ed, per_dim=True)
    assert len(batches) == len(tiny.dims)
    mu, _ = tiny(batches)
    for d, b in enumerate(batches):
        assert torch.allclose(mu[:, d], tiny([b])[0][:, d], atol=1e-6)


# ----------------------------------------------------------------------------- runs

def run(args, cmd=None):
    proc = subprocess.run((cmd or [sys.executable]) + [os.path.join(ROOT, "rewardmodel.py")] + args, cwd=ROOT,
                          env=ENV, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return proc.stdout


def step_lines(out):
    return {int(m.group(1)): m.group(2) for m in re.finditer(r"^step (\d+)/\d+ \| (loss \S+)", out, re.M)}


def test_a_ranks_share_below_micro_batch_is_one_forward_not_an_error(tmp_path):
    """`torchrun --nproc_per_node=2 rewardmodel.py --toy` (the README's): 16 pairs a step over 2 ranks is 8 each, below
    the preset's --micro_batch 16, so one forward a rank; a share that --micro_batch does not divide is refused."""
    from data import DataError, Dist
    for world, micro, ok in ((2, 16, True), (8, 8, True), (2, 3, False), (3, 4, False)):
        args = R.parser.parse_args(["--toy", f"--micro_batch={micro}", f"--train={tmp_path}/none.jsonl"])
        with pytest.raises(DataError if ok else SystemExit) as e:  # DataError: past the check, at the missing file
            R.train_gaussian(args, Dist(rank=0, world=world))
        assert ok or "must split into" in str(e.value)


@pytest.mark.parametrize("per_dim", [False, True])
def test_the_prompt_worker_builds_each_steps_own_micro_batches(toy, tmp_path, monkeypatch, per_dim):
    """A DataLoader worker encodes the next steps' micro-batches (images decoded, processor run) while a step trains:
    every step trains on exactly the prompts this process would build for its own pairs, from step 0 and on resume."""
    from data import Dist
    seen, real = [], R.train_step

    def check(model, rm, opt, micro_batches, args, encoded=None):
        assert encoded is not None and len(encoded) == len(micro_batches)
        for mb, enc in zip(micro_batches, encoded):
            here = R.encode_pairs(rm, mb, args.per_dim_prompts)
            assert len(here) == len(enc) == 1 + per_dim and all(torch.equal(a[k], b[k]) for a, b in zip(here, enc)
                                                                 for k in a)
        seen.append([p.id for mb in micro_batches for p in mb])
        return real(model, rm, opt, micro_batches, args, encoded)
    monkeypatch.setattr(R, "train_step", check)
    flags = ["--model=tiny", f"--train={toy}/pairs_train.jsonl", f"--val={toy}/pairs_val.jsonl", "--batch_size=4",
             "--micro_batch=2", "--eval_interval=2", "--lora_rank=4", "--head_hidden=32", "--val_max=4",
             f"--out_dir={tmp_path}/rm"] + ["--per_dim_prompts"] * per_dim
    R.train_gaussian(R.parser.parse_args(flags + ["--max_steps=2"]), Dist(device=torch.device("cpu")))
    R.train_gaussian(R.parser.parse_args(flags + ["--max_steps=3", "--resume"]), Dist(device=torch.device("cpu")))
    assert len(seen) == 3 and len({tuple(s) for s in seen}) == 3 and all(len(s) == 4 for s in seen)


def test_resume_reproduces_uninterrupted_run(toy, tmp_path):
    flags = ["--model=tiny", f"--train={toy}/pairs_train.jsonl", f"--val={toy}/pairs_val.jsonl", "--batch_size=4",
             "--micro_batch=2", "--log_interval=1", "--eval_interval=3", "--warmup_steps=2", "--lr_decay_steps=6",
             "--lora_rank=4", "--head_hidden=32", "--val_max=4"]
    full = run(flags + ["--max_steps=6", f"--out_dir={tmp_path}/a"])
    first = run(flags + ["--max_steps", "3", "--out_dir", f"{tmp_path}/b"])
    second = run(flags + ["--max_steps=6", f"--out_dir={tmp_path}/b", "--resume"])
    assert "from step 3" in second and "final held-out accuracy | instruction_following" in second
    assert step_lines(full) == {**step_lines(first), **step_lines(second)} and len(step_lines(full)) == 6
    for name in ["head.safetensors", "backbone/adapter_model.safetensors"]:
        a, b = load_file(f"{tmp_path}/a/{name}"), load_file(f"{tmp_path}/b/{name}")
        assert all(torch.equal(a[k], b[k]) for k in a)


def test_a_resume_with_more_steps_keeps_the_runs_lr_schedule(toy, tmp_path):
    """--max_steps may grow on --resume; the cosine's length (--lr_decay_steps 0: the run's --max_steps) stays the
    run's, so the lr goes on at the schedule's floor. It was re-derived from the new --max_steps: the lr jumped up."""
    flags = ["--model=tiny", f"--train={toy}/pairs_train.jsonl", f"--val={toy}/pairs_val.jsonl", "--batch_size=4",
             "--micro_batch=2", "--log_interval=1", "--eval_interval=4", "--warmup_steps=1", "--lora_rank=4",
             "--head_hidden=32", "--val_max=4", f"--out_dir={tmp_path}/b"]
    out = run(flags + ["--max_steps=4"]) + run(flags + ["--max_steps=6", "--resume"])
    lr = {int(m[1]): float(m[2]) for m in re.finditer(r"^step (\d+)/\d+ \|.*?\| lr (\S+)", out, re.M)}
    peak = R.parser.get_default("lr")
    assert lr[5] == lr[6] == pytest.approx(R.MIN_LR * peak) and lr[4] > lr[5]


def test_resume_goes_on_with_the_runs_own_flags_and_starts_fresh_before_a_checkpoint(tiny, tmp_path, capsys):
    """Before the first checkpoint --resume starts at step 0 (a job killed early is simply rerun); after it, a flag
    that changes the training (--lr would come back from the optimizer state, unseen) is an error, and how long
    or how often to evaluate is not."""
    flags = ["--toy", f"--out_dir={tmp_path}/rm", "--resume"]
    assert R.resume_state(R.parser.parse_args(flags)) is None and "no checkpoint in" in capsys.readouterr().out
    opt = torch.optim.AdamW([p for p in tiny.parameters() if p.requires_grad])
    R.save_checkpoint(f"{tmp_path}/rm", tiny, opt, 3, first := R.parser.parse_args(flags[:2]))
    assert R.resume_state(R.parser.parse_args(flags + ["--max_steps=9", "--eval_interval=1"]))["step"] == 3
    assert R.resume_state(first) is None and "without --resume this run replaces it" in capsys.readouterr().out
    with pytest.raises(SystemExit, match=rf"other flags \(--lr {first.lr}->0.5\)"):
        R.resume_state(R.parser.parse_args(flags + ["--lr=0.5"]))


def test_a_dimension_the_data_does_not_rank_is_refused(toy, tmp_path):
    """EditReward's own name for quality is quality_aesthetic: a --dims name the pairs do not use would train a
    head column on nothing; the run stops before building the model and names what the data has."""
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "rewardmodel.py"), "--toy",
                           f"--train={toy}/pairs_train.jsonl",
                           f"--val={toy}/pairs_val.jsonl", "--dims=instruction_following,quality_aesthetic",
                           f"--out_dir={tmp_path}/x"], cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1 and not os.path.exists(f"{tmp_path}/x")
    assert (f"pairs_train.jsonl: no training pair ranks --dims ['quality_aesthetic'] "
            f"(its pairs rank ['instruction_following', 'visual_quality'])") in proc.stderr


def test_torchrun_two_ranks_stay_in_sync(toy, tmp_path):
    out = run(["--toy", f"--train={toy}/pairs_train.jsonl", f"--val={toy}/pairs_val.jsonl", "--batch_size=8",
               "--micro_batch=2", "--max_steps=3", "--log_interval=1", "--head_hidden=32", "--val_max=4",
               f"--out_dir={tmp_path}/ddp"],
              cmd=[os.path.join(os.path.dirname(sys.executable), "torchrun"), "--standalone", "--nproc_per_node=2"])
    assert "world 2 | grad accum 2" in out
    assert len(step_lines(out)) == 3 and "final held-out accuracy" in out
    sigmas = re.search(r"final held-out accuracy .*\| sigma instruction_following ([0-9.]+) "
                       r"visual_quality ([0-9.]+)", out)
    # geometric means over both ranks' edits, at least the floor
    assert sigmas and all(0.05 <= float(s) < 100 for s in sigmas.groups())


def test_tiny_model_is_identical_in_every_process():
    """The added reward-token rows and the LoRA init come from a seeded RNG, not from whatever the global
    RNG holds: two processes that drew different random numbers first still build the same model."""
    code = ("import sys, torch; sys.path.insert(0, '.'); torch.manual_seed(int(sys.argv[1])); torch.rand(7)\n"
            "import rewardmodel as R\n"
            "rm = R.RewardModel.from_pretrained('tiny')\n"
            "print(sum(float(p.double().sum()) for p in rm.state_dict().values() if p.is_floating_point()))")
    sums = [subprocess.run([sys.executable, "-c", code, str(s)], cwd=ROOT, env=ENV, capture_output=True, text=True,
                           timeout=120) for s in (1, 2)]
    assert all(r.returncode == 0 for r in sums), sums[0].stderr[-2000:]
    assert sums[0].stdout.strip() == sums[1].stdout.strip() != ""


def test_tiny_tokenizer_words_are_single_tokens():
    tok = R.tiny_tokenizer()
    for w in R.TINY_WORDS.split():  # each word is one token, at the start of a text and after a space
        assert len(tok.tokenize(w)) == 1 and len(tok.tokenize("x " + w)) == 2, w
    text = "move the magenta square to the top left, naïve 123 {\"score\": 7}"
    assert tok.decode(tok(text)["input_ids"]) == text  # anything else still round-trips through the bytes
    assert tok.convert_tokens_to_ids(R.SPECIAL_TOKENS) == list(range(len(tok) - len(R.SPECIAL_TOKENS), len(tok)))


def test_score_refuses_lists_of_unequal_lengths(tiny, toy):
    """Three edits with two instructions (or one bare string, which zip would read letter by letter) are an error in
    both modes, never two scores."""
    p = load_pairs(str(toy / "pairs_val.jsonl"))[0]
    verifier = R.RewardModel.from_pretrained("tiny", mode="verifier", max_new_tokens=2)
    for rm in (tiny, verifier):
        for instructions in ([p.instruction] * 2, p.instruction):
            with pytest.raises(ValueError, match="zip"):
                rm.score([p.sources] * 3, instructions, [p.preferred] * 3)


def test_a_toy_run_with_a_mistyped_val_builds_no_toy_world_there(tmp_path):
    """--toy builds its world where the preset's --val is missing; a --val given by hand that does not exist is an
    error, not a place to write 15,000 files over what is there."""
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "rewardmodel.py"), "--toy", f"--val={tmp_path}/d/v.jsonl",
                           f"--train={tmp_path}/d/t.jsonl"], cwd=ROOT, env=ENV, capture_output=True, text=True,
                          timeout=240)
    assert proc.returncode != 0 and "t.jsonl" in proc.stderr and not os.path.exists(tmp_path / "d")


def test_gcpo_from_a_gaussian_checkpoint_is_a_clear_error(toy, tmp_path):
    rm = R.RewardModel({**vars(R.parser.parse_args(["--toy"])), "model": "tiny", "head_hidden": 32})
    R.save_checkpoint(str(tmp_path / "g"), rm, torch.optim.AdamW([p for p in rm.parameters() if p.requires_grad]), 0)
    flags = {**vars(R.parser.parse_args(["--mode", "verifier"])), "model": "tiny", "init": str(tmp_path / "g")}
    with pytest.raises(ValueError, match="holds a gaussian reward model, not a verifier one"):
        R.RewardModel(flags)


@pytest.mark.parametrize("flag,why", [("--micro_batch=0", "--micro_batch must be >= 1, got 0"),
                                      ("--lr=nan", "--lr must be >= 0, got nan"),  # else NaN weights from step 1
                                      ("--val_max=-3", "--val_max must be >= 0, got -3"),  # else [:-3] drops 3 pairs
                                      # alpha 0 scales every adapter to 0 (nothing trains); rank 0 died in peft,
                                      ("--lora_alpha=0", "--lora_alpha must be >= 1, got 0"),  # after the 7B loaded
                                      # one trace a group: every GCPO advantage 0, a run that learns nothing
                                      ("--mode=verifier --num_traces=1", "--num_traces must be >= 2, got 1"),
                                      # sampled at logits / T: 0 died in decoding, blaming the model's logits
                                      ("--mode=verifier --temperature=0", "--temperature must be > 0, got 0.0"),
                                      # a flag of the other mode: without --mode verifier, GCPO would train a Gaussian
                                      ("--stage=gcpo --init=out/sft", "--mode gaussian does not use --stage, --init"),
                                      ("--mode=verifier --loss=mc", "--mode verifier does not use --loss"),
                                      ("--finetune=full --lora_rank=64", "--finetune full does not use --lora_rank"),
                                      # the verifier's own prompt takes no templates: they would be saved, never used
                                      ("--mode=verifier --prompt_file=p.json", "does not use --prompt_file"),
                                      # a rubric is a way to score (bench.py --rubric): a trained verifier never saw it
                                      ("--mode=verifier --rubric=editscore", "unrecognized arguments: --rubric")])
def test_bad_flag_values_are_refused(flag, why):
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "rewardmodel.py"), *flag.split()],
                          cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and why in proc.stderr


@pytest.mark.parametrize("finetune", ["lora", "full"])
def test_trained_weights_stay_fp32_under_bf16(toy, finetune):
    """With bf16 compute, AdamW would round away updates below bf16's resolution: every trainable parameter is
    fp32 (the frozen rest stays bf16), and a training step runs under autocast."""
    args = R.parser.parse_args(["--toy", f"--finetune={finetune}", "--dtype=bfloat16", "--batch_size=2",
                                "--micro_batch=2"])
    rm = R.RewardModel({**vars(args), "head_hidden": 32})
    trainable = [p for p in rm.parameters() if p.requires_grad]
    assert trainable and all(p.dtype == torch.float32 for p in trainable)
    assert any(p.dtype == torch.bfloat16 for p in rm.parameters() if not p.requires_grad)
    opt = torch.optim.AdamW(trainable, lr=1e-3)
    assert math.isfinite(R.train_step(rm, rm, opt, [load_pairs(str(toy / "pairs_train.jsonl"))[:2]], args))


@pytest.mark.parametrize("name", list(R.TINY_MODELS))
def test_a_bf16_backbone_keeps_its_rope_frequencies_fp32_as_from_pretrained_does(name, tmp_path):
    """from_pretrained(dtype=bf16) leaves the rotary inv_freq buffers fp32; a later model.to(bf16) would round them
    (0.2% per frequency: radians of phase at positions in the hundreds). A hub-style folder and the tiny build alike."""
    model, processor = R.build_tiny_vlm(name)
    model.save_pretrained(tmp_path), processor.save_pretrained(tmp_path)
    for source in (str(tmp_path), name):
        model, _ = R.load_backbone(source, torch.bfloat16)
        assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
        rope = {n: b.dtype for n, b in model.named_buffers() if n.endswith("inv_freq")}
        assert len(rope) >= 2 and set(rope.values()) == {torch.float32}, (source, rope)  # the text's and the tower's


def test_a_checkpoint_writes_no_progress_bar_and_leaves_download_bars_on(tmp_path, capfd):
    """A full fine-tune's save_pretrained draws a "Writing model shards" bar; at every checkpoint it would litter the
    log, so the save hides it. Only the save: a 7B model's first download (15 GB) keeps its progress bars."""
    from huggingface_hub.utils import are_progress_bars_disabled
    from transformers.utils import logging as hf_logging
    rm = R.RewardModel.from_pretrained("tiny")
    assert rm.flags["finetune"] == "full"
    capfd.readouterr()
    R.save_checkpoint(str(tmp_path / "ck"), rm, torch.optim.AdamW(rm.head.parameters()), 1)
    assert "Writing model shards" not in capfd.readouterr().err
    assert os.path.exists(tmp_path / "ck" / "backbone" / "model.safetensors")
    assert hf_logging.is_progress_bar_enabled() and not are_progress_bars_disabled()
    with hf_logging.tqdm(range(1), desc="a later load") as bar:  # the save's switch is gone with it
        assert not bar.disable
    rm.save_weights = lambda path: (_ for _ in ()).throw(OSError("disk full"))  # a save that fails, in a process
    with pytest.raises(OSError, match="disk full"):                            # that goes on (a notebook)
        R.save_checkpoint(str(tmp_path / "ck2"), rm, torch.optim.AdamW(rm.head.parameters()), 2)
    with hf_logging.tqdm(range(1), desc="after a failed save") as bar:
        assert not bar.disable


@pytest.mark.parametrize("name", list(R.TINY_MODELS))
def test_a_hub_folder_loads_its_processor_without_torchvision_chat_template_and_all(name, tmp_path):
    """A hub VLM as Qwen's repos lay it out: the processor class named in preprocessor_config.json, the chat template
    in the processor's chat_template.json (not the tokenizer's config), Qwen3-VL with a video processor config too.
    AutoProcessor needs torchvision for the video processor; the image-only processor then loads from the same files,
    chat template included, and a prompt encodes with its image tokens."""
    model, processor = R.build_tiny_vlm(name)
    template, processor.tokenizer.chat_template = processor.tokenizer.chat_template, None
    model.save_pretrained(tmp_path), processor.tokenizer.save_pretrained(tmp_path)
    processor.image_processor.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "preprocessor_config.json").read_text())
    family = "Qwen3VLProcessor" if name == "tiny-qwen3-vl" else "Qwen2_5_VLProcessor"
    (tmp_path / "preprocessor_config.json").write_text(json.dumps({**config, "processor_class": family}))
    (tmp_path / "chat_template.json").write_text(json.dumps({"chat_template": template}))
    if name == "tiny-qwen3-vl":
        video = {"video_processor_type": "Qwen3VLVideoProcessor", "processor_class": family}
        (tmp_path / "video_preprocessor_config.json").write_text(json.dumps(video))
    _, loaded = R.load_backbone(str(tmp_path), max_pixels=56 * 56)
    assert loaded.chat_template == template and loaded.image_processor.size["longest_edge"] == 56 * 56
    enc = R.encode_prompt(loaded, [Image.new("RGB", (56, 56))] * 2, "add a square")
    assert (enc["input_ids"] == model.config.image_token_id).sum() > 0 and enc["pixel_values"].shape[0] > 0


@pytest.mark.parametrize("name", list(R.TINY_MODELS))
def test_vision_lora_adapts_the_towers_own_layers(name):
    """--vision lora reaches each family's vision blocks by their own layer names (attn.qkv, attn.proj; Qwen3-VL's
    mlp.linear_fc1/2), never the patch embedding; the language model's adapters are those of a frozen tower."""
    adapted = {}
    for vision in ("frozen", "lora"):
        model = R.setup_lora(R.build_tiny_vlm(name)[0], 4, 8, 0.0, R.parser.get_default("lora_targets"), vision)
        adapted[vision] = {n.split(".lora_A.")[0] for n, _ in model.named_parameters() if ".lora_A." in n}
    tower = {n for n in adapted["lora"] if ".visual." in n}
    assert not any(".visual." in n for n in adapted["frozen"]) and adapted["lora"] - tower == adapted["frozen"]
    mlp = "mlp.linear_fc2" if name == "tiny-qwen3-vl" else "mlp.down_proj"
    assert all(any(n.endswith(f"blocks.0.{m}") for n in tower) for m in ("attn.qkv", "attn.proj", mlp))
    assert not any("patch_embed" in n for n in tower)
    with pytest.raises(ValueError, match=r"--lora_targets: .* has no layer \['o_prj'\]"):  # peft would adapt q_proj
        R.setup_lora(R.build_tiny_vlm(name)[0], 4, 8, 0.0, "q_proj,o_prj,lm_head", "frozen")  # alone, without a word


@pytest.mark.parametrize("name", list(R.TINY_MODELS))
def test_each_family_scores_trains_and_generates(toy, name):
    """Qwen2.5-VL and Qwen3-VL through the same code: Gaussian scores, one Gaussian training step, and verifier
    sampling with one shared prefill whose log-probs teacher forcing reproduces."""
    args = R.parser.parse_args(["--toy", f"--model={name}", "--batch_size=2", "--micro_batch=2"])
    rm = R.RewardModel({**vars(args), "head_hidden": 32})
    pairs = load_pairs(str(toy / "pairs_train.jsonl"))[:2]
    out = rm.score([p.sources for p in pairs], [p.instruction for p in pairs], [p.preferred for p in pairs])
    assert set(out) == {"overall", *rm.dims, *(f"sigma_{d}" for d in rm.dims + ["overall"])}
    assert all(torch.isfinite(v).all() for v in out.values())
    head = rm.head.net[-1].weight.detach().clone()
    opt = torch.optim.AdamW([p for p in rm.parameters() if p.requires_grad], lr=1e-2)
    assert math.isfinite(R.train_step(rm, rm, opt, [pairs], args)) and not torch.equal(head, rm.head.net[-1].weight)

    model, processor = R.load_backbone(name, max_pixels=56 * 56)
    enc = R.verifier_prompt(processor, [load_image(pairs[0].sources[0])], pairs[0].instruction,
                            load_image(pairs[0].preferred))
    toks, logp, mask = R.sample_shared_prefill(model.eval(), enc, [1, 2], -1, 8, temperature=0.7)
    assert torch.equal(R.sample_shared_prefill(model, enc, [2], -1, 8, temperature=0.7)[0][0], toks[1])
    inputs, resp, _ = R.collate([enc, enc], toks.tolist(), processor.tokenizer.pad_token_id)
    with torch.no_grad():
        assert torch.allclose(R.response_logprobs(model, inputs, resp, 0.7), logp, atol=1e-4)


def test_an_image_that_fails_to_decode_mid_run_is_named_by_its_file_and_row():
    from PIL import Image

    from data import DataError, PreferencePair
    rm = R.RewardModel.from_pretrained("tiny")
    img = Image.new("RGB", (56, 56), "white")
    pair = PreferencePair("0", "make it red", [img], img, b"\x89PNG cut short", {"overall": 1}, origin="pairs.jsonl:7")
    with pytest.raises(DataError, match="pairs.jsonl:7: cannot decode image"):
        R.encode_pairs(rm, [pair])


def test_a_checkpoint_whose_base_folder_is_gone_says_so_and_model_overrides_it(tmp_path):
    """A LoRA checkpoint names its base as the training machine knew it (here a local folder). Where that folder is
    gone, loading names the checkpoint, the base and the way out (model=), and model= then loads it."""
    backbone, processor = R.build_tiny_vlm()
    for where in ("base", "moved"):
        backbone.save_pretrained(tmp_path / where), processor.save_pretrained(tmp_path / where)
    args = R.parser.parse_args(["--toy", "--finetune=lora", f"--model={tmp_path / 'base'}"])
    rm = R.RewardModel(vars(args))
    R.save_checkpoint(str(tmp_path / "ck"), rm, torch.optim.AdamW(rm.head.parameters()), 0)
    shutil.rmtree(tmp_path / "base")
    with pytest.raises(OSError, match=rf"ck: its base model '{re.escape(str(tmp_path / 'base'))}' is not a folder "
                                      r"here.*put it there, or load the checkpoint with model=<its folder or hub "
                                      r"name> \(or edit args.json\)"):
        R.RewardModel.from_pretrained(str(tmp_path / "ck"))
    back = R.RewardModel.from_pretrained(str(tmp_path / "ck"), model=str(tmp_path / "moved"))
    assert all(torch.equal(v, rm.state_dict()[k]) for k, v in back.state_dict().items())


def test_a_checkpoint_keeps_the_templates_it_was_trained_with(toy, tmp_path):
    """A model trained with a --prompt_file saves its templates (prompts.json) and scores with them wherever it
    goes: the file it was trained from may be gone (another machine, another working directory) or edited."""
    templates = {d: f"Judge the {d} of this edit: {{instruction}}" for d in R.DIMS}
    (tmp_path / "p.json").write_text(json.dumps(templates))
    args = R.parser.parse_args(["--toy", f"--prompt_file={tmp_path / 'p.json'}"])
    rm = R.RewardModel({**vars(args), "head_hidden": 32})
    R.save_checkpoint(str(tmp_path / "ck"), rm, torch.optim.AdamW(rm.head.parameters()), 0)
    val = load_pairs(str(toy / "pairs_val.jsonl"))[:2]
    items = ([p.sources for p in val], [p.instruction for p in val], [p.rejected for p in val])
    want = rm.score(*items)
    (tmp_path / "p.json").write_text(json.dumps({d: "{instruction}" for d in R.DIMS}))  # edited after training
    back = R.RewardModel.from_pretrained(str(tmp_path / "ck"))
    assert back.prompts == templates and json.loads((tmp_path / "ck" / "prompts.json").read_text()) == templates
    got = back.score(*items)
    assert all(torch.equal(want[k], got[k]) for k in want)
    (tmp_path / "p.json").unlink()  # gone
    assert R.RewardModel.from_pretrained(str(tmp_path / "ck")).prompts == templates
    # a new run saved into the same folder without a --prompt_file: the old run's templates do not stay behind
    (tmp_path / "ck" / "log.txt").write_text("a log")
    plain = R.RewardModel({**vars(R.parser.parse_args(["--toy"])), "head_hidden": 32})
    R.save_checkpoint(str(tmp_path / "ck"), plain, torch.optim.AdamW(plain.head.parameters()), 0)
    assert not (tmp_path / "ck" / "prompts.json").exists() and (tmp_path / "ck" / "log.txt").exists()
    assert R.RewardModel.from_pretrained(str(tmp_path / "ck")).prompts is None
