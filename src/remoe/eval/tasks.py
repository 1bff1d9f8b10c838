"""The offline `local` suite: lm-eval YAML tasks over JSONL built from the held-out split of the
training corpus, deterministically (fixed seed, sorted inputs), so they need no network anywhere.

- remoe_cloze  (LAMBADA-style): a passage whose final word is to be predicted; acc (greedy) and ppl.
- remoe_choice (HellaSwag-style): a passage and four continuations of equal length, one true, three cut
  from other held-out passages; acc and acc_norm.
"""

from __future__ import annotations

import json
import os
import random
import re

from filelock import FileLock

from ..data.corpus import fingerprint

LOCAL_TASKS = ("remoe_cloze", "remoe_choice")
PAPER_TASKS = ("arc_challenge", "arc_easy", "boolq", "hellaswag", "lambada_openai", "piqa", "race")
VERSION = 1  # bump when the construction changes: it keys the cache and lands in lm-eval's results

_CLOZE_YAML = """task: remoe_cloze
dataset_path: json
dataset_kwargs:
  data_files:
    test: {path}
output_type: loglikelihood
test_split: test
doc_to_text: "{{{{context}}}}"
doc_to_target: "{{{{target}}}}"
metric_list:
  - metric: perplexity
    aggregation: perplexity
    higher_is_better: false
  - metric: acc
    aggregation: mean
    higher_is_better: true
metadata:
  version: {version}
"""

_CHOICE_YAML = """task: remoe_choice
dataset_path: json
dataset_kwargs:
  data_files:
    test: {path}
output_type: multiple_choice
test_split: test
doc_to_text: "{{{{context}}}}"
doc_to_target: "{{{{label}}}}"
doc_to_choice: "{{{{choices}}}}"
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
  - metric: acc_norm
    aggregation: mean
    higher_is_better: true
metadata:
  version: {version}
"""

_LAST_WORD = re.compile(r"^(.*\S)\s+([A-Za-z_][A-Za-z0-9_]{2,})\s*$", re.S)


def _passages(texts: list[str], chars: int) -> list[str]:
    """Non-overlapping passages of about `chars` characters, cut at line ends."""
    out = []
    for t in texts:
        lines, cur = t.splitlines(), ""
        for line in lines:
            cur += line + "\n"
            if len(cur) >= chars:
                out.append(cur.rstrip())
                cur = ""
    return out


def build_cloze(texts: list[str], n: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    docs = []
    for p in _passages(texts, 300):
        m = _LAST_WORD.match(p)
        if m and len(m.group(1)) > 100:
            docs.append({"context": m.group(1), "target": " " + m.group(2)})
    rng.shuffle(docs)
    return docs[:n]


def build_choice(texts: list[str], n: int, seed: int = 0, n_choices: int = 4, ending: int = 60) -> list[dict]:
    rng = random.Random(seed)
    ps = [p for p in _passages(texts, 360) if len(p) >= 300]
    rng.shuffle(ps)
    endings = [p[-ending:] for p in ps]
    docs = []
    for i, p in enumerate(ps[:n]):
        others = rng.sample([j for j in range(len(ps)) if j != i], n_choices - 1)
        choices = [endings[i]] + [endings[j] for j in others]
        order = list(range(n_choices))
        rng.shuffle(order)
        docs.append({"context": p[:-ending], "choices": [choices[k] for k in order], "label": order.index(0)})
    return docs


def build_local_tasks(texts: list[str], out_root: str, n: int = 200, seed: int = 0) -> str:
    """Write both tasks (JSONL + YAML) under out_root/<key>/ and return that folder (lm-eval include_path)."""
    key = fingerprint([str(VERSION), str(n), str(seed)] + texts)
    folder = os.path.join(out_root, f"eval-tasks-{key}")
    os.makedirs(out_root, exist_ok=True)
    with FileLock(folder + ".lock"):
        if os.path.exists(os.path.join(folder, "remoe_choice.yaml")):
            return folder
        tmp = folder + ".tmp"
        os.makedirs(tmp, exist_ok=True)
        built = {"remoe_cloze": (build_cloze(texts, n, seed), _CLOZE_YAML),
                 "remoe_choice": (build_choice(texts, n, seed), _CHOICE_YAML)}
        for name, (docs, yaml) in built.items():
            if len(docs) < 10:
                raise ValueError(f"eval: the held-out split gives only {len(docs)} {name} examples")
            with open(os.path.join(tmp, f"{name}.jsonl"), "w") as f:
                f.writelines(json.dumps(d) + "\n" for d in docs)
            with open(os.path.join(tmp, f"{name}.yaml"), "w") as f:
                f.write(yaml.format(path=os.path.join(folder, f"{name}.jsonl"), version=VERSION))
        os.replace(tmp, folder)
    return folder
