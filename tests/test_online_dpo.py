"""algos/online_dpo.py beyond its golden values: one round is dpo.py's loss on the pair of samples as the judge
orders it (a tie gives no gradient), training samples both completions from the policy and evaluation plays the
policy against the reference, and the flags; on a tiny character tokenizer and random Llamas of tests/tiny.py, the
sampler replaced by fixed completions where the test needs known ones. The loss is pinned by
tests/golden/online_dpo.online_dpo_loss.json, the whole script (judged by the verifier) by tests/test_runs.py; the
sampler and the judges it shares with nash_md.py are tested in tests/test_nash_md.py."""

import pytest
import torch
from datasets import Dataset
from tokenizers import decoders

import algos.online_dpo as online_dpo
from algos import dpo
from algos.online_dpo import Args, check_args, compute_loss, evaluate, load_judge, online_dpo_loss, prepare_dataset
from tests import tiny

PROMPTS = [{"prompt": "Q: 1+2\n"}, {"prompt": "Q: (3*4)-5\n"}, {"prompt": "Q: 7-2\n"}]
# per prompt: (y1, y2) with the verifier's scores 2 (right answer) > 1/2 (right step, wrong answer) > 0
SAMPLES = [("Answer: 3", "1 + 2 = 4\nAnswer: 4"),         # y1 wins
           ("3 * 4 = 12\n12 - 5 = 8\nAnswer: 8", "3 * 4 = 12\n12 - 5 = 7\nAnswer: 7"),  # y2 wins
           ("Answer: 6", "7 - 2 = 4\nAnswer: 4")]         # both wrong, no right step: a tie


@pytest.fixture(scope="module")
def tokenizer():
    """tests/tiny.py's, decoding to the text itself (its default decoder spaces the characters), for the verifier."""
    tokenizer = tiny.make_tokenizer(chat_template=None)
    tokenizer.backend_tokenizer.decoder = decoders.Fuse()
    return tokenizer


def indexed_rows(tokenizer, args):
    rows = prepare_dataset(Dataset.from_list(PROMPTS), tokenizer, len(tokenizer), args)
    return [{**row, "index": i} for i, row in enumerate(rows)]


def fixed_sampler(tokenizer, calls):
    """A stand-in for sample_completions: SAMPLES' y1 then y2 for each prompt (with EOS), recording the weights of the
    reference it was asked to sample with."""
    def sample(policy, ref_model, prompts, budgets, mixture_coefs, *args, **kwargs):
        calls.append(mixture_coefs)
        texts = [y1 for y1, _ in SAMPLES] + [y2 for _, y2 in SAMPLES]
        return [tokenizer(text, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id] for text in texts]
    return sample


def setup(tokenizer, **flags):
    """A training policy, a reference, the flags, the indexed rows of PROMPTS and the verifier (the default judge)."""
    args = Args(**flags)
    rows = indexed_rows(tokenizer, args)
    judge = load_judge(args, torch.float32, "cpu", [row["prompt_text"] for row in rows])
    return tiny.tiny_llama(tokenizer, 1).train(), tiny.tiny_llama(tokenizer, 2), args, rows, judge


def test_one_round_is_dpo_s_loss_on_the_judged_pair_and_a_tie_gives_nothing(tokenizer, monkeypatch):
    calls = []
    monkeypatch.setattr(online_dpo, "sample_completions", fixed_sampler(tokenizer, calls))
    policy, reference, args, rows, judge = setup(tokenizer, beta=0.5)
    loss, metrics, samples = compute_loss(policy, reference, judge, tokenizer, rows, 1, args, tokenizer.pad_token_id,
                                          0.0)
    assert calls == [[0.0] * 6]  # training: y1 and y2 both from the policy
    assert [s["probability"] for s in samples] == [1.0, 0.0]  # the verifier: y1 wins, then y2 wins
    ordered = [(SAMPLES[0][0], SAMPLES[0][1]), (SAMPLES[1][1], SAMPLES[1][0]), SAMPLES[2]]  # the tie: y1 first
    pairs = [{"prompt": p["prompt"], "chosen": w, "rejected": l} for p, (w, l) in zip(PROMPTS, ordered)]
    pair_rows = dpo.prepare_dataset(Dataset.from_list(pairs), tokenizer, len(tokenizer), dpo.Args())
    dpo_args = dpo.Args(beta=0.5)
    _, their_metrics = dpo.compute_loss(policy, reference, dpo.collate(pair_rows, tokenizer.pad_token_id), dpo_args)
    judged, _ = dpo.compute_loss(policy, reference, dpo.collate(pair_rows[:2], tokenizer.pad_token_id), dpo_args)
    torch.testing.assert_close(loss, judged * 2 / 3)  # the mean over 3 pairs, the tie's loss 0
    for key in ("rewards/chosen", "rewards/rejected", "rewards/margins", "logps/chosen", "logps/rejected"):
        torch.testing.assert_close(metrics[key], their_metrics[key], msg=key)
    assert metrics["rewards/ties"] == 1 and metrics["rewards/win_rate"] == 1.5  # y1 wins 1, loses 1, ties 1
    loss.backward()
    assert all(p.grad is not None for p in policy.parameters())


def test_a_round_of_ties_has_no_gradient(tokenizer, monkeypatch):
    monkeypatch.setattr(online_dpo, "sample_completions", lambda policy, ref, prompts, *a, **k: [
        tokenizer("Answer: 0", add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]] * len(prompts))
    policy, reference, args, rows, judge = setup(tokenizer)
    loss, metrics, _ = compute_loss(policy, reference, judge, tokenizer, rows, 1, args, tokenizer.pad_token_id, 0.0)
    assert loss.item() == 0 and metrics["rewards/ties"] == 3
    loss.backward()
    assert all(p.grad is None or not p.grad.any() for p in policy.parameters())


def test_evaluation_plays_the_policy_against_the_reference(tokenizer, monkeypatch):
    calls = []
    monkeypatch.setattr(online_dpo, "sample_completions", fixed_sampler(tokenizer, calls))
    policy, reference, args, rows, judge = setup(tokenizer, per_device_eval_batch_size=8)
    metrics = evaluate(policy, reference, judge, tokenizer, rows, args, tokenizer.pad_token_id, "cpu",
                       torch.autocast("cpu", enabled=False))
    assert calls == [[0.0] * 3 + [1.0] * 3]  # y2 from the reference
    assert metrics["eval/rewards/win_rate"] == pytest.approx(0.5) and policy.training


def test_the_loss_orders_nothing_itself():
    """online_dpo_loss takes the pair already ordered: it is dpo.py's loss (ε = 0) wherever there is no tie."""
    generator = torch.Generator().manual_seed(0)
    logps = [-50 * torch.rand(6, dtype=torch.float64, generator=generator) for _ in range(4)]
    ties = torch.tensor([False, True, False, False, True, False])
    ours = online_dpo_loss(*logps, ties, 0.7)
    theirs = dpo.dpo_loss(*logps, 0.7)
    torch.testing.assert_close(ours[0], torch.where(ties, 0.0, theirs[0]))
    torch.testing.assert_close(ours[1], theirs[1])
    torch.testing.assert_close(ours[2], theirs[2])


@pytest.mark.parametrize("overrides,message", [
    ({"beta": 0.0}, "--beta 0.0: must be > 0"),
    ({"temperature": 0.0}, "--temperature 0.0: must be > 0"),
    ({"judge": "model", "preference_model_path": None}, "--preference-model-path None: must be a preference model"),
])
def test_bad_arguments_are_errors(overrides, message):
    with pytest.raises(ValueError, match="invalid arguments") as error:
        check_args(Args(**overrides))
    assert message in str(error.value)
    check_args(Args(preference_model_path=None))  # the verifier, the default judge, needs no model
