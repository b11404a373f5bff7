"""Build the bundled arithmetic task from scratch (see README.md in this folder).

    python benchmarks/arith/build.py [--seed 0] [--out-dir benchmarks/arith]

1. a character-level tokenizer with BOS/EOS/pad and a chat template;
2. the base model: a tiny Llama trained on solutions in which each step's result is replaced by a
   near miss with probability --error-rate (later steps carry the wrong value on), so that it knows
   how but is sloppy: often wrong when sampled, less often when greedy;
3. data from the base model's own samples at temperature 1, graded by the verifier;
4. a preference model (sequence classification, initialised from the base model) trained in two
   stages: first to flag wrong steps in synthetic solutions (checking arithmetic is what a judge of this
   task needs, and a pairwise target alone never taught it), then on pairs of the base model's samples;
   its agreement with the verifier on the held-out pairs is reported.

Deterministic given --seed and --threads on one machine with one torch version (different CPUs can
round differently, which changes the sampled data but not its statistics).
"""

import copy
import json
import math
import random
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import tyro
from tokenizers import Tokenizer, decoders, models, processors
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM, LlamaForSequenceClassification, PreTrainedTokenizerFast

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # so that it also runs as a script
from benchmarks.arith import task
from benchmarks.arith.evaluate import generate
from benchmarks.arith.preference import format_comparison, preference_logits

# The template reproduces the standard format exactly: a user message becomes the prompt line
# "Q: ...\n" and an assistant message is the completion as is. It emits neither BOS nor EOS.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'user' %}{{ 'Q: ' + message['content'] + '\\n' }}"
    "{% elif message['role'] == 'assistant' %}{{ message['content'] }}"
    "{% else %}{{ raise_exception('only user and assistant messages are supported') }}"
    "{% endif %}{% endfor %}"
)


@dataclass
class Args:
    seed: int = 0
    """seeds the problems, the initialisations, the training order and the sampling"""
    out_dir: str = str(Path(__file__).resolve().parent)
    """where model/, preference_model/, data/ and build_summary.json go"""
    threads: int = 1
    """torch CPU threads (fixed, because the thread count can change the rounding; one thread is
    barely slower for a model this small and does not stall on a busy machine)"""
    error_rate: float = 0.1
    """probability that a step of a base-model training solution has a wrong result"""
    lm_steps: int = 1200
    """training steps of the base model at most (the horizon of its learning-rate schedule)"""
    target_greedy: float = 0.72
    """the base model stops early once its greedy accuracy on 256 validation problems (from the
    training split), checked every 50 steps in the second half of training, reaches this: late
    enough for a low learning rate (a sharp model), early enough to stay unreliable"""
    lm_batch_size: int = 64
    """fresh problems per base-model step"""
    lm_lr: float = 5e-3
    """peak learning rate of the base model (linear warm-up, cosine decay)"""
    n_train_prompts: int = 3000
    """training prompts of the preference data"""
    n_test_prompts: int = 300
    """test prompts of the preference data"""
    n_eval_prompts: int = 256
    """held-out prompts with answers (data/eval.jsonl)"""
    samples_per_prompt: int = 4
    """base-model samples per prompt at temperature 1"""
    verifier_steps: int = 2500
    """steps of the preference model's first stage: flagging the wrong steps of synthetic solutions"""
    verifier_error_rate: float = 0.3
    """probability that a step of a synthetic solution of the first stage is wrong"""
    pm_extra_layers: int = 2
    """decoder layers the preference model adds on top of the base model's (identity at initialisation), so that
    the verdicts on the steps, which the base model's layers compute last, can still be compared across solutions"""
    pm_steps: int = 1000
    """steps of the preference model's second stage: comparisons of the base model's samples"""
    pm_batch_size: int = 64
    """solutions (first stage) or comparisons (second stage) per preference-model step"""
    pm_lr: float = 1e-3
    """peak learning rate of both preference-model stages"""
    preference_model_only: bool = False
    """retrain only the preference model, from out_dir's model/ and data/ (the samples are the rows of
    data/unpaired_train.jsonl, in order), and update build_summary.json"""
    preference_model_init: str | None = None
    """with --preference-model-only: run the second stage's --pm-steps from this preference model (new auxiliary
    heads) instead of from a new step verifier, to train a built judge further"""


def build_tokenizer() -> PreTrainedTokenizerFast:
    """One token per printable ASCII character and newline; BOS is prepended, EOS never added."""
    specials = ["<pad>", "<s>", "</s>", "<unk>"]
    vocab = {t: i for i, t in enumerate(specials + ["\n"] + [chr(c) for c in range(32, 127)])}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))  # no merges: characters
    backend.add_special_tokens(specials)
    backend.decoder = decoders.Fuse()
    backend.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A $B", special_tokens=[("<s>", 1)])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                        unk_token="<unk>", model_max_length=256)
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def noisy_solution(rng: random.Random, operands: list[int], ops: list[str], error_rate: float) -> str:
    """A solution in which each result is, with probability error_rate, off by 1, 2 or 10."""
    steps, value = [], operands[0]
    for op, b in zip(ops, operands[1:]):
        c = task.apply(value, op, b)
        if rng.random() < error_rate:
            delta = rng.choice([1, 2, 10]) * rng.choice([-1, 1])
            c = c + delta if c + delta >= 0 else c - delta
        steps.append((value, op, b, c))
        value = c
    return task.format_solution(steps)


def lm_batch(tokenizer, prompts: list[str], completions: list[str]) -> dict[str, torch.Tensor]:
    """BOS + prompt + completion + EOS, right-padded; the loss covers the completion and EOS.
    Tokenising prompt and completion apart is exact with a character-level tokenizer."""
    rows = []
    for prompt, completion in zip(prompts, completions):
        p = tokenizer(prompt).input_ids
        c = tokenizer(completion, add_special_tokens=False).input_ids + [tokenizer.eos_token_id]
        rows.append((p + c, [-100] * len(p) + c))
    width = max(len(ids) for ids, _ in rows)
    pad = lambda x, value: x + [value] * (width - len(x))
    return {
        "input_ids": torch.tensor([pad(ids, tokenizer.pad_token_id) for ids, _ in rows]),
        "attention_mask": torch.tensor([pad([1] * len(ids), 0) for ids, _ in rows]),
        "labels": torch.tensor([pad(labels, -100) for _, labels in rows]),
    }


def warmup_cosine(steps: int):
    warmup = max(1, steps // 20)
    return lambda s: min(1.0, (s + 1) / warmup) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * s / steps)))


def optimizer_step(loss: torch.Tensor, optimizer, scheduler, parameters) -> None:
    """Backward, clip the gradient norm to 1, step, advance the schedule, clear the gradients."""
    loss.backward()
    torch.nn.utils.clip_grad_norm_(parameters, 1.0)
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad()


def greedy_accuracy(model, tokenizer, prompts: list[str]) -> float:
    model.eval()
    completions = generate(model, tokenizer, prompts, temperature=0.0)
    model.train()
    return sum(task.grade(p, c).answer_correct for p, c in zip(prompts, completions)) / len(prompts)


def train_base_model(args: Args, tokenizer) -> LlamaForCausalLM:
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=128, intermediate_size=384, num_hidden_layers=4,
        num_attention_heads=4, max_position_embeddings=256, tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )
    model = LlamaForCausalLM(config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lm_lr, betas=(0.9, 0.95), weight_decay=0.1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(args.lm_steps))
    rng = random.Random(args.seed + 1)
    validation = task.sample_distinct_prompts(random.Random(args.seed + 2), 256, "train")
    model.train()
    for step in range(args.lm_steps):
        prompts, completions = [], []
        while len(prompts) < args.lm_batch_size:
            operands, ops = task.sample_problem(rng)
            q = task.question(operands, ops)
            if task.split_of(q) == "train":  # held-out problems are never seen
                prompts.append(task.format_prompt(q))
                completions.append(noisy_solution(rng, operands, ops, args.error_rate))
        loss = model(**lm_batch(tokenizer, prompts, completions)).loss
        optimizer_step(loss, optimizer, scheduler, model.parameters())
        if (step + 1) % 50 == 0:
            accuracy = greedy_accuracy(model, tokenizer, validation) if step + 1 >= args.lm_steps // 2 else math.nan
            print(f"base model step {step + 1}: loss {loss.item():.4f}, validation greedy accuracy {accuracy:.3f}", flush=True)
            if accuracy >= args.target_greedy:
                break
    return model.eval()


def write_jsonl(path: Path, rows: list[dict]) -> None:
    with open(path, "w") as f:
        f.writelines(json.dumps(row) + "\n" for row in rows)


def make_datasets(rng: random.Random, samples: dict[str, list[str]]) -> dict[str, list[dict]]:
    """Pairs, unpaired, lists and step pairs from k graded samples per prompt."""
    out = {"pairs": [], "unpaired": [], "lists": [], "steps": []}
    for prompt, completions in samples.items():
        grades = [task.grade(prompt, c) for c in completions]
        right = [c for c, g in zip(completions, grades) if g.correct]
        wrong = [c for c, g in zip(completions, grades) if not g.answer_correct]
        if right and wrong:
            out["pairs"].append({"prompt": prompt, "chosen": rng.choice(right), "rejected": rng.choice(wrong)})
        out["unpaired"] += [{"prompt": prompt, "completion": c, "label": g.correct} for c, g in zip(completions, grades)]
        if len({g.score for g in grades}) > 1:  # a list of equal scores carries no ranking
            out["lists"].append({"prompt": prompt, "completions": completions, "scores": [g.score for g in grades]})
        step = step_pair(rng, prompt, completions)
        if step is not None:
            out["steps"].append(step)
    return out


def step_pair(rng: random.Random, prompt: str, completions: list[str]) -> dict | None:
    """The first wrong step of a sample against a correct step of another sample at that point.
    The steps before a first wrong step are the true steps, so the two samples share them."""
    first_wrong = [(task.check_steps(prompt, c) + [False]).index(False) for c in completions]
    n_steps = len(task.parse_problem(prompt)[1])
    order = list(range(len(completions)))
    rng.shuffle(order)
    for r in order:
        lines = completions[r].split("\n")
        k = first_wrong[r]
        if k == n_steps or k >= len(lines) - 1:  # no wrong step, or it is the last line (no "\n")
            continue
        good = [i for i in order if first_wrong[i] > k]
        if good:
            return {"prompt": prompt, "initial_reason_steps": "".join(line + "\n" for line in lines[:k]),
                    "chosen": completions[good[0]].split("\n")[k] + "\n", "rejected": lines[k] + "\n"}
    return None


def line_ends(prompt: str, completion: str) -> list[tuple[int, bool, bool]]:
    """For each line of a completion: the character offset of its end (its newline, or the end of the text),
    whether the line is wrong (a step, or the answer line of a solution that is not fully correct) and whether
    any line so far is."""
    verdicts, correct = task.check_steps(prompt, completion), task.grade(prompt, completion).correct
    out, offset, wrong_so_far = [], 0, False
    for k, line in enumerate(completion.split("\n")):
        offset += len(line)
        wrong = not verdicts[k] if k < len(verdicts) else not correct
        wrong_so_far |= wrong
        out.append((offset, wrong, wrong_so_far))
        offset += 1
    return out


def comparison_starts(tokenizer, prompt: str, a: str) -> tuple[int, int]:
    """The token indices where `a` and `b` start in the preference model's input (one token per character
    after BOS)."""
    text = format_comparison(prompt, "\x00", "\x01")  # where a and b go
    a_start = len(tokenizer(text[:text.index("\x00")]).input_ids)
    return a_start, a_start + len(a) + text.index("\x01") - text.index("\x00") - 1


def bce(logits: torch.Tensor, targets) -> torch.Tensor:
    return torch.nn.functional.binary_cross_entropy_with_logits(logits, torch.as_tensor(targets, dtype=logits.dtype))


def train_step_verifier(args: Args, model_dir: Path, tokenizer) -> LlamaForSequenceClassification:
    """Stage 1: the base model with a score head that reads, at the end of each step line of a synthetic
    solution (a training problem, each step wrong with probability --verifier-error-rate), the log-odds that
    this step is wrong. A label for every line gives the dense signal that checking arithmetic takes to learn."""
    model = LlamaForSequenceClassification.from_pretrained(model_dir, num_labels=1)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.pm_lr, weight_decay=0.0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(args.verifier_steps))
    rng = random.Random(args.seed + 5)
    model.train()
    for step in range(args.verifier_steps):
        texts, positions, labels = [], [], []
        while len(texts) < args.pm_batch_size:
            operands, ops = task.sample_problem(rng)
            question = task.question(operands, ops)
            if task.split_of(question) != "train":
                continue
            prompt = task.format_prompt(question)
            completion = noisy_solution(rng, operands, ops, args.verifier_error_rate)
            start = len(tokenizer(prompt).input_ids)  # one token per character after BOS
            for offset, wrong, _ in line_ends(prompt, completion)[:len(ops)]:  # the step lines
                positions.append((len(texts), start + offset))
                labels.append(float(wrong))
            texts.append(prompt + completion)
        hidden = model.model(**tokenizer(texts, padding=True, return_tensors="pt")).last_hidden_state
        rows, columns = torch.tensor(positions).T
        loss = bce(model.score(hidden[rows, columns])[:, 0], labels)
        optimizer_step(loss, optimizer, scheduler, model.parameters())
        if step % 100 == 0 or step == args.verifier_steps - 1:
            print(f"step verifier step {step}: loss {loss.item():.4f}", flush=True)
    return model.eval()


def train_preference_model(args: Args, verifier: LlamaForSequenceClassification, tokenizer,
                           samples: dict[str, list[str]]) -> LlamaForSequenceClassification:
    """Stage 2: the verifier's layers plus --pm-extra-layers new ones and a new score head, trained on all ordered
    pairs of distinct samples of a training prompt with the verifier's verdict as a soft target (1 if `a` scores
    higher, 0 if lower, 1/2 on a tie; both orders are in). Two auxiliary heads, dropped afterwards, keep the
    signal dense: at each line end of both solutions, whether that solution has gone wrong so far; at every token
    of `b`, whether `a` is wrong (which teaches the positions of `b` to look back at `a`)."""
    comparisons = []
    for prompt, completions in samples.items():
        scores = [task.grade(prompt, c).score for c in completions]
        for i, (a, sa) in enumerate(zip(completions, scores)):
            for j, (b, sb) in enumerate(zip(completions, scores)):
                if i != j:
                    comparisons.append((prompt, a, b, 1.0 if sa > sb else 0.0 if sa < sb else 0.5))
    if args.preference_model_init is not None:
        model, config = verifier, verifier.config
    else:
        config = copy.deepcopy(verifier.config)
        config.num_hidden_layers += args.pm_extra_layers
        model = LlamaForSequenceClassification(config)
        state = {k: v for k, v in verifier.state_dict().items() if not k.startswith("score.")}
        assert not model.load_state_dict(state, strict=False).unexpected_keys
        with torch.no_grad():  # a new layer adds nothing to the residual stream until trained
            for layer in model.model.layers[verifier.config.num_hidden_layers:]:
                layer.self_attn.o_proj.weight.zero_()
                layer.mlp.down_proj.weight.zero_()
    wrong_so_far_head, other_wrong_head = torch.nn.Linear(config.hidden_size, 1), torch.nn.Linear(config.hidden_size, 1)
    parameters = [*model.parameters(), *wrong_so_far_head.parameters(), *other_wrong_head.parameters()]
    optimizer = torch.optim.AdamW(parameters, lr=args.pm_lr, weight_decay=0.0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(args.pm_steps))
    rng = random.Random(args.seed + 3)
    model.train()
    for step in range(args.pm_steps):
        batch = rng.sample(comparisons, args.pm_batch_size)
        enc = tokenizer([format_comparison(p, a, b) for p, a, b, _ in batch], padding=True, return_tensors="pt")
        hidden = model.model(**enc).last_hidden_state
        last = enc.attention_mask.sum(1) - 1  # right padding
        loss = bce(model.score(hidden[torch.arange(len(batch)), last])[:, 0], [t for *_, t in batch])

        positions, labels, b_mask, a_wrong = [], [], torch.zeros(enc.input_ids.shape, dtype=torch.bool), []
        for row, (prompt, a, b, _) in enumerate(batch):
            a_start, b_start = comparison_starts(tokenizer, prompt, a)
            for start, completion in ((a_start, a), (b_start, b)):
                for offset, _, wrong_so_far in line_ends(prompt, completion):
                    positions.append((row, start + offset))
                    labels.append(float(wrong_so_far))
            b_mask[row, b_start:last[row] + 1] = True
            a_wrong.append(float(not task.grade(prompt, a).correct))
        rows, columns = torch.tensor(positions).T
        loss = loss + bce(wrong_so_far_head(hidden[rows, columns])[:, 0], labels)
        loss = loss + bce(other_wrong_head(hidden[b_mask])[:, 0], torch.tensor(a_wrong)[:, None].expand_as(b_mask)[b_mask])
        optimizer_step(loss, optimizer, scheduler, parameters)
        if step % 50 == 0 or step == args.pm_steps - 1:
            print(f"preference model step {step}: loss {loss.item():.4f}", flush=True)
    return model.eval()


@torch.no_grad()
def agreement(model, tokenizer, pairs: list[dict]) -> float:
    """Fraction of held-out pairs, in both orders, where the model agrees with the verifier."""
    prompts, chosen, rejected = ([p[key] for p in pairs] for key in ("prompt", "chosen", "rejected"))
    forward = preference_logits(model, tokenizer, prompts, chosen, rejected)
    backward = preference_logits(model, tokenizer, prompts, rejected, chosen)
    return ((forward > 0).float().mean().item() + (backward < 0).float().mean().item()) / 2


def read_jsonl(path: Path) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f]


def build_base_model_and_data(args: Args, out: Path) -> dict:
    """Steps 1-3: tokenizer, base model, data. Returns the summary's entries."""
    start = time.time()
    rng = random.Random(args.seed)
    prompts = {split: task.sample_distinct_prompts(rng, n, split) for split, n in
               [("eval", args.n_eval_prompts), ("test", args.n_test_prompts), ("train", args.n_train_prompts)]}

    tokenizer = build_tokenizer()
    for name in ("model", "preference_model"):  # saved before use: padding calls change its state
        tokenizer.save_pretrained(out / name)
    model = train_base_model(args, tokenizer)
    model.save_pretrained(out / "model")
    print(f"base model: {model.num_parameters()} parameters, {time.time() - start:.0f} s", flush=True)

    datasets, sizes = {}, {}
    k = args.samples_per_prompt
    for split in ("train", "test"):
        texts = generate(model, tokenizer, [p for p in prompts[split] for _ in range(k)], temperature=1.0)
        samples = {p: texts[i * k:(i + 1) * k] for i, p in enumerate(prompts[split])}
        datasets |= {f"{name}_{split}": rows for name, rows in make_datasets(rng, samples).items()}
        datasets[f"prompts_{split}"] = [{"prompt": p} for p in prompts[split]]
    datasets["eval"] = [{"prompt": p, "answer": task.solve(*task.parse_problem(p))[-1][3]} for p in prompts["eval"]]
    # the chat-template path: the first test pairs as message lists
    datasets["pairs_conversational_test"] = [
        {"prompt": [{"role": "user", "content": r["prompt"][len("Q: "):-1]}],
         "chosen": [{"role": "assistant", "content": r["chosen"]}],
         "rejected": [{"role": "assistant", "content": r["rejected"]}]} for r in datasets["pairs_test"][:50]]
    for name, rows in datasets.items():
        write_jsonl(out / "data" / f"{name}.jsonl", rows)
        sizes[name] = len(rows)
    for split in ("train", "test"):
        sizes[f"unpaired_{split}_desirable"] = sum(r["label"] for r in datasets[f"unpaired_{split}"])
    print(f"data: {sizes}, {time.time() - start:.0f} s", flush=True)
    return {"base_model_parameters": model.num_parameters(), "sizes": sizes,
            "base_model_and_data_seconds": round(time.time() - start)}


def build_preference_model(args: Args, out: Path) -> dict:
    """Step 4, from what steps 1-3 wrote (so that it can be rerun alone). Returns the summary's entries."""
    start = time.time()
    torch.manual_seed(args.seed + 4)  # the score head's initialisation, whatever ran before
    tokenizer = AutoTokenizer.from_pretrained(out / "model")
    samples = {}
    for row in read_jsonl(out / "data" / "unpaired_train.jsonl"):
        samples.setdefault(row["prompt"], []).append(row["completion"])
    assert tokenizer.padding_side == "right"  # both stages index tokens from the left and read the last non-pad one
    if args.preference_model_init is not None:
        verifier = LlamaForSequenceClassification.from_pretrained(args.preference_model_init)
    else:
        verifier = train_step_verifier(args, out / "model", tokenizer)
        print(f"step verifier: {time.time() - start:.0f} s", flush=True)
    preference_model = train_preference_model(args, verifier, tokenizer, samples)
    preference_model.save_pretrained(out / "preference_model")
    return {"preference_model_agreement": agreement(preference_model, tokenizer, read_jsonl(out / "data" / "pairs_test.jsonl")),
            "preference_model_seconds": round(time.time() - start)}


def main(args: Args) -> None:
    if args.preference_model_init is not None and not args.preference_model_only:
        sys.exit("error: --preference-model-init trains a built judge further: add --preference-model-only (a new "
                 "base model would not match it)")
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    out = Path(args.out_dir)
    (out / "data").mkdir(parents=True, exist_ok=True)
    if args.preference_model_only:
        summary = json.loads((out / "build_summary.json").read_text())
        summary["args"] = asdict(args) | {"preference_model_only": False}
    else:
        summary = {"args": asdict(args)} | build_base_model_and_data(args, out)
    summary |= build_preference_model(args, out)
    summary["args"].pop("out_dir")  # where it was built is not part of what was built
    (out / "build_summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main(tyro.cli(Args))
