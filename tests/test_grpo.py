"""grpo.py: the sampler, advantages and loss against hand-computed values; torchrun on CPU; exact resume;
the saved LoRA in diffusers' format. Everything runs on the tiny editor, offline, in about a minute."""
import json
import math
import os
import subprocess
import sys
import time

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import grpo  # noqa: E402
from data import make_toy  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": ROOT}
# a tiny, fast run: 16 px images, 4 sampling steps, 2 prompts x 2 samples per step
FAST = ["--editor", "tiny", "--resolution", "16", "--tiny_width", "32", "--max_sequence_length", "48",
        "--num_steps", "4", "--eval_num_steps", "2", "--prompts_per_step", "2", "--group_size", "2",
        "--micro_batch", "2", "--eval_prompts", "2", "--eval_every", "0", "--lr", "1e-2", "--noise_level", "0.9"]


# ---------------------------------------------------------------------------- the sampler


def test_sde_step_without_noise_is_the_schedulers_euler_step():
    from diffusers import FlowMatchEulerDiscreteScheduler

    sched = FlowMatchEulerDiscreteScheduler(shift=3.0)
    sched.set_timesteps(num_inference_steps=6)
    x, v = torch.randn(3, 5, 4), torch.randn(3, 5, 4)
    for i in (0, 2, 5):  # includes sigma = 1 and the last step to sigma = 0
        sched._step_index = i
        euler = sched.step(v, sched.timesteps[i], x, return_dict=False)[0]
        for kind in ("sde", "cps"):
            prev, log_prob, mean, std = grpo.sde_step(x, v, sched.sigmas[i], sched.sigmas[i + 1], 0.0, kind=kind)
            torch.testing.assert_close(prev, euler, atol=1e-6, rtol=0)
            assert torch.equal(std, torch.zeros(3)) and torch.equal(log_prob, torch.zeros(3))


def test_sde_log_prob_is_the_normal_density_averaged_over_elements():
    torch.manual_seed(0)
    x, v, prev = torch.randn(2, 3, 4), torch.randn(2, 3, 4), torch.randn(2, 3, 4)
    s, s_next, a = torch.tensor([0.8, 0.5]), torch.tensor([0.6, 0.3]), 0.7
    _, log_prob, mean, std = grpo.sde_step(x, v, s, s_next, a, prev_sample=prev)
    col = lambda t: t.view(2, 1, 1)  # noqa: E731
    dt = col(s_next - s)
    std_s = a * torch.sqrt(col(s) / (1 - col(s)))
    want_mean = x * (1 + std_s**2 / (2 * col(s)) * dt) + v * (1 + std_s**2 * (1 - col(s)) / (2 * col(s))) * dt
    want_std = std_s * torch.sqrt(-dt)
    torch.testing.assert_close(mean, want_mean)
    torch.testing.assert_close(std, want_std.flatten())
    want = torch.distributions.Normal(want_mean, want_std).log_prob(prev).mean(dim=(1, 2))
    torch.testing.assert_close(log_prob, want)
    # sigma = 1: the root takes sigma_next instead (finite std)
    _, _, _, std1 = grpo.sde_step(x, v, 1.0, 0.75, a)
    torch.testing.assert_close(std1, torch.full((2,), a * math.sqrt(0.75 / 0.25) * math.sqrt(0.25)))


def test_cps_log_prob_and_sampling_are_consistent():
    torch.manual_seed(1)
    x, v = torch.randn(2, 6), torch.randn(2, 6)
    s, s_next, a = 0.7, 0.4, 0.5
    prev, log_prob, mean, std = grpo.sde_step(x, v, s, s_next, a, generator=torch.Generator().manual_seed(0), kind="cps")
    want_std = s_next * math.sin(a * math.pi / 2)
    want_mean = (x - s * v) * (1 - s_next) + (x + (1 - s) * v) * math.sqrt(s_next**2 - want_std**2)
    torch.testing.assert_close(mean, want_mean)
    torch.testing.assert_close(std, torch.full((2,), want_std))
    torch.testing.assert_close(log_prob, torch.distributions.Normal(want_mean, want_std).log_prob(prev).mean(1))
    noise = torch.randn(2, 6, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(prev, want_mean + want_std * noise)
    _, rescored, _, _ = grpo.sde_step(x, v, s, s_next, a, prev_sample=prev, kind="cps")
    assert torch.equal(rescored, log_prob)


# ---------------------------------------------------------------------------- advantages and loss


def test_group_advantages_by_hand():
    r = torch.tensor([1.0, 2.0, 3.0, 5.0, 5.0, 0.0, 10.0])
    g = torch.tensor([7, 7, 7, 2, 2, 9, 9])
    adv = grpo.group_advantages(r, g, eps=1e-4, clip=5.0)
    sd = math.sqrt(2 / 3)  # population std of 1, 2, 3
    want = [-1 / (sd + 1e-4), 0.0, 1 / (sd + 1e-4), 0.0, 0.0, -5 / (5 + 1e-4), 5 / (5 + 1e-4)]
    torch.testing.assert_close(adv, torch.tensor(want))
    big = grpo.group_advantages(torch.tensor([0.0, 0.0, 0.0, 1.0]), torch.zeros(4), clip=1.5)
    torch.testing.assert_close(big, torch.tensor([-1 / math.sqrt(3), -1 / math.sqrt(3), -1 / math.sqrt(3), 1.5]), atol=1e-3, rtol=0)


def test_group_advantages_leave_unscored_samples_out():
    # group 0: 1, NaN, 3 -> stats over {1, 3} (mean 2, std 1), the NaN gets 0; group 1 is all NaN -> zeros
    nan = float("nan")
    adv = grpo.group_advantages(torch.tensor([1.0, nan, 3.0, nan, nan]), torch.tensor([0, 0, 0, 1, 1]), eps=0.0)
    torch.testing.assert_close(adv, torch.tensor([-1.0, 0.0, 1.0, 0.0, 0.0]))


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
    torch.testing.assert_close(grpo.gaussian_kl(torch.ones(2, 3), torch.zeros(2, 3), torch.tensor([1.0, 2.0])),
                               torch.tensor([0.5, 0.125]))


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


# ---------------------------------------------------------------------------- the tiny editor


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("toy"))
    make_toy(out, seed=0, size=16, n_train=8, n_val=4, n_rl=8, n_rl_test=4, n_editor=16)
    return out


def test_ratio_is_exactly_one_at_the_first_update(toy):
    from data import load_prompts

    args = grpo_args(toy)
    editor = grpo.load_editor(args, torch.device("cpu"))
    prompts = load_prompts(os.path.join(toy, "rl_train.jsonl"))[:3]
    cond = editor.condition(prompts)
    sigmas = editor.sigmas(4)
    x = grpo.initial_noise(editor, [1, 2, 3], torch.device("cpu"))
    with torch.no_grad():
        _, traj = grpo.sample(editor, cond, x, sigmas, {0, 1, 2}, 0.9, "sde", torch.Generator().manual_seed(0))
    for j, x_t, x_next, old in traj:  # the training forward, with gradients, re-scores the same samples
        v = editor.velocity(x_t, sigmas[j], cond)
        _, lp, _, _ = grpo.sde_step(x_t, v, sigmas[j], sigmas[j + 1], 0.9, prev_sample=x_next)
        _, ratio, _ = grpo.grpo_loss(lp, old, torch.ones(3), 1e-4)
        assert torch.equal(ratio, torch.ones(3))


def test_qwen_edit_path_true_cfg_and_small_condition(toy):
    from data import load_prompts

    args = grpo_args(toy, editor="tiny-qwen", true_cfg=4.0)
    editor = grpo.load_editor(args, torch.device("cpu"))
    cond = editor.condition(load_prompts(os.path.join(toy, "rl_train.jsonl"))[:2])
    # the condition is encoded at the output's size, not the pipeline's 1024^2 area
    assert cond["image"].shape == (2, 16, 48) and cond["img_shapes"][0] == [(1, 4, 4), (1, 4, 4)]
    x = grpo.initial_noise(editor, [1, 2], torch.device("cpu"))
    with torch.no_grad():
        v = editor.velocity(x, 0.5, cond)
        args.true_cfg = 1.0
        v1 = editor.velocity(x, 0.5, cond)
    assert v.shape == x.shape and not torch.allclose(v, v1)
    # true CFG keeps the conditional prediction's norm per token
    torch.testing.assert_close(v.norm(dim=-1), v1.norm(dim=-1))


def grpo_args(toy, editor="tiny", true_cfg=1.0):
    import argparse

    return argparse.Namespace(editor=editor, seed=0, tiny_patch=2, tiny_width=32, max_sequence_length=48, resolution=16,
                              cond_pixels=0, offload=False, true_cfg=true_cfg, guidance=2.5, negative_prompt=" ", dtype="fp32")


def run(args, out, torchrun=False, check=True, **kw):
    cmd = ([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"] if torchrun
           else [sys.executable]) + [os.path.join(ROOT, "grpo.py")] + args + ["--out_dir", out]
    return subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, check=check, **kw)


def trained(out):
    from safetensors.torch import load_file

    return load_file(os.path.join(out, "ckpt", "trainable.safetensors"))


def test_torchrun_two_ranks(toy, tmp_path):
    out = str(tmp_path / "ddp")
    res = run(FAST + ["--data_dir", toy, "--steps", "2", "--sft_steps", "2", "--group_size", "3"], out, torchrun=True,
              check=False)
    assert res.returncode == 0 and "step 2/2" in res.stdout, res.stdout[-3000:] + res.stderr[-3000:]
    with open(os.path.join(out, "ckpt", "state.json")) as f:
        state = json.load(f)
    # the weights every rank held at the checkpoint (gathered by the script) are identical
    sums = state["rank_checksums"]
    assert len(sums) == 2 and sums[0] == sums[1]
    # the 2 x 3 samples of a step, split 3 + 3 over the ranks, all start from different noise
    assert all(rec["distinct_noise"] == 6 for rec in state["history"]["train"])


def test_fsdp_two_ranks_resume_restores_the_sharded_optimizer(toy, tmp_path):
    """--fsdp shards the transformer and its optimizer state over the ranks; a checkpoint gathers the whole state
    and --resume shards it again, so 2 steps + resume to 4 equal 4 straight steps (without the optimizer state
    the weights differ by ~0.03)."""
    args = FAST + ["--data_dir", toy, "--sft_steps", "2", "--fsdp", "--ckpt_every", "1"]
    a, b = str(tmp_path / "straight"), str(tmp_path / "resumed")
    for extra, out in ((["--steps", "4"], a), (["--steps", "2"], b), (["--steps", "4", "--resume"], b)):
        res = run(args + extra, out, torchrun=True, check=False)
        assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert "resumed from" in res.stdout
    wa, wb = trained(a), trained(b)
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


@pytest.fixture(scope="module")
def straight(toy, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("straight"))
    run(FAST + ["--data_dir", toy, "--steps", "4", "--ckpt_every", "1", "--sft_steps", "2"], out)
    return out


def test_kill_and_resume_reproduces_the_uninterrupted_run(toy, straight, tmp_path):
    out = str(tmp_path / "killed")
    args = FAST + ["--data_dir", toy, "--steps", "4", "--ckpt_every", "1", "--sft_steps", "2"]
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
    run(args + ["--resume"], out)
    a, b = trained(straight), trained(out)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    with open(os.path.join(straight, "history.json")) as f, open(os.path.join(out, "history.json")) as g:
        assert [t["reward"] for t in json.load(f)["train"]] == [t["reward"] for t in json.load(g)["train"]]


def test_saved_lora_loads_into_the_diffusers_pipeline_and_changes_it(straight):
    def edit(pipe):
        return pipe(prompt="make the red circle blue", height=16, width=16, num_inference_steps=2, output_type="latent",
                    generator=torch.Generator().manual_seed(0)).images

    pipe = grpo.tiny_kontext(seed=0, patch=2, width=32, max_length=48)
    before = edit(pipe)
    pipe.load_lora_weights(os.path.join(straight, "ckpt"))
    after = edit(pipe)
    assert before.shape == after.shape and not torch.allclose(before, after)
