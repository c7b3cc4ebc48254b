"""grpo.py: the SDE step, advantages, KL, the GRPO and DiffusionNFT losses against hand-computed values; the editors'
ODE samples against the diffusers pipelines' own (real tiny VAEs, true CFG, Plus's two sources) and their
conditioning (Qwen's M-RoPE text embeddings, Plus's several sources, the content-keyed cache), bf16 compute,
micro-batched decoding, Flow-GRPO's LoRA targets; torchrun and FSDP on CPU; exact resume; the saved LoRA loaded back by
diffusers (each of the last three under --algo grpo and nft). Everything runs on the tiny editors, offline.
Diagnostics come from what a run saves (history.json, checkpoints)."""
import dataclasses
import json
import math
import os
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from PIL import Image

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import grpo  # noqa: E402
from data import Dist, EditPrompt, load_prompts, load_sources, make_toy  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": ROOT}
CPU = torch.device("cpu")
# a tiny, fast run: 16 px images, 4 sampling steps, 2 prompts x 2 samples per step
FAST = ["--editor", "tiny", "--resolution", "16", "--max_sequence_length", "48", "--num_steps", "4",
        "--eval_num_steps", "2", "--prompts_per_step", "2", "--group_size", "2", "--micro_batch", "2",
        "--eval_prompts", "2", "--eval_every", "0", "--lr", "1e-2", "--noise_level", "0.9"]


def on(algo):
    """FAST under --algo: nft refuses FAST's --noise_level, a Flow-GRPO flag (its rollouts are ODE samples)."""
    i = FAST.index("--noise_level")
    return (FAST if algo == "grpo" else FAST[:i] + FAST[i + 2:]) + ["--algo", algo]


# ---------------------------------------------------------------------------- the sampler


def test_sde_step_without_noise_is_the_schedulers_euler_step():
    from diffusers import FlowMatchEulerDiscreteScheduler

    sched = FlowMatchEulerDiscreteScheduler(shift=3.0)
    sched.set_timesteps(num_inference_steps=6)
    x, v = torch.randn(3, 5, 4), torch.randn(3, 5, 4)
    for i in (0, 2, 5):  # includes sigma = 1 and the last step to sigma = 0
        sched._step_index = i
        euler = sched.step(v, sched.timesteps[i], x, return_dict=False)[0]
        prev, log_prob, mean, std = grpo.sde_step(x, v, sched.sigmas[i], sched.sigmas[i + 1], 0.0)
        torch.testing.assert_close(prev, euler, atol=1e-6, rtol=0)
        assert torch.equal(std, torch.zeros(3)) and torch.equal(log_prob, torch.zeros(3))


def test_sde_log_prob_is_the_normal_density_averaged_over_elements():
    torch.manual_seed(0)
    x, v, prev = torch.randn(2, 3, 4), torch.randn(2, 3, 4), torch.randn(2, 3, 4)
    s, s_next, a = torch.tensor([0.8, 0.5]), torch.tensor([0.6, 0.3]), 0.7
    _, log_prob, mean, std_dev_t = grpo.sde_step(x, v, s, s_next, a, prev_sample=prev)
    col = lambda t: t.view(2, 1, 1)  # noqa: E731
    dt = col(s_next - s)
    std_s = a * torch.sqrt(col(s) / (1 - col(s)))
    want_mean = x * (1 + std_s**2 / (2 * col(s)) * dt) + v * (1 + std_s**2 * (1 - col(s)) / (2 * col(s))) * dt
    torch.testing.assert_close(mean, want_mean)
    torch.testing.assert_close(std_dev_t, std_s.flatten())  # Flow-GRPO's std_dev_t, without sqrt(-dt)
    want = torch.distributions.Normal(want_mean, std_s * torch.sqrt(-dt)).log_prob(prev).mean(dim=(1, 2))
    torch.testing.assert_close(log_prob, want)


def test_sde_step_at_sigma_one_takes_the_root_at_the_next_sigma():
    # ours: a sqrt(s' / (1 - s')); Flow-GRPO's code: a sqrt(1 / (1 - s')), sqrt(1 / s') = 1.15x more at s' = 0.75
    x, v, a = torch.randn(2, 3), torch.randn(2, 3), 0.7
    _, _, _, std1 = grpo.sde_step(x, v, 1.0, 0.75, a)
    torch.testing.assert_close(std1, torch.full((2,), a * math.sqrt(0.75 / 0.25)))
    assert abs(a * math.sqrt(1 / 0.25) / float(std1[0]) - 1 / math.sqrt(0.75)) < 1e-6


# ---------------------------------------------------------------------------- advantages, KL and loss


def test_group_advantages_by_hand():
    r = torch.tensor([1.0, 2.0, 3.0, 5.0, 5.0, 0.0, 10.0])
    g = torch.tensor([7, 7, 7, 2, 2, 9, 9])
    adv = grpo.group_advantages(r, g, eps=1e-4, clip=5.0)
    sd = math.sqrt(2 / 3)  # population std of 1, 2, 3
    want = [-1 / (sd + 1e-4), 0.0, 1 / (sd + 1e-4), 0.0, 0.0, -5 / (5 + 1e-4), 5 / (5 + 1e-4)]
    torch.testing.assert_close(adv, torch.tensor(want))
    big = grpo.group_advantages(torch.tensor([0.0, 0.0, 0.0, 1.0]), torch.zeros(4), clip=1.5)
    torch.testing.assert_close(big, torch.tensor([-1 / math.sqrt(3)] * 3 + [1.5]), atol=1e-3, rtol=0)


def test_group_advantages_keep_small_spreads_on_large_offsets():
    r = torch.tensor([100.001, 100.002, 100.004], dtype=torch.float64)
    dev = r - r.mean()
    want = dev / (dev.pow(2).mean().sqrt() + 1e-4)  # float64 throughout
    adv = grpo.group_advantages(r, torch.zeros(3))
    assert (adv.double() - want).abs().max() < 1e-6  # a float32 computation is off by ~1e-2 here


def test_group_advantages_leave_unscored_samples_out():
    # group 0: 1, NaN, 3 -> stats over {1, 3} (mean 2, std 1), the NaN gets 0; group 1 is all NaN -> zeros
    nan = float("nan")
    adv = grpo.group_advantages(torch.tensor([1.0, nan, 3.0, nan, nan]), torch.tensor([0, 0, 0, 1, 1]), eps=0.0)
    torch.testing.assert_close(adv, torch.tensor([-1.0, 0.0, 1.0, 0.0, 0.0]))


def test_kl_is_flow_grpos_exact_transition_kl_times_dt():
    torch.manual_seed(2)
    x, v, v_ref = torch.randn(2, 5, 3), torch.randn(2, 5, 3), torch.randn(2, 5, 3)
    s, s_next = 0.8, 0.6
    _, _, mean, std_dev_t = grpo.sde_step(x, v, s, s_next, 0.9)
    _, _, ref_mean, _ = grpo.sde_step(x, v_ref, s, s_next, 0.9)
    kl = grpo.gaussian_kl(mean, ref_mean, std_dev_t)
    torch.testing.assert_close(kl, ((mean - ref_mean) ** 2).mean(dim=(1, 2)) / (2 * std_dev_t**2))
    var = (std_dev_t * math.sqrt(s - s_next)) ** 2  # the transitions' variance
    exact = ((mean - ref_mean) ** 2).mean(dim=(1, 2)) / (2 * var)
    torch.testing.assert_close(kl, exact * (s - s_next))


def test_grpo_loss_by_hand():
    old = torch.zeros(4)
    new = torch.log(torch.tensor([1.0, 1.3, 0.6, 1.05]))
    adv = torch.tensor([1.0, 2.0, -1.0, -3.0])
    c = 0.1
    loss, ratio, clipped = grpo.grpo_loss(new, old, adv, c)
    # per sample max(-A r, -A clip(r)): 1: -1; 2: max(-2.6, -2.2) = -2.2; 3: max(0.6, 0.9) = 0.9; 4: max(3.15, 3.15)
    torch.testing.assert_close(loss, torch.tensor((-1 - 2.2 + 0.9 + 3.15) / 4))
    assert clipped.tolist() == [False, True, True, False]
    kl = torch.tensor([0.5, 1.0, 0.0, 0.5])
    loss_kl, _, _ = grpo.grpo_loss(new, old, adv, c, kl=kl, beta=0.04)
    torch.testing.assert_close(loss_kl, loss + 0.04 * 0.5)


def test_nft_loss_by_hand_at_r_one_is_the_positive_policys_flow_matching():
    v = torch.tensor([[[1.0, 3.0]], [[0.0, -2.0]]], requires_grad=True)  # (B=2, tokens=1, D=2)
    target, t, ones = torch.tensor([[[0.0, 1.0]], [[1.0, 0.0]]]), torch.tensor([0.5, 1.0]), torch.ones(2)
    # x0+ - x0 = t (v - target): [0.5, 1] and [-1, -2]; mean square / mean |.| = 0.625 / 0.75 and 2.5 / 1.5
    loss = grpo.nft_loss(v, v.detach(), target, t, ones)
    torch.testing.assert_close(loss, torch.tensor(5 * (0.625 / 0.75 + 2.5 / 1.5) / 2))
    loss.backward()
    for g, d in zip(v.grad, (v - target).detach()):  # each sample's gradient is its flow-matching one, scaled up
        assert float((g * d).sum()) > 0 and torch.allclose(g / g.norm(), d / d.norm())
    # beta 0.5: v+ = (v + v_old) / 2 is what is pulled to the target, scaled by 1 / beta
    v_old = torch.tensor([[[3.0, 1.0]], [[2.0, 0.0]]])
    v_plus = 0.5 * v.detach() + 0.5 * v_old
    by_hand = grpo.nft_loss(v_plus, v_plus, target, t, ones) / 0.5
    torch.testing.assert_close(grpo.nft_loss(v.detach(), v_old, target, t, ones, beta=0.5), by_hand)


def test_nft_loss_gradient_flips_between_r_one_and_r_zero():
    torch.manual_seed(0)
    v_old, target, t = torch.randn(3, 4, 5), torch.randn(3, 4, 5), torch.rand(3)
    grads = []
    for r in (1.0, 0.0, 0.5):
        v = v_old.clone().requires_grad_(True)
        grpo.nft_loss(v, v_old, target, t, torch.full((3,), r)).backward()
        grads.append(v.grad)
    # at v = v_old the negative policy's error is the positive one's, reflected: gradient (2r - 1) x that at r = 1
    assert grads[0].norm() > 0
    torch.testing.assert_close(grads[1], -grads[0])
    torch.testing.assert_close(grads[2], torch.zeros_like(grads[2]))


def test_rollout_plan_spreads_groups_over_ranks_with_distinct_noise():
    P, G, world = 4, 6, 3
    plans = [grpo.rollout_plan(0, 5, 50, P, G, r, world) for r in range(world)]
    slots = [s for mine, _, _ in plans for s in mine]
    assert sorted(slots) == [(g, k) for g in range(P) for k in range(G)]  # a partition of all samples
    assert all(plans[0][1] == pl[1] for pl in plans)  # same prompts on every rank
    assert any(len({r for r, pl in enumerate(plans) for g, _ in pl[0] if g == gg}) > 1 for gg in range(P))
    keys = [k for _, _, ks in plans for k in ks]
    assert len(set(keys)) == len(keys)  # no two samples anywhere share initial noise
    shared = [grpo.rollout_plan(0, 5, 50, P, G, r, world, same_noise=True) for r in range(world)]
    by_group = {}
    for mine, _, ks in shared:
        for (g, _), k in zip(mine, ks):
            by_group.setdefault(g, set()).add(k)
    assert all(len(v) == 1 for v in by_group.values()) and len({min(v) for v in by_group.values()}) == P


# ---------------------------------------------------------------------------- the tiny editors


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("toy"))
    make_toy(out, seed=0, size=16, n_train=8, n_val=4, n_rl=8, n_rl_test=4, n_editor=16)
    return out


def paths(toy):
    return ["--train_prompts", os.path.join(toy, "rl_train.jsonl"),
            "--test_prompts", os.path.join(toy, "rl_test.jsonl"),
            "--sft_data", os.path.join(toy, "editor_train.jsonl")]


def editor_for(toy, *extra, device=CPU):
    args = grpo.parse_args(FAST + paths(toy) + list(extra))
    return grpo.load_editor(args, device), args


def test_fsdp_outside_torchrun_is_a_flag_error_that_names_torchrun(monkeypatch, capsys):
    monkeypatch.delenv("RANK", raising=False)
    with pytest.raises(SystemExit):
        grpo.parse_args(FAST + ["--fsdp"])
    assert "--fsdp needs torchrun" in capsys.readouterr().err
    monkeypatch.setenv("RANK", "0")  # under torchrun the flag parses
    assert grpo.parse_args(FAST + ["--fsdp"]).fsdp


@pytest.mark.parametrize("flag, value", [("--group_size", "1"), ("--micro_batch", "0"), ("--prompts_per_step", "0"),
                                         ("--steps", "-3"), ("--eval_prompts", "0"), ("--grad_clip", "-1"),
                                         ("--beta", "nan"), ("--clip_range", "-0.1"), ("--noise_level", "-0.7"),
                                         ("--num_steps", "1"), ("--eval_num_steps", "0"), ("--lora_alpha", "0")])
def test_flags_out_of_range_are_flag_errors_not_a_run_that_trains_nothing(capsys, flag, value):
    """A group of one has zero advantage (a run of zero-std 1.00 and gnorm 0), so has an adapter scaled by alpha 0;
    one sampling step leaves GRPO no SDE step (a crash after the rollout) and NFT no sigma; the others fail late."""
    with pytest.raises(SystemExit):
        grpo.parse_args(FAST + [flag, value])
    assert f"{flag} must be >= " in capsys.readouterr().err


def test_nothing_to_train_and_a_misspelt_lora_target_are_said_up_front(toy, capsys):
    """peft adapts the targets it finds and drops the others without a word (it fails only when none matches)."""
    with pytest.raises(SystemExit):
        grpo.parse_args(FAST + ["--lora_rank", "0", "--train_modules", ""])
    assert "nothing to train: --lora_rank 0 and no --train_modules" in capsys.readouterr().err
    editor, args = editor_for(toy, "--lora_rank", "4", "--train_modules", "", "--lora_targets",
                              "attn.to_q,attn.to_qq")
    with pytest.raises(ValueError, match=r"--lora_targets: tiny has no module named \['attn.to_qq'\]"):
        grpo.setup_trainable(editor, args)


@pytest.mark.parametrize("flags, unused", [
    ("--algo nft --beta 0.04", "--algo nft does not use --beta"), ("--nft_beta 2", "--algo grpo does not use --nft_beta"),
    ("--algo nft --clip_range 0.2 --noise_level 0.9 --same_noise_per_group",
     "--algo nft does not use --same_noise_per_group, --clip_range, --noise_level")])
def test_a_flag_of_the_other_algo_is_a_flag_error_not_a_run_that_ignores_it(capsys, flags, unused):
    """--algo nft has no KL, no PPO clip and ODE rollouts; GRPO has no old policy to mix or decay."""
    with pytest.raises(SystemExit):
        grpo.parse_args(flags.split())
    assert unused + " (flags of the other --algo)" in capsys.readouterr().err
    assert grpo.parse_args(["--algo", "nft", "--nft_beta", "2"]).nft_beta == 2  # its own flags, and a preset's
    assert grpo.parse_args(["--toy", "--algo", "nft"]).same_noise_per_group  # (set for GRPO) are not refused


def test_grad_clip_0_is_off_as_in_rewardmodel_not_a_clip_that_zeroes_the_gradients():
    w = torch.nn.Parameter(torch.ones(3))
    w.grad, opt = torch.full((3,), 2.0), torch.optim.SGD([w], lr=0.5)
    assert grpo.optimizer_step(opt, [w], 0.0, reduce=False) == pytest.approx(12 ** 0.5)
    assert torch.allclose(w.detach(), torch.zeros(3))  # 1 - 0.5 * 2: the whole gradient


def test_a_reward_dimension_the_reward_model_lacks_is_an_error_at_load_naming_its_dimensions():
    assert grpo.make_reward("rm:tiny@visual_quality", CPU) is not None
    with pytest.raises(ValueError, match=r"rm:tiny@quality'.*instruction_following, visual_quality, overall, not 'q"):
        grpo.make_reward("rm:tiny@quality", CPU)


def test_a_verifier_checkpoint_is_a_reward_its_overall_or_one_principle(toy, tmp_path):
    """Edit-R1's recipe: a verifier trained by rewardmodel.py as the reward. --reward rm:PATH gives its overall
    (0..10, NaN where no answer parsed: group_advantages leaves it out), rm:PATH@principle one principle; each is
    what RewardModel.score gives for the same edits."""
    from rewardmodel import RewardModel
    verifier = tmp_path / "verifier"
    subprocess.run([sys.executable, "rewardmodel.py", "--mode", "verifier", "--stage", "sft", "--train",
                    os.path.join(toy, "cot_train.jsonl"), "--out_dir", str(verifier), "--max_steps", "40",
                    "--batch_size", "8", "--lr", "1e-2", "--warmup_steps", "4", "--lora_rank", "64", "--lora_alpha",
                    "128", "--max_pixels", "3136", "--max_new_tokens", "40"], cwd=ROOT, env=ENV, check=True,
                   capture_output=True)
    prompts = load_prompts(os.path.join(toy, "rl_test.jsonl"))[:4]
    edits = [load_sources(p)[0] for p in prompts]  # the sources as edits: what matters is the plumbing
    want = RewardModel.from_pretrained(str(verifier)).score([load_sources(p) for p in prompts],
                                                            [p.instruction for p in prompts], edits)
    assert (want["unparsed"] == 0).any()  # some answers parse: there are scores to compare
    for dim in ("overall", "follow"):
        spec = f"rm:{verifier}" + ("" if dim == "overall" else f"@{dim}")
        assert grpo.parse_args(FAST + ["--reward", spec]).reward == spec
        got = grpo.make_reward(spec, CPU)(prompts, edits)
        assert got.dtype == torch.float64 and got.shape == (4,)
        torch.testing.assert_close(got, want[dim].double(), equal_nan=True)


def test_a_t5_prompt_longer_than_512_tokens_is_a_flag_error_as_in_the_kontext_pipeline(capsys):
    assert grpo.parse_args(FAST + ["--max_sequence_length", "512"]).max_sequence_length == 512
    with pytest.raises(SystemExit):
        grpo.parse_args(FAST + ["--max_sequence_length", "513"])
    assert "--max_sequence_length 513: at most 512" in capsys.readouterr().err


def test_a_real_editor_gets_flow_grpos_resolution_and_only_the_toy_its_32_px():
    assert grpo.parse_args(["--editor", "black-forest-labs/FLUX.1-Kontext-dev"]).resolution == 512
    assert grpo.parse_args(["--toy"]).resolution == 32
    assert grpo.parse_args(["--toy", "--resolution", "64"]).resolution == 64  # an explicit flag still wins


def test_eval_leaves_unscored_edits_out_and_counts_them(toy, tmp_path):
    editor, args = editor_for(toy, "--out_dir", str(tmp_path))
    blank_first = lambda ps, ims: torch.tensor([math.nan] + [2.0] * (len(ps) - 1), dtype=torch.float64)
    ev = grpo.evaluate(editor, load_prompts(args.test_prompts)[:4], blank_first, editor.sigmas(2), Dist(device=CPU),
                       args, 0)
    assert (ev["reward"], ev["unscored"]) == (2.0, 4 // args.micro_batch) and math.isfinite(ev["oracle"])


def test_ratio_is_exactly_one_at_the_first_update(toy):
    editor, _ = editor_for(toy)
    cond = editor.condition(load_prompts(os.path.join(toy, "rl_train.jsonl"))[:3])
    sigmas = editor.sigmas(4)
    x = grpo.initial_noise(editor, [1, 2, 3], CPU)
    with torch.no_grad():
        _, traj = grpo.sample(editor, cond, x, sigmas, {0, 1, 2}, 0.9, torch.Generator().manual_seed(0))
    for j, x_t, x_next, old in traj:  # the training forward, with gradients, re-scores the same samples
        v = editor.velocity(x_t, sigmas[j], cond)
        _, lp, _, _ = grpo.sde_step(x_t, v, sigmas[j], sigmas[j + 1], 0.9, prev_sample=x_next)
        _, ratio, _ = grpo.grpo_loss(lp, old, torch.ones(3), 1e-4)
        assert torch.equal(ratio, torch.ones(3))


@pytest.mark.parametrize("algo", ["grpo", "nft"])
def test_grad_checkpointing_recomputes_the_blocks_and_gives_the_same_update(toy, algo):
    """--grad_checkpointing (the README's 8-GPU command): the blocks run again in backward, and the update equals the
    one without it, with the KL's reference swap (grpo, beta > 0) and NFT's old-policy swap in the step."""
    prompts = load_prompts(os.path.join(toy, "rl_train.jsonl"))[:2]
    grads, calls = {}, {}
    for checkpointing in (False, True):
        args = grpo.parse_args(on(algo) + paths(toy) + ["--beta", "0.04"] * (algo == "grpo"))
        editor = grpo.load_editor(args, CPU)
        named, ref = grpo.setup_trainable(editor, args)
        old = {n: q.detach().clone() for n, q in named}
        editor.tr.enable_gradient_checkpointing() if checkpointing else None
        sigmas, gen = editor.sigmas(args.num_steps), torch.Generator().manual_seed(0)
        edits, batches = grpo.rollout(editor, prompts, [1, 2], sigmas, {0, 1}, args, gen)
        block, n = editor.tr.transformer_blocks[0], [0]
        forward = block.forward  # counted by a wrapper: a forward hook does not fire in the recomputation
        block.forward = lambda *a, **k: n.__setitem__(0, n[0] + 1) or forward(*a, **k)
        opt = torch.optim.SGD([q for _, q in named], lr=0.0)  # the gradients, not a step
        adv = torch.tensor([1.0, -1.0])
        if algo == "grpo":
            grpo.update(editor, opt, named, ref, batches, adv, sigmas, {0, 1}, args)
        else:
            grpo.nft_update(editor, opt, named, old, batches, adv, sigmas, args, torch.Generator().manual_seed(1))
        del block.forward
        grads[checkpointing], calls[checkpointing] = {k: q.grad.clone() for k, q in named}, n[0]
    assert calls[True] > calls[False] > 0  # the recomputation in backward
    assert all(torch.allclose(grads[True][k], g, atol=1e-6) for k, g in grads[False].items())
    assert any(g.abs().sum() > 0 for g in grads[False].values())


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="a GPU's kernels: needs CUDA"))])
@pytest.mark.parametrize("editor_name", ["tiny", "tiny-qwen"])
def test_in_bf16_with_checkpointing_the_first_updates_ratios_are_exactly_one(toy, editor_name, device):
    """Flow-GRPO clips the ratio at 1 +- 1e-4, so the training forward must reproduce the rollout's log-probs to
    far better than bf16's resolution: in the README's settings (bf16, LoRA, checkpointed blocks) it repeats the
    rollout's arithmetic exactly, and no sample is clipped. On CUDA the rollout (no grad) and the training forward
    (grad, recomputed in backward) may pick different attention kernels: they must agree too."""
    editor, args = editor_for(toy, "--editor", editor_name, "--dtype", "bf16", "--guidance", "1",
                              device=torch.device(device))
    named, ref = grpo.setup_trainable(editor, args)
    editor.tr.enable_gradient_checkpointing()
    prompts, sigmas = load_prompts(os.path.join(toy, "rl_train.jsonl"))[:2], editor.sigmas(args.num_steps)
    gen = torch.Generator(device).manual_seed(0)
    _, batches = grpo.rollout(editor, prompts, [1, 2], sigmas, {0, 1, 2}, args, gen)
    opt = torch.optim.AdamW([q for _, q in named], lr=1e-3)
    adv = torch.tensor([1.0, -1.0], dtype=torch.float64, device=device)  # as the run's: gathered rewards
    stats = grpo.update(editor, opt, named, ref, batches, adv, sigmas, {0, 1, 2}, args)
    assert stats["ratio_min"] == stats["ratio_max"] == 1.0 and stats["clip"] == 0 and stats["grad_norm"] > 0


def test_the_logged_kl_is_every_ranks_and_history_is_strict_json(toy, tmp_path, monkeypatch):
    """The step's kl is the mean over ranks (it was rank 0's: it changed with the number of GPUs). history.json, for
    people and their tools, holds null where a real run has no oracle (NaN is no JSON: strict readers refused it)."""
    editor, args = editor_for(toy, "--beta", "0.1", "--lora_rank", "0", "--train_modules", "context_embedder")
    named, ref = grpo.setup_trainable(editor, args)
    prompts, sigmas = load_prompts(os.path.join(toy, "rl_train.jsonl"))[:2], editor.sigmas(args.num_steps)
    _, batches = grpo.rollout(editor, prompts, [1, 2], sigmas, {0, 1}, args, torch.Generator().manual_seed(0))
    seen = []  # this rank's kl, and a second rank's 1.0 above it
    monkeypatch.setattr(grpo, "gather", lambda t: seen.append(float(t)) or torch.cat([t, t + 1]))
    stats = grpo.update(editor, torch.optim.SGD([q for _, q in named], lr=0.0), named, ref, batches,
                        torch.tensor([1.0, -1.0], dtype=torch.float64), sigmas, {0, 1}, args)
    assert len(seen) == 1 and stats["kl"] == pytest.approx(seen[0] + 0.5)
    monkeypatch.undo()
    out = str(tmp_path / "run")
    grpo.main(grpo.parse_args(FAST + paths(toy) + ["--reward", "rm:tiny", "--steps", "1", "--out_dir", out]))
    h = json.loads(open(os.path.join(out, "history.json")).read(), parse_constant=lambda c: pytest.fail(c))
    assert h["eval"][0]["oracle"] is None and h["eval"][0]["reward"] is not None


def test_qwen_edit_path_true_cfg_and_small_condition(toy):
    editor, _ = editor_for(toy, "--editor", "tiny-qwen", "--guidance", "4")
    cond = editor.condition(load_prompts(os.path.join(toy, "rl_train.jsonl"))[:2])
    # the condition is encoded at the output's size, not the pipeline's 1024^2 area
    assert cond["image"].shape == (2, 16, 48) and cond["passes"][0]["img_shapes"][0] == [(1, 4, 4), (1, 4, 4)]
    x = grpo.initial_noise(editor, [1, 2], CPU)
    with torch.no_grad():
        v = editor.velocity(x, 0.5, cond)
        editor.guidance = 1.0
        v1 = editor.velocity(x, 0.5, cond)
    assert v.shape == x.shape and not torch.allclose(v, v1)
    torch.testing.assert_close(v.norm(dim=-1), v1.norm(dim=-1))  # true CFG keeps the conditional prediction's norm


def test_qwen_prompt_embedding_has_the_image_tokens_mrope_positions(toy):
    editor, _ = editor_for(toy, "--editor", "tiny-qwen", "--guidance", "1")
    pipe, p = editor.pipe, load_prompts(os.path.join(toy, "rl_train.jsonl"))[0]
    img = load_sources(p)[0].resize((64, 64))
    with torch.no_grad():
        ours = editor.qwen_embed(p.instruction, [img])
        text = pipe.prompt_template_encode.format(p.instruction)
        inputs = pipe.processor(text=[text], images=[img], return_tensors="pt")
        out = pipe.text_encoder(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"],
                                pixel_values=inputs["pixel_values"], image_grid_thw=inputs["image_grid_thw"],
                                mm_token_type_ids=inputs["mm_token_type_ids"], output_hidden_states=True)
        want = out.hidden_states[-1][0, pipe.prompt_template_encode_start_idx:]
        without, _ = pipe.encode_prompt(prompt=[p.instruction], image=img, device=CPU)  # diffusers' own path
    torch.testing.assert_close(ours, want)
    assert without.shape[1:] == want.shape[:1] + want.shape[1:] and not torch.allclose(without[0], want, atol=1e-4)


def assert_samples_as_the_pipeline(editor, pipe, cond, x, sigmas, kw):
    """grpo.py's ODE sample from x, then its decode, against the pipeline's __call__(**kw) from the same noise."""
    with torch.no_grad():
        ours, _ = grpo.sample(editor, cond, x, sigmas, set(), 0.0, None)
        theirs, images = pipe(**kw, output_type="latent").images, pipe(**kw).images
    torch.testing.assert_close(pipe.scheduler.sigmas, sigmas)
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)
    decoded = editor.decode(ours)  # latents 1e-6 apart may round a pixel value the other way
    assert len(decoded) == len(images) and all(np.abs(np.asarray(a, dtype=int) - np.asarray(b, dtype=int)).max() <= 1
                                               for a, b in zip(decoded, images))


def kontext_with_a_vae(max_length):
    """The tiny Kontext pipeline with a real (tiny, random) AutoencoderKL in place of the pixel patches, its scaling
    and shift factors FLUX.1's, so that the editor's VAE path is the real one."""
    from diffusers import AutoencoderKL, FluxTransformer2DModel
    pipe = grpo.tiny_kontext(max_length=max_length)
    torch.manual_seed(1)
    pipe.vae = AutoencoderKL(down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                             block_out_channels=(8, 16), layers_per_block=1, latent_channels=4, norm_num_groups=8,
                             scaling_factor=0.3611, shift_factor=0.1159).eval()
    pipe.transformer = FluxTransformer2DModel(in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=32,
                                              num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32,
                                              guidance_embeds=True, axes_dims_rope=(4, 14, 14)).eval()
    pipe.vae_scale_factor = 2 ** (len(pipe.vae.config.block_out_channels) - 1)
    pipe.latent_channels = pipe.vae.config.latent_channels
    from diffusers.image_processor import VaeImageProcessor
    pipe.image_processor = VaeImageProcessor(vae_scale_factor=pipe.vae_scale_factor * 2)
    return pipe


def test_the_kontext_editors_ode_sample_is_the_pipelines_own(toy):
    """Flow-GRPO's evaluation samples with the ODE: on a batch of two prompts, grpo.py's encode -> sample -> decode
    gives what diffusers' FluxKontextPipeline.__call__ gives from the same noise (source at the output's size)."""
    res, n = 32, 4
    pipe = kontext_with_a_vae(48)
    editor = grpo.Editor(pipe, grpo.parse_args(FAST + paths(toy) + ["--resolution", str(res)]), CPU)
    prompts = load_prompts(os.path.join(toy, "rl_train.jsonl"))[:2]
    sigmas, x = editor.sigmas(n), grpo.initial_noise(editor, [1, 2], CPU)
    srcs = [load_sources(p)[0].resize((res, res), Image.LANCZOS) for p in prompts]
    kw = dict(image=srcs, prompt=[p.instruction for p in prompts], height=res, width=res, max_area=res * res,
              _auto_resize=False, guidance_scale=2.5, num_inference_steps=n, latents=x, max_sequence_length=48)
    assert_samples_as_the_pipeline(editor, pipe, editor.condition(prompts), x, sigmas, kw)


def qwen_with_a_vae(plus):
    """The tiny Qwen-Image-Edit(-Plus) pipeline with a real (tiny, random) AutoencoderKLQwenImage: a video VAE with
    per-channel latent statistics, as the real one."""
    import diffusers
    pipe = grpo.tiny_qwen_edit(plus=plus)
    torch.manual_seed(1)
    pipe.vae = diffusers.AutoencoderKLQwenImage(base_dim=8, z_dim=16, dim_mult=[1, 2, 4, 4], num_res_blocks=1).eval()
    pipe.transformer = diffusers.QwenImageTransformer2DModel(
        in_channels=64, out_channels=16, num_layers=2, attention_head_dim=32, num_attention_heads=2,
        joint_attention_dim=pipe.text_encoder.config.text_config.hidden_size, axes_dims_rope=(4, 14, 14)).eval()
    pipe.vae_scale_factor = 2 ** len(pipe.vae.temperal_downsample)
    pipe.latent_channels = pipe.vae.config.z_dim
    from diffusers.image_processor import VaeImageProcessor
    pipe.image_processor = VaeImageProcessor(vae_scale_factor=pipe.vae_scale_factor * 2)
    return pipe


@pytest.mark.parametrize("plus", [False, True])
def test_the_qwen_editors_ode_sample_with_true_cfg_is_the_pipelines_own(toy, monkeypatch, plus):
    """Qwen-Image-Edit(-Plus), true CFG 4: grpo.py's sample and decode equal the pipeline's __call__ given the same
    text embeddings (the pipeline's own encode_prompt lacks the M-RoPE positions, tested apart) and the same noise;
    Plus with two sources."""
    import diffusers.pipelines.qwenimage.pipeline_qwenimage_edit as edit
    import diffusers.pipelines.qwenimage.pipeline_qwenimage_edit_plus as edit_plus
    res, n, rng = 64, 4, np.random.default_rng(0)
    module = edit_plus if plus else edit  # its resize to a 1024^2 (VL: 384^2) area, here the output's size
    monkeypatch.setattr(module, "calculate_dimensions", lambda area, ratio: (res, res) + (() if plus else (None,)))
    pipe = qwen_with_a_vae(plus)
    editor = grpo.Editor(pipe, grpo.parse_args(["--editor", "x", "--resolution", str(res), "--guidance", "4"]), CPU)
    imgs = [Image.fromarray(rng.integers(0, 256, (res, res, 3), dtype=np.uint8)) for _ in range(1 + plus)]
    prompt = EditPrompt(id="a", instruction="put Picture 2 into Picture 1", sources=imgs, origin="test")
    cond, sigmas, x = editor.condition([prompt]), editor.sigmas(n), grpo.initial_noise(editor, [7], CPU)
    (e,) = editor.cache.values()
    kw = dict(image=imgs if plus else imgs[0], prompt_embeds=e["text"][None], negative_prompt_embeds=e["neg"][None],
              true_cfg_scale=4.0, height=res, width=res, num_inference_steps=n, latents=x.clone())
    assert_samples_as_the_pipeline(editor, pipe, cond, x, sigmas, kw)


def kontext_as_on_the_hub():
    """kontext_with_a_vae with the tokenizer classes of black-forest-labs/FLUX.1-Kontext-dev: a CLIPTokenizer (77
    tokens) and a T5 tokenizer (a one-character-per-piece Unigram here), each with a text encoder of its size."""
    import string

    from diffusers import FluxKontextPipeline
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer, T5Config, T5EncoderModel, T5Tokenizer
    pipe, chars = kontext_with_a_vae(48), [c for c in string.printable[:95] if c != " "]
    letters = sorted({c.lower() for c in chars})
    clip_tok = CLIPTokenizer(vocab={t: i for i, t in enumerate(["<|startoftext|>", "<|endoftext|>"] + letters +
                                                                [c + "</w>" for c in letters])}, merges=[],
                             model_max_length=77)
    t5_tok = T5Tokenizer(vocab=[("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -1.0)] +
                         [(c, -2.0) for c in chars], extra_ids=0)
    torch.manual_seed(2)
    clip = CLIPTextModel(CLIPTextConfig(vocab_size=len(clip_tok), hidden_size=32, intermediate_size=64,
                                        num_hidden_layers=1, num_attention_heads=2, max_position_embeddings=77,
                                        projection_dim=32, bos_token_id=0, eos_token_id=1, pad_token_id=1))
    t5 = T5EncoderModel(T5Config(vocab_size=len(t5_tok), d_model=32, d_kv=16, d_ff=64, num_layers=1, num_heads=2))
    return FluxKontextPipeline(scheduler=pipe.scheduler, vae=pipe.vae, text_encoder=clip.eval(), tokenizer=clip_tok,
                               text_encoder_2=t5.eval(), tokenizer_2=t5_tok, transformer=pipe.transformer)


@pytest.mark.parametrize("kind", ["kontext", "qwen", "qwen-plus"])
def test_a_pipeline_folder_in_the_hubs_layout_loads_as_built_and_trains(toy, tmp_path, kind):
    """The real editors load by name or folder through DiffusionPipeline.from_pretrained. A tiny pipeline with a real
    VAE, saved as the hub's repos are (Qwen's processor a Qwen2VLProcessor, whose video part needs torchvision, which
    a README install lacks), loads without torchvision, samples as the pipeline it was saved from, and trains a step
    end to end: VAE encode, SDE rollout, reward, LoRA update, ODE eval, checkpoint. The saved LoRA then loads into
    the pipeline through diffusers' own load_lora_weights (Qwen-Image's loader as well as Flux's) as trained."""
    folder, out = str(tmp_path / kind), str(tmp_path / "run")
    built = kontext_as_on_the_hub() if kind == "kontext" else qwen_with_a_vae(kind == "qwen-plus")
    type(built)(**built.components).save_pretrained(folder)  # components, so the VAE set above is saved too
    if kind == "kontext":  # the hub repo names its T5 tokenizer by the class's fast name
        with open(os.path.join(folder, "model_index.json")) as f:
            cfg = json.load(f)
        assert cfg["tokenizer"] == ["transformers", "CLIPTokenizer"]
        with open(os.path.join(folder, "model_index.json"), "w") as f:
            json.dump({**cfg, "tokenizer_2": ["transformers", "T5TokenizerFast"]}, f)
    if kind != "kontext":  # the hub's layout (Qwen/Qwen-Image-Edit[-2509]): a Qwen2VLProcessor with a video processor
        for file, key in (("model_index.json", "processor"), ("processor/processor_config.json", "processor_class")):
            with open(os.path.join(folder, file)) as f:
                cfg = json.load(f)
            cfg[key] = ["transformers", "Qwen2VLProcessor"] if key == "processor" else "Qwen2VLProcessor"
            with open(os.path.join(folder, file), "w") as f:
                json.dump(cfg, f)
        with open(os.path.join(folder, "processor", "video_preprocessor_config.json"), "w") as f:
            json.dump({"video_processor_type": "Qwen2VLVideoProcessor", "patch_size": 14, "merge_size": 2}, f)
    flags = FAST + paths(toy) + ["--editor", folder, "--resolution", "32", "--steps", "1", "--lora_rank", "4",
                                 "--lora_alpha", "8", "--sft_steps", "0", "--out_dir", out]
    args = grpo.parse_args(flags)
    if kind == "kontext":  # Qwen's flag: refused before the weights load, not ignored
        with pytest.raises(ValueError, match="--cond_pixels: Qwen-Image-Edit's flag, not FluxKontextPipeline's"):
            grpo.load_editor(grpo.parse_args(flags + ["--cond_pixels", "4096"]), CPU)
    editor = grpo.load_editor(args, CPU)
    assert type(editor.pipe) is type(built) and editor.patch == 0 and editor.down == built.vae_scale_factor
    if kind != "kontext":
        import transformers
        assert isinstance(editor.pipe.processor, transformers.Qwen2VLProcessor)
    prompts, x = load_prompts(os.path.join(toy, "rl_train.jsonl"))[:2], grpo.initial_noise(editor, [1, 2], CPU)
    as_built = grpo.Editor(built, args, CPU)
    sigmas = editor.sigmas(2)
    torch.testing.assert_close(grpo.sample(editor, editor.condition(prompts), x, sigmas, set(), 0.0, None)[0],
                               grpo.sample(as_built, as_built.condition(prompts), x, sigmas, set(), 0.0, None)[0])
    assert grpo.load_editor(grpo.parse_args(flags + ["--dtype", "bf16"]), CPU).tr.dtype == torch.bfloat16
    other = tmp_path / "flux"  # another pipeline is refused from its model_index.json, before any weight loads
    other.mkdir()
    (other / "model_index.json").write_text(json.dumps({"_class_name": "FluxPipeline"}))
    with pytest.raises(ValueError, match="FluxPipeline is not a Kontext or Qwen-Image-Edit pipeline"):
        grpo.load_editor(grpo.parse_args(flags + ["--editor", str(other)]), CPU)
    grpo.main(args)
    assert [e["step"] for e in history(out)["eval"]] == [0, 1] and len(history(out)["train"]) == 1
    # the trained LoRA (rank 4, alpha 8) loads into the pipeline with diffusers' own loader at full strength
    trained = grpo.load_editor(args, CPU)
    grpo.load_checkpoint(os.path.join(out, "ckpt"), grpo.setup_trainable(trained, args)[0], args)
    with torch.no_grad():
        v0 = editor.velocity(x, 0.6, editor.condition(prompts))
        v1 = trained.velocity(x, 0.6, trained.condition(prompts))
        editor.pipe.load_lora_weights(os.path.join(out, "ckpt"))
        v2 = editor.velocity(x, 0.6, editor.condition(prompts))
    assert (v1 - v0).norm() > 0 and abs(float((v2 - v0).norm() / (v1 - v0).norm()) - 1) < 1e-4
    torch.testing.assert_close(v2, v1, atol=1e-5, rtol=1e-5)


def test_sources_are_resized_as_the_pipelines_resize_them(toy):
    editor, _ = editor_for(toy, "--editor", "tiny-qwen", "--guidance", "1")
    proc = editor.pipe.image_processor  # diffusers' VaeImageProcessor, as the pipelines' __call__ uses it (Lanczos)
    img = Image.fromarray(np.random.default_rng(0).integers(0, 256, (40, 56, 3), dtype=np.uint8))
    torch.testing.assert_close(grpo.to_tensor(img, 32), proc.preprocess(proc.resize(img, 32, 32), 32, 32)[0])
    seen = []  # the VL encoder's view of the source
    editor.qwen_embed = lambda text, images: seen.extend(images) or torch.zeros(3, 8)
    editor.encode(EditPrompt("p", "x", [img], origin="test"))
    side = editor.cond_side * editor.down
    assert np.array_equal(np.asarray(seen[0]), np.asarray(proc.resize(img, side, side)))


def test_qwen_edit_plus_conditions_on_every_source(toy):
    args = grpo.parse_args(FAST + paths(toy) + ["--editor", "tiny-qwen", "--guidance", "1"])
    editor = grpo.Editor(grpo.tiny_qwen_edit(plus=True), args, CPU, pixel_patch=2)
    assert editor.cond_side * editor.down == 384  # the VL encoder's view: the Plus pipeline's 384^2, not the output's
    args.cond_pixels = 64**2
    editor = grpo.Editor(grpo.tiny_qwen_edit(plus=True), args, CPU, pixel_patch=2)  # --cond_pixels wins
    assert editor.cond_side * editor.down == 64
    one = load_prompts(os.path.join(toy, "rl_train.jsonl"))[0]
    a, b = [load_prompts(os.path.join(toy, "rl_train.jsonl"))[i].sources[0] for i in (1, 2)]
    two = EditPrompt(id="two", instruction="put the shape of Picture 2 into Picture 1", sources=[a, b],
                     origin=one.origin)
    cond = editor.condition([two])
    n, h = (editor.side // 2) ** 2, editor.side // 2
    assert cond["image"].shape == (1, 2 * n, 4 * editor.C) and cond["passes"][0]["img_shapes"] == [[(1, h, h)] * 3]
    second = editor.encode_images(load_sources(two)[1:], editor.side)[0]  # Picture 2's latents, at the output's size
    torch.testing.assert_close(cond["image"][0, n:].float(), second)
    mixed = editor.condition([one, two])  # one and two sources in one micro-batch: a forward each
    with torch.no_grad():
        v = editor.velocity(grpo.initial_noise(editor, [1, 2], CPU), 0.5, mixed)
        v2 = editor.velocity(grpo.initial_noise(editor, [2], CPU), 0.5, cond)
    assert v.shape == (2, n, 4 * editor.C)
    torch.testing.assert_close(v[1:], v2)
    assert "parts" not in editor.condition([two, two])  # one batched forward
    editor.args.fsdp = True  # under FSDP every Plus batch takes a forward per prompt: all ranks run as many forwards
    assert len(editor.condition([two, two])["parts"]) == 2 and len(editor.condition([one, two])["parts"]) == 2


def test_rollout_encodes_its_new_prompts_at_once(toy, tmp_path):
    """--offload: the text encoders come to the device and go back once a rollout, not once a micro-batch."""
    editor, args = editor_for(toy, "--offload", "--micro_batch", "1", "--out_dir", str(tmp_path))
    moves, to = [], editor.pipe.text_encoder.to
    editor.pipe.text_encoder.to = lambda *a, **k: moves.append(a) or to(*a, **k)
    prompts = load_prompts(args.train_prompts)[:3]
    grpo.rollout(editor, prompts, [1, 2, 3], editor.sigmas(2), set(), args, torch.Generator())
    assert len(moves) == 2 and len(editor.cache) == 3
    moves.clear()  # the evaluation, too: its held-out prompts at once, not once a micro-batch
    grpo.evaluate(editor, load_prompts(args.test_prompts)[:3], lambda ps, ims: torch.zeros(len(ps)), editor.sigmas(2),
                  Dist(), args, 0)
    assert len(moves) == 2


def test_condition_cache_keyed_by_content_bounded_in_compute_dtype(toy, tmp_path):
    rows = [json.loads(line) for line in open(os.path.join(toy, "rl_train.jsonl"))]
    for name, row in (("a", rows[0]), ("b", rows[1])):  # two files without ids
        row = {k: os.path.join(toy, v) if k == "source" else v for k, v in row.items() if k != "id"}
        (tmp_path / f"{name}.jsonl").write_text(json.dumps(row) + "\n")
    pa, pb = load_prompts(str(tmp_path / "a.jsonl"))[0], load_prompts(str(tmp_path / "b.jsonl"))[0]
    pb = dataclasses.replace(pb, id=pa.id)  # one id, two contents: the cache must tell them apart
    editor, _ = editor_for(toy, "--dtype", "bf16", "--prompts_per_step", "1", "--eval_prompts", "2")
    ca, cb = editor.condition([pa]), editor.condition([pb])
    fresh, _ = editor_for(toy, "--dtype", "bf16")
    cb_fresh = fresh.condition([pb])
    text = lambda c: c["passes"][0]["encoder_hidden_states"]  # noqa: E731
    assert torch.equal(cb["image"], cb_fresh["image"]) and torch.equal(text(cb), text(cb_fresh))
    assert not torch.equal(ca["image"], cb["image"])
    editor.condition(load_prompts(os.path.join(toy, "rl_train.jsonl"))[:6])
    assert len(editor.cache) == 6  # a micro-batch's own prompts always fit
    editor.condition([pa])
    assert len(editor.cache) == 3  # then it shrinks to prompts_per_step + eval_prompts
    assert {v.dtype for e in editor.cache.values() for v in e.values() if torch.is_tensor(v)} == {torch.bfloat16}


def test_bf16_compute_with_fully_trained_fp32_modules(toy):
    editor, args = editor_for(toy, "--dtype", "bf16", "--lora_rank", "0", "--train_modules", "time_text_embed")
    named, _ = grpo.setup_trainable(editor, args)
    assert editor.tr.dtype == torch.float32  # the first parameter's dtype is no guide to the compute dtype
    cond = editor.condition(load_prompts(os.path.join(toy, "rl_train.jsonl"))[:2])
    v = editor.velocity(grpo.initial_noise(editor, [1, 2], CPU), 0.5, cond)
    v.square().mean().backward()
    assert v.dtype == torch.float32 and torch.isfinite(v).all()
    assert all(q.grad is not None and torch.isfinite(q.grad).all() for _, q in named)


def test_decode_runs_the_vae_in_micro_batches(toy):
    from diffusers import AutoencoderKL, FluxKontextPipeline

    tiny = grpo.tiny_kontext(max_length=48)
    vae = AutoencoderKL(down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                        block_out_channels=(8, 16), layers_per_block=1, latent_channels=4, norm_num_groups=8,
                        shift_factor=0.0).eval()
    pipe = FluxKontextPipeline(scheduler=tiny.scheduler, vae=vae, text_encoder=tiny.text_encoder,
                               tokenizer=tiny.tokenizer, text_encoder_2=tiny.text_encoder_2,
                               tokenizer_2=tiny.tokenizer_2, transformer=tiny.transformer)
    editor = grpo.Editor(pipe, grpo.parse_args(FAST + paths(toy)), CPU)
    sizes, decode = [], vae.decode
    vae.decode = lambda z, **kw: (sizes.append(len(z)), decode(z, **kw))[1]
    ims = editor.decode(torch.randn(5, (editor.side // 2) ** 2, 4 * editor.C))
    assert len(ims) == 5 and ims[0].size == (16, 16) and sizes == [2, 2, 1]


def test_default_lora_targets_are_flow_grpos(toy):
    for name, frozen in (("tiny", {"norm1.linear", "norm1_context.linear", "norm.linear", "proj_out"}),
                         ("tiny-qwen", {"img_mod.1", "txt_mod.1"})):
        editor, args = editor_for(toy, "--editor", name, "--guidance", "1")
        blocks = [editor.tr.transformer_blocks[0]] + list(getattr(editor.tr, "single_transformer_blocks", [])[:1])
        linears = [{n for n, m in b.named_modules() if isinstance(m, torch.nn.Linear)} for b in blocks]
        grpo.setup_trainable(editor, args)
        adapted = [{n.rsplit(".lora_A", 1)[0] for n, _ in b.named_parameters() if ".lora_A." in n} for b in blocks]
        assert all(a == lin - frozen for a, lin in zip(adapted, linears))
        if name == "tiny":  # 12 of a double block's 14 linears, 4 of a single block's 6
            assert [len(a) for a in adapted] == [12, 4]


# ---------------------------------------------------------------------------- whole runs


def run(args, out, torchrun=False, check=True, **kw):
    cmd = ([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"] if torchrun
           else [sys.executable]) + [os.path.join(ROOT, "grpo.py")] + args + ["--out_dir", out]
    return subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, check=check, **kw)


def trained(out):
    from safetensors.torch import load_file

    return load_file(os.path.join(out, "ckpt", "trainable.safetensors"))


def history(out):
    with open(os.path.join(out, "history.json")) as f:
        return json.load(f)


def restored(out, args):
    """The editor as the run left it: warmed-up weights, then the checkpoint's trained tensors."""
    from safetensors.torch import load_file

    editor = grpo.load_editor(args, CPU)
    editor.tr.load_state_dict(load_file(os.path.join(out, "sft", "transformer.safetensors")))
    named, _ = grpo.setup_trainable(editor, args)
    grpo.load_checkpoint(os.path.join(out, "ckpt"), named, args)
    return editor


@pytest.mark.parametrize("algo,editor", [("grpo", "tiny"), ("nft", "tiny"), ("nft", "tiny-qwen")])
def test_torchrun_two_ranks_end_with_the_saved_weights(toy, tmp_path, algo, editor):
    out, flags = str(tmp_path / "ddp"), on(algo) + paths(toy) + ["--steps", "2", "--sft_steps", "2", "--group_size",
                                                                "3", "--editor", editor]
    res = run(flags, out, torchrun=True, check=False)
    assert res.returncode == 0 and "step 2/2" in res.stdout, res.stdout[-3000:] + res.stderr[-3000:]
    # the last eval ran half its prompts on each rank: the saved weights reproduce it, so both ranks held them
    args = grpo.parse_args(flags + ["--out_dir", str(tmp_path)])
    editor = restored(out, args)
    test = load_prompts(args.test_prompts)[: args.eval_prompts]
    ev = grpo.evaluate(editor, test, grpo.make_reward("oracle", CPU), editor.sigmas(2), Dist(device=CPU), args, 2)
    assert abs(ev["reward"] - history(out)["eval"][-1]["reward"]) < 1e-6


def test_fsdp_uneven_eval_and_kl_of_fully_trained_modules(toy, tmp_path):
    """2 ranks, 3 held-out prompts one at a time: rank 1 has one prompt fewer, yet every forward is a collective
    under FSDP. The KL to the starting weights of fully trained modules is the same with FSDP as without it."""
    # the toy's modules: the swap to the reference must not touch weights a pending backward still needs
    modules = "context_embedder,time_text_embed.text_embedder"
    flags = FAST + paths(toy) + ["--steps", "2", "--lora_rank", "0", "--train_modules", modules,
                                 "--beta", "0.1", "--eval_prompts", "3", "--micro_batch", "1"]
    a, b = str(tmp_path / "fsdp"), str(tmp_path / "plain")
    res = run(flags + ["--fsdp"], a, torchrun=True, check=False, timeout=300)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    res = run(flags, b, torchrun=True, check=False, timeout=300)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    ha, hb = history(a), history(b)
    assert ha["train"][0]["kl"] == 0 and ha["train"][1]["kl"] > 0  # step 1 is the reference itself
    assert [t["kl"] for t in ha["train"]] == pytest.approx([t["kl"] for t in hb["train"]], rel=1e-3)
    assert len(ha["eval"]) == 2 and ha["eval"][-1]["reward"] == pytest.approx(hb["eval"][-1]["reward"], abs=1e-6)


@pytest.mark.parametrize("algo", ["grpo", "nft"])
def test_fsdp_two_ranks_resume_restores_the_sharded_optimizer(toy, tmp_path, algo):
    """--fsdp shards the transformer and its optimizer state (and NFT's old policy) over the ranks; a checkpoint
    gathers the whole state and --resume shards it again, so 2 steps + resume to 4 equal 4 straight steps (without
    the optimizer state the weights differ by ~0.03)."""
    args = on(algo) + paths(toy) + ["--sft_steps", "2", "--fsdp", "--eval_every", "1"]
    a, b = str(tmp_path / "straight"), str(tmp_path / "resumed")
    for extra, out in ((["--steps", "4"], a), (["--steps", "2"], b), (["--steps", "4", "--resume"], b)):
        res = run(args + extra, out, torchrun=True, check=False)
        assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert "from step 2" in res.stdout
    wa, wb = trained(a), trained(b)
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


def an_old_run(tmp_path):
    """A prompt file and the out_dir/ckpt/state.json of a run with FAST's flags -> that run's path flags."""
    Image.new("RGB", (16, 16)).save(tmp_path / "s.png")
    (tmp_path / "p.jsonl").write_text(json.dumps({"id": "a", "instruction": "make the red circle blue", "source":
                                                  "s.png"}))
    paths = ["--train_prompts", str(tmp_path / "p.jsonl"), "--test_prompts", str(tmp_path / "p.jsonl"), "--out_dir",
             str(tmp_path / "o")]
    (tmp_path / "o" / "ckpt").mkdir(parents=True)
    (tmp_path / "o" / "ckpt" / "state.json").write_text(json.dumps({"args": vars(grpo.parse_args(FAST + paths))}))
    return paths


def test_resume_refuses_other_flags_than_the_runs_own_but_not_more_steps(tmp_path, monkeypatch):
    """A changed --lr would be lost (the optimizer state brings the old one back), a changed --train_modules drops
    trained weights: --resume goes on with the flags a run began with; how long, how often to evaluate and memory
    knobs may change. Said before the editor loads (minutes at 12B)."""
    paths = an_old_run(tmp_path)
    monkeypatch.setattr(grpo, "load_editor", lambda *a: pytest.fail("the editor loads"))
    with pytest.raises(pytest.fail.Exception, match="the editor loads"):
        grpo.main(grpo.parse_args(FAST + paths + ["--steps", "9", "--micro_batch", "1", "--resume",
                                                  "--grad_checkpointing"]))
    for flag, value in (("--lr", "0.5"), ("--train_modules", "context_embedder")):
        with pytest.raises(SystemExit, match=f"other flags .{flag} .*->{value}"):
            grpo.main(grpo.parse_args(FAST + paths + ["--resume", flag, value]))


def test_a_reward_that_is_neither_the_oracle_nor_a_model_is_a_flag_error(capsys):
    with pytest.raises(SystemExit):
        grpo.parse_args(FAST + ["--reward", "orcale"])
    assert "--reward 'orcale': use 'oracle', 'rm:PATH' or 'rm:PATH@dim'" in capsys.readouterr().err


def test_a_reward_model_path_that_holds_none_is_a_flag_error_naming_it(tmp_path, capsys):
    """A typo in --reward rm:PATH is said by parse_args, not after the editor has loaded. A folder with this script's
    args.json, the tiny model and a published layout (EditScore's adapter_config.json) pass, with or without @dim."""
    (tmp_path / "rm").mkdir()
    (tmp_path / "rm" / "args.json").write_text("{}")
    (tmp_path / "es").mkdir()
    (tmp_path / "es" / "adapter_config.json").write_text("{}")
    for ok in (f"rm:{tmp_path}/rm", f"rm:{tmp_path}/rm@visual_quality", "rm:tiny@overall", f"rm:{tmp_path}/es"):
        assert grpo.parse_args(FAST + ["--reward", ok]).reward == ok
    for bad in (f"rm:{tmp_path}/rn", f"rm:{tmp_path}", "rm:nobody/no-such-model@overall"):  # offline: not in the cache
        with pytest.raises(SystemExit):
            grpo.parse_args(FAST + ["--reward", bad])
        path = bad[3:].partition("@")[0]
        assert f"--reward {bad!r}: {path} holds no reward model" in capsys.readouterr().err


def test_a_bad_reward_prompts_file_is_a_flag_error_naming_it(tmp_path, capsys):
    """Said by parse_args, before minutes of loading the editor (and then the reward model)."""
    good, bad = tmp_path / "good.json", tmp_path / "bad.json"
    good.write_text(json.dumps({"instruction_following": "Rate: {instruction}"}))
    bad.write_text("{not json")
    assert grpo.parse_args(FAST + ["--reward", "rm:tiny", "--reward_prompts", str(good)]).reward_prompts == str(good)
    with pytest.raises(SystemExit):
        grpo.parse_args(FAST + ["--reward", "rm:tiny", "--reward_prompts", str(bad)])
    assert f"{bad}: not a readable JSON --prompt_file" in capsys.readouterr().err


def test_a_new_run_into_an_old_runs_folder_says_so_before_anything_loads(tmp_path, monkeypatch, capsys):
    paths = an_old_run(tmp_path)
    monkeypatch.setattr(grpo, "load_editor", lambda *a: pytest.fail("stop here"))
    for resume, warned in (([], True), (["--resume"], False)):
        with pytest.raises(pytest.fail.Exception):
            grpo.main(grpo.parse_args(FAST + resume + paths))
        assert ("without --resume this run writes over it" in capsys.readouterr().out) == warned


def test_the_toy_oracle_on_prompts_outside_the_toy_world_stops_before_the_editor_loads(tmp_path, monkeypatch):
    Image.new("RGB", (16, 16)).save(tmp_path / "s.png")
    row = {"id": "a", "instruction": "make the sky a sunset", "source": "s.png"}
    (tmp_path / "p.jsonl").write_text(json.dumps(row))
    monkeypatch.setattr(grpo, "load_editor", lambda *a: pytest.fail("the editor loaded"))
    with pytest.raises(SystemExit, match=r"p.jsonl:1: not a toy-world edit.*'make the sky a sunset'"):
        grpo.main(grpo.parse_args(FAST + ["--train_prompts", str(tmp_path / "p.jsonl"), "--test_prompts",
                                          str(tmp_path / "p.jsonl"), "--out_dir", str(tmp_path / "o")]))


@pytest.fixture(scope="module", params=["grpo", "nft"])
def straight(toy, tmp_path_factory, request):
    """4 steps, a checkpoint after each, under each --algo -> (out_dir, flags)."""
    out = str(tmp_path_factory.mktemp("straight"))
    args = on(request.param) + paths(toy) + ["--steps", "4", "--eval_every", "1", "--sft_steps", "2"]
    run(args, out)
    return out, args


def test_kill_and_resume_reproduces_the_uninterrupted_run(toy, straight, tmp_path):
    """Under nft the old policy lags theta (decay 0.001 x step): unless the checkpoint restores it, the weights
    differ."""
    (straight, args), out = straight, str(tmp_path / "killed")
    cmd = [sys.executable, os.path.join(ROOT, "grpo.py")] + args + ["--out_dir", out]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    state = os.path.join(out, "ckpt", "state.json")
    deadline = time.time() + 60
    while time.time() < deadline and proc.poll() is None:  # kill once the step-2 checkpoint is there
        if os.path.exists(state) and json.load(open(state))["step"] >= 2:
            proc.kill()
            break
        time.sleep(0.02)
    proc.wait()
    assert len(history(out)["eval"]) >= 2  # history.json follows the run's evals, not only its end (steps 0, 1, ...)
    run(args + ["--resume"], out)
    a, b = trained(straight), trained(out)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert [t["reward"] for t in history(straight)["train"]] == [t["reward"] for t in history(out)["train"]]
    assert os.path.exists(os.path.join(out, "ckpt", "old_policy.safetensors")) == ("nft" in args)


def test_saved_lora_loads_back_into_the_pipeline_at_full_strength(toy, straight):
    """alpha 16 != rank 8: without the adapter's metadata load_lora_weights would take alpha = r, half the edit."""
    from safetensors.torch import load_file

    straight, args = straight[0], grpo.parse_args(straight[1])
    prompts = load_prompts(args.train_prompts)[:2]
    base = grpo.load_editor(args, CPU)
    base.tr.load_state_dict(load_file(os.path.join(straight, "sft", "transformer.safetensors")))
    x = grpo.initial_noise(base, [1, 2], CPU)
    with torch.no_grad():
        v0 = base.velocity(x, 0.6, base.condition(prompts))
        trained_v = restored(straight, args)
        v1 = trained_v.velocity(x, 0.6, trained_v.condition(prompts))
        base.pipe.load_lora_weights(os.path.join(straight, "ckpt"))
        v2 = base.velocity(x, 0.6, base.condition(prompts))
    ratio = float((v2 - v0).norm() / (v1 - v0).norm())
    assert (v1 - v0).norm() > 0 and abs(ratio - 1) < 1e-4, ratio
