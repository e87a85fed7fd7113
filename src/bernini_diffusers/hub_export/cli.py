"""`bernini export`: original checkpoints -> one diffusers folder, optionally uploaded to the Hub.

"""

from __future__ import annotations

import argparse
from pathlib import Path

from ..constants import DTYPES, WAN22_BASE
from ..options import add_debug_argument

DEFAULT_BASE = WAN22_BASE

EPILOG = """examples:
  # the original layout of ByteDance/Bernini-R on the Wan2.2 base, into one folder
  bernini export --high_noise_ckpt ByteDance/Bernini-R/bernini_renderer_high \\
      --low_noise_ckpt ByteDance/Bernini-R/bernini_renderer_low --out Bernini-R-Diffusers
  # local downloads, then upload (add --dry_run to list the files and sizes first)
  bernini export --base Wan2.2-T2V-A14B-Diffusers --high_noise_ckpt Bernini-R/bernini_renderer_high \\
      --low_noise_ckpt Bernini-R/bernini_renderer_low --out Bernini-R-Diffusers --push_to_hub you/Bernini-R-Diffusers
  # upload an existing export
  bernini export --out Bernini-R-Diffusers --push_to_hub you/Bernini-R-Diffusers --private

checkpoints: a folder (with a *.safetensors.index.json or .safetensors files; a download of ByteDance/Bernini-R
picks bernini_renderer_high/ or bernini_renderer_low/ itself), an index or .safetensors file, or a Hub path
[hf://]owner/name[@revision][/folder]."""


def add_export_parser(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "export",
        help="convert original checkpoints into a diffusers folder (and push it to the Hub)",
        description="Convert the original Bernini-R checkpoints into one self-contained diffusers folder that "
        "BerniniPipeline.from_pretrained and DiffusionPipeline.from_pretrained(trust_remote_code=True) load.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    source = parser.add_argument_group("source")
    source.add_argument(
        "--base", default=DEFAULT_BASE, metavar="DIR|REPO",
        help=f"diffusers base supplying the transformer configs, VAE, text encoder, tokenizer, scheduler "
        f"(default: {DEFAULT_BASE})",
    )
    source.add_argument("--high_noise_ckpt", metavar="PATH|REPO", help="high-noise expert checkpoint")
    source.add_argument("--low_noise_ckpt", metavar="PATH|REPO", help="low-noise expert checkpoint")
    source.add_argument("--revision", help="revision of --base on the Hub (checkpoints take owner/name@revision)")
    source.add_argument("--cache_dir", help="Hugging Face cache folder (default: $HF_HUB_CACHE)")
    source.add_argument("--local_files_only", action="store_true", help="read the Hub cache only, never download")

    output = parser.add_argument_group("output")
    output.add_argument(
        "--out", required=True, metavar="DIR",
        help="new folder to write (not the working directory, the home folder or a source folder)",
    )
    output.add_argument(
        "--force", action="store_true",
        help="replace an earlier export at --out (only an export; once the new one is complete). Refused when it "
        "holds files no export wrote (they are listed) unless --delete_extra is given too",
    )
    output.add_argument(
        "--delete_extra", action="store_true",
        help="with --force: also delete the files in the earlier export that no export wrote",
    )
    output.add_argument(
        "--max_shard_size", default="10GB", help="largest weight file, e.g. 10GB or 500MB (default: 10GB, as diffusers)"
    )
    output.add_argument("--dtype", choices=DTYPES, help="cast the experts' weights (default: keep the checkpoint's)")
    output.add_argument("--base_model", metavar="REPO", help="model card base_model (default: --base if a repo id)")

    hub = parser.add_argument_group("upload")
    hub.add_argument("--push_to_hub", metavar="REPO_ID", help="create this model repo and upload the folder to it")
    hub.add_argument("--private", action="store_true", help="create the repo private")
    hub.add_argument("--commit_message", help="commit message of the upload")
    hub.add_argument("--token", help="Hub token (default: the logged-in one or $HF_TOKEN)")
    hub.add_argument("--dry_run", action="store_true", help="list the files and sizes to upload; upload nothing")
    add_debug_argument(parser)
    parser.set_defaults(func=run_export)
    return parser


def run_export(args: argparse.Namespace) -> Path:
    """Export (unless only an upload of an existing --out is asked for), then push or list the upload."""
    import torch  # after parse_args: `bernini export --help` answers before torch loads

    from .export import check_export_target, export_pipeline, push_folder

    if args.delete_extra and not args.force:
        raise ValueError("`--delete_extra` deletes files of an earlier export that `--force` replaces; add `--force`.")
    if args.dry_run and not args.push_to_hub:
        raise ValueError("`--dry_run` lists an upload; it needs `--push_to_hub REPO_ID`.")
    given = [name for name in ("high_noise_ckpt", "low_noise_ckpt") if getattr(args, name)]
    out = Path(args.out)
    if given or not args.push_to_hub:
        if len(given) < 2:
            missing = sorted({"high_noise_ckpt", "low_noise_ckpt"} - set(given))
            raise ValueError(f"`--{missing[0]}` is required (the two expert checkpoints go together).")
        # The same checks export_pipeline makes first, here to name the flags (`--out`, `--force`) in the message.
        check_export_target(
            args.out,
            force=args.force,
            base=args.base,
            high_noise_ckpt=args.high_noise_ckpt,
            low_noise_ckpt=args.low_noise_ckpt,
            flags=True,
            delete_extra=args.delete_extra,
        )
        hub = {"revision": args.revision, "cache_dir": args.cache_dir, "token": args.token}
        hub = {k: v for k, v in hub.items() if v is not None}
        if args.local_files_only:
            hub["local_files_only"] = True
        out = export_pipeline(
            args.high_noise_ckpt,
            args.low_noise_ckpt,
            out,
            base=args.base,
            force=args.force,
            delete_extra=args.delete_extra,
            max_shard_size=args.max_shard_size,
            dtype=getattr(torch, DTYPES[args.dtype]) if args.dtype else None,
            base_model=args.base_model,
            repo_id=args.push_to_hub,
            **hub,
        )
    if args.push_to_hub:
        push_folder(
            out,
            args.push_to_hub,
            private=True if args.private else None,
            commit_message=args.commit_message,
            token=args.token,
            dry_run=args.dry_run,
        )
    return out
