"""benchmarks/train_pair.py: the micro preset end to end on CPU, in seconds."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]


def _load_script():
    spec = importlib.util.spec_from_file_location("train_pair", ROOT / "benchmarks" / "train_pair.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up here
    spec.loader.exec_module(mod)
    return mod


tp = _load_script()


@pytest.fixture(scope="module")
def micro_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("pair")
    summary = tp.main(["--preset", "micro", "--device", "cpu", "--out", str(out),
                       "--max-files", "12", "--max-seconds", "1.5", "--threads", "2"])
    return out, summary


def test_outputs_load_with_transformers(micro_run):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out, _ = micro_run
    for role in ("target", "draft"):
        d = out / role
        for name in ("config.json", "model.safetensors", "tokenizer.json",
                     "tokenizer_config.json", "generation_config.json"):
            assert (d / name).is_file(), f"{role}/{name} missing"
        model = AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32)
        tok = AutoTokenizer.from_pretrained(d)
        assert model.config.model_type == "llama"
        assert tok.eos_token == tok.bos_token == tok.pad_token == "<|endoftext|>"
        assert model.config.eos_token_id == tok.eos_token_id
        assert model.config.vocab_size == len(tok)
        ids = tok("import os\n", return_tensors="pt").input_ids
        assert ids[0, 0].item() != tok.bos_token_id  # nothing is added implicitly
        with torch.no_grad():
            logits = model(input_ids=ids).logits
        assert logits.shape == (1, ids.shape[1], model.config.vocab_size)


def test_tokenizer_round_trips_stdlib_source(micro_run):
    from transformers import AutoTokenizer

    out, _ = micro_run
    tok = AutoTokenizer.from_pretrained(out / "draft")
    files = tp.collect_sources(max_files=40)
    samples = [f.text for f in files[:5]]
    samples.append("def f(x):\n\treturn x  # tabs, trailing space \r\n\n\n    é → ∑ 😀\n")
    for text in samples:
        ids = tok.encode(text, add_special_tokens=False)
        assert tok.decode(ids, clean_up_tokenization_spaces=False) == text


def test_summary_has_losses_and_acceptance(micro_run):
    out, returned = micro_run
    summary = json.loads((out / "training_summary.json").read_text())
    assert summary["preset"] == "micro"
    assert summary["command_line"]
    assert summary["wall_seconds"] > 0
    assert summary["tokenizer"]["round_trip_exact"] == summary["tokenizer"]["round_trip_files"]
    for role in ("target", "draft"):
        m = summary["models"][role]
        assert m["tokens_trained"] > 0 and m["steps"] > 0
        assert m["heldout_loss"] == summary["heldout_loss"][role]
        assert 0 < m["heldout_loss"] < 20
        assert m["bytes"] == (out / role / "model.safetensors").stat().st_size
    acc = summary["acceptance"]
    assert acc["num_speculative_tokens"] == 4
    assert 0.0 <= acc["acceptance_rate"] <= 1.0
    assert 1.0 <= acc["mean_tokens_per_step"] <= 5.0
    assert acc["proposed"] == 4 * acc["steps"]
    assert returned["acceptance"] == acc


def test_fast_acceptance_equals_literal_simulation(micro_run):
    from transformers import AutoModelForCausalLM

    out, _ = micro_run
    target = AutoModelForCausalLM.from_pretrained(out / "target", dtype=torch.float32).eval()
    draft = AutoModelForCausalLM.from_pretrained(out / "draft", dtype=torch.float32).eval()
    torch.manual_seed(0)
    prompts = torch.randint(1, target.config.vocab_size, (3, 12))
    fast = tp.speculation_stats(target, draft, prompts, n_new=20, k=4)
    for i in range(prompts.size(0)):
        assert fast["_per_prompt"][i] == tp.simulate_speculation(target, draft, prompts[i], 20, 4)


def _micro_target(out):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(out / "target", dtype=torch.float32).eval()


def test_teacher_targets_match_the_teacher(micro_run):
    out, _ = micro_run
    target = _micro_target(out)
    torch.manual_seed(1)
    tokens = torch.randint(1, target.config.vocab_size, (300,))
    tt = tp.teacher_targets(target, tokens, seq_len=32, topk=4, device=torch.device("cpu"),
                            batch_windows=8)
    starts = list(range(0, 300 - 32, 32)) + list(range(16, 300 - 32, 32))
    assert tt.tokens.shape == (len(starts), 33) and tt.idx.shape == (len(starts), 32, 4)
    for w, s in enumerate(starts):
        assert torch.equal(tt.tokens[w].long(), tokens[s:s + 33])
    with torch.no_grad():
        probs = torch.softmax(target(input_ids=tt.tokens[:, :-1].long()).logits, dim=-1)
    top_p, top_i = probs.topk(4, dim=-1)
    assert torch.equal(tt.idx.long(), top_i)
    assert torch.allclose(tt.prob.float(), top_p, atol=1e-3)


def test_teacher_generate_is_greedy_decoding(micro_run):
    out, _ = micro_run
    target = _micro_target(out)
    tokens = torch.arange(1, 200) % target.config.vocab_size
    gt = tp.teacher_generate(target, tokens, n_seqs=3, prompt_len=8, n_new=10, topk=4,
                             device=torch.device("cpu"), seed=0, batch=2)
    assert gt.tokens.shape == (3, 18) and gt.idx.shape == (3, 17, 4)
    prompts = gt.tokens[:, :8].long()
    assert torch.equal(gt.tokens[:, 8:].long(), tp.greedy_decode(target, prompts, 10))
    # The teacher's top-1 at every generated position is the token it generated.
    assert torch.equal(gt.idx[:, 7:, 0].long(), gt.tokens[:, 8:].long())
    with torch.no_grad():
        probs = torch.softmax(target(input_ids=gt.tokens[:, :-1].long()).logits, dim=-1)
    assert torch.allclose(gt.prob.float(), probs.topk(4, dim=-1).values, atol=1e-3)


def test_distill_loss_is_kl_over_topk_and_rest():
    torch.manual_seed(0)
    s_logp = torch.log_softmax(torch.randn(5, 10), dim=-1)
    t = torch.softmax(2 * torch.randn(5, 10), dim=-1)
    # k = V: the plain cross-entropy to the teacher, KL plus the teacher's entropy.
    p, i = t.topk(10, dim=-1)
    full = -(t * s_logp).sum(-1).mean()
    assert torch.allclose(tp.distill_loss(s_logp, i, p), full, atol=1e-5)
    # k < V: the same over the k tokens and one bucket for the rest.
    p, i = t.topk(3, dim=-1)
    s_top = s_logp.gather(-1, i)
    ref = -((p * s_top).sum(-1) + (1 - p.sum(-1)) * torch.log(1 - s_top.exp().sum(-1))).mean()
    assert torch.allclose(tp.distill_loss(s_logp, i, p), ref, atol=1e-5)
    # Its gradient vanishes where the student equals the teacher (k + 1 buckets).
    logits = torch.log(t).clone().requires_grad_(True)
    tp.distill_loss(torch.log_softmax(logits, -1), i, p).backward()
    assert logits.grad[torch.arange(5)[:, None], i].abs().max() < 1e-6


def test_steps_from_matches():
    # Accept 2, reject; accept all 4 (bonus); reject at once; accept 1 then stop.
    m = [True, True, False, True, True, True, True, True, False, True, False] + [False] * 8
    assert tp._steps_from_matches(m, n_new=11, k=4) == [2, 4, 0, 1]
    assert tp._steps_from_matches([True] * 20, n_new=10, k=4) == [4, 4]


def test_corpus_order_and_split_are_deterministic():
    a = tp.collect_sources(max_files=50)
    b = tp.collect_sources(max_files=50)
    assert [f.name for f in a] == [f.name for f in b]
    assert [f.name for f in a] == sorted(f.name for f in a)
    train, held = tp.split_heldout(a)
    train2, held2 = tp.split_heldout(b)
    assert [f.name for f in held] == [f.name for f in held2] and held
    assert not {f.name for f in train} & {f.name for f in held}
    assert len(train) + len(held) == len(a)
