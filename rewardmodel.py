"""
rewardmodel.py: vision-language reward models for instruction-guided image editing, and their training.
Both modes share the backbone (any Hugging Face Qwen-VL, or a tiny random one), LoRA, DDP and checkpoints.

--mode gaussian (EditReward, arXiv 2509.26346: its uncertainty-aware ranking loss and tie disentanglement): one
prompt holds the instruction, the source image(s) and the edited image, and ends in a learned reward token. An
MLP head on that token gives a Gaussian (mu, sigma) per dimension; their mean is the "overall" Gaussian. The loss
is the probit likelihood P(w > l) = Phi((mu_w - mu_l) / sqrt(sigma_w^2 + sigma_l^2)) in closed form, per
dimension and overall (--loss mc: EditReward's Monte-Carlo estimate of E[-log sigmoid(z)]; --loss bt:
Bradley-Terry). data.py disentangles tied pairs. --per_dim_prompts is EditReward's one-prompt-per-dimension layout.

--mode verifier (Edit-R1, Guo et al., "Leveraging Verifier-Based Reinforcement Learning in Image Editing": the
reasoning reward model, its SFT cold start and GCPO): the VLM names the principles an edit must satisfy, checks
each, and ends in a JSON object of 0..10 scores. --stage gcpo samples N traces per image of a human pair, rewards
each by how often its score lies on the right side of the other group's, normalises advantages per group, and
applies a PPO-clipped token loss with a KL to the SFT model. --rubric editscore (EditScore, arXiv 2509.23909:
its two-prompt rubric and Avg@K self-ensemble) scores zero-shot; the K passes share ONE prefill. An answer that
does not parse is counted as unparsed, never replaced by a guess.
Simplified: one prompt template per mode; the verifier samples one prompt at a time (its K passes are the batch),
trains LoRA only (+ optionally the vision tower), and packs no sequences.

  python data.py --toy --out data/toy                  # the toy editing world (--toy writes it when missing)
  python rewardmodel.py --toy                          # Gaussian, tiny random Qwen2.5-VL on CPU (minutes)
  python rewardmodel.py --toy --per_dim_prompts        # EditReward's layout: compare the pairs/s of the logs
  torchrun --standalone --nproc_per_node=2 rewardmodel.py --toy          # data-parallel on CPU (gloo)
  python rewardmodel.py --model Qwen/Qwen2.5-VL-7B-Instruct --train data/editreward_train.parquet \\
      --val data/val.jsonl --max_pixels 200704 --out_dir out/rm7b          # one GPU (bf16); torchrun for 8
  python rewardmodel.py --mode verifier --toy          # SFT -> eval -> GCPO -> eval on CPU (~20 min)
  torchrun --standalone --nproc_per_node=2 rewardmodel.py --mode verifier --stage gcpo --init out/verifier_toy/sft
  python rewardmodel.py --mode verifier --stage eval --model Qwen/Qwen2.5-VL-7B-Instruct --rubric editscore \\
      --max_new_tokens 512 --val <pairs>                                  # zero-shot EditScore rubric, one GPU

From other scripts:
  rm = RewardModel.from_pretrained("out/rm")    # a checkpoint of either mode, or "tiny" (random Gaussian model)
  rm = RewardModel.from_pretrained("Qwen/Qwen2.5-VL-7B-Instruct", mode="verifier", rubric="editscore")
  out = rm.score(sources, instructions, edited, num_samples=4)   # num_samples: Avg@K, verifier mode only
  # gaussian: {"overall", dim..., "sigma_<dim>", "sigma_overall"}; verifier: {"overall", principle..., "unparsed"}
"""
import argparse
import functools
import json
import math
import os
import re
import time
from contextlib import nullcontext

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from data import (BG_COLORS, CELLS, DIMS, EDIT_KINDS, SHAPE_COLORS, SHAPES, atomic_dir, leave_distributed, load_image,
                  load_pairs, load_traces, make_toy, print0, setup_distributed)

MODES = ("gaussian", "verifier")

# ----------------------------------------------------------------------------------------------------------
# flags

parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
# --- model
parser.add_argument("--mode", default="gaussian", choices=MODES,
                    help="gaussian: MLP head on a reward token | verifier: CoT judge")
parser.add_argument("--model", default="tiny",
                    help="hub name, local folder, or 'tiny' / 'tiny-qwen3-vl' (random tiny models)")
parser.add_argument("--dims", default=",".join(DIMS), help="comma-separated reward dimensions (names as in the data);\n"
                    "verifier: the principles its answers score ('' = those of the SFT traces)")
parser.add_argument("--min_pixels", type=int, default=56 * 56, help="smallest image area given to the vision tower")
parser.add_argument("--max_pixels", type=int, default=256 * 28 * 28, help="largest image area (256 tokens of 28x28 px)")
parser.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"],
                    help="auto: bf16 on CUDA, fp32 on CPU")
parser.add_argument("--grad_checkpointing", default="auto", choices=["auto", "on", "off"],
                    help="recompute each layer's activations in the backward pass (auto: on CUDA)")
# --- gaussian: head and loss
parser.add_argument("--per_dim_prompts", action="store_true",
                    help="EditReward layout: one prompt + forward per dimension")
parser.add_argument("--head_hidden", type=int, default=1024, help="hidden width of the MLP head")
parser.add_argument("--loss", default="gaussian", choices=["gaussian", "mc", "bt"],
                    help="closed-form probit | EditReward Monte-Carlo | Bradley-Terry")
parser.add_argument("--mc_samples", type=int, default=1000, help="draws per pair for --loss mc")
# --- fine-tuning
parser.add_argument("--finetune", default="lora", choices=["lora", "full"],
                    help="LoRA adapters (peft) or all weights (gaussian only)")
parser.add_argument("--lora_rank", type=int, default=16, help="LoRA rank")
parser.add_argument("--lora_alpha", type=int, default=32, help="LoRA alpha (scale = alpha / rank)")
parser.add_argument("--lora_dropout", type=float, default=0.05, help="dropout on the LoRA input")
parser.add_argument("--lora_targets", default="q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj",
                    help="comma-separated names of the linear layers that get adapters")
parser.add_argument("--vision", default="frozen", choices=["frozen", "lora", "train"],
                    help="vision tower: frozen, LoRA (lora only), trained in full")
# --- verifier: stages, GCPO, scoring
parser.add_argument("--stage", default="sft", choices=["sft", "gcpo", "eval"],
                    help="SFT cold start, GCPO, or evaluate held-out pairs")
parser.add_argument("--rubric", default="verifier", choices=["verifier", "editscore"],
                    help="scoring prompt: the verifier's own, or EditScore's two-prompt rubric (zero-shot)")
parser.add_argument("--init", default=None,
                    help="gcpo: the SFT checkpoint to start from; eval: the checkpoint to evaluate")
parser.add_argument("--num_traces", type=int, default=4, help="N traces sampled per image (2N per pair)")
parser.add_argument("--temperature", type=float, default=1.0, help="GCPO sampling temperature (policy = sampler)")
parser.add_argument("--clip_eps", type=float, default=0.2, help="PPO ratio clip")
parser.add_argument("--ppo_epochs", type=int, default=2, help="optimizer steps per GCPO rollout batch")
parser.add_argument("--kl_beta", type=float, default=0.0, help="KL weight to the SFT model (the adapter disabled)")
parser.add_argument("--eval_samples", type=int, default=4, help="K of Avg@K in --stage eval")
parser.add_argument("--score_temperature", type=float, default=0.7,
                    help="scoring temperature (0 = greedy; EditScore's 0.7)")
parser.add_argument("--max_new_tokens", type=int, default=128, help="longest generated answer")
# --- data
parser.add_argument("--train", default="data/toy/pairs_train.jsonl", help="training pairs (any format data.py reads);\n"
                    "verifier: CoT traces (sft) or pairs (gcpo), default data/toy/cot_train.jsonl / gcpo_train.jsonl")
parser.add_argument("--val", default="data/toy/pairs_val.jsonl", help="held-out pairs for accuracy (--toy: its folder)")
parser.add_argument("--split", default=None, help="split name for hub datasets")
parser.add_argument("--val_max", type=int, default=0,
                    help="at most this many held-out pairs (0 = all; verifier: untied pairs)")
# --- optimisation (batch flags are global totals over ranks and accumulation)
parser.add_argument("--batch_size", type=int, default=32,
                    help="per optimizer step, all ranks together: pairs (gaussian, gcpo)\n"
                    "or traces (sft)")
parser.add_argument("--micro_batch", type=int, default=8,
                    help="pairs (gaussian) or traces (verifier) per forward on one rank;\n"
                    "8 fits a 7B model with two 256-token images on an 80 GB GPU (README)")
parser.add_argument("--max_steps", type=int, default=1000, help="optimizer steps to run")
parser.add_argument("--lr_decay_steps", type=int, default=0, help="length of the cosine schedule (0 = max_steps)")
parser.add_argument("--lr", type=float, default=1e-4, help="peak lr of the backbone (adapters or weights)")
parser.add_argument("--head_lr", type=float, default=1e-3, help="peak lr of the head and the reward-token row")
parser.add_argument("--warmup_steps", type=int, default=50, help="linear warmup steps")
parser.add_argument("--beta2", type=float, default=0.95, help="AdamW beta2")
parser.add_argument("--grad_clip", type=float, default=1.0, help="clip the global grad norm (0 = off)")
# --- run
parser.add_argument("--out_dir", default="out/rm", help="checkpoint folder")
parser.add_argument("--resume", action="store_true", help="continue exactly from out_dir (same flags)")
parser.add_argument("--log_interval", type=int, default=25, help="steps between log lines")
parser.add_argument("--eval_interval", type=int, default=250,
                    help="steps between checkpoints (gaussian: each after a held-out eval)")
parser.add_argument("--seed", type=int, default=0,
                    help="random seed (data order, head and LoRA init, dropout, GCPO sampling)")
parser.add_argument("--device", default="auto", help="cpu | cuda | auto (torchrun: LOCAL_RANK)")
parser.add_argument("--toy", action="store_true", help="toy-world preset of the mode (explicit flags win)")
POSITIVE = ("batch_size", "micro_batch", "max_steps", "log_interval", "eval_interval", "num_traces", "ppo_epochs",
            "eval_samples", "max_new_tokens")

# Presets: the defaults a mode and its --toy recipe put over the parser's (explicit flags still win).
# The toy's tiny random model needs its vision tower trained, and more updates per second than a real one.
TOY = dict(model="tiny", min_pixels=56 * 56, max_pixels=56 * 56, finetune="full", vision="train", lr=1e-3,
           head_lr=1e-3, head_hidden=256, batch_size=16, micro_batch=16, max_steps=1200, eval_interval=300,
           log_interval=100, out_dir="out/rm_toy")
# No LoRA dropout: sampling and training must see one policy for the PPO ratio. Adapters on lm_head too, so that
# the next-token distribution itself can sharpen.
VERIFIER = dict(dims="", train=None, out_dir="out/verifier", lora_dropout=0.0, max_steps=100, warmup_steps=10,
                lora_targets=parser.get_default("lora_targets") + ",lm_head", batch_size=16,
                beta2=0.99, val_max=64, log_interval=10, eval_interval=100)
# The toy verifier sees 112 px images (16 visual tokens each) through full-rank adapters (64 = the tiny width).
VERIFIER_TOY = dict(micro_batch=16, vision="train", min_pixels=112 * 112, max_pixels=112 * 112, lora_rank=64,
                    lora_alpha=128,
                    temperature=0.7, kl_beta=0.04, val_max=0, out_dir="out/verifier_toy")
# run_toy's stages: GCPO keeps the vision tower that SFT trained fixed.
TOY_STAGES = {"sft": dict(max_steps=1500, lr=1e-3), "gcpo": dict(max_steps=120, lr=5e-4, vision="frozen")}
TOY_THREADS = 1  # --toy pins torch's intra-op threads: its figures then do not depend on the machine's cores
RESERVED = ("overall", "unparsed")  # score() keys that cannot be dimension names


def preset(mode, toy):
    """The defaults a mode (and its --toy recipe) puts over the parser's."""
    if mode == "verifier":
        return {**VERIFIER, **(VERIFIER_TOY if toy else {})}
    return TOY if toy else {}


# ----------------------------------------------------------------------------------------------------------
# losses: (B,) tensors in, (B,) per-pair losses out; w = preferred, l = rejected

def pair_scale(log_sigma_a, log_sigma_b):
    """sqrt(sigma_a^2 + sigma_b^2), the std of mu_a - mu_b's Gaussian, without overflow."""
    return torch.exp(torch.logaddexp(2 * log_sigma_a, 2 * log_sigma_b) / 2)


def gaussian_ranking_loss(mu_w, log_sigma_w, mu_l, log_sigma_l):
    """Closed-form probit ranking loss: -log Phi((mu_w - mu_l) / sqrt(sigma_w^2 + sigma_l^2)).
    log_ndtr stays finite (about -x^2/2) where Phi underflows, so a wrong pair with |dmu| = 40 still has a loss
    and a gradient."""
    return -torch.special.log_ndtr((mu_w - mu_l) / pair_scale(log_sigma_w, log_sigma_l))


def mc_ranking_loss(mu_w, log_sigma_w, mu_l, log_sigma_l, num_samples=1000):
    """EditReward / HPSv3 objective E_z[-log sigmoid(z)], z ~ N(mu_w - mu_l, sigma_w^2 + sigma_l^2),
    estimated with num_samples reparameterised draws per pair."""
    scale = pair_scale(log_sigma_w, log_sigma_l)
    eps = torch.randn(*mu_w.shape, num_samples, dtype=mu_w.dtype, device=mu_w.device)  # (B, S)
    z = (mu_w - mu_l).unsqueeze(-1) + scale.unsqueeze(-1) * eps
    return F.softplus(-z).mean(-1)  # softplus(-z) = -log sigmoid(z)


def bt_loss(mu_w, mu_l):
    """Bradley-Terry on the means alone: -log sigmoid(mu_w - mu_l)."""
    return F.softplus(mu_l - mu_w)


def fuse_gaussians(mu, log_sigma, how="mean"):
    """(B, D) per-dimension Gaussians -> (B,) overall Gaussian.
    mean: the mean of D independent Gaussians, N(mean mu, sum sigma^2 / D^2); min: the dimension with lowest mu."""
    if how == "mean":
        return mu.mean(-1), torch.logsumexp(2 * log_sigma, -1) / 2 - math.log(mu.shape[-1])
    idx = mu.argmin(-1, keepdim=True)
    return mu.gather(-1, idx).squeeze(-1), log_sigma.gather(-1, idx).squeeze(-1)


def preference_loss(mu_a, ls_a, mu_b, ls_b, prefs, weights, kind="gaussian", mc_samples=1000):
    """Ranking loss summed over every (pair, dimension) with a strict preference.
    mu_*, ls_*: (B, K) for image a and image b; prefs (B, K) in {+1 a better, -1 b better, 0 skip}; weights (K,).
    Returns (weighted sum, sum of weights) so that micro-batches and ranks average correctly."""
    a_wins = prefs > 0
    mu_w, mu_l = torch.where(a_wins, mu_a, mu_b), torch.where(a_wins, mu_b, mu_a)
    ls_w, ls_l = torch.where(a_wins, ls_a, ls_b), torch.where(a_wins, ls_b, ls_a)
    if kind == "gaussian":
        terms = gaussian_ranking_loss(mu_w, ls_w, mu_l, ls_l)
    elif kind == "mc":
        terms = mc_ranking_loss(mu_w, ls_w, mu_l, ls_l, mc_samples)
    else:
        terms = bt_loss(mu_w, mu_l)
    mask = (prefs != 0).to(terms.dtype) * weights
    return (terms * mask).sum(), mask.sum()


def pairwise_accuracy(score_a, score_b, prefs):
    """Strict pairwise accuracy counts: a pair is right when sign(score_a - score_b) equals its preference
    (an exact score tie is wrong). prefs (B,) in {+1, -1, 0}; 0 (a human tie) is not counted."""
    keep = prefs != 0
    right = torch.sign(score_a - score_b)[keep] == prefs[keep]
    return int(right.sum()), int(keep.sum())


def pool_hidden(hidden, input_ids, attention_mask, token_id=None):
    """(N, T, H) -> (N, H): the hidden state at the last occurrence of token_id (the reward token), or at the
    last attended position when token_id is None. Works under left and right padding alike."""
    hit = attention_mask.bool() if token_id is None else input_ids == token_id  # (N, T)
    if not hit.any(-1).all():
        raise ValueError("a sequence has no position to pool (reward token truncated away?)")
    pos = (hit.long() * torch.arange(1, hit.shape[1] + 1, device=hit.device)).argmax(-1)  # last hit
    return hidden[torch.arange(hidden.shape[0], device=hidden.device), pos]


def lr_factor(step, warmup, decay_steps, min_ratio):
    """Linear warmup to 1, then cosine down to min_ratio at decay_steps, flat after."""
    if step < warmup:
        return (step + 1) / warmup
    t = min(1.0, (step - warmup) / max(1, decay_steps - warmup))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * t))


SCORE_MAX = 10.0       # verifier scores (per principle and final) live in [0, SCORE_MAX]
EDITSCORE_MAX = 25.0   # EditScore rubric answers are integers 0..25, divided by 2.5 to 0..10
TOP_P, TOP_K, SCORE_SEED = 0.9, 20, 42  # EditScore's scoring sampler: nucleus, top-k, pass i seeded SCORE_SEED + i

# short, for the tiny model
VERIFIER_PROMPT = "Instruction: {instruction}\nVerify each principle, then JSON scores 0-10."
EDITSCORE_SC_PROMPT = (
    "You judge image edits. The first image is the original, the second the edited result. "
    "Instruction: {instruction}\nRate from 0 to 25: (1) how completely the edit does what the instruction "
    "asks; (2) how little it over-edits, i.e. changes what it was not asked to change (25 = nothing else "
    "changed). Reason briefly, then answer with JSON: {{\"reasoning\": \"...\", \"score\": [s1, s2]}}")
EDITSCORE_PQ_PROMPT = (
    "You judge the image quality of a generated image. Rate from 0 to 25: (1) how natural it looks "
    "(lighting, shadows, proportions, sense of depth); (2) how free it is of artifacts (distortion, blur, "
    "broken objects, watermarks; 25 = none). Reason briefly, then answer with JSON: "
    "{\"reasoning\": \"...\", \"score\": [s1, s2]}")


def encode_prompt(processor, images, text):
    """One user turn (each image labelled, then the text) through the model's chat template and processor,
    assistant turn left open. -> unpadded model inputs of batch 1 (mm_token_type_ids marks image tokens:
    Qwen2.5-VL's 3D rope needs it)."""
    content = []
    for i, img in enumerate(images):
        content += [{"type": "text", "text": "source:" if i < len(images) - 1 else "edited:"}, {"type": "image"}]
    content.append({"type": "text", "text": "\n" + text})
    chat = processor.apply_chat_template([{"role": "user", "content": content}], tokenize=False,
                                         add_generation_prompt=True)
    enc = processor(text=[chat], images=list(images) or None, return_tensors="pt")
    return {k: v for k, v in enc.items() if k != "attention_mask"}  # no padding in a batch of one


def verifier_prompt(processor, sources, instruction, edited):
    return encode_prompt(processor, list(sources) + [edited], VERIFIER_PROMPT.format(instruction=instruction))


# ----------------------------------------------------------------------------------------------------------
# parsing: a score or None, never a guess

_FENCE = re.compile(r"```[A-Za-z]*")
# last-resort reader for broken JSON: key (quoted or bare) : number, "number", "a/b", or a [list]
_KV = re.compile(r"[\"']?([A-Za-z_][\w ]*?)[\"']?\s*[:=]\s*"
                 r"(\[[^\]\[]*\]|\"[^\"]*\"|'[^']*'|[-+]?[\d.]+(?:\s*/\s*[\d.]+)?)")


def _objects(text):
    """Outermost {...} spans, last first; braces inside double-quoted strings do not count. An object still
    open at the end (a truncated generation) is returned as is, so its complete fields can be read."""
    spans, depth, start, in_str, esc = [], 0, 0, False, False
    for i, ch in enumerate(text):
        if in_str:
            esc, in_str = (False, in_str) if esc else (ch == "\\", ch != '"')
            continue
        if ch == '"' and depth:
            in_str = True
        elif ch == "{":
            start = i if depth == 0 else start
            depth += 1
        elif ch == "}" and depth:
            depth -= 1
            if depth == 0:
                spans.append(text[start:i + 1])
    if depth:
        spans.append(text[start:])
    return spans[::-1]


def _fields(span):
    """A JSON-ish object -> flat {lowercase key: raw value}: json.loads when valid (nested dicts flattened one
    level), else the key: value pairs a regex can still find (single quotes, trailing commas, truncation)."""
    try:
        obj = json.loads(span)
        if isinstance(obj, dict):
            flat = {}
            for k, v in obj.items():
                flat.update({str(k2).lower(): v2 for k2, v2 in v.items()} if isinstance(v, dict) else {})
            return flat | {str(k).lower(): v for k, v in obj.items() if not isinstance(v, dict)}
    except ValueError:
        pass
    return {k.strip().lower(): v for k, v in _KV.findall(span)}


def _number(v, hi):
    """A finite number from an int/float, a numeric string, or a fraction "a/b" (rescaled to 0..hi)."""
    if isinstance(v, bool):
        return None
    if isinstance(v, str):
        m = re.fullmatch(r"\s*[\"']?\s*([-+]?\d+(?:\.\d+)?|[-+]?\.\d+)\s*(?:/\s*(\d+(?:\.\d+)?))?\s*[\"']?\s*", v)
        if not m or (m[2] is not None and float(m[2]) == 0):
            return None
        v = float(m[1]) / float(m[2]) * hi if m[2] else float(m[1])
    return float(v) if isinstance(v, (int, float)) and math.isfinite(v) else None


def parse_verifier_output(text, hi=SCORE_MAX):
    """Verifier text -> {"score": s, "principles": {name: x}} with every number in [0, hi], or None.
    Reads the last JSON object that yields a score (fences, text after it, single quotes, trailing commas and
    a truncated tail are tolerated). A non-numeric or out-of-range value is dropped, never clipped: an 85 on a
    0-10 scale is a misunderstanding, not a 10. A missing or invalid "score" falls back to the mean of the
    valid principle scores (the final score is their summary); no valid number at all -> None."""
    if not isinstance(text, str):
        return None
    text = _FENCE.sub("", text)
    for span in _objects(text):
        vals = {k: _number(v, hi) for k, v in _fields(span).items()}
        vals = {k: v for k, v in vals.items() if v is not None and 0.0 <= v <= hi}
        final = vals.pop("score", None)
        if final is None and vals:
            final = sum(vals.values()) / len(vals)
        if final is not None:
            return {"score": final, "principles": vals}
    # no object: accept only an explicit "... score: x" in free text (the last one)
    found = [_number(v, hi) for k, v in _KV.findall(text) if k.lower().split()[-1] == "score"]
    found = [v for v in found if v is not None and 0.0 <= v <= hi]
    return {"score": found[-1], "principles": {}} if found else None


def parse_editscore_output(text, n=2, hi=EDITSCORE_MAX):
    """EditScore rubric answer -> list of n raw scores in [0, hi] (the "score" list of the last JSON object
    that has one), or None. All n must be valid: a pair with one bad entry is not half a score."""
    if not isinstance(text, str):
        return None
    for span in _objects(_FENCE.sub("", text)):
        raw = _fields(span).get("score")
        if isinstance(raw, str):  # the regex reader keeps "[a, b]" as text
            raw = re.findall(r"[^,\[\]\s]+", raw)
        if isinstance(raw, list) and len(raw) == n:
            vals = [_number(v, hi) for v in raw]
            if all(v is not None and 0.0 <= v <= hi for v in vals):
                return vals
    return None


# ----------------------------------------------------------------------------------------------------------
# EditScore aggregation and GCPO math (pure functions)

def editscore_aggregate(sc, pq):
    """EditScore (VIEScore-style) scores averaged over K passes (Avg@K self-ensemble).
    sc: (B, K, 2) raw 0..25 [edit success, over-editing]; pq: (B, K, 2) raw 0..25 [naturalness, artifacts];
    NaN rows = unparsed passes. Per pass: PF = success/2.5, C = over-editing/2.5, PQ = min(nat, art)/2.5,
    overall = sqrt(min(PF, C) * PQ); each is then averaged over its parsed passes (NaN if none).
    -> dict of (B,) tensors + "unparsed" (B,) = passes where either prompt failed."""
    sc, pq = sc / (EDITSCORE_MAX / SCORE_MAX), pq / (EDITSCORE_MAX / SCORE_MAX)
    pf, c, q = sc[..., 0], sc[..., 1], pq.min(-1).values                      # (B, K) each
    overall = (torch.minimum(pf, c) * q).sqrt()                                # NaN where a prompt failed
    return {"prompt_following": pf.nanmean(-1), "consistency": c.nanmean(-1), "perceptual_quality": q.nanmean(-1),
            "overall": overall.nanmean(-1), "unparsed": overall.isnan().sum(-1).float()}


def gcpo_rewards(scores_w, scores_l):
    """GCPO trace rewards (Edit-R1). scores_w: (N,) scores of the traces sampled for the preferred edit,
    scores_l: (M,) for the rejected one; NaN = unparseable trace.
      r_w[j] = mean_k 1[t_w[j] > t_l[k]],   r_l[j] = mean_k 1[t_l[j] < t_w[k]]
    Equal scores count 1/2 (Mann-Whitney): a tie is better than the wrong order, worse than the right one.
    An unparseable trace gets 0, and a parsed trace beats an unparseable opponent (credit 1): producing a
    score beats failing to, and since every parsed trace of a group gets the same credit from a broken
    opponent, that credit cancels in the group normalisation. -> (r_w (N,), r_l (M,)) in [0, 1]."""
    def credit(own, other, sign):  # (N,), (M,) -> (N, M) credit of own[j] against other[k]
        d = sign * (own[:, None] - other[None, :])                             # > 0: the preferred order
        c = (d > 0).float() + 0.5 * (d == 0).float()
        c = torch.where(other.isnan()[None, :], 1.0, c)
        return torch.where(own.isnan()[:, None], 0.0, c)
    return credit(scores_w, scores_l, 1.0).mean(1), credit(scores_l, scores_w, -1.0).mean(1)


def group_advantages(r, eps=1e-4):
    """Advantages normalised within one group (GCPO normalises the winner and the loser group separately):
    A = (r - mean(r)) / (std(r) + eps). r: (N,) -> (N,); a group with equal rewards gets zeros."""
    return (r - r.mean()) / (r.std(unbiased=False) + eps)


KL_CAP = 10.0  # per-token k3 KL cap: k3 grows like exp(ref - logp), so one token the policy nearly ruled out could
#               dominate a whole step's gradient


def k3_kl(ref_logp, logp):
    """Per-token k3 estimate of KL(pi || ref), exp(d) - d - 1 with d = ref - logp, capped at KL_CAP (its
    gradient is zero above the cap, so one unlikely token cannot blow up a step)."""
    d = ref_logp - logp
    return (d.exp() - d - 1).clamp(max=KL_CAP)


def gcpo_loss(logp, old_logp, adv, mask, clip_eps=0.2, ref_logp=None, beta=0.0, num_tokens=None):
    """Token-level PPO-clipped surrogate over all traces (GCPO's policy loss).
    logp, old_logp, ref_logp, mask: (T, R) per response token of T traces; adv: (T,).
      ratio = exp(logp - old_logp);  l = max(-A ratio, -A clip(ratio, 1-eps, 1+eps)) + beta * KL
    KL is the k3 estimator exp(ref - logp) - (ref - logp) - 1 (>= 0, unbiased for KL(pi || ref)) against the
    reference policy, capped at KL_CAP per token. Averaged over tokens, not traces, so long traces are not
    down-weighted; num_tokens is the global token count when the batch is split over micro-batches or ranks."""
    ratio = (logp - old_logp).exp()
    a = adv[:, None]
    per_tok = torch.maximum(-a * ratio, -a * ratio.clamp(1 - clip_eps, 1 + clip_eps))
    if beta:
        per_tok = per_tok + beta * k3_kl(ref_logp, logp)
    return (per_tok * mask).sum() / (mask.sum() if num_tokens is None else num_tokens)


# ----------------------------------------------------------------------------------------------------------
# sampling with one shared prefill, and teacher-forced log-probs

def filter_logits(logits, temperature, top_k=0, top_p=1.0):
    """(B, V) logits -> temperature-scaled logits with -inf outside the top-k / nucleus (top-p) set."""
    logits = logits / temperature
    if 0 < top_k < logits.shape[-1]:
        logits = logits.masked_fill(logits < logits.topk(top_k).values[:, -1:], float("-inf"))
    if top_p < 1.0:
        sorted_l, idx = logits.sort(-1, descending=True)
        cum = sorted_l.softmax(-1).cumsum(-1)
        drop = cum - sorted_l.softmax(-1) > top_p                              # mass before this token > p
        logits = logits.masked_fill(drop.scatter(-1, idx, drop), float("-inf"))
    return logits


def unwrap(model):
    """The HF Qwen2.5-VL model under a peft wrapper (or the model itself)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def answer_logits(model, logits):
    """(..., V) logits with the vision placeholder tokens removed: an answer never contains them (a sampled
    <|image_pad|> would break the next forward), and sampling and training must share one policy."""
    cfg = unwrap(model).config
    banned = [cfg.image_token_id, cfg.video_token_id, cfg.vision_start_token_id, cfg.vision_end_token_id]
    return logits.float().index_fill(-1, torch.tensor(banned, device=logits.device), float("-inf"))


@torch.no_grad()
def sample_shared_prefill(model, enc, seeds, eos_id, max_new_tokens, temperature=1.0, top_k=0, top_p=1.0):
    """K = len(seeds) sampled continuations of ONE prompt: prefill once (batch 1), repeat the KV cache K
    times, decode the K rows as one batch. Row i draws from its own generator seeded seeds[i], so it yields
    exactly the tokens an independent run with that seed would. temperature 0 = greedy.
    enc: encode_prompt output. -> tokens (K, T), old log-probs (K, T) of the sampled tokens under the
    temperature-scaled policy (what GCPO's ratio is taken against), mask (K, T) (1 up to and incl. EOS)."""
    dev = next(model.parameters()).device
    enc = {k: v.to(dev) for k, v in enc.items()}
    k, L = len(seeds), enc["input_ids"].shape[1]
    hf = unwrap(model)
    # Qwen2.5-VL's 3D rope: text positions after the images are shifted by delta; decode positions continue it
    _, delta = hf.model.get_rope_index(enc["input_ids"], enc["mm_token_type_ids"],
                                       image_grid_thw=enc.get("image_grid_thw"))
    out = model(**enc, use_cache=True, logits_to_keep=1)
    cache = out.past_key_values
    cache.batch_repeat_interleave(k)
    logits = answer_logits(model, out.logits[:, -1]).expand(k, -1)
    gens = [torch.Generator(device=dev).manual_seed(int(s)) for s in seeds]
    toks, logps, masks = [], [], []
    alive = torch.ones(k, dtype=torch.bool, device=dev)  # finished rows keep decoding (cheap), masked out
    for t in range(max_new_tokens):
        if temperature > 0:
            probs = filter_logits(logits, temperature, top_k, top_p).softmax(-1)
            nxt = torch.cat([torch.multinomial(probs[i], 1, generator=gens[i]) for i in range(k)])
            lp = (logits / temperature).log_softmax(-1)
        else:
            nxt, lp = logits.argmax(-1), logits.log_softmax(-1)
        toks.append(nxt)
        logps.append(lp.gather(1, nxt[:, None])[:, 0])
        masks.append(alive)
        alive = alive & (nxt != eos_id)
        if not alive.any():
            break
        pos = torch.full((1, k, 1), L + t, device=dev)
        pos = torch.cat([pos, pos.expand(3, k, 1) + delta.view(1, -1, 1)])   # (4, K, 1): text + 3D rope rows
        out = model(input_ids=nxt[:, None], past_key_values=cache, position_ids=pos, use_cache=True)
        cache, logits = out.past_key_values, answer_logits(model, out.logits[:, -1])
    return torch.stack(toks, 1).cpu(), torch.stack(logps, 1).cpu(), torch.stack(masks, 1).float().cpu()


def collate(encs, responses, pad_id):
    """Prompts (encode_prompt outputs) left-padded so all end at column P, responses (lists of ids)
    right-padded after them: the response tokens of every row sit in columns P..P+R-1.
    -> model inputs, responses (B, R), response mask (B, R)."""
    B, P = len(encs), max(e["input_ids"].shape[1] for e in encs)
    R = max(len(r) for r in responses)
    ids = torch.full((B, P + R), pad_id, dtype=torch.long)
    attn, mm = torch.zeros_like(ids), torch.zeros_like(ids, dtype=torch.int)
    resp, rmask = torch.full((B, R), pad_id, dtype=torch.long), torch.zeros(B, R)
    for b, (e, r) in enumerate(zip(encs, responses)):
        lp = e["input_ids"].shape[1]
        ids[b, P - lp:P], mm[b, P - lp:P] = e["input_ids"][0], e["mm_token_type_ids"][0]
        ids[b, P:P + len(r)], resp[b, :len(r)] = torch.tensor(r), torch.tensor(r)
        attn[b, P - lp:P + len(r)], rmask[b, :len(r)] = 1, 1
    inputs = {"input_ids": ids, "attention_mask": attn, "mm_token_type_ids": mm}
    with_img = [e for e in encs if "pixel_values" in e]
    if with_img:
        inputs.update(pixel_values=torch.cat([e["pixel_values"] for e in with_img]),
                      image_grid_thw=torch.cat([e["image_grid_thw"] for e in with_img]))
    return inputs, resp, rmask


def response_logprobs(model, inputs, resp, temperature=1.0):
    """Teacher-forced log-probs of the response tokens (collate layout). -> (B, R)."""
    dev = next(model.parameters()).device
    R = resp.shape[1]
    out = model(**{k: v.to(dev) for k, v in inputs.items()}, logits_to_keep=R + 1)
    logits = answer_logits(model, out.logits[:, :-1]) / temperature             # position t predicts t+1
    return logits.log_softmax(-1).gather(2, resp.to(dev)[..., None])[..., 0]


# ----------------------------------------------------------------------------------------------------------
# backbone: hub / local VLMs and an offline tiny Qwen2.5-VL through the same code path

# The tiny tokenizer gives each of these words (the prompts' and the toy world's) one token, as a real tokenizer does
# for frequent words: byte by byte, the tiny model would spend most of its sequence on letters.
TINY_WORDS = ("Instruction Source Edited Rate the edit instruction following visual quality Verify each principle then "
              "JSON scores score follow keep user assistant make remove add a at move to change background "
              + " ".join([*SHAPE_COLORS, *BG_COLORS, *SHAPES, *CELLS, *EDIT_KINDS]))


SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
                  "<|image_pad|>", "<|video_pad|>"]


TINY_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{% if m['content'] is string %}"
                 "{{ m['content'] }}{% else %}{% for c in m['content'] %}{% if c['type'] == 'image' %}"
                 "<|vision_start|><|image_pad|><|vision_end|>{% else %}{{ c['text'] }}{% endif %}{% endfor %}"
                 "{% endif %}<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def image_only_processor(model_type, image_processor, tokenizer, chat_template=None):
    """The processor of a Qwen-VL family (model_type as in its config) without the video processor, which needs
    torchvision (absent on CPU installs)."""
    import transformers
    from transformers.models.auto.processing_auto import PROCESSOR_MAPPING_NAMES
    base = getattr(transformers, PROCESSOR_MAPPING_NAMES[model_type])

    class ImageOnlyProcessor(base):
        def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
            super().__init__(image_processor, tokenizer, None, chat_template=chat_template)

    return ImageOnlyProcessor(image_processor=image_processor, tokenizer=tokenizer,
                              chat_template=chat_template or tokenizer.chat_template)


def tiny_tokenizer():
    """A byte-level BPE tokenizer trained (by the `tokenizers` library) until each of TINY_WORDS is one token, at
    the start of a text and after a space; any other text still round-trips through the bytes. + Qwen specials."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import Qwen2Tokenizer
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    words = sorted(set(TINY_WORDS.split()))
    bpe.train_from_iterator(words + [" " + w for w in words], trainers.BpeTrainer(
        vocab_size=1 << 16, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    learnt = json.loads(bpe.to_str())["model"]
    vocab = learnt["vocab"] | {s: len(learnt["vocab"]) + i for i, s in enumerate(SPECIAL_TOKENS)}
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in learnt["merges"]]
    tok = Qwen2Tokenizer(vocab=vocab, merges=merges, chat_template=TINY_TEMPLATE, eos_token="<|im_end|>",
                         pad_token="<|endoftext|>", unk_token="<|endoftext|>")
    tok.add_special_tokens({"additional_special_tokens": SPECIAL_TOKENS[1:]})
    return tok


TINY_MODELS = {"tiny": "qwen2_5_vl", "tiny-qwen3-vl": "qwen3_vl"}  # --model names of the tiny random backbones


def build_tiny_vlm(name="tiny", init_std=0.1):
    """A random tiny Qwen2.5-VL ("tiny") or Qwen3-VL ("tiny-qwen3-vl"): hidden 64, 2 layers, vision depth 2, about
    0.25M parameters, and its processor (tiny_tokenizer, a short chat template), built offline. Weights come
    from a fixed seed, so a name means the same model in every process.
    init_std: HF's 0.02 suits 4096-wide models; at width 64 it leaves the final hidden state nearly the same
    for every input."""
    import transformers
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil
    family, tok = TINY_MODELS[name], tiny_tokenizer()
    ids = tok.convert_tokens_to_ids
    # mrope splits the rotary half-dim (16/2 = 8) over (time, height, width)
    text = dict(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, max_position_embeddings=4096, pad_token_id=ids("<|endoftext|>"),
                rope_parameters=dict(rope_type="default", rope_theta=10000.0, mrope_section=[2, 3, 3]),
                initializer_range=init_std)
    vision = dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64,
                  initializer_range=init_std)
    if family == "qwen2_5_vl":  # 14 px patches, windowed attention but in the last block
        cls, patch = transformers.Qwen2_5_VLForConditionalGeneration, 14
        text.update(bos_token_id=None, eos_token_id=ids("<|im_end|>"))
        vision.update(window_size=56, fullatt_block_indexes=[1])
        config = transformers.Qwen2_5_VLConfig
    else:  # 16 px patches, interleaved mrope, deepstack features from vision block 1 into the first text layer
        cls, patch = transformers.Qwen3VLForConditionalGeneration, 16
        text.update(head_dim=16)
        text["rope_parameters"].update(mrope_interleaved=True)
        vision.update(num_position_embeddings=64, deepstack_visual_indexes=[1])
        config = transformers.Qwen3VLConfig
    config = config(text_config=text, vision_config=vision, image_token_id=ids("<|image_pad|>"),
                    video_token_id=ids("<|video_pad|>"), vision_start_token_id=ids("<|vision_start|>"),
                    vision_end_token_id=ids("<|vision_end|>"))
    image_processor = Qwen2VLImageProcessorPil(patch_size=patch, merge_size=2)
    processor = image_only_processor(family, image_processor, tok, TINY_TEMPLATE)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = cls(config)
    model.generation_config.pad_token_id = ids("<|endoftext|>")
    model.generation_config.eos_token_id = ids("<|im_end|>")
    return model, processor


def load_backbone(name, dtype=torch.float32, min_pixels=None, max_pixels=None, weights=None):
    """(model, processor) for a hub name, a local folder or a TINY_MODELS name, with the image area bounded by
    min/max_pixels. `weights`: a save_pretrained folder that replaces the base weights (full fine-tunes).
    Left padding, so that generation (verifier mode) and pooling share one batch layout."""
    from transformers import AutoImageProcessor, AutoModelForImageTextToText, AutoProcessor, AutoTokenizer
    if name in TINY_MODELS:
        model, processor = build_tiny_vlm(name)
        if weights:
            model = AutoModelForImageTextToText.from_pretrained(weights)
    else:
        model = AutoModelForImageTextToText.from_pretrained(weights or name, dtype=dtype)
        processor = AutoProcessor.from_pretrained(name)
        if not hasattr(processor, "image_processor"):  # without torchvision AutoProcessor gives a bare tokenizer
            processor = image_only_processor(model.config.model_type, AutoImageProcessor.from_pretrained(name),
                                             AutoTokenizer.from_pretrained(name))
    if min_pixels or max_pixels:
        size = dict(processor.image_processor.size)
        size.update({k: v for k, v in (("shortest_edge", min_pixels), ("longest_edge", max_pixels)) if v})
        processor.image_processor.size = size
    processor.tokenizer.padding_side = "left"
    return model.to(dtype), processor


def setup_lora(model, rank, alpha, dropout, targets, vision="frozen"):
    """Wrap `model` with peft LoRA adapters on the named linear layers of the language model (and of the
    vision tower when vision == "lora"; vision == "train" trains the tower in full and saves it with the adapter).
    A top-level layer such as lm_head is matched by its bare name."""
    from peft import LoraConfig, get_peft_model
    names = "|".join(t.strip() for t in targets.split(",") if t.strip())
    scope = "" if vision == "lora" else r"(?!.*visual)"  # a regex so the tower's same-named layers are skipped
    config = LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=dropout, target_modules=rf"^{scope}(.*\.)?({names})$",
                        modules_to_save=["visual"] if vision == "train" else None)
    return get_peft_model(model, config)


def all_sum(x):
    """Sum a tensor over ranks, in place (a no-op in one process)."""
    if dist.is_initialized():
        dist.all_reduce(x)
    return x


def resolve_dtype(name, device):
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return getattr(torch, name)


# ----------------------------------------------------------------------------------------------------------
# the reward model

HEAD_DROPOUT = 0.05  # EditReward's head: Linear-ReLU-Dropout(0.05)-Linear
SIGMA_FLOOR = 0.05   # sigma = SIGMA_FLOOR + softplus(raw): a floor, never a hard clamp that stops gradients


class GaussianHead(nn.Module):
    """hidden (N, H) -> mu, log_sigma (N, D), in fp32 whatever the backbone dtype."""

    def __init__(self, hidden_size, num_dims, width):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(hidden_size, width), nn.ReLU(), nn.Dropout(HEAD_DROPOUT),
                                 nn.Linear(width, 2 * num_dims))

    def forward(self, h):
        mu, raw = self.net(h.float()).chunk(2, dim=-1)
        return mu, torch.log(SIGMA_FLOOR + F.softplus(raw))


class RewardModel(nn.Module):
    """A VLM backbone (+ LoRA) that scores (source(s), instruction, edited image), in either mode. Build with
    RewardModel(flags) from a flags dict (the JSON saved beside every checkpoint), or with from_pretrained()."""

    REWARD_TOKEN = "<|reward|>"

    def __init__(self, flags, device="cpu", weights=None):
        super().__init__()
        self.flags, self.mode = dict(flags), flags["mode"]
        if self.mode not in MODES:
            raise ValueError(f"unknown mode {self.mode!r}, expected one of {MODES}")
        device, full, verifier = torch.device(device), flags["finetune"] == "full", self.mode == "verifier"
        if verifier and full:
            raise ValueError("--mode verifier trains LoRA: GCPO's KL reference is the model with its adapter off")
        if verifier and flags["init"]:
            # GCPO: a fresh adapter over the SFT model with the SFT adapter merged in, so that disabling the new
            # adapter gives the SFT policy (the KL reference). The base, pixel bounds and principles come with it.
            parent = RewardModel.from_pretrained(flags["init"], device)
            backbone, self.processor = parent.backbone.merge_and_unload(), parent.processor
            self.flags.update({k: parent.flags[k] for k in ("model", "dtype", "min_pixels", "max_pixels", "dims")},
                              init=os.path.abspath(flags["init"]))
        else:
            backbone, self.processor = load_backbone(
                flags["model"], resolve_dtype(flags["dtype"], device), flags["min_pixels"], flags["max_pixels"],
                os.path.join(weights, "backbone") if weights and full else None)
        self.dims = list(RUBRIC_DIMS) if verifier and flags["rubric"] == "editscore" else \
            [d for d in self.flags["dims"].split(",") if d]
        if set(self.dims) & set(RESERVED) or len(set(self.dims)) != len(self.dims) or any(
                d.startswith("sigma_") for d in self.dims):  # score() names each dimension's sigma "sigma_<dim>"
            raise ValueError(f"--dims must be distinct, not {RESERVED} and not sigma_*: {self.dims}")
        self.reward_id, self.head = None, None
        with torch.random.fork_rng(devices=[]):  # new embedding rows and LoRA init: the same in every process
            torch.manual_seed(flags["seed"])
            if not verifier:
                self._add_reward_token(backbone)
            if full:
                backbone.requires_grad_(True)
                out_emb = backbone.get_output_embeddings()  # unused by the head; DDP rejects trainable unused weights
                if out_emb.weight is not backbone.get_input_embeddings().weight:
                    out_emb.requires_grad_(False)
                if flags["vision"] != "train":
                    backbone.model.visual.requires_grad_(False)
            elif not verifier or weights or flags["stage"] != "eval":  # a zero-shot verifier needs no adapter
                backbone = setup_lora(backbone, flags["lora_rank"], flags["lora_alpha"], flags["lora_dropout"],
                                      flags["lora_targets"], flags["vision"])
        if not verifier:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(flags["seed"])
                self.head = GaussianHead(backbone.config.get_text_config().hidden_size, len(self.dims),
                                         flags["head_hidden"])
        if flags["grad_checkpointing"] == "on" or flags["grad_checkpointing"] == "auto" and device.type == "cuda":
            # transformers checkpoints a layer only in training mode: every training forward runs in train()
            # (non-reentrant: works with frozen inputs and LoRA)
            backbone.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        self.backbone, self.compute_dtype = backbone, resolve_dtype(self.flags["dtype"], device)
        for p in self.parameters():  # AdamW updates below bf16's resolution would round away: trained weights stay
            if p.requires_grad:      # fp32, and the forwards run under autocast (RewardModel.autocast)
                p.data = p.data.float()
        self.to(device)
        if weights:
            self.load_weights(weights)

    def _add_reward_token(self, backbone):
        """The reward token joins the vocabulary; its embedding row is its own parameter (the only trainable row)
        that a forward hook puts in place."""
        tok = self.processor.tokenizer
        tok.add_special_tokens({"additional_special_tokens": [self.REWARD_TOKEN]}, replace_extra_special_tokens=False)
        self.reward_id = tok.convert_tokens_to_ids(self.REWARD_TOKEN)
        if self.reward_id >= backbone.get_input_embeddings().num_embeddings:
            backbone.resize_token_embeddings(len(tok), mean_resizing=False)
        self.reward_row = nn.Parameter(backbone.get_input_embeddings().weight[self.reward_id].detach().float().clone())
        backbone.get_input_embeddings().register_forward_hook(self._insert_reward_row)

    def _insert_reward_row(self, module, inputs, output):
        hit = (inputs[0] == self.reward_id).unsqueeze(-1)
        return torch.where(hit, self.reward_row.to(output.dtype), output)

    def autocast(self):
        return torch.autocast(self.device.type, torch.bfloat16, enabled=self.compute_dtype == torch.bfloat16)

    @property
    def device(self):
        return next(self.parameters()).device

    # --- gaussian: prompts and forward
    def prompts(self, sources, instructions, edited, dim=None):
        """Processor batch for B items: the instruction, source image(s), the edited image and what to rate
        (every dimension, or only `dim`), ending in the reward token; CPU tensors (forward moves them)."""
        what = ", ".join(d.replace("_", " ") for d in ([dim] if dim else self.dims))
        texts, images = [], []
        for src, instr, ed in zip(sources, instructions, edited):
            src = [load_image(s) for s in (src if isinstance(src, (list, tuple)) else [src])] + [load_image(ed)]
            # the instruction comes first so that, in a causal model, the image tokens can already look for it
            content = ([{"type": "text", "text": f"Instruction: {instr}\nSource:"}]
                       + [{"type": "image"}] * (len(src) - 1)
                       + [{"type": "text", "text": " Edited:"}, {"type": "image"},
                          {"type": "text", "text": f"\nRate the edit's {what}."}])
            text = self.processor.apply_chat_template([{"role": "user", "content": content}], tokenize=False,
                                                      add_generation_prompt=True)
            texts.append(text + self.REWARD_TOKEN)
            images += src
        return dict(self.processor(text=texts, images=images, padding=True, return_tensors="pt"))

    def encode(self, sources, instructions, edited, per_dim=False):
        """One batch per prompt: [all dims] by default, [dim 0, dim 1, ...] with per_dim (EditReward layout)."""
        dims = self.dims if per_dim else [None]
        return [self.prompts(sources, instructions, edited, d) for d in dims]

    def forward(self, batches):
        """batches from encode() -> mu, log_sigma (B, D). With one batch per dimension, column d comes from
        batch d (the head still sees one hidden state per forward)."""
        cols = []
        for batch in batches:
            batch = {k: v.to(self.device) for k, v in batch.items()}
            with self.autocast():
                hidden = unwrap(self.backbone).model(**batch).last_hidden_state
            cols.append(self.head(pool_hidden(hidden, batch["input_ids"], batch["attention_mask"], self.reward_id)))
        if len(cols) == 1:
            return cols[0]
        return (torch.stack([c[0][:, d] for d, c in enumerate(cols)], -1),
                torch.stack([c[1][:, d] for d, c in enumerate(cols)], -1))

    # --- verifier: sampled answers
    def answers(self, images, text, num_samples, seed):
        """num_samples sampled answers to one prompt, from one shared prefill; pass i uses seed + i (EditScore)."""
        tok = self.processor.tokenizer
        with self.autocast():
            toks, _, mask = sample_shared_prefill(
                self.backbone, encode_prompt(self.processor, images, text), [seed + i for i in range(num_samples)],
                tok.convert_tokens_to_ids("<|im_end|>"), self.flags["max_new_tokens"], self.flags["score_temperature"],
                TOP_K, TOP_P)
        return [tok.decode(t[m.bool()], skip_special_tokens=True) for t, m in zip(toks, mask)]

    @torch.no_grad()
    def score(self, sources, instructions, edited, num_samples=1, batch_size=8, seed=SCORE_SEED):
        """Scores for B edits -> dict of (B,) float CPU tensors.
        gaussian: "overall", one per dimension (mu), and the sigmas "sigma_<dim>", "sigma_overall"; deterministic
          (eval mode), num_samples and seed unused.
        verifier: "overall" (0..10) and one per principle (or rubric dimension), each the mean over the passes
          that parsed of num_samples sampled ones (Avg@K; NaN when none did), and "unparsed" (passes that did
          not). Pass i samples with seed + i. Items are scored one prompt at a time (its K passes are the batch),
          so batch_size is not used."""
        was_training = self.training
        self.eval()
        if self.mode == "verifier":
            fn = editscore_score if self.flags["rubric"] == "editscore" else verifier_score
            out = fn(self, sources, instructions, edited, num_samples, SCORE_SEED if seed is None else seed)
        else:
            cols = []
            for i in range(0, len(edited), batch_size):
                sl = slice(i, i + batch_size)
                mu, ls = self(self.encode(sources[sl], instructions[sl], edited[sl], self.flags["per_dim_prompts"]))
                mu_o, ls_o = fuse_gaussians(mu, ls)
                cols.append(torch.cat([mu, mu_o[:, None], ls.exp(), ls_o.exp()[:, None]], -1).float().cpu())
            table = torch.cat(cols) if cols else torch.zeros(0, 2 * len(self.dims) + 2)
            names = self.dims + ["overall"] + [f"sigma_{d}" for d in self.dims + ["overall"]]
            out = {n: table[:, j] for j, n in enumerate(names)}
        self.train(was_training)
        return out

    # --- checkpoints: peft adapter or full weights via save_pretrained, head + reward row as safetensors
    def save_weights(self, path):
        self.backbone.save_pretrained(os.path.join(path, "backbone"))
        if self.head is not None:
            extra = {f"head.{k}": v for k, v in self.head.state_dict().items()}
            extra["reward_row"] = self.reward_row.detach()
            save_file({k: v.contiguous().cpu() for k, v in extra.items()}, os.path.join(path, "head.safetensors"))

    def load_weights(self, path):
        """Adapter (LoRA runs), head and reward row from a checkpoint; full backbones load in __init__."""
        if self.flags["finetune"] == "lora":
            from peft import set_peft_model_state_dict
            adapter = load_file(os.path.join(path, "backbone", "adapter_model.safetensors"), device=str(self.device))
            bad = set_peft_model_state_dict(self.backbone, adapter).unexpected_keys
            if bad:
                raise ValueError(f"{path}: adapter weights that fit no module of {self.flags['model']}: {bad[:3]}")
        if self.head is not None:
            extra = load_file(os.path.join(path, "head.safetensors"), device=str(self.device))
            self.head.load_state_dict({k.removeprefix("head."): v for k, v in extra.items() if k.startswith("head.")})
            self.reward_row.data.copy_(extra["reward_row"])

    @classmethod
    def from_pretrained(cls, path, device="cpu", **overrides):
        """The one place that recognises what `path` holds: a checkpoint folder written by this script (either
        mode: its args.json says which); "tiny" (a random, untrained tiny Gaussian model); or, with
        mode="verifier", any base VLM (hub name, folder, "tiny"), which then scores zero-shot, e.g.
        rubric="editscore". overrides replace flags, e.g. max_new_tokens=512."""
        defaults = vars(parser.parse_args([]))
        if os.path.exists(os.path.join(path, "args.json")):
            with open(os.path.join(path, "args.json")) as f:
                flags = json.load(f)
            if overrides.get("mode", flags["mode"]) != flags["mode"]:
                raise ValueError(f"{path} holds a {flags['mode']} reward model, not a {overrides['mode']} one")
            return cls({**defaults, **flags, **overrides}, device, weights=path).eval()
        mode = overrides.get("mode", "gaussian")
        if mode == "gaussian" and path not in TINY_MODELS:
            raise FileNotFoundError(f"{path}: no args.json; a Gaussian reward model needs its trained head")
        flags = {**defaults, **preset(mode, mode == "gaussian"), "model": path, "stage": "eval", **overrides}
        return cls(flags, device).eval()


RUBRIC_DIMS = ("prompt_following", "consistency", "perceptual_quality")  # what the EditScore rubric scores


def as_list(src):
    return list(src) if isinstance(src, (list, tuple)) else [src]


def verifier_score(rm, sources, instructions, edited, num_samples, seed):
    """Avg@K of the verifier's answers -> RewardModel.score's dict; principles outside rm.dims are dropped so
    every call returns the same keys."""
    rows = []
    for src, ins, ed in zip(sources, instructions, edited):
        for a in rm.answers([load_image(s) for s in as_list(src)] + [load_image(ed)],
                            VERIFIER_PROMPT.format(instruction=ins), num_samples, seed):
            r = parse_verifier_output(a) or {"score": math.nan, "principles": {}}
            rows.append([r["score"]] + [r["principles"].get(p, math.nan) for p in rm.dims])
    s = torch.tensor(rows, dtype=torch.float32).reshape(len(edited), num_samples, 1 + len(rm.dims))  # (B, K, 1 + P)
    mean = s.nanmean(1)  # over the passes that gave a number; NaN if none did
    return {"overall": mean[:, 0], **{p: mean[:, 1 + j] for j, p in enumerate(rm.dims)},
            "unparsed": s[..., 0].isnan().sum(1).float()}


def editscore_score(rm, sources, instructions, edited, num_samples, seed):
    """EditScore rubric, Avg@K: two prompts per edited image (the edit with its source(s); the edited image
    alone), K passes each -> editscore_aggregate's dict."""
    sc, pq = [], []
    for src, ins, ed in zip(sources, instructions, edited):
        src, ed = [load_image(s) for s in as_list(src)], load_image(ed)
        for images, text, dest in ((src + [ed], EDITSCORE_SC_PROMPT.format(instruction=ins), sc),
                                   ([ed], EDITSCORE_PQ_PROMPT, pq)):
            dest += [parse_editscore_output(a) or [math.nan] * 2 for a in rm.answers(images, text, num_samples, seed)]
    shape = (len(edited), num_samples, 2)
    return editscore_aggregate(torch.tensor(sc).reshape(shape), torch.tensor(pq).reshape(shape))


def save_checkpoint(out_dir, rm, optimizer, step):
    """Weights (ecosystem formats), flags as JSON and the optimizer state, written atomically (data.atomic_dir):
    a run killed mid-save leaves the previous checkpoint intact."""
    def write(tmp):
        rm.save_weights(tmp)
        with open(os.path.join(tmp, "args.json"), "w") as f:
            json.dump(rm.flags, f, indent=1)
        torch.save({"step": step, "optimizer": optimizer.state_dict()}, os.path.join(tmp, "train_state.pt"))
    atomic_dir(out_dir, write)


def load_checkpoint(out_dir, rm, optimizer):
    """Restore the optimizer state of a model built with weights=out_dir; returns the step to continue from."""
    state = torch.load(os.path.join(out_dir, "train_state.pt"), map_location=rm.device, weights_only=True)
    optimizer.load_state_dict(state["optimizer"])
    return state["step"]


# ----------------------------------------------------------------------------------------------------------
# training, both modes

@functools.lru_cache(maxsize=4)
def epoch_order(n, seed, epoch):
    return np.random.default_rng([seed, epoch]).permutation(n)


def step_indices(step, n, batch_size, rank, world_size, seed):
    """The item indices this rank trains on at `step`: a pure function of the step (seeded permutation per
    epoch), so resuming needs no data-loader state and ranks never overlap."""
    per_rank = batch_size // world_size
    start = step * batch_size + rank * per_rank
    return [int(epoch_order(n, seed, g // n)[g % n]) for g in range(start, start + per_rank)]


def make_optimizer(rm, args):
    """AdamW: the backbone's trainable weights at --lr, the Gaussian head and reward-token row at --head_lr.
    Each group keeps its peak lr for the schedule (set_lr)."""
    is_head = lambda n: n.startswith(("head.", "reward_row"))
    groups = [([p for n, p in rm.named_parameters() if p.requires_grad and is_head(n) == h], lr)
              for h, lr in ((False, args.lr), (True, args.head_lr))]
    return torch.optim.AdamW([{"params": ps, "lr": lr, "peak": lr} for ps, lr in groups if ps],
                             weight_decay=0.0, betas=(0.9, args.beta2), foreach=True)


MIN_LR_RATIO = 0.1  # the cosine schedule ends at this fraction of the peak lr


def set_lr(optimizer, step, args):
    for g in optimizer.param_groups:
        g["lr"] = g["peak"] * lr_factor(step, args.warmup_steps, args.lr_decay_steps or args.max_steps, MIN_LR_RATIO)


def optimizer_step(optimizer, grad_clip, sum_ranks=False):
    """(sum_ranks: add up the gradients of all ranks, whose losses are already divided by the global count;
    the Gaussian mode leaves that to DDP), clip the global grad norm (0 = off), step, zero. -> the norm."""
    params = [p for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
    for p in params if sum_ranks else []:
        all_sum(p.grad)
    norm = torch.nn.utils.clip_grad_norm_(params, grad_clip or math.inf, foreach=True)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return norm.item()


def pair_prefs(pairs, dims):
    """(B, D + 1) preferences of preferred over rejected: each dimension, then overall. Without an "overall"
    label the preferred edit is better overall, unless the pair is tied or a tie-disentangled sample."""
    tied = [p.tie or p.meta.get("disentangled", False) for p in pairs]
    rows = [[p.prefs.get(d, 0) for d in dims] + [p.prefs.get("overall", 0 if t else 1)] for p, t in zip(pairs, tied)]
    return torch.tensor(rows, dtype=torch.long).reshape(len(pairs), len(dims) + 1)


def evaluate(rm, pairs, batch_size, rank=0, world_size=1, num_samples=1):
    """Held-out strict pairwise accuracy per dimension and overall, with RewardModel.score (as bench.py does);
    pairs are split over ranks and the counts summed. The verifier is judged on overall only, and also gets
    "tied": the share of pairs whose scores are equal or unparsed (a model blind to the images ties nearly
    every pair: both images' passes share seeds, so it writes the same answer twice), and "parse": the share
    of passes that parsed. The Gaussian model also gets "sigma_<dim>", its geometric-mean sigma."""
    mine, verifier = pairs[rank::world_size], rm.mode == "verifier"
    scores = rm.score([p.sources for p in mine] * 2, [p.instruction for p in mine] * 2,
                      [p.preferred for p in mine] + [p.rejected for p in mine], num_samples=num_samples,
                      batch_size=batch_size)
    names = ([] if verifier else rm.dims) + ["overall"]
    prefs = pair_prefs(mine, names[:-1])
    a_b = lambda s: s.chunk(2) if mine else (s, s)
    counts = [pairwise_accuracy(*a_b(scores[d]), prefs[:, j]) for j, d in enumerate(names)]
    if not verifier:  # each dimension's geometric-mean sigma over the held-out edits
        counts += [(float(scores[f"sigma_{d}"].log().sum()), len(scores[d])) for d in rm.dims]
        names += [f"sigma_{d}" for d in rm.dims]
    if verifier:
        a, b = a_b(scores["overall"])
        tied = ((a == b) | a.isnan() | b.isnan()) & (prefs[:, -1] != 0)
        passes = 2 * len(mine) * num_samples
        counts += [(int(tied.sum()), counts[-1][1]), (passes - int(scores["unparsed"].sum()), passes)]
        names += ["tied", "parse"]
    counts = all_sum(torch.tensor(counts, dtype=torch.float64))
    out = {d: (c[0] / c[1]).item() if c[1] else float("nan") for d, c in zip(names, counts)}
    return {d: math.exp(v) if d.startswith("sigma_") else v for d, v in out.items()}


def held_out_line(res, sep=" "):
    """evaluate()'s dict as log text: accuracies, then the dimensions' geometric-mean sigmas."""
    sig = {d.removeprefix("sigma_"): v for d, v in res.items() if d.startswith("sigma_")}
    text = sep.join(f"{d} {a:.3f}" for d, a in res.items() if not d.startswith("sigma_"))
    return text + (" | sigma " + " ".join(f"{d} {v:.2f}" for d, v in sig.items()) if sig else "")


# ----------------------------------------------------------------------------------------------------------
# gaussian training

STEP_SEED_STRIDE = 1000  # torch seed of a step: seed + STEP_SEED_STRIDE * step + rank (dropout and MC noise)


def pair_outputs(model, rm, pairs, per_dim):
    """Forward the preferred and rejected edits of B pairs as one batch of 2B -> four (B, D + 1) tensors
    (mu_a, mu_b, ls_a, ls_b), the fused overall as the last column."""
    src, ins = [p.sources for p in pairs], [p.instruction for p in pairs]
    mu, ls = model(rm.encode(src * 2, ins * 2, [p.preferred for p in pairs] + [p.rejected for p in pairs], per_dim))
    mu_o, ls_o = fuse_gaussians(mu, ls)
    mu, ls = torch.cat([mu, mu_o[:, None]], -1), torch.cat([ls, ls_o[:, None]], -1)
    return (*mu.chunk(2), *ls.chunk(2))


def train_step(model, rm, optimizer, micro_batches, args):
    """One optimizer step over this rank's micro-batches (gradient accumulation; DDP syncs on the last one).
    Returns the mean loss over every (pair, dimension) term of all ranks."""
    weights = torch.ones(len(rm.dims) + 1, device=rm.device)  # each dimension and the fused overall count once
    total = torch.zeros(2, device=rm.device)
    for i, pairs in enumerate(micro_batches):
        last = i == len(micro_batches) - 1
        sync = model.no_sync() if isinstance(model, nn.parallel.DistributedDataParallel) and not last else nullcontext()
        with sync:
            mu_a, mu_b, ls_a, ls_b = pair_outputs(model, rm, pairs, args.per_dim_prompts)
            loss_sum, n = preference_loss(mu_a, ls_a, mu_b, ls_b, pair_prefs(pairs, rm.dims).to(rm.device), weights,
                                          args.loss, args.mc_samples)
            # mean over this micro-batch's terms; accumulation and DDP then average over micro-batches and ranks
            (loss_sum / max(1.0, n.item()) / len(micro_batches)).backward()
        total += torch.stack([loss_sum.detach(), n])
    optimizer_step(optimizer, args.grad_clip)
    total = all_sum(total)
    return (total[0] / total[1].clamp(min=1)).item()


def train_gaussian(args, d):
    """Train the Gaussian reward model on the pairs of --train, evaluating on --val; returns it."""
    per_rank = args.batch_size // d.world
    if args.batch_size % d.world or per_rank % args.micro_batch:
        raise SystemExit(f"--batch_size {args.batch_size} must split into {d.world} ranks x whole "
                         f"--micro_batch {args.micro_batch}")
    train_pairs = load_pairs(args.train, split=args.split)
    val_pairs = load_pairs(args.val, split=args.split)
    val_pairs = val_pairs[:args.val_max] if args.val_max else val_pairs
    # a dimension that no training pair ranks would get a head trained on nothing: refuse it (names must match)
    dims = [x for x in args.dims.split(",") if x]
    labels = (pair_prefs(train_pairs, dims) != 0).sum(0).tolist()  # strict preferences per dimension, overall
    unranked = [x for x, n in zip(dims, labels) if n == 0]
    if unranked:
        found = sorted({k for p in train_pairs for k, v in p.prefs.items() if v != 0 and k != "overall"})
        raise SystemExit(f"{args.train}: no training pair ranks --dims {unranked} "
                         f"(its pairs rank {found or 'overall only'})")
    rm = RewardModel(vars(args), d.device, weights=args.out_dir if args.resume else None)
    optimizer = make_optimizer(rm, args)
    step = load_checkpoint(args.out_dir, rm, optimizer) if args.resume else 0
    rm.train()  # score() restores it after each evaluation
    model = nn.parallel.DistributedDataParallel(rm) if d.ddp else rm
    trainable = sum(p.numel() for g in optimizer.param_groups for p in g["params"])
    print0(f"model {args.model} | {args.finetune} | trainable {trainable / 1e6:.3f}M | {len(train_pairs)} train pairs "
           f"({', '.join(f'{x} {n}' for x, n in zip(dims + ['overall'], labels))} ranked) | {len(val_pairs)} val pairs "
           f"| world {d.world} | grad accum {per_rank // args.micro_batch} | from step {step}")
    acc, train_time, seen = None, 0.0, 0
    while step < args.max_steps:
        t0 = time.time()
        set_lr(optimizer, step, args)
        torch.manual_seed(args.seed + STEP_SEED_STRIDE * step + d.rank)  # a function of (step, rank): exact resume
        idx = step_indices(step, len(train_pairs), args.batch_size, d.rank, d.world, args.seed)
        mbs = [[train_pairs[i] for i in idx[j:j + args.micro_batch]] for j in range(0, per_rank, args.micro_batch)]
        loss = train_step(model, rm, optimizer, mbs, args)
        step, seen, train_time = step + 1, seen + args.batch_size, train_time + time.time() - t0
        line = f"step {step}/{args.max_steps} | loss {loss:.6f} | lr {optimizer.param_groups[0]['lr']:.2e} " \
               f"| {seen / train_time:.1f} pairs/s | train {train_time:.0f}s"
        if step % args.eval_interval == 0 or step == args.max_steps:  # evaluation and saving are not timed
            acc = evaluate(rm, val_pairs, 2 * args.micro_batch, d.rank, d.world)
            line += " | val " + held_out_line(acc)
            if d.master:
                save_checkpoint(args.out_dir, rm, optimizer, step)
        if step % args.log_interval == 0 or "val" in line:
            print0(line)
    acc = acc or evaluate(rm, val_pairs, 2 * args.micro_batch, d.rank, d.world)
    print0("final held-out accuracy | " + held_out_line(acc, " | ") + f" | train time {train_time:.0f}s")
    return rm


# ----------------------------------------------------------------------------------------------------------
# verifier training: SFT cold start and GCPO

def sft_step(rm, items, micro_batch):
    """One SFT step on CoT traces in micro-batches of micro_batch traces, loss on response tokens only (prompt and
    padding masked out); the response ends in <|im_end|> so the model learns to stop. -> (loss, global tokens)."""
    tok = rm.processor.tokenizer
    resps = [tok(t.response).input_ids + [tok.convert_tokens_to_ids("<|im_end|>")] for t in items]
    mine = sum(map(len, resps))
    ntok = all_sum(torch.tensor(float(mine)))  # the loss is the mean over every rank's response tokens
    rm.train()
    total = 0.0
    for i in range(0, len(items), micro_batch):
        encs = [verifier_prompt(rm.processor, [load_image(s, t.origin) for s in t.sources], t.instruction,
                                load_image(t.edited, t.origin)) for t in items[i:i + micro_batch]]
        inputs, resp, rmask = collate(encs, resps[i:i + micro_batch], tok.pad_token_id)
        with rm.autocast():
            logp = response_logprobs(rm.backbone, inputs, resp)
        loss = -(logp * rmask.to(logp.device)).sum() / ntok.to(logp.device)
        loss.backward()
        total += loss.item()
    return total * ntok.item() / max(mine, 1), ntok.item()


# A sampling seed per (run, step, pair, side, trace), so that a resumed run and every rank draw their own streams:
# the run's seed and the step are mixed in with two large primes, then the pair, its side and the trace index.
SEED_PRIMES = (1000003, 100003)


def trace_seeds(seed, step, pair_id, side, n):
    base = ((seed * SEED_PRIMES[0] + step) * SEED_PRIMES[1] + pair_id) * 2 * n + side * n
    return [base + j for j in range(n)]


def gcpo_rollout(rm, pairs, pair_ids, step, args):
    """Sample N traces for the preferred and N for the rejected edit of each pair (one shared prefill per
    image) and turn them into GCPO training rows: prompt, response ids, old log-probs, advantage."""
    tok, N = rm.processor.tokenizer, args.num_traces
    eos = tok.convert_tokens_to_ids("<|im_end|>")
    rm.eval()  # sampling with a KV cache, which gradient checkpointing (train mode) would switch off
    rows, stats = [], torch.zeros(3)  # sum of r_w (sampled pairwise accuracy, ties 1/2), parsed traces, traces
    for gid, p in zip(pair_ids, pairs):
        srcs = [load_image(s, p.origin) for s in p.sources]
        scores, sampled = [], []
        for side, img in enumerate((p.preferred, p.rejected)):
            enc = verifier_prompt(rm.processor, srcs, p.instruction, load_image(img, p.origin))
            with rm.autocast():
                toks, old, mask = sample_shared_prefill(rm.backbone, enc, trace_seeds(args.seed, step, gid, side, N),
                                                        eos, args.max_new_tokens, args.temperature)
            texts = [tok.decode(t[m.bool()], skip_special_tokens=True) for t, m in zip(toks, mask)]
            parsed = [parse_verifier_output(x) for x in texts]
            scores.append(torch.tensor([r["score"] if r else math.nan for r in parsed]))
            sampled.append((enc, toks, old, mask))
        r_w, r_l = gcpo_rewards(scores[0], scores[1])
        for (enc, toks, old, mask), adv in zip(sampled, (group_advantages(r_w), group_advantages(r_l))):
            for j in range(N):
                n = int(mask[j].sum())
                rows.append((enc, toks[j, :n].tolist(), old[j, :n], adv[j]))
        stats += torch.tensor([r_w.sum().item(), sum((~s.isnan()).sum().item() for s in scores), 2 * N])
    return rows, stats


def gcpo_update(rm, rows, optimizer, args):
    """--ppo_epochs passes over the rollout rows in micro-batches, one optimizer step per pass.
    -> (loss, clip fraction, kl, grad norm) of the last pass."""
    model = rm.backbone
    rm.train()
    ntok = all_sum(torch.tensor(float(sum(len(r[1]) for r in rows))))
    for _ in range(args.ppo_epochs):
        tot = torch.zeros(3)  # loss, clipped tokens, kl * tokens
        for i in range(0, len(rows), args.micro_batch):
            mb = rows[i:i + args.micro_batch]
            inputs, resp, rmask = collate([r[0] for r in mb], [r[1] for r in mb], rm.processor.tokenizer.pad_token_id)
            old = torch.zeros_like(rmask)
            for b, r in enumerate(mb):
                old[b, :len(r[2])] = r[2]
            with rm.autocast():
                logp = response_logprobs(model, inputs, resp, args.temperature)
            dev = logp.device
            old, rmask, adv = old.to(dev), rmask.to(dev), torch.stack([r[3] for r in mb]).to(dev)
            ref = None
            if args.kl_beta:
                with torch.no_grad(), model.disable_adapter(), rm.autocast():
                    ref = response_logprobs(model, inputs, resp, args.temperature)
            loss = gcpo_loss(logp, old, adv, rmask, args.clip_eps, ref, args.kl_beta, ntok.to(dev))
            loss.backward()
            with torch.no_grad():
                clipped = (((logp - old).exp() - 1).abs() > args.clip_eps).float()
                kl = (k3_kl(ref, logp) * rmask).sum().item() if ref is not None else 0.0
                tot += torch.tensor([loss.item(), (clipped * rmask).sum().item(), kl])
        norm = optimizer_step(optimizer, args.grad_clip, sum_ranks=True)
    tot = all_sum(tot)
    return tot[0].item(), tot[1].item() / ntok.item(), tot[2].item() / ntok.item(), norm


def train_verifier(args, d):
    """--stage sft | gcpo | eval of the verifier mode. Returns a metrics dict (the --toy driver prints it)."""
    if args.stage == "eval":  # a checkpoint (--init), or a plain instruct VLM (--model) scoring zero-shot
        scoring = {k: getattr(args, k) for k in ("rubric", "score_temperature", "max_new_tokens")}
        rm = (RewardModel.from_pretrained(args.init, d.device, **scoring) if args.init
              else RewardModel(vars(args), d.device).eval())
        pairs = [p for p in load_pairs(args.val, split=args.split, disentangle=False) if not p.tie]  # overall only
        pairs = pairs[:args.val_max] if args.val_max else pairs
        res = evaluate(rm, pairs, 2 * args.micro_batch, d.rank, d.world, args.eval_samples)
        res.update(pairs=len(pairs), ties_half=res["overall"] + res["tied"] / 2)  # ties count 1/2: chance is 0.5
        print0(f"eval {args.init or args.model} | rubric {rm.flags['rubric']} | Avg@{args.eval_samples} | pair acc "
               f"{res['overall']:.3f} (ties 1/2: {res['ties_half']:.3f}) on {len(pairs)} "
               f"| parse rate {res['parse']:.3f}")
        return res
    sft = args.stage == "sft"
    if args.batch_size % d.world:
        raise SystemExit(f"--batch_size {args.batch_size} must divide by the world size {d.world}")
    rm = RewardModel(vars(args), d.device, weights=args.out_dir if args.resume else None)
    optimizer = make_optimizer(rm, args)
    step = load_checkpoint(args.out_dir, rm, optimizer) if args.resume else 0
    if sft:
        items = load_traces(args.train or "data/toy/cot_train.jsonl", split=args.split)
        if not rm.dims:  # the principles the traces teach become the score keys
            parsed = [parse_verifier_output(t.response) for t in items[:200]]
            rm.dims = list(dict.fromkeys(k for r in parsed if r for k in r["principles"]))
            rm.flags["dims"] = ",".join(rm.dims)
    else:  # a tied pair says nothing about which trace is right
        items = [p for p in load_pairs(args.train or "data/toy/gcpo_train.jsonl", split=args.split, disentangle=False)
                 if not p.tie]
    t_start, res = time.perf_counter(), {}
    while step < args.max_steps:
        t0 = time.perf_counter()
        set_lr(optimizer, step, args)
        ids = step_indices(step, len(items), args.batch_size, d.rank, d.world, args.seed)
        if sft:
            loss, ntok = sft_step(rm, [items[i] for i in ids], args.micro_batch)
            norm = optimizer_step(optimizer, args.grad_clip, sum_ranks=True)
            res = {"loss": loss}
            line = f"loss {loss:.4f} | grad {norm:.2f} | {int(ntok)} tok | {time.perf_counter() - t0:.2f}s"
        else:
            rows, st = gcpo_rollout(rm, [items[i] for i in ids], ids, step, args)
            st, t1 = all_sum(st), time.perf_counter()
            loss, clip, kl, norm = gcpo_update(rm, rows, optimizer, args)
            res = {"win": 2 * st[0].item() / st[2].item(), "parse": st[1].item() / st[2].item()}
            line = (f"win {res['win']:.3f} | parse {res['parse']:.2f} | loss {loss:.4f} | clip {clip:.3f} "
                    f"| kl {kl:.4f} "
                    f"| grad {norm:.2f} | rollout {t1 - t0:.1f}s train {time.perf_counter() - t1:.1f}s")
        step += 1
        if step % args.log_interval == 0 or step == args.max_steps:
            print0(f"step {step}/{args.max_steps} | " + line)
        if d.master and (step % args.eval_interval == 0 or step == args.max_steps):
            save_checkpoint(args.out_dir, rm, optimizer, step)
        if d.ddp:
            dist.barrier()  # nobody reads a half-written checkpoint
    res["time"] = time.perf_counter() - t_start
    return res


def run_toy(args, d):
    """The verifier's CPU demo: SFT -> eval -> GCPO from the SFT model -> eval (same pairs, same seeds)."""
    if d.ddp:
        raise SystemExit("--mode verifier --toy runs in one process; under torchrun run its --stage sft/gcpo/eval")
    data, out = os.path.dirname(args.val), args.out_dir
    stage = lambda **kw: train_verifier(argparse.Namespace(**vars(args) | kw), d)
    sft = stage(stage="sft", train=f"{data}/cot_train.jsonl", out_dir=f"{out}/sft", init=None, **TOY_STAGES["sft"])
    ev_sft = stage(stage="eval", init=f"{out}/sft")
    gcpo = stage(stage="gcpo", train=f"{data}/gcpo_train.jsonl", out_dir=f"{out}/gcpo", init=f"{out}/sft",
                 **TOY_STAGES["gcpo"])
    ev_gcpo = stage(stage="eval", init=f"{out}/gcpo")
    for name, tr, ev in (("SFT", sft, ev_sft), ("SFT+GCPO", gcpo, ev_gcpo)):
        print(f"toy {name}: trained {tr['time']:.0f}s | held-out parse {ev['parse']:.3f} | pair acc "
              f"{ev['overall']:.3f} strict, {ev['ties_half']:.3f} ties 1/2 "
              f"({ev['pairs']} pairs, Avg@{args.eval_samples})")


# ----------------------------------------------------------------------------------------------------------

def main(args):
    d = setup_distributed(args.device)
    from transformers.utils import logging as hf_logging
    hf_logging.disable_progress_bar()  # "Writing model shards" bars would litter the log at every checkpoint
    if args.toy:
        torch.set_num_threads(TOY_THREADS)
        if d.master and not os.path.exists(args.val):
            make_toy(os.path.dirname(args.val))
    if d.ddp:
        dist.barrier()
    torch.manual_seed(args.seed)
    if args.mode == "verifier":
        run_toy(args, d) if args.toy else train_verifier(args, d)
    else:
        rm = train_gaussian(args, d)
        if d.ddp:
            print0(f"ranks in sync: {check_sync(rm, d.world)}")
    if d.ddp:
        leave_distributed()


def check_sync(rm, world):
    """True when every rank holds the same weights: a float64 checksum per rank, compared on all ranks."""
    local = torch.stack([p.detach().double().sum() for p in rm.parameters()]).sum().reshape(1)
    every = [torch.zeros_like(local) for _ in range(world)]
    dist.all_gather(every, local)
    return all(torch.equal(every[0], e) for e in every)


if __name__ == "__main__":
    args, _ = parser.parse_known_args()
    parser.set_defaults(**preset(args.mode, args.toy))
    args = parser.parse_args()
    for name in POSITIVE:
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be >= 1, got {getattr(args, name)}")
    main(args)
