"""Abstain when unsure: below a confidence fitted on validation, ask which route was meant.

A confident wrong route gives the user an answer to a question they did not ask (a sentiment
label for a news headline). Below ``threshold`` the turn is answered instead with a short
clarifying question that lists the likely routes and how to pick one (``/topic ...``).

The threshold is fitted, never hand-set: on the validation turns (the routes' validation
splits, route-balanced, plus the hand-written validation turns, weighted as the second stage's
fit weighs them), every turn the router answers scores +1 when its route is right and -1 when
it is wrong, and a clarifying question scores 0 (it costs the user one more message but
misleads nobody). The threshold with the highest total wins (the lowest on ties), which
abstains exactly where a route is right less than half the time. It is on by default only
when that total beats never abstaining; it is always available per request (the API's ``bot``
field, see :func:`parse_request`; the demo's toggle). Figures are kept beside the router's
cache (``abstain-*.json``), one fit per route set and second stage.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from bot.errors import DataError
from bot.routing.commands import HELP
from bot.routing.route_data import pair_weights, validation_pairs
from bot.util.fsutil import atomic_write_text

log = logging.getLogger(__name__)

VAL_PER_ROUTE = 300  # validation turns per route for the fit (the second stage reads ~1 in 4)
MIN_TURNS = 20  # fewer validation turns than this: no threshold is fitted
LIKELY_ROUTES = 3  # routes named in a clarifying question, at most
FILE = "abstain-{tag}.json"


@dataclass
class Abstain:
    """A fitted abstain threshold.

    Args:
        threshold: a turn whose route score is below it gets a clarifying question.
        on: whether it applies by default (validation showed it helps).
        figures: what the fit measured on validation (see :func:`fit`).
    """

    threshold: float
    on: bool
    figures: dict = field(default_factory=dict)

    def unsure(self, choice) -> bool:
        """True when ``choice`` (a RouteChoice) is a routed turn below the threshold.

        Commands, ``/help`` and follow-ups that stayed with the previous adapter never abstain:
        the user (or the conversation) already said where the turn goes."""
        return (not choice.override and choice.adapter != HELP and bool(choice.scores)
                and not choice.reason.startswith("follow-up") and choice.score < self.threshold)

    def question(self, choice, describe: dict[str, str] | None = None) -> str:
        """The clarifying question for ``choice``: its likely routes and how to pick one."""
        describe = describe or {}
        ranked = sorted(choice.scores.items(), key=lambda kv: -kv[1])
        best = ranked[0][1] if ranked else 0.0
        likely = [n for n, s in ranked[:LIKELY_ROUTES] if s >= best / 3] or [choice.adapter]
        if len(likely) < 2 and len(ranked) > 1:
            likely = [n for n, _ in ranked[:2]]

        def named(n):
            what = " ".join(str(describe.get(n, "")).split())
            what = what if len(what) <= 60 else what[:57].rstrip() + "..."
            return f"`/{n}`" + (f" ({what})" if what else "")

        options = ", ".join(named(n) for n in likely[:-1]) + f" or {named(likely[-1])}"
        return (f"I am not sure what you would like me to do with this. Did you mean {options}? "
                f"Send it again starting with one of them, e.g. `/{likely[0]} {_snippet(choice.text)}`.")


def _snippet(text: str, n: int = 40) -> str:
    text = " ".join(str(text or "").split())
    return text if len(text) <= n else text[:n].rstrip() + "..."


def fit(scores, right, weights=None) -> dict:
    """The threshold that maximises (right - wrong) over the answered turns (pure).

    Args:
        scores: each validation turn's route score (the confidence abstaining compares).
        right: whether its route was right.
        weights: per-turn weights (None: equal).

    Returns:
        {"threshold", "on", "n", "utility", "utility_never", "abstain_rate", "accuracy_rest",
         "accuracy_all"}: utilities per turn (weighted means), rates and accuracies weighted too.
    """
    scores = np.asarray(scores, dtype=float)
    right = np.asarray(right, dtype=bool)
    weights = np.ones(len(scores)) if weights is None else np.asarray(weights, dtype=float)
    if len(scores) == 0:
        raise DataError("fitting the abstain threshold needs validation turns")
    weights = weights / weights.sum()
    order = np.argsort(scores, kind="stable")
    signed = np.where(right, 1.0, -1.0) * weights
    total = float(signed.sum())
    # abstaining on the k least confident turns (k = 0..n) leaves total - (sum of their signs)
    gain = np.concatenate([[0.0], np.cumsum(signed[order])])
    utility = total - gain
    sorted_scores = scores[order]
    # only cut between two different scores (equal scores are abstained on together)
    valid = np.ones(len(utility), dtype=bool)
    valid[1:-1] = sorted_scores[1:] > sorted_scores[:-1]
    k = int(np.flatnonzero(valid)[np.argmax(utility[valid])])  # first maximum: the lowest cut
    if k == 0:
        threshold = 0.0
    elif k == len(scores):
        threshold = float(sorted_scores[-1]) + 1e-6
    else:
        threshold = float(sorted_scores[k - 1] + sorted_scores[k]) / 2
    answered = scores >= threshold
    rest = weights[answered].sum()
    return {"threshold": round(threshold, 4), "on": bool(utility[k] > utility[0] + 1e-12),
            "n": int(len(scores)), "utility": round(float(utility[k]), 4),
            "utility_never": round(float(utility[0]), 4),
            "abstain_rate": round(float(weights[~answered].sum()), 4),
            "accuracy_rest": round(float(weights[answered & right].sum() / rest), 4) if rest else None,
            "accuracy_all": round(float(weights[right].sum()), 4)}


def measure(abstain: Abstain, choices, labels) -> dict:
    """Abstain rate and accuracy of the rest on labelled turns (held-out figures in reports)."""
    unsure = np.array([abstain.unsure(c) for c in choices], dtype=bool)
    right = np.array([c.adapter == y for c, y in zip(choices, labels, strict=True)], dtype=bool)
    n_rest = int((~unsure).sum())
    return {"n": len(labels), "abstained": int(unsure.sum()),
            "abstain_rate": round(float(unsure.mean()), 4) if len(labels) else None,
            "accuracy_rest": round(float(right[~unsure].mean()), 4) if n_rest else None,
            "accuracy_all": round(float(right.mean()), 4) if len(labels) else None,
            "wrong_caught": int((unsure & ~right).sum()), "right_lost": int((unsure & right).sum())}


def _tag(router) -> str:
    """What the router's scores depend on beyond its cache key: the second stage, if any."""
    second = router.second
    if second is None:
        return "first"
    blob = json.dumps([second.gate, second.weight, second.labels, getattr(second, "digest", ""),
                       router.second_check], sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


def attach(router, specs) -> Abstain | None:
    """Fit (or read back) the abstain threshold of ``router`` as served; set ``router.abstain``.

    None (and ``router.abstain`` None) when there are too few validation turns to fit one.
    """
    router.abstain = None
    path = Path(router.cache_path) / FILE.format(tag=_tag(router)) if router.cache_path else None
    if path is not None and path.is_file():
        try:
            saved = json.loads(path.read_text(encoding="utf-8"))
            router.abstain = Abstain(float(saved["threshold"]), bool(saved["on"]), saved)
            return router.abstain
        except (OSError, ValueError, KeyError, TypeError):
            pass  # refitted below
    pairs = [p for p in validation_pairs(specs, router, VAL_PER_ROUTE) if p[1] in router.names]
    if len(pairs) < MIN_TURNS or len({a for _, a, _ in pairs}) < 2:
        log.info("no abstain threshold: %d validation turns (need %d over two routes or more)",
                 len(pairs), MIN_TURNS)
        return None
    labels = np.array([a for _, a, _ in pairs])
    weights = pair_weights(labels, np.array([s for _, _, s in pairs]))
    choices = router.route_all([t for t, _, _ in pairs])
    figures = fit([c.score for c in choices], [c.adapter == y for c, y in zip(choices, labels)],
                  weights)
    figures.update(routes=router.routes, second_stage=router.second is not None,
                   date=time.strftime("%Y-%m-%d %H:%M"))
    router.abstain = Abstain(figures["threshold"], figures["on"], figures)
    log.info("abstain threshold %.3f fitted on %d validation turns: abstains on %.1f %%, the rest "
             "%s right; %s by default", figures["threshold"], figures["n"],
             100 * figures["abstain_rate"], _pct(figures["accuracy_rest"]),
             "on" if figures["on"] else "off (it did not help on validation)")
    if path is not None:
        try:
            atomic_write_text(path, json.dumps(figures, indent=1) + "\n")
        except OSError as err:
            log.info("could not cache the abstain threshold in %s: %s", path, err)
    return router.abstain


def _pct(x) -> str:
    return "—" if x is None else f"{100 * x:.1f} %"


def parse_request(body_bot) -> bool | None:
    """The per-request switch from an API body's ``bot`` field: ``{"abstain": true|false}``.

    Returns True/False when the request sets it, None when it leaves the default. Raises
    DataError (the server answers 400) naming the field and the fix for anything else.
    """
    if body_bot is None:
        return None
    if not isinstance(body_bot, dict):
        raise DataError(f"field 'bot' must be an object such as {{\"abstain\": true}}, got "
                        f"{type(body_bot).__name__}. Fix: send \"bot\": {{\"abstain\": true}} or leave it out")
    unknown = sorted(set(body_bot) - {"abstain"})
    if unknown:
        raise DataError(f"field 'bot' has unknown key(s) {unknown[:5]}; allowed: ['abstain']. "
                        "Fix: send \"bot\": {\"abstain\": true} or leave it out")
    value = body_bot.get("abstain")
    if value is not None and not isinstance(value, bool):
        raise DataError(f"field 'bot.abstain' must be true, false or null, got {value!r}. "
                        "Fix: send true to ask when unsure, false to always route")
    return value


def clarify(router, choice, requested: bool | None = None) -> str | None:
    """The clarifying question when ``router`` abstains on ``choice``, else None.

    Args:
        requested: the request's own switch (None: the fitted default).
    """
    rule = getattr(router, "abstain", None)
    if rule is None or not (rule.on if requested is None else requested):
        return None
    return rule.question(choice, router.describe) if rule.unsure(choice) else None
