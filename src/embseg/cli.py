"""The ``embseg`` command line: one entry point, subcommands, thin over the Python API.

User errors (:class:`embseg.errors.UserError`) print one line and exit with code 2; ``--debug``
shows the traceback.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from typing import Any, NoReturn

from embseg.errors import UserError


class _Parser(argparse.ArgumentParser):
    """Argument parser with one-line errors (exit code 2) and no abbreviated flags.

    Abbreviations are off so that a mistyped flag is an error with a suggestion rather than a
    silent match of another flag (and scripts keep their meaning when flags are added).
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)
        self.commands: dict[str, argparse.ArgumentParser] = {}

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see '{self.prog} --help')\n")


def _flag_suggestion(extra: Sequence[str], parser: argparse.ArgumentParser) -> str:
    """``" (did you mean '--x'?)"`` for the first unknown flag in ``extra``, or ``""``."""
    from embseg.config import suggest

    flags = [o for action in parser._actions for o in action.option_strings if o.startswith("--")]
    unknown = [e.split("=")[0] for e in extra if e.startswith("--")]
    return suggest(unknown[0], flags) if unknown else ""


def _describe_os_error(err: OSError) -> str:
    """One line for an operating-system error: the file, then what went wrong."""
    what = err.strerror or str(err)
    return f"{err.filename}: {what}" if err.filename else what


def _cmd_evaluate(args: argparse.Namespace) -> int:
    from embseg.evaluate import evaluate_folders, format_report, write_json

    thresholds = None
    if args.thresholds:
        try:
            thresholds = [float(t) for t in args.thresholds.split(",") if t.strip()]
        except ValueError:
            raise UserError(
                f"--thresholds {args.thresholds!r}: expected comma-separated numbers, e.g. 0.5,0.75"
            ) from None
    result = evaluate_folders(args.gt_dir, args.pred_dir, thresholds=thresholds)
    print(format_report(result))
    if args.json:
        write_json(result, args.json, overwrite=True)
    return 0


def _train_flags(parser: argparse.ArgumentParser) -> None:
    """One flag per :class:`TrainConfig` field (only flags given on the command line override)."""
    import typing
    from dataclasses import fields

    from embseg.config import TrainConfig

    hints = typing.get_type_hints(TrainConfig)
    for f in fields(TrainConfig):
        flag = "--" + f.name.replace("_", "-")
        kind = hints[f.name]
        default = f.default
        if kind is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS,
                                help=f"(default: {default})")
        elif "list" in str(kind):
            parser.add_argument(flag, nargs="+", default=argparse.SUPPRESS, metavar="N",
                                help="per axis, e.g. 96 96 (default: from the data)")
        else:
            parser.add_argument(flag, default=argparse.SUPPRESS, metavar=f.name.split("_")[-1].upper(),
                                help=f"(default: {default})")


def _train_config(args: argparse.Namespace):
    from dataclasses import fields

    from embseg.config import TrainConfig, config_from_dict, load_config

    base = load_config(args.config) if args.config else TrainConfig()
    given = {f.name: getattr(args, f.name) for f in fields(TrainConfig) if hasattr(args, f.name)}
    if "crop_size" in given and isinstance(given["crop_size"], list) and len(given["crop_size"]) == 1:
        given["crop_size"] = given["crop_size"][0]
    return config_from_dict(given, source="command line", base=base).validate()


def _cmd_train(args: argparse.Namespace) -> int:
    from embseg.config import dump_config

    config = _train_config(args)
    if args.print_config:
        print(dump_config(config), end="")
        return 0
    from embseg import ddp
    from embseg.training import train

    if args.nproc < 1:
        raise UserError(f"--nproc must be >= 1, got {args.nproc}")
    if args.nproc > 1:  # one process per GPU (or share of the CPU cores), DistributedDataParallel
        from embseg.model import load_model

        ddp.launch(ddp.train_worker, args.nproc, args=(config, args.resume, args.overwrite, not args.quiet),
                   threads=config.threads)
        model = load_model(config.output)
    else:
        joined = ddp.init_from_env()  # under torchrun: join its process group
        try:
            model = train(config, resume=args.resume, overwrite=args.overwrite, progress=not args.quiet)
            context = ddp.context(config.device)
        finally:
            if joined:
                ddp.leave()
        if context is not None and not context.is_main:
            return 0
    print(f"model saved to {config.output} (seed_thresh {model.config.seed_thresh:.2f}, "
          f"fg_thresh {model.config.fg_thresh:.2f}, min_size {model.config.min_size})")
    return 0


def _parse_shape(text: str | None, flag: str = "--tile-shape") -> tuple[int, ...] | int | None:
    if text is None:
        return None
    try:
        values = tuple(int(v) for v in text.replace("x", ",").split(",") if v.strip())
    except ValueError:
        raise UserError(f"{flag} {text!r}: expected integers like 512 or 64,256,256") from None
    minimum = 1 if flag.endswith("shape") else 0  # halos may be 0
    if not values or any(v < minimum for v in values):
        raise UserError(f"{flag} {text!r}: values must be {'positive' if minimum else 'non-negative'}")
    return values[0] if len(values) == 1 else values


def _predict_zarr(model, paths: list, out_dir, args: argparse.Namespace) -> None:
    """Block-wise prediction of zarr / OME-Zarr inputs on dask (``OUT_DIR/<name>.zarr``)."""
    from embseg.distributed import predict_blocks
    from embseg.zarr_io import is_zarr, label_group_in_image, open_zarr_image

    for path in paths:
        image = open_zarr_image(path, axes=args.axes, ndim=model.ndim)
        source_image = None
        if args.into_image:
            if image.group is None:
                raise UserError(f"{path}: --into-image needs an OME-Zarr image group as input")
            target = label_group_in_image(image.group, args.into_image)
            source_image = "../../"
        else:
            target = out_dir / (path.name.split(".")[0] + ".zarr")
        if is_zarr(target) and args.resume and not args.overwrite and _zarr_complete(target):
            if not args.quiet:
                print(f"{path.name}: finished output {target} kept (--resume)")
            continue
        report = predict_blocks(
            model, image, target, block_shape=_parse_shape(args.block_shape, "--block-shape"),
            object_halo=_parse_shape(args.object_halo, "--object-halo"),
            context=_parse_shape(args.context, "--context"), scheduler=args.dask_scheduler,
            n_workers=args.workers, tta=args.tta, seed_thresh=args.seed_thresh, fg_thresh=args.fg_thresh,
            min_size=args.min_size, device=args.device, tile_shape=_parse_shape(args.tile_shape),
            resume=args.resume, overwrite=args.overwrite, progress=not args.quiet, source_image=source_image,
        )
        if not args.quiet:
            rss = max(report.peak_rss_mb.values(), default=float("nan"))
            resumed = f", {report.n_resumed} resumed" if report.n_resumed else ""
            print(f"{path.name}: {report.n_objects} objects -> {target} ({report.n_blocks} blocks{resumed}, "
                  f"{report.seconds:.1f} s, {report.voxels_per_second / 1e6:.2f} Mvoxel/s, "
                  f"peak worker RSS {rss:.0f} MB)")


def _zarr_complete(path) -> bool:
    import json

    attrs = path / ".zattrs"
    try:
        return bool(json.loads(attrs.read_text()).get("embseg", {}).get("complete"))
    except (OSError, ValueError):
        return False


def _cmd_predict(args: argparse.Namespace) -> int:
    from pathlib import Path

    from tqdm.auto import tqdm

    from embseg.cluster_kernel import warm_up_in_background
    from embseg.io import list_inputs, read_image, write_image, write_labels
    from embseg.model import load_model
    from embseg.zarr_io import is_zarr

    warm_up_in_background()  # the compiled clustering, while the model loads and the network runs
    model = load_model(args.model)
    zarr_inputs = [Path(p) for p in args.inputs if is_zarr(p)]
    other = [p for p in args.inputs if not is_zarr(p)]
    inputs = list_inputs(other) if other or not zarr_inputs else []
    out_dir = Path(args.output)
    if out_dir.exists() and not out_dir.is_dir():
        raise UserError(f"{out_dir}: exists and is not a folder (-o names the output folder)")
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise UserError(f"{out_dir}: cannot create output folder ({err.strerror})") from None
    if zarr_inputs:
        _predict_zarr(model, zarr_inputs, out_dir, args)
    targets = [(p, out_dir / (p.name.split(".")[0] + ".tif")) for p in inputs]
    existing = [t for _, t in targets if t.exists()]
    if existing and not (args.overwrite or args.resume):
        names = ", ".join(t.name for t in existing[:5]) + (" ..." if len(existing) > 5 else "")
        raise UserError(f"{out_dir}: {len(existing)} output file(s) exist ({names}); "
                        "use --resume to skip them or --overwrite")
    tile = _parse_shape(args.tile_shape)
    done = skipped = 0
    for path, target in tqdm(targets, desc="predict", disable=args.quiet or len(targets) < 2):
        if target.exists() and args.resume and not args.overwrite:
            skipped += 1
            continue
        image, axes = read_image(path, axes=args.axes, ndim=model.ndim)
        result = model.predict(image, axes=axes, tta=args.tta, tile_shape=tile, seed_thresh=args.seed_thresh,
                               fg_thresh=args.fg_thresh, min_size=args.min_size, device=args.device,
                               return_seeds=args.save_seeds, source=str(path), clustering=args.clustering,
                               amp=args.amp)
        labels, seeds = result if args.save_seeds else (result, None)
        write_labels(target, labels, overwrite=True)
        if seeds is not None:
            write_image(out_dir / (target.stem + "_seeds.tif"), seeds, overwrite=True)
        done += 1
        if not args.quiet:
            print(f"{path.name}: {int(labels.max())} objects -> {target}")
    if skipped and not args.quiet:
        print(f"skipped {skipped} finished output(s)")
    return 0


def _cmd_tune(args: argparse.Namespace) -> int:
    from pathlib import Path

    from embseg.io import atomic_write, pair_folders, read_image, read_labels
    from embseg.model import CONFIG_FILE, load_model
    from embseg.tune import tune_model

    model = load_model(args.model)
    if bool(args.config) == bool(args.images or args.masks) or bool(args.images) != bool(args.masks):
        raise UserError("tune: give --images and --masks, or --config (its validation split)")
    if args.config:
        from embseg.config import load_config
        from embseg.training import load_training_data

        data = load_training_data(load_config(args.config).validate())
        images = data.tune_images if data.tune_images is not None else data.val_images
        masks = data.tune_masks if data.tune_masks is not None else data.val_masks
        best = tune_model(model, images, masks, device=args.device, tta=args.tta, normalized=True)
    else:
        images, axes, masks, names = [], [], [], []
        for image_path, mask_path in pair_folders(args.images, args.masks):
            image, image_axes = read_image(image_path, axes=args.axes, ndim=model.ndim)
            images.append(image)
            axes.append(image_axes)
            names.append(str(image_path))
            masks.append(read_labels(mask_path, ndim=model.ndim))
        best = tune_model(model, images, masks, device=args.device, tta=args.tta, axes=axes, sources=names)
    what = "with TTA " if args.tta else ""
    print(f"best {what}on {len(images)} images: seed_thresh {best['seed_thresh']:.2f}, fg_thresh "
          f"{best['fg_thresh']:.2f}, min_size {best['min_size']}, mean AP@0.5 {best['ap']:.3f}, "
          f"AP@0.75 {best['ap75']:.3f}")
    if args.dry_run:
        return 0
    model.config.training["tuning_tta" if args.tta else "tuning"] = best
    with atomic_write(Path(model.source) / CONFIG_FILE, overwrite=True) as tmp:
        Path(tmp).write_text(model.config.to_json())
    print(f"thresholds written to {Path(model.source) / CONFIG_FILE}")
    return 0


def _cmd_export(args: argparse.Namespace) -> int:
    from pathlib import Path

    from embseg.export import check_package, export_bioimageio, export_onnx, export_torchscript
    from embseg.model import load_model

    model = load_model(args.model)
    out = Path(args.output)
    if args.format == "bioimageio":
        image = axes = None
        if args.image:
            from embseg.io import read_image

            image, axes = read_image(args.image, axes=args.axes, ndim=model.ndim)
        export_bioimageio(model, out, image=image, axes=axes, authors=args.author or ["embseg"],
                          license=args.license, name=args.name, overwrite=args.overwrite)
        print(f"wrote bioimage.io package {out} (outputs: labels, seeds)")
        if args.no_check:
            return 0
        result = check_package(out)
        print(f"bioimage.io model test: {'passed' if result.passed else 'FAILED'}")
        if not result.passed:
            print(result.report)
            return 1
    elif args.format == "torchscript":
        export_torchscript(model, out, overwrite=args.overwrite)
        print(f"wrote TorchScript network {out} (raw outputs; checked against PyTorch)")
    else:
        _, checked = export_onnx(model, out, overwrite=args.overwrite)
        note = "checked with onnxruntime" if checked else "not checked: onnxruntime is not installed"
        print(f"wrote ONNX network {out} (raw outputs; {note})")
    return 0


def _cmd_info(args: argparse.Namespace) -> int:
    import platform

    import numpy
    import torch

    import embseg
    from embseg.model import available_models, device_reason

    print(f"embseg  {embseg.__version__}")
    print(f"python  {platform.python_version()} ({platform.machine()})")
    print(f"torch   {torch.__version__} (threads: {torch.get_num_threads()})")
    print(f"numpy   {numpy.__version__}")
    print(f"device  {device_reason(args.device)}")
    print(f"models  {', '.join(available_models()) or '(none shipped)'}")
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from embseg.demo import run_demo

    result = run_demo(args.output, model_name=args.model, tta=args.tta, device=args.device)
    print(f"model: {result['model']}")
    print(result["table"])
    out = result["output"]
    print(f"\nwrote label TIFFs, overlay PNGs and {out / 'contact_sheet.png'} to {out}/ "
          f"in {result['seconds']:.1f} s")
    return 0


def _cmd_explain(args: argparse.Namespace) -> int:
    from pathlib import Path

    from embseg.io import read_image, read_labels
    from embseg.model import load_model
    from embseg.plots import explain_figure

    out = Path(args.output or Path(args.image).name.split(".")[0] + "_explain.png")
    if out.exists() and not args.overwrite:  # before the expensive part
        raise UserError(f"{out}: exists; use --overwrite")
    model = load_model(args.model)
    image, axes = read_image(args.image, axes=args.axes, ndim=model.ndim)
    mask = read_labels(args.mask, ndim=model.ndim) if args.mask else None
    raw = model.predict_raw(image, axes=axes, device=args.device, source=str(args.image))
    labels = model.cluster(raw)
    explain_figure(model.prepare(image, axes), raw, labels, model.config.grid_step, out, mask=mask,
                   n_objects=args.objects)
    print(f"wrote {out}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``embseg`` with all subcommands."""
    parser = _Parser(prog="embseg", description=__doc__.splitlines()[0])
    parser.add_argument("--debug", action="store_true", help="show tracebacks on errors")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("evaluate", help="score predicted label images against ground truth")
    p.add_argument("gt_dir", help="folder of ground-truth label TIFFs")
    p.add_argument("pred_dir", help="folder of predicted label TIFFs (paired by file name)")
    p.add_argument("--thresholds", help="comma-separated IoU thresholds (default by ndim)")
    p.add_argument("--json", help="write all figures to this JSON file")
    p.set_defaults(func=_cmd_evaluate)

    p = sub.add_parser("train", help="train a model on a folder of images and label masks")
    p.add_argument("--config", help="YAML config file (flags override it)")
    p.add_argument("--print-config", action="store_true", help="print the resulting config as YAML and exit")
    p.add_argument("--resume", action="store_true", help="continue from the output folder's last checkpoint")
    p.add_argument("--overwrite", action="store_true", help="allow a non-empty output folder")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--nproc", type=int, default=1,
                   help="training processes (DistributedDataParallel: one per GPU, or CPU processes on gloo); "
                        "batch-size is per process")
    _train_flags(p)
    p.set_defaults(func=_cmd_train)

    p = sub.add_parser("predict", help="segment images with a model")
    p.add_argument("inputs", nargs="+", help="image files, folders or globs; zarr / OME-Zarr inputs are "
                   "predicted block-wise on dask into OUT_DIR/<name>.zarr")
    p.add_argument("-m", "--model", required=True, help="model folder or shipped model name")
    p.add_argument("-o", "--output", required=True, help="output folder for label TIFFs")
    p.add_argument("--axes", help="axes of the input arrays, e.g. YX, CYX, ZYX, YXC")
    p.add_argument("--tta", action="store_true", help="test-time augmentation (8x in 2D, 16x in 3D)")
    p.add_argument("--tile-shape", help="predict in tiles of this shape, e.g. 512 or 64,256,256")
    p.add_argument("--clustering", choices=("blocks", "global"), default="blocks",
                   help="tiled images: cluster tile by tile with seed ownership (memory bounded by the "
                   "tile; default) or all candidates at once (exact global clustering, memory grows "
                   "with the foreground)")
    p.add_argument("--seed-thresh", type=float, help="seed threshold (default: the model's)")
    p.add_argument("--fg-thresh", type=float, help="foreground threshold (default: the model's)")
    p.add_argument("--min-size", type=int, help="minimum object size in pixels (default: the model's)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N, mps")
    p.add_argument("--amp", action=argparse.BooleanOptionalAction, default=None,
                   help="mixed precision (default: on for CUDA, float16; off on the CPU). --amp on a CPU "
                        "with native bfloat16 (AMX / AVX512-BF16) runs the network in bfloat16, about 1.6x "
                        "faster there, labels slightly different from float32's; other CPUs stay float32 "
                        "(image files; zarr inputs run in float32 on the CPU)")
    p.add_argument("--overwrite", action="store_true", help="replace existing outputs")
    p.add_argument("--resume", action="store_true", help="skip inputs whose output already exists")
    p.add_argument("--save-seeds", action="store_true", help="also write the seed map (<name>_seeds.tif)")
    p.add_argument("--quiet", action="store_true")
    z = p.add_argument_group("zarr inputs (block-wise on dask)")
    z.add_argument("--block-shape", help="block (core) shape, e.g. 128,256,256 (default 2048 in 2D, 128,256,256 in 3D)")
    z.add_argument("--object-halo", help="largest distance from an object's centre to its edge, pixels "
                   "(default: half the model's training crop)")
    z.add_argument("--context", help="network context around a block, pixels (default: the model's halo)")
    z.add_argument("--dask-scheduler", metavar="ADDRESS",
                   help="dask scheduler, e.g. tcp://10.0.0.1:8786 (default: a local cluster sized to the machine)")
    z.add_argument("--workers", type=int, help="workers of the local cluster (default: one per GPU, else per 4 cores)")
    z.add_argument("--into-image", metavar="NAME",
                   help="write labels into the input OME-Zarr image as labels/NAME instead of OUT_DIR/<name>.zarr")
    p.set_defaults(func=_cmd_predict)

    p = sub.add_parser("tune", help="choose clustering thresholds on a validation set")
    p.add_argument("-m", "--model", required=True, help="model folder (its config.json is updated)")
    p.add_argument("--images", help="validation images folder (with --masks)")
    p.add_argument("--masks", help="validation masks folder")
    p.add_argument("--config", help="instead of --images/--masks: the validation split of this training config")
    p.add_argument("--axes")
    p.add_argument("--device", default="auto")
    p.add_argument("--tta", action="store_true",
                   help="tune the thresholds used when predicting with --tta (stored separately)")
    p.add_argument("--dry-run", action="store_true", help="print the best thresholds, change nothing")
    p.set_defaults(func=_cmd_tune)

    p = sub.add_parser("demo", help="segment the bundled sample images with a shipped model")
    p.add_argument("--output", default="demo_output", help="output folder (default: demo_output)")
    p.add_argument("-m", "--model", default="nuclei-2d", help="shipped model name or folder")
    p.add_argument("--tta", action="store_true", help="test-time augmentation")
    p.add_argument("--device", default="auto")
    p.set_defaults(func=_cmd_demo)

    p = sub.add_parser("explain", help="figure of the learnt embeddings (the paper's Fig. 1)")
    p.add_argument("image")
    p.add_argument("-m", "--model", required=True)
    p.add_argument("--mask", help="ground-truth label image to show next to the prediction")
    p.add_argument("-o", "--output", help="PNG path (default: <image>_explain.png)")
    p.add_argument("--axes")
    p.add_argument("--objects", type=int, default=6, help="number of objects to draw")
    p.add_argument("--device", default="auto")
    p.add_argument("--overwrite", action="store_true")
    p.set_defaults(func=_cmd_explain)

    p = sub.add_parser("export", help="export a model: bioimage.io package (labels out), TorchScript or ONNX")
    p.add_argument("model", help="model folder or shipped model name")
    p.add_argument("-o", "--output", required=True, help="output file (.zip for bioimageio)")
    p.add_argument("--format", choices=["bioimageio", "torchscript", "onnx"], default="bioimageio",
                   help="bioimageio: network + clustering, labels out; torchscript/onnx: network only, "
                        "raw outputs (default: bioimageio)")
    p.add_argument("--image", help="test image for the package (default: a bundled sample)")
    p.add_argument("--axes", help="axes of --image, e.g. YX, CYX, ZYX")
    p.add_argument("--author", action="append", help="author name (repeat for several; default: embseg)")
    p.add_argument("--license", default="BSD-3-Clause", help="SPDX licence id (default: BSD-3-Clause)")
    p.add_argument("--name", help="package name (default: the model's name)")
    p.add_argument("--no-check", action="store_true", help="skip the bioimage.io model test after export")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output file")
    p.set_defaults(func=_cmd_export)

    p = sub.add_parser("info", help="versions and the device that would be used")
    p.add_argument("--device", default="auto")
    p.set_defaults(func=_cmd_info)

    for command in sub.choices.values():  # --debug also after the subcommand
        command.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                             help="show tracebacks on errors")
    parser.commands = dict(sub.choices)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``embseg`` command line; returns the exit code."""
    from embseg.config import suggest

    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    command = next((a for a in argv if not a.startswith("-")), None)
    if command is not None and command not in parser.commands:
        names = list(parser.commands)
        parser.error(f"unknown command {command!r}{suggest(command, names)}; commands: {', '.join(names)}")
    args, extra = parser.parse_known_args(argv)
    if extra:
        sub = parser.commands[args.command]
        sub.error(f"unrecognized arguments: {' '.join(extra)}{_flag_suggestion(extra, sub)}")
    try:
        return int(args.func(args) or 0)
    except UserError as err:
        if args.debug:
            raise
        print(f"embseg: error: {err}", file=sys.stderr)
        return 2
    except OSError as err:  # disk full, permission denied, ...: the file and the reason
        if args.debug:
            raise
        print(f"embseg: error: {_describe_os_error(err)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("embseg: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
