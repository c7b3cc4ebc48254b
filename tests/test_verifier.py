"""rewardmodel.py --mode verifier: parsers, EditScore aggregation, GCPO math by hand, shared-prefill sampling,
RewardModel.from_pretrained on a verifier checkpoint, and subprocess smoke runs (SFT, GCPO with exact resume,
torchrun on CPU) of the tiny model."""
import argparse
import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from data import Dist, load_pairs, load_traces
from rewardmodel import (KL_CAP, RewardModel, collate, editscore_aggregate, evaluate, filter_logits, gcpo_loss,
                         gcpo_rewards, group_advantages, k3_kl, load_backbone, parse_editscore_output,
                         parse_verifier_output, parser, preset, response_logprobs, sample_shared_prefill, sft_prompts,
                         sft_step, verifier_prompt)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "rewardmodel.py")
ENV = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", PYTHONPATH=ROOT)
TOY = 'recolor: follow 3/4; keep 4/4; quality 3/4\n{"follow": 3, "keep": 4, "quality": 3, "score": 6}'

# ----------------------------------------------------------------------------------------------------------
# parsing


@pytest.mark.parametrize("text, score, principles", [
    (TOY, 6.0, {"follow": 3.0, "keep": 4.0, "quality": 3.0}),
    ('```json\n{"follow": 2, "score": 4}\n```\nHope this helps!', 4.0, {"follow": 2.0}),
    ('reasoning... {"score": 7} and then some trailing words }', 7.0, {}),
    ("{'follow': 3, 'score': 5}", 5.0, {"follow": 3.0}),                      # single quotes
    ('{"follow": 3, "score": 5,}', 5.0, {"follow": 3.0}),                      # trailing comma
    ('{"follow": 2, "keep": 4}', 3.0, {"follow": 2.0, "keep": 4.0}),           # missing score -> mean
    ('{"follow": 2, "keep": 4, "score": 85}', 3.0, {"follow": 2.0, "keep": 4.0}),  # out of range: dropped
    ('{"follow": "high", "score": "7"}', 7.0, {}),                             # numeric string, word dropped
    ('{"score": "7/10"}', 7.0, {}),
    ('{"score": "3/4"}', 7.5, {}),                                             # a fraction is rescaled
    ('{"follow": 4, "keep": 3, "sc', 3.5, {"follow": 4.0, "keep": 3.0}),       # truncated generation
    ('an example {"score": 2} ... final: {"score": 9}', 9.0, {}),              # the last object wins
    ('{"principles": {"follow": 4, "keep": 2}, "score": 6}', 6.0, {"follow": 4.0, "keep": 2.0}),
    ('{"reasoning": "the {x} stays", "Score": 4}', 4.0, {}),                   # braces in a string, key case
    ("The edit is fine. Final score: 8/10", 8.0, {}),                          # free text with an explicit score
    ('{"score": 0}', 0.0, {}),
])
def test_parse_verifier_output(text, score, principles):
    out = parse_verifier_output(text)
    assert out["score"] == pytest.approx(score)
    assert out["principles"] == pytest.approx(principles)


@pytest.mark.parametrize("text", [None, "", "looks good to me", '{"score": 85}', '{"score": -1}', '{"score": "high"}',
                                  '{"score": NaN}', '{"score": true}', '{"reasoning": "fine"}', "{", "score: eleven"])
def test_parse_verifier_output_none(text):
    assert parse_verifier_output(text) is None


@pytest.mark.parametrize("text, want", [
    ('{"reasoning": "ok", "score": [20, 15]}', [20.0, 15.0]),
    ('```json\n{"reasoning": "a [b] c", "score": [25, 0]}\n```\nDone.', [25.0, 0.0]),
    ("{'reasoning': 'ok', 'score': [3, 4]}", [3.0, 4.0]),                      # not JSON: regex reader
    ('{"score": [20]}', None), ('{"score": [26, 3]}', None), ('{"score": [5, "x"]}', None), ("no json", None),
    # as EditScore's own parser reads them: a list of 2 or more (one number: PQ's n = 1); curly quotes
    ('{"score": 21}', None), ('{"score": [20, 15, 10]}', [20.0, 15.0, 10.0]),
    ('{\u201creasoning\u201d: \u201cok\u201d, \u201cscore\u201d: [12, 13]}', [12.0, 13.0]),
])
def test_parse_editscore_output(text, want):
    assert parse_editscore_output(text) == want


def test_editscore_perceptual_quality_reads_one_score_or_more_and_takes_their_min():
    """EditScore's scorer takes min(PQ) of whatever list (or one number) the answer holds; SC needs 2 (PF, C)."""
    assert parse_editscore_output('{"score": 21}', n=1) == [21.0]
    assert parse_editscore_output('{"score": [18, 22, 9]}', n=1) == [18.0, 22.0, 9.0]
    assert parse_editscore_output('{"score": []}', n=1) is None
    rm = RewardModel.from_pretrained("tiny", mode="verifier", rubric="editscore", max_new_tokens=2)
    answers = iter(['{"score": [20, 15, 24]}', '{"score": 18}'])  # SC, then PQ, in place of the random model's
    rm.processor.tokenizer.decode = lambda *a, **k: next(answers)
    out = rm.score([[_img(0)]], ["remove the square"], [_img(1)], num_samples=1)
    assert (out["prompt_following"].item(), out["consistency"].item()) == pytest.approx((8.0, 6.0))
    assert out["perceptual_quality"].item() == pytest.approx(7.2) and out["unparsed"].item() == 0
    assert out["overall"].item() == pytest.approx(math.sqrt(6.0 * 7.2))


# ----------------------------------------------------------------------------------------------------------
# EditScore aggregation by hand

def test_editscore_aggregate_k1():
    out = editscore_aggregate(torch.tensor([[[20.0, 15.0]]]), torch.tensor([[[18.0, 22.0]]]))
    # PF = 8, C = 6, PQ = min(7.2, 8.8) = 7.2, overall = sqrt(min(8, 6) * 7.2)
    assert out["prompt_following"].item() == pytest.approx(8.0)
    assert out["consistency"].item() == pytest.approx(6.0)
    assert out["perceptual_quality"].item() == pytest.approx(7.2)
    assert out["overall"].item() == pytest.approx(math.sqrt(6 * 7.2))
    assert out["unparsed"].item() == 0


def test_editscore_aggregate_k4_with_failed_passes():
    nan = float("nan")
    sc = torch.tensor([[[20, 15], [25, 25], [nan, nan], [10, 5]]])
    pq = torch.tensor([[[18, 22], [25, 20], [20, 20], [nan, nan]]])
    out = editscore_aggregate(sc, pq)
    assert out["prompt_following"].item() == pytest.approx((8 + 10 + 4) / 3)
    assert out["consistency"].item() == pytest.approx((6 + 10 + 2) / 3)
    assert out["perceptual_quality"].item() == pytest.approx((7.2 + 8 + 8) / 3)
    assert out["overall"].item() == pytest.approx((math.sqrt(6 * 7.2) + math.sqrt(10 * 8)) / 2)  # passes 0, 1
    assert out["unparsed"].item() == 2
    assert editscore_aggregate(torch.full((1, 2, 2), nan), torch.full((1, 2, 2), nan))["overall"].isnan().all()


# ----------------------------------------------------------------------------------------------------------
# GCPO math by hand

def test_gcpo_rewards_with_ties():
    r_w, r_l = gcpo_rewards(torch.tensor([3.0, 5.0, 5.0]), torch.tensor([5.0, 1.0]))
    # r_w[j] = mean_k 1[t_w[j] > t_l[k]] (tie = 1/2): 3 -> (0 + 1)/2; 5 -> (1/2 + 1)/2
    assert r_w.tolist() == pytest.approx([0.5, 0.75, 0.75])
    # r_l[j] = mean_k 1[t_l[j] < t_w[k]]: 5 -> (0 + 1/2 + 1/2)/3; 1 -> 1
    assert r_l.tolist() == pytest.approx([1 / 3, 1.0])


def test_gcpo_rewards_unparseable():
    nan = float("nan")
    r_w, r_l = gcpo_rewards(torch.tensor([4.0, nan]), torch.tensor([2.0, nan, 6.0]))
    assert r_w.tolist() == pytest.approx([2 / 3, 0.0])       # 4 beats 2 and the broken trace, loses to 6
    assert r_l.tolist() == pytest.approx([1.0, 0.0, 0.5])    # 2 < 4 and beats the broken trace; 6 > 4
    r_w, r_l = gcpo_rewards(torch.full((2,), nan), torch.full((2,), nan))
    assert r_w.tolist() == [0.0, 0.0] and r_l.tolist() == [0.0, 0.0]


def test_group_advantages():
    r = torch.tensor([0.5, 0.75, 0.75])
    std = math.sqrt(((0.5 - 2 / 3) ** 2 + 2 * (0.75 - 2 / 3) ** 2) / 3)
    want = [(x - 2 / 3) / (std + 1e-4) for x in (0.5, 0.75, 0.75)]
    assert group_advantages(r).tolist() == pytest.approx(want, rel=1e-5)
    assert group_advantages(torch.tensor([0.4, 0.4])).tolist() == [0.0, 0.0]


def test_gcpo_loss_equals_hand_ppo_surrogate():
    old = torch.tensor([[-1.0, -2.0], [-0.5, -3.0]])
    d = torch.tensor([[0.5, -0.1], [0.3, 9.0]])  # logp - old_logp; the last token is padding
    logp, adv, mask = old + d, torch.tensor([1.0, -2.0]), torch.tensor([[1.0, 1.0], [1.0, 0.0]])
    # A = +1: ratio e^0.5 = 1.65 is clipped to 1.2 -> -1.2; ratio e^-0.1 = 0.905 is inside -> -0.905
    # A = -2: ratio e^0.3 = 1.35 -> max(2 * 1.35, 2 * 1.2) = 2 * e^0.3
    want = (-1.2 - math.exp(-0.1) + 2 * math.exp(0.3)) / 3
    assert gcpo_loss(logp, old, adv, mask, clip_eps=0.2).item() == pytest.approx(want, rel=1e-6)
    ref = logp - torch.tensor([[0.2, 0.0], [-0.1, 5.0]])  # ref - logp = [-0.2, 0, 0.1]
    k3 = sum(math.exp(x) - x - 1 for x in (-0.2, 0.0, 0.1))
    got = gcpo_loss(logp, old, adv, mask, 0.2, ref_logp=ref, beta=0.5, num_tokens=6).item()
    assert got == pytest.approx((want * 3 + 0.5 * k3) / 6, rel=1e-6)


def test_k3_kl_is_capped_and_its_gradient_stops_at_the_cap():
    logp = torch.tensor([-0.5, -20.0], requires_grad=True)
    ref = torch.tensor([-0.7, -1.0])  # d = -0.2 (small) and 19 (a token the policy nearly ruled out)
    kl = k3_kl(ref, logp)
    assert kl[0].item() == pytest.approx(math.exp(-0.2) + 0.2 - 1, rel=1e-5) and kl[1].item() == KL_CAP
    kl.sum().backward()
    assert logp.grad[0].item() == pytest.approx(1 - math.exp(-0.2), rel=1e-5) and logp.grad[1].item() == 0.0


def test_filter_logits():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    kept = lambda x: torch.isfinite(x)[0].tolist()
    assert kept(filter_logits(logits, 1.0, top_k=2)) == [True, True, False, False]
    assert kept(filter_logits(logits, 1.0, top_p=0.7)) == [True, True, False, False]   # 0.5 < 0.7 <= 0.8
    assert kept(filter_logits(logits, 1.0, top_p=0.9)) == [True, True, True, False]
    assert torch.allclose(filter_logits(logits, 0.5), logits / 0.5)


# ----------------------------------------------------------------------------------------------------------
# sampling and teacher forcing on the tiny model

@pytest.fixture(scope="module")
def tiny():
    torch.set_num_threads(1)
    model, processor = load_backbone("tiny", max_pixels=56 * 56)
    return model.eval(), processor


def _img(seed):
    return Image.fromarray(np.random.default_rng(seed).integers(0, 255, (56, 56, 3), dtype=np.uint8))


def test_the_sampler_refuses_logits_with_nan_as_multinomial_does(tiny):
    """The sampler draws multinomial's token with multinomial's own algorithm, batched, without its input checks:
    logits that hold NaN (a diverged model) stop it with a clear error, never an arbitrary token."""
    model, processor = tiny
    enc = verifier_prompt(processor, [_img(0)], "make the red circle blue", _img(1))
    assert sample_shared_prefill(model, enc, [1, 2], -1, 4)[1].isfinite().all()  # finite logits sample
    hook = model.get_output_embeddings().register_forward_hook(lambda m, i, o: o.index_fill(-1, torch.tensor([5]),
                                                                                              float("nan")))
    try:
        with pytest.raises(FloatingPointError, match="NaN"):
            sample_shared_prefill(model, enc, [1, 2], -1, 4)
    finally:
        hook.remove()


def test_shared_prefill_same_tokens_as_independent(tiny):
    model, processor = tiny
    enc = verifier_prompt(processor, [_img(0)], "make the red circle blue", _img(1))
    seeds = [42, 43, 44, 45]
    toks, logp, mask = sample_shared_prefill(model, enc, seeds, eos_id=-1, max_new_tokens=16, temperature=0.7,
                                             top_k=20, top_p=0.9)
    assert toks.shape == (4, 16) and mask.all()
    assert len({tuple(t.tolist()) for t in toks}) > 1  # the passes really differ
    for i, s in enumerate(seeds):
        t1, l1, _ = sample_shared_prefill(model, enc, [s], eos_id=-1, max_new_tokens=16, temperature=0.7,
                                          top_k=20, top_p=0.9)
        assert torch.equal(t1[0], toks[i])
        assert torch.allclose(l1[0], logp[i], atol=1e-5)


@pytest.mark.parametrize("name", ["tiny", "tiny-qwen3-vl"])
def test_a_batch_of_prompts_draws_what_each_prompt_draws_alone(tiny, name):
    """Prompts of different lengths and image counts, left-padded into one batch and decoded together (B x K rows),
    draw each prompt's own tokens with its own log-probs: the padding is masked, left out of the repetition penalty,
    and each row's decode positions continue its own 3D rope (Qwen3-VL: interleaved, deepstack too)."""
    model, processor = tiny if name == "tiny" else load_backbone(name, max_pixels=56 * 56)
    model, eos = model.eval(), processor.tokenizer.convert_tokens_to_ids("<|im_end|>")
    encs = [verifier_prompt(processor, [_img(0)], "make the red circle blue", _img(1)),
            verifier_prompt(processor, [_img(2), _img(3)], "add a small green triangle at the top", _img(4)),
            verifier_prompt(processor, [_img(5)], "remove", _img(6))]
    assert len({e["input_ids"].shape[1] for e in encs}) == 3  # three lengths: two rows are padded
    batch = collate(encs, [[]] * 3, processor.tokenizer.pad_token_id)[0]
    seeds, sampler = [7, 8, 9, 10, 11, 12], dict(eos_id=eos, max_new_tokens=16, temperature=0.7, top_k=20, top_p=0.9,
                                                 repetition_penalty=1.3)
    toks, logp, mask = sample_shared_prefill(model, batch, seeds, **sampler)
    assert toks.shape[0] == 6 and len({tuple(t[m.bool()].tolist()) for t, m in zip(toks, mask)}) > 3
    for b, enc in enumerate(encs):
        alone = sample_shared_prefill(model, enc, seeds[2 * b:2 * b + 2], **sampler)
        for i in range(2):
            m, m1 = mask[2 * b + i].bool(), alone[2][i].bool()
            assert toks[2 * b + i][m].tolist() == alone[0][i][m1].tolist(), (b, i)
            assert torch.allclose(logp[2 * b + i][m], alone[1][i][m1], atol=1e-5), (b, i)


def test_old_logprobs_match_teacher_forcing_with_padding_and_no_kv_cache(tiny):
    """The sampler's log-probs equal the trainer's on left/right-padded batches, so GCPO's first ratio is 1."""
    model, processor = tiny
    eos = processor.tokenizer.convert_tokens_to_ids("<|im_end|>")
    encs = [verifier_prompt(processor, [_img(2)], "remove the square", _img(3)),
            verifier_prompt(processor, [_img(4), _img(5)], "add a small green triangle at the top", _img(6))]
    rows, olds = [], []
    for enc, seeds in zip(encs, ([1, 2], [3])):
        toks, old, mask = sample_shared_prefill(model, enc, seeds, eos, 12)
        for t, o, m in zip(toks, old, mask):
            n = int(m.sum())
            rows.append((enc, t[:n].tolist()))
            olds.append(o[:n])
    inputs, resp, rmask = collate([r[0] for r in rows], [r[1] for r in rows], processor.tokenizer.pad_token_id)
    caches = []  # a training forward keeps no KV cache (at 7B: memory beside the activations, for nothing)
    hook = model.register_forward_hook(lambda module, args, out: caches.append(out.past_key_values))
    with torch.no_grad():
        lp = response_logprobs(model, inputs, resp)
    hook.remove()
    assert caches == [None]
    for b, o in enumerate(olds):
        assert torch.allclose(lp[b, :len(o)], o, atol=1e-4)
        assert rmask[b].sum() == len(o)


@pytest.mark.parametrize("name", ["tiny", "tiny-qwen3-vl"])
def test_sampler_draws_what_generate_draws_with_a_repetition_penalty_and_two_eos_ids(tiny, name):
    """EditScore's scorer calls transformers' generate(), which adds the model's generation_config: Qwen2.5-VL-7B-
    Instruct's repetition penalty (prompt and answer tokens) and its two eos ids. With the same seed, the shared-prefill
    sampler draws generate()'s tokens and stops where it stops (the vision placeholders suppressed in both); on
    Qwen3-VL too (interleaved M-RoPE, deepstack), whose decode positions the sampler computes itself."""
    model, processor = tiny if name == "tiny" else load_backbone(name, max_pixels=56 * 56)
    model = model.eval()
    cfg, im_end = model.config, processor.tokenizer.convert_tokens_to_ids("<|im_end|>")
    ban = [cfg.image_token_id, cfg.video_token_id, cfg.vision_start_token_id, cfg.vision_end_token_id]
    enc = verifier_prompt(processor, [_img(0)], "make the red circle blue", _img(1))

    def both(seed, eos, penalty):
        torch.manual_seed(seed)
        ref = model.generate(**enc, do_sample=True, temperature=0.7, top_k=20, top_p=0.9, max_new_tokens=16,
                             repetition_penalty=penalty, eos_token_id=eos, suppress_tokens=ban)
        toks, _, mask = sample_shared_prefill(model, enc, [seed], eos, 16, 0.7, 20, 0.9, penalty)
        return ref[0, enc["input_ids"].shape[1]:].tolist(), toks[0][mask[0].bool()].tolist()

    plain, penalised = both(40, im_end, 1.0)[1], both(40, im_end, 1.3)[1]
    assert plain != penalised  # the penalty changes the draw
    eos = [im_end, penalised[5]]  # a second eos id that this answer meets at its 6th token
    for seed in (40, 41, 42, 43):
        ref, ours = both(seed, eos, 1.3)
        assert ours == ref
    assert both(40, eos, 1.3)[1] == penalised[:penalised.index(eos[1]) + 1]


def test_a_zero_shot_rubric_answers_and_sees_images_as_editscores_scorers():
    """A base VLM under the EditScore rubric gets what an EditScore adapter gets: 512-token answers (the rubric
    reasons before its JSON) and its scorer's image bounds (Qwen2.5-VL: qwen_vl_utils'; Qwen3-VL: the processor's)."""
    from rewardmodel import EDITSCORE_PIXELS, parser
    es = RewardModel.from_pretrained("tiny", mode="verifier", rubric="editscore").flags
    assert es["max_new_tokens"] == 512 and {k: es[k] for k in EDITSCORE_PIXELS} == EDITSCORE_PIXELS
    q3 = RewardModel.from_pretrained("tiny-qwen3-vl", mode="verifier", rubric="editscore").flags
    assert (q3["min_pixels"], q3["max_pixels"], q3["max_new_tokens"]) == (None, None, 512)
    own = RewardModel.from_pretrained("tiny", mode="verifier", rubric="editscore", max_new_tokens=64).flags
    assert own["max_new_tokens"] == 64  # an explicit flag still wins
    assert RewardModel.from_pretrained("tiny", mode="verifier").flags["max_new_tokens"] == parser.get_default(
        "max_new_tokens")  # the project's own verifier prompt keeps the script's defaults


def test_score_decodes_the_rubric_with_the_models_generation_config(monkeypatch):
    """The EditScore rubric samples with the backbone's generation_config eos ids and repetition penalty, as its
    scorer's generate() call does; the project's own verifier prompt samples as GCPO trained it."""
    import rewardmodel
    seen, real = [], rewardmodel.sample_shared_prefill
    monkeypatch.setattr(rewardmodel, "sample_shared_prefill", lambda *a: seen.append((a[3], a[-1])) or real(*a))
    for rubric in ("editscore", "verifier"):
        rm = RewardModel.from_pretrained("tiny", mode="verifier", rubric=rubric, max_new_tokens=2)
        rm.backbone.generation_config.update(eos_token_id=[7, 9], repetition_penalty=1.05)
        rm.score([[_img(0)]], ["remove the square"], [_img(1)], num_samples=2)
    im_end = rm.processor.tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert seen == [([7, 9], 1.05)] * 2 + [(im_end, 1.0)]  # the rubric's two prompts, then the verifier's one


# ----------------------------------------------------------------------------------------------------------
# subprocess smoke runs: SFT, GCPO + exact resume, torchrun

@pytest.fixture(scope="module")
def toy_files(tmp_path_factory):
    d = tmp_path_factory.mktemp("vtoy")
    for i in range(6):
        _img(10 + i).save(d / f"im{i}.png")
    with open(d / "traces.jsonl", "w") as f:
        for i in range(8):
            f.write(json.dumps({"id": f"t{i}", "instruction": "make the red circle blue", "source": "im0.png",
                                "edited": f"im{1 + i % 5}.png", "response": TOY.replace("6}", f"{i}}}")}) + "\n")
    with open(d / "pairs.jsonl", "w") as f:
        for i in range(4):
            f.write(json.dumps({"id": f"p{i}", "instruction": "remove the square", "source": "im0.png",
                                "preferred": f"im{1 + i}.png", "rejected": f"im{2 + i}.png",
                                "prefs": {"overall": 1}}) + "\n")
    return d


def verifier_flags(**kw):
    """The flags a verifier run on the tiny model starts from (what --mode verifier puts over the parser's)."""
    return {**vars(parser.parse_args([])), **preset("verifier", False), "mode": "verifier",
            "dims": "follow,keep,quality", "max_pixels": 3136, **kw}


def test_sft_step_runs_checkpointed_layers(toy_files):
    """transformers checkpoints a layer only in training mode: with --grad_checkpointing on, every checkpointed
    layer runs through its checkpoint function during an SFT step, whatever mode the model was left in."""
    rm = RewardModel(verifier_flags(grad_checkpointing="on"))
    from transformers.modeling_layers import GradientCheckpointingLayer
    layers = [m for m in rm.backbone.modules()
              if isinstance(m, GradientCheckpointingLayer) and m.gradient_checkpointing]
    calls = []
    for m in layers:
        m._gradient_checkpointing_func = lambda *a, f=m._gradient_checkpointing_func, **k: calls.append(1) or f(*a, **k)
    rm.eval()  # as score() or a GCPO rollout leaves it
    sft_step(rm, load_traces(str(toy_files / "traces.jsonl"))[:2], 2)
    assert len(layers) >= 4 and len(calls) == len(layers)  # 2 text layers, 2 vision blocks: each ran checkpointed
    assert any(p.grad is not None for p in rm.parameters() if p.requires_grad)


def test_gcpo_update_with_grad_checkpointing_recomputes_and_updates_as_without(toy_files):
    """GCPO's update under --grad_checkpointing on (auto on CUDA): the layers run checkpointed, the KL's reference
    forward (adapter off, no gradient) comes between the policy's forward and its backward's recomputation, and the
    updated adapter equals the one trained without checkpointing."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    from rewardmodel import gcpo_update, make_optimizer
    pair = load_pairs(str(toy_files / "pairs.jsonl"))[0]
    after, calls = {}, []
    for mode in ("off", "on"):
        flags = verifier_flags(grad_checkpointing=mode, kl_beta=0.04, micro_batch=2, ppo_epochs=1, lr=1e-3)
        rm, args = RewardModel(flags), argparse.Namespace(**flags)
        for m in rm.backbone.modules():
            if isinstance(m, GradientCheckpointingLayer) and m.gradient_checkpointing:
                f = m._gradient_checkpointing_func
                m._gradient_checkpointing_func = lambda *a, f=f, **k: calls.append(mode) or f(*a, **k)
        tok = rm.processor.tokenizer
        enc = verifier_prompt(rm.processor, [Image.open(toy_files / "im0.png")], pair.instruction,
                              Image.open(toy_files / "im1.png"))
        resps = [tok("follow: 7").input_ids, tok('{"score": 3}').input_ids]
        inputs, resp, _ = collate([enc, enc], resps, tok.pad_token_id)
        with torch.no_grad():
            old = response_logprobs(rm.backbone, inputs, resp)
        rows = [(enc, r, old[i, :len(r)], torch.tensor(a)) for i, (r, a) in enumerate(zip(resps, (1.0, -1.0)))]
        optimizer = make_optimizer(rm, args)
        for g in optimizer.param_groups:
            g["lr"] = g["peak"]
        gcpo_update(rm, rows, optimizer, args)
        after[mode] = {k: v.detach().clone() for k, v in rm.named_parameters() if v.requires_grad}
    assert "on" in calls and "off" not in calls
    assert all(torch.allclose(after["on"][k], v, atol=1e-6) for k, v in after["off"].items())
    assert any(v.abs().sum() > 0 for k, v in after["off"].items() if "lora_B" in k)  # LoRA B starts at zero


def test_gcpo_update_computes_the_kl_reference_once_a_rollout(monkeypatch):
    """The KL's reference (the model with its adapter off) does not move during a rollout's --ppo_epochs passes: it
    is computed once per micro-batch, and every pass's KL uses its own micro-batch's reference."""
    import rewardmodel
    from rewardmodel import gcpo_update, make_optimizer
    flags = verifier_flags(kl_beta=0.04, micro_batch=2, ppo_epochs=2, lr=1e-2, warmup_steps=0)
    rm, args = RewardModel(flags), argparse.Namespace(**flags)
    tok = rm.processor.tokenizer
    encs = [verifier_prompt(rm.processor, [_img(2 * j)], "make it blue", _img(2 * j + 1)) for j in range(4)]
    resps = [tok(t).input_ids for t in ("follow: 7", '{"score": 3}', "keep: 2 and quality 9", "score 4")]
    batches = [collate(encs[i:i + 2], resps[i:i + 2], tok.pad_token_id) for i in (0, 2)]  # the update's micro-batches
    with torch.no_grad():
        old = [lp for b in batches for lp in response_logprobs(rm.backbone, b[0], b[1])]  # the rollout's, per row
    advs = (1.0, -1.0, 0.5, -0.5)
    rows = [(e, r, old[i][:len(r)], torch.tensor(a)) for i, (e, r, a) in enumerate(zip(encs, resps, advs))]
    seen, real = [], rewardmodel.response_logprobs
    monkeypatch.setattr(rewardmodel, "response_logprobs",
                        lambda *a, **k: seen.append((torch.is_grad_enabled(), (out := real(*a, **k)))) or out)
    _, _, kl, _ = gcpo_update(rm, rows, make_optimizer(rm, args), args)
    policy, refs = [o.detach() for g, o in seen if g], [o for g, o in seen if not g]
    assert len(policy) == 4 and len(refs) == 2  # 2 passes x 2 micro-batches; the reference once per micro-batch
    with torch.no_grad(), rm.backbone.disable_adapter():
        fresh = [real(rm.backbone, b[0], b[1], args.temperature) for b in batches]
    assert all(torch.equal(r, f) for r, f in zip(refs, fresh))
    last = sum((k3_kl(f, p) * b[2]).sum() for f, p, b in zip(fresh, policy[2:], batches)) / sum(map(len, resps))
    assert kl == pytest.approx(last.item(), rel=1e-5) and kl > 0  # the last pass, each batch against its own


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="a GPU's kernels: needs CUDA"))])
def test_the_verifier_trains_in_bf16_as_dtype_auto_does_on_a_gpu(toy_files, device):
    """--dtype auto is bf16 on CUDA: the adapter stays fp32 under autocast, the base bf16; an SFT step, a GCPO rollout
    (shared-prefill sampling with a bf16 KV cache) and its update run, and at the first update the teacher-forced
    log-probs agree with the sampler's within the PPO clip (no token clipped), as they must on policy. On CUDA the
    flags are the defaults themselves (--dtype auto, --grad_checkpointing auto: on)."""
    from rewardmodel import gcpo_rollout, gcpo_update, make_optimizer, optimizer_step
    flags = verifier_flags(dtype="auto" if device == "cuda" else "bfloat16", kl_beta=0.04, max_new_tokens=8,
                           num_traces=2, micro_batch=2)
    rm, args = RewardModel(flags, device), argparse.Namespace(**flags)
    assert {p.dtype for p in rm.parameters() if p.requires_grad} == {torch.float32}
    assert {p.dtype for p in rm.parameters() if not p.requires_grad} == {torch.bfloat16}
    optimizer = make_optimizer(rm, args)
    loss, _ = sft_step(rm, load_traces(str(toy_files / "traces.jsonl"))[:2], 2)
    assert math.isfinite(loss) and math.isfinite(optimizer_step(optimizer, 1.0, sum_ranks=True))
    pairs = load_pairs(str(toy_files / "pairs.jsonl"), disentangle=False)[:2]
    rows, stats = gcpo_rollout(rm, pairs, [0, 1], 0, args)
    assert len(rows) == 2 * 2 * args.num_traces and stats[2] == 2 * 2 * args.num_traces
    loss, clipped, kl, norm = gcpo_update(rm, rows, optimizer, args)
    assert all(math.isfinite(v) for v in (loss, kl, norm)) and clipped == 0


def test_gcpo_rollout_batches_pairs_and_samples_what_each_pair_samples_alone(toy_files, tmp_path):
    """The rollout decodes --micro_batch pairs' 2 x N traces as one left-padded batch: prompts of other lengths and
    image counts give the rows (tokens, old log-probs, advantages) and counts each pair gives alone."""
    from rewardmodel import gcpo_rollout
    rows = [("remove the square", ["im0.png"]), ("add a small green triangle at the top", ["im0.png", "im1.png"]),
            ("make it red", ["im2.png"])]
    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps({"id": f"p{i}", "instruction": ins, "source": [str(toy_files / s) for s in src],
                                        "preferred": str(toy_files / f"im{3 + i}.png"),
                                        "rejected": str(toy_files / f"im{4 + i % 2}.png")}) + "\n"
                            for i, (ins, src) in enumerate(rows)))
    pairs = load_pairs(str(path), disentangle=False)
    flags = verifier_flags(max_new_tokens=12, num_traces=3, temperature=1.0)
    rm = RewardModel(flags)
    alone = gcpo_rollout(rm, pairs, [0, 1, 2], 5, argparse.Namespace(**{**flags, "micro_batch": 1}))
    together = gcpo_rollout(rm, pairs, [0, 1, 2], 5, argparse.Namespace(**{**flags, "micro_batch": 3}))
    assert len(together[0]) == len(alone[0]) == 3 * 2 * 3 and torch.equal(together[1], alone[1])
    assert len({len(r[1]) for r in alone[0]}) > 1 or len({tuple(r[1]) for r in alone[0]}) > 3  # real answers
    for (e1, t1, o1, a1), (e3, t3, o3, a3) in zip(alone[0], together[0]):
        assert torch.equal(e1["input_ids"], e3["input_ids"]) and t1 == t3 and a1 == a3
        assert torch.allclose(o1, o3, atol=1e-5)


def test_sft_micro_batches_give_the_whole_batch_gradient(toy_files):
    """SFT accumulates micro-batches: 4 traces in micro-batches of 1 give the gradient of one forward of 4, and so do
    prompts built ahead (train_loop's worker), sliced per micro-batch."""
    items = load_traces(str(toy_files / "traces.jsonl"))[:4]
    grads = []
    for micro, ahead in ((4, False), (1, False), (1, True)):
        rm = RewardModel(verifier_flags())
        loss, ntok = sft_step(rm, items, micro, sft_prompts(rm, items) if ahead else None)
        grads.append((loss, ntok, [p.grad.clone() for p in rm.parameters() if p.requires_grad]))
    for other in grads[1:]:
        assert grads[0][:2] == pytest.approx(other[:2], rel=1e-5)
        assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(grads[0][2], other[2]))


def test_the_verifier_toys_stage_recipes_yield_to_flags_given_on_the_command_line(monkeypatch):
    """--mode verifier --toy runs SFT then GCPO, each with its own steps and lr; a --max_steps given by hand (a short
    trial) holds for both, as every preset yields to explicit flags."""
    import rewardmodel as R
    seen = []
    monkeypatch.setattr(R, "train_verifier", lambda a, d: seen.append(a) or {"time": 0})
    monkeypatch.setattr(R, "load_pairs", lambda *a, **k: [])
    monkeypatch.setattr(R.RewardModel, "from_pretrained", lambda *a, **k: None)
    monkeypatch.setattr(R, "evaluate", lambda *a, **k: {"parse": 1.0, "overall": 1.0, "tied": 0.0})
    toy = {**vars(parser.parse_args([])), **preset("verifier", True), "mode": "verifier", "toy": True}
    for given, want in (({}, [(1500, 1e-3, "train"), (120, 5e-4, "frozen")]),
                        ({"max_steps": 7, "vision": "lora"}, [(7, 1e-3, "lora"), (7, 5e-4, "lora")])):
        seen.clear()
        R.run_toy(argparse.Namespace(**toy | given), Dist())
        assert [(a.max_steps, a.lr, a.vision) for a in seen] == want


def _run(args, torchrun=False):
    cmd = ([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"] if torchrun
           else [sys.executable]) + [SCRIPT, "--mode", "verifier"] + args
    p = subprocess.run(cmd, env=ENV, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-3000:]
    return p.stdout


GCPO = ["--stage", "gcpo", "--batch_size", "2", "--num_traces", "2", "--max_new_tokens", "16", "--kl_beta", "0.1",
        "--lr", "1e-2", "--eval_interval", "1", "--log_interval", "1", "--max_pixels", "3136"]


@pytest.fixture(scope="module")
def sft_dir(toy_files):
    out = toy_files / "sft"
    log = _run(["--stage", "sft", "--model", "tiny", "--train", str(toy_files / "traces.jsonl"), "--out_dir", str(out),
                "--max_steps", "3", "--batch_size", "4", "--lr", "1e-2", "--log_interval", "1", "--max_pixels", "3136"])
    assert "step 3/3 | loss" in log
    return out


def test_sft_smoke(sft_dir):
    flags = json.loads((sft_dir / "args.json").read_text())
    assert flags["mode"] == "verifier" and flags["init"] is None and flags["dims"] == "follow,keep,quality"
    assert torch.load(sft_dir / "train_state.pt", weights_only=True)["step"] == 3
    saved = _adapter(sft_dir)  # lm_head's LoRA factors, never a copy of lm_head itself (1 GB at 7B)
    assert any("lm_head.lora_A" in k for k in saved) and not any("base_layer" in k for k in saved)
    rm = RewardModel.from_pretrained(str(sft_dir), max_new_tokens=8)  # dispatches on args.json's mode
    out = rm.score([_img(0), _img(1)], ["remove the square"] * 2, [_img(2), _img(3)], num_samples=2)
    assert rm.dims == ["follow", "keep", "quality"] and set(out) >= {"overall", "unparsed", *rm.dims}
    assert all(v.shape == (2,) for v in out.values())
    assert ((out["unparsed"] == 2) == out["overall"].isnan()).all()  # NaN exactly where no pass parsed


def test_held_out_evaluation_counts_ties_and_parses(toy_files, sft_dir):
    """evaluate() on a verifier (as the toy run reports it): strict accuracy, the share of pairs scored equal or
    unparsed, and the parse rate over all Avg@K passes, each a fraction."""
    rm = RewardModel.from_pretrained(str(sft_dir), max_new_tokens=8)
    pairs = [p for p in load_pairs(str(toy_files / "pairs.jsonl"), disentangle=False) if not p.tie][:2]
    res = evaluate(rm, pairs, 4, num_samples=2)
    assert set(res) == {"overall", "tied", "parse"} and all(0.0 <= v <= 1.0 for v in res.values())
    assert res["overall"] + res["tied"] <= 1.0  # a pair is right, wrong or tied


@pytest.mark.parametrize("rubric", ["verifier", "editscore"])
def test_a_verifier_answers_the_same_whatever_the_batch(rubric, monkeypatch):
    """score() decodes batch_size edits' prompts together, pass i of every edit seeded seed + i: each edit gets the
    answers it gets alone (here exactly, in fp32), so its scores do not depend on how the edits are batched."""
    import rewardmodel
    seen, real = [], rewardmodel.sample_shared_prefill
    def record(*a):
        toks, logp, mask = real(*a)
        seen.extend(t[m.bool()].tolist() for t, m in zip(toks, mask))
        return toks, logp, mask
    monkeypatch.setattr(rewardmodel, "sample_shared_prefill", record)
    rm = RewardModel.from_pretrained("tiny", mode="verifier", rubric=rubric, max_new_tokens=12)
    args = ([[_img(20)], [_img(21), _img(22)], [_img(23)]], ["remove the square", "make it blue", "add a star"],
            [_img(24), _img(25), _img(26)])
    answers = []
    for b in (1, 3):
        seen.clear()
        rm.score(*args, num_samples=2, batch_size=b)
        answers.append(seen[:])
    if rubric == "editscore":  # batch_size 1: SC, PQ of edit 1, then of edit 2, ...; 3: the SC of all, the PQ of all
        answers[0] = [a for j in (0, 1) for e in range(3) for a in answers[0][4 * e + 2 * j:4 * e + 2 * j + 2]]
    assert len(answers[0]) == (12 if rubric == "editscore" else 6) and answers[0] == answers[1]
    assert len({tuple(a) for a in answers[0]}) > 2  # the answers differ: a real comparison


@pytest.mark.parametrize("rubric", ["verifier", "editscore"])
def test_a_rank_without_held_out_pairs_scores_none_and_goes_on(toy_files, rubric):
    """More ranks than held-out pairs (say --val_max 1 on 2 GPUs): a rank with none scores an empty list; the
    verifier returns empty tensors under the same keys, as the Gaussian head does, instead of failing to reshape."""
    rm = RewardModel.from_pretrained("tiny", mode="verifier", rubric=rubric, max_new_tokens=2)
    full = rm.score([[_img(0)]], ["remove the square"], [_img(1)], num_samples=2)
    empty = rm.score([], [], [], num_samples=2)
    assert empty.keys() == full.keys() and all(v.shape == (0,) for v in empty.values())
    pairs = [p for p in load_pairs(str(toy_files / "pairs.jsonl"), disentangle=False) if not p.tie][:1]
    res = evaluate(rm, pairs, 4, rank=1, world_size=2, num_samples=2)  # rank 1 of 2 holds no pair
    assert math.isnan(res["overall"])


def test_editscore_rubric_counts_unparsed():
    """A random model never answers in the rubric's format: every pass is counted, no score is invented."""
    rm = RewardModel.from_pretrained("tiny", mode="verifier", rubric="editscore", max_new_tokens=4)
    assert rm.dims == ["prompt_following", "consistency", "perceptual_quality"]
    out = rm.score([[_img(0)]], ["remove the square"], [_img(1)], num_samples=3)
    assert out["unparsed"].tolist() == [3.0] and all(v.isnan().all() for k, v in out.items() if k != "unparsed")


@pytest.fixture(scope="module")
def gcpo_run(toy_files, sft_dir):
    """GCPO flags from the SFT checkpoint, and the directory of an uninterrupted 2-step run."""
    flags = GCPO + ["--init", str(sft_dir), "--train", str(toy_files / "pairs.jsonl")]
    log = _run(flags + ["--out_dir", str(toy_files / "gcpo_a"), "--max_steps", "2"])
    assert "step 2/2 | win" in log
    return flags, toy_files / "gcpo_a"


def _adapter(path):
    return load_file(path / "backbone" / "adapter_model.safetensors")


def test_gcpo_resumes_exactly(toy_files, sft_dir, gcpo_run):
    flags, straight = gcpo_run
    split = toy_files / "gcpo_b"
    _run(flags + ["--out_dir", str(split), "--max_steps", "1"])
    log = _run(flags + ["--out_dir", str(split), "--max_steps", "2", "--resume"])
    assert "step 1/2" not in log and "step 2/2" in log
    a, b = _adapter(straight), _adapter(split)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert json.loads((straight / "args.json").read_text())["init"] == str(sft_dir)  # the SFT model it builds on


def test_a_gcpo_checkpoint_carries_its_sft_model_wherever_it_moves(sft_dir, gcpo_run, tmp_path):
    """GCPO's adapter sits on the SFT model with the SFT adapter merged in. A checkpoint that only named that model's
    folder failed to load once copied to another machine, and loaded on the wrong model, silently, once the folder was
    retrained. It keeps a copy in init/: the model (args.json, adapter), not that run's optimizer state."""
    import shutil
    from safetensors.torch import save_file
    _, straight = gcpo_run
    assert sorted(os.listdir(straight / "init")) == ["args.json", "backbone"]
    assert (straight / "init" / "args.json").read_text() == (sft_dir / "args.json").read_text()
    weights = lambda path: RewardModel.from_pretrained(str(path)).backbone.state_dict()  # noqa: E731
    want, moved, retrained = weights(straight), tmp_path / "moved", tmp_path / "sft_retrained"
    shutil.copytree(straight, moved)
    shutil.copytree(sft_dir, retrained)  # the SFT folder after another run: other adapter weights
    adapter = load_file(retrained / "backbone" / "adapter_model.safetensors")
    save_file({k: v + 0.5 for k, v in adapter.items()}, retrained / "backbone" / "adapter_model.safetensors")
    flags = json.loads((moved / "args.json").read_text())
    for init in (tmp_path / "gone", retrained):  # another machine; the SFT folder retrained
        (moved / "args.json").write_text(json.dumps({**flags, "init": str(init)}))
        got = weights(moved)
        assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want), init
    shutil.rmtree(moved / "init")  # a checkpoint without its copy loads what its --init names now
    got = weights(moved)
    assert not all(torch.equal(got[k], want[k]) for k in want)
    (moved / "args.json").write_text(json.dumps({**flags, "init": str(tmp_path / "gone")}))
    with pytest.raises(FileNotFoundError, match=f"--init {tmp_path / 'gone'}: not a checkpoint of this script"):
        weights(moved)


def test_gcpo_starts_from_the_sft_model_when_its_embeddings_are_tied(toy_files, tmp_path, monkeypatch):
    """Qwen2.5-VL-3B and Qwen3-VL-2B/4B tie lm_head to the input embeddings, and the verifier adapts lm_head. Merging
    the SFT adapter into that shared weight changed the input embeddings too: GCPO's start and its KL reference were
    not the SFT model. Both now give the SFT model's log-probabilities."""
    import rewardmodel as R
    build = R.build_tiny_vlm
    def tied(*a, **kw):
        model, processor = build(*a, **kw)
        model.config.tie_word_embeddings = True
        model.tie_weights()
        return model, processor
    monkeypatch.setattr(R, "build_tiny_vlm", tied)
    sft = RewardModel(verifier_flags(model="tiny", lora_rank=4))
    emb = R.unwrap(sft.backbone).get_input_embeddings().weight
    assert R.unwrap(sft.backbone).get_output_embeddings().weight is emb  # tied
    with torch.no_grad():  # a trained SFT adapter
        for n, p in sft.backbone.named_parameters():
            p.copy_(torch.randn_like(p) * 0.3) if "lora_B" in n else None
    R.save_checkpoint(str(tmp_path / "sft"), sft, torch.optim.AdamW(sft.parameters()), 1)
    sft = RewardModel.from_pretrained(str(tmp_path / "sft")).eval()
    gcpo = RewardModel(verifier_flags(model="tiny", lora_rank=4, stage="gcpo", init=str(tmp_path / "sft"))).eval()
    pair = load_pairs(str(toy_files / "pairs.jsonl"))[0]
    enc = R.verifier_prompt(sft.processor, [Image.open(s) for s in pair.sources], pair.instruction,
                            Image.open(pair.preferred))
    with torch.no_grad():
        want = sft.backbone(**enc).logits[0, -1].log_softmax(-1)
        start = gcpo.backbone(**enc).logits[0, -1].log_softmax(-1)  # the new adapter starts at zero
        with gcpo.backbone.disable_adapter():
            ref = gcpo.backbone(**enc).logits[0, -1].log_softmax(-1)
    assert torch.allclose(start, want, atol=1e-4) and torch.allclose(ref, want, atol=1e-4)


def test_gcpo_computes_in_its_own_dtype_not_its_sft_runs(sft_dir):
    """The SFT model brings its base, pixel bounds and principles; --dtype is how this run computes (it was taken
    from the SFT run without a word: an fp32 SFT made a --dtype bfloat16 GCPO run in fp32)."""
    assert json.loads((sft_dir / "args.json").read_text())["dtype"] == "auto"  # fp32 on the CPU
    gcpo = RewardModel(verifier_flags(model="tiny", stage="gcpo", init=str(sft_dir), dtype="bfloat16"))
    assert gcpo.compute_dtype == torch.bfloat16 and gcpo.flags["dtype"] == "bfloat16"


def test_torchrun_gcpo_matches_one_process(toy_files, gcpo_run):
    """2 ranks x 1 pair == 1 rank x 2 pairs: same seeds per pair, gradients summed over the global tokens."""
    flags, straight = gcpo_run
    out = toy_files / "gcpo_ddp"
    log = _run(flags + ["--out_dir", str(out), "--max_steps", "2"], torchrun=True)
    assert "step 2/2 | win" in log
    a, b = _adapter(straight), _adapter(out)
    assert all(torch.allclose(a[k], b[k], atol=1e-5) for k in a)


@pytest.mark.parametrize("stage", ["sft", "gcpo"])
def test_bad_training_data_stops_the_verifier_before_its_model_loads(tmp_path, monkeypatch, stage):
    import rewardmodel
    (tmp_path / "bad.jsonl").write_text('{"id": "a", "instruction": "x"}\n')
    monkeypatch.setattr(rewardmodel, "RewardModel", lambda *a, **k: pytest.fail("the model loaded first"))
    args = parser.parse_args(["--mode", "verifier", "--stage", stage, "--train", str(tmp_path / "bad.jsonl")])
    with pytest.raises(ValueError, match=r"bad.jsonl:1: "):
        rewardmodel.train_verifier(args, Dist())


def test_the_sft_score_keys_are_every_principle_the_traces_teach(tmp_path, monkeypatch, capsys):
    """With no --dims, SFT scores the principles its traces name, in first-seen order: one named only by the last
    of 250 traces is a key too, not dropped."""
    import rewardmodel
    _img(0).save(tmp_path / "a.png")
    late = TOY.replace('"score"', '"late": 2, "score"')
    with open(tmp_path / "traces.jsonl", "w") as f:
        for i in range(250):
            f.write(json.dumps({"id": f"t{i}", "instruction": "x", "source": "a.png", "edited": "a.png",
                                "response": late if i == 249 else TOY}) + "\n")
    seen = []
    monkeypatch.setattr(rewardmodel, "train_loop", lambda a, d, rm, *r, **k: seen.append(list(rm.dims)))
    rewardmodel.train_verifier(argparse.Namespace(**verifier_flags(dims="", train=str(tmp_path / "traces.jsonl"),
                                                                   out_dir=str(tmp_path / "out"))), Dist())
    assert seen == [["follow", "keep", "quality", "late"]]
    assert "score keys: the 4 principles the traces name (follow, keep, quality, late)" in capsys.readouterr().out


def test_gcpo_says_its_tied_pairs_and_a_missing_init_and_refuses_a_file_of_ties(tmp_path, monkeypatch, capsys):
    import rewardmodel
    _img(0).save(tmp_path / "a.png")
    _img(1).save(tmp_path / "b.png")
    def write(ties):
        with open(tmp_path / "pairs.jsonl", "w") as f:
            for i, tie in enumerate(ties):
                f.write(json.dumps({"id": f"p{i}", "instruction": "x", "source": "a.png", "preferred": "a.png",
                                    "rejected": "b.png", "tie": tie}) + "\n")
    seen = []
    monkeypatch.setattr(rewardmodel, "RewardModel", lambda *a, **k: None)
    monkeypatch.setattr(rewardmodel, "train_loop", lambda a, d, rm, items, *r, **k: seen.append(items))
    args = argparse.Namespace(**verifier_flags(stage="gcpo", train=str(tmp_path / "pairs.jsonl"),
                                               out_dir=str(tmp_path / "out")))
    write([True, False, True])
    rewardmodel.train_verifier(args, Dist())
    out = capsys.readouterr().out
    assert [p.id for p in seen[0]] == ["p1"] and "2 of 3 pairs tied, left out of GCPO" in out
    assert "no --init: GCPO starts from tiny itself, also the KL's reference" in out  # no SFT model named: said
    rewardmodel.train_verifier(argparse.Namespace(**vars(args) | {"init": str(tmp_path / "sft")}), Dist())
    assert "no --init" not in capsys.readouterr().out
    write([True, True])
    with pytest.raises(SystemExit, match="pairs.jsonl: every pair is tied"):
        rewardmodel.train_verifier(args, Dist())
