"""A one-off probe (kept for the demo-learning work, docs/demo.md "generation ignores the colour word"): does the
prompt's colour / shape word reach the image stream when the demo's model draws?

    python docs/probes/prompt_routing.py --model runs/demo/instruct/model --tokenizer runs/demo/tokenizer/model

N single-object prompts "a photo of a <colour> <shape>", each with a scene drawn as it says, fed teacher-forced.
(a) A probe of the backbone state that predicts the object's cell (the last state before its codes), for the
prompt's colour and shape: what the model carries from the prompt to where it draws. (b) The image NLL of the scene
against the same scene recoloured to every other colour (reshaped to every other shape): how often the prompt's
colour (shape) is the most likely, and its mean rank. (c) Where the object's colour (shape) comes from
(:func:`object_conditioning`): its codes' NLL with the prompt's word swapped, and with the codes before it swapped.
"""
from __future__ import annotations

import argparse
import dataclasses
import json

import numpy as np
import torch
import torch.nn.functional as F

from demo.probe import cell_index, fit_probe
from eval.shapes.evaluate import encode_scenes
from shapes import world as W


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
    ap.add_argument("--prompts", type=int, default=600)
    ap.add_argument("--out", default=None, help="write the result as JSON")
    args = ap.parse_args()
    model, processor = load_mllm(args.model, "cpu")
    unitok = load_unitok(args.tokenizer, model, model.device)
    routing = prompt_routing(model, processor, unitok, args.prompts)
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
            json.dump(routing, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
