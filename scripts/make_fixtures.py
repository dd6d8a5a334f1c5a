#!/usr/bin/env python
"""Build TINY random-weight Z-Image models with the REAL diffusers / transformers / peft
classes and write the reference fixtures used by the zlora Rust tests.

Run from the repository root (CPU only, float32, deterministic, ~1 minute):

    /work/venv/bin/python scripts/make_fixtures.py

It deletes and rewrites `fixtures/tiny/` (idempotent: same bytes on every run on the
same machine/library versions).  The exact library versions used are written to
`fixtures/tiny/versions.txt`; the fixtures in the repository were generated with
torch 2.15.0 (+cu132 wheel, run on CPU), diffusers 0.42.1, transformers 5.24.0,
peft 0.21.2, tokenizers 0.23.3, safetensors 0.8.0, numpy 2.4.6.

Every file and tensor name is documented in `fixtures/README.md`.
"""

from __future__ import annotations

import importlib.metadata
import json
import math
import os
import shutil
import sys
import tempfile
import warnings
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import diffusers
import peft
import safetensors
import tokenizers
import transformers
from tokenizers import Tokenizer
from diffusers import (
    AutoencoderKL,
    FlowMatchEulerDiscreteScheduler,
    ZImagePipeline,
    ZImageTransformer2DModel,
)
from diffusers.loaders.single_file_utils import convert_z_image_transformer_checkpoint_to_diffusers
from lycoris import LycorisNetwork, create_lycoris

sys.path.insert(0, str(Path(__file__).resolve().parent))
from random_zimage import BPE_MERGES, CHAT_TEMPLATE, SPECIAL_TOKENS, build_tokenizer, chat, gen, randomize_  # noqa: E402
from peft import LoraConfig
from peft.utils import get_peft_model_state_dict
from transformers import Qwen3Config, Qwen3Model

warnings.filterwarnings("ignore")
diffusers.utils.logging.set_verbosity_error()
transformers.utils.logging.set_verbosity_error()
diffusers.utils.logging.disable_progress_bar()

torch.set_grad_enabled(False)
DEVICE = torch.device("cpu")
DTYPE = torch.float32

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "fixtures" / "tiny"
MODEL_DIR = OUT / "model"

# --------------------------------------------------------------------------------------
# Tiny configurations.  Sizes were chosen to keep the fixtures around 3 MB: the diffusers
# transformer has a hard-coded t_embedder (256 -> 1024 -> min(dim,256)) that alone is
# 1.18 MB in f32 (+0.59 MB again in the bf16 ComfyUI copy), so dim is 32 (not 64) and
# the VAE uses 8/16 channels.
# --------------------------------------------------------------------------------------
TE_CFG = dict(
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=8,
    rms_norm_eps=1e-6,
    rope_theta=1_000_000.0,
    max_position_embeddings=1024,
    tie_word_embeddings=True,
    hidden_act="silu",
    attention_bias=False,
)
DIT_CFG = dict(
    all_patch_size=(2,),
    all_f_patch_size=(1,),
    in_channels=16,
    dim=32,
    n_layers=2,
    n_refiner_layers=1,
    n_heads=2,
    n_kv_heads=2,
    norm_eps=1e-5,
    qk_norm=True,
    cap_feat_dim=32,
    rope_theta=256.0,
    t_scale=1000.0,
    axes_dims=[4, 6, 6],  # sum = head_dim = 32 / 2 = 16
    axes_lens=[1536, 512, 512],
)
VAE_CFG = dict(
    in_channels=3,
    out_channels=3,
    latent_channels=16,
    block_out_channels=[8, 8, 16],  # channel changes -> conv_shortcut in encoder and decoder
    down_block_types=["DownEncoderBlock2D"] * 3,
    up_block_types=["UpDecoderBlock2D"] * 3,
    layers_per_block=1,
    norm_num_groups=4,  # 2 resp. 4 channels per group (so per-group != per-channel norm)
    act_fn="silu",
    mid_block_add_attention=True,
    use_quant_conv=False,
    use_post_quant_conv=False,
    scaling_factor=0.3611,
    shift_factor=0.1159,
    force_upcast=True,
    sample_size=64,
)
SCHED_CFG = dict(num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=False)

LORA_RANK = 4
LORA_ALPHA = 8
LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "w1", "w2", "w3"]
LORA_STRENGTH = 0.7
LORA_ADAPTER = "zlora_test"
# LyCORIS fixtures: (algo, file, rank, alpha). LoKr rank 4 with factor -1 gives full factors on
# the 32-wide attention (scale 1 whatever alpha) and a decomposed w2 on the FFN and adaLN
# (scale alpha / rank = 0.5); LoHa rank 2, alpha 1 (scale 0.5).
LYCORIS_ALGOS = [("lokr", "lora_lokr.safetensors", 4, 2.0), ("loha", "lora_loha.safetensors", 2, 1.0)]
LYCORIS_TARGET = r".*(attention\.to_[qkv]|attention\.to_out\.0|feed_forward\.w[123]|adaLN_modulation\.0)$"

HEIGHT, WIDTH = 48, 80  # -> latent 12 x 20 (vae factor 4), 6 x 10 = 60 image tokens -> padded to 64

TE_PROMPTS = [
    "a red fox in the snow",
    "A highly detailed photograph of an old lighthouse on a rocky coast at sunset, "
    "waves crashing below, seagulls flying, warm golden light, 35mm film grain, "
    "a small café sign reading \"über 2024\" in the foreground.",
]

PIPELINES = {
    "turbo": dict(
        prompt="a red fox in the snow",
        negative_prompt=None,
        num_inference_steps=2,
        guidance_scale=0.0,
        shift=3.0,
        cfg_truncation=1.0,
        cfg_normalization=False,
        lora_strength=None,
        latents_seed=100,
    ),
    "base": dict(
        prompt="a cat",
        negative_prompt="blurry, low quality",
        num_inference_steps=3,
        guidance_scale=4.0,
        shift=6.0,
        # t_norm per step = 1 - sigma = [0, 0.0769, 0.25]: 0.2 makes the LAST step run without
        # CFG (0.25 > 0.2) while steps 0 and 1 use CFG.  (0.8 would never truncate in 3 steps.)
        cfg_truncation=0.2,
        # cfg_normalization is a float k: pred is rescaled when ||pred|| > k * ||pos||.
        # 1.41 makes it trigger in step 0 (ratio 1.4133) but NOT in step 1 (ratio 1.4033), so
        # both branches are tested; the script asserts this pattern (see metadata "steps").
        cfg_normalization=None,  # filled in below (CFG_NORM_K)
        lora_strength=None,
        latents_seed=101,
    ),
    "lora": dict(
        prompt="a red fox in the snow",
        negative_prompt=None,
        num_inference_steps=2,
        guidance_scale=0.0,
        shift=3.0,
        cfg_truncation=1.0,
        cfg_normalization=False,
        lora_strength=LORA_STRENGTH,
        latents_seed=100,  # same initial noise as turbo
    ),
}
CFG_NORM_K = 1.41


# --------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------



def diffusers_to_comfy(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for k, v in sd.items():
        if ".attention.to_k.weight" in k or ".attention.to_v.weight" in k:
            continue
        if ".attention.to_q.weight" in k:
            base = k.replace(".attention.to_q.weight", "")
            v = torch.cat([sd[f"{base}.attention.to_q.weight"], sd[f"{base}.attention.to_k.weight"],
                           sd[f"{base}.attention.to_v.weight"]], dim=0)
            nk = f"{base}.attention.qkv.weight"
        else:
            nk = (k.replace(".attention.to_out.0.", ".attention.out.")
                  .replace(".attention.norm_q.", ".attention.q_norm.")
                  .replace(".attention.norm_k.", ".attention.k_norm."))
            if nk.startswith("all_x_embedder.2-1."):
                nk = "x_embedder." + nk[len("all_x_embedder.2-1."):]
            if nk.startswith("all_final_layer.2-1."):
                nk = "final_layer." + nk[len("all_final_layer.2-1."):]
        out["model.diffusion_model." + nk] = v.contiguous()
    return out


def f32(x) -> torch.Tensor:
    if isinstance(x, np.ndarray):
        x = torch.from_numpy(x)
    return x.detach().to(torch.float32).contiguous().clone()


def canonicalize_safetensors_header(path: Path) -> None:
    """Rewrite the JSON header with a fixed key order (content unchanged).

    The safetensors writer keeps `__metadata__` in a Rust HashMap, so with two or more
    metadata keys the byte layout changes from run to run.  Sorting makes reruns
    byte-identical; tensor data and offsets are untouched.
    """
    raw = path.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8 : 8 + n])
    meta = header.pop("__metadata__", None)
    new = {}
    if meta is not None:
        new["__metadata__"] = dict(sorted(meta.items()))
    for k in sorted(header, key=lambda k: (header[k]["data_offsets"][0], k)):
        new[k] = header[k]
    hs = json.dumps(new, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    hs += b" " * ((8 - len(hs) % 8) % 8)
    path.write_bytes(len(hs).to_bytes(8, "little") + hs + raw[8 + n :])


# --------------------------------------------------------------------------------------
def main() -> None:
    torch.manual_seed(0)
    if OUT.exists():
        shutil.rmtree(OUT)
    OUT.mkdir(parents=True)

    (OUT / "versions.txt").write_text(
        "".join(
            f"{n} {v}\n"
            for n, v in [
                ("python", sys.version.split()[0]),
                ("torch", torch.__version__),
                ("diffusers", diffusers.__version__),
                ("transformers", transformers.__version__),
                ("peft", peft.__version__),
                ("tokenizers", tokenizers.__version__),
                ("safetensors", safetensors.__version__),
                ("numpy", np.__version__),
            ]
        )
    )

    # ---------------- 1. tokenizer -------------------------------------------------------
    tok = build_tokenizer()
    s = chat(tok, "P")
    assert s == "<|im_start|>user\nP<|im_end|>\n<|im_start|>assistant\n", repr(s)
    assert tok.pad_token == "<|endoftext|>" and tok.padding_side == "right"
    vocab_size = len(tok)
    assert vocab_size == 256 + len(BPE_MERGES) + len(SPECIAL_TOKENS), vocab_size

    # ---------------- 2. text encoder ----------------------------------------------------
    te_config = Qwen3Config(vocab_size=vocab_size, pad_token_id=tok.pad_token_id, **TE_CFG)
    te = Qwen3Model(te_config).to(DTYPE).eval()
    randomize_(te, seed=1)

    # ---------------- 3. transformer -----------------------------------------------------
    dit = ZImageTransformer2DModel(**DIT_CFG).to(DTYPE).eval()
    randomize_(dit, seed=2)

    # ---------------- 4. VAE -------------------------------------------------------------
    vae = AutoencoderKL(**VAE_CFG).to(DTYPE).eval()
    randomize_(vae, seed=3)

    # ---------------- 5. scheduler -------------------------------------------------------
    sched = FlowMatchEulerDiscreteScheduler(**SCHED_CFG)

    # ---------------- 6. save diffusers layout ------------------------------------------
    pipe = ZImagePipeline(scheduler=sched, vae=vae, text_encoder=te, tokenizer=tok, transformer=dit)
    pipe.save_pretrained(MODEL_DIR, safe_serialization=True)
    shutil.rmtree(MODEL_DIR / "transformer")
    dit.save_pretrained(MODEL_DIR / "transformer", safe_serialization=True, max_shard_size="600KB")
    idx = json.loads((MODEL_DIR / "transformer" / "diffusion_pytorch_model.safetensors.index.json").read_text())
    n_shards = len(set(idx["weight_map"].values()))
    assert n_shards >= 2, n_shards

    # Reload everything from disk: all references below use exactly the saved files.
    pipe = ZImagePipeline.from_pretrained(MODEL_DIR, torch_dtype=DTYPE).to(DEVICE)
    pipe.set_progress_bar_config(disable=True)
    for name, ref in [("transformer", dit), ("vae", vae), ("text_encoder", te)]:
        got = getattr(pipe, name).state_dict()
        for k, v in ref.state_dict().items():
            assert torch.equal(got[k], v), (name, k)
    assert chat(pipe.tokenizer, "P") == s
    dit_sd = {k: v.clone() for k, v in pipe.transformer.state_dict().items()}

    ref: dict[str, torch.Tensor] = {}
    meta: dict = {}

    # ---------------- 7. ComfyUI single file (bf16) ---------------------------------------
    comfy = {k: v.to(torch.bfloat16) for k, v in diffusers_to_comfy(dit_sd).items()}
    save_file(comfy, str(OUT / "comfy_transformer.safetensors"), metadata={"format": "pt"})

    # ---------------- 8. PEFT LoRA -------------------------------------------------------
    lora_dit = ZImageTransformer2DModel.from_pretrained(MODEL_DIR, subfolder="transformer", torch_dtype=DTYPE)
    lcfg = LoraConfig(r=LORA_RANK, lora_alpha=LORA_ALPHA, target_modules=LORA_TARGETS, init_lora_weights=False)
    lora_dit.add_adapter(lcfg)
    g = gen(4)
    for name, p in lora_dit.named_parameters():
        if "lora_A" in name:
            p.data.copy_(torch.randn(p.shape, generator=g) / math.sqrt(p.shape[1]))
        elif "lora_B" in name:
            p.data.copy_(0.5 * torch.randn(p.shape, generator=g) / math.sqrt(p.shape[1]))
    lora_sd = get_peft_model_state_dict(lora_dit)
    lora_meta = lora_dit.peft_config["default"].to_dict()
    # peft keeps target_modules as a set: sort it so the file is byte-identical across runs
    lora_meta["target_modules"] = sorted(lora_meta["target_modules"])
    with tempfile.TemporaryDirectory() as td:
        ZImagePipeline.save_lora_weights(
            td,
            transformer_lora_layers=lora_sd,
            weight_name="lora_peft.safetensors",
            transformer_lora_adapter_metadata=lora_meta,
        )
        shutil.copy(Path(td) / "lora_peft.safetensors", OUT / "lora_peft.safetensors")
    del lora_dit

    # ---------------- 9a. transformer forward --------------------------------------------
    g = gen(10)
    dx = [torch.randn(16, 1, 12, 20, generator=g) for _ in range(2)]
    dcap = [torch.randn(13, 32, generator=g), torch.randn(40, 32, generator=g)]
    dt = torch.tensor([0.3, 0.75], dtype=DTYPE)
    out2 = pipe.transformer(dx, dt, dcap, return_dict=False)[0]
    out1 = pipe.transformer(dx[:1], dt[:1], dcap[:1], return_dict=False)[0]
    for i in range(2):
        ref[f"dit.x.{i}"] = f32(dx[i])
        ref[f"dit.cap.{i}"] = f32(dcap[i])
        ref[f"dit.out.{i}"] = f32(out2[i])
    ref["dit.t"] = f32(dt)
    ref["dit.single.out.0"] = f32(out1[0])
    meta["dit"] = dict(
        t=dt.tolist(),
        cap_lens=[13, 40],
        cap_padded_lens=[32, 64],
        image_tokens=60,
        image_padded_tokens=64,
        batch_vs_single_max_abs_diff=float((out2[0] - out1[0]).abs().max()),
    )

    # ---------------- 9b. text encoder ---------------------------------------------------
    embs = pipe.encode_prompt(prompt=list(TE_PROMPTS), do_classifier_free_guidance=False)[0]
    meta["te"] = dict(prompts=TE_PROMPTS, templated=[], lens=[])
    for i, p in enumerate(TE_PROMPTS):
        templ = chat(pipe.tokenizer, p)
        enc = pipe.tokenizer([templ], padding="max_length", max_length=512, truncation=True, return_tensors="pt")
        ids = enc.input_ids[0][enc.attention_mask[0].bool()]
        assert len(ids) == embs[i].shape[0]
        # ids from the tokenizers-library object alone (what a Rust tokenizers port sees)
        # (a fresh object: the transformers wrapper leaves padding=512 enabled on its backend)
        raw_tok = Tokenizer.from_file(str(MODEL_DIR / "tokenizer" / "tokenizer.json"))
        assert raw_tok.padding is None and raw_tok.truncation is None
        assert ids.tolist() == raw_tok.encode(templ, add_special_tokens=True).ids
        # hidden_states[-2] == raw output of decoder layer index num_layers-2 (no final norm)
        cap = {}
        h = pipe.text_encoder.layers[TE_CFG["num_hidden_layers"] - 2].register_forward_hook(
            lambda m, a, o: cap.__setitem__("h", o[0] if isinstance(o, tuple) else o)
        )
        pipe.text_encoder(input_ids=ids[None], output_hidden_states=True)
        h.remove()
        assert torch.allclose(cap["h"][0], embs[i], atol=1e-5, rtol=1e-5)
        ref[f"te.ids.{i}"] = ids.to(torch.int64).contiguous()
        ref[f"te.hidden.{i}"] = f32(embs[i])
        meta["te"]["templated"].append(templ)
        meta["te"]["lens"].append(int(len(ids)))

    # ---------------- 9c. VAE ------------------------------------------------------------
    g = gen(20)
    yy, xx = torch.meshgrid(torch.linspace(0, 1, HEIGHT), torch.linspace(0, 1, WIDTH), indexing="ij")
    img = torch.zeros(1, 3, HEIGHT, WIDTH)
    for c in range(3):
        acc = torch.zeros(HEIGHT, WIDTH)
        for _ in range(3):
            fy, fx, ph, a = (torch.rand(4, generator=g) * torch.tensor([3.0, 3.0, 2 * math.pi, 1.0])).tolist()
            acc += (0.5 + a) * torch.sin(2 * math.pi * (fx * xx + fy * yy) + ph)
        img[0, c] = torch.tanh(acc)
    z = torch.randn(1, 16, HEIGHT // 4, WIDTH // 4, generator=g)
    ref["vae.image_in"] = f32(img)
    ref["vae.encode.mode"] = f32(pipe.vae.encode(img).latent_dist.mode())
    ref["vae.z_in"] = f32(z)
    ref["vae.decode.out"] = f32(pipe.vae.decode(z).sample)

    # ---------------- 9d. full pipelines -------------------------------------------------
    PIPELINES["base"]["cfg_normalization"] = CFG_NORM_K
    base_sched_cfg = dict(pipe.scheduler.config)
    meta["pipelines"] = {}
    turbo_latents_out = None
    for pname, P in PIPELINES.items():
        pipe.scheduler = FlowMatchEulerDiscreteScheduler.from_config(base_sched_cfg, shift=P["shift"])
        if P["lora_strength"] is not None:
            pipe.load_lora_weights(str(OUT / "lora_peft.safetensors"), adapter_name=LORA_ADAPTER)
            pipe.set_adapters([LORA_ADAPTER], [P["lora_strength"]])
            pcfg = pipe.transformer.peft_config[LORA_ADAPTER]
            assert pcfg.r == LORA_RANK and pcfg.lora_alpha == LORA_ALPHA, pcfg
        lat_in = torch.randn(1, 16, HEIGHT // 4, WIDTH // 4, generator=gen(P["latents_seed"]))
        kw = dict(
            prompt=P["prompt"],
            negative_prompt=P["negative_prompt"],
            height=HEIGHT,
            width=WIDTH,
            num_inference_steps=P["num_inference_steps"],
            guidance_scale=P["guidance_scale"],
            cfg_truncation=P["cfg_truncation"],
            cfg_normalization=P["cfg_normalization"],
        )
        steps: list[torch.Tensor] = []
        model_outs: list[list[torch.Tensor]] = []

        def cb(_p, _i, _t, kwargs):
            steps.append(kwargs["latents"].clone())
            return {}

        hook = pipe.transformer.register_forward_hook(
            lambda m, a, o: model_outs.append([t.clone() for t in (o[0] if isinstance(o, tuple) else o.sample)])
        )
        lat = pipe(**kw, latents=lat_in.clone(), output_type="latent", callback_on_step_end=cb).images
        hook.remove()
        sigmas = pipe.scheduler.sigmas.clone()
        timesteps = pipe.scheduler.timesteps.clone()
        img_np = pipe(**kw, latents=lat_in.clone(), output_type="np").images
        img_pil = pipe(**kw, latents=lat_in.clone(), output_type="pil").images[0]
        u8 = np.round(img_np * 255.0)  # numpy_to_pil: (x*255).round().astype(uint8)
        assert np.array_equal(np.asarray(img_pil).astype(np.float32), u8[0].astype(np.float32))

        # prompt embeddings used by the pipeline
        pos, neg = pipe.encode_prompt(P["prompt"], do_classifier_free_guidance=P["guidance_scale"] > 0,
                                      negative_prompt=P["negative_prompt"])
        ref[f"{pname}.latents_in"] = f32(lat_in)
        ref[f"{pname}.latents_out"] = f32(lat)
        assert torch.equal(steps[-1], lat)
        ref[f"{pname}.latents_steps"] = f32(torch.stack(steps[:-1]))  # after steps 0..N-2
        ref[f"{pname}.image"] = f32(img_np)
        ref[f"{pname}.image_u8"] = f32(u8)
        ref[f"{pname}.sigmas"] = f32(sigmas)
        ref[f"{pname}.timesteps"] = f32(timesteps)
        ref[f"{pname}.prompt_embeds"] = f32(pos[0])
        if P["guidance_scale"] > 0:
            ref[f"{pname}.negative_prompt_embeds"] = f32(neg[0])

        # per-step CFG bookkeeping (recomputed exactly like the pipeline does)
        t_norms = ((1000 - timesteps.float()) / 1000).tolist()
        step_info = []
        for i, outs in enumerate(model_outs):
            info = dict(step=i, sigma=float(sigmas[i]), t_model=t_norms[i], cfg_applied=len(outs) == 2)
            if len(outs) == 2:
                posv, negv = outs[0].float(), outs[1].float()
                pred = posv + P["guidance_scale"] * (posv - negv)
                ratio = float(torch.linalg.vector_norm(pred) / torch.linalg.vector_norm(posv))
                info["norm_ratio"] = ratio
                info["cfg_normalization_triggered"] = bool(
                    P["cfg_normalization"] and ratio > float(P["cfg_normalization"])
                )
            step_info.append(info)
        PM = {k: v for k, v in P.items() if k != "latents_seed"}
        PM.update(height=HEIGHT, width=WIDTH, latents_seed=P["latents_seed"], steps=step_info,
                  sigmas=sigmas.tolist(), timesteps=timesteps.tolist(),
                  lora_file="lora_peft.safetensors" if P["lora_strength"] is not None else None)
        meta["pipelines"][pname] = PM

        if pname == "turbo":
            turbo_latents_out = lat
        if P["lora_strength"] is not None:
            diff = float((lat - turbo_latents_out).abs().max())
            assert diff > 1e-2, diff
            PM["max_abs_diff_vs_turbo_latents"] = diff
            # transformer forward of dit item 0 with the LoRA active at strength 0.7
            o = pipe.transformer(dx[:1], dt[:1], dcap[:1], return_dict=False)[0][0]
            ref["dit_lora.out.0"] = f32(o)
            pipe.unload_lora_weights()

    base_steps = meta["pipelines"]["base"]["steps"]
    assert [s["cfg_applied"] for s in base_steps] == [True, True, False], base_steps
    trig = [s.get("cfg_normalization_triggered") for s in base_steps[:2]]
    print("base CFG norm ratios:", [round(s["norm_ratio"], 4) for s in base_steps[:2]], "triggered:", trig)
    assert trig == [True, False], trig
    assert all(abs(s["norm_ratio"] - CFG_NORM_K) > 1e-3 for s in base_steps[:2])

    # ---------------- 9e. sanity checks --------------------------------------------------
    # (i) comfy file -> diffusers (diffusers' own converter) == f32 weights (bf16 tolerance)
    back = convert_z_image_transformer_checkpoint_to_diffusers(load_file(str(OUT / "comfy_transformer.safetensors")))
    assert set(back) == set(dit_sd), set(back) ^ set(dit_sd)
    for k, v in dit_sd.items():
        assert back[k].dtype == torch.bfloat16
        assert torch.equal(back[k], v.to(torch.bfloat16)), k
        assert torch.allclose(back[k].float(), v, rtol=1e-2, atol=1e-6), k
    # (ii) diffusers' real single-file loader accepts the file; forward with the bf16-rounded
    #      weights (upcast, computed in f32) for a tight comfy test
    comfy_dit = ZImageTransformer2DModel.from_single_file(
        str(OUT / "comfy_transformer.safetensors"), config=str(MODEL_DIR), subfolder="transformer", torch_dtype=DTYPE
    ).eval()
    for k, v in comfy_dit.state_dict().items():
        assert v.dtype == DTYPE and torch.equal(v, back[k].float()), k
    ref["dit_bf16w.out.0"] = f32(comfy_dit(dx[:1], dt[:1], dcap[:1], return_dict=False)[0][0])
    # (iii) LoRA merge formula: W' = W + strength * (alpha / r) * B @ A reproduces dit_lora.out.0
    lsd = load_file(str(OUT / "lora_peft.safetensors"))
    merged = {k: v.clone() for k, v in dit_sd.items()}
    n_pairs = 0
    for k in lsd:
        if k.endswith(".lora_A.weight"):
            mod = k[len("transformer."):-len(".lora_A.weight")]
            A, B = lsd[k], lsd[k.replace("lora_A", "lora_B")]
            merged[mod + ".weight"] += LORA_STRENGTH * (LORA_ALPHA / LORA_RANK) * (B @ A)
            n_pairs += 1
    comfy_dit.load_state_dict(merged)
    o = comfy_dit(dx[:1], dt[:1], dcap[:1], return_dict=False)[0][0]
    err = float((o - ref["dit_lora.out.0"]).abs().max())
    assert err < 1e-4, err
    meta["lora"] = dict(rank=LORA_RANK, alpha=LORA_ALPHA, targets=LORA_TARGETS, strength=LORA_STRENGTH,
                        n_pairs=n_pairs, effective_scale=LORA_STRENGTH * LORA_ALPHA / LORA_RANK,
                        merge_check_max_abs_err=err)
    # (iv) batch vs single
    assert meta["dit"]["batch_vs_single_max_abs_diff"] < 1e-4

    # ---------------- write reference ----------------------------------------------------
    meta["configs"] = dict(text_encoder=TE_CFG, transformer=DIT_CFG, vae=VAE_CFG, scheduler=SCHED_CFG,
                           tokenizer=dict(vocab_size=vocab_size, merges=[" ".join(m) for m in BPE_MERGES],
                                          special_tokens={t: tok.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS},
                                          chat_template=CHAT_TEMPLATE))
    meta["versions"] = dict(torch=torch.__version__, diffusers=diffusers.__version__,
                            transformers=transformers.__version__, peft=peft.__version__)
    for k, v in ref.items():
        assert v.dtype in (torch.float32, torch.int64), (k, v.dtype)
        assert torch.isfinite(v.float()).all(), k
    save_file(
        dict(sorted(ref.items())),
        str(OUT / "reference.safetensors"),
        metadata={"format": "pt", "params": json.dumps(meta, sort_keys=True, ensure_ascii=False)},
    )
    # check header round trip
    with safe_open(str(OUT / "reference.safetensors"), "pt") as f:
        assert json.loads(f.metadata()["params"]) == json.loads(json.dumps(meta))

    # ---------------- 10. LyCORIS LoKr / LoHa (separate files: the ones above stay as they are)
    lycoris_fixtures(dx, dt, dcap, dit_sd)

    # ---------------- canonical headers (byte-identical reruns) ---------------------------
    for p in sorted(OUT.rglob("*.safetensors")):
        before = load_file(str(p))
        with safe_open(str(p), "pt") as f:
            before_meta = f.metadata()
        canonicalize_safetensors_header(p)
        after = load_file(str(p))
        with safe_open(str(p), "pt") as f:
            assert f.metadata() == before_meta, p
        assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before), p

    # ---------------- summary ------------------------------------------------------------
    total = 0
    for p in sorted(OUT.rglob("*")):
        if p.is_file():
            total += p.stat().st_size
            print(f"{p.stat().st_size:>9}  {p.relative_to(ROOT)}")
    print(f"{total:>9}  total bytes")
    assert total < 3_500_000, total
    for k, v in sorted(ref.items()):
        print(f"  {k:32s} {str(v.dtype):14s} {tuple(v.shape)}  absmax={float(v.float().abs().max()):.4g}")


def lycoris_delta(sd: dict[str, torch.Tensor], stem: str) -> torch.Tensor:
    """The weight delta of one saved LyCORIS module by the formulas zlora implements
    (lora-formats.md §4.1): kron(w1, w2) or (w1a w1b) * (w2a w2b), times alpha / rank, where a
    LoKr with two full factors has scale 1."""
    get = lambda k: sd.get(f"{stem}.{k}")
    alpha = get("alpha")
    if get("hada_w1_a") is not None:
        w1 = get("hada_w1_a") @ get("hada_w1_b")
        w2 = get("hada_w2_a") @ get("hada_w2_b")
        return (w1 * w2) * (float(alpha) / get("hada_w1_b").shape[0])
    w1 = get("lokr_w1") if get("lokr_w1") is not None else get("lokr_w1_a") @ get("lokr_w1_b")
    w2 = get("lokr_w2") if get("lokr_w2") is not None else get("lokr_w2_a") @ get("lokr_w2_b")
    rank = get("lokr_w2_b").shape[0] if get("lokr_w2_b") is not None else (
        get("lokr_w1_b").shape[0] if get("lokr_w1_b") is not None else None)
    scale = float(alpha) / rank if rank is not None else 1.0
    return torch.kron(w1, w2) * scale


def lycoris_fixtures(dx, dt, dcap, dit_sd: dict[str, torch.Tensor]) -> None:
    """LoKr and LoHa files written by the real LyCORIS classes, with the transformer output
    (dit item 0) while each is active at LORA_STRENGTH, and a check that the formulas in
    `lycoris_delta` reproduce LyCORIS' own forward."""
    LycorisNetwork.apply_preset({"target_module": [], "target_name": [LYCORIS_TARGET]})
    ref: dict[str, torch.Tensor] = {}
    params: dict = dict(lycoris=importlib.metadata.version("lycoris-lora"),
                        strength=LORA_STRENGTH, target=LYCORIS_TARGET, algos={})
    for i, (algo, fname, rank, alpha) in enumerate(LYCORIS_ALGOS):
        dit = ZImageTransformer2DModel.from_pretrained(MODEL_DIR, subfolder="transformer", torch_dtype=DTYPE).eval()
        net = create_lycoris(dit, LORA_STRENGTH, linear_dim=rank, linear_alpha=alpha, algo=algo, factor=-1)
        net.apply_to()
        g = gen(10 + i)
        for _, p in sorted(net.named_parameters()):
            p.data.copy_(0.3 * torch.randn(p.shape, generator=g, dtype=torch.float32))
        with torch.no_grad():
            out = dit(dx[:1], dt[:1], dcap[:1], return_dict=False)[0][0]
        ref[f"dit_{algo}.out.0"] = f32(out)
        net.save_weights(str(OUT / fname), torch.float32, {"ss_network_module": f"lycoris.kohya:{algo}"})
        # The same output from merged weights computed with zlora's formulas.
        sd = load_file(str(OUT / fname))
        stems = sorted({k.rsplit(".", 1)[0] for k in sd})
        merged = {k: v.clone() for k, v in dit_sd.items()}
        for stem in stems:
            module = next(n for n, _ in dit.named_modules() if f"lycoris_{n}".replace(".", "_") == stem)
            merged[module + ".weight"] += LORA_STRENGTH * lycoris_delta(sd, stem)
        net.restore()
        plain = ZImageTransformer2DModel.from_pretrained(MODEL_DIR, subfolder="transformer", torch_dtype=DTYPE).eval()
        plain.load_state_dict(merged)
        with torch.no_grad():
            o = plain(dx[:1], dt[:1], dcap[:1], return_dict=False)[0][0]
        err = float((o - out).abs().max())
        assert err < 1e-4, (algo, err)
        params["algos"][algo] = dict(file=fname, rank=rank, alpha=alpha, modules=len(stems),
                                     formula_merge_max_abs_err=err)
    save_file(dict(sorted(ref.items())), str(OUT / "lycoris_reference.safetensors"),
              metadata={"format": "pt", "params": json.dumps(params, sort_keys=True)})


if __name__ == "__main__":
    main()
