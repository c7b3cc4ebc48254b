"""
rm_verifier.py: the chain-of-thought verifier mode of the reward model (`rewardmodel.py --mode verifier`).

A generative reward model that *writes* its judgement: given source image(s), edited image and instruction,
it names the principles the edit must satisfy, verifies each, and ends with one JSON object of scores.
  Edit-R1 verifier (Guo et al., "Leveraging Verifier-Based RL in Image Editing"; REFERENCE.md section 7): the
    reasoning reward model, trained by an SFT cold start on CoT traces (--stage sft), then GCPO, Group
    Contrastive Preference Optimization (--stage gcpo): for a human pair sample N traces for the preferred and
    N for the rejected edit, reward each trace by how often its score lies on the right side of the other
    group's scores, normalise advantages within each group, PPO-clipped token-level surrogate.
  EditScore (arXiv 2509.23909; section 4): the two-prompt rubric (--rubric editscore) that makes any instruct
    VLM a zero-shot scorer, and the Avg@K self-ensemble (mean of K sampled passes).
Answer format (parse_verifier_output): free text, then a final JSON object with a 0..10 number per principle
and "score" (0..10), e.g. data.toy_cot_response:
    recolor: follow 4/4; keep 4/4; quality 2/4
    {"follow": 4, "keep": 4, "quality": 2, "score": 7}
An answer that does not parse is counted ("unparsed"), never replaced by a random or middle score.
Avg@K is cheap: the K passes share ONE prefill of the long image prompt (its KV cache is repeated K times)
and decode as one batch: on the toy Avg@4 costs 1.3x of Avg@1, against 3.3x for 4 independent generations.
Toy (tiny random Qwen2.5-VL, CPU): SFT learns the answer format (held-out parse rate 1.000) but barely
learns to look at the images, so held-out pair accuracy stays near chance (0.47 with ties counted 1/2);
GCPO makes answers more image-dependent (strict accuracy 0.05 -> 0.13, fewer exact ties) but not better
than chance (0.50). The numbers that matter need a real VLM (REFERENCE.md section 7: 73.3% -> 78.2%).
Simplified: prompts are sampled one at a time (their K passes are the batch), no sequence packing, LoRA
(+ optionally the full vision tower), GCPO's KL reference is the SFT model (its adapter merged in).

  python rm_verifier.py --toy        # 2 busy CPU cores, ~11 min: toy data, SFT, eval, GCPO, eval, Avg@K timing
  python rm_verifier.py --stage sft --model tiny --train data/toy/cot_train.jsonl --out_dir out/sft
  python rm_verifier.py --stage gcpo --init out/sft --train data/toy/gcpo_train.jsonl --out_dir out/gcpo
  torchrun --standalone --nproc_per_node=2 rm_verifier.py --stage gcpo --init out/sft --out_dir out/gcpo
  python rm_verifier.py --stage eval --init out/gcpo --val data/toy/pairs_val.jsonl --eval_samples 4 --time_avgk
  python rm_verifier.py --stage eval --model Qwen/Qwen2.5-VL-7B-Instruct --rubric editscore   # zero-shot, GPU
"""
import argparse
import json
import math
import os
import re
import shutil
import time

import torch
import torch.distributed as dist

from data import load_image, load_pairs, load_traces, shard
from rewardmodel import ddp_setup, load_backbone, lr_factor, resolve_dtype, step_indices

SCORE_MAX = 10.0       # verifier scores (per principle and final) live in [0, SCORE_MAX]
EDITSCORE_MAX = 25.0   # EditScore rubric answers are integers 0..25, divided by 2.5 to 0..10


def all_sum(x):
    """Sum a tensor over ranks (a no-op in one process)."""
    if dist.is_initialized():
        dist.all_reduce(x)
    return x


# ----------------------------------------------------------------------------------------------------------
# prompts: the verifier's own, and EditScore's two rubric prompts (our wording)

VERIFIER_PROMPT = "Instruction: {instruction}\nVerify each principle, then JSON scores 0-10."  # short: byte tokens
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


def gcpo_loss(logp, old_logp, adv, mask, clip_eps=0.2, ref_logp=None, beta=0.0, num_tokens=None):
    """Token-level PPO-clipped surrogate over all traces (GCPO's policy loss).
    logp, old_logp, ref_logp, mask: (T, R) per response token of T traces; adv: (T,).
      ratio = exp(logp - old_logp);  l = max(-A ratio, -A clip(ratio, 1-eps, 1+eps)) + beta * KL
    KL is the k3 estimator exp(ref - logp) - (ref - logp) - 1 (>= 0, unbiased for KL(pi || ref)) against the
    reference policy. Averaged over tokens, not traces, so long traces are not down-weighted; num_tokens is
    the global token count when the batch is split over micro-batches or ranks."""
    ratio = (logp - old_logp).exp()
    a = adv[:, None]
    per_tok = torch.maximum(-a * ratio, -a * ratio.clamp(1 - clip_eps, 1 + clip_eps))
    if beta:
        d = ref_logp - logp
        per_tok = per_tok + beta * (d.exp() - d - 1)
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


def _unwrap(model):
    """The HF Qwen2.5-VL model under a peft wrapper (or the model itself)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def answer_logits(model, logits):
    """(..., V) logits with the vision placeholder tokens removed: an answer never contains them (a sampled
    <|image_pad|> would break the next forward), and sampling and training must share one policy."""
    cfg = _unwrap(model).config
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
    hf = _unwrap(model)
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
# scoring (Avg@K), what RewardModel.score calls in verifier mode

def decode_answers(tok, toks, mask):
    """Sampled rows (K, T) -> K answer strings, each cut at its EOS."""
    return [tok.decode(t[m.bool()], skip_special_tokens=True) for t, m in zip(toks, mask)]


def _pass_seeds(seed, k):
    return [seed + i for i in range(k)]  # EditScore's seeds 42 + i for pass i


@torch.no_grad()
def verifier_score(model, processor, sources, instructions, edited, num_samples=1, temperature=0.7, top_p=0.9,
                   top_k=20, max_new_tokens=128, seed=42, principles=()):
    """Avg@K verifier scores. sources: list (B) of PIL or list[PIL]; instructions: list[str]; edited: list[PIL].
    -> dict of (B,) float tensors: "overall" (mean final score of the parsed passes, NaN if none), one key per
    principle, "unparsed" (passes that did not parse), "parsed" (how many did)."""
    tok = processor.tokenizer
    eos = tok.convert_tokens_to_ids("<|im_end|>")
    keys = list(principles)
    rows = []
    for src, ins, ed in zip(sources, instructions, edited):
        src = src if isinstance(src, (list, tuple)) else [src]
        enc = verifier_prompt(processor, src, ins, ed)
        toks, _, mask = sample_shared_prefill(model, enc, _pass_seeds(seed, num_samples), eos, max_new_tokens,
                                              temperature, top_k, top_p)
        parsed = [parse_verifier_output(a) for a in decode_answers(tok, toks, mask)]
        keys += [p for r in parsed if r for p in r["principles"] if p not in keys]
        rows.append(parsed)
    out = {"overall": [], "unparsed": [], "parsed": []} | {p: [] for p in keys}
    for parsed in rows:
        ok = [r for r in parsed if r]
        out["overall"].append(sum(r["score"] for r in ok) / len(ok) if ok else math.nan)
        out["unparsed"].append(len(parsed) - len(ok))
        out["parsed"].append(len(ok))
        for p in keys:
            vals = [r["principles"][p] for r in ok if p in r["principles"]]
            out[p].append(sum(vals) / len(vals) if vals else math.nan)
    return {k: torch.tensor(v, dtype=torch.float32) for k, v in out.items()}


@torch.no_grad()
def editscore_score(model, processor, sources, instructions, edited, num_samples=1, temperature=0.7, top_p=0.9,
                    top_k=20, max_new_tokens=512, seed=42):
    """EditScore rubric, Avg@K: two prompts per edited image, K passes each (one shared prefill per prompt).
    -> editscore_aggregate's dict of (B,) tensors."""
    tok = processor.tokenizer
    eos = tok.convert_tokens_to_ids("<|im_end|>")
    sc, pq = [], []
    for src, ins, ed in zip(sources, instructions, edited):
        src = src if isinstance(src, (list, tuple)) else [src]
        for images, text, dest in ((list(src) + [ed], EDITSCORE_SC_PROMPT.format(instruction=ins), sc),
                                   ([ed], EDITSCORE_PQ_PROMPT, pq)):
            enc = encode_prompt(processor, images, text)
            toks, _, mask = sample_shared_prefill(model, enc, _pass_seeds(seed, num_samples), eos, max_new_tokens,
                                                  temperature, top_k, top_p)
            dest.append([parse_editscore_output(a) or [math.nan] * 2 for a in decode_answers(tok, toks, mask)])
    return editscore_aggregate(torch.tensor(sc, dtype=torch.float32), torch.tensor(pq, dtype=torch.float32))


class VerifierRM:
    """RewardModel's verifier mode behind the same score() API as the Gaussian mode.
    rm = VerifierRM.from_pretrained("out/verifier_toy/gcpo"); rm.score(sources, instructions, edited, num_samples=4)"""
    mode = "verifier"

    def __init__(self, model, processor, meta, rubric="verifier", **sampling):
        self.model, self.processor, self.meta, self.rubric, self.sampling = model, processor, meta, rubric, sampling
        self.dims = (["prompt_following", "consistency", "perceptual_quality"] if rubric == "editscore"
                     else list(meta.get("principles", [])))

    @classmethod
    def from_pretrained(cls, path, device="cpu", rubric="verifier", **sampling):
        """A verifier checkpoint dir, or a base VLM name ("tiny" = random) to use with the EditScore rubric."""
        device = torch.device(device)
        if os.path.exists(os.path.join(path, "verifier.json")):
            return cls(*load_verifier(path, device), rubric, **sampling)
        meta = {"base": path, "parent": None, "dtype": "auto", "min_pixels": None, "max_pixels": None}
        return cls(*build_base(meta, device), meta, rubric, **sampling)

    def score(self, sources, instructions, edited, num_samples=1, batch_size=8):
        """-> dict of (B,) tensors: "overall" (0..10, NaN when no pass parsed), one key per dimension, "unparsed".
        Items are scored one prompt at a time (its K passes are the batch), so batch_size is not used."""
        fn = editscore_score if self.rubric == "editscore" else verifier_score
        kw = self.sampling if self.rubric == "editscore" else self.sampling | {"principles": self.dims}
        return fn(self.model, self.processor, sources, instructions, edited, num_samples, **kw)


def score_images(model, processor, sources, instructions, edited, args, num_samples):
    """The configured scorer (--rubric) with the scoring flags: verifier or EditScore rubric."""
    kw = dict(num_samples=num_samples, temperature=args.score_temperature, top_p=args.top_p, top_k=args.top_k,
              max_new_tokens=args.max_new_tokens, seed=args.score_seed)
    if args.rubric == "editscore":
        return editscore_score(model, processor, sources, instructions, edited, **kw)
    return verifier_score(model, processor, sources, instructions, edited, **kw)


def pair_accuracy(model, processor, pairs, args, rank=0, world=1):
    """Held-out pairwise accuracy of the Avg@K overall score over the first --eval_pairs non-tied pairs,
    sharded over ranks: strict (equal or unparsed scores count as wrong, as on EditReward-Bench) and with
    ties counted 1/2 (a model blind to the images scores 0.5 there, but ~0 strict: the passes of both
    images share seeds, so a blind model writes the same answer twice). Also the parse rate of all passes."""
    pairs = shard([p for p in pairs if not p.tie][:args.eval_pairs], rank, world)
    stats = torch.zeros(5)  # right, tied, pairs, unparsed passes, passes
    for p in pairs:
        srcs = [load_image(s, p.origin) for s in p.sources]
        imgs = [load_image(p.preferred, p.origin), load_image(p.rejected, p.origin)]
        s = score_images(model, processor, [srcs, srcs], [p.instruction] * 2, imgs, args, args.eval_samples)
        a, b = s["overall"].tolist()
        # a pass of the EditScore rubric is both of its prompts; "unparsed" counts passes either way
        stats += torch.tensor([float(a > b), float(a == b or math.isnan(a) or math.isnan(b)), 1.0,
                               s["unparsed"].sum().item(), 2.0 * args.eval_samples])
    stats = all_sum(stats)
    n = stats[2].clamp(min=1)
    return {"acc": (stats[0] / n).item(), "acc_tie_half": ((stats[0] + 0.5 * stats[1]) / n).item(),
            "parse": 1.0 - (stats[3] / stats[4].clamp(min=1)).item(), "pairs": int(stats[2])}


def time_avg_at_k(model, processor, pairs, args, k=4, n_items=8):
    """Wall time of Avg@1, Avg@K with one shared prefill, and K independent generations on the same items."""
    items = [p for p in pairs if not p.tie][:n_items]
    srcs = [[load_image(s, p.origin) for s in p.sources] for p in items]
    ins = [p.instruction for p in items]
    eds = [load_image(p.preferred, p.origin) for p in items]
    times = {}
    for name, runs in (("avg1", [(1, args.score_seed)]), (f"avg{k}", [(k, args.score_seed)]),
                       (f"indep{k}", [(1, args.score_seed + i) for i in range(k)])):
        t0 = time.perf_counter()
        for n, seed in runs:
            score_images(model, processor, srcs, ins, eds, argparse.Namespace(**vars(args) | {"score_seed": seed}), n)
        times[name] = time.perf_counter() - t0
    return times


# ----------------------------------------------------------------------------------------------------------
# checkpoints: a peft adapter + verifier.json (+ trainer.pt to resume). A GCPO adapter sits on top of the
# SFT model with the SFT adapter merged in ("parent"), so disabling it gives the SFT policy: the KL reference.

def add_lora(model, rank, alpha, targets, train_vision=False):
    """A fresh LoRA adapter on the named linear layers of the language model and on lm_head; the vision tower
    stays frozen unless train_vision (then it is trained in full and saved beside the adapter). The output
    layer matters: with a frozen vocabulary projection a model cannot sharpen its next-token distribution
    much (the tiny random one cannot learn the answer template at all). No dropout: the sampling pass and
    the training pass must see the same policy for the PPO ratio."""
    from peft import LoraConfig, get_peft_model
    names = "|".join([t.strip() for t in targets.split(",") if t.strip()] + ["lm_head"])
    cfg = LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=0.0, target_modules=rf"^(?!.*visual)(.*\.)?({names})$",
                     modules_to_save=["visual"] if train_vision else None)
    return get_peft_model(model, cfg)


def build_base(meta, device):
    """The base VLM of a verifier (meta: base name, dtype, pixel bounds) -> (model, processor)."""
    model, processor = load_backbone(meta["base"], resolve_dtype(meta["dtype"], device), meta["min_pixels"],
                                     meta["max_pixels"])
    return model.to(device).eval(), processor


def load_verifier(path, device="cpu", trainable=False):
    """Checkpoint dir -> (peft model, processor, meta); its parents are merged into the base first."""
    from peft import PeftModel
    with open(os.path.join(path, "verifier.json")) as f:
        meta = json.load(f)
    if meta["parent"]:
        parent, processor, _ = load_verifier(meta["parent"], device)
        base = parent.merge_and_unload()
    else:
        base, processor = build_base(meta, device)
    return PeftModel.from_pretrained(base, path, is_trainable=trainable).to(device).eval(), processor, meta


def save_verifier(out, model, meta, opt=None, step=0):
    """Adapter + verifier.json (+ optimizer and step for --resume), written to a temp dir then renamed."""
    tmp = out.rstrip("/") + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    with open(os.path.join(tmp, "verifier.json"), "w") as f:
        json.dump(meta | {"step": step}, f, indent=1)
    if opt is not None:
        torch.save({"opt": opt.state_dict(), "step": step}, os.path.join(tmp, "trainer.pt"))
    shutil.rmtree(out, ignore_errors=True)
    os.replace(tmp, out)


# ----------------------------------------------------------------------------------------------------------
# training: SFT cold start and GCPO

def _trace_batch(processor, items):
    """CoT traces -> prompt encodings and response ids (+ <|im_end|>: the model learns to stop)."""
    eos = processor.tokenizer.convert_tokens_to_ids("<|im_end|>")
    encs = [verifier_prompt(processor, [load_image(s, t.origin) for s in t.sources], t.instruction,
                            load_image(t.edited, t.origin)) for t in items]
    return encs, [processor.tokenizer(t.response).input_ids + [eos] for t in items]


def _step_grads(params, opt, grad_clip):
    """Sum gradients over ranks (each rank's loss is already divided by the global token count), clip, step."""
    if dist.is_initialized():
        for p in params:
            dist.all_reduce(p.grad)
    norm = torch.nn.utils.clip_grad_norm_(params, grad_clip)
    opt.step()
    opt.zero_grad(set_to_none=True)
    return norm.item()


def sft_step(model, processor, items):
    """One SFT step on response tokens only (prompt and padding masked out). -> loss, response tokens."""
    encs, resps = _trace_batch(processor, items)
    inputs, resp, rmask = collate(encs, resps, processor.tokenizer.pad_token_id)
    logp = response_logprobs(model, inputs, resp)
    ntok = all_sum(rmask.sum().clone())
    loss = -(logp * rmask.to(logp.device)).sum() / ntok.to(logp.device)
    loss.backward()
    return loss.item() * ntok.item() / max(rmask.sum().item(), 1), ntok.item()


def gcpo_rollout(model, processor, pairs, pair_ids, step, args):
    """Sample N traces for the preferred and N for the rejected edit of each pair (one shared prefill per
    image) and turn them into GCPO training rows: prompt, response ids, old log-probs, advantage."""
    tok, N = processor.tokenizer, args.num_traces
    eos = tok.convert_tokens_to_ids("<|im_end|>")
    rows, stats = [], torch.zeros(3)  # sum of r_w (sampled pairwise accuracy, ties 1/2), parsed traces, traces
    for gid, p in zip(pair_ids, pairs):
        srcs = [load_image(s, p.origin) for s in p.sources]
        scores, sampled = [], []
        for side, img in enumerate((p.preferred, p.rejected)):
            enc = verifier_prompt(processor, srcs, p.instruction, load_image(img, p.origin))
            # a seed per (run, step, pair, side, trace): resumed runs and every rank draw their own streams
            seeds = [((args.seed * 1000003 + step) * 100003 + gid) * 2 * N + side * N + j for j in range(N)]
            toks, old, mask = sample_shared_prefill(model, enc, seeds, eos, args.max_new_tokens, args.temperature)
            parsed = [parse_verifier_output(a) for a in decode_answers(tok, toks, mask)]
            scores.append(torch.tensor([r["score"] if r else math.nan for r in parsed]))
            sampled.append((enc, toks, old, mask))
        r_w, r_l = gcpo_rewards(scores[0], scores[1])
        for (enc, toks, old, mask), adv in zip(sampled, (group_advantages(r_w), group_advantages(r_l))):
            for j in range(N):
                n = int(mask[j].sum())
                rows.append((enc, toks[j, :n].tolist(), old[j, :n], adv[j]))
        stats += torch.tensor([r_w.sum().item(), sum((~s.isnan()).sum().item() for s in scores), 2 * N])
    return rows, stats


def gcpo_update(model, pad_id, rows, opt, args):
    """--ppo_epochs passes over the rollout rows in micro-batches, one optimizer step per pass.
    -> (loss, clip fraction, kl, grad norm) of the last pass."""
    params = [p for p in model.parameters() if p.requires_grad]
    ntok = all_sum(torch.tensor(float(sum(len(r[1]) for r in rows))))
    for _ in range(args.ppo_epochs):
        tot = torch.zeros(3)  # loss, clipped tokens, kl * tokens
        for i in range(0, len(rows), args.micro_batch):
            mb = rows[i:i + args.micro_batch]
            inputs, resp, rmask = collate([r[0] for r in mb], [r[1] for r in mb], pad_id)
            old = torch.zeros_like(rmask)
            for b, r in enumerate(mb):
                old[b, :len(r[2])] = r[2]
            logp = response_logprobs(model, inputs, resp, args.temperature)
            dev = logp.device
            old, rmask, adv = old.to(dev), rmask.to(dev), torch.stack([r[3] for r in mb]).to(dev)
            ref = None
            if args.kl_beta:
                with torch.no_grad(), model.disable_adapter():
                    ref = response_logprobs(model, inputs, resp, args.temperature)
            loss = gcpo_loss(logp, old, adv, rmask, args.clip_eps, ref, args.kl_beta, ntok.to(dev))
            loss.backward()
            with torch.no_grad():
                clipped = (((logp - old).exp() - 1).abs() > args.clip_eps).float()
                d = (ref - logp) if ref is not None else torch.zeros_like(logp)
                kl = ((d.exp() - d - 1) * rmask).sum().item()
                tot += torch.tensor([loss.item(), (clipped * rmask).sum().item(), kl])
        norm = _step_grads(params, opt, args.grad_clip)
    tot = all_sum(tot)
    return tot[0].item(), tot[1].item() / ntok.item(), tot[2].item() / ntok.item(), norm


def train_verifier(args):
    """--stage sft | gcpo | eval. Returns a metrics dict (the --toy driver prints it)."""
    rank, world, device = ddp_setup(args.device)
    master = rank == 0
    torch.set_num_threads(args.cpu_threads)
    torch.manual_seed(args.seed)  # the same LoRA init on every rank; sampling has its own seeded generators
    base_meta = {"base": args.model, "parent": None, "dtype": args.dtype, "min_pixels": args.min_pixels,
                 "max_pixels": args.max_pixels, "principles": []}
    if args.stage == "eval":
        if args.init:
            model, processor, meta = load_verifier(args.init, device)
        else:  # a plain instruct VLM, e.g. as a zero-shot EditScore rubric scorer
            model, processor = build_base(base_meta, device)
        val = load_pairs(args.val, disentangle=False)  # overall preferences only
        res = pair_accuracy(model, processor, val, args, rank, world)
        if args.time_avgk and master:
            res["times"] = time_avg_at_k(model, processor, val, args, k=args.eval_samples)
        if master:
            print(f"eval {args.init or args.model} | rubric {args.rubric} | Avg@{args.eval_samples} | "
                  f"pair acc {res['acc']:.3f} (ties 1/2: {res['acc_tie_half']:.3f}) on {res['pairs']} | "
                  f"parse rate {res['parse']:.3f}")
            if "times" in res:
                t, k = res["times"], args.eval_samples
                print(f"Avg@{k} {t[f'avg{k}']:.2f}s vs Avg@1 {t['avg1']:.2f}s: ratio {t[f'avg{k}'] / t['avg1']:.2f}x "
                      f"(shared prefill) | {k} independent generations {t[f'indep{k}'] / t['avg1']:.2f}x")
        return res

    if args.batch_size % world or args.pairs_per_step % world:
        raise SystemExit(f"--batch_size {args.batch_size} and --pairs_per_step {args.pairs_per_step} must divide "
                         f"by the world size {world}")
    ckpt = os.path.join(args.out_dir, "trainer.pt") if args.out_dir else ""
    resume, start = args.resume and os.path.exists(ckpt), 0
    if resume:
        model, processor, meta = load_verifier(args.out_dir, device, trainable=True)
    else:
        if args.init:  # GCPO: a new adapter over the merged SFT model, so the KL reference is the SFT policy
            parent, processor, pmeta = load_verifier(args.init, device)
            base, meta = parent.merge_and_unload(), pmeta | {"parent": os.path.abspath(args.init)}
        else:
            (base, processor), meta = build_base(base_meta, device), base_meta
        model = add_lora(base, args.lora_rank, args.lora_alpha, args.lora_targets, args.vision == "train")
    model.eval()  # no dropout anywhere; gradients flow in eval mode all the same
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=args.lr, betas=(0.9, 0.99), weight_decay=0.0)
    if resume:
        state = torch.load(ckpt, weights_only=True)
        opt.load_state_dict(state["opt"])
        start = state["step"]
    meta = meta | {"stage": args.stage, "args": vars(args)}

    if args.stage == "sft":
        items = load_traces(args.train or "data/toy/cot_train.jsonl")
        if not meta["principles"]:  # the principle names the traces teach, reported as score keys
            parsed = [parse_verifier_output(t.response) for t in items[:200]]
            meta["principles"] = list(dict.fromkeys(k for r in parsed if r for k in r["principles"]))
    else:
        # a tied pair says nothing about which trace is right
        items = [p for p in load_pairs(args.train or "data/toy/gcpo_train.jsonl", disentangle=False) if not p.tie]
    per_step = args.batch_size if args.stage == "sft" else args.pairs_per_step
    t_start = time.perf_counter()
    res = {}
    for step in range(start, args.max_steps):
        t0 = time.perf_counter()
        ids = step_indices(step, len(items), per_step, rank, world, args.seed)  # resumable data order
        batch = [items[i] for i in ids]
        for g in opt.param_groups:
            g["lr"] = args.lr * lr_factor(step, args.warmup_steps, args.max_steps, args.min_lr_ratio)
        if args.stage == "sft":
            loss, ntok = sft_step(model, processor, batch)
            norm = _step_grads(params, opt, args.grad_clip)
            res = {"loss": loss}
            if master and (step % args.log_interval == 0 or step == args.max_steps - 1):
                print(f"step {step + 1}/{args.max_steps} | loss {loss:.4f} | grad {norm:.2f} | {int(ntok)} tok | "
                      f"{time.perf_counter() - t0:.2f}s")
        else:
            rows, st = gcpo_rollout(model, processor, batch, ids, step, args)
            st = all_sum(st)
            t1 = time.perf_counter()
            loss, clip, kl, norm = gcpo_update(model, processor.tokenizer.pad_token_id, rows, opt, args)
            res = {"win": 2 * st[0].item() / st[2].item(), "parse": st[1].item() / st[2].item()}
            if master and (step % args.log_interval == 0 or step == args.max_steps - 1):
                print(f"step {step + 1}/{args.max_steps} | win {res['win']:.3f} | "
                      f"parse {res['parse']:.2f} | loss {loss:.4f} | clip {clip:.3f} | kl {kl:.4f} | grad {norm:.2f} | "
                      f"rollout {t1 - t0:.1f}s train {time.perf_counter() - t1:.1f}s")
        if master and args.out_dir and ((step + 1) % args.save_interval == 0 or step + 1 == args.max_steps):
            save_verifier(args.out_dir, model, meta, opt, step + 1)
        if dist.is_initialized():
            dist.barrier()  # nobody reads a half-written checkpoint
    res["time"] = time.perf_counter() - t_start
    return res


# ----------------------------------------------------------------------------------------------------------

# The toy recipe: the tiny random VLM needs its 56 px images upscaled to 112 px (16 visual tokens each), a
# trainable vision tower and full-rank adapters (rank 64 = its width) before its answers depend on the image
# at all (the answer format alone is learnt in ~150 steps). GCPO samples at the scoring temperature, so it
# sharpens the policy that Avg@K uses, with a KL leash to the SFT model: at T=1 and lr 3e-3 the format broke.
VERIFIER_TOY = dict(vision="train", min_pixels=112 * 112, max_pixels=112 * 112, lora_rank=64, lora_alpha=128,
                    pairs_per_step=8, temperature=0.7, kl_beta=0.04, eval_pairs=128)


def run_toy(args):
    """The CPU demo: toy data -> SFT -> eval -> GCPO from the SFT model -> eval (same pairs, same seeds)."""
    from data import make_toy
    if "RANK" in os.environ:
        raise SystemExit("--toy runs in one process; under torchrun run the stages (--stage sft/gcpo/eval)")
    data_dir, out = args.toy_data, args.out_dir or "out/verifier_toy"
    if not os.path.exists(os.path.join(data_dir, "gcpo_train.jsonl")):
        make_toy(data_dir)
    val = os.path.join(data_dir, "pairs_val.jsonl")
    stage = lambda **kw: argparse.Namespace(**vars(args) | kw)
    sft = train_verifier(stage(stage="sft", train=os.path.join(data_dir, "cot_train.jsonl"), out_dir=f"{out}/sft",
                               max_steps=args.toy_sft_steps, init=None, lr=args.toy_sft_lr))
    ev_sft = train_verifier(stage(stage="eval", init=f"{out}/sft", val=val))
    gcpo = train_verifier(stage(stage="gcpo", train=os.path.join(data_dir, "gcpo_train.jsonl"), out_dir=f"{out}/gcpo",
                                max_steps=args.toy_gcpo_steps, init=f"{out}/sft", lr=args.toy_gcpo_lr))
    ev_gcpo = train_verifier(stage(stage="eval", init=f"{out}/gcpo", val=val, time_avgk=True))
    t, k = ev_gcpo["times"], args.eval_samples
    for name, tr, ev in (("SFT", sft, ev_sft), ("SFT+GCPO", gcpo, ev_gcpo)):
        print(f"toy {name}: trained {tr['time']:.0f}s | held-out parse {ev['parse']:.3f} | pair acc "
              f"{ev['acc']:.3f} strict, {ev['acc_tie_half']:.3f} ties 1/2 ({ev['pairs']} pairs, Avg@{k})")
    print(f"toy Avg@{k}/Avg@1 wall time {t[f'avg{k}'] / t['avg1']:.2f}x shared prefill, "
          f"{t[f'indep{k}'] / t['avg1']:.2f}x independent")


def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    # --- what to run
    p.add_argument("--mode", default="verifier", choices=["verifier"], help="reward model mode (verifier here)")
    p.add_argument("--stage", default="sft", choices=["sft", "gcpo", "eval"], help="SFT cold start, GCPO, or evaluate")
    p.add_argument("--toy", action="store_true", help="toy demo: SFT, eval, GCPO, eval (CPU, minutes)")
    p.add_argument("--rubric", default="verifier", choices=["verifier", "editscore"],
                   help="scoring prompt: the trained verifier's, or EditScore's two-prompt rubric (zero-shot)")
    p.add_argument("--model", default="tiny", help="base VLM: 'tiny' (random, offline) or a Qwen2.5-VL path")
    p.add_argument("--init", default=None, help="verifier checkpoint to start from (GCPO: the SFT checkpoint)")
    p.add_argument("--out_dir", default=None, help="checkpoint directory")
    p.add_argument("--resume", action="store_true", help="continue exactly from --out_dir/trainer.pt if it exists")
    p.add_argument("--device", default="auto", help="cpu, cuda, ... (auto: cuda if available)")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"],
                   help="auto = bf16 on CUDA, fp32 on CPU")
    p.add_argument("--cpu_threads", type=int, default=1,
                   help="torch CPU threads: tiny models decode ~10x faster on 1 thread than on 2 busy cores")
    # --- data
    p.add_argument("--train", default=None, help="SFT traces / GCPO pairs, any format data.py reads "
                   "(default: data/toy/cot_train.jsonl for sft, data/toy/gcpo_train.jsonl for gcpo)")
    p.add_argument("--val", default="data/toy/pairs_val.jsonl", help="held-out pairs for --stage eval")
    p.add_argument("--min_pixels", type=int, default=56 * 56, help="smallest image area given to the vision tower")
    p.add_argument("--max_pixels", type=int, default=256 * 28 * 28, help="largest image area (256 visual tokens)")
    p.add_argument("--toy_data", default="data/toy", help="toy world folder (written if missing)")
    # --- optimisation
    p.add_argument("--max_steps", type=int, default=100, help="optimizer steps")
    p.add_argument("--lr", type=float, default=1e-4, help="peak AdamW learning rate (LoRA)")
    p.add_argument("--warmup_steps", type=int, default=10, help="linear warmup steps")
    p.add_argument("--min_lr_ratio", type=float, default=0.1, help="cosine decays to this fraction of --lr")
    p.add_argument("--batch_size", type=int, default=16, help="SFT traces per step, total over ranks")
    p.add_argument("--lora_rank", type=int, default=16, help="LoRA rank")
    p.add_argument("--lora_alpha", type=int, default=32, help="LoRA alpha (scale = alpha / rank)")
    p.add_argument("--vision", default="frozen", choices=["frozen", "train"],
                   help="vision tower: frozen, or trained in full (saved with the adapter)")
    p.add_argument("--lora_targets", default="q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj",
                   help="comma-separated linear layers of the language model that get adapters (+ lm_head always)")
    p.add_argument("--grad_clip", type=float, default=1.0, help="gradient norm clip")
    p.add_argument("--seed", type=int, default=0, help="data order and GCPO sampling seed")
    # --- GCPO
    p.add_argument("--pairs_per_step", type=int, default=4, help="human pairs per GCPO step, total over ranks")
    p.add_argument("--num_traces", type=int, default=4, help="N traces sampled per image (2N per pair)")
    p.add_argument("--temperature", type=float, default=1.0, help="GCPO sampling temperature (policy = sampler)")
    p.add_argument("--clip_eps", type=float, default=0.2, help="PPO ratio clip")
    p.add_argument("--ppo_epochs", type=int, default=2, help="optimizer steps per rollout batch")
    p.add_argument("--kl_beta", type=float, default=0.0, help="KL weight to the adapter-disabled reference")
    p.add_argument("--micro_batch", type=int, default=16, help="traces per forward in the GCPO update")
    # --- scoring / eval (EditScore defaults)
    p.add_argument("--eval_samples", type=int, default=4, help="K of Avg@K")
    p.add_argument("--eval_pairs", type=int, default=64, help="non-tied held-out pairs to evaluate")
    p.add_argument("--score_temperature", type=float, default=0.7, help="scoring temperature (0 = greedy)")
    p.add_argument("--top_p", type=float, default=0.9, help="scoring nucleus")
    p.add_argument("--top_k", type=int, default=20, help="scoring top-k")
    p.add_argument("--score_seed", type=int, default=42, help="pass i uses seed score_seed + i")
    p.add_argument("--max_new_tokens", type=int, default=128, help="longest verifier answer")
    p.add_argument("--time_avgk", action="store_true", help="eval: also time Avg@1, Avg@K, K independent passes")
    # --- toy driver
    p.add_argument("--toy_sft_steps", type=int, default=600, help="--toy: SFT steps")
    p.add_argument("--toy_gcpo_steps", type=int, default=40, help="--toy: GCPO steps")
    p.add_argument("--toy_sft_lr", type=float, default=3e-3, help="--toy: SFT learning rate (tiny random model)")
    p.add_argument("--toy_gcpo_lr", type=float, default=1e-3, help="--toy: GCPO learning rate")
    # --- logging / saving
    p.add_argument("--log_interval", type=int, default=10, help="steps between log lines")
    p.add_argument("--save_interval", type=int, default=100, help="steps between checkpoints")
    args = p.parse_args(argv)
    if args.toy:  # the toy preset; flags given explicitly still win
        p.set_defaults(**VERIFIER_TOY)
        args = p.parse_args(argv)
    for name in ("max_steps", "batch_size", "pairs_per_step", "num_traces", "ppo_epochs", "micro_batch", "eval_samples",
                 "max_new_tokens", "log_interval", "save_interval"):
        if getattr(args, name) < 1:
            p.error(f"--{name} must be >= 1, got {getattr(args, name)}")
    return args


if __name__ == "__main__":
    args = get_args()
    run_toy(args) if args.toy else train_verifier(args)
    if dist.is_initialized():
        dist.destroy_process_group()
