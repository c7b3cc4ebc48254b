"""
rewardmodel.py: vision-language reward models for instruction-guided image editing, and their training.

--mode gaussian (EditReward, arXiv 2509.26346): a prompt with the instruction, the source image(s) and the edit
ends in a reward token; an MLP head on it gives a Gaussian (mu, sigma) per dimension, their mean the "overall" one.
Loss: -log P(w > l), P = Phi((mu_w - mu_l) / sqrt(sigma_w^2 + sigma_l^2)) in closed form (--loss mc: EditReward's
Monte-Carlo estimate; bt: Bradley-Terry). --per_dim_prompts is EditReward's one-prompt-per-dimension layout.
--mode verifier (Edit-R1, Guo et al., "Leveraging Verifier-Based Reinforcement Learning in Image Editing"): the VLM
checks the principles an edit must meet and ends in JSON scores 0..10; SFT teaches it, then GCPO samples N traces
per image of a human pair, rewards each by how often it lands on the right side of the other group's, and takes a
PPO-clipped token loss with a KL to the SFT model. rubric="editscore" (bench.py --rubric editscore): EditScore's
two-prompt rubric (arXiv 2509.23909). Avg@K averages K passes sampled from ONE shared prefill; an unparsed answer is
counted, never guessed. Simplified: one prompt template per mode.

  python rewardmodel.py --toy                          # Gaussian, tiny random Qwen2.5-VL on CPU (writes data/toy)
  python rewardmodel.py --toy --per_dim_prompts        # EditReward's layout: compare the pairs/s of the logs
  torchrun --standalone --nproc_per_node=2 rewardmodel.py --toy          # data-parallel on CPU (gloo)
  python rewardmodel.py --model Qwen/Qwen2.5-VL-7B-Instruct --train <pairs> --val <pairs>   # 1 GPU; torchrun: 8
  python rewardmodel.py --mode verifier --toy          # SFT -> eval -> GCPO -> eval on CPU
  torchrun --standalone --nproc_per_node=2 rewardmodel.py --mode verifier --stage gcpo --init out/verifier_toy/sft
From other scripts: RewardModel.from_pretrained("out/rm").score(sources, instructions, edited, num_samples=K); it
also loads EditScore's LoRA adapters and EditReward's checkpoints, scored with their own prompts (--prompt_file).
"""
import argparse
import functools
import json
import math
import os
import re
import shutil
import time
from contextlib import nullcontext

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from tqdm import tqdm

from data import (BG_COLORS, CELLS, DIMS, EDIT_KINDS, SHAPE_COLORS, SHAPES, atomic_dir, check_least, check_resume,
                  check_unused, leave_distributed, load_image, load_pairs, load_traces, make_toy, print0,
                  setup_distributed)

# --- flags --------------------------------------------------------------------------------------------------------
parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
arg = parser.add_argument
# --- model
arg("--mode", default="gaussian", choices=["gaussian", "verifier"], help="Gaussian head, or CoT judge")
arg("--model", default="tiny", help="hub name, local folder, or 'tiny' / 'tiny-qwen3-vl' (random tiny models)")
arg("--dims", default=",".join(DIMS), help="reward dimensions (verifier: principles; '' = those of the traces)")
arg("--min_pixels", type=int, default=56 * 56, help="smallest image area given to the vision tower")
arg("--max_pixels", type=int, default=256 * 28 * 28, help="largest image area (256 tokens of 28x28 px)")
arg("--dtype", default="auto", choices=["auto", "float32", "bfloat16"], help="auto: bf16 on CUDA, fp32 on CPU")
arg("--grad_checkpointing", default="auto", choices=["auto", "on", "off"], help="recompute activations in backward")
# --- gaussian: head and loss
arg("--per_dim_prompts", action="store_true", help="EditReward layout: one prompt + forward per dimension")
arg("--reward_token", default="<|reward|>", help="the special token whose hidden state the head reads")
arg("--prompt_file", default=None, help="JSON of templates with {instruction}, one per dimension (as EditReward's)")
arg("--head_hidden", type=int, default=1024, help="hidden width of the MLP head")
arg("--loss", default="gaussian", choices=["gaussian", "mc", "bt"], help="closed form | Monte-Carlo | Bradley-Terry")
# --- fine-tuning
arg("--finetune", default="lora", choices=["lora", "full"], help="LoRA (peft) or all weights (gaussian only)")
arg("--lora_rank", type=int, default=16, help="LoRA rank")
arg("--lora_alpha", type=int, default=32, help="LoRA alpha (scale = alpha / rank)")
arg("--lora_dropout", type=float, default=0.05, help="dropout on the LoRA input")
arg("--lora_targets", default="q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj", help="adapted layers")
arg("--vision", default="frozen", choices=["frozen", "lora", "train"], help="vision tower (full: lora = frozen)")
# --- verifier: stages, GCPO, scoring
arg("--stage", default="sft", choices=["sft", "gcpo"], help="SFT cold start or GCPO (evaluation: bench.py --k K)")
arg("--init", default=None, help="gcpo: the SFT checkpoint to start from (none: --model itself)")
arg("--num_traces", type=int, default=4, help="N traces sampled per image (2N per pair)")
arg("--temperature", type=float, default=1.0, help="GCPO sampling temperature (policy = sampler)")
arg("--clip_eps", type=float, default=0.2, help="PPO ratio clip")
arg("--ppo_epochs", type=int, default=2, help="optimizer steps per GCPO rollout batch")
arg("--kl_beta", type=float, default=0.0, help="KL weight to the SFT model (the adapter disabled)")
arg("--max_new_tokens", type=int, default=128, help="longest generated answer")
# --- data, optimisation (batch flags are global totals over ranks and accumulation), run
arg("--train", default="data/toy/pairs_train.jsonl", help="training pairs (verifier: traces for sft, pairs for gcpo)")
arg("--val", default="data/toy/pairs_val.jsonl", help="held-out pairs for accuracy (--toy: its folder)")
arg("--val_max", type=int, default=0, help="at most this many held-out pairs (0 = all)")
arg("--batch_size", type=int, default=32, help="per optimizer step, all ranks: pairs (gaussian, gcpo), traces (sft)")
arg("--micro_batch", type=int, default=8, help="pairs or traces per forward (8: a 7B model on 80 GB, README)")
arg("--max_steps", type=int, default=1000, help="optimizer steps to run")
arg("--lr_decay_steps", type=int, default=0, help="length of the cosine schedule (0 = max_steps)")
arg("--lr", type=float, default=1e-4, help="peak lr of the backbone (adapters or weights)")
arg("--head_lr", type=float, default=1e-3, help="peak lr of the head and the reward-token row")
arg("--warmup_steps", type=int, default=50, help="linear warmup steps")
arg("--beta2", type=float, default=0.95, help="AdamW beta2")
arg("--grad_clip", type=float, default=1.0, help="clip the global grad norm (0 = off)")
arg("--out_dir", default="out/rm", help="checkpoint folder")
arg("--resume", action="store_true", help="continue out_dir's run exactly (same flags; none saved yet: step 0)")
arg("--log_interval", type=int, default=25, help="steps between log lines")
arg("--eval_interval", type=int, default=250, help="steps between checkpoints (gaussian: each after an eval)")
arg("--seed", type=int, default=0, help="random seed (data order, init, dropout, GCPO sampling)")
arg("--device", default="auto", help="cpu | cuda | auto (torchrun: LOCAL_RANK)")
arg("--toy", action="store_true", help="toy-world preset of the mode (explicit flags win)")
LEAST = dict(batch_size=1, micro_batch=1, max_steps=1, log_interval=1, eval_interval=1, num_traces=2, ppo_epochs=1,
             max_new_tokens=1, val_max=0, lr_decay_steps=0, warmup_steps=0, lr=0, head_lr=0, grad_clip=0, kl_beta=0,
             clip_eps=0, lora_dropout=0, lora_rank=1, lora_alpha=1)  # each number flag's least (1 trace: no advantage)
# Each mode's own flags: one given to the other mode is an error, never ignored (--stage gcpo alone: a Gaussian run)
MODE_ONLY = dict(gaussian=("per_dim_prompts", "reward_token", "prompt_file", "head_hidden", "loss", "head_lr"),
                 verifier=("stage", "init", "num_traces", "temperature", "clip_eps", "ppo_epochs", "kl_beta",
                           "max_new_tokens"))

# Presets: the defaults a mode and its --toy recipe put over the parser's (explicit flags still win).
# The toy's tiny random model needs its vision tower trained, and more updates per second than a real one.
TOY = dict(model="tiny", min_pixels=56 * 56, max_pixels=56 * 56, finetune="full", vision="train", lr=1e-3,
           head_lr=1e-3, head_hidden=256, batch_size=16, micro_batch=16, max_steps=1200, eval_interval=300,
           log_interval=100, out_dir="out/rm_toy")
# No LoRA dropout: sampling and training see one policy (the PPO ratio). lm_head adapted: the answer can sharpen.
VERIFIER = dict(dims="", train=None, out_dir="out/verifier", lora_dropout=0.0, max_steps=100, warmup_steps=10,
                lora_targets=parser.get_default("lora_targets") + ",lm_head", batch_size=16, beta2=0.99,
                log_interval=10, eval_interval=100)
# The toy verifier sees 112 px images (16 visual tokens each) through full-rank adapters (64 = the tiny width).
VERIFIER_TOY = dict(micro_batch=16, vision="train", min_pixels=112 * 112, max_pixels=112 * 112, lora_rank=64,
                    lora_alpha=128, temperature=0.7, kl_beta=0.04, out_dir="out/verifier_toy")
# run_toy's stages: GCPO keeps the vision tower that SFT trained fixed.
TOY_STAGES = {"sft": dict(max_steps=1500, lr=1e-3), "gcpo": dict(max_steps=120, lr=5e-4, vision="frozen")}
TOY_THREADS = 1  # --toy pins torch's intra-op threads: its figures then do not depend on the machine's cores
TOY_AVG_K = 4  # the toy verifier's held-out evaluation averages 4 passes (EditScore's Avg@4)

def preset(mode, toy):
    return {**VERIFIER, **(VERIFIER_TOY if toy else {})} if mode == "verifier" else TOY if toy else {}

# --- losses: (B,) tensors in, (B,) per-pair losses out; w = preferred, l = rejected -------------------------------
MC_SAMPLES = 1000  # EditReward's draws per pair for --loss mc
def pair_scale(log_sigma_a, log_sigma_b):  # sqrt(sigma_a^2 + sigma_b^2), the std of mu_a - mu_b, without overflow
    return torch.exp(torch.logaddexp(2 * log_sigma_a, 2 * log_sigma_b) / 2)

def gaussian_ranking_loss(mu_w, log_sigma_w, mu_l, log_sigma_l):
    """-log Phi((mu_w - mu_l) / sqrt(sigma_w^2 + sigma_l^2)); log_ndtr stays finite where Phi underflows."""
    return -torch.special.log_ndtr((mu_w - mu_l) / pair_scale(log_sigma_w, log_sigma_l))

def mc_ranking_loss(mu_w, log_sigma_w, mu_l, log_sigma_l, num_samples=MC_SAMPLES):
    """EditReward's E_z[-log sigmoid(z)], z ~ N(mu_w - mu_l, sigma_w^2 + sigma_l^2), from num_samples draws."""
    eps = torch.randn(*mu_w.shape, num_samples, dtype=mu_w.dtype, device=mu_w.device)  # (B, S)
    z = (mu_w - mu_l).unsqueeze(-1) + pair_scale(log_sigma_w, log_sigma_l).unsqueeze(-1) * eps
    return F.softplus(-z).mean(-1)  # softplus(-z) = -log sigmoid(z)

def bt_loss(mu_w, mu_l):  # Bradley-Terry on the means alone: -log sigmoid(mu_w - mu_l)
    return F.softplus(mu_l - mu_w)

def fuse_gaussians(mu, log_sigma):
    """(B, D) Gaussians -> (B,) overall: the mean of D independent Gaussians, N(mean mu, sum sigma^2 / D^2)."""
    return mu.mean(-1), torch.logsumexp(2 * log_sigma, -1) / 2 - math.log(mu.shape[-1])

def preference_loss(mu_a, ls_a, mu_b, ls_b, prefs, weights, kind="gaussian"):
    """Ranking loss over every (pair, dimension) with a strict preference. mu_*, ls_*: (B, K) of images a and b;
    prefs (B, K) in {+1 a better, -1 b better, 0 skip}; weights (K,). -> (weighted sum, sum of weights)."""
    a_wins = prefs > 0
    mu_w, mu_l = torch.where(a_wins, mu_a, mu_b), torch.where(a_wins, mu_b, mu_a)
    ls_w, ls_l = torch.where(a_wins, ls_a, ls_b), torch.where(a_wins, ls_b, ls_a)
    terms = (bt_loss(mu_w, mu_l) if kind == "bt" else
             (mc_ranking_loss if kind == "mc" else gaussian_ranking_loss)(mu_w, ls_w, mu_l, ls_l))
    mask = (prefs != 0).to(terms.dtype) * weights
    return (terms * mask).sum(), mask.sum()

def pairwise_accuracy(score_a, score_b, prefs):
    """Right when sign(score_a - score_b) == prefs (B,) (a score tie is wrong; a human tie, 0, is not counted)."""
    keep = prefs != 0
    return int((torch.sign(score_a - score_b)[keep] == prefs[keep]).sum()), int(keep.sum())

def pool_hidden(hidden, input_ids, attention_mask, token_id=None):
    """(N, T, H) -> (N, H) at the last token_id (else the last attended position), under any padding side."""
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

# --- prompts and parsing: a score or None, never a guess ---------------------------------------------------------
SCORE_MAX, EDITSCORE_MAX = 10.0, 25.0  # verifier scores live in [0, 10]; EditScore's rubric answers 0..25
# EditScore's scoring sampler: temperature, nucleus, top-k, pass i seeded SCORE_SEED + i, the model's eos ids and, as
# its transformers scorer (evaluate.sh; its vLLM one does not), its repetition penalty (Qwen2.5-VL-7B-Instruct: 1.05)
SCORE_TEMPERATURE, TOP_P, TOP_K, SCORE_SEED = 0.7, 0.9, 20, 42
VERIFIER_PROMPT = "Instruction: {instruction}\nVerify each principle, then JSON scores 0-10."  # short, for the toy
# The project's paraphrase of EditScore's rubric (arXiv 2509.23909, section 3; not the authors' text): semantic
# consistency (SC) of the edit with its source, and perceptual quality (PQ) of the edit alone.
EDITSCORE_PROMPTS = dict(
    SC="You judge image edits. The first image is the original, the second the edited result. Instruction: "
       "{instruction}\nRate from 0 to 25: (1) how completely the edit does what the instruction asks; (2) how little "
       "it over-edits, i.e. changes what it was not asked to change (25 = nothing else changed). Reason briefly, then "
       'answer with JSON: {"reasoning": "...", "score": [s1, s2]}',
    PQ="You judge the image quality of a generated image. Rate from 0 to 25: (1) how natural it looks (lighting, "
       "shadows, proportions, sense of depth); (2) how free it is of artifacts (distortion, blur, broken objects, "
       'watermarks; 25 = none). Reason briefly, then answer with JSON: {"reasoning": "...", "score": [s1, s2]}')
RUBRIC_DIMS = ("prompt_following", "consistency", "perceptual_quality")  # what the EditScore rubric scores
# key (quoted or bare) : number, "number", "a/b" or a [list]; JSON or not (single quotes, trailing commas, a tail cut)
_KV = re.compile(r"[\"']?([A-Za-z_][\w ]*?)[\"']?\s*[:=]\s*"
                 r"(\[[^\]\[]*\]|\"[^\"]*\"|'[^']*'|[-+]?[\d.]+(?:\s*/\s*[\d.]+)?)")

def encode_prompt(processor, images, text, labels=None):
    """One user turn (each image after its label, then the text) through the chat template, assistant turn open ->
    unpadded model inputs of batch 1 (mm_token_type_ids marks image tokens: Qwen-VL's 3D rope needs it). Without
    labels: "source:" ... "edited:", and the text on a line of its own."""
    labels, text = (["source:"] * (len(images) - 1) + ["edited:"], "\n" + text) if labels is None else (labels, text)
    content = [c for lab in labels for c in ({"type": "text", "text": lab}, {"type": "image"})]
    content.append({"type": "text", "text": text})
    chat = processor.apply_chat_template([{"role": "user", "content": content}], tokenize=False,
                                         add_generation_prompt=True)
    enc = processor(text=[chat], images=list(images) or None, return_tensors="pt")
    return {k: v for k, v in enc.items() if k != "attention_mask"}  # no padding in a batch of one

def verifier_prompt(processor, sources, instruction, edited):
    return encode_prompt(processor, list(sources) + [edited], VERIFIER_PROMPT.replace("{instruction}", instruction))

def _number(v, hi):
    """A finite number from a numeric string (quotes allowed) or a fraction "a/b" (rescaled to 0..hi), else None."""
    m = re.fullmatch(r"\s*[\"']?\s*([-+]?\d+(?:\.\d+)?|[-+]?\.\d+)\s*(?:/\s*(\d+(?:\.\d+)?))?\s*[\"']?\s*", v)
    if not m or (m[2] is not None and float(m[2]) == 0):
        return None
    v = float(m[1]) / float(m[2]) * hi if m[2] else float(m[1])
    return v if math.isfinite(v) else None

def _objects(text):
    """The outermost {...} spans of text, the last first (braces in double-quoted strings do not count); an object
    still open at the end (a generation cut short) is returned as it is, so that its complete fields can be read."""
    spans, depth, start, in_str, esc = [], 0, 0, False, False
    for i, ch in enumerate(text):
        if in_str:
            esc, in_str = (False, True) if esc else (ch == "\\", ch != '"')
        elif ch == '"' and depth:
            in_str = True
        elif ch in "{}" and (ch == "{" or depth):
            start, depth = (i if depth == 0 else start, depth + 1) if ch == "{" else (start, depth - 1)
            spans += [text[start:i + 1]] if ch == "}" and depth == 0 else []
    return (spans + [text[start:]] * (depth > 0))[::-1]

def _fields(text, hi):
    """The key: value pairs of JSON-ish text -> {lowercase key: number in [0, hi]}; any other value is dropped."""
    vals = {k.strip().lower(): _number(v, hi) for k, v in _KV.findall(text)}
    return {k: v for k, v in vals.items() if v is not None and 0.0 <= v <= hi}

def parse_verifier_output(text, hi=SCORE_MAX):
    """Verifier text -> {"score": s, "principles": {name: x}}, numbers in [0, hi], from the last object with a score,
    or None. A bad value is dropped, never clipped (85 on a 0-10 scale is a misunderstanding, not a 10); a missing
    "score" is the principles' mean; with no object, only "... score: x" in free text counts."""
    for span in _objects(text) if isinstance(text, str) else []:
        vals = _fields(span, hi)
        final = vals.pop("score", None)
        final = sum(vals.values()) / len(vals) if final is None and vals else final
        if final is not None:
            return {"score": final, "principles": vals}
    found = [v for k, v in _fields(text, hi).items() if k.split()[-1] == "score"] if isinstance(text, str) else []
    return {"score": found[-1], "principles": {}} if found else None

def parse_editscore_output(text, n=2, hi=EDITSCORE_MAX):
    """EditScore rubric answer -> the raw scores in [0, hi] of the last object's "score" (a list of n or more, or one
    number when n = 1, as EditScore's own parser reads them; curly quotes too), or None (all must be valid: a pair
    with one bad entry is not half a score)."""
    for span in _objects(text.replace("\u201c", '"').replace("\u201d", '"')) if isinstance(text, str) else []:
        raw = {k.strip().lower(): v for k, v in _KV.findall(span)}.get("score", "")
        vals = [_number(v, hi) for v in re.findall(r"[^,\[\]\s]+", raw)] if raw.startswith("[") else [_number(raw, hi)]
        if len(vals) >= n and all(v is not None and 0.0 <= v <= hi for v in vals):
            return vals
    return None

def editscore_aggregate(sc, pq):
    """EditScore's Avg@K. sc (B, K, 2): raw 0..25 [edit success, over-editing]; pq (B, K, 2): [naturalness, artifacts];
    NaN: unparsed. Per pass PF, C = sc / 2.5, PQ = min(pq) / 2.5, overall = sqrt(min(PF, C) * PQ), each averaged over
    its parsed passes -> dict of (B,) tensors + "unparsed" (passes where either prompt failed)."""
    sc, pq = sc * (SCORE_MAX / EDITSCORE_MAX), pq * (SCORE_MAX / EDITSCORE_MAX)
    pf, c, q = sc[..., 0], sc[..., 1], pq.min(-1).values                      # (B, K) each
    overall = (torch.minimum(pf, c) * q).sqrt()                                # NaN where a prompt failed
    return {"prompt_following": pf.nanmean(-1), "consistency": c.nanmean(-1), "perceptual_quality": q.nanmean(-1),
            "overall": overall.nanmean(-1), "unparsed": overall.isnan().sum(-1).float()}

# --- GCPO math --------------------------------------------------------------------------------------------------
def gcpo_rewards(scores_w, scores_l):
    """GCPO rewards of the preferred edit's (N,) and the rejected one's (M,) trace scores: r_w[j] = mean_k
    1[t_w[j] > t_l[k]], r_l[j] = mean_k 1[t_l[j] < t_w[k]], a tie 1/2. A NaN (unparsed) trace gets 0, beaten by all."""
    def credit(own, other, sign):  # (N,), (M,) -> (N, M) credit of own[j] against other[k]
        d = sign * (own[:, None] - other[None, :])                             # > 0: the preferred order
        c = torch.where(other.isnan()[None, :], 1.0, (d > 0).float() + 0.5 * (d == 0).float())
        return torch.where(own.isnan()[:, None], 0.0, c)
    return credit(scores_w, scores_l, 1.0).mean(1), credit(scores_l, scores_w, -1.0).mean(1)

def group_advantages(r, eps=1e-4):
    """A = (r - mean(r)) / (std(r) + eps) within one group (GCPO: winner and loser groups apart). (N,) -> (N,)."""
    return (r - r.mean()) / (r.std(unbiased=False) + eps)

KL_CAP = 10.0  # k3 grows like exp(ref - logp): one token the policy nearly ruled out could dominate a step

def k3_kl(ref_logp, logp):
    """Per-token k3 estimate of KL(pi || ref), exp(d) - d - 1 with d = ref - logp, capped at KL_CAP."""
    d = ref_logp - logp
    return (d.exp() - d - 1).clamp(max=KL_CAP)

def gcpo_loss(logp, old_logp, adv, mask, clip_eps=0.2, ref_logp=None, beta=0.0, num_tokens=None):
    """GCPO's token-level PPO-clipped loss. logp, old_logp, ref_logp, mask: (T, R) per response token; adv: (T,).
      ratio = exp(logp - old_logp);  l = max(-A ratio, -A clip(ratio, 1-eps, 1+eps)) + beta * k3_kl(ref, logp)
    A mean over tokens (num_tokens: the global count), so long traces are not down-weighted."""
    ratio, a = (logp - old_logp).exp(), adv[:, None]
    per_tok = torch.maximum(-a * ratio, -a * ratio.clamp(1 - clip_eps, 1 + clip_eps))
    per_tok = per_tok + beta * k3_kl(ref_logp, logp) if beta else per_tok
    return (per_tok * mask).sum() / (mask.sum() if num_tokens is None else num_tokens)

# --- sampling with one shared prefill, and teacher-forced log-probs -----------------------------------------------
def filter_logits(logits, temperature, top_k=0, top_p=1.0):
    """(B, V) logits -> temperature-scaled logits with -inf outside the top-k / nucleus (top-p) set."""
    logits = logits / temperature
    if 0 < top_k < logits.shape[-1]:
        logits = logits.masked_fill(logits < logits.topk(top_k).values[:, -1:], float("-inf"))
    if top_p < 1.0:
        sorted_l, idx = logits.sort(-1, descending=True)
        drop = sorted_l.softmax(-1).cumsum(-1) - sorted_l.softmax(-1) > top_p     # mass before this token > p
        logits = logits.masked_fill(drop.scatter(-1, idx, drop), float("-inf"))
    return logits

def unwrap(model):  # the HF model under a peft wrapper
    return model.get_base_model() if hasattr(model, "get_base_model") else model

def answer_logits(model, logits):
    """(..., V) logits without the vision placeholders (a sampled <|image_pad|> breaks the next forward)."""
    cfg = unwrap(model).config
    banned = [cfg.image_token_id, cfg.video_token_id, cfg.vision_start_token_id, cfg.vision_end_token_id]
    return logits.float().index_fill(-1, torch.tensor(banned, device=logits.device), float("-inf"))

@torch.no_grad()
def sample_shared_prefill(model, enc, seeds, eos_id, max_new_tokens, temperature=1.0, top_k=0, top_p=1.0,
                          repetition_penalty=1.0):
    """K = len(seeds) / B sampled answers to each of enc's B prompts (one: encode_prompt's; more: a left-padded batch,
    see collate): prefill once, repeat each prompt's KV cache K times, decode the B x K rows as one batch; row b K + i
    draws from its own generator, as an independent run seeded seeds[b K + i] does. -> tokens (B K, T), log-probs
    (B K, T) under the temperature-scaled policy (GCPO's old policy), mask (B K, T) (1 up to and incl. EOS)."""
    dev = next(model.parameters()).device
    enc = {k: v.to(dev) for k, v in enc.items()}
    ids, k = enc["input_ids"], len(seeds) // len(enc["input_ids"])
    attn = enc.get("attention_mask", torch.ones_like(ids))
    # Qwen-VL's 3D rope: text positions after the images are shifted by delta; decode positions continue it
    _, delta = unwrap(model).model.get_rope_index(ids, enc["mm_token_type_ids"], attention_mask=attn,
                                                  image_grid_thw=enc.get("image_grid_thw"))
    out = model(**enc, use_cache=True, logits_to_keep=1)
    (cache := out.past_key_values).batch_repeat_interleave(k)
    logits = answer_logits(model, out.logits[:, -1]).repeat_interleave(k, 0)
    n = len(seeds)
    attn, delta, length = attn.repeat_interleave(k, 0), delta.repeat_interleave(k, 0), attn.sum(1).repeat_interleave(k)
    gens = [torch.Generator(device=dev).manual_seed(int(s)) for s in seeds]
    toks, logps, masks, alive = [], [], [], torch.ones(n, dtype=torch.bool, device=dev)  # ended rows go on, masked
    prompt = torch.where(attn.bool(), ids.repeat_interleave(k, 0), ids[:, -1:].repeat_interleave(k, 0))  # no pads
    seen = torch.zeros(n, logits.shape[-1], dtype=torch.bool, device=dev).scatter_(1, prompt, True)
    rp, eos = repetition_penalty, torch.as_tensor(eos_id, device=dev)  # eos_id: one id or a list (generation_config's)
    for t in range(max_new_tokens):  # as transformers' generate(), a token already in the prompt or answer is penalised
        logits = torch.where(seen & (logits > 0), logits / rp, torch.where(seen, logits * rp, logits))
        probs = filter_logits(logits, temperature, top_k, top_p).softmax(-1)
        # torch.multinomial's one-sample draw, argmax p / q with q ~ Exp(1) from the row's generator (the same token),
        # batched: one kernel a row, without multinomial's own input checks a row (more kernels, or syncs, on a GPU)
        q = torch.stack([torch.empty_like(probs[0]).exponential_(1, generator=g) for g in gens])
        nxt = (probs / q).argmax(-1)
        toks.append(nxt)
        seen[torch.arange(n, device=dev), nxt] = True
        logps.append((logits / temperature).log_softmax(-1).gather(1, nxt[:, None])[:, 0])
        masks.append(alive)
        alive = alive & ~torch.isin(nxt, eos)
        if not alive.any():
            break
        pos = (length + t).view(1, n, 1)  # each row's own count of tokens, padding aside
        pos = torch.cat([pos, pos.expand(3, n, 1) + delta.view(1, -1, 1)])   # (4, B K, 1): text + 3D rope rows
        attn = torch.cat([attn, attn.new_ones(n, 1)], 1)
        out = model(input_ids=nxt[:, None], past_key_values=cache, position_ids=pos, attention_mask=attn,
                    use_cache=True)
        cache, logits = out.past_key_values, answer_logits(model, out.logits[:, -1])
    if (logps := torch.stack(logps, 1)).isnan().any():  # multinomial's check, once: argmax would pick some token
        raise FloatingPointError("the model's logits hold NaN or inf: no answer can be sampled from them")
    return torch.stack(toks, 1).cpu(), logps.cpu(), torch.stack(masks, 1).float().cpu()

def collate(encs, responses, pad_id):
    """Prompts (encode_prompt outputs) left-padded to end at column P, responses (lists of ids) right-padded after
    them, so every row's response sits in columns P..P+R-1. -> model inputs, responses (B, R), mask (B, R)."""
    B, P, R = len(encs), max(e["input_ids"].shape[1] for e in encs), max(len(r) for r in responses)
    ids = torch.full((B, P + R), pad_id, dtype=torch.long)
    attn, mm = torch.zeros_like(ids), torch.zeros_like(ids, dtype=torch.int)
    resp, rmask = torch.full((B, R), pad_id, dtype=torch.long), torch.zeros(B, R)
    for b, (e, r) in enumerate(zip(encs, responses)):
        lp = e["input_ids"].shape[1]
        ids[b, P - lp:P], mm[b, P - lp:P] = e["input_ids"][0], e["mm_token_type_ids"][0]
        ids[b, P:P + len(r)], resp[b, :len(r)] = torch.tensor(r), torch.tensor(r)
        attn[b, P - lp:P + len(r)], rmask[b, :len(r)] = 1, 1
    inputs = {"input_ids": ids, "attention_mask": attn, "mm_token_type_ids": mm}
    if with_img := [e for e in encs if "pixel_values" in e]:
        inputs.update({k: torch.cat([e[k] for e in with_img]) for k in ("pixel_values", "image_grid_thw")})
    return inputs, resp, rmask

def response_logprobs(model, inputs, resp, temperature=1.0):
    """Teacher-forced log-probs of the response tokens (collate layout). -> (B, R)."""
    dev = next(model.parameters()).device
    out = model(**{k: v.to(dev) for k, v in inputs.items()}, logits_to_keep=resp.shape[1] + 1, use_cache=False)
    logits = answer_logits(model, out.logits[:, :-1]) / temperature             # position t predicts t+1
    return logits.log_softmax(-1).gather(2, resp.to(dev)[..., None])[..., 0]

# --- backbone: hub / local VLMs and offline tiny random ones through the same code path ---------------------------
# The tiny tokenizer gives each of these words one token, as a real one does frequent words (bytes would be too long)
TINY_WORDS = ("Instruction Source Edited Rate the edit instruction following visual quality Verify each principle then "
              "JSON scores score follow keep user assistant make remove add a at move to change background "
              + " ".join([*SHAPE_COLORS, *BG_COLORS, *SHAPES, *CELLS, *EDIT_KINDS]))
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
                  "<|image_pad|>", "<|video_pad|>"]
TINY_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{% if m['content'] is string %}"
                 "{{ m['content'] }}{% else %}{% for c in m['content'] %}{% if c['type'] == 'image' %}"
                 "<|vision_start|><|image_pad|><|vision_end|>{% else %}{{ c['text'] }}{% endif %}{% endfor %}"
                 "{% endif %}<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
TINY_MODELS = {"tiny": "qwen2_5_vl", "tiny-qwen3-vl": "qwen3_vl"}  # --model names of the tiny random backbones

def image_only_processor(model_type):
    """A Qwen-VL family's processor class without the video processor, which needs torchvision (a README install has
    none): its attributes are those its __init__ names."""
    import transformers
    from transformers.models.auto.processing_auto import PROCESSOR_MAPPING_NAMES
    class ImageOnlyProcessor(getattr(transformers, PROCESSOR_MAPPING_NAMES[model_type])):
        def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
            super().__init__(image_processor, tokenizer, None, chat_template=chat_template or tokenizer.chat_template)
    return ImageOnlyProcessor

def load_processor(name, model_type, **kw):
    """AutoProcessor.from_pretrained(name, **kw), or without torchvision the same processor without its video part,
    loaded as AutoProcessor loads (the chat template may live in the processor's own file, not the tokenizer's)."""
    from transformers import AutoProcessor
    from transformers.utils import is_torchvision_available
    try:  # the video processor's config, if any, fails in several ways without torchvision: not tried then
        processor = AutoProcessor.from_pretrained(name, **kw) if is_torchvision_available() else None
    except ImportError:  # torchvision installed but not importable
        processor = None
    if not hasattr(processor, "image_processor"):  # AutoProcessor gives a bare tokenizer if no processor is named
        processor = image_only_processor(model_type).from_pretrained(name, **kw)
    return processor

def tiny_tokenizer():
    """A byte-level BPE (the `tokenizers` library) with each of TINY_WORDS one token, + Qwen's special tokens."""
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

def build_tiny_vlm(name="tiny", init_std=0.1):
    """A random tiny Qwen2.5-VL or Qwen3-VL (~0.25M parameters, seeded: the same in every process) and its processor.
    init_std: HF's 0.02 suits 4096-wide models; at width 64 it leaves the last hidden state nearly input-blind."""
    import transformers
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil
    family, tok = TINY_MODELS[name], tiny_tokenizer()
    ids = tok.convert_tokens_to_ids
    # mrope splits the rotary half-dim (16/2 = 8) over (time, height, width)
    text = dict(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, max_position_embeddings=4096, pad_token_id=ids("<|endoftext|>"),
                initializer_range=init_std, rope_parameters=dict(rope_type="default", rope_theta=10000.0,
                                                                 mrope_section=[2, 3, 3]))
    vision = dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64,
                  initializer_range=init_std)
    if family == "qwen2_5_vl":  # 14 px patches, windowed attention but in the last block
        cls, config, patch = transformers.Qwen2_5_VLForConditionalGeneration, transformers.Qwen2_5_VLConfig, 14
        text.update(bos_token_id=None, eos_token_id=ids("<|im_end|>"))
        vision.update(window_size=56, fullatt_block_indexes=[1])
    else:  # 16 px patches, interleaved mrope, deepstack features from vision block 1 into the first text layer
        cls, config, patch = transformers.Qwen3VLForConditionalGeneration, transformers.Qwen3VLConfig, 16
        text.update(head_dim=16), text["rope_parameters"].update(mrope_interleaved=True)
        vision.update(num_position_embeddings=64, deepstack_visual_indexes=[1])
    config = config(text_config=text, vision_config=vision, image_token_id=ids("<|image_pad|>"),
                    video_token_id=ids("<|video_pad|>"), vision_start_token_id=ids("<|vision_start|>"),
                    vision_end_token_id=ids("<|vision_end|>"))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = cls(config)
    model.generation_config.update(pad_token_id=ids("<|endoftext|>"), eos_token_id=ids("<|im_end|>"))
    return model, image_only_processor(family)(Qwen2VLImageProcessorPil(patch_size=patch, merge_size=2), tok)

def load_backbone(name, dtype=torch.float32, min_pixels=None, max_pixels=None, weights=None):
    """(model, processor) of a hub name, a folder or a TINY_MODELS name, images within min/max_pixels, left padding.
    weights: a save_pretrained folder that replaces the base weights (full fine-tunes), loaded in fp32 as training
    keeps them (a bf16 load would round the updates away; RewardModel casts the frozen rest to the compute dtype)."""
    from transformers import AutoModelForImageTextToText
    if name in TINY_MODELS:
        model, processor = build_tiny_vlm(name)
        model = AutoModelForImageTextToText.from_pretrained(weights, dtype=torch.float32) if weights else model
        for p in model.parameters() if not weights else ():  # cast as from_pretrained(dtype=) casts: the weights,
            p.data = p.data.to(dtype)  # not the rope's inv_freq buffers (fp32; bf16 would blur long-range positions)
    else:
        model = AutoModelForImageTextToText.from_pretrained(weights or name, dtype=torch.float32 if weights else dtype)
        processor = load_processor(name, model.config.model_type)
    processor.image_processor.size = dict(processor.image_processor.size) | {
        k: v for k, v in (("shortest_edge", min_pixels), ("longest_edge", max_pixels)) if v}
    processor.tokenizer.padding_side = "left"
    return model, processor

def setup_lora(model, rank, alpha, dropout, targets, vision="frozen"):
    """peft LoRA on the named linear layers of the language model (with vision="lora" also the vision tower's
    attention and MLP linears, by their own names; "train" trains the tower in full, saved with the adapter)."""
    from peft import LoraConfig, get_peft_model
    names = "|".join(t.strip() for t in targets.split(",") if t.strip())
    if miss := [t for t in names.split("|") if not any(f".{n}".endswith(f".{t}") for n, _ in model.named_modules())]:
        raise ValueError(f"--lora_targets: {type(model).__name__} has no layer {miss}")  # else peft drops it silently
    scope = "" if vision == "lora" else r"(?!.*visual)"  # a regex so the tower's same-named layers are skipped
    tower = r"|^.*visual\..*\.(attn\.qkv|attn\.proj|linear_fc1|linear_fc2)$" * (vision == "lora")  # its own names
    config = LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=dropout,
                        target_modules=rf"^{scope}(.*\.)?({names})${tower}",
                        modules_to_save=["visual"] if vision == "train" else None)
    return get_peft_model(model, config)

def all_sum(x):  # sum a tensor over ranks, in place (a no-op in one process)
    return dist.all_reduce(x) or x if dist.is_initialized() else x

def resolve_dtype(name, device):
    return (torch.bfloat16 if device.type == "cuda" else torch.float32) if name == "auto" else getattr(torch, name)

# --- the reward model ---------------------------------------------------------------------------------------------
HEAD_DROPOUT = 0.05  # EditReward's head: Linear-ReLU-Dropout(0.05)-Linear
SIGMA_FLOOR = 0.05   # sigma = SIGMA_FLOOR + softplus(raw): a floor, never a hard clamp that stops gradients
RESERVED = ("overall", "unparsed")  # score() keys that cannot be dimension names

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

    def __init__(self, flags, device="cpu", weights=None):
        super().__init__()
        self.flags, self.mode, device = {"rubric": "verifier"} | flags, flags["mode"], torch.device(device)
        self.prompts = read_prompts(flags["prompt_file"]) if flags["prompt_file"] else None  # before minutes of loading
        full, verifier = flags["finetune"] == "full", self.mode == "verifier"
        want = ["SC", "PQ"] if verifier else [d for d in flags["dims"].split(",") if d]  # a template each, said early
        if self.prompts and (missing := [k for k in want if k not in self.prompts]):
            raise ValueError(f"{flags['prompt_file']}: no template for {missing} (it has {list(self.prompts)})")
        if verifier and full:
            raise ValueError("--mode verifier trains LoRA: GCPO's KL reference is the model with its adapter off")
        own = os.path.join(weights or "", "init")  # a GCPO checkpoint's copy of its SFT model (save_weights)
        self.init_dir = (own if weights and os.path.isfile(f"{own}/args.json") else flags["init"]) if verifier else None
        if self.init_dir:
            # GCPO: a fresh adapter over the SFT model with the SFT adapter merged in, so that disabling the new
            # adapter gives the SFT policy (the KL reference). The base, pixel bounds and principles come with it.
            if not os.path.isfile(f"{self.init_dir}/args.json"):
                raise FileNotFoundError(f"--init {flags['init']}: not a checkpoint of this script (no args.json)")
            parent = RewardModel.from_pretrained(self.init_dir, device, mode="verifier")  # not a Gaussian one
            if hasattr(lm := unwrap(parent.backbone).get_output_embeddings(), "base_layer"):  # an adapted lm_head gets
                # its own weight: merged into one tied to the input embeddings (Qwen2.5-VL-3B), it would change them
                lm.base_layer.weight = nn.Parameter(lm.base_layer.weight.detach().clone(), requires_grad=False)
            backbone, self.processor = parent.backbone.merge_and_unload(), parent.processor
            self.flags.update({k: parent.flags[k] for k in ("model", "min_pixels", "max_pixels", "dims")},
                              init=os.path.abspath(flags["init"]))
        else:
            try:
                backbone, self.processor = load_backbone(
                    flags["model"], resolve_dtype(flags["dtype"], device), flags["min_pixels"], flags["max_pixels"],
                    os.path.join(weights, "backbone") if weights and full else None)
            except OSError as e:  # a checkpoint names its base as the machine that trained it knew it
                if not weights or flags["model"] in TINY_MODELS or os.path.isdir(flags["model"]):
                    raise
                raise OSError(f"{weights}: its base model {flags['model']!r} is not a folder here and did not load "
                              f"from the hub ({e}); put it there, or load the checkpoint with model=<its folder or hub "
                              "name> (or edit args.json)") from e
        self.dims = list(RUBRIC_DIMS) if verifier and self.flags["rubric"] == "editscore" else [
            d for d in self.flags["dims"].split(",") if d]
        bad = len(set(self.dims)) < len(self.dims) or any(d in RESERVED or d.startswith("sigma_") for d in self.dims)
        if bad or not (self.dims or verifier):  # a Gaussian head needs a dimension: the overall fuses them
            raise ValueError(f"--dims must be distinct names, 1 or more, not {RESERVED} nor sigma_*: {self.dims}")
        with torch.random.fork_rng(devices=[]):  # new embedding rows and LoRA init: the same in every process
            torch.manual_seed(flags["seed"])
            self.reward_id = None if verifier else self._add_reward_token(backbone)
            if full:
                backbone.requires_grad_(True)
                out_emb = backbone.get_output_embeddings()  # unused by the head; DDP rejects trainable unused weights
                out_emb.requires_grad_(out_emb.weight is backbone.get_input_embeddings().weight)
                backbone.model.visual.requires_grad_(flags["vision"] == "train")
            elif weights or flags["stage"] != "eval":  # scoring a base or published model needs no new adapter
                backbone = setup_lora(backbone, flags["lora_rank"], flags["lora_alpha"], flags["lora_dropout"],
                                      flags["lora_targets"], flags["vision"])
            else:  # nothing trains: the weights stay in their dtype (below, trainable ones become fp32)
                backbone.requires_grad_(False)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(flags["seed"])
            width = backbone.config.get_text_config().hidden_size
            self.head = None if verifier else GaussianHead(width, len(self.dims), flags["head_hidden"])
        if flags["grad_checkpointing"] == "on" or flags["grad_checkpointing"] == "auto" and device.type == "cuda":
            # transformers checkpoints a layer only in training mode, so every training forward runs in train()
            backbone.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        self.backbone, self.compute_dtype = backbone, resolve_dtype(self.flags["dtype"], device)
        for p in self.parameters():  # AdamW updates below bf16's resolution would round away: trained weights stay
            p.data = p.data.float() if p.requires_grad else p.data.to(self.compute_dtype)  # fp32, under autocast
        self.to(device)
        self.load_weights(weights) if weights else None

    def _add_reward_token(self, backbone):
        """The reward token joins the vocabulary (-> its id); its embedding row, the only trained one, is put in place
        by a hook."""
        tok, token = self.processor.tokenizer, self.flags["reward_token"]
        tok.add_special_tokens({"additional_special_tokens": [token]}, replace_extra_special_tokens=False)
        reward_id = tok.convert_tokens_to_ids(token)
        if reward_id >= backbone.get_input_embeddings().num_embeddings:
            backbone.resize_token_embeddings(len(tok), mean_resizing=False)
        self.reward_row = nn.Parameter(backbone.get_input_embeddings().weight[reward_id].detach().float().clone())
        backbone.get_input_embeddings().register_forward_hook(self._insert_reward_row)
        return reward_id

    def _insert_reward_row(self, module, inputs, output):
        return torch.where((inputs[0] == self.reward_id).unsqueeze(-1), self.reward_row.to(output.dtype), output)

    def autocast(self):
        return torch.autocast(self.device.type, torch.bfloat16, enabled=self.compute_dtype == torch.bfloat16)

    device = property(lambda self: next(self.parameters()).device)

    def encode(self, sources, instructions, edited, per_dim=False, origins=None):
        """Processor batches (CPU) of B prompts: the instruction, the source image(s), the edit and what to rate,
        ending in the reward token; one batch for all dimensions, or with per_dim (or a --prompt_file, whose templates
        replace this text) one per dimension (EditReward). origins: each edit's file and row, for decode errors."""
        pics, batches = [[load_image(s, o) for s in as_list(src)] + [load_image(ed, o)] for src, ed, o in
                         zip(sources, edited, origins or [""] * len(edited), strict=True)], []
        for what in self.dims if per_dim or self.prompts else [", ".join(self.dims)]:
            texts, images = [], []
            for src, instr in zip(pics, instructions, strict=True):  # each image decoded once, for every dimension
                if self.prompts:  # a --prompt_file template (as EditReward's): the images, then its text
                    content = [{"type": "image"}] * len(src) + [
                        {"type": "text", "text": self.prompts[what].replace("{instruction}", instr)}]
                else:  # the instruction first, so that in a causal model the image tokens can already look for it
                    content = ([{"type": "text", "text": f"Instruction: {instr}\nSource:"}] + [{"type": "image"}] * (
                        len(src) - 1) + [{"type": "text", "text": " Edited:"}, {"type": "image"},
                                         {"type": "text", "text": f"\nRate the edit's {what.replace('_', ' ')}."}])
                chat = self.processor.apply_chat_template([{"role": "user", "content": content}], tokenize=False,
                                                          add_generation_prompt=True)  # the token ends it unless placed
                texts.append(chat if self.flags["reward_token"] in chat else chat + self.flags["reward_token"])
                images += src
            batches.append(dict(self.processor(text=texts, images=images, padding=True, return_tensors="pt")))
        return batches

    def forward(self, batches):
        """batches from encode() -> mu, log_sigma (B, D); with one batch per dimension, column d comes from batch d."""
        cols = []
        for batch in batches:
            batch = {k: v.to(self.device) for k, v in batch.items()}
            if self.flags.get("text_positions"):  # 1D positions on all three rotary axes (see load_editreward)
                batch["position_ids"] = (batch["attention_mask"].cumsum(-1) - 1).clamp(min=0).expand(3, -1, -1)
            with self.autocast():
                hidden = unwrap(self.backbone).model(**batch, use_cache=False).last_hidden_state
            cols.append(self.head(pool_hidden(hidden, batch["input_ids"], batch["attention_mask"], self.reward_id)))
        if len(cols) == 1:
            return cols[0]
        return tuple(torch.stack([c[i][:, d] for d, c in enumerate(cols)], -1) for i in (0, 1))

    def verifier_scores(self, sources, instructions, edited, num_samples, seed, batch_size):
        """Avg@K: num_samples answers per prompt from one shared prefill, pass i seeded seed + i (as EditScore), to the
        verifier's prompt or to the EditScore rubric's two (the edit with its source(s); the edit alone), batch_size
        edits' prompts decoded as one batch -> score()'s dict; principles outside self.dims are dropped, so every call
        has the same keys."""
        tok, rubric, rows = self.processor.tokenizer, self.flags["rubric"] == "editscore", []
        prompts, qwen3 = self.prompts or EDITSCORE_PROMPTS, self.backbone.config.model_type.startswith("qwen3")
        # the rubric decodes as EditScore's generate() call: with the model's eos ids and repetition penalty; the
        # verifier's own prompt as GCPO samples it
        gen, im_end = self.backbone.generation_config, tok.convert_tokens_to_ids("<|im_end|>")
        eos, rp = (gen.eos_token_id or im_end, gen.repetition_penalty or 1.0) if rubric else (im_end, 1.0)
        def answers(prompts):  # [(images, text)] -> their num_samples answers each, prompt by prompt, one batch
            # EditScore's scorers label images "<img1>: ", ... (Qwen2.5-VL) or not (Qwen3-VL)
            labels = [["" if qwen3 else f"<img{i}>: " for i in range(1, len(ims) + 1)] for ims, _ in prompts]
            encs = [encode_prompt(self.processor, ims, text, lab if rubric else None)
                    for (ims, text), lab in zip(prompts, labels)]
            batch = collate(encs, [[]] * len(encs), tok.pad_token_id)[0]  # left-padded to one length
            seeds = [seed + i for _ in encs for i in range(num_samples)]
            with self.autocast():
                toks, _, mask = sample_shared_prefill(self.backbone, batch, seeds, eos, self.flags["max_new_tokens"],
                                                      SCORE_TEMPERATURE, TOP_K, TOP_P, rp)
            return [tok.decode(t[m.bool()], skip_special_tokens=True) for t, m in zip(toks, mask)]
        edits = list(zip(sources, instructions, edited, strict=True))  # a list each, of equal lengths
        for lo in range(0, len(edits), batch_size):
            pics, texts = [], []
            for src, ins, ed in edits[lo:lo + batch_size]:
                ims = [load_image(x) for x in as_list(src)]  # EditScore's evaluation.py sizes the edit as the source
                pics.append(ims + [load_image(ed).resize(ims[0].size) if rubric else load_image(ed)])
                texts.append(ins)
            if rubric:  # str.replace, not format: the rubric holds JSON braces
                sc = answers([(ims, prompts["SC"].replace("{instruction}", ins)) for ims, ins in zip(pics, texts)])
                rows += [(parse_editscore_output(a) or [math.nan] * 2)[:2] + [min(parse_editscore_output(b, 1) or
                         [math.nan])] * 2 for a, b in zip(sc, answers([(ims[-1:], prompts["PQ"]) for ims in pics]))]
            for r in [] if rubric else answers([(ims, VERIFIER_PROMPT.replace("{instruction}", ins))
                                                for ims, ins in zip(pics, texts)]):
                r = parse_verifier_output(r) or {"score": math.nan, "principles": {}}
                rows.append([r["score"]] + [r["principles"].get(p, math.nan) for p in self.dims])
        width = 4 if rubric else 1 + len(self.dims)  # SC and PQ pairs, or the score and each principle
        s = torch.tensor(rows, dtype=torch.float32).reshape(len(edited), num_samples, width)  # B may be 0
        if rubric:
            return editscore_aggregate(s[..., :2], s[..., 2:])
        mean = s.nanmean(1)  # over the passes that gave a number; NaN if none did
        return {"overall": mean[:, 0], **{p: mean[:, 1 + j] for j, p in enumerate(self.dims)},
                "unparsed": s[..., 0].isnan().sum(1).float()}

    @torch.no_grad()
    def score(self, sources, instructions, edited, num_samples=1, batch_size=8, seed=SCORE_SEED):
        """Scores for B edits -> dict of (B,) float CPU tensors. gaussian: "overall", one per dimension (mu) and the
        sigmas "sigma_<dim>", "sigma_overall". verifier: "overall" (0..10) and one per principle, each averaged over
        the num_samples passes that parsed (Avg@K), and "unparsed" (passes that did not). batch_size edits a forward
        (verifier: decoded together)."""
        was_training = self.training
        self.eval()
        if self.mode == "verifier":
            seed = SCORE_SEED if seed is None else seed
            out = self.verifier_scores(sources, instructions, edited, num_samples, seed, batch_size)
        else:
            names, cols = self.dims + ["overall"] + [f"sigma_{d}" for d in self.dims + ["overall"]], []
            for i in range(0, len(edited), batch_size):
                sl = slice(i, i + batch_size)
                mu, ls = self(self.encode(sources[sl], instructions[sl], edited[sl], self.flags["per_dim_prompts"]))
                mu_o, ls_o = fuse_gaussians(mu, ls)
                cols.append(torch.cat([mu, mu_o[:, None], ls.exp(), ls_o.exp()[:, None]], -1).float().cpu())
            table = torch.cat(cols) if cols else torch.zeros(0, len(names))
            out = {n: table[:, j] for j, n in enumerate(names)}
        self.train(was_training)
        return out

    def save_weights(self, path):  # peft adapter or full weights via save_pretrained, head + reward row as safetensors
        kw = {"save_embedding_layers": False} if hasattr(self.backbone, "peft_config") else {}  # no 1 GB lm_head copy
        self.backbone.save_pretrained(os.path.join(path, "backbone"), **kw)
        if self.init_dir:  # GCPO: its SFT model travels with it in init/ (that run's folder may move or be retrained)
            keep = ("args.json", "backbone", "init")  # the model, not that run's optimizer state
            shutil.copytree(self.init_dir, os.path.join(path, "init"),
                            ignore=lambda d, names: [n for n in names if d == self.init_dir and n not in keep])
        if self.prompts:  # the templates it was trained with travel with it (the --prompt_file may not)
            with open(os.path.join(path, "prompts.json"), "w", encoding="utf-8") as f:
                json.dump(self.prompts, f, indent=1)
        if self.head is not None:
            extra = {f"head.{k}": v for k, v in self.head.state_dict().items()} | {"reward_row": self.reward_row}
            save_file({k: v.detach().contiguous().cpu() for k, v in extra.items()},
                      os.path.join(path, "head.safetensors"))

    def load_weights(self, path):
        """Adapter (LoRA runs), head and reward row from a checkpoint; full backbones load in __init__."""
        if self.flags["finetune"] == "lora":
            load_adapter(self.backbone, f"{path}/backbone/adapter_model.safetensors", self.flags["model"])
        if self.head is not None:
            extra = load_file(os.path.join(path, "head.safetensors"), device=str(self.device))
            self.head.load_state_dict({k.removeprefix("head."): v for k, v in extra.items() if k.startswith("head.")})
            self.reward_row.data.copy_(extra["reward_row"])

    @classmethod
    def from_pretrained(cls, path, device="cpu", **overrides):
        """The one place that recognises what `path` holds: a checkpoint folder of this script (its args.json says
        which mode); a published EditScore adapter or EditReward checkpoint (a folder or hub repo); "tiny" (a random
        tiny Gaussian model); or, with mode="verifier", any base VLM (hub name, folder, "tiny"), which then scores
        zero-shot (rubric="editscore": as EditScore's scorers). overrides replace flags, e.g. max_new_tokens=512,
        prompt_file="prompts.json", model=<base VLM>; a None override is none (callers pass optional flags through)."""
        defaults, overrides = vars(parser.parse_args([])), {k: v for k, v in overrides.items() if v is not None}
        if os.path.exists(os.path.join(path, "args.json")):
            flags = json.load(open(os.path.join(path, "args.json")))
            if os.path.isfile(own := os.path.join(path, "prompts.json")):  # its own copy of its --prompt_file
                flags["prompt_file"] = own
            if overrides.get("mode", flags["mode"]) != flags["mode"]:
                raise ValueError(f"{path} holds a {flags['mode']} reward model, not a {overrides['mode']} one")
            return cls({**defaults, **flags, **overrides}, device, weights=path).eval()
        if published := published_layout(path):
            kind, where = published
            mode = "verifier" if kind == "editscore" else "gaussian"  # EditScore writes its scores; EditReward: heads
            if overrides.get("mode", mode) != mode:
                raise ValueError(f"{path} holds {kind}'s {mode} reward model, not a {overrides['mode']} one")
            return (load_editscore if kind == "editscore" else load_editreward)(cls, where, defaults, overrides, device)
        mode = overrides.get("mode", "gaussian")
        if mode == "gaussian" and path not in TINY_MODELS:
            raise FileNotFoundError(f"{path}: not a reward model: no args.json (ours), no adapter_config.json (an "
                                    "EditScore adapter), no model.pth / model.safetensors with rm_heads.* (EditReward);"
                                    " with mode='verifier' (bench.py --rubric) any VLM scores zero-shot")
        scorer = editscore_flags(path) if mode == "verifier" and overrides.get("rubric") == "editscore" else {}
        return cls({**defaults, **preset(mode, mode == "gaussian"), **scorer, "model": path, "stage": "eval",
                    **overrides}, device).eval()

def as_list(src):
    return list(src) if isinstance(src, (list, tuple)) else [src]

def read_prompts(path):
    """A --prompt_file: a JSON object of templates (name -> text), one of which says {instruction}."""
    try:
        prompts = json.load(open(path, encoding="utf-8"))
    except (OSError, ValueError) as e:  # a bad file names itself: JSON's own message does not
        raise ValueError(f"{path}: not a readable JSON --prompt_file: {e}") from None
    if not isinstance(prompts, dict) or not prompts or not all(isinstance(v, str) for v in prompts.values()):
        raise ValueError(f"{path}: a --prompt_file is a JSON object of templates, name -> text")
    if not any("{instruction}" in v for v in prompts.values()):
        raise ValueError(f"{path}: no template says {{instruction}} (write it for the authors' {{text_prompt}} or "
                         "<instruction>, or the edits are scored without their instruction)")
    return prompts

# --- the published reward models: EditScore's LoRA adapters and EditReward's checkpoints -------------------------
EDITREWARD_TOKEN, EDITREWARD_BASE = "<|Reward|>", "Qwen/Qwen2.5-VL-7B-Instruct"  # its token; its 7B model's base
EDITREWARD_PIXELS = 256 * 28 * 28  # its Qwen2.5-VL inferencer gives every image exactly this area (min = max pixels)
EDITSCORE_PIXELS = dict(min_pixels=4 * 28 * 28, max_pixels=16384 * 28 * 28)  # its Qwen2.5-VL scorer: qwen_vl_utils'

# Both papers' Qwen3-VL code keeps the processor's image bounds: apply_chat_template ignores a message's min/max_pixels
def model_type(name):  # a VLM's, before it loads
    from transformers import AutoConfig
    return TINY_MODELS.get(name) or AutoConfig.from_pretrained(name).model_type

def editscore_flags(base):  # EditScore's scorers (its adapters, or a base VLM zero-shot): 512-token answers, its bounds
    qwen3 = model_type(base).startswith("qwen3")
    return {"max_new_tokens": 512, **(dict(min_pixels=None, max_pixels=None) if qwen3 else EDITSCORE_PIXELS)}

def published_layout(path):
    """("editscore" | "editreward", local file or folder) if path, a folder or hub repo, holds a peft adapter
    (adapter_config.json) or a state dict with EditReward's heads (model.pth, or model.safetensors with rm_heads.*)."""
    if path in TINY_MODELS:
        return None
    if not os.path.isdir(path):  # a hub repo: fetch the files that tell (and, for these two, are the weights)
        from huggingface_hub import snapshot_download
        try:
            path = snapshot_download(path, allow_patterns=["adapter_*", "README.md", "model.pth", "model.safetensors"])
        except Exception:  # offline, or not a repo: not a published reward model; the caller says what is wrong
            return None
    if os.path.exists(os.path.join(path, "adapter_config.json")):
        return "editscore", path
    pth, st = os.path.join(path, "model.pth"), os.path.join(path, "model.safetensors")
    if os.path.exists(pth) or os.path.exists(st) and any(k.startswith("rm_heads.") for k in safe_open(st, "pt").keys()):
        return "editreward", pth if os.path.exists(pth) else st
    return None

def current_key(key):
    """A key saved before transformers 4.52 (language model at model.*, vision tower at visual.*) in today's layout
    (model.language_model.*, model.visual.*); peft's base_model.model. prefix stays, today's keys pass unchanged."""
    peft, key = re.fullmatch(r"(base_model\.model\.)?(.*)", key).groups()
    key = re.sub(r"^visual\.", "model.visual.", key)
    return (peft or "") + re.sub(r"^model\.(?!language_model\.|visual\.)", "model.language_model.", key)

def load_adapter(model, file, base):
    """peft adapter weights (keys of any transformers layout) into a peft model; a key that fits nothing is an error."""
    from peft import set_peft_model_state_dict
    adapter = {current_key(k): v for k, v in load_file(file, device=str(next(model.parameters()).device)).items()}
    if bad := set_peft_model_state_dict(model, adapter).unexpected_keys:
        raise ValueError(f"{file}: adapter weights that fit no module of {base}: {bad[:3]}")

def load_editscore(cls, folder, defaults, overrides, device):
    """EditScore (VectorSpaceLab/EditScore): a peft LoRA over a Qwen-VL, merged into it (as the authors' loader does)
    and scored with the EditScore rubric (0-25 per answer; their scripts' 512-token answers and image bounds). The base
    VLM is model= if given, else the model card's base_model, else adapter_config.json's base_model_name_or_path."""
    from peft import PeftConfig, get_peft_model
    card = os.path.join(folder, "README.md")  # a hub model card names its base_model
    card = re.search(r"^base_model:[ \t]*(?:\n[ \t]*-[ \t]*)?(\S+)", open(card).read(), re.M) \
        if os.path.exists(card) else None
    config = PeftConfig.from_pretrained(folder)
    base = overrides.get("model") or (card[1] if card else config.base_model_name_or_path)
    rm = cls({**defaults, **preset("verifier", False), **editscore_flags(base), "stage": "eval", "rubric": "editscore",
              **overrides, "model": base, "mode": "verifier"}, device)  # a rubric= of the caller's wins, as for ours
    lora = get_peft_model(rm.backbone, config)
    load_adapter(lora, os.path.join(folder, "adapter_model.safetensors"), base)
    rm.backbone = lora.merge_and_unload()
    return rm.eval()

class EditRewardHead(nn.Module):
    """EditReward's heads (TIGER-AI-Lab/EditReward, its Qwen-VL reward model class): rm_heads.head_<d>, one MLP
    Linear-ReLU-Dropout-Linear-ReLU-Linear per dimension (widths read from the checkpoint) -> (mu, log sigma).
    hidden (N, H) -> mu, log_sigma (N, D) in fp32, like GaussianHead."""
    def __init__(self, state):
        super().__init__()
        dims = sorted({int(k.split(".")[1].removeprefix("head_")) for k in state if k.startswith("rm_heads.")})
        linear = lambda d, i: nn.Linear(*state[f"rm_heads.head_{d}.{i}.weight"].shape[::-1])  # noqa: E731
        self.rm_heads = nn.ModuleDict({f"head_{d}": nn.Sequential(
            linear(d, 0), nn.ReLU(), nn.Dropout(HEAD_DROPOUT), linear(d, 3), nn.ReLU(), linear(d, 5)) for d in dims})
        self.load_state_dict({k: v.float() for k, v in state.items() if k.startswith("rm_heads.")})
    def forward(self, h):
        out = torch.stack([head(h.float()) for head in self.rm_heads.values()], 1)  # (N, D, 2)
        return out[..., 0], out[..., 1]

def load_editreward(cls, file, defaults, overrides, device):
    """EditReward: a full state dict (the VLM and its heads, model.pth or model.safetensors) read with one prompt
    per dimension, head d on prompt d (--per_dim_prompts; --prompt_file keys in head order), ending in <|Reward|>;
    a dimension's score is its head's mu, the overall their mean, as in the authors' inferencer. The base VLM is
    model= if given, else the folder itself if it has a config.json, else EDITREWARD_BASE. Their Qwen2.5-VL class
    runs its language model on image embeddings it put in place itself, without image_grid_thw, so its heads were
    trained under 1D positions (the attention mask's cumsum on all three rotary axes): a Qwen2.5-VL is read so."""
    state = torch.load(file, map_location="cpu", weights_only=True) if file.endswith(".pth") else load_file(file)
    state, folder = state.get("model", state), os.path.dirname(file)
    head = EditRewardHead(state)
    names = read_prompts(overrides["prompt_file"]) if overrides.get("prompt_file") else DIMS
    base = overrides.get("model") or (folder if os.path.exists(f"{folder}/config.json") else EDITREWARD_BASE)
    pixels = None if model_type(base).startswith("qwen3") else EDITREWARD_PIXELS  # None: the processor's own
    rm = cls({**defaults, "stage": "eval", "min_pixels": pixels, "max_pixels": pixels,
              **overrides, "model": base, "mode": "gaussian", "per_dim_prompts": True, "reward_token": EDITREWARD_TOKEN,
              "dims": ",".join(list(names)[:len(head.rm_heads)])}, device)
    vlm = {current_key(k): v for k, v in state.items() if not k.startswith("rm_heads.")}
    rows = next(v.shape[0] for k, v in vlm.items() if k.endswith("embed_tokens.weight"))
    if rows != rm.backbone.get_input_embeddings().num_embeddings:  # the authors resized to their tokenizer
        rm.backbone.resize_token_embeddings(rows, mean_resizing=False)
    try:
        rm.backbone.load_state_dict(vlm)
    except RuntimeError as e:
        raise ValueError(f"{file}: its weights do not fit {base}: {str(e)[:400]}") from None
    rm.head, rm.flags["text_positions"] = head.to(rm.device), rm.backbone.config.model_type == "qwen2_5_vl"
    rm.reward_row.data.copy_(rm.backbone.get_input_embeddings().weight[rm.reward_id].float())
    return rm.eval()

# --- training, both modes -----------------------------------------------------------------------------------------
MIN_LR = 0.1  # the cosine schedule ends at this fraction of the peak lr
STEP_SEED_STRIDE = 1000  # torch seed of a step: seed + STEP_SEED_STRIDE * step + rank (dropout and MC noise)
RESUME_FREE = ("resume", "max_steps", "lr_decay_steps", "eval_interval", "log_interval", "micro_batch", "out_dir",
               "device", "val", "val_max")  # how long, how often to evaluate, memory: --resume may change these

def save_checkpoint(out_dir, rm, optimizer, step, args=None):
    """Weights, the model's flags as JSON, the optimizer state and the run's flags (for --resume), written
    atomically: a killed save leaves the last one."""
    from transformers.utils import logging as hf_logging
    def write(tmp):  # no "Writing model shards" bar at every checkpoint; other bars (downloads) and settings stay
        previous = hf_logging.set_tqdm_hook(lambda factory, a, kw: factory(*a, **{**kw, "disable": True}))
        try:
            rm.save_weights(tmp)
        finally:  # a save that raises in a process that goes on (a notebook) leaves its bars as they were
            hf_logging.set_tqdm_hook(previous)
        with open(os.path.join(tmp, "args.json"), "w") as f:
            json.dump(rm.flags, f, indent=1)
        torch.save({"step": step, "optimizer": optimizer.state_dict(), "args": vars(args) if args else {}},
                   os.path.join(tmp, "train_state.pt"))
    atomic_dir(out_dir, write, own=("prompts.json", "init", "head.safetensors"))  # an older run's: not this model's

def resume_state(args, device="cpu"):
    """--resume: out_dir's train state, from a run with the same flags (RESUME_FREE aside); None without --resume or
    before the run's first checkpoint (a fresh start)."""
    path = os.path.join(args.out_dir, "train_state.pt")
    if not (args.resume and os.path.exists(path)):
        if os.path.exists(path):  # a new run's first checkpoint replaces the old run's: said up front
            print0(f"warning: {args.out_dir} holds another run's checkpoint; without --resume this run replaces it")
        print0(f"--resume: no checkpoint in {args.out_dir} yet, from step 0") if args.resume else None
        args.lr_decay_steps = args.lr_decay_steps or args.max_steps  # saved as it is: --resume keeps the schedule
        return None
    state = torch.load(path, map_location=device, weights_only=True)  # on the device: GBs of AdamW
    # the cosine's length is the run's own (more --max_steps go on at its floor) unless --lr_decay_steps says otherwise
    saved = state.get("args", {})
    args.lr_decay_steps = args.lr_decay_steps or saved.get("lr_decay_steps") or saved.get("max_steps", args.max_steps)
    check_resume(args.out_dir, saved, vars(args), RESUME_FREE)
    return state

epoch_order = functools.lru_cache(maxsize=4)(lambda n, seed, epoch: np.random.default_rng([seed, epoch]).permutation(n))

def step_indices(step, n, batch_size, rank, world_size, seed):
    """This rank's item indices at `step`, a pure function of it (a seeded permutation per epoch): resuming needs no
    loader state; each epoch gives every item once over the ranks (a step across two epochs may hold an item twice)."""
    per_rank = batch_size // world_size
    start = step * batch_size + rank * per_rank
    return [int(epoch_order(n, seed, g // n)[g % n]) for g in range(start, start + per_rank)]

def make_optimizer(rm, args):
    """AdamW: the backbone's trainable weights at --lr, the head and reward-token row at --head_lr."""
    is_head = lambda n: n.startswith(("head.", "reward_row"))  # noqa: E731
    groups = [([p for n, p in rm.named_parameters() if p.requires_grad and is_head(n) == h], lr)
              for h, lr in ((False, args.lr), (True, args.head_lr))]
    return torch.optim.AdamW([{"params": ps, "lr": lr, "peak": lr} for ps, lr in groups if ps],
                             weight_decay=0.0, betas=(0.9, args.beta2), foreach=True)

def optimizer_step(optimizer, grad_clip, sum_ranks=False):
    """(sum_ranks: sum the gradients of all ranks, whose losses divide by global counts; the Gaussian mode has DDP),
    clip the global grad norm (0 = off), step, zero. -> the norm."""
    params = [p for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
    for p in params if sum_ranks else []:
        all_sum(p.grad)
    norm = torch.nn.utils.clip_grad_norm_(params, grad_clip or math.inf, foreach=True)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return norm.item()

def train_loop(args, d, rm, items, step_fn, unit, val=None, state=None, build=None):
    """The loop both modes share: step_fn(this rank's items, their ids, step, optimizer, build(those items)) -> (log
    fields, metrics); every eval_interval steps a checkpoint, after a held-out eval on `val` if given; from `state`
    (resume_state's) if given. -> last metrics + "time". build: the step's prompts (images decoded, processor run)."""
    optimizer = make_optimizer(rm, args)
    state = state or {"step": 0, "optimizer": optimizer.state_dict()}
    optimizer.load_state_dict(state["optimizer"])
    step = first = state["step"]
    trainable = sum(p.numel() for g in optimizer.param_groups for p in g["params"])
    print0(f"model {rm.flags['model']} | {args.finetune} | trainable {trainable / 1e6:.3f}M | {len(items)} {unit} "
           f"| world {d.world} | grad accum {-(-args.batch_size // d.world // args.micro_batch)} | from step {step}")
    # a DataLoader worker builds the next steps' prompts on the CPU while this process trains: forked, it inherits the
    # processor and the items, never touches the accelerator and hands the batches over in /dev/shm (in a container:
    # --ipc=host or a --shm-size of a few GB); without fork (Windows) they are built here, in turn
    ctx = "fork" if "fork" in torch.multiprocessing.get_all_start_methods() else None
    ids_at = lambda s: step_indices(s, len(items), args.batch_size, d.rank, d.world, args.seed)  # noqa: E731
    made = lambda s: (s, build([items[i] for i in ids_at(s)]))  # noqa: E731
    ahead = build and iter(torch.utils.data.DataLoader(range(step, args.max_steps), collate_fn=made, batch_size=None,
                                                       num_workers=int(bool(ctx)), multiprocessing_context=ctx))
    res, train_time = {}, 0.0
    while step < args.max_steps:
        t0 = time.perf_counter()
        for g in optimizer.param_groups:  # warmup, then cosine over --lr_decay_steps (default: the whole run)
            g["lr"] = g["peak"] * lr_factor(step, args.warmup_steps, args.lr_decay_steps or args.max_steps, MIN_LR)
        torch.manual_seed(args.seed + STEP_SEED_STRIDE * step + d.rank)  # a function of (step, rank): exact resume
        ids = ids_at(step)
        built, prompts = next(ahead) if ahead else (step, None)
        assert built == step, f"the prompt worker built step {built}, the loop is at step {step}"
        fields, res = step_fn([items[i] for i in ids], ids, step, optimizer, prompts)
        step, train_time = step + 1, train_time + time.perf_counter() - t0
        line = (f"step {step}/{args.max_steps} | {fields} | lr {optimizer.param_groups[0]['lr']:.2e} "
                f"| {(step - first) * args.batch_size / train_time:.1f} {unit}/s | train {train_time:.0f}s")
        if step % args.eval_interval == 0 or step == args.max_steps:  # evaluation and saving are not timed
            if val is not None:
                res["val"] = evaluate(rm, val, 2 * args.micro_batch, d.rank, d.world)
                line += " | val " + held_out_line(res["val"])
            if d.master:
                save_checkpoint(args.out_dir, rm, optimizer, step, args)
            dist.barrier() if d.ddp else None  # nobody reads a half-written checkpoint
        if step % args.log_interval == 0 or step % args.eval_interval == 0 or step == args.max_steps:
            print0(line)
    return res | {"time": train_time}

def pair_prefs(pairs, dims):
    """(B, D + 1) preferences of preferred over rejected, each dimension then overall (without an "overall" label:
    +1, unless the pair is tied or a tie-disentangled sample)."""
    tied = [p.tie or p.meta.get("disentangled", False) for p in pairs]
    rows = [[p.prefs.get(d, 0) for d in dims] + [p.prefs.get("overall", 0 if t else 1)] for p, t in zip(pairs, tied)]
    return torch.tensor(rows, dtype=torch.long).reshape(len(pairs), len(dims) + 1)

def evaluate(rm, pairs, batch_size, rank=0, world_size=1, num_samples=1):
    """Held-out strict pairwise accuracy per dimension and overall with RewardModel.score (as bench.py), pairs split
    over ranks. Gaussian: + "sigma_<dim>", geometric means. Verifier (overall only): + "tied", the share of pairs
    scored equal or unparsed (an image-blind model ties them all: both sides share seeds), and "parse"."""
    mine, verifier = pairs[rank::world_size], rm.mode == "verifier"
    src, ins, ed = [p.sources for p in mine] * 2, [p.instruction for p in mine] * 2, [p.preferred for p in mine] + [
        p.rejected for p in mine]  # batch by batch, a bar on rank 0: a 7B verifier's Avg@K takes minutes
    parts = [rm.score(src[i:i + batch_size], ins[i:i + batch_size], ed[i:i + batch_size], num_samples, batch_size)
             for i in tqdm(range(0, len(ed), batch_size), "held-out eval", disable=rank > 0, delay=5, leave=False)]
    scores = {k: torch.cat([p[k] for p in parts]) for k in parts[0]} if parts else rm.score([], [], [])
    names = ([] if verifier else rm.dims) + ["overall"]
    prefs = pair_prefs(mine, names[:-1])
    a_b = lambda s: s.chunk(2) if mine else (s, s)  # noqa: E731
    counts = [pairwise_accuracy(*a_b(scores[d]), prefs[:, j]) for j, d in enumerate(names)]
    if verifier:
        (a, b), passes = a_b(scores["overall"]), 2 * len(mine) * num_samples
        tied = ((a == b) | a.isnan() | b.isnan()) & (prefs[:, -1] != 0)
        counts += [(int(tied.sum()), counts[-1][1]), (passes - int(scores["unparsed"].sum()), passes)]
        names += ["tied", "parse"]
    else:
        counts += [(float(scores[f"sigma_{d}"].log().sum()), len(scores[d])) for d in rm.dims]
        names += [f"sigma_{d}" for d in rm.dims]
    counts = all_sum(torch.tensor(counts, dtype=torch.float64))
    out = {d: (c[0] / c[1]).item() if c[1] else float("nan") for d, c in zip(names, counts)}
    return {d: math.exp(v) if d.startswith("sigma_") else v for d, v in out.items()}

def held_out_line(res, sep=" "):
    sig = " ".join(f"{d.removeprefix('sigma_')} {v:.2f}" for d, v in res.items() if d.startswith("sigma_"))
    return sep.join(f"{d} {a:.3f}" for d, a in res.items() if not d.startswith("sigma_")) + (sig and " | sigma " + sig)

# --- gaussian training --------------------------------------------------------------------------------------------
def encode_pairs(rm, pairs, per_dim=False):
    """The processor batches of B pairs: the preferred and the rejected edits as one batch of 2B."""
    return rm.encode([p.sources for p in pairs] * 2, [p.instruction for p in pairs] * 2,
                     [p.preferred for p in pairs] + [p.rejected for p in pairs], per_dim, [p.origin for p in pairs] * 2)

def train_step(model, rm, optimizer, micro_batches, args, encoded=None):
    """One optimizer step over this rank's micro-batches (gradient accumulation; DDP syncs on the last one); encoded:
    their encode_pairs() batches if made ahead. -> the mean loss over every (pair, dimension) term of all ranks."""
    weights = torch.ones(len(rm.dims) + 1, device=rm.device)  # each dimension and the fused overall count once
    total, prefs = torch.zeros((), device=rm.device), [pair_prefs(p, rm.dims).to(rm.device) for p in micro_batches]
    # the gradient of the mean over every rank's terms, the same at any --micro_batch (DDP averages over ranks)
    n_all = all_sum(sum(((p != 0).float() @ weights).sum() for p in prefs)).clamp(min=1)
    scale = (dist.get_world_size() if dist.is_initialized() else 1) / n_all
    for i, pairs in enumerate(micro_batches):
        last = i == len(micro_batches) - 1
        with model.no_sync() if isinstance(model, nn.parallel.DistributedDataParallel) and not last else nullcontext():
            # the preferred and the rejected edits as one batch of 2B; the fused overall is the last column (B, D + 1)
            mu, ls = model(encoded[i] if encoded else encode_pairs(rm, pairs, args.per_dim_prompts))
            mu, ls = (torch.cat([x, o[:, None]], -1).chunk(2) for x, o in zip((mu, ls), fuse_gaussians(mu, ls)))
            loss_sum, _ = preference_loss(mu[0], ls[0], mu[1], ls[1], prefs[i], weights, args.loss)
            (loss_sum * scale).backward()
        total += loss_sum.detach()
    optimizer_step(optimizer, args.grad_clip)
    return (all_sum(total) / n_all).item()

def train_gaussian(args, d):
    """Train the Gaussian reward model on the pairs of --train, evaluating on --val; returns it."""
    per = args.batch_size // d.world  # a rank's share of a step; one below --micro_batch is a single forward
    if args.batch_size % d.world or per % min(args.micro_batch, per):
        raise SystemExit(f"--batch_size {args.batch_size} must split into {d.world} ranks x whole --micro_batch")
    train_pairs, val_pairs = load_pairs(args.train), load_pairs(args.val)[:args.val_max or None]
    dims = [x for x in args.dims.split(",") if x]  # a dimension no pair ranks would train a head column on nothing
    ranked = (pair_prefs(train_pairs, dims) != 0).sum(0).tolist()  # strict preferences per dimension, overall
    if unranked := [x for x, n in zip(dims, ranked) if n == 0]:
        found = sorted({k for p in train_pairs for k, v in p.prefs.items() if v != 0 and k != "overall"})
        raise SystemExit(f"{args.train}: no training pair ranks --dims {unranked} "
                         f"(its pairs rank {found or 'overall only'})")
    print0(f"{len(train_pairs)} train pairs ({', '.join(f'{x} {n}' for x, n in zip(dims + ['overall'], ranked))} "
           f"ranked) | {len(val_pairs)} val pairs")
    state = resume_state(args, d.device)
    rm = RewardModel(vars(args), d.device, weights=args.out_dir if state else None).train()
    model = nn.parallel.DistributedDataParallel(rm) if d.ddp else rm
    mbs = lambda pairs: [pairs[j:j + args.micro_batch] for j in range(0, len(pairs), args.micro_batch)]  # noqa: E731
    build = lambda pairs: [encode_pairs(rm, mb, args.per_dim_prompts) for mb in mbs(pairs)]  # noqa: E731
    def step_fn(pairs, ids, step, opt, built):
        return f"loss {train_step(model, rm, opt, mbs(pairs), args, built):.6f}", {}
    res = train_loop(args, d, rm, train_pairs, step_fn, "pairs", val_pairs, state, build)
    acc = res.get("val") or evaluate(rm, val_pairs, 2 * args.micro_batch, d.rank, d.world)
    print0("final held-out accuracy | " + held_out_line(acc, " | ") + f" | train time {res['time']:.0f}s")
    return rm

# --- verifier training: SFT cold start and GCPO -------------------------------------------------------------------
def sft_prompts(rm, traces):
    """The verifier prompts (processor batches) of CoT traces: source image(s), instruction and edit, errors naming
    the trace's row."""
    return [verifier_prompt(rm.processor, [load_image(s, t.origin) for s in t.sources], t.instruction,
                            load_image(t.edited, t.origin)) for t in traces]

def sft_step(rm, items, micro_batch, prompts=None):
    """One SFT step on CoT traces in micro-batches, loss on response tokens only (prompt and padding masked out);
    the response ends in <|im_end|> so the model learns to stop; prompts: sft_prompts(items) if built ahead.
    -> (loss, global response tokens)."""
    tok = rm.train().processor.tokenizer
    resps = [tok(t.response).input_ids + [tok.convert_tokens_to_ids("<|im_end|>")] for t in items]
    mine, total = sum(map(len, resps)), 0.0
    ntok = all_sum(torch.tensor(float(mine)))  # the loss is the mean over every rank's response tokens
    for i in range(0, len(items), micro_batch):
        encs = prompts[i:i + micro_batch] if prompts else sft_prompts(rm, items[i:i + micro_batch])
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
    """N traces for the preferred and N for the rejected edit of each pair (one shared prefill per image; --micro_batch
    pairs' images decoded as one batch) -> GCPO training rows (prompt, response ids, old log-probs, advantage) and
    counts (sum of r_w, parsed, traces)."""
    tok, N = rm.processor.tokenizer, args.num_traces
    rm.eval()  # sampling with a KV cache, which gradient checkpointing (train mode) would switch off
    rows, stats, todo = [], torch.zeros(3), list(zip(pair_ids, pairs))
    for chunk in (todo[i:i + args.micro_batch] for i in range(0, len(todo), args.micro_batch)):
        encs, seeds = [], []
        for gid, p in chunk:  # image 2j: pair j's preferred edit, 2j + 1: its rejected one
            srcs = [load_image(s, p.origin) for s in p.sources]
            for side, img in enumerate((p.preferred, p.rejected)):
                encs.append(verifier_prompt(rm.processor, srcs, p.instruction, load_image(img, p.origin)))
                seeds += trace_seeds(args.seed, step, gid, side, N)
        with rm.autocast():
            toks, old, mask = sample_shared_prefill(rm.backbone, collate(encs, [[]] * len(encs), tok.pad_token_id)[0],
                                                    seeds, tok.convert_tokens_to_ids("<|im_end|>"),
                                                    args.max_new_tokens, args.temperature)
        parsed = [parse_verifier_output(tok.decode(t[m.bool()], skip_special_tokens=True)) for t, m in zip(toks, mask)]
        scores = torch.tensor([r["score"] if r else math.nan for r in parsed]).view(len(chunk), 2, N)
        lengths = mask.sum(1).long().tolist()
        for j in range(len(chunk)):
            r_w, r_l = gcpo_rewards(scores[j, 0], scores[j, 1])
            for side, adv in enumerate((group_advantages(r_w), group_advantages(r_l))):
                rows += [(encs[2 * j + side], toks[r, :lengths[r]].tolist(), old[r, :lengths[r]], adv[i])
                         for i, r in enumerate(range((2 * j + side) * N, (2 * j + side + 1) * N))]
            stats += torch.tensor([r_w.sum().item(), (~scores[j].isnan()).sum().item(), 2 * N])
    return rows, stats

def gcpo_update(rm, rows, optimizer, args):
    """--ppo_epochs passes over the rollout rows in micro-batches, one optimizer step per pass.
    -> (loss, clip fraction, kl, grad norm) of the last pass."""
    model = rm.train().backbone
    ntok, refs = all_sum(torch.tensor(float(sum(len(r[1]) for r in rows)))), {}
    for _ in range(args.ppo_epochs):
        tot = torch.zeros(3)  # loss, clipped tokens, kl * tokens
        for i in range(0, len(rows), args.micro_batch):
            mb = rows[i:i + args.micro_batch]
            inputs, resp, rmask = collate([r[0] for r in mb], [r[1] for r in mb], rm.processor.tokenizer.pad_token_id)
            with rm.autocast():
                logp = response_logprobs(model, inputs, resp, args.temperature)
                if args.kl_beta and i not in refs:  # the KL's reference, the SFT policy: fixed, so once a rollout
                    with torch.no_grad(), model.disable_adapter():
                        refs[i] = response_logprobs(model, inputs, resp, args.temperature)
            ref, dev = refs.get(i), logp.device
            old = torch.stack([F.pad(r[2], (0, rmask.shape[1] - len(r[2]))) for r in mb]).to(dev)
            rmask, adv = rmask.to(dev), torch.stack([r[3] for r in mb]).to(dev)
            loss = gcpo_loss(logp, old, adv, rmask, args.clip_eps, ref, args.kl_beta, ntok.to(dev))
            loss.backward()
            with torch.no_grad():  # diagnostics: tokens outside the clip, and the KL (both per token in the log)
                clipped = ((((logp - old).exp() - 1).abs() > args.clip_eps).float() * rmask).sum().item()
                kl = (k3_kl(ref, logp) * rmask).sum().item() if args.kl_beta else 0.0
                tot += torch.tensor([loss.item(), clipped, kl])
        norm = optimizer_step(optimizer, args.grad_clip, sum_ranks=True)
    tot = all_sum(tot)
    return tot[0].item(), tot[1].item() / ntok.item(), tot[2].item() / ntok.item(), norm

def verifier_step(rm, args, items, ids, step, optimizer, prompts=None):
    """One SFT or GCPO step (train_loop's step_fn; prompts: sft_prompts of the SFT step's traces) -> (log fields,
    metrics)."""
    if args.stage == "sft":
        loss, ntok = sft_step(rm, items, args.micro_batch, prompts)
        norm = optimizer_step(optimizer, args.grad_clip, sum_ranks=True)
        return f"loss {loss:.4f} | grad {norm:.2f} | {int(ntok)} tok", {"loss": loss}
    t0 = time.perf_counter()
    rows, st = gcpo_rollout(rm, items, ids, step, args)
    st, t1 = all_sum(st), time.perf_counter()
    loss, clip, kl, norm = gcpo_update(rm, rows, optimizer, args)
    res = {"win": 2 * st[0].item() / st[2].item(), "parse": st[1].item() / st[2].item()}
    return (f"win {res['win']:.3f} | parse {res['parse']:.2f} | loss {loss:.4f} | clip {clip:.3f} | kl {kl:.4f} "
            f"| grad {norm:.2f} | rollout {t1 - t0:.1f}s update {time.perf_counter() - t1:.1f}s"), res

def train_verifier(args, d):
    """--stage sft | gcpo of the verifier mode -> train_loop's metrics."""
    if args.batch_size % d.world:
        raise SystemExit(f"--batch_size {args.batch_size} must divide by the world size {d.world}")
    if args.stage == "sft":  # the data first: a bad row stops the run before the model loads
        items = load_traces(args.train or "data/toy/cot_train.jsonl")
    else:  # a tied pair says nothing about which trace is right
        pairs = load_pairs(path := args.train or "data/toy/gcpo_train.jsonl", disentangle=False)
        if not (items := [p for p in pairs if not p.tie]):
            raise SystemExit(f"{path}: every pair is tied; GCPO needs pairs with a preferred edit")
        print0(f"{path}: {len(pairs) - len(items)} of {len(pairs)} pairs tied, left out of GCPO")
        print0(f"no --init: GCPO starts from {args.model} itself, also the KL's reference") if not args.init else None
    state = resume_state(args, d.device)
    rm = RewardModel(vars(args), d.device, weights=args.out_dir if state else None)
    if args.stage == "sft" and not rm.dims:  # the principles the traces teach become the score keys
        parsed = [parse_verifier_output(t.response) for t in items]  # all: a principle seen late is still one
        rm.dims = list(dict.fromkeys(k for r in parsed if r for k in r["principles"]))
        rm.flags["dims"] = ",".join(rm.dims)
        print0(f"score keys: the {len(rm.dims)} principles the traces name ({', '.join(rm.dims[:8])}"
               f"{', ...' * (len(rm.dims) > 8)}); --dims picks them instead")
    unit = "traces" if args.stage == "sft" else "pairs"
    build = functools.partial(sft_prompts, rm) if args.stage == "sft" else None  # GCPO: generation dominates
    return train_loop(args, d, rm, items, functools.partial(verifier_step, rm, args), unit, state=state, build=build)

def run_toy(args, d):
    """The verifier's CPU demo: SFT, then GCPO from the SFT model, each evaluated on the same held-out pairs with
    Avg@TOY_AVG_K (strict accuracy, and with ties counted 1/2: chance is 0.5)."""
    if d.ddp:
        raise SystemExit("--mode verifier --toy runs in one process; under torchrun run its --stage sft / gcpo")
    data, out = os.path.dirname(args.val), args.out_dir
    pairs = [p for p in load_pairs(args.val, disentangle=False) if not p.tie]  # the overall preference only
    unset = {**vars(parser.parse_args([])), **preset("verifier", True)}  # each flag as --mode verifier --toy sets it
    for name, kw in (("SFT", dict(stage="sft", train=f"{data}/cot_train.jsonl", out_dir=f"{out}/sft", init=None)),
                     ("SFT+GCPO", dict(stage="gcpo", train=f"{data}/gcpo_train.jsonl", out_dir=f"{out}/gcpo",
                                       init=f"{out}/sft"))):
        own = {k: v for k, v in TOY_STAGES[kw["stage"]].items() if getattr(args, k) == unset[k]}  # unless given
        tr = train_verifier(argparse.Namespace(**vars(args) | kw | own), d)
        ev = evaluate(RewardModel.from_pretrained(kw["out_dir"], d.device), pairs, 2 * args.micro_batch,
                      num_samples=TOY_AVG_K)
        print(f"toy {name}: trained {tr['time']:.0f}s | held-out parse {ev['parse']:.3f} | pair acc "
              f"{ev['overall']:.3f} strict, {ev['overall'] + ev['tied'] / 2:.3f} ties 1/2 ({len(pairs)} pairs, "
              f"Avg@{TOY_AVG_K})")

# --- run -----------------------------------------------------------------------------------------------------------
def main(args):
    d = setup_distributed(args.device)
    if args.toy:
        torch.set_num_threads(TOY_THREADS)
        if d.master and not os.path.exists(args.val) and args.val == parser.get_default("val"):  # not a typo's
            make_toy(os.path.dirname(args.val))
    dist.barrier() if d.ddp else None
    torch.manual_seed(args.seed)
    (run_toy if args.toy else train_verifier)(args, d) if args.mode == "verifier" else train_gaussian(args, d)
    leave_distributed() if d.ddp else None

if __name__ == "__main__":
    args, _ = parser.parse_known_args()
    parser.set_defaults(**preset(args.mode, args.toy))
    args = parser.parse_args()
    check_least(parser, args, LEAST)
    parser.error(f"--temperature must be > 0, got {args.temperature}") if not args.temperature > 0 else None  # logits/T
    check_unused(parser, args, MODE_ONLY["verifier" if args.mode == "gaussian" else "gaussian"], f"--mode {args.mode}")
    if args.finetune == "full":  # no adapter to shape
        check_unused(parser, args, ("lora_rank", "lora_alpha", "lora_targets"), "--finetune full")
    main(args)
