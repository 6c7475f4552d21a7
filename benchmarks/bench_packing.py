"""Packed cells against transformers' padded BERT: the cell encoder's forward and backward.

The same weights run a batch of cells two ways, alternating, in one process: transformers'
BertModel with SDPA attention and the padding mask (how the cells ran before packing), and the
packed path training uses (`pretrain/packing.py`: real tokens only, attention once per cell).
Cells are batched as the length-bucketed loader batches them (lengths within a narrow band, a
little padding) and as an unbucketed loader would (lengths over the whole range). Reported:
seconds per forward+backward (the fastest of `--repeats` after a warm-up), their ratio, and the
largest difference of the two outputs on real tokens.

    .venv/bin/python -m benchmarks.bench_packing [--repeats 3] [--no-record]
"""

from __future__ import annotations

import argparse
import copy
import datetime
import os
import platform
import sys
import time

from benchmarks.record import record_section

# (name, hidden, layers, heads, cells, shortest, longest)
CASES = [
    ("minilm cell encoder, bucketed", 128, 4, 4, 16, 400, 512),
    ("minilm cell encoder, unbucketed", 128, 4, 4, 16, 64, 512),
    ("reduced base cell encoder, bucketed", 512, 2, 8, 8, 900, 1100),
    ("reduced base cell encoder, unbucketed", 512, 2, 8, 8, 256, 2048),
]


def run_case(hidden: int, layers: int, heads: int, cells: int, shortest: int, longest: int, repeats: int) -> dict:
    import torch
    from transformers import BertConfig, BertModel

    from langcell.pretrain.packing import PACKED_ATTENTION, encode_packed

    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=25427, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                     intermediate_size=2 * hidden, max_position_embeddings=2048, pad_token_id=0, hidden_act="relu",
                     hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    packed_model = BertModel._from_config(copy.deepcopy(cfg), attn_implementation=PACKED_ATTENTION,
                                          add_pooling_layer=False).train()
    padded_model = BertModel._from_config(copy.deepcopy(cfg), attn_implementation="sdpa", add_pooling_layer=False).train()
    padded_model.load_state_dict(packed_model.state_dict())
    lengths = sorted(torch.randint(shortest, longest + 1, (cells,)).tolist(), reverse=True)
    ids = torch.zeros(cells, max(lengths), dtype=torch.long)
    for i, n in enumerate(lengths):
        ids[i, :n] = torch.randint(2, 25426, (n,))
    mask = (ids != 0).long()
    runs = {"padded": lambda: padded_model(input_ids=ids, attention_mask=mask).last_hidden_state,
            "packed": lambda: encode_packed(packed_model, ids, lengths)}
    times, outputs = {k: [] for k in runs}, {}
    for r in range(repeats + 1):
        for name, run in runs.items():
            t0 = time.perf_counter()
            hidden_states = run()
            (hidden_states * mask[..., None]).sum().backward()
            if r:
                times[name].append(time.perf_counter() - t0)
            outputs[name] = (hidden_states * mask[..., None]).detach()
    return {"padding": 1 - sum(lengths) / (cells * max(lengths)), "padded_s": min(times["padded"]),
            "packed_s": min(times["packed"]), "max_diff": float((outputs["padded"] - outputs["packed"]).abs().max())}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bench_packing", description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--no-record", action="store_true")
    args = parser.parse_args(argv)
    import torch
    lines = [
        f"Command: `.venv/bin/python -m benchmarks.bench_packing --repeats {args.repeats}` "
        f"({datetime.date.today().isoformat()}, {platform.machine()}, {os.cpu_count()} cores (shared), torch "
        f"{torch.__version__}, fp32, dropout 0). Forward and backward of the cell encoder alone, the fastest of "
        f"{args.repeats} alternating runs after a warm-up; padded = transformers' BertModel with SDPA and the padding "
        "mask, packed = the same weights on real tokens only (`pack_cells`).",
        "",
        "| batch | cells | tokens per cell | padding | padded s | packed s | speed-up | max difference on real tokens |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for name, hidden, layers, heads, cells, shortest, longest in CASES:
        r = run_case(hidden, layers, heads, cells, shortest, longest, args.repeats)
        lines.append(f"| {name} ({layers} x {hidden}) | {cells} | {shortest}..{longest} | {r['padding']:.0%} | "
                     f"{r['padded_s']:.2f} | {r['packed_s']:.2f} | **{r['padded_s'] / r['packed_s']:.2f}x** | "
                     f"{r['max_diff']:.1e} |")
        print(lines[-1], flush=True)
    report = "\n".join(lines)
    print(report)
    if not args.no_record:
        record_section("Pre-training (packed cells)", report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
