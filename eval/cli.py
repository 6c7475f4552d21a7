"""`langcell eval <task>` and `langcell annotate`: argparse only; the work is in eval.suite / eval.annotate."""

import argparse

from langcell.eval.settings import AUTO_TOP_K, AUTO_TOP_K_ABOVE

TASK_NAMES = ("zero-shot", "few-shot", "finetune", "retrieval", "integration", "suite")


def add_commands(subparsers) -> None:
    ev = subparsers.add_parser("eval", help="benchmark an exported model (zero-shot, few-shot, finetune, "
                                            "retrieval, integration, or the whole suite)")
    ev.add_argument("task", choices=TASK_NAMES)
    ev.add_argument("--model", help="export folder (langcell export, or LangCell's released checkpoint)")
    ev.add_argument("--data", help="LIB/hf/<split> from `langcell build`, or an .h5ad of raw counts")
    ev.add_argument("--out", help="report folder: metrics.json, report.md, PNG plots")
    ev.add_argument("--label-key", default=None, help="obs column with cell type labels (default cell_type)")
    ev.add_argument("--batch-key", default=None, help="obs column with the batch (default dataset_id)")
    ev.add_argument("--config", default=None, help="YAML in configs/eval/ (name or path; default: default)")
    ev.add_argument("--max-cells", type=int, default=None, help="evaluate a random subset of this many cells")
    ev.add_argument("--top-k", type=int, default=None,
                    help="zero-shot: matching head only for each cell's K most similar types (faster, may "
                         "change predictions); default: LangCell's exact formula over every type")
    ev.add_argument("--text-tokenizer", default=None,
                    help="text tokenizer folder or HF id (default: MODEL/tokenizer/, or PubMedBERT's "
                         "microsoft/BiomedNLP-PubMedBERT-base-uncased-abstract-fulltext with [DEC]/[ENC] "
                         "for LangCell's release, which ships none)")
    ev.set_defaults(handler=_eval)

    an = subparsers.add_parser("annotate", help="zero-shot cell types for an .h5ad, written into a copy of it")
    an.add_argument("--model", required=True, help="export folder")
    an.add_argument("--input", required=True, help=".h5ad with raw counts in X or layers['counts']")
    an.add_argument("--output", required=True, help="annotated .h5ad (obs langcell_*, obsm['X_langcell'])")
    group = an.add_mutually_exclusive_group(required=True)
    group.add_argument("--cell-types", nargs="+", help="candidate types: CL labels get their CL description, "
                                                       "other text is the name in the model's class prompt")
    group.add_argument("--ontology-root", help="every CL descendant of this term is a candidate, e.g. CL:0000542")
    an.add_argument("--ontology-terms", default=None, help="INGEST/ontology/terms.parquet (default: "
                                                           "cellxgene-ontology-guide's CL)")
    an.add_argument("--top-k", type=int, default=None,
                    help="matching head only for each cell's K most similar types; default: every type "
                         "(LangCell's exact formula) up to %d candidates, top-%d above (said on the terminal "
                         "and in uns['langcell'])" % (AUTO_TOP_K_ABOVE, AUTO_TOP_K))
    an.add_argument("--text-tokenizer", default=None,
                    help="text tokenizer folder or HF id (default: MODEL/tokenizer/, or PubMedBERT's "
                         "microsoft/BiomedNLP-PubMedBERT-base-uncased-abstract-fulltext with [DEC]/[ENC] "
                         "for LangCell's release, which ships none)")
    an.add_argument("--alpha", type=float, default=0.1)
    an.add_argument("--chunk-size", type=int, default=4096, help="cells read from disk at a time")
    an.add_argument("--batch-size", type=int, default=32)
    an.add_argument("--min-gene-overlap", type=float, default=0.25,
                    help="refuse when fewer of the file's genes are in the model's vocabulary")
    an.add_argument("--device", default="cpu")
    an.set_defaults(handler=_annotate)


def _eval(args: argparse.Namespace) -> int:
    import json

    from langcell.eval.suite import headline, run_tasks
    from langcell.eval.settings import load_eval_config

    overrides = {k: v for k, v in (("model", args.model), ("data", args.data), ("out", args.out),
                                   ("label_key", args.label_key), ("batch_key", args.batch_key),
                                   ("max_cells", args.max_cells), ("text_tokenizer", args.text_tokenizer))
                 if v is not None}
    cfg = load_eval_config(args.config, overrides)
    if args.top_k is not None:
        cfg.zero_shot.top_k = args.top_k
    metrics = run_tasks(cfg, list(cfg.tasks) if args.task == "suite" else [args.task])
    print(json.dumps(headline(metrics), indent=1))
    return 0


def _annotate(args: argparse.Namespace) -> int:
    import json

    from langcell.eval.annotate import annotate

    summary = annotate(args.model, args.input, args.output, args.cell_types, args.ontology_root,
                       ontology_terms=args.ontology_terms, chunk_size=args.chunk_size, batch_size=args.batch_size,
                       top_k=args.top_k, alpha=args.alpha, min_gene_overlap=args.min_gene_overlap, device=args.device,
                       text_tokenizer=args.text_tokenizer)
    print(json.dumps(summary, indent=1))
    return 0
