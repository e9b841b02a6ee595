"""Convert checkpoints between DeepSpeed layouts, plain safetensors, and the reference / BEiT formats.

    to-plain CKPT_DIR OUT [--format vlmo_large|reference|reference-pt] [--dtype fp32|bf16] [--max-shard-size 5GB]
    from-plain PLAIN OUT --tp N [--pp N]
    import-reference FILE OUT --preset NAME [--resize-vocab]     (fine-tuned VQA / NLVR2 files bring their heads)
    export-reference PLAIN OUT.pt     (a plain checkpoint or export -> the reference's torch file, heads included)
    import-beit FILE OUT --preset NAME
    to-portable CKPT_DIR OUT          (weights + Adam moments, to resume on another layout)

CKPT_DIR is a DeepSpeed save folder (with `latest`) or one tag folder, of any TP x ZeRO-0/1/2/3
layout or TP x PP x ZeRO-0/1 pipeline layout. The model config comes
from the checkpoint (client_state or config.json) unless --preset / --config give it. Errors print
`error: ...` and exit with status 2.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
import warnings

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
# import-time notices of megatron / torch that say nothing about the conversion
warnings.filterwarnings("ignore", message=".*(Transformer Engine|Apex|tp_group is None).*")
logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)


def _model_args(parser: argparse.ArgumentParser, required: bool = False) -> None:
    parser.add_argument("--preset", required=required, help="model preset (tiny, base, large, ...)")
    parser.add_argument("--config", default=None, help="model config JSON (ModelConfig fields)")


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("to-plain", help="DeepSpeed checkpoint -> plain safetensors + config.json")
    p.add_argument("ckpt"), p.add_argument("out")
    p.add_argument("--format", choices=("vlmo_large", "reference", "reference-pt"), default="vlmo_large",
                   help="reference: the reference's tensor names; reference-pt: the same as one model.pt "
                        "({'state_dict': ...}) that the reference's torch 1.8 loads")
    p.add_argument("--dtype", default="fp32", choices=("fp32", "bf16", "fp16"))
    p.add_argument("--max-shard-size", default="5GB")
    p.add_argument("--tag", default=None)
    _model_args(p)

    p = sub.add_parser("from-plain", help="plain checkpoint -> per-TP-rank (and PP stage) files")
    p.add_argument("plain"), p.add_argument("out")
    p.add_argument("--tp", type=int, required=True)
    p.add_argument("--pp", type=int, default=1)
    _model_args(p)

    for name, what in (("import-reference", "reference VLMo .pt/.pth"), ("import-beit", "BEiT/timm vision weights")):
        p = sub.add_parser(name, help=f"{what} -> plain checkpoint")
        p.add_argument("file"), p.add_argument("out")
        _model_args(p, required=False)
        p.add_argument("--format", choices=("vlmo_large", "reference"), default="vlmo_large")
        p.add_argument("--max-shard-size", default="5GB")
        p.add_argument("--seed", type=int, default=0, help="initialisation of the tensors the file lacks")
        if name == "import-reference":
            p.add_argument("--resize-vocab", action="store_true",
                           help="copy the overlapping vocabulary rows, initialise the rest")

    p = sub.add_parser("export-reference", help="plain checkpoint -> the reference VLMo's torch file")
    p.add_argument("plain"), p.add_argument("out")
    _model_args(p)

    p = sub.add_parser("to-portable", help="DeepSpeed checkpoint -> weights + Adam moments without a layout")
    p.add_argument("ckpt"), p.add_argument("out")
    p.add_argument("--max-shard-size", default="5GB")
    p.add_argument("--tag", default=None)
    _model_args(p)
    return parser.parse_args(argv)


def run(args: argparse.Namespace) -> None:
    from vlmo_large import checkpoint as ck
    from vlmo_large.checkpoint.layout import dtype_of, resolve_config
    from vlmo_large.checkpoint.safetensors_stream import parse_size

    if args.command == "to-plain":
        files = ck.to_plain(args.ckpt, args.out, args.preset, args.config, args.format, dtype_of(args.dtype),
                            parse_size(args.max_shard_size), args.tag)
        print(f"wrote {', '.join(files) if args.format == 'reference-pt' else f'{len(files)} safetensors file(s)'}"
              f" + config.json to {args.out}")
    elif args.command == "from-plain":
        cfg = resolve_config(args.preset, args.config) if args.preset or args.config else None
        files = ck.write_sharded(args.plain, args.out, args.tp, args.pp, cfg)
        print(f"wrote {len(files)} files for TP={args.tp} PP={args.pp} to {args.out}; "
              "load with vlmo_large.checkpoint.load_sharded_plain(model, path)")
    elif args.command in ("import-reference", "import-beit"):
        cfg = resolve_config(args.preset or "base", args.config)
        common = dict(seed=args.seed, naming=args.format, max_shard_bytes=parse_size(args.max_shard_size))
        if args.command == "import-reference":
            report = ck.import_reference(args.file, args.out, cfg, resize=args.resize_vocab, **common)
        else:
            report = ck.import_beit(args.file, args.out, cfg, **common)
        print(report.summary())
        print(f"wrote the plain checkpoint of '{cfg.name}' to {args.out}")
    elif args.command == "export-reference":
        ck.export_reference(args.plain, args.out, args.preset, args.config)
        print(f"wrote {args.out} (the reference's layout; load with its load_path)")
    elif args.command == "to-portable":
        ck.save_portable(args.ckpt, args.out, args.preset, args.config, args.tag, parse_size(args.max_shard_size))
        print(f"wrote weights, exp_avg, exp_avg_sq and training_state.json to {args.out}; "
              "resume with vlmo_large.checkpoint.load_portable(engine, path)")


def main(argv=None) -> int:
    args = parse_args(argv)
    from vlmo_large.formats.io import CheckpointError

    try:
        run(args)
    except (CheckpointError, ValueError, OSError, KeyError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
