"""Check a running vLLM serving a `bot export` folder against plain transformers + peft.

Run by scripts/vllm-check.sh inside its scratch venv (vllm, openai, peft); it does not
import bot. The client calls are the README's own snippet, executed as written, with the
vLLM base URLs it documents. Exit status 0 when every classifier's top label agrees with
the reference and its probabilities are within --tol; generation replies are printed
with their agreement (bfloat16 kernels may pick a different token after a near tie).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

PROMPTS = ["Hi there, how are you today?", "What should I cook for dinner tonight?"]
TEXTS = ["Stocks fell sharply after the central bank raised interest rates",
         "Striker scores twice as United beat City in the derby",
         "I absolutely loved this movie, best film of the year",
         "The product broke after two days, total waste of money",
         "New smartphone chip promises longer battery life"]
MAX_TOKENS = 16


def readme_snippet(folder: Path, host: str) -> dict:
    """The README's client code, with BASE_URLS switched to the documented vLLM URLs."""
    text = (folder / "README.md").read_text()
    code = text.split("```python\n", 1)[1].split("```", 1)[0]
    ns: dict = {"__name__": "readme_snippet"}
    exec(compile(code, str(folder / "README.md"), "exec"), ns)  # noqa: S102 (the export's own code)
    line = next(ln for ln in code.splitlines() if ln.startswith("# BASE_URLS = "))
    ns["BASE_URLS"] = json.loads(line.split("= ", 1)[1].replace("GPU-HOST", host))
    return ns


def reference_probs(folder: Path, name: str, entry: dict, texts: list[str]) -> torch.Tensor:
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    base = folder / entry["base"]
    model = AutoModelForSequenceClassification.from_pretrained(base, dtype=torch.float32)
    model = PeftModel.from_pretrained(model, folder / entry["path"]).eval()
    tok = AutoTokenizer.from_pretrained(base)
    enc = tok([entry["template"].format(text=t) for t in texts], return_tensors="pt", padding=True)
    with torch.inference_mode():
        return torch.softmax(model(**enc).logits.float(), dim=-1)


def reference_reply(folder: Path, name: str, entry: dict, prompt: str) -> str:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base = folder / entry["base"]
    tok = AutoTokenizer.from_pretrained(base)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    model = PeftModel.from_pretrained(model, folder / entry["path"]).eval()
    messages = [{"role": "user", "content": prompt}]
    if entry["system_prompt"]:
        messages.insert(0, {"role": "system", "content": entry["system_prompt"]})
    ids = tok.apply_chat_template(messages, add_generation_prompt=True, return_dict=True,
                                  return_tensors="pt")["input_ids"]
    with torch.inference_mode():
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False,
                             max_new_tokens=MAX_TOKENS, repetition_penalty=1.1,
                             pad_token_id=tok.pad_token_id)
    return tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("folder", type=Path)
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--tol", type=float, default=0.02, help="max |prob difference| allowed")
    args = ap.parse_args()
    manifest = json.loads((args.folder / "export.json").read_text())
    ns = readme_snippet(args.folder, args.host)
    ok = True
    for name, entry in manifest["classify"].items():
        ref = reference_probs(args.folder, name, entry, TEXTS)
        got = torch.tensor([[ns["classify"](name, t)[label] for label in entry["labels"]]
                            for t in TEXTS])
        diff = float((got - ref).abs().max())
        agree = int((got.argmax(1) == ref.argmax(1)).sum())
        good = agree == len(TEXTS) and diff <= args.tol
        ok &= good
        print(f"classify {name}: top label agrees {agree}/{len(TEXTS)}, max |prob diff| "
              f"{diff:.2e} (tol {args.tol}) -> {'OK' if good else 'MISMATCH'}")
        for t, g, r in zip(TEXTS, got, ref):
            print(f"  {t[:50]!r}: vllm {entry['labels'][int(g.argmax())]} {float(g.max()):.3f} | "
                  f"reference {entry['labels'][int(r.argmax())]} {float(r.max()):.3f}")
    for name, entry in manifest["generate"].items():
        for prompt in PROMPTS:
            got = ns["chat"](name, prompt, max_tokens=MAX_TOKENS)
            ref = reference_reply(args.folder, name, entry, prompt)
            ok &= bool(got.strip())
            same = "same" if got.strip() == ref.strip() else "DIFFERENT"
            print(f"chat {name} {prompt!r}:\n  vllm      {got!r}\n  reference {ref!r} ({same})")
    print("vllm-check:", "OK" if ok else "FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
