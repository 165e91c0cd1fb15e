"""`rsrefseg predict`: images (a file or a folder) and phrases to masks, on the GPU when there is one.

One image runs in this process; a folder of scenes goes through Ray Data, model replicas as
actors (one per GPU where the cluster has GPUs), like `rsrefseg evaluate`.

Images up to LARGE px a side go through the model whole: the same resize as the data pipeline on
the way in, the logits resized back to the image's size on the way out. Larger scenes (a
10,000 x 8,000 px GeoTIFF) are cut into overlapping tiles at the training data's scale and
stitched (`inference.tiling`). A GeoTIFF's mask is written as a GeoTIFF with the same CRS and
transform (and, with --geojson, as polygons). Raster and vector I/O go through rasterio. The
checkpoint is safetensors + YAML, so loading it never unpickles arbitrary objects.

Memory: a GeoTIFF is read one tile window at a time (`inference.scenes.SceneFile`), the logits are
stitched in row bands, and the mask (1 byte a pixel) is written window by window, so a scene is
never in memory whole, let alone as float32. With --gsd the scene is read through a WarpedVRT at
the training scale, again window by window; the mask is resized back to the scene's own grid.
Several phrases share one pass over the scene: it is read, and each tile goes through the image
encoders, once for all of them (only the mask decoder runs per phrase), at the cost of one row
band of logits and one mask per phrase.

File names (a folder --out): `<image>.<phrase>.<png|tif>`. <image> is the image's stem, or its
whole name where two images of the call share a stem (a.png and a.tif: `a.png.road.png`,
`a.tif.road.tif`). <phrase> is the phrase itself where it is already lower-case letters, digits
and single dashes, at most 60 characters ("road", "car-park"); any other phrase is its readable
slug plus 8 hex digits of the phrase's SHA-1 ("Red car": `red-car-9616fee6`), so phrases that
differ only in case or punctuation, or after 60 characters, never share a file.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from rsrefseg.platform.atomic import atomic_file, write_text
from rsrefseg.inference.scenes import GEO_SUFFIXES, SceneFile, open_scene, read_scene, segment_scene_phrases
from rsrefseg.platform.console import say
from rsrefseg.platform.errors import ConfigError

IMAGE_SUFFIXES = (".tif", ".tiff", ".png", ".jpg", ".jpeg")


def blend(rgb: np.ndarray, mask: np.ndarray, colour=(255, 64, 64), alpha: float = 0.5) -> np.ndarray:
    out = rgb.astype(np.float32).copy()
    out[mask] = (1 - alpha) * out[mask] + alpha * np.asarray(colour, dtype=np.float32)
    return out.astype(np.uint8)


@dataclass(frozen=True)
class Options:
    """How scenes are cut and written (the CLI's --tile, --overlap, --gsd, --geojson)."""

    tile: int = 0
    overlap: float = 0.25
    gsd: float = 0.0
    geojson: bool = False


class ScenePredictor:
    """One model, its phrases and where masks go: `predict_file` writes every mask of one scene.
    Used in-process for one image, and as the Ray Data actor (`_SceneActor`) for many."""

    def __init__(self, model, cfg, device, autocast, *, texts: list[str], out: str, single: bool, options: Options,
                 prefixes: dict[str, str] | None = None):
        from rsrefseg.models.presets import input_sizes
        from rsrefseg.models.tokenizer import load_tokenizer

        self.model, self.device, self.autocast = model, device, autocast
        self.sizes, self.tokenizer = input_sizes(cfg.model, cfg.data.label_size), load_tokenizer(cfg.model)
        self.texts, self.out, self.single, self.options = texts, Path(out), single, options
        self.names, self.prefixes = phrase_names(texts), prefixes or {}

    def predict_file(self, path: Path) -> list[dict]:
        """Rows (image, phrase, mask file, share of the image covered) of one scene's masks."""
        rows = []
        with open_scene(path) as scene:
            factor = training_scale(scene, self.options.gsd, where=path)
            if factor != 1.0:
                scene.rescale(factor)
            suffix = ".tif" if scene.georeferenced else ".png"
            prefix = self.prefixes.get(str(path), path.stem)
            # Every phrase in one pass: the scene is read, and each tile encoded, once for all of them.
            masks = segment_scene_phrases(self.model, self.sizes, self.tokenizer, scene, self.texts,
                                          tile=self.options.tile, overlap=self.options.overlap, device=self.device,
                                          autocast=self.autocast)
            for phrase in self.texts:
                mask = masks.pop(0)  # let go of each mask once written
                if factor != 1.0:  # back onto the scene's own grid
                    mask = np.asarray(Image.fromarray(mask).resize(scene.scene_shape[::-1], Image.NEAREST))
                target = self.out if self.single else self.out / f"{prefix}.{self.names[phrase]}{suffix}"
                write_mask(mask, target, scene)
                if self.options.geojson and scene.georeferenced:
                    write_geojson(mask, target.with_suffix(".geojson"), scene, phrase)
                rows.append({"image": str(path), "phrase": phrase, "target": str(target), "share": float(mask.mean())})
        return rows


class _SceneActor(ScenePredictor):
    """The Ray Data actor: a model replica built once, then one scene file per row."""

    def __init__(self, payload, **kwargs):
        from rsrefseg.inference.replicas import replica_model

        model, cfg, device, autocast = replica_model(payload)
        super().__init__(model, cfg, device, autocast, **kwargs)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, list]:
        rows = [row for path in batch["path"] for row in self.predict_file(Path(str(path)))]
        return {key: [row[key] for row in rows] for key in ("image", "phrase", "target", "share")}


def run_predict(
    checkpoint: str,
    *,
    image: str,
    text: str | list[str],
    out: str,
    overlay: str | None = None,
    tile: int = 0,
    overlap: float = 0.25,
    gsd: float = 0.0,
    geojson: bool = False,
    cpu: bool = False,
    replicas: int = 0,
) -> dict[tuple[str, str], str]:
    """Masks of every (image, phrase) pair; returns the mask file of each.

    image: a file, or a folder (every image file in it; its scenes go through Ray Data, one
        model replica per GPU, or `replicas`). text: one phrase or several.
    out: the mask file for one image and one phrase, else a folder of `<image>.<phrase>.<ext>`
        (the module's docstring: names never collide within a call).
    gsd: metres per pixel of the training data; a georeferenced scene is resampled to it first.
    """
    from rsrefseg.models.checkpoint_folder import find_checkpoint
    from rsrefseg.models.checkpoint import load_checkpoint
    from rsrefseg.inference.scoring import inference_device

    given = [text] if isinstance(text, str) else list(text)
    texts = list(dict.fromkeys(given))  # a phrase given twice: one mask
    if not texts or any(not t.strip() for t in texts):
        raise ConfigError("--text: a phrase is empty")
    phrase_names(texts)  # refuses phrases that would share a file before any work
    images = _image_files(Path(image))
    single = len(images) == 1 and len(given) == 1 and not Path(image).is_dir()
    if overlay and not single:
        raise ConfigError("--overlay takes one image and one phrase; for several, the masks go to the --out folder")
    model, cfg = load_checkpoint(find_checkpoint(checkpoint))
    options = Options(tile=tile, overlap=overlap, gsd=gsd, geojson=geojson)
    if len(images) == 1:
        device, autocast = inference_device(prefer_gpu=not cpu)
        predictor = ScenePredictor(model.to(device), cfg, device, autocast, texts=texts, out=out, single=single,
                                   options=options, prefixes=image_prefixes(images))
        rows = predictor.predict_file(images[0])
    else:
        rows = _predict_with_ray(model, cfg, images, texts=texts, out=out, options=options, cpu=cpu, replicas=replicas)
    for row in rows:
        say(f"{Path(row['image']).name} \"{row['phrase']}\": mask ({row['share'] * 100:.1f}% of the image) -> {row['target']}")
    if overlay:
        rgb = read_scene(images[0]).rgb
        mask = np.asarray(Image.open(rows[0]["target"])) > 0
        _save_image(Image.fromarray(blend(rgb, mask)), Path(overlay))
        say(f"overlay -> {overlay}")
    return {(row["image"], row["phrase"]): row["target"] for row in rows}


def _predict_with_ray(model, cfg, images: list[Path], *, texts, out, options: Options, cpu: bool, replicas: int) -> list[dict]:
    """Many scenes: a Ray Data job over the file list, model replicas as actors (the masks are
    written by the actors, so on a cluster `--out` must be on storage every node shares)."""
    import ray
    import ray.data

    from rsrefseg.jobs.evaluate import plan_replicas
    from rsrefseg.platform.ray_session import init_ray

    init_ray(cfg.cluster)
    plan = plan_replicas(cfg, batch_size=1, count=replicas, gpus=0 if cpu else -1)
    payload = ray.put((cfg, model.trainable_state_dict()))
    resolved = [p.resolve() for p in images]
    ds = ray.data.from_items([{"path": str(p)} for p in resolved])
    predicted = ds.map_batches(
        _SceneActor,
        fn_constructor_kwargs={"payload": payload, "texts": texts, "out": str(Path(out).resolve()), "single": False,
                               "options": options, "prefixes": image_prefixes(resolved)},
        batch_size=1,
        compute=ray.data.ActorPoolStrategy(size=min(plan.count, len(images))),
        num_gpus=plan.gpus,
        num_cpus=plan.cpus,
    )
    return sorted(predicted.take_all(), key=lambda r: (r["image"], texts.index(r["phrase"])))


WRITE_ROWS = 512  # rows of a GeoTIFF mask written at once


def write_mask(mask: np.ndarray, target: Path, scene: SceneFile) -> None:
    """0/255 mask: a GeoTIFF with the scene's CRS and transform for a georeferenced scene (written
    WRITE_ROWS rows at a time), else an image file (PNG unless `target` says otherwise). Written,
    then renamed into place. `scene`: anything with `georeferenced` and `profile`."""
    mask = np.asarray(mask, bool)
    with atomic_file(target) as tmp:
        if scene.georeferenced and target.suffix.lower() in GEO_SUFFIXES:
            import rasterio
            from rasterio.windows import Window

            height, width = mask.shape
            with rasterio.open(tmp, "w", driver="GTiff", height=height, width=width, count=1, dtype="uint8",
                               crs=scene.profile["crs"], transform=scene.profile["transform"],
                               compress="deflate") as dst:
                for top in range(0, height, WRITE_ROWS):
                    rows = mask[top : top + WRITE_ROWS]
                    dst.write(rows.view(np.uint8) * np.uint8(255), 1, window=Window(0, top, width, len(rows)))
        else:
            Image.fromarray(mask.view(np.uint8) * np.uint8(255)).save(tmp, format=_pil_format(target))


def write_geojson(mask: np.ndarray, target: Path, scene: SceneFile, phrase: str) -> None:
    """The mask's polygons in the scene's CRS (rasterio.features.shapes), as a FeatureCollection."""
    from rasterio import features

    mask = np.asarray(mask, bool)
    polygons = [
        {"type": "Feature", "geometry": geometry, "properties": {"phrase": phrase}}
        for geometry, value in features.shapes(mask.view(np.uint8), mask=mask, transform=scene.profile["transform"])
        if value == 1
    ]
    collection = {"type": "FeatureCollection", "crs": {"type": "name", "properties": {"name": scene.profile["crs"].to_string()}},
                  "features": polygons}
    write_text(target, json.dumps(collection))


def training_scale(scene, gsd: float, *, where: Path | str = "") -> float:
    """The factor that resamples a scene (anything with `georeferenced` and `profile`) so that a
    pixel covers `gsd` metres: 1.0 with no gsd, for a scene that is not georeferenced, or within
    0.1% of 1. `SceneFile.rescale` then reads it at that scale, window by window."""
    if not gsd or not scene.georeferenced:
        return 1.0
    crs = scene.profile["crs"]
    if not crs.is_projected:  # degrees per pixel are no ground sampling
        raise ConfigError(
            f"--gsd: {where} is in a geographic CRS ({crs.to_string()}), whose pixels are not a fixed "
            "number of metres; reproject it to a projected CRS first (e.g. gdalwarp -t_srs EPSG:<UTM zone>)"
        )
    metres_per_unit = float(crs.linear_units_factor[1])  # 1 for metres, 0.3048 for feet
    factor = float(scene.profile["res"][0]) * metres_per_unit / gsd
    return 1.0 if abs(factor - 1.0) < 1e-3 else factor


def phrase_names(texts: list[str]) -> dict[str, str]:
    """Each phrase's part of a mask's file name (the module's docstring); refuses two phrases
    that would still share one (a SHA-1 prefix collision, or a phrase spelt as another's name)."""
    names = {text: _phrase_name(text) for text in texts}
    seen: dict[str, str] = {}
    for text, name in names.items():
        if name in seen:
            raise ConfigError(f"--text: {seen[name]!r} and {text!r} would both be written as {name!r}; "
                              "reword one (or run them in separate calls)")
        seen[name] = text
    return names


def image_prefixes(images: list[Path]) -> dict[str, str]:
    """Each image's part of its masks' file names: its stem, or its whole name where another image
    of the call has the same stem (compared case-blind: a case-insensitive file system would
    merge `A.road.png` and `a.road.png`)."""
    prefix = {str(p): p.stem for p in images}
    while True:
        groups: dict[str, list[Path]] = {}
        for p in images:
            groups.setdefault(prefix[str(p)].casefold(), []).append(p)
        clashing = [p for group in groups.values() if len(group) > 1 for p in group if prefix[str(p)] != p.name]
        if not clashing:
            return prefix
        for p in clashing:
            prefix[str(p)] = p.name


def _image_files(path: Path) -> list[Path]:
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith("."))
        if not files:
            raise ConfigError(f"--image {path}: no image files ({', '.join(IMAGE_SUFFIXES)}) in this folder")
        return files
    if not path.is_file():
        raise ConfigError(f"--image {path}: no such file or folder")
    return [path]


def _slug(phrase: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "-", phrase.strip()).strip("-").lower()[:60] or "phrase"


def _phrase_name(phrase: str) -> str:
    """The phrase where it is its own slug, else its slug and 8 hex digits of its SHA-1."""
    slug = _slug(phrase)
    return slug if slug == phrase else f"{slug}-{hashlib.sha1(phrase.encode()).hexdigest()[:8]}"


def _pil_format(target: Path) -> str:
    return {".tif": "TIFF", ".tiff": "TIFF", ".jpg": "JPEG", ".jpeg": "JPEG"}.get(target.suffix.lower(), "PNG")


def _save_image(img: Image.Image, path: Path) -> None:
    with atomic_file(path) as tmp:
        img.save(tmp, format=_pil_format(path))
