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
import multiprocessing
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
GRID = 8  # Tiny mode: 512 px / 16 (SAM patches) / 4 (compressor) cells a side
# The image embeddings are GRID rows of GRID cells and a newline, then the view separator.
CELL_POSITIONS = [r * (GRID + 1) + c for r in range(GRID) for c in range(GRID)]
CHAR_CLASSES = [""] + [chr(c) for c in range(33, 127)]  # class 0: no character in that slot
SLOTS = 6  # characters read per cell, in reading order (a cell can hold parts of two lines)
PATCHES = 32  # SAM's grid in Tiny mode: 512 px / 16
HALF = 16  # net_2's grid
HALF_SLOTS = 3
SPEC = dict(
    # The neck, the compressor and CLIP wider than the rest: the two strided convolutions are linear
    # (as in the original), so the neck's features must keep each patch's character apart when they
    # are summed, and a cell's vector must have room for the characters of its 16 patches.
    sam=dict(width=64, layers=3, heads=2, global_attn_indexes=[2], downsample_channels=[192, 256]),
    clip=dict(width=256, layers=3, heads=4),
    overrides=dict(sam_out_chans=128, sam_mlp_ratio=2.0, clip_ffn_hidden_size=512),
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


class Normalised(torch.nn.Module):
    """Zero mean, unit variance over the features of each position (dim 1 of a map, -1 of vectors):
    the heads read features whose scale the model is free to choose (the image embeddings' norm grows
    to hundreds while the tokens' stays near 1)."""

    def __init__(self, dim: int):
        super().__init__()
        self.dim = dim

    def forward(self, x):
        return F.layer_norm(x.movedim(self.dim, -1), (x.shape[self.dim],)).movedim(-1, self.dim)


def mlp_head(cin: int, hidden: int, cout: int, conv: bool) -> torch.nn.Sequential:
    """normalise → cin → hidden → GELU → cout, per position (1×1 convolutions) or per vector."""
    layer = (lambda a, b: torch.nn.Conv2d(a, b, 1)) if conv else torch.nn.Linear
    head = torch.nn.Sequential(Normalised(1 if conv else -1), layer(cin, hidden), torch.nn.GELU(), layer(hidden, cout))
    # Explicitly: modules built after the official classes' loading are not initialised.
    with torch.no_grad():
        for lin, fan_in in ((head[1], cin), (head[3], hidden)):
            lin.weight.normal_(0.0, fan_in ** -0.5)
            lin.bias.zero_()
    return head


class Reader:
    """The training forward around the official modules.

    The vocabulary rows the synthetic text uses are trained as two compact tables (`embed`, `head`) and
    written back into `embed_tokens`/`lm_head` before saving: the same function as training the full
    matrices whose other rows are zero, without the optimiser touching 41 M parameters that stay zero.

    Training-only signals make the encoder and the decoder's attention useful before the decoder can
    learn the text's statistics alone (runs 1–4 collapsed the other way round): `glyphs`, `halves` and
    `chars` read the page's characters from the encoder at three depths (SAM's neck, net_2, the image
    embeddings; heads dropped when saving); `guide` asks chosen decoder heads to attend, when predicting
    a token, to the cells where that token's characters are drawn."""

    def __init__(self, model, used: list[int], prompt_ids: list[int], guided_heads=()):
        self.model = model
        self.m = model.model
        self.used = torch.tensor(used)
        self.remap = torch.full((ref.VOCAB,), -1, dtype=torch.long)
        self.remap[self.used] = torch.arange(len(used))
        self.prompt = torch.tensor(prompt_ids)
        self.image_mask = self.prompt == ref.IMAGE_TOKEN_ID
        self.unused_logit = math.log(ref.VOCAB - len(used))
        self.decoder_forward = type(self.m).__mro__[1].forward  # DeepseekV2Model.forward
        self.embed = torch.nn.Parameter(self.m.embed_tokens.weight.detach()[self.used].clone())
        self.head = torch.nn.Parameter(model.lm_head.weight.detach()[self.used].clone())
        self.m.embed_tokens.weight.requires_grad_(False)
        model.lm_head.weight.requires_grad_(False)
        n = self.embed.shape[1]
        self.guided_heads = list(guided_heads)
        # Training-only heads (small MLPs: the features need not be linearly readable, only readable by
        # what follows): a cell's characters from its image embedding; per SAM patch (16 px) the
        # character centred in it, from the neck's output; per net_2 position (32 px) its characters.
        classes = len(CHAR_CLASSES)
        self.chars = mlp_head(n, 512, SLOTS * classes, conv=False)
        self.glyphs = mlp_head(self.m.sam_model.neck[0].out_channels, 256, classes, conv=True)
        self.halves = mlp_head(self.m.sam_model.net_2.out_channels, 256, HALF_SLOTS * classes, conv=True)
        self.neck_out = self.net2_out = None
        self.m.sam_model.neck.register_forward_hook(lambda _m, _i, out: setattr(self, "neck_out", out))
        self.m.sam_model.net_2.register_forward_hook(lambda _m, _i, out: setattr(self, "net2_out", out))

    @torch.no_grad()
    def write_back(self) -> None:
        self.m.embed_tokens.weight[self.used] = self.embed
        self.model.lm_head.weight[self.used] = self.head

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

    def forward(self, px: torch.Tensor, targets: torch.Tensor, img: torch.Tensor | None = None,
                attentions: bool = False):
        """Restricted logits (B, T, used + 1) for every position after the prompt, the image embeddings
        and (`attentions`) the guided heads' attention rows over the image positions (B, heads, T, 73);
        `targets` (B, T) are the already generated ids (teacher forcing), right-padded with EOS."""
        b = px.shape[0]
        ids = torch.cat([self.prompt[None].expand(b, -1), targets], dim=1)
        emb = F.embedding(self.remap[ids], self.embed)
        img = self.image_embeds(px) if img is None else img
        p = self.prompt.shape[0]
        n_img = img.shape[1]
        emb = torch.cat([emb[:, :1], img.to(emb.dtype), emb[:, 1 + n_img:]], dim=1)
        assert self.image_mask[1 : 1 + n_img].all() and self.image_mask.sum() == n_img
        out = self.decoder_forward(self.m, input_ids=None, inputs_embeds=emb, use_cache=False,
                                   output_attentions=attentions and bool(self.guided_heads), return_dict=True)
        hidden = out.last_hidden_state[:, p - 1 :]
        logits = hidden @ self.head.T
        extra = torch.full(logits.shape[:-1] + (1,), self.unused_logit, dtype=logits.dtype)
        logits = torch.cat([logits, extra], dim=-1)
        rows = None
        if attentions and self.guided_heads:
            rows = torch.stack([out.attentions[layer][:, head, p - 1 :, 1 : 1 + n_img]
                                for layer, head in self.guided_heads], dim=1)
        return logits, img, rows

    def logits(self, px, targets, img=None):
        return self.forward(px, targets, img)[0]

    def loss(self, px, targets, lengths, layout=None):
        """Cross-entropy and token accuracy; with `layout` (the batch's `layout_targets`) also the
        training-only losses (`halves`, `glyphs`, `chars`, `guide`) and their accuracies."""
        # Inputs are the targets shifted right; the last input is never needed.
        logits, img, rows = self.forward(px, targets[:, :-1], attentions=layout is not None)
        logits = logits.float()
        labels = self.remap[targets]
        t = targets.shape[1]
        mask = torch.arange(t)[None] < lengths[:, None]
        ce = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), reduction="none")
        ce = ce.view(targets.shape)
        acc = ((logits.argmax(-1) == labels) & mask).sum() / mask.sum()
        out = dict(loss=(ce * mask).sum() / mask.sum(), acc=acc)
        if layout is None:
            return out
        slots, guide, patches, halves = layout
        half = self.halves(self.net2_out.float())  # (B, HALF_SLOTS * classes, 16, 16)
        half = half.view(half.shape[0], HALF_SLOTS, len(CHAR_CLASSES), HALF * HALF).permute(0, 3, 1, 2)
        out["halves"], out["halves_acc"] = slot_loss(half, halves)
        # Patches: the mean over patches with a character plus the mean over empty ones.
        glyph = self.glyphs(self.neck_out.float())  # (B, classes, 32, 32)
        ce = F.cross_entropy(glyph, patches, reduction="none")
        has = patches > 0
        out["glyphs"] = ce[has].mean() + ce[~has].mean()
        out["glyphs_acc"] = (glyph.argmax(1) == patches)[has].float().mean()
        cells = img[:, CELL_POSITIONS].float()  # (B, 64, n)
        pred = self.chars(cells).view(cells.shape[0], 64, SLOTS, len(CHAR_CLASSES))
        out["chars"], out["chars_acc"] = slot_loss(pred, slots)
        if rows is not None:
            g = guide[:, None].float()  # (B, 1, T, 73)
            mass = (rows.float() * g).sum(-1)  # (B, heads, T)
            has = guide.any(-1)[:, None].expand_as(mass)
            out["guide"] = -(mass[has] + 1e-6).log().mean()
            out["guide_mass"] = mass[has].mean()
        return out

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


def slot_loss(pred: torch.Tensor, slots: torch.Tensor):
    """Cross-entropy of slot predictions (B, cells, slots, classes) over each cell's drawn slots and
    the one after them (its end: the empty slots would otherwise outweigh the characters tenfold),
    and the accuracy on drawn slots."""
    drawn = slots > 0
    counted = torch.arange(slots.shape[-1])[None, None] <= drawn.sum(-1, keepdim=True)
    ce = F.cross_entropy(pred.reshape(-1, pred.shape[-1]), slots.reshape(-1), reduction="none")
    loss = (ce * counted.reshape(-1)).sum() / counted.sum()
    return loss, ((pred.argmax(-1) == slots) & drawn).sum() / drawn.sum().clamp(min=1)


def cer(pred: str, truth: str) -> float:
    """Levenshtein distance / len(truth)."""
    prev = list(range(len(truth) + 1))
    for i, a in enumerate(pred, 1):
        cur = [i]
        for j, c in enumerate(truth, 1):
            cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (a != c)))
        prev = cur
    return prev[-1] / max(1, len(truth))


def cell(x: float, y: float, grid: int) -> int:
    """Row-major index of the cell of a grid × grid partition of the page that holds the point (x, y)
    (fractions of the page's width and height)."""
    return min(grid - 1, max(0, int(y * grid))) * grid + min(grid - 1, max(0, int(x * grid)))


def grid_slots(text: str, centres, grid: int, slots: int) -> torch.Tensor:
    """(grid², slots): the characters whose centres lie in each cell of a grid over the page, in
    reading order (class 0 where none)."""
    per_cell: dict[int, list[int]] = {}
    for i, x, y in centres:
        per_cell.setdefault(cell(x, y, grid), []).append(i)
    out = torch.zeros(grid * grid, slots, dtype=torch.long)
    for index, chars in per_cell.items():
        for k, i in enumerate(sorted(chars)[:slots]):
            out[index, k] = CHAR_CLASSES.index(text[i])
    return out


def layout_targets(text: str, centres, offsets, length: int) -> tuple[torch.Tensor, ...]:
    """The character slots (64, SLOTS) of a page: each cell's characters in reading order (class 0
    where none); the guidance mask (length, 73): for each target token, the image positions of the
    cells its characters' centres fall in (none for spaces, newlines and the EOS); and the patches
    (32, 32): the character centred in each of SAM's 16-px patches (class 0 where none); and the
    slots of net_2's 16 × 16 grid (256, HALF_SLOTS)."""
    cell_of = {i: cell(x, y, GRID) for i, x, y in centres}
    slots = grid_slots(text, centres, GRID, SLOTS)
    guide = torch.zeros(length, GRID * (GRID + 1) + 1, dtype=torch.bool)
    for t, (start, end) in enumerate(offsets):
        for i in range(start, end):
            if i in cell_of:
                guide[t, CELL_POSITIONS[cell_of[i]]] = True
    patches = torch.zeros(PATCHES * PATCHES, dtype=torch.long)
    for i, x, y in centres:
        patches[cell(x, y, PATCHES)] = CHAR_CLASSES.index(text[i])
    return slots, guide, patches.view(PATCHES, PATCHES), grid_slots(text, centres, HALF, HALF_SLOTS)


def batch(seeds, tokenizer, vocab_ok, easy=()):
    """Pixels (B, 3, 512, 512), targets right-padded with EOS, their lengths and the ground truths of
    the pages rendered from `seeds` (`easy`: indices drawn from the warm-up curriculum); a page whose
    text has an id outside the vocabulary is left out; and the pages' `layout_targets`, stacked."""
    pxs, toks, texts, lays = [], [], [], []
    for k, s in enumerate(seeds):
        img, text, centres = synthdoc.page_with_layout(s, easy=k in easy)
        enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        ids = enc["input_ids"] + [EOS]
        if not all(vocab_ok[i] for i in ids):
            continue
        pxs.append(pixels(img))
        toks.append(ids)
        texts.append(text)
        lays.append((centres, enc["offset_mapping"]))
    t = max(len(x) for x in toks)
    targets = torch.tensor([x + [EOS] * (t - len(x)) for x in toks])
    out = (torch.stack(pxs), targets, torch.tensor([len(x) for x in toks]), texts)
    parts = [layout_targets(text, c, o, t) for text, (c, o) in zip(texts, lays)]
    return out + (tuple(torch.stack(column) for column in zip(*parts)),)


_WORKER: dict = {}


def _worker_init(tokenizer, vocab_ok) -> None:
    torch.set_num_threads(1)
    _WORKER.update(tokenizer=tokenizer, vocab_ok=vocab_ok)


def _worker_batch(seeds, easy):
    return batch(seeds, _WORKER["tokenizer"], _WORKER["vocab_ok"], easy)


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


def load_weights(model, ckpt: pathlib.Path, partial: bool = False) -> list[str]:
    """Fills `model` with a checkpoint's `model.safetensors` (every tensor, by original name), in float32.
    `partial`: only the tensors whose name and shape match (a warm start across sizes); returns the
    names of the parameters left as they were."""
    params = dict(model.named_parameters())
    kept = []
    with safe_open(str(ckpt / "model.safetensors"), framework="pt") as f, torch.no_grad():
        if not partial:
            assert set(f.keys()) == set(params), set(f.keys()) ^ set(params)
        for name, param in params.items():
            if name in f.keys() and tuple(f.get_slice(name).get_shape()) == tuple(param.shape):
                param.copy_(f.get_tensor(name).float())
            else:
                kept.append(name)
    return kept


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
    ap.add_argument("--warmup", type=int, default=100, help="learning-rate warm-up steps")
    ap.add_argument("--chars-weight", type=float, default=1.0, help="weight of the cells' character loss")
    ap.add_argument("--guide-weight", type=float, default=1.0, help="weight of the attention guidance")
    ap.add_argument("--glyphs-weight", type=float, default=1.0, help="weight of the characters read from SAM's neck and from net_2")
    ap.add_argument("--easy-until", type=float, default=0.4,
                    help="fraction of the budget over which the warm-up pages fall from all of a batch to a tenth")
    ap.add_argument("--guide-heads", default="2:0,2:1,3:0,3:1",
                    help="guided decoder heads, layer:head,… (runs 5–12: 2:0,3:0)")
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
        fresh = load_weights(model, args.init, partial=True)
        print(f"weights from {args.init}; {len(fresh)} tensors of other shapes left as initialised: {fresh}", flush=True)
    params = sum(p.numel() for p in model.parameters())
    print(f"params {params:,}; used vocab {len(used)}; prompt {len(prompt_ids)} ids", flush=True)
    heads = [tuple(int(v) for v in h.split(":")) for h in args.guide_heads.split(",") if h]
    reader = Reader(model, used, prompt_ids, heads)
    reader.bf16 = args.bf16
    model.train()
    # Position tables (SAM's absolute and relative ones start at zero; CLIP's) on their own learning rate
    # scale: Adam moves them at the full rate whatever the page, which can drown the page's content.
    is_pos = lambda n: "pos_embed" in n or "rel_pos" in n or "position_embedding" in n
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    named += [("reader.embed", reader.embed), ("reader.head", reader.head)]
    for head in ("chars", "glyphs", "halves"):
        named += [(f"reader.{head}.{n}", p) for n, p in getattr(reader, head).named_parameters()]
    decay = [p for n, p in named if not is_pos(n) and p.ndim >= 2 and "embed" not in n]
    other = [p for n, p in named if not is_pos(n) and not (p.ndim >= 2 and "embed" not in n)]
    pos = [p for n, p in named if is_pos(n)]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.05, "scale": 1.0},
                             {"params": other, "weight_decay": 0.0, "scale": 1.0},
                             {"params": pos, "weight_decay": 0.0, "scale": args.pos_lr_scale}],
                            lr=args.lr, betas=(0.9, 0.98))
    trained = [p for g in opt.param_groups for p in g["params"]]
    held = [synthdoc.HELDOUT_BASE + i for i in range(16)]
    held_px, held_t, held_len, held_text, held_lay = batch(held, tokenizer, vocab_ok)
    budget = args.minutes * 60
    start = time.time()
    warmup = args.warmup
    step = 0
    curve = []
    rng = random.Random(args.seed)
    times = [0.0] * 4
    # Pages are rendered in a second process, one batch ahead (a third of a step's time otherwise).
    pool = multiprocessing.get_context("fork").Pool(1, _worker_init, (tokenizer, vocab_ok))

    def plan(frac: float):
        seeds = [rng.randrange(synthdoc.HELDOUT_BASE) for _ in range(args.batch)]
        # Curriculum: warm-up pages (short random words and numbers in a large font, which only the
        # image can tell) from all of the batch down to a tenth over the first 40 % of the budget
        # (--easy-until; 0 for a warm start: a tenth throughout).
        easy_share = max(0.1, 1.0 - frac / args.easy_until) if args.easy_until > 0 else 0.1
        easy = {k for k in range(args.batch) if rng.random() < easy_share}
        return pool.apply_async(_worker_batch, (seeds, easy))

    pending = plan(0.0)

    def weighted(parts):
        return (parts["loss"] + args.chars_weight * parts["chars"] + args.guide_weight * parts.get("guide", 0.0)
                + args.glyphs_weight * (parts["glyphs"] + parts["halves"]))

    def save():
        reader.write_back()
        save_weights(model, args.out)
        (args.out / "training_curve.json").write_text(json.dumps(curve, indent=1) + "\n")

    while True:
        elapsed = time.time() - start
        if (args.steps and step >= args.steps) or (not args.steps and elapsed > budget):
            break
        frac = min(1.0, elapsed / budget) if not args.steps else step / args.steps
        lr = args.lr * min(1.0, (step + 1) / warmup) * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * frac)))
        for g in opt.param_groups:
            g["lr"] = lr * g["scale"]
        t0 = time.time()
        px, targets, lengths, _, lay = pending.get()
        pending = plan(frac)
        t1 = time.time()
        parts = reader.loss(px, targets, lengths, lay)
        t2 = time.time()
        opt.zero_grad(set_to_none=True)
        weighted(parts).backward()
        t3 = time.time()
        torch.nn.utils.clip_grad_norm_(trained, 1.0)
        opt.step()
        times = [a + b for a, b in zip(times, (t1 - t0, t2 - t1, t3 - t2, time.time() - t3))]
        step += 1
        if step % 20 == 0 or step <= 3:
            shown = " ".join(f"{k} {v.item():.3f}" for k, v in parts.items())
            print(f"step {step} {elapsed/60:.1f} min lr {lr:.2e} {shown}", flush=True)
            print("  seconds per step: data {:.2f} forward {:.2f} backward {:.2f} update {:.2f}".format(
                *(v / 20 for v in times)), flush=True)
            times = [0.0] * 4
        if step % args.eval_every == 0:
            model.eval()
            with torch.no_grad():
                hp = reader.loss(held_px, held_t, held_len, held_lay)
                preds = reader.greedy(held_px[:8], 96)
                img = reader.image_embeds(held_px[:8])
            c = sum(cer(tokenizer.decode(p), t) for p, t in zip(preds, held_text[:8])) / 8
            # How much of the image embeddings depends on the page (0.22 two steps after initialisation).
            page_share = (img.std(0).mean() / img.std()).item()
            model.train()
            curve.append(dict(step=step, minutes=round(elapsed / 60, 1), train_loss=round(parts["loss"].item(), 4),
                              heldout_loss=round(hp["loss"].item(), 4), heldout_token_acc=round(hp["acc"].item(), 4),
                              heldout_chars_acc=round(hp["chars_acc"].item(), 4),
                              heldout_glyphs_acc=round(hp["glyphs_acc"].item(), 4),
                              heldout_halves_acc=round(hp["halves_acc"].item(), 4),
                              heldout_guide_mass=round(hp.get("guide_mass", torch.tensor(0.0)).item(), 4),
                              heldout_cer=round(c, 4), image_page_share=round(page_share, 4)))
            print("EVAL", json.dumps(curve[-1]), repr(tokenizer.decode(preds[0])), flush=True)
            save()
    save()
    pool.terminate()
    print(f"done: {step} steps in {(time.time() - start) / 60:.1f} min", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
