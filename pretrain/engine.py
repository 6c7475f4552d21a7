"""DeepSpeed pre-training of the two LangCell stages, and export of a run.

    RUN/run.json                 model config, pretrain config, library path (written once)
    RUN/vocab/ RUN/tokenizer/    the gene vocabulary and text tokenizer the run trains with
    RUN/text_bert_config.json    the text encoder's shape, so export needs no hub access
    RUN/stage{1,2}/checkpoints/  DeepSpeed checkpoints (tags stepNNNNNNN, `latest`), each with
                                 stream_rankNNNNN.json per rank (where its data stream stood)
    RUN/stage{1,2}/metrics.jsonl one line per logged step; RUN/stage{n}/tb/ TensorBoard
    RUN/stage1/final_model.pt    consolidated fp32 weights that stage 2 starts from
    RUN/stage{n}/done.json       written when the stage has run all its steps

Determinism: the batch of (rank, micro-step) is fixed by the data stream (see data.py) and
every random draw of a micro-step (masking, dropout, hard negatives) comes from the global
RNG seeded with (seed, stage, step, micro-step, rank); a resumed run therefore repeats the
losses of an uninterrupted one. Each checkpoint holds every rank's stream position
(`stream_rankNNNNN.json`: shard order, open shards and byte offsets, the shuffle buffer as
(shard, offset) references, RNG states, the batch within its window), so resuming reads the
shuffle buffer and one window again, whatever the step.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import socket
import time
from dataclasses import asdict
from pathlib import Path

from langcell.core.errors import LangCellError
from langcell.core.files import atomic_path, atomic_write_bytes, atomic_write_json, output_lock, read_json
from langcell.pretrain.config import DEEPSPEED_CONFIG_DIR, PretrainConfig, load_model_config, load_pretrain_config
from langcell.pretrain.flops import batch_shapes, step_flops
from langcell.pretrain.losses import masked_gene_count


# ----------------------------------------------------------------------------- setup
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _init_distributed():
    """Start (or reuse) the process group; a launcher-less process becomes rank 0 of 1."""
    import torch
    on_gpu = torch.cuda.is_available()
    if not on_gpu:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    if "RANK" not in os.environ:
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(_free_port()))
    import deepspeed
    if on_gpu:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    else:
        _no_cpu_ops(deepspeed)
    if not torch.distributed.is_initialized():
        deepspeed.init_distributed(dist_backend="nccl" if on_gpu else "gloo")
    return torch.distributed.get_rank(), torch.distributed.get_world_size(), on_gpu


def _no_cpu_ops(deepspeed) -> None:
    """On CPU, DeepSpeed's communication backend JIT-compiles its shared-memory all-reduce op when
    the op looks buildable: a C++ compiler and ninja at run time, minutes of a small machine's cores,
    and a failed run where there is no compiler. Marked unavailable, collectives go through gloo,
    which needs nothing built; the optimizer is torch's AdamW, so no other op is needed on CPU.
    Set before DeepSpeed probes every op's compatibility (which itself calls the compiler), so the
    probe never runs."""
    deepspeed.ops.__dict__.setdefault("__compatible_ops__", {})["deepspeed_shm_comm"] = False


def _collective_device():
    """NCCL reduces only CUDA tensors; gloo only CPU ones."""
    import torch
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")


def load_deepspeed_config(name_or_path: str, on_gpu: bool) -> dict:
    path = Path(name_or_path)
    if not path.is_file():
        path = DEEPSPEED_CONFIG_DIR / name_or_path
    cfg = read_json(path, "DeepSpeed config")
    if not isinstance(cfg, dict):
        raise LangCellError(f"{path}: must be a JSON object; see configs/deepspeed/zero2.json")
    if cfg.get("fp16", {}).get("enabled") not in (None, False) and not on_gpu:
        raise LangCellError(f"{path}: fp16 is not supported on CPU; set fp16.enabled to false "
                            "(use bf16 or fp32)")
    if "optimizer" in cfg or "scheduler" in cfg:
        raise LangCellError(f"{path}: 'optimizer'/'scheduler' are set by configs/pretrain (lr, warmup); "
                            "remove them from the DeepSpeed config")
    batching = [k for k in ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps",
                            "gradient_clipping") if k in cfg]
    if batching:
        raise LangCellError(f"{path}: {', '.join(batching)} are set by configs/pretrain (micro_batch_size, "
                            "grad_accum_steps, grad_clip); remove them from the DeepSpeed config")
    bf16 = cfg.setdefault("bf16", {})
    if bf16.get("enabled") == "auto":
        bf16["enabled"] = on_gpu
    elif bf16.get("enabled") and not on_gpu:
        bf16["enabled"] = False  # CPU runs in fp32: DeepSpeed's CPU bf16 path is slower, not faster
    cfg["_path"] = str(path)
    return cfg


def _check_library(data: str, vocab_size: int, rank: int, world: int):
    """Shards and vocab checked before any training; each rank hashes a slice of the shards."""
    import torch

    from langcell.pretrain.data import library_shards, library_vocab_size, verify_shards
    shards = library_shards(data, "train")
    lib_vocab = library_vocab_size(data)
    if lib_vocab != vocab_size:
        raise LangCellError(f"{data}/vocab/token_dictionary.json: {lib_vocab} tokens but the model's cell "
                            f"vocab_size is {vocab_size}; set cell.vocab_size in the model config to {lib_vocab}")
    error = ""
    try:
        verify_shards(shards[rank::world], data)
    except LangCellError as exc:
        error = str(exc)
    flag = torch.tensor([1 if error else 0], device=_collective_device())
    torch.distributed.all_reduce(flag)
    if flag.item():
        raise LangCellError(error or f"{data}: a shard failed its checksum on another rank; see that rank's log")
    return [p for p, _ in shards]


def _lr_lambda(stage_cfg, start: int = 0):
    """Linear warm-up from step `start` (0 before it), then cosine decay to min_lr_ratio."""
    warm, total, floor = stage_cfg.warmup_steps, stage_cfg.max_steps, stage_cfg.min_lr_ratio

    def f(step: int) -> float:
        if step < start:
            return 0.0
        if step - start < warm:
            return (step - start + 1) / warm
        progress = min(1.0, (step - start - warm) / max(1, total - start - warm))
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))
    return f


# Which part of the model a parameter belongs to, for its learning-rate multiplier.
PARTS = (("cell", ("cell_bert.",)), ("text", ("text_bert.",)),
         ("proj", ("cell_proj.", "text_proj.", "logit_scale")), ("heads", ("mlm_head.", "ctm_head.")))


def _part(name: str) -> str:
    if name.startswith("text_bert.") and ".crossattention." in name:
        return "cross"
    for part, prefixes in PARTS:
        if name.startswith(prefixes):
            return part
    raise LangCellError(f"parameter {name}: belongs to no part of {[p for p, _ in PARTS]}; add it to PARTS")


def freeze_unused(model, stage: int, weights) -> None:
    """Parameters that no objective of the stage trains get no gradient (ZeRO partitions only
    trainable parameters and expects a gradient for each of them)."""
    unused = []
    if not weights.mlm:
        unused.append("mlm_head.")
    if not weights.cell_cell and not (stage == 2 and weights.cell_text):
        unused.append("cell_proj.")
    if stage == 1 or not weights.cell_text:
        unused += ["logit_scale", "text_proj."]
    if stage == 2 and not weights.ctm:
        unused += ["ctm_head."] + [f"text_bert.encoder.layer.{i}.crossattention."
                                   for i in range(len(model.text_bert.encoder.layer))]
    for name, p in model.named_parameters():
        if name.startswith(tuple(unused)):
            p.requires_grad_(False)


def _optimizer(model, stage_cfg):
    """AdamW with one group per (part, decay or not): each part's learning rate is the stage's
    times its multiplier, and the text encoder's stays 0 for `freeze_text_steps`."""
    import torch
    groups: dict[tuple, list] = {}
    for name, p in model.named_parameters():
        if p.requires_grad:
            decay = not (p.ndim < 2 or "LayerNorm" in name)
            groups.setdefault((_part(name), decay), []).append(p)
    multipliers = stage_cfg.lr_multipliers
    params, lambdas = [], []
    for (part, decay), members in groups.items():
        params.append({"params": members, "lr": stage_cfg.lr * getattr(multipliers, part),
                       "weight_decay": stage_cfg.weight_decay if decay else 0.0})
        lambdas.append(_lr_lambda(stage_cfg, stage_cfg.freeze_text_steps if part == "text" else 0))
    opt = torch.optim.AdamW(params, lr=stage_cfg.lr, betas=(0.9, 0.98), eps=1e-6)
    return opt, torch.optim.lr_scheduler.LambdaLR(opt, lambdas)


# ----------------------------------------------------------------------------- weights
def consolidated_state_dict(ckpt_dir: Path, tag: str | None = None) -> dict:
    """fp32 weights of checkpoint `tag` (default: the latest) in `ckpt_dir`, from any ZeRO stage."""
    import torch
    tag = tag or (ckpt_dir / "latest").read_text().strip()
    if not (ckpt_dir / tag).is_dir():
        raise LangCellError(f"{ckpt_dir}/{tag}: no such checkpoint; the folder has "
                            f"{sorted(p.name for p in ckpt_dir.glob('step*'))}")
    if any((ckpt_dir / tag).glob("*zero_pp_rank_*optim_states.pt")):
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
        state = get_fp32_state_dict_from_zero_checkpoint(str(ckpt_dir), tag=tag)
    else:  # ZeRO-0 keeps the whole module in the model-states file
        state = torch.load(ckpt_dir / tag / "mp_rank_00_model_states.pt", map_location="cpu",
                           weights_only=False)["module"]
    return {k: v.float() if v.is_floating_point() else v for k, v in state.items()}


def _load_parts(model, state: dict, prefixes: tuple, source: str) -> None:
    wanted = {k: v for k, v in state.items() if k.startswith(prefixes)}
    result = model.load_state_dict(wanted, strict=False)
    missing = [k for k in result.missing_keys if k.startswith(prefixes)]
    if missing or result.unexpected_keys:
        raise LangCellError(f"{source}: weights do not fit the model (missing {missing[:3]}, unexpected "
                            f"{result.unexpected_keys[:3]}); was the run made with another model config?")


CELL_PARTS = ("cell_bert.", "cell_proj.", "mlm_head.")


# ----------------------------------------------------------------------------- training
def pretrain(config: str | os.PathLike | PretrainConfig, data: str | os.PathLike, out: str | os.PathLike,
             stage: int, deepspeed_config: str | None = None, overrides: dict | None = None) -> dict:
    """Run (or resume) one stage. Returns a summary: final step, last losses, throughput.

    Works launcher-less (one process) or under torchrun/deepspeed (one process per device).
    """
    import torch
    if stage not in (1, 2):
        raise LangCellError(f"--stage {stage}: must be 1 or 2")
    cfg = config if isinstance(config, PretrainConfig) else load_pretrain_config(config, overrides)
    model_cfg = load_model_config(cfg.model)
    stage_cfg = cfg.stage(stage)
    rank, world, on_gpu = _init_distributed()
    if not on_gpu:
        _return_freed_blocks_to_the_os()
    ds_cfg = load_deepspeed_config(deepspeed_config or cfg.deepspeed_config, on_gpu)
    from langcell.pretrain.model import load_text_tokenizer, resolve_text_model_path
    from langcell.pretrain.warm_start import check_cell_checkpoint
    resolve_text_model_path(model_cfg.text.init_from)  # a missing text model fails before training
    if model_cfg.cell.init_from and stage == 1:  # and so does a cell checkpoint, before run.json records it
        check_cell_checkpoint(model_cfg.cell)
    data, run = str(data), Path(out)
    shards = _check_library(data, model_cfg.cell.vocab_size, rank, world)
    sdir = run / f"stage{stage}"
    ckpt_dir = sdir / "checkpoints"
    if stage == 2 and not (run / "stage1" / "final_model.pt").is_file():
        raise LangCellError(f"{run}/stage1/final_model.pt: stage 1 has not finished in this run; "
                            "run --stage 1 first")

    if rank == 0:
        sdir.mkdir(parents=True, exist_ok=True)
        run_info = {"model": asdict(model_cfg), "pretrain": asdict(cfg), "data": os.path.abspath(data)}
        if not (run / "run.json").is_file():
            # run.json comes last: a run killed before it copies vocab and tokenizer again.
            shutil.copytree(Path(data) / "vocab", run / "vocab", dirs_exist_ok=True)
            load_text_tokenizer(model_cfg.text).save_pretrained(str(run / "tokenizer"))
            atomic_write_json(run / "run.json", run_info)
    torch.distributed.barrier()
    # Only rank 0 holds the folder lock; the other ranks are the same run.
    with output_lock(sdir) if rank == 0 else contextlib.nullcontext():
        return _train(cfg, model_cfg, stage, stage_cfg, ds_cfg, shards, run, sdir, ckpt_dir, rank, world, on_gpu)


def _train(cfg, model_cfg, stage, stage_cfg, ds_cfg, shards, run, sdir, ckpt_dir, rank, world, on_gpu):
    import deepspeed
    import torch
    from tqdm import tqdm

    from langcell.pretrain.model import LangCellPretrainModel

    torch.manual_seed(cfg.seed)  # identical initial weights on every rank
    model = LangCellPretrainModel(model_cfg, with_text=stage == 2,
                                  warm_start=stage == 1 and not (ckpt_dir / "latest").is_file())
    if stage == 2:
        state = torch.load(run / "stage1" / "final_model.pt", map_location="cpu", weights_only=True)
        _load_parts(model, state, CELL_PARTS, f"{run}/stage1/final_model.pt")
    freeze_unused(model, stage, stage_cfg.losses)
    if rank == 0 and stage == 2 and not (run / "text_bert_config.json").is_file():
        with atomic_path(run / "text_bert_config.json") as tmp:
            tmp.write_text(model.text_bert.config.to_json_string())
    if cfg.activation_checkpointing:
        model.enable_activation_checkpointing()
    optimizer, scheduler = _optimizer(model, stage_cfg)
    ds = {k: v for k, v in ds_cfg.items() if not k.startswith("_")}
    # With a token budget the cells of a batch vary by step: micro_batch_size is then a nominal
    # number, which DeepSpeed only uses to check the arithmetic of train_batch_size.
    ds.update(train_micro_batch_size_per_gpu=cfg.micro_batch_size, gradient_accumulation_steps=cfg.grad_accum_steps,
              train_batch_size=cfg.micro_batch_size * cfg.grad_accum_steps * world, gradient_clipping=cfg.grad_clip,
              zero_allow_untested_optimizer=True)
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler, config=ds)
    if ds.get("zero_optimization", {}).get("stage") == 3:
        _report_partitioning(engine, rank, world)

    step, resume = 0, None
    if (ckpt_dir / "latest").is_file():
        _, client = engine.load_checkpoint(str(ckpt_dir))
        step = int(client["step"])
        resume = _load_stream_position(ckpt_dir, rank, world)
    metrics_path = sdir / "metrics.jsonl"
    if rank == 0:
        _truncate_metrics(metrics_path, step)
    if step >= stage_cfg.max_steps:
        if (sdir / "done.json").is_file():
            return read_json(sdir / "done.json", "stage summary")
        # Killed after its last checkpoint but before finishing: finish it now, or stage 2 never starts.
        logged = _read_metrics(metrics_path) if rank == 0 else []
        return _finish_stage(ckpt_dir, run, sdir, stage, rank, logged[-1] if logged else {"step": step})

    loader = training_loader(cfg, model_cfg, stage, shards, str(run / "tokenizer"), rank, world, on_gpu,
                             resume=resume, start_batch=0 if resume else step * cfg.grad_accum_steps)
    batches = iter(loader)
    text_config = model.text_bert.config if stage == 2 else None
    writer = None
    if rank == 0:
        from torch.utils.tensorboard import SummaryWriter
        writer = SummaryWriter(str(sdir / "tb"))
    bar = tqdm(total=stage_cfg.max_steps, initial=step, desc=f"stage {stage}", unit="step", disable=rank != 0)
    engine.train()
    device = engine.device
    summary = {}
    stream_position = None
    window = {"cells": 0, "tokens": 0, "padded": 0, "flops": 0.0}
    # Losses stay on the device and counts on the host; both are read once per logged step (one
    # all-reduce, one transfer), so no other step waits for the device.
    window_start = time.perf_counter()
    while step < stage_cfg.max_steps:
        totals = {}
        for micro in range(cfg.grad_accum_steps):
            batch = next(batches)
            began, consumed = batch.pop("stream_window"), batch.pop("stream_batch") + 1
            stream_position = {"window": json.loads(began) if began else stream_position["window"],
                               "consumed": consumed}
            n_masked = masked_gene_count(batch["cell_ids"], cfg.mask_prob, cls_id=model.cell_bert.config.vocab_size - 1)
            shapes = batch_shapes(batch, stage, stage_cfg.losses, n_masked)
            flops = step_flops(model.cell_bert.config, text_config, model_cfg.proj_dim, shapes)
            window.update(cells=window["cells"] + batch["cell_ids"].shape[0],
                          tokens=window["tokens"] + int(batch["n_tokens"]),
                          padded=window["padded"] + int(batch["n_padded"]), flops=window["flops"] + flops)
            # The cells' real lengths, counted on the host for the FLOP count, pack them.
            lengths = shapes.cell_lengths if cfg.pack_cells else None
            batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
            torch.manual_seed(_seed(cfg.seed, stage, step, micro, rank))
            loss, parts = engine(batch, stage=stage, weights=stage_cfg.losses, mask_prob=cfg.mask_prob,
                                 simcse_temperature=cfg.simcse_temperature, n_masked=n_masked,
                                 ctm_uniform_negatives=cfg.ctm_uniform_negatives,
                                 ctm_balance_texts=cfg.ctm_balance_texts, cell_lengths=lengths)
            engine.backward(loss)
            engine.step()
            parts["loss"] = loss.detach()
            for k, v in parts.items():
                totals[k] = totals.get(k, 0.0) + v.double() / cfg.grad_accum_steps
        step += 1
        if rank == 0:
            bar.update(1)
        if step % cfg.log_every == 0 or step == stage_cfg.max_steps:
            # This step's losses averaged over ranks; the window's counts summed over ranks.
            keys = sorted(totals)
            counts = torch.tensor([window[k] for k in ("cells", "tokens", "padded", "flops")], dtype=torch.float64)
            packed = torch.cat([torch.stack([totals[k] for k in keys]) / world, counts.to(device)])
            packed = packed.to(_collective_device())
            torch.distributed.all_reduce(packed)
            packed = packed.cpu()
            losses = dict(zip(keys, packed[: len(keys)].tolist()))
            cells, tokens, padded, flops = packed[len(keys):].tolist()
            elapsed = time.perf_counter() - window_start
            rec = {"step": step, "stage": stage, **losses, "lr": scheduler.get_last_lr()[0],
                   "cells_per_s": cells / elapsed, "tokens_per_s": tokens / elapsed,
                   "padding_share": 1 - tokens / padded, "model_flops_per_s": flops / elapsed}
            if stage == 2:
                rec["temperature"] = _temperature(engine)
            # This step's global gradient norm before clipping (ZeRO stages report it; stage 0 in
            # fp32 does not): when it stays far above grad_clip, clipping, not the learning rate,
            # sets the step size of every objective.
            norm = engine.get_global_grad_norm()
            rec["grad_norm"] = None if norm is None else float(norm)
            # Model FLOPs of every rank's cells over every device's peak.
            rec["mfu"] = (flops / elapsed / (cfg.peak_flops_per_device * world)
                          if on_gpu and cfg.peak_flops_per_device > 0 else None)
            rec["peak_memory_gb"] = _peak_memory_gb(on_gpu)
            summary = rec
            if rank == 0:
                bar.set_postfix(loss=f"{losses['loss']:.3f}", cells_s=f"{cells / elapsed:.1f}")
                with open(metrics_path, "a") as f:
                    f.write(json.dumps(rec) + "\n")
                for k, v in rec.items():
                    if isinstance(v, float):
                        writer.add_scalar(f"stage{stage}/{k}", v, step)
            window = {"cells": 0, "tokens": 0, "padded": 0, "flops": 0.0}
            window_start = time.perf_counter()
        if step % cfg.checkpoint_every == 0 or step == stage_cfg.max_steps:
            _save(engine, ckpt_dir, step, rank, cfg.keep_checkpoints, stream_position)
    bar.close()
    if writer is not None:
        writer.close()
    del batches, loader
    return _finish_stage(ckpt_dir, run, sdir, stage, rank, summary)


def training_loader(cfg, model_cfg, stage: int, shards, tokenizer_path: str, rank: int, world: int, on_gpu: bool,
                    resume: dict | None = None, start_batch: int = 0):
    """The stage's batches for one rank, as training reads them (the loader benchmark reads these too)."""
    import torch

    from langcell.pretrain.data import CellStream
    stage_cfg = cfg.stage(stage)
    return torch.utils.data.DataLoader(
        # Stage 2 reads its own order of the library, not stage 1's again from the start.
        CellStream(shards, rank=rank, world=world, seed=cfg.seed * 10 + stage, batch_size=cfg.micro_batch_size,
                   shuffle_buffer=cfg.data.shuffle_buffer, bucket_batches=cfg.data.bucket_batches,
                   max_length=min(cfg.data.max_length, model_cfg.cell.max_position_embeddings),
                   with_text=stage == 2, tokenizer_path=tokenizer_path,
                   text_max_length=model_cfg.text.max_length, text_choice=cfg.text,
                   resume=resume, start_batch=start_batch,
                   pad_multiple=8 if on_gpu else 1,  # multiples of 8 keep GPU tensor cores aligned
                   open_shards=cfg.data.open_shards, require_text=stage_cfg.cells_with_text_only,
                   tokens_per_batch=cfg.data.tokens_per_batch, datasets=stage_cfg.datasets),
        batch_size=None, num_workers=cfg.data.num_workers, prefetch_factor=4 if cfg.data.num_workers else None,
        pin_memory=on_gpu)  # page-locked batches make the non-blocking copies to the GPU asynchronous


def _finish_stage(ckpt_dir: Path, run: Path, sdir: Path, stage: int, rank: int, summary: dict) -> dict:
    """Stage 1's consolidated weights (what stage 2 starts from), then done.json."""
    import torch
    if rank == 0:
        if stage == 1:
            state = consolidated_state_dict(ckpt_dir)
            with atomic_path(run / "stage1" / "final_model.pt") as tmp:
                torch.save(state, tmp)
        atomic_write_json(sdir / "done.json", summary)
    torch.distributed.barrier()
    return summary


def _return_freed_blocks_to_the_os() -> None:
    """On glibc, give every block of 4 MiB or more its own mapping, returned to the OS when freed.
    glibc otherwise raises that threshold (to 32 MiB) as large blocks are freed, and the per-cell
    attention buffers of packed cells then stay in the heap. 30 steps of the demo's stage 1
    (benchmarks/bench_malloc.py): 3.5 GB peak resident memory at 4 MiB, 4.6-4.75 GB at 32 MiB,
    which runs them 17% faster; 1 MiB saves 0.1 GB more and costs stage 2 a fifth to a third of
    its speed in page faults. A threshold the user set through glibc's environment variables is
    left as it is."""
    import ctypes

    if "MALLOC_MMAP_THRESHOLD_" in os.environ or "mmap_threshold" in os.environ.get("GLIBC_TUNABLES", ""):
        return
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:  # not glibc: its allocator has its own policy
        return
    m_mmap_threshold = -3
    libc.mallopt(m_mmap_threshold, 4 << 20)


def _peak_memory_gb(on_gpu: bool) -> float:
    """This rank's peak so far: memory torch allocated on its GPU, or on a CPU the peak resident
    size of its process (loader workers are processes of their own)."""
    import resource

    import torch
    if on_gpu:
        return torch.cuda.max_memory_allocated() / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def _report_partitioning(engine, rank: int, world: int) -> None:
    """What ZeRO-3 actually partitioned: tensors at or below `stage3_param_persistence_threshold`
    stay whole on every rank, which for a small model can be nearly all of them."""
    params = list(engine.module.parameters())
    persistent = [p for p in params if p.ds_persist]
    kept = sum(p.ds_numel for p in persistent) + sum(p.ds_tensor.numel() for p in params if not p.ds_persist)
    total = sum(p.ds_numel for p in params)
    print(f"langcell pretrain: rank {rank}: ZeRO-3 partitions {len(params) - len(persistent)} of {len(params)} "
          f"parameter tensors over {world} ranks; this rank keeps {kept} of {total} elements", flush=True)


def _seed(seed: int, stage: int, step: int, micro: int, rank: int) -> int:
    """A 63-bit seed per micro-step and rank: hashed, since any arithmetic mix of unbounded
    fields either overflows torch's 64-bit seed or makes two (step, micro, rank) collide."""
    import numpy as np
    return int(np.random.SeedSequence([seed, stage, step, micro, rank]).generate_state(1, np.uint64)[0]) >> 1


def _temperature(engine) -> float:
    import deepspeed
    import torch
    p = engine.module.logit_scale
    with deepspeed.zero.GatheredParameters([p]) if hasattr(p, "ds_id") else contextlib.nullcontext():
        return float(1.0 / torch.exp(p.detach().float().clamp(max=4.6052)))


def _stream_file(ckpt_dir: Path, tag: str, rank: int) -> Path:
    return ckpt_dir / tag / f"stream_rank{rank:05d}.json"


def _load_stream_position(ckpt_dir: Path, rank: int, world: int) -> dict | None:
    """Where this rank's data stream stood at the latest checkpoint, or None (a checkpoint from
    before positions were saved: the stream is then replayed from its start, which every rank
    decides alike)."""
    import torch
    path = _stream_file(ckpt_dir, (ckpt_dir / "latest").read_text().strip(), rank)
    found = torch.tensor([int(path.is_file())], device=_collective_device())
    torch.distributed.all_reduce(found)
    if found.item() == world:
        return {**read_json(path, "data stream position"), "file": str(path)}
    if rank == 0:
        print(f"langcell pretrain: {path.parent} holds no data stream position for every rank; replaying the "
              "stream up to the checkpoint (slow at late steps)")
    return None


def _save(engine, ckpt_dir: Path, step: int, rank: int, keep: int, stream_position: dict) -> None:
    import torch
    tag = f"step{step:07d}"
    # Before DeepSpeed writes `latest`: a checkpoint that `latest` names always has every rank's position.
    atomic_write_bytes(_stream_file(ckpt_dir, tag, rank), json.dumps(stream_position).encode())
    torch.distributed.barrier()
    engine.save_checkpoint(str(ckpt_dir), tag=tag, client_state={"step": step})
    torch.distributed.barrier()
    if rank == 0:
        tags = sorted(p for p in ckpt_dir.glob("step*") if p.is_dir())
        for old in tags[:-keep]:
            shutil.rmtree(old, ignore_errors=True)


def _read_metrics(path: Path) -> list[dict]:
    return [json.loads(ln) for ln in path.read_text().splitlines() if ln.strip()] if path.is_file() else []


def _truncate_metrics(path: Path, step: int) -> None:
    """A run killed after logging but before its checkpoint repeats those steps on resume."""
    if not path.is_file():
        return
    lines = [ln for ln in path.read_text().splitlines() if ln.strip() and json.loads(ln)["step"] <= step]
    with atomic_path(path) as tmp:
        tmp.write_text("".join(ln + "\n" for ln in lines))


# ----------------------------------------------------------------------------- export
def checkpoint_tags(run: str | os.PathLike, stage: int) -> list[tuple[int, str]]:
    """(step, tag) of every checkpoint a stage of RUN still holds, in step order."""
    tags = sorted(p.name for p in (Path(run) / f"stage{stage}" / "checkpoints").glob("step*") if p.is_dir())
    return [(int(t[len("step"):]), t) for t in tags]


def library_class_prompt(library: str | os.PathLike) -> dict | None:
    """The cell-type text template of a library's texts (its manifest's build config), as
    `pretrain.export.save_langcell` records it; None for a library whose manifest has none."""
    from langcell.build_sclibrary.config import TextConfig

    manifest = read_json(Path(library) / "manifest.json", "library manifest")
    recorded = (manifest.get("config") or {}).get("texts")
    if not recorded:
        return None
    texts = TextConfig(**recorded)
    prefix = texts.prefixes["cell_type"]
    return {"template": texts.template.replace("{prefix}", prefix),
            "template_no_definition": texts.template_no_definition.replace("{prefix}", prefix),
            "definition_as_sentence": True}


def export_run(run: str | os.PathLike, out: str | os.PathLike, tag: str | None = None,
               langcell_compatible: bool = False) -> Path:
    """Write RUN's latest weights (stage 2 if it has a checkpoint, else stage 1) in the LangCell
    layout; `tag` (`stepNNNNNNN`) picks an earlier checkpoint of that stage.
    `langcell_compatible=True` refuses a model LangCell's code would read differently."""
    import torch
    from transformers import AutoTokenizer, BertConfig

    from langcell.pretrain.config import model_config_from_dict
    from langcell.pretrain.export import save_langcell
    from langcell.pretrain.model import LangCellPretrainModel, TextBert
    run = Path(run)
    info = read_json(run / "run.json", "run description")
    model_cfg = model_config_from_dict(info["model"], f"{run}/run.json")
    stage = 2 if (run / "stage2" / "checkpoints" / "latest").is_file() else 1
    ckpt_dir = run / f"stage{stage}" / "checkpoints"
    if not (ckpt_dir / "latest").is_file():
        raise LangCellError(f"{run}: no checkpoint in stage1/ or stage2/; train first (langcell pretrain)")
    state = consolidated_state_dict(ckpt_dir, tag)
    torch.manual_seed(0)
    if stage == 2:
        model = LangCellPretrainModel(model_cfg, with_text=False, warm_start=False)
        model.text_bert = TextBert(BertConfig.from_json_file(str(run / "text_bert_config.json")))
        h = model.text_bert.config.hidden_size
        model.text_proj = torch.nn.Linear(h, model_cfg.proj_dim)
        model.ctm_head = torch.nn.Linear(h, 2)
        _load_parts(model, state, ("",), f"{ckpt_dir}")
    else:  # a cell-only run exports with the text encoder as initialised
        model = LangCellPretrainModel(model_cfg, with_text=True, warm_start=False)
        _load_parts(model, state, CELL_PARTS, f"{ckpt_dir}")
    model.text_tokenizer = AutoTokenizer.from_pretrained(str(run / "tokenizer"))
    return save_langcell(model.eval(), out, vocab_dir=run / "vocab",
                         extra_config={"trained_stage": stage, "run": str(run.resolve())},
                         class_prompt=library_class_prompt(info["data"]), langcell_compatible=langcell_compatible)
