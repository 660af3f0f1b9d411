"""Few-shot harness: reading QA files, prompt layout, exact-match scoring."""

import json

import pytest
import torch

import ltm.fewshot as fewshot
from ltm import LTMConfig, LTMDecoder


def write_qa(path, n=4):
    path.write_text("\n".join(json.dumps({"q": f"{i}+{i}", "a": str(2 * i)}) for i in range(n)) + "\n")
    return path


def test_read_qa_and_prompt(tmp_path):
    examples = fewshot.read_qa(write_qa(tmp_path / "qa.jsonl"), question_key="q", answer_key="a")
    assert examples[1] == {"question": "1+1", "answer": "2"}
    assert fewshot.build_prompt(examples[:1], "3+3") == "Q: 0+0\nA: 0\n\nQ: 3+3\nA:"
    with pytest.raises(ValueError, match="'question'"):
        fewshot.read_qa(tmp_path / "qa.jsonl")
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(ValueError, match="no examples"):
        fewshot.read_qa(tmp_path / "empty.jsonl")


def test_exact_match_scoring(tmp_path, monkeypatch):
    """The decoded answer is cut at the first newline and stripped before the comparison."""
    torch.manual_seed(0)
    model = LTMDecoder(LTMConfig.from_name("ltm-tiny"), backend="eager")
    examples = fewshot.read_qa(write_qa(tmp_path / "qa.jsonl"), "q", "a")
    seen_prompts = []

    def fake_generate(model, prompt, z, n, **kw):  # answers "2" to every question
        seen_prompts.append(prompt)
        answer = torch.tensor([[ord(" "), ord("2"), ord("\n"), ord("x")]])
        return torch.cat([prompt, answer], 1)

    monkeypatch.setattr(fewshot, "generate", fake_generate)
    result = fewshot.fewshot_eval(model, examples, shots=1, steps=1)
    assert result["n"] == 4 and result["accuracy"] == 0.25
    assert [r["correct"] for r in result["records"]] == [False, True, False, False]
    assert all(p[0, 0] == 257 for p in seen_prompts)  # BOS first
    with pytest.raises(ValueError, match="shots"):
        fewshot.fewshot_eval(model, examples, shots=4)


def test_runs_end_to_end_and_refuses_prompts_too_long(tmp_path):
    torch.manual_seed(0)
    model = LTMDecoder(LTMConfig.from_name("ltm-tiny"), backend="eager")
    examples = fewshot.read_qa(write_qa(tmp_path / "qa.jsonl"), "q", "a")
    result = fewshot.fewshot_eval(model, examples, shots=1, steps=2, max_answer_tokens=4, limit=2)
    assert result["n"] == 2 and 0 <= result["accuracy"] <= 1
    with pytest.raises(ValueError, match="fewer shots"):
        fewshot.fewshot_eval(model, examples, shots=3, steps=1, max_answer_tokens=20)
