"""A tiny, randomly initialised Llama (no weights downloaded) through Hugging Face transformers with
flashinfer-jit attention over a packed ragged batch, checked against transformers' own SDPA attention run
one sequence at a time.

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


def main() -> int:
    try:
        from transformers import LlamaConfig, LlamaForCausalLM
    except ImportError:
        print("this example needs transformers: pip install 'flashinfer-jit[transformers]'")
        return 2
    import flashinfer_jit.transformers_attention as fij_attention

    if not torch.cuda.is_available():
        print("running this example needs a CUDA GPU (flashinfer-jit's kernels run on NVIDIA GPUs); none found")
        return 0
    torch.manual_seed(0)
    # head_dim 1024 / 8 = 128, GQA group 4: both kernels' common case.
    config = LlamaConfig(vocab_size=1024, hidden_size=1024, intermediate_size=2048, num_hidden_layers=2,
                         num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=1024)
    model = LlamaForCausalLM(config).to("cuda", torch.bfloat16).eval()
    sequences = [torch.randint(0, config.vocab_size, (n,), device="cuda") for n in SEQ_LENS]

    use_attention(model, "sdpa")
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
    print(f"Llama ({config.num_hidden_layers} layers, {config.num_attention_heads} q / {config.num_key_value_heads} "
          f"kv heads, head_dim {config.hidden_size // config.num_attention_heads}, bf16) on a packed batch of "
          f"{len(SEQ_LENS)} sequences {SEQ_LENS} on {torch.cuda.get_device_name()}: max |logits - SDPA logits| "
          f"{diff:.3g} (bound {bound:.3g}): {'ok' if ok else 'MISMATCH'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
