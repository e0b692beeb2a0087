"""Tiny checkpoints built locally (``from_config`` + ``save_pretrained``, never a hub download)."""

import functools
import math
import os

import torch
from torch import nn
from transformers import PretrainedConfig, PreTrainedModel


def _llama(tie=False, hidden=64, layers=2, vocab=128, inter=None, kv=2):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=inter or 2 * hidden, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=kv, max_position_embeddings=64, tie_word_embeddings=tie,
    )
    return LlamaForCausalLM(cfg)


def _t5():
    from transformers import T5Config, T5ForConditionalGeneration

    cfg = T5Config(vocab_size=128, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_decoder_layers=2, num_heads=4)
    return T5ForConditionalGeneration(cfg)


def _mixtral():
    from transformers import MixtralConfig, MixtralForCausalLM

    cfg = MixtralConfig(
        vocab_size=128, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2, max_position_embeddings=64,
    )
    return MixtralForCausalLM(cfg)


def _deepseek_v3():
    """DeepSeek-V3-style MoE: ``e_score_correction_bias`` is a persistent plain-tensor buffer in the checkpoint."""
    from transformers import DeepseekV3Config, DeepseekV3ForCausalLM

    cfg = DeepseekV3Config(
        vocab_size=128, hidden_size=32, intermediate_size=64, moe_intermediate_size=16, num_hidden_layers=2,
        first_k_dense_replace=1, num_attention_heads=4, num_key_value_heads=4, n_routed_experts=4,
        num_experts_per_tok=2, n_group=1, topk_group=1, n_shared_experts=1, q_lora_rank=16, kv_lora_rank=16,
        qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=8, max_position_embeddings=64,
    )
    model = DeepseekV3ForCausalLM(cfg)
    for name, buf in model.named_buffers():
        if name.endswith("e_score_correction_bias"):
            buf.copy_(torch.linspace(-0.5, 0.5, buf.numel()))
    return model


def _llava():
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    vision = CLIPVisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, image_size=28,
        patch_size=14, projection_dim=32,
    )
    text = LlamaConfig(
        vocab_size=160, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64,
    )
    return LlavaForConditionalGeneration(LlavaConfig(vision_config=vision, text_config=text, image_token_index=150))


@functools.cache
def keep_fp32_class():
    """A Llama whose ``down_proj`` is loaded as float32 whatever the load dtype (``_strict``: bf16 included). Made on
    first use: importing the Llama module at import time would undo the worker's --relabel."""
    from transformers import LlamaForCausalLM

    class LlamaKeepFp32ForCausalLM(LlamaForCausalLM):
        _keep_in_fp32_modules = _keep_in_fp32_modules_strict = ["down_proj"]

    return LlamaKeepFp32ForCausalLM


class RootBufferConfig(PretrainedConfig):
    model_type = "hf_fsdp_loadfix_root_buffer"

    def __init__(self, hidden=32, vocab=64, **kwargs):
        self.hidden, self.vocab = hidden, vocab
        super().__init__(**kwargs)


def _root_scale(config):
    return torch.exp(-math.log(100.0) * torch.arange(config.hidden, dtype=torch.float32) / config.hidden)


class RootBufferModel(PreTrainedModel):
    """A non-persistent buffer on the top-level module (covered by ``_init_weights``) and a persistent plain
    buffer saved in the checkpoint: the shapes upstream 5.4-5.23 get wrong on non-rank-0."""

    config_class = RootBufferConfig
    base_model_prefix = "root_buffer"

    def __init__(self, config):
        super().__init__(config)
        self.embed = nn.Embedding(config.vocab, config.hidden)
        self.proj = nn.Linear(config.hidden, config.vocab)
        self.register_buffer("scale", _root_scale(config), persistent=False)
        self.register_buffer("bias_table", torch.zeros(config.vocab), persistent=True)
        self.post_init()

    def _init_weights(self, module):
        if isinstance(module, RootBufferModel):
            with torch.no_grad():
                module.scale.copy_(_root_scale(module.config))
        elif isinstance(module, (nn.Linear, nn.Embedding)) and not getattr(module.weight, "_is_hf_initialized", False):
            module.weight.data.normal_(0.0, 0.02)

    def get_input_embeddings(self):
        return self.embed

    def get_output_embeddings(self):
        return None

    def forward(self, input_ids, **kwargs):
        from transformers.modeling_outputs import CausalLMOutput

        hidden = (self.embed(input_ids) * self.scale).to(self.proj.weight.dtype)
        return CausalLMOutput(logits=self.proj(hidden) + self.bias_table)


class RandomBufferModel(RootBufferModel):
    """A non-persistent buffer no rank can recompute to rank 0's value (``_init_weights`` draws it at random, and
    the worker seeds each rank differently): the shape of remote-code buffers that need HF_FSDP_LOADFIX_BUFFERS."""

    def __init__(self, config):
        super().__init__(config)
        self.register_buffer("noise", torch.rand(config.hidden), persistent=False)

    def _init_weights(self, module):
        super()._init_weights(module)
        if isinstance(module, RandomBufferModel) and "noise" in module._buffers:  # post_init runs before it exists
            with torch.no_grad():
                module.noise.uniform_()

    def forward(self, input_ids, **kwargs):
        out = super().forward(input_ids)
        out.logits = out.logits + self.noise.sum()
        return out


def _random_buffer():
    torch.manual_seed(0)
    return RandomBufferModel(RootBufferConfig())


def _root_buffer():
    model = RootBufferModel(RootBufferConfig())
    with torch.no_grad():
        model.bias_table.copy_(torch.linspace(-1, 1, model.config.vocab))
    return model


BUILDERS = {
    "llama": _llama,
    "llama_sharded": _llama,  # several safetensors shards + index
    "llama_bin": _llama,  # a pickle checkpoint (pytorch_model.bin)
    "llama_tied": lambda: _llama(tie=True),
    "llama_qkv": lambda: _llama(kv=4),  # q, k and v saved fused as one qkv_proj (see QKV)
    "llama_base": lambda: _llama().model,  # a LlamaModel checkpoint: loaded as a causal LM, lm_head is missing
    "keep_fp32": lambda: keep_fp32_class()(_llama().config),
    "root_buffer": _root_buffer,
    "random_buffer": _random_buffer,
    "t5": _t5,
    "mixtral": _mixtral,
    "llava": _llava,
    "deepseek_v3": _deepseek_v3,
}


def build(kind: str, path: str, dtype=torch.bfloat16, seed=0, **kwargs) -> str:
    torch.manual_seed(seed)
    builder = BUILDERS.get(kind)
    model = builder() if builder else _llama(**kwargs)
    # Randomise everything (including norms) so a missed load cannot pass by accident.
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn_like(p) * 0.05)
    model.to(dtype)
    if kind == "llama_bin":  # 5.x can no longer write .bin: save it the way old checkpoints were
        os.makedirs(path, exist_ok=True)
        model.config.save_pretrained(path)
        torch.save(model.state_dict(), os.path.join(path, "pytorch_model.bin"))
    else:
        model.save_pretrained(path, **({"max_shard_size": "40KB"} if kind == "llama_sharded" else {}))
    if kind == "llama_qkv":
        _fuse_qkv(os.path.join(path, "model.safetensors"))
    return path


def _fuse_qkv(file):
    from safetensors.torch import load_file, save_file

    tensors = load_file(file)
    for key in [k for k in tensors if k.endswith("self_attn.q_proj.weight")]:
        parts = [tensors.pop(key.replace("q_proj", p)) for p in ("q_proj", "k_proj", "v_proj")]
        tensors[key.replace("q_proj", "qkv_proj")] = torch.cat(parts)
    save_file(tensors, file, metadata={"format": "pt"})


def register_qkv() -> None:
    """5.x: load a ``llama_qkv`` checkpoint through transformers' own conversion (Chunk on dim 0, the dim FSDP
    shards: not slice-safe). Llama checkpoints without the fused key are unaffected."""
    from transformers.conversion_mapping import register_checkpoint_conversion_mapping
    from transformers.core_model_loading import Chunk, WeightConverter

    targets = [f"self_attn.{p}_proj.weight" for p in "qkv"]
    register_checkpoint_conversion_mapping(
        "llama", [WeightConverter("self_attn.qkv_proj.weight", targets, operations=[Chunk(dim=0)])], overwrite=True)


def load_class(kind: str):
    import transformers

    if kind == "keep_fp32":
        return keep_fp32_class()
    if kind in ("root_buffer", "random_buffer"):
        return RootBufferModel if kind == "root_buffer" else RandomBufferModel
    return {"t5": transformers.AutoModelForSeq2SeqLM, "llava": transformers.LlavaForConditionalGeneration}.get(
        kind, transformers.AutoModelForCausalLM
    )
