"""Plan a stage's GPU memory per rank without a GPU: `plan_memory STAGE [planner flags] [the stage's own flags]`.

    python -m scripts.plan_memory base_train --nproc 8 --depth 20 --device-batch-size 32 --max-seq-len 2048
    python -m scripts.plan_memory chat_rl --model qwen3-0.6b --gpu-memory-gib 80 --nproc 8 \\
        --prompts-per-step 64 --num-samples 8 --max-new-tokens 2048
    python -m scripts.plan_memory chat_eval --model d20 --max-tokens 4096 --batch-size 64 --num-samples 8

STAGE is base_train, base_eval, chat_sft, chat_rl or chat_eval; every flag the stage takes is accepted with its
meaning and default (the stage's own parser reads them). The model comes from --model (d<depth>, qwen3-0.6b,
qwen3-1.7b, or hf:PATH to a local config.json) or, without it, from the stage's model-source flags (the
checkpoint's meta file; no weights are read). base_train builds its model from --depth.
The plan runs the stage's code on fake tensors (reasoning.memplan): parameters, gradients, optimizer state,
activations, logits and KV cache at each phase's peak, and whether that fits --gpu-memory-gib with --headroom.
Exit code 1 when a phase does not fit. Last line: RESULT fits=<phases that fit>/<phases> worst_phase=... worst_gib=...
"""

from __future__ import annotations

import argparse
import json
import os

from reasoning import memplan
from reasoning.cli import print_result
from reasoning.common import UserError, get_base_dir, run_main
from reasoning.gpt import GPTConfig, config_from_depth

STAGES = ("base_train", "base_eval", "chat_sft", "chat_rl", "chat_eval")
SPEEDRUN_VOCAB = 32768  # runs/speedrun.sh's VOCAB_SIZE: the vocabulary of a model planned before its tokenizer exists
# Hugging Face config.json values (no download needed to plan): Qwen/Qwen3-0.6B and Qwen/Qwen3-1.7B
QWEN3_COMMON = {"model_type": "qwen3", "num_hidden_layers": 28, "num_attention_heads": 16, "num_key_value_heads": 8,
                "head_dim": 128, "vocab_size": 151936, "tie_word_embeddings": True, "rope_theta": 1000000,
                "rms_norm_eps": 1e-6, "max_position_embeddings": 40960, "hidden_act": "silu",
                "attention_bias": False}
HF_PRESETS = {
    "qwen3-0.6b": QWEN3_COMMON | {"hidden_size": 1024, "intermediate_size": 3072},
    "qwen3-1.7b": QWEN3_COMMON | {"hidden_size": 2048, "intermediate_size": 6144},
}


def preset_config(name: str, max_seq_len: int = 2048) -> GPTConfig:
    """GPTConfig of a --model preset: d<depth> (our architecture, speedrun vocabulary), a Qwen3 preset or hf:PATH."""
    from reasoning.hf import gpt_config_from_hf

    if name in HF_PRESETS:
        return gpt_config_from_hf(HF_PRESETS[name], name)
    if name.startswith("hf:"):
        path = os.path.join(os.path.expanduser(name[3:]), "config.json")
        if not os.path.isfile(path):
            raise UserError(f"--model {name}: expected a folder with a config.json ({path} not found)")
        with open(path) as f:
            return gpt_config_from_hf(json.load(f), path)
    if name.startswith("d") and name[1:].isdigit() and int(name[1:]) > 0:
        return config_from_depth(int(name[1:]), SPEEDRUN_VOCAB, max_seq_len=max_seq_len)
    raise UserError(f"--model {name}: expected d<depth> (e.g. d20), {', '.join(HF_PRESETS)} or hf:PATH")


def source_config(args) -> GPTConfig:
    """The model config a chat stage would load, from its checkpoint's meta (no weights read)."""
    from reasoning import checkpoint as ckpt

    source = ckpt.ModelSource.from_args(args, getattr(args, "base_dir", None) or get_base_dir())
    if source.hf:
        return preset_config(f"hf:{source.dir}")
    return GPTConfig.from_dict(ckpt.load_meta(source.dir, source.step)["model_config"])


def plan_stage(stage: str, stage_argv: list[str], model: str | None, nproc: int, target: str,
               prompt_tokens: int, gpu_memory_gib: float) -> list[memplan.PhasePlan]:
    """Parse `stage_argv` with the stage's own parser and plan it; --device-batch-size -1 (auto) is chosen for a
    GPU of `gpu_memory_gib` exactly as the stage would choose it on one."""
    from reasoning.cli import parse_script_args

    memplan.PLANNED_GPU_GIB = gpu_memory_gib  # the engine phases take their KV budget from this GPU's memory
    if stage == "base_train":
        from reasoning.pretrain import config_from_args, plan_memory, resolve_device_batch
        from scripts.base_train import build_parser

        config = config_from_args(parse_script_args(build_parser(), stage_argv))
        config.validate()
        vocab = SPEEDRUN_VOCAB if config.vocab_size == -1 else config.vocab_size
        overrides = {} if config.head_dim is None else {"head_dim": config.head_dim}
        model_config = config_from_depth(config.depth, vocab, max_seq_len=config.max_seq_len,
                                         aspect_ratio=config.aspect_ratio, **overrides)
        if config.device_batch_size == -1:  # auto: what the stage would choose on this GPU (explicit: as given)
            config = resolve_device_batch(config, model_config, None, nproc, gpu_memory_gib)
        return plan_memory(config, model_config, nproc, target)
    module = {"base_eval": "scripts.base_eval", "chat_sft": "scripts.chat_sft", "chat_rl": "scripts.chat_rl",
              "chat_eval": "scripts.chat_eval"}[stage]
    args = parse_script_args(__import__(module, fromlist=["build_parser"]).build_parser(), stage_argv)
    model_config = preset_config(model) if model else source_config(args)
    if stage == "base_eval":
        max_seq_len = args.max_seq_len or model_config.max_seq_len
        return memplan.plan_base_eval(args.device_batch_size, max_seq_len, model_config, target)
    if stage == "chat_eval":
        return memplan.plan_chat_eval(args.batch_size, args.num_samples, args.max_tokens, model_config, target,
                                      prompt_tokens=prompt_tokens, gpu_memory_gib=gpu_memory_gib)
    if stage == "chat_sft":
        from reasoning.sft import config_from_args, plan_memory, resolve_device_batch

        config = config_from_args(args)
        config.validate()
        if config.device_batch_size == -1 or config.activation_checkpointing == "auto":
            # auto: what the stage would choose on this GPU (explicit: as given)
            config = resolve_device_batch(config, model_config, None, nproc, gpu_memory_gib)
        return plan_memory(config, model_config, nproc, target, prompt_tokens=prompt_tokens)
    from scripts.chat_rl import RLConfig, plan_memory, resolve_device_batch

    config = RLConfig.from_args(args)
    config.validate()
    if config.device_batch_size == -1 or config.activation_checkpointing == "auto":
        # auto: what the stage would choose on this GPU (explicit: as given)
        config = resolve_device_batch(config, model_config, None, nproc, gpu_memory_gib)
    return plan_memory(config, model_config, nproc, target, prompt_tokens=prompt_tokens)


def build_parser():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                     usage="python -m scripts.plan_memory STAGE [planner flags] [stage flags]")
    parser.add_argument("plan_stage", choices=STAGES, metavar="STAGE", help=", ".join(STAGES))
    group = parser.add_argument_group("planner")
    group.add_argument("--gpu-memory-gib", type=float, default=80.0, help="GPU memory per rank to fit in")
    group.add_argument("--headroom", type=float, default=memplan.DEFAULT_HEADROOM,
                       help="share of the GPU kept free (CUDA context, fragmentation, NCCL buffers)")
    group.add_argument("--nproc", type=int, default=1, help="ranks (torchrun --nproc_per_node × nodes)")
    group.add_argument("--model", default=None, help="d<depth>, qwen3-0.6b, qwen3-1.7b or hf:PATH (default: the "
                                                     "stage's model-source flags)")
    group.add_argument("--target", choices=memplan.TARGETS, default="cuda",
                       help="cuda: a bf16-autocast GPU run; cpu: the fp32 CPU run")
    group.add_argument("--prompt-tokens", type=int, default=256,
                       help="prompt length the engine phases assume (MATH/GSM8K chat prompts are ~100-300 tokens)")
    group.add_argument("--brief", action="store_true", help="one line per stage (runs/speedrun.sh --plan)")
    return parser


def main(argv: list[str] | None = None):
    parser = build_parser()
    args, stage_argv = parser.parse_known_args(argv)
    if args.nproc < 1 or args.prompt_tokens < 1 or args.gpu_memory_gib <= 0 or not 0 <= args.headroom < 1:
        raise UserError("--nproc, --prompt-tokens, --gpu-memory-gib: expected positive values; --headroom in [0, 1)")
    plans = plan_stage(args.plan_stage, stage_argv, args.model, args.nproc, args.target, args.prompt_tokens,
                       args.gpu_memory_gib)
    worst = max(plans, key=lambda p: p.total)
    fitting = sum(p.fits(args.gpu_memory_gib, args.headroom) for p in plans)
    if args.brief:
        print(f"[plan] {args.plan_stage}: " + " | ".join(
            f"{p.phase} {', '.join(f'{k}={v}' for k, v in p.settings.items())} -> {p.total / memplan.GIB:.1f} GiB"
            for p in plans) + f" | {fitting}/{len(plans)} fit {args.gpu_memory_gib:g} GiB")
        if fitting < len(plans):
            raise SystemExit(1)
        return
    print(f"{args.plan_stage}: per rank of {args.nproc}, target {args.target}, "
          f"{args.gpu_memory_gib:g} GiB with {args.headroom:.0%} headroom")
    for p in plans:
        print(f"  {p.phase}: " + ", ".join(f"{k}={v}" for k, v in p.settings.items()))
    print(memplan.format_table(plans, args.gpu_memory_gib, args.headroom))
    print_result({"fits": f"{fitting}/{len(plans)}", "worst_phase": f"{worst.stage}/{worst.phase}",
                  "worst_gib": round(worst.total / memplan.GIB, 2)})
    if fitting < len(plans):
        raise SystemExit(1)


if __name__ == "__main__":
    run_main(main)
