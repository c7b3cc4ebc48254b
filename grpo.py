"""
Flow-GRPO or DiffusionNFT for instruction-guided image editors, rewarded by the project's reward model.

An editor (FLUX.1-Kontext-dev, Qwen-Image-Edit[-2509 (Plus)], or `--editor tiny`: Kontext built small with random
weights) samples G edits per prompt with a stochastic sampler; a reward model scores them; group-normalised
advantages drive a PPO-clipped update of a LoRA adapter and/or of modules trained in full (Flow-GRPO, arXiv
2505.05470 sections 3-4, as EditScore arXiv 2509.23909 section 5 and Edit-R1 use it on editors).
The loop at the bottom reads: plan -> rollout -> reward -> advantages -> update -> log.

The sampler is our own, over the pipeline's components (prompt encoding, condition latents, transformer, shifted
sigmas, VAE). Simplified: square images; Kontext and Qwen-Image-Edit see the first source image, Plus sees all.
Tiny editors work in pixel space (a space-to-depth "VAE"). As Flow-GRPO's code (yifan123/flow_grpo): the KL's scale,
the LoRA targets. Unlike it: the step at sigma = 1, each group's own std (its edit configs: the batch's), no EMA.
`--algo nft`: DiffusionNFT (arXiv 2509.16117 section 3; UniWorld-V2 arXiv 2510.16888 on editors): see nft_update.

  # CPU, toy world: warm-up, then GRPO on the toy oracle, or on a reward model trained on the toy's pairs
  python data.py --toy --out data/toy && python grpo.py --toy --reward oracle
  python rewardmodel.py --toy && python grpo.py --toy --reward rm:out/rm_toy    # add --algo nft for DiffusionNFT
  # 1 GPU, FLUX.1-Kontext-dev, Flow-GRPO's settings (6 steps, noise 0.9, LoRA r=64 a=128 on 16 of 20 block linears)
  python grpo.py --editor black-forest-labs/FLUX.1-Kontext-dev --train_prompts data/rl/rl_train.jsonl \\
      --test_prompts data/rl/rl_test.jsonl --reward rm:out/rm --dtype bf16 --resolution 512 --num_steps 6 \\
      --noise_level 0.9 --lora_rank 64 --lora_alpha 128 --group_size 24 --prompts_per_step 4 --micro_batch 4 --offload
  # 8 GPUs, Qwen-Image-Edit, true CFG 4 (several nodes: --nnodes/--node_rank/--rdzv_endpoint, a shared --out_dir)
  torchrun --nproc_per_node=8 grpo.py --editor Qwen/Qwen-Image-Edit --num_steps 10 --dtype bf16 --cond_pixels 262144 \\
      --train_prompts data/rl/rl_train.jsonl --test_prompts data/rl/rl_test.jsonl --reward rm:out/rm --resolution 512 \\
      --lora_rank 64 --lora_alpha 128 --group_size 16 --prompts_per_step 8 --fsdp --grad_checkpointing

A log line a step (stdout). In --out_dir: eval_*.png sheets, history.json, sft/ (the warmed-up editor), ckpt/ (the
latest checkpoint): pytorch_lora_weights.safetensors (with LoRA) for `pipeline.load_lora_weights(ckpt)`,
trainable.safetensors (every trained tensor: --train_modules' load with `transformer.load_state_dict(...,
strict=False)` after load_lora_weights), optimizer.pt, state.json, NFT's old_policy.safetensors (--resume).
"""
import argparse
import contextlib
import hashlib
import json
import math
import os
import random
import time
from collections import OrderedDict

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import load_file, save_file
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict, set_optimizer_state_dict

from data import (atomic_dir, atomic_write, check_least, check_resume, check_unused, image_sheet, leave_distributed,
                  load_image, load_prompts, load_sources, parse_toy_instruction, print0, setup_distributed, shard,
                  toy_oracle)
from rewardmodel import TINY_MODELS, RewardModel, build_tiny_vlm, load_processor, published_layout, read_prompts

# ----------------------------------------------------------------------------- the math
def sde_step(x, v, sigma, sigma_next, noise_level, prev_sample=None, generator=None):
    """One reverse step of Flow-GRPO's SDE (the flow x_s = (1 - s) x0 + s eps's marginals) from s to s' (dt = s' - s):
    std_dev_t = a sqrt(s / (1 - s)), mean = x (1 + std_dev_t^2 dt / 2s) + v (1 + std_dev_t^2 (1 - s) / 2s) dt,
    transition std = std_dev_t sqrt(-dt). At s = 1 (0 / 0) we take a sqrt(s' / (1 - s')); Flow-GRPO's code takes
    a sqrt(1 / (1 - s')), sqrt(1 / s') times more (1.15x at s' = 0.75). a = 0 is the Euler step (log_prob 0).
    prev_sample, if given, is scored, not sampled. In fp32 -> prev_sample (x.dtype), log_prob (B,) = the Gaussian
    log-density averaged over non-batch elements, mean (fp32), std_dev_t (B,) as Flow-GRPO returns it (for the KL)."""
    B, dims = x.shape[0], tuple(range(1, x.dim()))
    s, s_next = (torch.as_tensor(t, dtype=torch.float32, device=x.device).expand(B).reshape((B,) + (1,) * len(dims))
                 for t in (sigma, sigma_next))
    dt, s_root = s_next - s, torch.where(s >= 1, s_next, s)
    std_dev_t = noise_level * torch.sqrt(s_root / (1 - s_root))
    mean = x.float() * (1 + std_dev_t**2 / (2 * s) * dt) + v.float() * (1 + std_dev_t**2 * (1 - s) / (2 * s)) * dt
    std = std_dev_t * torch.sqrt(-dt)
    if prev_sample is None:
        prev_sample = (mean + std * torch.randn(x.shape, generator=generator, device=x.device)).to(x.dtype)
    # a zero std would give 0/0; score with std 1 there and zero the result (no NaN reaches the gradients)
    safe = torch.where(live := std > 0, std, torch.ones_like(std))
    elem = -((prev_sample.float() - mean) ** 2) / (2 * safe**2) - torch.log(safe) - 0.5 * math.log(2 * math.pi)
    log_prob = torch.where(live.reshape(B), elem.mean(dim=dims), torch.zeros(B, device=x.device))
    return prev_sample, log_prob, mean, std_dev_t.reshape(B)

def group_advantages(rewards, group_ids, eps=1e-4, clip=5.0):
    """A_i = (r_i - mean_g) / (std_g + eps), population std over i's group g, clipped to +-clip. (N,) -> (N,) fp32.
    Computed in float64: rewards with a large offset and a small spread keep their differences.
    A NaN reward (an unscored sample: a verifier whose every pass failed to parse) gets A = 0 and stays out of
    its group's mean and std: no guessed score ever becomes a gradient."""
    r, ok = rewards.double(), ~torch.isnan(rewards)
    _, g = torch.unique(group_ids, return_inverse=True)  # (N,) group index 0..K-1
    zeros = torch.zeros(int(g.max()) + 1, dtype=r.dtype, device=r.device)
    count = zeros.index_add(0, g, ok.double()).clamp(min=1)
    mean = zeros.index_add(0, g, torch.where(ok, r, 0.0)) / count
    dev = torch.where(ok, r - mean[g], 0.0)
    std = (zeros.index_add(0, g, dev**2) / count).sqrt()
    return torch.where(ok, dev / (std[g] + eps), 0.0).clamp(-clip, clip).float()

def gaussian_kl(mean, ref_mean, std_dev_t):
    """Flow-GRPO's KL penalty |mu - mu_ref|^2 / (2 std_dev_t^2), averaged over non-batch elements: the transitions'
    exact KL (their variance is std_dev_t^2 |dt|) times |dt|, as in its code, so its beta values carry over. (B,)"""
    return ((mean - ref_mean) ** 2).flatten(1).mean(1) / (2 * std_dev_t**2)

def grpo_loss(log_prob, old_log_prob, advantages, clip_range, kl=None, beta=0.0):
    """PPO-clipped GRPO loss: mean_i max(-A_i rho_i, -A_i clip(rho_i, 1 - c, 1 + c)) + beta mean(kl), rho_i =
    exp(log_prob_i - old_log_prob_i), c tiny (1e-4): per-element mean log-probs -> (loss, ratio (B,), clipped (B,))."""
    ratio = torch.exp(log_prob - old_log_prob)
    loss = torch.maximum(-advantages * ratio, -advantages * ratio.clamp(1 - clip_range, 1 + clip_range)).mean()
    loss = loss + beta * kl.mean() if kl is not None and beta > 0 else loss
    return loss, ratio.detach(), ((ratio.detach() - 1).abs() > clip_range)

def nft_loss(v, v_old, target, t, r, beta=1.0, scale=5.0):
    """DiffusionNFT's loss (arXiv 2509.16117 section 3, in the forms of NVlabs/DiffusionNFT's scripts/train_nft_sd3.py):
    implicit positive and negative policies v+ = beta v + (1 - beta) v_old, v- = (1 + beta) v_old - beta v, each pulled
    to the flow-matching target eps - x0 in x0 space, e± = x0± - x0 = t (v± - target), with weights r and 1 - r:
    L = scale / beta mean_i [r_i mean(e+^2) / w+_i + (1 - r_i) mean(e-^2) / w-_i], w± = mean|e±| (no gradient);
    r = 0.5 + 0.5 clip(A / 5, -1, 1), the optimality probability; scale 5. v, v_old, target (B, tokens, D), t, r (B,)"""
    t, v_old, dims = t.reshape(-1, 1, 1).float(), v_old.detach().float(), tuple(range(1, v.dim()))
    err = [t * (beta * v + (1 - beta) * v_old - target), t * ((1 + beta) * v_old - beta * v - target)]  # (B, tokens, D)
    pos, neg = ((e**2).mean(dims) / e.detach().double().abs().mean(dims).clamp(min=1e-5).float() for e in err)
    return (scale / beta * (r * pos + (1 - r) * neg)).mean()

# ----------------------------------------------------------------------------- editors
def pack(lat):
    """(B, C, h, w) -> (B, h/2 * w/2, 4C): the 2x2 token packing of the Flux / Qwen-Image pipelines."""
    B, C, h, w = lat.shape
    return lat.view(B, C, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(B, (h // 2) * (w // 2), C * 4)

def unpack(x, C, h, w):  # the inverse of pack: (B, h/2 * w/2, 4C) -> (B, C, h, w)
    return x.view(x.shape[0], h // 2, w // 2, C, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(x.shape[0], C, h, w)

def to_tensor(img, side):
    """PIL -> (3, side, side) in [-1, 1], resized with Lanczos as the pipelines' VaeImageProcessor resizes sources."""
    a = np.asarray(img.convert("RGB").resize((side, side), Image.LANCZOS), dtype=np.float32)
    return torch.from_numpy(a).permute(2, 0, 1) / 127.5 - 1

def to_pil(x):  # (B, 3, H, W) in [-1, 1] -> a list of PIL images
    a = ((x.float().clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).cpu().numpy()
    return [Image.fromarray(im) for im in a]

def char_tokenizer(max_length):
    """Offline tokenizer for the tiny text encoders: one token per printable ASCII character, then </s>."""
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast
    vocab = {t: i for i, t in enumerate(["<pad>", "</s>", "<unk>"] + [chr(c) for c in range(32, 127)])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>",
                                   model_max_length=max_length)

def tiny_kontext(seed=0, patch=2, width=64, max_length=32):
    """FluxKontextPipeline with tiny random components (CLIP + T5 text encoders, guidance-distilled
    FluxTransformer2DModel) for pixel-space latents of 3 * patch^2 channels. vae=None: see Editor."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxKontextPipeline, FluxTransformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel
    torch.manual_seed(seed)
    tok = char_tokenizer(max_length)
    clip = CLIPTextModel(CLIPTextConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=2, max_position_embeddings=max_length, pad_token_id=0,
                                        bos_token_id=1, eos_token_id=1, projection_dim=32))
    t5 = T5EncoderModel(T5Config(vocab_size=len(tok), d_model=32, d_kv=16, d_ff=64, num_layers=2, num_heads=2,
                                 pad_token_id=0, eos_token_id=1))
    # RoPE must tell the latent grid's positions apart for the editor to copy the condition image token by
    # token: 14 dims per spatial axis (frequencies 1, 0.27, 0.07, ...) do on a 16 x 16 grid, 6 dims do not
    transformer = FluxTransformer2DModel(in_channels=4 * 3 * patch**2, num_layers=2, num_single_layers=2,
                                         attention_head_dim=32, num_attention_heads=width // 32, joint_attention_dim=32,
                                         pooled_projection_dim=32, guidance_embeds=True, axes_dims_rope=(4, 14, 14))
    scheduler = FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                                                base_image_seq_len=256, max_image_seq_len=4096)
    return FluxKontextPipeline(scheduler=scheduler, vae=None, text_encoder=clip.eval(), tokenizer=tok,
                               text_encoder_2=t5.eval(), tokenizer_2=tok, transformer=transformer.eval())

def tiny_qwen_edit(seed=0, patch=2, width=64, plus=False):
    """QwenImageEdit(Plus)Pipeline with a tiny random QwenImageTransformer2DModel and the reward model's offline
    tiny Qwen2.5-VL as text encoder (it sees the condition images too), pixel-space latents as above."""
    import diffusers
    vlm, processor = build_tiny_vlm()
    torch.manual_seed(seed)
    transformer = diffusers.QwenImageTransformer2DModel(
        in_channels=4 * 3 * patch**2, out_channels=3 * patch**2, num_layers=2, attention_head_dim=32,
        num_attention_heads=width // 32, joint_attention_dim=vlm.config.text_config.hidden_size,
        axes_dims_rope=(4, 14, 14))
    scheduler = diffusers.FlowMatchEulerDiscreteScheduler(
        use_dynamic_shifting=True, base_shift=0.5, max_shift=0.9, base_image_seq_len=256, max_image_seq_len=8192,
        shift_terminal=0.02, time_shift_type="exponential")
    cls = diffusers.QwenImageEditPlusPipeline if plus else diffusers.QwenImageEditPipeline
    return cls(scheduler=scheduler, vae=None, text_encoder=vlm.eval(), tokenizer=processor.tokenizer,
               processor=processor, transformer=transformer.eval())

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
RESUME_FREE = ("resume", "steps", "eval_every", "eval_prompts", "test_prompts", "out_dir", "micro_batch", "offload",
               "grad_checkpointing", "fsdp")  # how long, how often to evaluate, memory: --resume may change these
# Flow-GRPO's LoRA targets (yifan123/flow_grpo, scripts/train_flux_kontext.py, train_qwenimage_edit_plus.py): every
# attention projection and MLP linear of both streams, in Flux's single blocks q/k/v and proj_mlp (16 of 20 linears)
ATTN = "attn.to_q,attn.to_k,attn.to_v,attn.to_out.0,attn.add_q_proj,attn.add_k_proj,attn.add_v_proj,attn.to_add_out,"
LORA_TARGETS = {"flux": ATTN + "ff.net.0.proj,ff.net.2,ff_context.net.0.proj,ff_context.net.2,proj_mlp",
                "qwen": ATTN + "img_mlp.net.0.proj,img_mlp.net.2,txt_mlp.net.0.proj,txt_mlp.net.2"}

class Editor:
    """The sampler's view of an editing pipeline: condition(prompts) -> cond, velocity(x, sigma, cond), encode/decode
    images <-> packed latents (B, tokens, 4C). A prompt's conditioning is computed once, kept in the compute dtype in
    an LRU cache of --prompts_per_step + --eval_prompts prompts: the text encoders run rarely, can live off the GPU."""

    def __init__(self, pipe, args, device, pixel_patch=0):
        self.pipe, self.tr, self.device, self.args = pipe, pipe.transformer, device, args
        self.qwen, self.plus = "QwenImage" in type(pipe).__name__, "Plus" in type(pipe).__name__
        self.dtype = DTYPES[args.dtype]  # the compute dtype: autocast follows it, not the trained weights' fp32
        # one knob, as in Flow-GRPO: Kontext's distilled guidance (default 2.5), Qwen's true CFG (4; 1 = off: NFT's)
        self.guidance = args.guidance if args.guidance is not None else 2.5 if not self.qwen else 4.0 if args.algo == \
            "grpo" else 1.0
        self.patch, self.down = pixel_patch, pixel_patch or pipe.vae_scale_factor  # patch > 0: space-to-depth "VAE"
        self.C = 3 * pixel_patch**2 if pixel_patch else pipe.latent_channels
        self.side = args.resolution // (2 * self.down) * 2  # latent side, even for the 2x2 packing
        # Qwen's pipelines show the VL encoder the sources at a 1024^2 (Plus: 384^2) area whatever the output size;
        # we take --cond_pixels, by default the output's own area (Plus: 384^2, or 3 large sources overflow the rope)
        cond_px = args.cond_pixels if self.qwen and args.cond_pixels else 384**2 if self.plus else args.resolution**2
        self.cond_side, self.cache = int(math.sqrt(cond_px)) // (2 * self.down) * 2, OrderedDict()

    def sigmas(self, num_steps):
        """The model's shifted schedule: linspace(1, 1/N, N), time-shifted by the scheduler (mu from the
        token count when the model uses dynamic shifting), then a final 0. (N + 1,) on CPU, fp32."""
        from diffusers.pipelines.flux.pipeline_flux import calculate_shift
        sched, cfg = self.pipe.scheduler, self.pipe.scheduler.config
        mu = calculate_shift((self.side // 2) ** 2, cfg.get("base_image_seq_len", 256),
                             cfg.get("max_image_seq_len", 4096), cfg.get("base_shift", 0.5), cfg.get("max_shift", 1.15))
        sched.set_timesteps(sigmas=np.linspace(1.0, 1 / num_steps, num_steps), mu=mu if cfg.use_dynamic_shifting
                            else None)
        return sched.sigmas.float().cpu()

    @torch.no_grad()
    def encode_images(self, imgs, side):
        """PIL list -> packed latents (B, tokens, 4C) in fp32 on the device."""
        x = torch.stack([to_tensor(im, side * self.down) for im in imgs]).to(self.device)
        if self.patch:
            return pack(F.pixel_unshuffle(x, self.patch))
        x = x.to(self.pipe.vae.dtype)
        lat = self.pipe._encode_vae_image(x.unsqueeze(2) if self.qwen else x, generator=None)  # scaled as in training
        return pack((lat[:, :, 0] if self.qwen else lat).float())

    @torch.no_grad()
    def decode(self, x):
        """Packed latents -> list of PIL images, --micro_batch at a time (a 512 px image takes ~0.35 GB of VAE
        activations in bf16; the VAE slices each batch further where it can)."""
        out, mb, vae = [], self.args.micro_batch, self.pipe.vae
        for i in range(0, len(x), mb):
            lat = unpack(x[i : i + mb].float(), self.C, self.side, self.side)
            if self.patch:
                out += to_pil(F.pixel_shuffle(lat, self.patch))
            elif self.qwen:  # Qwen's VAE is a video VAE with per-channel latent statistics
                std, mean = (torch.tensor(v, device=lat.device).view(1, -1, 1, 1)
                             for v in (vae.config.latents_std, vae.config.latents_mean))
                out += to_pil(vae.decode((lat * std + mean).unsqueeze(2).to(vae.dtype), return_dict=False)[0][:, :, 0])
            else:
                lat = lat / vae.config.scaling_factor + vae.config.shift_factor
                out += to_pil(vae.decode(lat.to(vae.dtype), return_dict=False)[0])
        return out

    def qwen_embed(self, text, images):
        """Qwen-Image-Edit's prompt embedding: the VL encoder's last hidden states over the pipeline's template (Plus:
        one 'Picture i:' slot per source), its fixed prefix dropped. (tokens, D). The encoder gets the processor's
        full inputs: without mm_token_type_ids transformers 5.x never computes the image tokens' 3D M-RoPE positions
        and falls back to 1D ones (diffusers' encode_prompt omits them)."""
        pipe = self.pipe
        slots = "".join(f"Picture {i + 1}: <|vision_start|><|image_pad|><|vision_end|>" for i in range(len(images)))
        inputs = pipe.processor(text=[pipe.prompt_template_encode.format((slots if self.plus else "") + text)],
                                images=images, return_tensors="pt").to(self.device)
        hidden = pipe.text_encoder(**inputs, output_hidden_states=True).hidden_states[-1]
        return hidden[0, pipe.prompt_template_encode_start_idx:]

    @torch.no_grad()
    def encode(self, p):
        """One prompt's conditioning, in the compute dtype on the CPU. Kontext and Qwen-Image-Edit see the first
        source at the condition size; Plus sees every source, its latents at the output's size (as Flow-GRPO's Plus
        script; the pipeline's own takes a 1024^2 area) and the VL encoder's view at the condition size."""
        srcs, dt = load_sources(p)[: None if self.plus else 1], self.dtype
        side = self.side if self.plus else self.cond_side
        e = {"image": self.encode_images(srcs, side).flatten(0, 1), "shapes": [(1, side // 2, side // 2)] * len(srcs)}
        if self.qwen:
            vl = [im.resize((self.cond_side * self.down,) * 2, Image.LANCZOS) for im in srcs]
            e["text"] = self.qwen_embed(p.instruction, vl)
            if self.guidance > 1:  # true CFG's negative prompt: a blank, as in the pipeline's examples and Flow-GRPO
                e["neg"] = self.qwen_embed(" ", vl)
        else:
            e["text"], e["pooled"], _ = self.pipe.encode_prompt(
                [p.instruction], None, device=self.device, max_sequence_length=self.args.max_sequence_length)
        return {k: v.squeeze(0).to(dt).cpu() if torch.is_tensor(v) else v for k, v in e.items()}

    def condition(self, prompts):
        """Batch the cached conditioning of a list of EditPrompts (one per sample). A prompt's key is its content:
        file and row, id, instruction and sources (two files without ids both number their prompts 0, 1, ...)."""
        keys = [hashlib.sha1(repr((p.origin, p.id, p.instruction, p.sources)).encode()).hexdigest() for p in prompts]
        new = {k: p for k, p in zip(keys, prompts) if k not in self.cache}
        encoders = [self.pipe.text_encoder] + ([] if self.qwen else [self.pipe.text_encoder_2])
        for enc in encoders if new else []:
            enc.to(self.device)
        self.cache.update({k: self.encode(p) for k, p in new.items()})
        for enc in encoders if new and self.args.offload else []:
            enc.to("cpu")
        es = [self.cache[k] for k in keys]
        for k in keys:
            self.cache.move_to_end(k)
        while len(self.cache) > max(self.args.prompts_per_step + self.args.eval_prompts, len(set(keys))):
            self.cache.popitem(last=False)
        # a forward per prompt if Plus prompts' source counts differ; under --fsdp always (ranks run as many forwards)
        if len({len(e["shapes"]) for e in es}) > 1 or self.plus and self.args.fsdp and len(es) > 1:
            return {"parts": [self.condition([p]) for p in prompts]}
        dev, B, h = self.device, len(prompts), self.side // 2
        cond, passes = {"image": torch.stack([e["image"] for e in es]).to(dev), "passes": []}, ["text", "neg"]
        if self.qwen:  # one forward per prompt embedding: the instruction, then true CFG's negative prompt
            for key in passes[: 1 + (self.guidance > 1)]:
                emb = torch.nn.utils.rnn.pad_sequence([e[key] for e in es], batch_first=True).to(dev)
                mask = torch.arange(emb.shape[1]) < torch.tensor([len(e[key]) for e in es])[:, None]
                cond["passes"].append(dict(encoder_hidden_states=emb, img_shapes=[[(1, h, h)] + es[0]["shapes"]] * B,
                                           encoder_hidden_states_mask=None if mask.all() else mask.long().to(dev)))
            return cond
        hc, ids = es[0]["shapes"][0][1], self.pipe._prepare_latent_image_ids
        cond_ids = ids(B, hc, hc, dev, torch.float32)
        cond_ids[..., 0] = 1  # Kontext tells the condition tokens apart by the first RoPE axis
        text = torch.stack([e["text"] for e in es]).to(dev)
        # Kontext is guidance-distilled: the guidance scale is an input, one forward per step
        cond["passes"].append(dict(encoder_hidden_states=text, txt_ids=torch.zeros(text.shape[1], 3, device=dev),
                                   pooled_projections=torch.stack([e["pooled"] for e in es]).to(dev),
                                   img_ids=torch.cat([ids(B, h, h, dev, torch.float32), cond_ids]),
                                   guidance=torch.full((B,), self.guidance, device=dev)
                                   if self.tr.config.guidance_embeds else None))
        return cond

    def velocity(self, x, sigma, cond):
        """v(x, sigma | prompt, condition images), fp32, (B, tokens, 4C), run in the compute dtype. Qwen's true CFG
        takes two forwards, with the pipeline's norm rescale; the condition tokens ride along, their outputs dropped."""
        B, n, dt = x.shape[0], x.shape[1], self.dtype
        t = torch.as_tensor(sigma, device=x.device, dtype=torch.float32).expand(B)
        if "parts" in cond:
            return torch.cat([self.velocity(x[i : i + 1], t[i : i + 1], c) for i, c in enumerate(cond["parts"])])
        inp = torch.cat([x, cond["image"].to(x.dtype)], 1).to(dt)
        with torch.autocast(x.device.type, dtype=dt, enabled=dt != torch.float32):
            vs = [self.tr(hidden_states=inp, timestep=t.to(dt), return_dict=False, **c)[0][:, :n].float()
                  for c in cond["passes"][: 1 + (self.guidance > 1)]]
        if len(vs) == 1:
            return vs[0]
        comb = vs[1] + self.guidance * (vs[0] - vs[1])
        return comb * (vs[0].norm(dim=-1, keepdim=True) / comb.norm(dim=-1, keepdim=True))

def load_editor(args, device):
    """`tiny` or `tiny-qwen` (one fixed random model, seed 0, whatever --seed: a warmed-up transformer only makes sense
    with the same frozen text encoders) or a FluxKontext / QwenImageEdit(Plus)Pipeline folder or hub id."""
    if args.editor.startswith("tiny"):
        pipe = tiny_kontext(0, max_length=args.max_sequence_length) if args.editor == "tiny" else tiny_qwen_edit(0)
        pipe.transformer.to(device, DTYPES[args.dtype])
        return Editor(pipe, args, device, pixel_patch=2)
    from diffusers import DiffusionPipeline
    kind = DiffusionPipeline.load_config(args.editor).get("_class_name", "no pipeline class")  # before the weights
    if not any(k in kind for k in ("FluxKontext", "QwenImageEdit")):
        raise ValueError(f"--editor {args.editor}: {kind} is not a Kontext or Qwen-Image-Edit pipeline")
    if args.cond_pixels and "Qwen" not in kind:  # Kontext sees its source at the output's size
        raise ValueError(f"--cond_pixels: Qwen-Image-Edit's flag, not {kind}'s")
    # Qwen's pipelines hold a Qwen2-VL processor, whose video part needs torchvision: without it, its image-only part
    kw = {"processor": load_processor(args.editor, "qwen2_vl", subfolder="processor")} if "Qwen" in kind else {}
    pipe = DiffusionPipeline.from_pretrained(args.editor, dtype=DTYPES[args.dtype], **kw)
    pipe.transformer.to(device)
    pipe.vae.enable_slicing()  # one image at a time inside the VAE: decode's batches stay small
    for m in filter(None, (pipe.text_encoder, getattr(pipe, "text_encoder_2", None))):  # the cache keeps them idle
        m.to("cpu" if args.offload else device).requires_grad_(False)
    pipe.vae.to(device).requires_grad_(False)
    return Editor(pipe, args, device)

# ----------------------------------------------------------------------------- sampling, rewards, helpers
# the random streams, one id each, so that no two draws share a seed: seed_of(seed, STREAM, step, ...)
PROMPTS, INIT_NOISE, SDE_NOISE, SDE_WINDOW, EVAL_NOISE, SFT_BATCH, SFT_NOISE = 1, 2, 3, 4, 7, 11, 12

def seed_of(*parts):
    """A deterministic 63-bit seed from integers (stream, step, group, member, rank...): noise is a pure function of
    where a sample sits, so ranks never share noise by accident and --resume replays it exactly."""
    h = 1469598103934665603
    for p in parts:
        h = ((h ^ (p + 0x9E3779B9)) * 1099511628211) % (1 << 63)
    return h

def rollout_plan(seed, step, n_prompts, P, G, rank, world, same_noise=False):
    """Every rank draws the same P prompts and the same shuffle of the P x G (group, member) slots, then takes its
    slice: a group spreads over ranks, its rewards are normalised globally. -> (my slots [(g, k)], prompt index per
    group, noise seed per slot); with same_noise a group's members share one initial noise (DanceGRPO)."""
    rng = random.Random(seed_of(seed, PROMPTS, step))
    groups = rng.sample(range(n_prompts), P) if n_prompts >= P else [rng.randrange(n_prompts) for _ in range(P)]
    slots = [(g, k) for g in range(P) for k in range(G)]
    rng.shuffle(slots)
    mine = slots[rank * P * G // world : (rank + 1) * P * G // world]
    return mine, groups, [seed_of(seed, INIT_NOISE, step, g, 0 if same_noise else k + 1) for g, k in mine]

def sde_window(seed, step, num_steps, window, max_start):
    """The steps that take the SDE and are trained: all but the last (its tiny sigma makes the log-prob explode),
    or a random window of `window` steps starting no later than max_start, ODE elsewhere (Flow-GRPO-Fast, MixGRPO)."""
    last = num_steps - 1 - window
    first = random.Random(seed_of(seed, SDE_WINDOW, step)).randint(0, last if max_start < 0 else min(max_start, last))
    return set(range(first, first + window)) if window else set(range(num_steps - 1))

def sample(editor, cond, x, sigmas, sde_steps, noise_level, generator):
    """Integrate from noise x over sigmas; steps in sde_steps use the stochastic sampler and are recorded
    as (step, x_t, x_next, log_prob) for training, the others take the ODE step."""
    traj = []
    for i in range(len(sigmas) - 1):
        x_next, log_prob, _, _ = sde_step(x, editor.velocity(x, sigmas[i], cond), sigmas[i], sigmas[i + 1],
                                          noise_level if i in sde_steps else 0.0, generator=generator)
        traj += [(i, x, x_next, log_prob)] if i in sde_steps else []
        x = x_next
    return x, traj

def initial_noise(editor, keys, device):
    """One (tokens, 4C) standard normal per key, drawn from a generator seeded by the key."""
    shape = ((editor.side // 2) ** 2, 4 * editor.C)
    return torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(k)) for k in keys]).to(device)

def make_reward(spec, device, prompt_file=None):
    """'oracle' (the toy world's) | 'rm:PATH' | 'rm:PATH@dim' -> fn(prompts, edits) -> (B,) float64 on the CPU.
    A reward model (any RewardModel.from_pretrained loads, with prompt_file) loads in-process on every rank."""
    if spec == "oracle":
        return lambda ps, ims: torch.tensor([oracle_score(p, im) for p, im in zip(ps, ims)], dtype=torch.float64)
    path, _, dim = spec[3:].partition("@")
    rm = RewardModel.from_pretrained(path, device=device, prompt_file=prompt_file)
    if (dim := dim or "overall") not in rm.dims + ["overall"]:
        raise ValueError(f"--reward {spec!r}: {path} scores {', '.join(rm.dims + ['overall'])}, not {dim!r}")
    return lambda ps, ims: rm.score([load_sources(p) for p in ps], [p.instruction for p in ps], ims)[dim].double().cpu()

def oracle_score(p, img):
    """The toy world's ground truth; it upsamples the edit to the source's size."""
    return toy_oracle(load_image(p.sources[0], p.origin), p.instruction, img)["overall"]

def gather(t):
    """all_gather of equal-shape tensors along dim 0 (identity without torchrun)."""
    out = [torch.empty_like(t) for _ in range(dist.get_world_size())] if dist.is_initialized() else [t]
    dist.all_gather(out, t.contiguous()) if dist.is_initialized() else None
    return torch.cat(out)

# ----------------------------------------------------------------------------- the run's steps
@torch.no_grad()
def evaluate(editor, prompts, reward_fn, sigmas, ddp, args, step):
    """ODE edits of the held-out prompts from fixed noise -> {"reward", "oracle", "rm_oracle_corr"} over all ranks
    (the toy's oracle: does the reward track the truth?) and a sheet of the first edits. Every rank runs as many
    forwards (a short shard repeats a prompt): under --fsdp each forward is a collective."""
    editor.tr.eval()
    mine, n, oracle = shard(list(enumerate(prompts)), ddp.rank, ddp.world), -(-len(prompts) // ddp.world), \
        args.toy or args.reward == "oracle"
    padded, rows, firsts = (mine + mine[-1:] * n)[:n] if mine else [(0, prompts[0])] * n, [], []
    editor.condition([q for _, q in padded])  # every new prompt at once: --offload moves the encoders once an eval
    for i in range(0, n, args.micro_batch):
        ps = [q for _, q in padded[i : i + args.micro_batch]]
        x = initial_noise(editor, [seed_of(EVAL_NOISE, j) for j, _ in padded[i : i + len(ps)]], editor.device)
        ims = editor.decode(sample(editor, editor.condition(ps), x, sigmas, set(), 0.0, None)[0])
        rewards = reward_fn(ps, ims).tolist()
        rows += [(r, oracle_score(q, im) if oracle else math.nan) for q, r, im in zip(ps, rewards, ims)][:len(mine) - i]
        firsts += list(zip(ps, ims, rewards))[: 8 - len(firsts)]
    parts = [rows] * ddp.world
    dist.all_gather_object(parts, rows) if ddp.ddp else None
    r, o = np.array([row for part in parts for row in part]).T
    ok = ~np.isnan(r)  # an edit the reward left unscored (a verifier that never answered) is counted, not averaged
    out = {"step": step, "reward": float(r[ok].mean()) if ok.any() else math.nan, "oracle": float(o.mean()),
           "rm_oracle_corr": float(np.corrcoef(r[ok], o[ok])[0, 1]) if oracle and ok.sum() > 1 else math.nan,
           "unscored": int(len(r) - ok.sum())}
    print0(f"eval {step} | " + " | ".join(f"{k} {round(v, 4)}" for k, v in list(out.items())[1:]) + f" | "
           f"{len(prompts)} held-out prompts, {len(sigmas) - 1} ODE steps")
    image_sheet([(q.instruction, [(load_sources(q)[0], "source"), (im, f"{v:.3f}")]) for q, im, v in firsts],
                os.path.join(args.out_dir, f"eval_{step:05d}.png")) if ddp.master else None
    return out

def warmup(editor, args, ddp):
    """The toy's stand-in for an editor's own training (real editors arrive trained: --sft_steps 0): supervised flow
    matching on (source, instruction, target) triples, every weight, --lr, --micro_batch triples per rank and step.
    Saved to out_dir/sft; --resume loads it from there."""
    path, params = os.path.join(args.out_dir, "sft", "transformer.safetensors"), list(editor.tr.parameters())
    if args.resume and os.path.exists(path) or args.sft_steps == 0:
        return editor.tr.load_state_dict(load_file(path, device=str(ddp.device))) if args.sft_steps else None
    triples, opt, t0 = load_prompts(args.sft_data), torch.optim.AdamW(params, lr=args.lr, weight_decay=0.0), time.time()
    for step in range(args.sft_steps):
        editor.tr.train()
        rng = random.Random(seed_of(args.seed, SFT_BATCH, step))  # same draw on every rank, then each takes its slice
        batch = shard([triples[rng.randrange(len(triples))] for _ in range(args.micro_batch * ddp.world)],
                      ddp.rank, ddp.world)
        x0 = editor.encode_images([load_image(q.target, q.origin) for q in batch], editor.side)
        gen = torch.Generator().manual_seed(seed_of(args.seed, SFT_NOISE, step, ddp.rank))
        noise = torch.randn(x0.shape, generator=gen).to(editor.device)
        s = torch.rand(len(batch), generator=gen).to(editor.device)[:, None, None]
        v = editor.velocity((1 - s) * x0 + s * noise, s[:, 0, 0], editor.condition(batch))
        loss = F.mse_loss(v.float(), noise - x0)  # flow matching: x_s = (1 - s) x0 + s eps moves at eps - x0
        opt.zero_grad(set_to_none=False)
        loss.backward()
        optimizer_step(opt, params, args.grad_clip)
        if step % 50 == 0 or step == args.sft_steps - 1:
            print0(f"sft {step + 1}/{args.sft_steps} | loss {loss.item():.4f} | {time.time() - t0:.1f}s")
    state = {k: v.contiguous() for k, v in editor.tr.eval().state_dict().items()}
    if ddp.master:
        atomic_dir(os.path.dirname(path), lambda d: save_file(state, os.path.join(d, os.path.basename(path))))

def setup_trainable(editor, args):
    """Freeze the transformer, then add a LoRA adapter (peft; by default on Flow-GRPO's targets) and unfreeze the
    modules trained in full, in fp32 even on a bf16 base. Returns ([(name, param)], the fully trained modules'
    starting weights): the reference policy is the starting one, adapter off and those weights in."""
    tr = editor.tr.requires_grad_(False).eval()
    if args.lora_rank > 0:
        from peft import LoraConfig
        targets = args.lora_targets or LORA_TARGETS["qwen" if editor.qwen else "flux"]
        if miss := [t for t in targets.split(",") if not any(f".{n}".endswith(f".{t}") for n, _ in tr.named_modules())]:
            raise ValueError(f"--lora_targets: {args.editor} has no module named {miss}")  # peft drops them silently
        tr.add_adapter(LoraConfig(r=args.lora_rank, lora_alpha=args.lora_alpha, init_lora_weights="gaussian",
                                  target_modules=targets.split(",")))
    for m in filter(None, args.train_modules.split(",")):
        tr.get_submodule(m).requires_grad_(True)
    named = [(n, q) for n, q in tr.named_parameters() if q.requires_grad]
    for _, q in named:
        q.data = q.data.float()
    return named, {n: q.detach().clone() for n, q in named if "lora_" not in n}

def shard_transformer(tr, *weights):
    """FSDP2: shard every block, then the rest, over the ranks, and the weights that stand in for the parameters (the
    reference, NFT's old policy) like them. Returns the sharded [(name, param)], then each of `weights` sharded."""
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import distribute_tensor
    for block in list(tr.transformer_blocks) + list(getattr(tr, "single_transformer_blocks", [])):
        fully_shard(block)
    fully_shard(tr)
    named = [(n, q) for n, q in tr.named_parameters() if q.requires_grad]
    return named, *({n: distribute_tensor(w[n].to(q.device), q.device_mesh, q.placements) for n, q in named if n in w}
                    for w in weights)

@contextlib.contextmanager
def swapped_in(editor, named, weights):
    """Run a block with `weights` in the trained tensors, copied in and back in place (FSDP's all-gather reads their
    storage, not a swapped-in .data). Without LoRA tensors they are the reference: the policy before RL, adapter off."""
    params, lora_off = dict(named), any("lora_" in n and n not in weights for n, _ in named)
    for ws in (weights, {n: params[n].detach().clone() for n in weights}):  # then the current ones, cloned up front
        if hasattr(editor.tr, "reshard"):  # FSDP keeps the root's gathered weights after a forward: drop them
            editor.tr.reshard()
        for n, w in ws.items():
            params[n].detach().copy_(w)  # no autograd record, whether or not the caller runs under no_grad
        if lora_off:
            (editor.tr.disable_adapters if ws is weights else editor.tr.enable_adapters)()
        if ws is weights:
            yield

def save_checkpoint(out_dir, step, editor, opt, history, args, ddp, old):
    """out_dir/ckpt_<step>, linked from out_dir/ckpt: the LoRA in diffusers' format with rank and alpha (without them
    load_lora_weights takes alpha = r), every trained tensor, NFT's old policy, optimizer state, step. Collective."""
    from peft.utils import get_peft_model_state_dict
    tr = editor.tr
    tr.reshard() if args.fsdp else None  # after a forward the root module holds gathered copies of its parameters
    state = {n: (q.full_tensor() if hasattr(q, "full_tensor") else q).detach().cpu().contiguous()
             for n, q in tr.named_parameters() if q.requires_grad}
    old = {n: (w.full_tensor() if hasattr(w, "full_tensor") else w).cpu().contiguous() for n, w in old.items()}
    # the whole optimizer state keyed by parameter name (gathered under FSDP, where each rank holds a shard)
    opt_state = get_optimizer_state_dict(tr, opt, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    def write(d):
        if args.lora_rank > 0:
            lora = get_peft_model_state_dict(tr, state_dict={n: v for n, v in state.items() if "lora_" in n})
            type(editor.pipe).save_lora_weights(d, transformer_lora_layers=lora,
                                                transformer_lora_adapter_metadata=tr.peft_config["default"].to_dict())
        save_file(state, os.path.join(d, "trainable.safetensors"))
        save_file(old, os.path.join(d, "old_policy.safetensors")) if old else None  # NFT's, for an exact --resume
        torch.save(opt_state, os.path.join(d, "optimizer.pt"))
        with open(os.path.join(d, "state.json"), "w") as f:
            json.dump({"step": step, "history": history, "args": vars(args)}, f)
    if ddp.master:
        atomic_dir(os.path.join(out_dir, f"ckpt_{step:06d}"), write, link=os.path.join(out_dir, "ckpt"))
        atomic_write(os.path.join(out_dir, "history.json"), lambda f: json.dump(json.loads(json.dumps(history),
                     parse_constant=lambda c: None), f))  # to follow a long run; NaN (no oracle): null, strict JSON

def load_checkpoint(ckpt, named, args, old=None):
    """Copy a checkpoint's trained tensors (and NFT's old policy) into unsharded ones -> (step, history, opt state)."""
    meta = json.loads(open(os.path.join(ckpt, "state.json")).read())  # its flags: checked by main, before loading
    saved = load_file(os.path.join(ckpt, "trainable.safetensors"))
    with torch.no_grad():
        for n, q in named:
            q.copy_(saved[n])
        for n, w in (load_file(os.path.join(ckpt, "old_policy.safetensors")) if old else {}).items():
            old[n].copy_(w)
    return meta["step"], meta["history"], torch.load(os.path.join(ckpt, "optimizer.pt"), weights_only=True)

@torch.no_grad()
def rollout(editor, prompts, noise_keys, sigmas, sde_steps, args, gen):
    """This rank's samples, --micro_batch at a time -> (edits [PIL], batches [(lo, hi, cond, trajectory, final x)])."""
    editor.tr.eval()  # no dropout: the rollout's log-probs must be reproducible by the training forward
    batches = []
    editor.condition(prompts)  # encodes every new prompt at once: --offload moves the text encoders once a step
    for lo in range(0, len(prompts), args.micro_batch):
        hi = min(lo + args.micro_batch, len(prompts))
        cond = editor.condition(prompts[lo:hi])
        x, traj = sample(editor, cond, initial_noise(editor, noise_keys[lo:hi], editor.device), sigmas,
                         sde_steps if args.algo == "grpo" else set(), args.noise_level, gen)  # NFT: the plain ODE
        batches.append((lo, hi, cond, traj, x))
    return editor.decode(torch.cat([b[-1] for b in batches])), batches

def update(editor, opt, named, ref, batches, adv, sigmas, sde_steps, args):
    """One optimizer step on this rank's samples (Flow-GRPO's code takes two a rollout, and drops zero advantages),
    accumulating micro-batches x SDE steps (the loss is their mean); on policy, so the ratios are 1. -> log stats."""
    ratios, clipped, kls, n = [], [], [], sum(hi - lo for lo, hi, *_ in batches)
    opt.zero_grad(set_to_none=False)
    for (lo, hi, cond, *_), (j, x_t, x_next, old_lp) in [(b, t) for b in batches for t in b[3]]:
        step = dict(sigma=sigmas[j], sigma_next=sigmas[j + 1], noise_level=args.noise_level, prev_sample=x_next)
        if args.beta > 0:  # before the policy's forward: the swap writes into weights its backward would need
            with torch.no_grad(), swapped_in(editor, named, ref):
                ref_mean = sde_step(x_t, editor.velocity(x_t, sigmas[j], cond), **step)[2]
        _, lp, mean, std = sde_step(x_t, editor.velocity(x_t, sigmas[j], cond), **step)
        kl = gaussian_kl(mean, ref_mean, std) if args.beta > 0 else None
        kls += [kl.detach().mean()] if kl is not None else []
        loss, ratio, clip = grpo_loss(lp, old_lp, adv[lo:hi], args.clip_range, kl, args.beta)
        (loss * (hi - lo) / n / len(sde_steps)).backward()
        ratios.append(ratio[adv[lo:hi] != 0])
        clipped.append(clip[adv[lo:hi] != 0].float())
    grad_norm = optimizer_step(opt, [q for _, q in named], args.grad_clip, reduce=not args.fsdp)
    ratio = torch.cat(ratios) if sum(map(len, ratios)) else torch.ones(1)  # every group dropped
    kl = float(gather(torch.stack(kls).mean()[None]).mean()) if kls else 0.0  # every rank's; clip, ratio: rank 0's
    return {"kl": kl, "clip": float(torch.cat(clipped).mean().nan_to_num()), "ratio_mean": float(ratio.mean()),
            "ratio_min": float(ratio.min()), "ratio_max": float(ratio.max()), "grad_norm": grad_norm}

def nft_update(editor, opt, named, old, batches, adv, sigmas, args, gen):
    """DiffusionNFT's step (NVlabs/DiffusionNFT, scripts/train_nft_sd3.py): each clean edit x0, fresh-noised to a random
    K = --sde_window (0: N - 1) of the rollout's N sigmas, in nft_loss; the (ODE) rollouts are the soft-following old
    policy's, CFG-free. Simplified: no KL (theirs: 1e-4), no EMA copy for eval, Euler rollouts (theirs: DPM2)."""
    n, K, dev = sum(hi - lo for lo, hi, *_ in batches), args.sde_window or args.num_steps - 1, gen.device
    opt.zero_grad(set_to_none=False)
    for lo, hi, cond, _, x0 in batches:
        idx = torch.stack([torch.randperm(args.num_steps, generator=gen, device=dev)[:K] for _ in range(hi - lo)])
        r = 0.5 + 0.5 * (adv[lo:hi] / 5).clamp(-1, 1)  # the optimality probability, clipped at A = +-5 as theirs
        for t in sigmas.to(dev)[idx].T:  # (B,): each sample's next sigma
            noise = torch.randn(x0.shape, generator=gen, device=dev)
            x_t = (1 - t[:, None, None]) * x0 + t[:, None, None] * noise
            with torch.no_grad(), swapped_in(editor, named, old):
                v_old = editor.velocity(x_t, t, cond)
            loss = nft_loss(editor.velocity(x_t, t, cond), v_old, noise - x0, t, r, args.nft_beta)
            (loss * (hi - lo) / n / K).backward()
    return {"kl": 0.0, "grad_norm": optimizer_step(opt, [q for _, q in named], args.grad_clip, reduce=not args.fsdp)}

def optimizer_step(opt, params, grad_clip, reduce=True):
    """Average the gradients over ranks (DDP's reduction by hand: the reference pass and the frozen-base forward would
    fight a DDP wrapper's hooks; not under FSDP, which reduces them itself), clip their norm, step -> the norm."""
    for p in params if reduce else []:  # a parameter no loss reached on this rank still joins the reduction
        p.grad = torch.zeros_like(p) if p.grad is None else p.grad
    if reduce and dist.is_initialized() and dist.get_world_size() > 1:
        flat = torch.cat([p.grad.flatten() for p in params])
        dist.all_reduce(flat)
        torch.nn.utils.vector_to_parameters(flat / dist.get_world_size(), [p.grad for p in params])
    grad_norm = torch.nn.utils.clip_grad_norm_(params, grad_clip or math.inf)  # 0: off (a clip to 0 would zero them)
    opt.step()
    return float(grad_norm)

# ----------------------------------------------------------------------------- flags and the loop
# the toy recipe: a noisy warm-up (65% wrong targets) leaves an imperfect, stochastic editor; a group shares its noise,
# so rewards differ only by the SDE steps, at the start where the layout is decided; RL trains the text-conditioning
# embeddings in full (their gradient agrees across prompts, the blocks' does not); 1 thread: figures whatever the cores
TOY = dict(editor="tiny", sft_steps=1000, steps=60, same_noise_per_group=True, num_steps=8, sde_window=3,
           window_max_start=0, noise_level=0.7, prompts_per_step=8, group_size=8, micro_batch=16, lora_rank=0,
           train_modules="context_embedder,time_text_embed.text_embedder", lr=1e-3, max_sequence_length=48,
           eval_every=10, eval_prompts=48, threads=1, resolution=32)

def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    # --- editor
    p.add_argument("--editor", default="tiny", help="tiny (Kontext), tiny-qwen or a pipeline path")
    p.add_argument("--dtype", default="fp32", choices=list(DTYPES), help="compute dtype (trained weights stay fp32)")
    p.add_argument("--resolution", type=int, default=512, help="square output side in pixels (Flow-GRPO's 512)")
    p.add_argument("--guidance", type=float, default=None, help="Kontext's guidance (2.5), Qwen's true CFG (4; nft: 1)")
    p.add_argument("--cond_pixels", type=int, default=0, help="Qwen's VL view of sources; 0: output's (Plus 384^2)")
    p.add_argument("--max_sequence_length", type=int, default=512, help="T5 tokens of Kontext prompts")
    p.add_argument("--grad_checkpointing", action="store_true", help="recompute transformer blocks in backward")
    p.add_argument("--offload", action="store_true", help="keep the text encoders on the CPU between uses")
    p.add_argument("--fsdp", action="store_true", help="shard the transformer over ranks with FSDP2 fully_shard")
    # --- data
    p.add_argument("--toy", action="store_true", help="toy world: tiny editor, data/toy, the recipe in TOY")
    p.add_argument("--train_prompts", default="data/toy/rl_train.jsonl", help="RL edit prompts (data.py formats)")
    p.add_argument("--test_prompts", default="data/toy/rl_test.jsonl", help="held-out prompts of the ODE evaluation")
    p.add_argument("--sft_data", default="data/toy/editor_train.jsonl", help="warm-up (source, instruction, target)s")
    p.add_argument("--sft_steps", type=int, default=0, help="toy warm-up: flow-matching steps on --sft_data")
    # --- sampling
    p.add_argument("--num_steps", type=int, default=8, help="sampling steps of a rollout")
    p.add_argument("--eval_num_steps", type=int, default=8, help="ODE steps of the evaluation")
    p.add_argument("--noise_level", type=float, default=0.7, help="grpo: a in the SDE's noise (nft rolls out ODEs)")
    p.add_argument("--sde_window", type=int, default=0, help="SDE + train on N steps, 0: all but last (nft: N sigmas)")
    p.add_argument("--window_max_start", type=int, default=-1, help="grpo: latest first step of the window (Flow-"
                   "GRPO's sde_window_range: the early, noisy steps decide the layout); -1 = any")
    # --- GRPO and DiffusionNFT
    p.add_argument("--algo", default="grpo", choices=["grpo", "nft"], help="Flow-GRPO or DiffusionNFT (nft_loss)")
    p.add_argument("--nft_beta", type=float, default=1.0, help="nft: beta of the implicit policies' mixing")
    p.add_argument("--nft_decay", type=float, default=0.5, help="nft: cap c of the old policy's decay min(step/1e3, c)")
    p.add_argument("--steps", type=int, default=100, help="RL steps (rollout + update rounds)")
    p.add_argument("--prompts_per_step", type=int, default=8, help="prompts per step (global)")
    p.add_argument("--group_size", type=int, default=8, help="samples per prompt (>= 2), spread over ranks")
    p.add_argument("--same_noise_per_group", action="store_true", help="grpo: a group shares its initial noise")
    p.add_argument("--clip_range", type=float, default=1e-4, help="grpo: PPO ratio clip c")
    p.add_argument("--beta", type=float, default=0.0, help="grpo: KL weight to the starting policy (Flow-GRPO's scale)")
    p.add_argument("--micro_batch", type=int, default=8, help="samples per forward and per decode on each rank")
    # --- trained weights and optimizer
    p.add_argument("--lora_rank", type=int, default=8, help="LoRA rank; 0 = no adapter")
    p.add_argument("--lora_alpha", type=int, default=16, help="LoRA alpha (scale = alpha / rank)")
    p.add_argument("--lora_targets", default="", help="comma-separated LoRA modules; empty: Flow-GRPO's")
    p.add_argument("--train_modules", default="", help="comma-separated modules trained in full")
    p.add_argument("--lr", type=float, default=3e-4, help="AdamW learning rate (also the warm-up's)")
    p.add_argument("--grad_clip", type=float, default=1.0, help="gradient norm clip (0 = off)")
    # --- reward, logging and checkpoints
    p.add_argument("--reward", default="oracle", help="'oracle' (toy world) or 'rm:PATH' / 'rm:PATH@dim'")
    p.add_argument("--reward_prompts", default=None, help="rm: the reward model's --prompt_file (published models)")
    p.add_argument("--out_dir", default="out/grpo", help="logs, sheets, checkpoints")
    p.add_argument("--eval_every", type=int, default=10, help="ODE eval + checkpoint every N steps (0: at the end)")
    p.add_argument("--eval_prompts", type=int, default=32, help="held-out prompts in the eval")
    p.add_argument("--resume", action="store_true", help="continue out_dir/ckpt exactly (same flags; none yet: step 0)")
    p.add_argument("--seed", type=int, default=0, help="seed of the prompt order and the noise")
    p.set_defaults(**TOY) if p.parse_args(argv).toy else None  # the toy's recipe, under any flag given
    args = p.parse_args(argv)
    n, world = args.prompts_per_step * args.group_size, int(os.environ.get("WORLD_SIZE", 1))
    check_least(p, args, dict(group_size=2, prompts_per_step=1, micro_batch=1, steps=1, eval_prompts=1, grad_clip=0,
                              clip_range=0, beta=0, noise_level=0, num_steps=2, eval_num_steps=1, lora_alpha=1))
    if args.lora_rank < 1 and not args.train_modules:
        p.error("nothing to train: --lora_rank 0 and no --train_modules")
    p.error(f"--max_sequence_length {args.max_sequence_length}: at most 512 (T5's)") if args.max_sequence_length > 512 \
        else None  # T5's training length; FluxKontextPipeline refuses more
    p.error("--sde_window must be < --num_steps (the last step is ODE)") if args.sde_window >= args.num_steps else None
    p.error(f"prompts_per_step x group_size = {n} must divide over {world} ranks") if n % world else None
    if args.reward != "oracle" and not args.reward.startswith("rm:"):  # said before minutes of loading the editor
        p.error(f"--reward {args.reward!r}: use 'oracle', 'rm:PATH' or 'rm:PATH@dim'")
    path = args.reward[3:].partition("@")[0]  # a typo'd path, too (what RewardModel.from_pretrained recognises)
    if args.reward != "oracle" and not (path in TINY_MODELS or os.path.isfile(f"{path}/args.json")
                                        or published_layout(path)):
        p.error(f"--reward {args.reward!r}: {path} holds no reward model (args.json, EditScore or EditReward weights)")
    try:  # a bad --reward_prompts file, too, is said before minutes of loading the editor
        read_prompts(args.reward_prompts) if args.reward_prompts else None
    except ValueError as e:
        p.error(str(e))
    p.error("--fsdp needs torchrun (--nproc_per_node=1: one GPU)") if args.fsdp and "RANK" not in os.environ else None
    grpo_only = ("same_noise_per_group", "clip_range", "beta", "noise_level", "window_max_start")  # nft: ODE rollouts
    check_unused(p, args, ("nft_beta", "nft_decay") if args.algo == "grpo" else grpo_only, f"--algo {args.algo}")
    return args

def main(args):
    ddp = setup_distributed()
    torch.set_num_threads(TOY["threads"]) if args.toy else None
    os.makedirs(args.out_dir, exist_ok=True)
    if os.path.isdir(ckpt := os.path.join(args.out_dir, "ckpt")) and args.resume:  # a changed flag: before loading
        check_resume(ckpt, json.load(open(os.path.join(ckpt, "state.json")))["args"], vars(args), RESUME_FREE)
    elif os.path.isdir(ckpt):  # said before it is lost
        print0(f"warning: {ckpt} holds another run's checkpoint; without --resume this run writes over it")
    train, test = load_prompts(args.train_prompts), load_prompts(args.test_prompts)[: args.eval_prompts]
    if args.reward == "oracle" and (bad := [p for p in train + test if not parse_toy_instruction(p.instruction)]):
        raise SystemExit(f"{bad[0].origin}: not a toy-world edit, which --reward oracle needs: {bad[0].instruction!r}")
    editor = load_editor(args, ddp.device)
    torch.manual_seed(args.seed)  # the same on every rank: the LoRA starts identical everywhere, as under DDP
    sigmas, eval_sigmas = editor.sigmas(args.num_steps), editor.sigmas(args.eval_num_steps)
    warmup(editor, args, ddp)
    named, ref = setup_trainable(editor, args)
    old = {n: q.detach().clone() for n, q in named} if args.algo == "nft" else {}  # NFT's old policy starts as theta
    resumed = args.resume and os.path.isdir(ckpt)  # the weights go in before FSDP shards them
    start, history, opt_state = load_checkpoint(ckpt, named, args, old) if resumed else (0, None, None)
    editor.tr.enable_gradient_checkpointing() if args.grad_checkpointing else None
    if args.fsdp:
        named, ref, old = shard_transformer(editor.tr, ref, old)
    reward_fn = make_reward(args.reward, ddp.device, args.reward_prompts)  # after sharding: less peak memory
    opt = torch.optim.AdamW([q for _, q in named], lr=args.lr, weight_decay=0.0)
    if opt_state is not None:  # keyed by parameter name: under FSDP each rank keeps its shard
        set_optimizer_state_dict(editor.tr, opt, opt_state, options=StateDictOptions(full_state_dict=True))
    print0(f"training {sum(q.numel() for _, q in named):,} parameters on {ddp.world} rank(s) from step {start}")
    history, t_run = history or {"eval": [], "train": []}, time.time()
    if start == 0:
        history["eval"].append(evaluate(editor, test, reward_fn, eval_sigmas, ddp, args, 0))
    for step in range(start, args.steps):
        # plan: the same prompts and slots on every rank, each rank its slice; SDE noise differs per rank
        t0 = time.time()
        mine, groups, noise_keys = rollout_plan(args.seed, step, len(train), args.prompts_per_step, args.group_size,
                                                ddp.rank, ddp.world, args.same_noise_per_group and args.algo == "grpo")
        prompts = [train[groups[g]] for g, _ in mine]
        sde_steps = sde_window(args.seed, step, args.num_steps, args.sde_window, args.window_max_start)
        gen = torch.Generator(ddp.device).manual_seed(seed_of(args.seed, SDE_NOISE, step, ddp.rank))
        with swapped_in(editor, named, old) if old else contextlib.nullcontext():  # NFT samples with the old policy
            edits, batches = rollout(editor, prompts, noise_keys, sigmas, sde_steps, args, gen)
        t_rollout, t0 = time.time() - t0, time.time()
        # reward, then advantages normalised within each group over every rank's samples (slot order)
        rewards = gather(reward_fn(prompts, edits).to(ddp.device))
        gids = gather(torch.tensor([g for g, _ in mine], device=ddp.device))
        adv = group_advantages(rewards, gids)  # zero for groups whose rewards are all equal: they teach nothing
        zero_std = float(torch.stack([(adv[gids == g] == 0).all() for g in gids.unique()]).double().mean())
        adv = adv[ddp.rank * len(mine) : (ddp.rank + 1) * len(mine)]
        t_reward, t0 = time.time() - t0, time.time()
        stats = update(editor, opt, named, ref, batches, adv, sigmas, sde_steps, args) if args.algo == "grpo" else \
            nft_update(editor, opt, named, old, batches, adv, sigmas, args, gen)
        del edits, batches  # the trajectories: freed before the eval and the next rollout, not after them
        decay = min(0.001 * (step + 1), args.nft_decay)  # NFT's soft update (its decay_type 1), after the step
        for n, q in named if old else []:
            old[n].mul_(decay).add_(q.detach(), alpha=1 - decay)
        # log: one line per step, rank 0's view of the update, every rank's rewards
        scored = rewards[~torch.isnan(rewards)]
        rec = {"step": step + 1, "reward": float(scored.mean()), "reward_std": float(scored.std()),
               "unscored": len(rewards) - len(scored), "zero_std": zero_std, **stats,
               "rollout_s": t_rollout, "reward_s": t_reward, "train_s": time.time() - t0}
        history["train"].append(rec)
        ppo = f" | clip {rec['clip']:.3f} | ratio {rec['ratio_mean']:.5f} [{rec['ratio_min']:.5f}, " \
            f"{rec['ratio_max']:.5f}]" if "clip" in rec else ""
        print0(f"step {step + 1}/{args.steps} | reward {rec['reward']:.4f} ± {rec['reward_std']:.4f} | zero-std "
               f"{zero_std:.2f} | unscored {rec['unscored']} | kl {rec['kl']:.2e}{ppo} | gnorm "
               f"{rec['grad_norm']:.2e} | rollout {t_rollout:.1f}s reward {t_reward:.1f}s train {rec['train_s']:.1f}s")
        if args.eval_every and (step + 1) % args.eval_every == 0 or step + 1 == args.steps:
            history["eval"].append(evaluate(editor, test, reward_fn, eval_sigmas, ddp, args, step + 1))
            save_checkpoint(args.out_dir, step + 1, editor, opt, history, args, ddp, old)
    ev = history["eval"]
    print0(f"done in {time.time() - t_run:.0f}s | eval oracle {ev[0]['oracle']:.4f} -> {ev[-1]['oracle']:.4f} "
           f"| eval reward {ev[0]['reward']:.4f} -> {ev[-1]['reward']:.4f}")
    leave_distributed() if ddp.ddp else None

if __name__ == "__main__":
    main(parse_args())
