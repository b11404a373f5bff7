"""One DPO training step of a Qwen2.5-0.5B-shaped model (random weights, from its config): tokens per
second and peak GPU memory, with and without the fused linear path, and TRL's DPOTrainer on the same
batch where TRL imports.

    python benchmarks/device/dpo_step.py --out OUT            # CUDA: bf16, 8 pairs of 1024 tokens
    python benchmarks/device/dpo_step.py --out OUT --dry-run  # CPU: a tiny model, 2 pairs of 32 tokens

Variants (the same policy, reference, batch, AdamW step and DPO loss, beta 0.1):
- `fused`: `kernels.linear_logprobs` on the model's last hidden states and `lm_head.weight`;
- `unfused`: `kernels.logprobs` on the full logits of the model's forward;
- `trl`: TRL's `DPOTrainer` (its default chunked log-prob path; gradient checkpointing off, as in the
  others; its completions carry one more token, the eos it appends), timed per optimizer step by a
  callback, on the same token ids through a word-level tokenizer whose words are the token ids.
Each step also runs the reference model (no gradient), as DPO without precomputed log-probs does.
Writes dpo_step.json and dpo_step.md to --out.
"""

import argparse
import copy
import json
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
import transformers

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repo root, for `kernels`
from kernels import linear_logprobs, logprobs

# Qwen/Qwen2.5-0.5B's config.json (the shapes that matter for speed and memory).
QWEN25_05B = dict(vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                  num_attention_heads=14, num_key_value_heads=2, max_position_embeddings=32768,
                  rope_theta=1000000.0, rms_norm_eps=1e-6, tie_word_embeddings=True)
TINY = dict(vocab_size=1000, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
BETA = 0.1


def make_batch(pairs, prompt_len, completion_len, vocab, device):
    """Random token ids: rows 0..pairs-1 chosen, pairs..2*pairs-1 rejected, each pair sharing its
    prompt; labels mask the prompt with -100 (the first label position is never scored anyway)."""
    gen = torch.Generator().manual_seed(0)
    # ids 0-2 are left to the tokenizer's unk, eos and pad for the TRL variant
    prompts = torch.randint(3, vocab, (pairs, prompt_len), generator=gen)
    completions = torch.randint(3, vocab, (2 * pairs, completion_len), generator=gen)
    ids = torch.cat([prompts.repeat(2, 1), completions], 1)
    labels = ids.clone()
    labels[:, :prompt_len] = -100
    return ids.to(device), labels.to(device), prompts, completions


def sequence_logps(model, ids, labels, fused):
    # algos/dpo.py's --fused-linear path (its forward_logits): the model's own forward with no logits kept. The
    # script itself is not imported: its tensorboard and tyro imports need more than a bare GPU image has.
    if fused:
        no_logits = torch.empty(0, dtype=torch.long, device=ids.device)
        hidden = model(input_ids=ids, output_hidden_states=True, logits_to_keep=no_logits).hidden_states[-1]
        return linear_logprobs(hidden[:, :-1], model.lm_head.weight, labels[:, 1:]).sum(-1)
    return logprobs(model(input_ids=ids).logits[:, :-1], labels[:, 1:]).sum(-1)


def dpo_step(policy, reference, optimizer, ids, labels, fused):
    with torch.no_grad():
        ref_chosen, ref_rejected = sequence_logps(reference, ids, labels, fused).chunk(2)
    chosen, rejected = sequence_logps(policy, ids, labels, fused).chunk(2)
    loss = -F.logsigmoid(BETA * ((chosen - ref_chosen) - (rejected - ref_rejected))).mean()
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss.item()  # a sync: the step is done when it returns


def build(config_kwargs, dtype, device):
    config = transformers.Qwen2Config(**config_kwargs)
    torch.manual_seed(0)
    with torch.device(device):
        model = transformers.AutoModelForCausalLM.from_config(config, dtype=dtype)
    return model


def peak_above(device, fn):
    """(result, peak memory above what was allocated before, in MiB) on CUDA; None for memory on CPU."""
    if device != "cuda":
        return fn(), None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    result = fn()
    torch.cuda.synchronize()
    return result, (torch.cuda.max_memory_allocated() - base) / 2**20


def run_ours(config_kwargs, dtype, device, batch, steps, fused):
    ids, labels = batch[:2]
    policy = build(config_kwargs, dtype, device)
    reference = copy.deepcopy(policy).requires_grad_(False).eval()
    optimizer = torch.optim.AdamW(policy.parameters(), lr=1e-6)
    dpo_step(policy, reference, optimizer, ids, labels, fused)  # warm-up: optimizer state, kernels compiled
    times, peaks, losses = [], [], []
    for _ in range(steps):
        start = time.perf_counter()
        loss, peak = peak_above(device, lambda: dpo_step(policy, reference, optimizer, ids, labels, fused))
        times.append(time.perf_counter() - start)
        peaks.append(peak)
        losses.append(loss)
    del policy, reference, optimizer
    return dict(step_s=sorted(times)[len(times) // 2], peak_step_mib=None if peaks[0] is None else max(peaks),
                first_loss=losses[0])


def word_tokenizer(vocab):
    """A tokenizer whose word "t<i>" is token i (0 unk, 1 eos, 2 pad): text made of such words
    tokenizes to exactly the ids of our batch, so TRL trains on the same tokens without a download."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    words = Tokenizer(models.WordLevel({f"t{i}": i for i in range(vocab)}, unk_token="t0"))
    words.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return transformers.PreTrainedTokenizerFast(tokenizer_object=words, unk_token="t0", eos_token="t1", pad_token="t2")


def run_trl(config_kwargs, dtype, device, batch, steps):
    try:
        import datasets
        from trl import DPOConfig, DPOTrainer
    except ImportError as error:
        return dict(skipped=f"trl does not import ({error})")
    _, _, prompts, completions = batch
    pairs = prompts.shape[0]
    text = lambda row: " ".join(f"t{i}" for i in row.tolist()) + " "  # noqa: E731  (trailing space: TRL appends eos)
    data = datasets.Dataset.from_dict({
        "prompt": [text(p) for p in prompts],
        "chosen": [text(c) for c in completions[:pairs]],
        "rejected": [text(c) for c in completions[pairs:]],
    })
    times, peaks = [], []

    class StepTimer(transformers.TrainerCallback):
        def on_step_begin(self, *_, **__):
            if device == "cuda":
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
                self.base = torch.cuda.memory_allocated()
            self.start = time.perf_counter()

        def on_step_end(self, *_, **__):
            if device == "cuda":
                torch.cuda.synchronize()
                peaks.append((torch.cuda.max_memory_allocated() - self.base) / 2**20)
            times.append(time.perf_counter() - self.start)

    policy = build(config_kwargs, dtype, device)
    reference = copy.deepcopy(policy).requires_grad_(False).eval()
    with tempfile.TemporaryDirectory() as output_dir:
        args = DPOConfig(output_dir=output_dir, per_device_train_batch_size=pairs, max_steps=steps + 1,
                         learning_rate=1e-6, beta=BETA, max_length=None, bf16=dtype == torch.bfloat16,
                         use_cpu=device != "cuda", report_to="none", save_strategy="no", logging_steps=1,
                         gradient_checkpointing=False, dataloader_num_workers=0, dataset_num_proc=None, seed=0)
        trainer = DPOTrainer(model=policy, ref_model=reference, args=args, train_dataset=data,
                             processing_class=word_tokenizer(config_kwargs["vocab_size"]), callbacks=[StepTimer()])
        trainer.train()
    del trainer, policy, reference
    times, peaks = times[1:], peaks[1:]  # the first step warms up, as for the other variants
    return dict(step_s=sorted(times)[len(times) // 2], peak_step_mib=max(peaks) if peaks else None)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="folder for dpo_step.json and dpo_step.md")
    parser.add_argument("--dry-run", action="store_true", help="CPU, a tiny model and batch: checks the code, not speed")
    parser.add_argument("--steps", type=int, default=3, help="timed steps per variant (after one warm-up step)")
    parser.add_argument("--variants", nargs="+", default=["fused", "unfused", "trl"])
    args = parser.parse_args()
    device = "cpu" if args.dry_run else "cuda"
    if device == "cuda" and not torch.cuda.is_available():
        sys.exit("dpo_step.py: no CUDA device; use --dry-run on a CPU")
    config_kwargs, dtype = (TINY, torch.float32) if args.dry_run else (QWEN25_05B, torch.bfloat16)
    pairs, prompt_len, completion_len = (2, 16, 16) if args.dry_run else (8, 512, 512)
    batch = make_batch(pairs, prompt_len, completion_len, config_kwargs["vocab_size"], device)
    tokens = 2 * pairs * (prompt_len + completion_len)
    results = {}
    for variant in args.variants:
        start = time.perf_counter()
        try:
            if variant == "trl":
                result = run_trl(config_kwargs, dtype, device, batch, args.steps)
            else:
                result = run_ours(config_kwargs, dtype, device, batch, args.steps, fused=variant == "fused")
        except Exception as error:  # one variant failing (out of memory, a TRL version change) must not hide the others
            result = dict(skipped=f"failed: {type(error).__name__}: {str(error)[:300]}")
        if "step_s" in result:
            result["tokens_per_s"] = tokens / result["step_s"]
        result["wall_s"] = time.perf_counter() - start
        results[variant] = result
        print(variant, json.dumps(result), flush=True)
        if device == "cuda":
            torch.cuda.empty_cache()
    setup = dict(model="Qwen2.5-0.5B config, random weights" if not args.dry_run else "tiny Qwen2 config (dry run)",
                 dtype=str(dtype), device=torch.cuda.get_device_name() if device == "cuda" else "cpu",
                 pairs=pairs, tokens_per_sequence=prompt_len + completion_len, tokens_per_step=tokens,
                 torch=torch.__version__, transformers=transformers.__version__)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "dpo_step.json").write_text(json.dumps(dict(setup=setup, results=results), indent=1))
    lines = [f"DPO step: {setup['model']}, {setup['dtype']}, {pairs} pairs x {prompt_len + completion_len} tokens, "
             f"{setup['device']}", "| variant | step s | tokens/s | peak above model+optimizer, MiB |", "|---|---|---|---|"]
    for variant, r in results.items():
        if "step_s" in r:
            peak = "-" if r.get("peak_step_mib") is None else f"{r['peak_step_mib']:.0f}"
            lines.append(f"| {variant} | {r['step_s']:.3f} | {r['tokens_per_s']:.0f} | {peak} |")
        else:
            lines.append(f"| {variant} | {r['skipped']} | | |")
    (out / "dpo_step.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
