"""
Flow-GRPO for instruction-guided image editors, rewarded by the project's reward model.

An editor (FLUX.1-Kontext-dev, Qwen-Image-Edit[-2509], or `--editor tiny`: the Kontext architecture built
small with random weights) samples G edits per prompt with a stochastic sampler; a reward model scores them;
group-normalised advantages drive a PPO-clipped update of a LoRA adapter and/or of modules trained in full
(Flow-GRPO, arXiv 2505.05470, as EditScore and Edit-R1 use it on editors). Formulas: REFERENCE.md section 6.

The sampling loop is our own, over the pipeline's components: prompt encoding, condition-image latents,
the transformer, the scheduler's shifted sigmas, the VAE. Simplified: square images at --resolution, one
condition image (the first source) in the latents. The tiny editors work in pixel space: their "VAE" is a
space-to-depth patchify (a random tiny VAE would destroy the images); everything else is the real path.
Before RL, `--sft_steps` warms the editor up by supervised flow matching on (source, instruction, target)
triples: on the toy world, noisy ones, which leaves an imperfect and stochastic editor for RL to improve.

  # CPU, toy world: warm-up, then GRPO on the toy oracle (each phase capped at 10 minutes)
  python data.py --toy --out data/toy && python grpo.py --toy --reward oracle
  python grpo.py --toy --reward rm:out/rm                      # rewarded by a trained reward model
  python grpo.py --toy --steps 0 --sft_steps 2500 --sft_eval_every 500 --out_dir out/sft_more  # baseline: warm-up only
  # 1 GPU, FLUX.1-Kontext-dev (Flow-GRPO's settings: 6 steps, noise 0.9, LoRA r=64 a=128, lr 3e-4)
  python grpo.py --editor black-forest-labs/FLUX.1-Kontext-dev --data_dir data/rl --reward rm:out/rm \\
      --dtype bf16 --resolution 512 --num_steps 6 --noise_level 0.9 --lora_rank 64 --lora_alpha 128 \\
      --group_size 24 --prompts_per_step 4 --micro_batch 4 --grad_checkpointing --offload
  # 8 GPUs, Qwen-Image-Edit with true CFG (--nnodes/--node_rank/--rdzv_endpoint for several nodes)
  torchrun --nproc_per_node=8 grpo.py --editor Qwen/Qwen-Image-Edit --true_cfg 4 --num_steps 10 \\
      --dtype bf16 --resolution 512 --cond_pixels 262144 --data_dir data/rl --reward rm:out/rm \\
      --lora_rank 64 --lora_alpha 128 --group_size 16 --prompts_per_step 8 --micro_batch 2 --grad_checkpointing --fsdp
  # (README: the same editors on 1 and 8 GPUs, and what their weights need)

Outputs in --out_dir: one log line per step, eval_*.png / samples_*.png grids, curves.png, history.json,
sft/transformer.safetensors (the warmed-up editor) and ckpt/ (a symlink to the latest checkpoint):
pytorch_lora_weights.safetensors for `pipeline.load_lora_weights(ckpt)`, trainable.safetensors with every
trained tensor (`pipeline.transformer.load_state_dict(load_file(...), strict=False)` for the fully trained
modules), optimizer.pt and state.json for `--resume`.
"""
import argparse
import json
import math
import os
import random
import shutil
import time

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from PIL import Image, ImageDraw

from data import leave_distributed, load_image, load_prompts, shard, toy_oracle

# ----------------------------------------------------------------------------- the math


def sde_step(x, v, sigma, sigma_next, noise_level, prev_sample=None, generator=None, kind="sde"):
    """One reverse step of the flow x_s = (1 - s) x0 + s eps from sigma down to sigma_next.

    kind="sde" (Flow-GRPO): the SDE with the ODE's marginals, std_s = a sqrt(s / (1 - s)),
      mean = x (1 + std_s^2 dt / 2s) + v (1 + std_s^2 (1 - s) / 2s) dt,  transition std = std_s sqrt(-dt).
      At sigma = 1 the root divides by zero; like the public code we use sigma_next inside the root there.
    kind="cps" (coefficients-preserving, arXiv 2509.05952): predict x0 = x - s v and eps = x + (1 - s) v,
      mean = x0 (1 - s') + eps sqrt(s'^2 - std^2),  std = s' sin(a pi / 2): fresh noise replaces part of eps.
    noise_level a = 0 is the Euler (ODE) step; its transition has no density and log_prob is 0.
    If prev_sample is given it is scored instead of sampled. Everything is computed in fp32.
    Returns prev_sample (x.dtype), log_prob (B,) = Gaussian log-density averaged over non-batch elements,
    mean (fp32, x's shape), std (B,) = the transition's standard deviation.
    """
    B, dims = x.shape[0], tuple(range(1, x.dim()))
    col = (B,) + (1,) * (x.dim() - 1)
    s = torch.as_tensor(sigma, dtype=torch.float32, device=x.device).expand(B).reshape(col)
    s_next = torch.as_tensor(sigma_next, dtype=torch.float32, device=x.device).expand(B).reshape(col)
    xf, vf = x.float(), v.float()
    if kind == "sde":
        dt = s_next - s  # < 0
        s_root = torch.where(s >= 1, s_next, s)
        std_s = noise_level * torch.sqrt(s_root / (1 - s_root))
        mean = xf * (1 + std_s**2 / (2 * s) * dt) + vf * (1 + std_s**2 * (1 - s) / (2 * s)) * dt
        std = std_s * torch.sqrt(-dt)
    elif kind == "cps":
        std = s_next * math.sin(noise_level * math.pi / 2)
        mean = (xf - s * vf) * (1 - s_next) + (xf + (1 - s) * vf) * torch.sqrt(s_next**2 - std**2)
    else:
        raise ValueError(f"unknown sampler kind {kind!r}: use 'sde' or 'cps'")
    if prev_sample is None:
        noise = torch.randn(x.shape, generator=generator, device=x.device, dtype=torch.float32)
        prev_sample = (mean + std * noise).to(x.dtype)
    # a zero std would give 0/0; score with std 1 there and zero the result (no NaN reaches the gradients)
    live = std > 0
    safe = torch.where(live, std, torch.ones_like(std))
    elem = -((prev_sample.float() - mean) ** 2) / (2 * safe**2) - torch.log(safe) - 0.5 * math.log(2 * math.pi)
    log_prob = torch.where(live.reshape(B), elem.mean(dim=dims), torch.zeros(B, device=x.device))
    return prev_sample, log_prob, mean, std.reshape(B)


def group_advantages(rewards, group_ids, eps=1e-4, clip=5.0):
    """A_i = (r_i - mean_g) / (std_g + eps), population std over i's group g, clipped to +-clip. (N,) -> (N,)
    A NaN reward (an unscored sample: a verifier whose every pass failed to parse) gets A = 0 and stays out of
    its group's mean and std: no guessed score ever becomes a gradient."""
    r = rewards.float()
    ok = ~torch.isnan(r)
    _, g = torch.unique(group_ids, return_inverse=True)  # (N,) group index 0..K-1
    K = int(g.max()) + 1
    count = torch.zeros(K, device=r.device).index_add_(0, g, ok.float()).clamp(min=1)
    mean = torch.zeros(K, device=r.device).index_add_(0, g, torch.where(ok, r, 0.0)) / count
    dev = torch.where(ok, r - mean[g], 0.0)
    var = torch.zeros(K, device=r.device).index_add_(0, g, dev**2) / count
    return torch.where(ok, dev / (var.sqrt()[g] + eps), 0.0).clamp(-clip, clip)


def gaussian_kl(mean, ref_mean, std):
    """KL between the policy's and the reference's transition Gaussians (same std): |mu - mu_ref|^2 / 2std^2,
    averaged over non-batch elements like the log-prob. (B, ...) -> (B,)"""
    return ((mean - ref_mean) ** 2).flatten(1).mean(1) / (2 * std**2)


def grpo_loss(log_prob, old_log_prob, advantages, clip_range, kl=None, beta=0.0):
    """PPO-clipped GRPO loss: mean_i max(-A_i rho_i, -A_i clip(rho_i, 1 - c, 1 + c)) + beta mean(kl),
    rho_i = exp(log_prob_i - old_log_prob_i). The log-probs are per-element means, so c is tiny (1e-4).
    Returns (loss, ratio (B,), clipped (B,) bool)."""
    ratio = torch.exp(log_prob - old_log_prob)
    unclipped = -advantages * ratio
    clipped = -advantages * ratio.clamp(1 - clip_range, 1 + clip_range)
    loss = torch.maximum(unclipped, clipped).mean()
    if kl is not None and beta > 0:
        loss = loss + beta * kl.mean()
    return loss, ratio.detach(), ((ratio.detach() - 1).abs() > clip_range)


def flow_matching_loss(v_pred, x0, noise):
    """Supervised flow matching (the warm-up): x_s = (1 - s) x0 + s eps has velocity eps - x0."""
    return F.mse_loss(v_pred.float(), noise - x0)


# ----------------------------------------------------------------------------- editors


def pack(lat):
    """(B, C, h, w) -> (B, h/2 * w/2, 4C): the 2x2 token packing of the Flux / Qwen-Image pipelines."""
    B, C, h, w = lat.shape
    return lat.view(B, C, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(B, (h // 2) * (w // 2), C * 4)


def unpack(x, C, h, w):
    """Inverse of pack: (B, h/2 * w/2, 4C) -> (B, C, h, w)."""
    return x.view(x.shape[0], h // 2, w // 2, C, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(x.shape[0], C, h, w)


def to_tensor(img, side):
    """PIL -> (3, side, side) in [-1, 1]."""
    a = np.asarray(img.convert("RGB").resize((side, side), Image.BICUBIC), dtype=np.float32)
    return torch.from_numpy(a).permute(2, 0, 1) / 127.5 - 1


def to_pil(x):
    """(B, 3, H, W) in [-1, 1] -> list of PIL."""
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


def tiny_qwen_edit(seed=0, patch=2, width=64):
    """QwenImageEditPipeline with a tiny random QwenImageTransformer2DModel and the reward model's offline
    tiny Qwen2.5-VL as text encoder (it sees the condition image too), pixel-space latents as above."""
    from diffusers import FlowMatchEulerDiscreteScheduler, QwenImageEditPipeline, QwenImageTransformer2DModel
    from rewardmodel import build_tiny_vlm

    vlm, processor = build_tiny_vlm()
    torch.manual_seed(seed)
    transformer = QwenImageTransformer2DModel(in_channels=4 * 3 * patch**2, out_channels=3 * patch**2, num_layers=2,
                                              attention_head_dim=32, num_attention_heads=width // 32,
                                              joint_attention_dim=vlm.config.text_config.hidden_size,
                                              axes_dims_rope=(4, 14, 14))
    scheduler = FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True, base_shift=0.5, max_shift=0.9,
                                                base_image_seq_len=256, max_image_seq_len=8192, shift_terminal=0.02,
                                                time_shift_type="exponential")
    return QwenImageEditPipeline(scheduler=scheduler, vae=None, text_encoder=vlm.eval(), tokenizer=processor.tokenizer,
                                 processor=processor, transformer=transformer.eval())


class Editor:
    """The sampling loop's view of an editing pipeline: condition(prompts) -> cond, velocity(x, sigma, cond),
    encode/decode images <-> packed latents (B, tokens, 4C). Prompt embeddings and condition latents are
    cached per prompt, so the text encoders run once per prompt and can then live off the GPU."""

    def __init__(self, pipe, args, device, pixel_patch=0):
        self.pipe, self.tr, self.args, self.device = pipe, pipe.transformer, args, device
        self.qwen = "QwenImage" in type(pipe).__name__
        self.plus = "Plus" in type(pipe).__name__
        self.patch = pixel_patch  # > 0: pixel space, the "VAE" is a space-to-depth by this factor
        self.down = pixel_patch or pipe.vae_scale_factor
        self.C = 3 * pixel_patch**2 if pixel_patch else pipe.latent_channels
        self.side = args.resolution // (2 * self.down) * 2  # latent side, even for the 2x2 packing
        # Qwen's pipeline resizes the condition to a 1024^2 area whatever the output size (17 s instead of
        # 0.1 s on a tiny CPU model); we encode it at --cond_pixels, by default the output's own size
        cond_px = args.cond_pixels if self.qwen and args.cond_pixels else args.resolution**2
        self.cond_side = int(math.sqrt(cond_px)) // (2 * self.down) * 2
        self.cache, self.text_cache = {}, {}

    def sigmas(self, num_steps):
        """The model's shifted schedule: linspace(1, 1/N, N), time-shifted by the scheduler (mu from the
        token count when the model uses dynamic shifting), then a final 0. (N + 1,) on CPU, fp32."""
        from diffusers.pipelines.flux.pipeline_flux import calculate_shift

        sched, cfg = self.pipe.scheduler, self.pipe.scheduler.config
        mu = calculate_shift((self.side // 2) ** 2, cfg.get("base_image_seq_len", 256),
                             cfg.get("max_image_seq_len", 4096), cfg.get("base_shift", 0.5), cfg.get("max_shift", 1.15))
        mu = mu if cfg.use_dynamic_shifting else None
        sched.set_timesteps(sigmas=np.linspace(1.0, 1 / num_steps, num_steps), mu=mu)
        return sched.sigmas.float().cpu()

    @torch.no_grad()
    def encode_images(self, imgs, side):
        """PIL list -> packed latents (B, tokens, 4C) in fp32 on the device."""
        x = torch.stack([to_tensor(im, side * self.down) for im in imgs]).to(self.device)
        if self.patch:
            return pack(F.pixel_unshuffle(x, self.patch))
        vae = self.pipe.vae.to(self.device)
        x = x.to(vae.dtype)
        lat = self.pipe._encode_vae_image(x.unsqueeze(2) if self.qwen else x, generator=None)  # scaled as in training
        lat = pack((lat[:, :, 0] if self.qwen else lat).float())
        if self.args.offload:
            vae.to("cpu")
        return lat

    @torch.no_grad()
    def decode(self, x):
        """Packed latents -> list of PIL images."""
        lat = unpack(x.float(), self.C, self.side, self.side)
        if self.patch:
            return to_pil(F.pixel_shuffle(lat, self.patch))
        vae = self.pipe.vae.to(self.device)
        if self.qwen:  # Qwen's VAE is a video VAE with per-channel latent statistics
            mean = torch.tensor(vae.config.latents_mean, device=lat.device).view(1, -1, 1, 1)
            std = torch.tensor(vae.config.latents_std, device=lat.device).view(1, -1, 1, 1)
            img = vae.decode((lat * std + mean).unsqueeze(2).to(vae.dtype), return_dict=False)[0][:, :, 0]
        else:
            lat = lat / vae.config.scaling_factor + vae.config.shift_factor
            img = vae.decode(lat.to(vae.dtype), return_dict=False)[0]
        if self.args.offload:
            vae.to("cpu")
        return to_pil(img)

    @torch.no_grad()
    def _encode(self, new):
        """Fill the cache for EditPrompts not seen yet: condition latents, prompt embeddings."""
        pipe, args = self.pipe, self.args
        encoders = [pipe.text_encoder] + ([] if self.qwen else [pipe.text_encoder_2])
        for enc in encoders:
            enc.to(self.device)
        sources = {p.id: [load_image(s, p.origin) for s in p.sources] for p in new}
        for p in new:
            self.cache[p.id] = {"image": self.encode_images(sources[p.id][:1], self.cond_side).cpu()}
        if self.qwen:  # the VL text encoder also sees the condition image(s): one prompt at a time
            for p in new:
                vl = [im.convert("RGB").resize((self.cond_side * self.down,) * 2) for im in sources[p.id]]
                for key, text in (("text", p.instruction), ("neg", args.negative_prompt))[: 1 + (args.true_cfg > 1)]:
                    emb, _ = pipe.encode_prompt(prompt=[text], image=vl if self.plus else vl[0], device=self.device)
                    self.cache[p.id][key] = emb[0].float().cpu()
        else:  # Kontext's text embeddings do not depend on the image: one batch, keyed by the instruction
            texts = sorted({p.instruction for p in new} - set(self.text_cache))
            if texts:
                emb, pooled, _ = pipe.encode_prompt(prompt=texts, prompt_2=None, device=self.device,
                                                    max_sequence_length=args.max_sequence_length)
                for i, t in enumerate(texts):
                    self.text_cache[t] = {"text": emb[i : i + 1].float().cpu(),
                                          "pooled": pooled[i : i + 1].float().cpu()}
            for p in new:
                self.cache[p.id].update(self.text_cache[p.instruction])
        if args.offload:
            for enc in encoders:
                enc.to("cpu")

    def condition(self, prompts):
        """Batch the cached per-prompt conditioning for a list of EditPrompts (one per sample)."""
        new = list({p.id: p for p in prompts if p.id not in self.cache}.values())
        if new:
            self._encode(new)
        es, dev, B = [self.cache[p.id] for p in prompts], self.device, len(prompts)
        cond = {"image": torch.cat([e["image"] for e in es]).to(dev)}
        if self.qwen:
            for key in ("text", "neg") if self.args.true_cfg > 1 else ("text",):
                seqs = [e[key] for e in es]
                cond[key] = torch.nn.utils.rnn.pad_sequence(seqs, batch_first=True).to(dev)
                mask = torch.nn.utils.rnn.pad_sequence([torch.ones(len(q), dtype=torch.long) for q in seqs],
                                                       batch_first=True)
                cond[key + "_mask"] = None if bool(mask.all()) else mask.to(dev)  # unpadded: no masking needed
            h, hc = self.side // 2, self.cond_side // 2
            cond["img_shapes"] = [[(1, h, h), (1, hc, hc)]] * B
        else:
            cond["text"] = torch.cat([e["text"] for e in es]).to(dev)
            cond["pooled"] = torch.cat([e["pooled"] for e in es]).to(dev)
            cond["txt_ids"] = torch.zeros(cond["text"].shape[1], 3, device=dev)
            h, hc = self.side // 2, self.cond_side // 2
            ids = self.pipe._prepare_latent_image_ids(B, h, h, dev, torch.float32)
            cond_ids = self.pipe._prepare_latent_image_ids(B, hc, hc, dev, torch.float32)
            cond_ids[..., 0] = 1  # Kontext tells the condition tokens apart by the first RoPE axis
            cond["img_ids"] = torch.cat([ids, cond_ids])
            # Kontext is guidance-distilled: the guidance scale is an input, one forward per step
            cond["guidance"] = torch.full((B,), self.args.guidance, device=dev) \
                if self.tr.config.guidance_embeds else None
        return cond

    def velocity(self, x, sigma, cond):
        """v(x, sigma | prompt, condition image), fp32, (B, tokens, 4C). Qwen uses true CFG (two forwards)
        with the pipeline's norm rescale; the condition tokens ride along and their outputs are dropped."""
        n, dt = x.shape[1], self.tr.dtype
        t = torch.as_tensor(sigma, device=x.device, dtype=torch.float32).expand(x.shape[0]).to(dt)
        inp = torch.cat([x, cond["image"]], 1).to(dt)
        with torch.autocast(x.device.type, dtype=dt, enabled=dt != torch.float32):
            if not self.qwen:
                return self.tr(hidden_states=inp, encoder_hidden_states=cond["text"].to(dt), timestep=t,
                               pooled_projections=cond["pooled"].to(dt), img_ids=cond["img_ids"],
                               txt_ids=cond["txt_ids"], guidance=cond["guidance"], return_dict=False)[0][:, :n].float()

            def forward(key):
                return self.tr(hidden_states=inp, encoder_hidden_states=cond[key].to(dt), timestep=t,
                               encoder_hidden_states_mask=cond[key + "_mask"], img_shapes=cond["img_shapes"],
                               return_dict=False)[0][:, :n].float()

            v = forward("text")
            if self.args.true_cfg <= 1:
                return v
            neg = forward("neg")
            comb = neg + self.args.true_cfg * (v - neg)
            return comb * (v.norm(dim=-1, keepdim=True) / comb.norm(dim=-1, keepdim=True))


def load_editor(args, device):
    """`tiny` or a diffusers folder / hub id of FluxKontextPipeline, QwenImageEditPipeline or ...PlusPipeline."""
    # the tiny editors are one fixed random model (seed 0) whatever --seed: a warmed-up transformer only
    # makes sense with the same frozen text encoders
    if args.editor == "tiny":
        return Editor(tiny_kontext(0, patch=args.tiny_patch, width=args.tiny_width,
                                   max_length=args.max_sequence_length), args, device, pixel_patch=args.tiny_patch)
    if args.editor == "tiny-qwen":
        return Editor(tiny_qwen_edit(0, patch=args.tiny_patch, width=args.tiny_width), args, device,
                      pixel_patch=args.tiny_patch)
    from diffusers import DiffusionPipeline

    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    pipe = DiffusionPipeline.from_pretrained(args.editor, torch_dtype=dtype)
    if not any(k in type(pipe).__name__ for k in ("FluxKontext", "QwenImageEdit")):
        raise ValueError(f"--editor {args.editor}: {type(pipe).__name__} is not a Kontext or Qwen-Image-Edit pipeline")
    pipe.transformer.to(device)
    for name in ("vae", "text_encoder", "text_encoder_2"):  # the cache keeps them idle: park them if asked
        if getattr(pipe, name, None) is not None:
            getattr(pipe, name).to("cpu" if args.offload else device).requires_grad_(False)
    return Editor(pipe, args, device)


# ----------------------------------------------------------------------------- sampling, rewards, helpers


def seed_of(*parts):
    """A deterministic 63-bit seed from integers (step, group, member, rank...): noise is a pure function of
    where a sample sits, so ranks never share noise by accident and --resume replays it exactly."""
    h = 1469598103934665603
    for p in parts:
        h = ((h ^ (p + 0x9E3779B9)) * 1099511628211) % (1 << 63)
    return h


def rollout_plan(seed, step, n_prompts, P, G, rank, world, same_noise=False):
    """Which samples this rank rolls out. Every rank draws the same P prompts and the same shuffle of the
    P x G (group, member) slots, then takes its slice, so a group's G samples spread over ranks and the
    rewards can be normalised globally. Returns (my slots [(g, k)], prompt index per group, noise seed
    per slot); with same_noise a group's members share one initial noise (DanceGRPO)."""
    rng = random.Random(seed_of(seed, 1, step))
    groups = rng.sample(range(n_prompts), P) if n_prompts >= P else [rng.randrange(n_prompts) for _ in range(P)]
    slots = [(g, k) for g in range(P) for k in range(G)]
    rng.shuffle(slots)
    n = P * G // world
    mine = slots[rank * n : (rank + 1) * n]
    return mine, groups, [seed_of(seed, 2, step, g, 0 if same_noise else k + 1) for g, k in mine]


def sample(editor, cond, x, sigmas, sde_steps, noise_level, kind, generator):
    """Integrate from noise x over sigmas; steps in sde_steps use the stochastic sampler and are recorded
    as (step, x_t, x_next, log_prob) for training, the others take the ODE step."""
    traj = []
    for i in range(len(sigmas) - 1):
        v = editor.velocity(x, sigmas[i], cond)
        level = noise_level if i in sde_steps else 0.0
        x_next, log_prob, _, _ = sde_step(x, v, sigmas[i], sigmas[i + 1], level, generator=generator, kind=kind)
        if i in sde_steps:
            traj.append((i, x, x_next, log_prob))
        x = x_next
    return x, traj


def initial_noise(editor, keys, device):
    """One (tokens, 4C) standard normal per key, drawn from a generator seeded by the key."""
    shape = ((editor.side // 2) ** 2, 4 * editor.C)
    return torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(k)) for k in keys]).to(device)


def make_reward(spec, device):
    """'oracle' | 'rm:PATH' | 'rm:PATH@dim', comma-joined with optional '*weight' -> fn(prompts, edits) -> (B,).
    Reward models load in-process on every rank (on the editor's device)."""
    terms = []
    for part in spec.split(","):
        name, _, w = part.partition("*")
        weight = float(w) if w else 1.0
        if name == "oracle":
            terms.append((weight, lambda ps, ims: torch.tensor([oracle_score(p, im) for p, im in zip(ps, ims)])))
        elif name.startswith("rm:"):
            from rewardmodel import RewardModel

            path, _, dim = name[3:].partition("@")
            rm = RewardModel.from_pretrained(path, device=device)

            def score(ps, ims, rm=rm, dim=dim or "overall"):
                srcs = [[load_image(s, p.origin) for s in p.sources] for p in ps]
                return rm.score(srcs, [p.instruction for p in ps], ims)[dim].float()

            terms.append((weight, score))
        else:
            raise ValueError(f"--reward term {part!r}: use 'oracle', 'rm:PATH' or 'rm:PATH@dim', optionally '*weight'")
    return lambda ps, ims: sum(w * fn(ps, ims) for w, fn in terms)


def oracle_score(p, img):
    """The toy world's ground truth; it upsamples the edit to the source's size."""
    return toy_oracle(load_image(p.sources[0], p.origin), p.instruction, img)["overall"]


def gather(t):
    """all_gather of equal-shape tensors along dim 0 (identity without torchrun)."""
    if not dist.is_initialized():
        return t
    out = [torch.empty_like(t) for _ in range(dist.get_world_size())]
    dist.all_gather(out, t.contiguous())
    return torch.cat(out)


def allreduce_grads(params):
    """Average gradients over ranks: DDP's reduction, done by hand once per optimizer step because the
    reference pass (adapter off) and the frozen-base forward would fight a DDP wrapper's hooks."""
    for p in params:
        if p.grad is None:  # a parameter no loss reached on this rank still joins the reduction
            p.grad = torch.zeros_like(p)
    if dist.is_initialized() and dist.get_world_size() > 1:
        flat = torch.cat([p.grad.flatten() for p in params])
        dist.all_reduce(flat)
        flat /= dist.get_world_size()
        torch.nn.utils.vector_to_parameters(flat, [p.grad for p in params])


def grid_png(path, rows):
    """rows: list of (source PIL, [(PIL, caption)]) -> one PNG, source first in every row."""
    s = rows[0][0].size[0] * 2
    cols = 1 + max(len(r[1]) for r in rows)
    canvas = Image.new("RGB", (cols * s, len(rows) * (s + 12)), "white")
    draw = ImageDraw.Draw(canvas)
    for r, (src, cells) in enumerate(rows):
        for c, (im, cap) in enumerate([(src, "source")] + cells):
            canvas.paste(im.resize((s, s), Image.NEAREST), (c * s, r * (s + 12)))
            draw.text((c * s + 2, r * (s + 12) + s), cap, fill="black")
    canvas.save(path)


def plot_png(path, series, W=640, H=360, m=40):
    """series: {name: [(x, y)]} -> a line chart PNG with PIL (no plotting dependency)."""
    pts = [q for v in series.values() for q in v] or [(0, 0)]
    x0, x1, y0, y1 = min(q[0] for q in pts), max(q[0] for q in pts), min(q[1] for q in pts), max(q[1] for q in pts)
    im = Image.new("RGB", (W, H), "white")
    d = ImageDraw.Draw(im)
    d.rectangle([m, m, W - m, H - m], outline="gray")
    d.text((4, m - 12), f"{y1:.3f}", fill="black")
    d.text((4, H - m), f"{y0:.3f}", fill="black")
    d.text((W - m - 40, H - m + 4), f"step {x1}", fill="black")
    for k, (name, v) in enumerate(series.items()):
        xy = [(m + (x - x0) / max(x1 - x0, 1) * (W - 2 * m), H - m - (y - y0) / max(y1 - y0, 1e-9) * (H - 2 * m))
              for x, y in v]
        color = ("red", "blue", "green", "purple")[k % 4]
        if len(xy) > 1:
            d.line(xy, fill=color, width=2)
        d.text((m + 6, m + 4 + 12 * k), name, fill=color)
    im.save(path)


def atomic_dir(final, write, link=None):
    """Write a folder via a temporary sibling and a rename; then (optionally) repoint the symlink `link` at it
    with another rename, so a kill at any moment leaves `link` naming a complete folder."""
    tmp = final + ".tmp"
    for d in (tmp, final):
        shutil.rmtree(d, ignore_errors=True)
    os.makedirs(tmp)
    write(tmp)
    os.replace(tmp, final)
    if link:
        os.symlink(os.path.basename(final), link + ".tmp")
        old = os.path.realpath(link) if os.path.islink(link) else None
        os.replace(link + ".tmp", link)
        if old and old != os.path.realpath(final):
            shutil.rmtree(old, ignore_errors=True)


# ----------------------------------------------------------------------------- the run

if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    # --- editor
    p.add_argument("--editor", default="tiny", help="'tiny' (Kontext), 'tiny-qwen', or a Kontext / Qwen-Edit path")
    p.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"], help="real editors' weights (trained: fp32)")
    p.add_argument("--resolution", type=int, default=32, help="square output side in pixels")
    p.add_argument("--guidance", type=float, default=2.5, help="Kontext's distilled guidance scale")
    p.add_argument("--true_cfg", type=float, default=1.0, help="Qwen-Image-Edit true CFG scale (4; 1 = off)")
    p.add_argument("--negative_prompt", default=" ", help="negative prompt for true CFG")
    p.add_argument("--cond_pixels", type=int, default=0, help="Qwen condition area (pipeline: 1024^2); 0 = output's")
    p.add_argument("--max_sequence_length", type=int, default=512, help="T5 tokens for Kontext prompts")
    p.add_argument("--tiny_patch", type=int, default=2, help="tiny editor: pixel space-to-depth factor of its 'VAE'")
    p.add_argument("--tiny_width", type=int, default=64, help="tiny editor: transformer width")
    p.add_argument("--grad_checkpointing", action="store_true", help="recompute transformer blocks in backward")
    p.add_argument("--offload", action="store_true", help="keep text encoders and VAE on CPU between uses")
    p.add_argument("--fsdp", action="store_true", help="shard the transformer over ranks with FSDP2 fully_shard")
    # --- data
    p.add_argument("--toy", action="store_true", help="toy world: tiny editor, data/toy, the recipe in TOY below")
    p.add_argument("--data_dir", default="data/toy", help="folder holding the three files below")
    p.add_argument("--train_prompts", default="rl_train.jsonl", help="RL edit prompts")
    p.add_argument("--test_prompts", default="rl_test.jsonl", help="held-out prompts for the ODE evaluation")
    p.add_argument("--sft_data", default="editor_train.jsonl", help="(source, instruction, target) triples")
    # --- supervised warm-up
    p.add_argument("--sft_steps", type=int, default=0, help="flow-matching warm-up steps on --sft_data (all weights)")
    p.add_argument("--sft_lr", type=float, default=1e-3, help="warm-up learning rate")
    p.add_argument("--sft_batch", type=int, default=16, help="warm-up batch (global)")
    p.add_argument("--sft_eval_every", type=int, default=0, help="ODE eval every N warm-up steps (0 = off)")
    p.add_argument("--init_from", default="", help="start from a warmed-up transformer folder (out_dir/sft of a run)")
    # --- sampling
    p.add_argument("--num_steps", type=int, default=8, help="sampling steps of a rollout")
    p.add_argument("--eval_num_steps", type=int, default=8, help="ODE steps of the evaluation")
    p.add_argument("--sampler", default="sde", choices=["sde", "cps"], help="stochastic sampler of the rollouts")
    p.add_argument("--noise_level", type=float, default=0.7, help="a in the SDE / CPS noise")
    p.add_argument("--sde_window", type=int, default=0, help="SDE + train on N consecutive steps; 0 = all but last")
    p.add_argument("--window_max_start", type=int, default=-1, help="latest first step of the window; -1 = any")
    # --- GRPO
    p.add_argument("--steps", type=int, default=100, help="RL steps (rollout + update rounds)")
    p.add_argument("--max_minutes", type=float, default=0, help="time limit of the warm-up and of RL, each; 0 = none")
    p.add_argument("--prompts_per_step", type=int, default=8, help="prompts per step (global)")
    p.add_argument("--group_size", type=int, default=8, help="samples per prompt, spread over ranks")
    p.add_argument("--same_noise_per_group", action="store_true", help="a group shares its initial noise (DanceGRPO)")
    p.add_argument("--min_group_std", type=float, default=0.0, help="skip groups whose reward std is below this")
    p.add_argument("--adv_clip", type=float, default=5.0, help="advantage clip")
    p.add_argument("--clip_range", type=float, default=1e-4, help="PPO ratio clip c")
    p.add_argument("--beta", type=float, default=0.0, help="KL weight to the reference (adapter disabled)")
    p.add_argument("--updates_per_step", type=int, default=1, help="optimizer steps per rollout batch")
    p.add_argument("--micro_batch", type=int, default=8, help="samples per forward on each rank (memory knob)")
    # --- LoRA and optimizer
    p.add_argument("--lora_rank", type=int, default=8, help="LoRA rank; 0 = no adapter")
    p.add_argument("--lora_alpha", type=float, default=16, help="LoRA alpha")
    p.add_argument("--lora_targets", default="to_q,to_k,to_v,to_out.0", help="comma-separated module names for LoRA")
    p.add_argument("--train_modules", default="", help="comma-separated modules trained in full")
    p.add_argument("--lr", type=float, default=3e-4, help="AdamW learning rate")
    p.add_argument("--weight_decay", type=float, default=0.0, help="AdamW weight decay")
    p.add_argument("--grad_clip", type=float, default=1.0, help="gradient norm clip")
    # --- reward
    p.add_argument("--reward", default="oracle", help="'oracle', 'rm:PATH[@dim]', comma-joined, '*w' weights")
    # --- logging and checkpoints
    p.add_argument("--out_dir", default="out/grpo", help="logs, grids, checkpoints")
    p.add_argument("--eval_every", type=int, default=10, help="ODE eval + PNG grid every N steps (0 = start/end only)")
    p.add_argument("--eval_prompts", type=int, default=32, help="held-out prompts in the eval")
    p.add_argument("--ckpt_every", type=int, default=10, help="checkpoint every N steps")
    p.add_argument("--resume", action="store_true", help="continue from out_dir/ckpt exactly")
    p.add_argument("--seed", type=int, default=0, help="seed of the model init, prompt order and noise")
    p.add_argument("--wandb", default="", help="wandb project name (off when empty)")
    args = p.parse_args()
    # the toy recipe (README): a noisy warm-up (65% wrong targets) leaves an imperfect, stochastic editor; the
    # group shares its initial noise so rewards differ only through the SDE steps, which sit at the start
    # where the layout is decided; RL trains only the text-conditioning embeddings, in full: their gradient
    # agrees across prompts, the blocks' does not (LoRA on them only amplified noise in a trial). At lr 1e-3
    # with 8 prompts per step the held-out oracle climbs for 100 steps (seeds 0 and 1); with 4 it stalled on
    # seed 1, at 2e-3 it peaked at step 70 and fell back, at 5e-3 after 10. 60 steps take ~2.5 min, in which
    # continuing the warm-up gains less than RL does (README)
    TOY = dict(editor="tiny", sft_steps=1000, steps=60, max_minutes=10, same_noise_per_group=True, num_steps=8,
               sde_window=3, window_max_start=0, noise_level=0.7, prompts_per_step=8, group_size=8, micro_batch=16,
               lora_rank=0, train_modules="context_embedder,time_text_embed.text_embedder", lr=1e-3,
               max_sequence_length=48, eval_every=10, eval_prompts=48)
    if args.toy:
        p.set_defaults(**TOY)
        args = p.parse_args()
    if args.sde_window >= args.num_steps:
        p.error(f"--sde_window {args.sde_window} must be below --num_steps {args.num_steps} (the last step is ODE)")

    # ---- distributed: the same script under python and torchrun
    ddp = "RANK" in os.environ
    if ddp:
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
        rank, world, local = dist.get_rank(), dist.get_world_size(), int(os.environ["LOCAL_RANK"])
        device = torch.device(f"cuda:{local}" if torch.cuda.is_available() else "cpu")
        if device.type == "cuda":
            torch.cuda.set_device(device)
        else:  # CPU ranks share the cores
            torch.set_num_threads(max(1, (os.cpu_count() or 1) // int(os.environ.get("LOCAL_WORLD_SIZE", world))))
    else:
        rank, world = 0, 1
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    master = rank == 0
    N = args.prompts_per_step * args.group_size
    if N % world:
        p.error(f"prompts_per_step * group_size = {N} must divide over {world} ranks")
    n_local = N // world
    mb = min(args.micro_batch, n_local)
    chunks = [(i, min(i + mb, n_local)) for i in range(0, n_local, mb)]  # micro-batches of this rank's samples
    if len(chunks) % args.updates_per_step:
        p.error(f"{len(chunks)} micro-batches per rank do not split into --updates_per_step {args.updates_per_step}")
    accum = len(chunks) // args.updates_per_step  # micro-batches per optimizer step
    if args.sft_batch % world:
        p.error(f"--sft_batch {args.sft_batch} must divide over {world} ranks")

    def out_of_time(t_start):
        """--max_minutes bounds each phase; rank 0's clock decides so that every rank stops at the same step."""
        stop = torch.tensor(float(0 < args.max_minutes < (time.time() - t_start) / 60), device=device)
        if ddp:
            dist.broadcast(stop, 0)
        return bool(stop)

    def print0(*a):
        if master:
            print(*a, flush=True)

    os.makedirs(args.out_dir, exist_ok=True)
    train = load_prompts(os.path.join(args.data_dir, args.train_prompts))
    test = load_prompts(os.path.join(args.data_dir, args.test_prompts))[: args.eval_prompts]
    use_oracle = args.toy or "oracle" in args.reward
    editor = load_editor(args, device)
    torch.manual_seed(args.seed)  # the same on every rank: the LoRA starts identical everywhere, as under DDP
    tr = editor.tr
    tr.to(device)
    reward_fn = make_reward(args.reward, device)
    sigmas, eval_sigmas = editor.sigmas(args.num_steps), editor.sigmas(args.eval_num_steps)
    history = {"eval": [], "train": [], "sft_eval": []}
    if args.wandb and master:
        import wandb

        wandb.init(project=args.wandb, config=vars(args))

    @torch.no_grad()
    def evaluate(step, phase="rl"):
        """ODE edits of the held-out prompts from fixed noise: mean reward (and oracle on the toy world)."""
        tr.eval()
        mine = shard(list(enumerate(test)), rank, world)
        rewards, oracles, firsts = [], [], []
        for i in range(0, len(mine), args.micro_batch):
            chunk = mine[i : i + args.micro_batch]
            ps = [q for _, q in chunk]
            x = initial_noise(editor, [seed_of(7, j) for j, _ in chunk], device)  # the same draws in every run
            x, _ = sample(editor, editor.condition(ps), x, eval_sigmas, set(), 0.0, "sde", None)
            ims = editor.decode(x)
            rewards += reward_fn(ps, ims).tolist()
            oracles += [oracle_score(q, im) if use_oracle else float("nan") for q, im in zip(ps, ims)]
            firsts += list(zip(ps, ims))[: 8 - len(firsts)]
        parts = [None] * world
        if ddp:
            dist.all_gather_object(parts, (rewards, oracles))
        else:
            parts = [(rewards, oracles)]
        r = float(np.mean([v for a, _ in parts for v in a]))
        o = float(np.mean([v for _, b in parts for v in b]))
        history["eval" if phase == "rl" else "sft_eval"].append({"step": step, "reward": r, "oracle": o})
        print0(f"eval {phase} {step} | reward {r:.4f} | oracle {o:.4f} | {len(test)} held-out prompts, "
               f"{args.eval_num_steps} ODE steps")
        if master:
            grid_png(os.path.join(args.out_dir, f"eval_{phase}_{step:05d}.png"),
                     [(load_image(q.sources[0], q.origin).convert("RGB").resize(im.size), [(im, q.instruction[:20])])
                      for q, im in firsts])

    # ---- supervised flow-matching warm-up: the starting editor (imperfect and stochastic, like real ones)
    sft_dir = os.path.join(args.out_dir, "sft")
    resumed_sft = args.resume and os.path.isdir(sft_dir)
    if resumed_sft or args.init_from:
        from safetensors.torch import load_file

        src = sft_dir if resumed_sft else args.init_from
        tr.load_state_dict(load_file(os.path.join(src, "transformer.safetensors"), device=str(device)))
        print0(f"loaded warmed-up transformer from {src}")
    if args.sft_steps > 0 and not resumed_sft:
        triples = load_prompts(os.path.join(args.data_dir, args.sft_data))
        opt = torch.optim.AdamW(tr.parameters(), lr=args.sft_lr, weight_decay=args.weight_decay)
        params = [q for q in tr.parameters() if q.requires_grad]
        t0 = time.time()
        for step in range(args.sft_steps):
            if out_of_time(t0):
                print0(f"--max_minutes {args.max_minutes} reached after {step} warm-up steps")
                break
            if args.sft_eval_every and step % args.sft_eval_every == 0:
                evaluate(step, "sft")  # the continued-warm-up baseline's curve
            tr.train()
            rng = random.Random(seed_of(args.seed, 11, step))  # same draw on every rank, then each takes its slice
            batch = shard([triples[rng.randrange(len(triples))] for _ in range(args.sft_batch)], rank, world)
            x0 = editor.encode_images([load_image(q.target, q.origin) for q in batch], editor.side)
            gen = torch.Generator().manual_seed(seed_of(args.seed, 12, step, rank))
            noise = torch.randn(x0.shape, generator=gen).to(device)
            s = torch.rand(len(batch), generator=gen).to(device)
            xs = (1 - s[:, None, None]) * x0 + s[:, None, None] * noise
            loss = flow_matching_loss(editor.velocity(xs, s, editor.condition(batch)), x0, noise)
            opt.zero_grad(set_to_none=False)
            loss.backward()
            allreduce_grads(params)
            torch.nn.utils.clip_grad_norm_(params, args.grad_clip)
            opt.step()
            if step % 50 == 0 or step == args.sft_steps - 1:
                print0(f"sft {step + 1}/{args.sft_steps} | loss {loss.item():.4f} | {time.time() - t0:.1f}s")
        del opt
        if master:
            from safetensors.torch import save_file

            atomic_dir(sft_dir, lambda d: save_file({k: v.contiguous() for k, v in tr.state_dict().items()},
                                                     os.path.join(d, "transformer.safetensors")))
    tr.requires_grad_(False).eval()

    # ---- trainable parameters: a LoRA adapter (peft) plus modules trained in full
    if args.lora_rank > 0:
        from peft import LoraConfig

        tr.add_adapter(LoraConfig(r=args.lora_rank, lora_alpha=args.lora_alpha, init_lora_weights="gaussian",
                                  target_modules=args.lora_targets.split(",")))
    full = [m for m in args.train_modules.split(",") if m]
    for m in full:
        tr.get_submodule(m).requires_grad_(True)
    named = [(n, q) for n, q in tr.named_parameters() if q.requires_grad]
    if not named:
        p.error("nothing to train: set --lora_rank > 0 or --train_modules")
    for _, q in named:  # trainable weights in fp32 even when the base is bf16 (autocast bridges the two)
        q.data = q.data.float()
    params = [q for _, q in named]
    # the reference pass swaps the fully trained modules' starting weights back in
    ref_weights = {n: q.detach().clone() for n, q in named if "lora_" not in n}
    start, resume_opt, ckpt = 0, None, os.path.join(args.out_dir, "ckpt")
    if args.resume and os.path.isdir(ckpt):  # weights go in before FSDP shards them
        from safetensors.torch import load_file

        saved = load_file(os.path.join(ckpt, "trainable.safetensors"))
        with torch.no_grad():
            for n, q in named:
                q.copy_(saved[n])
        resume_opt = torch.load(os.path.join(ckpt, "optimizer.pt"), weights_only=True)
        with open(os.path.join(ckpt, "state.json")) as f:
            meta = json.load(f)
        start, history = meta["step"], meta["history"]
        print0(f"resumed from {ckpt} at step {start}")
    if args.grad_checkpointing:
        tr.enable_gradient_checkpointing()
    if args.fsdp:
        from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_optimizer_state_dict,
                                                             set_optimizer_state_dict)
        from torch.distributed.fsdp import fully_shard

        for block in list(tr.transformer_blocks) + list(getattr(tr, "single_transformer_blocks", [])):
            fully_shard(block)
        fully_shard(tr)
        params = [q for q in tr.parameters() if q.requires_grad]
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=args.weight_decay)
    print0(f"training {sum(q.numel() for q in params):,} of {sum(q.numel() for q in tr.parameters()):,} transformer "
           f"parameters on {world} rank(s), {n_local} samples per rank, {accum} micro-batch(es) of <= {mb} per update")

    @torch.no_grad()
    def reference_velocity(x, sigma, cond):
        """The policy before RL: adapter off, fully trained modules at their starting weights."""
        def swap():
            for n, q in named:
                if n in ref_weights:
                    q.data, ref_weights[n] = ref_weights[n], q.data

        swap()
        if args.lora_rank > 0:
            tr.disable_adapters()
        try:
            return editor.velocity(x, sigma, cond)
        finally:
            swap()
            if args.lora_rank > 0:
                tr.enable_adapters()

    def full_tensor(q):
        return (q.full_tensor() if hasattr(q, "full_tensor") else q).detach().cpu().contiguous()

    def save_checkpoint(step):
        """ckpt/: the LoRA in diffusers format (pipeline.load_lora_weights), full modules, optimizer, step."""
        from peft.utils import get_peft_model_state_dict
        from safetensors.torch import save_file

        state = {n: full_tensor(q) for n, q in tr.named_parameters() if q.requires_grad}  # collective under FSDP
        # under FSDP every rank holds a shard of the optimizer state: gather the whole of it (collective too)
        opt_state = get_optimizer_state_dict(tr, opt, options=StateDictOptions(full_state_dict=True, cpu_offload=True)
                                             ) if args.fsdp else opt.state_dict()
        # every rank must hold the same weights: record each rank's checksum (a test reads them)
        sums = gather(torch.stack([v.double().sum() for v in state.values()]).sum().reshape(1).to(device)).tolist()
        if not master:
            return

        def write(d):
            if args.lora_rank > 0:
                lora = get_peft_model_state_dict(tr, state_dict={n: v for n, v in state.items() if "lora_" in n})
                type(editor.pipe).save_lora_weights(d, transformer_lora_layers=lora)
            save_file(state, os.path.join(d, "trainable.safetensors"))
            torch.save(opt_state, os.path.join(d, "optimizer.pt"))
            with open(os.path.join(d, "state.json"), "w") as f:
                json.dump({"step": step, "history": history, "args": vars(args), "rank_checksums": sums}, f)

        atomic_dir(os.path.join(args.out_dir, f"ckpt_{step:06d}"), write, link=os.path.join(args.out_dir, "ckpt"))

    if resume_opt is not None and args.fsdp:  # the whole state, keyed by parameter name: each rank keeps its shard
        set_optimizer_state_dict(tr, opt, optim_state_dict=resume_opt, options=StateDictOptions(full_state_dict=True))
    elif resume_opt is not None:
        opt.load_state_dict(resume_opt)
    if start == 0:
        evaluate(0)

    # ---- GRPO
    t_run = time.time()
    for step in range(start, args.steps):
        if out_of_time(t_run):
            print0(f"--max_minutes {args.max_minutes} reached after {step} steps")
            if history["eval"][-1]["step"] != step:
                evaluate(step)
            save_checkpoint(step)
            break
        t0 = time.time()
        tr.eval()  # no dropout: the rollout's log-probs must be reproducible by the training forward
        mine, groups, noise_keys = rollout_plan(args.seed, step, len(train), args.prompts_per_step, args.group_size,
                                                rank, world, args.same_noise_per_group)
        prompts = [train[groups[g]] for g, _ in mine]
        rng = random.Random(seed_of(args.seed, 4, step))
        if args.sde_window:  # Flow-GRPO-Fast / MixGRPO: a random window of SDE steps, ODE elsewhere
            last = args.num_steps - 1 - args.sde_window
            first = rng.randint(0, last if args.window_max_start < 0 else min(args.window_max_start, last))
            sde_steps = set(range(first, first + args.sde_window))
        else:
            sde_steps = set(range(args.num_steps - 1))  # the last step's tiny sigma makes its log-prob explode

        # rollouts: a generator per rank for the SDE noise (ranks differ, replays are exact)
        gen = torch.Generator(device).manual_seed(seed_of(args.seed, 3, step, rank))
        x_final, trajs, conds, starts = [], [], [], []
        with torch.no_grad():
            for i in range(0, n_local, mb):
                cond = editor.condition(prompts[i : i + mb])
                x0 = initial_noise(editor, noise_keys[i : i + mb], device)
                x, traj = sample(editor, cond, x0, sigmas, sde_steps, args.noise_level, args.sampler, gen)
                starts.append(x0.flatten(1)[:, :4])
                x_final.append(x)
                trajs.append(traj)
                conds.append(cond)
        edits = editor.decode(torch.cat(x_final))
        distinct_noise = len({tuple(r) for r in gather(torch.cat(starts)).tolist()})  # == N unless shared by design
        t_rollout = time.time() - t0

        # rewards, gathered over ranks in slot order, then group-normalised advantages for my slice
        t0 = time.time()
        r_local = reward_fn(prompts, edits).float().to(device)
        rewards = gather(r_local)
        gids = gather(torch.tensor([g for g, _ in mine], device=device))
        adv_all = group_advantages(rewards, gids, clip=args.adv_clip)
        scored = ~torch.isnan(rewards)  # unscored samples (NaN) get no gradient and are counted in the log
        stds = torch.stack([rewards[(gids == g) & scored].std(unbiased=False).nan_to_num(0.0)
                            for g in range(args.prompts_per_step)])
        keep_all = (stds >= args.min_group_std)[gids] & (stds > 0)[gids] & scored
        adv = adv_all[rank * n_local : (rank + 1) * n_local]
        keep = keep_all[rank * n_local : (rank + 1) * n_local].float()
        t_reward = time.time() - t0
        oracle_corr = float("nan")  # a toy-world diagnostic, outside the time split: does the reward track the truth?
        if use_oracle and args.reward != "oracle":
            o = gather(torch.tensor([oracle_score(q, im) for q, im in zip(prompts, edits)], device=device))
            oracle_corr = float(np.corrcoef(rewards[scored].cpu().numpy(), o[scored].cpu().numpy())[0, 1])

        # policy update: updates_per_step optimizer steps, each accumulating `accum` micro-batches x SDE steps;
        # the first update is on-policy, so its ratios are exactly 1
        t0 = time.time()
        tr.eval()
        ratios, clipped, kls = [], [], []
        for u in range(args.updates_per_step):
            opt.zero_grad(set_to_none=False)
            mine_u = chunks[u * accum : (u + 1) * accum]
            n_u = sum(b - a for a, b in mine_u)
            for c, (lo, hi) in enumerate(mine_u, start=u * accum):
                # dropped groups (reward std below --min_group_std) get zero advantage: no policy gradient
                a, w = adv[lo:hi], keep[lo:hi]
                for j, x_t, x_next, old_lp in trajs[c]:
                    v = editor.velocity(x_t, sigmas[j], conds[c])
                    _, lp, mean, std = sde_step(x_t, v, sigmas[j], sigmas[j + 1], args.noise_level, prev_sample=x_next,
                                                kind=args.sampler)
                    kl = None
                    if args.beta > 0:
                        with torch.no_grad():
                            v_ref = reference_velocity(x_t, sigmas[j], conds[c])
                            _, _, ref_mean, _ = sde_step(x_t, v_ref, sigmas[j], sigmas[j + 1], args.noise_level,
                                                         prev_sample=x_next, kind=args.sampler)
                        kl = gaussian_kl(mean, ref_mean, std)
                        kls.append(kl.detach().mean())
                    loss, ratio, clip = grpo_loss(lp, old_lp, a * w, args.clip_range, kl, args.beta)
                    # the update's loss is the mean over its samples and SDE steps
                    (loss * (hi - lo) / n_u / len(sde_steps)).backward()
                    ratios.append(ratio[w > 0])
                    clipped.append(clip[w > 0].float())
            if not args.fsdp:
                allreduce_grads(params)
            grad_norm = torch.nn.utils.clip_grad_norm_(params, args.grad_clip)
            opt.step()
        t_train = time.time() - t0

        # one log line per step (master's view of the training stats, global rewards)
        ratio, clipf = torch.cat(ratios), torch.cat(clipped)
        ratio, clipf = (ratio, float(clipf.mean())) if len(ratio) else (torch.ones(1), 0.0)  # all groups dropped
        kl = float(torch.stack(kls).mean()) if kls else 0.0
        zero = float((stds < max(args.min_group_std, 1e-8)).float().mean())
        total = t_rollout + t_reward + t_train
        rec = {"step": step + 1, "reward": float(rewards[scored].mean()), "reward_std": float(rewards[scored].std()),
               "unscored": int((~scored).sum()),
               "zero_std": zero, "kl": kl, "clip": clipf, "ratio_mean": float(ratio.mean()),
               "ratio_min": float(ratio.min()), "ratio_max": float(ratio.max()), "grad_norm": float(grad_norm),
               "distinct_noise": distinct_noise, "rollout_s": t_rollout, "reward_s": t_reward, "train_s": t_train,
               "oracle_corr": oracle_corr}
        history["train"].append(rec)
        print0(f"step {step + 1}/{args.steps} | reward {rec['reward']:.4f} ± {rec['reward_std']:.4f} "
               f"| zero-std {zero:.2f} " + (f"| unscored {rec['unscored']} " if rec["unscored"] else "")
               + f"| kl {kl:.2e} | clip {clipf:.3f} | ratio {rec['ratio_mean']:.5f} [{rec['ratio_min']:.5f}, "
               f"{rec['ratio_max']:.5f}] | gnorm {rec['grad_norm']:.2e}"
               + (f" | rm~oracle {oracle_corr:.2f}" if oracle_corr == oracle_corr else "")
               + f" | rollout {t_rollout:.1f}s reward {t_reward:.1f}s train {t_train:.1f}s "
               f"({1 - t_rollout / total:.0%} outside rollout)")
        if args.wandb and master:
            wandb.log(rec, step=step + 1)
        if args.eval_every and (step + 1) % args.eval_every == 0 or step + 1 == args.steps:
            evaluate(step + 1)
            if master:
                order = sorted(range(n_local), key=lambda i: (mine[i][0], mine[i][1]))[: 4 * args.group_size]
                rows = {}
                for i in order:
                    rows.setdefault(mine[i][0], []).append((edits[i], f"{float(r_local[i]):.3f}"))
                grid_png(os.path.join(args.out_dir, f"samples_{step + 1:05d}.png"),
                         [(load_image(train[groups[g]].sources[0]).convert("RGB").resize(edits[0].size), cells)
                          for g, cells in list(rows.items())[:4]])
        if (step + 1) % args.ckpt_every == 0 or step + 1 == args.steps:
            save_checkpoint(step + 1)

    if master:
        ev = history["eval"]
        plot_png(os.path.join(args.out_dir, "curves.png"),
                 {"eval oracle": [(e["step"], e["oracle"]) for e in ev if e["oracle"] == e["oracle"]],
                  "eval reward": [(e["step"], e["reward"]) for e in ev],
                  "train reward": [(t["step"], t["reward"]) for t in history["train"]]})
        with open(os.path.join(args.out_dir, "history.json"), "w") as f:
            json.dump(history, f)
        if ev:
            print0(f"done in {time.time() - t_run:.0f}s | eval oracle {ev[0]['oracle']:.4f} -> {ev[-1]['oracle']:.4f} "
                   f"| eval reward {ev[0]['reward']:.4f} -> {ev[-1]['reward']:.4f}")
    if args.wandb and master:
        wandb.finish()
    if ddp:
        dist.barrier()  # no rank tears the group down while another still writes or reads
        leave_distributed()
