"""``hf-fsdp-loadfix status|check`` (also ``python -m hf_fsdp_loadfix``)."""

import argparse
import json
import sys

DESCRIPTION = ("status: is hf_fsdp_loadfix's patch applied in this environment, and why not. check: does FSDP "
               "cpu-ram-efficient loading keep non-rank-0 parameters on meta and load correctly here, without and with "
               "the patch. Also runs as: python -m hf_fsdp_loadfix.")


def status_text(report: dict) -> str:
    applied = f"applied ({report['class']})" if report["applied"] else f"NOT applied: {report['reason']}"
    hook, invalid = report["startup_hook"], report["options"] is None  # invalid: a junk HF_FSDP_LOADFIX* value
    lines = [
        f"hf-fsdp-loadfix {report['hf_fsdp_loadfix']} (tested on transformers {report['supported']})",
        "installed:       " + ", ".join(f"{d} {report[d] or 'not installed'}"
                                        for d in ("transformers", "torch", "accelerate")),
        f"behaviour class: {report['class'] or ('not checked' if invalid else 'none (outside the supported range)')}",
        f"patch:           {applied}",
        f"release:         {report['case'] or 'not checked'}",
        f"accelerate fix:  {report['accelerate_fix']}",
        f"rank-0 stream:   {report['accelerate_stream']}",
        f"prepare wrapper: {report['accelerate_prepare']}",
        f"sharded fill:    {report['accelerate_fill']}",
        f"optimizer map:   {report['accelerate_optimizer']}",
        f"peft adapters:   {report['peft_adapters']}",
        f"startup hook:    {'installed: ' + hook if hook else 'not installed: import hf_fsdp_loadfix in your script'}",
        f"options:         {', '.join(f'{k}={v}' for k, v in (report['options'] or {}).items()) or 'invalid'}",
        f"this process:    {report['process']}",
    ]
    none = "none besides the invalid option (importing transformers raises its error)" if invalid else \
        "none in this environment"
    lines += [f"trap:            {t}" for t in report["traps"]] or [f"traps:           {none}"]
    return "\n".join(lines)


def status(as_json: bool, strict: bool = False) -> int:
    """Import transformers (and accelerate and peft) so the report says what a training process would get."""
    import hf_fsdp_loadfix

    # nearly all of status' time (seconds: torch and transformers) is these imports; say so before they start
    print("hf-fsdp-loadfix status: importing transformers, accelerate and peft to see what a training process gets "
          "...", file=sys.stderr, flush=True)
    for module in ("transformers.modeling_utils", "accelerate.utils.fsdp_utils", "peft.tuners.tuners_utils"):
        try:
            __import__(module)
        except (ImportError, ValueError):  # ValueError: a junk HF_FSDP_LOADFIX* value, which the report names
            pass
    report = hf_fsdp_loadfix.status()
    print(json.dumps(report, indent=1) if as_json else status_text(report))
    return 0 if report["applied"] and not (strict and report["traps"]) else 1


def _nproc(value: str) -> int:
    """--nproc: rank 0 and at least one other rank."""
    try:
        n = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r} is not an integer") from None
    if n < 2:
        raise argparse.ArgumentTypeError(f"must be at least 2 (rank 0 and a rank that loads nothing), not {n}")
    return n


def main(argv=None) -> int:
    from . import __version__

    parser = argparse.ArgumentParser(prog="hf-fsdp-loadfix", description=DESCRIPTION)
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    commands = {}
    p = commands["status"] = sub.add_parser("status", help="versions, behaviour class, whether the patch is applied "
                                                         "or why not, traps")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument("--strict", action="store_true", help="exit status 1 also when a trap is reported")
    p = commands["check"] = sub.add_parser("check", help="load a model on N ranks without and with the patch and "
                                                       "compare")
    p.add_argument("--model", help="a local checkpoint directory (default: a small Llama built locally)")
    p.add_argument("--device", choices=["cuda", "cpu"],
                   help="cuda: one rank per GPU (NCCL) through accelerate's Accelerator.prepare(model, optimizer) and "
                        "a training step, the default with 2 or more CUDA GPUs; cpu: gloo ranks on the CPU, the "
                        "default otherwise")
    p.add_argument("--nproc", type=_nproc, help="number of ranks, at least 2 (default: 2 on the CPU, one per GPU "
                                                "with --device cuda)")
    p.add_argument("--source", default="local", choices=["local", "sharded"],
                   help="the package's HF_FSDP_LOADFIX_SOURCE for the patched run (sharded: every rank, rank 0 "
                        "included, reads only its own slices; nothing is broadcast)")
    p.add_argument("--dtype", default="float32", choices=["auto", "float32", "bfloat16", "float16"],
                   help="dtype to load as (default float32: a cast from the bf16 checkpoint)")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    argv = sys.argv[1:] if argv is None else argv
    args, unknown = parser.parse_known_args(argv)
    if unknown:  # after the command: the command's own usage and error, not the top-level ones
        after = argv[argv.index(args.command) + 1:]
        (commands[args.command] if all(u in after for u in unknown) else parser).error(
            f"unrecognized arguments: {' '.join(unknown)}")
    if args.command == "status":
        return status(args.json, args.strict)
    from ._check import CannotRun, check

    try:
        return check(args.model, args.nproc, args.dtype, args.json, args.device, args.source)
    except (CannotRun, ImportError, OSError, ValueError) as err:  # a bad --model, a rejected checkpoint, a junk value
        print(f"error: {err}", file=sys.stderr)
        if args.json:
            print(json.dumps({"passed": False, "error": str(err)}, indent=1))
        return 2
