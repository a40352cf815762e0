"""The open_clip text tower as transformers' `CLIPTextModel` + `CLIPTokenizer`, for a
diffusers pipeline export, keeping latentforge's token semantics.

The weight mapping is the one SD-2's conversion used (diffusers
scripts/convert_original_stable_diffusion_to_diffusers.py, `convert_open_clip_checkpoint`):

    token_embedding / positional_embedding     text_model.embeddings.{token,position}_embedding
    resblocks.i.ln_1 / ln_2                    encoder.layers.i.layer_norm1 / layer_norm2
    resblocks.i.attn.in_proj_{weight,bias}     split in three: self_attn.{q,k,v}_proj
    resblocks.i.attn.out_proj                  self_attn.out_proj
    resblocks.i.mlp.c_fc / c_proj              mlp.fc1 / fc2
    ln_final                                   text_model.final_layer_norm

The penultimate layer (text.layer="penultimate", SD-2's choice) is kept by giving the
CLIPTextModel one layer less, as SD-2's text_encoder/config.json does (23 of ViT-H-14's 24
layers): its last_hidden_state is then ln_final(output of layer L-1), exactly
`TextEncoder.encode`'s tokens, and StableDiffusionPipeline uses last_hidden_state when
clip_skip is None. (With clip_skip it would take hidden_states[-(clip_skip + 1)] and apply
final_layer_norm itself: a second way to reach the same layer, not needed here.)

The tokenizer is open_clip's BPE: its vocabulary and merges written as vocab.json and
merges.txt, the special tokens under transformers' names, and "!" (id 0) as the padding
token, because open_clip pads with 0 (SD-2's tokenizer does the same). One consequence,
shared with SD-2's tokenizer: a "!" in a prompt is read as the padding token.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any

import torch

from latentforge.data.text import TextEncoder

SOT, EOT = "<|startoftext|>", "<|endoftext|>"  # transformers' names for open_clip's <start_of_text> etc.


def clip_text_model(enc: TextEncoder) -> Any:
    """A transformers CLIPTextModel computing `enc`'s token sequence (fp32, eval mode)."""
    from transformers import CLIPTextConfig, CLIPTextModel

    m = enc.model
    blocks = m.transformer.resblocks
    b0 = blocks[0]
    if not isinstance(b0.attn, torch.nn.MultiheadAttention):
        raise ValueError(f"text.model: {enc.cfg.model!r} uses {type(b0.attn).__name__} attention; the conversion "
                         f"to CLIPTextModel handles open_clip's nn.MultiheadAttention blocks")
    if not isinstance(getattr(b0, "ls_1", torch.nn.Identity()), torch.nn.Identity):
        raise ValueError(f"text.model: {enc.cfg.model!r} uses layer scale, which CLIPTextModel does not have")
    act = "quick_gelu" if type(b0.mlp.gelu).__name__ == "QuickGELU" else "gelu"
    layers = len(blocks) - (1 if enc.layer == "penultimate" else 0)
    config = CLIPTextConfig(vocab_size=m.token_embedding.num_embeddings, hidden_size=enc.width,
                            intermediate_size=b0.mlp.c_fc.out_features, num_hidden_layers=layers,
                            num_attention_heads=b0.attn.num_heads, max_position_embeddings=enc.context_length,
                            hidden_act=act, layer_norm_eps=m.ln_final.eps, projection_dim=enc.pooled_dim,
                            bos_token_id=49406, eos_token_id=49407, pad_token_id=0)
    sd: dict[str, torch.Tensor] = {
        "text_model.embeddings.token_embedding.weight": m.token_embedding.weight,
        "text_model.embeddings.position_embedding.weight": m.positional_embedding,
        "text_model.final_layer_norm.weight": m.ln_final.weight,
        "text_model.final_layer_norm.bias": m.ln_final.bias,
    }
    for i, blk in enumerate(blocks[:layers]):
        p = f"text_model.encoder.layers.{i}."
        q, k, v = blk.attn.in_proj_weight.chunk(3)  # (3D, D) -> three (D, D)
        qb, kb, vb = blk.attn.in_proj_bias.chunk(3)
        sd.update({
            p + "self_attn.q_proj.weight": q, p + "self_attn.k_proj.weight": k, p + "self_attn.v_proj.weight": v,
            p + "self_attn.q_proj.bias": qb, p + "self_attn.k_proj.bias": kb, p + "self_attn.v_proj.bias": vb,
            p + "self_attn.out_proj.weight": blk.attn.out_proj.weight, p + "self_attn.out_proj.bias": blk.attn.out_proj.bias,
            p + "layer_norm1.weight": blk.ln_1.weight, p + "layer_norm1.bias": blk.ln_1.bias,
            p + "layer_norm2.weight": blk.ln_2.weight, p + "layer_norm2.bias": blk.ln_2.bias,
            p + "mlp.fc1.weight": blk.mlp.c_fc.weight, p + "mlp.fc1.bias": blk.mlp.c_fc.bias,
            p + "mlp.fc2.weight": blk.mlp.c_proj.weight, p + "mlp.fc2.bias": blk.mlp.c_proj.bias,
        })
    model = CLIPTextModel(config)
    # transformers 5 names the keys without the "text_model." prefix its checkpoints carry.
    strip = not any(k.startswith("text_model.") for k in model.state_dict())
    model.load_state_dict({(k.removeprefix("text_model.") if strip else k): v.detach().float().cpu().clone()
                           for k, v in sd.items()}, strict=True)
    return model.eval()


def clip_tokenizer(enc: TextEncoder) -> Any:
    """A transformers CLIPTokenizer giving the same ids as `enc.tokenize` (see the docstring)."""
    from transformers import CLIPTokenizer

    tok = enc.tokenizer
    if not hasattr(tok, "encoder") or not hasattr(tok, "bpe_ranks"):
        raise ValueError(f"text.model: {enc.cfg.model!r} uses a {type(tok).__name__}; the conversion handles "
                         f"open_clip's BPE SimpleTokenizer")
    rename = {"<start_of_text>": SOT, "<end_of_text>": EOT}
    vocab = {rename.get(k, k): v for k, v in tok.encoder.items()}
    merges = [" ".join(pair) for pair, _ in sorted(tok.bpe_ranks.items(), key=lambda kv: kv[1])]
    with tempfile.TemporaryDirectory() as d:
        (Path(d) / "vocab.json").write_text(json.dumps(vocab))
        (Path(d) / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
        return CLIPTokenizer(str(Path(d) / "vocab.json"), str(Path(d) / "merges.txt"), bos_token=SOT,
                             eos_token=EOT, unk_token=EOT, pad_token="!", model_max_length=enc.context_length)
