"""Few-shot prompting harness: question/answer pairs from a JSONL file; for each query, `shots` other examples
form the prompt, the posterior q(z | prompt) is fitted on it with the inner loop, the answer is decoded greedily
(until a newline or EOS) and scored by exact match after stripping whitespace.

JSONL lines: {"question": "...", "answer": "..."} (field names configurable). Prompt layout:
    Q: {question}\nA: {answer}\n\n   (x shots)   Q: {query}\nA:
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from ltm.generate import generate
from ltm.latents import INNER_LOOP
from ltm.progress import progress_bar
from ltm.tokenizer import Tokenizer, check_vocab
from ltm.validation import NON_NEGATIVE, SEED, STEPS, Range

TEMPLATE = "Q: {question}\nA: {answer}\n\n"
QUERY_TEMPLATE = "Q: {question}\nA:"


def read_qa(path, question_key: str = "question", answer_key: str = "answer") -> list[dict]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"few-shot data file not found: {path}")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise ValueError(f"few-shot data file {path} is not UTF-8 JSONL text: {err}") from None
    examples = []
    for line_no, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}:{line_no} is not valid JSON: {err}") from None
        if not isinstance(obj, dict) or not all(isinstance(obj.get(k), str) for k in (question_key, answer_key)):
            raise ValueError(f"{path}:{line_no} needs string fields {question_key!r} and {answer_key!r}")
        examples.append({"question": obj[question_key], "answer": obj[answer_key]})
    if not examples:
        raise ValueError(f"few-shot data file {path} has no examples")
    return examples


def build_prompt(shots: list[dict], question: str) -> str:
    return "".join(TEMPLATE.format(**s) for s in shots) + QUERY_TEMPLATE.format(question=question)


def fewshot_eval(
    model,
    examples: list[dict],
    shots: int = 3,
    steps: int | None = None,
    lr: float = INNER_LOOP.lr,
    schedule: str = INNER_LOOP.schedule,
    max_answer_tokens: int = 16,
    seed: int = 0,
    limit: int | None = None,
    progress: bool = False,
) -> dict:
    """Exact-match accuracy; returns {"accuracy", "n", "shots", "records": [{question, answer, prediction, correct}]}.
    `limit` (>= 1, None: all): score the first `limit` questions only."""
    if not examples:
        raise ValueError("examples must be a non-empty list of {question, answer} dicts")
    Range(int, 0, len(examples) - 1).check(f"shots (for {len(examples)} examples)", shots)
    STEPS.check("steps", model.cfg.t_fast if steps is None else steps)
    NON_NEGATIVE.check("lr", lr)
    Range(int, 1, model.cfg.max_seq_len - 1).check("max_answer_tokens", max_answer_tokens)
    SEED.check("seed", seed)
    Range(int, 1, optional=True).check("limit", limit)
    check_vocab(model.cfg)
    tok = Tokenizer(model.cfg.encoding)
    device = model.tok_embeddings.weight.device
    rng = np.random.default_rng(seed)
    records = []
    queries = examples if limit is None else examples[:limit]
    bar = progress_bar(progress, total=len(queries), desc="fewshot", unit=" question")
    for i, ex in enumerate(queries):
        others = [j for j in range(len(examples)) if j != i]
        shot_ex = [examples[j] for j in rng.choice(others, size=shots, replace=False)] if shots else []
        ids = [tok.bos_id, *tok.encode(build_prompt(shot_ex, ex["question"]))]
        room = model.cfg.max_seq_len - max_answer_tokens
        if len(ids) > room:
            raise ValueError(
                f"example {i}: the prompt has {len(ids)} tokens; with max_answer_tokens="
                f"{max_answer_tokens} the context max_seq_len={model.cfg.max_seq_len} allows {room}; "
                "use fewer shots"
            )
        prompt = torch.tensor([ids], device=device)
        g = torch.Generator(device=device).manual_seed(seed + i)
        post = model.infer_posterior(prompt[:, :-1], prompt[:, 1:], steps=steps, lr=lr, schedule=schedule, generator=g)
        out = generate(model, prompt, post.mu, max_answer_tokens, temperature=0, eos_id=tok.eos_id)
        new = [t for t in out[0, len(ids) :].tolist() if t not in (tok.eos_id, tok.bos_id)]
        prediction = tok.decode(new).split("\n")[0].strip()
        records.append(
            dict(
                question=ex["question"],
                answer=ex["answer"],
                prediction=prediction,
                correct=prediction == ex["answer"].strip(),
            )
        )
        bar.update(1)
        bar.set_postfix(accuracy=f"{sum(r['correct'] for r in records) / len(records):.3f}")
    bar.close()
    return dict(
        accuracy=sum(r["correct"] for r in records) / len(records), n=len(records), shots=shots, records=records
    )
