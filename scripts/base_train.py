"""Pretrain the base model on the parquet shards; checkpoints to <base>/checkpoints/base/. The whole loop is `train`.

    python -m scripts.base_train --depth 4 --max-seq-len 256 --device-batch-size 8 --num-iterations 500
    torchrun --standalone --nproc_per_node=8 -m scripts.base_train -- --depth 20 --run d20
    python -m scripts.base_train --depth 4 ... --resume          # continue from the last checkpoint of the tag

Every flag is a field of reasoning.pretrain.TrainConfig (the batch, the schedules and the other parts live there;
reasoning.training holds what every trainer's loop shares). Metrics go to <base>/logs/base_<tag>.jsonl (and wandb
with --run NAME); on success the report gets a "base_train" section. Exit code 3 when the loss stops being finite.
"""

import statistics
import time

import torch

from reasoning import checkpoint as ckpt
from reasoning import pretrain
from reasoning.cli import finish_training_script, format_metric, parse_script_args, script_parser
from reasoning.common import get_base_dir, get_compute_dtype, init_distributed, print0, run_main, seed_everything
from reasoning.dataloader import packing_stats
from reasoning.distributed import all_gather_object
from reasoning.flash_attention import resolve_backend
from reasoning.loss_eval import evaluate_val_bpb
from reasoning.mfu import model_flops_utilization, peak_flops
from reasoning.pretrain import STAGE, TrainConfig
from reasoning.resume import load_optimizer_state, load_resume_checkpoint, save_training_checkpoint, start_run
from reasoning.training import (RunLog, RunProgress, accumulate_gradients, autocast_factory, check_step_finite,
                                check_weights_finite, clip_gradients, final_train_loss, format_eta, gradient_norm,
                                run_trainer)

EMA_BETA = 0.9  # smoothing of the printed train loss


def train(config: TrainConfig) -> dict:
    """Pretrain (or resume) a GPT per `config`; returns a summary (metrics, series, per-step losses, paths).

    Raises NonFiniteLossError when the loss or gradient norm stops being finite, UserError on bad settings.
    """
    # ---- setup: processes, tokenizer, model (+ resume), optimizer, batch geometry, data, run folder
    config.validate()
    start_time = time.perf_counter()
    info = init_distributed(config.device)
    rank, world_size, device = info.rank, info.world_size, info.device
    base_dir = config.base_dir or get_base_dir()
    tokenizer, tokenizer_dir = pretrain.load_tokenizer(config, base_dir)
    dtype = get_compute_dtype(device)
    autocast = autocast_factory(device, dtype)
    tag = config.tag or f"d{config.depth}"
    ckpt_dir = ckpt.checkpoint_dir(STAGE, tag, base_dir)
    seed_everything(config.seed)  # the same seed on every rank: identical init without a broadcast
    model_config = pretrain.model_config_of(config, tokenizer)
    config = pretrain.resolve_device_batch(config, model_config, device, world_size)  # before any weight exists
    model = pretrain.build_model(model_config, device)
    data_ranks = world_size * config.simulate_ranks  # every data rank saved its loader position
    resume_meta = load_resume_checkpoint(ckpt_dir, model, device, data_ranks, "loader_states",
                                         meta_types={"ema_loss": float}) if config.resume else None
    fp8_layers = pretrain.convert_to_fp8(model, config)
    optimizer = model.setup_optimizer(config.optimizer_settings(), shard=config.shard_optimizer,
                                      compile_backend=config.optimizer_compile_backend(device))
    if resume_meta is not None:
        load_optimizer_state(ckpt_dir, resume_meta, optimizer, device)
    attention_backend = resolve_backend(device, dtype)  # loads FA3 (once) outside any compiled region
    compiled = config.compile_model(model, device)  # fixed (B, T) rows: dynamic=False
    grad_accum = pretrain.accumulation_steps(config, data_ranks)
    total_batch = config.total_batch_size  # tokens per optimizer step
    num_params = model.num_params()
    num_iterations = pretrain.training_steps(config, model)
    flops_per_token, peak = model.estimate_flops(), peak_flops(device)
    progress = RunProgress(resume_meta, num_iterations, config.stop_at_step, "--num-iterations", start_time)
    loaders, loader_states = pretrain.build_train_loaders(config, tokenizer, rank, world_size, device, resume_meta)
    history = {"val_bpb": [], "train_loss": []} if resume_meta is None else resume_meta["history"]
    ema_loss = 0.0 if resume_meta is None else resume_meta.get("ema_loss", 0.0)
    if resume_meta is not None:
        ckpt.set_rng_state(resume_meta["rng"][rank])
    # settings are checked by now: the tag's owner and the folder's writability are next, before any training
    run_id = start_run(ckpt_dir, resume_meta, config.overwrite, "--tag")
    log = RunLog.for_run(base_dir, f"{STAGE}_{tag}", config, progress.resumed_at)
    print0(f"model: depth {config.depth}, width {model_config.n_embd}, {model_config.n_head} heads, "
           f"{num_params:,} params, {flops_per_token:.3e} FLOPs/token | vocab {tokenizer.vocab_size}")
    print0(f"batch: {total_batch:,} tokens/step = {config.device_batch_size} rows × {config.max_seq_len} tokens × "
           f"{data_ranks} data ranks × {grad_accum} accumulation | {num_iterations} steps "
           f"({num_iterations * total_batch:,} tokens) | device {device} {str(dtype).replace('torch.', '')}, "
           f"attention {attention_backend}{', compiled' if config.compile_on(device) else ''}"
           + progress.resumed_note)

    def save(step: int):
        meta = {
            "train_config": config.to_dict(), "tokenizer_dir": tokenizer_dir, "num_iterations": num_iterations,
            "history": history, "ema_loss": ema_loss, "train_seconds": progress.seconds(),
            "loader_states": [s for states in all_gather_object(loader_states) for s in states],
        }
        save_training_checkpoint(ckpt_dir, step, model, optimizer, meta, config.keep_last, run_id, config.overwrite)

    losses: list[tuple[int, float]] = []
    step_times: list[float] = []
    samples: list[dict] = []
    step = progress.start_step
    try:
        while True:
            # ---- at the step boundary: evaluate, sample, save, stop
            at = progress.at(step)
            if at.evaluate_due(config.eval_every):
                bpb = evaluate_val_bpb(compiled, tokenizer, config.device_batch_size, config.max_seq_len,
                                       config.eval_tokens, config.data_dir, device, dtype, rank, world_size)
                history["val_bpb"].append([step, bpb])
                print0(f"step {step:05d} | val bpb {bpb:.4f}")
                log.log({"step": step, "val_bpb": bpb})
            if rank == 0 and pretrain.sample_due(at, config.sample_every):
                samples = pretrain.sample_completions(model, tokenizer, config.sample_prompts, config.sample_tokens)
                for s in samples:
                    print0(f"  {s['prompt']!r} -> {s['completion']!r}")
            if config.save_every >= 0 and at.save_due(config.save_every):
                save(step)
            if at.last:
                break

            # ---- one optimizer step: forward + backward over the micro-batches, clip, LR, update
            t0 = time.perf_counter()
            micro_batches = pretrain.next_micro_batches(loaders, loader_states, grad_accum)
            loss = accumulate_gradients(compiled, micro_batches, autocast)
            optimizer.reduce_gradients()  # average across ranks now (no-op alone) to measure and clip the norm
            norm = gradient_norm(model).to(loss.device)
            loss_value, norm_value = torch.stack([loss.float(), norm.float()]).tolist()  # one host sync
            check_step_finite(step, loss_value, norm_value, ckpt_dir, run_id)
            clip_gradients(model, config.grad_clip, host_norm=norm_value)
            lr_mult = pretrain.apply_schedules(optimizer, step, config, num_iterations)
            optimizer.step()
            model.zero_grad(set_to_none=True)
            check_weights_finite(model, step, ckpt_dir, run_id)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            dt = time.perf_counter() - t0
            step += 1

            # ---- log
            losses.append((step, loss_value))
            history["train_loss"].append([step, loss_value])
            ema_loss = EMA_BETA * ema_loss + (1 - EMA_BETA) * loss_value
            smooth = ema_loss / (1 - EMA_BETA ** step)  # debiased
            step_times.append(dt)
            tok_per_s = total_batch / dt
            mfu = model_flops_utilization(flops_per_token, tok_per_s, peak, world_size)
            eta = (num_iterations - step) * statistics.median(step_times[-20:])  # median: ignores the compile step
            # share of the packed documents' tokens that reached a row (the rest were cropped), this process's
            # loaders since the start of the run
            pack = packing_stats([loader.counts for loader in loaders])["token_utilization"]
            log.log({"step": step, "loss": loss_value, "smooth_loss": smooth, "lr_mult": lr_mult,
                     "grad_norm": norm_value, "dt": dt, "tok_per_s": tok_per_s, "mfu": mfu, "pack_util": pack})
            if step % config.log_every == 0 or step == num_iterations:
                mfu_text = f"{100 * mfu:.2f}%" if mfu is not None else "n/a"
                print0(f"step {step:05d}/{num_iterations} | loss {loss_value:.4f} (ema {smooth:.4f}) | "
                       f"lr× {lr_mult:.3f} | gnorm {norm_value:.3f} | {dt * 1000:.0f} ms | {tok_per_s:,.0f} tok/s | "
                       f"mfu {mfu_text} | pack {100 * pack:.1f}% | eta {format_eta(eta)}")
    finally:
        log.close()
        for loader in loaders:
            loader.close()

    # ---- summary
    tok_per_s, mfu = pretrain.steady_throughput(step_times, total_batch, flops_per_token, peak, world_size)
    all_counts = [counts for rank_counts in all_gather_object([loader.counts for loader in loaders])
                  for counts in rank_counts]  # every data rank's packing counters (a collective: all ranks call it)
    packing = packing_stats(all_counts)
    val = [v for _, v in history["val_bpb"]]
    metrics = {
        "initial_val_bpb": val[0] if val else None,
        "val_bpb": val[-1] if val else None,
        "min_val_bpb": min(val) if val else None,
        "train_loss": final_train_loss(history["train_loss"]),
        "tok_per_s": tok_per_s,
        "mfu": mfu,
        "pack_utilization": packing["token_utilization"] if packing["tokens_taken"] else None,
        "params": num_params,
        "flops_per_token": flops_per_token,
        "tokens": step * total_batch,
    }
    return {
        "step": step,
        "num_iterations": num_iterations,
        "finished": step == num_iterations,
        "metrics": metrics,
        "series": history,
        "losses": losses,  # (step, loss) of the steps trained in this call
        "samples": samples,
        "seconds": progress.seconds(),
        "checkpoint_dir": ckpt_dir,
        "config": config.to_dict(),
        "model_config": model_config.to_dict(),
        "world_size": world_size,
        "device": str(device),
        "fp8_layers": fp8_layers,
    }


def build_parser():
    parser = script_parser(__doc__)
    TrainConfig.add_args(parser)
    return parser


def main(argv: list[str] | None = None):
    parser = build_parser()
    config = TrainConfig.from_args(parse_script_args(parser, argv))
    summary = run_trainer(train, config)
    m = summary["metrics"]
    finish_training_script(
        "base_train", summary, {"val_bpb": m["val_bpb"], "steps": summary["step"],
                                "tok_per_s": format_metric(m["tok_per_s"], ".0f"), "mfu": m["mfu"]},
        config=summary["config"] | {"model": summary["model_config"]},
        # a metric that was not measured (no eval with --eval-every -1) is left out of the report, not invented
        metrics={k: m[k] for k in ("initial_val_bpb", "val_bpb", "min_val_bpb", "train_loss", "tok_per_s", "mfu",
                                   "pack_utilization", "params") if m[k] is not None},
        base_dir=config.base_dir, tables={"samples": summary["samples"]} if summary["samples"] else None)


if __name__ == "__main__":
    run_main(main)
