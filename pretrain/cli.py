"""`langcell pretrain` (one stage of DeepSpeed pre-training) and `langcell export`."""

import argparse


def add_commands(subparsers) -> None:
    p = subparsers.add_parser(
        "pretrain", help="pre-train the LangCell dual encoder (stage 1: cell encoder; stage 2: all)",
        description="Run or resume one pre-training stage. Launch one process per device with torchrun or "
                    "the deepspeed launcher for multi-GPU/multi-node; a plain call trains on one device/CPU.")
    p.add_argument("--config", required=True, help="configs/pretrain/<name>.yaml or a name (tiny, base)")
    p.add_argument("--data", required=True, help="scLibrary folder written by `langcell build`")
    p.add_argument("--out", required=True, help="run folder (checkpoints, metrics); rerun to resume")
    p.add_argument("--stage", type=int, choices=(1, 2), required=True)
    p.add_argument("--deepspeed-config", default=None, help="DeepSpeed JSON (default: the config's, e.g. zero2.json)")
    p.add_argument("--max-steps", type=int, default=None, help="override the stage's max_steps")
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    p.set_defaults(handler=_pretrain)

    e = subparsers.add_parser("export", help="write a run's weights in the published LangCell layout")
    e.add_argument("--run", required=True, help="run folder of `langcell pretrain`")
    e.add_argument("--out", required=True, help="export folder (cell_bert/, text_bert/, *.bin, ...)")
    e.set_defaults(handler=_export)


def _pretrain(args) -> int:
    import json

    from pretrain.engine import pretrain
    overrides = {f"stage{args.stage}.max_steps": args.max_steps} if args.max_steps is not None else None
    summary = pretrain(args.config, args.data, args.out, args.stage, args.deepspeed_config, overrides)
    import torch
    if not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0:
        print(json.dumps(summary))
    return 0


def _export(args) -> int:
    from pretrain.engine import export_run
    print(export_run(args.run, args.out))
    return 0
