"""Rebuild the example models of this folder and their sample inputs: ``python model_store/build_examples.py``.

- ``mlp/``: an unpacked (no-archive) eager model: ``model.py`` + state dict + a TorchServe-style ``handler.py``.
- ``mlp_scripted.mar``: the same network and handler, with the weights as TorchScript.
- One archive per built-in handler, each an eager model (``model.py`` + state dict) from ``../examples/<handler>/``,
  with a sample input beside it there:

  | archive | handler | sample input |
  | --- | --- | --- |
  | ``color_classifier.mar`` | ``image_classifier`` | ``examples/image_classifier/landscape.png`` |
  | ``color_segmenter.mar`` | ``image_segmenter`` | ``examples/image_segmenter/landscape.png`` |
  | ``color_detector.mar`` | ``object_detector`` | ``examples/object_detector/shapes.png`` |
  | ``news_classifier.mar`` | ``text_classifier`` | ``examples/text_classifier/sample.txt`` |
  | ``fahrenheit.mar`` | ``tensor`` | ``examples/tensor/celsius.json`` |

No weights are downloaded or trained: they are set from the colours and word lists below. Rerunning gives the same
bytes: archives get fixed entry dates and a fixed ``createdOn``, TorchScript files no debug records (which hold the
builder's paths), and string hashing a fixed seed (TorchScript writes constants in set order).
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import sys
import tempfile
import zipfile
from pathlib import Path
from types import ModuleType

import torch
from PIL import Image, ImageDraw

HERE = Path(__file__).resolve().parent
EXAMPLES = HERE.parent / "examples"
sys.path.insert(0, str(HERE.parent))

from servekit import archiver  # noqa: E402

CREATED_ON = "01/01/2026 00:00:00"  # the manifests' createdOn, fixed so that rebuilding changes nothing
ZIP_DATE = (2026, 1, 1, 0, 0, 0)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# index -> (name, RGB), for the classifier and the segmenter
COLORS = [
    ("black", (20, 20, 20)),
    ("white", (240, 240, 240)),
    ("gray", (128, 128, 128)),
    ("red", (200, 30, 30)),
    ("orange", (240, 130, 20)),
    ("yellow", (240, 220, 40)),
    ("green", (40, 160, 60)),
    ("blue", (30, 70, 200)),
    ("purple", (120, 50, 160)),
    ("pink", (240, 150, 190)),
    ("brown", (110, 70, 35)),
]
# index -> (name, RGB) for the detector; 0 is the background
OBJECT_COLORS = [
    ("__background__", (245, 245, 245)),
    ("red", (200, 30, 30)),
    ("green", (40, 160, 60)),
    ("blue", (30, 70, 200)),
    ("yellow", (240, 220, 40)),
]
TOPICS = {
    "World": "government minister president election war peace country troops talks parliament border refugees "
    "leaders embassy prime_minister united_nations",
    "Sports": "game team season coach win won player players match league cup final goal score championship "
    "olympic world_cup",
    "Business": "market stocks shares company profit bank economy prices oil investors sales quarter billion "
    "deal stock_market interest_rates",
    "Sci/Tec": "software computer internet science space research technology scientists nasa web phone chip "
    "data online machine_learning",
}
SHARPNESS = 200.0  # how sharply a pixel goes to its nearest colour


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        build_mlp(work)
        imagenet = (IMAGENET_MEAN, IMAGENET_STD)
        unit = ((0.0, 0.0, 0.0), (1.0, 1.0, 1.0))
        landscape = ("landscape.png", draw_landscape(320, 240))
        build_color_model(work, "image_classifier", "color_classifier", "ColorClassifier", COLORS, imagenet, landscape)
        small = ("landscape.png", draw_landscape(64, 48))
        build_color_model(work, "image_segmenter", "color_segmenter", "ColorSegmenter", COLORS, imagenet, small)
        shapes = ("shapes.png", draw_shapes())
        build_color_model(work, "object_detector", "color_detector", "ColorDetector", OBJECT_COLORS, unit, shapes)
        build_news_classifier(work)
        build_fahrenheit(work)


def build_mlp(work: Path) -> None:
    model_module = load_module(HERE / "mlp" / "model.py", "mlp_model")
    torch.manual_seed(0)
    model = model_module.MLP().eval()
    torch.save(model.state_dict(), work / "mlp.pt")
    torch.jit.script(model).save(str(work / "mlp_scripted.pt"))
    strip_debug_records(work / "mlp_scripted.pt")
    config = write(work / "mlp" / "model-config.yaml", "minWorkers: 1\nmaxWorkers: 1\nbatchSize: 8\nmaxBatchDelay: 5\n")
    staged = work / "out"
    common = ["--version", "1.0", "--handler", str(HERE / "mlp/handler.py"), "--force"]
    mlp = ["--model-name", "mlp", "--model-file", str(HERE / "mlp/model.py"), "--serialized-file", str(work / "mlp.pt")]
    mlp += ["--config-file", str(config), "--archive-format", "no-archive", "--export-path", str(staged)]
    archive([*mlp, *common])
    fix_manifest(staged / "mlp" / "MAR-INF" / "MANIFEST.json")
    for item in (staged / "mlp").iterdir():
        target = HERE / "mlp" / item.name
        if item.is_dir():
            shutil.rmtree(target, ignore_errors=True)
            shutil.copytree(item, target)
        else:
            shutil.copy2(item, target)
    scripted = ["--model-name", "mlp_scripted", "--serialized-file", str(work / "mlp_scripted.pt")]
    archive([*scripted, "--export-path", str(HERE), *common])


Colors = list[tuple[str, tuple[int, int, int]]]
Normalize = tuple[tuple[float, ...], tuple[float, ...]]


def build_color_model(
    work: Path,
    handler: str,
    name: str,
    model_class: str,
    colors: Colors,
    normalize: Normalize,
    image: tuple[str, Image.Image],
) -> None:
    """One of the colour examples (classifier, segmenter, detector): a 1x1 convolution whose weights score each
    pixel against ``colors`` (inputs normalized by ``normalize``, a (mean, std) pair), its labels and sample image."""
    folder = EXAMPLES / handler
    model = load_model(folder, model_class)
    set_color_weights(model.score, colors, *normalize)
    write_labels(folder, colors)
    sample_name, picture = image
    picture.save(folder / sample_name, optimize=False)
    build_archive(work, folder, name, model, handler, ["index_to_name.json"])


def build_news_classifier(work: Path) -> None:
    folder = EXAMPLES / "text_classifier"
    vocab = {"<unk>": 0}
    for words in TOPICS.values():
        for word in words.split():
            vocab.setdefault(word.replace("_", " "), len(vocab))
    model = load_model(folder, "NewsClassifier")
    embedding = torch.zeros_like(model.embedding.weight)  # <unk> counts for no topic
    for topic, words in enumerate(TOPICS.values()):
        for word in words.split():
            embedding[vocab[word.replace("_", " ")], topic] = 1.0
    with torch.no_grad():
        model.embedding.weight.copy_(embedding)
        model.fc.weight.copy_(torch.eye(len(TOPICS)))
        model.fc.bias.zero_()
    torch.save(vocab, work / "source_vocab.pt")
    write_labels(folder, [(name, None) for name in TOPICS])
    write(folder / "sample.txt", "The team won the final game of the season with a late goal.\n")
    build_archive(work, folder, "news_classifier", model, "text_classifier", ["index_to_name.json"], work)


def build_fahrenheit(work: Path) -> None:
    folder = EXAMPLES / "tensor"
    model = load_model(folder, "CelsiusToFahrenheit")
    with torch.no_grad():
        model.linear.weight.fill_(1.8)
        model.linear.bias.fill_(32.0)
    write(folder / "celsius.json", json.dumps({"data": [[-40.0], [0.0], [20.0], [100.0]]}) + "\n")
    build_archive(work, folder, "fahrenheit", model, "tensor", [])


def build_archive(
    work: Path,
    folder: Path,
    name: str,
    model: torch.nn.Module,
    handler: str,
    extra: list[str],
    extra_dir: Path | None = None,
) -> None:
    """``<name>.mar`` in this folder: ``folder``'s model.py and model-config.yaml, the model's state dict, the
    built-in ``handler``, and ``extra`` files from ``folder`` (plus ``source_vocab.pt`` from ``extra_dir``)."""
    torch.save(model.state_dict(), work / f"{name}.pt")
    extra_files = [str(folder / file) for file in extra]
    if extra_dir is not None:
        extra_files.append(str(extra_dir / "source_vocab.pt"))
    args = ["--model-name", name, "--version", "1.0", "--handler", handler, "--export-path", str(HERE), "--force"]
    args += ["--model-file", str(folder / "model.py"), "--serialized-file", str(work / f"{name}.pt")]
    args += ["--config-file", str(folder / "model-config.yaml")]
    if extra_files:
        args += ["--extra-files", ",".join(extra_files)]
    archive(args)


def archive(args: list[str]) -> None:
    """``servekit archive`` with ``args``; a ``.mar`` it writes is then made reproducible."""
    if archiver.main(args) != 0:
        raise SystemExit(f"servekit archive {' '.join(args)} failed")
    export, name = Path(args[args.index("--export-path") + 1]), args[args.index("--model-name") + 1]
    if (export / f"{name}.mar").is_file():
        normalize_zip(export / f"{name}.mar")


def normalize_zip(path: Path) -> None:
    """Rewrite a ``.mar`` with fixed entry dates and modes and a fixed manifest ``createdOn``."""
    with zipfile.ZipFile(path) as source:
        entries = [(info.filename, source.read(info)) for info in source.infolist()]
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as target:
        for name, data in entries:
            if name == archiver.MANIFEST_NAME:
                data = manifest_text(data.decode()).encode()
            info = zipfile.ZipInfo(name, ZIP_DATE)
            info.external_attr = 0o100644 << 16
            info.compress_type = zipfile.ZIP_DEFLATED
            target.writestr(info, data)


def strip_debug_records(path: Path) -> None:
    """Drop TorchScript's ``*.debug_pkl`` records (source ranges with absolute paths); ``torch.jit.load`` does not
    need them."""
    with zipfile.ZipFile(path) as source:
        entries = [(i.filename, source.read(i)) for i in source.infolist() if not i.filename.endswith(".debug_pkl")]
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as target:
        for name, data in entries:
            target.writestr(zipfile.ZipInfo(name, ZIP_DATE), data)


def fix_manifest(path: Path) -> None:
    path.write_text(manifest_text(path.read_text()))


def manifest_text(text: str) -> str:
    document = json.loads(text)
    document["createdOn"] = CREATED_ON
    return json.dumps(document, indent=2)


def set_color_weights(
    conv: torch.nn.Module,
    colors: list[tuple[str, tuple[int, int, int]]],
    mean: tuple[float, ...],
    std: tuple[float, ...],
) -> None:
    """Set a 1x1 convolution to score a pixel x = (rgb - mean) / std against each colour p as
    sharpness * (p . rgb - |p|^2 / 2), which is -sharpness / 2 * |rgb - p|^2 up to a term shared by all colours:
    the nearest colour scores highest."""
    prototypes = torch.tensor([rgb for _, rgb in colors], dtype=torch.float64) / 255
    mean_t, std_t = torch.tensor(mean, dtype=torch.float64), torch.tensor(std, dtype=torch.float64)
    weight = SHARPNESS * prototypes * std_t
    bias = SHARPNESS * (prototypes @ mean_t - (prototypes**2).sum(dim=1) / 2)
    assert isinstance(conv, torch.nn.Conv2d) and conv.weight.shape[:2] == (len(colors), 3), conv
    with torch.no_grad():
        conv.weight.copy_(weight.float()[:, :, None, None])
        assert conv.bias is not None
        conv.bias.copy_(bias.float())


def draw_landscape(width: int, height: int) -> Image.Image:
    """Blue sky over green grass, a yellow sun and a white cloud."""
    image = Image.new("RGB", (width, height), (60, 110, 210))
    draw = ImageDraw.Draw(image)
    draw.rectangle((0, int(height * 0.6), width, height), fill=(50, 150, 50))
    sun = (int(width * 0.78), int(height * 0.2), int(height * 0.12))
    draw.ellipse((sun[0] - sun[2], sun[1] - sun[2], sun[0] + sun[2], sun[1] + sun[2]), fill=(250, 210, 50))
    draw.ellipse((int(width * 0.15), int(height * 0.15), int(width * 0.45), int(height * 0.32)), fill=(245, 245, 245))
    return image


def draw_shapes() -> Image.Image:
    """A red square, a blue disc and a green triangle on a light background (160 x 120)."""
    image = Image.new("RGB", (160, 120), OBJECT_COLORS[0][1])
    draw = ImageDraw.Draw(image)
    draw.rectangle((20, 30, 59, 69), fill=OBJECT_COLORS[1][1])  # box [20, 30, 60, 70]
    draw.ellipse((90, 20, 129, 59), fill=OBJECT_COLORS[3][1])  # box [90, 20, 130, 60]
    draw.polygon([(70, 109), (100, 80), (130, 109)], fill=OBJECT_COLORS[2][1])  # box [70, 80, 131, 110]
    return image


def write_labels(folder: Path, classes: list[tuple[str, object]]) -> None:
    write(folder / "index_to_name.json", json.dumps({str(i): name for i, (name, _) in enumerate(classes)}, indent=2))


def load_model(folder: Path, class_name: str) -> torch.nn.Module:
    model = getattr(load_module(folder / "model.py", f"{folder.name}_model"), class_name)()
    assert isinstance(model, torch.nn.Module)
    return model.eval()


def load_module(path: Path, name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text if text.endswith("\n") else text + "\n")
    return path


if __name__ == "__main__":
    if os.environ.get("PYTHONHASHSEED") != "0":  # TorchScript writes a module's constants in set order
        os.execve(sys.executable, [sys.executable, *sys.argv], {**os.environ, "PYTHONHASHSEED": "0"})
    main()
