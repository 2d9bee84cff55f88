"""Supervised fine-tuning of a checkpoint on chat conversations; writes <base>/checkpoints/sft/. The loop is `train`.

    # CPU / offline (runs/runcpu.sh): the synthetic task, worked steps in the think span, \\boxed{} answer
    python -m scripts.chat_sft --task synthetic --num-iterations 300 --device-batch-size 16 --max-seq-len 256
    # GPUs: the default reasoning mixture (hub, or local files with --data-path DIR)
    torchrun --standalone --nproc_per_node=8 -m scripts.chat_sft -- \\
        --task "GSM8K*2,MATH,SmolTalk" --max-seq-len 2048 --device-batch-size 16 --total-batch-rows 256 \\
        --eval-task GSM8K --run sft_d20
    python -m scripts.chat_sft ... --resume          # continue from the last checkpoint of the output tag

The source model comes from --stage/--tag/--step/--init-from (default: the newest base checkpoint); the output tag
defaults to the source's tag (--out-tag overrides). Every other flag is a field of reasoning.sft.SFTConfig (the data
stream, its micro-batches and the evaluations live in reasoning.sft; reasoning.training holds what every trainer's
loop shares). Metrics go to <base>/logs/sft_<tag>.jsonl (and wandb with --run NAME); on success the report gets a
"chat_sft" section (train/val loss, accuracy on the held-out eval slice, loss curves). Exit code 3 when the loss
diverges.
"""

import time

from reasoning import checkpoint as ckpt
from reasoning import sft
from reasoning.checkpoint import ModelSource, add_model_args
from reasoning.checkpointing import set_activation_checkpointing
from reasoning.cli import add_run_args, finish_training_script, parse_script_args, script_parser
from reasoning.common import (get_base_dir, get_compute_dtype, get_rank, get_world_size, init_distributed, print0,
                              run_main, seed_everything)
from reasoning.distributed import all_gather_object
from reasoning.resume import load_optimizer_state, load_resume_checkpoint, save_training_checkpoint, start_run
from reasoning.sft import STAGE, ConversationStream, SFTConfig
from reasoning.training import (RunLog, RunProgress, accumulate_gradients, autocast_factory, check_step_finite,
                                check_weights_finite, clip_gradients, run_trainer, set_learning_rate)
from tasks.registry import build_sft_tasks


def train(config: SFTConfig, model, tokenizer, source: ModelSource, tasks=None) -> dict:
    """Fine-tune `model` (loaded from `source`, a checkpoint.ModelSource) per `config`, on the device it is on; every
    rank of the process group calls it (collectives inside).

    `tasks` = (train, val, gen_eval) overrides tasks.registry.build_sft_tasks (tests). Returns a summary: metrics,
    series, checkpoint dir, steps."""
    # ---- setup: tasks, resume, optimizer, batch geometry, data stream, run folder
    device, rank, world_size = next(model.parameters()).device, get_rank(), get_world_size()
    config.validate()
    config = sft.resolve_device_batch(config, model.config, device, world_size)
    set_activation_checkpointing(model, config.activation_checkpointing)
    start_time = time.perf_counter()
    base_dir = config.base_dir or get_base_dir()
    autocast = autocast_factory(device, get_compute_dtype(device))
    train_task, val_task, eval_task = tasks if tasks is not None else build_sft_tasks(config)
    tag = config.out_tag or source.tag
    ckpt_dir = ckpt.checkpoint_dir(STAGE, tag, base_dir)
    # weights, optimizer, stream positions, RNG and history from our own last checkpoint
    resume_meta = load_resume_checkpoint(ckpt_dir, model, device, world_size, "positions", source.dir) \
        if config.resume else None
    optimizer = model.setup_optimizer(config.optimizer_settings(),
                                      compile_backend=config.optimizer_compile_backend(device))
    compiled = config.compile_model(model, device, dynamic=None)  # padded rows: the length varies per micro-batch
    if resume_meta is not None:
        load_optimizer_state(ckpt_dir, resume_meta, optimizer, device)
    micro_rows = sft.micro_batch_rows(config, world_size)
    position = 0 if resume_meta is None else resume_meta["positions"][rank]
    stream = ConversationStream(train_task, tokenizer, config.max_seq_len, rank, world_size, config.seed,
                                config.pack, position)
    sft.check_trainable(stream, config)
    num_iterations = sft.training_steps(config, stream)
    progress = RunProgress(resume_meta, num_iterations, config.stop_at_step, "--num-iterations", start_time)
    history = {"train_loss": [], "val_loss": [], "accuracy": []} if resume_meta is None else resume_meta["history"]
    if resume_meta is not None:
        ckpt.set_rng_state(resume_meta["rng"][rank])
    # settings are checked by now: the tag's owner and the folder's writability are next, before any training
    run_id = start_run(ckpt_dir, resume_meta, config.overwrite, "--out-tag")
    log = RunLog.for_run(base_dir, f"{STAGE}_{tag}", config, progress.resumed_at)
    print0(f"sft: {len(train_task):,} conversations ({config.task}), {num_iterations} steps of "
           f"{config.total_batch_rows} rows ({world_size} ranks x {len(micro_rows)} micro-batches of <= "
           f"{config.device_batch_size} rows, {'packed' if config.pack else 'padded'}, <= {config.max_seq_len} "
           f"tokens) | from {source.dir} step {source.step} -> {ckpt_dir}{progress.resumed_note}")

    def evaluate(step: int):
        record = {"step": step}
        if val_task is not None and len(val_task):
            record["val_loss"] = sft.validation_loss(model, tokenizer, val_task, config.max_seq_len,
                                                     config.device_batch_size, device, autocast)
            history["val_loss"].append([step, record["val_loss"]])
        if eval_task is not None and len(eval_task):
            record["accuracy"] = sft.generative_accuracy(model, tokenizer, eval_task, config)
            history["accuracy"].append([step, record["accuracy"]])
        if len(record) > 1:
            print0(f"step {step:05d} | " + " | ".join(f"{k} {v:.4f}" for k, v in record.items() if k != "step"))
            log.log(record)

    def save(step: int):
        meta = {
            "sft_config": config.to_dict(), "stage": STAGE, "tokenizer_dir": source.tokenizer_dir,
            "source": {"dir": source.dir, "step": source.step}, "num_iterations": num_iterations,
            "history": history, "train_seconds": progress.seconds(), "positions": all_gather_object(stream.position),
        }
        save_training_checkpoint(ckpt_dir, step, model, optimizer, meta, config.keep_last, run_id, config.overwrite)

    step = progress.start_step
    losses: list[tuple[int, float]] = []
    model.train()
    try:
        while True:
            # ---- at the step boundary: evaluate, save, stop
            at = progress.at(step)
            if at.evaluate_due(config.eval_every):
                evaluate(step)
            if at.save_due(config.save_every):
                save(step)
            if at.last:
                break

            # ---- one optimizer step: forward + backward over the micro-batches, clip, LR, update
            t0 = time.perf_counter()
            micro_batches = sft.next_micro_batches(stream, micro_rows, device, config.max_tokens_per_micro_batch)
            valid = sum(int((t >= 0).sum()) for _, t in micro_batches)
            loss = accumulate_gradients(compiled, micro_batches, autocast)
            optimizer.reduce_gradients()  # average across ranks now (no-op alone) to measure and clip the norm
            norm = clip_gradients(model, config.grad_clip)
            loss_value, norm_value = float(loss), float(norm)
            check_step_finite(step, loss_value, norm_value, ckpt_dir, run_id, hint="a lower --lr-scale")
            lr_mult = config.lr_multiplier(step, num_iterations)
            set_learning_rate(optimizer, lr_mult)
            optimizer.step()
            model.zero_grad(set_to_none=True)
            check_weights_finite(model, step, ckpt_dir, run_id)
            dt = time.perf_counter() - t0
            step += 1

            # ---- log
            losses.append((step, loss_value))
            history["train_loss"].append([step, loss_value])
            log.log({"step": step, "loss": loss_value, "lr_mult": lr_mult, "grad_norm": norm_value,
                     "valid_tokens": valid, "epoch": stream.epoch(), "dt": dt})
            if step % config.log_every == 0 or step == num_iterations:
                print0(f"step {step:05d}/{num_iterations} | loss {loss_value:.4f} | lr x {lr_mult:.3f} | "
                       f"gnorm {norm_value:.3f} | epoch {stream.epoch():.2f} | {valid} tokens (rank 0) | "
                       f"{dt * 1000:.0f} ms")
    finally:
        log.close()

    # ---- summary
    return {
        "step": step, "num_iterations": num_iterations, "finished": step == num_iterations,
        "metrics": sft.sft_metrics(history, step, stream.epoch()),
        "series": {name: sft.downsample(points) for name, points in history.items()}, "losses": losses,
        "seconds": progress.seconds(), "checkpoint_dir": ckpt_dir,
        "config": config.to_dict(), "tag": tag, "world_size": world_size,
    }


def build_parser():
    parser = script_parser(__doc__)
    add_model_args(parser, default_stage="base")
    SFTConfig.add_args(parser)
    add_run_args(parser, base_dir=False)  # --base-dir is an SFTConfig field
    return parser


def main(argv: list[str] | None = None):
    parser = build_parser()
    args = parse_script_args(parser, argv)
    config = SFTConfig.from_args(args)
    config.validate()

    info = init_distributed(args.device)
    seed_everything(config.seed)
    source = ModelSource.from_args(args, config.base_dir)
    model, tokenizer, _ = source.load(info.device, phase="train")
    summary = run_trainer(train, config, model, tokenizer, source)
    m = summary["metrics"]
    finish_training_script(
        "chat_sft", summary, {k: m[k] for k in ("train_loss", "val_loss", "accuracy")} | {"steps": summary["step"]},
        config=summary["config"] | {"source": {"dir": source.dir, "step": source.step},
                                    "world_size": summary["world_size"]},
        metrics=m, base_dir=config.base_dir)


if __name__ == "__main__":
    run_main(main)
