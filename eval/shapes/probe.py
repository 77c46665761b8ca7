"""Linear probes per image position: what the codes, and the MLLM's code embedder, tell about the object there;
and, for text-to-image, whether the prompt's words reach the image stream.

``python -m eval.shapes.probe --model DIR --tokenizer PATH [--train 1000 --test 400] [--prompts 600]``

World scenes put each object centred in one cell of a 4x4 grid, and the 64-px tokenizer has 4x4 positions, so
position j holds at most one object. For every position the probe reads (a) the tokenizer's code vectors
(``K·code_dim``, the codebook rows), (b) the code embedder's output (what the backbone receives). It fits a
multinomial logistic regression on training scenes and scores held-out test scenes for: occupancy; the colour,
shape and size of the occupant; and the position's own cell index from an occupied position's vector (chance
= 1/16 weighted by cell frequency), which says whether the embedding carries its 2-D position.

``--prompts N`` (:func:`prompt_routing`): N single-object prompts "a photo of a <colour> <shape>", each with a scene
drawn as it says, fed teacher-forced. (a) A probe of the backbone state that predicts the object's cell (the last
state before its codes), for the prompt's colour and shape: what the model carries from the prompt to where it
draws. (b) The image NLL of the scene against the same scene recoloured to every other colour (reshaped to every
other shape): how often the prompt's colour (shape) is the most likely, and its mean rank. (c) Where the object's
colour (shape) comes from (:func:`object_conditioning`): its codes' NLL with the prompt's word swapped, and with the
codes before it swapped.
"""
from __future__ import annotations

import argparse
import dataclasses
import json

import numpy as np
import torch
import torch.nn.functional as F

from . import world as W
from .evaluate import encode_scenes


def cell_index(o: W.Obj, grid: int = 4, cell: int = 16) -> int:
    """The image position (raster order) of an object centred in a grid cell."""
    return (o.y // cell) * grid + o.x // cell


def position_targets(scenes: list[W.Scene], grid: int = 4, cell: int = 16) -> dict[str, np.ndarray]:
    """Per (scene, position): occupied (0/1), and colour/shape/size indices (-1 where empty), cell index."""
    n = len(scenes) * grid * grid
    t = {k: np.full(n, -1) for k in ("color", "shape", "size")}
    t["occupied"] = np.zeros(n, dtype=int)
    t["cell"] = np.tile(np.arange(grid * grid), len(scenes))
    for i, s in enumerate(scenes):
        for o in s.objects:
            j = i * grid * grid + cell_index(o, grid, cell)
            t["occupied"][j] = 1
            t["color"][j] = W.COLOR_NAMES.index(o.color)
            t["shape"][j] = W.SHAPES.index(o.shape)
            t["size"][j] = list(W.SIZES).index(o.size)
    return t


def fit_probe(x_train: torch.Tensor, y_train: torch.Tensor, x_test: torch.Tensor, y_test: torch.Tensor,
              steps: int = 300) -> float:
    """Held-out accuracy of a standardised linear softmax classifier (full-batch L-BFGS, small L2)."""
    mu, sd = x_train.mean(0), x_train.std(0).clamp_min(1e-6)
    a, b = (x_train - mu) / sd, (x_test - mu) / sd
    classes = int(max(y_train.max(), y_test.max())) + 1
    w = torch.zeros(a.shape[1], classes, requires_grad=True)
    bias = torch.zeros(classes, requires_grad=True)
    opt = torch.optim.LBFGS([w, bias], max_iter=steps, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(a @ w + bias, y_train) + 1e-4 * w.pow(2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    with torch.no_grad():
        return float(((b @ w + bias).argmax(1) == y_test).float().mean())


@torch.no_grad()
def features(model, unitok, scenes: list[W.Scene]) -> dict[str, torch.Tensor]:
    codes = encode_scenes(unitok, scenes).to(model.device)
    emb = model.code_embedder
    flat = lambda x: x.reshape(-1, x.shape[-1]).float().cpu()  # noqa: E731
    return {"codes": flat(emb.lookup(codes)), "code embedder": flat(emb(codes))}


def probe(model, unitok, n_train: int = 1000, n_test: int = 400, seed: int = 0) -> dict[str, dict[str, float]]:
    train, test = W.generate_split("train", n_train, seed=seed), W.generate_split("test", n_test, seed=seed + 1)
    ft, fs = features(model, unitok, train), features(model, unitok, test)
    tt, ts = position_targets(train), position_targets(test)
    out: dict[str, dict[str, float]] = {}
    for name in ft:
        row = {}
        for target in ("occupied", "color", "shape", "size", "cell"):
            keep_t = tt["occupied"] == 1 if target != "occupied" else np.ones_like(tt["occupied"], bool)
            keep_s = ts["occupied"] == 1 if target != "occupied" else np.ones_like(ts["occupied"], bool)
            row[target] = fit_probe(ft[name][keep_t], torch.from_numpy(tt[target][keep_t]),
                                    fs[name][keep_s], torch.from_numpy(ts[target][keep_s]))
        out[name] = row
    cells = ts["cell"][ts["occupied"] == 1]
    out["chance"] = {"occupied": float(max(ts["occupied"].mean(), 1 - ts["occupied"].mean())),
                     "cell": float(np.bincount(cells).max() / len(cells))}
    return out


@torch.no_grad()
def prompt_routing(model, processor, unitok, n: int = 600, n_ranked: int = 60, seed: int = 0) -> dict[str, dict]:
    rng = np.random.default_rng(seed)
    items = []
    for _ in range(n):
        shape, colour = W.SHAPES[rng.integers(len(W.SHAPES))], W.COLOR_NAMES[rng.integers(len(W.COLOR_NAMES))]
        meta = W.color_prompt(shape, colour)
        items.append((meta["prompt"], W.scene_for_prompt(meta, rng)))
    if len({len(processor.text_to_image(q)) for q, _ in items}) != 1:
        raise ValueError("the probe batches its prompts unpadded: every colour and shape word must be one token")
    codes = encode_scenes(unitok, [sc for _, sc in items]).to(model.device)
    boi = model.config.boi_token_id

    states, colour, shape = [], [], []  # states: [layer input 0, layer outputs ..., the final normed state]
    for i in range(0, n, 64):
        chunk = items[i:i + 64]
        ids = torch.tensor([processor.text_to_image(q).input_ids for q, _ in chunk], device=model.device)
        hidden = model.model(inputs_embeds=model.embed_inputs(ids, codes[i:i + 64]),
                             output_hidden_states=True).hidden_states
        for j, (_, sc) in enumerate(chunk):
            o = sc.objects[0]
            at = int((ids[j] == boi).nonzero()[0, 0]) + cell_index(o)  # the state before its codes
            states.append(torch.stack([h[j, at] for h in hidden]).float().cpu())
            colour.append(W.COLOR_NAMES.index(o.color))
            shape.append(W.SHAPES.index(o.shape))
    x, cut = torch.stack(states), n * 3 // 4
    result = {"probe": {}, "probe_by_layer": {}, "likelihood": {}}
    for name, y in (("color", torch.tensor(colour)), ("shape", torch.tensor(shape))):
        by_layer = [fit_probe(x[:cut, k], y[:cut], x[cut:, k], y[cut:]) for k in range(x.shape[1])]
        result["probe"][name], result["probe_by_layer"][name] = by_layer[-1], by_layer
    for attr, values in (("color", W.COLOR_NAMES), ("shape", W.SHAPES)):
        ranks = []
        for prompt, sc in items[:n_ranked]:
            o = sc.objects[0]
            variants = [dataclasses.replace(sc, objects=(dataclasses.replace(o, **{attr: v}),)) for v in values]
            e = processor.text_to_image(prompt)
            ids, labels = (torch.tensor([t], device=model.device) for t in (e.input_ids, e.labels))
            nll = np.array([float(model(input_ids=ids, image_codes=c[None], labels=labels).image_ce)
                            for c in encode_scenes(unitok, variants).to(model.device)])
            ranks.append(int((nll < nll[values.index(getattr(o, attr))]).sum()))
        result["likelihood"][attr] = {"best": float(np.mean([r == 0 for r in ranks])),
                                      "mean_rank": float(np.mean(ranks)), "chance_rank": (len(values) - 1) / 2}
    result["object_nll"] = {attr: object_conditioning(model, processor, unitok, items[:n_ranked], attr, values)
                            for attr, values in (("color", W.COLOR_NAMES), ("shape", W.SHAPES))}
    return result


def object_nll(model, processor, prompt: str, codes: torch.Tensor, position: int) -> float:
    """Teacher-forced NLL (nats, summed over the K sub-codes) of image ``codes`` ``[K, N]``'s codes at ``position``
    after ``prompt``: what the model, given the prompt and the codes before it, assigns to what is drawn there."""
    e = processor.text_to_image(prompt)
    ids, labels = (torch.tensor([t], device=model.device) for t in (e.input_ids, e.labels))
    with torch.no_grad():
        logits = model(input_ids=ids, image_codes=codes[None].to(model.device), labels=labels).image_logits
    logp = F.log_softmax(logits[position].float(), -1)  # [K, codebook]: the targets of the image's positions in order
    return -float(logp.gather(1, codes[:, position, None].long().to(logp.device)).sum())


def object_conditioning(model, processor, unitok, items: list[tuple[str, W.Scene]], attr: str,
                        values: tuple[str, ...]) -> dict[str, float]:
    """Where the object's ``attr`` comes from when the model draws it. For single-object prompts (object not at
    position 0), the object's NLL (:func:`object_nll`) as the prompt says (``matched``); with the prompt's ``attr``
    word swapped for another value (``prompt_swapped``: a model that reads the word pays for it); and with the codes
    of the positions before the object taken from the scene with the other value (``context_swapped``: the
    tokenizer's encoder is global, so the empty cells' codes also carry the object's look, a cue a teacher-forced
    model can read instead of the prompt). Means over the items."""
    rows = []
    for prompt, scene in items:
        o = scene.objects[0]
        j = cell_index(o)
        if j == 0:
            continue
        other = values[(values.index(getattr(o, attr)) + 1) % len(values)]
        swapped = dataclasses.replace(o, **{attr: other})
        codes, codes_other = encode_scenes(unitok, [scene, dataclasses.replace(scene, objects=(swapped,))])
        mixed = codes_other.clone()
        mixed[:, j:] = codes[:, j:]  # the object and what follows as drawn, the positions before it as for `other`
        rows.append((object_nll(model, processor, prompt, codes, j),
                     object_nll(model, processor, W.color_prompt(swapped.shape, swapped.color)["prompt"], codes, j),
                     object_nll(model, processor, prompt, mixed, j)))
    matched, prompt_swapped, context_swapped = np.mean(rows, 0) if rows else (float("nan"),) * 3
    return {"matched": float(matched), "prompt_swapped": float(prompt_swapped),
            "context_swapped": float(context_swapped), "n": len(rows)}


def main() -> int:
    from mllm.cli import load_mllm, load_unitok

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--tokenizer", required=True)
    ap.add_argument("--train", type=int, default=1000)
    ap.add_argument("--test", type=int, default=400)
    ap.add_argument("--out", default=None, help="write the table as JSON")
    ap.add_argument("--prompts", type=int, default=0,
                    help="also probe text-to-image routing on this many colour prompts (see the docstring)")
    args = ap.parse_args()
    model, processor = load_mllm(args.model, "cpu")
    unitok = load_unitok(args.tokenizer, model, model.device)
    result = probe(model, unitok, args.train, args.test)
    print(f"{'probe accuracy (%)':<18}" + "".join(f"{t:>10}" for t in ("occupied", "color", "shape", "size", "cell")))
    for name, row in result.items():
        print(f"{name:<18}" + "".join(f"{100 * row[t]:10.1f}" if t in row else f"{'':>10}"
                                      for t in ("occupied", "color", "shape", "size", "cell")))
    if args.prompts:
        routing = prompt_routing(model, processor, unitok, args.prompts)
        result["prompt_routing"] = routing
        print(f"\ntext-to-image, {args.prompts} prompts 'a photo of a <colour> <shape>' (teacher-forced):")
        for attr in ("color", "shape"):
            lk = routing["likelihood"][attr]
            print(f"  {attr:<6} probe of the state before the object's codes {100 * routing['probe'][attr]:5.1f} %;  "
                  f"the prompt's {attr} is the most likely in {100 * lk['best']:5.1f} % of prompts, mean rank "
                  f"{lk['mean_rank']:.2f} (chance {lk['chance_rank']:.1f})")
            print(f"  {'':<6} probe at that position by depth (the input, then after each layer; the last is the "
                  "normed output): " + ", ".join(f"{100 * v:.0f}" for v in routing["probe_by_layer"][attr]))
            c = routing["object_nll"][attr]
            print(f"  {'':<6} NLL of the object's codes ({c['n']} prompts, nats over its sub-codes): as prompted "
                  f"{c['matched']:.2f}, the prompt's {attr} word swapped {c['prompt_swapped']:.2f}, the codes "
                  f"before it as for the swapped {attr} {c['context_swapped']:.2f}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
