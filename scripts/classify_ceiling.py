"""How far can a classify task go on its own split? Adapters, two classic models, and blends.

Usage: python scripts/classify_ceiling.py NAME ADAPTERS_DIR [ADAPTERS_DIR ...] [--out FILE.json]

For the classify adapter NAME in each folder (trained with different recipes, say), and
for two models that share nothing with the backbone, it prints validation and test
accuracy on the whole text and on every view (a BBC headline, a lede):

- each adapter folder, and the mean of their log-probabilities (an ensemble);
- TF-IDF (word 1-2 grams) + logistic regression, trained on the training split with every
  view as an extra example (``bot eval``'s baseline trains only on the views the adapter
  trains on, and keeps C at 10);
- logistic regression on the router's sentence encoder (all-MiniLM-L6-v2) embeddings;
- the first adapter blended with each of the two (log-probabilities, weight w on the other
  model), with w and each regression's C chosen on VALIDATION only;
- how many test items every model gets wrong: a floor on the error of any mix of them.

Nothing is chosen on the test split. It answers whether a gap to a target is the recipe's
(other adapters or an ensemble close it) or the backbone's (they all stop at the same place).
"""

from __future__ import annotations

import argparse
import json

import numpy as np
import scipy.sparse
from sklearn.feature_extraction.text import TfidfVectorizer
from sklearn.linear_model import LogisticRegression

from bot.manifests.registry import load_task
from bot.manifests.spec import discover
from bot.model.backbone import Backbone
from bot.routing.encoder import load_encoder
from bot.training.train import training_rows

SPLITS = ("val", "test")
WEIGHTS = (0.1, 0.2, 0.3, 0.4, 0.5)
CS = (1.0, 10.0, 100.0)


def view_text(row: dict, view: str) -> str:
    return row["text"] if view == "text" else row["views"][view]


def accuracy(probs: np.ndarray, y: np.ndarray) -> float:
    return float((probs.argmax(1) == y).mean())


def fit_classic(features, y, views) -> dict:
    """Logistic regression on ``features[split, view]``, C chosen by mean validation accuracy."""
    blocks = [features["train", v] for v in views]
    x_train = scipy.sparse.vstack(blocks) if scipy.sparse.issparse(blocks[0]) else np.concatenate(blocks)
    y_train = np.concatenate([y["train"]] * len(views))
    best = None
    for c in CS:
        model = LogisticRegression(C=c, max_iter=5000).fit(x_train, y_train)
        probs = {(s, v): model.predict_proba(features[s, v]) for s in SPLITS for v in views}
        score = np.mean([accuracy(probs["val", v], y["val"]) for v in views])
        if best is None or score > best[0]:
            best = (score, c, probs)
    return {"C": best[1], "probs": best[2]}


def blend(adapter, other, y, views) -> dict:
    """Per view: the weight w (chosen on validation) and the blend's accuracy."""
    out = {}
    for v in views:
        mix = {w: {s: np.log(adapter[s, v] + 1e-9) * (1 - w) + np.log(other[s, v] + 1e-9) * w
                   for s in SPLITS} for w in WEIGHTS}
        w = max(WEIGHTS, key=lambda w: (accuracy(mix[w]["val"], y["val"]), -w))
        out[v] = {"w": w, **{s: accuracy(mix[w][s], y[s]) for s in SPLITS}}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("name")
    ap.add_argument("folders", nargs="+")
    ap.add_argument("--out", help="write every figure as JSON here")
    args = ap.parse_args()

    spec = next(s for s in discover(args.folders[0]) if s.name == args.name)
    spec, parts = training_rows(spec)
    labels = list(spec.labels)
    rows = {"train": parts.train, "val": parts.val, "test": parts.test}
    views = ["text", *sorted({v for r in parts.train for v in r.get("views", {})})]
    y = {s: np.array([labels.index(r["label"]) for r in rows[s]]) for s in rows}
    texts = {(s, v): [view_text(r, v) for r in rows[s]] for s in rows for v in views}

    models: dict[str, dict] = {}
    backbone = Backbone.load()
    for folder in args.folders:
        fspec = next(s for s in discover(folder) if s.name == args.name)
        task = load_task(backbone, fspec)
        models[f"adapter {folder}"] = {
            (s, v): np.array([[p[label] for label in labels] for p in task.predict(texts[s, v])])
            for s in SPLITS for v in views}
        backbone.drop_adapter(args.name)
        print(f"scored {folder}", flush=True)
    adapters = list(models)
    if len(adapters) > 1:
        models["adapter ensemble"] = {
            key: np.exp(np.mean([np.log(models[a][key] + 1e-9) for a in adapters], axis=0))
            for key in models[adapters[0]]}

    vec = TfidfVectorizer(sublinear_tf=True, ngram_range=(1, 2))
    vec.fit([t for v in views for t in texts["train", v]])
    tfidf = fit_classic({k: vec.transform(t) for k, t in texts.items()}, y, views)
    encoder = load_encoder(max_seq_length=256)
    emb = {k: encoder.encode(t, batch_size=32, normalize_embeddings=True) for k, t in texts.items()}
    minilm = fit_classic(emb, y, views)
    models[f"TF-IDF + LR (C={tfidf['C']:g})"] = tfidf["probs"]
    models[f"MiniLM + LR (C={minilm['C']:g})"] = minilm["probs"]

    report = {"name": args.name, "n": {s: len(rows[s]) for s in rows}, "views": views, "models": {},
              "blends": {}, "wrong_by_all": {}}
    print(f"\n{args.name}: accuracy % on validation / test (n = {len(rows['val'])} / {len(rows['test'])})")
    print(f"{'model':<48}" + "".join(f"{v:>16}" for v in views))
    for label, probs in models.items():
        acc = {v: {s: accuracy(probs[s, v], y[s]) for s in SPLITS} for v in views}
        report["models"][label] = acc
        print(f"{label:<48}" + "".join(f"{100 * a['val']:>8.1f}/{100 * a['test']:<7.1f}" for a in acc.values()))
    for other in list(models)[-2:]:
        label = f"{adapters[0].split()[-1]} + {other.split(' (')[0]}"
        mixed = blend(models[adapters[0]], models[other], y, views)
        report["blends"][label] = mixed
        print(f"{label:<48}" + "".join(
            f"{100 * m['val']:>8.1f}/{100 * m['test']:<7.1f}" for m in mixed.values())
              + "   w " + ", ".join(f"{m['w']:g}" for m in mixed.values()))
    for v in views:
        wrong = np.ones(len(rows["test"]), bool)
        for probs in models.values():
            wrong &= probs["test", v].argmax(1) != y["test"]
        report["wrong_by_all"][v] = int(wrong.sum())
    print("test items every model gets wrong: " + ", ".join(
        f"{v} {n} ({100 * n / len(rows['test']):.1f} %)" for v, n in report["wrong_by_all"].items()))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(report, f, indent=1)


if __name__ == "__main__":
    main()
