"""Export a checkpoint as a Hugging Face model folder (config.json + model.safetensors + tokenizer.json), for
transformers / vLLM. The conversion itself is reasoning.hf.export_hf.

    python -m scripts.hf_export --stage rl --tag qwen3-0.6b --out ~/models/qwen3-0.6b-grpo
"""

import argparse

import torch

from reasoning.checkpoint import load_model
from reasoning.common import run_main
from reasoning.hf import export_hf


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m scripts.hf_export", description=__doc__.splitlines()[0])
    parser.add_argument("--stage", required=True, help="base | sft | rl, or a checkpoint directory")
    parser.add_argument("--tag", default=None, help="checkpoint tag (default: the newest of the stage)")
    parser.add_argument("--step", type=int, default=None, help="step (default: the last complete one)")
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32", help="weight dtype in the safetensors")
    parser.add_argument("--overwrite", action="store_true", help="replace a model already in --out")
    parser.add_argument("--base-dir", default=None, help="run folder (default $REASONING_BASE_DIR)")
    args = parser.parse_args(argv)

    model, tokenizer, meta = load_model(args.stage, tag=args.tag, step=args.step, device="cpu",
                                        base_dir=args.base_dir)
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    hf_config = export_hf(model, tokenizer, args.out, dtype=dtype, overwrite=args.overwrite)
    print(f"RESULT out={args.out} model_type={hf_config['model_type']} step={meta.get('step')} "
          f"params={model.num_params()}")


if __name__ == "__main__":
    run_main(main)
