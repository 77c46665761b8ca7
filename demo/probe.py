"""Linear probes per image position: what the codes, and the MLLM's code embedder, tell about the object there
(``unitok demo --ablation`` reports them; the text-to-image routing probe is docs/probes/prompt_routing.py).

``python -m demo.probe --model DIR --tokenizer PATH [--train 1000 --test 400]``

World scenes put each object centred in one cell of a 4x4 grid, and the 64-px tokenizer has 4x4 positions, so
position j holds at most one object. For every position the probe reads (a) the tokenizer's code vectors
(``K·code_dim``, the codebook rows), (b) the code embedder's output (what the backbone receives). It fits a
multinomial logistic regression on training scenes and scores held-out test scenes for: occupancy; the colour,
shape and size of the occupant; and the position's own cell index from an occupied position's vector (chance
= 1/16 weighted by cell frequency), which says whether the embedding carries its 2-D position.
"""
from __future__ import annotations

import argparse
import json

import numpy as np
import torch
import torch.nn.functional as F

from eval.shapes.evaluate import encode_scenes
from shapes import world as W


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


def main() -> int:
    from mllm.cli import load_mllm, load_unitok

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--tokenizer", required=True)
    ap.add_argument("--train", type=int, default=1000)
    ap.add_argument("--test", type=int, default=400)
    ap.add_argument("--out", default=None, help="write the table as JSON")
    args = ap.parse_args()
    model, processor = load_mllm(args.model, "cpu")
    unitok = load_unitok(args.tokenizer, model, model.device)
    result = probe(model, unitok, args.train, args.test)
    print(f"{'probe accuracy (%)':<18}" + "".join(f"{t:>10}" for t in ("occupied", "color", "shape", "size", "cell")))
    for name, row in result.items():
        print(f"{name:<18}" + "".join(f"{100 * row[t]:10.1f}" if t in row else f"{'':>10}"
                                      for t in ("occupied", "color", "shape", "size", "cell")))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
