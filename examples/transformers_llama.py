"""A tiny, randomly initialised Llama (no weights downloaded) through Hugging Face transformers with
flashinfer-jit attention over a packed ragged batch, checked against transformers' own SDPA attention run
one sequence at a time; then a tiny Gemma 2 (sliding-window layers and logit soft-capping: flashinfer-jit's
attention variants) against transformers' eager attention the same way.

    pip install 'flashinfer-jit[transformers]'
    python examples/transformers_llama.py

The integration is flashinfer_jit.transformers_attention: register() adds the attention function to
transformers' AttentionInterface; a batch is the sequences concatenated along one row of input_ids,
each restarting at position 0, with packed_kwargs(seq_lens) passed to the forward. Running it needs a
CUDA GPU; without one it says so and exits 0 (without transformers it exits 2).
"""
from __future__ import annotations

import sys

import torch

SEQ_LENS = [37, 1, 200, 129, 64, 300]  # ragged: not tile multiples, a length-1 sequence
RELATIVE_TOLERANCE = 2e-2  # of the largest reference logit, bf16 end to end


def use_attention(model: torch.nn.Module, name: str) -> None:
    setter = getattr(model, "set_attn_implementation", None)
    if setter is not None:
        setter(name)
    else:  # transformers before set_attn_implementation: the layers read the config at every forward
        model.config._attn_implementation = name


def compare(model: torch.nn.Module, reference_attention: str, vocab_size: int, name: str) -> bool:
    """Logits of SEQ_LENS packed through flashinfer-jit against `reference_attention` per sequence."""
    import flashinfer_jit.transformers_attention as fij_attention

    sequences = [torch.randint(0, vocab_size, (n,), device="cuda") for n in SEQ_LENS]
    use_attention(model, reference_attention)
    with torch.no_grad():
        reference = torch.cat([model(ids[None], use_cache=False).logits[0] for ids in sequences]).float()
    use_attention(model, fij_attention.register())
    packed = torch.cat(sequences)[None]
    position_ids = torch.cat([torch.arange(n, device="cuda") for n in SEQ_LENS])[None]
    with torch.no_grad():
        logits = model(packed, position_ids=position_ids, use_cache=False,
                       **fij_attention.packed_kwargs(SEQ_LENS)).logits[0].float()
    diff = (logits - reference).abs().nan_to_num(float("inf")).max().item()
    bound = RELATIVE_TOLERANCE * reference.abs().max().item()
    ok = diff <= bound
    print(f"{name} on a packed batch of {len(SEQ_LENS)} sequences {SEQ_LENS} on {torch.cuda.get_device_name()}: "
          f"max |logits - {reference_attention} logits| {diff:.3g} (bound {bound:.3g}): {'ok' if ok else 'MISMATCH'}")
    return ok


def gemma2() -> "bool | None":
    """Gemma 2: every other layer a 48-key sliding window, attention logits soft-capped at 50."""
    try:
        from transformers import Gemma2Config, Gemma2ForCausalLM
    except ImportError:
        print("this transformers has no Gemma 2: its check is skipped")
        return None
    torch.manual_seed(1)
    config = Gemma2Config(vocab_size=1024, hidden_size=1024, intermediate_size=2048, num_hidden_layers=2,
                          num_attention_heads=8, num_key_value_heads=2, head_dim=128, max_position_embeddings=1024,
                          sliding_window=48, attn_logit_softcapping=50.0, query_pre_attn_scalar=128)
    model = Gemma2ForCausalLM(config).to("cuda", torch.bfloat16).eval()
    return compare(model, "eager", config.vocab_size, "Gemma 2 (sliding window 48, soft-cap 50, bf16)")


def main() -> int:
    try:
        from transformers import LlamaConfig, LlamaForCausalLM
    except ImportError:
        print("this example needs transformers: pip install 'flashinfer-jit[transformers]'")
        return 2
    if not torch.cuda.is_available():
        print("running this example needs a CUDA GPU (flashinfer-jit's kernels run on NVIDIA GPUs); none found")
        return 0
    torch.manual_seed(0)
    # head_dim 1024 / 8 = 128, GQA group 4: both kernels' common case.
    config = LlamaConfig(vocab_size=1024, hidden_size=1024, intermediate_size=2048, num_hidden_layers=2,
                         num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=1024)
    model = LlamaForCausalLM(config).to("cuda", torch.bfloat16).eval()
    ok = compare(model, "sdpa", config.vocab_size, f"Llama ({config.num_hidden_layers} layers, "
                 f"{config.num_attention_heads} q / {config.num_key_value_heads} kv heads, head_dim "
                 f"{config.hidden_size // config.num_attention_heads}, bf16)")
    return 0 if ok and gemma2() is not False else 1


if __name__ == "__main__":
    sys.exit(main())
