"""How far bf16 lm_head matmuls move the token log-probs of the chunked log-prob pass, at Qwen3's vocabulary.

Compares `grpo.chunked_token_logprobs` with matmul_dtype=bf16 against fp32 on the same inputs: hidden states of unit
RMS (what the final RMSNorm hands the head), d=1024, V=151,936, a head whose logits have a std of ~3 (a
max of ~15, like a real model's), targets sampled from the fp32 distribution (what rollouts train on) and, as a
stress case, uniformly random tokens (far in the tail). Two bf16 variants:
  cuda  bf16 operands with fp32 accumulation and fp32 logits: the CUDA path (torch.mm(..., out_dtype=float32)),
        emulated here exactly by an fp32 matmul of the bf16-rounded operands (the products of two bf16 numbers are
        exact in fp32; only the summation order can differ);
  cpu   the CPU path of the same code: the product rounded to bf16, then upcast (no fp32-output bf16 matmul on CPU).

    OMP_NUM_THREADS=1 python -m dev.bench_logprob_bf16 [--rows 512]
Last line: RESULT logprob_bf16_max_abs=<cuda path, sampled targets> logprob_bf16_cpu_max_abs=<cpu path> ...
"""

from __future__ import annotations

import argparse

import torch

from reasoning.grpo import chunked_token_logprobs
from reasoning.cli import print_result


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=512)
    parser.add_argument("--vocab", type=int, default=151936)
    parser.add_argument("--dim", type=int, default=1024)
    parser.add_argument("--logit-std", type=float, default=3.0)
    parser.add_argument("--temperature", type=float, default=1.0)
    args = parser.parse_args(argv)
    gen = torch.Generator().manual_seed(0)
    hidden = torch.randn(args.rows, args.dim, generator=gen)
    hidden = hidden / hidden.pow(2).mean(dim=1, keepdim=True).sqrt()  # unit RMS rows
    weight = torch.randn(args.vocab, args.dim, generator=gen) * (args.logit_std / args.dim ** 0.5)
    with torch.no_grad():
        probs = torch.softmax(hidden @ weight.t() / args.temperature, dim=1)
        sampled = torch.multinomial(probs, 1, generator=gen).squeeze(1)
        del probs
    uniform = torch.randint(0, args.vocab, (args.rows,), generator=gen)

    def logprobs(h, w, targets, matmul_dtype):
        return chunked_token_logprobs(h, w, targets, chunk_size=256, temperature=args.temperature,
                                      matmul_dtype=matmul_dtype)

    rounded_h, rounded_w = hidden.bfloat16().float(), weight.bfloat16().float()
    rows = []
    for name, targets in (("sampled", sampled), ("uniform", uniform)):
        fp32 = logprobs(hidden, weight, targets, None)
        cuda = logprobs(rounded_h, rounded_w, targets, None)       # = bf16 operands, fp32 accumulation
        cpu = logprobs(hidden, weight, targets, torch.bfloat16)    # this machine's bf16 path
        for variant, lp in (("cuda", cuda), ("cpu", cpu)):
            diff = (lp - fp32).abs()
            rows.append({"targets": name, "variant": variant, "max_abs": float(diff.max()),
                         "mean_abs": float(diff.mean()), "mean_logp": float(fp32.mean())})
    print(f"rows={args.rows} d={args.dim} V={args.vocab} logit std={args.logit_std} T={args.temperature}")
    print("| targets | bf16 path | mean log-prob (fp32) | max abs diff | mean abs diff |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['targets']} | {r['variant']} | {r['mean_logp']:.3f} | {r['max_abs']:.2e} | {r['mean_abs']:.2e} |")
    pick = {(r["targets"], r["variant"]): r["max_abs"] for r in rows}
    print_result({"logprob_bf16_max_abs": f"{pick['sampled', 'cuda']:.2e}",
                  "logprob_bf16_cpu_max_abs": f"{pick['sampled', 'cpu']:.2e}",
                  "logprob_bf16_tail_max_abs": f"{pick['uniform', 'cuda']:.2e}"})


if __name__ == "__main__":
    main()
