"""The README written into a ``bot export`` folder: vLLM commands, templates, client code."""

from __future__ import annotations

import json

GEN_PORT = 8000
FIRST_POOL_PORT = 8001


def ports(manifest: dict) -> dict[str, int]:
    """Port of the vLLM instance serving each adapter (generation 8000, classifiers 8001+)."""
    out = {name: GEN_PORT for name in manifest["generate"]}
    bases = sorted({c["base"] for c in manifest["classify"].values()},
                   key=lambda b: int(b.rsplit("-", 1)[1]))
    for i, base in enumerate(bases):
        for name, c in manifest["classify"].items():
            if c["base"] == base:
                out[name] = FIRST_POOL_PORT + i
    return out


def serve_commands(manifest: dict, dtype: str = "bfloat16") -> list[str]:
    """One ``vllm serve`` line per instance, run from the export folder."""
    rank = manifest["max_lora_rank"]
    port = ports(manifest)
    lines = []
    gen = manifest["generate"]
    if gen:
        mods = " ".join(f"{n}=./{g['path']}" for n, g in gen.items())
        lines.append(f"vllm serve ./{manifest['base']} --served-model-name {manifest['base']} "
                     f"--dtype {dtype} --max-model-len 2048 --enable-lora --max-lora-rank {rank} "
                     f"--max-loras {len(gen)} --lora-modules {mods} --port {GEN_PORT}")
    by_base: dict[str, list[str]] = {}
    for name, c in manifest["classify"].items():
        by_base.setdefault(c["base"], []).append(name)
    for base, names in sorted(by_base.items(), key=lambda kv: port[kv[1][0]]):
        mods = " ".join(f"{n}=./{manifest['classify'][n]['path']}" for n in names)
        lines.append(f"vllm serve ./{base} --served-model-name {base} --runner pooling "
                     f"--convert classify --dtype {dtype} --max-model-len 2048 --enable-lora "
                     f"--max-lora-rank {rank} --max-loras {len(names)} --lora-modules {mods} "
                     f"--port {port[names[0]]}")
    return lines


def client_snippet(manifest: dict, host: str = "GPU-HOST") -> str:
    """Python using the ``openai`` client; bot serve and vLLM differ only in base URLs."""
    port = ports(manifest)
    names = list(manifest["generate"]) + list(manifest["classify"])
    bot_urls = {n: "http://127.0.0.1:8000/v1" for n in names}
    # vLLM: chat under /v1 on the generation instance; /classify sits at the root of each
    # pooling instance (vllm/entrypoints/pooling/classify/api_router.py), bot serve under /v1.
    vllm_urls = {n: f"http://{host}:{port[n]}/v1" if n in manifest["generate"]
                 else f"http://{host}:{port[n]}" for n in names}
    templates = {n: c["template"] for n, c in manifest["classify"].items()}
    max_lengths = {n: c.get("max_length", 256) for n, c in manifest["classify"].items()}
    max_windows = {n: c.get("max_windows", 1) for n, c in manifest["classify"].items()}
    labels = {n: c["labels"] for n, c in manifest["classify"].items()}
    systems = {n: g["system_prompt"] for n, g in manifest["generate"].items()}
    return f'''import math

import httpx
from openai import OpenAI

# bot serve: every adapter on one server.
BASE_URLS = {_py(bot_urls)}
# vLLM (the commands above): only the base URLs change.
# BASE_URLS = {_py(vllm_urls)}

TEMPLATES = {_py(templates)}
MAX_LENGTH = {_py(max_lengths)}  # tokens each classifier was trained on
MAX_WINDOWS = {_py(max_windows)}  # a longer text is read as up to this many windows
TOKENIZER_DIR = "./{manifest['base']}"  # the exported backbone (run from the export folder)
LABELS = {_py(labels)}
SYSTEM_PROMPTS = {_py(systems)}


def client(name):
    return OpenAI(base_url=BASE_URLS[name], api_key="unused")


def chat(name, text, max_tokens=64):
    """Greedy reply from a generation adapter (bot's default repetition penalty 1.1)."""
    messages = [{{"role": "user", "content": text}}]
    if SYSTEM_PROMPTS.get(name):
        messages.insert(0, {{"role": "system", "content": SYSTEM_PROMPTS[name]}})
    reply = client(name).chat.completions.create(
        model=name, messages=messages, max_tokens=max_tokens, temperature=0,
        extra_body={{"repetition_penalty": 1.1}})
    return reply.choices[0].message.content


_tokenizer = None


def classify_input(name, text):
    """The classifier's inputs as bot builds them: the template around `text`, or, for a text
    longer than MAX_LENGTH tokens, around each of up to MAX_WINDOWS windows of it that overlap
    by a quarter (the template's ending, the token the head reads, always survives)."""
    global _tokenizer
    template = TEMPLATES[name]
    prompt = template.format(text=text)
    if len(prompt.encode("utf-8")) + 2 <= MAX_LENGTH[name]:  # a token covers at least one byte
        return [prompt]
    if _tokenizer is None:
        from transformers import AutoTokenizer
        _tokenizer = AutoTokenizer.from_pretrained(TOKENIZER_DIR)
    size = MAX_LENGTH[name] - len(_tokenizer(template.format(text=""), add_special_tokens=False)["input_ids"]) - 2
    spans = _tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
    if size <= 0 or len(spans) <= size:
        return [prompt]
    if MAX_WINDOWS[name] <= 1:  # cut to fit: the text loses its end
        return [template.format(text=text[:spans[size - 1][1]])]
    out, stride = [], max(1, size - size // 4)
    for start in range(0, len(spans), stride):
        end = min(start + size, len(spans))
        out.append(template.format(text=text[spans[start][0]:spans[end - 1][1]]))
        if end == len(spans) or len(out) == MAX_WINDOWS[name]:
            return out
    return out


def classify(name, text):
    """Every label's probability. A long text's windows are pooled as bot pools them: their
    log-probabilities averaged, then renormalised."""
    inputs = classify_input(name, text)
    response = client(name).post(
        "/classify", cast_to=httpx.Response,
        body={{"model": name, "input": inputs[0] if len(inputs) == 1 else inputs}})
    response.raise_for_status()
    rows = [row["probs"] for row in response.json()["data"]]
    mean = [sum(math.log(max(row[i], 1e-30)) for row in rows) / len(rows) for i in range(len(rows[0]))]
    total = sum(math.exp(m) for m in mean)
    return dict(zip(LABELS[name], [math.exp(m) / total for m in mean]))


if __name__ == "__main__":
    for name in SYSTEM_PROMPTS:
        print(name, chat(name, "Hi there, how are you today?"))
    for name in TEMPLATES:
        print(name, classify(name, "Stocks fell sharply after the central bank raised rates"))
'''


def _py(value) -> str:
    """A Python literal (JSON spelling is valid Python for strings, lists and dicts)."""
    return json.dumps(value, ensure_ascii=False)


def render_readme(manifest: dict) -> str:
    cmds = "\n\n".join(serve_commands(manifest))
    rows = [f"| `{manifest['base']}/` | the backbone ({manifest['backbone']}, "
            f"`{manifest['fingerprint']}`), plain transformers, float32 |"]
    bases = sorted({c["base"] for c in manifest["classify"].values()})
    rows += [f"| `{b}/` | the same weights (hard links) as `LlamaForSequenceClassification` with "
             f"{b.rsplit('-', 1)[1]} labels and a zero `score` head: the base of one pooling "
             f"instance |" for b in bases]
    rows += [f"| `{n}/` | generation adapter, LoRA r={g['rank']} |"
             for n, g in manifest["generate"].items()]
    rows += [f"| `{n}/` | classifier, LoRA r={c['rank']} + head as `score` "
             f"(`modules_to_save`), labels {c['labels']} (`labels.json`) |"
             for n, c in manifest["classify"].items()]
    table = "\n".join(rows)
    templates = "\n\n".join(
        f"`{n}` (labels in head order: {', '.join(c['labels'])}):\n\n```text\n{c['template']}\n```"
        for n, c in manifest["classify"].items()) or "(no classifiers exported)"
    systems = "\n".join(
        f"- `{n}`: " + (f"system prompt `{g['system_prompt']}`" if g["system_prompt"]
                        else "no system prompt (the chat template's default)")
        for n, g in manifest["generate"].items()) or "(no generation adapters exported)"
    return f"""# bot export for vLLM

Written by `bot export`. Adapters are peft folders (`adapter_config.json` +
`adapter_model.safetensors`); `export.json` lists what is here.

| folder | what |
| --- | --- |
{table}

## Serve with vLLM

Run from this folder on a machine with a CUDA GPU (`pip install vllm`). One instance
generates with every generation adapter; each classifier label count gets its own
pooling instance, because every head on one instance must have the base head's shape.

```bash
{cmds}
```

- A request picks an adapter with `"model": NAME`; `GET /v1/models` lists them.
- Classifier adapters carry their head through peft's `modules_to_save`; vLLM reads that
  since pull request 53555 (merged 2026). Older releases refuse the adapter with "vLLM
  only supports modules_to_save being None": upgrade vLLM.
- `--dtype bfloat16` is the fast choice; `--dtype float32` reproduces bot's numbers
  where your GPU's kernels support it. `--max-lora-rank {manifest['max_lora_rank']}` fits the
  largest adapter rank here (vLLM accepts 1, 8, 16, 32, 64, 128, 256, 320, 512).

## Classifier inputs

vLLM's `/classify` takes the model's exact input: apply the adapter's template first
(`{{text}}` is replaced by the user's text). It pools the last token and applies a softmax,
as bot does. Each classifier was trained on prompts of at most its `max_length` tokens
(`export.json`). bot reads a longer text whole: as up to `max_windows` windows of the text
that overlap by a quarter, each wrapped in the template, whose log-probabilities it averages
and renormalises. `classify_input` and `classify` in the client code below do the same with
the exported tokenizer; sending a whole long article as one input instead classifies an input
unlike any the adapter was trained on.

{templates}

## Generation adapters

{systems}

bot decodes greedily with a repetition penalty of 1.1; send `temperature=0` and
`repetition_penalty` (an `extra_body` field) for the same behaviour.

## Client code

The same code talks to `bot serve` (OpenAI-compatible at `http://127.0.0.1:8000/v1`, plus
`POST /v1/classify`) and to the vLLM instances above; only `BASE_URLS` changes.

```python
{client_snippet(manifest)}```
"""
