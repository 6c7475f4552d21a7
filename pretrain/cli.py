"""`langcell pretrain` (one stage of DeepSpeed pre-training) and `langcell export`."""

import argparse

# RUN and LIB must be on a filesystem every node sees: ZeRO checkpoints are written per rank.
LAUNCH_HELP = """launch examples:
  one node, 8 GPUs:
    torchrun --nproc_per_node 8 -m langcell.cli pretrain --config base --data LIB --out RUN --stage 1
  two nodes x 8 GPUs (run on each node; NODE_RANK 0 and 1, HEAD = node 0's address):
    torchrun --nnodes 2 --nproc_per_node 8 --node_rank $NODE_RANK \\
      --rdzv_backend c10d --rdzv_endpoint $HEAD:29500 --rdzv_id langcell \\
      -m langcell.cli pretrain --config base --data /shared/LIB --out /shared/RUN --stage 1 \\
      --deepspeed-config zero2.json
  or with the DeepSpeed launcher from node 0 (hostfile lists both nodes with slots=8):
    deepspeed --hostfile hostfile --num_nodes 2 --num_gpus 8 --no_local_rank --module langcell.cli \\
      pretrain --config base --data /shared/LIB --out /shared/RUN --stage 1
  then the same with --stage 2, and `langcell export --run RUN --out EXPORT`.
  CPU (gloo): DS_ACCELERATOR=cpu torchrun --nproc_per_node 2 -m langcell.cli pretrain ..."""


def add_commands(subparsers) -> None:
    p = subparsers.add_parser(
        "pretrain", help="pre-train the LangCell dual encoder (stage 1: cell encoder; stage 2: all)",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Run or resume one pre-training stage (rerun the same command to resume). A plain call "
                    "trains on one GPU or the CPU; launch one process per GPU for more.",
        epilog=LAUNCH_HELP)
    p.add_argument("--config", required=True, help="configs/pretrain/<name>.yaml or a name (tiny, base)")
    p.add_argument("--data", required=True, help="scLibrary folder written by `langcell build`")
    p.add_argument("--out", required=True, help="run folder (checkpoints, metrics); rerun to resume")
    p.add_argument("--stage", type=int, choices=(1, 2), required=True)
    p.add_argument("--deepspeed-config", default=None, help="DeepSpeed JSON (default: the config's, e.g. zero2.json)")
    p.add_argument("--max-steps", type=int, default=None, help="override the stage's max_steps")
    p.add_argument("--seed", type=int, default=None,
                   help="override the config's seed (initial weights, data order, masking); give both stages the same")
    p.set_defaults(handler=_pretrain)

    e = subparsers.add_parser("export", help="write a run's weights in the published LangCell layout")
    e.add_argument("--run", required=True, help="run folder of `langcell pretrain`")
    e.add_argument("--out", required=True, help="export folder (cell_bert/, text_bert/, *.bin, ...)")
    e.add_argument("--langcell-compatible", action="store_true",
                   help="refuse a model LangCell's own code would read with other numbers (mean pooling)")
    e.set_defaults(handler=_export)


def _pretrain(args) -> int:
    import json
    import logging

    from langcell.pretrain.engine import pretrain
    # The library's own INFO lines (the warm start's count of loaded tensors) reach the terminal;
    # other libraries keep their own logging.
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("langcell pretrain: %(message)s"))
    logging.getLogger("langcell.pretrain").addHandler(handler)
    logging.getLogger("langcell.pretrain").setLevel(logging.INFO)
    overrides = {}
    if args.max_steps is not None:
        overrides[f"stage{args.stage}.max_steps"] = args.max_steps
    if args.seed is not None:
        overrides["seed"] = args.seed
    summary = pretrain(args.config, args.data, args.out, args.stage, args.deepspeed_config, overrides)
    import torch
    if not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0:
        print(json.dumps(summary))
    return 0


def _export(args) -> int:
    import json
    import sys

    from langcell.pretrain.engine import export_run
    out = export_run(args.run, args.out, langcell_compatible=args.langcell_compatible)
    reason = json.loads((out / "langcell_config.json").read_text())["langcell_incompatible_reason"]
    if reason:
        print(f"langcell export: not LangCell-compatible: {reason} (recorded in langcell_config.json)",
              file=sys.stderr)
    print(out)
    return 0
