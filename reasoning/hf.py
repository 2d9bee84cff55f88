"""Open-weight interop: load a local Hugging Face Qwen3 / Qwen2 / Llama folder into our GPT, and export ours back.

Why: RL from a strong open model (Qwen3-0.6B, Llama-3.2-1B) shows reasoning gains at a fraction of a pretraining
run, and an exported folder runs in transformers/vLLM. No second model implementation: GPTConfig already has the
switches these families need (SwiGLU, learned norm gains, Qwen3's q/k-norm gains, Qwen2's q/k/v biases, tied
embeddings, rope theta and Llama 3 rope scaling, rotate-half rotary), so loading is a config translation plus a
name table, and export is the same table read backwards.

- `load_hf_model(path, device)` -> (model, tokenizer, meta), the shape of `checkpoint.load_model`; behind
  `--init-from hf:PATH`. Reads config.json, model.safetensors or a sharded model.safetensors.index.json (tensors
  are copied one at a time into the allocated model: peak memory is one model plus one tensor) and the tokenizer
  (reasoning/hf_tokenizer.py).
- `export_hf(model, tokenizer, out_dir)` / `python -m reasoning.hf export --stage sft --tag d12 --out DIR` writes
  config.json (llama, qwen2 or qwen3), model.safetensors, tokenizer.json, tokenizer_config.json (with a chat
  template) and generation_config.json. Parameter-free norms are written as unit gains (the same function). Our
  default model (ReLU² MLP, logit softcap) has no Llama/Qwen equivalent and is refused with the reason.

Every user-facing failure (unsupported model_type, missing file or tensor, shape mismatch) is a one-line UserError
naming the file and key.
"""

from __future__ import annotations

import argparse
import json
import os
import re

import torch

from reasoning.common import UserError
from reasoning.gpt import GPT, GPTConfig
from reasoning.hf_tokenizer import (CHAT_TEMPLATE_FILE, TOKENIZER_CONFIG_FILE, TOKENIZER_FILE, HFTokenizer,
                                    hf_tokenizer_json_from_ranks, native_chat_template, read_json_object)

SUPPORTED_MODEL_TYPES = ("llama", "qwen2", "qwen3")
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
WEIGHTS_INDEX_FILE = "model.safetensors.index.json"
_ARCHITECTURES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM"}
_LLAMA3_ROPE_KEYS = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")
# Tensors some checkpoints carry that the model recomputes (older Llama saves stored rotary inverse frequencies).
_IGNORED_KEYS = re.compile(r".*rotary_emb\.inv_freq$")

# our parameter name -> HF name; per block the prefixes are blocks.{i}. and model.layers.{i}.
_TOP_LEVEL_KEYS = {"wte.weight": "model.embed_tokens.weight", "norm_f.weight": "model.norm.weight",
                   "lm_head.weight": "lm_head.weight"}
_BLOCK_KEYS = {
    "attn_norm.weight": "input_layernorm.weight",
    "mlp_norm.weight": "post_attention_layernorm.weight",
    "attn.c_q.weight": "self_attn.q_proj.weight", "attn.c_q.bias": "self_attn.q_proj.bias",
    "attn.c_k.weight": "self_attn.k_proj.weight", "attn.c_k.bias": "self_attn.k_proj.bias",
    "attn.c_v.weight": "self_attn.v_proj.weight", "attn.c_v.bias": "self_attn.v_proj.bias",
    "attn.c_proj.weight": "self_attn.o_proj.weight",
    "attn.q_norm.weight": "self_attn.q_norm.weight", "attn.k_norm.weight": "self_attn.k_norm.weight",
    "mlp.c_gate.weight": "mlp.gate_proj.weight", "mlp.c_fc.weight": "mlp.up_proj.weight",
    "mlp.c_proj.weight": "mlp.down_proj.weight",
}
_BLOCK_RE = re.compile(r"blocks\.(\d+)\.(.+)")


def hf_key(our_key: str) -> str:
    """The Hugging Face name of one of our parameters (ValueError for a name outside the table)."""
    if our_key in _TOP_LEVEL_KEYS:
        return _TOP_LEVEL_KEYS[our_key]
    match = _BLOCK_RE.fullmatch(our_key)
    if match and match.group(2) in _BLOCK_KEYS:
        return f"model.layers.{match.group(1)}.{_BLOCK_KEYS[match.group(2)]}"
    raise ValueError(f"parameter {our_key!r} has no Hugging Face name")


# ---------------------------------------------------------------------------------------------- config

def _rope_from_hf(hf: dict, source: str) -> tuple[float, dict | None]:
    """(theta, Llama 3 scaling or None) from either config layout: transformers 4 (rope_theta + rope_scaling)
    or 5 (rope_parameters)."""
    params = dict(hf.get("rope_scaling") or {})
    params.update(hf.get("rope_parameters") or {})
    if any(isinstance(v, dict) for v in params.values()):
        raise UserError(f"{source}: per-layer rope parameters are not supported")
    theta = float(params.pop("rope_theta", hf.get("rope_theta", 10000.0)))
    kind = params.pop("rope_type", params.pop("type", "default"))
    if float(params.pop("partial_rotary_factor", hf.get("partial_rotary_factor", 1.0))) != 1.0:
        raise UserError(f"{source}: partial_rotary_factor != 1 is not supported (rotary covers the whole head)")
    if kind == "default":
        return theta, None
    if kind == "llama3":
        missing = [k for k in _LLAMA3_ROPE_KEYS if k not in params]
        if missing:
            raise UserError(f"{source}: llama3 rope scaling lacks {', '.join(missing)}")
        return theta, {k: params[k] for k in _LLAMA3_ROPE_KEYS}
    raise UserError(f"{source}: rope type {kind!r} is not supported (expected 'default' or 'llama3')")


def gpt_config_from_hf(hf: dict, source: str = CONFIG_FILE, max_seq_len: int | None = None) -> GPTConfig:
    """Translate a Llama/Qwen2/Qwen3 config.json into GPTConfig switches."""
    model_type = hf.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise UserError(f"{source}: unsupported model_type {model_type!r}; expected one of "
                        f"{', '.join(SUPPORTED_MODEL_TYPES)} (dense decoder families)")
    for key in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads"):
        if not isinstance(hf.get(key), int):
            raise UserError(f"{source}: {key!r} is missing or not an integer")
    if hf.get("hidden_act", "silu") != "silu":
        raise UserError(f"{source}: hidden_act {hf['hidden_act']!r} is not supported (expected 'silu')")
    if hf.get("mlp_bias"):
        raise UserError(f"{source}: mlp_bias=true is not supported (our MLP has no biases)")
    if hf.get("use_sliding_window"):
        raise UserError(f"{source}: use_sliding_window=true is not supported (every layer attends globally)")
    if model_type != "qwen2" and hf.get("attention_bias"):
        raise UserError(f"{source}: attention_bias=true is not supported (it adds an o_proj bias we do not have)")
    theta, scaling = _rope_from_hf(hf, source)
    n_head = hf["num_attention_heads"]
    try:
        return GPTConfig(
            max_seq_len=max_seq_len or int(hf.get("max_position_embeddings") or 2048),
            vocab_size=hf["vocab_size"], n_layer=hf["num_hidden_layers"], n_head=n_head,
            n_kv_head=hf.get("num_key_value_heads") or n_head, n_embd=hf["hidden_size"],
            head_dim=hf.get("head_dim") or hf["hidden_size"] // n_head,
            softcap=None, rope_theta=theta, rope_scaling=scaling, mlp="swiglu",
            intermediate_size=hf["intermediate_size"], norm_weight=True,
            tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
            qk_norm=model_type == "qwen3", qk_norm_weight=model_type == "qwen3", attn_bias=model_type == "qwen2",
            rms_eps=float(hf.get("rms_norm_eps", 1e-6)))
    except ValueError as e:
        raise UserError(f"{source}: {e}") from None


def hf_config_from_gpt(config: GPTConfig, bos_token_id: int | None, eos_token_id: int | None,
                       dtype: torch.dtype) -> dict:
    """config.json for a GPTConfig that maps: qwen3 (QK-norm), qwen2 (q/k/v biases) or llama. UserError naming
    what does not map otherwise."""
    blockers = []
    if config.mlp != "swiglu":
        blockers.append(f"a {config.mlp} MLP (Llama/Qwen use SwiGLU)")
    if config.softcap:
        blockers.append(f"a logit softcap of {config.softcap}")
    if config.window is not None:
        blockers.append(f"a sliding attention window of {config.window}")
    if config.qk_norm and config.attn_bias:
        blockers.append("q/k/v biases together with QK-norm")
    if blockers:
        raise UserError("cannot export to Llama/Qwen: the model has " + " and ".join(blockers) + "; only models "
                        "built with mlp='swiglu' and softcap=None (e.g. started from --init-from hf:) map")
    model_type = "qwen3" if config.qk_norm else "qwen2" if config.attn_bias else "llama"
    hf = {
        "architectures": [_ARCHITECTURES[model_type]], "model_type": model_type,
        "vocab_size": config.vocab_size, "hidden_size": config.n_embd,
        "intermediate_size": config.get_intermediate_size(), "num_hidden_layers": config.n_layer,
        "num_attention_heads": config.n_head, "num_key_value_heads": config.n_kv_head,
        "head_dim": config.get_head_dim(), "hidden_act": "silu", "max_position_embeddings": config.max_seq_len,
        "rms_norm_eps": config.rms_eps, "rope_theta": config.rope_theta,
        "rope_scaling": dict(config.rope_scaling, rope_type="llama3") if config.rope_scaling else None,
        "tie_word_embeddings": config.tie_embeddings, "attention_dropout": 0.0,
        "bos_token_id": bos_token_id, "eos_token_id": eos_token_id,
        "torch_dtype": str(dtype).removeprefix("torch."), "use_cache": True,
    }
    if model_type == "llama":
        hf.update(attention_bias=False, mlp_bias=False)
    else:
        hf.update(use_sliding_window=False, sliding_window=None, max_window_layers=config.n_layer)
        if model_type == "qwen3":
            hf["attention_bias"] = False
    return hf


# ---------------------------------------------------------------------------------------------- weights

class SafetensorsFolder:
    """Lazy, by-name access to the tensors of a single-file or sharded safetensors checkpoint."""

    def __init__(self, directory: str):
        from safetensors import safe_open

        self._safe_open = safe_open
        self._handles = {}
        index_path = os.path.join(directory, WEIGHTS_INDEX_FILE)
        single_path = os.path.join(directory, WEIGHTS_FILE)
        if os.path.isfile(index_path):
            weight_map = read_json_object(index_path, "shard index").get("weight_map")
            if not isinstance(weight_map, dict):
                raise UserError(f"{index_path}: expected a 'weight_map' object")
            self.file_of = {key: os.path.join(directory, name) for key, name in weight_map.items()}
            for path in sorted(set(self.file_of.values())):
                if not os.path.isfile(path):
                    raise UserError(f"{path} is missing (listed in {index_path})")
        elif os.path.isfile(single_path):
            self.file_of = {key: single_path for key in self._handle(single_path).keys()}
        else:
            raise UserError(f"no weights in {directory}: expected {WEIGHTS_FILE} or {WEIGHTS_INDEX_FILE}")

    def _handle(self, path: str):
        if path not in self._handles:
            try:
                self._handles[path] = self._safe_open(path, framework="pt", device="cpu")
            except Exception as e:  # SafetensorError for truncated or non-safetensors files
                raise UserError(f"{path} is not a readable safetensors file ({str(e).splitlines()[0][:100]})") \
                    from None
        return self._handles[path]

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self._handle(self.file_of[key]).get_slice(key).get_shape())

    def get(self, key: str) -> torch.Tensor:
        return self._handle(self.file_of[key]).get_tensor(key)


@torch.no_grad()
def load_hf_weights(model: GPT, directory: str) -> None:
    """Copy every parameter of `model` from the folder's safetensors, checking names and shapes first."""
    weights = SafetensorsFolder(directory)
    targets = model.state_dict()  # shares storage with the parameters: copy_ fills the model in place
    if model.config.tie_embeddings:
        targets.pop("lm_head.weight")  # the same matrix as wte; tied checkpoints may or may not store it
    plan = []
    for our_key, target in targets.items():
        key = hf_key(our_key)
        if key not in weights.file_of:
            raise UserError(f"{directory}: tensor {key} is missing from the safetensors (needed for {our_key})")
        if weights.shape(key) != tuple(target.shape):
            raise UserError(f"{weights.file_of[key]}: tensor {key} has shape {list(weights.shape(key))} but "
                            f"config.json implies {list(target.shape)}")
        plan.append((key, target))
    expected = {key for key, _ in plan} | ({"lm_head.weight"} if model.config.tie_embeddings else set())
    unexpected = sorted(k for k in weights.file_of if k not in expected and not _IGNORED_KEYS.fullmatch(k))
    if unexpected:
        raise UserError(f"{weights.file_of[unexpected[0]]}: unexpected tensor {unexpected[0]}"
                        + (f" (and {len(unexpected) - 1} more)" if len(unexpected) > 1 else "")
                        + ": the checkpoint has weights this architecture does not use")
    for key, target in plan:
        target.copy_(weights.get(key))


def hf_folder(path: str) -> str:
    """`path` if it is a directory, else a UserError saying what hf:PATH expects."""
    if not os.path.isdir(path):
        raise UserError(f"hf:{path}: {'no such directory' if path else 'missing folder path'} (expected a local "
                        f"Hugging Face model folder with {CONFIG_FILE}, safetensors weights and {TOKENIZER_FILE})")
    return path


def load_hf_model(path: str, device="cpu", phase: str = "eval", dtype: torch.dtype = torch.float32,
                  max_seq_len: int | None = None):
    """(model, tokenizer, meta) from a local HF folder, like checkpoint.load_model. fp32 by default (training keeps
    fp32 master weights; autocast does bf16 compute on GPU). `max_seq_len` defaults to max_position_embeddings."""
    if phase not in ("eval", "train"):
        raise ValueError(f"phase={phase!r}: expected 'eval' or 'train'")
    path = hf_folder(path)
    config_path = os.path.join(path, CONFIG_FILE)
    hf_config = read_json_object(config_path, "the model's config")
    config = gpt_config_from_hf(hf_config, config_path, max_seq_len)
    tokenizer = HFTokenizer.load(path)  # before the weights: a bad tokenizer should not cost a model load
    if tokenizer.vocab_size > config.vocab_size:
        raise UserError(f"{os.path.join(path, TOKENIZER_FILE)} has {tokenizer.vocab_size} tokens but "
                        f"{config_path} says vocab_size {config.vocab_size}")
    with torch.device("meta"):
        model = GPT(config)
    model.to(dtype=dtype)  # on meta: free; to_empty then allocates once, in the target dtype
    model.to_empty(device=torch.device(device))  # also builds the rotary tables and re-ties embeddings
    load_hf_weights(model, path)
    model.train(phase == "train")
    meta = {"step": 0, "source": f"hf:{os.path.abspath(path)}", "hf_model_type": hf_config["model_type"],
            "model_config": config.to_dict(), "tokenizer_dir": os.path.abspath(path)}
    return model, tokenizer, meta


# ---------------------------------------------------------------------------------------------- export

def export_hf(model: GPT, tokenizer, out_dir: str, dtype: torch.dtype = torch.float32,
              overwrite: bool = False) -> dict:
    """Write `model` + `tokenizer` (ours or an HFTokenizer) as a Hugging Face folder; returns the config.json."""
    from safetensors.torch import save_file

    if os.path.exists(os.path.join(out_dir, CONFIG_FILE)) and not overwrite:
        raise UserError(f"{out_dir} already holds a model ({CONFIG_FILE}); pass --overwrite to replace it")
    config = model.config
    is_hf = isinstance(tokenizer, HFTokenizer)
    eos = tokenizer.encode_special("<|assistant_end|>")  # both tokenizer kinds map our name to the end of turn
    hf_config = hf_config_from_gpt(config, tokenizer.bos_token_id, eos, dtype)

    state = {}
    for our_key, tensor in model.state_dict().items():
        if config.tie_embeddings and our_key == "lm_head.weight":
            continue  # transformers re-ties from tie_word_embeddings; safetensors refuses shared storage anyway
        state[hf_key(our_key)] = tensor.detach().to(device="cpu", dtype=dtype).contiguous()
    unit = lambda n: torch.ones(n, dtype=dtype)  # noqa: E731  (a parameter-free RMSNorm = unit gains)
    for i in range(config.n_layer):
        if not config.norm_weight:
            state[f"model.layers.{i}.input_layernorm.weight"] = unit(config.n_embd)
            state[f"model.layers.{i}.post_attention_layernorm.weight"] = unit(config.n_embd)
        if config.qk_norm and not config.qk_norm_weight:
            state[f"model.layers.{i}.self_attn.q_norm.weight"] = unit(config.get_head_dim())
            state[f"model.layers.{i}.self_attn.k_norm.weight"] = unit(config.get_head_dim())
    if not config.norm_weight:
        state["model.norm.weight"] = unit(config.n_embd)

    os.makedirs(out_dir, exist_ok=True)
    save_file(state, os.path.join(out_dir, WEIGHTS_FILE), metadata={"format": "pt"})
    if is_hf:
        tokenizer.save(out_dir)
    else:
        with open(os.path.join(out_dir, TOKENIZER_FILE), "w", encoding="utf-8") as f:
            f.write(hf_tokenizer_json_from_ranks(tokenizer.mergeable_ranks, tokenizer.pattern,
                                                 list(tokenizer.special_tokens)))
        names = {v: k for k, v in tokenizer.special_tokens.items()}
        tokenizer_config = {"bos_token": names.get(tokenizer.bos_token_id), "eos_token": names[eos],
                            "chat_template": native_chat_template(), "clean_up_tokenization_spaces": False,
                            "model_max_length": config.max_seq_len, "tokenizer_class": "PreTrainedTokenizerFast"}
        with open(os.path.join(out_dir, TOKENIZER_CONFIG_FILE), "w", encoding="utf-8") as f:
            json.dump(tokenizer_config, f, indent=2)
        stale = os.path.join(out_dir, CHAT_TEMPLATE_FILE)
        if os.path.exists(stale):  # would shadow the template above on load
            os.remove(stale)
    stop_ids = [eos] + ([tokenizer.bos_token_id] if tokenizer.bos_token_id not in (None, eos) else [])
    for name, payload in ((CONFIG_FILE, hf_config),
                          ("generation_config.json", {"bos_token_id": tokenizer.bos_token_id,
                                                      "eos_token_id": stop_ids})):
        with open(os.path.join(out_dir, name), "w", encoding="utf-8") as f:
            json.dump(payload, f, indent=2)
    return hf_config


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m reasoning.hf",
                                     description="Hugging Face interop: export a checkpoint as an HF model folder")
    sub = parser.add_subparsers(dest="command", required=True)
    export = sub.add_parser("export", help="write a checkpoint as config.json + model.safetensors + tokenizer.json")
    export.add_argument("--stage", required=True, help="base | sft | rl, or a checkpoint directory")
    export.add_argument("--tag", default=None, help="checkpoint tag (default: the newest of the stage)")
    export.add_argument("--step", type=int, default=None, help="step (default: the last complete one)")
    export.add_argument("--out", required=True, help="output folder")
    export.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32", help="weight dtype in the safetensors")
    export.add_argument("--overwrite", action="store_true", help="replace a model already in --out")
    export.add_argument("--base-dir", default=None, help="run folder (default $REASONING_BASE_DIR)")
    args = parser.parse_args(argv)

    from reasoning.checkpoint import load_model

    model, tokenizer, meta = load_model(args.stage, tag=args.tag, step=args.step, device="cpu",
                                        base_dir=args.base_dir)
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    hf_config = export_hf(model, tokenizer, args.out, dtype=dtype, overwrite=args.overwrite)
    print(f"RESULT out={args.out} model_type={hf_config['model_type']} step={meta.get('step')} "
          f"params={model.num_params()}")


if __name__ == "__main__":
    from reasoning.common import run_main

    run_main(main)
