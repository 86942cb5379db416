#!/usr/bin/env python3
"""dsocr reference fixtures for DeepSeek-OCR-2.

Tiny random-weight DeepSeek-OCR-2 checkpoints in the ORIGINAL hub format (config.json as the hub writes
it for v2, model.safetensors with the original tensor names), and, with the official v2 remote code, the
inputs and stage-by-stage outputs the Rust tests compare against. Same method as generate.py (v1): the
official code is never committed; pass its folder with --ref-code (modeling_deepseekocr2.py,
deepencoderv2.py, modeling_deepseekv2.py, configuration_deepseek_v2.py, conversation.py). Around it the
generator only
* makes `.cuda()` a no-op;
* builds SAM and the Qwen2 query encoder at the config's sizes through the code's own classes
  (`build_sam_vit_b` and `build_qwen2_decoder_as_encoder` hard-code the real sizes: 768-wide SAM with a
  896-channel last conv, a 24-layer 896-wide Qwen2; the projector 896 → 1280);
* captures `infer`'s arguments to `generate`, then runs the model's own `forward`/`generate` in float32.

Usage:
  python tests/reference/generate_v2.py --ref-code DIR            # writes tests/fixtures/ocr2/
  python tests/reference/generate_v2.py --ref-code DIR --check    # regenerates into a temp dir, compares bytes
Run with OMP_NUM_THREADS=2 OMP_WAIT_POLICY=PASSIVE. See tests/reference/README.md.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import pathlib
import sys

import numpy as np
import torch

import generate as v1

ROOT = v1.ROOT
OUT = v1.FIXTURES / "ocr2"
HUB_V2 = v1.FIXTURES / "hub-ocr2"
REF_FILES = [
    "modeling_deepseekocr2.py",
    "deepencoderv2.py",
    "modeling_deepseekv2.py",
    "configuration_deepseek_v2.py",
    "conversation.py",
]
QWEN2_KEY = "qwen2-0-5b"

# Two tiny v2 configs. `sam`, `qwen2_dim` and the decoder keys go into the hub config.json in place
# (the hub file's `downsample_channels` second entry, 1024, is not what its last conv outputs — the
# query encoder's width is — and stays misstated here too); `overrides` are what the hub file cannot
# express (the official builder's hard-coded Qwen2 sizes), written as `dsocr_test_overrides`.
CONFIGS = {
    "tiny-v2a": dict(
        seed=2468,
        sam=dict(width=32, layers=4, heads=2, global_attn_indexes=[1, 3], downsample_channels=[24, 1024]),
        qwen2_dim=40,
        overrides=dict(sam_out_chans=16, qwen2_layers=2, qwen2_heads=4, qwen2_kv_heads=2, qwen2_intermediate_size=64),
        decoder=dict(
            hidden_size=32,
            num_hidden_layers=3,
            num_attention_heads=2,
            num_key_value_heads=2,
            intermediate_size=64,
            moe_intermediate_size=24,
            n_routed_experts=6,
            n_shared_experts=2,
            num_experts_per_tok=2,
            first_k_dense_replace=1,
        ),
    ),
    "tiny-v2b": dict(
        seed=1357,
        sam=dict(width=48, layers=3, heads=3, global_attn_indexes=[2], downsample_channels=[32, 1024]),
        qwen2_dim=48,
        overrides=dict(
            sam_window_size=7, sam_out_chans=24, sam_mlp_ratio=2.0,
            qwen2_layers=3, qwen2_heads=6, qwen2_kv_heads=3, qwen2_intermediate_size=80,
        ),
        decoder=dict(
            hidden_size=16,
            num_hidden_layers=2,
            num_attention_heads=2,
            num_key_value_heads=2,
            intermediate_size=40,
            moe_intermediate_size=16,
            n_routed_experts=4,
            n_shared_experts=1,
            num_experts_per_tok=2,
            first_k_dense_replace=1,
        ),
    ),
}

# The v2 model card's `infer` call is Gundam-like (base 1024, 768 tiles, crop); without crop the 1024 view
# is the only one with a learned query set besides 768 (`query_1024` / `query_768`).
MODES = [
    ("base", 1024, 1024, False),
    ("gundam", 1024, 768, True),
]
# Gundam cases beyond v1's three images, so the tile counts 2 and 4 are run end to end too (page and photo
# give 6, note none): the 1920×1080 screenshot (2×1) and the 1024² square (2×2) of the extra images.
EXTRA_GUNDAM = [("extra/screenshot", "<image>\nFree OCR."), ("extra/square", "<image>\nFree OCR.")]


def load_reference(code_dir: pathlib.Path):
    return v1.load_reference(code_dir, REF_FILES, "deepseek_ocr2_reference", ("modeling_deepseekocr2", "deepencoderv2"))


def hub_config() -> dict:
    return json.loads((HUB_V2 / "config.json").read_text(encoding="utf-8"))


def tiny_config_json(spec: dict) -> dict:
    cfg = hub_config()
    for target in (cfg, cfg["language_config"]):
        for key, value in spec["decoder"].items():
            assert key in target, key
            target[key] = value
    sam = cfg["vision_config"]["width"]["sam_vit_b"]
    for key, value in spec["sam"].items():
        assert key in sam, key
        sam[key] = value
    cfg["vision_config"]["width"][QWEN2_KEY]["dim"] = spec["qwen2_dim"]
    cfg["projector_config"]["input_dim"] = spec["qwen2_dim"]
    cfg["projector_config"]["n_embed"] = spec["decoder"]["hidden_size"]
    cfg["dsocr_test_overrides"] = dict(spec["overrides"])
    return cfg


def sizes_of(cfg: dict) -> dict:
    sam = cfg["vision_config"]["width"]["sam_vit_b"]
    ov = cfg.get("dsocr_test_overrides", {})
    return dict(
        sam_width=sam["width"], sam_layers=sam["layers"], sam_heads=sam["heads"],
        sam_global=list(sam["global_attn_indexes"]), sam_d0=sam["downsample_channels"][0],
        sam_window=ov.get("sam_window_size", 14), sam_out=ov.get("sam_out_chans", 256),
        sam_mlp_ratio=ov.get("sam_mlp_ratio", 4.0),
        dim=cfg["vision_config"]["width"][QWEN2_KEY]["dim"],
        layers=ov.get("qwen2_layers", 24), heads=ov.get("qwen2_heads", 14), kv_heads=ov.get("qwen2_kv_heads", 2),
        intermediate=ov.get("qwen2_intermediate_size", 4864),
        n_embed=cfg["projector_config"]["n_embed"],
    )


def build_model(modeling, deepencoder, cfg: dict, seed: int | None, dtype=torch.float32):
    s = sizes_of(cfg)
    nn = torch.nn

    def build_sam():
        # The last conv outputs the query encoder's width.
        return v1.official_sam(deepencoder, {**s, "sam_down": [s["sam_d0"], s["dim"]]})

    def build_qwen2():
        return deepencoder.build_qwen2_decoder_as_encoder(
            decoder_layer=s["layers"], hidden_dimension=s["dim"], num_attention_heads=s["heads"],
            num_key_value_heads=s["kv_heads"], intermediate_size=s["intermediate"],
        )

    modeling.build_sam_vit_b = build_sam
    modeling.build_qwen2_decoder_as_encoder = build_qwen2
    config = modeling.DeepseekOCR2Config(**{k: v for k, v in cfg.items() if k != "dsocr_test_overrides"})
    config._attn_implementation = "eager"
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        model = modeling.DeepseekOCR2ForCausalLM(config)
        n = s["n_embed"]
        # The official __init__ hard-codes input_dim = 896, n_embed = 1280.
        model.model.projector = deepencoder.MlpProjector(modeling.Dict(projector_type="linear", input_dim=s["dim"], n_embed=n))
        model.model.view_seperator = nn.Parameter(torch.empty(n))
    finally:
        torch.set_default_dtype(previous)
    if seed is not None:
        v1.randomize(model, seed)
    return model.eval()


def check_names(model) -> None:
    """The tiny model's tensor names follow the real checkpoint's (layer numbers aside)."""
    import re

    real = json.loads((HUB_V2 / "model.safetensors.index.json").read_text())["weight_map"]
    pattern = lambda names: {re.sub(r"\.\d+\.", ".N.", k) for k in names}
    ours = pattern(v1.original_state_dict(model))
    assert ours == pattern(real), sorted(ours ^ pattern(real))


def run_stages(model, inputs: dict) -> dict:
    """v1's recording with the query encoder in CLIP's place (`queries`), and the query encoder's mask."""
    m = model.model
    masks = []
    mask_hook = m.qwen2_model.model.model.layers[0].self_attn.register_forward_pre_hook(
        lambda mod, args, kwargs: masks.append(kwargs["attention_mask"].clone()), with_kwargs=True
    )
    stages = {"sam": m.sam_model.neck, "compressor_1": m.sam_model.net_2, "compressor": m.sam_model.net_3,
              "queries": m.qwen2_model, "projector": m.projector}
    result = v1.run_stages(model, inputs, stages, extra_hooks=[mask_hook])
    # The mask in effect: image tokens see image tokens only; queries see every image token and the
    # queries before them. A port (or transformers version) that falls back to plain causal fails here.
    for mask in masks:
        n = mask.shape[-1] // 2
        allowed = mask[0, 0] == 0
        expected = torch.zeros_like(allowed)
        expected[:n, :n] = True
        expected[n:, :n] = True
        expected[n:, n:] = torch.tril(torch.ones(n, n, dtype=torch.bool))
        assert torch.equal(allowed, expected), "the query encoder did not get the official mask"
    assert masks, "the query encoder's mask was not seen"
    return result


def view_hashes(views) -> list:
    return [
        {"size": [int(v.shape[1]), int(v.shape[0])], "sha256": hashlib.sha256(np.ascontiguousarray(v).tobytes()).hexdigest()}
        for v in views
    ]


def generate_fixtures(modeling, deepencoder, out: pathlib.Path, log) -> None:
    images_dir = v1.FIXTURES / "images"
    preprocess = {}
    for config_name, spec in CONFIGS.items():
        cfg = tiny_config_json(spec)
        ckpt_dir = out / config_name
        write_checkpoint(cfg, ckpt_dir)
        model = build_model(modeling, deepencoder, cfg, spec["seed"])
        check_names(model)
        v1.save_tensors(v1.original_state_dict(model), ckpt_dir / "model.safetensors")
        tokenizer = v1.load_tokenizer(ckpt_dir)
        index = {"config": config_name, "greedy_tokens": v1.GREEDY_TOKENS, "logit_columns": v1.LOGIT_COLUMNS, "cases": []}
        runs = [(image, prompt, mode) for image, prompt in v1.IMAGES for mode in MODES]
        runs += [(image, prompt, MODES[1]) for image, prompt in EXTRA_GUNDAM]
        for image_name, prompt, mode in runs:
            inputs = v1.official_inputs(modeling, model, tokenizer, images_dir / f"{image_name}.png", prompt, mode)
            stages = run_stages(model, inputs)
            tokens, gaps = v1.run_greedy(model, inputs)
            grid = [int(v) for v in inputs["images_spatial_crop"][0].tolist()]
            key = f"{image_name}/{mode[0]}"
            if not image_name.startswith("extra/"):
                preprocess.setdefault(key, {"image": image_name, "mode": mode[0], "grid": grid,
                                        "image_tokens": int((inputs["input_ids"][0] == v1.IMAGE_TOKEN_ID).sum()),
                                        "views": view_hashes(inputs["views"])})
            tensors, entry = v1.case_record(image_name, mode[0], prompt, inputs, stages, tokens, gaps)
            ids = inputs["input_ids"][0]
            v1.save_tensors(tensors, ckpt_dir / "cases" / f"{image_name.replace('/', '-')}-{mode[0]}.safetensors")
            index["cases"].append(entry)
            log(f"{config_name} {image_name:5s} {mode[0]:6s} grid={grid} prompt={ids.numel():4d} "
                f"tokens={tokens[:6]}... min gap {min(gaps):.4f}")
        v1.write_json(index, ckpt_dir / "cases" / "index.json")
    # Views of the extra preprocessing images (generate.py writes them) through the v2 `infer`.
    for name in v1.make_extra_images():
        path = images_dir / "extra" / f"{name}.png"
        for mode in MODES:
            inputs = v1.official_inputs(modeling, model, tokenizer, path, "<image>\nFree OCR.", mode)
            preprocess[f"{name}/{mode[0]}"] = {
                "image": f"extra/{name}", "mode": mode[0],
                "grid": [int(v) for v in inputs["images_spatial_crop"][0].tolist()],
                "image_tokens": int((inputs["input_ids"][0] == v1.IMAGE_TOKEN_ID).sum()),
                "views": view_hashes(inputs["views"]),
            }
    v1.write_json(preprocess, out / "preprocess.json")
    write_manifest(out)


def write_checkpoint(cfg: dict, out: pathlib.Path) -> None:
    v1.write_checkpoint_files(cfg, out, link_tokenizer=True)


def write_manifest(out: pathlib.Path) -> None:
    v1.write_manifest(out, skip=())


def check(modeling, deepencoder) -> int:
    return v1.compare_regenerated(lambda tmp: generate_fixtures(modeling, deepencoder, tmp, log=lambda s: print(s, flush=True)), OUT)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ref-code", type=pathlib.Path, required=True, help="folder with the official v2 remote code")
    parser.add_argument("--out", type=pathlib.Path, default=OUT)
    parser.add_argument("--check", action="store_true", help="regenerate and compare with the committed fixtures")
    args = parser.parse_args()
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    modeling, deepencoder = load_reference(args.ref_code)
    if args.check:
        return check(modeling, deepencoder)
    generate_fixtures(modeling, deepencoder, args.out, log=lambda s: print(s, flush=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
