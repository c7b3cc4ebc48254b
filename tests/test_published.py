"""The published reward models through RewardModel.from_pretrained, offline: tiny checkpoints written in the layouts
of EditScore's LoRA adapters (peft's adapter_config.json + adapter_model.safetensors, keys saved before transformers
4.52) and of EditReward's checkpoints (one state dict of the VLM and rm_heads.head_<d>, model.pth), read from the
authors' loaders (VectorSpaceLab/EditScore editscore/mllm_tools, TIGER-AI-Lab/EditReward inference_edit.py)."""
import json
import os
import re
import subprocess
import sys

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

import rewardmodel as R

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", PYTHONPATH=ROOT)


def old_key(key):
    """Today's Qwen-VL key in the layout of transformers < 4.52, as the authors' checkpoints were saved."""
    return key.replace("model.language_model.", "model.").replace("model.visual.", "visual.")


def write_base(folder, family="tiny"):
    """A tiny random Qwen2.5-VL (or Qwen3-VL) saved as a hub-style folder (weights, config, tokenizer, image
    processor)."""
    model, processor = R.build_tiny_vlm(family)
    model.save_pretrained(folder)
    processor.tokenizer.save_pretrained(folder)
    processor.image_processor.save_pretrained(folder)
    return str(folder)


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return write_base(tmp_path_factory.mktemp("base"))


def images(n):
    return [Image.new("RGB", (56, 56), (40 * i, 90, 200 - 30 * i)) for i in range(n)]


def write_editscore(folder, base, family="tiny"):
    """An EditScore-layout adapter: LoRA r=4 alpha=8 on the attention projections, random nonzero B, old keys, and
    a model card naming the base; adapter_config.json names a base path that does not exist here (as the authors')."""
    from peft import LoraConfig, get_peft_model
    folder = str(folder)
    model, _ = R.build_tiny_vlm(family)
    torch.manual_seed(0)
    lora = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    for n, p in lora.named_parameters():
        if "lora_B" in n:
            p.data.normal_(0, 0.5)
    lora.save_pretrained(folder)
    adapter = load_file(f"{folder}/adapter_model.safetensors")
    save_file({old_key(k): v for k, v in adapter.items()}, f"{folder}/adapter_model.safetensors")
    config = json.load(open(f"{folder}/adapter_config.json"))
    json.dump({**config, "base_model_name_or_path": "/share/project/Qwen2.5-VL-7B-Instruct/snapshots/x"},
              open(f"{folder}/adapter_config.json", "w"))
    open(f"{folder}/README.md", "w").write(f"---\nlibrary_name: peft\nbase_model:\n- {base}\n---\n# EditScore\n")
    return folder, {k: v for k, v in adapter.items()}


@pytest.fixture(scope="module")
def editscore(base, tmp_path_factory):
    return write_editscore(tmp_path_factory.mktemp("editscore"), base)


def test_editscore_adapter_loads_merged_and_runs_avg_k(base, editscore):
    folder, adapter = editscore
    rm = R.RewardModel.from_pretrained(folder)
    assert rm.mode == "verifier" and rm.flags["rubric"] == "editscore" and rm.flags["model"] == base
    plain, _ = R.build_tiny_vlm("tiny")
    # the merged weight is W + (alpha / r) B A for a layer the adapter names in the old key layout
    a = adapter["base_model.model.model.language_model.layers.1.self_attn.q_proj.lora_A.weight"]
    b = adapter["base_model.model.model.language_model.layers.1.self_attn.q_proj.lora_B.weight"]
    w = dict(plain.named_parameters())["model.language_model.layers.1.self_attn.q_proj.weight"]
    merged = dict(rm.backbone.named_parameters())["model.language_model.layers.1.self_attn.q_proj.weight"]
    assert torch.allclose(merged, w + 2.0 * b @ a, atol=1e-5) and not torch.allclose(merged, w, atol=1e-3)
    # the authors' scorer sizes images by qwen_vl_utils' bounds (up to 16384 tokens), not this script's defaults
    assert rm.processor.image_processor.size == {"shortest_edge": 4 * 28 * 28, "longest_edge": 16384 * 28 * 28}
    out = rm.score([images(1)[0]] * 2, ["make the circle red"] * 2, images(2), num_samples=3)
    assert set(out) == {"prompt_following", "consistency", "perceptual_quality", "overall", "unparsed"}
    assert out["unparsed"].tolist() == [3.0, 3.0]  # a random tiny model never answers the rubric: counted, not guessed


def test_editscore_rubric_sizes_the_edit_as_the_source(editscore, monkeypatch):
    """EditScore's evaluation.py resizes each edit to its source's size before scoring it; so does the rubric here."""
    rm, seen, encode = R.RewardModel.from_pretrained(editscore[0], max_new_tokens=2), [], R.encode_prompt
    monkeypatch.setattr(R, "encode_prompt", lambda p, ims, t, labels: seen.append([i.size for i in ims]) or
                        encode(p, ims, t, labels))
    rm.score([images(1)[0]], ["add a square"], [Image.new("RGB", (84, 28))])
    assert seen == [[(56, 56), (56, 56)], [(56, 56)]]  # the SC prompt (source, edit), then the PQ prompt (the edit)


@pytest.mark.parametrize("family", ["tiny", "tiny-qwen3-vl"])
def test_editscore_adapters_see_the_images_as_its_scorers_show_them(family, tmp_path, monkeypatch):
    """EditScore's Qwen2.5-VL scorer (editscore/mllm_tools/qwen25vl.py) writes "<img1>: " before each image, the
    rubric right after the last, within qwen_vl_utils' image bounds; its Qwen3-VL scorer (qwen3vl.py) gives the
    processor's chat template the images bare and keeps the processor's bounds."""
    base = write_base(tmp_path / "base", family)
    rm = R.RewardModel.from_pretrained(write_editscore(tmp_path / "adapter", base, family)[0], max_new_tokens=2)
    seen, sample = [], R.sample_shared_prefill
    monkeypatch.setattr(R, "sample_shared_prefill", lambda m, enc, *a: seen.append(enc["input_ids"][0]) or
                        sample(m, enc, *a))
    rm.score([images(1)[0]], ["add a square"], images(2)[1:])
    img = "<|vision_start|><|image_pad|><|vision_end|>"
    sc = R.EDITSCORE_PROMPTS["SC"].replace("{instruction}", "add a square")
    labels = ["<img1>: ", "<img2>: "] if family == "tiny" else ["", ""]
    text = [re.sub(r"(<\|image_pad\|>)+", "<|image_pad|>", rm.processor.tokenizer.decode(ids)) for ids in seen]
    assert text == [f"<|im_start|>user\n{labels[0]}{img}{labels[1]}{img}{sc}<|im_end|>\n<|im_start|>assistant\n",
                    f"<|im_start|>user\n{labels[0]}{img}{R.EDITSCORE_PROMPTS['PQ']}<|im_end|>\n<|im_start|>assistant\n"]
    own = R.build_tiny_vlm(family)[1].image_processor.size
    assert rm.processor.image_processor.size == (dict(own) if family != "tiny" else
                                                 {"shortest_edge": 4 * 28 * 28, "longest_edge": 16384 * 28 * 28})


def test_editscore_adapter_in_bench_with_prompt_file(base, editscore, tmp_path):
    folder, _ = editscore
    prompts = {"SC": "Instruction: {instruction}\nScore 0-25 as JSON.", "PQ": "Score the image 0-25 as JSON."}
    json.dump(prompts, open(tmp_path / "es.json", "w"))
    rm = R.RewardModel.from_pretrained(folder, prompt_file=str(tmp_path / "es.json"), max_new_tokens=4)
    assert rm.prompts == prompts and rm.flags["max_new_tokens"] == 4
    pairs = tmp_path / "pairs.jsonl"
    src, a, b = images(3)
    for i, im in enumerate((src, a, b)):
        im.save(tmp_path / f"{i}.png")
    row = {"instruction": "make it red", "source": "0.png", "preferred": "1.png", "rejected": "2.png"}
    pairs.write_text(json.dumps(row) + "\n")
    def bench():
        out = subprocess.run([sys.executable, os.path.join(ROOT, "bench.py"), "--bench", str(pairs), "--model", folder,
                              "--k", "2", "--max_new_tokens", "4", "--prompt_file", str(tmp_path / "es.json"),
                              "--out_dir", str(tmp_path / "bench")], env=ENV, capture_output=True, text=True)
        assert out.returncode == 0, out.stderr[-2000:]
        return json.load(open(tmp_path / "bench" / "report.json"))
    report = bench()
    assert report["k"] == 2 and report["images"] == 2 and report["scored_now"] == 2
    assert bench()["scored_now"] == 0  # cached
    json.dump({**prompts, "PQ": "Rate the image 0-25 as JSON."}, open(tmp_path / "es.json", "w"))
    assert bench()["scored_now"] == 2  # the same file name with other templates: scored anew


def write_editreward(folder, family="tiny", extra_rows=0):
    """An EditReward-layout checkpoint: the VLM with <|Reward|> added and its embeddings resized to the tokenizer
    (+ extra_rows, as a checkpoint whose vocabulary was padded), plus rm_heads.head_0 / head_1 (1024 -> 16 -> 2
    here 32 -> 8 -> 2) whose last layers are set by hand, in model.pth with old keys; no config.json beside it (the
    authors' inferencer builds the base from its hub name)."""
    folder = str(folder)
    os.makedirs(folder, exist_ok=True)
    model, processor = R.build_tiny_vlm(family)
    width = model.config.text_config.hidden_size
    processor.tokenizer.add_special_tokens({"additional_special_tokens": ["<|Reward|>"]})
    model.resize_token_embeddings(len(processor.tokenizer) + extra_rows)
    state = {old_key(k): v for k, v in model.state_dict().items()}
    for d, (mu, log_sigma) in enumerate([(1.5, -1.0), (-0.5, 0.25)]):
        torch.manual_seed(d)
        for i, (fan_in, fan_out) in zip((0, 3, 5), ((width, 32), (32, 8), (8, 2))):
            state[f"rm_heads.head_{d}.{i}.weight"] = torch.randn(fan_out, fan_in) * (i != 5)
            state[f"rm_heads.head_{d}.{i}.bias"] = torch.tensor([mu, log_sigma]) if i == 5 else torch.randn(fan_out)
    torch.save(state, f"{folder}/model.pth")
    return folder, model


@pytest.fixture(scope="module")
def editreward(base, tmp_path_factory):
    return write_editreward(tmp_path_factory.mktemp("editreward"))


def test_editreward_checkpoint_maps_heads_onto_dimensions(base, editreward):
    folder, model = editreward
    rm = R.RewardModel.from_pretrained(folder, model=base)
    assert rm.flags["per_dim_prompts"] and rm.dims == ["instruction_following", "visual_quality"]
    assert rm.flags["min_pixels"] == rm.flags["max_pixels"] == 256 * 28 * 28  # the authors' inferencer's image area
    assert rm.processor.tokenizer.convert_tokens_to_ids("<|Reward|>") == rm.reward_id == len(rm.processor.tokenizer) - 1
    loaded = rm.backbone.state_dict()
    assert all(torch.equal(loaded[k], v) for k, v in model.state_dict().items())  # every VLM weight, old keys mapped
    out = rm.score([images(1)[0]] * 2, ["add a square"] * 2, images(2))
    # head d's last layer is zero but for its bias (mu_d, log sigma_d): the score is that, whatever the image
    assert torch.allclose(out["instruction_following"], torch.tensor([1.5, 1.5]))
    assert torch.allclose(out["visual_quality"], torch.tensor([-0.5, -0.5]))
    assert torch.allclose(out["overall"], torch.tensor([0.5, 0.5]))
    assert torch.allclose(out["sigma_visual_quality"], torch.tensor(0.25).exp().repeat(2))
    batch = rm.encode([images(1)[0]], ["add a square"], images(1), per_dim=True)
    assert len(batch) == 2 and all((b["input_ids"] == rm.reward_id).sum() == 1 for b in batch)


def test_editreward_checkpoint_with_more_embedding_rows_than_the_tokenizer_loads_them_all(base, tmp_path):
    """A checkpoint whose embedding matrix is not the size the reward token gives the base (a padded vocabulary, as
    the 7B bases' 152,064 rows for 151,666 tokens): the backbone takes the checkpoint's rows, every weight loads."""
    folder, model = write_editreward(tmp_path, extra_rows=7)
    rm = R.RewardModel.from_pretrained(folder, model=base)
    assert rm.backbone.get_input_embeddings().num_embeddings == len(rm.processor.tokenizer) + 7
    loaded = rm.backbone.state_dict()
    assert all(torch.equal(loaded[k], v) for k, v in model.state_dict().items())
    assert torch.equal(rm.reward_row.data, model.get_input_embeddings().weight[rm.reward_id])
    out = rm.score([images(1)[0]], ["add a square"], images(1))
    assert torch.allclose(out["instruction_following"], torch.tensor([1.5]))


def test_editreward_qwen3_checkpoints_keep_the_processors_image_bounds(tmp_path):
    """EditReward's Qwen3-VL collator and inferencer put min/max_pixels into their messages, which the processor's
    apply_chat_template does not read: their images get the processor's own bounds, and so they do here."""
    base = write_base(tmp_path / "base", "tiny-qwen3-vl")
    rm = R.RewardModel.from_pretrained(write_editreward(tmp_path / "ckpt", "tiny-qwen3-vl")[0], model=base)
    assert rm.processor.image_processor.size == dict(R.build_tiny_vlm("tiny-qwen3-vl")[1].image_processor.size)
    assert rm.flags["min_pixels"] is None and not rm.flags["text_positions"]  # Qwen3-VL: 3D positions, as theirs
    out = rm.score([images(1)[0]], ["add a square"], images(2)[1:])
    assert torch.allclose(out["instruction_following"], torch.tensor([1.5]))


def test_editreward_qwen25_heads_read_1d_positions(base, editreward):
    """EditReward's Qwen2.5-VL class runs its language model on image embeddings it put in place itself, without
    image_grid_thw, so its heads were trained under 1D positions (the attention mask's cumsum on all three rotary
    axes), not Qwen2.5-VL's 3D image positions: the scores are those heads on those hidden states."""
    folder, _ = editreward
    rm = R.RewardModel.from_pretrained(folder, model=base)
    assert rm.flags["text_positions"]
    for head in rm.head.rm_heads.values():  # a last layer that reads the hidden state (the fixture's does not)
        torch.manual_seed(0)
        head[5].weight.data.normal_()
    batches = rm.encode([images(1)[0]] * 2, ["add a square", "make the large circle in the middle blue"], images(2),
                        per_dim=True)
    with torch.no_grad():
        mu = rm(batches)[0]
        model = R.unwrap(rm.backbone).model
        for d, b in enumerate(batches):
            pos = (b["attention_mask"].cumsum(-1) - 1).clamp(min=0).expand(3, -1, -1)
            one_d, three_d = (R.pool_hidden(model(**b, **kw).last_hidden_state, b["input_ids"], b["attention_mask"],
                                            rm.reward_id) for kw in ({"position_ids": pos}, {}))
            assert torch.allclose(mu[:, d], rm.head(one_d)[0][:, d], atol=1e-5)
            assert not torch.allclose(mu[:, d], rm.head(three_d)[0][:, d], atol=1e-3)


def test_editreward_prompt_file_places_the_token_inside_the_user_turn(base, editreward, tmp_path):
    folder, _ = editreward
    tail = "\nPlease provide the overall ratings of this image: <|Reward|>\n\nEND\n"
    prompts = {"instruction_following": "Follows {instruction}?" + tail, "visual_quality": "Quality?" + tail}
    json.dump(prompts, open(tmp_path / "er.json", "w"))
    rm = R.RewardModel.from_pretrained(folder, model=base, prompt_file=str(tmp_path / "er.json"))
    batch = rm.encode([images(1)[0]], ["add a square"], images(1))
    text = rm.processor.tokenizer.decode(batch[0]["input_ids"][0])
    assert text.count("<|Reward|>") == 1 and "Follows add a square?" in text
    assert re.search(r"<\|vision_end\|>.*<\|vision_end\|>Follows", text, re.S)  # the images, then the template
    assert text.index("<|Reward|>") < text.index("<|im_start|>assistant")
    assert (batch[0]["input_ids"] == rm.reward_id).sum() == 1


def test_a_published_checkpoint_refuses_the_other_mode_and_takes_a_rubric(base, editscore, editreward):
    """As this script's own checkpoints: a clashing mode is an error, never dropped (bench.py --rubric on EditReward's
    heads scored them as Gaussian without a word); a rubric= is the caller's choice (it was forced to EditScore's)."""
    with pytest.raises(ValueError, match="holds editreward's gaussian reward model, not a verifier one"):
        R.RewardModel.from_pretrained(editreward[0], model=base, mode="verifier", rubric="editscore")
    with pytest.raises(ValueError, match="holds editscore's verifier reward model, not a gaussian one"):
        R.RewardModel.from_pretrained(editscore[0], mode="gaussian")
    assert R.RewardModel.from_pretrained(editscore[0], rubric="verifier").flags["rubric"] == "verifier"
    assert R.RewardModel.from_pretrained(editscore[0], mode="verifier").flags["rubric"] == "editscore"


def test_not_a_reward_model_names_what_is_missing(base, tmp_path):
    with pytest.raises(FileNotFoundError, match=r"args.json.*adapter_config.json.*model.pth.*\(bench.py --rubric\)"):
        R.RewardModel.from_pretrained(base)  # a plain VLM folder: weights but no head, no adapter
    save_file({"model.embed_tokens.weight": torch.zeros(2, 2)}, tmp_path / "model.safetensors")
    with pytest.raises(FileNotFoundError, match="rm_heads"):
        R.RewardModel.from_pretrained(str(tmp_path))  # a state dict without EditReward's heads
    (tmp_path / "p.json").write_text('{"SC": "Instruction: {instruction}"}')
    with pytest.raises(ValueError, match=r"no template for \['PQ'\]"):
        R.RewardModel.from_pretrained("tiny", mode="verifier", rubric="editscore", prompt_file=str(tmp_path / "p.json"))
    (tmp_path / "p.json").write_text('{"SC": "Instruction: <instruction>", "PQ": "Quality?"}')  # the authors' text
    with pytest.raises(ValueError, match=r"p.json: no template says \{instruction\}"):
        R.RewardModel.from_pretrained("tiny", mode="verifier", rubric="editscore", prompt_file=str(tmp_path / "p.json"))


@pytest.mark.parametrize("text,why", [('{"SC": "Instruction: {instruction}",}', "not a readable JSON"),  # a trailing ,
                                      ('["Instruction: {instruction}"]', "is a JSON object of templates"),
                                      ('{"SC": ["Instruction: {instruction}"]}', "is a JSON object of templates")])
def test_a_prompt_file_that_is_not_a_json_object_of_templates_is_an_error_naming_it(tmp_path, text, why):
    (tmp_path / "p.json").write_text(text)
    with pytest.raises(ValueError, match=f"p.json: .*{why}"):
        R.read_prompts(str(tmp_path / "p.json"))


def test_a_bad_prompt_file_stops_the_reward_model_before_its_backbone_loads(tmp_path, monkeypatch):
    (tmp_path / "p.json").write_text('{"SC": "Instruction: <instruction>"}')
    monkeypatch.setattr(R, "load_backbone", lambda *a, **k: pytest.fail("the backbone loaded first"))
    with pytest.raises(ValueError, match=r"p.json: no template says \{instruction\}"):
        R.RewardModel.from_pretrained("tiny", mode="verifier", prompt_file=str(tmp_path / "p.json"))
    (tmp_path / "p.json").write_text('{"instruction_following": "Instruction: {instruction}"}')  # no visual_quality
    with pytest.raises(ValueError, match=r"p.json: no template for \['visual_quality'\]"):
        R.RewardModel.from_pretrained("tiny", prompt_file=str(tmp_path / "p.json"))


def test_zero_shot_scoring_keeps_the_weights_in_their_dtype():
    rm = R.RewardModel.from_pretrained("tiny", mode="verifier", dtype="bfloat16")
    assert not any(p.requires_grad for p in rm.parameters())
    assert {p.dtype for p in rm.backbone.parameters()} == {torch.bfloat16}


def test_grpo_reward_from_a_published_checkpoint_with_its_prompts(base, editreward, tmp_path, monkeypatch):
    import grpo
    from data import EditPrompt
    folder, _ = editreward
    monkeypatch.setattr(R, "EDITREWARD_BASE", base)  # the default base of an EditReward checkpoint, here offline
    json.dump({"instruction_following": "{instruction}? <|Reward|>", "visual_quality": "Quality? <|Reward|>"},
              open(tmp_path / "er.json", "w"))
    reward = grpo.make_reward(f"rm:{folder}@visual_quality", "cpu", str(tmp_path / "er.json"))
    prompts = [EditPrompt(id=str(i), sources=images(1), instruction="add a square") for i in range(2)]
    assert torch.equal(reward(prompts, images(2)), torch.tensor([-0.5, -0.5], dtype=torch.float64))
