"""Latent reasoning (Coconut) fine-tuning: a curriculum that replaces written reasoning steps by continuous
thoughts (reasoning/latent.py); writes <base>/checkpoints/latent/<tag>/.

    # CPU / offline: the synthetic task with 3-4 steps; stage 0 (CoT) then stages 1..4, one latent per step
    python -m scripts.chat_latent --stage sft --task synthetic --max-stage 4 --latents-per-step 1 \\
        --steps-per-stage 200 --device-batch-size 32 --total-batch-rows 32
    # GSM8K in the iCoT format (local JSONL with <<...>> annotations, e.g. ../shared/data), two latents per step
    torchrun --standalone --nproc_per_node=8 -m scripts.chat_latent -- --task GSM8K-iCoT \\
        --data-path ../shared/data --max-stage 3 --latents-per-step 2 --steps-per-stage 2000
    python -m scripts.chat_latent ... --resume      # continue from the last checkpoint of the output tag
    # then: python -m scripts.chat_eval --stage latent -a synthetic   (the latent count comes from the checkpoint)

Curriculum: steps [0, S) train stage --start-stage, [S, 2S) the next, ... up to --max-stage (S = --steps-per-stage).
Stage k replaces the first k written steps by k*c latent positions (c = --latents-per-step); the loss covers the
remaining steps and the answer. --reset-optimizer (default) starts each stage with a fresh optimizer, as Coconut
does; the LR schedule (warmup, decay) runs within each stage. --nocot trains the answer-only baseline instead (no
steps, no latents). The model (any stage's checkpoint) gains the three latent tokens' embedding rows on load.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from reasoning import checkpoint as ckpt
from reasoning.checkpoint import ModelSource, add_model_args
from reasoning.cli import add_run_args, finish_training_script, option, parse_script_args, script_parser
from reasoning.common import (UserError, get_base_dir, get_compute_dtype, get_rank, get_world_size, init_distributed,
                              print0, run_main, seed_everything)
from reasoning.distributed import all_gather_object
from reasoning.evaluation import EvalSettings, broadcast_summary, evaluate_task
from reasoning.latent import (LatentObjective, collate, example_prompt, grow_vocab, render_latent, stage_layout,
                              with_latent_tokens)
from reasoning.resume import load_optimizer_state, load_resume_checkpoint, save_training_checkpoint, start_run
from reasoning.sft import ConversationStream
from reasoning.training import (FinetuneConfig, RunLog, RunProgress, accumulate_gradients, autocast_factory,
                                check_step_finite, check_weights_finite, clip_gradients, final_train_loss,
                                run_trainer, set_learning_rate)
from tasks import registry

STAGE = "latent"
TASKS = ("synthetic", "GSM8K-iCoT")


@dataclass
class LatentConfig(FinetuneConfig):
    """Latent-curriculum settings; optimizer, logging and checkpoint settings come from FinetuneConfig."""
    # data
    task: str = field(default="synthetic", metadata=option("training task", choices=TASKS))
    task_size: int = field(default=20000, metadata=option("training examples (synthetic: generated; -1: all)"))
    synthetic_min_steps: int = field(default=3, metadata=option("fewest operations of a synthetic problem"))
    synthetic_max_steps: int = field(default=4, metadata=option("most operations of a synthetic problem"))
    synthetic_max_operand: int = field(default=10, metadata=option("largest number written in a synthetic problem"))
    max_seq_len: int = field(default=512, metadata=option("tokens per row, latent positions included"))
    # curriculum
    start_stage: int = field(default=0, metadata=option("first curriculum stage (0: CoT)"))
    max_stage: int = field(default=3, metadata=option("last stage: its first K steps are latent"))
    latents_per_step: int = field(default=1, metadata=option("latent positions per replaced step (c)"))
    steps_per_stage: int = field(default=100, metadata=option("optimizer steps of each stage"))
    reset_optimizer: bool = field(default=True, metadata=option("fresh optimizer state at every stage"))
    nocot: bool = field(default=False, metadata=option("answer-only baseline: no written steps, no latents"))
    # batch
    device_batch_size: int = field(default=16, metadata=option("rows per micro-batch per process at most"))
    total_batch_rows: int = field(default=32, metadata=option("rows per optimizer step, all ranks together"))
    # evaluation
    eval_every: int = field(default=-1, metadata=option(
        "greedy accuracy on held-out problems every N steps (0: start and end only, <0: never)"))
    eval_problems: int = field(default=200, metadata=option("held-out problems in that eval"))
    eval_max_tokens: int = field(default=96, metadata=option("new tokens per eval completion"))
    eval_batch_size: int = field(default=64, metadata=option("problems per engine call in the eval"))
    seed: int = field(default=0, metadata=option("seed of the data order"))
    # FinetuneConfig's training-pass memory settings, without flags here: the latent forward runs through a KV cache
    # (reasoning.latent), which neither length-bucketed micro-batches nor block checkpointing apply to
    max_tokens_per_micro_batch: int = field(default=0, metadata=option("", cli=False))
    activation_checkpointing: str = field(default="off", metadata=option("", cli=False))

    def validate(self) -> None:
        super().validate()
        self.require_positive("max_seq_len", "steps_per_stage", "device_batch_size", "total_batch_rows",
                              "eval_problems", "eval_max_tokens", "eval_batch_size", "synthetic_min_steps",
                              "synthetic_max_operand")
        self.require_non_negative("start_stage", "latents_per_step")
        if self.max_stage < self.start_stage:
            raise UserError(f"--max-stage {self.max_stage}: expected >= --start-stage {self.start_stage}")
        if not self.synthetic_min_steps <= self.synthetic_max_steps <= 6:
            raise UserError(f"--synthetic-max-steps {self.synthetic_max_steps}: expected "
                            f"--synthetic-min-steps ({self.synthetic_min_steps}) .. 6")
        if self.task_size == 0 or self.task_size < -1:
            raise UserError(f"--task-size {self.task_size}: expected a positive number of examples or -1")

    @property
    def num_iterations(self) -> int:
        return (self.max_stage - self.start_stage + 1) * self.steps_per_stage

    def stage_at(self, step: int) -> int:
        return min(self.start_stage + step // self.steps_per_stage, self.max_stage)

    def layout_at(self, step: int) -> tuple[int, int]:
        """(written steps removed, latent positions) of the stage training step `step` belongs to."""
        return stage_layout(self.stage_at(step), self.latents_per_step, self.nocot)


def build_task(config: LatentConfig, split: str, size: int | None):
    """The latent task (tasks.registry): examples with messages, "steps" and "answer"."""
    options = {} if config.task != "synthetic" else {
        "num_steps": (config.synthetic_min_steps, config.synthetic_max_steps),
        "max_operand": config.synthetic_max_operand}
    return registry.build_task(config.task, split, config.data_path, config.seed, size, **options)


class LatentStream(ConversationStream):
    """SFT's endless epoch-shuffled stream (rank share, exact position), rendered in a curriculum layout."""

    def next_batch(self, rows: int, layout: tuple[int, int]):
        removed, latents = layout
        rendered = []
        for _ in range(rows):
            _, index = self._global_index(self.position)
            example = self.task[index]
            rendered.append(render_latent(self.tokenizer, example_prompt(self.tokenizer, example), example["steps"],
                                          example["answer"], removed, latents, self.max_seq_len))
            self.position += 1
        return collate(rendered, self.pad_id)


def train(config: LatentConfig, model, tokenizer, source: ModelSource) -> dict:
    """Run the curriculum on `model` (loaded from `source`, a checkpoint.ModelSource), on the device it is on; every
    rank of the process group calls it (collectives inside). Returns the run's summary."""
    # ---- setup: latent vocabulary, output folder, resume, optimizer, data
    device, rank, world_size = next(model.parameters()).device, get_rank(), get_world_size()
    config.validate()
    start_time = time.perf_counter()
    base_dir = config.base_dir or get_base_dir()
    autocast = autocast_factory(device, get_compute_dtype(device))
    tokenizer = with_latent_tokens(tokenizer)
    grow_vocab(model, tokenizer.vocab_size)
    objective = LatentObjective(model)
    tag = config.out_tag or source.tag
    ckpt_dir = ckpt.checkpoint_dir(STAGE, tag, base_dir)
    num_iterations = config.num_iterations
    resume_meta = load_resume_checkpoint(ckpt_dir, model, device, world_size, "positions", source.dir) \
        if config.resume else None

    def new_optimizer():
        return model.setup_optimizer(config.optimizer_settings(),
                                     compile_backend=config.optimizer_compile_backend(device))

    optimizer = new_optimizer()
    if resume_meta is not None:
        load_optimizer_state(ckpt_dir, resume_meta, optimizer, device)
        ckpt.set_rng_state(resume_meta["rng"][rank])
    if config.total_batch_rows % world_size:
        raise UserError(f"--total-batch-rows {config.total_batch_rows}: expected a multiple of the world size "
                        f"{world_size}")
    rank_rows = config.total_batch_rows // world_size
    micro_rows = [min(config.device_batch_size, rank_rows - start)
                  for start in range(0, rank_rows, config.device_batch_size)]
    train_task = build_task(config, "train", None if config.task_size == -1 else config.task_size)
    eval_task = build_task(config, "test", config.eval_problems) if config.eval_every >= 0 else None
    position = 0 if resume_meta is None else resume_meta["positions"][rank]
    stream = LatentStream(train_task, tokenizer, config.max_seq_len, rank, world_size, config.seed, position=position)
    progress = RunProgress(resume_meta, num_iterations, config.stop_at_step, "--steps-per-stage", start_time)
    history = {"train_loss": [], "accuracy": []} if resume_meta is None else resume_meta["history"]
    run_id = start_run(ckpt_dir, resume_meta, config.overwrite, "--out-tag")
    log = RunLog.for_run(base_dir, f"{STAGE}_{tag}", config, progress.resumed_at)
    print0(f"latent: {len(train_task):,} examples ({config.task}), stages {config.start_stage}..{config.max_stage} x "
           f"{config.steps_per_stage} steps of {config.total_batch_rows} rows, c={config.latents_per_step}"
           f"{', no-CoT baseline' if config.nocot else ''} | from {source.dir} step {source.step} -> "
           f"{ckpt_dir}{progress.resumed_note}")

    def latent_meta(step: int) -> dict:
        stage = config.stage_at(max(step - 1, 0))  # the stage the weights were last trained in
        return {"stage": stage, "latent_steps": stage_layout(stage, config.latents_per_step, config.nocot)[1],
                "latents_per_step": config.latents_per_step, "nocot": config.nocot}

    def evaluate(step: int):
        latent_steps = latent_meta(step)["latent_steps"]
        settings = EvalSettings(max_tokens=config.eval_max_tokens, batch_size=config.eval_batch_size,
                                latent_steps=latent_steps)
        accuracy = broadcast_summary(evaluate_task(model, tokenizer, eval_task, settings))["accuracy"]
        history["accuracy"].append([step, accuracy])
        print0(f"step {step:05d} | stage {config.stage_at(max(step - 1, 0))} | {latent_steps} latent steps | "
               f"accuracy {accuracy:.4f}")
        log.log({"step": step, "accuracy": accuracy, "latent_steps": latent_steps})

    def save(step: int):
        meta = {"latent_config": config.to_dict(), "stage": STAGE, "tokenizer_dir": source.tokenizer_dir,
                "source": {"dir": source.dir, "step": source.step}, "num_iterations": num_iterations,
                "latent": latent_meta(step), "history": history, "train_seconds": progress.seconds(),
                "positions": all_gather_object(stream.position)}
        save_training_checkpoint(ckpt_dir, step, model, optimizer, meta, config.keep_last, run_id, config.overwrite)

    step = progress.start_step
    model.train()
    try:
        while True:
            # ---- at the step boundary: evaluate, save, stop
            at = progress.at(step)
            if eval_task is not None and at.evaluate_due(config.eval_every):
                evaluate(step)
            if at.save_due(config.save_every):
                save(step)
            if at.last:
                break
            step_in_stage = step % config.steps_per_stage
            if step_in_stage == 0 and step > 0 and config.reset_optimizer:  # a new stage starts afresh
                optimizer = new_optimizer()

            # ---- one optimizer step in this stage's layout: forward + backward over the micro-batches, clip, LR
            t0 = time.perf_counter()
            layout = config.layout_at(step)
            micro_batches = []
            for rows in micro_rows:
                batch, targets = stream.next_batch(rows, layout)
                micro_batches.append((batch.to(device), targets.to(device)))
            loss = accumulate_gradients(objective, micro_batches, autocast)
            optimizer.reduce_gradients()  # average across ranks now (no-op alone) to measure and clip the norm
            norm = clip_gradients(model, config.grad_clip)
            loss_value, norm_value = float(loss), float(norm)
            check_step_finite(step, loss_value, norm_value, ckpt_dir, run_id, hint="a lower --lr-scale")
            lr_mult = config.lr_multiplier(step_in_stage, config.steps_per_stage)  # the schedule runs per stage
            set_learning_rate(optimizer, lr_mult)
            optimizer.step()
            model.zero_grad(set_to_none=True)
            check_weights_finite(model, step, ckpt_dir, run_id)
            dt = time.perf_counter() - t0
            step += 1

            # ---- log
            history["train_loss"].append([step, loss_value])
            log.log({"step": step, "loss": loss_value, "stage": config.stage_at(step - 1), "latents": layout[1],
                     "lr_mult": lr_mult, "grad_norm": norm_value, "dt": dt})
            if step % config.log_every == 0 or step == num_iterations:
                print0(f"step {step:05d}/{num_iterations} | stage {config.stage_at(step - 1)} ({layout[1]} latents) | "
                       f"loss {loss_value:.4f} | lr x {lr_mult:.3f} | gnorm {norm_value:.3f} | {dt * 1000:.0f} ms")
    finally:
        log.close()

    # ---- summary
    accuracies = [v for _, v in history["accuracy"]]
    metrics = {"train_loss": final_train_loss(history["train_loss"]),
               "accuracy": accuracies[-1] if accuracies else None, "steps": step,
               "latent_steps": latent_meta(step)["latent_steps"]}
    return {"step": step, "num_iterations": num_iterations, "finished": step == num_iterations, "metrics": metrics,
            "series": history, "seconds": progress.seconds(), "checkpoint_dir": ckpt_dir,
            "config": config.to_dict(), "tag": tag, "world_size": world_size}


def build_parser():
    parser = script_parser(__doc__)
    add_model_args(parser, default_stage="sft")
    LatentConfig.add_args(parser, negatable_booleans=True)
    add_run_args(parser, base_dir=False)  # --base-dir is a LatentConfig field
    return parser


def main(argv: list[str] | None = None):
    args = parse_script_args(build_parser(), argv)
    config = LatentConfig.from_args(args)
    config.validate()

    info = init_distributed(args.device)
    seed_everything(config.seed)
    source = ModelSource.from_args(args, config.base_dir)
    model, tokenizer, _ = source.load(info.device, phase="train")
    summary = run_trainer(train, config, model, tokenizer, source)
    m = summary["metrics"]
    finish_training_script(
        "chat_latent", summary, {k: m[k] for k in ("train_loss", "accuracy", "latent_steps")} | {"steps": m["steps"]},
        config=summary["config"] | {"source": {"dir": source.dir, "step": source.step},
                                    "world_size": summary["world_size"]},
        metrics=m, base_dir=config.base_dir)


if __name__ == "__main__":
    run_main(main)
