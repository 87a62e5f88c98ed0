"""resnext_jax.bench.input (scripts/benchmark_input.py): the images it writes, its table."""

import PIL.Image
import pytest

from resnext_jax.bench import input as input_bench


def test_write_images_in_class_folders(tmp_path):
    input_bench.write_images(tmp_path, 5, classes=2)
    files = sorted(p.relative_to(tmp_path / "train").as_posix()
                   for p in (tmp_path / "train").rglob("*.JPEG"))  # fmt: skip
    assert files == ["class000/00000.JPEG", "class000/00002.JPEG", "class000/00004.JPEG",
                     "class001/00001.JPEG", "class001/00003.JPEG"]  # fmt: skip
    for i, (w, h) in enumerate(input_bench.SIZES[:5]):
        with PIL.Image.open(tmp_path / "train" / f"class{i % 2:03d}" / f"{i:05d}.JPEG") as image:
            assert image.mode == "RGB"
            assert 0.9 * w - 1 <= image.width <= 1.1 * w and 0.9 * h - 1 <= image.height <= 1.1 * h


def test_markdown_rows_and_ratio():
    ours = dict(images_per_s=200.0, images_per_s_per_worker=100.0, images_per_cpu_s=80.0)
    pipelines = {"ours": ours, "torchvision": dict(ours, images_per_cpu_s=40.0)}
    results = dict(images=64, workers=2, batch_size=32, image_size=224, interpolation="bicubic",
                   rounds=3, cpus=2, versions={"pillow": "1", "torch": "2"}, libjpeg_turbo=True,
                   pipelines=pipelines)  # fmt: skip
    assert input_bench.markdown(results).splitlines() == [
        "64 JPEGs, 2 workers, batch 32, 224px bicubic, median of 3 rounds, 2 CPUs visible",
        "",
        "| pipeline | images/s | images/s per worker | images per CPU-second |",
        "|---|---|---|---|",
        "| ours | 200 | 100 | 80 |",
        "| torchvision | 200 | 100 | 40 |",
        "",
        "ours / torchvision, per CPU-second: 2.00x",
        "(pillow 1, torch 2; libjpeg-turbo: True)",
    ]


def test_fewer_images_than_a_batch_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as exit_info:
        input_bench.main(["--images=8", "--batch_size=16"])
    assert exit_info.value.code == 2
    assert "--images must be at least --batch_size" in capsys.readouterr().err


@pytest.mark.slow
def test_both_pipelines_pass_over_every_image(tmp_path):
    """End to end at 32 px: one torch worker process, one thread of ours, one round."""
    args = input_bench._parser().parse_args(
        ["--images=8", "--classes=2", "--batch_size=4", "--workers=1", "--image_size=32",
         "--rounds=1"]
    )  # fmt: skip
    input_bench.write_images(tmp_path, args.images, args.classes)
    results = input_bench.run(tmp_path, args)
    assert (results["images"], results["workers"], results["rounds"]) == (8, 1, 1)
    for row in results["pipelines"].values():
        assert row["images_per_pass"] == 8 and len(row["wall_s"]) == len(row["cpu_s"]) == 1
        assert row["images_per_s"] > 0 and row["images_per_cpu_s"] > 0
        assert row["images_per_s_per_worker"] == row["images_per_s"]
