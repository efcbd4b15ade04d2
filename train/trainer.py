"""The training loop: Medusa-1 (heads on a frozen base), Medusa-2 (joint) and plain LM pretraining.

State in, state out: `{"params", "opt_state", "step", "rng"}` is one pytree, sharded by the fsdp rule and
donated to one jitted step (gradient accumulation is a `lax.scan` over micro-batches inside it). What is
trained is kept in float32 and cast to `compute_dtype` for the forward; a frozen base is kept in the
compute dtype only and passed as an argument, so Medusa-1 computes no gradient for it at all; with LoRA the
base is frozen the same way and only its adapters (float32) train, merged into the weights at export.
Checkpoints (Orbax) hold the state and the data position, so a resumed run continues bit for bit.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import sys
import time
from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from jaxmedusa import sharding
from jaxmedusa.atomic import atomic_open, write_json
from jaxmedusa.heads import MedusaHeads
from jaxmedusa.heads_io import save_heads
from jaxmedusa.loading import Model, load, load_tokenizer, save
from jaxmedusa.models import CausalLM, ModelConfig, abstract_lm, create_lm
from jaxmedusa.models.lora import add_lora, merged_state, peft_adapter_tensors, save_peft_adapter

from . import losses, run_dir
from .checkpointing import Checkpointer
from .config import TrainConfig, TrainConfigError
from .data import ChatRenderer, DataError, TokenizedData, get_batch, load_conversations, tokenize
from .sharding import check_batch, global_batch, make_mesh, tree_shardings


def _cast(tree, dtype):
    return jax.tree_util.tree_map(lambda x: x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x, tree)


def lr_schedule(peak: float, steps: int, warmup_ratio: float, min_lr_ratio: float, offset: int = 0):
    """Linear warm-up then cosine decay to min_lr_ratio * peak over `steps - offset` steps, after `offset`
    steps at zero (a frozen phase)."""
    span = max(steps - offset, 1)
    warmup = int(round(warmup_ratio * span))
    main = optax.warmup_cosine_decay_schedule(0.0, peak, max(warmup, 0), max(span, warmup + 1),
                                              end_value=peak * min_lr_ratio) if warmup else \
        optax.cosine_decay_schedule(peak, span, alpha=min_lr_ratio)
    if offset == 0:
        return main
    return optax.join_schedules([optax.constant_schedule(0.0), main], [offset])


def make_optimizer(cfg: TrainConfig) -> optax.GradientTransformation:
    """AdamW (decay on matrices only) after global-norm clipping; medusa2 gives heads and base their own lr."""
    def adamw(schedule):
        return optax.adamw(schedule, weight_decay=cfg.weight_decay,
                           mask=lambda p: jax.tree_util.tree_map(lambda x: x.ndim >= 2, p))

    sched = partial(lr_schedule, steps=cfg.steps, warmup_ratio=cfg.warmup_ratio, min_lr_ratio=cfg.min_lr_ratio)
    if cfg.mode != "medusa2":
        return optax.chain(optax.clip_by_global_norm(cfg.grad_clip), adamw(sched(cfg.learning_rate)))
    base = adamw(sched(cfg.learning_rate, offset=cfg.heads_warmup_steps))
    heads = adamw(sched(cfg.learning_rate * cfg.heads_lr_multiplier))
    # the heads at their own lr; the base (or its LoRA adapters) at learning_rate
    labels = lambda p: {k: jax.tree_util.tree_map(lambda _: "heads" if k == "heads" else "base", v)  # noqa: E731
                        for k, v in p.items()}
    return optax.chain(optax.clip_by_global_norm(cfg.grad_clip),
                       optax.multi_transform({"base": base, "heads": heads}, labels))


@dataclasses.dataclass
class Models:
    """The graphdefs (built at the compute dtype) and the initial states of what the run uses."""

    config: ModelConfig
    lm_graphdef: Any  # with LoRA adapters when cfg.lora
    heads_graphdef: Any | None
    params: dict  # trained: {"lm": State?, "lora": State?, "heads": State?} in float32
    frozen: dict  # not trained, compute dtype: {"lm": State} (medusa1, or the base under LoRA) and/or
    #               {"teacher": State} (distill_kl without LoRA; with LoRA the frozen base is the teacher)
    tokenizer: Any
    base_graphdef: Any = None  # the model without adapters (the teacher of distill_kl)


def heads_graphdef(cfg: TrainConfig, mcfg: ModelConfig, dtype):
    """The graphdef of the run's heads at `dtype` (compute dtype for training, float32 for export)."""
    return nnx.split(nnx.eval_shape(lambda: MedusaHeads(
        mcfg.embed_dim, mcfg.vocab_size, cfg.heads, cfg.head_layers, shared_lm_head=cfg.shared_lm_head,
        dtype=dtype, rngs=nnx.Rngs(0))))[0]


def build_models(cfg: TrainConfig, tensor: int = 1) -> Models:
    """Loads (or initialises) the base, creates fresh heads, and splits trained from frozen state (the base's
    fused products interleaved for `tensor` devices, see models_for)."""
    cd = jnp.dtype(cfg.compute_dtype)
    if cfg.model is not None:  # a frozen base (medusa1, LoRA) is only ever used at the compute dtype
        frozen_base = not cfg.trains_base or cfg.lora is not None
        base = load(cfg.model, dtype=cd if frozen_base else jnp.float32, max_len=cfg.seq_len)
        lm, mcfg = base.lm, base.config
        tokenizer = load_tokenizer(cfg.tokenizer) if cfg.tokenizer else base.tokenizer
    else:
        try:
            mcfg = ModelConfig.from_hf_dict(dict(cfg.model_init))
        except ValueError as e:
            raise TrainConfigError(f"model_init: {e}") from None
        lm = create_lm(mcfg, dtype=jnp.float32, rngs=nnx.Rngs(cfg.seed))
        tokenizer = load_tokenizer(cfg.tokenizer) if cfg.tokenizer else None
    if tokenizer is None:
        raise TrainConfigError("tokenizer: the model directory has no tokenizer; set tokenizer: DIR")
    if len(tokenizer) > mcfg.vocab_size:
        raise TrainConfigError(f"tokenizer: {len(tokenizer)} tokens do not fit the model's vocab_size "
                               f"{mcfg.vocab_size}")
    return models_for(cfg, lm, tokenizer, tensor)


def models_for(cfg: TrainConfig, lm: CausalLM, tokenizer=None, tensor: int = 1) -> Models:
    """The run's Models around a base already in memory (loaded by build_models, or random at real shapes in
    bench/train.py): fresh heads and adapters, the trained state split from the frozen one. With a `tensor`
    mesh axis > 1 the base's fused q/k/v and gate/up columns are interleaved per device, as inference does
    (sharding.interleave_fused: no part crosses devices); export writes the checkpoint's order back. LoRA
    keeps the checkpoint order (its adapters address the parts' columns as they are there)."""
    mcfg = lm.config
    cd = jnp.dtype(cfg.compute_dtype)
    if tensor > 1 and cfg.lora is None:
        flat = nnx.to_flat_state(nnx.state(lm))
        moved = sharding.interleave_fused(lm, {p: v.get_value() for p, v in flat}, tensor)
        nnx.update(lm, nnx.from_flat_state([(p, v.replace(value=moved[p])) for p, v in flat]))
    base_graphdef = lm_graphdef = nnx.split(abstract_lm_like(lm, cd))[0]
    if cfg.lora is not None:
        lm_graphdef = nnx.split(lora_lm(cfg, mcfg, cd))[0]
    _, lm_state = nnx.split(lm)
    params, frozen = {}, {}
    heads_gd = None
    if cfg.trains_heads:
        heads = MedusaHeads.for_model(lm, cfg.heads, cfg.head_layers, shared_lm_head=cfg.shared_lm_head,
                                      rngs=nnx.Rngs(cfg.seed + 1))
        heads_gd = heads_graphdef(cfg, mcfg, cd)
        params["heads"] = nnx.split(heads)[1]
    if cfg.lora is not None:  # the adapters train; the base stays frozen (and is distill_kl's teacher)
        adapted = lora_lm(cfg, mcfg, jnp.float32)
        if cfg.lora.export != "merged":  # refused now, not after the run: an adapter PEFT cannot hold
            try:
                peft_adapter_tensors(adapted)
            except ValueError as e:
                raise TrainConfigError(f"lora.export: {e}") from None
        params["lora"] = nnx.split(adapted, nnx.LoRAParam, ...)[1]
        frozen["lm"] = _cast(lm_state, cd)
    elif cfg.trains_base:
        params["lm"] = lm_state
        if cfg.distill_kl:  # a copy: the trained params are donated to the step, the teacher must not alias them
            frozen["teacher"] = jax.tree_util.tree_map(lambda x: jnp.array(x, dtype=cd, copy=True), lm_state)
    else:
        frozen["lm"] = _cast(lm_state, cd)
    params = _cast(params, jnp.float32)
    return Models(mcfg, lm_graphdef, heads_gd, params, frozen, tokenizer, base_graphdef)


def abstract_lm_like(lm: CausalLM, dtype) -> CausalLM:
    """abstract_lm of lm's config at `dtype`, with lm's tensor-parallel column layout (its modules' shards)."""
    abstract = abstract_lm(lm.config, dtype)
    shards = {path: m.shards for path, m in nnx.iter_modules(lm) if getattr(m, "shards", 1) != 1}
    for path, m in nnx.iter_modules(abstract):
        if path in shards:
            m.shards = shards[path]
    return abstract


def lora_lm(cfg: TrainConfig, mcfg: ModelConfig, dtype):
    """A model of the config's shapes at `dtype` with the run's fresh LoRA adapters (seeded by cfg.seed); only
    its adapters are real arrays (the base weights come from the checkpoint)."""
    lm = abstract_lm(mcfg, dtype)
    try:
        add_lora(lm, cfg.lora.rank, cfg.lora.alpha, cfg.lora.targets, rngs=nnx.Rngs(cfg.seed + 2))
    except ValueError as e:
        raise TrainConfigError(f"lora.targets: {e}") from None
    return lm


def make_loss_fn(cfg: TrainConfig, models: Models):
    """loss(params, frozen, tokens [b, L], mask [b, L], coefficient, denoms, joint) -> (total, metrics).

    denoms: {"lm": [], "heads": [K]} target counts to divide by (the whole step's, under gradient
    accumulation), or None for this batch's own counts.
    """
    cd = jnp.dtype(cfg.compute_dtype)

    def loss_fn(params, frozen, tokens, mask, coefficient, denoms, joint: bool):
        denoms = denoms or {}
        b, t = tokens.shape
        positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
        trained = params.get("lora", params.get("lm"))
        if trained is not None and not joint:
            trained = jax.lax.stop_gradient(trained)
        if cfg.lora is not None:
            lm = nnx.merge(models.lm_graphdef, frozen["lm"], _cast(trained, cd))
        else:
            lm = nnx.merge(models.lm_graphdef, _cast(trained if cfg.trains_base else frozen["lm"], cd))
        hidden, _ = lm(tokens, positions, None, None, remat=cfg.gradient_checkpointing and cfg.trains_base)
        metrics = {}
        total = jnp.float32(0.0)
        if cfg.trains_base:
            if cfg.distill_kl:  # the KL needs the whole logits anyway
                lm_l = losses.lm_loss(lm.logits(hidden), tokens, mask, denoms.get("lm"))
            else:
                lm_l = losses.projected_cross_entropy(lm.logits, hidden, tokens, mask, 1, denoms.get("lm"),
                                                      cfg.loss_chunk)
            metrics.update(lm_loss=lm_l.loss, lm_correct=lm_l.correct, lm_count=lm_l.count)
            if cfg.distill_kl:
                teacher = nnx.merge(models.base_graphdef, frozen["teacher"] if "teacher" in frozen else frozen["lm"])
                th, _ = teacher(tokens, positions, None, None)
                kl = losses.distill_kl(lm.logits(hidden), jax.lax.stop_gradient(teacher.logits(th)), mask,
                                       denoms.get("lm"))
                metrics["kl"] = kl
                total = total + kl
            else:
                total = total + lm_l.loss
        if cfg.trains_heads:
            heads = nnx.merge(models.heads_graphdef, _cast(params["heads"], cd))
            hl = losses.head_losses(heads, hidden, lm.logits, tokens, mask, denoms.get("heads"), cfg.loss_chunk)
            weights = losses.head_weights(cfg.heads, coefficient, cfg.head_decay)
            total = total + jnp.sum(weights * hl.loss)
            metrics.update(head_loss=hl.loss, head_correct=hl.correct, head_count=hl.count)
        metrics["loss"] = total
        return total, metrics

    return loss_fn


def make_train_step(cfg: TrainConfig, models: Models, tx: optax.GradientTransformation, joint: bool):
    """step(state, frozen, tokens [A, b, L], mask [A, b, L]) -> (state, metrics); A = grad_accum."""
    loss_fn = make_loss_fn(cfg, models)
    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

    def step(state, frozen, tokens, mask):
        params = state["params"]
        coefficient = losses.coefficient_at(state["step"], cfg.steps, cfg.head_coefficient, cfg.coefficient_schedule)
        # every loss is divided by the whole step's target count, so micro-batch gradients simply add up
        denoms = {"lm": losses.target_count(mask, 1),
                  "heads": jnp.stack([losses.target_count(mask, k + 2) for k in range(cfg.heads)])}

        def micro(carry, xs):
            grads, metrics = carry
            (_, m), g = grad_fn(params, frozen, xs[0], xs[1], coefficient, denoms, joint)
            return (jax.tree_util.tree_map(jnp.add, grads, g), jax.tree_util.tree_map(jnp.add, metrics, m)), None

        zero_g = jax.tree_util.tree_map(jnp.zeros_like, params)
        zero_m = jax.tree_util.tree_map(jnp.zeros_like,
                                        jax.eval_shape(lambda: loss_fn(params, frozen, tokens[0], mask[0],
                                                                       coefficient, denoms, joint)[1]))
        (grads, metrics), _ = jax.lax.scan(micro, (zero_g, zero_m), (tokens, mask))
        metrics["grad_norm"] = optax.tree.norm(grads)
        metrics["coefficient"] = coefficient
        updates, opt_state = tx.update(grads, state["opt_state"], params)
        new = dict(params=optax.apply_updates(params, updates), opt_state=opt_state, step=state["step"] + 1,
                   rng=jax.random.fold_in(state["rng"], state["step"]))
        return new, metrics

    return step


def summarize(metrics: dict) -> dict[str, Any]:
    """Host-side numbers for logging: losses, accuracies (correct / count), per head as lists."""
    m = jax.device_get(metrics)
    out: dict[str, Any] = {"loss": float(m["loss"])}
    if "grad_norm" in m:
        out["grad_norm"] = float(m["grad_norm"])
    if "lm_loss" in m:
        out["lm_loss"] = float(m["lm_loss"])
        out["lm_acc"] = float(m["lm_correct"] / max(float(m["lm_count"]), 1.0))
    if "kl" in m:
        out["kl"] = float(m["kl"])
    if "head_loss" in m:
        out["head_loss"] = [float(x) for x in m["head_loss"]]
        out["head_acc"] = [float(c / max(float(n), 1.0)) for c, n in zip(m["head_correct"], m["head_count"])]
    if "coefficient" in m:
        out["coefficient"] = float(m["coefficient"])
    return out


def load_data(cfg: TrainConfig, tokenizer, files) -> TokenizedData:
    renderer = ChatRenderer(tokenizer, cfg.chat_template)
    convs = [c for f in files for c in load_conversations(f)]
    if not convs:
        raise DataError(f"no conversations in {', '.join(files)}")
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    return tokenize(convs, renderer, cfg.seq_len, packing=cfg.packing, pad_id=pad)


@dataclasses.dataclass
class TrainResult:
    params: dict  # the trained float32 state ({"lm", "heads"})
    step: int
    history: list[dict]  # logged metrics
    heads_dir: str | None
    model_dir: str | None


class Trainer:
    """One training run: builds everything from the config, resumes from the latest checkpoint in
    output_dir, trains, checkpoints, logs, and exports at the end."""

    def __init__(self, cfg: TrainConfig, devices=None, *, restart: bool = False, models: Models | None = None,
                 data: TokenizedData | None = None):
        """models / data: prebuilt (models_for) and tokenized instead of read from cfg.model and cfg.data
        (bench/train.py trains a random model at real shapes on synthetic tokens this way)."""
        self.cfg = cfg
        self.restart = restart
        export_model = os.path.realpath(os.path.join(cfg.output_dir, "model"))
        if cfg.trains_base and cfg.model and os.path.realpath(cfg.model) == export_model:
            raise TrainConfigError(f"model: {cfg.model} is where this run exports its trained model; train from a "
                                   f"copy or use another output_dir")
        self.mesh = make_mesh(cfg.mesh, devices)
        check_batch(self.mesh, cfg.batch_size, cfg.grad_accum)
        self.models = build_models(cfg, self.mesh.shape["tensor"]) if models is None else models
        self.data = load_data(cfg, self.models.tokenizer, cfg.data) if data is None else data
        self.eval_data = load_data(cfg, self.models.tokenizer, cfg.eval_data) if cfg.eval_data else None
        if cfg.epochs:
            steps = max(1, math.ceil(cfg.epochs * len(self.data) / cfg.batch_size))
            self.cfg = cfg = dataclasses.replace(cfg, steps=steps)
        self.tx = make_optimizer(cfg)
        state = dict(params=self.models.params, opt_state=self.tx.init(self.models.params), step=jnp.int32(0),
                     rng=jax.random.key_data(jax.random.key(cfg.seed)))
        self.state_sharding = tree_shardings(self.mesh, state)
        self.state_sharding["step"] = self.state_sharding["rng"] = NamedSharding(self.mesh, P())
        self.frozen_sharding = tree_shardings(self.mesh, self.models.frozen)
        self.state = jax.device_put(state, self.state_sharding)
        self.frozen = jax.device_put(self.models.frozen, self.frozen_sharding)
        self.position = 0
        self.checkpointer = Checkpointer(os.path.join(cfg.output_dir, "checkpoints"), cfg.keep_checkpoints)
        self._steps: dict[bool, Any] = {}
        self.history: list[dict] = []

    def _step_fn(self, joint: bool):
        if joint not in self._steps:
            fn = make_train_step(self.cfg, self.models, self.tx, joint)
            replicated = NamedSharding(self.mesh, P())
            self._steps[joint] = jax.jit(fn, out_shardings=(self.state_sharding, replicated), donate_argnums=(0,))
        return self._steps[joint]

    def restore(self) -> bool:
        """Continues from the latest checkpoint in output_dir when it is ahead of the state in memory.
        Returns whether it did."""
        latest = self.checkpointer.latest_step()
        if latest is None or latest <= self.step:
            return False
        if latest > self.cfg.steps:
            raise TrainConfigError(f"steps: {self.cfg.output_dir} holds a checkpoint at step {latest}, past steps="
                                   f"{self.cfg.steps}; raise steps, or use --restart or another output_dir")
        restored = self.checkpointer.restore_latest(self.state, self.state_sharding)
        for skipped in self.checkpointer.skipped:
            print(f"jaxmedusa train: skipped a damaged checkpoint ({skipped})", file=sys.stderr)
        if restored is None:
            return False
        self.state, meta = restored
        self.position = int(meta["position"])
        self._drop_metrics_after(self.step)
        return True

    def _drop_metrics_after(self, step: int) -> None:
        """metrics.jsonl without the rows of steps a resume will run again (logged after the last checkpoint)."""
        path = os.path.join(self.cfg.output_dir, "metrics.jsonl")
        if jax.process_index() != 0 or not os.path.isfile(path):
            return
        with open(path) as f:
            rows = [line for line in f if line.strip()]
        keep = []
        for line in rows:  # a row torn by a kill mid-append is dropped with the rows after the checkpoint
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue
            if row.get("step", 0) <= step:
                keep.append(line if line.endswith("\n") else line + "\n")
        if keep != rows:
            with atomic_open(path, "w") as f:
                f.writelines(keep)

    def batch(self, position: int):
        cfg = self.cfg
        tokens, mask = get_batch(self.data, position, cfg.batch_size, cfg.seed)
        shape = (cfg.grad_accum, cfg.batch_size // cfg.grad_accum, cfg.seq_len)
        return (global_batch(self.mesh, tokens.reshape(shape), 1), global_batch(self.mesh, mask.reshape(shape), 1))

    @property
    def step(self) -> int:
        return int(jax.device_get(self.state["step"]))

    def run(self, until: int | None = None) -> TrainResult:
        """Trains to cfg.steps (or stops after step `until` without exporting, as a killed run would),
        first resuming from the newest checkpoint in output_dir if it is ahead of this trainer's state.
        output_dir is held for the run (run_dir.claim): another process, or other settings, are refused."""
        cfg = self.cfg
        restart, self.restart = self.restart, False  # a restart clears output_dir once, not on every run()
        inputs = (cfg.model, cfg.tokenizer, *cfg.data, *cfg.eval_data)
        claimed = (run_dir.claim(cfg.output_dir, cfg.to_dict(), restart=restart, inputs=inputs)
                   if jax.process_index() == 0 else contextlib.nullcontext())
        with claimed:
            if restart:
                if jax.process_count() > 1:  # the others wait until process 0 has cleared output_dir
                    from jax.experimental import multihost_utils

                    multihost_utils.sync_global_devices("jaxmedusa-restart")
                self.checkpointer = Checkpointer(os.path.join(cfg.output_dir, "checkpoints"), cfg.keep_checkpoints)
            return self._run(until)

    def _run(self, until: int | None) -> TrainResult:
        from tqdm.auto import tqdm

        cfg = self.cfg
        self.restore()
        start = self.step
        last = cfg.steps if until is None else min(until, cfg.steps)
        bar = tqdm(total=cfg.steps, initial=start, disable=not cfg.progress or jax.process_index() != 0,
                   desc=cfg.mode, dynamic_ncols=True)
        tokens_per_step = cfg.batch_size * cfg.seq_len
        t_log, steps_since = time.perf_counter(), 0
        finite, saved = jnp.bool_(True), start
        for step in range(start, last):
            joint = not cfg.trains_base or step >= cfg.heads_warmup_steps
            tokens, mask = self.batch(self.position)
            self.state, metrics = self._step_fn(joint)(self.state, self.frozen, tokens, mask)
            finite = finite & jnp.isfinite(metrics["loss"])  # on device; read at log and checkpoint steps
            self.position += cfg.batch_size
            steps_since += 1
            done = step + 1
            checkpoint = done % cfg.checkpoint_every == 0 or done == cfg.steps
            if (done % cfg.log_every == 0 or done == last or checkpoint) and not bool(finite):
                bar.close()
                raise NonFiniteLoss(f"the loss became NaN or infinite by step {done}; stopped without saving that "
                                    f"state (output_dir keeps its checkpoint of step {saved}); lower learning_rate "
                                    f"or check the data")
            if done % cfg.log_every == 0 or done == last:
                row = summarize(metrics)
                now = time.perf_counter()
                row.update(step=done, position=self.position, tokens_per_s=steps_since * tokens_per_step / (now - t_log))
                t_log, steps_since = now, 0
                self._log(row)
                bar.set_postfix(_postfix(row))
            bar.update(1)
            if checkpoint:
                self.checkpointer.save(done, self.state, {"position": self.position, "step": done})
                saved = done
        bar.close()
        self.checkpointer.wait()
        heads_dir = model_dir = None
        if until is None or until >= cfg.steps:
            if self.eval_data is not None:
                self._log(dict(self.evaluate(), step=self.step, split="eval"))
            heads_dir, model_dir = self.export()
        return TrainResult(params=self.state["params"], step=self.step, history=self.history,
                           heads_dir=heads_dir, model_dir=model_dir)

    def _log(self, row: dict) -> None:
        """Keeps a metrics row and appends it to output_dir/metrics.jsonl (process 0 writes)."""
        self.history.append(row)
        if jax.process_index() == 0:
            with open(os.path.join(self.cfg.output_dir, "metrics.jsonl"), "a") as f:
                f.write(json.dumps(row) + "\n")

    def evaluate(self) -> dict[str, Any]:
        """Loss and per-head accuracy over the whole eval set (no update)."""
        cfg = self.cfg
        loss_fn = jax.jit(partial(make_loss_fn(cfg, self.models), denoms=None, joint=True))
        micro = cfg.batch_size // cfg.grad_accum
        total = None
        n = len(self.eval_data)
        batches = 0
        coefficient = losses.coefficient_at(jnp.int32(cfg.steps), cfg.steps, cfg.head_coefficient,
                                            cfg.coefficient_schedule)
        for i in range(0, n, micro):
            tok = self.eval_data.tokens[i:i + micro]
            msk = self.eval_data.mask[i:i + micro]
            if len(tok) < micro:  # pad the last batch with rows that count nothing
                pad = micro - len(tok)
                tok = np.concatenate([tok, np.zeros((pad, tok.shape[1]), tok.dtype)])
                msk = np.concatenate([msk, np.zeros((pad, msk.shape[1]), bool)])
            _, m = loss_fn(self.state["params"], self.frozen, global_batch(self.mesh, tok),
                           global_batch(self.mesh, msk), coefficient)
            total = m if total is None else jax.tree_util.tree_map(jnp.add, total, m)
            batches += 1
        for key in ("loss", "lm_loss", "kl", "head_loss"):
            if key in total:
                total[key] = total[key] / batches
        return summarize(total)

    def trained_modules(self, merge: bool = True) -> tuple[CausalLM | None, MedusaHeads | None]:
        """The trained base (when trained; with LoRA, merged into the checkpoint's weights unless merge=False:
        then the base's shapes with the trained adapters, no weights) and heads as float32 NNX modules on the
        host."""
        from jax.experimental import multihost_utils

        params = self.state["params"]
        if jax.process_count() > 1:
            params = multihost_utils.process_allgather(params, tiled=True)
        params = jax.device_get(params)
        cfg, mcfg = self.cfg, self.models.config
        lm = heads = None
        if "lm" in params:  # float32, in the run's column layout (save() writes the checkpoint's order)
            state = jax.tree_util.tree_map(jnp.asarray, params["lm"])
            layout = nnx.merge(self.models.lm_graphdef, state)  # the compute-dtype model, read for its layout
            lm = nnx.merge(nnx.split(abstract_lm_like(layout, jnp.float32))[0], state)
        if "lora" in params:
            lm = lora_lm(cfg, mcfg, jnp.float32)
            nnx.update(lm, jax.tree_util.tree_map(jnp.asarray, params["lora"]))
            if merge:
                lm = merge_lora(cfg, lm)
        if "heads" in params:
            heads = nnx.merge(heads_graphdef(cfg, mcfg, jnp.float32),
                              jax.tree_util.tree_map(jnp.asarray, params["heads"]))
        return lm, heads

    def export(self) -> tuple[str | None, str | None]:
        """Writes output_dir/heads (official heads-only layout) and, when the base was trained,
        output_dir/model (an HF model directory with the tokenizer); with LoRA, the model has the adapters
        merged and/or output_dir/adapter holds them as a PEFT adapter (lora.export)."""
        lora = self.cfg.lora
        lm, heads = self.trained_modules(merge=False)  # adapters merged below, by the process that writes
        if jax.process_index() != 0:
            return None, None
        out = self.cfg.output_dir
        model_dir = heads_dir = None
        if lora is not None:
            if lora.export != "merged":
                save_peft_adapter(lm, os.path.join(out, "adapter"), base_model=self.cfg.model)
            lm = merge_lora(self.cfg, lm) if lora.export != "adapter" else None
        if lm is not None:
            model_dir = os.path.join(out, "model")
            save(Model(lm=lm, tokenizer=self.models.tokenizer), model_dir)
        if heads is not None:
            heads_dir = os.path.join(out, "heads")
            save_heads(heads, heads_dir, base_model=model_dir or self.cfg.model)
        write_json(os.path.join(out, "train_config.json"), self.cfg.to_dict())
        return heads_dir, model_dir


def merge_lora(cfg: TrainConfig, adapted: CausalLM) -> CausalLM:
    """The float32 model with `adapted`'s trained adapters merged in: the original checkpoint's weights
    (reloaded on the host, not the compute-dtype copy that trained) plus scale * A @ B, computed in float32."""
    with jax.default_device(jax.devices("cpu")[0]):
        lm = load(cfg.model, dtype=jnp.float32, max_len=cfg.seq_len).lm
        add_lora(lm, cfg.lora.rank, cfg.lora.alpha, cfg.lora.targets, rngs=nnx.Rngs(0))
        nnx.update(lm, nnx.state(adapted, nnx.LoRAParam))
        return nnx.merge(nnx.split(abstract_lm(lm.config, jnp.float32))[0], merged_state(lm))


def _postfix(row: dict) -> dict[str, str]:
    out = {"loss": f"{row['loss']:.3f}"}
    if "head_acc" in row:
        out["acc"] = "/".join(f"{a:.2f}" for a in row["head_acc"])
    if "lm_acc" in row:
        out["lm_acc"] = f"{row['lm_acc']:.2f}"
    out["tok/s"] = f"{row['tokens_per_s']:.0f}"
    return out


def train(cfg: TrainConfig, devices=None, *, restart: bool = False) -> TrainResult:
    """Runs (or resumes) a training run to the end and exports heads (and the base when trained).

    restart: start over in output_dir, removing what an earlier run wrote there (checkpoints, metrics, exports).
    """
    return Trainer(cfg, devices, restart=restart).run()


class NonFiniteLoss(RuntimeError):
    """Training produced a NaN or infinite loss; the run stopped before checkpointing that state."""
