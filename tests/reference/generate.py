#!/usr/bin/env python3
"""dsocr reference fixture generator.

Builds tiny random-weight DeepSeek-OCR checkpoints with every structural feature of the real model, saves
them in the ORIGINAL hub format (config.json, model.safetensors with the original tensor names, tokenizer
files), and records, with DeepSeek's official model code, the inputs and stage-by-stage outputs that the
Rust tests compare against.

The official code (the hub checkpoint's remote code: modeling_deepseekocr.py, deepencoder.py,
modeling_deepseekv2.py, configuration_deepseek_v2.py, conversation.py) is never committed: pass the folder
holding it with --ref-code. It runs unmodified under transformers 4.46.3 on CPU torch; the generator only
* makes `.cuda()` a no-op (the official `forward`/`infer` call it on the image mask and inputs);
* builds SAM / CLIP / the projector at the checkpoint config's sizes through the code's own classes
  (`build_sam_vit_b`, `build_clip_l` and the projector width are hard-coded to the real sizes there);
* captures `infer`'s arguments to `generate` (token ids, bf16 pixel tensors, tile grid) instead of running
  its CUDA autocast generation, and then runs the model's own `forward`/`generate` in float32.

Usage:
  python tests/reference/generate.py --ref-code DIR               # writes tests/fixtures/
  python tests/reference/generate.py --ref-code DIR --check       # regenerates into a temp dir, compares bytes
  python tests/reference/generate.py --ref-code DIR --full OUTDIR  # full-size random checkpoint (6.7 GB)
Run with OMP_NUM_THREADS=2 OMP_WAIT_POLICY=PASSIVE. See tests/reference/README.md.
"""

from __future__ import annotations

import argparse
import copy
import filecmp
import functools
import hashlib
import importlib
import io
import json
import math
import os
import pathlib
import shutil
import sys
import tempfile
import time

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont
from safetensors.torch import save_file

ROOT = pathlib.Path(__file__).resolve().parents[2]
FIXTURES = ROOT / "tests" / "fixtures"
HUB_DIR = FIXTURES / "hub"
TOKENIZER_JSON = ROOT / "weights" / "tokenizer" / "tokenizer.json"
REF_FILES = [
    "modeling_deepseekocr.py",
    "deepencoder.py",
    "modeling_deepseekv2.py",
    "configuration_deepseek_v2.py",
    "conversation.py",
]

IMAGE_TOKEN_ID = 128815
VOCAB = 129280
GREEDY_TOKENS = 16

# Two tiny configs that keep every structural feature and differ wherever a port could hard-code a number.
# `sam`/`clip`/`projector`/decoder keys are written into the hub config.json in place; `overrides` become the
# `dsocr_test_overrides` object (spec Appendix A).
CONFIGS = {
    "tiny-a": dict(
        seed=1234,
        sam=dict(width=32, layers=4, heads=2, global_attn_indexes=[1, 3], downsample_channels=[24, 48]),
        clip=dict(width=48, layers=2, heads=4),
        overrides=dict(sam_out_chans=16, clip_ffn_hidden_size=96),
        decoder=dict(
            hidden_size=48,
            num_hidden_layers=3,
            num_attention_heads=4,
            num_key_value_heads=4,
            intermediate_size=96,
            moe_intermediate_size=32,
            n_routed_experts=8,
            n_shared_experts=2,
            num_experts_per_tok=3,
            first_k_dense_replace=1,
        ),
    ),
    "tiny-b": dict(
        seed=5678,
        sam=dict(width=48, layers=3, heads=3, global_attn_indexes=[2], downsample_channels=[32, 40]),
        clip=dict(width=40, layers=3, heads=5),
        overrides=dict(sam_window_size=7, sam_out_chans=24, sam_mlp_ratio=2.0, clip_ffn_hidden_size=80),
        decoder=dict(
            hidden_size=32,
            num_hidden_layers=4,
            num_attention_heads=2,
            num_key_value_heads=2,
            intermediate_size=80,
            moe_intermediate_size=24,
            n_routed_experts=6,
            n_shared_experts=1,
            num_experts_per_tok=2,
            first_k_dense_replace=1,
        ),
    ),
}

# (name, base_size, image_size, crop_mode) exactly as the model card's `infer` presets.
MODES = [
    ("tiny", 512, 512, False),
    ("small", 640, 640, False),
    ("base", 1024, 1024, False),
    ("large", 1280, 1280, False),
    ("gundam", 1024, 640, True),
]

# Source images (generated, deterministic) and the prompt used with each.
IMAGES = [
    ("page", "<image>\n<|grounding|>Convert the document to markdown. "),
    ("photo", "<image>\nDescribe this image in detail."),
    ("note", "<image>\nFree OCR."),
]
# The image whose full prompt's logits are recorded (per config and mode).
LOGITS_IMAGE = "page"
# The one view whose normalised (bf16) pixel tensor is stored.
PIXELS_CASE = "page/tiny"
LOGIT_COLUMNS = sorted(
    set(np.linspace(0, VOCAB - 1, 112).round().astype(int).tolist()) | {0, 1, 2} | set(range(128815, 128827))
)


# ---------------------------------------------------------------------------------------------------------
# Loading the official code


def load_reference(code_dir: pathlib.Path, files=REF_FILES, package="deepseek_ocr_reference",
                   modules=("modeling_deepseekocr", "deepencoder")):
    """Imports the official remote code as a package (it uses relative imports): its modeling and
    encoder modules."""
    missing = [f for f in files if not (code_dir / f).is_file()]
    if missing:
        sys.exit(f"--ref-code {code_dir}: missing {', '.join(missing)}")
    pkg_root = pathlib.Path(tempfile.mkdtemp(prefix="dsocr_ref_"))
    pkg = pkg_root / package
    pkg.mkdir()
    for f in files:
        shutil.copy(code_dir / f, pkg / f)
    (pkg / "__init__.py").write_text("")
    sys.path.insert(0, str(pkg_root))
    loaded = [importlib.import_module(f"{package}.{name}") for name in modules]
    # The official forward/infer move tensors with `.cuda()`; on CPU that is the identity.
    torch.Tensor.cuda = lambda self, *args, **kwargs: self
    return tuple(loaded)


# ---------------------------------------------------------------------------------------------------------
# Configs


def hub_config() -> dict:
    return json.loads((HUB_DIR / "config.json").read_text(encoding="utf-8"))


def tiny_config_json(spec: dict) -> dict:
    """The hub config.json with the reduced sizes substituted in place (spec Appendix A)."""
    cfg = hub_config()
    dec = spec["decoder"]
    for target in (cfg, cfg["language_config"]):
        for key, value in dec.items():
            assert key in target, key
            target[key] = value
    sam = cfg["vision_config"]["width"]["sam_vit_b"]
    for key, value in spec["sam"].items():
        assert key in sam, key
        sam[key] = value
    clip = cfg["vision_config"]["width"]["clip-l-14-224"]
    for key, value in spec["clip"].items():
        assert key in clip, key
        clip[key] = value
    cfg["projector_config"]["input_dim"] = spec["clip"]["width"] + spec["sam"]["downsample_channels"][1]
    cfg["projector_config"]["n_embed"] = dec["hidden_size"]
    cfg["dsocr_test_overrides"] = dict(spec["overrides"])
    return cfg


def vision_sizes(cfg: dict) -> dict:
    """What the official builders hard-code, read from a (possibly tiny) hub-format config."""
    sam = cfg["vision_config"]["width"]["sam_vit_b"]
    clip = cfg["vision_config"]["width"]["clip-l-14-224"]
    ov = cfg.get("dsocr_test_overrides", {})
    return dict(
        sam_width=sam["width"],
        sam_layers=sam["layers"],
        sam_heads=sam["heads"],
        sam_global=list(sam["global_attn_indexes"]),
        sam_down=list(sam["downsample_channels"]),
        sam_window=ov.get("sam_window_size", 14),
        sam_out=ov.get("sam_out_chans", 256),
        sam_mlp_ratio=ov.get("sam_mlp_ratio", 4.0),
        clip_width=clip["width"],
        clip_layers=clip["layers"],
        clip_heads=clip["heads"],
        clip_ffn=ov.get("clip_ffn_hidden_size", 4096),
        proj_in=cfg["projector_config"]["input_dim"],
        n_embed=cfg["projector_config"]["n_embed"],
    )


# ---------------------------------------------------------------------------------------------------------
# Model construction with the official classes


def official_sam(deepencoder, sizes: dict):
    """The official `ImageEncoderViT` with `_build_sam`'s arguments at `sizes` (see `vision_sizes`); the
    class hard-codes the compressor (256 → 512 → 1024; 896 last in v2), recreated at `sam_down`."""
    nn = torch.nn
    enc = deepencoder.ImageEncoderViT(
        depth=sizes["sam_layers"],
        embed_dim=sizes["sam_width"],
        img_size=1024,
        mlp_ratio=sizes["sam_mlp_ratio"],
        norm_layer=functools.partial(nn.LayerNorm, eps=1e-6),
        num_heads=sizes["sam_heads"],
        patch_size=16,
        qkv_bias=True,
        use_rel_pos=True,
        global_attn_indexes=sizes["sam_global"],
        window_size=sizes["sam_window"],
        out_chans=sizes["sam_out"],
    )
    d0, d1 = sizes["sam_down"]
    enc.net_2 = nn.Conv2d(sizes["sam_out"], d0, kernel_size=3, stride=2, padding=1, bias=False)
    enc.net_3 = nn.Conv2d(d0, d1, kernel_size=3, stride=2, padding=1, bias=False)
    return enc.eval()


def build_model(modeling, deepencoder, cfg: dict, seed: int | None, dtype=torch.float32):
    sizes = vision_sizes(cfg)
    nn = torch.nn

    def build_sam():
        return official_sam(deepencoder, sizes)

    def build_clip():
        vit_cfg = copy.deepcopy(deepencoder.vit_model_cfg)
        vit_cfg.num_layers = sizes["clip_layers"]
        vit_cfg.hidden_size = sizes["clip_width"]
        vit_cfg.num_heads = sizes["clip_heads"]
        vit_cfg.num_attention_heads = sizes["clip_heads"]
        vit_cfg.ffn_hidden_size = sizes["clip_ffn"]
        return deepencoder.VitModel(cfg=vit_cfg, freeze_embed=False, freeze_pre_norm=False)

    modeling.build_sam_vit_b = build_sam
    modeling.build_clip_l = build_clip

    config = modeling.DeepseekOCRConfig(**{k: v for k, v in cfg.items() if k != "dsocr_test_overrides"})
    config._attn_implementation = "eager"
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        model = modeling.DeepseekOCRForCausalLM(config)
        # The official __init__ hard-codes n_embed = 1280 and input_dim = 2048.
        n = sizes["n_embed"]
        model.model.projector = deepencoder.MlpProjector(
            modeling.Dict(projector_type="linear", input_dim=sizes["proj_in"], n_embed=n)
        )
        model.model.image_newline = nn.Parameter(torch.empty(n))
        model.model.view_seperator = nn.Parameter(torch.empty(n))
    finally:
        torch.set_default_dtype(previous)
    if seed is not None:
        randomize(model, seed)
    return model.eval()


def init_std(name: str, shape: tuple) -> tuple[float, float]:
    """(mean, std) of the random init for one parameter: keeps activations O(1) through every stage."""
    if len(shape) == 1:
        if name.endswith("bias"):
            return 0.0, 0.1
        if "norm" in name or "layrnorm" in name:
            return 1.0, 0.1
        return 0.0, 1.0  # class_embedding, image_newline, view_seperator
    if name.endswith("pos_embed") or "rel_pos" in name or "position_embedding" in name:
        return 0.0, 0.5
    if name.endswith("embed_tokens.weight"):
        return 0.0, 1.0
    fan_in = math.prod(shape[1:])
    return 0.0, 1.0 / math.sqrt(fan_in)


@torch.no_grad()
def randomize(model, seed: int) -> None:
    """Seeded random values for every parameter, rounded to bf16 (the real checkpoint's dtype)."""
    gen = torch.Generator().manual_seed(seed)
    for name, param in sorted(model.named_parameters(), key=lambda kv: kv[0]):
        mean, std = init_std(name, tuple(param.shape))
        values = torch.randn(param.shape, generator=gen, dtype=torch.float32) * std + mean
        param.copy_(values.to(torch.bfloat16).to(param.dtype))


def original_state_dict(model) -> dict:
    """The checkpoint tensors under their original names, bf16, without buffers the hub file lacks."""
    state = {}
    for name, tensor in model.state_dict().items():
        if name.endswith("position_ids"):
            continue  # a buffer; not stored in the original file (spec §7)
        state[name] = tensor.detach().to(torch.bfloat16).contiguous()
    return state


# ---------------------------------------------------------------------------------------------------------
# Inputs


def font(size: int):
    return ImageFont.load_default(size=size)


def make_images() -> dict[str, Image.Image]:
    """Deterministic synthetic inputs: an A4 page (tiles 2×3 in Gundam), a landscape scene (3×2), a small note."""
    page = Image.new("RGB", (1190, 1684), (255, 255, 255))
    d = ImageDraw.Draw(page)
    d.text((90, 80), "Quarterly Report 2026", fill=(10, 10, 10), font=font(48))
    words = "the quick brown fox jumps over a lazy dog while optical characters flow".split()
    y = 180
    for line in range(26):
        text = " ".join(words[(line * 3 + k) % len(words)] for k in range(9))
        d.text((90, y), f"{line + 1:02d}. {text}", fill=(30, 30, 30), font=font(24))
        y += 36
    for r in range(5):
        for c in range(4):
            box = (90 + c * 250, 1150 + r * 50, 90 + (c + 1) * 250, 1150 + (r + 1) * 50)
            d.rectangle(box, outline=(0, 0, 0), width=2)
            d.text((box[0] + 12, box[1] + 12), f"r{r}c{c} {r * 17 + c * 3}", fill=(0, 0, 0), font=font(20))
    d.rectangle((700, 1450, 1100, 1620), fill=(200, 210, 230), outline=(40, 40, 120), width=3)
    d.ellipse((760, 1480, 900, 1600), fill=(220, 80, 60))

    photo = Image.new("RGB", (800, 600))
    px = np.zeros((600, 800, 3), dtype=np.uint8)
    yy, xx = np.mgrid[0:600, 0:800]
    px[..., 0] = (xx * 255 // 799).astype(np.uint8)
    px[..., 1] = (yy * 255 // 599).astype(np.uint8)
    px[..., 2] = ((xx + yy) * 255 // 1398).astype(np.uint8)
    photo = Image.fromarray(px, "RGB")
    d = ImageDraw.Draw(photo)
    d.ellipse((100, 80, 380, 360), fill=(250, 240, 60), outline=(0, 0, 0), width=4)
    d.rectangle((450, 300, 740, 560), fill=(30, 120, 200))
    d.polygon([(420, 40), (780, 120), (600, 260)], fill=(240, 60, 150))
    d.text((470, 420), "SALE 50%", fill=(255, 255, 255), font=font(56))

    note = Image.new("RGB", (300, 200), (250, 248, 235))
    d = ImageDraw.Draw(note)
    d.text((16, 16), "Milk  2.49", fill=(20, 20, 20), font=font(28))
    d.text((16, 60), "Bread 3.10", fill=(20, 20, 20), font=font(28))
    d.line((16, 110, 284, 110), fill=(0, 0, 0), width=2)
    d.text((16, 130), "TOTAL 5.59", fill=(150, 0, 0), font=font(32))
    return {"page": page, "photo": photo, "note": note}


# Texts whose token ids (and decoded text) the Rust tokenizer must reproduce.
TOKENIZER_TEXTS = [
    "Hello, world! The quick brown fox jumps over the lazy dog.",
    "深度求索发布了光学字符识别模型。今天天气很好，我们去公园吧！",
    "Mixed 中英文 text: 价格 12.50 元 (about $1.75), 2026年11月27日.",
    "def greet(name: str) -> str:\n    return f\"Hello, {name}!\"  # 注释\n\tprint(greet('x'))",
    "\\[ \\int_0^1 x^2 \\, dx = \\frac{1}{3} \\] and \\( e^{i\\pi} + 1 = 0 \\)",
    "<table><tr><td>Item</td><td>Qty</td></tr><tr><td>Milk</td><td>2</td></tr></table>",
    "<|ref|>title<|/ref|><|det|>[[90, 47, 512, 80]]<|/det|>\n# Quarterly Report 2026\n\n",
    "<image>\n<|grounding|>Convert the document to markdown.",
    "<image>\nLocate <|ref|>the red circle<|/ref|> in the image.",
    "  leading spaces, trailing spaces  \n\n\nthree newlines\r\nwindows line 1234567 numbers 3.14159",
    "Emoji 😀👍🏽 and accents: café, naïve, Ærøskøbing; Кириллица; العربية; 日本語のテキスト",
    "<｜begin▁of▁sentence｜>text<｜end▁of▁sentence｜><|User|>hi<|Assistant|><td></td><tr></tr>",
]


def tokenizer_fixture(tokenizer) -> dict:
    cases = []
    for text in TOKENIZER_TEXTS:
        ids = tokenizer.encode(text, add_special_tokens=False)
        cases.append({"text": text, "ids": ids, "decoded": tokenizer.decode(ids, skip_special_tokens=False)})
    return {"tokenizer_class": type(tokenizer).__name__, "cases": cases}


def make_extra_images() -> dict[str, tuple[Image.Image, str]]:
    """More shapes and kinds for preprocessing parity only (views recorded as sha256 of the uint8 pixels):
    (image, file format). Sizes hit the tie rules, the no-tile threshold, extreme aspects and upscaling."""
    def scene(w: int, h: int, seed: int) -> Image.Image:
        yy, xx = np.mgrid[0:h, 0:w]
        px = np.stack([(xx * 7 + seed) % 256, (yy * 5 + 3 * seed) % 256, ((xx ^ yy) + seed) % 256], -1)
        img = Image.fromarray(px.astype(np.uint8), "RGB")
        d = ImageDraw.Draw(img)
        d.ellipse((w // 5, h // 5, w * 3 // 5, h * 3 // 5), fill=(255, 255, 255), outline=(0, 0, 0))
        d.text((w // 10, h // 10), f"{w}x{h}", fill=(0, 0, 0), font=font(max(10, min(w, h) // 8)))
        return img

    out = {
        "screenshot": (scene(1920, 1080, 1), "PNG"),
        "wide": (scene(3000, 400, 2), "PNG"),
        "tall": (scene(500, 3000, 3), "PNG"),
        "thumb": (scene(64, 48, 4), "PNG"),
        "square": (scene(1024, 1024, 5), "PNG"),
        "tie641": (scene(641, 640, 6), "PNG"),
        "tie1250": (scene(1250, 1000, 7), "PNG"),
        "big1400": (scene(1400, 1400, 8), "PNG"),
        "strip": (scene(4000, 90, 9), "PNG"),
        "grey": (scene(900, 700, 10).convert("L"), "PNG"),
        "rgba": (scene(700, 500, 11).convert("RGBA"), "PNG"),
        "palette": (scene(660, 660, 12).convert("P", palette=Image.Palette.ADAPTIVE, colors=64), "PNG"),
    }
    rgba = np.asarray(out["rgba"][0]).copy()
    rgba[::3, :, 3] = 0  # transparent rows keep their colour: convert("RGB") drops alpha
    rgba[:, ::5, 3] = 128
    out["rgba"] = (Image.fromarray(rgba, "RGBA"), "PNG")
    rotated = scene(800, 500, 13)
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90° clockwise on display
    out["exif6"] = (rotated, ("PNG", exif))
    return out


class Captured(Exception):
    pass


def official_inputs(modeling, model, tokenizer, image_path: pathlib.Path, prompt: str, mode: tuple) -> dict:
    """Runs the official `infer` up to its `generate` call and returns what it would generate from:
    token ids, the image mask, the bf16 pixel tensors, the tile grid and the uint8 views (PIL images
    handed to the normalising transform, in order: global view first, then tiles)."""
    _, base_size, image_size, crop_mode = mode
    views = []
    transform_call = modeling.BasicImageTransform.__call__

    def recording_call(self, x):
        views.append(np.asarray(x, dtype=np.uint8).copy())
        return transform_call(self, x)

    captured = {}

    def capture_generate(input_ids, images, images_seq_mask, images_spatial_crop, **kwargs):
        captured.update(
            input_ids=input_ids.clone(),
            images_crop=images[0][0].clone(),
            images_ori=images[0][1].clone(),
            images_seq_mask=images_seq_mask.clone(),
            images_spatial_crop=images_spatial_crop.clone(),
            generate_kwargs=kwargs,
        )
        raise Captured()

    modeling.BasicImageTransform.__call__ = recording_call
    model.generate = capture_generate
    out_dir = tempfile.mkdtemp(prefix="dsocr_infer_")
    try:
        with contextlib_redirect():
            model.infer(
                tokenizer,
                prompt=prompt,
                image_file=str(image_path),
                output_path=out_dir,
                base_size=base_size,
                image_size=image_size,
                crop_mode=crop_mode,
                save_results=False,
                test_compress=False,
                eval_mode=False,
            )
        raise RuntimeError("infer returned without calling generate")
    except Captured:
        pass
    finally:
        modeling.BasicImageTransform.__call__ = transform_call
        del model.generate
        shutil.rmtree(out_dir, ignore_errors=True)
    captured["views"] = views
    return captured


class contextlib_redirect:
    """Silences the official code's prints."""

    def __enter__(self):
        self._stdout = sys.stdout
        sys.stdout = io.StringIO()

    def __exit__(self, *exc):
        sys.stdout = self._stdout
        return False


# ---------------------------------------------------------------------------------------------------------
# Running the model


def image_args(inputs: dict) -> dict:
    """The image arguments `infer` passes to the official forward/generate, as float32."""
    return dict(
        images=[(inputs["images_crop"].float(), inputs["images_ori"].float())],
        images_seq_mask=inputs["images_seq_mask"],
        images_spatial_crop=inputs["images_spatial_crop"],
    )


@torch.no_grad()
def run_stages(model, inputs: dict, stages: dict | None = None, extra_hooks=()) -> dict:
    """One float32 forward of the official model over the prompt, recording the output of every
    encoder stage (`stages`: name → module; default v1's SAM neck, both convs, CLIP, projector) per
    view, the image sequence as the first decoder layer receives it, and the logits. `extra_hooks`:
    more hook handles to remove afterwards."""
    m = model.model
    if stages is None:
        stages = {"sam": m.sam_model.neck, "compressor_1": m.sam_model.net_2, "compressor": m.sam_model.net_3,
                  "clip": m.vision_model, "projector": m.projector}
    records: dict[str, list] = {k: [] for k in stages}
    hooks = [module.register_forward_hook(lambda mod, i, o, key=key: records[key].append(o.clone())) for key, module in stages.items()]
    hooks += list(extra_hooks)
    embeds = []
    hooks.append(
        m.layers[0].register_forward_pre_hook(
            lambda mod, args, kwargs: embeds.append(
                (args[0] if args else kwargs["hidden_states"]).clone()
            ),
            with_kwargs=True,
        )
    )
    try:
        with contextlib_redirect():
            out = model(
                input_ids=inputs["input_ids"],
                **image_args(inputs),
                use_cache=False,
                return_dict=True,
            )
    finally:
        for h in hooks:
            h.remove()
    result = {}
    # The official forward encodes the tiles first (when there are any), then the global view.
    tiled = len(records["sam"]) == 2
    for stage, outs in records.items():
        if tiled:
            result[f"local.{stage}"] = outs[0]
            result[f"global.{stage}"] = outs[1]
        else:
            assert len(outs) == 1, (stage, len(outs))
            result[f"global.{stage}"] = outs[0]
    mask = inputs["images_seq_mask"][0]
    result["image_embeds"] = embeds[0][0][mask]
    result["inputs_embeds"] = embeds[0][0]
    result["logits"] = out.logits[0].float()
    return result


@torch.no_grad()
def run_greedy(model, inputs: dict, tokens: int = GREEDY_TOKENS) -> tuple[list[int], list[float]]:
    """The official model's own `generate`: greedy, HF no-repeat-ngram 20, EOS 1, as the model card."""
    with contextlib_redirect():
        out = model.generate(
            inputs["input_ids"],
            **image_args(inputs),
            do_sample=False,
            num_beams=1,
            eos_token_id=1,
            pad_token_id=2,
            max_new_tokens=tokens,
            no_repeat_ngram_size=20,
            use_cache=True,
            output_logits=True,
            return_dict_in_generate=True,
        )
    prompt_len = inputs["input_ids"].shape[1]
    tokens = out.sequences[0, prompt_len:].tolist()
    gaps = []
    for step_logits in out.logits:
        top2 = torch.topk(step_logits[0].float(), 2).values
        gaps.append(float(top2[0] - top2[1]))
    return tokens, gaps


# ---------------------------------------------------------------------------------------------------------
# Writing


def save_png(array: np.ndarray, path: pathlib.Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array, "RGB").save(path, format="PNG", optimize=False, compress_level=9)


def save_tensors(tensors: dict, path: pathlib.Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in sorted(tensors.items())}, str(path))


def write_json(obj, path: pathlib.Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=1, sort_keys=True, ensure_ascii=False) + "\n", encoding="utf-8")


def write_checkpoint_files(cfg: dict, out: pathlib.Path, link_tokenizer: bool) -> None:
    """config.json plus the hub's tokenizer files. The committed fixtures link the one tokenizer.json that
    weights/build_tokenizer.py writes rather than carrying 4 MB copies of it."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(cfg, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    target = out / "tokenizer.json"
    if target.is_symlink() or target.exists():
        target.unlink()
    if link_tokenizer:
        target.symlink_to(os.path.relpath(TOKENIZER_JSON, out))
    else:
        shutil.copy(TOKENIZER_JSON, target)
    for f in ("tokenizer_config.json", "special_tokens_map.json", "processor_config.json"):
        shutil.copy(HUB_DIR / f, out / f)


def load_tokenizer(checkpoint_dir: pathlib.Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(checkpoint_dir))


def generate_fixtures(modeling, deepencoder, out: pathlib.Path, log) -> None:
    images = make_images()
    inputs_dir = out / "images"
    for name, image in images.items():
        save_png(np.asarray(image), inputs_dir / f"{name}.png")
    # A two-page PDF (page, note) at 144 dpi for the CLI's PDF input; fixed dates keep it byte-stable.
    stamp = time.gmtime(1767225600)
    images["page"].save(inputs_dir / "doc.pdf", save_all=True, append_images=[images["note"]], resolution=144.0,
                        creationDate=stamp, modDate=stamp, title="dsocr test document")

    preprocess_meta = {}
    for config_name, spec in CONFIGS.items():
        cfg = tiny_config_json(spec)
        ckpt_dir = out / config_name
        write_checkpoint_files(cfg, ckpt_dir, link_tokenizer=True)
        model = build_model(modeling, deepencoder, cfg, spec["seed"])
        save_tensors(original_state_dict(model), ckpt_dir / "model.safetensors")
        # The fixtures come from exactly the weights that were saved (bf16 values, run in float32).
        tokenizer = load_tokenizer(ckpt_dir)
        index = {"config": config_name, "greedy_tokens": GREEDY_TOKENS, "logit_columns": LOGIT_COLUMNS, "cases": []}
        for image_name, prompt in IMAGES:
            image_path = inputs_dir / f"{image_name}.png"
            for mode in MODES:
                mode_name = mode[0]
                inputs = official_inputs(modeling, model, tokenizer, image_path, prompt, mode)
                stages = run_stages(model, inputs)
                tokens, gaps = run_greedy(model, inputs)
                grid = [int(v) for v in inputs["images_spatial_crop"][0].tolist()]
                views = inputs["views"]
                # Preprocessing does not depend on the config: record it once.
                key = f"{image_name}/{mode_name}"
                if key not in preprocess_meta:
                    for k, view in enumerate(views):
                        label = "global" if k == 0 else f"tile{k - 1}"
                        save_png(view, out / "preprocess" / image_name / mode_name / f"{label}.png")
                    if key == PIXELS_CASE:
                        # The normalised tensor `infer` hands to the model (bf16), to pin normalisation.
                        save_tensors({"pixels": inputs["images_ori"][0]}, out / "preprocess" / image_name / mode_name / "global.pixels.safetensors")
                    preprocess_meta[key] = {
                        "image": image_name,
                        "mode": mode_name,
                        "original_size": list(images[image_name].size),
                        "grid": grid,
                        "views": ["global"] + [f"tile{k}" for k in range(len(views) - 1)],
                    }
                tensors, entry = case_record(image_name, mode_name, prompt, inputs, stages, tokens, gaps)
                ids = inputs["input_ids"][0]
                save_tensors(tensors, ckpt_dir / "cases" / f"{image_name}-{mode_name}.safetensors")
                index["cases"].append(entry)
                log(f"{config_name} {image_name:5s} {mode_name:6s} grid={grid} prompt={ids.numel():4d} "
                    f"tokens={tokens[:6]}... min gap {min(gaps):.4f}")
        write_json(index, ckpt_dir / "cases" / "index.json")
    write_json(preprocess_meta, out / "preprocess" / "index.json")
    write_extra_preprocess(modeling, model, tokenizer, out)
    write_json(tokenizer_fixture(tokenizer), out / "tokenizer_cases.json")
    write_manifest(out)


def case_record(image_name: str, mode_name: str, prompt: str, inputs: dict, stages: dict, tokens: list, gaps: list):
    """One recorded case: its tensors (prompt ids, image sequence, greedy tokens and gaps, every
    `global.*`/`local.*` stage; for the logits image the last-position and column logits) and its
    entry in `cases/index.json`."""
    ids = inputs["input_ids"][0]
    tensors = {
        "input_ids": ids.to(torch.int64),
        "image_embeds": stages["image_embeds"].float(),
        "greedy_tokens": torch.tensor(tokens, dtype=torch.int64),
        "greedy_gaps": torch.tensor(gaps, dtype=torch.float32),
    }
    for stage_key, value in stages.items():
        if stage_key.startswith(("global.", "local.")):
            tensors[stage_key] = value.float()
    if image_name == LOGITS_IMAGE:
        tensors["last_logits"] = stages["logits"][-1].float()
        tensors["logits_columns"] = stages["logits"][:, LOGIT_COLUMNS].float()
    entry = {
        "image": image_name,
        "mode": mode_name,
        "prompt": prompt,
        "grid": [int(v) for v in inputs["images_spatial_crop"][0].tolist()],
        "prompt_tokens": int(ids.numel()),
        "image_tokens": int((ids == IMAGE_TOKEN_ID).sum()),
        "greedy_tokens": tokens,
        "min_greedy_gap": min(gaps),
        "has_logits_columns": image_name == LOGITS_IMAGE,
    }
    return tensors, entry


def write_extra_preprocess(modeling, model, tokenizer, out: pathlib.Path) -> None:
    """Views of the extra images in every mode through the official `infer`, recorded as hashes."""
    cases = {}
    for name, (image, fmt) in make_extra_images().items():
        path = out / "images" / "extra" / f"{name}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(fmt, tuple):
            image.save(path, format=fmt[0], exif=fmt[1], compress_level=9)
        else:
            image.save(path, format=fmt, compress_level=9)
        for mode in MODES:
            inputs = official_inputs(modeling, model, tokenizer, path, "<image>\nFree OCR.", mode)
            views = inputs["views"]
            cases[f"{name}/{mode[0]}"] = {
                "image": name,
                "mode": mode[0],
                "grid": [int(v) for v in inputs["images_spatial_crop"][0].tolist()],
                "image_tokens": int((inputs["input_ids"][0] == IMAGE_TOKEN_ID).sum()),
                "views": [
                    {"size": [int(v.shape[1]), int(v.shape[0])], "sha256": hashlib.sha256(np.ascontiguousarray(v).tobytes()).hexdigest()}
                    for v in views
                ],
            }
    write_json(cases, out / "preprocess" / "extra.json")


def write_manifest(out: pathlib.Path, skip=("hub/", "hub-ocr2/", "ocr2/", "reader/")) -> None:
    """sha256 of every generated file under `out` but those under `skip` (copied hub files; OCR-2's
    fixtures, which have their own manifest; the small reader's, written by weights/reader/evaluate.py)."""
    lines = []
    for path in sorted(p for p in out.rglob("*") if p.is_file() and p.name != "MANIFEST.sha256"):
        rel = path.relative_to(out).as_posix()
        if rel.startswith(tuple(skip)):
            continue
        lines.append(f"{hashlib.sha256(path.read_bytes()).hexdigest()}  {rel}")
    (out / "MANIFEST.sha256").write_text("\n".join(lines) + "\n")


def compare_regenerated(generate, committed: pathlib.Path, prepare=lambda tmp: None) -> int:
    """Runs `generate(tmp)` into a temporary directory (after `prepare(tmp)`) and compares its manifest
    with the one committed in `committed`, naming every file that differs."""
    tmp = pathlib.Path(tempfile.mkdtemp(prefix="dsocr_fixtures_"))
    prepare(tmp)
    generate(tmp)
    committed_text = (committed / "MANIFEST.sha256").read_text()
    fresh = (tmp / "MANIFEST.sha256").read_text()
    if committed_text == fresh:
        print(f"OK: regenerated fixtures are identical ({len(fresh.splitlines())} files)")
        shutil.rmtree(tmp)
        return 0
    old = dict(reversed(line.split("  ", 1)) for line in committed_text.splitlines())
    new = dict(reversed(line.split("  ", 1)) for line in fresh.splitlines())
    for rel in sorted(set(old) | set(new)):
        if old.get(rel) != new.get(rel):
            print(f"DIFFERS: {rel}")
    print(f"regenerated copy kept in {tmp}")
    return 1


def check(modeling, deepencoder) -> int:
    """Regenerates into a temporary directory and compares every byte with the committed fixtures."""
    return compare_regenerated(
        lambda tmp: generate_fixtures(modeling, deepencoder, tmp, log=lambda s: print(s, flush=True)),
        FIXTURES,
        prepare=lambda tmp: shutil.copytree(HUB_DIR, tmp / "hub"),
    )


def write_full(modeling, deepencoder, out: pathlib.Path, seed: int) -> None:
    """A full-size random-weight checkpoint in the original layout (not committed; ~6.7 GB)."""
    cfg = hub_config()
    model = build_model(modeling, deepencoder, cfg, seed, dtype=torch.bfloat16)
    write_checkpoint_files(cfg, out, link_tokenizer=False)
    shutil.copy(HUB_DIR / "config.json", out / "config.json")  # the hub file byte for byte
    state = original_state_dict(model)
    save_file(state, str(out / "model-00001-of-000001.safetensors"), metadata={"format": "pt"})
    total = sum(t.numel() for t in state.values())
    print(f"wrote {out}: {len(state)} tensors, {total} parameters")


@torch.no_grad()
def load_full_model(modeling, deepencoder, ckpt: pathlib.Path):
    """The official model holding a --full checkpoint's weights, in float32. Built in bf16 and filled
    tensor by tensor, then widened: peak memory stays near the f32 model's."""
    from safetensors import safe_open

    model = build_model(modeling, deepencoder, hub_config(), seed=None, dtype=torch.bfloat16)
    params = dict(model.named_parameters())
    with safe_open(str(ckpt / "model-00001-of-000001.safetensors"), framework="pt") as f:
        names = set(f.keys())
        assert names == set(params), (names ^ set(params))
        for name in names:
            params[name].data.copy_(f.get_tensor(name))
    return model.float()


@torch.no_grad()
def full_reference(modeling, deepencoder, ckpt: pathlib.Path, tokens: int, bench: bool) -> None:
    """Official-code outputs (f32) of the full-size checkpoint written by --full, for the ignored full-size
    Rust tests, plus timings of the same forward passes for the benchmark (--bench)."""
    model = load_full_model(modeling, deepencoder, ckpt)
    tokenizer = load_tokenizer(ckpt)
    images = make_images()
    image_path = pathlib.Path(tempfile.mkdtemp()) / "page.png"
    images["page"].save(image_path)
    tensors, timings = {}, {"threads": torch.get_num_threads(), "dtype": "float32"}
    for mode in [m for m in MODES if m[0] in ("tiny", "small", "base")]:
        name = mode[0]
        inputs = official_inputs(modeling, model, tokenizer, image_path, IMAGES[0][1], mode)
        if name in ("tiny", "small"):
            stages = run_stages(model, inputs)
            for key in ("global.sam", "global.compressor", "global.clip", "global.projector", "image_embeds"):
                tensors[f"{name}.{key}"] = stages[key].float().contiguous()
            tensors[f"{name}.input_ids"] = inputs["input_ids"][0].to(torch.int64)
            tensors[f"{name}.last_logits"] = stages["logits"][-1].float().contiguous()
            greedy, _ = run_greedy(model, inputs, tokens)
            tensors[f"{name}.greedy_tokens"] = torch.tensor(greedy, dtype=torch.int64)
        if bench:
            pixels = inputs["images_ori"].float()
            m = model.model
            def encode():
                sam = m.sam_model(pixels)
                clip = m.vision_model(pixels, sam)
                return m.projector(torch.cat((clip[:, 1:], sam.flatten(2).permute(0, 2, 1)), dim=-1))
            encode()  # warm-up
            t = time.perf_counter(); encode(); timings[f"{name}.encode_s"] = time.perf_counter() - t
            if name in ("tiny", "small"):
                t = time.perf_counter()
                greedy, _ = run_greedy(model, inputs, tokens)
                total = time.perf_counter() - t
                t = time.perf_counter(); run_greedy(model, inputs, 1); first = time.perf_counter() - t
                timings[f"{name}.prefill_s"] = first  # encoder + prefill + first token
                timings[f"{name}.decode_tokens_per_s"] = (len(greedy) - 1) / max(total - first, 1e-9)
                timings[f"{name}.generated"] = len(greedy)
        print(f"{name}: done {timings}", flush=True)
    save_file(tensors, str(ckpt / "reference.safetensors"))
    if bench:
        (ckpt / "reference_timings.json").write_text(json.dumps(timings, indent=1) + "\n")


@torch.no_grad()
def bench_e2e(modeling, deepencoder, ckpt: pathlib.Path, tokens: int, modes=("tiny", "small")) -> None:
    """Whole-page wall time of the official code on CPU (f32): `infer`'s preprocessing and prompt, the
    vision encoder, prefill and `tokens` greedy tokens (EOS ignored), per mode; and the process's peak RSS.
    Compare with `/usr/bin/time -v dsocr ocr tests/fixtures/images/page.png --model DIR --mode M
    --max-new-tokens N --repeat-guard hf` (see the issue notes)."""
    import resource

    t = time.perf_counter()
    model = load_full_model(modeling, deepencoder, ckpt)
    print(f"load: {time.perf_counter() - t:.1f} s", flush=True)
    tokenizer = load_tokenizer(ckpt)
    image_path = pathlib.Path(tempfile.mkdtemp()) / "page.png"
    make_images()["page"].save(image_path)
    for mode in [m for m in MODES if m[0] in modes]:
        t = time.perf_counter()
        inputs = official_inputs(modeling, model, tokenizer, image_path, IMAGES[0][1], mode)
        with contextlib_redirect():
            out = model.generate(
                inputs["input_ids"],
                **image_args(inputs),
                do_sample=False, num_beams=1, eos_token_id=None, pad_token_id=2,
                min_new_tokens=tokens, max_new_tokens=tokens, no_repeat_ngram_size=20, use_cache=True,
            )
        generated = out.shape[1] - inputs["input_ids"].shape[1]
        print(f"{mode[0]}: {time.perf_counter() - t:.2f} s for {generated} tokens", flush=True)
    print(f"peak RSS: {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6:.2f} GB", flush=True)



@torch.no_grad()
def profile_encoder(modeling, deepencoder, ckpt: pathlib.Path) -> None:
    """Per-stage wall times of the official vision encoder (f32) on a --full checkpoint, `page.png`, per
    mode (Gundam: the 1024 global view and its 640 tiles): module hooks time every SAM and CLIP
    projection, MLP, norm and convolution; an attention's core (scores, rel-pos, softmax, values) is
    its time less its projections; "other" is the rest (window partitions, residuals, reshapes).
    Second of two runs. Compare with dsocr's `encoder_profile` binary (same categories)."""
    model = load_full_model(modeling, deepencoder, ckpt)
    tokenizer = load_tokenizer(ckpt)
    image_path = pathlib.Path(tempfile.mkdtemp()) / "page.png"
    make_images()["page"].save(image_path)
    m = model.model
    times: dict[str, float] = {}
    started: dict[int, float] = {}

    def category(name: str, module) -> str | None:
        sam, clip = name.startswith("sam_model."), name.startswith("vision_model.")
        leaf = name.rsplit(".", 1)[-1]
        if sam:
            if ".blocks." in name:
                block = m.sam_model.blocks[int(name.split(".")[2])]
                kind = "global" if block.window_size == 0 else "windowed"
                return {"qkv": "SAM qkv", "proj": "SAM proj", "lin1": "SAM MLP + GELU", "lin2": "SAM MLP + GELU", "act": "SAM MLP + GELU",
                        "norm1": "SAM layer norm", "norm2": "SAM layer norm", "attn": f"SAM attention core ({kind})"}.get(leaf)
            if name == "sam_model.patch_embed":
                return "SAM patch embed"
            if name == "sam_model.neck":
                return "SAM neck"
            if name in ("sam_model.net_2", "sam_model.net_3"):
                return "compressor convs"
            return None
        if clip:
            if name == "vision_model.embeddings":
                return "CLIP embeddings"
            if ".layers." in name:
                # Its attention and MLP modules are not called through `__call__` (no hooks): their cores and
                # quick-GELU fall in "other".
                return {"qkv_proj": "CLIP qkv", "out_proj": "CLIP out proj", "fc1": "CLIP MLP", "fc2": "CLIP MLP",
                        "layer_norm1": "CLIP layer norm", "layer_norm2": "CLIP layer norm"}.get(leaf)
            if leaf == "pre_layrnorm":
                return "CLIP layer norm"
        return None

    # Modules that contain timed ones: their own time excludes those (e.g. an attention's projections).
    inner = {"SAM attention core (global)": ("SAM qkv", "SAM proj"), "SAM attention core (windowed)": ("SAM qkv", "SAM proj")}
    hooks = []
    for name, module in m.named_modules():
        kind = category(name, module)
        if kind is None:
            continue
        def pre(mod, args, key=id(module), kind=kind):
            started[key] = (time.perf_counter(), sum(times.get(k, 0.0) for k in inner.get(kind, ())))
        def post(mod, args, out, key=id(module), kind=kind):
            t0, children = started[key]
            own = time.perf_counter() - t0 - (sum(times.get(k, 0.0) for k in inner.get(kind, ())) - children)
            times[kind] = times.get(kind, 0.0) + own
        hooks += [module.register_forward_pre_hook(pre), module.register_forward_hook(post)]

    def encode(pixels):
        sam = m.sam_model(pixels)
        clip = m.vision_model(pixels, sam)
        return m.projector(torch.cat((clip[:, 1:], sam.flatten(2).permute(0, 2, 1)), dim=-1))

    for mode in [x for x in MODES if x[0] in ("tiny", "small", "base", "gundam")]:
        inputs = official_inputs(modeling, model, tokenizer, image_path, IMAGES[0][1], mode)
        views = [inputs["images_ori"].float()]
        if mode[3] and inputs["images_crop"].abs().sum() > 0:
            views.append(inputs["images_crop"].float())
        for run in range(2):
            times.clear()
            t = time.perf_counter()
            for pixels in views:
                encode(pixels)
            total = time.perf_counter() - t
        times["other"] = total - sum(times.values())
        shapes = " + ".join("x".join(str(d) for d in v.shape) for v in views)
        print(f"== {mode[0]} ({shapes}): encoder {total:.3f} s")
        for kind, seconds in sorted(times.items(), key=lambda kv: -kv[1]):
            print(f"  {kind:34s} {seconds:8.3f} s {100 * seconds / total:5.1f} %")
    for h in hooks:
        h.remove()


@torch.no_grad()
def bench_load(code_dir: pathlib.Path, ckpt: pathlib.Path, dtype: str) -> None:
    """The official loading path timed: `AutoModel.from_pretrained(..., trust_remote_code=True,
    use_safetensors=True)` as the model card calls it, on a hub-layout folder (the checkpoint's files
    beside the remote code), from the page cache (the weights are read once first). Compare with
    dsocr's load (the bench binary's `load`, or `dsocr ocr` minus its `timings_ms.total`)."""
    import resource
    from transformers import AutoModel

    repo = pathlib.Path(tempfile.mkdtemp(prefix="dsocr_hub_"))
    for f in ckpt.iterdir():
        if f.is_file():
            (repo / f.name).symlink_to(f.resolve())
    for f in REF_FILES:
        shutil.copy(code_dir / f, repo / f)
    index = "model.safetensors.index.json"
    if not (repo / index).exists():  # the hub's own index names the single file of --full
        shutil.copy(HUB_DIR / index, repo / index)
    for f in ckpt.glob("*.safetensors"):
        with open(f, "rb") as handle:
            while handle.read(64 << 20):
                pass
    t = time.perf_counter()
    model = AutoModel.from_pretrained(str(repo), trust_remote_code=True, use_safetensors=True, torch_dtype=getattr(torch, dtype))
    elapsed = time.perf_counter() - t
    params = sum(p.numel() for p in model.parameters())
    print(f"load ({dtype}, {params / 1e9:.2f} B parameters): {elapsed:.1f} s", flush=True)
    print(f"peak RSS: {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6:.2f} GB", flush=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ref-code", type=pathlib.Path, required=True, help="folder with the official remote code")
    parser.add_argument("--out", type=pathlib.Path, default=FIXTURES)
    parser.add_argument("--check", action="store_true", help="regenerate and compare with the committed fixtures")
    parser.add_argument("--full", type=pathlib.Path, help="write a full-size random checkpoint to this folder")
    parser.add_argument("--seed", type=int, default=42, help="seed of the --full checkpoint")
    parser.add_argument("--full-reference", type=pathlib.Path, help="record official outputs of a --full checkpoint")
    parser.add_argument("--bench", action="store_true", help="with --full-reference: also time the official code")
    parser.add_argument("--bench-e2e", type=pathlib.Path, help="time whole pages with the official code on a --full checkpoint")
    parser.add_argument("--tokens", type=int, default=64, help="tokens per page for --bench-e2e")
    parser.add_argument("--modes", default="tiny,small", help="modes for --bench-e2e (comma-separated)")
    parser.add_argument("--bench-load", type=pathlib.Path, help="time the official from_pretrained on a full checkpoint folder")
    parser.add_argument("--load-dtype", default="float32", help="torch dtype for --bench-load")
    parser.add_argument("--profile-encoder", type=pathlib.Path, help="per-stage times of the official encoder on a --full checkpoint")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (fixtures: 1, for reproducibility)")
    args = parser.parse_args()

    torch.set_num_threads(args.threads)  # 1 for the fixtures: bit-reproducible reductions
    torch.use_deterministic_algorithms(True)
    modeling, deepencoder = load_reference(args.ref_code)
    if args.full:
        write_full(modeling, deepencoder, args.full, args.seed)
        return 0
    if args.bench_e2e:
        bench_e2e(modeling, deepencoder, args.bench_e2e, args.tokens, tuple(args.modes.split(",")))
        return 0
    if args.bench_load:
        bench_load(args.ref_code, args.bench_load, args.load_dtype)
        return 0
    if args.profile_encoder:
        profile_encoder(modeling, deepencoder, args.profile_encoder)
        return 0
    if args.full_reference:
        full_reference(modeling, deepencoder, args.full_reference, tokens=16, bench=args.bench)
        return 0
    if args.check:
        return check(modeling, deepencoder)
    generate_fixtures(modeling, deepencoder, args.out, log=lambda s: print(s, flush=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
