#!/usr/bin/env python3
"""Trains dsocr's small reader: DeepSeek-OCR's architecture, shrunk, trained on synthetic pages.

The model is the official code's own classes (`DeepseekOCRForCausalLM`, SAM `ImageEncoderViT`, CLIP
`VitModel`, `MlpProjector`), built at the sizes below the way tests/reference/generate.py builds its tiny
checkpoints, and saved the same way: the hub `config.json` with the sizes substituted (plus the
`dsocr_test_overrides` the hub format cannot express), `model.safetensors` in bf16 under the original
tensor names, the real tokenizer. dsocr and the official code both load it.

Training input is exactly what the official `infer` builds for `<image>\\nFree OCR.` in Tiny mode
(base_size = image_size = 512, crop_mode False): the page stretched to 512×512 by PIL, normalised with
mean = std = 0.5, rounded to bf16; the prompt ids (BOS, 73 image placeholders, the text) are taken from
`infer` itself. The forward is the official `DeepseekOCRModel.forward`'s image path written out with
gradients (the official one runs the encoder under `torch.no_grad()`), batched, followed by the official
decoder (`DeepseekV2Model.forward`) and `lm_head`.

The vocabulary stays the real 129,280 ids. Ids the synthetic text never uses keep all-zero rows in
`embed_tokens` and `lm_head`; their logits are therefore exactly 0 and the loss is the exact full-vocabulary
cross-entropy computed over the used rows plus one logit log(#unused) standing for the rest.

Usage (OMP_NUM_THREADS=2 OMP_WAIT_POLICY=PASSIVE):
  python weights/reader/train.py --ref-code DIR --out OUT [--minutes 80]
"""

from __future__ import annotations

import argparse
import json
import math
import pathlib
import random
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file

HERE = pathlib.Path(__file__).resolve().parent
ROOT = HERE.parents[1]
sys.path.insert(0, str(ROOT / "tests" / "reference"))
sys.path.insert(0, str(HERE))
import generate as ref  # noqa: E402  (the reference generator: official-code loading and building)
import synthdoc  # noqa: E402

PROMPT = "<image>\nFree OCR."
EOS = 1
SPEC = dict(
    sam=dict(width=64, layers=3, heads=2, global_attn_indexes=[2], downsample_channels=[96, 160]),
    clip=dict(width=160, layers=2, heads=4),
    overrides=dict(sam_out_chans=48, sam_mlp_ratio=2.0, clip_ffn_hidden_size=320),
    decoder=dict(
        hidden_size=160,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=4,
        intermediate_size=480,
        moe_intermediate_size=240,
        n_routed_experts=4,
        n_shared_experts=1,
        num_experts_per_tok=2,
        first_k_dense_replace=1,
    ),
)


def pixels(img) -> torch.Tensor:
    """`infer`'s Tiny-mode global view: PIL stretch to 512×512, ToTensor, (x-0.5)/0.5, bf16."""
    view = img.resize((512, 512))
    x = torch.from_numpy(np.asarray(view, dtype=np.uint8).copy()).permute(2, 0, 1).float() / 255.0
    return ((x - 0.5) / 0.5).to(torch.bfloat16).float()


def official_prompt(modeling, model, tokenizer) -> list[int]:
    """The prompt ids exactly as the official `infer` builds them for one page in Tiny mode."""
    img, _ = synthdoc.page(0)
    path = pathlib.Path("/tmp/dsocr_reader_probe.png")
    img.save(path)
    inputs = ref.official_inputs(modeling, model, tokenizer, path, PROMPT, ("tiny", 512, 512, False))
    ids = inputs["input_ids"][0].tolist()
    x = inputs["images_ori"][0].float()
    assert torch.equal(x, pixels(img)), "preprocessing differs from infer's"
    return ids


def used_vocab(tokenizer, prompt_ids: list[int], samples: int) -> list[int]:
    ids = set(prompt_ids) | {EOS}
    for text in synthdoc.vocabulary_texts(7, samples):
        ids.update(tokenizer.encode(text, add_special_tokens=False))
    # Lines are joined by "\n"; make sure every line start after a newline is covered too.
    for text in synthdoc.vocabulary_texts(8, samples // 4):
        ids.update(tokenizer.encode("a\n" + text, add_special_tokens=False))
    return sorted(ids)


class Reader:
    """The training forward around the official modules."""

    def __init__(self, model, used: list[int], prompt_ids: list[int]):
        self.model = model
        self.m = model.model
        self.used = torch.tensor(used)
        self.remap = torch.full((ref.VOCAB,), -1, dtype=torch.long)
        self.remap[self.used] = torch.arange(len(used))
        self.prompt = torch.tensor(prompt_ids)
        self.image_mask = self.prompt == ref.IMAGE_TOKEN_ID
        self.unused_logit = math.log(ref.VOCAB - len(used))
        self.decoder_forward = type(self.m).__mro__[1].forward  # DeepseekV2Model.forward

    bf16 = False

    def image_embeds(self, px: torch.Tensor) -> torch.Tensor:
        # bf16 autocast (AMX) only here: the official MoE's training path cannot take mixed dtypes.
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=self.bf16):
            return self._image_embeds(px).float()

    def _image_embeds(self, px: torch.Tensor) -> torch.Tensor:
        m = self.m
        f1 = m.sam_model(px)
        f2 = m.vision_model(px, f1)
        feats = m.projector(torch.cat((f2[:, 1:], f1.flatten(2).permute(0, 2, 1)), dim=-1))
        b, hw, n = feats.shape
        h = int(hw ** 0.5)
        feats = feats.view(b, h, h, n)
        feats = torch.cat([feats, m.image_newline[None, None, None, :].expand(b, h, 1, n)], dim=2)
        feats = feats.reshape(b, h * (h + 1), n)
        return torch.cat([feats, m.view_seperator[None, None, :].expand(b, 1, n)], dim=1)

    def logits(self, px: torch.Tensor, targets: torch.Tensor, img: torch.Tensor | None = None) -> torch.Tensor:
        """Restricted logits (B, T, used + 1) for every position after the prompt; `targets` (B, T)
        are the already generated ids (teacher forcing), right-padded with EOS."""
        b = px.shape[0]
        ids = torch.cat([self.prompt[None].expand(b, -1), targets], dim=1)
        emb = self.m.embed_tokens(ids)
        img = (self.image_embeds(px) if img is None else img).to(emb.dtype)
        p = self.prompt.shape[0]
        emb = torch.cat([emb[:, :1], img, emb[:, 1 + img.shape[1]:]], dim=1)
        assert self.image_mask[1 : 1 + img.shape[1]].all() and self.image_mask.sum() == img.shape[1]
        out = self.decoder_forward(self.m, input_ids=None, inputs_embeds=emb, use_cache=False, return_dict=True)
        hidden = out.last_hidden_state[:, p - 1 :]
        w = self.model.lm_head.weight[self.used]
        logits = hidden @ w.T
        extra = torch.full(logits.shape[:-1] + (1,), self.unused_logit, dtype=logits.dtype)
        return torch.cat([logits, extra], dim=-1)

    def loss(self, px, targets, lengths):
        # Inputs are the targets shifted right; the last input is never needed.
        logits = self.logits(px, targets[:, :-1]).float()
        labels = self.remap[targets]
        t = targets.shape[1]
        mask = torch.arange(t)[None] < lengths[:, None]
        ce = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), reduction="none")
        ce = ce.view(targets.shape)
        acc = ((logits.argmax(-1) == labels) & mask).sum() / mask.sum()
        return (ce * mask).sum() / mask.sum(), acc

    @torch.no_grad()
    def greedy(self, px: torch.Tensor, max_new: int) -> list[list[int]]:
        """Greedy decoding without a cache (evaluation during training only)."""
        b = px.shape[0]
        img = self.image_embeds(px)
        out = torch.zeros(b, 0, dtype=torch.long)
        done = torch.zeros(b, dtype=torch.bool)
        for _ in range(max_new):
            nxt = self.used[self.logits(px, out, img)[:, -1, :-1].argmax(-1)]
            nxt = torch.where(done, torch.full_like(nxt, EOS), nxt)
            out = torch.cat([out, nxt[:, None]], dim=1)
            done |= nxt == EOS
            if done.all():
                break
        rows = out.tolist()
        return [row[: row.index(EOS)] if EOS in row else row for row in rows]


def cer(pred: str, truth: str) -> float:
    """Levenshtein distance / len(truth)."""
    prev = list(range(len(truth) + 1))
    for i, a in enumerate(pred, 1):
        cur = [i]
        for j, c in enumerate(truth, 1):
            cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (a != c)))
        prev = cur
    return prev[-1] / max(1, len(truth))


def batch(seeds, tokenizer, vocab_ok, easy=()):
    """Pixels (B, 3, 512, 512), targets right-padded with EOS, their lengths and the ground truths of
    the pages rendered from `seeds` (`easy`: indices drawn from the warm-up curriculum); a page whose
    text has an id outside the vocabulary is left out."""
    pxs, toks, texts = [], [], []
    for k, s in enumerate(seeds):
        img, text = synthdoc.page(s, easy=k in easy)
        ids = tokenizer.encode(text, add_special_tokens=False) + [EOS]
        if not all(vocab_ok[i] for i in ids):
            continue
        pxs.append(pixels(img))
        toks.append(ids)
        texts.append(text)
    t = max(len(x) for x in toks)
    targets = torch.tensor([x + [EOS] * (t - len(x)) for x in toks])
    return torch.stack(pxs), targets, torch.tensor([len(x) for x in toks]), texts


def init_weights(model, used: list[int], seed: int) -> None:
    """The newline/separator vectors (left uninitialised by the builder) and the unused vocabulary rows
    (zero); everything else keeps the official classes' own initialisation."""
    torch.manual_seed(seed)
    m = model.model
    with torch.no_grad():
        m.image_newline.normal_(0.0, 0.02)
        m.view_seperator.normal_(0.0, 0.02)
        keep = torch.zeros(ref.VOCAB, dtype=torch.bool)
        keep[used] = True
        m.embed_tokens.weight[~keep] = 0.0
        model.lm_head.weight[~keep] = 0.0


def load_weights(model, ckpt: pathlib.Path) -> None:
    """Fills `model` with a checkpoint's `model.safetensors` (every tensor, by original name), in float32."""
    params = dict(model.named_parameters())
    with safe_open(str(ckpt / "model.safetensors"), framework="pt") as f, torch.no_grad():
        assert set(f.keys()) == set(params), set(f.keys()) ^ set(params)
        for name in f.keys():
            params[name].copy_(f.get_tensor(name).float())


def save_weights(model, out: pathlib.Path) -> None:
    """`model.safetensors` as the hub has it: original names, bf16 (the other files are written once)."""
    save_file(ref.original_state_dict(model), str(out / "model.safetensors"), metadata={"format": "pt"})


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ref-code", type=pathlib.Path, required=True)
    ap.add_argument("--out", type=pathlib.Path, required=True)
    ap.add_argument("--minutes", type=float, default=80.0, help="training time budget")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--seed", type=int, default=20261204)
    ap.add_argument("--eval-every", type=int, default=200)
    ap.add_argument("--no-bf16", dest="bf16", action="store_false", help="no bf16 autocast (AMX) in the encoder")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--pos-lr-scale", type=float, default=1.0, help="learning-rate scale of the position tables")
    ap.add_argument("--init", type=pathlib.Path, help="start from this checkpoint's weights")
    ap.add_argument("--steps", type=int, default=0, help="stop after this many steps (0: by time)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    modeling, deepencoder = ref.load_reference(args.ref_code)
    cfg = ref.tiny_config_json(SPEC)
    args.out.mkdir(parents=True, exist_ok=True)
    ref.write_checkpoint_files(cfg, args.out, link_tokenizer=False)
    tokenizer = ref.load_tokenizer(args.out)
    model = ref.build_model(modeling, deepencoder, cfg, seed=None)
    prompt_ids = official_prompt(modeling, model, tokenizer)
    used = used_vocab(tokenizer, prompt_ids, 200000)
    vocab_ok = torch.zeros(ref.VOCAB, dtype=torch.bool)
    vocab_ok[used] = True
    init_weights(model, used, args.seed)
    if args.init:
        load_weights(model, args.init)
        print(f"weights from {args.init}", flush=True)
    params = sum(p.numel() for p in model.parameters())
    print(f"params {params:,}; used vocab {len(used)}; prompt {len(prompt_ids)} ids", flush=True)
    reader = Reader(model, used, prompt_ids)
    reader.bf16 = args.bf16
    model.train()
    # Position tables (SAM's absolute and relative ones start at zero; CLIP's) on their own learning rate
    # scale: Adam moves them at the full rate whatever the page, which can drown the page's content.
    is_pos = lambda n: "pos_embed" in n or "rel_pos" in n or "position_embedding" in n
    named = [(n, p) for n, p in model.named_parameters() if not is_pos(n)]
    decay = [p for n, p in named if p.ndim >= 2 and "embed" not in n]
    other = [p for n, p in named if not (p.ndim >= 2 and "embed" not in n)]
    pos = [p for n, p in model.named_parameters() if is_pos(n)]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.05, "scale": 1.0},
                             {"params": other, "weight_decay": 0.0, "scale": 1.0},
                             {"params": pos, "weight_decay": 0.0, "scale": args.pos_lr_scale}],
                            lr=args.lr, betas=(0.9, 0.98))
    held = [synthdoc.HELDOUT_BASE + i for i in range(16)]
    held_px, held_t, held_len, held_text = batch(held, tokenizer, vocab_ok)
    budget = args.minutes * 60
    start = time.time()
    warmup = 300 if not args.init else 30
    step = 0
    curve = []
    rng = random.Random(args.seed)
    while True:
        elapsed = time.time() - start
        if (args.steps and step >= args.steps) or (not args.steps and elapsed > budget):
            break
        frac = min(1.0, elapsed / budget) if not args.steps else step / args.steps
        lr = args.lr * min(1.0, (step + 1) / warmup) * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * frac)))
        for g in opt.param_groups:
            g["lr"] = lr * g["scale"]
        seeds = [rng.randrange(synthdoc.HELDOUT_BASE) for _ in range(args.batch)]
        # Curriculum: warm-up pages (short random words and numbers in a large font, which only the
        # image can tell) from all of the batch down to a tenth over the first 40 % of the budget.
        easy_share = max(0.1, 1.0 - frac / 0.4)
        easy = {k for k in range(args.batch) if rng.random() < easy_share}
        px, targets, lengths, _ = batch(seeds, tokenizer, vocab_ok, easy)
        loss, acc = reader.loss(px, targets, lengths)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        # Unused vocabulary rows stay exactly zero (AdamW's decay keeps zeros zero; gradients there are 0).
        step += 1
        if step % 20 == 0 or step <= 3:
            print(f"step {step} {elapsed/60:.1f} min lr {lr:.2e} loss {loss.item():.3f} acc {acc.item():.3f}", flush=True)
        if step % args.eval_every == 0:
            model.eval()
            with torch.no_grad():
                hl, ha = reader.loss(held_px, held_t, held_len)
                preds = reader.greedy(held_px[:8], 96)
                img = reader.image_embeds(held_px[:8])
            c = sum(cer(tokenizer.decode(p), t) for p, t in zip(preds, held_text[:8])) / 8
            # How much of the image embeddings depends on the page (0.22 two steps after initialisation).
            page_share = (img.std(0).mean() / img.std()).item()
            model.train()
            curve.append(dict(step=step, minutes=round(elapsed / 60, 1), train_loss=round(loss.item(), 4),
                              heldout_loss=round(hl.item(), 4), heldout_token_acc=round(ha.item(), 4),
                              heldout_cer=round(c, 4), image_page_share=round(page_share, 4)))
            print("EVAL", json.dumps(curve[-1]), repr(tokenizer.decode(preds[0])), flush=True)
            save_weights(model, args.out)
            (args.out / "training_curve.json").write_text(json.dumps(curve, indent=1) + "\n")
    save_weights(model, args.out)
    (args.out / "training_curve.json").write_text(json.dumps(curve, indent=1) + "\n")
    print(f"done: {step} steps in {(time.time() - start) / 60:.1f} min", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
