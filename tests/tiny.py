"""The tiny assets the tests of algos/ share, built here so that no test needs downloaded ones: a character-level
tokenizer like the bundled model's (<pad>, <s>, </s>, <unk> at ids 0-3, then one token per character; BOS written
when special tokens are added) and a random two-layer Llama on its vocabulary, in eval mode."""

import torch
from tokenizers import Tokenizer, models, processors
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

CHARS = "0123456789+-*()=: \nQAnswer"
# the bundled model's convention: the template writes neither BOS nor EOS
PLAIN_TEMPLATE = ("{% for m in messages %}{% if m['role'] == 'user' %}{{ 'Q: ' + m['content'] + '\\n' }}"
                  "{% else %}{{ m['content'] }}{% endif %}{% endfor %}")
# a Llama-style template that writes BOS at the start and EOS after each assistant turn
SPECIAL_TEMPLATE = ("{{ bos_token }}{% for m in messages %}{% if m['role'] == 'user' %}"
                    "{{ 'Q: ' + m['content'] + '\\n' }}{% else %}{{ m['content'] + eos_token }}{% endif %}{% endfor %}")


def make_tokenizer(chat_template=PLAIN_TEMPLATE, chars=CHARS):
    """The character tokenizer over `chars`; chat_template=None leaves it without a chat template."""
    vocab = {token: i for i, token in enumerate(["<pad>", "<s>", "</s>", "<unk>", *dict.fromkeys(chars)])}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    backend.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>",
                                        pad_token="<pad>", unk_token="<unk>")
    tokenizer.chat_template = chat_template
    return tokenizer


def llama_config(tokenizer, **overrides):
    """A two-layer Llama's config on the tokenizer's vocabulary and special tokens; overrides replace any field."""
    return LlamaConfig(**{"vocab_size": len(tokenizer), "hidden_size": 32, "intermediate_size": 64,
                          "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
                          "max_position_embeddings": 128, "bos_token_id": tokenizer.bos_token_id,
                          "eos_token_id": tokenizer.eos_token_id, "pad_token_id": tokenizer.pad_token_id, **overrides})


def tiny_llama(tokenizer, seed=0, **overrides):
    """A random LlamaForCausalLM of llama_config(tokenizer, **overrides), initialised after torch.manual_seed(seed),
    in eval mode."""
    torch.manual_seed(seed)
    return LlamaForCausalLM(llama_config(tokenizer, **overrides)).eval()


def naive_logp(model, prompt_ids: list[int], completion_ids: list[int]) -> float:
    """The summed log-probs of a completion after its prompt, by a float64 log-softmax over the whole sequence:
    the slow, obvious computation the scripts' batched log-probs are checked against."""
    sequence = torch.tensor([prompt_ids + completion_ids])
    logp = model(sequence).logits.double().log_softmax(-1)[0, :-1].gather(-1, sequence[0, 1:, None])
    return logp[len(prompt_ids) - 1 :].sum().item()
